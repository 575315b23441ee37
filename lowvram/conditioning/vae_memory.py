"""Computed (not measured) device memory of the Wan2.1 VAE at one resolution: what `plan` budgets for its encode
and streaming decode."""

from __future__ import annotations

import torch

from lowvram.conditioning.vae_config import MOTION_FRAMES, VAEConfig

CACHE_T = 2  # input frames every causal conv keeps between calls


def _res_transient(ci: int, co: int, T: int, h: int, w: int, b: int) -> int:
    """Live bytes at the worst moment of one residual block (input, shortcut, SiLU output, the cache-
    concatenated input, its zero-padded copy and the conv output; fp32 norm temporary for half types)."""
    P, Pp = h * w, (h + 2) * (w + 2)
    worst = 0
    for c_in, c_out in ((ci, co), (co, co)):
        live = ci * T * P * b + (co * T * P * b if ci != co else 0) + c_in * T * P * b
        # padded input + (cache-concatenated input | output) + a convolution workspace of about the padded
        # input's size (what cuDNN's implicit-GEMM algorithms took in the H100 measurement)
        conv = 2 * c_in * (T + 2) * Pp * b + max(c_in * (T + 2) * P * b, c_out * T * P * b)
        norm = c_in * T * P * 4 if b < 4 else 0
        worst = max(worst, live + max(conv, norm))
    return worst


def _up_transient(C: int, T: int, h: int, w: int, b: int, temporal: bool) -> int:
    """Live bytes of one upsampler: the (time-doubled) input, the nearest x2 copy in fp32 (plus its cast
    back for half types) and the Conv2d output (C/2 channels)."""
    T2 = 2 * T if temporal else T
    P, P4 = h * w, 4 * h * w
    time_conv = (C * T * P + 2 * C * T * P) * b if temporal else 0
    up = C * T * P * b + C * T2 * P * b + C * T2 * P4 * 4 + (C * T2 * P4 * b if b < 4 else 0) + C // 2 * T2 * P4 * b
    return max(time_conv, up)


def _down_transient(C: int, T: int, h: int, w: int, b: int) -> int:
    """Live bytes of one spatial downsampler: input, frame-major copy, padded copy, stride-2 output."""
    P = h * w
    return C * T * P * b * 2 + C * T * (h + 1) * (w + 1) * b + C * T * (P // 4) * b


def _attn_transient(C: int, h: int, w: int, b: int) -> int:
    """Middle attention of one frame: qkv (3C), contiguous copy, scores+softmax in fp32 (math kernel)."""
    P = h * w
    return 2 * 3 * C * P * b + 2 * P * P * 4 + C * P * b


def decode_working_set(c: VAEConfig, b: int, H: int, W: int) -> tuple[int, int]:
    """(persistent feature caches, largest transient) in bytes of the streaming decoder at H x W pixels, one latent
    (4 output frames) in flight, `b` bytes per element."""
    d, mult, nres = c.dim, list(c.dim_mult), c.num_res_blocks
    h, w, T = H // 8, W // 8, 1
    dims = [mult[-1] * d] + [m * d for m in reversed(mult)]
    caches = CACHE_T * c.z_dim * h * w * b                       # conv_in
    peak = _res_transient(c.z_dim, dims[0], T, h, w, b)
    caches += 4 * CACHE_T * dims[0] * h * w * b                   # middle: 2 residual blocks
    peak = max(peak, _res_transient(dims[0], dims[0], T, h, w, b), _attn_transient(dims[0], h, w, b))
    up = list(reversed(c.temperal_downsample))
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if i > 0 else cin
        for r in range(nres + 1):
            ci = cin if r == 0 else cout
            caches += CACHE_T * (ci + cout) * h * w * b
            peak = max(peak, _res_transient(ci, cout, T, h, w, b))
        if i != len(mult) - 1:
            if up[i]:
                caches += CACHE_T * cout * h * w * b
            peak = max(peak, _up_transient(cout, T, h, w, b, up[i]))
            T, h, w = (2 * T if up[i] else T), 2 * h, 2 * w
    caches += CACHE_T * dims[-1] * h * w * b                      # head conv
    peak = max(peak, _res_transient(dims[-1], 3, T, h, w, b))
    return caches, peak


def encode_working_set(c: VAEConfig, b: int, H: int, W: int) -> tuple[int, int]:
    """(caches of one encode call plus its 73-frame input clip, largest transient) in bytes of the encoder at H x W
    pixels, 4-frame chunks, `b` bytes per element."""
    d, mult, nres = c.dim, list(c.dim_mult), c.num_res_blocks
    h, w, T = H, W, 4
    dims = [d] + [m * d for m in mult]
    caches = CACHE_T * 3 * h * w * b + 3 * MOTION_FRAMES * H * W * b  # conv_in + the 73-frame input clip
    peak = _res_transient(3, d, T, h, w, b)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for r in range(nres):
            ci = cin if r == 0 else cout
            caches += CACHE_T * (ci + cout) * h * w * b
            peak = max(peak, _res_transient(ci, cout, T, h, w, b))
        if i != len(mult) - 1:
            peak = max(peak, _down_transient(cout, T, h, w, b))
            h, w = h // 2, w // 2
            if c.temperal_downsample[i]:
                caches += cout * h * w * b                        # last frame kept by the time conv
                T = max(1, T // 2)
    caches += 5 * CACHE_T * dims[-1] * h * w * b                  # middle (4 convs) + head conv
    peak = max(peak, _attn_transient(dims[-1], h, w, b))
    return caches, peak


def vae_memory_bytes(height: int = 384, width: int = 704, config: VAEConfig | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Computed (not measured) device memory of the VAE at one resolution, batch 1, in bytes.

    decode (streaming, one latent in flight = 4 output frames): weights + persistent feature caches
    (the last 2 input frames of every causal conv, kept across calls) + the largest transient of one
    layer. encode (4-frame chunks): the same for the encoder (its caches live for one encode call).
    Convolution workspaces are modelled as one padded-input copy; allocator slack is not included.

    At 704x384 this gives (GiB) bf16: decode 2.97 (weights 0.24 + caches 1.19 + transient 1.55), encode
    2.32; fp32: decode 5.39, encode 4.64. Measured on an H100 (torch 2.11, cuDNN; tests/test_cuda.py):
    bf16 decode 3.12 (caches 1.19), encode 2.52; fp32 decode 6.25, encode 5.05 — the computed figures
    are 5-15 % low (cuDNN algorithm workspaces vary).
    """
    c = config or VAEConfig.wan21()
    b = torch.empty((), dtype=dtype).element_size()
    weights = c.num_params() * b
    out = {"weights": weights, "dtype_bytes": b}
    for name, working_set in (("decode", decode_working_set), ("encode", encode_working_set)):
        caches, peak = working_set(c, b, height, width)
        out[f"{name}_caches"] = caches
        out[f"{name}_transient"] = peak
        out[f"{name}_peak"] = weights + caches + peak
    return out
