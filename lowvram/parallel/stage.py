"""Build the model slice one rank runs: its pipeline stage's layers, its tensor-parallel shard, nothing else.

From a bf16 checkpoint (+ LoRA) each tensor is read, merged, sliced to this rank and cast one at a time;
from a quantized folder the rank opens only its own files. The full model is never materialised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowvram.model.config import DiTConfig
from lowvram.model.dit import LiveAvatarDiT
from lowvram.parallel.engine import Topology
from lowvram.parallel.tensor import set_tp_group, tp_slice
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
    from lowvram.checkpoint import _assign, checkpoint_index, read_lora, read_tensor

    model = meta_stage(cfg, topo, layers)
    index = checkpoint_index(ckpt)
    lora_w = read_lora(lora, cfg, alpha=lora_alpha) if lora else None
    files: dict = {}
    try:
        for key, meta in model.state_dict(keep_vars=True).items():
            w = read_tensor(index[key], files)
            if lora_w is not None:
                w = lora_w.merge(key, w, files)
            w = tp_slice(key, w, topo.tp_rank, topo.tp)
            if tuple(w.shape) != tuple(meta.shape):
                raise ValueError(f"{key}: slice {tuple(w.shape)} != expected {tuple(meta.shape)}")
            _assign(model, key, w.to(device=device, dtype=dtype if w.is_floating_point() else w.dtype).contiguous())
    finally:
        for f in files.values():
            f.close()
    set_tp_group(model, topo.tp_group)
    return model.eval()
