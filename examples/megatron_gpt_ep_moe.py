"""Megatron-Core GPT pretraining with ep_megatron's MoE layer, wired like Megatron-LM's ``pretrain_gpt.py``.

    torchrun --nproc_per_node 4 examples/megatron_gpt_ep_moe.py --expert-model-parallel-size 2 \\
        --expert-sharding-strategy dynamic --num-redundant-experts 2 --eplb-interval 5 --train-iters 30

Options: ``--tensor-model-parallel-size 2`` (sequence parallelism is then on),
``--pipeline-model-parallel-size 2``, ``--bf16``, ``--use-distributed-optimizer``, ``--overlap-grad-reduce``,
``--save DIR`` (``dist_checkpointing``, loadable by Megatron's own MoE model). Run it from the repository
root.

Where it runs: on CUDA GPUs with NCCL (one process per GPU; not run in this project's CI), and on CPU with
gloo through the test-only shim ``tests/megatron_shim.py`` (Megatron-Core's training step assumes CUDA in
places unrelated to the math), which is how it is tested here. Megatron-LM's own ``pretrain_gpt.py``
needs the lines marked ``# ep_megatron:`` only; the rest stands for what Megatron-LM already does.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ep_megatron.integrations.megatron import (  # ep_megatron:
    add_ep_megatron_args,
    attach,
    ep_options_from_args,
    get_gpt_layer_spec_with_ep_moe,
    rebalance_config_from_args,
)

VOCAB = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=2)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--train-iters", type=int, default=30)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--overlap-grad-reduce", action="store_true")
    parser.add_argument("--save", default=None, help="dist_checkpointing directory written after training")
    add_ep_megatron_args(parser)  # ep_megatron: Megatron-LM's extra_args_provider
    return parser.parse_args()


def initialize(args: argparse.Namespace) -> torch.device:
    """Process group, Megatron's parallel state and RNG (``initialize_megatron``)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        from tests import megatron_shim  # CPU only: see the module docstring

        megatron_shim.install()
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size, expert_tensor_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)
    return device


def build(args: argparse.Namespace, device: torch.device) -> tuple:
    """GPT with our spec, Float16Module (bf16), Megatron DDP, ``get_megatron_optimizer``, scheduler."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, moe_ffn_hidden_size=64,
        num_moe_experts=args.num_experts, moe_router_topk=2, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_token_dispatcher_type="alltoall", normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=True, init_method_std=0.02,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.tensor_model_parallel_size > 1,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size, expert_tensor_parallel_size=1,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype)
    # ep_megatron: the layer spec (Megatron-LM: --spec ep_megatron.integrations.megatron ep_moe_layer_spec)
    spec = get_gpt_layer_spec_with_ep_moe(normalization="RMSNorm", **ep_options_from_args(args))
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=args.seq_length,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage()).to(device)
    if args.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer)
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)]
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.lr / 10, weight_decay=0.01, clip_grad=1.0, bf16=args.bf16,
        params_dtype=dtype, use_distributed_optimizer=args.use_distributed_optimizer), chunks)
    samples = args.train_iters * args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr, max_lr=args.lr, min_lr=args.lr / 10, lr_warmup_steps=0,
        lr_decay_steps=samples, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=samples,
        wd_incr_style="constant")
    return config, chunks, optimizer, scheduler


def batches(args: argparse.Namespace, step: int, device: torch.device) -> list[dict]:
    """This data-parallel rank's micro-batches: random tokens whose next token is a fixed function of them."""
    from megatron.core import parallel_state

    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank, seq = args.global_batch_size // dp_size, args.seq_length
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (args.global_batch_size, seq), generator=gen)
    tokens = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    labels = (tokens * 5 + 3) % VOCAB
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    positions = torch.arange(seq).expand(args.micro_batch_size, seq)
    mbs = args.micro_batch_size
    return [{key: value.to(device) for key, value in
             {"tokens": tokens[i:i + mbs], "labels": labels[i:i + mbs], "attention_mask": mask,
              "position_ids": positions}.items()} for i in range(0, per_rank, mbs)]


def forward_step(data_iterator, model):
    """``pretrain_gpt.forward_step``: the loss sum and token count of one micro-batch."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])

    def loss_func(losses: torch.Tensor):
        loss_sum = losses.float().sum()
        count = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
        return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float()])}

    return output, loss_func


def main() -> None:
    args = parse_args()
    device = initialize(args)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config, chunks, optimizer, scheduler = build(args, device)
    # ep_megatron: after setup_model_and_optimizer
    ep = attach(chunks, optimizer, rebalance_config_from_args(args))
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        config.no_sync_func, config.grad_sync_func = chunks[0].no_sync, chunks[0].start_grad_sync
    forward_backward = get_forward_backward_func()
    per_rank = args.global_batch_size // parallel_state.get_data_parallel_world_size()
    for step in range(args.train_iters):  # Megatron-LM's train_step
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step, data_iterator=iter(batches(args, step, device)), model=chunks,
            num_microbatches=per_rank // args.micro_batch_size, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False)
        optimizer.step()
        scheduler.step(increment=args.global_batch_size)
        rebalanced = ep.after_step()  # ep_megatron: in train_step, after optimizer.step()
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_data_parallel_rank() == 0 \
                and parallel_state.get_tensor_model_parallel_rank() == 0:
            total = sum(entry["lm loss"] for entry in losses)
            moved = f", rebalanced: {rebalanced.slots_moved} slots moved" if rebalanced else ""
            print(f"step {step + 1}: lm loss {float(total[0] / total[1]):.4f} (first DP rank){moved}",
                  flush=True)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        model = chunks[0].module.module if args.bf16 else chunks[0].module
        dist_checkpointing.save(model.sharded_state_dict(), args.save)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
