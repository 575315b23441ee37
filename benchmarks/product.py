"""The whole product at real size on one GPU, as a user runs it (issue 14), in phases that resume.

    python3 benchmarks/product.py --work /root/lv --shm /dev/shm/lv --clips shared_clips --deadline-s 560 \
        [--export $OUT] [--phase NAME ...] [--redo]
    python3 benchmarks/product.py --work /tmp/lv --tiny          # every phase on the demo's tiny model, on the CPU

Each step is the real CLI in its own process (`python -m lowvram.cli ...`, shown as `lowvram ...`), watched from
outside: wall time; peak host RSS of its process tree (all pages, and anonymous pages alone) and each process's
own high-water mark; GPU memory per process (nvidia-smi) and the GPU's total above what was in use before it
started; when the output mp4 first got bytes (its first fragment = its first frames). A phase writes
WORK/state/PHASE.json and is skipped once done. Before a phase starts, its estimated time is checked against
what is left of --deadline-s and its disk need against the free space; if either is short the script stops
cleanly ("stopped before ..."; run it again to continue). A child still running near the deadline is stopped:
quantize and bench resume where they were on the next call, a run starts over.

Where things go: the DiT shards + LoRA under --shm (32.6 + 1.4 GB; a RAM disk keeps them off a 64 GiB disk, and
the folder links to the other models so it looks like the download), umT5 + tokenizer, VAE and wav2vec2 (13.1
GB), the quantized folders (fp8 and int8 ~16.7 GB each, int4 ~9.3 GB), clips, runs, bench and state under --work.

A 24 GiB (or 16 GiB) card is emulated as a user would ask for it: `lowvram run --gpus 1x24` plans for that card
and caps each process's CUDA allocator to it (`--gpus 4x24 --share-gpu` puts four such ranks on the one GPU);
the quantizer, which has no --gpus, honours LOWVRAM_GPU_CAP_GIB the same way. The quantizer runs under a 24 GiB cap with its calibration KV caches on disk (--kv-scratch), as a 24 GB
machine would; 2 clips (1 held out) x --calib-blocks 1.

Estimates (seconds on an H200; the PHASES table holds them with ~40 % margin; measured figures: RESULTS.md):
- make: 47.1 GB written (34.0 to --shm, 13.1 to --work), drawn on the GPU; ~3 GB/s into tmpfs, ~1 GB/s to disk,
  wav2vec2's Hugging Face init on the CPU ~10 s: ~70.
- calib: decode 2 clips + the speech file: ~15.
- quantize (each format): encoders ~25 (umT5 11.4 GB to the GPU); calibration = 1 block x 4 steps = 4 passes, each
  loading 40 bf16 layers + LoRA (29.3 GB) = 117 GB read at ~4 GB/s ~30, compute 2 samples x 4 eager bf16 forwards
  (0.36 s each) ~5, KV caches to disk (2 x 4 x 2.6 GB = 20.8 GB written, read back per layer) ~25; layer files:
  29.3 GB read + 16.7 GB (int4 9.3) written and hashed ~40; held-out check: 4 passes x 16.7 GB ~20; start-up ~10:
  ~155 (int8's SmoothQuant search over 7 alphas: ~170). --kv-scratch only where the disk has room for it and the
  folder (fp8 yes; int8/int4 after fp8 usually not: then the caches stay in host RAM, ~26 GB, and the record says so).
- run (20 s = 42 blocks): start-up + wav2vec2 + VAE ~15, umT5 ~10, DiT load ~8, first block with compile
  23-40 s (RESULTS.md, runtime loop), 41 blocks x 0.65 (fp8) / 0.74 (fp8 offload) / ~0.9 (int8 offload) /
  1.02 s (int4 offload): fp8 ~85, fp8-offload ~100, int8 ~110, int4 ~120; warm (5 s, prompt cached, compile
  cached) ~40; tp1xpp4 / tp2xpp2 (4 processes compiling at once, stages sharing the GPU, host-staged hand-offs):
  ~120 (tp2xpp2 + a 16.7 GB reshard ~40).
- bench: 6 runs of 3 s (bf16 load 32.6 GB + LoRA merge, fp8, int8 x 2 clips) ~40 each, metrics ~20: ~270.
All phases ~1,500 s ≈ 25 min of device time, plus the machine's start and each call's wheel install.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python3 benchmarks/product.py` from a checkout
    sys.path.insert(0, str(REPO))

from benchmarks.product_launch import DIT_NAME, Ctx, PhaseFailed, Stop  # noqa: E402
from benchmarks.product_phases import (QUANT_OUT_GB, RunSpec, phase_bench, phase_calib, phase_demo,  # noqa: E402
                                       phase_engine, phase_make, phase_quantize, phase_run, phase_vae)
from benchmarks.product_report import render_report  # noqa: E402
from benchmarks.watch import GB, nvidia_smi  # noqa: E402


def machine_info(ctx: Ctx) -> dict:
    rows = nvidia_smi("name,driver_version,memory.total")
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    return {"gpu": rows[0][0] if rows else "none (CPU)", "driver": rows[0][1] if rows else None,
            "gpu_memory_MiB": rows[0][2] if rows else None, "torch": torch_version,
            "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "tiny": ctx.tiny}


def phase_report(ctx: Ctx) -> dict:
    results = collect(ctx)
    text = render_report(results)
    (ctx.state / "report.md").write_text(text)
    print(text)
    return {"report": str(ctx.state / "report.md"), "phases": sorted(results["phases"])}


def collect(ctx: Ctx) -> dict:
    """Every phase's record, and the machine."""
    if ctx.machine is None:
        ctx.machine = machine_info(ctx)
    phases = {}
    for p in PHASES:
        path = ctx.state / f"{p.name}.json"
        if path.is_file():
            phases[p.name] = json.loads(path.read_text())
    return {"machine": ctx.machine, "phases": phases}


