"""Megatron-Core integration: config mapping, layer spec, process groups, dist_checkpointing round trip."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.multirank import run_ranks

pytest.importorskip("megatron.core")


def _tc(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, num_moe_experts=4,
                moe_router_topk=2, use_cpu_initialization=True, gated_linear_unit=True,
                activation_func=F.silu, add_bias_linear=False, moe_aux_loss_coeff=0.0,
                moe_router_load_balancing_type="none")
    return TransformerConfig(**{**base, **overrides})


def test_config_maps_every_supported_field():
    from ep_megatron.integrations.megatron import moe_config_from_megatron

    tc = _tc(num_moe_experts=8, moe_ffn_hidden_size=24, moe_router_topk=3,
             moe_router_score_function="sigmoid", moe_router_pre_softmax=True, moe_router_num_groups=2,
             moe_router_group_topk=1,
             moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3,
             moe_router_enable_expert_bias=True, moe_router_bias_update_rate=5e-3,
             moe_expert_capacity_factor=1.5, moe_token_drop_policy="position",
             moe_shared_expert_intermediate_size=48, expert_model_parallel_size=1, init_method_std=0.01,
             moe_router_dtype="fp32", moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall")
    cfg = moe_config_from_megatron(tc, sharding_strategy="dynamic", num_redundant_experts=4, seed=7)
    expected = dict(hidden_size=16, ffn_hidden_size=24, num_experts=8, top_k=3, activation="swiglu",
                    score_function="sigmoid", pre_softmax=False, num_groups=2, group_topk=1,
                    load_balancing_type="seq_aux_loss", aux_loss_coeff=0.01, z_loss_coeff=1e-3,
                    enable_expert_bias=True, expert_bias_update_rate=5e-3, capacity_factor=1.5,
                    drop_policy="position", shared_expert_ffn_size=48, init_std=0.01,
                    router_dtype="fp32", sharding_strategy="dynamic", num_redundant_experts=4, seed=7)
    assert {k: getattr(cfg, k) for k in expected} == expected
    gelu = moe_config_from_megatron(_tc(gated_linear_unit=False, activation_func=F.gelu))
    assert gelu.activation == "gelu" and gelu.ffn_hidden_size == 32 and gelu.capacity_factor is None
    assert gelu.num_groups is None and not gelu.pre_softmax
    assert moe_config_from_megatron(_tc(moe_router_pre_softmax=True)).pre_softmax


def test_config_lists_every_unsupported_field_in_one_error():
    from ep_megatron.integrations.megatron import moe_config_from_megatron

    tc = _tc(moe_input_jitter_eps=0.1, moe_shared_expert_gate=True, moe_router_topk_scaling_factor=2.0,
             moe_router_pre_softmax=True, moe_apply_probs_on_input=True, add_bias_linear=True,
             moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0)
    with pytest.raises(ValueError) as info:
        moe_config_from_megatron(tc)
    message = str(info.value)
    for name in ("moe_input_jitter_eps", "moe_shared_expert_gate", "moe_router_topk_scaling_factor",
                 "moe_apply_probs_on_input", "add_bias_linear", "moe_router_load_balancing_type"):
        assert name in message, (name, message)
    with pytest.raises(ValueError, match="unknown ep_megatron options"):
        moe_config_from_megatron(_tc(), no_such_option=1)


def test_dispatchers_and_parallel_layouts_we_cannot_run_are_rejected_by_name():
    """DeepEP / flex dispatchers; TP > 1 without sequence parallelism; expert-TP > 1 (Megatron's default
    at TP > 1). TP with SP and expert-TP 1, CP and PP are accepted."""
    from ep_megatron.integrations.megatron import moe_config_from_megatron

    cases = {
        "moe_token_dispatcher_type='flex'": _tc(moe_token_dispatcher_type="flex"),
        "moe_enable_deepep=True": _tc(moe_token_dispatcher_type="flex", moe_enable_deepep=True),
        "sequence_parallel=False with tensor_model_parallel_size=2": _tc(tensor_model_parallel_size=2,
                                                                         expert_tensor_parallel_size=1),
        "expert_tensor_parallel_size=2": _tc(tensor_model_parallel_size=2, sequence_parallel=True),
    }
    for name, tc in cases.items():
        with pytest.raises(ValueError, match=name.replace("(", r"\(")):
            moe_config_from_megatron(tc)
    for ok in (_tc(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=1),
               _tc(context_parallel_size=2, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)):
        moe_config_from_megatron(ok)


def test_every_megatron_moe_field_is_classified():
    """A Megatron moe_* field we neither map nor ignore on purpose is reported when set."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ep_megatron.integrations.megatron import config as glue

    handled = set(glue._DIRECT_FIELDS) | set(glue._CONVERTED_FIELDS) | set(glue._IMPLEMENTATION_FIELDS)
    moe_fields = {f.name for f in dataclasses.fields(TransformerConfig) if f.name.startswith("moe_")}
    unhandled = moe_fields - handled
    assert "moe_input_jitter_eps" in unhandled and "moe_router_topk" not in unhandled
    assert glue.unsupported_megatron_fields(_tc()) == []


