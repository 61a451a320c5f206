"""What every command-line program here shares about bad input: it gets one line, ``error: ...``
on stderr, exit code 2, no traceback and no result file.

- ``Parser``: argparse whose own errors (an option's value that is not a number, a missing
  choice) are that one line, not the whole usage text.
- ``one_line_errors()``: the errors that mean "the input cannot be used" become that one line.
"""

import argparse
import contextlib
import sys

from evaluation.data import DataError
from evaluation.models import ModelLoadError
from evaluation.protocols import ProtocolError
from patches import UnsupportedModelError
from presses.registry import PressConfigError

BAD_INPUT = (PressConfigError, ProtocolError, DataError, ModelLoadError, UnsupportedModelError)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints its whole usage first; one line is enough
        fail(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def one_line_errors(*more: type[Exception]):
    """Inside, a bad-input error (``BAD_INPUT`` and ``more``) exits with its one-line message and code 2."""
    try:
        yield
    except (*BAD_INPUT, *more) as error:
        fail(str(error))
