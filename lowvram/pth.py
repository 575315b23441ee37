"""Pickled state dicts (`.pth`, `.pt`, `.bin`, ...): opened only with `torch.load(weights_only=True)`, memory-mapped.

The DiT loaders refuse them unless asked (`allow_pickle`, inspect's --allow-pickle) and index them with
`pickle_state`; the umT5 and VAE releases exist only as `.pth`, read whole with `read_state_dict`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from lowvram.errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")


def short_error(err: BaseException) -> str:
    """The first line of an exception's message (at most 160 characters), for one-line errors."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]


def is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


class PickleRefusedError(CheckpointError):
    """A pickle file where safetensors is expected; only `inspect` has a flag (--allow-pickle) to open one."""


def refuse_pickle(path: Path) -> CheckpointError:
    return PickleRefusedError(
        f"{path}: is a pickle file ({path.suffix}), which is never unpickled here (it could run code); use the "
        f".safetensors release of this file, or convert it: python -c \"import torch, safetensors.torch as st; "
        f"st.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\"")


def torch_load_weights(path: str | Path):
    """torch.load(weights_only=True), memory-mapped; legacy (pre-1.6, non-zip) files can't be mapped and are read
    whole — still never a full unpickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def unwrap_state_dict(obj):
    """The state dict inside a training checkpoint's {"state_dict" | "model" | "module": {...}} wrapper, else `obj`."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 4:
            return obj[wrapper]
    return obj


@functools.lru_cache(maxsize=2)
def pickle_state(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch_load_weights(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; download it or fix the path") from None
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({short_error(err)}); "
                              f"re-download it or convert it to safetensors") from None
    obj = unwrap_state_dict(obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """Open a `.pth` state dict safely (`weights_only=True`, memory-mapped) or a `.safetensors` file.

    `what` names the model in errors ("the umT5 text encoder"), `fix` is the remedy to print.
    Any failure becomes one-line `CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found ({what}); {fix}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty ({what}); {fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        else:
            sd = torch_load_weights(path)
    except CheckpointError:
        raise
    except Exception as e:  # zipfile/pickle/EOF/unsupported-global errors all mean "not a readable state dict"
        detail = " ".join(str(e).split())[:160]
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: {detail}) — the file is "
            f"truncated or corrupt ({what}); {fix}"
        ) from None
    sd = unwrap_state_dict(sd)
    if not isinstance(sd, dict) or not sd or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CheckpointError(f"{path}: not a plain state dict of tensors ({what}); {fix}")
    return sd
