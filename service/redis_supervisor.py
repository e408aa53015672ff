"""Supervision of the embedded redis-server: notice that it died, log it, restart it, or say we can't.

The service starts the embedded server itself (``EmbeddedRedis``), so nobody else will notice when it
dies: without supervision every request answers 503 until a human restarts the service, the dead
child stays a zombie, and ``/healthz`` keeps saying the process is fine. ``RedisSupervisor`` is a
daemon thread that checks the child every ``check_s`` (``Popen.poll``, which also reaps it), logs an
ERROR, and restarts it on the same data directory (the AOF replays every acknowledged write but at
most the last second's) with exponential backoff. After ``max_attempts`` failed starts in a row, or
``max_attempts`` restarts within ``CRASH_LOOP_WINDOW_S`` (a server that starts and dies again, e.g.
killed for memory after loading), it writes ``EmbeddedRedis.failed_marker``, logs CRITICAL, and
``/healthz`` of every worker answers 503, so an orchestrator restarts the whole service. It keeps
trying meanwhile: after failed starts, the first start that succeeds removes the marker; after a crash
loop (each restart succeeded), the marker is removed once the server has stayed up for the window since
its last restart (without an orchestrator, nothing else would ever clear it: /healthz stayed 503 for
good while Redis was back). Only state changes are logged (down, restarted, given up, recovered),
never one line per check.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from service.embedded_redis import EmbeddedRedis

log = logging.getLogger("fair.redis")

FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
CRASH_LOOP_WINDOW_S = 60.0


class RedisSupervisor:
    def __init__(
        self,
        embedded: EmbeddedRedis,
        max_attempts: int = 5,
        check_s: float = 0.5,
        crash_loop_window_s: float = CRASH_LOOP_WINDOW_S,
    ):
        self.embedded, self.max_attempts, self.check_s = embedded, max_attempts, check_s
        self.crash_loop_window_s = crash_loop_window_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fair-redis-supervisor", daemon=True)
        self.restarts = 0  # successful restarts so far (tests and logs read it)
        self._recent: collections.deque[float] = collections.deque()  # times of recent restarts
        self._in_crash_loop = False  # the marker is ours, written for a crash loop

    def start(self) -> RedisSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop supervising (before the service stops the server itself, so that is not a 'crash')."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _alive(self) -> bool:
        proc = self.embedded.proc
        if proc is None:  # we reused a server someone else started: all we can do is ask it
            return self.embedded.answers()
        return proc.poll() is None  # poll() also reaps a dead child (no zombie)

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            if self._alive():
                if self._in_crash_loop:
                    self._end_crash_loop_if_stable()
                continue
            proc = self.embedded.proc
            code = proc.returncode if proc is not None else None
            log.error(
                "embedded redis-server %s exited (code %s); restarting it on %s",
                f"pid {proc.pid}" if proc is not None else "(not ours)",
                code,
                self.embedded.data_dir,
            )
            self._restart()

    def _restart(self) -> None:
        down_at, backoff, failures = time.monotonic(), FIRST_BACKOFF_S, 0
        while not self._stop.is_set():
            self.embedded.proc = None  # the dead one: start() must not try to stop or reuse it
            try:
                self.embedded.start()
            except Exception as exc:  # any failure to start is retried; the reason is logged once per try
                failures += 1
                log.error("restarting embedded redis-server failed (attempt %d): %s", failures, exc)
                if failures == self.max_attempts:
                    self.embedded.mark_failed(f"{failures} restarts failed; last: {exc}")
                    log.critical(
                        "embedded redis-server could not be restarted %d times; /healthz now answers 503 "
                        "so an orchestrator restarts the service (still retrying every %.0f s)",
                        failures,
                        MAX_BACKOFF_S,
                    )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self.restarts += 1
            now = time.monotonic()
            log.warning(
                "embedded redis-server restarted (pid %s) after %.1f s down",
                self.embedded.proc.pid if self.embedded.proc is not None else "?",
                now - down_at,
            )
            self._recent.append(now)
            window = self.crash_loop_window_s
            while self._recent and now - self._recent[0] > window:
                self._recent.popleft()
            self._in_crash_loop = False  # start() removed the marker
            if len(self._recent) >= self.max_attempts:  # it starts, then dies again: a crash loop
                self.embedded.mark_failed(f"{len(self._recent)} restarts within {window:.0f} s")
                self._in_crash_loop = True
                log.critical(
                    "embedded redis-server crash loop (%d restarts within %.0f s); /healthz now answers 503 "
                    "so an orchestrator restarts the service (it answers 200 again once the server has "
                    "stayed up for %.0f s)",
                    len(self._recent),
                    window,
                    window,
                )
            return

    def _end_crash_loop_if_stable(self) -> None:
        """The server has stayed up for the crash-loop window since its last restart: the loop is over."""
        up_s = time.monotonic() - self._recent[-1]
        if up_s < self.crash_loop_window_s:
            return
        self._in_crash_loop = False
        self._recent.clear()
        self.embedded.clear_failed()
        log.warning(
            "embedded redis-server has stayed up for %.0f s since its last restart: crash loop over, "
            "/healthz answers 200 again",
            up_s,
        )
