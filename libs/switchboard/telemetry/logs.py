"""The one logging setup, and the log-context plug-in: JSON lines on stdout, for Loki.

Each line carries the service, and, when known, trace_id and span_id (from the current OpenTelemetry
span) and workflow_id and task_id (from context variables the plug-in sets around each message and task
run). Payloads, results and secrets are never logged.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson
from opentelemetry import trace

from switchboard.settings import redact  # a line never shows a URL's password
from switchboard.telemetry import Call, Consumed, Plugin, TaskRun

# (workflow id, task id) of the message or task being processed: one variable, so one set and reset each.
ids: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar("ids", default=(None, None))


class LogContext(Plugin):
    async def consume(self, message: Consumed, call_next: Call) -> Any:
        env = message.envelope
        if env is None or not env.workflow_id:
            return await call_next()
        return await _within(env.workflow_id, env.task_id, call_next)

    async def run_task(self, run: TaskRun, call_next: Call) -> Any:
        return await _within(run.envelope.workflow_id, run.envelope.task_id, call_next)


async def _within(wf_id: str | None, t_id: str | None, call_next: Call) -> Any:
    token = ids.set((wf_id, t_id))
    try:
        return await call_next()
    finally:
        ids.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = format(span.trace_id, "032x")
            line["span_id"] = format(span.span_id, "016x")
        for key, value in zip(("workflow_id", "task_id"), ids.get()):
            value = getattr(record, key, None) or value
            if value:
                line[key] = value
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line).decode()


def setup_logging(service: str, level: str = "INFO") -> None:
    """JSON lines on stdout, one object a line."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aio_pika", "aiormq", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
