"""The summary table of `lowvram bench` (the report prints exactly these values): per configuration, speed and
memory over its runs, quality against the baseline, and the deltas."""

from __future__ import annotations

import math

import numpy as np

from lowvram.benchmarks.configs import Config


def finite(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


SUMMARY_COLUMNS = [
    # key, label, group, digits of precision (significant), is a delta
    ("config", "config", "both", None, False),
    ("format", "weights", "speed", None, False),
    ("options", "run options", "speed", None, False),
    ("layout", "layout", "speed", None, False),
    ("ttff_s", "first frame (s)", "speed", 4, False),
    ("s_per_block", "s / block", "speed", 4, False),
    ("d_s_per_block_pct", "Δ s/block %", "speed", 3, True),
    ("fps", "fps", "speed", 4, False),
    ("gpu_alloc_gib", "peak GPU alloc (GiB)", "speed", 4, False),
    ("gpu_reserved_gib", "peak GPU reserved (GiB)", "speed", 4, False),
    ("d_gpu_alloc_pct", "Δ GPU alloc %", "speed", 3, True),
    ("host_ram_gib", "peak host RAM (GiB)", "speed", 4, False),
    ("d_host_ram_pct", "Δ host RAM %", "speed", 3, True),
    ("psnr_db", "PSNR (dB)", "quality", 4, False),
    ("psnr_min_db", "min PSNR (dB)", "quality", 4, False),
    ("ssim", "SSIM", "quality", 4, False),
    ("latent_rel_err", "latent rel. err", "quality", 4, False),
    ("fid", "FID", "quality", 4, False),
    ("sync_c", "Sync-C", "quality", 4, False),
    ("d_sync_c", "Δ Sync-C", "quality", 3, True),
    ("sync_d", "Sync-D", "quality", 4, False),
    ("d_sync_d", "Δ Sync-D", "quality", 3, True),
    ("proxy_corr", "lip-sync proxy r", "quality", 4, False),
    ("d_proxy_corr", "Δ proxy r", "quality", 3, True),
    ("proxy_offset", "proxy offset (frames)", "quality", 3, False),
]


def display_round(v, digits: int):
    """The value as the report prints it (``digits`` significant digits), so report and JSON agree exactly."""
    v = finite(v)
    if v is None:
        return None
    return float(f"{v:.{digits}g}")


def _mean(values):
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(results: dict) -> dict:
    configs = results["configs"]
    base = configs[0]["label"]
    raw = {}
    for cfg in configs:
        label = cfg["label"]
        done = [r for r in results["runs"][label].values() if r.get("status") == "done"]
        speed = [r["speed"] for r in done]
        mem = [r["memory"] for r in done]
        q = [v for v in results["quality"].get(label, {}).values() if v.get("status") == "ok"]
        s = list(results["sync"].get(label, {}).values())
        sn = [e["syncnet"] for e in s if "sync_c" in e.get("syncnet", {})]
        px = [e["proxy"] for e in s if "corr" in e.get("proxy", {})]
        frames = sum(v["frames"] for v in q)
        fid = results["fid"].get("per_config", {}).get(label, {}).get("fid") if results["fid"].get("status") == "ok" \
            else None
        layouts = sorted({r["summary"].get("layout", "?") for r in done})
        raw[label] = {
            "config": label, "format": cfg["fmt"], "options": _options_text(cfg), "layout": ",".join(layouts) or "-",
            "ttff_s": _mean([x.get("ttff_s") for x in speed]), "s_per_block": _mean([x.get("s_per_block") for x in speed]),
            "fps": _mean([x.get("fps") for x in speed]),
            "gpu_alloc_gib": max([m["gpu_alloc_peak_gib"] for m in mem if m.get("gpu_alloc_peak_gib") is not None],
                                 default=None),
            "gpu_reserved_gib": max([m["gpu_reserved_peak_gib"] for m in mem
                                     if m.get("gpu_reserved_peak_gib") is not None], default=None),
            "host_ram_gib": max([m["host_peak_gib"] for m in mem], default=None),
            "psnr_db": sum(v["psnr_mean"] * v["frames"] for v in q) / frames if frames else None,
            "psnr_min_db": min([v["psnr_min"] for v in q], default=None),
            "ssim": sum(v["ssim_mean"] * v["frames"] for v in q) / frames if frames else None,
            "latent_rel_err": _mean([v["latent_rel_err"] for v in q]),
            "fid": fid,
            "sync_c": _mean([x["sync_c"] for x in sn]), "sync_d": _mean([x["sync_d"] for x in sn]),
            "proxy_corr": _mean([x["corr"] for x in px]), "proxy_offset": _mean([x["offset"] for x in px]),
            "runs_failed": len(results["runs"][label]) - len(done),
        }
    b = raw[base]

    def pct(x, y):
        return (x / y - 1) * 100 if x is not None and y not in (None, 0) else None

    def diff(x, y):
        return x - y if x is not None and y is not None else None

    rows = []
    for cfg in configs:
        r = raw[cfg["label"]]
        is_base = cfg["label"] == base
        r["d_s_per_block_pct"] = None if is_base else pct(r["s_per_block"], b["s_per_block"])
        r["d_gpu_alloc_pct"] = None if is_base else pct(r["gpu_alloc_gib"], b["gpu_alloc_gib"])
        r["d_host_ram_pct"] = None if is_base else pct(r["host_ram_gib"], b["host_ram_gib"])
        r["d_sync_c"] = None if is_base else diff(r["sync_c"], b["sync_c"])
        r["d_sync_d"] = None if is_base else diff(r["sync_d"], b["sync_d"])
        r["d_proxy_corr"] = None if is_base else diff(r["proxy_corr"], b["proxy_corr"])
        row = {}
        for key, _, _, digits, _ in SUMMARY_COLUMNS:
            row[key] = display_round(r[key], digits) if digits is not None else r[key]
        row["runs_failed"] = r["runs_failed"]
        rows.append(row)
    cols = [{"key": k, "label": lab, "group": g, "delta": d} for k, lab, g, _, d in SUMMARY_COLUMNS]
    return {"columns": cols, "rows": rows,
            "note": "first frame: seconds from the start of the run (conditioning, model load, first block) to its "
                    "frames in the mp4; s/block and fps: steady state after the first block; speed: mean over clips; "
                    "memory: max over clips; PSNR/SSIM: mean over all frames of all clips; latent error, Sync and "
                    "proxy: mean over clips; Δ: candidate vs baseline"}


def _options_text(cfg: dict) -> str:
    return Config(**cfg).options_text()

