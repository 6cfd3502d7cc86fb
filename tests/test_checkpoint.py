"""Layout-free checkpoints: save under one expert-parallel layout, load under others.

Three multi-rank launches share one checkpoint (module-scoped fixture):
- (EP 2, ``model``) on 2 ranks trains 20 steps, saving at step 10;
- (EP 4, ``dynamic`` with 4 redundant slots) on 4 ranks loads step 10: same logits, and steps 11-20
  reproduce the uninterrupted losses (optimizer state included);
- (EP 1, ``data``) on 2 ranks loads step 10: same logits; Megatron-Core's own loader reads the expert
  and router tensors with the values the saving run held.
Single-process tests cover DeepSpeed files, consolidated export, the CLI, damage detection, config
mismatch and a save killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ep_megatron.config import MoEConfig
from ep_megatron.layer import MoELayer
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel import ParallelGroups, build_groups
from ep_megatron.parallel.grad_sync import ExpertGradSync
from ep_megatron.placement import ExpertPlacement
from ep_megatron.services import checkpoint as ckpt
from ep_megatron.services.checkpoint.files import file_entries
from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer
from ep_megatron.trainer.ckpt_cli import add_ckpt_subcommands
from ep_megatron.trainer.step import optimizer_step
from tests.multirank import run_ranks

HIDDEN, FFN, NUM_EXPERTS, NUM_LAYERS, VOCAB = 16, 8, 4, 2, 32
GLOBAL_BATCH, SEQ = 8, 6  # sequences per step, split over data-parallel ranks
SAVE_STEP, LAST_STEP = 10, 20
EVAL_STEP = 1000  # batch seed of the logits comparison


def moe_config(hidden: int = HIDDEN, num_experts: int = NUM_EXPERTS, strategy: str = "model",
               num_redundant: int = 0) -> MoEConfig:
    return MoEConfig(hidden_size=hidden, ffn_hidden_size=FFN, num_experts=num_experts, top_k=2,
                     enable_expert_bias=True, expert_bias_update_rate=1e-2, init_std=0.3,
                     sharding_strategy=strategy, num_redundant_experts=num_redundant)


class TinyMoE(nn.Module):
    """Embedding, ``NUM_LAYERS`` residual MoE layers, linear head: ``tokens [batch, seq] -> logits``."""

    def __init__(self, config: MoEConfig, placement: ExpertPlacement, groups: ParallelGroups,
                 num_layers: int = NUM_LAYERS) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, VOCAB)
        with torch.no_grad():
            for param in (self.embed.weight, self.head.weight, self.head.bias):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        self.layers = nn.ModuleList(MoELayer(config, placement, groups, i) for i in range(num_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens).transpose(0, 1)  # [seq, batch, hidden]
        for layer in self.layers:
            hidden = hidden + layer(hidden)[0]
        return self.head(hidden).transpose(0, 1)  # [batch, seq, vocab]


def batch(step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share ``[GLOBAL_BATCH / world_size, SEQ + 1]`` of step ``step``'s global batch."""
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    per_rank = GLOBAL_BATCH // world_size
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def build(strategy: str, ep_size: int, num_redundant: int = 0):
    groups = build_groups(ep_size)
    config = moe_config(strategy=strategy, num_redundant=num_redundant)
    model = TinyMoE(config, config.placement(NUM_LAYERS, ep_size), groups)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return groups, config, MoELayers(model), optimizer


def train_step(moe: MoELayers, optimizer: torch.optim.Optimizer, sync: ExpertGradSync, step: int) -> float:
    """One step on the global batch; returns the global mean loss."""
    groups = moe.groups
    tokens = batch(step, groups.rank, groups.world_size)
    logits = moe.model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer_step(moe, optimizer, sync)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / groups.world_size


