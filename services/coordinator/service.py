"""Workflow intake, dependency resolution, and the timeout watchdog.

Takes in workflows with dependencies (stored by the api, or submitted by a delegating agent; the api
starts the others itself), registers their dependencies with RQ and queues the tasks that wait on
nothing. When the aggregator reports a task
succeeded, RQ says which dependents are now ready, and they are queued with their parents' results.

RQ's data is derived: if Redis loses it (a sentinel key disappears, or RQ no longer knows a job), the
coordinator rebuilds it from the state store. A sweep takes in workflows that were stored but never
announced or whose tasks were never queued (the api died in between); the watchdog fails attempts whose agent hung or vanished.
Every coordinator also submits the workflows of due schedules (switchboard.schedules), each tick once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis

from switchboard import telemetry
from switchboard.bus import Transient
from switchboard.control import Controls
from switchboard.control import message as control_message
from switchboard.deps import DependencyGraph
from switchboard.protocol import Envelope, InvalidSpec, MessageType, WorkflowSpec, validate_workflow
from switchboard.runtime import Service
from switchboard.schedules import Scheduler, Schedules
from switchboard.telemetry import Batch, Cause
from switchboard.workflows import FollowUps, NotFound, WorkflowStore

log = logging.getLogger(__name__)

INTAKE_SWEEP_S = 5.0
WATCHDOG_S = 1.0
REDIS_CHECK_S = 1.0
SAMPLE_S = 5.0
SCHEDULES_S = 1.0  # due schedules are looked for this often: a tick is submitted within about this long


class Coordinator(Service):
    name = "coordinator"
    default_port = 8101
    uses_store = True
    uses_redis = True

    async def setup(self) -> None:
        self.workflows = WorkflowStore(self.store, self.settings)
        self.routes = await self.follow_routes()
        self.controls = Controls(self.store, self.settings.namespace)
        self.redis_sync = redis.Redis.from_url(self.settings.redis_url)
        self.graph = DependencyGraph(self.redis_sync, self.settings.namespace)
        self.sentinel = f"{self.settings.namespace}:deps:sentinel"
        self.rebuilding = asyncio.Lock()
        self.rebuild_task: asyncio.Task | None = None
        self.rebuild_again = False
        self.taking_in: set[str] = set()  # workflows whose intake is under way in this process
        # The dependency engine is synchronous (RQ's own client); one thread keeps it off the event loop,
        # and its calls in order.
        self.rq_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rq")
        await self._check_redis()
        await self.consume(self.bus.topology.coordinator, self.handle, prefetch=64)
        self.every(INTAKE_SWEEP_S, self._sweep_intake, "intake sweep")
        self.every(WATCHDOG_S, self._watchdog, "timeout watchdog")
        self.every(REDIS_CHECK_S, self._check_redis, "redis check")
        self.every(SAMPLE_S, self._sample, "workflow sampling")
        scheduler = Scheduler(Schedules(self.store, self.settings), self.workflows, self.bus, self.routes, self.take_in)
        self.every(SCHEDULES_S, scheduler.run_due, "schedules")

    async def teardown(self) -> None:
        self.rq_thread.shutdown(wait=False, cancel_futures=True)

    async def handle(self, env: Envelope, message) -> None:
        if env.reply_to and not env.reply_to.startswith(f"{self.settings.namespace}.reply."):
            # Agents ask here through agent-out; their replies go only to a reply queue, never to a
            # queue that they may not publish to themselves (dispatch, another capability's).
            raise ValueError(f"reply_to {env.reply_to!r} is not a reply queue")
        if env.subject == "workflow.submitted":
            await self.take_in(env.payload["workflow_ids"], redelivered=message.redelivered)
        elif env.subject == "workflow.submit":
            await self._submit_child(env)
        elif env.subject == "tasks.succeeded":
            # [workflow, task, traceparent]; messages of older versions have no traceparent
            causes = [Cause(wf_id, task_id, *rest[:1]) for wf_id, task_id, *rest in env.payload["tasks"]]
            await telemetry.batching(Batch("release", causes), functools.partial(
                self._release, causes, check_store=message.redelivered))
        elif env.subject == "task.context" and env.reply_to:
            # A new attempt (a retry, or a redelivery after its agent died) asks where to start from.
            redelivered = env.attempt if env.payload.get("redelivered") else None
            try:
                context, out = await self.workflows.context(env.workflow_id or "", env.task_id or "",
                                                            redelivered=redelivered)
            except NotFound:
                context, out = {"skip": True}, FollowUps()
            await out.publish(self.bus)
            await self.bus.publish(Envelope(type=MessageType.EVENT, subject="task.context", source=self.name,
                                            correlation_id=env.correlation_id, payload=context), env.reply_to)
        elif env.subject == "control.query" and env.reply_to:
            reply = control_message(await self.controls.get(), self.name)
            reply.correlation_id = env.correlation_id
            await self.bus.publish(reply, env.reply_to)
        else:
            raise ValueError(f"coordinator does not handle subject {env.subject!r}")

    async def take_in(self, wf_ids: list[str], *, redelivered: bool = False) -> None:
        self.taking_in.update(wf_ids)
        try:
            graphs, out = await self.workflows.start(wf_ids, redelivered=redelivered)
            # Before any root is published, so no parent can finish before its dependents are registered.
            if graphs:
                await self._redis(self.graph.register_many, graphs)
            await out.publish(self.bus, self.routes)
            await self.workflows.taken_in(wf_ids)
        finally:
            self.taking_in.difference_update(wf_ids)

    async def _submit_child(self, env: Envelope) -> None:
        spec = WorkflowSpec.model_validate(env.payload["workflow"])
        try:
            validate_workflow(spec, max_payload_bytes=self.settings.max_payload_bytes,
                              max_tasks=self.settings.max_tasks_per_workflow)
        except InvalidSpec as exc:
            raise ValueError(f"invalid child workflow: {exc}") from exc
        wf_id, out = await self.workflows.create_child(
            spec, env.payload["idempotency_key"], env.payload.get("parent"), env.reply_to, env.correlation_id
        )
        await out.publish(self.bus)
        await self.take_in([wf_id], redelivered=True)  # a known child may be re-asked for: answer again

    async def _release(self, causes: list[Cause], *, check_store: bool) -> None:
        resend_queued = check_store  # a redelivery: children we queued may never have been published
        succeeded = [(c.workflow_id, c.task_id) for c in causes]
        answers = await self._redis(self.graph.release_many, succeeded)
        ready: dict[str, set[str]] = {}
        released_by: dict[tuple[str, str], str | None] = {}  # a ready child → the trace of its last parent
        unknown = []
        for cause, children in zip(causes, answers):
            ready.setdefault(cause.workflow_id, set()).update(children or ())
            for child in children or ():
                released_by[cause.workflow_id, child] = cause.traceparent
            if children is None:
                unknown.append((cause.workflow_id, cause.task_id))
        if unknown:
            # Redis lost RQ's data: the store knows what is ready; the rebuild restores the rest.
            log.warning("dependency data of %d succeeded tasks is gone from Redis; rebuilding", len(unknown))
            self.rebuild_again = True  # a rebuild under way may have read the store before these successes
            if self.rebuild_task is None or self.rebuild_task.done():
                self.rebuild_task = asyncio.create_task(self._rebuild())
        if to_check := succeeded if check_store else unknown:
            # RQ may have handed out the children before we died, or lost them. The store knows.
            for wf_id, children in (await self.workflows.ready_children(to_check)).items():
                ready[wf_id] |= children
        ready = {wf_id: sorted(children) for wf_id, children in ready.items() if children}
        if ready:
            out = await self.workflows.release(ready, resend_queued=resend_queued)
            for env in out.dispatch:
                env.traceparent = released_by.get((env.workflow_id, env.task_id)) or env.traceparent
            await out.publish(self.bus, self.routes)

    async def _redis(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.rq_thread, fn, *args)
        except redis.RedisError as exc:
            raise Transient(f"redis: {exc}") from exc

    async def _sweep_intake(self) -> None:
        # A slow intake of ours is no reason to send its roots twice.
        wf_ids = [w for w in await self.workflows.unscheduled(older_than_s=INTAKE_SWEEP_S) if w not in self.taking_in]
        if wf_ids:
            log.info("taking in %d workflows that were never announced", len(wf_ids))
            await self.take_in(wf_ids)

    async def _watchdog(self) -> None:
        out = await self.workflows.expire_overdue()
        if out.dispatch or out.delayed or out.control:
            log.warning("watchdog: %d attempts overdue", len(out.outcomes))
        await out.publish(self.bus)
        await self.workflows.expire_cache()  # drops expired result-cache entries, a bounded number a round

    async def _sample(self) -> None:
        """Workflows in flight, tasks queued by priority and tasks waiting for parents, for the metrics."""
        in_flight, queued = await self.workflows.census()
        pending = await self._redis(self.graph.pending)
        telemetry.emit("workflows.sampled", in_flight=in_flight, queued=queued, dependencies_pending=pending)

    async def _check_redis(self) -> None:
        if await self._redis(self.redis_sync.set, self.sentinel, uuid.uuid4().hex, None, None, True):
            # SET NX succeeded: the sentinel was missing, so Redis is new or lost its data.
            await self._rebuild()

    async def _rebuild(self) -> None:
        """Registers every running workflow's dependencies again and re-releases what succeeded,
        children first, so exactly the dependents whose parents all succeeded come out. What succeeded
        is read after registering, so a success recorded meanwhile is not missed."""
        if self.rebuilding.locked():
            self.rebuild_again = True
            return
        async with self.rebuilding:
            self.rebuild_again = True
            while self.rebuild_again:
                self.rebuild_again = False
                graphs = await self.workflows.graphs_to_rebuild()
                released = 0
                for wf_id, parents in graphs:
                    try:
                        released += await self._rebuild_one(wf_id, parents)
                    except Exception as exc:  # one broken workflow must not stop the others
                        log.warning("rebuild of workflow %s failed (%s); will retry", wf_id, exc)
                        self.rebuild_again = True
                if graphs:
                    log.warning("rebuilt dependencies of %d running workflows from the store (%d tasks released)",
                                len(graphs), released)
                if self.rebuild_again:
                    await asyncio.sleep(REDIS_CHECK_S)  # pacing while Redis is still coming back

    async def _rebuild_one(self, wf_id: str, parents: dict[str, list[str]]) -> int:
        await self._redis(self.graph.register, wf_id, parents)
        succeeded = [(wf_id, t) for t in await self.workflows.succeeded_children_first(wf_id, parents)]
        ready = [t for children in await self._redis(self.graph.release_many, succeeded) for t in children or ()]
        out: FollowUps = await self.workflows.release({wf_id: ready}, resend_queued=False)
        await out.publish(self.bus, self.routes)
        return len(out.dispatch)
