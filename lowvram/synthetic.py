"""Random-weight checkpoints in the real LiveAvatar layout, for tests, the demo and the quantizer.

`write_checkpoint` writes what a user downloads — `config.json`, sharded safetensors named
`diffusion_pytorch_model-0000X-of-0000N.safetensors` + `diffusion_pytorch_model.safetensors.index.json`, and a
`liveavatar.safetensors` LoRA with peft names — filled with random weights scaled like trained ones.
`write_sparse_checkpoint` writes the same layout at full size with correct headers but sparse (unwritten) data,
so header-only code can be tested against the real 32.6 GB model without the disk space. `write_model_folder`
writes every component of the download (DiT, LoRA, umT5 + tokenizer, VAE, wav2vec2) at a `ModelSizes`: the demo's
tiny sizes or the real ones (`full_sizes()`, ~47 GB; `scripts/make_fullsize_checkpoint.py`).

Files are written by laying them out first (a safetensors header, or a `torch.save` pickle under `skip_data`, with
the data region left as a hole) and then filling in one tensor at a time, so host RAM holds one tensor, whatever
the file's size, and the tensors can be drawn on a GPU. Every tensor is drawn from its own generator seeded by
(seed, key), so the values do not depend on the sharding or on which other keys are written (they do depend on the
device that draws them: CPU and CUDA generators differ).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
# Writing a file without holding it: lay it out with a hole for the data, then fill in one tensor at a time

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


def _lay_out_safetensors(path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None
                         ) -> tuple[dict[str, int], int]:
    """Write a valid safetensors header and leave the data region a hole; (file offset of each tensor, size)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    size = 8 + len(raw) + offset
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(size)
    return {name: 8 + len(raw) + off for name, off in offsets.items()}, size


def _lay_out_pth(path: Path, specs: Sequence[TensorSpec]) -> dict[str, int]:
    """`torch.save` of a plain state dict (zip format, as upstream's .pth files) with its storages left unwritten;
    the file offset of each tensor's bytes. The placeholders are never touched, so they take no RAM."""
    placeholders = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in specs}
    with torch.serialization.skip_data():
        torch.save(placeholders, path)
    del placeholders
    reader = torch._C.PyTorchFileReader(str(path))
    # one storage per tensor, numbered in pickling (= insertion) order
    return {name: reader.get_record_offset(f"data/{i}") for i, (name, _, _) in enumerate(specs)}


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view[:1 << 30], offset)  # Linux writes at most ~2 GiB per call
        view, offset = view[n:], offset + n


def _fill(path: Path, offsets: dict[str, int], specs: Sequence[TensorSpec], make: Callable[[str], torch.Tensor]
          ) -> None:
    """Write make(name), cast to the spec's dtype, at each tensor's offset. make() may draw on a GPU; the next
    tensor is drawn while the previous one is written, so at most two are in host RAM."""
    fd = os.open(path, os.O_WRONLY)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = None
            for name, shape, dtype in specs:
                t = make(name).to(dtype)
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: drew {tuple(t.shape)}, the layout has {tuple(shape)}")
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                del t
                if pending is not None:
                    pending.result()
                pending = pool.submit(_pwrite_all, fd, data, offsets[name])
            if pending is not None:
                pending.result()
    finally:
        os.close(fd)


