"""The MoE layer: router -> dispatcher -> grouped experts -> combine."""

from ep_megatron.layer.moe_layer import MoELayer, expert_init

__all__ = ["MoELayer", "expert_init"]
