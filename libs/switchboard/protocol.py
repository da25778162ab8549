"""The wire protocol: one envelope for every message, and the workflow specification users submit."""

from __future__ import annotations

import enum
import random
import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from switchboard import limits

__all__ = [
    "Budget",
    "CachePolicy",
    "CapabilityLimits",
    "ConcurrencyLimit",
    "Envelope",
    "InvalidSpec",
    "MessageType",
    "Priority",
    "RateLimit",
    "TaskSpec",
    "WorkflowSpec",
    "ValidationError",
    "new_id",
    "validate_workflow",
]


def new_id() -> str:
    """A 26-char id that sorts by creation time (ms), so listing by key is listing by age. Its 52 random
    bits need to be unique, not secret (who may see a workflow is checked, not guessed): the random
    module's generator, seeded from the OS, saves the getrandom syscall os.urandom makes per id, and a
    process makes several ids per task."""
    return f"{time.time_ns() // 1_000_000:013x}{random.getrandbits(52):013x}"


class Priority(str, enum.Enum):
    LOW = "LOW"
    NORMAL = "NORMAL"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"

    @property
    def amqp(self) -> int:
        return _AMQP_PRIORITY[self]


# RabbitMQ advises few priority levels: each costs an internal queue. MAX_PRIORITY is x-max-priority.
_AMQP_PRIORITY = {Priority.LOW: 1, Priority.NORMAL: 4, Priority.HIGH: 7, Priority.CRITICAL: 9}
MAX_PRIORITY = 9


class MessageType(str, enum.Enum):
    TASK = "task"
    STATUS = "status"
    RESULT = "result"
    ERROR = "error"
    EVENT = "event"
    CONTROL = "control"


class Envelope(BaseModel):
    """Every message between services and agents. `subject` names the event or command within a type."""

    model_config = ConfigDict(extra="forbid")

    type: MessageType
    subject: str = ""
    message_id: str = Field(default_factory=new_id)
    timestamp: float = Field(default_factory=time.time)
    source: str = ""
    target: str = ""  # a capability, or an agent name
    priority: Priority = Priority.NORMAL
    payload: dict[str, Any] = Field(default_factory=dict)
    ack_required: bool = True
    timeout_s: float | None = None
    workflow_id: str | None = None
    task_id: str | None = None
    attempt: int = 0
    correlation_id: str | None = None
    reply_to: str | None = None
    # The W3C traceparent of what caused this message. It travels in the AMQP headers, never in the body.
    traceparent: str | None = Field(None, exclude=True)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_defaults=True).encode()  # pydantic's own writer: no dict between

    @classmethod
    def decode(cls, body: bytes) -> Envelope:
        """Raises ValidationError (a ValueError) on anything that is not a well-formed envelope."""
        return cls.model_validate_json(body)


