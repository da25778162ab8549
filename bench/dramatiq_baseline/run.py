"""Dramatiq baseline for the Switchboard benchmark.

Dramatiq on the same RabbitMQ (2 worker processes x 8 threads, Redis results backend, group callbacks
on a Redis barrier), running the same no-op task and the same DAG a -> (b1..b4) -> c: a is an actor
that runs dramatiq.group([b1..b4]) with c as its completion callback. Dramatiq's publisher does not
wait for RabbitMQ's confirms unless the broker has confirm_delivery=True (--confirms): Switchboard
waits for them on every message.

    python bench/dramatiq_baseline/run.py [--noop N] [--workflows N] [--latency-tasks N] [--confirms]

or, from Python: ``run_all()`` returns a dict of results. Each run has queues of its own
("bench-dramatiq-<pid>[-confirms]", with their .DQ and .XQ), deleted at the end with its result keys
(Redis DB 13); the group barriers' keys expire after 10 minutes.
"""
import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES, THREADS = 2, 8
TIMEOUT_MS = 600_000  # for each result
LATENCY_RATE = 200.0  # tasks/s for the latency workload


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The bench's own helpers (RSS sampling), and no clash with a caller's "run" or "tasks" module.
bench = _load("bench_dramatiq_baseline_bench", os.path.join(os.path.dirname(HERE), "run.py"))


# --------------------------------------------------------------------------- #
# worker processes
# --------------------------------------------------------------------------- #
def children(pid):
    """The pids whose parent is ``pid``, via /proc."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(found)


def start_worker(env, log_file):
    cmd = [sys.executable, "-m", "dramatiq", "tasks", "--processes", str(PROCESSES), "--threads", str(THREADS),
           "--queues", env["BENCH_DRAMATIQ_QUEUE"], "--log-file", log_file]
    return subprocess.Popen(cmd, cwd=HERE, env=dict(os.environ, **env), stdout=subprocess.DEVNULL)


def wait_ready(proc, tasks, deadline_s=60.0):
    """Until every worker process consumes the queue; returns the worker processes' pids."""
    tasks.broker.declare_queue(tasks.QUEUE, ensure=True)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dramatiq worker exited early (rc={proc.returncode})")
        declared = tasks.broker.channel.queue_declare(tasks.QUEUE, passive=True)
        if declared.method.consumer_count >= PROCESSES:
            return children(proc.pid)
        time.sleep(0.1)
    raise RuntimeError(f"{PROCESSES} dramatiq worker processes did not consume {tasks.QUEUE} before the deadline")


def stop_worker(proc, workers, timeout=60.0):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the main process passes it on; workers finish what they hold
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *workers]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()


