"""`GET /v1/workflows/{id}/events`: one workflow's life, and its child workflows', as server-sent events.

A client gets, in this order:
 1. `event: snapshot` with the id the client resumes from: {"at", "workflow": view, "children": [views],
    "children_truncated"}, the views without results or checkpoint states (GET /v1/workflows/{id} has
    them; they may be large);
 2. every entry of the family's log (workflows.log_after: chunk, input, answer, published, child) after
    the client's Last-Event-ID, each with `id: <seq>`;
 3. live: those entries as they commit, and the live-only changes (task, workflow, progress);
 4. `event: end` {"status"} once the workflow is finished; then the stream closes.

Every `id:` is a position in the log: an entry's own seq, and on a live-only change the position reached
so far. So a client that reconnects with the last id it saw (an EventSource does by itself) gets exactly
the entries after it, nothing twice, nothing missed that the log still holds.

Live entries may come out of order, or not at all (services publish only while someone watches, and the
watch announcement takes a round trip). The stream sends entries strictly in seq order: one after a gap
waits GAP_WAIT_S for the gap to fill live, then the gap is read from the store, which has it (an entry is
published only after it committed, and every seq before it committed first). When nothing comes for a
while, the stream reads the store anyway, backing off from POLL_S to MAX_POLL_S: the safety net for what
was never published (entries, the workflow's end, and its tasks' states: a task whose state differs from
what the stream last said gets a "task" change, dated by the read).

Everything is bounded: live changes wait in the hub's bounded queue (a client that falls that far behind
is cut off, and resumes from its last id), the store is read a page at a time, and the snapshot names at
most SNAPSHOT_CHILDREN children.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.responses import Response

from switchboard import stream
from switchboard.tokens import Principal
from switchboard.workflows import TERMINAL_WORKFLOW

from services.api.events import KNOWN_CHILDREN, EventStream, frame

if TYPE_CHECKING:
    from fastapi import FastAPI

    from services.api.service import Api

log = logging.getLogger(__name__)

LOG_PAGE = 500  # entries per store read
DRAIN = 500  # live changes taken off the queue before the next send
MAX_PENDING = 1000  # entries held after a gap; past that the gap is read from the store at once
GAP_WAIT_S = 0.25
POLL_S, MAX_POLL_S = 1.0, 5.0
SNAPSHOT_CHILDREN = 100
RETRY_MS = 1000  # how soon an EventSource reconnects after the stream ended (its default is about 3 s)
MAX_SEQ = 2**63 - 1
KINDS = ["snapshot", "task", "workflow", "progress", "chunk", "input", "answer", "published", "child", "end"]
# One event of the stream, as OpenAPI before 3.2 describes a text/event-stream: its fields, as text.
EVENT_SCHEMA = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"type": "string", "enum": KINDS},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"type": "object"}},
    "id": {"type": "string", "pattern": "^[0-9]+$", "description": "a position in the family's log"},
    "retry": {"type": "string"}}}


def summary(view: dict) -> dict:
    """A workflow view for the snapshot: no results, no checkpoint state (see the docstring)."""
    tasks = []
    for task in view.get("tasks") or ():
        task = {k: v for k, v in task.items() if k != "result"}
        if isinstance(task.get("checkpoint"), dict):
            task["checkpoint"] = {k: v for k, v in task["checkpoint"].items() if k != "state"}
        tasks.append(task)
    return {**{k: v for k, v in view.items() if k != "result"}, "tasks": tasks}


async def descendants(workflows, wf_id: str, limit: int = KNOWN_CHILDREN) -> list[str]:
    """The workflow's child workflows and theirs, breadth first, at most `limit` (so as many reads)."""
    found: list[str] = []
    seen, frontier = {wf_id}, [wf_id]
    while frontier:
        level = []
        for parent in frontier:
            for child in await workflows.children(parent):
                if child in seen:
                    continue
                seen.add(child)
                found.append(child)
                level.append(child)
                if len(found) >= limit:
                    return found
        frontier = level
    return found


