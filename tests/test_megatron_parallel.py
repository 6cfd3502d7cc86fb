"""Our layer under Megatron's context parallelism (layer level) and expert-DP 3 (exact replicas), on gloo.

Context parallelism cannot run end to end on CPU (Megatron's local attention asserts CP = 1; only
Transformer Engine's attention does CP), so the MoE layer is called directly on each CP rank's half of
the sequences and checked against an independent single-process computation on the whole sequences.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.multirank import run_ranks

pytest.importorskip("megatron.core")

SEQ, BATCH, HIDDEN, EXPERTS, TOPK = 12, 2, 16, 4, 2
AUX_COEFF, Z_COEFF = 0.1, 0.01


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden [SEQ, BATCH, HIDDEN]`` and ``padding [BATCH, SEQ]`` (True = padding), as many padding
    positions in each half of the sequence."""
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(3))
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    half = SEQ // 2
    padding[0, half - 2:half] = True
    padding[0, SEQ - 2:] = True
    return hidden, padding


def _context_parallel_layer() -> dict:
    """Rank function (CP 2 = EP 2): our layer on this rank's half of the sequences, backward of the aux
    and z-losses only; then the layer cast to bf16 by ``Float16Module``."""
    from tests import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ep_megatron.integrations.megatron import MegatronEPMoELayer, ep_moe_layers

    parallel_state.initialize_model_parallel(context_parallel_size=2, expert_model_parallel_size=2,
                                             expert_tensor_parallel_size=1)
    fields = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32,
                  num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_router_score_function="sigmoid",
                  moe_router_enable_expert_bias=True, moe_router_load_balancing_type="aux_loss",
                  moe_aux_loss_coeff=AUX_COEFF, moe_z_loss_coeff=Z_COEFF, context_parallel_size=2,
                  expert_model_parallel_size=2, expert_tensor_parallel_size=1, use_cpu_initialization=True,
                  gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                  moe_token_dispatcher_type="alltoall")
    layer = MegatronEPMoELayer(TransformerConfig(**fields), sharding_strategy="dynamic",
                               num_redundant_experts=2)
    layer.set_layer_number(1)
    moe = ep_moe_layers(layer)
    hidden, padding = _inputs()
    cp_rank, half = parallel_state.get_context_parallel_rank(), SEQ // 2
    clear_aux_losses_tracker()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    output, _ = layer(hidden[cp_rank * half:(cp_rank + 1) * half],
                      padding_mask=padding[:, cp_rank * half:(cp_rank + 1) * half])
    (output * 0).sum().backward()  # only the aux losses reach the router weight
    tracker = get_moe_layer_wise_logging_tracker()
    result = {"weight": layer.router.weight.detach().clone(), "grad": layer.router.weight.grad.clone(),
              "aux": float(tracker["load_balancing_loss"]["values"][0]),
              "bias_counts": layer.router.local_tokens_per_expert.clone(), "load": moe.take_loads()[0]}
    bias = torch.tensor([1e-3, 2e-3, -3e-3, 4.0001e-3])  # not representable in bf16
    layer.router.expert_bias.copy_(bias)
    Float16Module(TransformerConfig(**{**fields, "bf16": True}), layer)
    result["cast"] = (layer.router.weight.dtype, layer.router.expert_bias.dtype,
                      torch.equal(layer.router.expert_bias, bias), layer.router.local_tokens_per_expert.dtype)
    parallel_state.destroy_model_parallel()
    return result


