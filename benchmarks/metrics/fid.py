"""FID: the Fréchet distance between InceptionV3 pool3 features of two frame sets (upstream: pytorch-fid, dims
2048), with the weights ``pt_inception-2015-12-05-6726825d.pth`` from a local file or the torch hub cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowvram.benchmarks.metrics.inception import build_inception
from lowvram.benchmarks.metrics.weights import find_weights, load_into, load_state_dict

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_ENV = "LOWVRAM_FID_WEIGHTS"


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N-1)-normalised covariance of [N, D] features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats: need [N>=2, D] features, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance of two Gaussians: ``|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is computed as ``tr((R S2 R)^(1/2))`` with ``R = S1^(1/2)`` (same eigenvalues, and the
    matrix is symmetric PSD), so rank-deficient covariances (fewer samples than dimensions) need no jitter.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt))


def frechet_distance_of(features_a, features_b) -> float:
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def find_fid_weights(given=None) -> Path:
    return find_weights(given, FID_WEIGHTS_ENV, [FID_WEIGHTS, "inception_v3_google-*.pth"], "FID",
                        "the InceptionV3 FID weights published with pytorch-fid, 91 MB", "--fid-weights")


def load_inception(weights: Path, device: str = "cpu"):
    """The feature network with its weights; torchvision's ImageNet file (fc of 1000 classes) gets its own variant."""
    sd = load_state_dict(Path(weights), "InceptionV3")
    fc = sd.get("fc.weight")
    # torchvision's ImageNet file: 1000 classes and the auxiliary head; the FID file: 1008 classes, no aux head
    fid_variant = not ((fc is not None and fc.shape[0] == 1000) or "AuxLogits.fc.weight" in sd)
    model = build_inception(fid=fid_variant)
    load_into(model, sd, Path(weights), "InceptionV3", strip=("module.",))
    model.variant = "fid" if fid_variant else "torchvision"
    return model.eval().to(device)


def inception_features(model, frames: np.ndarray, device: str = "cpu", batch: int = 16) -> np.ndarray:
    """[N, 2048] pool3 features of uint8 [N, H, W, 3] RGB frames (scaled to [0, 1], bilinear 299x299)."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(frames), batch):
            x = torch.from_numpy(np.ascontiguousarray(frames[i:i + batch])).to(device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            out.append(model(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048))

