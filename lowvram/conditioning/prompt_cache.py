"""Encoded prompts on disk, so a prompt already seen does not load umT5 (11.4 GB) again."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from lowvram.verified import cache_root


def default_cache_dir() -> Path:
    return cache_root() / "t5_prompts"


class PromptCache:
    """Encoded prompts on disk, one safetensors file per (encoder fingerprint, settings, token ids)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, settings: str, input_ids: torch.Tensor, length: int) -> str:
        h = hashlib.sha256()
        h.update(f"{fingerprint}|{settings}|{length}|".encode())
        h.update(input_ids.reshape(-1)[:length].to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        from safetensors.torch import load_file

        try:
            t = load_file(str(p))["context"]
        except Exception:  # a damaged cache entry is just a miss; it is rewritten
            self.misses += 1
            return None
        self.hits += 1
        return t

    def put(self, key: str, context: torch.Tensor, meta: dict[str, str]):
        from safetensors.torch import save_file

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            os.close(fd)
            save_file({"context": context.detach().to("cpu").contiguous()}, tmp, metadata=meta)
            os.replace(tmp, self.path(key))
        except OSError:  # a read-only cache folder must not break generation
            pass
