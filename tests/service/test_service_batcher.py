"""The micro-batcher with a real engine: results match unbatched inference, a full queue refuses,
closing drains everything already queued."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.batcher import Batcher, BatcherClosed, Job, Overloaded, QueueFull
from service.engine import load_engine


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return load_engine(tiny_bundle.model_dir, providers=["CPUExecutionProvider"])


def _job(engine, loop, n: int, k: int = 5) -> Job:
    history = np.arange(n % 7 + 1, dtype=np.int64) + n % 11
    return Job(engine, f"u{n}", history, history, k, 10, loop.create_future(), loop)


def test_batched_results_equal_single_requests(engine):
    async def run():
        loop = asyncio.get_running_loop()
        # batches of 8: the window is long (60 s) so a batch closes because it is full, never on a
        # clock a loaded machine can miss (all 40 jobs are queued at once, 40 = 5 x 8)
        batcher = Batcher(max_batch_size=8, max_wait_ms=60_000, queue_size=64)
        jobs = [_job(engine, loop, n, k=3 + n % 3) for n in range(40)]
        results = await asyncio.gather(*(batcher.submit(j) for j in jobs))
        await asyncio.to_thread(batcher.close)
        return jobs, results

    jobs, results = asyncio.run(run())
    assert {j.batch_size for j in jobs} == {8}
    for job, res in zip(jobs, results, strict=True):
        items, scores = engine.search(engine.forward([job.history]), job.beam_size, job.k, [job.exclude])
        np.testing.assert_array_equal(res.items, items[0][items[0] >= 0])
        np.testing.assert_allclose(res.scores, scores[0][items[0] >= 0], atol=1e-5)


def test_full_queue_refuses_and_close_drains(engine):
    async def run():
        loop = asyncio.get_running_loop()
        batcher = Batcher(max_batch_size=1, max_wait_ms=0, queue_size=4)
        accepted, refused = [], 0
        for n in range(500):  # submitting never yields to the worker's pace: the queue fills up
            try:
                accepted.append(batcher.submit(_job(engine, loop, n)))
            except QueueFull:
                refused += 1
        await asyncio.to_thread(batcher.close)  # drain: every accepted job gets its answer
        with pytest.raises(BatcherClosed):
            batcher.submit(_job(engine, loop, 0))
        return accepted, refused

    accepted, refused = asyncio.run(run())
    assert refused > 0
    assert all(f.done() and not f.cancelled() and f.exception() is None for f in accepted)


def test_a_user_with_unusable_scores_fails_alone(engine):
    """NaN scores for one user (a broken export, an input the model cannot handle) must fail that
    user's request only; the others batched with it still get the answer they would get alone."""
    poisoned = {"u3"}

    class NaNForSomeUsers(type(engine)):
        """The real engine (ONNX Runtime), with NaN written into the poisoned users' rows."""

        def forward(self, histories):
            scores = super().forward(histories)
            for row, job in enumerate(self.current_jobs):
                if job.user_id in poisoned:
                    scores.outputs[0][row] = np.nan  # the first output (history), whole row
            return scores

    faulty = NaNForSomeUsers(engine.bundle, engine.session, engine.provider, engine.max_history)

    async def run():
        loop = asyncio.get_running_loop()
        # one batch of all 8: it closes when full (the 60 s window is a safety net, not a timing)
        batcher = Batcher(max_batch_size=8, max_wait_ms=60_000, queue_size=64)
        jobs = [_job(faulty, loop, n) for n in range(8)]
        faulty.current_jobs = jobs
        outcomes = await asyncio.gather(*(batcher.submit(j) for j in jobs), return_exceptions=True)
        await asyncio.to_thread(batcher.close)
        return jobs, outcomes

    jobs, outcomes = asyncio.run(run())
    assert {j.batch_size for j in jobs} == {8}
    for job, outcome in zip(jobs, outcomes, strict=True):
        if job.user_id in poisoned:
            assert isinstance(outcome, ValueError) and "NaN" in str(outcome)
        else:
            items, _ = engine.search(engine.forward([job.history]), job.beam_size, job.k, [job.exclude])
            np.testing.assert_array_equal(outcome.items, items[0][items[0] >= 0])


def test_warm_up_builds_the_item_index(tiny_bundle):
    """The first request after a (re)load must not build the id -> index dict on the event loop."""
    fresh = load_engine(tiny_bundle.model_dir, providers=["CPUExecutionProvider"])
    assert fresh.bundle.table._index is None
    fresh.warm_up(max_batch_size=2, beam_size=4, k=2)
    assert fresh.bundle.table._index is not None


