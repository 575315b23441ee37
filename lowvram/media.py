"""Writing the output video incrementally (H.264 + AAC in fragmented MP4) and reading it back.

:class:`VideoWriter` appends frames block by block and muxes the source audio alongside, so that
a run killed at any point leaves a playable file with everything written so far:

* the MP4 is **fragmented** (``movflags=frag_keyframe+delay_moov+default_base_moof``): there is
  no index to write at the end; the ``moov`` header goes out with the first fragment, and
  ``delay_moov`` (rather than ``empty_moov``) lets it carry the AAC encoder delay as an edit list,
  so decoders drop the 1024 priming samples and audio stays in sync;
* x264 runs with ``tune=zerolatency`` (no B-frames, no look-ahead), so every frame comes out of
  the encoder as soon as it goes in;
* a keyframe is forced on the **second-to-last** frame of every block: a fragment is cut when a
  keyframe arrives, so when :meth:`VideoWriter.write` returns, everything before it is on disk
  (``flush_packets=1`` writes each packet through), and a kill loses at most the last two frames
  (80 ms) of the last block written (the keyframe is not on the last frame because the muxer
  only passes a video packet on once audio up to its time is queued, and the AAC encoder lags
  its input by 64 ms: audio far enough ahead for the last frame could not be taken back on close);
* after each block the audio for the time covered so far is encoded and muxed with it.

Audio is encoded at 48 kHz (AAC frames are 1024 samples = 21.3 ms, so the AAC tail padding stays
under one 25 fps video frame); on :meth:`VideoWriter.close` the audio is cut (or padded with
silence) to the video's length: the decoded track ends 0-21 ms after the last video frame.
Writing a 704x384 block of 12 frames took about 60 ms on a 2-core CPU machine (x264 veryfast,
noisy content) and about 30 MiB of memory in all; nothing grows with the length of the video. The defaults follow
upstream's output quality (crf 10, preset medium, AAC 192 kb/s); the AAC rate stays 48 kHz whatever the source's
(upstream keeps the source rate) because the block-by-block interleaving above is laid out on 48 kHz frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from lowvram.errors import InputError
from lowvram.model.config import FPS

# Upstream writes with imageio at quality 8 (about x264 crf 10, preset medium) and AAC at 192 kb/s: the defaults here.
CRF = 10
PRESET = "medium"
AUDIO_BITRATE = 192_000
AUDIO_RATE = 48000
AAC_FRAME = 1024
MOVFLAGS = "frag_keyframe+delay_moov+default_base_moof"
KEYFRAME_FROM_END = 1  # the keyframe that cuts a fragment: the block's second-to-last frame


def video_uint8(frames):
    """Decoded frames in [-1, 1] (torch, [C, T, H, W]) -> uint8 [T, H, W, C] as upstream converts them:
    clamp, map to [0, 1], scale by 255 and truncate (not round)."""
    import torch

    return ((frames.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0)


def _to_uint8_frames(frames) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` (or one ``[H, W, 3]``) numpy array or torch tensor -> numpy."""
    if hasattr(frames, "detach"):  # torch tensor, any device
        frames = frames.detach().to("cpu").numpy()
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0..255), got {arr.dtype}; convert with media.video_uint8")
    return np.ascontiguousarray(arr)


