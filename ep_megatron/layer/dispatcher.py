"""Token dispatch: replica choice, permutation, two-phase ``all_to_all_single``, combine.

For every kept (token, logical expert) pair the dispatcher picks one physical slot holding that expert:

- a replica on this rank when one exists and ``prefer_local_replica`` is set (no communication);
- otherwise the ``j``-th pair of this rank for logical expert ``e`` goes to replica
  ``(j + ep_rank) mod replica_count[e]``: each replica of a hot expert gets an equal share (+-1), the
  rotation by source rank spreads the remainders, and the choice is deterministic (never random).

A forward runs in three phases, so the layer can decide between them:

1. :meth:`TokenDispatcher.permute` (local, no host read): pairs sorted by physical slot (= destination
   rank, then local slot), per-slot counts on the device;
2. :meth:`TokenDispatcher.exchange_counts`: the per-slot counts and a small status vector of every rank
   (NaN/inf count, dropped pairs, a bad-input flag) are exchanged with one ``all_to_all_single`` and read
   on the host once - the one device-to-host sync of the layer; a rank that failed is seen by every EP
   rank here, before any token moves;
3. :meth:`TokenDispatcher.exchange_tokens`: the token rows go out with variable splits (autograd in both
   directions) and are sorted by local slot for the grouped expert GEMM.

``combine`` undoes all of it and sums ``probs * expert_output`` back into token order, running an
optional computation (the shared expert) while its all-to-all is in flight. Dispatch returns a frozen
:class:`DispatchPlan` that ``combine`` consumes; no state is kept on the dispatcher between calls.
Indices are built with ``scatter`` / ``index_select`` on the device (no ``bincount``, ``nonzero`` or
``repeat_interleave`` without ``output_size``), so nothing else makes the host wait for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ep_megatron.parallel.comm import AllToAll, Pending, all_to_all
from ep_megatron.placement import ExpertPlacement

STATUS_ERROR, STATUS_DROPPED = 0, 1  # status columns: error code (see TokenDispatcher), dropped pairs
STATUS_WIDTH = 2
BAD_INPUT = -1  # error code of a rank whose input failed the layer's checks (any > 0: NaN/inf logits)


@dataclass(frozen=True)
class Permutation:
    """This rank's pairs in send order (sorted by physical slot), before any communication."""

    token_index: Tensor  # [N] int64 source token of each pair
    pair_probs: Tensor  # [N] routing weight of each pair (autograd)
    slot_counts: Tensor  # [ep, slots_per_rank] int64 pairs for each rank's local slots (device)


@dataclass(frozen=True)
class CountExchange:
    """Phase 1 of the dispatch: who sends how many rows to whom, and every EP rank's status."""

    send_counts: Tensor  # [ep, slots_per_rank] int64 (host) rows this rank sends to rank r's local slot l
    recv_counts: Tensor  # [ep, slots_per_rank] int64 (host) rows rank r sends to this rank's local slot l
    recv_counts_device: Tensor  # recv_counts on the tokens' device (index building without a copy)
    statuses: Tensor  # [ep, STATUS_WIDTH] int64 (host): each EP rank's status vector

    def failed_ranks(self) -> list[int]:
        """EP ranks whose status holds an error code (bad input or NaN/inf router logits)."""
        return [r for r, code in enumerate(self.statuses[:, STATUS_ERROR].tolist()) if code != 0]


@dataclass(frozen=True)
class DispatchPlan:
    """Everything ``combine`` needs to bring expert outputs back to token order."""

    num_tokens: int  # T, tokens of this rank
    token_index: Tensor  # [N] int64 source token of each sent pair, in send order (sorted by slot)
    pair_probs: Tensor  # [N] routing weight of each sent pair (autograd), in send order
    send_splits: list[int]  # [ep_size] rows sent to each rank
    recv_splits: list[int]  # [ep_size] rows received from each rank
    recv_unsort: Tensor | None  # [M] int64 maps local-slot-sorted rows back to receive order (ep > 1)
    tokens_per_local_slot: list[int]  # [slots_per_rank] rows each local slot computes (sum M)
    slot_offsets: Tensor  # [slots_per_rank] int64 end row of each local slot's segment (device)


@dataclass(frozen=True)
class _ReplicaTable:
    """Candidate slots of each logical expert as seen from one rank."""

    slots: Tensor  # [E, max_candidates] int64 physical slots to spread over (padded by repetition)
    count: Tensor  # [E] int64 number of candidates


