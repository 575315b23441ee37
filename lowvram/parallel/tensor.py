"""Tensor parallelism inside a pipeline stage: which slice of each real checkpoint tensor a rank holds.

Attention heads and the FFN are split Megatron-style: q/k/v and ffn.0 column-parallel (output rows),
o and ffn.2 row-parallel (input columns, one all-reduce of the output). The q/k RMSNorm spans all heads,
so its weight is split like q/k and its sum of squares is all-reduced. Row-parallel biases live on TP rank 0
(the all-reduce would otherwise add them tp times). Everything else is replicated.
A rank slices while it reads (safetensors `get_slice`), so it never holds another rank's weights.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_ATTN = r"(?:blocks\.\d+\.(?:self_attn|cross_attn)|audio_injector\.injector\.\d+)"
_COLUMN = re.compile(rf"^(?:{_ATTN}\.[qkv]|blocks\.\d+\.ffn\.0)$")
_ROW = re.compile(rf"^(?:{_ATTN}\.o|blocks\.\d+\.ffn\.2)$")
_NORM = re.compile(rf"^{_ATTN}\.norm_[qk]$")
_PER_TENSOR = ("act_scale", "act_scales")  # static fp8 activation scales: one per layer (and step)


def module_role(module: str) -> str | None:
    """'column', 'row', 'norm' (q/k RMSNorm, split like q/k) or None (replicated) for a module name."""
    if _COLUMN.match(module):
        return "column"
    if _ROW.match(module):
        return "row"
    if _NORM.match(module):
        return "norm"
    return None


def split_kind(key: str) -> str:
    """'column' (dim 0), 'row' (dim 1, or dim 0 of a 1-D smooth vector), 'row_bias', 'row_scale' or 'replicated'."""
    module, _, tensor = key.rpartition(".")
    role = module_role(module)
    if role is None or tensor in _PER_TENSOR:
        return "replicated"
    if role in ("column", "norm"):
        return "column"
    return {"bias": "row_bias", "weight_scale": "row_scale"}.get(tensor, "row")


def shard_bounds(n: int, rank: int, tp: int, key: str) -> tuple[int, int]:
    if n % tp:
        raise ValueError(f"{key}: dimension {n} is not divisible by tensor-parallel size {tp}")
    step = n // tp
    return rank * step, (rank + 1) * step


def tp_slice(key: str, tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's part of a full tensor (or of a safetensors slice object, read lazily)."""
    if tp == 1:
        return tensor[:] if not isinstance(tensor, torch.Tensor) else tensor
    kind = split_kind(key)
    shape = tensor.get_shape() if hasattr(tensor, "get_shape") else list(tensor.shape)
    if kind == "column":
        a, b = shard_bounds(shape[0], rank, tp, key)
        return tensor[a:b]
    if kind == "row":
        if len(shape) == 1:  # SmoothQuant factors of the input channels
            a, b = shard_bounds(shape[0], rank, tp, key)
            return tensor[a:b]
        a, b = shard_bounds(shape[1], rank, tp, key)
        return tensor[:, a:b]
    if kind == "row_scale":
        # per-output-channel scales (1-D) stay whole; int4 group scales [out, groups] split with the columns
        if len(shape) == 1:
            return tensor[:]
        a, b = shard_bounds(shape[1], rank, tp, key)
        return tensor[:, a:b]
    full = tensor[:] if not isinstance(tensor, torch.Tensor) else tensor
    if kind == "row_bias" and rank != 0:
        return torch.zeros_like(full)
    return full


def set_tp_group(model: nn.Module, group) -> None:
    """Wire the all-reduces: RMSNorm sums of squares and row-parallel outputs."""
    from lowvram.model.dit import Attention, FeedForward

    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.reduce_group = group
            mod.norm_q.group = group
            mod.norm_k.group = group
        elif isinstance(mod, FeedForward):
            mod.reduce_group = group
