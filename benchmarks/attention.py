"""Attention kernels at the steady-state shape: 3168 queries x (12,672 cached + 2,640 conditioning) keys, 40 heads.

    PYTHONPATH=. python benchmarks/attention.py

cuDNN / flash / memory-efficient SDPA on concatenated keys, our two-segment cuDNN merge, the fp8 Triton kernel
(lowvram/kernels/attention.py) with bf16 and fp8 (`--kv fp8`) caches, and SageAttention's int8 Q·Kᵀ kernel
(`pip install sageattention`, when installed), with the error each adds vs exact bf16 SDPA.
"""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.fullsize import cuda_time
from lowvram.kernels.attention import FP8, fp8_attention
from lowvram.model.dit import attention, attention_parts

L, N1, N2, H, D = 3168, 12672, 2640, 40, 128


def main():
    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU")
    g = torch.Generator("cuda").manual_seed(0)
    # q/k after RMSNorm are O(1) per channel; scale so the softmax is neither flat nor one-hot
    q = torch.randn(L, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(N1 + N2, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(N1 + N2, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    exact = attention(q.float(), k.float(), v.float())
    parts = [(k[:N1], v[:N1]), (k[N1:], v[N1:])]
    parts8 = [(k[:N1].to(FP8), v[:N1].to(FP8)), (k[N1:], v[N1:])]
    flops = 4 * L * (N1 + N2) * H * D
    res = {}

    def record(name, fn):
        out = fn()
        ms = cuda_time(fn, 3, 10)
        err = (out.float() - exact).abs()
        res[name] = {"ms": round(ms, 3), "TFLOP/s": round(flops / ms / 1e9, 1),
                     "max_abs_err": round(err.max().item(), 5), "mean_abs_err": round(err.mean().item(), 6)}
        print(name, json.dumps(res[name]), flush=True)

    record("sdpa (default, concatenated keys)", lambda: attention(q, k, v))
    record("two-segment cuDNN + lse merge", lambda: attention_parts(q, parts))
    for bm, bn, w, st in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)]:
        tag = f"BM{bm} BN{bn} w{w} s{st}"
        try:
            record(f"fp8 Triton, bf16 cache, {tag}",
                   lambda: fp8_attention(q, parts, block_m=bm, block_n=bn, num_warps=w, num_stages=st))
            record(f"fp8 Triton, fp8 cache, {tag}",
                   lambda: fp8_attention(q, parts8, block_m=bm, block_n=bn, num_warps=w, num_stages=st))
        except Exception as err:  # noqa: BLE001 - a config that doesn't compile is reported, not fatal
            print(tag, "failed:", str(err).splitlines()[0][:200], flush=True)
    try:
        from sageattention import sageattn
    except ImportError:
        print("sageattention not installed: skipped", flush=True)
    else:
        kc, vc = k[None].transpose(1, 2), v[None].transpose(1, 2)
        record("SageAttention int8 Q·Kᵀ (package), concatenated keys",
               lambda: sageattn(q[None].transpose(1, 2), kc, vc, tensor_layout="HND")[0].transpose(0, 1).flatten(1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
