"""Megatron-Core / Megatron-LM integration: our MoE layer inside Megatron's own model, step and checkpoints.

Switching a Megatron-Core GPT model to ep_megatron is a layer-spec change plus :func:`attach`::

    spec = get_gpt_layer_spec_with_ep_moe(sharding_strategy="dynamic", num_redundant_experts=4)
    model = GPTModel(transformer_config, spec, vocab_size, max_sequence_length)
    ...  # Megatron DDP, get_megatron_optimizer, as before
    ep = attach(model_chunks, optimizer, RebalanceConfig(interval=100, window=100))
    ...  # each step: Megatron's forward_backward_func, optimizer.step(), then ep.after_step()

Megatron-LM: ``--spec ep_megatron.integrations.megatron ep_moe_layer_spec`` (Megatron-LM's ``--spec`` takes a
spec *object*: this attribute is built on first access from Megatron-LM's parsed arguments, which need
``extra_args_provider=add_ep_megatron_args``), plus the two :func:`attach` lines in ``train_step``.

Modules: :mod:`.config` (TransformerConfig mapping, supported parallel layouts), :mod:`.layer` (the
layer, its router, groups, checkpoint layout, spec), :mod:`.grads` (replica sum on DDP's buffers),
:mod:`.optimizer` (Megatron's optimizers: state rows, grad norm), :mod:`.training` (``attach``,
Megatron-LM arguments).
"""

from typing import Any

from ep_megatron.integrations.megatron.config import (
    moe_config_from_megatron,
    moe_layer_indices,
    unsupported_megatron_fields,
)
from ep_megatron.integrations.megatron.grads import ReplicaGradSync
from ep_megatron.integrations.megatron.layer import (
    MegatronEPMoELayer,
    MegatronTopKRouter,
    ep_moe_layers,
    get_gpt_layer_spec_with_ep_moe,
    groups_from_megatron,
)
from ep_megatron.integrations.megatron.optimizer import (
    MegatronOptimizerRows,
    count_experts_once_in_grad_norm,
    inner_optimizers,
)
from ep_megatron.integrations.megatron.training import (
    MegatronEP,
    add_ep_megatron_args,
    attach,
    ep_options_from_args,
    rebalance_config_from_args,
)


def __getattr__(name: str) -> Any:
    """``ep_moe_layer_spec``: :func:`get_gpt_layer_spec_with_ep_moe` for Megatron-LM's ``--spec``, with
    ``--normalization``, ``--qk-layernorm`` and our flags from ``megatron.training.get_args()``."""
    if name != "ep_moe_layer_spec":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from megatron.training import get_args  # Megatron-LM (not part of megatron-core)

    args = get_args()
    return get_gpt_layer_spec_with_ep_moe(normalization=args.normalization, qk_layernorm=args.qk_layernorm,
                                          **ep_options_from_args(args))


__all__ = [
    "MegatronEP", "MegatronEPMoELayer", "MegatronOptimizerRows", "MegatronTopKRouter", "ReplicaGradSync",
    "add_ep_megatron_args", "attach", "count_experts_once_in_grad_norm", "ep_moe_layers",
    "ep_options_from_args", "get_gpt_layer_spec_with_ep_moe", "groups_from_megatron", "inner_optimizers",
    "moe_config_from_megatron", "moe_layer_indices", "rebalance_config_from_args",
    "unsupported_megatron_fields",
]
