"""Bad input is refused early with one line naming the problem and the fix, and no traceback (issue 19, items 4, 5).

Every check runs the CLI in a subprocess, as a user does. `run` gets a speech file that is not audio: audio is the
first thing conditioning reads, so a refusal that names the real problem was made before any compute (and a check
that goes missing fails in seconds instead of generating a video).
"""

import json
import shutil
import struct
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from lowvram.calibration.clips import MIN_CLIP_S


def lowvram(*args, prefix=(), timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "lowvram.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> str:
    """The process failed with exactly one `error: ...` line on stderr holding every needle; returns the line."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def not_audio(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "speech.wav"
    path.write_text("not a recording\n" * 100)
    return path


@pytest.fixture(scope="module")
def run_on(tiny_ckpt, not_audio):
    """`lowvram run MODEL_DIR -o OUT EXTRA...` with the tiny face and speech that is not audio, 128*128 on the CPU
    (a flag repeated in EXTRA overrides these)."""
    root, _ = tiny_ckpt

    def run(model_dir, out, *extra, prefix=()):
        return lowvram("run", model_dir, "--image", root / "face.png", "--audio", not_audio, "--prompt",
                       "a baker talks", "--size", "128*128", "--device", "cpu", "-o", out, *extra, prefix=prefix)
    return run


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, tmp_path_factory):
    """An fp8 folder of the tiny checkpoint (one synthetic calibration sample, no evaluation)."""
    from lowvram.calibration import synthetic_samples
    from lowvram.demo import demo_config
    from lowvram.quantize import QuantizeOptions, quantize_checkpoint

    root, lora = tiny_ckpt
    out = tmp_path_factory.mktemp("quantized") / "fp8"
    quantize_checkpoint(QuantizeOptions(ckpt=root, out=out, lora=lora, fmt="fp8", device="cpu", holdout=0,
                                        samples=synthetic_samples(demo_config(), 1, seed=0, blocks=1),
                                        evaluate=False, progress=False))
    return out


def edited_copy(folder, dest, edit):
    """A copy of a quantized folder whose manifest.json went through `edit(manifest)`."""
    shutil.copytree(folder, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


# ----- item 4: checked before any compute --------------------------------------------------------------------


def test_run_refuses_a_folder_as_its_output(run_on, tiny_ckpt, tmp_path):
    root, _ = tiny_ckpt
    one_line_error(run_on(root, tmp_path), "is a folder", str(tmp_path / "out.mp4"), code=2)


def private_tmpfs(folder, options: str, fill_kb: int = 0) -> tuple[str, ...]:
    """A command prefix that mounts a tmpfs at `folder` in a private user + mount namespace (gone with the
    process; no root needed), fills `fill_kb` of it, then runs the rest; skips where namespaces are not allowed."""
    folder.mkdir()
    fill = f' && head -c {fill_kb}k /dev/zero > "{folder}/fill"' if fill_kb else ""
    mount = ("unshare", "-Urm", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "{folder}"{fill} && exec "$@"', "sh")
    if shutil.which("unshare") is None or subprocess.run([*mount, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a private tmpfs here (no unshare or no user namespaces)")
    return mount


@pytest.mark.parametrize("kind,options,fill_kb,needles", [
    ("read-only", "size=1m,ro", 0, ("cannot write in", "choose a writable folder")),
    ("full", "size=64k", 60, ("MB free", "free some space")),
])
def test_run_refuses_an_output_it_cannot_write(kind, options, fill_kb, needles, run_on, tiny_ckpt, tmp_path):
    root, _ = tiny_ckpt
    disk = tmp_path / "disk"
    prefix = private_tmpfs(disk, options, fill_kb)
    one_line_error(run_on(root, disk / "out.mp4", prefix=prefix), str(disk), *needles, code=2)


@pytest.mark.parametrize("flag,value,needle", [
    ("--tp", "-1", "at least 1"), ("--tp", "0", "at least 1"),
    ("--pp", "-1", "between 1 and the model's 4 layers"), ("--pp", "0", "between 1 and the model's 4 layers"),
])
def test_run_refuses_a_layout_override_below_one(flag, value, needle, run_on, tiny_ckpt, tmp_path):
    one_line_error(run_on(tiny_ckpt[0], tmp_path / "x.mp4", flag, value), f"{flag} {value}", needle, code=2)


@pytest.mark.parametrize("flag,value,needle", [
    ("--seconds", "nan", "positive number"), ("--seconds", "inf", "positive number"),
    ("--gpus", "0x24", "at least one GPU"), ("--gpus", "-1x24", "at least one GPU"),
    ("--gpus", "1000x24", "at most 16"),
    ("--device", "tpu", "auto, cuda, cpu"), ("--t5-device", "banana", "cpu, cuda or cuda:N"),
])
def test_run_refuses_a_bad_value_in_one_line(flag, value, needle, run_on, tiny_ckpt, tmp_path):
    one_line_error(run_on(tiny_ckpt[0], tmp_path / "x.mp4", flag, value), f"{flag} {value}", needle, code=2)


@pytest.mark.parametrize("flag,value,choices", [("--format", "int3", "bf16, fp8, int8, int4"),
                                                ("--link", "usb", "pcie, nvlink")])
def test_plan_refuses_an_unknown_choice_naming_the_valid_ones(flag, value, choices, tiny_ckpt):
    root, _ = tiny_ckpt
    one_line_error(lowvram("plan", root, flag, value), f"{flag} {value}", choices, code=2)


def claim_int8_format(m):
    m["format"] = "int8"


def claim_int8_layers(m):
    claim_int8_format(m)
    m["recipe"] = {name: "int8" if fmt == "fp8" else fmt for name, fmt in m["recipe"].items()}


@pytest.mark.parametrize("edit", [claim_int8_format, claim_int8_layers], ids=["format", "format-and-recipe"])
def test_a_manifest_that_disagrees_with_its_files_is_refused_at_load(edit, quantized, run_on, tmp_path):
    folder = edited_copy(quantized, tmp_path / "q", edit)
    one_line_error(run_on(folder, tmp_path / "x.mp4"), "int8", "does not match its files", "re-run `lowvram quantize`",
                   code=2)


def test_overlapping_tensors_in_a_safetensors_file_are_refused(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    one_line_error(lowvram("inspect", path), str(path), "'a' (bytes 0..16) and 'b' (8..24) overlap", "re-download",
                   code=2)


def test_calib_make_refuses_a_clip_quantize_would_reject(tiny_ckpt, tmp_path):
    root, _ = tiny_ckpt
    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as f:  # 10 ms
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes(np.zeros(160, dtype="<i2").tobytes())
    one_line_error(lowvram("calib", "make", "--image", root / "face.png", "--audio", short, "--prompt", "a baker",
                           "--out", tmp_path / "clips"), str(short), "0.01 s", f"at least {MIN_CLIP_S} s", code=2)
    assert not (tmp_path / "clips").exists()


def test_a_cpu_run_needing_more_ram_than_the_machine_has_is_refused(run_on, tiny_ckpt, tmp_path):
    """The issue's case: a 4000x3000 photo at --size 100000*100000 grew to 15.5 GB RSS (it would need ~300 GiB)."""
    from PIL import Image

    from lowvram.plan import GiB, available_ram

    if (available_ram() or 0) > 250 * GiB:
        pytest.skip("this machine may have the RAM for it")
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (200, 160, 140)).save(photo)
    r = run_on(tiny_ckpt[0], tmp_path / "x.mp4", "--image", photo, "--size", "100000*100000")
    one_line_error(r, "--size 100000*100000", "GiB of RAM", "use a smaller --size", code=3)


