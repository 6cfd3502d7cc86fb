"""MoE layer forward+backward: ours vs DeepSpeed's ``deepspeed.moe.layer.MoE`` vs the bare expert GEMMs.

Same shapes for everyone (hidden 512, expert FFN 1024 with SwiGLU, 8 experts, top-2, 2048 tokens per
rank, 2 gloo ranks with one thread each, fp32), same router weight and tokens. Measured, as the median
over iterations of the slowest rank's wall time of one forward+backward (loss ``(out * g).sum()``):

- ``ours``: our layer, dropless, ``model`` placement (and, under skew, a ``dynamic`` placement planned by
  ``ep_megatron.placement.eplb`` from the measured load with 2 redundant slots);
- ``deepspeed_dropless``: ``MoE(drop_tokens=False)`` (pads every expert to the largest expert's count);
- ``deepspeed_cf1``: ``MoE(capacity_factor=1.0)`` (drops tokens);
- ``gemm``: the same expert MLPs over ``tokens * top_k`` rows per rank split evenly over the local
  experts, forward+backward (input and weight gradients) - the limit.

Uniform routing uses a small random router; skewed routing pushes half of the tokens to expert 0.
Prints a table, then one JSON line. ``python benchmarks/bench_layer.py`` runs everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HIDDEN, FFN, EXPERTS, TOP_K, TOKENS, RANKS, REDUNDANT = 512, 1024, 8, 2, 2048, 2, 2
_GROUPS: dict[str, Any] = {}  # our ParallelGroups, created once per rank


def _timed(step: Callable[[], None], iters: int, warmup: int) -> float:
    """Median over ``iters`` of the slowest rank's wall time of ``step`` (ms)."""
    import torch
    import torch.distributed as dist

    times = []
    for i in range(warmup + iters):
        dist.barrier()
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(elapsed))
    return statistics.median(times) * 1e3


def _inputs(rank: int, skewed: bool) -> tuple[Any, Any, Any]:
    """``(router_weight [E, H], tokens [T, H], loss weights [T, H])``; skew pushes half to expert 0."""
    import torch

    gen = torch.Generator().manual_seed(7)
    router = torch.randn(EXPERTS, HIDDEN, generator=gen) * 0.02
    gen.manual_seed(100 + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    if skewed:
        router[:, 0] = -1.0
        router[0, 0] = 1.0
        x[:, 0] = 0.0
        x[: TOKENS // 2, 0] = 6.0
    return router, x, torch.randn(TOKENS, HIDDEN, generator=gen)


def _swiglu_expert() -> Any:
    """DeepSpeed's expert module: the same SwiGLU MLP as ours (torch is imported in the ranks only)."""
    import torch.nn.functional as F
    from torch import nn

    class SwiGLUExpert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear_fc1 = nn.Linear(HIDDEN, 2 * FFN, bias=False)
            self.linear_fc2 = nn.Linear(FFN, HIDDEN, bias=False)

        def forward(self, x: Any) -> Any:
            gate, up = self.linear_fc1(x).chunk(2, dim=-1)
            return self.linear_fc2(F.silu(gate) * up)

    return SwiGLUExpert()


def _fwd_bwd(module: Any, x: Any, g: Any) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = module(x)[0]
        (out * g).sum().backward()

    return step


def _rows_ratio(layer: Any, x: Any, g: Any) -> float:
    """max / mean over ranks of the rows entering each rank's experts (one forward+backward)."""
    import torch
    import torch.distributed as dist

    rows = []
    handle = layer.experts.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    _fwd_bwd(layer, x, g)()
    handle.remove()
    per_rank = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, torch.tensor([float(rows[0])]))
    loads = torch.cat(per_rank)
    return float(loads.max() / loads.mean())


def _ours(placement: Any, router: Any) -> Any:
    import torch

    from ep_megatron.config import MoEConfig
    from ep_megatron.layer import MoELayer
    from ep_megatron.parallel import build_groups

    if "groups" not in _GROUPS:
        _GROUPS["groups"] = build_groups(RANKS)
    config = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=TOP_K)
    layer = MoELayer(config, placement, _GROUPS["groups"])
    with torch.no_grad():
        layer.router.weight.copy_(router)
    return layer


