"""The causal audio encoder: wav2vec2 features of each video frame -> per-latent-frame audio tokens and a global
vector, computed in float32 as upstream's autocast region."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowvram.model.config import DiTConfig
from lowvram.model.fp32 import linear_like_input


class CausalConv1d(nn.Module):
    """Conv1d whose time axis is left-padded with copies of the first column (replicate padding)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 3, stride=stride)

    def forward(self, x):  # [B, C, T] -> [B, out, T']
        """The conv as one GEMM over the 3-sample windows: the same sums, without the GPU conv's weight and
        input layout conversions (~2 ms per forward for the audio encoder's six convs at the real size)."""
        conv = self.conv
        windows = F.pad(x, (2, 0), mode="replicate").unfold(2, 3, conv.stride[0])  # [B, C, T', 3]
        b, c, t, k = windows.shape
        flat = windows.permute(0, 2, 1, 3).reshape(b * t, c * k)
        out = linear_like_input(flat, conv.weight.reshape(conv.out_channels, c * k), conv.bias)
        return out.reshape(b, t, -1).transpose(1, 2)


class MotionEncoder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.num_tokens = cfg.num_audio_token
        self.conv1_local = CausalConv1d(cfg.audio_dim, d)
        self.conv1_global = CausalConv1d(cfg.audio_dim, d // 4)
        self.conv2 = CausalConv1d(d // 4, d // 2, stride=2)
        self.conv3 = CausalConv1d(d // 2, d, stride=2)
        self.final_linear = nn.Linear(d, d)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, d))

    @staticmethod
    def norm_act(x):  # LN over channels of [B, C, T], then SiLU
        return F.silu(F.layer_norm(x.transpose(1, 2), x.shape[1:2], eps=1e-6).transpose(1, 2))

    def shared_tail(self, x):
        return self.norm_act(self.conv3(self.norm_act(self.conv2(self.norm_act(x)))))

    def forward(self, feat):  # feat [A, T]
        x = feat[None]
        local = self.conv1_local(x)  # [1, dim, T]
        groups = local.unflatten(1, (self.num_tokens, -1))[0]  # [4, dim/4, T]
        local = self.shared_tail(groups).permute(2, 0, 1)  # [T', 4, dim]
        pad = self.padding_tokens[0, 0].expand(local.shape[0], 1, -1)
        tokens = torch.cat([local, pad.to(local.dtype)], dim=1)  # [T', 5, dim]
        glob = self.shared_tail(self.conv1_global(x))[0].transpose(0, 1)  # [T', dim]
        return linear_like_input(glob, self.final_linear.weight, self.final_linear.bias), tokens


class CausalAudioEncoder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(1, cfg.audio_layers, 1, 1))
        self.encoder = MotionEncoder(cfg)
        self.prepend = cfg.motion_pixel_frames
        self.drop = cfg.motion_latent_frames

    def forward(self, audio_input: torch.Tensor):
        """audio_input [1, 25, A, frames] -> (global [F, dim], tokens [F, 5, dim]) for the F latent frames."""
        feats = audio_input[0].float()
        feats = torch.cat([feats[..., :1].expand(-1, -1, self.prepend), feats], dim=-1)
        w = F.silu(self.weights.float()[0])  # [25, 1, 1]
        mixed = (feats * w).sum(0) / w.sum()
        dtype = self.encoder.final_linear.weight.dtype
        glob, tokens = self.encoder(mixed)  # in float32, as upstream's autocast region
        return glob[self.drop :].to(dtype), tokens[self.drop :].to(dtype)
