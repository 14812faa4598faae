"""Several processes with torchrun: process-group set-up, rank roles, and the few collectives the loop needs.

    torchrun --nproc_per_node 4 train.py --config franka.toml        # 4 GPUs of one node
    torchrun --nproc_per_node 2 train.py --config demo.toml --training.device cpu   # 2 CPU processes (gloo)

torchrun starts one process per device and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; `init_distributed` reads them (a plain `python train.py` has world size 1 and sets
nothing up). NCCL on CUDA (rank r uses cuda:LOCAL_RANK), gloo on CPU.

Roles: every rank trains on its shard of each global batch (the model is wrapped in
DistributedDataParallel, which averages the gradients); rank 0 alone writes logs, metrics, images
and checkpoints.

Control flags (a stop request, a non-finite step) are agreed through a gloo group on the CPU: a rank
may receive SIGTERM a moment before the others, or see a NaN that the others do not, and every rank
must take the same decision at the same step. On CPU that group is the default one; with NCCL it is
a second, gloo, group, so agreeing on a flag never waits for the GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dinowm.config import ConfigError

_control_group = None  # the gloo group for control flags (None: the default group)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op outside torchrun or with 1 process).

    device: training.device; "auto" or "cuda" pick NCCL when CUDA is available, otherwise gloo.
    timeout_s: how long a collective may wait for the other ranks before it fails.
    """
    global _control_group
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    if dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if ":" in device:
            raise ConfigError(f"training.device = {device!r}: under torchrun each process uses cuda:LOCAL_RANK; "
                             "set training.device = cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
        if not torch.cuda.is_available():
            raise ConfigError(f"training.device = {device!r} but no CUDA device is available; use --training.device cpu")
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    _control_group = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else None
    return current()


def current() -> DistInfo:
    """Rank and world size of this process (rank 0 of 1 when no process group is set up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (one tiny CPU all-reduce; no-op alone)."""
    if not current().enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, through the CPU group)."""
    if not current().enabled:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a tensor on this rank's device (no-op alone)."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks of a tensor on this rank's device (no-op alone): no host read."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def mean_over_ranks(values: dict) -> dict:
    """{name: float} averaged over the ranks that have the name (a rank may lack one, e.g. a loss that was
    non-finite on that rank alone); no-op alone. Collective: every rank must call it."""
    if not current().enabled:
        return values
    names = sorted({k for rank_names in all_gather_objects(sorted(values)) for k in rank_names})
    if not names:
        return {}
    t = torch.tensor([[values.get(k, 0.0) for k in names], [float(k in values) for k in names]], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_control_group)
    return {k: float(total) / float(n) for k, total, n in zip(names, t[0], t[1])}
