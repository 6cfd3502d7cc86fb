"""ExpertPlacement: strategies, derived maps, validation, serialisation and migration diff."""

import pytest
import torch

from ep_megatron.placement import ExpertPlacement


def _assert_consistent(placement: ExpertPlacement) -> None:
    """Check the derived maps against physical_to_logical with a plain loop."""
    for layer in range(placement.num_layers):
        row = placement.physical_to_logical[layer].tolist()
        for expert in range(placement.num_logical_experts):
            slots = [p for p, e in enumerate(row) if e == expert]
            assert placement.replica_count[layer, expert] == len(slots)
            padded = slots + [-1] * (placement.max_replicas - len(slots))
            assert placement.logical_to_physical[layer, expert].tolist() == padded
            assert placement.owner_slot[layer, expert] == slots[expert % len(slots)]


@pytest.mark.parametrize(
    ("strategy", "kwargs", "slots"),
    [("data", {}, 16), ("model", {}, 8), ("hybrid", {"replicated_experts": [1, 6]}, 10),
     ("dynamic", {"num_redundant": 4}, 12)],
)
def test_strategies_are_placements(strategy, kwargs, slots):
    placement = ExpertPlacement.build(strategy, 3, 8, 2, **kwargs)
    assert placement.strategy == strategy and placement.num_slots == slots
    _assert_consistent(placement)
    assert ExpertPlacement.from_dict(placement.to_dict()) == placement


def test_strategy_layouts():
    assert ExpertPlacement.data(1, 4, 2).local_logical_ids(1).tolist() == [[0, 1, 2, 3]]
    assert ExpertPlacement.model(1, 8, 4).local_logical_ids(2).tolist() == [[4, 5]]
    hybrid = ExpertPlacement.hybrid(1, 6, 2, [3, 0])
    assert hybrid.local_logical_ids(0).tolist() == [[0, 3, 1, 2]]
    assert hybrid.local_logical_ids(1).tolist() == [[0, 3, 4, 5]]


def test_owners_spread_round_robin_for_data():
    placement = ExpertPlacement.data(1, 8, 4)
    owner_ranks = placement.slot_ep_rank[placement.owner_slot[0]].tolist()
    assert owner_ranks == [0, 1, 2, 3, 0, 1, 2, 3]
    assert placement.is_owner(1).sum() == 2


@pytest.mark.parametrize(
    ("phy2log", "experts", "ranks", "message"),
    [
        (torch.tensor([[0, 1, 2]]), 3, 2, "num_slots=3 must be a positive multiple of ep_size=2"),
        (torch.tensor([[0, 0, 1, 1]]), 3, 2, "logical expert 2 of layer 0 has no physical slot"),
        (torch.tensor([[0, 1, 2, 4]]), 4, 2, r"values must be in \[0, 4\)"),
        (torch.tensor([0, 1]), 2, 1, "integer tensor"),
        (torch.tensor([[0.0, 1.0]]), 2, 1, "integer tensor"),
        (torch.tensor([[0, 1]]), 3, 1, "num_slots=2 must be >= num_logical_experts=3"),
    ],
)
def test_invalid_placements_name_the_problem(phy2log, experts, ranks, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement(phy2log, experts, ranks)


def test_invalid_strategy_arguments():
    with pytest.raises(ValueError, match="num_experts=6 divisible by ep_size=4"):
        ExpertPlacement.model(1, 6, 4)
    with pytest.raises(ValueError, match="must be divisible by ep_size=2"):
        ExpertPlacement.hybrid(1, 6, 2, [0])
    with pytest.raises(ValueError, match="num_redundant=-1"):
        ExpertPlacement.dynamic(1, 4, 2, -1)
    with pytest.raises(ValueError, match="strategy='tensor'"):
        ExpertPlacement.build("tensor", 1, 4, 2)


def test_diff_sends_each_expert_once_per_destination_and_copies_locally():
    old = ExpertPlacement.from_plan(torch.tensor([[0, 1, 2, 3, 0, 1]]), 4, 3)
    # rank 0 keeps 0 and gains 3 (from rank 1), rank 1 gains a second 2 (local) and 0 (from rank 0 or 2)
    new = ExpertPlacement.from_plan(torch.tensor([[0, 3, 2, 2, 0, 1]]), 4, 3)
    diff = old.diff(new)
    assert diff.changed_slots.tolist() == [[False, True, False, True, False, False]]
    assert [(t.logical_id, t.src_ep_rank, t.dst_ep_rank) for t in diff.transfers] == [(3, 1, 0)]
    assert old.diff(old).transfers == () and old.diff(old).num_changed_slots == 0
    many = ExpertPlacement.from_plan(torch.tensor([[0, 0, 1, 1, 2, 3]]), 4, 3)
    moved = many.diff(ExpertPlacement.from_plan(torch.tensor([[2, 3, 1, 0, 0, 1]]), 4, 3))
    assert {(t.logical_id, t.src_ep_rank, t.dst_ep_rank) for t in moved.transfers} == {
        (2, 2, 0), (3, 2, 0), (0, 0, 1), (0, 0, 2), (1, 1, 2)}
    for transfer in moved.transfers:
        assert many.local_logical_ids(transfer.src_ep_rank)[0, transfer.src_local_slot] == transfer.logical_id
    more_slots = ExpertPlacement.from_plan(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0]]), 4, 3)
    with pytest.raises(ValueError, match="placements differ in num_slots: 6 vs 9"):
        old.diff(more_slots)  # checked before the maps are compared (no torch shape error)
