"""Write-then-rename: an output file is either complete or absent, never half written.

Failures of the output side (full disk, read-only or forbidden folder, a file where a folder
should be, a name too long, a file too large) become one ``MedAutoLabelError`` naming the target,
here and nowhere else; the temporaries are removed first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

from medautolabel.errors import MedAutoLabelError

PathLike = Union[str, "os.PathLike[str]"]

TEMP_PREFIX = ".~medautolabel-"  # hidden; every temp name starts with it and ends with the target's name
NAME_MAX = 255  # bytes of one file name on the usual file systems
_RANDOM_LENGTH = 8  # mkstemp's random part
_TAIL_BYTES = 64  # a long target name's ending kept in its temp name (the extension picks the format)

_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a file is in the way where a folder is needed",
    errno.EEXIST: "a file is in the way where a folder is needed",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large (file size limit of the system or the file system)",
    errno.ENOENT: "the folder does not exist",
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _PROBLEMS[errno.EDQUOT] = "disk quota exceeded"


def output_error(error: OSError, path: PathLike) -> MedAutoLabelError:
    """The one-line user error for an operating-system error while writing ``path``."""
    problem = _PROBLEMS.get(error.errno or 0, f"cannot write: {error.strerror or error}")
    return MedAutoLabelError(problem, path)


def make_folder(path: PathLike) -> Path:
    """``mkdir -p path``, with failures as one-line user errors naming ``path``."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MedAutoLabelError("is a file, not a folder", folder) from None
    except OSError as e:
        raise output_error(e, folder) from None
    return folder


def _default_mode() -> int:
    """The mode a newly created file would get (0o666 minus the umask)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_suffix(name: str) -> str:
    """The ending of a temp name for target ``name``: ``-<name>``, shortened when it would be too long.

    A long name keeps a digest of the whole name and its last bytes (so the extension still picks
    the writer's format), and the temp name stays within NAME_MAX.
    """
    if len(os.fsencode(TEMP_PREFIX + "-" + name)) + _RANDOM_LENGTH <= NAME_MAX:
        return "-" + name
    tail = name
    while len(os.fsencode(tail)) > _TAIL_BYTES:
        tail = tail[1:]
    return "-~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16] + "-" + tail


def _make_temp(path: Path) -> Path:
    """An empty private (0600) file in ``path``'s folder whose name ends with ``path.name`` (or its tail)."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=_temp_suffix(path.name), dir=str(path.parent))
    os.close(fd)
    return Path(name)


def leftover_temps(path: PathLike) -> List[Path]:
    """Temporaries for ``path`` that a killed writer left beside it (``mkstemp``'s random part has no ``-``)."""
    target = Path(path)
    pattern = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]+" + re.escape(_temp_suffix(target.name)))
    try:
        return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _disk_full(folder: Path) -> bool:
    """True when ``folder``'s file system has no block left for an ordinary user."""
    try:
        return hasattr(os, "statvfs") and os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def _as_user_error(error: BaseException, targets: Sequence[Path], temps: Sequence[Path]) -> Optional[Exception]:
    """The one-line error to raise instead of ``error`` (a system error, or a writer's error naming a temp), or None.

    It names the target whose temporary the error names; else the target whose temporary was being
    made (``temps`` is still shorter than ``targets``); else the first.
    """
    def target_of(name: Optional[str]) -> Path:
        for temp, target in zip(temps, targets):
            if name is not None and os.path.basename(str(name)) == temp.name:
                return target
        return targets[len(temps)] if len(temps) < len(targets) else targets[0]

    if isinstance(error, OSError) and error.errno is not None:
        return output_error(error, target_of(error.filename))
    if isinstance(error, MedAutoLabelError) and any(error.path == str(t) for t in temps):
        target = target_of(error.path)
        problem = "no space left on the device" if _disk_full(target.parent) else error.problem
        return MedAutoLabelError(problem, target)
    return None


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

    Temporaries that killed earlier writers left for these targets are removed first. Renames
    happen only after the whole block has succeeded; if a rename fails, the files already renamed
    by this call are removed again, so no partial set is left behind. Operating-system errors (and
    a writer's error naming a temporary) become a ``MedAutoLabelError`` naming the target.
    """
    targets = [Path(p) for p in paths]
    temps: List[Path] = []
    try:
        for target in targets:
            for leftover in leftover_temps(target):
                _remove(leftover)
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
    except (OSError, MedAutoLabelError) as e:
        user_error = _as_user_error(e, targets, temps) if targets else None
        if user_error is None:
            raise
        raise user_error from None
    finally:
        for temp in temps:
            _remove(temp)