def delete_queues(tasks):
    channel = tasks.broker.channel
    for name in (tasks.QUEUE, tasks.QUEUE + ".DQ", tasks.QUEUE + ".XQ"):
        channel.queue_delete(name)
    client = tasks.results.client
    keys = list(client.scan_iter(match=f"{tasks.QUEUE}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])
    tasks.broker.close()


def wait_all(tasks, messages):
    return [tasks.results.get_result(m, block=True, timeout=TIMEOUT_MS) for m in messages]


# --------------------------------------------------------------------------- #
# workloads
# --------------------------------------------------------------------------- #
def bench_noop(tasks, n):
    t0 = time.perf_counter()
    messages = [tasks.noop.send() for _ in range(n)]
    wait_all(tasks, messages)
    s = time.perf_counter() - t0
    return {"tasks": n, "seconds": round(s, 3), "tasks_per_s": round(n / s, 1)}


def bench_dag(tasks, workflows):
    """a -> (b1..b4) -> c: a runs the group; its completion callback c is made here, to wait on."""
    t0 = time.perf_counter()
    finals = []
    for _ in range(workflows):
        c = tasks.noop.message()
        tasks.fan_out.send(c.asdict())
        finals.append(c)
    wait_all(tasks, finals)
    s = time.perf_counter() - t0
    n = workflows * 6
    return {"workflows": workflows, "tasks": n, "seconds": round(s, 3),
            "tasks_per_s": round(n / s, 1), "workflows_per_s": round(workflows / s, 1)}


def bench_latency(tasks, n, rate=LATENCY_RATE):
    submitted, messages = [], []
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()  # pacing, not synchronisation
        if delay > 0:
            time.sleep(delay)
        ts = time.time()
        messages.append(tasks.started_at.send(ts))
        submitted.append(ts)
    starts = wait_all(tasks, messages)
    lat_ms = sorted((st - sub) * 1000.0 for st, sub in zip(starts, submitted))
    q = statistics.quantiles(lat_ms, n=100, method="inclusive")
    return {"tasks": n, "rate_per_s": rate,
            "p50_ms": round(statistics.median(lat_ms), 2), "p99_ms": round(q[98], 2)}


def run_all(noop_tasks=10_000, workflows=1_000, latency_tasks=2_000, confirms=False):
    queue = f"bench-dramatiq-{os.getpid()}" + ("-confirms" if confirms else "")
    env = {"BENCH_DRAMATIQ_QUEUE": queue, "BENCH_DRAMATIQ_CONFIRM": "1" if confirms else ""}
    os.environ.update(env)  # this process's broker publishes as the worker's does
    tasks = _load(f"bench_dramatiq_baseline_tasks_{queue.replace('-', '_')}", os.path.join(HERE, "tasks.py"))
    log_dir = tempfile.mkdtemp(prefix=f"{queue}-")
    log_file = os.path.join(log_dir, "worker.log")
    proc, workers, sampler, ok = start_worker(env, log_file), [], None, False
    try:
        workers = wait_ready(proc, tasks)
        sampler = bench.RssSampler({"main process": proc.pid}
                                   | {f"worker process {i}": pid for i, pid in enumerate(workers, 1)})
        sampler.start()
        wait_all(tasks, [tasks.noop.send() for _ in range(50)])  # warm-up: connections, channels
        out = {
            "noop": bench_noop(tasks, noop_tasks),
            "dag": bench_dag(tasks, workflows),
            "latency": bench_latency(tasks, latency_tasks),
        }
        ok = True
    finally:
        if sampler is not None:
            sampler.stop()
        stop_worker(proc, workers)
        delete_queues(tasks)
        with open(log_file, errors="replace") as f:
            worse = [line.rstrip() for line in f if not ok or "[INFO]" not in line]
        if worse:
            print(f"dramatiq worker log ({'tail' if not ok else 'warnings'}):\n  " + "\n  ".join(worse[-20:]),
                  file=sys.stderr)
        os.remove(log_file)
        os.rmdir(log_dir)
    out["peak_rss_mb"] = sampler.peaks_mb()
    out["config"] = {"processes": PROCESSES, "threads": THREADS, "confirm_delivery": confirms}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noop", type=int, default=10_000)
    ap.add_argument("--workflows", type=int, default=1_000)
    ap.add_argument("--latency-tasks", type=int, default=2_000)
    ap.add_argument("--confirms", action="store_true", help="confirm_delivery=True on the RabbitmqBroker")
    a = ap.parse_args()
    t = time.perf_counter()
    res = run_all(a.noop, a.workflows, a.latency_tasks, a.confirms)
    print(f"noop:    {res['noop']['tasks']} tasks in {res['noop']['seconds']} s "
          f"-> {res['noop']['tasks_per_s']} tasks/s")
    d = res["dag"]
    print(f"dag:     {d['workflows']} workflows ({d['tasks']} tasks) in {d['seconds']} s "
          f"-> {d['tasks_per_s']} tasks/s, {d['workflows_per_s']} workflows/s")
    lat = res["latency"]
    print(f"latency: {lat['tasks']} tasks at {lat['rate_per_s']:.0f}/s "
          f"-> p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms")
    print(f"peak RSS: {res['peak_rss_mb']} MB")
    print(json.dumps(res))
    print(f"total wall time: {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
