"""Expert-parallel load balancer: plan which logical expert each physical slot of every MoE layer holds.

A positional drop-in for DeepSeek's EPLB ``rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_gpus)`` (same argument order, outputs, shapes and dtypes) that packs better and, given the current
placement as ``previous``, moves as few expert copies as the requested balance allows, which matters in
training where a moved slot carries its optimizer state.

Naming (DeepSeek's name -> ours): ``num_replicas`` -> ``num_slots`` (``P``, physical slots per layer,
all ranks together), ``num_gpus`` -> ``ep_size`` (``G``, expert-parallel ranks; a "GPU" in DeepSeek's
code is one EP rank). ``L`` layers, ``E`` logical experts, ``N`` nodes with ``G / N`` ranks each, ``K``
expert groups of ``E / K`` consecutive experts. Slot ``p`` lives on rank ``p // (P / G)`` and rank ``r``
on node ``r // (G / N)``.

The planner works on rows of independent sub-problems (a layer, or a layer's node in hierarchical mode):
``n`` experts with loads ``w [B, n]``, ``m`` slots packed ``m / packs`` to a pack (a rank). Each replica
of expert ``e`` is an *item* of weight ``w[e] / count[e]``; ``pack [B, m]`` maps items to packs. Every
step is a numpy operation over all rows at once; Python loops run over rounds (of packing, of swaps,
of refinement), never over layers, so the cost grows linearly with the number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["balancedness", "layer_balancedness", "moved_copies", "rank_loads", "rebalance_experts"]

_MASK32 = 0xFFFFFFFF
_SMALL_SORT = 4096  # below this many elements numpy's stable argsort beats sorting packed keys
_SWAP_WORK = 4096  # candidate (own item, partner item) pairs per row and swap round, over all heavy packs
_PAIRS_FROM = 16  # packs from which two-per-pack rows are repaired by re-pairing (see _plan)
_MAX_HEAVY = 32  # packs per row that look for a swap partner in the same round

# A move-cost table: (rows, items, packs) index arrays (broadcastable) -> moves charged for each item
# sitting in each pack.
Cost = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def rebalance_experts(
    weight: Tensor,
    num_slots: int,
    num_groups: int,
    num_nodes: int,
    ep_size: int,
    *,
    previous: Tensor | None = None,
    balance_tolerance: float = 0.005,
    max_moved_fraction: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Plan a placement of ``num_slots`` physical slots per layer from per-expert loads.

    Positionally the same call as DeepSeek's ``rebalance_experts(weight, num_replicas, num_groups,
    num_nodes, num_gpus)``: ``num_replicas`` is our ``num_slots`` and ``num_gpus`` our ``ep_size``.
    Hierarchical (node-aware) mode is used when ``num_nodes > 1`` and ``num_groups % num_nodes == 0``:
    whole expert groups are packed onto nodes and every replica stays on its group's node. Otherwise
    the plan is global (DeepSeek's rule, so callers that pass ``num_groups=1`` keep working).

    Args:
        weight: ``[L, E]`` non-negative, finite load of each logical expert.
        num_slots: ``P``, physical slots per layer over all EP ranks; a multiple of ``ep_size``, ``>= E``.
        num_groups: ``K``, expert groups (consecutive experts); must divide ``E``.
        num_nodes: ``N``, nodes; must divide ``ep_size``.
        ep_size: ``G``, expert-parallel ranks (DeepSeek's GPUs), ``P / G`` slots each.
        previous: ``[L, P]`` current slot-to-logical map. When given, slots stay where they are unless
            moving them is needed to come within ``balance_tolerance`` of a fresh plan.
        balance_tolerance: relative increase of the maximum rank load over that of a fresh plan that
            is accepted to save moves (0.005 costs at most ~0.005 balancedness).
        max_moved_fraction: hard cap, per layer, on moved copies (see :func:`moved_copies`) as a
            fraction of ``P``; moves forced by changed groups or missing experts are not capped.

    Returns:
        ``phy2log [L, P]`` logical expert of each slot, ``log2phy [L, E, X]`` the slots of each expert
        in ascending order padded with -1 (``X`` = most replicas of any expert), and ``logcnt [L, E]``
        replicas per expert; all int64 on the CPU.
    """
    _check(weight, num_slots, num_groups, num_nodes, ep_size, previous, balance_tolerance, max_moved_fraction)
    w = weight.detach().to("cpu", torch.float64).numpy()
    num_layers, num_experts = w.shape
    prev = None if previous is None else previous.detach().to("cpu", torch.int64).numpy()
    nodes = num_nodes if num_nodes > 1 and num_groups % num_nodes == 0 else 1
    budget = np.full(num_layers, max_moved_fraction * num_slots)

    # Pack groups onto nodes; experts are then renumbered node by node ("node-local" ids).
    if nodes == 1:
        group_node = np.zeros((num_layers, 1), np.int64)
    else:
        group_load = w.reshape(num_layers, num_groups, -1).sum(-1)
        group_node, spent = _assign_groups(group_load, nodes, prev, num_experts // num_groups,
                                           balance_tolerance, budget)
        budget = np.maximum(budget - spent, 0)  # what moving groups between nodes left
    expert_node = np.repeat(group_node, num_experts // group_node.shape[1], axis=1)
    local2log = expert_node.argsort(axis=1, kind="stable")  # [L, E]: experts sorted by node, then id
    log2local = _inverse(local2log)
    per_node, slots_per_node = num_experts // nodes, num_slots // nodes

    prev_local = None
    if prev is not None:
        slot_node = np.arange(num_slots) // slots_per_node
        on_node = _take(expert_node, prev) == slot_node
        prev_local = np.where(on_node, _take(log2local, prev) % per_node, -1).reshape(-1, slots_per_node)
    local = _plan(_take(w, local2log).reshape(-1, per_node), slots_per_node, ep_size // nodes, prev_local,
                  balance_tolerance, np.repeat(budget / nodes, nodes), nodes)
    offset = np.repeat(np.arange(nodes), slots_per_node) * per_node
    phy2log = _take(local2log, local.reshape(num_layers, -1) + offset)
    logcnt = _counts(phy2log, num_experts)
    return (torch.as_tensor(phy2log), torch.as_tensor(_log2phy(phy2log, logcnt)),
            torch.as_tensor(logcnt))


def rank_loads(phy2log: Tensor, weight: Tensor, ep_size: int) -> Tensor:
    """``[L, G]`` float64 load per EP rank: each slot carries its expert's load divided by the expert's
    replicas (``phy2log [L, P]``, ``weight [L, E]``)."""
    if phy2log.dim() != 2 or weight.dim() != 2 or phy2log.shape[0] != weight.shape[0]:
        raise ValueError(f"phy2log [L, P] and weight [L, E] disagree: {tuple(phy2log.shape)}, "
                         f"{tuple(weight.shape)}")
    if ep_size < 1 or phy2log.shape[1] % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the {phy2log.shape[1]} slots")
    phy2log, weight = phy2log.cpu().long(), weight.detach().cpu().double()
    counts = torch.as_tensor(_counts(phy2log.numpy(), weight.shape[1]))
    per_slot = (weight / counts.clamp(min=1)).gather(1, phy2log)
    return per_slot.view(phy2log.shape[0], ep_size, -1).sum(-1)


def layer_balancedness(phy2log: Tensor, weight: Tensor, ep_size: int) -> Tensor:
    """``[L]`` float64 mean rank load / max rank load per layer; a layer without load counts 1."""
    loads = rank_loads(phy2log, weight, ep_size)
    peak = loads.max(1).values
    return torch.where(peak > 0, loads.mean(1) / peak.clamp(min=1e-300), 1.0)


def balancedness(phy2log: Tensor, weight: Tensor, ep_size: int) -> float:
    """Mean over layers of (mean rank load / max rank load); 1.0 is perfect, layers without load count 1."""
    return layer_balancedness(phy2log, weight, ep_size).mean().item()


def moved_copies(old_phy2log: Tensor, new_phy2log: Tensor, ep_size: int) -> float:
    """Fraction of all ``L * P`` slots that need a copy of an expert their EP rank did not hold before.

    Counts pairs (layer, rank, expert) present in ``new_phy2log [L, P]`` but not in ``old_phy2log``.
    """
    if old_phy2log.shape != new_phy2log.shape or old_phy2log.dim() != 2:
        raise ValueError(f"old_phy2log and new_phy2log must both be [L, P]: {tuple(old_phy2log.shape)}, "
                         f"{tuple(new_phy2log.shape)}")
    if ep_size < 1 or old_phy2log.shape[1] % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the {old_phy2log.shape[1]} slots")
    old, new = old_phy2log.cpu().long().numpy(), new_phy2log.cpu().long().numpy()
    num_experts = int(max(old.max(), new.max())) + 1
    return int(_moves(new, _presence(old, ep_size, num_experts), ep_size, num_experts).sum()) / new.size


# ----------------------------------------------------------------------------------------------------
# Validation


def _check(weight: Tensor, num_slots: int, num_groups: int, num_nodes: int, ep_size: int,
           previous: Tensor | None, balance_tolerance: float, max_moved_fraction: float) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty [num_layers, num_experts] tensor, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise ValueError(f"weight must be real-valued, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("weight must be finite and non-negative (found NaN, inf or a negative load)")
    num_layers, num_experts = weight.shape
    for name, value in (("num_slots", num_slots), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("ep_size", ep_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_slots < num_experts:
        raise ValueError(f"num_slots={num_slots} must be >= the number of experts {num_experts}")
    if num_slots % ep_size:
        raise ValueError(f"num_slots={num_slots} must be a multiple of ep_size={ep_size}")
    if num_slots * (num_experts + 1) >= 2**31:
        raise ValueError(f"num_slots * (num_experts + 1) must be < 2**31, got {num_slots} slots and "
                         f"{num_experts} experts")
    if ep_size % num_nodes:
        raise ValueError(f"ep_size={ep_size} must be a multiple of num_nodes={num_nodes}")
    if num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of experts {num_experts}")
    if not (math.isfinite(balance_tolerance) and balance_tolerance >= 0):
        raise ValueError(f"balance_tolerance must be finite and >= 0, got {balance_tolerance}")
    if not 0 <= max_moved_fraction <= 1:
        raise ValueError(f"max_moved_fraction must lie in [0, 1], got {max_moved_fraction}")
    if previous is not None:
        if not isinstance(previous, Tensor) or tuple(previous.shape) != (num_layers, num_slots):
            raise ValueError(f"previous must be [{num_layers}, {num_slots}], got "
                             f"{getattr(previous, 'shape', type(previous))}")
        if previous.is_floating_point() or previous.is_complex() or previous.dtype == torch.bool:
            raise ValueError(f"previous must hold integer expert ids, got {previous.dtype}")
        if bool((previous < 0).any()) or bool((previous >= num_experts).any()):
            raise ValueError(f"previous must hold expert ids in [0, {num_experts})")


# ----------------------------------------------------------------------------------------------------
# Row-wise numpy helpers (every array is [B, ...], one row per sub-problem)


def _offsets(num_rows: int, width: int, ndim: int = 2) -> np.ndarray:
    """Flat offset of each row's first element, shaped ``[B, 1, ...]`` to broadcast over ``ndim`` dims."""
    return np.arange(0, num_rows * width, width).reshape((num_rows,) + (1,) * (ndim - 1))


def _take(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``a[b, index[b, ...]]`` for ``a [B, n]`` and ``index [B, ...]``."""
    return np.ascontiguousarray(a).reshape(-1)[index + _offsets(a.shape[0], a.shape[1], index.ndim)]


def _put(a: np.ndarray, index: np.ndarray, values: np.ndarray | int | float) -> None:
    """``a[b, index[b, ...]] = values`` in place for ``a [B, n]`` (a repeated index gets the same value)."""
    np.put(a, index + _offsets(a.shape[0], a.shape[1], index.ndim), values)


def _bincount(index: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``[B, size]`` per row: occurrences (int64), or summed ``weights`` (float64), of ``index [B, ...]``."""
    flat = (index + _offsets(index.shape[0], size, index.ndim)).reshape(-1)
    out = np.bincount(flat, None if weights is None else weights.reshape(-1), minlength=index.shape[0] * size)
    return out.reshape(index.shape[0], size)


def _counts(ids: np.ndarray, num_ids: int) -> np.ndarray:
    """``[B, num_ids]`` occurrences of each id in each row of ``ids [B, m]`` (entries < 0 ignored)."""
    return _bincount(np.where(ids >= 0, ids, num_ids), num_ids + 1)[:, :num_ids]


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Inverse of each row permutation ``perm [B, n]``."""
    out = np.empty(perm.shape, dtype=perm.dtype)
    _put(out, perm, np.arange(perm.shape[1]))
    return out


def _float_key(values: np.ndarray, descending: bool) -> np.ndarray:
    """int64 keys in ``[-2**31, 2**31)`` ordered like ``values`` rounded to float32."""
    bits = (values.astype(np.float32) + np.float32(0)).view(np.int32).astype(np.int64)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float32 order as signed integers
    return -key - 1 if descending else key


def _argsort(values: np.ndarray, descending: bool = False) -> np.ndarray:
    """Row-wise argsort of ``values [B, n]`` by value rounded to float32, ties by position."""
    if values.size <= _SMALL_SORT:
        rounded = values.astype(np.float32)
        return (-rounded if descending else rounded).argsort(axis=1, kind="stable")
    key = (_float_key(values, descending) << 32) | np.arange(values.shape[1])
    return np.sort(key, axis=1) & _MASK32


def _order(*keys: tuple[np.ndarray, int]) -> np.ndarray:
    """Permutation sorting flat arrays lexicographically by ``(key, bound)`` pairs, first key first; keys
    are non-negative ints below their bounds. Packs them into one int64 when they fit."""
    width = sum(max(bound - 1, 1).bit_length() for _, bound in keys)
    size = len(keys[0][0])
    if width + max(size - 1, 1).bit_length() > 63:
        return np.lexsort([key for key, _ in reversed(keys)])
    packed = np.zeros(size, np.int64)
    for key, bound in keys:
        packed = packed * bound + key
    return np.sort(packed * size + np.arange(size)) % size


def _segment_rank(sorted_keys: np.ndarray) -> np.ndarray:
    """For ``sorted_keys [B, m]`` sorted along dim 1: the position of each entry within its run."""
    index = np.arange(sorted_keys.shape[1])
    starts = np.ones(sorted_keys.shape, dtype=bool)
    starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def _occurrence(ids: np.ndarray) -> np.ndarray:
    """``[B, m]``: how many entries left of each entry of ``ids [B, m]`` (ids >= 0) hold the same id."""
    m = ids.shape[1]
    key = np.sort(ids * m + np.arange(m), axis=1)
    out = np.empty_like(ids)
    _put(out, key % m, _segment_rank(key // m))
    return out


def _presence(ids: np.ndarray, num_packs: int, num_ids: int) -> np.ndarray:
    """``[B, packs * num_ids]`` whether pack ``h`` (consecutive blocks of ``ids [B, m]``) holds id ``e``, at
    ``h * num_ids + e`` (entries < 0 ignored)."""
    num_rows, m = ids.shape
    held = np.zeros((num_rows, num_packs * num_ids + 1), dtype=bool)
    cell = np.where(ids >= 0, np.arange(m) // (m // num_packs) * num_ids + ids, num_packs * num_ids)
    _put(held, cell, True)
    return held[:, :-1]


def _moves(slots: np.ndarray, old_has: np.ndarray, num_packs: int, num_ids: int) -> np.ndarray:
    """``[B]`` (pack, id) pairs present in ``slots [B, m]`` and absent from ``old_has`` (see
    :func:`_presence`): the copies a plan needs over the network."""
    m = slots.shape[1]
    key = np.sort((np.arange(m) // (m // num_packs)) * num_ids + slots, axis=1)
    first = np.ones(key.shape, dtype=bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    return (first & ~_take(old_has, key)).sum(1)


def _log2phy(phy2log: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """``[L, E, X]`` slots of each expert in ascending order, padded with -1."""
    num_layers, num_experts = logcnt.shape
    num_slots, width = phy2log.shape[1], int(logcnt.max())
    key = np.sort(phy2log * num_slots + np.arange(num_slots), axis=1)
    experts = key // num_slots
    out = np.full((num_layers, num_experts * width), -1, dtype=np.int64)
    _put(out, experts * width + _segment_rank(experts), key % num_slots)
    return out.reshape(num_layers, num_experts, width)


# ----------------------------------------------------------------------------------------------------
# Replica counts and packing, batched over rows


def _replica_counts(w: np.ndarray, num_slots: int, num_packs: int, old: np.ndarray | None = None,
                    tolerance: float = 0.0) -> np.ndarray:
    """``[B, n]`` replicas per expert minimising the largest per-replica load (D'Hondt apportionment).

    Each of the ``num_slots - n`` extra replicas goes to the expert with the largest load per replica
    (ties: fewer replicas, then lower id), but no expert gets more replicas than there are packs (a
    second replica in one pack lowers no pack's load) unless the slots demand it. With ``old [B, n]``
    counts, an expert still below its old count gets a ``1 + tolerance`` bonus (hysteresis).

    Computed in one selection instead of one step per replica: the extra replicas are the top
    ``num_slots - n`` quotients ``w[e] / k`` (``k`` = replicas held, with the bonus where ``k < old``).
    Only quotients above a threshold that provably leaves at least that many are generated
    (:func:`_quotient_floor`), about ``num_slots`` per row.
    """
    num_rows, n = w.shape
    extra = num_slots - n
    counts = np.ones((num_rows, n), dtype=np.int64)
    if extra == 0:
        return counts
    cap = max(num_packs, -(-num_slots // n))
    bonus = 1.0 + tolerance
    floor = _quotient_floor(w, extra, cap)  # [B]: at least `extra` quotients per row are >= floor
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = np.floor(w * bonus / floor[:, None]) + 1
    zeros = (w == 0).sum(1, keepdims=True)
    reach = np.where(floor[:, None] > 0, reach, np.where(w > 0, cap, -(-extra // np.maximum(zeros, 1))))
    num = np.minimum(reach, cap - 1).astype(np.int64).reshape(-1)  # candidate quotients per expert
    expert = np.repeat(np.arange(num_rows * n), num)
    k = np.arange(len(expert)) - np.repeat(np.cumsum(num) - num, num) + 1
    held = old.reshape(-1)[expert] if old is not None else np.zeros_like(expert)
    quotient = w.reshape(-1)[expert] / k * np.where(k < held, bonus, 1.0)
    row, e = np.divmod(expert, n)
    per_row = num.reshape(num_rows, n).sum(1)
    position = np.arange(len(expert)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    keys = np.full((num_rows, int(per_row.max())), np.iinfo(np.int64).max)
    keys[row, position] = (_float_key(quotient, descending=True) << 32) | (k * n + e)
    chosen = np.sort(keys, axis=1)[:, :extra] & _MASK32
    return counts + _bincount(chosen % n, n)


def _quotient_floor(w: np.ndarray, extra: int, cap: int) -> np.ndarray:
    """``[B]`` a load per replica ``t`` such that at least ``extra`` quotients ``w[e] / k`` (``k < cap``)
    per row are ``>= t``; 0 where only zero quotients make up the number.

    ``t`` solves ``sum_e min(cap - 1, w[e] / t) = extra + n`` (water-filling: the experts that reach the
    cap are fixed there, the others share the rest in proportion to load), found by iterating the
    capped set, which only grows. Each expert then has ``>= min(cap - 1, w[e] / t) - 1`` quotients
    ``>= t``: ``extra`` in all.
    """
    target = extra + w.shape[1]
    total = w.sum(1)
    t = total / target
    capped = np.zeros(w.shape, dtype=bool)
    while True:
        now = w >= (cap - 1) * t[:, None]
        if (now == capped).all():
            break
        capped = now
        free = target - capped.sum(1) * (cap - 1)
        rest = total - np.where(capped, w, 0).sum(1)
        t = np.where(free > 0, rest / np.where(free > 0, free, 1), 0.0)
    return t


def _items(counts: np.ndarray) -> np.ndarray:
    """``[B, m]`` expert of each item: expert ``e`` repeated ``counts[:, e]`` times, in expert order."""
    num_rows, n = counts.shape
    return np.repeat(np.tile(np.arange(n), num_rows), counts.reshape(-1)).reshape(num_rows, -1)


def _pack_loads(item_w: np.ndarray, pack: np.ndarray, num_packs: int) -> np.ndarray:
    """``[B, packs]`` summed weight of the items ``item_w [B, m]`` in each pack (``pack [B, m]``)."""
    return _bincount(pack, num_packs, item_w)


def _members(pack: np.ndarray, num_packs: int) -> np.ndarray:
    """``[B, packs, m / packs]`` the items of each pack in ascending order (``pack [B, m]``)."""
    num_rows, m = pack.shape
    return (np.sort(pack * m + np.arange(m), axis=1) % m).reshape(num_rows, num_packs, -1)


def _pack_fresh(item_w: np.ndarray, num_packs: int) -> np.ndarray:
    """``[B, m]`` pack of each item, ``m / num_packs`` per pack: rounds of the ``num_packs`` largest
    remaining items, the largest to the lightest pack; then :func:`_improve` until the heaviest pack is
    within 1e-3 of the lower bound (mean pack load, largest item) or cannot be lowered. With two items
    per pack the rounds pair the k-th largest item with the k-th smallest, which is optimal: done."""
    num_rows, m = item_w.shape
    order = _argsort(item_w, descending=True)
    pack = np.empty((num_rows, m), dtype=np.int64)
    if m == 2 * num_packs:
        _put(pack, order, np.r_[np.arange(num_packs), np.arange(num_packs)[::-1]])
        return pack
    order = order.reshape(num_rows, -1, num_packs)
    loads = np.zeros((num_rows, num_packs))
    lightest = np.broadcast_to(np.arange(num_packs), (num_rows, num_packs))
    for r in range(order.shape[1]):
        if r:
            lightest = _argsort(loads)
        _put(pack, order[:, r], lightest)
        _put(loads, lightest, _take(item_w, order[:, r]) + _take(loads, lightest))
    bound = np.maximum(item_w.sum(1) / num_packs, item_w.max(1)) * (1 + 1e-3)
    return _improve(item_w, pack, num_packs, bound)


def _improve(item_w: np.ndarray, pack: np.ndarray, num_packs: int, target: np.ndarray,
             cost: Cost | None = None, budget: np.ndarray | None = None) -> np.ndarray:
    """Swap items between packs until each row's heaviest pack is ``<= target [B]`` or cannot be lowered.

    Free of cost, rounds first pair the k-th heaviest pack with the k-th lightest and swap in all pairs
    at once (:func:`_pair_rounds`). Then (:func:`_heavy_rounds`) the heaviest packs above the target
    each look for the best swap with an item of the lighter half of the packs, all in the same round
    (:func:`_nearest_swaps`); with ``cost`` see :func:`_best_swaps` for the choice, and no row spends
    more than ``budget [B]``.
    """
    pack = pack.copy()
    if num_packs < 2 or pack.shape[1] == num_packs:  # one pack, or one item per pack: swaps change nothing
        return pack
    if cost is None:
        _pair_rounds(item_w, pack, num_packs, target)
    _heavy_rounds(item_w, pack, num_packs, target, cost, budget)
    return pack


def _pair_rounds(item_w: np.ndarray, pack: np.ndarray, num_packs: int, target: np.ndarray) -> None:
    """In place: rounds that pair the k-th heaviest pack with the k-th lightest and make in every pair
    above ``target`` the swap leaving the pair's heavier pack lightest (see :func:`_best_swaps` for the
    arithmetic); a row without a swap in a round has none in later rounds either."""
    half, per_pack = num_packs // 2, pack.shape[1] // num_packs
    within = np.arange(per_pack)
    rows = np.arange(len(pack))
    for _ in range(num_packs):
        here, item_r = pack[rows], item_w[rows]
        loads = _pack_loads(item_r, here, num_packs)
        by_load = _argsort(loads, descending=True)
        heavy, light = by_load[:, :half], by_load[:, num_packs - half:][:, ::-1]  # [r, H] paired packs
        members = _members(here, num_packs).reshape(len(rows), -1)
        own = _take(members, heavy[:, :, None] * per_pack + within)  # [r, H, S]
        other = _take(members, light[:, :, None] * per_pack + within)
        peak, low = _take(loads, heavy), _take(loads, light)
        centre = ((peak - low) / 2).astype(np.float32)[:, :, None, None]
        w32 = item_r.astype(np.float32)
        dist = _take(w32, own)[:, :, :, None] - _take(w32, other)[:, :, None, :]  # [r, H, S, S]
        dist -= centre
        np.abs(dist, out=dist)
        dist[dist >= centre - np.float32(1e-6) * peak.astype(np.float32)[:, :, None, None]] = np.inf
        best = dist.reshape(len(rows), half, -1).argmin(2)
        i = np.take_along_axis(own.reshape(len(rows), half, -1), (best // per_pack)[:, :, None], 2)[:, :, 0]
        j = np.take_along_axis(other.reshape(len(rows), half, -1), (best % per_pack)[:, :, None], 2)[:, :, 0]
        shift = _take(item_r, i) - _take(item_r, j)
        swap = ((np.maximum(peak - shift, low + shift) < peak * (1 - 1e-6))
                & (peak > target[rows, None]))  # float64 check of the chosen swaps
        _put(here, i, np.where(swap, light, heavy))
        _put(here, j, np.where(swap, heavy, light))
        pack[rows] = here
        rows = rows[swap.any(1)]
        if rows.size == 0:
            return


def _heavy_rounds(item_w: np.ndarray, pack: np.ndarray, num_packs: int, target: np.ndarray,
                  cost: Cost | None, budget: np.ndarray | None) -> None:
    """In place: rounds in which up to ``H`` heaviest packs above ``target`` of each row (only the
    heaviest in the first round) each pick their best swap with an item of the lighter half of the packs
    (:func:`_nearest_swaps`, or with ``cost`` :func:`_best_swaps`). Two picks sharing a partner pack: the
    heavier pack keeps it; with ``cost``, picks are taken heaviest first while the row's running spend
    fits ``budget``. A row stops when its heaviest pack has no swap left."""
    num_rows, m = pack.shape
    per_pack, half = m // num_packs, num_packs // 2
    num_light = num_packs - half
    num_heavy = min(half, _MAX_HEAVY) if cost is None else max(
        1, min(half, _MAX_HEAVY, _SWAP_WORK // (per_pack * per_pack * num_light)))
    left = None if budget is None else budget.astype(np.float64)
    done = np.zeros(num_rows, dtype=bool)
    earlier = np.tri(num_heavy, k=-1, dtype=bool)  # [h, h']: h' is heavier than h
    within = np.arange(per_pack)
    for step in range(2 * m):
        loads = _pack_loads(item_w, pack, num_packs)
        rows = (~done & (loads.max(1) > target)).nonzero()[0]
        if rows.size == 0:
            return
        here, load_r = pack[rows], loads[rows]
        by_load = _argsort(load_r, descending=True)
        heavy = by_load[:, :num_heavy if step else 1]  # first round: can the heaviest pack shed at all?
        light = by_load[:, num_packs - num_light:][:, ::-1]  # lightest first: ties go to the most room
        members = _members(here, num_packs).reshape(rows.size, -1)
        own = _take(members, heavy[:, :, None] * per_pack + within)  # [r, H, S]
        partners = _take(members, light[:, :, None] * per_pack + within)  # [r, Q, S]
        left_r = None if left is None else left[rows]
        if cost is None:
            found, i, j, partner_pack = _nearest_swaps(item_w[rows], load_r, heavy, own, light, partners,
                                                       target[rows])
            spent = None
        else:
            found, i, j, partner_pack, spent = _best_swaps(item_w[rows], load_r, heavy, own, light, partners,
                                                           target[rows], cost, rows, left_r)
        done[rows[~found[:, 0]]] = True
        found &= ~((partner_pack[:, :, None] == partner_pack[:, None, :]) & found[:, None, :]
                   & earlier[:found.shape[1], :found.shape[1]]).any(2)
        if spent is not None:
            spent = np.where(found, spent, 0.0)
            found &= np.maximum.accumulate(np.cumsum(spent, 1), 1) <= left_r[:, None] + 1e-9
            left[rows] -= np.where(found, spent, 0.0).sum(1)
        sub = np.nonzero(found)
        row = rows[sub[0]]
        pack[row, i[sub]] = partner_pack[sub]
        pack[row, j[sub]] = heavy[sub]


def _nearest_swaps(item_w: np.ndarray, loads: np.ndarray, heavy: np.ndarray, own: np.ndarray,
                   light: np.ndarray, partners: np.ndarray, target: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The swap of an item ``i`` of each pack ``heavy [r, H]`` (items ``own [r, H, S]``) with an item ``j``
    of the packs ``light [r, Q]`` (items ``partners [r, Q, S]``) leaving the pair's heavier pack lightest.

    With loads ``a`` (heavy) and ``b`` (partner's pack) the pair ends at ``b - w_j + w_i`` when ``w_j - b /
    2 <= w_i - a / 2`` and at ``a - w_i + w_j`` otherwise. So the partners are sorted by ``w_j - b / 2``:
    a prefix minimum of ``b - w_j`` and a suffix minimum of ``w_j`` answer each item ``i`` once it is
    merged into that order: ``O((H + Q) S log)`` per row instead of ``O(H Q S^2)``. Orders use float32
    keys; the chosen swaps are checked in float64. Returns ``(found, i, j, pack_j)``, each ``[r, H]``:
    ``found`` where the swap lowers a pack above ``target [r]`` (by more than a 1e-6 margin).
    """
    num_rows, num_heavy, per_pack = own.shape
    a = _take(loads, heavy)  # [r, H]
    flat = partners.reshape(num_rows, -1)  # [r, K]
    w_j = _take(item_w, flat)
    b = np.repeat(_take(loads, light), per_pack, axis=1)  # load of each partner's pack
    key = w_j - b / 2
    order = _argsort(key)
    key, w_j, rest = _take(key, order), _take(w_j, order), _take(b - w_j, order)
    size = key.shape[1]
    position = np.arange(size)
    prefix = np.minimum.accumulate((_float_key(rest, False) << 32) | position, axis=1) & _MASK32
    suffix = (np.minimum.accumulate(((_float_key(w_j, False) << 32) | position)[:, ::-1], axis=1)
              & _MASK32)[:, ::-1]
    w_i = _take(item_w, own).reshape(num_rows, -1)  # [r, H * S]
    a_i = np.repeat(a, per_pack, axis=1)
    query = w_i - a_i / 2
    merged = _argsort(np.concatenate([key, query], axis=1))  # per row; a key before an equal query
    is_query = merged >= size
    below = np.empty_like(w_i, dtype=np.int64)  # partners with key <= query
    rank = np.cumsum(~is_query, axis=1)
    row, lane = np.nonzero(is_query)
    below[row, merged[row, lane] - size] = rank[row, lane]
    pick_a = _take(prefix, np.maximum(below - 1, 0))
    pick_b = _take(suffix, np.minimum(below, size - 1))
    pair_a = np.where(below > 0, w_i + _take(rest, pick_a), np.inf)
    pair_b = np.where(below < size, a_i - w_i + _take(w_j, pick_b), np.inf)
    pick = np.where(pair_a <= pair_b, pick_a, pick_b)
    pair = np.minimum(pair_a, pair_b).reshape(num_rows, num_heavy, per_pack)
    best = pair.argmin(2)
    i = np.take_along_axis(own, best[:, :, None], 2)[:, :, 0]
    chosen = _take(order, np.take_along_axis(pick.reshape(num_rows, num_heavy, per_pack), best[:, :, None],
                                              2)[:, :, 0])  # partner index in flat
    j, pack_j = _take(flat, chosen), _take(light, chosen // per_pack)
    swing = _take(item_w, i) - _take(item_w, j)
    exact = np.maximum(a - swing, _take(loads, pack_j) + swing)  # float64 check of the chosen swaps
    return (exact < a * (1 - 1e-6)) & (a > target[:, None]), i, j, pack_j


def _best_swaps(item_w: np.ndarray, loads: np.ndarray, heavy: np.ndarray, own: np.ndarray, light: np.ndarray,
                partners: np.ndarray, target: np.ndarray, cost: Cost, rows: np.ndarray,
                left: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best swap of an item of each pack ``heavy [r, H]`` (its items ``own [r, H, S]``) with an item of
    the packs ``light [r, Q]`` (their items ``partners [r, Q, S]``) that lowers the heavier of the two,
    under ``cost`` (moves charged for an item in a pack; ``rows [r]`` index its rows).

    A swap shifting ``x = w_i - w_j`` from a pack of load ``a`` to one of load ``b`` leaves the pair's
    heavier pack at ``(a + b) / 2 + |x - (a - b) / 2|``: it helps when that distance is below ``(a - b) /
    2`` (less a 1e-6 margin). Swaps costing no move come first (most load shed), then the most load
    shed per move, never more than ``left [r]`` moves; load shed below ``target [r]`` does not count.
    All pairs are scored (``[r, H, S, Q, S]``, float32) and the chosen swap is checked in float64.
    Returns ``(found, i, j, pack_j, spent)``, each ``[r, H]``: whether a swap helps, the items ``i``
    (from ``own``) and ``j`` to swap, the pack of ``j`` and the moves the swap costs.
    """
    num_rows, num_heavy, per_pack = own.shape
    num_light = light.shape[1]
    peak = _take(loads, heavy)  # [r, H]
    centre = ((peak[:, :, None] - _take(loads, light)[:, None, :]) / 2).astype(np.float32)  # [r, H, Q]
    reach = centre - np.float32(1e-6) * peak[:, :, None].astype(np.float32)
    reach[peak <= target[:, None]] = -1  # packs at or below the target look for nothing
    w32 = item_w.astype(np.float32)
    dist = _take(w32, own)[:, :, :, None, None] - _take(w32, partners)[:, None, None, :, :]
    dist -= centre[:, :, None, :, None]
    np.abs(dist, out=dist)  # [r, H, S, Q, S]
    useless = dist >= reach[:, :, None, :, None]
    r3 = rows[:, None, None]  # moves charged by the swap: own item i to j's pack, partner j to the heavy pack
    delta = ((cost(r3[..., None], own[..., None], light[:, None, None, :])
              - cost(r3, own, heavy[:, :, None])[..., None])[..., None].astype(np.float32)
             + (cost(r3[..., None], partners[:, None], heavy[:, :, None, None])
                - cost(r3, partners, light[:, :, None])[:, None])[:, :, None].astype(np.float32))
    useless |= delta > (left + 1e-6).astype(np.float32)[:, None, None, None, None]
    score = dist  # minus the load shed (above the target), per move; free swaps ahead of all
    score -= centre[:, :, None, :, None]
    np.maximum(score, (target[:, None] - peak).astype(np.float32)[:, :, None, None, None], out=score)
    score /= np.maximum(delta, 1)
    score -= (delta <= 0) * (peak.astype(np.float32) + 1)[:, :, None, None, None]
    score[useless] = np.inf
    flat = score.reshape(num_rows, num_heavy, -1)
    best = flat.argmin(2)
    own_at, rest = np.divmod(best, num_light * per_pack)
    i = np.take_along_axis(own, own_at[:, :, None], 2)[:, :, 0]
    j = _take(partners.reshape(num_rows, -1), rest)
    pack_j = _take(light, rest // per_pack)
    shift = _take(item_w, i) - _take(item_w, j)
    pair = np.maximum(peak - shift, _take(loads, pack_j) + shift)  # float64 check of the chosen swaps
    found = (np.take_along_axis(flat, best[:, :, None], 2)[:, :, 0] < np.inf) & (pair < peak * (1 - 1e-6))
    spent = np.take_along_axis(delta.reshape(num_rows, num_heavy, -1), best[:, :, None], 2)[:, :, 0]
    return found, i, j, pack_j, spent.astype(np.float64)


def _charge(cost: Cost, pack: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``[B]`` total charge of the assignment ``pack [B, m]`` of rows ``rows [B]`` under ``cost``."""
    return cost(rows[:, None], np.arange(pack.shape[1]), pack).sum(1)


def _greedy_match(row: np.ndarray, new: np.ndarray, old: np.ndarray, overlap: np.ndarray, num_rows: int,
                  k: int) -> np.ndarray:
    """``[B, k]`` old label of each new pack: greedy maximum-overlap matching, pair by pair (most overlap
    first; ties in a fixed pseudo-random order of the pairs), unmatched packs paired in ascending order.

    The edges ``(row, new, old)`` with positive ``overlap`` (int) are listed once each. The greedy result
    is built in rounds: an edge that is the best free edge of both its packs is matched (it would be
    matched by the pair-by-pair greedy too), until no free edge is left. Breaking ties by pack index
    instead would chain the rounds (each waiting for a lower pack) when overlaps are small integers.
    """
    bits = max(k * k - 1, 1).bit_length()
    scramble = ((new * k + old) * 0x9E3779B1) & ((1 << bits) - 1)  # odd factor: a bijection, so no ties
    top = int(overlap.max(initial=0))
    order = _order((row, num_rows), (top - overlap, top + 1), (scramble, 1 << bits))
    key_new, key_old = (row * k + new)[order], (row * k + old)[order]
    label = np.full(num_rows * k, -1, dtype=np.int64)
    old_free = np.ones(num_rows * k, dtype=bool)
    alive = np.arange(len(order))
    while alive.size:
        best_new = np.full(num_rows * k, len(order))
        best_old = best_new.copy()
        np.minimum.at(best_new, key_new[alive], alive)
        np.minimum.at(best_old, key_old[alive], alive)
        win = alive[(best_new[key_new[alive]] == alive) & (best_old[key_old[alive]] == alive)]
        label[key_new[win]] = key_old[win] % k
        old_free[key_old[win]] = False
        alive = alive[(label[key_new[alive]] < 0) & old_free[key_old[alive]]]
    label[label < 0] = np.nonzero(old_free)[0] % k  # both row-major: the same number per row
    return label.reshape(num_rows, k)


def _match_packs(slots: np.ndarray, previous: np.ndarray, num_packs: int) -> np.ndarray:
    """``[B, packs]`` old pack for each pack of ``slots [B, m]`` maximising greedily the experts both hold
    (``previous [B, m]``, -1 ignored); the overlaps are found by joining the two on (row, expert)."""
    num_rows, m = slots.shape
    n = int(max(slots.max(), previous.max())) + 1
    pack = np.arange(m) // (m // num_packs)
    row = np.arange(num_rows)[:, None]

    def distinct(ids: np.ndarray) -> np.ndarray:  # sorted keys (row, expert, pack) of held experts
        keys = ((row * n + ids) * num_packs + pack)[ids >= 0]
        keys = np.sort(keys)
        return keys[np.r_[True, keys[1:] != keys[:-1]]]

    new_keys, old_keys = distinct(slots), distinct(previous)
    expert_of = old_keys // num_packs
    start = np.searchsorted(expert_of, new_keys // num_packs, side="left")
    count = np.searchsorted(expert_of, new_keys // num_packs, side="right") - start
    edge_new = np.repeat(new_keys, count)
    edge_old = old_keys[np.repeat(start - np.cumsum(count) + count, count) + np.arange(count.sum())]
    new_pack, old_pack = edge_new % num_packs, edge_old % num_packs
    edge = ((edge_new // num_packs // n) * num_packs + new_pack) * num_packs + old_pack
    edge, overlap = np.unique(edge, return_counts=True)
    return _greedy_match(edge // num_packs // num_packs, edge // num_packs % num_packs, edge % num_packs,
                         overlap, num_rows, num_packs)


# ----------------------------------------------------------------------------------------------------
# Groups to nodes (hierarchical mode)


def _assign_groups(group_load: np.ndarray, num_nodes: int, previous: np.ndarray | None, group_size: int,
                   tolerance: float, budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[L, K]`` node of each group, ``K / N`` groups per node, from ``group_load [L, K]``, and the moves
    ``[L]`` this costs (a group's slots in ``previous [L, P]`` that are not on its new node).

    With ``previous``, groups stay on the node holding most of their slots unless the maximum node load
    is then not within ``tolerance`` of a fresh assignment's (and moving fits ``budget [L]``).
    """
    num_layers, num_groups = group_load.shape
    fresh = _pack_fresh(group_load, num_nodes)
    if previous is None:
        return fresh, np.zeros(num_layers)
    slot_node = np.arange(previous.shape[1]) // (previous.shape[1] // num_nodes)
    overlap = _bincount(previous // group_size * num_nodes + slot_node, num_groups * num_nodes)
    overlap = overlap.reshape(num_layers, num_groups, num_nodes)  # [L, K, N] slots of group k on node n
    table = (overlap.sum(2, keepdims=True) - overlap).reshape(num_layers, -1)

    def cost(rows: np.ndarray, group: np.ndarray, node: np.ndarray) -> np.ndarray:
        return table[rows, group * num_nodes + node].astype(np.float64)

    node_overlap = _bincount(fresh[:, :, None] * num_nodes + np.arange(num_nodes),
                             num_nodes * num_nodes, overlap.astype(np.float64)).astype(np.int64)
    row, cell = np.nonzero(node_overlap)  # [L, new node * N + old node] slots kept by a relabelling
    label = _greedy_match(row, cell // num_nodes, cell % num_nodes, node_overlap[row, cell], num_layers,
                          num_nodes)
    fresh = _take(label, fresh)
    stay = overlap.argmax(2)
    stay_valid = (_counts(stay, num_nodes) == num_groups // num_nodes).all(1, keepdims=True)
    start = np.where(stay_valid, stay, fresh)
    target = _pack_loads(group_load, fresh, num_nodes).max(1) * (1 + tolerance)
    layers = np.arange(num_layers)
    kept = _improve(group_load, start, num_nodes, target, cost,
                    np.maximum(budget - _charge(cost, start, layers), 0))
    missed = _pack_loads(group_load, kept, num_nodes).max(1) > target
    use_fresh = missed & (_charge(cost, fresh, layers) <= budget)
    chosen = np.where(use_fresh[:, None], fresh, kept)
    return chosen, _charge(cost, chosen, layers)


# ----------------------------------------------------------------------------------------------------
# One row = one sub-problem (a layer, or a layer's node)


def _plan(w: np.ndarray, num_slots: int, num_packs: int, previous: np.ndarray | None, tolerance: float,
          budget: np.ndarray, rows_per_layer: int) -> np.ndarray:
    """``[B, m]`` expert of each slot for loads ``w [B, n]``; ``previous [B, m]`` uses -1 for slots whose
    expert no longer belongs to this row (forced moves); ``budget [B]`` caps the other moves.

    With ``previous``, the plan is repaired (:func:`_repair`) towards a target: ``1 + tolerance`` times
    the layer's heaviest rank in a fresh plan (consecutive ``rows_per_layer`` rows are one layer's nodes,
    so lightly loaded nodes keep their slots). The repair first keeps the old replica counts (rows with
    foreign slots: D'Hondt counts with hysteresis), then rows that miss the target retry with the fresh
    plan's counts; rows that still miss take the fresh plan, its ranks renumbered to overlap
    ``previous`` most, if that fits the budget.

    Two slots per rank and at least ``_PAIRS_FROM`` ranks: single swaps rarely reach the target there
    (each mends one pair of ranks and there are many), so the repair re-pairs (:func:`_repair_pairs`).
    """
    fresh = _fresh(w, num_slots, num_packs, rows_per_layer)
    if previous is None:
        return fresh
    n = w.shape[1]
    peak = _slot_loads(fresh, w, num_packs).max(1).reshape(-1, rows_per_layer).max(1)
    pairs = num_slots == 2 * num_packs and num_packs >= _PAIRS_FROM
    target = np.repeat(peak, rows_per_layer) * (1 + tolerance)

    first = _counts(previous, n)
    partial = ~((previous >= 0).all(1) & (first > 0).all(1))
    if partial.any():
        first[partial] = _replica_counts(w[partial], num_slots, num_packs, first[partial], tolerance)
    old_has = _presence(previous, num_packs, n)
    allowed = budget + (previous < 0).sum(1)  # a slot whose expert left the row must move anyway
    plan = _repair(w, first, previous, num_packs, target, budget, old_has, pairs)
    peak = _slot_loads(plan, w, num_packs).max(1)
    moves = _moves(plan, old_has, num_packs, n)
    rows = (peak > target).nonzero()[0]
    if rows.size:  # retry with the fresh plan's counts; keep it if it fits the budget and is better
        retry = _repair(w[rows], _counts(fresh[rows], n), previous[rows], num_packs, target[rows],
                        budget[rows], old_has[rows], pairs)
        retry_peak = _slot_loads(retry, w[rows], num_packs).max(1)
        retry_moves = _moves(retry, old_has[rows], num_packs, n)
        fits, fitted = retry_moves <= allowed[rows], moves[rows] <= allowed[rows]
        better = np.where(fits & fitted, retry_peak < peak[rows], fits | (retry_moves < moves[rows]))
        rows = rows[better]
        plan[rows], peak[rows] = retry[better], retry_peak[better]
    rows = (peak > target).nonzero()[0]
    if rows.size:  # take the fresh plan, renumbered, where its moves fit
        aligned = _align(fresh[rows], previous[rows], num_packs, relabel=True)
        fits = _moves(aligned, old_has[rows], num_packs, n) <= allowed[rows]
        plan[rows[fits]] = aligned[fits]
    return plan


def _repair(w: np.ndarray, counts: np.ndarray, previous: np.ndarray, num_packs: int, target: np.ndarray,
            budget: np.ndarray, old_has: np.ndarray, pairs: bool = False) -> np.ndarray:
    """``[B, m]`` slots holding ``counts [B, n]`` replicas, close to ``previous [B, m]``: kept replicas stay
    (:func:`_keep_and_fill`), then swaps (:func:`_improve`) until the peak is ``<= target [B]``,
    charging one move per replica on a pack that did not hold its expert (``old_has``, see
    :func:`_presence`), at most ``budget [B]``. With ``pairs`` (two items per pack),
    :func:`_repair_pairs` instead, where its moves fit the budget."""
    n = w.shape[1]
    items = _items(counts)
    replica_w = w / counts
    rows = np.arange(len(w))
    if pairs:
        slots = _repair_pairs(_take(replica_w, items), items, _keep(previous, items, replica_w, num_packs),
                              previous, num_packs, target)
        rows = (_moves(slots, old_has, num_packs, n) > budget + (previous < 0).sum(1)).nonzero()[0]
        if rows.size:
            slots[rows] = _repair(w[rows], counts[rows], previous[rows], num_packs, target[rows],
                                  budget[rows], old_has[rows])
        return slots
    start = _keep_and_fill(previous, items, replica_w, num_packs)

    def cost(rows: np.ndarray, item: np.ndarray, pack: np.ndarray) -> np.ndarray:
        return 1.0 - old_has[rows, pack * n + items[rows, item]]

    pack = _improve(_take(replica_w, items), start, num_packs, target, cost,
                    np.maximum(budget - _charge(cost, start, rows), 0))
    return _align(_slots(items, pack, num_packs), previous, num_packs, relabel=False)


def _repair_pairs(item_w: np.ndarray, items: np.ndarray, kept: np.ndarray, previous: np.ndarray,
                  num_packs: int, target: np.ndarray) -> np.ndarray:
    """``[B, m]`` slots for two items per pack, close to ``previous [B, m]``: packs whose two items are
    both kept (``kept [B, m]``, see :func:`_keep`) and fit ``target [B]`` stay; all other items are
    paired largest with smallest (optimal for them) into the other packs. If that pairing exceeds the
    target, the staying packs with the most room are released too: the fewest found by bisection.
    The new pairs then go to the packs that held most of their experts (:func:`_align`)."""
    num_rows, m = item_w.shape
    held = np.where(kept >= 0, kept, num_packs)
    full = _bincount(held, num_packs + 1)[:, :num_packs] == 2
    load = _pack_loads(np.where(kept >= 0, item_w, 0.0), np.maximum(kept, 0), num_packs)
    whole = full & (load <= target[:, None])
    release_rank = _inverse(_argsort(np.where(whole, load, np.inf)))  # most room first; others last

    def released(count: np.ndarray) -> np.ndarray:  # [B, m] items re-paired when `count` packs are freed
        free_pack = ~whole | (release_rank < count[:, None])
        return (kept < 0) | _take(free_pack, np.maximum(kept, 0))

    def peak(count: np.ndarray) -> np.ndarray:
        loose = released(count)
        ordered = np.sort(np.where(loose, item_w, np.inf), axis=1)
        size = loose.sum(1, keepdims=True)
        lane = np.arange(m // 2)
        sums = ordered[:, : m // 2] + _take(ordered, np.maximum(size - 1 - lane, 0))
        return np.where(lane < size // 2, sums, -np.inf).max(1, initial=-np.inf)

    low, high = np.zeros(num_rows, dtype=np.int64), whole.sum(1)
    while (low < high).any():
        middle = (low + high) // 2
        fits = peak(middle) <= target
        high = np.where((low < high) & fits, middle, high)
        low = np.where((low < high) & ~fits, middle + 1, low)
    loose = released(low)
    order = _argsort(np.where(loose, item_w, np.inf))  # loose items ascending first
    size = loose.sum(1, keepdims=True)
    lane = np.arange(m // 2)
    free_pack = np.sort(np.where(~whole | (release_rank < low[:, None]), np.arange(num_packs), num_packs),
                        axis=1)  # freed packs ascending first
    pack = kept.copy()
    pair = lane < size // 2
    row, k = np.nonzero(pair)
    small, large = order[row, k], order[row, size[row, 0] - 1 - k]
    pack[row, small] = free_pack[row, k]
    pack[row, large] = free_pack[row, k]
    return _align(_slots(items, pack, num_packs), previous, num_packs, relabel=True)


def _fresh(w: np.ndarray, num_slots: int, num_packs: int, rows_per_layer: int, rounds: int = 8) -> np.ndarray:
    """``[B, m]`` slots of a plan from scratch: :func:`_replica_counts` packed by :func:`_pack_fresh`.

    A row holding its layer's heaviest pack (rows of a layer are consecutive), if that pack is above
    the row's mean, then tries for up to ``rounds`` rounds to move one replica from one of the 3 experts
    that need it least to one of the 2 largest experts in the heaviest pack (big items that must share
    a pack are what D'Hondt counts ignore), keeping the change that lowers the peak most. A candidate
    starts from the current slots with the shrinking expert's copy in the lightest pack given to the
    growing expert, then :func:`_improve` (two per pack: sorted pairing, optimal). A row whose
    candidates all fail that way tries them once more packed afresh (:func:`_pack_counts`) before it
    stops.
    """
    num_rows, n = w.shape
    counts = _replica_counts(w, num_slots, num_packs)
    slots, peak = _pack_counts(w, counts, num_packs)
    cap = max(num_packs, -(-num_slots // n))
    above = w.sum(1) / num_packs * (1 + 1e-3)
    done = np.zeros(num_rows, dtype=bool)
    grow_k, shrink_k = min(2, n), min(3, n)
    for _ in range(rounds if n > 1 else 0):
        layer_peak = np.repeat(peak.reshape(-1, rows_per_layer).max(1), rows_per_layer)
        rows = (~done & (peak >= layer_peak) & (peak > above)).nonzero()[0]
        if rows.size == 0:
            break
        count, load, here = counts[rows], w[rows], slots[rows]
        pack_load = _take(load / count, here).reshape(rows.size, num_packs, -1).sum(2)
        in_top = here.reshape(rows.size, num_packs, -1)[np.arange(rows.size), pack_load.argmax(1)]  # [r, S]
        present = np.zeros(count.shape, dtype=bool)
        _put(present, in_top, True)
        worth = np.where(~present | (count >= cap), -1.0, load / count)
        grow = _argsort(worth, descending=True)[:, :grow_k]
        with np.errstate(divide="ignore"):
            need = np.where(count < 2, np.inf, load / np.maximum(count - 1, 1))
        shrink = _argsort(need)[:, :shrink_k]
        valid = (_take(worth, grow)[:, :, None] >= 0) & (_take(need, shrink)[:, None, :] < np.inf)
        grow = np.repeat(grow, shrink_k, axis=1)  # [r, C] candidate pairs
        shrink = np.tile(shrink, (1, grow_k))
        valid = valid.reshape(rows.size, -1) & (grow != shrink)
        done[rows[~valid.any(1)]] = True
        keep = valid.any(1)
        if not keep.any():
            break
        rows, count, load, here, pack_load, grow, shrink, valid = (
            x[keep] for x in (rows, count, load, here, pack_load, grow, shrink, valid))
        num_pairs = grow.shape[1]
        tried = np.repeat(count, num_pairs, axis=0)
        tried[np.arange(len(tried)), grow.reshape(-1)] += valid.reshape(-1)
        tried[np.arange(len(tried)), shrink.reshape(-1)] -= valid.reshape(-1)
        before = (np.repeat(x, num_pairs, axis=0) for x in (load, here, pack_load))
        new_slots, new_peak = _recount(*before, tried, grow.reshape(-1), shrink.reshape(-1), num_packs)
        new_peak = np.where(valid, new_peak.reshape(rows.size, -1), np.inf)
        stuck = (new_peak.min(1) >= peak[rows] * (1 - 1e-6)).nonzero()[0]
        if stuck.size and new_slots is not None:  # before giving up: the candidates packed afresh
            lanes = (stuck[:, None] * num_pairs + np.arange(num_pairs)).reshape(-1)
            again, again_peak = _pack_counts(np.repeat(load[stuck], num_pairs, axis=0), tried[lanes],
                                             num_packs)
            new_slots[lanes] = again
            new_peak[stuck] = np.where(valid[stuck], again_peak.reshape(stuck.size, -1), np.inf)
        best = new_peak.argmin(1)
        better = new_peak[np.arange(rows.size), best] < peak[rows] * (1 - 1e-6)
        done[rows[~better]] = True
        pick = (np.arange(rows.size) * num_pairs + best)[better]
        rows = rows[better]
        counts[rows], peak[rows] = tried[pick], new_peak.reshape(-1)[pick]
        if rows.size and new_slots is None:  # two per pack: only the winners are packed
            slots[rows] = _pack_counts(w[rows], counts[rows], num_packs)[0]
        elif rows.size:
            slots[rows] = new_slots[pick]
    return slots


def _recount(w: np.ndarray, slots: np.ndarray, pack_load: np.ndarray, counts: np.ndarray, grow: np.ndarray,
             shrink: np.ndarray, num_packs: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Slots ``[B, m]`` and peak ``[B]`` after expert ``grow [B]`` took one replica from ``shrink [B]``
    (``counts [B, n]`` already changed; ``slots [B, m]`` and ``pack_load [B, packs]`` from before): the
    shrinking expert's copy in its lightest pack becomes the growing expert's, then :func:`_improve`.
    With two items per pack only the peak of the (optimal) sorted pairing; the slots are None."""
    num_rows, m = slots.shape
    per_pack = m // num_packs
    held = slots == shrink[:, None]
    lightest = np.where(held, np.repeat(pack_load, per_pack, axis=1), np.inf).argmin(1)
    slots = slots.copy()
    slots[np.arange(num_rows), lightest] = grow
    item_w = _take(w / counts, slots)
    if m == 2 * num_packs:  # the sorted pairing is optimal: the peak needs no packing
        ordered = np.sort(item_w, axis=1)
        return None, (ordered + ordered[:, ::-1]).max(1)
    start = np.broadcast_to(np.arange(m) // per_pack, slots.shape)
    bound = np.maximum(item_w.sum(1) / num_packs, item_w.max(1)) * (1 + 1e-3)
    pack = _improve(item_w, start, num_packs, bound)
    return _slots(slots, pack, num_packs), _pack_loads(item_w, pack, num_packs).max(1)


def _pack_counts(w: np.ndarray, counts: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots ``[B, m]`` and heaviest pack load ``[B]`` of replicas ``counts [B, n]`` packed afresh."""
    items = _items(counts)
    item_w = _take(w / counts, items)
    pack = _pack_fresh(item_w, num_packs)
    return _slots(items, pack, num_packs), _pack_loads(item_w, pack, num_packs).max(1)


def _keep(previous: np.ndarray, items: np.ndarray, replica_w: np.ndarray, num_packs: int) -> np.ndarray:
    """``[B, m]`` pack of each item (``items [B, m]`` from :func:`_items`, ``replica_w [B, n]`` load per
    replica) that stays where ``previous [B, m]`` had it, -1 for the others (when an expert loses
    replicas, duplicates in a pack and copies in heavy packs go first)."""
    num_rows, m = previous.shape
    n = replica_w.shape[1]
    per_pack = m // num_packs
    slot_pack = np.arange(m) // per_pack
    expert = np.where(previous >= 0, previous, n)  # foreign slots sort last and are never kept
    counts = _counts(items, n + 1)
    slot_w = _take(np.pad(replica_w, ((0, 0), (0, 1))), expert)
    pack_rank = _inverse(_argsort(slot_w.reshape(num_rows, num_packs, per_pack).sum(-1)))  # light first
    dup = _occurrence(expert.reshape(-1, per_pack)).reshape(num_rows, m)  # copies earlier in the pack
    position = np.arange(m) % per_pack
    key = ((expert * per_pack + dup) * num_packs + pack_rank[:, slot_pack]) * per_pack + position
    order = key.argsort(axis=1)  # distinct keys: by expert, duplicate rank, pack load, then slot
    sorted_expert = _take(expert, order)
    rank = _segment_rank(sorted_expert)
    kept = rank < _take(counts, sorted_expert)
    first_item = _take(np.cumsum(counts, 1) - counts, sorted_expert)
    pack = np.full((num_rows, m + 1), -1, dtype=np.int64)
    _put(pack, np.where(kept, first_item + rank, m), np.where(kept, slot_pack[order], -1))
    return np.ascontiguousarray(pack[:, :m])


def _keep_and_fill(previous: np.ndarray, items: np.ndarray, replica_w: np.ndarray,
                   num_packs: int) -> np.ndarray:
    """``[B, m]`` pack of each item: :func:`_keep`, then the others go, largest first, to the lightest
    packs with a free slot, one per pack and round."""
    num_rows, m = previous.shape
    pack = _keep(previous, items, replica_w, num_packs)
    per_pack = m // num_packs
    item_w = _take(replica_w, items)
    needed = pack < 0
    loads = _pack_loads(np.where(needed, 0.0, item_w), np.maximum(pack, 0), num_packs)  # kept items
    free = per_pack - _counts(pack, num_packs)
    queue = _argsort(np.where(needed, item_w, -1.0), descending=True)  # needed items, largest first
    num_needed, placed = needed.sum(1), np.zeros(num_rows, dtype=np.int64)
    lanes = np.arange(num_packs)
    while (placed < num_needed).any():
        open_packs = _argsort(np.where(free > 0, loads, np.inf))  # lightest packs with a free slot first
        take = np.minimum((free > 0).sum(1), num_needed - placed)[:, None]
        go = lanes < take  # [B, packs]
        item = _take(queue, np.minimum(placed[:, None] + lanes, m - 1))
        row, lane = np.nonzero(go)
        target_pack = open_packs[row, lane]
        pack[row, item[row, lane]] = target_pack
        loads[row, target_pack] += item_w[row, item[row, lane]]
        free[row, target_pack] -= 1
        placed += take[:, 0]
    return pack


def _slots(items: np.ndarray, pack: np.ndarray, num_packs: int) -> np.ndarray:
    """``[B, m]`` slot contents: the items of pack 0, then of pack 1, ... (``pack [B, m]``)."""
    return _take(items, _members(pack, num_packs).reshape(len(items), -1))


def _slot_loads(slots: np.ndarray, w: np.ndarray, num_packs: int) -> np.ndarray:
    """``[B, packs]`` load of each pack of ``slots [B, m]`` under expert loads ``w [B, n]``."""
    per_slot = _take(w / np.maximum(_counts(slots, w.shape[1]), 1), slots)
    return per_slot.reshape(len(slots), num_packs, -1).sum(-1)


def _align(slots: np.ndarray, previous: np.ndarray, num_packs: int, relabel: bool) -> np.ndarray:
    """Reorder ``slots [B, m]`` so it overlaps ``previous [B, m]`` most: with ``relabel``, renumber packs
    (:func:`_match_packs`); then inside each pack the j-th copy of an expert takes the position of the
    j-th copy the pack held before, and the other experts fill the free positions in order."""
    num_rows, m = slots.shape
    per_pack = m // num_packs
    if relabel:
        label = _match_packs(slots, previous, num_packs)
        moved = np.empty((num_rows, num_packs, per_pack), dtype=np.int64)
        moved[np.arange(num_rows)[:, None], label] = slots.reshape(num_rows, num_packs, per_pack)
        slots = moved.reshape(num_rows, m)
    n = int(max(slots.max(), previous.max())) + 2
    new = slots.reshape(-1, per_pack)  # one row per pack
    old = np.where(previous >= 0, previous, n - 1).reshape(-1, per_pack)
    segment = np.arange(len(new))[:, None] * n
    new_key = ((segment + new) * per_pack + _occurrence(new)).reshape(-1)
    old_key = ((segment + old) * per_pack + _occurrence(old)).reshape(-1)
    order = old_key.argsort()  # keys are distinct
    found_at = np.minimum(np.searchsorted(old_key[order], new_key), len(order) - 1)
    found = (old_key[order][found_at] == new_key).reshape(new.shape)
    position = np.where(found, (order[found_at] % per_pack).reshape(new.shape), -1)
    used = np.zeros(new.shape, dtype=bool)
    used[np.nonzero(found)[0], position[found]] = True
    free = np.sort(used * per_pack + np.arange(per_pack), axis=1) % per_pack  # unused positions first
    rest = _take(free, np.maximum(np.cumsum(~found, 1) - 1, 0))
    position = np.where(found, position, rest)
    out = np.empty_like(new)
    _put(out, position, new)
    return out.reshape(num_rows, m)
