"""Command-line plumbing shared by the Beam jobs: one-line usage errors and flag types."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


class UsageError(ValueError):
    """A user mistake in the command line, reported as one line naming the flag."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def positive_int(flag: str):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {value!r}") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {number}")
        return number

    return parse


def fraction(flag: str):
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {value!r}") from None
        if not 0.0 <= number < 1.0:
            raise argparse.ArgumentTypeError(f"{flag} must be in [0, 1), got {number}")
        return number

    return parse


def unknown_flags(beam_args: Sequence[str]) -> list[str]:
    """Flags that neither hubflow nor any registered Beam options class knows (typos)."""
    from apache_beam.options import pipeline_options as po

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    classes = {str(c): c for c in po.PipelineOptions.__subclasses__()}
    try:
        for cls in classes.values():
            cls._add_argparse_args(parser)
    except (argparse.ArgumentError, AttributeError, TypeError):
        return []  # Beam's option classes changed shape: let Beam itself warn
    _, unknown = parser.parse_known_args(list(beam_args))
    return [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
