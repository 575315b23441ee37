"""`lowvram ui`: the web page (Gradio) and its HTTP API over the job queue (lowvram/jobs.py).

Every job goes through the queue; the page's handlers only submit and follow. The video in the page is the
growing NAME.partial.mp4, re-served after each finished block (a copy of the bytes written so far: fragmented
MP4, playable at every block), then the final mp4.
"""

from __future__ import annotations

import html
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed network

import gradio as gr  # noqa: E402

from lowvram.errors import LowvramError  # noqa: E402
from lowvram.model.config import UPSTREAM_SEED  # noqa: E402
from lowvram.jobs import JobQueue  # noqa: E402
from lowvram.session import PIPELINES, SIZES, Job, check_job, plan_for_machine  # noqa: E402

SNAPSHOT_EVERY_S = 1.0  # copy the growing video for the page at most this often (it is rewritten whole each time)


class PassThrough:
    """A file input that hands on a file Gradio cannot decode as it is, so that the runtime refuses it with the
    CLI's one line (not Gradio's preprocessing error)."""

    def get_block_name(self):
        return type(self).__mro__[2].__name__.lower()  # the built-in component's page widget

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception:  # noqa: BLE001 - judged by the runtime's checks instead
            return None if payload is None else payload.path


class ImageInput(PassThrough, gr.Image):
    pass


class AudioInput(PassThrough, gr.Audio):
    pass


def status_line(job, ahead: int = 0) -> str:
    if job.state == "queued":
        return f"job {job.id}: queued, {ahead} job(s) ahead"
    if job.state == "running" and not job.blocks:
        return f"job {job.id}: starting (conditioning, loading the model if it is not loaded yet)"
    if job.state == "running":
        b, eta = job.blocks[-1], job.eta_s()
        return (f"job {job.id}: block {b['done']}/{b['total']}, {b['frames']} frames, "
                f"{b['elapsed_s']:.1f} s, ETA {'…' if eta is None else f'{eta:.0f} s'}")
    if job.state == "done":
        s = job.summary
        reused = ", ".join(s["reused"]) or "nothing (first job on this model)"
        return (f"job {job.id}: done: {s['frames']} frames ({s['blocks']} blocks) in {s['seconds']} s on "
                f"{s['device']} {s['layout']}; first block after {s['first_block_s']} s; reused: {reused}")
    return f"job {job.id}: {job.message}"


def snapshot(job, folder: Path) -> str | None:
    """A copy of the bytes of NAME.partial.mp4 written so far, under a new name (the page reloads it)."""
    from lowvram.outputs import partial_path

    partial = partial_path(Path(job.params.output))
    if not partial.is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"job{job.id}-block{job.blocks[-1]['done']:04d}.mp4"
    shutil.copyfile(partial, dest)
    return str(dest)


def plan_markdown(model_dir: str, size: str, kv: str, image: str | None) -> str:
    if not model_dir:
        return "**Plan**: choose a model folder."
    try:
        p = plan_for_machine(model_dir, size, kv, image)
    except LowvramError as err:
        return f"**Plan**: error: {err}"
    where = "CPU" if p["device"] == "cpu" else f"{p['gpus']} GiB ({p['gpu_model']} throughput model)"
    memory = (f"host RAM {p['host_GiB']} GiB of {p['available_GiB']} GiB available" if p["device"] == "cpu"
              else f"per GPU {', '.join(f'{g} GiB' for g in p['per_gpu_GiB'])}")
    if not p["fits"]:
        return f"**Plan** ({where}, {p['format']}, {p['size']}): **does not fit** ({memory}); would fit with: {p['advice']}"
    fps = f"≈{p['fps']} fps [planner estimate]" if p["fps"] else "fps: measured by the first job"
    return f"**Plan** ({where}, {p['format']}, {p['size']}): layout **{p['layout']}**, {memory}, {fps}"


