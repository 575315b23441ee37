"""What `lowvram bench` runs: its options, the configurations (``DIR`` or ``DIR::OPTIONS``) and the clip set.

A configuration is ``DIR`` or ``DIR::OPTIONS``: a folder ``lowvram run`` accepts (a bf16 checkpoint or a folder
written by ``lowvram quantize``) and, after ``::``, run options for it (``--kv fp8``, ``--tp 2``, ``--pp 2``,
``--gpus 2x24``, ``--lora FILE``, ``--no-lora``, ``--ckpt-dir DIR``, ``--t5-device cuda``) plus ``--label NAME``.
The same folder with different options is a separate configuration.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lowvram.headers import file_sha256
from lowvram.identify import CONFIG_NAME
from lowvram.index import LORA_NAME
from lowvram.manifest import MANIFEST, read_manifest
from lowvram.model.config import UPSTREAM_SEED
from lowvram.errors import InputError

RUN_OPTION_KEYS = {"kv": str, "tp": int, "pp": int, "gpus": str, "lora": str, "ckpt-dir": str, "t5-device": str,
                   "label": str}
FLAGS = {"no-lora"}
SPEC_HELP = ("DIR or DIR::OPTIONS, OPTIONS being run options for that folder: --kv fp8, --tp N, --pp N, --gpus 2x24, "
             "--lora FILE, --no-lora, --ckpt-dir DIR, --t5-device cuda, and --label NAME")


@dataclass
class BenchOptions:
    baseline: str
    candidates: list[str]
    clips: Path
    out: Path
    device: str = "auto"
    size: str = "704*384"
    seconds: float | None = 5.0
    seed: int = UPSTREAM_SEED
    rerun: bool = False
    fid: str = "auto"  # auto (when the weights are here), on (error without them), off
    sync: str = "auto"  # the same, for SyncNet's Sync-C / Sync-D
    fid_weights: Path | None = None
    syncnet_weights: Path | None = None
    metrics_device: str | None = None  # where Inception / SyncNet run; default: cuda when the runs use a GPU
    strip_points: int = 3
    progress: bool = True
    notes: list[str] = field(default_factory=list)


def say(opts: BenchOptions, msg: str) -> None:
    if opts.progress:
        print(msg, flush=True)


@dataclass
class Config:
    label: str
    role: str  # "baseline" or "candidate"
    spec: str
    model_dir: str
    quantized: bool
    fmt: str
    kv: str = "bf16"
    tp: int | None = None
    pp: int | None = None
    gpus: str | None = None
    lora: str | None = None
    lora_auto: bool = False
    ckpt_dir: str | None = None
    t5_device: str | None = None

    def options_text(self) -> str:
        parts = []
        if self.kv != "bf16":
            parts.append(f"kv={self.kv}")
        for key in ("tp", "pp", "gpus", "ckpt_dir", "t5_device"):
            if getattr(self, key) is not None:
                parts.append(f"{key}={getattr(self, key)}")
        if self.lora and not self.lora_auto:
            parts.append(f"lora={Path(self.lora).name}")
        return " ".join(parts) or "-"


def _parse_options(spec: str, text: str) -> dict:
    try:
        tokens = shlex.split(text.replace(",", " "))
    except ValueError as err:
        raise InputError(f"{spec!r}: cannot split the options ({err}); {SPEC_HELP}") from None
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise InputError(f"{spec!r}: {tok!r} is not an option; {SPEC_HELP}")
        key, eq, value = tok[2:].partition("=")
        if key in FLAGS and not eq:
            out[key] = True
            i += 1
            continue
        if key not in RUN_OPTION_KEYS:
            raise InputError(f"{spec!r}: unknown option --{key}; {SPEC_HELP}")
        if not eq:
            if i + 1 >= len(tokens):
                raise InputError(f"{spec!r}: --{key} needs a value; {SPEC_HELP}")
            value, i = tokens[i + 1], i + 1
        try:
            out[key] = RUN_OPTION_KEYS[key](value)
        except ValueError:
            raise InputError(f"{spec!r}: --{key} {value!r} is not a valid value") from None
        i += 1
    return out


def parse_config(spec: str, role: str) -> Config:
    """``DIR`` or ``DIR::OPTIONS`` -> Config (the folder must be one `lowvram run` accepts)."""
    folder, _, opt_text = spec.partition("::")
    folder = folder.strip()
    if not folder:
        raise InputError(f"{spec!r}: no folder; {SPEC_HELP}")
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise InputError(f"{d}: no such folder (from {spec!r}); pass a bf16 checkpoint folder or a folder written "
                         f"by `lowvram quantize`")
    opts = _parse_options(spec, opt_text) if opt_text.strip() else {}
    if (d / MANIFEST).is_file():
        fmt, quantized = read_manifest(d)["format"], True
    elif (d / CONFIG_NAME).is_file():
        fmt, quantized = "bf16", False
    else:
        raise InputError(f"{d}: neither a quantized folder (manifest.json) nor a checkpoint (config.json)")
    kv = opts.get("kv", "bf16")
    if kv not in ("bf16", "fp8"):
        raise InputError(f"{spec!r}: --kv {kv!r}: use bf16 or fp8")
    lora, lora_auto = opts.get("lora"), False
    if lora and quantized:
        raise InputError(f"{spec!r}: --lora applies to a bf16 checkpoint; a quantized folder has it merged")
    if lora and not Path(lora).is_file():
        raise InputError(f"{lora}: LoRA file not found (from {spec!r})")
    if not quantized and not lora and not opts.get("no-lora") and (d / LORA_NAME).is_file():
        lora, lora_auto = str((d / LORA_NAME).resolve()), True
    for key in ("tp", "pp"):
        if key in opts and opts[key] < 1:
            raise InputError(f"{spec!r}: --{key} must be at least 1")
    label = opts.get("label") or ("baseline" if role == "baseline" else _default_label(d, fmt, opts))
    return Config(label=label, role=role, spec=spec, model_dir=str(d.resolve()), quantized=quantized, fmt=fmt, kv=kv,
                  tp=opts.get("tp"), pp=opts.get("pp"), gpus=opts.get("gpus"), lora=str(Path(lora).resolve())
                  if lora else None, lora_auto=lora_auto, ckpt_dir=opts.get("ckpt-dir"), t5_device=opts.get("t5-device"))


def _default_label(d: Path, fmt: str, opts: dict) -> str:
    base = fmt if fmt != "bf16" else d.name
    extra = [f"{k}={v}" for k, v in opts.items() if k not in ("label",) and v is not True] + \
            [k for k, v in opts.items() if v is True]
    return " ".join([base] + extra)


def unique_labels(configs: list[Config]) -> None:
    seen: dict[str, int] = {}
    for c in configs:
        if c.label in seen:
            seen[c.label] += 1
            c.label = f"{c.label} #{seen[c.label]}"
        else:
            seen[c.label] = 1


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return s or "x"


@dataclass
class BenchClip:
    name: str
    image: str
    audio: str  # the file the run gets (a cut segment when the clip names one)
    prompt: str
    digest: str


def load_clips(folder: Path, out: Path) -> list[BenchClip]:
    """The clip set (clips.json, as `lowvram calib make` writes it); segments are cut to REPORT/inputs/."""
    from lowvram.calibration.clips import load_clip_set

    cs = load_clip_set(folder, check_media=True)
    clips, names = [], set()
    for c in cs.clips:
        name = slug(c.name)
        while name in names:
            name += "_"
        names.add(name)
        audio = Path(c.audio)
        if c.start_s or c.duration_s is not None:
            from lowvram.conditioning.audio import SAMPLE_RATE, decode_audio
            from lowvram.media import write_wav

            rate = SAMPLE_RATE
            wav = decode_audio(audio, rate)
            a = int(round(c.start_s * rate))
            b = len(wav) if c.duration_s is None else a + int(round(c.duration_s * rate))
            audio = out / "inputs" / f"{name}.wav"
            write_wav(audio, wav[a:b], rate)
        digest = hashlib.sha256(json.dumps([file_sha256(Path(c.image)), file_sha256(audio), c.prompt]).encode())
        clips.append(BenchClip(name, str(Path(c.image).resolve()), str(audio.resolve()), c.prompt,
                               digest.hexdigest()))
    return clips

