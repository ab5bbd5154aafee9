"""Hostile corpus: signals and kills, untrusted text, bundle trust, privacy (issue #13, requirements 3 and 4).

Signals: a ``medautolabel label`` process is stopped at a known point (``signal_child.py`` holds it
there and touches a mark; or, at start-up, ``/proc`` shows that the command's handlers are armed)
and sent SIGINT or SIGTERM: one line, 130 / 143, no temporary, inputs unchanged, and a rerun
completes. Text: escape sequences, line breaks and bidi overrides in card names, labels, file names
and model ids come out inert (terminal, error line, ``.seg.nrrd`` header). Bundles: code beside the
configs, a file changed after trust, a link leaving the bundle, code imported from outside. Privacy:
a DICOM series' PatientName and PatientID reach no output, line or temporary.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import nrrd
import numpy as np
import pytest
import slicerio
from hostile import (
    Outcome,
    Snapshot,
    assert_absent,
    assert_refused,
    process_env,
    run_inprocess,
    run_process,
    temporaries,
)
from test_io import NORMAL, PATIENT_ID, PATIENT_NAME, _write_series
from thresholdmodel import CENTER, sphere_image, write_threshold_model

from medautolabel.catalog.bundle import TRUST_ENV, bundle_sha256, tree_sha256
from medautolabel.image import Image
from medautolabel.io.images import write_image
from medautolabel.io.segnrrd import write_seg_nrrd
from medautolabel.result import Code, SegmentInfo, Terminology
from medautolabel.text import escaped, printable

HERE = Path(__file__).resolve().parent
SECRETS = (PATIENT_NAME, "Jane", PATIENT_ID)


def inert(lines: List[str]) -> bool:
    """No escape sequence, control character or bidi override in any line."""
    return all(printable(line) == line for line in lines)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, seconds: float = 120) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first or the deadline passes."""
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended before {what}: {proc.returncode} {err[-2000:]}")
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


def handles(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (/proc/PID/status SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signum - 1) & 1)


def finish(proc: subprocess.Popen) -> Outcome:
    out, err = proc.communicate(timeout=120)
    return Outcome(proc.returncode, out.splitlines(), err.splitlines())


# --- fixtures and inputs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


