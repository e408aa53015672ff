"""Admission control of the inference routes: answer a request only when it can be answered within its
deadline, and refuse it (429) at once otherwise, before it costs or waits for anything.

A request meets these waits, in order, and the estimate counts each of them:

1. the event loop: a request's bytes wait until the loop has run everything queued before them (under
   a burst, parsing and answering thousands of others). ``LoopLag`` measures it: a timer due every
   ``LAG_INTERVAL_S``; how late it runs is how long anything queued now waits, and while it is overdue
   the loop is at least that far behind. The request's arrival is its first ASGI call minus that lag
   (uvicorn parses a request and starts its task without telling the application when: the first
   ASGI call is the earliest moment the application sees, and the lag is how long before it the
   bytes can have been waiting);
2. the Redis connection slots, when the history is read from Redis: the requests waiting for a slot
   and those holding one, in rounds of ``slots`` reads at the measured time per read
   (``HistoryStore.expected_wait_s``);
3. the batcher: the jobs queued and in progress, plus the requests still reading Redis (they reach the
   queue first), times the measured cost per job, plus the event loop's measured delay in handing
   results back (``Batcher.expected_wait_s``);
4. everything the three do not see (the event loop's own work per admitted request: parsing,
   validation, JSON; CPU shared with other processes): a cap on the requests admitted and not yet
   answered, ``capacity = measured completions per busy second x deadline x FAIR_ADMISSION_SHARE``
   (Little's law: that many requests drain within that share of the deadline at the measured pace).

The check runs three times, each before the wait it guards: in the middleware before routing and before
the body is read (the cap, the loop and the batcher: the cheapest refusal, a few bytes written by the
middleware itself), after the body is parsed and before Redis is read (+ Redis), and when the job is
queued (the batcher, with what is left then). Time left is counted from the arrival; a request whose
deadline has already passed when it reaches one of these points gets 504 at once, so a 429 always names
a positive time left.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from service import metrics

# The loop-lag timer's period: the lag is known to within this, and an idle loop is woken this often
# (only while requests come: the timer stops after ``LAG_IDLE_STOP_S`` without one).
LAG_INTERVAL_S = 0.005
LAG_IDLE_STOP_S = 1.0
# A measured lag stops counting with this time constant: a burst's lag fades soon after the burst.
LAG_DECAY_S = 0.1

# The completion rate is measured over windows of at least this much busy time and this many answers.
RATE_WINDOW_S = 0.1
RATE_WINDOW_MIN = 8
# Weight of the newest window in the rate's running average.
RATE_EWMA_WEIGHT = 0.3


class LoopLag:
    """How far behind the event loop is: a timer due every ``LAG_INTERVAL_S``, timed when it runs."""

    def __init__(self, interval_s: float = LAG_INTERVAL_S):
        self.interval_s = interval_s
        self.last_lag_s = 0.0
        self._measured_at = 0.0
        self._due: float | None = None  # perf_counter time the pending timer is due; None: stopped
        self._last_use = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def lag_s(self, now: float) -> float:
        """The loop's lag now: how overdue the pending timer is (the loop has not got to it yet), or
        the last measured lag, faded with its age, whichever is larger. Keeps the timer running."""
        self._last_use = now
        if self._due is None:
            self._start(now)
            return 0.0
        overdue = now - self._due
        faded = self.last_lag_s * math.exp(-(now - self._measured_at) / LAG_DECAY_S)
        return max(overdue, faded, 0.0)

    def _start(self, now: float) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): nothing to measure
            return
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval_s
        self._loop.call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        assert self._due is not None
        self.last_lag_s, self._measured_at = max(0.0, now - self._due), now
        metrics.LOOP_LAG.observe(self.last_lag_s)
        if now - self._last_use > LAG_IDLE_STOP_S:  # no request for a while: stop waking the loop
            self._due = None
            return
        self._schedule(now)


class Drain:
    """Admitted requests not yet answered, and the measured pace at which they are answered.

    The pace is results served per second of busy time (time with at least one request in flight), over
    windows of ``RATE_WINDOW_S``: under load it is the service's throughput; lightly loaded it is
    lower (one request at a time shows 1 / latency), which errs on the safe side and rises with load.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.rate: float | None = None  # answers per busy second; None until measured
        self._busy_s = 0.0
        self._answered = 0
        self._last = time.perf_counter()

    def _advance(self, now: float) -> None:
        if self.in_flight > 0:
            self._busy_s += now - self._last
        self._last = now

    def admit(self, now: float) -> None:
        self._advance(now)
        self.in_flight += 1
        metrics.IN_FLIGHT.set(self.in_flight)

    def finish(self, now: float, served: bool) -> bool:
        """One request done; ``served``: answered with a result (a request refused or failed on its way
        took less than a full one: counting it would overstate the pace, and admit more than can be
        served). True when this closed a window (``rate`` changed)."""
        self._advance(now)
        self.in_flight -= 1
        metrics.IN_FLIGHT.set(self.in_flight)
        if not served:
            return False
        self._answered += 1
        if self._busy_s >= RATE_WINDOW_S and self._answered >= RATE_WINDOW_MIN:
            sample = self._answered / self._busy_s
            self.rate = sample if self.rate is None else self.rate + RATE_EWMA_WEIGHT * (sample - self.rate)
            self._busy_s, self._answered = 0.0, 0
            return True
        return False


