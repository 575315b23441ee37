"""Time and memory of `lowvram quantize` at the real 14B shapes, measured on a few layers and extrapolated.

    PYTHONPATH=. python quantize/measure.py --layers 3 --formats int8,fp8 --out measure.json   (on a GPU machine)

Writes a random-weight checkpoint with the real widths (dim 5120, ffn 13824, 40 heads, text 4096, audio
1024x25, rank-128 LoRA) but only `--layers` transformer layers (layer 0 carries an audio injector, as 12 of the
real 40 do), makes synthetic calibration samples at 704x384 (latent 48x88, 3168 tokens per block), runs the
quantizer on the GPU and reports per phase: seconds, bytes read, peak VRAM and RSS. The 40-layer figures are
extrapolated per layer (time, bytes) or computed exactly (host KV bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shim() -> None:
    """Make lowvram.quantize / lowvram.calibration importable from a source tree without an install."""
    import lowvram

    for name in ("calibration", "quantize"):
        full = f"lowvram.{name}"
        if full in sys.modules:
            continue
        try:
            if importlib.util.find_spec(full) is not None:
                continue
        except ModuleNotFoundError:
            pass
        spec = importlib.util.spec_from_file_location(full, ROOT / name / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / name)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        setattr(lowvram, name, mod)
        spec.loader.exec_module(mod)


def check_tiny(device: str) -> float:
    """Max |difference| between the layer-streamed trajectory (host KV store, device compute) and `Stream` on
    `device`, on a tiny checkpoint with 2 blocks per sample (the KV caches are read back)."""
    import torch

    from lowvram.calibration import synthetic_samples
    from lowvram.checkpoint import LORA_NAME, build_meta_model, checkpoint_index, load_state_dict_streaming, read_lora
    from lowvram.model.config import tiny
    from lowvram.model.sampler import StreamInputs, ShiftDraws, Stream
    from lowvram.quantize.calibrate import CheckpointSource, run_trajectory
    from lowvram.synthetic import write_checkpoint

    cfg = tiny()
    root = Path(tempfile.mkdtemp(prefix="qcheck-"))
    write_checkpoint(root, cfg, seed=0, shards=2, lora=True)
    lora = root / LORA_NAME
    model = load_state_dict_streaming(root, build_meta_model(cfg), device=device, lora=lora).eval()
    samples = synthetic_samples(cfg, 2, seed=3, blocks=2)
    res = run_trajectory(CheckpointSource(checkpoint_index(root), cfg, read_lora(lora, cfg), device), samples)
    worst = 0.0
    for i, s in enumerate(samples):
        st = Stream(model, StreamInputs(s.context.to(device), s.ref_latents.to(device), s.motion_latents.to(device)),
                    s.latent_hw, draws=ShiftDraws(cfg, seed=s.shift_seed))
        out = torch.cat([st.sample_block(*(t.to(device) for t in blk)) for blk in s.blocks], dim=1).cpu()
        worst = max(worst, float((out - res.finals[i]).abs().max()))
    return worst


def main(argv=None) -> dict:
    _shim()
    if argv is None and "--check-tiny" in sys.argv:
        print(json.dumps({"tiny_stream_vs_streamed_max_abs": check_tiny("cuda")}), flush=True)
        sys.argv.remove("--check-tiny")
    import torch

    from lowvram.calibration import synthetic_samples
    from lowvram.model.config import s2v_14b
    from lowvram.quantize import QuantizeOptions, quantize_checkpoint
    from lowvram.quantize.calibrate import host_state_estimate
    from lowvram.synthetic import write_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--formats", default="int8,fp8")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="smoke test at the tiny widths")
    args = ap.parse_args(argv)

    from lowvram.checkpoint import expected_shapes
    from lowvram.model.config import tiny

    real = s2v_14b() if not args.tiny else tiny()
    cfg = dataclasses.replace(real, num_layers=args.layers, audio_inject_layers=(0,), name="custom")
    hw = (48, 88) if not args.tiny else (8, 16)
    work = Path(args.work or tempfile.mkdtemp(prefix="qmeasure-"))
    t0 = time.perf_counter()
    written = write_checkpoint(work / "ckpt", cfg, seed=0, shards=1, lora=True, lora_rank=128)
    t_write = time.perf_counter() - t0
    samples = synthetic_samples(cfg, args.samples, seed=0, latent_hw=hw, blocks=args.blocks, context_len=120)
    result = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "layers_measured": args.layers, "samples": args.samples,
              "heldout": 1, "blocks": args.blocks, "latent_hw": [48, 88], "rows": args.rows,
              "checkpoint_bytes": written.tensor_bytes, "checkpoint_write_s": round(t_write, 1), "formats": {}}
    for fmt in args.formats.split(","):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        rep = quantize_checkpoint(QuantizeOptions(ckpt=work / "ckpt", out=work / f"q_{fmt}", samples=samples, fmt=fmt,
                                                  device=args.device, rows=args.rows, progress=False))
        total = time.perf_counter() - t
        run = rep["calibration"]["run"]
        e2e = rep["end_to_end"]
        calib_s, eval_s = run["seconds"], e2e["seconds"]
        write_s = total - calib_s - eval_s
        per_layer_calib = calib_s / args.layers
        per_layer_write = write_s / args.layers
        per_layer_eval = eval_s / args.layers
        result["formats"][fmt] = {
            "measured": {"total_s": round(total, 1), "calibration_s": calib_s,
                         "calibration_load_s": run.get("load_seconds"), "analysis_s": run.get("analysis_seconds"),
                         "eval_load_s": e2e.get("load_seconds"), "write_s": round(write_s, 1),
                         "eval_s": eval_s, "calibration_bytes_read": run["bytes_read"],
                         "quantization_pass_bytes_read": rep["quantization_pass_bytes_read"],
                         "peak_vram_bytes": int(torch.cuda.max_memory_allocated()) if args.device.startswith("cuda")
                         else 0, "peak_rss_bytes": run["peak_rss_bytes"],
                         "folder_bytes": rep["sizes"]["quantized_folder_bytes"]},
            "extrapolated_40_layers": {
                "calibration_s": round(per_layer_calib * real.num_layers, 1),
                "write_s": round(per_layer_write * real.num_layers, 1),
                "eval_s": round(per_layer_eval * real.num_layers, 1),
                "total_s": round((per_layer_calib + per_layer_write + per_layer_eval) * real.num_layers, 1),
            },
        }
        print(json.dumps({fmt: result["formats"][fmt]}), flush=True)
    # exact host-side figures for the real model and these samples
    real_samples = synthetic_samples(real, 1, seed=0, latent_hw=hw, blocks=args.blocks, context_len=1)
    per_sample = host_state_estimate(real, real_samples)
    shapes = expected_shapes(real)
    block = sum(2 * _numel(s) for k, s in shapes.items() if k.startswith(("blocks.", "audio_injector.")))
    nonblock = sum(2 * _numel(s) for k, s in shapes.items() if not k.startswith(("blocks.", "audio_injector.")))
    lora = sum(2 * 128 * (s[0] + s[1]) for k, s in shapes.items()
               if k.endswith(".weight") and len(s) == 2 and k.rsplit(".", 2)[-2] in ("q", "k", "v", "o")
               and ("attn" in k or "injector." in k)) + sum(2 * 128 * (s[0] + s[1]) for k, s in shapes.items()
                                                            if k.endswith(("ffn.0.weight", "ffn.2.weight")))
    passes = args.blocks * real.num_steps
    result["real_model"] = {
        "host_kv_and_cond_bytes_per_sample": per_sample,
        "host_kv_and_cond_bytes": per_sample * args.samples,
        "calibration_passes": passes,
        "layer_bytes_bf16": block, "nonblock_bytes": nonblock, "lora_bytes": lora,
        "calibration_bytes_read": nonblock + passes * (block + lora),
        "quantization_pass_bytes_read": nonblock + block + lora,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
