"""Dynamic micro-batching: many concurrent requests -> one forward pass + one vectorized search.

Requests go into a bounded queue (full -> the caller gets ``QueueFull`` -> 429). One worker thread
takes the first waiting job, then whatever else arrives within ``max_wait_ms`` up to
``max_batch_size``, runs the batch and hands each result back to the event loop through
``call_soon_threadsafe`` on the job's asyncio future, so the loop itself never runs or waits on
inference. ONNX Runtime and numpy release the GIL during the heavy parts, so the loop keeps serving
I/O meanwhile.

Every job carries the ``Engine`` it was admitted with: a reload swaps the engine for new requests,
while jobs already queued finish on the one their request started with.

Admission: a job that cannot be answered before its deadline is refused at once (``Overloaded`` ->
429 + Retry-After) instead of queueing until the deadline passes (504, after the client waited the
full deadline for nothing). The expected wait is the work ahead of it (queued jobs + the batch in
progress) times the measured cost of one job (an exponential average over recent batches), plus the
measured delay of the event loop in handing results back (a loop busy with a burst's HTTP work
delivers late), so under a burst the queue holds what the service can answer in time. This is the last
of the request's admission checks (service/overload.py has all of them); a job with no time left is a
``TimeoutError`` (504), never an overload with a negative time left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.engine import Engine, ModelScores, limit_search_threads

log = logging.getLogger("fair.batcher")


class QueueFull(RuntimeError):
    """The inference queue is at capacity: shed load (429) rather than queue unboundedly."""


class Overloaded(QueueFull):
    """The work already queued would not finish before this request's deadline."""


class BatcherClosed(RuntimeError):
    """The service is shutting down and takes no new inference work."""


@dataclass
class Job:
    engine: Engine
    user_id: str
    history: np.ndarray  # int64 item indices, oldest first, non-empty
    exclude: np.ndarray | None
    k: int
    beam_size: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    # filled in by the worker
    queue_wait: float = 0.0
    inference: float = 0.0
    beam_search: float = 0.0
    batch_size: int = 0


@dataclass
class JobResult:
    items: np.ndarray  # [<= k] int64 item indices, best first
    scores: np.ndarray  # [<= k] float32


_STOP = object()

# Weight of the newest batch in the per-job cost average: ~the last 10 batches count.
COST_EWMA_WEIGHT = 0.1
# Time constant (s) over which a measured event-loop hand-over delay stops counting.
LAG_DECAY_S = 0.5


