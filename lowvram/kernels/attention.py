"""fp8 attention for Hopper/Ada: Q·Kᵀ on fp8 tensor cores, P·V in bf16, over two key segments in one launch.

The streaming DiT attends 3,168 queries to 12,672 cached + 2,640 conditioning keys per layer; attention is about
a third of the FLOPs and, once the GEMMs are fp8, half the time. This kernel
  * quantizes q per (token, head) to e4m3 (the softmax scale folded into that scale),
  * reads K as e4m3 — straight from an fp8 KV cache (`--kv fp8`, stored at scale 1) or cast per (token, head),
  * computes the scores in fp8 with fp32 accumulation, the online softmax in fp32 (exp2), and P·V in bf16,
  * walks the cached segment and the conditioning segment in the same loop, so nothing is concatenated.
The error it adds is measured in benchmarks/fullsize.py (`attention` line) and tests/test_cuda.py.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the kernel is GPU-only
    triton = None

FP8 = torch.float8_e4m3fn
LOG2E = 1.4426950408889634


def quantize_rows_fp8(x: torch.Tensor, extra_scale: float = 1.0):
    """x [N, H, D] -> (e4m3 [N, H, D], fp32 scale [N, H]) with x ~= x8 * scale / extra_scale."""
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-6)
    scale = amax / 448.0
    x8 = (x.float() / scale[..., None]).to(FP8)
    return x8, scale * extra_scale


if triton is not None:

    @triton.jit
    def _segment(acc, m_i, l_i, q, qs, k_ptr, v_ptr, ks_ptr, n_keys, stride_kn, stride_vn, stride_ksn, head,
                 offs_d, HAS_KS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        for start in range(0, n_keys, BLOCK_N):
            rows = start + offs_n
            valid = rows < n_keys
            k = tl.load(k_ptr + rows[:, None] * stride_kn + head * D + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qs[:, None]
            if HAS_KS:
                ks = tl.load(ks_ptr + rows * stride_ksn + head, mask=valid, other=0.0)
                s = s * ks[None, :]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + rows[:, None] * stride_vn + head * D + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _fp8_attention_kernel(q_ptr, qs_ptr, o_ptr,
                              k1_ptr, v1_ptr, ks1_ptr, n1,
                              k2_ptr, v2_ptr, ks2_ptr, n2,
                              n_q, stride_qn, stride_qsn, stride_on,
                              stride_k1n, stride_v1n, stride_ks1n, stride_k2n, stride_v2n, stride_ks2n,
                              HAS_KS1: tl.constexpr, HAS_KS2: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        qmask = offs_m < n_q
        q = tl.load(q_ptr + offs_m[:, None] * stride_qn + head * D + offs_d[None, :], mask=qmask[:, None], other=0.0)
        qs = tl.load(qs_ptr + offs_m * stride_qsn + head, mask=qmask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        acc, m_i, l_i = _segment(acc, m_i, l_i, q, qs, k1_ptr, v1_ptr, ks1_ptr, n1, stride_k1n, stride_v1n,
                                 stride_ks1n, head, offs_d, HAS_KS1, BLOCK_N, D)
        acc, m_i, l_i = _segment(acc, m_i, l_i, q, qs, k2_ptr, v2_ptr, ks2_ptr, n2, stride_k2n, stride_v2n,
                                 stride_ks2n, head, offs_d, HAS_KS2, BLOCK_N, D)
        out = acc / l_i[:, None]
        tl.store(o_ptr + offs_m[:, None] * stride_on + head * D + offs_d[None, :], out.to(tl.bfloat16),
                 mask=qmask[:, None])


def _as_fp8_keys(k: torch.Tensor):
    """(e4m3 keys, per (token, head) scale or None): an fp8 cache is read as it is stored (scale 1)."""
    if k.dtype == FP8:
        return k, None
    return quantize_rows_fp8(k)


def fp8_attention(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], block_m: int = 128,
                  block_n: int = 64, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v over the union of one or two key segments. q [L, H, D]; k/v [N, H, D]
    (bf16 or e4m3). Returns [L, H*D] bf16."""
    if triton is None or not q.is_cuda:
        raise RuntimeError("fp8 attention needs a CUDA GPU with Triton")
    if len(parts) not in (1, 2):
        raise ValueError("fp8 attention takes one or two key segments")
    n_q, heads, d = q.shape
    q8, qs = quantize_rows_fp8(q, extra_scale=LOG2E / math.sqrt(d))
    segs = []
    for k, v in parts:
        k8, ks = _as_fp8_keys(k)
        v = v if v.dtype in (torch.bfloat16, FP8) else v.to(torch.bfloat16)
        segs.append((k8.contiguous(), v.contiguous(), ks))
    if len(segs) == 1:
        k8, v, ks = segs[0]
        segs.append((k8[:0], v[:0], ks[:0] if ks is not None else None))
    out = torch.empty(n_q, heads, d, device=q.device, dtype=torch.bfloat16)
    (k1, v1, ks1), (k2, v2, ks2) = segs
    dummy = qs  # placeholder pointer for an absent scale tensor
    grid = (triton.cdiv(n_q, block_m), heads)
    _fp8_attention_kernel[grid](
        q8, qs, out,
        k1, v1, ks1 if ks1 is not None else dummy, k1.shape[0],
        k2, v2, ks2 if ks2 is not None else dummy, k2.shape[0],
        n_q, q8.stride(0), qs.stride(0), out.stride(0),
        k1.stride(0), v1.stride(0), ks1.stride(0) if ks1 is not None else 0,
        k2.stride(0), v2.stride(0), ks2.stride(0) if ks2 is not None else 0,
        HAS_KS1=ks1 is not None, HAS_KS2=ks2 is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, D=d, num_warps=num_warps, num_stages=num_stages,
    )
    return out.flatten(1)
