"""Our expert parameters inside Megatron's optimizers: where their state lives, rows, grad norm.

``get_megatron_optimizer`` returns a ``ChainedOptimizer`` (dense + expert optimizers) whose inner
optimizers are ``FP32Optimizer`` (the torch optimizer's parameters are the model parameters),
``Float16OptimizerWithFloat16Params`` (an fp32 ``main_param [S, ...]`` per bf16 parameter; state keyed
by it) or ``DistributedOptimizer`` (fp32 main parameters and state sharded over the expert-data-parallel
group by contiguous ranges of the flattened parameter, which ignore row boundaries).

- :class:`MegatronOptimizerRows`: the rebalancer's :class:`~ep_megatron.services.migration.OptimizerRows`
  adapter. Full rows of a distributed optimizer's state are gathered over its data-parallel group
  (collective, in parameter order on every rank) and each rank writes its own range back.
- :func:`count_experts_once_in_grad_norm`: Megatron's grad norm counts every physical slot; the expert
  optimizers' ``get_main_grads_for_grad_norm`` then return only the owner rows of each logical expert
  (views, no copy), so a hot expert's replicas never change the clip coefficient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel.comm import all_gather, all_gather_object
from ep_megatron.services.migration import TorchOptimizerRows

_SUPPORTED = ("FP32Optimizer", "Float16OptimizerWithFloat16Params", "DistributedOptimizer")


@dataclass(frozen=True)
class ExpertParamState:
    """Where one expert parameter ``param [S, ...]`` lives in a Megatron optimizer."""

    param: nn.Parameter  # the model parameter
    optimizer: Any  # the inner Megatron optimizer that steps it
    main: Tensor | None  # the optimizer's tensor: param itself (FP32Optimizer), its fp32 copy [S, ...]
    # (Float16), or this rank's 1-D piece (DistributedOptimizer; None when this rank holds none of it)
    flat_range: tuple[int, int] | None  # DistributedOptimizer: [start, end) of the piece in param.view(-1)

    @property
    def distributed(self) -> bool:
        return type(self.optimizer).__name__ == "DistributedOptimizer"


def inner_optimizers(optimizer: Any) -> list[Any]:
    """The optimizers a (possibly ``ChainedOptimizer``) Megatron optimizer steps."""
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def _param_pairs(inner: Any) -> list[tuple[nn.Parameter, Tensor | None, tuple[int, int] | None]]:
    """``(model param, optimizer tensor, flat range)`` of every parameter ``inner`` steps."""
    kind = type(inner).__name__
    if kind == "FP32Optimizer":
        return [(p, p, None) for p in inner.get_parameters()]
    if kind == "Float16OptimizerWithFloat16Params":
        groups = zip(inner.float16_groups, inner.fp32_from_float16_groups)
        pairs = [(model, main, None) for models, mains in groups for model, main in zip(models, mains)]
        return pairs + [(p, p, None) for group in inner.fp32_from_fp32_groups for p in group]
    if kind == "DistributedOptimizer":
        pairs, seen = [], set()
        for model_groups, shard_groups in ((inner.model_float16_groups, inner.shard_fp32_from_float16_groups),
                                           (inner.model_fp32_groups, inner.shard_fp32_groups)):
            for models, shards in zip(model_groups, shard_groups):
                for model, shard in zip(models, shards):
                    piece = inner._get_model_param_range_map(model)["param"]
                    pairs.append((model, shard, (piece.start, piece.end)))
                    seen.add(id(model))
        # Parameters of the optimizer's buffers whose range lies wholly on other ranks.
        elsewhere = [p for buffer in inner.buffers for p in buffer.params if id(p) not in seen]
        return pairs + [(p, None, None) for p in elsewhere]
    raise ValueError(f"optimizer: Megatron's {kind} is not supported with ep_megatron layers (supported: "
                     f"{', '.join(_SUPPORTED)}, also inside a ChainedOptimizer)")


def expert_param_states(optimizer: Any, moe: MoELayers) -> list[ExpertParamState]:
    """Where each of ``moe.expert_params()`` lives in ``optimizer`` (same order); raises if one is absent."""
    wanted = {id(p) for p in moe.expert_params()}
    found: dict[int, ExpertParamState] = {}
    for inner in inner_optimizers(optimizer):
        if getattr(inner, "is_stub_optimizer", False):
            continue
        for model, main, flat_range in _param_pairs(inner):
            if id(model) in wanted:
                found[id(model)] = ExpertParamState(model, inner, main, flat_range)
    missing = [layer.layer_idx for layer in moe.layers
               if any(id(p) not in found for p in moe.layer_expert_params(layer))]
    if missing:
        raise ValueError(f"optimizer: expert parameters of MoE layers {missing} are in none of its "
                         f"optimizers")
    return [found[id(p)] for p in moe.expert_params()]


# ---- rows for the rebalancer ---------------------------------------------------------------------------
class MegatronOptimizerRows:
    """:class:`~ep_megatron.services.migration.OptimizerRows` of a Megatron (chained) optimizer.

    Per expert parameter, the tensors stacked like it: the model parameter, the fp32 main parameter when
    it is a separate tensor, and every per-element optimizer state (Adam's moments). ``step`` is shared
    by all rows and needs no move. Under the distributed optimizer the fp32 main parameter and the state
    are gathered into full tensors over the optimizer's data-parallel group (every rank of that group
    must call :meth:`gather` / :meth:`commit` for the same parameters in the same order, which the
    rebalancer does) and :meth:`commit` writes back this rank's range, including the model parameter's
    range of the parameter buffer (correct also when Megatron gathers parameters lazily).
    """

    def __init__(self, optimizer: Any, moe: MoELayers) -> None:
        self.states = {id(state.param): state for state in expert_param_states(optimizer, moe)}
        # per parameter, from gather to commit: its number of tensors and the gathered distributed names
        self._layout: dict[int, tuple[int, list[str]]] = {}

    def managed_params(self) -> set[int] | None:
        return set(self.states)

    def gather(self, params: list[nn.Parameter]) -> list[Tensor]:
        tensors: list[Tensor] = []
        keys: dict[int, list[str]] = {}
        for p in params:
            state = self.states[id(p)]
            if state.distributed:
                if id(state.optimizer) not in keys:
                    keys[id(state.optimizer)] = _agreed_state_keys(state.optimizer)
                names = (["param"] if p.dtype != torch.float32 else []) + keys[id(state.optimizer)]
                own = [p.data, *_gather_full(state, names)]
            else:
                names = []
                own = TorchOptimizerRows(state.optimizer.optimizer).gather([state.main])  # [main, *state]
                own = own if state.main is p else [p.data, *own]
            self._layout[id(p)] = (len(own), names)
            tensors += own
        return tensors

    def commit(self, params: list[nn.Parameter], tensors: list[Tensor]) -> None:
        """Distributed optimizer: write this rank's range of the rewritten full tensors back (the rest are
        live tensors, rewritten in place)."""
        position = 0
        for p in params:
            state = self.states[id(p)]
            count, names = self._layout.pop(id(p))
            full = tensors[position + 1: position + count]
            position += count
            if not names or state.main is None:
                continue
            start, end = state.flat_range  # type: ignore[misc]
            local = state.optimizer._get_main_param_and_optimizer_states(p)
            with torch.no_grad():
                for name, tensor in zip(names, full):
                    local[name].copy_(tensor.view(-1)[start:end])
                p.data.view(-1)[start:end].copy_(local["param"])


def _agreed_state_keys(inner: Any) -> list[str]:
    """Per-element state names (``exp_avg``, ...) of a distributed optimizer, agreed over its
    data-parallel group (a rank that holds no piece of some parameter still joins the gathers)."""
    own: set[str] = set()
    for main, state in inner.optimizer.state.items():
        own |= {k for k, v in state.items() if isinstance(v, Tensor) and v.shape == main.shape and v.dim()}
    agreed = set().union(*all_gather_object(sorted(own), inner.data_parallel_group))
    return sorted(agreed)


def _gather_full(state: ExpertParamState, names: list[str]) -> list[Tensor]:
    """Full fp32 tensors ``[S, ...]`` of ``names`` (``param`` = the main parameter) of one parameter,
    assembled from every rank's piece over the optimizer's data-parallel group."""
    p, inner = state.param, state.optimizer
    group = inner.data_parallel_group
    start, end = state.flat_range if state.main is not None else (0, 0)
    local = inner._get_main_param_and_optimizer_states(p) if state.main is not None else {}
    packed = torch.cat([local[name].detach().reshape(-1).float() for name in names]) if local else \
        torch.zeros(0, device=p.device)
    my_range = torch.tensor([start, end], dtype=torch.int64, device=p.device)
    ranges = all_gather(my_range, group, "distributed-optimizer shard ranges")
    spans = [tuple(int(v) for v in r.tolist()) for r in ranges]
    longest = max(e - s for s, e in spans) * len(names)
    padded = torch.zeros(longest, device=p.device)
    padded[: packed.numel()] = packed
    chunks = all_gather(padded, group, "distributed-optimizer expert rows")
    full = [torch.zeros(p.numel(), device=p.device) for _ in names]
    covered = 0
    for (s, e), chunk in zip(spans, chunks):
        for k, tensor in enumerate(full):
            tensor[s:e] = chunk[k * (e - s):(k + 1) * (e - s)]
        covered += e - s
    if covered != p.numel():
        raise RuntimeError(f"distributed optimizer pieces cover {covered} of {p.numel()} elements of an "
                           f"expert parameter {tuple(p.shape)}")
    return [tensor.view(p.shape) for tensor in full]


# ---- grad norm ------------------------------------------------------------------------------------
def count_experts_once_in_grad_norm(optimizer: Any, moe: MoELayers) -> None:
    """Make the expert optimizers' grad-norm inputs the owner rows of each logical expert only.

    Replaces ``get_main_grads_for_grad_norm`` on each inner optimizer that steps expert parameters
    (``ChainedOptimizer.get_grad_norm`` and ``clip_grad_norm`` both read it): each expert gradient
    ``[S, ...]`` (or distributed piece) is replaced by views of its owner rows, read from the placement
    active at that step.
    """
    by_optimizer: dict[int, tuple[Any, list[ExpertParamState]]] = {}
    for state in expert_param_states(optimizer, moe):
        by_optimizer.setdefault(id(state.optimizer), (state.optimizer, []))[1].append(state)
    layer_of = {id(p): layer.layer_idx for layer in moe.layers for p in moe.layer_expert_params(layer)}
    for inner, states in by_optimizer.values():
        if getattr(inner, "_ep_megatron_grad_norm", False):
            raise ValueError("optimizer: its grad norm already counts experts once (attach once)")
        original = inner.get_main_grads_for_grad_norm

        def grads_for_norm(original: Any = original, states: list[ExpertParamState] = states) -> list[Tensor]:
            owner_mask = moe.owner_mask()  # [L, S]
            owned: dict[int, list[Tensor]] = {}
            for state in states:
                grad = state.main.grad if state.main is not None else None
                if grad is not None:
                    rows = owner_mask[layer_of[id(state.param)]].nonzero().flatten().tolist()
                    owned[id(grad)] = _owned_views(grad, state, rows)
            return [view for grad in original() for view in owned.get(id(grad), [grad])]

        inner.get_main_grads_for_grad_norm = grads_for_norm
        inner._ep_megatron_grad_norm = True


def _owned_views(grad: Tensor, state: ExpertParamState, rows: list[int]) -> list[Tensor]:
    """Views of ``grad`` covering the owner ``rows`` of ``state.param`` (a full ``[S, ...]`` gradient, or
    the 1-D piece ``flat_range`` of the flattened one)."""
    if not state.distributed:
        return [grad[row] for row in rows]
    start, end = state.flat_range
    row_numel = state.param[0].numel()
    views = []
    for row in rows:
        lo, hi = max(start, row * row_numel), min(end, (row + 1) * row_numel)
        if lo < hi:
            views.append(grad[lo - start:hi - start])
    return views
