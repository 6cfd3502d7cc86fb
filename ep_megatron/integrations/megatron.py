"""Megatron-Core glue: config mapping, a GPT layer spec with our MoE layer, groups, dist checkpoints.

Switching a Megatron-Core GPT model to ep_megatron is a layer-spec change::

    spec = get_gpt_layer_spec_with_ep_moe(sharding_strategy="dynamic", num_redundant_experts=4)
    model = GPTModel(transformer_config, spec, vocab_size, max_sequence_length)

The MLP of every layer is then a :class:`MegatronEPMoELayer` (our :class:`MoELayer` accepting Megatron's
constructor arguments); its ``sharded_state_dict`` uses the keys and shapes of Megatron's own
``SequentialMLP`` (``{prefix}experts.experts.linear_fc1.weight [layers, E, fc1_out, hidden]``), so
``megatron.core.dist_checkpointing`` saves and loads a model that uses it under any expert layout.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ep_megatron.config import MoEConfig
from ep_megatron.layer import MoELayer
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel import ParallelGroups, build_groups

# Megatron TransformerConfig field -> MoEConfig field, copied as is.
_DIRECT_FIELDS = {
    "hidden_size": "hidden_size",
    "num_moe_experts": "num_experts",
    "moe_router_topk": "top_k",
    "moe_router_score_function": "score_function",
    "moe_router_enable_expert_bias": "enable_expert_bias",
    "moe_router_bias_update_rate": "expert_bias_update_rate",
    "moe_expert_capacity_factor": "capacity_factor",
    "moe_token_drop_policy": "drop_policy",
    "init_method_std": "init_std",
}
# expert_model_parallel_size is the size of the groups the layers are built with (groups_from_megatron).
# Fields mapped with a conversion (see ``_mapped_fields``).
_CONVERTED_FIELDS = (
    "ffn_hidden_size", "moe_ffn_hidden_size", "moe_router_pre_softmax", "gated_linear_unit",
    "activation_func", "moe_router_num_groups", "moe_router_group_topk", "moe_router_load_balancing_type",
    "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_shared_expert_intermediate_size", "moe_router_dtype",
)
# moe_* fields that only choose Megatron's kernels, dispatcher or logging: the math is unchanged, ours
# replaces them.
_IMPLEMENTATION_FIELDS = (
    "moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_token_dispatcher_type", "moe_enable_deepep",
    "moe_flex_dispatcher_backend", "moe_deepep_num_sms", "moe_hybridep_num_sms", "moe_permute_fusion",
    "moe_router_fusion", "moe_per_layer_logging", "moe_layer_recompute", "moe_shared_expert_overlap",
    "moe_layer_freq",
)
# Non-moe_* fields that change the MoE layer's math, with the value we support.
_REQUIRED_VALUES = {"expert_tensor_parallel_size": (None, 1), "add_bias_linear": (False,)}
_ACTIVATIONS = {("silu", True): "swiglu", ("gelu", False): "gelu"}
_LOAD_BALANCING = ("none", "aux_loss", "seq_aux_loss")
_ROUTER_DTYPES = {None: None, "fp32": "fp32", "fp64": "fp64"}


def _megatron_defaults(transformer_config: Any) -> dict[str, Any]:
    """Default value of every dataclass field of ``transformer_config``'s class."""
    defaults = {}
    for f in dataclasses.fields(transformer_config):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _mapped_fields(tc: Any, errors: list[str]) -> dict[str, Any]:
    """MoEConfig fields from ``tc``; appends a message to ``errors`` for each unsupported value."""
    fields = {ours: getattr(tc, theirs) for theirs, ours in _DIRECT_FIELDS.items()}
    if tc.num_moe_experts is None:
        errors.append("num_moe_experts=None (not an MoE config)")
    fields["ffn_hidden_size"] = tc.moe_ffn_hidden_size or tc.ffn_hidden_size
    act_name = getattr(tc.activation_func, "__name__", repr(tc.activation_func))
    activation = _ACTIVATIONS.get((act_name, bool(tc.gated_linear_unit)))
    if activation is None:
        errors.append(f"activation_func={act_name} with gated_linear_unit={tc.gated_linear_unit} "
                      f"(supported: silu+gated_linear_unit=True, gelu+gated_linear_unit=False)")
    fields["activation"] = activation
    if (tc.moe_router_num_groups is None) != (tc.moe_router_group_topk is None):
        errors.append(f"moe_router_num_groups={tc.moe_router_num_groups} and moe_router_group_topk="
                      f"{tc.moe_router_group_topk} (set both or neither)")
    fields["num_groups"] = tc.moe_router_num_groups
    fields["group_topk"] = tc.moe_router_group_topk
    # Megatron applies moe_router_pre_softmax to softmax scores only and ignores it for sigmoid.
    fields["pre_softmax"] = bool(tc.moe_router_pre_softmax) and tc.moe_router_score_function == "softmax"
    balancing, aux_coeff = tc.moe_router_load_balancing_type, tc.moe_aux_loss_coeff
    if isinstance(balancing, list) or balancing not in _LOAD_BALANCING:
        errors.append(f"moe_router_load_balancing_type={balancing!r} (supported: {_LOAD_BALANCING})")
    if isinstance(aux_coeff, list):
        errors.append(f"moe_aux_loss_coeff={aux_coeff} (a single float is supported)")
    fields["load_balancing_type"] = balancing
    fields["aux_loss_coeff"] = float(aux_coeff) if not isinstance(aux_coeff, list) else 0.0
    fields["z_loss_coeff"] = float(tc.moe_z_loss_coeff or 0.0)
    fields["shared_expert_ffn_size"] = tc.moe_shared_expert_intermediate_size or 0
    if tc.moe_router_dtype not in _ROUTER_DTYPES:
        errors.append(f"moe_router_dtype={tc.moe_router_dtype!r} (supported: {tuple(_ROUTER_DTYPES)})")
    fields["router_dtype"] = _ROUTER_DTYPES.get(tc.moe_router_dtype)
    return fields


