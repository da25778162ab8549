"""`/v1/schedules`: workflows submitted on a cron schedule (switchboard.schedules; the coordinators run them).

Reading takes the "read" permission; creating, deleting, pausing and resuming take "control" (operators
and admins) and are audited as schedule.create, schedule.delete, schedule.pause and schedule.resume. A
schedule's workflows belong to the token that made it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from fastapi import Depends, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel

from switchboard.codec import CodecError
from switchboard.schedules import InvalidSchedule, ScheduleExists, Schedules, ScheduleSpec
from switchboard.tokens import Principal

if TYPE_CHECKING:
    from fastapi import FastAPI

    from services.api.service import Api

Name = Annotated[str, Path(min_length=1, max_length=128)]


class ScheduleView(BaseModel):
    name: str
    cron: str
    timezone: str
    overlap: Literal["skip", "allow"]
    catchup: Literal["latest", "all", "none"]
    paused: bool
    workflow: dict[str, Any]
    owner: str | None
    created_at: float
    updated_at: float
    next_tick: str | None  # UTC, ISO 8601; None while paused
    last_tick: str | None
    last_workflow_id: str | None
    runs: int  # ticks submitted
    skipped: int  # ticks not submitted because the last run had not finished (overlap "skip")
    recent: list[dict[str, Any]]  # newest first: {outcome: submitted|skipped|missed|failed, tick, ...}


class ScheduleList(BaseModel):
    schedules: list[ScheduleView]
    next: str | None


def add_routes(app: FastAPI, service: Api, allow) -> None:
    """The routes, on create_app's app."""
    # Here rather than at the top: app.py imports this module, and these are defined there.
    from services.api.app import ApiError, ErrorBody, answers, check_workflow

    def documented(*statuses: int) -> dict:
        own = {404: "No such schedule.", 409: "A schedule of that name exists."}
        return {**answers(*statuses),
                **{s: {"model": ErrorBody, "description": own[s]} for s in statuses if s in own}}

    schedules = Schedules(service.store, service.settings)
    codec = service.codec

    def opened(schedule: dict) -> dict:
        """The view with its workflow's payloads opened where this api can (as results are for readers)."""
        for task in schedule["workflow"].get("tasks") or ():
            try:
                task["payload"] = codec.open(task.get("payload"))
            except CodecError:
                pass  # sealed with a key this api lacks: it stays sealed, and names its key
        return schedule

    async def found(name: str) -> dict:
        schedule = await schedules.get(name)
        if schedule is None:
            raise ApiError(404, "schedule_not_found", f"no schedule {name!r}")
        return schedule

    @app.post("/v1/schedules", status_code=201, response_model=ScheduleView,
              responses=documented(400, 401, 403, 409, 413, 422, 429))
    async def create_schedule(spec: ScheduleSpec,
                              who: Principal = Depends(allow("control", action="schedule.create"))):
        """Submits `workflow` once per tick of `cron` in `timezone`, named `{name}@{tick}`. A bad cron
        expression, timezone or workflow is a 422 and stores nothing."""
        check_workflow(spec.workflow, service.settings)
        workflow = spec.workflow.model_dump(mode="json")
        try:  # the record is JSON: what JSON cannot hold is the client's mistake, not a 5xx at the store
            orjson.dumps(workflow)
        except orjson.JSONEncodeError as exc:
            raise ApiError(422, "invalid_workflow", f"workflow cannot be stored as JSON ({exc}): integers must "
                           "fit in 64 bits and strings must be valid Unicode") from exc
        if codec.enabled:  # sealed once, here: the store holds only ciphertext, and every tick the same
            for task in workflow["tasks"]:
                task["payload"] = codec.seal(task["payload"])
        try:
            return opened(await schedules.create(spec, workflow, owner=who.id))
        except InvalidSchedule as exc:
            raise ApiError(422, exc.code, str(exc)) from exc
        except ScheduleExists as exc:
            raise ApiError(409, "schedule_exists", str(exc)) from exc

    @app.get("/v1/schedules", response_model=ScheduleList, dependencies=[Depends(allow("read"))],
             responses=documented(401, 403, 422, 429))
    async def list_schedules(limit: Annotated[int, Query(ge=1, le=500)] = 100,
                             after: Annotated[str | None, Query(max_length=128,
                                                                description="the previous page's last name")] = None):
        """By name."""
        items = await schedules.list(limit, after)
        return {"schedules": [opened(s) for s in items], "next": items[-1]["name"] if len(items) == limit else None}

    @app.get("/v1/schedules/{name}", response_model=ScheduleView, dependencies=[Depends(allow("read"))],
             responses=documented(401, 403, 404, 422, 429))
    async def get_schedule(name: Name):
        """The schedule, its next tick, and what its recent ticks did."""
        return opened(await found(name))

    @app.delete("/v1/schedules/{name}", status_code=204,
                dependencies=[Depends(allow("control", action="schedule.delete"))],
                responses=documented(401, 403, 404, 422, 429))
    async def delete_schedule(name: Name):
        """No tick after this is submitted; workflows already submitted go on."""
        if not await schedules.delete(name):
            raise ApiError(404, "schedule_not_found", f"no schedule {name!r}")
        return Response(status_code=204)

    async def pause_or_resume(name: str, paused: bool) -> dict:
        schedule = await schedules.set_paused(name, paused)
        if schedule is None:
            raise ApiError(404, "schedule_not_found", f"no schedule {name!r}")
        return opened(schedule)

    @app.post("/v1/schedules/{name}/pause", response_model=ScheduleView,
              dependencies=[Depends(allow("control", action="schedule.pause"))],
              responses=documented(401, 403, 404, 422, 429))
    async def pause_schedule(name: Name):
        """No tick is submitted until it is resumed."""
        return await pause_or_resume(name, True)

    @app.post("/v1/schedules/{name}/resume", response_model=ScheduleView,
              dependencies=[Depends(allow("control", action="schedule.resume"))],
              responses=documented(401, 403, 404, 422, 429))
    async def resume_schedule(name: Name):
        """Goes on from the next tick after now; the ticks while it was paused are not caught up."""
        return await pause_or_resume(name, False)
