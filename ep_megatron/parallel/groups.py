"""Process groups for expert parallelism, created once per run.

Rank layout follows Megatron-Core with tensor/pipeline/context parallel size 1: expert-parallel (EP)
groups are blocks of consecutive ranks, expert-data-parallel (EDP) groups are strided,
``rank = edp_rank * ep_size + ep_rank``. Every rank is a data-parallel rank for the dense parameters.
Beside these device groups, one gloo group over all ranks (``host_group``, Megatron's ``*_gloo`` groups)
carries host-side metadata (loss values for logging, load counters, rebalance plans), so no CPU tensor
ever goes over an NCCL group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """What the launcher (torchrun, deepspeed, or none) told this process."""

    rank: int  # global rank
    world_size: int  # number of processes
    local_rank: int  # rank on this node, selects the CUDA device
    backend: str  # "gloo" on CPU, "nccl" on CUDA
    device: torch.device  # where this rank computes


@dataclass(frozen=True)
class ParallelGroups:
    """The fixed process groups of one run; ``None`` groups mean a single process."""

    world_size: int  # all ranks; the data-parallel size of dense parameters
    rank: int  # global rank
    ep_size: int  # expert-parallel size: ranks that share one layer's physical slots
    ep_rank: int  # this rank's index in its expert-parallel group
    ep_group: ProcessGroup | None  # this rank's expert-parallel group
    edp_group: ProcessGroup | None  # ranks holding the same ep_rank (expert-data-parallel)
    dp_group: ProcessGroup | None  # all ranks (dense-parameter data parallelism)
    host_group: ProcessGroup | None = None  # all ranks over gloo, for CPU tensors (None: single process)

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep_size

    @classmethod
    def single(cls) -> ParallelGroups:
        """Groups of a single process (no torch.distributed needed)."""
        return cls(world_size=1, rank=0, ep_size=1, ep_rank=0, ep_group=None, edp_group=None, dp_group=None)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> DistEnv:
    """Initialise torch.distributed from torchrun / deepspeed launcher variables.

    Without ``WORLD_SIZE`` in the environment this is a plain single process and nothing is
    initialised; with it (even ``WORLD_SIZE=1``) the process group is created.
    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        missing = [name for name in _LAUNCHER_VARS if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world_size} but launcher variables {missing} are not set")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=device)


def check_ep_size(ep_size: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``ep_size`` divides ``world_size``."""
    if ep_size < 1 or world_size % ep_size != 0:
        raise ValueError(
            f"expert_parallel_size={ep_size} must be a positive divisor of the world size {world_size}"
        )


def build_groups(ep_size: int) -> ParallelGroups:
    """Create the EP, EDP and DP groups and the gloo host group once; every rank must call this in the
    same order.

    Works in a single process without torch.distributed when ``ep_size == 1``. The host group is a gloo
    group over all ranks, also when the default backend is gloo (host and device traffic stay apart).
    """
    if not dist.is_initialized():
        check_ep_size(ep_size, 1)
        return ParallelGroups.single()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_ep_size(ep_size, world_size)
    edp_size = world_size // ep_size
    ep_group = edp_group = None
    # new_group is collective over the world: every rank creates every group, in the same order.
    for block in range(edp_size):
        ranks = list(range(block * ep_size, (block + 1) * ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for ep_rank in range(ep_size):
        ranks = list(range(ep_rank, world_size, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return ParallelGroups(
        world_size=world_size,
        rank=rank,
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        ep_group=ep_group,
        edp_group=edp_group,
        dp_group=dist.group.WORLD,
        host_group=dist.new_group(list(range(world_size)), backend="gloo"),
    )
