"""MoELayer vs the dense reference (tests/reference.py) on 1, 2 and 4 gloo ranks, every strategy.

Each rank routes its own tokens; the loss is ``sum_r (output_r * g_r).sum()``, so the reference is run
once per rank's tokens and its gradients add up. Expert gradients are compared per **logical** expert,
summed over all replicas on all ranks (no grad sync needed). One launch checks many configurations.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ep_megatron.config import MoEConfig
from ep_megatron.layer import MoELayer, expert_init
from ep_megatron.parallel import ParallelGroups, build_groups
from ep_megatron.placement import ExpertPlacement
from tests.multirank import run_ranks
from tests.reference import dense_moe_reference

HIDDEN, FFN, EXPERTS, TOKENS = 8, 12, 8, 12
TOL = dict(atol=1e-5, rtol=1e-5)
STRATEGIES = ("data", "data_spread", "model", "hybrid", "dynamic", "dynamic_plan")
HOT_PLAN = [0, 0, 1, 2, 3, 0, 4, 5, 6, 7, 1, 2]  # 12 slots; expert 0 has 3 replicas, two on one rank


def make_config(**overrides: Any) -> MoEConfig:
    base = dict(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2)
    return MoEConfig(**{**base, **overrides})


def make_placement(strategy: str, ep_size: int) -> ExpertPlacement:
    if strategy in ("data", "data_spread"):
        return ExpertPlacement.data(1, EXPERTS, ep_size)
    if strategy == "hybrid":
        return ExpertPlacement.hybrid(1, EXPERTS, ep_size, replicated_experts=(0, 3, 5, 6))
    if strategy == "dynamic":
        return ExpertPlacement.dynamic(1, EXPERTS, ep_size, num_redundant=4)
    if strategy == "dynamic_plan":
        return ExpertPlacement.from_plan(torch.tensor([HOT_PLAN]), EXPERTS, ep_size)
    return ExpertPlacement.model(1, EXPERTS, ep_size)


def make_weights(cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Test-owned logical weights (not the layer's init): router, experts, shared expert."""
    gen = torch.Generator().manual_seed(1234)
    weights = {
        "router_weight": torch.randn(EXPERTS, HIDDEN, generator=gen),
        "expert_fc1": torch.randn(EXPERTS, cfg.fc1_out, HIDDEN, generator=gen) * 0.3,
        "expert_fc2": torch.randn(EXPERTS, HIDDEN, FFN, generator=gen) * 0.3,
        "expert_bias": torch.randn(EXPERTS, generator=gen) * 0.2 if cfg.enable_expert_bias else None,
    }
    if cfg.shared_expert_ffn_size:
        fc1_out = cfg.shared_expert_ffn_size * (2 if cfg.activation == "swiglu" else 1)
        weights["shared_fc1"] = torch.randn(fc1_out, HIDDEN, generator=gen) * 0.3
        weights["shared_fc2"] = torch.randn(HIDDEN, cfg.shared_expert_ffn_size, generator=gen) * 0.3
    skew = weights["router_weight"].clone()  # skewed routing: feature 0 is large, only experts 0, 1 like it
    skew[:, 0] = -3.0
    skew[0, 0], skew[1, 0] = 3.0, 2.9
    weights["skew_router_weight"] = skew
    return weights


