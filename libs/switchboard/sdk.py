"""The agent SDK: declare a name and capabilities, decorate an async handler per capability, run.

    agent = Agent("summarizer")

    @agent.handler("summarize")
    async def summarize(task):
        notes = await task.delegate("research", {"topic": task.payload["topic"]})
        return {"summary": notes[:100]}

    agent.run()

The SDK registers and heartbeats, consumes with manual acks and a small prefetch (so priorities hold),
enforces each task's timeout, reports results and errors, lets handlers delegate sub-workflows and
await them, cancels handlers of cancelled workflows, and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage

from switchboard import runtime, telemetry
from switchboard.bus import Consumer
from switchboard.codec import Codec, CodecError
from switchboard.protocol import Envelope, MessageType, WorkflowSpec, validate_workflow
from switchboard.settings import Settings, get_settings
from switchboard.telemetry import TaskRun

log = logging.getLogger(__name__)

TaskHandler = Callable[["TaskContext"], Awaitable[Any]]
_CANCELLED_MEMORY = 10_000  # workflow ids remembered as cancelled, oldest forgotten first
STARTED_AFTER_S = 0.02
_CONTROL_QUERY_S = 5.0  # how long a starting agent waits to learn whether an emergency stop is on
# RabbitMQ closes a channel whose delivery stays unacked past its consumer timeout (30 min by default).
# Agents ask to be exempt (RabbitMQ ≥ 3.12 honours this per consumer; older brokers need consumer_timeout
# raised in rabbitmq.conf): the coordinator's watchdog, not the broker, decides when a task is overdue.
_CONSUMER_TIMEOUT_MS = 8 * 24 * 3600 * 1000


class TaskError(Exception):
    """Raise from a handler to fail the attempt; retryable=False fails the task at once."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class TaskContext:
    """What a handler gets: its payload, its parents' results, and a way to delegate to other agents."""

    def __init__(self, agent: Agent, envelope: Envelope):
        self.agent = agent
        self.envelope = envelope
        self.workflow_id: str = envelope.workflow_id or ""
        self.task_id: str = envelope.task_id or ""
        self.attempt: int = envelope.attempt
        self.capability: str = envelope.payload["capability"]
        # Sealed payloads and parents' results are opened here, for the handler (switchboard.codec).
        self.payload: dict = agent.codec.open(envelope.payload.get("payload")) or {}
        self.inputs: dict = agent.codec.open_each(envelope.payload.get("inputs")) or {}
        self._delegations = 0

    async def run_workflow(self, tasks: list[dict], *, name: str | None = None) -> dict:
        """Runs a child workflow and waits for it: {"workflow_id", "status", "result", "error"}.

        The child is linked to this task. Re-running this attempt after a crash finds the same child
        (same idempotency key) rather than starting a second one.
        """
        spec = WorkflowSpec(name=name, tasks=tasks)
        settings = self.agent.settings
        validate_workflow(spec, max_payload_bytes=settings.max_payload_bytes,
                          max_tasks=settings.max_tasks_per_workflow)
        key = f"delegate:{self.workflow_id}:{self.task_id}:{self.attempt}:{self._delegations}"
        self._delegations += 1
        for child in spec.tasks:  # sealed the same way each time, so a re-run finds the same child
            child.payload = self.agent.codec.seal(child.payload, context=f"{key}:{child.id}")
        return await self.agent._delegate(self, spec, key)

    async def delegate(self, capability: str, payload: dict | None = None, **task: Any) -> Any:
        """Runs one task of `capability` as a child workflow and returns its result."""
        reply = await self.run_workflow([{"id": capability, "capability": capability,
                                          "payload": payload or {}, **task}])
        if reply["status"] != "succeeded":
            raise TaskError(f"delegated {capability!r} {reply['status']}: {reply.get('error')}")
        return reply["result"][capability]