def build(queue: JobQueue, model_dir: str, ckpt_dir: str | None, out_dir: Path) -> gr.Blocks:
    out_dir = Path(out_dir)
    streams = out_dir / "stream"

    def generate(image, audio, prompt, size, seconds, seed, pipeline, kv, model, ckpt):
        """Queue a generation and follow it: (job id, status, the video so far, the final mp4)."""
        if not image:
            raise gr.Error("error: give a reference image (upload or webcam)", duration=None)
        if not audio:
            raise gr.Error("error: give the speech (upload or microphone)", duration=None)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(image).stem[:40]}.mp4"
        job = Job(model_dir=model or "", image=image, audio=audio, prompt=prompt or "", output=str(out_dir / name),
                  ckpt_dir=ckpt or None, size=size, seconds=float(seconds) if seconds else None,
                  seed=UPSTREAM_SEED if seed is None else int(seed), pipeline=pipeline, kv=kv)
        try:
            warnings = check_job(job)
        except LowvramError as err:
            raise gr.Error(f"error: {err}", duration=None) from None
        for w in warnings:
            gr.Warning(w)
        state = queue.submit("generate", job, warnings)
        last_block, last_copy, video = 0, 0.0, None
        for state in queue.follow(state.id):
            done = state.blocks[-1]["done"] if state.blocks else 0
            final = state.state != "running" and state.state != "queued"
            if done > last_block and (final or time.monotonic() - last_copy >= SNAPSHOT_EVERY_S):
                video, last_block, last_copy = snapshot(state, streams) or video, done, time.monotonic()
            if state.state == "done":
                yield state.id, status_line(state), state.summary["output"], state.summary["output"]
            else:
                yield state.id, status_line(state, queue.ahead_of(state.id)), video, None
        if state.state == "failed":
            raise gr.Error(state.message, duration=None)

    def cancel(job_id):
        return queue.cancel_job(job_id) if job_id else "no job to cancel"

    def jobs_table():
        rows = []
        for j in reversed(list(queue.jobs.values())):
            what = Path(j.params.image).name if j.kind == "generate" else "compare"
            rows.append([j.id, j.kind, what, j.state, status_line(j)])
        return rows or [["", "", "", "", "no jobs yet"]]

    def compare(baseline, candidates, clips, size, seconds):
        """Run `lowvram bench` on a clip set through the queue; yields (status, the report page, report.html)."""
        from lowvram.benchmarks.bench import BenchOptions

        cands = [c.strip() for c in (candidates or "").splitlines() if c.strip()]
        if not baseline or not cands or not clips:
            raise gr.Error("error: give the baseline folder, at least one candidate and a clip set folder",
                           duration=None)
        report = out_dir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        opts = BenchOptions(baseline=baseline, candidates=cands, clips=Path(clips), out=report, size=size,
                            seconds=float(seconds) if seconds else None, progress=False)
        state = queue.submit("compare", opts)
        for state in queue.follow(state.id, poll_s=2.0):
            running = f"job {state.id}: {state.state}" + (
                f", {time.monotonic() - state.started:.0f} s" if state.started else "")
            if state.state == "done":
                page = Path(state.summary["report"])
                frame = (f'<iframe title="bench report" style="width:100%;height:900px;border:0" '
                         f'srcdoc="{html.escape(page.read_text())}"></iframe>')
                yield f"job {state.id}: done: {page}", frame, str(page)
            elif state.state in ("failed", "cancelled"):
                raise gr.Error(state.message, duration=None)
            else:
                yield running, "", None

    with gr.Blocks(title="lowvram", delete_cache=(3600, 6 * 3600)) as app:
        gr.Markdown("# lowvram: Live Avatar on your GPU\nA talking-avatar video from a face and a voice. The model "
                    "stays loaded between jobs; the video plays in the page while it grows.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    image = ImageInput(label="Reference image", type="filepath", sources=["upload", "webcam"],
                                     elem_id="image")
                    audio = AudioInput(label="Speech", type="filepath", sources=["upload", "microphone"],
                                     elem_id="audio")
                    prompt = gr.Textbox(label="Prompt", value="a person talks warmly to the camera", elem_id="prompt")
                    with gr.Row():
                        size = gr.Dropdown(list(SIZES), value=SIZES[0], label="Size (area W*H)",
                                           allow_custom_value=True, elem_id="size")
                        seconds = gr.Number(value=5, label="Length (s)", minimum=0.1, elem_id="seconds")
                        seed = gr.Number(value=UPSTREAM_SEED, label="Seed", precision=0, elem_id="seed")
                    with gr.Row():
                        pipeline = gr.Dropdown(list(PIPELINES), value="tpp", label="Pipeline", elem_id="pipeline")
                        kv = gr.Radio(["bf16", "fp8"], value="bf16", label="KV cache", elem_id="kv")
                    model = gr.Textbox(value=model_dir or "", label="Model folder (quantized or bf16)",
                                       elem_id="model")
                    ckpt = gr.Textbox(value=ckpt_dir or "", label="Checkpoint folder for umT5/VAE/wav2vec2 "
                                      "(--ckpt-dir; empty: the model's source)", elem_id="ckpt")
                    plan = gr.Markdown(elem_id="plan")
                    with gr.Row():
                        start = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Column():
                    job_id = gr.Textbox(label="Job", interactive=False, elem_id="job")
                    status = gr.Markdown("no job yet", elem_id="status")
                    video = gr.Video(label="Video (grows block by block)", autoplay=True, elem_id="video")
                    final = gr.File(label="Final mp4", elem_id="final")
                    jobs = gr.Dataframe(headers=["job", "kind", "input", "state", "status"], label="Queue",
                                        interactive=False, elem_id="jobs")
            plan_inputs = [model, size, kv, image]
            for trigger in (model.submit, model.blur, size.change, kv.change, image.change):
                trigger(plan_markdown, plan_inputs, plan, api_name=False, queue=False)
            app.load(plan_markdown, plan_inputs, plan, api_name=False, queue=False)
            start.click(generate, [image, audio, prompt, size, seconds, seed, pipeline, kv, model, ckpt],
                        [job_id, status, video, final], api_name="generate", concurrency_limit=None)
            stop.click(cancel, job_id, status, api_name="cancel", concurrency_limit=None, queue=False)
            gr.Timer(2.0).tick(jobs_table, None, jobs, api_name=False, queue=False, show_progress="hidden")
            app.load(jobs_table, None, jobs, api_name=False, queue=False)
        with gr.Tab("Compare"):
            gr.Markdown("Run `lowvram bench` on your clip set (`lowvram calib make`): the baseline and each candidate "
                        "on the same clips and seeds; speed, memory and quality vs the baseline.")
            baseline = gr.Textbox(value=model_dir or "", label="Baseline (bf16 checkpoint folder)")
            candidates = gr.Textbox(label="Candidates, one per line (a folder, optionally FOLDER::run options)",
                                    lines=3)
            clips = gr.Textbox(label="Clip set folder (with clips.json)")
            with gr.Row():
                c_size = gr.Dropdown(list(SIZES), value=SIZES[0], label="Size", allow_custom_value=True)
                c_seconds = gr.Number(value=5, label="Seconds per clip")
            run_bench = gr.Button("Compare", variant="primary")
            c_status = gr.Markdown()
            report = gr.HTML()
            report_file = gr.File(label="report.html")
            run_bench.click(compare, [baseline, candidates, clips, c_size, c_seconds], [c_status, report, report_file],
                            api_name="compare", concurrency_limit=None)
        gr.Markdown(f"Videos are written to `{out_dir}`. Scripts: the same jobs over HTTP with `gradio_client` "
                    "(see the API link below and the README).")
    return app


def serve(model_dir: str | None, ckpt_dir: str | None, host: str, port: int, out_dir: Path,
          block: bool = True) -> tuple[gr.Blocks, JobQueue]:
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    queue = JobQueue()
    app = build(queue, str(Path(model_dir).absolute()) if model_dir else None,
                str(Path(ckpt_dir).absolute()) if ckpt_dir else None, out_dir)
    app.queue(default_concurrency_limit=None)
    print(f"lowvram ui: http://{host}:{port}/ (videos in {out_dir})", flush=True)
    try:
        app.launch(server_name=host, server_port=port, allowed_paths=[str(out_dir)], ssr_mode=False, quiet=True,
                   show_error=True, prevent_thread_lock=not block)
    finally:
        if block:
            queue.close()
    return app, queue
