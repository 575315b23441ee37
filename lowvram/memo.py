"""Results kept between runs by a long-lived caller (`lowvram ui`'s session): the DiT, the warmed-up VAE decoder,
an image's latents, a prompt's embedding, keyed by what they were computed from."""

from __future__ import annotations

from pathlib import Path

import torch


def memoized(memo: dict | None, key: tuple, compute, keep: int):
    """compute(), or its result from an earlier run when a long-lived caller (`lowvram ui`'s session) passes the
    same `memo` dict to every run (opts.extra["memo"]). At most `keep` results of one kind (key[0]) are kept; the
    oldest are dropped before computing a new one, so a model is freed before the next one loads."""
    if memo is None:
        return compute()
    if key not in memo:
        same_kind = [k for k in memo if k[0] == key[0]]
        for old in same_kind[: max(0, len(same_kind) - keep + 1)]:
            del memo[old]
        memo[key] = compute()
    return memo[key]


def file_identity(path: Path) -> tuple:
    """A file or folder as a memo key: its path and the size and mtime of it (a folder: of its files)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else []
    return str(path), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def tensor_digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
