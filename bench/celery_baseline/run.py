"""Celery 5 baseline for the Switchboard benchmark.

Celery on the same RabbitMQ (prefork, 2 processes, Redis result backend),
running the same no-op task and the same DAG a -> (b1..b4) -> c as
chain(a, chord([b1..b4], c)).

    python bench/celery_baseline/run.py [--noop N] [--workflows N] [--latency-tasks N]

or, from Python: ``run_all()`` returns a dict of results.
"""
import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

from celery import chain, chord
from celery.result import ResultSet

HERE = os.path.dirname(os.path.abspath(__file__))

# Load tasks.py under a unique name so a caller's own "tasks" module can't clash.
_spec = importlib.util.spec_from_file_location("bench_celery_baseline_tasks",
                                               os.path.join(HERE, "tasks.py"))
tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tasks)
app, noop, started_at, QUEUE = tasks.app, tasks.noop, tasks.started_at, tasks.QUEUE

POLL_INTERVAL = 0.05  # result-backend poll interval for join_native (s)
LATENCY_RATE = 200.0  # tasks/s for the latency workload


# --------------------------------------------------------------------------- #
# worker process + RSS sampling
# --------------------------------------------------------------------------- #
def _rss_tree_kb(root):
    """Sum VmRSS (kB) of ``root`` and all its descendants, via /proc."""
    parent_of = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                parent_of[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for pid, ppid in parent_of.items():
            if ppid == p and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid, period=0.1):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak_kb = pid, period, 0
        self._stop_evt = threading.Event()

    def run(self):
        while not self._stop_evt.is_set():
            self.peak_kb = max(self.peak_kb, _rss_tree_kb(self.pid))
            self._stop_evt.wait(self.period)

    def stop(self):
        self._stop_evt.set()
        self.join()


def start_worker():
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "celery", "-A", "tasks", "worker",
           "--pool", "prefork", "--concurrency", "2", "-Q", QUEUE,
           "--without-gossip", "--without-mingle", "--without-heartbeat",
           "-l", "warning", "-n", f"bench-celery-{os.getpid()}@%h"]
    return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL)  # hide banner


def wait_ready(proc, deadline_s=60.0):
    """Ping until our worker answers (or fail at the deadline)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery worker exited early (rc={proc.returncode})")
        replies = app.control.ping(timeout=0.5) or []
        if any(name.startswith(f"bench-celery-{os.getpid()}@") for r in replies for name in r):
            return
    raise RuntimeError("celery worker did not answer ping before the deadline")


def stop_worker(proc, timeout=60.0):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def purge_queue():
    with app.connection_for_write() as conn:
        conn.default_channel.queue_declare(QUEUE, durable=True, passive=True)
        conn.default_channel.queue_purge(QUEUE)


def wait_all(results):
    ResultSet(results).join_native(interval=POLL_INTERVAL, timeout=600)


# --------------------------------------------------------------------------- #
# workloads
# --------------------------------------------------------------------------- #
def bench_noop(n):
    t0 = time.perf_counter()
    results = [noop.apply_async() for _ in range(n)]
    wait_all(results)
    s = time.perf_counter() - t0
    return {"tasks": n, "seconds": round(s, 3), "tasks_per_s": round(n / s, 1)}


def dag_signature():
    """a -> (b1..b4) -> c"""
    return chain(noop.s(), chord([noop.s() for _ in range(4)], noop.s()))


def bench_dag(workflows):
    t0 = time.perf_counter()
    finals = [dag_signature().apply_async() for _ in range(workflows)]
    wait_all(finals)  # the AsyncResult of a chain is that of its last task (c)
    s = time.perf_counter() - t0
    n = workflows * 6
    return {"workflows": workflows, "tasks": n, "seconds": round(s, 3),
            "tasks_per_s": round(n / s, 1), "workflows_per_s": round(workflows / s, 1)}


def bench_latency(n, rate=LATENCY_RATE):
    submitted, results = [], []
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()  # pacing, not synchronisation
        if delay > 0:
            time.sleep(delay)
        ts = time.time()
        results.append(started_at.apply_async((ts,)))
        submitted.append(ts)
    starts = ResultSet(results).join_native(interval=POLL_INTERVAL, timeout=600)
    lat_ms = sorted((st - sub) * 1000.0 for st, sub in zip(starts, submitted))
    q = statistics.quantiles(lat_ms, n=100, method="inclusive")
    return {"tasks": n, "rate_per_s": rate,
            "p50_ms": round(statistics.median(lat_ms), 2), "p99_ms": round(q[98], 2)}


def run_all(noop_tasks=10_000, workflows=1_000, latency_tasks=2_000):
    proc = start_worker()
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        wait_ready(proc)
        purge_queue()
        wait_all([noop.apply_async() for _ in range(50)])  # warm-up: pool children, connections
        out = {
            "noop": bench_noop(noop_tasks),
            "dag": bench_dag(workflows),
            "latency": bench_latency(latency_tasks),
        }
    finally:
        stop_worker(proc)
        sampler.stop()
    out["peak_rss_mb"] = {"worker (parent + pool children)": round(sampler.peak_kb / 1024.0, 1)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noop", type=int, default=10_000)
    ap.add_argument("--workflows", type=int, default=1_000)
    ap.add_argument("--latency-tasks", type=int, default=2_000)
    a = ap.parse_args()
    t = time.perf_counter()
    res = run_all(a.noop, a.workflows, a.latency_tasks)
    print(f"noop:    {res['noop']['tasks']} tasks in {res['noop']['seconds']} s "
          f"-> {res['noop']['tasks_per_s']} tasks/s")
    d = res["dag"]
    print(f"dag:     {d['workflows']} workflows ({d['tasks']} tasks) in {d['seconds']} s "
          f"-> {d['tasks_per_s']} tasks/s, {d['workflows_per_s']} workflows/s")
    lat = res["latency"]
    print(f"latency: {lat['tasks']} tasks at {lat['rate_per_s']:.0f}/s "
          f"-> p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms")
    print(f"peak RSS (worker parent + children): {res['peak_rss_mb']['worker (parent + pool children)']} MB")
    print(json.dumps(res))
    print(f"total wall time: {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
