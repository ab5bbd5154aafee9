"""CPU-sized training: the defaults ``train`` picks for the device and the dataset size, explicit settings
winning over them, and the estimate printed after the first iterations (tiny dataset, tiny network).

Speed itself is measured (docs/benchmarks.md), not asserted here.
"""

from __future__ import annotations

import copy
import json

import pytest
from hostile import run_inprocess
from test_training import TINY, write_spheres

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.training.config import ConfigError, apply_overrides, device_defaults, load_config
from medautolabel.training.loop import Estimate, bar_text, minutes, train


def tiny_without(*keys: str) -> dict:
    """The tiny test config with ``keys`` removed (so that the device's defaults fill them)."""
    cfg = copy.deepcopy(TINY)
    for key in keys:
        cfg.pop(key, None)
    return cfg


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    return write_spheres(tmp_path_factory.mktemp("data") / "spheres", 8)


@pytest.mark.parametrize("device, cases, iterations", [
    ("cpu", 5, 20), ("cpu", 1, 10), ("cpu", 0, 10), ("cpu", 24, 96), ("cpu", 400, 100),
    ("cuda", 5, 250), ("cuda", 400, 250), ("mps", 5, 250)])
def test_device_defaults_by_dataset_size_and_device(device, cases, iterations):
    cfg = load_config({"epochs": 2})
    chosen = device_defaults(cfg, device, cases)
    gpu = device != "cpu"
    assert cfg.iterations_per_epoch == iterations
    assert cfg.classification.interval == (1 if gpu else 4)
    assert cfg.classification.crop_size == ([128] * 3 if gpu else [96] * 3)
    # a GPU keeps 200 warm-up steps; a CPU run of 2 epochs warms up for a tenth of its steps
    assert cfg.schedule.warmup_iterations == (200 if gpu else max(1, 2 * iterations // 10))
    assert chosen == {"iterations_per_epoch": iterations, "classification.interval": cfg.classification.interval,
                      "classification.crop_size": cfg.classification.crop_size,
                      "schedule.warmup_iterations": cfg.schedule.warmup_iterations}
    assert cfg.patch_size == [64, 64, 64] and cfg.batch_size == 2  # the same on every device


def test_long_cpu_runs_keep_the_full_warm_up():
    cfg = load_config({"epochs": 100})
    device_defaults(cfg, "cpu", 5)
    assert cfg.schedule.warmup_iterations == 200


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_settings_win_over_the_device_defaults(device):
    cfg = load_config({"iterations_per_epoch": 7, "classification": {"interval": 2, "crop_size": [32, 48, 64]},
                       "schedule": {"warmup_iterations": 3}})
    assert device_defaults(cfg, device, 5) == {}
    assert (cfg.iterations_per_epoch, cfg.classification.interval, cfg.classification.crop_size,
            cfg.schedule.warmup_iterations) == (7, 2, [32, 48, 64], 3)


def test_a_cpu_warm_up_follows_the_iterations_the_user_chose():
    cfg = load_config({"iterations_per_epoch": 30, "epochs": 3})
    assert device_defaults(cfg, "cpu", 5) == {"classification.interval": 4, "classification.crop_size": [96] * 3,
                                               "schedule.warmup_iterations": 9}
    assert cfg.iterations_per_epoch == 30


def test_command_line_overrides_win_over_the_config_and_bad_ones_are_named():
    cfg = load_config({"iterations_per_epoch": 7, "epochs": 5, "classification": {"interval": 3}})
    apply_overrides(cfg, {"epochs": 2, "iterations_per_epoch": None, "classification.interval": 1})
    assert (cfg.epochs, cfg.iterations_per_epoch, cfg.classification.interval) == (2, 7, 1)
    for key, value in (("epochs", 0), ("iterations_per_epoch", -1), ("classification.interval", 1.5)):
        with pytest.raises(ConfigError, match=f"key '{key}': expected an integer >= 1"):
            apply_overrides(cfg, {key: value})


def test_estimate_counts_steps_and_bags_apart_and_leaves_out_the_first_iteration():
    est = Estimate(iterations=10, bag_steps=3, validation_interval=2)
    assert est.epoch_seconds() is None and not est.ready()
    est.add(100.0, 500.0)  # the first iteration: allocations, kernel choice
    assert est.epoch_seconds() == 10 * 100.0 + 3 * 500.0  # all there is so far
    for step in (1.0, 2.0, 3.0):
        est.add(step, None)
    assert not est.ready()  # no bag step counted yet
    est.add(2.0, 8.0)
    assert est.ready()
    assert est.epoch_seconds() == pytest.approx(10 * 2.0 + 3 * 8.0)
    est.validation = 30.0
    assert est.epoch_seconds() == pytest.approx(10 * 2.0 + 3 * 8.0 + 15.0)
    assert est.line(4).startswith(f"estimate: about {minutes(59.0)} per epoch, {minutes(4 * 59.0)} in all")


def test_the_progress_bar_shows_the_estimate_per_epoch_once_known():
    est = Estimate(iterations=20, bag_steps=0, validation_interval=1)
    est.add(9.0, None)
    assert bar_text(0, 2, est) == "epoch 1/2"  # the first iteration alone is no estimate
    for _ in range(Estimate.ESTIMATE_AFTER):
        est.add(3.0, None)
    assert bar_text(0, 2, est) == "epoch 1/2 (~1.0 min/epoch)"
    est.validation = 6.0
    assert bar_text(1, 2, est) == "epoch 2/2 (~1.1 min/epoch)"


@pytest.mark.parametrize("seconds, text", [(24, "0.4 min"), (90, "1.5 min"), (600, "10 min"), (3000, "50 min"),
                                           (9000, "2.5 h")])
def test_minutes_for_people(seconds, text):
    assert minutes(seconds) == text


def test_estimate_line_after_the_first_iterations_and_the_choices_recorded(spheres, tmp_path):
    """CPU defaults fill what the config leaves out; they are printed, saved and in the card's provenance."""
    messages, ticks = [], []
    cfg = tiny_without("iterations_per_epoch")
    cfg["epochs"] = 2
    result = train(spheres, tmp_path / "model", config=cfg, device="cpu", cache_path=tmp_path / "c.h5",
                   log=messages.append, progress=ticks.append)
    chosen = [m for m in messages if m.startswith("cpu defaults: ")]
    assert chosen == ["cpu defaults: iterations_per_epoch 24, classification.interval 4, classification.crop_size "
                      "[96, 96, 96] (set them in the config to choose others)"], messages
    estimates = [n for n, m in enumerate(messages) if m.startswith("estimate: about ")]
    assert len(estimates) == 1, messages
    first_epoch = next(n for n, m in enumerate(messages) if m.startswith("epoch 1/2 "))
    assert estimates[0] < first_epoch
    assert " per epoch, " in messages[estimates[0]] and " min in all plus validation (2 epoch(s) of 24 iterations; " \
        "6 with a classification bag)" in messages[estimates[0]]
    known = [t for t in ticks if "iteration" in t and t["epoch_seconds_estimate"] is not None]
    # ready at iteration 5: the first (not counted), three counted ones, then the second bag step (4 steps later)
    assert (known[0]["epoch"], known[0]["iteration"]) == (1, 1 + Estimate.ESTIMATE_AFTER + 1)
    assert all(t["epoch_seconds_estimate"] > 0 for t in known)

    saved = json.loads((tmp_path / "model" / "training" / "config.json").read_text(encoding="utf-8"))
    assert saved["iterations_per_epoch"] == 24 and saved["classification"]["interval"] == 4
    prov = ModelCard.load(result.model_dir).provenance
    assert prov["device_defaults"] == {"iterations_per_epoch": 24, "classification.interval": 4,
                                       "classification.crop_size": [96, 96, 96]}
    assert prov["config"]["iterations_per_epoch"] == 24 and prov["config"]["schedule"]["warmup_iterations"] == 5
    assert len(result.history) == 2 and result.history[-1]["iterations"] == 48


def test_command_line_settings_win_and_are_recorded(spheres, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(tiny_without("iterations_per_epoch"), epochs=3)), encoding="utf-8")
    out = tmp_path / "model"
    outcome = run_inprocess(["train", spheres, "-o", out, "--config", config, "--device", "cpu", "--cache",
                             tmp_path / "c.h5", "--epochs", "1", "--iterations", "3", "--bag-interval", "2"])
    assert outcome.status == 0, outcome.err
    assert any(line.startswith("estimate: about ") for line in outcome.out), outcome.out
    prov = ModelCard.load(out).provenance
    assert (prov["config"]["epochs"], prov["config"]["iterations_per_epoch"],
            prov["config"]["classification"]["interval"]) == (1, 3, 2)
    assert prov["device_defaults"] == {"classification.crop_size": [96, 96, 96]}
    assert prov["epochs_run"] == 1


def test_a_resumed_run_keeps_the_values_its_first_start_chose(spheres, tmp_path):
    cfg = dict(tiny_without("iterations_per_epoch"), epochs=2)
    common = dict(device="cpu", cache_path=tmp_path / "c.h5", log=lambda m: None)
    train(spheres, tmp_path / "model", config=cfg, stop_after_epochs=1, **common)
    messages = []
    result = train(spheres, tmp_path / "model", resume=True, **dict(common, log=messages.append))
    assert not any(m.startswith("cpu defaults: ") for m in messages)  # nothing left to choose: config.json has it
    prov = ModelCard.load(result.model_dir).provenance
    assert prov["device_defaults"]["iterations_per_epoch"] == 24 and prov["epochs_run"] == 2
