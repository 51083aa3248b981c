"""Command-line parsing shared by `trl-arcopo` and `trl-arcopo-reward-server`: strict parsers with one-line errors.

Imports only the standard library, so that a command can check its arguments before it imports torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, NoReturn

__all__ = ["ArgumentParser", "StrictParserMixin", "fail"]

# What CPython reads as a negative number since 3.14 (gh-123945); before, `--learning_rate -1e-3` saw `-1e-3` as an
# unknown option and failed with "expected one argument".
_NEGATIVE_NUMBER = re.compile(r"-\.?\d")


def fail(message: BaseException | str) -> NoReturn:
    """Print `error: <message>` on stderr, its whitespace (newlines included) collapsed to single spaces, and exit
    with code 2 (argparse's convention), no traceback."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


class StrictParserMixin:
    """Mix into an `argparse.ArgumentParser` subclass (before it): no abbreviated options (`--lr` is an error, not a
    guess among `--lr_scheduler_type` and `--lr_scheduler_kwargs`), negative numbers such as `-1e-3` are values, and
    errors are one line on stderr with exit code 2 instead of the whole usage followed by the message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (`{self.prog} --help` lists the options)")


class ArgumentParser(StrictParserMixin, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with the behaviour of `StrictParserMixin`."""
