"""The incremental MP4 writer (H.264 + AAC, fragmented) and its readers.

tests/data/speech_3s_16k.wav: the first 3.0 s of /work/shared/clips/cyclops_baker.wav (real speech,
24 kHz float), resampled to 16 kHz with soxr HQ and stored as 16-bit PCM (96 KB).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lowvram.errors import InputError
from lowvram.media import VideoWriter, decode_audio_track, decode_frames, read_video_info

SPEECH = Path(__file__).parent / "data" / "speech_3s_16k.wav"
ROOT = Path(__file__).resolve().parent.parent
FRAME = 1 / 25
H, W = 96, 128


def synthetic_block(block: int, frames: int = 12) -> np.ndarray:
    """Smooth moving gradients (H.264 keeps them within a few grey levels)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((frames, H, W, 3), np.uint8)
    for k in range(frames):
        t = block * frames + k
        out[k, ..., 0] = 128 + 100 * np.sin((x + 3 * t) / 20)
        out[k, ..., 1] = 128 + 100 * np.cos((y - 2 * t) / 15)
        out[k, ..., 2] = 40 + 0.5 * (x + y) + t % 100
    return out


def lag_of_best_match(got: np.ndarray, want: np.ndarray, max_lag: int) -> int:
    n = min(got.shape[0], want.shape[0]) - 2 * max_lag
    scores = [np.dot(got[max_lag + k : max_lag + k + n], want[max_lag : max_lag + n]) for k in range(-max_lag, max_lag + 1)]
    return int(np.argmax(scores)) - max_lag


def test_write_and_read_back(tmp_path):
    path = tmp_path / "out.mp4"
    blocks = [synthetic_block(b) for b in range(6)]  # 72 frames = 2.88 s; the speech clip is 3 s
    with VideoWriter(path, audio_path=SPEECH) as w:
        for b, block in enumerate(blocks):
            w.write(torch.from_numpy(block) if b % 2 else block)  # numpy and torch both accepted
    info = read_video_info(path)
    assert info.num_streams == 2
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert (info.width, info.height) == (W, H)
    assert info.num_frames == 72 and info.fps == 25.0
    assert abs(info.video_duration - 2.88) < 1e-9
    assert abs(info.audio_duration - info.video_duration) <= FRAME  # trimmed to the video
    print(f"video {info.video_duration:.4f} s, audio {info.audio_duration:.4f} s")

    frames = decode_frames(path)
    assert frames.shape == (72, H, W, 3) and frames.dtype == np.uint8
    err = np.abs(frames.astype(np.int16) - np.concatenate(blocks).astype(np.int16))
    print(f"pixels: mean abs error {err.mean():.2f}, max {err.max()}")
    assert err.mean() < 4 and err.max() < 40

    # the audio is the source speech, in sync (AAC priming removed through the edit list)
    import soxr

    from lowvram.conditioning.audio import decode_audio

    track, rate = decode_audio_track(path)
    got = soxr.resample(track.mean(axis=0), rate, 16000)
    want = decode_audio(SPEECH)[: got.shape[0]]
    lag = lag_of_best_match(got, want, 400)
    n = min(got.shape[0], want.shape[0])
    corr = np.corrcoef(got[:n], want[:n])[0, 1]
    print(f"audio: lag {lag} samples at 16 kHz, correlation {corr:.4f}")
    assert abs(lag) <= 16 and corr > 0.95


@pytest.mark.parametrize("blocks,frames", [(1, 12), (9, 12), (5, 2), (3, 1)])
def test_durations_agree(tmp_path, blocks, frames):
    # the 3 s clip is shorter than 9 blocks (4.32 s): the audio is padded with silence
    path = tmp_path / "d.mp4"
    with VideoWriter(path, audio_path=SPEECH) as w:
        for b in range(blocks):
            w.write(synthetic_block(b, frames))
    info = read_video_info(path)
    assert info.num_frames == blocks * frames
    assert abs(info.audio_duration - info.video_duration) <= FRAME


def test_video_only(tmp_path):
    path = tmp_path / "v.mp4"
    with VideoWriter(path) as w:
        w.write(synthetic_block(0))
    info = read_video_info(path)
    assert info.num_streams == 1 and info.audio_codec is None and info.num_frames == 12


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_media import synthetic_block
    from lowvram.media import VideoWriter
    w = VideoWriter({path!r}, audio_path={audio!r})
    for b in range(2):
        w.write(synthetic_block(b))
    print("written", flush=True)
    time.sleep(60)  # killed here, never closed
""")


def test_killed_writer_leaves_playable_file(tmp_path):
    path = tmp_path / "killed.mp4"
    code = KILLED_WRITER.format(tests=str(Path(__file__).parent), path=str(path), audio=str(SPEECH))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 60
        line = b""
        while time.time() < deadline and not line:
            line = proc.stdout.readline()
        assert line.strip() == b"written", proc.stderr.read().decode()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    info = read_video_info(path)
    # all but the last two frames of the last block reach the disk before write() returns
    assert info.num_streams == 2 and info.video_codec == "h264" and info.audio_codec == "aac"
    assert info.num_frames == 22
    assert abs(info.audio_duration - info.video_duration) <= FRAME
    frames = decode_frames(path)
    assert frames.shape == (22, H, W, 3)
    expected = np.concatenate([synthetic_block(0), synthetic_block(1)])[:22]
    assert np.abs(frames.astype(np.int16) - expected.astype(np.int16)).mean() < 3


def test_bad_inputs(tmp_path):
    text = tmp_path / "voice.wav"
    text.write_text("not audio at all\n" * 10)
    with pytest.raises(InputError) as e:
        VideoWriter(tmp_path / "x.mp4", audio_path=text)
    assert "voice.wav" in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        VideoWriter(tmp_path / "x.mp4", audio_path=empty)
    w = VideoWriter(tmp_path / "y.mp4")
    with pytest.raises(ValueError, match="uint8"):
        w.write(np.zeros((12, H, W, 3), np.float32))
    with pytest.raises(ValueError, match="even"):
        w.write(np.zeros((12, 63, W, 3), np.uint8))
    w.write(synthetic_block(0))
    with pytest.raises(ValueError, match="differs"):
        w.write(np.zeros((12, 64, 64, 3), np.uint8))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write(synthetic_block(1))
