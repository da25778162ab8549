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

A handler may also report progress, stream partial output, checkpoint its state, ask a person a
question and publish events (switchboard.tasklog has the rules and bounds); `@agent.on_event(pattern)`
subscribes the agent to events. A task waiting for an answer gives up its slot and its broker delivery:
the store keeps the question, and the task, resumed when the answer comes, takes a slot again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
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

from switchboard import runtime, tasklog, telemetry, usage
from switchboard.bus import LONG_HELD, Consumer, Transient
from switchboard.codec import Codec, CodecError
from switchboard.protocol import CapabilityLimits, Envelope, MessageType, WorkflowSpec, validate_workflow
from switchboard.reporter import Reporter
from switchboard.settings import Settings, get_settings
from switchboard.telemetry import TaskRun
from switchboard.wire import settle

log = logging.getLogger(__name__)

TaskHandler = Callable[["TaskContext"], Awaitable[Any]]
EventHandler = Callable[["Event"], Awaitable[None]]
_CONTEXT_QUERY_S = 10.0  # how long a new attempt waits to learn its checkpoint before it is requeued
_CANCELLED_MEMORY = 10_000  # workflow ids remembered as cancelled, oldest forgotten first
STARTED_AFTER_S = 0.02
_CONTROL_QUERY_S = 5.0  # how long a starting agent waits to learn whether an emergency stop is on


