"""--pose-video: frames sampled, resized, cropped, padded and encoded as upstream's load_pose_cond."""

import numpy as np
import pytest
import torch

from lowvram.conditioning.pose import pose_clips, pose_latents, pose_pixels, read_pose_frames
from lowvram.errors import InputError
from lowvram.media import VideoWriter


def colour_video(path, n, fps, h=64, w=96):
    """Frame i is a flat grey of level 8 * i (survives H.264 within a few levels)."""
    with VideoWriter(path, fps=fps) as v:
        v.write(np.stack([np.full((h, w, 3), 8 * i, np.uint8) for i in range(n)]))
    return path


def test_frames_are_taken_at_25_fps_from_the_start(tmp_path):
    frames = read_pose_frames(colour_video(tmp_path / "p50.mp4", 20, fps=50), n_frames=6)
    levels = frames.reshape(len(frames), -1).mean(1) / 8
    assert len(frames) == 6 and np.abs(levels - [0, 2, 4, 6, 8, 10]).max() < 0.5  # every second frame of 50 fps
    short = read_pose_frames(colour_video(tmp_path / "p25.mp4", 5, fps=25), n_frames=48)
    assert len(short) == 5  # all there is; pose_clips pads the rest


def test_resize_crop_and_padding_follow_torchvision():
    frames = np.full((2, 32, 64, 3), 255, np.uint8)  # landscape 32x64 into a portrait 128x64 video
    px = pose_pixels(frames, 128, 64)
    assert px.shape == (1, 3, 2, 128, 64)
    assert torch.equal(px[..., 32:96, :], torch.ones(1, 3, 2, 64, 64))  # shorter side 32 -> 64, long side cut
    assert torch.equal(px[..., :32, :], torch.zeros(1, 3, 2, 32, 64))  # CenterCrop pads with 0 in [-1, 1]
    assert torch.equal(px[..., 96:, :], torch.zeros(1, 3, 2, 32, 64))
    clips = pose_clips(px, num_clips=2, clip_frames=48)
    assert [c.shape[2] for c in clips] == [48, 48]
    assert torch.equal(clips[0][:, :, 2:], -torch.ones(1, 3, 46, 128, 64)) and clips[1].eq(-1).all()


def test_latents_are_the_vae_encode_of_each_clip_with_its_first_frame_prepended(tiny_ckpt, tmp_path):
    from lowvram.conditioning.vae import WanVAE
    from lowvram.runtime import VAE_FILE

    root, _ = tiny_ckpt
    vae = WanVAE.load(root / VAE_FILE)
    video = colour_video(tmp_path / "p.mp4", 30, fps=25, h=64, w=64)
    lat = pose_latents(vae, video, num_clips=2, out_hw=(64, 64))
    assert lat.shape == (1, vae.config.z_dim, 24, 8, 8)
    clip0 = pose_clips(pose_pixels(read_pose_frames(video, 96), 64, 64), 2, 48)[0]
    want = vae.encode(torch.cat([clip0[:, :, :1], clip0], 2))[:, :, 1:]
    assert torch.equal(lat[:, :, :12], want)


def test_a_bad_pose_video_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_pose_frames(tmp_path / "missing.mp4", 4)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(InputError, match="pose-video"):
        read_pose_frames(bad, 4)
