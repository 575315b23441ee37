"""What `lowvram inspect` reports about a bf16 checkpoint (headers only), and its rich tables."""

from __future__ import annotations

import time
from pathlib import Path

from lowvram.headers import dtype_name
from lowvram.identify import ARCH_FIELDS, check_keys, expected_shapes, identify, read_config_json
from lowvram.index import checkpoint_index
from lowvram.lora import lora_target_modules, read_lora
from lowvram.model.config import DiTConfig


def format_bytes(cfg: DiTConfig) -> dict[str, int]:
    """Bytes of the model's weights at bf16 / fp8 / int8 / int4: the planner's byte model (each quantized Linear
    as `kernels.linear.weight_bytes` allocates it, the layers kept in bf16 and everything else at bf16)."""
    from lowvram.plan import layer_param_bytes

    out = {}
    for fmt in ("bf16", "fp8", "int8", "int4"):
        per_layer, groups = layer_param_bytes(cfg, None, fmt)
        out[fmt] = sum(per_layer.values()) + sum(groups.values())
    return out


def inspect_checkpoint(ckpt: str | Path, lora: str | Path | None = None, *, lora_alpha: float | None = None,
                       allow_pickle: bool = False) -> dict:
    """Everything `lowvram inspect` reports, from headers only. Raises CheckpointError for unreadable input;
    an incomplete checkpoint is reported with `complete: False` and a one-line `problem`."""
    t0 = time.perf_counter()
    path = Path(ckpt)
    index = checkpoint_index(path, allow_pickle=allow_pickle)
    config = read_config_json(index)
    cfg = identify(index, config)
    keys = check_keys(index, cfg)
    files: dict[str, dict] = {}
    dtypes: dict[str, int] = {}
    for e in index.values():
        f = files.setdefault(e.file.name, {"name": e.file.name, "bytes": e.file.stat().st_size, "tensors": 0})
        f["tensors"] += 1
        dtypes[dtype_name(e.dtype)] = dtypes.get(dtype_name(e.dtype), 0) + 1
    sizes = format_bytes(cfg)
    sizes["file"] = sum(e.nbytes for e in index.values())
    report = {
        "path": str(path),
        "model": cfg.name,
        "config": {f: list(v) if isinstance(v, tuple) else v for f in ARCH_FIELDS for v in [getattr(cfg, f)]},
        "config_json": config is not None,
        "complete": keys.complete,
        "num_tensors": len(index),
        "expected_tensors": len(expected_shapes(cfg)),
        "params": sum(e.numel for e in index.values()),
        "dtypes": dtypes,
        "files": list(files.values()),
        "bytes": sizes,
        "missing": keys.missing,
        "unexpected": keys.unexpected,
        "mismatched": [{"key": k, "expected": list(a), "found": list(b)} for k, a, b in keys.mismatched],
        "lora": None,
        "problem": None,
    }
    if lora is not None:
        weights = read_lora(lora, cfg, alpha=lora_alpha, allow_pickle=allow_pickle)
        report["lora"] = weights.summary() | {"expected_targets": len(lora_target_modules(cfg))}
    if not keys.complete:
        first = (f"first missing: {keys.missing[0]!r}" if keys.missing
                 else f"first wrong shape: {keys.mismatched[0][0]!r}")
        report["problem"] = (
            f"{path}: incomplete {cfg.name} checkpoint: {len(keys.missing)} missing, {len(keys.mismatched)} "
            f"wrong-shape, {len(keys.unexpected)} unexpected keys ({first}); re-download it or point at the "
            f"right folder")
    report["seconds"] = round(time.perf_counter() - t0, 4)
    return report


def gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def inspect_renderables(report: dict) -> list:
    """Rich tables for `lowvram inspect` without --json."""
    from rich.table import Table

    summary = Table(title=f"checkpoint {report['path']}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    cfg = report["config"]
    summary.add_row("model", f"{report['model']}  (dim {cfg['dim']}, {cfg['num_layers']} layers, "
                             f"{len(cfg['audio_inject_layers'])} audio injectors)")
    status = "[green]complete[/]" if report["complete"] else "[red]incomplete[/]"
    summary.add_row("keys", f"{status}: {report['num_tensors']} tensors of {report['expected_tensors']} expected; "
                            f"{len(report['missing'])} missing, {len(report['unexpected'])} unexpected, "
                            f"{len(report['mismatched'])} wrong shape")
    summary.add_row("params", f"{report['params']:,}")
    summary.add_row("dtypes", ", ".join(f"{k} x{v}" for k, v in sorted(report["dtypes"].items())))
    summary.add_row("files", ", ".join(f"{f['name']} ({gb(f['bytes'])})" for f in report["files"]))
    b = report["bytes"]
    summary.add_row("size", f"on disk {gb(b['file'])} · bf16 {gb(b['bf16'])} · fp8 {gb(b['fp8'])} · "
                            f"int8 {gb(b['int8'])} · int4 {gb(b['int4'])}")
    lora = report.get("lora")
    if lora:
        summary.add_row("LoRA", f"{lora['path']}: rank {lora['rank']}, alpha {lora['alpha']:g} (scale "
                                f"{lora['scale']:g}), {lora['targets']} of {lora['expected_targets']} targets, "
                                f"{lora['tensors']} tensors, {len(lora['overrides'])} overrides, "
                                f"{lora['ignored']} ignored")
    summary.add_row("time", f"{report['seconds']:.3f} s (headers only)")
    out = [summary]
    problems = [("missing", k, "") for k in report["missing"]] + [
        ("wrong shape", m["key"], f"expected {m['expected']}, found {m['found']}") for m in report["mismatched"]] + [
        ("unexpected", k, "") for k in report["unexpected"]]
    if problems:
        table = Table(title=f"key problems (first 20 of {len(problems)})", title_justify="left")
        table.add_column("kind")
        table.add_column("key")
        table.add_column("detail")
        for row in problems[:20]:
            table.add_row(*row)
        out.append(table)
    return out
