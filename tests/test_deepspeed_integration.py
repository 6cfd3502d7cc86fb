"""DeepSpeed ZeRO 0/1/2 with our MoE layer == plain AdamW on a single-process reference, clipping active.

The reference is one process with expert-parallel size 1 (every logical expert held once) trained on the
concatenated batches of all ranks, clipped with ``torch.nn.utils.clip_grad_norm_``: it shares no code with
the replica sum, DeepSpeed's expert-data-parallel reduction or our norm.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.multirank import run_ranks

pytest.importorskip("deepspeed")

HIDDEN, FFN, EXPERTS, TOKENS, STEPS, LR, CLIP = 8, 16, 4, 16, 3, 1e-2, 3e-4


class TinyMoEModel(nn.Module):
    """Dense projection, then our MoE layer: ``[tokens, hidden] -> [tokens, hidden]``."""

    def __init__(self, ep_size: int, groups, strategy: str, num_redundant: int, skew: bool = False) -> None:
        from ep_megatron.config import MoEConfig
        from ep_megatron.layer import MoELayer
        from ep_megatron.placement import ExpertPlacement

        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        config = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2,
                           load_balancing_type="none", sharding_strategy=strategy,
                           num_redundant_experts=num_redundant, seed=0)
        placement = ExpertPlacement.build(strategy, 1, EXPERTS, ep_size, num_redundant=num_redundant)
        self.moe = MoELayer(config, placement, groups, 0)
        if skew:  # every token routes to logical experts 0 and 1 (both on EP rank 0 under "model")
            with torch.no_grad():
                self.proj.bias[0] = 10.0
                self.moe.router.weight[:, 0] = torch.tensor([5.0, 5.0, -5.0, -5.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.proj(x))[0]


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(TOKENS, HIDDEN, generator=gen), torch.randn(TOKENS, HIDDEN, generator=gen)


def _reference(world_size: int, skew: bool = False) -> tuple[TinyMoEModel, list[float]]:
    """Single-process run on all ranks' batches; returns the model and the pre-clip norms."""
    from ep_megatron.parallel import ParallelGroups

    model = TinyMoEModel(1, ParallelGroups.single(), "model", 0, skew)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    norms = []
    for step in range(STEPS):
        losses = [((model(x) - y) ** 2).mean() for x, y in (_batch(r, step) for r in range(world_size))]
        torch.stack(losses).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad()
    return model, norms


def _ds_config(stage: int, bf16: bool) -> dict:
    zero = {"stage": stage}
    if stage > 0:
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
            "zero_allow_untested_optimizer": True, "zero_optimization": zero, "bf16": {"enabled": bf16},
            "steps_per_print": 10**6}


def _train_deepspeed(ep_size: int, stage: int, bf16: bool, skew: bool = False) -> tuple[dict, list[float]]:
    import torch.distributed as dist

    from ep_megatron.integrations import deepspeed as ds_glue
    from ep_megatron.layer.moe_layers import MoELayers
    from ep_megatron.parallel import build_groups

    groups = build_groups(ep_size)
    model = TinyMoEModel(ep_size, groups, "model" if skew else "dynamic", 0 if skew else 2, skew)
    engine, *_ = ds_glue.initialize(
        MoELayers(model), lambda pg: torch.optim.AdamW(pg, lr=LR, weight_decay=0.01), _ds_config(stage, bf16))
    norms = []
    for step in range(STEPS):
        x, y = _batch(dist.get_rank(), step)
        dtype = torch.bfloat16 if bf16 else torch.float32
        loss = ((engine(x.to(dtype)).float() - y) ** 2).mean()
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    placement = model.moe.placement
    return {"logical_ids": placement.local_logical_ids(groups.ep_rank)[0].tolist(),
            "expert_rows": model.moe.last_expert_rows,
            "state": {k: v.detach().float().clone() for k, v in model.state_dict().items()}}, norms


def _run_matrix(ep_size: int, runs: list[tuple[int, bool]], skew: bool = False) -> list:
    import torch.distributed as dist

    reference, ref_norms = _reference(dist.get_world_size(), skew)
    assert max(ref_norms) > CLIP, f"clipping must be active: reference norms {ref_norms}, CLIP={CLIP}"
    ref_state = reference.state_dict()
    errors = []
    for stage, bf16 in runs:
        got, norms = _train_deepspeed(ep_size, stage, bf16, skew)
        if skew and dist.get_rank() == 1 and got["expert_rows"] != 0:
            errors.append(f"skewed routing must leave EP rank 1 without rows, got {got['expert_rows']}")
        atol = 3e-2 if bf16 else 1e-5
        for name, value in got["state"].items():
            if name.startswith("moe.experts."):
                expected = ref_state[name][got["logical_ids"]]  # reference slot e holds logical expert e
            else:
                expected = ref_state[name]
            if not torch.allclose(value, expected.float(), atol=atol, rtol=atol):
                err = (value - expected).abs().max()
                errors.append(f"stage={stage} bf16={bf16} {name}: max err {err:.3g}")
        if not torch.allclose(torch.tensor(norms), torch.tensor(ref_norms), rtol=5e-2 if bf16 else 1e-5):
            errors.append(f"stage={stage} bf16={bf16} norms {norms} != reference {ref_norms}")
    return errors


