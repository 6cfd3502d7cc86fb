"""Static ``model`` placement vs ``dynamic`` placement with rebalancing, under skewed, drifting routing.

Each run trains a stack of MoE layers (+ a linear head) on gloo CPU ranks with the same seed and data.
Skew: a router selection bias (``expert_bias``) of ``HOT_BIAS`` on two neighbouring "hot" experts sends
about 65 % of the (token, expert) pairs to them; the hot pair moves by two experts every
``DRIFT_EVERY`` steps (under the static ``model`` placement a hot pair always shares one rank: the
worst case for static, stated as such). Measured:
- max / mean tokens per rank of every MoE layer and step (tokens entering each rank's experts),
- wall-clock step time (2 ranks, one core each), and the step's thread CPU time (slowest rank): the
  step time of an unshared machine, which wall time on a shared 2-core machine is not,
- expert critical path: the largest per-rank thread CPU time in expert forward + backward per step
  (4 ranks; thread CPU time is not distorted by oversubscribing the cores),
- per rebalance: planning + migration wall time and moved fraction.
Prints a table, then one JSON line. ``python benchmarks/bench_rebalance.py`` runs everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.multirank import run_ranks  # noqa: E402

NUM_EXPERTS, TOP_K, NUM_LAYERS = 8, 2, 2
HIDDEN, FFN, TOKENS_PER_RANK = 128, 512, 1024
INTERVAL, DRIFT_EVERY, HOT_BIAS = 5, 30, 0.35
REDUNDANT_PER_RANK = 2  # dynamic: extra slots per rank, P = E + 2 * ranks




class _ExpertTimer:
    """Thread CPU time and input rows of ``layer.experts`` forward and backward, via module hooks."""

    def __init__(self, experts: Any) -> None:
        self.cpu_s, self.tokens, self._t0 = 0.0, 0, 0.0
        experts.register_forward_pre_hook(self._start_fwd)
        experts.register_forward_hook(self._stop)
        experts.register_full_backward_pre_hook(self._start)
        experts.register_full_backward_hook(self._stop)

    def _start_fwd(self, module: Any, args: tuple) -> None:
        self.tokens += int(args[0].shape[0])
        self._start()

    def _start(self, *_: Any) -> None:
        self._t0 = time.thread_time()

    def _stop(self, *_: Any) -> None:
        self.cpu_s += time.thread_time() - self._t0

    def take(self) -> tuple[float, int]:
        out = (self.cpu_s, self.tokens)
        self.cpu_s, self.tokens = 0.0, 0
        return out


def _train(mode: str, num_steps: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch import nn

    from ep_megatron.config import MoEConfig
    from ep_megatron.layer import MoELayer
    from ep_megatron.layer.moe_layers import MoELayers
    from ep_megatron.parallel import build_groups
    from ep_megatron.parallel.grad_sync import ExpertGradSync
    from ep_megatron.placement import ExpertPlacement
    from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer
    from ep_megatron.trainer.step import optimizer_step

    world_size = dist.get_world_size()
    groups = build_groups(world_size)
    num_redundant = REDUNDANT_PER_RANK * world_size if mode == "dynamic" else 0
    placement = ExpertPlacement.build("dynamic" if mode == "dynamic" else "model", NUM_LAYERS, NUM_EXPERTS,
                                      world_size, num_redundant=num_redundant)
    config = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=NUM_EXPERTS, top_k=TOP_K,
                       enable_expert_bias=True, expert_bias_update_rate=0.0)  # bias set by the schedule
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(MoELayer(config, placement, groups, i) for i in range(NUM_LAYERS))
    model.head = nn.Linear(HIDDEN, 1)
    timers = [_ExpertTimer(layer.experts) for layer in model.layers]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    moe = MoELayers(model)
    sync = ExpertGradSync(moe)
    rebalancer = None
    if mode == "dynamic":
        rebalancer = Rebalancer(moe, optimizer, RebalanceConfig(interval=INTERVAL, window=INTERVAL))
    steps = []
    for step in range(num_steps):
        gen = torch.Generator().manual_seed(step * world_size + groups.rank)
        hot_logical_ids = [(2 * (step // DRIFT_EVERY) + k) % NUM_EXPERTS for k in range(2)]
        for layer in model.layers:
            layer.router.expert_bias.zero_()[hot_logical_ids] = HOT_BIAS
        # requires_grad: as in a model whose first MoE layer follows embeddings (and so that the expert
        # timers' backward hooks bracket the whole expert backward)
        x = torch.randn(TOKENS_PER_RANK, HIDDEN, generator=gen).requires_grad_()
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.thread_time()
        hidden = x
        for layer in model.layers:
            hidden = hidden + layer(hidden)[0]
        loss = model.head(hidden).pow(2).mean()
        loss.backward()
        optimizer_step(moe, optimizer, sync)
        step_s, step_cpu_s = time.perf_counter() - start, time.thread_time() - start_cpu
        metrics = rebalancer.step() if rebalancer is not None else None
        cpu, tokens = zip(*(t.take() for t in timers))
        steps.append({"step_ms": step_s * 1e3, "step_cpu_ms": step_cpu_s * 1e3,
                      "expert_cpu_ms": sum(cpu) * 1e3, "tokens": list(tokens),
                      "rebalance": None if metrics is None else {
                          "ms": metrics.plan_ms + metrics.migrate_ms,
                          "moved_fraction": metrics.moved_fraction, "slots_moved": metrics.slots_moved}})
    return {"steps": steps}


def launch(mode: str, world_size: int, num_steps: int) -> list[dict[str, Any]]:
    """Run ``_train(mode, num_steps)`` on ``world_size`` gloo ranks; per-rank results in rank order."""
    return run_ranks(_train, world_size, mode, num_steps, timeout_s=240)


def summarize(per_rank: list[dict[str, Any]]) -> dict[str, float]:
    """Over the steps after the first rebalance (0-based step >= INTERVAL), both modes alike:
    ``max_over_mean`` is the worst layer's median over steps of max / mean tokens per rank,
    ``worst_step_max_over_mean`` the worst (layer, step); times are medians over steps of the slowest rank.
    """
    num_steps = len(per_rank[0]["steps"])
    after = range(INTERVAL, num_steps)
    ratios: list[list[float]] = [[] for _ in range(NUM_LAYERS)]  # [L][steps]
    step_ms, step_cpu, critical = [], [], []
    for s in after:
        for layer in range(NUM_LAYERS):
            tokens = [r["steps"][s]["tokens"][layer] for r in per_rank]
            ratios[layer].append(max(tokens) / max(statistics.mean(tokens), 1e-9))
        step_ms.append(max(r["steps"][s]["step_ms"] for r in per_rank))
        step_cpu.append(max(r["steps"][s]["step_cpu_ms"] for r in per_rank))
        critical.append(max(r["steps"][s]["expert_cpu_ms"] for r in per_rank))
    rebalances = [r for r in (st["rebalance"] for st in per_rank[0]["steps"]) if r is not None]
    return {"max_over_mean": max(statistics.median(r) for r in ratios),
            "worst_step_max_over_mean": max(max(r) for r in ratios),
            "step_ms": statistics.median(step_ms), "step_cpu_ms": statistics.median(step_cpu),
            "critical_ms": statistics.median(critical),
            "rebalance_ms": statistics.median([r["ms"] for r in rebalances] or [0.0]),
            "moved_fraction": statistics.mean([r["moved_fraction"] for r in rebalances] or [0.0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    args = parser.parse_args()
    rows = {}
    for world_size in (2, 4):
        for mode in ("static", "dynamic"):
            rows[(world_size, mode)] = summarize(launch(mode, world_size, args.steps))
    print(f"{'ranks':>5} {'mode':>8} {'max/mean':>9} {'worst step max/mean':>20} {'step ms':>9} "
          f"{'step cpu ms':>12} {'expert crit ms':>15} {'rebalance ms':>13} {'moved':>6}")
    for (world_size, mode), r in rows.items():
        print(f"{world_size:>5} {mode:>8} {r['max_over_mean']:>9.3f} {r['worst_step_max_over_mean']:>20.3f} "
              f"{r['step_ms']:>9.1f} {r['step_cpu_ms']:>12.1f} {r['critical_ms']:>15.1f} "
              f"{r['rebalance_ms']:>13.1f} {r['moved_fraction']:>6.3f}")
    s2, d2, s4, d4 = rows[(2, "static")], rows[(2, "dynamic")], rows[(4, "static")], rows[(4, "dynamic")]
    print(json.dumps({
        "static_max_over_mean": s4["max_over_mean"], "dynamic_max_over_mean": d4["max_over_mean"],
        "static_step_ms": s2["step_ms"], "dynamic_step_ms": d2["step_ms"],
        "static_critical_ms": s4["critical_ms"], "dynamic_critical_ms": d4["critical_ms"],
        "rebalance_ms": statistics.median([d2["rebalance_ms"], d4["rebalance_ms"]]),
        "moved_fraction": d4["moved_fraction"],
        "speedup_2_ranks": s2["step_ms"] / d2["step_ms"],
        "static_step_cpu_ms": s2["step_cpu_ms"], "dynamic_step_cpu_ms": d2["step_cpu_ms"],
        "cpu_speedup_2_ranks": s2["step_cpu_ms"] / d2["step_cpu_ms"],
        "critical_speedup_4_ranks": s4["critical_ms"] / d4["critical_ms"],
    }))


if __name__ == "__main__":
    main()
