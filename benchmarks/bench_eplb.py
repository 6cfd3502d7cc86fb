"""Benchmark ``ep_megatron.placement.eplb`` side by side with DeepSeek's reference EPLB on the same loads.

The reference is not vendored: its file ``sglang/srt/eplb/eplb_algorithms/deepseek.py`` (DeepSeek's
``eplb.py``, it only needs torch) is taken from the sglang wheel, downloaded with
``pip download sglang==<version> --no-deps`` into ``.cache/eplb_reference/`` (git-ignored), unzipped and
imported by file path. Without it the benchmark says so and reports our planner alone.

Reported per scenario: balancedness (mean rank load / max rank load, mean over layers), moved copies (a
copy of an expert needed on an EP rank that did not hold it, as a fraction of all slots, for plans that
follow a previous one), planning time (min over repeats, same process, same thread count) and, for
hierarchical scenarios, the exact node-level bound (best pairing of groups to nodes). Then a scale
sweep (layers 8 -> 61, experts 64 -> 256, EP ranks 8 -> 256, slots E -> 2E), each scale in global and
hierarchical mode, fresh and with ``previous`` after a 5 % drift: time per plan, its ratio to the
reference's time on the same loads, balancedness and moved fraction. The last line printed is one JSON
object with every number, ``max_plan_ms_256gpu`` (our slowest plan at 61 x 256 -> 512 slots on 256 EP
ranks) and ``max_ratio_to_reference`` (our time over the reference's, worst row of the whole run).

    python benchmarks/bench_eplb.py [--steps 4] [--repeats 3] [--threads 1] [--seed 0] \
        [--sections standard,drift,sweep]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ep_megatron.placement.eplb import balancedness, moved_copies, rebalance_experts  # noqa: E402

REFERENCE_VERSIONS = ("0.5.23",)  # tried first; otherwise the newest versions `pip index` lists
REFERENCE_FILE = "sglang/srt/eplb/eplb_algorithms/deepseek.py"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "eplb_reference"


@dataclass(frozen=True)
class Scale:
    name: str
    layers: int
    experts: int
    slots: int
    ranks: int  # EP ranks (DeepSeek's "GPUs")
    nodes: int  # 1: global mode
    groups: int


V3_GLOBAL = Scale("v3-global", 58, 256, 288, 32, 1, 8)
V3_HIER = Scale("v3-hier", 58, 256, 288, 32, 4, 8)
MIXTRAL = Scale("mixtral", 32, 8, 16, 8, 1, 1)
# (layers, experts, slots, EP ranks); each planned globally and hierarchically (8 ranks per node, at
# least 2 nodes; max(8, nodes) expert groups)
SWEEP = ((8, 64, 64, 8), (8, 64, 128, 8), (16, 64, 96, 16), (32, 128, 160, 32), (32, 128, 256, 64),
         (61, 256, 320, 64), (61, 256, 384, 128), (8, 256, 512, 256), (61, 256, 512, 256))


def load_reference() -> tuple[ModuleType | None, str]:
    """DeepSeek's ``rebalance_experts`` from the sglang wheel, and where it came from (or why not)."""
    target = CACHE / "deepseek.py"
    if not target.exists():
        versions = list(REFERENCE_VERSIONS)
        try:
            listed = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "sglang"],
                                    capture_output=True, text=True, timeout=120).stdout
            versions += [v.strip() for v in listed.partition("Available versions:")[2].split(",")][:5]
        except (OSError, subprocess.SubprocessError):
            pass
        for version in dict.fromkeys(v for v in versions if v):
            folder = CACHE / f"sglang-{version}"
            subprocess.run([sys.executable, "-m", "pip", "download", f"sglang=={version}", "--no-deps",
                            "--only-binary=:all:", "-q", "-d", str(folder)], capture_output=True, timeout=600)
            for wheel in folder.glob("sglang-*.whl"):
                with zipfile.ZipFile(wheel) as archive:
                    if REFERENCE_FILE in archive.namelist():
                        target.write_bytes(archive.read(REFERENCE_FILE))
                        (CACHE / "SOURCE").write_text(f"{wheel.name}:{REFERENCE_FILE}\n")
                        break
            if target.exists():
                break
    if not target.exists():
        return None, "UNAVAILABLE: could not download an sglang wheel holding " + REFERENCE_FILE
    spec = importlib.util.spec_from_file_location("deepseek_eplb_reference", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, (CACHE / "SOURCE").read_text().strip()


def make_loads(kind: str, layers: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """``[layers, experts]`` loads of one of the scenario kinds."""
    if kind.startswith("lognormal"):
        return torch.exp(float(kind.split("=")[1]) * torch.randn(layers, experts, generator=gen))
    if kind == "zipf":  # load ∝ 1 / rank, ranks shuffled per layer
        ranks = torch.rand(layers, experts, generator=gen).argsort(1) + 1
        return 1.0 / ranks.double()
    if kind == "hot":  # lognormal(0.5) plus a few experts with ~20x the mean load
        loads = torch.exp(0.5 * torch.randn(layers, experts, generator=gen))
        hot = torch.rand(layers, experts, generator=gen).argsort(1)[:, : max(1, experts // 64)]
        return loads.scatter_add_(1, hot, torch.full(hot.shape, 20.0 * float(loads.mean())))
    raise ValueError(kind)


def drift(loads: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """Each expert's load times ``exp(amount * N(0, 1))``: ``amount`` is the relative drift."""
    return loads * torch.exp(amount * torch.randn(loads.shape, generator=gen, dtype=loads.dtype))


def node_bound(loads: torch.Tensor, groups: int, nodes: int) -> float:
    """Exact cap on hierarchical balancedness: per layer, mean node load over the smallest achievable
    max node load, over every split of the groups into ``nodes`` equal sets; mean over layers."""
    per_node = groups // nodes

    def splits(rest: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
        if not rest:
            return [[]]
        first, others = rest[0], rest[1:]
        return [[(first, *mates), *tail] for mates in itertools.combinations(others, per_node - 1)
                for tail in splits(tuple(g for g in others if g not in mates))]

    assignment = torch.tensor([[node for g in range(groups) for node, block in enumerate(split) if g in block]
                               for split in splits(tuple(range(groups)))])  # [S, groups]
    group_load = loads.double().unflatten(1, (groups, -1)).sum(-1)  # [L, groups]
    node_load = torch.zeros(loads.shape[0], len(assignment), nodes, dtype=torch.float64)
    node_load.scatter_add_(2, assignment.expand(loads.shape[0], -1, -1),
                           group_load[:, None, :].expand(-1, len(assignment), -1))
    best_peak = node_load.max(2).values.min(1).values
    return (group_load.sum(1) / nodes / best_peak).mean().item()


def groups_stay_on_nodes(phy2log: torch.Tensor, scale: Scale) -> bool:
    """Whether every slot of every layer holds an expert of a group assigned to that slot's node."""
    group = phy2log // (scale.experts // scale.groups)
    node = (torch.arange(scale.slots) // (scale.slots // scale.nodes)).expand_as(group)
    pairs = torch.zeros(phy2log.shape[0], scale.groups, scale.nodes, dtype=torch.bool)
    pairs[torch.arange(phy2log.shape[0])[:, None], group, node] = True
    return bool((pairs.sum(2) == 1).all())


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best * 1e3


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    reference, source = load_reference()
    print(f"reference: {source}")
    print(f"torch {torch.__version__}, {args.threads} thread(s); times are the min of {args.repeats} runs")
    results: dict[str, dict] = {}
    sections = set(args.sections.split(","))

    def ours(w: torch.Tensor, s: Scale, previous: torch.Tensor | None = None) -> torch.Tensor:
        return rebalance_experts(w, s.slots, s.groups, s.nodes, s.ranks, previous=previous)[0]

    def ref(w: torch.Tensor, s: Scale) -> torch.Tensor:
        return reference.rebalance_experts(w, s.slots, s.groups, s.nodes, s.ranks, s.nodes > 1)[0]

    def entry(bal: float, moved: float | None, ms: float) -> dict:
        return {"balancedness": round(bal, 4), "moved_fraction": None if moved is None else round(moved, 4),
                "ms": round(ms, 2)}

    header = (f"{'scenario':<28} {'bal ours':>8} {'bal ref':>8} {'bound':>6} {'moved ours':>10} "
              f"{'moved ref':>9} {'ms ours':>8} {'ms ref':>7}")

    def report(name: str, row: dict, extra: str = "") -> None:
        results[name] = row
        o, r = row["ours"], row.get("reference")

        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        print(f"{name:<28} {o['balancedness']:>8.4f} {fmt(r and r['balancedness'], '.4f'):>8} "
              f"{fmt(row.get('node_bound'), '.4f'):>6} {fmt(o['moved_fraction'], '.3f'):>10} "
              f"{fmt(r and r['moved_fraction'], '.3f'):>9} {o['ms']:>8.1f} {fmt(r and r['ms'], '.1f'):>7}"
              + extra)

    kinds = ("lognormal=0.5", "lognormal=1", "lognormal=2", "zipf", "hot")
    gen = torch.Generator().manual_seed(args.seed)
    if "standard" in sections:
        print("\n" + header + "\n" + "-" * len(header))
    for scale, kind in itertools.product((V3_GLOBAL, V3_HIER, MIXTRAL),
                                         kinds if "standard" in sections else ()):
        w = make_loads(kind, scale.layers, scale.experts, gen)
        plan, ms = timed(lambda w=w, s=scale: ours(w, s), args.repeats)
        row = {"ours": entry(balancedness(plan, w, scale.ranks), None, ms)}
        if reference is not None:
            ref_plan, ref_ms = timed(lambda w=w, s=scale: ref(w, s), args.repeats)
            row["reference"] = entry(balancedness(ref_plan, w, scale.ranks), None, ref_ms)
        if scale.nodes > 1:
            row["node_bound"] = round(node_bound(w, scale.groups, scale.nodes), 4)
            row["groups_stay_on_nodes"] = groups_stay_on_nodes(plan, scale)
        report(f"{scale.name} {kind}", row)

    gen = torch.Generator().manual_seed(args.seed)
    if "drift" in sections:
        print(f"\nsequences of {args.steps} plans, loads drifting between plans; means over the plans after "
              "the first\n'stay' keeps the previous plan, 'fresh' is ours without previous")
        print(header + f" {'stay':>6} {'fresh':>6}\n" + "-" * (len(header) + 14))
    for scale, amount in itertools.product((V3_GLOBAL, V3_HIER, MIXTRAL),
                                           (0.05, 0.2, 0.5) if "drift" in sections else ()):
        w = make_loads("lognormal=1", scale.layers, scale.experts, gen)
        plan = ours(w, scale)
        ref_plan = ref(w, scale) if reference is not None else None
        sums: dict[str, float] = {}
        for _ in range(args.steps - 1):
            w = drift(w, amount, gen)
            new, ms = timed(lambda w=w, s=scale, p=plan: ours(w, s, p), args.repeats)
            steps = {"bal": balancedness(new, w, scale.ranks), "moved": moved_copies(plan, new, scale.ranks),
                     "ms": ms, "stay": balancedness(plan, w, scale.ranks),
                     "fresh": balancedness(ours(w, scale), w, scale.ranks)}
            if scale.nodes > 1 and not groups_stay_on_nodes(new, scale):
                raise AssertionError(f"{scale.name}: a replica left its group's node")
            plan = new
            if reference is not None:
                new_ref, ref_ms = timed(lambda w=w, s=scale: ref(w, s), args.repeats)
                steps |= {"ref_bal": balancedness(new_ref, w, scale.ranks), "ref_ms": ref_ms,
                          "ref_moved": moved_copies(ref_plan, new_ref, scale.ranks)}
                ref_plan = new_ref
            for key, value in steps.items():
                sums[key] = sums.get(key, 0.0) + value / (args.steps - 1)
        row = {"ours": entry(sums["bal"], sums["moved"], sums["ms"]),
               "ours_stay_balancedness": round(sums["stay"], 4),
               "ours_fresh_balancedness": round(sums["fresh"], 4)}
        if reference is not None:
            row["reference"] = entry(sums["ref_bal"], sums["ref_moved"], sums["ref_ms"])
        report(f"{scale.name} drift={amount:.0%}", row, f" {sums['stay']:>6.4f} {sums['fresh']:>6.4f}")

    gen = torch.Generator().manual_seed(args.seed)
    scale_rows = []
    if "sweep" in sections:
        scale_rows = sweep(ours, ref if reference is not None else None, gen, args.repeats)
    ratios = [row[key] for row in scale_rows for key in ("ratio_fresh", "ratio_previous") if key in row]
    ratios += [row["ours"]["ms"] / row["reference"]["ms"] for row in results.values() if "reference" in row]
    results["sweep"] = scale_rows
    results["max_ratio_to_reference"] = round(max(ratios), 3) if ratios else None
    results["max_plan_ms_256gpu"] = max((max(row["ms_fresh"], row["ms_previous"]) for row in scale_rows
                                         if (row["layers"], row["slots"], row["ranks"]) == (61, 512, 256)),
                                        default=None)
    results["_meta"] = {"reference": source, "threads": args.threads, "repeats": args.repeats,
                        "steps": args.steps, "seed": args.seed}
    print(f"\nmax_plan_ms_256gpu {results['max_plan_ms_256gpu']}  "
          f"max_ratio_to_reference {results['max_ratio_to_reference']}")
    print(json.dumps(results, separators=(",", ":")))


def sweep(ours: Callable, ref: Callable | None, gen: torch.Generator, repeats: int) -> list[dict]:
    """Time per plan over :data:`SWEEP`, global and hierarchical: ours fresh and with ``previous`` (our
    plan for the loads before a 5 % drift), the reference on the same drifted loads; print a table."""
    print("\nscale sweep: lognormal(1) loads, 5 % drift before the timed plans; ratio = ours / reference ms\n"
          "'moved' = moved fraction from the plan for the loads before the drift")
    header = (f"{'L x E -> P / ranks':<22} {'mode':<12} {'ms fresh':>8} {'ms prev':>8} {'ms ref':>8} "
              f"{'x fresh':>7} {'x prev':>7} {'bal fresh':>9} {'bal prev':>8} {'bal ref':>7} "
              f"{'moved':>6} {'moved ref':>9}")
    print(header + "\n" + "-" * len(header))
    rows = []
    for (layers, experts, slots, ranks), hierarchical in itertools.product(SWEEP, (False, True)):
        nodes = max(2, ranks // 8) if hierarchical else 1
        scale = Scale("sweep", layers, experts, slots, ranks, nodes, max(8, nodes) if hierarchical else 1)
        w_before = make_loads("lognormal=1", layers, experts, gen)
        before = ours(w_before, scale)
        w = drift(w_before, 0.05, gen)
        fresh, ms_fresh = timed(lambda w=w, s=scale: ours(w, s), repeats)
        kept, ms_prev = timed(lambda w=w, s=scale, p=before: ours(w, s, p), repeats)
        row = {"layers": layers, "experts": experts, "slots": slots, "ranks": ranks, "nodes": nodes,
               "groups": scale.groups, "ms_fresh": round(ms_fresh, 2), "ms_previous": round(ms_prev, 2),
               "balancedness_fresh": round(balancedness(fresh, w, ranks), 4),
               "balancedness_previous": round(balancedness(kept, w, ranks), 4),
               "moved_previous": round(moved_copies(before, kept, ranks), 4)}
        cells = ["-"] * 5
        if ref is not None:
            ref_plan, ms_ref = timed(lambda w=w, s=scale: ref(w, s), repeats)
            row |= {"ms_reference": round(ms_ref, 2), "ratio_fresh": round(ms_fresh / ms_ref, 3),
                    "ratio_previous": round(ms_prev / ms_ref, 3),
                    "balancedness_reference": round(balancedness(ref_plan, w, ranks), 4),
                    "moved_reference": round(moved_copies(ref(w_before, scale), ref_plan, ranks), 4)}
            cells = [f"{ms_ref:.1f}", f"{ms_fresh / ms_ref:.2f}", f"{ms_prev / ms_ref:.2f}",
                     f"{row['balancedness_reference']:.4f}", f"{row['moved_reference']:.3f}"]
        rows.append(row)
        mode = f"hier {nodes}n {scale.groups}g" if hierarchical else "global"
        shape = f"{layers} x {experts} -> {slots} / {ranks}"
        print(f"{shape:<22} {mode:<12} {ms_fresh:>8.1f} {ms_prev:>8.1f} "
              f"{cells[0]:>8} {cells[1]:>7} {cells[2]:>7} {row['balancedness_fresh']:>9.4f} "
              f"{row['balancedness_previous']:>8.4f} {cells[3]:>7} {row['moved_previous']:>6.3f} "
              f"{cells[4]:>9}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="plans per drift sequence (first is fresh)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per plan; the min is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both planners")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sections", default="standard,drift,sweep",
                        help="comma-separated subset of standard,drift,sweep (each has its own seeded loads)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
