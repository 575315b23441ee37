"""The model side of a checkpoint: expected keys and shapes, which model a checkpoint is, key checks.

`build_meta_model` builds `LiveAvatarDiT` on the meta device (no memory, no init): the target of every streaming
load and the source of every shape the planner and the checks use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from lowvram.errors import CheckpointError
from lowvram.headers import TensorEntry, redownload
from lowvram.model.config import DiTConfig, s2v_14b, tiny
from lowvram.pth import short_error

CONFIG_NAME = "config.json"

_INIT_FUNCS = frozenset({
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_,
    nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.constant_, nn.init.ones_, nn.init.zeros_,
    nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
})


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Turns weight initialisation on meta tensors into a no-op (torch's meta `normal_` imports dynamo: ~1 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_FUNCS:
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def build_meta_model(cfg: DiTConfig, **kwargs) -> nn.Module:
    """`LiveAvatarDiT(cfg, **kwargs)` on the meta device (no memory, no init): the target of a streaming load."""
    from lowvram.model.dit import LiveAvatarDiT

    with torch.device("meta"), _SkipMetaInit():
        return LiveAvatarDiT(cfg, **kwargs)


@functools.lru_cache(maxsize=8)
def _model_layout(cfg: DiTConfig) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    model = build_meta_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linear = frozenset(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear))
    return shapes, linear


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model at `cfg` -> shape (built on the meta device; cached)."""
    return dict(_model_layout(cfg)[0])


def linear_weight_keys(cfg: DiTConfig) -> frozenset[str]:
    """Keys of all nn.Linear weights of the model at `cfg`."""
    return _model_layout(cfg)[1]


class KeyReport(NamedTuple):
    """Result of comparing a checkpoint's keys with a model: lists sorted by key."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, expected shape, found shape)

    @property
    def complete(self) -> bool:
        """Loadable: nothing missing and no wrong shape (extra keys are reported but harmless)."""
        return not self.missing and not self.mismatched


def as_shapes(obj) -> dict[str, tuple[int, ...]]:
    if isinstance(obj, DiTConfig):
        return expected_shapes(obj)
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in obj.items()}


def check_keys(index: Mapping, cfg: DiTConfig) -> KeyReport:
    """Missing / unexpected / wrong-shape keys of a checkpoint index (or key -> shape map) against `cfg`."""
    expected = expected_shapes(cfg)
    found = as_shapes(index)
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    mismatched = sorted((k, expected[k], found[k]) for k in found if k in expected and found[k] != expected[k])
    return KeyReport(missing, unexpected, mismatched)


ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len", "in_dim",
                "out_dim", "cond_dim", "audio_dim", "num_audio_token", "audio_layers", "audio_inject_layers",
                "patch_size", "eps")


def _arch(cfg: DiTConfig) -> tuple:
    return tuple(getattr(cfg, f) for f in ARCH_FIELDS)


def _location(index: Mapping) -> Path | None:
    """The file of the index's first tensor (None for a plain key -> shape map)."""
    for entry in index.values():
        return Path(entry.file) if isinstance(entry, TensorEntry) else None
    return None


def where_of(index: Mapping) -> str:
    """How error messages name a checkpoint: its file, or its folder when it has several."""
    files = {e.file for e in index.values() if isinstance(e, TensorEntry)}
    if not files:
        return "checkpoint"
    return str(next(iter(files))) if len(files) == 1 else str(next(iter(files)).parent)


def read_config_json(index_or_dir) -> dict | None:
    """The checkpoint's `config.json` (next to its files) as a dict, or None when there is none."""
    if isinstance(index_or_dir, Mapping):
        loc = _location(index_or_dir)
        folder = loc.parent if loc is not None else None
    else:
        folder = Path(index_or_dir)
        folder = folder if folder.is_dir() else folder.parent
    if folder is None or not (folder / CONFIG_NAME).is_file():
        return None
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt config ({short_error(err)}); {redownload(path)}") from None


def _config_from_shapes(shapes: Mapping[str, tuple], base: DiTConfig, from_json: bool) -> DiTConfig | None:
    """Fill the shape-determined fields of `base` from the tensors; None when the anchors are absent."""
    pe = shapes.get("patch_embedding.weight")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if pe is None or len(pe) != 5 or not layers:
        return None
    first = min(layers)
    d = dict(dim=pe[0], in_dim=pe[1], patch_size=tuple(pe[2:]), num_layers=max(layers) + 1)

    def take(key, field, fn):
        s = shapes.get(key)
        if s is not None:
            try:
                d[field] = fn(s)
            except (IndexError, ZeroDivisionError):
                pass

    take("cond_encoder.weight", "cond_dim", lambda s: s[1])
    take("text_embedding.0.weight", "text_dim", lambda s: s[1])
    take("time_embedding.0.weight", "freq_dim", lambda s: s[1])
    take(f"blocks.{first}.ffn.0.weight", "ffn_dim", lambda s: s[0])
    take("head.head.weight", "out_dim", lambda s: s[0] // math.prod(d["patch_size"]))
    take("casual_audio_encoder.encoder.conv1_local.conv.weight", "audio_dim", lambda s: s[1])
    take("casual_audio_encoder.weights", "audio_layers", lambda s: s[1])
    dim = d["dim"]
    if not from_json and dim != base.dim:
        heads = dim // 128 if dim % 128 == 0 else next(h for h in (8, 4, 2, 1) if dim % h == 0)
        d["num_heads"] = heads
    n_inj = len({m.group(1) for k in shapes if (m := re.match(r"audio_injector\.injector\.(\d+)\.", k))})
    inject = tuple(base.audio_inject_layers)
    if n_inj != len(inject) or any(i >= d["num_layers"] for i in inject):
        last = d["num_layers"] - 1
        inject = tuple(sorted({round(i * last / (n_inj - 1)) for i in range(n_inj)})) if n_inj > 1 else (0,) * n_inj
    d["audio_inject_layers"] = inject
    return dataclasses.replace(base, **d)


def identify(index: Mapping, config: dict | None = None) -> DiTConfig:
    """Recognise the model of a checkpoint: the s2v-14b or tiny preset, or a custom config (name 'custom').

    Sizes come from the tensor shapes; what shapes cannot tell (heads, audio inject layers, text length) from
    `config` or the checkpoint's config.json. A key set of another model raises a CheckpointError.
    """
    where = where_of(index)
    if config is None and _location(index) is not None:
        config = read_config_json(index)
    try:
        base = DiTConfig.from_dict(config) if config else DiTConfig()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: config.json does not describe a valid DiT ({short_error(err)})") from None
    shapes = as_shapes(index)
    if not shapes:
        raise CheckpointError(f"{where}: the checkpoint holds no tensors; re-download it")
    try:
        cfg = _config_from_shapes(shapes, base, from_json=bool(config)) or base
        cfg.validate()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: tensor shapes describe no valid DiT ({short_error(err)})") from None
    expected = expected_shapes(cfg)
    hits = sum(1 for k, s in shapes.items() if expected.get(k) == s)
    if hits < 0.5 * min(len(shapes), len(expected)):
        first = next(iter(sorted(shapes)))
        raise CheckpointError(
            f"{where}: not a Wan2.2-S2V / LiveAvatar DiT checkpoint: {hits} of its {len(shapes)} tensors match the "
            f"DiT's names and shapes (first key {first!r}); point at the Wan2.2-S2V-14B folder")
    for preset in (s2v_14b(), tiny()):
        if _arch(cfg) == _arch(preset):
            return preset
    return dataclasses.replace(cfg, name="custom")