class TokenDispatcher:
    """Moves (token, logical expert) pairs to the ranks holding a replica, and their outputs back."""

    def __init__(self, ep_rank: int, ep_size: int, ep_group: dist.ProcessGroup | None,
                 prefer_local_replica: bool = True) -> None:
        self.ep_rank, self.ep_size, self.ep_group = ep_rank, ep_size, ep_group
        self.prefer_local_replica = prefer_local_replica
        self._table_key: tuple[ExpertPlacement, int, torch.device] | None = None
        self._table: _ReplicaTable | None = None

    # ---- replica choice --------------------------------------------------------------------------
    def replica_table(self, placement: ExpertPlacement, layer_idx: int,
                      device: torch.device) -> _ReplicaTable:
        """Candidate slots per logical expert: the local replicas if preferred and present, else all."""
        key = (placement, layer_idx, device)
        if self._table is not None and self._table_key is not None and self._table_key[0] is placement \
                and self._table_key[1:] == key[1:]:
            return self._table
        log2phy = placement.logical_to_physical[layer_idx]  # [E, R], -1 padded
        count = placement.replica_count[layer_idx].clone()  # [E]
        slots = log2phy.clone()
        if self.prefer_local_replica:
            local = (log2phy >= 0) & (log2phy // placement.slots_per_rank == self.ep_rank)  # [E, R]
            has_local = local.any(dim=1)
            # Stable sort puts local slots first (ascending), keeping the rest in order.
            local_first = torch.sort((~local).to(torch.int8), dim=1, stable=True).indices
            slots = torch.where(has_local.unsqueeze(1), log2phy.gather(1, local_first), log2phy)
            count = torch.where(has_local, local.sum(dim=1), count)
        # Pad each row by repeating its candidates so a gather with index < count is always valid.
        column = torch.arange(slots.shape[1]).expand_as(slots) % count.unsqueeze(1)
        slots = slots.gather(1, column)
        self._table_key = key
        self._table = _ReplicaTable(slots=slots.to(device), count=count.to(device))
        return self._table

    def choose_slots(self, logical_ids: Tensor, table: _ReplicaTable) -> Tensor:
        """``logical_ids [N] -> [N]`` physical slots: the ``j``-th pair of expert ``e`` gets candidate
        ``(j + ep_rank) mod count[e]``."""
        num_experts = table.count.numel()
        order = torch.argsort(logical_ids, stable=True)
        per_expert = torch.zeros(num_experts, dtype=torch.int64, device=logical_ids.device)
        per_expert.scatter_add_(0, logical_ids, torch.ones_like(logical_ids))
        starts = torch.cumsum(per_expert, 0) - per_expert
        position = torch.arange(logical_ids.numel(), device=logical_ids.device)
        # j: index of a pair among this rank's pairs of its expert, written back to pair order
        occurrence_sorted = position - starts[logical_ids[order]]
        occurrence = torch.empty_like(logical_ids).scatter_(0, order, occurrence_sorted)
        candidate = (occurrence + self.ep_rank) % table.count[logical_ids]
        return table.slots[logical_ids, candidate]

    # ---- dispatch / combine --------------------------------------------------------------------------
    def permute(self, probs: Tensor, logical_ids: Tensor, keep: Tensor | None, placement: ExpertPlacement,
                layer_idx: int) -> Permutation:
        """``probs [T, top_k]``, ``logical_ids [T, top_k]``, ``keep [T, top_k] | None`` -> the kept pairs
        sorted by physical slot, with per-slot counts. Local; reads nothing on the host (except the
        ``nonzero`` of capacity mode)."""
        num_tokens, top_k = logical_ids.shape
        device = logical_ids.device
        token_of_pair = torch.arange(num_tokens * top_k, device=device) // top_k  # [T*k]
        flat_ids, flat_probs = logical_ids.reshape(-1), probs.reshape(-1)
        if keep is not None:
            kept = keep.reshape(-1).nonzero().squeeze(1)
            token_of_pair, flat_ids, flat_probs = token_of_pair[kept], flat_ids[kept], flat_probs[kept]
        slot_ids = self.choose_slots(flat_ids, self.replica_table(placement, layer_idx, device))
        send_order = torch.argsort(slot_ids, stable=True)
        slot_counts = torch.zeros(placement.num_slots, dtype=torch.int64, device=device)
        slot_counts.scatter_add_(0, slot_ids, torch.ones_like(slot_ids))
        return Permutation(token_index=token_of_pair.index_select(0, send_order),
                           pair_probs=flat_probs.index_select(0, send_order),
                           slot_counts=slot_counts.view(self.ep_size, placement.slots_per_rank))

    def exchange_counts(self, slot_counts: Tensor, status: Tensor, layer_idx: int) -> CountExchange:
        """Phase 1: ``slot_counts [ep, slots_per_rank]`` and this rank's ``status [STATUS_WIDTH]`` (int64,
        same device) -> every rank's counts for this rank and every EP rank's status, read on the host
        with one device-to-host copy (the layer's one sync). Collective over the EP group when ep > 1."""
        with torch.no_grad():
            send = torch.cat([slot_counts, status.view(1, -1).expand(self.ep_size, -1)], dim=1).contiguous()
            if self.ep_size > 1:
                ones = [1] * self.ep_size
                recv = all_to_all(send, ones, ones, self.ep_group, f"MoE layer {layer_idx} count exchange")
            else:
                recv = send
            host_send, host_recv = torch.stack([send, recv]).cpu().unbind(0)  # the one device-to-host sync
        width = slot_counts.shape[1]
        return CountExchange(send_counts=host_send[:, :width], recv_counts=host_recv[:, :width],
                             recv_counts_device=recv[:, :width], statuses=host_recv[:, width:])

    def exchange_tokens(self, tokens: Tensor, permutation: Permutation,
                        counts: CountExchange) -> tuple[Tensor, DispatchPlan]:
        """Phase 2: ``tokens [T, hidden]`` -> ``(expert_input [M, hidden]`` sorted by local slot, ``plan)``.
        Collective over the EP group when ep > 1; call only when no EP rank failed in phase 1."""
        rows = tokens.index_select(0, permutation.token_index)  # [N, hidden], by destination rank, local slot
        num_tokens = tokens.shape[0]
        send_splits = counts.send_counts.sum(1).tolist()
        if self.ep_size == 1:
            plan = DispatchPlan(num_tokens, permutation.token_index, permutation.pair_probs, send_splits,
                                send_splits, None, counts.send_counts[0].tolist(),
                                permutation.slot_counts[0].cumsum(0))
            return rows, plan
        recv_splits = counts.recv_counts.sum(1).tolist()
        # [M, hidden], grouped by source rank, then local slot
        received = AllToAll.apply(rows, send_splits, recv_splits, self.ep_group)
        slots_per_rank = counts.recv_counts.shape[1]
        recv_device = counts.recv_counts_device
        local_slot_of_row = torch.arange(slots_per_rank, device=tokens.device).repeat(self.ep_size)
        local_slot_of_row = local_slot_of_row.repeat_interleave(recv_device.flatten(),
                                                                output_size=received.shape[0])
        recv_sort = torch.argsort(local_slot_of_row, stable=True)
        positions = torch.arange(recv_sort.numel(), device=recv_sort.device)
        recv_unsort = torch.empty_like(recv_sort).scatter_(0, recv_sort, positions)
        plan = DispatchPlan(num_tokens, permutation.token_index, permutation.pair_probs, send_splits,
                            recv_splits, recv_unsort, counts.recv_counts.sum(0).tolist(),
                            recv_device.sum(0).cumsum(0))
        return received.index_select(0, recv_sort), plan

    def combine(self, expert_output: Tensor, plan: DispatchPlan,
                overlap: Callable[[], Tensor] | None = None) -> Tensor:
        """``expert_output [M, hidden]`` (local-slot order) -> ``[T, hidden]`` weighted sum per token, plus
        ``overlap()`` (``[T, hidden]``, e.g. the shared expert), computed while the all-to-all is in
        flight."""
        rows, extra = expert_output, None
        if plan.recv_unsort is not None:
            pending = Pending()
            rows = AllToAll.apply(rows.index_select(0, plan.recv_unsort), plan.recv_splits, plan.send_splits,
                                  self.ep_group, pending)
            extra = overlap() if overlap is not None else None
            pending.wait()
        elif overlap is not None:
            extra = overlap()
        weighted = rows * plan.pair_probs.to(rows.dtype).unsqueeze(1)  # [N, hidden]
        out = weighted.new_zeros(plan.num_tokens, weighted.shape[1]).index_add(0, plan.token_index, weighted)
        return out if extra is None else out + extra

    def fail(self, error: Exception, slots_per_rank: int, device: torch.device) -> None:
        """Raise ``error`` here and a ``RuntimeError`` on the other EP ranks, which learn it from the count
        exchange they are in (the first collective of a layer forward), so no rank hangs. ``device`` is the
        layer's device: the same collective as the normal path, on the same device."""
        if self.ep_size > 1:
            slot_counts = torch.zeros(self.ep_size, slots_per_rank, dtype=torch.int64, device=device)
            status = torch.zeros(STATUS_WIDTH, dtype=torch.int64, device=device)
            status[STATUS_ERROR] = BAD_INPUT
            self.exchange_counts(slot_counts, status, layer_idx=-1)
        raise error
