"""Megatron-Core training the way Megatron-LM's ``pretrain`` wires it, on CPU gloo ranks, for tests.

A small GPT (2 layers, hidden 64, 4 or 8 experts, top-2, local spec) is built for a layer spec —
Megatron's own MoE (alltoall dispatcher, ``SequentialMLP``) or ep_megatron's — then wrapped like
Megatron-LM's ``get_model`` / ``setup_model_and_optimizer`` (``Float16Module`` for bf16, Megatron DDP,
``get_megatron_optimizer``, ``OptimizerParamScheduler``) and trained like its ``train_step``
(``zero_grad_buffer``, ``get_forward_backward_func()`` with ``finalize_model_grads`` and
``micro_batches > 1``, ``optimizer.step()``, scheduler step).

Every function here runs inside a rank of ``tests.multirank.run_ranks``; :func:`setup_megatron` installs
the CPU shim there (never in pytest's process). Results are plain lists / numpy arrays: tensors returned
through the harness's queue break when the rank exits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB_SIZE = 64


@dataclass(frozen=True)
class MegatronRun:
    """One training run, identical on every rank.

    ``layer``: ``"megatron"`` (Megatron's own MoE layer) or ``"ours"`` (``get_gpt_layer_spec_with_ep_moe``
    with ``ep_options``, wired with ``attach``; ``eplb_interval > 0`` rebalances every that many steps).
    ``global_batch`` sequences of ``seq_length`` tokens per step are split evenly over the data-parallel
    ranks and then into ``micro_batches``, so runs at different TP / PP sizes see the same global batch.
    ``seed`` seeds Megatron's RNG (the initial weights) and draws the tokens. ``padding`` passes a
    ``padding_mask`` (the last quarter of every other sequence) to the model; ``expert_bias_rate > 0``
    turns on Megatron's aux-loss-free expert bias (needs ``score_function="sigmoid"``).
    """

    layer: str = "megatron"
    ep_options: tuple[tuple[str, Any], ...] = ()
    tp: int = 1
    pp: int = 1
    ep: int = 2
    sequence_parallel: bool = False
    num_experts: int = 4
    precision: str = "fp32"  # "fp32" | "bf16"
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    steps: int = 10
    micro_batches: int = 2
    global_batch: int = 8
    seq_length: int = 16
    aux_loss_coeff: float = 0.0
    load_balancing: str = "aux_loss"  # with aux_loss_coeff > 0: "aux_loss" or "seq_aux_loss"
    z_loss_coeff: float = 0.0
    score_function: str = "softmax"
    expert_bias_rate: float = 0.0  # > 0: moe_router_enable_expert_bias with this update rate
    padding: bool = False
    per_token_loss: bool = False  # Megatron's calculate_per_token_loss (aux losses scaled by local tokens)
    eplb_interval: int = 0  # ours only: rebalance every this many steps (0: never)
    lr: float = 3e-3
    lr_decay_steps: int = 20  # cosine decay horizon, independent of ``steps`` (runs of any length agree)
    clip_grad: float = 1.0  # 0 turns clipping off
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.layer not in ("megatron", "ours"):
            raise ValueError(f"layer={self.layer!r} must be 'megatron' or 'ours'")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} must be 'fp32' or 'bf16'")
        if self.micro_batches < 1 or self.steps < 1:
            raise ValueError(f"micro_batches={self.micro_batches} and steps={self.steps} must be >= 1")

    def replace(self, **changes: Any) -> MegatronRun:
        return dataclasses.replace(self, **changes)


# ---- setup -----------------------------------------------------------------------------------------
def setup_megatron(run: MegatronRun) -> None:
    """Shim, Megatron's process groups (expert-TP 1) and its RNG seeds, as ``initialize_megatron`` does."""
    from tests import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=run.tp, pipeline_model_parallel_size=run.pp,
        expert_model_parallel_size=run.ep, expert_tensor_parallel_size=1,
    )
    model_parallel_cuda_manual_seed(run.seed)


