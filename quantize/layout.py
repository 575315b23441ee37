"""Which tensors live in which file of a quantized folder, and how tensor parallelism splits them.

Files: `nonblock.safetensors` (embeddings, audio encoder, FramePack, head: everything outside the transformer
layers, bf16) and one file per transformer layer `block_LLL.safetensors` holding `blocks.L.*` plus the audio
injector that runs after layer L (`audio_injector.injector.J.*`, `audio_injector.injector_adain_layers.J.*`).
With `--tp N` each layer file is split into `block_LLL.tpRofN.safetensors`, one per rank:

* column-parallel (split on output rows): self/cross/injector attention q, k, v and ffn.0 — weight rows,
  per-output-channel weight_scale (int4: its [out, groups] scale/offset rows) and bias; SmoothQuant factors and
  static activation scales (input side) are replicated;
* row-parallel (split on input columns): attention o and ffn.2 — weight columns (int4: whole groups), int4
  group scales/offsets, SmoothQuant factors; per-output-channel scales and static activation scales are
  replicated; the bias is kept by rank 0 only (other ranks hold zeros, so the all-reduce adds it once);
* q/k RMSNorm weights are split like the q/k outputs (the norm still spans the full width via an all-reduce
  of the sums of squares); everything else (modulation, norm3, AdaLN linear) is replicated.
"""

from __future__ import annotations

import re

import torch

from lowvram.errors import InputError
from lowvram.kernels.linear import INT4_GROUP
from lowvram.model.config import DiTConfig
from lowvram.parallel.tensor import is_row_bias, module_role, shard_dim, tp_slice  # the one TP split rule
from lowvram.plan import check_tp_size

BLOCK_PREFIXES = ("blocks.", "audio_injector.")



def layer_prefixes(cfg: DiTConfig, layer: int) -> tuple[str, ...]:
    """State-dict key prefixes of transformer layer `layer` (its block and the injector that follows it)."""
    out = [f"blocks.{layer}."]
    if layer in cfg.audio_inject_layers:
        j = cfg.audio_inject_layers.index(layer)
        out += [f"audio_injector.injector.{j}.", f"audio_injector.injector_adain_layers.{j}."]
    return tuple(out)


def layer_of(cfg: DiTConfig, key: str) -> int | None:
    """The transformer layer whose file holds `key`, None for a nonblock key."""
    m = re.match(r"blocks\.(\d+)\.", key)
    if m:
        return int(m.group(1))
    m = re.match(r"audio_injector\.(?:injector|injector_adain_layers)\.(\d+)\.", key)
    if m:
        return cfg.audio_inject_layers[int(m.group(1))]
    return None


def input_group(linear: str) -> str:
    """Linears fed the same tensor share one set of input statistics: self-attn q/k/v (the modulated
    hidden state), cross-attn and injector k/v (text / audio tokens)."""
    owner, _, leaf = linear.rpartition(".")
    if leaf in ("q", "k", "v") and owner.endswith("self_attn"):
        return f"{owner}.qkv"
    if leaf in ("k", "v") and (owner.endswith("cross_attn") or ".injector." in f".{owner}."):
        return f"{owner}.kv"
    return linear


def check_tp(cfg: DiTConfig, recipe: dict[str, str], tp_size: int) -> None:
    """One InputError line if the model cannot be split `tp_size` ways in this recipe."""
    check_tp_size(cfg, tp_size)
    if tp_size == 1:
        return
    for name, fmt in recipe.items():
        if fmt == "int4" and module_role(name) == "row":
            cols = (cfg.ffn_dim if name.endswith("ffn.2") else cfg.dim) // tp_size
            if cols % INT4_GROUP:
                raise InputError(f"--tp {tp_size} with int4: {name} would get {cols} input columns per rank, not a "
                                 f"multiple of the {INT4_GROUP}-wide groups; use a smaller --tp")


def split_state(state: dict[str, torch.Tensor], tp_size: int) -> list[dict[str, torch.Tensor]]:
    """One layer's full state -> `tp_size` rank states (see the module docstring)."""
    if tp_size == 1:
        return [dict(state)]
    for key, t in state.items():
        dim = shard_dim(key, t.ndim)
        if dim is not None and t.shape[dim] % tp_size:
            raise InputError(f"{key}: dimension {dim} of {list(t.shape)} does not split {tp_size} ways")
    return [{key: tp_slice(key, t, rank, tp_size).contiguous() for key, t in state.items()} for rank in range(tp_size)]


def merge_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of `split_state` (exact)."""
    if len(states) == 1:
        return dict(states[0])
    merged = {}
    for key, t in states[0].items():
        dim = None if is_row_bias(key) else shard_dim(key, t.ndim)
        merged[key] = t if dim is None else torch.cat([s[key] for s in states], dim=dim)
    return merged