def write_safetensors(path: str | Path, specs: Sequence[TensorSpec], make: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """A safetensors file of `specs` (in that order) filled with make(name); returns its size."""
    path = Path(path)
    offsets, size = _lay_out_safetensors(path, specs, metadata)
    _fill(path, offsets, specs, make)
    return size


def write_pth(path: str | Path, specs: Sequence[TensorSpec], make: Callable[[str], torch.Tensor]) -> int:
    """A `torch.save`d state dict of `specs` (in that order) filled with make(name); returns its size."""
    path = Path(path)
    _fill(path, _lay_out_pth(path, specs), specs, make)
    return path.stat().st_size


def write_header_only(path: str | Path, specs: Iterable[tuple[str, Sequence[int], torch.dtype]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a valid safetensors file whose data region is a hole (sparse: no disk blocks). Returns its size."""
    return _lay_out_safetensors(Path(path), [(n, tuple(s), d) for n, s, d in specs], metadata)[1]


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


# ----------------------------------------------------------------------------------------------------------
# The conditioning models: umT5 encoder + tokenizer, Wan2.1 VAE, wav2vec2


T5_BLOCK_ORDER = ("norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "norm2.weight",
                  "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight", "pos_embedding.embedding.weight")


def t5_specs(cfg, dtype: torch.dtype) -> list[TensorSpec]:
    """The umT5 encoder's tensors in upstream state-dict order (embedding, blocks, final norm)."""
    shapes = cfg.upstream_shapes()
    order = ["token_embedding.weight", *(f"blocks.{i}.{k}" for i in range(cfg.num_layers) for k in T5_BLOCK_ORDER),
             "norm.weight"]
    return [(k, tuple(shapes[k]), dtype) for k in order]


def t5_tensor(key: str, shape: Sequence[int], seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    t = random_tensor(key, shape, trained_kind(key, shape), seed, device)
    return t.mul_(8.0) if key == "token_embedding.weight" else t  # embeddings are not fan-in scaled


def write_text_encoder(root: Path, cfg, dtype: torch.dtype, seed: int = 1, device: str | torch.device = "cpu"
                       ) -> list[Path]:
    """`models_t5_umt5-xxl-enc-bf16.pth` (upstream key names) and the `google/umt5-xxl` tokenizer folder."""
    from lowvram.runtime import T5_FILE, TOKENIZER_DIR

    specs = t5_specs(cfg, dtype)
    shapes = {k: s for k, s, _ in specs}
    write_pth(root / T5_FILE, specs, lambda k: t5_tensor(k, shapes[k], seed, device))
    write_tokenizer(root / TOKENIZER_DIR, cfg.vocab_size)
    return [root / T5_FILE, root / TOKENIZER_DIR]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A local fast Unigram tokenizer that `AutoTokenizer` loads: pieces learnt from a few scene sentences, padded
    with pieces that never match up to `vocab_size` (the encoder's embedding rows), pad 0, EOS 1 appended, unk 2."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    corpus = ["a person talking to the camera in a kitchen", "a baker with flour on his apron speaks warmly",
              "the blacksmith explains how steel is folded", "a fashion blogger reviews a new jacket",
              "grandmother shares a recipe while smiling", "music producer describes the drum pattern"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=min(200, vocab_size), special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(corpus * 20, trainer)
    pieces = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
    pieces += [(f"<unused_{i}>", -100.0) for i in range(vocab_size - len(pieces))]
    tok.model = models.Unigram(pieces, unk_id=2, byte_fallback=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast._tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast.save_pretrained(str(folder))


def vae_specs(cfg) -> list[TensorSpec]:
    """`Wan2.1_VAE.pth`'s tensors in upstream state-dict order (encoder, conv1, conv2, decoder); float32, as the
    real file."""
    rank = {"encoder": 0, "conv1": 1, "conv2": 1, "decoder": 2}
    shapes = cfg.upstream_shapes()
    return [(k, tuple(shapes[k]), torch.float32) for k in sorted(shapes, key=lambda k: rank[k.split(".")[0]])]


def write_vae(root: Path, cfg, seed: int = 2, device: str | torch.device = "cpu") -> list[Path]:
    from lowvram.runtime import VAE_FILE

    specs = vae_specs(cfg)
    shapes = {k: s for k, s, _ in specs}
    write_pth(root / VAE_FILE, specs, lambda k: random_tensor(k, shapes[k], trained_kind(k, shapes[k]), seed, device))
    return [root / VAE_FILE]


WAV2VEC_LARGE = dict(  # wav2vec2-large-xlsr-53-english (Wav2Vec2ForCTC, ~0.3 B params)
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, conv_dim=(512,) * 7,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=33)
WAV2VEC_TINY = dict(hidden_size=32, num_hidden_layers=24, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=33)


def wav2vec_config(size: dict):
    """The Hugging Face config: the real model's structure flags (stable layer norm, layer-normed conv stack with
    bias, kernels 10,3,3,3,3,2,2 / strides 5,2,2,2,2,2,2, GELU) at the given widths."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(**size, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                          conv_bias=True, do_stable_layer_norm=True, feat_extract_norm="layer",
                          feat_extract_activation="gelu", hidden_act="gelu", architectures=["Wav2Vec2ForCTC"])


def write_wav2vec(root: Path, size: dict, seed: int = 3) -> list[Path]:
    """The wav2vec2 folder (config, safetensors weights with Hugging Face's own init, preprocessor config)."""
    from transformers import Wav2Vec2ForCTC

    from lowvram.runtime import WAV2VEC_DIR

    folder = root / WAV2VEC_DIR
    torch.manual_seed(seed)
    Wav2Vec2ForCTC(wav2vec_config(size)).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "feature_size": 1, "sampling_rate": 16000, "padding_value": 0.0,
         "feature_extractor_type": "Wav2Vec2FeatureExtractor", "return_attention_mask": True}))
    return [folder]


# ----------------------------------------------------------------------------------------------------------
# The whole download at one size


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    name: str
    dit: DiTConfig
    lora_rank: int
    t5: object  # lowvram.conditioning.text.T5Config
    t5_dtype: torch.dtype
    vae: object  # lowvram.conditioning.vae.VAEConfig
    wav2vec: dict
    shards: int | None  # balanced shard count; None: diffusers' 10 GB rule (4 shards at 14B)


def tiny_sizes() -> ModelSizes:
    """The demo's model: every component with the real key names, small enough for a CPU test."""
    from lowvram.conditioning.text import T5Config
    from lowvram.conditioning.vae import VAEConfig
    from lowvram.model.config import tiny

    text_dim = 64
    return ModelSizes("tiny", tiny(text_dim=text_dim, audio_dim=WAV2VEC_TINY["hidden_size"], text_len=32), 8,
                      T5Config(vocab_size=256, dim=text_dim, dim_attn=text_dim, dim_ffn=128, num_heads=4, num_layers=2),
                      torch.float32, VAEConfig(dim=8), WAV2VEC_TINY, 2)


def full_sizes() -> ModelSizes:
    """The real sizes: DiT 16.3B bf16 in 4 shards, LoRA rank 128, umT5-XXL bf16, Wan2.1 VAE fp32, wav2vec2-large."""
    from lowvram.conditioning.text import T5Config
    from lowvram.conditioning.vae import VAEConfig

    return ModelSizes("full", s2v_14b(), 128, T5Config.xxl(), torch.bfloat16, VAEConfig.wan21(), WAV2VEC_LARGE, None)


def planned_bytes(sizes: ModelSizes) -> dict[str, int]:
    """Bytes each part of `write_model_folder` will write: 'dit' (shards + LoRA) and 'rest' (the other models)."""
    def nbytes(specs):
        return sum(math.prod(s) * d.itemsize for _, s, d in specs)

    from transformers import Wav2Vec2ForCTC

    with torch.device("meta"):
        w2v = sum(p.numel() * 4 for p in Wav2Vec2ForCTC(wav2vec_config(sizes.wav2vec)).parameters())
    return {"dit": nbytes(dit_specs(sizes.dit)) + nbytes(lora_specs(sizes.dit, sizes.lora_rank)),
            "rest": nbytes(t5_specs(sizes.t5, sizes.t5_dtype)) + nbytes(vae_specs(sizes.vae)) + w2v}


def _disk_bytes(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


def write_model_folder(root: str | Path, sizes: ModelSizes, *, dit_dir: str | Path | None = None, seed: int = 0,
                       device: str | torch.device = "cpu", log: Callable[[str], None] = lambda _: None) -> dict:
    """Every file of the Wan2.2-S2V-14B download + the LiveAvatar LoRA, with random weights, at `sizes`.

    The DiT (shards, index, config.json) and `liveavatar.safetensors` go to `dit_dir` (default `root`; e.g. a
    RAM disk), the umT5 encoder + tokenizer, VAE and wav2vec2 to `root`; when they differ, `dit_dir` gets symbolic
    links to the others, so either folder looks like the download. Returns bytes and seconds per component."""
    root = Path(root)
    dit_dir = Path(dit_dir) if dit_dir is not None else root
    root.mkdir(parents=True, exist_ok=True)
    dit_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        ("DiT + LoRA", lambda: _dit_files(write_checkpoint(dit_dir, sizes.dit, seed, shards=sizes.shards,
                                                           max_shard_bytes=None if sizes.shards else
                                                           DIFFUSERS_MAX_SHARD_BYTES, lora_rank=sizes.lora_rank,
                                                           device=device))),
        ("umT5 encoder + tokenizer", lambda: write_text_encoder(root, sizes.t5, sizes.t5_dtype, seed + 1, device)),
        ("Wan2.1 VAE", lambda: write_vae(root, sizes.vae, seed + 2, device)),
        ("wav2vec2", lambda: write_wav2vec(root, sizes.wav2vec, seed + 3)),
    ]
    report = {"sizes": sizes.name, "device": str(device), "root": str(root), "dit_dir": str(dit_dir), "parts": []}
    t_all = time.perf_counter()
    for name, write in parts:
        t0 = time.perf_counter()
        paths = write()
        seconds = time.perf_counter() - t0
        nbytes = _disk_bytes(paths)
        report["parts"].append({"part": name, "bytes": nbytes, "seconds": round(seconds, 2),
                                "files": [str(p) for p in paths]})
        log(f"{name}: {nbytes / 1e9:.2f} GB in {seconds:.1f} s ({nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s) "
            f"-> {paths[0].parent if len(paths) > 1 else paths[0]}")
        if paths[0].parent == root and dit_dir.resolve() != root.resolve():
            for p in paths:
                link = dit_dir / p.relative_to(root)
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(p.resolve(), target_is_directory=p.is_dir())
    report["bytes"] = sum(p["bytes"] for p in report["parts"])
    report["seconds"] = round(time.perf_counter() - t_all, 2)
    log(f"total: {report['bytes'] / 1e9:.2f} GB in {report['seconds']:.1f} s")
    return report


def _dit_files(written: WrittenCheckpoint) -> list[Path]:
    return [*written.shards, *([written.index] if written.index else []), written.config,
            *([written.lora] if written.lora else [])]
