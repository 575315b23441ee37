"""Tensor parallelism inside a pipeline stage: which slice of each tensor a rank holds (the one split rule of the
bf16 loader and of the quantized folder's per-rank files).

Attention heads and the FFN are split Megatron-style: q/k/v and ffn.0 column-parallel (output rows),
o and ffn.2 row-parallel (input columns, one all-reduce of the output). The q/k RMSNorm spans all heads,
so its weight is split like q/k and its sum of squares is all-reduced. Row-parallel biases live on TP rank 0
(the all-reduce would otherwise add them tp times). Everything else is replicated.
A rank reads each full tensor once (merging the LoRA into it) and keeps only its slice.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_ATTN = r"(?:blocks\.\d+\.(?:self_attn|cross_attn)|audio_injector\.injector\.\d+)"
_COLUMN = re.compile(rf"^(?:{_ATTN}\.[qkv]|blocks\.\d+\.ffn\.0)$")
_ROW = re.compile(rf"^(?:{_ATTN}\.o|blocks\.\d+\.ffn\.2)$")
_NORM = re.compile(rf"^{_ATTN}\.norm_[qk]$")


def module_role(module: str) -> str | None:
    """'column', 'row', 'norm' (q/k RMSNorm, split like q/k) or None (replicated) for a module name."""
    if _COLUMN.match(module):
        return "column"
    if _ROW.match(module):
        return "row"
    if _NORM.match(module):
        return "norm"
    return None


def shard_dim(key: str, ndim: int) -> int | None:
    """The dimension tensor parallelism splits tensor `key` along (its `ndim` dims), None when every rank holds
    it whole. Covers the bf16 checkpoint's tensors and the quantized modules' buffers alike."""
    module, _, tensor = key.rpartition(".")
    role = module_role(module)
    if role in ("column", "norm"):
        return 0 if tensor in ("weight", "bias", "weight_scale", "weight_offset") else None
    if role == "row":
        if tensor == "weight":
            return 1
        if tensor in ("weight_scale", "weight_offset"):  # int4 group scales [out, groups] split with the columns;
            return 1 if ndim == 2 else None  # per-output-channel scales [out] stay whole
        if tensor == "smooth":  # SmoothQuant factors of the input channels
            return 0
    return None


def is_row_bias(key: str) -> bool:
    module, _, tensor = key.rpartition(".")
    return tensor == "bias" and module_role(module) == "row"


def shard_bounds(n: int, rank: int, tp: int, key: str) -> tuple[int, int]:
    if n % tp:
        raise ValueError(f"{key}: dimension {n} is not divisible by tensor-parallel size {tp}")
    step = n // tp
    return rank * step, (rank + 1) * step


def shard_shape(key: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape of one rank's piece of a tensor of `shape`."""
    dim = shard_dim(key, len(shape))
    if dim is None or tp == 1:
        return tuple(shape)
    return tuple(n // tp if d == dim else n for d, n in enumerate(shape))


def tp_slice(key: str, tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's part of a full tensor (or of a safetensors slice object, read lazily)."""
    full = tensor if isinstance(tensor, torch.Tensor) else None
    if tp == 1:
        return full if full is not None else tensor[:]
    shape = list(tensor.shape) if full is not None else tensor.get_shape()
    dim = shard_dim(key, len(shape))
    if dim is not None:
        a, b = shard_bounds(shape[dim], rank, tp, key)
        return tensor[a:b] if dim == 0 else tensor[:, a:b]
    full = full if full is not None else tensor[:]
    if is_row_bias(key) and rank != 0:
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
