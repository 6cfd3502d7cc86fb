"""Our MoE layer as the MLP of Megatron-Core's ``TransformerLayer``, and its GPT layer spec.

:class:`MegatronEPMoELayer` accepts Megatron's MLP constructor arguments and follows Megatron's MoE
conventions inside a Megatron model: its router (:class:`MegatronTopKRouter`) computes the aux losses
with Megatron's own functions and attaches them with Megatron's ``MoEAuxLossAutoScaler`` (whose scale
Megatron's schedule sets), honours ``padding_mask`` (True = padding), keeps ``expert_bias`` in fp32
under ``Float16Module`` and fills the ``local_tokens_per_expert`` that ``finalize_model_grads`` uses to
update it. Its ``sharded_state_dict`` is Megatron's ``SequentialMLP`` layout, so ``dist_checkpointing``
files load into Megatron's own MoE model at any EP size, and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ep_megatron.config import MoEConfig
from ep_megatron.integrations.megatron.config import moe_config_from_megatron, moe_layer_indices
from ep_megatron.layer import MoELayer
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.layer.router import TopKRouter
from ep_megatron.parallel import ParallelGroups, build_groups
from ep_megatron.parallel.comm import all_reduce
from ep_megatron.placement import ExpertPlacement

_OWN_GROUPS: dict[int, ParallelGroups] = {}
_MEGATRON_ONLY_KEYS = "experts.experts."  # state-dict keys of Megatron's layout that hold no tensor of ours


# ---- process groups --------------------------------------------------------------------------------
def groups_from_megatron(ep_size: int, pg_collection: Any | None = None) -> ParallelGroups:
    """Our :class:`ParallelGroups` from Megatron's groups when Megatron is initialised, else our own.

    Under Megatron the MoE layers of one pipeline stage are shared by the ranks of its TP x DP x CP group
    (= EP x expert-DP, as expert-TP is 1): ``world_size`` / ``rank`` are that group's size and this rank's
    position ``edp_rank * ep_size + ep_rank`` in it, and ``dp_group`` is that group (the rebalancer sums
    the routed load over it). Groups come from ``pg_collection`` (``ep``, ``expt_dp``, ``tp_dp_cp``) or
    from ``megatron.core.parallel_state``; without Megatron they are created once per ``ep_size``.
    """
    if not dist.is_initialized():
        return build_groups(ep_size)
    from megatron.core import parallel_state

    if pg_collection is not None and getattr(pg_collection, "ep", None) is not None:
        ep_group, edp_group = pg_collection.ep, pg_collection.expt_dp
        stage_group = getattr(pg_collection, "tp_dp_cp", None) or \
            parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    elif parallel_state.model_parallel_is_initialized():
        ep_group = parallel_state.get_expert_model_parallel_group()
        edp_group = parallel_state.get_expert_data_parallel_group()
        stage_group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    else:
        if ep_size not in _OWN_GROUPS:
            _OWN_GROUPS[ep_size] = build_groups(ep_size)
        return _OWN_GROUPS[ep_size]
    ep, edp, stage = (dist.get_world_size(g) for g in (ep_group, edp_group, stage_group))
    if ep != ep_size:
        raise ValueError(f"expert_model_parallel_size={ep_size} but Megatron's expert-model-parallel group "
                         f"has {ep} ranks")
    if ep * edp != stage:
        raise ValueError(f"expert_tensor_parallel_size must be 1: EP {ep} x expert-DP {edp} != the {stage} "
                         f"TP x DP x CP ranks of the pipeline stage")
    ep_rank = dist.get_rank(ep_group)
    return ParallelGroups(world_size=stage, rank=dist.get_rank(edp_group) * ep + ep_rank, ep_size=ep,
                          ep_rank=ep_rank, ep_group=ep_group, edp_group=edp_group, dp_group=stage_group)


def _tp_cp_group(pg_collection: Any | None) -> dist.ProcessGroup | None:
    """Megatron's TP x CP group (where a router's aux-loss token counts are summed), None without it."""
    if pg_collection is not None and getattr(pg_collection, "tp_cp", None) is not None:
        return pg_collection.tp_cp
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_and_context_parallel_group()


# ---- the router --------------------------------------------------------------------------------------
class MegatronTopKRouter(TopKRouter):
    """:class:`TopKRouter` with Megatron-Core's ``TopKRouter`` conventions (same routing math).

    - aux / seq-aux loss and z-loss: Megatron's formulas and scaling (token counts summed over the TP x CP
      group, padding excluded, z-loss coefficient divided by the TP x CP size, times the local token count
      with ``calculate_per_token_loss``), attached with Megatron's ``MoEAuxLossAutoScaler`` (scaled by
      Megatron's schedule: loss scale x CP / micro-batches) and logged in Megatron's aux-loss tracker.
      ``last_aux_losses`` stays empty (no host sync; Megatron-LM logs the tracker).
    - ``expert_bias [E]`` stays fp32 whatever ``Float16Module`` casts. With expert bias on,
      ``local_tokens_per_expert [E]`` fp32 counts the kept, non-padding (token, expert) pairs of training
      forwards with grad enabled; Megatron's ``finalize_model_grads`` reduces it over TP x DP x CP, updates
      the bias and zeroes it (our own ``update_expert_bias`` is then not called). With expert bias off,
      ``expert_bias`` is not saved (Megatron has none).
    - ``padding_mask [T]`` (True = padding) is set by the layer for one forward.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.padding_mask: Tensor | None = None
        self.tp_cp_group: dist.ProcessGroup | None = None
        self.calculate_per_token_loss = False
        self.layer_number: int | None = None  # Megatron's global 1-based number, for the loss tracker
        self.num_layers_logged = 0
        if config.enable_expert_bias:
            self.register_buffer("local_tokens_per_expert", torch.zeros(config.num_experts), persistent=False)
        else:
            self.register_buffer("expert_bias", self.expert_bias, persistent=False)

    def bind_megatron(self, transformer_config: Any, tp_cp_group: dist.ProcessGroup | None) -> None:
        """Take the Megatron settings the aux losses depend on."""
        self.tp_cp_group = tp_cp_group
        self.calculate_per_token_loss = bool(transformer_config.calculate_per_token_loss)
        self.num_layers_logged = transformer_config.num_layers + (transformer_config.mtp_num_layers or 0)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Module casts move ``expert_bias`` / ``local_tokens_per_expert`` between devices, never to bf16."""
        kept = {name: self._buffers[name] for name in ("expert_bias", "local_tokens_per_expert")
                if name in self._buffers}
        result = super()._apply(fn, recurse)
        for name, tensor in kept.items():
            if self._buffers[name].dtype != tensor.dtype:
                self._buffers[name] = tensor.to(self._buffers[name].device)
        return result

    def route(self, logits: Tensor, seq_length: int, record: bool = True) -> Any:
        routing = super().route(logits, seq_length, record)
        if self.config.enable_expert_bias and self.training and torch.is_grad_enabled() and record:
            with torch.no_grad():
                valid = torch.ones_like(routing.logical_ids, dtype=torch.float32)  # [T, top_k]
                if self.padding_mask is not None:
                    valid = valid * (~self.padding_mask).unsqueeze(1)
                if routing.keep is not None:
                    valid = valid * routing.keep
                self.local_tokens_per_expert.index_add_(0, routing.logical_ids.flatten(), valid.flatten())
        return routing

    def _attach_aux_losses(self, probs: Tensor, logits: Tensor, logical_ids: Tensor,
                           seq_length: int, record: bool) -> Tensor:
        """Megatron's ``TopKRouter.apply_z_loss`` + ``_apply_aux_loss`` / ``_apply_seq_aux_loss``; a
        recomputed forward (``record=False``) attaches the same losses without logging them again."""
        from megatron.core.transformer.moe.moe_utils import (
            compute_routing_scores_for_aux_loss,
            switch_load_balancing_loss_func,
            z_loss_func,
        )

        cfg = self.config
        self.last_aux_losses = {}
        if not (self.training and torch.is_grad_enabled()):
            return probs
        padding, group_size = self.padding_mask, self._tp_cp_size()
        if cfg.z_loss_coeff > 0:
            coeff = cfg.z_loss_coeff / group_size
            loss = z_loss_func(logits, coeff, padding_mask=padding)
            num_tokens = (~padding).sum() if padding is not None else logits.shape[0]
            probs = self._attach(probs, loss, num_tokens)
            if record:
                self._log("z_loss", loss / coeff, None)
        if cfg.load_balancing_type == "none" or cfg.aux_loss_coeff <= 0:
            return probs
        routing_map, scores = compute_routing_scores_for_aux_loss(logits, cfg.top_k, cfg.score_function,
                                                                  padding_mask=padding)
        batch, topk_counted = 1, cfg.top_k
        if cfg.load_balancing_type == "seq_aux_loss":  # each (sequence, expert) is one column
            batch = logits.shape[0] // seq_length
            scores, routing_map = scores.reshape(seq_length, -1), routing_map.reshape(seq_length, -1)
            topk_counted = cfg.top_k * batch
        tokens_per_expert = routing_map.sum(dim=0)
        if group_size > 1:
            all_reduce(tokens_per_expert, self.tp_cp_group, "router token counts over TP x CP")
        if padding is not None:
            local_tokens = routing_map.sum() / topk_counted
            total_tokens = tokens_per_expert.sum() / topk_counted
        else:
            local_tokens, total_tokens = routing_map.shape[0], routing_map.shape[0] * group_size
        loss = switch_load_balancing_loss_func(scores, tokens_per_expert, total_tokens, cfg.top_k,
                                               cfg.num_experts, cfg.aux_loss_coeff) / batch
        name = "load_balancing_loss" if cfg.load_balancing_type == "aux_loss" else "seq_load_balancing_loss"
        if record:
            self._log(name, loss / cfg.aux_loss_coeff, self.tp_cp_group)
        return self._attach(probs, loss, local_tokens)

    def _tp_cp_size(self) -> int:
        return 1 if self.tp_cp_group is None else dist.get_world_size(self.tp_cp_group)

    def _attach(self, probs: Tensor, loss: Tensor, num_tokens: Any) -> Tensor:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        return MoEAuxLossAutoScaler.apply(probs, loss * num_tokens if self.calculate_per_token_loss else loss)

    def _log(self, name: str, value: Tensor, group: dist.ProcessGroup | None) -> None:
        from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

        save_to_aux_losses_tracker(name, value, self.layer_number, self.num_layers_logged, reduce_group=group)


# ---- the layer ---------------------------------------------------------------------------------------
class MegatronEPMoELayer(MoELayer):
    """:class:`MoELayer` built by Megatron's ``build_module`` as the MLP of a ``TransformerLayer``.

    Accepts Megatron's MLP arguments (``config``, ``submodules``, ``pg_collection``) plus ``ep_options``
    from the spec's ``params``. The MoE-layer index (the placement row) is ``moe_layer_idx`` when the
    spec gives it and otherwise follows from ``set_layer_number``, which Megatron calls right after
    construction; experts are then re-initialised for that (global) index. :func:`ep_moe_layers`
    re-numbers the rows of a pipeline stage that holds only some MoE layers.

    Parameter markers Megatron reads: router weight and shared experts (replicated over TP) carry
    ``sequence_parallel`` (their grads are summed over TP by ``finalize_model_grads``); expert weights
    carry ``allreduce=False`` (reduced over expert-DP) and ``tensor_model_parallel=True`` (each rank's
    slots are its own, like Megatron's expert weights at expert-TP 1, so the grad norm counts them on
    every TP rank).
    """

    router_cls = MegatronTopKRouter

    def __init__(self, config: Any, submodules: Any = None, layer_number: int | None = None,
                 pg_collection: Any | None = None, moe_layer_idx: int | None = None, **ep_options: Any):
        del submodules  # our layer has no Megatron submodules
        moe_config = moe_config_from_megatron(config, **ep_options)
        groups = groups_from_megatron(config.expert_model_parallel_size, pg_collection)
        moe_layers = moe_layer_indices(config)
        # Each layer builds an equal placement; MoELayers (ep_moe_layers) makes them one shared object.
        placement = moe_config.placement(len(moe_layers), groups.ep_size)
        self._moe_layer_ids = moe_layers
        self._fixed_index = moe_layer_idx is not None
        if moe_layer_idx is None:
            moe_layer_idx = self._index_of(layer_number) if layer_number is not None else 0
        super().__init__(moe_config, placement, groups, layer_idx=moe_layer_idx)
        self.router.bind_megatron(config, _tp_cp_group(pg_collection))
        dense = [self.router.weight, *(self.shared_experts.parameters() if self.shared_experts else ())]
        for param in dense:
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
        for param in self.experts.parameters():
            param.tensor_model_parallel = True  # type: ignore[attr-defined]
            param.partition_dim, param.partition_stride = 0, 1  # type: ignore[attr-defined]
        self.register_load_state_dict_pre_hook(_drop_megatron_only_entries)

    def _index_of(self, layer_number: int) -> int:
        layer = layer_number - 1  # Megatron numbers layers from 1
        if layer not in self._moe_layer_ids:
            raise ValueError(f"layer_number={layer_number} is not an MoE layer (MoE layers: "
                             f"{[i + 1 for i in self._moe_layer_ids]})")
        return self._moe_layer_ids.index(layer)

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron's hook: bind this layer to its placement row and initialise it for that index."""
        self.layer_number = layer_number
        self.router.layer_number = layer_number
        if self._fixed_index:
            return
        index = self._index_of(layer_number)
        if index != self.layer_idx:
            self.layer_idx = index
            self.reset_parameters()

    def bind_row(self, layer_idx: int, placement: ExpertPlacement) -> None:
        """Use row ``layer_idx`` of ``placement`` from now on (weights unchanged: the rows hold the same
        logical experts). For :func:`ep_moe_layers` only."""
        held = self.placement.local_logical_ids(self.groups.ep_rank)[self.layer_idx]
        if not torch.equal(placement.local_logical_ids(self.groups.ep_rank)[layer_idx], held):
            raise ValueError(f"placement row {layer_idx} holds other logical experts than row "
                             f"{self.layer_idx}")
        self.layer_idx, self.placement = layer_idx, placement

    def forward(self, hidden: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, None]:
        """``hidden [seq, batch, hidden] -> ([seq, batch, hidden], None)``.

        ``padding_mask [batch, seq]`` bool, True = padding (Megatron's convention): padding tokens are routed
        and computed like any token but left out of the aux losses and the expert-bias counts.
        """
        mask = None
        if padding_mask is not None:
            mask = padding_mask.transpose(0, 1).reshape(-1).bool()  # [seq * batch], the tokens' order
            if hidden.dim() != 3 or mask.numel() != hidden.shape[0] * hidden.shape[1]:
                raise ValueError(f"padding_mask of shape {tuple(padding_mask.shape)} does not match hidden "
                                 f"[seq, batch, hidden] = {tuple(hidden.shape)}")
        self.router.padding_mask = mask
        try:
            return super().forward(hidden)
        finally:
            self.router.padding_mask = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """Megatron ``dist_checkpointing`` entries in ``SequentialMLP``'s layout.

        Expert weights: key ``{prefix}experts.experts.linear_fc{1,2}.weight``, one chunk per local slot at
        the global **logical** expert axis, plus one (empty) ``..._extra_state`` object per slot as
        Megatron's linear layers write; the owner replica on expert-data-parallel rank 0 has ``replica_id``
        0, every other copy a distinct non-zero id. Dense tensors (router, expert bias when enabled,
        shared experts) under their module names, replicated over data-parallel ranks.
        """
        del metadata
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

        groups = self.groups
        entries: dict[str, Any] = {}
        replica_ids = self._slot_replica_ids()
        logical_ids = self.placement.local_logical_ids(groups.ep_rank)[self.layer_idx].tolist()
        num_experts = self.placement.num_logical_experts
        expert_axis = len(sharded_offsets)
        for attr, megatron_name in (("fc1_weight", "linear_fc1"), ("fc2_weight", "linear_fc2")):
            key = f"{prefix}experts.experts.{megatron_name}.weight"

            def build(key: str, stacked: Tensor, replica_id: Any, flattened_range: Any) -> list[Any]:
                del replica_id, flattened_range
                return [
                    ShardedTensor.from_rank_offsets(
                        key, stacked[local_slot], *sharded_offsets, (expert_axis, logical_id, num_experts),
                        replica_id=replica_ids[local_slot], prepend_axis_num=expert_axis + 1,
                    )
                    for local_slot, logical_id in enumerate(logical_ids)
                ]

            entries[f"{prefix}experts.{attr}"] = ShardedTensorFactory(
                key, getattr(self.experts, attr), build, _stack_rows, replica_id=(0, 0, groups.edp_rank),
            )
            extra_key = f"{prefix}{_MEGATRON_ONLY_KEYS}{megatron_name}._extra_state"
            for local_slot, logical_id in enumerate(logical_ids):
                entries[f"{extra_key}.{local_slot}"] = make_sharded_object_for_checkpoint(
                    None, extra_key, (*sharded_offsets, (expert_axis, logical_id, num_experts)),
                    replica_id=replica_ids[local_slot],
                )
        dense_replica = (0, 0, groups.rank)
        for name, tensor in self.state_dict(keep_vars=True).items():
            if name.startswith("experts."):
                continue
            entries[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", tensor, *sharded_offsets, replica_id=dense_replica,
                prepend_axis_num=len(sharded_offsets),
            )
        return entries

    def _slot_replica_ids(self) -> list[tuple[int, int, int]]:
        """Megatron replica id of each local slot: ``(0, 0, 0)`` for the written copy, distinct otherwise."""
        groups, placement = self.groups, self.placement
        slots_per_rank = placement.slots_per_rank
        first_slot = groups.ep_rank * slots_per_rank
        log2phy = placement.logical_to_physical[self.layer_idx]  # [E, max_replicas]
        owner = placement.owner_slot[self.layer_idx]  # [E]
        ids = []
        for local_slot in range(slots_per_rank):
            slot = first_slot + local_slot
            logical_id = int(placement.physical_to_logical[self.layer_idx, slot])
            if slot == int(owner[logical_id]):
                copy = 0
            else:
                others = [int(s) for s in log2phy[logical_id] if s >= 0 and s != int(owner[logical_id])]
                copy = 1 + others.index(slot)
            ids.append((0, 0, groups.edp_rank * placement.max_replicas + copy))
        return ids


