"""Records what agents report, exactly once, and moves workflows on.

Statuses, results and errors are applied in batches, one store transaction a batch: under load that
is a few commits a second rather than one a result. A message is acked only after its batch committed
and the batch's follow-ups (dependency releases, retries, replies to delegating agents, cancels) were
confirmed by the broker, so a crash at any point leads to redelivery, which the store recognises.
Outcomes then feed the circuit breakers; an agent whose breaker opens is told to stand back.
Besides outcomes, a running task's reports go in the same way (switchboard.tasklog: streamed text,
progress, checkpoints, questions, published events), and events are passed on to the topics exchange
once recorded. Each outcome goes in with its broker user (the AMQP user_id RabbitMQ validated): the store refuses one
from a user other than the one its attempt belongs to, and its message is dead-lettered as forged.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import redis

from switchboard import tasklog, telemetry
from switchboard.breakers import Breakers
from switchboard.bus import TRANSIENT, Transient
from switchboard.protocol import Envelope, MessageType
from switchboard.runtime import Service
from switchboard.telemetry import Batch
from switchboard.wire import batch_length
from switchboard.workflows import Forged, WorkflowStore, topic_message

log = logging.getLogger(__name__)

BATCH_MAX = 256
# A batch is one store transaction, and FoundationDB commits at most 10 MB in one: results are up to
# max_payload_bytes each, so a batch also stops at this many bytes of messages.
BATCH_BYTES = 4_000_000
PREFETCH = 1024
SUSPECT_REFRESH_S = 1.0
_OUTCOMES = {MessageType.STATUS, MessageType.RESULT, MessageType.ERROR}


class Aggregator(Service):
    name = "aggregator"
    default_port = 8104
    uses_store = True
    uses_redis = True

    async def setup(self) -> None:
        self.workflows = WorkflowStore(self.store, self.settings)
        self.routes = await self.follow_routes()
        self.breakers = Breakers(redis.Redis.from_url(self.settings.redis_url), self.settings)
        # Breakers that may be counting failures: only for these is a success worth a Redis write.
        self.suspect: set[str] = set()
        self.announced: dict[str, float | None] = {}  # agent breaker → the opening it was told about
        self.breaker_states: dict[str, str] = {}  # as last seen here, to count transitions
        # outcome, its handler's wait, its size, its broker user
        self.pending: list[tuple[Envelope, asyncio.Future, int, str | None]] = []
        self.wakeup = asyncio.Event()
        self.background(self._write_loop())
        self.every(SUSPECT_REFRESH_S, self._refresh_suspects, "breaker refresh")
        await self.consume(self.bus.topology.results, self.handle, prefetch=PREFETCH)

    async def handle(self, env: Envelope, message) -> None:
        if env.type == MessageType.EVENT and env.subject == "event.publish" and not env.task_id:
            # An agent's event from outside any task: nothing to record, only to pass on.
            topic = tasklog.check_topic(env.payload.get("topic"))
            await self.bus.publish_topic(topic_message(env, topic))
            return
        if (env.type not in _OUTCOMES and env.subject != "event.publish") or not env.workflow_id or not env.task_id:
            raise ValueError(f"not a task outcome: type={env.type.value} subject={env.subject!r}")
        done = asyncio.get_running_loop().create_future()
        self.pending.append((env, done, len(message.body), message.user_id))
        self.wakeup.set()
        await done  # the bus acks when this returns: after the commit and the follow-ups

    async def _write_loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                n = batch_length([size for _, _, size, _ in self.pending[:BATCH_MAX]], BATCH_BYTES)
                batch = [(env, done, user) for env, done, _, user in self.pending[:n]]
                self.pending = self.pending[n:]
                try:
                    outcomes = await telemetry.batching(Batch("record", [env for env, _, _ in batch]),
                                                        functools.partial(self._commit, batch))
                    if outcomes:
                        await self._feed_breakers(outcomes)
                except Exception:  # the loop must outlive any batch: waiting handlers depend on it
                    log.exception("aggregator batch failed; its messages will be redelivered")
                    for _, done, _ in batch:
                        if not done.done():
                            done.set_exception(Transient("aggregator batch failed"))

    async def _commit(self, batch: list[tuple[Envelope, asyncio.Future, str | None]]) -> list:
        try:
            out = await self.workflows.record([env for env, _, _ in batch], [user for _, _, user in batch])
            await out.publish(self.bus, self.routes)
        except TRANSIENT as exc:
            for _, done, _ in batch:
                if not done.done():  # a handler cancelled while draining no longer waits
                    done.set_exception(Transient(str(exc)))
            return []
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return []
            # Find the one message that cannot be applied; the rest go through.
            return [o for item in batch for o in await self._commit([item])]
        for i, reason in out.refused:  # the bus dead-letters these: "Forged: <reason>"
            if not batch[i][1].done():
                batch[i][1].set_exception(Forged(reason))
        for i, reason in out.deferred:  # the bus requeues these, for after what they must follow
            if not batch[i][1].done():
                batch[i][1].set_exception(Transient(reason))
        for _, done, _ in batch:
            if not done.done():
                done.set_result(None)
        return out.outcomes

    async def _feed_breakers(self, outcomes: list[tuple[str, str, bool]]) -> None:
        feed = []
        for capability, agent, ok in outcomes:
            for name in (f"cap:{capability}", f"agent:{agent}"):
                if not ok:
                    self.suspect.add(name)
                if not ok or name in self.suspect:
                    feed.append((name, ok))
        if not feed:
            return
        try:
            states = await asyncio.to_thread(lambda: {name: self.breakers.record(name, ok) for name, ok in feed})
        except redis.RedisError as exc:
            log.warning("circuit breakers not updated: %s", exc)
            return
        for name, (state, opened_at) in states.items():
            if self.breaker_states.get(name, "closed") != state:
                self.breaker_states[name] = state
                telemetry.emit("breaker.changed", breaker=name, state=state.replace("-", "_"))
            # Each opening (a failed probe re-opens it) is announced once, so the agent stands back again.
            if state == "open" and name.startswith("agent:") and self.announced.get(name) != opened_at:
                self.announced[name] = opened_at
                await self.bus.broadcast(Envelope(
                    type=MessageType.CONTROL, subject="breaker", source=self.name,
                    payload={"agent": name.removeprefix("agent:"), "state": state,
                             "retry_in_s": self.settings.breaker_reset_s}))

    async def _refresh_suspects(self) -> None:
        if self.suspect:
            snapshot = await asyncio.to_thread(self.breakers.snapshot, sorted(self.suspect))
            self.suspect = {n for n, s in snapshot.items() if s["state"] != "closed" or s["failures"]}
