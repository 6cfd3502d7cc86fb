"""bf16 training as on GPUs, with and without rebalancing: losses after 100 steps, side by side.

The same tiny MoE GPT job (``tests/test_device.py``'s ``TINY`` config: 8 experts + 4 redundant slots,
top-2, aux loss, bf16 parameters with fp32 masters and moments, fp32 router) on 2 gloo ranks, once with
the rebalancer re-planning every 2 steps and once without. Dropless routing makes the math independent
of the placement; in bf16 the replica sums round differently, so the losses drift apart a little.
Prints a table of losses at a few steps, then one JSON line; the target is a final loss within 2 % of
the run without rebalancing (mean of the last 10 steps, and the last step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    args = parser.parse_args()
    from tests.multirank import run_ranks
    from tests.test_device import _run_pair

    with tempfile.TemporaryDirectory() as tmp:
        result = run_ranks(_run_pair, 2, tmp, args.steps, timeout_s=1800)[0]
    rebalanced, static = result["rebalanced"], result["static"]
    print(f"{'step':>6} {'rebalanced':>11} {'static':>9} {'diff %':>7}")
    for step in sorted({1, 10, 25, 50, 75, args.steps} & set(range(1, args.steps + 1))):
        a, b = rebalanced[step - 1], static[step - 1]
        print(f"{step:6d} {a:11.4f} {b:9.4f} {100 * (a - b) / b:7.2f}")
    tail = min(10, args.steps)
    mean_a, mean_b = sum(rebalanced[-tail:]) / tail, sum(static[-tail:]) / tail
    last_diff, mean_diff = abs(rebalanced[-1] / static[-1] - 1), abs(mean_a / mean_b - 1)
    print(f"slots moved: {result['rebalanced_moved']}; last {tail} steps mean: {mean_a:.4f} vs {mean_b:.4f}")
    met = max(last_diff, mean_diff) <= 0.02
    print(f"target final loss within 2 % of the static run: {'met' if met else 'NOT met'}")
    print(json.dumps({"steps": args.steps, "final_rebalanced": round(rebalanced[-1], 4),
                      "final_static": round(static[-1], 4), "final_diff_pct": round(100 * last_diff, 3),
                      "tail_mean_diff_pct": round(100 * mean_diff, 3),
                      "slots_moved": result["rebalanced_moved"],
                      "a2a_dtypes": result["rebalanced_a2a_dtypes"]}))


if __name__ == "__main__":
    main()
