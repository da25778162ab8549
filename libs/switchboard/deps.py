"""DAG dependency resolution on top of RQ's dependency bookkeeping, without RQ workers.

Why RQ, and why this way: RQ already has a well-tested model of "job B waits for jobs A1..An" on Redis
(``depends_on``, the per-parent ``dependents`` sets, ``DeferredJobRegistry``, ``dependencies_are_met`` and
``Queue.move_dependents_to_ready``, the engine behind ``Queue.enqueue_dependents``). What we do not want is
its execution model: a worker costs ~2 ms CPU per job, and Switchboard runs tasks elsewhere. So every task is
an RQ job that is never executed (its func is a no-op that nothing calls); we only ever drive the state
machine ``deferred -> queued -> finished`` ourselves. The state store is the source of truth; everything
here is derived and can be rebuilt with ``register`` + ``release`` of the already-succeeded tasks.

Registering creates every task's job with RQ's own ``Job.create(depends_on=...)`` and writes what ``Job.save``
and ``Job.register_dependency`` would write. Releasing applies RQ's own rule: the succeeded job becomes FINISHED;
each job in its ``dependents`` set is ready, as ``Queue.move_dependents_to_ready`` decides with
``Job.dependencies_are_met(parent_job=...)``, unless it is CANCELED or one of its ``dependencies`` has a status
other than FINISHED (a dependency whose job is gone counts as met, as in RQ; the state store double-checks).
Both run as Lua scripts on RQ's keys (RQ ships scripts of its own the same way, in ``rq.scripts``), because
RQ's Python engine costs about eight round trips and 1.2-2 ms of CPU per release (WATCH, SMEMBERS, a Job
restore per dependent...) and 1.5 ms per registered workflow, which made the coordinator the bottleneck of a
DAG; the scripts take one round trip for a whole batch. The tests run them side by side with RQ's own engine
on random DAGs and require the same keys (next to one set of our own per waiting job, see _PRELUDE) and the
same answers.

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
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import DeferredJobRegistry, ReadyJobRegistry
from rq.utils import as_text

TTL_SECONDS = 7 * 24 * 3600

_SEP = "__"
_REGISTER_CHUNK = 100  # workflows per register round trip: keeps each script's hold on Redis to milliseconds
_PROBE = "job-id-probe"  # a valid RQ job id that cannot occur in RQ's key prefixes
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


# Both scripts take ARGV[1..6]: RQ's key layout as read off RQ (the job key prefix, the dependents key's prefix
# and suffix, the dependencies key's prefix and suffix), and the prefix of our "unmet" sets. A deferred job's
# unmet set holds the parents not known to be FINISHED: while it is not empty, RQ's rule cannot be satisfied,
# so a release skips the rule, which reads every parent's status. That keeps a fan-in of n parents at O(n)
# work in all, not O(n^2). An unmet set that is lost only means the rule is evaluated: it is a shortcut,
# never the judge.
_PRELUDE = """
local job_prefix, dependents_prefix, dependents_suffix = ARGV[1], ARGV[2], ARGV[3]
local dependencies_prefix, dependencies_suffix, unmet_prefix = ARGV[4], ARGV[5], ARGV[6]
local function job_key(id) return job_prefix .. id end
local function dependents_key(id) return dependents_prefix .. id .. dependents_suffix end
local function dependencies_key(id) return dependencies_prefix .. id .. dependencies_suffix end
local function unmet_key(id) return unmet_prefix .. id end
-- A hash without "data" is a fragment (a write that straddled a Redis restart): missing.
local function exists(id) return redis.call('HEXISTS', job_key(id), 'data') == 1 end
"""

# KEYS: the deferred registry. ARGV[7..8]: the TTL, now; then per job: its id, the length of its hash's
# field/value list and that list (Job.to_dict), the number of its parents and their ids. Writes what Job.save
# and Job.register_dependency would write, with EXPIREs; a job that exists keeps its status. Jobs first, then
# their links, so that every parent of the batch exists when its children's unmet sets are filled.
_REGISTER = _PRELUDE + """
local deferred = KEYS[1]
local ttl, now = tonumber(ARGV[7]), tonumber(ARGV[8])
local jobs = {}
local i = 9
while i <= #ARGV do
  local id, n_fields = ARGV[i], tonumber(ARGV[i + 1])
  local n_parents = tonumber(ARGV[i + 2 + n_fields])
  local job = {id = id, status = false, first_parent = i + 3 + n_fields, n_parents = n_parents}
  if exists(id) then
    job.status = redis.call('HGET', job_key(id), 'status')
  else
    redis.call('HSET', job_key(id), unpack(ARGV, i + 2, i + 1 + n_fields))
  end
  jobs[#jobs + 1] = job
  i = job.first_parent + n_parents
end
for _, job in ipairs(jobs) do
  local id = job.id
  if job.n_parents > 0 and (not job.status or job.status == '%(deferred)s') then
    redis.call('ZADD', deferred, now, id)
    for j = job.first_parent, job.first_parent + job.n_parents - 1 do
      local parent = ARGV[j]
      redis.call('SADD', dependents_key(parent), id)
      redis.call('EXPIRE', dependents_key(parent), ttl)
      redis.call('SADD', dependencies_key(id), parent)
      local status = redis.call('HGET', job_key(parent), 'status')
      if status and status ~= '%(finished)s' then redis.call('SADD', unmet_key(id), parent) end
    end
    redis.call('EXPIRE', unmet_key(id), ttl)
  end
  redis.call('EXPIRE', job_key(id), ttl)
  redis.call('EXPIRE', dependents_key(id), ttl)
  redis.call('EXPIRE', dependencies_key(id), ttl)
end
redis.call('ZREMRANGEBYSCORE', deferred, '-inf', now - ttl)
redis.call('EXPIRE', deferred, ttl)
""" % {"deferred": JobStatus.DEFERRED.value, "finished": JobStatus.FINISHED.value}

# KEYS: the deferred and ready registries. ARGV[7..]: the ids of the succeeded jobs. Returns, per id, the
# ids it made ready, or 0 if the job does not exist.
_RELEASE = _PRELUDE + """
local deferred, ready_registry = KEYS[1], KEYS[2]
local function leave_parents(id, parents)
  redis.call('ZREM', deferred, id)
  redis.call('DEL', unmet_key(id))
  for _, parent in ipairs(parents) do redis.call('SREM', dependents_key(parent), id) end
end

local out = {}
for i = 7, #ARGV do
  local id = ARGV[i]
  if not exists(id) then
    out[#out + 1] = 0
  else
    redis.call('HSET', job_key(id), 'status', '%(finished)s')
    -- Only does something when replaying after a rebuild, where a succeeded job may still be deferred.
    leave_parents(id, redis.call('SMEMBERS', dependencies_key(id)))
    local ready = {}
    for _, child in ipairs(redis.call('SMEMBERS', dependents_key(id))) do
      redis.call('SREM', unmet_key(child), id)
      local met = redis.call('SCARD', unmet_key(child)) == 0 and exists(child)
        and redis.call('HGET', job_key(child), 'status') ~= '%(canceled)s'
      local parents = met and redis.call('SMEMBERS', dependencies_key(child)) or {}
      for _, parent in ipairs(parents) do  -- RQ's rule: every dependency FINISHED (or gone)
        local status = redis.call('HGET', job_key(parent), 'status')
        if status and status ~= '%(finished)s' then met = false; break end
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
        self._register_script = redis.register_script(_REGISTER)
        self._release_script = redis.register_script(_RELEASE)
        self._unmet_prefix = f"{namespace}:deps:unmet:"
        self._key_parts = [Job.key_for(""), *Job.dependents_key_for(_PROBE).split(_PROBE),
                           *Job(_PROBE, connection=redis).dependencies_key.split(_PROBE), self._unmet_prefix]

    def job_id(self, workflow_id: str, task_id: str) -> str:
        """The RQ job id of a task: namespace, workflow and task, escaped and joined by "__"."""
        return self._prefix(workflow_id) + _escape(task_id)

    def _prefix(self, workflow_id: str) -> str:
        return self._ns + _escape(workflow_id) + _SEP

    def register(self, workflow_id: str, parents: dict[str, list[str]]) -> None:
        """Create the RQ jobs of a workflow: roots QUEUED, tasks with parents DEFERRED.

        Idempotent: jobs that already exist keep their status (so FINISHED parents stay finished); only
        missing jobs are created. Still-deferred jobs are re-linked to their parents, which repairs a parent
        whose keys were lost. A task whose parents are all finished already stays deferred until one of them
        is released (again); ``release`` of a finished task is safe to repeat. The DAG of a workflow id must
        not change between calls.
        """
        self.register_many({workflow_id: parents})

    def register_many(self, graphs: dict[str, dict[str, list[str]]]) -> None:
        """``register`` for many workflows (workflow id → task id → parent ids): one round trip per
        ``_REGISTER_CHUNK`` workflows, each one atomic step."""
        for workflow_id, parents in graphs.items():
            unknown = {p for ps in parents.values() for p in ps} - parents.keys()
            if unknown:
                raise ValueError(f"workflow {workflow_id!r}: unknown parent task(s) {sorted(unknown)}")
        items = list(graphs.items())
        for start in range(0, len(items), _REGISTER_CHUNK):
            args: list = [*self._key_parts, TTL_SECONDS, int(time.time())]
            for workflow_id, parents in items[start:start + _REGISTER_CHUNK]:
                prefix = self._prefix(workflow_id)
                for task, ps in parents.items():
                    job = Job.create(  # RQ's own job, as RQ would store it: the script only writes it out
                        _FUNC,
                        connection=self.redis,
                        id=prefix + _escape(task),
                        origin=self.queue.name,
                        description=f"{workflow_id}/{task}",
                        depends_on=[prefix + _escape(p) for p in ps] or None,
                        status=JobStatus.DEFERRED if ps else JobStatus.QUEUED,
                        ttl=TTL_SECONDS,
                    )
                    fields = [x for pair in job.to_dict().items() for x in pair]
                    args += [job.id, len(fields), *fields, len(job._dependency_ids), *job._dependency_ids]
            self._register_script(keys=[self.deferred.key], args=args)

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

    def pending(self) -> int:
        """Jobs still deferred: tasks waiting for their parents."""
        return self.deferred.get_job_count(cleanup=False)

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
                tx.delete(job.key, job.dependents_key, job.dependencies_key, self._unmet_prefix + job.id)
            tx.execute()
