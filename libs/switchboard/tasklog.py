"""What a running task tells the platform besides its outcome: progress, streamed output, questions for
a person, checkpoints and published events. The rules for each, as pure functions of the task record;
WorkflowStore applies them in its transactions and appends what they return to the family's log.

The log: one per root workflow (a child's entries go to its root's), entries numbered 1, 2, 3, ... in the
order they committed. `GET /v1/workflows/{id}/events` replays it from a client's Last-Event-ID. Progress
is not logged: only the latest counts, and it is kept on the task.

Bounds, so that a chatty agent cannot overload the store:
- the SDK coalesces: progress at most PROGRESS_EVERY_S, stream text into one message per round trip;
- a task keeps at most STREAM_KEEP_CHARS of streamed text and published data in the log; past that,
  entries are still sent live but kept without their text (`"truncated": true`);
- a checkpoint and an event's data are at most the payload limit; a question at most QUESTION_CHARS.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson

STREAM_KEEP_CHARS = 1_000_000  # per task, over all its attempts
PROGRESS_EVERY_S = 0.25
MESSAGE_CHARS = 65_536  # streamed text per message: a longer run of chunks is sent in several
QUESTION_CHARS = 10_000
PUBLISHED_IDS = 64  # event ids a task remembers, so a redelivered publish is logged once
QUESTION_KEYS = ("key", "question", "schema", "timeout_s", "asked_at", "attempt")
TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,15}$")


class OutOfOrder(Exception):
    """Text that starts past what was recorded: an earlier message of the same attempt is still on its way."""


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not TOPIC.match(topic):
        raise ValueError(f"topic {topic!r}: dot-separated words of letters, digits, '_' and '-' "
                         "(no wildcards when publishing)")
    return topic


def check_pattern(pattern: object) -> str:
    """A subscription: a topic whose words may be `*` (one word) or `#` (any number of words)."""
    words = pattern.split(".") if isinstance(pattern, str) else []
    if not words or len(words) > 16 or not all(w in ("*", "#") or re.fullmatch(r"[A-Za-z0-9_-]{1,64}", w)
                                               for w in words):
        raise ValueError(f"event pattern {pattern!r}: dot-separated words, each a name, '*' or '#'")
    return pattern


def check_question(question: object, schema: object, timeout_s: object) -> None:
    from jsonschema import Draft202012Validator, SchemaError

    if not isinstance(question, str) or not question or len(question) > QUESTION_CHARS:
        raise ValueError(f"a question is a non-empty string of at most {QUESTION_CHARS} characters")
    if schema is not None:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"the answer's schema is not a JSON schema: {exc.message}") from None
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or timeout_s <= 0):
        raise ValueError("timeout_s is a positive number of seconds")


def answer_problem(schema: dict | None, answer: Any) -> str | None:
    """Why the answer does not fit the question's schema, or None."""
    if schema is None:
        return None
    from jsonschema import Draft202012Validator

    error = next(iter(Draft202012Validator(schema).iter_errors(answer)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{'answer/' + where if where else 'answer'}: {error.message}"


def question_key(question: str, occurrence: int) -> str:
    """Names a question so that a later attempt asking it again finds its answer: by its text (a handler
    resumed from a checkpoint may skip earlier questions) and how many times this attempt asked it."""
    import hashlib

    return f"{hashlib.sha256(question.encode()).hexdigest()[:16]}.{occurrence}"


def take_text(task: dict, attempt: int, offset: int, text: str) -> tuple[dict | None, bool]:
    """Records streamed text on the task; returns the log entry (None if it was all recorded already)
    and whether its text is kept in the log. Raises OutOfOrder for text past what was recorded."""
    stream = task.get("stream") or {"attempt": attempt, "offset": 0, "kept": 0}
    if stream["attempt"] != attempt:  # a new attempt streams from the start
        stream = {"attempt": attempt, "offset": 0, "kept": stream["kept"]}
    if offset > stream["offset"]:
        raise OutOfOrder(f"text at {offset} of attempt {attempt}; {stream['offset']} recorded")
    text = text[stream["offset"] - offset:]
    task["stream"] = stream
    if not text:
        return None, False
    entry = {"event": "chunk", "task_id": task["id"], "attempt": attempt, "offset": stream["offset"], "text": text}
    stream["offset"] += len(text)
    kept = stream["kept"] + len(text) <= STREAM_KEEP_CHARS
    if kept:
        stream["kept"] += len(text)
    return entry, kept


def streamed_to(task: dict, attempt: int) -> int:
    stream = task.get("stream") or {}
    return stream.get("offset", 0) if stream.get("attempt") == attempt else 0


def take_progress(wf_id: str, task: dict, attempt: int, progress: dict) -> dict | None:
    """Keeps the newest progress of the newest attempt; returns its live change, or None if older."""
    current = task.get("progress") or {}
    number = progress.get("n", 0)
    if (current.get("attempt", 0), current.get("n", -1)) >= (attempt, number):
        return None
    task["progress"] = {"message": progress.get("message"), "percent": progress.get("percent"),
                        "data": progress.get("data"), "attempt": attempt, "n": number, "at": time.time()}
    return {"event": "progress", "at": time.time(), "workflow_id": wf_id, "task_id": task["id"],
            "attempt": attempt, "progress": task["progress"]}


def take_checkpoint(task: dict, attempt: int, number: int, state: Any, limit: int) -> str | None:
    """Keeps the newest checkpoint; returns why it was refused, or None."""
    size = len(orjson.dumps(state))
    if size > limit:
        return f"checkpoint is {size} bytes, the limit is {limit}"
    current = task.get("checkpoint") or {}
    if (current.get("attempt", 0), current.get("n", -1)) < (attempt, number):
        task["checkpoint"] = {"attempt": attempt, "n": number, "at": time.time(), "bytes": size, "state": state}
    return None


def take_published(task: dict, attempt: int, event_id: str, topic: str, data: Any) -> tuple[dict | None, bool]:
    """A published event's log entry (None if this id was logged already), and whether its data is kept."""
    seen = task.get("published_ids") or []
    if event_id in seen:
        return None, False
    task["published_ids"] = (seen + [event_id])[-PUBLISHED_IDS:]
    stream = task.setdefault("stream", {"attempt": attempt, "offset": 0, "kept": 0})
    size = len(orjson.dumps(data))
    kept = stream["kept"] + size <= STREAM_KEEP_CHARS
    if kept:
        stream["kept"] += size
    return {"event": "published", "task_id": task["id"], "attempt": attempt, "topic": topic,
            "event_id": event_id, "data": data}, kept


def without_content(entry: dict) -> dict:
    """The entry as the log keeps it past the task's limit: what happened, without the text or data."""
    return {k: v for k, v in entry.items() if k not in ("text", "data")} | {"truncated": True}


def topic_matches(pattern: str, topic: str) -> bool:
    """AMQP topic matching, as the broker does it: `*` is one word, `#` zero or more."""

    def match(p: list[str], t: list[str]) -> bool:
        if not p:
            return not t
        if p[0] == "#":
            return any(match(p[1:], t[i:]) for i in range(len(t) + 1))
        return bool(t) and (p[0] == "*" or p[0] == t[0]) and match(p[1:], t[1:])

    return match(pattern.split("."), topic.split("."))