def make_tokens(rank: int, skewed: bool,
                shape: tuple[int, ...] = (TOKENS, HIDDEN)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(*shape, generator=gen)
    if skewed:
        x[..., 0] = x[..., 0].abs() + 4.0
    return x, torch.randn(*shape, generator=gen)


def load_weights(layer: MoELayer, weights: dict[str, torch.Tensor], skewed: bool) -> None:
    with torch.no_grad():
        layer.router.weight.copy_(weights["skew_router_weight" if skewed else "router_weight"])
        if weights["expert_bias"] is not None:
            layer.router.expert_bias.copy_(weights["expert_bias"])
        logical = layer.placement.local_logical_ids(layer.groups.ep_rank)[layer.layer_idx]
        layer.experts.fc1_weight.copy_(weights["expert_fc1"][logical])
        layer.experts.fc2_weight.copy_(weights["expert_fc2"][logical])
        if layer.shared_experts is not None:
            layer.shared_experts.fc1_weight.copy_(weights["shared_fc1"])
            layer.shared_experts.fc2_weight.copy_(weights["shared_fc2"])


def _all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


def check_against_reference(cfg: MoEConfig, strategy: str, groups: ParallelGroups, skewed: bool,
                            shape: tuple[int, ...] = (TOKENS, HIDDEN)) -> dict[str, Any]:
    """One forward/backward of the layer and of the reference on every rank's tokens; asserts equality."""
    if strategy == "data_spread":
        cfg = dataclasses.replace(cfg, prefer_local_replica=False)
    placement = make_placement(strategy, groups.ep_size)
    layer = MoELayer(cfg, placement, groups)
    weights = make_weights(cfg)
    load_weights(layer, weights, skewed)
    x, g = make_tokens(groups.rank, skewed, shape)
    x.requires_grad_(True)
    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    (out * g).sum().backward()

    logical = placement.local_logical_ids(groups.ep_rank)[0]
    grads = {"router_weight": layer.router.weight.grad.clone()}
    for name, param in (("expert_fc1", layer.experts.fc1_weight), ("expert_fc2", layer.experts.fc2_weight)):
        assert param.grad is not None, f"{name} has no gradient on rank {groups.rank}"
        grads[name] = torch.zeros_like(weights[name]).index_add(0, logical, param.grad)
    if layer.shared_experts is not None:
        grads["shared_fc1"] = layer.shared_experts.fc1_weight.grad.clone()
        grads["shared_fc2"] = layer.shared_experts.fc2_weight.grad.clone()
    for t in grads.values():
        _all_reduce(t, groups.world_size)

    ref_params = {k: v.clone().requires_grad_(True) for k, v in weights.items()
                  if v is not None and k not in ("expert_bias", "router_weight", "skew_router_weight")}
    ref_params["router_weight"] = weights["skew_router_weight" if skewed else "router_weight"].clone()
    ref_params["router_weight"].requires_grad_(True)
    ref_x_grad, dropped, ref_out = None, 0, None
    for rank in range(groups.world_size):
        xr, gr = make_tokens(rank, skewed, shape)
        xr.requires_grad_(True)
        ref = dense_moe_reference(xr, expert_bias=weights["expert_bias"], config=cfg, **ref_params)
        ((ref.output * gr).sum() + ref.aux_loss).backward()
        if rank == groups.rank:
            ref_x_grad, dropped, ref_out = xr.grad, ref.num_dropped, ref.output.detach()
    label = f"{strategy} ep={groups.ep_size} world={groups.world_size} skewed={skewed} cfg={cfg}"
    torch.testing.assert_close(out.detach(), ref_out, **TOL, msg=lambda m: f"output {label}: {m}")
    torch.testing.assert_close(x.grad, ref_x_grad, **TOL, msg=lambda m: f"input grad {label}: {m}")
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_params[name].grad, **TOL,
                                   msg=lambda m, n=name: f"{n} {label}: {m}")
    assert layer.last_dropped_tokens == dropped, (layer.last_dropped_tokens, dropped, label)
    empty = bool(layer.experts.fc1_weight.grad.abs().sum() == 0)
    return {"dropped": dropped, "empty_rank": empty, "aux": dict(layer.last_aux_losses)}


MATRIX = [(strategy, top_k, score, skewed) for strategy in STRATEGIES for top_k in (1, 2)
          for score in ("softmax", "sigmoid") for skewed in (False, True)]


def run_matrix(groups: ParallelGroups) -> list[bool]:
    """The strategy x top-k x score-function x skew matrix; returns which runs left this rank empty."""
    empties = []
    for strategy, top_k, score, skewed in MATRIX:
        cfg = make_config(top_k=top_k, score_function=score)
        empties.append(check_against_reference(cfg, strategy, groups, skewed)["empty_rank"])
    return empties


