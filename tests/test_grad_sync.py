"""Replica gradient sync and the true grad norm, on real gloo ranks.

The reference is written independently: every rank regenerates every rank's raw gradients from their
seeds and sums them per logical expert in a plain loop over (rank, slot), in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel import ParallelGroups, build_groups
from ep_megatron.parallel.grad_sync import (
    ExpertGradSync,
    LayerGrads,
    clip_grad_norm_,
    expert_grad_norm_sq,
    sync_layers,
    sync_replica_grads,
)
from ep_megatron.placement import ExpertPlacement
from tests.multirank import run_ranks

HIDDEN, FFN, NUM_LAYERS = 3, 2, 2
PARAM_SHAPES = ((2 * FFN, HIDDEN), (HIDDEN, FFN))  # fc1 / fc2 row shapes


# ---- fixtures: placements, gradients, a stand-in for the MoELayer contract ------------------------------
def random_plan(ep_size: int, num_experts: int, slots_per_rank: int, seed: int) -> ExpertPlacement:
    """Random ``phy2log`` with every expert present: replicas on one rank, ranks missing experts."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = ep_size * slots_per_rank
    rows = []
    for _ in range(NUM_LAYERS):
        ids = torch.cat([torch.randperm(num_experts, generator=gen),
                         torch.randint(0, num_experts, (num_slots - num_experts,), generator=gen)])
        rows.append(ids[torch.randperm(num_slots, generator=gen)])
    return ExpertPlacement.from_plan(torch.stack(rows), num_experts, ep_size)


