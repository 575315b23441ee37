"""Wan2.1 VAE (`Wan2.1_VAE.pth`) through diffusers' `AutoencoderKLWan`, driven the way LiveAvatar drives it.

* Loading: the pickled float32 state dict is opened with `torch.load(weights_only=True, mmap=True)`,
  renamed to diffusers' names by `convert_wan_vae_state_dict` (written from the rules of
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
  there. `tile=` bounds memory by decoding overlapping spatial tiles, each with its own feature cache
  (optionally parked on the CPU between uses), blended linearly; tiled output is an approximation
  (seams blended), untiled output is exact.
* `vae_memory_bytes(384, 704)` states (computes) the encode/decode working set at 704×384.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowvram.conditioning.text import check_keys, read_state_dict
from lowvram.errors import CheckpointError, InputError

VAE_CHECKPOINT_NAME = "Wan2.1_VAE.pth"
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
CACHE_T = 2

# Pipeline constants (LiveAvatar generate(); tiny_vae/README.md §4-§5).
MOTION_FRAMES = 73
WARMUP_LATENTS = 7
INFER_FRAMES = 48
BLOCKS_PER_CLIP = 4
FIRST_DROP = 3


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    """Shape of WanVAE_ (upstream names) plus the 16 latent normalisation constants."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = field(default=LATENT_MEAN)
    latent_std: tuple[float, ...] = field(default=LATENT_STD)

    @classmethod
    def wan21(cls) -> "VAEConfig":
        """The real Wan2.1 VAE (dim 96, 126,892,531 params, 194 tensors)."""
        return cls()

    @classmethod
    def from_fixture(cls, cfg: dict | str | Path) -> "VAEConfig":
        """From a tiny_vae fixture's `config.json`."""
        if not isinstance(cfg, dict):
            cfg = json.loads(Path(cfg).read_text())
        m = cfg["model"]
        return cls(dim=m["dim"], z_dim=m["z_dim"], dim_mult=tuple(m["dim_mult"]),
                   num_res_blocks=m["num_res_blocks"], attn_scales=tuple(m.get("attn_scales", ())),
                   temperal_downsample=tuple(m["temperal_downsample"]),
                   latent_mean=tuple(cfg.get("latent_mean", LATENT_MEAN)),
                   latent_std=tuple(cfg.get("latent_std", LATENT_STD)))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "VAEConfig":
        """Infer `dim` and `z_dim` from an upstream-named state dict (the rest is Wan2.1's fixed layout)."""
        dim = int(sd["encoder.conv1.weight"].shape[0])
        z_dim = int(sd["conv2.weight"].shape[0])
        return cls(dim=dim, z_dim=z_dim)

    def diffusers_kwargs(self) -> dict:
        return dict(base_dim=self.dim, z_dim=self.z_dim, dim_mult=list(self.dim_mult),
                    num_res_blocks=self.num_res_blocks, attn_scales=list(self.attn_scales),
                    temperal_downsample=list(self.temperal_downsample), dropout=0.0,
                    latents_mean=list(self.latent_mean), latents_std=list(self.latent_std))

    def num_params(self) -> int:
        """Parameter count from the layer layout alone (no diffusers import: `lowvram plan` stays fast)."""
        def conv(cin, cout, k):
            return cout * cin * k + cout

        def res(cin, cout):
            return cin + conv(cin, cout, 27) + cout + conv(cout, cout, 27) + (conv(cin, cout, 1) if cin != cout else 0)

        def middle(c):
            return 2 * res(c, c) + c + conv(c, 3 * c, 1) + conv(c, c, 1)

        d, z, mult, nres = self.dim, self.z_dim, list(self.dim_mult), self.num_res_blocks
        n = conv(2 * z, 2 * z, 1) + conv(z, z, 1)
        dims = [d] + [m * d for m in mult]
        n += conv(3, d, 27)
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            n += sum(res(cin if r == 0 else cout, cout) for r in range(nres))
            if i != len(mult) - 1:
                n += conv(cout, cout, 9) + (conv(cout, cout, 3) if self.temperal_downsample[i] else 0)
        n += middle(dims[-1]) + dims[-1] + conv(dims[-1], 2 * z, 27)
        dims = [mult[-1] * d] + [m * d for m in reversed(mult)]
        n += conv(z, dims[0], 27) + middle(dims[0])
        up = list(reversed(self.temperal_downsample))
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin
            n += sum(res(cin if r == 0 else cout, cout) for r in range(nres + 1))
            if i != len(mult) - 1:
                n += conv(cout, cout // 2, 9) + (conv(cout, 2 * cout, 3) if up[i] else 0)
        return n + dims[-1] + conv(dims[-1], 3, 27)

    def upstream_shapes(self) -> dict[str, tuple[int, ...]]:
        """All upstream keys with their shapes (shapes read off a meta-device diffusers model via the key map)."""
        skeleton = _skeleton(self).state_dict()
        keys = upstream_keys(self)
        mapped = {k: convert_wan_vae_key(k, self.num_res_blocks) for k in keys}
        if sorted(mapped.values()) != sorted(skeleton):  # pragma: no cover - guards a diffusers layout change
            raise CheckpointError("diffusers' AutoencoderKLWan layout differs from Wan2.1's; install diffusers==0.42.1")
        return {k: tuple(skeleton[v].shape) for k, v in mapped.items()}


# ---------------------------------------------------------------------------------------------
# Key conversion upstream (WanVAE_) -> diffusers (AutoencoderKLWan)
# ---------------------------------------------------------------------------------------------

_RES_PARTS = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
              "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
              "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_HEAD_PARTS = {"head.0.gamma": "norm_out.gamma", "head.2.weight": "conv_out.weight", "head.2.bias": "conv_out.bias",
               "conv1.weight": "conv_in.weight", "conv1.bias": "conv_in.bias"}
