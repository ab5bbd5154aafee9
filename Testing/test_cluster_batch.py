"""``medautolabel batch``: a local Dask cluster, resume after the process is killed, one bad case among good ones."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from killed_writer import kill_a_writer_of
from thresholdmodel import CENTER, sphere_image, write_threshold_model

from medautolabel.cli.app import main
from medautolabel.io.atomic import TEMP_PREFIX
from medautolabel.io.images import write_image
from medautolabel.labelling.cluster_batch import find_cases

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


def make_studies(folder: Path, n: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range(n):
        sub = folder / f"site{c % 2}"
        sub.mkdir(exist_ok=True)
        image = sphere_image("oblique-anisotropic", center=CENTER + np.array([c - 1.5, 0.0, 0.0]))
        path = sub / f"case{c:02d}.nii.gz"
        write_image(image, path)
        paths.append(path)
    return paths


def read_summary(out: Path) -> dict:
    with open(out / "summary.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def test_find_cases_takes_images_and_dicom_folders(tmp_path):
    make_studies(tmp_path / "in", 2)
    dicom = tmp_path / "in" / "series7"
    dicom.mkdir()
    (dicom / "0001.dcm").write_bytes(b"")
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "old.seg.nrrd").write_text("x")
    names = [p.name for p in find_cases(tmp_path / "in")]
    assert names == ["series7", "case00.nii.gz", "case01.nii.gz"]


@pytest.mark.slow
def test_two_workers_label_every_case_and_write_a_summary(model_dir, tmp_path, capsys):
    make_studies(tmp_path / "in", 4)
    bad = tmp_path / "in" / "site0" / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\n")
    out = tmp_path / "out"
    status = main(["batch", str(tmp_path / "in"), "-o", str(out), "--model", str(model_dir), "--device", "cpu",
                   "--workers", "2", "-q"])
    assert status == 2  # one case failed; the others were labelled
    rows = read_summary(out)
    assert set(rows) == {"case00", "case01", "case02", "case03", "broken"}
    assert rows["broken"]["status"] == "error" and "broken.nrrd" in rows["broken"]["message"]
    ok = [rows[f"case{c:02d}"] for c in range(4)]
    assert all(r["status"] == "ok" for r in ok)
    assert len({r["worker"] for r in ok}) == 2  # both workers took cases
    for r in ok:
        assert r["aneurysm"] == "absent" and float(r["Vessel mL"]) == pytest.approx(1.44, rel=0.08)
        assert (out / f"{r['case']}.seg.nrrd").exists() and (out / f"{r['case']}.tags.json").exists()
    assert not (out / "broken.seg.nrrd").exists() and not (out / "broken.tags.json").exists()
    assert "2 failed" not in capsys.readouterr().out


@pytest.mark.slow
def finished_cases(out: Path) -> Dict[str, int]:
    """{labelmap name: mtime} of the cases with all their outputs in ``out``.

    pathlib's glob matches hidden names: a SIGKILL during a write can leave a temporary behind, and a
    kill between two renames leaves only a case's tags.json (renamed first): neither is finished.
    """
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.seg.nrrd")
            if not p.name.startswith(TEMP_PREFIX) and (out / p.name.replace(".seg.nrrd", ".tags.json")).exists()}


def test_a_killed_batch_resumes_without_rewriting_finished_cases(model_dir, tmp_path):
    # twelve studies, looked at every 10 ms: the batch cannot finish them all between the look that
    # sees two done and the kill (with six and 200 ms it sometimes did, and nothing was left to resume)
    for c, path in enumerate(make_studies(tmp_path / "in", 6)):
        shutil.copy(path, path.parent / f"case{c + 6:02d}.nii.gz")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medautolabel", "batch", str(tmp_path / "in"), "-o", str(out),
           "--model", str(model_dir), "--device", "cpu", "--workers", "1", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(finished_cases(out)) < 2:
            time.sleep(0.01)
        assert len(finished_cases(out)) >= 2, "the batch did not get going"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: driver, scheduler, worker
        proc.wait(timeout=30)
    finished = finished_cases(out)
    assert 2 <= len(finished) < 12
    assert not (out / "summary.csv").exists()
    # Whether the kill hit a write is luck: make sure one unfinished case has a half-written temporary
    unfinished = sorted({f"case{c:02d}.seg.nrrd" for c in range(12)} - set(finished))[-1]
    kill_a_writer_of(out / unfinished)
    assert any(p.name.startswith(TEMP_PREFIX) and p.name.endswith(unfinished) for p in out.iterdir())

    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = read_summary(out)
    assert len(rows) == 12 and all(r["status"] in ("ok", "skipped") for r in rows.values())
    assert {f"{c}.seg.nrrd" for c, r in rows.items() if r["status"] == "skipped"} == set(finished)
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime  # never rewritten
    for r in rows.values():  # skipped cases still report their classes and volumes, from their tags
        assert r["aneurysm"] == "absent" and float(r["Vessel mL"]) > 1.0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the kill's temporaries are gone
