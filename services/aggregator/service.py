"""Records what agents report, exactly once, and moves workflows on.

Statuses, results and errors are applied in batches, one store transaction a batch: under load that
is a few commits a second rather than one a result. A message is acked only after its batch committed
and the batch's follow-ups (dependency releases, retries, replies to delegating agents, cancels) were
confirmed by the broker, so a crash at any point leads to redelivery, which the store recognises.
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.exceptions import AMQPError

from switchboard import telemetry
from switchboard.bus import Transient
from switchboard.protocol import Envelope, MessageType
from switchboard.runtime import Service
from switchboard.state import StoreUnavailable
from switchboard.workflows import FollowUps, WorkflowStore

log = logging.getLogger(__name__)

BATCH_MAX = 256
PREFETCH = 1024
_OUTCOMES = {MessageType.STATUS, MessageType.RESULT, MessageType.ERROR}


class Aggregator(Service):
    name = "aggregator"
    default_port = 8104
    uses_store = True

    async def setup(self) -> None:
        self.workflows = WorkflowStore(self.store, self.settings)
        self.pending: list[tuple[Envelope, asyncio.Future]] = []
        self.wakeup = asyncio.Event()
        self.background(self._write_loop())
        await self.consume(self.bus.topology.results, self.handle, prefetch=PREFETCH)

    async def handle(self, env: Envelope, message) -> None:
        if env.type not in _OUTCOMES or not env.workflow_id or not env.task_id:
            raise ValueError(f"not a task outcome: type={env.type.value} subject={env.subject!r}")
        done = asyncio.get_running_loop().create_future()
        self.pending.append((env, done))
        self.wakeup.set()
        await done  # the bus acks when this returns: after the commit and the follow-ups

    async def _write_loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                batch, self.pending = self.pending[:BATCH_MAX], self.pending[BATCH_MAX:]
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[Envelope, asyncio.Future]]) -> None:
        try:
            out = await self.workflows.record([env for env, _ in batch])
            await self._publish(out)
        except (StoreUnavailable, ConnectionError, AMQPError) as exc:
            for _, done in batch:
                done.set_exception(Transient(str(exc)))
            return
        except Exception as exc:
            if len(batch) > 1:  # find the one message that cannot be applied; the rest go through
                for item in batch:
                    await self._commit([item])
                return
            batch[0][1].set_exception(exc)
            return
        for env, done in batch:
            done.set_result(None)
            if env.type != MessageType.STATUS:
                telemetry.TASK_OUTCOMES.labels(env.type.value).inc()

    async def _publish(self, out: FollowUps) -> None:
        topology = self.bus.topology
        messages = [(env, topology.coordinator) for env in out.coordinator]
        messages += [(env, topology.dispatch) for env in out.dispatch]
        messages += out.replies
        await self.bus.publish_many(messages)
        for env in out.control:
            await self.bus.broadcast(env)
