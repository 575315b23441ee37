"""Calibration sets for the quantizer: clip folders (`clips.json`) and the DiT inputs made from them."""

from .clips import Clip, ClipSet, load_clip_set, make_clip_set
from .samples import (
    CalibrationSet, Encoders, RealEncoders, check_samples, load_calibration, load_samples,
    samples_digest, samples_from_clips, save_samples, synthetic_samples,
)

__all__ = [
    "CalibrationSet", "Clip", "ClipSet", "Encoders", "RealEncoders", "check_samples",
    "load_calibration", "load_clip_set", "load_samples", "make_clip_set", "samples_digest", "samples_from_clips",
    "save_samples", "synthetic_samples",
]
