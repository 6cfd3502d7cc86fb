"""Megatron-Core GPT -> ep_megatron MoE by changing one line (the layer spec).

    torchrun --nproc_per_node 2 examples/megatron_gpt_ep_moe.py

Before: ``spec = get_gpt_layer_local_spec(num_experts=4)`` (Megatron's MoELayer).
After:  ``spec = get_gpt_layer_spec_with_ep_moe(sharding_strategy="dynamic", num_redundant_experts=2)``.
Building the model and the sharded state dict runs on CPU; Megatron's GPT forward (rotary embedding,
attention) needs CUDA, so the forward/backward below runs only when a GPU is present.
"""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ep_megatron.integrations.megatron import get_gpt_layer_spec_with_ep_moe
from ep_megatron.parallel import init_distributed


def main() -> None:
    env = init_distributed()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                               num_moe_experts=4, moe_router_topk=2, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, expert_model_parallel_size=2,
                               moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
                               use_cpu_initialization=True)
    spec = get_gpt_layer_spec_with_ep_moe(sharding_strategy="dynamic", num_redundant_experts=2)
    model = GPTModel(config, spec, vocab_size=128, max_sequence_length=32).to(env.device)
    if env.rank == 0:
        print(sorted(k for k in model.sharded_state_dict() if "layers.0.mlp" in k))
    if torch.cuda.is_available():
        tokens = torch.randint(0, 128, (2, 32), device=env.device)
        position_ids = torch.arange(32, device=env.device).expand(2, -1)
        loss = model(tokens, position_ids, None, labels=tokens).mean()
        loss.backward()
        print(f"rank {env.rank} loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
