"""``train()``: the training run behind ``medautolabel train``.

One epoch = ``iterations_per_epoch`` optimiser steps on batches of random crops; settings the config
leaves null are chosen for the device (``config.device_defaults``: a CPU gets epochs sized by the
dataset), and after the first iterations one line says how long the run will take (``Estimate``).
Every random choice of epoch e on rank r is drawn from generators seeded with (seed, e, r), so a
run resumed from ``last.pt`` (saved after every epoch with the optimiser, scheduler and scaler
states) continues exactly as the uninterrupted run would have.

Files in MODEL_DIR: ``model.json`` + ``model.pt`` (the best weights so far, usable at once by
``medautolabel label``), and ``training/`` with ``config.json``, ``last.pt``, ``log.csv`` and
``tensorboard/`` (when TensorBoard is installed).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.errors import Cancelled
from medautolabel.io.atomic import atomic_output
from medautolabel.io.case_labels import quoted
from medautolabel.runtime.device import autocast, select_device
from medautolabel.training import distributed
from medautolabel.training.cache import CaseStore, build_cache, default_cache_path
from medautolabel.training.classifier_run import train_classifiers, write_model_files
from medautolabel.training.config import ConfigError, TrainConfig, apply_overrides, device_defaults, load_config
from medautolabel.training.data import split, unlabelled
from medautolabel.training.export import Plan, grow_state_dict, state_sha256, write_model
from medautolabel.training.losses import EvidenceMax, evidence_loss, segmentation_loss
from medautolabel.training.preflight import Setup, config_file, prepare
from medautolabel.training.transforms import PatchSampler, bag_box, read_box
from medautolabel.training.validate import validate

LogFn = Callable[[str], None]
ProgressFn = Callable[[Dict[str, Any]], None]
HASH_ENV = "MEDAUTOLABEL_TRAIN_HASH_DIR"  # tests: every rank writes rank<r>.sha256 of its final weights


@dataclass
class TrainResult:
    model_dir: Path
    epochs_run: int
    best_epoch: int
    metrics: Dict[str, Any]
    seconds: float
    stopped_early: bool
    history: List[Dict[str, Any]] = field(default_factory=list)


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warm, floor = cfg.schedule.warmup_iterations, cfg.schedule.min_lr / cfg.optimizer.lr

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        if cfg.schedule.name == "constant":
            return 1.0
        t = min(1.0, (it - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return factor


class _Stream(torch.utils.data.IterableDataset):
    """Random crops for one epoch, split between DataLoader workers (each with its own seed)."""

    def __init__(self, sampler: PatchSampler, batches: int, batch_size: int, seed: int) -> None:
        super().__init__()
        self.sampler, self.batches, self.batch_size, self.seed = sampler, batches, batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.batches // nw + (1 if wid < self.batches % nw else 0)
        self.sampler.seed(_seed_for(self.seed, wid))
        for _ in range(mine * self.batch_size):
            yield self.sampler.sample()


def _batches(sampler: PatchSampler, cfg: TrainConfig, seed: int):
    stream = _Stream(sampler, cfg.iterations_per_epoch, cfg.batch_size, seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.workers)
    return iter(loader)


def minutes(seconds: float) -> str:
    """A duration for people: "0.4 min", "12 min", "3.5 h"."""
    m = seconds / 60.0
    return f"{m / 60.0:.1f} h" if m >= 120 else f"{m:.0f} min" if m >= 10 else f"{m:.1f} min"


class Estimate:
    """How long an epoch takes, from the first iterations' timings (segmentation steps and bag steps apart).

    The run's very first iteration (allocations, kernel selection) is counted only when it is all
    there is (one-iteration epochs). The estimate is ready after ``ESTIMATE_AFTER`` counted
    iterations including one bag step when the epoch has bag steps (or, whatever was counted, at the
    end of the first epoch); validation time joins it once one validation has run (spread over
    ``validation.interval`` epochs).
    """

    ESTIMATE_AFTER = 3

    def __init__(self, iterations: int, bag_steps: int, validation_interval: int) -> None:
        self.iterations, self.bag_steps, self.validation_interval = iterations, bag_steps, validation_interval
        self.step: List[float] = []
        self.bag: List[float] = []
        self.validation: Optional[float] = None
        self.first: Optional[Tuple[float, Optional[float]]] = None

    def add(self, step_seconds: float, bag_seconds: Optional[float]) -> None:
        """One iteration: its segmentation step, and its bag step (None: the iteration had none)."""
        if self.first is None:
            self.first = (step_seconds, bag_seconds)
            return
        self.step.append(step_seconds)
        if bag_seconds is not None:
            self.bag.append(bag_seconds)

    def ready(self) -> bool:
        return len(self.step) >= self.ESTIMATE_AFTER and (self.bag_steps == 0 or len(self.bag) > 0)

    def epoch_seconds(self) -> Optional[float]:
        """Estimated seconds per epoch (None before anything was counted)."""
        if self.first is None:
            return None
        step = self.step or [self.first[0]]
        bag = self.bag or ([self.first[1]] if self.first[1] is not None else [0.0])
        seconds = self.iterations * sum(step) / len(step) + self.bag_steps * sum(bag) / len(bag)
        if self.validation is not None:
            seconds += self.validation / self.validation_interval
        return seconds

    def line(self, epochs: int) -> str:
        """The one estimate line printed up front."""
        per = self.epoch_seconds() or 0.0
        val = "" if self.validation is not None else " plus validation"
        return (f"estimate: about {minutes(per)} per epoch, {minutes(per * epochs)} in all{val} ({epochs} epoch(s) "
                f"of {self.iterations} iterations; {self.bag_steps} with a classification bag)")


class _Log:
    """log.csv (rows after a resumed epoch are dropped) and TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, columns: List[str], resume_epoch: int, say: LogFn) -> None:
        self.path, self.columns = run_dir / "log.csv", columns
        rows: List[Dict[str, str]] = []
        if resume_epoch and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            say("TensorBoard is not installed: logging to log.csv only (pip install tensorboard for curves)")

    def write(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: row.get(k, "") for k in self.columns})
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` that leaves either the previous checkpoint or the new one, never half of one."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _prepare_run(model_dir: Path, config: Union[None, str, Path, Dict[str, Any], TrainConfig], resume: bool,
                 overrides: Dict[str, Any]) -> TrainConfig:
    run_dir = model_dir / "training"
    saved = run_dir / "config.json"
    if resume:
        if not (run_dir / "last.pt").is_file() or not saved.is_file():
            raise ConfigError("nothing to resume: no training/last.pt in the model folder", model_dir)
        cfg = load_config(saved)  # the run continues with the config it started with
    else:
        if (run_dir / "last.pt").exists():
            raise ConfigError("the folder already holds a training run: add --resume to continue it, "
                              "or choose another output folder", model_dir)
        cfg = config if isinstance(config, TrainConfig) else load_config(config)
    apply_overrides(cfg, overrides)
    return cfg


def train(data: Union[str, Path], model_dir: Union[str, Path],
          config: Union[None, str, Path, Dict[str, Any], TrainConfig] = None,
          base: Optional[Union[str, Path, ModelCard]] = None, device: str = "auto", epochs: Optional[int] = None,
          resume: bool = False, cache_path: Optional[Union[str, Path]] = None, command: Optional[str] = None,
          log: Optional[LogFn] = None, progress: Optional[ProgressFn] = None,
          cancel: Optional[Callable[[], bool]] = None, stop_after_epochs: Optional[int] = None,
          overrides: Optional[Dict[str, Any]] = None) -> TrainResult:
    """Train a model on ``data`` into ``model_dir`` (see docs/training.md).

    ``epochs`` and ``overrides`` (``{dotted config key: value}``, e.g. ``{"iterations_per_epoch": 20}``)
    win over the config; keys the config leaves null get the device's defaults (``device_defaults``).
    ``progress(info)`` hears about every iteration (epoch, iteration, loss, once known the estimated
    seconds per epoch) and validation;
    ``cancel()`` returning True stops after the current iteration (raises Cancelled; the last
    finished epoch can be resumed); ``stop_after_epochs`` ends the run early as if killed (tests).
    """
    t_start = time.perf_counter()
    model_dir = Path(model_dir).expanduser().resolve()
    dev = select_device(device)
    dist = distributed.setup(dev.type)
    if dist.enabled and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
    say: LogFn = (log or (lambda m: print(m, flush=True))) if dist.main else (lambda m: None)
    overrides = dict(overrides or {})
    if epochs is not None:
        overrides["epochs"] = epochs
    try:
        return _train(data, model_dir, config, base, dev, overrides, resume, cache_path, command, say, progress,
                      cancel, stop_after_epochs, dist, t_start)
    finally:
        distributed.cleanup(dist)


def _train(data, model_dir: Path, config, base, dev: torch.device, overrides, resume: bool, cache_path, command,
           say: LogFn, progress, cancel, stop_after_epochs, dist: distributed.Dist, t_start: float) -> TrainResult:
    from medautolabel.labelling.pipeline import software_versions
    from medautolabel.runtime.network import build_network, read_state_dict

    cfg = _prepare_run(model_dir, config, resume, overrides)
    run_dir = model_dir / "training"
    threads = cfg.threads or (max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
                              if dist.enabled and dev.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    setup = prepare(data, cfg, base, model_dir, run_dir / "config.json" if resume else config_file(config))
    dataset, base_card = setup.dataset, setup.base_card
    for task, n in unlabelled(dataset).items():
        say(f"note: {n} case(s) have no label for task {quoted(task)}: they sit out that task")
    if not setup.segmentation:
        return _classifiers_only(setup, cfg, model_dir, dev, say, cancel, command, dist, t_start)
    plan: Plan = setup.plan
    specs = setup.specs
    for note in plan.warnings:
        say(f"note: {note}")
    card = ModelCard.from_dict(plan.card)
    train_cases, val_cases = split(dataset, cfg.validation.fraction, cfg.seed, cfg.validation.max_cases)
    all_cases = train_cases + val_cases
    chosen = device_defaults(cfg, dev.type, len(train_cases))
    if chosen:
        say(f"{dev.type} defaults: " + ", ".join(f"{k} {v}" for k, v in chosen.items())
            + " (set them in the config to choose others)")

    # --- cache (rank 0 builds, the others wait and read)
    cpath = Path(cache_path or cfg.cache.path or default_cache_path(dataset.root)).expanduser()
    report = None
    if dist.main:
        say(f"dataset: {len(train_cases)} training and {len(val_cases)} validation cases; cache {cpath}")
        report = build_cache(cpath, all_cases, card, plan.card, cfg.cache,
                             progress=lambda i, n: say(f"preprocessing case {i}/{n}"))
        say(f"cache: {report.reused} case(s) reused, {report.built} preprocessed "
            f"({report.bytes / 1e6:.1f} MB, {report.seconds:.1f} s)")
    report = distributed.broadcast_object(report, dist)
    keys = report.case_keys
    fits = CaseStore.nbytes(cpath, keys) <= cfg.cache.memory_gb * 1e9 / dist.world
    in_memory = cfg.cache.in_memory == "yes" or (cfg.cache.in_memory == "auto" and fits)
    store = CaseStore(cpath, keys, in_memory)
    if not in_memory:
        say("cache: streaming crops from disk (the dataset does not fit in cache.memory_gb)")
    train_ids = list(range(len(train_cases)))
    val_ids = list(range(len(train_cases), len(all_cases)))

    # --- network, optimiser, schedule
    _seed_all(cfg.seed)
    net = build_network(card)
    if base_card is not None and not resume:
        old = read_state_dict(base_card.weights_path)
        net.load_state_dict(grow_state_dict(old, net.state_dict(), plan.channel_map, base_card.out_channels
                                            or len(plan.channel_map)))
    net.to(dev)
    total_its = cfg.epochs * cfg.iterations_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_its))
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, best, best_epoch, bad, elapsed = 0, -1.0, 0, 0, 0.0
    best_metrics: Dict[str, Any] = {}
    if resume:
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch, bad = state["epoch"], state["best"], state["best_epoch"], state["bad"]
        elapsed, best_metrics = state["elapsed"], json.loads(state["best_metrics"])
        chosen = json.loads(state.get("device_defaults", "{}"))  # what the run's first start chose
        sched.lr_lambdas[0] = _lr_lambda(cfg, total_its)  # --epochs may have changed the length
        torch.set_rng_state(state["torch_rng"])
        if state.get("dataset") != report.file_shas and dist.main:
            say("warning: the dataset changed since this run started")
        say(f"resuming after epoch {start_epoch}")
    model = distributed.wrap(net, dist, dev)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(run_dir / "config.json") as tmp:  # --resume reads it back: whole or absent
            tmp.write_text(json.dumps(cfg.to_dict(), indent=2))

    seg_loss = segmentation_loss()
    evidence = EvidenceMax(cfg.classification.smoothing_mm, store.spacing).to(dev)
    sampler = PatchSampler(store, distributed.shard(train_ids, dist), cfg.augmentation, cfg.patch_size, plan.lut,
                           plan.softmax_channels)
    tasks = plan.task_channels
    labels_of = {n: {t: float(c.classes[t] == dict(dataset.classes).get(t, ("", ""))[1]) for t in c.classes}
                 for n, c in enumerate(all_cases)}
    factor = 1
    for s in card.network.parameters.get("strides", [1]):
        factor *= int(s) if isinstance(s, int) else max(s)

    columns = ["epoch", "iterations", "seconds", "lr", "loss", "seg_loss", "cls_loss", "val_mean_dice"]
    columns += [f"val_dice_{name}" for name in plan.label_names] + [f"val_{t}_auc" for t in tasks]
    logger = _Log(run_dir, columns, start_epoch, say) if dist.main else None
    dataset_hash = __import__("hashlib").sha256("".join(report.file_shas).encode()).hexdigest()

    def export(metrics: Dict[str, Any], state: Dict[str, torch.Tensor], epochs_run: int, stopped: bool,
               seconds: float) -> None:
        out = copy.deepcopy(plan.card)
        out["provenance"] = {
            "trained_by": "medautolabel train", "command": command or "medautolabel.training.train()",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(), "device_defaults": chosen,
            "dataset": {"name": dataset.name, "sha256": dataset_hash, "training_cases": len(train_cases),
                        "validation_cases": len(val_cases), "labels": {str(k): v for k, v in dataset.labels.items()}},
            "seeds": {"seed": cfg.seed, "validation_split_seed": cfg.seed,
                      "per_epoch": "generators seeded with (seed, epoch, rank)"},
            "base_model": None if base_card is None else {"id": base_card.id, "version": base_card.version,
                                                          "weights_sha256": base_card.network.sha256},
            "device": str(dev), "processes": dist.world, "epochs_run": epochs_run, "best_epoch": best_epoch,
            "stopped_early": stopped, "duration_s": round(seconds, 1), "software": software_versions(),
        }
        out["metrics"] = {"validation": metrics} if metrics else {}
        write_model(model_dir, out, state)

    history: List[Dict[str, Any]] = []
    stopped = False
    epoch = start_epoch
    its = cfg.iterations_per_epoch
    estimate = Estimate(its, -(-its // cfg.classification.interval) if tasks else 0, cfg.validation.interval)
    told = False
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        epoch_seed = _seed_for(cfg.seed, epoch, dist.rank)
        _seed_all(epoch_seed)
        bag_rand = np.random.RandomState(_seed_for(cfg.seed, epoch, dist.rank, 1) % 2**32)
        model.train()
        sums = {"loss": 0.0, "seg_loss": 0.0, "cls_loss": 0.0}
        bar = None
        if dist.main and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=its, desc=bar_text(epoch, cfg.epochs, estimate), leave=False, unit="it",
                       file=sys.stderr)
        batches = _batches(sampler, cfg, epoch_seed)
        for it in range(cfg.iterations_per_epoch):
            if cancel is not None and cancel():
                raise Cancelled()
            t_it = time.perf_counter()
            batch = next(batches)
            x, y = batch["image"].to(dev), batch["label"].to(dev)
            bag_step = bool(tasks) and it % cfg.classification.interval == 0
            bags = _pick_bags(tasks, train_ids, labels_of, bag_rand) if bag_step else []
            opt.zero_grad(set_to_none=True)
            with (distributed.no_sync(model) if bags else contextlib.nullcontext()):
                with autocast(dev) if use_amp else contextlib.nullcontext():
                    logits = model(x)
                logits = logits.float()
                loss_seg = seg_loss(logits[:, :plan.softmax_channels], y)
                loss_neg = _negative_patch_loss(logits, batch["case"].tolist(), tasks, labels_of, evidence)
                loss = loss_seg + cfg.classification.weight * loss_neg
                scaler.scale(loss).backward()
            loss_cls = float(loss_neg.detach())
            t_bags = time.perf_counter()
            for b, n in enumerate(bags):
                centre, size = bag_box(store, n, cfg.classification.crop_size, factor, bag_rand)
                image, _ = read_box(store, n, centre, size)
                with (distributed.no_sync(model) if b < len(bags) - 1 else contextlib.nullcontext()):
                    with autocast(dev) if use_amp else contextlib.nullcontext():
                        out = model(torch.from_numpy(image)[None].to(dev))
                    terms = [evidence_loss(evidence(out.float()[:, ch]), torch.tensor([labels_of[n][t]], device=dev))
                             for t, ch in tasks.items() if t in labels_of[n]]
                    bag_loss = cfg.classification.weight * torch.stack(terms).sum() / max(len(bags), 1)
                    scaler.scale(bag_loss).backward()
                loss_cls += float(bag_loss.detach())
            bag_seconds = time.perf_counter() - t_bags if bag_step else None
            scaler.step(opt)
            scaler.update()
            sched.step()
            estimate.add(time.perf_counter() - t_it - (bag_seconds or 0.0), bag_seconds)
            if not told and (estimate.ready() or it + 1 == its):
                told = True
                say(estimate.line(cfg.epochs - start_epoch))
                if bar is not None:
                    bar.set_description(bar_text(epoch, cfg.epochs, estimate))
            sums["loss"] += float(loss_seg.detach()) + loss_cls
            sums["seg_loss"] += float(loss_seg.detach())
            sums["cls_loss"] += loss_cls
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / (it + 1):.4f}")
            if progress is not None and dist.main:
                progress({"epoch": epoch + 1, "epochs": cfg.epochs, "iteration": it + 1, "iterations": its,
                          "loss": sums["loss"] / (it + 1),
                          "epoch_seconds_estimate": estimate.epoch_seconds() if told else None})
        if bar is not None:
            bar.close()
        row: Dict[str, Any] = {"epoch": epoch + 1, "iterations": (epoch + 1) * cfg.iterations_per_epoch,
                               "lr": sched.get_last_lr()[0]}
        row.update({k: v / cfg.iterations_per_epoch for k, v in sums.items()})
        last = epoch + 1 == cfg.epochs
        improved = False
        if dist.main and val_ids and ((epoch + 1) % cfg.validation.interval == 0 or last):
            t_val = time.perf_counter()
            metrics = validate(net, store, val_cases, val_ids, card, plan.lut, dev)
            estimate.validation = time.perf_counter() - t_val
            metrics["epoch"] = epoch + 1
            row["val_mean_dice"] = metrics["mean_dice"]
            for name, v in metrics["dice"].items():
                row[f"val_dice_{name}"] = "" if v is None else v
            for t in tasks:
                if isinstance(metrics.get(t), dict) and "roc_auc" in metrics[t]:
                    row[f"val_{t}_auc"] = metrics[t]["roc_auc"]
            if metrics["mean_dice"] > best:
                best, best_epoch, bad, best_metrics, improved = metrics["mean_dice"], epoch + 1, 0, metrics, True
            else:
                bad += 1
        elif dist.main and not val_ids:
            best_epoch, improved = epoch + 1, True  # no validation cases: the latest weights are the model
        seconds = elapsed + time.perf_counter() - t_start
        row["seconds"] = round(time.perf_counter() - t_epoch, 2)
        if dist.main:
            if improved:
                export(best_metrics, net.state_dict(), epoch + 1, False, seconds)
            logger.write(row)
            _save_atomic({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best, "best_epoch": best_epoch,
                          "bad": bad, "elapsed": seconds, "best_metrics": json.dumps(best_metrics),
                          "torch_rng": torch.get_rng_state(), "dataset": report.file_shas,
                          "device_defaults": json.dumps(chosen)}, run_dir / "last.pt")
            val = f" val mean Dice {row['val_mean_dice']:.4f} (best {best:.4f} @ {best_epoch})" \
                if "val_mean_dice" in row else ""
            say(f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f}{val} {row['seconds']:.1f} s")
            if progress is not None:
                progress(dict(row, epochs=cfg.epochs, best_mean_dice=best))
        history.append(row)
        stop = cfg.early_stopping_patience > 0 and bad >= cfg.early_stopping_patience
        stop = bool(distributed.broadcast_object(stop, dist))
        if stop:
            say(f"early stopping: no better validation Dice for {bad} validation(s)")
            stopped = True
            break
        if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs and not last:
            distributed.barrier(dist)
            return TrainResult(model_dir, epoch + 1, best_epoch, best_metrics, time.perf_counter() - t_start,
                               False, history)
    epochs_run = epoch + 1 if cfg.epochs > start_epoch else start_epoch
    seconds = elapsed + time.perf_counter() - t_start
    if dist.main:
        best_state = read_state_dict(model_dir / "model.pt") if (model_dir / "model.pt").exists() else net.state_dict()
        export(best_metrics, best_state, epochs_run, stopped, seconds)
        say(f"model written to {model_dir} (best mean Dice {max(best, 0.0):.4f} at epoch {best_epoch}; "
            f"{seconds:.0f} s)")
        if specs:
            card_dict = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
            card_dict, states = train_classifiers(dataset, cfg, specs, card_dict, dev, say, cancel, setup.config_path)
            write_model_files(model_dir, card_dict, states, {})
            say(f"classifiers written to {model_dir} ({time.perf_counter() - t_start:.0f} s in all)")
    hash_dir = os.environ.get(HASH_ENV)
    if hash_dir:
        Path(hash_dir).mkdir(parents=True, exist_ok=True)
        (Path(hash_dir) / f"rank{dist.rank}.sha256").write_text(state_sha256(net.state_dict()))
    distributed.barrier(dist)
    return TrainResult(model_dir, epochs_run, best_epoch, best_metrics, seconds, stopped, history)


def _classifiers_only(setup: Setup, cfg: TrainConfig, model_dir: Path, dev: torch.device, say: LogFn, cancel,
                      command, dist: distributed.Dist, t_start: float) -> TrainResult:
    """No segmentation training (a dataset without masks, or ``train_segmentation: false``): classifiers only.

    Every task of the dataset without a ``classifiers`` entry gets the default classifier (``classifier_plan``).
    """
    from medautolabel.labelling.pipeline import software_versions

    if dist.enabled:
        raise ConfigError("classifier training runs in one process: start it without torchrun")
    dataset, base_card, specs, card_dict = setup.dataset, setup.base_card, setup.specs, setup.card
    if not cfg.train_segmentation and base_card is None and all(c.label is not None for c in dataset.cases):
        say("note: train_segmentation is false and no --from model is given: the model will classify only")
    card_dict, states = train_classifiers(dataset, cfg, specs, card_dict, dev, say, cancel, setup.config_path)
    seconds = time.perf_counter() - t_start
    card_dict["provenance"] = dict(card_dict.get("provenance") or {}, classifiers_trained_by={
        "command": command or "medautolabel.training.train()",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.to_dict(),
        "base_model": None if base_card is None else {"id": base_card.id, "version": base_card.version},
        "device": str(dev), "duration_s": round(seconds, 1), "software": software_versions(),
        "dataset": {"name": dataset.name, "cases": len(dataset.cases)}})
    write_model_files(model_dir, card_dict, states, setup.copies)
    say(f"model written to {model_dir} ({seconds:.0f} s)")
    metrics = card_dict.get("metrics", {}).get("classifiers", {})
    return TrainResult(model_dir, max((m.get("epochs_run", 0) for m in metrics.values()), default=0),
                       max((m.get("best_epoch", 0) for m in metrics.values()), default=0), metrics, seconds, False)


def bar_text(epoch: int, epochs: int, estimate: Estimate) -> str:
    """The progress bar's label: the epoch, and the estimated time per epoch once known."""
    per = estimate.epoch_seconds() if estimate.ready() or estimate.validation is not None else None
    return f"epoch {epoch + 1}/{epochs}" + (f" (~{minutes(per)}/epoch)" if per else "")


def _pick_bags(tasks: Dict[str, int], train_ids: List[int], labels_of: Dict[int, Dict[str, float]],
               rand: np.random.RandomState) -> List[int]:
    """One positive and one negative training case per task (when the training set has both)."""
    bags: List[int] = []
    for t in tasks:
        for want in (1.0, 0.0):
            pool = [n for n in train_ids if labels_of[n].get(t) == want]
            if pool:
                n = pool[rand.randint(len(pool))]
                if n not in bags:
                    bags.append(n)
    return bags


def _negative_patch_loss(logits: torch.Tensor, cases: List[int], tasks: Dict[str, int],
                         labels_of: Dict[int, Dict[str, float]], evidence: EvidenceMax) -> torch.Tensor:
    """Crops of cases *without* the finding: nothing anywhere in them may light up the evidence channel."""
    terms = []
    for t, ch in tasks.items():
        rows = [b for b, n in enumerate(cases) if labels_of[n].get(t) == 0.0]
        if rows:
            p = evidence(logits[rows, ch])
            terms.append(evidence_loss(p, torch.zeros_like(p)))
    return torch.stack(terms).mean() if terms else logits.new_zeros(())
