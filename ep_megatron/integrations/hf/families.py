"""The Hugging Face MoE families we map, their on-disk names, and their routing as a :class:`MoEConfig`.

Each family's routing semantics are carried exactly, in HF's order of operations (``transformers`` 5.x
``modeling_*.py``), as our ``pre_softmax=True`` with ``norm_topk_prob`` for the softmax families:

========== ====================================================================================
mixtral    softmax over the experts, top-k, renormalised (= softmax over the top-k logits)
qwen3_moe  softmax, top-k; renormalised iff ``norm_topk_prob``
qwen2_moe  as qwen3_moe, plus a shared expert scaled by ``sigmoid(x @ shared_expert_gate)``
deepseek_v3 sigmoid scores, ``e_score_correction_bias`` (our ``expert_bias``) steers a group-limited
           top-k (a group scores by its top-2 experts), chosen scores renormalised iff
           ``norm_topk_prob``, times ``routed_scaling_factor``; ``n_shared_experts`` ungated shared
           experts of width ``moe_intermediate_size`` each (one MLP of the summed width)
========== ====================================================================================

Anything else (another ``model_type``, a non-SiLU activation, router jitter, a group rule we cannot
express) is refused by name with ``ValueError`` before any weight is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ep_megatron.config import MoEConfig

# MoEConfig fields the Hugging Face config decides; the caller may set every other field (sharding, balancing
# losses, capacity, seeds) through ``ep_options``.
HF_DEFINED_FIELDS = frozenset({
    "hidden_size", "ffn_hidden_size", "num_experts", "top_k", "activation", "score_function", "pre_softmax",
    "num_groups", "group_topk", "norm_topk_prob", "topk_scaling_factor", "enable_expert_bias",
    "shared_expert_ffn_size", "shared_expert_gate",
})


@dataclass(frozen=True)
class Family:
    """One Hugging Face MoE family: its classes and the names of its MoE-block tensors."""

    model_type: str  # config.model_type
    module: str  # transformers.models.<module>.modeling_<module>
    block_class: str  # the sparse MoE block (transformers 5.x, fused 3-D experts)
    block_attr: str  # attribute of the decoder layer holding the block in the module tree ("mlp")
    disk_block: str  # that attribute in checkpoint files ("block_sparse_moe" for Mixtral)
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) weight names in checkpoint files
    shared_name: str | None  # shared-expert MLP module (its gate_proj / up_proj / down_proj), or None
    shared_gate_name: str | None  # the shared expert's sigmoid gate Linear [1, hidden], or None
    expert_bias_name: str | None  # router buffer holding the selection bias, or None

    def disk_prefix(self, block_path: str) -> str:
        """``model.layers.3.mlp`` (module path) -> the block's prefix in checkpoint files."""
        parent, _, attr = block_path.rpartition(".")
        if attr != self.block_attr:
            raise ValueError(f"{block_path}: a {self.model_type} MoE block must be a decoder layer's "
                             f"'{self.block_attr}'")
        return f"{parent}.{self.disk_block}"

    def module_path(self, disk_prefix: str) -> str:
        """Inverse of :meth:`disk_prefix`."""
        parent, _, _ = disk_prefix.rpartition(".")
        return f"{parent}.{self.block_attr}"


_QWEN_EXPERTS = ("gate_proj", "up_proj", "down_proj")
FAMILIES = {
    "mixtral": Family("mixtral", "mixtral", "MixtralSparseMoeBlock", "mlp", "block_sparse_moe",
                      ("w1", "w3", "w2"), None, None, None),
    "qwen3_moe": Family("qwen3_moe", "qwen3_moe", "Qwen3MoeSparseMoeBlock", "mlp", "mlp",
                        _QWEN_EXPERTS, None, None, None),
    "qwen2_moe": Family("qwen2_moe", "qwen2_moe", "Qwen2MoeSparseMoeBlock", "mlp", "mlp",
                        _QWEN_EXPERTS, "shared_expert", "shared_expert_gate", None),
    "deepseek_v3": Family("deepseek_v3", "deepseek_v3", "DeepseekV3MoE", "mlp", "mlp",
                          _QWEN_EXPERTS, "shared_experts", None, "e_score_correction_bias"),
}