# ----- item 5: messages that say what is wrong and what to do ----------------------------------------------------


def test_inspect_describes_a_quantized_folder(quantized, tiny_ckpt, tmp_path):
    root, lora = tiny_ckpt
    r = lowvram("inspect", quantized)
    assert r.returncode == 0, r.stderr
    for needle in ("quantized folder", "fp8", "split for --tp 1", "all OK", str(root), "5 files"):
        assert needle in r.stdout, (needle, r.stdout)
    report = json.loads(lowvram("inspect", quantized, "--json").stdout)
    assert report["kind"] == "quantized" and report["format"] == "fp8" and report["tp"] == 1
    assert report["checksums_ok"] and report["source"] == {"path": str(root), "lora": str(lora)}
    assert {f["name"] for f in report["files"]} == {"nonblock.safetensors"} | {f"block_00{i}.safetensors"
                                                                                for i in range(4)}
    tampered = tmp_path / "q"
    shutil.copytree(quantized, tampered)
    data = bytearray((tampered / "block_002.safetensors").read_bytes())
    data[-5] ^= 1
    (tampered / "block_002.safetensors").write_bytes(bytes(data))
    r = lowvram("inspect", tampered)
    one_line_error(r, "block_002.safetensors", "sha256", "re-run `lowvram quantize`", code=2)
    assert "1 bad" in r.stdout


