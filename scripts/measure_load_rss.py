#!/usr/bin/env python
"""Peak host RSS of a streaming checkpoint load, against the size of the loaded result.

For each size it writes a random-weight checkpoint in the real layout (`lowvram.synthetic.write_checkpoint`)
into a temporary folder, then loads it in a fresh child process into a meta-device model
(`lowvram.checkpoint.load_state_dict_streaming`) and reports

    growth = peak RSS after the load (ru_maxrss) - RSS just before it

which over-estimates the load's own peak, never under-estimates it. `--compare-safe-open` also measures
the naive way (safetensors `safe_open` + clone of every tensor) for reference.

    .venv/bin/python scripts/measure_load_rss.py                  # tiny and large (1.4 GB at bf16)
    .venv/bin/python scripts/measure_load_rss.py --sizes medium --json

Not part of the test suite (the large case writes 1.4 GB); tests/test_checkpoint.py runs `--sizes medium`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # name: (DiTConfig overrides of lowvram.model.config.tiny, shards)
    "tiny": ({}, 3),
    "medium": (dict(dim=768, ffn_dim=3072, num_heads=6, num_layers=6, text_dim=256, audio_dim=64), 3),  # 149 MB
    "large": (dict(dim=2048, ffn_dim=8192, num_heads=16, num_layers=8, text_dim=1024, audio_dim=256,
                   audio_inject_layers=(0, 2, 4, 6)), 4),  # 1.40 GB
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(ckpt: str, dtype_name: str, lora: bool, method: str) -> dict:
    import torch

    from lowvram import checkpoint as C

    dtype = getattr(torch, DTYPES[dtype_name])
    index = C.checkpoint_index(ckpt)
    cfg = C.identify(index)
    model = C.build_meta_model(cfg)
    lora_path = Path(ckpt) / C.LORA_NAME if lora else None
    rss_before, peak_before = _rss_now(), _peak()
    t0 = time.perf_counter()
    if method == "lowvram":
        C.load_state_dict_streaming(index, model, dtype=dtype, lora=lora_path)
    else:  # naive reference: safe_open + clone, file after file
        from safetensors import safe_open

        for shard in sorted({e.file for e in index.values()}):
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    C.assign_tensor(model, key, f.get_tensor(key).to(dtype).clone())
    seconds = time.perf_counter() - t0
    peak_after = _peak()
    result = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert not any(p.is_meta for p in model.state_dict().values())
    return {"result_bytes": result, "rss_before": rss_before, "peak_before": peak_before, "peak_after": peak_after,
            "growth": peak_after - rss_before, "ratio": (peak_after - rss_before) / result, "seconds": seconds}


def measure(size: str, dtype_name: str = "bf16", lora: bool = False, method: str = "lowvram",
            workdir: str | None = None) -> dict:
    import torch

    from lowvram.model.config import tiny
    from lowvram.synthetic import write_checkpoint

    overrides, shards = SIZES[size]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        w = write_checkpoint(tmp, tiny(**overrides), seed=0, shards=shards, dtype=torch.bfloat16, lora=lora)
        write_s = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--child", tmp, "--dtype", dtype_name, "--method", method]
        cmd += ["--lora"] if lora else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(size=size, dtype=dtype_name, lora=lora, method=method, file_bytes=w.tensor_bytes,
               shards=len(w.shards), write_seconds=write_s)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,large", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--lora", action="store_true", help="also merge a rank-8 LoRA while loading")
    ap.add_argument("--compare-safe-open", action="store_true", help="also measure safe_open + clone")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    ap.add_argument("--workdir", default=None, help="where to write the temporary checkpoints")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="lowvram", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.lora, args.method)))
        return
    methods = ["lowvram"] + (["safe_open"] if args.compare_safe_open else [])
    rows = [measure(s, args.dtype, args.lora, m, args.workdir) for s in args.sizes.split(",") for m in methods]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'size':>7} {'method':>9} {'lora':>5} {'file MB':>9} {'result MB':>10} {'RSS before':>11} "
          f"{'peak after':>11} {'growth MB':>10} {'growth/result':>14} {'load s':>7}")
    for r in rows:
        print(f"{r['size']:>7} {r['method']:>9} {str(r['lora']):>5} {r['file_bytes'] / 1e6:9.1f} "
              f"{r['result_bytes'] / 1e6:10.1f} {r['rss_before'] / 1e6:11.1f} {r['peak_after'] / 1e6:11.1f} "
              f"{r['growth'] / 1e6:10.1f} {r['ratio']:14.3f} {r['seconds']:7.2f}")


if __name__ == "__main__":
    main()