class FamilyStream(EventStream):
    """The ASGI response of one client of one workflow (see the module's docstring)."""

    def __init__(self, hub, client, workflows, snapshot: dict, after: int):
        super().__init__(hub, client)
        self.workflows, self.snapshot = workflows, snapshot
        self.wf_id: str = client.workflow_id
        self.status: str = snapshot["workflow"]["status"]
        # Each task's (status, attempt) as this client last heard it, to see what a poll finds changed.
        self.known = {t["id"]: (t["status"], t["attempts"]) for t in snapshot["workflow"]["tasks"]}
        self.last = after  # every entry up to this seq has been sent, or skipped as another family's
        self.pending: dict[int, dict] = {}  # entries past a gap, by seq
        self.read_due: float | None = None  # when the store must be read to fill a gap
        self.out: list[bytes] = []
        self.sent_at = time.monotonic()

    async def _pump(self, send) -> None:
        try:
            await self._follow(send)
        except Exception as exc:  # noqa: BLE001 (the store or the broker failed: the client resumes later)
            log.warning("the event stream of workflow %s ended: %s", self.wf_id, exc)

    async def _follow(self, send) -> None:
        self.out += [b"retry: %d\n: connected\n\n" % RETRY_MS, frame("snapshot", self.snapshot, self.last)]
        await self._read_log(send)
        poll_s, polled_at = POLL_S, time.monotonic()
        while self.status not in TERMINAL_WORKFLOW:
            now = time.monotonic()
            due = self.read_due if self.read_due is not None else polled_at + poll_s
            change = None
            try:  # not wait_for: on 3.11, cancelling it just as the queue hands over an item can hang
                async with asyncio.timeout(max(0.0, due - now)):
                    change = await self.client.queue.get()
            except TimeoutError:
                pass
            if change is not None:
                self._take(change)
                for _ in range(DRAIN):
                    if self.client.queue.empty():
                        break
                    self._take(self.client.queue.get_nowait())
                poll_s, polled_at = POLL_S, time.monotonic()  # the stream is live: no need to poll soon
            now = time.monotonic()
            if self.read_due is not None and now >= self.read_due:
                await self._read_log(send)
            elif change is None and now >= polled_at + poll_s:
                await self._poll()
                await self._read_log(send)
                poll_s, polled_at = min(poll_s * 2, MAX_POLL_S), time.monotonic()
            if not self.out and now - self.sent_at >= self.hub.heartbeat_s:
                self.out.append(b": heartbeat\n\n")
            await self._flush(send)
        # Finished: whatever committed before the workflow did is in the log by now.
        await self._read_log(send)
        self.out.append(frame("end", {"status": self.status}, self.last))
        await self._flush(send)

    async def _poll(self) -> None:
        """The workflow's status, and a change for each of its tasks that the live ones left behind."""
        at = time.time()  # before the read: a live change that committed after it is newer, and wins
        view = await self.workflows.get(self.wf_id)
        self.status = view["status"]
        for task in view["tasks"]:
            state = (task["status"], task["attempts"])
            if self.known.get(task["id"]) != state:
                self.known[task["id"]] = state
                self.out.append(frame("task", {**stream.task_change(self.wf_id, task), "at": at}, self.last))

    def _take(self, change: dict) -> None:
        """A live change from the hub: a live-only one goes out now, an entry in seq order."""
        seq = change.get("seq")
        if seq is None:
            self.out.append(frame(change["event"], change, self.last))
            if change.get("workflow_id") == self.wf_id:
                if change["event"] == "workflow":
                    self.status = change.get("status") or self.status
                elif change["event"] == "task":
                    self.known[change.get("task_id")] = (change.get("status"), change.get("attempt"))
            return
        if not isinstance(seq, int) or seq <= self.last:
            return  # already sent (read from the store before it came live)
        self.pending[seq] = change
        while (entry := self.pending.pop(self.last + 1, None)) is not None:
            self._entry(entry)
        if len(self.pending) > MAX_PENDING:
            self.pending.clear()  # committed, all of them: the store has them
            self.read_due = time.monotonic()
        elif not self.pending:
            self.read_due = None
        elif self.read_due is None:
            self.read_due = time.monotonic() + GAP_WAIT_S

    def _entry(self, entry: dict) -> None:
        """The next entry of the root's log: sent if it is of this family."""
        self.last = entry["seq"]
        family = self.client.family
        wf_id = entry.get("workflow_id")
        if entry.get("event") == "child" and wf_id in family:
            self.client.adopt(entry.get("child_workflow_id"))
        if wf_id in family:
            self.out.append(frame(entry["event"], entry, self.last))

    async def _read_log(self, send) -> None:
        """Reads the log after `last` to its end, a page at a time, sending as it goes."""
        while True:
            self.read_due = None
            page = await self.workflows.log_after(self.wf_id, self.last, limit=LOG_PAGE)
            for entry in page:
                if entry["seq"] > self.last:
                    self._entry(entry)
            # Live changes that came meanwhile, so that a long read does not leave the queue to fill up.
            for _ in range(DRAIN):
                if self.client.queue.empty():
                    break
                self._take(self.client.queue.get_nowait())
            await self._flush(send)
            overflowed = self.read_due is not None and self.read_due <= time.monotonic()  # see _take
            if len(page) < LOG_PAGE and not overflowed:
                break
        for seq in [s for s in self.pending if s <= self.last]:
            del self.pending[seq]
        while (entry := self.pending.pop(self.last + 1, None)) is not None:
            self._entry(entry)
        await self._flush(send)
        self.read_due = time.monotonic() + GAP_WAIT_S if self.pending else None

    async def _flush(self, send) -> None:
        if self.out:
            body, self.out = b"".join(self.out), []
            await send({"type": "http.response.body", "body": body, "more_body": True})
            self.sent_at = time.monotonic()


