"""4-step flow-matching Euler sampling of a causal block stream, on one device.

This is the single-process reference path; the parallel runtime runs the same pieces on stages.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lowvram.model.cache import CondCache, StepKV
from lowvram.model.config import DiTConfig
from lowvram.model.dit import BlockInputs, LiveAvatarDiT


def flow_schedule(steps: int = 4, shift: float = 3.0, train_steps: int = 1000):
    """Timesteps [steps] and sigmas [steps+1] (float32) of FlowMatchEulerDiscreteScheduler(shift) as used.

    The training schedule is already shifted, so the shift is effectively applied twice (as upstream does).
    """
    sigma_min = np.float32(shift * (1 / train_steps) / (1 + (shift - 1) * (1 / train_steps)))
    u = np.linspace(train_steps, train_steps * float(sigma_min), steps, dtype=np.float64) / train_steps
    sigmas = (shift * u / (1 + (shift - 1) * u)).astype(np.float32)
    timesteps = (sigmas * np.float32(train_steps)).astype(np.float32)
    sigmas = np.append(sigmas, np.float32(0.0))
    return torch.from_numpy(timesteps), torch.from_numpy(sigmas)


def reference_shift(cfg: DiTConfig, frame0: int, relative_dist: int) -> int:
    """RoPE time shift of the reference tokens: the reference stays `relative_dist` frames ahead of the block."""
    return max(0, frame0 - cfg.ref_base_frame + relative_dist)


class ShiftDraws:
    """The per-forward `relative_dist` draws (upstream: unseeded global `random.randint(4, 30)` per call).

    Keyed by (block, step) rather than by call order, so every schedule (sequential, pipeline wavefront,
    tensor-parallel ranks) draws the same values for a seed. `script` pins values for (block, step) keys.
    """

    def __init__(self, cfg: DiTConfig, seed: int | None = None, script: dict[tuple[int, int], int] | None = None):
        self.lo, self.hi = cfg.ref_shift_range
        self.seed = random.SystemRandom().randrange(2**31) if seed is None else seed
        self.script = dict(script or {})

    def __call__(self, block: int, step: int) -> int:
        if (block, step) in self.script:
            return self.script[(block, step)]
        return random.Random(f"{self.seed}:{block}:{step}").randint(self.lo, self.hi)


@dataclass
class Conditioning:
    context: torch.Tensor  # T5 output [Lc, text_dim]
    ref_latents: torch.Tensor  # [1, 16, 1, h, w]
    motion_latents: torch.Tensor  # [1, 16, 19, h, w]


class Stream:
    """Holds the prefilled conditioning cache and the per-step noisy caches of one stream on one device."""

    def __init__(self, model: LiveAvatarDiT, cond: Conditioning, latent_hw: tuple[int, int],
                 draws: Callable[[int, int], int] | None = None, kv_dtype: torch.dtype | None = None,
                 kv_offload: bool = False, ref_update: bool = False):
        self.model = model
        self.cfg = cfg = model.cfg
        self.latent_hw = latent_hw
        ph, pw = cfg.patch_size[1:]
        self.grid = (latent_hw[0] // ph, latent_hw[1] // pw)
        self.fsl = self.grid[0] * self.grid[1]
        self.block_tokens = cfg.frames_per_block * self.fsl
        self.draws = draws or ShiftDraws(cfg)
        self.timesteps, self.sigmas = flow_schedule(cfg.num_steps, cfg.scheduler_shift)
        self.timesteps = self.timesteps.to(next(model.parameters()).device)  # no host-to-GPU copy per forward
        self.time_cache: dict[tuple[int, int], tuple] = {}
        self.audio_cache: tuple = ((None, None), None)  # ((block start, audio tensor), its encoding)
        self.kv_dtype = kv_dtype or model.dtype
        self.kv: list[StepKV | None] = [None] * cfg.num_steps  # allocated on first use of each step
        if kv_offload:  # every step's cache in host RAM, streamed layer by layer
            from lowvram.model.offload import host_caches

            device = next(model.parameters()).device
            self.kv = host_caches(model.layer_ids, cfg.num_steps, cfg.blocks_per_clip * self.block_tokens,
                                  cfg.num_heads // model.tp, cfg.head_dim, self.kv_dtype, device)
        self.conditioning = cond
        self.cond = self.prefill(cond)
        self.next_start = 0
        # Upstream's multi-GPU pipeline (TPP) swaps the reference for the first generated latent frame after
        # clip 0 and re-runs the prefill; its single-GPU default (the fixtures) keeps the image's latent.
        self.ref_update = ref_update
        self.first_frame: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self, cond: Conditioning) -> CondCache:
        m = self.model
        dev = next(m.parameters()).device
        text = m.embed_text(cond.context.to(dev))
        tokens, positions, n_ref = m.embed_cond(cond.ref_latents.to(dev), cond.motion_latents.to(dev))
        _, e6_zero = m.time_modulation(torch.zeros(1, device=tokens.device))
        cache = CondCache(positions=positions.to(dev), num_ref_tokens=n_ref)
        m.prefill_layers(tokens, e6_zero, positions, m.text_kv(text), cache)
        return cache

    def step_kv(self, step: int) -> StepKV:
        if self.kv[step] is None:
            cfg = self.cfg
            device = next(self.model.parameters()).device
            capacity = cfg.blocks_per_clip * self.block_tokens
            self.kv[step] = StepKV(self.model.layer_ids, capacity, cfg.num_heads, cfg.head_dim, self.kv_dtype, device)
        return self.kv[step]

    def block_inputs(self, frames: int, step: int, audio_input, start: int, relative_dist: int | None = None):
        """What every layer needs for one model call (BlockInputs) and the head's time embedding e."""
        m, cfg = self.model, self.cfg
        dev = next(m.parameters()).device
        if (step, frames) not in self.time_cache:  # the same for every block
            self.time_cache[step, frames] = m.time_modulation(self.timesteps[step].expand(frames))
        e, e6 = self.time_cache[step, frames]
        (cached_start, cached_audio), encoded = self.audio_cache
        if cached_start != start or cached_audio is not audio_input:  # a block's 4 steps: encode its audio once
            encoded = m.encode_audio(audio_input.to(dev))
            self.audio_cache = ((start, audio_input), encoded)
        audio_global, audio_tokens = encoded
        rd = self.draws(start // self.block_tokens, step) if relative_dist is None else relative_dist
        inp = BlockInputs(e6=e6, audio_global=audio_global, audio_tokens=audio_tokens, start=start,
                          ref_shift=reference_shift(cfg, start // self.fsl, rd),
                          tokens_per_frame=self.fsl, grid=self.grid)
        return inp, e

    @torch.no_grad()
    def forward(self, x, step: int, audio_input, cond_states, start: int, relative_dist: int | None = None):
        """One model call: block latent x [16, F, h, w] at denoising step `step` -> velocity (float32)."""
        m = self.model
        dev = next(m.parameters()).device
        x, cond_states = x.to(dev), cond_states.to(dev)
        frames = x.shape[1]
        inp, e = self.block_inputs(frames, step, audio_input, start, relative_dist)
        tokens = m.embed_noisy(x, cond_states)
        tokens = m.run_layers(tokens, inp, self.cond, self.step_kv(step))
        return m.head_out(tokens, e, (frames, *self.grid))

    @torch.no_grad()
    def sample_block(self, noise, audio_input, cond_states, on_step=None) -> torch.Tensor:
        """Denoise one block from its noise with the 4-step Euler sampler; returns the clean latent (float32)."""
        x = noise.float().to(next(self.model.parameters()).device)
        start = self.next_start
        clip_tokens = self.cfg.blocks_per_clip * self.block_tokens
        if self.ref_update and start == clip_tokens:
            c = self.conditioning
            self.cond = None  # free the old conditioning cache before building the new one
            self.cond = self.prefill(Conditioning(c.context, self.first_frame, c.motion_latents))
        for i in range(self.cfg.num_steps):
            v = self.forward(x, i, audio_input, cond_states, start)
            x = x + (self.sigmas[i + 1] - self.sigmas[i]) * v
            if on_step is not None:
                on_step(i, v, x)
        if start == 0:
            self.first_frame = x[None, :, :1].clone()
        self.next_start += self.block_tokens
        return x
