"""Our layer inside Megatron-Core's real training step on 4 CPU gloo ranks, through the test shim.

Megatron's own MoE layer (alltoall dispatcher, ``SequentialMLP``) is the independent reference: a GPT built
with it is trained, and the same GPT built with ep_megatron's spec from the same initial weights (experts
copied by logical id) is trained with Megatron DDP, ``get_megatron_optimizer``, ``finalize_model_grads``,
2 micro-batches per step and ``ep_megatron.integrations.megatron.attach``. Then ours under every layout
(replicas, rebalancing, overlapped grad reduce, bf16 + distributed optimizer, TP 2 + SP, PP 2) must give
the same losses as ours without replicas, keep every replica of a logical expert bit-identical (weights,
fp32 main weights, Adam moments), and its ``dist_checkpointing`` files must load into Megatron's own model
at another EP / PP size with equal logits, and back.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.multirank import run_ranks

pytest.importorskip("megatron.core")

DYNAMIC = (("sharding_strategy", "dynamic"), ("num_redundant_experts", 2))  # 6 slots for 4 experts
MODEL = (("sharding_strategy", "model"),)


def _pairs_then_ours(pairs, ours_runs) -> dict:
    """Rank function. Each pair ``(megatron_run, [ours_run, ...])``: Megatron's own MoE GPT trained, then
    each ours run from its initial weights. ``ours_runs``: ours from its own initial weights."""
    from tests import megatron_harness as harness

    results: dict = {"pairs": [], "ours": []}
    for megatron_run, ours_of_pair in pairs:
        harness.setup_megatron(megatron_run)
        reference = harness.build_gpt(megatron_run, harness.transformer_config(megatron_run))
        initial = harness.snapshot_megatron_weights(reference)  # before training moves them
        trained = [harness.build_and_train(megatron_run, reference)]
        for run in ours_of_pair:
            harness.teardown_megatron()
            harness.setup_megatron(run)
            ours = harness.build_gpt(run, harness.transformer_config(run))
            harness.load_megatron_weights_into_ours(initial, ours)
            trained.append(harness.build_and_train(run, ours))
        harness.teardown_megatron()
        results["pairs"].append(trained)
    for run in ours_runs:
        harness.setup_megatron(run)
        model = harness.build_gpt(run, harness.transformer_config(run))
        results["ours"].append(harness.build_and_train(run, model))
        harness.teardown_megatron()
    return results


def _assert_trains(result: dict) -> None:
    losses = result["losses"]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 0.2, losses


def test_ours_equals_megatrons_moe_and_rebalancing_keeps_losses_and_replicas_exact():
    """EP 2 x expert-DP 2, fp32 unless said otherwise, aux loss on, 2 micro-batches, clip 1.0:

    - ours (``model``) equals Megatron's own MoE for 10 steps (aux loss through Megatron's scaler);
    - ours ``dynamic`` (replicas) + rebalancing every 4 steps + overlapped grad reduce equals ours
      ``model`` for 20 steps, grad norms included (each logical expert counted once);
    - ``padding_mask`` with seq-aux + z-loss and ``calculate_per_token_loss``, and sigmoid routing with
      Megatron's expert bias (updated by ``finalize_model_grads`` from our ``local_tokens_per_expert``):
      ours ``dynamic`` + rebalancing equals Megatron's own, expert-bias values included;
    - bf16 + DistributedOptimizer + overlap, ``dynamic`` + rebalancing: trains, replicas bit-identical.
    """
    from tests.megatron_harness import MegatronRun

    base = MegatronRun(layer="megatron", ep=2, num_experts=4, steps=10, micro_batches=2, global_batch=8,
                       aux_loss_coeff=0.01)
    model = base.replace(layer="ours", ep_options=MODEL, steps=20)
    dynamic = model.replace(ep_options=DYNAMIC, eplb_interval=4, overlap_grad_reduce=True)
    padded = base.replace(steps=4, load_balancing="seq_aux_loss", z_loss_coeff=1e-3, padding=True,
                          per_token_loss=True)
    biased = base.replace(steps=4, score_function="sigmoid", expert_bias_rate=0.05)
    bf16 = dynamic.replace(steps=9, eplb_interval=3, precision="bf16", distributed_optimizer=True)
    pairs = [(base, [model, dynamic])]
    for run in (padded, biased):
        pairs.append((run, [run.replace(layer="ours", ep_options=DYNAMIC, eplb_interval=2)]))
    results = run_ranks(_pairs_then_ours, 4, pairs, [bf16], timeout_s=300)
    first = results[0]
    for other in results[1:]:  # every rank reports the same global numbers
        assert [[r["losses"] for r in pair] for pair in other["pairs"]] == \
               [[r["losses"] for r in pair] for pair in first["pairs"]]
    (megatron, ours_model, ours_dynamic), padded_pair, biased_pair = first["pairs"]
    _assert_trains(megatron)
    np.testing.assert_allclose(ours_model["losses"][:10], megatron["losses"], rtol=1e-5)
    np.testing.assert_allclose(ours_model["grad_norms"][:10], megatron["grad_norms"], rtol=1e-5)
    np.testing.assert_allclose(ours_dynamic["losses"], ours_model["losses"], rtol=1e-5)
    np.testing.assert_allclose(ours_dynamic["grad_norms"], ours_model["grad_norms"], rtol=1e-5)
    assert sum(ours_dynamic["slots_moved"]) > 0 and ours_dynamic["replica_syncs"] >= 20
    for reference, ours in (padded_pair, biased_pair):
        np.testing.assert_allclose(ours["losses"], reference["losses"], rtol=1e-5)
        assert sum(ours["slots_moved"]) > 0
    reference_bias, ours_bias = biased_pair[0]["expert_bias"], biased_pair[1]["expert_bias"]
    assert sorted(ours_bias) == sorted(reference_bias) and len(reference_bias) == 2
    assert any(any(values) for values in reference_bias.values())  # the bias moved
    for key, values in reference_bias.items():
        np.testing.assert_allclose(ours_bias[key], values, atol=1e-6)
    (bf16_result,) = first["ours"]
    assert bf16_result["optimizers"] == ["DistributedOptimizer"]
    _assert_trains(bf16_result)
    assert sum(bf16_result["slots_moved"]) > 0
    for rank_result in results:
        assert ours_model["replica_mismatch"] == 0.0
        for result in (*rank_result["pairs"][0][1:], *(pair[1] for pair in rank_result["pairs"][1:]),
                       *rank_result["ours"]):
            assert result["replica_mismatch"] == 0.0


def _layouts_and_checkpoints(runs, checkpoint_dirs) -> dict:
    """Rank function: ours trained under each run; the last (PP 2) is saved with ``dist_checkpointing`` and
    loaded into Megatron's own MoE GPT at PP 1, EP 1, which is saved and loaded into ours at EP 2."""
    from tests import megatron_harness as harness

    results = []
    for run in runs:
        harness.setup_megatron(run)
        model = harness.build_gpt(run, harness.transformer_config(run))
        results.append(harness.build_and_train(run, model))
        if run is not runs[-1]:
            harness.teardown_megatron()
    saved_run, ours_dir, megatron_dir = runs[-1], *checkpoint_dirs
    harness.save_checkpoint(model, ours_dir)
    saved = harness.logits(saved_run, model)  # None off the last pipeline stage
    harness.teardown_megatron()
    megatron_run = saved_run.replace(layer="megatron", ep=1, pp=1, ep_options=(), seed=saved_run.seed + 1)
    data = megatron_run.replace(seed=saved_run.seed)  # logits of the same tokens everywhere
    harness.setup_megatron(megatron_run)
    megatron = harness.build_gpt(megatron_run, harness.transformer_config(megatron_run))
    megatron_before = harness.logits(data, megatron)
    harness.load_checkpoint(megatron, ours_dir)
    megatron_loaded = harness.logits(data, megatron)
    harness.save_checkpoint(megatron, megatron_dir)
    harness.teardown_megatron()
    back_run = saved_run.replace(pp=1, seed=saved_run.seed + 2)
    harness.setup_megatron(back_run)
    back = harness.build_gpt(back_run, harness.transformer_config(back_run))
    back_before = harness.logits(data, back)
    harness.load_checkpoint(back, megatron_dir)
    back_loaded = harness.logits(data, back)
    harness.teardown_megatron()
    return {"runs": results,
            "ours_to_megatron": None if saved is None else float(np.abs(megatron_loaded - saved).max()),
            "megatron_changed_by_load": float(np.abs(megatron_loaded - megatron_before).max()),
            "megatron_to_ours": float(np.abs(back_loaded - megatron_loaded).max()),
            "ours_changed_by_load": float(np.abs(back_loaded - back_before).max())}


