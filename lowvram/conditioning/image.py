"""Reference image -> output size and the ``[1, 3, 1, H, W]`` pixel tensor in [-1, 1].

Follows LiveAvatar's ``generate()`` (see tests/reference/image_preproc/README.md):

* ``--size`` such as ``704*384`` only selects a pixel-area budget (``max_area = 704 * 384``); the
  output height/width come from the reference image (:func:`target_size`), always multiples of 64
  and never above the budget.
* The image is read with Pillow (``convert("RGB")``, no EXIF rotation), the shorter side is resized
  to ``min(H, W)`` with Pillow's BILINEAR filter (the same call torchvision makes on PIL images, so
  the result is bit-exact), centre-padded with black / centre-cropped to ``H x W``, divided by 255
  and mapped to ``[-1, 1]`` with ``* 2 - 1`` in float32.

Only Pillow, numpy and torch are used (no torchvision).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from lowvram.errors import InputError

DIVISOR = 64


def max_area_for_size(size: str) -> int:
    """``"704*384"`` -> 270336: the pixel-area budget that ``--size`` selects (``W*H`` of the string)."""
    parts = str(size).lower().replace("x", "*").split("*")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"size {size!r}: expected two integers like 704*384; pass --size W*H") from None
    if a <= 0 or b <= 0:
        raise InputError(f"size {size!r}: both sides must be positive; pass --size W*H such as 704*384")
    return a * b


def _round_up(n: int, divisor: int) -> int:
    return n + (divisor - n % divisor) % divisor


def target_size(img_h: int, img_w: int, max_area: int, divisor: int = DIVISOR) -> tuple[int, int]:
    """Output ``(H, W)`` for an ``img_h x img_w`` image under the pixel-area budget ``max_area``.

    Upstream ``get_size_less_than_area(h, w, target_area=max_area, divisor=64)``: scan 100 scales from
    the largest that keeps the area (or 1.0 for small images) downwards, truncate, round each side up
    to a multiple of ``divisor`` and take the first whose area fits. Raises :class:`InputError` when
    no positive size fits.
    """
    h, w = int(img_h), int(img_w)
    if h <= 0 or w <= 0:
        raise InputError(f"image size {w}x{h}: width and height must be positive; use a real image")
    if max_area < divisor * divisor:
        raise InputError(
            f"area budget {max_area} is smaller than one {divisor}x{divisor} tile; pass a larger --size such as 704*384"
        )
    if h * w <= max_area:
        max_scale = 1.0
        min_scale = 0.1
    else:
        max_scale = math.sqrt(max_area / (h * w))
        a = h * w
        b = (divisor - 1) * (h + w)
        c = (divisor - 1) ** 2 - max_area
        min_scale = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)

    out = None
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        nh = _round_up(int(h * scale), divisor)
        nw = _round_up(int(w * scale), divisor)
        if nh * nw <= max_area:
            out = (nh, nw)
            break
    if out is None:
        out_w = math.floor(math.sqrt(max_area * w / h) / divisor) * divisor
        out_h = math.floor(math.sqrt(max_area * h / w) / divisor) * divisor
        if out_w >= w or out_h >= h:
            out_w = w // divisor * divisor
            out_h = h // divisor * divisor
        out = (out_h, out_w)
    if out[0] <= 0 or out[1] <= 0:
        raise InputError(
            f"image size {w}x{h}: its aspect ratio is too extreme for the area budget {max_area} "
            f"(a side would be 0 pixels); crop the image closer to the output shape or pass a larger --size"
        )
    return out


def resized_size(img_h: int, img_w: int, short: int) -> tuple[int, int]:
    """``(h, w)`` after torchvision-style ``Resize(short)``: shorter side -> ``short``, longer truncated."""
    if img_w <= img_h:
        return int(short * img_h / img_w), short
    return short, int(short * img_w / img_h)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image as uint8 ``[h, w, 3]`` RGB (``PIL.Image.open(path).convert("RGB")``, no EXIF rotation)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: image file not found; pass an existing .jpg/.png reference image")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an image; pass a .jpg/.png reference image file")
    try:
        with Image.open(p) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise InputError(f"{p}: not a readable image (Pillow cannot identify it); pass a .jpg/.png reference image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{p}: cannot decode the image ({type(e).__name__}: {e}); re-save it as PNG or JPEG") from None
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{p}: image has no pixels; pass a real reference image")
    return np.ascontiguousarray(arr)


def resize_short_side(image: np.ndarray, short: int) -> np.ndarray:
    """Shorter side -> ``short`` with Pillow BILINEAR (antialiased); unchanged if already that size."""
    from PIL import Image

    h, w = image.shape[:2]
    nh, nw = resized_size(h, w, short)
    if (nh, nw) == (h, w):
        return image
    out = Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def crop_plan(h: int, w: int, out_h: int, out_w: int) -> dict[str, int]:
    """torchvision ``CenterCrop`` geometry for an ``h x w`` image: black padding, then the cut's corner.

    Padding (only where the image is smaller): ``(out - size) // 2`` before, the rest after. Cut:
    ``top = round((h' - out_h) / 2)``, ``left = round((w' - out_w) / 2)`` on the padded size, with
    Python's ``round`` (halves to even: 4.5 -> 4).
    """
    pad_top = (out_h - h) // 2 if out_h > h else 0
    pad_bottom = (out_h - h + 1) // 2 if out_h > h else 0
    pad_left = (out_w - w) // 2 if out_w > w else 0
    pad_right = (out_w - w + 1) // 2 if out_w > w else 0
    ph, pw = h + pad_top + pad_bottom, w + pad_left + pad_right
    return {"pad_top": pad_top, "pad_bottom": pad_bottom, "pad_left": pad_left, "pad_right": pad_right,
            "top": int(round((ph - out_h) / 2.0)), "left": int(round((pw - out_w) / 2.0))}


def center_crop(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torchvision ``CenterCrop``: pad with black if smaller, then cut at the rounded centre (:func:`crop_plan`)."""
    plan = crop_plan(image.shape[0], image.shape[1], out_h, out_w)
    if plan["pad_top"] or plan["pad_bottom"] or plan["pad_left"] or plan["pad_right"]:
        image = np.pad(image, ((plan["pad_top"], plan["pad_bottom"]), (plan["pad_left"], plan["pad_right"]), (0, 0)))
    top, left = plan["top"], plan["left"]
    return np.ascontiguousarray(image[top : top + out_h, left : left + out_w])


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[1, 3, 1, H, W]`` in [-1, 1] (``value / 255 * 2 - 1`` in float32)."""
    t = torch.from_numpy(np.array(image, dtype=np.uint8, order="C", copy=True)).permute(2, 0, 1).contiguous()
    t = t.to(torch.float32).div(255)
    t = t * 2 - 1
    return t.unsqueeze(1).unsqueeze(0)


def preprocess_image(image: np.ndarray, out_h: int, out_w: int) -> torch.Tensor:
    """Resize (shorter side -> ``min(H, W)``), centre pad/crop and normalise a uint8 RGB array."""
    resized = resize_short_side(image, min(out_h, out_w))
    return to_pixels(center_crop(resized, out_h, out_w))


def load_reference_image(path: str | os.PathLike, max_area: int | str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read the reference image and return (pixels float32 ``[1, 3, 1, H, W]`` in [-1, 1], ``(H, W)``).

    ``max_area`` is the pixel-area budget (an int) or a size string such as ``"704*384"``.
    """
    if isinstance(max_area, str):
        max_area = max_area_for_size(max_area)
    image = read_image(path)
    try:
        out_h, out_w = target_size(image.shape[0], image.shape[1], int(max_area))
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    return preprocess_image(image, out_h, out_w), (out_h, out_w)
