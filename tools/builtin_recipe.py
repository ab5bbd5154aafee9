"""The recipe that trains the built-in ``vessel-nerve-cta`` model on synthetic phantoms.

Reproduce the committed weights with (hours on a CPU; see docs/builtin-model.md)::

    python tools/builtin_recipe.py --out runs/vessel-nerve-cta --iterations 9500 --seed 0
    python tools/builtin_recipe.py --out runs/phase2 --init runs/vessel-nerve-cta/best.pt \
        --iterations 6000 --seed 1 --lr 1e-3
    python tools/builtin_recipe.py --out runs/phase2 --export MedAutoLabel/medautolabel/catalog/models/vessel-nerve-cta

The network is a MONAI UNet with 4 output channels: a softmax over background / vessel / nerve and
one sigmoid channel that marks aneurysm-sac voxels; the aneurysm classifier reads that channel
("voxel_evidence" in the model card). Training phantoms are rendered directly on the model's own
grid (0.8 mm, RAS), with a randomised point-spread function standing in for other scanners' grids.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
import warnings
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from medautolabel.labelling.normalize import ct_windows
from medautolabel.synthetic.phantoms import render, training_grid

WINDOWS = [(-150.0, 350.0), (-200.0, 1800.0)]
SPACING = 0.8
NETWORK = {"spatial_dims": 3, "in_channels": 2, "out_channels": 4, "channels": [16, 32, 64, 128, 256],
           "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "instance"}
PATCH = 64  # training patch side (voxels); phase 4 uses 96 on 128-voxel phantoms (--patch, --grid)
GRID = 96  # training phantom side (voxels at SPACING)
VALIDATION_SEEDS = list(range(900_000, 900_012))  # in the training range, never in the training pool
SCANNER_GRID_FRACTION = 0.6  # training cases seen through a random scanner grid
ANEURYSM = 3  # training-only label value: aneurysm sac (counts as vessel in the output)


def through_scanner_grid(hu: np.ndarray, matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resample to a random oblique, anisotropic grid (0.6-1.6 mm) and back with linear interpolation.

    This is what the network sees at inference, when a scan on its own grid is resampled to the
    model's 0.8 mm grid; the labels stay on the fine grid (they are the truth).
    """
    from medautolabel.image import make_ijk_to_ras
    from medautolabel.labelling.preprocess import resample
    from medautolabel.synthetic.phantoms import _random_rotation

    spacing = np.array([rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.6)])[rng.permutation(3)]
    rotation = _random_rotation(rng)
    n = np.array(hu.shape[::-1], dtype=np.float64)
    centre = matrix[:3, :3] @ ((n - 1) / 2) + matrix[:3, 3]
    diagonal = float(np.linalg.norm((n - 1) * np.linalg.norm(matrix[:3, :3], axis=0)))
    size = np.ceil(diagonal / spacing).astype(int) + 1
    coarse_m = make_ijk_to_ras(spacing, rotation, centre - rotation @ (spacing * (size - 1) / 2))
    coarse = resample(hu.astype(np.float32), matrix, tuple(size[::-1]), coarse_m, order=1)
    return resample(coarse, coarse_m, hu.shape, matrix, order=1)


def _case(seed: int, grid: int = GRID) -> Dict[str, np.ndarray]:
    shape, matrix = training_grid(grid, SPACING)
    ph = render(seed, shape, matrix)
    hu = ph.image.array
    rng = np.random.default_rng([seed, 99])
    if rng.random() < SCANNER_GRID_FRACTION:
        hu = np.rint(through_scanner_grid(hu, matrix, rng)).astype(np.int16)
    label = ph.labels.array.copy()
    label[ph.aneurysm_mask] = ANEURYSM
    return {"hu": hu[None], "label": label[None], "aneurysm": np.float32(ph.aneurysm)}


def make_cases(seeds: Sequence[int], processes: int = 2, grid: int = GRID) -> List[Dict[str, np.ndarray]]:
    with Pool(processes) as pool:
        return pool.map(partial(_case, grid=grid), list(seeds), chunksize=4)


def build_network() -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(**NETWORK)


def _transforms(patch: int = PATCH):
    from monai.transforms import (
        ClassesToIndicesd,
        Compose,
        RandCropByLabelClassesd,
        RandFlipd,
        RandRotate90d,
    )

    prepare = ClassesToIndicesd(keys="label", num_classes=4, max_samples_per_class=30000)
    augment = Compose([
        RandCropByLabelClassesd(keys=["hu", "label"], label_key="label", spatial_size=[patch] * 3,
                                ratios=[1.0, 1.3, 1.6, 1.0], num_classes=4, num_samples=1,
                                indices_key="label_cls_indices", warn=False),
        RandFlipd(keys=["hu", "label"], prob=0.5, spatial_axis=0),
        RandFlipd(keys=["hu", "label"], prob=0.5, spatial_axis=1),
        RandFlipd(keys=["hu", "label"], prob=0.5, spatial_axis=2),
        RandRotate90d(keys=["hu", "label"], prob=0.5, spatial_axes=(1, 2)),
    ])
    return prepare, augment


def _to_input(hu: np.ndarray, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """HU (1, D, H, W) -> network channels, with a small random calibration shift when training."""
    hu = hu[0].astype(np.float32)
    if augment:
        hu = hu * np.float32(rng.uniform(0.93, 1.07)) + np.float32(rng.uniform(-25, 25))
    return ct_windows(hu, WINDOWS)


def _losses():
    from monai.losses import DiceCELoss, DiceLoss

    seg = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=True)
    sac = DiceLoss(sigmoid=True, batch=True)
    return seg, sac


