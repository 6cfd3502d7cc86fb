"""Training-time expert rebalancing: load window, plan, migrate weights and optimizer state, switch.

The training loop calls :meth:`Rebalancer.step` once per optimizer step on every rank, after
``optimizer.step()`` and ``zero_grad()``. Every ``interval`` steps (after ``warmup``) the summed load
window is all-reduced once, rank 0 plans with :func:`ep_megatron.placement.eplb.rebalance_experts` and
broadcasts ``phy2log [L, P]``, and every rank migrates the rows of the slots whose logical expert changes
(expert weights, every per-element optimizer state tensor, fp32 master rows under DeepSpeed mixed precision)
with one ``all_to_all_single`` per layer over the expert-parallel group. Only then does the new
placement become active on every layer. Dropless training math does not depend on the placement, so
rebalancing changes speed, never the losses.

Ids: **logical** expert ``e``, **physical slot** ``p`` (global), **local slot** ``l`` (row of a rank's
stacked expert weights), as in :mod:`ep_megatron.placement`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ep_megatron.parallel import ParallelGroups
from ep_megatron.placement import ExpertPlacement, Transfer, eplb

logger = logging.getLogger(__name__)

PLANNERS = ("global", "hierarchical")

# Optimizers whose state is per element (every state tensor is shaped like its parameter, or a scalar
# shared by all rows such as Adam's ``step``): a slot's state is then rows of those tensors.
_ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.Rprop,
)
_ELEMENTWISE_BY_NAME = ("DeepSpeedCPUAdam", "FusedAdam")  # DeepSpeed's Adam variants (same state layout)


class MoELayerLike(Protocol):
    """What the rebalancer needs of an MoE layer (``ep_megatron.layer.MoELayer`` provides it)."""

    experts: nn.Module  # parameters stacked by local slot along dim 0
    placement: ExpertPlacement  # the model's placement (all MoE layers); this layer uses row layer_idx
    layer_idx: int

    def take_load(self) -> Tensor: ...  # [E] int64 (token, logical expert) pairs routed since last call

    def set_placement(self, placement: ExpertPlacement) -> None: ...


@dataclass
class RebalanceConfig:
    """When and how to re-plan the expert placement during training."""

    interval: int = 100  # optimizer steps between re-plans (> 0)
    window: int = 100  # steps of load history summed for a plan (> 0)
    warmup: int = 0  # first re-plan at step warmup + interval (>= 0)
    num_redundant_experts: int = 0  # physical slots beyond the logical experts: P = E + this (>= 0)
    planner: str = "global"  # "global" or "hierarchical" (groups packed onto nodes first)
    ranks_per_node: int = 0  # EP ranks per node for the hierarchical planner (0: all on one node)
    num_groups: int = 1  # expert groups (consecutive logical experts) for the hierarchical planner
    max_moved_fraction: float = 1.0  # per-layer cap on newly placed copies, as a fraction of P
    balance_tolerance: float = 0.005  # planner: accepted loss of balance to keep a slot in place
    min_gain: float = 0.0  # keep a layer's placement unless mean/max per rank improves by >= this
    enabled: bool = True  # False: count steps and drain loads, never re-plan

    def __post_init__(self) -> None:
        for name in ("interval", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        for name in ("warmup", "num_redundant_experts", "ranks_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an int >= 0, got {value!r}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups: must be >= 1, got {self.num_groups}")
        if self.planner not in PLANNERS:
            raise ValueError(f"planner: must be one of {PLANNERS}, got {self.planner!r}")
        if not 0.0 <= self.max_moved_fraction <= 1.0:
            raise ValueError(f"max_moved_fraction: must be in [0, 1], got {self.max_moved_fraction}")
        if not 0.0 <= self.balance_tolerance < 1.0:
            raise ValueError(f"balance_tolerance: must be in [0, 1), got {self.balance_tolerance}")
        if not 0.0 <= self.min_gain <= 1.0:
            raise ValueError(f"min_gain: must be in [0, 1], got {self.min_gain}")

    def num_nodes(self, ep_size: int) -> int:
        """Nodes the ``ep_size`` expert-parallel ranks span under this config."""
        if self.planner == "global" or self.ranks_per_node == 0:
            return 1
        return ep_size // self.ranks_per_node


@dataclass(frozen=True)
class RebalanceMetrics:
    """What one rebalance did. Balancedness is mean / max tokens per EP rank, one value per layer.

    ``planned_*`` score the old and new placement on the window the plan was made from (hindsight);
    ``realized_*`` score the previous rebalance's old and new placement on the load routed since it
    (prediction), ``None`` at the first rebalance.
    """

    step: int  # optimizer step at which the rebalance ran
    planned_before: list[float]  # [L] old placement on the planning window
    planned_after: list[float]  # [L] new placement on the planning window
    realized_before: list[float] | None  # [L] previous rebalance: its old placement on the load since
    realized_after: list[float] | None  # [L] previous rebalance: its new placement on the load since
    layers_changed: list[bool]  # [L] whether the layer's placement changed
    slots_moved: int  # physical slots (all layers) whose logical expert changed
    moved_fraction: float  # newly placed (layer, rank, expert) copies / (L * P)
    bytes_sent_per_rank: list[int]  # [ep_size] bytes each EP rank sent over the network
    plan_ms: float  # all-reduce of the window, planning, broadcast
    migrate_ms: float  # diff, row migration, placement switch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_balancedness(physical_to_logical: Tensor, load: Tensor, num_ranks: int) -> list[float]:
    """``[L]`` mean / max tokens per rank of each layer (1.0 for a layer without load).

    ``physical_to_logical [L, P]``, ``load [L, E]``: tokens per logical expert, split evenly over the
    expert's replicas (what the dispatcher does).
    """
    return eplb.layer_balancedness(physical_to_logical, load, num_ranks).tolist()


# ---- row migration ------------------------------------------------------------------------------
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
    sends = sorted((t for t in transfers if t.src_rank == ep_rank), key=lambda t: (t.dst_rank, t.logical_id))
    recvs = sorted((t for t in transfers if t.dst_rank == ep_rank), key=lambda t: (t.src_rank, t.logical_id))
    row_nbytes = [t[0].numel() * t.element_size() for t in tensors]
    received: dict[int, list[Tensor]] = {}
    sent = 0
    if transfers:
        received, sent = _exchange_rows(tensors, sends, recvs, row_nbytes, ep_size, ep_group)

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


def _exchange_rows(tensors: Sequence[Tensor], sends: list[Transfer], recvs: list[Transfer],
                   row_nbytes: list[int], ep_size: int, ep_group: dist.ProcessGroup | None
                   ) -> tuple[dict[int, list[Tensor]], int]:
    """One ``all_to_all_single`` of packed rows; returns ``{logical_id: [row of each tensor]}`` and the
    bytes sent."""
    device = tensors[0].device
    slot_nbytes = sum(row_nbytes)
    send_rows = [
        torch.cat([t[s.src_local_slot].reshape(-1).view(torch.uint8) for t in tensors]) for s in sends
    ]
    send_buf = torch.cat(send_rows) if send_rows else torch.empty(0, dtype=torch.uint8, device=device)
    in_splits = [0] * ep_size
    out_splits = [0] * ep_size
    for s in sends:
        in_splits[s.dst_rank] += slot_nbytes
    for r in recvs:
        out_splits[r.src_rank] += slot_nbytes
    recv_buf = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv_buf, send_buf, out_splits, in_splits, group=ep_group)
    received = {}
    for i, r in enumerate(recvs):
        chunk = recv_buf[i * slot_nbytes : (i + 1) * slot_nbytes]
        rows, offset = [], 0
        for t, nbytes in zip(tensors, row_nbytes):
            # clone(): a fresh, aligned buffer before reinterpreting bytes as t.dtype
            rows.append(chunk[offset : offset + nbytes].clone().view(t.dtype).view(t.shape[1:]))
            offset += nbytes
        received[r.logical_id] = rows
    return received, send_buf.numel()


# ---- where a layer's rows live: parameters and optimizer state --------------------------------------
class _RowSource(Protocol):
    """The tensors stacked by local slot that travel with a slot, and how to write them back."""

    def gather(self, params: list[nn.Parameter]) -> list[Tensor]: ...

    def commit(self, params: list[nn.Parameter], tensors: list[Tensor]) -> None: ...


class _TorchOptimizerRows:
    """A plain ``torch.optim`` optimizer: parameters and per-element state tensors, updated in place.

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