def _stack_rows(rows: list[Tensor]) -> Tensor:
    """Inverse of the expert factory's build: ``[local_slots] x [*row] -> [local_slots, *row]``."""
    return torch.stack(rows)


def _drop_megatron_only_entries(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                                *args: Any) -> None:
    """Load pre-hook: the ``_extra_state`` objects of Megatron's expert layout carry nothing of ours."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}{_MEGATRON_ONLY_KEYS}")]:
        del state_dict[key]


def ep_moe_layers(model: nn.Module | Sequence[nn.Module]) -> MoELayers:
    """The owner of our MoE layers in a Megatron model (or its list of model chunks).

    Layers are built with rows of the whole model's placement (global MoE index). A pipeline stage holds
    only some MoE layers: its layers are re-bound to a placement of their own rows (weights unchanged), so
    each stage plans, migrates and checkpoints its own layers; Megatron's sharded offsets keep the global
    layer axis in checkpoints.
    """
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, MegatronEPMoELayer)]
    if not layers:
        raise ValueError("model: no MegatronEPMoELayer found (build it with get_gpt_layer_spec_with_ep_moe)")
    rows = sorted(layer.layer_idx for layer in layers)
    full = layers[0].placement
    if rows != list(range(full.num_layers)):
        stage = ExpertPlacement(full.physical_to_logical[rows], full.num_logical_experts, full.ep_size,
                                full.num_nodes, full.strategy)
        for layer in layers:
            layer.bind_row(rows.index(layer.layer_idx), stage)
    return MoELayers(chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks))


# ---- specs -----------------------------------------------------------------------------------------
def get_gpt_layer_spec_with_ep_moe(normalization: str | None = None, qk_layernorm: bool = False,
                                   **ep_options: Any) -> Any:
    """Megatron-Core's ``get_gpt_layer_local_spec`` with our MoE layer as the MLP.

    ``ep_options`` (``sharding_strategy``, ``num_redundant_experts``, ...) are passed to every
    :class:`MegatronEPMoELayer`; every other MoE setting comes from the ``TransformerConfig``. The spec
    keeps Megatron's ``sharded_state_dict_keys_map`` (norm weights saved under Megatron's names), so
    checkpoints load into Megatron's own MoE model and back.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    # Megatron's dense local spec, with the MLP replaced (num_experts=None keeps its MLP submodules simple).
    spec = get_gpt_layer_local_spec(num_experts=None, normalization=normalization, qk_layernorm=qk_layernorm)
    spec.submodules.mlp = ModuleSpec(module=MegatronEPMoELayer, params=dict(ep_options))
    return spec
