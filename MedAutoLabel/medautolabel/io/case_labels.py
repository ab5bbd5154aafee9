"""Case-level class labels: the one reader of ``labels.csv`` (columns ``case,task,class``).

A ``labels.csv`` says, per case and task, which class the case is (``case01,aneurysm,present``).
``evaluate`` takes it as the class reference and training takes it as class targets; both read it
here, so both refuse the same files with the same one-line messages.

The file: UTF-8 (a byte-order mark is allowed), comma-separated, a header row naming at least the
columns ``case``, ``task`` and ``class`` (any order, any case; other columns are ignored), then one
row per case and task. Cells are stripped of surrounding blanks; blank lines are skipped. Row
numbers in messages are the file's line numbers (the header is row 1), as a spreadsheet shows them.

Refused, as one ``InputError`` naming the file, the row and the field: a missing, unreadable or
non-UTF-8 file; a missing header column; an empty case, task or class cell; a second row for the
same case and task (the same class again or another one); a task with only one class (a classifier
needs two); more than ``MAX_ROWS`` rows or a line longer than ``MAX_LINE`` bytes. Text quoted
from the file passes ``text.printable`` (and is shortened) before it reaches a message.

Class order per task (``CaseLabels.classes``): the order of first appearance, except that a
two-class task whose classes are one of ``NEGATIVE_POSITIVE`` (``absent``/``present``, ``no``/``yes``,
...; compared case-insensitively) lists the negative class first, so the second class is the
positive one whatever row came first (``binary_order``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple, Union

from medautolabel.errors import InputError
from medautolabel.text import printable

PathLike = Union[str, Path]

REQUIRED = ("case", "task", "class")
MAX_ROWS = 1_000_000  # rows after the header: far more cases than any labelled dataset has
MAX_LINE = 10_000  # bytes of one line: three names and a few extra columns fit many times over
NEGATIVE_POSITIVE = (("absent", "present"), ("no", "yes"), ("negative", "positive"), ("false", "true"),
                     ("0", "1"), ("normal", "abnormal"))


@dataclass(frozen=True)
class CaseLabels:
    """What a ``labels.csv`` says: classes per task, the class of each case per task, and where each came from.

    ``classes``: task -> its classes (order: see the module docstring); ``labels``: case -> task ->
    class; ``rows``: (case, task) -> the row number that gave it (for messages about that row).
    """

    path: Path
    classes: Dict[str, List[str]]
    labels: Dict[str, Dict[str, str]]
    rows: Dict[Tuple[str, str], int]


def quoted(text: object, limit: int = 80) -> str:
    """``'text'`` made inert and at most ``limit`` characters long, for a message quoting a file's text."""
    s = printable(text)
    return "'" + (s if len(s) <= limit else s[: limit - 3] + "...") + "'"


def binary_order(classes: Sequence[str]) -> List[str]:
    """``classes`` with a known negative/positive pair (``NEGATIVE_POSITIVE``) put negative first; any other
    list (more or fewer than two classes, or two other names) is returned in its own order."""
    names = list(classes)
    if len(names) == 2:
        low = [n.lower() for n in names]
        for negative, positive in NEGATIVE_POSITIVE:
            if low == [positive, negative]:
                return names[::-1]
    return names


def _lines(f, path: Path) -> Iterator[str]:
    """The file's lines decoded one by one (so a bad byte is named by its row), refusing a line longer than
    ``MAX_LINE`` bytes before it is held whole in memory."""
    number = 0
    while True:
        raw = f.readline(MAX_LINE + 3)  # the line break may take two bytes
        if not raw:
            return
        number += 1
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, as spreadsheets write
            raw = raw[3:]
        if len(raw.rstrip(b"\r\n")) > MAX_LINE:
            raise InputError(f"row {number}: line longer than {MAX_LINE:,} bytes: not a labels table", path)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"row {number}: not UTF-8 text (byte {e.start + 1} of the row is "
                             f"{raw[e.start]:#04x}): save the table as UTF-8 CSV", path) from None


