"""Training samples: balanced random crops read from the cache, then MONAI dictionary augmentations.

Crop centres come from MONAI's own centre generators -- ``generate_pos_neg_label_crop_centers``
and ``generate_label_classes_crop_centers``, what ``RandCropByPosNegLabeld`` and
``RandCropByLabelClassesd`` use inside -- applied to the voxel indices stored in the cache, so that
only the crop (plus a margin for rotations) is read from disk instead of the whole case.
Augmentations are MONAI dictionary transforms on the crop.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from medautolabel.training.cache import CaseStore
from medautolabel.training.config import Augmentation


def augmentations(cfg: Augmentation, patch: Sequence[int]):
    """MONAI Compose over ``image``/``label``: rotation (then a centre crop to ``patch``), flips,
    quarter turns, intensity scale/shift, Gaussian noise, bias field."""
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    ts: List[Any] = []
    if cfg.rotate_degrees > 0 and cfg.rotate_prob > 0:
        r = math.radians(cfg.rotate_degrees)
        ts.append(RandRotated(keys, range_x=r, range_y=r, range_z=r, prob=cfg.rotate_prob,
                              mode=("bilinear", "nearest"), padding_mode="border", keep_size=True))
    ts.append(CenterSpatialCropd(keys, roi_size=list(patch)))
    if cfg.flip:
        ts += [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)]
    if cfg.rotate90 and patch[-1] == patch[-2]:
        ts.append(RandRotate90d(keys, prob=0.5, spatial_axes=(1, 2)))
    if cfg.intensity_scale > 0:
        ts.append(RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.intensity_prob))
    if cfg.intensity_shift > 0:
        ts.append(RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob))
    if cfg.noise_std > 0:
        ts.append(RandGaussianNoised("image", std=cfg.noise_std, prob=cfg.noise_prob))
    if cfg.bias_field:
        ts.append(RandBiasFieldd("image", coeff_range=(0.0, 0.1), prob=cfg.bias_field_prob))
    return Compose(ts)


def rotation_margin(cfg: Augmentation, patch: Sequence[int]) -> List[int]:
    """Extra voxels read on each side so that a rotated crop has no invented corners."""
    if cfg.rotate_degrees <= 0 or cfg.rotate_prob <= 0:
        return [0, 0, 0]
    a = math.radians(cfg.rotate_degrees)
    grow = math.cos(a) + math.sin(a) - 1.0  # a rotated square's bounding box grows by this share
    return [math.ceil(p * grow / 2.0) + 1 for p in patch]


def read_box(store: CaseStore, n: int, centre: Sequence[int], size: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The ``size`` region around ``centre`` of case ``n``, edge-padded where it leaves the case."""
    shape = store.shape(n)
    lo = [int(c) - s // 2 for c, s in zip(centre, size)]
    hi = [a + s for a, s in zip(lo, size)]
    box = tuple(slice(max(a, 0), min(b, d)) for a, b, d in zip(lo, hi, shape))
    image, label = store.read(n, box)
    pad = [(max(0, -a), max(0, b - d)) for a, b, d in zip(lo, hi, shape)]
    if any(p != (0, 0) for p in pad):
        image = np.pad(image, [(0, 0)] + pad, mode="edge")
        label = np.pad(label, pad, mode="edge")
    return np.asarray(image, dtype=np.float32), np.asarray(label)


def crop_centre(store: CaseStore, n: int, cfg: Augmentation, patch: Sequence[int], lut: np.ndarray,
                n_channels: int, rand: np.random.RandomState) -> Tuple[int, int, int]:
    """A balanced random crop centre (MONAI's generators on the cached per-value indices)."""
    from monai.transforms.utils import (
        generate_label_classes_crop_centers,
        generate_pos_neg_label_crop_centers,
    )

    shape = store.shape(n)
    per_value = store.indices(n)
    empty = np.zeros(0, dtype=np.int64)
    if cfg.crop == "classes":
        per_channel: List[List[np.ndarray]] = [[] for _ in range(n_channels)]
        for v, idx in per_value.items():
            per_channel[int(lut[v]) if v < len(lut) else 0].append(idx)
        indices = [np.concatenate(x) if x else empty for x in per_channel]
        ratios = cfg.class_ratios or [1.0] * n_channels
        centres = generate_label_classes_crop_centers(list(patch), 1, shape, indices, list(ratios), rand,
                                                      allow_smaller=True, warn=False)
    else:
        fg = [idx for v, idx in per_value.items() if v < len(lut) and lut[v] > 0]
        bg = [idx for v, idx in per_value.items() if not (v < len(lut) and lut[v] > 0)]
        fg_idx = np.concatenate(fg) if fg else empty
        bg_idx = np.concatenate(bg) if bg else empty
        pos_ratio = cfg.pos / max(cfg.pos + cfg.neg, 1e-9)
        if fg_idx.size == 0 and bg_idx.size == 0:
            return tuple(s // 2 for s in shape)
        centres = generate_pos_neg_label_crop_centers(list(patch), 1, pos_ratio, shape, fg_idx, bg_idx, rand,
                                                      allow_smaller=True)
    return tuple(int(c) for c in centres[0])


class PatchSampler:
    """Random training crops: (image (C, *patch) float32, label (1, *patch) int64 channel indices)."""

    def __init__(self, store: CaseStore, case_ids: Sequence[int], cfg: Augmentation, patch: Sequence[int],
                 lut: np.ndarray, n_channels: int) -> None:
        self.store, self.case_ids, self.cfg = store, list(case_ids), cfg
        self.patch, self.lut, self.n_channels = list(patch), lut, n_channels
        self.margin = rotation_margin(cfg, patch)
        self.transform = augmentations(cfg, patch)

    def seed(self, seed: int) -> None:
        """Reseed every random choice (case, crop centre, augmentations)."""
        self.rand = np.random.RandomState(seed % 2**32)
        self.transform.set_random_state(seed=int(self.rand.randint(0, 2**31)))

    def sample(self) -> Dict[str, Any]:
        from monai.utils import convert_to_tensor

        n = self.case_ids[int(self.rand.randint(len(self.case_ids)))]
        centre = crop_centre(self.store, n, self.cfg, self.patch, self.lut, self.n_channels, self.rand)
        size = [p + 2 * m for p, m in zip(self.patch, self.margin)]
        image, label = read_box(self.store, n, centre, size)
        channels = map_labels(label, self.lut)
        out = self.transform({"image": torch.from_numpy(image), "label": torch.from_numpy(channels[None]).float()})
        image_t = convert_to_tensor(out["image"], track_meta=False)  # plain tensors: no MONAI metadata
        label_t = convert_to_tensor(out["label"], track_meta=False)
        return {"image": image_t.float().contiguous(), "label": label_t.round().long().contiguous(), "case": n}


def map_labels(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Dataset label values -> softmax channels (values the model does not know become background)."""
    label = np.asarray(label).astype(np.int64, copy=False)
    return np.where(label < len(lut), lut[np.minimum(label, len(lut) - 1)], 0)


def bag_box(store: CaseStore, n: int, crop: Sequence[int], factor: int,
            rand: Optional[np.random.RandomState] = None) -> Tuple[List[int], List[int]]:
    """Centre and size of a classification bag: the whole case up to ``crop``, centred on the
    labelled foreground (where findings are); sizes rounded up to a multiple of ``factor``."""
    shape = store.shape(n)
    size = [int(math.ceil(min(s, c) / factor) * factor) for s, c in zip(shape, crop)]
    fg = [idx for v, idx in store.indices(n).items() if v > 0]
    if fg and any(s > c for s, c in zip(shape, crop)):
        flat = np.concatenate(fg)
        pick = flat[(rand or np.random).randint(flat.size)]
        centre = [int(x) for x in np.unravel_index(int(pick), shape)]
        centre = [min(max(c, z // 2), s - (z - z // 2)) for c, z, s in zip(centre, size, shape)]
    else:
        centre = [s // 2 for s in shape]
    return centre, size
