"""Reference-image size rule and pixel tensor against fixture image_preproc (LiveAvatar generate()).

Cases come from image_preproc/config.json: every row of ``size_table`` and every entry of
``examples``. The README states bit-exact reproduction with Pillow + numpy + torch, so the
tolerance is 0.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fixtures import reference_dir
from lowvram.conditioning.image import (
    center_crop,
    crop_plan,
    load_reference_image,
    max_area_for_size,
    read_image,
    resize_short_side,
    resized_size,
    target_size,
)
from lowvram.errors import InputError

FIXTURE = reference_dir() / "image_preproc"


def fixture_config():
    path = FIXTURE / "config.json"
    return json.loads(path.read_text()) if path.exists() else {"size_table": [], "examples": {}}


CONFIG = fixture_config()
ROWS = CONFIG["size_table"]
EXAMPLES = sorted(CONFIG["examples"])


def row_id(row):
    return f"{row['in_w']}x{row['in_h']}@{row['size']}"


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_size_table(row):
    assert max_area_for_size(row["size"]) == row["max_area"]
    h, w = target_size(row["in_h"], row["in_w"], row["max_area"])
    assert (w, h) == (row["out_w"], row["out_h"])
    assert h % 64 == 0 and w % 64 == 0 and h * w <= row["max_area"]
    assert resized_size(row["in_h"], row["in_w"], min(h, w)) == (row["resized_h"], row["resized_w"])
    plan = crop_plan(row["resized_h"], row["resized_w"], h, w)
    assert [plan["pad_left"], plan["pad_right"]] == row["pad_left_right"]
    assert [plan["pad_top"], plan["pad_bottom"]] == row["pad_top_bottom"]
    assert (plan["left"], plan["top"]) == (row["crop_left"], row["crop_top"])
    assert [h // 8, w // 8] == row["latent_hw"]
    assert (h // 16) * (w // 16) == row["tokens_per_latent_frame"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_bit_exact(name):
    ex = CONFIG["examples"][name]
    ref = load_file(str(FIXTURE / f"{name}.safetensors"))
    image = read_image(FIXTURE / f"{name}.png")
    np.testing.assert_array_equal(image, ref["image_uint8"])

    h, w = target_size(image.shape[0], image.shape[1], ex["max_area"])
    assert (w, h) == (ex["out_w"], ex["out_h"])
    resized = resize_short_side(image, min(h, w))
    np.testing.assert_array_equal(resized, ref["resized_uint8"])
    np.testing.assert_array_equal(center_crop(resized, h, w), ref["cropped_uint8"])

    pixels, hw = load_reference_image(FIXTURE / f"{name}.png", ex["max_area"])
    assert hw == (ex["out_h"], ex["out_w"])
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (1, 3, 1, h, w)
    expected = torch.from_numpy(ref["ref_pixel_values"])
    err = (pixels - expected).abs().max().item()
    print(f"{name}: ref_pixel_values max-abs {err}")
    assert err == 0.0
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_size_string_and_normalisation():
    assert max_area_for_size("704*384") == 704 * 384
    assert max_area_for_size("720x400") == 288000
    # value / 255 * 2 - 1 in float32 (== value / 127.5 - 1 for every uint8 value)
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    pixels = center_crop(values, 16, 16)
    from lowvram.conditioning.image import to_pixels

    got = to_pixels(pixels)[0, 0, 0].flatten()
    want = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    assert torch.equal(got, want)


def test_not_an_image(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture\n")
    with pytest.raises(InputError) as e:
        load_reference_image(bad, 270336)
    msg = str(e.value)
    assert "notes.png" in msg and "not a readable image" in msg and "\n" not in msg


def test_missing_and_truncated_image(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_reference_image(tmp_path / "missing.jpg", 270336)
    src = (FIXTURE / f"{EXAMPLES[0]}.png").read_bytes() if EXAMPLES else b"\x89PNG\r\n\x1a\n"
    cut = tmp_path / "cut.png"
    cut.write_bytes(src[: len(src) // 3])
    with pytest.raises(InputError, match="cut.png"):
        load_reference_image(cut, 270336)


def test_size_that_cannot_be_honoured(tmp_path):
    with pytest.raises(InputError, match="aspect ratio"):
        target_size(1, 100000, 8192)
    with pytest.raises(InputError, match="budget"):
        target_size(100, 100, 64 * 64 - 1)
    with pytest.raises(InputError, match="size"):
        max_area_for_size("big")
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("RGB", (4000, 1)).save(strip)
    with pytest.raises(InputError, match="strip.png"):
        load_reference_image(strip, 8192)