def _header(row: List[str], path: Path) -> Dict[str, int]:
    """Column name -> index of the required columns; InputError when one is missing or given twice."""
    names = [cell.strip().lower() for cell in row]
    found: Dict[str, int] = {}
    for name in REQUIRED:
        where = [n for n, cell in enumerate(names) if cell == name]
        if len(where) > 1:
            raise InputError(f"row 1: column '{name}' appears {len(where)} times in the header", path)
        if where:
            found[name] = where[0]
    lacking = [name for name in REQUIRED if name not in found]
    if lacking:
        raise InputError(f"row 1: the header lacks the column{'s' if len(lacking) > 1 else ''} "
                         f"{', '.join(repr(n) for n in lacking)} (it needs case, task, class)", path)
    return found


def _records(path: Path) -> Iterator[Tuple[int, List[str]]]:
    """(row number, cells) of every non-blank row, the header first; every read problem as an InputError."""
    try:
        with open(path, "rb") as f:
            reader = csv.reader(_lines(f, path), strict=True)
            start = 1
            for cells in reader:
                if any(cell.strip() for cell in cells):
                    yield start, cells
                start = reader.line_num + 1
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except IsADirectoryError:
        raise InputError("is a folder, not a labels.csv file", path) from None
    except csv.Error as e:
        raise InputError(f"not a CSV table ({printable(e)})", path) from None
    except OSError as e:
        raise InputError(f"cannot be read ({type(e).__name__})", path) from None


def read_case_labels(path: PathLike) -> CaseLabels:
    """Read ``labels.csv`` (see the module docstring for the format, the class order and what is refused)."""
    p = Path(path)
    records = _records(p)
    first = next(records, None)
    if first is None:
        raise InputError("empty: expected a header row 'case,task,class' and one row per case and task", p)
    columns = _header(first[1], p)
    classes: Dict[str, List[str]] = {}
    labels: Dict[str, Dict[str, str]] = {}
    rows: Dict[Tuple[str, str], int] = {}
    for count, (number, cells) in enumerate(records, start=1):
        if count > MAX_ROWS:
            raise InputError(f"row {number}: more than {MAX_ROWS:,} rows: not a labels table", p)
        case, task, klass = (cells[columns[name]].strip() if columns[name] < len(cells) else ""
                             for name in REQUIRED)
        for name, value in zip(REQUIRED, (case, task, klass)):
            if not value:
                raise InputError(f"row {number}: the {name} cell is empty", p)
        earlier = rows.get((case, task))
        if earlier is not None:
            before = labels[case][task]
            what = (f"again ({quoted(klass)}, as in row {earlier})" if before == klass else
                    f"with class {quoted(klass)}, but row {earlier} says {quoted(before)}")
            raise InputError(f"row {number}: case {quoted(case)}, task {quoted(task)} {what}: "
                             "one row per case and task", p)
        rows[(case, task)] = number
        labels.setdefault(case, {})[task] = klass
        known = classes.setdefault(task, [])
        if klass not in known:
            known.append(klass)
    for task, names in classes.items():
        if len(names) < 2:
            raise InputError(f"task {quoted(task)}: only one class ({quoted(names[0])}) in {p.name}; "
                             "a classifier needs at least two", p)
    return CaseLabels(p, {task: binary_order(names) for task, names in classes.items()}, labels, rows)


def check_known_cases(labels: CaseLabels, known: Iterable[str], path: PathLike, what: str = "image") -> None:
    """Refuse a case of ``labels`` that is not in ``known``: InputError "row 7: case 'x' has no image".

    ``path`` is the labels file to name; ``what`` says what the case lacks ("image", "reference
    labelmap", ...). The first such row (in file order) is the one named.
    """
    names = set(known)
    unknown = sorted((number, case) for (case, _task), number in labels.rows.items() if case not in names)
    if unknown:
        number, case = unknown[0]
        more = f" (and {len(unknown) - 1} more row(s))" if len(unknown) > 1 else ""
        raise InputError(f"row {number}: case {quoted(case)} has no {what}{more}", path)