# The phase table and the driver


@dataclass
class Phase:
    name: str
    run: Callable[[Ctx], dict]
    estimate_s: float  # on an H200 at full size
    needs: tuple[str, ...] = ()
    work_gb: float = 0.0  # written under --work (full size)
    shm_gb: float = 0.0
    resumable: bool = False  # starts with less time left than its estimate: a stopped call resumes
    writes: str | None = None  # the folder under --work it fills: once there, the phase needs no new space


PHASES = [  # in order of value; estimates: see "Estimates" in the module docstring
    Phase("make", phase_make, 100, work_gb=13.2, shm_gb=34.0, writes=DIT_NAME),
    Phase("calib", phase_calib, 20, ("make",), work_gb=0.1),
    Phase("quantize-fp8", phase_quantize("fp8"), 240, ("make", "calib"), work_gb=QUANT_OUT_GB["fp8"], resumable=True,
          writes="q-fp8"),
    Phase("run-fp8", phase_run(RunSpec("fp8")), 120, ("quantize-fp8",)),
    Phase("run-fp8-offload-24", phase_run(RunSpec("fp8", kv="fp8", cap_gib=24)), 140, ("quantize-fp8",)),
    Phase("run-tp1xpp4", phase_run(RunSpec("fp8", cap_gib=24, pp=4, gpus="4x24")), 180, ("quantize-fp8",)),
    Phase("run-fp8-warm", phase_run(RunSpec("fp8", seconds=5, warm=True)), 60, ("run-fp8",)),
    Phase("quantize-int8", phase_quantize("int8"), 240, ("make", "calib"), work_gb=QUANT_OUT_GB["int8"],
          resumable=True, writes="q-int8"),
    Phase("run-int8-offload-24", phase_run(RunSpec("int8", kv="fp8", cap_gib=24)), 150, ("quantize-int8",)),
    Phase("quantize-int4", phase_quantize("int4"), 220, ("make", "calib"), work_gb=QUANT_OUT_GB["int4"],
          resumable=True, writes="q-int4"),
    Phase("run-int4-offload-16", phase_run(RunSpec("int4", kv="fp8", cap_gib=16)), 160, ("quantize-int4",)),
    Phase("bench", phase_bench, 400, ("quantize-fp8", "quantize-int8"), resumable=True),
    Phase("run-tp2xpp2", phase_run(RunSpec("fp8", cap_gib=24, tp=2, pp=2, gpus="4x24")), 200, ("quantize-fp8",),
          work_gb=QUANT_OUT_GB["fp8"], writes="q-fp8-tp2"),
    Phase("vae", phase_vae, 60),
    Phase("engine", phase_engine, 500),
    Phase("demo-cuda", phase_demo, 150),
    Phase("report", phase_report, 10),
]
BY_NAME = {p.name: p for p in PHASES}
# The folders a phase writes and the phases that read them: what may go when the disk is short.
ARTIFACTS = {"q-int4": ("run-int4-offload-16",), "q-int8": ("run-int8-offload-24", "bench"),
             "q-fp8": ("run-fp8", "run-fp8-offload-24", "run-tp1xpp4", "run-fp8-warm", "run-tp2xpp2", "bench")}


