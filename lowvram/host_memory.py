"""Host memory of this process, as `lowvram run`, `quantize` and `bench` report it."""

from __future__ import annotations

import sys


def peak_rss_bytes() -> int:
    """Peak resident set of this process image, in bytes: VmHWM from /proc/self/status.

    Not ``ru_maxrss`` of RUSAGE_SELF: Linux carries it across exec, so a process started by fork + exec (a
    subprocess, a multiprocessing "spawn" worker, a bench run) reports at least its parent's size at the fork.
    VmHWM is reset at exec. ``ru_maxrss`` is only the fallback where /proc is missing (kilobytes; bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024
