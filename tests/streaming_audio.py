"""The chunked mode of the audio front end, kept beside its tests (`lowvram run` uses the exact whole-file mode of
lowvram/conditioning/audio.py): block n's features from a bounded audio window.

Memory (H100, randomly initialised wav2vec2-large-xlsr-53 layout, bf16, above the weights): 117 MiB for 10 s,
60 s or 600 s of audio with 2 s look-ahead and 4 s context (the whole-file lean path: 161 MiB, 413 MiB, 1.6 GiB).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from lowvram.conditioning.audio import (
    FRAMES_PER_BLOCK, NORM_EPS, W2V_FIELD, W2V_RATE, W2V_STRIDE, Wav2Vec2Encoder, check_audio, decode_audio,
    frame_columns, num_30fps_frames, num_clips, num_w2v_frames,
)
from lowvram.model.config import FPS, INFER_FRAMES


class StreamingAudioFeatures:
    """Per-block features computed from a bounded audio window (context behind, look-ahead in front).

    Block n needs 30 Hz columns ``round(1.2 k)`` for its frames k; this runs wav2vec2 only on the
    16 kHz samples from ``context_s`` before the first to ``lookahead_s`` after the last wav2vec2
    frame those columns interpolate, so block n reads audio up to ``(12 n + 12) / 25 s +
    lookahead_s`` and never the rest of the file. Peak memory and compute per block are bounded by
    the window, not by the clip length.

    What changes at chunk edges: wav2vec2 is **bidirectional**. Every transformer layer attends over
    the whole input and the convolutional positional embedding (kernel 128 frames = 2.6 s on the
    real model, zero-padded at the input's ends) mixes neighbours, so in the whole-file mode each
    feature depends on all the audio, and here only on the window. Features near a window edge see
    zero padding instead of real neighbours, and the whole-clip normalisation
    (``(x - mean) / std``) becomes a running one over the audio read so far (up to the window's
    end). The result therefore differs from the exact whole-file mode; the difference shrinks as
    ``context_s`` and ``lookahead_s`` grow and is zero when the window covers the whole file. The
    time grid (``T50``, ``T30``, number of clips) still comes from the file's full length, which
    is known from the container without decoding ahead. ``file_norm=True`` uses the whole file's
    statistics instead (exact normalisation, but it reads the whole file once).

    Measured with the fixture's tiny random wav2vec2 (4 layers, pos-conv kernel 16) on 3-12 s of
    speech, max-abs difference to the whole-file features (whose max-abs is about 5-6): 0.05-0.38
    with 2 s look-ahead / 4 s context, 0.5-0.7 with 1 s / 2 s, about 1 with 0.5 s / 1 s; a random
    model attends more globally than a trained one, so take these as an upper bound to re-measure
    with the real checkpoint.
    """

    def __init__(self, wave: np.ndarray, encoder: Wav2Vec2Encoder, lookahead_s: float = 2.0,
                 context_s: float = 4.0, fps: int = FPS, infer_frames: int = INFER_FRAMES,
                 dtype: torch.dtype | None = None, file_norm: bool = False):
        check_audio(wave)
        self.wave = np.asarray(wave, dtype=np.float32)
        self.encoder = encoder
        self.lookahead = int(round(lookahead_s * W2V_RATE))  # in wav2vec2 frames
        self.context = int(round(context_s * W2V_RATE))
        self.fps = fps
        self.infer_frames = infer_frames
        self.dtype = dtype or encoder.dtype
        self.t50 = num_w2v_frames(self.wave.shape[0])
        self.t30 = num_30fps_frames(self.t50)
        self.num_clips = num_clips(self.t30, infer_frames, fps)
        self.num_frames = self.num_clips * infer_frames
        self.num_blocks = self.num_frames // FRAMES_PER_BLOCK
        self.num_samples = int(self.wave.shape[0])
        self._sums = (0, 0.0, 0.0)  # running (samples, sum, sum of squares) for the causal normalisation
        self.file_norm = file_norm
        if file_norm:  # the exact whole-file statistics (reads the whole file once, cheap)
            mean = self.wave.mean()
            self._file_stats = (mean, np.sqrt(self.wave.var() + NORM_EPS))
        self.last_window: tuple[int, int] = (0, 0)  # samples [a, b) read for the last block

    @property
    def num_states(self) -> int:
        return self.encoder.num_states

    @property
    def dim(self) -> int:
        return self.encoder.hidden_size

    def _running_stats(self, end: int) -> tuple[float, float]:
        """Mean and ``sqrt(var + 1e-7)`` of samples ``[0, end)``, extended incrementally (float64)."""
        n, s1, s2 = self._sums
        if end < n:  # went back: start over
            n, s1, s2 = 0, 0.0, 0.0
        chunk = self.wave[n:end].astype(np.float64)
        n, s1, s2 = end, s1 + float(chunk.sum()), s2 + float(np.dot(chunk, chunk))
        self._sums = (n, s1, s2)
        mean = s1 / n
        return mean, math.sqrt(max(s2 / n - mean * mean, 0.0) + NORM_EPS)

    def _positions(self, cols: np.ndarray) -> np.ndarray:
        # 30 Hz column j sits at 50 Hz position j * (T50 - 1) / (T30 - 1), computed in float32 as F.interpolate does
        scale = np.float32(self.t50 - 1) / np.float32(self.t30 - 1) if self.t30 > 1 else np.float32(0.0)
        return cols.astype(np.float32) * scale

    def frames(self, start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= self.num_frames:
            raise IndexError(f"frames [{start}, {stop}) outside [0, {self.num_frames})")
        cols = frame_columns(self.num_frames, self.fps)[start:stop]
        out = torch.zeros(self.num_states, stop - start, self.dim, dtype=self.dtype, device=self.encoder.device)
        ok = cols < self.t30
        if not ok.any():
            self.last_window = (0, 0)
            return out.permute(0, 2, 1).unsqueeze(0)
        pos = self._positions(cols[ok])
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, self.t50 - 1)
        f0 = max(0, int(lo.min()) - self.context)
        f1 = min(self.t50, int(hi.max()) + 1 + self.lookahead)  # 50 Hz frames [f0, f1)
        a = f0 * W2V_STRIDE
        # the last window runs to the end of the file (samples past the last full frame count in the statistics)
        b = self.num_samples if f1 == self.t50 else (f1 - 1) * W2V_STRIDE + W2V_FIELD
        self.last_window = (a, b)
        seg = self.wave[a:b]
        if self.encoder.do_normalize:
            if self.file_norm:
                mean, std = self._file_stats
            else:  # statistics of everything read so far: samples [0, b)
                mean, std = self._running_stats(b)
            seg = ((seg - np.float32(mean)) / np.float32(std)).astype(np.float32)
        hidden = self.encoder.hidden_states(seg)  # [L+1, f1 - f0, H]
        lam = torch.as_tensor(pos - lo, dtype=torch.float32, device=hidden.device).view(1, -1, 1)
        x0 = hidden[:, torch.as_tensor(lo - f0, device=hidden.device)].float()
        x1 = hidden[:, torch.as_tensor(hi - f0, device=hidden.device)].float()
        out[:, torch.as_tensor(ok, device=out.device)] = ((1 - lam) * x0 + lam * x1).to(self.dtype)
        return out.permute(0, 2, 1).unsqueeze(0)

    def block(self, block_index: int, frames_per_block: int = FRAMES_PER_BLOCK) -> torch.Tensor:
        start = block_index * frames_per_block
        return self.frames(start, start + frames_per_block)


def streaming_audio_features(path: str | os.PathLike, wav2vec_dir: str | os.PathLike | Wav2Vec2Encoder,
                             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                             lookahead_s: float = 2.0, context_s: float = 4.0) -> StreamingAudioFeatures:
    """Chunked mode: decode the file, compute each block's features lazily from a bounded window."""
    wave = decode_audio(path)
    check_audio(wave, str(path))
    enc = wav2vec_dir if isinstance(wav2vec_dir, Wav2Vec2Encoder) else Wav2Vec2Encoder(wav2vec_dir, device, dtype)
    return StreamingAudioFeatures(wave, enc, lookahead_s=lookahead_s, context_s=context_s, dtype=dtype)
