"""4-step flow-matching Euler sampling of a causal block stream: the sampler's steps, and its sequential schedule.

The steps, pure (a model and tensors in, tensors out; no loop, no placement):
- `prefill_inputs` / `prefill`: the reference + motion tokens, the text and the t=0 modulation, through the layers
- `TimeModulation`: each denoising step's time modulation, the same for every block (computed once)
- `encode_block_audio`: a block's audio tokens, the same for its 4 steps
- `block_inputs`: what every layer of one forward needs (`BlockInputs`), including the reference RoPE shift
- `euler_step`: the flow-matching update
- `swaps_reference` / `first_latent_frame`: upstream's multi-GPU pipeline (TPP) makes the first generated latent
  frame the reference after clip 0 and re-runs the prefill

The schedules over them, each taking one `StreamInputs`: `Stream` below (one process, block after block: the
parity-tested path), the pipeline engine (`lowvram/parallel/engine.py`: stages over layers, a wavefront of
(block, step) items, point-to-point sends) and calibration (`quantize/calibrate.py`: all samples in lock-step,
one layer's weights at a time).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lowvram.model.cache import CondCache, StepKV
from lowvram.model.config import DiTConfig
from lowvram.model.dit import BlockInputs, LiveAvatarDiT

LATENT_CHANNELS = 16


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
    tensor-parallel ranks, calibration) draws the same values for a seed. `script` pins values for (block, step) keys.
    """

    def __init__(self, cfg: DiTConfig, seed: int | None = None, script: dict[tuple[int, int], int] | None = None):
        self.lo, self.hi = cfg.ref_shift_range
        self.seed = random.SystemRandom().randrange(2**31) if seed is None else seed
        self.script = dict(script or {})

    def __call__(self, block: int, step: int) -> int:
        if (block, step) in self.script:
            return self.script[(block, step)]
        return random.Random(f"{self.seed}:{block}:{step}").randint(self.lo, self.hi)


