"""Switchboard benchmark, with Celery 5 and Dramatiq as baselines, on the local RabbitMQ and Redis (`make bench`).

    python bench/run.py [--noop N] [--workflows N] [--latency-tasks N] [--stream-chunks N] [--skip-celery]
                        [--skip-dramatiq] [--agent-concurrency C] [--batch B] [--parallel P] [--rounds R]
    python bench/run.py --scale [--scale-backlog N] [--scale-fanout N] [--scale-chain N]
    python bench/run.py --footprint [--footprint-noop N] [--footprint-dag N] [--footprint-batch B]
                        [--footprint-store-options OPTIONS]

Starts the six services and the bench agents (bench/noop_agent.py, and bench/stream_agent.py for the
streaming workload) as separate processes, in a namespace, SQLite store and ports of their own, then
measures, through the public REST API:

  1. no-op      N one-task workflows (capability "noop"), submitted via POST /v1/workflows/batch;
                tasks/s = N / (when the last workflow finished, per the store - the first submit)
  2. DAG        N workflows a -> (b1..b4) -> c, submitted the same way; tasks/s and workflows/s
  3. latency    M "stamp" tasks, one POST /v1/tasks each, at a steady 200/s (open loop, on a schedule);
                submit-to-start = the handler's time.time() - the client's time.time() before the request
  4. streaming  one task calls task.stream() N times at a steady 1,000/s, each chunk "<i>,<send time>;";
                a reader of GET /v1/workflows/{id}/events (SSE) notes when each chunk arrives. The SDK
                coalesces chunks, so one `chunk` event carries several: each is timed by its own send
                time. chunks/s received, and send-to-reader latency p50/p95/p99/max (Switchboard only)
  5. memory     peak RSS of every process (VmRSS sampled every 100 ms, and the kernel's VmHWM)

and the CPU seconds every process (and the local RabbitMQ and Redis) spent on each workload. The bench
sees work finish on the aggregator's counter switchboard_tasks_finished_total{outcome="succeeded"} (its
/metrics), then pages GET /v1/workflows?status=succeeded until every workflow is listed, and checks a
sample in detail.
Then the platform is stopped and Celery (bench/celery_baseline/run.py), then Dramatiq twice
(bench/dramatiq_baseline/run.py: as shipped, and with confirm_delivery=True, the publisher confirms
Switchboard waits for on every message) run the no-op, DAG and latency workloads on the same machine.
Prints a table with the ratios Switchboard/baseline and writes bench/results.json.

`--scale` (backlog, fan-out, chain) and `--footprint` (store and broker cost per task, from counters) run
instead of all that: see bench/scale.py.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import urlparse

import httpx
import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SERVICES = ("api", "coordinator", "dispatcher", "registry", "aggregator", "dlq_replayer")
AGENT = "bench-agent"
STREAM_AGENT = "bench-stream-agent"
CAPABILITIES = ("noop", "stamp", "stream")
LATENCY_RATE = 200.0
STREAM_RATE = 1000.0
SAMPLE = 50
RESULTS_JSON = BENCH / "results.json"

# Targets of the spec.
TARGET_RATIO = 1.0
TARGET_P50_MS = 5.0
TARGET_P99_MS = 25.0
TARGET_RSS_MB = 150.0
TARGET_STREAM_P99_MS = 50.0

_RESULT_LINE = re.compile(r'^switchboard_tasks_finished_total\{capability="[^"]*",outcome="(\w+)"\}\s+(\S+)$',
                          re.MULTILINE)
_AGENT_RUNS = re.compile(r'^switchboard_tasks_started_total\{[^}]*\}\s+(\S+)$', re.MULTILINE)
JSON_HEADERS = {"content-type": "application/json"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------
def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU time of each process so far (from /proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            out[name] = 0.0
    return out


TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"


def tcp_sockets():
    """(state, local port, remote port, fd link "socket:[inode]") of every TCP socket in /proc/net/tcp*."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    yield (fields[3], int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16),
                           f"socket:[{fields[9]}]")
        except OSError:
            continue


def listener_pid(port: int) -> int | None:
    """The process listening on this local TCP port (via /proc/net/tcp*), if we may see it."""
    inodes = {link for state, local, _, link in tcp_sockets() if state == TCP_LISTEN and local == port}
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
        except OSError:
            continue
    return None


def server_pids(amqp_url: str, redis_url: str) -> dict[str, int]:
    """The RabbitMQ and Redis of this run, when they run on this host: their CPU is part of the cost."""
    found = {}
    for name, url, default in (("rabbitmq", amqp_url, 5672), ("redis", redis_url, 6379)):
        parsed = urlparse(url)
        if parsed.hostname in ("127.0.0.1", "localhost", "::1"):
            pid = listener_pid(parsed.port or default)
            if pid:
                found[name] = pid
    return found


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 2) for name in after}


