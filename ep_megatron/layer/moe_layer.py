"""``MoELayer``: router -> dispatcher -> grouped experts -> combine (+ shared experts).

``forward(hidden [seq, batch, hidden] | [tokens, hidden]) -> (output, None)`` is Megatron-Core's MLP
contract. The four sharding strategies are only different :class:`ExpertPlacement` objects fed to the
same layer; with dropless routing the output and every logical expert's summed gradient do not depend on
the placement (capacity mode drops per logical expert on each rank's own tokens, so it does not depend
on the placement either, but the tokens it drops do depend on how tokens are split over ranks).

A dropless forward reads the device once on the host (the dispatcher's count exchange, which also
carries the NaN/inf check and the dropped-pair count) and its backward not at all. Under activation
checkpointing the model marks recomputed forwards with :func:`recomputing`; they skip the bookkeeping
(load counts, aux-loss values, row counts), so nothing is counted twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ep_megatron.config import MoEConfig
from ep_megatron.layer.dispatcher import STATUS_DROPPED, STATUS_ERROR, CountExchange, TokenDispatcher
from ep_megatron.layer.experts import GroupedExperts, expert_activation
from ep_megatron.layer.router import TopKRouter, count_nonfinite, nonfinite_error
from ep_megatron.parallel import ParallelGroups
from ep_megatron.placement import ExpertPlacement

_ROUTER_STREAM, _SHARED_STREAM, _EXPERT_STREAM = 0, 1, 2
_RECOMPUTE = threading.local()


@contextmanager
def recomputing() -> Iterator[None]:
    """Forwards run inside are recomputations (activation checkpointing): MoE layers skip their
    bookkeeping. Thread-local: the autograd thread that recomputes sets it itself."""
    previous = getattr(_RECOMPUTE, "active", False)
    _RECOMPUTE.active = True
    try:
        yield
    finally:
        _RECOMPUTE.active = previous


def is_recomputing() -> bool:
    return getattr(_RECOMPUTE, "active", False)


def init_generator(seed: int, layer_idx: int, stream: int) -> torch.Generator:
    """CPU generator for one (seed, MoE layer, stream) triple; experts use ``stream = 2 + logical_id``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + layer_idx) * 1_000_033 + stream)


def expert_init(config: MoEConfig, layer_idx: int, logical_id: int) -> tuple[Tensor, Tensor]:
    """Initial ``(fc1 [fc1_out, hidden], fc2 [hidden, ffn])`` fp32 rows of one logical expert."""
    gen = init_generator(config.seed, layer_idx, _EXPERT_STREAM + logical_id)
    fc1 = torch.randn(config.fc1_out, config.hidden_size, generator=gen) * config.init_std
    fc2 = torch.randn(config.hidden_size, config.ffn_hidden_size, generator=gen) * config.init_std
    return fc1, fc2


