"""Argument types and the parser class every command shares."""

from __future__ import annotations

import argparse

from ray_jobs.config.declare import Pool
from ray_jobs.errors import UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of usage + error
        raise UsageError(f"{self.prog}: {message}")


def min_max(text: str) -> Pool:
    """An argparse type for ``MIN-MAX`` (or ``N``): an actor pool's bounds."""
    try:
        return Pool.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
