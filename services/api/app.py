"""REST API v1. Every error is JSON: {"error": {"code": str, "message": str, "details"?: [...]}}."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from switchboard import stream, telemetry
from switchboard.protocol import Envelope, InvalidSpec, MessageType, TaskSpec, WorkflowSpec, validate_workflow
from switchboard.codec import CodecError
from switchboard.control import message as control_message
from switchboard.telemetry import HttpRequest
from switchboard.telemetry.metrics import exposition
from switchboard.tokens import PERMISSIONS, Principal, Role
from switchboard.workflows import (TERMINAL_WORKFLOW, IdempotencyConflict, InvalidAnswer, NotFound, NotReplayable,
                                  NotWaiting)

from services.api.auth import Guard, Refused
from services.api.console import mount_console
from services.api.events import EventStream
from services.api.limits import add_routes as add_limits
from services.api.schedules import add_routes as add_schedules
from services.api.workflow_events import add_routes as add_workflow_events

if TYPE_CHECKING:
    from services.api.service import Api

log = logging.getLogger(__name__)

MAX_WAIT_S = 300.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


# A body over the limit is still read, up to this much, before the 413 is sent: a client that sends its
# whole body before it reads the answer (Python's urllib) would otherwise find the connection reset.
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_S = 30.0


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, size: int, limit: int):
        super().__init__(413, f"request body is {size} bytes or more, the limit is {limit}")


async def _drain(receive, budget: int) -> None:
    try:
        async with asyncio.timeout(DRAIN_S):
            while budget > 0:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    return
                budget -= len(message.get("body", b""))
    except TimeoutError:
        pass  # a client this slow gets the 413 and a closed connection


class BodyLimit:
    """Refuses a body over the limit with a 413: a declared one before the app sees it, a chunked one as
    soon as it grows past the limit. Plain ASGI, because Starlette's BaseHTTPMiddleware costs a task group
    and a stream per request (about a tenth of a small request's CPU)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit():  # the server holds the body to its declared length
            if int(length) > self.limit:
                await _drain(receive, DRAIN_BYTES)
                response = _error(413, "body_too_large", f"request body is {int(length)} bytes, the limit is {self.limit}")
                return await response(scope, receive, send)
            return await self.app(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                await _drain(receive, DRAIN_BYTES - received)
                raise BodyTooLarge(received, self.limit)  # FastAPI passes an HTTPException through
            return message

        await self.app(scope, counted, send)


class Observed:
    """Every request through the telemetry seam: a SERVER span (joining a caller's traceparent) and the
    request-duration histogram, labelled by route template rather than path, so ids make no series."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k == b"traceparent"}
        request = HttpRequest(scope["method"], scope["path"], headers)

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                request.status = message["status"]
            await send(message)

        async def call() -> None:
            try:
                await self.app(scope, receive, sending)
            finally:
                request.route = getattr(scope.get("route"), "path", None) or "unmatched"

        await telemetry.serving(request, call)


# Kept short: it becomes part of a store key (FoundationDB keys are at most 10,000 bytes).
IdempotencyKey = Annotated[str | None, Header(max_length=256)]


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def _allowed(app: FastAPI, scope) -> list[str]:
    """The methods of a path, for a 405's Allow. Starlette names those of the first route that matches; a
    path has several routes, one per method. Where a literal path (/v1/dlq/replay) also matches a template
    (/v1/dlq/{dead_letter_id}), the literal one is the resource the client meant."""
    matching = [r for r in app.router.routes if isinstance(r, Route) and r.matches(scope)[0] != Match.NONE]
    fewest = min((len(r.param_convertors) for r in matching), default=0)
    return sorted({m for r in matching if len(r.param_convertors) == fewest for m in r.methods or ()})


def check_workflow(spec: WorkflowSpec, settings) -> None:
    """The rules a schema cannot say (ids, dependencies, sizes), as the API's error: 413 or 422."""
    try:
        validate_workflow(spec, max_payload_bytes=settings.max_payload_bytes,
                          max_tasks=settings.max_tasks_per_workflow)
    except InvalidSpec as exc:
        raise ApiError(413 if exc.code == "payload_too_large" else 422, exc.code, str(exc)) from exc


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    body: dict = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, for programs: e.g. workflow_not_found, body_too_large")
    message: str = Field(description="for people")
    details: Any = None


class ErrorBody(BaseModel):
    """The shape of every error the API answers."""

    error: ErrorDetail


_MEANINGS = {
    400: "The body is not valid JSON.",
    401: "No valid bearer token: send 'Authorization: Bearer <token>'.",
    403: "The token's role may not do this.",
    404: "No such workflow, task, dead letter or token (or, for a submitter, not one of its own).",
    409: "Conflict: the idempotency key was used for a different request, the dead letter cannot be replayed, "
         "or the task is not waiting for input.",
    413: "The body, or a task's payload, is over the limit.",
    422: "The request does not follow the schema, or the workflow breaks a rule (ids, dependencies, sizes).",
    429: "Over this token's request rate: retry after the Retry-After header's seconds.",
    503: "The store or the broker is unavailable: retry later.",
}


def _try(open_, value):
    try:
        return open_(value)
    except CodecError:
        return value


def answers(*statuses: int) -> dict:
    """The error answers of a route, for the OpenAPI document."""
    return {status: {"model": ErrorBody, "description": _MEANINGS[status]} for status in statuses}


class TaskSubmission(TaskSpec):
    """One task on its own: a workflow of one, so the same model as a workflow's task."""

    id: str = Field("task", min_length=1, max_length=128)


class TokenRequest(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=128, description="who or what holds it")
    role: Role
    expires_in_s: float | None = Field(None, gt=0, le=10 * 365 * 24 * 3600, strict=True,
                                       description="none: it lasts until revoked")


class ReplayRequest(BaseModel):
    model_config = {"extra": "forbid"}

    capability: str | None = None
    reason: str | None = Field(None, description="substring of the reason")
    workflow_id: str | None = None
    since: float | None = Field(None, strict=True, description="unix time")
    until: float | None = Field(None, strict=True, description="unix time")
    limit: int = Field(1000, ge=1, le=10_000, strict=True)
    rate_per_s: float = Field(10.0, gt=0, le=100, strict=True)


class ControlRequest(BaseModel):
    model_config = {"extra": "forbid"}

    capability: str | None = Field(None, min_length=1, max_length=128)


class AnswerRequest(BaseModel):
    model_config = {"extra": "forbid"}

    answer: Any = Field(description="JSON: what the question's schema asks for, if it has one")


class WorkflowBatch(BaseModel):
    workflows: list[WorkflowSpec] = Field(min_length=1, max_length=1000)


# Newer FastAPI traces requests by itself once a tracer provider is set; the api's telemetry goes through
# the seam (Observed) instead, so requests are not traced twice.
_NO_NATIVE_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                        if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


def create_app(service: Api) -> FastAPI:
    settings = service.settings
    app = FastAPI(title="Switchboard", version="1",
                  description="Submit tasks and DAG workflows; agents run them by capability and priority.",
                  responses=answers(503), **_NO_NATIVE_TELEMETRY)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused):
        response = _error(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "malformed_json", "the request body is not valid JSON")
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:]) or "request"
        return _error(422, "invalid_request", f"{where}: {first['msg']}", details)

    @app.exception_handler(ValidationError)
    async def _invalid_model(request: Request, exc: ValidationError):
        # A model built inside a handler: the request was wrong, not the server.
        return await _invalid(request, RequestValidationError(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        response = _error(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_allowed(app, request.scope))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(503, "unavailable", "the service could not complete the request; retry later")

    app.add_middleware(BodyLimit, limit=settings.max_payload_bytes * 4 + 64 * 1024)
    app.add_middleware(Observed)  # added last, so outermost: it also sees what BodyLimit refuses

    guard = Guard(service)
    allow = guard.allow

    def check(spec: WorkflowSpec) -> None:
        check_workflow(spec, settings)

    async def submit(specs: list[WorkflowSpec], key: str | None, who: Principal) -> tuple[list[str], list[str]]:
        """Stores the workflows; returns their ids and the ids of those that started at once."""
        for spec in specs:
            check(spec)
        try:
            ids, started, ready = await service.workflows.create(
                specs, key, owner=who.id, seal=service.codec.seal if service.codec.enabled else None)
        except IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", str(exc)) from exc
        # Stored is accepted: whatever cannot be sent now, the coordinator's intake sweep sends later.
        if waiting := [wf_id for wf_id in ids if wf_id not in started]:
            announce = Envelope(type=MessageType.EVENT, subject="workflow.submitted", source="api",
                                payload={"workflow_ids": waiting})
            try:
                await service.bus.publish(announce, service.bus.topology.coordinator)
            except Exception as exc:
                log.warning("could not announce workflows %s: %s", waiting, exc)
        try:  # also when none started: the follow-ups carry the new workflows' stream events
            await ready.publish(service.bus, service.routes)
            if started:
                await service.workflows.taken_in(started)
        except Exception as exc:
            log.warning("could not queue the tasks of workflows %s: %s", started, exc)
        return ids, started

    @app.post("/v1/workflows", status_code=202, responses=answers(400, 401, 403, 409, 413, 422, 429))
    async def submit_workflow(spec: WorkflowSpec, idempotency_key: IdempotencyKey = None,
                              who: Principal = Depends(allow("workflows.submit"))):
        [wf_id], started = await submit([spec], idempotency_key, who)
        return {"workflow_id": wf_id, "status": "running" if started else "pending", "tasks": len(spec.tasks)}

    @app.post("/v1/workflows/batch", status_code=202, responses=answers(400, 401, 403, 409, 413, 422, 429))
    async def submit_workflows(batch: WorkflowBatch, idempotency_key: IdempotencyKey = None,
                               who: Principal = Depends(allow("workflows.submit"))):
        ids, _ = await submit(batch.workflows, idempotency_key, who)
        return {"workflow_ids": ids}

    @app.post("/v1/tasks", status_code=202, responses=answers(400, 401, 403, 409, 413, 422, 429))
    async def submit_task(task: TaskSubmission, idempotency_key: IdempotencyKey = None,
                          who: Principal = Depends(allow("workflows.submit"))):
        spec = WorkflowSpec(tasks=[task.model_dump()])
        [wf_id], _ = await submit([spec], idempotency_key, who)
        return {"workflow_id": wf_id, "task_id": task.id}

    async def visible(request: Request, who: Principal, workflow_id: str) -> dict:
        """The workflow's view, if the caller may see it: a submitter sees only its own (others are absent)."""
        try:
            view = await service.workflows.get(workflow_id)
        except NotFound as exc:
            raise ApiError(404, "workflow_not_found", str(exc)) from exc
        if request.state.only_own and view["owner"] != who.id:
            raise ApiError(404, "workflow_not_found", f"no workflow {workflow_id!r}")
        return view

    add_workflow_events(app, service, allow, visible)
    add_schedules(app, service, allow)
    add_limits(app, service, allow)

    def opened(view: dict) -> dict:
        """The view with its results opened, for a reader allowed to see it. A value sealed with a key this
        api lacks stays sealed: it names its key."""
        codec = service.codec
        for task in view["tasks"]:
            task["result"] = _try(codec.open, task["result"])
        if isinstance(view["result"], dict):
            view["result"] = {k: _try(codec.open, v) for k, v in view["result"].items()}
        return view

    @app.get("/v1/workflows/{workflow_id}", responses=answers(401, 403, 404, 422, 429))
    async def get_workflow(request: Request, workflow_id: str,
                           wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
                           who: Principal = Depends(allow("read", own="workflows.read_own"))):
        deadline = time.monotonic() + wait
        pause = 0.02
        while True:
            view = await visible(request, who, workflow_id)
            remaining = deadline - time.monotonic()
            if view["status"] in TERMINAL_WORKFLOW or remaining <= 0:
                return opened(view)
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.25)

    @app.get("/v1/workflows", responses=answers(401, 403, 422, 429))
    async def list_workflows(
        request: Request,
        status: Annotated[str | None, Query(pattern="^(pending|running|succeeded|failed|cancelled|budget_exceeded)$")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        after: Annotated[str | None, Query(description="workflow_id of the previous page's last item")] = None,
        who: Principal = Depends(allow("read", own="workflows.read_own")),
    ):
        items = await service.workflows.list(status, limit, after, owner=who.id if request.state.only_own else None)
        return {"workflows": items, "next": items[-1]["workflow_id"] if len(items) == limit else None}

    @app.post("/v1/workflows/{workflow_id}/cancel", responses=answers(401, 403, 404, 422, 429))
    async def cancel_workflow(request: Request, workflow_id: str,
                              who: Principal = Depends(allow("workflows.cancel", own="workflows.cancel_own",
                                                             action="workflow.cancel"))):
        if request.state.only_own:
            await visible(request, who, workflow_id)
        try:
            view, out = await service.workflows.cancel(workflow_id)
        except NotFound as exc:
            raise ApiError(404, "workflow_not_found", str(exc)) from exc
        await out.publish(service.bus)
        return opened(view)

    @app.post("/v1/workflows/{workflow_id}/tasks/{task_id}/input", responses=answers(400, 401, 403, 404, 409, 413, 422, 429))
    async def answer_task(request: Request, workflow_id: str, task_id: str, body: AnswerRequest,
                          who: Principal = Depends(allow("workflows.answer", own="workflows.answer_own",
                                                         action="task.input"))):
        """Answers a task's question (status waiting_input; `input` in its view holds the question). The
        answer must match the question's JSON schema, if it has one. The task goes on at once."""
        if request.state.only_own:
            await visible(request, who, workflow_id)
        try:
            task, reply, reply_to, out = await service.workflows.answer(workflow_id, task_id, body.answer)
        except NotFound as exc:
            raise ApiError(404, "task_not_found", str(exc)) from exc
        except NotWaiting as exc:
            raise ApiError(409, "not_waiting", str(exc)) from exc
        except InvalidAnswer as exc:
            raise ApiError(422, "invalid_answer", str(exc)) from exc
        await out.publish(service.bus)
        if not reply_to or not await service.bus.publish(reply, reply_to):
            # The agent that asked is gone: the task runs again, and finds the answer stored.
            await (await service.workflows.requeue_answered(workflow_id, task_id)).publish(service.bus, service.routes)
        return task

    @app.get("/v1/agents", dependencies=[Depends(allow("read"))], responses=answers(401, 403, 422, 429))
    async def list_agents(
        capability: Annotated[str | None, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
                                                description="only the agents serving it")] = None,
        status: Annotated[str | None, Query(pattern="^(alive|lost)$")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[str | None, Query(min_length=1, max_length=1024,
                                           description="the previous page's last name (its `next`)")] = None,
    ):
        """Agents by name with their capabilities, health and circuit breakers, a page at a time (`next`
        is the cursor of the next page, null on the last); and the breaker of each capability they serve."""
        agents, cursor = await service.registry.page(limit=limit, after=after, capability=capability, status=status)
        capabilities = sorted({c for a in agents for c in a["capabilities"]})
        names = [f"agent:{a['name']}" for a in agents] + [f"cap:{c}" for c in capabilities]
        breakers = await asyncio.to_thread(service.breakers.snapshot, names)
        for agent in agents:
            agent["breaker"] = breakers[f"agent:{agent['name']}"]
        return {"agents": agents, "capabilities": {c: {"breaker": breakers[f"cap:{c}"]} for c in capabilities},
                "next": cursor}

    @app.get("/v1/dlq", dependencies=[Depends(allow("read"))], responses=answers(401, 403, 422, 429))
    async def list_dead_letters(
        capability: str | None = None, reason: str | None = None, workflow_id: str | None = None,
        since: float | None = Query(None, description="unix time"), until: float | None = None,
        status: Annotated[str | None, Query(pattern="^(dead|replayed)$")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100, after: str | None = None,
    ):
        """Oldest first; filter by capability, reason (substring), workflow, time, status."""
        items = await service.dead_letters.list(limit=limit, after=after, capability=capability, reason=reason,
                                                workflow_id=workflow_id, since=since, until=until, status=status)
        return {"dead_letters": items, "next": items[-1]["id"] if len(items) == limit else None}

    @app.get("/v1/dlq/{dead_letter_id}", dependencies=[Depends(allow("read"))], responses=answers(401, 403, 404, 422, 429))
    async def get_dead_letter(dead_letter_id: str):
        record = await service.dead_letters.get(dead_letter_id)
        if record is None:
            raise ApiError(404, "dead_letter_not_found", f"no dead letter {dead_letter_id!r}")
        return record

    @app.post("/v1/dlq/{dead_letter_id}/replay", dependencies=[Depends(allow("dlq.replay", action="dlq.replay"))],
              responses=answers(401, 403, 404, 409, 422, 429))
    async def replay_dead_letter(dead_letter_id: str):
        try:
            out = await service.workflows.replay(dead_letter_id)
        except NotFound as exc:
            raise ApiError(404, "dead_letter_not_found", str(exc)) from exc
        except NotReplayable as exc:
            raise ApiError(409, "not_replayable", str(exc)) from exc
        await out.publish(service.bus)
        return await service.dead_letters.get(dead_letter_id)

    @app.post("/v1/dlq/replay", status_code=202, dependencies=[Depends(allow("dlq.replay", action="dlq.replay_many"))],
              responses=answers(400, 401, 403, 413, 422, 429))
    async def replay_dead_letters(request: ReplayRequest):
        """Replays every matching dead letter, at most rate_per_s a second, in the dlq-replayer."""
        filters = request.model_dump(exclude={"rate_per_s", "limit"}, exclude_none=True)
        matched = await service.dead_letters.list(limit=request.limit, status="dead", **filters)
        ask = Envelope(type=MessageType.CONTROL, subject="dlq.replay", source="api",
                       payload={"ids": [r["id"] for r in matched], "rate_per_s": request.rate_per_s})
        await service.bus.publish(ask, service.bus.topology.replay)
        return {"matched": len(matched), "rate_per_s": request.rate_per_s}

    @app.delete("/v1/dlq/{dead_letter_id}", status_code=204, dependencies=[Depends(allow("dlq.delete", action="dlq.delete"))],
                responses=answers(401, 403, 404, 422, 429))
    async def delete_dead_letter(dead_letter_id: str):
        if not await service.dead_letters.delete(dead_letter_id):
            raise ApiError(404, "dead_letter_not_found", f"no dead letter {dead_letter_id!r}")
        await stream.publish(service.bus, [stream.dead_letter_change({"id": dead_letter_id}, "deleted")])
        return Response(status_code=204)

    @app.get("/v1/control", dependencies=[Depends(allow("read"))], responses=answers(401, 403, 429))
    async def get_control():
        return await service.controls.get()

    async def control(action: str, capability: str | None) -> dict:
        state = await service.controls.change(action, capability)
        await service.bus.broadcast(control_message(state, "api"))
        await stream.publish(service.bus, [stream.control_change(state)])
        return state

    @app.post("/v1/control/stop-all", dependencies=[Depends(allow("control", action="control.stop-all"))],
              responses=answers(401, 403, 422, 429))
    async def stop_all():
        """The emergency stop: no task is dispatched and agents take no new work; in-flight work finishes
        (or, if its agent stops, is requeued). Undo with resume."""
        return await control("stop-all", None)

    @app.post("/v1/control/pause", dependencies=[Depends(allow("control", action="control.pause"))],
              responses=answers(400, 401, 403, 413, 422, 429))
    async def pause(request: ControlRequest | None = None):
        """Pause dispatching of one capability, or of everything: tasks wait, queued, until resumed."""
        return await control("pause", request.capability if request else None)

    @app.post("/v1/control/resume", dependencies=[Depends(allow("control", action="control.resume"))],
              responses=answers(400, 401, 403, 413, 422, 429))
    async def resume(request: ControlRequest | None = None):
        """Resume one capability, or everything (this also lifts stop-all)."""
        return await control("resume", request.capability if request else None)

    @app.post("/v1/tokens", status_code=201, responses=answers(400, 401, 403, 413, 422, 429))
    async def create_token(request: TokenRequest, who: Principal = Depends(allow("tokens", action="token.create"))):
        """A new token, shown once in this answer: only its hash is kept."""
        record, token = await service.tokens.create(request.name, request.role, request.expires_in_s, who.id)
        return {**record, "token": token}

    @app.get("/v1/tokens", dependencies=[Depends(allow("tokens"))], responses=answers(401, 403, 429))
    async def list_tokens():
        """Every token, without its secret (revoked and expired ones too)."""
        return {"tokens": await service.tokens.list()}

    @app.delete("/v1/tokens/{token_id}", dependencies=[Depends(allow("tokens", action="token.revoke"))],
                responses=answers(401, 403, 404, 422, 429))
    async def revoke_token(token_id: str):
        """Revokes a token: every api replica refuses it within a second."""
        record = await service.tokens.revoke(token_id)
        if record is None:
            raise ApiError(404, "token_not_found", f"no token {token_id!r}")
        return record

    @app.get("/v1/audit", dependencies=[Depends(allow("audit"))], responses=answers(401, 403, 422, 429))
    async def read_audit(
        since: float | None = Query(None, description="unix time"),
        actor: str | None = Query(None, max_length=128, description="token id or name"),
        action: str | None = Query(None, max_length=64),
        after: Annotated[int, Query(ge=0, description="seq of the previous page's last record")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ):
        """The audit log, oldest first; each record holds the hash of the one before it."""
        records = await service.audit.list(since=since, actor=actor, action=action, after=after, limit=limit)
        return {"records": records, "next": records[-1]["seq"] if len(records) == limit else None}

    @app.get("/v1/events", response_class=Response, responses={
        **answers(401, 403, 422, 429),
        200: {"description": "A server-sent-events stream that lasts until the client disconnects (or, "
                             "falling too far behind, is cut off): `event:` task, workflow, progress, input, "
                             "answer, published, child, agents, dlq or control (streamed text only in a "
                             "workflow's own stream); `data:` the change as JSON; a comment line every 15 s.",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        503: {"model": ErrorBody, "description": "This api has too many streams open, or is stopping."}})
    async def events(
        workflow_id: Annotated[str | None, Query(max_length=128, description="only this workflow's events and "
                                                 "those of its child workflows")] = None,
        access_token: Annotated[str | None, Query(description="the token, for clients that cannot send the "
                                                  "Authorization header (a browser's EventSource)")] = None,
        who: Principal = Depends(allow("read", query_token=True)),
    ):
        """Live changes: tasks, workflows, agents, dead letters, controls."""
        client = service.events.subscribe(workflow_id)
        if client is None:
            raise ApiError(503, "unavailable", "too many event streams on this api replica; retry later")
        await service.events.announce()  # before the stream opens: what the client does next is seen
        return EventStream(service.events, client)

    @app.get("/v1/whoami", responses=answers(401, 429))
    async def whoami(who: Principal = Depends(allow(None))):
        """The caller's token: its id, name, role and what the role may do (the console shows only that)."""
        return {"id": who.id, "name": who.name, "role": who.role.value,
                "permissions": sorted(PERMISSIONS[who.role])}

    mount_console(app)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not service.is_ready():
            return _error(503, "not_ready", "the api is starting or has lost the broker")
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}})
    async def metrics(request: Request):
        return Response(exposition(request.url.query), media_type=CONTENT_TYPE_LATEST)

    return app