def done(ctx: Ctx, name: str) -> bool:
    path = ctx.state / f"{name}.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "done"


def ensure_space(ctx: Ctx, phase: Phase, selected: list[str]) -> None:
    """Free space for the phase (folders no remaining phase reads), or Stop with what to do."""
    if ctx.tiny or (phase.writes and (ctx.work / phase.writes).exists()):
        return
    for folder, need_gb in ((ctx.work, phase.work_gb + 1.0), (ctx.shm, phase.shm_gb)):
        if need_gb <= 0:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for artifact, readers in ARTIFACTS.items():
            if shutil.disk_usage(folder).free / GB >= need_gb:
                break
            path = ctx.work / artifact
            if path.exists() and all(done(ctx, r) or r not in selected for r in readers):
                print(f"[product] {folder}: short of space for {phase.name}; removing {path} (no phase left reads it)")
                shutil.rmtree(path)
        free = shutil.disk_usage(folder).free / GB
        if free < need_gb:
            raise Stop(f"{folder}: {free:.1f} GB free, {phase.name} writes ~{need_gb:.1f} GB there; free space "
                       f"(e.g. delete {ctx.work}/q-* folders that are no longer needed) or pass --work/--shm elsewhere")


def run_phase(ctx: Ctx, phase: Phase, selected: list[str]) -> dict:
    missing = [n for n in phase.needs if not done(ctx, n)]
    if missing:
        return {"status": "blocked", "why": f"needs {', '.join(missing)} first"}
    left = ctx.time_left()
    need_s = min(phase.estimate_s, 90) if phase.resumable else phase.estimate_s
    if not ctx.tiny and left < need_s:
        raise Stop(f"{phase.name} needs ~{phase.estimate_s:.0f} s, {left:.0f} s left before --deadline-s")
    ensure_space(ctx, phase, selected)
    ctx.current = phase.name
    t0 = time.monotonic()
    try:
        rec = phase.run(ctx)
    except PhaseFailed as err:
        return {"status": "failed", "error": str(err), **err.record}
    rec.setdefault("status", "done")
    rec["phase_s"] = round(time.monotonic() - t0, 1)
    rec["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    return rec


def export(ctx: Ctx) -> None:
    """results.json (every phase) and report.md into --export (the GPU call's $OUT: few files, no subfolders)."""
    if ctx.args.export is None:
        return
    out = Path(ctx.args.export)
    out.mkdir(parents=True, exist_ok=True)
    results = collect(ctx)
    (out / "product_results.json").write_text(json.dumps(results, indent=1))
    (out / "product_report.md").write_text(render_report(results))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="state, models (not the DiT), quantized folders, runs")
    ap.add_argument("--shm", type=Path, default=None, help="the DiT shards + LoRA (default /dev/shm/lowvram; tiny: "
                                                           "WORK/shm)")
    ap.add_argument("--clips", type=Path, default=None, help="real clips folder with clips.json (tiny: synthetic)")
    ap.add_argument("--phase", action="append", default=None, help="run only this phase (repeat); see --list")
    ap.add_argument("--redo", action="store_true", help="run the selected phases even if done")
    ap.add_argument("--list", action="store_true", help="print the phases, their estimates and state, and exit")
    ap.add_argument("--deadline-s", type=float, default=560, help="stop cleanly before this many seconds")
    ap.add_argument("--export", type=Path, default=None, help="write product_results.json + product_report.md here")
    ap.add_argument("--tiny", action="store_true", help="the demo's tiny model on the CPU: every code path, seconds")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds of video per run (default 20; tiny 1)")
    ap.add_argument("--bench-seconds", type=float, default=None, help="seconds per bench clip (default 3; tiny 1)")
    ap.add_argument("--calib-clips", type=int, default=2, help="clips in the calibration set (last one held out)")
    ap.add_argument("--calib-blocks", type=int, default=1, help="streamed blocks per calibration clip")
    ap.add_argument("--quantize-cap-gib", type=float, default=24, help="VRAM cap of the quantizer")
    ap.add_argument("--no-kv-scratch", dest="kv_scratch", action="store_false",
                    help="keep the calibration KV caches in host RAM (default: on disk when it has room)")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.tiny else 20.0)
    args.bench_seconds = args.bench_seconds or (1.0 if args.tiny else 3.0)
    return args


