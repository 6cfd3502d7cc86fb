"""Our layers inside Megatron's training step: :func:`attach` after ``setup_model_and_optimizer``.

Megatron-LM's ``pretrain`` needs two more lines (plus the spec, see ``get_gpt_layer_spec_with_ep_moe``)::

    ep = attach(model, optimizer, rebalance_config_from_args(args))   # after setup_model_and_optimizer
    ep.after_step()                                                    # in train_step, after optimizer.step()

:func:`attach` wires what Megatron's own step does not know about: the replica gradient sum on DDP's
``main_grad`` buffers (:mod:`.grads`), the grad norm counting each logical expert once and the optimizer
rows the rebalancer migrates (:mod:`.optimizer`). Aux losses, the expert bias and padding need nothing:
the layer follows Megatron's conventions (:mod:`.layer`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ep_megatron.integrations.megatron.grads import ReplicaGradSync
from ep_megatron.integrations.megatron.layer import ep_moe_layers
from ep_megatron.integrations.megatron.optimizer import MegatronOptimizerRows, count_experts_once_in_grad_norm
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.services.rebalance import RebalanceConfig, RebalanceMetrics, Rebalancer


@dataclass
class MegatronEP:
    """What :func:`attach` installed on one model (or pipeline stage) and its optimizer."""

    moe: MoELayers  # this stage's MoE layers and their placement
    grad_sync: ReplicaGradSync  # the replica sum wrapped around DDP's expert-DP reduction
    rows: MegatronOptimizerRows  # expert rows of the model parameters and the optimizer state
    rebalancer: Rebalancer | None  # None without a RebalanceConfig

    def after_step(self) -> RebalanceMetrics | None:
        """Once per training step on every rank, after ``optimizer.step()``: with a rebalancer, drain the
        step's routed load and, at a due step, re-plan and migrate (every stage its own layers; the same
        step counter). Without one it does nothing."""
        if self.rebalancer is None:
            return None
        load = self.moe.take_loads()
        for param in self.moe.expert_params():
            # FP32Optimizer aliases .grad to main_grad; Megatron zeroes both before the next backward.
            param.grad = None
        return self.rebalancer.step(load)


def attach(model: nn.Module | Sequence[nn.Module], optimizer: Any,
           rebalance: RebalanceConfig | None = None) -> MegatronEP:
    """Wire our MoE layers of ``model`` (Megatron DDP chunks) into Megatron's step; call once per model.

    ``optimizer`` is what ``get_megatron_optimizer`` returned (``ChainedOptimizer`` of
    ``FP32Optimizer``, ``Float16OptimizerWithFloat16Params`` or ``DistributedOptimizer``). With
    ``rebalance``, :meth:`MegatronEP.after_step` re-plans the placement every ``rebalance.interval``
    steps and migrates weights, fp32 main weights and optimizer state.
    """
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    moe = ep_moe_layers(chunks)
    grad_sync = ReplicaGradSync(moe, chunks)
    count_experts_once_in_grad_norm(optimizer, moe)
    rows = MegatronOptimizerRows(optimizer, moe)
    rebalancer = Rebalancer(moe, rows, rebalance) if rebalance is not None else None
    return MegatronEP(moe=moe, grad_sync=grad_sync, rows=rows, rebalancer=rebalancer)


# ---- Megatron-LM arguments -----------------------------------------------------------------------------
def add_ep_megatron_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: our options next to Megatron's ``--moe-*`` flags."""
    group = parser.add_argument_group(title="ep_megatron")
    group.add_argument("--expert-sharding-strategy", choices=("data", "model", "hybrid", "dynamic"),
                       default="model", help="how physical expert slots are laid out over EP ranks")
    group.add_argument("--num-redundant-experts", type=int, default=0,
                       help="extra physical slots for replicas of hot experts (dynamic strategy)")
    group.add_argument("--replicated-experts", type=int, nargs="*", default=[],
                       help="logical experts held on every EP rank (hybrid strategy)")
    group.add_argument("--eplb-interval", type=int, default=0,
                       help="re-plan the expert placement every N optimizer steps (0 = never)")
    group.add_argument("--eplb-window", type=int, default=0,
                       help="steps of router load the planner looks at (0 = since the last re-plan)")
    group.add_argument("--no-prefer-local-replica", dest="prefer_local_replica", action="store_false",
                       help="spread tokens over all replicas even when this rank holds one")
    return parser


def ep_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``ep_options`` for the spec builders from parsed ``add_ep_megatron_args`` flags."""
    return {
        "sharding_strategy": args.expert_sharding_strategy,
        "num_redundant_experts": args.num_redundant_experts,
        "replicated_experts": tuple(args.replicated_experts),
        "prefer_local_replica": args.prefer_local_replica,
    }


def rebalance_config_from_args(args: argparse.Namespace) -> RebalanceConfig | None:
    """The :class:`RebalanceConfig` of ``--eplb-interval`` / ``--eplb-window`` (None for interval 0)."""
    if args.eplb_interval <= 0:
        return None
    return RebalanceConfig(interval=args.eplb_interval, window=args.eplb_window or args.eplb_interval)
