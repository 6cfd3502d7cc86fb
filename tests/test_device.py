"""Device discipline and bf16 training, on CPU.

- ``check_device`` refuses a CPU tensor on a group whose backend is NCCL, and every ``torch.distributed``
  collective of the package is called from ``ep_megatron/parallel/comm.py`` only (which checks);
- a two-rank run under ``tests/device_model.py``'s model of CUDA's host/device split: every tensor the
  package hands to a collective during a layer forward/backward, a grad sync, a rebalance, a checkpoint
  save and whole trainer steps is a device tensor on a device group and a host tensor on the gloo host
  group (what NCCL would demand), no operation mixes host and device tensors, and a dropless layer
  forward makes one host-device sync at EP 2;
- bf16 training as on GPUs (bf16 parameters and all-to-alls, fp32 masters and moments, fp32 router) with
  rebalancing migrating bf16 rows, masters and moments, and checkpoints holding the fp32 masters: after
  100 steps its loss is within 2 % of the same run without rebalancing.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.device_model import CollectiveAudit, HostDeviceModel, mark_host
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 64, "moe_layer_freq": 1},
    "moe": {"num_experts": 8, "ffn_hidden_size": 32, "top_k": 2, "sharding_strategy": "dynamic",
            "num_redundant_experts": 4, "load_balancing_type": "aux_loss", "aux_loss_coeff": 0.01},
    "data": {"seq_len": 32, "val_fraction": 0.05},
    "train": {"steps": 100, "micro_batch_size": 2, "grad_accum_steps": 1, "lr": 3e-3, "min_lr": 3e-4,
              "warmup_steps": 10, "eval_batches": 1, "eval_interval": 0, "checkpoint_interval": 0,
              "precision": "bf16"},
    "rebalance": {"interval": 2, "window": 2},
}


# ---- the device check and where collectives are called ---------------------------------------------
def test_check_device_refuses_a_cpu_tensor_on_an_nccl_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from ep_megatron.parallel import comm

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(RuntimeError, match="MoE layer 3 count exchange: a cpu tensor .* NCCL group"):
        comm.check_device(torch.zeros(2, 3), None, "MoE layer 3 count exchange")
    with pytest.raises(RuntimeError, match="cannot go over an NCCL group"):
        comm.all_to_all(torch.zeros(2, 3), [1, 1], [1, 1], None, "tokens")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    comm.check_device(torch.zeros(2, 3), None, "gloo carries CPU tensors")


_COLLECTIVE_NAMES = {"all_reduce", "all_to_all_single", "all_to_all", "broadcast", "all_gather",
                     "all_gather_into_tensor", "reduce_scatter_tensor", "reduce", "gather", "scatter",
                     "barrier", "broadcast_object_list", "all_gather_object", "send", "recv"}


def test_only_the_comm_helper_calls_torch_distributed_collectives() -> None:
    offenders = []
    for path in (ROOT / "ep_megatron").rglob("*.py"):
        if path.name == "comm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _COLLECTIVE_NAMES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "dist"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} dist.{node.func.attr}")
    assert offenders == []


# ---- a two-rank run under the host/device model ---------------------------------------------------------
def _corpus(path: Path) -> str:
    """A small English corpus (standard-library docstrings) as a text file; returns its path."""
    import collections
    import json as json_module
    import pathlib
    import textwrap

    docs = [inspect.getdoc(obj) or "" for module in (collections, json_module, pathlib, textwrap)
            for _, obj in inspect.getmembers(module) if inspect.isclass(obj) or inspect.isfunction(obj)]
    path.write_text("\n\n".join(docs) * 4)
    return str(path)


def _config(tmp: str, **sections: dict[str, Any]) -> Any:
    from ep_megatron.trainer.config import load_config

    raw = {name: {**values, **sections.get(name, {})} for name, values in TINY.items()}
    raw["data"]["source"] = str(Path(tmp) / "corpus.txt")
    path = Path(tmp) / f"run_{dist.get_rank()}.json"
    path.write_text(json.dumps(raw))
    return load_config(path)


def _steps(run: Any, steps: int) -> list[float]:
    from ep_megatron.trainer.loop import _reduce_step, _train_step

    losses, moved = [], 0
    for step in range(steps):
        out = _train_step(run, step)
        load = run.moe.take_loads()
        metrics = run.rebalancer.step(load) if run.rebalancer is not None else None
        moved += metrics.slots_moved if metrics is not None else 0
        losses.append(_reduce_step(run, out, load, False)[0])
    run.moved = moved
    return losses


def _layer_syncs(groups: Any) -> tuple[list[str], list[str], list[str]]:
    """Syncs of a dropless layer forward and of its backward at EP 2, and mixed-device operations."""
    from ep_megatron.config import MoEConfig
    from ep_megatron.layer import MoELayer

    config = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=8, top_k=2, shared_expert_ffn_size=8,
                       load_balancing_type="aux_loss", aux_loss_coeff=0.1, z_loss_coeff=0.01,
                       sharding_strategy="dynamic", num_redundant_experts=2)
    layer = MoELayer(config, config.placement(1, groups.ep_size), groups)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(groups.rank), requires_grad=True)
    layer(x)[0].sum().backward()  # warm-up: the replica table is cached per placement
    mark_host(*vars(layer.placement).values())
    with HostDeviceModel() as forward:
        out = layer(x)[0]
    with HostDeviceModel() as backward:
        out.sum().backward()
    return forward.syncs, backward.syncs, forward.mixed + backward.mixed


def _run_pair(tmp: str, steps: int) -> dict[str, Any]:
    """The same bf16 job with and without rebalancing (every 2 steps); the first two steps of the
    rebalanced run, a validation and a checkpoint save run under the host/device model."""
    from ep_megatron.mixed_precision import MixedPrecisionOptimizer
    from ep_megatron.services.checkpoint import save_checkpoint
    from ep_megatron.trainer.loop import _build, evaluate

    if dist.get_rank() == 0:
        _corpus(Path(tmp) / "corpus.txt")
    dist.barrier()
    result: dict[str, Any] = {}
    for name, enabled in (("rebalanced", True), ("static", False)):
        torch.manual_seed(0)
        config = _config(tmp, rebalance={"enabled": enabled, "interval": 2, "window": 2})
        audit = CollectiveAudit(host_group=None)
        with HostDeviceModel() as model, audit:
            run = _build(config, Path(tmp) / name)
            audit.host_group = run.groups.host_group
            losses = _steps(run, 2) if enabled else []  # hook-driven grad sync, optimizer step, a rebalance
            evaluate(run)
        result[f"{name}_audit"] = (audit.errors, audit.calls, model.mixed)
        assert isinstance(run.optimizer, MixedPrecisionOptimizer)
        expert = run.moe.expert_params()[0]
        result[f"{name}_dtypes"] = (str(expert.dtype), str(run.optimizer.master(expert).dtype),
                                    str(run.moe.layers[0].router.expert_bias.dtype))
        moved_before = getattr(run, "moved", 0)
        with _recorded_all_to_all_dtypes() as sent_dtypes:
            losses += _steps(run, steps - len(losses))
        result[name] = losses
        result[f"{name}_moved"] = moved_before + run.moved
        result[f"{name}_a2a_dtypes"] = sorted(sent_dtypes)
        if enabled:
            mark_host(*vars(run.moe.placement).values())  # planned by the rebalancer outside the model
            with HostDeviceModel() as model, CollectiveAudit(run.groups.host_group) as audit:
                path = save_checkpoint(Path(tmp) / "ckpt", steps, run.moe, run.optimizer,
                                       rebalancer=run.rebalancer)
            result["save_audit"] = (audit.errors, audit.calls, model.mixed)
            meta = torch.distributed.checkpoint.FileSystemReader(path).read_metadata().state_dict_metadata
            result["masters"] = {k: str(v.properties.dtype) for k, v in meta.items() if "fp32_param" in k}
            result["replicas_equal"] = _replicas_equal(run)
    forward, backward, mixed = _layer_syncs(run.groups)
    result["syncs"] = (forward, backward, mixed)
    return result


class _recorded_all_to_all_dtypes:  # noqa: N801 - used as a context manager
    """Records the dtypes of the tensors sent by ``dist.all_to_all_single``."""

    def __enter__(self) -> set[str]:
        self.original, self.dtypes = dist.all_to_all_single, set()

        def record(out: torch.Tensor, inp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.dtypes.add(str(inp.dtype))
            return self.original(out, inp, *args, **kwargs)

        dist.all_to_all_single = record
        return self.dtypes

    def __exit__(self, *exc: Any) -> None:
        dist.all_to_all_single = self.original


def _replicas_equal(run: Any) -> bool:
    """Every replica of a logical expert holds the same bf16 weights, fp32 master and moments."""
    from ep_megatron.services.migration import optimizer_rows

    rows = optimizer_rows(run.optimizer)
    for layer in run.moe.layers:
        for tensor in rows.gather(run.moe.layer_expert_params(layer)):
            gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, tensor.contiguous())
            first: dict[int, torch.Tensor] = {}
            for rank, rank_rows in enumerate(gathered):
                rank_ids = run.moe.placement.local_logical_ids(rank % run.groups.ep_size)[layer.layer_idx]
                for slot, e in enumerate(rank_ids.tolist()):
                    if not torch.equal(first.setdefault(e, rank_rows[slot]), rank_rows[slot]):
                        return False
    return True


def test_two_rank_bf16_job_device_discipline_and_rebalanced_losses(tmp_path: Path) -> None:
    """One launch, two checks: (1) device discipline of a layer forward/backward, a grad sync, a
    rebalance, a validation, a checkpoint save and whole trainer steps, and one host sync per dropless
    layer forward; (2) bf16 as on GPUs, with rebalancing, tracks the run without (20 steps here;
    ``benchmarks/bench_bf16_rebalance.py`` runs the 100-step comparison)."""
    results = run_ranks(_run_pair, 2, str(tmp_path), 20, timeout_s=300)
    for rank, result in enumerate(results):
        for key in ("rebalanced_audit", "static_audit", "save_audit"):
            errors, calls, mixed = result[key]
            assert errors == [] and mixed == [], (rank, key, errors[:5], mixed[:5])
        assert result["rebalanced_audit"][1].get("all_to_all_single", 0) > 0
        assert result["save_audit"][1].get("all_reduce", 0) > 0, "the save's counter sum must be audited"
        forward, backward, mixed = result["syncs"]
        assert len(forward) == 1 and "dispatcher.py" in forward[0], forward
        assert backward == [] and mixed == [], (backward, mixed)
    result = results[0]
    assert result["rebalanced_dtypes"] == ("torch.bfloat16", "torch.float32", "torch.float32")
    assert result["rebalanced_moved"] > 0 and result["static_moved"] == 0
    # tokens and their gradients travel in bf16 (count exchanges are int64, migrations raw bytes)
    assert "torch.bfloat16" in result["rebalanced_a2a_dtypes"]
    assert "torch.float32" not in result["rebalanced_a2a_dtypes"], result["rebalanced_a2a_dtypes"]
    assert result["masters"] and set(result["masters"].values()) == {"torch.float32"}
    assert result["replicas_equal"]
    rebalanced, static = result["rebalanced"], result["static"]
    assert static[-1] < 0.9 * static[0], "the run must train"
    # bf16 rounds the replica sums differently, so the trajectories drift apart like two seeds (single
    # steps differ by up to ~7 % early on); over 20 steps compare the mean of the last 5 within 5 %. The
    # 100-step comparison (2 %) is benchmarks/bench_bf16_rebalance.py.
    tail_a, tail_b = sum(rebalanced[-5:]) / 5, sum(static[-5:]) / 5
    assert abs(tail_a - tail_b) <= 0.05 * tail_b, (rebalanced[-5:], static[-5:])


def test_a_bf16_run_resumes_exactly_from_its_checkpoint(tmp_path: Path) -> None:
    """Masters, moments and hyperparameters of the mixed-precision optimizer survive a checkpoint: two
    steps, save, load into a fresh model, and the next step gives identical bf16 parameters."""
    from ep_megatron.config import MoEConfig
    from ep_megatron.layer import MoELayer
    from ep_megatron.layer.moe_layers import MoELayers
    from ep_megatron.mixed_precision import MixedPrecisionOptimizer, to_low_precision
    from ep_megatron.parallel import ParallelGroups
    from ep_megatron.parallel.grad_sync import ExpertGradSync
    from ep_megatron.services.checkpoint import load_checkpoint, save_checkpoint
    from ep_megatron.trainer.model import GPTConfig, MoEGPT
    from ep_megatron.trainer.step import forward_backward, optimizer_step

    moe_cfg = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2,
                        sharding_strategy="dynamic", num_redundant_experts=2)
    gpt = GPTConfig(vocab_size=30, max_seq_len=8, hidden_size=16, num_layers=2, num_heads=2,
                    ffn_hidden_size=32)
    tokens = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    micro = [(tokens[:, :-1], tokens[:, 1:])]

    def build() -> tuple[Any, Any, Any]:
        placement = moe_cfg.placement(2, 1)
        groups = ParallelGroups.single()
        model = to_low_precision(MoEGPT(gpt, lambda i: MoELayer(moe_cfg, placement, groups, i)))
        moe = MoELayers(model)
        optimizer = MixedPrecisionOptimizer(moe.param_groups(0.1), lambda g: torch.optim.AdamW(g, lr=1e-2))
        return moe, optimizer, ExpertGradSync(moe)

    def step(moe: Any, optimizer: Any, sync: Any) -> None:
        forward_backward(moe, micro, lambda i, t: moe.model(i, t)[0], lambda loss: loss.backward(), sync)
        optimizer_step(moe, optimizer, sync, max_norm=1.0)

    moe, optimizer, sync = build()
    for _ in range(2):
        step(moe, optimizer, sync)
    save_checkpoint(tmp_path, 2, moe, optimizer)
    resumed, resumed_optimizer, resumed_sync = build()
    load_checkpoint(tmp_path, resumed, resumed_optimizer)
    step(moe, optimizer, sync)
    step(resumed, resumed_optimizer, resumed_sync)
    for (name, a), b in zip(moe.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(moe.expert_params(), resumed.expert_params()):
        assert a.dtype == torch.bfloat16 and torch.equal(optimizer.master(a), resumed_optimizer.master(b))
