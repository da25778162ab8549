"""Fixtures: RabbitMQ and Redis from AMQP_URL / REDIS_URL, else testcontainers where a Docker engine
exists, else the test is skipped with the reason."""

from __future__ import annotations

import os

import pytest

from tests.harness import NAMESPACES, Platform, make_settings, service_processes, sweep_broker


def _from_container(kind: str):
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return None
    try:
        if kind == "amqp":
            from testcontainers.rabbitmq import RabbitMqContainer

            container = RabbitMqContainer("rabbitmq:3.13").start()
            params = container.get_connection_params()
            return container, f"amqp://guest:guest@{params.host}:{params.port}/"
        from testcontainers.redis import RedisContainer

        container = RedisContainer("redis:7").start()
        return container, f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
    except ImportError:
        return None


def _url(env: str, kind: str, server: str):
    url = os.environ.get(env)
    if url:
        yield url
        return
    started = _from_container(kind)
    if started is None:
        pytest.skip(f"{server} needed: set {env}, or run where a Docker engine and testcontainers exist")
    container, url = started
    yield url
    container.stop()


@pytest.fixture(scope="session")
def amqp_url():
    for url in _url("AMQP_URL", "amqp", "RabbitMQ"):
        yield url
        # After the last test: nothing of this run's namespaces stays on a shared broker.
        sweep_broker(url, NAMESPACES)


@pytest.fixture(scope="session")
def redis_url():
    yield from _url("REDIS_URL", "redis", "Redis")


@pytest.fixture
def settings(amqp_url, redis_url, tmp_path):
    return make_settings(amqp_url, redis_url, tmp_path / "store.sqlite3")


@pytest.fixture
async def platform(settings):
    platform = Platform(settings)
    try:
        await platform.start()
        yield platform
    finally:
        await platform.close()


@pytest.fixture
async def processes(settings):
    """Every service and the example agents, each a process of its own (harness.service_processes)."""
    async with service_processes(settings) as running:
        yield running
