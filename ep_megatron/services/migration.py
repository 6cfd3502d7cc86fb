"""Row migration: moving expert slots' rows (weights and optimizer state) between EP ranks.

A slot's weights and its optimizer state are rows of stacked tensors (``[local_slots, ...]``), so moving
an expert is a row copy. :func:`migrate_rows` rewrites one layer's rows for a new placement;
:class:`OptimizerRows` is the small interface through which the rebalancer reaches every tensor that
travels with a slot. The torch adapter lives here; framework adapters live with their framework
(``ep_megatron.integrations.deepspeed.optimizer_rows``, ``ep_megatron.integrations.megatron``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ep_megatron.mixed_precision import MixedPrecisionOptimizer
from ep_megatron.parallel.comm import exchange
from ep_megatron.placement import Transfer

# Optimizers whose state is per element (every state tensor is shaped like its parameter, or a scalar
# shared by all rows such as Adam's ``step``): a slot's state is then rows of those tensors.
_ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.Rprop,
)
_ELEMENTWISE_BY_NAME = ("DeepSpeedCPUAdam", "FusedAdam")  # DeepSpeed's Adam variants (same state layout)


@runtime_checkable
class OptimizerRows(Protocol):
    """Where a layer's slot rows live: its parameters and every optimizer tensor stacked like them."""

    def gather(self, params: list[nn.Parameter]) -> list[Tensor]:
        """Tensors ``[local_slots, ...]`` that travel with the slots of ``params`` (parameters first);
        rewriting their rows in place, then :meth:`commit`, migrates the slots. May be collective."""

    def commit(self, params: list[nn.Parameter], tensors: list[Tensor]) -> None:
        """Write rewritten ``tensors`` back where :meth:`gather` read them (no-op for live views)."""

    def managed_params(self) -> set[int] | None:
        """Ids of the parameters whose state this adapter migrates; None when it cannot tell."""


class TorchOptimizerRows:
    """A plain ``torch.optim`` optimizer (or none): parameters and per-element state, updated in place.

    Scalar state (Adam's ``step``) is one value per stacked parameter, shared by all its rows and
    therefore by every slot: it needs no move.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer

    def gather(self, params: list[nn.Parameter]) -> list[Tensor]:
        tensors: list[Tensor] = []
        for p in params:
            tensors.append(p.data)
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for key in sorted(state):
                value = state[key]
                if not isinstance(value, Tensor) or value.numel() <= 1 and value.shape != p.shape:
                    continue  # scalar shared by all rows
                if value.shape != p.shape:
                    raise RuntimeError(f"optimizer state {key!r} has shape {tuple(value.shape)}, neither "
                                       f"the parameter's {tuple(p.shape)} nor a scalar: cannot migrate")
                tensors.append(value)
        return tensors

    def commit(self, params: list[nn.Parameter], tensors: list[Tensor]) -> None:
        """Nothing to do: rows were rewritten in the live tensors."""

    def managed_params(self) -> set[int] | None:
        if self.optimizer is None:
            return None
        return {id(p) for group in self.optimizer.param_groups for p in group["params"]}


class MixedPrecisionRows:
    """A :class:`~ep_megatron.mixed_precision.MixedPrecisionOptimizer`: each parameter's (bf16) rows, its
    fp32 master rows and the master's per-element state rows, updated in place."""

    def __init__(self, optimizer: MixedPrecisionOptimizer) -> None:
        self.optimizer = optimizer
        self.inner = TorchOptimizerRows(optimizer.optimizer)

    def gather(self, params: list[nn.Parameter]) -> list[Tensor]:
        tensors: list[Tensor] = []
        for p in params:
            master = self.optimizer.master(p)
            if master is not p:
                tensors.append(p.data)
            tensors += self.inner.gather([master])  # the master, then its state
        return tensors

    def commit(self, params: list[nn.Parameter], tensors: list[Tensor]) -> None:
        """Nothing to do: rows were rewritten in the live tensors."""

    def managed_params(self) -> set[int] | None:
        return {id(p) for group in self.optimizer.param_groups for p in group["params"]}


def optimizer_rows(optimizer: Any) -> OptimizerRows:
    """The :class:`OptimizerRows` of ``optimizer``: an adapter passes through, a mixed-precision wrapper
    gets :class:`MixedPrecisionRows`, a per-element torch optimizer (or None: weights only) gets
    :class:`TorchOptimizerRows`; anything else raises."""
    if isinstance(optimizer, OptimizerRows):
        return optimizer
    if isinstance(optimizer, MixedPrecisionOptimizer):
        return MixedPrecisionRows(optimizer)
    if optimizer is None:
        return TorchOptimizerRows(None)
    name = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: expected a torch.optim.Optimizer, None or an OptimizerRows adapter "
                         f"(DeepSpeed: ep_megatron.integrations.deepspeed.optimizer_rows(engine)), "
                         f"got {name}")
    if not (isinstance(optimizer, _ELEMENTWISE_OPTIMIZERS) or name in _ELEMENTWISE_BY_NAME):
        raise ValueError(f"optimizer: {name} may keep state that is not per element (cannot be migrated row "
                         f"by row); supported: "
                         f"{[c.__name__ for c in _ELEMENTWISE_OPTIMIZERS] + list(_ELEMENTWISE_BY_NAME)}")
    return TorchOptimizerRows(optimizer)


