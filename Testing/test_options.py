"""One ``LabelOptions`` from every door to ``label_image``: checked when made, refused when unknown, never dropped."""

from __future__ import annotations

import io
import json
import math

import pytest
from thresholdmodel import sphere_image, write_threshold_model

import medautolabel.labelling.pipeline as pipeline
from medautolabel.cli.app import main
from medautolabel.errors import MedAutoLabelError
from medautolabel.io.images import write_image
from medautolabel.options import LabelOptions
from MedAutoLabelLib.runner import BackgroundLabeller
from MedAutoLabelLib.worker import handle

EVERY_OPTION = LabelOptions(device="cpu", precision="float32", tta="flip", postprocess=False,
                            low_confidence_threshold=0.7, trust=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


@pytest.fixture()
def scan(tmp_path):
    path = tmp_path / "in" / "case01.nii.gz"
    path.parent.mkdir()
    write_image(sphere_image(), path)
    return path


@pytest.fixture()
def seen_options(monkeypatch):
    """The options every ``label_image`` call of the test receives (the real function still runs)."""
    seen = []
    real = pipeline.label_image

    def spy(image, model, options=None, **kwargs):
        seen.append(options)
        return real(image, model, options, **kwargs)

    monkeypatch.setattr(pipeline, "label_image", spy)
    return seen


@pytest.mark.parametrize("changes, problem", [
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"device": 3}, "unknown device 3"),
    ({"precision": "half"}, "unknown precision 'half'"),
    ({"tta": "rotate"}, "unknown test-time augmentation 'rotate'"),
    ({"low_confidence_threshold": math.nan}, "low-confidence threshold nan is not a number between 0 and 1"),
    ({"low_confidence_threshold": math.inf}, "low-confidence threshold inf"),
    ({"low_confidence_threshold": 1.5}, "low-confidence threshold 1.5"),
    ({"low_confidence_threshold": -0.1}, "low-confidence threshold -0.1"),
    ({"low_confidence_threshold": "0.5"}, "low-confidence threshold '0.5'"),
    ({"low_confidence_threshold": True}, "low-confidence threshold True"),
    ({"postprocess": "no"}, "option postprocess must be true or false"),
    ({"trust": 1}, "option trust must be true or false"),
])
def test_bad_options_are_refused_in_one_line_when_made(changes, problem):
    with pytest.raises(MedAutoLabelError, match=problem) as made:
        LabelOptions(**changes)
    assert "\n" not in str(made.value)
    with pytest.raises(MedAutoLabelError, match=problem):  # a changed copy is checked the same way
        LabelOptions().replace(**changes)


def test_good_options_are_kept_as_given():
    assert LabelOptions() == LabelOptions(device="auto", precision="auto", tta=None, postprocess=True,
                                          low_confidence_threshold=None, trust=False)
    assert LabelOptions(device="cuda:1").device == "cuda:1"
    assert LabelOptions(low_confidence_threshold=1).low_confidence_threshold == 1
    with pytest.raises(AttributeError):
        EVERY_OPTION.device = "cuda"  # frozen: what a caller made is what every layer sees


def test_mapping_round_trip_through_json():
    data = json.loads(json.dumps(EVERY_OPTION.to_mapping()))
    assert data == {"device": "cpu", "precision": "float32", "tta": "flip", "postprocess": False,
                    "low_confidence_threshold": 0.7, "trust": True}
    assert LabelOptions.from_mapping(data) == EVERY_OPTION
    assert LabelOptions.from_mapping({}) == LabelOptions()


def test_from_mapping_refuses_unknown_fields_instead_of_dropping_them():
    with pytest.raises(MedAutoLabelError, match=r"^unknown labelling option\(s\): colour, speed$"):
        LabelOptions.from_mapping({"device": "cpu", "speed": "fast", "colour": "red"})
    with pytest.raises(MedAutoLabelError, match="must be a mapping"):
        LabelOptions.from_mapping(["device", "cpu"])
    with pytest.raises(MedAutoLabelError, match="unknown precision"):
        LabelOptions.from_mapping({"precision": "float8"})


def test_label_image_takes_options_and_keyword_changes(model_dir):
    image = sphere_image()
    given = LabelOptions(device="cpu", tta="flip", precision="float32", low_confidence_threshold=0.6)
    result = pipeline.label_image(image, str(model_dir), given, postprocess=False)
    provenance = result.provenance
    assert provenance["test_time_augmentation"] == "flip" and provenance["precision"] == "float32"
    assert provenance["postprocessing"] is False and provenance["low_confidence_threshold"] == 0.6
    with pytest.raises(TypeError, match="LabelOptions"):
        pipeline.label_image(image, str(model_dir), "cpu")  # the old third positional argument
    with pytest.raises(TypeError):
        pipeline.label_image(image, str(model_dir), device="cpu", speed="fast")


def _worker_request(tmp_path, **fields):
    image = tmp_path / "input.nrrd"
    write_image(sphere_image(), image, compress=False)
    return {"id": 1, "image": str(image), "output": str(tmp_path / "out"), "modality": None, **fields}


