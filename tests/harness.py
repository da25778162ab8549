"""Test helpers: real services in this process against the real broker, Redis and store, in a
namespace of their own, and deadline-bound waiting (never a sleep as synchronisation)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aio_pika
import httpx
import redis.asyncio as aioredis

from switchboard import credentials
from switchboard.cli import load_service
from switchboard.runtime import Service
from switchboard.sdk import Agent
from switchboard.settings import Settings
from switchboard.topology import Topology
from switchboard.workflows import TERMINAL_WORKFLOW

ALL_SERVICES = ("api", "coordinator", "dispatcher", "registry", "aggregator", "dlq_replayer")


async def listed_agents(client: httpx.AsyncClient, url: str, **filters) -> list[dict] | None:
    """Every agent GET /v1/agents lists with these filters, page after page; None if a page is refused."""
    agents: list[dict] = []
    params = {"limit": 1000, **filters}
    while True:
        response = await client.get(url, params=params)
        if response.status_code != 200:
            return None
        body = response.json()
        agents += body["agents"]
        if not body.get("next"):
            return agents
        params["after"] = body["next"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every namespace this test run made, for sweep_broker() at the end of the session.
NAMESPACES: set[str] = set()


def make_settings(amqp_url: str, redis_url: str, store_path, **overrides) -> Settings:
    values = dict(
        amqp_url=amqp_url, redis_url=redis_url, store_url=f"sqlite:///{store_path}",
        namespace=f"t{uuid.uuid4().hex[:10]}", api_port=free_port(),
        heartbeat_interval_s=0.2, agent_lost_after_s=2.0,
    )
    values.update(overrides)
    NAMESPACES.add(values["namespace"])
    return Settings(**values)


def sweep_broker(amqp_url: str, namespaces: set[str]) -> int:
    """Deletes what is left on the broker of the given namespaces' queues and exchanges, found through
    RabbitMQ's management API: cleanup() deletes the names a test knows, and a test that parks a task
    (hold.*, paused.*, a limits gate) or never reaches its cleanup leaves more. Returns how many it
    deleted; 0 where the management API does not answer."""
    with credentials.Management(Settings(amqp_url=amqp_url)) as api:
        if not namespaces or not api.answers():
            return 0
        deleted = 0
        try:
            for kind in ("queues", "exchanges"):
                listed = api.client.get(f"/{kind}/{api.vhost}", params={"columns": "name"}).json()
                for name in (item["name"] for item in listed):
                    if name.split(".", 1)[0] in namespaces:
                        api.client.delete(f"/{kind}/{api.vhost}/{quote(name, safe='')}")
                        deleted += 1
        except (httpx.HTTPError, ValueError) as exc:  # a sweep that fails leaves leftovers, not a failed run
            print(f"sweep_broker: stopped after {deleted} deletions: {exc}", file=sys.stderr)
        return deleted


class Deadline(AssertionError):
    """A wait ran out of time."""


async def wait_for(predicate: Callable[[], Awaitable[object] | object], *, timeout: float = 30.0,
                   what: str = "condition", interval: float = 0.02,
                   on_timeout: Callable[[], str] | None = None) -> object:
    """Polls until predicate() is truthy and returns that value; Deadline after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise Deadline(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        await asyncio.sleep(interval)


class Platform:
    """Every service (or a chosen few) and some agents, started in this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.services: dict[str, Service] = {}
        self.agents: list[Agent] = []
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=60)
        self._queues: set[str] = set()

    @property
    def topology(self) -> Topology:
        return Topology(self.settings.namespace)

    async def start(self, services=ALL_SERVICES) -> Platform:
        for name in services:
            service = load_service(name, self.settings)
            await service.start()
            self.services[name] = service
        return self

    async def add_agent(self, agent: Agent) -> Agent:
        await agent.start()
        self.agents.append(agent)
        await wait_for(self._registered(agent.name), what=f"agent {agent.name} registered")
        return agent

    def _registered(self, name: str):
        async def check() -> bool:
            agents = await listed_agents(self.client, "/v1/agents", status="alive")
            return any(a["name"] == name for a in agents or ())

        return check

    async def stop_agent(self, agent: Agent) -> None:
        self._queues |= agent.bus._declared
        if agent.subscriptions:
            self._queues.add(self.topology.subscription_queue(agent.name))
        await agent.stop()
        self.agents.remove(agent)

    async def submit(self, spec: dict, **kwargs) -> str:
        response = await self.client.post("/v1/workflows", json=spec, **kwargs)
        assert response.status_code == 202, response.text
        return response.json()["workflow_id"]

    async def wait(self, workflow_id: str, *, timeout: float = 60.0, until=tuple(TERMINAL_WORKFLOW)):
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(5.0, deadline - time.monotonic()))
            view = (await self.client.get(f"/v1/workflows/{workflow_id}", params={"wait": wait})).json()
            if view["status"] in until or time.monotonic() > deadline:
                assert view["status"] in until, f"workflow still {view['status']}: {view}"
                return view

    async def close(self) -> None:
        for agent in list(self.agents):
            await self.stop_agent(agent)
        for service in reversed(list(self.services.values())):
            self._queues |= service.bus._declared
            await service.stop()
        await self.client.aclose()
        await cleanup(self.settings, self._queues)


async def cleanup(settings: Settings, queues: set[str], *, broker: bool = True, redis: bool = True) -> None:
    """Deletes the namespace's queues, exchanges and Redis keys from the shared servers."""
    topology = Topology(settings.namespace)
    if broker:
        connection = await aio_pika.connect(settings.amqp_url)
        try:
            for name in queues | {topology.dispatch, topology.coordinator, topology.results, topology.registry,
                                  topology.dlq, topology.replay, topology.limits}:
                channel = await connection.channel()
                try:
                    await channel.queue_delete(name)
                except aio_pika.exceptions.AMQPError:
                    pass
            for name in (topology.dlx, topology.control, topology.events, topology.agent_out, topology.topics):
                channel = await connection.channel()
                try:
                    await channel.exchange_delete(name)
                except aio_pika.exceptions.AMQPError:
                    pass
        finally:
            await connection.close()
    if redis:
        client = aioredis.from_url(settings.redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"*{settings.namespace}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


EXAMPLE_CAPABILITIES = ("echo", "sleep", "fail", "plan", "write")
EXAMPLE_AGENTS = ("echo-agent", "sleep-agent", "fail-agent", "planner-agent", "writer-agent", "announcer-agent")
EXAMPLE_SUBSCRIBERS = ("announcer-agent",)


def process_env(settings: Settings, env: dict | None = None) -> dict:
    """The environment of a process of this platform (`switchboard serve`, or a test's agent)."""
    return {**os.environ, "SWITCHBOARD_AMQP_URL": settings.amqp_url, "SWITCHBOARD_REDIS_URL": settings.redis_url,
            "SWITCHBOARD_STORE_URL": settings.store_url, "SWITCHBOARD_NAMESPACE": settings.namespace,
            "SWITCHBOARD_API_PORT": str(settings.api_port), "SWITCHBOARD_HEARTBEAT_INTERVAL_S": "0.2",
            **(env or {})}


async def serve_process(settings: Settings, name: str, health_port: int, env: dict | None = None):
    """`switchboard serve <name>` (a service, or "agents": the example agents) as a process of its own."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "switchboard.cli", "serve", name,
        env={**process_env(settings, env), "SWITCHBOARD_HEALTH_PORT": str(health_port)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


@contextlib.asynccontextmanager
async def service_processes(settings: Settings, env: dict | None = None):
    """Every service and the example agents, each a `switchboard serve` process of its own, as in
    production; yields ({name: process}, {name: health port}). Output is piped: read it after SIGTERM."""
    procs: dict[str, asyncio.subprocess.Process] = {}
    ports: dict[str, int] = {}
    try:
        for name in (*ALL_SERVICES, "agents"):
            ports[name] = settings.api_port if name == "api" else free_port()
            procs[name] = await serve_process(settings, name, ports[name], env)
        yield procs, ports
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        topology = Topology(settings.namespace)
        await cleanup(settings, example_queues(topology))


def example_queues(topology: Topology) -> set[str]:
    """Every queue the example agents, and the dispatcher on their behalf, may declare."""
    return ({q for c in EXAMPLE_CAPABILITIES for q in (topology.capability_queue(c), topology.hold_queue(c),
                                                         topology.paused_queue(c))}
            | {topology.agent_queue(a) for a in EXAMPLE_AGENTS}
            | {topology.subscription_queue(a) for a in EXAMPLE_SUBSCRIBERS})


async def wait_processes_ready(client: httpx.AsyncClient, settings: Settings, ports: dict[str, int],
                               procs: dict | None = None) -> None:
    """Until every process answers /readyz and the example agents are registered. With `procs`, a timeout
    says which of them had exited."""
    async def all_ready() -> bool:
        for port in ports.values():
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code != 200:
                    return False
            except httpx.TransportError:
                return False
        return True

    def exited() -> str:
        return "exited: " + ", ".join(f"{n}={p.returncode}" for n, p in (procs or {}).items() if p.returncode is not None)

    await wait_for(all_ready, timeout=60, what="every process ready", on_timeout=exited)

    async def agents_alive() -> bool:
        agents = await listed_agents(client, f"http://127.0.0.1:{settings.api_port}/v1/agents", status="alive")
        if agents is None:  # the api is up but not every dependency yet: ask again
            return False
        return {a["name"] for a in agents} >= set(EXAMPLE_AGENTS)

    await wait_for(agents_alive, what="example agents registered")
