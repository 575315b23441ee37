"""Shared test helpers: where the parity tests read the upstream fixtures from (LOWVRAM_REFERENCE_DIR, else
tests/reference/), and the CLI run in-process."""

import contextlib
import io
import os
import sys
from pathlib import Path


def reference_dir() -> Path:
    env = os.environ.get("LOWVRAM_REFERENCE_DIR")
    return Path(env) if env else Path(__file__).parent / "reference"


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
