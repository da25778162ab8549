"""The REST API service: the FastAPI app of app.py, served by uvicorn inside the service lifecycle."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

from services.api.app import create_app
from services.api.events import EventHub
import redis

from switchboard.audit import AuditLog
from switchboard.breakers import Breakers
from switchboard.codec import Codec
from switchboard.control import Controls
from switchboard.registry import RegistryClient
from switchboard.runtime import Service
from switchboard.tokens import Tokens
from switchboard.deadletters import DeadLetters
from switchboard.workflows import WorkflowStore


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the service lifecycle owns SIGTERM and SIGINT, and drains the whole service


class Api(Service):
    name = "api"
    default_port = 8000
    uses_store = True
    uses_redis = True
    serves_http = True

    @property
    def port(self) -> int:
        return self.settings.api_port

    async def setup(self) -> None:
        self.workflows = WorkflowStore(self.store, self.settings)
        self.routes = await self.follow_routes()  # workflows that wait on nothing start here (see app.submit)
        self.registry = RegistryClient(self.redis, self.settings)
        self.dead_letters = DeadLetters(self.store, self.settings)
        self.controls = Controls(self.store, self.settings.namespace)
        self.tokens = Tokens(self.store, self.settings.namespace, bootstrap=self.settings.api_token)
        self.audit = AuditLog(self.store, self.settings.namespace)
        self.codec = Codec.from_setting(self.settings.payload_keys)
        self.breakers = Breakers(redis.Redis.from_url(self.settings.redis_url), self.settings)
        self.events = EventHub(self.bus)
        await self.events.start(self)
        self.app = create_app(self)
        config = uvicorn.Config(self.app, host=self.settings.api_host, port=self.port, lifespan="off",
                                log_config=None, access_log=False)
        self.server = _EmbeddedServer(config)
        config.load()
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup()
        if self.server.should_exit:
            raise OSError(f"api cannot listen on {self.settings.api_host}:{self.port}")
        self.main_loop = asyncio.create_task(self.server.main_loop())

    async def teardown(self) -> None:
        if hasattr(self, "events"):
            self.events.close()  # open streams would hold up the server's shutdown
        if hasattr(self, "main_loop"):
            self.server.should_exit = True
            await self.main_loop
            await self.server.shutdown()
