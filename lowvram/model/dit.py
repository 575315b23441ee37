"""The causal streaming S2V DiT of Live Avatar (Wan2.2-S2V-14B + LiveAvatar), written from its description.

State-dict names are the real checkpoint's, verbatim. Blocks and audio injectors live in ModuleDicts
keyed by their global index, so a pipeline stage can hold just its layers and still load real keys.

A forward is split into pieces a pipeline can place on different devices:
    embed_text / time_modulation / encode_audio / embed_noisy / embed_cond   (first stage)
    run_layers                                                               (any stage)
    head_out                                                                 (last stage)
Precision follows the reference: modulation and gates in float32, the residual stream carried in
float32 inside a block and rounded to the parameter dtype at its end. The time embedding and projection, the
causal audio encoder and the head run in float32 whatever the weights' dtype (their weights upcast for the call),
as upstream computes them inside float32 autocast regions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowvram.model.audio_encoder import CausalAudioEncoder
from lowvram.model.cache import CondCache, LayerCond, StepKV
from lowvram.model.config import DiTConfig
from lowvram.model.fp32 import linear_like_input
from lowvram.model.rope import apply_rope, grid_positions, rope_table, subsampled_axis


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group=None, full_dim: int | None = None):
    """RMSNorm over the full hidden width; under tensor parallelism the sum of squares is all-reduced."""
    xf = x.float()
    sq = xf.pow(2).sum(-1, keepdim=True)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sq, group=group)
    mean = sq / (full_dim or x.shape[-1])
    return (xf * torch.rsqrt(mean + eps)).to(x.dtype) * weight


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax(q k^T / sqrt(d)) v. q [..., Lq, H, d], k/v [..., Lk, H, d] -> [..., Lq, H*d]."""
    # 4-D [batch, heads, tokens, dim] inputs: the fused (flash/cuDNN) kernels don't take 3-D ones.
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4)
    return out.transpose(1, 2).reshape(*q.shape[:-2], -1)


_LSE_KERNELS = ["cudnn", "flash", "efficient"]


def _sdpa_with_lse(q4, k4, v4):
    """Fused attention that also returns the log-sum-exp of each query row ([B, H, L] float32)."""
    ops = torch.ops.aten
    while _LSE_KERNELS:
        kind = _LSE_KERNELS[0]
        try:
            if kind == "cudnn":
                out = ops._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True)
            elif kind == "flash":
                out = ops._scaled_dot_product_flash_attention(q4, k4, v4)
            else:
                out = ops._scaled_dot_product_efficient_attention(q4, k4, v4, None, True)
            lse = out[1]
            if lse.dim() == 4:
                lse = lse[..., 0]
            return out[0], lse[..., : q4.shape[2]]  # the efficient kernel pads the query axis
        except (RuntimeError, NotImplementedError):
            _LSE_KERNELS.pop(0)  # not available for this GPU/dtype/shape: fall back to the next kernel
    raise RuntimeError("no fused attention kernel with log-sum-exp output is available")


