"""Block-streaming calibration: the real sampler trajectory, one transformer layer's weights at a time.

All calibration samples run the sampler's actual path in lock-step — prefill of the reference/motion tokens
(t = 0), then for each streamed block the 4 Euler steps at the scheduler's timesteps, each step writing and
reading its own KV cache, with seeded (or scripted) reference-RoPE shift draws — the sampler's
steps (`lowvram.model.sampler`) in another schedule than `Stream`'s, with equal results (the tests check). A pass
is one (block, step); inside a pass, layer l's weights (bf16, LoRA merged) are loaded from the checkpoint, every
sample's tokens go through it (`run_layers(..., layers=[l])`), its input statistics are recorded, and it is
freed before layer l+1 is loaded. The prefill is fused into the first pass (same layer loads).

Disk reads per run = passes x (bytes of all layers + LoRA) + the nonblock weights once; passes =
blocks x steps (8 for 2 blocks). Only one layer's weights (+ the small nonblock part) are on the device at a
time; the samples' KV caches and prefill caches live on the host (`store`) and only the current layer's rows
are moved to the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lowvram.checkpoint import LoraWeights, build_meta_model, load_state_dict_streaming
from lowvram.host_memory import peak_rss_bytes
from lowvram.kernels.linear import set_act_step
from lowvram.model.cache import CondCache, LayerCond, StepKV
from lowvram.model.config import DiTConfig
from lowvram.model.dit import BlockInputs, LiveAvatarDiT
from lowvram.model.sampler import (ShiftDraws, StreamInputs, TimeModulation, block_inputs, encode_block_audio,
                                   euler_step, prefill_inputs, token_grid)

from .layout import layer_prefixes


# ----------------------------------------------------------------------------------------------------------
# Where layer weights come from


class LayerSource:
    """Hands out the nonblock part and one transformer layer at a time, counting the bytes it reads."""

    cfg: DiTConfig
    device: torch.device
    bytes_read: int = 0

    def nonblock(self) -> LiveAvatarDiT:
        raise NotImplementedError

    def layer(self, layer: int) -> LiveAvatarDiT:
        raise NotImplementedError

    def release(self, layer: int, module: nn.Module) -> None:
        del module
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class CheckpointSource(LayerSource):
    """bf16 weights streamed from the original checkpoint with the LoRA merged (upstream formula)."""

    def __init__(self, index: dict, cfg: DiTConfig, lora: LoraWeights | None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16):
        self.index, self.cfg, self.lora = index, cfg, lora
        self.device, self.dtype = torch.device(device), dtype
        self.bytes_read = 0
        self.loads = 0

    def _load(self, model: nn.Module) -> nn.Module:
        keys = list(model.state_dict().keys())
        n = sum(self.index[k].nbytes for k in keys if k in self.index)
        if self.lora is not None:
            for k in keys:
                module = self.lora.target_of(k)
                if module is not None:
                    a, b = self.lora.targets[module]
                    n += a.nbytes + b.nbytes
        self.bytes_read += n
        self.loads += 1
        load_state_dict_streaming(self.index, model, self.dtype, self.device, lora=self.lora)
        return model.eval()

    def nonblock(self) -> LiveAvatarDiT:
        return self._load(build_meta_model(self.cfg, layers=[], embeddings=True, head=True))

    def layer(self, layer: int) -> LiveAvatarDiT:
        return self._load(build_meta_model(self.cfg, layers=[layer], embeddings=False, head=False))


class ModuleSource(LayerSource):
    """An in-memory full model (tests, in-process comparisons): nothing is read."""

    def __init__(self, model: LiveAvatarDiT):
        self.model, self.cfg = model, model.cfg
        self.device = next(model.parameters()).device
        self.bytes_read = 0

    def nonblock(self):
        return self.model

    def layer(self, layer):
        return self.model

    def release(self, layer, module):
        pass


# ----------------------------------------------------------------------------------------------------------
# The lock-step trajectory


@dataclass
class _State:
    sample: StreamInputs
    role: str
    index: int
    grid: tuple[int, int]
    block_tokens: int
    draws: ShiftDraws
    cond: CondCache | None = None
    kv: list[StepKV] = field(default_factory=list)
    pre_tokens: torch.Tensor | None = None
    text: torch.Tensor | None = None
    e6_zero: torch.Tensor | None = None
    x: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    inp: BlockInputs | None = None
    e: torch.Tensor | None = None
    velocities: list[torch.Tensor] = field(default_factory=list)  # per (block, step), float32 on the host
    finals: list[torch.Tensor] = field(default_factory=list)  # per block


class Observer:
    """Callbacks of a trajectory run (all optional)."""

    def layer_loaded(self, layer: int, module: nn.Module) -> None: ...

    def context(self, step: int, role: str):
        import contextlib

        return contextlib.nullcontext()

    def layer_done(self, layer: int, module: nn.Module, final: bool) -> None: ...


@dataclass
class TrajectoryResult:
    velocities: list[list[torch.Tensor]]  # [sample][block * steps + step]
    finals: list[torch.Tensor]  # [sample] final latents of all its blocks, concatenated on frames
    bytes_read: int
    passes: int
    layer_loads: int
    seconds: float
    host_state_bytes: int
    peak_rss_bytes: int
    peak_vram_bytes: int
    load_seconds: float = 0.0  # of `seconds`: loading layers (read, LoRA merge, to device)
    analysis_seconds: float = 0.0  # of `seconds`: layer_done callbacks (per-layer analysis in the last pass)




def _to(t: torch.Tensor, device) -> torch.Tensor:
    return t if t.device == torch.device(device) else t.to(device)


def _layer_kv(kv: StepKV, layer: int, device: torch.device, start: int, n: int) -> StepKV:
    """A StepKV holding only `layer`'s rows [0, start + n) on `device`: the earlier blocks' rows are copied in,
    the current block's are written by the layer (the same object when nothing has to move)."""
    if kv.k[layer].device == device:
        return kv
    k, v = kv.k[layer], kv.v[layer]
    view = StepKV([], kv.capacity, k.shape[1], k.shape[2], k.dtype, device)
    view.capacity = kv.capacity
    view.k = {layer: torch.empty((start + n, *k.shape[1:]), dtype=k.dtype, device=device)}
    view.v = {layer: torch.empty((start + n, *v.shape[1:]), dtype=v.dtype, device=device)}
    view.k[layer][:start].copy_(k[:start], non_blocking=True)
    view.v[layer][:start].copy_(v[:start], non_blocking=True)
    return view


