"""Model configuration: the Wan2.2-S2V-14B preset (as streamed by LiveAvatar) and tiny test configs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

S2V_14B_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
FPS = 25  # video frames per second: the rate the model generates at and the audio windows assume
UPSTREAM_SEED = 420  # upstream's default --base_seed
INFER_FRAMES = 48  # video frames per clip (upstream's infer_frames): the audio windows and the VAE's decode bookkeeping


@dataclass(frozen=True)
class DiTConfig:
    """Shape of the causal streaming S2V DiT plus the streaming pipeline constants it is run with."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    audio_layers: int = 25  # stacked wav2vec2 hidden states (embedding + 24 layers)
    audio_inject_layers: tuple[int, ...] = S2V_14B_INJECT_LAYERS
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    # Streaming pipeline constants (LiveAvatar's generate()).
    frames_per_block: int = 3  # latent frames per streamed block
    blocks_per_clip: int = 4  # a step's KV cache holds one clip = this many blocks
    motion_latent_frames: int = 19
    motion_pixel_frames: int = 73
    num_steps: int = 4
    scheduler_shift: float = 3.0
    ref_base_frame: int = 30  # RoPE time position of the reference tokens
    ref_shift_range: tuple[int, int] = (4, 30)  # random.randint bounds of the reference shift
    name: str = field(default="custom", compare=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs of the head dim rotated by (time, height, width)."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    def validate(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.dim % (4 * self.num_audio_token) and self.dim % 4:
            raise ValueError("dim must be divisible by 4 for the audio encoder")
        if any(not 0 <= layer < self.num_layers for layer in self.audio_inject_layers):
            raise ValueError(f"audio_inject_layers {self.audio_inject_layers} outside 0..{self.num_layers - 1}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """Build from our own dict or from the checkpoint's `config.json` (diffusers naming); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key not in names:
                continue
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        cfg = cls(**kwargs)
        cfg.validate()
        if "name" not in kwargs and cfg == s2v_14b():
            cfg = dataclasses.replace(cfg, name="s2v-14b")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def s2v_14b() -> DiTConfig:
    """The real model: Wan2.2-S2V-14B DiT with LiveAvatar's streaming settings (16,295,755,609 params)."""
    return DiTConfig(name="s2v-14b")


def tiny(**overrides) -> DiTConfig:
    """A tiny config with every component of the real one (the shape of the shared numerical fixture)."""
    base = dict(
        dim=128, ffn_dim=256, num_heads=4, num_layers=4, text_dim=64, text_len=16,
        audio_dim=32, audio_inject_layers=(0, 2), blocks_per_clip=2, name="tiny",
    )
    base.update(overrides)
    cfg = DiTConfig(**base)
    cfg.validate()
    return cfg

