"""Workflow and task state: every rule about how a workflow moves, as transactions on the state store.

Each public method of WorkflowStore runs one serializable transaction and returns the messages the
caller must publish after the commit (FollowUps). A caller that dies before publishing gets its input
redelivered; replaying it yields the same follow-ups again, and receivers ignore duplicates (by task
status and attempt number). So nothing is lost and nothing is recorded twice.

Keys (fdb.tuple packed):
  (ns, "wf", wf_id) → workflow                 (ns, "task", wf_id, task_id) → task
  (ns, "status", status, wf_id) → b""          (ns, "idem", key) → {workflow_id, digest}
  (ns, "unscheduled", wf_id) → claimed_at      intake not yet done: when it was stored, or last taken up
  (ns, "deadline", ts, wf_id, task_id) → attempt   running attempts, for the timeout watchdog
                                                  (or {attempt, input}: a question's own timeout)
  (ns, "log", root_id, seq) → entry            what a workflow family's agents said (switchboard.tasklog)
  (ns, "logseq", root_id) → last seq           (ns, "children", wf_id, child_id) → b""
  (ns, "cache", ...) the result cache (switchboard.cache)

What handlers spend and workflows' budgets follow switchboard.usage: a report's usage is added to its task,
its workflow and the workflow's ancestors; one that crosses a budget stops that workflow (budget_exceeded).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from switchboard import cache, deadletters, limits, stream, tasklog, telemetry, usage
from switchboard.protocol import Envelope, MessageType, Priority, WorkflowSpec, new_id
from switchboard.settings import Settings, amqp_username
from switchboard.state import Store, Transaction, pack, prefix_range, unpack

if TYPE_CHECKING:
    from switchboard.bus import Bus
    from switchboard.routing import Routes

TERMINAL_TASK = {"succeeded", "failed", "cancelled"}
TERMINAL_WORKFLOW = {"succeeded", "failed", "cancelled", "budget_exceeded"}
_MIN_DELAY_S = 0.05  # shorter retry delays are not worth a trip through a delay queue
CENSUS_LIMIT = 5_000  # workflows counted by a census, of each status
RESEAL_BYTES = 2_000_000  # records read by one transaction of a key rotation
_RELEASES_PER_MESSAGE = 512  # succeeded tasks per "tasks.succeeded" message: one dependency round trip each


class NotFound(LookupError):
    pass


class IdempotencyConflict(ValueError):
    pass


class NotReplayable(ValueError):
    pass


class NotWaiting(ValueError):
    """An answer to a task that asked nothing (or whose question was answered already)."""


class InvalidAnswer(ValueError):
    """An answer that does not match its question's JSON schema."""


class NotYet(ValueError):
    """An agent's report that arrived ahead of an earlier one of the same attempt (two aggregators
    took them): it is requeued, so that what a task streams is recorded in the order it was sent."""


class Forged(ValueError):
    """An outcome of an attempt from a broker user other than the one that claimed it: never recorded;
    the aggregator dead-letters it, with this as its reason."""


TRUSTED = object()  # the sender of outcomes the platform makes itself (watchdog, dead letters)


@dataclass
class FollowUps:
    """Messages to publish once the transaction has committed."""

    dispatch: list[Envelope] = field(default_factory=list)  # ready tasks → dispatcher
    delayed: list[tuple[Envelope, float]] = field(default_factory=list)  # retries, after a backoff
    # (workflow, task, traceparent of the recording) → dependency release
    succeeded: list[tuple[str, str, str | None]] = field(default_factory=list)
    replies: list[tuple[Envelope, str]] = field(default_factory=list)  # child workflow done → its parent
    control: list[Envelope] = field(default_factory=list)  # broadcasts (cancel)
    raw: list[tuple[bytes, str]] = field(default_factory=list)  # replayed dead letters → their queue
    # Not messages: (capability, agent, succeeded) of each attempt that ended, for the circuit breakers.
    outcomes: list[tuple[str, str, bool]] = field(default_factory=list)
    # Not messages either: domain events for the telemetry seam, emitted once the transaction committed.
    events: list[tuple[str, dict]] = field(default_factory=list)
    # Outcomes record() refused, as (index in its batch, reason): forged ones (see Forged).
    refused: list[tuple[int, str]] = field(default_factory=list)
    # Outcomes record() put off, as (index in its batch, reason): out of order (see NotYet).
    deferred: list[tuple[int, str]] = field(default_factory=list)
    # Events that tasks published (pub-sub), for the topics exchange: delivered once recorded.
    topics: list[Envelope] = field(default_factory=list)
    # Concurrency keys whose slots were freed: the dispatchers are told, to admit who waits on them.
    released: list[str] = field(default_factory=list)
    # Not for the platform: what the transaction changed, for the event stream (switchboard.stream),
    # filled in by WorkflowStore._transact from what the transaction wrote.
    stream: list[dict] = field(default_factory=list)

    def extend(self, other: FollowUps) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def caused_by(self, traceparent: str | None) -> None:
        """Every message here continues the trace of what caused them (one recorded outcome)."""
        if traceparent:
            for env in [*self.dispatch, *(e for e, _ in self.delayed), *(e for e, _ in self.replies), *self.control]:
                env.traceparent = traceparent

    async def publish(self, bus: Bus, routes: Routes | None = None) -> None:
        """With routes, a ready task whose capability can take it now skips the dispatcher."""
        topology = bus.topology
        if self.stream:
            # First, and confirmed: then nothing these messages cause (an agent's "running") can reach
            # the stream's subscribers before the change that caused it.
            await stream.publish(bus, self.stream)
        ready = []
        for env in self.dispatch:
            capability = routes.direct(env) if routes else None
            if capability is None:
                ready.append((env, topology.dispatch))
            else:
                queue = topology.capability_queue(capability)
                await bus.ensure_work_queue(queue)
                ready.append((env, queue))
        releases = [
            (Envelope(type=MessageType.EVENT, subject="tasks.succeeded", source=bus.source,
                      payload={"tasks": self.succeeded[i:i + _RELEASES_PER_MESSAGE]}), topology.coordinator)
            for i in range(0, len(self.succeeded), _RELEASES_PER_MESSAGE)
        ]
        await bus.publish_many(ready + releases + self.replies)
        for env, delay_s in self.delayed:
            await bus.publish_delayed(env, topology.dispatch, delay_s)
        for body, queue in self.raw:
            await bus.publish_raw(body, queue)
        for env in self.control:
            await bus.broadcast(env)
        for env in self.topics:
            await bus.publish_topic(env)
        if self.released:
            await bus.publish(Envelope(type=MessageType.EVENT, subject="limits.released", source=bus.source,
                                       payload={"keys": sorted(set(self.released))}), topology.limits)
        for env in self.dispatch:
            telemetry.emit("task.queued", capability=env.payload["capability"], priority=env.priority.value)


