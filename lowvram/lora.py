"""The LiveAvatar LoRA: its peft-named lora_A / lora_B pairs read from the header, checked against the model, and
merged into a weight with upstream's formula."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lowvram.errors import CheckpointError
from lowvram.headers import TensorEntry, dtype_name, file_index, read_tensor
from lowvram.identify import as_shapes, linear_weight_keys
from lowvram.index import LORA_NAME
from lowvram.model.config import DiTConfig
from lowvram.pth import is_pickle

LORA_PREFIX = "base_model.model."
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")  # peft target_modules of the LiveAvatar LoRA
LORA_ALPHA = 64.0  # lora_alpha of liveavatar/configs/s2v_causal_sft.yaml (rank 128 -> scale 0.5)
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.default\.weight")


def lora_target_modules(cfg_or_shapes: DiTConfig | Mapping[str, tuple]) -> list[str]:
    """Modules the LiveAvatar LoRA targets: name == target or ends with '.' + target (peft's rule), Linear only."""
    if isinstance(cfg_or_shapes, DiTConfig):
        keys = sorted(linear_weight_keys(cfg_or_shapes))
    else:
        keys = [k for k, s in as_shapes(cfg_or_shapes).items() if k.endswith(".weight") and len(s) == 2]
    out = []
    for key in keys:
        module = key[: -len(".weight")]
        if any(module == t or module.endswith("." + t) for t in LORA_TARGETS):
            out.append(module)
    return out


@dataclasses.dataclass
class LoraWeights:
    """A LiveAvatar LoRA read from its header: per target module the lora_A / lora_B entries.

    `overrides` are non-LoRA tensors of the file that upstream's `load_state_dict(strict=False)` would copy
    over model parameters before the merge; `ignored` are file keys that match nothing (upstream skips them).
    """

    path: Path
    rank: int
    alpha: float
    targets: dict[str, tuple[TensorEntry, TensorEntry]]  # module -> (A [r, in], B [out, r])
    overrides: dict[str, TensorEntry]
    ignored: list[str]
    num_tensors: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def params(self) -> int:
        return sum(a.numel + b.numel for a, b in self.targets.values())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.targets.values())

    def target_of(self, key: str) -> str | None:
        """The targeted module whose weight `key` is, else None."""
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            if module in self.targets:
                return module
        return None

    def delta(self, module: str, device: torch.device | str = "cpu", _files: dict | None = None) -> torch.Tensor:
        """(float32(B) @ float32(A)) * (alpha / r), float32 [out, in], computed on `device`."""
        a_entry, b_entry = self.targets[module]
        a = read_tensor(a_entry, _files).to(device=device, dtype=torch.float32)
        b = read_tensor(b_entry, _files).to(device=device, dtype=torch.float32)
        delta = b @ a
        delta *= self.scale
        return delta

    def merge(self, key: str, weight: torch.Tensor, _files: dict | None = None, *, inplace: bool = False) -> torch.Tensor:
        """W' = to_dtype(float32(W) + delta) for a targeted weight (peft's merge_and_unload); else W unchanged.

        `inplace` writes the result into `weight` (no second copy; float32 weights are always returned anew)."""
        module = self.target_of(key)
        if module is None:
            return weight
        merged = self.delta(module, weight.device, _files)
        merged += weight  # float32 + float32(W): the same sum as float32(W) + delta, without a float32 copy of W
        if weight.dtype == torch.float32:
            return merged
        if not inplace:
            return merged.to(weight.dtype)
        with torch.no_grad():
            return weight.copy_(merged)  # rounds to the weight's dtype (nearest-even), reusing its memory

    def summary(self) -> dict:
        return {
            "path": str(self.path), "rank": self.rank, "alpha": self.alpha, "scale": self.scale,
            "targets": len(self.targets), "tensors": self.num_tensors, "params": self.params, "bytes": self.nbytes,
            "overrides": sorted(self.overrides), "ignored": len(self.ignored), "ignored_first": self.ignored[:5],
        }


