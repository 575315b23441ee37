"""`lowvram run` end to end on a tiny real-layout checkpoint: mp4 with audio, layouts agree, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowvram.media import decode_frames, read_video_info


def lowvram(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "lowvram.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def run_args(root, lora, out, *extra, seconds="1"):
    length = ("--seconds", seconds) if seconds else ()
    return ("run", root, "--image", root / "face.png", "--audio", root / "speech.wav", "--prompt", "a baker talks",
            "--lora", lora, "--size", "128*128", "--device", "cpu", *length, "-o", out, "--json", "--crf", "10", *extra)


@pytest.fixture(scope="module")
def single_run(tiny_ckpt, tmp_path_factory):
    root, lora = tiny_ckpt
    out = tmp_path_factory.mktemp("out")
    r = lowvram(*run_args(root, lora, out / "a.mp4", "--latents", out / "a.safetensors"))
    assert r.returncode == 0, r.stderr
    (out / "a.json").write_text(r.stdout)
    return out


def test_run_json_has_the_start_up_timeline(single_run):
    summary = json.loads((single_run / "a.json").read_text().strip().splitlines()[-1])
    steps = summary["startup_s"]
    assert list(steps) == ["imports", "checks_and_plan", "audio_features", "vae_encode", "text_encoder",
                           "vae_decoder_ready", "dit_loaded", "first_frame"]
    times = list(steps.values())
    assert times == sorted(times) and times[0] > 0  # since the process started: Python's imports included
    in_run = summary["time_to_first_frame_s"]  # counted from the conditioning's start
    assert steps["first_frame"] - steps["checks_and_plan"] == pytest.approx(in_run, abs=0.05)


def test_run_writes_an_mp4_with_audio(single_run):
    info = read_video_info(single_run / "a.mp4")
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert info.num_frames == 25  # --seconds 1: 3 blocks (the first keeps 9 frames after the warm-up) cut to 25
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
    assert info.num_frames == 25 and info.audio_codec == "aac"
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
    ({"--seconds": "0"}, "--seconds"),
    ({"--crf": "60"}, "--crf"),
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


def test_the_video_ends_with_the_speech(tiny_ckpt, single_run, tmp_path):
    """No --seconds: 1.6 s of speech -> 40 frames (upstream muxes with -shortest), from the blocks that cover them
    (1 + ceil(31/12) = 5, not the whole 48-frame clip's 4 blocks + padding); those frames equal the 1 s run's."""
    root, lora = tiny_ckpt
    r = lowvram(*run_args(root, lora, tmp_path / "all.mp4", "--latents", tmp_path / "all.safetensors", seconds=None))
    assert r.returncode == 0, r.stderr
    info = read_video_info(tmp_path / "all.mp4")
    assert info.num_frames == 40 and abs(info.audio_duration - 1.6) <= 1 / 25
    latents = load_file(tmp_path / "all.safetensors")
    assert len(latents) == 4  # frames 0-39 need blocks 0-3 (9 + 12 + 12 + 12 = 45 >= 40)
    short = load_file(single_run / "a.safetensors")
    assert all(torch.equal(latents[k], short[k]) for k in short)  # causal: a longer run starts the same
    frames_all, frames_short = decode_frames(tmp_path / "all.mp4"), decode_frames(single_run / "a.mp4")
    assert frames_all.shape[0] == 40 and frames_short.shape[0] == 25


def test_num_clip_caps_the_length_at_whole_clips(tiny_ckpt, tmp_path):
    root, lora = tiny_ckpt
    r = lowvram(*run_args(root, lora, tmp_path / "one.mp4", "--num-clip", "1", seconds=None))
    assert r.returncode == 0, r.stderr
    assert read_video_info(tmp_path / "one.mp4").num_frames == 40  # one clip is 45 frames; the speech ends first
    both = lowvram(*run_args(root, lora, tmp_path / "x.mp4", "--num-clip", "1"))  # with --seconds 1
    assert both.returncode == 2 and "pass one of them" in both.stderr


def test_a_pose_video_conditions_the_stream(tiny_ckpt, single_run, tmp_path):
    import numpy as np

    from lowvram.media import VideoWriter

    root, lora = tiny_ckpt
    with VideoWriter(tmp_path / "pose.mp4", fps=25) as v:  # a white bar sweeping over black
        v.write(np.stack([np.pad(np.full((128, 8, 3), 255, np.uint8), ((0, 0), (4 * i, 120 - 4 * i), (0, 0)))
                          for i in range(30)]))
    r = lowvram(*run_args(root, lora, tmp_path / "posed.mp4", "--latents", tmp_path / "posed.safetensors",
                          "--pose-video", tmp_path / "pose.mp4"))
    assert r.returncode == 0, r.stderr
    posed, plain = load_file(tmp_path / "posed.safetensors"), load_file(single_run / "a.safetensors")
    assert sorted(posed) == sorted(plain) and all((posed[k] - plain[k]).abs().max() > 1e-3 for k in plain)
    assert read_video_info(tmp_path / "posed.mp4").num_frames == 25
    (tmp_path / "notes.mp4").write_text("not a video")
    bad = lowvram(*run_args(root, lora, tmp_path / "x.mp4", "--pose-video", tmp_path / "notes.mp4"))
    assert bad.returncode == 2 and "--pose-video" in bad.stderr.strip().splitlines()[-1]


def test_frames_are_converted_and_encoded_as_upstream(single_run):
    from lowvram.media import video_uint8

    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 7)  # [C, T, H, W]
    assert video_uint8(x).flatten().tolist() == [0, 0, 63, 127, 254, 255, 255]  # truncated: 0 -> 127, not 128
    sei = (single_run / "a.mp4").read_bytes()  # x264 writes its settings into the stream
    assert b"crf=10.0" in sei and b"subme=7" in sei  # --crf 10; subme 7 is preset medium's


def test_external_torchrun_gives_the_same_latents(tiny_ckpt, single_run):
    root, lora = tiny_ckpt
    args = run_args(root, lora, single_run / "c.mp4", "--latents", single_run / "c.safetensors", "--pp", "2")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "lowvram.cli", *map(str, args)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    a, c = load_file(single_run / "a.safetensors"), load_file(single_run / "c.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-4
    assert read_video_info(single_run / "c.mp4").num_frames == 25


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