def spec_digest(spec: WorkflowSpec) -> str:
    return hashlib.sha256(orjson.dumps(spec.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


def backoff_s(retry: dict, attempt: int) -> float:
    """Full jitter (AWS's "exponential backoff and jitter"): spreads retries of many tasks apart."""
    return random.uniform(0, min(retry["max_s"], retry["base_s"] * 2 ** (attempt - 1)))


def task_view(task: dict) -> dict:
    keys = ("id", "capability", "status", "attempts", "result", "error", "errors", "reason", "depends_on",
            "priority", "agent", "ran_on", "queued_at", "started_at", "finished_at", "progress", "checkpoint")
    view = {k: task.get(k) for k in keys}
    question = task.get("input")
    view["input"] = {k: question.get(k) for k in tasklog.QUESTION_KEYS} if question else None
    view["answers"] = task.get("answers") or {}
    view["usage"] = task.get("usage") or usage.zero()
    view["cached"] = task.get("cached")  # {workflow_id, task_id, at}: the result came from the cache
    return view


def workflow_view(wf: dict, tasks: list[dict]) -> dict:
    return {
        "workflow_id": wf["id"], "name": wf.get("name"), "status": wf["status"],
        "created_at": wf["created_at"], "updated_at": wf["updated_at"], "finished_at": wf.get("finished_at"),
        "parent": wf.get("parent"), "root": wf.get("root") or wf["id"], "error": wf.get("error"),
        "result": wf.get("result"), "owner": wf.get("owner"), "budget": wf.get("budget"),
        "usage": wf.get("usage") or usage.zero(),  # its child workflows' included
        "tasks": [task_view(t) for t in tasks],
    }


class WorkflowStore:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.ns = settings.namespace
        self.settings = settings
        self.source = "workflows"
        self.platform_user = amqp_username(settings.amqp_url) or "guest"  # the services' broker user
        self.cache_secret = cache.secret(settings.payload_keys)  # keys the cache's payload digests
        self._notes: dict[tuple[str, str], str] = {}  # waiting reasons to write in the next transaction
        self._notes_written: asyncio.Future | None = None
        self._note_writer: asyncio.Task | None = None

    # ---- keys and records -------------------------------------------------------------------------
    def _wf_key(self, wf_id: str) -> bytes:
        return pack(self.ns, "wf", wf_id)

    def _task_key(self, wf_id: str, task_id: str) -> bytes:
        return pack(self.ns, "task", wf_id, task_id)

    def _status_key(self, status: str, wf_id: str) -> bytes:
        return pack(self.ns, "status", status, wf_id)

    def _read_wf(self, tr: Transaction, wf_id: str) -> dict:
        raw = tr.get(self._wf_key(wf_id))
        if raw is None:
            raise NotFound(f"no workflow {wf_id!r}")
        return orjson.loads(raw)

    def _parent_of(self, tr: Transaction, parent: object) -> dict | None:
        wf_id = parent.get("workflow_id") if isinstance(parent, dict) else None
        raw = tr.get(self._wf_key(wf_id)) if isinstance(wf_id, str) else None
        return orjson.loads(raw) if raw else None

    def _read_task(self, tr: Transaction, wf_id: str, task_id: str) -> dict:
        raw = tr.get(self._task_key(wf_id, task_id))
        if raw is None:
            raise NotFound(f"no task {task_id!r} in workflow {wf_id!r}")
        return orjson.loads(raw)

    def _tasks(self, tr: Transaction, wf_id: str) -> list[dict]:
        return [orjson.loads(v) for _, v in tr.get_range(*prefix_range(self.ns, "task", wf_id))]

    def _write_task(self, tr: Transaction, wf_id: str, task: dict, *, note: bool = True) -> None:
        tr.set(self._task_key(wf_id, task["id"]), orjson.dumps(task))
        if note:
            _note(tr, ("task", wf_id, task["id"]), lambda: stream.task_change(wf_id, task))

    def _log(self, tr: Transaction, wf: dict, entry: dict, *, kept: bool = True) -> dict:
        """Appends an entry to the log of the workflow's family (its root's), next in order, and notes it
        for the event stream; returns it with its seq. Not kept: logged without its text or data (the
        task's share of the log is used up), though sent live whole."""
        root = wf.get("root") or wf["id"]
        counter = pack(self.ns, "logseq", root)
        raw = tr.get(counter)
        seq = (orjson.loads(raw) if raw else 0) + 1
        tr.set(counter, orjson.dumps(seq))
        entry.update(seq=seq, root=root, workflow_id=wf["id"], at=time.time())
        tr.set(pack(self.ns, "log", root, seq), orjson.dumps(entry if kept else tasklog.without_content(entry)))
        _note(tr, ("log", root, seq), lambda: entry)
        return entry

    def _write_wf(self, tr: Transaction, wf: dict, *, old_status: str | None = None) -> None:
        wf["updated_at"] = time.time()
        if old_status is not None and old_status != wf["status"]:
            tr.clear(self._status_key(old_status, wf["id"]))
            tr.set(self._status_key(wf["status"], wf["id"]), b"")
        tr.set(self._wf_key(wf["id"]), orjson.dumps(wf))

    def _set_wf_status(self, tr: Transaction, wf: dict, status: str, **fields: Any) -> None:
        old = wf["status"]
        wf["status"] = status
        wf.update(fields)
        wf["finished_at"] = time.time() if status in TERMINAL_WORKFLOW else None
        self._write_wf(tr, wf, old_status=old)
        if old != status:
            _note(tr, ("wf", wf["id"]), lambda: stream.workflow_change(wf))

    def _set_deadline(self, tr: Transaction, wf_id: str, task: dict) -> None:
        # Time spent waiting for an answer does not count against the task's timeout.
        deadline = (task["started_at"] + task.get("waited_s", 0.0) + task["timeout_s"]
                    + self.settings.watchdog_grace_s)
        task["deadline"] = deadline
        tr.set(pack(self.ns, "deadline", deadline, wf_id, task["id"]), orjson.dumps(task["attempts"]))

    def _set_input_deadline(self, tr: Transaction, wf_id: str, task: dict, ask_by: float) -> None:
        """A question with a timeout of its own: the watchdog fails the attempt if its agent, which
        enforces it, is gone by then."""
        task["deadline"] = deadline = ask_by + self.settings.watchdog_grace_s
        tr.set(pack(self.ns, "deadline", deadline, wf_id, task["id"]),
               orjson.dumps({"attempt": task["attempts"], "input": True}))

    def _clear_deadline(self, tr: Transaction, wf_id: str, task: dict) -> None:
        if task.get("deadline") is not None:
            tr.clear(pack(self.ns, "deadline", task["deadline"], wf_id, task["id"]))
            task["deadline"] = None

    # ---- intake -----------------------------------------------------------------------------------
    def _create(self, tr: Transaction, spec: WorkflowSpec, idempotency_key: str | None,
                parent: dict | None, reply_to: str | None, correlation_id: str | None,
                traceparent: str | None, owner: str | None = None, seal=None, start: FollowUps | None = None
                ) -> tuple[str, bool]:
        """Stores a new workflow, pending; returns its id and True, or the known one's id and False. With
        `start` (for a workflow in which no task waits for another), it is stored running instead, its
        tasks queued, their messages in `start`: each record is written once, as _take_up would leave it."""
        digest = spec_digest(spec)
        if idempotency_key:
            raw = tr.get(pack(self.ns, "idem", idempotency_key))
            if raw is not None:
                known = orjson.loads(raw)
                if known["digest"] != digest:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency_key!r} was used with a different request body")
                if reply_to:  # a delegating agent that restarted waits on a new reply queue
                    wf = self._read_wf(tr, known["workflow_id"])
                    wf["reply_to"], wf["correlation_id"] = reply_to, correlation_id
                    self._write_wf(tr, wf)
                return known["workflow_id"], False
        wf_id = new_id()
        now = time.time()
        children: dict[str, list[str]] = {t.id: [] for t in spec.tasks}
        for t in spec.tasks:
            for p in t.depends_on:
                children[p].append(t.id)
        status = "pending" if start is None else "running"
        wf = {
            "id": wf_id, "name": spec.name, "status": status, "created_at": now, "updated_at": now,
            "task_ids": [t.id for t in spec.tasks], "remaining": len(spec.tasks), "parent": parent,
            "reply_to": reply_to, "correlation_id": correlation_id, "idempotency_key": idempotency_key,
            "epoch": 0, "traceparent": traceparent, "owner": owner, "root": wf_id,
            "budget": spec.budget.model_dump() if spec.budget else None, "usage": usage.zero(),
        }
        parent_wf = self._parent_of(tr, parent)
        if parent_wf is not None:  # a delegated child belongs to its parent's token, and to its family
            wf.update(owner=parent_wf.get("owner"), root=parent_wf.get("root") or parent_wf["id"])
            tr.set(pack(self.ns, "children", parent_wf["id"], wf_id), b"")
            self._log(tr, parent_wf, {"event": "child", "task_id": parent.get("task_id"),
                                      "child_workflow_id": wf_id, "name": spec.name})
        tr.set(self._wf_key(wf_id), orjson.dumps(wf))
        _note(tr, ("wf", wf_id), lambda: stream.workflow_change(wf))
        if wf["owner"]:
            tr.set(pack(self.ns, "owned", wf["owner"], wf_id), b"")
        tr.set(self._status_key(status, wf_id), b"")
        tr.set(pack(self.ns, "unscheduled", wf_id), orjson.dumps(now))
        default_retry = {"base_s": 0.5, "max_s": 30.0}
        capability_limits = {c: limits.defaults(tr, self.ns, c) for c in {t.capability for t in spec.tasks}}
        for t in spec.tasks:
            task = t.model_dump(mode="json")
            # Rendered from the plain payload, before it is sealed; a default's key is lenient (a field
            # this task lacks renders empty), a task's own was checked at submission.
            task["limits"] = limits.gate_of(task, capability_limits[t.capability], strict=False)
            if t.cache is not None:  # hashed before sealing: a sealed payload differs each time (switchboard.cache)
                task["cache_payload"] = cache.payload_digest(task["payload"], self.cache_secret)
            if seal is not None:  # the digest above is of the plain spec: a retried submission matches
                task["payload"] = seal(task["payload"])
            task.update(
                timeout_s=t.timeout_s or self.settings.default_timeout_s,
                max_attempts=t.max_attempts or self.settings.default_max_attempts,
                retry=task["retry"] or default_retry, children=children[t.id], status="pending", attempts=0,
                result=None, error=None, reason=None, errors=[], ran_on=None, queued_at=None,
                started_at=None, finished_at=None, deadline=None, progress=None, checkpoint=None, input=None,
                answers={}, waited_s=0.0,
            )
            if start is None:
                self._write_task(tr, wf_id, task)
            else:
                self._queue_task(tr, wf, task, {}, start)
        if idempotency_key:
            tr.set(pack(self.ns, "idem", idempotency_key), orjson.dumps({"workflow_id": wf_id, "digest": digest}))
        return wf_id, True

    async def create(self, specs: list[WorkflowSpec], idempotency_key: str | None = None, owner: str | None = None,
                     seal=None) -> tuple[list[str], list[str], FollowUps]:
        """Stores workflows (all or none). With a key, the same key and body return the same workflow.

        A new workflow in which no task waits for another needs neither the dependency engine nor a
        coordinator: it starts in this transaction. Returns the ids, the ids of those started (the caller
        publishes the follow-ups and then calls taken_in() for them; a coordinator takes in the others),
        and the follow-ups."""

        traceparent = telemetry.traceparent()

        def txn(tr: Transaction):
            ids, started, out = [], [], FollowUps()
            for i, spec in enumerate(specs):
                key = idempotency_key if len(specs) == 1 else (idempotency_key and f"{idempotency_key}#{i}")
                startable = not any(t.depends_on for t in spec.tasks)
                wf_id, new = self._create(tr, spec, key, None, None, None, traceparent, owner, seal,
                                          start=out if startable else None)
                ids.append(wf_id)
                if new:
                    out.events += _submitted(spec)
                    if startable:
                        started.append(wf_id)
            return ids, started, out

        ids, started, out = await self._transact(txn)
        telemetry.emit_all(out.events)
        return ids, started, out

    async def create_child(self, spec: WorkflowSpec, idempotency_key: str, parent: dict, reply_to: str,
                           correlation_id: str) -> tuple[str, FollowUps]:
        """Stores a delegated workflow; the follow-ups carry only its stream changes."""
        traceparent = telemetry.traceparent()

        def txn(tr: Transaction):
            return *self._create(tr, spec, idempotency_key, parent, reply_to, correlation_id, traceparent), FollowUps()

        wf_id, new, out = await self._transact(txn)
        if new:
            telemetry.emit_all(_submitted(spec))
        return wf_id, out

    async def unscheduled(self, older_than_s: float, limit: int = 100) -> list[str]:
        """Workflows stored but not taken in by a coordinator, and not taken up for older_than_s (the api
        died before telling one, or the coordinator died half-way)."""

        def txn(tr: Transaction) -> list[str]:
            cutoff = time.time() - older_than_s
            rows = tr.get_range(*prefix_range(self.ns, "unscheduled"), limit=limit)
            return [unpack(k)[-1] for k, v in rows if orjson.loads(v) <= cutoff]

        return await self.store.read(txn)

    async def start(self, wf_ids: list[str], *, redelivered: bool = False
                    ) -> tuple[dict[str, dict[str, list[str]]], FollowUps]:
        """Intake: queue the tasks that wait on nothing. Returns, for each workflow with dependencies,
        task id → parent ids, which the caller registers with the dependency engine before it publishes
        the follow-ups, and then calls taken_in(). Until then the workflow stays "unscheduled", so an
        intake that died half-way is redone by the sweep; roots already queued are sent again only then,
        or when the announcement itself was redelivered, never merely because it arrived late. Taking a
        workflow up claims it afresh, so the sweep leaves it alone while this intake is under way."""

        def txn(tr: Transaction):
            out, graphs, now = FollowUps(), {}, orjson.dumps(time.time())
            for wf_id in wf_ids:
                unscheduled = pack(self.ns, "unscheduled", wf_id)
                if tr.get(unscheduled) is None:
                    if not redelivered:
                        continue  # taken in already (by the sweep, or by another coordinator)
                else:
                    tr.set(unscheduled, now)
                self._take_up(tr, wf_id, out, graphs)
            return graphs, out

        graphs, out = await self._transact(txn)
        telemetry.emit_all(out.events)  # the cache lookups of the tasks it queued
        return graphs, out

    def _take_up(self, tr: Transaction, wf_id: str, out: FollowUps, graphs: dict) -> None:
        """Starts a workflow: queues its tasks that wait on nothing (again, if queued already) and notes
        the dependencies of the others in graphs."""
        raw = tr.get(self._wf_key(wf_id))
        if raw is None:
            return
        wf = orjson.loads(raw)
        if wf["status"] in TERMINAL_WORKFLOW:
            out.replies += self._reply(wf)
            return
        if wf["status"] == "pending":
            self._set_wf_status(tr, wf, "running")
        tasks = self._tasks(tr, wf_id)
        if any(t["depends_on"] for t in tasks):
            graphs[wf_id] = {t["id"]: t["depends_on"] for t in tasks}
        for task in tasks:
            if not task["depends_on"] and task["status"] in ("pending", "queued"):
                self._queue_task(tr, wf, task, {}, out)

    async def taken_in(self, wf_ids: list[str]) -> None:
        def txn(tr: Transaction) -> None:
            for wf_id in wf_ids:
                tr.clear(pack(self.ns, "unscheduled", wf_id))

        await self.store.transact(txn)

    def _queue_task(self, tr: Transaction, wf: dict, task: dict, inputs: dict, out: FollowUps) -> None:
        """Queues a task with its inputs (sends it again, if queued already). A pending task with a cache
        policy whose result is cached fresh succeeds instead, with that result, and is never sent."""
        if task["status"] == "pending":
            if task.get("cache") and self._from_cache(tr, wf, task, inputs, out):
                return
            task["status"] = "queued"
            task["queued_at"] = time.time()
            self._write_task(tr, wf["id"], task)
        out.dispatch.append(self._task_message(wf, task, inputs, task["attempts"] + 1))

    def _from_cache(self, tr: Transaction, wf: dict, task: dict, inputs: dict, out: FollowUps) -> bool:
        """Looks the task up in the cache (switchboard.cache); on a hit it succeeds with the cached result.
        Its key is kept on the task, so its own result is cached under the key it was looked up by."""
        now = time.time()
        task["cache_key"] = key = cache.key_of(task, wf.get("owner"), inputs, self.cache_secret)
        entry, outcome = cache.look_up(tr, self.ns, key, now)
        out.events.append(("cache.looked_up", {"capability": task["capability"], "outcome": outcome}))
        if entry is None:
            return False
        task.update(status="succeeded", result=entry["result"], cached=cache.cached_from(entry), queued_at=now,
                    finished_at=now, error=None, reason=None)
        self._succeed(tr, wf, task, out, wf.get("traceparent"))
        return True

    def _task_message(self, wf: dict, task: dict, inputs: dict, attempt: int) -> Envelope:
        return Envelope(
            type=MessageType.TASK, source=self.source, target=task.get("agent") or task["capability"],
            priority=Priority(task["priority"]), workflow_id=wf["id"], task_id=task["id"], attempt=attempt,
            timeout_s=task["timeout_s"], traceparent=wf.get("traceparent"),
            payload={"capability": task["capability"], "agent": task.get("agent"), "epoch": wf.get("epoch", 0),
                     "payload": task["payload"], "inputs": inputs}
                    | ({"limits": task["limits"]} if task.get("limits") else {}),
        )

    def _inputs(self, tr: Transaction, wf_id: str, task: dict) -> dict:
        return {p: self._read_task(tr, wf_id, p)["result"] for p in task["depends_on"]}

    async def release(self, ready: dict[str, list[str]], *, resend_queued: bool = True) -> FollowUps:
        """Tasks the dependency engine found ready (workflow id → task ids): queue them with their inputs,
        in one transaction. The store has the last word: a task whose parents did not all succeed stays.
        A task already queued is sent again (its first message may have died with a coordinator) unless
        resend_queued is False."""
        wanted = ("pending", "queued") if resend_queued else ("pending",)

        def txn(tr: Transaction) -> FollowUps:
            out = FollowUps()
            for wf_id, task_ids in ready.items():
                raw = tr.get(self._wf_key(wf_id))
                if raw is None or (wf := orjson.loads(raw))["status"] in TERMINAL_WORKFLOW:
                    continue
                for task_id in task_ids:
                    task = self._read_task(tr, wf_id, task_id)
                    if task["status"] not in wanted:
                        continue
                    parents = {p: self._read_task(tr, wf_id, p) for p in task["depends_on"]}
                    if all(p["status"] == "succeeded" for p in parents.values()):
                        inputs = {p_id: p["result"] for p_id, p in parents.items()}
                        self._queue_task(tr, wf, task, inputs, out)
            return out

        return await self._commit(txn)

    def _ready(self, tr: Transaction, wf_id: str, tasks: list[dict]) -> list[str]:
        status = {t["id"]: t["status"] for t in tasks}
        return [t["id"] for t in tasks if t["status"] in ("pending", "queued")
                and all(status[p] == "succeeded" for p in t["depends_on"])]

    async def ready_children(self, succeeded: list[tuple[str, str]]) -> dict[str, set[str]]:
        """Children of succeeded tasks (workflow id, task id) whose parents all succeeded, from the store
        alone: the check used when the dependency engine's answer may have been lost (a redelivery)."""

        def txn(tr: Transaction) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for wf_id, task_ids in _by_workflow(succeeded).items():
                children = {c for t in task_ids for c in self._read_task(tr, wf_id, t)["children"]}
                out[wf_id] = {t for t in self._ready(tr, wf_id, self._tasks(tr, wf_id)) if t in children}
            return out

        return await self.store.read(txn)

    async def graphs_to_rebuild(self, limit: int = 100_000) -> list[tuple[str, dict]]:
        """For every running workflow with dependencies: task → parents."""

        def txn(tr: Transaction):
            out = []
            for key, _ in tr.get_range(*prefix_range(self.ns, "status", "running"), limit=limit):
                wf_id = unpack(key)[-1]
                parents = {t["id"]: t["depends_on"] for t in self._tasks(tr, wf_id)}
                if any(parents.values()):
                    out.append((wf_id, parents))
            return out

        return await self.store.read(txn)

    async def succeeded_children_first(self, wf_id: str, parents: dict[str, list[str]]) -> list[str]:
        """The workflow's succeeded tasks, children first: the order in which the dependency engine
        must hear of them again after it lost its data."""

        def txn(tr: Transaction) -> list[str]:
            done = {t["id"] for t in self._tasks(tr, wf_id) if t["status"] == "succeeded"}
            return [t for t in reversed(_topological(parents)) if t in done]

        return await self.store.read(txn)

    # ---- outcomes -------------------------------------------------------------------------------
    async def record(self, messages: list[Envelope], senders: list[str | None] | None = None) -> FollowUps:
        """Applies a batch of agent statuses, results and errors in one transaction. `senders` are their
        broker users (AMQP user_id, which RabbitMQ validates); an outcome from a user other than the
        one that claimed its attempt is refused (out.refused) and the rest of the batch goes on."""

        def txn(tr: Transaction) -> FollowUps:
            out = FollowUps()
            for i, env in enumerate(messages):
                try:
                    out.extend(self._apply(tr, env, sender=TRUSTED if senders is None else senders[i]))
                except Forged as exc:  # raised before the message wrote anything
                    out.refused.append((i, str(exc)))
                except NotYet as exc:  # likewise
                    out.deferred.append((i, str(exc)))
            return out

        return await self._commit(txn)

    async def _commit(self, txn) -> FollowUps:
        """Runs a transaction that returns follow-ups; their events are emitted once it has committed."""
        out = await self._transact(txn)
        telemetry.emit_all(out.events)
        return out

    async def _transact(self, txn):
        """Runs a transaction whose result is, or holds, FollowUps, and puts in them the stream changes
        of what it wrote. The notes start afresh on every try: FoundationDB reruns txn on the same tr."""

        collect = stream.watched()

        def attempt(tr: Transaction):
            notes: dict = {}
            setattr(tr, _NOTES, notes if collect else None)
            try:
                result = txn(tr)
            finally:
                setattr(tr, _NOTES, None)
            out = result if isinstance(result, FollowUps) else next(r for r in result if isinstance(r, FollowUps))
            out.stream = [make() for make in notes.values()]
            return out if result is out else result

        attempt.__qualname__ = txn.__qualname__  # the store's metrics name a transaction by its function
        return await self.store.transact(attempt)

    def _apply(self, tr: Transaction, env: Envelope, *, dead_letter_reason: str | None = None,
               sender: object = TRUSTED) -> FollowUps:
        out = self._apply_outcome(tr, env, dead_letter_reason, sender)
        out.caused_by(env.traceparent)
        return out

    def _check_sender(self, task: dict, env: Envelope, sender: object) -> None:
        """Results only from the agent that got the task. The dispatcher cannot know which consumer takes
        a message from a capability queue, so the broker user of an attempt's first report claims it
        (task["claim"], written with the task). Later reports of that attempt from another user raise
        Forged. The platform's own user (the services', reporting timeouts and dead letters) may report
        on any attempt; a message with no user_id (an older sender) is taken only while nobody claimed
        the attempt, and claims nothing."""
        if sender is TRUSTED or sender == self.platform_user:
            return
        if task["status"] in TERMINAL_TASK or env.attempt < task["attempts"]:
            return  # changes nothing (see _apply_outcome)
        if env.attempt > task["attempts"] + 1:  # the platform gives out one attempt at a time
            raise Forged(f"{env.type.value} of attempt {env.attempt} of task {task['id']!r} in workflow "
                         f"{env.workflow_id}, which was never given out (the latest is {task['attempts'] + 1})")
        claim = task.get("claim") or {}
        claimed = claim.get("user") if claim.get("attempt") == env.attempt else None
        if claimed is None:
            if sender:
                task["claim"] = {"attempt": env.attempt, "user": sender}
            return
        if sender != claimed:
            raise Forged(f"{env.type.value} of attempt {env.attempt} of task {task['id']!r} in workflow "
                         f"{env.workflow_id}, which belongs to broker user {claimed!r}, not {sender or '(none)'!r}")

    def _apply_outcome(self, tr: Transaction, env: Envelope, dead_letter_reason: str | None,
                       sender: object = TRUSTED) -> FollowUps:
        out = FollowUps()
        wf_raw = tr.get(self._wf_key(env.workflow_id or ""))
        task_raw = tr.get(self._task_key(env.workflow_id or "", env.task_id or ""))
        if wf_raw is None or task_raw is None:
            return out
        wf, task = orjson.loads(wf_raw), orjson.loads(task_raw)
        self._check_sender(task, env, sender)
        wf_id, now = wf["id"], time.time()
        started_at = env.payload.get("started_at") or now
        if env.type in (MessageType.STATUS, MessageType.EVENT):
            started = task["status"] in ("queued", "pending") and env.attempt > task["attempts"]
            if started:  # "started", or anything else that the attempt says: it runs
                task.update(status="running", attempts=env.attempt, started_at=started_at, reason=None,
                            ran_on=env.source, waited_s=0.0)
                self._set_deadline(tr, wf_id, task)
                self._write_task(tr, wf_id, task)
            if env.subject not in ("", "started"):  # a report writes what it changes itself
                current = task["status"] not in TERMINAL_TASK and env.attempt == task["attempts"]
                self._apply_report(tr, wf, task, env, out, current=current)
            return out
        if task["status"] in TERMINAL_TASK or env.attempt < task["attempts"]:
            if env.attempt >= task["attempts"]:
                # The same outcome redelivered (we may have died before publishing what it caused):
                # nothing changes, but its follow-ups are sent again; receivers ignore duplicates.
                if task["status"] == "succeeded":
                    out.succeeded += self._succeeded(wf_id, task, env.traceparent)
                if wf["status"] in TERMINAL_WORKFLOW:
                    out.replies += self._reply(wf)
            return out
        if env.type == MessageType.RESULT and tasklog.streamed_to(task, env.attempt) < env.payload.get("streamed", 0):
            raise NotYet(f"the result of attempt {env.attempt} of task {task['id']!r} came ahead of its "
                         "last streamed text")
        # The attempt's final usage totals (switchboard.usage), counted after its outcome: a workflow
        # finished by it has no work left to stop.
        report = usage.parse(env.payload["usage"]) if env.payload.get("usage") is not None else None
        self._end_attempt(tr, wf, task, env, dead_letter_reason, out, now, started_at)
        if report is not None:
            self._take_usage(tr, wf, task, env.attempt, report, out)
        return out

    def _end_attempt(self, tr: Transaction, wf: dict, task: dict, env: Envelope, dead_letter_reason: str | None,
                     out: FollowUps, now: float, started_at: float) -> None:
        """Records the current attempt's result or error: the task succeeds, is retried or fails."""
        wf_id = wf["id"]
        self._clear_deadline(tr, wf_id, task)
        self._free_slot(tr, wf_id, task, out)
        task["input"] = None
        if env.attempt > task["attempts"]:  # it finished before it ever reported running
            task.update(attempts=env.attempt, started_at=started_at)
        if env.type == MessageType.RESULT:
            task.update(status="succeeded", result=env.payload.get("result"), finished_at=now, error=None,
                        reason=None, ran_on=env.source)
            out.outcomes.append((task["capability"], env.source, True))
            out.events.append(_finished(task, "succeeded"))
            if task.get("cache") and task.get("cache_key"):
                cache.put(tr, self.ns, task["cache_key"], result=task["result"], workflow_id=wf_id,
                          task_id=task["id"], capability=task["capability"], ttl_s=task["cache"]["ttl_s"], now=now)
            self._succeed(tr, wf, task, out, env.traceparent)
            return
        # An error.
        error = dict(env.payload.get("error") or {"type": "Error", "message": "unknown error"})
        error["attempt"] = env.attempt
        if task["errors"] and task["errors"][-1].get("attempt") == env.attempt:
            if task["status"] == "queued":  # recorded already; the retry may not have been sent
                out.delayed.append((self._task_message(wf, task, self._inputs(tr, wf_id, task), env.attempt + 1),
                                    0.0))
            return
        task["errors"] = (task["errors"] + [error])[-20:]
        task["error"] = error
        if error.get("retryable", True) and not dead_letter_reason:
            out.outcomes.append((task["capability"], task["ran_on"] or env.source, False))
        timed_out = error.get("type") in ("TimeoutError", "DeadlineExceeded")
        if error.get("retryable", True) and env.attempt < task["max_attempts"] and not dead_letter_reason:
            out.events.append(_finished(task, "timed_out" if timed_out else "retried"))
            delay = backoff_s(task["retry"], env.attempt)
            task.update(status="queued", queued_at=now,
                        reason=f"retry {env.attempt + 1} of {task['max_attempts']} after {delay:.1f}s: "
                               f"{error.get('type')}: {error.get('message', '')}"[:500])
            self._write_task(tr, wf_id, task)
            out.delayed.append((self._task_message(wf, task, self._inputs(tr, wf_id, task), env.attempt + 1), delay))
            return
        task.update(status="failed", finished_at=now)
        out.events.append(_finished(task, "dead_lettered" if dead_letter_reason else "timed_out" if timed_out
                                    else "failed"))
        self._write_task(tr, wf_id, task)
        reason = dead_letter_reason or (f"attempts exhausted ({task['attempts']} of {task['max_attempts']})"
                                        if error.get("retryable", True) else "non-retryable error")
        record = deadletters.make_record(
            reason=reason, queue="", envelope=self._task_message(wf, task, {}, task["attempts"]).model_dump(mode="json"),
            attempts=task["attempts"], errors=task["errors"])
        deadletters.put(tr, self.ns, record)
        _note(tr, ("dlq", record.get("id")), lambda: stream.dead_letter_change(record, "added"))
        out.extend(self._fail_workflow(tr, wf, f"task {task['id']!r} failed: {error.get('message', '')}"))

    def _succeed(self, tr: Transaction, wf: dict, task: dict, out: FollowUps, traceparent: str | None) -> None:
        """Records a task that succeeded (the caller set its fields): its dependents are released, and
        its workflow succeeds with its last task."""
        wf_id = wf["id"]
        self._write_task(tr, wf_id, task)
        out.succeeded += self._succeeded(wf_id, task, traceparent)
        wf["remaining"] -= 1
        if wf["remaining"] <= 0 and wf["status"] not in TERMINAL_WORKFLOW:
            result = {t["id"]: t["result"] for t in self._tasks(tr, wf_id) if not t["children"]}
            self._set_wf_status(tr, wf, "succeeded", result=result, error=None)
            out.events.append(_workflow_finished(wf))
            out.replies += self._reply(wf)
        else:
            self._write_wf(tr, wf)

    def _take_usage(self, tr: Transaction, wf: dict, task: dict, attempt: int, report: dict, out: FollowUps) -> None:
        """Adds what the task's current attempt reported spending to the task, its workflow and that
        workflow's ancestors (switchboard.usage). The outermost of them over its budget stops, with all it
        delegated to; so does everything below one stopped for its budget already."""
        delta = usage.take(task, attempt, report)
        if delta is None:
            return
        self._write_task(tr, wf["id"], task, note=False)
        out.events.append(("usage.reported", {"capability": task["capability"], **delta}))
        chain = [wf]
        while len(chain) <= usage.MAX_DEPTH and (parent := self._parent_of(tr, chain[-1].get("parent"))):
            chain.append(parent)
        for w in chain:
            w["usage"] = usage.add(w.get("usage"), delta)
            self._write_wf(tr, w)
        top = next((w for w in reversed(chain) if w["status"] == "budget_exceeded" or (
            w["status"] not in TERMINAL_WORKFLOW and usage.exceeded(w["usage"], w.get("budget")))), None)
        if top is None:
            return
        self._stop_for_budget(tr, top, chain[:chain.index(top)], out)

    def _stop_for_budget(self, tr: Transaction, top: dict, below: list[dict], out: FollowUps) -> None:
        """Stops a workflow whose budget was crossed, and its descendants: first those between it and the
        reporting workflow (`below`), then the others, breadth first, at most usage.STOP_LIMIT."""
        if top["status"] not in TERMINAL_WORKFLOW:
            out.extend(self._fail_workflow(tr, top, usage.describe(top["usage"], top["budget"]),
                                           status="budget_exceeded"))
        reason = f"the budget of workflow {top['id']} was exceeded"
        for wf in below:
            out.extend(self._fail_workflow(tr, wf, reason, status="budget_exceeded"))
        parents, seen = [top["id"]], 0
        while parents and seen < usage.STOP_LIMIT:
            rows = tr.get_range(*prefix_range(self.ns, "children", parents.pop(0)), limit=usage.STOP_LIMIT - seen)
            seen += len(rows)
            for key, _ in rows:
                child_id = unpack(key)[-1]
                raw = tr.get(self._wf_key(child_id))
                if raw is not None:
                    out.extend(self._fail_workflow(tr, orjson.loads(raw), reason, status="budget_exceeded"))
                    parents.append(child_id)

    def _apply_report(self, tr: Transaction, wf: dict, task: dict, env: Envelope, out: FollowUps, *,
                      current: bool) -> None:
        """What a running attempt says besides its outcome (switchboard.tasklog). Only the current
        attempt's reports change the task; a checkpoint is answered either way, so its agent never waits
        in vain. Raises NotYet before writing anything."""
        wf_id, payload, attempt = wf["id"], env.payload, env.attempt
        if env.subject == "report" and current:
            try:
                entry, kept = tasklog.take_text(task, attempt, int(payload.get("offset", 0)), str(payload.get("text", "")))
            except tasklog.OutOfOrder as exc:
                raise NotYet(str(exc)) from None
            if entry is not None:
                self._log(tr, wf, entry, kept=kept)
            progress = payload.get("progress")
            change = tasklog.take_progress(wf_id, task, attempt, progress) if progress else None
            if change is not None:
                _note(tr, ("progress", wf_id, task["id"]), lambda: change)
            self._write_task(tr, wf_id, task, note=False)
        elif env.subject == "checkpoint":
            problem = (tasklog.take_checkpoint(task, attempt, int(payload.get("n", 0)), payload.get("state"),
                                               self.settings.max_payload_bytes)
                       if current else f"attempt {attempt} of task {task['id']!r} is over")
            if problem is None:
                self._write_task(tr, wf_id, task, note=False)
            if env.reply_to:
                out.replies.append((Envelope(type=MessageType.EVENT, subject="checkpoint.stored", source=self.source,
                                             correlation_id=env.correlation_id,
                                             payload={"stored": problem is None, "error": problem}), env.reply_to))
        elif env.subject == "ask" and current:
            key = str(payload.get("key"))
            answers = task.get("answers") or {}
            if key in answers:  # answered already (this ask was redelivered): the agent hears it again
                if env.reply_to:
                    out.replies.append((_answer_message(env.correlation_id, answers[key], self.source), env.reply_to))
                return
            question = task.get("input")
            if question is not None and question.get("key") == key:
                question.update(reply_to=env.reply_to, correlation_id=env.correlation_id)
                self._write_task(tr, wf_id, task, note=False)
                return
            self._clear_deadline(tr, wf_id, task)
            now = time.time()
            timeout_s = payload.get("timeout_s")
            task.update(status="waiting_input", input={
                "key": key, "question": payload.get("question"), "schema": payload.get("schema"),
                "timeout_s": timeout_s, "asked_at": now, "attempt": attempt, "reply_to": env.reply_to,
                "correlation_id": env.correlation_id})
            if timeout_s:
                self._set_input_deadline(tr, wf_id, task, now + float(timeout_s))
            self._write_task(tr, wf_id, task)
            self._log(tr, wf, {"event": "input", "task_id": task["id"], "attempt": attempt, "key": key,
                               "question": payload.get("question"), "schema": payload.get("schema"),
                               "timeout_s": timeout_s})
        elif env.subject == "usage":
            report = usage.parse(payload)  # a malformed one is dead-lettered, current or not
            if current:
                self._take_usage(tr, wf, task, attempt, report, out)
        elif env.subject == "event.publish":
            topic = tasklog.check_topic(payload.get("topic"))
            entry, kept = tasklog.take_published(task, attempt, env.message_id, topic, payload.get("data"))
            if entry is not None:
                self._log(tr, wf, entry, kept=kept)
                self._write_task(tr, wf_id, task, note=False)
            out.topics.append(topic_message(env, topic))

    @staticmethod
    def _succeeded(wf_id: str, task: dict, traceparent: str | None) -> list[tuple[str, str, str | None]]:
        return [(wf_id, task["id"], traceparent)] if task["children"] else []

    def _fail_workflow(self, tr: Transaction, wf: dict, error: str, status: str = "failed") -> FollowUps:
        """Fails (or cancels) the workflow and cancels every task that has not finished."""
        out = FollowUps()
        if wf["status"] in TERMINAL_WORKFLOW:
            return out
        now = time.time()
        for task in self._tasks(tr, wf["id"]):
            if task["status"] not in TERMINAL_TASK:
                self._clear_deadline(tr, wf["id"], task)
                task.update(status="cancelled", finished_at=now, reason=f"workflow {status}", input=None)
                self._write_task(tr, wf["id"], task)
                out.events.append(_finished(task, "cancelled"))
        self._set_wf_status(tr, wf, status, error=error)
        out.events.append(_workflow_finished(wf))
        out.control.append(Envelope(type=MessageType.CONTROL, subject="cancel", source=self.source,
                                    workflow_id=wf["id"], payload={"epoch": wf.get("epoch", 0)}))
        out.replies += self._reply(wf)
        return out

    def _reply(self, wf: dict) -> list[tuple[Envelope, str]]:
        if not wf.get("reply_to"):
            return []
        env = Envelope(type=MessageType.RESULT, subject="workflow.finished", source=self.source,
                       workflow_id=wf["id"], correlation_id=wf.get("correlation_id"),
                       payload={"status": wf["status"], "result": wf.get("result"), "error": wf.get("error")})
        return [(env, wf["reply_to"])]

    async def expire_overdue(self, limit: int = 500) -> FollowUps:
        """The watchdog: a running attempt with no result by its timeout plus grace failed (its agent
        hung or vanished); it is retried or fails like any other error."""

        def txn(tr: Transaction) -> FollowUps:
            out = FollowUps()
            begin, _ = prefix_range(self.ns, "deadline")
            for key, raw in tr.get_range(begin, pack(self.ns, "deadline", time.time()), limit=limit):
                _, _, _, wf_id, task_id = unpack(key)
                tr.clear(key)
                value = orjson.loads(raw)
                if isinstance(value, dict):  # a question's timeout (its agent, which enforces it, is gone)
                    attempt, error = value["attempt"], {"type": "InputTimeout", "retryable": True,
                                                        "message": "no answer to the task's question in time"}
                else:
                    attempt, error = value, {"type": "DeadlineExceeded", "retryable": True,
                                             "message": "no result within the task's timeout plus "
                                                        f"{self.settings.watchdog_grace_s}s grace"}
                overdue = Envelope(type=MessageType.ERROR, source="watchdog", workflow_id=wf_id, task_id=task_id,
                                   attempt=attempt, payload={"error": error})
                out.extend(self._apply(tr, overdue))
            return out

        return await self._commit(txn)

    async def dead_letter_task(self, env: Envelope, reason: str) -> FollowUps:
        """A task message the broker dead-lettered (no agent took it in time): it fails, with its reason."""
        failure = Envelope(type=MessageType.ERROR, source="dlq-replayer", workflow_id=env.workflow_id,
                           task_id=env.task_id, attempt=env.attempt, traceparent=env.traceparent,
                           payload={"error": {"type": "Undeliverable", "message": reason, "retryable": False}})

        def txn(tr: Transaction) -> FollowUps:
            task_raw = tr.get(self._task_key(env.workflow_id or "", env.task_id or ""))
            if task_raw is not None:
                task = orjson.loads(task_raw)
                if task["status"] == "queued" and task["attempts"] < env.attempt:
                    task["attempts"] = env.attempt  # it never started: this attempt is the one that died
                    self._write_task(tr, env.workflow_id, task)
            return self._apply(tr, failure, dead_letter_reason=reason)

        return await self._commit(txn)

    # ---- limits (switchboard.limits) ---------------------------------------------------------------
    def _free_slot(self, tr: Transaction, wf_id: str, task: dict, out: FollowUps) -> None:
        conc = (task.get("limits") or {}).get("concurrency")
        if conc and limits.release(tr, self.ns, conc["key"], wf_id, task["id"]):
            out.released.append(conc["key"])

    def _attempt_over(self, tr: Transaction, wf_id: str, task_id: str, attempt: int) -> bool:
        """Whether this attempt of the task has ended, so its slot is free to take. A task that runs (or
        waits for input) keeps its slot, under whichever attempt: a redelivered one runs as the next."""
        raw = tr.get(self._task_key(wf_id, task_id))
        if raw is None:
            return True
        task = orjson.loads(raw)
        if task["status"] == "queued":
            return task["attempts"] >= attempt
        return task["status"] not in ("running", "waiting_input")

    async def admit(self, env: Envelope, gate: dict) -> tuple[str, float | None]:
        """Whether a parked task may go on now, under its gate's limits: ("admitted", None), ("wait",
        when to try again or None for when a slot is freed) or ("drop", None) if it should not run at all:
        its workflow ended, or the task no longer waits to run this attempt (it is over, or it runs
        already), or this is another copy of a task admitted already (limits.admit)."""

        def txn(tr: Transaction) -> tuple[str, float | None]:
            now = time.time()  # when it runs, after any wait for the store: a bucket moves on from then
            task = self._read_task(tr, env.workflow_id, env.task_id)
            if task["status"] != "queued" or task["attempts"] >= env.attempt or \
                    self._read_wf(tr, env.workflow_id)["status"] in TERMINAL_WORKFLOW:
                return "drop", None
            outcome, retry_at = limits.admit(tr, self.ns, gate, env.workflow_id, env.task_id, env.attempt, now,
                                             self._attempt_over, env.payload.get("parked"))
            return ("drop" if outcome == "copy" else outcome), retry_at

        try:
            return await self.store.transact(txn)
        except NotFound:
            return "drop", None

    async def note_waiting(self, wf_id: str, task_id: str, reason: str) -> None:
        """Records why a queued task is not running yet (shown as its `reason`). Notes made while one
        transaction writes them join the next: parking a burst of tasks costs a few transactions, not
        one each, so they do not delay the admissions and results that wait behind them in the store.
        The batch is bounded by its callers, who each wait for theirs to be written."""
        self._notes[(wf_id, task_id)] = reason
        if self._notes_written is None:
            self._notes_written = asyncio.get_running_loop().create_future()
        written = self._notes_written
        if self._note_writer is None:
            self._note_writer = asyncio.create_task(self._write_notes())
        await asyncio.shield(written)

    async def _write_notes(self) -> None:
        """Writes the notes waiting, a transaction at a time. A failed transaction fails its own callers
        and the next batch is still tried; cancelled (a shutdown), it fails every caller still waiting."""
        try:
            while self._notes:
                notes, written = self._notes, self._notes_written
                self._notes, self._notes_written = {}, None
                try:
                    await self.store.transact(lambda tr: self._note_reasons(tr, notes))
                except Exception as exc:
                    written.set_exception(exc)
                    written.exception()  # retrieved here too: its callers may have gone
                    continue
                except BaseException:
                    for future in (written, self._notes_written):
                        if future is not None and not future.done():
                            future.set_exception(RuntimeError("stopped"))
                            future.exception()
                    self._notes, self._notes_written = {}, None
                    raise
                written.set_result(None)
        finally:
            self._note_writer = None

    def _note_reasons(self, tr: Transaction, notes: dict[tuple[str, str], str]) -> None:
        for (wf_id, task_id), reason in notes.items():
            raw = tr.get(self._task_key(wf_id, task_id))
            if raw is None:
                continue
            task = orjson.loads(raw)
            if task["status"] in ("queued", "pending") and task["reason"] != reason:
                task["reason"] = reason
                self._write_task(tr, wf_id, task)

    # ---- human input -------------------------------------------------------------------------------
    async def answer(self, wf_id: str, task_id: str, answer: Any) -> tuple[dict, Envelope, str | None, FollowUps]:
        """Answers the task's pending question: the answer is stored (a later attempt asking it again gets
        it at once) and the task runs again, its timeout's clock going on from where it stopped. Returns
        the task's view, the message for the waiting agent and its reply queue, and the follow-ups (the
        stream's changes). Raises NotFound, NotWaiting or InvalidAnswer."""

        def txn(tr: Transaction):
            wf, task = self._read_wf(tr, wf_id), self._read_task(tr, wf_id, task_id)
            question = task.get("input")
            if task["status"] != "waiting_input" or not question:
                raise NotWaiting(f"task {task_id!r} is {task['status']}, not waiting for input")
            problem = tasklog.answer_problem(question.get("schema"), answer)
            if problem:
                raise InvalidAnswer(problem)
            now = time.time()
            self._clear_deadline(tr, wf_id, task)
            task["answers"] = {**(task.get("answers") or {}), question["key"]: answer}
            task.update(status="running", input=None,
                        waited_s=task.get("waited_s", 0.0) + max(0.0, now - question["asked_at"]))
            self._set_deadline(tr, wf_id, task)
            self._write_task(tr, wf_id, task)
            self._log(tr, wf, {"event": "answer", "task_id": task_id, "attempt": task["attempts"],
                               "key": question["key"], "answer": answer})
            reply = _answer_message(question.get("correlation_id"), answer, self.source)
            return task_view(task), reply, question.get("reply_to"), FollowUps()

        return await self._transact(txn)

    async def requeue_answered(self, wf_id: str, task_id: str) -> FollowUps:
        """The agent that asked is gone (its reply queue with it): the task runs again as a new attempt,
        which finds the answer stored and goes on without asking."""

        def txn(tr: Transaction) -> FollowUps:
            out = FollowUps()
            wf, task = self._read_wf(tr, wf_id), self._read_task(tr, wf_id, task_id)
            if task["status"] != "running" or wf["status"] in TERMINAL_WORKFLOW:
                return out  # it moved on already (its agent answered, or the watchdog took it)
            self._clear_deadline(tr, wf_id, task)
            task.update(status="queued", queued_at=time.time(),
                        reason="the agent that asked was gone when the answer came: queued again")
            self._write_task(tr, wf_id, task)
            out.dispatch.append(self._task_message(wf, task, self._inputs(tr, wf_id, task), task["attempts"] + 1))
            return out

        return await self._commit(txn)

    async def context(self, wf_id: str, task_id: str, *, redelivered: int | None = None) -> tuple[dict, FollowUps]:
        """What a new attempt of a task starts from: its last checkpoint and the answers it was given, and
        the attempt number to run as. A redelivered task message (attempt `redelivered`: its agent died, or
        lost its channel) runs as the next attempt, so that its reports are the new agent's own (see
        _check_sender) and a late outcome of the old run changes nothing. "skip": the task finished."""

        def txn(tr: Transaction):
            out = FollowUps()
            task = self._read_task(tr, wf_id, task_id)
            checkpoint = task.get("checkpoint")
            context = {"checkpoint": checkpoint["state"] if checkpoint else None,
                       "answers": task.get("answers") or {}}
            if redelivered is None:
                return context, out
            if task["status"] in TERMINAL_TASK:
                return {**context, "skip": True}, out
            attempt = max(task["attempts"], redelivered - 1) + 1
            if task["status"] in ("running", "waiting_input") and task["attempts"] >= redelivered:
                self._clear_deadline(tr, wf_id, task)
                task.update(status="queued", input=None,
                            reason=f"attempt {task['attempts']} was redelivered (its agent is gone): it runs again")
                self._write_task(tr, wf_id, task)
                conc = (task.get("limits") or {}).get("concurrency")
                if conc:  # the slot goes on with the task, to the attempt that runs now
                    limits.carry(tr, self.ns, conc["key"], wf_id, task_id, attempt, time.time())
            return {**context, "attempt": attempt}, out

        return await self._transact(txn)

    async def log_after(self, wf_id: str, after: int, limit: int = 1000) -> list[dict]:
        """The entries of the log of the workflow's family (its root's) after seq `after`, in order."""

        def txn(tr: Transaction) -> list[dict]:
            root = self._read_wf(tr, wf_id).get("root") or wf_id
            _, end = prefix_range(self.ns, "log", root)
            rows = tr.get_range(pack(self.ns, "log", root, after + 1), end, limit=limit)
            return [orjson.loads(v) for _, v in rows]

        return await self.store.read(txn)

    async def children(self, wf_id: str, limit: int = 1000) -> list[str]:
        """The workflows that tasks of this one delegated to, oldest first."""

        def txn(tr: Transaction) -> list[str]:
            return [unpack(k)[-1] for k, _ in tr.get_range(*prefix_range(self.ns, "children", wf_id), limit=limit)]

        return await self.store.read(txn)

    async def cancel(self, wf_id: str) -> tuple[dict, FollowUps]:
        def txn(tr: Transaction):
            wf = self._read_wf(tr, wf_id)
            out = self._fail_workflow(tr, wf, "cancelled by request", status="cancelled")
            return workflow_view(wf, self._tasks(tr, wf_id)), out

        view, out = await self._transact(txn)
        telemetry.emit_all(out.events)
        return view, out

    # ---- replay ----------------------------------------------------------------------------------
    async def replay(self, dl_id: str) -> FollowUps:
        """Replays a dead letter. A failed task gets a fresh set of attempts and its workflow resumes:
        the tasks its failure cancelled wait again, and those whose parents all succeeded are queued.
        Any other message is published again to the queue it came from."""

        def txn(tr: Transaction) -> FollowUps:
            out = FollowUps()
            key = pack(self.ns, "dlq", dl_id)
            raw = tr.get(key)
            if raw is None:
                raise NotFound(f"no dead letter {dl_id!r}")
            record = orjson.loads(raw)
            if record["status"] != "dead":
                raise NotReplayable(f"dead letter {dl_id!r} was replayed already")
            if deadletters.reason_class(record["reason"]) == "forged":
                # Published again it would come from the platform's own user, whom the claims trust.
                raise NotReplayable(f"dead letter {dl_id!r} is a forged outcome: it is kept, never replayed")
            deadletters.mark_replayed(tr, self.ns, record, time.time())
            _note(tr, ("dlq", dl_id), lambda: stream.dead_letter_change(record, "replayed"))
            out.events.append(("dead_letter.replayed", {}))
            envelope = record.get("envelope") or {}
            if envelope.get("type") == MessageType.TASK.value and record.get("workflow_id"):
                out.extend(self._resume(tr, record["workflow_id"], record["task_id"]))
            elif record.get("queue"):
                body = orjson.dumps(envelope) if envelope else _b64(record.get("body_base64"))
                out.raw.append((body, record["queue"]))
            else:
                raise NotReplayable(f"dead letter {dl_id!r} names no queue to replay it to")
            return out

        return await self._commit(txn)

    def _resume(self, tr: Transaction, wf_id: str, task_id: str) -> FollowUps:
        wf = self._read_wf(tr, wf_id)
        task = self._read_task(tr, wf_id, task_id)
        if task["status"] != "failed":
            raise NotReplayable(f"task {task_id!r} is {task['status']}, not failed")
        wf["epoch"] = wf.get("epoch", 0) + 1  # agents drop messages of the cancelled epoch, not of this one
        tasks = self._tasks(tr, wf_id)
        for t in tasks:
            if t["id"] == task_id or (t["status"] == "cancelled" and t["reason"] == "workflow failed"):
                t.update(status="pending", attempts=0, finished_at=None, queued_at=None, claim=None,
                         reason="replayed" if t["id"] == task_id else None)
                self._write_task(tr, wf_id, t)
        self._set_wf_status(tr, wf, "running", error=None)
        out = FollowUps()
        for ready_id in self._ready(tr, wf_id, tasks):
            ready = next(t for t in tasks if t["id"] == ready_id)
            self._queue_task(tr, wf, ready, self._inputs(tr, wf_id, ready), out)
        return out

    # ---- key rotation --------------------------------------------------------------------------------
    async def reseal(self, codec, batch: int = 500) -> int:
        """Seals every stored payload and result that an older key sealed with the codec's current key, a
        batch of records a transaction; returns how many records changed."""
        changed = 0
        for kind in ("task", "wf", "cache"):  # cached results too: a hit must open with the keys kept
            begin, end = prefix_range(self.ns, kind)
            while True:
                def txn(tr: Transaction, begin=begin) -> tuple[int, bytes | None]:
                    rows = tr.get_range(begin, end, limit=batch)
                    count, size, last = 0, 0, None
                    for key, raw in rows:
                        if size > RESEAL_BYTES:  # FoundationDB commits at most 10 MB a transaction
                            break
                        last, size = key, size + len(raw)
                        record = orjson.loads(raw)
                        if kind == "task":
                            new = {"payload": codec.reseal(record.get("payload")),
                                   "result": codec.reseal(record.get("result"))}
                        elif kind == "cache":
                            new = {"result": codec.reseal(record.get("result"))}
                        else:
                            result = record.get("result")
                            new = {"result": {k: codec.reseal(v) for k, v in result.items()}
                                   if isinstance(result, dict) else result}
                        if any(record.get(k) != v for k, v in new.items()):
                            record.update(new)
                            tr.set(key, orjson.dumps(record))
                            count += 1
                    done = last is None or (last == rows[-1][0] and len(rows) < batch)
                    return count, None if done else last + b"\x00"

                count, begin = await self.store.transact(txn)
                changed += count
                if begin is None:
                    break
        return changed

    # ---- the result cache ----------------------------------------------------------------------------
    async def expire_cache(self, limit: int = cache.EXPIRE_BATCH) -> int:
        """Drops up to `limit` expired cache entries; returns how many (the coordinator's watchdog calls it)."""

        def txn(tr: Transaction) -> int:
            return cache.expire(tr, self.ns, time.time(), limit)

        return await self.store.transact(txn)

    async def cache_entry(self, wf_id: str, task_id: str) -> dict | None:
        """The cache entry of the task's key, as stored (an expired one, until it is dropped), or None."""

        def txn(tr: Transaction) -> dict | None:
            key = self._read_task(tr, wf_id, task_id).get("cache_key")
            return cache.entry(tr, self.ns, key) if key else None

        return await self.store.read(txn)

    # ---- queries ---------------------------------------------------------------------------------
    async def get(self, wf_id: str) -> dict:
        def txn(tr: Transaction) -> dict:
            return workflow_view(self._read_wf(tr, wf_id), self._tasks(tr, wf_id))

        return await self.store.read(txn)

    async def census(self, limit: int = CENSUS_LIMIT) -> tuple[int, dict[str, int]]:
        """Workflows pending or running, and the queued tasks of running ones by priority. Each count stops
        at `limit` workflows (the tasks at 10 × limit), so one read stays small on any backend."""

        def txn(tr: Transaction) -> tuple[int, dict[str, int]]:
            running = [unpack(k)[-1] for k, _ in tr.get_range(*prefix_range(self.ns, "status", "running"), limit=limit)]
            pending = tr.get_range(*prefix_range(self.ns, "status", "pending"), limit=limit)
            queued: dict[str, int] = {}
            budget = 10 * limit
            for wf_id in running:
                tasks = tr.get_range(*prefix_range(self.ns, "task", wf_id), limit=budget)
                budget -= len(tasks)
                for _, raw in tasks:
                    task = orjson.loads(raw)
                    if task["status"] == "queued":
                        queued[task["priority"]] = queued.get(task["priority"], 0) + 1
                if budget <= 0:
                    break
            return len(running) + len(pending), queued

        return await self.store.read(txn)

    async def list(self, status: str | None, limit: int, after: str | None, owner: str | None = None,
                   scan: int = 10_000) -> list[dict]:
        """Newest first; `after` is the last workflow id of the previous page. With `owner`, only the
        workflows that token submitted (reading at most `scan` of them)."""

        def txn(tr: Transaction) -> list[dict]:
            if owner:
                begin, end = prefix_range(self.ns, "owned", owner)
                if after:
                    end = pack(self.ns, "owned", owner, after)
                wfs = []
                for key, _ in tr.get_range(begin, end, limit=limit if status is None else scan, reverse=True):
                    wf = orjson.loads(tr.get(self._wf_key(unpack(key)[-1])))
                    if status is None or wf["status"] == status:
                        wfs.append(wf)
                        if len(wfs) == limit:
                            break
            elif status:
                begin, end = prefix_range(self.ns, "status", status)
                if after:
                    end = self._status_key(status, after)
                ids = [unpack(k)[-1] for k, _ in tr.get_range(begin, end, limit=limit, reverse=True)]
                wfs = [orjson.loads(tr.get(self._wf_key(i))) for i in ids]
            else:
                begin, end = prefix_range(self.ns, "wf")
                if after:
                    end = self._wf_key(after)
                wfs = [orjson.loads(v) for _, v in tr.get_range(begin, end, limit=limit, reverse=True)]
            keep = ("name", "status", "created_at", "updated_at", "finished_at", "parent", "owner")
            return [{"workflow_id": wf["id"], "tasks": len(wf["task_ids"])} | {k: wf.get(k) for k in keep}
                    for wf in wfs]

        return await self.store.read(txn)


def topic_message(env: Envelope, topic: str) -> Envelope:
    """An event for the topics exchange, under the id its publisher gave it (subscribers de-duplicate by it)."""
    return Envelope(type=MessageType.EVENT, subject=topic, message_id=env.message_id, timestamp=env.timestamp,
                    source=env.source, workflow_id=env.workflow_id, task_id=env.task_id,
                    payload={"data": env.payload.get("data")})


def _answer_message(correlation_id: str | None, answer: Any, source: str) -> Envelope:
    return Envelope(type=MessageType.EVENT, subject="task.answer", source=source, correlation_id=correlation_id,
                    payload={"answer": answer})


_NOTES = "_switchboard_stream_notes"


def _note(tr: Transaction, key: tuple, make) -> None:
    """Notes a change for the event stream, if the transaction collects them (WorkflowStore._transact).
    By key, so a task written several times in one transaction is one change; `make` runs after the
    transaction body, so the change shows the record as it was last written."""
    notes = getattr(tr, _NOTES, None)
    if notes is not None:
        notes[key] = make


def _submitted(spec: WorkflowSpec) -> list[tuple[str, dict]]:
    return [("task.submitted", {"capability": t.capability, "priority": t.priority.value}) for t in spec.tasks]


def _finished(task: dict, outcome: str) -> tuple[str, dict]:
    return "task.finished", {"capability": task["capability"], "outcome": outcome}


def _workflow_finished(wf: dict) -> tuple[str, dict]:
    return "workflow.finished", {"status": wf["status"], "duration_s": wf["finished_at"] - wf["created_at"]}


def _by_workflow(tasks: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for wf_id, task_id in tasks:
        out.setdefault(wf_id, []).append(task_id)
    return out


def _topological(parents: dict[str, list[str]]) -> list[str]:
    order, seen = [], set()
    for root in parents:
        stack = [(root, iter(parents[root]))]
        if root in seen:
            continue
        seen.add(root)
        while stack:
            node, it = stack[-1]
            nxt = next((p for p in it if p not in seen), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(parents[nxt])))
    return order


def _b64(text: str | None) -> bytes:
    return base64.b64decode(text or "")
