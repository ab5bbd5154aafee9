"""``medautolabel models export-bundle``: a model card as a MONAI model-zoo-style bundle.

The bundle runs with MONAI's own runner and the model zoo's usual arguments::

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \\
        --dataset_dir D --output_dir O          # reads D/imagesTs/*.nii.gz

Its transforms reproduce the engine's preprocessing in MONAI terms: orientation, spacing, one
``ScaleIntensityRanged`` per CT window (or percentiles for MR) concatenated into channels, the
engine's (k, j, i) axis order when the card says so, sliding-window inference with the card's ROI,
softmax over the segmentation channels, inversion to the input grid, argmax. Colours and
terminology travel in ``configs/medautolabel.json`` (the sidecar MedAutoLabel reads back).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Union

import torch

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.catalog.registry import resolve_model
from medautolabel.errors import ModelError
from medautolabel.io.atomic import atomic_outputs, make_folder
from medautolabel.io.ownership import BUNDLE_FILES, BUNDLE_SIDECAR_FORMAT, check_new_folder

SIDECAR = "medautolabel.json"


def _channel_transforms(card: ModelCard) -> List[Dict[str, Any]]:
    steps: List[Dict[str, Any]] = []
    names = [f"channel{n}" for n in range(len(card.input))]
    if len(names) > 1:
        steps.append({"_target_": "CopyItemsd", "keys": "@image_key", "times": len(names),
                      "names": names})
    else:
        names = ["@image_key"]
    for key, channel in zip(names, card.input):
        if channel.window is not None:
            steps.append({"_target_": "ScaleIntensityRanged", "keys": key, "a_min": float(channel.window[0]),
                          "a_max": float(channel.window[1]), "b_min": 0.0, "b_max": 1.0, "clip": True})
        else:
            low, high = channel.percentiles
            steps.append({"_target_": "ScaleIntensityRangePercentilesd", "keys": key, "lower": float(low),
                          "upper": float(high), "b_min": 0.0, "b_max": 1.0, "clip": True})
    if len(names) > 1:
        steps.append({"_target_": "ConcatItemsd", "keys": names, "name": "@image_key", "dim": 0})
        steps.append({"_target_": "DeleteItemsd", "keys": names})
    return steps


def inference_config(card: ModelCard) -> Dict[str, Any]:
    """configs/inference.json for ``card`` (model-zoo layout and argument names)."""
    pre = card.preprocessing
    transforms: List[Dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "@image_key", "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
    ]
    if pre.orientation:
        transforms.append({"_target_": "Orientationd", "keys": "@image_key", "axcodes": pre.orientation})
    if pre.spacing:
        transforms.append({"_target_": "Spacingd", "keys": "@image_key", "pixdim": [float(s) for s in pre.spacing],
                           "mode": "bilinear"})
    transforms.append({"_target_": "EnsureTyped", "keys": "@image_key", "dtype": "$torch.float32"})
    transforms += _channel_transforms(card)
    if pre.axis_order == "kji":  # the network was trained on arrays in Slicer's (k, j, i) order
        transforms.append({"_target_": "Transposed", "keys": "@image_key", "indices": [0, 3, 2, 1]})
    seg = card.segmentation
    post: List[Dict[str, Any]] = []
    if _out_channels(card) > seg.channels:  # extra outputs (e.g. evidence channels) are not labels
        post.append({"_target_": "Lambdad", "keys": "pred", "func": f"$lambda x: x[:{seg.channels}]"})
    post += [
        {"_target_": "Activationsd", "keys": "pred", "softmax": seg.activation == "softmax",
         "sigmoid": seg.activation == "sigmoid"},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
         "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
         "separate_folder": "@separate_folder", "resample": False},
    ]
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.uint8",
        "output_postfix": "seg",
        "separate_folder": False,
        "load_pretrain": True,
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": dict({"_target_": card.network.architecture}, **card.network.parameters),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(card.inference.roi_size),
                    "sw_batch_size": card.inference.sw_batch_size, "overlap": card.inference.overlap,
                    "mode": card.inference.blend},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}, "map_location": "@device"},
        "initialize": ["$monai.utils.set_determinism(seed=123)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def _out_channels(card: ModelCard) -> int:
    return int(card.network.parameters.get("out_channels", card.segmentation.channels))


def metadata(card: ModelCard) -> Dict[str, Any]:
    """configs/metadata.json: versions, description, and the output channels' names."""
    import monai

    channel_def = {"0": "background"}
    channel_def.update({str(lab.channel): lab.name.lower() for lab in card.labels})
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": card.version,
        "changelog": {card.version: "exported by medautolabel"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "name": card.name,
        "task": card.description or card.name,
        "description": card.description,
        "authors": str(card.provenance.get("trained_by", "")),
        "copyright": "",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield" if card.modality == "CT" else "magnitude",
                                 "modality": card.modality, "num_channels": 1,
                                 "spatial_shape": list(card.inference.roi_size), "dtype": "float32",
                                 "value_range": [], "is_patch_data": True}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": card.segmentation.channels,
                                 "spatial_shape": list(card.inference.roi_size), "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": True, "channel_def": channel_def}},
        },
    }


