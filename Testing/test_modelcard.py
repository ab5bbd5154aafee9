"""model.json validation (every broken field is named with its file) and the model registry."""

from __future__ import annotations

import json

import pytest
from cardfactory import BASE, card_dict, write_card

from medautolabel.catalog import registry as models
from medautolabel.catalog.modelcard import ModelCard
from medautolabel.errors import ModelError

DELETE = object()


def edited(path: str, value):
    """BASE with one field replaced (or deleted); ``path`` like ``labels.1.color``."""
    d = card_dict()
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = d
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return d


BROKEN = [
    # (edit, value, field named in the message, what the message says)
    ("format", "medautolabel-model/9", "format", "expected 'medautolabel-model/1'"),
    ("id", DELETE, "id", "missing"),
    ("id", "my model", "id", "without spaces"),
    ("name", 3, "name", "expected a non-empty string"),
    ("modality", "XR", "modality", "expected one of CT, MR"),
    ("input", DELETE, "input", "missing"),
    ("input.channels", [], "input.channels", "non-empty list"),
    ("input.channels.1.window", [350, -150], "input.channels[1].window", "expected low < high"),
    ("input.channels.1.window", [0, "1800"], "input.channels[1].window", "expected 2 numbers"),
    ("input.channels.0.percentiles", [1, 99], "input.channels[0]", "exactly one of 'window'"),
    ("preprocessing.spacing", [0.8, 0, 0.8], "preprocessing.spacing", "expected 3 numbers > 0"),
    ("preprocessing.spacing", [0.8, 0.8], "preprocessing.spacing", "expected 3 numbers > 0"),
    ("preprocessing.orientation", "RAR", "preprocessing.orientation", "one of R/L, A/P and S/I"),
    ("preprocessing.axis_order", "zyx", "preprocessing.axis_order", "expected \"kji\" or \"ijk\""),
    ("preprocessing.crop_foreground.margin_mm", "10", "preprocessing.crop_foreground.margin_mm",
     "expected a number"),
    ("preprocessing.crop_foreground.threshold", DELETE, "preprocessing.crop_foreground.threshold", "missing"),
    ("preprocessing.spacng", [1, 1, 1], "preprocessing.spacng", "unknown field"),
    ("network.architecture", "ResNet", "network.architecture", "expected one of UNet"),
    ("network.weights", "../other/model.pt", "network.weights", "inside the model folder"),
    ("network.weights", "/etc/model.pt", "network.weights", "inside the model folder"),
    ("network.sha256", "abc", "network.sha256", "64 hexadecimal digits"),
    ("network.parameters.in_channels", 3, "network.parameters.in_channels", "lists 2 channel(s)"),
    ("network.parameters", [1], "network.parameters", "expected an object"),
    ("inference.roi_size", [96, 96], "inference.roi_size", "expected 3 integers > 0"),
    ("inference.roi_size", [96, 96.5, 96], "inference.roi_size", "expected 3 integers > 0"),
    ("inference.overlap", 1.5, "inference.overlap", "expected a number in 0.0..0.95"),
    ("inference.sw_batch_size", 0, "inference.sw_batch_size", "expected an integer >= 1"),
    ("inference.sw_batch_size", True, "inference.sw_batch_size", "expected an integer"),
    ("inference.blend", "mean", "inference.blend", "\"gaussian\" or \"constant\""),
    ("segmentation.activation", "relu", "segmentation.activation", "\"softmax\" or \"sigmoid\""),
    ("segmentation.channels", 5, "segmentation.channels", "network has 4 output channels"),
    ("labels", [], "labels", "non-empty list"),
    ("labels.1.color", [0.95, 0.85], "labels[1].color", "expected 3 numbers in 0..1"),
    ("labels.1.color", [1, 2, 0], "labels[1].color", "expected 3 numbers in 0..1"),
    ("labels.0.value", 0, "labels[0].value", "expected an integer 1..255"),
    ("labels.1.value", 1, "labels[1].value", "label value 1 used twice"),
    ("labels.1.name", "Vessel", "labels[1].name", "used twice"),
    ("labels.1.channel", 3, "labels[1].channel", "expected 1..2"),
    ("labels.0.terminology.type.value", DELETE, "labels[0].terminology.type.value", "missing"),
    ("labels.0.terminology.category", "SCT", "labels[0].terminology.category", "expected an object"),
    ("labels.0.postprocessing.largest_component", "yes", "labels[0].postprocessing.largest_component",
     "expected true or false"),
    ("labels.0.postprocessing.min_size_mm3", -1, "labels[0].postprocessing.min_size_mm3", "expected a number in"),
    ("classification.0.classes", ["absent"], "classification[0].classes", "expected 2 different names"),
    ("classification.0.channel", 7, "classification[0].channel", "network has 4 output channels"),
    ("classification.0.channel", 1, "classification[0].channel", "one of the softmax channels"),
    ("classification.0.method", "max", "classification[0].method", "expected one of voxel_evidence, network"),
    ("low_confidence_threshold", 1.5, "low_confidence_threshold", "expected a number in 0.0..1.0"),
    ("provenance", "me", "provenance", "expected an object"),
]


