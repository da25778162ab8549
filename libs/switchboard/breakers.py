"""Circuit breakers per capability ("cap:<name>") and per agent ("agent:<name>"), on pybreaker with its
Redis storage, so every dispatcher and aggregator replica sees one state.

The aggregator feeds outcomes in (a retryable failure counts against the breaker, a success resets it);
the dispatcher reads states and stops routing to an open capability until its reset timeout has passed,
when tasks flow again as the half-open probe: the next outcome closes the breaker or opens it again.
An agent whose breaker opens stops taking work until its reset timeout, while others carry on.
All calls here are blocking Redis calls: run them in a thread.
"""

from __future__ import annotations

import time

import pybreaker
import redis

from switchboard.settings import Settings


class _Failed(Exception):
    pass


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _Failed()


class Breakers:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis = client
        self.ns = settings.namespace
        self.fail_max = settings.breaker_fail_max
        self.reset_s = settings.breaker_reset_s
        self._breakers: dict[str, pybreaker.CircuitBreaker] = {}

    def _key(self, name: str, field: str) -> str:
        return f"{self.ns}:breaker:{name}:pybreaker:{field}"

    def breaker(self, name: str) -> pybreaker.CircuitBreaker:
        if name not in self._breakers:
            storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, self.redis,
                                                    namespace=f"{self.ns}:breaker:{name}")
            self._breakers[name] = pybreaker.CircuitBreaker(
                fail_max=self.fail_max, reset_timeout=self.reset_s, state_storage=storage, name=name)
        return self._breakers[name]

    def record(self, name: str, ok: bool) -> tuple[str, float | None]:
        """Feeds one outcome; returns the breaker's state after it and, if open, when it opened."""
        breaker = self.breaker(name)
        try:
            breaker.call(_succeed if ok else _fail)
        except (_Failed, pybreaker.CircuitBreakerError):
            pass
        state = breaker.current_state
        opened_at = breaker._state_storage.opened_at if state == "open" else None
        return state, opened_at.timestamp() if opened_at else None

    def snapshot(self, names: list[str]) -> dict[str, dict]:
        """State, consecutive failures and seconds until a probe, for each name, in one round trip."""
        if not names:
            return {}
        keys = [self._key(n, f) for n in names for f in ("state", "fail_counter", "opened_at")]
        values = self.redis.mget(keys)
        now = time.time()
        out = {}
        for i, name in enumerate(names):
            state, failures, opened_at = values[3 * i: 3 * i + 3]
            state = state.decode() if state else pybreaker.STATE_CLOSED
            retry_in = max(0.0, int(opened_at) + self.reset_s - now) if opened_at and state == "open" else 0.0
            out[name] = {"state": state, "failures": int(failures or 0), "probe_in_s": round(retry_in, 1)}
        return out


def allows(snapshot: dict | None) -> bool:
    """Route to it? Closed, half-open, or open long enough that a probe is due."""
    return snapshot is None or snapshot["state"] != "open" or snapshot["probe_in_s"] <= 0
