"""Random-weight checkpoints in the real LiveAvatar layout, for tests, the demo and the quantizer.

`write_checkpoint` writes what a user downloads — `config.json`, sharded safetensors named
`diffusion_pytorch_model-0000X-of-0000N.safetensors` + `diffusion_pytorch_model.safetensors.index.json`, and a
`liveavatar.safetensors` LoRA with peft names — filled with random weights scaled like trained ones.
`write_sparse_checkpoint` writes the same layout at full size with correct headers but sparse (unwritten) data,
so header-only code can be tested against the real 32.6 GB model without the disk space. The other components of
the download are written by `synthetic_models.py`.

Files are written one tensor at a time (`tensor_writer.py`), so the tensors can be drawn on a GPU and host RAM
holds one of them, whatever the file's size. Every tensor is drawn from its own generator seeded by
(seed, key), so the values do not depend on the sharding or on which other keys are written (they do depend on the
device that draws them: CPU and CUDA generators differ).
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from lowvram.checkpoint import (
    CONFIG_NAME, INDEX_NAME, LORA_ALPHA, LORA_NAME, LORA_PREFIX, SINGLE_NAME, build_meta_model, lora_target_modules,
)
from lowvram.model.config import DiTConfig, s2v_14b
from lowvram.tensor_writer import TensorSpec, write_header_only, write_safetensors

DIFFUSERS_MAX_SHARD_BYTES = 10_000_000_000  # diffusers' default max_shard_size "10GB": 4 shards at 14B


@dataclasses.dataclass
class WrittenCheckpoint:
    """What a writer produced. `index` is None for a single-file checkpoint, `lora` None without LoRA."""

    path: Path
    cfg: DiTConfig
    config: Path
    shards: list[Path]
    index: Path | None
    lora: Path | None
    lora_rank: int | None
    dtype: torch.dtype
    tensor_bytes: int
    seed: int | None = None


# ----------------------------------------------------------------------------------------------------------
# config.json and the kind of each parameter


def config_json(cfg: DiTConfig, **extra) -> dict:
    """The checkpoint's config.json: the constructor keys of the reference model (diffusers naming)."""
    return {
        "model_type": "s2v",
        "patch_size": list(cfg.patch_size),
        "text_len": cfg.text_len,
        "in_dim": cfg.in_dim,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "text_dim": cfg.text_dim,
        "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": cfg.eps,
        "cond_dim": cfg.cond_dim,
        "audio_dim": cfg.audio_dim,
        "num_audio_token": cfg.num_audio_token,
        "enable_adain": True,
        "adain_mode": "attn_norm",
        "audio_inject_layers": list(cfg.audio_inject_layers),
        "zero_init": True,
        "zero_timestep": True,
        "enable_motioner": False,
        "add_last_motion": True,
        "trainable_token_pos_emb": False,
        "enable_tsm": False,
        "enable_framepack": True,
        "framepack_drop_mode": "padd",
        "motion_frames": cfg.motion_pixel_frames,
        **extra,
    }


def param_kinds(cfg: DiTConfig) -> dict[str, str]:
    """key -> 'linear' | 'conv' | 'bias' | 'norm' | 'modulation' | 'embedding' | 'other' (in state-dict order)."""
    model = build_meta_model(cfg)
    kinds = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{mname}.{pname}" if mname else pname
            if pname == "bias":
                kind = "bias"
            elif isinstance(module, nn.Linear):
                kind = "linear"
            elif isinstance(module, nn.modules.conv._ConvNd):
                kind = "conv"
            elif isinstance(module, nn.Embedding):
                kind = "embedding"
            elif pname == "modulation":
                kind = "modulation"
            elif "norm" in type(module).__name__.lower() or key == "casual_audio_encoder.weights":
                kind = "norm"
            else:
                kind = "other"
            kinds[key] = kind
    order = list(model.state_dict().keys())
    return {k: kinds[k] for k in order}


def _key_seed(seed: int, key: str) -> int:
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(key.encode())) % (2**63)


def random_tensor(key: str, shape: Sequence[int], kind: str, seed: int = 0, device: str | torch.device = "cpu"
                  ) -> torch.Tensor:
    """A float32 tensor (on `device`) scaled like a trained weight of this kind: Linear/Conv N(0, 1/fan_in), biases
    and modulation small, norm weights around 1."""
    g = torch.Generator(device).manual_seed(_key_seed(seed, key))
    t = torch.randn(tuple(shape), generator=g, device=device)
    if kind in ("linear", "conv"):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return t.mul_(1.0 / math.sqrt(fan_in))
    if kind == "norm":
        return t.mul_(0.05).add_(1.0)
    if kind == "bias":
        return t.mul_(0.02)
    return t.mul_(0.02)  # modulation, embeddings, padding tokens