def _answer(request):
    stream = io.StringIO()
    handle(request, stream)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("field, where", [({"device": "cpu"}, "request field(s): device"),
                                          ({"options": {"device": "cpu", "speed": "fast"}}, "labelling option(s): speed")])
def test_the_worker_refuses_a_request_with_an_unknown_field(field, where, model_dir, tmp_path, seen_options):
    messages = _answer(_worker_request(tmp_path, model=str(model_dir), **field))
    assert [m["event"] for m in messages] == ["error"]
    assert messages[0]["id"] == 1 and f"unknown {where}" in messages[0]["message"]
    assert seen_options == []  # nothing was labelled with the field dropped
    assert not (tmp_path / "out").exists()


def test_the_worker_passes_tta_and_precision_to_label_image(model_dir, tmp_path, seen_options):
    options = LabelOptions(device="cpu", tta="flip", precision="float32", low_confidence_threshold=0.4)
    messages = _answer(_worker_request(tmp_path, model=str(model_dir), options=options.to_mapping()))
    assert messages[-1]["event"] == "done", messages[-1]
    assert seen_options == [options]
    provenance = json.loads(open(messages[-1]["tags"], encoding="utf-8").read())["provenance"]
    assert provenance["test_time_augmentation"] == "flip" and provenance["precision"] == "float32"
    assert provenance["low_confidence_threshold"] == 0.4


class _Recorder:
    """Stands in for the worker process: keeps the requests the runner sends."""

    def __init__(self) -> None:
        self.sent = []

    def alive(self) -> bool:
        return True

    def send(self, request) -> None:
        self.sent.append(request)


def test_the_runner_sends_every_option_and_the_worker_takes_its_request(model_dir, tmp_path, seen_options):
    runner = BackgroundLabeller()
    runner.worker = recorder = _Recorder()
    try:
        runner.start(sphere_image(), str(model_dir), device="cpu", postprocess=False, low_confidence=0.4,
                     tta="flip", precision="float32")
        request = recorder.sent[0]
        assert request["options"] == {"device": "cpu", "precision": "float32", "tta": "flip", "postprocess": False,
                                      "low_confidence_threshold": 0.4, "trust": False}
        assert _answer(request)[-1]["event"] == "done"
        assert seen_options == [LabelOptions.from_mapping(request["options"])]
    finally:
        runner.cleanup()
    with pytest.raises(MedAutoLabelError, match="unknown precision"):
        runner.start(sphere_image(), str(model_dir), precision="half")  # refused before any worker is asked


def test_the_label_command_options_reach_label_image_unchanged(model_dir, scan, tmp_path, seen_options):
    assert main(["label", str(scan), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--device", "cpu",
                 "--precision", "float32", "--tta", "flip", "--no-postprocess", "--low-confidence", "0.7",
                 "--trust", "-q"]) == 0
    assert seen_options == [EVERY_OPTION]
    tags = json.loads((tmp_path / "out" / "case01.tags.json").read_text(encoding="utf-8"))
    assert tags["provenance"]["test_time_augmentation"] == "flip" and tags["provenance"]["postprocessing"] is False


def test_the_label_command_defaults_are_the_default_options(model_dir, scan, tmp_path, seen_options):
    assert main(["label", str(scan), "-o", str(tmp_path / "out"), "--model", str(model_dir), "-q"]) == 0
    assert seen_options == [LabelOptions()]


def test_the_label_command_refuses_a_bad_device_in_one_line(model_dir, scan, tmp_path, capsys, seen_options):
    assert main(["label", str(scan), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--device", "tpu",
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert err == "medautolabel: error: unknown device 'tpu': expected one of auto, cpu, cuda, mps\n"
    assert seen_options == []


def test_the_batch_command_builds_one_options_object(model_dir, scan, tmp_path, monkeypatch):
    import medautolabel.labelling.cluster_batch as cluster_batch

    calls = []
    monkeypatch.setattr(cluster_batch, "run_batch", lambda cases, out, **kwargs: calls.append(kwargs) or [])
    assert main(["batch", str(scan.parent), "-o", str(tmp_path / "out"), "--model", str(model_dir),
                 "--device", "cpu", "--trust", "-q"]) == 0
    assert calls[0]["options"] == LabelOptions(device="cpu", trust=True)


def test_the_dask_task_takes_the_options_as_data(model_dir, scan, tmp_path, seen_options):
    from medautolabel.labelling.cluster_batch import label_case

    options = LabelOptions(device="cpu", tta="flip", precision="float32")
    record = label_case(str(scan), str(tmp_path / "out"), str(model_dir), options.to_mapping(), "seg.nrrd", 0)
    assert record["status"] == "ok", record
    assert seen_options == [options]
    with pytest.raises(MedAutoLabelError, match=r"unknown labelling option\(s\): speed"):
        label_case(str(scan), str(tmp_path / "out2"), str(model_dir), {"speed": "fast"}, "seg.nrrd", 0)
