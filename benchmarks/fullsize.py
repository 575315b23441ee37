"""Full-size speed and memory of the 16.3B DiT at its real shapes (random weights; speed depends only on shapes).

One command, one table:
    PYTHONPATH=. python benchmarks/fullsize.py [--formats bf16,fp8,int8,int4] [--compile both] [--out results.json]

For each format: one forward at 704x384 steady state (3168 query tokens; 12,672 cached + 2,640 conditioning keys),
one at the first block (empty cache), and a whole 4-step block (quantized formats; bf16 weights plus 4 bf16 step
caches exceed 80 GB). Reports ms (CUDA events, median of repeats after warm-up), achieved TFLOP/s against the
counted FLOPs, and peak memory. Also: SDPA kernels at the steady-state shape and the floor from GEMM and
attention ceilings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lowvram.kernels.linear import FP8, quantize_
from lowvram.model.config import s2v_14b
from lowvram.model.dit import LiveAvatarDiT, compile_model, fuse_qkv_
from lowvram.model.sampler import StreamInputs, Stream

PROFILE = False
CUDA_GRAPH = False
COMPILED = False
FUSE_QKV = True
STATIC_ACT = False
LAT_HW = (88, 48)  # 704x384 pixels
FRAMES = 3


def cuda_time(fn, warmup=2, repeat=5) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def forward_flops(cfg, q_tokens: int, keys: int, fsl: int) -> float:
    """FLOPs of one inference forward (2 per MAC): linears on the block tokens, attention cores, injectors."""
    d, f, L = cfg.dim, cfg.ffn_dim, cfg.num_layers
    per_layer = 2 * q_tokens * (6 * d * d + 2 * d * f)  # self q,k,v,o + cross q,o + ffn (text K/V are cached)
    per_layer += 4 * q_tokens * keys * d  # self-attention QK^T and PV
    per_layer += 4 * q_tokens * cfg.text_len * d  # text cross-attention core
    inject = 2 * q_tokens * 2 * d * d + 4 * q_tokens * 5 * d  # injector q,o + core (k,v on 15 tokens negligible)
    return L * per_layer + len(cfg.audio_inject_layers) * inject


def build_model(cfg, fmt: str):
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LiveAvatarDiT(cfg)
    torch.set_default_dtype(prev)
    with torch.no_grad():  # trained-like scales for the parameters default init leaves at 0/1
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.normal_(0, 0.05)
    if fmt != "bf16":
        quantize_(model, fmt)
    if FUSE_QKV:
        fuse_qkv_(model)
    torch.cuda.empty_cache()
    return model.eval()


def conditioning(cfg):
    g = torch.Generator("cuda").manual_seed(1)
    h, w = LAT_HW
    return StreamInputs(
        context=torch.randn(120, cfg.text_dim, device="cuda", generator=g) * 0.1,
        ref_latents=torch.randn(1, 16, 1, h, w, device="cuda", generator=g),
        motion_latents=torch.randn(1, 16, cfg.motion_latent_frames, h, w, device="cuda", generator=g),
    )


def block_inputs(cfg, b: int = 0):
    g = torch.Generator("cuda").manual_seed(10 + b)
    h, w = LAT_HW
    return (torch.randn(16, FRAMES, h, w, device="cuda", generator=g),
            torch.randn(1, cfg.audio_layers, cfg.audio_dim, 4 * FRAMES, device="cuda", generator=g),
            torch.zeros(1, 16, FRAMES, h, w, device="cuda"))


def calibrate_static_scales(model, forward) -> None:
    """What `lowvram quantize --act static` stores: one activation scale per fp8 Linear (amax / 448), measured on
    a calibration forward, so the per-token amax pass disappears from every GEMM input."""
    from lowvram.kernels.linear import FP8_MAX, Fp8Linear

    amax, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, Fp8Linear):
            def hook(m, args, name=name):
                amax[name] = torch.maximum(amax.get(name, torch.zeros((), device="cuda")), args[0].abs().amax().float())
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.compiler.set_stance("force_eager"):  # hooks must not leak into the compiled graphs
        forward()
    for h in hooks:
        h.remove()
    for name, mod in model.named_modules():
        if name in amax:
            mod.act_scale = (amax[name] / FP8_MAX).clamp(min=1e-12)


def compile_blocks():
    compile_model()


def bench_format(cfg, fmt: str, whole_block: bool) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = build_model(cfg, fmt)
    weights_gb = torch.cuda.memory_allocated() / 1e9
    stream = Stream(model, conditioning(cfg), LAT_HW)
    x, audio, pose = block_inputs(cfg)
    steady = cfg.blocks_per_clip * stream.block_tokens  # the ring buffer is full from here on
    keys_steady = cfg.blocks_per_clip * stream.block_tokens + stream.cond.positions.shape[0]
    res = {"format": fmt, "weights_GB": round(weights_gb, 2), "build_s": round(time.time() - t0, 1)}
    if fmt == "fp8" and STATIC_ACT:
        calibrate_static_scales(model, lambda: stream.forward(x, 0, audio, pose, 0, 10))
        res["act"] = "static"
    res["first_ms"] = cuda_time(lambda: stream.forward(x, 0, audio, pose, 0, 10))
    res["steady_ms"] = cuda_time(lambda: stream.forward(x, 0, audio, pose, steady, 10))
    res["peak_forward_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    flops = forward_flops(cfg, stream.block_tokens, keys_steady, stream.fsl)
    res["steady_TFLOP"] = round(flops / 1e12, 1)
    res["steady_TFLOPs_per_s"] = round(flops / res["steady_ms"] / 1e9, 1)
    if COMPILED:  # the compiled graphs compute what the eager code does
        fwd = lambda: stream.forward(x, 0, audio, pose, steady, 10)
        compiled_out = fwd()
        with torch.compiler.set_stance("force_eager"):
            eager_out = fwd()
        res["compiled_vs_eager_rel_err"] = ((compiled_out - eager_out).abs().max() / eager_out.abs().max()).item()
    if CUDA_GRAPH:
        res.update(graph_layers(stream, x, audio, pose, steady))
    if PROFILE:
        res["parts_ms"] = forward_parts(stream, x, audio, pose, steady)
        res["profile"] = profile_forward(lambda: stream.forward(x, 0, audio, pose, steady, 10))
    if whole_block:
        for s in range(cfg.num_steps):
            stream.step_kv(s)
        stream.next_start = steady

        def one_block():
            stream.next_start = steady
            stream.sample_block(x, audio, pose)

        res["block_ms"] = cuda_time(one_block, warmup=1, repeat=3)
        res["peak_block_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    stream = model = None  # free before the next format
    torch.cuda.empty_cache()
    return res


@torch.no_grad()
def forward_parts(stream, x, audio, pose, start) -> dict:
    """ms of the pieces of one steady forward around the 40 layers (each timed alone)."""
    m = stream.model
    inp, e = stream.block_inputs(x.shape[1], 0, audio, start, 10)
    tokens = m.embed_noisy(x, pose)
    parts = {
        "block_inputs (time embedding, audio encoder)": lambda: stream.block_inputs(x.shape[1], 0, audio, start, 10),
        "embed_noisy": lambda: m.embed_noisy(x, pose),
        "rope_tables": lambda: m.rope_tables(inp, stream.cond, tokens.shape[0], tokens.device),
        "head_out": lambda: m.head_out(tokens, e, (x.shape[1], *stream.grid)),
    }
    out = {name: round(cuda_time(fn, 2, 10), 3) for name, fn in parts.items()}
    print("  parts " + json.dumps(out), flush=True)
    return out


@torch.no_grad()
def graph_layers(stream, x, audio, pose, start) -> dict:
    """The 40 layers of one steady-state forward launched one kernel at a time vs replayed from one CUDA graph:
    what launch gaps cost (conditioning tables precomputed; they hold host-side position arithmetic)."""
    m = stream.model
    inp, _ = stream.block_inputs(x.shape[1], 0, audio, start, 10)
    tokens = m.embed_noisy(x, pose)
    kv = stream.step_kv(0)
    tables = m.rope_tables(inp, stream.cond, tokens.shape[0], tokens.device)
    run = lambda: m.run_layers(tokens, inp, stream.cond, kv, tables=tables)
    eager_out = run().clone()
    eager_ms = cuda_time(run)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = run()
    graph_ms = cuda_time(graph.replay)
    err = (graph_out.float() - eager_out.float()).abs().max().item()
    print(f"  layers launched {eager_ms:.1f} ms, one CUDA graph {graph_ms:.1f} ms (max diff {err:.2e})", flush=True)
    return {"layers_eager_ms": round(eager_ms, 1), "layers_graph_ms": round(graph_ms, 1), "graph_max_diff": err}


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "cudnn", "flash", "attention", "sdpa")) and "triton" not in n:
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "sm90", "matmul", "scaled_mm")) and "triton" not in n:
        return "gemm"
    if "triton" in n:
        return "fused (triton)"
    if "copy" in n or "elementwise" in n or "reduce" in n or "cat" in n:
        return "copies / eager elementwise"
    return "other"


def profile_forward(fn) -> dict:
    """GPU busy time of one forward by kernel kind, plus the top kernels by their own time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    busy = sum(e.self_device_time_total for e in events) / 1000
    launches = sum(e.count for e in events)
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + e.self_device_time_total / 1000
    print(f"  GPU busy {busy:.1f} ms in {launches} kernel launches", flush=True)
    print("  by kind: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:30]
    for e in top:
        print(f"  {e.self_device_time_total / 1000:8.2f} ms  {e.count:5d}x  {e.key[:110]}", flush=True)
    return {"busy_ms": round(busy, 1), "launches": launches, "by_kind_ms": {k: round(v, 1) for k, v in kinds.items()},
            "top": [(e.key[:110], e.count, round(e.self_device_time_total / 1000, 2)) for e in top]}


def bench_attention(cfg) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, d = cfg.num_heads, cfg.head_dim
    q = torch.randn(1, h, 3168, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, h, 15312, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = {}
    ref = None
    from lowvram.model.dit import attention, attention_parts

    q3, k3, v3 = (t[0].transpose(0, 1) for t in (q, k, v))
    split = 12672
    exact = attention(q3, k3, v3)
    parts = attention_parts(q3, [(k3[:split], v3[:split]), (k3[split:], v3[split:])])
    out["segments_vs_concat_maxabs"] = (parts.float() - exact.float()).abs().max().item()
    out["segments_ms"] = round(cuda_time(lambda: attention_parts(q3, [(k3[:split], v3[:split]), (k3[split:], v3[split:])]), 3, 10), 3)
    out["concat_then_sdpa_ms"] = round(cuda_time(lambda: attention(q3, torch.cat([k3[:split], k3[split:]]), torch.cat([v3[:split], v3[split:]])), 3, 10), 3)
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v)
                out[name + "_ms"] = round(cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), 3, 10), 3)
                ref = o if ref is None else ref
        except RuntimeError as err:
            out[name + "_ms"] = f"unavailable: {str(err).splitlines()[0][:80]}"
    return out


