"""Run a test function on N ranks as separate processes with gloo on CPU.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes, initialises torch.distributed in
each from torchrun-style environment variables (free port per call), calls ``fn(*args)`` and returns
the per-rank return values. An exception on any rank is re-raised here with that rank's traceback;
a rank that hangs (e.g. in a collective another rank never joins) fails the call after ``timeout_s``.
``fn`` must be a module-level function (it is pickled to the ranks).

Results travel through files, not a queue: each rank pickles its result (tensors included, by value)
into ``rank{r}.pkl`` in a private directory with an atomic rename before it exits, so nothing depends on
a child process staying alive until the parent has received it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_CTX = mp.get_context("forkserver")
# Ranks fork from a server that imported these once (a missing one is skipped): Megatron-Core's import
# costs seconds of CPU per rank otherwise. Importing it patches nothing; tests.megatron_shim patches.
_CTX.set_forkserver_preload(["torch", "torch.distributed", "megatron.core.models.gpt",
                             "megatron.core.optimizer", "megatron.core.distributed",
                             "megatron.core.pipeline_parallel"])


class RankFailure(RuntimeError):
    """One or more ranks raised; the message carries each failing rank's traceback."""


class RankTimeout(RuntimeError):
    """Some ranks did not finish in time (a hung collective, a deadlock)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_result(result_dir: str, rank: int, status: str, value: Any) -> None:
    """Atomically write ``(status, value)`` to ``result_dir/rank{rank}.pkl``."""
    try:
        data = pickle.dumps((status, value))
    except Exception:  # noqa: BLE001 - an unpicklable result is a failure of that rank
        data = pickle.dumps(("error", f"result of rank {rank} cannot be pickled:\n{traceback.format_exc()}"))
    tmp = Path(result_dir) / f".rank{rank}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, Path(result_dir) / f"rank{rank}.pkl")


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, env: dict[str, str],
               args: tuple, result_dir: str) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        from ep_megatron.parallel import init_distributed

        init_distributed(timeout_s=float(env.get("EP_TEST_PG_TIMEOUT", "300")), backend="gloo")
        value = fn(*args)
        if dist.is_initialized():
            dist.destroy_process_group()
        _write_result(result_dir, rank, "ok", value)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        _write_result(result_dir, rank, "error", traceback.format_exc())


def _collect(result_dir: Path, procs: list[Any], values: dict[int, Any], errors: dict[int, str]) -> None:
    """Read every result file not read yet; a process gone without one is an error."""
    for rank, proc in enumerate(procs):
        if rank in values or rank in errors:
            continue
        exited = not proc.is_alive()  # checked before the file: a rank writes its file, then exits
        path = result_dir / f"rank{rank}.pkl"
        if path.is_file():
            status, payload = pickle.loads(path.read_bytes())
            (values if status == "ok" else errors)[rank] = payload
        elif exited:
            errors[rank] = f"process exited with code {proc.exitcode} before reporting"


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
              env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the per-rank results in rank order."""
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="ep_ranks_") as tmp:
        result_dir = Path(tmp)
        procs = [
            _CTX.Process(target=_rank_main, args=(fn, rank, world_size, port, child_env, args, tmp),
                         daemon=True)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        try:
            while len(values) + len(errors) < world_size and not errors and time.monotonic() < deadline:
                time.sleep(0.02)
                _collect(result_dir, procs, values, errors)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            for proc in procs:
                proc.join(timeout=10)
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    if len(values) < world_size:
        missing = sorted(set(range(world_size)) - set(values))
        raise RankTimeout(f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s")
    return [values[r] for r in range(world_size)]
