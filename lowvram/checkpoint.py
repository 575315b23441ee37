"""Checkpoints: safetensors headers, model identification, key checks, streaming loads with the LoRA merged.

Layout of the real DiT folder (Wan2.2-S2V-14B): `config.json`, `diffusion_pytorch_model.safetensors.index.json`
and `diffusion_pytorch_model-0000X-of-00004.safetensors`; tensor names are `LiveAvatarDiT`'s state-dict keys.
A single `diffusion_pytorch_model.safetensors` (or any one `.safetensors` file) works too.

Everything that only needs names, shapes and dtypes reads the headers (8-byte length + JSON) and never the
data, so inspecting a 32 GB checkpoint takes well under a second. Loading reads each tensor with a plain
`readinto` into its own freshly allocated (hence aligned) buffer — no mmap, so the process never holds
file-backed pages of the checkpoint: peak RSS is the result plus about one tensor.

Pickle files (`.pth`, `.pt`, `.bin`, `.ckpt`) are refused unless `allow_pickle=True`, in which case they are
opened with `torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from lowvram.errors import CheckpointError
from lowvram.model.config import DiTConfig, s2v_14b, tiny

# ----------------------------------------------------------------------------------------------------------
# Constants

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
LORA_NAME = "liveavatar.safetensors"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

LORA_PREFIX = "base_model.model."
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")  # peft target_modules of the LiveAvatar LoRA
LORA_ALPHA = 64.0  # lora_alpha of liveavatar/configs/s2v_causal_sft.yaml (rank 128 -> scale 0.5)
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.default\.weight")

# Linear weights that the quantized formats store at 8/4 bits (liveavatar-model.md §8.1); the rest stays bf16.
QUANTIZED_PREFIXES = ("blocks.", "audio_injector.")
INT4_GROUP = 128

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling of the reference manifests)."""
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# Headers and the index


class TensorEntry(NamedTuple):
    """Where one tensor lives: `offsets` is its absolute byte range in `file` (None for a pickle file)."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, int] | None
    name: str = ""  # the tensor's name inside the file (differs from the key for prefixed LoRA names)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.offsets is not None:
            return self.offsets[1] - self.offsets[0]
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass
class Header:
    """A parsed safetensors header: tensors in file order, `__metadata__`, where the data region starts."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _redownload(path: Path) -> str:
    return f"re-download {path.name}"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a whole file, read in chunks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def read_header(path: str | Path) -> Header:
    """Parse a safetensors header (8-byte little-endian length + JSON) without touching tensor data.

    Checks every entry (dtype, shape, byte count) and that the data region the header describes fits in the
    file, so a truncated download is caught here. Each problem is a one-line CheckpointError naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes); {_redownload(path)}")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {n} header bytes, the file has {size}); "
                    f"{_redownload(path)}")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; download it or fix the path") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied; make the file readable") from None
    try:
        table = json.loads(raw.decode("utf-8"))
        if not isinstance(table, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"{path}: corrupt safetensors header ({_short(err)}); {_redownload(path)}") from None

    data_start = 8 + n
    data_size = size - data_start
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    tensors: dict[str, TensorEntry] = {}
    end_max = 0
    for name, info in table.items():
        bad = f"{path}: corrupt safetensors header at tensor {name!r}"
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as err:
            raise CheckpointError(f"{bad} (unknown or missing {_short(err)}); {_redownload(path)}") from None
        except (TypeError, ValueError, OverflowError):  # OverflowError: a shape of Infinity
            raise CheckpointError(f"{bad} (malformed entry); {_redownload(path)}") from None
        if any(s < 0 for s in shape) or not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{bad} (shape {list(shape)} {info['dtype']} does not match its byte range "
                                  f"{begin}..{end}); {_redownload(path)}")
        end_max = max(end_max, end)
        tensors[name] = TensorEntry(path, shape, dtype, (data_start + begin, data_start + end), name)
    if end_max > data_size:
        raise CheckpointError(f"{path}: truncated: the file has {size:,} bytes, its header needs "
                              f"{data_start + end_max:,}; {_redownload(path)}")
    check_no_overlap(path, tensors, data_start)
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start, size)


def check_no_overlap(path: Path, tensors: dict[str, TensorEntry], data_start: int) -> None:
    """Two tensors sharing bytes means a corrupt (or crafted) header: writing one would change the other."""
    spans = sorted((e.offsets[0], e.offsets[1], name) for name, e in tensors.items() if e.offsets[1] > e.offsets[0])
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {a!r} (bytes {a0 - data_start}.."
                                  f"{a1 - data_start}) and {b!r} ({b0 - data_start}..{b1 - data_start}) overlap; "
                                  f"{_redownload(path)}")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]


def _is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


class PickleRefusedError(CheckpointError):
    """A pickle file where safetensors is expected; only `inspect` has a flag (--allow-pickle) to open one."""


def _refuse_pickle(path: Path) -> CheckpointError:
    return PickleRefusedError(
        f"{path}: is a pickle file ({path.suffix}), which is never unpickled here (it could run code); use the "
        f".safetensors release of this file, or convert it: python -c \"import torch, safetensors.torch as st; "
        f"st.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\"")


def torch_load_weights(path: str | Path):
    """torch.load(weights_only=True), memory-mapped; legacy (pre-1.6, non-zip) files can't be mapped and are read
    whole — still never a full unpickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=2)
