"""POST /recommend's work: the history (given, or read from Redis), the known items, the batcher
(forward pass + search) or the popular fallback, and the answer written as JSON text.

The route (service/api/recommend.py) only hands the validated body and the app state in.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.admission import current_ticket
from service.batcher import BatcherClosed, Job, Overloaded, QueueFull
from service.engine import Engine
from service.errors import ServiceError, overloaded, unavailable
from service.overload import Ticket
from service.redis_calls import redis_call
from service.schemas import RecommendRequest
from service.state import AppState

_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


@dataclass
class Answer:
    """The response body (the JSON of ``RecommendResponse``) and the stage times for Server-Timing."""

    content: bytes
    timing: dict[str, float] = field(default_factory=dict)

    def server_timing(self) -> str:
        return ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in self.timing.items())


async def recommend(state: AppState, body: RecommendRequest) -> Answer:
    """The answer within the request deadline, counted from the request's arrival (the admission
    ticket, service/admission.py): a deadline already passed is a 504 at once, and a request that
    cannot make it is refused (429) before it waits for Redis or the batcher."""
    t_start = time.perf_counter()
    engine = state.serving(reject_reason="no_model")
    settings = state.settings
    ticket = current_ticket()
    deadline_at = (
        (ticket.arrival + ticket.deadline_s) if ticket else t_start + settings.request_timeout_ms / 1e3
    )
    reads_redis = body.history is None
    _admit(ticket, deadline_at - t_start, reads_redis)
    timing: dict[str, float] = {}
    k = body.k or settings.default_k
    try:
        async with asyncio.timeout(deadline_at - t_start):
            if body.history is not None:
                raw = body.history
            else:
                assert state.store is not None, "lifespan not started"
                t0 = time.perf_counter()
                raw = await redis_call(state.store.get(body.user_id), None)  # the deadline bounds it
                timing["redis"] = time.perf_counter() - t0
                metrics.stage("redis").observe(timing["redis"])
            index = engine.item_index
            known = [index[i] for i in raw if i in index]
            if len(known) < len(raw):
                metrics.UNKNOWN_ITEMS.inc(len(raw) - len(known))
            if not known:
                reason = "unknown_user" if not raw else "no_known_items"
                metrics.FALLBACK.labels(reason=reason).inc()
                items = items_json(engine, engine.bundle.popular[:k], None)  # nothing known to exclude
                fallback = "popular"
            else:
                exclude = np.unique(np.asarray(known, dtype=np.int64)) if body.exclude_seen else None
                job = Job(
                    engine=engine,
                    user_id=body.user_id,
                    history=np.asarray(known, dtype=np.int64),
                    exclude=exclude,
                    k=k,
                    beam_size=body.beam_size or settings.default_beam_size,
                    future=asyncio.get_running_loop().create_future(),
                    loop=asyncio.get_running_loop(),
                )
                result = await _infer(state, job, deadline_at - time.perf_counter())
                metrics.stage("queue_wait").observe(job.queue_wait)
                timing.update(queue_wait=job.queue_wait, inference=job.inference, beam_search=job.beam_search)
                items = items_json(engine, result.items, result.scores)
                fallback = None
    except TimeoutError as exc:
        raise ServiceError(
            504, "timeout", f"no answer within {settings.request_timeout_ms:g} ms", reject_reason="timeout"
        ) from exc
    timing["total"] = time.perf_counter() - t_start
    # The same JSON that ``RecommendResponse`` would give, written directly: FastAPI's response-model
    # validation + serialisation cost more per request than the model itself.
    content = (
        f'{{"user_id":{_json(body.user_id)},"model_version":{engine.version},'
        f'"items":[{items}],"fallback":{_json(fallback)}}}'
    ).encode()
    return Answer(content, timing)


def _admit(ticket: Ticket | None, left_s: float, reads_redis: bool) -> None:
    """Before the first wait: 504 when nothing is left of the deadline (the request waited for the event
    loop that long: a timeout, not an overload), 429 when the waits ahead would not fit into what is."""
    if left_s <= 0:
        raise ServiceError(
            504, "timeout", f"the request deadline passed {-left_s * 1000:.0f} ms before the request could "
            "be handled (it waited for its body, or for the event loop)", reject_reason="timeout",
        )  # fmt: skip
    if ticket is None:
        return
    wait_s, parts = ticket.admission.expected_wait_s(reads_redis)
    if wait_s > left_s:
        raise overloaded(
            "overloaded",
            f"overloaded: expected wait {wait_s * 1000:.0f} ms ({parts}) exceeds the {left_s * 1000:.0f} ms "
            "left of the request deadline",
        )


async def _infer(state: AppState, job: Job, time_left_s: float):
    assert state.batcher is not None, "lifespan not started"
    try:
        return await state.batcher.submit(job, time_left_s)
    except Overloaded as exc:
        raise overloaded("overloaded", str(exc)) from exc
    except QueueFull as exc:
        raise overloaded("queue_full", str(exc)) from exc
    except BatcherClosed as exc:
        raise unavailable("shutting_down", str(exc)) from exc


def items_json(engine: Engine, items: np.ndarray, scores: np.ndarray | None) -> str:
    """The ``items`` array of a ``RecommendResponse`` as JSON text, without the brackets.

    Each item's id and semantic ID are encoded once per engine (``Engine.item_json``); only the score
    is formatted per request (``repr`` of the float, as pydantic writes it).
    """
    parts = engine.item_json
    if scores is None:
        score_texts = ["null"] * len(items)
    else:  # non-finite -> null, as pydantic writes it
        score_texts = [_json(s) if math.isfinite(s) else "null" for s in scores.tolist()]
    return ",".join(parts(int(i), sc) for i, sc in zip(items.tolist(), score_texts, strict=True))
