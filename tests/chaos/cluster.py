"""The platform as real processes, to be killed and restarted: every service via `python -m switchboard.cli
serve <name>` and chaos agents via `python -m tests.chaos.agent`, each with a health port and a log file
per incarnation. Plus the workload (random DAG workflows through the REST API), a watcher that
snapshots recorded results while the run goes on, and the checks every scenario ends with.

No sleep here synchronises anything: every wait is on a condition with a deadline (`tests.harness.wait_for`). The
only sleeps are poll intervals inside those waits and, in fault injection, a deliberate downtime.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import aio_pika
import httpx
import orjson

from switchboard.protocol import TaskSpec
from switchboard.settings import Settings
from switchboard.topology import Topology
from tests.harness import ALL_SERVICES, Deadline, cleanup, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
CAPABILITY = "work"
TERMINAL = ("succeeded", "failed", "cancelled")
# Tasks take a retry policy (exponential backoff); short delays keep the runs quick. Checked rather than
# assumed, so the workload keeps working if the field moves.
RETRY_FIELD = "retry" in TaskSpec.model_fields




def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of a Prometheus metric whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part)
        if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
            total += float(value)
    return total


@dataclasses.dataclass
class AgentSpec:
    name: str
    flaky: float = 0.0
    min_ms: float = 5.0
    max_ms: float = 30.0
    seed: int | None = None
    concurrency: int | None = None
    capability: str = CAPABILITY


@dataclasses.dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_dir: Path
    kind: str  # "service" or "agent"
    popen: subprocess.Popen | None = None
    incarnation: int = 0
    logs: list[Path] = dataclasses.field(default_factory=list)

    def start(self) -> None:
        path = self.log_dir / f"{self.name}.{self.incarnation}.log"
        self.incarnation += 1
        self.logs.append(path)
        with open(path, "wb") as out:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]


class RunLogs:
    """The chaos agents' run logs (JSON lines), read incrementally."""

    def __init__(self, paths: Iterable[Path]):
        self.paths = list(paths)
        self._offsets: dict[Path, int] = {}
        self.events: list[dict] = []
        self.ended = 0
        self.ended_tasks: set[tuple[str, str]] = set()  # (workflow, task) with at least one run that ended
        self.ended_per_workflow: collections.Counter = collections.Counter()  # distinct tasks ended

    def add(self, path: Path) -> None:
        if path not in self.paths:
            self.paths.append(path)

    def refresh(self) -> list[dict]:
        new = []
        for path in self.paths:
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                if line.strip():
                    new.append(orjson.loads(line))
        self.events += new
        for event in new:
            if event["event"] == "end":
                self.ended += 1
                key = (event["wf"], event["task"])
                if key not in self.ended_tasks:
                    self.ended_tasks.add(key)
                    self.ended_per_workflow[event["wf"]] += 1
        return new

    def by(self, event: str, agent: str | None = None) -> list[dict]:
        self.refresh()
        return [e for e in self.events if e["event"] == event and (agent is None or e["agent"] == agent)]


