"""Running one configuration on one clip, each in its own process so that its peak host RAM and GPU memory are
its own: ``python -m lowvram.benchmarks.runs --child JOB.json`` writes the run's video, latents and run.json.

A run lands in ``REPORT/runs/<label>/<clip>/`` (video.mp4, latents.safetensors, run.json, log.txt); one whose
run.json matches the job (model, options, clip files, size, seconds, seed, device) is reused.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lowvram.benchmarks.configs import BenchClip, Config
from lowvram.manifest import MANIFEST

GIB = 1024**3


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
        proc = subprocess.run([sys.executable, "-m", "lowvram.benchmarks.runs", "--child", str(job_path)],
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
    from lowvram.host_memory import peak_rss_bytes

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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--child":
        return child_main(Path(argv[1]))
    print("usage: python -m lowvram.benchmarks.runs --child JOB.json (one run of `lowvram bench`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
