"""Where a run's ranks go: the Layout `plan` chose (or the one --tp/--pp fix), the GPUs it lands on, each
rank's allocator cap, and which device decodes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowvram.errors import DoesNotFitError, InputError
from lowvram.plan import Layout

if TYPE_CHECKING:
    from lowvram.runtime import Components, RunOptions


def check_gpu_supports(comps: Components) -> None:
    """fp8 needs fp8 tensor cores (sm_89+: RTX 40xx, L4/L40, H100); elsewhere it would only be emulated."""
    uses_fp8 = comps.fmt == "fp8" or any(f == "fp8" for f in (comps.recipe or {}).values())
    if not uses_fp8:
        return
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(i)
            raise InputError(f"{comps.dit} is fp8, but GPU {i} ({name}, sm_{major}{minor}) has no fp8 tensor cores; "
                             f"quantize with --format int8 (fast on Ampere) or int4 instead")


def choose_layout(opts: RunOptions, comps: Components, device: str, latent_hw) -> tuple[Layout, Placement | None]:
    """The layout every rank runs (the user's override, or the planner's fastest that fits; refused before
    anything loads) and where its ranks go on the GPUs (None on the CPU)."""
    from lowvram.plan import GiB, RunShape, fixed_layout, parse_gpus, plan_layouts

    shape = RunShape(latent_hw[0] * 8, latent_hw[1] * 8, 1 if opts.kv == "fp8" else 2)
    fmt = comps.fmt if comps.fmt in ("fp8", "int8", "int4") else "bf16"
    if device == "cpu":
        from lowvram.conditioning.vae import read_vae_config
        from lowvram.plan import check_cpu_run_fits

        check_cpu_run_fits(comps.cfg, shape, fmt, comps.recipe, read_vae_config(comps.vae),
                           what=f"--size {opts.size} ({shape.height}*{shape.width} for this image)")
        mode = "offload" if opts.extra.get("kv_offload") else "resident"
        return fixed_layout(comps.cfg, opts.tp or 1, opts.pp or 1, fmt, comps.recipe, mode), None
    check_gpu_supports(comps)
    visible = torch.cuda.device_count()
    total = torch.cuda.get_device_properties(0).total_memory
    override = bool(opts.tp or opts.pp)
    world = (opts.tp or 1) * (opts.pp or 1) if override else visible
    gpus = opts.gpus or default_gpus(visible, total, world, opts.share_gpu)
    count, capacity = parse_gpus(gpus)
    if override and world != count:  # an override is planned on its own number of GPUs of that size
        gpus = f"{world}x{capacity / GiB:g}"
    layouts = plan_layouts(comps.cfg, gpus, shape, fmt, comps.recipe, t5_quantization=opts.t5_quantization)
    if override:
        tp, pp = opts.tp or 1, opts.pp or 1
        match = [l for l in layouts if (l.tp, l.pp) == (tp, pp)]
        fitting = [l for l in match if l.fits]
        if match and not fitting:
            raise DoesNotFitError(f"tp {tp} x pp {pp} needs {match[0].peak_bytes / 1024**3:.1f} GiB per GPU, "
                                  f"more than {gpus}; run `lowvram plan` for a layout that fits")
        layout = fitting[0] if fitting else fixed_layout(comps.cfg, tp, pp, fmt, comps.recipe)
    else:
        layout = next((l for l in layouts if l.fits), None)
        if layout is None:
            raise DoesNotFitError(f"no layout fits {gpus} GiB at {opts.size}; run `lowvram plan {comps.dit} "
                                  f"--gpus {gpus}` to see what would (fp8 KV, int4, a smaller size, more GPUs)")
    placement = place_on_gpus(opts, f"tp{layout.tp}xpp{layout.pp}", layout.tp * layout.pp, visible, total,
                              capacity, layout)
    return layout, placement


def decode_device(device: str, layout: Layout, placement: Placement | None) -> str:
    """Where the launcher's VAE decoder runs: on the GPU of the layout's `vae_rank`."""
    return "cpu" if device == "cpu" else f"cuda:{placement.gpus[layout.vae_rank] if placement else 0}"


def default_gpus(visible: int, total: int, world: int, share: bool) -> str:
    """What to plan for without --gpus: the visible GPUs; with --share-gpu and more ranks than GPUs, `world`
    GPUs of an equal share of one (two ranks on an 80 GiB card: 2x40)."""
    from lowvram.plan import GiB

    if share and world > visible:
        return f"{world}x{int(total / GiB / math.ceil(world / visible))}"
    return f"{visible}x{int(total / GiB)}"


def count_x(count: int, size_bytes: float) -> str:
    from lowvram.plan import GiB

    return f"{count}x{int(size_bytes / GiB)}"


@dataclass
class Placement:
    """Where the ranks run: the visible GPU of each, its allocator cap (bytes, None = the whole GPU), the backend;
    the size of GPU planned for (bytes) and the launcher's cap (conditioning, the VAE decoder)."""

    gpus: list[int]
    caps: list[int | None]
    backend: str
    capacity: float
    launcher_cap: int | None = None

    def summary(self) -> dict:
        gib = lambda b: None if b is None else round(b / 1024**3, 2)
        return {"gpus": self.gpus, "backend": self.backend, "caps_GiB": [gib(c) for c in self.caps],
                "launcher_cap_GiB": gib(self.launcher_cap)}


def place_on_gpus(opts: RunOptions, name: str, world: int, visible: int, total: int, capacity: float,
                  layout: Layout) -> Placement:
    """Ranks on the visible GPUs. More ranks than GPUs only with --share-gpu (refused before anything loads
    otherwise); ranks are capped to the planned GPU size when emulating one (--gpus or --share-gpu)."""
    from lowvram.parallel.launch import place_ranks
    from lowvram.plan import CUDA_CONTEXT, GiB, allocator_caps, parse_gpus

    gpus, backend = place_ranks(world, visible)
    if world > visible and not opts.share_gpu:
        size = parse_gpus(opts.gpus or default_gpus(visible, total, world, True))[1] / GiB
        here = "1 is visible" if visible == 1 else f"{visible} are visible"
        alt = (f"--gpus {visible}x{int(total / GiB)} to plan for what is here" if opts.gpus
               else f"fewer ranks (--tp x --pp <= {visible})")
        raise InputError(f"{name} needs {world} GPUs but {here}; pass --share-gpu to run the {world} ranks on "
                         f"{'it' if visible == 1 else 'them'}, each capped at {size:g} GiB, or {alt}")
    per_gpu = max(gpus.count(g) for g in set(gpus))
    if per_gpu * capacity > total * 1.02:  # "24 GB" cards report 23.99 GiB
        size = f"{capacity / GiB:g} GiB"
        ranks = f"{per_gpu} ranks of {size} do" if per_gpu > 1 else f"a {size} rank does"
        raise DoesNotFitError(f"--gpus {count_x(world, capacity)}: {ranks} not fit GPU 0 ({total / GiB:.1f} GiB); "
                              f"plan for what is here (--gpus {count_x(world, total / per_gpu)}) or make more GPUs "
                              f"visible")
    if opts.gpus is None and world <= visible:  # the real GPUs: nothing to emulate
        return Placement(gpus, [None] * world, backend, capacity)
    caps = allocator_caps(layout, capacity) if layout.planned else [int(capacity - CUDA_CONTEXT)] * world
    return Placement(gpus, caps, backend, capacity, launcher_cap=int(capacity - CUDA_CONTEXT))