FEATURES = [
    dict(pre_softmax=True),
    dict(num_groups=4, group_topk=2, top_k=2),
    dict(load_balancing_type="aux_loss", aux_loss_coeff=0.1, z_loss_coeff=0.01),
    dict(load_balancing_type="seq_aux_loss", aux_loss_coeff=0.1, score_function="sigmoid"),
    dict(enable_expert_bias=True, score_function="sigmoid"),
    dict(enable_expert_bias=True, top_k=1),
    dict(activation="gelu", shared_expert_ffn_size=6),
    dict(shared_expert_ffn_size=6, router_dtype="fp64"),
    dict(capacity_factor=1.0, drop_policy="probs"),
    dict(capacity_factor=0.5, drop_policy="position", top_k=1),
]


def run_features(groups: ParallelGroups) -> list[int]:
    """Every routing / loss / capacity feature on two placements, ``[seq, batch, hidden]`` input."""
    dropped = []
    for overrides in FEATURES:
        for strategy in ("model", "dynamic_plan"):
            cfg = make_config(**overrides)
            result = check_against_reference(cfg, strategy, groups, skewed=True, shape=(4, 3, HIDDEN))
            if "aux_loss_coeff" in overrides:
                assert result["aux"], f"aux losses not reported for {overrides}"
            dropped.append(result["dropped"])
    return dropped


def _two_ranks() -> dict[str, Any]:
    groups = build_groups(2)
    return {"empties": run_matrix(groups), "dropped": run_features(groups)}


def _four_ranks() -> dict[str, Any]:
    ep4 = build_groups(4)
    ep2 = build_groups(2)  # EP 2 x DP 2
    return {"ep4": run_matrix(ep4), "ep2dp2": run_matrix(ep2)}


def test_single_rank_matches_reference() -> None:
    empties = run_matrix(ParallelGroups.single())
    assert not any(empties)
    run_features(ParallelGroups.single())


def test_two_ranks_match_reference() -> None:
    results = run_ranks(_two_ranks, 2, timeout_s=240)
    model_skewed = [i for i, (s, _, _, skewed) in enumerate(MATRIX) if s == "model" and skewed]
    assert all(results[1]["empties"][i] for i in model_skewed), "skewed model routing must leave rank 1 empty"
    dropped = results[0]["dropped"]
    assert dropped[-1] > 0 and dropped[-3] > 0, f"capacity runs must drop tokens: {dropped}"


def test_four_ranks_ep4_and_ep2_dp2_match_reference() -> None:
    results = run_ranks(_four_ranks, 4, timeout_s=300)
    model_skewed = [i for i, (s, _, _, skewed) in enumerate(MATRIX) if s == "model" and skewed]
    for rank in (1, 2, 3):
        assert all(results[rank]["ep4"][i] for i in model_skewed), f"rank {rank} should receive no tokens"


# ---- bad input, expert bias, init ------------------------------------------------------------------
def _bad_input() -> dict[str, str]:
    groups = build_groups(2)
    cfg = make_config()
    layer = MoELayer(cfg, make_placement("model", 2), groups)
    messages = {}
    cases = {
        "hidden_all": lambda r: torch.randn(TOKENS, HIDDEN + 1),
        "hidden_rank1": lambda r: torch.randn(TOKENS, HIDDEN + (r == 1)),
        "nan_rank0": lambda r: torch.randn(TOKENS, HIDDEN) * (float("nan") if r == 0 else 1.0),
    }
    for name, make in cases.items():
        try:
            layer(make(groups.rank))
        except (ValueError, RuntimeError) as exc:
            messages[name] = f"{type(exc).__name__}: {exc}"
        else:
            messages[name] = "no error"
        out, _ = layer(torch.randn(TOKENS, HIDDEN))  # collectives are still in step afterwards
        assert torch.isfinite(out).all()
    try:
        MoELayer(cfg, make_placement("model", 4), groups)
    except ValueError as exc:
        messages["placement"] = str(exc)
    return messages


