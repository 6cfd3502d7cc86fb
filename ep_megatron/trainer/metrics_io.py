"""The files a training run writes for its report, and their readers (numpy only: no torch import).

* ``metrics.jsonl``: one JSON object per line. Training steps (``"split": "train"``) with ``step``,
  ``loss``, ``lr``, ``tokens_per_s``, ``aux_losses``, ``max_over_mean`` (``[num_moe_layers]``: max / mean
  tokens per EP rank, the worst EP group), ``rebalanced``, ``slots_moved``, ``bytes_moved``;
  validation points (``"split": "val"``) with ``step`` and ``val_loss``.
* ``expert_load.bin``: the routed token-expert pairs of every training step, all ranks summed, as fixed
  size binary rows (``int64 step``, then ``uint32 [num_moe_layers, num_experts]``), described by
  ``expert_load.json``. At 64 layers x 256 experts a row is 64 KiB; as JSON it would be ~130 KB of text
  per step, too slow to parse for a report at 10 000 steps.

A resumed run re-logs the steps after its checkpoint: readers keep the last record of each step.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
LOAD_FILE = "expert_load.bin"
LOAD_HEADER = "expert_load.json"
_LOAD_FORMAT = "ep_megatron expert load v1"


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every record of a ``metrics.jsonl``, in file order.

    A line that is not a JSON object with ``split`` (``"train"`` or ``"val"``) and an integer ``step``
    raises ``ValueError`` naming the file and line. A last line cut short (no newline, not JSON: the
    run was killed while writing it) is skipped with a warning.
    """
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:
                if not raw.endswith(b"\n"):
                    warnings.warn(f"{path}:{line_no}: skipping the torn last line (the run stopped while "
                                  f"writing it)", stacklevel=2)
                    return
                raise ValueError(f"{path}:{line_no}: not a JSON record ({exc})") from None
            if (not isinstance(record, dict) or record.get("split") not in ("train", "val")
                    or not isinstance(record.get("step"), int)):
                raise ValueError(f"{path}:{line_no}: a metrics record is a JSON object with 'split' "
                                 f"('train' or 'val') and an integer 'step'")
            yield line_no, record


def load_row_dtype(num_layers: int, num_experts: int) -> np.dtype:
    """The row of ``expert_load.bin``: ``step`` int64 and ``load`` uint32 ``[num_layers, num_experts]``."""
    return np.dtype([("step", "<i8"), ("load", "<u4", (num_layers, num_experts))])


class ExpertLoadLog:
    """Appends one ``expert_load.bin`` row per training step (rank 0 of a run).

    An existing log of another shape (the run directory was reused for another model) is replaced, with
    a warning.
    """

    def __init__(self, run_dir: Path, num_layers: int, num_experts: int) -> None:
        run_dir = Path(run_dir)
        header = {"format": _LOAD_FORMAT, "num_layers": num_layers, "num_experts": num_experts,
                  "row": "int64 step, then uint32 [num_layers, num_experts] routed token-expert pairs"}
        header_path, self.path = run_dir / LOAD_HEADER, run_dir / LOAD_FILE
        mode = "ab"
        if header_path.is_file() and json.loads(header_path.read_text()) != header:
            warnings.warn(f"{header_path}: another shape than this run's {num_layers} x {num_experts}; "
                          f"starting a new expert load log", stacklevel=2)
            mode = "wb"
        header_path.write_text(json.dumps(header) + "\n")
        self.dtype = load_row_dtype(num_layers, num_experts)
        self.file = self.path.open(mode)

    def append(self, step: int, load: Any) -> None:
        """Write ``load [num_layers, num_experts]`` (non-negative counts) as the row of ``step``."""
        row = np.zeros(1, dtype=self.dtype)
        row["step"] = step
        row["load"] = np.asarray(load)
        self.file.write(row.tobytes())
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class ExpertLoad:
    """The per-step expert load of a run: ``steps[i]`` is in row ``index[i]`` of ``path`` (the last row
    written for it). Rows are read in chunks, never all at once (10 000 steps x 64 x 256 is 655 MB)."""

    path: Path
    dtype: np.dtype  # load_row_dtype(L, E)
    steps: np.ndarray  # [n] int64, sorted, unique
    index: np.ndarray  # [n] int64 row of each step

    @property
    def shape(self) -> tuple[int, int]:
        """``(num_layers, num_experts)``."""
        return self.dtype["load"].shape

    def binned_sum(self, edges: np.ndarray, chunk_rows: int = 256) -> np.ndarray:
        """``[bins, L, E]`` float64: the load summed over steps ``steps[edges[b]:edges[b + 1]]`` of each bin.

        ``edges [bins + 1]`` are increasing positions into ``steps``, from 0 to ``len(steps)``.
        """
        bin_of_row = np.full(int(self.index.max()) + 1, -1, dtype=np.int64)
        bin_of_row[self.index] = np.searchsorted(edges, np.arange(len(self.steps)), side="right") - 1
        total = np.zeros((len(edges) - 1, *self.shape), dtype=np.float64)
        with self.path.open("rb") as f:
            for start in range(0, len(bin_of_row), chunk_rows):
                count = min(chunk_rows, len(bin_of_row) - start)
                load = np.fromfile(f, dtype=self.dtype, count=count)["load"]  # [rows, L, E]
                bins = bin_of_row[start : start + count]
                kept = np.flatnonzero(bins >= 0)
                order = kept[np.argsort(bins[kept], kind="stable")]
                if len(order) == 0:  # every row of the chunk was re-logged later
                    continue
                if len(order) < count or np.any(np.diff(order) != 1):  # rows re-logged by a resume
                    load = load[order]
                sorted_bins = bins[order]
                bounds = [*np.flatnonzero(np.r_[True, sorted_bins[1:] != sorted_bins[:-1]]), len(order)]
                for begin, end in zip(bounds[:-1], bounds[1:]):  # a loop of sums beats reduceat 5x here
                    total[sorted_bins[begin]] += load[begin:end].sum(axis=0, dtype=np.float64)
        return total


def read_expert_load(run_dir: Path) -> ExpertLoad | None:
    """The run's ``expert_load.bin``, or None when it has none. A partial last row is ignored with a
    warning; a header that is not ours raises ``ValueError`` naming it."""
    header_path, path = Path(run_dir) / LOAD_HEADER, Path(run_dir) / LOAD_FILE
    if not header_path.is_file() or not path.is_file():
        return None
    header = json.loads(header_path.read_text())
    if header.get("format") != _LOAD_FORMAT:
        raise ValueError(f"{header_path}: not an ep_megatron expert load header ({header.get('format')!r})")
    dtype = load_row_dtype(int(header["num_layers"]), int(header["num_experts"]))
    count, torn = divmod(path.stat().st_size, dtype.itemsize)
    if torn:
        warnings.warn(f"{path}: ignoring a partial last row of {torn} bytes (the run stopped while writing "
                      f"it)", stacklevel=2)
    if count == 0:
        return None
    with path.open("rb") as f:  # the step of every row, one 8-byte read each
        fd, size = f.fileno(), dtype.itemsize
        written = np.frombuffer(b"".join(os.pread(fd, 8, row * size) for row in range(count)), dtype="<i8")
    steps, last_from_end = np.unique(written[::-1], return_index=True)
    return ExpertLoad(path, dtype, steps, count - 1 - last_from_end)