class Agent(runtime.Service):
    default_port = 8110

    def __init__(self, name: str, *, settings: Settings | None = None, concurrency: int | None = None):
        self.name = name
        super().__init__(settings or get_settings())
        self.concurrency = concurrency or self.settings.agent_concurrency
        self.codec = Codec.from_setting(self.settings.payload_keys)
        self.handlers: dict[str, TaskHandler] = {}
        self.reply_queue = self.bus.topology.private_queue("reply", name)
        # Results, statuses, heartbeats and delegations go through agent-out, the one exchange that an
        # agent's own broker user may write to (switchboard.credentials).
        self.bus.outbox = self.bus.topology.agent_out
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        self._cancelled: collections.OrderedDict[str, int] = collections.OrderedDict()  # workflow → epoch
        self._replies: dict[str, asyncio.Future] = {}
        self._heartbeat: asyncio.Task | None = None
        self._tasks: Consumer | None = None
        self._stopped = False  # an emergency stop is on
        self._standing_back_until = 0.0  # this agent's circuit breaker is open until then
        # Prefetch is per queue, so an agent serving several capabilities may hold a few more tasks
        # than it runs; this bounds what runs at once.
        self._slots = asyncio.Semaphore(self.concurrency)

    def handler(self, capability: str) -> Callable[[TaskHandler], TaskHandler]:
        def register(fn: TaskHandler) -> TaskHandler:
            self.handlers[capability] = fn
            return fn

        return register

    @property
    def capabilities(self) -> list[str]:
        return sorted(self.handlers)

    # ---- lifecycle --------------------------------------------------------------------------------
    async def setup(self) -> None:
        topology = self.bus.topology
        queues = [topology.capability_queue(c) for c in self.capabilities] + [topology.agent_queue(self.name)]
        for queue in queues:
            await self.bus.ensure_work_queue(queue)
        # Stopped in reverse: tasks drain first, while replies to their delegations can still arrive.
        await self.subscribe_control(self._on_control)
        self._consumers.append(await self.bus.consume_private(self._on_reply, name=self.reply_queue))
        self._tasks = await self.consume(queues, self._on_task, prefetch=self.concurrency, paused=True,
                                         arguments={"x-consumer-timeout": _CONSUMER_TIMEOUT_MS})
        self._stopped = (await self._query_control()).get("stopped", False)
        await self._send_heartbeat("agent.heartbeat")
        if not self._stopped:
            await self._tasks.resume()
        self._heartbeat = self.every(self.settings.heartbeat_interval_s, self._beat, "heartbeat")

    async def _query_control(self) -> dict:
        """Asks a coordinator whether an emergency stop is on before taking any work."""
        ask = Envelope(type=MessageType.CONTROL, subject="control.query", source=self.name,
                       correlation_id=f"control:{uuid.uuid4().hex}")
        try:
            return await self._ask_coordinator(ask, timeout_s=_CONTROL_QUERY_S)
        except TimeoutError:
            log.warning("no coordinator answered within %ss; starting without knowing the controls", _CONTROL_QUERY_S)
            return {}

    async def _ask_coordinator(self, ask: Envelope, *, timeout_s: float | None = None) -> dict:
        """Publishes `ask` to the coordinators and waits for the reply carrying its correlation id."""
        future = asyncio.get_running_loop().create_future()
        self._replies[ask.correlation_id] = future
        try:
            ask.reply_to = self.reply_queue
            await self.bus.publish(ask, self.bus.topology.coordinator)
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._replies.pop(ask.correlation_id, None)

    async def _sync_consuming(self) -> None:
        if self._tasks is None:
            return
        if self._stopped or time.monotonic() < self._standing_back_until:
            await self._tasks.pause()
        else:
            await self._tasks.resume()

    async def teardown(self) -> None:
        if self.bus.is_connected:
            await self._send_heartbeat("agent.stopped")

    def run(self) -> None:
        runtime.run(self)

    # ---- registry ----------------------------------------------------------------------------------
    async def _send_heartbeat(self, subject: str) -> None:
        info = {"name": self.name, "capabilities": self.capabilities, "concurrency": self.concurrency,
                "in_flight": len(self._running), "host": socket.gethostname(), "pid": os.getpid()}
        env = Envelope(type=MessageType.EVENT, subject=subject, source=self.name, payload=info)
        await self.bus.publish(env, self.bus.topology.registry)

    async def _beat(self) -> None:
        await self._sync_consuming()  # ends a stand-back whose time is up
        await self._send_heartbeat("agent.heartbeat")

    # ---- tasks -------------------------------------------------------------------------------------
    async def _on_task(self, env: Envelope, message: AbstractIncomingMessage) -> None:
        if env.type != MessageType.TASK or not env.workflow_id or not env.task_id:
            raise ValueError(f"not a task message: type={env.type.value} subject={env.subject!r}")
        async with self._slots:
            await self._run_task(env)

    async def _run_task(self, env: Envelope) -> None:
        if env.payload.get("epoch", 0) <= self._cancelled.get(env.workflow_id, -1):
            return  # its workflow was cancelled (a replay starts a new epoch, which does run)
        run = TaskRun(env, env.payload.get("capability", ""), self.name)
        await telemetry.running(run, functools.partial(self._run, run))

    async def _run(self, run: TaskRun) -> None:
        """Runs the handler and publishes its result or error; run.outcome says which it was."""
        env, capability = run.envelope, run.capability
        handler = self.handlers.get(capability)
        key = (env.workflow_id, env.task_id)
        started_at = time.time()
        if handler is None:
            reply = self._error(env, "UnknownCapability", f"agent {self.name} does not serve {capability!r}", False)
            run.outcome = "failed"
        else:
            telemetry.emit("task.started", capability=capability, priority=env.priority.value, agent=self.name,
                           queue_wait_s=started_at - env.timestamp)
            try:
                context = TaskContext(self, env)
            except CodecError as exc:  # sealed with a key this agent lacks: say so, never hand over ciphertext
                reply, run.outcome = self._error(env, type(exc).__name__, f"payload {exc}", False), "failed"
                await self.bus.publish(reply, self.bus.topology.results)
                return
            task = asyncio.create_task(handler(context))
            self._running[key] = task
            announcing = asyncio.create_task(self._announce_start(env, task, started_at))
            try:
                async with asyncio.timeout(env.timeout_s):
                    result = await task
                reply = self._result(env, result)
            except TimeoutError:
                reply = self._error(env, "TimeoutError", f"timed out after {env.timeout_s}s", True)
                run.outcome = "timed_out"
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # we are shutting down: the message is requeued
                run.outcome = "cancelled"
                return  # the workflow was cancelled: nothing to report
            except TaskError as exc:
                reply, run.outcome = self._error(env, type(exc).__name__, str(exc), exc.retryable), "failed"
            except Exception as exc:
                log.exception("handler for %s failed", capability)
                reply, run.outcome = self._error(env, type(exc).__name__, str(exc), True), "failed"
            finally:
                self._running.pop(key, None)
                if not getattr(announcing, "publishing", False):
                    announcing.cancel()
                await asyncio.gather(announcing, return_exceptions=True)  # "started" goes out first
        if reply.type == MessageType.ERROR and run.outcome == "succeeded":
            run.outcome = "failed"  # the result itself was refused (too large, not serializable)
        reply.payload["started_at"] = started_at
        await self.bus.publish(reply, self.bus.topology.results)

    async def _announce_start(self, env: Envelope, handling: asyncio.Task, started_at: float) -> None:
        """Reports "running" for a task still going after STARTED_AFTER_S (which also starts the
        watchdog's clock); a quicker task just carries started_at in its result: one message fewer."""
        await asyncio.sleep(STARTED_AFTER_S)
        if handling.done():
            return
        asyncio.current_task().publishing = True
        started = Envelope(type=MessageType.STATUS, subject="started", source=self.name,
                           workflow_id=env.workflow_id, task_id=env.task_id, attempt=env.attempt,
                           payload={"started_at": started_at})
        await self.bus.publish(started, self.bus.topology.results)

    def _result(self, env: Envelope, result: Any) -> Envelope:
        try:
            size = len(orjson.dumps(result))
        except TypeError as exc:
            return self._error(env, "ResultNotSerializable", str(exc), False)
        if size > self.settings.max_payload_bytes:
            return self._error(env, "ResultTooLarge", f"result is {size} bytes, the limit is "
                               f"{self.settings.max_payload_bytes}", False)
        return Envelope(type=MessageType.RESULT, source=self.name, workflow_id=env.workflow_id,
                        task_id=env.task_id, attempt=env.attempt, payload={"result": self.codec.seal(result)})

    def _error(self, env: Envelope, kind: str, message: str, retryable: bool) -> Envelope:
        return Envelope(type=MessageType.ERROR, source=self.name, workflow_id=env.workflow_id,
                        task_id=env.task_id, attempt=env.attempt,
                        payload={"error": {"type": kind, "message": message[:2000], "retryable": retryable}})

    # ---- control and delegation ----------------------------------------------------------------------
    async def _on_control(self, env: Envelope, message: AbstractIncomingMessage) -> None:
        if env.subject == "cancel" and env.workflow_id:
            self._cancelled[env.workflow_id] = env.payload.get("epoch", 0)
            while len(self._cancelled) > _CANCELLED_MEMORY:
                self._cancelled.popitem(last=False)
            for (wf_id, _), run in list(self._running.items()):
                if wf_id == env.workflow_id:
                    run.cancel()
        elif env.subject == "control.state":
            self._stopped = env.payload.get("stopped", False)
            await self._sync_consuming()
        elif env.subject == "breaker" and env.payload.get("agent") == self.name:
            log.warning("circuit breaker open for this agent: taking no work for %ss", env.payload["retry_in_s"])
            self._standing_back_until = time.monotonic() + float(env.payload["retry_in_s"])
            await self._sync_consuming()

    async def _delegate(self, ctx: TaskContext, spec: WorkflowSpec, key: str) -> dict:
        return await self._ask_coordinator(Envelope(
            type=MessageType.EVENT, subject="workflow.submit", source=self.name, workflow_id=ctx.workflow_id,
            task_id=ctx.task_id, correlation_id=key,
            payload={"workflow": spec.model_dump(mode="json", exclude_none=True), "idempotency_key": key,
                     "parent": {"workflow_id": ctx.workflow_id, "task_id": ctx.task_id}}))

    async def _on_reply(self, env: Envelope, message: AbstractIncomingMessage) -> None:
        future = self._replies.get(env.correlation_id or "")
        if future is not None and not future.done():
            try:
                result = self.codec.open_each(env.payload.get("result"))
            except CodecError as exc:
                future.set_exception(TaskError(f"the delegated workflow's result: {exc}", retryable=False))
            else:
                future.set_result({"workflow_id": env.workflow_id, **env.payload, "result": result})
