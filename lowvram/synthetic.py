"""Random-weight checkpoints in the real LiveAvatar layout, for tests, the demo and the quantizer.

`write_checkpoint` writes what a user downloads — `config.json`, sharded safetensors named
`diffusion_pytorch_model-0000X-of-0000N.safetensors` + `diffusion_pytorch_model.safetensors.index.json`, and a
`liveavatar.safetensors` LoRA with peft names — filled with random weights scaled like trained ones.
`write_sparse_checkpoint` writes the same layout at full size with correct headers but sparse (unwritten) data,
so header-only code can be tested against the real 32.6 GB model without the disk space.

Every tensor is drawn from its own generator seeded by (seed, key), so the values do not depend on the
sharding or on which other keys are written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from lowvram.checkpoint import (
    CONFIG_NAME, DTYPE_NAMES, INDEX_NAME, LORA_ALPHA, LORA_NAME, LORA_PREFIX, SINGLE_NAME, build_meta_model,
    lora_target_modules,
)
from lowvram.model.config import DiTConfig, s2v_14b

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


def random_tensor(key: str, shape: Sequence[int], kind: str, seed: int = 0) -> torch.Tensor:
    """A float32 tensor scaled like a trained weight of this kind: Linear/Conv N(0, 1/fan_in), biases and
    modulation small, norm weights around 1."""
    g = torch.Generator().manual_seed(_key_seed(seed, key))
    t = torch.randn(tuple(shape), generator=g)
    if kind in ("linear", "conv"):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return t.mul_(1.0 / math.sqrt(fan_in))
    if kind == "norm":
        return t.mul_(0.05).add_(1.0)
    if kind == "bias":
        return t.mul_(0.02)
    return t.mul_(0.02)  # modulation, embeddings, padding tokens


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


def random_lora(cfg: DiTConfig, seed: int = 0, rank: int = 8, dtype: torch.dtype = torch.bfloat16,
                prefixed: bool = True, alpha: float = LORA_ALPHA) -> dict[str, torch.Tensor]:
    """LoRA tensors for every target module: A [r, in] ~ N(0, 1/in) and B [out, r] scaled so that the merged
    delta (alpha / r)·B·A is about 5 % of the weight (B ~ N(0, (0.1 / sqrt(r))^2) at the real rank 128)."""
    b_std = 0.05 / ((alpha / rank) * math.sqrt(rank))
    shapes = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
    out = {}
    for module in lora_target_modules(cfg):
        rows, cols = shapes[module + ".weight"]
        ga = torch.Generator().manual_seed(_key_seed(seed, module + ".A"))
        gb = torch.Generator().manual_seed(_key_seed(seed, module + ".B"))
        a = torch.randn(rank, cols, generator=ga) / math.sqrt(cols)
        b = torch.randn(rows, rank, generator=gb) * b_std
        out[lora_key(module, "A", prefixed)] = a.to(dtype)
        out[lora_key(module, "B", prefixed)] = b.to(dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# Sharding and writing


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


def _layout(out_dir: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], shards: int | None,
            max_shard_bytes: int | None) -> tuple[list[list[int]], list[Path]]:
    sizes = [math.prod(s) * d.itemsize for _, s, d in specs]
    assign = _split(sizes, shards, max_shard_bytes)
    n = max(assign) + 1 if assign else 1
    groups: list[list[int]] = [[] for _ in range(n)]
    for i, s in enumerate(assign):
        groups[s].append(i)
    paths = [out_dir / (SINGLE_NAME if n == 1 else shard_name(i, n)) for i in range(n)]
    return groups, paths


def write_checkpoint(out_dir: str | Path, cfg: DiTConfig, seed: int = 0, *, shards: int = 2,
                     max_shard_bytes: int | None = None, dtype: torch.dtype = torch.bfloat16, lora: bool = True,
                     lora_rank: int = 8, lora_dtype: torch.dtype | None = None,
                     lora_prefixed: bool = True) -> WrittenCheckpoint:
    """Write a random-weight checkpoint in the real layout into `out_dir` (created if needed).

    `shards` > 1 gives `diffusion_pytorch_model-0000X-of-0000N.safetensors` + index (balanced by bytes;
    `max_shard_bytes` switches to diffusers' greedy rule), 1 gives `diffusion_pytorch_model.safetensors`.
    With `lora`, `liveavatar.safetensors` holds a rank-`lora_rank` LoRA with peft names. One shard is in
    memory at a time.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = param_kinds(cfg)
    shapes = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
    specs = [(k, shapes[k], dtype) for k in kinds]
    groups, paths = _layout(out, specs, shards, max_shard_bytes)
    weight_map, total = {}, 0
    for group, path in zip(groups, paths):
        tensors = {}
        for i in group:
            key = specs[i][0]
            tensors[key] = random_tensor(key, shapes[key], kinds[key], seed).to(dtype)
            weight_map[key] = path.name
            total += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, str(path), metadata={"format": "pt"})
        del tensors
    index = _write_index(out, weight_map, total) if len(paths) > 1 else None
    config = out / CONFIG_NAME
    config.write_text(json.dumps(config_json(cfg, _lowvram_synthetic={"seed": seed, "dtype": str(dtype)}),
                                 indent=2) + "\n")
    lora_path = None
    if lora:
        lora_path = write_lora(out / LORA_NAME, cfg, seed, rank=lora_rank, dtype=lora_dtype or dtype,
                               prefixed=lora_prefixed)
    return WrittenCheckpoint(out, cfg, config, paths, index, lora_path, lora_rank if lora else None, dtype, total, seed)


