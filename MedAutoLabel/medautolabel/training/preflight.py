"""What a training run settles before it writes anything: the dataset, the base model, what is trained
(segmentation or not, which classifiers) and the model card, every part checked.

``train`` works from the ``Setup`` this returns; ``medautolabel train`` calls ``check_training``
before it makes the model folder, so that a refused run (a bad ``labels.csv``, a classifier for a
task without case labels, a classifier card ``ModelCard.from_dict`` refuses, masks on some cases
only) leaves nothing behind, and hours of segmentation training are never followed by a refusal
of the classifier phase.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.training.classifier_run import check_classifiers, classifier_only_card, classifier_plan
from medautolabel.training.config import (
    ClassifierTraining,
    ConfigError,
    TrainConfig,
    apply_overrides,
    classifier_specs,
    load_config,
    resolve_config,
)
from medautolabel.training.data import Dataset, load_dataset
from medautolabel.training.export import Plan, plan_model

ConfigSource = Union[None, str, Path, Dict[str, Any], TrainConfig]


@dataclass
class Setup:
    """A run's checked plan: a segmentation ``plan`` (when segmentation is trained) or the ``card`` the
    classifiers are added to (with the base model's weight files to copy), and the classifiers to train."""

    dataset: Dataset
    base_card: Optional[ModelCard]
    segmentation: bool
    specs: List[ClassifierTraining]
    plan: Optional[Plan] = None
    card: Dict[str, Any] = field(default_factory=dict)
    copies: Dict[str, Path] = field(default_factory=dict)
    config_path: Optional[Path] = None  # the config file, named in messages


def config_file(config: ConfigSource) -> Optional[Path]:
    """The config file a run reads (to name it in messages), or None for a dict, a TrainConfig or the defaults."""
    return resolve_config(config) if isinstance(config, (str, Path)) else None


def segmentation_wanted(cfg: TrainConfig, dataset: Dataset) -> bool:
    """Whether the run trains a segmentation network: asked for (``train_segmentation``) and the dataset has
    masks. A dataset without masks trains classifiers only; masks on some cases only are refused when
    segmentation is asked for (it needs one for every case)."""
    every = dataset.all_cases()
    missing = [c for c in every if c.label is None]
    if not cfg.train_segmentation or len(missing) == len(every):
        return False
    if missing:
        raise ConfigError(f"case {missing[0].index} has no mask ({len(missing)} of {len(every)} cases have none): "
                          "segmentation training needs a mask for every case; add the masks, or train the "
                          "classifiers alone with --classifiers-only (config \"train_segmentation\": false)",
                          missing[0].image)
    return True


def prepare(data: Union[str, Path], cfg: TrainConfig, base: Optional[Union[str, Path, ModelCard]],
            model_dir: Path, config_path: Optional[Path] = None) -> Setup:
    """Read and check everything a run needs before it writes anything (``config_path`` is named in messages)."""
    from medautolabel.catalog.registry import resolve_model

    dataset = load_dataset(data)
    base_card = resolve_model(base) if base else None
    segmentation = segmentation_wanted(cfg, dataset)
    specs = classifier_plan(dataset, classifier_specs(cfg, config_path), segmentation, config_path)
    setup = Setup(dataset, base_card, segmentation, specs, config_path=config_path)
    if segmentation:
        setup.plan = plan_model(cfg, dataset, base_card, model_dir)
        setup.card = setup.plan.card
    else:
        setup.card, setup.copies = classifier_only_card(cfg, dataset, base_card, model_dir)
    check_classifiers(dataset, cfg, specs, setup.card, config_path)
    return setup


def check_training(data: Union[str, Path], model_dir: Union[str, Path], config: ConfigSource = None,
                   base: Optional[Union[str, Path, ModelCard]] = None,
                   overrides: Optional[Dict[str, Any]] = None) -> None:
    """Refuse (``MedAutoLabelError``, one line) what ``train`` would refuse before its first write."""
    cfg = copy.deepcopy(config) if isinstance(config, TrainConfig) else load_config(config)
    apply_overrides(cfg, dict(overrides or {}))
    prepare(data, cfg, base, Path(model_dir).expanduser().resolve(), config_file(config))
