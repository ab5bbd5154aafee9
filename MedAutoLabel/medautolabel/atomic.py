"""Write-then-rename: an output file is either complete or absent, never half written."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, List, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

TEMP_PREFIX = ".~medautolabel-"  # hidden; every temp name starts with it and ends with the target's name


def _default_mode() -> int:
    """The mode a newly created file would get (0o666 minus the umask)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def _make_temp(path: Path) -> Path:
    """An empty private (0600) file in ``path``'s folder whose name ends with ``path.name``."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + path.name, dir=str(path.parent))
    os.close(fd)
    return Path(name)


def leftover_temps(path: PathLike) -> List[Path]:
    """Temporaries for ``path`` that a killed writer left beside it (``mkstemp``'s random part has no ``-``)."""
    target = Path(path)
    pattern = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]+-" + re.escape(target.name))
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a private temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temp name keeps ``path``'s full name as its ending (``.nii.gz`` etc.), so writers that pick
    a format by extension behave as for ``path``. On any exception the temp file is removed and
    ``path`` is left as it was. The final file gets ordinary permissions (0666 minus the umask).
    """
    with atomic_outputs([path]) as (temp,):
        yield temp


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[PathLike]) -> Iterator[List[Path]]:
    """Like ``atomic_output`` for several files at once: all are renamed into place, or none.

    Renames happen only after the whole block has succeeded; if a rename fails, the files already
    renamed by this call are removed again, so no partial set is left behind.
    """
    targets = [Path(p) for p in paths]
    temps: List[Path] = []
    try:
        for target in targets:
            temps.append(_make_temp(target))
        yield list(temps)
        mode = _default_mode()
        for temp in temps:
            os.chmod(temp, mode)
        done: List[Path] = []
        try:
            for temp, target in zip(temps, targets):
                os.replace(temp, target)
                done.append(target)
        except BaseException:
            for target in done:
                _remove(target)
            raise
    finally:
        for temp in temps:
            _remove(temp)
