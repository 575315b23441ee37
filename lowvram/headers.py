"""safetensors files: headers (names, shapes, dtypes, byte ranges) read without the data, and one tensor at a time.

Everything that only needs names, shapes and dtypes reads the header (8-byte length + JSON) and never the data, so
inspecting a 32 GB checkpoint takes well under a second. `read_tensor` reads one tensor with a plain `readinto`
into its own freshly allocated (hence aligned) buffer — no mmap, so the process never holds file-backed pages of
the checkpoint. A pickle file's tensors (`lowvram.pth`) are indexed the same way when they are allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from lowvram.errors import CheckpointError
from lowvram.pth import is_pickle, pickle_state, refuse_pickle, short_error

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

NAME_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        NAME_DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in NAME_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling of the reference manifests)."""
    return str(dtype).removeprefix("torch.")


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


def redownload(path: Path) -> str:
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
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes); {redownload(path)}")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {n} header bytes, the file has {size}); "
                    f"{redownload(path)}")
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
        raise CheckpointError(f"{path}: corrupt safetensors header ({short_error(err)}); {redownload(path)}") from None

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
            dtype = NAME_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as err:
            raise CheckpointError(f"{bad} (unknown or missing {short_error(err)}); {redownload(path)}") from None
        except (TypeError, ValueError, OverflowError):  # OverflowError: a shape of Infinity
            raise CheckpointError(f"{bad} (malformed entry); {redownload(path)}") from None
        if any(s < 0 for s in shape) or not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{bad} (shape {list(shape)} {info['dtype']} does not match its byte range "
                                  f"{begin}..{end}); {redownload(path)}")
        end_max = max(end_max, end)
        tensors[name] = TensorEntry(path, shape, dtype, (data_start + begin, data_start + end), name)
    if end_max > data_size:
        raise CheckpointError(f"{path}: truncated: the file has {size:,} bytes, its header needs "
                              f"{data_start + end_max:,}; {redownload(path)}")
    check_no_overlap(path, tensors, data_start)
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start, size)


def check_no_overlap(path: Path, tensors: dict[str, TensorEntry], data_start: int) -> None:
    """Two tensors sharing bytes means a corrupt (or crafted) header: writing one would change the other."""
    spans = sorted((e.offsets[0], e.offsets[1], name) for name, e in tensors.items() if e.offsets[1] > e.offsets[0])
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {a!r} (bytes {a0 - data_start}.."
                                  f"{a1 - data_start}) and {b!r} ({b0 - data_start}..{b1 - data_start}) overlap; "
                                  f"{redownload(path)}")


def file_index(path: Path, allow_pickle: bool = False) -> dict[str, TensorEntry]:
    """Every tensor of one file (safetensors, or a pickle when allowed) -> its TensorEntry."""
    if is_pickle(path):
        if not allow_pickle:
            raise refuse_pickle(path)
        return {k: TensorEntry(path, tuple(v.shape), v.dtype, None, k) for k, v in pickle_state(str(path)).items()}
    return read_header(path).tensors


def read_tensor(entry: TensorEntry, _files: dict | None = None) -> torch.Tensor:
    """Read one tensor into freshly allocated CPU memory (its file dtype). Aligned, never a view of a mapping."""
    if entry.offsets is None:
        return pickle_state(str(entry.file))[entry.name].detach().clone(memory_format=torch.contiguous_format)
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
                                          f"{redownload(entry.file)}")
                got += n
        finally:
            if own:
                f.close()
    return buf.view(entry.dtype).reshape(entry.shape)