def unsupported_megatron_fields(transformer_config: Any) -> list[str]:
    """``name=value`` of every set Megatron field that ep_megatron cannot honour (empty if none).

    Any ``moe_*`` field that we neither map nor list as implementation-only counts as unsupported as
    soon as it differs from its default, so a field added by a newer Megatron is never ignored silently.
    """
    defaults = _megatron_defaults(transformer_config)
    handled = set(_DIRECT_FIELDS) | set(_CONVERTED_FIELDS) | set(_IMPLEMENTATION_FIELDS)
    unsupported = []
    for name, default in defaults.items():
        if name.startswith("moe_") and name not in handled:
            value = getattr(transformer_config, name)
            if value != default and value is not None and value is not False:
                unsupported.append(f"{name}={value!r}")
    for name, allowed in _REQUIRED_VALUES.items():
        value = getattr(transformer_config, name, None)
        if value not in allowed:
            unsupported.append(f"{name}={value!r} (supported: {allowed})")
    return unsupported


def moe_config_from_megatron(transformer_config: Any, **ep_options: Any) -> MoEConfig:
    """Build a :class:`MoEConfig` from a Megatron ``TransformerConfig`` plus our own options.

    ``ep_options`` are MoEConfig fields Megatron has no equivalent for (``sharding_strategy``,
    ``num_redundant_experts``, ``replicated_experts``, ``prefer_local_replica``, ``seed``) and may
    override a mapped field. Raises one ``ValueError`` listing every set field we do not support.
    """
    errors = unsupported_megatron_fields(transformer_config)
    fields = _mapped_fields(transformer_config, errors)
    if errors:
        raise ValueError("Megatron TransformerConfig fields not supported by ep_megatron: "
                         + "; ".join(errors))
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    bad_options = sorted(set(ep_options) - known)
    if bad_options:
        raise ValueError(f"unknown ep_megatron options {bad_options}; MoEConfig fields are {sorted(known)}")
    return MoEConfig(**{**fields, **ep_options})


