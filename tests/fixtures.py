"""Shared test helpers: where the parity tests read the upstream fixtures from (LOWVRAM_REFERENCE_DIR, else
tests/reference/), the DiT config a tiny_dit set describes, and the CLI run in-process.

Tests that read a fixture set take every size from it (its config.json or its tensors' shapes), so any set in
the reference layout works; scripts/make_alt_reference.py writes one with other sizes to check that."""

import contextlib
import io
import json
import os
import sys
from pathlib import Path


def reference_dir() -> Path:
    env = os.environ.get("LOWVRAM_REFERENCE_DIR")
    return Path(env) if env else Path(__file__).parent / "reference"


def tiny_dit_config(folder: Path | None = None):
    """The DiTConfig of a tiny_dit set: its constructor config plus the pipeline settings it was sampled with."""
    from lowvram.model.config import DiTConfig

    fx = json.loads(((folder or reference_dir() / "tiny_dit") / "config.json").read_text())
    pipe = fx["pipeline"]
    pixel_frames, latent_frames = pipe["motion_frames"]
    return DiTConfig.from_dict({**fx["model"], "frames_per_block": pipe["num_frames_per_block"],
                                "blocks_per_clip": pipe["num_blocks"], "num_steps": pipe["sampling_steps"],
                                "scheduler_shift": pipe["scheduler_shift"], "motion_pixel_frames": pixel_frames,
                                "motion_latent_frames": latent_frames})


def tiny_dit_latent_hw(folder: Path | None = None) -> tuple[int, int]:
    fx = json.loads(((folder or reference_dir() / "tiny_dit") / "config.json").read_text())
    return tuple(fx["pipeline"]["latent_hw"])


def run_cli(*args: str) -> tuple[int, str, str]:
    """`lowvram ARGS` in-process through the real entry point; (exit code, stdout, stderr)."""
    from lowvram.cli import main

    err, out = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["lowvram", *args]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()