def migrate_rows(
    tensors: Sequence[Tensor],
    old_local_ids: Tensor,
    new_local_ids: Tensor,
    transfers: Sequence[Transfer],
    ep_rank: int,
    ep_size: int,
    ep_group: dist.ProcessGroup | None,
) -> int:
    """Rewrite the local-slot rows of ``tensors`` (each ``[slots_per_rank, ...]``) in place for one layer.

    ``old_local_ids`` / ``new_local_ids [slots_per_rank]``: logical expert of each local slot before and
    after. A slot that keeps its expert keeps its row; a slot whose expert this rank held before copies
    the old row locally; the rest arrive from ``transfers`` (this layer's, identical on every EP rank)
    in one ``all_to_all_single`` of raw bytes, skipped when the layer has no transfer at all. Returns
    the bytes this rank sent. Collective over ``ep_group`` whenever ``transfers`` is non-empty.
    """
    num_slots = old_local_ids.numel()
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != num_slots:
            raise ValueError(f"tensor of shape {tuple(t.shape)} is not stacked by {num_slots} local slots")
    received: dict[int, list[Tensor]] = {}
    sent = 0
    if transfers:
        received, sent = _exchange_rows(tensors, transfers, ep_rank, ep_size, ep_group)

    old_ids, new_ids = old_local_ids.tolist(), new_local_ids.tolist()
    if old_ids == new_ids:
        return sent
    source = []  # per new local slot: old local slot to copy, or -1 to take a received row
    for local_slot, logical_id in enumerate(new_ids):
        if old_ids[local_slot] == logical_id:
            source.append(local_slot)
        elif logical_id in old_ids:
            source.append(old_ids.index(logical_id))
        elif logical_id in received:
            source.append(-1)
        else:
            raise RuntimeError(f"local slot {local_slot} needs logical expert {logical_id}, which this rank "
                               f"neither holds nor receives")
    index = torch.tensor(source, dtype=torch.int64)
    for k, t in enumerate(tensors):
        new = t.index_select(0, index.clamp(min=0).to(t.device))
        for local_slot in (index < 0).nonzero().flatten().tolist():
            new[local_slot] = received[new_ids[local_slot]][k]
        t.copy_(new)
    return sent


def _exchange_rows(tensors: Sequence[Tensor], transfers: Sequence[Transfer], ep_rank: int, ep_size: int,
                   ep_group: dist.ProcessGroup | None) -> tuple[dict[int, list[Tensor]], int]:
    """Send this rank's outgoing slots as raw bytes, one piece per transfer, in (destination, logical id)
    order; return ``{logical_id: [row of each tensor]}`` of the incoming ones and the bytes sent."""
    row_nbytes = [t[0].numel() * t.element_size() for t in tensors]
    slot_nbytes = sum(row_nbytes)
    sends = sorted((t for t in transfers if t.src_ep_rank == ep_rank),
                   key=lambda t: (t.dst_ep_rank, t.logical_id))
    recvs = sorted((t for t in transfers if t.dst_ep_rank == ep_rank),
                   key=lambda t: (t.src_ep_rank, t.logical_id))
    pieces: list[list[Tensor]] = [[] for _ in range(ep_size)]
    for s in sends:
        row = [t[s.src_local_slot].reshape(-1).view(torch.uint8) for t in tensors]
        pieces[s.dst_ep_rank].append(torch.cat(row))
    recv_numels: list[list[int]] = [[] for _ in range(ep_size)]
    for r in recvs:
        recv_numels[r.src_ep_rank].append(slot_nbytes)
    like = torch.empty(0, dtype=torch.uint8, device=tensors[0].device)
    received_by_src = exchange(pieces, recv_numels, ep_group, like, "expert row migration")
    chunks = iter([chunk for per_src in received_by_src for chunk in per_src])  # recvs' order
    received = {}
    for r, chunk in zip(recvs, chunks):
        rows, offset = [], 0
        for t, nbytes in zip(tensors, row_nbytes):
            # clone(): a fresh, aligned buffer before reinterpreting bytes as t.dtype
            rows.append(chunk[offset : offset + nbytes].clone().view(t.dtype).view(t.shape[1:]))
            offset += nbytes
        received[r.logical_id] = rows
    return received, slot_nbytes * len(sends)
