"""benchmarks/precision.py (issue 16's precision bar at full depth) on the tiny config on the CPU: the same weights
and inputs in every format, errors against the float32 run that order as the formats' precision."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_precision_benchmark_code_path_on_the_tiny_config():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--tiny", "--device", "cpu",
                        "--formats", "bf16,int4"], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    bf16, int4 = rows["bf16"]["final_latents"], rows["int4"]["final_latents"]
    assert len(bf16) == len(int4) == 2  # two blocks after the prefill
    assert all(0 < b < 0.02 for b in bf16) and all(b < i for b, i in zip(bf16, int4))