def _get(config: Any, name: str) -> Any:
    """A field of a ``transformers`` config object or of its ``to_dict()``."""
    if isinstance(config, dict):
        if name not in config:
            raise ValueError(f"Hugging Face config has no field '{name}'")
        return config[name]
    return getattr(config, name)


def family_of(config: Any) -> Family:
    """The :class:`Family` of a ``transformers`` config (object or dict); refuses unmapped model types."""
    model_type = _get(config, "model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"Hugging Face model_type={model_type!r} is not mapped; "
                         f"supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _check_activation(config: Any) -> None:
    activation = _get(config, "hidden_act")
    if activation != "silu":
        raise ValueError(f"hidden_act={activation!r} is not mapped; only 'silu' (SwiGLU experts)")


def _mixtral(config: Any) -> dict[str, Any]:
    jitter = _get(config, "router_jitter_noise")
    if jitter:
        raise ValueError(f"router_jitter_noise={jitter} is not mapped (training-time input noise of the HF "
                         f"block); set it to 0.0")
    return {"ffn_hidden_size": _get(config, "intermediate_size"),
            "num_experts": _get(config, "num_local_experts"),
            "score_function": "softmax", "pre_softmax": True, "norm_topk_prob": True}


def _qwen(config: Any) -> dict[str, Any]:
    fields = {"ffn_hidden_size": _get(config, "moe_intermediate_size"),
              "num_experts": _get(config, "num_experts"),
              "score_function": "softmax", "pre_softmax": True,
              "norm_topk_prob": bool(_get(config, "norm_topk_prob"))}
    if _get(config, "model_type") == "qwen2_moe":
        shared = _get(config, "shared_expert_intermediate_size")
        if not shared:
            raise ValueError(f"shared_expert_intermediate_size={shared} is not mapped (qwen2_moe always "
                             f"has a gated shared expert)")
        fields.update(shared_expert_ffn_size=shared, shared_expert_gate=True)
    return fields


def _deepseek_v3(config: Any) -> dict[str, Any]:
    top_k, n_group, topk_group = (_get(config, k) for k in ("num_experts_per_tok", "n_group", "topk_group"))
    ffn = _get(config, "moe_intermediate_size")
    fields: dict[str, Any] = {
        "ffn_hidden_size": ffn, "num_experts": _get(config, "n_routed_experts"), "score_function": "sigmoid",
        "norm_topk_prob": bool(_get(config, "norm_topk_prob")),
        "topk_scaling_factor": float(_get(config, "routed_scaling_factor")), "enable_expert_bias": True,
        "shared_expert_ffn_size": ffn * (_get(config, "n_shared_experts") or 0),
    }
    if n_group and n_group > 1 and topk_group < n_group:
        # HF scores a group by the sum of its top-2 selection scores; ours by its top (top_k / group_topk).
        if top_k % topk_group or top_k // topk_group != 2:
            raise ValueError(f"n_group={n_group}, topk_group={topk_group}, num_experts_per_tok={top_k} is "
                             f"not mapped: group-limited routing needs num_experts_per_tok == 2 * topk_group")
        fields.update(num_groups=n_group, group_topk=topk_group)
    return fields


_FAMILY_FIELDS = {"mixtral": _mixtral, "qwen3_moe": _qwen, "qwen2_moe": _qwen, "deepseek_v3": _deepseek_v3}


def moe_config_from_hf(config: Any, **ep_options: Any) -> MoEConfig:
    """The :class:`MoEConfig` of one MoE block of a ``transformers`` config (object or ``to_dict()``).

    ``ep_options`` set the fields the Hugging Face config does not decide (``sharding_strategy``,
    ``num_redundant_experts``, balancing losses, ...); a field it does decide
    (:data:`HF_DEFINED_FIELDS`) raises ``ValueError``. Our own aux losses are off unless set here (the HF
    model's ``output_router_logits`` aux loss keeps working, see ``integrations.hf.swap``).
    """
    family = family_of(config)
    fixed = sorted(HF_DEFINED_FIELDS & set(ep_options))
    if fixed:
        raise ValueError(f"{fixed}: set by the Hugging Face {family.model_type} config, not by ep_options")
    _check_activation(config)
    fields = {"hidden_size": _get(config, "hidden_size"), "top_k": _get(config, "num_experts_per_tok"),
              "activation": "swiglu", **_FAMILY_FIELDS[family.model_type](config)}
    return MoEConfig(**fields, **ep_options)
