"""The telemetry seam: hooks chain in order, events reach their listeners, and a workflow's life shows
up as events and as metrics whose labels carry no ids."""

from __future__ import annotations

import re

import pytest
from prometheus_client import REGISTRY, generate_latest

from switchboard import Agent, TaskError, telemetry
from switchboard.telemetry import Plugin, Recorder
from tests.harness import wait_for


class Tagger(Plugin):
    def __init__(self, name: str, trail: list):
        self.name, self.trail = name, trail

    async def publish(self, message, call_next):
        self.trail.append(f"{self.name} in")
        try:
            return await call_next()
        finally:
            self.trail.append(f"{self.name} out")

    def on_task_finished(self, capability, outcome):
        self.trail.append(f"{self.name} saw {capability} {outcome}")


@pytest.fixture
def installed():
    plugins = []

    def add(plugin):
        plugins.append(telemetry.install(plugin))
        return plugin

    yield add
    for plugin in plugins:
        telemetry.uninstall(plugin)


async def test_hooks_wrap_in_install_order_and_events_reach_listeners(installed):
    trail: list[str] = []
    installed(Tagger("outer", trail))
    installed(Tagger("inner", trail))

    async def publish():
        trail.append("publish")
        return 42

    result = await telemetry.publishing(telemetry.Published("q", "cap", {}), publish)
    assert result == 42 and trail == ["outer in", "inner in", "publish", "inner out", "outer out"]
    trail.clear()
    telemetry.emit("task.finished", capability="c", outcome="failed")
    assert trail == ["outer saw c failed", "inner saw c failed"]
    trail.clear()
    assert await telemetry.batching(telemetry.Batch("b", []), publish) == 42  # no plug-in wraps batches here
    assert trail == ["publish"]


def test_a_plugin_method_naming_no_event_is_refused():
    class Typo(Plugin):
        def on_task_finshed(self, **fields):
            pass

    with pytest.raises(ValueError, match="on_task_finshed"):
        telemetry.install(Typo())
    assert telemetry.installed(Typo) is None


async def test_a_workflow_life_as_events_and_id_free_metrics(platform, installed):
    recorder = installed(Recorder())
    agent = Agent("telemetry-agent", settings=platform.settings)

    @agent.handler("flaky")
    async def flaky(task):
        if task.attempt == 1:
            raise TaskError("first attempt fails")
        return {"ok": True}

    @agent.handler("never")
    async def never(task):
        raise TaskError("no", retryable=False)

    await platform.add_agent(agent)
    quick = {"base_s": 0.01, "max_s": 0.01}
    ok = await platform.submit({"tasks": [{"id": "a", "capability": "flaky", "priority": "HIGH", "retry": quick},
                                          {"id": "b", "capability": "flaky", "depends_on": ["a"], "retry": quick}]})
    bad = await platform.submit({"tasks": [{"id": "x", "capability": "never"},
                                           {"id": "y", "capability": "flaky", "depends_on": ["x"]}]})
    assert (await platform.wait(ok))["status"] == "succeeded"
    assert (await platform.wait(bad))["status"] == "failed"

    def finished():
        return sorted((e["capability"], e["outcome"]) for e in recorder.named("task.finished"))

    expected = sorted([("flaky", "retried"), ("flaky", "succeeded")] * 2 + [("never", "failed"),
                                                                             ("flaky", "cancelled")])
    await wait_for(lambda: finished() == expected, what="every attempt's outcome", on_timeout=lambda: str(finished()))
    assert sorted((e["capability"], e["priority"]) for e in recorder.named("task.submitted")) == [
        ("flaky", "HIGH"), ("flaky", "NORMAL"), ("flaky", "NORMAL"), ("never", "NORMAL")]
    started = recorder.named("task.started")
    assert len(started) == 5 and all(e["agent"] == "telemetry-agent" and e["queue_wait_s"] >= 0 for e in started)
    assert sorted(e["status"] for e in recorder.named("workflow.finished")) == ["failed", "succeeded"]
    kinds = {e["kind"] for e in recorder.named("message.consumed")}
    assert {"cap", "results"} <= kinds and all(re.fullmatch(r"[a-z]+", k) for k in kinds)
    assert all(e["outcome"] == "ok" for e in recorder.named("message.consumed"))
    assert {e["operation"] for e in recorder.named("store.transaction")} >= {"create", "record"}

    text = generate_latest(REGISTRY).decode()
    assert 'switchboard_tasks_finished_total{capability="never",outcome="failed"}' in text
    assert 'switchboard_workflows_finished_total{status="succeeded"}' in text
    label_values = set(re.findall(r'="([^"]*)"', "\n".join(l for l in text.splitlines() if l.startswith("switchboard_"))))
    ids = {ok, bad, platform.settings.namespace, agent.reply_queue}
    leaked = {v for v in label_values if any(i in v for i in ids) or re.fullmatch(r"[0-9a-f]{26}", v)}
    assert not leaked, f"ids in metric labels: {leaked}"


def test_metrics_can_be_asked_for_by_name():
    from switchboard.telemetry.metrics import exposition

    telemetry.emit("task.submitted", capability="named", priority="LOW")
    text = exposition("name[]=switchboard_tasks_submitted_total").decode()
    assert 'switchboard_tasks_submitted_total{capability="named",priority="LOW"}' in text
    assert "switchboard_task_run_seconds" not in text and "process_cpu" not in text
    assert "switchboard_task_run_seconds" in exposition().decode()


def test_cache_lookups_and_reported_usage_are_counted_by_capability():
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (value("switchboard_cache_lookups_total", capability="counted", outcome="hit"),
              value("switchboard_usage_tokens_total", capability="counted"),
              value("switchboard_usage_cost_total", capability="counted"))
    telemetry.emit("cache.looked_up", capability="counted", outcome="hit")
    telemetry.emit("usage.reported", capability="counted", tokens=12, cost=0.25)
    telemetry.emit("usage.reported", capability="counted", tokens=3, cost=0.0)
    after = (value("switchboard_cache_lookups_total", capability="counted", outcome="hit"),
             value("switchboard_usage_tokens_total", capability="counted"),
             value("switchboard_usage_cost_total", capability="counted"))
    assert [a - b for a, b in zip(after, before)] == [1.0, 15.0, 0.25]


def test_store_writes_are_counted_by_operation():
    def value(name, operation):
        return REGISTRY.get_sample_value(name, {"operation": operation}) or 0.0

    names = ("switchboard_store_write_transactions_total", "switchboard_store_written_keys_total",
             "switchboard_store_written_bytes_total", "switchboard_store_read_conflict_ranges_total")
    before = [value(name, "countme") for name in names]
    telemetry.emit("store.transaction", operation="countme", seconds=0.001, conflicts=0, reads=3, writes=2,
                   written_bytes=40)
    telemetry.emit("store.transaction", operation="countme", seconds=0.001, conflicts=0, reads=5, writes=0,
                   written_bytes=0)  # read-only: no commit to count, no conflict ranges checked
    assert [value(name, "countme") - b for name, b in zip(names, before)] == [1.0, 2.0, 40.0, 3.0]
    assert REGISTRY.get_sample_value("switchboard_store_transaction_seconds_count", {"operation": "countme"}) == 2
