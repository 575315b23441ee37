"""The lip-sync proxy, which needs no downloads: the per-frame mouth opening (face-mesh landmarks, in-wheel model)
correlated with the speech envelope over +-15 frame offsets; without the face models, a mouth-region darkness
signal."""

from __future__ import annotations

import numpy as np

from lowvram.benchmarks.metrics.audio import speech_envelope
from lowvram.benchmarks.metrics.faces import FaceModels, track_landmarks
from lowvram.benchmarks.metrics.offsets import SYNC_SECONDS, VSHIFT, best_offset, chance_corr
from lowvram.model.config import FPS

# upper / lower inner lip (13, 14) and the mouth corners (61, 291) of the 468-point mesh
LIP_UP, LIP_DOWN, CORNER_L, CORNER_R = 13, 14, 61, 291


def mouth_aspect_ratio(lm: np.ndarray) -> float:
    width = float(np.linalg.norm(lm[CORNER_L] - lm[CORNER_R]))
    return float(np.linalg.norm(lm[LIP_UP] - lm[LIP_DOWN])) / width if width > 0 else 0.0


def _interp_missing(values: list[float | None]) -> np.ndarray:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    ok = ~np.isnan(v)
    if ok.sum() == 0:
        return v
    idx = np.arange(v.size)
    return np.interp(idx, idx[ok], v[ok])


def mouth_roi_from_image(image: np.ndarray, models: FaceModels | None):
    """Mouth box (pixels) in a reference image: from the mesh when a face is found, else the lower-middle region."""
    h, w = image.shape[:2]
    if models is not None:
        lms = track_landmarks(models, image[None])
        if lms[0] is not None:
            lm = lms[0]
            cx, cy = (lm[CORNER_L] + lm[CORNER_R]) / 2
            half_w = max(4.0, float(np.linalg.norm(lm[CORNER_L] - lm[CORNER_R])) * 0.75)
            return (cx - half_w, cy - half_w * 0.8, cx + half_w, cy + half_w * 0.8), "mesh"
    return (0.35 * w, 0.55 * h, 0.65 * w, 0.78 * h), "fixed"


def mouth_darkness(frames: np.ndarray, roi) -> np.ndarray:
    """Mean darkness (255 - luma) inside the mouth box per frame: an open mouth shows the dark cavity."""
    x0, y0, x1, y1 = (int(round(v)) for v in roi)
    h, w = frames.shape[1:3]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, max(x1, x0 + 1)), min(h, max(y1, y0 + 1))
    patch = frames[:, y0:y1, x0:x1].astype(np.float64)
    luma = 0.299 * patch[..., 0] + 0.587 * patch[..., 1] + 0.114 * patch[..., 2]
    return 255.0 - luma.reshape(len(frames), -1).mean(axis=1)


def lip_sync_proxy(frames: np.ndarray, audio: np.ndarray, reference: np.ndarray | None = None,
                   models: FaceModels | None | str = "auto", max_seconds: float | None = SYNC_SECONDS,
                   max_shift: int = VSHIFT, min_coverage: float = 0.5) -> dict:
    """A lip-sync figure that needs no downloads: the mouth signal against the speech envelope.

    The mouth signal is the mouth aspect ratio from the face mesh when a face is found in at least
    ``min_coverage`` of the frames (gaps interpolated); otherwise the darkness inside a fixed mouth box (from the
    reference image's mesh, or the lower-middle of the frame). ``source`` says which one was used.
    Returns the best offset (frames; positive: the mouth lags the audio), its correlation, the correlation at
    offset 0, the correlation curve and the per-frame signals.
    """
    n = len(frames)
    if max_seconds is not None:
        n = min(n, int(round(max_seconds * FPS)))
    frames = frames[:n]
    env = speech_envelope(audio, n)
    if isinstance(models, str):
        models = FaceModels.load()
    source, coverage, signal = None, 0.0, None
    if models is not None:
        lms = track_landmarks(models, frames)
        coverage = sum(lm is not None for lm in lms) / max(1, n)
        if coverage >= min_coverage:
            signal = _interp_missing([mouth_aspect_ratio(lm) if lm is not None else None for lm in lms])
            source = "mesh-mar"
    if signal is None:
        ref = reference if reference is not None else frames[0]
        if ref.shape[:2] != frames.shape[1:3]:
            from PIL import Image

            ref = np.asarray(Image.fromarray(ref).resize((frames.shape[2], frames.shape[1]), Image.BILINEAR))
        roi, how = mouth_roi_from_image(ref, models)
        signal = mouth_darkness(frames, roi)
        source = f"mouth-darkness ({how} box)"
    res = best_offset(signal, env, max_shift=max_shift)
    res["chance_corr"] = chance_corr(signal, env, max_shift=max_shift)
    res.update(source=source, face_coverage=coverage, frames=n, mouth=signal.tolist(), envelope=env.tolist(),
               face_models=models is not None)
    return res
