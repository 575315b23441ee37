"""What `lowvram quantize` reports: the end-to-end error check against bf16 and quant_report.json / .md."""

from __future__ import annotations

from lowvram.kernels import linear as K
from lowvram.model.config import DiTConfig

from .formats import rel_err

def _end_to_end(cfg: DiTConfig, eval_ids, refs, qt, heldout: bool) -> dict:
    steps = cfg.num_steps
    per_sample = []
    step_errs = [[] for _ in range(steps)]
    for j, i in enumerate(eval_ids):
        ref_v, ref_f = refs[i]
        q_v, q_f = qt.velocities[j], qt.finals[j]
        for k, (a, b) in enumerate(zip(q_v, ref_v)):
            step_errs[k % steps].append(rel_err(a, b))
        per_sample.append({"sample": i, "final_rel_err": rel_err(q_f, ref_f),
                           "final_max_abs_err": float((q_f - ref_f).abs().max()),
                           "velocity_rel_err_max": max(rel_err(a, b) for a, b in zip(q_v, ref_v))})
    finals = [s["final_rel_err"] for s in per_sample]
    return {"on": "held-out samples" if heldout else "calibration samples (no held-out sample)",
            "samples": per_sample, "final_rel_err_mean": sum(finals) / len(finals), "final_rel_err_max": max(finals),
            "velocity_rel_err_per_step": [sum(e) / len(e) for e in step_errs],
            "metric": "||x_q - x_bf16|| / ||x_bf16|| of the 4-step denoised latents (all blocks), same noise/shifts",
            "bytes_read": qt.bytes_read, "seconds": round(qt.seconds, 3), "load_seconds": round(qt.load_seconds, 3)}


def _report(opts, cfg, manifest, plans, keep_info, calib_run, e2e, index, quant_bytes_read, seconds, resumed) -> dict:
    files_bytes = sum(f["bytes"] for f in manifest["files"].values())
    layers = {}
    for name in sorted(plans):
        p = plans[name]
        d = p.to_json()
        d["format"] = manifest["recipe"][name]
        if d["format"] == "bf16":
            d["err_if_quantized"], d["err"] = d["err"], 0.0
        d["bytes"] = K.weight_bytes(p.out_features, p.in_features, d["format"])
        layers[name] = d
    errs = [d["err"] for d in layers.values() if d["format"] != "bf16"]
    int8 = [d for d in layers.values() if d.get("naive_err") is not None and d["format"] == "int8"]
    return {
        "format": opts.fmt, "act": opts.act, "model": cfg.name, "tp": opts.tp,
        "keep_bf16": manifest["keep_bf16"],
        "sizes": {"checkpoint_bytes": sum(e.nbytes for e in index.values()), "quantized_folder_bytes": files_bytes},
        "calibration": {**manifest["calibration"], "run": calib_run},
        "quantization_pass_bytes_read": quant_bytes_read,
        "per_layer": {"metric": "||x Wq^T - x W^T|| / ||x W^T|| on recorded input rows (held-out when available)",
                      "mean_err": sum(errs) / max(1, len(errs)), "max_err": max(errs, default=0.0),
                      "int8_naive_per_tensor_mean_err": (sum(d["naive_err"] for d in int8) / len(int8)) if int8 else None,
                      "layers": layers},
        "end_to_end": e2e,
        "seconds": round(seconds, 3), "resumed": resumed,
    }


def _gb(n) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _report_md(r: dict) -> str:
    c = r["calibration"]
    run = c["run"]
    lines = [f"# Quantization report: {r['model']} → {r['format']}" + (f" (act {r['act']})" if r["format"] == "fp8" else ""),
             "",
             f"- checkpoint {_gb(r['sizes']['checkpoint_bytes'])} → quantized folder {_gb(r['sizes']['quantized_folder_bytes'])}"
             f" (tp {r['tp']})",
             f"- calibration: {c['samples'] - c['heldout']} samples + {c['heldout']} held out, {c['rows_per_layer']} rows "
             f"per layer, digest `{c['digest'][:16]}`",
             f"- calibration run: {run['passes']} passes, {run['layer_loads']} layer loads, {_gb(run['bytes_read'])} read "
             f"from disk, {run['seconds']:.1f} s on {run['device']}, peak RSS {_gb(run['peak_rss_bytes'])}"
             + (f", peak VRAM {_gb(run['peak_vram_bytes'])}" if run.get("peak_vram_bytes") else "")
             + f", host state (KV + cond caches) {_gb(run['host_state_bytes'])}",
             f"- kept in bf16 beyond the defaults: {len(r['keep_bf16']['layers'])} layers ({r['keep_bf16']['mode']})",
             ""]
    e = r.get("end_to_end")
    if e:
        lines += ["## End-to-end error vs bf16", "", f"On {e['on']}: {e['metric']}.", "",
                  f"- final latents: mean {e['final_rel_err_mean']:.4f}, max {e['final_rel_err_max']:.4f}",
                  "- velocity per step: " + ", ".join(f"step {i}: {v:.4f}" for i, v in
                                                      enumerate(e["velocity_rel_err_per_step"])), ""]
    pl = r["per_layer"]
    lines += ["## Per-layer error", "", f"Metric: {pl['metric']}. Mean {pl['mean_err']:.4f}, max {pl['max_err']:.4f}."
              + (f" Naive per-tensor int8 on the same rows: mean {pl['int8_naive_per_tensor_mean_err']:.4f}."
                 if pl.get("int8_naive_per_tensor_mean_err") is not None else ""), "",
              "| layer | format | alpha | error | naive int8 | outlier ratio | bytes |", "|---|---|---|---|---|---|---|"]
    for name, d in sorted(pl["layers"].items(), key=lambda kv: -kv[1]["err"]):
        alpha = "" if d["format"] != "int8" else ("none" if d["alpha"] is None else f"{d['alpha']:g}")
        naive = "" if d.get("naive_err") is None else f"{d['naive_err']:.4f}"
        lines.append(f"| {name} | {d['format']} | {alpha} | {d['err']:.4f} | {naive} | {d['outlier_ratio']:.1f} | "
                     f"{d['bytes']:,} |")
    return "\n".join(lines) + "\n"
