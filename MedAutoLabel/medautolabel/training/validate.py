"""Validation on whole cached cases: sliding-window inference, the engine's one Dice and ROC AUC
(``evaluation.metrics``), and its own ``voxel_evidence`` classifier for image-level classes (ROC AUC, accuracy)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.evaluation.metrics import dice, roc_auc
from medautolabel.labelling.classify import voxel_evidence
from medautolabel.runtime.device import autocast
from medautolabel.training.cache import CaseStore
from medautolabel.training.data import Case
from medautolabel.training.transforms import map_labels


@torch.no_grad()
def validate(net: torch.nn.Module, store: CaseStore, cases: Sequence[Case], case_ids: Sequence[int],
             card: ModelCard, lut: np.ndarray, device: torch.device) -> Dict[str, object]:
    """Mean Dice over labels (each label averaged over the cases that contain it) and per-task metrics."""
    from monai.inferers import sliding_window_inference

    softmax = card.segmentation.channels
    per_case: List[List[float]] = []
    scores: Dict[str, List[float]] = {t.task: [] for t in card.classification}
    truth: Dict[str, List[float]] = {t.task: [] for t in card.classification}
    was_training = net.training
    net.eval()
    for case, n in zip(cases, case_ids):
        image, label = store.read(n)
        x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            with autocast(device):
                return net(window).float()

        logits = sliding_window_inference(x, list(card.inference.roi_size), card.inference.sw_batch_size, predictor,
                                          overlap=card.inference.overlap, mode=card.inference.blend)[0].cpu()
        pred = logits[:softmax].argmax(0).numpy()
        ref = map_labels(label, lut)
        # a label counts only in the cases whose reference holds it (NaN elsewhere)
        per_case.append([dice(pred == c, ref == c) if (ref == c).any() else np.nan for c in range(1, softmax)])
        for t in card.classification:
            if t.task in case.classes:
                scores[t.task].append(voxel_evidence(logits, t, store.spacing))
                truth[t.task].append(float(case.classes[t.task] == t.classes[1]))
    if was_training:
        net.train()
    table = np.asarray(per_case, dtype=np.float64).reshape(len(per_case), softmax - 1)  # NaN: case lacks the label
    per_label: Dict[str, Optional[float]] = {}
    for lab in sorted(card.labels, key=lambda x: x.channel):
        column = table[:, lab.channel - 1]
        column = column[~np.isnan(column)]
        per_label[lab.name] = float(column.mean()) if column.size else None
    present = [v for v in per_label.values() if v is not None]
    out: Dict[str, object] = {"mean_dice": float(np.mean(present)) if present else 0.0, "dice": per_label,
                              "cases": len(cases)}
    for task, s in scores.items():
        if not s:
            continue
        t_arr = np.asarray(truth[task])
        entry: Dict[str, object] = {"accuracy": float(np.mean((np.asarray(s) > 0.5) == (t_arr > 0.5))),
                                    "cases": len(s)}
        auc = roc_auc(t_arr > 0.5, s)
        if not np.isnan(auc):
            entry["roc_auc"] = auc
        out[task] = entry
    return out
