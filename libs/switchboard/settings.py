"""The one settings object: every service and agent reads its configuration from the environment here."""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    # Accept the conventional unprefixed names (AMQP_URL, REDIS_URL) that tests, compose and k8s set.
    return AliasChoices(f"SWITCHBOARD_{name}", name)


_SECRET_NAMES = ("token", "password", "secret", "key")  # a field so named is never shown, only whether it is set


# user:password@ in any URL (amqp, amqps, redis, rediss, http...).
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@")


def redact(text: str) -> str:
    """The text with every URL's password replaced by ***: what a log line, an error or a repr may show."""
    return _URL_PASSWORD.sub(r"\1***@", text) if "://" in text else text


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore", populate_by_name=True)

    def __repr_args__(self):
        # repr() and str() show no secret: URLs without their passwords, secret fields as *** (or '').
        for name, value in super().__repr_args__():
            if isinstance(value, str) and value and any(word in (name or "") for word in _SECRET_NAMES):
                value = "***"
            elif isinstance(value, str) and "@" in value:
                value = redact(value)
            yield name, value

    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", validation_alias=_env("AMQP_URL"))
    # RabbitMQ's management HTTP API, which `switchboard agent-credentials` uses to create agents' broker
    # users. Its admin is AMQP_URL's user unless the URL names one (http://admin:secret@host:15672).
    management_url: str = "http://127.0.0.1:15672"
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL"))
    # sqlite:///path/to/file for the embedded store, fdb:// or fdb:///path/to/fdb.cluster for FoundationDB.
    store_url: str = Field("sqlite:///var/switchboard.sqlite3", validation_alias=_env("STORE_URL"))
    # Prefix of every queue, exchange and Redis key: lets several deployments (or test runs) share a broker.
    namespace: str = "sb"

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # The bootstrap admin token: while it is set every /v1 call needs a token (it, or one made with
    # POST /v1/tokens); empty means local development (no auth).
    api_token: str = Field("", repr=False)
    # Requests a second each token may make, per api replica (a token bucket of api_rate_burst); 0: no limit.
    api_rate_per_s: float = 100.0
    api_rate_burst: int = 200
    # Keys that seal payloads and results (libs/switchboard/codec.py): "id:base64key[,...]", the first
    # seals, all open. Set on the api and the agents; the other services pass ciphertext along.
    payload_keys: str = Field("", repr=False)

    @field_validator("payload_keys")
    @classmethod
    def _usable_keys(cls, value: str) -> str:
        from switchboard.codec import parse_keys

        parse_keys(value)  # a clear error now, not at the first task
        return value
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


def amqp_username(url: str) -> str | None:
    """The broker user an AMQP URL names, or None (the client's default login, or EXTERNAL auth)."""
    username = urlsplit(url).username
    return unquote(username) if username else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
