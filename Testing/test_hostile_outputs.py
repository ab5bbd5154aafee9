"""Hostile output locations: outputs onto inputs, onto files medautolabel did not write, into full,
read-only or forbidden places, with names too long; and the clean-up after killed runs.

Every refusal is one line ``medautolabel: error: <path>: <problem>``, exit status 2, no temporary
left, the inputs (and any file in the way) byte-identical (Testing/hostile.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest
from hostile import Outcome, Snapshot, assert_refused, run_inprocess, temporaries
from killed_writer import kill_a_writer_of
from thresholdmodel import sphere_image, write_threshold_model

from medautolabel.io.images import write_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


def scan(folder: Path, name: str = "scan.nii.gz") -> Path:
    """A small labelled-able image at ``folder/name``."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_image(sphere_image(), folder / name)


def label_args(inputs, out, model_dir, *extra) -> List[str]:
    return ["label", *[str(p) for p in inputs], "-o", str(out), "--model", str(model_dir), "--device", "cpu", "-q",
            *extra]


@dataclass
class Case:
    """A prepared hostile run: the command, what its one error line holds, what must stay as it was."""

    args: List[str]
    names: List[str]
    words: List[str]
    keep: List[Path]  # inputs and files in the way: byte-identical afterwards
    empty: List[Path] = field(default_factory=list)  # folders that must hold no file afterwards
    temps: List[Path] = field(default_factory=list)  # folders that must hold no temporary afterwards
    cwd: Optional[Path] = None  # the working folder of the run, for relative paths such as "-o ."


# --- label ------------------------------------------------------------------------------------------

def label_into_input_folder(tmp: Path, model: Path, *extra: str) -> Case:
    image = scan(tmp / "in")
    return Case(label_args([image], tmp / "in", model, "--format", "nii.gz", *extra), [str(image)],
                ["is an input"], [tmp / "in"], temps=[tmp / "in"])


