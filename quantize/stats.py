"""Per-Linear input statistics recorded while calibration samples stream through a layer.

For every input group (Linears fed the same tensor share one, see `layout.input_group`):
* `chan_amax` [in] — per-input-channel max |x| over all calibration rows (SmoothQuant migration);
* `step_amax` [steps + 1] — per-tensor max |x| at each denoising step, the last entry for the prefill
  (static per-(layer, step) fp8 activation scales);
* a bounded, seeded reservoir of input rows (the `rows` with the smallest random keys: a uniform sample of
  everything seen, independent of batch boundaries), with each row's step, separately for calibration and
  held-out samples — for the SmoothQuant alpha search, per-layer error measurement and mixed precision.
Only calibration ("train") samples feed the amax statistics; held-out samples only fill their own reservoir.
"""

from __future__ import annotations

import contextlib
import zlib

import torch
from torch import nn

from lowvram.model.config import DiTConfig

from .layout import BLOCK_PREFIXES, input_group


class Reservoir:
    """Bottom-k sample of rows by seeded uniform keys (deterministic for a given sequence of inputs)."""

    def __init__(self, capacity: int, seed: int, store: torch.device):
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.store = store
        self.rows: torch.Tensor | None = None
        self.keys = torch.empty(0)
        self.steps = torch.empty(0, dtype=torch.int16)
        self.seen = 0

    def add(self, x2: torch.Tensor, step: int) -> None:
        n = x2.shape[0]
        self.seen += n
        keys = torch.rand(n, generator=self.gen)
        if self.keys.numel() >= self.capacity:
            take = (keys < self.keys.max()).nonzero().squeeze(1)
        else:
            take = torch.arange(n)
        if take.numel() == 0:
            return
        rows = x2.index_select(0, take.to(x2.device)).to(self.store)
        all_rows = rows if self.rows is None else torch.cat([self.rows, rows])
        all_keys = torch.cat([self.keys, keys[take]])
        all_steps = torch.cat([self.steps, torch.full((take.numel(),), step, dtype=torch.int16)])
        order = torch.argsort(all_keys, stable=True)[: self.capacity]
        self.rows, self.keys, self.steps = all_rows[order.to(all_rows.device)], all_keys[order], all_steps[order]

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()


class GroupStats:
    def __init__(self, name: str, in_features: int, num_steps: int, rows: int, seed: int, device, store):
        self.name = name
        self.in_features = in_features
        self.chan_amax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.step_amax = torch.zeros(num_steps + 1, dtype=torch.float32)
        self.step_seen = torch.zeros(num_steps + 1, dtype=torch.bool)
        base = zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)
        self.train = Reservoir(rows, base, store)
        self.heldout = Reservoir(rows, base ^ 0x5BD1E995, store)

    def observe(self, x: torch.Tensor, step: int, role: str) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        if role == "train":
            a = x2.abs().float()
            torch.maximum(self.chan_amax, a.amax(0).to(self.chan_amax.device), out=self.chan_amax)
            m = float(a.max())
            self.step_amax[step] = max(float(self.step_amax[step]), m)
            self.step_seen[step] = True
            self.train.add(x2, step)
        else:
            self.heldout.add(x2, step)

    def free_rows(self) -> None:
        for r in (self.train, self.heldout):
            r.rows, r.keys, r.steps = None, torch.empty(0), torch.empty(0, dtype=torch.int16)

    @property
    def nbytes(self) -> int:
        return self.train.nbytes + self.heldout.nbytes + 4 * self.in_features


def quantizable_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.startswith(BLOCK_PREFIXES)]


class Recorder:
    """Forward pre-hooks on a layer's Linears; `context(step, role)` says what the current forward is."""

    def __init__(self, cfg: DiTConfig, rows: int = 512, seed: int = 0, store: torch.device | str = "cpu"):
        self.cfg = cfg
        self.rows = rows
        self.seed = seed
        self.store = torch.device(store)
        self.groups: dict[str, GroupStats] = {}
        self.step = 0
        self.role = "train"
        self._handles: list = []
        self._owner: dict[str, str] = {}  # group -> the Linear whose hook records it

    @contextlib.contextmanager
    def context(self, step: int, role: str):
        prev = (self.step, self.role)
        self.step, self.role = step, role
        try:
            yield
        finally:
            self.step, self.role = prev

    def attach(self, module: nn.Module) -> None:
        for name, lin in quantizable_linears(module):
            group = input_group(name)
            if group not in self.groups:
                self.groups[group] = GroupStats(group, lin.in_features, self.cfg.num_steps, self.rows, self.seed,
                                                lin.weight.device, self.store)
            if self._owner.setdefault(group, name) != name:
                continue  # another member of the group records this input
            stats = self.groups[group]
            self._handles.append(lin.register_forward_pre_hook(
                lambda mod, args, stats=stats: stats.observe(args[0], self.step, self.role)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups.values())
