"""The `lowvram` command line: parse, call, print. Errors become one line and an exit code."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from lowvram.errors import LowvramError
from lowvram.model.config import UPSTREAM_SEED

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run Live Avatar (16.3B audio-driven avatar DiT) on consumer 24 GB GPUs.",
)


def wide_console():
    """A rich console; piped output (CI, `| less`) gets 160 columns instead of wrapping tables at 80."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


@app.callback()
def _commands() -> None:
    """Keep `lowvram <command>` a command group even while only one command is registered."""


@app.command()
def inspect(
    ckpt_dir: Path = typer.Argument(..., help="DiT checkpoint folder (sharded safetensors + index), or one file."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="LoRA file to check against the model (liveavatar.safetensors)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 64: scale alpha/rank)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Open .pth/.pt/.bin files (torch.load weights_only)."),
) -> None:
    """Identify a checkpoint and check its keys from the file headers only (seconds for 32 GB), or describe a folder
    written by `lowvram quantize` (its files checked against the manifest); exit 2 if incomplete."""
    from lowvram.checkpoint import (
        CheckpointError, PickleRefusedError, inspect_checkpoint, inspect_renderables,
    )
    from lowvram.errors import InputError
    from lowvram.manifest import MANIFEST, inspect_quantized, quantized_renderables

    if (ckpt_dir / MANIFEST).is_file():
        if lora is not None:
            raise InputError(f"--lora: {ckpt_dir} is a quantized folder, its LoRA was merged when it was quantized; "
                             f"inspect the bf16 checkpoint to check a LoRA against the model")
        report, render = inspect_quantized(ckpt_dir), quantized_renderables
    else:
        try:
            report = inspect_checkpoint(ckpt_dir, lora, lora_alpha=lora_alpha, allow_pickle=allow_pickle)
        except PickleRefusedError as err:
            raise CheckpointError(f"{err}; or, if you trust it, pass --allow-pickle to inspect it") from None
        render = inspect_renderables
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        console = wide_console()
        for renderable in render(report):
            console.print(renderable)
    if not report["complete"]:
        raise CheckpointError(report["problem"])


