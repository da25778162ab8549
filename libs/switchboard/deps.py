"""DAG dependency resolution on top of RQ's dependency bookkeeping, without RQ workers.

Why RQ, and why this way: RQ already has a well-tested model of "job B waits for jobs A1..An" on Redis
(``depends_on``, the per-parent ``dependents`` sets, ``DeferredJobRegistry``, ``dependencies_are_met`` and
``Queue.move_dependents_to_ready``, the engine behind ``Queue.enqueue_dependents``). What we do not want is
its execution model: a worker costs ~2 ms CPU per job, and Switchboard runs tasks elsewhere. So every task is
an RQ job that is never executed (its func is a no-op that nothing calls); we only ever drive the state
machine ``deferred -> queued -> finished`` ourselves. The state store is the source of truth; everything
here is derived and can be rebuilt with ``register`` + ``release`` of the already-succeeded tasks.

Exactly-once hand-out: ``release`` mirrors what RQ's own worker does on job success
(``Worker.handle_job_success``): WATCH the parent's dependents set, let ``move_dependents_to_ready`` evaluate
the dependents (it WATCHes the job hashes of all their parents before reading their statuses), and commit the
parent's FINISHED status in the same MULTI/EXEC. Each parent writes its own hash and watches its siblings',
so of two concurrent releases at most one commits without seeing the other: the child is moved by the last
parent to commit, once. The ids returned are the ones moved by our committed transaction, so there is no
shared queue list to pop and nothing from another workflow can come back.

One invariant on top of RQ's: a job sits in its parents' dependents sets only while it is still deferred
(RQ only removes it from the set of the parent that released it, which is fine when every job finishes once).
Every release that could hand a child out has WATCHed a set the child is in, and handing it out removes it
from all of them, so releasing a parent twice, even concurrently, or replaying releases after a rebuild never
hands a child out again.

Redis keys live ``TTL_SECONDS`` (7 days) after the last ``register`` of their workflow, so abandoned
workflows disappear on their own; callers that keep a workflow longer can simply register it again (it is
idempotent). The shared deferred registry cannot expire per member, so ``register`` trims entries older than
the TTL. The Redis client must use ``decode_responses=False``, as RQ requires.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis
from redis.exceptions import WatchError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import DeferredJobRegistry, ReadyJobRegistry
from rq.utils import as_text

TTL_SECONDS = 7 * 24 * 3600

_SEP = "__"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def _never_run() -> None:
    """Recorded as every job's func. RQ jobs here are bookkeeping only; executing one is a bug."""
    raise RuntimeError("switchboard.deps jobs are dependency bookkeeping and must never be executed")


_FUNC = f"{__name__}._never_run"


def _escape(part: str) -> str:
    # RQ job ids may only contain [A-Za-z0-9_-] (and ':' would be cut off by rq.job.parse_job_id), so every
    # other byte becomes "_xx". An escape always has a hex digit after "_", which keeps the "__" separator
    # unambiguous: ids stay injective and readable (uuids pass through unchanged).
    return "".join(c if c in _SAFE else "".join(f"_{b:02x}" for b in c.encode()) for c in part)


def _unescape(part: str) -> str:
    out, i = bytearray(), 0
    while i < len(part):
        if part[i] == "_":
            out += bytes.fromhex(part[i + 1 : i + 3])
            i += 3
        else:
            out += part[i].encode()
            i += 1
    return out.decode()


