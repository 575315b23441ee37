"""benchmarks/product.py's phases: each runs the real CLI (or a benchmark script) as its own watched process and
returns its record."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.product_launch import REPO, SHARE_GPU_FLAG, Ctx, PhaseFailed, last_json, launch, lowvram
from benchmarks.watch import GB, GiB, nvidia_smi
from lowvram.quantize.pipeline import GPU_CAP_ENV

# ----------------------------------------------------------------------------------------------------------
# make, calib


def phase_make(ctx: Ctx) -> dict:
    for folder in (ctx.models, ctx.dit):  # a half-written earlier attempt
        shutil.rmtree(folder, ignore_errors=True)
    argv = [sys.executable, str(REPO / "scripts" / "make_fullsize_checkpoint.py"), "--out", str(ctx.models),
            "--dit-dir", str(ctx.dit), "--device", ctx.device, "--json"] + (["--tiny"] if ctx.tiny else [])
    rec, stdout = launch(ctx, "make", argv)
    report = last_json(stdout)
    rec["written"] = {p["part"]: {"GB": round(p["bytes"] / GB, 2), "s": p["seconds"],
                                  "GB_per_s": round(p["bytes"] / GB / max(p["seconds"], 1e-9), 2)}
                      for p in report["parts"]}
    rec["written_GB"], rec["write_s"] = round(report["bytes"] / GB, 2), report["seconds"]
    inspect, stdout = launch(ctx, "make-inspect", lowvram("inspect", str(ctx.dit), "--lora",
                                                          str(ctx.dit / "liveavatar.safetensors"), "--json"))
    found = json.loads(stdout)
    rec["inspect"] = {"command": inspect["command"], "wall_s": inspect["wall_s"], "complete": found["complete"],
                      "params": found["params"], "lora_rank": (found.get("lora") or {}).get("rank")}
    return rec


def source_clips(ctx: Ctx) -> Path:
    """--clips, or (tiny) the demo's synthetic portraits + speech-like audio."""
    if ctx.args.clips is not None:
        return Path(ctx.args.clips).resolve()
    if not ctx.tiny:
        raise PhaseFailed("--clips DIR is needed (the real images + speech with clips.json, e.g. a copy of "
                          "../shared/clips inside the checkout)")
    from lowvram.demo import make_clips

    folder = ctx.work / "clips-source"
    if not (folder / "clips.json").is_file():
        make_clips(folder, count=2)
    return folder


def phase_calib(ctx: Ctx) -> dict:
    src = source_clips(ctx)
    entries = json.loads((src / "clips.json").read_text())["clips"][:ctx.args.calib_clips]
    shutil.rmtree(ctx.clips, ignore_errors=True)
    argv = lowvram("calib", "make", "--out", str(ctx.clips))
    for e in entries:
        argv += ["--image", str(src / e["image"]), "--audio", str(src / e["audio"]), "--prompt", e["prompt"]]
    rec, _ = launch(ctx, "calib", argv)
    rec["clips"] = [e["name"] for e in entries]
    rec["speech"] = make_speech(ctx, src)
    return rec