def test_ours_under_tp_sp_and_pp_and_checkpoints_with_megatrons_moe(tmp_path):
    """Ours ``dynamic`` + rebalancing every 2 steps on 4 ranks, seq-aux + z-loss (per-sequence / per-token
    losses, so the math does not depend on how sequences are split over TP ranks):

    - TP 2 + SP with EP 2 equals TP 1 (losses to 1e-5, and the same placements: the rebalancer sums the
      load over the TP ranks too);
    - PP 2 x EP 2 with the distributed optimizer (fp32) and overlapped grad reduce: each stage
      rebalances its own layers, replicas stay bit-identical;
    - its ``dist_checkpointing`` files (global layer numbering, rebalanced placement) load into Megatron's
      own MoE GPT at PP 1, EP 1 with equal logits, and a checkpoint of that model loads into ours at EP 2.
    """
    from tests.megatron_harness import MegatronRun

    tp1 = MegatronRun(layer="ours", ep_options=DYNAMIC, eplb_interval=2, ep=2, steps=6, micro_batches=2,
                      aux_loss_coeff=0.01, load_balancing="seq_aux_loss", z_loss_coeff=1e-3)
    tp2 = tp1.replace(tp=2, sequence_parallel=True)
    pp2 = tp1.replace(pp=2, distributed_optimizer=True, overlap_grad_reduce=True)
    dirs = [tmp_path / "ours", tmp_path / "megatron"]
    for directory in dirs:
        directory.mkdir()
    results = run_ranks(_layouts_and_checkpoints, 4, [tp1, tp2, pp2], [str(d) for d in dirs], timeout_s=300)
    for rank, result in enumerate(results):
        r_tp1, r_tp2, r_pp2 = result["runs"]
        np.testing.assert_allclose(r_tp2["losses"], r_tp1["losses"], rtol=1e-5)
        assert r_tp2["placement"] == r_tp1["placement"] and sum(r_tp1["slots_moved"]) > 0
        _assert_trains(r_pp2)
        assert r_pp2["optimizers"] == ["DistributedOptimizer"] and sum(r_pp2["slots_moved"]) > 0
        assert len(r_pp2["placement"]) == 1  # this stage's one MoE layer
        for r in (r_tp1, r_tp2, r_pp2):
            assert r["replica_mismatch"] == 0.0
        if rank >= 2:  # the last pipeline stage holds the logits
            assert result["ours_to_megatron"] < 1e-5
        assert result["megatron_changed_by_load"] > 1e-2 and result["ours_changed_by_load"] > 1e-2
        assert result["megatron_to_ours"] < 1e-5
