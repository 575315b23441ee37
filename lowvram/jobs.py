"""The job queue behind `lowvram ui`: jobs run one at a time, in the order they came, in one worker process that
keeps a `lowvram.session.Session` (the model stays loaded between jobs).

The worker is a separate process so that the server keeps serving while a job computes, and survives a job that
crashes the process (out of host memory, a segfault): that job is reported failed with what it left, and the next
job starts a new worker (which loads the model again). Cancel stops a running job at its next block (what was
written stays playable in NAME.partial.mp4) and drops a queued one.
"""

from __future__ import annotations

import itertools
import queue as queue_mod
import threading
import time
from dataclasses import dataclass, field

import torch.multiprocessing as mp

FINISHED = ("done", "failed", "cancelled")


@dataclass
class JobState:
    """What the page shows of a job; `version` grows with every change (followers wait on it)."""

    id: str
    kind: str  # "generate" or "compare"
    params: object  # session.Job or benchmarks.bench.BenchOptions
    state: str = "queued"  # queued, running, done, failed, cancelled
    version: int = 0
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    blocks: list = field(default_factory=list)  # block events: done, total, frames, elapsed_s, at (monotonic)
    message: str = ""  # the one-line error or what a cancel kept
    summary: dict | None = None
    warnings: list = field(default_factory=list)

    def eta_s(self) -> float | None:
        """Seconds left, from the time per block since the first one (which also pays the start-up)."""
        if len(self.blocks) < 2:
            return None
        first, last = self.blocks[0], self.blocks[-1]
        per_block = (last["at"] - first["at"]) / (last["done"] - first["done"])
        return round(per_block * (last["total"] - last["done"]), 1)


def worker_main(requests, events, cancel) -> None:
    """The worker process: run each (seq, kind, params) with one Session; report every block and the end."""
    from lowvram.cli import failure_line
    from lowvram.session import Cancelled, Session

    session = Session()
    while (request := requests.get()) is not None:
        seq, kind, params = request
        try:
            if kind == "generate":
                summary = session.generate(params, on_block=lambda b: events.put(("block", seq, b)),
                                           cancelled=lambda: cancel.value == seq)
            else:
                from lowvram.benchmarks.bench import run_bench

                session.release()  # the bench's runs are processes of their own and need the memory
                summary = {"report": str(params.out / "report.html"), "summary": run_bench(params)["summary"]}
            events.put(("done", seq, summary))
        except Cancelled as err:
            events.put(("cancelled", seq, str(err)))
        except BaseException as err:  # noqa: BLE001 - every failure is one line for the page
            events.put(("failed", seq, failure_line(err)[0]))


class JobQueue:
    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self.jobs: dict[str, JobState] = {}
        self.pending: list[str] = []
        self.changed = threading.Condition()
        self.ids = itertools.count(1)
        self.cancel = self.ctx.Value("q", 0, lock=False)  # no lock a killed worker could leave held
        self.worker = None
        self.closed = False
        self.start_worker()  # its imports (torch, the runtime) are paid before the first job comes
        self.thread = threading.Thread(target=self.dispatch, name="lowvram-jobs", daemon=True)
        self.thread.start()

    def start_worker(self) -> None:
        self.requests, self.events = self.ctx.Queue(), self.ctx.Queue()
        self.worker = self.ctx.Process(target=worker_main, args=(self.requests, self.events, self.cancel),
                                       name="lowvram-ui-worker", daemon=True)
        self.worker.start()

    # ----- what the page calls -----------------------------------------------------------------------

    def submit(self, kind: str, params, warnings=()) -> JobState:
        with self.changed:
            job = JobState(id=str(next(self.ids)), kind=kind, params=params, warnings=list(warnings))
            self.jobs[job.id] = job
            self.pending.append(job.id)
            self.changed.notify_all()
            return job

    def cancel_job(self, job_id: str) -> str:
        with self.changed:
            job = self.jobs.get(str(job_id))
            if job is None:
                return f"no job {job_id}"
            if job.state == "queued":
                self.pending.remove(job.id)
                self.update(job, state="cancelled", message="cancelled before it started", finished=time.monotonic())
                return job.message
            if job.state == "running":
                self.cancel.value = int(job.id)
                return f"job {job.id}: stopping at the next block"
            return f"job {job.id} is {job.state}"

    def follow(self, job_id: str, poll_s: float = 0.5):
        """Yield the job each time it changed (at most every `poll_s`), until it finished."""
        seen = -1
        while True:
            with self.changed:
                job = self.jobs[job_id]
                if not self.changed.wait_for(lambda: job.version != seen, timeout=poll_s):
                    continue
                seen, finished = job.version, job.state in FINISHED
            yield job
            if finished:
                return

    def ahead_of(self, job_id: str) -> int:
        with self.changed:
            running = any(j.state == "running" for j in self.jobs.values())
            return (self.pending.index(job_id) if job_id in self.pending else 0) + running

    def close(self) -> None:
        self.closed = True
        with self.changed:
            self.changed.notify_all()
        if self.worker is not None and self.worker.is_alive():
            self.requests.put(None)
            self.worker.join(10)
            if self.worker.is_alive():
                self.worker.kill()

    # ----- the dispatcher thread ---------------------------------------------------------------------

    def update(self, job: JobState, **changes) -> None:
        """Change a job (caller holds self.changed) and wake its followers."""
        for k, v in changes.items():
            setattr(job, k, v)
        job.version += 1
        self.changed.notify_all()

    def dispatch(self) -> None:
        while not self.closed:
            with self.changed:
                self.changed.wait_for(lambda: self.pending or self.closed, timeout=1.0)
                if not self.pending:
                    continue
                job = self.jobs[self.pending.pop(0)]
                self.update(job, state="running", started=time.monotonic())
            if self.worker is None or not self.worker.is_alive():
                self.start_worker()
            self.requests.put((int(job.id), job.kind, job.params))
            self.watch(job)

    def watch(self, job: JobState) -> None:
        """Take the worker's events for `job` until it ends; a dead worker ends it as failed."""
        while True:
            try:
                kind, seq, payload = self.events.get(timeout=0.2)
            except queue_mod.Empty:
                if not self.worker.is_alive():
                    code = self.worker.exitcode
                    self.worker = None
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    with self.changed:
                        self.update(job, state="failed", finished=time.monotonic(),
                                    message=f"error: the worker process died ({how}; out of memory?); what was "
                                            f"written is kept; the next job loads the model again")
                    return
                continue
            with self.changed:
                if kind == "block":
                    self.update(job, blocks=job.blocks + [dict(payload, at=time.monotonic())])
                    continue
                changes = {"summary": payload} if kind == "done" else {"message": payload}
                self.update(job, state=kind, finished=time.monotonic(), **changes)
                return
