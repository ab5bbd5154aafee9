"""Errors a user can cause: each carries one clear, patient-free message."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from medautolabel.text import printable


class MedAutoLabelError(Exception):
    """A problem the user can fix (bad file, unknown model, ...).

    ``str(error)`` is one line naming the file (when there is one) and the problem.
    The command line prints it and exits non-zero; the Slicer module shows it in a dialog. File names
    and problems often quote untrusted text (a card's label, a file name), so both are passed through
    ``text.printable``: an error line never carries an escape sequence or a line break.
    """

    def __init__(self, problem: str, path: Optional[Union[str, Path]] = None) -> None:
        self.problem = printable(problem)
        self.path = None if path is None else printable(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class InputError(MedAutoLabelError):
    """An input image is missing, unreadable, of the wrong kind or of the wrong shape."""


class ModelError(MedAutoLabelError):
    """A model is unknown, its card is broken, or its weights cannot be loaded safely."""


class Cancelled(MedAutoLabelError):
    """The user cancelled a long operation."""

    def __init__(self) -> None:
        super().__init__("cancelled by the user")


class Terminated(BaseException):
    """SIGTERM arrived: raised by the command's signal handler so that every ``finally`` (atomic
    writes removing their temporaries) runs before the process ends. A ``BaseException`` like
    ``KeyboardInterrupt``, so ``except Exception`` blocks that keep a batch going do not swallow it."""
