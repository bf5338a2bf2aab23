"""What every entry point shares: one-line errors and the exit statuses.

Exit statuses of main.py, quant_main.py, launch.py, multiproc.py, classify.py, model2onnx.py and
checkpoint2model.py:

    0   done
    1   bad input: a missing or unreadable file, weights that do not fit, a full disk, a run that diverged
        (one line on stderr saying what and where)
    2   a bad command line: an unknown flag or a value out of its range (one line on stderr)
    75  stopped by SIGTERM or SIGINT after saving a checkpoint: run again with --resume to continue
        (sysexits' EX_TEMPFAIL, "temporary failure, try again", for retry loops and schedulers)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 75

T = TypeVar("T")


class UserError(ValueError):
    """Input the user can fix (a flag value, a file, a dataset, weights that do not fit): the entry points print
    its message as `<prog>: error: <message>` instead of a traceback. The package's own error classes (DataError,
    WeightsError, CheckpointError, ConfigError, ...) derive from it; any other exception is a defect and keeps
    its traceback."""


# What an entry point reports in one line: our refusals, and OSError from files, folders and disks.
USER_ERRORS = (UserError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `<prog>: error: <message>`, without the usage (-h shows it)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def error_message(err: BaseException) -> str:
    """The message of a user error; an OSError names its file and the system's reason."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err) or type(err).__name__


def print_error(prog: str, message: str) -> int:
    """Print `<prog>: error: <message>` on stderr; returns EXIT_ERROR for the caller to exit with."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def run_cli(prog: str, job: Callable[..., T], *args, **kwargs) -> T:
    """`job(*args, **kwargs)`; a user error (see USER_ERRORS) ends the program with its message and status 1."""
    try:
        return job(*args, **kwargs)
    except USER_ERRORS as err:
        raise SystemExit(print_error(prog, error_message(err))) from None


class Number:
    """An argparse `type` for a number within bounds, so that `--lr nan` or `--image-size 0` is refused at parse
    time with one line naming the flag.

        p.add_argument("--lr", type=Number(float, low=0))              # finite, >= 0
        p.add_argument("--prof", type=Number(int, low=1, off=-1))      # >= 1, or -1 meaning off
        p.add_argument("--dropout", type=Number(float, low=0, high=1, high_open=True))

    Floats must be finite. Values that do not come from the command line (configs.yml defaults) are checked
    by `check_numbers` after parsing.
    """

    def __init__(self, kind: type = int, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, off: int | None = None) -> None:
        self.kind, self.low, self.high, self.low_open, self.high_open, self.off = kind, low, high, low_open, \
            high_open, off
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def describe(self) -> str:
        """The accepted values in words, e.g. 'an integer >= 1, or -1 (off)'."""
        text = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            text += (f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                     f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text += f" {'<' if self.high_open else '<='} {self.high:g}"
        return text + (f", or {self.off} (off)" if self.off is not None else "")

    def admits(self, value) -> bool:
        """Whether `value` (already a number, or None for an unset flag) is within bounds."""
        if value is None or (self.off is not None and value == self.off):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if not self.admits(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return value

    def __repr__(self) -> str:
        return f"Number({self.describe()})"


def check_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check the values of `args` that did not pass through a flag's Number type (e.g. configs.yml defaults)."""
    for action in parser._actions:
        if isinstance(action.type, Number) and hasattr(args, action.dest):
            value = getattr(args, action.dest)
            values = value if isinstance(value, (list, tuple)) and action.nargs not in (None, "?") else [value]
            if not all(action.type.admits(v) for v in values):
                parser.error(f"argument {'/'.join(action.option_strings)}: must be {action.type.describe()}, "
                             f"got {value}")


def main_process() -> bool:
    """Whether this process is rank 0 of its job, or runs alone (torchrun's RANK; under srun without torchrun,
    SLURM_PROCID). Notes that every rank would print alike (a flag ignored on this machine, a data folder's oddity)
    are printed by rank 0 only."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def exit_status(summary: dict) -> int:
    """A training job's exit status: EXIT_INTERRUPTED when a signal stopped it (its checkpoint saved), else 0."""
    return EXIT_INTERRUPTED if summary.get("interrupted") else 0