def test_admission_refuses_at_once_what_cannot_finish_before_its_deadline(engine):
    """A burst used to queue until the request deadline and end as 504s after the full wait; now a job
    whose expected wait (work ahead x measured cost per job) exceeds its time left is refused at once."""

    async def run():
        loop = asyncio.get_running_loop()
        batcher = Batcher(max_batch_size=8, max_wait_ms=0, queue_size=10_000)
        assert batcher.expected_wait_s() == 0.0  # nothing measured yet: nothing refused on a guess
        await asyncio.gather(*(batcher.submit(_job(engine, loop, n), time_left_s=30.0) for n in range(24)))
        cost = batcher.job_cost_s
        assert cost is not None and cost > 0

        burst = [_job(engine, loop, n) for n in range(400)]
        admitted, refused = [], 0
        budget = 40 * cost  # room for ~40 jobs' worth of work
        for job in burst:
            try:
                admitted.append(batcher.submit(job, time_left_s=budget))
            except Overloaded:
                refused += 1
        await asyncio.gather(*admitted)
        await asyncio.to_thread(batcher.close)
        return len(admitted), refused

    admitted, refused = asyncio.run(run())
    assert refused > 0 and admitted + refused == 400
    assert admitted < 400 // 2  # the queue took about what fits into the time left, not everything


def test_an_idle_batcher_never_refuses_even_after_a_pathological_measurement(engine):
    """A stale, huge estimate (one batch stalled by the machine) must not lock the service into refusing
    everything: with nothing ahead, a job is admitted, and its batch measures the cost anew."""

    async def run():
        loop = asyncio.get_running_loop()
        batcher = Batcher(max_batch_size=8, max_wait_ms=0, queue_size=64)
        await batcher.submit(_job(engine, loop, 0), time_left_s=30.0)
        # the worker records the batch's cost after handing the result over: wait for it
        deadline = time.monotonic() + 60
        while batcher.job_cost_s is None:
            assert time.monotonic() < deadline, "the worker never recorded the batch's cost"
            await asyncio.sleep(0.01)
        batcher.job_cost_s = 100.0  # as if the last batch had taken 100 s per job
        batcher.delivery_lag_s = 100.0
        result = await batcher.submit(_job(engine, loop, 1), time_left_s=0.001)
        await asyncio.to_thread(batcher.close)
        return result, batcher.job_cost_s

    result, cost = asyncio.run(run())
    assert len(result.items) > 0 and cost < 100.0


def test_a_job_with_no_time_left_is_a_timeout_never_an_overload_with_a_negative_time(engine):
    """A request that reaches the batcher after its deadline (it waited for Redis or the event loop)
    used to be refused as 'expected wait 0 ms exceeds the -3357 ms left': a timeout dressed as an
    overload. It is a TimeoutError (the caller's 504) whatever the queue holds, and nothing is queued."""

    async def run():
        loop = asyncio.get_running_loop()
        batcher = Batcher(max_batch_size=8, max_wait_ms=0, queue_size=64)
        for left in (0.0, -3.357):
            with pytest.raises(TimeoutError):
                batcher.submit(_job(engine, loop, 0), time_left_s=left)
        depth = batcher.depth
        await asyncio.to_thread(batcher.close)
        return depth

    assert asyncio.run(run()) == 0


def test_requests_still_reading_redis_count_as_work_ahead(engine):
    """``extra_ahead`` (requests that will reach the queue first: they are reading their history from
    Redis) adds to the expected wait at the measured cost per job, even while the queue is empty."""

    async def run():
        loop = asyncio.get_running_loop()
        batcher = Batcher(max_batch_size=8, max_wait_ms=0, queue_size=64)
        await batcher.submit(_job(engine, loop, 0), time_left_s=30.0)
        deadline = time.monotonic() + 60
        while batcher.job_cost_s is None:  # recorded after the result is handed over: wait for it
            assert time.monotonic() < deadline, "the worker never recorded the batch's cost"
            await asyncio.sleep(0.01)
        batcher.delivery_lag_s = 0.0
        waits = batcher.expected_wait_s(), batcher.expected_wait_s(extra_ahead=10)
        cost = batcher.job_cost_s
        await asyncio.to_thread(batcher.close)
        return waits, cost

    (idle, ahead), cost = asyncio.run(run())
    assert idle == 0.0  # nothing queued, nothing reading: an idle batcher never refuses
    assert ahead == pytest.approx(11 * cost)
