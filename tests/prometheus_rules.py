"""The Prometheus rules of deploy/prometheus/rules/*.yml, for tests: `rule_expressions()` lists every
alert and recording rule with its PromQL expression, so a live test can evaluate each one against a
Prometheus that scrapes a running platform."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
PROMTAIL_DIR = DEPLOY / "promtail"

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(Path(path).read_text())


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules() -> list[dict[str, Any]]:
    """Every rule of every group of every rule file, each with `kind` ("alert" or "record"), `name`,
    `group`, `file` and the rule's own keys (expr, for, labels, annotations)."""
    found = []
    for path in rule_files():
        for group in (load_yaml(path) or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                kind = "alert" if "alert" in rule else "record"
                found.append(rule | {"kind": kind, "name": rule[kind], "group": group["name"], "file": path.name})
    return found


def rule_expressions() -> list[tuple[str, str]]:
    """(rule name, PromQL expression) for every alert and recording rule, in file order."""
    return [(rule["name"], rule["expr"].strip()) for rule in rules()]
