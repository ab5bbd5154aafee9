"""Untrusted text made inert: the one sanitiser for names and descriptions from outside.

Model cards, bundles, DICOM headers and file names are written by someone else. Before such text
reaches a terminal, a log, a JSON message, an HTML report, a PNG or a file header it goes through
``printable``: ANSI/VT escape sequences (which can clear a screen or retitle a terminal), C0 and C1
control characters, DEL and Unicode bidi overrides (which reorder what is shown) are removed, and
line breaks and tabs become one space, so one value stays one line and injects no field.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Sequence

# ESC-introduced sequences: CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings (up to BEL or ESC \),
# and two-character escapes (ESC + one char); then the 8-bit CSI/OSC forms.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b[\]PX^_].*?(?:\x07|\x1b\\|$)"
    r"|\x1b[ -/]*[0-~]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|[\x90\x98\x9d\x9e\x9f].*?(?:\x07|\x9c|$)",
    re.DOTALL)
_BREAKS = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]+")
# C0 (but the breaks above, already gone), DEL, C1, bidi embeddings/overrides/isolates and marks.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` as one line with nothing a terminal or a parser would act on (see the module docstring)."""
    s = str(text)
    s = _ESCAPES.sub("", s)
    s = _BREAKS.sub(" ", s)
    return _CONTROLS.sub("", s)


def escaped(text: object) -> str:
    """``text`` with its control characters written as Python escapes (``\\x1b``, ``\\n``): inert, yet
    it still tells which file is meant when the name itself holds them."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if _CONTROLS.match(ch) or _BREAKS.match(ch) else ch
                   for ch in str(text))


def is_printable(text: str) -> bool:
    """True when ``printable`` would leave ``text`` as it is."""
    return printable(text) == text


def printable_lines(text: object) -> str:
    """Like ``printable`` for text whose line structure matters (a traceback, a log): each line made
    inert, the lines kept apart by ``\\n``."""
    return "\n".join(printable(line) for line in str(text).splitlines())


def printable_fields(message: Dict[str, Any], multiline: Sequence[str] = ("details",)) -> Dict[str, Any]:
    """A copy of a JSON message whose string values are inert (``multiline`` keys keep their lines)."""
    return {key: (printable_lines(value) if key in multiline else printable(value)) if isinstance(value, str)
            else value for key, value in message.items()}
