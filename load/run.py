"""Switchboard's load tests (`make load`): locust, headless, against the REST API of a running platform.

    python load/run.py                                          # mix, poll and burst, one after another
    python load/run.py --scenario mix --users 20 --duration 60s
    python load/run.py --scenario soak --duration 30m          # prints each service's memory over time
    python load/run.py --scenario mix,poll,burst --url http://127.0.0.1:8000 --capability echo

Scenarios (the user classes are in load/locustfile.py):
  mix    single tasks (POST /v1/tasks), DAGs a -> (b1..b3) -> c and 100-wide fan-outs (POST /v1/workflows)
  poll   clients that submit a DAG, then poll GET /v1/workflows/{id}, or long-poll it with ?wait=10
  burst  every user at once, submitting tasks and DAGs back to back
  soak   mix and poll together at a steadier pace, 30 minutes unless --duration says otherwise

Without --url it starts its own platform: bench/run.py's (the six services and bench/noop_agent.py,
serving "noop", as processes, in a namespace, SQLite store and ports of their own), with the api's
per-token rate limit off, and deletes its queues and keys afterwards. With --url it targets a running
one; its agents must serve --capability (`switchboard run`'s example agents serve "echo").

Locust runs as a process of its own (it patches the standard library with gevent). For each scenario
this writes var/load/<scenario>/: locust's report.html and locust_*.csv, stats.json (locust's final
statistics), workflow_ids.txt and summary.json; and prints per endpoint the requests, failures,
p50/p95/p99 and requests/s, each service's RSS over time (sampled from its /metrics) with the growth
after warm-up, and whether every workflow the load created succeeded (asked through the API).
Exits 1 if any request failed or any workflow was lost or did not succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

LOAD = Path(__file__).resolve().parent
ROOT = LOAD.parent
sys.path.insert(0, str(LOAD))

import memory  # noqa: E402  (load/ is a folder of scripts, not a package)
import settle  # noqa: E402
import stats  # noqa: E402

# name: (locust user class, seconds each user waits between its tasks "lo,hi", default duration s)
SCENARIOS = {
    "mix": ("MixUser", "0.5,1.5", 60),
    "poll": ("PollUser", "0.5,1.5", 60),
    "burst": ("BurstUser", "0,0", 10),
    "soak": ("SoakUser", "1,3", 30 * 60),
}
# The services' default health/metrics ports, as `switchboard run` serves them (the api's is its own).
DEFAULT_PORTS = {"coordinator": 8101, "dispatcher": 8102, "registry": 8103, "aggregator": 8104,
                 "dlq_replayer": 8105, "agents": 8110}


def log(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seconds(text: str) -> float:
    """'90', '90s', '30m', '1h30m' -> seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h30m)")
    h, m, s = match.groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0)


# ---------------------------------------------------------------------------------------------------
# the platform
# ---------------------------------------------------------------------------------------------------
def _bench():
    """bench/run.py, a script, imported by path: its Platform starts the services and the no-op agent."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def own_platform(args):
    bench = _bench()

    class LoadPlatform(bench.Platform):
        """bench's platform without the api's per-token rate limit, which a load test would only hit."""

        def _env(self, name: str) -> dict[str, str]:
            return {**super()._env(name), "SWITCHBOARD_API_RATE_PER_S": "0"}

    platform = LoadPlatform(amqp_url=args.amqp_url, redis_url=args.redis_url,
                            agent_concurrency=args.agent_concurrency, log_level=args.log_level)
    platform.namespace = f"load{os.getpid()}"
    targets = {name: platform.health_url(name) for name in (*bench.SERVICES, "agent")}
    return platform, targets


async def _wait_ready(platform) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        await platform.wait_ready(client, timeout=90)


def metrics_targets(url: str, spec: str | None) -> dict[str, str]:
    """--metrics "name=http://host:port,..."; by default the api's own and the default ports on its host."""
    if spec:
        return dict(item.split("=", 1) for item in spec.split(",") if item)
    host = urlsplit(url).hostname
    return {"api": url.rstrip("/"), **{n: f"http://{host}:{p}" for n, p in DEFAULT_PORTS.items()}}


