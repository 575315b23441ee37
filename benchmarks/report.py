"""The bench report: report.html (self-contained, plots inline as base64 PNG), report.md (figures beside it) from
results.json. Re-render without re-running anything: ``python -m lowvram.benchmarks.report REPORT/results.json``.

Both files print the summary table from ``results["summary"]`` exactly as stored (values already rounded to the
digits shown), so every number in them equals the one in results.json.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path

from lowvram.model.config import FPS

FIGURES = "figures"


def fmt_cell(value, delta: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:+g}" if delta else f"{value:g}"
    return str(value)


# =====================================================================================================
# plots (matplotlib, Agg)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100})
    return plt


def _labels(results):
    return [c["label"] for c in results["configs"]]


def _clips(results):
    return [c["name"] for c in results["settings"]["clips"]]


def plot_psnr(results: dict, path: Path) -> bool:
    clips, cands = _clips(results), _labels(results)[1:]
    if not any(results["quality"].get(c, {}).get(k, {}).get("status") == "ok" for c in cands for k in clips):
        return False
    plt = _plt()
    n = len(clips)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for i, clip in enumerate(clips):
        ax = axes[i // cols][i % cols]
        for label in cands:
            q = results["quality"].get(label, {}).get(clip, {})
            if q.get("status") == "ok":
                t = [f / FPS for f in range(len(q["psnr"]))]
                ax.plot(t, q["psnr"], label=label, lw=1.4)
        ax.set_title(clip)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("PSNR vs baseline (dB)")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Per-frame PSNR against the baseline (100 dB = identical frames)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _bar(ax, labels, values, title, ylabel, color="#4c72b0"):
    xs = range(len(labels))
    vals = [v if v is not None else 0 for v in values]
    bars = ax.bar(xs, vals, color=color)
    for b, v in zip(bars, values):
        ax.annotate("n/a" if v is None else f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def plot_speed(results: dict, path: Path) -> bool:
    rows = results["summary"]["rows"]
    labels = [r["config"] for r in rows]
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    _bar(axes[0], labels, [r["ttff_s"] for r in rows], "time to first frame", "s")
    _bar(axes[1], labels, [r["s_per_block"] for r in rows], "seconds per block (steady state)", "s", "#dd8452")
    _bar(axes[2], labels, [r["fps"] for r in rows], "frames per second (steady state)", "fps", "#55a868")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_memory(results: dict, path: Path) -> bool:
    labels = _labels(results)
    per_config = {}
    for label in labels:
        ranks: dict[str, list] = {}
        for rec in results["runs"][label].values():
            for r in (rec.get("memory") or {}).get("ranks", []):
                if r.get("gpu_reserved_gib") is not None:
                    name = f"{r['name']} {r['device']}"
                    prev = ranks.get(name, [0.0, 0.0])
                    ranks[name] = [max(prev[0], r["gpu_alloc_gib"] or 0), max(prev[1], r["gpu_reserved_gib"] or 0)]
        per_config[label] = ranks
    has_gpu = any(per_config.values())
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if has_gpu else 1, figsize=(12 if has_gpu else 6, 3.6), squeeze=False)
    rows = results["summary"]["rows"]
    if has_gpu:
        ax = axes[0][0]
        names = sorted({n for r in per_config.values() for n in r})
        width = 0.8 / max(1, len(names))
        colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
        for j, name in enumerate(names):
            xs = [i + j * width for i in range(len(labels))]
            alloc = [per_config[lab].get(name, [0, 0])[0] for lab in labels]
            res = [per_config[lab].get(name, [0, 0])[1] for lab in labels]
            color = colors[j % len(colors)]
            ax.bar(xs, res, width, color="none", edgecolor=color, hatch="//", label=f"{name} reserved")
            ax.bar(xs, alloc, width, color=color, alpha=0.85, label=f"{name} allocated")
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, rotation=20, ha="right")
        ax.set_ylabel("GiB")
        ax.set_title("peak GPU memory per rank (solid: allocated, hatched: reserved)")
        ax.legend(fontsize=7)
    _bar(axes[0][-1], [r["config"] for r in rows], [r["host_ram_gib"] for r in rows], "peak host RAM", "GiB",
         "#8172b3")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_sync(results: dict, path: Path) -> bool:
    labels, clips = _labels(results), _clips(results)
    curves = {}
    for label in labels:
        acc = {}
        for clip in clips:
            p = results["sync"].get(label, {}).get(clip, {}).get("proxy", {})
            if "curve" in p:
                for k, v in zip(p["curve"]["offsets"], p["curve"]["corr"]):
                    acc.setdefault(k, []).append(v)
        if acc:
            curves[label] = (sorted(acc), [sum(acc[k]) / len(acc[k]) for k in sorted(acc)])
    if not curves:
        return False
    rows = results["summary"]["rows"]
    has_syncnet = any(r["sync_c"] is not None for r in rows)
    plt = _plt()
    fig, axes = plt.subplots(1, 3 if has_syncnet else 2, figsize=(13 if has_syncnet else 10, 3.4))
    ax = axes[0]
    for label, (ks, vs) in curves.items():
        ax.plot(ks, vs, marker=".", label=label)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("offset (frames; + = mouth lags audio)")
    ax.set_ylabel("correlation")
    ax.set_title("lip-sync proxy: mouth opening vs speech envelope")
    ax.legend(fontsize=7)
    _bar(axes[1], [r["config"] for r in rows], [r["proxy_corr"] for r in rows], "proxy r at best offset", "r",
         "#937860")
    if has_syncnet:
        ax = axes[2]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["sync_c"] or 0 for r in rows], 0.4, label="Sync-C (higher is better)")
        ax.bar([x + 0.2 for x in xs], [r["sync_d"] or 0 for r in rows], 0.4, label="Sync-D (lower is better)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["config"] for r in rows], rotation=20, ha="right")
        ax.set_title("SyncNet")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def make_figures(results: dict, out: Path) -> dict[str, str]:
    """{name: relative path} of the figures written under out/figures/."""
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, fn in (("psnr", plot_psnr), ("speed", plot_speed), ("memory", plot_memory), ("sync", plot_sync)):
        p = fig_dir / f"{name}.png"
        if fn(results, p):
            made[name] = f"{FIGURES}/{name}.png"
    return made


# =====================================================================================================
# tables


def summary_tables(results: dict) -> list[tuple[str, str, list[dict]]]:
    """(id, title, columns) of the two summary tables: speed & memory, and quality."""
    cols = results["summary"]["columns"]
    speed = [c for c in cols if c["group"] in ("both", "speed")]
    quality = [c for c in cols if c["group"] in ("both", "quality")]
    return [("summary-speed", "Speed and memory", speed), ("summary-quality", "Quality against the baseline", quality)]


def per_clip_rows(results: dict) -> list[dict]:
    rows = []
    for label in _labels(results):
        for clip in _clips(results):
            run = results["runs"][label].get(clip, {})
            q = results["quality"].get(label, {}).get(clip, {})
            s = results["sync"].get(label, {}).get(clip, {})
            p, sn = s.get("proxy", {}), s.get("syncnet", {})
            sp = run.get("speed") or {}
            rows.append({
                "config": label, "clip": clip,
                "run": run.get("status", "?") + (" (reused)" if run.get("reused") else ""),
                "first frame (s)": _r(sp.get("ttff_s")), "s / block": _r(sp.get("s_per_block")),
                "PSNR (dB)": _r(q.get("psnr_mean")), "SSIM": _r(q.get("ssim_mean")),
                "latent rel. err": _r(q.get("latent_rel_err")),
                "Sync-C": _r(sn.get("sync_c")), "Sync-D": _r(sn.get("sync_d")),
                "proxy r": _r(p.get("corr")), "proxy chance r": _r(p.get("chance_corr")),
                "proxy offset": p.get("offset"),
                "proxy signal": p.get("source", p.get("reason", "-")),
            })
    return rows


def _r(v, digits: int = 4):
    return None if v is None else float(f"{v:.{digits}g}")


# =====================================================================================================
# markdown


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _settings_line(results: dict) -> str:
    s = results["settings"]
    return (f"{len(s['clips'])} clips from `{s['clips_dir']}`, size {s['size']}, "
            f"{'whole clips' if s['seconds'] is None else str(s['seconds']) + ' s each'}, seed {s['seed']}, "
            f"device {s['device']}; created {results['created']}")


def _run_problems(results: dict) -> list[str]:
    out = []
    for label, per in results["runs"].items():
        for clip, rec in per.items():
            if rec.get("status") != "done":
                out.append(f"{label} on {clip}: {rec.get('error', 'failed')} (see {rec.get('dir')}/log.txt)")
    return out


def render_markdown(results: dict, figures: dict[str, str]) -> str:
    parts = ["# lowvram bench report", "", _settings_line(results), ""]
    base = results["configs"][0]
    parts += [f"Baseline: **{base['label']}** = `{base['model_dir']}` ({base['fmt']}). Candidates: "
              + ", ".join(f"**{c['label']}** = `{c['model_dir']}` ({c['fmt']})" for c in results["configs"][1:]), ""]
    parts += ["## Summary", "", results["summary"]["note"], ""]
    for tid, title, cols in summary_tables(results):
        parts += [f"### {title}", ""]
        rows = [[fmt_cell(r[c["key"]], c["delta"]) for c in cols] for r in results["summary"]["rows"]]
        parts += [_md_table([c["label"] for c in cols], rows), ""]
    problems = _run_problems(results)
    if problems:
        parts += ["**Failed runs:**", ""] + [f"- {p}" for p in problems] + [""]
    parts += ["## What each metric is", ""]
    parts += [f"- **{k}**: {v}" for k, v in results["metric_notes"].items()]
    parts += [f"- {n}" for n in results.get("notes", [])] + [""]
    for name, title in (("psnr", "Per-frame PSNR"), ("speed", "Speed"), ("memory", "Memory"), ("sync", "Lip sync")):
        if name in figures:
            parts += [f"## {title}", "", f"![{title}]({figures[name]})", ""]
    parts += ["## Per clip", ""]
    pc = per_clip_rows(results)
    if pc:
        headers = list(pc[0])
        parts += [_md_table(headers, [[fmt_cell(r[h]) for h in headers] for r in pc]), ""]
    strips = results.get("strips", {})
    if any(strips.values()):
        parts += ["## Frames: baseline | candidate | difference", ""]
        for label, per in strips.items():
            for clip, rel in per.items():
                parts += [f"**{label}**, {clip}", "", f"![{label} {clip}]({rel})", ""]
    parts += ["## Runs", ""]
    run_rows = []
    for label, per in results["runs"].items():
        for clip, rec in per.items():
            mem = rec.get("memory") or {}
            run_rows.append([label, clip, rec.get("status", "?"), "yes" if rec.get("reused") else "no",
                             (rec.get("summary") or {}).get("layout", "-"), (rec.get("summary") or {}).get("device", "-"),
                             fmt_cell(_r((rec.get("speed") or {}).get("wall_s"))), fmt_cell(_r(mem.get("host_peak_gib"))),
                             f"`{rec.get('dir')}`"])
    parts += [_md_table(["config", "clip", "status", "reused", "layout", "device", "wall (s)", "host RAM (GiB)",
                         "folder"], run_rows), ""]
    return "\n".join(parts)


# =====================================================================================================
# html


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd} h3{font-size:15px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3} td.text{text-align:left}
tr.baseline td{background:#f6faff}
td.good{color:#1a7f37} td.bad{color:#b3261e}
.scroll{overflow-x:auto} img{max-width:100%;border:1px solid #eee;margin:6px 0}
.note{color:#555;font-size:13px} code{background:#f5f5f5;padding:1px 4px}
"""


