"""A Hugging Face Mixtral trained under DeepSpeed with expert parallelism and rebalancing, back to HF.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/hf_mixtral_deepspeed.py [--zero-stage 2]

A tiny random-init ``MixtralForCausalLM`` is built from a ``transformers`` config (in real use:
``from_pretrained`` on every rank), its MoE blocks are swapped for ours (``dynamic`` placement with
redundant slots), it trains under ``ep_megatron.integrations.deepspeed.initialize`` with a ``Rebalancer``,
is saved as our layout-free checkpoint, exported to a Mixtral directory and loaded back with
``from_pretrained``, whose logits equal the trained model's.
"""

import argparse
import json
from pathlib import Path

import torch

from ep_megatron.integrations import deepspeed as ep_ds
from ep_megatron.integrations import hf
from ep_megatron.parallel import build_groups, init_distributed
from ep_megatron.services.checkpoint import save_checkpoint
from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="runs/hf_mixtral_example")
    args = parser.parse_args()
    from transformers import MixtralConfig, MixtralForCausalLM

    env = init_distributed()
    groups = build_groups(ep_size=env.world_size)
    torch.manual_seed(0)  # the same model on every rank
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=64)
    model = MixtralForCausalLM(config).to(env.device)

    # 1. swap: 8 experts on 8 + 2 * ranks slots, HF weights carried by logical id
    redundant = 2 * groups.ep_size
    swap = hf.swap_moe_blocks(model, groups, sharding_strategy="dynamic", num_redundant_experts=redundant)

    # 2. train under DeepSpeed (our glue) with a rebalance every 5 steps
    ds_config = json.loads((Path(__file__).parent.parent / "configs" / "ds_zero2.json").read_text())
    ds_config["zero_optimization"]["stage"] = args.zero_stage
    ds_config.update(train_micro_batch_size_per_gpu=4, gradient_clipping=1.0)
    engine, *_ = ep_ds.initialize(swap.moe, lambda pg: torch.optim.AdamW(pg, lr=1e-3), ds_config)
    rebalancer = Rebalancer(swap.moe, ep_ds.optimizer_rows(engine), RebalanceConfig(interval=5, window=5))
    zipf = 1.0 / torch.arange(1, config.vocab_size + 1, dtype=torch.float64)  # skewed tokens and experts
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(step * 100 + env.rank)
        ids = torch.multinomial(zipf, 4 * 32, replacement=True, generator=gen).view(4, 32).to(env.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        swap.moe.update_expert_bias()  # DeepSeek-V3's bias; a no-op for Mixtral
        metrics = rebalancer.step()
        if env.rank == 0 and metrics is not None:
            print(f"step {step + 1} loss {loss.item():.4f}: rebalanced, {metrics.slots_moved} slots moved, "
                  f"balance {min(metrics.planned_before):.3f} -> {min(metrics.planned_after):.3f}")

    # 3. our checkpoint (experts by logical id) -> a Mixtral directory -> from_pretrained
    path = save_checkpoint(f"{args.out}/ckpt", args.steps, swap.moe, ep_ds.checkpoint_optimizer(engine),
                           rebalancer=rebalancer, extra=swap.checkpoint_extra())
    hf_dir = Path(args.out) / "hf"
    if env.rank == 0:
        hf.export_hf(path, hf_dir)  # or: ep-megatron ckpt convert PATH DIR --to hf
    torch.distributed.barrier()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = MixtralForCausalLM.from_pretrained(hf_dir).to(env.device).eval()(input_ids=ids).logits
    print(f"rank {env.rank}: exported {hf_dir}; max |logits difference| vs from_pretrained "
          f"{(ours - theirs).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
