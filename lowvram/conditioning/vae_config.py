"""The Wan2.1 VAE's layout: its config, every upstream (`WanVAE_`) key, and the diffusers (`AutoencoderKLWan`) name of
each (written from the rules of tests/reference/tiny_vae/diffusers_key_map.json)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowvram.errors import CheckpointError

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Pipeline constants (LiveAvatar generate(); tiny_vae/README.md §4-§5).
MOTION_FRAMES = 73
WARMUP_LATENTS = 7
BLOCKS_PER_CLIP = 4
FIRST_DROP = 3


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
        skeleton = meta_skeleton(self).state_dict()
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


def meta_skeleton(config: VAEConfig):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**config.diffusers_kwargs())

