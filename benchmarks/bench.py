"""`lowvram bench`: every configuration on every clip with the same seeds, then speed, memory and quality vs the baseline.

    lowvram bench --baseline CKPT --candidate OUT_FP8 --candidate OUT_INT8 --candidate "CKPT::--kv=fp8" \
        --clips CLIPS_DIR --out REPORT/

The configurations and clips are read by `configs.py`; each run happens in its own process (`runs.py`) and is
reused when its run.json matches the job (``--rerun`` runs everything again). Then `scoring.py` compares each
candidate with the baseline through the metrics (`metrics/`), `summary.py` makes the table, and `report.py` writes
report.html, report.md and results.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowvram.benchmarks.configs import BenchOptions, load_clips, parse_config, say, slug, unique_labels
from lowvram.benchmarks.runs import finished_run, launch_run, make_job
from lowvram.benchmarks.scoring import measure
from lowvram.errors import InputError


def _mode(value: str, name: str) -> str:
    if value not in ("auto", "on", "off"):
        raise InputError(f"--{name} {value!r}: use auto, on or off")
    return value


def run_bench(opts: BenchOptions) -> dict:
    """Run (or reuse) every configuration on every clip, measure, and write the report; returns results.json's dict."""
    from lowvram.benchmarks.report import write_report

    _mode(opts.fid, "fid")
    _mode(opts.sync, "sync")
    if opts.seconds is not None and opts.seconds <= 0:
        raise InputError(f"--seconds {opts.seconds}: must be positive")
    if not opts.candidates:
        raise InputError("give at least one --candidate")
    configs = [parse_config(opts.baseline, "baseline")] + [parse_config(c, "candidate") for c in opts.candidates]
    unique_labels(configs)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = load_clips(Path(opts.clips), out)
    # weights are looked up before hours of runs, so a missing file with --fid on / --sync on fails at once
    fid_weights = _optional_weights(opts.fid, "fid", opts.fid_weights)
    sync_weights = _optional_weights(opts.sync, "sync", opts.syncnet_weights)
    if opts.metrics_device is None:
        import torch

        opts.metrics_device = "cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu"

    runs: dict[str, dict[str, dict]] = {c.label: {} for c in configs}
    total, k = len(configs) * len(clips), 0
    for clip in clips:
        for cfg in configs:
            k += 1
            run_dir = out / "runs" / slug(cfg.label) / clip.name
            job = make_job(cfg, clip, run_dir, opts.size, opts.seconds, opts.seed, opts.device)
            rec = None if opts.rerun else finished_run(run_dir, job["fingerprint"])
            if rec is not None:
                rec["reused"] = True
                say(opts, f"[{k}/{total}] {cfg.label} on {clip.name}: reused {run_dir}")
            else:
                say(opts, f"[{k}/{total}] {cfg.label} on {clip.name}: running ...")
                rec = launch_run(job, run_dir)
                rec["reused"] = False
                if rec["status"] == "done":
                    sp = rec["speed"]
                    say(opts, f"    done in {sp['wall_s']:.1f} s, {_num(sp.get('s_per_block'))} s/block, "
                        f"first frame after {_num(sp.get('ttff_s'))} s")
                else:
                    say(opts, f"    failed: {rec.get('error')} (log: {run_dir / 'log.txt'})")
            rec["dir"] = str(run_dir)
            runs[cfg.label][clip.name] = rec

    results = measure(opts, configs, clips, runs, out, fid_weights, sync_weights)
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    write_report(results, out)
    return results


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _optional_weights(mode: str, name: str, given):
    from lowvram.benchmarks import metrics as M

    if mode == "off":
        return {"status": "off", "reason": f"--{name} off"}
    try:
        path = M.find_fid_weights(given) if name == "fid" else M.find_syncnet_weights(given)
        return {"status": "ok", "path": path}
    except InputError as err:
        if mode == "on":
            raise
        return {"status": "skipped", "reason": str(err)}

