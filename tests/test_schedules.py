"""Schedules (switchboard.schedules, /v1/schedules): the API's rules, the catch-up policies and DST, and,
with real services, once per tick with two coordinators, catch-up after a restart, and overlap."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import orjson
import pytest

from switchboard import Agent
from switchboard.cli import load_service
from switchboard.codec import MARK, new_key
from switchboard.schedules import MAX_CATCHUP, MISFIRE_GRACE_S, Schedules, next_after, plan, tick_workflow
from switchboard.state import pack
from switchboard.workflows import WorkflowStore
from tests.harness import ALL_SERVICES, Platform, wait_for

EVERY_SECOND = "* * * * * *"  # six fields: the seconds come first


def at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def schedule_body(name: str, capability: str = "tick", **fields) -> dict:
    return {"name": name, "cron": EVERY_SECOND, "workflow": {"tasks": [{"id": "a", "capability": capability}]},
            **fields}


async def create(platform: Platform, body: dict) -> dict:
    response = await platform.client.post("/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def schedule(platform: Platform, name: str) -> dict:
    response = await platform.client.get(f"/v1/schedules/{name}")
    assert response.status_code == 200, response.text
    return response.json()


async def scheduled(platform: Platform, name: str) -> dict[str, list[dict]]:
    """The schedule's workflows by their tick (the part of their name after the @)."""
    listed = (await platform.client.get("/v1/workflows", params={"limit": 500})).json()["workflows"]
    ticks: dict[str, list[dict]] = {}
    for wf in listed:
        if (wf["name"] or "").startswith(f"{name}@"):
            ticks.setdefault(wf["name"].split("@", 1)[1], []).append(wf)
    return ticks


def runs_at_least(platform: Platform, name: str, n: int, field: str = "runs"):
    async def check():
        view = await schedule(platform, name)
        return view if view[field] >= n else None

    return check


# ---- the policies, as functions of the record and the time ------------------------------------------
def test_catch_up_policies_after_an_outage():
    base = at("2030-01-01T00:00:00Z")
    record = {"cron": "*/5 * * * *", "timezone": "UTC", "next_tick": base}  # every 5 minutes
    now = base + 3600 + 10  # an hour (12 ticks) late
    run, following, dropped = plan({**record, "catchup": "latest"}, now)
    assert (run, following, dropped) == (base + 3600, base + 3900, (base, base + 3300))  # the latest, once
    run, following, dropped = plan({**record, "catchup": "all"}, now)
    assert (run, following, dropped) == (base, base + 300, None)  # the oldest first; the rest follow
    run, _, dropped = plan({**record, "catchup": "none"}, now)
    assert (run, dropped) == (base + 3600, (base, base + 3300))  # 10 s late is on time
    run, following, dropped = plan({**record, "catchup": "none"}, base + 3600 + MISFIRE_GRACE_S + 1)
    assert (run, following, dropped) == (None, base + 3900, (base, base + 3600))  # too late: nothing runs
    every_second = {"cron": EVERY_SECOND, "timezone": "UTC", "next_tick": base, "catchup": "all"}
    run, _, dropped = plan(every_second, base + 1000.5)  # all, but at most the MAX_CATCHUP latest
    assert run == base + 1000 - (MAX_CATCHUP - 1) and dropped == (base, run - 1)
    assert plan({**record, "catchup": "latest"}, base) == (base, base + 300, None)  # on time: just this one
    last = {"cron": "0 0 0 1 1 * 2030", "timezone": "UTC", "next_tick": base, "catchup": "latest"}  # 2030 only
    assert plan(last, base + 1) == (base, None, None)  # its last tick: after it, none is due


