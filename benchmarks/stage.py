"""One pipeline stage of the planned 4x24 GB layout at real shapes, under a 24 GiB per-process cap.

    PYTHONPATH=. python benchmarks/stage.py [--format fp8] [--stages 4] [--stage 0] [--kv bf16,fp8]

Builds stage `--stage` of a `--stages`-way pipeline over layers (the planner's split, random fp8/int8 weights),
prefills its conditioning cache, allocates its slice of all 4 step caches, runs the 4 steady-state forwards of one
block through its layers, and prints the measured peak next to the planner's prediction for that stage.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.fullsize import LAT_HW, compile_blocks, cuda_time
from lowvram.kernels.linear import quantize_
from lowvram.model.cache import CondCache, StepKV
from lowvram.model.dit import fuse_qkv_
from lowvram.model.config import s2v_14b
from lowvram.model.dit import BlockInputs, LiveAvatarDiT
from lowvram.plan import FRAGMENTATION, GiB, RunShape, layer_param_bytes, split_layers, stage_memory

CAP_GIB = 24


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="fp8")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--kv", default="bf16,fp8")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/stage.py needs a CUDA GPU")
    cfg = s2v_14b()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GiB / total))
    per_layer, groups = layer_param_bytes(cfg, None, args.format)
    layers = split_layers(per_layer, args.stages)[args.stage]
    if args.compile:
        compile_blocks()
    results = []
    for kv_name in args.kv.split(","):
        kv_dtype = torch.float8_e4m3fn if kv_name == "fp8" else torch.bfloat16
        results.append(run_stage(cfg, layers, args, kv_name, kv_dtype, per_layer, groups))
        print(json.dumps(results[-1]), flush=True)
    print("\n| stage | layers | weights | KV | measured peak GiB | planner GiB (no VAE, no context) | error |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']}/{r['stages']} | {r['layers']} | {r['format']} | {r['kv']} | {r['peak_GiB']} | "
              f"{r['planned_GiB']} | {r['error_pct']:+.1f}% |")


def run_stage(cfg, layers, args, kv_name, kv_dtype, per_layer, groups) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    first = args.stage == 0
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LiveAvatarDiT(cfg, layers=layers, embeddings=first, head=args.stage == args.stages - 1)
    torch.set_default_dtype(prev)
    quantize_(model, args.format)
    fuse_qkv_(model)
    torch.cuda.empty_cache()
    h, w = LAT_HW
    fsl = (h // 2) * (w // 2)
    block_tokens = cfg.frames_per_block * fsl
    cond_tokens = 2 * fsl + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
    with torch.no_grad():
        text = torch.randn(cfg.text_len, cfg.dim, device="cuda", dtype=torch.bfloat16)
        cond = CondCache(positions=torch.zeros(cond_tokens, 3, dtype=torch.long, device="cuda"), num_ref_tokens=fsl)
        e6 = torch.randn(1, 6, cfg.dim, device="cuda") * 0.05
        tokens = torch.randn(cond_tokens, cfg.dim, device="cuda", dtype=torch.bfloat16)
        model.prefill_layers(tokens, e6, cond.positions, model.text_kv(text), cond)
        capacity = cfg.blocks_per_clip * block_tokens
        kvs = [StepKV(layers, capacity, cfg.num_heads, cfg.head_dim, kv_dtype, "cuda") for _ in range(cfg.num_steps)]
        inp = BlockInputs(e6=torch.randn(cfg.frames_per_block, 6, cfg.dim, device="cuda") * 0.05,
                          audio_global=torch.randn(cfg.frames_per_block, cfg.dim, device="cuda", dtype=torch.bfloat16),
                          audio_tokens=torch.randn(cfg.frames_per_block, 5, cfg.dim, device="cuda", dtype=torch.bfloat16),
                          start=capacity, ref_shift=10, tokens_per_frame=fsl, grid=(h // 2, w // 2))
        x = torch.randn(block_tokens, cfg.dim, device="cuda", dtype=torch.bfloat16)

        def one_block():
            for kv in kvs:
                model.run_layers(x, inp, cond, kv)

        ms = cuda_time(one_block, warmup=1, repeat=3)
    peak = torch.cuda.max_memory_allocated()
    shape = RunShape(h * 8, w * 8, 1 if kv_name == "fp8" else 2)
    mem = stage_memory(cfg, shape, layers, 1, per_layer, groups, first, args.stage == args.stages - 1, 4)
    planned = sum(v for k, v in mem.items() if k != "cuda_context") * FRAGMENTATION
    model = kvs = cond = None  # free before the next run
    return {"stage": args.stage, "stages": args.stages, "layers": f"{layers[0]}-{layers[-1]}", "format": args.format,
            "kv": kv_name, "block_ms_4_steps": round(ms, 1), "peak_GiB": round(peak / GiB, 2),
            "planned_GiB": round(planned / GiB, 2), "error_pct": 100 * (planned - peak) / peak,
            "cap_GiB": CAP_GIB}


if __name__ == "__main__":
    main()
