"""One logging setup and the metrics every service exposes on /metrics."""

from __future__ import annotations

import logging
import sys
import time

import orjson
from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("switchboard_messages_total", "Messages consumed, by queue and outcome", ["queue", "outcome"])
TASKS_DISPATCHED = Counter("switchboard_tasks_dispatched_total", "Tasks routed to agents", ["route"])
TASK_OUTCOMES = Counter("switchboard_task_outcomes_total", "Task results recorded", ["outcome"])
TASKS_RUN = Counter("switchboard_agent_tasks_total", "Tasks an agent ran, by capability and outcome", ["capability", "outcome"])
TASK_SECONDS = Histogram("switchboard_agent_task_seconds", "Handler run time", ["capability"])
WORKFLOWS = Counter("switchboard_workflows_total", "Workflows by terminal status", ["status"])
BREAKER_OPEN = Gauge("switchboard_breaker_open", "1 while a circuit breaker is open", ["breaker"])
AGENTS = Gauge("switchboard_agents", "Registered agents by status", ["status"])


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
            "msg": record.getMessage(),
        }
        for key in ("workflow_id", "task_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def setup_logging(service: str, level: str = "INFO") -> None:
    """JSON lines on stdout, one object a line, for Loki."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aio_pika", "aiormq", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