def sidecar(card: ModelCard) -> Dict[str, Any]:
    """What the bundle format has no place for: colours, terminology, clean-up, thresholds."""
    return {"format": BUNDLE_SIDECAR_FORMAT, "id": card.id, "modality": card.modality,
            "low_confidence_threshold": card.low_confidence_threshold,
            "labels": [{"value": lab.value, "name": lab.name, "color": list(lab.color),
                        "terminology": asdict(lab.terminology), "postprocessing": asdict(lab.postprocessing)}
                       for lab in card.labels]}


def export_bundle(model: Union[str, Path, ModelCard], out_dir: Union[str, Path], overwrite: bool = False) -> Path:
    """Write the bundle folder, all files or none; the weights become a float32 state dict at models/model.pt.

    ``out_dir`` must be absent or empty; with ``overwrite`` a folder holding a bundle medautolabel
    exported before is accepted, and only that bundle's files are replaced (ownership.py).
    """
    from medautolabel.runtime.network import build_network, load_network

    card = resolve_model(model)
    if not card.segments:
        raise ModelError("is a classification-only model (no segmentation network): exporting it as a MONAI "
                         "bundle is not supported", card.path)
    if card.network.architecture == "TorchScript":
        raise ModelError("TorchScript models cannot be exported as a bundle network definition", card.path)
    out = Path(out_dir)
    targets = [out / name for name in BUNDLE_FILES]
    check_new_folder(out, targets, [Path(card.path).parent] if card.path else [], overwrite)
    net = load_network(card, torch.device("cpu"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    build_network(card).load_state_dict(state)  # the definition in inference.json takes these weights
    documents = {"configs/inference.json": inference_config(card), "configs/metadata.json": metadata(card),
                 f"configs/{SIDECAR}": sidecar(card)}
    readme = (f"# {card.name}\n\n{card.description}\n\n"
              f"Exported from MedAutoLabel model `{card.id}` {card.version}.\n\n"
              "```bash\npython -m monai.bundle run --config_file configs/inference.json --bundle_root . "
              "--dataset_dir DATA --output_dir OUT   # DATA/imagesTs/*.nii.gz\n```\n")
    for folder in sorted({t.parent for t in targets}):
        make_folder(folder)
    with atomic_outputs(targets) as temps:
        for name, temp in zip(BUNDLE_FILES, temps):
            if name == "models/model.pt":
                torch.save(state, temp)
            elif name == "docs/README.md":
                temp.write_text(readme, encoding="utf-8")
            else:
                temp.write_text(json.dumps(documents[name], indent=2) + "\n", encoding="utf-8")
    return out
