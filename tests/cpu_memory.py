"""CPU memory allocated by a piece of code, from the profiler's allocation events.

``peak_allocated_bytes(fn)`` runs ``fn()`` under ``torch.profiler`` with ``profile_memory=True`` and
returns the peak, over the run, of bytes allocated minus bytes freed since ``fn`` started (tensors that
existed before are not counted; what ``fn`` keeps alive at the end is). Allocations inside one kernel are
seen at their real size, so this is the peak a caching allocator would need on top of what was live.
``total_allocated_bytes(fn)`` sums every allocation (the memory traffic of the allocations).

``peak_tensor_bytes(fn)`` counts, instead, the storages of the tensors ``fn``'s operations create, from
creation until the last Python tensor on them is gone: the peak of the code itself, independent of when
a collective backend's worker thread drops its own reference (gloo releases buffers on its thread, a
little after the collective returns, which makes the allocator's peak vary from run to run).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _allocations(fn: Callable[[], Any]) -> list[int]:
    """Bytes of every allocation (> 0) and free (< 0) during ``fn()``, in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return [event.nbytes() for event in sorted(events, key=lambda e: e.start_ns())]


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    live = peak = 0
    for nbytes in _allocations(fn):
        live += nbytes
        peak = max(peak, live)
    return peak


def total_allocated_bytes(fn: Callable[[], Any]) -> int:
    return sum(nbytes for nbytes in _allocations(fn) if nbytes > 0)


class _StorageTracker(TorchDispatchMode):
    """Live bytes of the storages created by the operations run under it (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [nbytes, live tensors]
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor) or tensor.untyped_storage().nbytes() == 0:
                continue
            key = tensor.untyped_storage().data_ptr()
            if key in inputs:  # a view or an in-place result: no new storage
                continue
            if key not in self.refs:
                self.refs[key] = [tensor.untyped_storage().nbytes(), 0]
                self.live += self.refs[key][0]
                self.peak = max(self.peak, self.live)
            self.refs[key][1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    tracker = _StorageTracker()
    with tracker:
        fn()
    return tracker.peak