@app.command()
def plan(
    model_dir: Path = typer.Argument(..., help="DiT checkpoint folder (bf16) or a folder written by `lowvram quantize`."),
    gpus: str = typer.Option("4x24", "--gpus", help="COUNTxGiB, e.g. 4x24, 1x24, 1x80."),
    size: str = typer.Option("704*384", "--size", help="Output H*W (multiples of 64)."),
    kv: str = typer.Option("bf16", "--kv", help="KV cache dtype: bf16 or fp8."),
    link: str = typer.Option("pcie", "--link", help="GPU interconnect: pcie or nvlink."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Weight format for a bf16 checkpoint (fp8, int8, int4)."),
    gpu_model: str = typer.Option("rtx4090", "--gpu-model", help="Throughput model: rtx4090, rtx3090, h100."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Predict per-GPU memory and traffic of every layout (headers only) and pick the fastest that fits; exit 3 if none."""
    from lowvram.errors import DoesNotFitError
    from lowvram.plan import plan_renderables, plan_report

    report = plan_report(model_dir, gpus, size, kv, link, fmt, gpu_model)
    if json_out:
        print(json.dumps(report, indent=1))
    else:
        console = wide_console()
        for renderable in plan_renderables(report):
            console.print(renderable)
    if report["chosen"] is None:
        fixes = "; ".join(report.get("suggestions") or []) or "a smaller size or more GPUs"
        raise DoesNotFitError(f"no layout fits {gpus} GiB at {size}; try {fixes}")


@app.command()
def run(
    model_dir: Path = typer.Argument(..., help="Folder written by `lowvram quantize`, or the bf16 checkpoint folder."),
    image: Path = typer.Option(..., "--image", help="Reference image (the face to animate)."),
    audio: Path = typer.Option(..., "--audio", help="Speech: wav, mp3, m4a, flac … any rate, mono or stereo."),
    prompt: str = typer.Option(..., "--prompt", help="Text prompt describing the scene."),
    output: Path = typer.Option(Path("out.mp4"), "--output", "-o", help="The mp4 to write (grows block by block)."),
    ckpt_dir: Optional[Path] = typer.Option(None, "--ckpt-dir", help="Folder with the T5, VAE and wav2vec2 files."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="LiveAvatar LoRA, merged at load (bf16 checkpoint only)."),
    size: str = typer.Option("704*384", "--size", help="Area budget W*H; the image's aspect ratio decides the shape."),
    seed: int = typer.Option(UPSTREAM_SEED, "--seed", help="Noise and reference-shift seed (reproducible on any "
                                                           "layout; the default is upstream's)."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="COUNTxGiB to plan for (default: what is visible); "
                                       "smaller than the real GPUs, each rank is capped to it."),
    share_gpu: bool = typer.Option(False, "--share-gpu", help="Allow more ranks than visible GPUs: round-robin on "
                                   "them, each capped at its --gpus size (default: an equal share), gloo between "
                                   "them, e.g. --gpus 4x24 --share-gpu emulates four 24 GB cards on one GPU."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor-parallel size (override the plan)."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pipeline stages over layers (override the plan)."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Stop after this many seconds of video (default: "
                                                                    "the video ends with the speech)."),
    num_clip: Optional[int] = typer.Option(None, "--num-clip", help="At most this many 48-frame clips (upstream's "
                                                                    "--num_clip); the video still ends with the speech."),
    crf: int = typer.Option(10, "--crf", help="x264 quality of the mp4, 0-51, lower is better (10 ~ upstream's)."),
    pose_video: Optional[Path] = typer.Option(None, "--pose-video", help="A pose video whose frames guide the motion "
                                                                        "(upstream's --pose_video; default: none)."),
    latents: Optional[Path] = typer.Option(None, "--latents", help="Also save every block's clean latents here."),
    kv: str = typer.Option("bf16", "--kv", help="KV cache dtype: bf16 or fp8."),
    t5_device: Optional[str] = typer.Option(None, "--t5-device", help="Where umT5 runs (default: the GPU when it "
                                            "fits the planned card, 10.8 GiB in bf16)."),
    t5_quant: Optional[str] = typer.Option(None, "--t5-quant", help="umT5 on the GPU in int8 or nf4 (bitsandbytes)."),
    keep_reference: bool = typer.Option(False, "--keep-reference", help="Keep the image's latent as the reference "
                                        "for the whole stream (upstream single-GPU); default: the first generated "
                                        "frame replaces it after clip 0 (upstream multi-GPU)."),
    compile_: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile the per-layer math on CUDA "
                                  "(the first block pays for compiling; later runs reuse inductor's disk cache)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Generate a talking-avatar video: conditioning once, then the DiT streams blocks into the mp4."""
    from lowvram.errors import InputError
    from lowvram.runtime import RunOptions
    from lowvram.runtime import run as run_stream

    for flag, path in (("--image", image), ("--audio", audio)):
        if not path.exists():
            raise InputError(f"{flag} {path}: no such file")
    summary = run_stream(RunOptions(model_dir=model_dir, image=image, audio=audio, prompt=prompt, output=output,
                                    ckpt_dir=ckpt_dir, lora=lora, size=size, seed=seed, device=device, gpus=gpus,
                                    share_gpu=share_gpu, tp=tp, pp=pp, seconds=seconds, latents=latents, kv=kv,
                                    num_clip=num_clip, crf=crf, pose_video=pose_video,
                                    t5_device=t5_device, t5_quantization=t5_quant, ref_update=not keep_reference,
                                    compile=compile_, progress=not json_out))
    if "output" not in summary:  # a torchrun rank that neither decodes nor writes
        return
    if json_out:
        print(json.dumps(summary))
    else:
        replaced = " (replaced the previous file)" if summary.get("replaced") else ""
        print(f"wrote {summary['output']}{replaced}: {summary['frames']} frames ({summary['blocks']} blocks) in "
              f"{summary['seconds']} s on {summary['device']} {summary['layout']}")


# ----- quantizer (lowvram.quantize / lowvram.calibration) ---------------------------------------------------

calib_app = typer.Typer(no_args_is_help=True, help="Calibration clip sets for `lowvram quantize`.")
app.add_typer(calib_app, name="calib")


@calib_app.command("make")
def calib_make(
    image: list[Path] = typer.Option(..., "--image", help="Reference image (repeat: one per --audio, or one for all)."),
    audio: list[Path] = typer.Option(..., "--audio", help="Speech file (repeat for several clips)."),
    prompt: list[str] = typer.Option(..., "--prompt", help="Scene prompt (repeat: one per --audio, or one for all)."),
    out: Path = typer.Option(..., "--out", help="Folder to create: clips.json + copies of the files."),
    clip_seconds: Optional[float] = typer.Option(None, "--clip-seconds", help="Split each speech into clips this long."),
    max_clips: Optional[int] = typer.Option(None, "--max-clips", help="Keep at most this many clips."),
) -> None:
    """Build a calibration set from your own image(s) + speech (several pairs, or one long speech split)."""
    from lowvram.calibration import make_clip_set

    cs = make_clip_set(out, image, audio, prompt, clip_seconds=clip_seconds, max_clips=max_clips)
    print(f"wrote {out / 'clips.json'}: {len(cs.clips)} clips")


@app.command()
def quantize(
    ckpt_dir: Path = typer.Argument(..., help="DiT checkpoint folder (Wan2.2-S2V-14B, bf16 safetensors)."),
    out: Path = typer.Option(..., "--out", help="Output folder (resumed if it holds an unfinished run)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration set from `lowvram calib make`."),
    fmt: str = typer.Option("fp8", "--format", help="fp8, int8 (W8A8 SmoothQuant) or int4 (weight-only)."),
    act: str = typer.Option("dynamic", "--act", help="fp8 activations: dynamic (per token) or static (per layer, step)."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="LiveAvatar LoRA (default: CKPT_DIR/liveavatar.safetensors)."),
    no_lora: bool = typer.Option(False, "--no-lora", help="Quantize the base model without a LoRA."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 64)."),
    keep_bf16: str = typer.Option("none", "--keep-bf16", help="none, auto (most sensitive within --bf16-budget-mb), "
                                                               "or comma-separated names/patterns."),
    bf16_budget_mb: Optional[float] = typer.Option(None, "--bf16-budget-mb", help="Extra MB for --keep-bf16 auto "
                                                                                   "(default 5% of the quantized size)."),
    tp: int = typer.Option(1, "--tp", help="Split the files for this many tensor-parallel ranks."),
    rows: int = typer.Option(512, "--rows", help="Input rows kept per layer for the alpha search and errors."),
    holdout: Optional[int] = typer.Option(None, "--holdout", help="Samples held out for the error report (default 1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration noise, shift draws and row sampling."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu (one layer on it at a time)."),
    calib_size: str = typer.Option("704*384", "--calib-size", help="Area budget W*H the clips are encoded at."),
    calib_blocks: int = typer.Option(2, "--calib-blocks", help="Streamed blocks per clip (x4 steps = passes)."),
    t5: Optional[Path] = typer.Option(None, "--t5", help="umT5 .pth (default: in CKPT_DIR)."),
    wav2vec: Optional[Path] = typer.Option(None, "--wav2vec", help="wav2vec2 folder (default: in CKPT_DIR)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Wan2.1 VAE .pth (default: in CKPT_DIR)."),
    kv_scratch: Optional[Path] = typer.Option(None, "--kv-scratch", help="Keep calibration KV caches in files "
                                                                          "here (when host RAM is short)."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the end-to-end error check vs bf16."),
    force: bool = typer.Option(False, "--force", help="Discard an unfinished or finished run in --out and restart."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Calibrate on your clips (block-streaming, one layer in memory) and write an fp8/int8/int4 folder."""
    from lowvram.errors import Interrupted
    from lowvram.quantize import QuantizeOptions, quantize_checkpoint

    try:
        report = quantize_checkpoint(QuantizeOptions(
            ckpt=ckpt_dir, out=out, calib=calib, lora=lora, no_lora=no_lora, lora_alpha=lora_alpha, fmt=fmt,
            act=act, keep_bf16=keep_bf16, bf16_budget_mb=bf16_budget_mb, tp=tp, rows=rows, holdout=holdout,
            seed=seed, device=device, force=force, evaluate=not no_eval, calib_size=calib_size,
            calib_blocks=calib_blocks, t5=t5, wav2vec=wav2vec, vae=vae, progress=not quiet, kv_scratch=kv_scratch))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {out} keeps what was finished: run the same command to resume") from None
    e2e = (report or {}).get("end_to_end")
    if e2e:
        print(f"{out}: {fmt} done; end-to-end error vs bf16 ({e2e['on']}): {e2e['final_rel_err_mean']:.4f}")


@app.command()
def reshard(
    folder: Path = typer.Argument(..., help="Folder written by `lowvram quantize`."),
    tp: int = typer.Option(..., "--tp", help="New tensor-parallel size."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write to this folder instead of in place."),
) -> None:
    """Re-split a quantized folder for another --tp (no re-calibration; verified against the manifest)."""
    from lowvram.quantize import reshard as do_reshard

    manifest = do_reshard(folder, tp, out)
    print(f"{out or folder}: split for tp {manifest['tp']['size']} ({len(manifest['files'])} files)")


@app.command()
def demo(
    out: Path = typer.Option(Path("lowvram-demo"), "--out", help="Folder for the tiny model, clips, videos and report."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """The whole path on a tiny random-weight model in the real layout: inspect, plan, quantize, run, bench."""
    from lowvram.demo import run_demo

    run_demo(out, device, console=wide_console())


@app.command()
def bench(
    baseline: str = typer.Option(..., "--baseline", help="The reference: the bf16 checkpoint folder (DIR or "
                                                         "DIR::OPTIONS, as for --candidate)."),
    candidate: list[str] = typer.Option(..., "--candidate", help="Repeat. A folder `lowvram run` accepts, optionally "
                                                                 "with run options after '::', e.g. OUT_INT8, "
                                                                 "'CKPT::--kv=fp8', 'OUT_FP8::--tp 2 --label fp8-tp2'. "
                                                                 "Options: --kv, --tp, --pp, --gpus, --lora, --no-lora, "
                                                                 "--ckpt-dir, --t5-device, --label."),
    clips: Path = typer.Option(..., "--clips", help="Clip set folder with clips.json (`lowvram calib make`)."),
    out: Path = typer.Option(..., "--out", help="Report folder; finished runs found in it are reused."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    size: str = typer.Option("704*384", "--size", help="Area budget W*H, the same for every configuration."),
    seconds: Optional[float] = typer.Option(5.0, "--seconds", help="Seconds of video per clip (0: whole clips)."),
    seed: int = typer.Option(UPSTREAM_SEED, "--seed", help="Noise and reference-shift seed, the same for every run."),
    rerun: bool = typer.Option(False, "--rerun", help="Run everything again instead of reusing finished runs."),
    fid: str = typer.Option("auto", "--fid", help="auto (when the Inception weights are here), on, off."),
    sync: str = typer.Option("auto", "--sync", help="Sync-C/Sync-D: auto (when SyncNet weights are here), on, off."),
    fid_weights: Optional[Path] = typer.Option(None, "--fid-weights", help="pt_inception-2015-12-05-6726825d.pth."),
    syncnet_weights: Optional[Path] = typer.Option(None, "--syncnet-weights", help="syncnet_v2.model."),
) -> None:
    """Run baseline and candidates on the same clips and seeds; write report.html, report.md and results.json.

    Speed, memory per rank, and quality vs the baseline: PSNR/SSIM, latent error, FID, Sync-C/D, a lip-sync proxy.
    """
    from lowvram.benchmarks.bench import BenchOptions, run_bench

    from lowvram.errors import Interrupted

    try:
        results = run_bench(BenchOptions(baseline=baseline, candidates=candidate, clips=clips, out=out,
                                         device=device, size=size, seconds=seconds or None, seed=seed, rerun=rerun,
                                         fid=fid, sync=sync, fid_weights=fid_weights,
                                         syncnet_weights=syncnet_weights))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the finished runs in {out} are kept: run the same command to go on") from None
    failed = sum(r["runs_failed"] for r in results["summary"]["rows"])
    print(f"wrote {out / 'report.html'}, {out / 'report.md'}, {out / 'results.json'}"
          + (f" ({failed} runs failed; see the report)" if failed else ""))


@app.command()
def ui(
    model_dir: Optional[Path] = typer.Argument(None, help="Folder written by `lowvram quantize`, or the bf16 checkpoint "
                                               "(can be changed in the page)."),
    ckpt_dir: Optional[Path] = typer.Option(None, "--ckpt-dir", help="Folder with the T5, VAE and wav2vec2 files."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, "--port", help="Port to serve on."),
    out: Path = typer.Option(Path("lowvram-ui"), "--out", help="Folder for the videos and reports."),
) -> None:
    """A local web page (and its HTTP API) that keeps the model loaded between jobs and shows the video as it grows."""
    import importlib.util

    from lowvram.errors import InputError

    if importlib.util.find_spec("gradio") is None:
        raise InputError("the web UI needs Gradio, which is not installed: pip install 'lowvram[ui]'")
    from lowvram.ui import serve

    serve(str(model_dir) if model_dir else None, str(ckpt_dir) if ckpt_dir else None, host, port, out)


def main() -> None:
    """Console entry point: every failure is one line on stderr and an exit code; LOWVRAM_DEBUG=1 shows tracebacks."""
    # Growable allocator segments: the 24 GB layouts are planned to ~1 GiB of headroom, which fragmentation of
    # fixed segments can eat (measured: 3.5 GiB reserved but unused at the moment of an OOM under a 24 GiB cap).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        returned = app(standalone_mode=False)
    except BaseException as err:  # noqa: BLE001 - this is the one place that turns failures into lines
        if os.environ.get("LOWVRAM_DEBUG") and not isinstance(err, (SystemExit, typer.Exit)):
            raise
        sys.exit(report_failure(err))
    # Without standalone mode typer returns (not raises) an exit code: 130 when it caught a Ctrl-C itself
    code = returned if isinstance(returned, int) else 0
    if code == 130:
        print("interrupted", file=sys.stderr)
    sys.exit(code)


def report_failure(err: BaseException) -> int:
    """Print one line for `err` and return the exit code. Only typer's public exception types are used."""
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    if isinstance(err, typer.Exit):
        return err.exit_code
    if isinstance(err, usage_error_types()):  # usage + one error line, as typer prints them
        show = getattr(err, "show", None)
        show() if show else print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    line, code = failure_line(err)
    print(line, file=sys.stderr)
    return code


def failure_line(err: BaseException) -> tuple[str, int]:
    """The one line and exit code `lowvram` reports for a failure (also shown by `lowvram ui`)."""
    if isinstance(err, LowvramError):
        return f"error: {err}", err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(err, typer.Abort):
        return "aborted", 1
    if type(err).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        first = str(err).split(". ")[0]
        return (f"error: {first} while running; the plan was too tight for this GPU: use --kv fp8, a smaller --size, "
                f"--format int4, more GPUs, or --no-compile (compiling autotunes with extra memory)", 3)
    if isinstance(err, OSError):
        return f"error: {describe_os_error(err)}", 1
    return (f"error: {type(err).__name__}: {err}; this is unexpected: run again with LOWVRAM_DEBUG=1 for the "
            f"traceback and report it", 1)


def usage_error_types() -> tuple:
    """typer >= 0.29 raises usage errors of its own (typer.TyperException); older ones click's ClickException."""
    found = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)


def describe_os_error(err: OSError) -> str:
    """A disk or permission problem as what happened to which path and what to do."""
    import errno

    path = err.filename or "a file"
    fixes = {
        errno.ENOSPC: f"no space left on the device holding {path}; free some space or write somewhere else",
        errno.EDQUOT: f"disk quota exceeded writing {path}; free some space or write somewhere else",
        errno.EROFS: f"{path}: the file system is read-only; write somewhere else",
        errno.EACCES: f"{path}: permission denied; check its permissions or choose another path",
        errno.EPERM: f"{path}: operation not permitted; check its permissions or choose another path",
        errno.EISDIR: f"{path}: is a folder; pass a file path",
        errno.ENOTDIR: f"{path}: a part of this path is a file, not a folder; fix the path",
        errno.ENOENT: f"{path}: no such file or folder; check the path",
    }
    return fixes.get(err.errno, f"{path}: {err.strerror or err}")


if __name__ == "__main__":
    main()
