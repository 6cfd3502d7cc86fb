"""Swap the MoE blocks of a ``transformers`` model in place for our expert-parallel :class:`MoELayer`.

``swap_moe_blocks(model, groups, **ep_options)`` replaces every MoE block of the family (``families.py``)
with an :class:`HFMoEBlock` that holds an ``MoELayer`` (child ``moe``) and copies the weights: the fused
``experts.gate_up_proj [E, 2F, H]`` (gate rows, then up rows) is our fc1 and ``experts.down_proj [E, H, F]``
our fc2, row ``e`` of both going to every local slot that serves logical expert ``e``; ``gate.weight`` is
the router weight; DeepSeek-V3's ``e_score_correction_bias`` our ``expert_bias``; shared experts become
``[gate; up]`` / ``down`` of our shared MLP, Qwen2-MoE's ``shared_expert_gate`` its sigmoid gate. Every rank
must hold the same full model (same seed or the same ``from_pretrained``) and call this in the same order.

The HF aux loss: the decoder's ``output_router_logits`` / ``router_aux_loss_coef`` loss keeps working.
Each block holds a parameter-free router-logits tap (a subclass of the family's router class, so the
``OutputRecorder`` of ``transformers`` records it); when a recorder is attached the block feeds it the router
logits of its tokens (``[batch * seq, E]``, HF's order), recomputed from our router weight, so the HF
loss and its gradient are what they were. Our own aux losses (``load_balancing_type``) are off unless
set in ``ep_options``; setting them *and* ``output_router_logits`` applies both.

Not supported on swapped blocks: HF gradient checkpointing (recomputing a block would repeat its
all-to-alls and count its load twice) and ``save_pretrained`` (export our checkpoint with
``integrations.hf.export_hf`` instead).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ep_megatron.config import MoEConfig
from ep_megatron.integrations.hf.families import Family, family_of, moe_config_from_hf
from ep_megatron.layer import MoELayer
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel import ParallelGroups
from ep_megatron.placement import ExpertPlacement

MOE_CHILD = "moe"  # the MoELayer's attribute in HFMoEBlock: checkpoint prefixes end in ".mlp.moe"
EXTRA_KEY = "huggingface"  # key of the HF config in a checkpoint's ``extra`` (see HFSwap.checkpoint_extra)


@functools.cache
def _tap_class(router_class: type[nn.Module]) -> type[nn.Module]:
    """A parameter-free subclass of the family's router whose ``forward(logits)`` returns ``logits``."""

    def __init__(self: nn.Module) -> None:
        nn.Module.__init__(self)
        self._is_hf_initialized = True  # nothing for transformers' weight init to do

    def forward(self: nn.Module, logits: Tensor) -> Tensor:
        return logits

    namespace = {"__init__": __init__, "forward": forward}
    return type(f"{router_class.__name__}LogitsTap", (router_class,), namespace)