def test_a_pickle_is_refused_without_advising_a_flag_the_command_lacks(run_on, tiny_ckpt, tmp_path):
    root, _ = tiny_ckpt
    pickled = tmp_path / "ckpt"
    pickled.mkdir()
    shutil.copy(root / "config.json", pickled)
    torch.save({"patch_embedding.bias": torch.zeros(3)}, pickled / "diffusion_pytorch_model.pth")
    lora = tmp_path / "liveavatar.pt"
    torch.save({"x": torch.zeros(2)}, lora)
    quantize = lowvram("quantize", pickled, "--calib", tmp_path, "--out", tmp_path / "q", "--device", "cpu")
    run = run_on(root, tmp_path / "x.mp4", "--lora", lora)
    for r, name in ((quantize, "diffusion_pytorch_model.pth"), (run, "liveavatar.pt")):
        line = one_line_error(r, name, "pickle", ".safetensors", code=2)
        assert "allow-pickle" not in line and "allow_pickle" not in line


def test_a_tp_the_model_does_not_split_into_lists_the_ones_it_does(quantized, run_on, tiny_ckpt, tmp_path):
    needle = "the model's 4 heads and FFN width 256 split only into tp 1, 2, 4"
    for r in (run_on(quantized, tmp_path / "x.mp4", "--tp", "3"), run_on(tiny_ckpt[0], tmp_path / "x.mp4", "--tp", "3"),
              lowvram("reshard", quantized, "--tp", "3", "--out", tmp_path / "tp3")):
        assert "reshard" not in one_line_error(r, "--tp 3", needle, code=2)
    # a tp the model does split into, but the folder is not split for: that is what reshard is for
    one_line_error(run_on(quantized, tmp_path / "x.mp4", "--tp", "2"),
                   f"split for --tp 1, asked for tp 2; run `lowvram reshard {quantized} --tp 2`", code=2)


def test_a_manifest_without_its_nonblock_entry_says_the_folder_is_incomplete(quantized, run_on, tmp_path):
    folder = edited_copy(quantized, tmp_path / "q", lambda m: m["files"].pop("nonblock.safetensors"))
    line = one_line_error(run_on(folder, tmp_path / "x.mp4"), "nonblock.safetensors", "incomplete",
                          "re-run `lowvram quantize`", code=2)
    assert "reshard" not in line


@pytest.mark.parametrize("header", [
    b'{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}',  # json.loads takes Infinity
    b"[" * 200_000 + b"]" * 200_000,  # deeper than the JSON decoder recurses
], ids=["shape-infinity", "200k-deep"])
def test_a_crafted_safetensors_header_is_one_line(header, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "inspect", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt safetensors header" in lines[0] and "re-download" in lines[0], lines


def test_quantize_refuses_an_unknown_device_in_one_line(tiny_ckpt, tmp_path):
    root, _ = tiny_ckpt
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "quantize", str(root), "--out", str(tmp_path / "q"),
                        "--calib", str(root), "--device", "tpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["error: --device tpu: use auto, cuda, cuda:N or cpu"]
