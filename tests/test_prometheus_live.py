"""The monitoring stack against a live platform: every service and the example agents in processes of
their own, a workload that makes the contract's metrics exist, and a real Prometheus (Debian's
/usr/bin/prometheus; CI installs it with apt-get) scraping them every second with the repo's scrape
convention and loading the repo's rules. Then every alert and recording rule of deploy/prometheus/rules
and every Prometheus query of the Grafana dashboards is evaluated through Prometheus's HTTP API:

- each expression parses;
- each metric it reads (recording rules stand for the metrics they read) has series in Prometheus,
  unless EXPECTED_EMPTY says why it cannot here;
- dashboard and recording-rule expressions return data (a sample that is not NaN), unless
  EXPECTED_EMPTY_EXPRESSIONS says why not; alerts are comparisons, empty while healthy, so they need
  only parse and read existing metrics;
- every contract metric exists with the label values the workload must have produced (CONTRACT);
- Prometheus evaluates every rule without error, and the alert whose condition the workload causes is
  active (pending: every `for:` is minutes long), while SwitchboardServiceDown is not.

Every problem goes into one assertion message, so a run lists all the offenders at once.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import warnings
from collections import defaultdict

import aio_pika
import httpx
import pytest
import yaml

from switchboard.topology import Topology
from tests.grafana_exprs import dashboard_expressions
from tests.harness import cleanup, free_port, service_processes, wait_for, wait_processes_ready
from tests.prometheus_rules import rule_expressions, rule_files, rules

PROMETHEUS = "/usr/bin/prometheus"
RABBITMQ_METRICS = "http://127.0.0.1:15692/metrics/per-object"
SERVICES = ("api", "coordinator", "dispatcher", "registry", "aggregator", "dlq_replayer", "agents")

pytestmark = pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK),
    reason=f"{PROMETHEUS} is missing: `apt-get install prometheus` (as .ci/run does) to run the live scrape test")

# Breakers open after two failures; a task nobody serves is dead-lettered ("undeliverable") after 1s.
ENV = {"SWITCHBOARD_BREAKER_FAIL_MAX": "2", "SWITCHBOARD_UNROUTABLE_AFTER_S": "1"}
FAST_RETRY = {"retry": {"base_s": 0.01, "max_s": 0.05}, "max_attempts": 2}
UNSERVED = "nobody-serves-this"

REDIS_EXPORTER = "no redis_exporter here: it runs beside Redis in compose/Kubernetes (job redis)"
# Metric families (a histogram by its name, without _bucket/_count/_sum) that cannot have series here.
EXPECTED_EMPTY = {
    "redis_up": REDIS_EXPORTER,
    "redis_memory_used_bytes": REDIS_EXPORTER,
    "redis_connected_clients": REDIS_EXPORTER,
    "redis_commands_processed_total": REDIS_EXPORTER,
}
# Dashboard or recording-rule expressions that may return nothing after this workload, even though
# every metric they read exists. (An expression reading an EXPECTED_EMPTY metric is excused anyway.)
EXPECTED_EMPTY_EXPRESSIONS = {
    'sum(rate(switchboard_http_request_duration_seconds_count{status=~"5.."}[1m]))':
        "the API's 5xx rate: sum() over no series is empty, and a healthy API serves no 5xx (nothing in "
        "the workload can make it fail without breaking it; a 503 from /readyz while it starts may show)",
}

HISTOGRAMS = {"switchboard_task_queue_wait_seconds", "switchboard_task_run_seconds",
              "switchboard_workflow_duration_seconds", "switchboard_store_transaction_seconds",
              "switchboard_http_request_duration_seconds"}
PRIORITIES = {"CRITICAL", "HIGH", "NORMAL", "LOW"}
REASONS = {"attempts_exhausted", "non_retryable", "undeliverable", "unparseable", "rejected", "expired", "forged",
           "other"}
# The telemetry contract, as the workload must leave it: metric -> {label: values that must all occur}.
# `service` is the scrape label of the process that exports it.
CONTRACT = {
    "switchboard_tasks_submitted_total": {"priority": PRIORITIES, "service": {"api", "coordinator"},
                                          "capability": {"echo", "sleep", "fail", "plan", UNSERVED}},
    "switchboard_tasks_started_total": {"capability": {"echo", "sleep", "fail", "plan"}, "service": {"agents"}},
    "switchboard_tasks_finished_total": {
        "outcome": {"succeeded", "failed", "retried", "dead_lettered", "cancelled", "timed_out"}},
    "switchboard_task_queue_wait_seconds_bucket": {"priority": PRIORITIES, "service": {"agents"}},
    "switchboard_task_run_seconds_bucket": {"capability": {"echo", "sleep", "fail", "plan"}, "service": {"agents"}},
    "switchboard_workflow_duration_seconds_bucket": {"status": {"succeeded", "failed", "cancelled"}},
    "switchboard_store_transaction_seconds_bucket": {
        "service": {"api", "coordinator", "dispatcher", "aggregator", "dlq_replayer"}},
    "switchboard_http_request_duration_seconds_bucket": {
        "route": {"/v1/workflows", "/v1/workflows/{workflow_id}", "/v1/workflows/{workflow_id}/cancel",
                  "/v1/tasks", "/v1/dlq/{dead_letter_id}/replay"},
        "status": {"200", "202", "400", "404"}, "service": {"api"}},
    "switchboard_workflows_finished_total": {"status": {"succeeded", "failed", "cancelled"}},
    "switchboard_workflows_in_flight": {"service": {"coordinator"}},
    "switchboard_tasks_queued": {"priority": PRIORITIES, "service": {"coordinator"}},
    "switchboard_dependencies_pending": {"service": {"coordinator"}},
    "switchboard_agents": {"status": {"alive", "lost"}, "service": {"registry"}},
    "switchboard_agent_tasks_in_flight": {"capability": {"echo", "sleep", "fail", "plan"}, "service": {"agents"}},
    "switchboard_breaker_open": {"breaker": {"cap:fail", "agent:fail-agent"}, "service": {"aggregator"}},
    "switchboard_breaker_transitions_total": {"breaker": {"cap:fail", "agent:fail-agent"}, "to": {"open"}},
    "switchboard_dead_letters": {"reason": REASONS, "service": {"dlq_replayer"}},
    "switchboard_dlq_replays_total": {"service": {"api"}},
    # Not "delay" (a retry's backoff is random, and short ones skip the delay queue), "paused" or "replay".
    "switchboard_messages_published_total": {
        "kind": {"dispatch", "cap", "agent", "hold", "results", "control", "reply", "dlq", "coordinator",
                 "registry", "events"}},
    # Not "hold" (its tasks expire: none is consumed from it) nor "paused", "delay" or "replay".
    "switchboard_messages_consumed_total": {
        "outcome": {"ok", "dead_lettered"},
        "kind": {"cap", "agent", "dispatch", "results", "dlq", "coordinator", "registry", "reply", "control",
                 "events"}},
    "switchboard_amqp_reconnects_total": {"service": set(SERVICES)},
    "switchboard_store_conflicts_total": {"service": set(SERVICES)},
    # A cached echo task in every round of successes(): a miss in the first, hits after.
    "switchboard_cache_lookups_total": {"outcome": {"miss", "hit"}, "capability": {"echo"}, "service": {"api"}},
    # Not switchboard_usage_tokens_total nor _cost_total: no example agent reports usage (tests/test_budgets.py).
    "process_cpu_seconds_total": {"service": set(SERVICES)},
    "process_resident_memory_bytes": {"service": set(SERVICES)},
}

KINDS = {"dispatch", "cap", "agent", "hold", "paused", "results", "delay", "control", "reply", "dlq",
         "coordinator", "registry", "replay", "events",  # events: the stream of changes (switchboard.stream)
         "topics", "sub"}  # pub-sub between agents: the exchange, and each agent name's queue
TASK_OUTCOMES = {"succeeded", "failed", "retried", "dead_lettered", "cancelled", "timed_out"}
WORKFLOW_STATUSES = {"succeeded", "failed", "cancelled", "budget_exceeded"}
# The contract's enumerations: a series with any other value breaks it.
ALLOWED = {
    "switchboard_tasks_submitted_total": {"priority": PRIORITIES},
    "switchboard_task_queue_wait_seconds_bucket": {"priority": PRIORITIES},
    "switchboard_tasks_queued": {"priority": PRIORITIES},
    "switchboard_tasks_finished_total": {"outcome": TASK_OUTCOMES},
    "switchboard_workflow_duration_seconds_bucket": {"status": WORKFLOW_STATUSES},
    "switchboard_workflows_finished_total": {"status": WORKFLOW_STATUSES},
    "switchboard_agents": {"status": {"alive", "lost"}},
    "switchboard_breaker_open": {"breaker": re.compile(r"(cap|agent):.+")},
    "switchboard_breaker_transitions_total": {"to": {"open", "half_open", "closed"},
                                              "breaker": re.compile(r"(cap|agent):.+")},
    "switchboard_dead_letters": {"reason": REASONS},
    "switchboard_messages_published_total": {"kind": KINDS},
    "switchboard_messages_consumed_total": {"kind": KINDS, "outcome": {"ok", "requeued", "dead_lettered", "dropped"}},
    "switchboard_cache_lookups_total": {"outcome": {"hit", "miss", "expired"}},
}
# Every label of every switchboard_* series ("never an id as a label").
LABELS = {"__name__", "job", "instance", "service", "capability", "priority", "outcome", "le", "status",
          "operation", "method", "route", "breaker", "to", "reason", "kind"}

# A fan-out/fan-in DAG: a fans out to b (routed to a named agent, so through the dispatcher), c and a
# planner that delegates a child workflow and a single task; join fans in. Three priorities.
DAG = {"name": "fan-out/fan-in", "tasks": [
    {"id": "a", "capability": "echo", "priority": "CRITICAL"},
    {"id": "b", "capability": "echo", "agent": "echo-agent", "depends_on": ["a"], "priority": "HIGH"},
    {"id": "c", "capability": "sleep", "payload": {"seconds": 0.05}, "depends_on": ["a"], "priority": "LOW"},
    {"id": "plan", "capability": "plan", "payload": {"goal": "g", "steps": ["x", "y"]}, "depends_on": ["a"]},
    {"id": "join", "capability": "echo", "depends_on": ["b", "c", "plan"]},
]}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
RANGE = re.compile(r"\[[^\]]*\]")
TOKEN = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
METRIC_PREFIXES = ("switchboard_", "rabbitmq_", "redis_", "process_", "python_")


def referenced_metrics(expr: str, recording: dict[str, str]) -> set[str]:
    """The metric names an expression reads; a recording rule's name stands for what its rule reads."""
    names: set[str] = set()
    for token in TOKEN.findall(RANGE.sub("", STRING.sub('""', expr))):
        if token in recording:
            names |= referenced_metrics(recording[token], recording)
        elif token == "up" or token.startswith(METRIC_PREFIXES) or ":" in token:
            names.add(token)  # a name with ":" that is no rule of ours is reported as missing
    return names


