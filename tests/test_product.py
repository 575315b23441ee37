"""benchmarks/product.py on the CPU: the cheap phases end to end on the tiny model, the watcher on a real child,
the run figures and the report from records, and a clean stop at the deadline — so a typo costs no GPU minutes."""

import json
import subprocess
import sys
import wave
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import product as P  # noqa: E402
from benchmarks import product_launch as L  # noqa: E402
from benchmarks.product_phases import stream_figures  # noqa: E402
from benchmarks.product_report import render_report  # noqa: E402


def test_cheap_phases_end_to_end_on_the_tiny_model(tmp_path):
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "product.py"), "--work", str(work), "--tiny",
                        "--phase", "make", "--phase", "calib", "--phase", "run-fp8", "--phase", "report",
                        "--export", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    make = json.loads((work / "state" / "make.json").read_text())
    assert make["status"] == "done" and make["inspect"]["complete"] and make["inspect"]["lora_rank"] == 8
    assert make["command"].startswith("python3 scripts/make_fullsize_checkpoint.py --out ")
    assert (work / "shm" / L.DIT_NAME / "models_t5_umt5-xxl-enc-bf16.pth").is_symlink()
    assert make["host_peak_process_GiB"] > 0.1 and make["processes"] >= 1
    calib = json.loads((work / "state" / "calib.json").read_text())
    assert calib["command"].startswith("lowvram calib make --out ") and len(calib["clips"]) == 2
    with wave.open(calib["speech"]["audio"]) as f:
        assert f.getnframes() / f.getframerate() >= 1.0
    assert json.loads((work / "clips" / "clips.json").read_text())["clips"]
    blocked = json.loads((work / "state" / "run-fp8.json").read_text())
    assert blocked["status"] == "blocked" and "quantize-fp8" in blocked["why"]
    report = (tmp_path / "out" / "product_report.md").read_text()
    assert "| make |" in report and "| calib |" in report and "blocked: needs quantize-fp8" in report
    assert set(json.loads((tmp_path / "out" / "product_results.json").read_text())["phases"]) >= {"make", "calib"}


def ctx_for(tmp_path, *argv):
    args = P.parse_args(["--work", str(tmp_path), *argv])
    ctx = L.Ctx(args, tmp_path, tmp_path / "shm")
    ctx.state.mkdir(parents=True, exist_ok=True)
    return ctx


def test_a_child_is_watched_from_outside(tmp_path):
    ctx = ctx_for(tmp_path, "--tiny")
    out = tmp_path / "grows.bin"
    code = ("import time; x = bytearray(300 * 2**20); time.sleep(0.8); "
            f"open({str(out)!r}, 'wb').write(b'x'); time.sleep(0.6); print('{{\"ok\": 1}}')")
    rec, stdout = L.launch(ctx, "child", [sys.executable, "-c", code], {"SOME_VAR": "1"}, output=out)
    assert rec["rc"] == 0 and L.last_json(stdout) == {"ok": 1}
    assert rec["host_peak_process_GiB"] >= 0.28 and rec["host_peak_tree_anon_GiB"] >= 0.28
    assert 0.7 <= rec["first_output_bytes_s"] <= rec["wall_s"]
    assert rec["command"].startswith("SOME_VAR=1 ")
    with pytest.raises(L.PhaseFailed, match="exit 3"):
        L.launch(ctx, "fails", [sys.executable, "-c", "import sys; sys.exit(3)"])


def test_stops_cleanly_when_the_deadline_is_short(tmp_path, capsys):
    assert P.main(["--work", str(tmp_path), "--deadline-s", "30", "--phase", "make"]) == 0
    assert f"stopped before finishing: make needs ~{P.BY_NAME['make'].estimate_s:.0f} s" in capsys.readouterr().out
    assert not (tmp_path / "state" / "make.json").exists()
    with pytest.raises(SystemExit, match="unknown phase"):
        P.main(["--work", str(tmp_path), "--phase", "mkae"])


def test_run_figures_and_the_report_from_records(tmp_path):
    ctx = ctx_for(tmp_path)
    ctx.dit.mkdir(parents=True)
    from lowvram.model.config import s2v_14b
    from lowvram.synthetic import config_json

    (ctx.dit / "config.json").write_text(json.dumps(config_json(s2v_14b())))
    times = [30.0, 30.7, 31.4, 32.1, 33.5, 34.15, 34.8, 35.45, 36.1]  # block 4 re-prefills; steady 0.65 s
    summary = {"layout": "tp1xpp1-offload", "blocks": 9, "frames": 105, "seconds": 37.0,
               "time_to_first_frame_s": 30.0, "fps": 2.8, "block_times_s": times,
               "block_frames": [9 + 12 * i for i in range(9)]}
    figures = stream_figures(ctx, summary)
    assert figures["steady_s_per_block"] == 0.65 and figures["steady_fps"] == round(12 / 0.65, 2)
    run = {"status": "done", "command": "LOWVRAM_GPU_CAP_GIB=24 lowvram run q-fp8 ...", "wall_s": 60.0,
           "host_peak_tree_GiB": 30.1, "host_peak_tree_anon_GiB": 25.0, "host_peak_process_GiB": 30.0,
           "gpu_peak_per_process_GiB": [21.5], "gpu_peak_above_baseline_GiB": 21.6, "first_output_bytes_s": 33.0,
           **figures, "compile_cache": "cold", "prompt_cache": "cold",
           "video": {"video_codec": "h264", "audio_codec": "aac", "frames": 105, "ok": True},
           "planned": {"peak_GiB": 21.7, "per_gpu_peak_GiB": [21.7]}, "ranks": {"0": {"gpu_reserved_GiB": 20.9}}}
    quant = {"status": "done", "command": "lowvram quantize ...", "wall_s": 200.0, "folder_GB": 16.7,
             "calibration": {"seconds": 90.0, "read_GB": 118.0, "peak_rss_GiB": 9.0, "peak_vram_GiB": 5.0,
                             "kv_on_disk": True}, "end_to_end_rel_err": 0.021}
    bench = {"status": "done", "command": "lowvram bench ...", "renders": True,
             "rows": [{"config": "baseline", "fps": 15.0}, {"config": "fp8", "fps": 18.0, "psnr_db": 31.0}]}
    text = render_report({"machine": {"gpu": "NVIDIA H200", "date": "2026-12-04"},
                            "phases": {"quantize-fp8": quant, "run-fp8-offload-24": run, "bench": bench,
                                       "run-tp1xpp4": {"status": "skipped", "why": "no --share-gpu"}}})
    assert "NVIDIA H200" in text and "| run-fp8-offload-24 | tp1xpp1-offload | 30.0 / 33.0 | 0.650 |" in text
    assert "21.70 (21.70)" in text and "h264+aac 105 frames ok" in text and "e2e err 0.0210" in text
    assert "skipped: no --share-gpu" in text and "| fp8 | – | – | – | 18.00 |" in text
    assert "- run-fp8-offload-24: `LOWVRAM_GPU_CAP_GIB=24 lowvram run q-fp8 ...`" in text