class TaskError(Exception):
    """Raise from a handler to fail the attempt; retryable=False fails the task at once."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@dataclasses.dataclass(frozen=True)
class Event:
    """A published event, as an `on_event` handler gets it. Delivery is at least once: `id` tells a
    redelivered event from a new one."""

    id: str
    topic: str
    data: Any
    source: str
    published_at: float
    workflow_id: str | None = None
    task_id: str | None = None


class _Slot:
    """One of the agent's `concurrency` slots, held by a task while it runs. A task that waits for an
    answer gives it up, and its broker delivery too (acked: the store keeps the question)."""

    def __init__(self, agent: Agent, message: AbstractIncomingMessage):
        self._agent, self._message, self.held = agent, message, False

    async def __aenter__(self) -> _Slot:
        await self.take()
        return self

    async def __aexit__(self, *_) -> None:
        self.give_up()

    async def take(self) -> None:
        await self._agent._slots.acquire()
        self.held = True

    def give_up(self) -> None:
        if self.held:
            self.held = False
            self._agent._slots.release()

    async def leave(self) -> None:
        self.give_up()
        self._agent._waiting[asyncio.current_task()] = self
        await settle(self._message)


class TaskContext:
    """What a handler gets: its payload, its parents' results, its last checkpoint, and ways to report
    progress, stream output, ask a person, publish events and delegate to other agents."""

    def __init__(self, agent: Agent, envelope: Envelope, context: dict | None = None, slot: _Slot | None = None):
        self.agent = agent
        self.envelope = envelope
        self.workflow_id: str = envelope.workflow_id or ""
        self.task_id: str = envelope.task_id or ""
        self.attempt: int = envelope.attempt
        self.capability: str = envelope.payload["capability"]
        # Sealed payloads and parents' results are opened here, for the handler (switchboard.codec).
        self.payload: dict = agent.codec.open(envelope.payload.get("payload")) or {}
        self.inputs: dict = agent.codec.open_each(envelope.payload.get("inputs")) or {}
        context = context or {}
        # What an earlier attempt checkpointed last (None: start from the beginning).
        self.checkpoint_state: Any = agent.codec.open(context.get("checkpoint"))
        self._answers: dict = dict(context.get("answers") or {})
        self._asked: collections.Counter[str] = collections.Counter()
        self._checkpoints = 0
        self._delegations = 0
        self._usage = {"tokens": 0, "cost": 0.0, "n": 0}  # this attempt's running totals (switchboard.usage)
        self._slot = slot
        self._timeout: asyncio.Timeout | None = None  # the task's timeout, paused while it waits for an answer
        self.reporter = Reporter(functools.partial(self._report, "report"))

    # ---- progress, streaming, checkpoints, questions, events ------------------------------------------
    async def progress(self, message: str | None = None, percent: float | None = None, data: Any = None) -> None:
        """Records the attempt's latest progress (shown on the task; sent at most a few times a second)."""
        if percent is not None and (isinstance(percent, bool) or not isinstance(percent, (int, float))):
            raise TypeError("percent is a number")
        self.reporter.progress(None if message is None else str(message)[:1000], percent, data)

    async def stream(self, text: str) -> None:
        """Sends partial output (LLM tokens, say), in order, to whoever follows the workflow's events."""
        if not isinstance(text, str):
            raise TypeError(f"task.stream takes text, not {type(text).__name__}")
        await self.reporter.text(text)

    async def checkpoint(self, state: Any) -> None:
        """Stores `state` (JSON, at most the payload limit) durably: it has been committed when this
        returns, and every later attempt of the task starts with it as `checkpoint_state`."""
        self.agent._check_size("checkpoint", state)
        await self.reporter.flush()
        self._checkpoints += 1
        sealed = self.agent.codec.seal(state)
        reply = await self.agent._request(self._message(MessageType.STATUS, "checkpoint",
                                                        {"n": self._checkpoints, "state": sealed}),
                                          self.agent.bus.topology.results)
        if not reply.get("stored"):
            raise TaskError(f"checkpoint not stored: {reply.get('error')}", retryable=False)
        self.checkpoint_state = state

    async def ask(self, question: str, schema: dict | None = None, timeout_s: float | None = None) -> Any:
        """Asks a person and returns the answer (`POST /v1/workflows/{id}/tasks/{task_id}/input`), valid
        against `schema` if one is given. The task waits in status waiting_input, holding no slot; the
        wait does not count against its timeout. A later attempt that asks the same question again gets
        the stored answer at once. No answer within timeout_s fails the attempt (retryable)."""
        tasklog.check_question(question, schema, timeout_s)
        key = tasklog.question_key(question, self._asked[question])
        self._asked[question] += 1
        if key in self._answers:
            return self._answers[key]
        await self.reporter.flush()
        loop = asyncio.get_running_loop()
        remaining = None
        if self._timeout is not None and self._timeout.when() is not None:
            remaining = self._timeout.when() - loop.time()
            self._timeout.reschedule(None)
        asking = self._message(MessageType.STATUS, "ask", {"key": key, "question": question, "schema": schema,
                                                           "timeout_s": timeout_s})
        try:
            waiting = self.agent._request(asking, self.agent.bus.topology.results,
                                          on_sent=self._slot.leave if self._slot else None)
            try:
                answer = (await asyncio.wait_for(waiting, timeout_s))["answer"]
            except TimeoutError:
                raise TaskError(f"no answer to {question!r} within {timeout_s:g}s") from None
            finally:
                self.agent._waiting.pop(asyncio.current_task(), None)
            if self._slot is not None:
                await self._slot.take()
        finally:
            if remaining is not None:
                self._timeout.reschedule(loop.time() + remaining)
        self._answers[key] = answer
        return answer

    async def publish(self, topic: str, data: Any = None) -> str:
        """Publishes an event to every agent subscribed to its topic (`@agent.on_event`), and to the
        workflow's event stream; returns its id."""
        await self.reporter.flush()
        return await self.agent._publish(self._message(MessageType.EVENT, "event.publish", {}), topic, data)

    async def report_usage(self, tokens: int = 0, cost: float = 0.0) -> None:
        """Reports what the handler spent since its last report (LLM tokens, money in any one unit). It is
        added to the task's usage, its workflow's and the workflows it was delegated from; a workflow whose
        budget it crosses stops, and its running tasks (this one, maybe) are cancelled. Counted once: each
        report carries the attempt's running totals, and its result or error the final ones."""
        usage.check_amounts(tokens, cost)
        self._usage = {"tokens": self._usage["tokens"] + tokens, "cost": self._usage["cost"] + float(cost),
                       "n": self._usage["n"] + 1}
        await self._report("usage", dict(self._usage))

    def _message(self, kind: MessageType, subject: str, payload: dict) -> Envelope:
        return Envelope(type=kind, subject=subject, source=self.agent.name, workflow_id=self.workflow_id,
                        task_id=self.task_id, attempt=self.attempt, payload=payload)

    async def _report(self, subject: str, payload: dict) -> None:
        """A status report of this attempt to the aggregator (switchboard.tasklog, switchboard.usage)."""
        await self.agent.bus.publish(self._message(MessageType.STATUS, subject, payload),
                                     self.agent.bus.topology.results)

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
        self.limits: dict[str, dict] = {}  # capability → the default limits this agent declares
        self.reply_queue = self.bus.topology.private_queue("reply", name)
        # Results, statuses, heartbeats and delegations go through agent-out, the one exchange that an
        # agent's own broker user may write to (switchboard.credentials).
        self.bus.outbox = self.bus.topology.agent_out
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        self._cancelled: collections.OrderedDict[str, int] = collections.OrderedDict()  # workflow → epoch
        self._replies: dict[str, asyncio.Future] = {}
        self.subscriptions: dict[str, EventHandler] = {}  # topic pattern → handler
        self._waiting: dict[asyncio.Task, _Slot] = {}  # handlers waiting for an answer (see TaskContext.ask)
        self._heartbeat: asyncio.Task | None = None
        # The AgentHost this agent runs in (switchboard.hosting), which then subscribes to the control
        # fanout and heartbeats for all its agents; None: this agent does both itself.
        self.host = None
        self._tasks: Consumer | None = None
        self._stopped = False  # an emergency stop is on
        self._standing_back_until = 0.0  # this agent's circuit breaker is open until then
        # Prefetch is per queue, so an agent serving several capabilities may hold a few more tasks
        # than it runs; this bounds what runs at once.
        self._slots = asyncio.Semaphore(self.concurrency)

    def handler(self, capability: str, *, rate_limit: dict | None = None,
                concurrency: dict | None = None) -> Callable[[TaskHandler], TaskHandler]:
        """Serves `capability` with the decorated handler. `rate_limit` ({key, per_s, burst}) and
        `concurrency` ({key, max}) declare the capability's default limits (switchboard.limits): tasks
        submitted once the agent registered, that set none of their own, get them, unless an operator
        set the capability's defaults."""
        declared = CapabilityLimits(rate_limit=rate_limit or None, concurrency=concurrency or None).stored()

        def register(fn: TaskHandler) -> TaskHandler:
            self.handlers[capability] = fn
            if declared:
                self.limits[capability] = declared
            return fn

        return register

    def on_event(self, pattern: str) -> Callable[[EventHandler], EventHandler]:
        """Subscribes this agent name to events whose topic matches `pattern` (`*` one word, `#` any
        number): each matching event reaches one of its replicas, at least once."""
        tasklog.check_pattern(pattern)

        def register(fn: EventHandler) -> EventHandler:
            self.subscriptions[pattern] = fn
            return fn

        return register

    async def publish(self, topic: str, data: Any = None) -> str:
        """Publishes an event from outside any task; returns its id."""
        return await self._publish(Envelope(type=MessageType.EVENT, subject="event.publish", source=self.name),
                                   topic, data)

    async def _publish(self, env: Envelope, topic: str, data: Any) -> str:
        tasklog.check_topic(topic)
        self._check_size("event data", data)
        env.payload = {"topic": topic, "data": data}
        await self.bus.publish(env, self.bus.topology.results)  # the aggregator passes it on, once recorded
        return env.message_id

    def _check_size(self, what: str, value: Any) -> None:
        size = len(orjson.dumps(value))
        if size > self.settings.max_payload_bytes:
            raise ValueError(f"{what} is {size} bytes, the limit is {self.settings.max_payload_bytes}")

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
        if self.host is None:
            await self.subscribe_control(self._on_control)
        self._consumers.append(await self.bus.consume_private(self._on_reply, name=self.reply_queue))
        if self.subscriptions:
            # An agent with a broker user of its own finds its queue declared (agent-credentials create)
            # and only binds its patterns to it.
            queue = await topology.declare_subscription(self.bus._channel, self.name, sorted(self.subscriptions),
                                                        passive=self.bus.restricted)
            await self.consume(queue, self._on_event, prefetch=self.concurrency)
        self._tasks = await self.consume(queues, self._on_task, prefetch=self.concurrency, paused=True,
                                         arguments=LONG_HELD)
        if self.host is not None and self.host.stopped is not None:
            self._stopped = self.host.stopped  # asked once for all its agents
        else:
            self._stopped = (await self._query_control()).get("stopped", False)
        if self.host is None:  # a host reports its agents together, once they have all started
            await self._send_heartbeat("agent.heartbeat")
        if not self._stopped:
            await self._tasks.resume()
        if self.host is None:
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
        return await self._request(ask, self.bus.topology.coordinator, timeout_s=timeout_s)

    async def _request(self, ask: Envelope, queue: str, *, timeout_s: float | None = None, on_sent=None) -> dict:
        """Publishes `ask` to a service's queue and waits for the reply to this agent's reply queue that
        carries its correlation id (one is made if it has none)."""
        ask.correlation_id = ask.correlation_id or f"{ask.subject}:{uuid.uuid4().hex}"
        future = asyncio.get_running_loop().create_future()
        self._replies[ask.correlation_id] = future
        try:
            ask.reply_to = self.reply_queue
            await self.bus.publish(ask, queue)
            if on_sent is not None:
                await on_sent()
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

    async def stop(self) -> None:
        # Handlers waiting for an answer are dropped first, so the drain does not wait for them: the store
        # keeps their question, and an answer that finds this agent gone queues the task again.
        for handler in list(self._waiting):
            handler.cancel()
        await super().stop()

    async def teardown(self) -> None:
        if self.bus.is_connected:
            await self._send_heartbeat("agent.stopped")

    def run(self) -> None:
        runtime.run(self)

    # ---- registry ----------------------------------------------------------------------------------
    def registration(self) -> dict:
        """What a heartbeat says of this agent."""
        info = {"name": self.name, "capabilities": self.capabilities, "concurrency": self.concurrency,
                "in_flight": len(self._running), "host": socket.gethostname(), "pid": os.getpid()}
        if self.limits:
            info["limits"] = self.limits
        return info

    async def _send_heartbeat(self, subject: str) -> None:
        env = Envelope(type=MessageType.EVENT, subject=subject, source=self.name, payload=self.registration())
        await self.bus.publish(env, self.bus.topology.registry)

    async def _beat(self) -> None:
        await self._sync_consuming()  # ends a stand-back whose time is up
        await self._send_heartbeat("agent.heartbeat")

    # ---- tasks -------------------------------------------------------------------------------------
    async def _on_task(self, env: Envelope, message: AbstractIncomingMessage) -> None:
        if env.type != MessageType.TASK or not env.workflow_id or not env.task_id:
            raise ValueError(f"not a task message: type={env.type.value} subject={env.subject!r}")
        async with _Slot(self, message) as slot:
            await self._run_task(env, slot, message.redelivered)

    async def _run_task(self, env: Envelope, slot: _Slot, redelivered: bool) -> None:
        if env.payload.get("epoch", 0) <= self._cancelled.get(env.workflow_id, -1):
            return  # its workflow was cancelled (a replay starts a new epoch, which does run)
        context = await self._context(env, redelivered) if env.attempt > 1 or redelivered else None
        if context is not None:
            if context.get("skip"):
                return  # it finished meanwhile (its first run's outcome came in after all)
            env.attempt = context.get("attempt", env.attempt)
        run = TaskRun(env, env.payload.get("capability", ""), self.name)
        await telemetry.running(run, functools.partial(self._run, run, context, slot))

    async def _context(self, env: Envelope, redelivered: bool) -> dict:
        """A retried or redelivered attempt's start: the checkpoint and answers of the attempts before, and
        (redelivered) the attempt number to run as (WorkflowStore.context)."""
        ask = Envelope(type=MessageType.EVENT, subject="task.context", source=self.name,
                       workflow_id=env.workflow_id, task_id=env.task_id, attempt=env.attempt,
                       payload={"redelivered": redelivered})
        try:
            return await self._ask_coordinator(ask, timeout_s=_CONTEXT_QUERY_S)
        except TimeoutError:
            raise Transient(f"no coordinator told the checkpoint of {env.task_id!r} within {_CONTEXT_QUERY_S}s") from None

    async def _run(self, run: TaskRun, stored: dict | None = None, slot: _Slot | None = None) -> None:
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
                context = TaskContext(self, env, stored, slot)
            except CodecError as exc:  # sealed with a key this agent lacks: say so, never hand over ciphertext
                reply, run.outcome = self._error(env, type(exc).__name__, f"payload {exc}", False), "failed"
                await self.bus.publish(reply, self.bus.topology.results)
                return
            task = asyncio.create_task(handler(context))
            self._running[key] = task
            announcing: list[asyncio.Task] = []

            def announce() -> None:  # a timer, not a task per run: most tasks end before it fires
                if not task.done():
                    announcing.append(asyncio.ensure_future(self._announce_start(env, started_at)))

            timer = asyncio.get_running_loop().call_later(STARTED_AFTER_S, announce)
            try:
                async with asyncio.timeout(env.timeout_s) as context._timeout:
                    result = await task
                    streamed = await context.reporter.flush()  # what it streamed is recorded before its result
                reply = self._result(env, result)
                if streamed:
                    reply.payload["streamed"] = streamed
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
                context.reporter.close()
                timer.cancel()
                await asyncio.gather(*announcing, return_exceptions=True)  # "started" goes out first
        if reply.type == MessageType.ERROR and run.outcome == "succeeded":
            run.outcome = "failed"  # the result itself was refused (too large, not serializable)
        if handler is not None and context._usage["n"]:  # its final totals (see TaskContext.report_usage)
            reply.payload["usage"] = dict(context._usage)
        reply.payload["started_at"] = started_at
        # Outcomes of tasks that end together go in one message (Coalescer): the aggregator takes batches.
        await self.bus.publish(reply, self.bus.topology.results, coalesce=True)

    async def _announce_start(self, env: Envelope, started_at: float) -> None:
        """Reports "running" for a task still going after STARTED_AFTER_S (which also starts the
        watchdog's clock); a quicker task just carries started_at in its result: one message fewer."""
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
        if future is None or future.done():
            return
        if env.subject != "workflow.finished":  # an answer, a checkpoint stored, a task's context, controls
            future.set_result(env.payload)
            return
        try:
            result = self.codec.open_each(env.payload.get("result"))
        except CodecError as exc:
            future.set_exception(TaskError(f"the delegated workflow's result: {exc}", retryable=False))
        else:
            future.set_result({"workflow_id": env.workflow_id, **env.payload, "result": result})

    async def _on_event(self, env: Envelope, message: AbstractIncomingMessage) -> None:
        event = Event(id=env.message_id, topic=env.subject, data=env.payload.get("data"), source=env.source,
                      published_at=env.timestamp, workflow_id=env.workflow_id, task_id=env.task_id)
        for pattern, handler in self.subscriptions.items():
            if tasklog.topic_matches(pattern, event.topic):
                await handler(event)
