"""What the command-line tools share: help without markup, failures as one ``error:`` line, no foreign noise.

Every ``python -m lightning_tracetrain ...`` command ends a failure with one
``error: ...`` line on stderr and exit status 2 (``--debug`` shows the
traceback instead), prints its ``--help`` from docstrings with the reST markup
taken out, and hides deprecation notices that third-party code raises on every
run and that a user cannot act on.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from lightning_tracetrain.exceptions import TraceTrainError

# Lightning 2.6 calls a torch pytree API that torch deprecated, on every fit, test and predict
_FOREIGN_NOTICES = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
T = TypeVar("T")


def plain(text: str) -> str:
    """Docstring text as --help shows it: ``code`` and :class:`~pkg.Name` become code and Name."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def wants_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    return [a for a in argv if a != "--debug"], "--debug" in argv


@contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """Any failure inside ends the command with one ``error: ...`` line and exit status 2.

    The library's own errors say what to do; anything else is named as unexpected, with the hint to
    rerun with ``--debug``, which lets the exception through with its traceback.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, TraceTrainError):
            message = f"{type(exc).__name__}: {message} (unexpected; run again with --debug to see the traceback)"
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def hide_foreign_notices() -> None:
    """Hide the third-party deprecation notices every run would print (see ``_FOREIGN_NOTICES``)."""
    for pattern in _FOREIGN_NOTICES:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """List ``--debug`` in a command's help (:func:`command` takes it out of the arguments before parsing)."""
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="on a failure, show the traceback"
    )
    return parser


def command(main: Callable[[list[str]], T]) -> Callable[[list[str] | None], T]:
    """A command's ``main(argv)``: ``--debug`` taken out, foreign notices hidden, failures as one error line."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> T:
        args, debug = wants_debug(sys.argv[1:] if argv is None else list(argv))
        hide_foreign_notices()
        with one_line_errors(debug):
            return main(args)

    return run
