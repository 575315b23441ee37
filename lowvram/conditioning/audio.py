"""Audio file -> wav2vec2 features -> the DiT's per-block ``audio_input`` ``[1, L+1, H, 12]``.

Follows LiveAvatar's audio front end (tests/reference/audio_features/README.md):

1. **Decode** any file FFmpeg reads (wav/mp3/m4a/flac/...) with PyAV to float32 (16-bit PCM ->
   value/32768, like soundfile), average the channels, resample to 16 kHz with soxr quality "HQ"
   (librosa's default ``soxr_hq``) and fix the length to ``ceil(n * 16000 / sr)`` samples.
2. **Normalise** over the whole clip: ``(x - mean) / sqrt(var + 1e-7)`` in float32.
3. **wav2vec2** (transformers, ``attn_implementation="sdpa"``): all ``L+1`` hidden states stacked ->
   ``[L+1, T50, H]``. The last entry must be ``last_hidden_state`` (the encoder's final LayerNorm
   applied): transformers 5 returns it *without* that LayerNorm in ``hidden_states[-1]``; 4.x
   returns it with. Taking ``last_hidden_state`` is right for both.
4. **30 Hz**: ``T30 = int(T50 / 50.0 * 30)`` (float64, truncated), then ``F.interpolate(linear,
   align_corners=True)`` along time.
5. **Video frames** (25 fps, clips of 48 frames): ``nr = int(T30 / (48 * 1.2)) + 1`` clips,
   ``F = 48 * nr`` frames; frame k takes 30 Hz column ``round(linspace(0, F/25, F, endpoint=False)
   * 30)[k]``, zeros past the end.
6. **Blocks**: block n (12 video frames = 3 latent frames) is columns ``[12n, 12n + 12)``.

The whole-file mode (:func:`audio_features`) is the exact one and what `lowvram run` uses. A chunked mode that
computes block n from a bounded window of audio lives beside its tests (tests/streaming_audio.py).

Memory (measured on an H100 with a randomly initialised wav2vec2-large-xlsr-53 layout, 315 M
parameters; GPU memory above the weights, which take 602 MiB in bf16 / 1.2 GiB in fp32):

| audio | whole file, plain call (bf16) | whole file, lean path (bf16) | chunked mode (bf16, tests only) |
|---|---|---|---|
| 10 s | 161 MiB | 161 MiB | 117 MiB (2 s look-ahead, 4 s context) |
| 60 s | 787 MiB | 413 MiB | 117 MiB |
| 600 s | 7.4 GiB | 1.6 GiB | 117 MiB |

The plain call grows by about 12.6 MiB per second of audio (the 25 full-rate hidden states plus
the unchunked convolutional front end); the lean path (used automatically above 30 s) by about
2.6 MiB/s, most of it the 30 Hz result itself (25 x 1024 x 30 values a second = 1.5 MiB/s in bf16).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowvram.errors import CheckpointError, InputError
from lowvram.model.config import FPS, INFER_FRAMES

SAMPLE_RATE = 16000
VIDEO_RATE = 30  # the encoder's internal feature rate (Hz)
FRAMES_PER_BLOCK = 12  # 3 latent frames
W2V_RATE = 50  # wav2vec2 frame rate (Hz)
W2V_STRIDE = 320  # samples per wav2vec2 frame (product of the conv strides)
W2V_FIELD = 400  # receptive field of the conv stack in samples
LEAN_FROM_S = 30.0  # clips longer than this take the memory-lean (same-result) wav2vec2 path
SILENCE_PEAK = 1e-4  # -80 dBFS: below this the file is treated as silence
NORM_EPS = 1e-7


# --------------------------------------------------------------------------------------------
# 1. decoding


def _frame_to_float(frame) -> np.ndarray:
    """One decoded PyAV audio frame -> float32 ``[channels, samples]``."""
    fmt = frame.format.name
    channels = len(frame.layout.channels)
    arr = frame.to_ndarray()
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T
    base = fmt.rstrip("p")
    if base == "s16":
        return arr.astype(np.float32) / np.float32(32768.0)
    if base == "s32":
        return arr.astype(np.float32) / np.float32(2147483648.0)
    if base == "u8":
        return (arr.astype(np.float32) - np.float32(128.0)) / np.float32(128.0)
    if base == "s64":
        return (arr.astype(np.float64) / 9223372036854775808.0).astype(np.float32)
    if base in ("flt", "dbl"):
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"unsupported sample format {fmt}")


def decode_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file (any FFmpeg format, rate, channel count) to mono float32 at ``sample_rate``.

    Matches ``librosa.load(path, sr=sample_rate)`` for files soundfile reads (WAV/FLAC): channel
    mean in float32, soxr "HQ" resampling, length ``ceil(n * sample_rate / sr)``. For lossy formats
    (mp3/m4a) the decoded samples depend on the decoder (priming/padding), as they do upstream.
    Raises :class:`InputError` for a missing, unreadable or empty file.
    """
    import av

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: audio file not found; pass an existing .wav/.mp3/.m4a/.flac file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an audio file; pass a .wav/.mp3/.m4a/.flac file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: audio file is empty (0 bytes); pass a file with speech in it")
    chunks: list[np.ndarray] = []  # mono float32 pieces
    rate = None
    try:
        with av.open(str(p), mode="r") as container:
            if not container.streams.audio:
                raise InputError(f"{p}: has no audio stream; pass a .wav/.mp3/.m4a/.flac file with speech")
            stream = container.streams.audio[0]
            resampler = None
            for frame in container.decode(stream):
                if rate is None:
                    rate = frame.sample_rate
                if resampler is None and frame.sample_rate != rate:
                    # the stream changed its rate midway: bring the rest onto the first rate
                    resampler = av.AudioResampler(format="fltp", rate=rate)
                for piece in resampler.resample(frame) if resampler is not None else [frame]:
                    data = _frame_to_float(piece)  # [channels, n]
                    # librosa: plain float32 mean over the channels
                    chunks.append(np.mean(data, axis=0) if data.shape[0] > 1 else data[0])
            if resampler is not None:
                for piece in resampler.resample(None):
                    data = _frame_to_float(piece)
                    chunks.append(np.mean(data, axis=0) if data.shape[0] > 1 else data[0])
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise InputError(f"{p}: not a readable audio file ({why}); pass a .wav/.mp3/.m4a/.flac file") from None
    if rate is None or sum(c.shape[0] for c in chunks) == 0:
        raise InputError(f"{p}: contains no audio samples; pass a file with speech in it")
    mono = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    return resample(mono, rate, sample_rate)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """soxr "HQ" resampling to ``target_sr``, then cut/zero-pad to ``ceil(n * target_sr / orig_sr)``."""
    if orig_sr == target_sr:
        return wave
    import soxr

    n_out = int(math.ceil(wave.shape[-1] * (float(target_sr) / orig_sr)))
    out = soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    if out.shape[0] > n_out:
        out = out[:n_out]
    elif out.shape[0] < n_out:
        out = np.pad(out, (0, n_out - out.shape[0]))
    return np.ascontiguousarray(out)