def test_ticks_follow_the_timezone_through_daylight_saving():
    def ticks(cron: str, tz: str, start: str, n: int) -> list[str]:
        out, t = [], at(start)
        for _ in range(n):
            t = next_after(cron, tz, t)
            out.append(utc(t))
        return out

    # 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC from the last Sunday of March.
    assert ticks("0 9 * * *", "Europe/Berlin", "2030-03-29T12:00:00Z", 3) == [
        "2030-03-30T08:00:00Z", "2030-03-31T07:00:00Z", "2030-04-01T07:00:00Z"]
    # 02:30 does not exist in New York on 10 March 2030: it runs at 03:00 local, the end of the gap.
    assert ticks("30 2 * * *", "America/New_York", "2030-03-09T12:00:00Z", 2) == [
        "2030-03-10T07:00:00Z", "2030-03-11T06:30:00Z"]
    # 01:30 happens twice on 3 November 2030 (EDT, then EST): it runs at both.
    assert ticks("30 1 * * *", "America/New_York", "2030-11-02T12:00:00Z", 3) == [
        "2030-11-03T05:30:00Z", "2030-11-03T06:30:00Z", "2030-11-04T06:30:00Z"]


# ---- the API --------------------------------------------------------------------------------------------
async def test_bad_input_is_a_422_and_stores_nothing_then_create_read_pause_resume_delete(platform):
    client = platform.client
    bad = [
        ({"cron": "every day"}, "invalid_cron"),
        ({"cron": "61 * * * *"}, "invalid_cron"),
        ({"cron": "0 0 30 2 *"}, "invalid_cron"),  # valid, but 30 February never comes
        ({"cron": "0 0 0 1 1 * 2020"}, "invalid_cron"),  # seconds first, and a year: past
        ({"timezone": "Mars/Olympus_Mons"}, "invalid_timezone"),
        ({"timezone": "localtime"}, "invalid_timezone"),
        ({"workflow": {"tasks": [{"id": "a", "capability": "x", "depends_on": ["b"]}]}}, "unknown_dependency"),
        ({"workflow": {"tasks": [{"id": "a", "capability": "x", "depends_on": ["a"]}]}}, "dependency_cycle"),
        # JSON with an integer no JSON writer need read back; refused by its schema, or as unstorable.
        ({"workflow": {"budget": {"tokens": 2**70}, "tasks": [{"id": "a", "capability": "x"}]}},
         ("invalid_request", "invalid_workflow")),
        ({"overlap": "sometimes"}, "invalid_request"),
        ({"catchup": "never"}, "invalid_request"),
        ({"name": "no spaces"}, "invalid_request"),
        ({"extra": 1}, "invalid_request"),
    ]
    for change, code in bad:
        response = await client.post("/v1/schedules", json={**schedule_body("nightly"), **change})
        assert response.status_code == 422, (change, response.text)
        assert response.json()["error"]["code"] in (code if isinstance(code, tuple) else (code,)), response.text
    too_big = schedule_body("nightly")
    too_big["workflow"]["tasks"][0]["payload"] = {"x": "x" * platform.settings.max_payload_bytes}
    response = await client.post("/v1/schedules", json=too_big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert (await client.get("/v1/schedules")).json() == {"schedules": [], "next": None}

    body = {**schedule_body("nightly"), "cron": "0 0 1 1 *", "timezone": "Europe/Berlin"}
    created = await create(platform, body)
    year = datetime.now(timezone.utc).year
    assert created["next_tick"] in (f"{year}-12-31T23:00:00Z", f"{year + 1}-12-31T23:00:00Z")  # midnight in Berlin
    assert created | {"paused": False, "overlap": "skip", "catchup": "latest", "runs": 0, "skipped": 0} == created
    duplicate = await client.post("/v1/schedules", json=body)
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "schedule_exists"
    assert (await schedule(platform, "nightly"))["workflow"]["tasks"][0]["capability"] == "tick"

    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/pause"), ("POST", "/resume")):
        missing = await client.request(method, f"/v1/schedules/nope{path}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "schedule_not_found"

    paused = (await client.post("/v1/schedules/nightly/pause")).json()
    assert paused["paused"] is True and paused["next_tick"] is None
    resumed = (await client.post("/v1/schedules/nightly/resume")).json()
    assert resumed["paused"] is False and resumed["next_tick"] == created["next_tick"]

    await create(platform, {**body, "name": "weekly"})
    first = (await client.get("/v1/schedules", params={"limit": 1})).json()
    assert [s["name"] for s in first["schedules"]] == ["nightly"] and first["next"] == "nightly"
    rest = (await client.get("/v1/schedules", params={"limit": 1, "after": "nightly"})).json()
    assert [s["name"] for s in rest["schedules"]] == ["weekly"]

    assert (await client.delete("/v1/schedules/nightly")).status_code == 204
    assert (await client.get("/v1/schedules/nightly")).status_code == 404
    assert [s["name"] for s in (await client.get("/v1/schedules")).json()["schedules"]] == ["weekly"]


async def test_only_operators_change_schedules_and_each_change_is_audited(settings):
    platform = Platform(settings.model_copy(update={"api_token": "boot"}))
    try:
        await platform.start(services=("api",))
        admin = {"Authorization": "Bearer boot"}
        tokens = {}
        for role in ("reader", "submitter", "operator"):
            made = await platform.client.post("/v1/tokens", json={"name": role, "role": role}, headers=admin)
            tokens[role] = made.json()
        body = schedule_body("guarded")
        for role in ("reader", "submitter"):
            refused = await platform.client.post("/v1/schedules", json=body,
                                                 headers={"Authorization": f"Bearer {tokens[role]['token']}"})
            assert refused.status_code == 403, refused.text
        assert (await platform.client.post("/v1/schedules", json=body)).status_code == 401
        operator = {"Authorization": f"Bearer {tokens['operator']['token']}"}
        created = await platform.client.post("/v1/schedules", json=body, headers=operator)
        assert created.status_code == 201 and created.json()["owner"] == tokens["operator"]["id"]
        reader = {"Authorization": f"Bearer {tokens['reader']['token']}"}
        assert (await platform.client.get("/v1/schedules/guarded", headers=reader)).status_code == 200
        assert (await platform.client.post("/v1/schedules/guarded/pause", headers=operator)).status_code == 200
        assert (await platform.client.delete("/v1/schedules/guarded", headers=operator)).status_code == 204
        records = (await platform.client.get("/v1/audit", headers=admin, params={"limit": 1000})).json()["records"]
        done = [(r["action"], r["outcome"]) for r in records if r["action"].startswith("schedule.")]
        assert done == [("schedule.create", "forbidden"), ("schedule.create", "forbidden"),
                        ("schedule.create", "unauthenticated"), ("schedule.create", "ok"),
                        ("schedule.pause", "ok"), ("schedule.delete", "ok")]
    finally:
        await platform.close()


# ---- ticks, with real services ----------------------------------------------------------------------
async def test_each_tick_is_submitted_once_with_two_coordinators_and_payloads_stay_sealed(settings):
    platform = Platform(settings.model_copy(update={"payload_keys": f"k1:{new_key()}"}))
    second = load_service("coordinator", platform.settings)
    runs: dict[str, int] = {}
    try:
        await platform.start()
        await second.start()
        platform.services["second coordinator"] = second  # stopped with the platform
        agent = Agent("ticker", settings=platform.settings, concurrency=8)

        @agent.handler("tick")
        async def tick(task):
            runs[task.workflow_id] = runs.get(task.workflow_id, 0) + 1
            return {"got": task.payload}

        await platform.add_agent(agent)
        body = schedule_body("often", overlap="allow")
        body["workflow"]["tasks"][0]["payload"] = {"secret": "s3cr3t"}
        await create(platform, body)
        await wait_for(runs_at_least(platform, "often", 5), what="five ticks submitted")
        await platform.client.post("/v1/schedules/often/pause")

        async def settled():  # a tick decided before the pause may still be being recorded
            view, ticks = await schedule(platform, "often"), await scheduled(platform, "often")
            return (view, ticks) if sum(map(len, ticks.values())) == view["runs"] else None

        view, ticks = await wait_for(settled, what="every submitted tick recorded")
        assert all(len(wfs) == 1 for wfs in ticks.values()), ticks  # no tick twice
        submitted = {e["tick"]: e["workflow_id"] for e in view["recent"] if e["outcome"] == "submitted"}
        assert {t: wfs[0]["workflow_id"] for t, wfs in ticks.items() if t in submitted} == submitted
        assert view["last_workflow_id"] == ticks[view["last_tick"]][0]["workflow_id"]
        for wfs in ticks.values():
            done = await platform.wait(wfs[0]["workflow_id"])
            assert done["status"] == "succeeded" and done["tasks"][0]["result"] == {"got": {"secret": "s3cr3t"}}
        assert set(runs.values()) == {1} and len(runs) == len(ticks)  # and each ran once

        raw = await platform.services["api"].store.read(lambda tr: tr.get(pack(platform.settings.namespace,
                                                                                 "schedule", "often")))
        assert b"s3cr3t" not in raw and MARK in orjson.loads(raw)["workflow"]["tasks"][0]["payload"]
        assert view["workflow"]["tasks"][0]["payload"] == {"secret": "s3cr3t"}  # opened for the reader
    finally:
        await platform.close()


async def test_ticks_missed_while_no_coordinator_ran_run_once_the_latest(platform):
    await create(platform, schedule_body("catching-up", overlap="allow"))
    await wait_for(runs_at_least(platform, "catching-up", 1), what="a first tick")
    await platform.services["coordinator"].stop()
    stopped = await schedule(platform, "catching-up")
    first_missed = at(stopped["next_tick"])
    await wait_for(lambda: time.time() >= first_missed + 3, what="four ticks to pass")  # no coordinator runs
    replacement = load_service("coordinator", platform.settings)
    await replacement.start()
    platform.services["coordinator"] = replacement  # stopped with the platform

    async def caught_up():
        view = await schedule(platform, "catching-up")
        recent = view["recent"]
        for i, entry in enumerate(recent):
            if entry["outcome"] == "missed" and at(entry["tick"]) == first_missed and i > 0:
                return entry, recent[i - 1]
        return None

    missed, after = await wait_for(caught_up, what="the catch-up recorded")
    assert at(missed["until"]) >= first_missed + 3
    assert after["outcome"] == "submitted" and at(after["tick"]) == at(missed["until"]) + 1
    ticks = await scheduled(platform, "catching-up")
    outage = [t for t in ticks if first_missed <= at(t) <= at(after["tick"])]
    assert outage == [after["tick"]] and len(ticks[after["tick"]]) == 1  # one workflow for all the missed ticks
    await wait_for(runs_at_least(platform, "catching-up", stopped["runs"] + 3), what="ticks after the catch-up")


@pytest.mark.parametrize("created", [False, True], ids=["died-after-deciding", "died-after-creating"])
async def test_a_tick_half_done_by_a_coordinator_that_died_is_finished_once(settings, created):
    """What a coordinator that died mid-tick leaves, made with the same calls it makes: the tick decided
    (and, in the second case, its workflow created) but not recorded. Another coordinator finishes it."""
    platform = Platform(settings)
    try:
        await platform.start(services=[s for s in ALL_SERVICES if s != "coordinator"])
        await create(platform, schedule_body("orphan", overlap="allow"))
        schedules = Schedules(platform.services["api"].store, settings)
        record = await schedules.record("orphan")
        await wait_for(lambda: time.time() >= record["next_tick"], what="the first tick to come")
        decided = await schedules.decide("orphan", record["next_tick"], previous_running=False)
        tick = decided["pending"]["tick"]
        orphan = None
        if created:
            spec, key = tick_workflow(decided, tick)
            [orphan], _, _ = await WorkflowStore(platform.services["api"].store, settings).create([spec], key)
        coordinator = load_service("coordinator", settings)
        await coordinator.start()
        platform.services["coordinator"] = coordinator

        async def finished():
            view = await schedule(platform, "orphan")
            return next((e for e in view["recent"] if e["tick"] == utc(tick) and e["outcome"] == "submitted"), None)

        entry = await wait_for(finished, what="the orphaned tick recorded")
        ticks = await scheduled(platform, "orphan")
        assert [wf["workflow_id"] for wf in ticks[utc(tick)]] == [entry["workflow_id"]]  # once
        assert orphan is None or entry["workflow_id"] == orphan  # the workflow the dead one made
        await wait_for(runs_at_least(platform, "orphan", 3), what="the ticks after it")
    finally:
        await platform.close()


def blocking_agent(platform: Platform, name: str, capability: str, release: asyncio.Event, started: list):
    agent = Agent(name, settings=platform.settings, concurrency=8)

    @agent.handler(capability)
    async def hold(task):
        started.append(task.workflow_id)
        await release.wait()
        return {}

    return agent


async def test_overlap_skip_submits_nothing_while_the_last_run_runs(platform):
    release, started = asyncio.Event(), []
    try:
        await platform.add_agent(blocking_agent(platform, "holder", "hold", release, started))
        await create(platform, schedule_body("exclusive", "hold"))  # overlap "skip" is the default
        view = await wait_for(runs_at_least(platform, "exclusive", 2, "skipped"), what="two ticks skipped")
        first = view["last_workflow_id"]
        ticks = await scheduled(platform, "exclusive")
        assert view["runs"] == 1 and [wfs[0]["workflow_id"] for wfs in ticks.values()] == [first]
        skips = [e for e in view["recent"] if e["outcome"] == "skipped"]
        assert len(skips) == view["skipped"] and all(first in e["reason"] for e in skips)
        await wait_for(lambda: started == [first], what="the first run started")
        release.set()
        assert (await platform.wait(first))["status"] == "succeeded"
        view = await wait_for(runs_at_least(platform, "exclusive", 2), what="a tick submitted after the run ended")
        assert view["last_workflow_id"] != first
    finally:
        release.set()


async def test_overlap_allow_submits_every_tick_while_runs_are_still_going(platform):
    release, started = asyncio.Event(), []
    try:
        await platform.add_agent(blocking_agent(platform, "holder", "hold", release, started))
        await create(platform, schedule_body("concurrent", "hold", overlap="allow"))
        await wait_for(runs_at_least(platform, "concurrent", 3), what="three ticks submitted")
        await wait_for(lambda: len(set(started)) >= 3, what="three runs going at once")
        view = await schedule(platform, "concurrent")
        assert view["skipped"] == 0
        for wfs in (await scheduled(platform, "concurrent")).values():
            assert wfs[0]["status"] in ("pending", "running")  # none has finished: they overlap
    finally:
        await platform.client.delete("/v1/schedules/concurrent")  # no more ticks while the platform stops
        release.set()


async def test_after_pause_or_delete_no_later_tick_is_submitted(platform):
    for name in ("paused", "deleted", "sentinel"):
        await create(platform, schedule_body(name, overlap="allow"))
    await wait_for(runs_at_least(platform, "deleted", 1), what="a tick of each")
    await wait_for(runs_at_least(platform, "paused", 1), what="a tick of each")
    await platform.client.post("/v1/schedules/paused/pause")
    assert (await platform.client.delete("/v1/schedules/deleted")).status_code == 204
    stopped_at = time.time()
    sentinel = (await schedule(platform, "sentinel"))["runs"]
    # The sentinel, on the same cron, shows the ticks going on meanwhile.
    await wait_for(runs_at_least(platform, "sentinel", sentinel + 3), what="three more ticks of the sentinel")
    for name in ("paused", "deleted"):
        ticks = await scheduled(platform, name)
        assert ticks and all(at(t) <= stopped_at for t in ticks), (name, sorted(ticks), utc(stopped_at))
    assert (await schedule(platform, "paused"))["next_tick"] is None