def family(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def has_data(result: dict) -> bool:
    """A vector with a sample, or a scalar, that is not NaN."""
    data = result["data"]
    if data["resultType"] in ("scalar", "string"):
        return not math.isnan(float(data["result"][1]))
    samples = [s["value"] for s in data["result"]] if data["resultType"] == "vector" else [
        v for s in data["result"] for v in s["values"]]
    return any(not math.isnan(float(value)) for _, value in samples)


def prometheus_config(ports: dict[str, int], rabbitmq: bool) -> dict:
    scrape = [{"job_name": "switchboard", "metrics_path": "/metrics", "static_configs": [
        {"targets": [f"127.0.0.1:{ports[name]}"], "labels": {"service": name}} for name in SERVICES]}]
    if rabbitmq:
        scrape.append({"job_name": "rabbitmq", "metrics_path": "/metrics/per-object",
                       "static_configs": [{"targets": ["127.0.0.1:15692"]}]})
    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path.resolve()) for path in rule_files()],
            "scrape_configs": scrape}


async def rabbitmq_answers() -> bool:
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(RABBITMQ_METRICS)
        return response.status_code == 200 and "rabbitmq_queue_messages_ready" in response.text
    except httpx.HTTPError:
        return False


class Prom:
    """Prometheus's HTTP API."""

    def __init__(self, port: int):
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)

    async def query(self, expr: str) -> dict:
        return (await self.http.post("/api/v1/query", data={"query": expr})).json()

    async def vector(self, expr: str) -> list[dict]:
        result = await self.query(expr)
        assert result["status"] == "success", f"{expr}: {result}"
        return result["data"]["result"]

    async def get(self, path: str, **params) -> dict:
        body = (await self.http.get(path, params=params)).json()
        assert body["status"] == "success", body
        return body["data"]


