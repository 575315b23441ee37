"""Build the model slice one rank runs: its pipeline stage's layers, its tensor-parallel shard, nothing else.

From a bf16 checkpoint (+ LoRA) each tensor is read, merged, sliced to this rank and cast one at a time
(`lowvram.loader`); from a quantized folder the rank opens only its own files (`lowvram.quantized`). The full
model is never materialised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowvram.loader import load_state_dict_streaming
from lowvram.model.config import DiTConfig
from lowvram.model.dit import LiveAvatarDiT
from lowvram.parallel.engine import Topology
from lowvram.parallel.tensor import set_tp_group
from lowvram.plan import layer_param_bytes, split_layers


def stage_layers(cfg: DiTConfig, pp: int, fmt: str = "bf16", recipe: dict | None = None) -> list[list[int]]:
    """The planner's split of the layers into `pp` contiguous stages of balanced bytes."""
    per_layer, _ = layer_param_bytes(cfg, recipe, fmt)
    return split_layers(per_layer, pp)


def meta_stage(cfg: DiTConfig, topo: Topology, layers: list[int]) -> LiveAvatarDiT:
    with torch.device("meta"):
        return LiveAvatarDiT(cfg, layers=layers, embeddings=topo.first, head=topo.last, tp=topo.tp)


def build_stage_from_checkpoint(ckpt: str | Path, cfg: DiTConfig, topo: Topology, layers: list[int],
                                device="cpu", dtype=torch.bfloat16, lora=None, lora_alpha=None) -> LiveAvatarDiT:
    """This rank's slice from a bf16 checkpoint: each full tensor read once, the LoRA (and its file's override
    tensors) applied on the host, sliced to this TP rank, cast and moved — the quantizer's loader, per rank."""
    model = load_state_dict_streaming(ckpt, meta_stage(cfg, topo, layers), dtype, device, lora=lora,
                                      lora_alpha=lora_alpha, tp_rank=topo.tp_rank, tp=topo.tp, merge_device="cpu")
    set_tp_group(model, topo.tp_group)
    return model.eval()
