"""Traces, as Jaeger would receive them: every service in its own process exports OTLP/HTTP to a receiver
in this test, which decodes the real protobuf. One workflow submission must be one connected trace."""

from __future__ import annotations

import asyncio
import collections
import logging
import signal

import httpx
import orjson
import pytest

from switchboard import telemetry
from switchboard.protocol import Envelope, MessageType
from switchboard.telemetry import TaskRun, logs
from tests.harness import service_processes, wait_for, wait_processes_ready
from tests.otlp import OtlpReceiver

# a fans out to b (routed to a named agent, so through the dispatcher) and to plan, which delegates a child
# workflow and a single task; c fans in.
FAN_OUT_FAN_IN = {"name": "traced", "tasks": [
    {"id": "a", "capability": "echo"},
    {"id": "b", "capability": "echo", "agent": "echo-agent", "depends_on": ["a"]},
    {"id": "plan", "capability": "plan", "payload": {"goal": "g", "steps": ["x", "y"]}, "depends_on": ["a"]},
    {"id": "c", "capability": "echo", "depends_on": ["b", "plan"]},
]}


@pytest.fixture
async def receiver():
    receiver = await OtlpReceiver().start()
    yield receiver
    await receiver.close()


async def test_a_workflow_is_one_connected_trace_across_processes(settings, receiver):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    ns = settings.namespace
    async with service_processes(settings, env) as (procs, ports):
        async with httpx.AsyncClient(timeout=30) as client:
            await wait_processes_ready(client, settings, ports)
            api = f"http://127.0.0.1:{settings.api_port}"
            wf_id = (await client.post(f"{api}/v1/workflows", json=FAN_OUT_FAN_IN)).json()["workflow_id"]
            view = (await client.get(f"{api}/v1/workflows/{wf_id}", params={"wait": 60})).json()
            assert view["status"] == "succeeded", view

            def the_trace():
                roots = [s for s in receiver.spans if s.name == "POST /v1/workflows"]
                if not roots:
                    return None
                spans = receiver.trace(roots[0].trace_id)
                runs = collections.Counter(s.name for s in spans if s.name.startswith("run "))
                # a, b, c, plan; plan's child: research-0, research-1, write; then the delegated sleep
                done = runs == {"run echo": 6, "run plan": 1, "run sleep": 1}
                return spans if done and sum(s.name == "release" for s in spans) >= 4 else None

            spans = await wait_for(the_trace, timeout=30, what="the workflow's spans at the receiver",
                                   on_timeout=lambda: str(collections.Counter(s.name for s in receiver.spans)))
        for proc in procs.values():  # each process exports what it still holds as it stops
            proc.send_signal(signal.SIGTERM)
        outputs = {name: (await asyncio.wait_for(proc.communicate(), 60))[0] for name, proc in procs.items()}
    spans = receiver.trace(spans[0].trace_id)

    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_id]
    assert [r.name for r in roots] == ["POST /v1/workflows"] and roots[0].kind == "SERVER"
    assert [s.kind for s in spans].count("SERVER") == 1  # FastAPI's own tracing stays off: one span per request
    orphans = [(s.name, s.service) for s in spans if s.parent_id and s.parent_id not in by_id]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    assert {s.service for s in spans} == {"api", "coordinator", "dispatcher", "aggregator", "agents"}

    def parent(span):
        return by_id[span.parent_id]

    for span in spans:
        if span.name.startswith("publish "):
            assert span.kind == "PRODUCER", span
        if span.name.startswith("process "):
            assert span.kind == "CONSUMER", span
            assert parent(span).name == "publish " + span.name.removeprefix("process "), span
        if span.kind in ("PRODUCER", "CONSUMER"):
            assert span.attributes["messaging.system"] == "rabbitmq"
            assert span.attributes["messaging.destination.name"] and span.attributes["messaging.message.id"]
        if span.name.startswith("run "):
            assert parent(span).name == f"process {ns}.cap.{span.name[4:]}" or (
                parent(span).name == f"process {ns}.agent.echo-agent"), span
            assert span.attributes["switchboard.attempt"] == 1
            assert span.attributes["switchboard.agent"] and span.attributes["switchboard.outcome"] == "succeeded"
            assert span.attributes["switchboard.capability"] == span.name[4:]
        if span.name == "record":
            assert parent(span).name == f"process {ns}.results" and span.service == "aggregator"
        if span.name == "release":
            assert parent(span).name == "record" and span.service == "coordinator"

    # Each task's dispatch, its run, the recording of its result and the release of its dependents.
    tasks = {(s.attributes["switchboard.workflow_id"], s.attributes["switchboard.task_id"])
             for s in spans if s.name.startswith("run ")}
    assert len(tasks) == 8 and all(w == wf_id for w, t in tasks if t in ("a", "b", "c", "plan"))
    names = collections.Counter(s.name for s in spans)
    assert names[f"publish {ns}.agent.echo-agent"] == 1  # b, routed by the dispatcher
    assert names["record"] >= 8 and names["release"] >= 4  # a, plan, research-0, research-1 release others

    # The delegated child workflows' spans descend from the delegating task's run span.
    def ancestors(span):
        while span.parent_id:
            span = parent(span)
            yield span

    run_plan = next(s for s in spans if s.name == "run plan")
    children = [s for s in spans if s.name.startswith("run ") and s.attributes["switchboard.workflow_id"] != wf_id]
    assert len(children) == 4 and all(run_plan in ancestors(s) for s in children)

    # The aggregator's batch spans link each message's context.
    batches = [s for s in receiver.spans if s.name == "record batch"]
    linked = {span_id for batch in batches for _, span_id in batch.links}
    assert {s.parent_id for s in spans if s.name == "record"} <= linked

    for name, output in outputs.items():  # logs and traces meet: log lines carry ids, never bodies
        lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]
        assert lines and all(line["service"] == ("agents" if name == "agents" else name) for line in lines)


