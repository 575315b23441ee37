"""The parallel DiT engine: pipeline stages over layers fed a wavefront of (block, step) items, tensor
parallelism inside a stage, one process per rank over torch.distributed (NCCL when every rank has its own GPU,
gloo on CPU and between ranks that share a GPU).

Under timestep forcing, step s of block b needs only the latent of (b, s-1) and step s's KV cache of the
previous blocks, so (b, 3), (b+1, 2), (b+2, 1), (b+3, 0) are independent. Every rank walks the same static
schedule: blocks in chunks of `pp`; within a chunk, step by step, block by block. Item (b, s) then enters
stage 0 exactly `pp` slots after (b, s-1) did, which is when (b, s-1) has left the last stage: all stages stay
busy and the order needs no negotiation. Stage k sends the hidden states of each item to stage k+1; the last
stage applies the head and the Euler step and returns the latent to stage 0 for the next step. TP rank r of a
stage talks only to TP rank r of its neighbours (activations are replicated inside a TP group).
The degenerate case (one rank) runs the same loop without torch.distributed. What each stage computes is the
sampler's steps (`lowvram/model/sampler.py`); this module only orders them and moves their tensors.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowvram.model.cache import CondCache, StepKV
from lowvram.model.dit import LiveAvatarDiT
from lowvram.model.sampler import (PrefillInputs, StreamInputs, TimeModulation, block_inputs,
                                   encode_block_audio, euler_step, first_latent_frame, prefill, prefill_inputs,
                                   swaps_reference, token_grid, with_reference)

__all__ = ["Channel", "StageRunner", "Topology", "make_topology", "stage_timing", "wavefront_schedule"]


def wavefront_schedule(num_blocks: int, steps: int, pp: int, clip_blocks: int | None = None) -> list[tuple[int, int]]:
    """(block, step) items in the order every stage processes them. Chunks never straddle a clip boundary, so a
    stage has finished every item of clip r before it starts clip r+1 (where the reference may change)."""
    clip_blocks = clip_blocks or num_blocks
    order = []
    for clip_start in range(0, num_blocks, clip_blocks):
        clip_end = min(clip_start + clip_blocks, num_blocks)
        for first in range(clip_start, clip_end, pp):
            chunk = range(first, min(first + pp, clip_end))
            order += [(b, s) for s in range(steps) for b in chunk]
    return order


@dataclass
class Topology:
    """Where this rank sits: stage (pipeline index) and tp_rank (index inside the stage's TP group)."""

    rank: int = 0
    world: int = 1
    tp: int = 1
    pp: int = 1
    tp_group: object = None

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    def peer(self, stage: int) -> int:
        return stage * self.tp + self.tp_rank


def make_topology(tp: int, pp: int) -> Topology:
    """After init_process_group: ranks [stage*tp, (stage+1)*tp) form each stage's TP group."""
    if not dist.is_initialized():
        if tp * pp != 1:
            raise RuntimeError("tp x pp > 1 needs torch.distributed to be initialised")
        return Topology()
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp * pp != world:
        raise ValueError(f"tp {tp} x pp {pp} != world size {world}")
    topo = Topology(rank=rank, world=world, tp=tp, pp=pp)
    for stage in range(pp):  # every rank must create every group, in the same order
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp))) if tp > 1 else None
        if stage == topo.stage:
            topo.tp_group = group
    return topo


def host_staged(device) -> bool:
    """gloo's send/recv take host tensors only (a CUDA tensor there aborts the process); NCCL takes CUDA ones."""
    return torch.device(device).type == "cuda" and dist.is_initialized() and dist.get_backend() == "gloo"


class Channel:
    """Point-to-point transport of fixed-shape tensors between stages; sends are non-blocking. Every send/recv
    between stages goes through here; with `staged` (gloo between CUDA ranks) through pinned host buffers."""

    def __init__(self, device, staged: bool | None = None):
        self.device = torch.device(device)
        self.staged = host_staged(self.device) if staged is None else staged
        self.pending = []
        # time blocked in recv after this rank's own GPU work finished; NCCL's recv does not block the host (and a
        # sync per item would cost overlap), so there it is not measured
        self.wait_s = 0.0
        self.measures_wait = self.staged or self.device.type == "cpu"

    def buffer(self, shape, dtype) -> torch.Tensor:
        if self.staged:
            return torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        return torch.empty(shape, dtype=dtype, device=self.device)

    def send(self, tensors: list[torch.Tensor], dst: int) -> None:
        for t in tensors:
            t = self.buffer(t.shape, t.dtype).copy_(t) if self.staged else t.contiguous()
            self.pending.append((dist.isend(t, dst), t))  # kept alive until the send completes
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]

    def recv(self, like: list[tuple[tuple, torch.dtype]], src: int) -> list[torch.Tensor]:
        if self.staged and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the wait below is idle time, not this rank's own kernels
        t0 = time.perf_counter()
        out = []
        for shape, dtype in like:
            t = self.buffer(shape, dtype)
            dist.recv(t, src)
            out.append(t.to(self.device, non_blocking=True) if self.staged else t)
        self.wait_s += time.perf_counter() - t0
        return out

    def flush(self) -> None:
        for w, _ in self.pending:
            w.wait()
        self.pending = []


