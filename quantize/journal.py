"""The quantizer's out folder between runs: what is ours, the journal that lets a stopped run resume, and the
calibration results kept on disk."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowvram.errors import CheckpointError
from lowvram.headers import file_sha256
from lowvram.manifest import FORMAT_VERSION, MANIFEST, NONBLOCK, block_file
from lowvram.quantized import read_safetensors

from .formats import LinearPlan
from .io import TMP_MARK, atomic_write_json, write_safetensors

if TYPE_CHECKING:
    from .pipeline import QuantizeOptions

PROGRESS = "progress.json"
WORK = ".work"
REPORT_JSON = "quant_report.json"
REPORT_MD = "quant_report.md"

# ----------------------------------------------------------------------------------------------------------
# Out folder bookkeeping


def _ours(name: str) -> bool:
    return (name in (MANIFEST, PROGRESS, REPORT_JSON, REPORT_MD, NONBLOCK, WORK) or TMP_MARK in name
            or (name.startswith("block_") and name.endswith(".safetensors")))


def _clean(out: Path, everything: bool) -> None:
    """Remove temp files (always) or all of our files (`everything`, i.e. --force)."""
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        if TMP_MARK in p.name or (everything and _ours(p.name)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    work = out / WORK
    if work.is_dir():
        for p in work.iterdir():
            if TMP_MARK in p.name:
                p.unlink()


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_key(opts: QuantizeOptions, calib_digest: str, ckpt_fp: dict, lora_fp: dict | None, lora_alpha) -> str:
    settings = {"version": FORMAT_VERSION, "format": opts.fmt, "act": opts.act, "keep_bf16": opts.keep_bf16,
                "bf16_budget_mb": opts.bf16_budget_mb, "tp": opts.tp, "rows": opts.rows, "holdout": opts.holdout,
                "alphas": list(opts.alphas), "smoothquant": opts.smoothquant, "seed": opts.seed,
                "evaluate": opts.evaluate, "calibration": calib_digest, "checkpoint": ckpt_fp["sha256"],
                "lora": lora_fp["sha256"] if lora_fp else None, "lora_alpha": lora_alpha}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _journal(out: Path, journal: dict) -> None:
    atomic_write_json(out / PROGRESS, journal)


# ----------------------------------------------------------------------------------------------------------
# Calibration results on disk (resume)


def _plan_from(name: str, d: dict, tensors: dict) -> LinearPlan:
    p = LinearPlan(name, d["format"], d["in_features"], d["out_features"], act=d.get("act") or "dynamic",
                   alpha=d.get("alpha"), err=d["err"], err_train=d["err_train"], alpha_errs=d.get("alpha_errs", {}),
                   naive_err=d.get("naive_err"), eval_rows=d.get("eval_rows", 0), eval_on=d.get("eval_on", ""),
                   outlier_ratio=d.get("outlier_ratio", 0.0), note=d.get("note", ""))
    p.smooth = tensors.get(f"smooth.{name}")
    p.act_scales = tensors.get(f"act_scales.{name}")
    return p


def _save_calibration(work: Path, plans: dict[str, LinearPlan], refs: dict, info: dict) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in plans.items():
        if p.smooth is not None:
            tensors[f"smooth.{name}"] = p.smooth.float().cpu()
        if p.act_scales is not None:
            tensors[f"act_scales.{name}"] = p.act_scales.float().cpu()
    for i, (vel, fin) in refs.items():
        tensors[f"ref.velocities.{i}"] = torch.stack(vel)
        tensors[f"ref.final.{i}"] = fin
    sha_t, _ = write_safetensors(work / "calib.safetensors", tensors, {"format": "lowvram-calibration"})
    doc = {"plans": {n: p.to_json() for n, p in sorted(plans.items())}, "info": info}
    sha_j, _ = atomic_write_json(work / "calib.json", doc)
    return {"tensors_sha256": sha_t, "json_sha256": sha_j}


def _load_calibration(work: Path, journal_entry: dict):
    try:
        if file_sha256(work / "calib.json") != journal_entry["json_sha256"]:
            return None
        tensors = read_safetensors(work / "calib.safetensors", journal_entry["tensors_sha256"])
        doc = json.loads((work / "calib.json").read_text())
    except (OSError, ValueError, KeyError, CheckpointError):
        return None
    plans = {n: _plan_from(n, d, tensors) for n, d in doc["plans"].items()}
    refs = {}
    for key, t in tensors.items():
        if key.startswith("ref.final."):
            i = int(key.rsplit(".", 1)[1])
            refs[i] = (list(tensors[f"ref.velocities.{i}"].unbind(0)), t)
    return plans, refs, doc["info"]


def _file_ok(out: Path, journal: dict, name: str) -> bool:
    entry = journal["files"].get(name)
    return entry is not None and (out / name).is_file() and file_sha256(out / name) == entry["sha256"]


def _layer_done(out: Path, journal: dict, layer: int, tp: int) -> bool:
    return layer in journal.get("layers", []) and all(_file_ok(out, journal, block_file(layer, r, tp))
                                                      for r in range(tp))