def attention_parts(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention of q over the union of several key/value segments (no mask, so order doesn't matter).

    On the GPU each segment runs through the fused kernel and the partial results are merged with their
    log-sum-exps, instead of concatenating the 15k cached + conditioning keys (314 MB per layer at 704x384).
    """
    if len(parts) == 1:
        return attention(q, *parts[0])
    if not q.is_cuda or not _LSE_KERNELS or q.dtype not in (torch.bfloat16, torch.float16):
        return attention(q, torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]))
    q4 = q.reshape(-1, *q.shape[-3:]).transpose(1, 2)
    outs, lses = [], []
    for k, v in parts:
        k4, v4 = (t.reshape(-1, *t.shape[-3:]).transpose(1, 2) for t in (k, v))
        o, lse = _sdpa_with_lse(q4, k4, v4)
        outs.append(o)
        lses.append(lse)
    return merge_attention(outs, lses, q.dtype).reshape(*q.shape[:-2], -1)


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """softmax over the union = sum of the partial outputs weighted by exp(lse_i - lse_total).

    outs [B, H, L, d] -> [B, L, H*d] in `dtype`: compiled, the merge writes the layout the o-projection reads.
    """
    total = torch.logsumexp(torch.stack(lses), dim=0)
    merged = sum(o.float() * torch.exp(lse - total)[..., None] for o, lse in zip(outs, lses))
    return merged.to(dtype).transpose(1, 2).flatten(2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, full_dim: int | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.full_dim = full_dim or dim  # under tensor parallelism this shard holds dim of full_dim channels
        self.group = None  # tensor-parallel group: sum of squares over all shards

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.group, self.full_dim)


class Attention(nn.Module):
    """q/k/v/o projections with q/k RMSNorm over the full width (all heads jointly).

    With tp > 1 this shard holds num_heads/tp heads: q/k/v are column-parallel, o is row-parallel.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, tp: int = 1):
        super().__init__()
        local = dim // tp
        self.num_heads = num_heads // tp
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, local)
        self.k = nn.Linear(dim, local)
        self.v = nn.Linear(dim, local)
        self.o = nn.Linear(local, dim)
        self.norm_q = RMSNorm(local, eps, full_dim=dim)
        self.norm_k = RMSNorm(local, eps, full_dim=dim)
        self.reduce_group = None  # tensor parallelism: `o` is row-parallel, its output is all-reduced
        self.qkv = None  # set by fuse_qkv_ (runtime only; checkpoints keep q, k, v)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def query(self, x):
        return self.heads(self.norm_q(self.q(x)))

    def key_value(self, x):
        return self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))

    def query_key_value(self, x):
        """q, k, v of the same input; one GEMM (and one activation quantization) once fused."""
        if self.qkv is None:
            return (self.query(x), *self.key_value(x))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.heads(self.norm_q(q)), self.heads(self.norm_k(k)), self.heads(v)

    def output(self, attn_out):
        out = self.o(attn_out)
        if self.reduce_group is not None:
            import torch.distributed as dist

            dist.all_reduce(out, group=self.reduce_group)
        return out


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.reduce_group = None

    def forward(self, x):
        out = super().forward(x)
        if self.reduce_group is not None:
            import torch.distributed as dist

            dist.all_reduce(out, group=self.reduce_group)
        return out


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, tp: int = 1):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.eps, tp)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.eps, tp)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim // tp)

    def forward(self, x, e6, rope, kv_fn, text_k, text_v, raw_keys: bool = False, round_out: bool = False,
                kv_rows: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [L, dim]; e6 [G, 6, dim] float32 for G equal groups of tokens (one per latent frame);
        rope = (cos, sin); kv_fn(k_roped, v, k_raw) -> the keys/values to attend to (k_raw: the un-roped keys
        if raw_keys, else None). kv_rows: cache rows that receive k_roped and v directly (kv_fn then only reads).
        Returns the float32 residual stream, or rounded to the weights' dtype."""
        m = (self.modulation.float() + e6).unbind(1)
        q, k, v, k_raw = self.pre_attention(x, m[0], m[1], *rope, raw_keys, kv_rows)
        parts = kv_fn(k, v, k_raw)
        return self.post_attention(x, attention_parts(q, parts), m[2], m[3], m[4], m[5], text_k, text_v, round_out)

    def pre_attention(self, x, shift, scale, cos, sin, raw_keys: bool = False, kv_rows=None):
        y = modulate(layer_norm(x, self.eps), shift, scale).to(self.modulation.dtype)
        q, k, v = self.self_attn.query_key_value(y)
        k_raw = k if raw_keys else None
        k = apply_rope(k, cos, sin)
        if kv_rows is not None:  # compiled, the roped keys and the values are stored straight into the cache
            kv_rows[0].copy_(k)
            kv_rows[1].copy_(v)
            k, v = kv_rows
        return apply_rope(q, cos, sin), k, v, k_raw

    def post_attention(self, x, attn, gate, shift, scale, gate_ffn, text_k, text_v, round_out: bool = False):
        dtype = self.modulation.dtype
        x = x.float() + gated(self.self_attn.output(attn), gate)
        z = F.layer_norm(x.to(dtype).float(), x.shape[-1:], self.norm3.weight.float(), self.norm3.bias.float(),
                         self.eps).to(dtype)
        x = x + self.cross_attn.output(attention(self.cross_attn.query(z), text_k, text_v)).float()
        y = modulate(layer_norm(x, self.eps), shift, scale).to(dtype)
        x = x + gated(self.ffn(y), gate_ffn)
        return x.to(dtype) if round_out else x


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [G*n, dim] float32 with per-group shift/scale [G, dim]: x * (1 + scale) + shift."""
    xg = x.unflatten(0, (shift.shape[0], -1))
    return (xg * (1 + scale[:, None]) + shift[:, None]).flatten(0, 1)


def gated(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (y.float().unflatten(0, (gate.shape[0], -1)) * gate[:, None]).flatten(0, 1)


class AdaLayerNorm(nn.Module):
    """LN(x, eps 1e-5) * (1 + scale) + shift with [shift | scale] = linear(SiLU(cond))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, cond):
        shift, scale = self.linear(F.silu(cond)).float().chunk(2, dim=-1)
        return layer_norm(x, 1e-5) * (1 + scale[:, None]) + shift[:, None]


