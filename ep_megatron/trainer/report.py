"""Plots and a summary of a training run (``RUN_DIR/report/``), and a side-by-side page of two runs.

Reads ``RUN_DIR/metrics.jsonl``, ``RUN_DIR/expert_load.bin`` (see ``metrics_io``) and
``RUN_DIR/run_info.json``. Built to stay readable and fast at scale (64 MoE layers x 256 experts x
10 000 steps: a few seconds, under 300 MB): every figure has a fixed pixel size whatever the run's shape,
time series are averaged into at most ``MAX_BINS`` columns, the per-layer balance is drawn as
percentiles over layers, the worst layers and a layers x time heatmap (not one line per layer), and the
expert-load heatmaps show the most skewed layers only, next to an all-layers overview.

Balance is max / mean tokens per EP rank (1.0 is perfect; the worst EP group of each layer), everywhere:
metrics, report and ``ep-megatron ckpt inspect``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ep_megatron.trainer.metrics_io import (  # noqa: E402
    METRICS_FILE,
    ExpertLoad,
    iter_records,
    read_expert_load,
)

DPI = 100
FIGURE_PX = {  # (width, height) in pixels of every figure, whatever the run's size
    "loss.png": (880, 440),
    "throughput.png": (880, 360),
    "balance.png": (1100, 820),
    "expert_load.png": (1200, 900),
    "compare.png": (1500, 460),
}
MAX_BINS = 400  # columns of a time series or heatmap
LOAD_BINS = 200  # columns of the expert-load heatmaps
WORST_K = 3  # worst layers drawn individually in balance.png
DETAIL_LAYERS = 4  # layers with an expert x time heatmap in expert_load.png
_DEFAULT_BIGRAM_LABEL = "byte-bigram conditional entropy"  # runs written before the label was recorded


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class RunMetrics:
    """A run's metrics as columns, one row per training step (sorted; the last record of a step wins)."""

    run_dir: Path
    info: dict[str, Any]  # run_info.json ({} when absent)
    steps: np.ndarray  # [n] int64
    loss: np.ndarray  # [n]
    tokens_per_s: np.ndarray  # [n]
    max_over_mean: np.ndarray  # [n, L] max / mean tokens per EP rank of each MoE layer
    rebalanced: np.ndarray  # [n] bool
    slots_moved: np.ndarray  # [n]
    bytes_moved: np.ndarray  # [n]
    val_steps: np.ndarray  # [m]
    val_loss: np.ndarray  # [m]
    expert_load: ExpertLoad | None

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def num_layers(self) -> int:
        return self.max_over_mean.shape[1]


def _train_row(record: dict[str, Any]) -> tuple[float, float, list[float], bool, int, int]:
    return (float(record["loss"]), float(record["tokens_per_s"]), [float(v) for v in record["max_over_mean"]],
            bool(record.get("rebalanced", False)), int(record.get("slots_moved", 0)),
            int(record.get("bytes_moved", 0)))


