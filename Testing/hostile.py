"""The hostile-input corpus's harness: run a command, then check the four promises of every case.

Each corpus case (``Testing/test_hostile_*.py``) runs one ``medautolabel`` command on a bad input,
a bad output location, a bad model or a signal, and asserts with ``assert_refused``:

1. the exact exit status (2 for anything the user can cause);
2. exactly one line on stderr, ``medautolabel: error: <file>: <problem>``, naming the file and
   holding the words that describe the problem, and no traceback;
3. nothing left behind: no output file and no ``.~medautolabel-*`` temporary anywhere under the
   folders given;
4. the inputs byte-identical afterwards (``Snapshot`` taken before the run).

``run_inprocess`` calls ``cli.main`` (fast); ``run_process`` runs ``python -m medautolabel`` in a
fresh process (for signals, start-up and the console script itself).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from medautolabel.io.atomic import TEMP_PREFIX

PathLike = Union[str, Path]


@dataclass
class Outcome:
    """What a command did: its exit status and its output, split into lines."""

    status: int
    out: List[str]
    err: List[str]


def run_inprocess(args: Sequence[PathLike]) -> Outcome:
    """``cli.main(args)`` with stdout/stderr captured (argparse's own exits turned into a status)."""
    from medautolabel.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors exit 2 with a usage line + one error line
            status = int(e.code or 0)
    return Outcome(status, out.getvalue().splitlines(), err.getvalue().splitlines())


def process_env(**extra: str) -> Dict[str, str]:
    """The environment for a child ``medautolabel`` process: this one's, plus ``extra``."""
    env = dict(os.environ)
    env.update(extra)
    return env


def run_process(args: Sequence[PathLike], timeout: float = 300, env: Optional[Dict[str, str]] = None,
                cwd: Optional[PathLike] = None) -> Outcome:
    """``python -m medautolabel args`` in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "medautolabel", *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=timeout, env=env or process_env(), cwd=None if cwd is None else str(cwd))
    return Outcome(proc.returncode, proc.stdout.splitlines(), proc.stderr.splitlines())


class Snapshot:
    """Every file under some paths with its bytes' digest, to prove later that nothing changed."""

    def __init__(self, *paths: PathLike) -> None:
        self.paths = [Path(p) for p in paths]
        self.digests = self._take()

    def _take(self) -> Dict[str, str]:
        found: Dict[str, str] = {}
        for root in self.paths:
            files = [root] if root.is_file() or root.is_symlink() else sorted(root.rglob("*")) if root.exists() else []
            for f in files:
                if f.is_symlink() and not f.exists():
                    found[str(f)] = "dangling -> " + os.readlink(f)
                elif f.is_file():
                    try:
                        found[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
                    except OSError as e:  # unreadable on purpose: its mode is what must not change
                        found[str(f)] = f"unreadable {e.errno} {oct(f.stat().st_mode)}"
        return found

    def assert_unchanged(self) -> None:
        now = self._take()
        assert now == self.digests, {k: (self.digests.get(k), now.get(k))
                                     for k in set(now) | set(self.digests) if now.get(k) != self.digests.get(k)}


def temporaries(*folders: PathLike) -> List[str]:
    """Every ``.~medautolabel-*`` file or folder under ``folders``."""
    found = []
    for folder in folders:
        root = Path(folder)
        if root.is_dir():
            found += [str(p) for p in root.rglob(TEMP_PREFIX + "*")]
    return sorted(found)


def new_files(before: Snapshot, *folders: PathLike) -> List[str]:
    """Files under ``folders`` that were not in ``before``."""
    after = Snapshot(*folders)
    return sorted(set(after.digests) - set(before.digests))


def assert_refused(outcome: Outcome, names: Iterable[str], words: Iterable[str], *,
                   untouched: Optional[Snapshot] = None, no_temps_in: Iterable[PathLike] = (),
                   no_files_in: Iterable[PathLike] = (), status: int = 2) -> None:
    """The four promises of a corpus case (see the module docstring).

    ``names``: strings the one error line must contain (the file's name); ``words``: words of the
    problem (case-insensitive); ``untouched``: a snapshot of the inputs taken before the run, which
    must still hold; ``no_temps_in``: folders that must hold no temporary; ``no_files_in``: output
    folders that must hold no file at all (absent or empty).
    """
    assert outcome.status == status, (outcome.status, outcome.err)
    err = [line for line in outcome.err if line.strip()]
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("medautolabel: error: "), line
    assert "Traceback" not in line
    for name in names:
        assert str(name) in line, (name, line)
    for word in words:
        assert word.lower() in line.lower(), (word, line)
    assert all(ch == "\t" or ord(ch) >= 32 for ch in line), repr(line)  # no control characters
    folders = [Path(c) for c in no_temps_in] + [Path(c) for c in no_files_in]
    assert temporaries(*folders) == [], temporaries(*folders)
    if untouched is not None:
        untouched.assert_unchanged()
    for folder in no_files_in:
        folder = Path(folder)
        leftovers = sorted(str(p) for p in folder.rglob("*") if not p.is_dir()) if folder.is_dir() else []
        assert leftovers == [], leftovers


def assert_absent(text: str, *folders: PathLike, outcome: Optional[Outcome] = None) -> None:
    """``text`` (e.g. a planted patient name) appears in no file under ``folders`` nor in ``outcome``'s output."""
    needle = text.encode("utf-8")
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file():
                assert needle not in f.read_bytes(), f
    if outcome is not None:
        assert text not in "\n".join(outcome.out + outcome.err)
