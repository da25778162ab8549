"""The Grafana dashboards' Prometheus expressions, as Prometheus itself would accept them.

For a test that evaluates them against a live Prometheus: `$__rate_interval` (the only Grafana macro the
dashboards use in PromQL) becomes 1m, and each template variable (always used as `label=~"...$var..."`)
becomes its "All" value, `.*`. label_replace's `$1` backreferences are left alone.
"""

from __future__ import annotations

import json
import pathlib
import re

DASHBOARDS = pathlib.Path(__file__).resolve().parent.parent / "grafana" / "dashboards"

# $name, ${name} and ${name:format}. Not $__macro (Grafana's own), nor $1 (a label_replace backreference).
VARIABLE = re.compile(r"\$(?:\{(?!__)([A-Za-z_]\w*)(?::[^}]*)?\}|(?!__)([A-Za-z_]\w*))")


def load_dashboards() -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))]


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def prometheus_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every target that Prometheus answers."""
    out = []
    for panel in panels(dashboard):
        panel_type = (panel.get("datasource") or {}).get("type")
        for target in panel.get("targets", []):
            if (target.get("datasource") or {}).get("type", panel_type) == "prometheus":
                out.append((panel, target))
    return out


def concrete(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
    return VARIABLE.sub(".*", expr)


def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expression) for every Prometheus target of every dashboard."""
    return [(dashboard["uid"], panel["title"], concrete(target["expr"]))
            for dashboard in load_dashboards() for panel, target in prometheus_targets(dashboard)]