def _img_tag(out: Path, rel: str, alt: str) -> str:
    data = base64.b64encode((out / rel).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _delta_class(key: str, value) -> str:
    if value is None or value == 0:
        return ""
    lower_better = key in ("d_s_per_block_pct", "d_gpu_alloc_pct", "d_host_ram_pct", "d_sync_d")
    good = value < 0 if lower_better else value > 0
    return " good" if good else " bad"


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ['<div class="scroll"><table><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="text">{html.escape(str(c))}</td>' for c in row) + "</tr>")
    return "".join(out) + "</table></div>"


def render_html(results: dict, figures: dict[str, str], out: Path) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lowvram bench report</title>",
             f"<style>{CSS}</style></head><body>", "<h1>lowvram bench report</h1>",
             f"<p class='note'>{e(_settings_line(results))}</p>"]
    base = results["configs"][0]
    parts.append("<p>Baseline: <b>" + e(base["label"]) + f"</b> = <code>{e(base['model_dir'])}</code> ({e(base['fmt'])})."
                 + " Candidates: " + ", ".join(f"<b>{e(c['label'])}</b> = <code>{e(c['model_dir'])}</code> "
                                               f"({e(c['fmt'])})" for c in results["configs"][1:]) + "</p>")
    parts.append(f"<h2>Summary</h2><p class='note'>{e(results['summary']['note'])}</p>")
    for tid, title, cols in summary_tables(results):
        parts.append(f"<h3>{e(title)}</h3><div class='scroll'><table id='{tid}'><tr>"
                     + "".join(f"<th>{e(c['label'])}</th>" for c in cols) + "</tr>")
        for i, r in enumerate(results["summary"]["rows"]):
            cells = []
            for c in cols:
                v = r[c["key"]]
                cls = "text" if isinstance(v, str) else ""
                if c["delta"]:
                    cls += _delta_class(c["key"], v)
                cells.append(f"<td class='{cls.strip()}' data-key='{c['key']}'>{e(fmt_cell(v, c['delta']))}</td>")
            parts.append(f"<tr class='{'baseline' if i == 0 else 'candidate'}' data-config='{e(r['config'])}'>"
                         + "".join(cells) + "</tr>")
        parts.append("</table></div>")
    problems = _run_problems(results)
    if problems:
        parts.append("<p><b>Failed runs:</b></p><ul>" + "".join(f"<li>{e(p)}</li>" for p in problems) + "</ul>")
    parts.append("<h2>What each metric is</h2><ul>"
                 + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in results["metric_notes"].items())
                 + "".join(f"<li>{e(n)}</li>" for n in results.get("notes", [])) + "</ul>")
    for name, title in (("psnr", "Per-frame PSNR"), ("speed", "Speed"), ("memory", "Memory"), ("sync", "Lip sync")):
        if name in figures:
            parts.append(f"<h2>{e(title)}</h2>" + _img_tag(out, figures[name], title))
    pc = per_clip_rows(results)
    if pc:
        headers = list(pc[0])
        parts.append("<h2>Per clip</h2>" + _html_table(headers, [[fmt_cell(r[h]) for h in headers] for r in pc]))
    strips = results.get("strips", {})
    if any(strips.values()):
        parts.append("<h2>Frames: baseline | candidate | difference</h2>")
        for label, per in strips.items():
            for clip, rel in per.items():
                if (out / rel).is_file():
                    parts.append(f"<h3>{e(label)}, {e(clip)}</h3>" + _img_tag(out, rel, f"{label} {clip}"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict, out: Path) -> dict[str, Path]:
    """Write report.md and report.html (and the figures) next to results.json."""
    out = Path(out)
    figures = make_figures(results, out)
    md = out / "report.md"
    md.write_text(render_markdown(results, figures))
    page = out / "report.html"
    page.write_text(render_html(results, figures, out))
    return {"markdown": md, "html": page, "figures": out / FIGURES}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m lowvram.benchmarks.report REPORT/results.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    written = write_report(json.loads(path.read_text()), path.parent)
    print(f"wrote {written['html']} and {written['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