def eval_logits(model: TinyMoE, groups: ParallelGroups) -> torch.Tensor:
    """``[GLOBAL_BATCH, SEQ, VOCAB]`` logits of the evaluation batch, gathered from all ranks."""
    with torch.no_grad():
        local = model(batch(EVAL_STEP, groups.rank, groups.world_size)[:, :-1])
    parts = [torch.empty_like(local) for _ in range(groups.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def global_window(rebalancer: Rebalancer) -> torch.Tensor:
    """``[W, L, E]`` load window summed over ranks."""
    window = rebalancer.load_window.clone()
    dist.all_reduce(window)
    return window


def expert_rows(model: TinyMoE, groups: ParallelGroups) -> dict[tuple[int, int, str], torch.Tensor]:
    """``(layer, logical id, name) -> row`` of every local slot."""
    rows = {}
    for layer in model.layers:
        logical_ids = layer.placement.local_logical_ids(groups.ep_rank)[layer.layer_idx].tolist()
        for local_slot, logical_id in enumerate(logical_ids):
            for name in ("fc1_weight", "fc2_weight"):
                row = getattr(layer.experts, name)[local_slot]
                rows[(layer.layer_idx, logical_id, name)] = row.detach().clone()
    return rows


# ---- rank functions --------------------------------------------------------------------------------
def save_run(root: str) -> dict:
    """(EP 2, model): 20 steps, checkpoint after step 10; logits and weights at step 10, all losses."""
    groups, config, moe, optimizer = build("model", 2)
    model = moe.model
    sync = ExpertGradSync(moe)
    rebalancer = Rebalancer(moe, optimizer, RebalanceConfig(interval=1000, window=4))
    losses, logits, rows, router, window = [], None, None, None, None
    for step in range(1, LAST_STEP + 1):
        losses.append(train_step(moe, optimizer, sync, step))
        rebalancer.step()
        if step == SAVE_STEP:
            window = global_window(rebalancer)
            ckpt.save_checkpoint(root, step, moe, optimizer, rebalancer=rebalancer,
                                 extra={"data_position": step * GLOBAL_BATCH})
            logits = eval_logits(model, groups)
            rows = expert_rows(model, groups)
            router = [layer.router.weight.detach().clone() for layer in model.layers]
    # The same layout with another placement: the saved placement is re-installed unless told not to.
    permuted = ExpertPlacement.from_plan(torch.tensor([[3, 1, 0, 2], [2, 0, 3, 1]]), NUM_EXPERTS, 2)
    restored, kept = TinyMoE(config, permuted, groups), TinyMoE(config, permuted, groups)
    restored_info = ckpt.load_checkpoint(root, MoELayers(restored), None)
    kept_info = ckpt.load_checkpoint(root, MoELayers(kept), None, restore_placement=False)
    placements = [layer.placement for model in (restored, kept) for layer in model.layers]
    return {"losses": losses, "logits": logits, "rows": rows, "router": router, "window": window,
            "same_layout": {
                "flags": (restored_info["placement_restored"], kept_info["placement_restored"],
                          restored_info["rng_restored"]),
                "placements": [p == config.placement(NUM_LAYERS, 2) for p in placements],
                "logits": [eval_logits(restored, groups), eval_logits(kept, groups)]}}


def resume_run(root: str) -> dict:
    """(EP 4, dynamic, 4 redundant slots): load step 10, logits, then steps 11-20."""
    groups, config, moe, optimizer = build("dynamic", 4, num_redundant=4)
    model = moe.model
    sync = ExpertGradSync(moe)
    rebalancer = Rebalancer(moe, optimizer, RebalanceConfig(interval=1000, window=4))
    info = ckpt.load_checkpoint(root, moe, optimizer, rebalancer=rebalancer)
    window, step_count = global_window(rebalancer), rebalancer.step_count
    logits = eval_logits(model, groups)
    replicas_equal = all(
        torch.equal(optimizer.state[layer.experts.fc1_weight]["exp_avg"][a],
                    optimizer.state[layer.experts.fc1_weight]["exp_avg"][b])
        for layer in model.layers
        for a, ea in enumerate(layer.placement.local_logical_ids(groups.ep_rank)[layer.layer_idx].tolist())
        for b, eb in enumerate(layer.placement.local_logical_ids(groups.ep_rank)[layer.layer_idx].tolist())
        if ea == eb
    )
    losses = []
    for step in range(info["step"] + 1, LAST_STEP + 1):
        losses.append(train_step(moe, optimizer, sync, step))
        rebalancer.step()
    return {"info": {k: v for k, v in info.items() if k != "path"}, "logits": logits, "losses": losses,
            "window": window, "step_count": step_count, "rows": expert_rows(model, groups),
            "replicas_equal": replicas_equal}


def data_run(root: str) -> dict:
    """(EP 1, data) on 2 ranks: load step 10 (model only), logits; then Megatron's loader."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    groups, config, moe, _ = build("data", 1)
    model = moe.model
    info = ckpt.load_checkpoint(root, moe, None)
    logits = eval_logits(model, groups)
    # Megatron-Core reads our expert and router tensors: each rank loads half of the logical experts.
    path = ckpt.resolve_checkpoint(root)
    per_rank = NUM_EXPERTS // groups.world_size
    sharded = {}
    for layer in range(NUM_LAYERS):
        prefix = f"layers.{layer}"
        for logical_id in range(groups.rank * per_rank, (groups.rank + 1) * per_rank):
            for name, shape in (("linear_fc1", (2 * FFN, HIDDEN)), ("linear_fc2", (HIDDEN, FFN))):
                sharded[(layer, logical_id, name)] = ShardedTensor.from_rank_offsets(
                    f"{prefix}.experts.{name}.weight", torch.empty(shape), (0, logical_id, NUM_EXPERTS),
                    replica_id=0, prepend_axis_num=1)
        sharded[(layer, "router")] = ShardedTensor.from_rank_offsets(
            f"{prefix}.router.weight", torch.empty(NUM_EXPERTS, HIDDEN), replica_id=groups.rank)
    loaded = dist_checkpointing.load({str(k): v for k, v in sharded.items()}, str(path))
    return {"info": {k: v for k, v in info.items() if k != "path"}, "logits": logits,
            "megatron": {k: loaded[str(k)] for k in sharded}}


# ---- the shared checkpoint -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = str(tmp_path_factory.mktemp("ckpt"))
    saved = run_ranks(save_run, 2, root, timeout_s=180)
    rows = {k: v for result in saved for k, v in result["rows"].items()}
    return {"root": root, "saved": saved, "rows": rows,
            "resumed": run_ranks(resume_run, 4, root, timeout_s=180),
            "data": run_ranks(data_run, 2, root, timeout_s=180)}


@pytest.mark.slow
def test_load_under_other_layouts_gives_identical_logits(runs: dict) -> None:
    reference = runs["saved"][0]["logits"]
    for result in runs["resumed"] + runs["data"]:
        assert result["info"]["step"] == SAVE_STEP
        torch.testing.assert_close(result["logits"], reference, atol=1e-6, rtol=0)
    same_layout = runs["saved"][0]["same_layout"]
    assert same_layout["flags"] == (True, False, True)
    assert same_layout["placements"] == [True] * NUM_LAYERS + [False] * NUM_LAYERS
    for logits in same_layout["logits"]:
        torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)
    assert runs["resumed"][0]["info"]["placement_restored"] is False
    assert runs["resumed"][0]["info"]["rng_restored"] is False  # 4 ranks, saved on 2
    assert runs["resumed"][0]["info"]["extra"] == {"data_position": SAVE_STEP * GLOBAL_BATCH}


@pytest.mark.slow
def test_resume_on_more_ranks_continues_the_losses(runs: dict) -> None:
    uninterrupted = torch.tensor(runs["saved"][0]["losses"][SAVE_STEP:], dtype=torch.float64)
    for result in runs["resumed"]:
        resumed = torch.tensor(result["losses"], dtype=torch.float64)
        torch.testing.assert_close(resumed, uninterrupted, rtol=1e-5, atol=0)
        assert result["replicas_equal"]
        assert result["step_count"] == SAVE_STEP
        torch.testing.assert_close(result["window"], runs["saved"][0]["window"], atol=0, rtol=0)
    # Every replica of every logical expert holds the same weights after the resumed steps.
    final = {}
    for result in runs["resumed"]:
        for key, row in result["rows"].items():
            final.setdefault(key, []).append(row)
    assert len(final) == NUM_LAYERS * NUM_EXPERTS * 2
    for copies in final.values():
        for row in copies[1:]:
            torch.testing.assert_close(row, copies[0], atol=0, rtol=0)


@pytest.mark.slow
def test_megatron_dist_checkpointing_reads_our_tensors(runs: dict) -> None:
    saved_router = runs["saved"][0]["router"]
    names = {"linear_fc1": "fc1_weight", "linear_fc2": "fc2_weight"}
    checked = 0
    for result in runs["data"]:
        for key, tensor in result["megatron"].items():
            if key[1] == "router":
                torch.testing.assert_close(tensor, saved_router[key[0]], atol=0, rtol=0)
            else:
                layer, logical_id, name = key
                expected = runs["rows"][(layer, logical_id, names[name])]
                torch.testing.assert_close(tensor, expected, atol=0, rtol=0)
                checked += 1
    assert checked == NUM_LAYERS * NUM_EXPERTS * 2


@pytest.mark.slow
def test_manifest_files_and_inspect(runs: dict, capsys: pytest.CaptureFixture) -> None:
    path = ckpt.latest_checkpoint(runs["root"])
    assert path is not None and path.name == f"step_{SAVE_STEP:08d}"
    manifest = ckpt.read_manifest(path)
    assert manifest["tensors"]["layers.0.experts.linear_fc1.weight"] == {
        "shape": [NUM_EXPERTS, 2 * FFN, HIDDEN], "dtype": "float32"}
    assert json.loads((path / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert ckpt.verify_files(path, manifest) == []
    summary = _cli(["ckpt", "inspect", runs["root"], "--json"], capsys)
    assert summary["step"] == SAVE_STEP and summary["problems"] == []
    assert summary["placement"]["strategy"] == "model"
    assert len(summary["max_over_mean_per_layer"]) == NUM_LAYERS
    assert all(r >= 1 for r in summary["max_over_mean_per_layer"])


# ---- single-process tests on the shared checkpoint -------------------------------------------------
def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    import argparse

    parser = argparse.ArgumentParser(prog="ep-megatron")
    add_ckpt_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    capsys.readouterr()
    assert args.run(args) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in argv else {"out": out}


@pytest.mark.slow
def test_deepspeed_files_round_trip(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    full = ckpt.read_tensors(runs["root"])
    _cli(["ckpt", "convert", runs["root"], str(tmp_path / "ds"), "--to", "deepspeed"], capsys)
    tag = (tmp_path / "ds" / "latest").read_text()
    for layer in range(NUM_LAYERS):
        for expert in range(NUM_EXPERTS):
            name = DeepSpeedEngine._get_expert_ckpt_name(str(tmp_path / "ds"), layer, expert, tag)
            weights = torch.load(name, weights_only=True)
            key = f"layers.{layer}.deepspeed_moe.experts.deepspeed_experts.{expert}.linear_fc1.weight"
            expected = runs["rows"][(layer, expert, "fc1_weight")]
            torch.testing.assert_close(weights[key], expected, atol=0, rtol=0)
    tensors, prefixes, step = ckpt.import_deepspeed(tmp_path / "ds")
    assert prefixes == [f"layers.{i}" for i in range(NUM_LAYERS)] and step == SAVE_STEP
    assert sorted(tensors) == sorted(full)
    for key, tensor in full.items():
        torch.testing.assert_close(tensors[key], tensor, atol=0, rtol=0)
    # DeepSpeed files -> our checkpoint -> loads into a single-process model with the same weights.
    config = ckpt.read_manifest(ckpt.resolve_checkpoint(runs["root"]))["config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    _cli(["ckpt", "convert", str(tmp_path / "ds"), str(tmp_path / "back"), "--to", "ep-megatron",
          "--config", str(tmp_path / "config.json")], capsys)
    model, _ = _single()
    ckpt.load_checkpoint(tmp_path / "back", MoELayers(model), None)
    for (layer, logical_id, name), row in runs["rows"].items():
        loaded = getattr(model.layers[layer].experts, name)[logical_id]
        torch.testing.assert_close(loaded, row, atol=0, rtol=0)


@pytest.mark.slow
def test_consolidated_exports(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    full = ckpt.read_tensors(runs["root"])
    _cli(["ckpt", "convert", runs["root"], str(tmp_path / "m.safetensors"), "--to", "safetensors"], capsys)
    _cli(["ckpt", "convert", runs["root"], str(tmp_path / "m.pt"), "--to", "torch"], capsys)
    for loaded in (load_file(tmp_path / "m.safetensors"), torch.load(tmp_path / "m.pt", weights_only=True)):
        assert sorted(loaded) == sorted(full)
        for key, tensor in full.items():
            torch.testing.assert_close(loaded[key], tensor, atol=0, rtol=0)


# ---- single-process: damage, mismatch, kill ---------------------------------------------------------
def _single(strategy: str = "model", hidden: int = HIDDEN, num_experts: int = NUM_EXPERTS,
            num_layers: int = NUM_LAYERS) -> tuple[TinyMoE, torch.optim.Optimizer]:
    placement = ExpertPlacement.build(strategy, num_layers, num_experts, 1)
    model = TinyMoE(moe_config(hidden, num_experts), placement, ParallelGroups.single(), num_layers)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _save_single(root: Path, step: int, model: TinyMoE, optimizer: torch.optim.Optimizer) -> Path:
    return ckpt.save_checkpoint(root, step, MoELayers(model), optimizer)


def test_config_mismatch_lists_every_differing_field(tmp_path: Path) -> None:
    model, optimizer = _single()
    _save_single(tmp_path, 1, model, optimizer)
    other, other_opt = _single(hidden=2 * HIDDEN, num_experts=2 * NUM_EXPERTS, num_layers=NUM_LAYERS + 1)
    with pytest.raises(ValueError) as err:
        ckpt.load_checkpoint(tmp_path, MoELayers(other), other_opt)
    message = str(err.value)
    for field in ("hidden_size", "num_experts", "num_moe_layers"):
        assert field in message


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_file_is_detected(tmp_path: Path, damage: str) -> None:
    model, optimizer = _single()
    path = _save_single(tmp_path, 1, model, optimizer)
    target = sorted(path.glob("*.distcp"))[0]
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        target.unlink()
    with pytest.raises(RuntimeError, match=target.name):
        ckpt.load_checkpoint(tmp_path, MoELayers(model), optimizer)


def _snapshot(moe: MoELayers, optimizer: torch.optim.Optimizer, rebalancer: Rebalancer) -> dict:
    """Bit-exact copies of everything a load may write."""
    state = optimizer.state_dict()
    return {"model": {k: v.clone() for k, v in moe.model.state_dict().items()},
            "optimizer": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                          for i, s in state["state"].items()},
            "groups": [dict(g) for g in state["param_groups"]],
            "rebalancer": {k: v.clone() if torch.is_tensor(v) else v
                           for k, v in rebalancer.state_dict().items()},
            "placement": moe.placement}


def _assert_same(before: dict, after: dict) -> None:
    assert after["placement"] is before["placement"]
    assert before["groups"] == after["groups"] and before["rebalancer"].keys() == after["rebalancer"].keys()
    for part in ("model", "rebalancer"):
        for key, value in before[part].items():
            now = after[part][key]
            assert torch.equal(value, now) if torch.is_tensor(value) else value == now, (part, key)
    for index, state in before["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(value, after["optimizer"][index][key]), (index, key)


def _trained_single(seed: int, strategy: str = "dynamic",
                    ) -> tuple[MoELayers, torch.optim.Optimizer, Rebalancer]:
    """A single-process model with 3 steps of optimizer and rebalancer state (seeded)."""
    torch.manual_seed(seed)
    placement = ExpertPlacement.build(strategy, NUM_LAYERS, NUM_EXPERTS, 1, num_redundant=2)
    model = TinyMoE(moe_config(strategy=strategy, num_redundant=2), placement, ParallelGroups.single())
    moe = MoELayers(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rebalancer = Rebalancer(moe, optimizer, RebalanceConfig(interval=2, window=3))
    sync = ExpertGradSync(moe)
    for step in range(3):
        tokens = batch(seed * 100 + step, 0, 1)
        F.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        optimizer_step(moe, optimizer, sync)
        rebalancer.step()
    return moe, optimizer, rebalancer


def test_a_failed_load_leaves_model_optimizer_rebalancer_and_placement_untouched(tmp_path: Path) -> None:
    """Every check runs before the first write: each failing load below changes nothing, bit for bit. A
    checkpoint with another rebalance window loads (the window restarts), the others are refused."""
    saved_moe, saved_opt, saved_reb = _trained_single(seed=1)
    assert saved_reb.step_count == 3 and saved_moe.placement.strategy == "dynamic"
    good = ckpt.save_checkpoint(tmp_path / "good", 3, saved_moe, saved_opt, rebalancer=saved_reb)
    weights_only = ckpt.save_checkpoint(tmp_path / "weights", 3, saved_moe, None)
    moe, optimizer, rebalancer = _trained_single(seed=2)
    before = _snapshot(moe, optimizer, rebalancer)

    def refused(error: type[Exception], match: str, path: Path, opt: torch.optim.Optimizer = optimizer,
                reb: Rebalancer = rebalancer) -> None:
        with pytest.raises(error, match=match):
            ckpt.load_checkpoint(path, moe, opt, rebalancer=reb)
        _assert_same(before, _snapshot(moe, optimizer, rebalancer))

    refused(ValueError, "holds no optimizer state", weights_only)
    two_groups = torch.optim.AdamW([{"params": moe.dense_params()}, {"params": moe.expert_params()}])
    refused(ValueError, "optimizer param groups differ", good, opt=two_groups)
    bad_state = tmp_path / "bad_state"  # a crafted rebalancer state: window of the wrong shape, re-signed
    shutil.copytree(good, bad_state)
    state = ckpt.read_tensor_file(bad_state / "state.pt")
    state["/load_window"] = torch.zeros(3, NUM_LAYERS + 1, NUM_EXPERTS, dtype=torch.int64)
    torch.save(state, bad_state / "state.pt")
    manifest = ckpt.read_manifest(bad_state)
    manifest["files"].update(file_entries(bad_state, ["state.pt"]))
    (bad_state / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    refused(ValueError, "rebalancer load_window", bad_state)
    flipped = tmp_path / "flipped"  # the last tensor file damaged: found by the CRC check, before any write
    shutil.copytree(good, flipped)
    target = sorted(flipped.glob("*.distcp"))[-1]
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    refused(RuntimeError, target.name, flipped)
    # Another window length is not an error: the load window restarts, the step counter is restored.
    other_window = Rebalancer(moe, optimizer, RebalanceConfig(interval=2, window=5))
    info = ckpt.load_checkpoint(good, moe, optimizer, rebalancer=other_window)
    assert info["step"] == 3 and other_window.step_count == 3 and not other_window.load_window.any()
    assert moe.placement == saved_moe.placement
    for key, value in saved_moe.model.state_dict().items():
        assert torch.equal(moe.model.state_dict()[key], value), key


_SAVER = textwrap.dedent("""
    import sys, torch
    from ep_megatron.services import checkpoint as ckpt
    from ep_megatron.parallel import ParallelGroups
    from tests.test_checkpoint import _single, _save_single
    model, optimizer = _single()
    model.register_buffer("ballast", torch.randn(1 << 21))  # 8 MiB, so a save takes a while
    step = 1
    while True:
        _save_single(sys.argv[1], step, model, optimizer)
        print(step, flush=True)
        step += 1
""")


@pytest.mark.slow
def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(root)], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # the first checkpoint is complete
        started = time.monotonic()
        assert proc.stdout.readline().strip() == "2"
        save_seconds = time.monotonic() - started
        time.sleep(random.Random(os.getpid()).uniform(0.05, 1.0) * save_seconds)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = ckpt.latest_checkpoint(root)
    assert latest is not None and latest.name >= "step_00000002"
    assert ckpt.verify_files(latest, ckpt.read_manifest(latest)) == []
    assert all((path / ckpt.MANIFEST_FILE).is_file() for path in root.glob("step_*"))
    model, optimizer = _single()
    model.register_buffer("ballast", torch.zeros(1 << 21))
    info = ckpt.load_checkpoint(root, MoELayers(model), optimizer)
    assert info["path"] == latest and model.ballast.abs().sum() > 0