def _reference(weight: torch.Tensor) -> dict:
    """Megatron's aux loss (sigmoid scores normalised per token), z-loss, expert-bias counts and load on the
    whole sequences, written out independently; ``grad`` of aux + z-loss w.r.t. the router weight."""
    hidden, padding = _inputs()
    weight = weight.clone().requires_grad_()
    logits = hidden.reshape(-1, HIDDEN) @ weight.t()  # [T, E], tokens in [seq, batch] order
    valid = ~padding.t().reshape(-1)  # [T]
    z_loss = Z_COEFF * torch.logsumexp(logits, -1).square()[valid].mean()
    scores = torch.sigmoid(logits)
    normalised = scores / scores.sum(-1, keepdim=True)
    chosen = scores.topk(TOPK, dim=-1).indices  # same ranking as the normalised scores; bias is 0
    routed = torch.zeros_like(scores).scatter_(1, chosen, 1.0) * valid[:, None]
    counts = routed.sum(0)
    tokens = counts.sum() / TOPK
    probs_per_expert = (normalised * valid[:, None]).sum(0)
    aux = AUX_COEFF * EXPERTS / (TOPK * tokens * tokens) * (counts * probs_per_expert).sum()
    (aux + z_loss).backward()
    return {"grad": weight.grad, "aux": float(aux) / AUX_COEFF, "bias_counts": counts.detach(),
            "load": torch.bincount(chosen.flatten(), minlength=EXPERTS)}


def test_context_parallel_counts_aux_loss_bias_and_load_like_the_whole_sequence():
    """CP 2: summed over the CP ranks, the router-weight gradient of the aux + z-losses, the aux loss logged
    in Megatron's tracker, the expert-bias counts (padding excluded) and the rebalancer's load (padding
    included: padding tokens are computed) equal the whole-sequence values; ``Float16Module`` leaves
    ``expert_bias`` and its counts in fp32, unrounded."""
    results = run_ranks(_context_parallel_layer, 2, timeout_s=120)
    assert torch.equal(results[0]["weight"], results[1]["weight"])
    reference = _reference(results[0]["weight"])
    assert len(set(reference["bias_counts"].tolist())) > 1  # unbalanced counts: the aux loss is not trivial
    summed = {key: results[0][key] + results[1][key] for key in ("grad", "bias_counts", "load")}
    torch.testing.assert_close(summed["grad"], reference["grad"], rtol=1e-5, atol=1e-8)
    assert results[0]["aux"] + results[1]["aux"] == pytest.approx(reference["aux"], rel=1e-5)
    torch.testing.assert_close(summed["bias_counts"], reference["bias_counts"])
    assert torch.equal(summed["load"], reference["load"])
    for result in results:
        assert result["cast"] == (torch.bfloat16, torch.float32, True, torch.float32)


def _expert_dp3_runs(runs) -> list:
    from tests import megatron_harness as harness

    results = []
    for run in runs:
        harness.setup_megatron(run)
        results.append(harness.build_and_train(run, harness.build_gpt(run, harness.transformer_config(run))))
        harness.teardown_megatron()
    return results


def test_expert_dp3_replicas_stay_bit_identical():
    """EP 1 x expert-DP 3, ``dynamic`` with 2 replicas: Megatron's 3-rank reduction sums a replica's row in
    another order than its owner's, so the owner's reduced row is copied to the replicas after it (the
    distributed optimizer all-reduces those buckets). Replicas (weights, fp32 mains, moments) stay
    bit-identical under FP32Optimizer with overlapped reduce and under the distributed optimizer, and the
    losses equal ours without replicas."""
    from tests.megatron_harness import MegatronRun

    model = MegatronRun(layer="ours", ep=1, ep_options=(("sharding_strategy", "model"),), steps=6,
                        micro_batches=2, global_batch=6, aux_loss_coeff=0.01)
    dynamic = model.replace(ep_options=(("sharding_strategy", "dynamic"), ("num_redundant_experts", 2)),
                            eplb_interval=3)
    runs = [model, dynamic.replace(overlap_grad_reduce=True), dynamic.replace(distributed_optimizer=True)]
    for rank_results in run_ranks(_expert_dp3_runs, 3, runs, timeout_s=200):
        reference, overlapped, distributed = rank_results
        for result in (overlapped, distributed):
            np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
            np.testing.assert_allclose(result["grad_norms"], reference["grad_norms"], rtol=1e-5)
            assert result["replica_mismatch"] == 0.0 and result["replica_syncs"] > 0
        assert distributed["optimizers"] == ["DistributedOptimizer"]