# ---- process groups --------------------------------------------------------------------------------
_OWN_GROUPS: dict[int, ParallelGroups] = {}


def groups_from_megatron(ep_size: int, pg_collection: Any | None = None) -> ParallelGroups:
    """Our :class:`ParallelGroups` from Megatron's groups when Megatron is initialised, else our own.

    Megatron's groups come from ``pg_collection`` (``ep``, ``expt_dp``, ``dp``) or, without one, from
    ``megatron.core.parallel_state``. Without Megatron the groups are created once per ``ep_size``.
    """
    if not dist.is_initialized():
        return build_groups(ep_size)
    from megatron.core import parallel_state

    if pg_collection is not None and getattr(pg_collection, "ep", None) is not None:
        ep_group, edp_group = pg_collection.ep, pg_collection.expt_dp
        dp_group = getattr(pg_collection, "dp", None)
    elif parallel_state.model_parallel_is_initialized():
        ep_group = parallel_state.get_expert_model_parallel_group()
        edp_group = parallel_state.get_expert_data_parallel_group()
        dp_group = parallel_state.get_data_parallel_group()
    else:
        if ep_size not in _OWN_GROUPS:
            _OWN_GROUPS[ep_size] = build_groups(ep_size)
        return _OWN_GROUPS[ep_size]
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if dist.get_world_size(ep_group) != ep_size:
        raise ValueError(f"expert_parallel_size={ep_size} but Megatron's expert-model-parallel group has "
                         f"{dist.get_world_size(ep_group)} ranks")
    if dist.get_world_size(ep_group) * dist.get_world_size(edp_group) != world_size:
        raise ValueError("ep_megatron needs tensor/pipeline/context parallel size 1 for the MoE layer: "
                         f"EP {dist.get_world_size(ep_group)} x EDP {dist.get_world_size(edp_group)} "
                         f"!= world size {world_size}")
    if dist.get_rank(ep_group) != rank % ep_size:
        raise ValueError("Megatron's rank order does not match ep_megatron's "
                         "(rank = edp_rank * ep + ep_rank)")
    return ParallelGroups(world_size=world_size, rank=rank, ep_size=ep_size, ep_rank=rank % ep_size,
                          ep_group=ep_group, edp_group=edp_group,
                          dp_group=dp_group if dp_group is not None else dist.group.WORLD)


# ---- the layer ---------------------------------------------------------------------------------------
def moe_layer_indices(transformer_config: Any) -> list[int]:
    """0-based indices of the transformer layers that are MoE layers, from ``moe_layer_freq``."""
    freq, num_layers = transformer_config.moe_layer_freq, transformer_config.num_layers
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"moe_layer_freq={freq} must be >= 1")
        return [i for i in range(num_layers) if i % freq == 0]
    if len(freq) != num_layers:
        raise ValueError(f"moe_layer_freq has {len(freq)} entries, expected num_layers={num_layers}")
    return [i for i, is_moe in enumerate(freq) if is_moe]


