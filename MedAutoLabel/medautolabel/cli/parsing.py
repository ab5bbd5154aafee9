"""Option validators and the parser class of the ``medautolabel`` command: a bad option is ONE line.

argparse's own ``error()`` prints a usage line and then ``prog: error: ...``; the promise of the
command is one line ``medautolabel: error: <option or file>: <problem>`` and exit status 2, so
``OneLineParser`` prints exactly that. Sub-command parsers made by ``add_subparsers`` inherit the
class (argparse uses the parent's class), including those registered by ``cli/train.py`` and
``cli/evaluate.py``.

The validators turn a string into a value or raise ``argparse.ArgumentTypeError`` with the problem;
argparse then names the option. NaN and infinities are refused everywhere: ``float("nan")`` would
otherwise slip through every comparison (``nan < 0`` is False).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import NoReturn

_ARGUMENT_PREFIX = re.compile(r"^argument ([^:]+): ")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``medautolabel: error: <option>: <problem>`` (no usage line) and exit with 2."""
        text = " ".join(str(message).split())
        match = _ARGUMENT_PREFIX.match(text)
        if match:  # "argument -n: ..." -> "-n: ..."; "--a/-b" -> the long option, which users type
            options = match.group(1).split("/")
            longest = max(options, key=len)
            text = f"{longest}: {text[match.end():]}"
        text = "".join(ch for ch in text if ch == "\t" or ord(ch) >= 32)
        sys.stderr.write(f"medautolabel: error: {text}\n")
        sys.exit(2)


def _number(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(str(text).strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def finite_float(text: str) -> float:
    """Any finite number (no NaN, no infinity)."""
    return _number(text)


def probability(text: str) -> float:
    """A finite number in 0..1 (a confidence threshold)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (a count of things to make or processes to start)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (a seed)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value