def test_bad_input_raises_on_every_rank() -> None:
    results = run_ranks(_bad_input, 2, timeout_s=120)
    for rank, messages in enumerate(results):
        assert messages["hidden_all"].startswith("ValueError"), messages
        assert "config.hidden_size=8" in messages["hidden_all"], messages
        expected = "ValueError" if rank == 1 else "RuntimeError"
        assert messages["hidden_rank1"].startswith(expected), messages
        assert messages["nan_rank0"].startswith("RuntimeError"), messages
        assert ("NaN" in messages["nan_rank0"]) == (rank == 0), messages
        assert "placement.ep_size=4" in messages["placement"] and "ep_size=2" in messages["placement"]
    with pytest.raises(ValueError, match="top_k=9 must be in"):
        make_config(top_k=9)


def _bad_input_in_one_ep_group_of_ep2_dp2() -> tuple[str, float]:
    """EP 2 x DP 2: rank 3 feeds NaN, so its EP group (ranks 2, 3) raises inside the layer and leaves (its
    process group is torn down, as when the rank exits); ranks 0 and 1 finish the layer and enter the
    step's data-parallel all-reduce, which must fail rather than wait. Returns (error, seconds)."""
    groups = build_groups(2)
    layer = MoELayer(make_config(), make_placement("model", 2), groups)
    x = torch.randn(TOKENS, HIDDEN) * (float("nan") if groups.rank == 3 else 1.0)
    started = time.monotonic()
    try:
        out, _ = layer(x)
        dist.all_reduce(out.detach().sum().reshape(1), group=groups.dp_group)
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - started
    return "no error", time.monotonic() - started


def test_bad_input_in_one_ep_group_fails_every_rank_without_hanging() -> None:
    results = run_ranks(_bad_input_in_one_ep_group_of_ep2_dp2, 4, timeout_s=120)
    for rank, (message, seconds) in enumerate(results):
        assert message.startswith("RuntimeError"), (rank, message)
        assert seconds < 60, f"rank {rank} waited {seconds:.0f}s before failing"
    assert "NaN" in results[3][0] and "expert-parallel rank(s) [1] got bad input" in results[2][0]


def _expert_bias_update() -> dict[str, Any]:
    groups = build_groups(2)
    cfg = make_config(enable_expert_bias=True, expert_bias_update_rate=0.01, score_function="sigmoid")
    layer = MoELayer(cfg, make_placement("dynamic", 2), groups)
    x, _ = make_tokens(groups.rank, skewed=groups.rank == 0)
    layer(x)
    load = layer.take_load()
    assert int(load.sum()) == TOKENS * cfg.top_k and int(layer.take_load().sum()) == 0
    layer.update_expert_bias()
    return {"load": load, "bias": layer.router.expert_bias.clone()}


def test_expert_bias_update_uses_global_load() -> None:
    results = run_ranks(_expert_bias_update, 2, timeout_s=120)
    global_load = results[0]["load"] + results[1]["load"]
    expected = 0.01 * torch.sign(global_load.double().mean() - global_load.double()).float()
    for result in results:
        torch.testing.assert_close(result["bias"], expected)


