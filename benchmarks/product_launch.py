"""benchmarks/product.py's context and children: where things are, how a phase starts a watched command."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from benchmarks.watch import Watch  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

SHARE_GPU_FLAG = "--share-gpu"
DIT_NAME = "Wan2.2-S2V-14B"
SIZE = "704*384"
STOP_MARGIN_S = 15  # a child is stopped this long before the deadline, so the call itself never runs past it


# Phases: context, children, records


class PhaseFailed(Exception):
    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record or {}


class Stop(Exception):
    """Not enough time or disk left for the next phase: end the call cleanly."""


@dataclass
class Ctx:
    args: argparse.Namespace
    work: Path
    shm: Path
    t_start: float = field(default_factory=time.monotonic)
    current: str = ""  # the phase running now
    machine: dict | None = None  # GPU, driver, torch, date: read once

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    @property
    def device(self) -> str:
        return self.args.device or ("cpu" if self.tiny else "cuda")

    @property
    def size(self) -> str:
        return "64*64" if self.tiny else SIZE

    @property
    def models(self) -> Path:  # umT5 + tokenizer, VAE, wav2vec2
        return self.work / DIT_NAME

    @property
    def dit(self) -> Path:  # shards, index, config, LoRA, links to the rest
        return self.shm / DIT_NAME

    @property
    def state(self) -> Path:
        return self.work / "state"

    @property
    def clips(self) -> Path:
        return self.work / "clips"

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    def q(self, fmt: str) -> Path:
        return self.work / f"q-{fmt}"

    def time_left(self) -> float:
        return self.args.deadline_s - (time.monotonic() - self.t_start)


def lowvram(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowvram.cli", *args]


def shown(argv: list[str], env: dict[str, str]) -> str:
    """The command as a user types it: `VAR=value lowvram ...`."""
    words = ["lowvram", *argv[3:]] if argv[1:3] == ["-m", "lowvram.cli"] else \
        ["python3", *[str(Path(a).relative_to(REPO)) if a.startswith(str(REPO)) else a for a in argv[1:]]]
    return " ".join([f"{k}={v}" for k, v in env.items()] + [shlex.quote(w) for w in words])


def launch(ctx: Ctx, name: str, argv: list[str], env: dict[str, str] | None = None, output: Path | None = None
           ) -> tuple[dict, str]:
    """Run one command in its own process group, watched; (its record, its stdout). Stopped near the deadline."""
    env = env or {}
    logs = ctx.state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    limit = ctx.time_left() - STOP_MARGIN_S
    if limit <= 0:
        raise Stop(f"no time left to start {name}")
    t0 = time.monotonic()
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=full_env, cwd=ctx.work, preexec_fn=os.setpgrp)
        watch = Watch(proc.pid, output)
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
        except BaseException:
            stop_group(proc)
            raise
        finally:
            watched = watch.stop()
    rec = {"command": shown(argv, env), "rc": proc.returncode, "wall_s": round(time.monotonic() - t0, 2),
           "timed_out": timed_out, **watched}
    stdout = (logs / f"{name}.out").read_text(errors="replace")
    if proc.returncode != 0:
        rec["stderr_tail"] = (logs / f"{name}.err").read_text(errors="replace")[-3000:]
        if timed_out:
            raise Stop(f"{name}: stopped at the deadline after {rec['wall_s']} s (run again to resume)")
        raise PhaseFailed(f"{name}: exit {proc.returncode}: {rec['stderr_tail'].strip().splitlines()[-1:]}", rec)
    return rec, stdout


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (it started it), then SIGKILL whatever is left after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise PhaseFailed("no JSON summary on stdout")
