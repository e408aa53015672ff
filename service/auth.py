"""Who may call which route: protection is a property of the route, not of its path.

Every route of the app is built by one of the route classes below (``APIRouter(route_class=...)``):

* ``DataPlaneRoute``: guarded by ``FAIR_API_TOKENS`` (open when none are configured: the local demo);
* ``AdminRoute``: guarded by ``FAIR_ADMIN_TOKEN`` (the admin router is not mounted when it is unset);
* ``PublicRoute``: deliberately open (probes, metrics, the public model summary).

A guarded route checks the token in its own handler, after routing and before the body is read, so a
route added under any path is as protected as its router's class says, and a plain ``APIRoute`` (no
decision taken) is refused by the test that walks every route (tests/service/test_service_routes.py).
``create_app`` declares the bearer scheme and the 401 in OpenAPI for every route whose guard is
enforced, so /docs shows exactly what is checked.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import SecretStr
from starlette.types import Scope

from service.errors import ServiceError


@dataclass(frozen=True)
class Guard:
    """A set of bearer tokens named after the setting that holds them."""

    setting: str  # FAIR_API_TOKENS | FAIR_ADMIN_TOKEN: named in the 401 and in OpenAPI
    scheme_name: str  # the OpenAPI security scheme

    def scheme(self) -> HTTPBearer:
        """The OpenAPI declaration only (``auto_error=False``): the check is ``check_scope``'s."""
        return HTTPBearer(
            auto_error=False, scheme_name=self.scheme_name, description=f"the token in {self.setting}"
        )


API_GUARD = Guard("FAIR_API_TOKENS", "apiToken")
ADMIN_GUARD = Guard("FAIR_ADMIN_TOKEN", "adminToken")


class PublicRoute(APIRoute):
    """A route that is open on purpose (listed as such by the route-walking test)."""

    guard: Guard | None = None


class GuardedRoute(APIRoute):
    """A route whose handler checks its guard's token first, before FastAPI reads or parses the body.

    This is the route class itself, not a dependency (FastAPI parses the body before dependencies run,
    so a stranger's junk body would be a 422 and a body announced and never sent a 408) and not a path
    list in a middleware (a route added under a new prefix would be open).
    """

    guard: Guard | None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guard = self.guard

        async def guarded(request: Request) -> Response:
            refused = request.app.state.fair.tokens.check_scope(guard, request.scope)
            if refused is None:
                refused = self.admit(request)
            if refused is not None:
                return refused.to_response()
            return await handler(request)

        return guarded

    def admit(self, request: Request) -> ServiceError | None:
        """What else a route class refuses before the body is read, once the caller is known."""
        return None


class DataPlaneRoute(GuardedRoute):
    guard = API_GUARD


class AdminRoute(GuardedRoute):
    guard = ADMIN_GUARD


def guard_of(route: object) -> Guard | None:
    """The guard of a route; ``None`` for public routes."""
    return getattr(route, "guard", None)


class TokenChecker:
    """Checks ``Authorization: Bearer <token>`` against the secrets of each guard.

    Exactly one Authorization header is accepted: with two, a gateway that reads the first and this
    service would disagree on who is calling, so a duplicate is refused outright. Tokens are compared
    in constant time, every token of the guard (no early exit), so timing does not tell which one nearly
    matched.
    """

    def __init__(self, api_tokens: Iterable[SecretStr], admin_token: SecretStr | None):
        self._secrets: dict[Guard, list[bytes]] = {
            API_GUARD: [t.get_secret_value().encode() for t in api_tokens],
            ADMIN_GUARD: [admin_token.get_secret_value().encode()] if admin_token is not None else [],
        }

    def enforced(self, guard: Guard) -> bool:
        """The data plane is open without tokens (the demo); the admin routes are never mounted then."""
        return bool(self._secrets[guard])

    def check_scope(self, guard: Guard | None, scope: Scope) -> ServiceError | None:
        """``None`` when the request may go on, else the 401 to answer (before any body is read)."""
        if guard is None or not self.enforced(guard):
            return None
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) > 1:
            return unauthorized(guard, "send exactly one Authorization header")
        scheme, _, token = (given[0] if given else b"").partition(b" ")
        if scheme.lower() != b"bearer" or not _token_matches(token.strip(), self._secrets[guard]):
            return unauthorized(guard)
        return None


def _token_matches(given: bytes, secrets: list[bytes]) -> bool:
    return bool(sum(hmac.compare_digest(given, t) for t in secrets))


def unauthorized(guard: Guard, why: str | None = None) -> ServiceError:
    message = f"this route needs Authorization: Bearer <a token of {guard.setting}>"
    return ServiceError(
        401, "unauthorized", f"{message}; {why}" if why else message,
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip
