"""`/v1/limits`: rate and concurrency limits per key (switchboard.limits; the dispatchers enforce them).

Reading takes "read". Changing a key's numbers at run time (`PUT /v1/limits/{key}`, applied by the next
admission) and a capability's default limits take "control" (operators and admins), audited as
limit.set, limit.reset, capability_limits.set and capability_limits.delete.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Path
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from switchboard import limits
from switchboard.protocol import CapabilityLimits

if TYPE_CHECKING:
    from fastapi import FastAPI

    from services.api.service import Api

Key = Annotated[str, Path(min_length=1, max_length=limits.KEY_CHARS)]
Capability = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class LimitChange(BaseModel):
    """New numbers for a key, for every task under it, whatever its own limit says."""

    model_config = ConfigDict(extra="forbid")

    per_s: float | None = Field(None, gt=0, le=1_000_000, strict=True)
    burst: int | None = Field(None, ge=1, le=1_000_000, strict=True)
    max: int | None = Field(None, ge=1, le=1_000_000, strict=True)

    @model_validator(mode="after")
    def _something(self) -> LimitChange:
        if self.per_s is None and self.burst is None and self.max is None:
            raise ValueError("give per_s and/or burst (a rate limit), or max (a concurrency limit)")
        return self


class KeyUsage(BaseModel):
    key: str
    rate: dict[str, Any] | None = Field(description="{per_s, burst, available}: tokens available now")
    concurrency: dict[str, Any] | None = Field(description="{max, running}: slots held now")
    waiting: int = Field(description="tasks queued behind the key's gates")
    changed: dict[str, Any] | None = Field(description="an operator's change of its numbers, if any")
    capabilities: list[str]


class LimitsView(BaseModel):
    keys: list[KeyUsage]
    capabilities: dict[str, dict[str, Any]] = Field(description="capability → {operator, agent} defaults")


def add_routes(app: FastAPI, service: Api, allow) -> None:
    """The routes, on create_app's app."""
    from services.api.app import ApiError, answers  # app.py imports this module

    store, ns = service.store, service.settings.namespace

    async def waiting(gate_ids: list[str]) -> int:
        count = 0
        for gate_id in gate_ids:
            count += await service.bus.queue_depth(service.bus.topology.limited_queue(gate_id))
        return count

    @app.get("/v1/limits", response_model=LimitsView, dependencies=[Depends(allow("read"))],
             responses=answers(401, 403, 429))
    async def get_limits():
        """Each key's numbers and what is used of them now, with the tasks waiting on it."""
        now = time.time()
        keys, defaults = await store.read(lambda tr: (limits.usage(tr, ns, now), limits.all_defaults(tr, ns)))
        for entry in keys:
            entry["waiting"] = await waiting(entry.pop("gates"))
        return {"keys": keys, "capabilities": defaults}

    @app.put("/v1/limits/{key}", response_model=KeyUsage,
             dependencies=[Depends(allow("control", action="limit.set"))],
             responses=answers(400, 401, 403, 404, 413, 422, 429))
    async def change_limit(key: Key, change: LimitChange):
        """Sets the key's numbers (merged with an earlier change): the next admission under it uses them."""

        def txn(tr):
            merged = limits.override(tr, ns, key) | change.model_dump(exclude_none=True)
            limits.set_override(tr, ns, key, merged)
            return merged

        await store.transact(txn)
        return await one(key)

    @app.delete("/v1/limits/{key}", status_code=204,
                dependencies=[Depends(allow("control", action="limit.reset"))],
                responses=answers(401, 403, 404, 422, 429))
    async def reset_limit(key: Key):
        """Drops an operator's change: tasks' own numbers apply again."""
        await store.transact(lambda tr: limits.set_override(tr, ns, key, None))
        return Response(status_code=204)

    async def one(key: str) -> dict:
        entries = await store.read(lambda tr: limits.usage(tr, ns, time.time(), only=key))
        entry = entries[0] if entries else None
        if entry is None:
            raise ApiError(404, "limit_not_found", f"no limit {key!r}")
        entry["waiting"] = await waiting(entry.pop("gates"))
        return entry

    @app.put("/v1/capabilities/{capability}/limits", response_model=CapabilityLimits,
             dependencies=[Depends(allow("control", action="capability_limits.set"))],
             responses=answers(400, 401, 403, 404, 413, 422, 429))
    async def set_capability_limits(capability: Capability, body: CapabilityLimits):
        """The capability's default limits, for workflows submitted from now on (an agent's declared ones
        apply where no operator set any). Keys are templates over the task; a field a task lacks renders
        empty."""
        value = body.stored()
        if not value:
            raise ApiError(422, "invalid_limits", "give rate_limit and/or concurrency (DELETE removes them)")
        for limit in value.values():
            try:
                limits.render(limit["key"], {"capability": capability}, strict=False)
            except limits.BadTemplate as exc:
                raise ApiError(422, "invalid_limit_key", str(exc)) from exc
        await store.transact(lambda tr: limits.set_defaults(tr, ns, capability, "operator", value))
        return value

    @app.delete("/v1/capabilities/{capability}/limits", status_code=204,
                dependencies=[Depends(allow("control", action="capability_limits.delete"))],
                responses=answers(401, 403, 404, 422, 429))
    async def delete_capability_limits(capability: Capability):
        """Removes the operator's defaults (an agent's declared ones apply again, if any)."""
        await store.transact(lambda tr: limits.set_defaults(tr, ns, capability, "operator", None))
        return Response(status_code=204)
