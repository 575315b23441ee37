"""Process launch and fault handling for the parallel engine.

`lowvram run` spawns one worker per rank and stays alive as the sink: workers
send finished block latents back over a queue, and the launcher decodes and writes them. If a worker dies
(or raises), every other worker is terminated within seconds, the launcher reports one line naming the rank
and the cause, and what was already written stays playable. Under an external `torchrun` (RANK/WORLD_SIZE
set) the same worker code runs in-process and the last stage's TP rank 0 is the sink.

Rank r runs on visible GPU r % count. NCCL is used when every rank has its own GPU; when ranks share one
(NCCL refuses two ranks on a device) the whole group runs over gloo, point-to-point tensors staged through host
memory (engine.Channel). A rank may cap its caching allocator to emulate a smaller GPU (`cap_memory`).
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_mod
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowvram.errors import LowvramError
from lowvram.host_memory import peak_rss_bytes

# A collective may wait for its peers' loading and first compile, which add up along a pipeline (stage 3 receives
# after stages 0-2 each compiled their prefill: minutes at full size). Dead ranks are caught within seconds by
# the launcher's exit-code watch, not by this timeout.
WORKER_TIMEOUT_S = 600


class RankFailed(LowvramError):
    exit_code = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def place_ranks(world: int, visible: int) -> tuple[list[int], str]:
    """(visible GPU of each rank, backend): round-robin; NCCL when each rank has its own GPU, else gloo."""
    return [r % visible for r in range(world)], "nccl" if world <= visible else "gloo"


def cap_memory(device, cap_bytes: int | None) -> None:
    """Emulate a GPU of `cap_bytes`: this process's caching allocator may hold at most that much on `device`
    (the CUDA context comes on top, as on the real card)."""
    if cap_bytes is None:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_bytes < total:
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total, device)


def init_distributed(rank: int, world: int, backend: str, port: int | None = None) -> None:
    if world == 1 and not under_torchrun():
        return
    if port is not None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=WORKER_TIMEOUT_S))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # gloo aborts a rank that tears down while a peer still talks to it
        dist.destroy_process_group()


def peak_memory(device=None) -> dict:
    """{host_bytes, gpu_alloc_bytes, gpu_reserved_bytes} peaks of this process (GPU ones for a CUDA device)."""
    rec = {"device": str(device) if device is not None else "cpu", "host_bytes": peak_rss_bytes()}
    if device is not None and torch.device(device).type == "cuda":
        rec["gpu_alloc_bytes"] = torch.cuda.max_memory_allocated(device)
        rec["gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return rec


def _worker_entry(rank, world, port, backend, fn, args, out_queue):
    """Body of a spawned worker: its peak memory, then "done"; one line back on error, exit code 1."""
    try:
        if backend == "gloo":
            torch.set_num_threads(1)
        init_distributed(rank, world, backend, port)
        device = fn(rank, world, out_queue, *args)
        shutdown_distributed()
        out_queue.put(("memory", rank, peak_memory(device)))
        out_queue.put(("done", rank, None))
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, which decides
        detail = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[-1]
        if os.environ.get("LOWVRAM_DEBUG"):
            traceback.print_exc()
        out_queue.put(("error", rank, detail))
        out_queue.close()
        out_queue.join_thread()  # os._exit would drop a message still in the feeder thread
        os._exit(1)


def spawn(fn, args: tuple, world: int, backend: str, on_message, timeout_s: float | None = None) -> None:
    """Run fn(rank, world, queue, *args) on `world` processes; on_message(kind, rank, payload) gets what they send.

    A worker that exits non-zero or raises ends the run at once (a peer blocked on it would otherwise wait for
    the collective timeout); with `timeout_s`, so does silence that long. The others are terminated and
    RankFailed names the rank and the cause.
    """
    ctx = mp.get_context("spawn")
    out_queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker_entry, args=(r, world, port, backend, fn, args, out_queue), daemon=True)
             for r in range(world)]
    with sigint_ignored():  # Ctrl-C reaches the whole process group: the launcher alone handles it, then stops them
        for p in procs:
            p.start()
    done: set[int] = set()
    errors: dict[int, str] = {}
    last_heard = time.monotonic()
    try:
        while len(done) < world:
            try:
                kind, rank, payload = out_queue.get(timeout=0.2)
                last_heard = time.monotonic()
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r not in done):
                    raise root_cause(procs, out_queue, errors)
                if timeout_s is not None and time.monotonic() - last_heard > timeout_s:
                    alive = [r for r, p in enumerate(procs) if p.is_alive() and r not in done]
                    raise RankFailed(f"ranks {alive} sent nothing for {timeout_s:.0f} s; stopped them "
                                     f"(a hang: check the GPUs and the interconnect)")
                continue
            if kind == "done":
                done.add(rank)
            elif kind == "error":
                errors[rank] = payload
                raise root_cause(procs, out_queue, errors)
            else:
                on_message(kind, rank, payload)
    finally:
        stop(procs)


@contextlib.contextmanager
def sigint_ignored():
    """Processes started inside inherit SIGINT as ignored (Python keeps an ignored SIGINT ignored at start-up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


PEER_LOST = ("connection", "peer", "closed", "reset", "broken pipe", "timed out", "timeout")


def root_cause(procs, out_queue, errors: dict[int, str], settle_s: float = 1.0) -> RankFailed:
    """When one rank fails its peers fail too (lost connection); name the one that started it."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        try:
            kind, rank, payload = out_queue.get(timeout=0.05)
            if kind == "error":
                errors[rank] = payload
        except queue_mod.Empty:
            pass
    killed = [r for r, p in enumerate(procs) if p.exitcode is not None and p.exitcode < 0]
    if killed:
        r = killed[0]
        return RankFailed(f"rank {r} died ({describe_exit(procs[r].exitcode)}); the other ranks were stopped")
    own = [r for r, msg in errors.items() if not any(w in msg.lower() for w in PEER_LOST)]
    for r in own or sorted(errors):
        return RankFailed(f"rank {r} failed: {errors[r]}; the other ranks were stopped")
    r = next(r for r, p in enumerate(procs) if p.exitcode not in (None, 0))
    return RankFailed(f"rank {r} died ({describe_exit(procs[r].exitcode)}); the other ranks were stopped")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def stop(procs, grace_s: float = 5.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
