"""ep_megatron: expert-parallel MoE training with training-time expert load balancing."""

from ep_megatron.version import __version__

__all__ = ["__version__"]
