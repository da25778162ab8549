"""`GET /v1/events`: the platform's stream events (switchboard.stream) as server-sent events.

Each api process subscribes once (a private queue bound to `<ns>.events` with `#`) and fans every change
out to its connected clients. Each client has a bounded queue: one that falls CLIENT_QUEUE events behind
(it stopped reading, so its socket and then its queue filled up) is cut off, and a browser's EventSource
reconnects by itself. Nothing is buffered without limit, and a slow client never slows the others.

Two kinds of client share the hub. A plain one (this stream) gets rendered frames: `id:` (increasing
within this api process), `event:` (the change's kind), `data:` (the change as JSON); a comment line
every HEARTBEAT_S keeps proxies from closing an idle stream. It never gets "chunk" changes: a task that
streams tokens makes hundreds a second, which would flood every console watching the platform; they are
for the one workflow's stream. A raw client (services.api.workflow_events) gets the change dicts
themselves, chunks included, and renders them its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

import orjson
from starlette.responses import Response

from switchboard import stream, telemetry

log = logging.getLogger(__name__)

CLIENT_QUEUE = 1000
HEARTBEAT_S = 15.0
MAX_CLIENTS = 1000
KNOWN_CHILDREN = 1000  # child workflows a filtered client remembers (the newest)
# Live-only changes (no seq) and the entries of a workflow family's log (with seq: workflows.log_after).
EVENTS = ("task", "workflow", "agents", "dlq", "control", "progress", "chunk", "input", "answer", "published",
          "child")
WORKFLOW_EVENTS = frozenset(EVENTS) - {"agents", "dlq", "control"}  # those that name a workflow_id
NOT_PLAIN = frozenset({"chunk"})  # too many for the platform-wide stream (see the docstring)


def frame(kind: str, data: dict, seq: int | None = None) -> bytes:
    """One server-sent event: `id:` (if any), `event:`, and `data:` as JSON."""
    head = b"" if seq is None else b"id: %d\n" % seq
    return head + b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps(data))


class Client:
    """One connected stream. With a workflow id, only that workflow's events and its children's: a child
    is recognised by its workflow change, whose parent is in the family, or by a "child" entry of a
    workflow in the family. A raw client gets change dicts; with `root`, every entry of that root's log
    too, whichever workflow of it wrote the entry (its stream needs every seq to see what it missed)."""

    def __init__(self, workflow_id: str | None, size: int, *, raw: bool = False, root: str | None = None):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=size)
        self.workflow_id, self.raw, self.root = workflow_id, raw, root
        self.family: OrderedDict[str, None] = OrderedDict({workflow_id: None} if workflow_id else {})
        self.cut = asyncio.Event()

    def adopt(self, wf_id: str) -> None:
        """wf_id is a child of the family from now on (the newest KNOWN_CHILDREN are remembered)."""
        if not isinstance(wf_id, str) or wf_id in self.family:
            return
        self.family[wf_id] = None
        if len(self.family) > KNOWN_CHILDREN + 1:
            self.family.popitem(last=False)
            self.family[self.workflow_id] = None  # the workflow itself is never forgotten
            self.family.move_to_end(self.workflow_id, last=False)

    def wants(self, change: dict) -> bool:
        kind = change.get("event")
        if not self.raw and kind in NOT_PLAIN:
            return False
        if self.workflow_id is None:
            return True
        if kind not in WORKFLOW_EVENTS:
            return False
        wf_id = change.get("workflow_id")
        if kind == "workflow" and (change.get("parent") or {}).get("workflow_id") in self.family:
            self.adopt(wf_id)
        elif kind == "child" and wf_id in self.family:
            self.adopt(change.get("child_workflow_id"))
        if self.root is not None and "seq" in change and change.get("root") == self.root:
            return True
        return wf_id in self.family

    def offer(self, item) -> bool:
        """False when the client is too far behind: it is cut off."""
        try:
            self.queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            self.cut.set()
            return False


class EventHub:
    def __init__(self, bus, *, client_queue: int = CLIENT_QUEUE, heartbeat_s: float = HEARTBEAT_S):
        self.bus = bus
        self.client_queue, self.heartbeat_s = client_queue, heartbeat_s
        self.clients: set[Client] = set()
        self.sequence = 0
        self.cut_off = 0  # clients cut off for falling behind, since start (for tests and logs)
        self.closed = False
        self._announced = float("-inf")

    async def start(self, service) -> None:
        consumer = await self.bus.consume_private(self._receive, bind_events=True, prefetch=256)
        service._consumers.append(consumer)  # stopped, and its queue deleted, with the service
        service.every(stream.WATCH_EVERY_S, self._keep_watched, "stream watch")

    async def announce(self, *, force: bool = False) -> None:
        """Tells every service that someone watches, so that they publish their changes (switchboard.stream:
        nobody watching, they publish none). This replica starts at once; the others within a round trip."""
        stream.watch()
        now = time.monotonic()
        if force or now - self._announced > 1.0:
            self._announced = now
            try:
                await self.bus.broadcast(stream.watch_message("api"))
            except Exception as exc:  # noqa: BLE001 (the stream goes on; the next round tries again)
                log.warning("could not announce the event stream's watchers: %s", exc)

    async def _keep_watched(self) -> None:
        if self.clients:
            await self.announce(force=True)

    async def _receive(self, env, message) -> None:
        changes = env.payload.get("changes")
        if not isinstance(changes, list):
            raise ValueError("a stream message needs a list of changes")
        for change in changes:
            if not isinstance(change, dict) or change.get("event") not in EVENTS:
                continue
            self.sequence += 1
            rendered = None  # once, for every plain client that wants it
            for client in list(self.clients):
                if not client.wants(change):
                    continue
                if not client.raw and rendered is None:
                    rendered = frame(change["event"], change, self.sequence)
                if not client.offer(change if client.raw else rendered):
                    self.clients.discard(client)
                    self.cut_off += 1
                    log.warning("event stream client cut off: %d events behind", self.client_queue)
                    telemetry.emit("events.client_cut_off")

    def subscribe(self, workflow_id: str | None = None, *, raw: bool = False, root: str | None = None) -> Client | None:
        if self.closed or len(self.clients) >= MAX_CLIENTS:
            return None
        client = Client(workflow_id, self.client_queue, raw=raw, root=root)
        self.clients.add(client)
        return client

    def unsubscribe(self, client: Client) -> None:
        self.clients.discard(client)

    def close(self) -> None:
        """Ends every stream (the api is stopping: open streams would hold up its shutdown)."""
        self.closed = True
        for client in self.clients:
            client.cut.set()
        self.clients.clear()


class EventStream(Response):
    """The ASGI response of one client: frames from its queue until it disconnects or is cut off. Plain
    ASGI rather than StreamingResponse, so that a client that stopped reading (its send blocks) can be
    ended at once: what ends the stream cancels the send."""

    media_type = "text/event-stream"

    def __init__(self, hub: EventHub, client: Client):
        super().__init__(status_code=200, media_type=self.media_type)
        self.hub, self.client = hub, client

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no")]})  # nginx: pass events on at once
        tasks = [asyncio.create_task(self._pump(send)), asyncio.create_task(_disconnected(receive)),
                 asyncio.create_task(self.client.cut.wait())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.hub.unsubscribe(self.client)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # A client still there gets a proper end; one that stopped reading may never take it, so bounded.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}), 1.0)

    async def _pump(self, send) -> None:
        await send({"type": "http.response.body", "body": b": connected\n\n", "more_body": True})
        while True:
            try:  # not wait_for: on 3.11, cancelling it just as the queue hands over an item can hang
                async with asyncio.timeout(self.hub.heartbeat_s):
                    frame = await self.client.queue.get()
            except TimeoutError:
                frame = b": heartbeat\n\n"
            await send({"type": "http.response.body", "body": frame, "more_body": True})


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
