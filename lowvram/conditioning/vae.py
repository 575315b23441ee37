"""Wan2.1 VAE (`Wan2.1_VAE.pth`) through diffusers' `AutoencoderKLWan`, driven the way LiveAvatar drives it.

* Loading: the pickled float32 state dict is opened with `torch.load(weights_only=True, mmap=True)`,
  renamed to diffusers' names by `convert_wan_vae_state_dict` (`vae_config.py`, written from the rules of
  tests/reference/tiny_vae/diffusers_key_map.json) and assigned into a meta-device skeleton.
* Encode / decode use diffusers' encoder and decoder modules, but the chunk loop and the per-layer
  feature caches are ours (tiny_vae/README.md §3): encode = frame 0, then 4-frame chunks; decode = one
  latent frame at a time. Latents are normalised `(mu - mean) * inv_std` / de-normalised
  `z / inv_std + mean`, `inv_std = 1/std` in float32, and decoded frames are clamped to [-1, 1].
* `StreamingDecoder` is the multi-GPU (TPP) pipeline's streaming decode (§4): caches persist across
  calls and are never reset within a stream; `warmup(motion_latents)` decodes `motion_latents[:, :, :7]`
  (output thrown away by the pipeline), `decode_block(latents)` returns the frames the pipeline keeps
  (the last 12 of each call, minus the first 3 right after a warm-up).
* `SingleGpuClipDecoder` is the single-GPU pipeline's per-clip decode bookkeeping (§5).
* Everything runs on the VAE's own device (another GPU than the DiT's, or the CPU); inputs are moved
  there.
* `vae_memory_bytes(384, 704)` (`vae_memory.py`) states (computes) the encode/decode working set at 704×384.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lowvram.conditioning.text import check_keys
from lowvram.conditioning.vae_config import (
    BLOCKS_PER_CLIP, FIRST_DROP, LATENT_MEAN, LATENT_STD, MOTION_FRAMES, WARMUP_LATENTS, VAEConfig,
    convert_wan_vae_key, convert_wan_vae_state_dict, meta_skeleton, upstream_keys,
)
from lowvram.conditioning.vae_memory import vae_memory_bytes
from lowvram.pth import read_state_dict
from lowvram.errors import CheckpointError, InputError
from lowvram.model.config import INFER_FRAMES

VAE_CHECKPOINT_NAME = "Wan2.1_VAE.pth"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _causal_convs(module: torch.nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def runtime_dtype(device: str | torch.device) -> torch.dtype:
    """What `lowvram run` loads the VAE in: bf16 on a GPU, as upstream (~3.1 GiB to decode at 704x384 instead of
    ~6.25 in fp32); fp32 on the CPU (no fast bf16 convolutions there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


VAE_FIX = f"download {VAE_CHECKPOINT_NAME} again (the Wan2.1 video VAE)"


def _config_of(path: Path, sd: dict[str, torch.Tensor]) -> VAEConfig:
    try:
        return VAEConfig.from_state_dict(sd)
    except (KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{path}: not a Wan2.1 VAE state dict (no encoder.conv1/conv2 keys); {VAE_FIX}") from None


def read_vae_config(path: str | Path) -> VAEConfig:
    """The config of a VAE file from its tensors' shapes (a .pth is memory-mapped: no weights are read)."""
    return _config_of(Path(path), read_state_dict(Path(path), "the Wan2.1 VAE", VAE_FIX))


def load_wan_vae(path: str | Path, config: VAEConfig | None = None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> "WanVAE":
    """Load `Wan2.1_VAE.pth` (or an upstream-named tiny .pth / .safetensors) into a `WanVAE` on `device`."""
    path = Path(path)
    sd = read_state_dict(path, "the Wan2.1 VAE", VAE_FIX)
    config = config or _config_of(path, sd)
    check_keys(path, sd, config.upstream_shapes(), "a Wan2.1 VAE state dict", VAE_FIX)
    model = meta_skeleton(config)
    conv = convert_wan_vae_state_dict(sd, config.num_res_blocks)
    conv = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in conv.items()}
    model.load_state_dict(conv, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return WanVAE(model.to(device), config)


# ---------------------------------------------------------------------------------------------
# The VAE as the pipelines use it
# ---------------------------------------------------------------------------------------------


class WanVAE:
    """`AutoencoderKLWan` + normalisation + the pipelines' chunked encode/decode, on one device."""

    def __init__(self, model, config: VAEConfig):
        self.model = model
        self.config = config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        mean = torch.tensor(config.latent_mean, dtype=torch.float32)
        inv_std = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(config.latent_std, dtype=torch.float32)
        shape = (1, config.z_dim, 1, 1, 1)
        self.mean = mean.to(self.dtype).view(shape).to(self.device)
        self.inv_std = inv_std.to(self.dtype).view(shape).to(self.device)
        self.enc_convs = _causal_convs(model.encoder)
        self.dec_convs = _causal_convs(model.decoder)

    @classmethod
    def load(cls, path, config: VAEConfig | None = None, *, device="cpu", dtype=torch.float32) -> "WanVAE":
        return load_wan_vae(path, config, device=device, dtype=dtype)

    def to(self, device) -> "WanVAE":
        return WanVAE(self.model.to(device), self.config)

    # -- normalisation --------------------------------------------------------------------------
    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu - self.mean) * self.inv_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.inv_std + self.mean

    # -- encode ---------------------------------------------------------------------------------
    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != 3:
            raise InputError(f"video must be [B, 3, T, H, W] pixels in [-1, 1], got shape {tuple(video.shape)}")
        if video.shape[-1] % 8 or video.shape[-2] % 8:
            raise InputError(f"video height and width must be multiples of 8, got {video.shape[-2]}x{video.shape[-1]}")
        return video.to(self.device, self.dtype)

    def _encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder over frame 0, then 4-frame chunks (trailing partial chunk ignored) -> encoder output."""
        cache = [None] * self.enc_convs
        outs = []
        n = 1 + (x.shape[2] - 1) // 4
        for c in range(n):
            chunk = x[:, :, :1] if c == 0 else x[:, :, 1 + 4 * (c - 1): 1 + 4 * c]
            outs.append(self.model.encoder(chunk, feat_cache=cache, feat_idx=[0]))
        return torch.cat(outs, 2)

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """Mean latent `mu` [B, z, 1 + (T-1)//4, H/8, W/8] before normalisation."""
        x = self._check_video(video)
        with torch.no_grad():  # not inference_mode: callers may update the results in place
            h = self.model.quant_conv(self._encode_frames(x))
        return h[:, : self.config.z_dim]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised mean latent, as the pipelines use it."""
        with torch.no_grad():  # not inference_mode: callers may update the results in place
            return self.normalize(self.encode_raw(video))

    # -- the pipelines' encodes -----------------------------------------------------------------
    def encode_reference(self, ref_pixel: torch.Tensor, pipeline: str = "tpp"):
        """Reference latent [1, z, 1, h, w]. TPP: encode of the single frame. Single-GPU: the frame
        repeated to 5 frames, latent frame 1 of that encode."""
        ref = _as_ref(ref_pixel)
        if pipeline == "tpp":
            return self.encode(ref)
        if pipeline == "single":
            return self.encode(ref.repeat(1, 1, 5, 1, 1))[:, :, 1:2]
        raise InputError(f"unknown pipeline {pipeline!r}; use 'tpp' or 'single'")

    def motion_pixels(self, ref_pixel: torch.Tensor, pipeline: str = "tpp", motion_frames: int = MOTION_FRAMES):
        """The pixel clip whose encode gives the initial motion latents (73 or 5*73 frames)."""
        ref = _as_ref(ref_pixel)
        if pipeline == "tpp":
            return ref.repeat(1, 1, motion_frames, 1, 1)
        if pipeline == "single":
            return ref.repeat(1, 1, 5, 1, 1).repeat(1, 1, motion_frames, 1, 1)
        raise InputError(f"unknown pipeline {pipeline!r}; use 'tpp' or 'single'")

    def encode_motion(self, ref_pixel: torch.Tensor, pipeline: str = "tpp", motion_frames: int = MOTION_FRAMES):
        """Initial motion latents: TPP 19 latents (73 frames), single-GPU 92 latents (365 frames)."""
        return self.encode(self.motion_pixels(ref_pixel, pipeline, motion_frames))

    # -- decode ---------------------------------------------------------------------------------
    def streaming_decoder(self, output_device=None, **kw) -> "StreamingDecoder":
        return StreamingDecoder(self, output_device=output_device, **kw)

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Ordinary decode with fresh caches: normalised latents [B, z, n, h, w] -> [B, 3, 1 + 4(n-1), H, W]."""
        return StreamingDecoder(self).decode_chunk(latents, clamp=clamp)


def _as_ref(ref_pixel: torch.Tensor) -> torch.Tensor:
    if ref_pixel.dim() == 4:
        ref_pixel = ref_pixel.unsqueeze(2)
    if ref_pixel.dim() != 5 or ref_pixel.shape[2] != 1:
        raise InputError(f"reference must be [1, 3, 1, H, W] pixels, got shape {tuple(ref_pixel.shape)}")
    return ref_pixel


class StreamingDecoder:
    """Causal decode whose feature caches persist across calls (LiveAvatar's streaming `stream_decode`).

    The caches are never reset within a stream (only `reset()` does). Each call applies de-normalisation,
    `post_quant_conv` (upstream `conv2`) and the clamp to its own chunk, then decodes its latents one
    at a time. `warmup` + `decode_block` reproduce the TPP pipeline's frame bookkeeping.
    """

    def __init__(self, vae: WanVAE, output_device=None, infer_frames: int = INFER_FRAMES,
                 blocks_per_clip: int = BLOCKS_PER_CLIP, warmup_latents: int = WARMUP_LATENTS,
                 first_drop: int = FIRST_DROP):
        self.vae = vae
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.keep_frames = infer_frames // blocks_per_clip
        self.warmup_latents = warmup_latents
        self.first_drop = first_drop
        self.reset()

    def reset(self):
        """Forget all history (a new stream)."""
        self._cache: list = [None] * self.vae.dec_convs
        self._latents_seen = 0
        self._drop_next = 0

    @property
    def latents_seen(self) -> int:
        return self._latents_seen

    def copy(self) -> "StreamingDecoder":
        """A decoder with this one's history (caches cloned) on the same VAE: a warmed-up decoder kept for reuse."""
        clone = copy.copy(self)
        clone._cache = [c.clone() if isinstance(c, torch.Tensor) else c for c in self._cache]
        return clone

    def _run(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        outs = []
        for t in range(x.shape[2]):
            outs.append(self.vae.model.decoder(x[:, :, t:t + 1], feat_cache=self._cache, feat_idx=[0],
                                               first_chunk=first and t == 0))
        return torch.cat(outs, 2)

    def decode_chunk(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """One raw streaming call: normalised latents [1, z, n, h, w] -> all frames this call yields
        (4n frames, or 1 + 4(n-1) on the very first call of a stream)."""
        vae = self.vae
        if latents.dim() == 4:
            latents = latents.unsqueeze(0)
        if latents.dim() != 5 or latents.shape[1] != vae.config.z_dim:
            raise InputError(f"latents must be [B, {vae.config.z_dim}, n, h, w], got shape {tuple(latents.shape)}")
        z = latents.to(vae.device, vae.dtype)
        first = self._latents_seen == 0
        with torch.no_grad():  # not inference_mode: callers may update the results in place
            x = vae.model.post_quant_conv(vae.denormalize(z))
            out = self._run(x, first)
            if clamp:
                out = torch.clamp(out, min=-1.0, max=1.0)
        self._latents_seen += latents.shape[2]
        return out if self.output_device is None else out.to(self.output_device)

    # -- TPP bookkeeping ------------------------------------------------------------------------
    def warmup(self, motion_latents: torch.Tensor) -> torch.Tensor:
        """Decode `motion_latents[:, :, :7]` to fill the caches (the pipeline discards the frames, returned
        here for checking); the next `decode_block` drops its first 3 frames."""
        out = self.decode_chunk(motion_latents[:, :, : self.warmup_latents])
        self._drop_next = self.first_drop
        return out

    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode one block's clean latents and return the frames the pipeline keeps: the last
        `infer_frames / blocks_per_clip` (12), minus the first 3 on the first block after a warm-up."""
        out = self.decode_chunk(latents)
        kept = out[:, :, -self.keep_frames:]
        if self._drop_next:
            kept = kept[:, :, self._drop_next:]
            self._drop_next = 0
        return kept


class SingleGpuClipDecoder:
    """Single-GPU pipeline, default mode: each clip is decoded after sampling as
    `decode(cat(motion_latents_pp, clip))`, keeping the last 48 frames (45 for clip 0); the last 73
    output frames are re-encoded into `motion_latents_pp` for the next clip's decode."""

    def __init__(self, vae: WanVAE, ref_pixel: torch.Tensor, motion_frames: int = MOTION_FRAMES,
                 infer_frames: int = INFER_FRAMES, first_drop: int = FIRST_DROP, output_device=None):
        self.vae = vae
        self.motion_frames = motion_frames
        self.infer_frames = infer_frames
        self.first_drop = first_drop
        self.output_device = torch.device(output_device) if output_device is not None else None
        # The last 365 output frames stay on the CPU (0.6 GB at 704x384 bf16); only their encode runs on the VAE device.
        self.videos_last_frames = vae.motion_pixels(ref_pixel, "single", motion_frames).to("cpu", vae.dtype)
        self.motion_latents = vae.encode(self.videos_last_frames)
        self.clip_index = 0

    def decode_clip(self, clip_latents: torch.Tensor) -> torch.Tensor:
        """clip latents [z, n, h, w] or [1, z, n, h, w] -> the frames the pipeline writes for this clip."""
        vae = self.vae
        if clip_latents.dim() == 4:
            clip_latents = clip_latents.unsqueeze(0)
        z = torch.cat([self.motion_latents, clip_latents.to(vae.device, vae.dtype)], 2)
        video = vae.decode(z)
        kept = video[:, :, -self.infer_frames:]
        if self.clip_index == 0:
            kept = kept[:, :, self.first_drop:]
        n = min(self.motion_frames, kept.shape[2])
        self.videos_last_frames = torch.cat([self.videos_last_frames[:, :, n:], kept[:, :, -n:].to("cpu")], 2)
        self.motion_latents = vae.encode(self.videos_last_frames)
        self.clip_index += 1
        return kept if self.output_device is None else kept.to(self.output_device)


__all__ = [
    "VAEConfig", "WanVAE", "StreamingDecoder", "SingleGpuClipDecoder", "load_wan_vae", "read_vae_config",
    "runtime_dtype", "convert_wan_vae_key", "convert_wan_vae_state_dict", "upstream_keys", "vae_memory_bytes",
    "LATENT_MEAN", "LATENT_STD", "VAE_CHECKPOINT_NAME",
]
