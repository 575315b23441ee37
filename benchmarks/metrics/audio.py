"""The speech signals the lip-sync scores use: the RMS envelope per video frame and SyncNet's MFCCs."""

from __future__ import annotations

import math

import numpy as np

from lowvram.model.config import FPS

AUDIO_RATE = 16000
SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640


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
