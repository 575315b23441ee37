"""`lowvram quantize`: calibrate, choose the per-layer recipe, write the folder — resumably.

Phases (journal: OUT/progress.json, scratch: OUT/.work/):
  A  calibration — the block-streaming sampler trajectory over all calibration samples (calibrate.py); the
     last pass analyses each layer as soon as its statistics are complete (SmoothQuant alpha, static fp8
     scales, per-Linear error). Results go to .work/calib.{json,safetensors}; a killed run redoes A.
  -  recipe — the format per Linear, mixed precision (--keep-bf16) from the measured errors.
  B  one file per transformer layer (per TP rank), each written to a temp name and renamed, then journaled;
     a resumed run skips the layers whose files are journaled and still hash to the journaled sha256.
  C  nonblock.safetensors.
  D  end-to-end error vs bf16 on the held-out samples (the same trajectory, quantized layers read back from
     the files just written).
  -  quant_report.json/.md, then manifest.json last (its presence marks a finished folder), then the journal
     and scratch are removed.
Everything is seeded and written deterministically (sorted keys, fixed metadata), so a resumed run's files
are byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowvram.calibration.clips import MAKE_HINT
from lowvram.calibration.samples import CalibSample, check_samples, load_calibration, samples_digest
from lowvram.errors import CheckpointError, DoesNotFitError, InputError
from lowvram.identify import build_meta_model, check_keys, identify, read_config_json
from lowvram.index import LORA_NAME, checkpoint_index
from lowvram.kernels import linear as K
from lowvram.lora import read_lora
from lowvram.headers import file_sha256
from lowvram.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, NONBLOCK, block_file, verify_folder
from lowvram.model.config import DiTConfig
from lowvram.outputs import hold_lock, lock_path_for
from lowvram.plan import available_ram
from lowvram.quantized import read_safetensors

from .calibrate import CheckpointSource, Observer, host_state_estimate, run_trajectory
from .formats import DEFAULT_ALPHAS, QUANT_FORMATS, LinearPlan, analyze_linear, build_module, choose_keep_bf16, rel_err
from .io import TMP_MARK, atomic_write_json, atomic_write_text, header_fingerprint, write_safetensors
from .layout import check_tp, input_group, split_state
from .loader import QuantizedSource
from .stats import Recorder, quantizable_linears

PROGRESS = "progress.json"
WORK = ".work"
REPORT_JSON = "quant_report.json"
REPORT_MD = "quant_report.md"
GPU_CAP_ENV = "LOWVRAM_GPU_CAP_GIB"  # emulate a smaller card while quantizing (run: --gpus 1x24 does that)
# test hook, "LAYER" or "LAYER:SIGNAL": after this layer's files are written, hard exit 75 or send SIGNAL to itself
EXIT_AFTER_ENV = "LOWVRAM_QUANTIZE_EXIT_AFTER_BLOCK"


@dataclass
class QuantizeOptions:
    ckpt: Path
    out: Path
    calib: Path | None = None
    lora: Path | None = None
    no_lora: bool = False
    lora_alpha: float | None = None
    fmt: str = "fp8"
    act: str = "dynamic"
    keep_bf16: str = "none"
    bf16_budget_mb: float | None = None
    tp: int = 1
    rows: int = 512
    holdout: int | None = None
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    smoothquant: bool = True
    seed: int = 0
    device: str = "auto"
    force: bool = False
    evaluate: bool = True
    calib_size: str = "704*384"
    calib_blocks: int = 2
    t5: Path | None = None
    wav2vec: Path | None = None
    vae: Path | None = None
    progress: bool = True
    kv_scratch: Path | None = None  # disk-backed calibration KV caches (memory-mapped) when RAM is short
    samples: list[CalibSample] | None = field(default=None, repr=False)  # in-process calibration samples


def _device(name: str) -> torch.device:
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(f"--device {name}: use auto, cuda, cuda:N or cpu") from None
    _apply_gpu_cap(device)
    return device


def _apply_gpu_cap(device: torch.device) -> None:
    """Under LOWVRAM_GPU_CAP_GIB, calibrate as on a card of that size (the allocator refuses past it)."""
    from lowvram.parallel.launch import cap_memory

    value = os.environ.get(GPU_CAP_ENV)
    if not value or device.type != "cuda":
        return
    try:
        cap = int(float(value) * 1024**3)
    except ValueError:
        raise InputError(f"{GPU_CAP_ENV}={value!r}: give the card's memory in GiB, e.g. 24") from None
    cap_memory(torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device()), cap)


class _Bar:
    """A rich progress bar with ETA on a terminal; one line per phase otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.console = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    def log(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def phase(self, description: str, total: int):
        import contextlib

        if self.console is None or not self.console.is_terminal:
            self.log(description)
            return contextlib.nullcontext(lambda *a, **k: None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        @contextlib.contextmanager
        def bar():
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False) as p:
                task = p.add_task(description, total=total)

                def advance(detail: str | None = None, n: int = 1):
                    p.update(task, advance=n, description=f"{description} {detail}" if detail else description)

                yield advance

        return bar()


class _CalibObserver(Observer):
    def __init__(self, recorder: Recorder, opts: QuantizeOptions, plans: dict[str, LinearPlan]):
        self.recorder, self.opts, self.plans = recorder, opts, plans
        self.advance = lambda *a, **k: None

    def layer_loaded(self, layer, module):
        self.recorder.attach(module)

    def context(self, step, role):
        return self.recorder.context(step, role)

    def layer_done(self, layer, module, final):
        self.recorder.detach()
        self.advance(f"layer {layer}")
        if not final:
            return
        groups = set()
        for name, lin in quantizable_linears(module):
            group = self.recorder.groups[input_group(name)]
            self.plans[name] = analyze_linear(name, lin, group, self.opts.fmt, self.opts.act, self.opts.alphas,
                                              self.opts.smoothquant)
            groups.add(group)
        for g in groups:
            g.free_rows()


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


# ----------------------------------------------------------------------------------------------------------
# Main entry


def _resolve_lora(opts: QuantizeOptions) -> Path | None:
    if opts.no_lora:
        return None
    if opts.lora is not None:
        return Path(opts.lora)
    default = Path(opts.ckpt) / LORA_NAME if Path(opts.ckpt).is_dir() else None
    if default is not None and default.is_file():
        return default
    raise InputError(f"no LoRA given and no {LORA_NAME} in {opts.ckpt}: pass --lora liveavatar.safetensors "
                     f"(or --no-lora to quantize the base model)")


def quantize_checkpoint(opts: QuantizeOptions, encoders=None) -> dict:
    """Run (or resume) a quantization into `opts.out`; returns the report dict. See the module docstring.

    One process at a time per folder: `OUT.lock` beside it is held for the whole run."""
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(lock_path_for(out), f"--out {out}"):
        return _quantize_locked(opts, encoders)


def _quantize_locked(opts: QuantizeOptions, encoders) -> dict:
    t_start = time.perf_counter()
    bar = _Bar(opts.progress)
    if opts.fmt not in QUANT_FORMATS:
        raise InputError(f"--format {opts.fmt!r}: choose one of {', '.join(QUANT_FORMATS)}")
    if opts.act not in ("dynamic", "static"):
        raise InputError(f"--act {opts.act!r}: choose dynamic or static")
    if opts.act == "static" and opts.fmt != "fp8":
        raise InputError("--act static applies to --format fp8 only (int8 uses per-token scales, int4 keeps bf16 "
                         "activations)")
    if opts.calib is None and opts.samples is None:
        raise InputError(f"no calibration set (--calib): {MAKE_HINT}, then pass --calib CLIPS_DIR")
    if opts.rows < 16:
        raise InputError(f"--rows {opts.rows}: at least 16 rows per layer are needed")
    device = _device(opts.device)

    # --- inputs: checkpoint, LoRA, calibration set -------------------------------------------------------
    ckpt = Path(opts.ckpt)
    index = checkpoint_index(ckpt)
    cfg = identify(index, read_config_json(index))
    keys = check_keys(index, cfg)
    if not keys.complete:
        first = keys.missing[0] if keys.missing else keys.mismatched[0][0]
        raise CheckpointError(f"{ckpt}: incomplete checkpoint ({len(keys.missing)} missing, {len(keys.mismatched)} "
                              f"wrong-shape tensors, first {first!r}); re-download it")
    lora_path = _resolve_lora(opts)
    lora = read_lora(lora_path, cfg, alpha=opts.lora_alpha) if lora_path is not None else None
    ckpt_fp = header_fingerprint({e.file for e in index.values()})
    lora_fp = header_fingerprint([lora.path]) if lora is not None else None

    if opts.samples is not None:
        samples = list(opts.samples)
        check_samples(samples, cfg, "calibration samples")
        calib_info = {"kind": "in-process", "samples": len(samples)}
        calib_digest = samples_digest(samples)
    else:
        def make_encoders():
            if encoders is not None:
                return encoders
            from lowvram.calibration.samples import RealEncoders

            return RealEncoders.from_checkpoint_dir(ckpt if ckpt.is_dir() else ckpt.parent, opts.t5, opts.wav2vec,
                                                    opts.vae, device)

        cs = load_calibration(opts.calib, cfg, make_encoders, size=opts.calib_size, blocks=opts.calib_blocks,
                              seed=opts.seed)
        samples, calib_digest, calib_info = cs.samples, cs.digest, cs.source
    n = len(samples)
    holdout = opts.holdout if opts.holdout is not None else (1 if n >= 2 else 0)
    if not 0 <= holdout < n:
        raise InputError(f"--holdout {holdout}: must leave at least one of the {n} samples for calibration")
    roles = ["train"] * (n - holdout) + ["heldout"] * holdout
    eval_ids = [i for i, r in enumerate(roles) if r == "heldout"] or list(range(n))

    need = host_state_estimate(cfg, samples)
    avail = available_ram()
    if opts.kv_scratch is None and avail is not None and need > 0.8 * avail:
        h, w = samples[0].latent_hw
        raise DoesNotFitError(f"calibration keeps the KV caches of {n} samples x {max(len(s.blocks) for s in samples)} "
                              f"blocks at latent {h}x{w}: {need / 1e9:.1f} GB of host RAM, {avail / 1e9:.1f} GB "
                              f"available; pass --kv-scratch DIR (disk), fewer clips, --calib-blocks 1 or a smaller "
                              f"--calib-size")
    meta = build_meta_model(cfg)
    base_recipe = K.default_recipe(meta, opts.fmt)
    check_tp(cfg, base_recipe, opts.tp)
    run_key = _run_key(opts, calib_digest, ckpt_fp, lora_fp, lora.alpha if lora else None)

    # --- the out folder: fresh, resume, finished, or someone else's ----------------------------------------
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; choose a folder")
    out.mkdir(parents=True, exist_ok=True)
    if opts.force:
        _clean(out, everything=True)
    existing = _load_json(out / MANIFEST) if (out / MANIFEST).exists() else None
    journal = _load_json(out / PROGRESS) if (out / PROGRESS).exists() else None
    if existing is not None:
        if existing.get("run_key") == run_key:
            verify_folder(out)
            bar.log(f"{out}: already quantized with these settings (files verified)")
            return _load_json(out / REPORT_JSON) or {}
        raise InputError(f"{out}: holds a finished quantization with other settings or inputs; pass --force to "
                         f"overwrite it, or choose another --out")
    if journal is not None and journal.get("run_key") != run_key:
        raise InputError(f"{out}: holds an unfinished quantization with other settings or inputs; re-run that "
                         f"command to resume it, pass --force to restart, or choose another --out")
    foreign = [p.name for p in out.iterdir() if not _ours(p.name)]
    if journal is None and foreign:
        raise InputError(f"--out {out}: not empty and not a quantized folder ({foreign[0]!r}...); choose an empty "
                         f"or new folder")
    _clean(out, everything=False)
    resumed = journal is not None
    journal = journal or {"kind": "lowvram-quantize-progress", "run_key": run_key, "files": {}, "layers": []}
    _journal(out, journal)

    # --- A: calibration -------------------------------------------------------------------------------------
    work = out / WORK
    loaded = _load_calibration(work, journal["calibrated"]) if journal.get("calibrated") else None
    if loaded is not None:
        plans, refs, calib_run = loaded
        bar.log("calibration: reusing the finished calibration of the interrupted run")
    else:
        recorder = Recorder(cfg, rows=opts.rows, seed=opts.seed)
        plans: dict[str, LinearPlan] = {}
        observer = _CalibObserver(recorder, opts, plans)
        source = CheckpointSource(index, cfg, lora, device)
        passes = max(len(s.blocks) for s in samples) * cfg.num_steps
        with bar.phase(f"calibrating {n - holdout}+{holdout} samples", passes * cfg.num_layers) as advance:
            observer.advance = advance
            traj = run_trajectory(source, samples, roles, observer=observer, kv_scratch=opts.kv_scratch)
        refs = {i: (traj.velocities[i], traj.finals[i]) for i in eval_ids}
        calib_run = {"passes": traj.passes, "layer_loads": traj.layer_loads, "bytes_read": traj.bytes_read,
                     "seconds": round(traj.seconds, 3), "load_seconds": round(traj.load_seconds, 3),
                     "analysis_seconds": round(traj.analysis_seconds, 3), "host_state_bytes": traj.host_state_bytes,
                     "stats_peak_bytes": recorder.nbytes, "peak_rss_bytes": traj.peak_rss_bytes,
                     "peak_vram_bytes": traj.peak_vram_bytes, "device": str(device),
                     "kv_on_disk": opts.kv_scratch is not None, "samples": n, "heldout": holdout}
        missing = [name for name, fmt in base_recipe.items() if fmt != "bf16" and name not in plans]
        if missing:
            raise RuntimeError(f"calibration produced no plan for {missing[0]}")
        journal["calibrated"] = _save_calibration(work, plans, refs, calib_run)
        _journal(out, journal)

    # --- recipe ---------------------------------------------------------------------------------------------
    budget = None if opts.bf16_budget_mb is None else int(opts.bf16_budget_mb * 1e6)
    keep, keep_info = choose_keep_bf16(plans, opts.keep_bf16, budget)
    recipe = dict(base_recipe)
    for name, p in plans.items():
        recipe[name] = "bf16" if (name in keep or p.fmt == "bf16") else p.fmt
    check_tp(cfg, recipe, opts.tp)
    final_plans = {}
    for name, p in plans.items():
        q = LinearPlan(**{**p.__dict__})
        if recipe[name] == "bf16":
            q.fmt, q.smooth, q.act_scales, q.alpha = "bf16", None, None, None
        final_plans[name] = q

    # --- B/C: layer files, nonblock ------------------------------------------------------------------------
    source = CheckpointSource(index, cfg, lora, device)
    exit_after = os.environ.get(EXIT_AFTER_ENV)
    todo = [l for l in range(cfg.num_layers) if not _layer_done(out, journal, l, opts.tp)]
    if resumed and len(todo) < cfg.num_layers:
        bar.log(f"resuming: {cfg.num_layers - len(todo)} of {cfg.num_layers} layer files already written")
    with bar.phase(f"writing {opts.fmt} layers", len(todo)) as advance:
        for layer in todo:
            lm = source.layer(layer)
            state = _quantized_state(lm, final_plans)
            source.release(layer, lm)
            del lm
            names = []
            for rank, part in enumerate(split_state(state, opts.tp)):
                name = block_file(layer, rank, opts.tp)
                sha, size = write_safetensors(out / name, part, {"format": FORMAT_NAME, "layer": str(layer),
                                                                  "tp": f"{rank}/{opts.tp}"})
                journal["files"][name] = {"sha256": sha, "bytes": size, "kind": "block", "layer": layer,
                                          "tp_rank": rank}
                names.append(name)
            journal["layers"] = sorted(set(journal["layers"]) | {layer})
            _journal(out, journal)
            advance(f"{layer}")
            if exit_after is not None and int(exit_after.split(":")[0]) == layer:
                _test_exit(exit_after)
    if not _file_ok(out, journal, NONBLOCK):
        nb = source.nonblock()
        state = {k: v.detach().cpu() for k, v in nb.state_dict().items()}
        sha, size = write_safetensors(out / NONBLOCK, state, {"format": FORMAT_NAME, "layer": "nonblock",
                                                              "tp": f"0/{opts.tp}"})
        journal["files"][NONBLOCK] = {"sha256": sha, "bytes": size, "kind": "nonblock"}
        _journal(out, journal)
        del nb

    manifest = _manifest(opts, cfg, recipe, final_plans, keep, keep_info, journal, run_key, ckpt, ckpt_fp, lora,
                         lora_fp, calib_digest, calib_info, n, holdout)

    # --- D: end-to-end error vs bf16 ----------------------------------------------------------------------
    e2e = None
    if opts.evaluate:
        qsrc = QuantizedSource(out, manifest, device)
        eval_samples = [samples[i] for i in eval_ids]
        passes = max(len(s.blocks) for s in eval_samples) * cfg.num_steps
        with bar.phase("end-to-end check vs bf16", passes * cfg.num_layers) as advance:
            class _Adv(Observer):
                def layer_done(self, layer, module, final):
                    advance(f"layer {layer}")

            qt = run_trajectory(qsrc, eval_samples, ["heldout"] * len(eval_samples), observer=_Adv(),
                                static_steps=True, kv_scratch=opts.kv_scratch)
        e2e = _end_to_end(cfg, eval_ids, refs, qt, holdout > 0)

    report = _report(opts, cfg, manifest, final_plans, keep_info, calib_run, e2e, index, source.bytes_read,
                     time.perf_counter() - t_start, resumed)
    atomic_write_json(out / REPORT_JSON, report)
    atomic_write_text(out / REPORT_MD, _report_md(report))
    atomic_write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    bar.log(f"wrote {out} ({sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB); report: "
            f"{out / REPORT_MD}")
    return report


def _test_exit(hook: str) -> None:
    sig = hook.partition(":")[2]
    if not sig:
        os._exit(75)
    os.kill(os.getpid(), int(sig))
    time.sleep(1.0)  # a Python-level handler (SIGINT's) runs here


def _file_ok(out: Path, journal: dict, name: str) -> bool:
    entry = journal["files"].get(name)
    return entry is not None and (out / name).is_file() and file_sha256(out / name) == entry["sha256"]


def _layer_done(out: Path, journal: dict, layer: int, tp: int) -> bool:
    return layer in journal.get("layers", []) and all(_file_ok(out, journal, block_file(layer, r, tp))
                                                      for r in range(tp))


def _quantized_state(module, plans: dict[str, LinearPlan]) -> dict[str, torch.Tensor]:
    """A layer module (bf16, LoRA merged) -> its tensors in the recipe's formats (CPU)."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    for name, lin in quantizable_linears(module):
        plan = plans[name]
        if plan.fmt == "bf16":
            continue
        for k in [k for k in state if k.startswith(name + ".")]:
            del state[k]
        q = build_module(lin, plan)
        for k, v in q.state_dict().items():
            state[f"{name}.{k}"] = v.detach()
    return {k: v.cpu().contiguous() for k, v in state.items()}


def _manifest(opts, cfg: DiTConfig, recipe, plans, keep, keep_info, journal, run_key, ckpt, ckpt_fp, lora,
              lora_fp, calib_digest, calib_info, n, holdout) -> dict:
    layers = {}
    for name, fmt in sorted(recipe.items()):
        p = plans.get(name)
        d = {"format": fmt}
        if p is not None:
            d.update({"act": opts.act if fmt == "fp8" else ("bf16" if fmt in ("bf16", "int4") else "per-token"),
                      "alpha": p.alpha if fmt == "int8" else None, "err": p.err if fmt != "bf16" else 0.0,
                      "kept_bf16": name in keep})
        layers[name] = d
    files = {k: v for k, v in sorted(journal["files"].items())
             if k == NONBLOCK or (v.get("kind") == "block" and k == block_file(v["layer"], v["tp_rank"], opts.tp))}
    return {
        "kind": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "format": opts.fmt,
        "act": opts.act,
        "config": cfg.to_dict(),
        "recipe": dict(sorted(recipe.items())),
        "layers": layers,
        "keep_bf16": {"mode": opts.keep_bf16, "layers": keep, **{k: v for k, v in keep_info.items() if k != "mode"}},
        "int4_group": K.INT4_GROUP,
        "act_steps": [f"step{i}" for i in range(cfg.num_steps)] + ["prefill"],
        "tp": {"size": opts.tp, "column": "attention q/k/v, ffn.0 (output rows)",
               "row": "attention o, ffn.2 (input columns; bias on rank 0)", "norm": "q/k RMSNorm (like q/k)"},
        "source": {
            "path": str(Path(ckpt).resolve()),
            "checkpoint_sha256": ckpt_fp["sha256"], "checkpoint_files": ckpt_fp["files"],
            "lora": None if lora is None else {"path": str(Path(lora.path).resolve()), "sha256": lora_fp["sha256"],
                                               "rank": lora.rank, "alpha": lora.alpha, "targets": len(lora.targets),
                                               "merged": "W = bf16(fp32(W) + (B @ A) * alpha / rank)"},
        },
        "calibration": {"digest": calib_digest, "samples": n, "heldout": holdout, "rows_per_layer": opts.rows,
                        "seed": opts.seed, "alphas": list(opts.alphas), "source": calib_info},
        "run_key": run_key,
        "files": files,
    }


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
