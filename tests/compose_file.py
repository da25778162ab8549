"""Reads compose files as `docker compose` does, for the tests, which have no Docker engine: the YAML
(with anchors and `<<` merge keys), variable interpolation from an environment, several files merged in
order by the compose-spec's rules, and profiles. Only the parts of the spec that deploy/compose uses."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import yaml

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>\w+))")


class ComposeError(ValueError):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and $$ (a literal $)."""
    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value, op, arg = env.get(name), match["op"], match["arg"]
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op and op.endswith("-"):
            return arg if unset else value
        if op and op.endswith("?"):
            if unset:
                raise ComposeError(f"required variable {name}: {arg}")
            return value
        return value or ""

    return _VARIABLE.sub(substitute, text)


def variables(text: str) -> set[str]:
    """The names a compose file interpolates."""
    return {m["braced"] or m["named"] for m in _VARIABLE.finditer(text) if not m["escaped"]}


def _interpolate_all(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_all(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_all(value, env) for key, value in node.items()}
    return node


def _target(volume) -> str:
    if isinstance(volume, dict):
        return volume["target"]
    parts = volume.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _merge(base, override, key: str = ""):
    # compose-spec "merge": mappings merge key by key; volumes merge by their container path; ports add
    # up; every other sequence (command, entrypoint, healthcheck.test, profiles) is replaced.
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            merged[k] = _merge(base[k], v, k) if k in base else v
        return merged
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {_target(v): v for v in base}
        by_target.update({_target(v): v for v in override})
        return list(by_target.values())
    if key == "ports" and isinstance(base, list) and isinstance(override, list):
        return base + [p for p in override if p not in base]
    return override


def _normalise(service: dict) -> dict:
    service = dict(service)
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    service["environment"] = {k: (None if v is None else str(v)) for k, v in env.items()}
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        deps = {name: {"condition": "service_started"} for name in deps}
    service["depends_on"] = {name: {"required": True, **cfg} for name, cfg in deps.items()}
    return service


def load(files: list[Path], env: Mapping[str, str], profiles: set[str] = frozenset()) -> dict:
    """The project these files make, with the services of inactive profiles left out (as `disabled`)."""
    project: dict = {}
    for path in files:
        document = yaml.safe_load(path.read_text()) or {}
        project = _merge(project, _interpolate_all(document, env))
    services = {name: _normalise(s) for name, s in project.get("services", {}).items()}
    enabled = {n: s for n, s in services.items() if not s.get("profiles") or set(s["profiles"]) & set(profiles)}
    disabled = set(services) - set(enabled)
    for name, service in enabled.items():
        for dependency, cfg in service["depends_on"].items():
            # compose-go's consistency check: a dependency must exist, or be disabled and not required.
            if dependency not in enabled and not (dependency in disabled and cfg["required"] is False):
                raise ComposeError(f"service {name!r} depends on undefined service {dependency!r}")
    return {**project, "services": enabled, "disabled": disabled}