class HFMoEBlock(nn.Module):
    """A family's MoE block as our :class:`MoELayer`: ``forward([batch, seq, H]) -> [batch, seq, H]``."""

    def __init__(self, source: nn.Module, config: MoEConfig, placement: ExpertPlacement,
                 groups: ParallelGroups, layer_idx: int, family: Family) -> None:
        super().__init__()
        self.moe = MoELayer(config, placement, groups, layer_idx)
        self.router_logits_tap = _tap_class(type(source.gate))()
        self._copy_weights(source, family, placement.local_logical_ids(groups.ep_rank)[layer_idx])
        for module in self.modules():
            module._is_hf_initialized = True

    @torch.no_grad()
    def _copy_weights(self, source: nn.Module, family: Family, logical_ids: Tensor) -> None:
        """Copy the HF block's weights; local slot ``l`` takes row ``logical_ids[l]`` of the HF experts."""
        experts = source.experts
        if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            raise ValueError(f"{type(source).__name__}: experts without a fused 3-D gate_up_proj "
                             f"(transformers < 5?); ep_megatron.integrations.hf needs transformers >= 5")
        weight = experts.gate_up_proj
        self.moe.to(device=weight.device, dtype=weight.dtype)
        index = logical_ids.to(weight.device)
        self.moe.experts.fc1_weight.copy_(weight.index_select(0, index))
        self.moe.experts.fc2_weight.copy_(experts.down_proj.index_select(0, index))
        router = self.moe.router
        router.weight.data = source.gate.weight.detach().clone()  # the HF router keeps its own dtype
        router.expert_bias.data = torch.zeros_like(router.expert_bias, dtype=torch.float32)
        if family.expert_bias_name is not None:
            router.expert_bias.copy_(getattr(source.gate, family.expert_bias_name))
        shared = self.moe.shared_experts
        if shared is not None:
            mlp = getattr(source, family.shared_name)
            shared.fc1_weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            shared.fc2_weight.copy_(mlp.down_proj.weight)
            if shared.gate_weight is not None:
                shared.gate_weight.copy_(getattr(source, family.shared_gate_name).weight)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``[batch, seq, hidden] -> [batch, seq, hidden]``; tokens go to the layer ``[batch * seq]``-major,
        or ``[seq, batch]``-major with ``seq_aux_loss`` (which needs sequences as columns)."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # [batch * seq, hidden]
        if self.router_logits_tap._forward_hooks:  # an HF OutputRecorder wants router logits
            self.router_logits_tap(self.moe.router.logits(tokens))
        if self.moe.config.load_balancing_type == "seq_aux_loss":
            output, _ = self.moe(hidden_states.transpose(0, 1))
            return output.transpose(0, 1)
        output, _ = self.moe(tokens)
        return output.view(hidden_states.shape)


@dataclass(frozen=True)
class HFSwap:
    """What :func:`swap_moe_blocks` did: the owner of the swapped model's MoE layers (one placement;
    ``moe.layers[i].layer_idx == i``, module order) and the HF config to export with."""

    family: str  # HF model_type
    moe: MoELayers  # our layers in the swapped model; moe.config is every swapped block's MoEConfig
    hf_config: dict[str, Any] = field(repr=False)  # the model's HF config (to_dict), with "architectures"

    def checkpoint_extra(self) -> dict[str, Any]:
        """``extra`` for ``save_checkpoint``, so ``export_hf`` can write the family's ``config.json``."""
        return {EXTRA_KEY: self.hf_config}


def _block_class(family: Family) -> type[nn.Module]:
    module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    return getattr(module, family.block_class)


def _reset_output_capture(model: nn.Module) -> None:
    """Drop transformers' output-capturing hooks so they are installed again (on the taps too) next time."""
    for module in model.modules():
        for hook_id, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "output_capturing_hook":
                del module._forward_hooks[hook_id]
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False


def swap_moe_blocks(model: nn.Module, groups: ParallelGroups, **ep_options: Any) -> HFSwap:
    """Replace every MoE block of ``model`` (a ``transformers`` 5.x Mixtral, Qwen3-MoE, Qwen2-MoE or
    DeepSeek-V3 model) in place by an :class:`HFMoEBlock`; see the module docstring.

    ``ep_options`` are :class:`MoEConfig` fields the HF config does not decide (``sharding_strategy``,
    ``num_redundant_experts``, ``replicated_experts``, losses, ...); the EP size is ``groups.ep_size``.
    All blocks share one placement. Raises ``ValueError`` (nothing changed) for an
    unmapped family or option.
    """
    config_obj = model.config
    family = family_of(config_obj)
    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("gradient checkpointing is on: recomputing swapped MoE blocks would repeat their "
                         "all-to-alls; call model.gradient_checkpointing_disable() first")
    config = moe_config_from_hf(config_obj, **ep_options)
    block_class = _block_class(family)
    blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, block_class)]
    if not blocks:
        raise ValueError(f"model has no {family.block_class} (already swapped?)")
    for name, _ in blocks:
        family.disk_prefix(name)  # a block that is not a decoder layer's 'mlp' is refused before any change
    placement = config.placement(len(blocks), groups.ep_size)
    for layer_idx, (name, source) in enumerate(blocks):
        block = HFMoEBlock(source, config, placement, groups, layer_idx, family)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, block)
    _reset_output_capture(model)
    hf_config = {**config_obj.to_dict(), "architectures": [type(model).__name__]}
    return HFSwap(family=family.model_type, moe=MoELayers(model), hf_config=hf_config)
