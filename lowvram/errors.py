"""User-facing errors: one line that names the problem and the fix, and an exit code."""


class LowvramError(Exception):
    """An error caused by the user's input or machine, reported as one line without a traceback."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CheckpointError(LowvramError):
    """A checkpoint (or LoRA) file is missing, corrupt, or of another model."""

    exit_code = 2


class InputError(LowvramError):
    """An input file (image, audio, prompt, size) cannot be used."""

    exit_code = 2


class DoesNotFitError(LowvramError):
    """The requested layout does not fit the GPUs' memory."""

    exit_code = 3


class Interrupted(LowvramError):
    """Ctrl-C (SIGINT): the message says what was kept and how to go on."""

    exit_code = 130


def one_of(flag: str, value, choices):
    """`value` if it is one of `choices`, else an InputError naming the valid ones (e.g. "--link usb: use ...")."""
    if value not in choices:
        raise InputError(f"{flag} {value}: not a valid choice; use one of {', '.join(map(str, choices))}")
    return value