def read_lora(path: str | Path, expected: DiTConfig | Mapping | None = None, *, alpha: float | None = None,
              allow_pickle: bool = False) -> LoraWeights:
    """Read a LiveAvatar LoRA's header (no data) and check it against the model.

    Names follow peft: `base_model.model.<module>.lora_{A,B}.default.weight`. Upstream's prefix rule is kept: only
    the first key (in sorted order) is looked at; if it lacks `base_model.model.`, every key gets it prepended.
    `expected` (a DiTConfig, a checkpoint index or key -> shape) validates targets and shapes; rank is read
    from the file, alpha defaults to 64 (scale alpha / rank = 0.5 at rank 128).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: LoRA file not found; download liveavatar.safetensors or fix the path")
    if path.is_dir():
        if (path / LORA_NAME).is_file():
            path = path / LORA_NAME
        else:
            raise CheckpointError(f"{path}: is a folder without {LORA_NAME}; pass the LoRA file")
    entries = file_index(path, allow_pickle)
    names = sorted(entries) if not is_pickle(path) else list(entries)
    if not names:
        raise CheckpointError(f"{path}: not a LiveAvatar LoRA: the file holds no tensors")
    prefixed = names[0].startswith(LORA_PREFIX)
    shapes = as_shapes(expected) if expected is not None else None
    targetable = set(lora_target_modules(shapes)) if shapes is not None else None

    pairs: dict[str, dict[str, tuple[str, TensorEntry]]] = {}
    overrides: dict[str, TensorEntry] = {}
    ignored: list[str] = []
    for name in names:
        full = name if prefixed else LORA_PREFIX + name
        inner = full[len(LORA_PREFIX):] if full.startswith(LORA_PREFIX) else None
        m = _LORA_KEY.fullmatch(inner) if inner is not None else None
        if m and (targetable is None or m["module"] in targetable):
            pairs.setdefault(m["module"], {})[m["ab"]] = (name, entries[name])
        elif inner is not None and inner.endswith((".base_layer.weight", ".base_layer.bias")) and (
                targetable is None or inner.rsplit(".", 2)[0] in targetable):
            overrides[inner.replace(".base_layer.", ".")] = entries[name]
        elif inner is not None and shapes is not None and inner in shapes and inner.rsplit(".", 1)[0] not in targetable:
            overrides[inner] = entries[name]
        else:
            ignored.append(name)
    if not pairs:
        raise CheckpointError(
            f"{path}: not a LiveAvatar LoRA: none of its {len(names)} tensors is a "
            f"'<module>.lora_A.default.weight' / 'lora_B' of the DiT's q/k/v/o/ffn layers (first key {names[0]!r})")

    targets: dict[str, tuple[TensorEntry, TensorEntry]] = {}
    rank = None
    for module in sorted(pairs):
        ab = pairs[module]
        if "A" not in ab or "B" not in ab:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise CheckpointError(f"{path}: {ab[have][0]!r} has no lora_{lack} partner; the LoRA file is damaged, "
                                  f"re-download it")
        (a_name, a), (b_name, b) = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise CheckpointError(f"{path}: LoRA tensor {a_name!r} / {b_name!r} is not 2-D; not a LiveAvatar LoRA")
        r = a.shape[0]
        rank = r if rank is None else rank
        if shapes is not None:
            out_f, in_f = shapes[module + ".weight"]
            exp_a, exp_b = (rank, in_f), (out_f, rank)
        else:
            exp_a, exp_b = (rank, a.shape[1]), (b.shape[0], rank)
        for name, entry, exp in ((a_name, a, exp_a), (b_name, b, exp_b)):
            if entry.shape != exp:
                raise CheckpointError(
                    f"{path}: LoRA tensor {name!r} has shape {list(entry.shape)}, expected {list(exp)} (rank {rank} "
                    f"on {module}.weight); this LoRA does not fit this model")
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise CheckpointError(f"{path}: LoRA tensor {a_name!r} is {dtype_name(a.dtype)}, expected a float dtype")
        targets[module] = (a, b)
    if rank == 0:
        raise CheckpointError(f"{path}: LoRA rank is 0; not a usable LoRA")
    return LoraWeights(path, rank, float(LORA_ALPHA if alpha is None else alpha), targets, overrides, ignored,
                       len(names))