def bench_gemm_floor(cfg, fmt: str) -> float:
    """ms of the bare GEMMs of one steady-state forward at this format (no activation quantization)."""
    m = 3168
    shapes = [(cfg.dim, cfg.dim)] * 6 + [(cfg.dim, cfg.ffn_dim), (cfg.ffn_dim, cfg.dim)]
    total = 0.0
    for k_, n in set(shapes):
        count = shapes.count((k_, n)) * cfg.num_layers
        if fmt == "fp8":
            a = torch.randn(m, k_, device="cuda").to(FP8)
            b = torch.randn(n, k_, device="cuda").to(FP8).t()
            sa = torch.ones(m, 1, device="cuda")
            sb = torch.ones(1, n, device="cuda")
            fn = lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)
        elif fmt == "int8":
            a = torch.randint(-127, 127, (m, k_), device="cuda", dtype=torch.int8)
            b = torch.randint(-127, 127, (n, k_), device="cuda", dtype=torch.int8).t()
            fn = lambda: torch._int_mm(a, b)
        else:
            a = torch.randn(m, k_, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, k_, device="cuda", dtype=torch.bfloat16).t()
            fn = lambda: a @ b
        total += cuda_time(fn, 3, 10) * count
    inj = len(cfg.audio_inject_layers) * 2
    a = torch.randn(m, cfg.dim, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(cfg.dim, cfg.dim, device="cuda", dtype=torch.bfloat16)
    total += cuda_time(lambda: a @ b, 3, 10) * inj * (0.5 if fmt in ("fp8", "int8") else 1.0)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="bf16,fp8,int8,int4")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--layers", type=int, default=40, help="fewer layers for a quick look (times scale linearly)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one steady forward")
    ap.add_argument("--graph", action="store_true", help="also time the 40 layers replayed from one CUDA graph")
    ap.add_argument("--no-fuse", action="store_true", help="keep q, k, v as three GEMMs")
    ap.add_argument("--act", choices=["dynamic", "static"], default="dynamic",
                    help="fp8 activation scales: per-token dynamic, or one calibrated scale per layer")
    args = ap.parse_args(argv)
    global PROFILE, FUSE_QKV, STATIC_ACT, CUDA_GRAPH, COMPILED
    CUDA_GRAPH = args.graph
    STATIC_ACT = args.act == "static"
    PROFILE = args.profile
    FUSE_QKV = not args.no_fuse
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/fullsize.py needs a CUDA GPU; run it on the device machine")
    cfg = s2v_14b()
    if args.layers != cfg.num_layers:
        from dataclasses import replace

        cfg = replace(cfg, num_layers=args.layers,
                      audio_inject_layers=tuple(i for i in cfg.audio_inject_layers if i < args.layers))
    torch.backends.cuda.matmul.allow_tf32 = True
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": cfg.num_layers}
    print(json.dumps(info), flush=True)
    results = {"info": info, "attention": bench_attention(cfg), "runs": [], "floor_ms": {}}
    print("attention", json.dumps(results["attention"]), flush=True)
    formats = args.formats.split(",")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compiled in modes:
        if compiled:
            COMPILED = True
            compile_blocks()
        for fmt in formats:
            try:
                r = bench_format(cfg, fmt, whole_block=fmt != "bf16")
            except torch.OutOfMemoryError as err:
                r = {"format": fmt, "error": f"out of memory: {str(err).splitlines()[0][:120]}"}
                torch.cuda.empty_cache()
            r["compiled"] = compiled
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    attn = results["attention"]
    best_attn = min(attn[k] for k in ("cudnn_ms", "flash_ms", "efficient_ms") if isinstance(attn.get(k), float))
    for fmt in formats:
        gemm = bench_gemm_floor(cfg, fmt)
        results["floor_ms"][fmt] = round(gemm + cfg.num_layers * best_attn, 1)
    print("floor", json.dumps(results["floor_ms"]), flush=True)
    print_table(results)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


def print_table(results):
    print("\n| format | compiled | first block ms | steady ms | TFLOP/s | 4-step block ms | weights GB | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "error" in r:
            print(f"| {r['format']} | {r['compiled']} | {r['error']} |||||| ")
            continue
        print(f"| {r['format']} | {'yes' if r['compiled'] else 'no'} | {r['first_ms']:.1f} | {r['steady_ms']:.1f} | "
              f"{r['steady_TFLOPs_per_s']} | {r.get('block_ms', float('nan')):.1f} | {r['weights_GB']} | "
              f"{r.get('peak_block_GB', r['peak_forward_GB'])} |")


if __name__ == "__main__":
    main()