def shift_script(cfg: DiTConfig, shifts: list[int] | None) -> dict[tuple[int, int], int] | None:
    """A scripted relative_dist list (block-major, one per step) -> ShiftDraws' (block, step) keys."""
    if not shifts:
        return None
    return {(i // cfg.num_steps, i % cfg.num_steps): int(v) for i, v in enumerate(shifts)}


# ----- the one input type ---------------------------------------------------------------------------------------


@dataclass
class StreamInputs:
    """Everything the DiT consumes for one stream: what `run` computes once before the DiT loads, what a
    calibration sample holds, what the fixture tests feed. The prefill needs only the first three."""

    context: torch.Tensor  # T5 output [Lc, text_dim]
    ref_latents: torch.Tensor  # [1, 16, 1, h, w]
    motion_latents: torch.Tensor  # [1, 16, T, h, w]; FramePack takes the newest motion_latent_frames
    audio: torch.Tensor | None = None  # [1, 25, A, 4F * num_blocks] wav2vec2 features per video frame
    num_blocks: int = 0
    seed: int = 0  # the reference-shift draws and, without `noise`, each clip's noise (`clip_noise`)
    latent_hw: tuple[int, int] | None = None  # default: the reference latent's
    noise: torch.Tensor | None = None  # [16, F * num_blocks, h, w] given initial noise (calibration samples)
    pose: torch.Tensor | None = None  # cond_states [1, 16, F * num_blocks, h, w]; None = zeros (no pose video)
    shifts: list[int] | None = None  # scripted relative_dist draws (block-major, one per step) instead of `seed`
    name: str = ""

    def __post_init__(self):
        if self.latent_hw is None:
            self.latent_hw = tuple(self.ref_latents.shape[-2:])

    @property
    def shift_seed(self) -> int:  # the calibration samples' name for it
        return self.seed

    def draws(self, cfg: DiTConfig) -> ShiftDraws:
        return ShiftDraws(cfg, seed=self.seed, script=shift_script(cfg, self.shifts))

    def block_audio(self, b: int, frames_per_block: int) -> torch.Tensor:
        n = 4 * frames_per_block
        return self.audio[..., n * b : n * (b + 1)]

    def block_noise(self, b: int, cfg: DiTConfig) -> torch.Tensor:
        f = cfg.frames_per_block
        if self.noise is not None:
            return self.noise[:, f * b : f * (b + 1)]
        clip, within = divmod(b, cfg.blocks_per_clip)
        return clip_noise(cfg, self, clip)[:, within * f : (within + 1) * f]

    def block_pose(self, b: int, frames_per_block: int, device: torch.device | str = "cpu") -> torch.Tensor:
        f = frames_per_block
        if self.pose is not None:
            return self.pose[..., f * b : f * (b + 1), :, :].to(device)
        return torch.zeros(1, LATENT_CHANNELS, f, *self.latent_hw, device=device)  # made there: no copy per forward

    @property
    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(noise, audio, pose) of each block of a stream with given noise (a calibration sample)."""
        f = self.noise.shape[1] // self.num_blocks
        return [(self.noise[:, f * b : f * (b + 1)], self.block_audio(b, f), self.block_pose(b, f))
                for b in range(self.num_blocks)]




def clip_noise(cfg: DiTConfig, inputs: StreamInputs, clip: int) -> torch.Tensor:
    """Initial noise of one clip from a CPU generator seeded (seed + clip): identical on every layout."""
    g = torch.Generator().manual_seed(inputs.seed + clip)
    h, w = inputs.latent_hw
    return torch.randn(cfg.in_dim, cfg.frames_per_block * cfg.blocks_per_clip, h, w, generator=g)


# ----- the steps --------------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def token_grid(cfg: DiTConfig, latent_hw: tuple[int, int]) -> tuple[tuple[int, int], int, int]:
    """(rows, cols) of one latent frame's tokens, tokens per latent frame, tokens per block."""
    ph, pw = cfg.patch_size[1:]
    grid = (latent_hw[0] // ph, latent_hw[1] // pw)
    per_frame = grid[0] * grid[1]
    return grid, per_frame, cfg.frames_per_block * per_frame


@dataclass
class PrefillInputs:
    """What the prefill feeds through the layers: computed by the first stage, sent on to the others."""

    text: torch.Tensor  # embedded, padded text [text_len, dim]
    tokens: torch.Tensor  # reference + FramePack motion tokens [Tc, dim]
    positions: torch.Tensor  # int64 [Tc, 3] their RoPE positions (reference unshifted)
    num_ref_tokens: int
    e6_zero: torch.Tensor  # [1, 6, dim] the t=0 modulation the conditioning tokens use


def prefill_inputs(model: LiveAvatarDiT, inputs: StreamInputs) -> PrefillInputs:
    dev = model_device(model)
    text = model.embed_text(inputs.context.to(dev))
    tokens, positions, n_ref = model.embed_cond(inputs.ref_latents.to(dev), inputs.motion_latents.to(dev))
    _, e6_zero = model.time_modulation(torch.zeros(1, device=tokens.device))
    return PrefillInputs(text, tokens, positions, n_ref, e6_zero)


def prefill(model: LiveAvatarDiT, pre: PrefillInputs) -> tuple[CondCache, torch.Tensor]:
    """The conditioning tokens through this model's layers at t=0: their cache (keys before RoPE, text K/V) and
    the tokens coming out (the next stage's input)."""
    cache = CondCache(positions=pre.positions.to(model_device(model)), num_ref_tokens=pre.num_ref_tokens)
    tokens = model.prefill_layers(pre.tokens, pre.e6_zero, pre.positions, model.text_kv(pre.text), cache)
    return cache, tokens


class TimeModulation:
    """The schedule (timesteps, sigmas) and each step's time modulation (e [F, dim], e6 [F, 6, dim]), the same for
    every block, so computed once per (step, frames)."""

    def __init__(self, model: LiveAvatarDiT):
        self.model = model
        timesteps, self.sigmas = flow_schedule(model.cfg.num_steps, model.cfg.scheduler_shift)
        self.timesteps = timesteps.to(model_device(model))  # no host-to-GPU copy (and wait) per forward
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, step: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (step, frames) not in self.cache:
            self.cache[step, frames] = self.model.time_modulation(self.timesteps[step].expand(frames))
        return self.cache[step, frames]


def encode_block_audio(model: LiveAvatarDiT, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's audio conditioning: (global [F, dim], tokens [F, 5, dim]) in the weights' dtype (as sent on)."""
    audio_global, audio_tokens = model.encode_audio(audio.to(model_device(model)))
    return audio_global.to(model.dtype), audio_tokens.to(model.dtype)


def block_inputs(cfg: DiTConfig, grid: tuple[int, int], e6: torch.Tensor, audio: tuple[torch.Tensor, torch.Tensor],
                 start: int, relative_dist: int) -> BlockInputs:
    """What every layer needs for one forward of the block at token offset `start`."""
    per_frame = grid[0] * grid[1]
    return BlockInputs(e6=e6, audio_global=audio[0], audio_tokens=audio[1], start=start,
                       ref_shift=reference_shift(cfg, start // per_frame, relative_dist), tokens_per_frame=per_frame,
                       grid=grid)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, step: int) -> torch.Tensor:
    return x + (sigmas[step + 1] - sigmas[step]) * v


def swaps_reference(cfg: DiTConfig, block: int, ref_update: bool) -> bool:
    """Upstream TPP: clip 1's first block starts from a new reference (only reached with more than one clip)."""
    return ref_update and block == cfg.blocks_per_clip


def first_latent_frame(x: torch.Tensor) -> torch.Tensor:
    """Block 0's clean latent [C, F, h, w] -> its first frame [1, C, 1, h, w], the reference after the swap."""
    return x[None, :, :1].clone(memory_format=torch.contiguous_format)


def with_reference(inputs: StreamInputs, ref_latents: torch.Tensor) -> StreamInputs:
    return dataclasses.replace(inputs, ref_latents=ref_latents)


# ----- the sequential schedule ------------------------------------------------------------------------------------


class Stream:
    """One stream on one device, driven block by block (`sample_block`) or forward by forward (`forward`): the
    prefilled conditioning cache and the per-step noisy caches."""

    def __init__(self, model: LiveAvatarDiT, cond: StreamInputs, latent_hw: tuple[int, int],
                 draws: Callable[[int, int], int] | None = None, kv_dtype: torch.dtype | None = None,
                 kv_offload: bool = False, ref_update: bool = False):
        self.model = model
        self.cfg = cfg = model.cfg
        self.latent_hw = latent_hw
        self.grid, self.fsl, self.block_tokens = token_grid(cfg, latent_hw)
        self.draws = draws or ShiftDraws(cfg)
        self.times = TimeModulation(model)
        self.timesteps, self.sigmas = self.times.timesteps, self.times.sigmas
        self.audio_cache: tuple = ((None, None), None)  # ((block start, audio tensor), its encoding)
        self.kv_dtype = kv_dtype or model.dtype
        self.kv: list[StepKV | None] = [None] * cfg.num_steps  # allocated on first use of each step
        if kv_offload:  # every step's cache in host RAM, streamed layer by layer
            from lowvram.model.offload import host_caches

            self.kv = host_caches(model.layer_ids, cfg.num_steps, cfg.blocks_per_clip * self.block_tokens,
                                  cfg.num_heads // model.tp, cfg.head_dim, self.kv_dtype, model_device(model))
        self.conditioning = cond
        self.cond = self.prefill(cond)
        self.next_start = 0
        self.ref_update = ref_update
        self.first_frame: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self, cond: StreamInputs) -> CondCache:
        return prefill(self.model, prefill_inputs(self.model, cond))[0]

    def step_kv(self, step: int) -> StepKV:
        if self.kv[step] is None:
            cfg = self.cfg
            capacity = cfg.blocks_per_clip * self.block_tokens
            self.kv[step] = StepKV(self.model.layer_ids, capacity, cfg.num_heads, cfg.head_dim, self.kv_dtype,
                                   model_device(self.model))
        return self.kv[step]

    def block_inputs(self, frames: int, step: int, audio_input, start: int, relative_dist: int | None = None):
        """What every layer needs for one model call (BlockInputs) and the head's time embedding e."""
        e, e6 = self.times(step, frames)
        (cached_start, cached_audio), encoded = self.audio_cache
        if cached_start != start or cached_audio is not audio_input:  # a block's 4 steps: encode its audio once
            encoded = encode_block_audio(self.model, audio_input)
            self.audio_cache = ((start, audio_input), encoded)
        rd = self.draws(start // self.block_tokens, step) if relative_dist is None else relative_dist
        return block_inputs(self.cfg, self.grid, e6, encoded, start, rd), e

    @torch.no_grad()
    def forward(self, x, step: int, audio_input, cond_states, start: int, relative_dist: int | None = None):
        """One model call: block latent x [16, F, h, w] at denoising step `step` -> velocity (float32)."""
        m = self.model
        dev = model_device(m)
        x, cond_states = x.to(dev), cond_states.to(dev)
        frames = x.shape[1]
        inp, e = self.block_inputs(frames, step, audio_input, start, relative_dist)
        tokens = m.embed_noisy(x, cond_states)
        tokens = m.run_layers(tokens, inp, self.cond, self.step_kv(step))
        return m.head_out(tokens, e, (frames, *self.grid))

    @torch.no_grad()
    def sample_block(self, noise, audio_input, cond_states, on_step=None) -> torch.Tensor:
        """Denoise one block from its noise with the 4-step Euler sampler; returns the clean latent (float32)."""
        x = noise.float().to(model_device(self.model))
        start = self.next_start
        block = start // self.block_tokens
        if swaps_reference(self.cfg, block, self.ref_update):
            self.cond = None  # free the old conditioning cache before building the new one
            self.cond = self.prefill(with_reference(self.conditioning, self.first_frame))
        for i in range(self.cfg.num_steps):
            v = self.forward(x, i, audio_input, cond_states, start)
            x = euler_step(x, v, self.sigmas, i)
            if on_step is not None:
                on_step(i, v, x)
        if block == 0:
            self.first_frame = first_latent_frame(x)
        self.next_start += self.block_tokens
        return x
