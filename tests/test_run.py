"""`lowvram run` end to end on a tiny real-layout checkpoint: mp4 with audio, layouts agree, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowvram.media import read_video_info


def lowvram(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "lowvram.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def run_args(root, lora, out, *extra):
    return ("run", root, "--image", root / "face.png", "--audio", root / "speech.wav", "--prompt", "a baker talks",
            "--lora", lora, "--size", "128*128", "--device", "cpu", "--seconds", "1", "-o", out, "--json", *extra)


@pytest.fixture(scope="module")
def single_run(tiny_ckpt, tmp_path_factory):
    root, lora = tiny_ckpt
    out = tmp_path_factory.mktemp("out")
    r = lowvram(*run_args(root, lora, out / "a.mp4", "--latents", out / "a.safetensors"))
    assert r.returncode == 0, r.stderr
    return out


def test_run_writes_an_mp4_with_audio(single_run):
    info = read_video_info(single_run / "a.mp4")
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert info.num_frames == 9 + 12 + 12  # 3 blocks for 1 s; the first block keeps 9 frames after the warm-up
    assert abs(info.audio_duration - info.num_frames / 25) <= 1 / 25 + 1e-6
    latents = load_file(single_run / "a.safetensors")
    assert sorted(latents) == ["block_00000", "block_00001", "block_00002"]
    assert all(torch.isfinite(t).all() for t in latents.values())


def test_pipeline_workers_give_the_same_latents(tiny_ckpt, single_run):
    root, lora = tiny_ckpt
    r = lowvram(*run_args(root, lora, single_run / "b.mp4", "--latents", single_run / "b.safetensors", "--pp", "2"))
    assert r.returncode == 0, r.stderr
    a, b = load_file(single_run / "a.safetensors"), load_file(single_run / "b.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    timing = summary["stage_timing"]  # each stage's busy time per block
    assert sorted(timing) == ["0", "1"]
    for t in timing.values():
        assert t["blocks"] == 3 and 0 <= t["wait_s"] <= t["loop_s"] and t["busy_s_per_block"] > 0
        assert abs(t["busy_s"] - (t["loop_s"] - t["wait_s"])) < 1e-3
    info = read_video_info(single_run / "b.mp4")
    assert info.num_frames == 33 and info.audio_codec == "aac"
    # each worker built the stage of the one layout it was handed: the split `lowvram plan` prints for tp1xpp2
    printed = json.loads(lowvram("plan", root, "--gpus", "2x24", "--size", "128*128", "--format", "bf16", "--json").stdout)
    stages = next(row["stages"] for row in printed["layouts"] if row["name"] == "tp1xpp2")
    assert summary["layout"] == "tp1xpp2" and summary["stages"] == stages
    assert summary["rank_layers"] == {"0": stages[0], "1": stages[1]}


@pytest.mark.parametrize("change,needle", [
    ({"--image": "missing.png"}, "no such file"),
    ({"--audio": "face.png"}, "audio"),
    ({"--image": "speech.wav"}, "image"),
    ({"--size": "100*abc"}, "size"),
])
def test_bad_input_is_one_line(tiny_ckpt, tmp_path, change, needle):
    root, lora = tiny_ckpt
    args = list(run_args(root, lora, tmp_path / "x.mp4"))
    for flag, value in change.items():
        args[args.index(flag) + 1] = root / value if "." in value else value
    r = lowvram(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0].lower(), r.stderr


def test_external_torchrun_gives_the_same_latents(tiny_ckpt, single_run):
    root, lora = tiny_ckpt
    args = run_args(root, lora, single_run / "c.mp4", "--latents", single_run / "c.safetensors", "--pp", "2")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "lowvram.cli", *map(str, args)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    a, c = load_file(single_run / "a.safetensors"), load_file(single_run / "c.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-4
    assert read_video_info(single_run / "c.mp4").num_frames == 33


def test_a_rank_killed_mid_run_leaves_a_playable_mp4(tiny_ckpt, tmp_path):
    import os

    root, lora = tiny_ckpt
    out = tmp_path / "killed.mp4"
    env = dict(os.environ, LOWVRAM_TEST_KILL_RANK="1:9")  # rank 1 dies one item into block 2 (blocks 0, 1 done)
    args = [a for a in run_args(root, lora, out, "--pp", "2") if a != "--json"]
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=240, env=env)
    assert r.returncode == 4, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 died (killed by SIGKILL)") and "Traceback" not in r.stderr
    partial = out.with_name("killed.partial.mp4")
    assert f"2 of 3 blocks (21 frames) kept in {partial}, playable" in last
    info = read_video_info(partial)
    assert info.num_frames == 9 + 12 and info.audio_codec == "aac"  # blocks 0 and 1 were decoded and kept
    assert not out.exists()  # only a finished run takes the target name


def test_compile_without_triton_warns_once_and_runs_uncompiled(monkeypatch, capsys):
    import torch.utils._triton

    from lowvram.model import dit
    from lowvram.parallel.worker import compile_layers

    calls = []
    monkeypatch.setattr(dit, "compile_model", lambda: calls.append(1))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert compile_layers("cuda", warn=True) is False and not calls
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Triton" in err[0] and "--no-compile" in err[0]
    assert compile_layers("cuda", warn=False) is False and capsys.readouterr().err == ""  # other ranks: silent
    assert compile_layers("cpu", warn=True) is False and capsys.readouterr().err == ""  # CPU: never compiled
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert compile_layers("cuda", warn=True) is True and calls == [1]
