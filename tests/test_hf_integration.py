"""Hugging Face MoE models: swap, train under DeepSpeed with rebalancing, export / import.

The reference is the ``transformers`` model itself (its own routing code), run on the same tokens; tiny
random-init fp32 models are built from ``transformers`` configs (no hub download).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="transformers >= 5 (the 'hf' extra) is not installed")

from ep_megatron.config import MoEConfig  # noqa: E402
from ep_megatron.integrations import hf  # noqa: E402
from ep_megatron.layer import MoELayer  # noqa: E402
from ep_megatron.layer.moe_layers import MoELayers  # noqa: E402
from ep_megatron.parallel import ParallelGroups  # noqa: E402
from ep_megatron.services.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ep_megatron.trainer.cli import main as cli_main  # noqa: E402
from ep_megatron.trainer.hf_export import mixtral_config_for  # noqa: E402
from ep_megatron.trainer.model import GPTConfig, MoEGPT  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64,
               initializer_range=0.2)  # a large init, so that the experts move the logits
FAMILY_CASES = ("mixtral", "qwen3_moe", "qwen3_moe_norm", "qwen2_moe", "deepseek_v3", "deepseek_v3_no_norm")
STRATEGIES = {"data": {}, "model": {}, "hybrid": {"replicated_experts": (0, 5)},
              "dynamic": {"num_redundant_experts": 2}}


def build_hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-init ``transformers`` model of ``case`` (8 experts), in eval mode."""
    torch.manual_seed(seed)
    if case == "mixtral":
        config = transformers.MixtralConfig(**_COMMON, intermediate_size=32, num_local_experts=8,
                                            num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(config).eval()
    if case.startswith("qwen3_moe"):
        config = transformers.Qwen3MoeConfig(**_COMMON, head_dim=8, moe_intermediate_size=32,
                                             intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                             mlp_only_layers=[1], norm_topk_prob=case.endswith("norm"))
        return transformers.Qwen3MoeForCausalLM(config).eval()
    if case == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=32, intermediate_size=48,
                                             num_experts=8, num_experts_per_tok=2,
                                             shared_expert_intermediate_size=48)
        return transformers.Qwen2MoeForCausalLM(config).eval()
    config = transformers.DeepseekV3Config(
        **_COMMON, moe_intermediate_size=32, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=4,
        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        norm_topk_prob=case == "deepseek_v3")
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):  # non-zero, so that it changes some choices
                module.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


def token_batch(rank: int, step: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1000 * step + rank))


def _hf_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]


def _forward_backward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, HF aux loss or None)``; backward of the LM loss (plus HF's aux loss where the family has
    one: Mixtral and the Qwens, through the swapped blocks' router-logits taps)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    return out.logits.detach(), None if out.aux_loss is None else out.aux_loss.detach()


def _reference_grads(blocks: list[torch.nn.Module]) -> list[dict[str, torch.Tensor]]:
    """Per MoE block: router [E, H] and expert [E, ...] gradients of the HF model."""
    return [{"router": b.gate.weight.grad.clone(), "fc1": b.experts.gate_up_proj.grad.clone(),
             "fc2": b.experts.down_proj.grad.clone()} for b in blocks]


def _check_grads(swap: hf.HFSwap, reference: list[dict[str, torch.Tensor]], ep_rank: int) -> None:
    """Our router grads and every local slot's rows equal the HF gradients of its logical expert."""
    for layer, ref in zip(swap.moe.layers, reference, strict=True):
        logical_ids = layer.placement.local_logical_ids(ep_rank)[layer.layer_idx]
        close = dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.router.weight.grad, ref["router"], **close)
        torch.testing.assert_close(layer.experts.fc1_weight.grad, ref["fc1"][logical_ids], **close)
        torch.testing.assert_close(layer.experts.fc2_weight.grad, ref["fc2"][logical_ids], **close)


# ---- one process -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_swap_matches_hf_logits_and_grads_one_rank(case):
    original = build_hf_model(case)
    ids = token_batch(0)
    swapped = copy.deepcopy(original)
    ref_logits, ref_aux = _forward_backward(original, ids)
    reference = _reference_grads(_hf_blocks(original))
    swap = hf.swap_moe_blocks(swapped, ParallelGroups.single())
    assert not _hf_blocks(swapped) and len(swap.moe.layers) == len(reference)
    logits, aux = _forward_backward(swapped, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert (aux is None) == (ref_aux is None) == case.startswith("deepseek")
    if aux is not None:
        torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=0)
    _check_grads(swap, reference, ep_rank=0)
    embed, ref_embed = swapped.model.embed_tokens.weight, original.model.embed_tokens.weight
    torch.testing.assert_close(embed.grad, ref_embed.grad, rtol=1e-4, atol=1e-6)
    # The comparison can fail: flipping the experts' sign (DeepSeek: zeroing the selection bias) moves logits.
    with torch.no_grad():
        for block in _hf_blocks(original):
            if case.startswith("deepseek"):
                block.gate.e_score_correction_bias.zero_()
            else:
                block.experts.gate_up_proj.neg_()
        assert (original(input_ids=ids).logits - ref_logits).abs().max() > 1e-3


