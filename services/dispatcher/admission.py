"""The dispatcher's admission of tasks with limits (switchboard.limits).

Each gate (a task's rendered limit keys) has a queue, `limited.<gate id>`, that every dispatcher replica
consumes with a prefetch of one: each replica holds at most one task of a gate, the first by priority,
and waits (without polling the store) until the store says it may go: at the time the rate allows, or
when a slot is freed (a `limits.released` message wakes the waiters on that key; a recheck every
RECHECK_S covers a wake-up that went to another replica). Admitted, the task is routed like any other
and only then acked: a crash anywhere leaves it in its queue. Gates of one capability take turns by
being separate queues, and an admitted task goes on only while its capability's queue is shallow
(FAIR_DEPTH), so a key with a large backlog and a generous limit cannot bury another key's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from switchboard import limits
from switchboard.bus import LONG_HELD
from switchboard.protocol import Envelope, new_id

log = logging.getLogger(__name__)

RECHECK_S = 1.0
NOTE_EVERY_S = 10.0  # how often a replica that parks tasks of a gate tells the others of it (the store)
FAIR_DEPTH = 64  # admitted tasks ready in a capability's queue, past which admission waits
DEPTH_FRESH_S = 0.02


class Admission:
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.bus, self.store, self.workflows = dispatcher.bus, dispatcher.store, dispatcher.workflows
        self.ns = dispatcher.settings.namespace
        self.consumer = None
        self.consumed: dict[str, asyncio.Future] = {}  # gate id → this replica's start of consuming its queue
        self.noted: dict[str, float] = {}  # gate id → when this replica last noted it in the store
        self.waiting: set[str] = set()  # gates whose first task may not go yet
        self.freed: dict[str, asyncio.Event] = {}  # concurrency key → set when one of its slots was freed
        self.depths: dict[str, tuple[float, int]] = {}  # capability → (when read, ready messages)

    async def start(self) -> None:
        self.consumer = await self.bus.consume([], self.admit, prefetch=1, arguments=LONG_HELD)
        await self.dispatcher.consume(self.bus.topology.limits, self.on_released, prefetch=64)
        await self.refresh()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop(drain_timeout_s=1.0)  # the waiting tasks go back to their queues

    async def refresh(self) -> None:
        """Consumes the queues of the gates that any replica has parked tasks in."""
        for gate in await self.store.read(lambda tr: limits.gates(tr, self.ns)):
            await self._consume(gate)

    async def _consume(self, gate: dict) -> None:
        """Consumes the gate's queue once: parkers of a burst wait for the one consumer, since a second
        (prefetch 1 each) would hold, and admit, two of the gate's tasks at once."""
        started = self.consumed.get(gate["id"])
        if started is None:
            started = self.consumed[gate["id"]] = asyncio.ensure_future(self._start_consuming(gate["id"]))
        try:
            await asyncio.shield(started)
        except Exception:
            if self.consumed.get(gate["id"]) is started:
                del self.consumed[gate["id"]]  # the next parker tries again
            raise

    async def _start_consuming(self, gate_id: str) -> None:
        queue = self.bus.topology.limited_queue(gate_id)
        await self.bus.ensure_work_queue(queue)
        await self.consumer.add(queue)

    async def park(self, env: Envelope, gate: dict) -> None:
        """Queues a task with limits behind its gate, naming this parking: a task parked twice (its
        message redelivered from the dispatch queue) is then admitted once."""
        env.payload.setdefault("parked", new_id())
        now = time.monotonic()
        if now - self.noted.get(gate["id"], -NOTE_EVERY_S) >= NOTE_EVERY_S:
            await self.store.transact(lambda tr: limits.note_gate(tr, self.ns, gate))
            self.noted[gate["id"]] = now
        await self._consume(gate)
        await self.bus.publish(env, self.bus.topology.limited_queue(gate["id"]))
        if gate["id"] in self.waiting:
            await self.workflows.note_waiting(env.workflow_id, env.task_id, limits.describe(gate))

    async def admit(self, env: Envelope, message) -> None:
        """Holds the gate's first task until it is admitted (then routes it) or no longer to run."""
        gate = env.payload["limits"]
        conc = gate.get("concurrency")
        freed = self.freed.setdefault(conc["key"], asyncio.Event()) if conc else None
        noted = False
        while True:
            await self._fair_turn(gate["capability"])
            if freed is not None:
                freed.clear()
            outcome, retry_at = await self.workflows.admit(env, gate)
            if outcome == "drop":
                self.waiting.discard(gate["id"])
                return
            if outcome == "admitted":
                self.waiting.discard(gate["id"])
                await self.dispatcher.send_on(env)
                return
            self.waiting.add(gate["id"])
            if not noted:
                await self.workflows.note_waiting(env.workflow_id, env.task_id, limits.describe(gate))
                noted = True
            wait_s = RECHECK_S if retry_at is None else min(RECHECK_S, max(0.001, retry_at - time.time()))
            if freed is None:
                await asyncio.sleep(wait_s)  # the time the bucket allows
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), wait_s)

    async def _fair_turn(self, capability: str) -> None:
        """Waits while the capability's queue already holds FAIR_DEPTH tasks ready for its agents."""
        while True:
            read_at, depth = self.depths.get(capability, (0.0, 0))
            if time.monotonic() - read_at > DEPTH_FRESH_S:
                read_at = time.monotonic()
                depth = await self.bus.queue_depth(self.bus.topology.capability_queue(capability))
            if depth < FAIR_DEPTH:
                self.depths[capability] = (read_at, depth + 1)  # counting this one, until read again
                return
            self.depths[capability] = (read_at, depth)
            await asyncio.sleep(DEPTH_FRESH_S)

    async def on_released(self, env: Envelope, message) -> None:
        for key in env.payload.get("keys", []):
            event = self.freed.get(key)
            if event is not None:
                event.set()
