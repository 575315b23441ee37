"""Start-up of a job in `lowvram ui` with the model loaded vs the first job, through the HTTP API (tiny model, CPU).

    python benchmarks/ui_startup.py [--work /tmp/lowvram-ui-startup]

Serves `lowvram ui` on the demo's tiny checkpoint and runs three jobs over gradio_client: the first (nothing loaded),
the same inputs again (everything reused), then a new image and prompt (the DiT reused, the image and prompt
encoded again). Prints each job's time from submission to its first block and what it reused, as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lowvram-ui-startup"))
    args = ap.parse_args()
    from gradio_client import Client, handle_file

    from lowvram.demo import face_like_image, speech_like_wave, write_tiny_checkpoint

    ckpt = args.work / "ckpt"
    write_tiny_checkpoint(ckpt)
    face_like_image(args.work / "face.png", 128, 128)
    face_like_image(args.work / "other.png", 96, 128)
    speech_like_wave(args.work / "speech.wav", 1.6, seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lowvram.cli", "ui", str(ckpt), "--port", str(port), "--out",
                               str(args.work / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(1)
        client = Client(url, verbose=False)
        rows = []
        for name, image, prompt in [("first job", "face.png", "a baker talks"), ("same inputs", "face.png",
                                    "a baker talks"), ("new image and prompt", "other.png", "a smith explains")]:
            t0 = time.monotonic()
            status = client.predict(handle_file(str(args.work / image)), handle_file(str(args.work / "speech.wav")),
                                    prompt, "64*64", 1, 0, "tpp", "bf16", str(ckpt), "", api_name="/generate")[1]
            rows.append({"job": name, "wall_s": round(time.monotonic() - t0, 2),
                         "first_block_s": float(re.search(r"first block after ([\d.]+) s", status).group(1)),
                         "reused": re.search(r"reused: (.*)$", status).group(1)})
        print(json.dumps(rows, indent=1))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