def _check(results: list) -> None:
    for rank, errors in enumerate(results):
        assert not errors, f"rank {rank}: " + "\n".join(errors)


def test_deepspeed_two_ranks_zero012_and_bf16():
    """2 ranks, EP 2 with replicated experts: ZeRO 0/1/2 fp32 (1e-5) and ZeRO-1 bf16."""
    _check(run_ranks(_run_matrix, 2, 2, [(0, False), (1, False), (2, False), (1, True)], timeout_s=140))


def test_deepspeed_rank_without_tokens_still_syncs_its_replica_grads():
    """All tokens route to experts held by EP rank 0: rank 1's experts compute no row, yet its gradient
    hooks fire in the same order as rank 0's (no hang) and ZeRO-2 matches the reference (1e-5)."""
    _check(run_ranks(_run_matrix, 2, 2, [(2, False)], True, timeout_s=120))


@pytest.mark.slow
def test_deepspeed_four_ranks_ep_times_edp():
    """4 ranks, EP 2 x EDP 2 with replicated experts: ZeRO 1 and 2, fp32, 1e-5."""
    _check(run_ranks(_run_matrix, 4, 2, [(1, False), (2, False)], timeout_s=160))


def test_initialize_rejects_bf16_stage0():
    from ep_megatron.integrations import deepspeed as ds_glue
    from ep_megatron.layer.moe_layers import MoELayers
    from ep_megatron.parallel import ParallelGroups

    model = TinyMoEModel(1, ParallelGroups.single(), "model", 0)
    with pytest.raises(ValueError, match="stage=0"):
        ds_glue.initialize(MoELayers(model), None, _ds_config(0, True))


def _adamw(param_groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=LR)


def _zero_full_state(model: TinyMoEModel, groups) -> dict[str, torch.Tensor]:
    """Every fp32 master and Adam moment of ``model`` under ZeRO, experts as ``[E, ...]`` by logical id."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    logical_ids = model.moe.placement.local_logical_ids(groups.ep_rank)[0].tolist()
    state = {}
    for name, param in model.named_parameters():
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            if kind == "fp32":
                full = safe_get_full_fp32_param(param)
            else:
                full = safe_get_full_optimizer_state(param, kind)
            if name.startswith("moe.experts."):
                rows = {e: full[slot] for slot, e in enumerate(logical_ids)}  # a rank may hold only some
                for e, row in sorted(rows.items()):
                    state[f"{name}.{kind}[{e}]"] = row.clone()
            else:
                state[f"{name}.{kind}"] = full.clone()
    return state


def _zero_checkpoint_round_trip(root: str, bf16: bool) -> list[str]:
    """Save after 3 ZeRO-2 steps at EP 2 (dynamic, 2 replicas); load into a fresh ZeRO-1 engine at EP 1 x
    EDP 2 that has never stepped; every master and moment of every logical expert must be equal."""
    import torch.distributed as dist

    from ep_megatron.integrations import deepspeed as ds_glue
    from ep_megatron.layer.moe_layers import MoELayers
    from ep_megatron.parallel import build_groups
    from ep_megatron.services.checkpoint import load_checkpoint, save_checkpoint

    groups = build_groups(2)
    model = TinyMoEModel(2, groups, "dynamic", 2)
    moe = MoELayers(model)
    engine, *_ = ds_glue.initialize(moe, _adamw, _ds_config(2, bf16), weight_decay=0.01)
    dtype = torch.bfloat16 if bf16 else torch.float32
    for step in range(3):
        x, y = _batch(dist.get_rank(), step)
        engine.backward(((engine(x.to(dtype)).float() - y) ** 2).mean())
        engine.step()
    saved = _zero_full_state(model, groups)
    save_checkpoint(root, 3, moe, ds_glue.checkpoint_optimizer(engine))

    groups = build_groups(1)
    fresh = TinyMoEModel(1, groups, "model", 0)
    torch.nn.init.zeros_(fresh.proj.weight)
    fresh_moe = MoELayers(fresh)
    engine, *_ = ds_glue.initialize(fresh_moe, _adamw, _ds_config(1, bf16), weight_decay=0.01)
    load_checkpoint(root, fresh_moe, ds_glue.checkpoint_optimizer(engine))
    loaded = _zero_full_state(fresh, groups)
    errors = [f"{key}: max err {(loaded[key] - value).abs().max():.3g}" for key, value in saved.items()
              if not torch.equal(loaded[key], value)]
    steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    if steps != {3.0}:
        errors.append(f"base optimizer step after load: {steps}, expected {{3.0}}")
    x, y = _batch(dist.get_rank(), 3)
    engine.backward(((engine(x.to(dtype)).float() - y) ** 2).mean())
    engine.step()  # the loaded state is live: the engine steps on from it
    return errors


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_zero_optimizer_state_checkpoint_resumes_under_another_layout_and_stage(tmp_path, bf16):
    _check(run_ranks(_zero_checkpoint_round_trip, 2, str(tmp_path / "ckpt"), bf16, timeout_s=150))
