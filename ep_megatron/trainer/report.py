"""Plots and a summary of a training run, from ``RUN_DIR/metrics.jsonl`` and ``RUN_DIR/run_info.json``.

``metrics.jsonl`` holds one JSON object per line: training steps (``"split": "train"``) with ``step``,
``loss``, ``lr``, ``tokens_per_s``, ``aux_losses``, ``expert_load`` (``[num_moe_layers][E]`` global
routed pairs of the step), ``balancedness`` and ``max_over_mean`` (per MoE layer, tokens per rank),
``rebalanced``, ``slots_moved``, ``bytes_moved``; and validation points (``"split": "val"``) with
``step`` and ``val_loss``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return (training records, validation records) of a run, in step order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run directory?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A resumed run re-logs the steps after its checkpoint: keep the last record of each step.
    by_key = {(r["split"], r["step"]): r for r in records}
    train = sorted((r for r in by_key.values() if r["split"] == "train"), key=lambda r: r["step"])
    val = sorted((r for r in by_key.values() if r["split"] == "val"), key=lambda r: r["step"])
    if not train:
        raise ValueError(f"{path} holds no training steps")
    return train, val


def _plot_loss(train: list[dict], val: list[dict], info: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    if "bigram_entropy" in info:
        ax.axhline(info["bigram_entropy"], color="gray", ls="--", label="byte-bigram entropy")
    for step in (r["step"] for r in train if r.get("rebalanced")):
        ax.axvline(step, color="tab:red", alpha=0.15)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_expert_load(train: list[dict], out: Path) -> None:
    load = np.asarray([r["expert_load"] for r in train], dtype=float)  # [steps, layers, E]
    num_layers = load.shape[1]
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.8 + 1.6 * num_layers), squeeze=False)
    steps = [r["step"] for r in train]
    for layer, ax in enumerate(axes[:, 0]):
        share = load[:, layer, :] / np.maximum(load[:, layer, :].sum(axis=1, keepdims=True), 1)
        image = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, share.shape[1] - 0.5))
        ax.set(ylabel=f"MoE layer {layer}\nlogical expert")
        fig.colorbar(image, ax=ax, label="share of tokens")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Expert load over time")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_balance(train: list[dict], out: Path) -> None:
    ratio = np.asarray([r["max_over_mean"] for r in train], dtype=float)  # [steps, layers]
    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in range(ratio.shape[1]):
        ax.plot(steps, ratio[:, layer], lw=1, label=f"MoE layer {layer}")
    for i, step in enumerate(r["step"] for r in train if r.get("rebalanced")):
        ax.axvline(step, color="tab:red", ls=":", label="rebalance" if i == 0 else None)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set(xlabel="step", ylabel="max / mean tokens per rank", title="Expert-parallel load imbalance")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def summarize(train: list[dict], val: list[dict], info: dict) -> dict[str, Any]:
    """Final numbers of a run: losses, balance before/after rebalancing, throughput."""
    tail = train[-max(1, len(train) // 10):]
    first_rebalance = next((r["step"] for r in train if r.get("rebalanced")), None)
    after = [r for r in train if first_rebalance is not None and r["step"] > first_rebalance] or train
    return {
        "steps": train[-1]["step"],
        "final_train_loss": float(np.mean([r["loss"] for r in tail])),
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "bigram_entropy": info.get("bigram_entropy"),
        "rebalances": sum(bool(r.get("rebalanced")) for r in train),
        "slots_moved": sum(r.get("slots_moved", 0) for r in train),
        "bytes_moved": sum(r.get("bytes_moved", 0) for r in train),
        "worst_max_over_mean_first_steps": float(np.max([max(r["max_over_mean"]) for r in train[:10]])),
        "mean_worst_max_over_mean_after_first_rebalance": float(
            np.mean([max(r["max_over_mean"]) for r in after])
        ),
        "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in train])),
    }


def _summary_markdown(summary: dict[str, Any], info: dict) -> str:
    lines = ["# Run summary", ""]
    for key in ("config", "world_size", "sharding_strategy", "corpus"):
        if key in info:
            lines.append(f"- {key}: `{info[key]}`")
    lines += ["", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    if summary["final_val_loss"] is not None and summary["bigram_entropy"] is not None:
        beat = summary["final_val_loss"] < summary["bigram_entropy"]
        lines += ["", f"Validation loss {'is below' if beat else 'is NOT below'} the byte-bigram entropy."]
    lines += ["", "![loss](loss.png)", "![expert load](expert_load.png)", "![balance](balance.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """(Re)generate ``RUN_DIR/report/`` with PNG plots and ``summary.md``; return the folder."""
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    _plot_loss(train, val, info, out / "loss.png")
    _plot_expert_load(train, out / "expert_load.png")
    _plot_balance(train, out / "balance.png")
    summary = summarize(train, val, info)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(_summary_markdown(summary, info))
    return out