class _AudioSource:
    """Decodes an audio file lazily to float32 planar at ``rate`` (mono or stereo), zero-padded past its end."""

    def __init__(self, path: str | os.PathLike, rate: int = AUDIO_RATE):
        import av

        p = Path(path)
        if not p.is_file() or p.stat().st_size == 0:
            raise InputError(f"{p}: audio file missing or empty; pass the .wav/.mp3/.m4a the video should carry")
        try:
            self._container = av.open(str(p), mode="r")
            if not self._container.streams.audio:
                raise InputError(f"{p}: has no audio stream; pass a .wav/.mp3/.m4a/.flac file")
            stream = self._container.streams.audio[0]
            channels = stream.codec_context.channels or 1
        except InputError:
            raise
        except av.error.FFmpegError as e:
            raise InputError(f"{p}: not a readable audio file ({getattr(e, 'strerror', None) or e}); "
                             f"pass a .wav/.mp3/.m4a/.flac file") from None
        self.layout = "stereo" if channels >= 2 else "mono"
        self.channels = 2 if channels >= 2 else 1
        self.rate = rate
        self._frames = self._container.decode(stream)
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=rate)
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._done = False
        self.path = p

    def _pull(self) -> None:
        import av

        try:
            frame = next(self._frames)
        except (StopIteration, av.error.FFmpegError):
            frame = None  # end of file (or a damaged tail): flush the resampler
        for out in self._resampler.resample(frame):
            data = out.to_ndarray().astype(np.float32, copy=False).reshape(self.channels, -1)
            self._buf.append(data)
            self._buffered += data.shape[1]
        if frame is None:
            self._done = True
            self._container.close()

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` samples ``[channels, n]`` (zeros after the end of the file)."""
        while self._buffered < n and not self._done:
            self._pull()
        data = np.concatenate(self._buf, axis=1) if self._buf else np.zeros((self.channels, 0), np.float32)
        out, rest = data[:, :n], data[:, n:]
        self._buf = [rest] if rest.shape[1] else []
        self._buffered = rest.shape[1]
        if out.shape[1] < n:
            out = np.pad(out, ((0, 0), (0, n - out.shape[1])))
        return np.ascontiguousarray(out)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._container.close()


class VideoWriter:
    """Incremental MP4 writer: H.264 (libx264, yuv420p) + AAC, 25 fps, playable after every block.

    >>> with VideoWriter("out.mp4", audio_path="speech.wav") as w:
    ...     for block in blocks:          # uint8 [T, H, W, 3]
    ...         w.write(block)

    ``audio_path`` is the source audio file (re-encoded to AAC 48 kHz, cut or padded to the video
    length on close); ``None`` writes a video-only file.
    """

    def __init__(self, path: str | os.PathLike, audio_path: str | os.PathLike | None = None, fps: int = FPS,
                 crf: int = CRF, preset: str = PRESET, audio_bitrate: int = AUDIO_BITRATE):
        import av

        self.path = Path(path)
        self.fps = int(fps)
        self.crf = crf
        self.preset = preset
        self.frames_written = 0
        self.audio_samples_written = 0
        self._last_audio_pts: int | None = None
        self._cut_frame: int | None = None  # the keyframe forced in the last write, if any
        self._closed = False
        self._audio = _AudioSource(audio_path) if audio_path is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w", format="mp4",
                                  options={"movflags": MOVFLAGS, "flush_packets": "1"})
        self._video = None
        self._astream = None
        self._audio_bitrate = audio_bitrate

    # -- video ------------------------------------------------------------------------------

    def _open_video(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"frame size {width}x{height}: H.264 yuv420p needs even width and height")
        v = self._container.add_stream("libx264", rate=self.fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        # keyframes where write() forces them (the second-to-last frame of each block) or on scene cuts
        v.options = {"crf": str(self.crf), "preset": self.preset, "tune": "zerolatency",
                     "forced-idr": "1", "g": str(self.fps * 10)}
        v.time_base = Fraction(1, self.fps)
        self._video = v
        if self._audio is not None:  # stream 1; added now because the header goes out with the first packet
            a = self._container.add_stream("aac", rate=AUDIO_RATE)
            a.layout = self._audio.layout
            a.bit_rate = self._audio_bitrate
            self._astream = a

    def write(self, frames) -> None:
        """Append a block of frames (uint8 ``[T, H, W, 3]`` RGB, numpy or torch) and the audio it covers."""
        import av

        if self._closed:
            raise ValueError("VideoWriter is closed")
        arr = _to_uint8_frames(frames)
        if arr.shape[0] == 0:
            return
        if self._video is None:
            self._open_video(arr.shape[1], arr.shape[2])
        elif (arr.shape[1], arr.shape[2]) != (self._video.height, self._video.width):
            raise ValueError(f"frame size {arr.shape[2]}x{arr.shape[1]} differs from the video's "
                             f"{self._video.width}x{self._video.height}")
        # one-frame writes cut no fragment (their keyframe would be the last frame, see above)
        cut = arr.shape[0] - 1 - KEYFRAME_FROM_END
        self._cut_frame = None
        for i in range(arr.shape[0]):
            frame = av.VideoFrame.from_ndarray(arr[i], format="rgb24")
            frame.pts = self.frames_written
            if i == cut:  # a fragment starts here: everything before this frame reaches the disk now
                frame.pict_type = av.video.frame.PictureType.I
                self._cut_frame = self.frames_written
            for packet in self._video.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1
        self._keep_audio_ahead()

    # -- audio ------------------------------------------------------------------------------

    def _feed_audio(self, n: int) -> None:
        """Encode the next ``n`` source samples and mux the packets that come out."""
        import av

        data = self._audio.read(n)
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=self._audio.layout)
        frame.sample_rate = AUDIO_RATE
        frame.pts = self.audio_samples_written
        frame.time_base = Fraction(1, AUDIO_RATE)
        for packet in self._astream.encode(frame):
            self._last_audio_pts = int(packet.pts * packet.time_base * AUDIO_RATE)
            self._container.mux(packet)
        self.audio_samples_written += n

    def _keep_audio_ahead(self) -> None:
        """Mux whole AAC frames until an audio packet starts at or after the block's keyframe.

        The muxer's interleaver releases a video packet only once every stream has a packet at
        the same or a later time queued, and the keyframe must reach the MP4 muxer for the
        fragment before it to be written out. The AAC encoder returns packets 3072 samples behind
        its input, so with the keyframe two frames (3840 samples) before the block's end the audio
        fed so far ends between 768 samples before and 255 samples after the video: no audio needs
        taking back on close.
        """
        if self._astream is None or self._cut_frame is None:
            return
        key_time = self._cut_frame * AUDIO_RATE // self.fps
        while self._last_audio_pts is None or self._last_audio_pts < key_time:
            self._feed_audio(AAC_FRAME)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush the encoders; the audio ends where the video ends (within one AAC frame, 21 ms)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._video is not None:
                for packet in self._video.encode(None):
                    self._container.mux(packet)
                if self._astream is not None:
                    end = self.frames_written * AUDIO_RATE // self.fps
                    if end > self.audio_samples_written:
                        self._feed_audio(end - self.audio_samples_written)
                    for packet in self._astream.encode(None):
                        self._container.mux(packet)
        finally:
            if self._audio is not None:
                self._audio.close()
            self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# reading back


@dataclass
class VideoInfo:
    num_streams: int
    video_codec: str | None
    audio_codec: str | None
    width: int
    height: int
    num_frames: int  # decoded video frames
    fps: float
    video_duration: float  # num_frames / fps
    audio_duration: float  # decoded audio samples / rate (priming removed by the decoder)
    audio_rate: int
    audio_channels: int


def read_video_info(path: str | os.PathLike) -> VideoInfo:
    """Stream count, codecs, frame count, fps and durations of a video file (decodes it; tolerates a cut-off tail)."""
    import av

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: video file not found")
    with av.open(str(p)) as c:
        vs = c.streams.video[0] if c.streams.video else None
        aus = c.streams.audio[0] if c.streams.audio else None
        info = dict(num_streams=len(c.streams), video_codec=vs.codec_context.name if vs else None,
                    audio_codec=aus.codec_context.name if aus else None,
                    width=vs.codec_context.width if vs else 0, height=vs.codec_context.height if vs else 0,
                    fps=float(vs.average_rate or vs.guessed_rate or 0) if vs else 0.0,
                    audio_rate=aus.codec_context.sample_rate if aus else 0,
                    audio_channels=aus.codec_context.channels if aus else 0)
    nframes = 0
    if vs is not None:
        with av.open(str(p)) as c:
            try:
                for _ in c.decode(video=0):
                    nframes += 1
            except av.error.FFmpegError:
                pass
    samples = 0
    if aus is not None:
        with av.open(str(p)) as c:
            try:
                for f in c.decode(audio=0):
                    samples += f.samples
            except av.error.FFmpegError:
                pass
    fps = info["fps"] or float(FPS)
    return VideoInfo(**info, num_frames=nframes, video_duration=nframes / fps,
                     audio_duration=samples / info["audio_rate"] if info["audio_rate"] else 0.0)


def decode_frames(path: str | os.PathLike) -> np.ndarray:
    """All video frames as uint8 ``[T, H, W, 3]`` RGB (stops quietly at a damaged tail)."""
    import av

    out = []
    with av.open(str(path)) as c:
        try:
            for frame in c.decode(video=0):
                out.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError:
            pass
    if not out:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack(out)


def decode_audio_track(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The first audio track as float32 ``[channels, n]`` and its rate."""
    import av

    chunks = []
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].codec_context.sample_rate
        try:
            for f in c.decode(audio=0):
                a = f.to_ndarray()
                chunks.append(a if f.format.is_planar else a.reshape(-1, len(f.layout.channels)).T)
        except av.error.FFmpegError:
            pass
    return (np.concatenate(chunks, axis=1).astype(np.float32) if chunks else np.zeros((1, 0), np.float32)), rate


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int) -> None:
    """Mono float samples in [-1, 1] (clipped) as a 16-bit PCM WAV file; the folder is created if needed."""
    import wave

    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