class RssSampler(threading.Thread):
    """Samples VmRSS of every process every `period` s; `peaks()` also folds in the kernel's VmHWM."""

    def __init__(self, pids: dict[str, int], period: float = 0.1):
        super().__init__(daemon=True, name="rss-sampler")
        self.pids, self.period = pids, period
        self.peak_kb = {name: 0 for name in pids}
        self.hwm_kb = {name: 0 for name in pids}
        self.phase: str | None = None  # set by the bench: peaks are also kept per workload
        self.phase_kb: dict[str, dict[str, int]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def sample(self) -> None:
        phase = self.phase
        for name, pid in self.pids.items():
            rss = _status_kb(pid, "VmRSS:")
            self.peak_kb[name] = max(self.peak_kb[name], rss)
            self.hwm_kb[name] = max(self.hwm_kb[name], _status_kb(pid, "VmHWM:"))
            if phase is not None:
                peaks = self.phase_kb.setdefault(phase, {})
                peaks[name] = max(peaks.get(name, 0), rss)

    def stop(self) -> None:
        """Call while the processes still live: takes a last sample, including their VmHWM."""
        self._halt.set()
        self.join()
        self.sample()

    def phase_peaks_mb(self) -> dict[str, dict[str, float]]:
        return {phase: {n: round(kb / 1024, 1) for n, kb in peaks.items()} for phase, peaks in self.phase_kb.items()}

    def peaks_mb(self) -> dict[str, float]:
        return {n: round(max(self.peak_kb[n], self.hwm_kb[n]) / 1024, 1) for n in self.pids}


# ---------------------------------------------------------------------------------------------------
# the platform, as processes
# ---------------------------------------------------------------------------------------------------
class Platform:
    def __init__(self, *, amqp_url: str, redis_url: str, agent_concurrency: int, log_level: str,
                 stream: bool = False, env: dict[str, str] | None = None,
                 store_options: str = ""):
        self.amqp_url, self.redis_url = amqp_url, redis_url
        self.extra_env = dict(env or {})  # more SWITCHBOARD_* settings for every process (e.g. --scale's)
        self.namespace = f"bench{os.getpid()}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sb-{self.namespace}-"))
        self.store_url = f"sqlite:///{self.tmp / 'store.sqlite3'}" + (f"?{store_options}" if store_options else "")
        self.api_port = free_port()
        self.health_ports = {name: free_port() for name in SERVICES if name != "api"}
        self.health_ports["agent"] = free_port()
        if stream:  # its own process, so that its steady sends do not share a loop with the no-op work
            self.health_ports["stream-agent"] = free_port()
        self.agent_concurrency = agent_concurrency
        self.log_level = log_level
        self.procs: dict[str, subprocess.Popen] = {}
        self.sampler: RssSampler | None = None
        self._logs: list = []

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def health_url(self, name: str) -> str:
        port = self.api_port if name == "api" else self.health_ports[name]
        return f"http://127.0.0.1:{port}"

    def _env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(
            SWITCHBOARD_AMQP_URL=self.amqp_url, SWITCHBOARD_REDIS_URL=self.redis_url,
            SWITCHBOARD_STORE_URL=self.store_url, SWITCHBOARD_NAMESPACE=self.namespace,
            SWITCHBOARD_API_PORT=str(self.api_port), SWITCHBOARD_LOG_LEVEL=self.log_level,
            SWITCHBOARD_AGENT_CONCURRENCY=str(self.agent_concurrency),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        if name != "api":
            env["SWITCHBOARD_HEALTH_PORT"] = str(self.health_ports[name])
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        commands = {name: [sys.executable, "-m", "switchboard.cli", "serve", name] for name in SERVICES}
        commands["agent"] = [sys.executable, str(BENCH / "noop_agent.py")]
        if "stream-agent" in self.health_ports:
            commands["stream-agent"] = [sys.executable, str(BENCH / "stream_agent.py")]
        for name, cmd in commands.items():
            out = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (open while the process runs)
            self._logs.append(out)
            self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=self._env(name), stdout=out,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log("started " + ", ".join(f"{n} pid {p.pid}" for n, p in self.procs.items()))
        log(f"namespace {self.namespace}, api {self.api_url}, store {self.store_url}")

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.tmp / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.procs)
        while waiting:
            self.check_alive()
            for name in sorted(waiting):
                try:
                    if (await client.get(self.health_url(name) + "/readyz", timeout=2)).status_code == 200:
                        waiting.discard(name)
                except httpx.HTTPError:
                    pass
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {sorted(waiting)}")
            await asyncio.sleep(0.05)
        wanted = {AGENT} | ({STREAM_AGENT} if "stream-agent" in self.procs else set())
        while True:  # and the agents registered, as the api sees them
            agents = (await client.get(self.api_url + "/v1/agents")).json()["agents"]
            if wanted <= {a["name"] for a in agents if a["status"] == "alive"}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"agents {sorted(wanted)} not registered after {timeout:.0f}s: {agents}")
            self.check_alive()
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 40.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop in {timeout:.0f}s; killing it")
                proc.kill()
                proc.wait()
        for out in self._logs:
            out.close()
        self._logs.clear()

    async def cleanup(self, keep_logs: bool) -> None:
        """Deletes the namespace's queues, exchanges and Redis keys, and the store (logs on failure)."""
        sys.path.insert(0, str(ROOT))
        from switchboard.settings import Settings
        from switchboard.topology import Topology

        from tests.harness import cleanup

        topology = Topology(self.namespace)
        # tests.harness.cleanup deletes the services' own queues; these are the rest (delay queues expire).
        queues = {topology.agent_queue(AGENT), topology.agent_queue(STREAM_AGENT), topology.replay}
        for capability in CAPABILITIES:
            queues |= {topology.capability_queue(capability), topology.hold_queue(capability),
                       topology.paused_queue(capability)}
        settings = Settings(amqp_url=self.amqp_url, redis_url=self.redis_url, namespace=self.namespace)
        await cleanup(settings, queues)
        if keep_logs:
            log(f"service logs and store kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------
class Outcomes:
    """The aggregator's count of recorded task outcomes: how the bench sees work finish."""

    def __init__(self, platform: Platform, client: httpx.AsyncClient, poll_s: float = 0.1):
        self.platform, self.client, self.poll_s = platform, client, poll_s
        # Whose CPU time each workload reports: every process of the platform, the bench, the servers.
        self.cpu_pids = (platform.pids | {"bench client": os.getpid()}
                         | server_pids(platform.amqp_url, platform.redis_url))
        # Only the counter it reads: rendering every histogram ten times a second would cost the aggregator.
        self.url = platform.health_url("aggregator") + "/metrics?name[]=switchboard_tasks_finished_total"

    async def read(self) -> dict[str, int]:
        text = (await self.client.get(self.url, timeout=5)).text
        counts: dict[str, int] = {}
        for outcome, value in _RESULT_LINE.findall(text):  # summed over capabilities
            counts[outcome] = counts.get(outcome, 0) + int(float(value))
        return counts

    async def agent_runs(self) -> int:
        """Handler runs the agent counted (every outcome): more than the tasks if some ran twice."""
        text = (await self.client.get(self.platform.health_url("agent") + "/metrics",
                                      params={"name[]": "switchboard_tasks_started_total"}, timeout=5)).text
        return int(sum(float(v) for v in _AGENT_RUNS.findall(text)))

    async def wait_results(self, target: int, timeout: float, what: str) -> float:
        """Waits until `target` results are recorded; returns time.monotonic() when that was seen."""
        deadline = time.monotonic() + timeout
        last_check = 0.0
        while True:
            counts = await self.read()
            now = time.monotonic()
            if counts.get("succeeded", 0) >= target:
                return now
            if now > deadline:
                raise RuntimeError(f"{what}: {counts} after {timeout:.0f}s, waiting for {target} results")
            if now - last_check > 1.0:
                self.platform.check_alive()
                last_check = now
            await asyncio.sleep(self.poll_s)


async def post_batches(client: httpx.AsyncClient, specs: list[dict], batch: int, parallel: int) -> list[str]:
    """POSTs the specs to /v1/workflows/batch, `batch` a request, `parallel` requests at once."""
    chunks = [specs[i:i + batch] for i in range(0, len(specs), batch)]
    bodies = [orjson.dumps({"workflows": chunk}) for chunk in chunks]
    ids: list[list[str]] = [[] for _ in chunks]
    gate = asyncio.Semaphore(parallel)

    async def post(i: int) -> None:
        async with gate:
            response = await client.post("/v1/workflows/batch", content=bodies[i], headers=JSON_HEADERS)
            if response.status_code != 202:
                raise RuntimeError(f"batch submit: HTTP {response.status_code} {response.text[:500]}")
            ids[i] = response.json()["workflow_ids"]

    await asyncio.gather(*(post(i) for i in range(len(chunks))))
    return [wf_id for chunk in ids for wf_id in chunk]


async def fetch_views(client: httpx.AsyncClient, ids: list[str], parallel: int = 16, wait: float = 0) -> list[dict]:
    gate = asyncio.Semaphore(parallel)

    async def get(wf_id: str) -> dict:
        async with gate:
            response = await client.get(f"/v1/workflows/{wf_id}", params={"wait": wait} if wait else None)
            response.raise_for_status()
            return response.json()

    return await asyncio.gather(*(get(i) for i in ids))


async def listed_succeeded(client: httpx.AsyncClient, ids: list[str]) -> dict[str, float]:
    """Which of `ids` GET /v1/workflows?status=succeeded lists (every page), with their finished_at."""
    wanted, seen, after = set(ids), {}, None
    while True:
        params = {"status": "succeeded", "limit": 500} | ({"after": after} if after else {})
        page = (await client.get("/v1/workflows", params=params)).json()
        seen |= {wf["workflow_id"]: wf["finished_at"] for wf in page["workflows"] if wf["workflow_id"] in wanted}
        after = page["next"]
        if not after:
            return seen


async def confirm(client: httpx.AsyncClient, ids: list[str], tasks_each: int, what: str,
                  timeout: float = 60.0) -> dict:
    """Waits until the API lists every workflow as succeeded (the aggregator's counter can run ahead of
    it: a task run twice is counted twice), checks a sample in detail, and returns when the last one
    finished (the store's finished_at, wall clock)."""
    deadline = time.monotonic() + timeout
    rounds = 0
    while True:
        rounds += 1
        listed = await listed_succeeded(client, ids)
        if len(listed) == len(ids):
            break
        if time.monotonic() > deadline:
            missing = [i for i in ids if i not in listed]
            views = await fetch_views(client, missing[:5])
            raise RuntimeError(f"{what}: only {len(listed)}/{len(ids)} workflows listed as succeeded after "
                               f"{timeout:.0f}s, e.g. " + "; ".join(
                                   f"{v['workflow_id']} {v['status']} "
                                   f"{[(t['id'], t['status'], t['attempts']) for t in v['tasks']]}"
                                   for v in views))
        await asyncio.sleep(0.2)
    sample = random.sample(ids, min(SAMPLE, len(ids)))
    views = await fetch_views(client, sample)
    bad = [v["workflow_id"] for v in views
           if v["status"] != "succeeded" or len(v["tasks"]) != tasks_each
           or any(t["status"] != "succeeded" for t in v["tasks"])]
    if bad:
        raise RuntimeError(f"{what}: sampled workflows not (entirely) succeeded: {bad[:5]}")
    return {"last_finished_at": max(listed.values()), "listing_rounds": rounds, "sample_checked": len(sample)}


def noop_spec() -> dict:
    return {"tasks": [{"id": "t", "capability": "noop"}]}


def dag_spec() -> dict:
    bs = [f"b{i}" for i in range(1, 5)]
    return {"tasks": [{"id": "a", "capability": "noop"},
                      *({"id": b, "capability": "noop", "depends_on": ["a"]} for b in bs),
                      {"id": "c", "capability": "noop", "depends_on": bs}]}


async def warm_up(client: httpx.AsyncClient, outcomes: Outcomes) -> None:
    """A few of each workload, so connections, queues and routes exist before anything is timed."""
    base = (await outcomes.read()).get("succeeded", 0)
    ids = await post_batches(client, [noop_spec() for _ in range(20)] + [dag_spec() for _ in range(5)], 25, 1)
    for _ in range(5):
        response = await client.post("/v1/tasks", content=b'{"capability":"stamp"}', headers=JSON_HEADERS)
        ids.append(response.json()["workflow_id"])
    await outcomes.wait_results(base + 20 + 5 * 6 + 5, 60, "warm-up")
    views = await fetch_views(client, ids)
    if any(v["status"] != "succeeded" for v in views):
        raise RuntimeError(f"warm-up: not all succeeded: {[v['status'] for v in views]}")


async def bench_batch_workload(client, outcomes, specs: list[dict], tasks_each: int, batch: int,
                               parallel: int, what: str) -> dict:
    base = (await outcomes.read()).get("succeeded", 0)
    runs_before = await outcomes.agent_runs()
    cpu_before = cpu_seconds(outcomes.cpu_pids)
    n_tasks = len(specs) * tasks_each
    submitted = 0.0

    async def submit() -> list[str]:
        nonlocal submitted
        ids = await post_batches(client, specs, batch, parallel)
        submitted = time.monotonic()
        return ids

    t0, t0_wall = time.monotonic(), time.time()
    submitting = asyncio.create_task(submit())
    counted = await outcomes.wait_results(base + n_tasks, max(120.0, n_tasks / 20), what)
    ids = await submitting
    cpu = cpu_delta(cpu_before, cpu_seconds(outcomes.cpu_pids))
    checked = await confirm(client, ids, tasks_each, what)
    runs = await outcomes.agent_runs() - runs_before
    seconds = checked["last_finished_at"] - t0_wall
    return {"workflows": len(specs), "tasks": n_tasks, "seconds": round(seconds, 3),
            "submit_seconds": round(submitted - t0, 3), "counter_seconds": round(counted - t0, 3),
            "tasks_per_s": round(n_tasks / seconds, 1), "workflows_per_s": round(len(specs) / seconds, 1),
            "agent_runs": runs, "duplicate_runs": runs - n_tasks, "cpu_seconds": cpu,
            "listing_rounds": checked["listing_rounds"], "sample_checked": checked["sample_checked"]}


class KeepAliveClient:
    """A minimal HTTP/1.1 client on persistent connections, for the latency workload.

    httpx spends milliseconds of client CPU a request once requests overlap, which on a small host
    delays the very requests being timed; this costs a few tens of microseconds.
    """

    IDLE_S = 2.0  # uvicorn closes idle keep-alive connections after 5 s: never reuse one near that

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connection(self):
        while self._idle:
            used, reader, writer = self._idle.pop()  # the most recently used first
            if time.monotonic() - used < self.IDLE_S:
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes, on_send=None) -> tuple[int, bytes]:
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        for attempt in (1, 2):
            reader, writer = await self._connection()
            if on_send is not None:
                on_send()
            writer.write(request)
            try:
                status_line = await reader.readline()
            except ConnectionError:
                status_line = b""
            if status_line:
                break
            writer.close()  # the server closed it first: once more on a new connection
            if attempt == 2:
                raise RuntimeError(f"POST {path}: connection closed without a response")
        status = int(status_line.split()[1])
        length, keep = None, True
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value == "close":
                keep = False
        if length is None:
            raise RuntimeError(f"POST {path}: HTTP {status} without Content-Length")
        data = await reader.readexactly(length)
        if keep:
            self._idle.append((time.monotonic(), reader, writer))
        else:
            writer.close()
        return status, data

    async def aclose(self) -> None:
        for _, _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def bench_latency(client, outcomes, m: int, rate: float, dump: Path | None = None) -> dict:
    base = (await outcomes.read()).get("succeeded", 0)
    cpu_before = cpu_seconds(outcomes.cpu_pids)
    body = b'{"capability":"stamp"}'
    submitted: list[float] = [0.0] * m
    ids: list[str] = [""] * m
    errors: list[str] = []
    raw = KeepAliveClient("127.0.0.1", outcomes.platform.api_port)

    async def one(i: int) -> None:
        def stamp() -> None:  # just before the request goes out
            submitted[i] = time.time()

        status, data = await raw.post("/v1/tasks", body, stamp)
        if status != 202:
            errors.append(f"HTTP {status} {data[:200]!r}")
            return
        ids[i] = orjson.loads(data)["workflow_id"]

    requests = []
    start = time.monotonic() + 0.01
    for i in range(m):  # open loop: request i goes at start + i/rate, whatever the earlier ones do
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        requests.append(asyncio.create_task(one(i)))
    await asyncio.gather(*requests)
    await raw.aclose()
    if errors:
        raise RuntimeError(f"latency: {len(errors)} submits failed, e.g. {errors[0]}")
    await outcomes.wait_results(base + m, 120, "latency")
    cpu = cpu_delta(cpu_before, cpu_seconds(outcomes.cpu_pids))
    views = await fetch_views(client, ids, wait=30)
    lat_ms: list[float] = []
    # Where the time goes, from the store's timestamps (each stamped by the process that wrote it):
    # api = submit -> workflow stored, intake = stored -> task queued by the coordinator,
    # delivery = queued -> handler started (dispatcher, capability queue, agent).
    stages: dict[str, list[float]] = {"api": [], "intake": [], "delivery": []}
    for sub, view in zip(submitted, views):
        task = view["tasks"][0]
        if view["status"] != "succeeded":
            raise RuntimeError(f"latency: workflow {view['workflow_id']} {view['status']}")
        started = task["result"]["started"]
        lat_ms.append((started - sub) * 1000.0)
        stages["api"].append((view["created_at"] - sub) * 1000.0)
        stages["intake"].append((task["queued_at"] - view["created_at"]) * 1000.0)
        stages["delivery"].append((started - task["queued_at"]) * 1000.0)
    if dump is not None:  # one line a task, in submit order: when, total, and the three stages (ms)
        rows = ["submitted_at,total_ms,api_ms,intake_ms,delivery_ms"]
        rows += [f"{sub:.6f},{t:.3f},{a:.3f},{i:.3f},{d:.3f}" for sub, t, a, i, d in
                 zip(submitted, lat_ms, stages["api"], stages["intake"], stages["delivery"])]
        dump.write_text("\n".join(rows) + "\n")
    p50, p99 = percentiles(lat_ms)
    return {"tasks": m, "rate_per_s": rate,
            "achieved_rate_per_s": round((m - 1) / (max(submitted) - min(submitted)), 1),
            "p50_ms": p50, "p90_ms": round(statistics.quantiles(lat_ms, n=100, method="inclusive")[89], 2),
            "p99_ms": p99, "max_ms": round(max(lat_ms), 2),
            "stages_p50_p99_ms": {name: percentiles(values) for name, values in stages.items()},
            "cpu_seconds": cpu}


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99), as the Celery baseline computes them."""
    q = statistics.quantiles(values, n=100, method="inclusive")
    return round(statistics.median(values), 2), round(q[98], 2)


_STREAMED = re.compile(r"(\d+),(\d+\.\d+);")


class StreamReader:
    """Reads GET /v1/workflows/{id}/events and times every streamed chunk on arrival.

    Each `chunk` event's text is appended to its (task, attempt)'s text at the event's offset (so a chunk
    split across two events is timed when its end arrives, and a repeated event counts once); every
    complete "<i>,<send time>;" in it is timed by time.time() when that event's data line arrived. Where
    the event says when its log entry was written (`at`, by the process that recorded it), the latency is
    split there too: send -> recorded (agent, broker, aggregator) and recorded -> reader (commit, publish,
    api, SSE).
    """

    def __init__(self, client: httpx.AsyncClient, workflow_id: str):
        self.client, self.workflow_id = client, workflow_id
        self.latency_ms: dict[int, float] = {}  # chunk number -> send-to-reader ms (the first arrival)
        self.stages_ms: dict[str, list[float]] = {"recorded": [], "delivered": []}
        self.received: list[float] = []  # arrival time of each chunk, in order
        self.events = 0  # `chunk` events, each carrying one or more chunks
        self.gaps = 0  # events whose offset skipped text (the reader would have missed chunks)
        self.duplicates = 0  # chunk numbers that arrived twice
        self.snapshot_at: float | None = None
        self.ended = False
        self._text: dict[tuple[str, int], str] = {}
        self._parsed: dict[tuple[str, int], int] = {}

    async def run(self, opened: asyncio.Event) -> None:
        url = f"/v1/workflows/{self.workflow_id}/events"
        async with self.client.stream("GET", url, timeout=httpx.Timeout(30.0, read=60.0)) as response:
            if response.status_code != 200:
                raise RuntimeError(f"stream: GET {url}: HTTP {response.status_code} {(await response.aread())[:300]!r}")
            event = None
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    arrived = time.time()  # first, so the parsing below is not counted as latency
                    if event == "chunk":
                        self._chunk(orjson.loads(line[5:]), arrived)
                    elif event == "snapshot":
                        self.snapshot_at = arrived
                        opened.set()
                    elif event == "end":
                        self.ended = True
                        return
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line == "":
                    event = None

    def _chunk(self, data: dict, arrived: float) -> None:
        self.events += 1
        key = (data["task_id"], int(data.get("attempt", 1)))
        text, offset = self._text.get(key, ""), int(data.get("offset", len(self._text.get(key, ""))))
        if offset > len(text):
            self.gaps += 1
            text += "\0" * (offset - len(text))  # keep positions; the missed chunks never parse
        text = text[:offset] + data["text"] if offset + len(data["text"]) > len(text) else text
        self._text[key] = text
        start = self._parsed.get(key, 0)
        end = text.rfind(";") + 1
        for match in _STREAMED.finditer(text, start, end):
            i = int(match.group(1))
            if i in self.latency_ms:
                self.duplicates += 1
                continue
            sent = float(match.group(2))
            self.latency_ms[i] = (arrived - sent) * 1000.0
            self.received.append(arrived)
            if isinstance(data.get("at"), (int, float)):
                self.stages_ms["recorded"].append((data["at"] - sent) * 1000.0)
                self.stages_ms["delivered"].append((arrived - data["at"]) * 1000.0)
        self._parsed[key] = max(start, end)


async def bench_stream(client: httpx.AsyncClient, outcomes: Outcomes, n: int, rate: float) -> dict:
    """One task streams n chunks at `rate` a second; the SSE reader times each one (see StreamReader)."""

    async def one_run(chunks: int) -> tuple[StreamReader, dict, dict]:
        lead_s = 1.0  # the task waits this long before its first chunk, so the reader is connected by then
        spec = {"name": "bench: stream", "tasks": [{
            "id": "s", "capability": "stream", "timeout_s": chunks / rate + 60,
            "payload": {"chunks": chunks, "rate_per_s": rate, "start_at": time.time() + lead_s}}]}
        response = await client.post("/v1/workflows", json=spec)
        if response.status_code != 202:
            raise RuntimeError(f"stream: submit: HTTP {response.status_code} {response.text[:300]}")
        reader = StreamReader(client, response.json()["workflow_id"])
        opened = asyncio.Event()
        reading = asyncio.create_task(reader.run(opened))
        snapshot = asyncio.create_task(opened.wait())
        await asyncio.wait([reading, snapshot], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        snapshot.cancel()
        if reading.done():
            reading.result()  # raises what ended it
            raise RuntimeError("stream: the event stream ended before its snapshot")
        if not opened.is_set():
            reading.cancel()
            raise RuntimeError(f"stream: no snapshot from the event stream of {reader.workflow_id} in 30 s")
        try:
            await asyncio.wait_for(reading, chunks / rate + 120)
        except TimeoutError:
            raise RuntimeError(f"stream: no `end` event {chunks / rate + 120:.0f}s after the snapshot; "
                               f"{len(reader.latency_ms)}/{chunks} chunks arrived") from None
        view = (await client.get(f"/v1/workflows/{reader.workflow_id}")).json()
        if view["status"] != "succeeded":
            raise RuntimeError(f"stream: workflow {reader.workflow_id} {view['status']}: {view['tasks'][0]}")
        return reader, view, spec["tasks"][0]["payload"]

    await one_run(min(n, 200))  # warm-up: the api's subscription, the agent's routes and connections
    load = os.getloadavg()[0]  # latencies on a busy host say little about the platform: print it beside them
    cpu_before = cpu_seconds(outcomes.cpu_pids)
    reader, view, payload = await one_run(n)
    cpu = cpu_delta(cpu_before, cpu_seconds(outcomes.cpu_pids))
    result = view["tasks"][0]["result"]
    if reader.snapshot_at is None or reader.snapshot_at > payload["start_at"]:
        log("stream: the reader connected after the first chunk was due; the first latencies include that")
    lat = sorted(reader.latency_ms.values())
    if not lat:
        raise RuntimeError(f"stream: no chunk arrived ({reader.events} chunk events)")
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    span = max(reader.received) - min(reader.received)
    return {"chunks": n, "rate_per_s": rate, "received": len(lat), "missing": n - len(lat),
            "duplicates": reader.duplicates, "gaps": reader.gaps, "chunk_events": reader.events,
            "chunks_per_event": round(len(lat) / max(1, reader.events), 1),
            "received_per_s": round((len(lat) - 1) / span, 1) if span > 0 else None,
            "late_sends": result.get("late_sends"), "host_load_1m": round(load, 2),
            "p50_ms": round(statistics.median(lat), 2), "p95_ms": round(q[94], 2), "p99_ms": round(q[98], 2),
            "max_ms": round(lat[-1], 2),
            "stages_p50_p99_ms": {name: percentiles(v) for name, v in reader.stages_ms.items() if len(v) > 1},
            "cpu_seconds": cpu}


async def bench_switchboard(platform: Platform, args) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=platform.api_url, timeout=120, limits=limits) as client:
        started = time.monotonic()
        await platform.wait_ready(client)
        log(f"all processes ready and {AGENT} registered in {time.monotonic() - started:.1f}s")
        outcomes = Outcomes(platform, client)
        await warm_up(client, outcomes)
        log("warm-up done")
        results: dict = {}
        def phase(name: str | None) -> None:
            if platform.sampler is not None:
                platform.sampler.phase = name

        if args.noop:
            phase("noop")
            results["noop"] = await bench_batch_workload(
                client, outcomes, [noop_spec() for _ in range(args.noop)], 1, args.batch, args.parallel, "noop")
            log(f"no-op: {results['noop']}")
        if args.workflows:
            phase("dag")
            results["dag"] = await bench_batch_workload(
                client, outcomes, [dag_spec() for _ in range(args.workflows)], 6, args.batch, args.parallel,
                "dag")
            log(f"dag: {results['dag']}")
        if args.latency_tasks:
            phase("latency")
            results["latency"] = await bench_latency(client, outcomes, args.latency_tasks, LATENCY_RATE,
                                                     args.dump_latency)
            log(f"latency: {results['latency']}")
        if args.stream_chunks:
            phase("stream")
            results["stream"] = await bench_stream(client, outcomes, args.stream_chunks, STREAM_RATE)
            log(f"stream: {results['stream']}")
        phase(None)
        return results


def run_platform(args, work, **options) -> tuple[dict, RssSampler]:
    """Starts a platform (Platform's `options`), runs `await work(platform, args)` with its RSS sampled,
    then stops it and cleans up its namespace (keeping the logs if anything failed)."""
    platform = Platform(amqp_url=args.amqp_url, redis_url=args.redis_url,
                        agent_concurrency=args.agent_concurrency, log_level=args.log_level, **options)
    sampler: RssSampler | None = None
    ok = False
    try:
        platform.start()
        sampler = platform.sampler = RssSampler(platform.pids)
        sampler.start()
        results = asyncio.run(work(platform, args))
        platform.check_alive()
        ok = True
    finally:
        try:
            if sampler is not None:
                sampler.stop()
        finally:
            log("stopping the platform")
            platform.stop()
            asyncio.run(platform.cleanup(keep_logs=not ok))
    return results, sampler


def run_switchboard(args) -> dict:
    results, sampler = run_platform(args, bench_switchboard, stream=bool(args.stream_chunks))
    results["peak_rss_mb"] = sampler.peaks_mb()
    results["peak_rss_mb_by_workload"] = sampler.phase_peaks_mb()
    results["config"] = {"agent_concurrency": args.agent_concurrency, "batch": args.batch,
                         "parallel_requests": args.parallel, "store": "sqlite (WAL)",
                         "log_level": args.log_level}
    return results


# ---------------------------------------------------------------------------------------------------
# the baselines and the report
# ---------------------------------------------------------------------------------------------------
BASELINES = {"celery": "celery", "dramatiq": "dramatiq", "dramatiq_confirms": "+confirms"}


def run_baseline(args, folder: str, **options) -> dict:
    """Runs bench/<folder>/run.py's run_all(), with the CPU seconds its client and worker processes (and the
    local RabbitMQ and Redis) spent on all its workloads."""
    path = BENCH / folder / "run.py"
    spec = importlib.util.spec_from_file_location(f"bench_{folder}_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    servers = server_pids(args.amqp_url, args.redis_url)
    servers_before, mine_before = cpu_seconds(servers), os.times()
    results = module.run_all(args.noop, args.workflows, args.latency_tasks, **options)
    mine = os.times()
    # The client runs in this process, the worker is our (waited-for) child: os.times() has both.
    results["cpu_seconds_all_workloads"] = {
        "client + worker processes": round(
            (mine.user + mine.system + mine.children_user + mine.children_system)
            - (mine_before.user + mine_before.system + mine_before.children_user + mine_before.children_system), 2),
        **cpu_delta(servers_before, cpu_seconds(servers))}
    return results


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "MISS")


def _row(label: str, *cells: str) -> str:
    return f"{label:<42}" + "".join(f"{cell:>12}" for cell in cells)


def report(sb: dict, baselines: dict[str, dict | None], args) -> dict:
    """The table; `baselines` maps each of BASELINES to its results (None: skipped)."""
    rows, summary = [], {}
    theirs_all = {key: baselines.get(key) or {} for key in BASELINES}
    lines = ["", f"Switchboard vs Celery 5 and Dramatiq — same RabbitMQ and Redis, one host ({os.cpu_count()} CPUs)",
             "", _row("workload", "switchboard", *BASELINES.values())]
    lines.append("-" * len(lines[-1]))
    ratio_lines = ["", _row("ratio switchboard / baseline", "", *BASELINES.values()) + "   target"]

    def throughput(key: str, label: str, metric: str, unit: str, gate: bool) -> None:
        mine = sb[key][metric]
        theirs = {name: results.get(key, {}).get(metric) for name, results in theirs_all.items()}
        ratios = {name: round(mine / value, 2) if value else None for name, value in theirs.items()}
        ok = (ratios["celery"] >= TARGET_RATIO) if (gate and ratios["celery"] is not None) else None
        rows.append({"workload": key, "metric": metric, "switchboard": mine, **theirs,
                     **{f"ratio_{name}": ratio for name, ratio in ratios.items()},
                     "target": f"celery >= {TARGET_RATIO}" if gate else None, "pass": ok})
        lines.append(_row(f"{label} {unit}", f"{mine:.1f}",
                          *(f"{value:.1f}" if value is not None else "-" for value in theirs.values())))
        ratio_lines.append(_row(f"  {key} {unit}", "",
                                *(f"{ratio:.2f}x" if ratio is not None else "-" for ratio in ratios.values()))
                           + (f"   celery >= {TARGET_RATIO:.1f}  {_mark(ok)}" if gate else ""))
        summary[f"{key}_{metric}_ratio"] = ratios["celery"]
        summary.update({f"{key}_{metric}_ratio_{name}": ratio for name, ratio in ratios.items() if name != "celery"})

    if "noop" in sb:
        throughput("noop", f"no-op, {sb['noop']['tasks']:,} tasks", "tasks_per_s", "tasks/s", True)
    if "dag" in sb:
        label = f"DAG a->(b1..b4)->c, {sb['dag']['workflows']:,} wf"
        throughput("dag", label, "tasks_per_s", "tasks/s", True)
        throughput("dag", label, "workflows_per_s", "wf/s", False)
    lines += ratio_lines
    lines.append("dramatiq: as shipped, its publisher does not wait for RabbitMQ's confirms;")
    lines.append("+confirms: dramatiq with confirm_delivery=True, as Switchboard confirms every message")
    if "latency" in sb:
        lat = sb["latency"]
        lines.append("")
        lines.append(f"submit-to-start latency at a steady {lat['rate_per_s']:.0f} tasks/s "
                     f"({lat['tasks']:,} tasks, achieved {lat['achieved_rate_per_s']}/s):")
        for q, target in (("p50_ms", TARGET_P50_MS), ("p99_ms", TARGET_P99_MS)):
            ok = lat[q] <= target
            theirs = [results.get("latency", {}).get(q) for results in theirs_all.values()]
            lines.append(_row(f"  {q[:3]}", f"{lat[q]:.2f} ms",
                              *(f"{value:.2f} ms" if value is not None else "-" for value in theirs))
                         + f"   <= {target:.0f} ms  {_mark(ok)}")
            summary[f"latency_{q}_pass"] = ok
        lines.append(f"  {'(p90 / max)':<42}{lat['p90_ms']:>10.2f} / {lat['max_ms']:.2f} ms")
        for stage, (p50, p99) in lat["stages_p50_p99_ms"].items():
            lines.append(f"  {'stage ' + stage + ' p50 / p99':<42}{p50:>10.2f} / {p99:.2f} ms")
    if "stream" in sb:
        st = sb["stream"]
        lines.append("")
        lines.append(f"streaming, one task sending {st['chunks']:,} chunks at {st['rate_per_s']:,.0f}/s through "
                     f"GET /v1/workflows/{{id}}/events (Switchboard only; host load {st['host_load_1m']:.1f} "
                     f"on {os.cpu_count()} CPUs):")
        lines.append(f"  {'chunks received / missing / duplicated':<42}{st['received']:>10,} / {st['missing']} / "
                     f"{st['duplicates']}")
        lines.append(f"  {'chunks/s received':<42}{st['received_per_s'] or 0:>10,.1f}")
        lines.append(f"  {'SSE chunk events (chunks per event)':<42}{st['chunk_events']:>10,} "
                     f"({st['chunks_per_event']})")
        ok = st["p99_ms"] <= TARGET_STREAM_P99_MS
        lines.append(f"  {'send-to-reader p50 / p95 / p99':<42}{st['p50_ms']:>10.2f} / {st['p95_ms']:.2f} / "
                     f"{st['p99_ms']:.2f} ms   p99 <= {TARGET_STREAM_P99_MS:.0f} ms  {_mark(ok)}")
        lines.append(f"  {'(max)':<42}{st['max_ms']:>10.2f} ms")
        for stage, (p50, p99) in st.get("stages_p50_p99_ms", {}).items():
            what = {"recorded": "send -> recorded", "delivered": "recorded -> reader"}[stage]
            lines.append(f"  {'stage ' + what + ' p50 / p99':<42}{p50:>10.2f} / {p99:.2f} ms")
        if st.get("late_sends"):
            lines.append(f"  {'sends > 5 ms behind schedule (agent busy)':<42}{st['late_sends']:>10,}")
        summary["stream_p99_pass"] = ok
    lines.append("")
    lines.append(f"peak memory (RSS), target < {TARGET_RSS_MB:.0f} MB per service:")
    all_ok = True
    for name, mb in sb["peak_rss_mb"].items():
        ok = mb < TARGET_RSS_MB
        all_ok &= ok
        lines.append(f"  {name:<42}{mb:>10.1f} MB   {_mark(ok)}")
    summary["memory_pass"] = all_ok
    for phase, peaks in sb.get("peak_rss_mb_by_workload", {}).items():
        lines.append(f"  during {phase:<8} " + ", ".join(f"{n} {v:.0f}" for n, v in peaks.items()))
    for key, results in theirs_all.items():
        for name, mb in results.get("peak_rss_mb", {}).items():
            lines.append(f"  {key.replace('_', '+') + ' ' + name:<42}{mb:>10.1f} MB")
    lines.append("")
    lines.append("CPU seconds per process (user + system) during each workload:")
    for key in ("noop", "dag", "latency", "stream"):
        if key in sb and "cpu_seconds" in sb[key]:
            cpu = sb[key]["cpu_seconds"]
            lines.append(f"  {key:<8} " + ", ".join(f"{n} {v:.1f}" for n, v in cpu.items()))
    totals = {"switchboard": {}}
    for key in ("noop", "dag", "latency"):
        for name, value in sb.get(key, {}).get("cpu_seconds", {}).items():
            totals["switchboard"][name] = totals["switchboard"].get(name, 0.0) + value
    totals |= {key: results["cpu_seconds_all_workloads"] for key, results in theirs_all.items()
               if "cpu_seconds_all_workloads" in results}
    tasks = sum(sb[key]["tasks"] for key in ("noop", "dag", "latency") if key in sb)
    if len(totals) > 1 and tasks:
        lines.append(f"  all three workloads ({tasks:,} tasks), CPU-s in total (of which rabbitmq, redis) "
                     "and CPU-ms per task; the baselines' include their worker's start-up:")
        summary["cpu_ms_per_task"] = {}
        for key, cpu in totals.items():
            per_task = summary["cpu_ms_per_task"][key] = round(sum(cpu.values()) * 1000 / tasks, 2)
            lines.append(f"    {key.replace('_', '+'):<38}{sum(cpu.values()):>10.1f} CPU-s "
                         f"({cpu.get('rabbitmq', 0):.1f}, {cpu.get('redis', 0):.1f})  {per_task:.2f} ms/task")
    cfg = sb["config"]
    lines.append("")
    lines.append(f"config: agent concurrency (= prefetch) {cfg['agent_concurrency']}, {cfg['batch']} workflows "
                 f"per batch request, {cfg['parallel_requests']} requests in parallel, store {cfg['store']}")
    for key, flag in (("celery", "--skip-celery"), ("dramatiq", "--skip-dramatiq")):
        if baselines.get(key) is None:
            lines.append(f"{key}: skipped ({flag})")
    print("\n".join(lines), flush=True)
    return {"rows": rows, "summary": summary}


def run_round(args) -> tuple[dict, dict]:
    """Switchboard, then each baseline not skipped: (Switchboard's results, each baseline's or None)."""
    sb = run_switchboard(args)
    baselines = dict.fromkeys(BASELINES)
    if not args.skip_celery:
        log("Celery 5 baseline (prefork, 2 processes, Redis result backend)")
        baselines["celery"] = run_baseline(args, "celery_baseline")
        log(f"celery: {baselines['celery']}")
    if not args.skip_dramatiq:
        for key, confirms in (("dramatiq", False), ("dramatiq_confirms", True)):
            log(f"Dramatiq baseline (2 processes x 8 threads, Redis results), confirm_delivery={confirms}")
            baselines[key] = run_baseline(args, "dramatiq_baseline", confirms=confirms)
            log(f"{key}: {baselines[key]}")
    return sb, baselines


def median_of(results: list):
    """The results of several rounds as one: each number the median of its values, leaf by leaf (a
    list or tuple of numbers element by element); anything else as the first round has it."""
    first = results[0]
    if isinstance(first, bool) or first is None or isinstance(first, str):
        return first
    if isinstance(first, (int, float)):
        values = [r for r in results if isinstance(r, (int, float))]
        median = statistics.median(values)
        return round(median) if isinstance(first, int) else round(median, 3)
    if isinstance(first, dict):
        return {key: median_of([r[key] for r in results if isinstance(r, dict) and key in r]) for key in first}
    if isinstance(first, (list, tuple)) and all(isinstance(r, (list, tuple)) and len(r) == len(first) for r in results):
        return type(first)(median_of([r[i] for r in results]) for i in range(len(first)))
    return first


def report_rounds(rounds: list[tuple[dict, dict]]) -> dict:
    """Each round's throughput ratios, and their medians: the host's speed drifts between rounds, so
    a round's ratio compares systems measured minutes apart at most."""
    ratios: dict[str, list[float]] = {}
    lines = ["", "throughput ratio switchboard / baseline, round by round (then their median):"]
    for key, label in (("noop", "no-op"), ("dag", "DAG")):
        for name in BASELINES:
            values = [round(mine[key]["tasks_per_s"] / theirs[name][key]["tasks_per_s"], 2)
                      for mine, theirs in rounds
                      if key in mine and theirs.get(name) and theirs[name].get(key, {}).get("tasks_per_s")]
            if values:
                ratios[f"{key}_{name}"] = values
                lines.append(_row(f"  {label} vs {name.replace('_', '+')}", *(f"{v:.2f}x" for v in values))
                             + f"   median {statistics.median(values):.2f}x")
    print("\n".join(lines), flush=True)
    return {"ratios": ratios, "median": {k: statistics.median(v) for k, v in ratios.items()}}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noop", type=int, default=10_000, help="no-op tasks (one-task workflows)")
    parser.add_argument("--workflows", type=int, default=1_000, help="DAG workflows a -> (b1..b4) -> c")
    parser.add_argument("--latency-tasks", type=int, default=2_000, help="tasks submitted at 200/s")
    parser.add_argument("--stream-chunks", type=int, default=5_000,
                        help=f"chunks one task streams at {STREAM_RATE:.0f}/s to an SSE reader (0: skip)")
    parser.add_argument("--skip-celery", action="store_true", help="do not run the Celery baseline")
    parser.add_argument("--skip-dramatiq", action="store_true", help="do not run the two Dramatiq baselines")
    parser.add_argument("--agent-concurrency", type=int,
                        default=int(os.environ.get("BENCH_AGENT_CONCURRENCY", "16")),
                        help="SWITCHBOARD_AGENT_CONCURRENCY of the bench agent (its prefetch too)")
    parser.add_argument("--batch", type=int, default=int(os.environ.get("BENCH_BATCH", "1000")),
                        help="workflows per POST /v1/workflows/batch (<= 1000)")
    parser.add_argument("--parallel", type=int, default=int(os.environ.get("BENCH_PARALLEL", "4")),
                        help="batch requests in flight at once")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run Switchboard and every baseline this many times, one after the other, and "
                             "report the medians and each round's ratios (the host's speed drifts)")
    parser.add_argument("--log-level", default="WARNING", help="SWITCHBOARD_LOG_LEVEL of the processes")
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--dump-latency", type=Path, help="write every latency task's timings to this CSV")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON, help="where to write the results")
    scale = parser.add_argument_group("scale and footprint (bench/scale.py): instead of the workloads above and "
                                      "the baselines; results.json gets 'scale' / 'footprint', the rest is kept")
    scale.add_argument("--scale", action="store_true", help="backlog, fan-out and chain workloads")
    scale.add_argument("--scale-backlog", type=int, default=100_000, help="LOW tasks queued before one CRITICAL")
    scale.add_argument("--scale-fanout", type=int, default=10_000, help="children of the fan-out workflow")
    scale.add_argument("--scale-chain", type=int, default=1_000, help="tasks of the chain workflow")
    scale.add_argument("--footprint", action="store_true",
                       help="store transactions, keys, bytes, messages and CPU per task, from counters")
    scale.add_argument("--footprint-noop", type=int, default=2_000, help="no-op workflows measured")
    scale.add_argument("--footprint-dag", type=int, default=400, help="DAG workflows measured")
    scale.add_argument("--footprint-batch", type=int, default=1, help="workflows per request (1: POST /v1/workflows)")
    scale.add_argument("--footprint-store-options", default="max_value_bytes=90000",
                       help="the footprint store's url options (default: chunk values as on FoundationDB; '': plain)")
    scale.add_argument("--rabbitmq-api", default=os.environ.get("RABBITMQ_API", "http://guest:guest@127.0.0.1:15672"),
                       help="RabbitMQ's management API, for the bytes of each process's connections")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 1000 or not 1 <= args.footprint_batch <= 1000:
        parser.error("--batch and --footprint-batch must be between 1 and 1000")

    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, so the platform is stopped and cleaned up.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.scale or args.footprint:
        sys.modules.setdefault("run", sys.modules[__name__])  # bench/scale.py imports this module as `run`
        import scale

        return scale.main(args)
    began = time.monotonic()
    log(f"Switchboard: {args.noop} no-op tasks, {args.workflows} DAG workflows, "
        f"{args.latency_tasks} latency tasks at {LATENCY_RATE:.0f}/s, "
        f"{args.stream_chunks} streamed chunks at {STREAM_RATE:.0f}/s")
    rounds: list[tuple[dict, dict]] = []
    failed = False
    try:
        for n in range(args.rounds):
            if args.rounds > 1:
                log(f"round {n + 1} of {args.rounds}")
            try:
                sb, baselines = run_round(args)
            except Exception:
                if not rounds:
                    raise
                log(f"round {n + 1} failed; reporting the {len(rounds)} that finished:\n{traceback.format_exc()}")
                failed = True
                break
            rounds.append((sb, baselines))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    sb = median_of([mine for mine, _ in rounds])
    baselines = {key: None if any(theirs[key] is None for _, theirs in rounds)
                 else median_of([theirs[key] for _, theirs in rounds]) for key in BASELINES}
    table = report(sb, baselines, args)
    if args.rounds > 1:
        table["rounds"] = report_rounds(rounds)
    wall = round(time.monotonic() - began, 1)
    print(f"\ntotal wall time {wall} s; results in {args.json}", flush=True)
    data = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host_cpus": os.cpu_count(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "targets": {"ratio": TARGET_RATIO, "p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS,
                        "rss_mb": TARGET_RSS_MB, "stream_p99_ms": TARGET_STREAM_P99_MS},
            "switchboard": sb, **baselines, "table": table, "wall_seconds": wall,
            "rounds": [{"switchboard": mine, **theirs} for mine, theirs in rounds] if args.rounds > 1 else None}
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