def read_run(run_dir: str | Path) -> RunMetrics:
    """Read a run directory. A bad record raises ``ValueError`` naming the file and line."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run directory?")
    train: dict[int, tuple[int, tuple]] = {}
    val: dict[int, float] = {}
    for line_no, record in iter_records(path):
        try:
            if record["split"] == "train":
                train[record["step"]] = (line_no, _train_row(record))
            else:
                val[record["step"]] = float(record["val_loss"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{line_no}: {record['split']} record with a missing or bad field "
                             f"({type(exc).__name__}: {exc})") from None
    if not train:
        raise ValueError(f"{path} holds no training steps")
    steps = np.array(sorted(train), dtype=np.int64)
    num_layers = len(train[int(steps[0])][1][2])
    for line_no, row in train.values():
        if len(row[2]) != num_layers:
            raise ValueError(f"{path}:{line_no}: max_over_mean has {len(row[2])} layers, the first step "
                             f"{num_layers}")
    rows = [train[int(s)][1] for s in steps]
    columns = list(zip(*rows))
    info_path = run_dir / "run_info.json"
    return RunMetrics(
        run_dir=run_dir,
        info=json.loads(info_path.read_text()) if info_path.is_file() else {},
        steps=steps,
        loss=np.array(columns[0], dtype=np.float64),
        tokens_per_s=np.array(columns[1], dtype=np.float64),
        max_over_mean=np.array(columns[2], dtype=np.float32).reshape(len(steps), num_layers),
        rebalanced=np.array(columns[3], dtype=bool),
        slots_moved=np.array(columns[4], dtype=np.int64),
        bytes_moved=np.array(columns[5], dtype=np.int64),
        val_steps=np.array(sorted(val), dtype=np.int64),
        val_loss=np.array([val[s] for s in sorted(val)], dtype=np.float64),
        expert_load=read_expert_load(run_dir),
    )


# ---------------------------------------------------------------------------------------------- binning


def bin_edges(n: int, max_bins: int) -> np.ndarray:
    """``[bins + 1]`` positions cutting ``n`` steps into ``min(n, max_bins)`` contiguous, near-equal bins."""
    return np.unique(np.linspace(0, n, min(n, max_bins) + 1).round().astype(np.int64))


def bin_mean(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``[bins, ...]``: the mean of ``values [n, ...]`` over each bin."""
    counts = np.diff(edges).reshape(-1, *([1] * (values.ndim - 1)))
    return np.add.reduceat(values.astype(np.float64), edges[:-1], axis=0) / counts


def _after_first_rebalance(run: RunMetrics) -> np.ndarray:
    """``[n]`` bool: the steps after the first rebalance (all steps when none has steps after it)."""
    after = run.steps > run.steps[np.argmax(run.rebalanced)] if run.rebalanced.any() else run.steps < 0
    return after if after.any() else np.ones(len(run.steps), dtype=bool)


def layer_means(run: RunMetrics) -> np.ndarray:
    """``[L]`` mean max/mean of each layer over the steps after the first rebalance (all without one)."""
    return run.max_over_mean[_after_first_rebalance(run)].mean(axis=0)


# ------------------------------------------------------------------------------------------------ figures


def _figure(name: str, **kwargs: Any) -> tuple[plt.Figure, Any]:
    width, height = FIGURE_PX[name]
    return plt.subplots(figsize=(width / DPI, height / DPI), layout="constrained", **kwargs)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _rebalance_rug(ax: Any, run: RunMetrics, color: str = "tab:red") -> None:
    """Rebalance steps as ticks along the bottom edge (at most ~1000 ticks, one per pixel column)."""
    steps = run.steps[run.rebalanced]
    if len(steps) == 0:
        return
    span = max(1, int(run.steps[-1] - run.steps[0]))
    ticks = np.unique(np.round((steps - run.steps[0]) / span * 1000)) * span / 1000 + run.steps[0]
    ax.plot(ticks, np.zeros(len(ticks)), "|", color=color, ms=10, transform=ax.get_xaxis_transform(),
            label=f"rebalance ({len(steps)})")


def _plot_loss(run: RunMetrics, out: Path) -> None:
    fig, ax = _figure("loss.png")
    edges = bin_edges(len(run.steps), MAX_BINS)
    per_bin = len(run.steps) // (len(edges) - 1)
    label = "train loss" if per_bin == 1 else f"train loss (mean of {per_bin}+ steps)"
    ax.plot(bin_mean(run.steps, edges), bin_mean(run.loss, edges), lw=1, label=label)
    if len(run.val_steps):
        ax.plot(run.val_steps, run.val_loss, "o-", ms=3, label="validation loss")
    if "bigram_entropy" in run.info:
        ax.axhline(run.info["bigram_entropy"], color="gray", ls="--",
                   label=run.info.get("bigram_label", _DEFAULT_BIGRAM_LABEL))
    _rebalance_rug(ax, run)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.legend(fontsize="small", loc="upper right")
    _save(fig, out)


