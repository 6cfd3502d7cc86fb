"""The GPU check: run by ``scripts/gpu_check.sh`` on one CUDA GPU (skipped without one).

- ``ep-megatron train`` at world size 1 on NCCL, bf16, with rebalances, checkpoints and a resume;
- two processes sharing the GPU over gloo with CUDA tensors, EP 2 (NCCL refuses two ranks on one GPU):
  the layer against the dense reference, hook-driven grad sync on a side stream, bf16 masters, a
  migration, a checkpoint save and load;
- ``torch._grouped_mm`` against the per-slot loop in bf16 (where the gate allows the grouped path);
- host-device syncs of a layer forward and backward counted by ``torch.cuda.set_sync_debug_mode``;
- DeepSpeed ZeRO-2 bf16 steps (skipped where DeepSpeed is not installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden_size=128",
        "moe.ffn_hidden_size=64", "data.seq_len=64", "train.micro_batch_size=4", "train.eval_batches=2",
        "train.warmup_steps=2", "train.precision=bf16", "train.eval_interval=0", "rebalance.interval=3",
        "rebalance.window=3"]


def _train(run_dir: Path, steps: int, extra: list[str] = (), timeout: float = 240) -> str:
    """``ep-megatron train configs/tiny_cpu.yaml`` under torchrun with one process (NCCL on the GPU)."""
    sets = [arg for item in [*TINY, f"train.steps={steps}", *extra] for arg in ("--set", item)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "ep_megatron", "train", str(ROOT / "configs" / "tiny_cpu.yaml"), "--run-dir", str(run_dir),
               *sets]
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    proc = subprocess.run(command, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout + proc.stderr


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_on_nccl_world_size_1_with_rebalance_checkpoint_and_resume(tmp_path: Path) -> None:
    _train(tmp_path, 8, ["train.checkpoint_interval=4"])
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["backend"] == "nccl" and info["device"].startswith("cuda")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    _train(tmp_path, 12, ["train.checkpoint_interval=4"])  # resumes from step 8
    train = [r for r in _records(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    # at EP 1 every placement is balanced across ranks, so the rebalances plan and keep the placement;
    # moving rows on the GPU is checked by the two-process test
    assert sum("rebalance" in r for r in train) >= 3, "the rebalance hook must run every 3 steps"
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]


# ---- two processes, one GPU, gloo with CUDA tensors ------------------------------------------------------
def _two_ranks_on_one_gpu(tmp: str, device_name: str = "cuda") -> dict[str, Any]:
    import torch.distributed as dist

    from ep_megatron.layer import MoELayer
    from ep_megatron.layer.moe_layers import MoELayers
    from ep_megatron.mixed_precision import MixedPrecisionOptimizer, to_low_precision
    from ep_megatron.parallel import build_groups
    from ep_megatron.parallel.grad_sync import ExpertGradSync
    from ep_megatron.placement import ExpertPlacement
    from ep_megatron.services.checkpoint import load_checkpoint, save_checkpoint
    from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer
    from ep_megatron.trainer.step import optimizer_step
    from tests.reference import dense_moe_reference
    from tests.test_layer import make_config, make_placement, make_tokens, make_weights

    device = torch.device(device_name, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = build_groups(2)
    result: dict[str, Any] = {}

    # the layer against the dense reference (fp32), skewed routing, replicas on both ranks
    cfg = make_config(shared_expert_ffn_size=6, load_balancing_type="aux_loss", aux_loss_coeff=0.1)
    placement = make_placement("dynamic_plan", 2)
    layer = MoELayer(cfg, placement, groups)
    weights = make_weights(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(weights["skew_router_weight"])
        logical = placement.local_logical_ids(groups.ep_rank)[0]
        layer.experts.fc1_weight.copy_(weights["expert_fc1"][logical])
        layer.experts.fc2_weight.copy_(weights["expert_fc2"][logical])
        layer.shared_experts.fc1_weight.copy_(weights["shared_fc1"])
        layer.shared_experts.fc2_weight.copy_(weights["shared_fc2"])
    layer.to(device)
    x, g = make_tokens(groups.rank, skewed=True)
    x_cuda = x.to(device).requires_grad_(True)
    out, _ = layer(x_cuda)
    (out * g.to(device)).sum().backward()
    ref = dense_moe_reference(x, weights["skew_router_weight"], weights["expert_fc1"], weights["expert_fc2"],
                              cfg, shared_fc1=weights["shared_fc1"], shared_fc2=weights["shared_fc2"])
    result["layer_error"] = float((out.detach().cpu() - ref.output).abs().max())

    # bf16 model of two layers: hook-driven grad sync (side stream), masters, a migration, a checkpoint
    config = make_config(sharding_strategy="dynamic", num_redundant_experts=4)
    moe = MoELayers(torch.nn.ModuleList(MoELayer(config, config.placement(2, 2), groups, i)
                                        for i in range(2)))
    model = moe.model.to(device)
    to_low_precision(model)
    optimizer = MixedPrecisionOptimizer([{"params": list(model.parameters())}],
                                        lambda groups_: torch.optim.AdamW(groups_, lr=1e-2))
    sync = ExpertGradSync(moe)
    rebalancer = Rebalancer(moe, optimizer, RebalanceConfig(interval=1, window=1))
    tokens = x.to(device, torch.bfloat16)
    for _ in range(2):
        sync.arm()
        h = tokens
        for moe_layer in moe.layers:
            h = moe_layer(h)[0]
        h.float().square().sum().backward()
        optimizer_step(moe, optimizer, sync, max_norm=1.0)  # routers averaged over both ranks
        rebalancer.step(moe.take_loads())
    plan = torch.tensor([[1, 1, 0, 2, 3, 4, 5, 6, 7, 0, 1, 2]] * 2)
    rebalancer.migrate_to(ExpertPlacement.from_plan(plan, 8, 2))
    result["dtypes"] = {str(p.dtype) for p in moe.expert_params()} | {
        str(optimizer.master(p).dtype) for p in moe.expert_params()}
    path = save_checkpoint(Path(tmp) / "ckpt", 2, moe, optimizer)
    fresh = MoELayers(torch.nn.ModuleList(MoELayer(config, config.placement(2, 2), groups, i)
                                          for i in range(2)))
    to_low_precision(fresh.model.to(device))
    fresh_optimizer = MixedPrecisionOptimizer([{"params": list(fresh.model.parameters())}],
                                              lambda groups_: torch.optim.AdamW(groups_, lr=1e-2))
    load_checkpoint(path, fresh, fresh_optimizer)
    result["reloaded_equal"] = all(torch.equal(a, b) for a, b in zip(moe.model.state_dict().values(),
                                                                      fresh.model.state_dict().values()))
    dist.barrier()
    return result


def test_two_processes_share_the_gpu_over_gloo_with_cuda_tensors(tmp_path: Path) -> None:
    from tests.multirank import run_ranks

    results = run_ranks(_two_ranks_on_one_gpu, 2, str(tmp_path), timeout_s=240)
    for rank, result in enumerate(results):
        assert result["layer_error"] < 1e-4, (rank, result["layer_error"])
        assert result["dtypes"] == {"torch.bfloat16", "torch.float32"}, result["dtypes"]
        assert result["reloaded_equal"], rank


# ---- grouped GEMM -----------------------------------------------------------------------------------
def test_grouped_mm_and_the_per_slot_loop_agree_in_bf16() -> None:
    from ep_megatron.config import MoEConfig
    from ep_megatron.layer.experts import GroupedExperts, grouped_mm_supported

    device = torch.device("cuda", 0)
    cfg = MoEConfig(hidden_size=256, ffn_hidden_size=512, num_experts=8, top_k=2)
    experts = GroupedExperts(cfg, 8, "ep_size_1").to(device)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.05, generator=torch.Generator(device).manual_seed(1))
    counts = [37, 0, 5, 130, 1, 0, 64, 19]  # empty slots, counts that are not multiples of 16
    rows32 = torch.randn(sum(counts), 256, device=device, generator=torch.Generator(device).manual_seed(2))
    weight = torch.randn(sum(counts), 256, device=device, generator=torch.Generator(device).manual_seed(3))
    reference = experts.per_slot(rows32, counts)  # fp32
    experts.to(torch.bfloat16)
    rows = rows32.to(torch.bfloat16)
    if not grouped_mm_supported(rows, (experts.fc1_weight, experts.fc2_weight)):
        pytest.skip(f"torch._grouped_mm has no bf16 kernel for compute capability "
                    f"{torch.cuda.get_device_capability()} in torch {torch.__version__}")
    offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    outputs = {}
    for name, path in (("grouped", lambda r: experts.grouped(r, offsets)),
                       ("per_slot", lambda r: experts.per_slot(r, counts))):
        experts.zero_grad(set_to_none=True)
        r = rows.clone().requires_grad_(True)
        out = path(r)
        (out.float() * weight).sum().backward()
        outputs[name] = (out.float(), r.grad.float(), experts.fc1_weight.grad.float(),
                         experts.fc2_weight.grad.float())
    error = lambda a: float((a - reference).abs().max())  # noqa: E731
    assert error(outputs["grouped"][0]) <= 2 * error(outputs["per_slot"][0]) + 1e-3
    for got, expected in zip(outputs["grouped"][1:], outputs["per_slot"][1:]):
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)


# ---- syncs ------------------------------------------------------------------------------------------
def test_one_sync_per_layer_forward_and_none_in_backward_by_cuda_sync_debug_mode() -> None:
    from ep_megatron.config import MoEConfig
    from ep_megatron.layer import MoELayer
    from ep_megatron.mixed_precision import to_low_precision
    from ep_megatron.parallel import ParallelGroups

    cfg = MoEConfig(hidden_size=256, ffn_hidden_size=256, num_experts=8, top_k=2, shared_expert_ffn_size=128,
                    load_balancing_type="aux_loss", aux_loss_coeff=0.01, z_loss_coeff=0.001,
                    sharding_strategy="dynamic", num_redundant_experts=4)
    layer = to_low_precision(MoELayer(cfg, cfg.placement(1, 1), ParallelGroups.single()).cuda())
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)[0].float().sum().backward()  # warm-up: cached tables, kernels loaded
    torch.cuda.synchronize()

    def count(fn: Any) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

    outputs = []
    forward = count(lambda: outputs.append(layer(x)[0]))
    loss = outputs[0].float().sum()
    backward = count(loss.backward)
    assert 1 <= len(forward) <= 2, forward
    assert backward == [], backward


# ---- DeepSpeed ----------------------------------------------------------------------------------------
def test_deepspeed_zero2_bf16_steps(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (scripts/gpu_check.sh installs it "
                                            "from wheels/ when a deepspeed wheel or sdist is there)")
    _train(tmp_path, 4, [f"train.deepspeed_config={ROOT / 'configs' / 'ds_zero2.json'}"], timeout=300)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["optimizer"] == "DeepSpeed ZeRO stage 2 AdamW"
    train = [r for r in _records(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(r["loss"] < 10 for r in train)
