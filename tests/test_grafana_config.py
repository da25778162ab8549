"""Static checks of the Grafana provisioning and dashboards (no Grafana, no network).

What they guard: a dashboard that does not load or collides with another, a panel on a data source that
is not provisioned, a query Prometheus cannot run once Grafana has interpolated it, a link to a dashboard
or variable that does not exist, and the logs <-> traces links in the data source config.
"""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
import subprocess
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml

from tests.grafana_exprs import VARIABLE, dashboard_expressions, load_dashboards, panels, prometheus_targets
from tests.prometheus_rules import rules

GRAFANA = pathlib.Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD_UIDS = {"switchboard-overview", "switchboard-capabilities", "switchboard-failures",
                  "switchboard-infrastructure", "switchboard-logs"}
DASHBOARDS = load_dashboards()
MACRO = re.compile(r"\$\{?(__\w+)")
REGEX_MATCHER = re.compile(r'=~\s*"(?:[^"\\]|\\.)*"')


def _yaml(rel: str) -> dict:
    return yaml.safe_load((GRAFANA / "provisioning" / rel).read_text())


DATASOURCES = _yaml("datasources/datasources.yaml")
BY_UID = {ds["uid"]: ds for ds in DATASOURCES["datasources"]}


def _variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def _ids(dashboard: dict) -> list[str]:
    return [f'{dashboard["uid"]}/{p.get("id")} {p.get("title")!r}' for p in panels(dashboard)]


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def test_the_five_dashboards_exist_with_unique_uids_and_titles():
    uids = [d["uid"] for d in DASHBOARDS]
    titles = [d["title"] for d in DASHBOARDS]
    assert sorted(uids) == sorted(DASHBOARD_UIDS)
    assert len(set(titles)) == len(titles), titles
    for d in DASHBOARDS:
        assert len(d["uid"]) <= 40  # Grafana's limit
        assert "switchboard" in d["tags"], d["uid"]
        assert d["schemaVersion"] == 39, d["uid"]
        assert "id" not in d or d["id"] is None, f'{d["uid"]}: a provisioned dashboard carries no database id'


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d["uid"])
def test_panels_have_unique_ids_a_place_and_a_provisioned_datasource(dashboard):
    ids = [p.get("id") for p in panels(dashboard)]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), _ids(dashboard)
    cells: dict[tuple[int, int], int] = {}
    for p in panels(dashboard):
        pos = p.get("gridPos")
        assert pos and all(isinstance(pos.get(k), int) for k in "xywh"), f'panel {p["id"]}: gridPos {pos}'
        assert 0 <= pos["x"] and pos["w"] >= 1 and pos["x"] + pos["w"] <= 24 and pos["h"] >= 1, f'panel {p["id"]}'
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f'panels {cells[x, y]} and {p["id"]} overlap'
                cells[x, y] = p["id"]
        if p["type"] == "row":
            continue
        assert p.get("title"), f'panel {p["id"]} has no title'
        ds = p.get("datasource") or {}
        assert ds.get("uid") in BY_UID, f'panel {p["title"]!r}: data source {ds} is not provisioned'
        assert ds.get("type") == BY_UID[ds["uid"]]["type"], f'panel {p["title"]!r}: {ds}'
        targets = p.get("targets") or []
        assert targets, f'panel {p["title"]!r} has no query'
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(set(refs)) == len(refs), f'panel {p["title"]!r}: refIds {refs}'
        for t in targets:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f'panel {p["title"]!r} {t["refId"]}: no expr'
            if "datasource" in t:
                assert t["datasource"].get("uid") in BY_UID


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d["uid"])
def test_template_variables(dashboard):
    for name, var in _variables(dashboard).items():
        assert re.fullmatch(r"[A-Za-z_]\w*", name), name
        if "datasource" in var:
            assert var["datasource"]["uid"] in BY_UID, name
        if var.get("includeAll"):
            assert var.get("allValue") in (".*", ".+"), f'{name}: "All" must be a regex, got {var.get("allValue")!r}'


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d["uid"])
def test_prometheus_expressions_interpolate_to_valid_promql(dashboard):
    variables = _variables(dashboard)
    for panel, target in prometheus_targets(dashboard):
        expr, where = target["expr"], f'{dashboard["uid"]} / {panel["title"]!r} {target["refId"]}'
        assert set(MACRO.findall(expr)) <= {"__rate_interval"}, f"{where}: Grafana macro other than $__rate_interval"
        for match in VARIABLE.finditer(expr):
            name = match.group(1) or match.group(2)
            assert name in variables, f"{where}: undefined variable ${name}"
            var = variables[name]
            assert var.get("includeAll") and var.get("allValue") == ".*", f"{where}: ${name} must have All = .*"
        # A variable expands to a regex (a|b|.*), so it may only stand inside a label=~"..." matcher.
        outside = REGEX_MATCHER.sub('=~""', expr)
        assert not VARIABLE.search(outside), f"{where}: a variable outside a =~ matcher"
        depth = {"(": 0, "[": 0, "{": 0}
        closing = {")": "(", "]": "[", "}": "{"}
        for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
            if ch in depth:
                depth[ch] += 1
            elif ch in closing:
                depth[closing[ch]] -= 1
                assert depth[closing[ch]] >= 0, f"{where}: unbalanced {ch}"
        assert not any(depth.values()), f"{where}: unbalanced brackets"


