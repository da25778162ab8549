"""Where a ready task may go now: the dispatcher's knowledge of live capabilities and agents, the
operator's controls and the circuit breakers, kept fresh by whoever routes.

The dispatcher routes every case. Services that publish ready tasks (coordinator, aggregator, api)
consult the same knowledge to send a task straight to its capability queue when nothing stands in its
way: one hop fewer in the common case. Everything else (a named agent, limits, no live agent, a pause, an
open breaker) goes to the dispatcher.
"""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from switchboard.breakers import Breakers, allows
from switchboard.control import DEFAULT, Controls, dispatch_blocked
from switchboard.protocol import Envelope
from switchboard.registry import RegistryClient
from switchboard.settings import Settings
from switchboard.state import Store

REFRESH_S = 0.5


class Routes:
    def __init__(self, store: Store, redis_client: aioredis.Redis, settings: Settings):
        self.registry = RegistryClient(redis_client, settings)
        self.controls = Controls(store, settings.namespace)
        self.breakers = Breakers(redis.Redis.from_url(settings.redis_url), settings)
        self.control: dict = dict(DEFAULT)
        self.live_capabilities: set[str] = set()
        self.live_agents: set[str] = set()
        self.breaker_states: dict[str, dict] = {}
        self.known = False  # nothing is sent directly before the first refresh

    async def refresh(self, also_capabilities: set[str] = frozenset()) -> None:
        self.live_capabilities = await self.registry.live_capabilities()
        self.live_agents = await self.registry.live_agents()
        self.control = await self.controls.get()  # a control broadcast missed while disconnected
        names = ([f"cap:{c}" for c in self.live_capabilities | also_capabilities]
                 + [f"agent:{a}" for a in self.live_agents])
        self.breaker_states = await asyncio.to_thread(self.breakers.snapshot, names)
        self.known = True

    def on_control(self, state: dict) -> None:
        self.control = state

    def blocked(self, capability: str) -> str | None:
        """Why tasks of this capability must wait, or None."""
        reason = dispatch_blocked(self.control, capability)
        if reason is None and not allows(self.breaker_states.get(f"cap:{capability}")):
            reason = f"circuit breaker open for capability {capability!r}"
        return reason

    def direct(self, env: Envelope) -> str | None:
        """The capability whose queue this task can go to straight away, or None (ask the dispatcher)."""
        capability = env.payload.get("capability")
        if (not self.known or env.payload.get("agent") or env.payload.get("limits")
                or capability not in self.live_capabilities or self.blocked(capability)):
            return None
        return capability