PREFLIGHT = """
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__}: {err})")
print("\\n".join(missing))
"""
NEEDED = ("lowvram.quantize", "lowvram.calibration", "lowvram.benchmarks.bench", "av", "ftfy", "soxr", "tokenizers",
          "diffusers.models.autoencoders.autoencoder_kl_wan", "transformers.models.umt5.modeling_umt5",
          "transformers.models.wav2vec2.modeling_wav2vec2", "PIL", "safetensors", "typer", "rich")


def preflight() -> None:
    """Exit before any phase when a child could not import what the CLI needs (a call wasted otherwise)."""
    out = subprocess.run([sys.executable, "-c", PREFLIGHT, *NEEDED], capture_output=True, text=True, cwd="/").stdout
    if out.strip():
        sys.exit("error: the lowvram CLI cannot run here; missing: " + "; ".join(out.strip().splitlines()) +
                 "\n  lowvram.*: `python3 -m pip install --no-index --no-deps --no-build-isolation -e .` in the "
                 "checkout; the others: carry their wheels (av, diffusers, ftfy + wcwidth, soxr)")


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    shm = (args.shm or (work / "shm" if args.tiny else Path("/dev/shm/lowvram"))).resolve()
    ctx = Ctx(args, work, shm)
    ctx.state.mkdir(parents=True, exist_ok=True)
    selected = args.phase or [p.name for p in PHASES]
    unknown = [n for n in selected if n not in BY_NAME]
    if unknown:
        sys.exit(f"error: unknown phase {unknown[0]!r}; phases: {', '.join(BY_NAME)}")
    if args.list:
        for p in PHASES:
            print(f"{p.name:22s} ~{p.estimate_s:4.0f} s  {'done' if done(ctx, p.name) else ''}")
        return 0
    preflight()
    signal.signal(signal.SIGTERM, interrupted)  # stop the running child's process group too
    for name in selected:
        if done(ctx, name) and not args.redo and name != "report":
            print(f"[product] {name}: done ({ctx.state / (name + '.json')})")
            continue
        print(f"[product] {name}: starting ({ctx.time_left():.0f} s left)", flush=True)
        try:
            rec = run_phase(ctx, BY_NAME[name], selected)
        except Stop as why:
            print(f"[product] stopped before finishing: {why}", flush=True)
            export(ctx)
            return 0
        (ctx.state / f"{name}.json").write_text(json.dumps(rec, indent=1))
        print(f"[product] {name}: {rec['status']}" + (f" ({rec.get('why') or rec.get('error')})"
                                                      if rec["status"] != "done" else f" in {rec['phase_s']} s"),
              flush=True)
        export(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
