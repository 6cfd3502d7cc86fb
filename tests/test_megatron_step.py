"""Megatron-Core's real training step on 4 CPU gloo ranks (EP 2 x expert-DP 2), through the test shim.

One multi-rank run trains Megatron's own MoE GPT (alltoall dispatcher, ``SequentialMLP``) and then the same
GPT built with ep_megatron's layer spec (``sharding_strategy="model"``) from the same initial weights
(experts copied by logical id), both with Megatron DDP, ``get_megatron_optimizer`` (fp32
``FP32Optimizer`` in a ``ChainedOptimizer``), ``finalize_model_grads`` and 2 micro-batches per step.
Megatron's own layer is the independent reference: the losses must agree to 1e-5 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.multirank import run_ranks

pytest.importorskip("megatron.core")

STEPS = 10


def _megatron_then_ours(run) -> dict:
    """Rank function: Megatron's own MoE GPT trained, then ours from its initial weights, trained."""
    from tests import megatron_harness as harness

    harness.setup_megatron(run)
    config = harness.transformer_config(run)
    reference = harness.build_gpt(run, config)
    initial = harness.snapshot_megatron_weights(reference)  # before training moves them
    megatron_result = harness.build_and_train(run, reference)
    ours_run = run.replace(layer="ours", ep_options=(("sharding_strategy", "model"),))
    ours = harness.build_gpt(ours_run, harness.transformer_config(ours_run))
    harness.load_megatron_weights_into_ours(initial, ours)
    ours_result = harness.build_and_train(ours_run, ours)
    harness.teardown_megatron()
    return {"megatron": megatron_result, "ours": ours_result,
            "ours_experts": harness.expert_weights(ours)}


def test_megatron_moe_and_ours_train_identically_on_ep2_x_dp2():
    from tests.megatron_harness import MegatronRun

    run = MegatronRun(layer="megatron", ep=2, num_experts=4, steps=STEPS, micro_batches=2, global_batch=8)
    results = run_ranks(_megatron_then_ours, 4, run, timeout_s=240)
    reference = results[0]["megatron"]["losses"]
    ours = results[0]["ours"]["losses"]
    # every rank reports the same global loss
    assert all(r["megatron"]["losses"] == reference and r["ours"]["losses"] == ours for r in results)
    # Megatron's own MoE layer trains: finite, and falling
    assert len(reference) == STEPS and all(math.isfinite(loss) for loss in reference)
    assert reference[-1] < reference[0] - 0.2, reference
    # ours equals it step for step
    np.testing.assert_allclose(ours, reference, rtol=1e-5)
    # expert-DP replicas (ranks r and r + 2 hold the same slots) stay identical
    for rank in (0, 1):
        for key, value in results[rank]["ours_experts"].items():
            np.testing.assert_array_equal(value, results[rank + 2]["ours_experts"][key])


def _megatron_parallel_modes(runs, checkpoint_dir) -> dict:
    """Rank function: Megatron's own MoE GPT trained under each run (process groups rebuilt per run),
    then saved with ``dist_checkpointing`` at EP 2 and loaded at EP 1."""
    from tests import megatron_harness as harness

    results = []
    for run in runs:
        harness.setup_megatron(run)
        config = harness.transformer_config(run)
        chunks = [harness.wrap_model(run, config, harness.build_gpt(run, config))]
        optimizer, scheduler = harness.build_optimizer(run, chunks)
        result = harness.train(run, config, chunks, optimizer, scheduler)
        result["optimizers"] = sorted({type(inner).__name__ for inner in optimizer.chained_optimizers})
        results.append(result)
        harness.teardown_megatron()
    ep2, ep1 = runs[0], runs[0].replace(ep=1, seed=runs[0].seed + 1)
    harness.setup_megatron(ep2)
    saved = harness.build_gpt(ep2, harness.transformer_config(ep2))
    harness.save_checkpoint(saved, checkpoint_dir)
    saved_logits = harness.logits(ep2, saved)
    harness.teardown_megatron()
    harness.setup_megatron(ep1)
    loaded = harness.build_gpt(ep1, harness.transformer_config(ep1))
    before = harness.logits(ep2, loaded)  # ep2's data: the seed also draws the tokens
    harness.load_checkpoint(loaded, checkpoint_dir)
    after = harness.logits(ep2, loaded)
    harness.teardown_megatron()
    return {"runs": results, "logits_diff_before_load": float(np.abs(before - saved_logits).max()),
            "logits_diff_after_load": float(np.abs(after - saved_logits).max())}


def test_harness_runs_megatron_moe_under_tp_sp_pp_bf16_distributed_optimizer_and_checkpoints(tmp_path):
    """The shim and harness carry Megatron's own MoE GPT (EP 2) through TP 2 + SP (equal to TP 1),
    bf16 + DistributedOptimizer with overlapped grad reduce, PP 2 with bf16, and a ``dist_checkpointing``
    save at EP 2 loaded at EP 1 (equal logits), on 4 ranks."""
    from tests.megatron_harness import MegatronRun

    base = MegatronRun(layer="megatron", ep=2, steps=5, micro_batches=2, global_batch=8)
    runs = [
        base,
        base.replace(tp=2, sequence_parallel=True, overlap_grad_reduce=True),
        base.replace(precision="bf16", distributed_optimizer=True, overlap_grad_reduce=True),
        base.replace(pp=2, precision="bf16"),
    ]
    results = run_ranks(_megatron_parallel_modes, 4, runs, str(tmp_path), timeout_s=240)
    tp1, tp2, bf16_distopt, pp2 = results[0]["runs"]
    assert all(r["runs"] == results[0]["runs"] for r in results[1:])  # same global numbers everywhere
    np.testing.assert_allclose(tp2["losses"], tp1["losses"], rtol=1e-5)
    assert tp1["optimizers"] == tp2["optimizers"] == ["FP32Optimizer"]
    assert bf16_distopt["optimizers"] == ["DistributedOptimizer"]
    assert pp2["optimizers"] == ["Float16OptimizerWithFloat16Params"]
    for result in (bf16_distopt, pp2):
        assert all(math.isfinite(loss) for loss in result["losses"])
        assert result["losses"][-1] < result["losses"][0] - 0.2, result["losses"]
    for rank_result in results:
        assert rank_result["logits_diff_before_load"] > 1e-2  # another seed: the load has work to do
        assert rank_result["logits_diff_after_load"] < 1e-5
