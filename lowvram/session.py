"""Load once, generate many: what `lowvram ui`'s worker process keeps between generations.

A Session runs each job through `lowvram.runtime.run`, the same code as `lowvram run`, passing it one memo dict
for all its runs (`RunOptions.extra["memo"]`). The runtime keeps in it, while the files and inputs they came from
are unchanged: the loaded DiT of a single-process layout (CPU, one GPU, one GPU with offloaded caches), the VAE
decoder warmed up on an image's motion latents, an image's reference and motion latents, and a prompt's umT5
embedding. A multi-GPU layout spawns its ranks per run, so its DiT loads every time (conditioning and the decoder
are still reused).

Per finished block `on_block` gets the progress; `cancelled()` is asked after each block, and a job asked to stop
ends at the next block with its `NAME.partial.mp4` kept playable (the runtime's own interrupt handling).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import InputError, LowvramError, one_of
from lowvram.model.config import UPSTREAM_SEED

# upstream's pipeline names -> the RunOptions that select them; issue 16 adds "single-gpu"
PIPELINES = {"tpp": {"ref_update": True}}
SIZES = ("704*384", "512*512", "384*256", "256*256", "128*128")
MEMO_KINDS = ("dit", "decoder", "image", "prompt")


class Cancelled(LowvramError):
    exit_code = 130


@dataclass
class Job:
    """One generation, as the page and the HTTP API describe it (plain values: it crosses processes)."""

    model_dir: str
    image: str
    audio: str
    prompt: str
    output: str
    ckpt_dir: str | None = None
    size: str = "704*384"
    seconds: float | None = 5.0
    seed: int = UPSTREAM_SEED
    pipeline: str = "tpp"
    kv: str = "bf16"
    device: str = "auto"

    def run_options(self, **extra):
        from lowvram.runtime import RunOptions

        one_of("pipeline", self.pipeline, tuple(PIPELINES))
        if not self.prompt.strip():
            raise InputError("prompt: empty; describe the scene, e.g. \"a person talks warmly to the camera\"")
        return RunOptions(model_dir=Path(self.model_dir), image=Path(self.image), audio=Path(self.audio),
                          prompt=self.prompt, output=Path(self.output),
                          ckpt_dir=Path(self.ckpt_dir) if self.ckpt_dir else None, size=self.size,
                          seconds=self.seconds or None, seed=int(self.seed), device=self.device, kv=self.kv,
                          progress=False, extra=extra, **PIPELINES[self.pipeline])


def check_job(job: Job) -> list[str]:
    """The refusals a run makes before any compute, made at once (so a job waiting in the queue is not refused
    minutes later): the same functions and one-line messages as `lowvram run`. Returns the warnings (silence)."""
    import warnings

    from lowvram.conditioning.audio import check_audio, decode_audio
    from lowvram.conditioning.image import max_area_for_size, read_image, target_size
    from lowvram.plan import check_layout
    from lowvram.runtime import check_options, check_output_path, find_components, pick_device

    opts = job.run_options()
    check_options(opts)
    pick_device(opts)
    comps = find_components(opts)
    check_layout(comps.cfg, opts.tp, opts.pp)
    check_output_path(opts.output)
    img = read_image(opts.image)
    target_size(img.shape[0], img.shape[1], max_area_for_size(opts.size))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_audio(decode_audio(opts.audio), str(opts.audio))
    return [str(w.message) for w in caught]


class Memo(dict):
    """The runtime's memo, recording which entries a run used."""

    def __init__(self):
        super().__init__()
        self.used: set = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


class BlockEvents:
    """The run's progress object (RunOptions.extra["progress"]): called after each block reached the mp4, on the
    decode thread. Raising Cancelled there makes the run stop at its next block and keep what was written."""

    def __init__(self, on_block, cancelled, t0: float):
        self.on_block, self.cancelled, self.t0 = on_block, cancelled, t0
        self.first_block_s: float | None = None

    def __call__(self, done: int, total: int, frames: int) -> None:
        elapsed = time.monotonic() - self.t0
        if self.first_block_s is None:
            self.first_block_s = round(elapsed, 3)
        if self.on_block is not None:
            self.on_block({"done": done, "total": total, "frames": frames, "elapsed_s": round(elapsed, 3)})
        if done < total and self.cancelled():
            raise Cancelled(f"cancelled after block {done} of {total}")

    def close(self) -> None:
        pass