class InvalidSpec(ValueError):
    """A submitted workflow that must be refused; `code` is stable, the message names the problem."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class RetryPolicy(BaseModel):
    """Exponential backoff with full jitter: retry n waits a random time in [0, min(max_s, base_s * 2**(n-1))]."""

    model_config = ConfigDict(extra="forbid")

    base_s: float = Field(0.5, ge=0, le=3600, strict=True)
    max_s: float = Field(30.0, ge=0, le=24 * 3600, strict=True)


class CachePolicy(BaseModel):
    """A result of the same task (by `key`, or a hash of the capability, payload and parents' results)
    recorded less than ttl_s ago is taken as this task's result, without running it."""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(gt=0, le=30 * 24 * 3600, strict=True)
    key: str | None = Field(None, min_length=1, max_length=256)


class RateLimit(BaseModel):
    """Tasks under one key start at most per_s a second, after a first `burst` at once."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=256, description='a template over the task: "tenant:{payload.tenant}"')
    per_s: float = Field(gt=0, le=1_000_000, strict=True)
    burst: int = Field(1, ge=1, le=1_000_000, strict=True)


class ConcurrencyLimit(BaseModel):
    """At most `max` tasks under one key run at once."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=256, description='a template over the task: "tenant:{payload.tenant}"')
    max: int = Field(ge=1, le=1_000_000, strict=True)


class CapabilityLimits(BaseModel):
    """A capability's default limits: what its tasks get when they set none of their own."""

    model_config = ConfigDict(extra="forbid")

    rate_limit: RateLimit | None = None
    concurrency: ConcurrencyLimit | None = None

    def stored(self) -> dict:
        """As the store keeps them: only the limits set, as JSON."""
        return self.model_dump(mode="json", exclude_none=True)


class Budget(BaseModel):
    """What a workflow (its child workflows included) may spend, as its handlers report it."""

    model_config = ConfigDict(extra="forbid")

    tokens: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)
    cost: float | None = Field(None, ge=0, le=1e15, strict=True)


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    capability: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    payload: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    priority: Priority = Priority.NORMAL
    # Strict: `true` is not 1 attempt, nor `false` 0 seconds.
    timeout_s: float | None = Field(None, gt=0, le=7 * 24 * 3600, strict=True)
    max_attempts: int | None = Field(None, ge=1, le=100, strict=True)
    agent: str | None = Field(None, min_length=1, max_length=128, description="Route to this agent only.")
    retry: RetryPolicy | None = None
    cache: CachePolicy | None = None
    rate_limit: RateLimit | None = None
    concurrency: ConcurrencyLimit | None = None

    @field_validator("depends_on")
    @classmethod
    def _no_repeated_parent(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("depends_on lists a parent twice")
        return value


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=256)
    budget: Budget | None = None
    # Documented as at least one; validate_workflow refuses an empty list with its own error code.
    tasks: list[TaskSpec] = Field(json_schema_extra={"minItems": 1})


def validate_workflow(spec: WorkflowSpec, *, max_payload_bytes: int, max_tasks: int) -> None:
    """Checks what a schema cannot: ids, references, acyclicity, sizes. Raises InvalidSpec."""
    if not spec.tasks:
        raise InvalidSpec("empty_workflow", "a workflow needs at least one task")
    if len(spec.tasks) > max_tasks:
        raise InvalidSpec("too_many_tasks", f"a workflow has at most {max_tasks} tasks, got {len(spec.tasks)}")
    ids: set[str] = set()
    for task in spec.tasks:
        if task.id in ids:
            raise InvalidSpec("duplicate_task_id", f"duplicate task id {task.id!r}")
        ids.add(task.id)
        try:
            size = len(orjson.dumps(task.payload))
        except orjson.JSONEncodeError as exc:  # JSON that Python reads but no JSON writer may send on
            raise InvalidSpec("invalid_payload", f"task {task.id!r}: payload cannot be sent as JSON ({exc}): "
                              "integers must fit in 64 bits and strings must be valid Unicode") from exc
        if size > max_payload_bytes:
            raise InvalidSpec("payload_too_large", f"task {task.id!r}: payload is {size} bytes, the limit is {max_payload_bytes}")
        for limit in (task.rate_limit, task.concurrency):
            if limit is not None:
                try:
                    limits.render(limit.key, task.model_dump(mode="json"))
                except limits.BadTemplate as exc:
                    raise InvalidSpec("invalid_limit_key", f"task {task.id!r}: {exc}") from exc
    for task in spec.tasks:
        for parent in task.depends_on:
            if parent not in ids:
                raise InvalidSpec("unknown_dependency", f"task {task.id!r} depends on unknown task {parent!r}")
            if parent == task.id:
                raise InvalidSpec("dependency_cycle", f"task {task.id!r} depends on itself")
    cycle = _find_cycle({t.id: t.depends_on for t in spec.tasks})
    if cycle:
        raise InvalidSpec("dependency_cycle", "dependency cycle: " + " -> ".join(cycle) + " (each depends on the next)")


def _find_cycle(parents: dict[str, list[str]]) -> list[str] | None:
    # Iterative DFS (a deep chain must not hit the recursion limit); returns the cycle's path if any.
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in parents:
        if root in state:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node, index = stack.pop()
            if index == 0:
                state[node] = 1
                path.append(node)
            edges = parents[node]
            if index < len(edges):
                stack.append((node, index + 1))
                nxt = edges[index]
                if state.get(nxt) == 1:
                    return path[path.index(nxt):] + [nxt]
                if nxt not in state:
                    stack.append((nxt, 0))
            else:
                state[node] = 2
                path.pop()
    return None