@dataclass
class Ticket:
    """One admitted request: when it arrived (perf_counter seconds) and its deadline."""

    arrival: float
    deadline_s: float
    admission: Admission

    def left_s(self, now: float | None = None) -> float:
        """Seconds left of the deadline (negative once it has passed)."""
        return self.arrival + self.deadline_s - (time.perf_counter() if now is None else now)


class Admission:
    """The admission decisions of one app (one worker process); see the module docstring."""

    def __init__(self, state, deadline_s: float, share: float, max_in_flight: int, min_in_flight: int):
        self.state = state  # service.state.AppState: the batcher and the store, once the lifespan started
        self.deadline_s, self.share = deadline_s, share
        self.max_in_flight, self.min_in_flight = max_in_flight, min_in_flight
        self.lag = LoopLag()
        self.drain = Drain()

    def capacity(self) -> int | None:
        """Requests that may be admitted and not yet answered (FAIR_MAX_IN_FLIGHT when set); None
        (no cap: the other checks and the queue bound still apply) until the pace has been measured."""
        if self.max_in_flight > 0:
            return self.max_in_flight
        rate = self.drain.rate
        if rate is None:
            return None
        return max(self.min_in_flight, int(rate * self.deadline_s * self.share))

    def arrive(self, stamp: float) -> tuple[Ticket | None, str | None]:
        """An inference request first seen (its first ASGI call) at ``stamp`` (perf_counter): a ticket,
        or why it is refused (429). Its arrival is the stamp minus the event loop's lag: how long its
        bytes can have waited for the loop before that call."""
        now = time.perf_counter()
        lag = self.lag.lag_s(now)
        ticket = Ticket(stamp - lag, self.deadline_s, self)
        in_flight = self.drain.in_flight
        capacity = self.capacity()  # >= min_in_flight >= 1: an idle service is never refused here
        if capacity is not None and in_flight >= capacity:
            pace = f"{self.drain.rate:.0f} answers/s" if self.drain.rate else "FAIR_QUEUE_SIZE"
            return None, (
                f"overloaded: {in_flight} requests in flight, the most that can be answered within "
                f"{self.share:g} of the {self.deadline_s * 1000:g} ms deadline at the measured pace ({pace})"
            )
        # each part is 0 when nothing is ahead (the batcher's estimate is 0 with an empty queue, the lag
        # is measured, not remembered), so neither can lock an idle service shut
        batcher = self.state.batcher
        inference = batcher.expected_wait_s() if batcher is not None else 0.0
        if lag + inference > self.deadline_s:
            return None, (
                f"overloaded: expected answer in {(lag + inference) * 1000:.0f} ms (event loop "
                f"{lag * 1000:.0f} ms behind, inference {inference * 1000:.0f} ms) exceeds the "
                f"{self.deadline_s * 1000:g} ms deadline"
            )
        self.drain.admit(now)
        return ticket, None

    def finish(self, ticket: Ticket, status: int) -> None:
        """The admitted request's response is done (``status``: its HTTP status)."""
        if self.drain.finish(time.perf_counter(), served=200 <= status < 300):
            capacity = self.capacity()
            metrics.ADMISSION_CAPACITY.set(capacity if capacity is not None else 0)

    def expected_wait_s(self, reads_redis: bool) -> tuple[float, str]:
        """The wait a request meets from now until its batch is done, with its parts in words. One that
        reads its history from Redis first waits for a connection slot and its read, and the calls
        ahead of it there reach the batcher before it does (writes, too, are counted: they hold slots)."""
        store, batcher = self.state.store, self.state.batcher
        redis_s, ahead = 0.0, 0
        if reads_redis and store is not None:
            redis_s, ahead = store.expected_wait_s(), store.in_use
        inference_s = batcher.expected_wait_s(extra_ahead=ahead) if batcher is not None else 0.0
        parts = f"inference {inference_s * 1000:.0f} ms"
        if reads_redis:
            parts = f"redis {redis_s * 1000:.0f} ms with {ahead} calls ahead, {parts}"
        return redis_s + inference_s, parts
