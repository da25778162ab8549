"""Workflow intake and dependency resolution.

Takes in workflows (stored by the api, or submitted by a delegating agent), registers their
dependencies with RQ and queues the tasks that wait on nothing. When the aggregator reports a task
succeeded, RQ says which dependents are now ready, and they are queued with their parents' results.
A sweep takes in workflows that were stored but never announced (the api died in between).
"""

from __future__ import annotations

import asyncio
import logging

import redis

from switchboard.bus import Transient
from switchboard.deps import DependencyGraph
from switchboard.protocol import Envelope, InvalidSpec, WorkflowSpec, validate_workflow
from switchboard.runtime import Service
from switchboard.workflows import FollowUps, WorkflowStore

log = logging.getLogger(__name__)

INTAKE_SWEEP_S = 5.0


class Coordinator(Service):
    name = "coordinator"
    default_port = 8101
    uses_store = True

    async def setup(self) -> None:
        self.workflows = WorkflowStore(self.store, self.settings)
        self.graph = DependencyGraph(redis.Redis.from_url(self.settings.redis_url), self.settings.namespace)
        await self.consume(self.bus.topology.coordinator, self.handle, prefetch=64)
        self.every(INTAKE_SWEEP_S, self._sweep_intake, "intake sweep")

    async def handle(self, env: Envelope, message) -> None:
        if env.subject == "workflow.submitted":
            await self.take_in(env.payload["workflow_ids"])
        elif env.subject == "workflow.submit":
            await self._submit_child(env)
        elif env.subject == "task.succeeded":
            await self._release(env.workflow_id, env.task_id, check_store=message.redelivered)
        else:
            raise ValueError(f"coordinator does not handle subject {env.subject!r}")

    async def take_in(self, wf_ids: list[str]) -> None:
        graphs, out = await self.workflows.start(wf_ids)
        # Before any root is published, so no parent can finish before its dependents are registered.
        for wf_id, parents in graphs.items():
            await self._redis(self.graph.register, wf_id, parents)
        await self._publish(out)

    async def _submit_child(self, env: Envelope) -> None:
        spec = WorkflowSpec.model_validate(env.payload["workflow"])
        try:
            validate_workflow(spec, max_payload_bytes=self.settings.max_payload_bytes,
                              max_tasks=self.settings.max_tasks_per_workflow)
        except InvalidSpec as exc:
            raise ValueError(f"invalid child workflow: {exc}") from exc
        wf_id = await self.workflows.create_child(
            spec, env.payload["idempotency_key"], env.payload.get("parent"), env.reply_to, env.correlation_id
        )
        await self.take_in([wf_id])

    async def _release(self, wf_id: str, task_id: str, *, check_store: bool) -> None:
        ready = await self._redis(self.graph.release, wf_id, task_id)
        if check_store:
            # A redelivery: RQ may have handed out the children before we died. The store knows.
            ready = sorted(set(ready) | set(await self.workflows.ready_children(wf_id, task_id)))
        if ready:
            await self._publish(await self.workflows.release(wf_id, ready))

    async def _publish(self, out: FollowUps) -> None:
        topology = self.bus.topology
        await self.bus.publish_many([(env, topology.dispatch) for env in out.dispatch] + out.replies)

    async def _redis(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except redis.RedisError as exc:
            raise Transient(f"redis: {exc}") from exc

    async def _sweep_intake(self) -> None:
        wf_ids = await self.workflows.unscheduled(older_than_s=INTAKE_SWEEP_S)
        if wf_ids:
            log.info("taking in %d workflows that were never announced", len(wf_ids))
            await self.take_in(wf_ids)