def test_our_seq_aux_loss_on_a_swapped_model_leaves_the_logits():
    original = build_hf_model("mixtral")
    swapped = copy.deepcopy(original)
    swap = hf.swap_moe_blocks(swapped, ParallelGroups.single(), load_balancing_type="seq_aux_loss",
                              aux_loss_coeff=0.01)
    ids = token_batch(0)
    logits, _ = _forward_backward(swapped.train(), ids)  # [seq, batch]-major tokens for per-sequence losses
    torch.testing.assert_close(logits, original.train()(input_ids=ids).logits.detach(), rtol=0, atol=1e-5)
    assert all(layer.last_aux_losses["seq_aux_loss"] > 0 for layer in swap.moe.layers)


def test_unmapped_models_and_options_are_refused_by_name():
    olmoe = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
        num_experts=4, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="model_type='olmoe' is not mapped"):
        hf.swap_moe_blocks(olmoe, ParallelGroups.single())
    jitter = transformers.MixtralConfig(**_COMMON, router_jitter_noise=0.1)
    with pytest.raises(ValueError, match="router_jitter_noise=0.1"):
        hf.moe_config_from_hf(jitter)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        hf.moe_config_from_hf(transformers.MixtralConfig(**_COMMON, hidden_act="gelu"))
    groups = transformers.DeepseekV3Config(**_COMMON, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                           topk_group=2)
    with pytest.raises(ValueError, match="num_experts_per_tok == 2 \\* topk_group"):
        hf.moe_config_from_hf(groups)
    model = build_hf_model("mixtral")
    with pytest.raises(ValueError, match="'top_k'.*set by the Hugging Face mixtral config"):
        hf.swap_moe_blocks(model, ParallelGroups.single(), top_k=1)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        hf.swap_moe_blocks(model, ParallelGroups.single())
    assert len(_hf_blocks(model)) == 3  # nothing was swapped


def _save_swapped(model: torch.nn.Module, swap: hf.HFSwap, root: Path) -> Path:
    return save_checkpoint(root, 1, swap.moe, None, extra=swap.checkpoint_extra())


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_hf_dir_import_export_round_trip_and_load_into_swapped_model(tmp_path, case):
    original = build_hf_model(case)
    original.save_pretrained(tmp_path / "hf")
    # HF dir -> our checkpoint (CLI) -> HF dir: identical tensors
    assert cli_main(["ckpt", "convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--to", "ep-megatron",
                     "--from", "hf"]) == 0
    assert cli_main(["ckpt", "convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf",
                     "--hf-config", str(tmp_path / "hf")]) == 0
    hf.export_hf(tmp_path / "ours", tmp_path / "sharded", hf_config=tmp_path / "hf", max_shard_bytes=50_000)
    saved = hf.read_hf_tensors(tmp_path / "hf")
    for name in ("back", "sharded"):
        exported = hf.read_hf_tensors(tmp_path / name)
        assert sorted(exported) == sorted(saved)
        assert all(torch.equal(exported[k], saved[k]) for k in saved)
    index = json.loads((tmp_path / "sharded" / hf.convert.INDEX_FILE).read_text())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards and len(shards) > 1
    # our checkpoint loads into a swapped model built from another seed: the HF model's logits
    swapped = build_hf_model(case, seed=1)
    swap = hf.swap_moe_blocks(swapped, ParallelGroups.single(), sharding_strategy="dynamic",
                              num_redundant_experts=3)
    load_checkpoint(tmp_path / "ours", swap.moe, None)
    ids = token_batch(0)
    ref_logits = original(input_ids=ids).logits
    torch.testing.assert_close(swapped(input_ids=ids).logits, ref_logits, rtol=0, atol=1e-5)
    # ... and its export (config.json recorded at the swap) loads with from_pretrained
    exported = hf.export_hf(_save_swapped(swapped, swap, tmp_path / "swapped"), tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded) is type(original)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, ref_logits, rtol=0, atol=1e-5)


