"""Replica gradient sum on what Megatron DDP reduces: the ``main_grad`` buffers of our expert parameters.

Megatron DDP keeps gradients in ``param.main_grad`` views of its buffers (``.grad`` is None) and reduces
the expert buffers over the expert-data-parallel (EDP) group, bucket group by bucket group, through
``_ParamAndGradBucketGroup.start_grad_sync``: from ``finish_grad_sync`` (``overlap_grad_reduce`` off),
from the backward hook when a group's last gradient is ready (overlap on), or from the pipeline
schedule's ``grad_sync_func``. :class:`ReplicaGradSync` wraps that method on every expert bucket group
holding our parameters, so whatever the path, once per step and before the EDP reduction, the
``main_grad`` rows of all replicas of each logical expert become their sum over the expert-parallel
group (:func:`ep_megatron.parallel.grad_sync.sync_layers` without its own EDP reduction). Bucket groups
have the same layout on every EP rank, and every rank reaches them at the same point of its step, so
the EP collectives stay matched.

Exactness: replicas then enter Megatron's EDP reduction with equal rows, but at different positions of
the bucket. A reduction of two addends is exact in any order (``a + b == b + a``), of three or more it
is not (a ring reduction's order depends on the position). With an EDP group of 3 or more ranks the
bucket groups' ``finish_grad_sync`` is wrapped too: after Megatron's reduction each owner's reduced row
is copied to the other replicas (non-owner rows zeroed, then the same replica sum: ``x + 0 == x``); the
distributed optimizer then reduces these bucket groups with an all-reduce instead of a reduce-scatter
(Megatron's ``force_all_reduce``), so the owners' full rows exist where the replicas' shards are.
Layers without replicas (the ``model`` strategy) are skipped: nothing is sent for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel.grad_sync import LayerGrads, layer_plans, sync_layers
from ep_megatron.placement import ExpertPlacement

_WRAPPED = "_ep_megatron_replica_sync"  # marks a bucket group whose grad sync is wrapped


class ReplicaGradSync:
    """Wraps Megatron DDP's expert bucket groups of ``chunks`` (a model's DDP chunks) once.

    ``calls`` counts the replica sums run before a reduction (for tests and logs). Raises
    ``ValueError`` when an expert parameter of ``moe`` is in no expert bucket group (the model is not
    wrapped in Megatron's ``DistributedDataParallel``) or when a bucket group is wrapped already.
    """

    def __init__(self, moe: MoELayers, chunks: Sequence[Any]) -> None:
        self.moe = moe
        self.calls = 0
        self.exact_after_reduce = moe.groups.edp_size >= 3
        # per placement: sync_layers' index plans per (layer, device), owner masks [L, S] per device
        self._cached: tuple[ExpertPlacement, dict[Any, Any]] | None = None
        layer_of = {id(p): layer for layer in moe.layers for p in moe.layer_expert_params(layer)}
        covered: set[int] = set()
        for chunk in chunks:
            if not hasattr(chunk, "expert_parallel_bucket_groups"):
                raise ValueError(f"model: {type(chunk).__name__} is not Megatron's DistributedDataParallel; "
                                 f"wrap every model chunk in it before attaching ep_megatron")
            for bucket_group in chunk.expert_parallel_bucket_groups:
                in_group = {id(p) for bucket in bucket_group.buckets for p in bucket.params_list}
                by_layer = [(layer, [p for p in moe.layer_expert_params(layer) if id(p) in in_group])
                            for layer in moe.layers]
                by_layer = [(layer, params) for layer, params in by_layer if params]
                if by_layer:
                    self._wrap(bucket_group, by_layer)
                    covered |= in_group & set(layer_of)
        missing = sorted({layer_of[i].layer_idx for i in set(layer_of) - covered})
        if missing:
            raise ValueError(f"model: expert parameters of MoE layers {missing} are in no expert bucket of "
                             f"Megatron's DistributedDataParallel")

    def _items(self, by_layer: list[tuple[Any, list[nn.Parameter]]]) -> list[LayerGrads]:
        """This bucket group's ``main_grad`` views of the layers that have replicas (same on every rank)."""
        placement = self.moe.placement
        return [LayerGrads([p.main_grad for p in params], placement, layer.layer_idx)
                for layer, params in by_layer if int(placement.replica_count[layer.layer_idx].max()) > 1]

    def _cache(self) -> dict[Any, Any]:
        """Device-side tensors derived from the active placement (no host-to-device copy per step)."""
        placement = self.moe.placement
        if self._cached is None or self._cached[0] is not placement:
            self._cached = (placement, {})
        return self._cached[1]

    def _sync(self, items: list[LayerGrads]) -> None:
        """Replica sum of ``items`` over EP (no EDP reduction, scale 1)."""
        cache = self._cache()
        for item in items:
            key = ("plan", item.layer_idx, item.grads[0].device)
            if key not in cache:
                cache[key] = layer_plans([item], self.moe.groups.ep_rank)[0]
        plans = [cache[("plan", item.layer_idx, item.grads[0].device)] for item in items]
        sync_layers(items, self.moe.groups, 1.0, reduce_edp=False, plans=plans)

    def _wrap(self, bucket_group: Any, by_layer: list[tuple[Any, list[nn.Parameter]]]) -> None:
        if getattr(bucket_group, _WRAPPED, False):
            raise ValueError("model: its expert gradients are already synced by ep_megatron (attach once)")
        start, finish = bucket_group.start_grad_sync, bucket_group.finish_grad_sync
        all_reduce = self.exact_after_reduce and bucket_group.ddp_config.use_distributed_optimizer

        def start_grad_sync(force_all_reduce: bool | None = False) -> None:
            if bucket_group.is_first_batch and bucket_group.grad_reduce_handle is not None:
                return start(force_all_reduce)  # Megatron's own guard: dispatched already this step
            items = self._items(by_layer)
            if items:
                self._sync(items)
                self.calls += 1
                force_all_reduce = force_all_reduce or all_reduce
            return start(force_all_reduce)

        def finish_grad_sync(force_all_reduce: bool | None = False) -> None:
            finish(force_all_reduce)
            if self.exact_after_reduce:
                items = self._items(by_layer)
                if items:
                    self._owners_to_replicas(items)

        bucket_group.start_grad_sync = start_grad_sync
        bucket_group.finish_grad_sync = finish_grad_sync
        setattr(bucket_group, _WRAPPED, True)

    @torch.no_grad()
    def _owners_to_replicas(self, items: list[LayerGrads]) -> None:
        """Every replica's rows become its owner's (reduced) rows, bit for bit."""
        cache = self._cache()
        for item in items:
            for grad in item.grads:
                key = ("owner", grad.device)
                if key not in cache:
                    cache[key] = self.moe.owner_mask().to(grad.device)  # [L, S]
                owner = cache[key][item.layer_idx].view(-1, *([1] * (grad.dim() - 1)))
                grad.masked_fill_(~owner, 0)
        self._sync(items)
