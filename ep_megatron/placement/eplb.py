"""Expert-parallel load balancer: plan where the physical expert slots of each MoE layer live.

A drop-in for DeepSeek's EPLB ``rebalance_experts`` (same arguments, outputs, shapes and dtypes) that
packs better and, given the current placement as ``previous``, moves as few expert copies as the
requested balance allows, which matters in training where a moved slot carries its optimizer state.

Shapes: ``L`` layers, ``E`` logical experts, ``P`` physical slots (``num_replicas``), ``G`` GPUs with
``P / G`` slots each, ``N`` nodes with ``G / N`` GPUs each, ``K`` expert groups of ``E / K`` experts.
Slot ``p`` lives on GPU ``p // (P / G)`` and GPU ``g`` on node ``g // (G / N)``.

The planner works on rows of independent sub-problems (a layer, or a layer's node in hierarchical
mode): ``n`` experts with loads ``w [B, n]``, ``m`` slots packed ``m / packs`` to a pack. Each replica
of expert ``e`` is an *item* of weight ``w[e] / count[e]``; ``pack`` maps items to packs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["balancedness", "gpu_loads", "moved_copies", "rebalance_experts"]


def rebalance_experts(
    weight: Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    previous: Tensor | None = None,
    balance_tolerance: float = 0.005,
    max_moved_fraction: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Plan a placement of ``num_replicas`` physical slots per layer from per-expert loads.

    Hierarchical (node-aware) mode is used when ``num_nodes > 1`` and ``num_groups % num_nodes == 0``:
    whole expert groups are packed onto nodes and every replica stays on its group's node. Otherwise
    the plan is global (DeepSeek's rule, so callers that pass ``num_groups=1`` keep working).

    Args:
        weight: ``[L, E]`` non-negative, finite load of each logical expert.
        num_replicas: ``P``, physical slots per layer; a multiple of ``num_gpus`` and ``>= E``.
        num_groups: ``K``, expert groups (consecutive experts); must divide ``E``.
        num_nodes: ``N``, nodes; must divide ``num_gpus``.
        num_gpus: ``G``, GPUs (expert-parallel ranks).
        previous: ``[L, P]`` current physical-to-logical map. When given, slots stay where they are
            unless moving them is needed to come within ``balance_tolerance`` of a fresh plan.
        balance_tolerance: relative increase of the maximum GPU load over that of a fresh plan that
            is accepted to save moves (0.005 costs at most ~0.005 balancedness).
        max_moved_fraction: hard cap, per layer, on moved copies (see :func:`moved_copies`) as a
            fraction of ``P``; moves forced by changed groups or missing experts are not capped.

    Returns:
        ``phy2log [L, P]`` logical expert of each slot, ``log2phy [L, E, X]`` the slots of each expert
        in ascending order padded with -1 (``X`` = most replicas of any expert), and ``logcnt [L, E]``
        replicas per expert; all int64 on the CPU.
    """
    _check(weight, num_replicas, num_groups, num_nodes, num_gpus, previous, balance_tolerance,
           max_moved_fraction)
    weight = weight.detach().to("cpu", torch.float32)
    num_layers, num_experts = weight.shape
    if previous is not None:
        previous = previous.detach().to("cpu", torch.int64)
    nodes = num_nodes if num_nodes > 1 and num_groups % num_nodes == 0 else 1
    budget = torch.full((num_layers,), max_moved_fraction * num_replicas, dtype=torch.float32)

    # Pack groups onto nodes; experts are then renumbered node by node ("node-local" ids).
    if nodes == 1:
        group_node = torch.zeros(num_layers, 1, dtype=torch.int64)
    else:
        group_node, spent = _assign_groups(weight.unflatten(1, (num_groups, -1)).sum(-1), nodes, previous,
                                           num_experts // num_groups, balance_tolerance, budget)
        budget = (budget - spent).clamp(min=0)  # what moving groups between nodes left
    expert_node = group_node.repeat_interleave(num_experts // group_node.shape[1], dim=1)
    local2log = expert_node.argsort(dim=1, stable=True)  # [L, E]: experts sorted by node, then id
    log2local = local2log.argsort(1)
    per_node, slots_per_node = num_experts // nodes, num_replicas // nodes

    prev_local = None
    if previous is not None:
        slot_node = torch.arange(num_replicas) // slots_per_node
        on_node = expert_node.gather(1, previous) == slot_node
        prev_local = torch.where(on_node, log2local.gather(1, previous) % per_node, -1)
        prev_local = prev_local.view(-1, slots_per_node)
    local = _plan(weight.gather(1, local2log).view(-1, per_node), slots_per_node, num_gpus // nodes,
                  prev_local, balance_tolerance, (budget / nodes).repeat_interleave(nodes), nodes)
    offset = torch.arange(nodes).repeat_interleave(slots_per_node) * per_node
    phy2log = local2log.gather(1, local.view(num_layers, -1) + offset)
    logcnt = _counts(phy2log, num_experts)
    return phy2log, _log2phy(phy2log, logcnt), logcnt


def gpu_loads(phy2log: Tensor, weight: Tensor, num_gpus: int) -> Tensor:
    """``[L, G]`` load per GPU: each slot carries its expert's load divided by the expert's replicas."""
    if phy2log.dim() != 2 or weight.dim() != 2 or phy2log.shape[0] != weight.shape[0]:
        raise ValueError(f"phy2log [L, P] and weight [L, E] disagree: {tuple(phy2log.shape)}, "
                         f"{tuple(weight.shape)}")
    if num_gpus < 1 or phy2log.shape[1] % num_gpus:
        raise ValueError(f"num_gpus={num_gpus} must divide the {phy2log.shape[1]} slots")
    phy2log, weight = phy2log.cpu().long(), weight.detach().cpu().double()
    per_slot = (weight / _counts(phy2log, weight.shape[1]).clamp(min=1)).gather(1, phy2log)
    return per_slot.view(phy2log.shape[0], num_gpus, -1).sum(-1)


def layer_balancedness(phy2log: Tensor, weight: Tensor, num_gpus: int) -> Tensor:
    """``[L]`` float64 mean GPU load / max GPU load per layer; a layer without load counts 1."""
    loads = gpu_loads(phy2log, weight, num_gpus)
    peak = loads.max(1).values
    return torch.where(peak > 0, loads.mean(1) / peak.clamp(min=1e-300), 1.0)


def balancedness(phy2log: Tensor, weight: Tensor, num_gpus: int) -> float:
    """Mean over layers of (mean GPU load / max GPU load); 1.0 is perfect, layers without load count 1."""
    return layer_balancedness(phy2log, weight, num_gpus).mean().item()


def moved_copies(old_phy2log: Tensor, new_phy2log: Tensor, num_gpus: int) -> float:
    """Fraction of all ``L * P`` slots that need a copy of an expert its GPU did not hold before.

    Counts pairs (layer, GPU, expert) present in ``new_phy2log [L, P]`` but not in ``old_phy2log``.
    """
    if old_phy2log.shape != new_phy2log.shape or old_phy2log.dim() != 2:
        raise ValueError(f"old_phy2log and new_phy2log must both be [L, P]: {tuple(old_phy2log.shape)}, "
                         f"{tuple(new_phy2log.shape)}")
    if num_gpus < 1 or old_phy2log.shape[1] % num_gpus:
        raise ValueError(f"num_gpus={num_gpus} must divide the {old_phy2log.shape[1]} slots")
    old, new = old_phy2log.cpu().long(), new_phy2log.cpu().long()
    num_experts = int(max(old.max(), new.max())) + 1
    moved = _presence(new, num_gpus, num_experts) & ~_presence(old, num_gpus, num_experts)
    return moved.sum().item() / new.numel()


# ----------------------------------------------------------------------------------------------------
# Validation and small helpers


def _check(weight: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
           previous: Tensor | None, balance_tolerance: float, max_moved_fraction: float) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty [num_layers, num_experts] tensor, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise ValueError(f"weight must be real-valued, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("weight must be finite and non-negative (found NaN, inf or a negative load)")
    num_layers, num_experts = weight.shape
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas={num_replicas} must be >= the number of experts {num_experts}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of experts {num_experts}")
    if not (math.isfinite(balance_tolerance) and balance_tolerance >= 0):
        raise ValueError(f"balance_tolerance must be finite and >= 0, got {balance_tolerance}")
    if not 0 <= max_moved_fraction <= 1:
        raise ValueError(f"max_moved_fraction must lie in [0, 1], got {max_moved_fraction}")
    if previous is not None:
        if not isinstance(previous, Tensor) or tuple(previous.shape) != (num_layers, num_replicas):
            raise ValueError(f"previous must be [{num_layers}, {num_replicas}], got "
                             f"{getattr(previous, 'shape', type(previous))}")
        if previous.is_floating_point() or previous.is_complex() or previous.dtype == torch.bool:
            raise ValueError(f"previous must hold integer expert ids, got {previous.dtype}")
        if bool((previous < 0).any()) or bool((previous >= num_experts).any()):
            raise ValueError(f"previous must hold expert ids in [0, {num_experts})")


def _counts(ids: Tensor, num_ids: int) -> Tensor:
    """``[B, num_ids]`` occurrences of each id in each row of ``ids [B, m]`` (entries < 0 ignored)."""
    counts = torch.zeros(ids.shape[0], num_ids + 1, dtype=torch.int64)
    return counts.scatter_add_(1, ids.where(ids >= 0, num_ids), torch.ones_like(ids))[:, :num_ids]


def _presence(ids: Tensor, num_packs: int, num_ids: int) -> Tensor:
    """``[B, packs, num_ids]`` whether each pack of ``ids [B, m]`` (consecutive blocks) holds each id."""
    blocks = ids.reshape(-1, ids.shape[1] // num_packs)
    return (_counts(blocks, num_ids) > 0).view(ids.shape[0], num_packs, num_ids)


def _segment_rank(sorted_keys: Tensor) -> Tensor:
    """For ``sorted_keys [B, m]`` sorted along dim 1: the position of each entry within its run."""
    index = torch.arange(sorted_keys.shape[1]).expand_as(sorted_keys)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    return index - torch.where(starts, index, 0).cummax(1).values


def _log2phy(phy2log: Tensor, logcnt: Tensor) -> Tensor:
    """``[L, E, X]`` slots of each expert in ascending order, padded with -1."""
    num_layers, num_experts = logcnt.shape
    width = int(logcnt.max())
    order = phy2log.argsort(dim=1, stable=True)
    experts = phy2log.gather(1, order)
    out = torch.full((num_layers, num_experts * width), -1, dtype=torch.int64)
    out.scatter_(1, experts * width + _segment_rank(experts), order)
    return out.view(num_layers, num_experts, width)


# ----------------------------------------------------------------------------------------------------
# Replica counts and packing, batched over rows


def _replica_counts(w: Tensor, num_slots: int, num_packs: int, old: Tensor | None = None,
                    tolerance: float = 0.0) -> Tensor:
    """``[B, n]`` replicas per expert minimising the largest per-replica load (D'Hondt apportionment).

    Each of the ``num_slots - n`` extra replicas goes to the expert with the largest load per replica
    (ties: fewer replicas, then lower id), but no expert gets more replicas than there are packs (a
    second replica in one pack lowers no pack's load) unless the slots demand it. With ``old [B, n]``
    counts, an expert still below its old count gets a ``1 + tolerance`` bonus (hysteresis).
    """
    counts = torch.ones_like(w, dtype=torch.int64)
    cap = max(num_packs, -(-num_slots // w.shape[1]))
    for _ in range(num_slots - w.shape[1]):
        worth = w / counts
        if old is not None:
            worth = torch.where(counts < old, worth * (1 + tolerance), worth)
        worth = worth.masked_fill(counts >= cap, -1.0)
        tied = worth == worth.max(1, keepdim=True).values
        counts[torch.arange(w.shape[0]), counts.masked_fill(~tied, num_slots).argmin(1)] += 1
    return counts


def _items(counts: Tensor) -> Tensor:
    """``[B, m]`` expert of each item: expert ``e`` repeated ``counts[:, e]`` times, in expert order."""
    num_rows, n = counts.shape
    return torch.arange(n).repeat(num_rows).repeat_interleave(counts.flatten()).view(num_rows, -1)


def _pack_loads(item_w: Tensor, pack: Tensor, num_packs: int) -> Tensor:
    """``[B, packs]`` summed weight of the items ``item_w [B, m]`` in each pack (``pack [B, m]``)."""
    return torch.zeros(item_w.shape[0], num_packs, dtype=item_w.dtype).scatter_add_(1, pack, item_w)


def _pack_fresh(item_w: Tensor, num_packs: int) -> Tensor:
    """``[B, m]`` pack of each item, ``m / num_packs`` per pack: rounds of the ``num_packs`` largest
    remaining items, the largest to the lightest pack; then :func:`_swap_search` until the heaviest
    pack is within 1e-3 of the lower bound (mean pack load, largest item) or cannot be lowered."""
    num_rows, m = item_w.shape
    order = item_w.argsort(dim=1, descending=True, stable=True).view(num_rows, -1, num_packs)
    pack = torch.empty(num_rows, m, dtype=torch.int64)
    loads = torch.zeros(num_rows, num_packs, dtype=item_w.dtype)
    for items in order.unbind(1):
        lightest = loads.argsort(dim=1, stable=True)
        pack.scatter_(1, items, lightest)
        loads.scatter_add_(1, lightest, item_w.gather(1, items))
    bound = torch.maximum(item_w.sum(1) / num_packs, item_w.max(1).values) * (1 + 1e-3)
    return _swap_search(item_w, pack, num_packs, bound)


def _swap_search(item_w: Tensor, pack: Tensor, num_packs: int, target: Tensor, cost: Tensor | None = None,
                 budget: Tensor | None = None) -> Tensor:
    """Swap items between packs until each row's heaviest pack is ``<= target [B]`` or cannot be lowered.

    Free of cost, rounds first pair the k-th heaviest pack with the k-th lightest and swap in all pairs
    at once. Then the heaviest pack alone tries every item of the lighter half of the packs; with ``cost
    [B, m, packs]`` (moves charged for item ``i`` sitting in pack ``h``) see :func:`_best_swaps` for the
    choice, and no row spends more than ``budget [B]``.
    """
    num_rows, m = item_w.shape
    per_pack, half = m // num_packs, num_packs // 2
    pack = pack.clone()
    for _ in range(num_packs if cost is None and half else 0):
        loads = _pack_loads(item_w, pack, num_packs)
        by_load = loads.argsort(dim=1, descending=True, stable=True)
        heavy, light = by_load[:, :half], by_load[:, num_packs - half:].flip(1)  # [B, H] paired packs
        members = pack.argsort(dim=1, stable=True).view(num_rows, num_packs, per_pack)
        score, i, j, _ = _best_swaps(item_w, pack, loads, heavy,
                                     members.gather(1, heavy[:, :, None].expand(-1, -1, per_pack)),
                                     members.gather(1, light[:, :, None].expand(-1, -1, per_pack)), target)
        swap = (score > -math.inf) & (loads.gather(1, heavy) > target[:, None])
        if not bool(swap.any()):
            break
        to_light = pack.gather(1, j)
        pack.scatter_(1, i, torch.where(swap, to_light, pack.gather(1, i)))
        pack.scatter_(1, j, torch.where(swap, heavy, to_light))

    left = None if budget is None else budget.clone()
    done = torch.zeros(num_rows, dtype=torch.bool)
    for _ in range(2 * m if half else 0):
        loads = _pack_loads(item_w, pack, num_packs)
        peak, top = loads.max(1)
        rows = (~done & (peak > target)).nonzero()[:, 0]
        if rows.numel() == 0:
            break
        here, top_r = pack[rows], top[rows]
        own = (here == top_r[:, None]).nonzero()[:, 1].view(-1, per_pack)  # [r, S] items of the top pack
        light = loads[rows].topk(num_packs - half, 1, largest=False).indices
        light = torch.zeros(rows.numel(), num_packs, dtype=torch.bool).scatter_(1, light, True)
        partners = light.gather(1, here).nonzero()[:, 1].view(rows.numel(), -1)  # [r, Q] items of light packs
        delta = left_r = None
        if cost is not None:  # moves charged by swapping own item i with item j: i to j's pack, j to top
            row = rows[:, None]
            cost_own = cost[row, own]  # [r, S, packs]
            partner_pack = here.gather(1, partners)
            delta = (cost_own.gather(2, partner_pack[:, None, :].expand(-1, per_pack, -1))
                     - cost_own.gather(2, top_r[:, None, None].expand(-1, per_pack, 1))
                     + (cost[row, partners, top_r[:, None]] - cost[row, partners, partner_pack])[:, None, :])
            delta, left_r = delta[:, None], left[rows]
        score, i, j, spent = _best_swaps(item_w[rows], here, loads[rows], top_r[:, None], own[:, None],
                                         partners[:, None], target[rows], delta, left_r)
        found = score[:, 0] > -math.inf
        done[rows[~found]] = True
        rows, i, j = rows[found], i[found, 0], j[found, 0]
        pack[rows, i] = pack[rows, j]
        pack[rows, j] = top[rows]
        if left is not None:
            left[rows] -= spent[found, 0]
    return pack


def _best_swaps(item_w: Tensor, pack: Tensor, loads: Tensor, heavy: Tensor, own: Tensor, partners: Tensor,
                target: Tensor, delta: Tensor | None = None, left: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best swap of an item of pack ``heavy [r, H]`` (its items ``own [r, H, S]``) with one of
    ``partners [r, H, Q]`` (items of other packs) that lowers the heavier of the two packs.

    Without ``delta``: the swap leaving the pair's heavier pack lightest. With ``delta [r, H, S, Q]``
    (moves each swap costs): swaps costing no move first (most load shed), then the most load shed per
    move, never more than ``left [r]`` moves; load shed below ``target [r]`` does not count. Returns
    ``(score, i, j, spent)``, each ``[r, H]``: score ``-inf`` where no swap helps, the items ``i`` (from
    ``own``) and ``j`` to swap, and the moves they cost.
    """
    w_own = item_w.gather(1, own.flatten(1)).view_as(own)
    w_partner = item_w.gather(1, partners.flatten(1)).view_as(partners)
    pack_partner = pack.gather(1, partners.flatten(1)).view_as(partners)  # [r, H, Q]
    peak = loads.gather(1, heavy)[:, :, None, None]
    shift = w_own[..., :, None] - w_partner[..., None, :]  # [r, H, S, Q]
    load_partner = loads.gather(1, pack_partner.flatten(1)).view_as(pack_partner)
    pair = torch.maximum(peak - shift, load_partner[..., None, :] + shift)
    ok = (pair < peak * (1 - 1e-6)) & (pack_partner != heavy[:, :, None])[..., None, :]
    if delta is None:
        score, delta = -pair, torch.zeros_like(pair)
    else:
        ok &= delta <= left[:, None, None, None] + 1e-9
        shed = peak - torch.maximum(pair, target[:, None, None, None])
        score = torch.where(delta <= 0, shed + peak + 1, shed / delta.clamp(min=1))
    best, flat = score.masked_fill(~ok, -math.inf).flatten(2).max(2)
    num_partners = partners.shape[2]
    i = own.gather(2, (flat // num_partners)[..., None]).squeeze(2)
    j = partners.gather(2, (flat % num_partners)[..., None]).squeeze(2)
    return best, i, j, delta.flatten(2).gather(2, flat[..., None]).squeeze(2)


def _charge(cost: Tensor, pack: Tensor) -> Tensor:
    """``[B]`` total charge of the assignment ``pack [B, m]`` under ``cost [B, m, packs]``."""
    return cost.gather(2, pack[:, :, None]).sum((1, 2))


def _match_labels(overlap: Tensor) -> Tensor:
    """Greedy relabelling ``[B, k]`` of new packs to old packs maximising ``overlap [B, new, old]``."""
    num_rows, k, _ = overlap.shape
    overlap = overlap.clone().float()
    label = torch.empty(num_rows, k, dtype=torch.int64)
    rows = torch.arange(num_rows)
    for _ in range(k):
        flat = overlap.flatten(1).argmax(1)
        new, old = flat // k, flat % k
        label[rows, new] = old
        overlap[rows, new, :] = -1
        overlap[rows, :, old] = -1
    return label


# ----------------------------------------------------------------------------------------------------
# Groups to nodes (hierarchical mode)


def _assign_groups(group_load: Tensor, num_nodes: int, previous: Tensor | None, group_size: int,
                   tolerance: float, budget: Tensor) -> tuple[Tensor, Tensor]:
    """``[L, K]`` node of each group, ``K / N`` groups per node, from ``group_load [L, K]``, and the moves
    ``[L]`` this costs (a group's slots in ``previous [L, P]`` that are not on its new node).

    With ``previous``, groups stay on the node holding most of their slots unless the maximum node load
    is then not within ``tolerance`` of a fresh assignment's (and moving fits ``budget [L]``).
    """
    num_layers, num_groups = group_load.shape
    fresh = _pack_fresh(group_load, num_nodes)
    if previous is None:
        return fresh, torch.zeros(num_layers)
    slot_node = torch.arange(previous.shape[1]) // (previous.shape[1] // num_nodes)
    overlap = torch.zeros(num_layers, num_groups * num_nodes, dtype=torch.float32)
    overlap = overlap.scatter_add_(1, previous // group_size * num_nodes + slot_node,
                                   torch.ones_like(previous, dtype=torch.float32))
    overlap = overlap.view(num_layers, num_groups, num_nodes)  # [L, K, N] slots of group k on node n
    cost = overlap.sum(2, keepdim=True) - overlap
    fresh_on = torch.nn.functional.one_hot(fresh, num_nodes).float()  # [L, K, N]
    fresh = _match_labels(fresh_on.transpose(1, 2) @ overlap).gather(1, fresh)
    stay = overlap.argmax(2)
    stay_valid = (_counts(stay, num_nodes) == num_groups // num_nodes).all(1, keepdim=True)
    start = torch.where(stay_valid, stay, fresh)
    target = _pack_loads(group_load, fresh, num_nodes).max(1).values * (1 + tolerance)
    kept = _swap_search(group_load, start, num_nodes, target, cost,
                        (budget - _charge(cost, start)).clamp(min=0))
    missed = _pack_loads(group_load, kept, num_nodes).max(1).values > target
    use_fresh = missed & (_charge(cost, fresh) <= budget)
    chosen = torch.where(use_fresh[:, None], fresh, kept)
    return chosen, _charge(cost, chosen)


# ----------------------------------------------------------------------------------------------------
# One row = one sub-problem (a layer, or a layer's node)


def _plan(w: Tensor, num_slots: int, num_packs: int, previous: Tensor | None, tolerance: float,
          budget: Tensor, rows_per_layer: int) -> Tensor:
    """``[B, m]`` expert of each slot for loads ``w [B, n]``; ``previous [B, m]`` uses -1 for slots whose
    expert no longer belongs to this row (forced moves); ``budget [B]`` caps the other moves.

    With ``previous``, the plan is repaired (:func:`_repair`) towards a target: ``1 + tolerance`` times
    the layer's heaviest GPU in a fresh plan (consecutive ``rows_per_layer`` rows are one layer's nodes,
    so lightly loaded nodes keep their slots). The repair first keeps the old replica counts (rows with
    foreign slots: D'Hondt counts with hysteresis), then rows that miss the target retry with the fresh
    plan's counts; rows that still miss take the fresh plan, its GPUs renumbered to overlap
    ``previous`` most, if that fits the budget.
    """
    fresh = _fresh(w, num_slots, num_packs, rows_per_layer)
    if previous is None:
        return fresh
    n = w.shape[1]
    fresh = _align(fresh, previous, num_packs, relabel=True)
    peak = _slot_loads(fresh, w, num_packs).max(1).values.view(-1, rows_per_layer).amax(1)
    target = peak.repeat_interleave(rows_per_layer) * (1 + tolerance)

    old_counts = _counts(previous, n)
    whole = (previous >= 0).all(1, keepdim=True) & (old_counts > 0).all(1, keepdim=True)
    first = torch.where(whole, old_counts, _replica_counts(w, num_slots, num_packs, old_counts, tolerance))
    old_has = _presence(previous, num_packs, n)
    allowed = budget + (previous < 0).sum(1)  # a slot whose expert left the row must move anyway
    plan = _repair(w, first, previous, num_packs, target, budget)
    peak = _slot_loads(plan, w, num_packs).max(1).values
    moves = (_presence(plan, num_packs, n) & ~old_has).sum((1, 2))
    rows = (peak > target).nonzero()[:, 0]
    if rows.numel():  # retry with the fresh plan's counts; keep it if it fits the budget and is better
        counts = _counts(fresh[rows], n)
        retry = _repair(w[rows], counts, previous[rows], num_packs, target[rows], budget[rows])
        retry_peak = _slot_loads(retry, w[rows], num_packs).max(1).values
        retry_moves = (_presence(retry, num_packs, n) & ~old_has[rows]).sum((1, 2))
        fits, fitted = retry_moves <= allowed[rows], moves[rows] <= allowed[rows]
        better = torch.where(fits & fitted, retry_peak < peak[rows], fits | (retry_moves < moves[rows]))
        rows = rows[better]
        plan[rows], peak[rows] = retry[better], retry_peak[better]
    use_fresh = (peak > target) & ((_presence(fresh, num_packs, n) & ~old_has).sum((1, 2)) <= allowed)
    return torch.where(use_fresh[:, None], fresh, plan)


def _repair(w: Tensor, counts: Tensor, previous: Tensor, num_packs: int, target: Tensor,
            budget: Tensor) -> Tensor:
    """``[B, m]`` slots holding ``counts [B, n]`` replicas, close to ``previous [B, m]``: kept replicas stay
    (:func:`_keep_and_fill`), then swaps (:func:`_swap_search`) until the peak is ``<= target [B]``,
    charging one move per replica on a GPU that did not hold its expert, at most ``budget [B]``."""
    items = _items(counts)
    item_w = (w / counts).gather(1, items)
    start = _keep_and_fill(previous, items, w / counts, num_packs)
    old_has = _presence(previous, num_packs, w.shape[1])
    cost = (~old_has).float().transpose(1, 2).gather(1, items[:, :, None].expand(-1, -1, num_packs))
    pack = _swap_search(item_w, start, num_packs, target, cost, (budget - _charge(cost, start)).clamp(min=0))
    return _align(_slots(items, pack), previous, num_packs, relabel=False)


def _fresh(w: Tensor, num_slots: int, num_packs: int, rows_per_layer: int, rounds: int = 8) -> Tensor:
    """``[B, m]`` slots of a plan from scratch: :func:`_replica_counts` packed by :func:`_pack_fresh`.

    A row holding its layer's heaviest pack (rows of a layer are consecutive), if that pack is above
    the row's mean, then tries for up to ``rounds`` rounds to move one replica from one of the 3 experts
    that need it least to one of the 2 largest experts in the heaviest pack (big items that must share
    a pack are what D'Hondt counts ignore), keeping the change that lowers the peak most.
    """
    num_rows, n = w.shape
    counts = _replica_counts(w, num_slots, num_packs)
    slots, peak = _pack_counts(w, counts, num_packs)
    cap = max(num_packs, -(-num_slots // n))
    above = w.sum(1) / num_packs * (1 + 1e-3)
    done = torch.zeros(num_rows, dtype=torch.bool)
    grow_k, shrink_k = min(2, n), min(3, n)
    for _ in range(rounds if n > 1 else 0):
        layer_peak = peak.view(-1, rows_per_layer).amax(1).repeat_interleave(rows_per_layer)
        rows = (~done & (peak >= layer_peak) & (peak > above)).nonzero()[:, 0]
        if rows.numel() == 0:
            break
        count, load = counts[rows], w[rows]
        top = _slot_loads(slots[rows], load, num_packs).argmax(1)
        in_top = slots[rows].view(rows.numel(), num_packs, -1)[torch.arange(rows.numel()), top]  # [r, S]
        present = torch.zeros_like(count, dtype=torch.bool).scatter_(1, in_top, True)
        worth = (load / count).masked_fill(~present | (count >= cap), -1.0).topk(grow_k, 1)
        need = (load / (count - 1).clamp(min=1)).masked_fill(count < 2, math.inf)
        need = need.topk(shrink_k, 1, largest=False)
        grow = worth.indices[:, :, None].expand(-1, -1, shrink_k).flatten(1)  # [r, C] candidate pairs
        shrink = need.indices[:, None, :].expand(-1, grow_k, -1).flatten(1)
        valid = (worth.values[:, :, None] >= 0) & (need.values[:, None, :] < math.inf)
        valid = valid.flatten(1) & (grow != shrink)
        tried = count.repeat_interleave(grow.shape[1], 0)
        tried.scatter_add_(1, grow.reshape(-1, 1), valid.reshape(-1, 1).long())
        tried.scatter_add_(1, shrink.reshape(-1, 1), -valid.reshape(-1, 1).long())
        new_slots, new_peak = _pack_counts(load.repeat_interleave(grow.shape[1], 0), tried, num_packs)
        best_peak, best = new_peak.view(rows.numel(), -1).masked_fill(~valid, math.inf).min(1)
        better = best_peak < peak[rows] * (1 - 1e-6)
        done[rows[~better]] = True
        pick = (torch.arange(rows.numel()) * grow.shape[1] + best)[better]
        rows = rows[better]
        counts[rows], slots[rows], peak[rows] = tried[pick], new_slots[pick], new_peak[pick]
    return slots


def _pack_counts(w: Tensor, counts: Tensor, num_packs: int) -> tuple[Tensor, Tensor]:
    """Slots ``[B, m]`` and heaviest pack load ``[B]`` of replicas ``counts [B, n]`` packed afresh."""
    items = _items(counts)
    item_w = (w / counts).gather(1, items)
    pack = _pack_fresh(item_w, num_packs)
    return _slots(items, pack), _pack_loads(item_w, pack, num_packs).max(1).values


def _keep_and_fill(previous: Tensor, items: Tensor, replica_w: Tensor, num_packs: int) -> Tensor:
    """``[B, m]`` pack of each item (``items [B, m]`` from :func:`_items`, ``replica_w [B, n]`` load per
    replica): replicas already placed keep their pack (when an expert loses replicas, duplicates in a
    pack and copies in heavy packs go first); the others go, largest first, to the lightest pack with
    a free slot."""
    num_rows, m = previous.shape
    n = replica_w.shape[1]
    per_pack = m // num_packs
    slot_pack = (torch.arange(m) // per_pack).expand(num_rows, m)
    expert = previous.where(previous >= 0, n)  # foreign slots sort last and are never kept
    counts = _counts(items, n + 1)
    slot_w = torch.nn.functional.pad(replica_w, (0, 1)).gather(1, expert)
    pack_load = slot_w.view(num_rows, num_packs, per_pack).sum(-1).gather(1, slot_pack)
    by_pack = (slot_pack * (n + 1) + expert).argsort(dim=1, stable=True)
    dup = torch.empty_like(expert).scatter_(1, by_pack, _segment_rank(expert.gather(1, by_pack)))
    order = pack_load.argsort(dim=1, stable=True)
    for key in (dup, expert):  # lexicographic: expert, then duplicate rank, then pack load
        order = order.gather(1, key.gather(1, order).argsort(dim=1, stable=True))
    sorted_expert = expert.gather(1, order)
    rank = _segment_rank(sorted_expert)
    kept = rank < counts.gather(1, sorted_expert)
    first_item = (counts.cumsum(1) - counts).gather(1, sorted_expert)
    pack = torch.full((num_rows, m + 1), -1, dtype=torch.int64)
    target = torch.where(kept, first_item + rank, m)
    pack.scatter_(1, target, torch.where(kept, slot_pack.gather(1, order), -1))
    pack = pack[:, :m]

    needed = pack < 0
    item_w = replica_w.gather(1, items)
    loads = _pack_loads(torch.where(needed, 0.0, item_w), pack.clamp(min=0), num_packs)  # kept items
    free = per_pack - _counts(pack, num_packs)
    order = torch.where(needed, item_w, -1.0).argsort(dim=1, descending=True, stable=True)
    num_needed = needed.sum(1)
    for k in range(int(num_needed.max())):
        rows = (num_needed > k).nonzero()[:, 0]
        item = order[rows, k]
        choice = loads[rows].masked_fill(free[rows] == 0, math.inf).argmin(1)
        pack[rows, item] = choice
        loads[rows, choice] += item_w[rows, item]
        free[rows, choice] -= 1
    return pack


def _slots(items: Tensor, pack: Tensor) -> Tensor:
    """``[B, m]`` slot contents: the items of pack 0, then of pack 1, ... (``pack [B, m]``)."""
    return items.gather(1, pack.argsort(dim=1, stable=True))


def _slot_loads(slots: Tensor, w: Tensor, num_packs: int) -> Tensor:
    """``[B, packs]`` load of each pack of ``slots [B, m]`` under expert loads ``w [B, n]``."""
    per_slot = (w / _counts(slots, w.shape[1]).clamp(min=1)).gather(1, slots)
    return per_slot.view(slots.shape[0], num_packs, -1).sum(-1)


def _align(slots: Tensor, previous: Tensor, num_packs: int, relabel: bool) -> Tensor:
    """Reorder ``slots [B, m]`` so it overlaps ``previous [B, m]`` most: with ``relabel``, renumber
    packs (greedy maximum overlap); then inside each pack put experts it held at their old position."""
    num_rows, m = slots.shape
    per_pack = m // num_packs
    new = slots.view(num_rows, num_packs, per_pack)
    old = previous.view(num_rows, num_packs, per_pack)
    if relabel:
        n = int(max(slots.max(), previous.max())) + 1
        overlap = (_presence(slots, num_packs, n).float()
                   @ _presence(previous, num_packs, n).float().transpose(1, 2))
        label = _match_labels(overlap)[:, :, None].expand(-1, -1, per_pack)
        new = torch.empty_like(new).scatter_(1, label, new)
    same = new[..., :, None] == old[..., None, :]  # [B, packs, new position, old position]
    position = torch.full_like(new, -1)
    index = torch.arange(per_pack)
    for k in range(per_pack):
        candidate = same[..., k] & (position < 0)
        first = candidate.int().argmax(-1, keepdim=True)
        position = torch.where(candidate.any(-1, keepdim=True) & (index == first), k, position)
    used = (position[..., :, None] == index).any(-2)
    free = used.int().argsort(dim=-1, stable=True)  # unused positions first, ascending
    rest = free.gather(-1, ((position < 0).cumsum(-1) - 1).clamp(min=0))
    position = torch.where(position < 0, rest, position)
    return torch.empty_like(new).scatter_(-1, position, new).view(num_rows, m)