def test_moegpt_exports_to_mixtral_where_it_maps(tmp_path):
    gpt = GPTConfig(vocab_size=VOCAB, max_seq_len=32, hidden_size=32, num_layers=2, num_heads=4,
                    ffn_hidden_size=48, moe_layer_freq=1, tie_embeddings=True, init_std=0.2)
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=4, top_k=2, init_std=0.2,
                    load_balancing_type="aux_loss", aux_loss_coeff=0.01)
    placement = moe.placement(2, ep_size=1)
    model = MoEGPT(gpt, lambda i: MoELayer(moe, placement, ParallelGroups.single(), i)).eval()
    save_checkpoint(tmp_path / "ckpt", 3, MoELayers(model), None)
    run_yaml = tmp_path / "run.yaml"  # what `ep-megatron train` ran with (the model and data sections matter)
    run_yaml.write_text(json.dumps({
        "model": {k: getattr(gpt, k) for k in ("hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                                                "moe_layer_freq", "tie_embeddings", "init_std")},
        "moe": {"num_experts": 4, "ffn_hidden_size": 32, "top_k": 2}, "data": {"seq_len": gpt.max_seq_len}}))
    assert cli_main(["ckpt", "convert", str(tmp_path / "ckpt"), str(tmp_path / "mixtral"), "--to", "hf",
                     "--model-config", str(run_yaml)]) == 0
    mixtral = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ids = token_batch(0, seq=16)
    torch.testing.assert_close(mixtral(input_ids=ids).logits, model(ids), rtol=0, atol=1e-5)
    for field, value in [("moe_layer_freq", 2), ("activation", "gelu"), ("score_function", "sigmoid"),
                         ("shared_expert_ffn_size", 16)]:
        bad_gpt = GPTConfig(**{**gpt.__dict__, field: value}) if field == "moe_layer_freq" else gpt
        bad_moe = MoEConfig(**{**moe.__dict__, field: value}) if field != "moe_layer_freq" else moe
        with pytest.raises(ValueError, match=f"{field}=.* does not map to Mixtral"):
            mixtral_config_for(bad_gpt, bad_moe)


# ---- two ranks ---------------------------------------------------------------------------------------
def _swap_two_ranks() -> None:
    """Every family (Mixtral, Qwen3-MoE, DeepSeek-V3) x strategy at EP 2: logits and summed grads match."""
    import torch.distributed as dist

    from ep_megatron.parallel import build_groups
    from ep_megatron.parallel.grad_sync import ExpertGradSync

    groups = build_groups(ep_size=2)
    ids = token_batch(groups.rank)
    for case in ("mixtral", "qwen3_moe", "deepseek_v3"):
        original = build_hf_model(case)
        pristine = copy.deepcopy(original)
        ref_logits, _ = _forward_backward(original, ids)
        reference = _reference_grads(_hf_blocks(original))
        for grads in reference:  # the gradient of the sum of both ranks' losses
            for grad in grads.values():
                dist.all_reduce(grad)
        for strategy, options in STRATEGIES.items():
            swapped = copy.deepcopy(pristine)
            swap = hf.swap_moe_blocks(swapped, groups, sharding_strategy=strategy, **options)
            logits, _ = _forward_backward(swapped, ids)
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5, msg=f"{case} {strategy}")
            ExpertGradSync(swap.moe, grad_scale=1.0).sync_grads()  # sum over replicas
            for layer in swap.moe.layers:
                dist.all_reduce(layer.router.weight.grad)
            _check_grads(swap, reference, groups.ep_rank)


def test_swap_matches_hf_on_two_ranks_every_strategy():
    run_ranks(_swap_two_ranks, 2, timeout_s=240)


def _ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}


def _train(strategy: str, steps: int, root: Path | None) -> tuple[list[float], int]:
    """Train a swapped Mixtral under DeepSpeed ZeRO-2; ``dynamic`` rebalances every 4 steps."""
    from ep_megatron.integrations import deepspeed as ep_ds
    from ep_megatron.parallel import build_groups
    from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer

    groups = build_groups(ep_size=2)
    model = build_hf_model("mixtral").train()
    options = {"num_redundant_experts": 2} if strategy == "dynamic" else {}
    swap = hf.swap_moe_blocks(model, groups, sharding_strategy=strategy, **options)
    engine, *_ = ep_ds.initialize(swap.moe, lambda pg: torch.optim.AdamW(pg, lr=3e-3), _ds_config())
    rebalancer = None
    if strategy == "dynamic":
        rebalancer = Rebalancer(swap.moe, ep_ds.optimizer_rows(engine), RebalanceConfig(interval=4, window=4))
    losses, moved = [], 0
    for step in range(steps):
        ids = token_batch(groups.rank, step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        swap.moe.update_expert_bias()
        if rebalancer is not None:
            metrics = rebalancer.step()
            moved += metrics.slots_moved if metrics is not None else 0
        losses.append(float(loss))
    if root is not None:  # export -> from_pretrained gives our logits, on every rank's tokens
        path = save_checkpoint(root / "ckpt", steps, swap.moe, None, extra=swap.checkpoint_extra())
        if groups.rank == 0:
            hf.export_hf(path, root / "hf")
        torch.distributed.barrier()
        model.eval()
        ids = token_batch(groups.rank, steps)
        with torch.no_grad():
            ours = model(input_ids=ids).logits
            theirs = transformers.MixtralForCausalLM.from_pretrained(root / "hf").eval()(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    return losses, moved


def _train_both(root: str) -> tuple[list[float], list[float], int]:
    static, _ = _train("model", 20, None)
    dynamic, moved = _train("dynamic", 20, Path(root))
    return static, dynamic, moved


def test_deepspeed_zero2_dynamic_rebalancing_equals_model_and_exports(tmp_path):
    results = run_ranks(_train_both, 2, str(tmp_path), timeout_s=300)
    for static, dynamic, moved in results:
        assert moved > 0, "the rebalancer never moved a slot"
        torch.testing.assert_close(torch.tensor(dynamic), torch.tensor(static), rtol=1e-5, atol=0)
