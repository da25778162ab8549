"""The one settings object: every service and agent reads its configuration from the environment here."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    # Accept the conventional unprefixed names (AMQP_URL, REDIS_URL) that tests, compose and k8s set.
    return AliasChoices(f"SWITCHBOARD_{name}", name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore", populate_by_name=True)

    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", validation_alias=_env("AMQP_URL"))
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL"))
    # sqlite:///path/to/file for the embedded store, fdb:// or fdb:///path/to/fdb.cluster for FoundationDB.
    store_url: str = Field("sqlite:///var/switchboard.sqlite3", validation_alias=_env("STORE_URL"))
    # Prefix of every queue, exchange and Redis key: lets several deployments (or test runs) share a broker.
    namespace: str = "sb"

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Bearer token required on mutating API calls; empty means local development (no auth).
    api_token: str = ""
    # Port of a service's /healthz, /readyz and /metrics; 0 picks the service's default port.
    health_port: int = 0
    health_host: str = "127.0.0.1"

    max_payload_bytes: int = 256 * 1024
    max_tasks_per_workflow: int = 10_000
    default_timeout_s: float = 300.0
    default_max_attempts: int = 3
    # The coordinator's watchdog fails a running attempt with no result by its timeout plus this grace.
    watchdog_grace_s: float = 10.0
    # A task no live agent could take for this long is dead-lettered (it waits in a hold queue until then).
    unroutable_after_s: float = 600.0
    # Circuit breakers per capability and per agent: open after this many consecutive failures, probe after reset.
    breaker_fail_max: int = 5
    breaker_reset_s: float = 30.0
    # Agents heartbeat this often; the registry marks an agent lost after agent_lost_after_s of silence.
    heartbeat_interval_s: float = 2.0
    agent_lost_after_s: float = 10.0
    # Tasks an agent runs at once; also its prefetch, kept small so queue priority holds under backlog.
    agent_concurrency: int = 4
    log_level: str = "INFO"


@lru_cache
def get_settings() -> Settings:
    return Settings()