def add_routes(app: FastAPI, service: Api, allow, visible) -> None:
    """The route, on create_app's app; `visible` is its check that the caller may see a workflow."""
    # Here rather than at the top: app.py imports this module, and these are defined there.
    from services.api.app import ApiError, ErrorBody, answers

    @app.get("/v1/workflows/{workflow_id}/events", response_class=Response, responses={
        **answers(401, 403, 404, 422, 429),
        200: {"description": "A server-sent-events stream of the workflow and its child workflows, which "
                             "ends once the workflow has finished: `event: snapshot` (the views), then "
                             "`id:` (a log position) and `event:` task, workflow, progress, chunk, input, "
                             "answer, published or child, then `event: end` {status}.",
              "content": {"text/event-stream": {"schema": EVENT_SCHEMA}}},
        503: {"model": ErrorBody, "description": "This api has too many streams open, or is stopping."}})
    async def workflow_events(
        request: Request, workflow_id: str,
        last_event_id: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="resume after this id, for "
                                                   "clients that cannot send the Last-Event-ID header")] = None,
        last_event_header: Annotated[int | None, Header(alias="last-event-id", ge=0, le=MAX_SEQ,
                                                        description="resume after this id")] = None,
        access_token: Annotated[str | None, Query(description="the token, for clients that cannot send the "
                                                  "Authorization header (a browser's EventSource)")] = None,
        who: Principal = Depends(allow("read", own="workflows.read_own", query_token=True)),
    ):
        """The workflow's life: task states, progress, streamed output, questions and answers, published
        events, and those of its child workflows. Reconnect with Last-Event-ID to resume."""
        # The header wins: an EventSource that reconnects sends it, newer than the id in its URL.
        after = last_event_header if last_event_header is not None else last_event_id or 0
        hub = service.events
        client = hub.subscribe(workflow_id, raw=True)
        if client is None:
            raise ApiError(503, "unavailable", "too many event streams on this api replica; retry later")
        try:
            # Subscribed before the views are read, so that what changes after the read comes live (once
            # the announcement has reached the services: until then the poll makes up for it).
            at = time.time()
            view = await visible(request, who, workflow_id)
            await hub.announce()
            client.root = view.get("root") or workflow_id
            children = await descendants(service.workflows, workflow_id)
            for child in children:
                client.adopt(child)
            views = []
            for child in children[:SNAPSHOT_CHILDREN]:
                try:
                    views.append(summary(await visible(request, who, child)))
                except ApiError:
                    pass  # gone, or not the caller's: absent, as GET /v1/workflows/{id} would say
        except BaseException:
            hub.unsubscribe(client)
            raise
        snapshot = {"at": at, "workflow": summary(view), "children": views,
                    "children_truncated": len(children) > SNAPSHOT_CHILDREN}
        return FamilyStream(hub, client, service.workflows, snapshot, after)
