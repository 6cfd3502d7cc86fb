"""Single-process dense MoE reference: a plain loop over logical experts, written independently of
``ep_megatron`` (it imports nothing from it; ``config`` is only read for its field values).

Tests compare the expert-parallel layer with it. Conventions:

- ``hidden`` is ``[tokens, hidden]`` or ``[seq, batch, hidden]`` (one rank's tokens);
- expert weights are given per **logical** expert: ``expert_fc1 [E, fc1_out, hidden]`` (SwiGLU: gate rows
  then up rows), ``expert_fc2 [E, hidden, ffn]``;
- the returned ``aux_loss`` is the sum of the enabled load-balancing and z losses of these tokens; the
  layer attaches them to the router's gradient itself, so a test adds ``aux_loss`` to the reference loss
  and not to the layer's loss;
- capacity (``capacity_factor``) is per logical expert over these tokens, ``ceil(cf * T * top_k / E)``.

For a multi-rank comparison, call it once per rank's tokens and sum the gradients (use a loss that is a
sum over ranks, e.g. ``(output * fixed_weights).sum()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class ReferenceOutput:
    """What the dense reference computed for one batch of tokens."""

    output: torch.Tensor  # same shape as hidden
    probs: torch.Tensor  # [T, top_k] routing weights (before capacity drops)
    topk_ids: torch.Tensor  # [T, top_k] chosen logical experts
    kept: torch.Tensor  # [T, top_k] bool, False where capacity dropped the pair
    aux_loss: torch.Tensor  # scalar, sum of the enabled auxiliary losses (0 when none)
    num_dropped: int  # (token, expert) pairs dropped by capacity


def _mlp(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, activation: str) -> torch.Tensor:
    h = x @ fc1.t()
    if activation == "swiglu":
        half = h.shape[-1] // 2
        h = F.silu(h[:, :half]) * h[:, half:]
    else:
        h = F.gelu(h)
    return h @ fc2.t()


def _select(scores: torch.Tensor, cfg: Any) -> torch.Tensor:
    """Top-k ids per token, with group-limited routing done token by token."""
    if cfg.num_groups is None:
        return scores.topk(cfg.top_k, dim=-1).indices
    per_group = cfg.num_experts // cfg.num_groups
    rows = []
    for token_scores in scores:
        groups = token_scores.view(cfg.num_groups, per_group)
        group_value = groups.topk(cfg.top_k // cfg.group_topk, dim=-1).values.sum(-1)
        allowed = group_value.topk(cfg.group_topk).indices
        masked = torch.full_like(token_scores, float("-inf"))
        for g in allowed.tolist():
            masked[g * per_group:(g + 1) * per_group] = token_scores[g * per_group:(g + 1) * per_group]
        rows.append(masked.topk(cfg.top_k).indices)
    return torch.stack(rows)


def _route(logits: torch.Tensor, cfg: Any, expert_bias: torch.Tensor | None):
    """``(probs [T, k], ids [T, k])`` as Megatron-Core's ``topk_routing_with_score_function``."""
    use_bias = expert_bias is not None and cfg.enable_expert_bias
    bias = expert_bias if use_bias else torch.zeros(logits.shape[1])
    bias = bias.to(logits.dtype)
    if cfg.score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        ids = _select((scores + bias).detach(), cfg)
        chosen = scores.gather(1, ids)
        probs = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) if cfg.top_k > 1 else chosen
    elif cfg.pre_softmax:
        scores = torch.softmax(logits, dim=-1)
        ids = _select((scores + bias).detach(), cfg)
        probs = scores.gather(1, ids)
    else:
        ids = _select((logits + bias).detach(), cfg)
        probs = torch.softmax(logits.gather(1, ids), dim=-1)
    return probs, ids


