"""Run a trusted MONAI bundle (catalog/bundle.py) on an image, with the bundle's own definitions.

The bundle's network, preprocessing, inferer and postprocessing are used (parsed with
``monai.bundle.ConfigParser``; its ``SaveImaged`` is left out: the engine writes the outputs), so
labels match ``python -m monai.bundle run``; the result has the shape ``pipeline.label_image`` gives.
A classification bundle (one row of class scores per image, bundle_classifier.py) gives tags and an
empty labelmap, as a classification-only model card does.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from medautolabel.catalog.bundle import bundle_sha256, check_outside_code, config_file, is_trusted, trusted_file
from medautolabel.errors import ModelError
from medautolabel.image import Image
from medautolabel.labelling.bundle_classifier import activation, bundle_task, probability_row, probability_transforms
from medautolabel.result import Classification, Code, Result, SegmentInfo, Terminology

STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
TISSUE = Code("SCT", "85756007", "Tissue")
PALETTE = [(0.85, 0.25, 0.2), (0.95, 0.85, 0.3), (0.3, 0.6, 0.9), (0.4, 0.8, 0.4), (0.8, 0.5, 0.9), (0.9, 0.6, 0.3)]


class BundleModel:
    """A loaded bundle: ``label(image)`` gives the same Result shape as ``pipeline.label_image``."""

    def __init__(self, folder: Union[str, Path], device: str = "auto", trust: bool = False) -> None:
        from medautolabel.runtime.device import select_device

        self.folder = Path(folder).expanduser().resolve()
        config = config_file(self.folder)
        if config is None:
            raise ModelError("not a MONAI bundle (configs/inference.json missing)", self.folder)
        self.config = config
        self.sha256 = bundle_sha256(self.folder)
        if not (trust or is_trusted(self.folder)):
            raise ModelError(f"MONAI bundle configs can run Python code, so this bundle runs only when trusted: "
                             f"use --trust, or add its sha256 {self.sha256} to {trusted_file()}", self.folder)
        check_outside_code(self.folder, config, trust)
        self.device = select_device(device)
        dont_write = sys.dont_write_bytecode
        sys.dont_write_bytecode = True  # no __pycache__ written into the bundle: its digest stays as trusted
        try:
            self._load(config)
        finally:
            sys.dont_write_bytecode = dont_write

    def _load(self, config: Path) -> None:
        import torch
        from monai.bundle import ConfigParser
        from monai.transforms import Compose, SaveImaged

        parser = ConfigParser()
        parser.read_config(str(config))
        meta = self.folder / "configs" / "metadata.json"
        parser.read_meta(str(meta) if meta.is_file() else {})
        parser["bundle_root"] = str(self.folder)
        parser["device"] = self.device
        self.metadata = parser.get("_meta_", {}) or {}
        try:
            self.network = parser.get_parsed_content("network_def").to(self.device).eval()
            self.preprocessing = parser.get_parsed_content("preprocessing")
            self.inferer = parser.get_parsed_content("inferer")
            post = parser.get_parsed_content("postprocessing")
        except Exception as e:
            raise ModelError(f"cannot build the bundle's network or transforms: {e}", config) from None
        transforms = [t for t in (post.transforms if isinstance(post, Compose) else [post])
                      if not isinstance(t, SaveImaged)]
        self.postprocessing = Compose(transforms)
        # a classifier's postprocessing up to its probabilities (no argmax), and its activation
        self.probability_postprocessing = Compose(probability_transforms(transforms))
        self.activation = activation(transforms)
        weights = self.folder / "models" / "model.pt"
        try:
            state = torch.load(str(weights), map_location=self.device, weights_only=True)
        except FileNotFoundError:
            raise ModelError("bundle weights not found", weights) from None
        except Exception as e:
            raise ModelError(f"cannot load the weights safely (only tensors are accepted): {e}", weights) from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        self.network.load_state_dict(state)
        self.sidecar = self._read_sidecar()

    def _read_sidecar(self) -> Dict[str, Any]:
        path = self.folder / "configs" / "medautolabel.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise ModelError("not valid JSON", path) from None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.folder.name)

    def label_names(self) -> Dict[int, str]:
        outputs = self.metadata.get("network_data_format", {}).get("outputs", {})
        channel_def = next(iter(outputs.values()), {}).get("channel_def", {}) if outputs else {}
        return {int(k): str(v) for k, v in channel_def.items() if int(k) != 0}

    def segments(self, labelmap: np.ndarray, voxel_ml: float) -> List[SegmentInfo]:
        side = {int(lab["value"]): lab for lab in self.sidecar.get("labels", [])}
        names = self.label_names() or {v: lab["name"] for v, lab in side.items()}
        out = []
        for n, (value, name) in enumerate(sorted(names.items())):
            lab = side.get(value, {})
            t = lab.get("terminology")
            terminology = Terminology(Code(**t["category"]), Code(**t["type"])) if t else Terminology(STRUCTURE, TISSUE)
            count = int((labelmap == value).sum())
            out.append(SegmentInfo(value, lab.get("name", name), tuple(lab.get("color", PALETTE[n % len(PALETTE)])),
                                   terminology, count, count * voxel_ml))
        return out

    def label(self, image: Image, progress=None) -> Result:
        """Label ``image`` with the bundle's own transforms; the labels land on the input's grid.

        A classifier bundle (the network gives ``(B, classes)``) labels nothing: an all-zero labelmap on
        the input's grid, no segments, and its tags (bundle_classifier.py).
        """
        import torch

        from medautolabel.io.images import write_image

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="medautolabel-bundle-") as tmp:
            path = Path(tmp) / "image.nii"
            write_image(image, path, atomic=False, compress=False)
            data = self.preprocessing({"image": str(path)})
            if progress:
                progress(0.1, "inference")
            with torch.inference_mode():
                x = data["image"].unsqueeze(0).to(self.device)
                data["pred"] = self.inferer(x, self.network)[0].cpu()
            data["image"] = data["image"].cpu()
            if progress:
                progress(0.9, "postprocessing")
            classifier = data["pred"].ndim == 1  # (classes,): one row of scores for the image
            outputs = int(data["pred"].shape[0])
            data = (self.probability_postprocessing if classifier else self.postprocessing)(data)
        if classifier:
            labels = Image(np.zeros(image.array.shape, dtype=np.uint8), image.ijk_to_ras.copy(), dict(image.meta))
            segments: List[SegmentInfo] = []
            classes = self._classes(data["pred"], outputs)
        else:
            labels, segments = self._labels(image, data["pred"])
            classes = []
        if progress:
            progress(1.0, "done")
        import monai

        provenance = {"model": {"id": self.sidecar.get("id", self.name), "name": self.name,
                                "version": str(self.metadata.get("version", "")), "weights": "models/model.pt",
                                "weights_sha256": hashlib.sha256((self.folder / "models" / "model.pt").read_bytes())
                                .hexdigest(), "bundle_sha256": self.sha256, "format": "MONAI bundle"},
                      "device": str(self.device),
                      "timings_s": {"total": round(time.perf_counter() - t0, 4)},
                      "software": {"monai": monai.__version__, "torch": torch.__version__},
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if not classifier:
            provenance["confidence"] = "not computed for MONAI bundles"
        return Result(labels, segments, classes, provenance)

    def _labels(self, image: Image, pred: Any) -> Tuple[Image, List[SegmentInfo]]:
        """The postprocessed label prediction on ``image``'s grid, and its segments."""
        from medautolabel.geometry import image_from_ijk_array
        from medautolabel.labelling.preprocess import resample

        array = np.asarray(pred.detach().cpu().numpy()[0]).round().astype(np.uint8)
        labels = image_from_ijk_array(array, np.asarray(pred.affine, dtype=np.float64))
        if labels.array.shape != image.array.shape or not np.allclose(labels.ijk_to_ras, image.ijk_to_ras,
                                                                        atol=1e-3):
            labels = Image(resample(labels.array, labels.ijk_to_ras, image.array.shape, image.ijk_to_ras, order=0)
                           .astype(np.uint8), image.ijk_to_ras)
        labels = Image(labels.array, image.ijk_to_ras.copy(), {})
        return labels, self.segments(labels.array, image.voxel_volume_ml)

    def _classes(self, pred: Any, outputs: int) -> List[Classification]:
        """A classifier bundle's tags from its postprocessed probabilities (classify.tags decides);
        ``outputs``: how many scores the network gave (one per class of metadata's channel_def)."""
        from medautolabel.labelling.classify import tags

        task = bundle_task(self.folder, self.metadata, self.sidecar, self.activation, outputs, self.config)
        threshold = self.sidecar.get("low_confidence_threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ModelError("low_confidence_threshold must be a number in 0..1",
                             self.folder / "configs" / "medautolabel.json")
        return tags(task, probability_row(pred, task, self.config), float(threshold))
