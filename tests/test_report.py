"""The run report at scale (64 MoE layers x 256 experts x 10 000 steps: time, peak memory, figure sizes),
the two-run comparison page, and the metrics reader's handling of bad and torn records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ep_megatron.trainer.cli import main
from ep_megatron.trainer.metrics_io import ExpertLoadLog, read_expert_load
from ep_megatron.trainer.report import FIGURE_PX, bin_edges, read_run, write_report

ROOT = Path(__file__).resolve().parents[1]


def synthetic_run(run_dir: Path, steps: int, layers: int, experts: int, strategy: str, skew: float,
                  rebalance_every: int = 0, seed: int = 0) -> np.ndarray:
    """Write a run directory like the trainer's; return the ``[steps, layers, experts]`` load it holds.

    The load is a per-layer skewed base (``skew`` = hottest / mean expert), rotated by one expert every
    500 steps, scaled per step; max/mean per rank falls from ``1 + skew / 4`` to 1.1 at each rebalance.
    """
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    base = rng.gamma(1.0, size=(layers, experts)) + 0.05
    base[:, 0] = skew * base.mean(axis=1)  # one hot expert per layer
    base = base / base.sum(axis=1, keepdims=True) * 4096
    small = steps * layers * experts <= 1 << 22
    loads = np.empty((steps, layers, experts), dtype=np.uint32) if small else None
    log = ExpertLoadLog(run_dir, layers, experts)
    layer_skew = 1 + skew / 4 * rng.uniform(0.5, 1.0, size=layers)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            load = np.roll(base, step // 500, axis=1) * (1 + 0.1 * np.sin(step / 50))
            log.append(step, load.astype(np.uint32))
            if loads is not None:
                loads[step - 1] = load.astype(np.uint32)
            since = step % rebalance_every if rebalance_every else step
            ratio = 1.1 + (layer_skew - 1.1) * min(1.0, since / 200) if rebalance_every else layer_skew
            record = {"split": "train", "step": step, "loss": 5.0 / (1 + step / 300), "lr": 1e-3,
                      "tokens_per_s": 1e5 / float(ratio.max()), "aux_losses": {},
                      "max_over_mean": [round(float(r), 4) for r in ratio],
                      "rebalanced": bool(rebalance_every) and step % rebalance_every == 0,
                      "slots_moved": 8 if rebalance_every and step % rebalance_every == 0 else 0,
                      "bytes_moved": 0}
            f.write(json.dumps(record) + "\n")
            if step % max(1, steps // 10) == 0:
                f.write(json.dumps({"split": "val", "step": step, "val_loss": 5.2 / (1 + step / 300)}) + "\n")
    log.close()
    info = {"config": "synthetic", "world_size": 64, "sharding_strategy": strategy, "corpus": "synthetic",
            "bigram_entropy": 2.5, "bigram_label": "byte-bigram conditional entropy"}
    (run_dir / "run_info.json").write_text(json.dumps(info))
    return loads


# Runs a command and prints its wall time and peak RSS. A process forked from pytest would start with
# pytest's resident set (Linux carries the peak across exec), so a small fresh process spawns the command.
_MEASURE = """
import json, os, sys, time
started = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": usage.ru_maxrss / 1024,
                  "returncode": os.waitstatus_to_exitcode(status)}))
