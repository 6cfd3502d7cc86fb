"""Run a test function on N ranks as separate processes with gloo on CPU.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes, initialises torch.distributed in
each from torchrun-style environment variables (free port per call), calls ``fn(*args)`` and returns
the per-rank return values. An exception on any rank is re-raised here with that rank's traceback;
a rank that hangs (e.g. in a collective another rank never joins) fails the call after ``timeout_s``.
``fn`` must be a module-level function (it is pickled to the ranks).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
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


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, env: dict[str, str],
               args: tuple, results: Any) -> None:
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
        results.put((rank, "ok", value))
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
              env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the per-rank results in rank order."""
    port = free_port()
    results = _CTX.Queue()
    child_env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    procs = [
        _CTX.Process(target=_rank_main, args=(fn, rank, world_size, port, child_env, args, results),
                     daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode != 0 and r not in values and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode} before reporting"
                if errors:
                    break
                continue
            (values if status == "ok" else errors)[rank] = payload
            if errors:
                break
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
