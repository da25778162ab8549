"""amqps:// and rediss:// work: a private RabbitMQ with a TLS listener and a private TLS-only Redis, each
with a certificate this module makes with its own CA, and the whole platform running over them."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
import time

import aio_pika
import aiormq
import pytest
import redis.asyncio as aioredis
import redis.exceptions

import example_agents
from switchboard.cli import _check
from tests.chaos.servers import (
    PrivateRabbitMQ,
    PrivateRedis,
    make_test_ca,
    rabbitmq_available,
    redis_available,
    tls_available,
)
from tests.harness import Platform, make_settings

_WHY_NOT = rabbitmq_available() or redis_available() or tls_available()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"private TLS servers cannot start: {_WHY_NOT}")

BOUND_S = 10.0  # a misconfigured client must fail within this, never hang


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One private RabbitMQ (TLS listener plus a plain one for its own readiness) and one TLS-only Redis,
    for the whole module."""
    base = tmp_path_factory.mktemp("tls")
    tls = make_test_ca(base / "certs")
    rabbit = PrivateRabbitMQ(base / "rabbitmq", tls=tls)
    redis_server = PrivateRedis(base / "redis", tls=tls)
    try:
        asyncio.run(rabbit.start(timeout=90))
        asyncio.run(redis_server.start(timeout=30))
        yield rabbit, redis_server, tls
    finally:
        asyncio.run(redis_server.close())
        asyncio.run(rabbit.stop())  # rabbitmqctl stop, then SIGTERM/SIGKILL of its process group


@pytest.fixture
def tls_settings(servers, tmp_path):
    rabbit, redis_server, _ = servers
    return make_settings(rabbit.tls_url, redis_server.url, tmp_path / "store.sqlite3")


async def broker_connections(rabbit: PrivateRabbitMQ) -> list[tuple[str, str]]:
    """(connection name, ssl) of every client connection, from `rabbitmqctl list_connections`."""
    result = await asyncio.to_thread(
        subprocess.run, [rabbit._tool("rabbitmqctl"), "-n", rabbit.node, "-q", "list_connections",
                         "client_properties", "ssl", "--formatter", "json"],
        env=rabbit._env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    return [(str(r["client_properties"]), str(r["ssl"]).lower()) for r in rows]


async def test_a_workflow_runs_over_amqps_and_rediss(tls_settings, servers):
    rabbit = servers[0]
    assert tls_settings.amqp_url.startswith("amqps://") and tls_settings.redis_url.startswith("rediss://")
    assert await _check(tls_settings) == {"RabbitMQ": None, "Redis": None}  # `switchboard check`

    platform = Platform(tls_settings)
    try:
        await platform.start()
        echo = next(a for a in example_agents.build(tls_settings) if "echo" in a.capabilities)
        await platform.add_agent(echo)
        spec = {"tasks": [{"id": "a", "capability": "echo", "payload": {"over": "tls"}},
                          {"id": "b", "capability": "echo", "depends_on": ["a"]}]}
        view = await platform.wait(await platform.submit(spec), timeout=60)
        assert view["status"] == "succeeded", view
        assert view["result"]["b"]["inputs"]["a"] == {"payload": {"over": "tls"}, "inputs": {}}
        # The broker's own view: every connection of the platform (each service and the agent) is TLS.
        connections = await broker_connections(rabbit)
        assert len(connections) >= len(platform.services) + 1, connections
        assert all(ssl_on == "true" for _, ssl_on in connections), connections
    finally:
        await platform.close()


async def _fails_within_bound(connect) -> BaseException:
    quiet = [logging.getLogger(n) for n in ("aiormq", "aio_pika")]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    began = time.monotonic()
    try:
        with pytest.raises(Exception) as caught:
            await asyncio.wait_for(connect(), BOUND_S)
    finally:
        for q in quiet:
            q.setLevel(logging.NOTSET)
    took = time.monotonic() - began
    assert not isinstance(caught.value, (asyncio.TimeoutError, TimeoutError)), f"hung for {took:.1f}s"
    assert took < BOUND_S
    return caught.value


async def test_plain_amqp_to_the_tls_port_fails_cleanly(servers):
    rabbit, _, _ = servers
    error = await _fails_within_bound(
        lambda: aio_pika.connect(f"amqp://guest:guest@localhost:{rabbit.tls_port}/"))
    assert isinstance(error, (aiormq.exceptions.AMQPConnectionError, ConnectionError)), repr(error)


async def test_amqps_without_the_ca_is_refused_as_untrusted(servers):
    rabbit, _, _ = servers
    error = await _fails_within_bound(
        lambda: aio_pika.connect(f"amqps://guest:guest@localhost:{rabbit.tls_port}/"))
    chain = [error, error.__cause__, error.__context__, *getattr(error, "args", ())]
    assert any(isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
               for e in chain if e is not None), repr(error)


async def test_redis_without_tls_or_without_the_ca_fails_cleanly(servers):
    _, redis_server, _ = servers

    async def ping(url: str):
        client = aioredis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            return await client.ping()
        finally:
            await client.aclose()

    plain = await _fails_within_bound(lambda: ping(f"redis://localhost:{redis_server.port}/0"))
    assert isinstance(plain, redis.exceptions.ConnectionError), repr(plain)
    untrusted = await _fails_within_bound(lambda: ping(f"rediss://localhost:{redis_server.port}/0"))
    assert isinstance(untrusted, redis.exceptions.ConnectionError) and "CERTIFICATE_VERIFY_FAILED" in str(untrusted)