# ---------------------------------------------------------------------------------------------------
# one scenario
# ---------------------------------------------------------------------------------------------------
def run_locust(scenario: str, args, url: str, duration: float, out: Path) -> int:
    user_class, wait, _ = SCENARIOS[scenario]
    env = {**os.environ, "LOAD_CAPABILITY": args.capability, "LOAD_IDS": str(out / "workflow_ids.txt"),
           "LOAD_STATS": str(out / "stats.json"), "LOAD_TOKEN": args.token, "LOAD_WAIT": wait, "LOAD_FANOUT": str(args.fanout)}
    spawn_rate = args.spawn_rate or args.users  # every user within a second
    cmd = [sys.executable, "-m", "locust", "-f", str(LOAD / "locustfile.py"), "--headless", "--host", url,
           "--users", str(args.users), "--spawn-rate", str(spawn_rate), "--run-time", f"{duration:g}s",
           "--stop-timeout", "15", "--csv", str(out / "locust"), "--html", str(out / "report.html"),
           "--only-summary", "--loglevel", "WARNING", user_class]
    with (out / "locust.log").open("wb") as output:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            return proc.wait(timeout=duration + 90)
        except subprocess.TimeoutExpired:
            log(f"locust did not stop within {duration + 90:.0f}s; killing it")
            return -1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_scenario(scenario: str, args, url: str, targets: dict[str, str], platform) -> dict:
    duration = args.duration if args.duration is not None else SCENARIOS[scenario][2]
    out = args.out / scenario
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log(f"scenario {scenario}: {args.users} users, {duration:g}s, capability {args.capability!r}, api {url}")
    period = args.sample_every or min(30.0, max(1.0, duration / 60))
    sampler = memory.MemorySampler(targets, period)
    sampler.start()
    began = time.monotonic()
    try:
        code = run_locust(scenario, args, url, duration, out)
    finally:
        samples = sampler.stop()
    load_s = time.monotonic() - began
    result = stats.read(out / "stats.json")
    log(f"locust exited with {code} after {load_s:.1f}s; checking every workflow it created")
    ids = settle.read_ids(out / "workflow_ids.txt")
    workflows = asyncio.run(settle.check(url, ids, timeout=args.settle, token=args.token))
    if platform is not None:
        platform.check_alive()
    total = result["total"]
    summary = {
        "scenario": scenario, "users": args.users, "duration_s": duration, "capability": args.capability,
        "locust_exit_code": code, "requests": total["requests"], "failures": total["failures"],
        "exceptions": sum(e["count"] for e in result["exceptions"]), "rps": total["rps"],
        "endpoints": result["endpoints"], "total": total, "failure_messages": result["failures"],
        **workflows, "tasks_per_s_submitted": round(workflows["tasks"] / duration, 1) if duration else None,
        "memory": memory.growth(samples, duration),
        "memory_samples": [{"t": round(t, 1), **v} for t, v in samples],
        "report": str(out / "report.html"),
    }
    summary["ok"] = (code in (0, 1) and summary["requests"] > 0 and summary["failures"] == 0
                     and summary["exceptions"] == 0 and workflows["lost"] == 0
                     and workflows["succeeded"] == workflows["workflows"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, result, samples, out)
    if summary["requests"] == 0 or code not in (0, 1):
        tail = (out / "locust.log").read_text(errors="replace").splitlines()[-20:]
        print("locust's output (last lines):\n" + "\n".join("    " + line for line in tail), flush=True)
    return summary


def print_summary(summary: dict, result: dict, samples, out: Path) -> None:
    s = summary
    lines = ["", f"== {s['scenario']}: {s['users']} users for {s['duration_s']:g}s, capability {s['capability']!r}",
             stats.table(result), "",
             f"throughput: {s['rps'] or 0:.1f} requests/s; {s['workflows']:,} workflows accepted "
             f"({s['tasks']:,} tasks, {s['tasks_per_s_submitted'] or 0:.1f} tasks/s submitted)"]
    if s["lost"] or s["succeeded"] != s["workflows"]:
        lines.append(f"workflows: {s['succeeded']:,} of {s['workflows']:,} succeeded; LOST (not terminal after "
                     f"{s['drained_s']:.0f}s): {s['lost']}, e.g. {s['lost_ids']}; other statuses: {s['not_succeeded']}")
    else:
        lines.append(f"workflows: all {s['workflows']:,} succeeded, none lost "
                     f"(all checked through the API {s['drained_s']:.1f}s after the load stopped)")
    if s["scenario"] == "soak":
        lines += ["", memory.table(samples, s["duration_s"])]
    else:
        peaks = ", ".join(f"{n} {g['peak_mb']:.0f}" for n, g in s["memory"].items() if g)
        lines.append(f"peak RSS (MB): {peaks or 'no /metrics answered'}")
    lines.append(f"report: {out / 'report.html'}; CSVs: {out}/locust_*.csv; summary: {out / 'summary.json'}")
    lines.append(f"result: {'PASS' if s['ok'] else 'FAIL'}")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="mix,poll,burst",
                        help=f"one of {', '.join(SCENARIOS)}, several separated by commas, or 'all' "
                             "(default: mix,poll,burst)")
    parser.add_argument("--users", type=int, default=20, help="concurrent locust users")
    parser.add_argument("--spawn-rate", type=float, help="users started a second (default: all in one second)")
    parser.add_argument("--duration", type=seconds,
                        help="of each scenario: 90s, 30m, 1h (default: 60s, burst 10s, soak 30m)")
    parser.add_argument("--url", help="the REST API of a running platform (default: start one)")
    parser.add_argument("--metrics", help="name=base URL,... of each process's /metrics (with --url; default: "
                                          "the api and the default service ports on its host)")
    parser.add_argument("--capability", help="capability of every task (default: noop; echo with --url)")
    parser.add_argument("--fanout", type=int, default=100, help="width of the fan-out workflows")
    parser.add_argument("--token", default=os.environ.get("SWITCHBOARD_TOKEN", ""), help="bearer token")
    parser.add_argument("--settle", type=seconds, default=120.0,
                        help="how long, after the load, every workflow has to finish")
    parser.add_argument("--sample-every", type=seconds, help="memory sampling period (default: duration/60, 1-30s)")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "load", help="reports go to OUT/<scenario>/")
    parser.add_argument("--agent-concurrency", type=int, default=16, help="of the no-op agent (own platform)")
    parser.add_argument("--log-level", default="WARNING", help="of the processes (own platform)")
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args(argv)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [s for s in args.scenario.split(",") if s]
    if unknown := [s for s in scenarios if s not in SCENARIOS]:
        parser.error(f"unknown scenario {unknown}: choose from {', '.join(SCENARIOS)}")
    if args.capability is None:
        args.capability = "echo" if args.url else "noop"

    # SIGTERM (from make or CI) unwinds like Ctrl-C, so that the platform is stopped and cleaned up.
    signal.signal(signal.SIGTERM, _interrupt)
    platform, summaries, ok = None, [], False
    try:
        if args.url:
            url, targets = args.url.rstrip("/"), metrics_targets(args.url.rstrip("/"), args.metrics)
        else:
            platform, targets = own_platform(args)
            platform.start()
            asyncio.run(_wait_ready(platform))
            url = platform.api_url
        for scenario in scenarios:
            summaries.append(run_scenario(scenario, args, url, targets, platform))
        ok = all(s["ok"] for s in summaries)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if platform is not None:
            log("stopping the platform")
            platform.stop()
            asyncio.run(platform.cleanup(keep_logs=not ok))
    print("\n" + "  ".join(f"{s['scenario']}: {'PASS' if s['ok'] else 'FAIL'}" for s in summaries), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