def cond_tokens(cfg: DiTConfig, latent_hw: tuple[int, int]) -> int:
    """Reference + FramePack motion tokens of the prefill (2640 at 704x384)."""
    h, w = latent_hw
    ph, pw = cfg.patch_size[1:]
    full = (h // ph) * (w // pw)
    return 2 * full + (h // (2 * ph)) * (w // (2 * pw)) + 4 * (h // (4 * ph)) * (w // (4 * pw))


def host_state_estimate(cfg: DiTConfig, samples: Sequence[StreamInputs], dtype_bytes: int = 2) -> int:
    """Host bytes of the samples' KV caches (all steps, all layers) + prefill caches + text K/V."""
    per_token = 2 * cfg.dim * dtype_bytes * cfg.num_layers  # K and V over all layers
    total = 0
    for s in samples:
        ph, pw = cfg.patch_size[1:]
        bt = cfg.frames_per_block * (s.latent_hw[0] // ph) * (s.latent_hw[1] // pw)
        total += cfg.num_steps * s.num_blocks * bt * per_token
        total += (cond_tokens(cfg, s.latent_hw) + cfg.text_len) * per_token
    return total


def _make_kv(cfg: DiTConfig, rows: int, capacity: int, dtype, store, scratch, tag: str) -> StepKV:
    """A StepKV whose tensors live on `store`, or in sparse memory-mapped files under `scratch` (disk)."""
    if scratch is None:
        kv = StepKV(list(range(cfg.num_layers)), rows, cfg.num_heads, cfg.head_dim, dtype, store)
    else:
        import math

        kv = StepKV([], rows, cfg.num_heads, cfg.head_dim, dtype, store)  # attributes only, no tensors
        shape = (rows, cfg.num_heads, cfg.head_dim)
        n = math.prod(shape)
        kv.k, kv.v = {}, {}
        for layer in range(cfg.num_layers):
            for kind, d in (("k", kv.k), ("v", kv.v)):
                path = scratch / f"{tag}.l{layer}.{kind}"
                with open(path, "wb") as f:
                    f.truncate(n * dtype.itemsize)  # sparse: reads as zeros, takes no disk until written
                d[layer] = torch.from_file(str(path), shared=True, size=n, dtype=dtype).view(shape)
    kv.capacity = capacity  # the ring's real size (storage may be smaller: calibration never wraps)
    return kv


@torch.no_grad()
def run_trajectory(source: LayerSource, samples: Sequence[StreamInputs], roles: Sequence[str] | None = None, *,
                   observer: Observer | None = None, store: torch.device | str = "cpu",
                   static_steps: bool = False, progress: Callable[[str], None] | None = None,
                   kv_scratch=None) -> TrajectoryResult:
    """Run every sample's real sampler trajectory, streaming layers from `source` (see the module docstring).

    `static_steps`: before each layer runs, select the per-step static fp8 activation scales (quantized models).
    `progress(description)` is called once per (pass, layer). `kv_scratch`: a folder for disk-backed KV caches
    (memory-mapped, removed afterwards) when they do not fit in host RAM."""
    import shutil
    import tempfile
    from pathlib import Path

    scratch = None
    if kv_scratch is not None:
        Path(kv_scratch).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="kv-", dir=kv_scratch))
    try:
        return _run(source, samples, roles, observer, store, static_steps, progress, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _run(source, samples, roles, observer, store, static_steps, progress, scratch) -> TrajectoryResult:
    t0 = time.perf_counter()
    cfg = source.cfg
    device = source.device
    store = torch.device(store)
    obs = observer or Observer()
    roles = list(roles) if roles is not None else ["train"] * len(samples)
    prefill_step = cfg.num_steps
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    nb = source.nonblock()
    dtype = nb.dtype
    times = TimeModulation(nb)
    states: list[_State] = []
    for i, (s, role) in enumerate(zip(samples, roles)):
        grid, _, block_tokens = token_grid(cfg, s.latent_hw)
        st = _State(s, role, i, grid, block_tokens, s.draws(cfg))
        pre = prefill_inputs(nb, s)
        st.text, st.pre_tokens, st.e6_zero = pre.text, pre.tokens, pre.e6_zero
        st.cond = CondCache(positions=pre.positions.to(store), num_ref_tokens=pre.num_ref_tokens)
        rows = s.num_blocks * st.block_tokens  # never wraps: calibration stays inside one clip
        for step in range(cfg.num_steps):
            st.kv.append(_make_kv(cfg, rows, cfg.blocks_per_clip * st.block_tokens, dtype, store, scratch,
                                  f"s{i}.t{step}"))
        states.append(st)

    max_blocks = max(s.num_blocks for s in samples)
    frames = cfg.frames_per_block
    passes = [(b, s) for b in range(max_blocks) for s in range(cfg.num_steps)]
    layer_loads = 0
    load_s = observe_s = 0.0
    for p, (b, step) in enumerate(passes):
        active = [st for st in states if b < st.sample.num_blocks]
        for st in active:  # first-stage work of this forward
            s = st.sample
            if step == 0:
                st.x = s.block_noise(b, cfg).to(device).float()
            st.e, e6 = times(step, frames)
            audio = encode_block_audio(nb, s.block_audio(b, frames))
            st.inp = block_inputs(cfg, st.grid, e6, audio, b * st.block_tokens, st.draws(b, step))
            st.tokens = nb.embed_noisy(st.x, s.block_pose(b, frames, device))
        final = p == len(passes) - 1
        for layer in range(cfg.num_layers):
            if progress is not None:
                progress(f"block {b} step {step} layer {layer}")
            t_l = time.perf_counter()
            lm = source.layer(layer)
            load_s += time.perf_counter() - t_l
            layer_loads += 1
            obs.layer_loaded(layer, lm)
            if p == 0:  # the prefill, fused into the first pass
                if static_steps:
                    set_act_step(lm, prefill_step)
                for st in states:
                    with obs.context(prefill_step, st.role):
                        text_kv = {layer: lm.blocks[str(layer)].cross_attn.key_value(st.text)}
                        st.pre_tokens = lm.prefill_layers(st.pre_tokens, st.e6_zero, st.cond.positions.to(device),
                                                          text_kv, st.cond, layers=[layer])
                    lc = st.cond.layers[layer]
                    st.cond.layers[layer] = LayerCond(*(_to(t, store) for t in (lc.cond_k, lc.cond_v, lc.text_k,
                                                                                 lc.text_v)))
                    if layer == cfg.num_layers - 1:
                        st.pre_tokens = st.text = None
            if static_steps:
                set_act_step(lm, step)
            for st in active:
                lc = st.cond.layers[layer]
                cond_view = CondCache(st.cond.positions, st.cond.num_ref_tokens,
                                      {layer: LayerCond(*(_to(t, device) for t in (lc.cond_k, lc.cond_v, lc.text_k,
                                                                                    lc.text_v)))})
                kv = st.kv[step]
                n_tok, start = st.tokens.shape[0], st.inp.start
                view = _layer_kv(kv, layer, device, start, n_tok)
                with obs.context(step, st.role):
                    st.tokens = lm.run_layers(st.tokens, st.inp, cond_view, view, layers=[layer])
                if view is not kv:  # only the rows this block wrote go back to the host
                    kv.k[layer][start:start + n_tok].copy_(view.k[layer][start:start + n_tok])
                    kv.v[layer][start:start + n_tok].copy_(view.v[layer][start:start + n_tok])
            t_a = time.perf_counter()
            obs.layer_done(layer, lm, final)
            observe_s += time.perf_counter() - t_a
            source.release(layer, lm)
            del lm
        for st in active:  # last-stage work: head, Euler update
            v = nb.head_out(st.tokens, st.e, (frames, *st.grid))
            st.x = euler_step(st.x, v, times.sigmas, step)
            st.velocities.append(v.float().cpu())
            st.tokens = st.inp = None
            if step == cfg.num_steps - 1:
                st.finals.append(st.x.float().cpu())

    host = sum(kv.nbytes() for st in states for kv in st.kv) + sum(st.cond.nbytes() for st in states)
    result = TrajectoryResult(
        velocities=[st.velocities for st in states],
        finals=[torch.cat(st.finals, dim=1) for st in states],
        bytes_read=source.bytes_read, passes=len(passes), layer_loads=layer_loads,
        seconds=time.perf_counter() - t0, host_state_bytes=host, peak_rss_bytes=peak_rss_bytes(),
        peak_vram_bytes=int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else 0,
        load_seconds=load_s, analysis_seconds=observe_s)
    source.release(-1, nb)
    return result


def layer_key_filter(cfg: DiTConfig, layer: int):
    prefixes = layer_prefixes(cfg, layer)
    return lambda k: k.startswith(prefixes)
