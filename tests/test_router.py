"""TopKRouter vs the dense reference's routing: ids, probs, capacity, aux losses through the auto-scaler."""

from __future__ import annotations

import pytest
import torch

from ep_megatron.config import MoEConfig
from ep_megatron.layer.router import TopKRouter, count_nonfinite, nonfinite_error
from tests.reference import dense_moe_reference

HIDDEN, EXPERTS, TOKENS = 6, 8, 20

ROUTING = [
    dict(top_k=1), dict(top_k=2), dict(top_k=3, score_function="sigmoid"),
    dict(top_k=1, score_function="sigmoid"),
    dict(top_k=2, pre_softmax=True), dict(top_k=4, num_groups=4, group_topk=2),
    dict(top_k=2, num_groups=2, group_topk=1, score_function="sigmoid", enable_expert_bias=True),
    dict(top_k=2, enable_expert_bias=True), dict(top_k=2, router_dtype="fp64"),
    dict(top_k=2, capacity_factor=0.5, drop_policy="probs"),
    dict(top_k=2, capacity_factor=0.75, drop_policy="position", score_function="sigmoid"),
    dict(top_k=2, load_balancing_type="aux_loss", aux_loss_coeff=0.3, z_loss_coeff=0.05),
    dict(top_k=2, load_balancing_type="seq_aux_loss", aux_loss_coeff=0.3, score_function="sigmoid"),
]


def _setup(overrides: dict, seed: int = 0):
    cfg = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=4, num_experts=EXPERTS, **overrides)
    gen = torch.Generator().manual_seed(seed)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=gen))
        router.expert_bias.copy_(torch.randn(EXPERTS, generator=gen) * 0.5)
    hidden = torch.randn(4, TOKENS // 4, HIDDEN, generator=gen)  # [seq, batch, hidden]
    return cfg, router, hidden


@pytest.mark.parametrize("overrides", ROUTING, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_routing_matches_reference(overrides: dict) -> None:
    cfg, router, hidden = _setup(overrides)
    fc1 = torch.zeros(EXPERTS, cfg.fc1_out, HIDDEN)
    fc2 = torch.zeros(EXPERTS, HIDDEN, 4)
    ref_weight = router.weight.detach().clone().requires_grad_(True)
    ref = dense_moe_reference(hidden, ref_weight, fc1, fc2, cfg, expert_bias=router.expert_bias)
    logits = router.logits(hidden.reshape(-1, HIDDEN))
    routing = router.route(logits, seq_length=hidden.shape[0])
    assert torch.equal(routing.logical_ids, ref.topk_ids)
    torch.testing.assert_close(routing.probs.float(), ref.probs.float(), atol=1e-6, rtol=1e-6)
    if cfg.capacity_factor is not None:
        assert torch.equal(routing.keep, ref.kept) and routing.num_dropped == ref.num_dropped > 0
    else:
        assert routing.keep is None and routing.num_dropped is None
    # Aux losses reach the router weight through the probs alone (the caller never adds them).
    (routing.probs * 0).sum().backward()
    if cfg.load_balancing_type != "none" or cfg.z_loss_coeff > 0:
        ref.aux_loss.backward()
        torch.testing.assert_close(router.weight.grad, ref_weight.grad, atol=1e-6, rtol=1e-5)
        assert abs(sum(router.last_aux_losses.values()) - float(ref.aux_loss)) < 1e-6
        assert float(router.weight.grad.abs().sum()) > 0
    else:
        assert router.last_aux_losses == {} and float(router.weight.grad.abs().sum()) == 0


def test_expert_bias_steers_selection_not_probs() -> None:
    cfg, router, hidden = _setup(dict(top_k=2, score_function="sigmoid", enable_expert_bias=True))
    logits = router.logits(hidden.reshape(-1, HIDDEN))
    with torch.no_grad():
        router.expert_bias.zero_()
        router.expert_bias[3] = 10.0  # every token now picks expert 3
    routing = router.route(logits, seq_length=hidden.shape[0])
    assert bool((routing.logical_ids == 3).any(dim=1).all())
    chosen = torch.sigmoid(logits).gather(1, routing.logical_ids)
    torch.testing.assert_close(routing.probs, chosen / chosen.sum(-1, keepdim=True))


def test_load_counts_and_single_process_bias_update() -> None:
    cfg, router, hidden = _setup(dict(top_k=2, enable_expert_bias=True, expert_bias_update_rate=0.1))
    with torch.no_grad():
        router.expert_bias.zero_()
    logits = router.logits(hidden.reshape(-1, HIDDEN))
    routing = router.route(logits, seq_length=hidden.shape[0])
    expected = torch.bincount(routing.logical_ids.flatten(), minlength=EXPERTS)
    router.route(logits, seq_length=hidden.shape[0])
    assert torch.equal(router.take_load(), 2 * expected)
    assert int(router.take_load().sum()) == 0
    router.update_expert_bias(dp_group=None)
    load = 2 * expected.double()
    torch.testing.assert_close(router.expert_bias, 0.1 * torch.sign(load.mean() - load).float())
    router.update_expert_bias(dp_group=None)  # nothing routed since: zero load, bias unchanged
    torch.testing.assert_close(router.expert_bias, 0.1 * torch.sign(load.mean() - load).float())


def test_bias_update_is_a_no_op_when_disabled() -> None:
    _, router, hidden = _setup(dict(top_k=2))
    before = router.expert_bias.clone()
    router.route(router.logits(hidden.reshape(-1, HIDDEN)), seq_length=4)
    router.update_expert_bias(dp_group=None)
    assert torch.equal(router.expert_bias, before)


def test_nonfinite_logits_are_counted_and_reported() -> None:
    assert int(count_nonfinite(torch.zeros(3, 4))) == 0 and nonfinite_error(0, 12) is None
    bad = torch.zeros(3, 4)
    bad[0, 1], bad[2, 2] = float("nan"), float("inf")
    message = nonfinite_error(int(count_nonfinite(bad)), bad.numel())
    assert message == "router logits contain NaN/inf (2 of 12)"