class Batcher:
    def __init__(self, max_batch_size: int = 32, max_wait_ms: float = 1.0, queue_size: int = 512):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        # seconds of worker time per job, measured on batches; None until the first batch ran
        self.job_cost_s: float | None = None
        # how long a finished batch waits for the event loop to hand its results over (busy loop)
        self.delivery_lag_s = 0.0
        self._lag_at = time.perf_counter()  # when delivery_lag_s was measured (it decays with time)
        self._in_progress = 0  # jobs of the batch the worker is running now
        self._thread = threading.Thread(target=self._run, name="fair-inference", daemon=True)
        self._thread.start()

    # ---- event-loop side ----
    def expected_wait_s(self, extra_ahead: int = 0) -> float:
        """How long a job submitted now would wait before its batch is done; ``extra_ahead``: jobs not
        queued yet that will be before it (requests still reading their history from Redis). 0 before
        any measurement and whenever nothing is ahead of it: an idle service never refuses (a stale,
        high estimate must not lock it into refusing everything, which would also stop it from
        measuring anew)."""
        ahead = self._queue.qsize() + self._in_progress + extra_ahead
        if self.job_cost_s is None or ahead == 0:
            return 0.0
        lag = self.delivery_lag_s * math.exp(-(time.perf_counter() - self._lag_at) / LAG_DECAY_S)
        return (ahead + 1) * self.job_cost_s + lag

    def submit(self, job: Job, time_left_s: float | None = None) -> asyncio.Future:
        """Enqueue without blocking; raises ``QueueFull`` (queue at capacity), ``Overloaded`` (the
        expected wait exceeds ``time_left_s``, the request's remaining deadline), ``TimeoutError``
        (nothing is left of it: a timeout, not an overload, whatever the queue) or ``BatcherClosed``."""
        if self._closed:
            raise BatcherClosed("service is shutting down")
        if time_left_s is not None:
            if time_left_s <= 0:
                raise TimeoutError("the request deadline passed before its job was queued")
            wait = self.expected_wait_s()
            if wait > time_left_s:
                raise Overloaded(
                    f"overloaded: expected wait {wait * 1000:.0f} ms exceeds the {time_left_s * 1000:.0f} ms "
                    "left of the request deadline"
                )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"inference queue full ({self._queue.maxsize} waiting)") from None
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return job.future

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking jobs, finish every job already queued, then stop the worker (blocking)."""
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.error("inference queue did not drain within %.0fs", timeout_s)
            return
        self._thread.join(timeout_s)

    # ---- worker side ----
    def _next_batch(self) -> tuple[list[Job], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, stop = [first], False
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                stop = True
                break
            batch.append(job)
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return batch, stop

    def _run(self) -> None:
        limit_search_threads()  # OpenMP limits are per thread: set them in the thread that searches
        while True:
            batch, stop = self._next_batch()
            if batch:
                try:
                    self._process(batch)
                except BaseException as exc:  # never let the worker die: fail the batch instead
                    log.exception("inference batch failed")
                    for job in batch:
                        _deliver(job, exc=exc)
            # drop the answered jobs before waiting for the next ones: each holds the engine it was
            # admitted with, and a replaced engine (GBs at catalog scale) must be freed even when no
            # request follows a reload (service/memory.py waits for exactly that)
            del batch
            if stop:
                return

    def _process(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        live = [j for j in batch if not j.future.cancelled()]  # timed-out requests: skip the work
        if not live:
            return
        metrics.BATCH_SIZE.observe(len(live))
        by_engine: dict[int, list[Job]] = defaultdict(list)
        for job in live:
            job.queue_wait = start - job.enqueued
            job.batch_size = len(live)
            by_engine[id(job.engine)].append(job)
        self._in_progress = len(live)
        try:
            for jobs in by_engine.values():
                self._run_engine(jobs[0].engine, jobs)
        finally:
            self._in_progress = 0
        self._record_cost((time.perf_counter() - start) / len(live))

    def _record_delivery_lag(self, lag_s: float) -> None:
        """Runs on the event loop. The newest measurement counts; it fades with time (LAG_DECAY_S), so
        a burst's lag stops counting soon after the burst, even if no batch runs to measure it again."""
        self.delivery_lag_s, self._lag_at = lag_s, time.perf_counter()

    def _record_cost(self, per_job_s: float) -> None:
        """Update the per-job cost average. A quiet service runs small batches, which cost more per
        job than full ones: the estimate errs high while nothing waits (harmless, waits are short) and
        settles on the full-batch cost within ~10 batches of a burst, the regime where it matters."""
        if self.job_cost_s is None:
            self.job_cost_s = per_job_s
        else:
            self.job_cost_s += COST_EWMA_WEIGHT * (per_job_s - self.job_cost_s)

    def _run_engine(self, engine: Engine, jobs: list[Job]) -> None:
        try:
            t0 = time.perf_counter()
            scores = engine.forward([j.history for j in jobs])
            t1 = time.perf_counter()
            metrics.stage("inference").observe(t1 - t0)
            # The beam width depends on k, so requests are searched in (beam, k) groups; nearly all
            # traffic uses the defaults, i.e. one group.
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, job in enumerate(jobs):
                groups[(job.beam_size, job.k)].append(i)
            results: dict[int, JobResult | Exception] = {}
            for (beam, k), rows in groups.items():
                results.update(_search_group(engine, scores, jobs, rows, beam, k))
            t2 = time.perf_counter()
            metrics.stage("beam_search").observe(t2 - t1)
        except Exception as exc:
            log.exception("inference failed for a batch of %d", len(jobs))
            for job in jobs:
                _deliver(job, exc=exc)
            return
        by_loop: dict[int, list[tuple[Job, JobResult]]] = defaultdict(list)
        for i, job in enumerate(jobs):
            result = results[i]
            job.inference, job.beam_search = t1 - t0, t2 - t1
            if isinstance(result, Exception):
                _deliver(job, exc=result)
            else:
                by_loop[id(job.loop)].append((job, result))
        for done in by_loop.values():
            _deliver_all(done, self._record_delivery_lag)


def _search_group(
    engine: Engine, model_scores: ModelScores, jobs: list[Job], rows: list[int], beam: int, k: int
) -> dict[int, JobResult | Exception]:
    """The search for the batch rows of one (beam, k) group: a result, or the error, per row.

    The search refuses a whole batch when one user's scores are unusable (NaN from a broken
    export or an input the model cannot handle): then each row is searched alone, so only that
    user's request fails and the others in the batch are still answered.
    """
    try:
        items, scores = engine.search(model_scores[rows], beam, k, [jobs[i].exclude for i in rows])
    except ValueError as exc:
        if len(rows) == 1:
            log.error("search failed for user %r: %s", jobs[rows[0]].user_id, exc)
            return {rows[0]: exc}
        out: dict[int, JobResult | Exception] = {}
        for i in rows:
            out.update(_search_group(engine, model_scores, jobs, [i], beam, k))
        return out
    out = {}
    for r, i in enumerate(rows):
        keep = items[r] >= 0
        out[i] = JobResult(items=items[r][keep], scores=scores[r][keep])
    return out


def _deliver(job: Job, result: JobResult | None = None, exc: BaseException | None = None) -> None:
    def _set() -> None:
        if job.future.done():  # cancelled by a timeout meanwhile
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    # RuntimeError: the loop is closed (process exiting), so nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(_set)


def _deliver_all(done: list[tuple[Job, JobResult]], record_lag: Callable[[float], None]) -> None:
    """Resolve a batch's futures (all on one loop) with one ``call_soon_threadsafe``: each call
    wakes the event loop through its self-pipe, which per request cost more than setting the result.
    ``record_lag`` gets how long the loop took to run the hand-over (it is busy under a burst)."""
    scheduled = time.perf_counter()

    def _set_all() -> None:
        record_lag(time.perf_counter() - scheduled)
        for job, result in done:
            if not job.future.done():  # cancelled by a timeout meanwhile
                job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        done[0][0].loop.call_soon_threadsafe(_set_all)