def label_dot_output(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    args = label_args(["scan.nii.gz"], ".", model, "--format", "nii.gz", "--overwrite")
    return Case(args, ["scan.nii.gz"], ["is an input"], [image], temps=[tmp / "in"], cwd=tmp / "in")


def label_onto_symlink(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    (tmp / "out").mkdir()
    (tmp / "out" / "scan.nii.gz").symlink_to(image)
    return Case(label_args([image], tmp / "out", model, "--format", "nii.gz", "--overwrite"),
                [str(tmp / "out" / "scan.nii.gz")], ["is an input"], [tmp / "in", tmp / "out"], temps=[tmp])


def label_onto_hard_link(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    (tmp / "out").mkdir()
    os.link(image, tmp / "out" / "scan.nii.gz")
    return Case(label_args([image], tmp / "out", model, "--format", "nii.gz"),
                [str(tmp / "out" / "scan.nii.gz")], ["is an input"], [tmp / "in", tmp / "out"], temps=[tmp])


def label_onto_foreign_tags(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    (tmp / "out").mkdir()
    (tmp / "out" / "scan.tags.json").write_text('{"mine": "the radiologist\'s notes"}\n')
    return Case(label_args([image], tmp / "out", model, "--overwrite"), ["scan.tags.json"],
                ["not written by medautolabel"], [tmp / "in", tmp / "out"], temps=[tmp])


def label_onto_foreign_segmentation(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    (tmp / "out").mkdir()
    (tmp / "out" / "scan.seg.nrrd").write_bytes(b"NRRD0004\n# hand-made segmentation\n")
    return Case(label_args([image], tmp / "out", model), ["scan.seg.nrrd"], ["not written by medautolabel"],
                [tmp / "in", tmp / "out"], temps=[tmp])


def label_output_is_a_file(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    (tmp / "out.txt").write_text("not a folder\n")
    return Case(label_args([image], tmp / "out.txt", model), ["out.txt"], ["is a file, not a folder"],
                [tmp / "in", tmp / "out.txt"], temps=[tmp])


def label_output_is_the_input(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    return Case(label_args([image], image, model), [str(image)], ["is a file, not a folder"], [tmp / "in"],
                temps=[tmp])


def label_output_below_a_file(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    (tmp / "blocker").write_text("a file where a folder should be\n")
    return Case(label_args([image], tmp / "blocker" / "out", model), ["blocker"], ["folder"],
                [tmp / "in", tmp / "blocker"], temps=[tmp])


def label_name_too_long(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in", "x" * 248 + ".nii")  # 252 bytes; its <stem>.tags.json (written first) would be 258
    return Case(label_args([image], tmp / "out", model), ["x" * 248 + ".tags.json"], ["file name too long"],
                [tmp / "in"], empty=[tmp / "out"], temps=[tmp])


def label_output_name_is_a_folder(tmp: Path, model: Path) -> Case:
    image = scan(tmp / "in")
    (tmp / "out" / "scan.seg.nrrd").mkdir(parents=True)
    (tmp / "out" / "scan.seg.nrrd" / "mine.txt").write_text("mine\n")
    return Case(label_args([image], tmp / "out", model, "--overwrite"), ["scan.seg.nrrd"], ["is a folder"],
                [tmp / "in", tmp / "out"], temps=[tmp])


def label_second_input_would_be_replaced(tmp: Path, model: Path) -> Case:
    first, second = scan(tmp / "x", "one.nii.gz"), scan(tmp / "y", "two.nii.gz")
    return Case(label_args([first, second], tmp / "y", model, "--format", "nii.gz"), [str(second)],
                ["is an input"], [tmp / "x", tmp / "y"], temps=[tmp])


# --- evaluate ---------------------------------------------------------------------------------------

def eval_inputs(tmp: Path) -> Dict[str, Path]:
    """A prediction folder and an MSD-style dataset root holding the references."""
    image = sphere_image()
    labels = image.with_array((image.array > 100).astype("uint8"))
    write_image(labels, tmp / "pred" / "case1.nii.gz")
    write_image(labels, tmp / "data" / "labelsTr" / "case1.nii.gz")
    (tmp / "data" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "vessel"}}))
    return {"pred": tmp / "pred", "ref": tmp / "data" / "labelsTr", "root": tmp / "data"}


def evaluate_into_predictions(tmp: Path, model: Path) -> Case:
    d = eval_inputs(tmp)
    return Case(["evaluate", str(d["pred"]), str(d["ref"]), "-o", str(d["pred"]), "--overwrite"], [str(d["pred"])],
                ["is an input"], [d["pred"], d["root"]], temps=[tmp])


def evaluate_into_dataset_root(tmp: Path, model: Path) -> Case:
    d = eval_inputs(tmp)
    return Case(["evaluate", str(d["pred"]), str(d["ref"]), "-o", str(d["root"])], [str(d["root"])],
                ["not empty", "--overwrite"], [d["pred"], d["root"]], temps=[tmp])


def evaluate_over_foreign_report(tmp: Path, model: Path) -> Case:
    d = eval_inputs(tmp)
    (tmp / "report").mkdir()
    (tmp / "report" / "metrics.csv").write_text("my,own,metrics\n")
    return Case(["evaluate", str(d["pred"]), str(d["ref"]), "-o", str(tmp / "report"), "--overwrite"],
                ["metrics.csv"], ["not written by medautolabel"], [d["pred"], d["root"], tmp / "report"],
                temps=[tmp])


def evaluate_onto_a_file(tmp: Path, model: Path) -> Case:
    d = eval_inputs(tmp)
    (tmp / "report.html").write_text("<p>mine</p>\n")
    return Case(["evaluate", str(d["pred"]), str(d["ref"]), "-o", str(tmp / "report.html")], ["report.html"],
                ["is a file"], [d["pred"], d["root"], tmp / "report.html"], temps=[tmp])


# --- models export-bundle ---------------------------------------------------------------------------

def bundle_into_full_folder(tmp: Path, model: Path) -> Case:
    (tmp / "bundle").mkdir()
    (tmp / "bundle" / "thesis.tex").write_text("\\section{mine}\n")
    return Case(["models", "export-bundle", "vessel-nerve-cta", str(tmp / "bundle")], [str(tmp / "bundle")],
                ["not empty"], [tmp / "bundle"], temps=[tmp])


def bundle_over_foreign_bundle(tmp: Path, model: Path) -> Case:
    (tmp / "bundle" / "configs").mkdir(parents=True)
    (tmp / "bundle" / "configs" / "inference.json").write_text('{"network_def": "someone else\'s"}\n')
    return Case(["models", "export-bundle", "vessel-nerve-cta", str(tmp / "bundle"), "--overwrite"],
                ["inference.json"], ["not written by medautolabel"], [tmp / "bundle"], temps=[tmp])


def bundle_onto_a_file(tmp: Path, model: Path) -> Case:
    (tmp / "bundle").write_text("a file\n")
    return Case(["models", "export-bundle", "vessel-nerve-cta", str(tmp / "bundle")], [str(tmp / "bundle")],
                ["is a file"], [tmp / "bundle"], temps=[tmp])


def bundle_of_a_torchscript_model(tmp: Path, model: Path) -> Case:
    return Case(["models", "export-bundle", str(model), str(tmp / "bundle")], ["model.json"], ["TorchScript"],
                [model], empty=[tmp / "bundle"], temps=[tmp])


# --- phantoms ---------------------------------------------------------------------------------------

def user_dataset(tmp: Path) -> Path:
    root = tmp / "Dataset001"
    scan(root / "imagesTr", "phantom_0000000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"name": "my hand-labelled study", "training": []}))
    return root


def phantoms_into_dataset(tmp: Path, model: Path) -> Case:
    root = user_dataset(tmp)
    return Case(["phantoms", "-o", str(root), "-n", "1", "-q"], [str(root)], ["not empty"], [root], temps=[tmp])


def phantoms_over_foreign_dataset(tmp: Path, model: Path) -> Case:
    root = user_dataset(tmp)
    return Case(["phantoms", "-o", str(root), "-n", "1", "-q", "--overwrite"], ["phantom_0000000.nii.gz"],
                ["not written by medautolabel"], [root], temps=[tmp])


def phantoms_onto_a_file(tmp: Path, model: Path) -> Case:
    (tmp / "Dataset001").write_text("a file\n")
    return Case(["phantoms", "-o", str(tmp / "Dataset001"), "-n", "1", "-q"], ["Dataset001"], ["is a file"],
                [tmp / "Dataset001"], temps=[tmp])


# --- train ------------------------------------------------------------------------------------------

def train_into_full_folder(tmp: Path, model: Path) -> Case:
    root = user_dataset(tmp)
    (tmp / "models").mkdir()
    (tmp / "models" / "notes.txt").write_text("mine\n")
    return Case(["train", str(root), "-o", str(tmp / "models"), "--device", "cpu"], [str(tmp / "models")],
                ["not empty"], [root, tmp / "models"], temps=[tmp])


def train_into_the_dataset(tmp: Path, model: Path) -> Case:
    root = user_dataset(tmp)
    return Case(["train", str(root), "-o", str(root), "--device", "cpu", "--overwrite"], [str(root)],
                ["is an input"], [root], temps=[tmp])


def train_over_foreign_model(tmp: Path, model: Path) -> Case:
    root = user_dataset(tmp)
    (tmp / "m").mkdir()
    (tmp / "m" / "model.json").write_text('{"id": "someone else\'s model"}\n')
    return Case(["train", str(root), "-o", str(tmp / "m"), "--device", "cpu", "--overwrite"], ["model.json"],
                ["not written by medautolabel"], [root, tmp / "m"], temps=[tmp])


def train_onto_a_file(tmp: Path, model: Path) -> Case:
    root = user_dataset(tmp)
    (tmp / "m").write_text("a file\n")
    return Case(["train", str(root), "-o", str(tmp / "m"), "--device", "cpu"], [str(tmp / "m")], ["is a file"],
                [root, tmp / "m"], temps=[tmp])


# --- batch ------------------------------------------------------------------------------------------

def batch_into_input_folder(tmp: Path, model: Path) -> Case:
    scan(tmp / "in")
    return Case(["batch", str(tmp / "in"), "-o", str(tmp / "in"), "--model", str(model), "--format", "nii.gz",
                 "--device", "cpu", "-q"], ["scan.nii.gz"], ["is an input"], [tmp / "in"], temps=[tmp])


def batch_over_foreign_summary(tmp: Path, model: Path) -> Case:
    scan(tmp / "in")
    (tmp / "out").mkdir()
    (tmp / "out" / "summary.csv").write_text("patient,finding\n")
    return Case(["batch", str(tmp / "in"), "-o", str(tmp / "out"), "--model", str(model), "--device", "cpu", "-q"],
                ["summary.csv"], ["not written by medautolabel"], [tmp / "in", tmp / "out"], temps=[tmp])


def batch_untrusted_bundle(tmp: Path, model: Path) -> Case:
    scan(tmp / "in")
    (tmp / "bundle" / "configs").mkdir(parents=True)
    (tmp / "bundle" / "configs" / "inference.json").write_text('{"network_def": "$__import__(\'os\')"}\n')
    return Case(["batch", str(tmp / "in"), "-o", str(tmp / "out"), "--model", str(tmp / "bundle"), "--device", "cpu",
                 "-q"], [str(tmp / "bundle")], ["--trust"], [tmp / "in", tmp / "bundle"], empty=[tmp / "out"],
                temps=[tmp])


def batch_onto_a_file(tmp: Path, model: Path) -> Case:
    scan(tmp / "in")
    (tmp / "out").write_text("a file\n")
    return Case(["batch", str(tmp / "in"), "-o", str(tmp / "out"), "--model", str(model), "--device", "cpu", "-q"],
                [str(tmp / "out")], ["is a file"], [tmp / "in", tmp / "out"], temps=[tmp])


CASES: Dict[str, Callable[[Path, Path], Case]] = {
    "label-nii-into-input-folder": label_into_input_folder,
    "label-nii-into-input-folder-overwrite": lambda t, m: label_into_input_folder(t, m, "--overwrite"),
    "label-dot-output-in-input-folder": label_dot_output,
    "label-onto-symlink-to-input": label_onto_symlink,
    "label-onto-hard-link-of-input": label_onto_hard_link,
    "label-over-foreign-tags-json": label_onto_foreign_tags,
    "label-over-foreign-seg-nrrd": label_onto_foreign_segmentation,
    "label-output-is-a-file": label_output_is_a_file,
    "label-output-is-the-input-file": label_output_is_the_input,
    "label-output-below-a-file": label_output_below_a_file,
    "label-output-name-too-long": label_name_too_long,
    "label-output-name-is-a-folder": label_output_name_is_a_folder,
    "label-second-input-would-be-replaced": label_second_input_would_be_replaced,
    "evaluate-into-predictions": evaluate_into_predictions,
    "evaluate-into-dataset-root": evaluate_into_dataset_root,
    "evaluate-over-foreign-report": evaluate_over_foreign_report,
    "evaluate-onto-a-file": evaluate_onto_a_file,
    "export-bundle-into-full-folder": bundle_into_full_folder,
    "export-bundle-over-foreign-bundle": bundle_over_foreign_bundle,
    "export-bundle-onto-a-file": bundle_onto_a_file,
    "export-bundle-of-torchscript": bundle_of_a_torchscript_model,
    "phantoms-into-dataset": phantoms_into_dataset,
    "phantoms-over-foreign-dataset": phantoms_over_foreign_dataset,
    "phantoms-onto-a-file": phantoms_onto_a_file,
    "train-into-full-folder": train_into_full_folder,
    "train-into-the-dataset": train_into_the_dataset,
    "train-over-foreign-model": train_over_foreign_model,
    "train-onto-a-file": train_onto_a_file,
    "batch-nii-into-input-folder": batch_into_input_folder,
    "batch-over-foreign-summary": batch_over_foreign_summary,
    "batch-untrusted-bundle": batch_untrusted_bundle,
    "batch-onto-a-file": batch_onto_a_file,
}


def run_case(case: Case) -> Outcome:
    snap = Snapshot(*case.keep)
    outcome = run_inprocess(case.args)
    assert_refused(outcome, case.names, case.words, untouched=snap, no_temps_in=case.temps, no_files_in=case.empty)
    return outcome


@pytest.mark.parametrize("name", list(CASES))
def test_refused_output(name, tmp_path, model_dir, monkeypatch):
    case = CASES[name](tmp_path, model_dir)
    if case.cwd is not None:
        monkeypatch.chdir(case.cwd)
    run_case(case)


# --- full, read-only and size-limited file systems ----------------------------------------------------

@contextlib.contextmanager
def small_fs(folder: Path, size: str = "256k") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``folder`` (skips the test when mounting is not permitted)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {e}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def fill(folder: Path) -> Path:
    """Fill ``folder``'s file system to the last block; return the filler file."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


def read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)


def test_label_onto_a_full_disk(tmp_path, model_dir):
    image = scan(tmp_path / "in")
    with small_fs(tmp_path / "disk") as disk:
        filler = fill(disk)
        snap = Snapshot(tmp_path / "in", filler)
        outcome = run_inprocess(label_args([image], disk, model_dir))
        assert_refused(outcome, [str(disk / "scan.")], ["no space left"], untouched=snap, no_temps_in=[disk])
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


@pytest.mark.parametrize("fmt", ["seg.nrrd", "nii.gz"])
def test_label_onto_a_read_only_file_system(fmt, tmp_path, model_dir):
    image = scan(tmp_path / "in")
    with small_fs(tmp_path / "disk") as disk:
        (disk / "out").mkdir()
        read_only(disk)
        snap = Snapshot(tmp_path / "in")
        outcome = run_inprocess(label_args([image], disk / "out", model_dir, "--format", fmt))
        assert_refused(outcome, [str(disk / "out" / "scan.")], ["read-only file system"], untouched=snap,
                       no_files_in=[disk])


def test_label_into_a_missing_folder_on_a_read_only_file_system(tmp_path, model_dir):
    image = scan(tmp_path / "in")
    with small_fs(tmp_path / "disk") as disk:
        read_only(disk)
        outcome = run_inprocess(label_args([image], disk / "new" / "out", model_dir))
        assert_refused(outcome, [str(disk / "new" / "out")], ["read-only file system"],
                       untouched=Snapshot(tmp_path / "in"), no_files_in=[disk])


def test_phantoms_onto_a_full_disk_leave_no_partial_dataset(tmp_path):
    with small_fs(tmp_path / "disk", "512k") as disk:
        outcome = run_inprocess(["phantoms", "-o", str(disk / "Dataset001"), "-n", "3", "-q"])
        assert_refused(outcome, [str(disk / "Dataset001")], ["no space left"], no_files_in=[disk])


def read_only_run(command: str, tmp: Path, model: Path, target: Path) -> Case:
    """``command`` writing a new folder ``target`` on a read-only file system."""
    if command == "evaluate":
        d = eval_inputs(tmp)
        return Case(["evaluate", str(d["pred"]), str(d["ref"]), "-o", str(target)], [str(target)], [],
                    [d["pred"], d["root"]])
    if command == "batch":
        scan(tmp / "in")
        return Case(["batch", str(tmp / "in"), "-o", str(target), "--model", str(model), "--device", "cpu", "-q"],
                    [str(target)], [], [tmp / "in"])
    if command == "export-bundle":
        return Case(["models", "export-bundle", "vessel-nerve-cta", str(target)], [str(target)], [], [])
    if command == "phantoms":
        return Case(["phantoms", "-o", str(target), "-n", "1", "-q"], [str(target)], [], [])
    root = user_dataset(tmp)
    return Case(["train", str(root), "-o", str(target), "--device", "cpu"], [str(target)], [], [root])


@pytest.mark.parametrize("command", ["evaluate", "batch", "export-bundle", "phantoms", "train"])
def test_new_folder_on_a_read_only_file_system(command, tmp_path, model_dir):
    with small_fs(tmp_path / "disk") as disk:
        read_only(disk)
        case = read_only_run(command, tmp_path, model_dir, disk / "new")
        snap = Snapshot(*case.keep)
        outcome = run_inprocess(case.args)
        assert_refused(outcome, case.names, ["read-only file system"], untouched=snap, no_files_in=[disk])


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[Path]:
    """``folder`` with the immutable attribute: even root gets EPERM creating a file in it (skips without chattr)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot make a folder immutable here (needs chattr and root): {e}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=False, capture_output=True)


@pytest.mark.parametrize("command", ["label", "evaluate"])
def test_permission_denied(command, tmp_path, model_dir):
    """A folder the user may not write into (an immutable one: chmod does not stop root)."""
    image = scan(tmp_path / "in")
    d = eval_inputs(tmp_path)
    with immutable(tmp_path / "locked") as locked:
        snap = Snapshot(tmp_path / "in", d["pred"], d["root"])
        args = label_args([image], locked, model_dir) if command == "label" else \
            ["evaluate", str(d["pred"]), str(d["ref"]), "-o", str(locked)]
        outcome = run_inprocess(args)
        assert_refused(outcome, [str(locked)], ["permission denied"], untouched=snap, no_files_in=[locked])


_FSIZE_CHILD = ("import resource, sys\n"
                "resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))\n"
                "from medautolabel.cli.app import main\n"
                "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.slow
def test_label_over_the_file_size_limit(tmp_path, model_dir):
    """RLIMIT_FSIZE (ulimit -f) in a child process: the write fails with EFBIG, reported in one line."""
    image = scan(tmp_path / "in")
    snap = Snapshot(tmp_path / "in")
    env = dict(os.environ, MEDAUTOLABEL_CPU_RUNTIME="pytorch")  # no compiled-network cache written on the way
    proc = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, *label_args([image], tmp_path / "out", model_dir)],
                          capture_output=True, text=True, timeout=300, env=env)
    outcome = Outcome(proc.returncode, proc.stdout.splitlines(), proc.stderr.splitlines())
    assert_refused(outcome, [str(tmp_path / "out" / "scan.")], ["file too large"], untouched=snap,
                   no_files_in=[tmp_path / "out"])


# --- names near the limit, killed earlier runs, batch resume ----------------------------------------

def test_a_long_output_name_still_gets_a_valid_temporary(tmp_path, model_dir):
    """A 240-byte stem: the outputs' names fit, their temp names are shortened, and nothing is left behind."""
    stem = "y" * 240
    image = scan(tmp_path / "in", stem + ".nii.gz")
    outcome = run_inprocess(label_args([image], tmp_path / "out", model_dir))
    assert outcome.status == 0, outcome.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [stem + ".seg.nrrd", stem + ".tags.json"]
    assert temporaries(tmp_path) == []


def test_leftover_temporaries_of_long_names_are_recognised(tmp_path):
    from medautolabel.io.atomic import leftover_temps

    target = tmp_path / ("z" * 250 + ".nii.gz")
    kill_a_writer_of(target)
    left = temporaries(tmp_path)
    assert len(left) == 1 and len(os.fsencode(Path(left[0]).name)) <= 255
    assert [str(p) for p in leftover_temps(target)] == left
    assert leftover_temps(tmp_path / ("z" * 249 + ".nii.gz")) == []


@pytest.mark.parametrize("fmt", ["seg.nrrd", "nii.gz"])
def test_label_rerun_removes_the_temporaries_of_a_killed_run(fmt, tmp_path, model_dir):
    image = scan(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    kill_a_writer_of(out / f"scan.{fmt}")
    kill_a_writer_of(out / "scan.tags.json")
    assert len(temporaries(out)) == 2
    snap = Snapshot(tmp_path / "in")
    outcome = run_inprocess(label_args([image], out, model_dir, "--format", fmt))
    assert outcome.status == 0, outcome.err
    assert temporaries(out) == []
    assert (out / "scan.tags.json").is_file() and (out / f"scan.{fmt}").is_file()
    snap.assert_unchanged()


def test_batch_outputs_inside_the_input_folder_are_never_studies(tmp_path, model_dir):
    """A rerun of batch -o IN/labels: its outputs, temporaries and summary.csv are not taken as studies."""
    from medautolabel.labelling.cluster_batch import find_cases

    images = [scan(tmp_path / "in", f"case{c}.nii.gz") for c in range(2)]
    labels = tmp_path / "in" / "labels"
    assert run_inprocess(label_args(images[:1], labels, model_dir, "--format", "nii.gz")).status == 0
    kill_a_writer_of(labels / "case1.nii.gz")
    (labels / "summary.csv").write_text("case,input,status,seconds,message,worker\n")
    assert find_cases(tmp_path / "in", exclude=labels) == images
    # the same folder for inputs and outputs: the labelmaps written there are recognised as outputs
    assert run_inprocess(label_args(images[:1], tmp_path / "in", model_dir, "--format", "nii.gz")).status == 2
    assert run_inprocess(label_args(images[:1], tmp_path / "in", model_dir)).status == 0
    assert find_cases(tmp_path / "in", exclude=tmp_path / "in") == images


def test_evaluate_overwrite_replaces_its_own_report_only(tmp_path):
    d = eval_inputs(tmp_path)
    report = tmp_path / "report"
    assert run_inprocess(["evaluate", str(d["pred"]), str(d["ref"]), "-o", str(report)]).status == 0
    (report / "notes.txt").write_text("keep me\n")
    snap = Snapshot(report / "notes.txt", d["pred"], d["root"])
    outcome = run_inprocess(["evaluate", str(d["pred"]), str(d["ref"]), "-o", str(report), "--overwrite"])
    assert outcome.status == 0, outcome.err
    assert sorted(p.name for p in report.iterdir()) == ["metrics.csv", "notes.txt", "report.html", "summary.json"]
    snap.assert_unchanged()


def read_rows(path: Path) -> Dict[str, Dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_batch_rerun_with_outputs_inside_the_input_folder(tmp_path, model_dir):
    """batch -o IN/labels after a killed run: finishes the rest, rewrites nothing, takes no output for a study."""
    pytest.importorskip("distributed")
    images = [scan(tmp_path / "in", f"case{c}.nii.gz") for c in range(2)]
    labels = tmp_path / "in" / "labels"
    assert run_inprocess(label_args(images[:1], labels, model_dir, "--format", "nii.gz")).status == 0
    finished = {p.name: p.stat().st_mtime_ns for p in labels.iterdir()}
    kill_a_writer_of(labels / "case1.nii.gz")
    snap = Snapshot(*images)
    outcome = run_inprocess(["batch", str(tmp_path / "in"), "-o", str(labels), "--model", str(model_dir),
                             "--format", "nii.gz", "--device", "cpu", "--workers", "1", "-q"])
    assert outcome.status == 0, outcome.err
    rows = read_rows(labels / "summary.csv")
    assert {c: r["status"] for c, r in rows.items()} == {"case0": "skipped", "case1": "ok"}
    assert all((labels / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    assert temporaries(tmp_path) == []
    snap.assert_unchanged()
    again = run_inprocess(["batch", str(tmp_path / "in"), "-o", str(labels), "--model", str(model_dir),
                           "--format", "nii.gz", "--device", "cpu", "--workers", "1", "-q"])
    assert again.status == 0 and set(read_rows(labels / "summary.csv")) == {"case0", "case1"}, again.err


@pytest.mark.slow
def test_batch_runs_a_trusted_bundle_as_label_does(tmp_path):
    pytest.importorskip("distributed")
    image = scan(tmp_path / "in")
    bundle = tmp_path / "bundle"
    assert run_inprocess(["models", "export-bundle", "vessel-nerve-cta", str(bundle)]).status == 0
    outcome = run_inprocess(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(bundle),
                             "--trust", "--device", "cpu", "--workers", "1", "-q"])
    assert outcome.status == 0, outcome.err
    assert read_rows(tmp_path / "out" / "summary.csv")["scan"]["status"] == "ok"
    tags = json.loads((tmp_path / "out" / "scan.tags.json").read_text(encoding="utf-8"))
    assert tags["labelmap_file"] == "scan.seg.nrrd" and image.is_file()


def test_overwrite_replaces_only_what_medautolabel_wrote(tmp_path):
    """phantoms and export-bundle --overwrite: their own earlier files are replaced, the user's file stays."""
    dataset, bundle = tmp_path / "Dataset001", tmp_path / "bundle"
    assert run_inprocess(["phantoms", "-o", str(dataset), "-n", "1", "-q"]).status == 0
    assert run_inprocess(["models", "export-bundle", "vessel-nerve-cta", str(bundle)]).status == 0
    for folder in (dataset, bundle):
        (folder / "notes.txt").write_text("keep me\n")
    snap = Snapshot(dataset / "notes.txt", bundle / "notes.txt")
    assert run_inprocess(["phantoms", "-o", str(dataset), "-n", "1", "-q"]).status == 2  # not without --overwrite
    again = run_inprocess(["phantoms", "-o", str(dataset), "-n", "1", "--seed", "0", "-q", "--overwrite"])
    assert again.status == 0, again.err
    again = run_inprocess(["models", "export-bundle", "vessel-nerve-cta", str(bundle), "--overwrite"])
    assert again.status == 0, again.err
    snap.assert_unchanged()
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 1
    assert (bundle / "configs" / "medautolabel.json").is_file() and temporaries(tmp_path) == []


@pytest.mark.slow
def test_demo_refuses_a_folder_of_the_users_and_reruns_in_its_own(tmp_path):
    """`demo --out` onto a folder holding someone's files is refused; a rerun in an earlier demo's folder works."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "phantom.png").write_bytes(b"my holiday photo")
    snap = Snapshot(theirs)
    outcome = run_inprocess(["demo", "--out", theirs, "--device", "cpu", "-q"])
    assert_refused(outcome, [str(theirs)], ["not empty"], untouched=snap, no_temps_in=[theirs])
    demo = tmp_path / "demo"
    assert run_inprocess(["demo", "--out", demo, "--device", "cpu", "-q"]).status == 0
    (demo / "notes.txt").write_text("mine\n")
    assert run_inprocess(["demo", "--out", demo, "--device", "cpu", "-q"]).status == 0
    assert (demo / "notes.txt").read_text() == "mine\n" and temporaries(demo) == []