def teardown_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def transformer_config(run: MegatronRun) -> Any:
    """The model's ``TransformerConfig`` (dropout off, SwiGLU, RMSNorm, dropless alltoall MoE)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if run.precision == "bf16" else torch.float32
    return TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, moe_ffn_hidden_size=64,
        num_moe_experts=run.num_experts, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False, moe_aux_loss_coeff=run.aux_loss_coeff,
        moe_router_load_balancing_type=run.load_balancing if run.aux_loss_coeff else "none",
        moe_z_loss_coeff=run.z_loss_coeff or None, moe_router_score_function=run.score_function,
        moe_router_enable_expert_bias=run.expert_bias_rate > 0,
        moe_router_bias_update_rate=run.expert_bias_rate or 1e-3, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True, init_method_std=0.02, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, tensor_model_parallel_size=run.tp,
        pipeline_model_parallel_size=run.pp, sequence_parallel=run.sequence_parallel,
        expert_model_parallel_size=run.ep, expert_tensor_parallel_size=1,
        bf16=run.precision == "bf16", params_dtype=dtype, pipeline_dtype=dtype,
        calculate_per_token_loss=run.per_token_loss,
    )


def layer_spec(run: MegatronRun) -> Any:
    """Megatron's local MoE spec, or ep_megatron's spec with ``run.ep_options``."""
    if run.layer == "megatron":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(num_experts=run.num_experts, moe_grouped_gemm=False,
                                        normalization="RMSNorm")
    from ep_megatron.integrations.megatron import get_gpt_layer_spec_with_ep_moe

    return get_gpt_layer_spec_with_ep_moe(normalization="RMSNorm", **dict(run.ep_options))


def build_gpt(run: MegatronRun, config: Any) -> Any:
    """This pipeline stage's unwrapped ``GPTModel`` (tied embeddings, learned positions)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config, layer_spec(run), vocab_size=VOCAB_SIZE, max_sequence_length=run.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
    )


