"""Where models come from: built-in model folders, folders on MEDAUTOLABEL_MODEL_PATH, or a given path.

A model folder holds ``model.json`` (see docs/model-card.md) and its weights. A folder on
``MEDAUTOLABEL_MODEL_PATH`` (os.pathsep-separated) may be a model folder itself or hold model folders.
When two folders give the same id, the one on MEDAUTOLABEL_MODEL_PATH wins over the built-in one.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator, List, Union

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.errors import ModelError

ENV_VAR = "MEDAUTOLABEL_MODEL_PATH"
BUILTIN_DIR = Path(__file__).resolve().parent / "models"


def model_folders() -> List[Path]:
    """Candidate model folders in search order: MEDAUTOLABEL_MODEL_PATH entries, then the built-in ones."""
    roots = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    roots.append(BUILTIN_DIR)
    return list(_folders(roots))


def _folders(roots: List[Path]) -> Iterator[Path]:
    for root in roots:
        if (root / "model.json").is_file():
            yield root
        elif root.is_dir():
            for sub in sorted(root.iterdir()):
                if (sub / "model.json").is_file():
                    yield sub


def list_models() -> List[ModelCard]:
    """Every model that can be found, one per id (first found wins); broken cards are skipped with a warning."""
    cards: List[ModelCard] = []
    seen = set()
    for folder in model_folders():
        try:
            card = ModelCard.load(folder / "model.json")
        except ModelError as e:
            warnings.warn(f"skipping a broken model: {e}", stacklevel=2)
            continue
        if card.id not in seen:
            seen.add(card.id)
            cards.append(card)
    return cards


def resolve_model(model: Union[str, Path, ModelCard]) -> ModelCard:
    """A ModelCard from a card, a model folder, a ``model.json`` path, or a model id."""
    if isinstance(model, ModelCard):
        return model
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir() or path.is_file():
        return ModelCard.load(path)
    looks_like_path = os.sep in text or "/" in text or text.endswith(".json")
    if looks_like_path:
        raise ModelError("model folder not found", path)
    cards = list_models()
    for card in cards:
        if card.id == text:
            return card
    ids = ", ".join(c.id for c in cards) or "none installed"
    raise ModelError(f"unknown model {text!r}; available models: {ids} (or give a model folder path)")
