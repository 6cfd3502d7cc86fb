"""DeepSpeed MoE -> ep_megatron: a tiny model trained under ZeRO-2 on CPU.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/deepspeed_moe.py   (or torchrun --nproc_per_node 2)

Before (DeepSpeed's MoE):  ``MoE(hidden, expert=MLP(...), num_experts=8, ep_size=2, k=2)`` and
``split_params_into_different_moe_groups_for_optimizer``. After: our layer and ``ep_ds.initialize``.
"""

import json
from pathlib import Path

import torch
from torch import nn

from ep_megatron.config import MoEConfig
from ep_megatron.integrations import deepspeed as ep_ds
from ep_megatron.layer import MoELayer
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel import build_groups, init_distributed
from ep_megatron.placement import ExpertPlacement
from ep_megatron.services.checkpoint import save_checkpoint


class TinyModel(nn.Module):
    def __init__(self, config: MoEConfig, placement: ExpertPlacement, groups) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.moe = MoELayer(config, placement, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden] -> [tokens, hidden]
        return self.moe(self.proj(x))[0]


def main(out_dir: str = "runs/deepspeed_moe_example") -> None:
    env = init_distributed()
    groups = build_groups(ep_size=2)
    config = MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=8, top_k=2,
                       sharding_strategy="dynamic", num_redundant_experts=2)
    model = TinyModel(config, config.placement(1, groups.ep_size), groups)
    moe = MoELayers(model)
    ds_config = json.loads((Path(__file__).parent.parent / "configs" / "ds_zero2.json").read_text())
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_clipping=1.0)  # the job's own settings
    engine, *_ = ep_ds.initialize(moe, lambda pg: torch.optim.AdamW(pg, lr=1e-3), ds_config)
    for step in range(5):
        gen = torch.Generator().manual_seed(step * 100 + env.rank)
        x, target = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
        loss = (engine(x) - target).pow(2).mean()
        engine.backward(loss)
        engine.step()
        if env.rank == 0:
            print(f"step {step} loss {loss.item():.4f} grad_norm {engine.get_global_grad_norm():.4f}")
    # ZeRO state (fp32 masters, moments) saved by logical expert: loads under any EP layout or ZeRO stage
    optimizer = ep_ds.checkpoint_optimizer(engine)
    save_checkpoint(f"{out_dir}/ckpt", 5, moe, optimizer)

if __name__ == "__main__":
    main()