def scan(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scan.nii.gz"
    write_image(sphere_image(), path)
    return path


def dicom_series(folder: Path) -> Path:
    """A CT series holding the sphere phantom, with PatientName and PatientID planted in every slice."""
    volume = sphere_image("axial").array[8:32]
    _write_series(folder, volume, [np.array([0.0, 0.0, 0.0]) + 0.8 * s * NORMAL for s in range(len(volume))])
    return folder


def hostile_model(folder: Path, base: Path, **changes: str) -> Path:
    """A copy of the threshold model whose card's text fields carry hostile text."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    card = json.loads((base / "model.json").read_text())
    for key, value in changes.items():
        if key.startswith("label"):
            card["labels"][int(key[5:])]["name"] = value
        else:
            card[key] = value
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def label_args(inputs, out: Path, model) -> List[str]:
    return ["label", *[str(p) for p in inputs], "-o", str(out), "--model", str(model), "--device", "cpu", "-q"]


# --- signals ----------------------------------------------------------------------------------------

SIGNALS = [
    # (point, signal): "armed" = the console script's handlers are installed (start-up: parser, torch, MONAI)
    ("armed", signal.SIGINT), ("armed", signal.SIGTERM), ("parser", signal.SIGINT), ("monai", signal.SIGTERM),
    ("inference", signal.SIGINT), ("inference", signal.SIGTERM), ("write", signal.SIGINT), ("write", signal.SIGTERM),
]


@pytest.mark.parametrize("point,signum", SIGNALS, ids=[f"{s.name.lower()}-at-{p}" for p, s in SIGNALS])
def test_a_signal_at_any_moment_ends_with_one_line(point, signum, model_dir, tmp_path):
    image = scan(tmp_path / "in")
    out = tmp_path / "out"
    args = label_args([image], out, model_dir)
    snap = Snapshot(tmp_path / "in", model_dir)
    mark = tmp_path / "mark"
    if point == "armed":
        proc = subprocess.Popen([sys.executable, "-m", "medautolabel", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=process_env())
        wait_for(lambda: handles(proc.pid, signal.SIGTERM), proc, "the command's signal handlers")
    else:
        proc = subprocess.Popen([sys.executable, str(HERE / "signal_child.py"), point, str(mark), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env())
        wait_for(mark.exists, proc, f"the {point} point")
        if point == "write":  # the signal lands while the labelmap's temporary is on disk
            assert temporaries(out), "no temporary at the write point"
    proc.send_signal(signum)
    outcome = finish(proc)
    interrupted = signum == signal.SIGINT
    assert_refused(outcome, [], ["interrupted" if interrupted else "terminated"], untouched=snap,
                   no_temps_in=[tmp_path], no_files_in=[out], status=130 if interrupted else 143)
    rerun = run_inprocess(args)
    assert rerun.status == 0, rerun.err
    assert sorted(p.name for p in out.iterdir()) == ["scan.seg.nrrd", "scan.tags.json"]
    snap.assert_unchanged()


def test_the_console_script_runs_run(model_dir, tmp_path):
    """``python -m medautolabel`` is ``cli.run`` (the handlers above); a plain run still exits 0."""
    outcome = run_process(label_args([scan(tmp_path / "in")], tmp_path / "out", model_dir))
    assert outcome.status == 0, outcome.err
    assert (tmp_path / "out" / "scan.seg.nrrd").is_file()


# --- untrusted text ---------------------------------------------------------------------------------

ESC_CLEAR = "\x1b[2J\x1b[H"
TEXT_CASES: Dict[str, Dict[str, str]] = {
    "models-list-esc-name": {"name": f"Evil{ESC_CLEAR} model", "label0": "Vessel\x1b]0;pwned\x07"},
    "models-show-esc-description": {"description": f"line one\nline two{ESC_CLEAR}\x1b[31mred", "label1": "Ne\x9brve"},
    "models-show-bidi-name": {"name": "model \u202egnp.exe", "label0": "Vessel\u2066x\u2069\x7f"},
}


@pytest.mark.parametrize("case", list(TEXT_CASES), ids=list(TEXT_CASES))
def test_card_text_reaches_the_terminal_inert(case, model_dir, tmp_path, monkeypatch):
    folder = hostile_model(tmp_path / "m", model_dir, **TEXT_CASES[case])
    monkeypatch.setenv("MEDAUTOLABEL_MODEL_PATH", str(tmp_path))
    listing = run_inprocess(["models", "list"])
    shown = run_inprocess(["models", "show", str(folder)])
    for outcome in (listing, shown):
        assert outcome.status == 0 and outcome.err == [], outcome.err
        assert inert(outcome.out), outcome.out
    assert any(line.startswith("threshold") for line in listing.out), listing.out
    card = json.loads((folder / "model.json").read_text())
    assert shown.out[0] == printable(f"threshold {card['version']}: {card['name']}")
    if "description" in TEXT_CASES[case]:  # one line, where the card's line break was
        assert "  line one line twored" in shown.out


@pytest.mark.parametrize("label0", ["Vessel\nSegment9_Name:=evil", f"Vessel{ESC_CLEAR}\r\nSegment0_Name:=x"],
                         ids=["label-newline-injects-no-field", "label-esc-and-crlf"])
def test_hostile_label_names_stay_one_field(label0, model_dir, tmp_path):
    folder = hostile_model(tmp_path / "m", model_dir, label0=label0)
    out = tmp_path / "out"
    outcome = run_inprocess(label_args([scan(tmp_path / "in")], out, folder))
    assert outcome.status == 0, outcome.err
    assert inert(outcome.out) and "Vessel" in outcome.out[0], outcome.out
    seg = out / "scan.seg.nrrd"
    header = nrrd.read_header(str(seg))
    assert sorted(k for k in header if k.startswith("Segment") and k.endswith("_Name")) == \
        ["Segment0_Name", "Segment1_Name"]
    assert header["Segment0_Name"] == printable(label0)
    assert all(printable(str(v)) == str(v) for v in header.values() if isinstance(v, str))
    names = [s["name"] for s in slicerio.read_segmentation(str(seg), skip_voxels=True)["segments"]]
    assert names == [printable(label0), "Nerve"]


def test_segnrrd_refuses_to_inject_fields(tmp_path):
    """``write_seg_nrrd`` straight: a newline in a name and an escape in a terminology meaning."""
    array = np.zeros((4, 5, 6), np.uint8)
    array[1:3, 1:3, 1:3] = 1
    evil = Terminology(Code("SCT", "123037004", "Anatomical\x1b[2J Structure"), Code("SCT", "59820001", "Blood vessel"))
    seg = SegmentInfo(1, "Vessel\nSegment9_Name:=evil", (1.0, 0.0, 0.0), evil, 8, 0.008)
    path = write_seg_nrrd(Image(array, np.eye(4)), [seg], tmp_path / "x.seg.nrrd")
    header = nrrd.read_header(str(path))
    assert not any(k.startswith("Segment9") for k in header)
    assert header["Segment0_Name"] == "Vessel Segment9_Name:=evil"
    assert "\x1b" not in header["Segment0_Tags"] and "Anatomical Structure" in header["Segment0_Tags"]
    segments = slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]
    assert [s["name"] for s in segments] == ["Vessel Segment9_Name:=evil"]


ERROR_NAMES = {
    "error-esc-in-file-name": f"scan{ESC_CLEAR}.nii.gz",
    "error-newline-in-file-name": "scan\nmedautolabel: error: fake.nii.gz",
    "error-bidi-in-file-name": "scan\u202ezg.ii\u202c.nii.gz",
    "error-osc-title-in-file-name": "scan\x1b]0;owned\x07.nrrd",
}


@pytest.mark.parametrize("name", list(ERROR_NAMES.values()), ids=list(ERROR_NAMES))
def test_hostile_file_names_give_one_inert_error_line(name, model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / name
    bad.write_bytes(b"not an image at all")
    snap = Snapshot(tmp_path / "in")
    out = tmp_path / "out"
    outcome = run_inprocess(label_args([bad], out, model_dir))
    # a name with control characters is refused and shown escaped; others are shown made printable
    shown = escaped(name) if any(ord(ch) < 32 for ch in name) else printable(name)
    assert_refused(outcome, [shown], [], untouched=snap, no_temps_in=[tmp_path], no_files_in=[out])


def test_a_hostile_model_id_gives_one_inert_error_line(tmp_path):
    outcome = run_inprocess(label_args([scan(tmp_path / "in")], tmp_path / "out", f"nope{ESC_CLEAR}\nsecond line"))
    assert_refused(outcome, ["nope"], [], no_temps_in=[tmp_path], no_files_in=[tmp_path / "out"])


def test_the_html_report_escapes_and_strips_names(tmp_path):
    from medautolabel.evaluation.report import summarise, write_html

    row = {"case": "c1<script>alert(1)</script>\x1b[2J", "label": 1, "name": "Vessel\x1b]0;x\x07<b>\u202e",
           "dice": 0.9, "hd95_mm": 1.0, "msd_mm": 0.5, "volume_pred_ml": 1.0, "volume_ref_ml": 1.1,
           "volume_diff_ml": -0.1, "volume_diff_percent": -9.0, "resampled": False}
    path = tmp_path / "report.html"
    write_html([row], {"segmentation": summarise([row]), "cases": ["c1"]}, path)
    page = path.read_text(encoding="utf-8")
    assert "<script>" not in page and "<b>" not in page and "&lt;script&gt;" in page and "Vessel" in page
    assert printable(page.replace("\n", " ")) == page.replace("\n", " ")


def test_the_slicer_worker_sends_inert_messages(model_dir, tmp_path):
    import io

    from MedAutoLabelLib.worker import handle

    stream = io.StringIO()
    handle({"id": 7, "image": str(tmp_path / f"scan{ESC_CLEAR}\n.nii.gz"), "output": str(tmp_path / "out"),
            "model": str(model_dir), "options": {"device": "cpu"}}, stream)
    message = json.loads(stream.getvalue().splitlines()[-1])
    assert message["event"] == "error" and escaped(f"scan{ESC_CLEAR}\n.nii.gz") in message["message"], message
    assert printable(message["message"]) == message["message"]


def test_the_runner_makes_what_a_worker_sends_inert(tmp_path):
    from MedAutoLabelLib.runner import WorkerProcess

    script = tmp_path / "noisy_worker.py"
    script.write_text("import json, sys\n"
                      "sys.stderr.write('warning \\x1b[2J\\x1b[H cleared\\n'); sys.stderr.flush()\n"
                      "print(json.dumps({'event': 'error', 'message': 'bad\\x1b]0;title\\x07 name\\nline',"
                      " 'details': 'one\\x1b[31m\\ntwo'}))\n")
    worker = WorkerProcess(sys.executable, script=script)
    first = worker.messages.get(timeout=60)
    assert worker.messages.get(timeout=60)["event"] == "exit"
    assert first == {"event": "error", "message": "bad name line", "details": "one\ntwo"}
    worker.proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while not worker.stderr:  # its stderr reader thread has the line once the pipe is drained
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(worker.stderr) == ["warning  cleared"]


def test_the_batch_summary_csv_is_inert(tmp_path):
    import csv

    from medautolabel.labelling.cluster_batch import write_summary

    facts = {"segments": [{"name": "Vessel\nx,y\x1b[2J", "volume_ml": 1.5}],
             "classifications": [{"task": "aneurysm\x1b]0;t\x07", "label": "absent\r\n", "probability": 0.1}]}
    record = {"input": "in/scan\x1b[31m.nii.gz", "stem": "scan\x1b[31m", "status": "ok", "seconds": 1.0,
              "message": "", "worker": "w", "facts": facts}
    path = write_summary([record], tmp_path / "summary.csv")
    text = path.read_text(encoding="utf-8")
    assert "\x1b" not in text and len(text.splitlines()) == 2, text
    rows = list(csv.DictReader(text.splitlines()))
    assert rows[0]["case"] == "scan" and rows[0]["aneurysm"] == "absent " and rows[0]["Vessel x,y mL"] == "1.5"


# --- bundle trust ----------------------------------------------------------------------------------

def bundle(folder: Path, *, imports=(), network=None, extra: Dict[str, str] = None) -> Path:
    """A bundle folder (its config never gets parsed here: every case is refused first)."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {"imports": list(imports), "network_def": network or {"_target_": "UNet", "spatial_dims": 3},
              "preprocessing": {"_target_": "Compose", "transforms": []}}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    (folder / "models" / "model.pt").write_bytes(b"weights")
    for name, text in (extra or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def trust(tmp_path: Path, monkeypatch, *digests: str) -> None:
    listed = tmp_path / "trusted.txt"
    listed.write_text("".join(d + "\n" for d in digests))
    monkeypatch.setenv(TRUST_ENV, str(listed))


def outside_module(tmp_path: Path, monkeypatch) -> Path:
    """A module ``helperlib`` importable from a folder outside the bundle (on sys.path)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "helperlib.py").write_text("class Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(lib))
    return lib / "helperlib.py"


def _changed_code(tmp_path, monkeypatch):
    b = bundle(tmp_path / "b", imports=["$import sys", "$sys.path.insert(0, @bundle_root)", "$import netcode"],
               extra={"netcode.py": "X = 1\n"})
    trust(tmp_path, monkeypatch, bundle_sha256(b))
    (b / "netcode.py").write_text("import os\nos.system('echo owned')\n")
    return b, ["runs only when trusted"]


def _added_file(tmp_path, monkeypatch):
    b = bundle(tmp_path / "b")
    trust(tmp_path, monkeypatch, bundle_sha256(b))
    (b / "scripts").mkdir()
    (b / "scripts" / "__init__.py").write_text("import os\n")
    return b, ["runs only when trusted"]


def _link_outside(tmp_path, monkeypatch):
    b = bundle(tmp_path / "b")
    (tmp_path / "elsewhere.pt").write_bytes(b"weights that can change")
    (b / "models" / "model.pt").unlink()
    (b / "models" / "model.pt").symlink_to(tmp_path / "elsewhere.pt")
    return b, ["symbolic link", "outside the bundle"]


def _imports_outside(tmp_path, monkeypatch):
    outside_module(tmp_path, monkeypatch)
    b = bundle(tmp_path / "b", imports=["$import helperlib"])
    trust(tmp_path, monkeypatch, bundle_sha256(b))
    return b, ["module helperlib", "outside the bundle"]


def _target_outside(tmp_path, monkeypatch):
    outside_module(tmp_path, monkeypatch)
    b = bundle(tmp_path / "b", network={"_target_": "helperlib.Net"})
    trust(tmp_path, monkeypatch, bundle_sha256(b))
    return b, ["module helperlib", "outside the bundle"]


def _adds_sys_path(tmp_path, monkeypatch):
    b = bundle(tmp_path / "b", imports=["$import sys", f"$sys.path.append('{tmp_path / 'lib'}')"])
    trust(tmp_path, monkeypatch, bundle_sha256(b))
    return b, ["sys.path", "outside the bundle"]


def _macro_outside(tmp_path, monkeypatch):
    (tmp_path / "other.json").write_text(json.dumps({"net": {"_target_": "UNet"}}))
    b = bundle(tmp_path / "b", network=f"%{tmp_path / 'other.json'}#net")
    trust(tmp_path, monkeypatch, bundle_sha256(b))
    return b, ["config file", "other.json", "outside the bundle"]


BUNDLE_CASES = {"bundle-code-changed-after-trust": _changed_code, "bundle-file-added-after-trust": _added_file,
                "bundle-symlink-leaves-the-bundle": _link_outside, "bundle-imports-code-from-outside": _imports_outside,
                "bundle-target-from-outside": _target_outside, "bundle-adds-a-sys-path-entry": _adds_sys_path,
                "bundle-macro-reads-a-config-from-outside": _macro_outside}


@pytest.mark.parametrize("case", list(BUNDLE_CASES), ids=list(BUNDLE_CASES))
def test_bundle_code_runs_only_as_trusted(case, tmp_path, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, str(tmp_path / "none.txt"))
    folder, words = BUNDLE_CASES[case](tmp_path, monkeypatch)
    image = scan(tmp_path / "in")
    snap = Snapshot(tmp_path / "in", folder)
    out = tmp_path / "out"
    outcome = run_inprocess(label_args([image], out, folder))
    assert_refused(outcome, [str(folder.name)], words, untouched=snap, no_temps_in=[tmp_path], no_files_in=[out])
    assert "owned" not in "\n".join(outcome.out + outcome.err)


def test_outside_code_trusted_by_its_own_digest_passes_the_check(tmp_path, monkeypatch):
    from medautolabel.catalog.bundle import check_outside_code, config_file

    module = outside_module(tmp_path, monkeypatch)
    b = bundle(tmp_path / "b", imports=["$import helperlib", "$import os", "$import numpy", "$import torch"])
    trust(tmp_path, monkeypatch, bundle_sha256(b))
    with pytest.raises(Exception, match=tree_sha256(module)):
        check_outside_code(b, config_file(b), trust=False)
    trust(tmp_path, monkeypatch, bundle_sha256(b), tree_sha256(module))
    check_outside_code(b, config_file(b), trust=False)  # standard library and installed stack: fine
    check_outside_code(b, config_file(b), trust=True)


def test_the_digest_covers_every_file_and_links_inside(tmp_path):
    b = bundle(tmp_path / "b", extra={"README.md": "hello", "scripts/net.py": "X = 1\n"})
    first = bundle_sha256(b)
    (b / "scripts" / "alias.py").symlink_to("net.py")  # a link inside the bundle is allowed, and counted
    second = bundle_sha256(b)
    (b / "README.md").write_text("changed")
    assert len({first, second, bundle_sha256(b)}) == 3


# --- privacy ----------------------------------------------------------------------------------------

def test_privacy_label_of_a_dicom_series(model_dir, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    series = dicom_series(tmp_path / "in" / "Series1")
    out = tmp_path / "out"
    outcome = run_inprocess(label_args([series], out, model_dir) + ["--low-confidence", "0.9"])
    assert outcome.status == 0, outcome.err
    assert (out / "Series1.seg.nrrd").is_file() and (out / "Series1.tags.json").is_file()
    for secret in SECRETS:
        assert_absent(secret, out, outcome=outcome)
        assert secret not in caplog.text  # no log line either


def test_privacy_a_broken_dicom_series_is_refused_without_naming_the_patient(model_dir, tmp_path):
    series = dicom_series(tmp_path / "in" / "Broken")
    victim = sorted(series.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-150])
    snap = Snapshot(tmp_path / "in")
    out = tmp_path / "out"
    outcome = run_inprocess(label_args([series], out, model_dir))
    assert_refused(outcome, ["Broken"], [], untouched=snap, no_temps_in=[tmp_path], no_files_in=[out])
    for secret in SECRETS:
        assert_absent(secret, out, outcome=outcome)


def test_privacy_the_temporaries_of_a_dicom_label_and_a_signal(model_dir, tmp_path):
    series = dicom_series(tmp_path / "in" / "Series1")
    out = tmp_path / "out"
    mark = tmp_path / "mark"
    proc = subprocess.Popen([sys.executable, str(HERE / "signal_child.py"), "write", str(mark),
                             *label_args([series], out, model_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=process_env())
    wait_for(mark.exists, proc, "the write point")
    temps = temporaries(out)
    assert temps
    for secret in SECRETS:
        assert_absent(secret, out)  # the half-written temporaries hold no name or ID
    proc.send_signal(signal.SIGTERM)
    outcome = finish(proc)
    assert_refused(outcome, [], ["terminated"], no_temps_in=[tmp_path], no_files_in=[out], status=143)
    for secret in SECRETS:
        assert_absent(secret, out, outcome=outcome)


@pytest.mark.slow
def test_privacy_batch_of_dicom_series(model_dir, tmp_path):
    pytest.importorskip("distributed")
    dicom_series(tmp_path / "in" / "p1" / "Series1")
    out = tmp_path / "out"
    outcome = run_inprocess(["batch", str(tmp_path / "in"), "-o", str(out), "--model", str(model_dir),
                             "--device", "cpu", "--workers", "1", "-q"])
    assert outcome.status == 0, outcome.err
    assert (out / "Series1.seg.nrrd").is_file() and (out / "summary.csv").is_file()
    for secret in SECRETS:
        assert_absent(secret, out, outcome=outcome)


# --- a SIGKILLed batch ------------------------------------------------------------------------------

def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (children first), from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def studies_with_labels_inside(tmp_path: Path, n: int = 4):
    """(studies folder, its output folder inside it, batch arguments, snapshot of the inputs)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for c in range(n):
        write_image(sphere_image(center=CENTER + np.array([c - 1.5, 0.0, 0.0])), studies / f"case{c}.nii.gz")
    out = studies / "labels"
    return studies, out, Snapshot(*sorted(studies.glob("*.nii.gz")))


def batch_args(studies: Path, out: Path, model_dir: Path) -> List[str]:
    return ["batch", str(studies), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "--workers", "2",
            "-q"]


def start_batch(args: List[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medautolabel", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=process_env())


def workers_of(proc: subprocess.Popen) -> List[int]:
    return [p for p in descendants(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]


def finished_outputs(out: Path) -> Dict[str, int]:
    """mtime of each output of the cases whose outputs are both in place."""
    done = {p.name[:-len(".tags.json")] for p in out.glob("case*.tags.json")}
    return {p.name: p.stat().st_mtime_ns for p in out.glob("case*") if p.name.split(".")[0] in done}


def assert_rerun_finishes(args: List[str], studies: Path, out: Path, finished: Dict[str, int], snap: Snapshot,
                          n: int = 4) -> None:
    rerun = run_process(args)
    assert rerun.status == 0, rerun.err[-20:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"case{c}.{ext}" for c in range(n) for ext in ("seg.nrrd", "tags.json")]
                           + ["summary.csv"]), names
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished outputs never rewritten
    assert temporaries(studies) == []
    snap.assert_unchanged()


def assert_all_end(family: List[int]) -> None:
    """Wait (with a deadline) until no process of ``family`` runs; kill what is left if any did not end."""
    deadline = time.monotonic() + 60
    try:
        while any(running(p) for p in family):
            assert time.monotonic() < deadline, [p for p in family if running(p)]
            time.sleep(0.05)
    finally:
        for pid in family:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["workers-starting", "first-output"])
def test_a_sigkilled_batch_leaves_no_worker_and_its_rerun_finishes_the_rest(moment, model_dir, tmp_path):
    pytest.importorskip("distributed")
    studies, out, snap = studies_with_labels_inside(tmp_path)
    args = batch_args(studies, out, model_dir)
    proc = start_batch(args)
    if moment == "first-output":
        wait_for(lambda: any(out.glob("case*.tags.json")), proc, "the first output", seconds=240)
    else:
        wait_for(lambda: len(workers_of(proc)) == 2, proc, "two workers", seconds=240)
    family = descendants(proc.pid)
    workers = workers_of(proc)
    assert workers, family
    if moment == "first-output":  # they have run a case, so their start-up is over: stop them, so that they
        for pid in workers:       # cannot notice their parent's pipe closing: only the kernel can end them
            os.kill(pid, signal.SIGSTOP)
    finished = finished_outputs(out)
    proc.kill()
    proc.wait(timeout=30)
    assert_all_end(family)
    assert_rerun_finishes(args, studies, out, finished, snap)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signalled_batch_ends_with_one_line_and_no_temporary(signum, model_dir, tmp_path):
    pytest.importorskip("distributed")
    studies, out, snap = studies_with_labels_inside(tmp_path)
    args = batch_args(studies, out, model_dir)
    proc = start_batch(args)
    wait_for(lambda: any(out.glob("case*.tags.json")), proc, "the first output", seconds=240)
    family = descendants(proc.pid)
    proc.send_signal(signum)
    outcome = finish(proc)
    interrupted = signum == signal.SIGINT
    assert_refused(outcome, [], ["interrupted" if interrupted else "terminated"], untouched=snap,
                   no_temps_in=[studies], status=130 if interrupted else 143)
    assert_all_end(family)
    assert_rerun_finishes(args, studies, out, finished_outputs(out), snap)
