"""peak_rss_bytes: a child's own peak, not its parent's (ru_maxrss survives fork + exec on Linux)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MiB = 2**20
PARENT_BALLAST = 256 * MiB
CHILD_BALLAST = 128 * MiB
CHILD = f"""
import json, resource
import numpy as np
from lowvram.host_memory import peak_rss_bytes
start = peak_rss_bytes()
ballast = np.ones({CHILD_BALLAST} // 8)
print(json.dumps({{"start": start, "after": peak_rss_bytes(),
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs /proc")
def test_a_child_reports_its_own_peak_not_the_parents():
    ballast = np.ones(PARENT_BALLAST // 8)  # resident in the parent while the child starts
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    del ballast
    child = json.loads(out)
    assert child["start"] < PARENT_BALLAST / 2  # the interpreter and numpy: tens of MB
    assert child["after"] >= child["start"] + CHILD_BALLAST * 0.9  # and it follows what the child touches
    # what the old quantize implementation (ru_maxrss of RUSAGE_SELF) reported there: the parent's size at the fork
    assert child["ru_maxrss"] >= PARENT_BALLAST
