"""Loading a quantized folder on the runtime side: only the files a stage / TP rank needs, each verified.

`load_quantized(folder, layers, tp_rank, tp_size, device)` builds the model (or a stage of it) on the meta
device, swaps each Linear for its quantized module as the manifest's recipe says (kernels.empty_quantized_),
reads `nonblock.safetensors` (when the stage has the embeddings or the head) and the stage's own layer files
(`block_LLL[.tpRofN].safetensors`), checks every file's sha256 against manifest.json, and assigns the tensors.
A mismatch or a missing file is a CheckpointError naming the file and saying to re-run `lowvram quantize`.
`lowvram.manifest` reads and checks the manifest; `lowvram.quantize` writes the folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from lowvram.errors import CheckpointError
from lowvram.headers import NAME_DTYPES
from lowvram.identify import build_meta_model
from lowvram.kernels import linear as K
from lowvram.loader import assign_tensor
from lowvram.manifest import MANIFEST, NONBLOCK, RERUN, block_file, check_tp_split, folder_tp, read_manifest
from lowvram.model.config import DiTConfig
from lowvram.model.dit import LiveAvatarDiT
from lowvram.verified import is_verified, mark_verified


def read_safetensors(path: str | Path, expected_sha256: str | None = None, device: torch.device | str = "cpu",
                     what: str = "quantized folder", fix: str = "re-run `lowvram quantize` to rebuild it"
                     ) -> dict[str, torch.Tensor]:
    """Read one file of ours: its bytes are hashed once, checked against `expected_sha256`, then parsed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            view, got = memoryview(data), 0
            while got < len(data):
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the {what}; {fix}") from None
    if expected_sha256 is not None:
        got_sha = hashlib.sha256(data).hexdigest()
        if got_sha != expected_sha256:
            raise CheckpointError(f"{path}: sha256 {got_sha[:12]}... does not match manifest.json "
                                  f"({expected_sha256[:12]}...): the file was changed or is corrupt; {fix}")
    try:
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        table = json.loads(bytes(data[8:8 + n]))
        table.pop("__metadata__", None)
        start = 8 + n
        out = {}
        for name, info in table.items():
            b, e = info["data_offsets"]
            dtype = NAME_DTYPES[info["dtype"]]
            if e > b:
                raw = torch.frombuffer(data, dtype=torch.uint8, count=e - b, offset=start + b).clone()
            else:
                raw = torch.empty(0, dtype=torch.uint8)
            out[name] = raw.view(dtype).reshape(info["shape"]).to(device)
        return out
    except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}); {fix}") from None


def read_listed(folder: Path, name: str, manifest: dict, device, verified: set | None = None
                ) -> dict[str, torch.Tensor]:
    """Read one listed file, checking its sha256 unless this process (`verified`) or an earlier run
    (lowvram.verified: same path, size, mtime and inode) already did."""
    entry = manifest["files"].get(name)
    if entry is None:  # read_manifest checked the folder's own files are listed: this one is of another split
        raise CheckpointError(f"{folder / name}: not listed in {MANIFEST}, whose files are split for --tp "
                              f"{folder_tp(manifest)}; use `lowvram reshard` or {RERUN}")
    path, sha256 = folder / name, entry["sha256"]
    check = (verified is None or name not in verified) and not is_verified(path, sha256)
    out = read_safetensors(path, sha256 if check else None, device, fix=RERUN)
    if check:
        mark_verified(path, sha256)  # the next run (or rank) skips hashing it while the file is unchanged
    if verified is not None:
        verified.add(name)
    return out


def _static_linears(manifest: dict) -> set[str]:
    return {n for n, d in manifest.get("layers", {}).items() if d.get("format") == "fp8" and d.get("act") == "static"}


def quantized_skeleton(manifest: dict, layers: list[int], embeddings: bool, head: bool, tp_size: int) -> LiveAvatarDiT:
    """The (stage of the) model on the meta device with each Linear swapped for its recipe's quantized module."""
    cfg = DiTConfig.from_dict(manifest["config"])
    model = build_meta_model(cfg, layers=layers, embeddings=embeddings, head=head, tp=tp_size)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    recipe = {n: f for n, f in manifest["recipe"].items() if n in names}
    K.empty_quantized_(model, recipe)
    for name in _static_linears(manifest) & names:
        mod = model.get_submodule(name)
        mod.register_buffer("act_scales", torch.empty(cfg.num_steps + 1, device="meta"))
    return model


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = dict(model.state_dict(keep_vars=True))
    for key, t in state.items():
        if key not in expected:
            continue  # e.g. another stage's injector would not be in this file anyway
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(t.shape)}, expected "
                                  f"{list(expected[key].shape)}; {RERUN}")
        assign_tensor(model, key, t)


def finish(model: nn.Module, where: Path) -> nn.Module:
    left = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {len(left)} tensors missing from the quantized files (first {left[0]!r}); "
                              f"{RERUN}")
    K.set_act_step(model, None)
    return model.eval()


def load_quantized(folder: str | Path, layers: list[int] | range | None = None, tp_rank: int = 0, tp_size: int = 1,
                   device: torch.device | str = "cpu", *, embeddings: bool | None = None, head: bool | None = None,
                   manifest: dict | None = None) -> LiveAvatarDiT:
    """The quantized DiT (or the stage holding `layers`, TP rank `tp_rank` of `tp_size`) on `device`.

    `embeddings` / `head` default to True for the full model (layers=None) and False for a subset. Static fp8
    activation scales start at each layer's max over steps; `kernels.linear.set_act_step(model, step)` selects
    the per-step ones."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    cfg = DiTConfig.from_dict(manifest["config"])
    check_tp_split(folder, manifest, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside 0..{tp_size - 1}")
    full = layers is None
    layer_ids = list(range(cfg.num_layers)) if full else sorted(int(i) for i in layers)
    embeddings = full if embeddings is None else embeddings
    head = full if head is None else head
    device = torch.device(device)
    model = quantized_skeleton(manifest, layer_ids, embeddings, head, tp_size)
    files = ([NONBLOCK] if embeddings or head else []) + [block_file(i, tp_rank, tp_size) for i in layer_ids]
    for name in files:
        assign_state(model, read_listed(folder, name, manifest, device), folder / name)
    return finish(model, folder)


def load_quantized_stage(source: str | Path, cfg: DiTConfig | None, topo, layers: list[int], device="cpu") -> LiveAvatarDiT:
    """One pipeline stage / TP rank for the parallel engine (`topo`: first, last, tp, tp_rank, tp_group)."""
    from lowvram.parallel.tensor import set_tp_group

    manifest = read_manifest(source)
    if cfg is not None and DiTConfig.from_dict(manifest["config"]) != cfg:
        raise CheckpointError(f"{source}: quantized for another model config than the one asked for")
    model = load_quantized(source, layers, topo.tp_rank, topo.tp, device, embeddings=topo.first, head=topo.last,
                           manifest=manifest)
    set_tp_group(model, topo.tp_group)
    return model
