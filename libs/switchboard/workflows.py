"""Workflow and task state: every rule about how a workflow moves, as transactions on the state store.

Each public function of WorkflowStore runs one serializable transaction. Functions return the messages
the caller must publish after the commit ("follow-ups"); a caller that crashes before publishing gets
the same message redelivered, and replaying it yields the same follow-ups again, so nothing is lost and
nothing is recorded twice (duplicates are detected by task status and attempt number).

Keys (fdb.tuple packed):  (ns, "wf", wf_id) → workflow   (ns, "task", wf_id, task_id) → task
                          (ns, "status", status, wf_id) → b""  (ns, "idem", key) → {workflow_id, digest}
                          (ns, "unscheduled", wf_id) → b""     (intake not yet done by a coordinator)
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from switchboard.protocol import Envelope, MessageType, Priority, WorkflowSpec, new_id
from switchboard.settings import Settings
from switchboard.state import Store, Transaction, pack, prefix_range, unpack

TERMINAL_TASK = {"succeeded", "failed", "cancelled"}
TERMINAL_WORKFLOW = {"succeeded", "failed", "cancelled"}


class NotFound(LookupError):
    pass


class IdempotencyConflict(ValueError):
    pass


@dataclass
class FollowUps:
    """Messages to publish once the transaction has committed."""

    dispatch: list[Envelope] = field(default_factory=list)  # ready tasks → dispatcher
    coordinator: list[Envelope] = field(default_factory=list)  # task.succeeded → dependency release
    replies: list[tuple[Envelope, str]] = field(default_factory=list)  # child workflow done → its parent
    control: list[Envelope] = field(default_factory=list)  # broadcasts (cancel)

    def extend(self, other: FollowUps) -> None:
        self.dispatch += other.dispatch
        self.coordinator += other.coordinator
        self.replies += other.replies
        self.control += other.control


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def spec_digest(spec: WorkflowSpec) -> str:
    return hashlib.sha256(orjson.dumps(spec.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


def task_view(task: dict) -> dict:
    keys = ("id", "capability", "status", "attempts", "result", "error", "reason", "depends_on", "priority",
            "agent", "ran_on", "queued_at", "started_at", "finished_at")
    return {k: task.get(k) for k in keys}


def workflow_view(wf: dict, tasks: list[dict]) -> dict:
    return {
        "workflow_id": wf["id"],
        "name": wf.get("name"),
        "status": wf["status"],
        "created_at": wf["created_at"],
        "updated_at": wf["updated_at"],
        "finished_at": wf.get("finished_at"),
        "parent": wf.get("parent"),
        "error": wf.get("error"),
        "result": wf.get("result"),
        "tasks": [task_view(t) for t in tasks],
    }


class WorkflowStore:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.ns = settings.namespace
        self.default_timeout_s = settings.default_timeout_s
        self.default_max_attempts = settings.default_max_attempts
        self.source = "workflows"

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

    def _read_task(self, tr: Transaction, wf_id: str, task_id: str) -> dict:
        raw = tr.get(self._task_key(wf_id, task_id))
        if raw is None:
            raise NotFound(f"no task {task_id!r} in workflow {wf_id!r}")
        return orjson.loads(raw)

    def _tasks(self, tr: Transaction, wf_id: str) -> list[dict]:
        return [orjson.loads(v) for _, v in tr.get_range(*prefix_range(self.ns, "task", wf_id))]

    def _write_task(self, tr: Transaction, wf_id: str, task: dict) -> None:
        tr.set(self._task_key(wf_id, task["id"]), _dumps(task))

    def _write_wf(self, tr: Transaction, wf: dict, *, old_status: str | None = None) -> None:
        wf["updated_at"] = time.time()
        if old_status is not None and old_status != wf["status"]:
            tr.clear(self._status_key(old_status, wf["id"]))
            tr.set(self._status_key(wf["status"], wf["id"]), b"")
        tr.set(self._wf_key(wf["id"]), _dumps(wf))

    def _set_wf_status(self, tr: Transaction, wf: dict, status: str, **fields: Any) -> None:
        old = wf["status"]
        wf["status"] = status
        wf.update(fields)
        if status in TERMINAL_WORKFLOW:
            wf["finished_at"] = time.time()
        self._write_wf(tr, wf, old_status=old)

    # ---- intake -----------------------------------------------------------------------------------
    def _create(self, tr: Transaction, spec: WorkflowSpec, idempotency_key: str | None,
                parent: dict | None, reply_to: str | None, correlation_id: str | None) -> tuple[str, bool]:
        digest = spec_digest(spec)
        if idempotency_key:
            idem_key = pack(self.ns, "idem", idempotency_key)
            raw = tr.get(idem_key)
            if raw is not None:
                known = orjson.loads(raw)
                if known["digest"] != digest:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency_key!r} was used with a different request body"
                    )
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
        wf = {
            "id": wf_id, "name": spec.name, "status": "pending", "created_at": now, "updated_at": now,
            "task_ids": [t.id for t in spec.tasks], "remaining": len(spec.tasks), "parent": parent,
            "reply_to": reply_to, "correlation_id": correlation_id, "idempotency_key": idempotency_key,
        }
        tr.set(self._wf_key(wf_id), _dumps(wf))
        tr.set(self._status_key("pending", wf_id), b"")
        tr.set(pack(self.ns, "unscheduled", wf_id), _dumps(now))
        for t in spec.tasks:
            task = t.model_dump(mode="json")
            task.update(
                timeout_s=t.timeout_s or self.default_timeout_s,
                max_attempts=t.max_attempts or self.default_max_attempts,
                children=children[t.id], status="pending", attempts=0, result=None, error=None,
                reason=None, errors=[], ran_on=None, queued_at=None, started_at=None, finished_at=None,
            )
            self._write_task(tr, wf_id, task)
        if idempotency_key:
            tr.set(pack(self.ns, "idem", idempotency_key), _dumps({"workflow_id": wf_id, "digest": digest}))
        return wf_id, True

    async def create(self, specs: list[WorkflowSpec], idempotency_key: str | None = None) -> list[str]:
        """Stores workflows (all or none). With a key, the same key and body return the same workflow."""

        def txn(tr: Transaction) -> list[str]:
            ids = []
            for index, spec in enumerate(specs):
                key = idempotency_key if len(specs) == 1 else (idempotency_key and f"{idempotency_key}#{index}")
                ids.append(self._create(tr, spec, key, None, None, None)[0])
            return ids

        return await self.store.transact(txn)

    async def create_child(self, spec: WorkflowSpec, idempotency_key: str, parent: dict, reply_to: str,
                           correlation_id: str) -> str:
        def txn(tr: Transaction) -> str:
            return self._create(tr, spec, idempotency_key, parent, reply_to, correlation_id)[0]

        return await self.store.transact(txn)

    async def unscheduled(self, older_than_s: float, limit: int = 100) -> list[str]:
        """Workflows stored but not yet taken in by a coordinator (e.g. the api died before telling it)."""

        def txn(tr: Transaction) -> list[str]:
            cutoff = time.time() - older_than_s
            rows = tr.get_range(*prefix_range(self.ns, "unscheduled"), limit=limit)
            return [unpack(k)[-1] for k, v in rows if orjson.loads(v) <= cutoff]

        return await self.store.transact(txn)

    async def start(self, wf_ids: list[str]) -> tuple[dict[str, dict[str, list[str]]], FollowUps]:
        """Intake: queue the tasks that wait on nothing. Returns, for each workflow with dependencies,
        task id → parent ids, which the caller registers with the dependency engine before it publishes
        the follow-ups. Replaying it re-sends roots still queued."""

        def txn(tr: Transaction):
            out, graphs = FollowUps(), {}
            for wf_id in wf_ids:
                tr.clear(pack(self.ns, "unscheduled", wf_id))
                raw = tr.get(self._wf_key(wf_id))
                if raw is None:
                    continue
                wf = orjson.loads(raw)
                if wf["status"] in TERMINAL_WORKFLOW:
                    out.replies += self._reply(wf)
                    continue
                if wf["status"] == "pending":
                    self._set_wf_status(tr, wf, "running")
                tasks = self._tasks(tr, wf_id)
                if any(t["depends_on"] for t in tasks):
                    graphs[wf_id] = {t["id"]: t["depends_on"] for t in tasks}
                for task in tasks:
                    if not task["depends_on"] and task["status"] in ("pending", "queued"):
                        out.dispatch.append(self._queue_task(tr, wf_id, task, {}))
            return graphs, out

        return await self.store.transact(txn)

    def _queue_task(self, tr: Transaction, wf_id: str, task: dict, inputs: dict) -> Envelope:
        if task["status"] == "pending":
            task["status"] = "queued"
            task["queued_at"] = time.time()
            self._write_task(tr, wf_id, task)
        return self._task_message(wf_id, task, inputs, task["attempts"] + 1)

    def _task_message(self, wf_id: str, task: dict, inputs: dict, attempt: int) -> Envelope:
        return Envelope(
            type=MessageType.TASK, source=self.source, target=task.get("agent") or task["capability"],
            priority=Priority(task["priority"]), workflow_id=wf_id, task_id=task["id"], attempt=attempt,
            timeout_s=task["timeout_s"],
            payload={"capability": task["capability"], "agent": task.get("agent"),
                     "payload": task["payload"], "inputs": inputs},
        )

    def _inputs(self, tr: Transaction, wf_id: str, task: dict) -> dict:
        return {p: self._read_task(tr, wf_id, p)["result"] for p in task["depends_on"]}

    async def release(self, wf_id: str, task_ids: list[str]) -> FollowUps:
        """Tasks whose parents all succeeded (per the dependency engine): queue them with their inputs."""

        def txn(tr: Transaction) -> FollowUps:
            out = FollowUps()
            raw = tr.get(self._wf_key(wf_id))
            if raw is None or orjson.loads(raw)["status"] in TERMINAL_WORKFLOW:
                return out
            for task_id in task_ids:
                task = self._read_task(tr, wf_id, task_id)
                if task["status"] in ("pending", "queued"):
                    out.dispatch.append(self._queue_task(tr, wf_id, task, self._inputs(tr, wf_id, task)))
            return out

        return await self.store.transact(txn)

    async def ready_children(self, wf_id: str, task_id: str) -> list[str]:
        """Children of a succeeded task whose parents all succeeded, computed from the store alone:
        the check used when the dependency engine's answer may have been lost (a redelivery)."""

        def txn(tr: Transaction) -> list[str]:
            ready = []
            for child_id in self._read_task(tr, wf_id, task_id)["children"]:
                child = self._read_task(tr, wf_id, child_id)
                if child["status"] in ("pending", "queued") and all(
                    self._read_task(tr, wf_id, p)["status"] == "succeeded" for p in child["depends_on"]
                ):
                    ready.append(child_id)
            return ready

        return await self.store.transact(txn)

    # ---- outcomes -------------------------------------------------------------------------------
    async def record(self, messages: list[Envelope]) -> FollowUps:
        """Applies a batch of agent statuses, results and errors in one transaction."""

        def txn(tr: Transaction) -> FollowUps:
            out = FollowUps()
            for env in messages:
                out.extend(self._apply(tr, env))
            return out

        return await self.store.transact(txn)

    def _apply(self, tr: Transaction, env: Envelope) -> FollowUps:
        out = FollowUps()
        wf_raw = tr.get(self._wf_key(env.workflow_id or ""))
        task_raw = tr.get(self._task_key(env.workflow_id or "", env.task_id or ""))
        if wf_raw is None or task_raw is None:
            return out
        wf, task = orjson.loads(wf_raw), orjson.loads(task_raw)
        wf_id, now = wf["id"], time.time()
        if env.type == MessageType.STATUS:
            if task["status"] in ("queued", "pending") and env.attempt > task["attempts"]:
                task.update(status="running", attempts=env.attempt, started_at=now, reason=None,
                            ran_on=env.source)
                self._write_task(tr, wf_id, task)
            return out
        if task["status"] in TERMINAL_TASK or env.attempt < task["attempts"]:
            if env.attempt >= task["attempts"]:
                # The same outcome redelivered (we may have died before publishing what it caused):
                # nothing changes, but its follow-ups are sent again; receivers ignore duplicates.
                if task["status"] == "succeeded":
                    out.coordinator += self._succeeded_events(wf_id, task)
                if wf["status"] in TERMINAL_WORKFLOW:
                    out.replies += self._reply(wf)
            return out
        task["attempts"] = max(task["attempts"], env.attempt)
        task["ran_on"] = env.source
        if env.type == MessageType.RESULT:
            task.update(status="succeeded", result=env.payload.get("result"), finished_at=now, error=None)
            self._write_task(tr, wf_id, task)
            out.coordinator += self._succeeded_events(wf_id, task)
            wf["remaining"] -= 1
            if wf["remaining"] <= 0 and wf["status"] not in TERMINAL_WORKFLOW:
                leaves = self._tasks(tr, wf_id)
                result = {t["id"]: t["result"] for t in leaves if not t["children"]}
                self._set_wf_status(tr, wf, "succeeded", result=result)
                out.replies += self._reply(wf)
            else:
                self._write_wf(tr, wf)
            return out
        # An error.
        error = dict(env.payload.get("error") or {"type": "Error", "message": "unknown error"})
        error["attempt"] = env.attempt
        if task["errors"] and task["errors"][-1].get("attempt") == env.attempt:
            if task["status"] == "queued":  # recorded already; the retry may not have been sent
                out.dispatch.append(self._task_message(wf_id, task, self._inputs(tr, wf_id, task), env.attempt + 1))
            return out
        task["errors"] = (task["errors"] + [error])[-20:]
        task["error"] = error
        if error.get("retryable", True) and env.attempt < task["max_attempts"]:
            task.update(status="queued", queued_at=now)
            self._write_task(tr, wf_id, task)
            out.dispatch.append(self._task_message(wf_id, task, self._inputs(tr, wf_id, task), env.attempt + 1))
            return out
        task.update(status="failed", finished_at=now)
        self._write_task(tr, wf_id, task)
        out.extend(self._fail_workflow(tr, wf, f"task {task['id']!r} failed: {error.get('message', '')}"))
        return out

    def _succeeded_events(self, wf_id: str, task: dict) -> list[Envelope]:
        if not task["children"]:
            return []
        return [Envelope(type=MessageType.EVENT, subject="task.succeeded", source=self.source,
                         workflow_id=wf_id, task_id=task["id"])]

    def _fail_workflow(self, tr: Transaction, wf: dict, error: str, status: str = "failed") -> FollowUps:
        """Fails (or cancels) the workflow and cancels every task that has not finished."""
        out = FollowUps()
        if wf["status"] in TERMINAL_WORKFLOW:
            return out
        now = time.time()
        for task in self._tasks(tr, wf["id"]):
            if task["status"] not in TERMINAL_TASK:
                task.update(status="cancelled", finished_at=now, reason=f"workflow {status}")
                self._write_task(tr, wf["id"], task)
        self._set_wf_status(tr, wf, status, error=error)
        out.control.append(Envelope(type=MessageType.CONTROL, subject="cancel", source=self.source,
                                    workflow_id=wf["id"]))
        out.replies += self._reply(wf)
        return out

    def _reply(self, wf: dict) -> list[tuple[Envelope, str]]:
        if not wf.get("reply_to"):
            return []
        env = Envelope(type=MessageType.RESULT, subject="workflow.finished", source=self.source,
                       workflow_id=wf["id"], correlation_id=wf.get("correlation_id"),
                       payload={"status": wf["status"], "result": wf.get("result"), "error": wf.get("error")})
        return [(env, wf["reply_to"])]

    async def note_waiting(self, wf_id: str, task_id: str, reason: str) -> None:
        """Records why a queued task is not running yet (shown as its `reason`)."""

        def txn(tr: Transaction) -> None:
            raw = tr.get(self._task_key(wf_id, task_id))
            if raw is None:
                return
            task = orjson.loads(raw)
            if task["status"] in ("queued", "pending") and task["reason"] != reason:
                task["reason"] = reason
                self._write_task(tr, wf_id, task)

        await self.store.transact(txn)

    async def cancel(self, wf_id: str) -> tuple[dict, FollowUps]:
        def txn(tr: Transaction):
            wf = self._read_wf(tr, wf_id)
            out = self._fail_workflow(tr, wf, "cancelled by request", status="cancelled")
            return workflow_view(wf, self._tasks(tr, wf_id)), out

        return await self.store.transact(txn)

    # ---- queries ---------------------------------------------------------------------------------
    async def get(self, wf_id: str) -> dict:
        def txn(tr: Transaction) -> dict:
            return workflow_view(self._read_wf(tr, wf_id), self._tasks(tr, wf_id))

        return await self.store.transact(txn)

    async def list(self, status: str | None, limit: int, after: str | None) -> list[dict]:
        """Newest first; `after` is the last workflow id of the previous page."""

        def txn(tr: Transaction) -> list[dict]:
            if status:
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
            return [{k: wf.get(k) for k in ("id", "name", "status", "created_at", "updated_at", "finished_at",
                                             "parent")} | {"workflow_id": wf["id"], "tasks": len(wf["task_ids"])}
                    for wf in wfs]

        return await self.store.transact(txn)
