"""Token dispatch: replica choice, permutation, two-phase ``all_to_all_single``, combine.

For every kept (token, logical expert) pair the dispatcher picks one physical slot holding that expert:

- a replica on this rank when one exists and ``prefer_local_replica`` is set (no communication);
- otherwise the ``j``-th pair of this rank for logical expert ``e`` goes to replica
  ``(j + ep_rank) mod replica_count[e]``: each replica of a hot expert gets an equal share (+-1), the
  rotation by source rank spreads the remainders, and the choice is deterministic (never random).

Then pairs are sorted by physical slot (= destination rank, then local slot), the per-slot counts are
exchanged (phase 1, ``no_grad``, one device-to-host sync), the token rows are exchanged with variable
splits (phase 2, autograd in both directions) and sorted by local slot for the grouped expert GEMM.
``combine`` undoes all of it and sums ``probs * expert_output`` back into token order. Dispatch returns a
frozen :class:`DispatchPlan` that ``combine`` consumes; no state is kept on the dispatcher between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ep_megatron.parallel.comm import AllToAll, all_to_all
from ep_megatron.placement import ExpertPlacement


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
        per_expert = torch.bincount(logical_ids, minlength=num_experts)
        starts = torch.cumsum(per_expert, 0) - per_expert
        sorted_ids = logical_ids[order]
        occurrence = torch.empty_like(logical_ids)  # j: index of a pair among this rank's pairs of its expert
        occurrence[order] = torch.arange(logical_ids.numel(), device=logical_ids.device) - starts[sorted_ids]
        candidate = (occurrence + self.ep_rank) % table.count[logical_ids]
        return table.slots[logical_ids, candidate]

    # ---- dispatch / combine --------------------------------------------------------------------------
    def dispatch(self, tokens: Tensor, probs: Tensor, logical_ids: Tensor, keep: Tensor | None,
                 placement: ExpertPlacement, layer_idx: int) -> tuple[Tensor, DispatchPlan]:
        """Send pairs to their replicas.

        ``tokens [T, hidden]``, ``probs [T, top_k]``, ``logical_ids [T, top_k]``, ``keep [T, top_k] | None``
        -> ``(expert_input [M, hidden]`` sorted by local slot, ``plan)``. Raises ``RuntimeError`` on every
        EP rank when any EP rank called :meth:`fail` for this step.
        """
        num_tokens, top_k = logical_ids.shape
        slots_per_rank = placement.slots_per_rank
        token_of_pair = torch.arange(num_tokens, device=tokens.device).repeat_interleave(top_k)  # [T*k]
        flat_ids, flat_probs = logical_ids.reshape(-1), probs.reshape(-1)
        if keep is not None:
            kept = keep.reshape(-1).nonzero().squeeze(1)
            token_of_pair, flat_ids, flat_probs = token_of_pair[kept], flat_ids[kept], flat_probs[kept]
        slot_ids = self.choose_slots(flat_ids, self.replica_table(placement, layer_idx, tokens.device))
        send_order = torch.argsort(slot_ids, stable=True)
        token_index = token_of_pair[send_order]
        pair_probs = flat_probs[send_order]
        slot_counts = torch.bincount(slot_ids, minlength=placement.num_slots)
        slot_counts = slot_counts.view(self.ep_size, slots_per_rank)  # [ep, slots_per_rank]
        rows = tokens[token_index]  # [N, hidden], grouped by destination rank, then local slot
        if self.ep_size == 1:
            plan = DispatchPlan(num_tokens, token_index, pair_probs, [rows.shape[0]], [rows.shape[0]], None,
                                slot_counts[0].tolist())
            return rows, plan
        send_counts, recv_counts = self._exchange_counts(slot_counts, failed=False, layer_idx=layer_idx)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        # [M, hidden], grouped by source rank, then local slot
        received = AllToAll.apply(rows, send_splits, recv_splits, self.ep_group)
        local_slot_of_row = torch.arange(slots_per_rank, device=tokens.device).repeat(self.ep_size)
        local_slot_of_row = local_slot_of_row.repeat_interleave(recv_counts.to(tokens.device).flatten())
        recv_sort = torch.argsort(local_slot_of_row, stable=True)
        recv_unsort = torch.empty_like(recv_sort)
        recv_unsort[recv_sort] = torch.arange(recv_sort.numel(), device=recv_sort.device)
        plan = DispatchPlan(num_tokens, token_index, pair_probs, send_splits, recv_splits, recv_unsort,
                            recv_counts.sum(0).tolist())
        return received[recv_sort], plan

    def combine(self, expert_output: Tensor, plan: DispatchPlan) -> Tensor:
        """``expert_output [M, hidden]`` (local-slot order) -> ``[T, hidden]`` weighted sum per token."""
        rows = expert_output
        if plan.recv_unsort is not None:
            rows = AllToAll.apply(rows[plan.recv_unsort], plan.recv_splits, plan.send_splits, self.ep_group)
        weighted = rows * plan.pair_probs.to(rows.dtype).unsqueeze(1)  # [N, hidden]
        out = weighted.new_zeros(plan.num_tokens, weighted.shape[1])
        return out.index_add(0, plan.token_index, weighted)

    def fail(self, error: Exception, num_slots: int) -> None:
        """Raise ``error`` here and a ``RuntimeError`` on the other EP ranks, which learn it from the
        count exchange they are in (the first collective of a step), so no rank hangs."""
        if self.ep_size > 1:
            slot_counts = torch.zeros(self.ep_size, num_slots // self.ep_size, dtype=torch.int64)
            self._exchange_counts(slot_counts, failed=True, layer_idx=-1)
        raise error

    def _exchange_counts(self, slot_counts: Tensor, failed: bool, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Phase 1: ``slot_counts [ep, slots_per_rank]`` (rows this rank sends to each rank's slots) ->
        ``(send_counts, recv_counts)``, both ``[ep, slots_per_rank]`` on CPU; ``recv_counts[r, l]`` rows
        come from rank ``r`` for local slot ``l``. A flag column carries failures to every EP rank."""
        with torch.no_grad():
            flag = torch.full((self.ep_size, 1), int(failed), dtype=torch.int64, device=slot_counts.device)
            send = torch.cat([slot_counts.to(torch.int64), flag], dim=1).contiguous()
            ones = [1] * self.ep_size
            recv = all_to_all(send, ones, ones, self.ep_group, f"MoE layer {layer_idx} count exchange")
            send, recv = torch.stack([send, recv]).cpu().unbind(0)  # the one device-to-host sync
        failed_ranks = recv[:, -1].nonzero().flatten().tolist()
        if failed_ranks and not failed:
            raise RuntimeError(
                f"MoE layer {layer_idx}: expert-parallel rank(s) {failed_ranks} got bad input this step "
                "(see their error); all ranks of the expert-parallel group stop before the token exchange"
            )
        return send[:, :-1], recv[:, :-1]