def deepspeed_state_keys(engine: Any) -> list[str]:
    """Per-element state names (``exp_avg``, ...) of a DeepSpeed ZeRO-1/2 / bf16 optimizer's base
    optimizer, whose state lives on flat fp32 partitions; empty before its first step."""
    base = getattr(engine.optimizer, "optimizer", None)
    keys = set()
    for state in getattr(base, "state", {}).values():
        keys.update(k for k, v in state.items() if isinstance(v, Tensor) and v.numel() > 1)
    return sorted(keys)


class _DeepSpeedHpRows:
    """DeepSpeed ZeRO 1/2 or bf16 optimizer: low-precision parameter rows plus the fp32 master and
    optimizer-state rows, read and written whole with DeepSpeed's public ``safe_*_full_*`` helpers
    (each a collective over the parameter's data-parallel group, reached by all ranks in order)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def _state_keys(self) -> list[str]:
        return deepspeed_state_keys(self.engine)

    def gather(self, params: list[nn.Parameter]) -> list[Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        tensors: list[Tensor] = []
        for p in params:
            master = safe_get_full_fp32_param(p)
            if master is None:
                raise RuntimeError("an expert parameter is not managed by the DeepSpeed optimizer")
            tensors += [p.data, master.clone()]
            tensors += [safe_get_full_optimizer_state(p, key).clone() for key in self._state_keys()]
        return tensors

    def commit(self, params: list[nn.Parameter], tensors: list[Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        keys = self._state_keys()
        per_param = 2 + len(keys)
        for i, p in enumerate(params):
            own = tensors[i * per_param : (i + 1) * per_param]
            safe_set_full_fp32_param(p, own[1])
            for key, value in zip(keys, own[2:]):
                safe_set_full_optimizer_state(p, value, key)


def _row_source(optimizer: Any) -> _RowSource:
    """Pick how optimizer state is migrated; raise ``ValueError`` for what cannot be."""
    if optimizer is None:
        return _TorchOptimizerRows(None)
    if hasattr(optimizer, "zero_optimization_stage"):  # a DeepSpeed engine
        stage = optimizer.zero_optimization_stage()
        if stage == 3:
            raise ValueError("optimizer: DeepSpeed ZeRO stage 3 is not supported (expert rows are "
                             "partitioned per parameter); use ZeRO stage 0, 1 or 2")
        wrapper = type(optimizer.optimizer).__name__
        if wrapper in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):  # linked to the public safe_* helpers
            return _DeepSpeedHpRows(optimizer)
        if optimizer.fp16_enabled() or optimizer.bfloat16_enabled():
            raise ValueError(f"optimizer: DeepSpeed's {wrapper} (ZeRO stage {stage} with fp16/bf16) keeps "
                             f"fp32 masters without public accessors; use ZeRO stage 1 or 2")
        return _row_source(optimizer.optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: expected a torch.optim.Optimizer or a DeepSpeed engine, got "
                         f"{type(optimizer).__name__}")
    name = type(optimizer).__name__
    if not (isinstance(optimizer, _ELEMENTWISE_OPTIMIZERS) or name in _ELEMENTWISE_BY_NAME):
        raise ValueError(f"optimizer: {type(optimizer).__name__} may keep state that is not per element "
                         f"(cannot be migrated row by row); supported: "
                         f"{[c.__name__ for c in _ELEMENTWISE_OPTIMIZERS] + list(_ELEMENTWISE_BY_NAME)}")
    return _TorchOptimizerRows(optimizer)


def _optimizer_params(optimizer: Any) -> set[int] | None:
    """Ids of the parameters ``optimizer`` updates (None where it cannot be told)."""
    opt = optimizer.optimizer if hasattr(optimizer, "zero_optimization_stage") else optimizer
    groups = getattr(opt, "param_groups", None)
    if groups is None or hasattr(optimizer, "zero_optimization_stage"):
        return None  # DeepSpeed's groups hold flat partitions, not the model's parameters
    return {id(p) for g in groups for p in g["params"]}


# ---- the hook -------------------------------------------------------------------------------------
class Rebalancer:
    """Periodic expert re-placement for a model's MoE layers; call :meth:`step` after every optimizer step.

    Every rank must construct it with the same config and call ``step()`` the same number of times.
    ``optimizer`` is a ``torch.optim`` optimizer, a DeepSpeed engine (ZeRO 0/1/2), or None (weights only).
    ``on_placement_change(new)`` (optional) runs after the switch, e.g. to refresh caches built from
    the placement.
    """

    def __init__(self, layers: Sequence[MoELayerLike], optimizer: Any, groups: ParallelGroups,
                 config: RebalanceConfig,
                 on_placement_change: Callable[[ExpertPlacement], None] | None = None) -> None:
        if not layers:
            raise ValueError("layers: need at least one MoE layer")
        self.layers = sorted(layers, key=lambda layer: layer.layer_idx)
        self.groups, self.config, self.on_placement_change = groups, config, on_placement_change
        placement = self.placement
        self._check_layout(placement)
        self._rows = _row_source(optimizer)
        known = _optimizer_params(optimizer) if optimizer is not None else None
        for layer in self.layers:
            for name, p in layer.experts.named_parameters():
                if p.dim() == 0 or p.shape[0] != placement.slots_per_rank:
                    raise ValueError(f"expert parameter {name} of layer {layer.layer_idx} has shape "
                                     f"{tuple(p.shape)}; dim 0 must be the {placement.slots_per_rank} "
                                     f"local slots")
                if known is not None and id(p) not in known:
                    raise ValueError(f"optimizer: expert parameter {name} of layer {layer.layer_idx} is not "
                                     f"in its param_groups; its state could not be migrated")
        shape = (placement.num_layers, placement.num_logical_experts)
        self.step_count = 0  # optimizer steps seen, identical on every rank
        self.load_window = torch.zeros(config.window, *shape, dtype=torch.int64)  # [W, L, E] local counts
        self.since_rebalance = torch.zeros(shape, dtype=torch.int64)  # [L, E] local counts since last
        self._previous_plan: tuple[Tensor, Tensor] | None = None  # (old, new) phy2log of last rebalance

    @property
    def placement(self) -> ExpertPlacement:
        """The active placement (read from the layers, so a checkpoint restore is seen)."""
        return self.layers[0].placement

    def _check_layout(self, placement: ExpertPlacement) -> None:
        cfg, ep_size = self.config, self.groups.ep_size
        indices = [layer.layer_idx for layer in self.layers]
        if indices != list(range(placement.num_layers)):
            raise ValueError(f"layers: need one layer per placement row 0..{placement.num_layers - 1}, "
                             f"got layer_idx {indices}")
        if any(layer.placement != placement for layer in self.layers):
            raise ValueError("layers: all MoE layers must share one placement")
        num_experts = placement.num_logical_experts
        num_slots = num_experts + cfg.num_redundant_experts
        if num_slots % ep_size:
            raise ValueError(f"num_redundant_experts: slots E + R = {num_experts} + "
                             f"{cfg.num_redundant_experts} must be divisible by the expert-parallel size "
                             f"{ep_size}")
        if placement.num_slots != num_slots:
            raise ValueError(f"num_redundant_experts: {cfg.num_redundant_experts} gives {num_slots} slots, "
                             f"but the layers' placement has {placement.num_slots}")
        if placement.num_ranks != ep_size:
            raise ValueError(f"placement spans {placement.num_ranks} ranks, expert-parallel size is "
                             f"{ep_size}")
        if cfg.planner == "hierarchical":
            if cfg.ranks_per_node < 1 or ep_size % cfg.ranks_per_node:
                raise ValueError(f"ranks_per_node: must be a positive divisor of ep_size={ep_size} for the "
                                 f"hierarchical planner, got {cfg.ranks_per_node}")
            num_nodes = cfg.num_nodes(ep_size)
            if num_experts % cfg.num_groups or cfg.num_groups % num_nodes:
                raise ValueError(f"num_groups: must divide E={num_experts} and be a multiple of the "
                                 f"{num_nodes} nodes, got {cfg.num_groups}")

    # ---- per step ----------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether the rebalance runs at the end of optimizer step ``step`` (1-based)."""
        cfg = self.config
        return cfg.enabled and step > cfg.warmup and (step - cfg.warmup) % cfg.interval == 0

    def step(self) -> RebalanceMetrics | None:
        """Record this step's loads; at a due step re-plan and migrate. Same call count on all ranks."""
        self.step_count += 1
        load = torch.stack([layer.take_load().detach().to("cpu", torch.int64) for layer in self.layers])
        self.load_window[(self.step_count - 1) % self.config.window] = load
        self.since_rebalance += load
        if not self.due(self.step_count):
            return None
        return self._rebalance()

    def _rebalance(self) -> RebalanceMetrics:
        start = time.perf_counter()
        self._check_grads_zero()
        old = self.placement
        counts = torch.stack([self.load_window.sum(0), self.since_rebalance])  # [2, L, E]
        if self.groups.dp_group is not None:
            dist.all_reduce(counts, group=self.groups.dp_group)
        window_load, since_load = counts[0].double(), counts[1].double()
        phy2log, planned_before, planned_after = self._plan(old, window_load)
        planned = time.perf_counter()

        new = ExpertPlacement.from_plan(phy2log, old.num_logical_experts, old.num_ranks, old.num_nodes)
        diff = old.diff(new)
        bytes_sent = self.migrate_to(new, diff.transfers)
        done = time.perf_counter()

        realized = None
        if self._previous_plan is not None:
            realized = [layer_balancedness(p2l, since_load, old.num_ranks) for p2l in self._previous_plan]
        self._previous_plan = (old.physical_to_logical, new.physical_to_logical)
        self.since_rebalance.zero_()
        metrics = RebalanceMetrics(
            step=self.step_count,
            planned_before=planned_before,
            planned_after=planned_after,
            realized_before=realized[0] if realized else None,
            realized_after=realized[1] if realized else None,
            layers_changed=diff.changed_slots.any(1).tolist(),
            slots_moved=diff.num_changed_slots,
            moved_fraction=eplb.moved_copies(old.physical_to_logical, phy2log, old.num_ranks),
            bytes_sent_per_rank=bytes_sent,
            plan_ms=(planned - start) * 1e3,
            migrate_ms=(done - planned) * 1e3,
        )
        if self.groups.rank == 0:
            logger.info("rebalance at step %d: worst-layer balancedness %.3f -> %.3f (planning window), "
                        "%d slots moved, %.1f KiB sent, plan %.1f ms, migrate %.1f ms", metrics.step,
                        min(planned_before), min(planned_after), metrics.slots_moved,
                        sum(bytes_sent) / 1024, metrics.plan_ms, metrics.migrate_ms)
        return metrics

    def _plan(self, old: ExpertPlacement, window_load: Tensor) -> tuple[Tensor, list[float], list[float]]:
        """Plan on rank 0 of the data-parallel group, broadcast ``phy2log [L, P]`` to every rank."""
        cfg, num_ranks = self.config, old.num_ranks
        previous = old.physical_to_logical
        planner_rank = self.groups.dp_group is None or dist.get_rank(self.groups.dp_group) == 0
        if planner_rank:
            phy2log, _, _ = eplb.rebalance_experts(
                window_load, old.num_slots, cfg.num_groups if cfg.planner == "hierarchical" else 1,
                cfg.num_nodes(num_ranks), num_ranks, previous=previous,
                balance_tolerance=cfg.balance_tolerance, max_moved_fraction=cfg.max_moved_fraction)
            gain = torch.tensor(layer_balancedness(phy2log, window_load, num_ranks)) - torch.tensor(
                layer_balancedness(previous, window_load, num_ranks))
            keep = (gain < cfg.min_gain) | (gain <= 0)
            phy2log = torch.where(keep[:, None], previous, phy2log).contiguous()
        else:
            phy2log = torch.empty_like(previous)
        if self.groups.dp_group is not None:
            dist.broadcast(phy2log, group=self.groups.dp_group, group_src=0)
        return (phy2log, layer_balancedness(previous, window_load, num_ranks),
                layer_balancedness(phy2log, window_load, num_ranks))

    def _check_grads_zero(self) -> None:
        for layer in self.layers:
            for name, p in layer.experts.named_parameters():
                if p.grad is not None and bool(p.grad.any()):
                    raise RuntimeError(f"expert gradient {name} of layer {layer.layer_idx} is not zero at "
                                       f"the rebalance: call Rebalancer.step() after optimizer.step() and "
                                       f"zero_grad()")

    @torch.no_grad()
    def migrate_to(self, new: ExpertPlacement, transfers: Sequence[Transfer] | None = None) -> list[int]:
        """Move every layer's rows (weights, optimizer state) to ``new``, then make it active on all layers.

        ``transfers`` defaults to ``placement.diff(new).transfers``. Collective over the EP group (and,
        under DeepSpeed, the parameters' data-parallel groups); every rank passes the same ``new``.
        Returns ``[ep_size]`` bytes each EP rank sent (same on every rank).
        """
        old = self.placement
        if transfers is None:
            transfers = old.diff(new).transfers
        self._check_grads_zero()
        bytes_sent = self._migrate(old, new, transfers)
        for layer in self.layers:
            layer.set_placement(new)
        if self.on_placement_change is not None:
            self.on_placement_change(new)
        return bytes_sent

    def _migrate(self, old: ExpertPlacement, new: ExpertPlacement,
                 transfers: Sequence[Transfer]) -> list[int]:
        ep_rank, ep_size = self.groups.ep_rank, self.groups.ep_size
        bytes_sent = [0] * ep_size
        for layer in self.layers:
            idx = layer.layer_idx
            layer_transfers = [t for t in transfers if t.layer == idx]
            old_ids = old.local_logical_ids(ep_rank)[idx]
            new_ids = new.local_logical_ids(ep_rank)[idx]
            unchanged = torch.equal(old.physical_to_logical[idx], new.physical_to_logical[idx])
            if unchanged and not layer_transfers:
                continue
            params = list(layer.experts.parameters())
            tensors = self._rows.gather(params)
            sent_before = bytes_sent[ep_rank]
            sent = migrate_rows(tensors, old_ids, new_ids, layer_transfers, ep_rank, ep_size,
                                self.groups.ep_group)
            self._rows.commit(params, tensors)
            slot_nbytes = sum(t[0].numel() * t.element_size() for t in tensors)
            for t in layer_transfers:
                bytes_sent[t.src_rank] += slot_nbytes
            if sent != bytes_sent[ep_rank] - sent_before:
                raise RuntimeError(f"layer {idx}: sent {sent} bytes, the plan says "
                                   f"{bytes_sent[ep_rank] - sent_before}")
        return bytes_sent

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, load window and last plan: plain ints, lists and tensors."""
        previous = None
        if self._previous_plan is not None:
            previous = [p2l.tolist() for p2l in self._previous_plan]
        return {
            "step_count": self.step_count,
            "load_window": self.load_window.clone(),
            "since_rebalance": self.since_rebalance.clone(),
            "previous_plan": previous,
            "placement": self.placement.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the layers' placement is restored by the checkpoint itself."""
        window = torch.as_tensor(state["load_window"], dtype=torch.int64)
        since = torch.as_tensor(state["since_rebalance"], dtype=torch.int64)
        if window.shape != self.load_window.shape or since.shape != self.since_rebalance.shape:
            raise ValueError(f"load_window: saved shape {tuple(window.shape)} does not match this run's "
                             f"{tuple(self.load_window.shape)} (window, layers, experts)")
        self.step_count = int(state["step_count"])
        self.load_window.copy_(window)
        self.since_rebalance.copy_(since)
        previous = state.get("previous_plan")
        self._previous_plan = None
        if previous is not None and ExpertPlacement.from_dict(state["placement"]) == self.placement:
            self._previous_plan = tuple(torch.tensor(p2l, dtype=torch.int64) for p2l in previous)

