"""``MoEConfig``: the math and the sharding of one MoE layer, validated on construction.

Field names follow Megatron-Core's ``moe_*`` options where one exists (``moe_router_topk`` -> ``top_k``,
...); ``ep_megatron.integrations.megatron.moe_config_from_megatron`` maps them. The expert-parallel size
is not a field: it is the size of the groups the layers are built with. Every ``ValueError`` names the
field and its allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ep_megatron.placement import STRATEGIES, ExpertPlacement

ACTIVATIONS = ("swiglu", "gelu")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING_TYPES = ("none", "aux_loss", "seq_aux_loss")
DROP_POLICIES = ("probs", "position")
ROUTER_DTYPES = (None, "fp32", "fp64")
# Fields older versions wrote into checkpoints that no longer exist (the EP size is the groups').
RETIRED_FIELDS = frozenset({"expert_parallel_size"})


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: shapes, routing, load-balancing losses, capacity and expert sharding."""

    hidden_size: int  # model width: tokens enter and leave the layer as [..., hidden_size]
    ffn_hidden_size: int  # width of each expert's MLP (Megatron's moe_ffn_hidden_size)
    num_experts: int  # E, logical experts per layer
    top_k: int = 2  # experts per token, in [1, num_experts]
    activation: str = "swiglu"  # expert MLP: "swiglu" (fc1 = [gate; up], 2 * ffn rows) or "gelu"
    score_function: str = "softmax"  # router scores: "softmax" or "sigmoid" (DeepSeek-V3)
    pre_softmax: bool = False  # softmax over all experts before top-k (else over the top-k logits)
    num_groups: int | None = None  # group-limited routing: experts split into this many groups
    group_topk: int | None = None  # groups each token may use (with num_groups)
    norm_topk_prob: bool | None = None  # top-k probs / sum; None: softmax unless pre_softmax, sigmoid if k>1
    topk_scaling_factor: float = 1.0  # routed probs times this, after normalisation (DeepSeek-V3: 2.5)
    load_balancing_type: str = "none"  # "none", "aux_loss" (Switch/GShard), "seq_aux_loss" (DeepSeek-V2/V3)
    aux_loss_coeff: float = 0.0  # coefficient of the aux / seq-aux load-balancing loss
    z_loss_coeff: float = 0.0  # coefficient of the router z-loss (ST-MoE); 0 disables it
    enable_expert_bias: bool = False  # aux-loss-free balancing: a per-expert bias steers top-k selection
    expert_bias_update_rate: float = 1e-3  # bias step per optimizer step, sign(mean load - load) * rate
    capacity_factor: float | None = None  # None: dropless; else capacity = ceil(cf * tokens * top_k / E)
    drop_policy: str = "probs"  # over capacity, keep the highest-prob ("probs") or earliest ("position")
    shared_expert_ffn_size: int = 0  # width of the always-on shared expert MLP; 0 means none
    shared_expert_gate: bool = False  # shared expert output times sigmoid(x @ gate [1, hidden]) (Qwen2-MoE)
    sharding_strategy: str = "model"  # initial placement: "data", "model", "hybrid" or "dynamic"
    replicated_experts: tuple[int, ...] = ()  # hybrid: logical experts replicated on every rank
    num_redundant_experts: int = 0  # dynamic: extra physical slots beyond num_experts
    router_dtype: str | None = "fp32"  # router logits and probs: "fp32", "fp64" or None (input dtype)
    prefer_local_replica: bool = True  # send a token to a replica on its own rank when one exists
    init_std: float = 0.02  # std of the normal init of router, expert and shared-expert weights
    seed: int = 0  # base seed; weights are drawn per (seed, layer, logical expert)

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicated_experts", tuple(int(e) for e in self.replicated_experts))
        self._check_sizes()
        self._check_routing()
        self._check_losses_and_capacity()
        self._check_sharding()

    def _check_sizes(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_experts"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} must be one of {ACTIVATIONS}")
        if self.shared_expert_ffn_size < 0:
            raise ValueError(f"shared_expert_ffn_size={self.shared_expert_ffn_size} must be >= 0 (0 = none)")
        if self.shared_expert_gate and not self.shared_expert_ffn_size:
            raise ValueError("shared_expert_gate=True requires shared_expert_ffn_size > 0")
        if not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise ValueError(f"init_std={self.init_std} must be a finite float > 0")

    def _check_routing(self) -> None:
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function={self.score_function!r} must be one of {SCORE_FUNCTIONS}")
        if self.pre_softmax and self.score_function != "softmax":
            raise ValueError("pre_softmax=True requires score_function='softmax'")
        if self.norm_topk_prob is False and self.score_function == "softmax" and not self.pre_softmax:
            raise ValueError("norm_topk_prob=False requires pre_softmax=True with score_function='softmax' "
                             "(a softmax over the top-k logits is normalised by construction)")
        if not (self.topk_scaling_factor > 0 and math.isfinite(self.topk_scaling_factor)):
            raise ValueError(f"topk_scaling_factor={self.topk_scaling_factor} must be a finite float > 0")
        if (self.num_groups is None) != (self.group_topk is None):
            raise ValueError(
                f"num_groups={self.num_groups} and group_topk={self.group_topk}: set both or neither"
            )
        if self.num_groups is not None:
            if not 1 <= self.num_groups <= self.num_experts or self.num_experts % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must be a divisor of num_experts={self.num_experts}"
                )
            assert self.group_topk is not None
            if not 1 <= self.group_topk <= self.num_groups:
                raise ValueError(f"group_topk={self.group_topk} must be in [1, num_groups={self.num_groups}]")
            if self.top_k % self.group_topk:
                raise ValueError(f"group_topk={self.group_topk} must divide top_k={self.top_k}")
            experts_per_group = self.num_experts // self.num_groups
            if self.top_k // self.group_topk > experts_per_group:
                raise ValueError(
                    f"top_k={self.top_k} must be <= group_topk * experts per group "
                    f"= {self.group_topk * experts_per_group}"
                )
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype={self.router_dtype!r} must be one of {ROUTER_DTYPES}")

    def _check_losses_and_capacity(self) -> None:
        if self.load_balancing_type not in LOAD_BALANCING_TYPES:
            raise ValueError(
                f"load_balancing_type={self.load_balancing_type!r} must be one of {LOAD_BALANCING_TYPES}"
            )
        for name in ("aux_loss_coeff", "z_loss_coeff", "expert_bias_update_rate"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} must be a finite float >= 0")
        if self.capacity_factor is not None and not (
            self.capacity_factor > 0 and math.isfinite(self.capacity_factor)
        ):
            raise ValueError(f"capacity_factor={self.capacity_factor} must be None (dropless) or a float > 0")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={self.drop_policy!r} must be one of {DROP_POLICIES}")

    def _check_sharding(self) -> None:
        if self.sharding_strategy not in STRATEGIES:
            raise ValueError(f"sharding_strategy={self.sharding_strategy!r} must be one of {STRATEGIES}")
        bad = [e for e in self.replicated_experts if not 0 <= e < self.num_experts]
        if bad or len(set(self.replicated_experts)) != len(self.replicated_experts):
            raise ValueError(
                f"replicated_experts={self.replicated_experts} must be distinct ids in "
                f"[0, {self.num_experts})"
            )
        if self.replicated_experts and self.sharding_strategy != "hybrid":
            raise ValueError("replicated_experts is only used by sharding_strategy='hybrid'")
        if self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts={self.num_redundant_experts} must be >= 0")
        if self.num_redundant_experts and self.sharding_strategy != "dynamic":
            raise ValueError("num_redundant_experts is only used by sharding_strategy='dynamic'")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> MoEConfig:
        """From the JSON form checkpoints record (lists become tuples); retired fields are dropped, any
        other unknown key raises ``ValueError`` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known - RETIRED_FIELDS)
        if unknown:
            raise ValueError(f"MoEConfig has no field(s) {unknown}; fields are {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known})

    @property
    def fc1_out(self) -> int:
        """Rows of an expert's fc1 weight: ``2 * ffn`` for SwiGLU (gate rows, then up rows), else ``ffn``."""
        return 2 * self.ffn_hidden_size if self.activation == "swiglu" else self.ffn_hidden_size

    def capacity(self, num_tokens: int) -> int | None:
        """Per-logical-expert capacity for ``num_tokens`` tokens of one rank; ``None`` when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def placement(self, num_moe_layers: int, ep_size: int, num_nodes: int = 1) -> ExpertPlacement:
        """The initial placement of ``sharding_strategy``: ``num_moe_layers`` layers on ``ep_size`` ranks."""
        return ExpertPlacement.build(
            self.sharding_strategy, num_moe_layers, self.num_experts, ep_size,
            replicated_experts=self.replicated_experts, num_redundant=self.num_redundant_experts,
            num_nodes=num_nodes,
        )
