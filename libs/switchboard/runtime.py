"""One lifecycle for every service: settings, logging, resources, a health port, drain on SIGTERM.

A service subclasses Service, says which resources it needs, and implements setup() (start consuming)
and teardown() (stop consuming, finish in-flight work). `serve()` does the rest.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import ClassVar

import redis.asyncio as aioredis
from aio_pika.exceptions import AMQPError
from prometheus_client import CONTENT_TYPE_LATEST

from switchboard import stream, telemetry
from switchboard.telemetry import logs, metrics, tracing
from switchboard.bus import Bus, Consumer
from switchboard.routing import REFRESH_S, Routes
from switchboard.settings import Settings
from switchboard.state import Store, StoreUnavailable, open_store

log = logging.getLogger(__name__)

# Every message allocates a few dozen short-lived objects; CPython's default (700, 10, 10) then collects
# hundreds of times a second under load. Fewer, larger young collections cost less in all.
_GC_THRESHOLDS = (20_000, 50, 100)
_CANCEL_WAIT_S = 5.0


class Service:
    name: ClassVar[str]
    default_port: ClassVar[int]
    uses_store: ClassVar[bool] = False
    uses_redis: ClassVar[bool] = False
    # A service with an HTTP server of its own serves /healthz, /readyz and /metrics there.
    serves_http: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings
        self.bus = Bus(settings, self.name)
        self.store: Store | None = None
        self.redis: aioredis.Redis | None = None
        self._started = False
        self._consumers: list[Consumer] = []
        self._background: list[asyncio.Task] = []

    async def start(self) -> None:
        if self.uses_store:
            self.store = open_store(self.settings.store_url)
        if self.uses_redis:
            self.redis = aioredis.from_url(self.settings.redis_url)
            await self.redis.ping()
        await self.bus.connect()
        await self.setup()
        self._started = True

    async def stop(self) -> None:
        """Drain consumers first (their handlers may still need the background tasks), then the rest."""
        self._started = False
        try:
            for consumer in reversed(self._consumers):  # last started, first stopped
                await consumer.stop()
            for task in self._background:
                task.cancel()
            if self._background:  # bounded: a task that swallowed its cancellation must not hold up the stop
                _, stuck = await asyncio.wait(self._background, timeout=_CANCEL_WAIT_S)
                for task in stuck:
                    log.warning("%s: background task %s did not stop when cancelled", self.name, task.get_name())
            await self.teardown()
        finally:
            self._consumers.clear()
            self._background.clear()
            await self.bus.close()
            if self.redis is not None:
                await self.redis.aclose()
            if self.store is not None:
                await self.store.close()

    async def setup(self) -> None:
        """Start consuming (self.consume) and any background work (self.every, self.background)."""

    async def teardown(self) -> None:
        """Release what setup() made beyond consumers and background tasks, which stop() handles."""

    async def consume(self, queues: str | list[str], handler, *, prefetch: int, **options) -> Consumer:
        consumer = await self.bus.consume(queues, handler, prefetch=prefetch, **options)
        self._consumers.append(consumer)
        return consumer

    async def subscribe_control(self, handler) -> Consumer:
        """Every control broadcast (cancel, control.state, breaker) reaches this process's handler."""
        consumer = await self.bus.consume_private(handler, bind_control=True)
        self._consumers.append(consumer)
        return consumer

    async def follow_routes(self) -> Routes:
        """Routing knowledge kept fresh for this service (see switchboard.routing); needs the store and Redis."""
        routes = Routes(self.store, self.redis, self.settings)
        await routes.refresh()

        async def on_control(env, message) -> None:
            if env.subject == "control.state":
                routes.on_control(env.payload)
            elif env.subject == "stream.watch":
                stream.watch(float(env.payload.get("for_s", stream.WATCH_S)))

        stream.gate()  # this service hears when someone watches the stream

        await self.subscribe_control(on_control)
        self.every(REFRESH_S, routes.refresh, "routing refresh")
        return routes

    def background(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.append(task)
        return task

    def every(self, interval_s: float, fn, what: str) -> asyncio.Task:
        """Runs `await fn()` every interval; a failure is logged and the next round tries again."""

        async def repeat():
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await fn()
                except Exception as exc:
                    log.warning("%s failed (%s); retrying in %.1fs", what, exc, interval_s)

        return self.background(repeat())

    def is_ready(self) -> bool:
        return self._started and self.bus.is_connected

    @property
    def port(self) -> int:
        return self.settings.health_port or self.default_port


async def _health_handler(services: tuple[Service, ...], reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        request_line = await asyncio.wait_for(reader.readline(), 5)
        while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
            pass
        parts = request_line.decode("latin-1").split()
        path, _, query = (parts[1] if len(parts) > 1 else "/").partition("?")
        if path == "/healthz":
            status, body, ctype = 200, b'{"status":"ok"}', "application/json"
        elif path == "/readyz":
            ready = all(s.is_ready() for s in services)
            status = 200 if ready else 503
            body, ctype = (b'{"status":"ready"}' if ready else b'{"status":"starting"}'), "application/json"
        elif path == "/metrics":
            status, body, ctype = 200, metrics.exposition(query), CONTENT_TYPE_LATEST
        else:
            status, body, ctype = 404, b'{"error":{"code":"not_found","message":"no such path"}}', "application/json"
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def start_health_server(*services: Service) -> asyncio.AbstractServer:
    first = services[0]
    return await asyncio.start_server(
        lambda r, w: _health_handler(services, r, w), first.settings.health_host, first.port
    )


async def serve(*services: Service, health: bool = True) -> None:
    """Run one or more services in this process until SIGTERM or SIGINT, then drain and close."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    first = services[0]
    server = await start_health_server(*services) if health and not first.serves_http else None
    if server:
        log.info("health on http://%s:%d/healthz", first.settings.health_host, first.port)
    started: list[Service] = []
    try:
        for service in services:
            await _start_with_retry(service, stopping)
            started.append(service)
            if stopping.is_set():
                break
            log.info("%s ready", service.name)
        # What start-up made (modules, clients, metrics) lives as long as the process: keep it out of
        # every later collection, which then scans only what the work itself allocates.
        gc.freeze()
        gc.set_threshold(*_GC_THRESHOLDS)
        await stopping.wait()
        log.info("draining")
    finally:
        for service in reversed(started):
            await service.stop()
        if server:
            server.close()
        log.info("stopped")


async def _start_with_retry(service: Service, stopping: asyncio.Event) -> None:
    # A dependency that is still starting (compose, k8s) is waited for, with backoff, not crash-looped on.
    delay = 0.5
    while not stopping.is_set():
        try:
            await service.start()
            return
        except (OSError, asyncio.TimeoutError, AMQPError, aioredis.ConnectionError, StoreUnavailable) as exc:
            log.warning("%s cannot start yet (%s); retrying in %.1fs", service.name, exc, delay)
            await service.stop()
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, 10.0)


def run(*services: Service) -> None:
    name = services[0].name if len(services) == 1 else "agents"
    logs.setup_logging(name, services[0].settings.log_level)
    try:
        tracing.configure(name)
    except ValueError as exc:  # a misconfigured OTEL_* variable: say which, once, rather than a traceback
        log.error("tracing cannot start: %s", exc)
        raise SystemExit(2) from None
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(*services))
    finally:
        telemetry.close()


def _loop_factory():
    try:
        import uvloop  # measured: ~15% less CPU per task than the default loop
    except ImportError:
        return None
    return uvloop.new_event_loop
