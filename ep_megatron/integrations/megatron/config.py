"""Megatron ``TransformerConfig`` -> :class:`MoEConfig`, and the parallel layouts our layer supports.

Every set Megatron field is either mapped, listed as an implementation choice ours replaces, or
reported: :func:`moe_config_from_megatron` raises **one** ``ValueError`` naming every field (and
parallel setting) it cannot honour, so nothing is ignored silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ep_megatron.config import MoEConfig

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
# replaces them. The values in _REJECTED_VALUES are the exception: they ask for something we do not have.
_IMPLEMENTATION_FIELDS = (
    "moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_token_dispatcher_type", "moe_enable_deepep",
    "moe_flex_dispatcher_backend", "moe_deepep_num_sms", "moe_hybridep_num_sms", "moe_permute_fusion",
    "moe_router_fusion", "moe_per_layer_logging", "moe_layer_recompute", "moe_shared_expert_overlap",
    "moe_layer_freq",
)
_REJECTED_VALUES = {
    "moe_token_dispatcher_type": ("flex",),  # DeepEP / HybridEP kernels: ours is the alltoall dispatcher
    "moe_enable_deepep": (True,),
}
# Non-moe_* fields that change the MoE layer's math, with the values we support.
_REQUIRED_VALUES = {"add_bias_linear": (False,)}
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


def unsupported_parallelism(tc: Any) -> list[str]:
    """``name=value`` of every parallel setting our layer cannot run under (empty if none).

    Supported: any pipeline, data, context and expert-parallel size; tensor parallelism only with
    sequence parallelism (each TP rank routes its own ``seq / TP`` tokens, as Megatron's own MoE layer
    requires for training) and with ``expert_tensor_parallel_size=1`` (Megatron's default is the TP size).
    """
    errors = []
    etp = getattr(tc, "expert_tensor_parallel_size", None)
    if etp not in (None, 1):
        errors.append(f"expert_tensor_parallel_size={etp} (supported: 1; set it explicitly when "
                      f"tensor_model_parallel_size > 1, Megatron defaults it to the TP size)")
    if tc.tensor_model_parallel_size > 1 and not tc.sequence_parallel:
        errors.append(f"sequence_parallel=False with tensor_model_parallel_size="
                      f"{tc.tensor_model_parallel_size} (supported: sequence_parallel=True when TP > 1)")
    return errors


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
    for name, rejected in _REJECTED_VALUES.items():
        value = getattr(transformer_config, name, None)
        if value in rejected:
            unsupported.append(f"{name}={value!r} (DeepEP / flex dispatcher: not supported, ep_megatron "
                               f"dispatches with its own all-to-all)")
    for name, allowed in _REQUIRED_VALUES.items():
        value = getattr(transformer_config, name, None)
        if value not in allowed:
            unsupported.append(f"{name}={value!r} (supported: {allowed})")
    return unsupported + unsupported_parallelism(transformer_config)


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
