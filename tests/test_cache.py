"""The result cache (switchboard.cache), across the real services: a task whose result is cached fresh
takes it without running, marked with where it came from; keys, expiry, bounds and the hit-rate metric."""

from __future__ import annotations

import hashlib
import time

import orjson
import pytest
from prometheus_client import REGISTRY, generate_latest

from switchboard import Agent, cache, telemetry
from switchboard.codec import MARK, Codec
from switchboard.state import open_store
from switchboard.telemetry import Recorder
from tests.harness import wait_for
from tests.test_payload_encryption import K1, K2, sealed_platform  # noqa: F401 (a fixture)

CACHED = {"ttl_s": 600}


@pytest.fixture
def recorder():
    plugin = telemetry.install(Recorder())
    yield plugin
    telemetry.uninstall(plugin)


async def counting_agent(platform, name: str = "cache-agent") -> dict[str, list]:
    """An agent whose handlers record each call (capability → payloads) and return what they were given."""
    calls: dict[str, list] = {}
    agent = Agent(name, settings=platform.settings, concurrency=4)

    def handler(capability):
        async def handle(task):
            calls.setdefault(capability, []).append(task.payload)
            return {"capability": capability, "payload": task.payload, "inputs": task.inputs}
        return handle

    for capability in ("summarize", "translate", "source", "after"):
        agent.handler(capability)(handler(capability))
    await platform.add_agent(agent)
    return calls


async def run(platform, *tasks: dict) -> dict:
    view = await platform.wait(await platform.submit({"tasks": list(tasks)}))
    assert view["status"] == "succeeded", view
    return view


def task(view: dict, task_id: str) -> dict:
    return next(t for t in view["tasks"] if t["id"] == task_id)


def lookups(recorder: Recorder) -> list[tuple[str, str]]:
    return [(e["capability"], e["outcome"]) for e in recorder.named("cache.looked_up")]


async def test_a_second_workflow_takes_the_first_ones_result_without_running_it(platform, recorder):
    calls = await counting_agent(platform)
    first = await run(platform, {"id": "s", "capability": "summarize", "payload": {"text": "hello"}, "cache": CACHED})
    second = await run(platform, {"id": "s2", "capability": "summarize", "payload": {"text": "hello"}, "cache": CACHED})
    assert calls["summarize"] == [{"text": "hello"}]  # the second was not run
    ran, took = task(first, "s"), task(second, "s2")
    assert took["result"] == ran["result"] and second["result"] == {"s2": ran["result"]}
    assert took["cached"] == {"workflow_id": first["workflow_id"], "task_id": "s", "at": took["cached"]["at"]}
    assert took["attempts"] == 0 and took["ran_on"] is None and took["status"] == "succeeded"
    assert ran["cached"] is None

    other = await run(platform, {"id": "s", "capability": "summarize", "payload": {"text": "bye"}, "cache": CACHED})
    assert task(other, "s")["cached"] is None and calls["summarize"] == [{"text": "hello"}, {"text": "bye"}]
    uncached = await run(platform, {"id": "s", "capability": "summarize", "payload": {"text": "hello"}})
    assert task(uncached, "s")["cached"] is None and len(calls["summarize"]) == 3  # no policy: it runs

    assert lookups(recorder) == [("summarize", "miss"), ("summarize", "hit"), ("summarize", "miss")]
    text = generate_latest(REGISTRY).decode()
    assert 'switchboard_cache_lookups_total{capability="summarize",outcome="hit"}' in text
    assert 'switchboard_cache_lookups_total{capability="summarize",outcome="miss"}' in text


async def test_a_key_of_its_own_shares_across_payloads_of_one_capability(platform):
    calls = await counting_agent(platform)
    policy = {"ttl_s": 600, "key": "daily-report"}
    first = await run(platform, {"id": "r", "capability": "summarize", "payload": {"day": 1}, "cache": policy})
    second = await run(platform, {"id": "r", "capability": "summarize", "payload": {"day": 2}, "cache": policy})
    assert calls["summarize"] == [{"day": 1}]
    assert task(second, "r")["result"] == task(first, "r")["result"]
    assert task(second, "r")["cached"]["workflow_id"] == first["workflow_id"]
    # The same key of another capability is another entry.
    other = await run(platform, {"id": "r", "capability": "translate", "payload": {"day": 1}, "cache": policy})
    assert task(other, "r")["cached"] is None and calls["translate"] == [{"day": 1}]


async def test_parents_results_are_in_the_key_and_dependents_get_the_cached_result(platform):
    calls = await counting_agent(platform)

    def spec(value):
        return [{"id": "a", "capability": "source", "payload": {"v": value}, "cache": CACHED},
                {"id": "b", "capability": "summarize", "depends_on": ["a"], "cache": CACHED},
                {"id": "c", "capability": "after", "depends_on": ["b"]}]

    first = await run(platform, *spec(1))
    again = await run(platform, *spec(1))  # a root and a released task, both cached
    assert [len(calls[c]) for c in ("source", "summarize", "after")] == [1, 1, 2]
    assert task(again, "a")["cached"]["workflow_id"] == first["workflow_id"]
    assert task(again, "b")["cached"] == {"workflow_id": first["workflow_id"], "task_id": "b",
                                          "at": task(again, "b")["cached"]["at"]}
    assert task(again, "c")["result"]["inputs"] == {"b": task(first, "b")["result"]}  # the cached result
    changed = await run(platform, *spec(2))  # a's result differs, so b's key does
    assert task(changed, "a")["cached"] is None and task(changed, "b")["cached"] is None
    assert [len(calls[c]) for c in ("source", "summarize", "after")] == [2, 2, 3]
    assert task(changed, "b")["result"]["inputs"] == {"a": task(changed, "a")["result"]}


