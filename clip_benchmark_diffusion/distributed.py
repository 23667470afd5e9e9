"""Data-parallel scoring across processes started by ``torchrun`` or SLURM ``srun``.

Every rank runs the same clip_benchmark command, so every rank builds the same dataloader and
sees the same batch of B images. Instead of a fixed split, ranks claim small chunks of the
batch's image indices from a shared atomic counter (:class:`WorkClaimer`): a rank that drew
cheap images (elimination stops early on easy ones) simply claims more. The results are
then all-gathered, so every rank returns the full batch to clip_benchmark and computes the same
metrics; rank 0 is the one that should write files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from clip_benchmark_diffusion.errors import UserError

DEFAULT_PORT = 29500  # plus SLURM_JOB_ID % 10000, so jobs sharing a node do not collide
CLAIM_PREFIX = "clip_benchmark_diffusion/claims"

# The rendezvous store of the process group we created: the public way to share it, since
# init_process_group only keeps a private reference.
_store: dist.Store | None = None


@dataclass(frozen=True)
class World:
    """This process's place among the ranks scoring together."""

    rank: int         # 0 .. world_size - 1, unique over all nodes
    world_size: int   # number of processes scoring together; 1 when not distributed
    local_rank: int   # index on this node: which GPU this process uses

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else SLURM's task ids, else a single process.

    SLURM's ids only count when there are several tasks and MASTER_ADDR is set: a plain
    ``srun python ...`` of one task, or a job script that starts torchrun itself, is not a
    SLURM-launched world.
    """
    if "WORLD_SIZE" in environ:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif _int(environ, "SLURM_NTASKS", "1") > 1 and environ.get("MASTER_ADDR"):
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return World(rank=0, world_size=1, local_rank=0)
    rank, size, local = (_int(environ, n, "0") for n in names)
    if not 0 <= rank < size or local < 0:
        raise UserError(f"inconsistent launcher environment: {names[0]}={rank}, {names[1]}={size}, "
                        f"{names[2]}={local}; start the ranks with torchrun or srun")
    return World(rank=rank, world_size=size, local_rank=local)


def _int(environ: Mapping[str, str], name: str, default: str) -> int:
    value = environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} should be an integer") from None


def local_device(world: World, device: torch.device | str) -> torch.device:
    """``cuda`` without an index means this rank's GPU, ``cuda:<local_rank>``; others unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and world.is_distributed:
        return torch.device("cuda", world.local_rank % max(torch.cuda.device_count(), 1))
    return device


def init_process_group_if_needed(world: World, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group once: nccl for CUDA devices, gloo otherwise; a no-op for one process.

    Does the env:// rendezvous itself (torch's own logic: under torchrun the agent's store,
    otherwise a store served by rank 0 at MASTER_ADDR:MASTER_PORT) so that the store can be
    shared with :class:`WorkClaimer`.
    """
    global _store
    if not world.is_distributed or dist.is_initialized():
        return
    if not os.environ.get("MASTER_ADDR"):
        raise UserError(f"rank {world.rank} of {world.world_size} has no MASTER_ADDR; "
                        "start the ranks with torchrun, or export MASTER_ADDR under srun")
    if not os.environ.get("MASTER_PORT"):  # torchrun always sets it; srun users often do not
        job = os.environ.get("SLURM_JOB_ID", "0")
        os.environ["MASTER_PORT"] = str(DEFAULT_PORT + (int(job) if job.isdigit() else 0) % 10000)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # all_gather_object and nccl use the current device
    timeout = timedelta(seconds=timeout_s)
    store, rank, size = next(dist.rendezvous("env://", rank=world.rank, world_size=world.world_size,
                                             timeout=timeout))
    # The same prefix init_process_group adds when it does the rendezvous itself.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=size, timeout=timeout)
    _store = store


@dataclass(frozen=True)
class Placement:
    """Where this process scores: its rank, its device, and (distributed) its share of each batch."""

    world: World
    device: torch.device
    claimer: "WorkClaimer | None"


def join(device: torch.device | str, environ: Mapping[str, str] = os.environ) -> Placement:
    """This process's placement: the launcher's world, this rank's device (made the current CUDA device,
    so clip_benchmark's "cuda" means this rank's GPU) and the process group, joined once."""
    world = world_from_env(environ)
    device = local_device(world, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group_if_needed(world, device)
    return Placement(world, device, WorkClaimer() if world.is_distributed else None)


def shared_store() -> dist.Store:
    """A key-value store every rank reaches: ours if we started the group, else the group's own."""
    if _store is not None:
        return _store
    if not dist.is_initialized():
        raise RuntimeError("no process group: call init_process_group_if_needed first")
    # Someone else initialised the group; its store is only reachable through a private helper.
    return dist.distributed_c10d._get_default_store()


class WorkClaimer:
    """Hands out chunks of each batch's image indices, first come first served, across ranks.

    ``claim`` is one atomic ``add`` on the shared store, so no rank ever waits for another.
    Keys are ``<prefix>/<restart>/<batch_id>``: ``batch_id`` must be unique for the life of the
    process group (count batches over all tasks, or use a new ``prefix`` per task). The
    torchelastic restart count is part of the key because the agent's store outlives restarts.
    """

    def __init__(self, store: dist.Store | None = None, prefix: str = CLAIM_PREFIX) -> None:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"{prefix}/{restart}/", store if store is not None else shared_store())

    def claim(self, batch_id: int, batch_size: int, chunk: int) -> list[int] | None:
        """The next ``chunk`` unclaimed indices of batch ``batch_id`` (fewer at the end), or None."""
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        end = self.store.add(str(batch_id), chunk)
        start = end - chunk
        if start >= batch_size:
            return None
        return list(range(start, min(end, batch_size)))


def gather_results(local: dict[int, object], world: World) -> dict[int, object]:
    """Every rank's ``{image_index: result}`` merged, on every rank (``all_gather_object``).

    Results are pickled: give CPU tensors or plain Python values, not CUDA tensors.
    """
    if not world.is_distributed:
        return dict(local)
    parts: list[dict[int, object] | None] = [None] * world.world_size
    dist.all_gather_object(parts, local)
    merged: dict[int, object] = {}
    for part in parts:
        assert part is not None and not merged.keys() & part.keys(), "an image index was claimed twice"
        merged.update(part)
    return merged


def score_batch_distributed(batch_id: int, batch_size: int,
                            score_fn: Callable[[list[int]], dict[int, object]],
                            world: World, claimer: WorkClaimer | None, chunk: int) -> dict[int, object]:
    """Score one batch of ``batch_size`` images across the ranks; every rank gets all results.

    ``score_fn(indices)`` scores the given images of the batch and returns ``{index: result}``.
    Every rank must call this for every batch in the same order (it ends in a collective); if
    one rank's ``score_fn`` raises, the others wait in the gather until the group's timeout.
    """
    if not world.is_distributed:
        results = score_fn(list(range(batch_size)))
    else:
        if claimer is None:
            raise ValueError("a distributed world needs a WorkClaimer")
        local: dict[int, object] = {}
        while (indices := claimer.claim(batch_id, batch_size, chunk)) is not None:
            local.update(score_fn(indices))
        results = gather_results(local, world)
    missing = set(range(batch_size)) - results.keys()
    assert not missing, f"batch {batch_id}: no result for images {sorted(missing)}"
    return results