def replicated_plan(ep_size: int, seed: int) -> ExpertPlacement:
    """4 experts on 6 or more slots: some experts have several replicas."""
    return random_plan(ep_size, 4, max(3, 6 // ep_size), seed)


def placements(ep_size: int) -> list[tuple[str, ExpertPlacement]]:
    cases = [
        ("data", ExpertPlacement.build("data", NUM_LAYERS, 4, ep_size)),
        ("model", ExpertPlacement.build("model", NUM_LAYERS, 4, ep_size)),
        ("hybrid", ExpertPlacement.hybrid(NUM_LAYERS, 5, ep_size, replicated_experts=[2])),
        ("dynamic", ExpertPlacement.build("dynamic", NUM_LAYERS, 4, ep_size, num_redundant=ep_size)),
        ("random", replicated_plan(ep_size, seed=ep_size)),
    ]
    if ep_size == 2:  # three copies of expert 0 (two on rank 0), rank 0 holds no copy of expert 3
        plan = torch.tensor([[0, 0, 1, 2, 0, 3, 3, 3], [1, 1, 1, 1, 0, 2, 3, 0]])
        cases.append(("skewed", ExpertPlacement.from_plan(plan, 4, 2)))
    return cases


def raw_grads(world_rank: int, seed: int, layer: int, slots_per_rank: int) -> list[Tensor]:
    """The gradients rank ``world_rank`` produced in backward: ``[local_slots, *row_shape]`` per param."""
    gen = torch.Generator().manual_seed(10_000 * seed + 100 * world_rank + layer)
    return [torch.randn(slots_per_rank, *shape, generator=gen) for shape in PARAM_SHAPES]


def reference_sums(placement: ExpertPlacement, layer: int, world_size: int, seed: int,
                   none_param: tuple[int, int, int] | None = None) -> dict[int, list[Tensor]]:
    """``logical id -> [sum over every rank's replicas of its raw grad]`` (float64), plain loops.

    ``none_param = (world_rank, layer, param)`` marks a grad that was ``None`` (contributes zeros).
    """
    ep_size, slots_per_rank = placement.ep_size, placement.slots_per_rank
    sums = {e: [torch.zeros(shape, dtype=torch.float64) for shape in PARAM_SHAPES]
            for e in range(placement.num_logical_experts)}
    for world_rank in range(world_size):
        grads = raw_grads(world_rank, seed, layer, slots_per_rank)
        ep_rank = world_rank % ep_size
        for local_slot in range(slots_per_rank):
            logical_id = int(placement.physical_to_logical[layer, ep_rank * slots_per_rank + local_slot])
            for k, grad in enumerate(grads):
                if none_param != (world_rank, layer, k):
                    sums[logical_id][k] += grad[local_slot].double()
    return sums


def logical_weights(layer_idx: int, num_experts: int) -> list[Tensor]:
    """Initial weights by logical id: ``[E, *row_shape]`` per param."""
    gen = torch.Generator().manual_seed(layer_idx)
    return [torch.randn(num_experts, *shape, generator=gen) for shape in PARAM_SHAPES]


class ContractExperts(nn.Module):
    """A rank's stacked expert weights, as ``GroupedExperts`` exposes them; replicas start equal."""

    def __init__(self, placement: ExpertPlacement, layer_idx: int, ep_rank: int) -> None:
        super().__init__()
        logical_ids = placement.local_logical_ids(ep_rank)[layer_idx].tolist()
        by_logical = logical_weights(layer_idx, placement.num_logical_experts)
        self.fc1_weight = nn.Parameter(by_logical[0][logical_ids].clone())
        self.fc2_weight = nn.Parameter(by_logical[1][logical_ids].clone())


class ContractLayer(nn.Module):
    """The part of the ``MoELayer`` contract the sync reads: placement, layer_idx, groups, experts."""

    def __init__(self, placement: ExpertPlacement, layer_idx: int, groups: ParallelGroups) -> None:
        super().__init__()
        self.placement, self.layer_idx, self.groups = placement, layer_idx, groups
        self.experts = ContractExperts(placement, layer_idx, groups.ep_rank)


def gather(tensor: Tensor, groups: ParallelGroups) -> list[Tensor]:
    if groups.world_size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(groups.world_size)]
    dist.all_gather(out, tensor.contiguous())
    return out


def assert_replicas_identical(rows: Tensor, placement: ExpertPlacement, layer: int, groups: ParallelGroups,
                              what: str) -> None:
    """``rows [local_slots, row]`` of every world rank: all replicas of a logical expert bit-equal."""
    first: dict[int, Tensor] = {}
    for world_rank, rank_rows in enumerate(gather(rows, groups)):
        ep_rank = world_rank % groups.ep_size
        ids = placement.local_logical_ids(ep_rank)[layer].tolist()
        for local_slot, logical_id in enumerate(ids):
            ref = first.setdefault(logical_id, rank_rows[local_slot])
            assert torch.equal(ref, rank_rows[local_slot]), f"{what}: replicas of expert {logical_id} differ"


def expected_ep_rows(placement: ExpertPlacement, layer: int, ep_rank: int) -> int:
    """Rows this rank sends in both phases, counted by logical expert with sets."""
    slots = placement.slots_per_rank
    holders = {e: set() for e in range(placement.num_logical_experts)}
    for slot, e in enumerate(placement.physical_to_logical[layer].tolist()):
        holders[e].add(slot // slots)
    rows = 0
    for e, ranks in holders.items():
        owner = int(placement.owner_slot[layer, e]) // slots
        rows += int(ep_rank in ranks and ep_rank != owner)  # phase 1: my partial to the owner
        rows += len(ranks - {owner}) if ep_rank == owner else 0  # phase 2: result to the other holders
    return rows


# ---- rank functions ----------------------------------------------------------------------------------
def check_sync(groups: ParallelGroups) -> None:
    """All placements, three entry points (one ``ExpertGradSync`` per placement's layers)."""
    row_bytes = sum(math.prod(shape) for shape in PARAM_SHAPES) * 4
    scale = 1.0 / groups.world_size
    for seed, (name, placement) in enumerate(placements(groups.ep_size)):
        slots = placement.slots_per_rank
        moe = MoELayers([ContractLayer(placement, layer, groups) for layer in range(NUM_LAYERS)])
        sync = ExpertGradSync(moe)
        for entry in ("sync_layers", "sync_replica_grads", "ExpertGradSync"):
            grads = [raw_grads(groups.rank, seed, layer, slots) for layer in range(NUM_LAYERS)]
            if entry == "sync_layers":
                stats = sync_layers([LayerGrads(grads[lay], placement, lay) for lay in range(NUM_LAYERS)],
                                    groups, scale)
                layer_bytes = list(stats.layer_bytes)
            elif entry == "sync_replica_grads":
                layer_bytes = [sync_replica_grads(grads[lay], placement, lay, groups, scale)
                               for lay in range(NUM_LAYERS)]
            else:
                for layer, layer_grads in zip(moe.layers, grads):
                    layer.experts.fc1_weight.grad, layer.experts.fc2_weight.grad = layer_grads
                stats = sync()
                layer_bytes = list(stats.layer_bytes)
                grads = [[p.grad for p in layer.experts.parameters()] for layer in moe.layers]
            what = f"ep={groups.ep_size} edp={groups.edp_size} {name} {entry}"
            for layer in range(NUM_LAYERS):
                sums = reference_sums(placement, layer, groups.world_size, seed)
                ids = placement.local_logical_ids(groups.ep_rank)[layer].tolist()
                for local_slot, logical_id in enumerate(ids):
                    for k, grad in enumerate(grads[layer]):
                        torch.testing.assert_close(grad[local_slot].double(), sums[logical_id][k] * scale,
                                                   rtol=1e-5, atol=1e-6, msg=what)
                rows = torch.cat([g.reshape(slots, -1) for g in grads[layer]], dim=1)
                assert_replicas_identical(rows, placement, layer, groups, what)
                ep_rows = expected_ep_rows(placement, layer, groups.ep_rank)
                owned = int(placement.is_owner(groups.ep_rank)[layer].sum())
                edp = groups.edp_size
                edp_bytes = round(2 * (edp - 1) / edp * owned * row_bytes)
                assert layer_bytes[layer] == ep_rows * row_bytes + edp_bytes, what
                if name == "data":  # EP phases within a ring all-reduce of all expert grads
                    ep = groups.ep_size
                    ring = 2 * (ep - 1) / ep * placement.num_logical_experts * row_bytes
                    assert ep_rows * row_bytes <= ring, (what, ep_rows * row_bytes, ring)
                if name == "model":  # one replica per expert: no EP traffic
                    assert ep_rows == 0, what


def check_adamw(groups: ParallelGroups) -> None:
    """Two AdamW steps through one ``ExpertGradSync``, the placement switched in between (rows and moments
    migrated by logical id), a ``None`` grad on step 0: replicas stay identical and match a logical reference.
    """
    plans = [replicated_plan(groups.ep_size, seed=7), replicated_plan(groups.ep_size, seed=8)]
    model = nn.ModuleList(ContractLayer(plans[0], layer, groups) for layer in range(NUM_LAYERS))
    moe = MoELayers(model)
    reference = [[nn.Parameter(w) for w in logical_weights(layer, 4)] for layer in range(NUM_LAYERS)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    ref_optimizer = torch.optim.AdamW([p for ps in reference for p in ps], lr=0.1, weight_decay=0.1)
    sync = ExpertGradSync(moe)  # reused while the placement changes
    for step, placement in enumerate(plans):
        for layer in model:  # migrate (a no-op on step 0)
            ids = placement.local_logical_ids(groups.ep_rank)[layer.layer_idx]
            for param, ref in zip(layer.experts.parameters(), reference[layer.layer_idx]):
                param.data.copy_(ref.data[ids])
                for name, value in optimizer.state[param].items():
                    if name != "step":
                        value.copy_(ref_optimizer.state[ref][name][ids])
        moe.set_placement(placement)
        none_param = (0, 0, 1) if step == 0 else None  # rank 0, layer 0, fc2: no tokens -> grad None
        for layer in model:
            grads = raw_grads(groups.rank, 100 + step, layer.layer_idx, placement.slots_per_rank)
            for k, (param, grad) in enumerate(zip(layer.experts.parameters(), grads)):
                param.grad = None if none_param == (groups.rank, layer.layer_idx, k) else grad
        sync()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for layer in range(NUM_LAYERS):
            sums = reference_sums(placement, layer, groups.world_size, 100 + step, none_param)
            for k, param in enumerate(reference[layer]):
                param.grad = torch.stack([sums[e][k] for e in range(4)]).float() / groups.world_size
        ref_optimizer.step()
        for layer in model:
            ids = placement.local_logical_ids(groups.ep_rank)[layer.layer_idx]
            params = list(layer.experts.parameters())
            for param, ref in zip(params, reference[layer.layer_idx]):
                torch.testing.assert_close(param.data, ref.data[ids], rtol=1e-5, atol=1e-6)
            for name in ("param", "exp_avg", "exp_avg_sq"):
                values = [p.data if name == "param" else optimizer.state[p][name] for p in params]
                rows = torch.cat([v.reshape(placement.slots_per_rank, -1) for v in values], dim=1)
                assert_replicas_identical(rows, placement, layer.layer_idx, groups, f"step {step} {name}")


def _norm_run(placement: ExpertPlacement, groups: ParallelGroups, max_norm: float | None):
    """Same logical grads under ``placement``: expert ``e`` of layer ``l`` gets ``G[l, e]`` from one replica.

    Returns ``(norm, naive per-slot norm, layers, dense)`` after sync (and clipping if ``max_norm``).
    """
    layers = [ContractLayer(placement, layer, groups) for layer in range(NUM_LAYERS)]
    moe = MoELayers(layers)
    gen = torch.Generator().manual_seed(3)
    logical = [[torch.randn(4, *shape, generator=gen) for shape in PARAM_SHAPES] for _ in range(NUM_LAYERS)]
    dense = nn.Parameter(torch.zeros(5))
    dense.grad = torch.randn(5, generator=gen)  # already DP-averaged: identical on every rank
    for layer in layers:
        lay = layer.layer_idx
        ids = placement.local_logical_ids(groups.ep_rank)[lay].tolist()
        slots = placement.slots_per_rank
        for param, full in zip((layer.experts.fc1_weight, layer.experts.fc2_weight), logical[lay]):
            param.grad = torch.zeros_like(param)
            for local_slot, e in enumerate(ids):
                last_replica = int(placement.logical_to_physical[lay, e, placement.replica_count[lay, e] - 1])
                if groups.edp_rank == 0 and groups.ep_rank * slots + local_slot == last_replica:
                    param.grad[local_slot] = full[e] * groups.world_size
    ExpertGradSync(moe)()
    naive = torch.stack([p.grad.pow(2).sum() for layer in layers for p in layer.experts.parameters()]).sum()
    if groups.world_size > 1:
        dist.all_reduce(naive)
    if max_norm is None:
        return expert_grad_norm_sq(moe).sqrt(), naive, layers, dense, logical
    return clip_grad_norm_(moe, [dense], max_norm), naive, layers, dense, logical


def check_norm(groups: ParallelGroups) -> None:
    """Norm and clip coefficient do not change when experts gain replicas; clipping keeps replicas equal."""
    one_copy = ExpertPlacement.build("model", NUM_LAYERS, 4, groups.ep_size)
    many_copies = replicated_plan(groups.ep_size, seed=11)
    norm_a, naive_a, _, _, logical = _norm_run(one_copy, groups, None)
    norm_b, naive_b, _, _, _ = _norm_run(many_copies, groups, None)
    want = math.sqrt(sum(float(g.double().pow(2).sum()) for gs in logical for g in gs))
    assert naive_b > 1.01 * naive_a, "placements must differ in replica count for this test to mean anything"
    for norm in (norm_a, norm_b):
        assert math.isclose(float(norm), want, rel_tol=1e-6), (float(norm), want)
    for placement in (one_copy, many_copies):
        dense_grad = _norm_run(placement, groups, None)[3].grad.clone()
        want_total = math.sqrt(want**2 + float(dense_grad.double().pow(2).sum()))
        total, _, layers, dense, logical = _norm_run(placement, groups, max_norm=0.5 * want_total)
        assert math.isclose(float(total), want_total, rel_tol=1e-6), (float(total), want_total)
        coef = 0.5 * want_total / (want_total + 1e-6)
        torch.testing.assert_close(dense.grad, dense_grad * coef, rtol=1e-5, atol=1e-7)
        for layer in layers:
            ids = placement.local_logical_ids(groups.ep_rank)[layer.layer_idx]
            params = (layer.experts.fc1_weight, layer.experts.fc2_weight)
            for param, full in zip(params, logical[layer.layer_idx]):
                torch.testing.assert_close(param.grad, full[ids] * coef, rtol=1e-5, atol=1e-7)
            rows = torch.cat([p.grad.reshape(placement.slots_per_rank, -1) for p in params], dim=1)
            assert_replicas_identical(rows, placement, layer.layer_idx, groups, "after clipping")


def run_all(ep_sizes: tuple[int, ...]) -> None:
    for ep_size in ep_sizes:
        groups = build_groups(ep_size)
        check_sync(groups)
        check_adamw(groups)
        check_norm(groups)


# ---- tests -------------------------------------------------------------------------------------------------
def test_single_process_ep1():
    run_all_single = ParallelGroups.single()
    check_sync(run_all_single)
    check_adamw(run_all_single)
    check_norm(run_all_single)


def test_two_ranks_ep2_and_ep1_dp2():
    run_ranks(run_all, 2, (2, 1), timeout_s=120)


def test_four_ranks_ep4_and_ep2_dp2():
    run_ranks(run_all, 4, (4, 2), timeout_s=180)


def test_bad_inputs_raise_before_any_collective():
    groups = ParallelGroups.single()
    placement = ExpertPlacement.build("data", NUM_LAYERS, 4, 1)
    good = raw_grads(0, 0, 0, placement.slots_per_rank)
    with pytest.raises(ValueError, match="groups.ep_size"):
        sync_replica_grads(good, ExpertPlacement.build("data", NUM_LAYERS, 4, 2), 0, groups, 1.0)
    with pytest.raises(ValueError, match="layer_idx"):
        sync_replica_grads(good, placement, NUM_LAYERS, groups, 1.0)
    with pytest.raises(ValueError, match="local_slots=4"):
        sync_replica_grads([good[0][:3]], placement, 0, groups, 1.0)
    with pytest.raises(ValueError, match="grad_scale"):
        sync_replica_grads(good, placement, 0, groups, float("nan"))
    with pytest.raises(ValueError, match="dtype"):
        sync_replica_grads([good[0], good[1].double()], placement, 0, groups, 1.0)
    one_layer = ExpertPlacement.build("data", 1, 4, 1)
    layer = ContractLayer(one_layer, 0, groups)
    layer.experts.bias = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="experts.bias"):
        ExpertGradSync(MoELayers([layer]))()
    layer = ContractLayer(one_layer, 0, groups)
    with pytest.raises(ValueError, match="dense_params"):
        clip_grad_norm_(MoELayers([layer]), [layer.experts.fc1_weight], 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(MoELayers([layer]), [], 0.0)