class MegatronEPMoELayer(MoELayer):
    """:class:`MoELayer` built by Megatron's ``build_module`` as the MLP of a ``TransformerLayer``.

    Accepts Megatron's MLP arguments (``config``, ``submodules``, ``pg_collection``) plus ``ep_options``
    from the spec's ``params``. The MoE-layer index (the placement row) is ``moe_layer_idx`` when the
    spec gives it (block specs do) and otherwise follows from ``set_layer_number``, which Megatron calls
    right after construction; experts are then re-initialised for that index.
    """

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

    def _index_of(self, layer_number: int) -> int:
        layer = layer_number - 1  # Megatron numbers layers from 1
        if layer not in self._moe_layer_ids:
            raise ValueError(f"layer_number={layer_number} is not an MoE layer (MoE layers: "
                             f"{[i + 1 for i in self._moe_layer_ids]})")
        return self._moe_layer_ids.index(layer)

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron's hook: bind this layer to its placement row and initialise it for that index."""
        self.layer_number = layer_number
        if self._fixed_index:
            return
        index = self._index_of(layer_number)
        if index != self.layer_idx:
            self.layer_idx = index
            self.reset_parameters()

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, None]:
        """``hidden [seq, batch, hidden] -> ([seq, batch, hidden], None)``; ``padding_mask`` is unused."""
        del padding_mask
        return super().forward(hidden)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """Megatron ``dist_checkpointing`` entries in ``SequentialMLP``'s layout.

        Expert weights: key ``{prefix}experts.experts.linear_fc{1,2}.weight``, one chunk per local slot at
        the global **logical** expert axis; the owner replica on expert-data-parallel rank 0 has
        ``replica_id`` 0, every other copy a distinct non-zero id. Dense tensors (router, expert bias,
        shared experts) under their module names, replicated over data-parallel ranks.
        """
        del metadata
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        groups = self.groups
        entries: dict[str, Any] = {}
        replica_ids = self._slot_replica_ids()
        logical_ids = self.placement.local_logical_ids(groups.ep_rank)[self.layer_idx].tolist()
        num_experts = self.placement.num_logical_experts
        expert_axis = len(sharded_offsets)
        for attr, megatron_name in (("fc1_weight", "linear_fc1.weight"), ("fc2_weight", "linear_fc2.weight")):
            key = f"{prefix}experts.experts.{megatron_name}"

            def build(key: str, stacked: torch.Tensor, replica_id: Any, flattened_range: Any) -> list[Any]:
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


def _stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of the expert factory's build: ``[local_slots] x [*row] -> [local_slots, *row]``."""
    return torch.stack(rows)


# ---- specs -----------------------------------------------------------------------------------------
def get_gpt_layer_spec_with_ep_moe(normalization: str | None = None, qk_layernorm: bool = False,
                                   **ep_options: Any) -> Any:
    """Megatron-Core's ``get_gpt_layer_local_spec`` with our MoE layer as the MLP.

    ``ep_options`` (``sharding_strategy``, ``num_redundant_experts``, ...) are passed to every
    :class:`MegatronEPMoELayer`; every other MoE setting comes from the ``TransformerConfig``.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    # Megatron's dense local spec, with the MLP replaced (num_experts=None keeps its MLP submodules simple).
    spec = get_gpt_layer_local_spec(num_experts=None, normalization=normalization, qk_layernorm=qk_layernorm)
    spec.submodules.mlp = ModuleSpec(module=MegatronEPMoELayer, params=dict(ep_options))
    spec.submodules.sharded_state_dict_keys_map = {}
    return spec


# ---- Megatron-LM pretrain() glue -----------------------------------------------------------------------
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


def ep_moe_layers(model: nn.Module | Sequence[nn.Module]) -> MoELayers:
    """The owner of our MoE layers in a Megatron model (or list of virtual-pipeline chunks)."""
    return MoELayers(model if isinstance(model, nn.Module) else nn.ModuleList(model))


def build_rebalancer(model: nn.Module | Sequence[nn.Module], optimizer: Any,
                     args: argparse.Namespace) -> Any | None:
    """The :class:`~ep_megatron.services.rebalance.Rebalancer` for ``--eplb-interval`` (None when it is 0).

    Hook-up in Megatron-LM's ``pretrain()`` (two lines)::

        rebalancer = build_rebalancer(model, optimizer, args)   # after setup_model_and_optimizer
        if rebalancer: rebalancer.step()                          # in train_step, after optimizer.step()

    ``optimizer`` may be Megatron's wrapper; its torch optimizer is used. Expert parameters must be the
    optimizer's own parameters (fp32 training without the distributed optimizer); otherwise the
    Rebalancer raises, since it could not migrate their state.
    """
    from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer

    if args.eplb_interval <= 0:
        return None
    moe = ep_moe_layers(model)
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    config = RebalanceConfig(interval=args.eplb_interval, window=args.eplb_window or args.eplb_interval)
    return Rebalancer(moe, torch_optimizer, config)