def _save_and_load_in_memory(to_save: dict, to_load: dict) -> dict:
    """Megatron ``dist_checkpointing.save`` then ``load`` without the files: Megatron's own preprocessing,
    sharding-integrity validation (main replicas cover every global tensor exactly once) and factory
    merges, with the main-replica chunks exchanged by ``all_gather_object`` instead of written (fast; the
    files themselves are written and read in ``test_megatron_step.py`` through the shim's in-process
    writer)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges, is_main_replica
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess, save_preprocess

    saved, _ = save_preprocess(to_save, validate_access_integrity=True)
    mine = [(t.key, t.global_offset, t.data.detach().clone()) for t in nested_values(saved)
            if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id)]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    chunks = {(key, tuple(offset)): data for rank_chunks in everyone for key, offset, data in rank_chunks}
    requested, _, factories = load_preprocess(to_load)
    dict_list_map_inplace(
        lambda t: chunks[(t.key, tuple(t.global_offset))] if isinstance(t, ShardedTensor) else None, requested
    )
    loaded = apply_factory_merges(requested, factories)
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _megatron_model_and_checkpoint(strategy: str, num_redundant: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from ep_megatron.integrations.megatron import MegatronEPMoELayer, get_gpt_layer_spec_with_ep_moe
    from ep_megatron.parallel import build_groups

    parallel_state.initialize_model_parallel(expert_model_parallel_size=2, create_gloo_process_groups=False)
    ours = build_groups(2)
    ep_ranks = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
    edp_ranks = dist.get_process_group_ranks(parallel_state.get_expert_data_parallel_group())
    tc = _tc(expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall")
    spec = get_gpt_layer_spec_with_ep_moe(sharding_strategy=strategy, num_redundant_experts=num_redundant)
    model = GPTModel(tc, spec, vocab_size=32, max_sequence_length=8)
    layers = [m for m in model.modules() if isinstance(m, MegatronEPMoELayer)]
    fc1_key = "decoder.layers.1.mlp.experts.fc1_weight"
    saved_fc1 = model.state_dict()[fc1_key].clone()
    # Load under another layout (one copy per expert, no replicas) with freshly zeroed expert weights.
    other = GPTModel(tc, get_gpt_layer_spec_with_ep_moe(sharding_strategy="model"), vocab_size=32,
                     max_sequence_length=8)
    other_layers = [m for m in other.modules() if isinstance(m, MegatronEPMoELayer)]
    for layer in other_layers:
        for param in layer.experts.parameters():
            param.data.zero_()
    loaded = _save_and_load_in_memory(model.sharded_state_dict(), other.sharded_state_dict())
    other.load_state_dict(loaded, strict=False)
    result = {
        "ep_ranks": ep_ranks, "edp_ranks": edp_ranks,
        "our_ep_ranks": dist.get_process_group_ranks(ours.ep_group),
        "our_edp_ranks": dist.get_process_group_ranks(ours.edp_group),
        "layer_idx": [layer.layer_idx for layer in layers],
        "same_groups": all(layer.groups.ep_group is parallel_state.get_expert_model_parallel_group()
                           for layer in layers),
        "saved_ids": layers[1].placement.local_logical_ids(layers[1].groups.ep_rank)[1].tolist(),
        "saved_fc1": saved_fc1,
        "loaded_ids": other_layers[1].placement.local_logical_ids(other_layers[1].groups.ep_rank)[1].tolist(),
        "loaded_fc1": other.state_dict()[fc1_key].clone(),
    }
    parallel_state.destroy_model_parallel()
    return result


def test_spec_groups_and_dist_checkpoint_round_trip():
    """2 ranks, EP 2 with replicas: GPTModel builds with our spec, uses Megatron's groups, and
    Megatron's dist_checkpointing saves one row per logical expert and loads it back to every replica."""
    results = run_ranks(_megatron_model_and_checkpoint, 2, "dynamic", 2, timeout_s=120)
    saved, loaded = {}, {}
    for rank, res in enumerate(results):
        assert res["ep_ranks"] == res["our_ep_ranks"] == [0, 1]
        assert res["edp_ranks"] == res["our_edp_ranks"] == [rank]
        assert res["layer_idx"] == [0, 1] and res["same_groups"]
        for local_slot, logical_id in enumerate(res["saved_ids"]):
            saved.setdefault(logical_id, []).append(res["saved_fc1"][local_slot])
        for local_slot, logical_id in enumerate(res["loaded_ids"]):
            loaded[logical_id] = res["loaded_fc1"][local_slot]
    assert sorted(saved) == sorted(loaded) == [0, 1, 2, 3]
    for logical_id, copies in saved.items():
        # replicas start identical (init by logical id) and the other layout reads that row back
        assert all(torch.equal(copy, copies[0]) for copy in copies)
        assert torch.equal(loaded[logical_id], copies[0])


