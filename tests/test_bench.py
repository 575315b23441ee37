"""`lowvram bench` end to end on the tiny model: bf16 baseline vs fp8 and int8 quantized folders, 2 clips."""

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from lowvram.benchmarks.configs import parse_config

from lowvram.demo import face_like_image, speech_like_wave, write_tiny_checkpoint
from lowvram.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SIZE, SECONDS = "64*64", "1"


def lowvram(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lowvram.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = root / "ckpt"
    write_tiny_checkpoint(ckpt)
    media = root / "media"
    media.mkdir()
    for i in range(2):
        face_like_image(media / f"face{i}.png", 96, 96)
        speech_like_wave(media / f"speech{i}.wav", 1.2, seed=i)
    r = lowvram("calib", "make", "--image", media / "face0.png", "--image", media / "face1.png",
                "--audio", media / "speech0.wav", "--audio", media / "speech1.wav", "--prompt", "a person talking",
                "--out", root / "clips")
    assert r.returncode == 0, r.stderr
    for fmt in ("fp8", "int8"):
        r = lowvram("quantize", ckpt, "--out", root / fmt, "--calib", root / "clips", "--format", fmt, "--device",
                    "cpu", "--calib-size", SIZE, "--calib-blocks", "1", "--no-eval", "--quiet")
        assert r.returncode == 0, r.stderr
    return root


def bench_args(root, *extra):
    return ("bench", "--baseline", root / "ckpt", "--candidate", root / "fp8", "--candidate", root / "int8",
            "--clips", root / "clips", "--out", root / "report", "--device", "cpu", "--size", SIZE, "--seconds",
            SECONDS, *extra)


@pytest.fixture(scope="module")
def report(bench_setup):
    r = lowvram(*bench_args(bench_setup))
    assert r.returncode == 0, r.stdout + r.stderr
    return bench_setup / "report", r.stdout


def test_bench_writes_the_three_files(report):
    out, stdout = report
    for name in ("report.html", "report.md", "results.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in res["configs"]] == ["baseline", "fp8", "int8"]
    assert [c["fmt"] for c in res["configs"]] == ["bf16", "fp8", "int8"]
    assert res["configs"][0]["lora"].endswith("liveavatar.safetensors")  # the checkpoint's LoRA, found by itself
    for label in ("baseline", "fp8", "int8"):
        for clip in ("speech0", "speech1"):
            run = res["runs"][label][clip]
            assert run["status"] == "done", run
            sp = run["speed"]
            assert sp["blocks"] == 3 and sp["clock"] == "per-block" and 0 < sp["ttff_s"] and sp["s_per_block"] > 0
            assert run["memory"]["host_peak_gib"] > 0.05
            assert "corr" in res["sync"][label][clip]["proxy"]
    for label in ("fp8", "int8"):
        for clip in ("speech0", "speech1"):
            q = res["quality"][label][clip]
            assert q["frames"] == 25 and len(q["psnr"]) == 25
            assert 15 < q["psnr_mean"] <= 100 and 0 < q["ssim_mean"] <= 1
            assert 0 < q["latent_rel_err"] < 0.3
            assert (out / res["strips"][label][clip]).is_file()
    # int8 (W8A8 SmoothQuant) tracks bf16 more closely than fp8 on this model
    rows = {r["config"]: r for r in res["summary"]["rows"]}
    assert rows["int8"]["latent_rel_err"] < rows["fp8"]["latent_rel_err"]
    assert rows["baseline"]["psnr_db"] is None and rows["baseline"]["d_s_per_block_pct"] is None
    # no weights for FID / SyncNet here: they are reported as not computed, with where to put the files
    assert res["fid"]["status"] == "skipped" and "--fid-weights" in res["fid"]["reason"]


def _md_summary_tables(md: str) -> list[list[list[str]]]:
    section = md.split("## Summary", 1)[1].split("## What each metric is", 1)[0]
    tables, current = [], None
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = []
                tables.append(current)
            if not set("".join(cells)) <= set("-"):
                current.append(cells)
        else:
            current = None
    return tables


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self._cur, self._cell = {}, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id", "").startswith("summary-"):
            self._cur = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._cur is not None and "data-config" in a:
            self._cur.append({})
        elif tag == "td" and self._cur is not None and "data-key" in a:
            self._cell = a["data-key"]
            self._cur[-1][self._cell] = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "table":
            self._cur = None

    def handle_data(self, data):
        if self._cell is not None and self._cur:
            self._cur[-1][self._cell] += data


def _same(cell: str, value) -> bool:
    if value is None:
        return cell == "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(cell) == value
    return cell == str(value)


def test_report_numbers_equal_results_json(report):
    out, _ = report
    res = json.loads((out / "results.json").read_text())
    cols = res["summary"]["columns"]
    rows = res["summary"]["rows"]
    groups = [[c for c in cols if c["group"] in ("both", g)] for g in ("speed", "quality")]
    md_tables = _md_summary_tables((out / "report.md").read_text())
    assert len(md_tables) == 2
    for table, group in zip(md_tables, groups):
        assert table[0] == [c["label"] for c in group]
        assert len(table) == 1 + len(rows)
        for cells, row in zip(table[1:], rows):
            for cell, col in zip(cells, group):
                assert _same(cell, row[col["key"]]), (col["key"], cell, row[col["key"]])
    parser = _Tables()
    parser.feed((out / "report.html").read_text())
    assert set(parser.tables) == {"summary-speed", "summary-quality"}
    checked = 0
    for tid, group in zip(("summary-speed", "summary-quality"), groups):
        html_rows = parser.tables[tid]
        assert len(html_rows) == len(rows)
        for hrow, row in zip(html_rows, rows):
            for col in group:
                assert _same(hrow[col["key"]], row[col["key"]]), (tid, col["key"], hrow[col["key"]])
                checked += 1
    assert checked > 40
    numeric = [r["s_per_block"] for r in rows] + [rows[1]["psnr_db"], rows[2]["ssim"], rows[1]["latent_rel_err"]]
    assert all(isinstance(v, float) for v in numeric)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 + 4  # psnr, speed, memory, sync plots + 4 frame strips
    assert "src=\"figures" not in html  # self-contained


def test_finished_runs_are_reused(report, bench_setup):
    out, _ = report
    run_json = out / "runs" / "int8" / "speech1" / "run.json"
    before = run_json.stat().st_mtime_ns
    r = lowvram(*bench_args(bench_setup))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("reused") == 6 and "running" not in r.stdout
    assert run_json.stat().st_mtime_ns == before


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, _ = report
    shot = tmp_path / "report.png"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report_html.py"), str(out / "report.html"),
                        "--out", str(shot), "--height", "2400"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert shot.stat().st_size > 50_000


def test_report_with_gpu_ranks_and_syncnet(report, tmp_path):
    """The CUDA-only parts of the report (per-rank GPU memory, Sync-C/D) from results as a GPU machine writes them."""
    from lowvram.benchmarks.summary import summarize
    from lowvram.benchmarks.report import write_report

    out, _ = report
    res = json.loads((out / "results.json").read_text())
    for i, label in enumerate(("baseline", "fp8", "int8")):
        for clip, run in res["runs"][label].items():
            ranks = [{"name": f"rank{r}", "device": f"cuda:{r}", "host_gib": 1.0, "gpu_alloc_gib": 10.0 - i - r,
                      "gpu_reserved_gib": 11.0 - i - r} for r in range(2)]
            run["memory"].update(ranks=ranks, gpu_alloc_peak_gib=10.0 - i, gpu_reserved_peak_gib=11.0 - i)
            res["sync"][label][clip]["syncnet"] = {"sync_c": 7.0 - i, "sync_d": 7.5 + i, "offset": 0, "frames": 33}
    res["summary"] = summarize(res)
    rows = {r["config"]: r for r in res["summary"]["rows"]}
    assert rows["int8"]["gpu_alloc_gib"] == 8.0 and rows["int8"]["d_gpu_alloc_pct"] == -20.0
    assert rows["fp8"]["sync_c"] == 6.0 and rows["fp8"]["d_sync_c"] == -1.0 and rows["int8"]["d_sync_d"] == 2.0
    (tmp_path / "figures").mkdir()
    for rel in [p for per in res["strips"].values() for p in per.values()]:
        shutil.copy(out / rel, tmp_path / rel)
    written = write_report(res, tmp_path)
    assert (tmp_path / "figures" / "memory.png").is_file() and (tmp_path / "figures" / "sync.png").is_file()
    assert "<td class='good' data-key='d_gpu_alloc_pct'>-20</td>" in written["html"].read_text()


def test_candidate_syntax(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "liveavatar.safetensors").write_bytes(b"")
    c = parse_config(f"{ckpt}::--kv=fp8 --tp 2 --label kv-fp8", "candidate")
    assert (c.label, c.kv, c.tp, c.fmt, c.lora_auto) == ("kv-fp8", "fp8", 2, "bf16", True)
    assert parse_config(f"{ckpt}::--kv fp8,--no-lora", "candidate").lora is None
    assert parse_config(str(ckpt), "baseline").label == "baseline"
    for bad, needle in [(f"{ckpt}::--bogus=1", "unknown option --bogus"), (f"{ckpt}::--kv=int4", "use bf16 or fp8"),
                        (f"{tmp_path}/nope", "no such folder"), (f"{ckpt}::--tp", "needs a value")]:
        with pytest.raises(InputError, match=needle):
            parse_config(bad, "candidate")


def test_bench_refuses_bad_input_in_one_line(tmp_path):
    r = lowvram("bench", "--baseline", tmp_path / "missing", "--candidate", tmp_path, "--clips", tmp_path,
                "--out", tmp_path / "r")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
