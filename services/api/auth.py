"""Who may call what: bearer tokens, roles, the per-token rate limit, and the audit of what they did.

Auth is on while the settings' api_token (the bootstrap admin) is set: then every /v1 call needs a token,
reads included. A route asks `guard.allow(permission)` for what it needs (tokens.PERMISSIONS); `own`
names the narrower permission under which only the caller's own workflows exist. Refusals are 401
(unauthenticated, with WWW-Authenticate) or 403 (the role may not), and both are audited, as is every
call of a route that names an audit `action`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from switchboard import telemetry
from switchboard.protocol import new_id
from switchboard.tokens import ANONYMOUS, Principal

if TYPE_CHECKING:
    from services.api.service import Api

# A token's principal is read from the store at most this often by each api replica: a revoked token is
# refused everywhere within this long.
PRINCIPAL_TTL_S = 0.5
CACHE_MAX = 10_000

bearer = HTTPBearer(auto_error=False, description="A token from POST /v1/tokens, or the bootstrap SWITCHBOARD_API_TOKEN")


class Refused(Exception):
    """A 401, 403 or 429, in the API's error shape (app.py turns it into the response)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float):
        self.tokens, self.at = tokens, at


class Guard:
    def __init__(self, service: Api):
        self.service = service
        self.settings = service.settings
        self._principals: dict[str, tuple[float, Principal | None]] = {}
        self._buckets: dict[str, _Bucket] = {}

    @property
    def on(self) -> bool:
        return bool(self.settings.api_token)

    def allow(self, permission: str | None, *, own: str | None = None, action: str | None = None,
              query_token: bool = False):
        """A dependency: the caller's Principal if its role has `permission` (None: any valid token), or
        `own` (then request.state.only_own is True); with `action`, the call and its outcome are audited.
        With query_token, a request without the header may send the token as `?access_token=`: only for
        the event stream, because a browser's EventSource cannot send headers. (The query string is in
        no log, span or audit record: they all take the path alone.)"""

        async def dependency(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
            request.state.only_own = False
            if credentials is None and query_token and request.query_params.get("access_token"):
                credentials = HTTPAuthorizationCredentials(scheme="Bearer",
                                                           credentials=request.query_params["access_token"])
            principal = await self._authenticate(request, credentials, action or permission or "whoami")
            if permission is not None and not principal.may(permission):
                if own and principal.may(own):
                    request.state.only_own = True
                else:
                    await self.record(request, principal, action or permission, "forbidden")
                    raise Refused(403, "forbidden", f"the {principal.role.value} role may not do this ({permission})")
            self._spend(principal)
            if action is None:
                yield principal
                return
            outcome = "ok"
            try:
                yield principal
            except Exception as exc:
                outcome = getattr(exc, "code", None) or "error"
                raise
            finally:
                await self.record(request, principal, action, outcome)

        return dependency

    async def _authenticate(self, request: Request, credentials, action: str) -> Principal:
        if not self.on:
            return ANONYMOUS
        principal = None
        if credentials is not None and credentials.scheme.lower() == "bearer":
            principal = await self._principal(credentials.credentials)
        if principal is None:
            await self.record(request, None, action, "unauthenticated")
            raise Refused(401, "unauthorized", "this call needs 'Authorization: Bearer <token>' with a valid token",
                          {"WWW-Authenticate": 'Bearer realm="switchboard"'})
        return principal

    async def _principal(self, token: str) -> Principal | None:
        now = time.monotonic()
        cached = self._principals.get(token)
        if cached and now - cached[0] < PRINCIPAL_TTL_S:
            return cached[1]
        principal = await self.service.tokens.authenticate(token)
        if len(self._principals) >= CACHE_MAX:
            self._principals.clear()
        self._principals[token] = (now, principal)
        return principal

    def _spend(self, principal: Principal) -> None:
        """The per-token rate limit (a token bucket in each api replica)."""
        rate, burst = self.settings.api_rate_per_s, self.settings.api_rate_burst
        if principal.id is None or rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(principal.id)
        if bucket is None:
            if len(self._buckets) >= CACHE_MAX:
                self._buckets.clear()
            bucket = self._buckets[principal.id] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1:
            retry = math.ceil((1 - bucket.tokens) / rate)
            raise Refused(429, "rate_limited", f"over {rate:g} requests a second for this token",
                          {"Retry-After": str(retry)})
        bucket.tokens -= 1

    async def record(self, request: Request, principal: Principal | None, action: str, outcome: str) -> None:
        traceparent = telemetry.traceparent()
        request_id = request.headers.get("x-request-id", "")[:128] or new_id()
        await self.service.audit.append(
            actor={"id": principal.id if principal else None, "name": principal.name if principal else None},
            role=principal.role.value if principal else None, action=action,
            target=dict(request.path_params) or request.url.path, outcome=outcome, request_id=request_id,
            trace_id=traceparent.split("-")[1] if traceparent else None)
