"""Rebalancer: configuration errors, exact row migration, optimizer-state migration, math invariance.

Distributed cases run on gloo CPU ranks (tests/multirank.py) and compare with single-process
references written per logical expert, independently of the placement code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel import ParallelGroups, build_groups
from ep_megatron.placement import ExpertPlacement
from ep_megatron.services.migration import migrate_rows
from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer
from tests.multirank import run_ranks

# ---- a layer stand-in: stacked rows initialised by logical id, scripted loads -----------------------
ROW_SHAPES = {"w": (3, 2), "v": (5,)}


def _logical_init(layer_idx: int, logical_id: int, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * layer_idx + 10 * logical_id + len(name))
    return torch.randn(ROW_SHAPES[name], generator=gen)


def _logical_grad(layer_idx: int, logical_id: int, name: str, step: int) -> torch.Tensor:
    base = _logical_init(layer_idx, logical_id, name)
    return torch.sin(base * (step + 1) + logical_id) * (1 + layer_idx)


def _skewed_load(num_experts: int, step: int, rank: int) -> torch.Tensor:
    """``[E]`` per-rank token counts: one hot expert that drifts every 7 steps."""
    load = torch.full((num_experts,), 4 + rank, dtype=torch.int64)
    load[(step // 7) % num_experts] += 200
    load[(step // 7 + 1) % num_experts] += 60
    return load


class _StackedLayer(nn.Module):
    """Holds rows ``w [S, 3, 2]`` and ``v [S, 5]`` of the local slots; loads come from ``next_load``."""

    def __init__(self, placement: ExpertPlacement, layer_idx: int, groups: ParallelGroups) -> None:
        super().__init__()
        self.placement, self.layer_idx, self.groups = placement, layer_idx, groups
        self.ep_rank = groups.ep_rank
        self.experts = nn.Module()
        ids = placement.local_logical_ids(self.ep_rank)[layer_idx].tolist()
        for name in ROW_SHAPES:
            rows = torch.stack([_logical_init(layer_idx, e, name) for e in ids])
            self.experts.register_parameter(name, nn.Parameter(rows))
        self.next_load = torch.zeros(placement.num_logical_experts, dtype=torch.int64)

    def take_load(self) -> torch.Tensor:
        return self.next_load

    def local_ids(self) -> list[int]:
        return self.placement.local_logical_ids(self.ep_rank)[self.layer_idx].tolist()


def _fake_groups(ep_size: int) -> ParallelGroups:
    return ParallelGroups(world_size=ep_size, rank=0, ep_size=ep_size, ep_rank=0, ep_group=None,
                          edp_group=None, dp_group=None)


# ---- configuration errors (single process, before any collective) --------------------------------
@pytest.mark.parametrize("field, value", [("interval", 0), ("window", -1), ("warmup", -1),
                                          ("ranks_per_node", -2), ("planner", "random"),
                                          ("max_moved_fraction", 1.5), ("min_gain", -0.1)])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        RebalanceConfig(**{field: value})


def test_misconfiguration_raises_at_construction() -> None:
    placement = ExpertPlacement.dynamic(1, 4, 2, num_redundant=2)
    groups = _fake_groups(2)
    layers = [_StackedLayer(placement, 0, groups)]
    moe = MoELayers(layers)
    opt = torch.optim.AdamW([p for layer in layers for p in layer.parameters()])
    with pytest.raises(ValueError, match="LBFGS"):
        Rebalancer(moe, torch.optim.LBFGS(layers[0].parameters()), RebalanceConfig())
    with pytest.raises(ValueError, match="not in its param_groups"):
        Rebalancer(moe, torch.optim.AdamW([layers[0].experts.w]), RebalanceConfig())
    with pytest.raises(ValueError, match="ranks_per_node"):
        Rebalancer(moe, opt, RebalanceConfig(planner="hierarchical", ranks_per_node=3))
    with pytest.raises(ValueError, match="placement.ep_size=2 must equal groups.ep_size=3"):
        MoELayers([_StackedLayer(placement, 0, _fake_groups(3))])
    rebalancer = Rebalancer(moe, opt, RebalanceConfig())
    with pytest.raises(ValueError, match=r"load: shape \(2, 4\), expected \[L, E\] = \(1, 4\)"):
        rebalancer.step(torch.zeros(2, 4, dtype=torch.int64))
    layers[0].experts.w.grad = torch.ones_like(layers[0].experts.w)
    with pytest.raises(RuntimeError, match="not zero at the rebalance"):
        rebalancer._check_grads_zero()


# ---- exact row migration on plain tensors ---------------------------------------------------------
def _migrate_exact(seed: int) -> dict:
    """Random rows of three dtypes; a random new placement; compare with all-gathered old rows."""
    groups = build_groups(dist.get_world_size())
    ep_rank, ep_size = groups.ep_rank, groups.ep_size
    num_experts, slots_per_rank = 6, 3
    gen = torch.Generator().manual_seed(seed)
    old = ExpertPlacement.dynamic(1, num_experts, ep_size, ep_size * slots_per_rank - num_experts)
    perm = torch.randperm(old.num_slots, generator=gen)
    new = ExpertPlacement.from_plan(old.physical_to_logical[:, perm], num_experts, ep_size)
    tensors = [torch.empty(slots_per_rank, 4, 3), torch.empty(slots_per_rank, 7, dtype=torch.bfloat16),
               torch.empty(slots_per_rank, 2, dtype=torch.float64)]
    for local_slot, logical_id in enumerate(old.local_logical_ids(ep_rank)[0].tolist()):
        row_gen = torch.Generator().manual_seed(seed * 100 + logical_id)  # replicas hold equal rows
        for t in tensors:
            t[local_slot] = torch.randn(t.shape[1:], generator=row_gen, dtype=torch.float64)
    old_rows = [t.clone() for t in tensors]
    gathered = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(ep_size)]
        dist.all_gather(parts, t)
        gathered.append(parts)
    calls = []
    original = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_to_all_single = counting
    try:
        diff = old.diff(new)
        sent = migrate_rows(tensors, old.local_logical_ids(ep_rank)[0], new.local_logical_ids(ep_rank)[0],
                            diff.transfers, ep_rank, ep_size, groups.ep_group)
        calls_move = len(calls)
        same = migrate_rows(tensors, new.local_logical_ids(ep_rank)[0], new.local_logical_ids(ep_rank)[0],
                            (), ep_rank, ep_size, groups.ep_group)
    finally:
        dist.all_to_all_single = original
    new_ids = new.local_logical_ids(ep_rank)[0].tolist()
    for local_slot, logical_id in enumerate(new_ids):
        src_slot = int((old.physical_to_logical[0] == logical_id).nonzero()[0])  # any old replica
        src_rank, src_local = divmod(src_slot, slots_per_rank)
        for k in range(len(tensors)):
            got, want = tensors[k][local_slot], gathered[k][src_rank][src_local]
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (local_slot, logical_id, k)
    slot_nbytes = sum(t[0].numel() * t.element_size() for t in old_rows)
    expected_sent = slot_nbytes * sum(t.src_ep_rank == ep_rank for t in diff.transfers)
    return {"sent": sent, "expected_sent": expected_sent, "calls_move": calls_move, "same_sent": same,
            "calls_total": len(calls), "num_transfers": len(diff.transfers)}


@pytest.mark.parametrize("world_size", [2, 4])
def test_migrate_rows_exact_bytes(world_size: int) -> None:
    results = run_ranks(_migrate_exact, world_size, 3, timeout_s=90)
    assert results[0]["num_transfers"] > 0
    for r in results:
        assert r["sent"] == r["expected_sent"]
        assert r["calls_move"] == 1
        assert r["same_sent"] == 0 and r["calls_total"] == 1  # nothing to move: no collective at all


# ---- optimizer-state migration against a per-logical-expert AdamW reference --------------------------
def _adamw_fake_layers(num_steps: int, interval: int, num_experts: int, num_redundant: int,
                       ep_size: int) -> dict:
    groups = build_groups(ep_size)
    num_layers = 2
    placement = ExpertPlacement.dynamic(num_layers, num_experts, ep_size, num_redundant)
    layers = [_StackedLayer(placement, i, groups) for i in range(num_layers)]
    params = [p for layer in layers for p in layer.parameters()]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1, foreach=False)
    rebalancer = Rebalancer(MoELayers(layers), opt, RebalanceConfig(interval=interval, window=interval))
    metrics = []
    for step in range(num_steps):
        for layer in layers:
            ids = layer.local_ids()
            for name, p in layer.experts.named_parameters():
                p.grad = torch.stack([_logical_grad(layer.layer_idx, e, name, step) for e in ids])
            layer.next_load = _skewed_load(num_experts, step, groups.rank)
        opt.step()
        opt.zero_grad(set_to_none=False)
        m = rebalancer.step()
        if m is not None:
            metrics.append(m.to_dict())
    rows = {}
    for layer in layers:
        for name, p in layer.experts.named_parameters():
            state = opt.state[p]
            for local_slot, e in enumerate(layer.local_ids()):
                rows[(layer.layer_idx, e, name, local_slot)] = (
                    p.detach()[local_slot].tolist(), state["exp_avg"][local_slot].tolist(),
                    state["exp_avg_sq"][local_slot].tolist(), float(state["step"]))
    state = rebalancer.state_dict()
    state["load_window"] = state["load_window"].tolist()  # tensors do not survive the result queue
    state["since_rebalance"] = state["since_rebalance"].tolist()
    return {"rows": rows, "metrics": metrics, "state": state}


def _adamw_reference(num_steps: int, num_layers: int, num_experts: int,
                     grad_dtype: torch.dtype = torch.float32) -> dict:
    """One row per logical expert, plain AdamW (initial rows and gradients rounded to ``grad_dtype``, as
    a mixed-precision run sees them): what every replica must equal."""
    ref = {}
    for layer_idx in range(num_layers):
        for name in ROW_SHAPES:
            init = torch.stack([_logical_init(layer_idx, e, name) for e in range(num_experts)])
            p = nn.Parameter(init.to(grad_dtype).float())
            opt = torch.optim.AdamW([p], lr=0.05, weight_decay=0.1, foreach=False)
            for step in range(num_steps):
                grad = torch.stack([_logical_grad(layer_idx, e, name, step) for e in range(num_experts)])
                p.grad = grad.to(grad_dtype).float()
                opt.step()
            ref[(layer_idx, name)] = (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
    return ref


@pytest.mark.parametrize("world_size, ep_size, num_redundant", [(2, 2, 2), (4, 2, 0)])
def test_adamw_state_follows_its_expert(world_size: int, ep_size: int, num_redundant: int) -> None:
    num_steps, interval, num_experts = 23, 5, 6
    results = run_ranks(_adamw_fake_layers, world_size, num_steps, interval, num_experts, num_redundant,
                        ep_size, timeout_s=90)
    ref = _adamw_reference(num_steps, 2, num_experts)
    for r in results:
        assert len(r["metrics"]) == num_steps // interval
        assert sum(m["slots_moved"] for m in r["metrics"]) > 0  # placements really changed
        for (layer_idx, e, name, _), (param, exp_avg, exp_avg_sq, step) in r["rows"].items():
            want = ref[(layer_idx, name)]
            for got, expected in zip((param, exp_avg, exp_avg_sq), want):
                torch.testing.assert_close(torch.tensor(got), expected[e], rtol=1e-6, atol=0)
            assert step == num_steps
    m0 = results[0]["metrics"]
    for i, m in enumerate(m0):  # every rank saw the same plan and the same byte counts
        for r in results[1:]:
            assert r["metrics"][i]["slots_moved"] == m["slots_moved"]
            assert r["metrics"][i]["bytes_sent_per_rank"] == m["bytes_sent_per_rank"]
    assert m0[-1]["realized_after"] is not None and m0[0]["realized_after"] is None
    assert min(m0[-1]["planned_after"]) > min(m0[-1]["planned_before"]) or not any(m0[-1]["layers_changed"])
    state = results[0]["state"]
    assert state["step_count"] == num_steps
    assert torch.tensor(state["load_window"]).shape == (interval, 2, num_experts)
    assert not math.isnan(m0[0]["moved_fraction"])


# ---- DeepSpeed ZeRO: fp32 master rows and Adam moments through the public safe_* helpers ------------
def _deepspeed_forced_migration(stage: int, bf16: bool, steps_before: int, steps_after: int) -> dict:
    """ep_size 1 on every rank, ZeRO partitions the fp32 masters and moments over the ranks; a permuted
    placement forces local row moves through the helpers' gather (collective) and scatter."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from ep_megatron.integrations import deepspeed as ds_glue

    groups = build_groups(1)
    num_experts = 4
    placement = ExpertPlacement.dynamic(1, num_experts, 1, 2)
    layer = _StackedLayer(placement, 0, groups)
    config = {"train_batch_size": dist.get_world_size(), "zero_optimization": {"stage": stage},
              "bf16": {"enabled": bf16}, "gradient_clipping": 0.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.1, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=layer, model_parameters=layer.parameters(), config=config)
    rebalancer = Rebalancer(MoELayers([layer]), ds_glue.optimizer_rows(engine),
                            RebalanceConfig(interval=1000))

    def train(step: int) -> None:
        ids = layer.local_ids()
        loss = sum((p * torch.stack([_logical_grad(0, e, n, step) for e in ids]).to(p.dtype)).sum()
                   for n, p in layer.experts.named_parameters())
        engine.backward(loss)
        engine.step()

    for step in range(steps_before):
        train(step)
    new = ExpertPlacement.from_plan(torch.tensor([[3, 1, 0, 3, 2, 2]]), num_experts, 1)
    rebalancer.migrate_to(new)
    for step in range(steps_before, steps_before + steps_after):
        train(step)
    out = {"ids": layer.local_ids()}
    for name, p in layer.experts.named_parameters():
        out[name] = [safe_get_full_fp32_param(p).tolist(),
                     safe_get_full_optimizer_state(p, "exp_avg").tolist(),
                     safe_get_full_optimizer_state(p, "exp_avg_sq").tolist(), p.detach().float().tolist()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage, bf16", [(1, False), (2, True)])
def test_deepspeed_zero_migrates_masters_and_moments(stage: int, bf16: bool) -> None:
    steps_before, steps_after = 3, 2
    results = run_ranks(_deepspeed_forced_migration, 2, stage, bf16, steps_before, steps_after, timeout_s=240)
    ref = _adamw_reference(steps_before + steps_after, 1, 4, torch.bfloat16 if bf16 else torch.float32)
    for r in results:
        assert r["ids"] == [3, 1, 0, 3, 2, 2]
        for name in ROW_SHAPES:
            master, exp_avg, exp_avg_sq, low = (torch.tensor(t) for t in r[name])
            # DeepSpeed averages the (identical) gradients of the two data-parallel ranks.
            for got, want in zip((master, exp_avg, exp_avg_sq), ref[(0, name)]):
                torch.testing.assert_close(got, want[r["ids"]], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(low, master, rtol=1e-2 if bf16 else 0, atol=1e-2 if bf16 else 0)


# ---- math invariance: MoELayer training with and without rebalancing ------------------------------
INV_HIDDEN, INV_FFN, INV_EXPERTS, INV_LAYERS, INV_TOKENS = 8, 8, 4, 2, 16  # INV_TOKENS per rank per step


def _invariance_run(ep_size: int, strategy: str, num_redundant: int, interval: int, num_steps: int,
                    replicated: tuple[int, ...] = ()) -> dict:
    """Train ``INV_LAYERS`` residual MoE layers + linear head; returns losses and per-logical rows.

    Runs in fp64: in fp32 a replica-split expert GEMM rounds differently from the one-replica GEMM, and
    Adam amplifies that last-bit noise in near-zero elements (measured: losses within 1e-5, weights and
    moments within 2.4e-8 absolute after 50 steps), which would hide a small migration error and fail
    a relative check on near-zero moments. In fp64 both runs agree to the bit.
    """
    from ep_megatron.config import MoEConfig
    from ep_megatron.layer import MoELayer
    from ep_megatron.parallel.grad_sync import ExpertGradSync
    from ep_megatron.trainer.step import optimizer_step

    groups = build_groups(ep_size)
    config = MoEConfig(hidden_size=INV_HIDDEN, ffn_hidden_size=INV_FFN, num_experts=INV_EXPERTS, top_k=2,
                       router_dtype="fp64")
    placement = ExpertPlacement.build(strategy, INV_LAYERS, INV_EXPERTS, ep_size, num_redundant=num_redundant,
                                      replicated_experts=replicated)
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(MoELayer(config, placement, groups, i) for i in range(INV_LAYERS))
    model.head = nn.Linear(INV_HIDDEN, 1)
    model.double()
    with torch.no_grad():
        model.head.weight.copy_(torch.linspace(-1, 1, INV_HIDDEN))
        model.head.bias.zero_()
        hot_dirs = model.layers[0].router.weight.detach().clone()  # [E, hidden]: pushes tokens to expert e
        hot_dirs /= hot_dirs.norm(dim=1, keepdim=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    moe = MoELayers(model)
    sync = ExpertGradSync(moe)
    rebalancer = None
    if interval:  # the number of slots comes from the placement alone (dynamic and hybrid alike)
        rebalancer = Rebalancer(moe, optimizer, RebalanceConfig(interval=interval, window=interval))
    losses, moved = [], 0
    for step in range(num_steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(groups.world_size, INV_TOKENS, INV_HIDDEN, generator=gen, dtype=torch.float64)
        x += 3.0 * hot_dirs[(step // 6) % INV_EXPERTS]  # skewed routing that drifts
        target = torch.randn(groups.world_size, INV_TOKENS, generator=gen, dtype=torch.float64)
        hidden = x[groups.rank]
        for layer in model.layers:
            hidden = hidden + layer(hidden)[0]
        loss = (model.head(hidden).squeeze(-1) - target[groups.rank]).pow(2).mean()
        loss.backward()
        optimizer_step(moe, optimizer, sync)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / groups.world_size)
        if rebalancer is not None:
            metrics = rebalancer.step()
            moved += metrics.slots_moved if metrics is not None else 0
    rows: dict[tuple[int, int, str], list] = {}
    for layer in model.layers:
        ids = layer.placement.local_logical_ids(groups.ep_rank)[layer.layer_idx].tolist()
        for name, p in layer.experts.named_parameters():
            state = optimizer.state[p]
            for local_slot, e in enumerate(ids):
                rows.setdefault((layer.layer_idx, e, name), []).append(
                    [p.detach()[local_slot].tolist(), state["exp_avg"][local_slot].tolist(),
                     state["exp_avg_sq"][local_slot].tolist()])
    return {"losses": losses, "rows": rows, "moved": moved}


def _invariance_runs(ep_size: int, num_redundant: int, num_steps: int) -> list[dict]:
    """Static ``model``; ``dynamic`` rebalanced every 5 steps; at EP 2 also ``hybrid`` (experts 0 and 1
    on both ranks) rebalanced every 5 steps with nothing but its placement given."""
    runs = [_invariance_run(ep_size, "model", 0, 0, num_steps),
            _invariance_run(ep_size, "dynamic", num_redundant, 5, num_steps)]
    if ep_size == 2:
        runs.append(_invariance_run(ep_size, "hybrid", 0, 5, num_steps, replicated=(0, 1)))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world_size, num_redundant", [(2, 2), (4, 4)])
def test_rebalancing_keeps_training_math(world_size: int, num_redundant: int) -> None:
    num_steps = 50
    results = run_ranks(_invariance_runs, world_size, world_size, num_redundant, num_steps, timeout_s=240)
    static, *rebalanced = results[0]
    reference: dict[tuple[int, int, str], torch.Tensor] = {}
    for static_r, *_ in results:
        for key, replicas in static_r["rows"].items():
            reference[key] = torch.tensor(replicas[0])  # model placement: exactly one replica
    for k, run in enumerate(rebalanced, start=1):
        assert run["moved"] > 0  # placements really changed
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(static["losses"]),
                                   rtol=1e-5, atol=0)
        seen = set()
        for rank_runs in results:
            for key, replicas in rank_runs[k]["rows"].items():
                seen.add(key)
                for replica in replicas:
                    torch.testing.assert_close(torch.tensor(replica), reference[key], rtol=1e-5, atol=1e-10)
        assert seen == set(reference)  # every logical expert of every layer is held somewhere
    assert len(rebalanced) == (2 if world_size == 2 else 1)
