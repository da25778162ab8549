"""What every deployment of Switchboard (compose, each Kubernetes overlay) must agree with the code on:
which processes there are, what each runs and serves, which settings a deployment must set and which it
may leave at their defaults, and which other parts each process talks to. The compose and Kubernetes
tests check their files against these facts; the facts themselves are read from the code where they can
be, so that a new setting or service fails those tests until a deployment decides about it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from switchboard.cli import SERVICES
from switchboard.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

# Every process a deployment runs, by the name `switchboard serve` takes.
PROCESSES = (*SERVICES, "agents")

# What the image sets (Dockerfile ENV): every service but the api serves /healthz, /readyz and /metrics
# on the health port; the api serves them on its own port, beside /v1.
HEALTH_PORT = 8080
API_PORT = 8000
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")


def serving_port(process: str) -> int:
    return API_PORT if process == "api" else HEALTH_PORT


def env_names(field: str) -> set[str]:
    """The environment names the settings object reads for a field: SWITCHBOARD_X, and X where aliased."""
    info = Settings.model_fields[field]
    names = {f"SWITCHBOARD_{field.upper()}"}
    if info.validation_alias is not None:
        names |= set(info.validation_alias.choices)
    return names


# Settings a deployment must set on every process, because their defaults point at this machine.
MUST_SET = ("amqp_url", "redis_url", "store_url")
# Settings a deployment leaves at their defaults, and why; a new setting must be added here or above.
DEFAULTED = {
    "management_url": "only `switchboard agent-credentials` (an admin's command, not a service) reads it",
    "namespace": "one deployment per broker; set it to share one broker between deployments",
    "api_host": "the image sets 0.0.0.0",
    "api_port": "8000 is the api's port everywhere",
    "api_token": "set from the secret where auth is wanted; empty means no auth",
    "api_rate_per_s": "a per-token limit, same in every deployment",
    "api_rate_burst": "a per-token limit, same in every deployment",
    "payload_keys": "off unless set; set it from a secret on the api and the agents to seal payloads",
    "health_port": "the image sets 8080",
    "health_host": "the image sets 0.0.0.0",
    "max_payload_bytes": "a platform limit, same in every deployment",
    "max_tasks_per_workflow": "a platform limit, same in every deployment",
    "default_timeout_s": "a task default; tasks set their own",
    "default_max_attempts": "a task default; tasks set their own",
    "watchdog_grace_s": "tuning",
    "unroutable_after_s": "tuning",
    "breaker_fail_max": "tuning",
    "breaker_reset_s": "tuning",
    "heartbeat_interval_s": "tuning",
    "agent_lost_after_s": "tuning",
    "agent_concurrency": "per agent; the example agents keep the default",
    "log_level": "INFO",
}

# The standard OpenTelemetry variables the services honour (telemetry.tracing reads them, or the SDK does).
OTEL_NAMES = re.compile(r"OTEL_[A-Z_]+")


def known_env(name: str) -> bool:
    """A variable some process reads: a setting's name, or an OpenTelemetry one."""
    return any(name in env_names(field) for field in Settings.model_fields) or bool(OTEL_NAMES.fullmatch(name))


# Which other parts each process connects to (runtime.Service.uses_store / uses_redis; every process
# uses the broker). Network policies and compose dependencies follow these.
def uses(process: str) -> set[str]:
    if process == "agents":
        return {"rabbitmq"}
    import importlib

    module, _, cls = SERVICES[process].partition(":")
    service = getattr(importlib.import_module(module), cls)
    return {"rabbitmq"} | ({"redis"} if service.uses_redis else set()) | ({"store"} if service.uses_store else set())


def entry_points() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