def test_argparse_extension():
    import argparse

    from ep_megatron.integrations.megatron import (
        add_ep_megatron_args,
        ep_options_from_args,
        rebalance_config_from_args,
    )
    from ep_megatron.services.rebalance import RebalanceConfig

    args = add_ep_megatron_args(argparse.ArgumentParser()).parse_args(
        ["--expert-sharding-strategy", "dynamic", "--num-redundant-experts", "4", "--eplb-interval", "50",
         "--eplb-window", "20"])
    assert ep_options_from_args(args) == {"sharding_strategy": "dynamic", "num_redundant_experts": 4,
                                          "replicated_experts": (), "prefer_local_replica": True}
    assert (args.eplb_interval, args.eplb_window) == (50, 20)
    assert rebalance_config_from_args(args) == RebalanceConfig(interval=50, window=20)
    no_eplb = add_ep_megatron_args(argparse.ArgumentParser()).parse_args([])
    assert rebalance_config_from_args(no_eplb) is None


def test_megatron_lm_spec_attribute_reads_megatron_lm_args(monkeypatch):
    """``--spec ep_megatron.integrations.megatron ep_moe_layer_spec``: Megatron-LM's ``--spec`` reads a module
    attribute (it does not call it); ours is built from ``megatron.training.get_args()``. Megatron-LM is not
    installed here, so its argument registry is stood in for by a module holding the parsed flags."""
    import argparse
    import types

    from ep_megatron.integrations import megatron as glue
    from ep_megatron.integrations.megatron import MegatronEPMoELayer, add_ep_megatron_args

    args = add_ep_megatron_args(argparse.ArgumentParser()).parse_args(
        ["--expert-sharding-strategy", "hybrid", "--replicated-experts", "0", "1"])
    args.normalization, args.qk_layernorm = "RMSNorm", False
    monkeypatch.setitem(sys.modules, "megatron.training", types.SimpleNamespace(get_args=lambda: args))
    spec = glue.ep_moe_layer_spec
    assert spec.submodules.mlp.module is MegatronEPMoELayer
    assert spec.submodules.mlp.params == {"sharding_strategy": "hybrid", "num_redundant_experts": 0,
                                          "replicated_experts": (0, 1), "prefer_local_replica": True}
    assert spec.submodules.sharded_state_dict_keys_map  # Megatron's norm names, for its checkpoints
    with pytest.raises(AttributeError):
        glue.no_such_attribute  # noqa: B018
