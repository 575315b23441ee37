"""Weight files of the scoring networks: a given path, an environment variable, or the torch hub cache; never a
download. Missing or unreadable files are an InputError that says where to put them."""

from __future__ import annotations

import os
from pathlib import Path

from lowvram.errors import InputError


def hub_checkpoints_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(given: str | os.PathLike | None, env: str, names: list[str], what: str, origin: str,
                 flag: str) -> Path:
    """The weight file to use, or an InputError that says where to put it."""
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise InputError(f"{p}: {what} weights not found (from {flag}); pass the path of {names[0]}")
        return p
    if os.environ.get(env):
        p = Path(os.environ[env]).expanduser()
        if not p.is_file():
            raise InputError(f"{p}: {what} weights not found (from ${env}); point it at {names[0]}")
        return p
    hub = hub_checkpoints_dir()
    for name in names:
        for p in sorted(hub.glob(name)):
            if p.is_file():
                return p
    raise InputError(f"{what} needs {names[0]} ({origin}), which is not on this machine and is never downloaded "
                     f"by lowvram; put it at {hub / names[0]} or pass {flag} FILE (or set ${env})")


def load_state_dict(path: Path, what: str) -> dict:
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"{path}: not a readable {what} weight file ({type(err).__name__}: {str(err)[:100]})") \
            from None
    if hasattr(sd, "state_dict") and not isinstance(sd, dict):
        sd = sd.state_dict()
    for key in ("state_dict", "model", "net"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InputError(f"{path}: not a {what} state dict")
    return sd


def load_into(model, sd: dict, path: Path, what: str, strip: tuple[str, ...] = ()) -> None:
    """Copy sd into model; every parameter and buffer (except BN step counters) must be there with its shape."""
    clean = {}
    for k, v in sd.items():
        for prefix in strip:
            k = k.removeprefix(prefix)
        clean[k] = v
    own = model.state_dict()
    missing = [k for k in own if k not in clean and not k.endswith("num_batches_tracked")]
    bad = [k for k in own if k in clean and tuple(clean[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        detail = f"missing {missing[:3]}" if missing else f"shape of {bad[0]} is {tuple(clean[bad[0]].shape)}, " \
                                                            f"expected {tuple(own[bad[0]].shape)}"
        raise InputError(f"{path}: not {what} weights ({detail})")
    model.load_state_dict({k: clean[k] for k in own if k in clean}, strict=False)

