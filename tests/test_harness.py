"""The multi-rank harness itself: real collectives, failures and hangs surface as test failures."""

import time

import pytest
import torch
import torch.distributed as dist

from ep_megatron.parallel import build_groups, check_ep_size
from tests.multirank import RankFailure, RankTimeout, run_ranks


def _uneven_all_to_all() -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    # rank r sends (r + d + 1) values to rank d, each encoding (source, destination, index)
    input_splits = [rank + d + 1 for d in range(world)]
    output_splits = [s + rank + 1 for s in range(world)]
    send = torch.cat([torch.tensor([100.0 * rank + 10.0 * d + i for i in range(n)])
                      for d, n in enumerate(input_splits)])
    recv = torch.empty(sum(output_splits))
    dist.all_to_all_single(recv, send, output_splits, input_splits)
    return recv.tolist()


def test_four_rank_all_to_all_with_uneven_splits():
    results = run_ranks(_uneven_all_to_all, 4)
    for rank, received in enumerate(results):
        expected = [100.0 * s + 10.0 * rank + i for s in range(4) for i in range(s + rank + 1)]
        assert received == expected


def _raise_on_rank_two() -> None:
    if dist.get_rank() == 2:
        raise ValueError("rank two refuses")
    dist.barrier()


def test_a_raising_rank_fails_the_test_with_its_message():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 2 ---(.|\n)*rank two refuses"):
        run_ranks(_raise_on_rank_two, 4, timeout_s=60)
    assert time.monotonic() - start < 60


def _rank_one_skips_the_collective() -> None:
    if dist.get_rank() != 1:
        dist.all_reduce(torch.ones(1))
    else:
        time.sleep(3600)


def test_a_rank_that_never_joins_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankTimeout, match="did not finish within 5s"):
        run_ranks(_rank_one_skips_the_collective, 2, timeout_s=5)
    assert time.monotonic() - start < 30


def _group_layout(ep_size: int) -> tuple[int, int, int, int, list[float], list[float]]:
    groups = build_groups(ep_size)
    rank = torch.tensor([float(dist.get_rank())])
    ep_ranks = [torch.zeros(1) for _ in range(groups.ep_size)]
    dist.all_gather(ep_ranks, rank, group=groups.ep_group)
    edp_ranks = [torch.zeros(1) for _ in range(groups.edp_size)]
    dist.all_gather(edp_ranks, rank, group=groups.edp_group)
    return (groups.ep_rank, groups.edp_rank, groups.ep_size, groups.edp_size,
            [t.item() for t in ep_ranks], [t.item() for t in edp_ranks])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_groups_follow_megatron_layout(world_size):
    ep_size = min(2, world_size)
    for rank, (ep_rank, edp_rank, ep, edp, ep_members, edp_members) in enumerate(
        run_ranks(_group_layout, world_size, ep_size)
    ):
        assert (ep, edp) == (ep_size, world_size // ep_size)
        assert (ep_rank, edp_rank) == (rank % ep_size, rank // ep_size)
        assert ep_members == [float(edp_rank * ep_size + i) for i in range(ep_size)]
        assert edp_members == [float(ep_rank + j * ep_size) for j in range(edp)]


def test_incompatible_ep_size_is_a_clear_error():
    message = "expert_parallel_size=3 must be a positive divisor of the world size 4"
    with pytest.raises(ValueError, match=message):
        check_ep_size(3, 4)
    with pytest.raises(RankFailure, match="expert_parallel_size=3"):
        run_ranks(build_groups, 2, 3, timeout_s=60)
