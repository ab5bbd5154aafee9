"""A classification tag that missed its validation targets says so everywhere it is shown (#15, item 3).

The built-in model's aneurysm tag has ROC AUC 0.39 on held-out phantoms (docs/builtin-model.md): its
card says ``"validated": false``, and tags.json, the command's summary line and the demo carry that.
"""

from __future__ import annotations

import json

import pytest
from cardfactory import card_dict
from hostile import run_inprocess
from thresholdmodel import sphere_image, write_threshold_model

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.catalog.registry import resolve_model
from medautolabel.errors import ModelError
from medautolabel.io.images import write_image


def test_a_card_task_is_validated_unless_it_says_otherwise():
    assert ModelCard.from_dict(card_dict()).classification[0].validated is True
    d = card_dict()
    d["classification"][0]["validated"] = False
    card = ModelCard.from_dict(d)
    assert card.classification[0].validated is False
    assert card.to_dict()["classification"][0]["validated"] is False  # kept when the card is written again


@pytest.mark.parametrize("value", ["no", 0, 1, [False]])
def test_validated_must_be_true_or_false(value):
    d = card_dict()
    d["classification"][0]["validated"] = value
    with pytest.raises(ModelError, match=r"classification\[0\]\.validated.: expected true or false"):
        ModelCard.from_dict(d)


def test_the_builtin_aneurysm_tag_is_marked_not_validated():
    (task,) = resolve_model("vessel-nerve-cta").classification
    assert task.task == "aneurysm" and task.validated is False


def test_tags_and_summary_line_carry_method_and_validation(tmp_path):
    folder = write_threshold_model(tmp_path / "model")
    card = json.loads((folder / "model.json").read_text())
    card["classification"][0]["validated"] = False
    (folder / "model.json").write_text(json.dumps(card))
    image = write_image(sphere_image(), tmp_path / "in" / "scan.nii.gz")
    outcome = run_inprocess(["label", image, "-o", tmp_path / "out", "--model", folder, "--device", "cpu", "-q"])
    assert outcome.status == 0, outcome.err
    (tag,) = json.loads((tmp_path / "out" / "scan.tags.json").read_text())["classifications"]
    assert tag["method"] == "voxel_evidence" and tag["validated"] is False
    assert outcome.out[-1].endswith("aneurysm: absent p=1.00 (not validated)"), outcome.out
