"""DeepSpeed glue: train a model that uses our :class:`MoELayer` under ``deepspeed.initialize``.

Who reduces what (each gradient element is reduced exactly once):

- **replicas** (our part): a tensor hook on every expert parameter sums the gradient rows of all replicas
  of each logical expert over the expert-parallel group with :mod:`ep_megatron.grad_sync` (its EDP
  reduction switched off), before DeepSpeed sees the gradient. It runs inside backward, so ZeRO-2's
  reduce hooks see summed rows too.
- **expert data parallelism** (DeepSpeed's part): our expert-parallel and expert-data-parallel groups are
  registered in ``deepspeed.utils.groups`` under the parameters' ``group_name``, and the engine is told
  the model has MoE layers. DeepSpeed then reduces expert gradients over the EDP group only (dividing by
  the data-parallel world size, as it does for its own experts) and ZeRO partitions expert state over the
  EDP group, while dense gradients are averaged over all ranks.
- **gradient norm**: DeepSpeed counts every physical slot; with replicas that counts a hot expert once
  per copy. :func:`initialize` replaces the norm with the true global norm, each logical expert counted
  once (its owner slot), for ZeRO 0 (fp32) and ZeRO 1/2 (fp32, bf16).

Usage (instead of ``deepspeed.initialize(model=..., optimizer=..., config=...)``)::

    engine, *_ = ep_megatron.integrations.deepspeed.initialize(model, groups, optimizer_fn, ds_config)
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from ep_megatron.grad_sync import clip_grad_norm_, sync_replica_grads
from ep_megatron.layer import MoELayer
from ep_megatron.parallel import ParallelGroups

ParamGroups = list[dict[str, Any]]


def _expert_params(model: nn.Module) -> dict[int, tuple[MoELayer, nn.Parameter]]:
    """``id(param) -> (layer, param)`` for the stacked expert parameters ``[local_slots, ...]``."""
    return {id(p): (layer, p) for layer in model.modules() if isinstance(layer, MoELayer)
            for p in layer.experts.parameters()}


def expert_group_name(model: nn.Module) -> str:
    """The ``group_name`` every expert parameter carries (DeepSpeed's expert-group key)."""
    names = {getattr(p, "group_name", None) for _, p in _expert_params(model).values()}
    if len(names) != 1 or None in names:
        raise ValueError(f"expert parameters must share one group_name, found {sorted(map(str, names))}")
    return names.pop()


def param_groups(model: nn.Module, weight_decay: float | None = None) -> ParamGroups:
    """Optimizer parameter groups: dense parameters, and expert parameters in DeepSpeed's MoE group.

    The expert group has ``moe=True`` and ``name=group_name``, DeepSpeed's markers for a group reduced and
    partitioned over the expert-data-parallel group. ``weight_decay=None`` leaves the optimizer's default.
    """
    experts = _expert_params(model)
    dense = [p for p in model.parameters() if id(p) not in experts and p.requires_grad]
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = [{"params": dense, "name": "dense", **extra}]
    if experts:
        groups.append({"params": [p for _, p in experts.values()], "moe": True,
                       "name": expert_group_name(model), **extra})
    return groups


# ---- replica gradient sum --------------------------------------------------------------------------
def register_replica_grad_hooks(model: nn.Module, groups: ParallelGroups) -> list[RemovableHandle]:
    """Sum every expert gradient ``[local_slots, ...]`` over the replicas of each logical expert.

    A tensor hook per expert parameter runs :func:`~ep_megatron.grad_sync.sync_replica_grads` with
    ``reduce_edp=False`` and scale 1 inside backward, before any DeepSpeed hook: DeepSpeed then reduces
    over the EDP group and divides by the data-parallel world size. Hooks fire in the same autograd order
    on every rank, so every rank enters the same collectives.
    """
    handles = []
    for layer, param in _expert_params(model).values():
        def hook(grad: torch.Tensor, layer: MoELayer = layer) -> torch.Tensor:
            summed = grad.clone()
            sync_replica_grads([summed], layer.placement, layer.layer_idx, groups, 1.0, reduce_edp=False)
            return summed

        handles.append(param.register_hook(hook))
    return handles


# ---- DeepSpeed groups and MoE detection ------------------------------------------------------------
def register_deepspeed_groups(groups: ParallelGroups, group_name: str) -> None:
    """Make our EP / EDP groups DeepSpeed's expert groups named ``group_name``."""
    from deepspeed.utils import groups as ds_groups

    if groups.ep_group is None or groups.edp_group is None:
        raise ValueError("DeepSpeed needs torch.distributed groups (ParallelGroups.single() has none)")
    ds_groups._EXPERT_PARALLEL_GROUP[group_name] = groups.ep_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[group_name] = groups.edp_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[group_name] = dist.get_process_group_ranks(groups.ep_group)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[group_name] = dist.get_process_group_ranks(groups.edp_group)


def _moe_marker_class() -> type[nn.Module]:
    from deepspeed.moe.layer import MoE

    class EPMegatronDeepSpeedMoE(MoE):
        """Parameter-free module that makes the DeepSpeed engine take its MoE code path for our layers."""

        def __init__(self, num_experts: int, groups: ParallelGroups, group_name: str) -> None:
            nn.Module.__init__(self)  # skip MoE.__init__: the experts live in our layers
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, groups.ep_size, group_name
            self._groups = groups

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            del use_data_before_expert_parallel_
            register_deepspeed_groups(self._groups, self.expert_group_name)

        def forward(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("EPMegatronDeepSpeedMoE is a marker; it is never called")

    return EPMegatronDeepSpeedMoE


# ---- true global gradient norm -----------------------------------------------------------------------
def _owner_row_weight(layer: MoELayer, groups: ParallelGroups) -> torch.Tensor:
    """``[local_slots]`` 1.0 for owner slots, 0.0 for other replicas (each logical expert counted once)."""
    return layer.placement.is_owner(groups.ep_rank)[layer.layer_idx].to(torch.float32)


def _zero_partition_norm(optimizer: Any, model: nn.Module, groups: ParallelGroups) -> torch.Tensor:
    """True global L2 norm of the gradients a ZeRO-1/2 optimizer holds (its ``averaged_gradients``).

    Each rank holds one flat partition per parameter group (dense: over all ranks; experts: over the EDP
    group), so summing the squared partitions over all ranks counts every physical slot once; owner
    weights per row then count every logical expert once.
    """
    experts = _expert_params(model)
    total = torch.zeros((), dtype=torch.float64)
    for i, params in enumerate(optimizer.params_in_partition):
        for j, (grad, param) in enumerate(zip(optimizer.averaged_gradients[i], params)):
            sq = grad.detach().reshape(-1).to(torch.float64).pow(2)
            if id(param) in experts:
                row_numel = param.numel() // param.shape[0]
                start = optimizer.first_offset[i] if j == 0 else 0
                rows = (torch.arange(sq.numel()) + start) // row_numel
                sq = sq * _owner_row_weight(experts[id(param)][0], groups).to(torch.float64)[rows]
            total += sq.sum()
    dist.all_reduce(total, group=dist.group.WORLD)
    return total.sqrt().to(torch.float32)


def _install_true_norm(engine: Any, model: nn.Module, groups: ParallelGroups) -> None:
    """Replace DeepSpeed's gradient norm by the true one on ``engine`` (ZeRO 0 fp32, ZeRO 1/2)."""
    stage = engine.zero_optimization_stage()
    if stage in (1, 2):
        optimizer = engine.optimizer

        def scaled_global_norm(self: Any, norm_type: int = 2) -> torch.Tensor:
            if norm_type != 2:
                raise ValueError(f"norm_type={norm_type}: only the L2 norm is supported")
            return _zero_partition_norm(self, model, groups)

        optimizer.scaled_global_norm = types.MethodType(scaled_global_norm, optimizer)
    elif stage == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        experts = _expert_params(model)
        dense = [p for p in model.parameters() if id(p) not in experts]

        def clip_fp32_gradients(self: Any) -> None:
            norm = clip_grad_norm_(dense, model, groups, self.gradient_clipping())
            self._global_grad_norm = norm.item()

        engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
    else:
        raise ValueError(f"zero_optimization.stage={stage} with bf16/fp16 is not supported with ep_megatron "
                         "layers; use stage 1 or 2 for mixed precision")


def initialize(model: nn.Module, groups: ParallelGroups,
               optimizer_fn: Callable[[ParamGroups], torch.optim.Optimizer] | None,
               config: dict[str, Any], **kwargs: Any) -> tuple[Any, ...]:
    """``deepspeed.initialize`` for a model with our MoE layers; returns what DeepSpeed returns.

    ``optimizer_fn(param_groups)`` builds the client optimizer from :func:`param_groups` (None: the
    ``optimizer`` section of ``config``). Supported: ZeRO stage 0 (fp32), 1 and 2 (fp32, bf16).
    """
    import deepspeed

    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    mixed = config.get("bf16", {}).get("enabled", False) or config.get("fp16", {}).get("enabled", False)
    if stage not in (0, 1, 2) or (stage == 0 and mixed):
        raise ValueError(f"zero_optimization.stage={stage} (bf16/fp16: {mixed}) is not supported: use stage "
                         "0 (fp32), 1 or 2")
    experts = _expert_params(model)
    if not experts:
        raise ValueError("model has no ep_megatron MoELayer")
    name = expert_group_name(model)
    register_deepspeed_groups(groups, name)
    num_experts = next(iter(experts.values()))[0].placement.num_logical_experts
    model.add_module("ep_megatron_deepspeed_moe", _moe_marker_class()(num_experts, groups, name))
    register_replica_grad_hooks(model, groups)
    groups_ = param_groups(model)
    optimizer = optimizer_fn(groups_) if optimizer_fn is not None else None
    result = deepspeed.initialize(model=model, optimizer=optimizer,
                                  model_parameters=None if optimizer is not None else groups_,
                                  config=config, **kwargs)
    _install_true_norm(result[0], model, groups)
    return result
