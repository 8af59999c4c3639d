"""Errors and argument types shared by the command modules."""

from __future__ import annotations

import argparse


class CliError(Exception):
    """A failure to report as one line, without a traceback."""


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 for all")
    return value