def make_speech(ctx: Ctx, src: Path) -> dict:
    """One speech file of at least --seconds (+2.5 s, so the stream is cut by --seconds, not by the audio): the
    clips' recordings one after another, at the first one's rate; image and prompt from the first clip."""
    import av

    from lowvram.conditioning.audio import decode_audio

    entries = json.loads((src / "clips.json").read_text())["clips"]
    with av.open(str(src / entries[0]["audio"])) as c:
        rate = c.streams.audio[0].codec_context.sample_rate
    want = ctx.args.seconds + 2.5
    pieces, used = [], []
    for e in entries:
        pieces.append(decode_audio(src / e["audio"], rate))
        used.append(e["name"])
        if sum(len(p) for p in pieces) >= want * rate:
            break
    wave_f32 = np.concatenate(pieces)[:int(want * rate)]
    if len(wave_f32) < ctx.args.seconds * rate:
        raise PhaseFailed(f"the clips hold {len(wave_f32) / rate:.1f} s of speech, less than --seconds "
                          f"{ctx.args.seconds}")
    folder = ctx.work / "speech"
    folder.mkdir(parents=True, exist_ok=True)
    with wave.open(str(folder / "speech.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(wave_f32, -1, 1) * 32767).astype(np.int16).tobytes())
    first = entries[0]
    shutil.copyfile(src / first["image"], folder / Path(first["image"]).name)
    info = {"audio": str(folder / "speech.wav"), "seconds": round(len(wave_f32) / rate, 2), "rate": rate,
            "from": used, "image": str(folder / Path(first["image"]).name), "prompt": first["prompt"]}
    (folder / "speech.json").write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------------------------------------
# quantize


def kv_scratch_bytes(ctx: Ctx) -> int:
    """Disk the calibration KV caches take with --kv-scratch: samples x blocks x steps x block tokens x K/V."""
    from lowvram.model.config import DiTConfig

    cfg = DiTConfig.from_json(ctx.dit / "config.json")
    h, w = (int(x) for x in ctx.size.split("*"))
    tokens = cfg.frames_per_block * (h // 16) * (w // 16)
    return ctx.args.calib_clips * ctx.args.calib_blocks * cfg.num_steps * tokens * 2 * cfg.dim * 2 * cfg.num_layers


QUANT_OUT_GB = {"fp8": 16.8, "int8": 16.8, "int4": 9.4}


def phase_quantize(fmt: str) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        argv = lowvram("quantize", str(ctx.dit), "--calib", str(ctx.clips), "--format", fmt, "--out", str(ctx.q(fmt)),
                       "--calib-blocks", str(ctx.args.calib_blocks), "--calib-size", ctx.size, "--device", ctx.device)
        if fmt == "fp8":
            argv += ["--act", "static"]
        scratch = ctx.work / "kv-scratch"
        need = kv_scratch_bytes(ctx) + (0 if ctx.tiny else QUANT_OUT_GB[fmt] * GB) + 2 * GB
        if ctx.args.kv_scratch and shutil.disk_usage(ctx.work).free > need:
            argv += ["--kv-scratch", str(scratch)]  # a 24 GB machine keeps the calibration caches on disk
        env = {GPU_CAP_ENV: str(ctx.args.quantize_cap_gib)}
        rec, _ = launch(ctx, f"quantize-{fmt}", argv, env)
        shutil.rmtree(scratch, ignore_errors=True)
        rec["kv_scratch"] = "--kv-scratch" in argv
        rec.update(quant_figures(ctx.q(fmt)))
        return rec
    return run


def quant_figures(folder: Path) -> dict:
    report = json.loads((folder / "quant_report.json").read_text())
    run = report["calibration"]["run"]
    e2e = report.get("end_to_end") or {}
    return {"folder_GB": round(report["sizes"]["quantized_folder_bytes"] / GB, 2),
            "calibration": {"samples": run["samples"], "heldout": run["heldout"], "passes": run["passes"],
                            "seconds": run["seconds"], "load_seconds": run["load_seconds"],
                            "read_GB": round(run["bytes_read"] / GB, 1),
                            "peak_rss_GiB": round(run["peak_rss_bytes"] / GiB, 2),
                            "peak_vram_GiB": round(run["peak_vram_bytes"] / GiB, 2),
                            "host_state_GB": round(run["host_state_bytes"] / GB, 1), "kv_on_disk": run["kv_on_disk"]},
            "write_pass_read_GB": round(report["quantization_pass_bytes_read"] / GB, 1),
            "check_read_GB": round(e2e.get("bytes_read", 0) / GB, 1), "check_s": e2e.get("seconds"),
            "end_to_end_rel_err": e2e.get("final_rel_err_mean"), "quantizer_seconds": report["seconds"]}


# ----------------------------------------------------------------------------------------------------------
# run


@dataclass
class RunSpec:
    model: str  # "fp8", "int8", "int4" (a quantized folder) or "bf16" (the checkpoint)
    kv: str = "bf16"
    cap_gib: float | None = None
    tp: int | None = None
    pp: int | None = None
    gpus: str | None = None  # what the planner is told (default: the visible card, capped)
    seconds: float | None = None  # default --seconds
    warm: bool = False  # reuse run-fp8's prompt and compile caches


def share_gpu_supported() -> bool:
    out = subprocess.run(lowvram("run", "--help"), capture_output=True, text=True, env={**os.environ,
                                                                                         "COLUMNS": "200"}).stdout
    return SHARE_GPU_FLAG in out


def phase_run(spec: RunSpec) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        name = ctx.current
        world = (spec.tp or 1) * (spec.pp or 1)
        extra = []
        if world > 1 and ctx.device == "cuda":
            if not share_gpu_supported():
                return {"status": "skipped", "why": f"`lowvram run` has no {SHARE_GPU_FLAG} on this branch: ranks "
                                                    f"cannot share the one GPU (NCCL refuses); TODO issue 14"}
            extra.append(SHARE_GPU_FLAG)
        speech = json.loads((ctx.work / "speech" / "speech.json").read_text())
        resharded = None
        if spec.model == "bf16":
            model = ctx.dit
        elif (spec.tp or 1) > 1:
            model, resharded = split_for_tp(ctx, spec.model, spec.tp)
        else:
            model = ctx.q(spec.model)
        ctx.runs.mkdir(parents=True, exist_ok=True)
        output = ctx.runs / f"{name}.mp4"
        output.unlink(missing_ok=True)
        seconds = min(spec.seconds or math.inf, ctx.args.seconds)
        argv = lowvram("run", str(model), "--ckpt-dir", str(ctx.models), "--image", speech["image"], "--audio",
                       speech["audio"], "--prompt", speech["prompt"], "-o", str(output), "--size", ctx.size,
                       "--seconds", f"{seconds:g}", "--device", ctx.device, "--json")
        for flag, value in (("--kv", spec.kv if spec.kv != "bf16" else None), ("--tp", spec.tp), ("--pp", spec.pp),
                            ("--gpus", spec.gpus or (f"1x{spec.cap_gib:g}" if spec.cap_gib else None))):
            if value is not None:
                argv += [flag, str(value)]
        argv += extra
        env = run_env(ctx, name, spec)
        cold = not any((ctx.work / "inductor").rglob("*"))
        rec, stdout = launch(ctx, name, argv, env, output)
        summary = last_json(stdout)
        if resharded is not None:
            rec["reshard"] = resharded
        rec.update(stream_figures(ctx, summary), compile_cache="cold" if cold else "warm",
                   prompt_cache="warm" if spec.warm else "cold", video=video_check(output, summary["frames"]))
        rec["planned"] = planned_peaks(ctx, model, spec, summary["layout"])
        rec["ranks"] = {str(r): {k.replace("_bytes", "_GiB"): round(v / GiB, 2) for k, v in m.items()
                                 if k.endswith("_bytes")}
                        for r, m in (summary.get("ranks") or {}).items()}
        if world > 1:
            rec["launcher_note"] = ("the launcher (conditioning, then the VAE decode) is one more process with its own "
                                    "cap here; on four real cards it shares a GPU with a stage (the planner's "
                                    "vae_decode entry): add its GPU peak to that stage's")
            busy = {r: t["busy_s_per_block"] for r, t in (summary.get("stage_timing") or {}).items()
                    if t.get("busy_s_per_block") is not None}
            rec["stage_busy_s_per_block"] = busy  # stages sharing one GPU here: each one's busy time is inflated
            if busy:  # derived: on one GPU per stage the slowest stage sets the time per block
                from lowvram.model.config import DiTConfig

                frames = 4 * DiTConfig.from_json(ctx.dit / "config.json").frames_per_block  # video frames a block
                rec["derived_fps_one_gpu_per_stage"] = round(frames / max(busy.values()), 2)
        return rec
    return run


def split_for_tp(ctx: Ctx, fmt: str, tp: int) -> tuple[Path, dict | None]:
    """A copy of the quantized folder split for `tp` ranks (`lowvram reshard`); (folder, the reshard's record)."""
    out = ctx.work / f"q-{fmt}-tp{tp}"
    if (out / "manifest.json").is_file():
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    rec, _ = launch(ctx, f"reshard-{fmt}-tp{tp}", lowvram("reshard", str(ctx.q(fmt)), "--tp", str(tp), "--out",
                                                           str(out)))
    return out, {k: rec[k] for k in ("command", "wall_s", "host_peak_process_GiB", "read_GB")}


def run_env(ctx: Ctx, name: str, spec: RunSpec) -> dict[str, str]:
    """The cap, a prompt cache of the run's own (so umT5 loads, as on a user's first run; the warm run reuses
    run-fp8's) and one compile cache for all runs (cold on the first)."""
    prompts = ctx.runs / ("run-fp8" if spec.warm else name) / "prompt-cache"
    if not spec.warm:
        shutil.rmtree(prompts, ignore_errors=True)
    return {"LOWVRAM_CACHE_DIR": str(prompts), "TORCHINDUCTOR_CACHE_DIR": str(ctx.work / "inductor")}


def stream_figures(ctx: Ctx, summary: dict) -> dict:
    """Time to first frame, steady s/block and fps (blocks after the clip-1 re-prefill) from the run's summary."""
    from lowvram.model.config import DiTConfig

    times, frames = summary["block_times_s"], summary["block_frames"]
    per_block = [b - a for a, b in zip(times, times[1:])]
    new_frames = [b - a for a, b in zip(frames, frames[1:])]
    skip = DiTConfig.from_json(ctx.dit / "config.json").blocks_per_clip  # re-prefill at the first clip boundary
    steady = slice(skip, None) if len(per_block) > skip + 1 else slice(0, None)
    s_block = statistics.median(per_block[steady]) if per_block else None
    fps = statistics.median(new_frames[steady]) / s_block if s_block else None
    return {"layout": summary["layout"], "blocks": summary["blocks"], "frames": summary["frames"],
            "run_seconds": summary["seconds"], "time_to_first_frame_s": summary["time_to_first_frame_s"],
            "steady_s_per_block": round(s_block, 3) if s_block else None, "steady_fps": round(fps, 2) if fps else None,
            "overall_fps": summary["fps"], "block_times_s": [round(t, 2) for t in times],
            "startup_s": summary.get("startup_s")}


def video_check(path: Path, frames: int) -> dict:
    from lowvram.media import read_video_info

    info = read_video_info(path)
    return {"video_codec": info.video_codec, "audio_codec": info.audio_codec, "frames": info.num_frames,
            "size": f"{info.width}x{info.height}", "video_s": round(info.video_duration, 2),
            "audio_s": round(info.audio_duration, 2),
            "ok": info.video_codec == "h264" and info.audio_codec == "aac" and info.num_frames == frames}


def planned_peaks(ctx: Ctx, model: Path, spec: RunSpec, layout: str) -> dict:
    """`lowvram plan` for the same GPUs: the planned peak per GPU of the layout that ran."""
    gpus = spec.gpus or (f"1x{spec.cap_gib:g}" if spec.cap_gib else None)
    if gpus is None:
        rows = nvidia_smi("memory.total")
        gpus = f"1x{int(int(rows[0][0]) / 1024)}" if rows else "1x80"
    proc = subprocess.run(lowvram("plan", str(model), "--gpus", gpus, "--size", ctx.size, "--kv", spec.kv, "--json"),
                          capture_output=True, text=True, cwd=ctx.work)
    try:
        plan = json.loads(proc.stdout)
    except ValueError:
        return {"error": proc.stderr.strip()[-300:]}
    row = next((r for r in plan["layouts"] if r["name"] == layout), None)
    if row is None:
        return {"gpus": gpus, "error": f"the plan has no {layout}"}
    return {"gpus": gpus, "peak_GiB": row["peak_GiB"], "chosen": plan["chosen"],
            "per_gpu_peak_GiB": [round(g["peak"] / GiB, 2) for g in row["per_gpu_bytes"]]}


# ----------------------------------------------------------------------------------------------------------
# bench, report


def phase_bench(ctx: Ctx) -> dict:
    out = ctx.work / "bench"
    argv = lowvram("bench", "--baseline", str(ctx.dit), "--candidate", str(ctx.q("fp8")), "--candidate",
                   str(ctx.q("int8")), "--clips", str(ctx.clips), "--out", str(out), "--size", ctx.size,
                   "--seconds", f"{ctx.args.bench_seconds:g}", "--device", ctx.device)
    rec, _ = launch(ctx, "bench", argv, {"LOWVRAM_CACHE_DIR": str(out / "prompt-cache"),
                                         "TORCHINDUCTOR_CACHE_DIR": str(ctx.work / "inductor")})
    results = json.loads((out / "results.json").read_text())
    keep = ("config", "layout", "ttff_s", "s_per_block", "fps", "gpu_reserved_gib", "host_ram_gib", "psnr_db",
            "ssim", "latent_rel_err", "runs_failed")
    rec["rows"] = [{k: row.get(k) for k in keep} for row in results["summary"]["rows"]]
    rec["report_files"] = {n: (out / n).stat().st_size for n in ("report.html", "report.md", "results.json")
                           if (out / n).is_file()}
    rec["renders"] = all(rec["report_files"].get(n, 0) > 0 for n in ("report.html", "report.md"))
    return rec


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "benchmarks" / name), *args]


def bench_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def phase_vae(ctx: Ctx) -> dict:
    """The VAE's streaming decode per block at the real size (benchmarks/vae.py): bf16/fp32, cuDNN search."""
    if ctx.device != "cuda":
        return {"status": "skipped", "why": "needs a CUDA GPU"}
    rec, stdout = launch(ctx, "vae", script("vae.py", "--size", ctx.size), {"PYTHONPATH": str(REPO)})
    rec["rows"] = bench_rows(stdout)[-1]["rows"]
    return rec


ENGINE_RUNS = {  # what the product adds per block to the engine alone: the VAE decode, then the mp4 too
    "engine": ("--format", "fp8", "--act", "static"),
    "engine+vae": ("--format", "fp8", "--act", "static", "--sink", "vae"),
    "engine+vae+mp4": ("--format", "fp8", "--act", "static", "--sink", "mp4"),
    "engine+vae+mp4, fp8 KV offloaded, 24 GiB cap": ("--format", "fp8", "--act", "static", "--sink", "mp4", "--kv",
                                                      "fp8", "--offload", "--cap-gib", "24"),
    "engine, fp8 KV offloaded, no cap, where the peak's bytes are": ("--format", "fp8", "--act", "static", "--kv", "fp8",
                                                                     "--offload", "--memory-breakdown"),
}


def phase_engine(ctx: Ctx) -> dict:
    """benchmarks/runtime.py at 704x384 with random weights, alone and with lowvram run's BlockSink on the GPU."""
    if ctx.device != "cuda":
        return {"status": "skipped", "why": "needs a CUDA GPU"}
    speech = json.loads((ctx.work / "speech" / "speech.json").read_text())["audio"] if \
        (ctx.work / "speech" / "speech.json").is_file() else None
    rec = {"runs": {}}
    for label, args in ENGINE_RUNS.items():
        argv = script("runtime.py", *args, "--blocks", "10", *(["--audio", speech] if speech and "mp4" in args else []))
        one, stdout = launch(ctx, f"engine-{len(rec['runs'])}", argv, {"PYTHONPATH": str(REPO),
                                                                        "TORCHINDUCTOR_CACHE_DIR": str(ctx.work / "inductor")})
        rec["runs"][label] = {**bench_rows(stdout)[-1], "command": one["command"], "wall_s": one["wall_s"],
                              "gpu_peak_per_process_GiB": one.get("gpu_peak_per_process_GiB")}
    return rec


def phase_demo(ctx: Ctx) -> dict:
    """`lowvram demo --device cuda` as a new user runs it on a one-GPU machine (tiny model, every layout)."""
    rec, stdout = launch(ctx, "demo-cuda", lowvram("demo", "--device", "cuda", "--out", str(ctx.work / "demo")))
    rec["stdout_tail"] = stdout.strip().splitlines()[-12:]
    return rec