def check_audio(wave: np.ndarray, name: str = "audio") -> None:
    """InputError if the clip is too short for one feature frame; a warning if it is silent."""
    if wave.shape[0] < W2V_FIELD + W2V_STRIDE:  # T50 >= 2 so that T30 >= 1
        raise InputError(
            f"{name}: only {wave.shape[0]} samples at 16 kHz ({wave.shape[0] / SAMPLE_RATE:.3f} s); "
            f"pass at least 0.05 s of audio"
        )
    if not np.isfinite(wave).all():
        raise InputError(f"{name}: contains NaN/inf samples; re-export the audio as 16-bit PCM WAV")
    if float(np.abs(wave).max()) <= SILENCE_PEAK:
        warnings.warn(f"{name}: the audio is silent (peak <= -80 dBFS); the avatar will not speak", stacklevel=3)


def normalize(wave: np.ndarray) -> np.ndarray:
    """Wav2Vec2FeatureExtractor's ``do_normalize``: ``(x - mean) / sqrt(var + 1e-7)`` in float32."""
    x = np.asarray(wave, dtype=np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + NORM_EPS)).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# 2. wav2vec2


def num_w2v_frames(num_samples: int) -> int:
    """``T50 = floor((N - 400) / 320) + 1`` (0 when shorter than the receptive field)."""
    return 0 if num_samples < W2V_FIELD else (num_samples - W2V_FIELD) // W2V_STRIDE + 1