class Cluster:
    """Every service and some chaos agents, each a process of its own, on one namespace."""

    def __init__(self, settings: Settings, workdir: Path, agents: list[AgentSpec], *,
                 services: Iterable[str] = ALL_SERVICES, env: dict[str, str] | None = None):
        self.settings = settings
        self.workdir = Path(workdir)
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.api = f"http://127.0.0.1:{settings.api_port}"
        self.topology = Topology(settings.namespace)
        base = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")
                and k not in ("AMQP_URL", "REDIS_URL")}
        base.update({
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
            "AMQP_URL": settings.amqp_url, "SWITCHBOARD_AMQP_URL": settings.amqp_url,
            "REDIS_URL": settings.redis_url, "SWITCHBOARD_REDIS_URL": settings.redis_url,
            "SWITCHBOARD_STORE_URL": settings.store_url,
            "SWITCHBOARD_NAMESPACE": settings.namespace,
            "SWITCHBOARD_API_PORT": str(settings.api_port),
            "SWITCHBOARD_HEARTBEAT_INTERVAL_S": "0.5",
            "SWITCHBOARD_AGENT_LOST_AFTER_S": "5",
        })
        base.update(env or {})
        self.env = base
        self.procs: dict[str, Proc] = {}
        for name in services:
            port = settings.api_port if name == "api" else free_port()
            self.procs[name] = Proc(name, [sys.executable, "-m", "switchboard.cli", "serve", name],
                                    {**base, "SWITCHBOARD_HEALTH_PORT": str(port)}, port, self.log_dir, "service")
        self.agent_specs: dict[str, AgentSpec] = {}
        self.extra_queues: set[str] = set()
        self.runlogs = RunLogs([])
        for spec in agents:
            self.add_agent(spec)
        self.client = httpx.AsyncClient(base_url=self.api, timeout=30)
        self.health = httpx.AsyncClient(timeout=5)
        self.workloads: list[Workload] = []

    # ---- processes ----------------------------------------------------------------------------------
    def add_agent(self, spec: AgentSpec) -> Proc:
        port = free_port()
        runlog = self.workdir / f"runs.{spec.name}.jsonl"
        argv = [sys.executable, "-m", "tests.chaos.agent", "--name", spec.name, "--log", str(runlog),
                "--capability", spec.capability, "--flaky", str(spec.flaky), "--min-ms", str(spec.min_ms),
                "--max-ms", str(spec.max_ms)]
        if spec.seed is not None:
            argv += ["--seed", str(spec.seed)]
        env = {**self.env, "SWITCHBOARD_HEALTH_PORT": str(port)}
        if spec.concurrency:
            env["SWITCHBOARD_AGENT_CONCURRENCY"] = str(spec.concurrency)
        proc = Proc(spec.name, argv, env, port, self.log_dir, "agent")
        self.procs[spec.name] = proc
        self.agent_specs[spec.name] = spec
        self.runlogs.add(runlog)
        return proc

    def add_agent_process(self, name: str, argv: list[str], queues: Iterable[str]) -> Proc:
        """An agent of another kind than the chaos agent: its argv, and the queues to clean up after it."""
        port = free_port()
        proc = Proc(name, argv, {**self.env, "SWITCHBOARD_HEALTH_PORT": str(port)}, port, self.log_dir, "agent")
        self.procs[name] = proc
        self.extra_queues |= set(queues)
        return proc

    @property
    def services(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.kind == "service"]

    @property
    def agents(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.kind == "agent"]

    async def start(self, names: Iterable[str] | None = None, *, timeout: float = 90.0) -> float:
        """Starts the processes and waits until each is ready and every agent registered; returns seconds."""
        began = time.monotonic()
        names = list(names or self.procs)
        for name in names:
            self.procs[name].start()
        await self.wait_ready(names, timeout=timeout)
        agents = [n for n in names if self.procs[n].kind == "agent"]
        if agents:
            await self.wait_agents_alive(agents, timeout=timeout)
        return time.monotonic() - began

    async def is_ready(self, name: str) -> bool:
        proc = self.procs[name]
        if not proc.alive:
            return False
        try:
            return (await self.health.get(f"http://127.0.0.1:{proc.port}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_ready(self, names: Iterable[str] | None = None, *, timeout: float = 60.0) -> float:
        began = time.monotonic()
        names = list(names or self.procs)

        async def ready() -> bool:
            for name in names:
                if not self.procs[name].alive:
                    raise AssertionError(f"{name} exited with {self.procs[name].popen.returncode}:\n"
                                         f"{self.procs[name].log_tail()}")
            return all(await asyncio.gather(*(self.is_ready(n) for n in names)))

        await wait_for(ready, timeout=timeout, what=f"{', '.join(names)} ready",
                         on_timeout=lambda: self.diagnose(names))
        return time.monotonic() - began

    async def agents_view(self) -> list[dict]:
        return (await self.client.get("/v1/agents")).json()["agents"]

    async def wait_agents_alive(self, names: Iterable[str], *, timeout: float = 60.0) -> None:
        names = set(names)

        async def alive() -> bool:
            try:
                agents = await self.agents_view()
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            return names <= {a["name"] for a in agents if a["status"] == "alive"}

        await wait_for(alive, timeout=timeout, what=f"agents {sorted(names)} registered alive")

    async def kill(self, name: str, sig: int = signal.SIGKILL, *, timeout: float = 30.0) -> float:
        """Sends the signal and reaps the process; returns the time.time() of the signal."""
        proc = self.procs[name]
        assert proc.alive, f"{name} is not running"
        at = time.time()
        proc.popen.send_signal(sig)
        await wait_for(lambda: proc.popen.poll() is not None, timeout=timeout, what=f"{name} to exit")
        return at

    async def restart(self, name: str) -> None:
        proc = self.procs[name]
        assert not proc.alive, f"{name} is still running"
        proc.start()

    def dead(self) -> dict[str, int]:
        return {n: p.popen.returncode for n, p in self.procs.items() if p.popen and p.popen.poll() is not None}

    async def stop(self) -> None:
        for workload in self.workloads:
            await workload.stop_watching()
        for proc in self.procs.values():
            if proc.alive:
                proc.popen.kill()
        for proc in self.procs.values():
            if proc.popen is not None:
                await asyncio.to_thread(proc.popen.wait)
        await self.client.aclose()
        await self.health.aclose()

    async def cleanup(self, *, broker: bool, redis: bool) -> None:
        """Deletes the namespace's queues, exchanges and keys from the shared broker and Redis (a private
        server goes away with its data)."""
        t = self.topology
        queues = set(self.extra_queues)
        for spec in self.agent_specs.values():
            queues |= {t.capability_queue(spec.capability), t.hold_queue(spec.capability),
                       t.paused_queue(spec.capability), t.agent_queue(spec.name)}
        await cleanup(self.settings, queues, broker=broker, redis=redis)

    def diagnose(self, names: Iterable[str] | None = None, chars: int = 1500) -> str:
        out = []
        for name in names or self.procs:
            proc = self.procs[name]
            state = "alive" if proc.alive else f"exited {proc.popen.returncode if proc.popen else '-'}"
            out.append(f"--- {name} ({state}, incarnation {proc.incarnation}) log tail:\n{proc.log_tail(chars)}")
        return "\n".join(out)

    # What aio-pika logs at level error while the broker is away and it reconnects: expected, not a finding.
    RECONNECT_NOISE = ("Callback <OneShotCallback", "error when creating transport", "Unexpected connection close")

    def error_summary(self, limit: int = 8) -> str:
        """The distinct errors the processes logged (JSON lines at level error), most frequent first."""
        seen: collections.Counter = collections.Counter()
        noise = 0
        for name, proc in self.procs.items():
            for line in proc.log_text().splitlines():
                if '"level":"error"' not in line:
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                msg = record.get("msg", "")
                if msg.startswith(self.RECONNECT_NOISE):
                    noise += 1
                    continue
                last = (record.get("exc") or "").strip().splitlines()[-1:] or [""]
                seen[f"{name}: {msg[:160]} {last[0][:200]}"] += 1
        head = f"errors logged ({noise} more from reconnecting to the broker):"
        if not seen:
            return f"{head} none"
        return head + "\n" + "\n".join(f"  {n}x {text}" for text, n in seen.most_common(limit))

    async def metrics(self, name: str) -> str:
        return (await self.health.get(f"http://127.0.0.1:{self.procs[name].port}/metrics")).text

    # ---- broker access for the test itself --------------------------------------------------------------
    async def publish_raw(self, queue: str, body: bytes, *, message_id: str | None = None) -> None:
        connection = await aio_pika.connect(self.settings.amqp_url)
        try:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue)
        finally:
            await connection.close()

    async def queue_info(self, queues: Iterable[str]) -> dict[str, tuple[int, int]]:
        """(messages ready, consumers) of each queue, as the broker sees them."""
        connection = await aio_pika.connect(self.settings.amqp_url)
        try:
            out = {}
            for name in queues:
                channel = await connection.channel()
                result = (await channel.declare_queue(name, passive=True)).declaration_result
                out[name] = (result.message_count, result.consumer_count)
                await channel.close()
            return out
        finally:
            await connection.close()

    def consumed_queues(self) -> dict[str, str]:
        """Each long-lived queue of the namespace, and the process that must be consuming it."""
        t = self.topology
        out = {t.coordinator: "coordinator", t.dispatch: "dispatcher", t.results: "aggregator",
               t.registry: "registry", t.dlq: "dlq_replayer"}
        for name, spec in self.agent_specs.items():
            if self.procs[name].alive:
                queue = t.capability_queue(spec.capability)
                out[queue] = f"{out[queue]}, {name}" if queue in out else name
                out[t.agent_queue(name)] = name
        return out

    async def dead_letters(self) -> list[dict]:
        letters, after = [], None
        while True:
            params = {"limit": 500} | ({"after": after} if after else {})
            page = (await self.client.get("/v1/dlq", params=params)).json()["dead_letters"]
            letters += page
            if len(page) < 500:
                return letters
            after = page[-1]["id"]


# ---- the workload ----------------------------------------------------------------------------------------
def random_workflow(rng: random.Random, name: str, *, min_tasks: int = 5, max_tasks: int = 15,
                    max_attempts: int = 5, capability: str = CAPABILITY, priority: str | None = None) -> dict:
    """A random DAG: each task depends on up to 3 random earlier tasks (most have at least one). One in five
    has no dependencies at all, so the api's own intake of such workflows is under fire too."""
    tasks = []
    independent = rng.random() < 0.2
    for i in range(rng.randint(min_tasks, max_tasks)):
        parents = []
        if i and not independent and rng.random() < 0.8:
            parents = rng.sample([f"t{j}" for j in range(i)], rng.randint(1, min(3, i)))
        task = {"id": f"t{i}", "capability": capability, "depends_on": parents, "max_attempts": max_attempts,
                "payload": {"i": i}}
        if priority:
            task["priority"] = priority
        if RETRY_FIELD:
            task["retry"] = {"base_s": 0.05, "max_s": 0.5}
        tasks.append(task)
    return {"name": name, "tasks": tasks}


class Workload:
    """Submits workflows through the REST API (with Idempotency-Keys, so a retry across an api crash never
    submits twice), and watches them: every recorded result is snapshotted while the run goes on, so a
    result that changes after it was first recorded (a task recorded twice) is caught."""

    def __init__(self, cluster: Cluster, rng: random.Random):
        self.cluster = cluster
        self.rng = rng
        self.specs: dict[str, dict] = {}  # workflow id -> spec
        self.keys: dict[str, str] = {}
        self.terminal: dict[str, dict] = {}  # workflow id -> the view in which it was first seen terminal
        self.first_seen: dict[tuple[str, str], tuple] = {}  # (wf, task) -> (result, finished_at, attempts)
        self.changes: list[str] = []
        self.submit_errors = 0
        self.accepted = 0
        self._watch_task: asyncio.Task | None = None
        cluster.workloads.append(self)

    @property
    def tasks(self) -> int:
        return sum(len(s["tasks"]) for s in self.specs.values())

    def make(self, n: int, **shape) -> list[dict]:
        return [random_workflow(self.rng, f"chaos-{len(self.specs) + i}-{uuid.uuid4().hex[:6]}", **shape)
                for i in range(n)]

    async def submit(self, spec: dict, *, timeout: float = 120.0) -> str:
        key = f"chaos-{spec['name']}"
        client = self.cluster.client

        async def attempt():
            try:
                response = await client.post("/v1/workflows", json=spec, headers={"Idempotency-Key": key})
            except httpx.HTTPError:
                self.submit_errors += 1
                return None
            if response.status_code == 202:
                return response.json()["workflow_id"]
            assert response.status_code >= 500, f"submission refused: {response.status_code} {response.text}"
            self.submit_errors += 1
            return None

        wf_id = await wait_for(attempt, timeout=timeout, interval=0.1, what=f"api to accept {spec['name']}")
        assert wf_id not in self.specs or self.keys[wf_id] == key, "two submissions got one workflow id"
        self.specs[wf_id], self.keys[wf_id] = spec, key
        self.accepted += 1
        return wf_id

    async def submit_many(self, specs: list[dict], *, concurrency: int = 8) -> list[str]:
        gate = asyncio.Semaphore(concurrency)

        async def one(spec):
            async with gate:
                return await self.submit(spec)

        return await asyncio.gather(*(one(s) for s in specs))

    # ---- watching --------------------------------------------------------------------------------------
    def _snapshot(self, view: dict) -> None:
        wf_id = view["workflow_id"]
        for task in view["tasks"]:
            if task["status"] != "succeeded":
                continue
            seen = (orjson.dumps(task["result"]), task.get("finished_at"), task.get("attempts"))
            key = (wf_id, task["id"])
            first = self.first_seen.setdefault(key, seen)
            if first != seen:
                self.changes.append(f"{wf_id}/{task['id']}: recorded {first} then {seen}")
        if view["status"] in TERMINAL and wf_id not in self.terminal:
            self.terminal[wf_id] = view

    async def fetch(self, wf_id: str) -> dict | None:
        try:
            response = await self.cluster.client.get(f"/v1/workflows/{wf_id}")
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        view = response.json()
        self._snapshot(view)
        return view

    async def _watch(self, interval: float) -> None:
        gate = asyncio.Semaphore(4)

        async def one(wf_id):
            async with gate:
                await self.fetch(wf_id)

        while True:
            active = [w for w in list(self.specs) if w not in self.terminal]
            await asyncio.gather(*(one(w) for w in active))
            await asyncio.sleep(interval)  # the polling cadence of the watcher, not a synchronisation

    def watch(self, interval: float = 0.3) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._watch(interval))

    async def stop_watching(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None

    def pending(self) -> list[str]:
        return [w for w in self.specs if w not in self.terminal]

    def outstanding(self) -> int:
        """Tasks submitted that no agent has finished a run of yet."""
        runlogs = self.cluster.runlogs
        runlogs.refresh()
        return sum(len(s["tasks"]) - runlogs.ended_per_workflow[w] for w, s in self.specs.items())

    async def wait_all(self, *, timeout: float, ids: Iterable[str] | None = None, stall_s: float = 45.0) -> float:
        """Waits until every (or each given) workflow is terminal; returns seconds waited. Gives up early
        when nothing moves (no workflow finishes and no task runs) for stall_s, naming what is stuck."""
        began = time.monotonic()
        wanted = list(ids) if ids is not None else None
        self.watch()
        runlogs = self.cluster.runlogs
        last: list = [None, time.monotonic()]

        def waiting() -> list[str]:
            return [w for w in (wanted if wanted is not None else self.specs) if w not in self.terminal]

        def done() -> bool:
            if not waiting():
                return True
            runlogs.refresh()
            mark = (len(self.terminal), len(runlogs.events))
            if mark != last[0]:
                last[:] = [mark, time.monotonic()]
            elif time.monotonic() - last[1] > stall_s:
                raise Deadline(f"nothing moved for {stall_s:.0f}s")
            return False

        try:
            await wait_for(done, timeout=timeout, what="every workflow terminal", interval=0.1)
        except Deadline as exc:
            report = await self.stuck_report(waiting())
            raise AssertionError(f"{exc}: {report}\n{self.cluster.error_summary()}") from None
        return time.monotonic() - began

    async def stuck_report(self, wf_ids: list[str], limit: int = 8) -> str:
        """What the unfinished workflows wait for: in particular tasks whose parents all succeeded."""
        lines = [f"{len(wf_ids)} workflows not finished"]
        orphans = 0
        for wf_id in wf_ids:
            view = await self.fetch(wf_id)
            if view is None:
                lines.append(f"  {wf_id}: cannot be read")
                continue
            status = {t["id"]: t["status"] for t in view["tasks"]}
            for task in view["tasks"]:
                if task["status"] in TERMINAL:
                    continue
                parents_done = all(status[p] == "succeeded" for p in task["depends_on"])
                orphans += parents_done and task["status"] == "pending"
                if len(lines) <= limit:
                    lines.append(f"  {wf_id}/{task['id']}: {task['status']}, attempts {task['attempts']}, reason "
                                 f"{task['reason']!r}, parents {[(p, status[p]) for p in task['depends_on']]}")
        lines.append(f"{orphans} tasks are still pending although all their parents succeeded")
        return "\n".join(lines)

    # ---- recovery probe ------------------------------------------------------------------------------
    async def probe(self, *, timeout: float = 120.0) -> float:
        """A CRITICAL two-task chain through api, coordinator, dispatcher, an agent, aggregator and back to
        the coordinator (dependency release): returns when it succeeded (time.time())."""
        spec = {"name": f"probe-{uuid.uuid4().hex[:8]}", "tasks": [
            {"id": "p1", "capability": CAPABILITY, "priority": "CRITICAL", "max_attempts": 5},
            {"id": "p2", "capability": CAPABILITY, "priority": "CRITICAL", "max_attempts": 5, "depends_on": ["p1"]},
        ]}
        wf_id = await self.submit(spec, timeout=timeout)
        await self.wait_all(timeout=timeout, ids=[wf_id])
        assert self.terminal[wf_id]["status"] == "succeeded", self.terminal[wf_id]
        return time.time()


# ---- fault injection with recovery timing -------------------------------------------------------------
async def kill_and_recover(cluster: Cluster, workload: Workload, name: str, *, downtime: float = 0.0,
                           sig: int = signal.SIGKILL, timeout: float = 120.0) -> dict:
    """SIGKILLs a process, restarts it after `downtime`, and measures: ready_s (kill → the restarted process
    and all others ready) and recovery_s (kill → ready, and a probe workflow submitted after the restart
    has succeeded: results are recorded and dependents released again, so work flows)."""
    outstanding = workload.outstanding()
    killed_at = await cluster.kill(name, sig)
    if downtime:
        await asyncio.sleep(downtime)  # the injected outage itself, not a synchronisation
    await cluster.restart(name)
    await cluster.wait_ready(timeout=timeout)  # every process, not only the restarted one
    ready_at = time.time()
    if cluster.procs[name].kind == "agent":
        await cluster.wait_agents_alive([name], timeout=timeout)
    extra = {}
    if name == "dlq_replayer":  # its only work is dead letters: one must be stored again
        extra["dead_letter_s"] = await dead_letter_probe(cluster, timeout=timeout) - killed_at
    probed_at = await workload.probe(timeout=timeout)
    return {"target": name, "downtime_s": round(downtime, 3), "ready_s": round(ready_at - killed_at, 3),
            "recovery_s": round(probed_at - killed_at, 3), "tasks_outstanding": outstanding,
            **{k: round(v, 3) for k, v in extra.items()}}


async def dead_letter_probe(cluster: Cluster, *, timeout: float = 60.0) -> float:
    message_id = f"probe-{uuid.uuid4().hex}"
    await cluster.publish_raw(cluster.topology.coordinator, b"\x00probe garbage", message_id=message_id)

    async def stored() -> bool:
        try:
            return any(d.get("message_id") == message_id for d in await cluster.dead_letters())
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    await wait_for(stored, timeout=timeout, interval=0.1, what="the probe dead letter stored")
    return time.time()


# ---- the checks ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Verdict:
    workflows: int
    tasks: int
    runs: int
    rerun_tasks: int  # tasks that ran more than once (retries, and at-least-once execution)
    duplicate_runs: int  # runs of an attempt beyond its first (at-least-once execution after a crash)
    retried_tasks: int  # tasks with more than one attempt recorded
    failed_runs: int
    elapsed_s: float
    throughput: float  # tasks per second, first submission to last workflow finished
    views: dict[str, dict]
    recorded: dict[tuple[str, str], str]  # (wf, task) -> the run whose result was recorded

    def summary(self) -> str:
        return (f"{self.workflows} workflows, {self.tasks} tasks, {self.runs} runs ({self.rerun_tasks} tasks ran "
                f"more than once: {self.duplicate_runs} duplicate runs of an attempt, {self.retried_tasks} tasks "
                f"retried, {self.failed_runs} injected failures), "
                f"{self.elapsed_s:.1f}s, {self.throughput:.0f} tasks/s")


async def verify(cluster: Cluster, workload: Workload) -> Verdict:
    """Reads every workflow back through the API and checks the run against the agents' logs (see check)."""
    await workload.stop_watching()
    gate = asyncio.Semaphore(8)

    async def read(wf_id):
        async with gate:
            async def once():
                return await workload.fetch(wf_id)

            return await wait_for(once, timeout=60, interval=0.2, what=f"workflow {wf_id} readable")

    views = dict(zip(workload.specs, await asyncio.gather(*(read(w) for w in workload.specs))))
    listed, after = 0, None
    while True:
        page = (await cluster.client.get("/v1/workflows", params={"limit": 500} | ({"after": after} if after else {}))
                ).json()
        listed += len(page["workflows"])
        if not page.get("next"):
            break
        after = page["next"]
    cluster.runlogs.refresh()
    try:
        return check(views, workload.specs, cluster.runlogs.events, changes=workload.changes, stored=listed)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.error_summary()}") from None