def write_lora(path: str | Path, cfg: DiTConfig, seed: int = 0, *, rank: int = 8,
               dtype: torch.dtype = torch.bfloat16, prefixed: bool = True) -> Path:
    """Write a random LiveAvatar-style LoRA (peft names, every q/k/v/o/ffn.0/ffn.2 target) to `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_lora(cfg, seed, rank, dtype, prefixed), str(path), metadata={"format": "pt"})
    return path


def write_header_only(path: str | Path, specs: Iterable[tuple[str, Sequence[int], torch.dtype]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a valid safetensors file whose data region is a hole (sparse: no disk blocks). Returns its size."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    size = 8 + len(raw) + offset
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(size)
    return size


def write_sparse_checkpoint(out_dir: str | Path, cfg: DiTConfig | None = None, *, shards: int | None = None,
                            max_shard_bytes: int | None = DIFFUSERS_MAX_SHARD_BYTES,
                            dtype: torch.dtype = torch.bfloat16, lora: bool = False,
                            lora_rank: int = 128) -> WrittenCheckpoint:
    """The real layout at full size (default s2v-14b: 4 shards, 32.6 GB) as sparse files: correct headers,
    index and config.json, data never written (reads as zeros; takes no disk space). For header-only tests."""
    cfg = cfg or s2v_14b()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
    specs = [(k, s, dtype) for k, s in shapes.items()]
    if shards is not None:
        max_shard_bytes = None
    groups, paths = _layout(out, specs, shards, max_shard_bytes)
    weight_map = {}
    for group, path in zip(groups, paths):
        write_header_only(path, [specs[i] for i in group])
        weight_map.update({specs[i][0]: path.name for i in group})
    total = sum(math.prod(s) * dtype.itemsize for _, s, _ in specs)
    index = _write_index(out, weight_map, total) if len(paths) > 1 else None
    config = out / CONFIG_NAME
    config.write_text(json.dumps(config_json(cfg), indent=2) + "\n")
    lora_path = None
    if lora:
        lora_specs = []
        for module in lora_target_modules(cfg):
            rows, cols = shapes[module + ".weight"]
            lora_specs.append((lora_key(module, "A"), (lora_rank, cols), dtype))
            lora_specs.append((lora_key(module, "B"), (rows, lora_rank), dtype))
        lora_path = out / LORA_NAME
        write_header_only(lora_path, sorted(lora_specs))
    return WrittenCheckpoint(out, cfg, config, paths, index, lora_path, lora_rank if lora else None, dtype, total)
