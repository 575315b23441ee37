"""A pose video -> the DiT's `cond_states`, as upstream's `load_pose_cond` makes them (`--pose-video`).

Upstream (`causal_s2v_pipeline*.py`, `load_pose_cond` and `read_last_n_frames(reverse=True)`):
- frames from the start of the video, one every `round(video fps / 25)`, at most 48 per clip for every clip;
- each frame `/ 255 * 2 - 1`, resized (shorter side -> min(H, W), bilinear, antialiased: torchvision's tensor
  `Resize`), centre-cropped to the output size (padding, where the video is smaller, with 0 in [-1, 1] space);
- too few frames: padded with -1 (black) frames to whole clips, then split into clips of 48;
- each clip with its first frame prepended (49 frames) goes through the VAE; its first latent is dropped: 12
  latents per clip, 3 per block.
Without a pose video upstream feeds zeros (`COND[0] * 0`), which is what the runtime does when `pose` is None.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowvram.conditioning.image import crop_plan, resized_size
from lowvram.errors import InputError
from lowvram.model.config import FPS

POSE_FIX = "pass an .mp4/.mov/.webm pose video (e.g. rendered skeletons of the motion to follow)"


def read_pose_frames(path: str | os.PathLike, n_frames: int, fps: int = FPS) -> np.ndarray:
    """uint8 [n <= n_frames, h, w, 3]: frames 0, k, 2k, ... with k = max(1, round(video fps / fps))."""
    import av

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--pose-video {p}: no such file; {POSE_FIX}")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise InputError(f"--pose-video {p}: has no video stream; {POSE_FIX}")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or fps)
            interval = max(1, round(rate / fps))
            frames = []
            for i, frame in enumerate(container.decode(stream)):
                if i % interval == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) == n_frames:
                        break
    except av.error.FFmpegError as e:
        raise InputError(f"--pose-video {p}: not a readable video ({getattr(e, 'strerror', None) or e}); "
                         f"{POSE_FIX}") from None
    if not frames:
        raise InputError(f"--pose-video {p}: no frames could be decoded; {POSE_FIX}")
    return np.stack(frames)


def pose_pixels(frames: np.ndarray, out_h: int, out_w: int) -> torch.Tensor:
    """uint8 [n, h, w, 3] -> float32 [1, 3, n, H, W] in [-1, 1]: normalise, resize the shorter side, crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1.0
    h, w = x.shape[-2:]
    nh, nw = resized_size(h, w, min(out_h, out_w))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    plan = crop_plan(nh, nw, out_h, out_w)
    x = F.pad(x, (plan["pad_left"], plan["pad_right"], plan["pad_top"], plan["pad_bottom"]))
    x = x[..., plan["top"]:plan["top"] + out_h, plan["left"]:plan["left"] + out_w]
    return x.permute(1, 0, 2, 3).unsqueeze(0)


def pose_clips(pixels: torch.Tensor, num_clips: int, clip_frames: int) -> list[torch.Tensor]:
    """[1, 3, n, H, W] -> num_clips clips of clip_frames frames, padded at the end with -1 (black)."""
    need = num_clips * clip_frames
    pixels = pixels[:, :, :need]
    pad = -torch.ones(*pixels.shape[:2], need - pixels.shape[2], *pixels.shape[3:], dtype=pixels.dtype)
    return list(torch.cat([pixels, pad], dim=2).chunk(num_clips, dim=2))


def pose_latents(vae, path: str | os.PathLike, num_clips: int, out_hw: tuple[int, int],
                 clip_frames: int = 48) -> torch.Tensor:
    """The whole video's cond_states [1, z, num_clips * clip_frames / 4, h, w] (float32, on the CPU)."""
    frames = read_pose_frames(path, num_clips * clip_frames)
    latents = []
    for clip in pose_clips(pose_pixels(frames, *out_hw), num_clips, clip_frames):
        clip = torch.cat([clip[:, :, :1], clip], dim=2).to(vae.device, vae.dtype)
        latents.append(vae.encode(clip)[:, :, 1:].float().cpu())
    return torch.cat(latents, dim=2)