_TOP = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
        "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}


def _middle(rest: str) -> str:
    m = re.match(r"^middle\.(\d+)\.(.+)$", rest)
    idx, part = int(m.group(1)), m.group(2)
    if idx == 1:  # the attention block keeps its parameter names (norm.gamma, to_qkv.*, proj.*)
        return f"mid_block.attentions.0.{part}"
    return f"mid_block.resnets.{idx // 2}.{_RES_PARTS[part]}"


def convert_wan_vae_key(key: str, num_res_blocks: int = 2) -> str:
    """diffusers `AutoencoderKLWan` name of one upstream `WanVAE_` key."""
    if key in _TOP:
        return _TOP[key]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(key)
    if rest in _HEAD_PARTS:
        return f"{side}.{_HEAD_PARTS[rest]}"
    if rest.startswith("middle."):
        return f"{side}.{_middle(rest)}"
    if side == "encoder":
        m = re.match(r"^downsamples\.(\d+)\.(.+)$", rest)
        if m is None:
            raise KeyError(key)
        part = m.group(2)
        # Encoder stages are flattened: residual blocks and resamplers share one index space.
        new = _RES_PARTS.get(part, part)  # resample.1.* and time_conv.* keep their names
        return f"encoder.down_blocks.{m.group(1)}.{new}"
    m = re.match(r"^upsamples\.(\d+)\.(.+)$", rest)
    if m is None:
        raise KeyError(key)
    idx, part = int(m.group(1)), m.group(2)
    # Decoder: each stage = (num_res_blocks + 1) residual blocks, then one resampler (none after the last).
    per_stage = num_res_blocks + 2
    stage, pos = divmod(idx, per_stage)
    if pos <= num_res_blocks:
        return f"decoder.up_blocks.{stage}.resnets.{pos}.{_RES_PARTS[part]}"
    return f"decoder.up_blocks.{stage}.upsamplers.0.{part}"


