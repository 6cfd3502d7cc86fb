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

    def __init__(self, ep_size: int, groups, strategy: str, num_redundant: int) -> None:
        from ep_megatron.config import MoEConfig
        from ep_megatron.layer import MoELayer
        from ep_megatron.placement import ExpertPlacement

        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        config = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2,
                           load_balancing_type="none", sharding_strategy=strategy,
                           num_redundant_experts=num_redundant, expert_parallel_size=ep_size, seed=0)
        placement = ExpertPlacement.build(strategy, 1, EXPERTS, ep_size, num_redundant=num_redundant)
        self.moe = MoELayer(config, placement, groups, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.proj(x))[0]


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(TOKENS, HIDDEN, generator=gen), torch.randn(TOKENS, HIDDEN, generator=gen)


def _reference(world_size: int) -> tuple[TinyMoEModel, list[float]]:
    """Single-process run on all ranks' batches; returns the model and the pre-clip norms."""
    from ep_megatron.parallel import ParallelGroups

    model = TinyMoEModel(1, ParallelGroups.single(), "model", 0)
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


def _train_deepspeed(ep_size: int, stage: int, bf16: bool) -> tuple[dict, list[float]]:
    import torch.distributed as dist

    from ep_megatron.integrations import deepspeed as ds_glue
    from ep_megatron.parallel import build_groups

    groups = build_groups(ep_size)
    model = TinyMoEModel(ep_size, groups, "dynamic", 2)
    engine, *_ = ds_glue.initialize(
        model, groups, lambda pg: torch.optim.AdamW(pg, lr=LR, weight_decay=0.01), _ds_config(stage, bf16))
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
            "state": {k: v.detach().float().clone() for k, v in model.state_dict().items()}}, norms


def _run_matrix(ep_size: int, runs: list[tuple[int, bool]]) -> list:
    import torch.distributed as dist

    reference, ref_norms = _reference(dist.get_world_size())
    assert max(ref_norms) > CLIP, f"clipping must be active: reference norms {ref_norms}, CLIP={CLIP}"
    ref_state = reference.state_dict()
    errors = []
    for stage, bf16 in runs:
        got, norms = _train_deepspeed(ep_size, stage, bf16)
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


@pytest.mark.slow
def test_deepspeed_four_ranks_ep_times_edp():
    """4 ranks, EP 2 x EDP 2 with replicated experts: ZeRO 1 and 2, fp32, 1e-5."""
    _check(run_ranks(_run_matrix, 4, 2, [(1, False), (2, False)], timeout_s=160))


def test_initialize_rejects_bf16_stage0():
    from ep_megatron.integrations import deepspeed as ds_glue
    from ep_megatron.parallel import ParallelGroups

    model = TinyMoEModel(1, ParallelGroups.single(), "model", 0)
    with pytest.raises(ValueError, match="stage=0"):
        ds_glue.initialize(model, ParallelGroups.single(), None, _ds_config(0, True))
