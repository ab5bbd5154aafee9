"""Validation on whole cached cases: sliding-window inference, MONAI DiceMetric, and the engine's
own ``voxel_evidence`` classifier for image-level classes (ROC AUC, accuracy)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from medautolabel.catalog.modelcard import ModelCard
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
    from monai.metrics import compute_dice, compute_roc_auc
    from monai.networks.utils import one_hot

    softmax = card.segmentation.channels
    # MONAI's functional Dice per case (DiceMetric would all-gather across ranks, but only rank 0 validates)
    per_case: List[torch.Tensor] = []
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
        pred = one_hot(logits[:softmax].argmax(0)[None, None], softmax)
        ref = one_hot(torch.from_numpy(map_labels(label, lut))[None, None], softmax)
        per_case.append(compute_dice(pred, ref, include_background=False, ignore_empty=True)[0])
        for t in card.classification:
            if t.task in case.classes:
                scores[t.task].append(voxel_evidence(logits, t, store.spacing))
                truth[t.task].append(float(case.classes[t.task] == t.classes[1]))
    if was_training:
        net.train()
    table = torch.stack(per_case).numpy()  # (cases, labels); NaN where a case lacks the label
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
        if 0 < t_arr.sum() < len(t_arr):
            entry["roc_auc"] = float(compute_roc_auc(torch.tensor(s), torch.tensor(t_arr)))
        out[task] = entry
    return out
