"""Replica choice (balanced, rotated, local-first, deterministic) and the autograd all-to-all."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ep_megatron.layer.dispatcher import TokenDispatcher
from ep_megatron.parallel.comm import AllToAll
from ep_megatron.placement import ExpertPlacement
from tests.multirank import run_ranks

# 4 ranks x 3 slots; expert 0 has replicas on slots 0, 1 (rank 0) and 5 (rank 1); expert 1 on 2 and 10.
PLAN = torch.tensor([[0, 0, 1, 2, 3, 0, 4, 5, 6, 7, 1, 2]])
PLACEMENT = ExpertPlacement.from_plan(PLAN, 8, 4)


def _choose(ep_rank: int, logical_ids: torch.Tensor, prefer_local: bool) -> torch.Tensor:
    dispatcher = TokenDispatcher(ep_rank, 4, None, prefer_local_replica=prefer_local)
    return dispatcher.choose_slots(logical_ids, dispatcher.replica_table(PLACEMENT, 0, torch.device("cpu")))


def test_spreads_evenly_over_all_replicas_without_local_preference() -> None:
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0] * 10 + [1] * 7 + [4] * 3)[order]
    for ep_rank in range(4):
        slots = _choose(ep_rank, ids, prefer_local=False)
        assert torch.equal(PLAN[0][slots], ids), "every pair must land on a replica of its expert"
        for expert, replicas in ((0, [0, 1, 5]), (1, [2, 10]), (4, [6])):
            per_replica = torch.stack([(slots == s).sum() for s in replicas])
            assert int(per_replica.sum()) == int((ids == expert).sum())
            assert int(per_replica.max() - per_replica.min()) <= 1, (ep_rank, expert, per_replica)


def test_rotation_by_source_rank_spreads_remainders() -> None:
    one_pair = torch.tensor([0])
    chosen = {int(_choose(ep_rank, one_pair, prefer_local=False)) for ep_rank in range(3)}
    assert chosen == {0, 1, 5}


def test_local_replica_first_and_split_over_local_replicas() -> None:
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 3])
    rank0 = _choose(0, ids, prefer_local=True)
    assert rank0[:4].tolist().count(0) == 2 and rank0[:4].tolist().count(1) == 2  # two local replicas of 0
    assert rank0[4:6].tolist() == [2, 2] and int(rank0[6]) == 4  # expert 3 has no local copy: rank 1
    rank3 = _choose(3, ids, prefer_local=True)
    assert rank3[4:6].tolist() == [10, 10]
    assert torch.equal(rank3, _choose(3, ids, prefer_local=True)), "choice must be deterministic"


def test_replica_table_follows_placement_and_layer() -> None:
    dispatcher = TokenDispatcher(0, 4, None)
    first = dispatcher.replica_table(PLACEMENT, 0, torch.device("cpu"))
    assert dispatcher.replica_table(PLACEMENT, 0, torch.device("cpu")) is first
    moved = ExpertPlacement.from_plan(PLAN.roll(3, dims=1), 8, 4)
    assert dispatcher.replica_table(moved, 0, torch.device("cpu")) is not first


def _all_to_all(send_splits: list[list[int]]) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = send_splits[rank]
    recv = [send_splits[src][rank] for src in range(world)]
    rows = (torch.arange(sum(mine), dtype=torch.float64) + 100 * rank).unsqueeze(1).repeat(1, 3)
    rows.requires_grad_(True)
    out = AllToAll.apply(rows, mine, recv, dist.group.WORLD)
    weight = torch.arange(1, out.numel() + 1, dtype=torch.float64).view_as(out) * (rank + 1)
    (out * weight).sum().backward()
    return {"out": out.detach(), "grad": rows.grad, "weight": weight}


def test_all_to_all_variable_and_zero_splits_autograd() -> None:
    send_splits = [[2, 0, 3], [0, 0, 0], [1, 4, 0]]  # rank 1 sends nothing and receives 4 rows
    results = run_ranks(_all_to_all, 3, send_splits, timeout_s=60)
    sent = {}  # (src, dst) -> rows
    for src in range(3):
        offsets = [0, *torch.tensor(send_splits[src]).cumsum(0).tolist()]
        base = torch.arange(sum(send_splits[src]), dtype=torch.float64) + 100 * src
        for dst in range(3):
            sent[src, dst] = base[offsets[dst]:offsets[dst + 1]]
    for dst in range(3):
        expected = torch.cat([sent[src, dst] for src in range(3)])
        assert torch.equal(results[dst]["out"][:, 0], expected)
    for src in range(3):  # the gradient of each sent row is the weight its receiver applied to it
        grads = []
        for dst in range(3):
            start = sum(send_splits[s][dst] for s in range(src))
            grads.append(results[dst]["weight"][start:start + send_splits[src][dst]])
        assert torch.equal(results[src]["grad"], torch.cat(grads))