def test_init_is_by_logical_id_whatever_the_placement() -> None:
    cfg = make_config(shared_expert_ffn_size=4)
    reference_router = None
    for layer_idx in (0, 1):
        expected = [expert_init(cfg, layer_idx, e) for e in range(EXPERTS)]
        for strategy in STRATEGIES[1:]:
            for ep_size in (1, 2, 4):
                one_layer = make_placement(strategy, ep_size)
                placement = ExpertPlacement(one_layer.physical_to_logical.expand(2, -1), EXPERTS, ep_size)
                for ep_rank in range(ep_size):
                    groups = ParallelGroups(world_size=ep_size, rank=ep_rank, ep_size=ep_size,
                                            ep_rank=ep_rank, ep_group=None, edp_group=None, dp_group=None)
                    layer = MoELayer(cfg, placement, groups, layer_idx)
                    for local_slot, e in enumerate(placement.local_logical_ids(ep_rank)[layer_idx].tolist()):
                        assert torch.equal(layer.experts.fc1_weight[local_slot], expected[e][0])
                        assert torch.equal(layer.experts.fc2_weight[local_slot], expected[e][1])
                    router = (layer_idx, layer.router.weight.detach())
                    if reference_router is None or reference_router[0] != layer_idx:
                        reference_router = router
                    assert torch.equal(router[1], reference_router[1])
                    for p in layer.experts.parameters():
                        assert p.allreduce is False and p.group_name == f"ep_size_{ep_size}"
    assert not torch.equal(expert_init(cfg, 0, 0)[0], expert_init(cfg, 1, 0)[0])
    assert not torch.equal(expert_init(cfg, 0, 0)[0], expert_init(cfg, 0, 1)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_per_slot_loop(dtype: torch.dtype) -> None:
    """The ``torch._grouped_mm`` path (aligned widths, rows as they are) equals the per-slot loop,
    forward and backward, with empty slots and row counts that are not a multiple of 16."""
    from ep_megatron.layer.experts import GroupedExperts, grouped_mm_supported

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2)
    experts = GroupedExperts(cfg, 4, group_name="ep_size_1").to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    if not grouped_mm_supported(torch.zeros(1, 16, dtype=dtype), (experts.fc1_weight, experts.fc2_weight)):
        pytest.skip(f"torch._grouped_mm has no CPU {dtype} kernel in torch {torch.__version__}")
    for counts in ([3, 0, 5, 2], [0, 0, 0, 0], [13, 0, 0, 4]):
        results = []
        offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
        for path in (lambda r: experts.grouped(r, offsets), lambda r: experts.per_slot(r, counts)):  # noqa: B023
            experts.zero_grad(set_to_none=True)
            rows = torch.randn(sum(counts), 16, generator=torch.Generator().manual_seed(4)).to(dtype)
            rows.requires_grad_(True)
            out = path(rows)
            out.float().sum().backward()
            results.append((out.detach(), rows.grad, experts.fc1_weight.grad, experts.fc2_weight.grad))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_grouped_gemm_gate_checks_version_device_and_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate follows the torch version and the device's compute capability, and needs one dtype for
    rows and weights and 16-byte aligned widths."""
    from ep_megatron.layer import experts as experts_module

    rows, weights = torch.zeros(2, 16), (torch.zeros(2, 32, 16), torch.zeros(2, 16, 16))
    supported = experts_module.grouped_mm_supported
    monkeypatch.setattr(experts_module, "_torch_version", lambda: (2, 8))
    assert not supported(rows, weights), "torch 2.8 has no CPU kernel"
    monkeypatch.setattr(experts_module, "_torch_version", lambda: (2, 9))
    assert supported(rows, weights) == hasattr(torch, "_grouped_mm")
    assert not supported(rows.double(), tuple(w.double() for w in weights)), "fp64 has no kernel"
    assert not supported(rows.bfloat16(), weights), "rows and weights must share a dtype"
    assert not supported(rows[:, :6], (weights[0][:, :, :6], weights[1])), "6 fp32 columns are not aligned"

    class FakeCuda(torch.Tensor):
        is_cuda = True

    def cuda_rows(dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(2, 16, dtype=dtype).as_subclass(FakeCuda)

    def cuda_weights(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return tuple(w.to(dtype).as_subclass(FakeCuda) for w in weights)

    for version, capability, dtype, expected in [((2, 8), (9, 0), torch.bfloat16, True),
                                                 ((2, 8), (10, 0), torch.bfloat16, False),
                                                 ((2, 9), (10, 0), torch.bfloat16, True),
                                                 ((2, 11), (8, 0), torch.bfloat16, False),
                                                 ((2, 11), (9, 0), torch.float32, False),
                                                 ((2, 7), (9, 0), torch.bfloat16, False)]:
        monkeypatch.setattr(experts_module, "_torch_version", lambda v=version: v)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        got = supported(cuda_rows(dtype), cuda_weights(dtype))
        assert got == (expected and hasattr(torch, "_grouped_mm")), (version, capability, dtype)
