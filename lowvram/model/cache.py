"""The streaming state: conditioning cache (reference + motion tokens, text) and per-step noisy KV caches.

Timestep forcing keeps one noisy cache per denoising step: step i of block b attends to the keys and
values the previous blocks produced at *their* step i. Each cache is a ring buffer of one clip.
Layers are keyed by their global index so a pipeline stage holds only its own layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCond:
    """One layer's conditioning keys (after q/k RMSNorm, before RoPE) and values, and its text K/V."""

    cond_k: torch.Tensor  # [Tc, H, hd]
    cond_v: torch.Tensor  # [Tc, H, hd]
    text_k: torch.Tensor  # [text_len, H, hd]
    text_v: torch.Tensor  # [text_len, H, hd]


@dataclass
class CondCache:
    """Filled once per stream by the prefill; shared by all steps."""

    positions: torch.Tensor  # int64 [Tc, 3] RoPE positions of the conditioning tokens (shift 0)
    num_ref_tokens: int  # the first tokens are the reference image; their time position is shifted
    layers: dict[int, LayerCond] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lc in self.layers.values() for t in vars(lc).values())


class StepKV:
    """One denoising step's noisy self-attention cache: a ring buffer of `capacity` tokens per layer."""

    def __init__(self, layers, capacity: int, heads: int, head_dim: int, dtype, device):
        self.capacity = capacity
        self.dtype = dtype
        shape = (capacity, heads, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    def block_rows(self, layer: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring rows (k, v views) that the block at absolute token offset `start` writes."""
        if n > self.capacity:
            raise ValueError(f"block of {n} tokens does not fit a KV cache of {self.capacity}")
        pos = start % self.capacity
        if pos + n > self.capacity:
            raise ValueError("a block must not straddle the end of the KV ring buffer")
        return self.k[layer][pos : pos + n], self.v[layer][pos : pos + n]

    def read(self, layer: int, start: int, n: int, dtype: torch.dtype):
        """All valid rows once the block at `start` (n tokens) is written."""
        valid = min(start + n, self.capacity)
        # An fp8 cache (--kv fp8) is stored at 1 byte per value and widened for the attention kernel.
        return self.k[layer][:valid].to(dtype), self.v[layer][:valid].to(dtype)

    def write_and_read(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store this block's keys/values for absolute token offset `start`; return all valid rows."""
        k_rows, v_rows = self.block_rows(layer, start, k.shape[0])
        k_rows.copy_(k)
        v_rows.copy_(v)
        return self.read(layer, start, k.shape[0], k.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())