@pytest.mark.parametrize("edit,value,field,problem", BROKEN, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BROKEN])
def test_broken_field_is_named_with_the_file(tmp_path, edit, value, field, problem):
    path = write_card(tmp_path / "m", edited(edit, value))
    with pytest.raises(ModelError) as info:
        ModelCard.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field '{field}': "), message
    assert problem in message, message
    assert info.value.path == str(path)
    assert "\n" not in message and "Traceback" not in message


def test_unreadable_cards(tmp_path):
    with pytest.raises(ModelError, match="model card not found"):
        ModelCard.load(tmp_path / "nothing" / "model.json")
    bad = tmp_path / "model.json"
    bad.write_text('{"format": "medautolabel-model/1",\n "id": }')
    with pytest.raises(ModelError, match=r"model.json: not valid JSON \(line 2, column 8"):
        ModelCard.load(bad)
    bad.write_text("[]")
    with pytest.raises(ModelError, match=r"field '\(top level\)': expected an object"):
        ModelCard.load(bad)


def test_valid_card_loads_with_defaults_and_round_trips(tmp_path):
    d = card_dict()
    del d["classification"], d["preprocessing"]["crop_foreground"], d["inference"]["blend"]
    path = write_card(tmp_path / "m", d)
    card = ModelCard.load(tmp_path / "m")  # a folder works as well as its model.json
    assert card.path == path and card.folder == tmp_path / "m"
    assert card.weights_path == tmp_path / "m" / "model.pt"
    assert card.classification == [] and card.preprocessing.crop_foreground is None
    assert card.inference.blend == "gaussian" and card.preprocessing.axis_order == "kji"
    assert card.labels[1].color == (0.95, 0.85, 0.3) and card.labels[0].terminology.type.meaning == "Blood vessel"
    assert card.out_channels == 4
    again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())), path)
    assert again == card
    full = ModelCard.from_dict(BASE)
    assert ModelCard.from_dict(full.to_dict()) == full


# ----------------------------------------------------------------------------- registry


def make_model(folder, model_id, version="1.0.0"):
    return write_card(folder, card_dict(id=model_id, version=version))


def test_registry_finds_models_on_the_model_path(tmp_path, monkeypatch):
    make_model(tmp_path / "collection" / "alpha", "alpha")
    make_model(tmp_path / "collection" / "beta", "beta")
    make_model(tmp_path / "single", "gamma")
    (tmp_path / "collection" / "not-a-model").mkdir()
    monkeypatch.setenv(models.ENV_VAR, f"{tmp_path / 'collection'}{__import__('os').pathsep}{tmp_path / 'single'}")
    ids = [c.id for c in models.list_models()]
    assert ids[:3] == ["alpha", "beta", "gamma"]
    assert models.resolve_model("beta").folder == tmp_path / "collection" / "beta"
    assert models.resolve_model(str(tmp_path / "single")).id == "gamma"  # a folder path
    assert models.resolve_model(tmp_path / "single" / "model.json").id == "gamma"  # a card path
    card = models.resolve_model("alpha")
    assert models.resolve_model(card) is card


def test_model_path_wins_over_builtin_and_first_wins(tmp_path, monkeypatch):
    make_model(tmp_path / "a" / "dup", "dup", "2.0.0")
    make_model(tmp_path / "b" / "dup", "dup", "1.0.0")
    monkeypatch.setenv(models.ENV_VAR, f"{tmp_path / 'a'}{__import__('os').pathsep}{tmp_path / 'b'}")
    assert models.resolve_model("dup").version == "2.0.0"
    assert [c.id for c in models.list_models()].count("dup") == 1


def test_unknown_model_lists_the_available_ids(tmp_path, monkeypatch):
    make_model(tmp_path / "alpha", "alpha")
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path))
    with pytest.raises(ModelError, match=r"unknown model 'nope'; available models: alpha"):
        models.resolve_model("nope")
    with pytest.raises(ModelError, match="model folder not found"):
        models.resolve_model(str(tmp_path / "missing-folder"))


def test_broken_card_is_skipped_with_a_warning_but_loading_it_directly_fails(tmp_path, monkeypatch):
    make_model(tmp_path / "good", "good")
    write_card(tmp_path / "bad", edited("labels.1.color", [2, 2, 2]))
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path))
    with pytest.warns(UserWarning, match=r"labels\[1\].color"):
        assert "good" in [c.id for c in models.list_models()]
    with pytest.raises(ModelError, match=r"field 'labels\[1\].color'"):
        models.resolve_model(str(tmp_path / "bad"))


def test_builtin_models_are_valid_when_present(monkeypatch):
    """The built-in folder may still be empty (the model is being trained); what is there must load."""
    monkeypatch.delenv(models.ENV_VAR, raising=False)
    for folder in models.model_folders():
        assert folder.parent == models.BUILTIN_DIR
        ModelCard.load(folder)
