"""JSON request bodies with unique keys: ``{"k": 1000, "k": 2}`` is refused, not read as ``k=2``.

RFC 8259 only says object names SHOULD be unique, and parsers disagree on duplicates (Python's json and
pydantic keep the last, others the first or refuse): a gateway that reads the first ``k`` would check
one request while this service ran another. I-JSON (RFC 7493) makes unique names a MUST; so does this
service: a duplicated key at any depth is a 422 ``invalid_request`` whose ``field`` is the key's path
(``k``, ``a.b``, ``history.0.x``), before the body's model is validated.

The check is the parse itself: ``json.loads`` with an ``object_pairs_hook`` that builds each object
and compares its size with the number of pairs (one ``dict()`` per object, as the parse does anyway),
so the body is still parsed once. Routes get it from their route class (``UniqueKeysRoute`` as the
first base), which hands FastAPI a ``Request`` whose ``json()`` is that parse: the route's guard still
runs first, before any body is read (service/auth.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.errors import InvalidBody


class _Duplicate(Exception):
    """Raised by the hook; the path is worked out afterwards (the hook cannot know where it is)."""


class _Pairs(list):
    """An object as its list of pairs (to find the first duplicate and its path on the error path)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Duplicate
    return obj


def loads_unique(body: bytes | str) -> Any:
    """``json.loads`` that refuses an object with a duplicated key: ``InvalidBody`` naming its path.
    Syntax errors are ``json.JSONDecodeError`` as before (FastAPI answers them 422 ``json_invalid``)."""
    try:
        return json.loads(body, object_pairs_hook=_unique_object)
    except _Duplicate:
        path = _first_duplicate(json.loads(body, object_pairs_hook=_Pairs), "")
        assert path is not None  # the first parse found one
        raise InvalidBody(path, "duplicated key: each key of a JSON object may appear only once") from None


def _first_duplicate(value: Any, prefix: str) -> str | None:
    """The path of the first repeated key, in document order (depth first)."""
    if isinstance(value, _Pairs):
        seen: set[str] = set()
        for key, item in value:
            path = f"{prefix}.{key}" if prefix else key
            if key in seen:
                return path
            seen.add(key)
            if (found := _first_duplicate(item, path)) is not None:
                return found
    elif isinstance(value, list):
        for n, item in enumerate(value):
            if (found := _first_duplicate(item, f"{prefix}.{n}" if prefix else str(n))) is not None:
                return found
    return None


class UniqueKeysRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_unique(await self.body())
        return self._json


class UniqueKeysRoute(APIRoute):
    """Mix in first (``class R(UniqueKeysRoute, DataPlaneRoute)``): the route's JSON body is parsed by
    ``loads_unique``. The request is re-wrapped before the guard runs; nothing is read until FastAPI
    reads the body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def unique_keys(request: Request) -> Response:
            return await handler(UniqueKeysRequest(request.scope, request.receive, request._send))

        return unique_keys
