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

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowvram.calibration.clips import MAKE_HINT
from lowvram.calibration.samples import check_samples, load_calibration, samples_digest
from lowvram.errors import CheckpointError, DoesNotFitError, InputError
from lowvram.identify import build_meta_model, check_keys, identify, read_config_json
from lowvram.index import LORA_NAME, checkpoint_index
from lowvram.kernels import linear as K
from lowvram.lora import read_lora
from lowvram.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, NONBLOCK, block_file, verify_folder
from lowvram.model.config import DiTConfig
from lowvram.model.sampler import StreamInputs
from lowvram.outputs import hold_lock, lock_path_for
from lowvram.plan import available_ram

from .calibrate import CheckpointSource, Observer, host_state_estimate, run_trajectory
from .formats import DEFAULT_ALPHAS, QUANT_FORMATS, LinearPlan, analyze_linear, build_module, choose_keep_bf16
from .io import atomic_write_json, atomic_write_text, header_fingerprint, write_safetensors
from .journal import (PROGRESS, REPORT_JSON, REPORT_MD, WORK, _clean, _file_ok, _journal, _layer_done,
                      _load_calibration, _load_json, _ours, _run_key, _save_calibration)
from .layout import check_tp, input_group, split_state
from .report import _end_to_end, _report, _report_md
from .loader import QuantizedSource
from .stats import Recorder, quantizable_linears

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
    samples: list[StreamInputs] | None = field(default=None, repr=False)  # in-process calibration samples


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
