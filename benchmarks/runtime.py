"""The runtime's own loop at the real size on one GPU: what `lowvram run` gets per block, not a bare forward.

    PYTHONPATH=. python benchmarks/runtime.py [--format fp8] [--act static] [--kv fp8] [--offload --cap-gib 24]
                                              [--sink vae|mp4 --audio SPEECH.wav]

Random weights at the real shapes (q/k/v fused and layers compiled, as `load_stage` does) and random
conditioning at 704x384 run through `StageRunner` with the runtime's defaults (tp1 x pp1, reference swap after
clip 0). Each block's wall time is taken when its clean latent reaches the host, so it includes everything the
loop does between forwards. T5, wav2vec2 and the VAE are not run (their costs are measured elsewhere), unless
`--sink`: then `lowvram run`'s own BlockSink (a real-size Wan2.1 VAE with random weights, decoding on its own
stream and thread) takes every latent, and with `mp4` also writes the video with the speech — what the product
adds per block on the same GPU. The memory record splits the peak into the model's bytes and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `lowvram` sets it

import torch  # noqa: E402

from benchmarks.fullsize import LAT_HW, block_inputs, build_model, calibrate_static_scales, conditioning
from lowvram.model.config import s2v_14b
from lowvram.model.dit import compile_model
from lowvram.model.sampler import Stream
from lowvram.model.sampler import StreamInputs
from lowvram.parallel.engine import StageRunner, Topology
from lowvram.plan import GiB, RunShape, plan_layouts

VIDEO_FRAMES_PER_BLOCK = 12  # 3 latent frames, 4 video frames each


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="fp8")
    ap.add_argument("--act", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--kv", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--offload", action="store_true", help="the step caches in pinned host RAM (one 24 GB card)")
    ap.add_argument("--cap-gib", type=float, default=None, help="per-process GPU memory cap, e.g. 24")
    ap.add_argument("--blocks", type=int, default=8, help="blocks to generate (4 per clip; steady from block 5)")
    ap.add_argument("--sink", choices=["none", "vae", "mp4"], default="none",
                    help="hand each latent to lowvram run's BlockSink: VAE decode only, or decode + mp4")
    ap.add_argument("--audio", default=None, help="speech for --sink mp4 (default: a second of silence)")
    ap.add_argument("--memory-breakdown", action="store_true",
                    help="record every allocation after the load and attribute the peak's live bytes to code lines")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/runtime.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = s2v_14b()
    if args.blocks < cfg.blocks_per_clip + 2:
        sys.exit(f"error: --blocks {args.blocks}: use at least {cfg.blocks_per_clip + 2} to reach the steady state")
    model = build_model(cfg, args.format)
    cond = conditioning(cfg)
    if args.act == "static":
        x, audio, pose = block_inputs(cfg)
        stream = Stream(model, cond, LAT_HW)
        calibrate_static_scales(model, lambda: stream.forward(x, 0, audio, pose, 0, 10))
        del stream
        torch.cuda.empty_cache()
    compile_model()
    if args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    loaded_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if args.memory_breakdown:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    g = torch.Generator().manual_seed(3)
    inputs = StreamInputs(context=cond.context.cpu(), ref_latents=cond.ref_latents.cpu(),
                          motion_latents=cond.motion_latents.cpu(),
                          audio=torch.randn(1, cfg.audio_layers, cfg.audio_dim, 4 * cfg.frames_per_block * args.blocks,
                                            generator=g),
                          num_blocks=args.blocks, seed=0, latent_hw=LAT_HW)
    arrivals = []
    sink = make_sink(args, cfg, inputs) if args.sink != "none" else None

    def on_latent(b, x):
        if sink is not None:
            sink.put(b, x.cpu())
        arrivals.append(time.perf_counter())
    t0, mono0 = time.perf_counter(), time.monotonic()
    runner = StageRunner(model, Topology(), inputs, ref_update=True, kv_offload=args.offload,
                         kv_dtype=torch.float8_e4m3fn if args.kv == "fp8" else None, on_latent=on_latent)
    runner.run()
    if sink is not None:
        sink.close()
        arrivals = [t0 + sink.t0 + t - mono0 for t in sink.block_times]  # when each block reached the video
    block_s = [b - a for a, b in zip([t0] + arrivals[:-1], arrivals)]
    # Steady state: the ring buffer is full and the clip-1 re-prefill (block 4) is behind.
    steady = block_s[cfg.blocks_per_clip + 1:]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "format": args.format, "act": args.act,
           "kv": args.kv, "offload": args.offload, "cap_GiB": args.cap_gib,
           "first_block_s_incl_prefill_and_compile": round(block_s[0], 2),
           "block_s": [round(s, 3) for s in block_s],
           "steady_s_per_block": round(statistics.median(steady), 3),
           "fps": round(VIDEO_FRAMES_PER_BLOCK / statistics.median(steady), 1),
           "sink": args.sink,
           "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2),
           "model_GiB": round(model_bytes / 2**30, 2), "allocated_after_load_GiB": round(loaded_bytes / 2**30, 2)}
    if args.memory_breakdown:
        res["peak_breakdown_GiB"] = peak_breakdown(torch.cuda.memory._snapshot(), loaded_bytes)
        torch.cuda.memory._record_memory_history(enabled=None)
    if args.cap_gib:  # the planner's peak for this layout on one card of that size
        mode = "offload" if args.offload else "resident"
        lay = next((l for l in plan_layouts(cfg, f"1x{args.cap_gib:g}", RunShape(704, 384, 1 if args.kv == "fp8" else 2),
                                            args.format, gpu_model="h100") if l.mode == mode), None)
        res["planned_peak_GiB"] = round(lay.peak_bytes / GiB, 2) if lay else None
    print(json.dumps(res), flush=True)


def peak_breakdown(snapshot: dict, before: int, top: int = 25) -> dict:
    """Replay the allocator's trace: at the moment the live bytes peaked, which code lines held them (the first
    frame inside lowvram/ or benchmarks/), plus what was allocated before recording began (weights and all)."""
    events = [e for trace in snapshot["device_traces"] for e in trace if e["action"] in ("alloc", "free_completed")]

    def replay(stop: int | None = None):
        live, total, peak, peak_at = {}, 0, 0, 0
        for i, e in enumerate(events[:stop]):
            if e["action"] == "alloc":
                live[e["addr"]] = (where(e.get("frames", [])), e["size"])
                total += e["size"]
                if total > peak:
                    peak, peak_at = total, i + 1
            elif e["addr"] in live:
                total -= live.pop(e["addr"])[1]
        return live, peak, peak_at

    _, peak, peak_at = replay()
    live, _, _ = replay(peak_at)
    held: dict[str, int] = {}
    for line, size in live.values():
        held[line] = held.get(line, 0) + size
    rows = sorted(held.items(), key=lambda kv: -kv[1])[:top]
    return {"before_recording": round(before / 2**30, 3), "recorded_peak": round(peak / 2**30, 3),
            "by_line": {line: round(b / 2**30, 3) for line, b in rows}}


def where(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if "/lowvram/" in name or "/benchmarks/" in name:
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return f"other: {frames[0].get('name') if frames else '?'}"


def make_sink(args, cfg, inputs):
    """`lowvram run`'s BlockSink on this GPU with a real-size VAE (random weights, written to a temp folder)."""
    import tempfile
    from pathlib import Path

    from lowvram.sink import BlockSink
    from lowvram.synthetic_models import full_sizes, write_vae

    tmp = Path(tempfile.mkdtemp(prefix="lowvram-bench-sink-"))
    (vae_path,) = write_vae(tmp, full_sizes().vae, device="cuda")
    audio = args.audio or silence(tmp / "silence.wav")
    sink = BlockSink(vae_path, inputs.motion_latents.cuda(), tmp / "out.mp4", audio, "cuda", inputs.num_blocks, None)
    if args.sink == "vae":  # decode only: frames are counted, not encoded
        sink.writer.close()
        sink.writer = CountingWriter()
    return sink


class CountingWriter:
    frames_written = 0

    def write(self, frames):
        self.frames_written += len(frames)

    def close(self):
        pass


def silence(path) -> str:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    return str(path)


if __name__ == "__main__":
    main()
