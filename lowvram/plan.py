"""Memory and traffic model of a run: what each GPU holds under a (tp, pp) layout, and whether it fits.

Used by `lowvram plan` and by `lowvram run` before anything is loaded. Everything is computed from shapes
(a meta-device model) and the per-layer format, so it answers in about a second for the 14B model.

Per GPU: weights slice + the 4 timestep-forced KV caches of its layers (its heads under TP) + the shared
conditioning cache and text K/V + transient activations + CUDA context; the VAE decoder sits on the least
loaded GPU (in the launcher process, with its own CUDA context, when the DiT runs on worker processes). GPU 0
first hosts the conditioning phase (umT5 where it fits, the VAE encode), freed before the DiT loads. The VAE and
umT5 figures come from `vae_memory_bytes` / `t5_memory_bytes`, next to their loaders. Pipeline stages over layers
are fed a wavefront of independent (block, step) items, so all stages stay busy and throughput scales with the
stage count; tensor parallelism adds all-reduces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from lowvram.errors import CheckpointError, DoesNotFitError, InputError, one_of
from lowvram.kernels.linear import FORMATS, KEEP_BF16, weight_bytes
from lowvram.manifest import MANIFEST, verify_folder
from lowvram.model.config import DiTConfig

GiB = 1024 ** 3
CUDA_CONTEXT = int(0.6 * GiB)  # context + cuBLAS/cuDNN workspaces, measured ~0.5-0.7 GiB on Ada/Hopper
FRAGMENTATION = 1.05  # caching-allocator slack on top of the live peak
STEPS_IN_FLIGHT = 4

# Dense tensor throughput per GPU model (TFLOP/s) and an efficiency factor for a real forward.
GPU_MODELS = {
    "rtx4090": {"bf16": 165, "fp8": 330, "int8": 330, "int4": 165, "fp8_ok": True, "pcie_GBps": 20},
    "rtx3090": {"bf16": 71, "fp8": 0, "int8": 142, "int4": 71, "fp8_ok": False, "pcie_GBps": 12},
    "h100": {"bf16": 790, "fp8": 1580, "int8": 1580, "int4": 790, "fp8_ok": True, "pcie_GBps": 50, "nvlink_GBps": 300},
}
EFFICIENCY = 0.45
LINKS = ("pcie", "nvlink")
KV_DTYPES = ("bf16", "fp8")
TP_SIZES = (1, 2, 4, 8)  # tensor-parallel sizes the planner considers (within one node)


@dataclass
class RunShape:
    height: int = 704
    width: int = 384
    kv_bytes: int = 2  # bf16; 1 with --kv fp8

    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8


@dataclass
class Layout:
    """How a run is laid out: chosen once (by `plan`, or for a CPU / torchrun run by `fixed_layout`) and handed
    to every rank as it is."""

    tp: int
    pp: int
    stages: list[list[int]]  # the layers of each pipeline stage
    per_gpu_bytes: list[dict] = field(default_factory=list)  # empty: not planned (see `planned`)
    peak_bytes: int = 0
    fits: bool = False
    comm_bytes_per_block: int = 0
    seconds_per_block: float = 0.0
    mode: str = "resident"  # or "offload": other steps' caches in host RAM (one GPU)
    host_bytes: int = 0
    vae_rank: int = 0  # the rank whose GPU also holds the VAE decoder

    @property
    def name(self) -> str:
        return f"tp{self.tp}xpp{self.pp}" + ("-offload" if self.mode == "offload" else "")

    @property
    def offload(self) -> bool:
        return self.mode == "offload"

    @property
    def planned(self) -> bool:
        """Whether the memory model was run for it (what each GPU holds is known)."""
        return bool(self.per_gpu_bytes)


def parse_gpus(spec: str) -> tuple[int, float]:
    """'4x24' -> (4, 24 GiB) ; '1x80' -> (1, 80 GiB)."""
    try:
        count, size = spec.lower().split("x")
        count, gib = int(count), float(size)
    except ValueError:
        raise InputError(f"--gpus {spec!r} is not COUNTxGiB; use e.g. 4x24 or 1x80") from None
    if count < 1 or not 0 < gib < math.inf:
        raise InputError(f"--gpus {spec}: needs at least one GPU with a positive memory size; use e.g. 4x24 or 1x80")
    return count, gib * GiB


def tp_sizes(cfg: DiTConfig) -> list[int]:
    """Tensor-parallel sizes the model splits into: divisors of both the head count and the FFN width."""
    return [t for t in range(1, cfg.num_heads + 1) if cfg.num_heads % t == 0 and cfg.ffn_dim % t == 0]


def check_tp_size(cfg: DiTConfig, tp: int) -> None:
    if tp < 1:
        raise InputError(f"--tp {tp}: must be at least 1 (1 = no tensor parallelism)")
    if tp not in tp_sizes(cfg):
        raise InputError(f"--tp {tp}: the model's {cfg.num_heads} heads and FFN width {cfg.ffn_dim} split only into "
                         f"tp {', '.join(map(str, tp_sizes(cfg)))}; use one of those")


def layout_shapes(cfg: DiTConfig, count: int) -> list[tuple[int, int]]:
    """(tp, pp) with tp x pp = count GPUs that the planner considers for this model."""
    return [(tp, count // tp) for tp in TP_SIZES
            if tp in tp_sizes(cfg) and count % tp == 0 and count // tp <= cfg.num_layers]


def check_gpus(cfg: DiTConfig, spec: str) -> tuple[int, float]:
    """--gpus parsed (count, bytes per GPU), refused when no tp x pp layout of this model uses that many GPUs."""
    count, capacity = parse_gpus(spec)
    if not layout_shapes(cfg, count):
        splits = [t for t in TP_SIZES if t in tp_sizes(cfg)]
        raise InputError(f"--gpus {spec}: this model cannot be laid out on {count} GPUs (tp {'/'.join(map(str, splits))}"
                         f" x pp of at most {cfg.num_layers} layers); use a count tp x pp makes, at most "
                         f"{max(splits) * cfg.num_layers}")
    return count, capacity


def check_layout(cfg: DiTConfig, tp: int | None, pp: int | None) -> None:
    """A user's --tp / --pp override: InputError unless the model can be laid out that way (None = plan's choice)."""
    if tp is not None:
        check_tp_size(cfg, tp)
    if pp is not None and not 1 <= pp <= cfg.num_layers:
        raise InputError(f"--pp {pp}: pipeline stages must be between 1 and the model's {cfg.num_layers} layers")


def parse_size(spec: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in spec.replace("x", "*").split("*"))
    except ValueError:
        raise InputError(f"--size {spec!r} is not H*W; use e.g. 704*384") from None
    if h % 64 or w % 64 or h <= 0 or w <= 0:
        raise InputError(f"--size {spec}: height and width must be positive multiples of 64 (e.g. 704*384)")
    return h, w


def layer_param_bytes(cfg: DiTConfig, recipe: dict[str, str] | None, default_fmt: str) -> tuple[dict[int, int], dict[str, int]]:
    """Bytes of each transformer layer (with its audio injector) and of the non-block groups at the formats."""
    from lowvram.identify import build_meta_model

    model = build_meta_model(cfg)  # no init on meta tensors (a meta normal_ imports dynamo: ~1 s)
    per_layer = {i: 0 for i in range(cfg.num_layers)}
    inject_layer = dict(enumerate(cfg.audio_inject_layers))
    groups: dict[str, int] = {}
    linear_weights = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            fmt = (recipe or {}).get(name) or ("bf16" if any(k in name for k in KEEP_BF16) else default_fmt)
            nbytes = weight_bytes(mod.out_features, mod.in_features, fmt)
            linear_weights.add(name + ".weight")
            add_bytes(name, nbytes, per_layer, inject_layer, groups)
    for name, p in model.named_parameters():
        if name not in linear_weights:
            add_bytes(name.rsplit(".", 1)[0] if "." in name else name, p.numel() * 2, per_layer, inject_layer, groups)
    return per_layer, groups


def add_bytes(name: str, nbytes: int, per_layer, inject_layer, groups) -> None:
    parts = name.split(".")
    if parts[0] == "blocks":
        per_layer[int(parts[1])] += nbytes
    elif parts[0] == "audio_injector":
        per_layer[inject_layer[int(parts[2])]] += nbytes
    else:
        groups[parts[0]] = groups.get(parts[0], 0) + nbytes


def split_layers(per_layer: dict[int, int], pp: int) -> list[list[int]]:
    """Contiguous stages with balanced bytes (greedy on the cumulative sum)."""
    ids = sorted(per_layer)
    total = sum(per_layer.values())
    stages, current, acc = [], [], 0
    for i in ids:
        current.append(i)
        acc += per_layer[i]
        if len(stages) < pp - 1 and acc >= total * (len(stages) + 1) / pp and len(ids) - ids.index(i) - 1 >= pp - len(stages) - 1:
            stages.append(current)
            current = []
    stages.append(current)
    return [s for s in stages if s] if len(stages) == pp else [ids[k::pp] for k in range(pp)]


def fixed_layout(cfg: DiTConfig, tp: int, pp: int, fmt: str = "bf16", recipe: dict | None = None,
                 mode: str = "resident") -> Layout:
    """A tp x pp layout with the planner's stage split but no memory model: CPU runs, torchrun, and overrides of
    a shape the planner does not consider."""
    per_layer, _ = layer_param_bytes(cfg, recipe, fmt)
    return Layout(tp=tp, pp=pp, stages=split_layers(per_layer, pp), mode=mode)


def stage_memory(cfg: DiTConfig, shape: RunShape, layers: list[int], tp: int, per_layer: dict[int, int],
                 groups: dict[str, int], first: bool, last: bool, steps_resident: int) -> dict:
    h, w = shape.latent_hw()
    fsl = (h // 2) * (w // 2)
    block_tokens = cfg.frames_per_block * fsl
    capacity = cfg.blocks_per_clip * block_tokens
    cond_tokens = fsl + fsl + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
    width = cfg.dim // tp
    n = len(layers)
    weights = sum(per_layer[i] for i in layers) / tp
    if first:
        weights += sum(v for k, v in groups.items() if k != "head")
    if last:
        weights += groups.get("head", 0)
    kv = steps_resident * n * capacity * width * 2 * shape.kv_bytes
    cond = n * cond_tokens * width * 2 * shape.kv_bytes + n * cfg.text_len * width * 2 * 2
    keys = capacity + cond_tokens
    act = (keys * width * 2 * 2  # concatenated K and V of one layer (bf16)
           + block_tokens * cfg.dim * 4 * 3  # fp32 residual, its normalised copy, attention output
           + block_tokens * cfg.ffn_dim // tp * 2 * 2  # FFN hidden (bf16) and its GELU
           + cond_tokens * width * 4)  # re-roped conditioning keys (fp32 math)
    return {"weights": int(weights), "kv_cache": int(kv), "cond_cache": int(cond), "activations": int(act),
            "cuda_context": int(CUDA_CONTEXT)}


def forward_flops(cfg: DiTConfig, shape: RunShape) -> float:
    h, w = shape.latent_hw()
    fsl = (h // 2) * (w // 2)
    q = cfg.frames_per_block * fsl
    keys = cfg.blocks_per_clip * q + fsl * 2 + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = 2 * q * (6 * d * d + 2 * d * f) + 4 * q * keys * d + 4 * q * cfg.text_len * d
    inject = 4 * q * d * d + 20 * q * d
    return cfg.num_layers * per_layer + len(cfg.audio_inject_layers) * inject


def plan_layouts(cfg: DiTConfig, gpus: str, shape: RunShape, fmt: str = "int8", recipe: dict | None = None,
                 link: str = "pcie", gpu_model: str = "rtx4090", host_ram: float | None = None,
                 t5_quantization: str | None = None) -> list[Layout]:
    count, capacity = check_gpus(cfg, gpus)
    per_layer, groups = layer_param_bytes(cfg, recipe, fmt)
    spec = GPU_MODELS[gpu_model]
    h, w = shape.latent_hw()
    block_act = cfg.frames_per_block * (h // 2) * (w // 2) * cfg.dim * 2
    flops_block = STEPS_IN_FLIGHT * forward_flops(cfg, shape)
    layouts = []
    for tp, pp in layout_shapes(cfg, count):
        stages = split_layers(per_layer, pp)
        lay = Layout(tp=tp, pp=pp, stages=stages)
        for s, layers in enumerate(stages):
            mem = stage_memory(cfg, shape, layers, tp, per_layer, groups, s == 0, s == pp - 1, STEPS_IN_FLIGHT)
            lay.per_gpu_bytes.extend([dict(mem, stage=s, layers=f"{layers[0]}-{layers[-1]}") for _ in range(tp)])
        add_vae_and_totals(lay, capacity, shape, t5_quantization)
        allreduces = cfg.num_layers * 3 + len(cfg.audio_inject_layers)
        tp_bytes = 0 if tp == 1 else STEPS_IN_FLIGHT * allreduces * 2 * (tp - 1) / tp * block_act
        pp_bytes = STEPS_IN_FLIGHT * (pp - 1) * block_act
        lay.comm_bytes_per_block = int(tp_bytes + pp_bytes)
        bw = spec.get("nvlink_GBps", spec["pcie_GBps"]) if link == "nvlink" else spec["pcie_GBps"]
        compute = flops_block / (count * spec[fmt if spec.get(fmt) else "bf16"] * 1e12 * EFFICIENCY)
        lay.seconds_per_block = compute + tp_bytes / (bw * 1e9) + (pp_bytes / pp) / (bw * 1e9)
        layouts.append(lay)
    if count == 1:
        layouts.append(offload_layout(cfg, shape, per_layer, groups, capacity, spec, fmt, flops_block,
                                      t5_quantization))
    layouts.sort(key=lambda l: (not l.fits, l.seconds_per_block))
    return layouts


def vae_decode_bytes(shape: RunShape) -> int:
    """The streaming VAE decoder on its GPU during the DiT phase (weights + caches + one latent's transient)."""
    from lowvram.conditioning.vae import runtime_dtype, vae_memory_bytes

    return int(vae_memory_bytes(shape.height, shape.width, dtype=runtime_dtype("cuda"))["decode_peak"])


def t5_on_gpu(capacity: float, quantization: str | None = None) -> bool:
    """umT5-XXL runs on the GPU when its peak (bf16: 10.8 GiB) fits the card next to a CUDA context."""
    from lowvram.conditioning.t5_memory import t5_memory_bytes

    return (t5_memory_bytes(quantization=quantization)["peak"] + CUDA_CONTEXT) * FRAGMENTATION <= capacity


def conditioning_memory(shape: RunShape, capacity: float, t5_quantization: str | None = None) -> dict:
    """GPU 0 before the DiT loads: umT5 (where it fits), then the VAE encode, one at a time, each freed."""
    from lowvram.conditioning.t5_memory import t5_memory_bytes
    from lowvram.conditioning.vae import runtime_dtype, vae_memory_bytes

    t5 = int(t5_memory_bytes(quantization=t5_quantization)["peak"])
    vae = int(vae_memory_bytes(shape.height, shape.width, dtype=runtime_dtype("cuda"))["encode_peak"])
    on_gpu = t5_on_gpu(capacity, t5_quantization)
    peak = int((max(t5 if on_gpu else 0, vae) + CUDA_CONTEXT) * FRAGMENTATION)
    return {"t5_device": "cuda" if on_gpu else "cpu", "t5": t5, "vae_encode": vae, "peak": peak}


PHASE_KEYS = ("stage", "peak", "conditioning")  # not summed into the DiT phase


def add_vae_and_totals(lay: Layout, capacity: float, shape: RunShape, t5_quantization: str | None = None) -> None:
    totals = [sum(v for k, v in m.items() if isinstance(v, int) and k not in PHASE_KEYS) for m in lay.per_gpu_bytes]
    lay.vae_rank = least = min(range(len(totals)), key=totals.__getitem__)
    lay.per_gpu_bytes[least]["vae_decode"] = vae_decode_bytes(shape)
    if len(lay.per_gpu_bytes) > 1:  # the DiT runs on worker processes; the VAE in the launcher
        lay.per_gpu_bytes[least]["launcher_context"] = int(CUDA_CONTEXT)
    lay.per_gpu_bytes[0]["conditioning"] = conditioning_memory(shape, capacity, t5_quantization)["peak"]
    for m in lay.per_gpu_bytes:
        dit_phase = int(sum(v for k, v in m.items() if isinstance(v, int) and k not in PHASE_KEYS) * FRAGMENTATION)
        m["peak"] = max(dit_phase, m.get("conditioning", 0))
    lay.peak_bytes = max(m["peak"] for m in lay.per_gpu_bytes)
    lay.fits = lay.peak_bytes <= capacity


OUTSIDE_THE_RANK = ("cuda_context", "vae_decode", "launcher_context")  # on the GPU, not in the rank's allocator


def allocator_caps(lay: Layout, capacity: float) -> list[int]:
    """What each rank's caching allocator may hold so that its GPU's planned contents fit `capacity`: the card
    minus the CUDA context(s) and, when the DiT runs on workers, the launcher's VAE decoder on that GPU."""
    outside = OUTSIDE_THE_RANK if len(lay.per_gpu_bytes) > 1 else ("cuda_context",)
    return [int(capacity - sum(m.get(k, 0) for k in outside)) for m in lay.per_gpu_bytes]


def offload_layout(cfg, shape, per_layer, groups, capacity, spec, fmt, flops_block, t5_quantization=None) -> Layout:
    """One GPU: weights resident; every step's KV cache in pinned host RAM, streamed in layer by layer
    (two layers' buffers on the GPU), the block's new rows written back (lowvram/model/offload.py)."""
    layers = sorted(per_layer)
    lay = Layout(tp=1, pp=1, stages=[layers], mode="offload")
    mem = stage_memory(cfg, shape, layers, 1, per_layer, groups, True, True, steps_resident=1)
    one_step = mem["kv_cache"]
    mem["kv_cache"] = int(2 * one_step / len(layers))  # the double buffer
    lay.per_gpu_bytes = [dict(mem, stage=0, layers=f"{layers[0]}-{layers[-1]}")]
    add_vae_and_totals(lay, capacity, shape, t5_quantization)
    lay.host_bytes = int(one_step * STEPS_IN_FLIGHT)
    h, w = shape.latent_hw()
    new_rows = cfg.frames_per_block * (h // 2) * (w // 2) * cfg.dim * 2 * shape.kv_bytes * cfg.num_layers
    traffic = STEPS_IN_FLIGHT * (one_step + new_rows)
    lay.comm_bytes_per_block = int(traffic)
    compute = flops_block / (spec[fmt if spec.get(fmt) else "bf16"] * 1e12 * EFFICIENCY)
    lay.seconds_per_block = max(compute, traffic / (spec["pcie_GBps"] * 1e9))
    return lay


def available_ram() -> int | None:
    """Host RAM available to a new process (MemAvailable, bytes); None where /proc/meminfo is not readable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_run_bytes(cfg: DiTConfig, shape: RunShape, fmt: str, recipe: dict | None, vae_config=None) -> int:
    """Host RAM of a CPU run, where everything is float32: the whole DiT (bf16 weights widened), its KV caches
    for every step, conditioning cache and activations, plus the VAE's larger working set (encode or decode)."""
    from lowvram.conditioning.vae import runtime_dtype, vae_memory_bytes

    per_layer, groups = layer_param_bytes(cfg, recipe, fmt)
    shape32 = RunShape(shape.height, shape.width, kv_bytes=4)
    mem = stage_memory(cfg, shape32, sorted(per_layer), 1, per_layer, groups, True, True, STEPS_IN_FLIGHT)
    del mem["cuda_context"]
    mem["weights"] *= 2 if fmt == "bf16" else 1
    mem["activations"] *= 2
    vae = vae_memory_bytes(shape.height, shape.width, vae_config, dtype=runtime_dtype("cpu"))
    return int((sum(mem.values()) + max(vae["encode_peak"], vae["decode_peak"])) * FRAGMENTATION)


def check_cpu_run_fits(cfg: DiTConfig, shape: RunShape, fmt: str, recipe: dict | None, vae_config=None,
                       available: int | None = None, what: str | None = None) -> None:
    """DoesNotFitError before anything is loaded when a CPU run would need more RAM than the machine has."""
    available = available_ram() if available is None else available
    need = cpu_run_bytes(cfg, shape, fmt, recipe, vae_config)
    if available is not None and need > available:
        raise DoesNotFitError(f"{what or f'{shape.height}*{shape.width}'}: a CPU run needs ~{need / GiB:,.1f} GiB of "
                              f"RAM, this machine has {available / GiB:.1f} GiB available; use a smaller --size "
                              f"(e.g. 704*384) or a GPU")


def suggestions(cfg: DiTConfig, gpus: str, shape: RunShape, fmt: str, gpu_model: str) -> list[str]:
    """What would make a layout fit, each checked by re-planning."""
    out = []
    tries = []
    if shape.kv_bytes == 2:
        tries.append(("--kv fp8", dict(shape=RunShape(shape.height, shape.width, 1))))
    smaller = {"bf16": ("int8", "int4"), "fp8": ("int4",), "int8": ("int4",)}.get(fmt, ())
    tries += [(f"--format {f}", dict(fmt=f)) for f in smaller]
    count, size = parse_gpus(gpus)
    if layout_shapes(cfg, count * 2):
        tries.append((f"--gpus {count * 2}x{int(size / GiB)}", dict(gpus=f"{count * 2}x{int(size / GiB)}")))
    tries.append(("--size 512*512", dict(shape=RunShape(512, 512, shape.kv_bytes))))
    for label, kw in tries:
        args = dict(cfg=cfg, gpus=gpus, shape=shape, fmt=fmt, gpu_model=gpu_model)
        args.update(kw)
        best = plan_layouts(**args)[0]
        if best.fits:
            out.append(f"{label} ({best.name}, peak {best.peak_bytes / GiB:.1f} GiB)")
    return out


def plan_summary(layouts: list[Layout], capacity: float | None = None) -> list[dict]:
    rows = []
    for lay in layouts:
        d = asdict(lay)
        if capacity is not None:  # what `lowvram run --gpus ... --share-gpu` caps each rank's allocator at
            d["allocator_caps"] = allocator_caps(lay, capacity)
        d["name"] = lay.name
        d["peak_GiB"] = round(lay.peak_bytes / GiB, 2)
        d["fps"] = round(12 / lay.seconds_per_block, 2) if lay.seconds_per_block else None
        rows.append(d)
    return rows


def model_source(model_dir) -> tuple[DiTConfig, dict | None, str | None]:
    """Config (and per-layer recipe and format, for a quantized folder) from headers/JSON only, after checking
    the files a run would read: a checkpoint as `lowvram inspect` does (missing or truncated shards, missing
    keys), a quantized folder's files against manifest.json (present, sizes, headers; no hashing)."""
    from lowvram.inspection import inspect_checkpoint

    d = Path(model_dir)
    if (d / MANIFEST).exists():
        m = verify_folder(d, hashes=False)
        return DiTConfig.from_dict(m["config"]), m["recipe"], m["format"]
    config = d / "config.json" if d.is_dir() else d.parent / "config.json"
    if not config.exists():
        raise CheckpointError(f"{d}: no config.json or manifest.json; point at the DiT checkpoint folder "
                              f"(Wan2.2-S2V-14B/) or a folder written by `lowvram quantize`")
    report = inspect_checkpoint(d)
    if not report["complete"]:
        raise CheckpointError(report["problem"])
    return DiTConfig.from_json(config), None, None


def plan_report(model_dir, gpus: str, size: str, kv: str, link: str, fmt: str | None, gpu_model: str) -> dict:
    one_of("--kv", kv, KV_DTYPES)
    one_of("--link", link, LINKS)
    one_of("--gpu-model", gpu_model, tuple(GPU_MODELS))
    if fmt is not None:
        one_of("--format", fmt, FORMATS)
    parse_gpus(gpus)
    cfg, recipe, qfmt = model_source(model_dir)
    h, w = parse_size(size)
    shape = RunShape(h, w, 1 if kv == "fp8" else 2)
    fmt = qfmt or fmt or ("fp8" if GPU_MODELS[gpu_model]["fp8_ok"] else "int8")
    layouts = plan_layouts(cfg, gpus, shape, fmt, recipe, link, gpu_model)
    best, capacity = layouts[0], parse_gpus(gpus)[1]
    report = {"model": cfg.name, "gpus": gpus, "size": f"{h}*{w}", "kv": kv, "format": fmt, "link": link,
              "gpu_model": gpu_model, "layouts": plan_summary(layouts, capacity),
              "chosen": best.name if best.fits else None, "conditioning": conditioning_memory(shape, capacity)}
    if not best.fits:
        report["suggestions"] = suggestions(cfg, gpus, shape, fmt, gpu_model)
    return report


def plan_renderables(report: dict):
    from rich.table import Table

    t = Table(title=f"plan: {report['gpus']} GiB, {report['size']}, {report['format']} weights, {report['kv']} KV, "
                    f"{report['link']} ({report['gpu_model']} throughput model)")
    for col in ("layout", "stages (layers)", "peak GiB/GPU", "weights", "KV", "cond+text", "act", "host RAM",
                "comm/block", "s/block", "fps", "fits"):
        t.add_column(col)
    for row in report["layouts"]:
        g = max(row["per_gpu_bytes"], key=lambda m: m["peak"])
        t.add_row(
            row["name"] + (" ◀" if row["name"] == report["chosen"] else ""),
            " | ".join(f"{s[0]}-{s[-1]}" for s in row["stages"]),
            f"{row['peak_GiB']:.1f}",
            f"{g['weights'] / GiB:.1f}", f"{g['kv_cache'] / GiB:.1f}", f"{g['cond_cache'] / GiB:.1f}",
            f"{g['activations'] / GiB:.2f}", f"{row['host_bytes'] / GiB:.1f}",
            f"{row['comm_bytes_per_block'] / 1e6:.0f} MB", f"{row['seconds_per_block']:.2f}", f"{row['fps']}",
            "yes" if row["fits"] else "no",
        )
    yield t
    c = report["conditioning"]
    vae = max(m.get("vae_decode", 0) for m in report["layouts"][0]["per_gpu_bytes"])
    yield (f"GPU 0 before the DiT loads (freed after): umT5-XXL on {c['t5_device']} ({c['t5'] / GiB:.1f} GiB), "
           f"VAE encode {c['vae_encode'] / GiB:.1f} GiB; then the VAE decoder ({vae / GiB:.1f} GiB) on the least "
           f"loaded GPU")
    if report["chosen"]:
        yield f"chosen: {report['chosen']}"
    else:
        fixes = "; ".join(report.get("suggestions") or []) or "no single change makes it fit"
        yield f"nothing fits; would fit with: {fixes}"