def _pickle_state(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch_load_weights(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; download it or fix the path") from None
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({_short(err)}); "
                              f"re-download it or convert it to safetensors") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 4:
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _pickle_index(path: Path) -> dict[str, TensorEntry]:
    state = _pickle_state(str(path))
    return {k: TensorEntry(path, tuple(v.shape), v.dtype, None, k) for k, v in state.items()}


def _file_index(path: Path, allow_pickle: bool) -> dict[str, TensorEntry]:
    if _is_pickle(path):
        if not allow_pickle:
            raise _refuse_pickle(path)
        return _pickle_index(path)
    return read_header(path).tensors


def checkpoint_index(ckpt: str | Path, allow_pickle: bool = False) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint -> TensorEntry(file, shape, dtype, offsets), from headers only.

    `ckpt` is a folder (sharded with `*.safetensors.index.json`, or one `diffusion_pytorch_model.safetensors`,
    or exactly one `.safetensors` file), an index json, or a single file. Missing shards, truncated shards and
    corrupt headers raise a CheckpointError naming the file and the fix.
    """
    path = Path(ckpt)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _sharded_index(path, allow_pickle)
        if path.suffix == ".safetensors" or _is_pickle(path):
            return _file_index(path, allow_pickle)
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors or a .safetensors.index.json)")
    if (path / INDEX_NAME).is_file():
        return _sharded_index(path / INDEX_NAME, allow_pickle)
    if (path / SINGLE_NAME).is_file():
        return _file_index(path / SINGLE_NAME, allow_pickle)
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _sharded_index(indexes[0], allow_pickle)
    files = sorted(p for p in path.glob("*.safetensors") if p.name != LORA_NAME)
    if len(files) == 1 and not indexes:
        return _file_index(files[0], allow_pickle)
    if len(indexes) > 1 or len(files) > 1:
        what = indexes if len(indexes) > 1 else files
        raise CheckpointError(f"{path}: {len(what)} candidate files ({', '.join(p.name for p in what[:3])}…) and no "
                              f"{INDEX_NAME}; re-download the index or pass the file to use")
    pickles = sorted(p for p in path.iterdir() if p.is_file() and _is_pickle(p))
    if len(pickles) == 1:
        return _file_index(pickles[0], allow_pickle)
    raise CheckpointError(f"{path}: no checkpoint found (expected {INDEX_NAME} with its shards, or {SINGLE_NAME})")


def _sharded_index(index_path: Path, allow_pickle: bool) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: corrupt index ({_short(err)}); {_redownload(index_path)}") from None
    folder = index_path.parent
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(str(shard), []).append(key)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder / missing[0]}: shard missing{more}, named by {index_path.name}; "
                              f"re-download {missing[0]}")
    index: dict[str, TensorEntry] = {}
    for shard, keys in shards.items():
        found = _file_index(folder / shard, allow_pickle)
        absent = [k for k in keys if k not in found]
        if absent:
            raise CheckpointError(f"{folder / shard}: lacks {len(absent)} tensors that {index_path.name} places there "
                                  f"(first: {absent[0]!r}); re-download {shard}")
        for key, entry in found.items():
            if weight_map.get(key, shard) == shard:
                index[key] = entry
    return index


def read_tensor(entry: TensorEntry, _files: dict | None = None) -> torch.Tensor:
    """Read one tensor into freshly allocated CPU memory (its file dtype). Aligned, never a view of a mapping."""
    if entry.offsets is None:
        return _pickle_state(str(entry.file))[entry.name].detach().clone(memory_format=torch.contiguous_format)
    begin, end = entry.offsets
    buf = torch.empty(end - begin, dtype=torch.uint8)
    if end > begin:
        f = _files.get(entry.file) if _files is not None else None
        own = f is None
        if own:
            f = open(entry.file, "rb", buffering=0)
            if _files is not None:
                _files[entry.file], own = f, False
        try:
            view = memoryview(buf.numpy())
            f.seek(begin)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{entry.file}: truncated while reading {entry.name!r}; "
                                          f"{_redownload(entry.file)}")
                got += n
        finally:
            if own:
                f.close()
    return buf.view(entry.dtype).reshape(entry.shape)


# ----------------------------------------------------------------------------------------------------------
# The model side: expected keys, identification, key checks


_INIT_FUNCS = frozenset({
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_,
    nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.constant_, nn.init.ones_, nn.init.zeros_,
    nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
})


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Turns weight initialisation on meta tensors into a no-op (torch's meta `normal_` imports dynamo: ~1 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_FUNCS:
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def build_meta_model(cfg: DiTConfig, **kwargs) -> nn.Module:
    """`LiveAvatarDiT(cfg, **kwargs)` on the meta device (no memory, no init): the target of a streaming load."""
    from lowvram.model.dit import LiveAvatarDiT

    with torch.device("meta"), _SkipMetaInit():
        return LiveAvatarDiT(cfg, **kwargs)


@functools.lru_cache(maxsize=8)
def _model_layout(cfg: DiTConfig) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    model = build_meta_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linear = frozenset(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear))
    return shapes, linear


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model at `cfg` -> shape (built on the meta device; cached)."""
    return dict(_model_layout(cfg)[0])


def linear_weight_keys(cfg: DiTConfig) -> frozenset[str]:
    """Keys of all nn.Linear weights of the model at `cfg`."""
    return _model_layout(cfg)[1]


def quantized_weight_keys(cfg: DiTConfig) -> frozenset[str]:
    """The Linear weights a quantized format stores at 8/4 bits: those in blocks and audio injectors (§8.1)."""
    return frozenset(k for k in linear_weight_keys(cfg) if k.startswith(QUANTIZED_PREFIXES))


def lora_target_modules(cfg_or_shapes: DiTConfig | Mapping[str, tuple]) -> list[str]:
    """Modules the LiveAvatar LoRA targets: name == target or ends with '.' + target (peft's rule), Linear only."""
    if isinstance(cfg_or_shapes, DiTConfig):
        keys = sorted(linear_weight_keys(cfg_or_shapes))
    else:
        keys = [k for k, s in _as_shapes(cfg_or_shapes).items() if k.endswith(".weight") and len(s) == 2]
    out = []
    for key in keys:
        module = key[: -len(".weight")]
        if any(module == t or module.endswith("." + t) for t in LORA_TARGETS):
            out.append(module)
    return out


class KeyReport(NamedTuple):
    """Result of comparing a checkpoint's keys with a model: lists sorted by key."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, expected shape, found shape)

    @property
    def complete(self) -> bool:
        """Loadable: nothing missing and no wrong shape (extra keys are reported but harmless)."""
        return not self.missing and not self.mismatched


def _as_shapes(obj) -> dict[str, tuple[int, ...]]:
    if isinstance(obj, DiTConfig):
        return expected_shapes(obj)
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in obj.items()}


def check_keys(index: Mapping, cfg: DiTConfig) -> KeyReport:
    """Missing / unexpected / wrong-shape keys of a checkpoint index (or key -> shape map) against `cfg`."""
    expected = expected_shapes(cfg)
    found = _as_shapes(index)
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    mismatched = sorted((k, expected[k], found[k]) for k in found if k in expected and found[k] != expected[k])
    return KeyReport(missing, unexpected, mismatched)


_ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len", "in_dim",
                "out_dim", "cond_dim", "audio_dim", "num_audio_token", "audio_layers", "audio_inject_layers",
                "patch_size", "eps")


def _arch(cfg: DiTConfig) -> tuple:
    return tuple(getattr(cfg, f) for f in _ARCH_FIELDS)


def _location(index: Mapping) -> Path | None:
    """The file of the index's first tensor (None for a plain key -> shape map)."""
    for entry in index.values():
        return Path(entry.file) if isinstance(entry, TensorEntry) else None
    return None


def _where(index: Mapping) -> str:
    """How error messages name a checkpoint: its file, or its folder when it has several."""
    files = {e.file for e in index.values() if isinstance(e, TensorEntry)}
    if not files:
        return "checkpoint"
    return str(next(iter(files))) if len(files) == 1 else str(next(iter(files)).parent)


def read_config_json(index_or_dir) -> dict | None:
    """The checkpoint's `config.json` (next to its files) as a dict, or None when there is none."""
    if isinstance(index_or_dir, Mapping):
        loc = _location(index_or_dir)
        folder = loc.parent if loc is not None else None
    else:
        folder = Path(index_or_dir)
        folder = folder if folder.is_dir() else folder.parent
    if folder is None or not (folder / CONFIG_NAME).is_file():
        return None
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt config ({_short(err)}); {_redownload(path)}") from None


def _config_from_shapes(shapes: Mapping[str, tuple], base: DiTConfig, from_json: bool) -> DiTConfig | None:
    """Fill the shape-determined fields of `base` from the tensors; None when the anchors are absent."""
    pe = shapes.get("patch_embedding.weight")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if pe is None or len(pe) != 5 or not layers:
        return None
    first = min(layers)
    d = dict(dim=pe[0], in_dim=pe[1], patch_size=tuple(pe[2:]), num_layers=max(layers) + 1)

    def take(key, field, fn):
        s = shapes.get(key)
        if s is not None:
            try:
                d[field] = fn(s)
            except (IndexError, ZeroDivisionError):
                pass

    take("cond_encoder.weight", "cond_dim", lambda s: s[1])
    take("text_embedding.0.weight", "text_dim", lambda s: s[1])
    take("time_embedding.0.weight", "freq_dim", lambda s: s[1])
    take(f"blocks.{first}.ffn.0.weight", "ffn_dim", lambda s: s[0])
    take("head.head.weight", "out_dim", lambda s: s[0] // math.prod(d["patch_size"]))
    take("casual_audio_encoder.encoder.conv1_local.conv.weight", "audio_dim", lambda s: s[1])
    take("casual_audio_encoder.weights", "audio_layers", lambda s: s[1])
    dim = d["dim"]
    if not from_json and dim != base.dim:
        heads = dim // 128 if dim % 128 == 0 else next(h for h in (8, 4, 2, 1) if dim % h == 0)
        d["num_heads"] = heads
    n_inj = len({m.group(1) for k in shapes if (m := re.match(r"audio_injector\.injector\.(\d+)\.", k))})
    inject = tuple(base.audio_inject_layers)
    if n_inj != len(inject) or any(i >= d["num_layers"] for i in inject):
        last = d["num_layers"] - 1
        inject = tuple(sorted({round(i * last / (n_inj - 1)) for i in range(n_inj)})) if n_inj > 1 else (0,) * n_inj
    d["audio_inject_layers"] = inject
    return dataclasses.replace(base, **d)


def identify(index: Mapping, config: dict | None = None) -> DiTConfig:
    """Recognise the model of a checkpoint: the s2v-14b or tiny preset, or a custom config (name 'custom').

    Sizes come from the tensor shapes; what shapes cannot tell (heads, audio inject layers, text length) from
    `config` or the checkpoint's config.json. A key set of another model raises a CheckpointError.
    """
    where = _where(index)
    if config is None and _location(index) is not None:
        config = read_config_json(index)
    try:
        base = DiTConfig.from_dict(config) if config else DiTConfig()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: config.json does not describe a valid DiT ({_short(err)})") from None
    shapes = _as_shapes(index)
    if not shapes:
        raise CheckpointError(f"{where}: the checkpoint holds no tensors; re-download it")
    try:
        cfg = _config_from_shapes(shapes, base, from_json=bool(config)) or base
        cfg.validate()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: tensor shapes describe no valid DiT ({_short(err)})") from None
    expected = expected_shapes(cfg)
    hits = sum(1 for k, s in shapes.items() if expected.get(k) == s)
    if hits < 0.5 * min(len(shapes), len(expected)):
        first = next(iter(sorted(shapes)))
        raise CheckpointError(
            f"{where}: not a Wan2.2-S2V / LiveAvatar DiT checkpoint: {hits} of its {len(shapes)} tensors match the "
            f"DiT's names and shapes (first key {first!r}); point at the Wan2.2-S2V-14B folder")
    for preset in (s2v_14b(), tiny()):
        if _arch(cfg) == _arch(preset):
            return preset
    return dataclasses.replace(cfg, name="custom")


# ----------------------------------------------------------------------------------------------------------
# LoRA


@dataclasses.dataclass
class LoraWeights:
    """A LiveAvatar LoRA read from its header: per target module the lora_A / lora_B entries.

    `overrides` are non-LoRA tensors of the file that upstream's `load_state_dict(strict=False)` would copy
    over model parameters before the merge; `ignored` are file keys that match nothing (upstream skips them).
    """

    path: Path
    rank: int
    alpha: float
    targets: dict[str, tuple[TensorEntry, TensorEntry]]  # module -> (A [r, in], B [out, r])
    overrides: dict[str, TensorEntry]
    ignored: list[str]
    num_tensors: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def params(self) -> int:
        return sum(a.numel + b.numel for a, b in self.targets.values())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.targets.values())

    def target_of(self, key: str) -> str | None:
        """The targeted module whose weight `key` is, else None."""
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            if module in self.targets:
                return module
        return None

    def delta(self, module: str, device: torch.device | str = "cpu", _files: dict | None = None) -> torch.Tensor:
        """(float32(B) @ float32(A)) * (alpha / r), float32 [out, in], computed on `device`."""
        a_entry, b_entry = self.targets[module]
        a = read_tensor(a_entry, _files).to(device=device, dtype=torch.float32)
        b = read_tensor(b_entry, _files).to(device=device, dtype=torch.float32)
        delta = b @ a
        delta *= self.scale
        return delta

    def merge(self, key: str, weight: torch.Tensor, _files: dict | None = None, *, inplace: bool = False) -> torch.Tensor:
        """W' = to_dtype(float32(W) + delta) for a targeted weight (peft's merge_and_unload); else W unchanged.

        `inplace` writes the result into `weight` (no second copy; float32 weights are always returned anew)."""
        module = self.target_of(key)
        if module is None:
            return weight
        merged = self.delta(module, weight.device, _files)
        merged += weight  # float32 + float32(W): the same sum as float32(W) + delta, without a float32 copy of W
        if weight.dtype == torch.float32:
            return merged
        if not inplace:
            return merged.to(weight.dtype)
        with torch.no_grad():
            return weight.copy_(merged)  # rounds to the weight's dtype (nearest-even), reusing its memory

    def summary(self) -> dict:
        return {
            "path": str(self.path), "rank": self.rank, "alpha": self.alpha, "scale": self.scale,
            "targets": len(self.targets), "tensors": self.num_tensors, "params": self.params, "bytes": self.nbytes,
            "overrides": sorted(self.overrides), "ignored": len(self.ignored), "ignored_first": self.ignored[:5],
        }


def read_lora(path: str | Path, expected: DiTConfig | Mapping | None = None, *, alpha: float | None = None,
              allow_pickle: bool = False) -> LoraWeights:
    """Read a LiveAvatar LoRA's header (no data) and check it against the model.

    Names follow peft: `base_model.model.<module>.lora_{A,B}.default.weight`. Upstream's prefix rule is kept: only
    the first key (in sorted order) is looked at; if it lacks `base_model.model.`, every key gets it prepended.
    `expected` (a DiTConfig, a checkpoint index or key -> shape) validates targets and shapes; rank is read
    from the file, alpha defaults to 64 (scale alpha / rank = 0.5 at rank 128).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: LoRA file not found; download liveavatar.safetensors or fix the path")
    if path.is_dir():
        if (path / LORA_NAME).is_file():
            path = path / LORA_NAME
        else:
            raise CheckpointError(f"{path}: is a folder without {LORA_NAME}; pass the LoRA file")
    entries = _file_index(path, allow_pickle)
    names = sorted(entries) if not _is_pickle(path) else list(entries)
    if not names:
        raise CheckpointError(f"{path}: not a LiveAvatar LoRA: the file holds no tensors")
    prefixed = names[0].startswith(LORA_PREFIX)
    shapes = _as_shapes(expected) if expected is not None else None
    targetable = set(lora_target_modules(shapes)) if shapes is not None else None

    pairs: dict[str, dict[str, tuple[str, TensorEntry]]] = {}
    overrides: dict[str, TensorEntry] = {}
    ignored: list[str] = []
    for name in names:
        full = name if prefixed else LORA_PREFIX + name
        inner = full[len(LORA_PREFIX):] if full.startswith(LORA_PREFIX) else None
        m = _LORA_KEY.fullmatch(inner) if inner is not None else None
        if m and (targetable is None or m["module"] in targetable):
            pairs.setdefault(m["module"], {})[m["ab"]] = (name, entries[name])
        elif inner is not None and inner.endswith((".base_layer.weight", ".base_layer.bias")) and (
                targetable is None or inner.rsplit(".", 2)[0] in targetable):
            overrides[inner.replace(".base_layer.", ".")] = entries[name]
        elif inner is not None and shapes is not None and inner in shapes and inner.rsplit(".", 1)[0] not in targetable:
            overrides[inner] = entries[name]
        else:
            ignored.append(name)
    if not pairs:
        raise CheckpointError(
            f"{path}: not a LiveAvatar LoRA: none of its {len(names)} tensors is a "
            f"'<module>.lora_A.default.weight' / 'lora_B' of the DiT's q/k/v/o/ffn layers (first key {names[0]!r})")

    targets: dict[str, tuple[TensorEntry, TensorEntry]] = {}
    rank = None
    for module in sorted(pairs):
        ab = pairs[module]
        if "A" not in ab or "B" not in ab:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise CheckpointError(f"{path}: {ab[have][0]!r} has no lora_{lack} partner; the LoRA file is damaged, "
                                  f"re-download it")
        (a_name, a), (b_name, b) = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise CheckpointError(f"{path}: LoRA tensor {a_name!r} / {b_name!r} is not 2-D; not a LiveAvatar LoRA")
        r = a.shape[0]
        rank = r if rank is None else rank
        if shapes is not None:
            out_f, in_f = shapes[module + ".weight"]
            exp_a, exp_b = (rank, in_f), (out_f, rank)
        else:
            exp_a, exp_b = (rank, a.shape[1]), (b.shape[0], rank)
        for name, entry, exp in ((a_name, a, exp_a), (b_name, b, exp_b)):
            if entry.shape != exp:
                raise CheckpointError(
                    f"{path}: LoRA tensor {name!r} has shape {list(entry.shape)}, expected {list(exp)} (rank {rank} "
                    f"on {module}.weight); this LoRA does not fit this model")
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise CheckpointError(f"{path}: LoRA tensor {a_name!r} is {dtype_name(a.dtype)}, expected a float dtype")
        targets[module] = (a, b)
    if rank == 0:
        raise CheckpointError(f"{path}: LoRA rank is 0; not a usable LoRA")
    return LoraWeights(path, rank, float(LORA_ALPHA if alpha is None else alpha), targets, overrides, ignored,
                       len(names))


# ----------------------------------------------------------------------------------------------------------
# Streaming load


_MALLOC_FIXED = False


def _fix_malloc_threshold() -> None:
    """Pin glibc's mmap threshold (128 KiB) so freed large temporaries go back to the OS at once.

    glibc raises the threshold to the size of each freed mmapped block (up to 32 MiB), after which large
    temporaries (float32 merge buffers) come from the heap between long-lived weights and fragment it: up to
    +40 % peak RSS was measured on a LoRA merge. Pinning it (what MALLOC_MMAP_THRESHOLD_ does) is process-wide
    and harmless; skipped when that variable is set or the C library is not glibc.
    """
    global _MALLOC_FIXED
    if _MALLOC_FIXED or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _MALLOC_FIXED = True
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _make_filter(key_filter) -> Callable[[str], bool]:
    if key_filter is None:
        return lambda k: True
    if callable(key_filter):
        return key_filter
    prefixes = (key_filter,) if isinstance(key_filter, str) else tuple(key_filter)
    return lambda k: k.startswith(prefixes)


def assign_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put `value` in place of the parameter/buffer `key` of `model` (e.g. one on the meta device), keeping
    its requires_grad flag."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad
                                                                         and value.is_floating_point()))
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(key)


_assign = assign_tensor  # the older private name, used by lowvram.parallel.stage


def load_state_dict_streaming(
    ckpt: str | Path | Mapping[str, TensorEntry],
    model_or_keys: nn.Module | Iterable[str] | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    lora: str | Path | LoraWeights | None = None,
    key_filter: Callable[[str], bool] | str | Iterable[str] | None = None,
    *,
    lora_alpha: float | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
):
    """Stream a checkpoint tensor by tensor into `dtype` on `device`, merging the LoRA on the way.

    `model_or_keys`: a module (typically built with `build_meta_model`, or a pipeline stage of it) whose
    parameters are replaced by the loaded tensors — the module is returned; or an iterable of keys, or None for
    every key — a dict key -> tensor is returned. `key_filter` (a predicate, a key prefix or a tuple of
    prefixes) restricts the keys, e.g. to one block. `dtype=None` keeps the file dtype; integer tensors always
    keep theirs. With `strict`, a wanted key that the checkpoint lacks is an error; a wrong shape always is.

    Each tensor is read into its own buffer, cast, moved, and merged with
    `W = to_dtype(float32(W) + (float32(B) @ float32(A)) * (alpha / r))`, so peak host memory is the result plus
    about one tensor (plus its float32 copy during a merge).
    """
    _fix_malloc_threshold()
    index = ckpt if isinstance(ckpt, Mapping) else checkpoint_index(ckpt, allow_pickle=allow_pickle)
    where = ckpt if not isinstance(ckpt, Mapping) else _where(index)
    keep = _make_filter(key_filter)
    model = model_or_keys if isinstance(model_or_keys, nn.Module) else None
    if model is not None:
        wanted = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if keep(k)}
    elif model_or_keys is None:
        wanted = {k: e.shape for k, e in index.items() if keep(k)}
    else:
        wanted = {k: index[k].shape if k in index else None for k in model_or_keys if keep(k)}

    absent = [k for k in wanted if k not in index]
    if absent and strict:
        raise CheckpointError(f"{where}: {len(absent)} tensors the model needs are missing (first: {absent[0]!r}); "
                              f"re-download the checkpoint or check that it is the right model")
    for key, shape in wanted.items():
        if key in index and shape is not None and index[key].shape != shape:
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(index[key].shape)}, the model expects "
                                  f"{list(shape)}; this checkpoint is for another model size")

    if lora is not None and not isinstance(lora, LoraWeights):
        lora = read_lora(lora, index, alpha=lora_alpha, allow_pickle=allow_pickle)
    elif isinstance(lora, LoraWeights) and lora_alpha is not None:
        lora = dataclasses.replace(lora, alpha=float(lora_alpha))
    device = torch.device(device)

    sources = {k: (lora.overrides.get(k, index[k]) if lora is not None else index[k]) for k in wanted if k in index}
    order = sorted(sources, key=lambda k: (str(sources[k].file), sources[k].offsets or (0, 0)))
    result: dict[str, torch.Tensor] = {}
    files: dict = {}
    try:
        for key in order:
            entry = sources[key]
            t = read_tensor(entry, files)
            if entry.shape != index[key].shape:
                raise CheckpointError(f"{entry.file}: override {entry.name!r} has shape {list(entry.shape)}, the "
                                      f"model expects {list(index[key].shape)}")
            cast = dtype is not None and t.is_floating_point() and t.dtype != dtype
            if device.type == "cpu":
                t = t.to(dtype) if cast else t
            else:
                t = t.to(device)
                t = t.to(dtype) if cast else t
            if lora is not None:
                t = lora.merge(key, t, inplace=True, _files=files)
            if model is not None:
                assign_tensor(model, key, t)
            else:
                result[key] = t
            del t
    finally:
        for f in files.values():
            f.close()
    return model if model is not None else result


# ----------------------------------------------------------------------------------------------------------
# Inspection (headers only)


def quantized_bytes(shapes: Mapping, cfg: DiTConfig) -> dict[str, int]:
    """Bytes of these tensors at bf16 / fp8 / int8 / int4 (§8.1): quantized Linear weights with one fp16 scale
    per output channel (int4: per group of 128 inputs), everything else bf16."""
    quant = quantized_weight_keys(cfg)
    out = {"bf16": 0, "fp8": 0, "int8": 0, "int4": 0}
    for key, shape in _as_shapes(shapes).items():
        n = math.prod(shape)
        out["bf16"] += 2 * n
        if key in quant and len(shape) == 2:
            rows, cols = shape
            out["fp8"] += n + 2 * rows
            out["int8"] += n + 2 * rows
            out["int4"] += (n + 1) // 2 + 2 * rows * math.ceil(cols / INT4_GROUP)
        else:
            for fmt in ("fp8", "int8", "int4"):
                out[fmt] += 2 * n
    return out


def inspect_checkpoint(ckpt: str | Path, lora: str | Path | None = None, *, lora_alpha: float | None = None,
                       allow_pickle: bool = False) -> dict:
    """Everything `lowvram inspect` reports, from headers only. Raises CheckpointError for unreadable input;
    an incomplete checkpoint is reported with `complete: False` and a one-line `problem`."""
    t0 = time.perf_counter()
    path = Path(ckpt)
    index = checkpoint_index(path, allow_pickle=allow_pickle)
    config = read_config_json(index)
    cfg = identify(index, config)
    keys = check_keys(index, cfg)
    shapes = {k: e.shape for k, e in index.items()}
    files: dict[str, dict] = {}
    dtypes: dict[str, int] = {}
    for e in index.values():
        f = files.setdefault(e.file.name, {"name": e.file.name, "bytes": e.file.stat().st_size, "tensors": 0})
        f["tensors"] += 1
        dtypes[dtype_name(e.dtype)] = dtypes.get(dtype_name(e.dtype), 0) + 1
    sizes = quantized_bytes(shapes, cfg)
    sizes["file"] = sum(e.nbytes for e in index.values())
    report = {
        "path": str(path),
        "model": cfg.name,
        "config": {f: list(v) if isinstance(v, tuple) else v for f in _ARCH_FIELDS for v in [getattr(cfg, f)]},
        "config_json": config is not None,
        "complete": keys.complete,
        "num_tensors": len(index),
        "expected_tensors": len(expected_shapes(cfg)),
        "params": sum(e.numel for e in index.values()),
        "dtypes": dtypes,
        "files": list(files.values()),
        "bytes": sizes,
        "missing": keys.missing,
        "unexpected": keys.unexpected,
        "mismatched": [{"key": k, "expected": list(a), "found": list(b)} for k, a, b in keys.mismatched],
        "lora": None,
        "problem": None,
    }
    if lora is not None:
        weights = read_lora(lora, cfg, alpha=lora_alpha, allow_pickle=allow_pickle)
        report["lora"] = weights.summary() | {"expected_targets": len(lora_target_modules(cfg))}
    if not keys.complete:
        first = (f"first missing: {keys.missing[0]!r}" if keys.missing
                 else f"first wrong shape: {keys.mismatched[0][0]!r}")
        report["problem"] = (
            f"{path}: incomplete {cfg.name} checkpoint: {len(keys.missing)} missing, {len(keys.mismatched)} "
            f"wrong-shape, {len(keys.unexpected)} unexpected keys ({first}); re-download it or point at the "
            f"right folder")
    report["seconds"] = round(time.perf_counter() - t0, 4)
    return report


def _gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def inspect_renderables(report: dict) -> list:
    """Rich tables for `lowvram inspect` without --json."""
    from rich.table import Table

    summary = Table(title=f"checkpoint {report['path']}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    cfg = report["config"]
    summary.add_row("model", f"{report['model']}  (dim {cfg['dim']}, {cfg['num_layers']} layers, "
                             f"{len(cfg['audio_inject_layers'])} audio injectors)")
    status = "[green]complete[/]" if report["complete"] else "[red]incomplete[/]"
    summary.add_row("keys", f"{status}: {report['num_tensors']} tensors of {report['expected_tensors']} expected; "
                            f"{len(report['missing'])} missing, {len(report['unexpected'])} unexpected, "
                            f"{len(report['mismatched'])} wrong shape")
    summary.add_row("params", f"{report['params']:,}")
    summary.add_row("dtypes", ", ".join(f"{k} x{v}" for k, v in sorted(report["dtypes"].items())))
    summary.add_row("files", ", ".join(f"{f['name']} ({_gb(f['bytes'])})" for f in report["files"]))
    b = report["bytes"]
    summary.add_row("size", f"on disk {_gb(b['file'])} · bf16 {_gb(b['bf16'])} · fp8 {_gb(b['fp8'])} · "
                            f"int8 {_gb(b['int8'])} · int4 {_gb(b['int4'])}")
    lora = report.get("lora")
    if lora:
        summary.add_row("LoRA", f"{lora['path']}: rank {lora['rank']}, alpha {lora['alpha']:g} (scale "
                                f"{lora['scale']:g}), {lora['targets']} of {lora['expected_targets']} targets, "
                                f"{lora['tensors']} tensors, {len(lora['overrides'])} overrides, "
                                f"{lora['ignored']} ignored")
    summary.add_row("time", f"{report['seconds']:.3f} s (headers only)")
    out = [summary]
    problems = [("missing", k, "") for k in report["missing"]] + [
        ("wrong shape", m["key"], f"expected {m['expected']}, found {m['found']}") for m in report["mismatched"]] + [
        ("unexpected", k, "") for k in report["unexpected"]]
    if problems:
        table = Table(title=f"key problems (first 20 of {len(problems)})", title_justify="left")
        table.add_column("kind")
        table.add_column("key")
        table.add_column("detail")
        for row in problems[:20]:
            table.add_row(*row)
        out.append(table)
    return out
