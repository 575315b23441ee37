"""The `lowvram` command line: parse, call, print. Errors become one line and an exit code."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from lowvram.errors import LowvramError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run Live Avatar (16.3B audio-driven avatar DiT) on consumer 24 GB GPUs.",
)


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
    """Identify a checkpoint and check its keys from the file headers only (seconds for 32 GB); exit 2 if incomplete."""
    from lowvram.checkpoint import CheckpointError, inspect_checkpoint, inspect_renderables

    report = inspect_checkpoint(ckpt_dir, lora, lora_alpha=lora_alpha, allow_pickle=allow_pickle)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        console = Console()
        for renderable in inspect_renderables(report):
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
    from lowvram.errors import DoesNotFitError, InputError
    from lowvram.plan import GPU_MODELS, plan_renderables, plan_report

    if kv not in ("bf16", "fp8"):
        raise InputError(f"--kv {kv!r}: use bf16 or fp8")
    if gpu_model not in GPU_MODELS:
        raise InputError(f"--gpu-model {gpu_model!r}: use one of {', '.join(GPU_MODELS)}")
    report = plan_report(model_dir, gpus, size, kv, link, fmt, gpu_model)
    if json_out:
        print(json.dumps(report, indent=1))
    else:
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 160)
        for renderable in plan_renderables(report):
            console.print(renderable)
    if report["chosen"] is None:
        fixes = "; ".join(report.get("suggestions") or []) or "a smaller size or more GPUs"
        raise DoesNotFitError(f"no layout fits {gpus} GiB at {size}; try {fixes}")


def main() -> None:
    """Console entry point: a LowvramError prints one line (no traceback) and sets the exit code."""
    try:
        app(standalone_mode=False)
    except LowvramError as err:
        print(f"error: {err}", file=sys.stderr)
        if os.environ.get("LOWVRAM_DEBUG"):
            raise
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors and the like
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
