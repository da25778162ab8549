"""The telemetry seam: every metric, span and log field of Switchboard comes through here.

Code that does the work says what happens and nothing more:
- it runs a unit of work through a hook — consuming a message, publishing one, running a task handler,
  serving an HTTP request, processing a batch — with `await telemetry.consuming(ctx, call)` and its
  siblings. Each plug-in's hook wraps the next, as dramatiq's middleware and Temporal's interceptors do,
  so a span or a context variable can enclose the call;
- it emits named domain events with `telemetry.emit("task.finished", capability=..., outcome=...)`.

Prometheus metrics, OpenTelemetry tracing and the log context are each one Plugin (telemetry.metrics,
telemetry.tracing, telemetry.logs); tests record events with a Recorder. A hook no plug-in overrides costs
one call; an event nobody listens to costs one dict lookup.

Events (name: fields):
  task.submitted: capability, priority          task.queued: capability, priority
  task.started: capability, priority, agent, queue_wait_s
  task.finished: capability, outcome (succeeded, failed, retried, dead_lettered, cancelled, timed_out)
  workflow.finished: status, duration_s         dead_letter.replayed: (none)
  breaker.changed: breaker, state (open, half_open, closed)
  message.published: kind                       message.consumed: kind, outcome (ok, requeued, dead_lettered, dropped)
  amqp.reconnected: (none)
  store.transaction: operation, seconds, conflicts, reads, writes, written_bytes (of the attempt that committed)
  agents.counted: counts ({status: n})          dead_letters.counted: counts ({reason: n})
  workflows.sampled: in_flight, queued ({priority: n}), dependencies_pending
  cache.looked_up: capability, outcome (hit, miss, expired)
  usage.reported: capability, tokens, cost   (what a task's report added: switchboard.usage)
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

EVENTS = frozenset({
    "task.submitted", "task.queued", "task.started", "task.finished", "workflow.finished",
    "dead_letter.replayed", "breaker.changed", "message.published", "message.consumed", "amqp.reconnected",
    "store.transaction", "agents.counted", "dead_letters.counted", "workflows.sampled", "cache.looked_up",
    "usage.reported",
})
_METHODS = {"on_" + name.replace(".", "_"): name for name in EVENTS}
HOOKS = ("consume", "publish", "run_task", "http_request", "batch")

Call = Callable[[], Awaitable[Any]]


@dataclass
class Consumed:
    """A message being processed. `envelope` is None for raw (dead-letter) messages; `traceparent` is the
    one the message carries, if any."""

    queue: str
    kind: str
    headers: dict
    envelope: Any = None
    traceparent: str | None = None


@dataclass
class Published:
    """A message about to be published; hooks may add to `headers` before calling on."""

    destination: str
    kind: str
    headers: dict
    envelope: Any = None


@dataclass
class TaskRun:
    """An agent running one task; the SDK sets `outcome` before the call returns."""

    envelope: Any
    capability: str
    agent: str
    outcome: str = "succeeded"


@dataclass
class HttpRequest:
    """An API request; the server sets `route` (the path template) and `status` before the call returns."""

    method: str
    path: str
    headers: dict
    route: str = "unmatched"
    status: int = 500


@dataclass
class Batch:
    """Work done for many items at once (one store transaction for a batch of results). Each item has
    `workflow_id`, `task_id` and `traceparent` attributes; a hook may replace an item's traceparent with
    a context of its own, which the messages the item causes then carry."""

    name: str
    items: list


@dataclass
class Cause:
    """A batch item that is not a message: a task whose success releases its dependents."""

    workflow_id: str
    task_id: str
    traceparent: str | None = None


class Plugin:
    """Override any hook (call `await call_next()` once and return its value), any event as a method
    named on_<event with dots as underscores>, and traceparent() if the plug-in keeps trace context."""

    async def consume(self, message: Consumed, call_next: Call) -> Any:
        return await call_next()

    async def publish(self, message: Published, call_next: Call) -> Any:
        return await call_next()

    async def run_task(self, run: TaskRun, call_next: Call) -> Any:
        return await call_next()

    async def http_request(self, request: HttpRequest, call_next: Call) -> Any:
        return await call_next()

    async def batch(self, batch: Batch, call_next: Call) -> Any:
        return await call_next()

    def traceparent(self) -> str | None:
        return None

    def close(self) -> None:
        """Flush what is buffered; called once at shutdown."""


@dataclass
class Recorder(Plugin):
    """Keeps every event, for tests: `recorder.events` is a list of (name, fields)."""

    events: list[tuple[str, dict]] = field(default_factory=list)

    def named(self, name: str) -> list[dict]:
        return [fields for event, fields in self.events if event == name]


_plugins: list[Plugin] = []
_wrappers: dict[str, list[Callable]] = {hook: [] for hook in HOOKS}
_listeners: dict[str, list[Callable]] = {}


def install(plugin: Plugin) -> Plugin:
    """Adds a plug-in; its hooks run inside those of the plug-ins installed before it."""
    unknown = {a for a in dir(type(plugin)) if a.startswith("on_")} - set(_METHODS)
    if unknown:
        raise ValueError(f"{type(plugin).__name__}: {sorted(unknown)} name no event (known: {sorted(EVENTS)})")
    _plugins.append(plugin)
    _rebuild()
    return plugin


def uninstall(plugin: Plugin) -> None:
    _plugins.remove(plugin)
    _rebuild()


def installed(kind: type) -> Plugin | None:
    return next((p for p in _plugins if isinstance(p, kind)), None)


def _rebuild() -> None:
    for hook in HOOKS:
        _wrappers[hook] = [getattr(p, hook) for p in _plugins if getattr(type(p), hook) is not getattr(Plugin, hook)]
    _listeners.clear()
    for plugin in _plugins:
        if isinstance(plugin, Recorder):
            for name in EVENTS:
                _listeners.setdefault(name, []).append(functools.partial(_record, plugin, name))
            continue
        for method, name in _METHODS.items():
            if hasattr(plugin, method):
                _listeners.setdefault(name, []).append(getattr(plugin, method))


def _record(recorder: Recorder, name: str, **fields: Any) -> None:
    recorder.events.append((name, fields))


def emit(name: str, **fields: Any) -> None:
    for listener in _listeners.get(name, ()):
        listener(**fields)


def emit_all(events: list[tuple[str, dict]]) -> None:
    for name, fields in events:
        emit(name, **fields)


def _chain(hook: str, ctx: Any, call: Call) -> Awaitable[Any]:
    for wrapper in reversed(_wrappers[hook]):
        call = functools.partial(wrapper, ctx, call)
    return call()


def consuming(message: Consumed, call: Call) -> Awaitable[Any]:
    return _chain("consume", message, call)


def publishing(message: Published, call: Call) -> Awaitable[Any]:
    return _chain("publish", message, call)


def running(run: TaskRun, call: Call) -> Awaitable[Any]:
    return _chain("run_task", run, call)


def serving(request: HttpRequest, call: Call) -> Awaitable[Any]:
    return _chain("http_request", request, call)


def batching(batch: Batch, call: Call) -> Awaitable[Any]:
    return _chain("batch", batch, call)


def traceparent() -> str | None:
    """The W3C traceparent of the current span, if a plug-in traces: stored with a workflow, so work
    done for it later, in any process, joins its trace."""
    for plugin in _plugins:
        value = plugin.traceparent()
        if value:
            return value
    return None


def close() -> None:
    for plugin in _plugins:
        plugin.close()


# Metrics and log context are always on; tracing is on when the OTEL_* environment asks (runtime.run).
from switchboard.telemetry import logs, metrics  # noqa: E402  (they subclass Plugin, defined above)

install(metrics.Metrics())
install(logs.LogContext())
