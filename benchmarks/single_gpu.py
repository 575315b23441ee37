"""One 24 GB card: int4 weights resident, the 4 step caches (fp8) in pinned host RAM streamed per layer.

    PYTHONPATH=. python benchmarks/single_gpu.py [--format int4] [--kv fp8] [--compile]

Runs the real-shape DiT (random weights) for whole 4-step blocks at 704x384 steady state under a 24 GiB
per-process cap and reports: measured peak, seconds per block, the time to stream every step's cache through
PCIe alone, the block time with resident caches (uncapped, for reference) and the share of the transfer time
hidden behind compute; the planner's prediction beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.fullsize import LAT_HW, block_inputs, build_model, compile_blocks, conditioning, cuda_time
from lowvram.model.config import s2v_14b
from lowvram.model.sampler import Stream
from lowvram.plan import GiB, RunShape, plan_layouts

CAP_GIB = 24


def block_seconds(stream, steady, x, audio, pose, repeat=2) -> float:
    def one():
        stream.next_start = steady
        stream.sample_block(x, audio, pose)

    return cuda_time(one, warmup=1, repeat=repeat) / 1000


def transfer_seconds(stream) -> float:
    """Host->device copies of every layer's cache of all 4 steps, no compute (what offloading must hide)."""
    kvs = stream.kv
    buf = kvs[0].buffers

    def copy_all():
        for kv in kvs:
            for i in kv.layers:
                buf.k[0].copy_(kv.k[i], non_blocking=True)
                buf.v[0].copy_(kv.v[i], non_blocking=True)

    return cuda_time(copy_all, warmup=1, repeat=2) / 1000


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="int4")
    ap.add_argument("--kv", default="fp8")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/single_gpu.py needs a CUDA GPU")
    cfg = s2v_14b()
    if args.compile:
        compile_blocks()
    kv_dtype = torch.float8_e4m3fn if args.kv == "fp8" else torch.bfloat16
    total = torch.cuda.get_device_properties(0).total_memory
    x, audio, pose = block_inputs(cfg)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "format": args.format, "kv": args.kv}

    # Resident caches, uncapped (reference for the hidden share; needs ~30 GB).
    model = build_model(cfg, args.format)
    stream = Stream(model, conditioning(cfg), LAT_HW, kv_dtype=kv_dtype)
    steady = cfg.blocks_per_clip * stream.block_tokens
    for s in range(cfg.num_steps):
        stream.step_kv(s)
    res["resident_s_per_block"] = round(block_seconds(stream, steady, x, audio, pose), 3)
    del stream
    torch.cuda.empty_cache()

    # Offloaded caches under the 24 GiB cap.
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GiB / total))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    stream = Stream(model, conditioning(cfg), LAT_HW, kv_dtype=kv_dtype, kv_offload=True)
    res["pin_alloc_s"] = round(time.time() - t0, 1)
    res["host_cache_GB"] = round(sum(kv.nbytes() for kv in stream.kv) / 1e9, 2)
    res["offload_s_per_block"] = round(block_seconds(stream, steady, x, audio, pose), 3)
    res["peak_GiB"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
    res["transfer_only_s_per_block"] = round(transfer_seconds(stream), 3)
    exposed = max(0.0, res["offload_s_per_block"] - res["resident_s_per_block"])
    res["hidden_share"] = round(1 - exposed / res["transfer_only_s_per_block"], 3)
    res["fps"] = round(12 / res["offload_s_per_block"], 2)
    lay = next(l for l in plan_layouts(cfg, "1x24", RunShape(704, 384, 1 if args.kv == "fp8" else 2), args.format,
                                       gpu_model="h100") if l.mode == "offload")
    res["planned_peak_GiB"] = round(lay.peak_bytes / GiB, 2)
    res["planned_host_GiB"] = round(lay.host_bytes / GiB, 2)
    res["planned_pcie_GB_per_block"] = round(lay.comm_bytes_per_block / 1e9, 2)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