class SharedExpertMLP(nn.Module):
    """Always-on dense MLP of width ``shared_expert_ffn_size`` with the experts' activation; with
    ``shared_expert_gate`` its output is scaled per token by ``sigmoid(tokens @ gate_weight.t())``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.activation = config.activation
        fc1_out = config.shared_expert_ffn_size * (2 if config.activation == "swiglu" else 1)
        self.fc1_weight = nn.Parameter(torch.empty(fc1_out, config.hidden_size))
        self.fc2_weight = nn.Parameter(torch.empty(config.hidden_size, config.shared_expert_ffn_size))
        gated = config.shared_expert_gate
        self.gate_weight = nn.Parameter(torch.empty(1, config.hidden_size)) if gated else None  # [1, hidden]

    def forward(self, tokens: Tensor) -> Tensor:
        """``[T, hidden] -> [T, hidden]``."""
        output = expert_activation(tokens @ self.fc1_weight.t(), self.activation) @ self.fc2_weight.t()
        if self.gate_weight is not None:
            output = torch.sigmoid(tokens @ self.gate_weight.t()) * output
        return output


class MoELayer(nn.Module):
    """An expert-parallel MoE MLP; ``layer_idx`` is this layer's row of ``placement``.

    A model's MoE layers share one placement, owned by :class:`~ep_megatron.layer.moe_layers.MoELayers`,
    which alone switches it (after the rows were migrated). ``router_cls`` is the router built for every
    layer (a framework integration may subclass :class:`TopKRouter`, e.g. for its own aux-loss scaling).
    """

    router_cls: type[TopKRouter] = TopKRouter

    def __init__(self, config: MoEConfig, placement: ExpertPlacement, groups: ParallelGroups,
                 layer_idx: int = 0) -> None:
        super().__init__()
        _check_placement(config, placement, groups, layer_idx)
        self.config, self.placement, self.groups, self.layer_idx = config, placement, groups, layer_idx
        self.router = self.router_cls(config)
        self.experts = GroupedExperts(config, placement.slots_per_rank,
                                      group_name=f"ep_size_{groups.ep_size}")
        self.shared_experts = SharedExpertMLP(config) if config.shared_expert_ffn_size else None
        self.dispatcher = TokenDispatcher(groups.ep_rank, groups.ep_size, groups.ep_group,
                                          config.prefer_local_replica)
        self.last_dropped_tokens = 0  # (token, expert) pairs dropped by capacity in the last forward
        self.last_expert_rows = 0  # rows this rank's experts computed in the last forward (its real load)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every weight from ``(config.seed, layer_idx)``; expert slots by logical id, so all
        replicas of an expert start equal whatever the placement, EP size and strategy."""
        cfg = self.config
        router_gen = init_generator(cfg.seed, self.layer_idx, _ROUTER_STREAM)
        self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=router_gen) * cfg.init_std)
        self.router.expert_bias.zero_()
        logical_ids = self.placement.local_logical_ids(self.groups.ep_rank)[self.layer_idx].tolist()
        for local_slot, logical_id in enumerate(logical_ids):
            fc1, fc2 = expert_init(cfg, self.layer_idx, logical_id)
            self.experts.fc1_weight[local_slot].copy_(fc1)
            self.experts.fc2_weight[local_slot].copy_(fc2)
        if self.shared_experts is not None:
            shared_gen = init_generator(cfg.seed, self.layer_idx, _SHARED_STREAM)
            for param in self.shared_experts.parameters():
                param.copy_(torch.randn(param.shape, generator=shared_gen) * cfg.init_std)

    def forward(self, hidden: Tensor) -> tuple[Tensor, None]:
        """``hidden [seq, batch, hidden] | [tokens, hidden] -> (output of the same shape, None)``.

        Bad input (wrong shape, NaN/inf router logits) raises on every rank of the expert-parallel group
        before any token is exchanged.
        """
        error = self._input_error(hidden)
        if error is not None:
            self.dispatcher.fail(error, self.placement.slots_per_rank, self.router.weight.device)
        record = not is_recomputing()
        tokens = hidden.reshape(-1, self.config.hidden_size)  # [T, hidden]
        logits = self.router.logits(tokens)  # [T, E]
        seq_length = hidden.shape[0] if hidden.dim() == 3 else tokens.shape[0]
        routing = self.router.route(logits, seq_length, record)
        permutation = self.dispatcher.permute(routing.probs, routing.logical_ids, routing.keep,
                                              self.placement, self.layer_idx)
        dropped = routing.num_dropped
        if dropped is None:
            dropped = torch.zeros((), dtype=torch.int64, device=logits.device)
        status = torch.stack([count_nonfinite(logits), dropped])  # [STATUS_WIDTH]
        counts = self.dispatcher.exchange_counts(permutation.slot_counts, status, self.layer_idx)
        self._raise_on_failure(counts, logits.numel())
        expert_input, plan = self.dispatcher.exchange_tokens(tokens, permutation, counts)
        if record:
            self.last_dropped_tokens = int(counts.statuses[self.groups.ep_rank, STATUS_DROPPED])
            self.last_expert_rows = expert_input.shape[0]
        expert_output = self.experts(expert_input, plan.tokens_per_local_slot, plan.slot_offsets)
        shared = None if self.shared_experts is None else (lambda: self.shared_experts(tokens))
        output = self.dispatcher.combine(expert_output, plan, overlap=shared)  # [T, hidden]
        return output.view(hidden.shape), None

    def _raise_on_failure(self, counts: CountExchange, num_logits: int) -> None:
        """After the count exchange: this rank's NaN/inf error, or the other EP ranks' failure."""
        own_code = int(counts.statuses[self.groups.ep_rank, STATUS_ERROR])
        own_error = nonfinite_error(max(own_code, 0), num_logits)
        if own_error is not None:
            raise RuntimeError(f"MoE layer {self.layer_idx}: {own_error}")
        failed = counts.failed_ranks()
        if failed:
            raise RuntimeError(
                f"MoE layer {self.layer_idx}: expert-parallel rank(s) {failed} got bad input this step (see "
                "their error); all ranks of the expert-parallel group stop before the token exchange"
            )

    def _input_error(self, hidden: Tensor) -> Exception | None:
        if hidden.dim() not in (2, 3):
            return ValueError(
                f"hidden must be [seq, batch, hidden] or [tokens, hidden], got {tuple(hidden.shape)}"
            )
        if hidden.shape[-1] != self.config.hidden_size:
            return ValueError(
                f"hidden.shape[-1]={hidden.shape[-1]} must equal config.hidden_size={self.config.hidden_size}"
            )
        if not hidden.dtype.is_floating_point:
            return ValueError(f"hidden.dtype={hidden.dtype} must be a floating-point dtype")
        return None

    # ---- hooks for the rebalancer, the training loop and logging ----------------------------------------
    def take_load(self) -> Tensor:
        """``[E] int64`` (token, logical expert) pairs this rank routed since the last call (before
        capacity drops); resets the count."""
        return self.router.take_load()

    def update_expert_bias(self) -> None:
        """Once per optimizer step on every rank: aux-loss-free bias update from the global load."""
        self.router.update_expert_bias(self.groups.dp_group)

    @property
    def last_aux_losses(self) -> dict[str, Tensor]:
        """Aux / seq-aux / z-loss values ``[]`` of the last forward (already in the gradient), detached."""
        return self.router.last_aux_losses


def _check_placement(config: MoEConfig, placement: ExpertPlacement, groups: ParallelGroups,
                     layer_idx: int) -> None:
    """Structural checks, identical on every rank, so they raise before any collective everywhere."""
    if placement.ep_size != groups.ep_size:
        raise ValueError(
            f"placement.ep_size={placement.ep_size} must equal the expert-parallel group size "
            f"groups.ep_size={groups.ep_size}"
        )
    if placement.num_logical_experts != config.num_experts:
        raise ValueError(
            f"placement.num_logical_experts={placement.num_logical_experts} must equal "
            f"config.num_experts={config.num_experts}"
        )
    if not 0 <= layer_idx < placement.num_layers:
        raise ValueError(f"layer_idx={layer_idx} must be in [0, placement.num_layers={placement.num_layers})")
