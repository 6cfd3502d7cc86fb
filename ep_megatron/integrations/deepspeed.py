"""DeepSpeed glue: train a model that uses our :class:`MoELayer` under ``deepspeed.initialize``.

Who reduces what (each gradient element is reduced exactly once):

- **replicas** (our part): a tensor hook on every expert parameter sums the gradient rows of all replicas
  of each logical expert over the expert-parallel group with :mod:`ep_megatron.parallel.grad_sync` (its EDP
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

Checkpoints: :func:`checkpoint_optimizer` presents a ZeRO optimizer per model parameter (full fp32
master and optimizer-state tensors, gathered with DeepSpeed's public ``safe_*_full_*`` helpers), so
:mod:`ep_megatron.services.checkpoint` saves it by logical expert, like a torch optimizer, and a run
resumes under another EP size, placement or ZeRO stage.

Usage (instead of ``deepspeed.initialize(model=..., optimizer=..., config=...)``)::

    moe = MoELayers(model)
    engine, *_ = ep_megatron.integrations.deepspeed.initialize(moe, optimizer_fn, ds_config)
    rebalancer = Rebalancer(moe, optimizer_rows(engine), RebalanceConfig(...))
    save_checkpoint(root, step, moe, checkpoint_optimizer(engine), rebalancer=rebalancer)
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ep_megatron.layer.moe_layers import MoELayers, ParamGroups
from ep_megatron.parallel.comm import all_reduce
from ep_megatron.parallel.grad_sync import clip_grad_norm_, sync_replica_grads
from ep_megatron.parallel.groups import ParallelGroups
from ep_megatron.services.migration import OptimizerRows
from ep_megatron.services.migration import optimizer_rows as torch_optimizer_rows

_ZERO_WRAPPERS = ("DeepSpeedZeroOptimizer", "BF16_Optimizer")  # linked to DeepSpeed's public safe_* helpers


def expert_group_name(moe: MoELayers) -> str:
    """The ``group_name`` every expert parameter carries (DeepSpeed's expert-group key)."""
    names = {getattr(p, "group_name", None) for p in moe.expert_params()}
    if len(names) != 1 or None in names:
        raise ValueError(f"expert parameters must share one group_name, found {sorted(map(str, names))}")
    return names.pop()


def param_groups(moe: MoELayers, weight_decay: float | None = None) -> ParamGroups:
    """:meth:`MoELayers.param_groups` with the expert group in DeepSpeed's MoE group.

    The expert group has ``moe=True`` and ``name=group_name``, DeepSpeed's markers for a group reduced and
    partitioned over the expert-data-parallel group. ``weight_decay=None`` leaves the optimizer's default.
    """
    groups = moe.param_groups(weight_decay)
    for group in groups:
        if group["name"] == "experts":
            group.update(moe=True, name=expert_group_name(moe))
    return groups


# ---- replica gradient sum --------------------------------------------------------------------------
class ReplicaGradHooks:
    """Sum every expert gradient ``[local_slots, ...]`` over the replicas of each logical expert.

    A tensor hook per expert parameter runs :func:`~ep_megatron.parallel.grad_sync.sync_replica_grads` with
    ``reduce_edp=False`` and scale 1 inside backward, before any DeepSpeed hook: DeepSpeed then reduces
    over the EDP group and divides by the data-parallel world size. Hooks fire in the same autograd order
    on every rank, so every rank enters the same collectives; an expert parameter always joins the graph
    (empty slots too), so its hook fires on every rank even when the rank received no token.
    """

    def __init__(self, moe: MoELayers) -> None:
        self.bytes_sent = 0  # bytes this rank sent since the last take_bytes_sent()
        self.handles: list[RemovableHandle] = []  # one per expert parameter (handle.remove() detaches)
        for layer in moe.layers:
            for param in moe.layer_expert_params(layer):
                self.handles.append(param.register_hook(self._hook(moe, layer.layer_idx)))

    def _hook(self, moe: MoELayers, layer_idx: int) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            summed = grad.clone()
            self.bytes_sent += sync_replica_grads([summed], moe.placement, layer_idx, moe.groups, 1.0,
                                                  reduce_edp=False)
            return summed

        return hook

    def take_bytes_sent(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent


# ---- optimizer state rows for the rebalancer ---------------------------------------------------------
def deepspeed_state_keys(engine: Any) -> list[str]:
    """Per-element state names (``exp_avg``, ...) of a DeepSpeed ZeRO-1/2 / bf16 optimizer's base
    optimizer, whose state lives on flat fp32 partitions; empty before its first step."""
    base = getattr(engine.optimizer, "optimizer", None)
    keys = set()
    for state in getattr(base, "state", {}).values():
        keys.update(k for k, v in state.items() if isinstance(v, Tensor) and v.numel() > 1)
    return sorted(keys)


class ZeroOptimizerRows:
    """DeepSpeed ZeRO 1/2 or bf16 optimizer: low-precision parameter rows plus the fp32 master and
    optimizer-state rows, read and written whole with DeepSpeed's public ``safe_*_full_*`` helpers
    (each a collective over the parameter's data-parallel group, reached by all ranks in order)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def gather(self, params: list[nn.Parameter]) -> list[Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        tensors: list[Tensor] = []
        for p in params:
            master = safe_get_full_fp32_param(p)
            if master is None:
                raise RuntimeError("an expert parameter is not managed by the DeepSpeed optimizer")
            tensors += [p.data, master.clone()]
            keys = deepspeed_state_keys(self.engine)
            tensors += [safe_get_full_optimizer_state(p, key).clone() for key in keys]
        return tensors

    def commit(self, params: list[nn.Parameter], tensors: list[Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        keys = deepspeed_state_keys(self.engine)
        per_param = 2 + len(keys)
        for i, p in enumerate(params):
            own = tensors[i * per_param : (i + 1) * per_param]
            safe_set_full_fp32_param(p, own[1])
            for key, value in zip(keys, own[2:]):
                safe_set_full_optimizer_state(p, value, key)

    def managed_params(self) -> set[int] | None:
        return None  # DeepSpeed's groups hold flat partitions, not the model's parameters


def optimizer_rows(engine: Any) -> OptimizerRows:
    """The rebalancer's view of an engine's optimizer state (ZeRO 0 fp32, ZeRO 1/2 fp32 or bf16)."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        raise ValueError("optimizer: DeepSpeed ZeRO stage 3 is not supported (expert rows are partitioned "
                         "per parameter); use ZeRO stage 0, 1 or 2")
    wrapper = type(engine.optimizer).__name__
    if wrapper in _ZERO_WRAPPERS:
        return ZeroOptimizerRows(engine)
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise ValueError(f"optimizer: DeepSpeed's {wrapper} (ZeRO stage {stage} with fp16/bf16) keeps fp32 "
                         f"masters without public accessors; use ZeRO stage 1 or 2")
    return torch_optimizer_rows(engine.optimizer)


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
        """Parameter-free module that makes the DeepSpeed engine take its MoE code path for our layers, and
        holds what the glue needs later: the groups, the replica hooks and the model's param groups."""

        def __init__(self, num_experts: int, groups: ParallelGroups, group_name: str,
                     replica_hooks: ReplicaGradHooks, model_param_groups: ParamGroups) -> None:
            nn.Module.__init__(self)  # skip MoE.__init__: the experts live in our layers
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, groups.ep_size, group_name
            self._groups = groups
            self.replica_hooks = replica_hooks
            self.model_param_groups = model_param_groups  # the groups given to the optimizer, model params

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            del use_data_before_expert_parallel_
            register_deepspeed_groups(self._groups, self.expert_group_name)

        def forward(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("EPMegatronDeepSpeedMoE is a marker; it is never called")

    return EPMegatronDeepSpeedMoE


MARKER_NAME = "ep_megatron_deepspeed_moe"


def _marker(engine: Any) -> Any:
    marker = getattr(engine.module, MARKER_NAME, None)
    if marker is None:
        raise ValueError("engine was not built by ep_megatron.integrations.deepspeed.initialize")
    return marker


def replica_grad_hooks(engine: Any) -> ReplicaGradHooks:
    """The replica-sum hooks :func:`initialize` installed on ``engine``'s model."""
    return _marker(engine).replica_hooks


# ---- true global gradient norm -----------------------------------------------------------------------
def _zero_partition_norm(optimizer: Any, moe: MoELayers) -> Tensor:
    """True global L2 norm of the gradients a ZeRO-1/2 optimizer holds (its ``averaged_gradients``).

    Each rank holds one flat partition per parameter group (dense: over all ranks; experts: over the EDP
    group), so summing the squared partitions over all ranks counts every physical slot once; owner
    weights per row then count every logical expert once. Computed on the gradients' device with no
    host read (the per-row sums come from row-aligned views of the fragment, not a host ``arange``).
    """
    layer_of = {id(p): layer.layer_idx for layer in moe.layers for p in moe.layer_expert_params(layer)}
    device = next((p.device for params in optimizer.params_in_partition for p in params), torch.device("cpu"))
    owner_weight = moe.owner_mask().to(torch.float64).to(device)  # [L, S]: 1 for owner slots, else 0
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, params in enumerate(optimizer.params_in_partition):
        for j, (grad, param) in enumerate(zip(optimizer.averaged_gradients[i], params)):
            flat = grad.detach().reshape(-1)
            if id(param) not in layer_of:
                total += flat.to(torch.float64).square().sum()
                continue
            start = optimizer.first_offset[i] if j == 0 else 0
            per_row = _fragment_row_sums(flat, start, param.numel() // param.shape[0])
            weights = owner_weight[layer_of[id(param)]]
            first_row = start // (param.numel() // param.shape[0])
            total += (per_row * weights[first_row : first_row + per_row.numel()]).sum()
    all_reduce(total, None, "ZeRO gradient norm")
    return total.sqrt().to(torch.float32)


def _fragment_row_sums(flat: Tensor, start: int, row_numel: int) -> Tensor:
    """Squared sums (float64) of a flat fragment of a ``[rows, row_numel]`` tensor that starts at element
    ``start``, per row it touches: a partial first row, whole rows, a partial last row."""
    head = min(flat.numel(), (-start) % row_numel)
    body = (flat.numel() - head) // row_numel * row_numel
    parts = []
    if head:
        parts.append(flat[:head].to(torch.float64).square().sum().view(1))
    if body:
        parts.append(flat[head : head + body].view(-1, row_numel).to(torch.float64).square().sum(1))
    if flat.numel() > head + body:
        parts.append(flat[head + body :].to(torch.float64).square().sum().view(1))
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float64)


def _install_true_norm(engine: Any, moe: MoELayers) -> None:
    """Replace DeepSpeed's gradient norm by the true one on ``engine`` (ZeRO 0 fp32, ZeRO 1/2)."""
    stage = engine.zero_optimization_stage()
    if stage in (1, 2):
        optimizer = engine.optimizer

        def scaled_global_norm(self: Any, norm_type: int = 2) -> Tensor:
            if norm_type != 2:
                raise ValueError(f"norm_type={norm_type}: only the L2 norm is supported")
            return _zero_partition_norm(self, moe)

        optimizer.scaled_global_norm = types.MethodType(scaled_global_norm, optimizer)
    elif stage == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        dense = moe.dense_params()

        def clip_fp32_gradients(self: Any) -> None:
            norm = clip_grad_norm_(moe, dense, self.gradient_clipping())
            self._global_grad_norm = norm.item()

        engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
    else:
        raise ValueError(f"zero_optimization.stage={stage} with bf16/fp16 is not supported with ep_megatron "
                         "layers; use stage 1 or 2 for mixed precision")


def _link_state_after_every_group(zero_optimizer: Any) -> None:
    """Work around DeepSpeed 0.19's ZeRO-1/2 linking its fragments to the optimizer state after the first
    group's first step, when later groups have no state yet: their parameters then never see
    ``exp_avg`` etc. through ``safe_*_optimizer_state``. Linking waits until every group has state."""
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is None:
        return
    base = zero_optimizer.optimizer

    def link_when_complete() -> None:
        if all(base.state.get(flat) for group in base.param_groups for flat in group["params"]):
            link()

    zero_optimizer._lazy_init_hp_params_optimizer_state = link_when_complete


def initialize(moe: MoELayers, optimizer_fn: Callable[[ParamGroups], torch.optim.Optimizer] | None,
               config: dict[str, Any], *, weight_decay: float | None = None,
               **kwargs: Any) -> tuple[Any, ...]:
    """``deepspeed.initialize`` for ``moe.model`` (a model with our MoE layers); returns what DeepSpeed
    returns.

    ``optimizer_fn(param_groups)`` builds the client optimizer from :func:`param_groups` (with
    ``weight_decay``; None: the ``optimizer`` section of ``config``). Supported: ZeRO stage 0 (fp32), 1 and
    2 (fp32, bf16). :func:`checkpoint_optimizer` gives the optimizer to pass to our checkpoints,
    :func:`optimizer_rows` the one to pass to the rebalancer.
    """
    import deepspeed

    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    mixed = config.get("bf16", {}).get("enabled", False) or config.get("fp16", {}).get("enabled", False)
    if stage not in (0, 1, 2) or (stage == 0 and mixed):
        raise ValueError(f"zero_optimization.stage={stage} (bf16/fp16: {mixed}) is not supported: use stage "
                         "0 (fp32), 1 or 2")
    model = moe.model
    if model is None:
        raise ValueError("moe: build MoELayers from the model (MoELayers(model)) for DeepSpeed")
    name = expert_group_name(moe)
    register_deepspeed_groups(moe.groups, name)
    groups_ = param_groups(moe, weight_decay)
    hooks = ReplicaGradHooks(moe)
    model_groups = [{**group, "params": list(group["params"])} for group in groups_]  # ZeRO rewrites groups_
    marker = _moe_marker_class()(moe.placement.num_logical_experts, moe.groups, name, hooks, model_groups)
    model.add_module(MARKER_NAME, marker)
    optimizer = optimizer_fn(groups_) if optimizer_fn is not None else None
    result = deepspeed.initialize(model=model, optimizer=optimizer,
                                  model_parameters=None if optimizer is not None else groups_,
                                  config=config, **kwargs)
    _install_true_norm(result[0], moe)
    if type(result[0].optimizer).__name__ == "DeepSpeedZeroOptimizer":
        _link_state_after_every_group(result[0].optimizer)
    return result


# ---- checkpoints -----------------------------------------------------------------------------------
class ZeroOptimizerState:
    """A DeepSpeed ZeRO-1/2 (or bf16) optimizer seen per model parameter, in ``torch.optim``'s shape.

    ``param_groups`` hold the model's parameters with the live hyperparameters; ``state_dict()`` gives,
    per parameter, full tensors shaped like it: every per-element state (``exp_avg``, ``exp_avg_sq``),
    ``step``, and ``fp32_param`` (the master) when the parameter is low precision. Getting is collective
    over each parameter's data-parallel group, in parameter order on every rank; loading is local. Loading
    into an optimizer that has not stepped yet creates its state first (zeros), as its first step would.
    """

    def __init__(self, engine: Any, model_param_groups: ParamGroups) -> None:
        live = engine.optimizer.param_groups
        if len(live) != len(model_param_groups):
            raise RuntimeError(f"DeepSpeed optimizer has {len(live)} param groups, the model "
                               f"{len(model_param_groups)}: cannot map its state to parameters")
        self.engine = engine
        self._model_groups = model_param_groups

    @property
    def param_groups(self) -> ParamGroups:
        return [{**{k: v for k, v in live.items() if k != "params"}, "params": model["params"]}
                for live, model in zip(self.engine.optimizer.param_groups, self._model_groups)]

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self._model_groups for p in group["params"]]

    def _base_state(self) -> dict[Any, dict[str, Any]]:
        """The base optimizer's state, keyed by flat fp32 partitions."""
        return self.engine.optimizer.optimizer.state

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        keys = deepspeed_state_keys(self.engine)
        steps = [s["step"] for s in self._base_state().values() if "step" in s]
        state = {}
        for index, param in enumerate(self._params()):
            entry = {key: safe_get_full_optimizer_state(param, key).clone() for key in keys}
            if steps:
                entry["step"] = steps[0].clone()
            if param.dtype != torch.float32:
                entry["fp32_param"] = safe_get_full_fp32_param(param).clone()
            state[index] = entry
        groups, start = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({**group, "params": list(range(start, start + count))})
            start += count
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set masters (``fp32_param``, else the current parameter), per-element state, ``step`` and
        hyperparameters; call after the model's parameters are loaded."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        saved = state_dict["state"]
        keys = sorted({k for entry in saved.values() for k, v in entry.items()
                       if k not in ("step", "fp32_param") and isinstance(v, torch.Tensor) and v.numel() > 1})
        self._create_state(keys)
        for live, group in zip(self.engine.optimizer.param_groups, state_dict["param_groups"]):
            live.update({k: v for k, v in group.items() if k != "params"})
        for index, param in enumerate(self._params()):
            entry = saved.get(index, {})
            master = entry.get("fp32_param", param.detach())
            safe_set_full_fp32_param(param, master.to(param.device, torch.float32))
            for key in keys:
                safe_set_full_optimizer_state(param, entry[key].to(param.device), key)
        steps = [entry["step"] for entry in saved.values() if "step" in entry]
        for base_state in self._base_state().values():
            if steps and "step" in base_state:
                base_state["step"] = torch.as_tensor(steps[0]).clone().to(base_state["step"])

    def _create_state(self, keys: list[str]) -> None:
        """Zero state for ``keys`` on every flat partition, linked to the parameters' fragments."""
        if not keys or deepspeed_state_keys(self.engine):
            return
        zero_optimizer = self.engine.optimizer
        if not hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
            raise RuntimeError(f"{type(zero_optimizer).__name__} cannot link optimizer state to parameters "
                               f"in this DeepSpeed version")
        for group in zero_optimizer.optimizer.param_groups:
            for flat in group["params"]:
                state = {key: torch.zeros_like(flat) for key in keys}
                self._base_state()[flat] = {"step": torch.zeros((), dtype=torch.float32), **state}
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def checkpoint_optimizer(engine: Any) -> Any:
    """The optimizer to pass to ``save_checkpoint`` / ``load_checkpoint`` for an engine built by
    :func:`initialize`: the torch optimizer itself (ZeRO 0, fp32), else a :class:`ZeroOptimizerState`."""
    wrapper = type(engine.optimizer).__name__
    if wrapper in _ZERO_WRAPPERS:
        return ZeroOptimizerState(engine, _marker(engine).model_param_groups)
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        return engine.optimizer
    raise ValueError(f"DeepSpeed optimizer {wrapper} is not supported by ep_megatron checkpoints")