def stage_timing(loop_s: float, wait_s: float | None, blocks: int) -> dict:
    """A stage's time over the streamed blocks (prefill excluded): busy = not blocked waiting for its input
    (None where the wait is not measured: NCCL). On one GPU per stage the slowest stage's busy time per block
    bounds the pipeline's time per block."""
    busy = None if wait_s is None else max(loop_s - wait_s, 0.0)
    return {"blocks": blocks, "loop_s": round(loop_s, 4), "wait_s": None if wait_s is None else round(wait_s, 4),
            "busy_s": None if busy is None else round(busy, 4),
            "busy_s_per_block": None if busy is None else round(busy / max(blocks, 1), 4)}


class StageRunner:
    """The pipeline schedule of the sampler's steps for this rank: the pipelined prefill, then every (block, step)
    item of the wavefront. The first stage embeds, every stage runs its layers and sends the hidden states on, the
    last stage applies the head and the Euler step and returns the latent to the first for the next step."""

    def __init__(self, model: LiveAvatarDiT, topo: Topology, inputs: StreamInputs, kv_dtype=None,
                 on_latent: Callable[[int, torch.Tensor], None] | None = None, kv_offload: bool = False,
                 ref_update: bool = False):
        self.model, self.topo, self.inputs = model, topo, inputs
        self.cfg = cfg = model.cfg
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.grid, self.fsl, self.block_tokens = token_grid(cfg, inputs.latent_hw)
        self.times = TimeModulation(model)
        self.audio_cache: dict[int, tuple] = {}
        self.draws = inputs.draws(cfg)
        self.kv_dtype = kv_dtype or self.dtype
        capacity = cfg.blocks_per_clip * self.block_tokens
        heads = cfg.num_heads // topo.tp
        if kv_offload:  # one GPU: the steps' caches in pinned host RAM, streamed in layer by layer
            from lowvram.model.offload import host_caches

            self.kv = host_caches(model.layer_ids, cfg.num_steps, capacity, heads, cfg.head_dim, self.kv_dtype,
                                  self.device)
        else:
            self.kv = [StepKV(model.layer_ids, capacity, heads, cfg.head_dim, self.kv_dtype, self.device)
                       for _ in range(cfg.num_steps)]
        self.channel = Channel(self.device)
        self.on_latent = on_latent
        self.latents: dict[int, torch.Tensor] = {}  # (block) -> latent waiting for its next step (pp == 1)
        self.kill_after: int | None = None  # tests: die abruptly after this many items
        self.ref_update = ref_update  # upstream's multi-GPU pipeline: the reference swap after clip 0
        self.first_frame: torch.Tensor | None = None
        # calibrated static fp8 activation scales are per denoising step (and one for the prefill)
        self.per_step_scales = any(getattr(mod, "act_scales", None) is not None for mod in model.modules())

    # ----- shapes of what travels between stages -------------------------------------------------------

    def item_spec(self):
        cfg, F = self.cfg, self.cfg.frames_per_block
        h, w = self.inputs.latent_hw
        return [((self.block_tokens, cfg.dim), self.dtype), ((F, 6, cfg.dim), torch.float32),
                ((F, cfg.dim), torch.float32), ((F, cfg.dim), self.dtype), ((F, 5, cfg.dim), self.dtype),
                ((cfg.in_dim, F, h, w), torch.float32)]

    def latent_spec(self):
        h, w = self.inputs.latent_hw
        return [((self.cfg.in_dim, self.cfg.frames_per_block, h, w), torch.float32)]

    # ----- prefill ------------------------------------------------------------------------------------------

    def select_step(self, step: int) -> None:
        if self.per_step_scales:
            from lowvram.kernels.linear import set_act_step

            set_act_step(self.model, step)

    def new_reference(self) -> torch.Tensor:
        """The first latent frame of clip 0, [1, C, 1, h, w], on every rank (the last stage computed it)."""
        h, w = self.inputs.latent_hw
        ref = self.first_frame
        if self.topo.world > 1:
            if ref is None:
                ref = torch.empty(1, self.cfg.in_dim, 1, h, w, device=self.device)
            dist.broadcast(ref, src=(self.topo.pp - 1) * self.topo.tp)  # last stage, TP rank 0
        return ref

    def recv_prefill(self) -> PrefillInputs:
        cfg, src = self.cfg, self.topo.peer(self.topo.stage - 1)
        meta, = self.channel.recv([((2,), torch.int64)], src)
        n_tok = int(meta[0])
        text, tokens, positions, e6_zero = self.channel.recv(
            [((cfg.text_len, cfg.dim), self.dtype), ((n_tok, cfg.dim), self.dtype), ((n_tok, 3), torch.int64),
             ((1, 6, cfg.dim), torch.float32)], src)
        return PrefillInputs(text, tokens, positions, int(meta[1]), e6_zero)

    @torch.no_grad()
    def prefill(self, inputs: StreamInputs) -> CondCache:
        """The first stage embeds the conditioning; every stage runs it through its layers and sends it on."""
        topo = self.topo
        self.select_step(self.cfg.num_steps)  # the prefill's scales sit after the steps'
        pre = prefill_inputs(self.model, inputs) if topo.first else self.recv_prefill()
        cache, tokens = prefill(self.model, pre)
        if not topo.last:
            meta = torch.tensor([tokens.shape[0], pre.num_ref_tokens], dtype=torch.int64, device=self.device)
            self.channel.send([meta, pre.text, tokens, pre.positions, pre.e6_zero], topo.peer(topo.stage + 1))
        return cache

    # ----- the item loop ------------------------------------------------------------------------------------

    def block_latent(self, b: int, s: int) -> torch.Tensor:
        """The latent item (b, s) starts from: the block's noise, or step s-1's result (from the last stage)."""
        if s == 0:
            return self.inputs.block_noise(b, self.cfg).to(self.device).float()
        if self.topo.pp == 1:
            return self.latents.pop(b)
        x, = self.channel.recv(self.latent_spec(), self.topo.peer(self.topo.pp - 1))
        return x

    def audio_encoding(self, b: int, s: int):
        """Block b's audio tokens: the same for its 4 steps, so encoded once (dropped after its last step)."""
        if b not in self.audio_cache:
            self.audio_cache[b] = encode_block_audio(self.model, self.inputs.block_audio(b, self.cfg.frames_per_block))
        return self.audio_cache.pop(b) if s == self.cfg.num_steps - 1 else self.audio_cache[b]

    @torch.no_grad()
    def run(self) -> None:
        cond = self.prefill(self.inputs)
        m, topo, cfg = self.model, self.topo, self.cfg
        frames, last_step = cfg.frames_per_block, cfg.num_steps - 1
        schedule = wavefront_schedule(self.inputs.num_blocks, cfg.num_steps, topo.pp, cfg.blocks_per_clip)
        t_loop, wait_before = time.perf_counter(), self.channel.wait_s
        for n, (b, s) in enumerate(schedule):
            if self.kill_after is not None and n >= self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if s == 0 and swaps_reference(cfg, b, self.ref_update):
                ref = self.new_reference()
                cond = None  # free the old conditioning cache first: two at once cost ~2.4 GiB at the full size
                cond = self.prefill(with_reference(self.inputs, ref))
            self.select_step(s)  # static fp8 activation scales of this step, before any of its layers run
            if topo.first:
                x = self.block_latent(b, s)
                e, e6 = self.times(s, frames)
                audio = self.audio_encoding(b, s)
                tokens = m.embed_noisy(x, self.inputs.block_pose(b, frames, self.device))
            else:
                tokens, e6, e, *audio, x = self.channel.recv(self.item_spec(), topo.peer(topo.stage - 1))
            inp = block_inputs(cfg, self.grid, e6, audio, b * self.block_tokens, self.draws(b, s))
            tokens = m.run_layers(tokens.to(self.dtype), inp, cond, self.kv[s])
            if not topo.last:
                self.channel.send([tokens, e6, e, *audio, x], topo.peer(topo.stage + 1))
                continue
            x = euler_step(x, m.head_out(tokens, e, (frames, *self.grid)), self.times.sigmas, s)
            if (b, s) == (0, last_step):
                self.first_frame = first_latent_frame(x)
            if s < last_step:
                if topo.pp == 1:
                    self.latents[b] = x
                else:
                    self.channel.send([x], topo.peer(0))
            elif self.on_latent is not None and topo.tp_rank == 0:
                self.on_latent(b, x.cpu())
        if topo.world > 1:
            self.channel.flush()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        waited = self.channel.wait_s - wait_before if self.channel.measures_wait or topo.world == 1 else None
        self.timing = stage_timing(time.perf_counter() - t_loop, waited, self.inputs.num_blocks)
