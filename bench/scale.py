"""The scale workloads (`--scale`) and the per-task footprint (`--footprint`) of bench/run.py.

    python bench/run.py --scale [--scale-backlog N] [--scale-fanout N] [--scale-chain N]
    python bench/run.py --footprint [--footprint-noop N] [--footprint-dag N] [--footprint-batch B]

Either flag replaces the usual run: the normal workloads and the Celery and Dramatiq baselines are
skipped. Each runs on a platform that bench/run.py starts (its processes, namespace and SQLite store), and
its results go into bench/results.json under "scale" and "footprint"; the rest of that file is kept.

--scale, on a platform with SWITCHBOARD_MAX_TASKS_PER_WORKFLOW raised to fit the fan-out, one after the other
(a size of 0 skips one):
  backlog   N one-task LOW "stamp" workflows, POST /v1/workflows/batch, while dispatching is paused
            (POST /v1/control/pause with no capability: the dispatcher stops taking from its priority queue,
            and the whole backlog waits there). Then resume, and once the first 100 have finished, one
            CRITICAL "stamp" task (POST /v1/tasks). Reported, not asserted (the target is 1 s): how long after
            its submission it started (the handler's time.time() - the client's just before the request),
            and how much of the backlog was still unfinished then. The backlog's time is resume -> the last
            one finished (the store's finished_at); tasks/s = N / that.
  fan-out   one workflow: a root, N "noop" children depending on it, one task depending on all N
  chain     one workflow t0 -> t1 -> ... -> t(N-1)
  For each: seconds to finish (submit -> the workflow's finished_at), tasks/s, CPU seconds of every process
  and its peak RSS during the workload (VmRSS sampled every 100 ms).

--footprint: what a task costs, from counters. The store chunks values as the FoundationDB backend does
(?max_value_bytes=90000, --footprint-store-options), so the keys counted are the mutations FoundationDB
would get: ChunkedValues adds a range clear of a key's chunks to every set and clear. N no-op one-task
workflows, then M DAG workflows a -> (b1..b4) -> c, B workflows per request (default 1: POST /v1/workflows).
Before, between and after them, each time once the platform has been idle for 6 s (RabbitMQ's statistics
are refreshed every 5 s), it reads from every process's /metrics
  switchboard_store_transaction_seconds_count        transactions, by operation (read-only ones included)
  switchboard_store_write_transactions_total         those that wrote
  switchboard_store_written_keys_total, _bytes_total  mutations (set, clear, range clear) and their bytes
  switchboard_store_read_conflict_ranges_total       reads (a key or a range) in transactions that wrote
  switchboard_store_conflicts_total                  retries
  switchboard_messages_published_total               messages confirmed by the broker, by queue kind
and from RabbitMQ's management API the bytes each process's AMQP connections sent (recv_oct) and received
(send_oct), framing included, and each process's CPU time. What the same platform does per second while
idle (an idle window measured first) is subtracted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from urllib.parse import urlparse

import httpx
import orjson

import run as bench
from run import JSON_HEADERS, cpu_delta, cpu_seconds, log

COUNTERS = ("switchboard_store_transaction_seconds_count", "switchboard_store_write_transactions_total",
            "switchboard_store_written_keys_total", "switchboard_store_written_bytes_total",
            "switchboard_store_read_conflict_ranges_total", "switchboard_store_conflicts_total",
            "switchboard_messages_published_total")
_SAMPLE = re.compile(r"^(switchboard_\w+)(?:\{([^}]*)\})?\s+(\S+)$", re.MULTILINE)
_LABEL = re.compile(r'\w+="([^"]*)"')
SHARED = ("bench client", "rabbitmq", "redis")  # not Switchboard's, and the servers may serve others too
QUIET_S = 6.0  # > RabbitMQ's collect_statistics_interval (5 s): its counters have caught up
IDLE_S = 10.0
SHORT = {"switchboard_store_transaction_seconds_count": "transactions",
         "switchboard_store_write_transactions_total": "write_transactions",
         "switchboard_store_written_keys_total": "keys_written", "switchboard_store_written_bytes_total": "bytes_written",
         "switchboard_store_read_conflict_ranges_total": "read_conflict_ranges",
         "switchboard_store_conflicts_total": "conflicts", "switchboard_messages_published_total": "messages"}


async def session(platform, work):
    """The usual start of a bench session (ready, agents registered, warm-up), then `work(client, outcomes)`."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=platform.api_url, timeout=300, limits=limits) as client:
        await platform.wait_ready(client)
        outcomes = bench.Outcomes(platform, client)
        await bench.warm_up(client, outcomes)
        log("warm-up done")
        return await work(client, outcomes)


