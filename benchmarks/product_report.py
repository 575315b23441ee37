"""The markdown report of benchmarks/product.py's records (one table of phases, one of runs, the commands)."""

from __future__ import annotations

GB, GiB = 1e9, 1024**3


def _num(v, digits: int = 2) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def render_report(results: dict) -> str:
    m = results.get("machine", {})
    ph = results["phases"]
    lines = ["## The product at full size on one GPU (`benchmarks/product.py`)", "",
             f"{m.get('gpu')} (driver {m.get('driver')}, {m.get('gpu_memory_MiB')} MiB), torch {m.get('torch')}, "
             f"{m.get('date')}" + (" — TINY model on the CPU (code-path check, not a measurement)" if m.get("tiny")
                                   else "") + ". Random weights at the real shapes. Every command below ran as its "
             "own process; host RSS = peak over the process tree (all pages / anonymous only), GPU = nvidia-smi "
             "(per process, and the card's total above its idle use).", ""]
    lines += ["| phase | wall s | host RSS GiB (tree / anon / one process) | GPU GiB (per process; card) | result |",
              "|---|---|---|---|---|"]
    for name, r in ph.items():
        if name == "report":
            continue
        if r.get("status") != "done":
            lines.append(f"| {name} | – | – | – | {r.get('status')}: {r.get('why') or r.get('error', '')} |")
            continue
        gpu = ", ".join(_num(x) for x in r.get("gpu_peak_per_process_GiB", [])) or "–"
        lines.append(f"| {name} | {_num(r.get('wall_s'), 1)} | {_num(r.get('host_peak_tree_GiB'))} / "
                     f"{_num(r.get('host_peak_tree_anon_GiB'))} / {_num(r.get('host_peak_process_GiB'))} | {gpu}; "
                     f"{_num(r.get('gpu_peak_above_baseline_GiB'))} | {phase_summary(name, r)} |")
    runs = {n: r for n, r in ph.items() if n.startswith("run-") and r.get("status") == "done"}
    if runs:
        lines += ["", "| run | layout | first frame s (in run / from launch) | steady s/block | steady fps | "
                      "planned peak GiB (per GPU) | rank peaks GiB (reserved) | mp4 | caches |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, r in runs.items():
            plan = r.get("planned", {})
            ranks = ", ".join(_num(v.get("gpu_reserved_GiB")) for v in r.get("ranks", {}).values()) or "–"
            v = r.get("video", {})
            lines.append(f"| {n} | {r['layout']} | {_num(r['time_to_first_frame_s'], 1)} / "
                         f"{_num(r.get('first_output_bytes_s'), 1)} | {_num(r['steady_s_per_block'], 3)} | "
                         f"{_num(r['steady_fps'])} | {_num(plan.get('peak_GiB'))} "
                         f"({', '.join(_num(x) for x in plan.get('per_gpu_peak_GiB', []))}) | {ranks} | "
                         f"{v.get('video_codec')}+{v.get('audio_codec')} {v.get('frames')} frames "
                         f"{'ok' if v.get('ok') else 'BAD'} | compile {r['compile_cache']}, prompt "
                         f"{r['prompt_cache']} |")
    if "bench" in ph and ph["bench"].get("status") == "done":
        lines += ["", "| bench config | layout | first frame s | s/block | fps | GPU reserved GiB | host GiB | "
                      "PSNR dB | SSIM | latent rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in ph["bench"]["rows"]:
            lines.append("| " + " | ".join(_num(row.get(k)) for k in (
                "config", "layout", "ttff_s", "s_per_block", "fps", "gpu_reserved_gib", "host_ram_gib", "psnr_db",
                "ssim", "latent_rel_err")) + " |")
    lines += ["", "Commands:", ""]
    for name, r in ph.items():
        for step in ("reshard", None, "inspect"):  # in the order they ran
            rec = r.get(step) if step else r
            if isinstance(rec, dict) and rec.get("command"):
                lines.append(f"- {name}{' (' + step + ')' if step else ''}: `{rec['command']}`")
    return "\n".join(lines) + "\n"


def phase_summary(name: str, r: dict) -> str:
    if name == "make":
        return f"{r['written_GB']} GB in {r['write_s']} s; inspect complete={r['inspect']['complete']}"
    if name == "calib":
        return f"{len(r['clips'])} clips; speech {r['speech']['seconds']} s from {', '.join(r['speech']['from'])}"
    if name.startswith("quantize"):
        c = r["calibration"]
        return (f"{r['folder_GB']} GB folder; calibration {c['seconds']:.0f} s ({c['read_GB']} GB read, RSS "
                f"{c['peak_rss_GiB']} GiB, VRAM {c['peak_vram_GiB']} GiB, KV on disk {c['kv_on_disk']}); "
                f"e2e err {_num(r['end_to_end_rel_err'], 4)}")
    if name.startswith("run-"):
        return f"{r['frames']} frames, {_num(r['steady_fps'])} fps steady"
    if name == "bench":
        return f"report renders: {r['renders']}"
    if name == "vae":
        return "; ".join(f"{x['dtype']} cudnn.benchmark={x['cudnn_benchmark']}: {x['steady_ms_per_block']} ms/block, "
                         f"+{x['peak_above_weights_GiB']} GiB" for x in r["rows"])
    if name == "engine":
        return "; ".join(f"{k}: {v['steady_s_per_block']} s/block, {v['fps']} fps, peak {v['peak_reserved_GiB']} GiB"
                         for k, v in r["runs"].items())
    if name == "demo-cuda":
        return "passed"
    return ""


# ----------------------------------------------------------------------------------------------------------
