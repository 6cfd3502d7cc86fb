"""``TopKRouter``: scores, top-k over logical experts, load-balancing losses, expert bias, load counts.

Everything here is in **logical** expert ids; placement never enters the router's math. The auxiliary
losses are computed on this rank's tokens (Megatron reduces token counts over its TP x CP group per
micro-batch; with TP = CP = 1 that group is the rank itself) and attached to the routing probabilities
with :class:`AuxLossAutoScaler`, so their gradient reaches the router weight during ``backward`` without
the caller adding them to the loss (Megatron-Core's ``MoEAuxLossAutoScaler`` pattern).

Nothing here reads a device value on the host: load counts are accumulated with ``scatter_add_`` (not
``bincount``), aux-loss values are kept as detached tensors, the number of dropped pairs stays a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ep_megatron.config import MoEConfig
from ep_megatron.parallel.comm import all_reduce

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``output``; in backward, gives ``aux_loss`` the gradient ``scale``."""

    @staticmethod
    def forward(ctx, output: Tensor, aux_loss: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


@dataclass(frozen=True)
class RoutingResult:
    """What the router decided for ``T`` tokens."""

    probs: Tensor  # [T, top_k] weight of each (token, chosen expert), router dtype, aux losses attached
    logical_ids: Tensor  # [T, top_k] int64 chosen logical experts
    keep: Tensor | None  # [T, top_k] bool pairs within capacity; None when dropless
    num_dropped: Tensor | None  # [] int64 (token, expert) pairs dropped by capacity; None when dropless


class TopKRouter(nn.Module):
    """Linear gate ``weight [E, hidden]`` followed by top-k selection over logical experts.

    ``expert_bias [E]`` (a buffer) only shifts which experts are selected, never the probabilities
    (DeepSeek-V3's aux-loss-free balancing); :meth:`update_expert_bias` moves it once per optimizer step.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        # (token, logical expert) pairs routed in training mode since the last take_load / bias update.
        self.register_buffer("load_since_take", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("load_since_bias", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.last_aux_losses: dict[str, Tensor] = {}  # [] detached values of the last forward's aux losses
        # Gradient of each aux loss: the main loss's scale, e.g. 1 / micro-batches (set by MoELayers).
        self.aux_loss_scale = 1.0

    # ---- forward -----------------------------------------------------------------------------------
    def logits(self, tokens: Tensor) -> Tensor:
        """``tokens [T, hidden] -> [T, E]`` logits in the router dtype."""
        dtype = _ROUTER_DTYPES.get(self.config.router_dtype or "", tokens.dtype)
        return F.linear(tokens.to(dtype), self.weight.to(dtype))

    def route(self, logits: Tensor, seq_length: int, record: bool = True) -> RoutingResult:
        """``logits [T, E]`` (token ``t`` is position ``t // (T / seq_length)`` of its sequence) -> routing.

        ``seq_length`` only matters for ``seq_aux_loss`` (tokens are ``[seq, batch]`` flattened).
        ``record=False`` (a recomputation under activation checkpointing) leaves the load counters and
        ``last_aux_losses`` alone, so a recomputed forward is not counted twice.
        """
        cfg = self.config
        scores, selection_scores = _scores(logits, cfg)
        bias = self.expert_bias.to(logits.dtype) if cfg.enable_expert_bias else None
        if bias is not None:
            selection_scores = selection_scores + bias
        logical_ids = _topk(selection_scores.detach(), cfg)  # [T, top_k]
        probs = _probs(scores, logical_ids, cfg)
        probs = self._attach_aux_losses(probs, logits, logical_ids, seq_length, record)
        if self.training and record:  # evaluation forwards must not steer the bias or the rebalancer
            with torch.no_grad():
                flat_ids = logical_ids.flatten()
                ones = torch.ones_like(flat_ids)
                self.load_since_take.scatter_add_(0, flat_ids, ones)
                self.load_since_bias.scatter_add_(0, flat_ids, ones)
        keep, num_dropped = _apply_capacity(probs.detach(), logical_ids, cfg)
        return RoutingResult(probs=probs, logical_ids=logical_ids, keep=keep, num_dropped=num_dropped)

    def _attach_aux_losses(self, probs: Tensor, logits: Tensor, logical_ids: Tensor,
                           seq_length: int, record: bool) -> Tensor:
        cfg = self.config
        losses: dict[str, Tensor] = {}
        if logits.shape[0] == 0:
            if record:
                self.last_aux_losses = {}
            return probs
        if cfg.load_balancing_type != "none" and cfg.aux_loss_coeff > 0 and self.training:
            losses[cfg.load_balancing_type] = load_balancing_loss(logits, logical_ids, cfg, seq_length)
        if cfg.z_loss_coeff > 0 and self.training:
            losses["z_loss"] = z_loss(logits, cfg.z_loss_coeff)
        if record:
            self.last_aux_losses = {name: loss.detach() for name, loss in losses.items()}
        for loss in losses.values():
            probs = AuxLossAutoScaler.apply(probs, loss, self.aux_loss_scale)
        return probs

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def take_load(self) -> Tensor:
        """``[E] int64`` (token, logical expert) pairs this rank routed since the last call; resets."""
        load = self.load_since_take.clone()
        self.load_since_take.zero_()
        return load

    @torch.no_grad()
    def update_expert_bias(self, dp_group: dist.ProcessGroup | None) -> None:
        """Once per optimizer step: ``bias += rate * sign(mean load - load)`` from the global load.

        The load since the last update is all-reduced over ``dp_group`` (every rank must call this,
        even with ``enable_expert_bias=False``, which returns before any collective on all ranks).
        """
        if not self.config.enable_expert_bias:
            return
        load = self.load_since_bias.to(torch.float64)
        if dp_group is not None:
            all_reduce(load, dp_group, "expert-bias load")
        offset = load.mean() - load
        step = torch.sign(offset).to(self.expert_bias.dtype) * self.config.expert_bias_update_rate
        self.expert_bias += step
        self.load_since_bias.zero_()


# ---- routing math (pure functions, logical ids) -------------------------------------------------------
def _scores(logits: Tensor, cfg: MoEConfig) -> tuple[Tensor, Tensor]:
    """``(scores, selection_scores)``, both ``[T, E]``: probs are gathered from ``scores``."""
    if cfg.score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores, scores
    if cfg.pre_softmax:
        scores = torch.softmax(logits, dim=-1)
        return scores, scores
    return logits, logits  # softmax over the top-k logits, after selection


def _topk(selection_scores: Tensor, cfg: MoEConfig) -> Tensor:
    """``[T, E] -> [T, top_k]`` logical ids; group-limited when ``num_groups`` is set."""
    if cfg.num_groups is None:
        return torch.topk(selection_scores, cfg.top_k, dim=-1).indices
    assert cfg.group_topk is not None
    num_tokens = selection_scores.shape[0]
    grouped = selection_scores.view(num_tokens, cfg.num_groups, -1)
    group_scores = grouped.topk(cfg.top_k // cfg.group_topk, dim=-1).values.sum(-1)  # [T, num_groups]
    group_ids = group_scores.topk(cfg.group_topk, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
    masked = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(num_tokens, -1)
    return torch.topk(masked, cfg.top_k, dim=-1).indices


def _probs(scores: Tensor, logical_ids: Tensor, cfg: MoEConfig) -> Tensor:
    """``[T, top_k]`` routing weights from ``scores [T, E]`` at the chosen ids.

    Softmax over the top-k logits, or the chosen scores divided by their sum when ``norm_topk_prob`` says so
    (``None``: sigmoid scores when ``top_k > 1``, as Megatron-Core), then times ``topk_scaling_factor``.
    """
    chosen = scores.gather(1, logical_ids)
    if cfg.score_function == "softmax" and not cfg.pre_softmax:
        probs = torch.softmax(chosen, dim=-1)
    else:
        normalise = cfg.norm_topk_prob
        if normalise is None:
            normalise = cfg.score_function == "sigmoid" and cfg.top_k > 1
        probs = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) if normalise else chosen
    return probs * cfg.topk_scaling_factor if cfg.topk_scaling_factor != 1.0 else probs


def _apply_capacity(probs: Tensor, logical_ids: Tensor,
                    cfg: MoEConfig) -> tuple[Tensor | None, Tensor | None]:
    """``keep [T, top_k]`` bool: per logical expert, the ``capacity`` pairs kept by ``drop_policy``; and
    the number of dropped pairs (``[]`` int64 tensor). ``(None, None)`` when dropless."""
    num_tokens = logical_ids.shape[0]
    capacity = cfg.capacity(num_tokens)
    if capacity is None:
        return None, None
    dense_probs = torch.zeros(num_tokens, cfg.num_experts, dtype=probs.dtype, device=probs.device)
    dense_probs.scatter_(1, logical_ids, probs)  # [T, E]
    routed = torch.zeros_like(dense_probs, dtype=torch.bool).scatter_(1, logical_ids, True)
    if cfg.drop_policy == "probs":
        rank_key = torch.where(routed, dense_probs, torch.full_like(dense_probs, -1.0))
        kept_tokens = rank_key.topk(min(capacity, num_tokens), dim=0).indices  # [cap, E]
        keep_dense = torch.zeros_like(routed).scatter_(0, kept_tokens, True) & routed
    else:  # position: the first `capacity` routed tokens of each expert, in token order
        keep_dense = routed & (torch.cumsum(routed, dim=0) <= capacity)
    keep = keep_dense.gather(1, logical_ids)
    return keep, (~keep).sum()


def load_balancing_loss(logits: Tensor, logical_ids: Tensor, cfg: MoEConfig, seq_length: int) -> Tensor:
    """Switch / GShard aux loss, or DeepSeek's per-sequence version (averaged over sequences).

    ``coeff * E / (top_k * T^2) * sum_e count[e] * sum_t p[t, e]`` over each group of ``T`` tokens, where
    ``p`` are the full (all-expert) softmax scores, or sigmoid scores normalised per token.
    """
    if cfg.score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    num_tokens, num_experts = scores.shape
    routed = torch.zeros_like(scores).scatter_(1, logical_ids, 1.0)  # [T, E]
    if cfg.load_balancing_type == "seq_aux_loss":
        batch = num_tokens // seq_length
        # [seq, batch, E]: each batch column is one sequence.
        scores = scores.view(seq_length, batch, num_experts)
        routed = routed.view(seq_length, batch, num_experts)
        per_seq = (scores.sum(0) * routed.sum(0)).sum(-1)  # [batch]
        scale = cfg.aux_loss_coeff * num_experts / (cfg.top_k * seq_length * seq_length)
        return per_seq.mean() * scale
    scale = cfg.aux_loss_coeff * num_experts / (cfg.top_k * num_tokens * num_tokens)
    return (scores.sum(0) * routed.sum(0)).sum() * scale


def z_loss(logits: Tensor, coeff: float) -> Tensor:
    """ST-MoE router z-loss: ``coeff * mean_t logsumexp(logits[t])^2``."""
    return torch.logsumexp(logits, dim=-1).square().mean() * coeff


def count_nonfinite(logits: Tensor) -> Tensor:
    """``[]`` int64: NaN/inf entries of ``logits`` (stays on the device; read with the count exchange)."""
    return (~torch.isfinite(logits)).sum()


def nonfinite_error(num_nonfinite: int, numel: int) -> str | None:
    """The error message for ``num_nonfinite`` NaN/inf router logits out of ``numel``, else ``None``."""
    if num_nonfinite == 0:
        return None
    return f"router logits contain NaN/inf ({num_nonfinite} of {numel})"
