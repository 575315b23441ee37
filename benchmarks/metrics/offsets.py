"""The audio-video offset search both lip-sync scores share: upstream's SyncNet settings (+-15 frames, first 5 s)
and the best-offset correlation of a mouth signal with the speech envelope."""

from __future__ import annotations

import math

import numpy as np

VSHIFT = 15  # offsets searched, in frames, both ways (upstream's SyncNet setting)
SYNC_SECONDS = 5.0  # upstream scores only the first 5 s


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either signal is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def best_offset(mouth: np.ndarray, envelope: np.ndarray, max_shift: int = VSHIFT, min_overlap: int = 10) -> dict:
    """The shift k (frames) maximising corr(mouth[t], envelope[t - k]); positive k: the mouth lags the audio.

    This is SyncNet's sign convention (its "AV offset"). Shifts leaving fewer than ``min_overlap`` frames are skipped.
    """
    m, e = np.asarray(mouth, dtype=np.float64), np.asarray(envelope, dtype=np.float64)
    n = min(m.size, e.size)
    m, e = m[:n], e[:n]
    curve = {}
    for k in range(-max_shift, max_shift + 1):
        lo, hi = max(0, k), min(n, n + k)  # t in [lo, hi): t - k in [0, n)
        if hi - lo < min_overlap:
            continue
        curve[k] = correlation(m[lo:hi], e[lo - k:hi - k])
    if not curve:
        raise ValueError(f"best_offset: {n} frames are too few for the offset search (need {min_overlap})")
    k = max(curve, key=lambda s: (curve[s], -abs(s)))
    return {"offset": int(k), "corr": curve[k], "corr_at_0": curve.get(0, 0.0),
            "curve": {"offsets": list(curve), "corr": [curve[s] for s in curve]}}


def chance_corr(mouth: np.ndarray, envelope: np.ndarray, max_shift: int = VSHIFT, tries: int = 16) -> float:
    """What the best-offset correlation reaches by chance: its median over circular rotations of the envelope
    (same spectrum, timing destroyed). A best-offset r near this value means no evidence of lip sync."""
    n = min(len(mouth), len(envelope))
    e = np.asarray(envelope, dtype=np.float64)[:n]
    lo, hi = max(1, n // 4), max(1, n - n // 4)
    shifts = sorted({int(v) for v in np.linspace(lo, hi, tries)})
    best = []
    for r in shifts:
        try:
            best.append(best_offset(mouth[:n], np.roll(e, r), max_shift=max_shift)["corr"])
        except ValueError:
            continue
    return float(np.median(best)) if best else 0.0
