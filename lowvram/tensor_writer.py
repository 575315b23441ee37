"""Writing a safetensors or `torch.save` file without holding it: lay it out first (a safetensors header, or a
pickle written under `skip_data`, with the data region left as a hole), then fill in one tensor at a time, so host
RAM holds one tensor (two while the previous one is written), whatever the file's size."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lowvram.checkpoint import DTYPE_NAMES

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