def _aux_losses(logits: torch.Tensor, ids: torch.Tensor, cfg: Any, seq_length: int) -> torch.Tensor:
    total = logits.new_zeros(())
    num_tokens, num_experts = logits.shape
    if cfg.load_balancing_type != "none" and cfg.aux_loss_coeff > 0:
        if cfg.score_function == "softmax":
            p = torch.softmax(logits, dim=-1)
        else:
            p = torch.sigmoid(logits)
            p = p / (p.sum(-1, keepdim=True) + 1e-20)
        if cfg.load_balancing_type == "aux_loss":
            chunks = [torch.arange(num_tokens)]
        else:  # seq_aux_loss: token t belongs to sequence t % batch ([seq, batch] flattened)
            batch = num_tokens // seq_length
            chunks = [torch.arange(b, num_tokens, batch) for b in range(batch)]
        losses = []
        for chunk in chunks:
            n = len(chunk)
            value = logits.new_zeros(())
            for e in range(num_experts):
                count = (ids[chunk] == e).sum()
                value = value + count * p[chunk, e].sum()
            losses.append(value * num_experts / (cfg.top_k * n * n))
        total = total + torch.stack(losses).mean() * cfg.aux_loss_coeff
    if cfg.z_loss_coeff > 0:
        total = total + cfg.z_loss_coeff * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return total


def _capacity_keep(probs: torch.Tensor, ids: torch.Tensor, cfg: Any) -> torch.Tensor:
    num_tokens = ids.shape[0]
    kept = torch.ones_like(ids, dtype=torch.bool)
    if cfg.capacity_factor is None:
        return kept
    capacity = math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts)
    for e in range(cfg.num_experts):
        pairs = (ids == e).nonzero().tolist()  # [(token, k)], ascending token order
        if len(pairs) <= capacity:
            continue
        if cfg.drop_policy == "probs":
            pairs.sort(key=lambda tk: -float(probs[tk[0], tk[1]]))
        for token, k in pairs[capacity:]:
            kept[token, k] = False
    return kept


def dense_moe_reference(hidden: torch.Tensor, router_weight: torch.Tensor, expert_fc1: torch.Tensor,
                        expert_fc2: torch.Tensor, config: Any, expert_bias: torch.Tensor | None = None,
                        shared_fc1: torch.Tensor | None = None,
                        shared_fc2: torch.Tensor | None = None) -> ReferenceOutput:
    """Dense MoE forward (differentiable in every tensor argument).

    ``hidden [T, H] | [S, B, H]``, ``router_weight [E, H]``, ``expert_fc1 [E, fc1_out, H]``,
    ``expert_fc2 [E, H, ffn]``, ``expert_bias [E]`` (used only with ``config.enable_expert_bias``),
    optional shared expert ``shared_fc1 [shared_fc1_out, H]``, ``shared_fc2 [H, shared_ffn]``.
    The router runs in fp32 unless ``config.router_dtype == "fp64"``.
    """
    x = hidden.reshape(-1, hidden.shape[-1])
    seq_length = hidden.shape[0] if hidden.dim() == 3 else x.shape[0]
    router_dtype = torch.float64 if config.router_dtype == "fp64" else torch.float32
    logits = x.to(router_dtype) @ router_weight.to(router_dtype).t()
    probs, ids = _route(logits, config, expert_bias)
    kept = _capacity_keep(probs.detach(), ids, config)
    out = torch.zeros_like(x)
    for e in range(config.num_experts):
        token_idx, k_idx = ((ids == e) & kept).nonzero(as_tuple=True)
        if len(token_idx) == 0:
            continue
        y = _mlp(x[token_idx], expert_fc1[e], expert_fc2[e], config.activation)
        out = out.index_add(0, token_idx, y * probs[token_idx, k_idx].to(y.dtype).unsqueeze(1))
    if shared_fc1 is not None and shared_fc2 is not None:
        out = out + _mlp(x, shared_fc1, shared_fc2, config.activation)
    aux = _aux_losses(logits, ids, config, seq_length)
    return ReferenceOutput(output=out.view(hidden.shape), probs=probs, topk_ids=ids, kept=kept,
                           aux_loss=aux, num_dropped=int((~kept).sum()))
