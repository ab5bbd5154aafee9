"""Hostile-input corpus, ``medautolabel train``: counts that are zero, negative or not whole numbers (on the
command line or in the config) and config keys holding control characters are refused with one line, exit 2,
before anything is read or written: no model folder, no cache, the dataset and the config byte-identical.
"""

from __future__ import annotations

import json

import pytest
from hostile import Snapshot, assert_refused, run_inprocess
from test_training import write_spheres


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    return write_spheres(tmp_path_factory.mktemp("data") / "spheres", 2)


# (id, command-line options, the option named in the error, the words of the problem)
OPTION_CASES = [
    ("epochs-zero", ["--epochs", "0"], "--epochs", ["expected an integer >= 1", "got 0"]),
    ("epochs-negative", ["--epochs", "-1"], "--epochs", ["expected an integer >= 1", "got -1"]),
    ("iterations-zero", ["--iterations", "0"], "--iterations", ["expected an integer >= 1", "got 0"]),
    ("iterations-negative", ["--iterations", "-250"], "--iterations", ["expected an integer >= 1", "got -250"]),
    ("bag-interval-zero", ["--bag-interval", "0"], "--bag-interval", ["expected an integer >= 1", "got 0"]),
    ("bag-interval-negative", ["--bag-interval", "-4"], "--bag-interval", ["expected an integer >= 1", "got -4"]),
    ("epochs-fine-iterations-zero", ["--epochs", "2", "--iterations", "0"], "--iterations", ["got 0"]),
    ("resume-with-epochs-zero", ["--resume", "--epochs", "0"], "--epochs", ["expected an integer >= 1"]),
]

# (id, config written as JSON text, words of the problem); the config file is named in the error (a bad count
# in it is refused even when a good --epochs is given: the last case)
CONFIG_CASES = [
    ("config-epochs-zero", '{"epochs": 0}', ["'epochs'", "expected an integer >= 1, got 0"]),
    ("config-epochs-negative", '{"epochs": -3}', ["'epochs'", "got -3"]),
    ("config-iterations-zero", '{"iterations_per_epoch": 0}', ["'iterations_per_epoch'", "expected an integer >= 1"]),
    ("config-iterations-negative", '{"iterations_per_epoch": -1}', ["'iterations_per_epoch'", "got -1"]),
    ("config-iterations-fraction", '{"iterations_per_epoch": 2.5}', ["'iterations_per_epoch'", "got 2.5"]),
    ("config-iterations-text", '{"iterations_per_epoch": "many"}', ["'iterations_per_epoch'", "got \"many\""]),
    ("config-iterations-bool", '{"iterations_per_epoch": true}', ["'iterations_per_epoch'", "got true"]),
    ("config-bag-interval-zero", '{"classification": {"interval": 0}}', ["'classification.interval'", "got 0"]),
    ("config-bag-interval-negative", '{"classification": {"interval": -2}}', ["'classification.interval'", "got -2"]),
    ("config-bag-interval-list", '{"classification": {"interval": [4]}}', ["'classification.interval'", "got [4]"]),
    ("config-bag-crop-zero", '{"classification": {"crop_size": [0, 96, 96]}}',
     ["'classification.crop_size'", "3 integers > 0"]),
    ("config-bag-crop-two", '{"classification": {"crop_size": [96, 96]}}',
     ["'classification.crop_size'", "3 integers > 0"]),
    ("config-warmup-negative", '{"schedule": {"warmup_iterations": -1}}', ["'schedule.warmup_iterations'", "got -1"]),
    ("config-batch-zero", '{"batch_size": 0}', ["'batch_size'", "expected an integer >= 1"]),
    ("config-validation-interval-zero", '{"validation": {"interval": 0}}', ["'validation.interval'", "got 0"]),
    ("config-bad-epochs-not-hidden-by-good-option", '{"epochs": -1}', ["'epochs'", "got -1"]),
    ("config-key-with-escape", '{"iterations_per_epoch\\u001b[2J": 3}', ["unknown", "iterations_per_epoch?[2J"]),
    ("config-key-with-newline", '{"classification": {"inter\\nval": 3}}', ["'classification.inter?val'", "unknown"]),
]


def _run_refused(spheres, tmp_path, extra, config_text=None):
    """``train`` with ``extra`` options (and a config file holding ``config_text``); returns what to check."""
    config = None
    if config_text is not None:
        config = tmp_path / "cfg.json"
        config.write_text(config_text, encoding="utf-8")
    snap = Snapshot(spheres, *([config] if config else []))
    out, cache = tmp_path / "out" / "model", tmp_path / "cache" / "c.h5"
    args = ["train", spheres, "-o", out, "--device", "cpu", "--cache", cache, *extra]
    outcome = run_inprocess(args + (["--config", config] if config else []))
    return outcome, snap, config, out, cache


@pytest.mark.parametrize("extra, option, words", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_bad_counts_on_the_command_line_are_refused(spheres, tmp_path, extra, option, words):
    outcome, snap, _, out, cache = _run_refused(spheres, tmp_path, extra)
    assert_refused(outcome, [f"medautolabel: error: {option}: "], words, untouched=snap,
                   no_temps_in=[tmp_path, spheres], no_files_in=[tmp_path / "out", tmp_path / "cache"])
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize("text, words", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_counts_in_the_config_are_refused(spheres, tmp_path, text, words):
    extra = ["--epochs", "2"] if '"epochs": -1' in text else []
    json.loads(text)  # the case is valid JSON: the refusal is about the value
    outcome, snap, config, out, cache = _run_refused(spheres, tmp_path, extra, text)
    assert_refused(outcome, [f"medautolabel: error: {config}: key "], words, untouched=snap,
                   no_temps_in=[tmp_path, spheres], no_files_in=[tmp_path / "out", tmp_path / "cache"])
    assert not out.exists() and not cache.exists()
