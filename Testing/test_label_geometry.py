"""Geometry through the ``label`` command: an object at a known RAS position comes back at that position.

The input is written to a file (NRRD, NIfTI or MetaImage), labelled by the command, and the
``.seg.nrrd`` is read back with pynrrd alone (LPS header arithmetic here, not the engine's reader).
"""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
from cardfactory import GRIDS
from thresholdmodel import CENTER, RADIUS, sphere_image, write_threshold_model

from medautolabel.cli.app import main
from medautolabel.io.images import read_image, write_image
from medautolabel.labelling.pipeline import label_image

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
FORMATS = [".nrrd", ".nii.gz", ".mha"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


def seg_nrrd_ras_points(path, value: int):
    """RAS mm of every voxel holding ``value`` in a .seg.nrrd (3D labelmap or 4D layers), by pynrrd."""
    data, header = nrrd.read(str(path))  # data in (i, j, k) index order
    directions = np.array([d for d in header["space directions"] if d is not None and not np.all(np.isnan(d))],
                          dtype=float)
    if data.ndim == 4:  # layers first
        data = data.max(axis=0) if data.shape[0] > 1 else data[0]
    assert header["space"] in ("left-posterior-superior", "LPS")
    origin = np.asarray(header["space origin"], dtype=float)
    ijk = np.argwhere(data == value).astype(float)
    lps = ijk @ directions + origin  # row d of "space directions" is the step of index axis d
    return lps @ LPS_TO_RAS.T, data, directions, origin


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_sphere_comes_back_where_it_was(grid_name, model_dir, tmp_path, capsys):
    fmt = FORMATS[sorted(GRIDS).index(grid_name) % len(FORMATS)]
    image = sphere_image(grid_name)
    scan = tmp_path / f"scan{fmt}"
    write_image(image, scan)
    out = tmp_path / "out"
    assert main(["label", str(scan), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "-q"]) == 0

    points, data, directions, origin = seg_nrrd_ras_points(out / "scan.seg.nrrd", 1)
    # the file's grid is the input's grid, read independently: same voxel centres in RAS
    written = read_image(scan)
    m_file = np.eye(4)
    m_file[:3, :3] = LPS_TO_RAS @ directions.T
    m_file[:3, 3] = LPS_TO_RAS @ origin
    np.testing.assert_allclose(m_file, written.ijk_to_ras, atol=1e-3)
    assert data.shape == written.array.shape[::-1]

    # the object sits where it was drawn, within a fraction of a voxel
    np.testing.assert_allclose(points.mean(axis=0), CENTER, atol=0.35)
    spacing = np.linalg.norm(image.ijk_to_ras[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000
    assert len(points) * voxel_ml == pytest.approx(4 / 3 * np.pi * RADIUS ** 3 / 1000, rel=0.08)

    # and voxel for voxel what the engine gives for the same image in memory
    direct = label_image(written, str(model_dir), device="cpu").labelmap.array
    np.testing.assert_array_equal(data.transpose(2, 1, 0), direct)


def test_nifti_output_is_on_the_input_grid(model_dir, tmp_path):
    image = sphere_image("oblique-permuted-flipped")
    scan = tmp_path / "scan.nii.gz"
    write_image(image, scan)
    out = tmp_path / "out"
    assert main(["label", str(scan), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "-q",
                 "--format", "nii.gz"]) == 0
    img = nib.load(str(out / "scan.nii.gz"))
    np.testing.assert_allclose(img.affine, nib.load(str(scan)).affine, atol=1e-4)
    ijk = np.argwhere(np.asarray(img.dataobj) == 1)
    ras = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    np.testing.assert_allclose(ras.mean(axis=0), CENTER, atol=0.35)