class DependencyGraph:
    """Which tasks of a workflow are waiting, and which become ready when a task succeeds.

    Synchronous (redis-py); async callers use ``asyncio.to_thread``. Safe to use from many threads and
    processes at once on the same Redis.
    """

    def __init__(self, redis: redis.Redis, namespace: str):
        self.redis = redis
        self.namespace = namespace
        # Nothing is ever pushed onto this queue; it only names the registries the jobs belong to.
        self.queue = Queue(f"{namespace}.deps", connection=redis)
        self.deferred = DeferredJobRegistry(queue=self.queue)
        self.ready = ReadyJobRegistry(queue=self.queue)
        self._ns = _escape(namespace) + _SEP

    def job_id(self, workflow_id: str, task_id: str) -> str:
        """The RQ job id of a task: namespace, workflow and task, escaped and joined by "__"."""
        return self._prefix(workflow_id) + _escape(task_id)

    def _prefix(self, workflow_id: str) -> str:
        return self._ns + _escape(workflow_id) + _SEP

    def register(self, workflow_id: str, parents: dict[str, list[str]]) -> None:
        """Create the RQ jobs of a workflow: roots QUEUED, tasks with parents DEFERRED. Three round trips.

        Idempotent: jobs that already exist keep their status (so FINISHED parents stay finished); only
        missing jobs are created. Still-deferred jobs are re-linked to their parents, which repairs a parent
        whose keys were lost. A task whose parents are all finished already stays deferred until one of them
        is released (again); ``release`` of a finished task is safe to repeat. The DAG of a workflow id must
        not change between calls.
        """
        unknown = {p for ps in parents.values() for p in ps} - parents.keys()
        if unknown:
            raise ValueError(f"workflow {workflow_id!r}: unknown parent task(s) {sorted(unknown)}")
        prefix = self._prefix(workflow_id)
        jobs = [
            Job.create(
                _FUNC,
                connection=self.redis,
                id=prefix + _escape(task),
                origin=self.queue.name,
                description=f"{workflow_id}/{task}",
                depends_on=[prefix + _escape(p) for p in ps] or None,
                status=JobStatus.DEFERRED if ps else JobStatus.QUEUED,
                ttl=TTL_SECONDS,
            )
            for task, ps in parents.items()
        ]
        if not jobs:
            return
        with self.redis.pipeline() as tx:
            while True:
                try:
                    # A release() committing between our read and our write would be overwritten; WATCH turns
                    # that into a retry.
                    tx.watch(*(job.key for job in jobs))
                    with self.redis.pipeline(transaction=False) as read:  # one round trip, not one per job
                        for job in jobs:
                            read.hget(job.key, "status")
                            read.hexists(job.key, "data")
                        raw = read.execute()
                        # A hash without "data" is a fragment (a write that straddled a Redis restart): missing.
                        statuses = [as_text(s) if s and has else None for s, has in zip(raw[0::2], raw[1::2])]
                    tx.multi()
                    for job, status in zip(jobs, statuses):
                        if status is None:
                            job.save(pipeline=tx)
                        if job._dependency_ids and status in (None, JobStatus.DEFERRED):
                            # RQ's own edge bookkeeping: dependents sets, dependencies set, deferred registry.
                            job.register_dependency(pipeline=tx)
                    for job in jobs:
                        # After register_dependency, so the dependents/dependencies sets exist to be expired.
                        tx.expire(job.key, TTL_SECONDS)
                        tx.expire(job.dependents_key, TTL_SECONDS)
                        tx.expire(job.dependencies_key, TTL_SECONDS)
                    tx.zremrangebyscore(self.deferred.key, "-inf", int(time.time()) - TTL_SECONDS)
                    tx.expire(self.deferred.key, TTL_SECONDS)
                    tx.execute()
                    return
                except WatchError:
                    continue

    def release(self, workflow_id: str, task_id: str) -> list[str]:
        """Mark a succeeded task FINISHED; return the task ids of this workflow that it made ready.

        Every task is returned by exactly one release() over all callers, including concurrent ones in other
        processes; releasing a task again returns []. Roots are never returned (they are ready from the
        start). Round trips: 4 without dependents, else 5 + 2 per dependent (3 if it has several parents) + 1 if
        any became ready; concurrent releases of parents that share children retry (RQ's optimistic locking).

        Replaying after a rebuild: release the succeeded tasks children-first (reverse topological order) and
        exactly the ready-but-not-succeeded tasks come out. In any other order a succeeded task can be
        returned before its own release; discard returned ids the state store already knows as succeeded.

        Raises rq.exceptions.NoSuchJobError if the task is not registered (or its data expired / was forgotten).
        """
        prefix = self._prefix(workflow_id)
        job = Job.fetch(prefix + _escape(task_id), connection=self.redis)
        # move_dependents_to_ready checks the parent's cached status (refresh_job_status=False saves a read per
        # dependent); the FINISHED write itself is committed below, in the same transaction.
        job._status = JobStatus.FINISHED
        with self.redis.pipeline() as tx:
            while True:
                try:
                    tx.watch(job.dependents_key)
                    moved = self.queue.move_dependents_to_ready(job, pipeline=tx, refresh_job_status=False)
                    ready_ids = moved.get(self.queue.name, [])
                    ready = [j for j in Job.fetch_many(ready_ids, connection=self.redis) if j] if ready_ids else []
                    if not tx.explicit_transaction:  # move_dependents_to_ready only opens MULTI if it had work
                        tx.multi()
                    job.set_status(JobStatus.FINISHED, pipeline=tx)
                    # Only does something when replaying after a rebuild, where a succeeded task may still be
                    # deferred: drop it from its parents' dependents so releasing them does not hand it out.
                    self.deferred.remove(job, pipeline=tx)
                    for parent_id in job._dependency_ids:
                        tx.srem(Job.dependents_key_for(parent_id), job.id)
                    for child in ready:
                        # We are the enqueuer: skip RQ's ReadyJobRegistry/queue-list hop (we hand the ids back).
                        self.ready.remove(child, pipeline=tx)
                        child.set_status(JobStatus.QUEUED, pipeline=tx)
                        # RQ removes the child only from this parent's set; keep it out of the other parents'
                        # sets too, or a repeated release of one of them would hand it out again.
                        for parent_id in child._dependency_ids:
                            tx.srem(Job.dependents_key_for(parent_id), child.id)
                    tx.execute()
                    break
                except WatchError:
                    continue
        return [_unescape(i[len(prefix) :]) for i in ready_ids if i.startswith(prefix)]

    def forget(self, workflow_id: str, task_ids: Iterable[str]) -> None:
        """Delete every RQ key and registry entry of these tasks of the workflow, in one round trip."""
        prefix = self._prefix(workflow_id)
        jobs = [Job(prefix + _escape(t), connection=self.redis) for t in task_ids]
        if not jobs:
            return
        with self.redis.pipeline() as tx:
            ids = [job.id for job in jobs]
            tx.zrem(self.deferred.key, *ids)
            tx.zrem(self.ready.key, *ids)
            for job in jobs:
                tx.delete(job.key, job.dependents_key, job.dependencies_key)
            tx.execute()
