"""Where a checkpoint's tensors are: the real DiT folder's index and shards, one file, or a single-file folder.

Layout of the real DiT folder (Wan2.2-S2V-14B): `config.json`, `diffusion_pytorch_model.safetensors.index.json`
and `diffusion_pytorch_model-0000X-of-00004.safetensors`; tensor names are `LiveAvatarDiT`'s state-dict keys.
A single `diffusion_pytorch_model.safetensors` (or any one `.safetensors` file) works too. Pickle files are refused
unless `allow_pickle=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowvram.errors import CheckpointError
from lowvram.headers import TensorEntry, file_index, redownload
from lowvram.pth import is_pickle, short_error

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
LORA_NAME = "liveavatar.safetensors"


def checkpoint_index(ckpt: str | Path, allow_pickle: bool = False) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint -> TensorEntry(file, shape, dtype, offsets), from headers only.

    `ckpt` is a folder (sharded with `*.safetensors.index.json`, or one `diffusion_pytorch_model.safetensors`,
    or exactly one `.safetensors` file), an index json, or a single file. Missing shards, truncated shards and
    corrupt headers raise a CheckpointError naming the file and the fix.
    """
    path = Path(ckpt)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _sharded_index(path, allow_pickle)
        if path.suffix == ".safetensors" or is_pickle(path):
            return file_index(path, allow_pickle)
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors or a .safetensors.index.json)")
    if (path / INDEX_NAME).is_file():
        return _sharded_index(path / INDEX_NAME, allow_pickle)
    if (path / SINGLE_NAME).is_file():
        return file_index(path / SINGLE_NAME, allow_pickle)
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _sharded_index(indexes[0], allow_pickle)
    files = sorted(p for p in path.glob("*.safetensors") if p.name != LORA_NAME)
    if len(files) == 1 and not indexes:
        return file_index(files[0], allow_pickle)
    if len(indexes) > 1 or len(files) > 1:
        what = indexes if len(indexes) > 1 else files
        raise CheckpointError(f"{path}: {len(what)} candidate files ({', '.join(p.name for p in what[:3])}…) and no "
                              f"{INDEX_NAME}; re-download the index or pass the file to use")
    pickles = sorted(p for p in path.iterdir() if p.is_file() and is_pickle(p))
    if len(pickles) == 1:
        return file_index(pickles[0], allow_pickle)
    raise CheckpointError(f"{path}: no checkpoint found (expected {INDEX_NAME} with its shards, or {SINGLE_NAME})")


def _sharded_index(index_path: Path, allow_pickle: bool) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: corrupt index ({short_error(err)}); {redownload(index_path)}") from None
    folder = index_path.parent
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(str(shard), []).append(key)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder / missing[0]}: shard missing{more}, named by {index_path.name}; "
                              f"re-download {missing[0]}")
    index: dict[str, TensorEntry] = {}
    for shard, keys in shards.items():
        found = file_index(folder / shard, allow_pickle)
        absent = [k for k in keys if k not in found]
        if absent:
            raise CheckpointError(f"{folder / shard}: lacks {len(absent)} tensors that {index_path.name} places there "
                                  f"(first: {absent[0]!r}); re-download {shard}")
        for key, entry in found.items():
            if weight_map.get(key, shard) == shard:
                index[key] = entry
    return index

