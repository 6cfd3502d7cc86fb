"""Our ``MoEGPT`` (the trainer's model) written as a Hugging Face Mixtral directory, where it maps.

Uses the Mixtral layout of :mod:`ep_megatron.integrations.hf`; lives with the trainer because the model
does (integrations never import the trainer).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ep_megatron.config import MoEConfig
from ep_megatron.integrations.hf.convert import (
    DEFAULT_SHARD_BYTES,
    drop_tied_head,
    moe_block_tensors,
    split_moe,
    write_hf_dir,
)
from ep_megatron.integrations.hf.families import FAMILIES
from ep_megatron.services import checkpoint as ckpt
from ep_megatron.trainer.model import GPTConfig


def mixtral_config_for(gpt: GPTConfig, moe: MoEConfig) -> dict[str, Any]:
    """The Mixtral ``config.json`` of a MoEGPT, or ``ValueError`` naming the first option that does not map.

    Maps: every block an MoE block (``moe_layer_freq=1``), SwiGLU experts, softmax top-k routing renormalised
    over the chosen experts (``pre_softmax=False``, or ``pre_softmax=True`` with ``norm_topk_prob=True``), no
    groups, expert bias, shared expert or scaling; tied or untied embeddings. Training-only settings (aux and
    z losses, capacity, sharding) are not part of the model; Mixtral runs dropless.
    """
    refusals = [
        ("moe_layer_freq", gpt.moe_layer_freq, gpt.moe_layer_freq == 1),
        ("activation", moe.activation, moe.activation == "swiglu"),
        ("score_function", moe.score_function, moe.score_function == "softmax"),
        ("pre_softmax/norm_topk_prob", (moe.pre_softmax, moe.norm_topk_prob),
         (not moe.pre_softmax and moe.norm_topk_prob is not False)
         or (moe.pre_softmax and moe.norm_topk_prob is True)),
        ("num_groups", moe.num_groups, moe.num_groups is None),
        ("enable_expert_bias", moe.enable_expert_bias, not moe.enable_expert_bias),
        ("shared_expert_ffn_size", moe.shared_expert_ffn_size, moe.shared_expert_ffn_size == 0),
        ("topk_scaling_factor", moe.topk_scaling_factor, moe.topk_scaling_factor == 1.0),
    ]
    for name, value, ok in refusals:
        if not ok:
            raise ValueError(f"{name}={value!r} does not map to Mixtral")
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": gpt.vocab_size,
        "hidden_size": gpt.hidden_size, "intermediate_size": moe.ffn_hidden_size,
        "num_hidden_layers": gpt.num_layers, "num_attention_heads": gpt.num_heads,
        "num_key_value_heads": gpt.num_heads, "head_dim": gpt.head_dim, "hidden_act": "silu",
        "max_position_embeddings": gpt.max_seq_len, "rms_norm_eps": gpt.norm_eps,
        "rope_parameters": {"rope_theta": gpt.rope_theta, "rope_type": "default"},
        "rope_theta": gpt.rope_theta, "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
        "router_jitter_noise": 0.0, "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": gpt.tie_embeddings, "sliding_window": None, "attention_dropout": 0.0,
        "initializer_range": gpt.init_std, "use_cache": True,
    }


def _moegpt_dense_names(gpt: GPTConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": tensors.pop("embed.weight"),
           "model.norm.weight": tensors.pop("norm.weight"), "lm_head.weight": tensors.pop("head.weight")}
    for i in range(gpt.num_layers):
        ours, hf = f"blocks.{i}", f"model.layers.{i}"
        q, k, v = tensors.pop(f"{ours}.attn.qkv.weight").chunk(3)  # [3H, H]: rows q, k, v
        out.update({f"{hf}.self_attn.q_proj.weight": q, f"{hf}.self_attn.k_proj.weight": k,
                    f"{hf}.self_attn.v_proj.weight": v,
                    f"{hf}.self_attn.o_proj.weight": tensors.pop(f"{ours}.attn.proj.weight"),
                    f"{hf}.input_layernorm.weight": tensors.pop(f"{ours}.attn_norm.weight"),
                    f"{hf}.post_attention_layernorm.weight": tensors.pop(f"{ours}.mlp_norm.weight")})
    if tensors:
        raise ValueError(f"tensors {sorted(tensors)[:6]} of the checkpoint have no place in the Mixtral "
                         f"layout")
    return out


def export_moegpt_mixtral(checkpoint: str | Path, out_dir: str | Path, gpt_config: GPTConfig, *,
                          dtype: torch.dtype | None = None,
                          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write our checkpoint of a ``MoEGPT`` (``gpt_config``) as a Mixtral HF directory; see
    :func:`mixtral_config_for` for what maps."""
    path = ckpt.resolve_checkpoint(checkpoint)
    manifest = ckpt.read_manifest(path)
    moe = MoEConfig.from_dict(manifest["config"])
    config = mixtral_config_for(gpt_config, moe)
    tensors = ckpt.read_tensors(path)
    family = FAMILIES["mixtral"]
    out: dict[str, torch.Tensor] = {}
    for entry in manifest["moe_layers"]:
        match = re.fullmatch(r"blocks\.(\d+)\.mlp", entry["prefix"])
        if match is None:
            raise ValueError(f"MoE layer {entry['prefix']!r} is not a MoEGPT block's mlp")
        disk_prefix = family.disk_prefix(f"model.layers.{match.group(1)}.mlp")
        out.update(moe_block_tensors(family, disk_prefix, split_moe(tensors, entry["prefix"])))
    out.update(_moegpt_dense_names(gpt_config, tensors))
    drop_tied_head(out, "model.embed_tokens.weight", "lm_head.weight", gpt_config.tie_embeddings)
    if dtype is not None:
        out = {k: t.to(dtype) for k, t in out.items()}
    return write_hf_dir(out, config, out_dir, max_shard_bytes=max_shard_bytes)
