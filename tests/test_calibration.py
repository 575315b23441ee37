"""Calibration sets: clip folders, `lowvram calib make`, DiT inputs from clips, statistics recording."""

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import run_cli as cli
from lowvram.calibration import (
    check_samples, load_calibration, load_clip_set, load_samples, make_clip_set, samples_digest,
    samples_from_clips, save_samples, synthetic_samples,
)
from lowvram.errors import InputError
from lowvram.model.config import tiny

SHARED_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "clips"


def one_clear_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith("error: ")


def write_wav(path: Path, seconds: float, seed: int = 0, rate: int = 16000) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + 0.01 * rng.standard_normal(t.size)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def write_image(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (96, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def media(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return {"img": [write_image(src / "a.png", 0), write_image(src / "b.png", 1)],
            "wav": [write_wav(src / "a.wav", 2.0, 0), write_wav(src / "b.wav", 7.2, 1)]}


# ----------------------------------------------------------------------------------------------------------
# Clip sets


def test_make_clip_set_pairs_and_split_speech(media, tmp_path):
    pairs = make_clip_set(tmp_path / "pairs", media["img"], media["wav"], ["a person talks", "another one"])
    assert [c.name for c in pairs.clips] == ["a", "b"]
    again = load_clip_set(tmp_path / "pairs")
    assert again.digest() == pairs.digest() and (tmp_path / "pairs" / "a.png").is_file()  # files copied in

    split = make_clip_set(tmp_path / "split", media["img"][:1], media["wav"][1:], ["one long speech"], clip_seconds=3)
    assert [(c.start_s, c.duration_s) for c in split.clips] == [(0.0, 3.0), (3.0, 3.0)]  # 7.2 s -> two 3 s clips
    doc = json.loads((tmp_path / "split" / "clips.json").read_text())
    assert doc["format"] == "lowvram-clips" and doc["clips"][1]["start_s"] == 3.0
    with pytest.raises(InputError, match="already exists"):
        make_clip_set(tmp_path / "split", media["img"], media["wav"], ["x"])
    with pytest.raises(InputError, match="--image"):
        make_clip_set(tmp_path / "n", media["img"] * 2, media["wav"], ["x"])


def test_calib_make_cli(media, tmp_path):
    code, out, err = cli("calib", "make", "--image", str(media["img"][0]), "--audio", str(media["wav"][1]), "--prompt",
                         "a person talks", "--out", str(tmp_path / "c"), "--clip-seconds", "2", "--max-clips", "2")
    assert code == 0, err
    assert "2 clips" in out and len(load_clip_set(tmp_path / "c").clips) == 2


@pytest.mark.skipif(not (SHARED_CLIPS / "clips.json").is_file(), reason="../shared/clips not present")
def test_shared_clip_set_reads_as_is():
    cs = load_clip_set(SHARED_CLIPS)  # decodes every image and speech file
    assert len(cs.clips) == 5 and all(c.prompt for c in cs.clips)


@pytest.fixture
def good_set(media, tmp_path):
    return make_clip_set(tmp_path / "set", media["img"], media["wav"], ["p1", "p2"]).folder


@pytest.mark.parametrize("damage,match", [
    ("image", r"clip 0 \('a'\): image unreadable"),
    ("audio", r"clip 1 \('b'\): audio unreadable"),
    ("missing", r"clip 0 \('a'\): image file .* not found"),
    ("json", r"clips.json: not a valid clip manifest"),
    ("segment", r"clip 1 \('b'\): segment .* outside"),
])
def test_corrupt_clips_fail_with_one_clear_line(good_set, damage, match, tmp_path):
    if damage == "image":
        (good_set / "a.png").write_bytes(b"\x89PNG not really")
    elif damage == "audio":
        data = (good_set / "b.wav").read_bytes()
        (good_set / "b.wav").write_bytes(b"RIFF" + b"\x00" * 40 + data[2000:2100])
    elif damage == "missing":
        (good_set / "a.png").unlink()
    elif damage == "json":
        (good_set / "clips.json").write_text('{"clips": [ {"name": ')
    elif damage == "segment":
        doc = json.loads((good_set / "clips.json").read_text())
        doc["clips"][1].update(start_s=6.0, duration_s=5.0)
        (good_set / "clips.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=match):
        load_clip_set(good_set)
    # the quantizer validates the set before it loads any model (the encoders are never needed here)
    from lowvram.synthetic import write_checkpoint

    write_checkpoint(tmp_path / "ckpt", tiny(), seed=0, shards=1, lora=True)
    code, _, err = cli("quantize", str(tmp_path / "ckpt"), "--calib", str(good_set), "--out", str(tmp_path / "q"))
    assert code == 2 and one_clear_line(err), err
    import re

    assert re.search(match, err), err


def test_quantize_without_calib_says_how_to_build_one(tmp_path):
    code, _, err = cli("quantize", str(tmp_path), "--out", str(tmp_path / "q"))
    assert code == 2 and one_clear_line(err) and "lowvram calib make" in err and "--calib" in err


# ----------------------------------------------------------------------------------------------------------
# DiT inputs


def test_synthetic_samples_are_seeded_and_checked():
    cfg = tiny()
    a, b = synthetic_samples(cfg, 2, seed=4), synthetic_samples(cfg, 2, seed=4)
    assert samples_digest(a) == samples_digest(b) != samples_digest(synthetic_samples(cfg, 2, seed=5))
    s = a[0]
    assert s.context.shape[1] == cfg.text_dim and s.ref_latents.shape == (1, 16, 1, 8, 16)
    assert s.motion_latents.shape == (1, 16, cfg.motion_latent_frames, 8, 16)
    noise, audio, pose = s.blocks[1]
    assert noise.shape == (16, 3, 8, 16) and audio.shape == (1, 25, cfg.audio_dim, 12) and not pose.any()
    check_samples(a, cfg)
    with pytest.raises(InputError, match="context .* takes \\[L, 96\\]"):
        check_samples(a, tiny(text_dim=96))


def test_saved_samples_round_trip_and_tamper_check(tmp_path):
    cfg = tiny()
    samples = synthetic_samples(cfg, 2, seed=1, blocks=1)
    save_samples(tmp_path, samples)
    back = load_samples(tmp_path)
    assert samples_digest(back) == samples_digest(samples)
    cs = load_calibration(tmp_path, cfg)
    assert cs.digest == samples_digest(samples) and cs.source["kind"] == "samples"
    meta = json.loads((tmp_path / "samples.json").read_text())
    meta["digest"] = "0" * 64
    (tmp_path / "samples.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not match the digest"):
        load_samples(tmp_path)


class FakeEncoders:
    """The Encoders protocol with deterministic stand-ins (the real ones are the conditioning modules)."""

    fingerprint = "fake-v1"

    def __init__(self, cfg):
        self.cfg = cfg
        self.calls = []

    def encode_prompts(self, prompts):
        self.calls.append(("text", len(prompts)))
        return [torch.full((len(p.split()), self.cfg.text_dim), float(len(p))) for p in prompts]

    def encode_audio(self, waves):
        self.calls.append(("audio", [len(w) for w in waves]))
        return [torch.full((1, self.cfg.audio_layers, self.cfg.audio_dim, 48), float(len(w))) for w in waves]

    def encode_images(self, paths, max_area):
        self.calls.append(("image", max_area))
        h = w = 8
        return [(torch.zeros(1, 16, 1, h, w), torch.ones(1, 16, self.cfg.motion_latent_frames, h, w)) for _ in paths]


def test_samples_from_clips_uses_the_encoders_once_and_caches(media, tmp_path):
    cfg = tiny()
    folder = make_clip_set(tmp_path / "c", media["img"][:1], media["wav"][1:], ["one long speech"],
                           clip_seconds=3).folder
    enc = FakeEncoders(cfg)
    samples = samples_from_clips(folder, enc, cfg, size="256*256", blocks=2, seed=0)
    assert len(samples) == 2 and all(len(s.blocks) == 2 for s in samples)
    assert enc.calls[1] == ("audio", [48000, 48000])  # each clip is its own 3 s segment at 16 kHz
    assert enc.calls[2] == ("image", 256 * 256)
    assert samples[0].blocks[0][0].shape == (16, 3, 8, 8) and samples[0].name == "b_000"
    assert not torch.equal(samples[0].blocks[0][0], samples[1].blocks[0][0])  # seeded per clip
    check_samples(samples, cfg)
    enc2 = FakeEncoders(cfg)
    again = samples_from_clips(folder, enc2, cfg, size="256*256", blocks=2, seed=0)
    assert enc2.calls == [] and samples_digest(again) == samples_digest(samples)  # from .encoded/
    # without encoders (e.g. the T5 file is gone) the cached encoding is still usable
    cs = load_calibration(folder, cfg, lambda: (_ for _ in ()).throw(InputError("no encoders")), size="256*256",
                          blocks=2, seed=0)
    assert cs.digest == samples_digest(samples) and cs.source["kind"] == "clips"


# ----------------------------------------------------------------------------------------------------------
# Statistics


def test_recorder_statistics_and_reservoir():
    from torch import nn

    from lowvram.quantize.stats import Recorder

    cfg = tiny()
    rec = Recorder(cfg, rows=64, seed=0)
    block = nn.Module()
    block.blocks = nn.ModuleDict({"0": nn.Module()})
    block.blocks["0"].ffn = nn.Sequential(nn.Linear(8, 4), nn.GELU(), nn.Linear(4, 8))
    rec.attach(block)
    xs = [torch.randn(50, 8) for _ in range(4)]
    xs[2][:, 3] *= 100
    for step, x in enumerate(xs):
        with rec.context(step, "train"):
            block.blocks["0"].ffn(x)
    with rec.context(cfg.num_steps, "heldout"):
        block.blocks["0"].ffn(torch.randn(10, 8) * 1000)  # held-out rows never touch the calibration stats
    g = rec.groups["blocks.0.ffn.0"]
    assert torch.allclose(g.chan_amax, torch.stack(xs).abs().amax((0, 1)))
    assert torch.allclose(g.step_amax[:4], torch.stack([x.abs().max() for x in xs])) and g.step_amax[4] == 0
    assert g.train.rows.shape == (64, 8) and g.train.seen == 200 and g.heldout.rows.shape == (10, 8)
    assert set(g.train.steps.tolist()) == {0, 1, 2, 3}  # a uniform sample across the steps
    rec2 = Recorder(cfg, rows=64, seed=0)
    rec2.attach(block)
    rec.detach()
    for step, x in enumerate(xs):
        with rec2.context(step, "train"):
            block.blocks["0"].ffn(x)
    assert torch.equal(rec2.groups["blocks.0.ffn.0"].train.rows, g.train.rows)  # deterministic


def test_quantize_from_real_clips_through_the_conditioning_encoders(tmp_path):
    """Clip set -> umT5, wav2vec2, Wan VAE (tiny random weights in the real file layout) -> DiT inputs ->
    block-streaming calibration -> int8 folder: the path a user runs, on CPU."""
    demo = pytest.importorskip("lowvram.demo")
    if not all(hasattr(demo, n) for n in ("write_tiny_checkpoint", "face_like_image", "speech_like_wave")):
        pytest.skip("lowvram.demo lacks the tiny-checkpoint writers")
    torch.set_num_threads(1)
    root = tmp_path / "ckpt"
    demo.write_tiny_checkpoint(root)
    src = tmp_path / "src"
    src.mkdir()
    demo.face_like_image(src / "face.png")
    demo.speech_like_wave(src / "speech.wav", 5.0, 0)
    code, _, err = cli("calib", "make", "--image", str(src / "face.png"), "--audio", str(src / "speech.wav"),
                       "--prompt", "a person talks", "--out", str(tmp_path / "clips"), "--clip-seconds", "2.5")
    assert code == 0, err
    code, out, err = cli("quantize", str(root), "--calib", str(tmp_path / "clips"), "--format", "int8", "--out",
                         str(tmp_path / "q"), "--device", "cpu", "--calib-size", "64*64", "--calib-blocks", "1")
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    src_info = report["calibration"]["source"]
    assert src_info["kind"] == "clips" and src_info["clips"] == 2 and report["calibration"]["heldout"] == 1
    assert report["end_to_end"]["final_rel_err_mean"] < 0.05
    assert any((tmp_path / "clips" / ".encoded").iterdir())  # encoded once, reused on resume
