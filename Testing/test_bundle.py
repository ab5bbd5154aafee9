"""MONAI bundles: export, MONAI's own runner, our runner, and the trust rule."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medautolabel.catalog.bundle import bundle_sha256
from medautolabel.cli.app import main
from medautolabel.evaluation.metrics import dice
from medautolabel.image import make_ijk_to_ras
from medautolabel.io.images import read_image, write_image
from medautolabel.labelling.bundle_runner import BundleModel
from medautolabel.labelling.pipeline import label_image
from medautolabel.synthetic.phantoms import render, training_grid

pytest.importorskip("ignite", reason="MONAI's bundle runner needs pytorch-ignite")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "vessel-nerve-cta"
    assert main(["models", "export-bundle", "vessel-nerve-cta", str(out)]) == 0
    return out


def small_oblique_phantom(seed: int = 1_000_009):
    """~64^3 voxels on an oblique anisotropic grid: quick to label."""
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    spacing = (0.9, 0.8, 1.2)
    shape = (48, 70, 62)
    m = make_ijk_to_ras(spacing, rot)
    m[:3, 3] = -m[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2)
    return render(seed, shape, m)


def test_export_writes_a_model_zoo_layout(bundle_dir):
    for name in ("configs/inference.json", "configs/metadata.json", "configs/medautolabel.json", "models/model.pt",
                 "docs/README.md"):
        assert (bundle_dir / name).is_file(), name
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "vessel",
                                                                               "2": "nerve"}
    config = json.loads((bundle_dir / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert config["datalist"].endswith("'/imagesTs/*.nii.gz')))") and config["network_def"]["_target_"] == "UNet"


@pytest.mark.slow
def test_monai_runner_and_medautolabel_give_the_same_labels(bundle_dir, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "imagesTs").mkdir(parents=True)
    image = small_oblique_phantom().image
    write_image(image, data / "imagesTs" / "case1.nii.gz")
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(bundle_dir / "configs" / "inference.json"), "--bundle_root", str(bundle_dir),
                          "--dataset_dir", str(data), "--output_dir", str(tmp_path / "monai")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = read_image(tmp_path / "monai" / "case1_seg.nii.gz")
    assert main(["label", str(data / "imagesTs" / "case1.nii.gz"), "-o", str(tmp_path / "ours"), "--model",
                 str(bundle_dir), "--trust", "--device", "cpu", "-q"]) == 0
    from medautolabel.io.segnrrd import read_seg_nrrd

    ours, segments = read_seg_nrrd(tmp_path / "ours" / "case1.seg.nrrd")
    assert [s.name for s in segments] == ["Vessel", "Nerve"]  # names, colours, codes from the sidecar
    assert segments[0].terminology.type.value == "59820001"
    np.testing.assert_allclose(theirs.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    for value in (1, 2):
        assert (theirs.array == value).sum() > 50
        assert dice(theirs.array == value, ours.array == value) >= 0.99


def test_exported_bundle_equals_the_native_model_on_its_own_grid(bundle_dir):
    """Same network, normalisation and axis order: identical labels where no resampling is involved."""
    shape, m = training_grid(64, 0.8)
    image = render(1_000_010, shape, m).image
    ours = BundleModel(bundle_dir, device="cpu", trust=True).label(image)
    # bundles have no TTA and run in float32 (native "auto" would be bfloat16 on CPUs with native bfloat16)
    native = label_image(image, "vessel-nerve-cta", device="cpu", postprocess=False, tta="none", precision="float32")
    for value in (1, 2):
        assert (native.labelmap.array == value).sum() > 50
        assert dice(ours.labelmap.array == value, native.labelmap.array == value) >= 0.99


def test_untrusted_bundle_is_refused_then_trusted_by_its_digest(bundle_dir, tmp_path, capsys, monkeypatch):
    image = tmp_path / "scan.nii.gz"
    write_image(render(1_000_011, *training_grid(48, 0.8)).image, image)
    out = tmp_path / "out"
    trusted = tmp_path / "trusted.txt"
    monkeypatch.setenv("MEDAUTOLABEL_TRUSTED_BUNDLES", str(trusted))
    status = main(["label", str(image), "-o", str(out), "--model", str(bundle_dir), "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    digest = bundle_sha256(bundle_dir)
    assert status == 2 and len(err) == 1
    assert "--trust" in err[0] and digest in err[0] and str(bundle_dir) in err[0]
    assert not out.exists() or not any(out.iterdir())
    trusted.write_text(f"{digest}  # exported built-in model\n", encoding="utf-8")
    assert main(["label", str(image), "-o", str(out), "--model", str(bundle_dir), "--device", "cpu", "-q"]) == 0
    assert (out / "scan.seg.nrrd").exists()
    (bundle_dir / "configs" / "extra.json").write_text("{}", encoding="utf-8")  # any change: no longer trusted
    try:
        with pytest.raises(Exception, match="runs only when trusted"):
            BundleModel(bundle_dir, device="cpu")
    finally:
        (bundle_dir / "configs" / "extra.json").unlink()