def _plot_throughput(run: RunMetrics, out: Path) -> None:
    fig, ax = _figure("throughput.png")
    edges = bin_edges(len(run.steps), MAX_BINS)
    ax.plot(bin_mean(run.steps, edges), bin_mean(run.tokens_per_s, edges), lw=1, label="tokens/s (bin mean)")
    median = float(np.median(run.tokens_per_s))
    ax.axhline(median, color="gray", ls="--", label=f"median {median:,.0f}")
    _rebalance_rug(ax, run)
    ax.set(xlabel="step", ylabel="tokens / s (all ranks)", title="Throughput")
    ax.legend(fontsize="small", loc="lower right")
    _save(fig, out)


def _plot_balance(run: RunMetrics, out: Path) -> None:
    """Percentiles over layers and the worst layers (top), every layer as a heatmap row (bottom)."""
    fig, (top, bottom) = _figure("balance.png", nrows=2, height_ratios=[1, 1], sharex=True)
    edges = bin_edges(len(run.steps), MAX_BINS)
    x = bin_mean(run.steps, edges)
    ratio = bin_mean(run.max_over_mean, edges)  # [bins, L]
    p10, p50, p90 = np.percentile(ratio, [10, 50, 90], axis=1)
    top.fill_between(x, ratio.min(1), ratio.max(1), color="tab:blue", alpha=0.12, label="min-max over layers")
    top.fill_between(x, p10, p90, color="tab:blue", alpha=0.25, label="p10-p90 over layers")
    top.plot(x, p50, color="tab:blue", lw=1.5, label="median layer")
    means = layer_means(run)
    for layer in np.argsort(-means, kind="stable")[: min(WORST_K, run.num_layers)]:
        top.plot(x, ratio[:, layer], lw=0.9, label=f"layer {layer} (mean {means[layer]:.2f})")
    _rebalance_rug(top, run)
    top.axhline(1.0, color="gray", lw=0.5)
    top.set(ylabel="max / mean tokens per rank")
    top.legend(fontsize="x-small", loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=4, frameon=False)
    fig.suptitle(f"Expert-parallel load imbalance: {run.num_layers} MoE layers as percentiles, the worst "
                 f"{min(WORST_K, run.num_layers)} drawn, every layer below")
    image = bottom.imshow(ratio.T, aspect="auto", origin="lower", interpolation="nearest", cmap="magma",
                          vmin=1.0, vmax=max(1.01, float(np.percentile(ratio, 99.5))),
                          extent=(run.steps[0], run.steps[-1], -0.5, run.num_layers - 0.5))
    bottom.set(xlabel="step", ylabel="MoE layer")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=bottom, location="bottom", shrink=0.5, aspect=40,
                 label="max / mean tokens per rank")
    _save(fig, out)


def _plot_expert_load(load: ExpertLoad, out: Path) -> None:
    """The hottest expert's share of each layer over time (all layers), and expert x time heatmaps of
    the ``DETAIL_LAYERS`` most skewed layers."""
    num_layers, num_experts = load.shape
    edges = bin_edges(len(load.steps), LOAD_BINS)
    totals = load.binned_sum(edges)  # [bins, L, E]
    share = totals / np.maximum(totals.sum(axis=2, keepdims=True), 1.0)
    hottest = share.max(axis=2) * num_experts  # [bins, L]: hottest expert / mean expert
    detail = np.argsort(-hottest.mean(axis=0), kind="stable")[: min(DETAIL_LAYERS, num_layers)]
    width, height = FIGURE_PX["expert_load.png"]
    fig = plt.figure(figsize=(width / DPI, height / DPI), layout="constrained")
    grid = fig.add_gridspec(2, len(detail), height_ratios=[1, 1.4])
    extent = (load.steps[0], load.steps[-1], -0.5, num_layers - 0.5)
    overview = fig.add_subplot(grid[0, :])
    image = overview.imshow(hottest.T, aspect="auto", origin="lower", interpolation="nearest", cmap="magma",
                            vmin=1.0, vmax=max(1.01, float(np.percentile(hottest, 99.5))), extent=extent)
    overview.set(xlabel="step", ylabel="MoE layer",
                 title=f"Hottest expert's load / mean expert load, all {num_layers} layers")
    overview.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=overview, label="hottest / mean")
    vmax = float(np.percentile(share[:, detail], 99.5)) or 1.0
    for column, layer in enumerate(detail):
        ax = fig.add_subplot(grid[1, column])
        image = ax.imshow(share[:, layer].T, aspect="auto", origin="lower", interpolation="nearest",
                          cmap="viridis", vmin=0.0, vmax=vmax,
                          extent=(load.steps[0], load.steps[-1], -0.5, num_experts - 0.5))
        ax.set(xlabel="step", title=f"layer {layer}")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if column == 0:
            ax.set_ylabel("logical expert")
    fig.colorbar(image, ax=fig.axes[-len(detail):], label="share of the layer's tokens")
    fig.suptitle(f"Expert load: {len(load.steps)} steps in {len(edges) - 1} columns; the "
                 f"{len(detail)} most skewed layers in detail")
    _save(fig, out)


