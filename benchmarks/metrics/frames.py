"""Frame fidelity: PSNR and SSIM per frame, and the relative error of the saved block latents."""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP = 100.0  # dB reported for identical frames (upstream's evaluation uses the same cap)


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images (any shape); identical images give PSNR_CAP."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(data_range**2 / mse))


def _box_sums(x: np.ndarray, win: int) -> np.ndarray:
    """Sum over every win x win window lying fully inside x ([H, W]) -> [H-win+1, W-win+1]."""
    c = np.cumsum(np.cumsum(x, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    return c[win:, win:] - c[:-win, win:] - c[win:, :-win] + c[:-win, :-win]


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float, win: int) -> float:
    n = win * win
    mx, my = _box_sums(x, win) / n, _box_sums(y, win) / n
    mxx, myy, mxy = _box_sums(x * x, win) / n, _box_sums(y * y, win) / n, _box_sums(x * y, win) / n
    cov_norm = n / (n - 1)  # sample covariance, as scikit-image's default
    vx, vy, vxy = cov_norm * (mxx - mx * mx), cov_norm * (myy - my * my), cov_norm * (mxy - mx * my)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def ssim(a, b, data_range: float = 255.0, win: int = 7) -> float:
    """Structural similarity of two [H, W] or [H, W, C] images.

    Same definition as ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255)`` with its
    defaults: a win x win uniform window, sample (N-1) covariance, K1 = 0.01, K2 = 0.03, the mean over the
    windows that lie inside the image, then over channels.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if min(a.shape[0], a.shape[1]) < win:
        raise ValueError(f"ssim: image {a.shape[1]}x{a.shape[0]} is smaller than the {win}x{win} window")
    return float(np.mean([_ssim_channel(a[..., c], b[..., c], data_range, win) for c in range(a.shape[-1])]))


def frame_metrics(base: np.ndarray, cand: np.ndarray) -> dict:
    """Per-frame PSNR and SSIM of two uint8 [T, H, W, 3] videos (the shorter length is used)."""
    t = min(len(base), len(cand))
    if t == 0:
        raise ValueError("frame_metrics: a video has no frames")
    if base.shape[1:] != cand.shape[1:]:
        raise ValueError(f"frame_metrics: frame sizes differ {base.shape[1:3]} vs {cand.shape[1:3]}")
    p = [psnr(base[i], cand[i]) for i in range(t)]
    s = [ssim(base[i], cand[i]) for i in range(t)]
    return {"frames": t, "psnr": p, "ssim": s}


def latent_rel_error(base: dict, cand: dict) -> dict:
    """``||c - b|| / ||b||`` per block and over all blocks, for two {name: tensor} dicts of block latents."""
    per_block, num, den = {}, 0.0, 0.0
    for key in sorted(set(base) & set(cand)):
        b = np.asarray(base[key], dtype=np.float64)
        c = np.asarray(cand[key], dtype=np.float64)
        if b.shape != c.shape:
            raise ValueError(f"latent {key}: shapes differ {b.shape} vs {c.shape}")
        d2, b2 = float(((c - b) ** 2).sum()), float((b**2).sum())
        per_block[key] = math.sqrt(d2 / b2) if b2 > 0 else (0.0 if d2 == 0 else float("inf"))
        num, den = num + d2, den + b2
    if not per_block:
        raise ValueError("latent_rel_error: the two runs share no block latents")
    overall = math.sqrt(num / den) if den > 0 else 0.0
    return {"overall": overall, "per_block": [per_block[k] for k in sorted(per_block)], "blocks": sorted(per_block)}

