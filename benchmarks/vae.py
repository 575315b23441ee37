"""The streaming VAE decode of one block at the real size on one GPU: time and memory per block, by setting.

    PYTHONPATH=. python benchmarks/vae.py [--size 704*384] [--blocks 6]

A real-size Wan2.1 VAE with random weights (speed and memory depend only on shapes) decodes the TPP pipeline's
stream exactly as `lowvram run`'s BlockSink does: the 7-latent warm-up, then blocks of 3 latents (12 frames).
Each setting runs in this process one after the other: the dtype `lowvram run` uses on a GPU (bf16) and fp32, and
cuDNN's algorithm search (`torch.backends.cudnn.benchmark`) off (the default) and on. Per block: the median
GPU time of blocks 2.. (CUDA events), the peak allocated above the weights, and the max-abs difference of the
frames from the first setting of the same dtype (the algorithm search must not change the video).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def decode_stream(vae, motion, blocks):
    from lowvram.conditioning.vae import StreamingDecoder

    dec = StreamingDecoder(vae)
    dec.warmup(motion)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times, frames = [], []
    for x in blocks:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = dec.decode_block(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        frames.append(out.float().cpu())
    return times, torch.cat(frames, 2), torch.cuda.max_memory_allocated() - base


def main(argv=None):
    from lowvram.conditioning.vae import WanVAE
    from lowvram.plan import parse_size
    from lowvram.synthetic_models import full_sizes, write_vae

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--blocks", type=int, default=6)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/vae.py needs a CUDA GPU")
    w, h = parse_size(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="lowvram-bench-vae-"))
    (path,) = write_vae(tmp, full_sizes().vae, device="cuda")
    g = torch.Generator("cuda").manual_seed(0)
    lat = (h // 8, w // 8)
    motion = torch.randn(1, 16, 19, *lat, device="cuda", generator=g)
    blocks = [torch.randn(1, 16, 3, *lat, device="cuda", generator=g) for _ in range(args.blocks)]
    rows, first = [], {}
    for dtype in (torch.bfloat16, torch.float32):
        vae = WanVAE.load(path, device="cuda", dtype=dtype)
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            times, frames, peak = decode_stream(vae, motion, blocks)
            ref = first.setdefault(dtype, frames)
            steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
            rows.append({"dtype": str(dtype).split(".")[-1], "cudnn_benchmark": bench,
                         "first_block_ms": round(times[0], 1), "steady_ms_per_block": round(steady, 1),
                         "peak_above_weights_GiB": round(peak / 2**30, 2),
                         "max_abs_diff_vs_first": float((frames - ref).abs().max())})
            print(json.dumps(rows[-1]), flush=True)
        del vae
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
                      "rows": rows}))


if __name__ == "__main__":
    main()
