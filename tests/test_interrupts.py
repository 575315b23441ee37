"""Nothing a user does loses a video or shows a traceback: the CLI's error handler against the installed typer,
Ctrl-C in `quantize` and `run` (one process and `--pp 2`), a full disk, and two processes writing one path.

Every CLI call runs in a subprocess as a user starts it, with SIGINT at its default (a test runner started in the
background inherits it ignored, and Python would then never raise KeyboardInterrupt)."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import typer

from lowvram.cli import report_failure
from lowvram.demo import speech_like_wave
from lowvram.media import VideoWriter, read_video_info
from lowvram.outputs import partial_path

EXIT_ENV = "LOWVRAM_QUANTIZE_EXIT_AFTER_BLOCK"


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, env=None):
    """`lowvram ARGS` in its own process group (as a terminal would run it), SIGINT at its default."""
    return subprocess.Popen([sys.executable, "-m", "lowvram.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_sigint,
                            env={**os.environ, **(env or {})})


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def lowvram(*args, env=None, timeout=240):
    return finish(start(*args, env=env), timeout)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:") or l == "interrupted"]
    assert len(lines) == 1, err
    return lines[0]


def wait_for(predicate, proc, timeout=180.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def frames_in(path: Path) -> int:
    try:
        return read_video_info(path).num_frames
    except Exception:  # noqa: BLE001 - not yet a decodable file
        return 0


def processes_tagged(tag: str) -> list[int]:
    """Live processes whose environment holds LOWVRAM_TEST_TAG=tag (the run and its workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"LOWVRAM_TEST_TAG={tag}".encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


# ----- the handler itself, against the installed typer ------------------------------------------------------

@pytest.mark.parametrize("err,code,needle", [
    (typer.Exit(3), 3, None),
    (typer.Abort(), 1, "aborted"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/talk.partial.mp4"), 1, "no space left"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/talk.mp4"), 1, "read-only"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp/x"), 1, "is a folder"),
    (ValueError("Expecting value: line 1 column 1 (char 0)"), 1, "LOWVRAM_DEBUG=1"),
    (__import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 60.00 MiB. GPU 0 ..."), 3,
     "CUDA out of memory while running"),
])
def test_report_failure_prints_one_line(capsys, err, code, needle):
    assert report_failure(err) == code
    lines = capsys.readouterr().err.strip().splitlines()
    if needle is None:
        assert lines == []
    else:
        assert len(lines) == 1 and needle in lines[0], lines


def test_usage_errors_of_the_installed_typer(tmp_path):
    code, _, err = lowvram("plan")  # missing argument: typer's own usage error
    assert code == 2 and "Usage" in err and "Traceback" not in err, err
    code, _, err = lowvram("run", tmp_path, "--image", tmp_path, "--audio", tmp_path, "--prompt", "x", "--seed", "x")
    assert code == 2 and "Traceback" not in err, err


def test_an_unexpected_error_is_one_line(tmp_path):
    bad = tmp_path / "q"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    code, _, err = lowvram("plan", bad)
    assert code != 0
    line = one_error_line(err)
    assert "manifest" in line or "LOWVRAM_DEBUG" in line, line


# ----- run: Ctrl-C, failures and concurrent runs never lose a video -----------------------------------------

@pytest.fixture(scope="module")
def model(tiny_ckpt, tmp_path_factory):
    """The shared tiny checkpoint with a longer speech: 16 blocks, time to be interrupted after the first one."""
    root, lora = tiny_ckpt
    speech = tmp_path_factory.mktemp("speech") / "speech.wav"
    speech_like_wave(speech, 6.0, seed=1)
    return root, lora, speech


def run_args(model, out, *extra):
    root, lora, speech = model
    return ("run", root, "--image", root / "face.png", "--audio", speech, "--prompt", "a baker talks",
            "--lora", lora, "--size", "128*128", "--device", "cpu", "-o", out, *extra)


def previous_video(path: Path) -> bytes:
    """A good video already at the output path (what a failed run must leave alone)."""
    with VideoWriter(path) as w:
        w.write(np.full((6, 64, 64, 3), 120, np.uint8))
    return path.read_bytes()


@pytest.mark.parametrize("layout", [(), ("--pp", "2")], ids=["one-process", "pp2"])
def test_ctrl_c_keeps_the_blocks_and_the_previous_video(model, tmp_path, layout):
    out = tmp_path / "talk.mp4"
    before = previous_video(out)
    tag = uuid.uuid4().hex
    proc = start(*run_args(model, out, *layout), env={"LOWVRAM_TEST_TAG": tag})
    wait_for(lambda: frames_in(partial_path(out)) > 0, proc, what="the first block in the mp4")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    code, _, err = finish(proc, timeout=120)
    line = one_error_line(err)
    assert code == 130, err
    assert line.startswith("error: interrupted; ") and f"kept in {partial_path(out)}, playable" in line, line
    assert f"{out} was left as it was" in line
    assert out.read_bytes() == before  # the previous video is untouched
    blocks = int(line.split("interrupted; ")[1].split(" of ")[0])
    info = read_video_info(partial_path(out))
    assert blocks >= 1 and info.num_frames == min(9 + 12 * (blocks - 1), 150) and info.audio_codec == "aac"
    time.sleep(0.5)
    assert processes_tagged(tag) == []  # no worker outlives the launcher
    assert not (tmp_path / "talk.mp4.lock").exists()


def test_a_second_run_on_the_same_output_is_refused_and_the_first_replaces_the_file(model, tmp_path):
    out = tmp_path / "talk.mp4"
    previous_video(out)
    first = start(*run_args(model, out, "--seconds", "1"))
    wait_for(lambda: (tmp_path / "talk.mp4.lock").exists(), first, what="the first run's lock")
    code, _, err = lowvram(*run_args(model, out, "--seconds", "1"))
    assert code == 2 and "another lowvram process (pid " in one_error_line(err) and "--output" in err, err
    code, stdout, err = finish(first)
    assert code == 0, err
    assert "(replaced the previous file)" in stdout
    assert read_video_info(out).num_frames == 25 and not partial_path(out).exists()


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 400 KiB tmpfs (root only); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_previous_video(model, tiny_disk):
    out = tiny_disk / "talk.mp4"
    before = previous_video(out)
    code, _, err = lowvram(*run_args(model, out))
    assert code == 1, err
    assert "no space left on the device" in one_error_line(err), err
    assert out.read_bytes() == before


# ----- quantize: Ctrl-C resumes, two runs into one folder ---------------------------------------------------

@pytest.fixture(scope="module")
def quant_inputs(tmp_path_factory):
    from lowvram.calibration import save_samples, synthetic_samples
    from lowvram.model.config import tiny
    from lowvram.synthetic import write_checkpoint

    cfg = tiny()
    ckpt = tmp_path_factory.mktemp("qckpt")
    write_checkpoint(ckpt, cfg, seed=0, shards=2, lora=True)
    calib = tmp_path_factory.mktemp("qcalib")
    save_samples(calib, synthetic_samples(cfg, 2, seed=0, blocks=1))
    return ckpt, calib


def quantize_args(quant_inputs, out):
    ckpt, calib = quant_inputs
    return ("quantize", ckpt, "--calib", calib, "--format", "int8", "--out", out, "--device", "cpu", "--quiet",
            "--no-eval")


def test_ctrl_c_in_quantize_says_how_to_resume(quant_inputs, tmp_path):
    out = tmp_path / "q"
    args = quantize_args(quant_inputs, out)
    code, _, err = lowvram(*args, env={EXIT_ENV: f"1:{int(signal.SIGINT)}", "OMP_NUM_THREADS": "1"})
    assert code == 130, err
    line = one_error_line(err)
    assert line.startswith("error: interrupted; ") and "run the same command to resume" in line, line
    assert (out / "block_001.safetensors").exists() and not (out / "manifest.json").exists()
    code, _, err = lowvram(*args, env={"OMP_NUM_THREADS": "1"})
    assert code == 0, err
    assert (out / "manifest.json").exists() and not (tmp_path / "q.lock").exists()


def test_a_second_quantize_into_the_same_folder_is_refused(quant_inputs, tmp_path):
    from lowvram.outputs import hold_lock, lock_path_for

    out = tmp_path / "q"
    with hold_lock(lock_path_for(out), "--out"):  # another process quantizing into it
        code, _, err = lowvram(*quantize_args(quant_inputs, out))
    assert code == 2 and f"--out {out}: another lowvram process (pid {os.getpid()})" in one_error_line(err), err
    assert not out.exists() or not any(out.iterdir())


def test_the_lock_is_exclusive_between_processes(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lowvram.outputs import hold_lock\n"
                               f"with hold_lock({str(lock)!r}, 'x'):\n print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from lowvram.errors import InputError
        from lowvram.outputs import hold_lock

        with pytest.raises(InputError, match=rf"pid {holder.pid}"):
            with hold_lock(lock, "x"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with hold_lock(lock, "x"):  # a dead holder's lock is free again
        assert lock.exists()
    assert not lock.exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
