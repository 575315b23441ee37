"""Calibration clip sets: a folder with `clips.json` and the user's own reference images and speech files.

    CLIPS_DIR/
      clips.json          {"format": "lowvram-clips", "version": 1, "clips": [
                             {"name": "a", "image": "a.jpg", "audio": "a.wav", "prompt": "...",
                              "start_s": 0.0, "duration_s": 6.0}, ...]}
      a.jpg, a.wav, ...   paths in clips.json are relative to the folder (absolute paths work too)

`start_s` / `duration_s` are optional: they cut one segment out of a longer speech file, so one long
recording can feed several clips without re-encoding it. The shared test set's `clips.json` (entries with
name/image/audio/prompt and an `about` line) is read as is.

The project ships no faces or voices: `make_clip_set` (`lowvram calib make`) builds a set from the user's files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lowvram.headers import file_sha256
from lowvram.errors import InputError

MANIFEST = "clips.json"
FORMAT = "lowvram-clips"
VERSION = 1
MIN_CLIP_S = 0.5
MAKE_HINT = ("build a set with `lowvram calib make --image face.jpg --audio speech.wav --prompt \"...\" "
             "--out CLIPS_DIR`")


@dataclass(frozen=True)
class Clip:
    name: str
    image: Path
    audio: Path
    prompt: str
    start_s: float = 0.0
    duration_s: float | None = None  # None: to the end of the file

    def to_json(self, folder: Path) -> dict:
        d = {"name": self.name, "image": _rel(self.image, folder), "audio": _rel(self.audio, folder),
             "prompt": self.prompt}
        if self.start_s:
            d["start_s"] = round(float(self.start_s), 6)
        if self.duration_s is not None:
            d["duration_s"] = round(float(self.duration_s), 6)
        return d


@dataclass
class ClipSet:
    folder: Path
    clips: list[Clip]

    def digest(self) -> str:
        """sha256 over the manifest entries and the bytes of every image and audio file they name."""
        h = hashlib.sha256()
        seen: dict[Path, str] = {}
        for clip in self.clips:
            h.update(json.dumps(clip.to_json(self.folder), sort_keys=True).encode())
            for path in (clip.image, clip.audio):
                if path not in seen:
                    seen[path] = file_sha256(path)
                h.update(seen[path].encode())
        return h.hexdigest()


def _rel(path: Path, folder: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(folder).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _bad(folder: Path, i: int, name: str, what: str) -> InputError:
    return InputError(f"{folder / MANIFEST}: clip {i} ({name!r}): {what}; fix the file or rebuild the set "
                      f"({MAKE_HINT})")


def load_clip_set(folder: str | Path, check_media: bool = True) -> ClipSet:
    """Read and validate a clip set. Every problem is one InputError line naming the clip and the fix.

    With `check_media`, each image is decoded (Pillow) and each audio file decoded (PyAV) once, and each
    segment is checked to lie inside its file.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise InputError(f"{folder}: calibration folder not found; {MAKE_HINT}")
    if not manifest.is_file():
        raise InputError(f"{folder}: no {MANIFEST} (not a calibration clip set); {MAKE_HINT}")
    try:
        data = json.loads(manifest.read_text())
        entries = data["clips"]
        if not isinstance(entries, list):
            raise TypeError("'clips' is not a list")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{manifest}: not a valid clip manifest ({type(err).__name__}: {str(err)[:80]}); "
                         f"{MAKE_HINT}") from None
    if not entries:
        raise InputError(f"{manifest}: lists no clips; {MAKE_HINT}")
    clips, names = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise _bad(folder, i, "?", "entry is not an object")
        name = str(e.get("name") or f"clip{i}")
        for key in ("image", "audio", "prompt"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise _bad(folder, i, name, f"missing '{key}'")
        if name in names:
            raise _bad(folder, i, name, "duplicate name")
        names.add(name)
        image, audio = folder / e["image"], folder / e["audio"]
        for kind, path in (("image", image), ("audio", audio)):
            if not path.is_file():
                raise _bad(folder, i, name, f"{kind} file {path} not found")
            if path.stat().st_size == 0:
                raise _bad(folder, i, name, f"{kind} file {path} is empty")
        try:
            start = float(e.get("start_s", 0.0) or 0.0)
            dur = e.get("duration_s")
            dur = None if dur is None else float(dur)
        except (TypeError, ValueError):
            raise _bad(folder, i, name, "start_s / duration_s must be numbers") from None
        if start < 0 or (dur is not None and dur < MIN_CLIP_S):
            raise _bad(folder, i, name, f"segment start {start} s / duration {dur} s is invalid "
                                        f"(start >= 0, duration >= {MIN_CLIP_S} s)")
        clips.append(Clip(name, image, audio, e["prompt"].strip(), start, dur))
    clip_set = ClipSet(folder, clips)
    if check_media:
        check_clip_media(clip_set)
    return clip_set


def _media_error(path: Path, err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.replace(f"{path}: ", "")[:160]


def audio_duration(path: Path) -> float:
    """Length in seconds of an audio file (decoded once at 16 kHz with the conditioning code)."""
    samples = read_audio(path)  # first: its one-line error when the media extras are missing
    from lowvram.conditioning.audio import SAMPLE_RATE

    return len(samples) / SAMPLE_RATE


def read_audio(path: Path):
    """Mono float32 16 kHz samples (PyAV + soxr, as the audio encoder reads them)."""
    try:
        from lowvram.conditioning.audio import decode_audio
    except ImportError as err:  # pragma: no cover - media extras absent
        raise InputError(f"reading audio needs the media extras ({err.name}); pip install 'lowvram[media]'") from None
    return decode_audio(path)


def read_image(path: Path):
    try:
        from lowvram.conditioning.image import read_image as _read
    except ImportError as err:  # pragma: no cover
        raise InputError(f"reading images needs the media extras ({err.name}); pip install 'lowvram[media]'") from None
    return _read(path)


def check_clip_media(clip_set: ClipSet) -> None:
    """Decode every image and audio file once; check each segment fits its file."""
    durations: dict[Path, float] = {}
    checked: set[Path] = set()
    for i, clip in enumerate(clip_set.clips):
        if clip.image not in checked:
            try:
                read_image(clip.image)
            except InputError as err:
                raise _bad(clip_set.folder, i, clip.name, f"image unreadable: {_media_error(clip.image, err)}") from None
            checked.add(clip.image)
        if clip.audio not in durations:
            try:
                durations[clip.audio] = audio_duration(clip.audio)
            except InputError as err:
                raise _bad(clip_set.folder, i, clip.name, f"audio unreadable: {_media_error(clip.audio, err)}") from None
        total = durations[clip.audio]
        end = clip.start_s + (clip.duration_s if clip.duration_s is not None else 0.0)
        if clip.start_s + MIN_CLIP_S > total or end > total + 1e-3:
            raise _bad(clip_set.folder, i, clip.name, f"segment {clip.start_s:.2f}..{end:.2f} s lies outside the "
                                                      f"{total:.2f} s of {clip.audio.name}")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "clip"


def make_clip_set(out: str | Path, images: list[str | Path], audios: list[str | Path], prompts: list[str],
                  clip_seconds: float | None = None, max_clips: int | None = None, copy: bool = True) -> ClipSet:
    """Build a clip set from the user's files (`lowvram calib make`).

    Several pairs: give as many images as audios (one image or one prompt is reused for every audio). With
    `clip_seconds`, each audio file is split into consecutive segments of that length (one long speech ->
    several clips); `max_clips` caps the count. Files are copied into `out` (`copy=False` references them).
    Everything is validated (decoded) before clips.json is written.
    """
    out = Path(out)
    if not audios:
        raise InputError(f"no --audio given; {MAKE_HINT}")
    n = len(audios)
    if len(images) not in (1, n):
        raise InputError(f"{len(images)} --image for {n} --audio; give one image for all, or one per audio")
    if len(prompts) not in (1, n):
        raise InputError(f"{len(prompts)} --prompt for {n} --audio; give one prompt for all, or one per audio")
    if clip_seconds is not None and clip_seconds < MIN_CLIP_S:
        raise InputError(f"--clip-seconds {clip_seconds}: must be at least {MIN_CLIP_S}")
    images = [Path(p) for p in images] * (n if len(images) == 1 else 1)
    prompts = list(prompts) * (n if len(prompts) == 1 else 1)
    audios = [Path(p) for p in audios]
    if any(not str(p).strip() for p in prompts):
        raise InputError("an empty --prompt; describe the scene in a sentence")
    for p in [*images, *audios]:
        if not p.is_file():
            raise InputError(f"{p}: file not found; pass an existing image / speech file")
    for p in images:
        read_image(p)
    durations = {p: audio_duration(p) for p in audios}
    for p, seconds in durations.items():
        if seconds < MIN_CLIP_S:  # what load_clip_set (and so `lowvram quantize`) refuses
            raise InputError(f"{p}: {seconds:.2f} s of audio, a calibration clip needs at least {MIN_CLIP_S} s; "
                             f"pass a longer speech recording")
    if (out / MANIFEST).exists():
        raise InputError(f"{out / MANIFEST} already exists; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)

    def place(path: Path) -> Path:
        if not copy:
            return path.resolve()
        dest = out / path.name
        if dest.exists() and dest.resolve() != path.resolve() and file_sha256(dest) != file_sha256(path):
            dest = out / f"{path.stem}_{file_sha256(path)[:8]}{path.suffix}"
        if not dest.exists():
            shutil.copyfile(path, dest)
        return dest

    clips: list[Clip] = []
    used: set[str] = set()
    for image, audio, prompt in zip(images, audios, prompts):
        img, aud = place(image), place(audio)
        total = durations[audio]
        if clip_seconds is None:
            segments = [(0.0, None)]
        else:
            count = max(1, int(total // clip_seconds))
            segments = [(k * clip_seconds, clip_seconds) for k in range(count)]
            if total < clip_seconds:
                segments = [(0.0, None)]
        for k, (start, dur) in enumerate(segments):
            base = _safe_name(audio.stem) + (f"_{k:03d}" if len(segments) > 1 else "")
            name, m = base, 1
            while name in used:
                name, m = f"{base}_{m}", m + 1
            used.add(name)
            clips.append(Clip(name, img, aud, prompt.strip(), start, dur))
    if max_clips is not None:
        clips = clips[:max(1, max_clips)]
    manifest = {"format": FORMAT, "version": VERSION, "clips": [c.to_json(out) for c in clips]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ClipSet(out, clips)
