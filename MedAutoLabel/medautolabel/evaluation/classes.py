"""Image-level classes: reference and predicted class of each case per task, checked, then measured.

References come from a ``labels.csv`` (io/case_labels.py; its row numbers name a bad reference)
or from the ``classes`` of the cases in a dataset.json. Predictions are the ``probabilities`` of a
``<case>.tags.json``. A task's classes and their order are the predictions' (the model's own list,
a known negative/positive pair put negative first: ``case_labels.binary_order``), so the positive
class of a two-class task is the model's second class; a reference class the predictions do not
know is refused (no model can call it). A case whose reference has a task its prediction lacks is
listed as ``not_predicted`` for that task, never silently left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from medautolabel.errors import InputError
from medautolabel.evaluation.metrics import predicted_class, task_metrics
from medautolabel.evaluation.pairing import plain_case
from medautolabel.io.case_labels import CaseLabels, binary_order, quoted


@dataclass
class ClassReference:
    """Reference classes per case (case -> task -> class) and where each came from, to name it in a message."""

    labels: Dict[str, Dict[str, str]] = field(default_factory=dict)
    sources: Dict[Tuple[str, str], Tuple[Path, str]] = field(default_factory=dict)  # -> (file, "row 7: ")
    order: Dict[str, List[str]] = field(default_factory=dict)  # task -> classes, for tasks nobody predicted

    @classmethod
    def from_case_labels(cls, table: CaseLabels) -> ClassReference:
        """The references of a ``labels.csv``, its case cells compared as case names (``pairing.plain_case``)."""
        out = cls(order={task: list(names) for task, names in table.classes.items()})
        first_row: Dict[str, Tuple[str, int]] = {}
        for (case, task), row in sorted(table.rows.items(), key=lambda item: item[1]):
            name = plain_case(case)
            seen = first_row.setdefault(name, (case, row))
            if seen[0] != case:
                raise InputError(f"row {row}: case {quoted(case)} is the same case as {quoted(seen[0])} of row "
                                 f"{seen[1]} (an extension and an MSD _0000 suffix are ignored)", table.path)
            out.labels.setdefault(name, {})[task] = table.labels[case][task]
            out.sources[(name, task)] = (table.path, f"row {row}: ")
        return out

    def add(self, case: str, classes: Mapping[str, str], source: Path) -> None:
        """Add the classes of ``case`` read from ``source`` (a dataset.json)."""
        for task, klass in classes.items():
            self.labels.setdefault(case, {})[task] = klass
            self.sources[(case, task)] = (source, f"case {quoted(case)}: ")
            known = self.order.setdefault(task, [])
            if klass not in known:
                known.append(klass)


@dataclass
class _Task:
    classes: List[str]
    first_tags: Optional[Path]
    cases: List[str] = field(default_factory=list)
    truth: List[str] = field(default_factory=list)
    probabilities: List[Dict[str, float]] = field(default_factory=list)
    not_predicted: List[str] = field(default_factory=list)


def _task_classes(task: str, predictions: Mapping[str, Tuple[Optional[Path], Dict[str, Dict[str, float]]]],
                  cases: List[str], fallback: List[str]) -> Tuple[List[str], Optional[Path]]:
    """The task's classes from the first prediction that has it (checked against every other one), or the
    reference's order when no prediction has the task."""
    found: Optional[Tuple[List[str], Path]] = None
    for case in cases:
        tags, tasks = predictions.get(case, (None, {}))
        if task not in tasks or tags is None:
            continue
        names = binary_order(list(tasks[task]))
        if found is None:
            found = (names, tags)
        elif set(names) != set(found[0]):
            raise InputError(f"task {quoted(task)}: classes {', '.join(quoted(n) for n in names)} here, but "
                             f"{', '.join(quoted(n) for n in found[0])} in {found[1].name}", tags)
    return (found[0], found[1]) if found else (binary_order(fallback), None)


def evaluate_classes(cases: List[str], reference: ClassReference,
                     predictions: Mapping[str, Tuple[Optional[Path], Dict[str, Dict[str, float]]]]
                     ) -> Dict[str, Dict[str, Any]]:
    """Per task of the references of ``cases``: ``task_metrics`` (when a prediction has the task) plus
    ``classes``, ``not_predicted`` (cases whose prediction lacks the task) and ``misclassified`` (case,
    reference, predicted, probabilities). ``predictions``: case -> (its tags.json or None, task -> class
    probabilities)."""
    tasks: Dict[str, _Task] = {}
    for case in cases:
        for task in reference.labels.get(case, {}):
            if task not in tasks:
                tasks[task] = _Task(*_task_classes(task, predictions, cases, reference.order.get(task, [])))
    for case in cases:
        tags, predicted = predictions.get(case, (None, {}))
        for task, truth in reference.labels.get(case, {}).items():
            t = tasks[task]
            if task not in predicted:
                t.not_predicted.append(case)
                continue
            if truth not in t.classes:
                source, where = reference.sources[(case, task)]
                raise InputError(f"{where}task {quoted(task)}: class {quoted(truth)} is not one the predictions "
                                 f"give ({', '.join(quoted(n) for n in t.classes)})", source)
            t.cases.append(case)
            t.truth.append(truth)
            t.probabilities.append(predicted[task])
    out: Dict[str, Dict[str, Any]] = {}
    for task, t in tasks.items():
        result: Dict[str, Any] = task_metrics(t.truth, t.probabilities, t.classes) if t.truth else \
            {"n": 0, "classes": t.classes}
        result["not_predicted"] = t.not_predicted
        result["misclassified"] = [
            {"case": case, "reference": truth, "predicted": called,
             "probabilities": {c: probabilities[c] for c in t.classes}}
            for case, truth, probabilities in zip(t.cases, t.truth, t.probabilities)
            if (called := predicted_class(probabilities, t.classes)) != truth]
        out[task] = result
    return out