def _batch(cases, augment_tf, rng, batch_size):
    xs, ys = [], []
    for _ in range(batch_size):
        case = cases[rng.integers(len(cases))]
        crop = augment_tf(case)[0]
        xs.append(_to_input(np.asarray(crop["hu"]), rng, True))
        ys.append(np.asarray(crop["label"]))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


def loss_fn(logits: torch.Tensor, label: torch.Tensor, seg_loss, sac_loss) -> torch.Tensor:
    target = torch.where(label == ANEURYSM, torch.ones_like(label), label)
    sac_target = (label == ANEURYSM).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 3:4], sac_target, pos_weight=torch.tensor(2.0))
    return seg_loss(logits[:, :3], target) + 0.5 * (bce + sac_loss(logits[:, 3:4], sac_target))


@torch.inference_mode()
def validate(net: torch.nn.Module, cases) -> Dict[str, float]:
    from monai.inferers import sliding_window_inference
    from scipy import ndimage

    net.eval()
    dices = {1: [], 2: []}
    evidence, truth = [], []
    for case in cases:
        x = torch.from_numpy(_to_input(case["hu"], None, False))[None]
        logits = sliding_window_inference(x, [96] * 3, 1, net, overlap=0.25, mode="gaussian")[0]
        pred = logits[:3].argmax(0).numpy()
        label = case["label"][0].copy()
        label[label == ANEURYSM] = 1
        for c in (1, 2):
            p, t = pred == c, label == c
            dices[c].append(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
        sac = torch.sigmoid(logits[3]).numpy()
        evidence.append(float(ndimage.gaussian_filter(sac, 1.0 / SPACING).max()))
        truth.append(float(case["aneurysm"]))
    net.train()
    out = {"vessel_dice": float(np.mean(dices[1])), "nerve_dice": float(np.mean(dices[2]))}
    pos = [e for e, t in zip(evidence, truth) if t]
    neg = [e for e, t in zip(evidence, truth) if not t]
    if pos and neg:
        out["aneurysm_auc"] = float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))
    return out


def train(out: Path, iterations: int, seed: int, n_cases: int, batch_size: int, lr: float,
          validate_every: int, threads: int, init: Optional[Path] = None, patch: int = PATCH,
          grid: int = GRID) -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prepare, augment_tf = _transforms(patch)
    from monai.utils import set_determinism

    set_determinism(seed)
    augment_tf.set_random_state(seed)
    train_seeds = [seed * 100_000 + s for s in range(n_cases)]
    cases = [prepare(c) for c in make_cases(train_seeds, grid=grid)]
    val_cases = make_cases(VALIDATION_SEEDS, grid=grid)
    print(f"{len(cases)} training phantoms ready in {time.time() - t0:.0f}s", flush=True)

    net = build_network()
    if init is not None:  # fine-tune: start from these weights with a fresh optimiser and schedule
        net.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = 200

    def lr_at(it: int) -> float:
        if it < warmup:
            return lr * (it + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, iterations - warmup))))

    start, best = 0, -1.0
    last = out / "last.pt"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best = int(state["iteration"]), float(state["best"])
        rng = np.random.default_rng([seed, start])
        print(f"resumed at iteration {start}", flush=True)
    seg_loss, sac_loss = _losses()
    log_path = out / "log.csv"
    new_log = not log_path.exists()
    with open(log_path, "a", newline="") as log_file:
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["iteration", "seconds", "loss", "vessel_dice", "nerve_dice", "aneurysm_auc", "lr"])
        running, t_start = [], time.time()
        net.train()
        for it in range(start, iterations):
            for group in opt.param_groups:
                group["lr"] = lr_at(it)
            x, y = _batch(cases, augment_tf, rng, batch_size)
            loss = loss_fn(net(x), y, seg_loss, sac_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(float(loss))
            if (it + 1) % validate_every == 0 or it + 1 == iterations:
                metrics = validate(net, val_cases)
                score = metrics["vessel_dice"] + metrics["nerve_dice"] + metrics.get("aneurysm_auc", 0.0)
                if score > best:
                    best = score
                    torch.save(net.state_dict(), out / "best.pt")
                torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "iteration": it + 1,
                            "best": best}, out / ".last.pt.tmp")
                (out / ".last.pt.tmp").replace(last)
                elapsed = time.time() - t_start
                log.writerow([it + 1, round(elapsed), round(float(np.mean(running)), 4),
                              round(metrics["vessel_dice"], 4), round(metrics["nerve_dice"], 4),
                              round(metrics.get("aneurysm_auc", float("nan")), 4), lr_at(it)])
                log_file.flush()
                print(f"it {it + 1} loss {np.mean(running):.4f} {json.dumps(metrics)} "
                      f"{elapsed / (it + 1 - start):.2f}s/it", flush=True)
                running = []


def export(run_dir: Path, model_dir: Path) -> Path:
    """Write the best checkpoint as float16 weights (half the size; cast back to float32 on load)."""
    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / "model.pt"
    torch.save(half, target)
    return target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log.csv)")
    p.add_argument("--iterations", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=400, help="training phantoms held in memory")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--validate-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init", type=Path, help="start from these weights (a best.pt), e.g. for a second phase")
    p.add_argument("--patch", type=int, default=PATCH, help="training patch side in voxels")
    p.add_argument("--grid", type=int, default=GRID, help="training phantom side in voxels (0.8 mm)")
    p.add_argument("--export", type=Path, help="only export best.pt of --out into this model folder")
    a = p.parse_args(argv)
    if a.export:
        print(export(a.out, a.export))
        return
    train(a.out, a.iterations, a.seed, a.cases, a.batch_size, a.lr, a.validate_every, a.threads, a.init, a.patch, a.grid)


if __name__ == "__main__":
    main()
