"""The `lowvram` command line: parse, call, print. Errors become one line and an exit code."""

from __future__ import annotations

import os
import sys

import typer

from lowvram.errors import LowvramError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run Live Avatar (16.3B audio-driven avatar DiT) on consumer 24 GB GPUs.",
)


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