def _deepspeed(router: Any, drop_tokens: bool) -> Any:
    import torch
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    moe = MoE(HIDDEN, _swiglu_expert(), num_experts=EXPERTS, ep_size=RANKS, k=TOP_K, capacity_factor=1.0,
              drop_tokens=drop_tokens, top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(router)
    return moe


def _gemm_step() -> Callable[[], None]:
    """Bare expert GEMMs: ``tokens * top_k`` rows split evenly over the local experts."""
    import torch
    import torch.nn.functional as F

    local = EXPERTS // RANKS
    rows = torch.randn(TOKENS * TOP_K, HIDDEN, requires_grad=True)
    fc1 = (torch.randn(local, 2 * FFN, HIDDEN) * 0.02).requires_grad_(True)
    fc2 = (torch.randn(local, HIDDEN, FFN) * 0.02).requires_grad_(True)
    out_grad = torch.randn(TOKENS * TOP_K // local, HIDDEN)

    def step() -> None:
        rows.grad = fc1.grad = fc2.grad = None
        loss = rows.new_zeros(())
        for expert, segment in enumerate(rows.chunk(local)):
            gate, up = (segment @ fc1[expert].t()).chunk(2, dim=-1)
            loss = loss + ((F.silu(gate) * up) @ fc2[expert].t() * out_grad).sum()
        loss.backward()

    return step


def _dynamic_placement(router: Any, x: Any) -> Any:
    """Plan ``E + REDUNDANT`` slots from the global load the router measures on these tokens."""
    import torch
    import torch.distributed as dist

    from ep_megatron.placement import ExpertPlacement
    from ep_megatron.placement.eplb import rebalance_experts

    probe = _ours(ExpertPlacement.model(1, EXPERTS, RANKS), router)
    with torch.no_grad():
        probe(x)
    load = probe.take_load().double()
    dist.all_reduce(load)
    phy2log = rebalance_experts(load.unsqueeze(0), EXPERTS + REDUNDANT, 1, 1, RANKS)[0]
    return ExpertPlacement.from_plan(phy2log, EXPERTS, RANKS)


def _bench(iters: int, warmup: int) -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist

    from ep_megatron.placement import ExpertPlacement

    deepspeed.init_distributed(dist_backend="gloo")
    results: dict[str, Any] = {}
    for prefix, skewed in (("", False), ("skew_", True)):
        router, x, g = _inputs(dist.get_rank(), skewed)
        x.requires_grad_(True)
        model = _ours(ExpertPlacement.model(1, EXPERTS, RANKS), router)
        results[f"{prefix}ours_model_ms"] = _timed(_fwd_bwd(model, x, g), iters, warmup)
        results[f"{prefix}model_max_over_mean"] = _rows_ratio(model, x, g)
        if skewed:
            dynamic = _ours(_dynamic_placement(router, x.detach()), router)
            results[f"{prefix}ours_dynamic_ms"] = _timed(_fwd_bwd(dynamic, x, g), iters, warmup)
            results[f"{prefix}dynamic_max_over_mean"] = _rows_ratio(dynamic, x, g)
        for name, drop in (("deepspeed_dropless_ms", False), ("deepspeed_cf1_ms", True)):
            results[prefix + name] = _timed(_fwd_bwd(_deepspeed(router, drop), x, g), iters, warmup)
    results["gemm_ms"] = _timed(_gemm_step(), iters, warmup)
    results["ours_ms"] = results["ours_model_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per configuration")
    args = parser.parse_args()
    from tests.multirank import run_ranks

    res = run_ranks(_bench, RANKS, args.iters, args.warmup, timeout_s=900)[0]
    gemm = res["gemm_ms"]
    rows = [
        ("uniform", "ours (model, dropless)", res["ours_ms"], res["model_max_over_mean"]),
        ("uniform", "deepspeed dropless", res["deepspeed_dropless_ms"], None),
        ("uniform", "deepspeed capacity 1.0", res["deepspeed_cf1_ms"], None),
        ("uniform", "bare expert GEMMs", gemm, 1.0),
        ("skewed", "ours model", res["skew_ours_model_ms"], res["skew_model_max_over_mean"]),
        ("skewed", "ours dynamic", res["skew_ours_dynamic_ms"], res["skew_dynamic_max_over_mean"]),
        ("skewed", "deepspeed dropless", res["skew_deepspeed_dropless_ms"], None),
        ("skewed", "deepspeed capacity 1.0", res["skew_deepspeed_cf1_ms"], None),
    ]
    print(f"{'routing':8} {'layer':26} {'fwd+bwd ms':>10} {'x gemm':>7} {'rows max/mean':>13}")
    for routing, name, ms, ratio in rows:
        ratio_text = f"{ratio:13.2f}" if ratio is not None else f"{'':13}"
        print(f"{routing:8} {name:26} {ms:10.1f} {ms / gemm:7.2f} {ratio_text}")
    targets = {
        "uniform ours <= 1.2x gemm": res["ours_ms"] <= 1.2 * gemm,
        "uniform ours >= 1.3x deepspeed dropless throughput":
            res["deepspeed_dropless_ms"] >= 1.3 * res["ours_ms"],
        "skewed ours (model) >= 2.5x deepspeed dropless throughput":
            res["skew_deepspeed_dropless_ms"] >= 2.5 * res["skew_ours_model_ms"],
        "skewed dynamic <= 1.25x uniform gemm": res["skew_ours_dynamic_ms"] <= 1.25 * gemm,
    }
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    keys = ("ours_ms", "deepspeed_dropless_ms", "deepspeed_cf1_ms", "gemm_ms", "skew_ours_model_ms",
            "skew_ours_dynamic_ms", "skew_deepspeed_dropless_ms", "skew_deepspeed_cf1_ms",
            "model_max_over_mean", "skew_model_max_over_mean", "skew_dynamic_max_over_mean")
    print(json.dumps({key: round(res[key], 3) for key in keys}))


if __name__ == "__main__":
    main()
