"""Failure handling a user can see and steer: retries with backoff, the timeout watchdog, the
dead-letter queue and replay, stop-all / pause / resume, circuit breakers."""

from __future__ import annotations

import aio_pika
import pytest

from switchboard import Agent, TaskError
from switchboard.protocol import Envelope, MessageType
from switchboard.workflows import backoff_s
from tests.harness import Platform, wait_for


def test_backoff_is_capped_exponential_with_full_jitter():
    retry = {"base_s": 1.0, "max_s": 5.0}
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)):
        delays = [backoff_s(retry, attempt) for _ in range(500)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2  # spread, not fixed


class Switch:
    """An agent whose handler fails while `failing` is set, recording every call."""

    def __init__(self, platform: Platform, name: str, capability: str, *, failing=True, retryable=True):
        self.failing, self.calls = failing, []
        self.agent = Agent(name, settings=platform.settings)

        @self.agent.handler(capability)
        async def run(task):
            self.calls.append((task.task_id, task.attempt))
            if self.failing:
                raise TaskError(f"failing on attempt {task.attempt}", retryable=retryable)
            return {"ok": task.task_id, "inputs": sorted(task.inputs)}


async def get(platform, path, **params):
    return (await platform.client.get(path, params=params)).json()


async def test_retries_back_off_and_record_each_attempt(platform):
    switch = Switch(platform, "flaky", "flaky")
    original = switch.agent.handlers["flaky"]

    async def fail_twice(task):
        switch.failing = task.attempt < 3
        return await original(task)

    switch.agent.handlers["flaky"] = fail_twice
    await platform.add_agent(switch.agent)
    wf = await platform.submit({"tasks": [{"id": "t", "capability": "flaky", "max_attempts": 5,
                                           "retry": {"base_s": 0.3, "max_s": 0.3}}]})
    view = await platform.wait(wf)
    task = view["tasks"][0]
    assert view["status"] == "succeeded" and task["attempts"] == 3
    assert [(e["attempt"], e["message"]) for e in task["errors"]] == [(1, "failing on attempt 1"),
                                                                    (2, "failing on attempt 2")]
    assert switch.calls == [("t", 1), ("t", 2), ("t", 3)]


async def test_the_watchdog_fails_an_attempt_whose_agent_went_silent(amqp_url, redis_url, tmp_path):
    from tests.harness import make_settings

    platform = Platform(make_settings(amqp_url, redis_url, tmp_path / "s.sqlite3", watchdog_grace_s=0.5))
    try:
        await platform.start()
        wf = await platform.submit({"tasks": [{"id": "t", "capability": "silent", "timeout_s": 0.5,
                                               "retry": {"base_s": 0, "max_s": 0}}]})
        bus = platform.services["api"].bus
        # Play an agent that takes attempt 1 and then vanishes without a word.
        await bus.publish(Envelope(type=MessageType.STATUS, subject="started", source="ghost", workflow_id=wf,
                                   task_id="t", attempt=1), bus.topology.results)

        async def retried() -> bool:
            task = (await get(platform, f"/v1/workflows/{wf}"))["tasks"][0]
            return task["status"] == "queued" and len(task["errors"]) == 1

        await wait_for(retried, what="the watchdog to fail attempt 1")
        task = (await get(platform, f"/v1/workflows/{wf}"))["tasks"][0]
        assert task["errors"][0]["type"] == "DeadlineExceeded" and task["ran_on"] == "ghost"
        await bus.publish(Envelope(type=MessageType.RESULT, source="ghost-2", workflow_id=wf, task_id="t",
                                   attempt=2, payload={"result": "late but fine"}), bus.topology.results)
        view = await platform.wait(wf)
        assert view["tasks"][0]["result"] == "late but fine" and view["tasks"][0]["attempts"] == 2
    finally:
        await platform.close()


async def test_an_exhausted_task_is_dead_lettered_and_replay_resumes_its_workflow(platform):
    switch = Switch(platform, "switch-agent", "switchy")
    await platform.add_agent(switch.agent)
    spec = {"tasks": [{"id": "a", "capability": "switchy", "max_attempts": 2, "retry": {"base_s": 0.01}},
                      {"id": "b", "capability": "switchy", "depends_on": ["a"]},
                      {"id": "side", "capability": "switchy", "payload": {}, "depends_on": ["a"]}]}
    wf = await platform.submit(spec)
    view = await platform.wait(wf)
    assert view["status"] == "failed"
    letters = (await get(platform, "/v1/dlq", workflow_id=wf))["dead_letters"]
    assert len(letters) == 1
    letter = letters[0]
    assert letter["reason"] == "attempts exhausted (2 of 2)" and letter["capability"] == "switchy"
    assert letter["attempts"] == 2 and [e["attempt"] for e in letter["errors"]] == [1, 2]
    assert (await get(platform, f"/v1/dlq/{letter['id']}"))["task_id"] == "a"
    assert (await get(platform, "/v1/dlq", capability="other"))["dead_letters"] == []
    assert (await get(platform, "/v1/dlq", reason="EXHAUSTED"))["dead_letters"][0]["id"] == letter["id"]

    switch.failing = False  # the operator fixed the cause
    replayed = await platform.client.post(f"/v1/dlq/{letter['id']}/replay")
    assert replayed.status_code == 200 and replayed.json()["status"] == "replayed"
    view = await platform.wait(wf)
    assert view["status"] == "succeeded"
    tasks = {t["id"]: t for t in view["tasks"]}
    assert tasks["b"]["result"] == {"ok": "b", "inputs": ["a"]} and tasks["a"]["attempts"] == 1
    again = await platform.client.post(f"/v1/dlq/{letter['id']}/replay")
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_replayable"
    assert (await platform.client.delete(f"/v1/dlq/{letter['id']}")).status_code == 204
    assert (await platform.client.get(f"/v1/dlq/{letter['id']}")).status_code == 404
    assert (await platform.client.post("/v1/dlq/nope/replay")).status_code == 404


async def test_replay_by_filter(platform):
    switch = Switch(platform, "bulk-agent", "bulk", retryable=False)
    await platform.add_agent(switch.agent)
    wfs = [await platform.submit({"tasks": [{"id": f"t{i}", "capability": "bulk"}]}) for i in range(3)]
    for wf in wfs:
        assert (await platform.wait(wf))["status"] == "failed"
    letters = (await get(platform, "/v1/dlq", capability="bulk"))["dead_letters"]
    assert len(letters) == 3 and {d["reason"] for d in letters} == {"non-retryable error"}
    switch.failing = False
    response = await platform.client.post("/v1/dlq/replay", json={"capability": "bulk", "rate_per_s": 50})
    assert response.status_code == 202 and response.json()["matched"] == 3

    async def all_replayed() -> bool:
        return len((await get(platform, "/v1/dlq", status="replayed"))["dead_letters"]) == 3

    await wait_for(all_replayed, what="the replayer to replay all three")
    for wf in wfs:
        assert (await platform.wait(wf))["status"] == "succeeded"


async def test_a_task_no_agent_takes_in_time_is_dead_lettered(amqp_url, redis_url, tmp_path):
    from tests.harness import make_settings

    platform = Platform(make_settings(amqp_url, redis_url, tmp_path / "s.sqlite3", unroutable_after_s=0.5))
    try:
        await platform.start()
        wf = await platform.submit({"tasks": [{"id": "lonely", "capability": "nobody"},
                                              {"id": "next", "capability": "nobody", "depends_on": ["lonely"]}]})
        view = await platform.wait(wf)
        assert view["status"] == "failed"
        lonely = next(t for t in view["tasks"] if t["id"] == "lonely")
        assert lonely["status"] == "failed" and lonely["error"]["type"] == "Undeliverable"
        [letter] = (await get(platform, "/v1/dlq", workflow_id=wf))["dead_letters"]
        assert "no live agent took it within 0.5s" in letter["reason"] and letter["capability"] == "nobody"
        platform._queues.add(platform.topology.hold_queue("nobody"))
    finally:
        await platform.close()


async def queue_depth(settings, name: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        queue = await (await connection.channel()).declare_queue(name, passive=True)
        return queue.declaration_result.message_count
    finally:
        await connection.close()


async def test_stop_all_halts_dispatch_and_agents_and_survives_a_restart(platform):
    switch = Switch(platform, "steady", "steady", failing=False)
    await platform.add_agent(switch.agent)
    stopped = await platform.client.post("/v1/control/stop-all")
    assert stopped.status_code == 200 and stopped.json()["stopped"] is True
    await wait_for(lambda: not switch.agent._tasks.consuming, what="the agent to stop taking work")
    wf = await platform.submit({"tasks": [{"id": "t", "capability": "steady"}]})
    await wait_for(lambda: _depth_at_least(platform, platform.topology.dispatch, 1), what="task held in dispatch")
    assert (await get(platform, f"/v1/workflows/{wf}"))["tasks"][0]["status"] == "queued"

    # Every service restarts: the stop is still on, and a new agent learns it before taking work.
    await platform.stop_agent(switch.agent)
    for service in list(platform.services.values()):
        await service.stop()
    await platform.start()
    assert (await get(platform, "/v1/control"))["stopped"] is True
    late = Switch(platform, "late", "steady", failing=False)
    await platform.add_agent(late.agent)
    assert not late.agent._tasks.consuming

    resumed = await platform.client.post("/v1/control/resume")
    assert resumed.json() == {"stopped": False, "paused": False, "paused_capabilities": []}
    assert (await platform.wait(wf))["status"] == "succeeded"
    assert late.calls == [("t", 1)] and switch.calls == []


async def _depth_at_least(platform, queue, n) -> bool:
    return await queue_depth(platform.settings, queue) >= n


async def test_pausing_a_capability_holds_its_tasks_with_a_reason(platform):
    switch = Switch(platform, "pausable", "pausable", failing=False)
    await platform.add_agent(switch.agent)
    paused = await platform.client.post("/v1/control/pause", json={"capability": "pausable"})
    assert paused.json()["paused_capabilities"] == ["pausable"]
    wf = await platform.submit({"tasks": [{"id": "t", "capability": "pausable"}]})

    async def reason_shown() -> bool:
        return "'pausable' is paused" in ((await get(platform, f"/v1/workflows/{wf}"))["tasks"][0]["reason"] or "")

    await wait_for(reason_shown, what="the paused reason")
    assert switch.calls == []
    await platform.client.post("/v1/control/resume", json={"capability": "pausable"})
    assert (await platform.wait(wf))["status"] == "succeeded"
    platform._queues.add(platform.topology.paused_queue("pausable"))


@pytest.fixture
async def breaker_platform(amqp_url, redis_url, tmp_path):
    from tests.harness import make_settings

    platform = Platform(make_settings(amqp_url, redis_url, tmp_path / "s.sqlite3", breaker_fail_max=3,
                                      breaker_reset_s=1.0))
    try:
        await platform.start()
        yield platform
    finally:
        await platform.close()


async def test_a_circuit_breaker_opens_on_failures_and_a_probe_closes_it(breaker_platform):
    platform = breaker_platform
    switch = Switch(platform, "breaky", "breaky")
    await platform.add_agent(switch.agent)
    failing = [await platform.submit({"tasks": [{"id": "f", "capability": "breaky", "max_attempts": 1}]})
               for _ in range(3)]
    for wf in failing:
        assert (await platform.wait(wf))["status"] == "failed"

    async def breaker(name_kind: str) -> dict:
        body = await get(platform, "/v1/agents")
        if name_kind == "cap":
            return body["capabilities"]["breaky"]["breaker"]
        return next(a for a in body["agents"] if a["name"] == "breaky")["breaker"]

    assert (await breaker("cap"))["state"] == "open"
    assert (await breaker("agent"))["state"] == "open"
    switch.failing = False
    wf = await platform.submit({"tasks": [{"id": "probe", "capability": "breaky"}]})
    view = await platform.wait(wf)  # waits out the reset timeout, then runs as the probe
    assert view["status"] == "succeeded"
    await wait_for(lambda: _closed(platform), what="the breaker to close")
    platform._queues.add(platform.topology.paused_queue("breaky"))


async def _closed(platform) -> bool:
    body = (await platform.client.get("/v1/agents")).json()
    return body["capabilities"]["breaky"]["breaker"]["state"] == "closed"