async def test_tracing_is_off_without_an_endpoint(monkeypatch):
    from switchboard.telemetry import tracing

    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert not tracing.enabled()
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.enabled({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.enabled({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert tracing.configure("api", {}) is None and telemetry.installed(tracing.Tracing) is None
    with pytest.raises(ValueError, match="use otlp, console or none"):
        tracing._exporter("zipkin", {})


async def test_log_lines_carry_trace_and_workflow_ids():
    from opentelemetry.sdk.trace import TracerProvider

    from switchboard.telemetry.tracing import Tracing

    plugin = telemetry.install(Tracing(TracerProvider()))
    formatter = logs.JsonFormatter("agents")
    lines = []

    async def handler():
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "working", None, None)
        lines.append(orjson.loads(formatter.format(record)))

    try:
        env = Envelope(type=MessageType.TASK, workflow_id="wf1", task_id="t1", attempt=1, payload={"capability": "c"})
        await telemetry.running(TaskRun(env, "c", "agent-1"), handler)
    finally:
        telemetry.uninstall(plugin)
    [line] = lines
    assert line["workflow_id"] == "wf1" and line["task_id"] == "t1" and line["service"] == "agents"
    assert len(line["trace_id"]) == 32 and len(line["span_id"]) == 16
    assert "payload" not in line


async def test_a_sampled_out_trace_is_passed_on_without_spans():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from switchboard.telemetry.tracing import Tracing

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    plugin = telemetry.install(Tracing(provider))
    unsampled, sampled = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"

    async def nothing():
        return None

    try:
        env = Envelope(type=MessageType.TASK, workflow_id="w", task_id="t", traceparent=unsampled)
        headers: dict = {}
        await telemetry.publishing(telemetry.Published("sb.cap.c", "cap", headers, env), nothing)
        assert headers == {"traceparent": unsampled} and not exported.get_finished_spans()
        env.traceparent = sampled
        await telemetry.publishing(telemetry.Published("sb.cap.c", "cap", headers := {}, env), nothing)
        [span] = exported.get_finished_spans()
        assert span.name == "publish sb.cap.c" and headers["traceparent"].split("-")[1] == "ab" * 16
    finally:
        telemetry.uninstall(plugin)
