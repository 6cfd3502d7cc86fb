"""Peak CPU memory allocated by a piece of code, from the profiler's allocation events.

``peak_allocated_bytes(fn)`` runs ``fn()`` under ``torch.profiler`` with ``profile_memory=True`` and
returns the peak, over the run, of bytes allocated minus bytes freed since ``fn`` started (tensors that
existed before are not counted; what ``fn`` keeps alive at the end is). Allocations inside one kernel are
seen at their real size, so this is the peak a caching allocator would need on top of what was live.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
