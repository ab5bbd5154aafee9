"""``medautolabel models list | show | export-bundle``: the models that can be found, one model's card, a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from medautolabel.cli.progress import say
from medautolabel.text import printable


def _source(card) -> str:
    """Where a card comes from: built-in, in memory, or its folder."""
    from medautolabel.catalog.registry import BUILTIN_DIR

    folder = Path(card.path).parent if card.path else None
    if folder is None:
        return "in memory"
    return "built-in" if folder.parent == BUILTIN_DIR else str(folder)


def _network(spec) -> str:
    """A network entry in one phrase: architecture, weights file, sha256."""
    return f"{spec.architecture} ({spec.weights}, sha256 {spec.sha256 or 'not given'})"


def _task_lines(task) -> list:
    """A classification task: classes, method, validation; for a classifier network also what it looks at
    and how its probabilities are made and decided."""
    sigmoid = task.method == "network" and task.activation == "sigmoid"
    classes = (", ".join(task.classes) + "; independent findings, one tag each as task/class (absent / present)"
               if sigmoid else " / ".join(task.classes))
    lines = [f"  classification: {task.task} ({classes}) by {task.method}"
             + ("" if task.validated else ", NOT VALIDATED")]
    if task.method != "network":
        return lines
    i = task.input
    region = i.region
    if i.segment is not None:
        region += f" of segment {i.segment!r} (margin {i.margin_mm:g} mm)"
    if i.region == "components":
        region += f", combined by {i.combine}"
    size = " x ".join(str(n) for n in i.shape) + " voxels"
    if i.spacing is not None:
        size += " at " + " x ".join(f"{s:g}" for s in i.spacing) + " mm"
    rule = ", ".join(f"{k} from p {v:g}" for k, v in task.thresholds.items())
    if sigmoid:
        rule = "present from p 0.5" + (f" ({rule})" if rule else "")
    lines += [f"    network: {_network(task.network)}",
              f"    looks at: {region}, resampled to {size}",
              f"    {task.activation}, temperature {task.temperature:g}; decides: {rule or 'most probable class'}"]
    return lines


def cmd_models_list(args: argparse.Namespace) -> int:
    """One row per model that can be found."""
    from medautolabel.catalog.registry import list_models

    cards = list_models()
    if not cards:
        print("no models found")
        return 0
    rows = [("ID", "VERSION", "MODALITY", "LABELS", "CLASSES", "SOURCE")]
    for c in cards:
        labels = ", ".join(lab.name for lab in c.labels) or "- (classification only)"
        rows.append(tuple(printable(v) for v in (c.id, c.version, c.modality, labels,
                                                 ", ".join(t.task for t in c.classification) or "-", _source(c))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    """Describe one model: labels with codes and colours, classes, grid, provenance, metrics."""
    from medautolabel.catalog.registry import resolve_model

    c = resolve_model(args.model)
    pre = c.preprocessing
    say(f"{c.id} {c.version}: {c.name}")
    say(f"  source: {_source(c)}")
    if c.description:
        say(f"  {c.description}")
    say(f"  modality: {c.modality}; input channels: " + ", ".join(ch.name for ch in c.input))
    spacing = "native" if pre.spacing is None else " x ".join(f"{s:g}" for s in pre.spacing) + " mm"
    if c.network is None:
        say("  network: none (classification only: labels nothing, gives tags)")
        say(f"  grid: {pre.orientation or 'native'} orientation")
    else:
        say(f"  network: {_network(c.network)}")
        say(f"  grid: {pre.orientation or 'native'} orientation, {spacing}; "
            f"window {' x '.join(str(r) for r in c.inference.roi_size)}, overlap {c.inference.overlap:g}")
        say("  labels:")
    for lab in c.labels:
        rgb = "#" + "".join(f"{round(255 * v):02x}" for v in lab.color)
        t = lab.terminology
        say(f"    {lab.value}  {lab.name}  {rgb}  {t.category.scheme}:{t.category.value} {t.category.meaning} / "
             f"{t.type.scheme}:{t.type.value} {t.type.meaning}")
    for task in c.classification:
        for line in _task_lines(task):
            say(line)
    say(f"  low-confidence threshold: {c.low_confidence_threshold:g}")
    for key in ("command", "retrain", "training_data", "training_time", "seeds", "date"):
        if key in c.provenance:
            say(f"  {key.replace('_', ' ')}: {c.provenance[key]}")
    for key, value in c.metrics.items():
        say(f"  metric {key}: {value}")
    return 0


def cmd_models_export_bundle(args: argparse.Namespace) -> int:
    """Write a model as a MONAI bundle and print its digest."""
    from medautolabel.catalog.bundle import bundle_sha256
    from medautolabel.catalog.bundle_export import export_bundle

    out = export_bundle(args.model, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (bundle sha256 {bundle_sha256(out)})")
    return 0


def register(sub) -> argparse.ArgumentParser:
    """Add the command to ``sub`` (the sub-parsers of ``medautolabel``)."""
    p = sub.add_parser("models", help="list the available models or show one",
                       description="Models: built-in ones, folders on MEDAUTOLABEL_MODEL_PATH, or a folder path.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser("list", help="list the models that can be found")
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser("show", help="describe a model (labels, codes, classes, grid, provenance, metrics)")
    q.add_argument("model", metavar="ID|PATH")
    q.set_defaults(func=cmd_models_show)
    q = msub.add_parser("export-bundle", help="write a model as a MONAI model-zoo bundle",
                        description="Write model ID as a MONAI bundle that `python -m monai.bundle run "
                                    "--config_file DIR/configs/inference.json --bundle_root DIR --dataset_dir D "
                                    "--output_dir O` runs on D/imagesTs/*.nii.gz.")
    q.add_argument("model", metavar="ID|PATH")
    q.add_argument("out", type=Path, metavar="DIR")
    q.add_argument("--overwrite", action="store_true", help="replace a bundle medautolabel exported to DIR before")
    q.set_defaults(func=cmd_models_export_bundle)
    return p
