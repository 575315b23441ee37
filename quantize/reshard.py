"""`lowvram reshard Q --tp N`: re-split a quantized folder for another tensor-parallel size, no re-calibration.

Each layer's rank files are read (sha256-verified), merged exactly and split again; the new files have other
names (`block_LLL.tpRofN.safetensors`), the manifest is replaced atomically, and only then are the old files
removed — an interrupted reshard leaves the folder as it was (run it again). Splits and merges are exact
concatenations, so resharding back to the original size reproduces the original bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lowvram.errors import InputError
from lowvram.manifest import FORMAT_NAME, MANIFEST, verify_folder
from lowvram.model.config import DiTConfig
from lowvram.outputs import hold_lock, lock_path_for

from .io import TMP_MARK, atomic_write_json, write_safetensors
from lowvram.manifest import NONBLOCK, block_file

from .layout import check_tp, split_state
from .loader import layer_state


def reshard(folder: str | Path, tp: int, out: str | Path | None = None, progress: bool = False) -> dict:
    """Re-split `folder` for `tp` ranks, in place or into `out`; returns the new manifest."""
    dest = Path(out) if out is not None else Path(folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(lock_path_for(dest), f"--out {dest}" if out is not None else str(dest)):
        return _reshard_locked(Path(folder), tp, dest)


def _reshard_locked(folder: Path, tp: int, dest: Path) -> dict:
    manifest = verify_folder(folder)
    cfg = DiTConfig.from_dict(manifest["config"])
    old = int(manifest.get("tp", {}).get("size", 1))
    check_tp(cfg, manifest["recipe"], tp)
    if dest != folder:
        if dest.exists() and any(dest.iterdir()):
            raise InputError(f"--out {dest}: not empty; choose an empty or new folder")
        dest.mkdir(parents=True, exist_ok=True)
    elif tp == old:
        return manifest
    for p in dest.iterdir():
        if TMP_MARK in p.name:
            p.unlink()
    files = {}
    for layer in range(cfg.num_layers):
        state = layer_state(folder, layer, manifest)
        for rank, part in enumerate(split_state(state, tp)):
            name = block_file(layer, rank, tp)
            sha, size = write_safetensors(dest / name, part, {"format": FORMAT_NAME, "layer": str(layer),
                                                               "tp": f"{rank}/{tp}"})
            files[name] = {"sha256": sha, "bytes": size, "kind": "block", "layer": layer, "tp_rank": rank}
    nb = manifest["files"][NONBLOCK]
    if dest != folder:
        shutil.copyfile(folder / NONBLOCK, dest / NONBLOCK)
        for extra in ("quant_report.json", "quant_report.md"):
            if (folder / extra).exists():
                shutil.copyfile(folder / extra, dest / extra)
    files[NONBLOCK] = nb
    new = dict(manifest)
    new["tp"] = {**manifest.get("tp", {}), "size": tp}
    new["files"] = dict(sorted(files.items()))
    atomic_write_json(dest / MANIFEST, new)
    if dest == folder:
        for name in manifest["files"]:
            if name not in files:
                (folder / name).unlink(missing_ok=True)
    return new
