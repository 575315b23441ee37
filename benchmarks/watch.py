"""Watching a child process tree from outside (benchmarks/product.py): its host memory, I/O and GPU memory.

Host RSS is the peak over the tree (all pages, and anonymous only), sampled from /proc; GPU memory per process and
the card's total above its idle use from nvidia-smi.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

GB, GiB = 1e9, 1024**3


def process_tree(root: int) -> list[int]:
    """root and all its descendants (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("rchar", "read_bytes", "wchar", "write_bytes"):
                    out[key] = int(value)
    except OSError:
        pass
    return out


def nvidia_smi(query: str, kind: str = "gpu") -> list[list[str]]:
    """Rows of `nvidia-smi --query-{kind}=QUERY` ([] where there is no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_used_mib() -> int | None:
    rows = nvidia_smi("memory.used")
    return int(rows[0][0]) if rows and rows[0][0].isdigit() else None


class Watch:
    """Polls a process tree until stopped: memory peaks, bytes read, GPU memory, the output file's first bytes."""

    def __init__(self, pid: int, output: Path | None = None, interval_s: float = 0.25, gpu_every_s: float = 0.5):
        self.pid, self.output, self.interval_s, self.gpu_every_s = pid, output, interval_s, gpu_every_s
        self.t0 = time.monotonic()
        self.tree_rss = self.tree_anon = 0
        self.hwm: dict[int, int] = {}
        self.io: dict[int, dict[str, int]] = {}
        self.gpu_per_pid: dict[int, int] = {}
        self.gpu_other_pids: dict[int, int] = {}
        self.gpu_baseline = gpu_used_mib()
        self.gpu_peak: int | None = None
        self.first_output_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last_gpu = 0.0
        while not self._stop.is_set():
            self._poll_host()
            if self.gpu_baseline is not None and time.monotonic() - last_gpu >= self.gpu_every_s:
                last_gpu = time.monotonic()
                self._poll_gpu()
            if self.output is not None and self.first_output_s is None and self.output.is_file() \
                    and self.output.stat().st_size > 0:
                self.first_output_s = round(time.monotonic() - self.t0, 2)
            self._stop.wait(self.interval_s)

    def _poll_host(self) -> None:
        rss = anon = 0
        for pid in process_tree(self.pid):
            mem = proc_memory(pid)
            rss += mem.get("VmRSS", 0)
            anon += mem.get("RssAnon", 0)
            self.hwm[pid] = max(self.hwm.get(pid, 0), mem.get("VmHWM", 0))
            io = proc_io(pid)
            if io:
                self.io[pid] = io
        self.tree_rss, self.tree_anon = max(self.tree_rss, rss), max(self.tree_anon, anon)

    def _poll_gpu(self) -> None:
        used = gpu_used_mib()
        if used is not None:
            self.gpu_peak = max(self.gpu_peak or 0, used)
        tree = set(self.hwm)
        for row in nvidia_smi("pid,used_memory", "compute-apps"):
            if len(row) == 2 and row[0].isdigit() and row[1].isdigit():
                bucket = self.gpu_per_pid if int(row[0]) in tree else self.gpu_other_pids
                bucket[int(row[0])] = max(bucket.get(int(row[0]), 0), int(row[1]))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        rec = {"host_peak_tree_GiB": round(self.tree_rss / GiB, 2),
               "host_peak_tree_anon_GiB": round(self.tree_anon / GiB, 2),
               "host_peak_process_GiB": round(max(self.hwm.values(), default=0) / GiB, 2),
               "processes": len(self.hwm),
               "read_GB": round(sum(io.get("rchar", 0) for io in self.io.values()) / GB, 2),
               "read_from_storage_GB": round(sum(io.get("read_bytes", 0) for io in self.io.values()) / GB, 2)}
        if self.gpu_baseline is not None:
            rec["gpu_peak_above_baseline_GiB"] = round(((self.gpu_peak or 0) - self.gpu_baseline) / 1024, 2)
            rec["gpu_peak_per_process_GiB"] = sorted((round(v / 1024, 2) for v in self.gpu_per_pid.values()),
                                                     reverse=True)
            if not self.gpu_per_pid and self.gpu_other_pids:  # a pid namespace nvidia-smi does not share
                rec["gpu_peak_per_process_GiB_unmatched_pids"] = sorted(
                    (round(v / 1024, 2) for v in self.gpu_other_pids.values()), reverse=True)
        if self.output is not None:
            rec["first_output_bytes_s"] = self.first_output_s
        return rec


# ----------------------------------------------------------------------------------------------------------
