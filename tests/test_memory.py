"""Memory: the gradient sync's peak, the per-GPU estimate behind ``--dry-run``, activation checkpointing.

- ``ExpertGradSync`` works layer by layer and in place: its peak allocation stays within 1.25x one
  layer's expert gradients (0 for the ``model`` placement), measured on two gloo ranks; the sync run
  from backward hooks gives the same bytes as the sync after backward;
- the estimate counts exactly the parameters of the model the trainer builds; every shipped GPU config
  fits its stated hardware and an oversized layout is refused with the numbers;
- activation checkpointing gives the same loss and gradients and counts the routed load once.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from ep_megatron.config import MoEConfig
from ep_megatron.layer import MoELayer
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel import ParallelGroups, build_groups
from ep_megatron.parallel.grad_sync import ExpertGradSync
from ep_megatron.trainer import cli
from ep_megatron.trainer.config import gpt_config, load_config, moe_config
from ep_megatron.trainer.memory import estimate_memory
from ep_megatron.trainer.model import GPTConfig, MoEGPT
from tests.cpu_memory import peak_tensor_bytes
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 4
# Each GPU config and the hardware its comment states (world size, vocabulary of its tokenizer).
GPU_CONFIGS = {"deepseek_fine_grained_gpu.yaml": (8, 102400), "mixtral_8x7b_gpu.yaml": (64, 32000)}


def _config(strategy: str, ep_size: int) -> MoEConfig:
    extra = {"num_redundant_experts": ep_size} if strategy == "dynamic" else {}
    return MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=8, top_k=2, sharding_strategy=strategy,
                     **extra)


def _grad_sync_memory() -> dict[str, Any]:
    groups = build_groups(2)
    result: dict[str, Any] = {}
    for strategy in ("model", "data", "dynamic"):
        moe = MoELayers.build(_config(strategy, groups.ep_size), groups, LAYERS)
        gen = torch.Generator().manual_seed(groups.rank)
        raw = [torch.randn(p.shape, generator=gen) for p in moe.expert_params()]
        layer_bytes = sum(p.numel() * p.element_size() for p in moe.layer_expert_params(moe.layers[0]))
        sync = ExpertGradSync(moe)
        for p, g in zip(moe.expert_params(), raw):
            p.grad = g.clone()
        sync()  # the index plans are built once per placement
        result[strategy] = peak_tensor_bytes(sync) / layer_bytes
    result["hooks_equal"] = _hook_sync_equals_sync_after_backward(groups)
    return result


def _hook_sync_equals_sync_after_backward(groups: ParallelGroups) -> bool:
    """The same backward, synced after it and from its hooks: identical bytes."""
    moe = MoELayers.build(_config("dynamic", groups.ep_size), groups, 2)
    sync = ExpertGradSync(moe)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(10 + groups.rank))
    grads = []
    for armed in (False, True):
        for p in moe.expert_params():
            p.grad = None
        out = moe.layers[1](moe.layers[0](x)[0])[0]
        if armed:
            sync.arm()
        out.square().sum().backward()
        sync()
        grads.append([p.grad.clone() for p in moe.expert_params()])
    return all(torch.equal(a, b) for a, b in zip(*grads))


def test_grad_sync_peak_is_within_a_quarter_above_one_layer_and_hooks_give_the_same_bytes() -> None:
    results = run_ranks(_grad_sync_memory, 2, timeout_s=180)
    for rank, result in enumerate(results):
        assert result["model"] < 0.01, (rank, result)  # a few scalars, no gradient rows
        assert result["data"] <= 1.25 and result["dynamic"] <= 1.25, (rank, result)
        assert result["hooks_equal"], rank


# ---- the estimate ------------------------------------------------------------------------------------
def _dry_run(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["train", *args, "--dry-run"])
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_each_gpu_config_fits_its_stated_hardware(name: str) -> None:
    world_size, vocab = GPU_CONFIGS[name]
    code, text = _dry_run(str(ROOT / "configs" / name), "--world-size", str(world_size), "--vocab-size",
                          str(vocab), "--gpu-memory-gb", "141")
    assert code == 0, text
    assert "fits:" in text and "GB of 141.0 GB per GPU" in text
    for part in ("parameters", "gradients", "optimizer state", "activations"):
        assert part in text
    comment = (ROOT / "configs" / name).read_text()
    assert f"--world-size {world_size}" in comment or world_size == 8, "the comment states the hardware"


def test_every_gpu_config_has_stated_hardware() -> None:
    assert sorted(p.name for p in (ROOT / "configs").glob("*_gpu.yaml")) == sorted(GPU_CONFIGS)


def test_an_oversized_layout_is_refused_with_the_numbers() -> None:
    code, text = _dry_run(str(ROOT / "configs" / "mixtral_8x7b_gpu.yaml"), "--world-size", "8",
                          "--vocab-size", "32000", "--gpu-memory-gb", "141")
    assert code == 2
    assert "the config needs about" in text and "more than the 141.0 GB available" in text
    assert "optimizer state" in text and "activations" in text


def test_the_estimate_counts_the_parameters_of_the_built_model(tmp_path: Path) -> None:
    """Dense and per-rank expert parameter elements equal those of the model the trainer builds, at EP 1
    and on one rank of EP 2 (shared expert, untied head, dense and MoE blocks)."""
    path = tmp_path / "run.yaml"
    path.write_text("model: {hidden_size: 16, num_layers: 3, num_heads: 2, ffn_hidden_size: 24, "
                    "moe_layer_freq: 2, tie_embeddings: false}\n"
                    "moe: {num_experts: 4, ffn_hidden_size: 8, top_k: 2, shared_expert_ffn_size: 12, "
                    "sharding_strategy: dynamic, num_redundant_experts: 2}\n"
                    "data: {seq_len: 16}\ntrain: {precision: bf16, expert_parallel_size: 2}\n")
    config = load_config(path)
    for world_size in (2, 4):
        estimate = estimate_memory(config, world_size, vocab_size=40)
        groups = ParallelGroups(world_size=world_size, rank=0, ep_size=2, ep_rank=0, ep_group=None,
                                edp_group=None, dp_group=None)
        moe_cfg = moe_config(config)
        model = MoEGPT(gpt_config(config, 40),
                       lambda i, c=moe_cfg, g=groups: MoELayer(c, c.placement(2, 2), g, i))
        moe = MoELayers(model)
        assert estimate.expert_params == sum(p.numel() for p in moe.expert_params())
        assert estimate.dense_params == sum(p.numel() for p in moe.dense_params())
        assert estimate.parameters == 2 * (estimate.dense_params + estimate.expert_params)  # bf16
        assert estimate.optimizer_state == 12 * (estimate.dense_params + estimate.expert_params)


# ---- activation checkpointing ----------------------------------------------------------------------
def test_activation_checkpointing_gives_the_same_step_and_counts_the_load_once() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        moe_cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2, aux_loss_coeff=0.1,
                            load_balancing_type="aux_loss", shared_expert_ffn_size=8)
        tokens = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(0))
        results = []
        for checkpointing in (False, True):
            gpt = GPTConfig(vocab_size=30, max_seq_len=8, hidden_size=16, num_layers=2, num_heads=2,
                            ffn_hidden_size=32, activation_checkpointing=checkpointing)
            placement = moe_cfg.placement(2, 1)
            model = MoEGPT(gpt, lambda i, p=placement: MoELayer(moe_cfg, p, ParallelGroups.single(), i))
            moe = MoELayers(model)
            loss = model(tokens[:, :-1], tokens[:, 1:])[0]
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, moe.take_loads(),
                            {k: float(v) for k, v in moe.aux_losses().items()}, moe.expert_rows()))
        (loss_a, grads_a, load_a, aux_a, rows_a), (loss_b, grads_b, load_b, aux_b, rows_b) = results
        assert torch.equal(loss_a, loss_b)
        for name, grad in grads_a.items():
            torch.testing.assert_close(grads_b[name], grad, rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(load_a, load_b) and int(load_a.sum()) == 2 * 2 * 8 * 2
        assert aux_a == aux_b and rows_a == rows_b
    finally:
        torch.set_default_dtype(torch.float32)
