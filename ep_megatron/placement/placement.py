"""Expert placement: which logical expert each physical slot of each MoE layer holds.

Ids never mix: a **logical** expert ``e ∈ [0, E)`` is the model's expert, a **physical slot**
``p ∈ [0, P)`` is a global slot id (held by expert-parallel rank ``p // slots_per_rank``), a **local
slot** ``l ∈ [0, P / ep_size)`` indexes a rank's stacked expert weights. Every "rank" in this module
is a rank of the expert-parallel group (``ep_rank ∈ [0, ep_size)``), never a global rank. The four
sharding strategies (``data``, ``model``, ``hybrid``, ``dynamic``) are just constructors of the same
object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

STRATEGIES = ("data", "model", "hybrid", "dynamic")


@dataclass(frozen=True)
class Transfer:
    """One logical expert's rows sent from EP rank ``src_ep_rank`` to ``dst_ep_rank`` for one layer."""

    layer: int  # MoE layer index
    logical_id: int  # the logical expert whose weights travel
    src_ep_rank: int  # an EP rank holding ``logical_id`` in the old placement
    src_local_slot: int  # the source's local slot in the old placement
    dst_ep_rank: int  # the EP rank that needs ``logical_id`` and held no replica of it


@dataclass(frozen=True)
class PlacementDiff:
    """What migrating from one placement to another must do."""

    changed_slots: torch.Tensor  # [L, P] bool, slots whose logical expert changes
    transfers: tuple[Transfer, ...]  # network copies, one per (layer, logical expert, destination rank)

    @property
    def num_changed_slots(self) -> int:
        return int(self.changed_slots.sum())


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    """Slot-to-expert map of all MoE layers of a model; immutable, kept on CPU.

    ``physical_to_logical [L, P]`` is the only input; ``logical_to_physical [L, E, max_replicas]``
    (sorted slot ids, -1 padded), ``replica_count [L, E]`` and ``owner_slot [L, E]`` are derived.
    """

    physical_to_logical: torch.Tensor  # [L, P] int64: logical expert of each physical slot
    num_logical_experts: int  # E, logical experts per MoE layer
    ep_size: int  # expert-parallel size; slots are split evenly over the EP ranks
    num_nodes: int = 1  # nodes the expert-parallel ranks span (for hierarchical planning)
    strategy: str = "dynamic"  # the sharding strategy this placement was built for (informational)

    def __post_init__(self) -> None:
        phy2log = torch.as_tensor(self.physical_to_logical)
        if phy2log.dim() != 2 or phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
            raise ValueError(
                f"physical_to_logical must be an integer tensor [num_layers, num_slots], "
                f"got dtype {phy2log.dtype} and shape {tuple(phy2log.shape)}"
            )
        phy2log = phy2log.to(device="cpu", dtype=torch.int64).contiguous()
        num_layers, num_slots = phy2log.shape
        num_experts = self.num_logical_experts
        if num_layers < 1:
            raise ValueError("physical_to_logical needs at least one layer (num_layers >= 1)")
        if num_experts < 1:
            raise ValueError(f"num_logical_experts={num_experts} must be >= 1")
        if self.ep_size < 1 or num_slots % self.ep_size != 0:
            raise ValueError(
                f"num_slots={num_slots} must be a positive multiple of ep_size={self.ep_size}"
            )
        if self.num_nodes < 1 or self.ep_size % self.num_nodes != 0:
            raise ValueError(
                f"num_nodes={self.num_nodes} must be a positive divisor of ep_size={self.ep_size}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} must be one of {STRATEGIES}")
        if num_slots < num_experts:
            raise ValueError(f"num_slots={num_slots} must be >= num_logical_experts={num_experts}")
        if phy2log.min() < 0 or phy2log.max() >= num_experts:
            raise ValueError(f"physical_to_logical values must be in [0, {num_experts})")
        replica_count = _replica_count(phy2log, num_experts)
        missing = (replica_count == 0).nonzero()
        if len(missing):
            layer, expert = missing[0].tolist()
            raise ValueError(f"logical expert {expert} of layer {layer} has no physical slot")
        log2phy = _logical_to_physical(phy2log, replica_count)
        owner_index = torch.arange(num_experts).expand(num_layers, -1) % replica_count
        object.__setattr__(self, "physical_to_logical", phy2log)
        object.__setattr__(self, "replica_count", replica_count)
        object.__setattr__(self, "logical_to_physical", log2phy)
        object.__setattr__(self, "owner_slot", log2phy.gather(2, owner_index.unsqueeze(-1)).squeeze(-1))

    # Derived maps, set in __post_init__; declared for type checkers and readers.
    replica_count: torch.Tensor = field(init=False, repr=False)  # [L, E] slots per logical expert
    logical_to_physical: torch.Tensor = field(init=False, repr=False)  # [L, E, max_replicas], -1 padded
    owner_slot: torch.Tensor = field(init=False, repr=False)  # [L, E] replica that owns the expert

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_slots(self) -> int:
        return self.physical_to_logical.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    @property
    def ranks_per_node(self) -> int:
        return self.ep_size // self.num_nodes

    @property
    def max_replicas(self) -> int:
        return self.logical_to_physical.shape[2]

    @property
    def slot_ep_rank(self) -> torch.Tensor:
        """``[P]`` EP rank holding each physical slot."""
        return torch.arange(self.num_slots) // self.slots_per_rank

    def local_logical_ids(self, ep_rank: int) -> torch.Tensor:
        """``[L, slots_per_rank]`` logical expert of each local slot of ``ep_rank``."""
        self._check_ep_rank(ep_rank)
        start = ep_rank * self.slots_per_rank
        return self.physical_to_logical[:, start : start + self.slots_per_rank]

    def is_owner(self, ep_rank: int) -> torch.Tensor:
        """``[L, slots_per_rank]`` bool: which local slots of ``ep_rank`` own their logical expert."""
        self._check_ep_rank(ep_rank)
        start = ep_rank * self.slots_per_rank
        local_slots = torch.arange(start, start + self.slots_per_rank)
        owners = self.owner_slot.gather(1, self.local_logical_ids(ep_rank))
        return owners == local_slots

    def _check_ep_rank(self, ep_rank: int) -> None:
        if not 0 <= ep_rank < self.ep_size:
            raise ValueError(f"ep_rank={ep_rank} must be in [0, ep_size={self.ep_size})")

    # ---- strategies ---------------------------------------------------------------------------
    @classmethod
    def data(cls, num_layers: int, num_experts: int, ep_size: int, num_nodes: int = 1) -> ExpertPlacement:
        """Every rank holds every expert: ``P = E * ep_size``."""
        row = torch.arange(num_experts).repeat(ep_size)
        return cls(row.expand(num_layers, -1), num_experts, ep_size, num_nodes, "data")

    @classmethod
    def model(cls, num_layers: int, num_experts: int, ep_size: int, num_nodes: int = 1) -> ExpertPlacement:
        """One copy of each expert, contiguous blocks per rank (Megatron's expert order)."""
        if ep_size < 1 or num_experts % ep_size != 0:
            raise ValueError(
                f"model strategy needs num_experts={num_experts} divisible by ep_size={ep_size}"
            )
        row = torch.arange(num_experts)
        return cls(row.expand(num_layers, -1), num_experts, ep_size, num_nodes, "model")

    @classmethod
    def hybrid(
        cls,
        num_layers: int,
        num_experts: int,
        ep_size: int,
        replicated_experts: Sequence[int],
        num_nodes: int = 1,
    ) -> ExpertPlacement:
        """``replicated_experts`` live on every rank; the others are sharded in contiguous blocks."""
        replicated = sorted(set(int(e) for e in replicated_experts))
        if len(replicated) != len(replicated_experts):
            raise ValueError(f"replicated_experts={list(replicated_experts)} contains duplicates")
        if any(not 0 <= e < num_experts for e in replicated):
            raise ValueError(f"replicated_experts={replicated} must be in [0, num_experts={num_experts})")
        sharded = [e for e in range(num_experts) if e not in replicated]
        if ep_size < 1 or len(sharded) % ep_size != 0:
            raise ValueError(
                f"hybrid strategy shards {len(sharded)} non-replicated experts, which must be divisible "
                f"by ep_size={ep_size}"
            )
        block = len(sharded) // ep_size
        row = [e for r in range(ep_size) for e in replicated + sharded[r * block : (r + 1) * block]]
        return cls(torch.tensor(row).expand(num_layers, -1), num_experts, ep_size, num_nodes, "hybrid")

    @classmethod
    def dynamic(
        cls,
        num_layers: int,
        num_experts: int,
        ep_size: int,
        num_redundant: int,
        num_nodes: int = 1,
    ) -> ExpertPlacement:
        """``E + num_redundant`` slots before any load is measured: slot ``p`` holds ``p mod E``.

        The rebalance hook re-plans from measured load; :meth:`from_plan` wraps the planner's output.
        """
        num_slots = num_experts + num_redundant
        if num_redundant < 0 or ep_size < 1 or num_slots % ep_size != 0:
            raise ValueError(
                f"dynamic strategy needs num_redundant={num_redundant} >= 0 with num_experts + num_redundant "
                f"= {num_slots} divisible by ep_size={ep_size}"
            )
        row = torch.arange(num_slots) % num_experts
        return cls(row.expand(num_layers, -1), num_experts, ep_size, num_nodes, "dynamic")

    @classmethod
    def from_plan(
        cls, physical_to_logical: torch.Tensor, num_experts: int, ep_size: int, num_nodes: int = 1
    ) -> ExpertPlacement:
        """Wrap a planner's ``phy2log [L, P]`` as a ``dynamic`` placement."""
        return cls(physical_to_logical, num_experts, ep_size, num_nodes, "dynamic")

    @classmethod
    def build(
        cls,
        strategy: str,
        num_layers: int,
        num_experts: int,
        ep_size: int,
        *,
        replicated_experts: Sequence[int] = (),
        num_redundant: int = 0,
        num_nodes: int = 1,
    ) -> ExpertPlacement:
        """Construct the placement of a named strategy (as a config names it)."""
        if strategy == "data":
            return cls.data(num_layers, num_experts, ep_size, num_nodes)
        if strategy == "model":
            return cls.model(num_layers, num_experts, ep_size, num_nodes)
        if strategy == "hybrid":
            return cls.hybrid(num_layers, num_experts, ep_size, replicated_experts, num_nodes)
        if strategy == "dynamic":
            return cls.dynamic(num_layers, num_experts, ep_size, num_redundant, num_nodes)
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")

    # ---- comparison, serialisation, migration plan ------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertPlacement):
            return NotImplemented
        return (
            self.num_logical_experts == other.num_logical_experts
            and self.ep_size == other.ep_size
            and self.num_nodes == other.num_nodes
            and self.physical_to_logical.shape == other.physical_to_logical.shape
            and bool(torch.equal(self.physical_to_logical, other.physical_to_logical))
        )

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (for checkpoints)."""
        return {
            "physical_to_logical": self.physical_to_logical.tolist(),
            "num_logical_experts": self.num_logical_experts,
            "ep_size": self.ep_size,
            "num_nodes": self.num_nodes,
            "strategy": self.strategy,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ExpertPlacement:
        """Inverse of :meth:`to_dict` (checkpoints of format 1 name ``ep_size`` ``num_ranks``)."""
        if "num_ranks" in state and "ep_size" not in state:
            state = {("ep_size" if k == "num_ranks" else k): v for k, v in state.items()}
        keys = {"physical_to_logical", "num_logical_experts", "ep_size", "num_nodes", "strategy"}
        if set(state) != keys:
            raise ValueError(f"placement dict has keys {sorted(state)}, expected {sorted(keys)}")
        return cls(
            torch.tensor(state["physical_to_logical"], dtype=torch.int64),
            int(state["num_logical_experts"]),
            int(state["ep_size"]),
            int(state["num_nodes"]),
            str(state["strategy"]),
        )

    def diff(self, new: ExpertPlacement) -> PlacementDiff:
        """Migration from ``self`` (old) to ``new``: changed slots and network transfers.

        A rank that already holds a replica of an expert it needs copies it locally; otherwise it
        receives it once, from an old holder chosen round-robin over holders (by destination rank)
        so that senders share the work.
        """
        if (new.num_layers, new.num_logical_experts, new.ep_size) != (
            self.num_layers,
            self.num_logical_experts,
            self.ep_size,
        ):
            raise ValueError(
                "placements differ in (num_layers, num_logical_experts, ep_size): "
                f"{(self.num_layers, self.num_logical_experts, self.ep_size)} vs "
                f"{(new.num_layers, new.num_logical_experts, new.ep_size)}"
            )
        if self.num_slots != new.num_slots:
            raise ValueError(f"placements differ in num_slots: {self.num_slots} vs {new.num_slots}")
        changed = self.physical_to_logical != new.physical_to_logical
        old_held = _held_by_rank(self)  # [L, ep_size, E] bool
        new_held = _held_by_rank(new)
        transfers = []
        for layer, dst_ep_rank, logical_id in (new_held & ~old_held).nonzero().tolist():
            holders = old_held[layer, :, logical_id].nonzero().flatten()
            src_ep_rank = int(holders[dst_ep_rank % len(holders)])
            src_slots = self.local_logical_ids(src_ep_rank)[layer]
            src_local_slot = int((src_slots == logical_id).nonzero()[0])
            transfers.append(Transfer(layer, logical_id, src_ep_rank, src_local_slot, dst_ep_rank))
        return PlacementDiff(changed_slots=changed, transfers=tuple(transfers))


def _replica_count(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[L, P] -> [L, E]`` number of slots per logical expert."""
    counts = torch.zeros(phy2log.shape[0], num_experts, dtype=torch.int64)
    return counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))


