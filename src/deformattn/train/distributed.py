"""Process-group setup for ``torchrun`` and the few collective helpers the training loop needs.

A plain ``deformattn train`` is a world of one process: every helper below degrades to a no-op, so the loop has one
code path. Under ``torchrun`` the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) selects
the process group: NCCL when the process drives a GPU, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "choose_threads",
    "cleanup_distributed",
    "init_distributed",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device``; rank 0 is the only writer."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"init_distributed: environment variable {name} must be an int, got {value!r}") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this process's GPU when CUDA is available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given
    (``"cuda"`` under torchrun means the GPU of ``LOCAL_RANK``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif dev.type != "cpu":
        raise ValueError(f"--device: only 'auto', 'cpu' and 'cuda[:N]' are supported, got {device!r}")
    return dev


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (or stay a world of one).

    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: inconsistent RANK={rank} / WORLD_SIZE={world_size} in the environment")
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if not dist.is_available():
            raise RuntimeError("init_distributed: this PyTorch build has no torch.distributed support")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def choose_threads(requested: int, env: DistEnv, *, small_model: bool = False) -> int:
    """CPU threads for this process.

    ``requested`` when > 0; ``OMP_NUM_THREADS`` in the environment is respected as given; a ``small_model`` (the
    built-in digits run) gets 1; otherwise PyTorch's default (one per core) shared between the processes of this
    machine and reduced by the cores other programs keep busy (1-minute load average), at least 1.

    Why: OpenMP threads that wait for a core held by another program spin at every barrier. With the many small
    operations of ``dat_nano`` on 32x32 digits (2-core machine), a second thread gains little on an idle machine but
    loses several-fold once another program uses a core; one thread is barely affected.
    """
    if requested > 0:
        return requested
    if env.device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if small_model:
        return 1
    cores = torch.get_num_threads()
    local_world = _env_int("LOCAL_WORLD_SIZE", env.world_size)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        busy = 0.0
    return max(1, min(cores // local_world, int(cores - busy + 0.5) // local_world))


def cleanup_distributed(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few Python numbers over all ranks (float64, so sample counts stay exact)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
