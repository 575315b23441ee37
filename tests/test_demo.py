"""`lowvram demo` in a fresh folder: the README's first command, end to end."""

import json
import subprocess
import sys

from lowvram.media import read_video_info


def test_demo_runs_the_whole_path(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "demo", "--out", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = " ".join(r.stdout.split())
    assert "RANDOM weights" in text and "report.html" in text and "lowvram quantize Wan2.2-S2V-14B" in text
    info = read_video_info(out / "fp8_two_workers.mp4")
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.num_frames > 0
    assert abs(info.audio_duration - info.num_frames / 25) <= 1 / 25 + 1e-6
    for name in ("report.html", "report.md", "results.json"):
        assert (out / "report" / name).stat().st_size > 0
    results = json.loads((out / "report" / "results.json").read_text())
    labels = json.dumps(results)
    assert "fp8" in labels and "int8" in labels
    for fmt in ("fp8", "int8"):
        assert json.loads((out / f"q-{fmt}" / "manifest.json").read_text())["format"] == fmt