async def finish(api: httpx.AsyncClient, wf_id: str, timeout: float = 60) -> dict:
    """The workflow once it has ended, through the API's long poll."""
    async def ended():
        view = (await api.get(f"/v1/workflows/{wf_id}", params={"wait": 5})).json()
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    return await wait_for(ended, timeout=timeout, what=f"workflow {wf_id} to end")


async def submit(api: httpx.AsyncClient, spec: dict) -> str:
    response = await api.post("/v1/workflows", json=spec)
    assert response.status_code == 202, response.text
    return response.json()["workflow_id"]


async def successes(api: httpx.AsyncClient) -> None:
    """The fan-out/fan-in DAG with its delegating planner, an echo task of each priority, and a cached one."""
    ids = [await submit(api, DAG)]
    for task in [{"capability": "echo", "priority": priority} for priority in sorted(PRIORITIES)] + [
            {"capability": "echo", "payload": {"cached": True}, "cache": {"ttl_s": 3600}}]:
        response = await api.post("/v1/tasks", json=task)
        assert response.status_code == 202, response.text
        ids.append(response.json()["workflow_id"])
    views = await asyncio.gather(*(finish(api, wf_id) for wf_id in ids))
    assert all(v["status"] == "succeeded" for v in views), views


async def run_workload(api: httpx.AsyncClient, settings, ports: dict[str, int], scraped) -> None:
    """Successes, DAGs, delegation, every outcome, a cancel, a replay, dead letters of several reasons,
    HTTP 4xx, four priorities; returns once what it caused has been recorded.

    Prometheus sees a counter's increase only between two scrapes: a series born at 1 (as every labelled
    series is) has rate() 0 until it grows again. So the workload runs in rounds with `scraped()` (every
    target scraped since) in between, and what the rate panels show recurs in a later round."""
    topology = Topology(settings.namespace)
    await successes(api)
    await scraped()

    long_id = await submit(api, {"name": "cancelled", "tasks": [
        {"id": "long", "capability": "sleep", "payload": {"seconds": 120}},
        {"id": "after", "capability": "echo", "depends_on": ["long"]}]})
    expected = {
        # A retry would open the sleep breaker: one attempt times out and fails the task for good.
        await submit(api, {"tasks": [{"id": "slow", "capability": "sleep", "payload": {"seconds": 30},
                                      "timeout_s": 0.2, "max_attempts": 1}]}): "failed",
        await submit(api, {"tasks": [{"id": "refused", "capability": "fail", "payload": {"retryable": False},
                                      **FAST_RETRY}]}): "failed",
        await submit(api, {"tasks": [{"id": "orphan", "capability": UNSERVED}]}): "failed",
    }
    bad = await api.post("/v1/workflows", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400, bad.text
    assert (await api.get("/v1/workflows/no-such-workflow")).status_code == 404
    # A message that is no envelope: the coordinator dead-letters it, the dlq-replayer keeps it (unparseable).
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(b"not an envelope"), routing_key=topology.coordinator)

    async def long_running():
        view = (await api.get(f"/v1/workflows/{long_id}")).json()
        return any(t["id"] == "long" and t["status"] == "running" for t in view["tasks"])

    await wait_for(long_running, what="the long sleep to run")
    assert (await api.post(f"/v1/workflows/{long_id}/cancel")).status_code == 200
    expected[long_id] = "cancelled"
    await successes(api)
    views = await asyncio.gather(*(finish(api, wf_id) for wf_id in expected))
    assert {v["workflow_id"]: v["status"] for v in views} == expected, views
    await scraped()

    # Replay the non-retryable failure (its breaker is still closed): it fails again, non-retryable.
    refused = next(v["workflow_id"] for v in views if v["tasks"][0]["id"] == "refused")
    [record] = (await api.get("/v1/dlq", params={"workflow_id": refused, "status": "dead"})).json()["dead_letters"]
    assert (await api.post(f"/v1/dlq/{record['id']}/replay")).status_code == 200
    assert (await finish(api, refused))["status"] == "failed"
    # Last, a retryable failure: retried, then failed; two failures open cap:fail and agent:fail-agent.
    flaky = await submit(api, {"tasks": [{"id": "flaky", "capability": "fail", **FAST_RETRY}]})
    assert (await finish(api, flaky))["status"] == "failed"
    await successes(api)

    async def recorded():
        aggregator = (await api.get(f"http://127.0.0.1:{ports['aggregator']}/metrics")).text
        dead = (await api.get("/v1/dlq", params={"reason": "unparseable"})).json()["dead_letters"]
        return dead and all(f'switchboard_breaker_open{{breaker="{b}"}} 1.0' in aggregator
                            for b in ("cap:fail", "agent:fail-agent"))

    await wait_for(recorded, timeout=30, what="both breakers open and the unparseable message kept")