def _logical_to_physical(phy2log: torch.Tensor, replica_count: torch.Tensor) -> torch.Tensor:
    """``[L, P] -> [L, E, max_replicas]`` sorted slot ids per logical expert, -1 padded."""
    num_layers, num_slots = phy2log.shape
    num_experts = replica_count.shape[1]
    # Stable sort by logical id keeps slot ids ascending within each expert.
    order = torch.sort(phy2log, dim=1, stable=True).indices  # [L, P] slot ids grouped by expert
    starts = torch.cumsum(replica_count, dim=1) - replica_count  # [L, E]
    replica_index = torch.arange(num_slots).expand(num_layers, -1) - starts.gather(
        1, phy2log.gather(1, order)
    )
    log2phy = torch.full((num_layers, num_experts, int(replica_count.max())), -1, dtype=torch.int64)
    log2phy[torch.arange(num_layers).unsqueeze(1), phy2log.gather(1, order), replica_index] = order
    return log2phy


def _held_by_rank(placement: ExpertPlacement) -> torch.Tensor:
    """``[L, ep_size, E]`` bool: whether an EP rank holds at least one replica of each logical expert."""
    per_rank = placement.physical_to_logical.view(placement.num_layers, placement.ep_size, -1)
    held = torch.zeros(*per_rank.shape[:2], placement.num_logical_experts, dtype=torch.bool)
    return held.scatter_(2, per_rank, True)
