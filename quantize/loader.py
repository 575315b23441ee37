"""The quantizer's view of a quantized folder: TP-merged layer states, layers for the end-to-end evaluation
(`QuantizedSource`, a calibration `LayerSource`) and `QuantStream`. Loading a folder to run it is the runtime's
job (`lowvram.quantized`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lowvram.kernels.linear import set_act_step
from lowvram.manifest import NONBLOCK, block_file, folder_tp, read_manifest
from lowvram.model.config import DiTConfig
from lowvram.model.sampler import Stream
from lowvram.quantized import assign_state, finish, quantized_skeleton, read_listed

from .calibrate import LayerSource
from .layout import merge_states


def layer_state(folder: str | Path, layer: int | None, manifest: dict | None = None, device="cpu",
                verified: set | None = None) -> dict:
    """The full (TP-merged) tensors of one layer file (or of the nonblock file for layer=None)."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if layer is None:
        return read_listed(folder, NONBLOCK, manifest, device, verified)
    n = folder_tp(manifest)
    return merge_states([read_listed(folder, block_file(layer, r, n), manifest, device, verified) for r in range(n)])


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
        model = quantized_skeleton(self.manifest, [], True, True, 1)
        self._count([NONBLOCK])
        assign_state(model, layer_state(self.folder, None, self.manifest, self.device, self.verified),
                     self.folder / NONBLOCK)
        return finish(model, self.folder)

    def layer(self, layer):
        model = quantized_skeleton(self.manifest, [layer], False, False, 1)
        n = folder_tp(self.manifest)
        self._count([block_file(layer, r, n) for r in range(n)])
        assign_state(model, layer_state(self.folder, layer, self.manifest, self.device, self.verified), self.folder)
        return finish(model, self.folder)


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
