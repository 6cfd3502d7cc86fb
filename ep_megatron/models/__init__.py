"""Models: the compact MoE GPT with an injected MoE MLP."""

from ep_megatron.models.gpt import GPTConfig, MoEFactory, MoEGPT

__all__ = ["GPTConfig", "MoEFactory", "MoEGPT"]
