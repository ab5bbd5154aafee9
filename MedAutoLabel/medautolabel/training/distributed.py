"""Multi-process training under ``torchrun``: DistributedDataParallel, NCCL on GPUs, gloo on CPUs.

``torchrun --nproc_per_node N -m medautolabel.training DATA -o MODEL_DIR`` runs the same command
in N processes; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) says how
they meet. Each rank samples its own share of the training cases with its own seed (what a
DistributedSampler does for map-style datasets); gradients are averaged by DDP, so every rank
holds the same weights. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, ContextManager, List, Sequence

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup(device_type: str) -> Dist:
    """Join the process group when started by torchrun (NCCL for CUDA, gloo otherwise)."""
    if not launched_by_torchrun():
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # long timeout: rank 0 builds the cache and validates while the others wait
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=4))
    return Dist(dist.get_rank(), dist.get_world_size(), local, backend)


def shard(items: Sequence[int], d: Dist) -> List[int]:
    """This rank's share of the training cases (all of them when there are fewer cases than ranks)."""
    items = list(items)
    return items if len(items) < d.world else items[d.rank::d.world]


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the early-stopping decision)."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(net: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    if not d.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else d.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def no_sync(net: torch.nn.Module) -> ContextManager:
    """Accumulate gradients locally (DDP would otherwise all-reduce after every backward pass)."""
    return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()


def cleanup(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
