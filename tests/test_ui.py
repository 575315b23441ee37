"""`lowvram ui` served on localhost on the tiny model: jobs over the HTTP API (gradio_client) and through the page in
headless Chromium; the streamed and final videos decode with audio; the second job reuses the loaded model; bad
input gets the CLI's one line; cancel keeps the blocks written; the server keeps serving."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lowvram.media import read_video_info

gradio_client = pytest.importorskip("gradio_client", reason="the ui extra is not installed: pip install 'lowvram[ui]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIZE, SECONDS = "64*64", 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    from lowvram.demo import speech_like_wave

    root, _ = tiny_ckpt
    folder = tmp_path_factory.mktemp("ui")
    speech_like_wave(folder / "long.wav", 6.0, seed=3)
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lowvram.cli", "ui", str(root), "--port", str(port), "--out",
                             str(folder / "out")], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(1)
    yield {"url": url, "root": root, "folder": folder, "proc": proc}
    proc.terminate()
    proc.wait(30)
    log.close()


def client(server):
    return gradio_client.Client(server["url"], verbose=False)


def api_job(server, image=None, audio=None, model=None, seconds=SECONDS, prompt="a baker talks"):
    root = server["root"]
    return client(server).submit(gradio_client.handle_file(str(image or root / "face.png")),
                                 gradio_client.handle_file(str(audio or root / "speech.wav")), prompt, SIZE, seconds,
                                 0, "tpp", "bf16", str(model or root), "", api_name="/generate")


def first_block_s(status: str) -> float:
    return float(re.search(r"first block after ([\d.]+) s", status).group(1))


def test_ui_without_gradio_says_how_to_install(tmp_path):
    code = "import sys; sys.modules['gradio'] = None; sys.argv = ['lowvram', 'ui']; from lowvram.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "pip install 'lowvram[ui]'" in lines[0], r.stderr


def test_api_job_streams_the_video_and_the_second_job_reuses_the_model(server):
    job = api_job(server)
    outputs = list(job)
    final = job.result()
    done = re.match(rf"job {final[0]}: done: (\d+) frames \((\d+) blocks\)", final[1])
    assert done and int(done.group(2)) == 3, final[1]  # 1 s of video: 3 blocks
    frames = int(done.group(1))
    streamed = [o[2] for o in outputs if "block" in o[1] and "done" not in o[1] and o[2]]
    assert streamed, [o[1] for o in outputs]
    first = read_video_info(streamed[0])  # the growing mp4 after its first block: playable, with audio
    assert first.video_codec == "h264" and first.audio_codec == "aac" and 0 < first.num_frames < frames
    info = read_video_info(final[3])
    assert (info.video_codec, info.audio_codec, info.num_frames) == ("h264", "aac", frames)
    assert abs(info.audio_duration - info.num_frames / 25) <= 1 / 25 + 1e-6
    assert "reused: nothing" in final[1]

    again = api_job(server).result()
    assert "reused: decoder, dit, image, prompt" in again[1], again[1]
    assert read_video_info(again[3]).num_frames == frames
    server["startup"] = (first_block_s(final[1]), first_block_s(again[1]))
    print(f"first block after {server['startup'][0]} s (cold) and {server['startup'][1]} s (model loaded)")


def test_bad_input_gets_the_cli_line_and_the_server_keeps_serving(server, tmp_path):
    root = server["root"]
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    cli = subprocess.run([sys.executable, "-m", "lowvram.cli", "run", str(not_a_model), "--image",
                          str(root / "face.png"), "--audio", str(root / "speech.wav"), "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    cli_line = cli.stderr.strip().splitlines()[-1]
    assert cli_line.startswith("error: ") and "neither a quantized folder" in cli_line
    with pytest.raises(Exception) as err:
        api_job(server, model=not_a_model).result()
    assert cli_line in str(err.value)
    with pytest.raises(Exception) as err:
        api_job(server, image=root / "speech.wav").result()
    assert "not a readable image" in str(err.value)
    with pytest.raises(Exception) as err:
        api_job(server, audio=root / "face.png").result()
    assert "face.png: has no audio stream" in str(err.value)
    assert "done" in api_job(server, prompt="a baker talks again").result()[1]  # still serving


def test_cancel_stops_at_the_next_block_and_keeps_what_was_written(server):
    job = api_job(server, audio=server["folder"] / "long.wav", seconds=6)
    c = client(server)
    while not job.done():
        out = job.outputs()[-1] if job.outputs() else None
        if out and "block 1/" in out[1]:
            c.predict(out[0], api_name="/cancel")
            break
        time.sleep(0.2)
    status = job.result()[1]
    m = re.search(r"cancelled after block (\d+) of (\d+); (\d+) of \2 blocks \((\d+) frames\) kept in (\S+), playable",
                  status)
    assert m, status
    kept, total, frames = int(m.group(3)), int(m.group(2)), int(m.group(4))
    assert 1 <= kept < total
    info = read_video_info(m.group(5))
    assert info.audio_codec == "aac" and info.num_frames >= frames - 2  # the last 2 frames wait for the next block


def worker_pid(server_pid: int) -> int:
    """The server's job worker: its spawned child running the session (not multiprocessing's resource tracker)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"no worker process under {server_pid}")


def test_a_job_that_kills_the_worker_fails_in_one_line_and_the_next_job_runs(server):
    job = api_job(server, audio=server["folder"] / "long.wav", seconds=6)
    while not (job.outputs() and "block 1/" in job.outputs()[-1][1]):
        assert not job.done(), job.result()
        time.sleep(0.2)
    os.kill(worker_pid(server["proc"].pid), signal.SIGKILL)  # as the kernel's OOM killer would
    with pytest.raises(Exception) as err:
        job.result()
    assert "error: the worker process died (killed by signal 9" in str(err.value)
    after = api_job(server).result()[1]
    assert "done: " in after and "reused: nothing" in after  # a new worker, the model loaded again


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install -y chromium)")
def test_the_page_in_chromium_before_during_and_after_a_run(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("LOWVRAM_UI_SHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    root = server["root"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server["url"])
        expect(page.locator("#plan")).to_contain_text("layout tp1xpp1", timeout=60_000)
        expect(page.get_by_role("button", name="Generate")).to_be_visible()
        page.screenshot(path=str(shots / "ui-before.png"), full_page=True)

        page.locator("#image input[type=file]").set_input_files(str(root / "face.png"))
        page.locator("#audio input[type=file]").set_input_files(str(server["folder"] / "long.wav"))
        page.locator("#prompt textarea").fill("a person talks warmly in a bright kitchen")
        size = page.locator("#size input")
        size.fill(SIZE)
        size.press("Enter")
        page.locator("#seconds input").fill("3")
        expect(page.locator("#plan")).to_contain_text(SIZE, timeout=30_000)
        page.get_by_role("button", name="Generate").click()

        expect(page.locator("#status")).to_contain_text("block 2/", timeout=300_000)
        expect(page.locator("#video video")).to_be_attached(timeout=30_000)
        page.screenshot(path=str(shots / "ui-during.png"), full_page=True)

        expect(page.locator("#status")).to_contain_text("done", timeout=300_000)
        expect(page.locator("#status")).to_contain_text("reused:")
        expect(page.locator("#final")).to_contain_text(".mp4")
        video = page.locator("#video video")
        page.wait_for_function("v => v.readyState >= 1 && v.duration > 0", arg=video.element_handle(),
                               timeout=30_000)
        duration = video.evaluate("v => v.duration")
        page.screenshot(path=str(shots / "ui-after.png"), full_page=True)
        browser.close()
    assert 2.5 <= duration <= 3.6  # 3 s asked