def wrap_model(run: MegatronRun, config: Any, model: Any) -> Any:
    """``Float16Module`` (bf16) inside Megatron DDP, as Megatron-LM's ``get_model`` does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    if run.precision == "bf16":
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=run.overlap_grad_reduce,
        use_distributed_optimizer=run.distributed_optimizer,
        bucket_size=20_000 if run.overlap_grad_reduce else None,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(run: MegatronRun, chunks: list[Any]) -> tuple[Any, Any]:
    """``get_megatron_optimizer`` (Adam, ``run.clip_grad``) and an ``OptimizerParamScheduler`` in samples."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = run.precision == "bf16"
    opt_config = OptimizerConfig(
        optimizer="adam", lr=run.lr, min_lr=run.lr / 10, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
        clip_grad=run.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=run.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    samples = run.lr_decay_steps * run.global_batch
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=run.lr, max_lr=run.lr, min_lr=run.lr / 10, lr_warmup_steps=0,
        lr_decay_steps=samples, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=samples,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


# ---- weights -----------------------------------------------------------------------------------------
def megatron_experts_by_logical_id(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{moe_prefix: {"fc1": [E, fc1_out, hidden], "fc2": [E, hidden, ffn]}}`` of Megatron's own
    ``SequentialMLP`` experts, gathered over the expert-parallel group (global id = ep_rank * local + j).

    ``moe_prefix`` is the state-dict prefix of the MoE layer (``decoder.layers.0.mlp.``)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.experts import SequentialMLP

    ep_group = parallel_state.get_expert_model_parallel_group()
    gathered: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SequentialMLP):
            continue
        prefix = name.removesuffix("experts")
        gathered[prefix] = {}
        for key, attr in (("fc1", "linear_fc1"), ("fc2", "linear_fc2")):
            local = torch.stack([getattr(expert, attr).weight.detach() for expert in module.local_experts])
            chunks = [torch.empty_like(local) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(chunks, local.contiguous(), group=ep_group)
            gathered[prefix][key] = torch.cat(chunks)
    return gathered


@dataclass(frozen=True)
class MegatronWeights:
    """A snapshot of Megatron's own MoE GPT: ``dense`` state-dict tensors (cloned) and ``experts`` from
    :func:`megatron_experts_by_logical_id`."""

    dense: dict[str, torch.Tensor]
    experts: dict[str, dict[str, torch.Tensor]]


def snapshot_megatron_weights(model: Any) -> MegatronWeights:
    """Copy of every tensor of Megatron's own MoE GPT, experts by logical id (a collective over EP)."""
    dense = {key: value.detach().clone() for key, value in model.state_dict().items()
             if torch.is_tensor(value) and ".local_experts." not in key}
    return MegatronWeights(dense=dense, experts=megatron_experts_by_logical_id(model))


def load_megatron_weights_into_ours(weights: MegatronWeights, ours: Any) -> None:
    """Copy a snapshot of Megatron's own MoE GPT into the same GPT built with our spec.

    Dense tensors by state-dict key; expert weights by logical id into each local slot. Raises if a
    tensor of ``ours`` has no counterpart (other than an all-zero expert bias).
    """
    from ep_megatron.integrations.megatron import MegatronEPMoELayer

    covered = set()
    with torch.no_grad():
        for name, module in ours.named_modules():
            if not isinstance(module, MegatronEPMoELayer):
                continue
            prefix = f"{name}."
            logical_ids = module.placement.local_logical_ids(module.groups.ep_rank)[module.layer_idx]
            module.experts.fc1_weight.copy_(weights.experts[prefix]["fc1"][logical_ids])
            module.experts.fc2_weight.copy_(weights.experts[prefix]["fc2"][logical_ids])
            covered |= {f"{prefix}experts.fc1_weight", f"{prefix}experts.fc2_weight"}
        for key, tensor in ours.state_dict().items():
            if key in covered or key.endswith("_extra_state"):
                continue
            source = weights.dense.get(key)
            if source is not None and source.shape == tensor.shape:
                tensor.copy_(source)
            elif not (key.endswith("router.expert_bias") and not tensor.any()):
                raise KeyError(f"{key} {tuple(tensor.shape)} has no counterpart in Megatron's model")


# ---- data and the step ---------------------------------------------------------------------------------
def _global_batch(run: MegatronRun, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, labels)``, both ``[global_batch, seq]``; labels are a fixed function of the token."""
    gen = torch.Generator().manual_seed(run.seed * 7919 + step)
    tokens = torch.randint(0, VOCAB_SIZE, (run.global_batch, run.seq_length), generator=gen)
    return tokens, (tokens * 5 + 3) % VOCAB_SIZE


def micro_batches(run: MegatronRun, step: int) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's ``run.micro_batches`` micro-batches of ``step``."""
    from megatron.core import parallel_state

    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = run.global_batch // dp_size
    if per_rank * dp_size != run.global_batch or per_rank % run.micro_batches:
        raise ValueError(f"global_batch={run.global_batch} must split into data-parallel size {dp_size} x "
                         f"micro_batches={run.micro_batches}")
    tokens, labels = _global_batch(run, step)
    tokens, labels = (t[dp_rank * per_rank:(dp_rank + 1) * per_rank] for t in (tokens, labels))
    mbs, seq = per_rank // run.micro_batches, run.seq_length
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    positions = torch.arange(seq).unsqueeze(0).expand(mbs, seq)
    padding = torch.zeros(per_rank, seq, dtype=torch.bool)
    padding[::2, seq - seq // 4:] = True  # [b, s], True = padding (Megatron's convention)
    return [{"tokens": tokens[i * mbs:(i + 1) * mbs], "labels": labels[i * mbs:(i + 1) * mbs],
             "attention_mask": mask, "position_ids": positions,
             **({"padding_mask": padding[i * mbs:(i + 1) * mbs]} if run.padding else {})}
            for i in range(run.micro_batches)]


def _loss_func(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron-LM ``pretrain_gpt.loss_func``: ``(loss sum, token count, {"lm loss": [sum, count]})``."""
    loss_sum = output.float().sum()
    num_tokens = torch.tensor(output.numel(), dtype=torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any) -> tuple[Any, Callable]:
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   padding_mask=batch.get("padding_mask"))
    return output, _loss_func


def _step_loss(losses_reduced: list[dict[str, torch.Tensor]]) -> float:
    """Global mean token loss of one step, on every rank (the last stage's sums, reduced over DP and PP)."""
    from megatron.core import parallel_state

    total = torch.zeros(2)
    for entry in losses_reduced:
        total += entry["lm loss"].float()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return float(total[0] / total[1])


def configure_step(run: MegatronRun, config: Any, chunks: list[Any], optimizer: Any) -> None:
    """The ``config`` hooks Megatron-LM's ``setup_model_and_optimizer`` / ``train`` set."""
    from megatron.core.distributed import finalize_model_grads

    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if run.overlap_grad_reduce:
        config.no_sync_func = chunks[0].no_sync
        config.grad_sync_func = chunks[0].start_grad_sync


def train(run: MegatronRun, config: Any, chunks: list[Any], optimizer: Any, scheduler: Any,
          ep: Any = None) -> dict[str, list]:
    """``run.steps`` Megatron-LM ``train_step``s (``ep.after_step()`` after each optimizer step, when
    given); ``{"losses": [...], "grad_norms": [...], "slots_moved": [...]}`` per step (slots moved by a
    rebalance at that step, 0 otherwise)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    configure_step(run, config, chunks, optimizer)
    forward_backward = get_forward_backward_func()
    per_rank = run.global_batch // _dp_size()
    losses, grad_norms, slots_moved = [], [], []
    for step in range(run.steps):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses_reduced = forward_backward(
            forward_step_func=_forward_step, data_iterator=iter(micro_batches(run, step)), model=chunks,
            num_microbatches=run.micro_batches, seq_length=run.seq_length,
            micro_batch_size=per_rank // run.micro_batches, decoder_seq_length=run.seq_length,
            forward_only=False,
        )
        update_successful, grad_norm, _ = optimizer.step()
        if not update_successful:
            raise RuntimeError(f"step {step}: Megatron's optimizer skipped the update")
        scheduler.step(increment=run.global_batch)
        metrics = ep.after_step() if ep is not None else None
        slots_moved.append(metrics.slots_moved if metrics is not None else 0)
        losses.append(_step_loss(losses_reduced))
        grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
    return {"losses": losses, "grad_norms": grad_norms, "slots_moved": slots_moved}


def _dp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def build_and_train(run: MegatronRun, model: Any) -> dict[str, Any]:
    """Wrap an unwrapped ``model``, build its optimizer (ours: ``attach``) and train ``run.steps`` steps.

    Both report ``expert_bias`` (state-dict key -> values, when enabled); ours also reports
    ``replica_mismatch`` (:func:`replica_mismatch`), ``placement`` (the final
    ``physical_to_logical`` of this rank's stage) and ``replica_syncs`` (replica sums run before a
    reduction)."""
    config = model.config
    chunks = [wrap_model(run, config, model)]
    optimizer, scheduler = build_optimizer(run, chunks)
    ep = attach_ours(run, chunks, optimizer) if run.layer == "ours" else None
    result: dict[str, Any] = train(run, config, chunks, optimizer, scheduler, ep)
    result["optimizers"] = sorted({type(inner).__name__ for inner in optimizer.chained_optimizers})
    result["expert_bias"] = {key: value.tolist() for key, value in model.state_dict().items()
                             if key.endswith("router.expert_bias")}
    if ep is not None:
        result.update(replica_mismatch=replica_mismatch(ep), replica_syncs=ep.grad_sync.calls,
                      placement=ep.moe.placement.physical_to_logical.tolist())
    return result


def attach_ours(run: MegatronRun, chunks: list[Any], optimizer: Any) -> Any:
    """``ep_megatron.integrations.megatron.attach`` with a rebalancer when ``run.eplb_interval > 0``."""
    from ep_megatron.integrations.megatron import attach
    from ep_megatron.services.rebalance import RebalanceConfig

    interval = run.eplb_interval
    rebalance = RebalanceConfig(interval=interval, window=interval) if interval else None
    return attach(chunks, optimizer, rebalance)


def replica_mismatch(ep: Any) -> float:
    """Largest difference between two copies of one logical expert's row anywhere in the stage: the model
    parameters, fp32 main parameters and optimizer state (full rows, gathered from a distributed
    optimizer) of every replica and every expert-data-parallel copy. 0.0 when all are bit-identical."""
    moe = ep.moe
    group = moe.groups.dp_group
    size = dist.get_world_size(group)
    worst = 0.0
    for layer in moe.layers:
        ids = moe.local_logical_ids()[layer.layer_idx]  # [S]
        all_ids = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(all_ids, ids, group=group)
        all_ids = torch.cat(all_ids)  # [size * S]
        for param in moe.layer_expert_params(layer):
            tensors = ep.rows.gather([param])
            ep.rows.commit([param], tensors)
            for tensor in tensors:
                local = tensor.detach().float().contiguous()
                gathered = [torch.empty_like(local) for _ in range(size)]
                dist.all_gather(gathered, local, group=group)
                rows = torch.cat(gathered)  # [size * S, ...]
                for logical_id in all_ids.unique().tolist():
                    copies = rows[all_ids == logical_id]
                    worst = max(worst, float((copies - copies[0]).abs().max()))
    return worst


def expert_weights(model: Any) -> dict[str, np.ndarray]:
    """``{state-dict key: array}`` of every expert weight of this rank (for cross-rank comparisons)."""
    return {key: tensor.detach().float().numpy().copy() for key, tensor in model.state_dict().items()
            if "experts" in key and torch.is_tensor(tensor)}


def eval_batch(run: MegatronRun) -> dict[str, torch.Tensor]:
    """The first two sequences of step 0, the same on every rank (for logits compared across layouts)."""
    tokens, _ = _global_batch(run, 0)
    seq = run.seq_length
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    return {"tokens": tokens[:2], "position_ids": torch.arange(seq).unsqueeze(0).expand(2, seq),
            "attention_mask": mask}


@torch.no_grad()
def logits(run: MegatronRun, model: Any) -> np.ndarray | None:
    """``[2, seq, vocab]`` eval-mode logits of :func:`eval_batch` on the last pipeline stage (None on the
    others); with ``run.pp > 1`` through Megatron's pipeline schedule (``forward_only``)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = eval_batch(run)
    model.eval()
    if run.pp == 1:
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    else:
        def forward_step(data_iterator: Iterator[dict], chunk: Any) -> tuple[Any, Callable]:
            data = next(data_iterator)
            out = chunk(data["tokens"], data["position_ids"], data["attention_mask"])
            return out, lambda tensor, non_loss_data=False: tensor

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=run.seq_length, micro_batch_size=2, forward_only=True, collect_non_loss_data=True)
        output = outputs[0] if parallel_state.is_pipeline_last_stage() else None
    model.train()
    return output.float().numpy().copy() if output is not None else None


def save_checkpoint(model: Any, directory: str) -> None:
    """Megatron's ``dist_checkpointing.save`` (``torch_dist``) of ``model.sharded_state_dict()``."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(model.sharded_state_dict(), directory)


def load_checkpoint(model: Any, directory: str) -> None:
    """Megatron's ``dist_checkpointing.load`` into ``model`` (strict ``load_state_dict``)."""
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
