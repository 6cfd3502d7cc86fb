"""Replica gradient sync: every physical slot gets the full gradient of its logical expert.

After ``backward`` a replica's gradient holds only the tokens it served. The true gradient of logical
expert ``e`` is the sum over all its replicas (on every EP rank) and all expert-data-parallel (EDP)
ranks, times ``grad_scale``. With the fixed EP and EDP groups of :class:`ParallelGroups`:

1. each rank sums its local replicas of ``e`` (ascending local slot) into one partial row;
2. non-owner ranks send their partial rows to the owner's rank (one ``all_to_all_single`` over EP);
3. the owner sums the partials by source EP rank, ascending (its own at its rank position);
4. the owners' sums are all-reduced over EDP and scaled by ``grad_scale``;
5. owners send the result back to every rank holding a replica (a second ``all_to_all_single``),
   and every local slot of ``e`` is overwritten with the same bytes.

A *row* of ``e`` is the concatenation of all expert parameters' ``[local_slot]`` slices. Splits follow
from the placement alone (no counts are exchanged); all layers share one pair of ``all_to_all_single``
and one EDP all-reduce per call, and a phase in which no rank sends anything is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from ep_megatron.parallel.comm import exchange
from ep_megatron.parallel.groups import ParallelGroups
from ep_megatron.placement import ExpertPlacement

if TYPE_CHECKING:  # the owner sits above this module; it is only read through its attributes here
    from ep_megatron.layer.moe_layers import MoELayers


@dataclass(frozen=True)
class LayerGrads:
    """The expert gradients of one MoE layer on this rank, synced in place."""

    grads: Sequence[Tensor]  # each [local_slots, ...]; one dtype and device for all layers
    placement: ExpertPlacement  # the layer's current placement (its ep_size equals the group's)
    layer_idx: int  # row of ``placement`` this layer uses


@dataclass(frozen=True)
class SyncStats:
    """Bytes this rank sent in one sync call."""

    bytes_sent: int  # ep_bytes + edp_bytes
    layer_bytes: tuple[int, ...]  # bytes_sent split by layer, in the order the layers were given
    ep_bytes: int  # both all_to_all_single phases over the EP group
    edp_bytes: int  # ring all-reduce estimate over EDP: 2 (n - 1) / n * bytes of the owned rows


@dataclass(frozen=True)
class _LayerPlan:
    """Index maps of one layer on one EP rank, derived from the placement alone.

    Positions index this rank's *held* logical experts (ascending ids, ``H`` of them) or its *owned*
    ones (ascending ids, ``O`` of them). ``traffic`` is on CPU, the index tensors on the grads' device.
    """

    slot_held_pos: Tensor  # [S] held position of each local slot's logical expert
    copies: tuple[tuple[Tensor, Tensor], ...]  # k-th local replicas: (local slots, held positions)
    own_pos: Tensor  # [O] held positions of the owned experts
    send_pos: tuple[Tensor, ...]  # per EP rank q: held positions sent to owner q (received back later)
    recv_pos: tuple[Tensor, ...]  # per EP rank q: owned positions received from q (sent back later)
    num_held: int  # H
    traffic: Tensor  # [ep, ep] rows sent in phase 1 from src to dst; phase 2 is the transpose


def _layer_plan(placement: ExpertPlacement, layer_idx: int, ep_rank: int, device: torch.device) -> _LayerPlan:
    ep_size, slots_per_rank = placement.ep_size, placement.slots_per_rank
    num_experts = placement.num_logical_experts
    rank_ids = placement.physical_to_logical[layer_idx].view(ep_size, slots_per_rank)  # [ep, S]
    held = torch.zeros(ep_size, num_experts, dtype=torch.bool).scatter_(1, rank_ids, True)  # [ep, E]
    owner_rank = placement.owner_slot[layer_idx] // slots_per_rank  # [E]
    owns = owner_rank.unsqueeze(0) == torch.arange(ep_size).unsqueeze(1)  # [ep, E]
    sends = held.unsqueeze(1) & owns.unsqueeze(0)  # [src, dst, E]
    sends &= ~torch.eye(ep_size, dtype=torch.bool).unsqueeze(-1)

    held_ids = held[ep_rank].nonzero().flatten()  # [H]
    owned_ids = owns[ep_rank].nonzero().flatten()  # [O]
    held_pos = torch.full((num_experts,), -1, dtype=torch.int64)
    held_pos[held_ids] = torch.arange(len(held_ids))
    owned_pos = torch.full((num_experts,), -1, dtype=torch.int64)
    owned_pos[owned_ids] = torch.arange(len(owned_ids))

    local_ids = rank_ids[ep_rank]  # [S]
    slot_held_pos = held_pos[local_ids]
    # copy_index[s]: how many earlier local slots hold the same logical expert.
    copy_index = torch.tril(local_ids.unsqueeze(0) == local_ids.unsqueeze(1), -1).sum(1)
    copies = []
    for k in range(int(copy_index.max()) + 1):
        slots = (copy_index == k).nonzero().flatten()
        copies.append((slots.to(device), slot_held_pos[slots].to(device)))
    return _LayerPlan(
        slot_held_pos=slot_held_pos.to(device),
        copies=tuple(copies),
        own_pos=held_pos[owned_ids].to(device),
        send_pos=tuple(held_pos[sends[ep_rank, q].nonzero().flatten()].to(device) for q in range(ep_size)),
        recv_pos=tuple(owned_pos[sends[q, ep_rank].nonzero().flatten()].to(device) for q in range(ep_size)),
        num_held=len(held_ids),
        traffic=sends.sum(-1),
    )


def _check_layers(layers: Sequence[LayerGrads], groups: ParallelGroups, grad_scale: float) -> None:
    """Raise ``ValueError`` naming the field before any collective runs."""
    if not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale={grad_scale} must be finite")
    kinds = set()
    for i, item in enumerate(layers):
        placement = item.placement
        if placement.ep_size != groups.ep_size:
            raise ValueError(
                f"layer {i}: placement.ep_size={placement.ep_size} must equal "
                f"groups.ep_size={groups.ep_size}"
            )
        if not 0 <= item.layer_idx < placement.num_layers:
            raise ValueError(f"layer {i}: layer_idx={item.layer_idx} must be in [0, {placement.num_layers})")
        if len(item.grads) == 0:
            raise ValueError(f"layer {i}: grads must hold at least one tensor [local_slots, ...]")
        for k, grad in enumerate(item.grads):
            if grad.dim() < 1 or grad.shape[0] != placement.slots_per_rank:
                raise ValueError(
                    f"layer {i}: grads[{k}] has shape {tuple(grad.shape)}, expected "
                    f"[local_slots={placement.slots_per_rank}, ...]"
                )
            if not grad.dtype.is_floating_point:
                raise ValueError(f"layer {i}: grads[{k}] has dtype {grad.dtype}, expected a floating dtype")
            kinds.add((grad.dtype, grad.device))
    if len(kinds) > 1:
        raise ValueError(f"all expert grads must share one (dtype, device), found {sorted(map(str, kinds))}")


def _pack_rows(grads: Sequence[Tensor]) -> Tensor:
    """``[local_slots, ...]`` tensors -> ``[local_slots, row]`` rows (row = all parameters' slices)."""
    return torch.cat([grad.reshape(grad.shape[0], -1) for grad in grads], dim=1)


def _unpack_rows(rows: Tensor, grads: Sequence[Tensor]) -> None:
    """Write ``rows [local_slots, row]`` back into the ``[local_slots, ...]`` tensors."""
    widths = [grad[0].numel() for grad in grads]
    for grad, part in zip(grads, rows.split(widths, dim=1)):
        grad.copy_(part.reshape(grad.shape))


def _local_partials(rows: Tensor, plan: _LayerPlan) -> Tensor:
    """``[S, row] -> [H, row]``: sum of this rank's replicas of each held expert, ascending slot."""
    partial = rows.new_zeros(plan.num_held, rows.shape[1])
    for slots, held_pos in plan.copies:
        partial.index_add_(0, held_pos, rows[slots])
    return partial


def _ring_bytes(numel: int, element_size: int, size: int) -> int:
    return round(2 * (size - 1) / size * numel * element_size) if size > 1 else 0


@torch.no_grad()
def _sync(layers: Sequence[LayerGrads], plans: Sequence[_LayerPlan], groups: ParallelGroups,
          grad_scale: float, reduce_edp: bool = True) -> SyncStats:
    if not layers:
        return SyncStats(bytes_sent=0, layer_bytes=(), ep_bytes=0, edp_bytes=0)
    ep_rank, ep_size = groups.ep_rank, groups.ep_size
    rows = [_pack_rows(item.grads) for item in layers]  # [S, row_l]
    widths = [r.shape[1] for r in rows]
    partials = [_local_partials(r, plan) for r, plan in zip(rows, plans)]  # [H_l, row_l]
    has_traffic = any(int(plan.traffic.sum()) > 0 for plan in plans)  # same answer on every rank

    # Phase 1: non-owners send their partial rows to the owner's rank.
    received: list[list[Tensor]] = [[rows[0].new_empty(0)] * len(layers) for _ in range(ep_size)]
    if has_traffic:
        pieces = [[p[plan.send_pos[q]].flatten() for p, plan in zip(partials, plans)] for q in range(ep_size)]
        recv_numels = [[len(plan.recv_pos[q]) * w for plan, w in zip(plans, widths)] for q in range(ep_size)]
        received = exchange(pieces, recv_numels, groups.ep_group, rows[0], "replica grad sync")

    # Owner sums in fixed source-rank order; then EDP sum and scale.
    owned = []
    for i, (partial, plan, width) in enumerate(zip(partials, plans, widths)):
        total = partial.new_zeros(len(plan.own_pos), width)  # [O, row]
        for q in range(ep_size):
            if q == ep_rank:
                total += partial[plan.own_pos]
            elif len(plan.recv_pos[q]):
                total.index_add_(0, plan.recv_pos[q], received[q][i].view(-1, width))
        owned.append(total)
    flat_owned = torch.cat([t.flatten() for t in owned])
    if reduce_edp and groups.edp_size > 1:
        dist.all_reduce(flat_owned, group=groups.edp_group)
    flat_owned.mul_(grad_scale)
    owned = [t.view(-1, w) for t, w in zip(flat_owned.split([t.numel() for t in owned]), widths)]

    # Phase 2: owners send the result to every other rank holding a replica.
    if has_traffic:
        pieces = [[t[plan.recv_pos[q]].flatten() for t, plan in zip(owned, plans)] for q in range(ep_size)]
        recv_numels = [[len(plan.send_pos[q]) * w for plan, w in zip(plans, widths)] for q in range(ep_size)]
        received = exchange(pieces, recv_numels, groups.ep_group, rows[0], "replica grad sync")
    for i, (item, plan, width) in enumerate(zip(layers, plans, widths)):
        final = owned[i].new_empty(plan.num_held, width)  # [H, row]
        final[plan.own_pos] = owned[i]
        for q in range(ep_size):
            if q != ep_rank and len(plan.send_pos[q]):
                final[plan.send_pos[q]] = received[q][i].view(-1, width)
        _unpack_rows(final[plan.slot_held_pos], item.grads)

    element_size = rows[0].element_size()
    layer_ep = [
        int(plan.traffic[ep_rank].sum() + plan.traffic[:, ep_rank].sum()) * w * element_size
        for plan, w in zip(plans, widths)
    ]
    layer_edp = [_ring_bytes(t.numel(), element_size, groups.edp_size if reduce_edp else 1) for t in owned]
    return SyncStats(
        bytes_sent=sum(layer_ep) + sum(layer_edp),
        layer_bytes=tuple(a + b for a, b in zip(layer_ep, layer_edp)),
        ep_bytes=sum(layer_ep),
        edp_bytes=sum(layer_edp),
    )


def layer_plans(layers: Sequence[LayerGrads], ep_rank: int) -> list[_LayerPlan]:
    """The index plans :func:`sync_layers` derives from each layer's placement row (small index tensors
    copied to the grads' device); valid while the placement, ``layer_idx`` and device stay the same."""
    return [_layer_plan(item.placement, item.layer_idx, ep_rank, item.grads[0].device) for item in layers]


def sync_layers(layers: Sequence[LayerGrads], groups: ParallelGroups, grad_scale: float,
                reduce_edp: bool = True, plans: Sequence[_LayerPlan] | None = None) -> SyncStats:
    """Sync the expert gradients of several layers in place with one pair of EP collectives.

    Every rank must call this with the same placements and layer order. ``reduce_edp=False`` sums over
    replicas only (for a framework that reduces expert grads over the EDP group itself, e.g. DeepSpeed).
    ``plans`` (from :func:`layer_plans` for the same layers) skips re-deriving them.
    """
    _check_layers(layers, groups, grad_scale)
    if plans is None:
        plans = layer_plans(layers, groups.ep_rank)
    return _sync(layers, plans, groups, grad_scale, reduce_edp)


def sync_replica_grads(
    grads: Sequence[Tensor], placement: ExpertPlacement, layer_idx: int, groups: ParallelGroups,
    grad_scale: float, reduce_edp: bool = True,
) -> int:
    """Sync one layer's expert grads (each ``[local_slots, ...]``) in place; return bytes this rank sent."""
    return sync_layers([LayerGrads(grads, placement, layer_idx)], groups, grad_scale, reduce_edp).bytes_sent


def _expert_grads(moe: MoELayers, layer: object) -> list[Tensor]:
    """Gradients of the layer's expert parameters; a missing grad (no tokens) becomes zeros."""
    grads = []
    for param in moe.layer_expert_params(layer):
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    return grads


class ExpertGradSync:
    """Make every replica's expert gradient the replica + EDP sum times ``grad_scale``, in place.

    Reads the layers and their placement from ``moe`` at every call, so a rebalance needs nothing else;
    index plans are cached per placement object. No process group is created. ``grad_scale`` defaults to
    ``1 / world_size`` (a loss averaged over data-parallel ranks).
    """

    def __init__(self, moe: MoELayers, grad_scale: float | None = None) -> None:
        self.moe = moe
        self.grad_scale = 1.0 / moe.groups.world_size if grad_scale is None else float(grad_scale)
        if not math.isfinite(self.grad_scale):
            raise ValueError(f"grad_scale={grad_scale} must be finite")
        self._plans: tuple[ExpertPlacement, list[_LayerPlan]] | None = None

    def _layer_plans(self, items: Sequence[LayerGrads]) -> list[_LayerPlan]:
        placement = self.moe.placement
        if self._plans is None or self._plans[0] is not placement:
            device, ep_rank = items[0].grads[0].device, self.moe.groups.ep_rank
            plans = [_layer_plan(placement, item.layer_idx, ep_rank, device) for item in items]
            self._plans = (placement, plans)
        return self._plans[1]

    def sync_grads(self) -> SyncStats:
        """Sync all expert grads in place; every rank must call this after the same backward."""
        moe = self.moe
        items = [LayerGrads(_expert_grads(moe, layer), moe.placement, layer.layer_idx)
                 for layer in moe.layers]
        _check_layers(items, moe.groups, self.grad_scale)
        return _sync(items, self._layer_plans(items), moe.groups, self.grad_scale)

    __call__ = sync_grads


# ---- true gradient norm ------------------------------------------------------------------------------
@torch.no_grad()
def expert_grad_norm_sq(moe: MoELayers) -> Tensor:
    """Squared L2 norm (fp32 scalar) of the expert grads, each logical expert counted once.

    Call after the sync: only owner slots count, summed over the EP group; EDP ranks hold identical
    grads and are not summed again. Does not depend on how many replicas an expert has.
    """
    owner_mask = moe.owner_mask()  # [L, S]
    params = [moe.layer_expert_params(layer) for layer in moe.layers]
    device = next((p.device for ps in params for p in ps), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float32, device=device)
    for layer, layer_params in zip(moe.layers, params):
        owner = owner_mask[layer.layer_idx].to(device)  # [S] bool
        for param in layer_params:
            if param.grad is not None:
                total += param.grad[owner].float().pow(2).sum()
    if moe.groups.ep_size > 1:
        dist.all_reduce(total, group=moe.groups.ep_group)
    return total


@torch.no_grad()
def clip_grad_norm_(moe: MoELayers, dense_params: Iterable[Tensor], max_norm: float,
                    eps: float = 1e-6) -> Tensor:
    """Clip dense and expert grads in place by the true global norm; return that norm (fp32 scalar).

    ``dense_params`` must already be data-parallel averaged (identical on all ranks: counted once);
    expert grads must be synced (each logical expert counted once). Same on every rank, so replicas
    stay identical. The coefficient is ``min(1, max_norm / (norm + eps))``, as in torch.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm={max_norm} must be finite and > 0")
    dense_params = list(dense_params)
    if any(moe.is_expert_param(p) for p in dense_params):
        raise ValueError("dense_params must not contain expert parameters (the MoE layers count them)")
    dense = [p for p in dense_params if p.grad is not None]
    total_sq = expert_grad_norm_sq(moe)
    for param in dense:
        total_sq += param.grad.float().pow(2).sum().to(total_sq.device)
    total = total_sq.sqrt()
    coef = (max_norm / (total + eps)).clamp(max=1.0)
    for param in dense + [p for p in moe.expert_params() if p.grad is not None]:
        param.grad.mul_(coef.to(param.grad.device, param.grad.dtype))
    return total
