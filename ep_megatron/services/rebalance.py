"""Training-time expert rebalancing: load window, plan, migrate weights and optimizer state, switch.

The training loop calls :meth:`Rebalancer.step` once per optimizer step on every rank, after
``optimizer.step()`` and ``zero_grad()``, with the step's load from :meth:`MoELayers.take_loads`. Every
``interval`` steps (after ``warmup``) the summed load window is all-reduced once, rank 0 plans with
:func:`ep_megatron.placement.eplb.rebalance_experts` and broadcasts ``phy2log [L, P]``, and every rank
migrates the rows of the slots whose logical expert changes (expert weights and every optimizer tensor
stacked like them, through :mod:`ep_megatron.services.migration`) with one ``all_to_all_single`` per
layer over the expert-parallel group. Only then does :meth:`MoELayers.set_placement` make the new
placement active. Dropless training math does not depend on the placement, so rebalancing changes speed,
never the losses. The number of slots comes from the placement: ``hybrid`` and ``dynamic`` placements
rebalance alike.

Ids: **logical** expert ``e``, **physical slot** ``p`` (global), **local slot** ``l`` (row of a rank's
stacked expert weights), as in :mod:`ep_megatron.placement`; every rank here is an EP rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel.comm import host_all_reduce, host_broadcast
from ep_megatron.placement import ExpertPlacement, Transfer, eplb
from ep_megatron.services.migration import migrate_rows, optimizer_rows

logger = logging.getLogger(__name__)

PLANNERS = ("global", "hierarchical")

@dataclass
class RebalanceConfig:
    """When and how to re-plan the expert placement during training."""

    interval: int = 100  # optimizer steps between re-plans (> 0)
    window: int = 100  # steps of load history summed for a plan (> 0)
    warmup: int = 0  # first re-plan at step warmup + interval (>= 0)
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
        for name in ("warmup", "ranks_per_node"):
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


# ---- the hook -------------------------------------------------------------------------------------
def _balancedness(physical_to_logical: Tensor, load: Tensor, ep_size: int) -> list[float]:
    """``[L]`` mean / max tokens per EP rank of each layer, as plain floats for the metrics."""
    return eplb.layer_balancedness(physical_to_logical, load, ep_size).tolist()


class Rebalancer:
    """Periodic expert re-placement of ``moe``'s layers; call :meth:`step` after every optimizer step.

    Every rank must construct it with the same config and call ``step()`` the same number of times.
    ``optimizer`` is a per-element ``torch.optim`` optimizer, an
    :class:`~ep_megatron.services.migration.OptimizerRows` adapter (DeepSpeed:
    ``ep_megatron.integrations.deepspeed.optimizer_rows(engine)``), or None (weights only).
    """

    def __init__(self, moe: MoELayers, optimizer: Any, config: RebalanceConfig) -> None:
        self.moe, self.config = moe, config
        self._check_layout()
        self.rows = optimizer_rows(optimizer)
        managed = self.rows.managed_params()
        if managed is not None:
            missing = [layer.layer_idx for layer in moe.layers
                       if any(id(p) not in managed for p in moe.layer_expert_params(layer))]
            if missing:
                raise ValueError(f"optimizer: expert parameters of MoE layers {missing} are not in its "
                                 f"param_groups; their state could not be migrated")
        placement = moe.placement
        shape = (placement.num_layers, placement.num_logical_experts)
        self.step_count = 0  # optimizer steps seen, identical on every rank
        self.load_window = torch.zeros(config.window, *shape, dtype=torch.int64)  # [W, L, E] local counts
        self.since_rebalance = torch.zeros(shape, dtype=torch.int64)  # [L, E] local counts since last
        self._previous_plan: tuple[Tensor, Tensor] | None = None  # (old, new) phy2log of last rebalance

    @property
    def placement(self) -> ExpertPlacement:
        """The active placement (the owner's)."""
        return self.moe.placement

    def _check_layout(self) -> None:
        cfg, ep_size = self.config, self.moe.groups.ep_size
        num_experts = self.moe.placement.num_logical_experts
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

    def step(self, load: Tensor | None = None) -> RebalanceMetrics | None:
        """Record this step's ``load [L, E]`` (default: drained from the layers with
        :meth:`MoELayers.take_loads`); at a due step re-plan and migrate. Same call count on all ranks."""
        load = self.moe.take_loads() if load is None else load.detach().to("cpu", torch.int64)
        if tuple(load.shape) != tuple(self.since_rebalance.shape):
            raise ValueError(f"load: shape {tuple(load.shape)}, expected [L, E] = "
                             f"{tuple(self.since_rebalance.shape)}")
        self.step_count += 1
        self.load_window[(self.step_count - 1) % self.config.window] = load
        self.since_rebalance += load
        if not self.due(self.step_count):
            return None
        return self._rebalance()

    def _rebalance(self) -> RebalanceMetrics:
        start = time.perf_counter()
        self._check_grads_zero()
        old = self.placement
        groups = self.moe.groups
        counts = torch.stack([self.load_window.sum(0), self.since_rebalance])  # [2, L, E], host
        host_all_reduce(counts, groups, "rebalance load window")
        window_load, since_load = counts[0].double(), counts[1].double()
        phy2log, planned_before, planned_after = self._plan(old, window_load)
        planned = time.perf_counter()

        new = ExpertPlacement.from_plan(phy2log, old.num_logical_experts, old.ep_size, old.num_nodes)
        diff = old.diff(new)
        bytes_sent = self.migrate_to(new, diff.transfers)
        done = time.perf_counter()

        realized = None
        previous = self._previous_plan
        if previous is not None and torch.equal(previous[1], old.physical_to_logical):
            realized = [_balancedness(p2l, since_load, old.ep_size) for p2l in previous]
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
            moved_fraction=eplb.moved_copies(old.physical_to_logical, phy2log, old.ep_size),
            bytes_sent_per_rank=bytes_sent,
            plan_ms=(planned - start) * 1e3,
            migrate_ms=(done - planned) * 1e3,
        )
        if groups.rank == 0:
            logger.info("rebalance at step %d: worst-layer balancedness %.3f -> %.3f (planning window), "
                        "%d slots moved, %.1f KiB sent, plan %.1f ms, migrate %.1f ms", metrics.step,
                        min(planned_before), min(planned_after), metrics.slots_moved,
                        sum(bytes_sent) / 1024, metrics.plan_ms, metrics.migrate_ms)
        return metrics

    def _plan(self, old: ExpertPlacement, window_load: Tensor) -> tuple[Tensor, list[float], list[float]]:
        """Plan on rank 0 of the data-parallel group, broadcast ``phy2log [L, P]`` (host) to every rank."""
        cfg, ep_size, dp_group = self.config, old.ep_size, self.moe.groups.dp_group
        previous = old.physical_to_logical
        if dp_group is None or dist.get_rank(dp_group) == 0:
            phy2log, _, _ = eplb.rebalance_experts(
                window_load, old.num_slots, cfg.num_groups if cfg.planner == "hierarchical" else 1,
                cfg.num_nodes(ep_size), ep_size, previous=previous,
                balance_tolerance=cfg.balance_tolerance, max_moved_fraction=cfg.max_moved_fraction)
            gain = torch.tensor(_balancedness(phy2log, window_load, ep_size)) - torch.tensor(
                _balancedness(previous, window_load, ep_size))
            keep = (gain < cfg.min_gain) | (gain <= 0)
            phy2log = torch.where(keep[:, None], previous, phy2log).contiguous()
        else:
            phy2log = torch.empty_like(previous)
        host_broadcast(phy2log, self.moe.groups, "rebalance plan")
        return (phy2log, _balancedness(previous, window_load, ep_size),
                _balancedness(phy2log, window_load, ep_size))

    def _check_grads_zero(self) -> None:
        for layer in self.moe.layers:
            for name, p in layer.experts.named_parameters():
                if p.grad is not None and bool(p.grad.any()):
                    raise RuntimeError(f"expert gradient {name} of layer {layer.layer_idx} is not zero at "
                                       f"the rebalance: call Rebalancer.step() after optimizer.step() and "
                                       f"zero_grad()")

    @torch.no_grad()
    def migrate_to(self, new: ExpertPlacement, transfers: Sequence[Transfer] | None = None) -> list[int]:
        """Move every layer's rows (weights, optimizer state) to ``new``, then make it active.

        ``transfers`` defaults to ``placement.diff(new).transfers``. Collective over the EP group (and,
        under DeepSpeed, the parameters' data-parallel groups); every rank passes the same ``new``.
        Returns ``[ep_size]`` bytes each EP rank sent (same on every rank).
        """
        old = self.placement
        self.moe.check_placement(new)
        if transfers is None:
            transfers = old.diff(new).transfers
        self._check_grads_zero()
        bytes_sent = self._migrate(old, new, transfers)
        self.moe.set_placement(new)
        return bytes_sent

    def _migrate(self, old: ExpertPlacement, new: ExpertPlacement,
                 transfers: Sequence[Transfer]) -> list[int]:
        groups = self.moe.groups
        ep_rank, ep_size = groups.ep_rank, groups.ep_size
        bytes_sent = [0] * ep_size
        old_ids, new_ids = old.local_logical_ids(ep_rank), new.local_logical_ids(ep_rank)  # [L, S]
        for layer in self.moe.layers:
            idx = layer.layer_idx
            layer_transfers = [t for t in transfers if t.layer == idx]
            unchanged = torch.equal(old.physical_to_logical[idx], new.physical_to_logical[idx])
            if unchanged and not layer_transfers:
                continue
            params = self.moe.layer_expert_params(layer)
            tensors = self.rows.gather(params)
            sent = migrate_rows(tensors, old_ids[idx], new_ids[idx], layer_transfers, ep_rank, ep_size,
                                groups.ep_group)
            self.rows.commit(params, tensors)
            slot_nbytes = sum(t[0].numel() * t.element_size() for t in tensors)
            planned = 0
            for t in layer_transfers:
                bytes_sent[t.src_ep_rank] += slot_nbytes
                planned += slot_nbytes if t.src_ep_rank == ep_rank else 0
            if sent != planned:
                raise RuntimeError(f"layer {idx}: sent {sent} bytes, the plan says {planned}")
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
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state``; changes nothing.

        A saved window of another length is accepted (the load restarts its window).
        """
        missing = sorted({"step_count", "load_window", "since_rebalance"} - set(state))
        if missing:
            raise ValueError(f"rebalancer state lacks {missing}")
        layers_experts = tuple(self.since_rebalance.shape)
        window = torch.as_tensor(state["load_window"])
        since = torch.as_tensor(state["since_rebalance"])
        shapes_fit = window.dim() == 3 and tuple(window.shape[1:]) == tuple(since.shape) == layers_experts
        if not shapes_fit:
            raise ValueError(f"rebalancer load_window: saved shape {tuple(window.shape)} (window, layers, "
                             f"experts) does not fit this model's (layers, experts) = {layers_experts}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A window of another length restarts the window (zeros, warned)."""
        self.check_state_dict(state)
        window = torch.as_tensor(state["load_window"], dtype=torch.int64)
        if window.shape[0] == self.load_window.shape[0]:
            self.load_window.copy_(window)
        else:
            logger.warning("rebalancer: the checkpoint's load window has %d steps, this run's %d; the window "
                           "restarts empty", window.shape[0], self.load_window.shape[0])
            self.load_window.zero_()
        self.step_count = int(state["step_count"])
        self.since_rebalance.copy_(torch.as_tensor(state["since_rebalance"], dtype=torch.int64))
        previous = state.get("previous_plan")
        self._previous_plan = None if previous is None else tuple(
            torch.tensor(p2l, dtype=torch.int64) for p2l in previous)
