"""Byte-exact, atomic safetensors files and fingerprints for the quantized folder.

`write_safetensors` writes the safetensors format itself (8-byte header length, JSON header with sorted keys,
tensors in name order, no gaps), so the same tensors always give the same bytes — the library's writer
serialises `__metadata__` from a hash map whose order may change between processes. Each file is written to
`<name>.tmp-<pid>` in the same folder, fsynced and renamed over the final name: a crash or Ctrl-C leaves either
the previous file, the finished file, or a `.tmp-*` file that nothing ever reads as finished.

Reading them back (sha256-checked) is the runtime's job: `lowvram.quantized.read_safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from lowvram.headers import DTYPE_NAMES, read_header

TMP_MARK = ".tmp-"


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    names = sorted(tensors)
    table: dict = {}
    if metadata:
        table["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        table[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data region starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, names


def atomic_write_bytes(path: str | Path, chunks: Iterable[bytes]) -> tuple[str, int]:
    """Write chunks to `path` atomically (temp name + fsync + rename); returns (sha256 hex, size)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest.hexdigest(), size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Deterministic safetensors file, written atomically. Returns (sha256 hex, bytes)."""
    head, names = _header(tensors, metadata)

    def chunks():
        yield head
        for name in names:
            yield tensor_bytes(tensors[name])

    return atomic_write_bytes(path, chunks())


def atomic_write_json(path: str | Path, obj) -> tuple[str, int]:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write_bytes(path, [data])


def atomic_write_text(path: str | Path, text: str) -> tuple[str, int]:
    return atomic_write_bytes(path, [text.encode()])


def header_fingerprint(files: Iterable[str | Path]) -> dict:
    """sha256 over each file's name, size and header bytes (cheap for a 32 GB checkpoint), + per-file entries."""
    total = hashlib.sha256()
    entries = []
    for path in sorted({Path(p) for p in files}, key=lambda p: p.name):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            raw = head + f.read(min(n, size))
        h = hashlib.sha256(raw).hexdigest()
        entries.append({"name": path.name, "bytes": size, "header_sha256": h})
        total.update(f"{path.name}\0{size}\0{h}\n".encode())
    return {"sha256": total.hexdigest(), "files": entries}


def check_safetensors(path: str | Path) -> None:
    """Parse a safetensors header (raises CheckpointError naming the file when it is damaged)."""
    read_header(path)
