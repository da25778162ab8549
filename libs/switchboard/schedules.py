"""Schedules: a workflow submitted on a cron schedule, once per tick, by whichever coordinator gets there.

A schedule names a cron expression (croniter's: 5 fields, or 6 with the seconds FIRST as in Quartz and
Spring, `*/10 * * * * *`; a 7th is the year; `@hourly` and friends), an IANA timezone the expression is
read in, and the workflow to submit. Ticks are computed by croniter on timezone-aware datetimes, so a
`0 9 * * *` in Europe/Berlin runs at 09:00 Berlin time in winter and in summer. On a DST change a local
time that does not exist (spring forward) runs at the first time after the gap, and one that occurs twice
(fall back) runs at both.

Once per tick. A coordinator decides each tick in one transaction: run it, skip it (overlap), or drop it
(catch-up). A run is written as the record's `pending` tick; the coordinator then creates the workflow
with the idempotency key `schedule:{name}:{schedule id}:{tick}` and records it in a second transaction.
Serializable transactions let only one coordinator decide a tick; one that dies after deciding leaves the
pending tick, which any coordinator finishes once it is PENDING_STALE_S old, and the idempotency key makes
that second create return the workflow the first one made, if it made one. A scheduled workflow is named
`{schedule}@{tick}` (ticks are UTC, ISO 8601, to the second) and owned by the token that made the schedule.

Catch-up (ticks that passed while no coordinator ran), as `catchup`:
  latest  (default) the missed ticks run once: the most recent of them (what Celery beat and Quartz's
          "fire once now" do); the older ones are recorded as missed.
  all     each missed tick runs, oldest first, but at most the MAX_CATCHUP most recent ones (as a
          Temporal schedule with a catch-up window); older ones are recorded as missed.
  none    missed ticks are dropped (recorded as missed): only a tick found within MISFIRE_GRACE_S of
          its time runs (Quartz's "do nothing").
Overlap, as `overlap`: "skip" (default, as Temporal's) records a tick as skipped while the workflow the
schedule last submitted has not finished; "allow" submits it anyway. Catch-up runs obey it too.
Paused, a schedule decides no ticks; resumed, it goes on from the next tick after now (the ticks while it
was paused are not caught up). A tick left pending by a coordinator that died holds up the schedule's
later ticks until it is finished, PENDING_STALE_S on; those that passed meanwhile follow the catch-up.

The workflow's payloads are sealed once, by the api, when the schedule is made (switchboard.codec), so
the store holds only ciphertext and every tick submits the same one. `switchboard keys reencrypt` does not
reseal schedules: keep an old key while a schedule made with it exists, or make the schedule again.

Keys (fdb.tuple packed):
  (ns, "schedule", name) → record
  (ns, "schedule_due", at, name) → b""   when a coordinator has work on the schedule next: its next tick,
                                          or, while a tick is pending, when that becomes stale; none while
                                          paused with nothing pending
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo, available_timezones

import orjson
from croniter import croniter
from croniter.croniter import CroniterBadDateError, CroniterError
from pydantic import BaseModel, Field, ValidationError

from switchboard.protocol import WorkflowSpec, new_id
from switchboard.settings import Settings
from switchboard.state import Store, Transaction, pack, prefix_range, unpack
from switchboard.workflows import TERMINAL_WORKFLOW, IdempotencyConflict, NotFound, WorkflowStore

if TYPE_CHECKING:
    from switchboard.bus import Bus
    from switchboard.routing import Routes

log = logging.getLogger(__name__)

MAX_CATCHUP = 100  # catchup "all": missed ticks run after an outage, at most
MISFIRE_GRACE_S = 60.0  # catchup "none": how late a tick may be found and still run (Quartz's default)
PENDING_STALE_S = 5.0  # a decided tick not recorded this long after: its coordinator died; others finish it
ROUND_TICKS = 200  # ticks one coordinator round decides, at most (the rest wait for the next round)
DUE_BATCH = 50
RECENT = 20  # outcomes a schedule's record keeps


class ScheduleSpec(BaseModel):
    """What POST /v1/schedules takes."""

    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    cron: str = Field(min_length=1, max_length=256, description="5 fields, or 6 with seconds first; @hourly etc.",
                      examples=["*/5 * * * *"])
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA name: Europe/Berlin",
                          examples=["UTC"])
    workflow: WorkflowSpec
    overlap: Literal["skip", "allow"] = Field("skip", description="skip: no new run while the last one runs")
    catchup: Literal["latest", "all", "none"] = Field("latest", description="missed ticks after an outage")


class InvalidSchedule(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ScheduleExists(ValueError):
    pass


# ---- ticks -------------------------------------------------------------------------------------------
@functools.cache
def _iana_names() -> frozenset[str]:
    """The IANA names, not the files beside them (posix/..., right/...), and not "localtime": it names
    each machine's own zone, which replicas need not share. Reads the zone directories, once: call it off
    the event loop (the transactions do, and create() does)."""
    return frozenset(available_timezones() - {"localtime", "posixrules", "Factory"})


def zone(name: str) -> ZoneInfo:
    if name not in _iana_names():
        raise InvalidSchedule("invalid_timezone", f"unknown timezone {name!r}: use an IANA name (like Europe/Berlin)")
    return ZoneInfo(name)


def _cron(expr: str, tz: str, at: float) -> croniter:
    return croniter(expr, datetime.fromtimestamp(at, zone(tz)), second_at_beginning=True)


def next_after(expr: str, tz: str, at: float) -> float | None:
    """The first tick strictly after `at` (unix time); None once there is none (`0 0 1 1 * * 2030`)."""
    try:
        return _cron(expr, tz, at).get_next(datetime).timestamp()
    except CroniterBadDateError:
        return None


def latest_at(expr: str, tz: str, at: float) -> float:
    """The last tick at or before `at`. Cron resolution is a second, and croniter's get_prev is strictly
    before its start, so it starts at the next whole second."""
    return _cron(expr, tz, float(int(at) + 1)).get_prev(datetime).timestamp()


def first_tick(expr: str, tz: str, now: float) -> float:
    """Checks the expression and the timezone (InvalidSchedule), and returns the first tick after now."""
    zone(tz)
    if not croniter.is_valid(expr, second_at_beginning=True):
        raise InvalidSchedule("invalid_cron", f"{expr!r} is not a cron expression (5 fields, or 6 with seconds first)")
    try:
        tick = next_after(expr, tz, now)
    except (CroniterError, ValueError, OverflowError) as exc:
        raise InvalidSchedule("invalid_cron", f"{expr!r}: {exc}") from None
    if tick is None:  # valid, but no date matches (30 February), or none after now
        raise InvalidSchedule("invalid_cron", f"{expr!r} never fires after now")
    return tick


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(record: dict, now: float) -> tuple[float | None, float | None, tuple[float, float] | None]:
    """The catch-up policy, for a schedule whose next tick is due: (the tick to run, or None; the next
    tick after the ones decided now, None if there is none; the (first, last) ticks dropped, or None)."""
    expr, tz, start = record["cron"], record["timezone"], record["next_tick"]
    latest = max(start, latest_at(expr, tz, now))
    policy = record["catchup"]
    if policy == "none" and now - latest > MISFIRE_GRACE_S:
        return None, next_after(expr, tz, latest), (start, latest)
    run = latest
    if policy == "all":  # the oldest of the MAX_CATCHUP most recent missed ticks
        back = _cron(expr, tz, latest)
        for _ in range(MAX_CATCHUP - 1):
            earlier = back.get_prev(datetime).timestamp()
            if earlier < start:
                break
            run = earlier
    dropped = None
    if run > start:
        dropped = (start, _cron(expr, tz, run).get_prev(datetime).timestamp())
    return run, next_after(expr, tz, run), dropped


# ---- records -------------------------------------------------------------------------------------------
def view(record: dict) -> dict:
    keys = ("name", "cron", "timezone", "overlap", "catchup", "paused", "workflow", "owner", "created_at",
            "updated_at", "last_workflow_id", "runs", "skipped", "recent")
    out = {k: record[k] for k in keys}
    out.update(next_tick=None if record["paused"] else iso(record["next_tick"]), last_tick=iso(record["last_tick"]))
    return out


def tick_workflow(record: dict, tick: float) -> tuple[WorkflowSpec, str]:
    """The workflow a tick submits, and its idempotency key: the same for every coordinator that tries."""
    spec = WorkflowSpec.model_validate({**record["workflow"], "name": f"{record['name']}@{iso(tick)}"})
    return spec, f"schedule:{record['name']}:{record['id']}:{iso(tick)}"


class Schedules:
    """Schedule records in the state store. Every method is one transaction."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.ns = settings.namespace

    def _key(self, name: str) -> bytes:
        return pack(self.ns, "schedule", name)

    def _read(self, tr: Transaction, name: str) -> dict | None:
        raw = tr.get(self._key(name))
        return None if raw is None else orjson.loads(raw)

    def _write(self, tr: Transaction, record: dict, now: float) -> None:
        """Writes the record and moves its due-index entry to where it belongs now."""
        if record.get("due_at") is not None:
            tr.clear(pack(self.ns, "schedule_due", record["due_at"], record["name"]))
        if record["pending"]:
            record["due_at"] = record["pending"]["decided_at"] + PENDING_STALE_S
        else:  # a schedule whose cron has no more ticks (its year field ended) is due no more
            record["due_at"] = None if record["paused"] else record["next_tick"]
        if record["due_at"] is not None:
            tr.set(pack(self.ns, "schedule_due", record["due_at"], record["name"]), b"")
        record["updated_at"] = now
        tr.set(self._key(record["name"]), orjson.dumps(record))

    @staticmethod
    def _note(record: dict, entry: dict) -> None:
        record["recent"] = [entry, *record["recent"]][:RECENT]

    # ---- the api's side ------------------------------------------------------------------------------
    async def create(self, spec: ScheduleSpec, workflow: dict, owner: str | None) -> dict:
        """Stores a new schedule (InvalidSchedule, ScheduleExists: nothing stored). `workflow` is the spec
        to submit as stored: validated, its payloads sealed."""
        now = time.time()
        next_tick = await asyncio.to_thread(first_tick, spec.cron, spec.timezone, now)  # reads the zone's file

        def txn(tr: Transaction) -> dict:
            if tr.get(self._key(spec.name)) is not None:
                raise ScheduleExists(f"a schedule named {spec.name!r} exists")
            record = {"name": spec.name, "id": new_id(), "cron": spec.cron, "timezone": spec.timezone,
                      "workflow": workflow, "overlap": spec.overlap, "catchup": spec.catchup, "paused": False,
                      "owner": owner, "created_at": now, "next_tick": next_tick, "pending": None,
                      "last_tick": None, "last_workflow_id": None, "runs": 0, "skipped": 0, "recent": []}
            self._write(tr, record, now)
            return record

        return view(await self.store.transact(txn))

    async def get(self, name: str) -> dict | None:
        record = await self.store.read(self._read, name)
        return None if record is None else view(record)

    async def list(self, limit: int, after: str | None = None) -> list[dict]:
        """By name; `after` is the last name of the previous page."""

        def txn(tr: Transaction) -> list[dict]:
            begin, end = prefix_range(self.ns, "schedule")
            if after is not None:
                begin = self._key(after) + b"\x00"
            return [view(orjson.loads(v)) for _, v in tr.get_range(begin, end, limit=limit)]

        return await self.store.read(txn)

    async def delete(self, name: str) -> bool:
        def txn(tr: Transaction) -> bool:
            record = self._read(tr, name)
            if record is None:
                return False
            if record.get("due_at") is not None:
                tr.clear(pack(self.ns, "schedule_due", record["due_at"], name))
            tr.clear(self._key(name))
            return True

        return await self.store.transact(txn)

    async def set_paused(self, name: str, paused: bool) -> dict | None:
        """Pauses or resumes (None: no such schedule). Resumed, it goes on from the next tick after now."""
        now = time.time()

        def txn(tr: Transaction) -> dict | None:
            record = self._read(tr, name)
            if record is None or record["paused"] == paused:
                return record
            record["paused"] = paused
            if not paused:
                record["next_tick"] = next_after(record["cron"], record["timezone"], now)
            self._write(tr, record, now)
            return record

        record = await self.store.transact(txn)
        return None if record is None else view(record)

    # ---- the coordinator's side ----------------------------------------------------------------------
    async def due(self, now: float, limit: int) -> list[str]:
        def txn(tr: Transaction) -> list[str]:
            begin, _ = prefix_range(self.ns, "schedule_due")
            _, end = prefix_range(self.ns, "schedule_due", now)  # every entry due at or before now
            rows = tr.get_range(begin, end, limit=limit)
            return list(dict.fromkeys(unpack(k)[-1] for k, _ in rows))

        return await self.store.read(txn)

    async def record(self, name: str) -> dict | None:
        return await self.store.read(self._read, name)

    async def decide(self, name: str, expected_next: float, previous_running: bool) -> dict | None:
        """Decides the schedule's due tick(s) if no one has since `expected_next` was read; returns the
        record with the tick to submit as `pending`, or None if there is none to submit."""
        now = time.time()

        def txn(tr: Transaction) -> dict | None:
            record = self._read(tr, name)
            if (record is None or record["paused"] or record["pending"] or record["next_tick"] != expected_next
                    or expected_next > now):
                return None  # gone, paused, or decided meanwhile by another coordinator
            run, record["next_tick"], dropped = plan(record, now)
            if dropped:
                self._note(record, {"outcome": "missed", "tick": iso(dropped[0]), "until": iso(dropped[1])})
            if run is not None and previous_running and record["overlap"] == "skip":
                record["skipped"] += 1
                self._note(record, {"outcome": "skipped", "tick": iso(run),
                                    "reason": f"workflow {record['last_workflow_id']} has not finished"})
                run = None
            if run is not None:
                record["pending"] = {"tick": run, "decided_at": now}
            self._write(tr, record, now)
            return record if run is not None else None

        return await self.store.transact(txn)

    async def finish(self, name: str, schedule_id: str, tick: float, workflow_id: str | None,
                     error: str | None = None) -> None:
        """Records the pending tick's workflow (or why it could not be made), once."""
        now = time.time()

        def txn(tr: Transaction) -> None:
            record = self._read(tr, name)
            if record is None or record["id"] != schedule_id or (record["pending"] or {}).get("tick") != tick:
                return  # deleted, or finished by another coordinator
            record["pending"] = None
            if workflow_id is None:
                self._note(record, {"outcome": "failed", "tick": iso(tick), "error": error})
            else:
                record.update(runs=record["runs"] + 1, last_tick=tick, last_workflow_id=workflow_id)
                self._note(record, {"outcome": "submitted", "tick": iso(tick), "workflow_id": workflow_id})
            self._write(tr, record, now)

        await self.store.transact(txn)