def trained_kind(key: str, shape: Sequence[int]) -> str:
    """The kind of a conditioning-model weight (umT5, VAE) from its name and shape: norms and gammas near 1,
    matrices and conv kernels fan-in scaled, the rest (biases) small."""
    if "norm" in key or key.endswith("gamma"):
        return "norm"
    return "linear" if len(shape) >= 2 else "bias"


def random_state_dict(cfg: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Random weights for the model at `cfg` (all keys, or only `keys`), in state-dict order."""
    kinds = param_kinds(cfg)
    shapes = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
    wanted = list(kinds) if keys is None else list(keys)
    return {k: random_tensor(k, shapes[k], kinds[k], seed).to(dtype) for k in wanted}


def lora_key(module: str, ab: str, prefixed: bool = True) -> str:
    """peft's name of a LoRA tensor: [base_model.model.]<module>.lora_{A,B}.default.weight."""
    return f"{LORA_PREFIX if prefixed else ''}{module}.lora_{ab}.default.weight"


def lora_entries(cfg: DiTConfig, rank: int, prefixed: bool = True) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """File key -> (module, 'A' | 'B', shape) for every LoRA tensor, sorted by key: A [r, in], B [out, r]."""
    shapes = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
    out = {}
    for module in lora_target_modules(cfg):
        rows, cols = shapes[module + ".weight"]
        out[lora_key(module, "A", prefixed)] = (module, "A", (rank, cols))
        out[lora_key(module, "B", prefixed)] = (module, "B", (rows, rank))
    return dict(sorted(out.items()))


def lora_tensor(module: str, ab: str, shape: tuple[int, int], seed: int = 0, alpha: float = LORA_ALPHA,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """One LoRA factor (float32): A [r, in] ~ N(0, 1/in); B [out, r] scaled so that the merged delta (alpha / r)·B·A
    is about 5 % of the weight (B ~ N(0, (0.1 / sqrt(r))^2) at the real rank 128)."""
    g = torch.Generator(device).manual_seed(_key_seed(seed, f"{module}.{ab}"))
    t = torch.randn(shape, generator=g, device=device)
    if ab == "A":
        return t.div_(math.sqrt(shape[1]))
    rank = shape[1]
    return t.mul_(0.05 / ((alpha / rank) * math.sqrt(rank)))


def random_lora(cfg: DiTConfig, seed: int = 0, rank: int = 8, dtype: torch.dtype = torch.bfloat16,
                prefixed: bool = True, alpha: float = LORA_ALPHA) -> dict[str, torch.Tensor]:
    """LoRA tensors for every target module (see `lora_tensor`), sorted by key."""
    return {key: lora_tensor(module, ab, shape, seed, alpha).to(dtype)
            for key, (module, ab, shape) in lora_entries(cfg, rank, prefixed).items()}

# ----------------------------------------------------------------------------------------------------------
# Sharding and the DiT checkpoint


def _split(sizes: Sequence[int], shards: int | None, max_shard_bytes: int | None) -> list[int]:
    """Shard number of each tensor, in order. Greedy up to max_shard_bytes (diffusers' rule), else balanced."""
    if max_shard_bytes is not None:
        out, shard, used = [], 0, 0
        for size in sizes:
            if used and used + size > max_shard_bytes:
                shard, used = shard + 1, 0
            out.append(shard)
            used += size
        return out
    n = max(1, int(shards or 1))
    total = max(1, sum(sizes))
    out, start = [], 0
    for size in sizes:
        out.append(min(n - 1, (start + size // 2) * n // total))
        start += size
    used = sorted(set(out))  # renumber so no shard is empty
    return [used.index(s) for s in out]


def shard_name(i: int, n: int) -> str:
    return f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_index(folder: Path, weight_map: dict[str, str], total: int) -> Path:
    path = folder / INDEX_NAME
    path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return path


# Upstream's module order (CausalWanModel_S2V's state dict), which decides what diffusers' sharding puts where.
UPSTREAM_TOP_LEVEL_ORDER = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head",
                            "cond_encoder", "casual_audio_encoder", "audio_injector", "trainable_cond_mask",
                            "frame_packer")


def dit_specs(cfg: DiTConfig, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    """Every DiT tensor (the checkpoint's keys verbatim) in upstream's state-dict order."""
    sd = build_meta_model(cfg).state_dict()
    rank = {name: i for i, name in enumerate(UPSTREAM_TOP_LEVEL_ORDER)}
    keys = sorted(sd, key=lambda k: rank.get(k.split(".")[0], len(rank)))  # stable: in-module order kept
    return [(k, tuple(sd[k].shape), dtype) for k in keys]


def lora_specs(cfg: DiTConfig, rank: int, dtype: torch.dtype = torch.bfloat16, prefixed: bool = True
               ) -> list[TensorSpec]:
    return [(key, shape, dtype) for key, (_, _, shape) in lora_entries(cfg, rank, prefixed).items()]


def shard_layout(specs: list[TensorSpec], shards: int | None, max_shard_bytes: int | None
                 ) -> list[tuple[str, list[TensorSpec]]]:
    """(file name, its tensors) per shard: one `diffusion_pytorch_model.safetensors`, or N numbered shards."""
    sizes = [math.prod(s) * d.itemsize for _, s, d in specs]
    assign = _split(sizes, shards, max_shard_bytes)
    n = max(assign) + 1 if assign else 1
    groups: list[list[TensorSpec]] = [[] for _ in range(n)]
    for spec, s in zip(specs, assign):
        groups[s].append(spec)
    return [(SINGLE_NAME if n == 1 else shard_name(i, n), group) for i, group in enumerate(groups)]


def write_checkpoint(out_dir: str | Path, cfg: DiTConfig, seed: int = 0, *, shards: int | None = 2,
                     max_shard_bytes: int | None = None, dtype: torch.dtype = torch.bfloat16, lora: bool = True,
                     lora_rank: int = 8, lora_dtype: torch.dtype | None = None, lora_prefixed: bool = True,
                     device: str | torch.device = "cpu") -> WrittenCheckpoint:
    """Write a random-weight checkpoint in the real layout into `out_dir` (created if needed).

    `shards` > 1 gives `diffusion_pytorch_model-0000X-of-0000N.safetensors` + index (balanced by bytes;
    `max_shard_bytes` switches to diffusers' greedy rule), 1 gives `diffusion_pytorch_model.safetensors`.
    With `lora`, `liveavatar.safetensors` holds a rank-`lora_rank` LoRA with peft names. Tensors are drawn on
    `device` and written one at a time.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = param_kinds(cfg)
    specs = dit_specs(cfg, dtype)
    shapes = {k: s for k, s, _ in specs}
    layout = shard_layout(specs, shards, max_shard_bytes)
    weight_map = {}
    for name, group in layout:
        write_safetensors(out / name, group, lambda k: random_tensor(k, shapes[k], kinds[k], seed, device))
        weight_map.update({k: name for k, _, _ in group})
    total = sum(math.prod(s) * d.itemsize for _, s, d in specs)
    paths = [out / name for name, _ in layout]
    index = _write_index(out, weight_map, total) if len(paths) > 1 else None
    config = out / CONFIG_NAME
    config.write_text(json.dumps(config_json(cfg, _lowvram_synthetic={"seed": seed, "dtype": str(dtype)}),
                                 indent=2) + "\n")
    lora_path = None
    if lora:
        lora_path = write_lora(out / LORA_NAME, cfg, seed, rank=lora_rank, dtype=lora_dtype or dtype,
                               prefixed=lora_prefixed, device=device)
    return WrittenCheckpoint(out, cfg, config, paths, index, lora_path, lora_rank if lora else None, dtype, total, seed)


def write_lora(path: str | Path, cfg: DiTConfig, seed: int = 0, *, rank: int = 8,
               dtype: torch.dtype = torch.bfloat16, prefixed: bool = True, device: str | torch.device = "cpu") -> Path:
    """Write a random LiveAvatar-style LoRA (peft names, every q/k/v/o/ffn.0/ffn.2 target) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = lora_entries(cfg, rank, prefixed)
    write_safetensors(path, lora_specs(cfg, rank, dtype, prefixed),
                      lambda key: lora_tensor(*entries[key], seed=seed, device=device))
    return path


def write_sparse_checkpoint(out_dir: str | Path, cfg: DiTConfig | None = None, *, shards: int | None = None,
                            max_shard_bytes: int | None = DIFFUSERS_MAX_SHARD_BYTES,
                            dtype: torch.dtype = torch.bfloat16, lora: bool = False,
                            lora_rank: int = 128) -> WrittenCheckpoint:
    """The real layout at full size (default s2v-14b: 4 shards, 32.6 GB) as sparse files: correct headers,
    index and config.json, data never written (reads as zeros; takes no disk space). For header-only tests."""
    cfg = cfg or s2v_14b()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = dit_specs(cfg, dtype)
    if shards is not None:
        max_shard_bytes = None
    layout = shard_layout(specs, shards, max_shard_bytes)
    weight_map = {}
    for name, group in layout:
        write_header_only(out / name, group)
        weight_map.update({k: name for k, _, _ in group})
    total = sum(math.prod(s) * dtype.itemsize for _, s, _ in specs)
    paths = [out / name for name, _ in layout]
    index = _write_index(out, weight_map, total) if len(paths) > 1 else None
    config = out / CONFIG_NAME
    config.write_text(json.dumps(config_json(cfg), indent=2) + "\n")
    lora_path = None
    if lora:
        lora_path = out / LORA_NAME
        write_header_only(lora_path, lora_specs(cfg, lora_rank, dtype))
    return WrittenCheckpoint(out, cfg, config, paths, index, lora_path, lora_rank if lora else None, dtype, total)
