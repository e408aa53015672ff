"""Give the memory of a replaced bundle back to the operating system.

After a hot reload the old engine (its folded table, ANN index, item inputs: ~1.8 GB at 1M items) is
freed once the last request admitted with it is answered, but glibc keeps much of what it freed in its
heaps for reuse instead of returning it: measured on the 1M-item bundle, a process serving one engine
sat at 2.67 GB after a reload with the old engine gone, and at 2.06 GB after ``malloc_trim(0)``
(docs/benchmarks.md). So after a reload the service waits for the old engine to be collected and then
asks the C library to trim. Other C libraries (musl, macOS) have no ``malloc_trim``: nothing to do there.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import weakref
from typing import Any

from service import metrics

log = logging.getLogger("fair.memory")


def return_freed_memory() -> bool:
    """``malloc_trim(0)`` where the C library has it (glibc); ``True`` if it was called."""
    # the process's own symbols: finds glibc's malloc_trim without ldconfig or a compiler
    # (ctypes.util.find_library needs one of them, and slim images have neither)
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


async def trim_when_released(old: weakref.ref[Any], timeout_s: float = 120.0, poll_s: float = 0.25) -> bool:
    """Wait (up to ``timeout_s``) until the object behind ``old`` is collected, then return freed memory
    to the OS off the event loop. ``True`` if it was released and trimmed; ``False`` (logged) if it is
    still referenced at the deadline: then something keeps a replaced bundle alive, which is a leak."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while old() is not None and loop.time() < deadline:
        await asyncio.sleep(poll_s)
    if old() is not None:
        await asyncio.to_thread(gc.collect)  # a reference cycle is only freed by the collector
    if old() is not None:
        log.warning("a replaced engine is still referenced %.0f s after the reload: not trimmed", timeout_s)
        metrics.REPLACED_ENGINES.labels(outcome="still_referenced").inc()
        return False
    trimmed = await asyncio.to_thread(return_freed_memory)
    metrics.REPLACED_ENGINES.labels(outcome="freed").inc()
    return trimmed
