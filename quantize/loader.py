"""Loading a quantized folder: only the files a stage / TP rank needs, each verified against the manifest.

`load_quantized(folder, layers, tp_rank, tp_size, device)` builds the model (or a stage of it) on the meta
device, swaps each Linear for its quantized module as the manifest's recipe says (kernels.empty_quantized_),
reads `nonblock.safetensors` (when the stage has the embeddings or the head) and the stage's own layer files
(`block_LLL[.tpRofN].safetensors`), checks every file's sha256 against manifest.json, and assigns the tensors.
A mismatch or a missing file is a CheckpointError naming the file and saying to re-run `lowvram quantize`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowvram.checkpoint import assign_tensor, build_meta_model
from lowvram.errors import CheckpointError
from lowvram.kernels import linear as K
from lowvram.manifest import (  # noqa: F401 (FORMAT_*, MANIFEST, verify_folder re-exported for the quantizer)
    FORMAT_NAME, FORMAT_VERSION, MANIFEST, NONBLOCK, RERUN, block_file, check_tp_split, folder_tp, read_manifest,
    verify_folder,
)
from lowvram.model.config import DiTConfig
from lowvram.model.dit import LiveAvatarDiT
from lowvram.model.sampler import Stream

from .calibrate import LayerSource
from .formats import set_act_step
from .io import read_safetensors
from .layout import merge_states

def _read(folder: Path, name: str, manifest: dict, device, verified: set | None = None) -> dict[str, torch.Tensor]:
    """Read one listed file, checking its sha256 (only the first time when a `verified` set is kept)."""
    entry = manifest["files"].get(name)
    if entry is None:  # read_manifest checked the folder's own files are listed: this one is of another split
        raise CheckpointError(f"{folder / name}: not listed in {MANIFEST}, whose files are split for --tp "
                              f"{folder_tp(manifest)}; use `lowvram reshard` or {RERUN}")
    check = verified is None or name not in verified
    out = read_safetensors(folder / name, entry["sha256"] if check else None, device, fix=RERUN)
    if verified is not None:
        verified.add(name)
    return out


def _static_linears(manifest: dict) -> set[str]:
    return {n for n, d in manifest.get("layers", {}).items() if d.get("format") == "fp8" and d.get("act") == "static"}


def _skeleton(manifest: dict, layers: list[int], embeddings: bool, head: bool, tp_size: int) -> LiveAvatarDiT:
    cfg = DiTConfig.from_dict(manifest["config"])
    model = build_meta_model(cfg, layers=layers, embeddings=embeddings, head=head, tp=tp_size)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    recipe = {n: f for n, f in manifest["recipe"].items() if n in names}
    K.empty_quantized_(model, recipe)
    for name in _static_linears(manifest) & names:
        mod = model.get_submodule(name)
        mod.register_buffer("act_scales", torch.empty(cfg.num_steps + 1, device="meta"))
    return model


def _assign_all(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = dict(model.state_dict(keep_vars=True))
    for key, t in state.items():
        if key not in expected:
            continue  # e.g. another stage's injector would not be in this file anyway
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(t.shape)}, expected "
                                  f"{list(expected[key].shape)}; {RERUN}")
        assign_tensor(model, key, t)


def _finish(model: nn.Module, where: Path) -> nn.Module:
    left = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {len(left)} tensors missing from the quantized files (first {left[0]!r}); "
                              f"{RERUN}")
    set_act_step(model, None)
    return model.eval()


def load_quantized(folder: str | Path, layers: list[int] | range | None = None, tp_rank: int = 0, tp_size: int = 1,
                   device: torch.device | str = "cpu", *, embeddings: bool | None = None, head: bool | None = None,
                   manifest: dict | None = None) -> LiveAvatarDiT:
    """The quantized DiT (or the stage holding `layers`, TP rank `tp_rank` of `tp_size`) on `device`.

    `embeddings` / `head` default to True for the full model (layers=None) and False for a subset. Static fp8
    activation scales start at each layer's max over steps; `formats.set_act_step(model, step)` (or
    `QuantStream`) selects the per-step ones."""
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
    model = _skeleton(manifest, layer_ids, embeddings, head, tp_size)
    files = ([NONBLOCK] if embeddings or head else []) + [block_file(i, tp_rank, tp_size) for i in layer_ids]
    for name in files:
        _assign_all(model, _read(folder, name, manifest, device), folder / name)
    return _finish(model, folder)


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


def layer_state(folder: str | Path, layer: int | None, manifest: dict | None = None, device="cpu",
                verified: set | None = None) -> dict:
    """The full (TP-merged) tensors of one layer file (or of the nonblock file for layer=None)."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if layer is None:
        return _read(folder, NONBLOCK, manifest, device, verified)
    n = folder_tp(manifest)
    return merge_states([_read(folder, block_file(layer, r, n), manifest, device, verified) for r in range(n)],
                        manifest["recipe"])


class QuantizedSource(LayerSource):
    """Layers of a quantized folder for the streaming trajectory (end-to-end evaluation), TP merged."""

    def __init__(self, folder: str | Path, manifest: dict, device: torch.device | str = "cpu"):
        self.folder, self.manifest = Path(folder), manifest
        self.cfg = DiTConfig.from_dict(manifest["config"])
        self.device = torch.device(device)
        self.bytes_read = 0
        self.verified: set[str] = set()  # each file's sha256 is checked on its first read only

    def _count(self, names):
        self.bytes_read += sum(int(self.manifest["files"][n]["bytes"]) for n in names)

    def nonblock(self):
        model = _skeleton(self.manifest, [], True, True, 1)
        self._count([NONBLOCK])
        _assign_all(model, layer_state(self.folder, None, self.manifest, self.device, self.verified), self.folder / NONBLOCK)
        return _finish(model, self.folder)

    def layer(self, layer):
        model = _skeleton(self.manifest, [layer], False, False, 1)
        n = folder_tp(self.manifest)
        self._count([block_file(layer, r, n) for r in range(n)])
        _assign_all(model, layer_state(self.folder, layer, self.manifest, self.device, self.verified), self.folder)
        return _finish(model, self.folder)


class QuantStream(Stream):
    """`Stream` for a quantized model with static per-step fp8 scales: selects step `step`'s scales before each
    forward and the prefill's during the prefill (a no-op for dynamic formats)."""

    def prefill(self, cond):
        set_act_step(self.model, self.cfg.num_steps)
        try:
            return super().prefill(cond)
        finally:
            set_act_step(self.model, None)

    def forward(self, x, step, *args, **kwargs):
        set_act_step(self.model, step)
        return super().forward(x, step, *args, **kwargs)
