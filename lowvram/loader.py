"""Streaming loads: a checkpoint read tensor by tensor into a (meta-built) model or a dict, with the LoRA applied."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from lowvram.errors import CheckpointError
from lowvram.headers import TensorEntry, read_tensor
from lowvram.identify import where_of
from lowvram.index import checkpoint_index
from lowvram.lora import LoraWeights, read_lora
from lowvram.parallel.tensor import shard_shape, tp_slice


_MALLOC_FIXED = False


def _fix_malloc_threshold() -> None:
    """Pin glibc's mmap threshold (128 KiB) so freed large temporaries go back to the OS at once.

    glibc raises the threshold to the size of each freed mmapped block (up to 32 MiB), after which large
    temporaries (float32 merge buffers) come from the heap between long-lived weights and fragment it: up to
    +40 % peak RSS was measured on a LoRA merge. Pinning it (what MALLOC_MMAP_THRESHOLD_ does) is process-wide
    and harmless; skipped when that variable is set or the C library is not glibc.
    """
    global _MALLOC_FIXED
    if _MALLOC_FIXED or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _MALLOC_FIXED = True
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _make_filter(key_filter) -> Callable[[str], bool]:
    if key_filter is None:
        return lambda k: True
    if callable(key_filter):
        return key_filter
    prefixes = (key_filter,) if isinstance(key_filter, str) else tuple(key_filter)
    return lambda k: k.startswith(prefixes)


def assign_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put `value` in place of the parameter/buffer `key` of `model` (e.g. one on the meta device), keeping
    its requires_grad flag."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad
                                                                         and value.is_floating_point()))
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(key)


def load_state_dict_streaming(
    ckpt: str | Path | Mapping[str, TensorEntry],
    model_or_keys: nn.Module | Iterable[str] | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    lora: str | Path | LoraWeights | None = None,
    key_filter: Callable[[str], bool] | str | Iterable[str] | None = None,
    *,
    lora_alpha: float | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    tp_rank: int = 0,
    tp: int = 1,
    merge_device: torch.device | str | None = None,
):
    """Stream a checkpoint tensor by tensor into `dtype` on `device`, the LoRA applied on the way: the one loader
    of bf16 weights (a run's pipeline stages and TP ranks, the quantizer's calibration and layer files, tests).

    `model_or_keys`: a module (typically built with `build_meta_model`, or a pipeline stage / TP rank of it) whose
    parameters are replaced by the loaded tensors — the module is returned; or an iterable of keys, or None for
    every key — a dict key -> tensor is returned. `key_filter` (a predicate, a key prefix or a tuple of
    prefixes) restricts the keys, e.g. to one block. `dtype=None` keeps the file dtype; integer tensors always
    keep theirs. With `strict`, a wanted key that the checkpoint lacks is an error; a wrong shape always is.

    Each tensor goes through `transform_tensor`: read into its own buffer, replaced by the LoRA file's override
    when it has one, merged, sliced to TP rank `tp_rank` of `tp`, cast and moved — so peak host memory is the
    result plus about one tensor (plus its float32 delta during a merge). The merge runs on `merge_device`
    (default `device`).
    """
    _fix_malloc_threshold()
    index = ckpt if isinstance(ckpt, Mapping) else checkpoint_index(ckpt, allow_pickle=allow_pickle)
    where = ckpt if not isinstance(ckpt, Mapping) else where_of(index)
    keep = _make_filter(key_filter)
    model = model_or_keys if isinstance(model_or_keys, nn.Module) else None
    if model is not None:
        wanted = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if keep(k)}
    elif model_or_keys is None:
        wanted = {k: shard_shape(k, e.shape, tp) for k, e in index.items() if keep(k)}
    else:
        wanted = {k: shard_shape(k, index[k].shape, tp) if k in index else None for k in model_or_keys if keep(k)}

    absent = [k for k in wanted if k not in index]
    if absent and strict:
        raise CheckpointError(f"{where}: {len(absent)} tensors the model needs are missing (first: {absent[0]!r}); "
                              f"re-download the checkpoint or check that it is the right model")
    for key, shape in wanted.items():
        if key in index and shape is not None and shard_shape(key, index[key].shape, tp) != shape:
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(index[key].shape)}, the model expects "
                                  f"{list(shape)}" + (f" on each of {tp} TP ranks" if tp > 1 else "")
                                  + "; this checkpoint is for another model size")

    if lora is not None and not isinstance(lora, LoraWeights):
        lora = read_lora(lora, index, alpha=lora_alpha, allow_pickle=allow_pickle)
    elif isinstance(lora, LoraWeights) and lora_alpha is not None:
        lora = dataclasses.replace(lora, alpha=float(lora_alpha))
    device = torch.device(device)
    merge_device = device if merge_device is None else torch.device(merge_device)

    sources = {k: (lora.overrides.get(k, index[k]) if lora is not None else index[k]) for k in wanted if k in index}
    order = sorted(sources, key=lambda k: (str(sources[k].file), sources[k].offsets or (0, 0)))
    result: dict[str, torch.Tensor] = {}
    files: dict = {}
    try:
        for key in order:
            if sources[key].shape != index[key].shape:
                raise CheckpointError(f"{sources[key].file}: override {sources[key].name!r} has shape "
                                      f"{list(sources[key].shape)}, the model expects {list(index[key].shape)}")
            t = transform_tensor(key, read_tensor(sources[key], files), lora, files, tp_rank=tp_rank, tp=tp,
                                 dtype=dtype, device=device, merge_device=merge_device)
            if model is not None:
                assign_tensor(model, key, t)
            else:
                result[key] = t
            del t
    finally:
        for f in files.values():
            f.close()
    return model if model is not None else result


def transform_tensor(key: str, t: torch.Tensor, lora: LoraWeights | None, files: dict | None = None, *,
                     tp_rank: int = 0, tp: int = 1, dtype: torch.dtype | None = torch.bfloat16,
                     device: torch.device = torch.device("cpu"), merge_device: torch.device = torch.device("cpu")
                     ) -> torch.Tensor:
    """A checkpoint tensor (or the LoRA file's override of it) as the model holds it: LoRA merged at the file's
    dtype (upstream merges into its bf16 weights, so a float32 CPU run computes with the same bf16 model as
    the quantizer and a GPU run), then this TP rank's slice, then cast to `dtype` and moved to `device`."""
    if lora is not None and lora.target_of(key) is not None:
        t = lora.merge(key, t.to(merge_device), inplace=True, _files=files)
    t = tp_slice(key, t, tp_rank, tp)
    cast = dtype is not None and t.is_floating_point() and t.dtype != dtype
    t = t.to(device=device, dtype=dtype if cast else t.dtype)
    return t if tp == 1 else t.contiguous()
