"""Upstream's float32 autocast regions with bf16 weights: a GEMM in the input's precision, no float32 copy kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F

UPCAST_BYTES = 2**26  # float32 weight rows upcast at a time by linear_like_input (64 MiB)


def linear_like_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear computed in x's dtype: a float32 input meets the (bf16) weights upcast, some output rows at a
    time (bf16 values are exact in float32; no float32 copy is kept, the transient stays under UPCAST_BYTES)."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    rows = max(1, UPCAST_BYTES // (weight.shape[1] * x.element_size()))
    outs = [F.linear(x, weight[i:i + rows].to(x.dtype), None if bias is None else bias[i:i + rows].to(x.dtype))
            for i in range(0, weight.shape[0], rows)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
