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
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python3 benchmarks/product.py` from a checkout
    sys.path.insert(0, str(REPO))

from lowvram.quantize.pipeline import GPU_CAP_ENV  # noqa: E402

SHARE_GPU_FLAG = "--share-gpu"
DIT_NAME = "Wan2.2-S2V-14B"
SIZE = "704*384"
GB, GiB = 1e9, 1024**3
STOP_MARGIN_S = 15  # a child is stopped this long before the deadline, so the call itself never runs past it


# ----------------------------------------------------------------------------------------------------------
# Watching a child process tree from outside


def process_tree(root: int) -> list[int]:
    """root and all its descendants (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("rchar", "read_bytes", "wchar", "write_bytes"):
                    out[key] = int(value)
    except OSError:
        pass
    return out


def nvidia_smi(query: str, kind: str = "gpu") -> list[list[str]]:
    """Rows of `nvidia-smi --query-{kind}=QUERY` ([] where there is no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_used_mib() -> int | None:
    rows = nvidia_smi("memory.used")
    return int(rows[0][0]) if rows and rows[0][0].isdigit() else None


class Watch:
    """Polls a process tree until stopped: memory peaks, bytes read, GPU memory, the output file's first bytes."""

    def __init__(self, pid: int, output: Path | None = None, interval_s: float = 0.25, gpu_every_s: float = 0.5):
        self.pid, self.output, self.interval_s, self.gpu_every_s = pid, output, interval_s, gpu_every_s
        self.t0 = time.monotonic()
        self.tree_rss = self.tree_anon = 0
        self.hwm: dict[int, int] = {}
        self.io: dict[int, dict[str, int]] = {}
        self.gpu_per_pid: dict[int, int] = {}
        self.gpu_other_pids: dict[int, int] = {}
        self.gpu_baseline = gpu_used_mib()
        self.gpu_peak: int | None = None
        self.first_output_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last_gpu = 0.0
        while not self._stop.is_set():
            self._poll_host()
            if self.gpu_baseline is not None and time.monotonic() - last_gpu >= self.gpu_every_s:
                last_gpu = time.monotonic()
                self._poll_gpu()
            if self.output is not None and self.first_output_s is None and self.output.is_file() \
                    and self.output.stat().st_size > 0:
                self.first_output_s = round(time.monotonic() - self.t0, 2)
            self._stop.wait(self.interval_s)

    def _poll_host(self) -> None:
        rss = anon = 0
        for pid in process_tree(self.pid):
            mem = proc_memory(pid)
            rss += mem.get("VmRSS", 0)
            anon += mem.get("RssAnon", 0)
            self.hwm[pid] = max(self.hwm.get(pid, 0), mem.get("VmHWM", 0))
            io = proc_io(pid)
            if io:
                self.io[pid] = io
        self.tree_rss, self.tree_anon = max(self.tree_rss, rss), max(self.tree_anon, anon)

    def _poll_gpu(self) -> None:
        used = gpu_used_mib()
        if used is not None:
            self.gpu_peak = max(self.gpu_peak or 0, used)
        tree = set(self.hwm)
        for row in nvidia_smi("pid,used_memory", "compute-apps"):
            if len(row) == 2 and row[0].isdigit() and row[1].isdigit():
                bucket = self.gpu_per_pid if int(row[0]) in tree else self.gpu_other_pids
                bucket[int(row[0])] = max(bucket.get(int(row[0]), 0), int(row[1]))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        rec = {"host_peak_tree_GiB": round(self.tree_rss / GiB, 2),
               "host_peak_tree_anon_GiB": round(self.tree_anon / GiB, 2),
               "host_peak_process_GiB": round(max(self.hwm.values(), default=0) / GiB, 2),
               "processes": len(self.hwm),
               "read_GB": round(sum(io.get("rchar", 0) for io in self.io.values()) / GB, 2),
               "read_from_storage_GB": round(sum(io.get("read_bytes", 0) for io in self.io.values()) / GB, 2)}
        if self.gpu_baseline is not None:
            rec["gpu_peak_above_baseline_GiB"] = round(((self.gpu_peak or 0) - self.gpu_baseline) / 1024, 2)
            rec["gpu_peak_per_process_GiB"] = sorted((round(v / 1024, 2) for v in self.gpu_per_pid.values()),
                                                     reverse=True)
            if not self.gpu_per_pid and self.gpu_other_pids:  # a pid namespace nvidia-smi does not share
                rec["gpu_peak_per_process_GiB_unmatched_pids"] = sorted(
                    (round(v / 1024, 2) for v in self.gpu_other_pids.values()), reverse=True)
        if self.output is not None:
            rec["first_output_bytes_s"] = self.first_output_s
        return rec


# ----------------------------------------------------------------------------------------------------------
# Phases: context, children, records


class PhaseFailed(Exception):
    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record or {}


class Stop(Exception):
    """Not enough time or disk left for the next phase: end the call cleanly."""


@dataclass
class Ctx:
    args: argparse.Namespace
    work: Path
    shm: Path
    t_start: float = field(default_factory=time.monotonic)
    current: str = ""  # the phase running now
    machine: dict | None = None  # GPU, driver, torch, date: read once

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    @property
    def device(self) -> str:
        return self.args.device or ("cpu" if self.tiny else "cuda")

    @property
    def size(self) -> str:
        return "64*64" if self.tiny else SIZE

    @property
    def models(self) -> Path:  # umT5 + tokenizer, VAE, wav2vec2
        return self.work / DIT_NAME

    @property
    def dit(self) -> Path:  # shards, index, config, LoRA, links to the rest
        return self.shm / DIT_NAME

    @property
    def state(self) -> Path:
        return self.work / "state"

    @property
    def clips(self) -> Path:
        return self.work / "clips"

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    def q(self, fmt: str) -> Path:
        return self.work / f"q-{fmt}"

    def time_left(self) -> float:
        return self.args.deadline_s - (time.monotonic() - self.t_start)


def lowvram(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowvram.cli", *args]


def shown(argv: list[str], env: dict[str, str]) -> str:
    """The command as a user types it: `VAR=value lowvram ...`."""
    words = ["lowvram", *argv[3:]] if argv[1:3] == ["-m", "lowvram.cli"] else \
        ["python3", *[str(Path(a).relative_to(REPO)) if a.startswith(str(REPO)) else a for a in argv[1:]]]
    return " ".join([f"{k}={v}" for k, v in env.items()] + [shlex.quote(w) for w in words])


def launch(ctx: Ctx, name: str, argv: list[str], env: dict[str, str] | None = None, output: Path | None = None
           ) -> tuple[dict, str]:
    """Run one command in its own process group, watched; (its record, its stdout). Stopped near the deadline."""
    env = env or {}
    logs = ctx.state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    limit = ctx.time_left() - STOP_MARGIN_S
    if limit <= 0:
        raise Stop(f"no time left to start {name}")
    t0 = time.monotonic()
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=full_env, cwd=ctx.work, preexec_fn=os.setpgrp)
        watch = Watch(proc.pid, output)
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
        except BaseException:
            stop_group(proc)
            raise
        finally:
            watched = watch.stop()
    rec = {"command": shown(argv, env), "rc": proc.returncode, "wall_s": round(time.monotonic() - t0, 2),
           "timed_out": timed_out, **watched}
    stdout = (logs / f"{name}.out").read_text(errors="replace")
    if proc.returncode != 0:
        rec["stderr_tail"] = (logs / f"{name}.err").read_text(errors="replace")[-3000:]
        if timed_out:
            raise Stop(f"{name}: stopped at the deadline after {rec['wall_s']} s (run again to resume)")
        raise PhaseFailed(f"{name}: exit {proc.returncode}: {rec['stderr_tail'].strip().splitlines()[-1:]}", rec)
    return rec, stdout


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (it started it), then SIGKILL whatever is left after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise PhaseFailed("no JSON summary on stdout")


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


def _num(v, digits: int = 2) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def render_report(results: dict) -> str:
    m = results.get("machine", {})
    ph = results["phases"]
    lines = [f"## The product at full size on one GPU (`benchmarks/product.py`)", "",
             f"{m.get('gpu')} (driver {m.get('driver')}, {m.get('gpu_memory_MiB')} MiB), torch {m.get('torch')}, "
             f"{m.get('date')}" + (" — TINY model on the CPU (code-path check, not a measurement)" if m.get("tiny")
                                   else "") + ". Random weights at the real shapes. Every command below ran as its "
             "own process; host RSS = peak over the process tree (all pages / anonymous only), GPU = nvidia-smi "
             "(per process, and the card's total above its idle use).", ""]
    lines += ["| phase | wall s | host RSS GiB (tree / anon / one process) | GPU GiB (per process; card) | result |",
              "|---|---|---|---|---|"]
    for name, r in ph.items():
        if name == "report":
            continue
        if r.get("status") != "done":
            lines.append(f"| {name} | – | – | – | {r.get('status')}: {r.get('why') or r.get('error', '')} |")
            continue
        gpu = ", ".join(_num(x) for x in r.get("gpu_peak_per_process_GiB", [])) or "–"
        lines.append(f"| {name} | {_num(r.get('wall_s'), 1)} | {_num(r.get('host_peak_tree_GiB'))} / "
                     f"{_num(r.get('host_peak_tree_anon_GiB'))} / {_num(r.get('host_peak_process_GiB'))} | {gpu}; "
                     f"{_num(r.get('gpu_peak_above_baseline_GiB'))} | {phase_summary(name, r)} |")
    runs = {n: r for n, r in ph.items() if n.startswith("run-") and r.get("status") == "done"}
    if runs:
        lines += ["", "| run | layout | first frame s (in run / from launch) | steady s/block | steady fps | "
                      "planned peak GiB (per GPU) | rank peaks GiB (reserved) | mp4 | caches |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, r in runs.items():
            plan = r.get("planned", {})
            ranks = ", ".join(_num(v.get("gpu_reserved_GiB")) for v in r.get("ranks", {}).values()) or "–"
            v = r.get("video", {})
            lines.append(f"| {n} | {r['layout']} | {_num(r['time_to_first_frame_s'], 1)} / "
                         f"{_num(r.get('first_output_bytes_s'), 1)} | {_num(r['steady_s_per_block'], 3)} | "
                         f"{_num(r['steady_fps'])} | {_num(plan.get('peak_GiB'))} "
                         f"({', '.join(_num(x) for x in plan.get('per_gpu_peak_GiB', []))}) | {ranks} | "
                         f"{v.get('video_codec')}+{v.get('audio_codec')} {v.get('frames')} frames "
                         f"{'ok' if v.get('ok') else 'BAD'} | compile {r['compile_cache']}, prompt "
                         f"{r['prompt_cache']} |")
    if "bench" in ph and ph["bench"].get("status") == "done":
        lines += ["", "| bench config | layout | first frame s | s/block | fps | GPU reserved GiB | host GiB | "
                      "PSNR dB | SSIM | latent rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in ph["bench"]["rows"]:
            lines.append("| " + " | ".join(_num(row.get(k)) for k in (
                "config", "layout", "ttff_s", "s_per_block", "fps", "gpu_reserved_gib", "host_ram_gib", "psnr_db",
                "ssim", "latent_rel_err")) + " |")
    lines += ["", "Commands:", ""]
    for name, r in ph.items():
        for step in ("reshard", None, "inspect"):  # in the order they ran
            rec = r.get(step) if step else r
            if isinstance(rec, dict) and rec.get("command"):
                lines.append(f"- {name}{' (' + step + ')' if step else ''}: `{rec['command']}`")
    return "\n".join(lines) + "\n"


def phase_summary(name: str, r: dict) -> str:
    if name == "make":
        return f"{r['written_GB']} GB in {r['write_s']} s; inspect complete={r['inspect']['complete']}"
    if name == "calib":
        return f"{len(r['clips'])} clips; speech {r['speech']['seconds']} s from {', '.join(r['speech']['from'])}"
    if name.startswith("quantize"):
        c = r["calibration"]
        return (f"{r['folder_GB']} GB folder; calibration {c['seconds']:.0f} s ({c['read_GB']} GB read, RSS "
                f"{c['peak_rss_GiB']} GiB, VRAM {c['peak_vram_GiB']} GiB, KV on disk {c['kv_on_disk']}); "
                f"e2e err {_num(r['end_to_end_rel_err'], 4)}")
    if name.startswith("run-"):
        return f"{r['frames']} frames, {_num(r['steady_fps'])} fps steady"
    if name == "bench":
        return f"report renders: {r['renders']}"
    if name == "vae":
        return "; ".join(f"{x['dtype']} cudnn.benchmark={x['cudnn_benchmark']}: {x['steady_ms_per_block']} ms/block, "
                         f"+{x['peak_above_weights_GiB']} GiB" for x in r["rows"])
    if name == "engine":
        return "; ".join(f"{k}: {v['steady_s_per_block']} s/block, {v['fps']} fps, peak {v['peak_reserved_GiB']} GiB"
                         for k, v in r["runs"].items())
    if name == "demo-cuda":
        return "passed"
    return ""


# ----------------------------------------------------------------------------------------------------------
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
