"""Replica gradient sync: every physical slot gets the full gradient of its logical expert.

After ``backward`` a replica's gradient holds only the tokens it served. The true gradient of logical
expert ``e`` is the sum over all its replicas (on every EP rank) and all expert-data-parallel (EDP)
ranks, times ``grad_scale``. With the fixed EP and EDP groups of :class:`ParallelGroups`, layer by layer
and in place in each expert parameter's gradient ``[local_slots, ...]``:

1. each rank adds its other local replicas of ``e`` into ``e``'s *lead* slot (its lowest local slot),
   in ascending slot order;
2. non-owner ranks send their lead rows to the owner's rank (one ``all_to_all_single`` over EP per
   parameter; only the sent rows are copied);
3. the owner adds them into its lead row, source EP rank by source EP rank, ascending (deterministic);
4. the owned lead rows are all-reduced over EDP and scaled by ``grad_scale`` (in place, with nothing
   copied, when every local slot owns its expert, as in the ``model`` placement);
5. owners send the result back to every rank holding a replica (a second ``all_to_all_single``), which
   overwrites its lead row and then its other local copies with the same bytes.

Splits follow from the placement alone (no counts are exchanged), and a phase in which no rank sends
anything is skipped. Memory: one parameter's sent and received rows (both phases share these two
buffers), or its owned rows, on top of the gradients - less than one layer's expert gradients; nothing
for ``model`` (and only an in-place all-reduce with EDP).

:class:`ExpertGradSync` can run the sync of each layer from backward hooks, as soon as that layer's
expert gradients are complete (:meth:`ExpertGradSync.arm` before the last backward of a step), on a side
CUDA stream so the transfers overlap the rest of the backward; :meth:`ExpertGradSync.sync_grads` then
syncs what the hooks did not and waits. The arithmetic is the same either way: every replica ends with
the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ep_megatron.parallel.comm import all_reduce, all_to_all
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

    @classmethod
    def of_layers(cls, per_layer: Sequence[tuple[int, int]]) -> SyncStats:
        """From ``(ep_bytes, edp_bytes)`` per layer."""
        ep, edp = sum(b for b, _ in per_layer), sum(b for _, b in per_layer)
        return cls(bytes_sent=ep + edp, layer_bytes=tuple(a + b for a, b in per_layer), ep_bytes=ep,
                   edp_bytes=edp)


@dataclass(frozen=True)
class _LayerPlan:
    """Index maps of one layer on one EP rank, derived from the placement alone.

    Index tensors are local slots on the grads' device; splits and ``traffic`` are on the host. Rows sent
    to an owner and received by it are ordered by (peer EP rank, logical id) on both sides.
    """

    copies: tuple[tuple[Tensor, Tensor], ...]  # k-th local replicas, k >= 1: (local slots, their lead slots)
    send_slots: Tensor  # [Ns] lead slots of held, not owned experts, by owner rank
    send_splits: list[int]  # [ep] rows sent to each owner rank in phase 1 (received back in phase 2)
    recv_slots: tuple[Tensor, ...]  # per source EP rank q: lead slots its rows add into (phase 1)
    recv_all: Tensor  # [Nr] recv_slots concatenated: the rows sent back in phase 2
    recv_splits: list[int]  # [ep] rows received from each rank in phase 1 (sent back in phase 2)
    owned_slots: Tensor  # [O] lead slots of the owned experts (ascending logical id)
    all_owned: bool  # every local slot is the lead of an expert this rank owns: EDP reduce in place
    traffic: Tensor  # [ep, ep] rows sent in phase 1 from src to dst (host); phase 2 is the transpose


def _layer_plan(placement: ExpertPlacement, layer_idx: int, ep_rank: int, device: torch.device) -> _LayerPlan:
    ep_size, slots_per_rank = placement.ep_size, placement.slots_per_rank
    num_experts = placement.num_logical_experts
    rank_ids = placement.physical_to_logical[layer_idx].view(ep_size, slots_per_rank)  # [ep, S]
    held = torch.zeros(ep_size, num_experts, dtype=torch.bool).scatter_(1, rank_ids, True)  # [ep, E]
    owner_rank = placement.owner_slot[layer_idx] // slots_per_rank  # [E]
    owns = owner_rank.unsqueeze(0) == torch.arange(ep_size).unsqueeze(1)  # [ep, E]
    sends = held.unsqueeze(1) & owns.unsqueeze(0)  # [src, dst, E]
    sends &= ~torch.eye(ep_size, dtype=torch.bool).unsqueeze(-1)

    # lead[r, e]: lowest local slot of rank r holding e (S where none)
    slot = torch.arange(slots_per_rank).expand(ep_size, -1)
    lead = torch.full((ep_size, num_experts), slots_per_rank, dtype=torch.int64)
    lead = lead.scatter_reduce(1, rank_ids, slot, reduce="amin")
    local_ids = rank_ids[ep_rank]  # [S]
    copy_index = torch.tril(local_ids.unsqueeze(0) == local_ids.unsqueeze(1), -1).sum(1)  # earlier copies
    copies = []
    for k in range(1, int(copy_index.max()) + 1):
        slots = (copy_index == k).nonzero().flatten()
        copies.append((slots.to(device), lead[ep_rank, local_ids[slots]].to(device)))
    send_experts = [sends[ep_rank, q].nonzero().flatten() for q in range(ep_size)]
    recv_experts = [sends[q, ep_rank].nonzero().flatten() for q in range(ep_size)]
    owned_ids = owns[ep_rank].nonzero().flatten()
    owned_slots = lead[ep_rank, owned_ids]
    return _LayerPlan(
        copies=tuple(copies),
        send_slots=lead[ep_rank, torch.cat(send_experts)].to(device),
        send_splits=[len(ids) for ids in send_experts],
        recv_slots=tuple(lead[ep_rank, ids].to(device) for ids in recv_experts),
        recv_all=lead[ep_rank, torch.cat(recv_experts)].to(device),
        recv_splits=[len(ids) for ids in recv_experts],
        owned_slots=owned_slots.to(device),
        all_owned=len(owned_slots) == slots_per_rank,
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


def _ring_bytes(numel: int, element_size: int, size: int) -> int:
    return round(2 * (size - 1) / size * numel * element_size) if size > 1 else 0


def _sync_tensor(grad: Tensor, plan: _LayerPlan, groups: ParallelGroups, grad_scale: float,
                 reduce_edp: bool, has_traffic: bool) -> None:
    """Steps 1-5 for one gradient ``[local_slots, ...]``, in place. The two all-to-alls share their two
    buffers (phase 2 sends from phase 1's receive buffer and receives into its send buffer)."""
    ep_rank, ep_group = groups.ep_rank, groups.ep_group
    for slots, leads in plan.copies:  # 1. local replicas into their lead slot, ascending
        grad.index_add_(0, leads, grad.index_select(0, slots))
    sent = received = None
    if has_traffic:  # 2. + 3. partial sums to the owner, added in source-rank order
        sent = grad.index_select(0, plan.send_slots)
        received = all_to_all(sent, plan.send_splits, plan.recv_splits, ep_group, "replica grad sync")
        start = 0
        for q, count in enumerate(plan.recv_splits):
            if q != ep_rank and count:
                grad.index_add_(0, plan.recv_slots[q], received[start : start + count])
            start += count
    edp = reduce_edp and groups.edp_size > 1  # 4. EDP sum and scale of the owned rows
    if edp and not plan.all_owned:
        owned = grad.index_select(0, plan.owned_slots)
        all_reduce(owned, groups.edp_group, "expert-data-parallel grad sum")
        if grad_scale != 1.0:
            owned.mul_(grad_scale)
        grad.index_copy_(0, plan.owned_slots, owned)
        del owned
    else:  # in place: rows that are not owned are overwritten below
        if edp:
            all_reduce(grad, groups.edp_group, "expert-data-parallel grad sum")
        if grad_scale != 1.0:
            grad.mul_(grad_scale)
    if sent is not None and received is not None:  # 5. the result back to every holder, then its copies
        torch.index_select(grad, 0, plan.recv_all, out=received)
        all_to_all(received, plan.recv_splits, plan.send_splits, ep_group, "replica grad sync", out=sent)
        grad.index_copy_(0, plan.send_slots, sent)
    for slots, leads in plan.copies:
        grad.index_copy_(0, slots, grad.index_select(0, leads))


@torch.no_grad()
def _sync_layer(item: LayerGrads, plan: _LayerPlan, groups: ParallelGroups, grad_scale: float,
                reduce_edp: bool) -> tuple[int, int]:
    """Sync one layer's grads in place; return this rank's ``(ep_bytes, edp_bytes)``."""
    has_traffic = int(plan.traffic.sum()) > 0  # same answer on every rank
    for grad in item.grads:
        _sync_tensor(grad, plan, groups, grad_scale, reduce_edp, has_traffic)
    ep_rank = groups.ep_rank
    row_numel = sum(grad[0].numel() for grad in item.grads)
    element_size = item.grads[0].element_size()
    ep_rows = int(plan.traffic[ep_rank].sum() + plan.traffic[:, ep_rank].sum())
    edp_size = groups.edp_size if reduce_edp else 1
    return (ep_rows * row_numel * element_size,
            _ring_bytes(len(plan.owned_slots) * row_numel, element_size, edp_size))


def layer_plans(layers: Sequence[LayerGrads], ep_rank: int) -> list[_LayerPlan]:
    """The index plans :func:`sync_layers` derives from each layer's placement row (small index tensors
    copied to the grads' device); valid while the placement, ``layer_idx`` and device stay the same."""
    return [_layer_plan(item.placement, item.layer_idx, ep_rank, item.grads[0].device) for item in layers]


def sync_layers(layers: Sequence[LayerGrads], groups: ParallelGroups, grad_scale: float,
                reduce_edp: bool = True, plans: Sequence[_LayerPlan] | None = None) -> SyncStats:
    """Sync the expert gradients of several layers in place, layer by layer.

    Every rank must call this with the same placements and layer order. ``reduce_edp=False`` sums over
    replicas only (for a framework that reduces expert grads over the EDP group itself, e.g. DeepSpeed).
    ``plans`` (from :func:`layer_plans` for the same layers) skips re-deriving them.
    """
    _check_layers(layers, groups, grad_scale)
    if plans is None:
        plans = layer_plans(layers, groups.ep_rank)
    return SyncStats.of_layers([_sync_layer(item, plan, groups, grad_scale, reduce_edp)
                                for item, plan in zip(layers, plans)])


def sync_replica_grads(
    grads: Sequence[Tensor], placement: ExpertPlacement, layer_idx: int, groups: ParallelGroups,
    grad_scale: float, reduce_edp: bool = True,
) -> int:
    """Sync one layer's expert grads (each ``[local_slots, ...]``) in place; return bytes this rank sent."""
    return sync_layers([LayerGrads(grads, placement, layer_idx)], groups, grad_scale, reduce_edp).bytes_sent


def _expert_grads(moe: MoELayers, layer: Any) -> list[Tensor]:
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

    Two ways to use it, with the same result:

    - ``loss.backward(); sync()`` syncs every layer after the backward;
    - ``sync.arm(); loss.backward(); sync()`` syncs each layer from a hook as soon as its expert
      gradients are complete (on CUDA on a side stream, overlapping the rest of the backward); ``sync()``
      then syncs what is left and waits. Arm only before the last backward of a step (with gradient
      accumulation, the earlier micro-batches must not sync). The hooks rely on every rank running the
      same backward graph, which the MoE layers guarantee (every expert parameter joins the graph).
    """

    def __init__(self, moe: MoELayers, grad_scale: float | None = None) -> None:
        self.moe = moe
        self.grad_scale = 1.0 / moe.groups.world_size if grad_scale is None else float(grad_scale)
        if not math.isfinite(self.grad_scale):
            raise ValueError(f"grad_scale={grad_scale} must be finite")
        self._plans: tuple[ExpertPlacement, dict[int, _LayerPlan]] | None = None
        self._armed = False
        self._arrived: dict[int, int] = {}  # layer position -> expert grads complete in this backward
        self._done: dict[int, tuple[int, int]] = {}  # layer position -> bytes of its sync
        self._stream: Any = None  # CUDA side stream of the hook syncs (created on first use)
        self._handles = []
        for position, layer in enumerate(moe.layers):
            for param in moe.layer_expert_params(layer):
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(position)))

    def _plan(self, layer: Any, device: torch.device) -> _LayerPlan:
        placement = self.moe.placement
        if self._plans is None or self._plans[0] is not placement:
            self._plans = (placement, {})
        plans = self._plans[1]
        if layer.layer_idx not in plans:
            plans[layer.layer_idx] = _layer_plan(placement, layer.layer_idx, self.moe.groups.ep_rank, device)
        return plans[layer.layer_idx]

    def _item(self, layer: Any) -> LayerGrads:
        return LayerGrads(_expert_grads(self.moe, layer), self.moe.placement, layer.layer_idx)

    def arm(self) -> None:
        """Sync each layer from backward hooks during the next backward (see the class docstring)."""
        items = [self._item(layer) for layer in self.moe.layers]
        _check_layers(items, self.moe.groups, self.grad_scale)
        self._armed, self._arrived, self._done = True, {}, {}

    def _hook(self, position: int) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if not self._armed or position in self._done:
                return
            self._arrived[position] = self._arrived.get(position, 0) + 1
            layer = self.moe.layers[position]
            if self._arrived[position] == len(self.moe.layer_expert_params(layer)):
                self._done[position] = self._run(layer, overlap=True)

        return hook

    def _run(self, layer: Any, overlap: bool) -> tuple[int, int]:
        item = self._item(layer)
        device = item.grads[0].device
        plan = self._plan(layer, device)
        if not (overlap and device.type == "cuda"):
            return _sync_layer(item, plan, self.moe.groups, self.grad_scale, True)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            return _sync_layer(item, plan, self.moe.groups, self.grad_scale, True)

    def sync_grads(self) -> SyncStats:
        """Sync all expert grads in place (the layers the hooks have not synced yet, in layer order) and
        wait for the hooks' transfers; every rank must call this after the same backward."""
        moe = self.moe
        if not self._armed:
            _check_layers([self._item(layer) for layer in moe.layers], moe.groups, self.grad_scale)
        done, self._armed, self._arrived, self._done = self._done, False, {}, {}
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        per_layer = [done[i] if i in done else self._run(layer, overlap=False)
                     for i, layer in enumerate(moe.layers)]
        return SyncStats.of_layers(per_layer)

    __call__ = sync_grads


# ---- true gradient norm ------------------------------------------------------------------------------
@torch.no_grad()
def expert_grad_norm_sq(moe: MoELayers) -> Tensor:
    """Squared L2 norm (fp32 scalar) of the expert grads, each logical expert counted once.

    Call after the sync: only owner slots count, summed over the EP group; EDP ranks hold identical
    grads and are not summed again. Does not depend on how many replicas an expert has. Reads nothing
    on the host (owner slots are weighted, not selected).
    """
    owner_mask = moe.owner_mask()  # [L, S]
    params = [moe.layer_expert_params(layer) for layer in moe.layers]
    device = next((p.device for ps in params for p in ps), torch.device("cpu"))
    owner_weight = owner_mask.to(torch.float32).to(device)  # [L, S]
    total = torch.zeros((), dtype=torch.float32, device=device)
    for layer, layer_params in zip(moe.layers, params):
        for param in layer_params:
            if param.grad is not None:
                per_slot = param.grad.reshape(param.shape[0], -1).float().pow(2).sum(1)  # [S]
                total += (per_slot * owner_weight[layer.layer_idx]).sum()
    if moe.groups.ep_size > 1:
        all_reduce(total, moe.groups.ep_group, "expert grad norm")
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
