"""Command-line argument handling shared by the trainer and every tool: one ``error: ...`` line for bad arguments.

argparse's own error prints the whole usage block before the message; :class:`OneLineParser` prints one line
(``error: <message> (see <prog> --help)``) and exits with code 2. The ``type=`` helpers below reject values
outside their range at parse time, naming the option."""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _number(kind, text: str, name: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None


def positive_int(text: str) -> int:
    value = _number(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def clamp_len(text: str) -> int:
    value = _number(int, text, "an integer")
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (no clamping) or >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text, "a number")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """(0, 1]: a top-p of 0 would keep no token."""
    value = _number(float, text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 keeps every token), got {text}")
    return value


def device(text: str) -> str:
    """cpu, cuda or cuda:N, refused at parse time when no GPU is visible."""
    import torch     # costly: only a --device argument needs it, and light commands share this module
    if text != "cpu" and not text.startswith("cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no GPU is visible to torch (use --device cpu)")
    return text


def positive_float(text: str) -> float:
    value = _number(float, text, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