async def wait_workflow(client: httpx.AsyncClient, wf_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = (await client.get(f"/v1/workflows/{wf_id}", params={"wait": 20})).json()
        if view["status"] not in ("pending", "running"):
            return view
        if time.monotonic() > deadline:
            raise RuntimeError(f"workflow {wf_id} still {view['status']} after {timeout:.0f}s")


async def control(client: httpx.AsyncClient, action: str) -> None:
    response = await client.post(f"/v1/control/{action}")
    if response.status_code != 200:
        raise RuntimeError(f"control {action}: HTTP {response.status_code} {response.text[:300]}")


# ---------------------------------------------------------------------------------------------------
# --scale
# ---------------------------------------------------------------------------------------------------
async def backlog(client, outcomes, n: int, batch: int, parallel: int) -> dict:
    base = (await outcomes.read()).get("succeeded", 0)
    await control(client, "pause")
    await asyncio.sleep(1.5)  # > 2 routing refreshes: the api sends nothing past the dispatcher now
    spec = {"tasks": [{"id": "t", "capability": "stamp", "priority": "LOW"}]}
    t0 = time.time()
    ids = await bench.post_batches(client, [spec] * n, batch, parallel)
    submitted = time.time()
    ran_while_paused = (await outcomes.read()).get("succeeded", 0) - base
    log(f"backlog: {n:,} LOW tasks queued in {submitted - t0:.1f}s; resuming")
    await control(client, "resume")
    resumed = time.time()
    await outcomes.wait_results(base + min(n, 100), 120, "backlog: first results")
    sent = time.time()
    response = await client.post("/v1/tasks", content=b'{"capability":"stamp","priority":"CRITICAL","id":"critical"}',
                                 headers=JSON_HEADERS)
    if response.status_code != 202:
        raise RuntimeError(f"backlog: CRITICAL submit: HTTP {response.status_code} {response.text[:300]}")
    behind = n - ((await outcomes.read()).get("succeeded", 0) - base)
    view = await wait_workflow(client, response.json()["workflow_id"], max(120.0, n / 20))
    if view["status"] != "succeeded":
        raise RuntimeError(f"backlog: the CRITICAL task {view['status']}: {view['tasks'][0]}")
    started = view["tasks"][0]["result"]["started"]
    behind_after = n - ((await outcomes.read()).get("succeeded", 0) - base)
    await outcomes.wait_results(base + n + 1, max(300.0, n / 20), "backlog")
    checked = await bench.confirm(client, ids, 1, "backlog", timeout=600)
    drain = checked["last_finished_at"] - resumed
    return {"tasks": n + 1, "submit_seconds": round(submitted - t0, 2), "ran_while_paused": ran_while_paused,
            "seconds": round(drain, 2), "tasks_per_s": round(n / drain, 1),
            "critical_start_s": round(started - sent, 3), "critical_target_s": 1.0,
            "critical_submitted_after_resume_s": round(sent - resumed, 2),
            "backlog_unfinished_at_critical_submit": behind,
            "backlog_unfinished_when_critical_seen_done": behind_after}


async def one_workflow(client, outcomes, spec: dict, what: str) -> dict:
    base = (await outcomes.read()).get("succeeded", 0)
    tasks = len(spec["tasks"])
    body = orjson.dumps(spec)
    t0 = time.time()
    response = await client.post("/v1/workflows", content=body, headers=JSON_HEADERS)
    if response.status_code != 202:
        raise RuntimeError(f"{what}: submit: HTTP {response.status_code} {response.text[:500]}")
    accepted = time.time()
    await outcomes.wait_results(base + tasks, max(300.0, tasks / 5), what)
    view = await wait_workflow(client, response.json()["workflow_id"], 120)
    bad = [t["id"] for t in view["tasks"] if t["status"] != "succeeded"]
    if view["status"] != "succeeded" or len(view["tasks"]) != tasks or bad:
        raise RuntimeError(f"{what}: workflow {view['status']}, {len(view['tasks'])} tasks, not succeeded: {bad[:5]}")
    seconds = view["finished_at"] - t0
    return {"tasks": tasks, "seconds": round(seconds, 2), "tasks_per_s": round(tasks / seconds, 1),
            "submit_seconds": round(accepted - t0, 2), "request_bytes": len(body)}


def fan_out_spec(n: int) -> dict:
    children = [f"c{i}" for i in range(n)]
    return {"name": f"bench: fan-out {n}", "tasks": [
        {"id": "root", "capability": "noop"},
        *({"id": c, "capability": "noop", "depends_on": ["root"]} for c in children),
        {"id": "join", "capability": "noop", "depends_on": children}]}


def chain_spec(n: int) -> dict:
    return {"name": f"bench: chain {n}", "tasks": [
        {"id": f"t{i}", "capability": "noop", **({"depends_on": [f"t{i - 1}"]} if i else {})} for i in range(n)]}


async def bench_scale(platform, args) -> dict:
    async def work(client, outcomes) -> dict:
        results: dict = {}
        plan = [("backlog", args.scale_backlog, lambda: backlog(client, outcomes, args.scale_backlog, args.batch,
                                                                args.parallel)),
                ("fan-out", args.scale_fanout, lambda: one_workflow(client, outcomes, fan_out_spec(args.scale_fanout),
                                                                    "fan-out")),
                ("chain", args.scale_chain, lambda: one_workflow(client, outcomes, chain_spec(args.scale_chain),
                                                                 "chain"))]
        for name, size, run in plan:
            if not size:
                continue
            log(f"scale: {name} ({size:,})")
            platform.sampler.phase = name
            before = cpu_seconds(outcomes.cpu_pids)
            results[name] = await run()
            results[name]["cpu_seconds"] = cpu_delta(before, cpu_seconds(outcomes.cpu_pids))
            platform.sampler.phase = None
            results[name]["peak_rss_mb"] = {
                n: round(kb / 1024, 1) for n, kb in platform.sampler.phase_kb.get(name, {}).items()}
            log(f"{name}: {results[name]}")
        return results

    return await session(platform, work)


def run_scale(args) -> dict:
    fits = max(10_000, args.scale_fanout + 2)
    results, sampler = bench.run_platform(args, bench_scale, env={"SWITCHBOARD_MAX_TASKS_PER_WORKFLOW": str(fits)})
    return {"workloads": results, "peak_rss_mb": sampler.peaks_mb(),
            "config": {"backlog": args.scale_backlog, "fanout": args.scale_fanout, "chain": args.scale_chain,
                       "max_tasks_per_workflow": fits, "agent_concurrency": args.agent_concurrency,
                       "batch": args.batch, "parallel_requests": args.parallel, "store": "sqlite (WAL)"}}


def report_scale(scale: dict) -> None:
    work = scale["workloads"]
    lines = ["", f"scale workloads, on one host ({os.cpu_count()} CPUs), SQLite store", "",
             f"{'workload':<34}{'tasks':>10}{'seconds':>10}{'tasks/s':>10}"]
    labels = {"backlog": f"backlog {scale['config']['backlog']:,} LOW + 1 CRITICAL",
              "fan-out": f"fan-out 1 -> {scale['config']['fanout']:,} -> 1", "chain": f"chain of {scale['config']['chain']:,}"}
    for name, r in work.items():
        lines.append(f"{labels[name]:<34}{r['tasks']:>10,}{r['seconds']:>10.2f}{r['tasks_per_s']:>10.1f}")
    if "backlog" in work:
        b = work["backlog"]
        lines += [f"  backlog: submitted in {b['submit_seconds']:.1f}s while paused ({b['ran_while_paused']} ran meanwhile);"
                  " seconds = resume -> the last finished",
                  f"  CRITICAL started {b['critical_start_s'] * 1000:.0f} ms after its submission (target <= 1 s: "
                  f"{'met' if b['critical_start_s'] <= 1.0 else 'MISSED'}), submitted "
                  f"{b['critical_submitted_after_resume_s']:.1f}s after resume with "
                  f"{b['backlog_unfinished_at_critical_submit']:,} LOW unfinished "
                  f"({b['backlog_unfinished_when_critical_seen_done']:,} when it was seen done)"]
    for name in ("fan-out", "chain"):
        if name in work:
            lines.append(f"  {name}: the workflow accepted in {work[name]['submit_seconds']:.2f}s "
                         f"({work[name]['request_bytes'] / 1024:.0f} KiB request)"
                         + (f"; {work[name]['seconds'] * 1000 / work[name]['tasks']:.1f} ms a link"
                            if name == "chain" else ""))
    names = list(next(iter(work.values()))["peak_rss_mb"]) if work else []
    lines += ["", "peak RSS (MB) during each workload, and CPU seconds:", f"{'':<14}" + "".join(f"{n[:12]:>13}" for n in names)]
    for name, r in work.items():
        lines.append(f"{name:<14}" + "".join(f"{r['peak_rss_mb'].get(n, 0):>13.1f}" for n in names))
        lines.append(f"{'  cpu-s':<14}" + "".join(f"{r['cpu_seconds'].get(n, 0):>13.1f}" for n in names)
                     + "   " + ", ".join(f"{n} {r['cpu_seconds'][n]:.1f}" for n in r["cpu_seconds"] if n not in names))
    lines.append("whole run, VmHWM included: " + ", ".join(f"{n} {mb:.0f}" for n, mb in scale["peak_rss_mb"].items()))
    lines.append(f"(SWITCHBOARD_MAX_TASKS_PER_WORKFLOW={scale['config']['max_tasks_per_workflow']} for this platform)")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------
# --footprint
# ---------------------------------------------------------------------------------------------------
def amqp_local_ports(pids: dict[str, int], broker_port: int) -> dict[str, set[int]]:
    """The local ports of each process's connections to the broker (via /proc/net/tcp* and its fds)."""
    by_inode = {link: local for state, local, remote, link in bench.tcp_sockets()
                if state == bench.TCP_ESTABLISHED and remote == broker_port}
    ports: dict[str, set[int]] = {}
    for name, pid in pids.items():
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            links = []
        ports[name] = {by_inode[link] for link in links if link in by_inode}
    return ports


async def amqp_octets(platform, api_url: str) -> dict[str, float] | None:
    """Bytes each process sent to (recv_oct) and got from (send_oct) the broker, and the messages it
    published, per RabbitMQ's management API."""
    parsed = urlparse(platform.amqp_url)
    ports = amqp_local_ports(platform.pids, parsed.port or 5672)
    try:
        async with httpx.AsyncClient(timeout=10) as mgmt:
            response = await mgmt.get(api_url.rstrip("/") + "/api/connections",
                                      params={"columns": "peer_port,recv_oct,send_oct"})
            response.raise_for_status()
            # AMQP messages as the broker counts them: a batch of coalesced messages (switchboard.wire) is one.
            channels = await mgmt.get(api_url.rstrip("/") + "/api/channels",
                                      params={"columns": "connection_details.peer_port,message_stats.publish"})
    except httpx.HTTPError as exc:
        log(f"footprint: RabbitMQ's management API ({api_url}): {exc}; no byte counts")
        return None
    by_port = {c["peer_port"]: c for c in response.json()}
    published: dict[int, int] = {}
    for channel in channels.json() if channels.is_success else []:
        port = (channel.get("connection_details") or {}).get("peer_port")
        published[port] = published.get(port, 0) + (channel.get("message_stats") or {}).get("publish", 0)
    out = {}
    for name, mine in ports.items():
        out[f"amqp_bytes_to_broker|{name}"] = float(sum(by_port[p].get("recv_oct", 0) for p in mine if p in by_port))
        out[f"amqp_bytes_from_broker|{name}"] = float(sum(by_port[p].get("send_oct", 0) for p in mine if p in by_port))
        out[f"amqp_messages|{name}"] = float(sum(published.get(p, 0) for p in mine))
    return out


async def snapshot(platform, client, outcomes, mgmt_url: str) -> dict[str, float]:
    """Every counter of interest, flat: "<short name>|<process>|<label>" -> value, and "cpu|<process>"."""
    flat: dict[str, float] = {"at": time.monotonic()}
    params = [("name[]", name) for name in COUNTERS]
    for name in platform.procs:
        text = (await client.get(platform.health_url(name) + "/metrics", params=params, timeout=10)).text
        for metric, labels, value in _SAMPLE.findall(text):
            if metric in SHORT:
                label = "|".join(_LABEL.findall(labels or ""))
                flat[f"{SHORT[metric]}|{name}|{label}"] = flat.get(f"{SHORT[metric]}|{name}|{label}", 0.0) + float(value)
    flat |= {f"cpu|{n}": v for n, v in cpu_seconds(outcomes.cpu_pids).items()}
    flat |= await amqp_octets(platform, mgmt_url) or {}
    return flat


def minus(after: dict, before: dict, idle: dict | None = None) -> dict[str, float]:
    seconds = after["at"] - before["at"]
    return {k: v - before.get(k, 0.0) - (idle or {}).get(k, 0.0) * seconds for k, v in after.items() if k != "at"}


def per_task(delta: dict[str, float], tasks: int) -> dict:
    """Totals per task, by service, and the store's by operation (write transactions only)."""
    out: dict = {"tasks": tasks, "totals": {}, "by_process": {}, "store_by_operation": {}, "messages_by_kind": {}}
    for key, value in delta.items():
        what, process, *label = key.split("|")
        label = label[0] if label else ""
        value /= tasks
        out["totals"][what] = out["totals"].get(what, 0.0) + value
        by = out["by_process"].setdefault(what, {})
        by[process] = by.get(process, 0.0) + value
        if what == "messages":
            out["messages_by_kind"][label] = out["messages_by_kind"].get(label, 0.0) + value
        elif what != "conflicts" and label and not what.startswith(("cpu", "amqp")):
            ops = out["store_by_operation"].setdefault(label, {})
            ops[what] = ops.get(what, 0.0) + value

    def rounded(x):
        return {k: rounded(v) for k, v in x.items()} if isinstance(x, dict) else round(x, 3)

    out["totals"].pop("cpu", None)
    out["cpu_ms_by_process"] = {p: v * 1000 for p, v in out["by_process"].pop("cpu", {}).items()}
    out["totals"]["cpu_ms"] = sum(v for p, v in out["cpu_ms_by_process"].items() if p not in SHARED)
    out["store_by_operation"] = dict(sorted(  # what the workload did, not what idle noise left
        ((op, v) for op, v in out["store_by_operation"].items()
         if v.get("keys_written", 0) >= 0.005 or abs(v.get("transactions", 0)) >= 0.005),
        key=lambda kv: -kv[1].get("keys_written", 0)))
    return {k: rounded(v) if isinstance(v, (dict, float)) else v for k, v in out.items()}


async def submit_each(client, specs: list[dict], batch: int, parallel: int) -> list[str]:
    if batch > 1:
        return await bench.post_batches(client, specs, batch, parallel)
    gate = asyncio.Semaphore(parallel)

    async def one(spec: dict) -> str:
        async with gate:
            response = await client.post("/v1/workflows", content=orjson.dumps(spec), headers=JSON_HEADERS)
            if response.status_code != 202:
                raise RuntimeError(f"submit: HTTP {response.status_code} {response.text[:300]}")
            return response.json()["workflow_id"]

    return await asyncio.gather(*(one(s) for s in specs))


async def bench_footprint(platform, args) -> dict:
    async def work(client, outcomes) -> dict:
        mgmt = args.rabbitmq_api
        await asyncio.sleep(QUIET_S)
        start = await snapshot(platform, client, outcomes, mgmt)
        await asyncio.sleep(IDLE_S)
        idle_end = await snapshot(platform, client, outcomes, mgmt)
        idle = {k: v / (idle_end["at"] - start["at"]) for k, v in minus(idle_end, start).items()}
        results: dict = {"idle_per_s": {k: round(v, 3) for k, v in idle.items() if v}}
        before, checks = idle_end, []
        for name, count, spec, each in (("noop", args.footprint_noop, bench.noop_spec, 1),
                                        ("dag", args.footprint_dag, bench.dag_spec, 6)):
            if not count:
                continue
            log(f"footprint: {name}, {count:,} workflows, {args.footprint_batch} a request")
            base = (await outcomes.read()).get("succeeded", 0)
            t0 = time.monotonic()
            ids = await submit_each(client, [spec() for _ in range(count)], args.footprint_batch, args.parallel)
            await outcomes.wait_results(base + count * each, max(120.0, count * each / 20), name)
            busy = time.monotonic() - t0
            await asyncio.sleep(QUIET_S)
            after = await snapshot(platform, client, outcomes, mgmt)
            results[name] = per_task(minus(after, before, idle), count * each)
            results[name]["busy_seconds"] = round(busy, 2)
            results[name]["workflows"] = count
            checks.append((ids, each, name))
            before = after
        for ids, each, name in checks:  # after the counting: the listing is store reads of its own
            await bench.confirm(client, ids, each, name)
        return results

    return await session(platform, work)


def run_footprint(args) -> dict:
    results, sampler = bench.run_platform(args, bench_footprint, store_options=args.footprint_store_options)
    results["peak_rss_mb"] = sampler.peaks_mb()
    results["config"] = {"noop_workflows": args.footprint_noop, "dag_workflows": args.footprint_dag,
                         "workflows_per_request": args.footprint_batch, "parallel_requests": args.parallel,
                         "agent_concurrency": args.agent_concurrency,
                         "store": "sqlite (WAL)" + (f", ?{args.footprint_store_options}" if args.footprint_store_options
                                                    else ", no chunking (not as on FoundationDB)"),
                         "idle_subtracted_over_s": IDLE_S}
    return results


def report_footprint(fp: dict) -> None:
    keys = [k for k in ("noop", "dag") if k in fp]
    lines = ["", "footprint per task (idle subtracted), " + "; ".join(
        f"{k}: {fp[k]['workflows']:,} workflows = {fp[k]['tasks']:,} tasks in {fp[k]['busy_seconds']:.1f}s" for k in keys),
        f"({fp['config']['workflows_per_request']} workflow(s) a request)", "",
        f"{'':<44}" + "".join(f"{k:>12}" for k in keys)]

    def row(label: str, get) -> None:
        lines.append(f"{label:<44}" + "".join(f"{get(fp[k]):>12.2f}" for k in keys))

    for what, label in (("transactions", "store transactions (all)"), ("write_transactions", "  of which wrote (commits)"),
                        ("keys_written", "keys written (set/clear/range clear)"), ("bytes_written", "bytes written"),
                        ("read_conflict_ranges", "read conflict ranges (reads in writers)"),
                        ("conflicts", "retried (conflict or busy)"), ("messages", "messages published (each one)"),
                        ("amqp_messages", "AMQP messages published (a batch is one)"),
                        ("amqp_bytes_to_broker", "AMQP bytes to the broker"),
                        ("amqp_bytes_from_broker", "AMQP bytes from the broker"), ("cpu_ms", "CPU ms, Switchboard's processes")):
        row(label, lambda r, w=what: r["totals"].get(w, 0.0))
    for what, label in (("write_transactions", "commits"), ("transactions", "transactions")):
        processes = sorted({p for k in keys for p in fp[k]["by_process"].get(what, {})})
        for p in processes:
            row(f"  {label}: {p}", lambda r, w=what, p=p: r["by_process"].get(w, {}).get(p, 0.0))
    kinds = sorted({kind for k in keys for kind in fp[k]["messages_by_kind"]})
    for kind in kinds:
        row(f"  messages: {kind}", lambda r, kind=kind: r["messages_by_kind"].get(kind, 0.0))
    processes = sorted({p for k in keys for p in fp[k]["cpu_ms_by_process"]})
    for p in processes:
        row(f"  CPU ms: {p}", lambda r, p=p: r["cpu_ms_by_process"].get(p, 0.0))
    for k in keys:
        top = list(fp[k]["store_by_operation"].items())[:8]
        lines.append(f"{k} by operation (transactions / commits / keys / bytes / read conflict ranges per task): "
                     + "; ".join(f"{op} {v.get('transactions', 0):.2f}/{v.get('write_transactions', 0):.2f}/"
                                 f"{v.get('keys_written', 0):.1f}/{v.get('bytes_written', 0):.0f}/"
                                 f"{v.get('read_conflict_ranges', 0):.1f}" for op, v in top))
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------
def main(args) -> int:
    began = time.monotonic()
    out: dict = {}
    try:
        if args.footprint:
            out["footprint"] = run_footprint(args)
        if args.scale:
            out["scale"] = run_scale(args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    if "footprint" in out:
        report_footprint(out["footprint"])
    if "scale" in out:
        report_scale(out["scale"])
    try:
        data = json.loads(args.json.read_text())
    except (OSError, ValueError):
        data = {}
    for key, value in out.items():
        data[key] = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "host_cpus": os.cpu_count(), **value}
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\ntotal wall time {time.monotonic() - began:.1f} s; {', '.join(out)} in {args.json}", flush=True)
    return 0
