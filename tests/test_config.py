"""MoEConfig validation: every bad field raises a ValueError naming the field and the allowed range."""

from __future__ import annotations

import pytest

from ep_megatron.config import MoEConfig

BASE = dict(hidden_size=16, ffn_hidden_size=32, num_experts=8, top_k=2)


def test_defaults_are_dropless_model_sharded_swiglu() -> None:
    cfg = MoEConfig(**BASE)
    assert cfg.capacity_factor is None and cfg.capacity(100) is None
    assert (cfg.sharding_strategy, cfg.activation, cfg.score_function) == ("model", "swiglu", "softmax")
    assert cfg.fc1_out == 64 and MoEConfig(**BASE, activation="gelu").fc1_out == 32
    assert MoEConfig(**BASE, capacity_factor=1.5).capacity(10) == 4  # ceil(1.5 * 10 * 2 / 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=0), "hidden_size=0 must be an integer >= 1"),
        (dict(top_k=9), r"top_k=9 must be in \[1, num_experts=8\]"),
        (dict(top_k=0), r"top_k=0 must be in \[1, num_experts=8\]"),
        (dict(activation="relu"), "activation='relu' must be one of"),
        (dict(score_function="tanh"), "score_function='tanh' must be one of"),
        (dict(pre_softmax=True, score_function="sigmoid"), "pre_softmax=True requires"),
        (dict(num_groups=4), "num_groups=4 and group_topk=None"),
        (dict(num_groups=3, group_topk=1), "num_groups=3 must be a divisor of num_experts=8"),
        (dict(num_groups=4, group_topk=5), r"group_topk=5 must be in \[1, num_groups=4\]"),
        (dict(num_groups=4, group_topk=2, top_k=3), "group_topk=2 must divide top_k=3"),
        (dict(num_groups=4, group_topk=1, top_k=4), "top_k=4 must be <= group_topk"),
        (dict(load_balancing_type="sinkhorn"), "load_balancing_type='sinkhorn' must be one of"),
        (dict(aux_loss_coeff=-1.0), "aux_loss_coeff=-1.0 must be a finite float >= 0"),
        (dict(z_loss_coeff=float("nan")), "z_loss_coeff=nan must be a finite float >= 0"),
        (dict(expert_bias_update_rate=-0.1), "expert_bias_update_rate=-0.1 must be"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0 must be None"),
        (dict(drop_policy="random"), "drop_policy='random' must be one of"),
        (dict(shared_expert_ffn_size=-1), "shared_expert_ffn_size=-1 must be >= 0"),
        (dict(sharding_strategy="tensor"), "sharding_strategy='tensor' must be one of"),
        (dict(sharding_strategy="hybrid", replicated_experts=(8,)), r"replicated_experts=\(8,\) must be"),
        (dict(sharding_strategy="hybrid", replicated_experts=(1, 1)), "must be distinct"),
        (dict(replicated_experts=(1,)), "only used by sharding_strategy='hybrid'"),
        (dict(num_redundant_experts=-2, sharding_strategy="dynamic"),
         "num_redundant_experts=-2 must be >= 0"),
        (dict(num_redundant_experts=2), "only used by sharding_strategy='dynamic'"),
        (dict(router_dtype="bf16"), "router_dtype='bf16' must be one of"),
        (dict(init_std=0.0), "init_std=0.0 must be a finite float > 0"),
    ],
)
def test_bad_field_names_field_and_range(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(
    ("strategy", "extra", "slots"),
    [("data", {}, 16), ("model", {}, 8), ("hybrid", {"replicated_experts": [0, 1]}, 10),
     ("dynamic", {"num_redundant_experts": 2}, 10)],
)
def test_placement_helper_builds_each_strategy(strategy: str, extra: dict, slots: int) -> None:
    cfg = MoEConfig(**BASE, sharding_strategy=strategy, **extra)
    placement = cfg.placement(num_moe_layers=3, ep_size=2)
    assert placement.num_layers == 3 and placement.ep_size == 2 and placement.num_slots == slots
    assert placement.strategy == strategy
    assert cfg.replicated_experts == tuple(extra.get("replicated_experts", ()))
    with pytest.raises(ValueError, match="ep_size=0"):  # the EP size is the groups', checked where used
        cfg.placement(num_moe_layers=3, ep_size=0)