async def test_an_expired_result_runs_again_and_the_sweep_drops_expired_entries(platform, recorder):
    calls = await counting_agent(platform)
    workflows = platform.services["api"].workflows
    short = {"ttl_s": 0.2}
    first = await run(platform, {"id": "t", "capability": "summarize", "payload": {"q": 1}, "cache": short})
    entry = await workflows.cache_entry(first["workflow_id"], "t")
    assert entry["workflow_id"] == first["workflow_id"] and entry["expires"] == entry["at"] + 0.2
    await wait_for(lambda: time.time() > entry["expires"], what="the cache entry to expire")
    second = await run(platform, {"id": "t", "capability": "summarize", "payload": {"q": 1}, "cache": short})
    assert task(second, "t")["cached"] is None and len(calls["summarize"]) == 2
    assert lookups(recorder) == [("summarize", "miss"), ("summarize", "expired")]

    renewed = await workflows.cache_entry(second["workflow_id"], "t")
    assert renewed["workflow_id"] == second["workflow_id"]  # the run that replaced it
    # The coordinator's watchdog sweeps every second: the expired entry goes without another lookup.
    async def dropped():
        return await workflows.cache_entry(second["workflow_id"], "t") is None

    await wait_for(dropped, timeout=15, what="the coordinator's sweep to drop the expired entry")
    assert await workflows.expire_cache() == 0


async def test_the_cache_is_bounded_and_evicts_the_entries_nearest_expiry(settings, monkeypatch):
    monkeypatch.setattr(cache, "MAX_ENTRIES", 3)
    monkeypatch.setattr(cache, "MAX_BYTES", 1_000)
    store = open_store(settings.store_url)
    ns = settings.namespace

    def put(key, ttl_s, result="x"):
        return lambda tr: cache.put(tr, ns, key, result=result, workflow_id="w", task_id=key, capability="c",
                                    ttl_s=ttl_s, now=time.time())

    def held(tr):
        return {k: cache.entry(tr, ns, k) is not None for k in "abcdef"}, cache.size(tr, ns)

    try:
        assert await store.transact(put("e", -1)) and await store.transact(put("a", 30))
        assert await store.transact(lambda tr: cache.expire(tr, ns, now=time.time())) == 1  # e alone
        present, size = await store.read(held)
        assert {k for k, v in present.items() if v} == {"a"} and size == {"entries": 1, "bytes": 3}
        assert await store.transact(lambda tr: cache.expire(tr, ns, now=time.time())) == 0
        for key, ttl in (("a", 30), ("b", 10), ("c", 20)):
            assert await store.transact(put(key, ttl))
        assert await store.transact(put("d", 40))  # full: b, nearest its expiry, goes
        present, size = await store.read(held)
        assert {k for k, v in present.items() if v} == {"a", "c", "d"} and size["entries"] == 3
        assert await store.transact(put("a", 50, "y"))  # a key written again replaces its entry
        assert (await store.read(held))[1]["entries"] == 3
        assert not await store.transact(put("e", 60, "z" * 2_000))  # larger than the whole cache
        assert await store.transact(put("f", 60, "z" * 998))  # 1,000 bytes: the room of every older entry
        present, size = await store.read(held)
        assert {k for k, v in present.items() if v} == {"f"} and size == {"entries": 1, "bytes": 1_000}
    finally:
        await store.close()


async def test_sealed_payloads_are_hashed_before_sealing_and_cached_results_are_resealed(sealed_platform):  # noqa: F811
    services, api = sealed_platform
    calls = await counting_agent(api, name="vault-cache")
    payload = {"secret": "hunter2"}
    spec = {"tasks": [{"id": "s", "capability": "summarize", "payload": payload, "cache": CACHED}]}
    first = await api.wait(await api.submit(spec))
    second = await api.wait(await api.submit(spec))  # sealed afresh: other ciphertext, the same key
    assert first["status"] == second["status"] == "succeeded"
    assert calls["summarize"] == [payload] and task(second, "s")["cached"]["workflow_id"] == first["workflow_id"]

    def digest(tr):
        raw = tr.get(api.services["api"].workflows._task_key(first["workflow_id"], "s"))
        return orjson.loads(raw)["cache_payload"]

    # Keyed by the sealing key: a reader of the store cannot confirm a guessed payload by hashing it.
    stored = await api.services["api"].workflows.store.read(digest)
    assert stored != hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()

    # A key rotation seals cached results again too, so a hit still opens once the old key is gone.
    workflows = api.services["api"].workflows
    assert (await workflows.cache_entry(first["workflow_id"], "s"))["result"][MARK]["kid"] == "k1"
    await workflows.reseal(Codec.from_setting(f"{K2},{K1}"))
    assert (await workflows.cache_entry(first["workflow_id"], "s"))["result"][MARK]["kid"] == "k2"