"""


def assert_png_sizes(folder: Path, names: list[str]) -> None:
    for name in names:
        with Image.open(folder / name) as image:
            assert image.size == FIGURE_PX[name], name


@pytest.mark.slow
def test_report_at_64_layers_256_experts_10000_steps_is_fast_and_small(tmp_path: Path) -> None:
    run_dir = tmp_path / "big"
    synthetic_run(run_dir, steps=10_000, layers=64, experts=256, strategy="dynamic", skew=6.0,
                  rebalance_every=100)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ep_megatron", "report", str(run_dir)]
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *command], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    measured = json.loads(proc.stdout.splitlines()[-1])
    print(f"report of 64 x 256 x 10000: {measured['seconds']:.2f} s, peak RSS {measured['peak_mb']:.0f} MB")
    assert measured["returncode"] == 0, proc.stdout + proc.stderr
    assert measured["seconds"] <= 10.0 and measured["peak_mb"] <= 300.0, measured
    report = run_dir / "report"
    assert_png_sizes(report, ["loss.png", "throughput.png", "balance.png", "expert_load.png"])
    summary = json.loads((report / "summary.json").read_text())
    assert summary["steps"] == 10_000 and summary["rebalances"] == 100
    assert len(summary["worst_layers"]) == 5 and 1.0 < summary["max_over_mean_layer_p50"] < 2.6
    assert "![expert_load](expert_load.png)" in (report / "summary.md").read_text()


def test_expert_load_bins_equal_a_direct_mean_and_a_resume_rewrites_steps(tmp_path: Path) -> None:
    loads = synthetic_run(tmp_path / "run", steps=1200, layers=3, experts=16, strategy="model", skew=3.0)
    log = ExpertLoadLog(tmp_path / "run", 3, 16)  # a resume from step 1000 re-logs steps 1001..1200
    for step in range(1001, 1201):
        log.append(step, loads[step - 1] + 7)
    log.close()
    loads[1000:] += 7
    with (tmp_path / "run" / "expert_load.bin").open("ab") as f:
        f.write(b"\0" * 100)  # torn last row
    with pytest.warns(UserWarning, match="partial last row"):
        load = read_expert_load(tmp_path / "run")
    assert load.steps.tolist() == list(range(1, 1201))
    edges = bin_edges(1200, 7)
    expected = np.stack([loads[a:b].sum(0) for a, b in zip(edges[:-1], edges[1:])]).astype(np.float64)
    np.testing.assert_array_equal(load.binned_sum(edges, chunk_rows=50), expected)


def test_two_runs_give_a_comparison_page(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    synthetic_run(tmp_path / "static", steps=600, layers=4, experts=8, strategy="model", skew=4.0)
    synthetic_run(tmp_path / "dynamic", steps=600, layers=4, experts=8, strategy="dynamic", skew=4.0,
                  rebalance_every=50, seed=1)
    assert main(["report", str(tmp_path / "static"), str(tmp_path / "dynamic")]) == 0
    out = tmp_path / "compare_static_vs_dynamic"
    assert str(out) in capsys.readouterr().out
    assert_png_sizes(out, ["compare.png"])
    page = (out / "compare.md").read_text()
    assert "static (model)" in page and "dynamic (dynamic)" in page and "![comparison](compare.png)" in page
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in page.splitlines()
            if line.startswith("| ")}
    static, dynamic = (json.loads((out / "compare.json").read_text())[k] for k in ("A", "B"))
    assert dynamic["mean_worst_max_over_mean_after_first_rebalance"] < static[
        "mean_worst_max_over_mean_after_first_rebalance"]
    assert float(rows["median_tokens_per_s"][3].strip(" |")) == pytest.approx(
        dynamic["median_tokens_per_s"] / static["median_tokens_per_s"], rel=1e-3)
    assert main(["report", str(tmp_path / "static"), str(tmp_path / "dynamic"), str(tmp_path)]) == 2


def test_bad_and_torn_metrics_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    synthetic_run(run_dir, steps=40, layers=2, experts=4, strategy="model", skew=2.0)
    metrics = run_dir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"split": "train", "step": 41, "lo')  # killed mid-write
    torn_line = len(good.splitlines()) + 1
    with pytest.warns(UserWarning, match=rf"metrics.jsonl:{torn_line}: skipping the torn last line"):
        run = read_run(run_dir)
    assert run.steps[-1] == 40
    lines = good.splitlines(keepends=True)
    metrics.write_text("".join(lines[:2]) + "{not json}\n" + "".join(lines[2:]))
    assert main(["report", str(run_dir)]) == 2
    assert f"{metrics}:3: not a JSON record" in capsys.readouterr().err
    metrics.write_text("".join(lines[:4]) + '{"split": "train", "step": 5, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:5: train record with a missing or bad field"):
        read_run(run_dir)
    metrics.write_text("".join(lines))
    (run_dir / "expert_load.bin").unlink()
    report = write_report(run_dir)
    assert not (report / "expert_load.png").exists() and "no expert-load figure" in (
        report / "summary.md").read_text()