def num_30fps_frames(t50: int) -> int:
    """``int(T50 / 50.0 * 30)`` in float64 (not always ``3 * T50 // 5``)."""
    return int(t50 / float(W2V_RATE) * VIDEO_RATE)


class Wav2Vec2Encoder:
    """A wav2vec2 model folder (Hugging Face layout) -> all hidden states ``[L+1, T50, H]``."""

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        import json

        from transformers import Wav2Vec2Model
        from transformers.utils import logging as hf_logging

        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d}: no wav2vec2 config.json there; pass the wav2vec2 model folder "
                                  f"(e.g. <ckpt>/wav2vec2-large-xlsr-53-english)")
        self.do_normalize = True
        pre = d / "preprocessor_config.json"
        if pre.is_file():
            self.do_normalize = bool(json.loads(pre.read_text()).get("do_normalize", True))
        verbosity = hf_logging.get_verbosity()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # a CTC checkpoint has an unused lm_head: not worth a warning
        hf_logging.disable_progress_bar()
        try:
            self.model = Wav2Vec2Model.from_pretrained(str(d), attn_implementation="sdpa", dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{d}: cannot load the wav2vec2 model ({e}); re-download the folder") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        self.model.eval().to(device=device, dtype=dtype)
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def num_states(self) -> int:
        return self.model.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def hidden_states(self, input_values: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised 16 kHz samples ``[N]`` -> stacked hidden states ``[L+1, T50, H]`` (model dtype)."""
        x = torch.as_tensor(input_values).reshape(1, -1).to(device=self.device, dtype=self.dtype)
        out = self.model(x, output_hidden_states=True)
        states = list(out.hidden_states[:-1]) + [out.last_hidden_state]
        return torch.cat(states, dim=0)

    def encode(self, wave: np.ndarray) -> torch.Tensor:
        """16 kHz mono float32 wave -> ``[L+1, T50, H]`` (normalising first when the folder says so)."""
        return self.hidden_states(normalize(wave) if self.do_normalize else wave)

    def features_30fps(self, wave: np.ndarray, lean: bool | None = None) -> torch.Tensor:
        """16 kHz mono wave -> all states at 30 Hz ``[L+1, T30, H]`` (model dtype).

        ``lean`` (default: for clips over :data:`LEAN_FROM_S` seconds) runs the model's pieces
        itself: the convolutional front end in 30 s chunks (it is local: frame t sees samples
        ``[320 t, 320 t + 400)``, so aligned chunks give the same frames) and each hidden state
        interpolated to 30 Hz as soon as it exists, so the 25 full-rate states are never held
        together. Same operations as ``model(x, output_hidden_states=True)`` (pre-LayerNorm
        "stable" layout of wav2vec2-large-xlsr; other layouts take the plain call). Measured on an
        H100, bf16, real-size model: identical output, peak above the weights 1.6 GiB instead of
        7.4 GiB for 10 minutes of audio.
        """
        x = normalize(wave) if self.do_normalize else np.asarray(wave, dtype=np.float32)
        cfg = self.model.config
        lean_ok = cfg.do_stable_layer_norm and not getattr(cfg, "add_adapter", False)  # the layout _lean_30fps follows
        if lean is None:
            lean = x.shape[0] > LEAN_FROM_S * SAMPLE_RATE
        if not lean or not lean_ok:
            return to_30fps(self.hidden_states(x))
        return self._lean_30fps(x)

    @torch.inference_mode()
    def _conv_features(self, x: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        """The convolutional front end ``[1, C, T50]``, computed over aligned chunks of ``chunk_frames`` frames."""
        fe = self.model.feature_extractor
        t50 = num_w2v_frames(x.shape[1])
        if t50 <= chunk_frames:
            return fe(x)
        parts = []
        for t0 in range(0, t50, chunk_frames):
            t1 = min(t50, t0 + chunk_frames)
            parts.append(fe(x[:, t0 * W2V_STRIDE : (t1 - 1) * W2V_STRIDE + W2V_FIELD]))
        return torch.cat(parts, dim=2)

    @torch.inference_mode()
    def _lean_30fps(self, x: np.ndarray, chunk_frames: int = 30 * W2V_RATE) -> torch.Tensor:
        m = self.model
        xt = torch.as_tensor(x).reshape(1, -1).to(device=self.device, dtype=self.dtype)
        conv = self._conv_features(xt, chunk_frames)
        del xt
        hidden, _ = m.feature_projection(conv.transpose(1, 2))
        del conv
        enc = m.encoder
        hidden = enc.dropout(hidden + enc.pos_conv_embed(hidden))
        t30 = num_30fps_frames(hidden.shape[1])
        if t30 < 1:
            raise InputError("audio too short: no 30 Hz frame; pass at least 0.05 s")
        out = torch.empty(self.num_states, t30, self.hidden_size, dtype=hidden.dtype, device=hidden.device)

        def put(i: int, h: torch.Tensor) -> None:
            out[i] = F.interpolate(h.transpose(1, 2), size=t30, mode="linear", align_corners=True)[0].transpose(0, 1)

        put(0, hidden)
        last = len(enc.layers) - 1
        for i, layer in enumerate(enc.layers):
            r = layer(hidden, attention_mask=None)
            hidden = r[0] if isinstance(r, tuple) else r  # transformers 4.x returns a tuple
            if i < last:
                put(i + 1, hidden)
        put(self.num_states - 1, enc.layer_norm(hidden))  # = last_hidden_state
        return out


# --------------------------------------------------------------------------------------------
# 3. 30 Hz features and frame windows


def to_30fps(hidden: torch.Tensor) -> torch.Tensor:
    """``[L+1, T50, H]`` -> ``[L+1, T30, H]`` by linear interpolation with aligned corners."""
    t30 = num_30fps_frames(hidden.shape[1])
    if t30 < 1:
        raise InputError(f"audio too short: {hidden.shape[1]} wav2vec2 frames give no 30 Hz frame; pass at least 0.05 s")
    return F.interpolate(hidden.transpose(1, 2), size=t30, mode="linear", align_corners=True).transpose(1, 2)


def num_clips(t30: int, infer_frames: int = INFER_FRAMES, fps: int = FPS) -> int:
    """``nr = int(T30 / (infer_frames * 30 / fps)) + 1`` (an exact multiple still adds one clip)."""
    scale = VIDEO_RATE / fps
    return int(t30 / (infer_frames * scale)) + 1


def frame_columns(num_frames: int, fps: int = FPS) -> np.ndarray:
    """30 Hz column of each video frame: ``round(linspace(0, F/fps, F, endpoint=False) * 30)``."""
    times = np.linspace(0, num_frames / fps, num_frames, endpoint=False)
    return np.round(times * VIDEO_RATE).astype(np.int64)


@dataclass
class AudioFeatures:
    """Whole-clip audio features at 30 Hz and the per-video-frame windows the DiT takes.

    ``feat_30fps`` is ``[L+1, T30, H]``; frames are picked lazily, so a long clip keeps only the
    30 Hz features (the 25 fps ``audio_emb`` would be 5/6 of that plus zero padding).
    """

    feat_30fps: torch.Tensor
    fps: int = FPS
    infer_frames: int = INFER_FRAMES
    num_samples: int = 0  # 16 kHz samples of the source (for the duration)

    @property
    def num_states(self) -> int:
        return self.feat_30fps.shape[0]

    @property
    def dim(self) -> int:
        return self.feat_30fps.shape[2]

    @property
    def t30(self) -> int:
        return self.feat_30fps.shape[1]

    @property
    def num_clips(self) -> int:
        return num_clips(self.t30, self.infer_frames, self.fps)

    @property
    def num_frames(self) -> int:
        """Video frames covered: ``num_clips * infer_frames`` (the tail past the audio is zero)."""
        return self.num_clips * self.infer_frames

    @property
    def num_blocks(self) -> int:
        return self.num_frames // FRAMES_PER_BLOCK

    @property
    def duration_s(self) -> float:
        return self.num_samples / SAMPLE_RATE

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Video frames ``[start, stop)`` -> ``[1, L+1, H, stop - start]`` (zeros past the audio)."""
        if not 0 <= start <= stop <= self.num_frames:
            raise IndexError(f"frames [{start}, {stop}) outside [0, {self.num_frames})")
        cols = torch.as_tensor(frame_columns(self.num_frames, self.fps)[start:stop])
        out = self.feat_30fps.new_zeros(self.num_states, stop - start, self.dim)
        ok = cols < self.t30
        out[:, ok] = self.feat_30fps[:, cols[ok].to(self.feat_30fps.device)]
        return out.permute(0, 2, 1).unsqueeze(0)

    def audio_emb(self) -> torch.Tensor:
        """The pipeline's whole ``audio_emb`` ``[1, L+1, H, F]``."""
        return self.frames(0, self.num_frames)

    def block(self, block_index: int, frames_per_block: int = FRAMES_PER_BLOCK) -> torch.Tensor:
        """The DiT ``audio_input`` of block n: ``[1, L+1, H, frames_per_block]``."""
        start = block_index * frames_per_block
        return self.frames(start, start + frames_per_block)


def audio_features(path: str | os.PathLike | np.ndarray, wav2vec_dir: str | os.PathLike | Wav2Vec2Encoder,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   lean: bool | None = None) -> AudioFeatures:
    """Exact whole-file features (the default mode): file (or 16 kHz wave) -> :class:`AudioFeatures`.

    ``wav2vec_dir`` is the model folder or an already loaded :class:`Wav2Vec2Encoder`; ``lean``
    see :meth:`Wav2Vec2Encoder.features_30fps`.
    """
    name = "audio" if isinstance(path, np.ndarray) else str(path)
    wave = path.astype(np.float32, copy=False) if isinstance(path, np.ndarray) else decode_audio(path)
    check_audio(wave, name)
    enc = wav2vec_dir if isinstance(wav2vec_dir, Wav2Vec2Encoder) else Wav2Vec2Encoder(wav2vec_dir, device, dtype)
    return AudioFeatures(enc.features_30fps(wave, lean=lean).to(dtype), num_samples=int(wave.shape[0]))


def block_audio(features: AudioFeatures | torch.Tensor, block_index: int,
                frames_per_block: int = FRAMES_PER_BLOCK) -> torch.Tensor:
    """Block n's ``audio_input`` ``[1, L+1, H, frames_per_block]`` from features (anything with ``block``) or a
    whole ``audio_emb``."""
    if isinstance(features, torch.Tensor):
        start = block_index * frames_per_block
        if start < 0 or start + frames_per_block > features.shape[-1]:
            raise IndexError(f"block {block_index} outside the {features.shape[-1]} frames of audio_emb")
        return features[..., start : start + frames_per_block]
    return features.block(block_index, frames_per_block)
