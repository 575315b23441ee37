"""What each rank runs: build its stage slice, run the stream, hand finished latents to the sink."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from lowvram.model.config import DiTConfig
from lowvram.model.sampler import StreamInputs
from lowvram.parallel.engine import StageRunner, make_topology

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}


@dataclass
class WorkerSpec:
    source: str  # bf16 checkpoint (folder or single file) or a quantized folder
    cfg: dict
    tp: int  # tp, pp, stages: the run's Layout (lowvram.plan) as the launcher chose it; never recomputed here
    pp: int
    stages: list[list[int]]
    inputs_path: str  # torch.save'd StreamInputs
    device: str = "cpu"
    dtype: str = "bfloat16"
    kv_dtype: str | None = None
    lora: str | None = None
    quantized: bool = False
    ref_update: bool = False  # swap the reference after clip 0 (upstream's multi-GPU behaviour)
    compile: bool = False  # torch.compile the per-layer math (CUDA only)
    gpus: list[int] | None = None  # the visible GPU of each rank (default: LOCAL_RANK, else rank, modulo the count)
    memory_caps: list[int | None] | None = None  # each rank's allocator cap in bytes (emulating smaller GPUs)


def load_stage(spec: WorkerSpec, topo, device):
    """This rank's slice of the DiT, ready to run: q/k/v fused into one GEMM, compiled if asked (CUDA)."""
    from lowvram.model.dit import fuse_qkv_
    cfg = DiTConfig.from_dict(spec.cfg)
    layers = spec.stages[topo.stage]
    if spec.quantized:
        from lowvram.quantized import load_quantized_stage

        model = load_quantized_stage(spec.source, cfg, topo, layers, device=device)
    else:
        from lowvram.parallel.stage import build_stage_from_checkpoint

        model = build_stage_from_checkpoint(spec.source, cfg, topo, layers, device=device, dtype=DTYPES[spec.dtype],
                                            lora=spec.lora)
    fuse_qkv_(model)
    if spec.compile:
        compile_layers(torch.device(device).type, warn=topo.rank == 0)
    return model


def compile_layers(device_type: str, warn: bool) -> bool:
    """torch.compile the layers on CUDA; without Triton, say so once and run uncompiled instead of failing."""
    from torch.utils._triton import has_triton

    from lowvram.model import dit

    if device_type != "cuda":
        return False
    if not has_triton():
        if warn:
            print("warning: torch.compile needs Triton, which is not installed here: running uncompiled (slower); "
                  "`pip install triton` to compile, or pass --no-compile to silence this", file=sys.stderr)
        return False
    dit.compile_model()
    return True


def device_for(spec: WorkerSpec, rank: int) -> torch.device:
    if spec.device != "cuda":
        return torch.device("cpu")
    if spec.gpus is not None:
        return torch.device("cuda", spec.gpus[rank])
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())


def run_worker(rank: int, world: int, out_queue, spec: WorkerSpec) -> torch.device:
    """Spawned-worker body: finished latents go back to the launcher over `out_queue`; returns the device used."""
    from lowvram.parallel.launch import cap_memory

    device = device_for(spec, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        cap_memory(device, spec.memory_caps[rank] if spec.memory_caps else None)
    topo = make_topology(spec.tp, spec.pp)
    model = load_stage(spec, topo, device)
    out_queue.put(("layers", rank, model.layer_ids))
    inputs: StreamInputs = torch.load(spec.inputs_path, weights_only=False)
    kill = os.environ.get("LOWVRAM_TEST_KILL_RANK")  # "rank:item" — fault-injection hook for the tests
    on_latent = lambda b, x: out_queue.put(("latent", rank, (b, x.numpy())))
    runner = StageRunner(model, topo, inputs, kv_dtype=DTYPES[spec.kv_dtype] if spec.kv_dtype else None,
                         on_latent=on_latent, ref_update=spec.ref_update)
    if kill and int(kill.split(":")[0]) == rank:
        runner.kill_after = int(kill.split(":")[1])
    runner.run()
    out_queue.put(("timing", rank, runner.timing))
    return device
