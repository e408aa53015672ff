"""service.memory: after a reload, wait for the replaced engine to be collected, then trim the heap."""

from __future__ import annotations

import asyncio
import gc
import weakref

from service.memory import return_freed_memory, trim_when_released


class _Bundle:
    """Stands for an engine: any object a weak reference can follow."""


def test_the_c_library_is_asked_to_trim_on_glibc():
    assert return_freed_memory() is True  # the test machines run Debian (glibc)


def test_trims_once_the_old_object_is_collected():
    async def scenario() -> bool:
        old = _Bundle()
        task = asyncio.create_task(trim_when_released(weakref.ref(old), timeout_s=30, poll_s=0.01))
        await asyncio.sleep(0.05)
        assert not task.done()  # still referenced: waits
        del old
        return await task

    assert asyncio.run(scenario()) is True


def test_an_object_still_referenced_at_the_deadline_is_reported_not_trimmed(caplog):
    async def scenario(held: _Bundle) -> bool:
        return await trim_when_released(weakref.ref(held), timeout_s=0.05, poll_s=0.01)

    held = _Bundle()
    assert asyncio.run(scenario(held)) is False
    assert "still referenced" in caplog.text


def test_a_reference_cycle_is_collected_before_giving_up():
    async def scenario() -> bool:
        old = _Bundle()
        old.me = old  # only the cycle collector frees it
        ref = weakref.ref(old)
        del old
        return await trim_when_released(ref, timeout_s=0.05, poll_s=0.01)

    gc.disable()
    try:
        assert asyncio.run(scenario()) is True
    finally:
        gc.enable()