def convert_wan_vae_state_dict(sd: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Rename an upstream Wan2.1 VAE state dict to diffusers' names. Shapes are unchanged, no copies."""
    return {convert_wan_vae_key(k, num_res_blocks): v for k, v in sd.items()}


def upstream_keys(config: VAEConfig) -> list[str]:
    """Every key of the upstream `WanVAE_` state dict for this config, enumerated from its module layout."""

    def res(prefix: str, cin: int, cout: int) -> list[str]:
        keys = [f"{prefix}.residual.{p}" for p in ("0.gamma", "2.weight", "2.bias", "3.gamma", "6.weight", "6.bias")]
        if cin != cout:
            keys += [f"{prefix}.shortcut.weight", f"{prefix}.shortcut.bias"]
        return keys

    def resample(prefix: str, temporal: bool) -> list[str]:
        keys = [f"{prefix}.resample.1.weight", f"{prefix}.resample.1.bias"]
        if temporal:
            keys += [f"{prefix}.time_conv.weight", f"{prefix}.time_conv.bias"]
        return keys

    def middle(side: str, c: int) -> list[str]:
        return (res(f"{side}.middle.0", c, c)
                + [f"{side}.middle.1.{p}"
                   for p in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")]
                + res(f"{side}.middle.2", c, c))

    d, mult, nres = config.dim, list(config.dim_mult), config.num_res_blocks
    keys = list(_TOP)
    # encoder
    keys += ["encoder.conv1.weight", "encoder.conv1.bias"]
    dims = [d] + [m * d for m in mult]
    idx = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for r in range(nres):
            keys += res(f"encoder.downsamples.{idx}", cin if r == 0 else cout, cout)
            idx += 1
        if i != len(mult) - 1:
            keys += resample(f"encoder.downsamples.{idx}", config.temperal_downsample[i])
            idx += 1
    keys += middle("encoder", dims[-1]) + ["encoder.head.0.gamma", "encoder.head.2.weight", "encoder.head.2.bias"]
    # decoder
    keys += ["decoder.conv1.weight", "decoder.conv1.bias"]
    dims = [mult[-1] * d] + [m * d for m in reversed(mult)]
    keys += middle("decoder", dims[0])
    up = list(reversed(config.temperal_downsample))
    idx = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            cin //= 2  # the previous stage's resampler halved the channels
        for r in range(nres + 1):
            keys += res(f"decoder.upsamples.{idx}", cin if r == 0 else cout, cout)
            idx += 1
        if i != len(mult) - 1:
            keys += resample(f"decoder.upsamples.{idx}", up[i])
            idx += 1
    keys += ["decoder.head.0.gamma", "decoder.head.2.weight", "decoder.head.2.bias"]
    return keys


def _skeleton(config: VAEConfig):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**config.diffusers_kwargs())


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
    model = _skeleton(config)
    conv = convert_wan_vae_state_dict(sd, config.num_res_blocks)
    conv = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in conv.items()}
    model.load_state_dict(conv, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return WanVAE(model.to(device), config)


# ---------------------------------------------------------------------------------------------
# Tiling helpers
# ---------------------------------------------------------------------------------------------


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every `stride`, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _axis_weights(starts: list[int], length: int, scale: int) -> list[torch.Tensor]:
    """Per tile along one axis: weights of its `length*scale` samples, ramping linearly over the overlap
    with each neighbour (two overlapping ramps sum to 1)."""
    out = []
    n = length * scale
    for k, s in enumerate(starts):
        w = torch.ones(n, dtype=torch.float32)
        if k > 0:
            o = (starts[k - 1] + length - s) * scale
            if o > 0:
                w[:o] = torch.minimum(w[:o], (torch.arange(o, dtype=torch.float32) + 1) / (o + 1))
        if k + 1 < len(starts):
            o = (s + length - starts[k + 1]) * scale
            if o > 0:
                w[n - o:] = torch.minimum(w[n - o:], torch.arange(o, 0, -1, dtype=torch.float32) / (o + 1))
        out.append(w)
    return out


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles in latent units (8 px each): `tile` latents per side, neighbours overlapping `overlap`.

    The default (32 latents = 256 px, overlap 8 = 64 px) matches diffusers' tile geometry; 704x384 gives
    2 x 4 tiles. Each tile is decoded with its own feature cache (zero padding at tile borders), so tiled
    output approximates the untiled one; a tile covering the whole frame is exact.
    """

    tile: int = 32
    overlap: int = 8
    offload_cache: bool = False  # park each tile's feature cache on the CPU between uses

    def __post_init__(self):
        if self.tile < 2 or not 0 <= self.overlap < self.tile:
            raise InputError(f"bad VAE tiling (tile {self.tile}, overlap {self.overlap}); need tile >= 2 and "
                             "0 <= overlap < tile (latent units)")

    def grid(self, h: int, w: int, scale: int = 1):
        """[(row0, col0, rows, cols, weight[rows*scale, cols*scale])] covering an h x w latent grid."""
        th, tw = min(self.tile, h), min(self.tile, w)
        stride = self.tile - self.overlap
        rs, cs = _starts(h, th, stride), _starts(w, tw, stride)
        wr, wc = _axis_weights(rs, th, scale), _axis_weights(cs, tw, scale)
        return [(r, c, th, tw, wr[a][:, None] * wc[b][None, :]) for a, r in enumerate(rs) for b, c in enumerate(cs)]


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

    def encode_raw(self, video: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
        """Mean latent `mu` [B, z, 1 + (T-1)//4, H/8, W/8] before normalisation."""
        x = self._check_video(video)
        with torch.no_grad():  # not inference_mode: callers may update the results in place
            if tiling is None:
                h = self.model.quant_conv(self._encode_frames(x))
            else:
                h = self._tiled_encode(x, tiling)
        return h[:, : self.config.z_dim]

    def encode(self, video: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
        """Normalised mean latent, as the pipelines use it."""
        with torch.no_grad():  # not inference_mode: callers may update the results in place
            return self.normalize(self.encode_raw(video, tiling))

    def _tiled_encode(self, x: torch.Tensor, tiling: Tiling) -> torch.Tensor:
        B, _, T, H, W = x.shape
        lh, lw = H // 8, W // 8
        acc = wsum = None
        for (i, j, th, tw, wt) in tiling.grid(lh, lw):
            tile = x[:, :, :, i * 8:(i + th) * 8, j * 8:(j + tw) * 8]
            h = self.model.quant_conv(self._encode_frames(tile)).float()
            if acc is None:
                acc = h.new_zeros(B, h.shape[1], h.shape[2], lh, lw)
                wsum = h.new_zeros(1, 1, 1, lh, lw)
            wt = wt.to(h.device)
            acc[..., i:i + th, j:j + tw] += h * wt
            wsum[..., i:i + th, j:j + tw] += wt
        return (acc / wsum).to(self.dtype)

    # -- the pipelines' encodes -----------------------------------------------------------------
    def encode_reference(self, ref_pixel: torch.Tensor, pipeline: str = "tpp", tiling: Tiling | None = None):
        """Reference latent [1, z, 1, h, w]. TPP: encode of the single frame. Single-GPU: the frame
        repeated to 5 frames, latent frame 1 of that encode."""
        ref = _as_ref(ref_pixel)
        if pipeline == "tpp":
            return self.encode(ref, tiling)
        if pipeline == "single":
            return self.encode(ref.repeat(1, 1, 5, 1, 1), tiling)[:, :, 1:2]
        raise InputError(f"unknown pipeline {pipeline!r}; use 'tpp' or 'single'")

    def motion_pixels(self, ref_pixel: torch.Tensor, pipeline: str = "tpp", motion_frames: int = MOTION_FRAMES):
        """The pixel clip whose encode gives the initial motion latents (73 or 5*73 frames)."""
        ref = _as_ref(ref_pixel)
        if pipeline == "tpp":
            return ref.repeat(1, 1, motion_frames, 1, 1)
        if pipeline == "single":
            return ref.repeat(1, 1, 5, 1, 1).repeat(1, 1, motion_frames, 1, 1)
        raise InputError(f"unknown pipeline {pipeline!r}; use 'tpp' or 'single'")

    def encode_motion(self, ref_pixel: torch.Tensor, pipeline: str = "tpp", motion_frames: int = MOTION_FRAMES,
                      tiling: Tiling | None = None):
        """Initial motion latents: TPP 19 latents (73 frames), single-GPU 92 latents (365 frames)."""
        return self.encode(self.motion_pixels(ref_pixel, pipeline, motion_frames), tiling)

    # -- decode ---------------------------------------------------------------------------------
    def streaming_decoder(self, tiling: Tiling | None = None, output_device=None, **kw) -> "StreamingDecoder":
        return StreamingDecoder(self, tiling=tiling, output_device=output_device, **kw)

    def decode(self, latents: torch.Tensor, tiling: Tiling | None = None, clamp: bool = True) -> torch.Tensor:
        """Ordinary decode with fresh caches: normalised latents [B, z, n, h, w] -> [B, 3, 1 + 4(n-1), H, W]."""
        return StreamingDecoder(self, tiling=tiling).decode_chunk(latents, clamp=clamp)


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

    def __init__(self, vae: WanVAE, tiling: Tiling | None = None, output_device=None,
                 infer_frames: int = INFER_FRAMES, blocks_per_clip: int = BLOCKS_PER_CLIP,
                 warmup_latents: int = WARMUP_LATENTS, first_drop: int = FIRST_DROP):
        self.vae = vae
        self.tiling = tiling
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.keep_frames = infer_frames // blocks_per_clip
        self.warmup_latents = warmup_latents
        self.first_drop = first_drop
        self.reset()

    def reset(self):
        """Forget all history (a new stream)."""
        self._caches: dict = {}
        self._latents_seen = 0
        self._drop_next = 0
        self._grid_key = None

    @property
    def latents_seen(self) -> int:
        return self._latents_seen

    def copy(self) -> "StreamingDecoder":
        """A decoder with this one's history (caches cloned) on the same VAE: a warmed-up decoder kept for reuse."""
        clone = copy.copy(self)
        clone._caches = {k: [c.clone() if isinstance(c, torch.Tensor) else c for c in cache]
                         for k, cache in self._caches.items()}
        return clone

    def _cache_for(self, key):
        if key not in self._caches:
            self._caches[key] = [None] * self.vae.dec_convs
        return self._caches[key]

    def _run(self, x: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        outs = []
        for t in range(x.shape[2]):
            outs.append(self.vae.model.decoder(x[:, :, t:t + 1], feat_cache=cache, feat_idx=[0],
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
            if self.tiling is None:
                out = self._run(x, self._cache_for("full"), first)
            else:
                out = self._tiled(x, first)
            if clamp:
                out = torch.clamp(out, min=-1.0, max=1.0)
        self._latents_seen += latents.shape[2]
        return out if self.output_device is None else out.to(self.output_device)

    def _tiled(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        B, _, n, h, w = x.shape
        if self._grid_key is None:
            self._grid_key = (h, w)
        elif self._grid_key != (h, w):
            raise InputError(f"latent size changed within a stream ({self._grid_key} -> {(h, w)}); call reset() first")
        acc = wsum = None
        for (i, j, th, tw, wt) in self.tiling.grid(h, w, 8):
            cache = self._cache_for((i, j))
            if self.tiling.offload_cache:
                cache[:] = [c.to(x.device) if isinstance(c, torch.Tensor) else c for c in cache]
            out = self._run(x[..., i:i + th, j:j + tw], cache, first)
            if self.tiling.offload_cache:
                cache[:] = [c.to("cpu") if isinstance(c, torch.Tensor) else c for c in cache]
            if acc is None:
                acc = torch.zeros(B, out.shape[1], out.shape[2], h * 8, w * 8, device=out.device, dtype=torch.float32)
                wsum = torch.zeros(1, 1, 1, h * 8, w * 8, device=out.device, dtype=torch.float32)
            wt = wt.to(out.device)
            acc[..., i * 8:(i + th) * 8, j * 8:(j + tw) * 8] += out.float() * wt
            wsum[..., i * 8:(i + th) * 8, j * 8:(j + tw) * 8] += wt
        return (acc / wsum).to(x.dtype)

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
                 infer_frames: int = INFER_FRAMES, first_drop: int = FIRST_DROP,
                 tiling: Tiling | None = None, output_device=None):
        self.vae = vae
        self.motion_frames = motion_frames
        self.infer_frames = infer_frames
        self.first_drop = first_drop
        self.tiling = tiling
        self.output_device = torch.device(output_device) if output_device is not None else None
        # The last 365 output frames stay on the CPU (0.6 GB at 704x384 bf16); only their encode runs on the VAE device.
        self.videos_last_frames = vae.motion_pixels(ref_pixel, "single", motion_frames).to("cpu", vae.dtype)
        self.motion_latents = vae.encode(self.videos_last_frames, tiling)
        self.clip_index = 0

    def decode_clip(self, clip_latents: torch.Tensor) -> torch.Tensor:
        """clip latents [z, n, h, w] or [1, z, n, h, w] -> the frames the pipeline writes for this clip."""
        vae = self.vae
        if clip_latents.dim() == 4:
            clip_latents = clip_latents.unsqueeze(0)
        z = torch.cat([self.motion_latents, clip_latents.to(vae.device, vae.dtype)], 2)
        video = vae.decode(z, self.tiling)
        kept = video[:, :, -self.infer_frames:]
        if self.clip_index == 0:
            kept = kept[:, :, self.first_drop:]
        n = min(self.motion_frames, kept.shape[2])
        self.videos_last_frames = torch.cat([self.videos_last_frames[:, :, n:], kept[:, :, -n:].to("cpu")], 2)
        self.motion_latents = vae.encode(self.videos_last_frames, self.tiling)
        self.clip_index += 1
        return kept if self.output_device is None else kept.to(self.output_device)


# ---------------------------------------------------------------------------------------------
# Memory (computed)
# ---------------------------------------------------------------------------------------------


def _res_transient(ci: int, co: int, T: int, h: int, w: int, b: int) -> int:
    """Live bytes at the worst moment of one residual block (input, shortcut, SiLU output, the cache-
    concatenated input, its zero-padded copy and the conv output; fp32 norm temporary for half types)."""
    P, Pp = h * w, (h + 2) * (w + 2)
    worst = 0
    for c_in, c_out in ((ci, co), (co, co)):
        live = ci * T * P * b + (co * T * P * b if ci != co else 0) + c_in * T * P * b
        # padded input + (cache-concatenated input | output) + a convolution workspace of about the padded
        # input's size (what cuDNN's implicit-GEMM algorithms took in the H100 measurement)
        conv = 2 * c_in * (T + 2) * Pp * b + max(c_in * (T + 2) * P * b, c_out * T * P * b)
        norm = c_in * T * P * 4 if b < 4 else 0
        worst = max(worst, live + max(conv, norm))
    return worst


def _up_transient(C: int, T: int, h: int, w: int, b: int, temporal: bool) -> int:
    """Live bytes of one upsampler: the (time-doubled) input, the nearest x2 copy in fp32 (plus its cast
    back for half types) and the Conv2d output (C/2 channels)."""
    T2 = 2 * T if temporal else T
    P, P4 = h * w, 4 * h * w
    time_conv = (C * T * P + 2 * C * T * P) * b if temporal else 0
    up = C * T * P * b + C * T2 * P * b + C * T2 * P4 * 4 + (C * T2 * P4 * b if b < 4 else 0) + C // 2 * T2 * P4 * b
    return max(time_conv, up)


def _down_transient(C: int, T: int, h: int, w: int, b: int) -> int:
    """Live bytes of one spatial downsampler: input, frame-major copy, padded copy, stride-2 output."""
    P = h * w
    return C * T * P * b * 2 + C * T * (h + 1) * (w + 1) * b + C * T * (P // 4) * b


def _attn_transient(C: int, h: int, w: int, b: int) -> int:
    """Middle attention of one frame: qkv (3C), contiguous copy, scores+softmax in fp32 (math kernel)."""
    P = h * w
    return 2 * 3 * C * P * b + 2 * P * P * 4 + C * P * b


def vae_memory_bytes(height: int = 384, width: int = 704, config: VAEConfig | None = None,
                     dtype: torch.dtype = torch.bfloat16, tiling: Tiling | None = None) -> dict[str, int]:
    """Computed (not measured) device memory of the VAE at one resolution, batch 1, in bytes.

    decode (streaming, one latent in flight = 4 output frames): weights + persistent feature caches
    (the last 2 input frames of every causal conv, kept across calls) + the largest transient of one
    layer. encode (4-frame chunks): the same for the encoder (its caches live for one encode call).
    With `tiling` the caches and transients are one tile's; the caches of all tiles are summed unless
    `offload_cache` parks them on the CPU. Convolution workspaces are modelled as one padded-input copy;
    allocator slack is not included.

    At 704x384 this gives (GiB) bf16: decode 2.97 (weights 0.24 + caches 1.19 + transient 1.55), encode
    2.32; fp32: decode 5.39, encode 4.64; bf16 tiled (default tiles, caches offloaded): decode 0.92.
    Measured with `measure_vae_memory` on an H100 (torch 2.11, cuDNN): bf16 decode 3.12 (caches 1.19),
    encode 2.52; fp32 decode 6.25, encode 5.05; bf16 tiled+offload decode 1.03, encode 0.89 — the
    computed figures are 5-15 % low (cuDNN algorithm workspaces vary).
    """
    c = config or VAEConfig.wan21()
    b = torch.empty((), dtype=dtype).element_size()
    d, mult, nres = c.dim, list(c.dim_mult), c.num_res_blocks
    weights = c.num_params() * b

    def decoder(H: int, W: int) -> tuple[int, int]:
        h, w, T = H // 8, W // 8, 1
        dims = [mult[-1] * d] + [m * d for m in reversed(mult)]
        caches = CACHE_T * c.z_dim * h * w * b                       # conv_in
        peak = _res_transient(c.z_dim, dims[0], T, h, w, b)
        caches += 4 * CACHE_T * dims[0] * h * w * b                   # middle: 2 residual blocks
        peak = max(peak, _res_transient(dims[0], dims[0], T, h, w, b), _attn_transient(dims[0], h, w, b))
        up = list(reversed(c.temperal_downsample))
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin
            for r in range(nres + 1):
                ci = cin if r == 0 else cout
                caches += CACHE_T * (ci + cout) * h * w * b
                peak = max(peak, _res_transient(ci, cout, T, h, w, b))
            if i != len(mult) - 1:
                if up[i]:
                    caches += CACHE_T * cout * h * w * b
                peak = max(peak, _up_transient(cout, T, h, w, b, up[i]))
                T, h, w = (2 * T if up[i] else T), 2 * h, 2 * w
        caches += CACHE_T * dims[-1] * h * w * b                      # head conv
        peak = max(peak, _res_transient(dims[-1], 3, T, h, w, b))
        return caches, peak

    def encoder(H: int, W: int) -> tuple[int, int]:
        h, w, T = H, W, 4
        dims = [d] + [m * d for m in mult]
        caches = CACHE_T * 3 * h * w * b + 3 * MOTION_FRAMES * H * W * b  # conv_in + the 73-frame input clip
        peak = _res_transient(3, d, T, h, w, b)
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for r in range(nres):
                ci = cin if r == 0 else cout
                caches += CACHE_T * (ci + cout) * h * w * b
                peak = max(peak, _res_transient(ci, cout, T, h, w, b))
            if i != len(mult) - 1:
                peak = max(peak, _down_transient(cout, T, h, w, b))
                h, w = h // 2, w // 2
                if c.temperal_downsample[i]:
                    caches += cout * h * w * b                        # last frame kept by the time conv
                    T = max(1, T // 2)
        caches += 5 * CACHE_T * dims[-1] * h * w * b                  # middle (4 convs) + head conv
        peak = max(peak, _attn_transient(dims[-1], h, w, b))
        return caches, peak

    out = {"weights": weights, "dtype_bytes": b}
    for name, walk in (("decode", decoder), ("encode", encoder)):
        if tiling is None:
            caches, peak = walk(height, width)
        else:
            grid = tiling.grid(height // 8, width // 8)
            th, tw = grid[0][2], grid[0][3]
            caches, peak = walk(th * 8, tw * 8)
            if name == "decode" and not tiling.offload_cache:
                caches *= len(grid)
            peak += 2 * 3 * 4 * height * width * 4                    # fp32 blend accumulators
        out[f"{name}_caches"] = caches
        out[f"{name}_transient"] = peak
        out[f"{name}_peak"] = weights + caches + peak
    return out


def measure_vae_memory(vae: WanVAE, height: int = 384, width: int = 704, tiling: Tiling | None = None,
                       blocks: int = 3, motion_frames: int = MOTION_FRAMES) -> dict[str, float]:
    """Measured (CUDA): the TPP sequence at one resolution on `vae.device` — reference + motion encode, then
    streaming decode (warm-up + `blocks` blocks). Peak bytes include the weights; times are per call.

    H100 at 704x384 (GiB; s per 3-latent block): bf16 encode 2.52, decode 3.12, 0.22 s/block; bf16 tiled
    2x4 tiles with caches offloaded: encode 0.89, decode 1.03, 0.99 s/block; fp32: encode 5.05, decode
    6.25, 0.35 s/block. Tiles without offload do not lower the decode peak at this size (caches 2.3 GiB).
    """
    import time

    dev = vae.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(dev)
    ref = torch.rand(1, 3, 1, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    vae.encode_reference(ref, "tpp", tiling)
    motion = vae.encode_motion(ref, "tpp", motion_frames, tiling)
    torch.cuda.synchronize(dev)
    enc_s = time.perf_counter() - t0
    enc_peak = torch.cuda.max_memory_allocated(dev)
    dec = vae.streaming_decoder(tiling=tiling, output_device="cpu")
    torch.cuda.reset_peak_memory_stats(dev)
    dec.warmup(motion)
    times = []
    lat = torch.randn(1, vae.config.z_dim, 3, height // 8, width // 8, generator=torch.Generator().manual_seed(1))
    for _ in range(blocks):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        dec.decode_block(lat)
        torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    dec_peak = torch.cuda.max_memory_allocated(dev)
    caches = torch.cuda.memory_allocated(dev) - weights - motion.numel() * motion.element_size()
    return {"weights": weights, "encode_peak": enc_peak, "decode_peak": dec_peak, "decode_caches": caches,
            "reserved_peak": torch.cuda.max_memory_reserved(dev), "encode_s": enc_s,
            "decode_block_s": min(times) if times else float("nan")}


__all__ = [
    "VAEConfig", "WanVAE", "StreamingDecoder", "SingleGpuClipDecoder", "Tiling", "load_wan_vae", "runtime_dtype",
    "convert_wan_vae_key", "convert_wan_vae_state_dict", "upstream_keys", "vae_memory_bytes", "measure_vae_memory",
    "LATENT_MEAN", "LATENT_STD",
]
