"""Per-GPU memory estimate of a run config: parameters, gradients, optimizer state, activations.

``ep-megatron train CONFIG --dry-run`` prints it and refuses a config that does not fit (see
``docs/gpu.md``). The estimate counts what this package's job allocates, per GPU (rank):

- **parameters**: the dense model (replicated on every rank) and this rank's expert slots
  (``slots_per_rank`` of every MoE layer, from the config's placement), in the parameter dtype
  (bf16 under ``train.precision: bf16``, else fp32);
- **gradients**: one per parameter element; under bf16 with torch AdamW the peak is the fp32 copy the
  optimizer step makes (4 bytes); DeepSpeed ZeRO-2 partitions them over the data-parallel group (experts:
  the expert-data-parallel group) and adds its reduce bucket;
- **optimizer state**: AdamW's two fp32 moments, plus the fp32 master under bf16; DeepSpeed ZeRO-1/2
  partitions master, moments and the fp32 gradient partition (4 + 8 + 4 bytes) over the same groups and
  adds its all-gather bucket;
- **activations** of one micro-batch, from the tensors this implementation saves for backward (the MoE
  GPT of ``trainer/model.py``, ``[seq, batch]`` tokens, ``top_k`` routed rows per token times
  ``expert_imbalance``, the busiest rank's rows over the mean) and the logits with their fp32 loss
  copies. With ``model.activation_checkpointing`` only each block's input is kept, plus one block's
  activations while it is recomputed;
- **overhead**: a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation.

It is an estimate: it does not model the caching allocator, kernels' workspaces or framework buffers
beyond those named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ep_megatron.config import MoEConfig
from ep_megatron.trainer.config import RunConfig, deepspeed_config, gpt_config, moe_config
from ep_megatron.trainer.model import GPTConfig

GB = 10**9
OVERHEAD_BYTES = 6 * 2**30  # CUDA context, NCCL buffers, allocator fragmentation
DEFAULT_VOCAB = 131072  # assumed when the config's tokenizer file cannot be read
DEFAULT_IMBALANCE = 1.5  # busiest rank's expert rows over the mean (rebalancing keeps it near 1.2)
_DS_BUCKET = 500_000_000  # DeepSpeed's default reduce / all-gather bucket, in elements


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one run config on ``world_size`` GPUs."""

    world_size: int
    ep_size: int
    slots_per_rank: int
    dense_params: int  # parameter elements replicated on every rank
    expert_params: int  # parameter elements of this rank's expert slots
    parameters: int  # bytes
    gradients: int  # bytes (peak)
    optimizer_state: int  # bytes
    activations: int  # bytes of one micro-batch
    overhead: int  # bytes (fixed allowance)
    notes: tuple[str, ...]  # assumptions the numbers rest on

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations + self.overhead

    def table(self, gpu_bytes: int) -> str:
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state),
                ("activations (one micro-batch)", self.activations),
                ("overhead (CUDA context, NCCL, fragmentation)", self.overhead), ("total", self.total),
                ("GPU memory", gpu_bytes)]
        lines = [f"world size {self.world_size}, EP {self.ep_size}, EDP {self.world_size // self.ep_size}, "
                 f"{self.slots_per_rank} expert slots per MoE layer per GPU; parameters per GPU: "
                 f"{self.dense_params / 1e9:.2f} B dense + {self.expert_params / 1e9:.2f} B experts"]
        lines += [f"  {name:46} {value / GB:9.1f} GB" for name, value in rows]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def vocab_size_of(config: RunConfig) -> tuple[int, str | None]:
    """``(vocab size, note)``: 257 for the byte tokenizer, the size of a readable ``tokenizer.json``,
    else :data:`DEFAULT_VOCAB` with a note saying so."""
    path = config.data.tokenizer
    if path is None:
        return 257, None
    try:
        raw = json.loads(Path(path).read_text())
        ids = list(raw["model"]["vocab"].values()) + [tok["id"] for tok in raw.get("added_tokens", [])]
        return max(ids) + 1, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return DEFAULT_VOCAB, (f"tokenizer {path!r} not readable here: vocab size {DEFAULT_VOCAB} assumed "
                               f"(--vocab-size sets it)")


def _dense_elements(gpt: GPTConfig, moe: MoEConfig) -> int:
    h = gpt.hidden_size
    total = gpt.vocab_size * h * (1 if gpt.tie_embeddings else 2) + h  # embeddings (+ head), final norm
    for layer in range(gpt.num_layers):
        total += 4 * h * h + 2 * h  # attention qkv + proj, two norms
        if gpt.is_moe_layer(layer):
            shared_fc1 = moe.shared_expert_ffn_size * (2 if moe.activation == "swiglu" else 1)
            total += moe.num_experts * h + (shared_fc1 + moe.shared_expert_ffn_size) * h
        else:
            total += 3 * h * gpt.ffn_hidden_size
    return total