class Session:
    """Runs jobs one after another, keeping what the next one can reuse (see the module's docstring)."""

    def __init__(self):
        self.memo = Memo()

    def generate(self, job: Job, on_block=None, cancelled=lambda: False) -> dict:
        """Run `job`; returns the runtime's summary plus what was reused and the job's start-up figures."""
        from lowvram.runtime import Timeline, run

        t0 = time.monotonic()
        origin = Timeline().origin  # the runtime's marks count from the process start; these from the job's
        events = BlockEvents(on_block, cancelled, t0)
        before = set(self.memo)
        self.memo.used = set()
        opts = job.run_options(memo=self.memo, progress=events)
        if self.holds_cuda_model():  # the resident DiT leaves no room for umT5-XXL (10.8 GiB) on the GPU
            opts.t5_device = "cpu"
        summary = run(opts)
        job_start = t0 - origin
        summary["job_startup_s"] = {k: round(v - job_start, 2) for k, v in summary["startup_s"].items()}
        summary["first_block_s"] = events.first_block_s
        summary["reused"] = sorted({k[0] for k in self.memo.used & before})
        summary["computed"] = sorted({k[0] for k in self.memo.used - before})
        return summary

    def holds_cuda_model(self) -> bool:
        return any(k[0] == "dit" and "'device': 'cuda'" in k[-1] for k in self.memo)

    def release(self) -> None:
        """Drop everything kept (before a bench, whose runs need the GPU's memory)."""
        self.memo.clear()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()






def plan_for_machine(model_dir: str, size: str, kv: str = "bf16", image: str | None = None) -> dict:
    """What `lowvram run` would choose here, with the planner's figures: device, layout, memory, expected fps,
    and when nothing fits, the planner's advice. The shape is the image's at this area budget (else `size`)."""
    import torch

    from lowvram.conditioning.image import max_area_for_size, read_image, target_size
    from lowvram.conditioning.vae import read_vae_config
    from lowvram.plan import (GiB, RunShape, available_ram, cpu_run_bytes, parse_size, plan_layouts, plan_summary,
                              suggestions)
    from lowvram.runtime import RunOptions, find_components

    comps = find_components(RunOptions(model_dir=Path(model_dir), image=Path(), audio=Path(), prompt="",
                                       output=Path()))
    one_of("kv", kv, ("bf16", "fp8"))
    if image:
        img = read_image(image)
        h, w = target_size(img.shape[0], img.shape[1], max_area_for_size(size))
    else:
        h, w = parse_size(size)
    shape = RunShape(h, w, 1 if kv == "fp8" else 2)
    fmt = comps.fmt if comps.fmt in ("fp8", "int8", "int4") else "bf16"
    out = {"model": str(comps.dit), "format": fmt, "size": f"{h}*{w}"}
    if not torch.cuda.is_available():
        need, have = cpu_run_bytes(comps.cfg, shape, fmt, comps.recipe, read_vae_config(comps.vae)), available_ram()
        fits = have is None or need <= have
        return dict(out, device="cpu", layout="tp1xpp1" if fits else None, fits=fits, host_GiB=round(need / GiB, 2),
                    available_GiB=None if have is None else round(have / GiB, 1), fps=None,
                    advice=None if fits else "a smaller size, or a GPU")
    count, total = torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory
    gpus = f"{count}x{int(total / GiB)}"
    name = torch.cuda.get_device_name(0).lower()
    gpu_model = next((m for key, m in (("4090", "rtx4090"), ("3090", "rtx3090"), ("h100", "h100"), ("h200", "h100"))
                      if key in name), "rtx4090")
    best = plan_summary(plan_layouts(comps.cfg, gpus, shape, fmt, comps.recipe, gpu_model=gpu_model))[0]
    out.update(device="cuda", gpus=gpus, gpu_model=gpu_model, fits=best["fits"],
               layout=best["name"] if best["fits"] else None, fps=best["fps"] if best["fits"] else None,
               per_gpu_GiB=[round(m["peak"] / GiB, 1) for m in best["per_gpu_bytes"]])
    if not best["fits"]:
        fixes = suggestions(comps.cfg, gpus, shape, fmt, gpu_model)
        out["advice"] = "; ".join(fixes) or "a smaller size or more GPUs"
    return out