def test_dashboard_expressions_are_concrete():
    exprs = dashboard_expressions()
    assert {uid for uid, _, _ in exprs} == DASHBOARD_UIDS - {"switchboard-logs"}
    for uid, title, expr in exprs:
        assert "$__" not in expr and not VARIABLE.search(expr), (uid, title, expr)
        assert "[1m]" in expr or "rate(" not in expr, (uid, title, expr)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_parses_every_dashboard_expression(tmp_path):
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:expr{i}", "expr": expr} for i, (_, _, expr) in enumerate(dashboard_expressions())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    run = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_loki_queries_select_a_stream_that_loki_accepts():
    loki = [(d, p, t) for d in DASHBOARDS for p in panels(d) for t in p.get("targets", [])
            if (p.get("datasource") or {}).get("type") == "loki"]
    assert loki
    for d, p, t in loki:
        variables = _variables(d)
        selector = re.match(r"[^{]*(\{[^}]*\})", t["expr"])
        assert selector and "service" in selector.group(1), f'{p["title"]!r}: no {{service=...}} stream selector'
        assert set(MACRO.findall(t["expr"])) <= {"__interval", "__auto", "__range"}, t["expr"]
        for match in VARIABLE.finditer(t["expr"]):
            name = match.group(1) or match.group(2)
            assert name in variables, f'{p["title"]!r}: undefined variable ${name}'
        # Loki refuses a selector whose every matcher matches "" ({service=~".*"}), so All must be .+
        for match in VARIABLE.finditer(selector.group(1)):
            all_value = variables[match.group(1) or match.group(2)].get("allValue")
            assert all_value and not re.fullmatch(all_value, ""), f"All value {all_value!r} matches the empty string"
    logs = [p for d in DASHBOARDS if d["uid"] == "switchboard-logs" for p in panels(d) if p["type"] == "logs"]
    assert logs and "| json" in logs[0]["targets"][0]["expr"]


def test_links_point_at_existing_dashboards_and_variables():
    variables = {d["uid"]: _variables(d) for d in DASHBOARDS}
    urls = []
    for d in DASHBOARDS:
        for link in d.get("links", []):
            if link.get("type") == "dashboards":
                assert "switchboard" in link.get("tags", []), d["uid"]
            if link.get("url"):
                urls.append((d["uid"], link["url"]))
        for p in panels(d):
            for link in p.get("links", []) + p.get("fieldConfig", {}).get("defaults", {}).get("links", []):
                urls.append((f'{d["uid"]} / {p["title"]!r}', link["url"]))
    assert any("${__field.labels.service}" in url for _, url in urls)
    # An alert's first click: the dashboard its annotation names.
    alerts = [(f"alert {r['name']}", r["annotations"]["dashboard"]) for r in rules() if r["kind"] == "alert"]
    assert alerts and all(url.startswith("/d/") for _, url in alerts)
    for where, url in urls + alerts:
        parts = urlsplit(url)
        found = re.fullmatch(r"/d/([^/]+)(?:/.*)?", parts.path)
        if not found:
            continue
        uid = found.group(1)
        assert uid in variables, f"{where}: link to unknown dashboard {uid}"
        for key, _ in parse_qsl(parts.query):
            if key.startswith("var-"):
                assert key[4:] in variables[uid], f"{where}: {uid} has no variable {key[4:]}"


def test_datasources_are_the_three_with_fixed_uids():
    assert DATASOURCES["apiVersion"] == 1
    assert {uid: (ds["type"], ds["url"]) for uid, ds in BY_UID.items()} == {
        "prometheus": ("prometheus", "http://prometheus:9090"),
        "loki": ("loki", "http://loki:3100"),
        "jaeger": ("jaeger", "http://jaeger:16686"),
    }
    # Grafana expands $NAME / ${NAME} from the environment in provisioning files; only $$ is a literal $.
    for value in _strings(DATASOURCES):
        assert "$" not in value.replace("$$", ""), f"unescaped $ in {value!r}"


def _log_line(trace_id: str) -> str:
    try:
        from switchboard.telemetry.logs import JsonFormatter
    except ImportError:  # the formatter's format, should the module not import here
        import orjson
        return orjson.dumps({"ts": "2024-01-01T00:00:00.000Z", "level": "error", "service": "api", "logger": "x",
                             "msg": "boom", "trace_id": trace_id, "span_id": "00f067aa0ba902b7"}).decode()
    record = logging.LogRecord("switchboard.test", logging.ERROR, __file__, 1, "boom", None, None)
    line = JsonFormatter("api").format(record)
    # Outside a span the formatter writes no trace_id: splice one in the way it writes it (after "msg").
    return line[:-1] + f',"trace_id":"{trace_id}","span_id":"00f067aa0ba902b7"}}'


def test_logs_link_to_traces_and_traces_to_logs():
    fields = BY_UID["loki"]["jsonData"]["derivedFields"]
    to_jaeger = [f for f in fields if f.get("datasourceUid") == "jaeger"]
    assert len(to_jaeger) == 1
    field = to_jaeger[0]
    assert field["url"].replace("$$", "$") == "${__value.raw}"
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    found = re.search(field["matcherRegex"], _log_line(trace_id))
    assert found and found.group(1) == trace_id

    to_loki = BY_UID["jaeger"]["jsonData"]["tracesToLogsV2"]
    assert to_loki["datasourceUid"] == "loki" and to_loki["filterByTraceID"] is True
    assert {"key": "service.name", "value": "service"} in to_loki["tags"]

    for dest in BY_UID["prometheus"].get("jsonData", {}).get("exemplarTraceIdDestinations", []):
        assert dest["datasourceUid"] in BY_UID


def test_dashboard_provider_loads_the_dashboards_folder():
    config = _yaml("dashboards/dashboards.yaml")
    assert config["apiVersion"] == 1
    [provider] = [p for p in config["providers"] if p["type"] == "file"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert provider["folder"] == "Switchboard"