def _activation_bytes(gpt: GPTConfig, moe: MoEConfig, seq: int, micro_batch: int, element: int,
                      imbalance: float, checkpointing: bool) -> int:
    """Bytes saved for backward by one micro-batch (see the module docstring)."""
    h, tokens = gpt.hidden_size, seq * micro_batch
    rows = imbalance * moe.top_k * tokens  # expert rows of the busiest rank
    attention = 9 * tokens * h * element  # x, norm out, qkv, rotated q / k, attention out, proj in
    shared = moe.shared_expert_ffn_size
    moe_block = (attention + 3 * tokens * h * element  # norm in / out, [seq, batch] copy
                 + 4 * tokens * (h + 3 * moe.num_experts)  # fp32 router input, logits, scores, probs
                 + rows * (2 * h + 3 * moe.ffn_hidden_size) * element  # rows in / combined, fc1 out, act
                 + tokens * 3 * shared * element)
    dense_block = attention + (2 * tokens * h + 4 * tokens * gpt.ffn_hidden_size) * element
    blocks = [moe_block if gpt.is_moe_layer(i) else dense_block for i in range(gpt.num_layers)]
    logits = tokens * gpt.vocab_size * (element + 4 + 4)  # logits, fp32 copy, fp32 softmax / grad
    if checkpointing:
        return int(gpt.num_layers * tokens * h * element + max(blocks) + logits)
    return int(sum(blocks) + logits)


def _zero(config: RunConfig) -> tuple[int, int, int]:
    """``(stage, reduce bucket, all-gather bucket)`` of the run's DeepSpeed config (stage -1: torch)."""
    if not config.train.deepspeed_config:
        return -1, 0, 0
    zero = deepspeed_config(config.train).get("zero_optimization", {})
    return (int(zero.get("stage", 0)), int(zero.get("reduce_bucket_size", _DS_BUCKET)),
            int(zero.get("allgather_bucket_size", _DS_BUCKET)))


def _state_bytes(elements: int, shards: int, bf16: bool, stage: int) -> tuple[float, float, float]:
    """``(parameters, gradients, optimizer state)`` bytes of ``elements`` parameter elements whose ZeRO
    state is partitioned over ``shards`` ranks."""
    param = 2 if bf16 else 4
    if stage <= 0:  # torch AdamW (fp32 or bf16 with fp32 masters) or ZeRO-0 (fp32)
        return elements * param, elements * 4, elements * (12 if bf16 else 8)
    fp32_partition = elements * 16 / shards  # master + two moments + the fp32 gradient partition
    grads = elements * param if stage == 1 else elements * param / shards
    return elements * param, grads, fp32_partition


def estimate_memory(config: RunConfig, world_size: int, vocab_size: int,
                    imbalance: float = DEFAULT_IMBALANCE, notes: tuple[str, ...] = ()) -> MemoryEstimate:
    """The per-GPU estimate of ``config`` on ``world_size`` GPUs; ``ValueError`` names a bad layout."""
    train = config.train
    ep_size = train.expert_parallel_size or world_size
    if world_size < 1 or world_size % ep_size:
        raise ValueError(f"world size {world_size} must be a positive multiple of "
                         f"train.expert_parallel_size={ep_size}")
    if imbalance < 1:
        raise ValueError(f"expert imbalance {imbalance} must be >= 1 (busiest rank over the mean)")
    gpt, moe = gpt_config(config, vocab_size), moe_config(config)
    num_moe = sum(gpt.is_moe_layer(i) for i in range(gpt.num_layers))
    slots_per_rank = moe.placement(num_moe, ep_size).slots_per_rank if num_moe else 0
    fc1_out = moe.ffn_hidden_size * (2 if moe.activation == "swiglu" else 1)
    expert = num_moe * slots_per_rank * (fc1_out + moe.ffn_hidden_size) * moe.hidden_size
    dense = _dense_elements(gpt, moe)
    bf16 = train.precision == "bf16"
    stage, reduce_bucket, allgather_bucket = _zero(config)
    dense_bytes = _state_bytes(dense, world_size, bf16, stage)
    expert_bytes = _state_bytes(expert, world_size // ep_size, bf16, stage)
    param, grads, state = (a + b for a, b in zip(dense_bytes, expert_bytes))
    element = 2 if bf16 else 4
    if stage == 2:
        grads += reduce_bucket * element
    if stage >= 1:
        state += allgather_bucket * element
    activations = _activation_bytes(gpt, moe, config.data.seq_len, train.micro_batch_size, element,
                                    imbalance, gpt.activation_checkpointing)
    return MemoryEstimate(world_size=world_size, ep_size=ep_size, slots_per_rank=slots_per_rank,
                          dense_params=dense, expert_params=expert, parameters=int(param),
                          gradients=int(grads), optimizer_state=int(state), activations=activations,
                          overhead=OVERHEAD_BYTES,
                          notes=(*notes, f"expert rows of the busiest rank: {imbalance} x the mean"))


def check_fits(estimate: MemoryEstimate, gpu_bytes: int) -> None:
    """Raise ``ValueError`` with the numbers when ``estimate`` exceeds ``gpu_bytes``."""
    if estimate.total > gpu_bytes:
        raise ValueError(f"the config needs about {estimate.total / GB:.1f} GB per GPU, more than the "
                         f"{gpu_bytes / GB:.1f} GB available:\n{estimate.table(gpu_bytes)}")


def dry_run(config: RunConfig, world_size: int, gpu_bytes: int, vocab_size: int | None = None,
            imbalance: float = DEFAULT_IMBALANCE) -> dict[str, Any]:
    """Print the estimate of ``config``; raise ``ValueError`` (with the numbers) when it does not fit."""
    notes: tuple[str, ...] = ()
    if vocab_size is None:
        vocab_size, note = vocab_size_of(config)
        notes = (note,) if note else ()
    estimate = estimate_memory(config, world_size, vocab_size, imbalance, notes)
    check_fits(estimate, gpu_bytes)
    print(estimate.table(gpu_bytes))
    print(f"fits: {estimate.total / GB:.1f} GB of {gpu_bytes / GB:.1f} GB per GPU")
    return {"total": estimate.total, "gpu_bytes": gpu_bytes}
