"""The monitoring configs in deploy/: Prometheus's scrape config and rules (checked and unit-tested by
promtool, which CI installs with `apt-get install prometheus`), and Promtail's configs (Promtail is not
installed anywhere here: their structure is checked)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import deploy_facts
from tests.prometheus_rules import (
    PROMETHEUS_DIR,
    PROMTAIL_DIR,
    ROOT,
    RULE_TESTS_DIR,
    load_yaml,
    rule_expressions,
    rule_files,
    rules,
)

PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
PROMTAIL_FILES = [PROMTAIL_DIR / "promtail.yml", PROMTAIL_DIR / "promtail-kubernetes.yml"]

# The telemetry contract: the `service` label of job "switchboard", by compose host and port (the api on
# its own port, every other process on the image's health port).
SERVICES = {process: f"{process.replace('_', '-')}:{deploy_facts.serving_port(process)}"
            for process in deploy_facts.PROCESSES}
ALERTS = {
    "SwitchboardHighFailureRate",
    "SwitchboardDeadLettersGrowing",
    "SwitchboardNoAgentForQueuedWork",
    "SwitchboardBreakerOpen",
    "SwitchboardQueueWaitHigh",
    "SwitchboardServiceDown",
    "SwitchboardAgentsLost",
}
SEVERITIES = {"critical", "warning", "info"}
# The contract's metric names (histograms also as _bucket, _sum, _count).
HISTOGRAMS = {
    "switchboard_task_queue_wait_seconds", "switchboard_task_run_seconds", "switchboard_workflow_duration_seconds",
    "switchboard_store_transaction_seconds", "switchboard_http_request_duration_seconds",
}
METRICS = {
    "switchboard_tasks_submitted_total", "switchboard_tasks_started_total", "switchboard_tasks_finished_total",
    "switchboard_workflows_finished_total", "switchboard_workflows_in_flight", "switchboard_tasks_queued",
    "switchboard_dependencies_pending", "switchboard_agents", "switchboard_agent_tasks_in_flight",
    "switchboard_breaker_open", "switchboard_breaker_transitions_total", "switchboard_dead_letters",
    "switchboard_dlq_replays_total", "switchboard_messages_published_total", "switchboard_messages_consumed_total",
    "switchboard_amqp_reconnects_total", "switchboard_store_conflicts_total",
    "switchboard_store_write_transactions_total", "switchboard_store_written_keys_total",
    "switchboard_store_written_bytes_total", "switchboard_store_read_conflict_ranges_total",
} | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
# Gauges every replica reports alike (sampled from the store, registry, aggregator, DLQ): max(), never sum().
MAX_GAUGES_SUMMED = re.compile(
    r"\bsum\s*(by\s*\([^)]*\)\s*)?\(\s*(switchboard_(workflows_in_flight|tasks_queued|dependencies_pending"
    r"|agents|breaker_open|dead_letters))\b")

# Never a Loki label: one stream per id would be one stream per task.
ID_FIELDS = {"trace_id", "span_id", "workflow_id", "task_id"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (CI: apt-get install prometheus, which ships /usr/bin/promtool)")
    return path


def _run(*argv: str) -> str:
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(argv)} failed ({done.returncode}):\n{output}"
    return output


# ------------------------------------------------------------------------------------------- promtool


def test_promtool_check_config(promtool):
    output = _run(promtool, "check", "config", str(PROMETHEUS_YML))
    # rule_files is a glob: it must have matched the rule files, and check config checks them too
    assert f"SUCCESS: {len(rule_files())} rule files found" in output, output


def test_promtool_check_rules(promtool):
    assert rule_files(), "no rule files in deploy/prometheus/rules"
    output = _run(promtool, "check", "rules", *map(str, rule_files()))
    assert f"SUCCESS: {len(rules())} rules found" in output, output


def test_promtool_test_rules(promtool):
    tests = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert tests, "no rule unit tests in deploy/prometheus/tests"
    _run(promtool, "test", "rules", *map(str, tests))


# ------------------------------------------------------------------------------------ scrape config


def test_scrape_config_follows_the_contract():
    config = load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "15s"
    assert "rules/*.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"switchboard", "rabbitmq", "redis"} <= set(jobs)

    targets = {}
    for static in jobs["switchboard"]["static_configs"]:
        service = static["labels"]["service"]
        for target in static["targets"]:
            assert service not in targets, f"service {service} has two targets"
            targets[service] = target
    assert targets == SERVICES

    assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object"
    assert [t for s in jobs["rabbitmq"]["static_configs"] for t in s["targets"]] == ["rabbitmq:15692"]
    assert [t for s in jobs["redis"]["static_configs"] for t in s["targets"]] == ["redis-exporter:9121"]

    alertmanagers = config.get("alerting", {}).get("alertmanagers", [])
    assert any("alertmanager:9093" in s["targets"] for am in alertmanagers for s in am["static_configs"])


# -------------------------------------------------------------------------------------------- rules


def test_every_alert_is_complete():
    alerts = [rule for rule in rules() if rule["kind"] == "alert"]
    assert ALERTS <= {rule["name"] for rule in alerts}
    for rule in alerts:
        name = rule["name"]
        assert rule.get("for"), f"{name} has no for:"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "dashboard"):
            assert annotations.get(key), f"{name} has no {key} annotation"
        assert "{{" in annotations["summary"] + annotations["description"], f"{name}: its text names no label or value"
        assert re.fullmatch(r"/d/switchboard-[a-z-]+(\?.*)?", annotations["dashboard"]), (
            f"{name}: dashboard {annotations['dashboard']!r} is not a /d/<uid> link to a Switchboard dashboard")


def test_rule_expressions_lists_every_rule():
    listed = rule_expressions()
    assert [name for name, _ in listed] == [rule["name"] for rule in rules()]
    assert ALERTS <= {name for name, _ in listed}
    assert any(rule["kind"] == "record" for rule in rules())
    for name, expr in listed:
        assert expr and expr == expr.strip(), name
    alert_names = [rule["name"] for rule in rules() if rule["kind"] == "alert"]
    assert len(alert_names) == len(set(alert_names)), "two alerts share a name"


def test_rules_use_only_contract_metrics():
    for name, expr in rule_expressions():
        for metric in set(re.findall(r"\bswitchboard_[a-z_]+\b", expr)):
            assert metric in METRICS, f"{name} uses {metric}, which is not in the telemetry contract"
        summed = MAX_GAUGES_SUMMED.search(expr)
        assert not summed, f"{name}: {summed.group(0)!r}: every replica reports the same value; max() it"


def test_every_rule_has_unit_tests():
    """Each alert fires in some test case and is quiet in another; each recording rule is evaluated."""
    fires, quiet, evaluated = set(), set(), set()
    for path in sorted(RULE_TESTS_DIR.glob("*.yml")):
        for case in load_yaml(path).get("tests") or []:
            for check in case.get("alert_rule_test") or []:
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
            for check in case.get("promql_expr_test") or []:
                evaluated.update(re.findall(r"[a-z_]+:[a-z_0-9]+:[a-z_0-9]+", check["expr"]))
    for rule in rules():
        if rule["kind"] == "alert":
            assert rule["name"] in fires, f"no test makes {rule['name']} fire"
            assert rule["name"] in quiet, f"no test shows {rule['name']} quiet on healthy series"
        else:
            assert rule["name"] in evaluated, f"no test evaluates recording rule {rule['name']}"


# ----------------------------------------------------------------------------------------- promtail


def _stages(scrape: dict, kind: str) -> list:
    return [stage[kind] for stage in scrape.get("pipeline_stages") or [] if kind in stage]


@pytest.mark.parametrize("path", PROMTAIL_FILES, ids=lambda p: p.name)
def test_promtail_config(path):
    config = load_yaml(path)
    assert [c["url"] for c in config["clients"]] == ["http://loki:3100/loki/api/v1/push"]
    assert config["scrape_configs"]
    for scrape in config["scrape_configs"]:
        job = scrape["job_name"]
        relabelled = {r.get("target_label") for r in scrape.get("relabel_configs") or []}
        static = {k for s in scrape.get("static_configs") or [] for k in (s.get("labels") or {})}
        (json_stage,) = _stages(scrape, "json")
        (labels_stage,) = _stages(scrape, "labels")
        (timestamp,) = _stages(scrape, "timestamp")
        extracted = json_stage["expressions"]

        assert "service" in relabelled, f"{job}: no relabelling sets service"
        assert set(labels_stage) == {"service", "level"}, f"{job}: labels {sorted(labels_stage)}"
        promoted = relabelled | static | set(labels_stage)
        assert not promoted & ID_FIELDS, f"{job}: ids as labels: {sorted(promoted & ID_FIELDS)}"
        assert not _stages(scrape, "output"), f"{job}: the whole JSON line (with its trace_id) must reach Loki"
        assert not _stages(scrape, "template"), job

        for field in ("level", "service", "trace_id", "workflow_id"):
            # `name:` alone, or `name: name`, extracts the JSON key of that name
            assert field in extracted and extracted[field] in (None, field), f"{job}: json does not extract {field}"
        assert timestamp["source"] == "ts" and "ts" in extracted, f"{job}: timestamp is not taken from ts"
        assert timestamp["format"] in ("RFC3339Nano", "RFC3339"), timestamp


def test_promtail_compose_discovers_docker_containers():
    (scrape,) = load_yaml(PROMTAIL_DIR / "promtail.yml")["scrape_configs"]
    assert [sd["host"] for sd in scrape["docker_sd_configs"]] == ["unix:///var/run/docker.sock"]
    assert any(r.get("source_labels") == ["__meta_docker_container_label_com_docker_compose_service"]
               and r.get("target_label") == "service" for r in scrape["relabel_configs"])


def test_promtail_kubernetes_discovers_pods():
    (scrape,) = load_yaml(PROMTAIL_DIR / "promtail-kubernetes.yml")["scrape_configs"]
    assert [sd["role"] for sd in scrape["kubernetes_sd_configs"]] == ["pod"]
    relabel = scrape["relabel_configs"]
    assert any(r.get("source_labels") == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
               and r.get("target_label") == "service" for r in relabel)
    assert any(r.get("target_label") == "__path__" for r in relabel), "no __path__: Promtail tails nothing"