# ------------------------------------------------------------------------------------------------ summary


def summarize(run: RunMetrics) -> dict[str, Any]:
    """Final numbers of a run: losses, balance (max / mean tokens per rank) and throughput."""
    tail = max(1, len(run.steps) // 10)
    summary: dict[str, Any] = {
        "steps": int(run.steps[-1]),
        "final_train_loss": float(np.mean(run.loss[-tail:])),
        "final_val_loss": float(run.val_loss[-1]) if len(run.val_loss) else None,
        "bigram_entropy": run.info.get("bigram_entropy"),
        "bigram_label": run.info.get("bigram_label", _DEFAULT_BIGRAM_LABEL),
        "rebalances": int(run.rebalanced.sum()),
        "slots_moved": int(run.slots_moved.sum()),
        "bytes_moved": int(run.bytes_moved.sum()),
        "median_tokens_per_s": float(np.median(run.tokens_per_s)),
    }
    if run.num_layers:
        after = _after_first_rebalance(run)
        means = layer_means(run)
        worst = np.argsort(-means, kind="stable")[:5]
        summary.update({
            "worst_max_over_mean_first_steps": float(run.max_over_mean[:10].max()),
            "mean_worst_max_over_mean_after_first_rebalance": float(run.max_over_mean[after].max(1).mean()),
            "max_over_mean_layer_p50": float(np.percentile(means, 50)),
            "max_over_mean_layer_p90": float(np.percentile(means, 90)),
            "max_over_mean_layer_max": float(means.max()),
            "worst_layers": [[int(layer), round(float(means[layer]), 4)] for layer in worst],
        })
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _summary_markdown(summary: dict[str, Any], run: RunMetrics, images: list[str]) -> str:
    lines = ["# Run summary", ""]
    for key in ("config", "world_size", "sharding_strategy", "corpus"):
        if key in run.info:
            lines.append(f"- {key}: `{run.info[key]}`")
    lines += ["", "Balance is max / mean tokens per EP rank (1.0 is perfect); per-layer numbers are means "
              "over the steps after the first rebalance.", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if k != "worst_layers"]
    if summary.get("worst_layers"):
        lines += ["", "| worst layers | max / mean |", "| --- | --- |"]
        lines += [f"| layer {layer} | {value:.4g} |" for layer, value in summary["worst_layers"]]
    if summary["final_val_loss"] is not None and summary["bigram_entropy"] is not None:
        beat = summary["final_val_loss"] < summary["bigram_entropy"]
        verdict = "is below" if beat else "is NOT below"
        lines += ["", f"Validation loss {verdict} the {summary['bigram_label']}."]
    if run.expert_load is None:
        lines += ["", "No `expert_load.bin` in the run directory: no expert-load figure."]
    lines += ["", *(f"![{Path(name).stem}]({name})" for name in images), ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """(Re)generate ``RUN_DIR/report/``: PNG plots, ``summary.json`` and ``summary.md``; return the folder."""
    run = read_run(run_dir)
    out = run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = ["loss.png", "throughput.png"]
    _plot_loss(run, out / "loss.png")
    _plot_throughput(run, out / "throughput.png")
    if run.num_layers:
        _plot_balance(run, out / "balance.png")
        images.append("balance.png")
    if run.expert_load is not None:
        _plot_expert_load(run.expert_load, out / "expert_load.png")
        images.append("expert_load.png")
    summary = summarize(run)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(_summary_markdown(summary, run, images))
    return out


# --------------------------------------------------------------------------------------------- comparison


def _run_label(run: RunMetrics) -> str:
    strategy = run.info.get("sharding_strategy")
    return f"{run.name} ({strategy})" if strategy else run.name


def _plot_comparison(runs: list[RunMetrics], out: Path) -> None:
    """Loss, tokens/s and worst-layer max/mean of the runs, side by side (one color per run)."""
    fig, (loss_ax, speed_ax, balance_ax) = _figure("compare.png", ncols=3)
    for color, run in zip(("tab:blue", "tab:orange"), runs):
        edges = bin_edges(len(run.steps), MAX_BINS)
        x, label = bin_mean(run.steps, edges), _run_label(run)
        loss_ax.plot(x, bin_mean(run.loss, edges), lw=1, color=color, label=f"{label} train")
        if len(run.val_steps):
            loss_ax.plot(run.val_steps, run.val_loss, "o--", ms=3, color=color, label=f"{label} val")
        speed_ax.plot(x, bin_mean(run.tokens_per_s, edges), lw=1, color=color, label=label)
        if run.num_layers:
            ratio = bin_mean(run.max_over_mean, edges)
            balance_ax.plot(x, ratio.max(1), lw=1, color=color, label=f"{label} worst layer")
            balance_ax.plot(x, np.median(ratio, axis=1), lw=1, ls=":", color=color,
                            label=f"{label} median layer")
    loss_ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    speed_ax.set(xlabel="step", ylabel="tokens / s (all ranks)", title="Throughput")
    balance_ax.axhline(1.0, color="gray", lw=0.5)
    balance_ax.set(xlabel="step", ylabel="max / mean tokens per rank", title="Load imbalance")
    for ax in (loss_ax, speed_ax, balance_ax):
        ax.legend(fontsize="x-small", loc="upper right")
    _save(fig, out)


def write_comparison(run_a: str | Path, run_b: str | Path, out: str | Path | None = None) -> Path:
    """A side-by-side page of two runs (e.g. static vs dynamic placement): ``compare.png`` (loss,
    tokens/s, max/mean) and ``compare.md`` / ``compare.json`` (their summaries and the ratio B / A).
    ``out`` defaults to ``compare_A_vs_B`` beside run A; returns ``out``."""
    runs = [read_run(run_a), read_run(run_b)]
    if out is None:
        out = runs[0].run_dir.parent / f"compare_{runs[0].name}_vs_{runs[1].name}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plot_comparison(runs, out / "compare.png")
    summaries = [summarize(run) for run in runs]
    skip = ("worst_layers", "bigram_label")
    keys = [k for k in summaries[0] if k in summaries[1] and k not in skip]
    a_label, b_label = (_run_label(run) for run in runs)
    lines = [f"# {a_label} vs {b_label}", "", "Balance is max / mean tokens per EP rank (1.0 is perfect).",
             "", f"| metric | A: {a_label} | B: {b_label} | B / A |", "| --- | --- | --- | --- |"]
    for key in keys:
        a, b = summaries[0][key], summaries[1][key]
        numeric = isinstance(a, (int, float)) and isinstance(b, (int, float)) and a
        lines.append(f"| {key} | {_fmt(a)} | {_fmt(b)} | {_fmt(b / a) if numeric else ''} |")
    lines += ["", "![comparison](compare.png)", ""]
    (out / "compare.md").write_text("\n".join(lines))
    (out / "compare.json").write_text(json.dumps({"A": {"run": str(runs[0].run_dir), **summaries[0]},
                                                  "B": {"run": str(runs[1].run_dir), **summaries[1]}},
                                                 indent=2) + "\n")
    return out