async def test_rules_and_dashboards_against_a_live_prometheus(settings, tmp_path):
    rabbitmq = await rabbitmq_answers()
    skipped_metrics = {} if rabbitmq else {"rabbitmq_": f"RabbitMQ's prometheus plugin does not answer at "
                                                        f"{RABBITMQ_METRICS}"}
    if not rabbitmq:
        warnings.warn(f"not checking rabbitmq_* expressions: {skipped_metrics['rabbitmq_']}")
    prom_port = free_port()
    prom = Prom(prom_port)
    prometheus: subprocess.Popen | None = None
    log_path = tmp_path / "prometheus.log"
    problems: list[str] = []
    topology = Topology(settings.namespace)  # the queues that service_processes does not delete
    extra_queues = {topology.hold_queue(UNSERVED), topology.paused_queue(UNSERVED), topology.paused_queue("fail")}
    try:
        async with service_processes(settings, ENV) as (_, ports), \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=30) as api:
            config = tmp_path / "prometheus.yml"
            config.write_text(yaml.safe_dump(prometheus_config(ports, rabbitmq)))
            (tmp_path / "tsdb").mkdir()
            with open(log_path, "wb") as log:
                prometheus = subprocess.Popen(
                    [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT)

            def prometheus_log() -> str:
                exited = f"prometheus exited {prometheus.returncode}; " if prometheus.poll() is not None else ""
                return f"{exited}its log ends:\n{log_path.read_text()[-3000:]}"

            async def prometheus_ready():
                assert prometheus.poll() is None, prometheus_log()
                try:
                    return (await prom.http.get("/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(prometheus_ready, timeout=30, what="Prometheus ready", on_timeout=prometheus_log)
            await wait_processes_ready(api, settings, ports)
            jobs = {"switchboard", "rabbitmq"} if rabbitmq else {"switchboard"}
            await wait_for(lambda: all_up(prom, jobs), timeout=30, what="every target up in Prometheus",
                           on_timeout=prometheus_log)
            await run_workload(api, settings, ports, lambda: scraped(prom, 2, prometheus_log))
            await scraped(prom, 3, prometheus_log, per_minute=10)
            recording = {r["name"]: r["expr"] for r in rules() if r["kind"] == "record"}
            names = set(await prom.get("/api/v1/label/__name__/values"))
            await check_expressions(prom, recording, names, skipped_metrics, problems)
            await check_contract(prom, problems)
            await check_label_values(prom, problems)
            await check_rule_health_and_alerts(prom, problems)
    finally:
        await prom.http.aclose()
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(20)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        await cleanup(settings, extra_queues, redis=False)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


async def all_up(prom: Prom, jobs: set[str]) -> bool:
    targets = (await prom.get("/api/v1/targets", state="active"))["activeTargets"]
    services = {t["labels"].get("service") for t in targets if t["labels"]["job"] == "switchboard"}
    return (services == set(SERVICES) and {t["labels"]["job"] for t in targets} == jobs
            and all(t["health"] == "up" for t in targets))


async def scrape_counts(prom: Prom, window: str = "5m") -> dict[tuple, float]:
    return {tuple(sorted(s["metric"].items())): float(s["value"][1])
            for s in await prom.vector(f"count_over_time(up[{window}])")}


async def scraped(prom: Prom, more: int, prometheus_log, per_minute: int = 0) -> None:
    """Until every target has been scraped `more` times since this call (the second scrape from now
    is the first that surely began after it: a target's scrapes run one after the other) and, with
    per_minute, that often in the last minute, so every rate() window has samples."""
    before = await scrape_counts(prom)

    async def enough():
        counts, last_minute = await scrape_counts(prom), await scrape_counts(prom, "1m")
        return counts.keys() == before.keys() and all(
            counts[k] >= before[k] + more and last_minute.get(k, 0) >= per_minute for k in counts)

    await wait_for(enough, timeout=40, interval=0.1, what=f"{more} more scrapes of every target",
                   on_timeout=prometheus_log)


async def check_expressions(prom: Prom, recording: dict[str, str], names: set[str],
                            skipped_metrics: dict[str, str], problems: list[str]) -> None:
    kinds = {r["name"]: "alert" if r["kind"] == "alert" else "recording rule" for r in rules()}
    exprs = [(kinds[name], name, expr) for name, expr in rule_expressions()]
    exprs += [("dashboard", f"{uid} / {title}", expr) for uid, title, expr in dashboard_expressions()]
    assert any(kind == "dashboard" for kind, _, _ in exprs), "no dashboard expressions found"
    missing: dict[str, list[str]] = defaultdict(list)
    used_expected = set()
    for kind, where, expr in exprs:
        metrics = referenced_metrics(expr, recording)
        skip = next((why for prefix, why in skipped_metrics.items() for m in metrics if m.startswith(prefix)), None)
        if skip:
            continue
        result = await prom.query(expr)
        if result.get("status") != "success":
            problems.append(f"{kind} {where}: does not evaluate: {result.get('error')}\n    {expr}")
            continue
        if not metrics:
            problems.append(f"{kind} {where}: reads no metric that this test recognises\n    {expr}")
        excused = {m for m in metrics if m in EXPECTED_EMPTY or family(m) in EXPECTED_EMPTY}
        used_expected |= {m if m in EXPECTED_EMPTY else family(m) for m in excused}
        for metric in sorted(metrics - excused - names):
            missing[metric].append(f"{kind} {where}")
        if kind == "alert" or excused or metrics - names:
            continue
        used = expr in EXPECTED_EMPTY_EXPRESSIONS
        if used:
            used_expected.add(expr)
        if not has_data(result) and not used:
            problems.append(f"{kind} {where}: returns no data, though every metric it reads exists\n    {expr}")
    for metric, users in sorted(missing.items()):
        problems.append(f"metric {metric} has no series in Prometheus; read by: {'; '.join(users)}")
    for stale in (set(EXPECTED_EMPTY) | set(EXPECTED_EMPTY_EXPRESSIONS)) - used_expected:
        problems.append(f"EXPECTED_EMPTY entry no longer needed (no rule or panel depends on it): {stale}")


async def check_contract(prom: Prom, problems: list[str]) -> None:
    for metric, labels in CONTRACT.items():
        series = await prom.vector(f'group by (__name__) ({{__name__="{metric}"}})')
        if not series:
            problems.append(f"contract metric {metric}: no series at all")
            continue
        for label, wanted in labels.items():
            found = {s["metric"].get(label) for s in await prom.vector(f"count by ({label}) ({metric})")}
            if not wanted <= found:
                problems.append(f"contract metric {metric}: no series with {label} in {sorted(wanted - found)} "
                                f"(found {sorted(v for v in found if v is not None)})")


async def check_label_values(prom: Prom, problems: list[str]) -> None:
    for metric, labels in ALLOWED.items():
        for label, allowed in labels.items():
            found = {s["metric"].get(label, "") for s in await prom.vector(f"count by ({label}) ({metric})")}
            bad = sorted(v for v in found if not (
                allowed.fullmatch(v) if isinstance(allowed, re.Pattern) else v in allowed))
            if bad:
                by_service = await prom.vector(f"count by (service, {label}) ({metric})")
                where = sorted({(s["metric"].get("service", ""), s["metric"].get(label, "")) for s in by_service
                                if s["metric"].get(label, "") in bad})
                problems.append(f"contract metric {metric}: {label} outside the contract: {bad} "
                                f"(service, {label}): {where}")
    names = set(await prom.get("/api/v1/labels", **{"match[]": '{__name__=~"switchboard_.+"}'}))
    if names - LABELS:
        problems.append(f"switchboard_* series carry labels outside the contract: {sorted(names - LABELS)}")


async def check_rule_health_and_alerts(prom: Prom, problems: list[str]) -> None:
    async def evaluated():
        groups = (await prom.get("/api/v1/rules"))["groups"]
        found = [r for g in groups for r in g["rules"]]
        return found if found and all(r["health"] != "unknown" for r in found) else None

    found = await wait_for(evaluated, timeout=20, what="every rule evaluated once")
    loaded = {r["name"] for r in found}
    for rule in rules():
        if rule["name"] not in loaded:
            problems.append(f"rule {rule['name']} is not loaded by Prometheus")
    for rule in found:
        if rule["health"] != "ok":
            problems.append(f"rule {rule['name']}: Prometheus evaluates it with {rule['health']}: "
                            f"{rule.get('lastError')}")

    # Every `for:` is minutes long, too long for this test to see an alert fire; what the workload
    # causes must at least be pending. The two breakers stay open (nothing of capability fail runs again).
    def active(alerts, name):
        return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] in ("pending", "firing")]

    async def breakers_alerting():
        alerts = (await prom.get("/api/v1/alerts"))["alerts"]
        return {a["labels"].get("breaker") for a in active(alerts, "SwitchboardBreakerOpen")} >= {
            "cap:fail", "agent:fail-agent"} and not active(alerts, "SwitchboardServiceDown")

    try:
        await wait_for(breakers_alerting, timeout=15, interval=0.2, what="SwitchboardBreakerOpen pending for "
                       "cap:fail and agent:fail-agent, and SwitchboardServiceDown inactive")
    except AssertionError as exc:
        alerts = (await prom.get("/api/v1/alerts"))["alerts"]
        problems.append(f"{exc}; active alerts: {[(a['labels'], a['state']) for a in alerts]}")
