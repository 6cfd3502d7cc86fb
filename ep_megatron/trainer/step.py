"""The plain-PyTorch training step of a model with MoE layers, written once.

:func:`forward_backward` runs the micro-batches of one step with the aux-loss gradients scaled like the
main loss; :func:`optimizer_step` then sums expert gradients over replicas and expert-data-parallel
ranks, averages dense gradients over data-parallel ranks, clips by the true global norm (each logical
expert counted once), steps the optimizer, zeroes the gradients and updates the expert bias. The
pretraining job, the tests and the benchmarks use these two functions; a user's own loop can too::

    loss, rows, aux = forward_backward(moe, micro_batches, forward, lambda loss: loss.backward(), grad_sync)
    stats = optimizer_step(moe, optimizer, grad_sync, max_norm=1.0)
    rebalancer.step(moe.take_loads())
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel.comm import all_reduce
from ep_megatron.parallel.grad_sync import ExpertGradSync, clip_grad_norm_
from ep_megatron.parallel.groups import ParallelGroups

MicroBatch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class StepStats:
    """What :func:`optimizer_step` did on this rank."""

    grad_norm: float  # true global norm before clipping (NaN when clipping is off)
    grad_sync_bytes: int  # bytes this rank sent to sum expert replicas


def forward_backward(moe: MoELayers, micro: Sequence[MicroBatch], forward: Callable[[Tensor, Tensor], Tensor],
                     backward: Callable[[Tensor], None], grad_sync: ExpertGradSync | None = None,
                     ) -> tuple[Tensor, list[int], dict[str, float]]:
    """Run ``backward(forward(inputs, targets))`` on every micro-batch, with the aux-loss gradients scaled
    like the main loss (``1 / len(micro)``); return the mean loss ``[]`` (on the device), the expert rows
    per layer ``[L]`` summed over micro-batches, and the aux losses averaged over layers and micro-batches
    (read on the host once, at the end).

    With ``grad_sync``, the last micro-batch's backward syncs each layer's expert gradients from hooks as
    soon as they are complete (:meth:`ExpertGradSync.arm`); ``optimizer_step`` finishes the sync.
    """
    losses, rows, aux = [], [0] * len(moe), {}
    moe.set_aux_loss_scale(1.0 / len(micro))
    try:
        for index, (inputs, targets) in enumerate(micro):
            loss = forward(inputs, targets)
            if grad_sync is not None and index == len(micro) - 1:
                grad_sync.arm()
            backward(loss)
            losses.append(loss.detach().float())
            rows = [total + layer_rows for total, layer_rows in zip(rows, moe.expert_rows())]
            for name, value in moe.aux_losses().items():
                aux[name] = aux[name] + value / len(micro) if name in aux else value / len(micro)
    finally:
        moe.set_aux_loss_scale(1.0)
    names = sorted(aux)
    values = torch.stack([aux[name].float() for name in names]).tolist() if names else []
    return torch.stack(losses).mean(), rows, dict(zip(names, values))


_BUCKET_NUMEL = 1 << 25  # elements per all-reduce of dense gradients (128 MiB in fp32)


def all_reduce_mean(tensors: Iterable[Tensor], groups: ParallelGroups) -> None:
    """Average ``tensors`` over the data-parallel group, in flat buckets of at most ``_BUCKET_NUMEL``
    elements (a tensor larger than that is reduced alone, in place)."""
    tensors = list(tensors)
    if groups.world_size == 1 or not tensors:
        return
    bucket: list[Tensor] = []
    for tensor in tensors:
        if bucket and sum(t.numel() for t in bucket) + tensor.numel() > _BUCKET_NUMEL:
            _reduce_bucket(bucket, groups)
            bucket = []
        bucket.append(tensor)
    _reduce_bucket(bucket, groups)


def _reduce_bucket(bucket: list[Tensor], groups: ParallelGroups) -> None:
    alone = len(bucket) == 1 and bucket[0].is_contiguous()
    flat = bucket[0] if alone else torch.cat([t.reshape(-1) for t in bucket])
    all_reduce(flat, groups.dp_group, "data-parallel grad mean")
    flat /= groups.world_size
    if flat is bucket[0]:
        return
    offset = 0
    for t in bucket:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def optimizer_step(moe: MoELayers, optimizer: Any, grad_sync: ExpertGradSync, *, max_norm: float = 0.0,
                   dense_params: Iterable[Tensor] | None = None) -> StepStats:
    """After the backward of every micro-batch: replica + EDP sum of expert grads, DP mean of dense grads,
    clipping by the true norm (``max_norm > 0``), ``optimizer.step()``, zeroed grads, expert-bias update.

    ``dense_params`` defaults to ``moe.dense_params()``. Collective; every rank calls it every step.
    """
    if not (math.isfinite(max_norm) and max_norm >= 0):
        raise ValueError(f"max_norm={max_norm} must be finite and >= 0 (0 disables clipping)")
    dense = moe.dense_params() if dense_params is None else list(dense_params)
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sync = grad_sync()
    all_reduce_mean([p.grad for p in dense], moe.groups)
    grad_norm = float(clip_grad_norm_(moe, dense, max_norm)) if max_norm > 0 else float("nan")
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    moe.update_expert_bias()
    return StepStats(grad_norm, sync.bytes_sent)
