"""The command-line contract every hubflow program keeps, and the flag types they share.

Misuse — a missing, unknown or malformed flag, or a value the program cannot use — is reported
as one line, ``<prog>: error: <message naming the flag>``, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_USAGE = 2


class UsageError(ValueError):
    """A user mistake in the command line, reported as one line naming the flag."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises :class:`UsageError` instead of printing and exiting."""

    def error(self, message: str):
        raise UsageError(message)


def configure_logging(*packages: str) -> None:
    """Warnings and errors from everything; progress (INFO) from the named hubflow packages."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in packages:
        logging.getLogger(name).setLevel(logging.INFO)


def report_usage_error(prog: str, error: UsageError) -> int:
    """Prints the one-line error to stderr; returns the exit status (2)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_USAGE


def positive_int(flag: str):
    """An argparse type: an integer > 0, with a message naming ``flag``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {value!r}") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {number}")
        return number

    return parse


def positive_int_or_zero(flag: str):
    """An argparse type: an integer > 0, or 0 for "no limit", which parses as None."""

    def parse(value: str) -> int | None:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {value!r}") from None
        if number < 0:
            raise argparse.ArgumentTypeError(
                f"{flag} must be positive, or 0 for no limit, got {number}"
            )
        return number or None

    return parse


def fraction(flag: str):
    """An argparse type: a number in [0, 1), with a message naming ``flag``."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {value!r}") from None
        if not 0.0 <= number < 1.0:
            raise argparse.ArgumentTypeError(f"{flag} must be in [0, 1), got {number}")
        return number

    return parse


def unit_fraction_or_zero(flag: str, zero_means: str):
    """An argparse type: a number in (0, 1], or 0 for ``zero_means``."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {value!r}") from None
        if not (number == 0.0 or 0.0 < number <= 1.0):
            raise argparse.ArgumentTypeError(
                f"{flag} must be in (0, 1], or 0 for {zero_means}, got {number}"
            )
        return 0.0 if number == 0.0 else number  # -0 too

    return parse