def check(views: dict[str, dict], specs: dict[str, dict], events: list[dict], *, changes: list[str] = (),
          stored: int | None = None) -> Verdict:
    """The guarantees, checked on what the API shows (views: workflow id → GET /v1/workflows/{id}) and what
    the agents logged (events), for the workflows submitted (specs: workflow id → spec):
    - every workflow and every task succeeded (no task lost), and the store holds no workflow twice;
    - each recorded result is {"run": r} where r is a run of that very task that ended (a real result);
    - no recorded result changed while the run went on (`changes`, from the watcher): recorded once;
    - every run of a task started after each parent's recorded run had ended, and got exactly the
      parents' recorded results as inputs (no dependent ran before its parents, nor on other results).
    Raises AssertionError listing the violations; returns the run's figures otherwise."""
    problems: list[str] = []
    bad = {w: v["status"] for w, v in views.items() if v["status"] != "succeeded"}
    if bad:
        sample = next(iter(bad))
        problems.append(f"{len(bad)} workflows did not succeed: {dict(list(bad.items())[:5])}; e.g. "
                        f"{[(t['id'], t['status'], t['error'], t['reason']) for t in views[sample]['tasks']][:15]}")
    if stored is not None and stored != len(views):
        problems.append(f"the store holds {stored} workflows, {len(views)} were submitted")

    ends: dict[tuple[str, str], dict[str, dict]] = collections.defaultdict(dict)
    starts: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    failed_runs = 0
    for event in events:
        key = (event["wf"], event["task"])
        if event["event"] == "start":
            starts[key].append(event)
        elif event["event"] == "end":
            ends[key][event["run"]] = event
        elif event["event"] == "fail":
            failed_runs += 1

    recorded: dict[tuple[str, str], str] = {}
    depends: dict[tuple[str, str], list[str]] = {}
    for wf_id, view in views.items():
        spec_ids = {t["id"] for t in specs[wf_id]["tasks"]}
        if {t["id"] for t in view["tasks"]} != spec_ids:
            problems.append(f"{wf_id}: tasks {sorted(t['id'] for t in view['tasks'])} != submitted {sorted(spec_ids)}")
        for task in view["tasks"]:
            key = (wf_id, task["id"])
            depends[key] = task["depends_on"]
            if task["status"] != "succeeded":
                problems.append(f"{wf_id}/{task['id']} is {task['status']}")
                continue
            result = task["result"]
            if not (isinstance(result, dict) and set(result) == {"run"}):
                problems.append(f"{wf_id}/{task['id']}: recorded result {result!r} is not a run's result")
                continue
            recorded[key] = result["run"]
            if result["run"] not in ends[key]:
                problems.append(f"{wf_id}/{task['id']}: recorded run {result['run']} never ended in the agents' logs"
                                f" (runs that ended: {sorted(ends[key])})")

    problems += [f"result changed after it was recorded: {c}" for c in changes]

    order_violations = []
    for key, runs in starts.items():
        if key not in depends:
            problems.append(f"a run of {key}, which nobody submitted")
            continue
        parents = depends[key]
        for run in runs:
            if sorted(run["inputs"]) != sorted(parents):
                order_violations.append(f"{key} run {run['run']} got inputs {run['inputs']}, parents are {parents}")
            for parent in parents:
                pkey = (key[0], parent)
                prun = recorded.get(pkey)
                if prun is None:
                    continue
                if run["input_runs"].get(parent) != prun:
                    order_violations.append(f"{key} run {run['run']} got {parent}'s result from run "
                                            f"{run['input_runs'].get(parent)}, the recorded one is {prun}")
                end = ends[pkey].get(prun)
                if end is None or end["t"] > run["t"]:
                    order_violations.append(f"{key} run {run['run']} started at {run['t']:.3f} before parent "
                                            f"{parent}'s recorded run ended ({end and end['t']})")
    if order_violations:
        problems.append(f"{len(order_violations)} runs broke dependency order or inputs:")
        problems += order_violations[:20]

    tasks = sum(len(v["tasks"]) for v in views.values())
    created = [v["created_at"] for v in views.values()]
    finished = [v["finished_at"] for v in views.values() if v.get("finished_at")]
    elapsed = (max(finished) - min(created)) if finished else 0.0
    verdict = Verdict(
        workflows=len(views), tasks=tasks, runs=sum(len(r) for r in starts.values()),
        rerun_tasks=sum(1 for r in starts.values() if len(r) > 1),
        duplicate_runs=sum(n - 1 for n in collections.Counter(
            (e["wf"], e["task"], e["attempt"]) for e in events if e["event"] == "start").values()),
        retried_tasks=sum(1 for v in views.values() for t in v["tasks"] if (t.get("attempts") or 0) > 1),
        failed_runs=failed_runs, elapsed_s=elapsed, throughput=tasks / elapsed if elapsed else 0.0,
        views=views, recorded=recorded)
    if problems:
        raise AssertionError(f"{len(problems)} problems ({verdict.summary()}):\n  " + "\n  ".join(problems[:40]))
    return verdict