class Scheduler:
    """The coordinator's loop: decides the due ticks and submits their workflows, as the api submits one
    (create, then queue its roots or hand it to the coordinator's intake: `take_in`)."""

    def __init__(self, schedules: Schedules, workflows: WorkflowStore, bus: Bus, routes: Routes | None,
                 take_in: Callable[[list[str]], Awaitable[None]]):
        self.schedules, self.workflows, self.bus, self.routes, self.take_in = schedules, workflows, bus, routes, take_in

    async def run_due(self) -> None:
        """One round: at most ROUND_TICKS ticks (a catch-up of "all" comes back due at once)."""
        budget = ROUND_TICKS
        while budget > 0:
            names = await self.schedules.due(time.time(), min(budget, DUE_BATCH))
            if not names:
                return
            for name in names:
                try:
                    await self.tick(name)
                except Exception as exc:  # one schedule that cannot go on must not hold up the others
                    log.warning("schedule %s: tick failed (%s); retrying next round", name, exc)
            budget -= len(names)

    async def tick(self, name: str) -> None:
        record = await self.schedules.record(name)
        if record is None:
            return
        if not record["pending"]:
            if record["paused"] or record["next_tick"] is None or record["next_tick"] > time.time():
                return
            running = bool(record["last_workflow_id"]) and record["overlap"] == "skip" and \
                not await self._finished(record["last_workflow_id"])
            record = await self.schedules.decide(name, record["next_tick"], running)
            if record is None:
                return
        elif time.time() < record["pending"]["decided_at"] + PENDING_STALE_S:
            return  # another coordinator is submitting it
        await self._submit(record, record["pending"]["tick"])

    async def _finished(self, wf_id: str) -> bool:
        try:
            return (await self.workflows.get(wf_id))["status"] in TERMINAL_WORKFLOW
        except NotFound:
            return True

    async def _submit(self, record: dict, tick: float) -> None:
        try:
            spec, key = tick_workflow(record, tick)
            [wf_id], started, out = await self.workflows.create([spec], key, owner=record["owner"])
        except (ValidationError, IdempotencyConflict) as exc:  # will never work: recorded, not retried
            log.warning("schedule %s: tick %s not submitted: %s", record["name"], iso(tick), exc)
            await self.schedules.finish(record["name"], record["id"], tick, None, str(exc))
            return
        await self.schedules.finish(record["name"], record["id"], tick, wf_id)
        # Stored is submitted: what cannot be sent now, the coordinator's intake sweep sends later.
        try:
            await out.publish(self.bus, self.routes)
            if started:
                await self.workflows.taken_in(started)
            else:
                await self.take_in([wf_id])
        except Exception as exc:
            log.warning("could not queue the tasks of scheduled workflow %s: %s", wf_id, exc)