class AudioInjector(nn.Module):
    def __init__(self, cfg: DiTConfig, tp: int = 1):
        super().__init__()
        ids = [str(j) for j in range(len(cfg.audio_inject_layers))]
        self.injector = nn.ModuleDict({j: Attention(cfg.dim, cfg.num_heads, cfg.eps, tp) for j in ids})
        self.injector_adain_layers = nn.ModuleDict({j: AdaLayerNorm(cfg.dim) for j in ids})


class FramePacker(nn.Module):
    """FramePack motion tokens: newest latent frame at full rate, 2 at 2x, 16 at 4x downsampling."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_dim, cfg.dim, (1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(cfg.in_dim, cfg.dim, (2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(cfg.in_dim, cfg.dim, (4, 8, 8), stride=(4, 8, 8))


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))


@dataclass
class BlockInputs:
    """What every layer of one inference forward needs besides its weights (small; sent between stages)."""

    e6: torch.Tensor  # [F, 6, dim] float32 time modulation per latent frame
    audio_global: torch.Tensor  # [F, dim]
    audio_tokens: torch.Tensor  # [F, 5, dim]
    start: int  # absolute token offset of the block in the stream
    ref_shift: int  # RoPE time shift of the reference tokens for this forward
    tokens_per_frame: int
    grid: tuple[int, int]  # token grid (rows, cols) of one latent frame


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t w_k), sin(t w_k)], w_k = 10000^(-k/half), computed in float64 and returned as float32."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = torch.outer(pos, freqs)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()


class LiveAvatarDiT(nn.Module):
    """The streaming S2V DiT. `layers` selects which transformer layers this instance holds (a stage)."""

    def __init__(self, cfg: DiTConfig, layers: range | list[int] | None = None, embeddings: bool = True,
                 head: bool = True, tp: int = 1):
        super().__init__()
        cfg.validate()
        if cfg.num_heads % tp or cfg.ffn_dim % tp:
            raise ValueError(f"tensor parallel size {tp} must divide heads {cfg.num_heads} and ffn_dim {cfg.ffn_dim}")
        self.cfg = cfg
        self.tp = tp
        self.has_embeddings, self.has_head = embeddings, head
        self.layer_ids = list(range(cfg.num_layers) if layers is None else layers)
        d = cfg.dim
        if embeddings:
            self.patch_embedding = nn.Conv3d(cfg.in_dim, d, cfg.patch_size, stride=cfg.patch_size)
            self.cond_encoder = nn.Conv3d(cfg.cond_dim, d, cfg.patch_size, stride=cfg.patch_size)
            self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
            self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            self.trainable_cond_mask = nn.Embedding(3, d)
            self.casual_audio_encoder = CausalAudioEncoder(cfg)  # sic: the checkpoint's spelling
            self.frame_packer = FramePacker(cfg)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, tp) for i in self.layer_ids})
        injected = [j for j, layer in enumerate(cfg.audio_inject_layers) if layer in self.layer_ids]
        if injected:
            self.audio_injector = AudioInjector(cfg, tp)
            for name in list(self.audio_injector.injector.keys()):
                if int(name) not in injected:
                    del self.audio_injector.injector[name]
                    del self.audio_injector.injector_adain_layers[name]
        self.inject_at = {layer: j for j, layer in enumerate(cfg.audio_inject_layers) if layer in self.layer_ids}
        if head:
            self.head = Head(cfg)
        self._block_rope: tuple = (None, None)  # (key, table) of the last block's noisy-token RoPE

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ----- first stage: embeddings -------------------------------------------------------------

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Zero-pad the T5 context to text_len rows (padding is not masked), then embed -> [text_len, dim]."""
        cfg = self.cfg
        if context.shape[0] > cfg.text_len:
            context = context[: cfg.text_len]
        padded = context.new_zeros(cfg.text_len, context.shape[1])
        padded[: context.shape[0]] = context
        return self.text_embedding(padded.to(self.dtype))

    def time_modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps [F] -> (e [F, dim], e6 [F, 6, dim]) in float32."""
        embed, project = self.time_embedding, self.time_projection[1]  # in float32, as upstream's autocast region
        s = sinusoid(t.reshape(-1), self.cfg.freq_dim)
        e = linear_like_input(F.silu(linear_like_input(s, embed[0].weight, embed[0].bias)), embed[2].weight,
                              embed[2].bias)
        e6 = linear_like_input(F.silu(e), project.weight, project.bias).unflatten(1, (6, self.cfg.dim))
        return e, e6

    def encode_audio(self, audio_input: torch.Tensor):
        return self.casual_audio_encoder(audio_input)

    def patchify(self, conv: nn.Conv3d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[1, C, T, H, W] -> tokens [T'*H'*W', dim] and the token grid (T', H', W').

        Every patch conv here has stride == kernel and no padding, so it is one GEMM over the flattened patches:
        the same sums as the conv, without the GPU conv's layout conversions (~2 ms per forward at 704x384)."""
        w = conv.weight
        kt, kh, kw = conv.kernel_size
        if tuple(conv.stride) != (kt, kh, kw) or any(conv.padding):
            out = conv(x.to(self.dtype))[0]  # [dim, T, H, W]
            return out.flatten(1).transpose(0, 1), tuple(out.shape[1:])
        _, c, t, h, wd = x.shape
        grid = (t // kt, h // kh, wd // kw)
        patches = x[0, :, : grid[0] * kt, : grid[1] * kh, : grid[2] * kw].to(w.dtype)
        patches = patches.reshape(c, grid[0], kt, grid[1], kh, grid[2], kw).permute(1, 3, 5, 0, 2, 4, 6)
        tokens = F.linear(patches.reshape(math.prod(grid), c * kt * kh * kw), w.reshape(w.shape[0], -1), conv.bias)
        return tokens, grid

    def embed_noisy(self, x: torch.Tensor, cond_states: torch.Tensor) -> torch.Tensor:
        """Latent [16, F, h, w] (+ pose latent [1, 16, F, h, w]) -> tokens [F*fsl, dim]."""
        tokens, _ = self.patchify(self.patch_embedding, x[None])
        cond, _ = self.patchify(self.cond_encoder, cond_states.reshape(1, *cond_states.shape[-4:]))
        return tokens + cond + self.trainable_cond_mask.weight[0]

    def embed_cond(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor):
        """Reference + FramePack motion tokens [Tc, dim], their RoPE positions [Tc, 3] and the ref token count."""
        cfg = self.cfg
        ref = ref_latents.reshape(1, *ref_latents.shape[-4:])
        ref_tok, (_, gh, gw) = self.patchify(self.patch_embedding, ref)
        ref_tok = ref_tok + self.trainable_cond_mask.weight[1]
        ref_pos = grid_positions([cfg.ref_base_frame], list(range(gh)), list(range(gw)))

        motion = motion_latents.reshape(1, *motion_latents.shape[-4:])
        n = cfg.motion_latent_frames
        motion = motion[:, :, -n:]
        if motion.shape[2] < n:
            motion = F.pad(motion, (0, 0, 0, 0, n - motion.shape[2], 0))
        fp = self.frame_packer
        post, g1 = self.patchify(fp.proj, motion[:, :, -1:])
        two, g2 = self.patchify(fp.proj_2x, motion[:, :, -3:-1])
        four, g4 = self.patchify(fp.proj_4x, motion[:, :, :-3])
        h2, w2 = g1[1], g1[2]
        four_times = [-(n - 5 * f) for f in range(g4[0])]  # the reference's 4x positions: -19, -14, -9, -4
        positions = torch.cat([
            ref_pos,
            grid_positions([-1], list(range(h2)), list(range(w2))),
            grid_positions([-3], subsampled_axis(h2, g2[1]), subsampled_axis(w2, g2[2])),
            grid_positions(four_times, subsampled_axis(h2, g4[1]), subsampled_axis(w2, g4[2])),
        ])
        motion_tok = torch.cat([post, two, four]) + self.trainable_cond_mask.weight[2]
        return torch.cat([ref_tok, motion_tok]), positions, ref_tok.shape[0]

    # ----- any stage: transformer layers -------------------------------------------------------

    def text_kv(self, text: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of the embedded text for this instance's layers (constant per prompt)."""
        return {i: self.blocks[str(i)].cross_attn.key_value(text) for i in self.layer_ids}

    def prefill_layers(self, tokens, e6_zero, positions, text_kv, cache: CondCache, layers: list[int] | None = None):
        """Run the conditioning tokens through this instance's layers (or a subset) at t=0; store un-roped K and V."""
        rope = rope_table(positions.to(tokens.device), self.cfg.rope_split)
        e6 = e6_zero[:1]
        for i in self.layer_ids if layers is None else layers:
            stash = {}

            def kv_fn(k_roped, v, k_raw, stash=stash):
                stash["k"], stash["v"] = k_raw, v
                return [(k_roped, v)]

            tk, tv = text_kv[i]
            tokens = self.blocks[str(i)](tokens, e6, rope, kv_fn, tk, tv, raw_keys=True, round_out=True)
            cache.layers[i] = LayerCond(stash["k"], stash["v"], tk, tv)
        return tokens

    def rope_tables(self, inp: BlockInputs, cond: CondCache, tokens: int, device) -> tuple[tuple, tuple]:
        """RoPE (cos, sin) of this forward's noisy tokens and of the conditioning tokens (reference shifted)."""
        frames = tokens // inp.tokens_per_frame
        f0 = inp.start // inp.tokens_per_frame
        rows, cols = inp.grid
        key = (f0, frames, rows, cols, str(device))
        if self._block_rope[0] != key:  # the 4 steps of a block share the noisy tokens' table
            positions = grid_positions(range(f0, f0 + frames), range(rows), range(cols), device)
            self._block_rope = (key, rope_table(positions, self.cfg.rope_split))
        cond_pos = cond.positions.to(device, copy=True)
        cond_pos[: cond.num_ref_tokens, 0] += inp.ref_shift
        return self._block_rope[1], rope_table(cond_pos, self.cfg.rope_split)

    def run_layers(self, tokens: torch.Tensor, inp: BlockInputs, cond: CondCache, kv: StepKV,
                   layers: list[int] | None = None, tables: tuple | None = None) -> torch.Tensor:
        """One inference forward through this instance's layers, or the given subset (noisy tokens only).

        `tables`: precomputed `rope_tables` (a CUDA-graph capture must not copy from the host)."""
        rope, cond_rope = tables or self.rope_tables(inp, cond, tokens.shape[0], tokens.device)
        e6 = inp.e6
        run = self.layer_ids if layers is None else layers
        if hasattr(kv, "begin"):  # host-offloaded cache: start streaming the first layer in
            kv.begin(inp.start)
        n = tokens.shape[0]
        direct = isinstance(kv, StepKV)  # a GPU-resident cache: pre_attention writes its rows itself
        for i in run:
            lc = cond.layers[i]
            rows = kv.block_rows(i, inp.start, n) if direct else None

            def kv_fn(k_roped, v, k_raw, i=i, lc=lc):
                if direct:
                    k_cache, v_cache = kv.read(i, inp.start, n, tokens.dtype)
                else:
                    k_cache, v_cache = kv.write_and_read(i, inp.start, k_roped, v)
                cond_k = apply_rope(lc.cond_k, *cond_rope)
                return [(k_cache, v_cache), (cond_k, lc.cond_v)]

            inject = i in self.inject_at
            x = self.blocks[str(i)](tokens, e6, rope, kv_fn, lc.text_k, lc.text_v, round_out=not inject, kv_rows=rows)
            if inject:
                x = self.inject_audio(self.inject_at[i], x, inp)
            tokens = x
        return tokens

    def inject_audio(self, j: int, x: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        """Per latent frame: AdaLN on the audio global vector, cross-attention to its 5 audio tokens.
        x is the block's float32 output; the result is rounded to the weights' dtype (the layer's end)."""
        injector = self.audio_injector
        return audio_injection(injector.injector[str(j)], injector.injector_adain_layers[str(j)], x, inp.audio_global,
                               inp.audio_tokens, inp.tokens_per_frame, self.dtype)

    # ----- last stage: head ---------------------------------------------------------------------

    def head_out(self, tokens: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """tokens [F*fsl, dim], e [F, dim] -> velocity [out_dim, F, h, w] (float32)."""
        frames, rows, cols = grid
        mod = self.head.modulation.float() + e[:, None, :]  # [F, 2, dim]: shift, scale
        y = modulate(layer_norm(tokens, self.cfg.eps), mod[:, 0], mod[:, 1])
        # [L, pt*ph*pw*c], in float32 as upstream's autocast region
        out = linear_like_input(y, self.head.head.weight, self.head.head.bias)
        pt, ph, pw = self.cfg.patch_size
        out = out.reshape(frames, rows, cols, pt, ph, pw, self.cfg.out_dim)
        return out.permute(6, 0, 3, 1, 4, 2, 5).reshape(self.cfg.out_dim, frames * pt, rows * ph, cols * pw)


def audio_injection(attn: Attention, adain: AdaLayerNorm, x: torch.Tensor, audio_global: torch.Tensor,
                    audio_tokens: torch.Tensor, tokens_per_frame: int, dtype: torch.dtype) -> torch.Tensor:
    xf = x.unflatten(0, (x.shape[0] // tokens_per_frame, tokens_per_frame))
    s = adain(xf, audio_global.to(dtype)).to(dtype)
    k, v = attn.key_value(audio_tokens.to(dtype))
    out = attn.output(attention(attn.query(s), k, v))
    return (xf.float() + out.float()).flatten(0, 1).to(dtype)


_compiled = False


def compile_model() -> None:
    """torch.compile the per-layer math around the attention kernels (GPU runs; shapes are static per size).

    The pre- and post-attention parts fuse normalisation, modulation, activation quantization, RoPE and the
    gates into a few kernels; the conditioning-key RoPE and the segment merge are compiled on their own.
    """
    global apply_rope, merge_attention, audio_injection, _compiled
    if _compiled:  # once per process: wrapping the compiled functions again would only add a layer
        return
    _compiled = True
    # Each weight format, prefill/steady and injector/plain layer is its own graph; dynamo's default of 8 per
    # function would silently fall back to eager in a process that runs several (benchmarks, tests).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    Block.pre_attention = torch.compile(Block.pre_attention, dynamic=False)
    Block.post_attention = torch.compile(Block.post_attention, dynamic=False)
    apply_rope = torch.compile(apply_rope, dynamic=False)
    merge_attention = torch.compile(merge_attention, dynamic=False)
    audio_injection = torch.compile(audio_injection, dynamic=False)


def fuse_qkv_(model: nn.Module) -> nn.Module:
    """Concatenate each block self-attention's q, k, v into one projection (same format), in place.

    Saves two of three activation-quantization passes and runs one wider GEMM. Cross-attention and the
    audio injectors take q and k/v from different inputs, so they keep theirs. Skipped where the three
    layers differ in format or in int8 SmoothQuant factors.
    """
    from lowvram.kernels.linear import concat_linears

    for block in model.modules():
        mod = block.self_attn if isinstance(block, Block) else None
        if mod is not None and mod.qkv is None:
            fused = concat_linears([mod.q, mod.k, mod.v])
            if fused is not None:
                mod.qkv = fused
                del mod.q, mod.k, mod.v
                mod.q = mod.k = mod.v = None
    return model
