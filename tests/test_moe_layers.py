"""``MoELayers``: one owner of a model's MoE layers and of their single placement.

Single process: equal placements built as distinct objects (what a per-layer builder such as Megatron's
spec produces) are unified and accepted by checkpoint save and load, the rebalancer and the gradient
sync; unequal placements, mixed groups or configs and misfit placements are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ep_megatron.config import MoEConfig
from ep_megatron.layer import MoELayer
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel import ParallelGroups
from ep_megatron.parallel.grad_sync import ExpertGradSync
from ep_megatron.placement import ExpertPlacement
from ep_megatron.services import checkpoint as ckpt
from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer
from ep_megatron.trainer.step import optimizer_step

HIDDEN, EXPERTS, LAYERS = 8, 4, 3
CONFIG = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=8, num_experts=EXPERTS, top_k=2,
                   sharding_strategy="dynamic", num_redundant_experts=2)


class PerLayerPlacements(nn.Module):
    """MoE layers each built with its own (equal) placement object, plus a dense head."""

    def __init__(self, config: MoEConfig = CONFIG) -> None:
        super().__init__()
        groups = ParallelGroups.single()
        self.layers = nn.ModuleList(
            MoELayer(config, config.placement(LAYERS, ep_size=1), groups, i) for i in range(LAYERS))
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)[0]
        return self.head(x)


def _train(model: PerLayerPlacements, moe: MoELayers, optimizer: torch.optim.Optimizer,
           rebalancer: Rebalancer, steps: range) -> None:
    sync = ExpertGradSync(moe)
    for step in steps:
        x = torch.randn(32, HIDDEN, generator=torch.Generator().manual_seed(step)) + 2.0
        model(x).pow(2).mean().backward()
        optimizer_step(moe, optimizer, sync, max_norm=1.0)
        rebalancer.step(moe.take_loads())


def test_equal_but_distinct_placements_are_one_for_save_load_rebalance_and_sync(tmp_path: Path) -> None:
    model = PerLayerPlacements()
    placements = [layer.placement for layer in model.layers]
    assert len({id(p) for p in placements}) == LAYERS  # distinct objects, equal values
    moe = MoELayers(model)
    assert all(layer.placement is moe.placement for layer in model.layers)
    optimizer = torch.optim.AdamW(moe.param_groups(weight_decay=0.1), lr=1e-2)
    rebalancer = Rebalancer(moe, optimizer, RebalanceConfig(interval=2, window=2))
    _train(model, moe, optimizer, rebalancer, range(2))
    # One EP rank is always balanced (the planner keeps the placement): force a migration instead.
    permuted = ExpertPlacement.from_plan(torch.tensor([[3, 0, 1, 2, 1, 0]] * LAYERS), EXPERTS, 1)
    rebalancer.migrate_to(permuted)
    assert moe.placement is permuted and all(layer.placement is permuted for layer in model.layers)
    _train(model, moe, optimizer, rebalancer, range(2, 4))
    ckpt.save_checkpoint(tmp_path, 4, moe, optimizer, rebalancer=rebalancer)

    fresh = PerLayerPlacements()
    fresh_moe = MoELayers(fresh)
    fresh_opt = torch.optim.AdamW(fresh_moe.param_groups(weight_decay=0.1), lr=1e-2)
    fresh_reb = Rebalancer(fresh_moe, fresh_opt, RebalanceConfig(interval=2, window=2))
    info = ckpt.load_checkpoint(tmp_path, fresh_moe, fresh_opt, rebalancer=fresh_reb)
    assert info["placement_restored"] and fresh_moe.placement == moe.placement
    assert all(layer.placement is fresh_moe.placement for layer in fresh.layers)
    x = torch.randn(16, HIDDEN)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert fresh_reb.step_count == rebalancer.step_count == 4


def test_owner_refuses_what_is_not_one_model() -> None:
    groups = ParallelGroups.single()
    model = PerLayerPlacements()
    other = ExpertPlacement.from_plan(torch.tensor([[1, 0, 2, 3, 0, 1]] * LAYERS), EXPERTS, 1)
    model.layers[1].placement = other
    with pytest.raises(ValueError, match="layers.1: its placement differs"):
        MoELayers(model)
    with pytest.raises(ValueError, match=r"placement row 0..2, got layer_idx \[0, 2\]"):
        MoELayers([PerLayerPlacements().layers[i] for i in (0, 2)])
    mixed = PerLayerPlacements()
    mixed.layers[2] = MoELayer(MoEConfig(**{**CONFIG.__dict__, "top_k": 1}),
                               CONFIG.placement(LAYERS, 1), groups, 2)
    with pytest.raises(ValueError, match="layers.2: its MoEConfig differs"):
        MoELayers(mixed)
    with pytest.raises(ValueError, match="no MoE layer found"):
        MoELayers(nn.Linear(2, 2))
    moe = MoELayers(PerLayerPlacements())
    with pytest.raises(ValueError, match=r"does not fit the layers' \(3, 4, 1, 6\)"):
        moe.set_placement(ExpertPlacement.build("model", LAYERS, EXPERTS, 1))
    with pytest.raises(ValueError, match="dense parameters are unknown"):
        MoELayers(list(PerLayerPlacements().layers)).dense_params()


def test_owner_facts_param_groups_owner_mask_and_one_load_drain() -> None:
    model = PerLayerPlacements()
    moe = MoELayers(model)
    expert = {id(p) for p in moe.expert_params()}
    assert len(expert) == 2 * LAYERS and not any(id(p) in expert for p in moe.dense_params())
    groups = moe.param_groups(weight_decay=0.1)
    assert [g["name"] for g in groups] == ["dense", "dense_no_decay", "experts"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1]
    # 6 slots for 4 experts: slots 4 and 5 replicate experts 0 and 1; owners alternate over replicas
    # (expert e is owned by its replica e mod 2): expert 0 by slot 0, expert 1 by slot 5
    assert moe.owner_mask().tolist() == [[True, False, True, True, False, True]] * LAYERS
    model(torch.randn(10, HIDDEN))
    loads = moe.take_loads()
    assert loads.shape == (LAYERS, EXPERTS) and loads.sum(1).tolist() == [20] * LAYERS
    assert moe.take_loads().sum() == 0  # drained once
    moe.set_aux_loss_scale(0.25)
    assert all(layer.router.aux_loss_scale == 0.25 for layer in model.layers)
