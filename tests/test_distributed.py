"""Data-parallel scoring: launcher environments, chunk claims, and a real two-rank torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from cli_helpers import free_port
from clip_benchmark_diffusion.distributed import (World, WorkClaimer, local_device, score_batch_distributed,
                                                  world_from_env)
from clip_benchmark_diffusion.errors import UserError

BATCH = 16


def value(batch_id: int, index: int) -> float:
    """A stand-in for one image's score: deterministic in (batch, index) only."""
    g = torch.Generator().manual_seed(1000 * batch_id + index)
    return torch.randn(4, generator=g).sum().item()


# Batch 0: chunks of 4 and the first chunk slow. Batch 1: chunks of 1 and image 5 slow.
SCRIPT = """
import json, sys, time
import torch
import torch.distributed as dist
from clip_benchmark_diffusion.distributed import (WorkClaimer, init_process_group_if_needed,
                                                  score_batch_distributed, world_from_env)

def value(batch_id, index):
    g = torch.Generator().manual_seed(1000 * batch_id + index)
    return torch.randn(4, generator=g).sum().item()

PLAN = {0: (4, range(0, 4), 0.5), 1: (1, [5], 1.0)}   # batch: chunk, slow images, their seconds
world = world_from_env()
init_process_group_if_needed(world, torch.device("cpu"))
init_process_group_if_needed(world, torch.device("cpu"))   # idempotent
claimer = WorkClaimer()
claimed, results = {}, {}
for batch_id, (chunk, slow, seconds) in PLAN.items():
    def score(indices):
        claimed.setdefault(batch_id, []).extend(indices)
        time.sleep(sum(seconds if i in slow else 0.01 for i in indices))
        return {i: value(batch_id, i) for i in indices}
    dist.barrier()   # start together, as ranks do after loading the same model
    results[batch_id] = score_batch_distributed(batch_id, %(batch)d, score, world, claimer, chunk)
every_claim = [None] * world.world_size
dist.all_gather_object(every_claim, claimed)
same = [None] * world.world_size
dist.all_gather_object(same, results)
if world.rank == 0:
    with open(sys.argv[1], "w") as fh:
        json.dump({"world_size": world.world_size, "claims": every_claim, "results": results,
                   "all_ranks_equal": all(r == results for r in same)}, fh)
dist.destroy_process_group()
"""


def test_torchrun_two_ranks_split_work_dynamically(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent(SCRIPT % {"batch": BATCH}))
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and data["all_ranks_equal"]
    for batch_id in ("0", "1"):
        per_rank = [claims[batch_id] for claims in data["claims"]]
        assert sorted(per_rank[0] + per_rank[1]) == list(range(BATCH))          # each image exactly once
        assert data["results"][batch_id] == {str(i): value(int(batch_id), i) for i in range(BATCH)}
        slow = {"0": {0, 1, 2, 3}, "1": {5}}[batch_id]
        slow_rank = 0 if slow <= set(per_rank[0]) else 1
        assert slow <= set(per_rank[slow_rank])
        assert len(per_rank[slow_rank]) < len(per_rank[1 - slow_rank]), per_rank  # the other rank did more


def test_claims_cover_the_batch_once_then_stop():
    claimer = WorkClaimer(dist.HashStore())
    got = []
    while (chunk := claimer.claim(7, 10, 4)) is not None:
        got.append(chunk)
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert claimer.claim(7, 10, 4) is None
    assert claimer.claim(8, 3, 2) == [0, 1]                   # batches are counted apart
    with pytest.raises(ValueError):
        claimer.claim(9, 3, 0)


def test_single_process_scores_the_whole_batch_in_one_call():
    calls = []

    def score(indices):
        calls.append(indices)
        return {i: i * i for i in indices}

    assert score_batch_distributed(0, 5, score, World(0, 1, 0), None, chunk=2) == {i: i * i for i in range(5)}
    assert calls == [[0, 1, 2, 3, 4]]
    with pytest.raises(AssertionError, match="no result for images"):
        score_batch_distributed(0, 5, lambda idx: {}, World(0, 1, 0), None, chunk=2)


def test_world_from_env():
    assert world_from_env({}) == World(0, 1, 0) and not World(0, 1, 0).is_distributed
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_NTASKS": "8", "MASTER_ADDR": "n1"}
    assert world_from_env(torchrun) == World(3, 4, 1) and World(3, 4, 1).is_distributed
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1"}
    assert world_from_env(slurm) == World(5, 8, 1)
    assert world_from_env({**slurm, "MASTER_ADDR": ""}) == World(0, 1, 0)        # srun of a torchrun script
    assert world_from_env({**slurm, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == World(0, 1, 0)
    with pytest.raises(UserError, match="RANK=4, WORLD_SIZE=4"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_local_device():
    assert local_device(World(0, 2, 1), "cpu") == torch.device("cpu")
    assert local_device(World(0, 1, 0), "cuda") == torch.device("cuda")
    assert local_device(World(0, 2, 1), "cuda:0") == torch.device("cuda", 0)
