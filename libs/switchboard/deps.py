"""DAG dependency resolution on top of RQ's dependency bookkeeping, without RQ workers.

Why RQ, and why this way: RQ already has a well-tested model of "job B waits for jobs A1..An" on Redis
(``depends_on``, the per-parent ``dependents`` sets, ``DeferredJobRegistry``, ``dependencies_are_met`` and
``Queue.move_dependents_to_ready``, the engine behind ``Queue.enqueue_dependents``). What we do not want is
its execution model: a worker costs ~2 ms CPU per job, and Switchboard runs tasks elsewhere. So every task is
an RQ job that is never executed (its func is a no-op that nothing calls); we only ever drive the state
machine ``deferred -> queued -> finished`` ourselves. The state store is the source of truth; everything
here is derived and can be rebuilt with ``register`` + ``release`` of the already-succeeded tasks.

Releasing runs RQ's own rule as one Lua script (RQ ships its own scripts the same way, in ``rq.scripts``). For
the succeeded job: status FINISHED; then, for each job in its ``dependents`` set, what
``Queue.move_dependents_to_ready`` decides with ``Job.dependencies_are_met(parent_job=...)``: it is ready unless
it is CANCELED or one of its ``dependencies`` has a status other than FINISHED (a dependency whose job is gone
counts as met, as in RQ; the state store double-checks). Why not call RQ's Python engine: it takes about eight
round trips and 1.2-2 ms of CPU per release (WATCH, SMEMBERS, a Job restore per dependent...), which made the
coordinator the bottleneck of a DAG; the script does one round trip for a whole batch of releases. The test
suite runs the script against RQ's engine on random DAGs and requires the same answers.

Exactly-once hand-out: the script is atomic, so releases, even concurrent ones from several processes, happen
one after the other. One invariant on top of RQ's: a job sits in its parents' dependents sets only while it
is still deferred (RQ only removes it from the set of the parent that released it, which is fine when every
job finishes once). Handing a child out removes it from all of them, so releasing a parent twice, or
replaying releases after a rebuild, never hands a child out again.

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
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import DeferredJobRegistry, ReadyJobRegistry
from rq.utils import as_text

TTL_SECONDS = 7 * 24 * 3600

_SEP = "__"
_PROBE = "job-id-probe"  # a valid RQ job id that cannot occur in RQ's key prefixes
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


# KEYS: the deferred and ready registries. ARGV: the job key prefix, the dependents key's prefix and suffix,
# the dependencies key's prefix and suffix (RQ's key layout, read off RQ), then the ids of the succeeded jobs.
# Returns, per id, the ids it made ready, or 0 if the job does not exist.
_RELEASE = """
local deferred, ready_registry = KEYS[1], KEYS[2]
local job_prefix, dependents_prefix, dependents_suffix = ARGV[1], ARGV[2], ARGV[3]
local dependencies_prefix, dependencies_suffix = ARGV[4], ARGV[5]
local function job_key(id) return job_prefix .. id end
local function dependents_key(id) return dependents_prefix .. id .. dependents_suffix end
local function dependencies_key(id) return dependencies_prefix .. id .. dependencies_suffix end
local function exists(id) return redis.call('HEXISTS', job_key(id), 'data') == 1 end
local function leave_parents(id, parents)
  redis.call('ZREM', deferred, id)
  for _, parent in ipairs(parents) do redis.call('SREM', dependents_key(parent), id) end
end

local out = {}
for i = 6, #ARGV do
  local id = ARGV[i]
  if not exists(id) then
    out[#out + 1] = 0
  else
    redis.call('HSET', job_key(id), 'status', '%(finished)s')
    -- Only does something when replaying after a rebuild, where a succeeded job may still be deferred.
    leave_parents(id, redis.call('SMEMBERS', dependencies_key(id)))
    local ready = {}
    for _, child in ipairs(redis.call('SMEMBERS', dependents_key(id))) do
      local met = exists(child) and redis.call('HGET', job_key(child), 'status') ~= '%(canceled)s'
      local parents = redis.call('SMEMBERS', dependencies_key(child))
      for _, parent in ipairs(parents) do
        if not met then break end
        local status = redis.call('HGET', job_key(parent), 'status')
        met = (not status) or status == '%(finished)s'
      end
      if met then
        ready[#ready + 1] = child
        redis.call('HSET', job_key(child), 'status', '%(queued)s')
        redis.call('ZREM', ready_registry, child)
        leave_parents(child, parents)
      end
    end
    out[#out + 1] = ready
  end
end
return out
""" % {"finished": JobStatus.FINISHED.value, "queued": JobStatus.QUEUED.value, "canceled": JobStatus.CANCELED.value}


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
        self._release_script = redis.register_script(_RELEASE)
        self._key_parts = [Job.key_for(""), *Job.dependents_key_for(_PROBE).split(_PROBE),
                           *Job(_PROBE, connection=redis).dependencies_key.split(_PROBE)]

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

        Every task is returned by exactly one release over all callers, including concurrent ones in other
        processes; releasing a task again returns []. Roots are never returned (they are ready from the
        start).

        Replaying after a rebuild: release the succeeded tasks children-first (reverse topological order) and
        exactly the ready-but-not-succeeded tasks come out. In any other order a succeeded task can be
        returned before its own release; discard returned ids the state store already knows as succeeded.

        Raises rq.exceptions.NoSuchJobError if the task is not registered (or its data expired / was forgotten).
        """
        (ready,) = self.release_many([(workflow_id, task_id)])
        if ready is None:
            raise NoSuchJobError(f"no RQ job for task {task_id!r} of workflow {workflow_id!r}")
        return ready

    def release_many(self, tasks: list[tuple[str, str]]) -> list[list[str] | None]:
        """``release`` for many (workflow id, task id) pairs, in order, in one round trip and one atomic step.
        For each pair: the task ids its release made ready, or None if RQ does not know the task."""
        if not tasks:
            return []
        prefixes = [self._prefix(wf) for wf, _ in tasks]
        out = self._release_script(
            keys=[self.deferred.key, self.ready.key],
            args=[*self._key_parts, *(prefix + _escape(task) for prefix, (_, task) in zip(prefixes, tasks))],
        )
        return [
            None if ready == 0 else [_unescape(as_text(i)[len(prefix):]) for i in ready]
            for prefix, ready in zip(prefixes, out)
        ]

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
