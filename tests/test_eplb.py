"""Tests of the expert-parallel load balancer (``ep_megatron.placement.eplb``): invariants on seeded random
inputs, the effect of ``previous``, independence of layers, bounds against a plain greedy planner written
here, the metrics, and input validation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ep_megatron.placement import eplb
from ep_megatron.placement.eplb import (
    balancedness,
    layer_balancedness,
    moved_copies,
    rank_loads,
    rebalance_experts,
)


def random_case(seed: int) -> dict:
    """A small random problem: loads, slots, groups, nodes, EP ranks (hierarchical when nodes > 1)."""
    rng = random.Random(seed)
    nodes = rng.choice([1, 1, 2, 4])
    ranks = nodes * rng.choice([1, 2, 3])
    groups = nodes * rng.choice([1, 2])
    experts = groups * rng.choice([1, 2, 3, 5])
    slots_per_rank = -(-experts // ranks) + rng.choice([0, 0, 1, 2])
    gen = torch.Generator().manual_seed(seed)
    kind = rng.choice(["lognormal", "zipf", "zeros", "ints"])
    layers = rng.choice([1, 2, 5])
    if kind == "lognormal":
        weight = torch.exp(rng.choice([0.5, 1.0, 2.0]) * torch.randn(layers, experts, generator=gen))
    elif kind == "zipf":
        weight = 1.0 / (torch.rand(layers, experts, generator=gen).argsort(1) + 1.0)
    elif kind == "zeros":
        weight = torch.zeros(layers, experts)
    else:
        weight = torch.randint(0, 50, (layers, experts), generator=gen)
    return {"weight": weight, "num_slots": slots_per_rank * ranks, "num_groups": groups, "num_nodes": nodes,
            "ep_size": ranks}


def check_plan(case: dict, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
    """The invariants every plan must satisfy."""
    layers, experts = case["weight"].shape
    slots, nodes, groups = case["num_slots"], case["num_nodes"], case["num_groups"]
    assert phy2log.shape == (layers, slots) and phy2log.dtype == torch.int64
    assert logcnt.shape == (layers, experts) and logcnt.dtype == torch.int64
    assert log2phy.dtype == torch.int64 and log2phy.shape == (layers, experts, int(logcnt.max()))
    assert int(phy2log.min()) >= 0 and int(phy2log.max()) < experts
    # every expert has a replica; counts, the forward map and the inverse map agree
    assert bool((logcnt >= 1).all()) and bool((logcnt.sum(1) == slots).all())
    for layer in range(layers):
        for expert in range(experts):
            expected = (phy2log[layer] == expert).nonzero()[:, 0]
            count = int(logcnt[layer, expert])
            assert count == expected.numel()
            assert torch.equal(log2phy[layer, expert, :count], expected)
            assert bool((log2phy[layer, expert, count:] == -1).all())
    if nodes > 1 and groups % nodes == 0:  # hierarchical: each group's replicas all on one node
        group = phy2log // (experts // groups)
        node = torch.arange(slots) // (slots // nodes)
        for layer in range(layers):
            for g in range(groups):
                assert node[group[layer] == g].unique().numel() == 1


@pytest.mark.parametrize("seed", range(24))
def test_invariants_determinism_and_fixed_point(seed: int) -> None:
    case = random_case(seed)
    plan = rebalance_experts(**case)
    check_plan(case, *plan)
    again = rebalance_experts(**case)
    assert all(torch.equal(a, b) for a, b in zip(plan, again))
    # re-planning with unchanged loads from the plan itself changes nothing
    kept = rebalance_experts(**case, previous=plan[0])
    assert torch.equal(kept[0], plan[0])
    # after a drift, the plan from `previous` is valid too and deterministic
    gen = torch.Generator().manual_seed(seed + 1000)
    noise = torch.exp(0.3 * torch.randn(case["weight"].shape, generator=gen))
    drifted = dict(case, weight=case["weight"] * noise)
    moved = rebalance_experts(**drifted, previous=plan[0])
    check_plan(drifted, *moved)
    assert torch.equal(rebalance_experts(**drifted, previous=plan[0])[0], moved[0])


def test_global_plan_is_well_balanced() -> None:
    weight = torch.exp(torch.randn(6, 64, generator=torch.Generator().manual_seed(0)))
    phy2log, _, logcnt = rebalance_experts(weight, 72, 1, 1, 8)
    assert balancedness(phy2log, weight, 8) >= 0.99
    # the hottest expert of each layer is replicated
    assert bool((logcnt.gather(1, weight.argmax(1, keepdim=True)) >= 2).all())


def test_hierarchical_plan_reaches_the_node_level_bound() -> None:
    # 4 groups onto 2 nodes: the best pairing of groups is easy to enumerate
    weight = torch.exp(torch.randn(5, 64, generator=torch.Generator().manual_seed(1)))
    phy2log = rebalance_experts(weight, 80, 4, 2, 8)[0]
    group_load = weight.double().view(5, 4, 16).sum(-1)
    pairings = ([0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0])
    peaks = [torch.zeros(5, 2, dtype=torch.float64).index_add_(1, torch.tensor(p), group_load).max(1).values
             for p in pairings]
    bound = (group_load.sum(1) / 2 / torch.stack(peaks).min(0).values).mean().item()
    assert balancedness(phy2log, weight, 8) >= 0.99 * bound


def test_previous_keeps_slots_after_a_small_drift() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.exp(torch.randn(8, 128, generator=gen))
    old = rebalance_experts(weight, 144, 1, 1, 16)[0]
    drifted = weight * torch.exp(0.05 * torch.randn(weight.shape, generator=gen))
    fresh = rebalance_experts(drifted, 144, 1, 1, 16)[0]
    new = rebalance_experts(drifted, 144, 1, 1, 16, previous=old)[0]
    assert moved_copies(old, new, 16) <= 0.15 < moved_copies(old, fresh, 16)
    assert balancedness(new, drifted, 16) >= balancedness(fresh, drifted, 16) - 0.01
    assert balancedness(new, drifted, 16) > balancedness(old, drifted, 16)
    # a larger tolerance trades balance for fewer moves
    loose = rebalance_experts(drifted, 144, 1, 1, 16, previous=old, balance_tolerance=0.05)[0]
    assert moved_copies(old, loose, 16) < moved_copies(old, new, 16)


@pytest.mark.parametrize("nodes", [1, 2])
def test_max_moved_fraction_caps_moves(nodes: int) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.exp(torch.randn(4, 32, generator=gen))
    old = rebalance_experts(weight, 40, 2, nodes, 8)[0]
    drifted = weight * torch.exp(torch.randn(weight.shape, generator=gen))
    for cap in (0.0, 0.1):  # local row copies (an expert its rank already holds) are free
        capped = rebalance_experts(drifted, 40, 2, nodes, 8, previous=old, max_moved_fraction=cap)[0]
        for layer in range(4):
            assert moved_copies(old[layer : layer + 1], capped[layer : layer + 1], 8) <= cap + 1e-9


def test_hierarchical_plan_from_a_global_previous_moves_groups_home() -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.exp(torch.randn(3, 32, generator=gen))
    case = {"weight": weight, "num_slots": 48, "num_groups": 4, "num_nodes": 2, "ep_size": 8}
    global_plan = rebalance_experts(weight, 48, 1, 1, 8)[0]
    check_plan(case, *rebalance_experts(**case, previous=global_plan))


def dhondt_counts(load: list[float], num_slots: int, ep_size: int, old: list[int] | None = None,
                  tolerance: float = 0.0) -> list[int]:
    """D'Hondt replica counts, one replica at a time: to the largest load per replica (x ``1 + tolerance``
    below the old count), ties to fewer replicas then lower id, at most max(ranks, ceil(P / E)) each."""
    counts = [1] * len(load)
    cap = max(ep_size, -(-num_slots // len(load)))
    for _ in range(num_slots - len(load)):
        def worth(e: int) -> tuple[float, int, int]:
            bonus = 1 + tolerance if old is not None and counts[e] < old[e] else 1.0
            return (np.float32(load[e] / counts[e] * bonus), -counts[e], -e)
        counts[max((e for e in range(len(load)) if counts[e] < cap), key=worth)] += 1
    return counts


def greedy_plan(weight: torch.Tensor, num_slots: int, ep_size: int) -> torch.Tensor:
    """DeepSeek's global rule written plainly: D'Hondt counts (uncapped), then every replica, largest first,
    to the least loaded rank that has a free slot."""
    plans = []
    for load in weight.double().tolist():
        counts = [1] * len(load)
        for _ in range(num_slots - len(load)):
            counts[max(range(len(load)), key=lambda e: (load[e] / counts[e], -e))] += 1
        replicas = sorted(((load[e] / counts[e], e) for e in range(len(load)) for _ in range(counts[e])),
                          key=lambda item: -item[0])
        rank_load, held = [0.0] * ep_size, [[] for _ in range(ep_size)]
        for value, expert in replicas:
            rank = min((r for r in range(ep_size) if len(held[r]) < num_slots // ep_size),
                       key=rank_load.__getitem__)
            rank_load[rank] += value
            held[rank].append(expert)
        plans.append([e for rank in held for e in rank])
    return torch.tensor(plans)


def test_replica_counts_equal_one_replica_at_a_time() -> None:
    # the planner selects all extra replicas at once; here they are handed out one by one
    rng = random.Random(5)
    for case in range(30):
        experts, ranks = rng.choice([3, 8, 17]), rng.choice([2, 4, 8])
        num_slots = ranks * (-(-experts // ranks) + rng.choice([0, 1, 3]))
        load = [rng.choice([0.0, 0.0, 1.0, 2.0]) if case % 3 == 0 else rng.lognormvariate(0, 1.5)
                for _ in range(experts)]
        old = dhondt_counts([rng.random() for _ in load], num_slots, ranks) if case % 2 else None
        old_counts = None if old is None else np.array([old])
        got = eplb._replica_counts(np.array([load]), num_slots, ranks, old_counts, 0.05)
        assert got.tolist() == [dhondt_counts(load, num_slots, ranks, old, 0.05)]


def test_balance_within_the_greedy_bound_and_better_than_greedy_on_average() -> None:
    # list-scheduling bound: no rank above the mean by more than the largest replica of the D'Hondt counts
    # the plan starts from (it only lowers its peak after); and on average better than the plain greedy
    rng = random.Random(6)
    ours, greedy = [], []
    for seed in range(40):
        ranks, experts = rng.choice([2, 4, 8, 16]), rng.choice([8, 16, 32, 64])
        num_slots = ranks * (-(-experts // ranks) + rng.choice([0, 1, 2, 3]))
        weight = torch.exp(rng.choice([0.5, 1.0, 2.0]) * torch.randn(3, experts,
                                                                     generator=torch.Generator().manual_seed(seed)))
        plan = rebalance_experts(weight, num_slots, 1, 1, ranks)[0]
        loads = rank_loads(plan, weight, ranks)
        for layer, load in enumerate(weight.double().tolist()):
            counts = dhondt_counts(load, num_slots, ranks)
            largest = max(value / count for value, count in zip(load, counts))
            assert loads[layer].max().item() <= loads[layer].mean().item() + largest + 1e-9
        ours.append(layer_balancedness(plan, weight, ranks))
        greedy.append(layer_balancedness(greedy_plan(weight, num_slots, ranks), weight, ranks))
    assert torch.cat(ours).mean().item() > torch.cat(greedy).mean().item() + 0.005


@pytest.mark.parametrize(("experts", "slots", "ranks", "nodes", "groups"),
                         [(64, 80, 16, 1, 1), (32, 64, 32, 1, 1), (64, 96, 16, 2, 8), (8, 16, 8, 1, 1)])
def test_layers_are_planned_independently(experts: int, slots: int, ranks: int, nodes: int,
                                          groups: int) -> None:
    # all layers are planned in one batch; a layer's plan must not depend on the other layers
    gen = torch.Generator().manual_seed(experts + slots)
    weight = torch.exp(torch.randn(5, experts, generator=gen))
    drifted = weight * torch.exp(0.1 * torch.randn(weight.shape, generator=gen))
    batch = rebalance_experts(weight, slots, groups, nodes, ranks)[0]
    again = rebalance_experts(drifted, slots, groups, nodes, ranks, previous=batch)[0]
    for layer in range(5):
        one = rebalance_experts(weight[layer : layer + 1], slots, groups, nodes, ranks)[0]
        assert torch.equal(one, batch[layer : layer + 1])
        one = rebalance_experts(drifted[layer : layer + 1], slots, groups, nodes, ranks,
                                previous=batch[layer : layer + 1])[0]
        assert torch.equal(one, again[layer : layer + 1])


def test_two_slots_per_rank() -> None:
    # two slots per rank: the plan pairs the replicas largest with smallest, which is optimal for its counts
    gen = torch.Generator().manual_seed(7)
    weight = torch.exp(torch.randn(4, 32, generator=gen))
    case = {"weight": weight, "num_slots": 64, "num_groups": 1, "num_nodes": 1, "ep_size": 32}
    phy2log, log2phy, logcnt = rebalance_experts(**case)
    check_plan(case, phy2log, log2phy, logcnt)
    replicas = (weight.double() / logcnt).repeat_interleave(logcnt.flatten()).view(4, -1).sort(1).values
    best = (replicas + replicas.flip(1)).max(1).values
    assert torch.allclose(rank_loads(phy2log, weight, 32).max(1).values, best)
    # after a drift: valid, no worse than keeping the old plan, and a move cap holds
    drifted = dict(case, weight=weight * torch.exp(0.2 * torch.randn(weight.shape, generator=gen)))
    moved = rebalance_experts(**drifted, previous=phy2log)
    check_plan(drifted, *moved)
    assert balancedness(moved[0], drifted["weight"], 32) >= balancedness(phy2log, drifted["weight"], 32)
    capped = rebalance_experts(**drifted, previous=phy2log, max_moved_fraction=0.1)[0]
    for layer in range(4):
        assert moved_copies(phy2log[layer : layer + 1], capped[layer : layer + 1], 32) <= 0.1 + 1e-9


def test_edge_shapes() -> None:
    weight = torch.rand(2, 6)
    for args in ((6, 1, 1, 1), (6, 1, 1, 6), (12, 3, 3, 3), (7, 1, 1, 1)):
        case = dict(zip(("num_slots", "num_groups", "num_nodes", "ep_size"), args), weight=weight)
        check_plan(case, *rebalance_experts(**case))
    # groups that do not split over the nodes fall back to the global plan (DeepSeek's rule)
    phy2log = rebalance_experts(weight, 8, 1, 2, 4)[0]
    assert phy2log.shape == (2, 8)


def test_metrics_on_a_hand_made_plan() -> None:
    weight = torch.tensor([[4.0, 2.0, 2.0]])
    phy2log = torch.tensor([[0, 1, 0, 2]])  # rank 0: e0/2 + e1, rank 1: e0/2 + e2
    assert torch.allclose(rank_loads(phy2log, weight, 2), torch.tensor([[4.0, 4.0]], dtype=torch.float64))
    assert balancedness(phy2log, weight, 2) == pytest.approx(1.0)
    assert balancedness(torch.tensor([[0, 0, 1, 2]]), weight, 2) == pytest.approx(4.0 / 4.0)
    assert balancedness(torch.tensor([[1, 2, 0, 0]]), weight, 2) == pytest.approx(4.0 / 4.0)
    assert balancedness(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[4.0, 2.0, 2.0]]), 2) == pytest.approx(
        4.0 / 6.0)
    assert balancedness(phy2log, torch.zeros(1, 3), 2) == 1.0
    # moved copies: (rank, expert) pairs that are new, as a fraction of all slots
    assert moved_copies(phy2log, phy2log, 2) == 0.0
    assert moved_copies(phy2log, torch.tensor([[1, 0, 2, 0]]), 2) == 0.0  # only slot order changed
    assert moved_copies(phy2log, torch.tensor([[0, 2, 0, 1]]), 2) == pytest.approx(2 / 4)


BAD_INPUTS = [
    ({"num_slots": 10}, "num_slots"),  # not a multiple of ep_size
    ({"num_slots": 4, "ep_size": 2}, "num_slots"),  # fewer slots than experts
    ({"num_nodes": 3}, "ep_size"),  # ranks not a multiple of nodes
    ({"num_groups": 3}, "num_groups"),  # groups do not divide the experts
    ({"ep_size": 0}, "ep_size"),
    ({"num_groups": 1.5}, "num_groups"),
    ({"weight": torch.tensor([[1.0, -1.0] * 4])}, "weight"),
    ({"weight": torch.tensor([[1.0, float("nan")] * 4])}, "weight"),
    ({"weight": torch.tensor([[1.0, float("inf")] * 4])}, "weight"),
    ({"weight": torch.ones(8)}, "weight"),
    ({"weight": torch.ones(1, 8, 1)}, "weight"),
    ({"weight": torch.ones(1, 8, dtype=torch.bool)}, "weight"),
    ({"previous": torch.zeros(1, 12, dtype=torch.int64)}, "previous"),
    ({"previous": torch.zeros(1, 16)}, "previous"),
    ({"previous": torch.full((1, 16), 8)}, "previous"),
    ({"balance_tolerance": -0.1}, "balance_tolerance"),
    ({"max_moved_fraction": 1.5}, "max_moved_fraction"),
]


@pytest.mark.parametrize(("change", "name"), BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(change: dict, name: str) -> None:
    args = {"weight": torch.ones(1, 8), "num_slots": 16, "num_groups": 2, "num_nodes": 2, "ep_size": 4}
    with pytest.raises(ValueError, match=name):
        rebalance_experts(**(args | change))


def test_metric_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="ep_size"):
        balancedness(torch.zeros(1, 6, dtype=torch.int64), torch.ones(1, 3), 4)
    with pytest.raises(ValueError, match="phy2log"):
        rank_loads(torch.zeros(2, 6, dtype=torch.int64), torch.ones(1, 3), 2)
    with pytest.raises(ValueError, match="new_phy2log"):
        moved_copies(torch.zeros(1, 6, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64), 2)
