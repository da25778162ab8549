"""GET /v1/agents a page at a time, by name, filtered by capability and status; and the registry's
indexes behind it (switchboard.registry), which follow heartbeats, stops and changes of capabilities."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from switchboard.protocol import Envelope, MessageType
from switchboard.registry import RegistryClient
from tests.harness import Platform, listed_agents, wait_for

N = 30
LOST = {f"agent-{i:02d}" for i in (3, 7, 12, 21, 28)}


def capabilities_of(i: int) -> list[str]:
    return ["alpha", "beta"] if i % 3 == 0 else ["alpha"] if i % 2 else ["beta"]


EXPECTED = {f"agent-{i:02d}": capabilities_of(i) for i in range(N)}


@pytest.fixture
async def registered(settings):
    """The api and the registry, and N agents registered by heartbeats sent straight to the registry's
    queue (as the SDK sends them); those in LOST sent their last one long ago."""
    # Agents here beat once: a long lost_after keeps the others alive for the test.
    platform = Platform(settings.model_copy(update={"agent_lost_after_s": 600.0}))
    try:
        await platform.start(services=("api", "registry"))
        bus = platform.services["api"].bus
        for name, capabilities in EXPECTED.items():
            env = Envelope(type=MessageType.EVENT, subject="agent.heartbeat", source=name,
                           timestamp=time.time() - (1200 if name in LOST else 0),
                           payload={"name": name, "capabilities": capabilities, "concurrency": 2, "in_flight": 0,
                                    "host": "test", "pid": 1})
            await bus.publish(env, platform.topology.registry)

        async def all_listed() -> bool:
            return len(await listed_agents(platform.client, "/v1/agents") or ()) == N

        await wait_for(all_listed, what=f"{N} agents listed")
        yield platform
    finally:
        await platform.close()


async def pages(client, limit: int, **filters) -> list[dict]:
    """Every page of a listing, until `next` is null (asserted to come)."""
    out, after = [], None
    for _ in range(N + 2):
        response = await client.get("/v1/agents", params={"limit": limit, **filters, **({"after": after} if after else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["agents"]) <= limit
        assert set(body["capabilities"]) == {c for a in body["agents"] for c in a["capabilities"]}
        out.append(body)
        after = body["next"]
        if after is None:
            return out
        assert after == body["agents"][-1]["name"]
    raise AssertionError("the listing never ended")


def names(listing: list[dict]) -> list[str]:
    return [a["name"] for body in listing for a in body["agents"]]


async def test_pages_hold_every_agent_once_by_name_and_the_last_has_no_next(registered):
    client = registered.client
    listing = await pages(client, 7)
    assert names(listing) == sorted(EXPECTED)  # each exactly once, by name
    assert [len(b["agents"]) for b in listing] == [7, 7, 7, 7, 2]
    exact = await pages(client, 10)  # a page that ends exactly at the last agent says so
    assert [len(b["agents"]) for b in exact] == [10, 10, 10] and names(exact) == sorted(EXPECTED)
    whole = (await client.get("/v1/agents")).json()  # the default page holds them all
    assert [a["name"] for a in whole["agents"]] == sorted(EXPECTED) and whole["next"] is None
    assert set(whole["capabilities"]) == {"alpha", "beta"}
    for agent in whole["agents"]:
        assert agent["capabilities"] == EXPECTED[agent["name"]]
        assert agent["status"] == ("lost" if agent["name"] in LOST else "alive")
        assert {"breaker", "last_heartbeat", "in_flight", "concurrency"} <= agent.keys()
    after = (await client.get("/v1/agents", params={"after": "agent-27"})).json()
    assert [a["name"] for a in after["agents"]] == ["agent-28", "agent-29"] and after["next"] is None


async def test_filters_by_capability_and_status_page_too(registered):
    client = registered.client
    for filters in ({"capability": "alpha"}, {"capability": "beta"}, {"status": "alive"}, {"status": "lost"},
                    {"capability": "alpha", "status": "lost"}, {"capability": "beta", "status": "alive"}):
        want = sorted(n for n, caps in EXPECTED.items()
                      if filters.get("capability", caps[0]) in caps
                      and filters.get("status", "lost" if n in LOST else "alive") == ("lost" if n in LOST else "alive"))
        for limit in (1, 3, 1000):
            listing = await pages(client, limit, **filters)
            assert names(listing) == want, (filters, limit)
            for body in listing:
                for agent in body["agents"]:
                    assert agent["status"] == filters.get("status", agent["status"])
                    assert filters.get("capability", agent["capabilities"][0]) in agent["capabilities"]
    nobody = (await client.get("/v1/agents", params={"capability": "gamma"})).json()
    assert nobody == {"agents": [], "capabilities": {}, "next": None}


@pytest.mark.parametrize("params,mentions", [
    ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "many"}, "limit"),
    ({"status": "dead"}, "status"), ({"status": "ALIVE"}, "status"),
    ({"capability": "no spaces"}, "capability"), ({"capability": ""}, "capability"), ({"capability": "x" * 129}, "capability"),
    ({"after": ""}, "after"), ({"after": "x" * 1025}, "after"),
])
async def test_bad_parameters_are_refused_with_the_error_shape(api_only_agents, params, mentions):
    response = await api_only_agents.client.get("/v1/agents", params=params)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and mentions in error["message"] + str(error.get("details", ""))


@pytest.fixture
async def api_only_agents(settings):
    platform = Platform(settings)
    try:
        await platform.start(services=("api",))
        yield platform
    finally:
        await platform.close()


@pytest.fixture
async def registry(settings):
    redis = aioredis.from_url(settings.redis_url)
    try:
        yield RegistryClient(redis, settings)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{settings.namespace}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


def beat(name: str, capabilities: list[str], pid: int = 1, at: float | None = None) -> dict:
    return {"name": name, "capabilities": capabilities, "host": "pod", "pid": pid, "status": "alive",
            "last_heartbeat": time.time() if at is None else at}


async def test_the_indexes_follow_changes_of_capabilities_and_stops(registry):
    await registry.upsert(beat("a", ["x", "y"]))
    await registry.upsert(beat("b", ["y"]))
    assert [a["name"] for a in (await registry.page(capability="x"))[0]] == ["a"]
    await registry.upsert(beat("a", ["z"]))  # restarted serving something else
    assert (await registry.page(capability="x"))[0] == []
    assert [a["name"] for a in (await registry.page(capability="y"))[0]] == ["b"]
    assert [a["name"] for a in (await registry.page(capability="z"))[0]] == ["a"]
    assert await registry.redis.zcard(registry.capability_key("x")) == 0
    await registry.upsert(beat("b", ["y"], pid=2))
    await registry.remove("b", instance=("pod", 1))  # another replica's stop leaves it
    assert [a["name"] for a in (await registry.page())[0]] == ["a", "b"]
    await registry.remove("b", instance=("pod", 2))
    assert [a["name"] for a in (await registry.page())[0]] == ["a"]
    assert await registry.redis.zcard(registry.capability_key("y")) == 0
    assert await registry.redis.zrange(registry.beats_key, 0, -1) == [b"a"]
    await registry.remove("a")
    assert await registry.page() == ([], None) and await registry.agents() == []


async def test_status_follows_the_clock_and_the_sweeps_mark(registry):
    now = time.time()
    await registry.upsert(beat("fresh", ["x"], at=now))
    await registry.upsert(beat("silent", ["x"], at=now - registry.lost_after_s - 1))  # judged lost by its age
    await registry.upsert(beat("marked", ["x"], at=now - 100) | {"status": "lost", "lost_at": now})  # as the sweep writes
    assert [a["name"] for a in (await registry.page(status="alive"))[0]] == ["fresh"]
    lost, _ = await registry.page(status="lost")
    assert [a["name"] for a in lost] == ["marked", "silent"] and {a["status"] for a in lost} == {"lost"}
    await registry.upsert(beat("marked", ["x"]))  # it beats again
    assert [a["name"] for a in (await registry.page(status="alive", capability="x"))[0]] == ["fresh", "marked"]


async def test_indexes_lost_or_missing_are_rebuilt_from_the_records(registry):
    for i in range(12):
        await registry.upsert(beat(f"n{i:02d}", ["x"] if i % 2 else ["y"]))
    # As after an upgrade from a registry that kept only the records, or a partial loss of keys.
    await registry.redis.delete(registry.names_key, registry.beats_key, registry.capability_key("x"))
    first, cursor = await registry.page(limit=5, capability="x", status="alive")
    assert [a["name"] for a in first] == ["n01", "n03", "n05", "n07", "n09"] and cursor == "n09"
    rest, cursor = await registry.page(limit=5, capability="x", status="alive", after=cursor)
    assert [a["name"] for a in rest] == ["n11"] and cursor is None
    assert await registry.redis.zcard(registry.names_key) == 12
    await registry.redis.zadd(registry.names_key, {"ghost": 0})  # a name without a record is dropped
    assert len((await registry.page(limit=1000))[0]) == 12 and await registry.redis.zcard(registry.names_key) == 12


async def test_many_agents_upserted_in_one_round_trip_are_indexed_alike(registry):
    await registry.upsert(beat("h-00", ["old"]))
    await registry.upsert_many([beat(f"h-{i:02d}", ["x"] if i % 2 else ["y"]) for i in range(20)])
    await registry.upsert_many([])
    assert await registry.redis.zcard(registry.capability_key("old")) == 0
    first, cursor = await registry.page(limit=6, capability="x")
    rest, end = await registry.page(limit=6, capability="x", after=cursor)
    assert [a["name"] for a in first + rest] == [f"h-{i:02d}" for i in range(1, 20, 2)] and end is None
