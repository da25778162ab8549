"""The platform's guarantees under failure, each proved with real processes (see cluster.py):

1. SIGKILL each service in turn at a random moment, then restart it: every workflow completes, no task is
   lost, no result is recorded twice, no dependent runs before its parents. Recovery time is measured.
2. SIGKILL an agent mid-task: its in-flight tasks run again on another agent; it is reported lost.
3. Restart a private RabbitMQ mid-run: services and agents reconnect by themselves; nothing is lost.
4. Restart a private Redis (no persistence) mid-run: dependencies are rebuilt, agents re-register.
5. Poison messages to every queue: each dead-lettered once, with its reason; nothing crashes or loops.
6. A flaky agent: every task succeeds within its attempts; attempts match the injected failures.
7. SIGKILL each service while a task streams text, checkpoints, asks a question and publishes an event:
   the text is logged whole and in order, the question outlives the api, the event is heard.

CHAOS_SCALE (or --chaos-scale) sizes them: 1 is the CI size; `python -m tests.chaos.run_chaos` runs the
long version (scenario 1 with at least 2,000 tasks).
"""

from __future__ import annotations

import asyncio
import collections
import time

import orjson
import pytest

from tests.chaos.cluster import (
    AgentSpec,
    Workload,
    kill_and_recover,
    metric,
    verify,
)
from tests.chaos.servers import PrivateRabbitMQ, PrivateRedis, rabbitmq_available, redis_available
from tests.harness import ALL_SERVICES, wait_for

pytestmark = pytest.mark.chaos


def workflows_for(workload: Workload, tasks: int, **shape) -> list[dict]:
    """Random workflows adding up to at least `tasks` tasks."""
    specs: list[dict] = []
    while sum(len(s["tasks"]) for s in specs) < tasks:
        specs += workload.make(1, **shape)
    return specs


def size(specs: list[dict]) -> int:
    return sum(len(s["tasks"]) for s in specs)


def split(items: list, parts: int) -> list[list]:
    step = len(items) / parts
    return [items[round(i * step):round((i + 1) * step)] for i in range(parts)]


async def progress(workload: Workload, specs: list[dict], tasks: int, *, timeout: float, what: str) -> None:
    """Waits until agents have finished `tasks` tasks of these workflows: work of theirs is flowing now."""
    names = {s["name"] for s in specs}
    runlogs = workload.cluster.runlogs

    def moved() -> bool:
        runlogs.refresh()
        ours = [w for w, s in workload.specs.items() if s["name"] in names]
        return sum(runlogs.ended_per_workflow[w] for w in ours) >= tasks

    await wait_for(moved, timeout=timeout, what=what, interval=0.02, on_timeout=workload.cluster.diagnose)


async def run_to_a_random_moment(workload: Workload, specs: list[dict], rng, event: str
                                 ) -> tuple[list[dict], list[dict], int]:
    """Submits nine tenths of the work and waits until a random sixth to third of it is done, so nearly all
    of it is in flight when `event` happens. Returns that part, the rest, and the tasks outstanding."""
    first, rest = specs[:len(specs) * 9 // 10], specs[len(specs) * 9 // 10:]
    await workload.submit_many(first)
    workload.watch()
    moment = rng.randint(size(first) // 6, size(first) // 3)
    await progress(workload, first, moment, timeout=120, what=f"{moment} tasks done before {event}")
    return first, rest, workload.outstanding()


def finish_timeout(tasks: int) -> float:
    return 90 + tasks / 5


# ---- 1 ------------------------------------------------------------------------------------------------------
async def test_sigkill_each_service_in_turn(make_cluster, report, chaos_scale, chaos_rng):
    rng = chaos_rng
    cluster = await make_cluster([AgentSpec("chaos-a", seed=rng.randrange(1 << 30)),
                                  AgentSpec("chaos-b", seed=rng.randrange(1 << 30))])
    workload = Workload(cluster, rng)
    specs = workflows_for(workload, int(2000 * chaos_scale))
    # The long version kills each service several times over, for more recovery samples.
    targets = list(ALL_SERVICES) * max(1, round(chaos_scale / 2))
    print(f"scenario 1: {len(specs)} workflows, {size(specs)} tasks, kills: {', '.join(targets)}")
    phases = split(specs, len(targets) + 1)  # a share of the work submitted before each kill, one after
    workload.watch()
    submitting = []
    for target, phase in zip(targets, phases):
        # Submissions run on while the kill happens: an api killed mid-request is retried with the same key.
        accepted = workload.accepted
        submitting.append(asyncio.create_task(workload.submit_many(phase)))
        if target == "api":  # its random moment is in the middle of the submissions
            moment = rng.randint(1, max(1, len(phase) - 2))
            await wait_for(lambda base=accepted, n=moment: workload.accepted - base >= n, timeout=60,
                             what=f"{moment} submissions before killing the api")
        else:  # theirs is while tasks run
            moment = rng.randint(max(1, size(phase) // 10), max(2, size(phase) * 6 // 10))
            await progress(workload, phase, moment, timeout=120, what=f"{moment} tasks done before killing {target}")
        record = await kill_and_recover(cluster, workload, target, downtime=rng.uniform(0.0, 1.0))
        report.add(kind="kill", **record)
        assert not cluster.dead(), f"processes died: {cluster.dead()}\n{cluster.diagnose(cluster.dead())}"
    submitting.append(asyncio.create_task(workload.submit_many(phases[-1])))
    await asyncio.gather(*submitting)
    await workload.wait_all(timeout=finish_timeout(workload.tasks))
    verdict = await verify(cluster, workload)
    report.add(kind="run", summary=verdict.summary(), tasks=verdict.tasks, reruns=verdict.rerun_tasks,
               throughput=round(verdict.throughput, 1), submit_errors=workload.submit_errors)
    assert not cluster.dead(), cluster.dead()


# ---- 2 ------------------------------------------------------------------------------------------------------
async def test_sigkill_an_agent_mid_task(make_cluster, report, chaos_scale, chaos_rng):
    rng = chaos_rng
    lost_after = 2.0
    # The victim's tasks take long enough that it surely has some in flight when it dies.
    cluster = await make_cluster(
        [AgentSpec("victim", min_ms=200, max_ms=600, seed=rng.randrange(1 << 30)),
         AgentSpec("survivor", seed=rng.randrange(1 << 30))],
        env={"SWITCHBOARD_AGENT_LOST_AFTER_S": str(lost_after), "SWITCHBOARD_HEARTBEAT_INTERVAL_S": "0.25"})
    workload = Workload(cluster, rng)
    specs = workflows_for(workload, int(400 * chaos_scale))
    print(f"scenario 2: {len(specs)} workflows, {size(specs)} tasks")
    submitting = asyncio.create_task(workload.submit_many(specs))
    workload.watch()
    runlogs = cluster.runlogs

    def victim_busy() -> bool:
        runlogs.refresh()
        ended = {e["run"] for e in runlogs.by("end", "victim")}
        return runlogs.ended >= size(specs) // 5 and any(e["run"] not in ended for e in runlogs.by("start", "victim"))

    await wait_for(victim_busy, timeout=120, what="the victim mid-task, a fifth of the work done")
    killed_at = await cluster.kill("victim")
    ended = {e["run"] for e in runlogs.by("end", "victim")}
    in_flight = {(e["wf"], e["task"]) for e in runlogs.by("start", "victim") if e["run"] not in ended}
    assert in_flight, "the victim had nothing in flight"

    def rerun() -> bool:
        return all(any(e["agent"] == "survivor" for e in runlogs.by("end") if (e["wf"], e["task"]) == key)
                   for key in in_flight)

    await wait_for(rerun, timeout=60, what="the victim's in-flight tasks run again on the survivor")
    rerun_s = time.time() - killed_at

    async def reported_lost() -> bool:
        return any(a["name"] == "victim" and a["status"] == "lost" for a in await cluster.agents_view())

    await wait_for(reported_lost, timeout=30, what="GET /v1/agents to show the victim lost")
    lost_s = time.time() - killed_at
    await wait_for(lambda: "agent victim lost" in cluster.procs["registry"].log_text(), timeout=30,
                     what="the registry to report the victim lost")

    async def counted_lost() -> bool:
        return metric(await cluster.metrics("registry"), "switchboard_agents", status="lost") >= 1

    await wait_for(counted_lost, timeout=10, what="the registry's switchboard_agents{status=\"lost\"} gauge")

    await submitting
    await workload.wait_all(timeout=finish_timeout(workload.tasks))
    verdict = await verify(cluster, workload)
    survivor_runs = {e["run"] for e in runlogs.by("end", "survivor")}
    for key in in_flight:
        assert verdict.recorded[key] in survivor_runs, f"{key}: recorded run is not the survivor's"
    survivor = next(a for a in await cluster.agents_view() if a["name"] == "survivor")
    assert survivor["status"] == "alive"
    report.add(kind="kill", target="agent (victim)", downtime_s=0, ready_s=None, recovery_s=round(rerun_s, 3),
               tasks_outstanding=len(in_flight))
    report.add(kind="run", summary=f"{verdict.summary()}; victim had {len(in_flight)} tasks in flight, all re-run "
                                   f"on the survivor {rerun_s:.2f}s after the kill; reported lost after {lost_s:.2f}s "
                                   f"(agent_lost_after_s={lost_after})", tasks=verdict.tasks)


# ---- 3 ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(rabbitmq_available() is not None, reason=str(rabbitmq_available()))
async def test_rabbitmq_restart_mid_run(make_cluster, settings, tmp_path, report, chaos_scale, chaos_rng):
    rng = chaos_rng
    broker = PrivateRabbitMQ(tmp_path / "rabbitmq")
    try:
        report.add(kind="server", what="private RabbitMQ first start", seconds=await broker.start())
        cluster = await make_cluster([AgentSpec("chaos-a", seed=rng.randrange(1 << 30)),
                                      AgentSpec("chaos-b", seed=rng.randrange(1 << 30))],
                                     cluster_settings=settings.model_copy(update={"amqp_url": broker.url}))
        workload = Workload(cluster, rng)
        specs = workflows_for(workload, int(600 * chaos_scale))
        print(f"scenario 3: {len(specs)} workflows, {size(specs)} tasks, RabbitMQ on port {broker.port}")
        # Nearly all the work is in flight when the broker goes: every process has deliveries unacked and
        # publishes under way (the harder case for reconnecting).
        first, second, outstanding = await run_to_a_random_moment(workload, specs, rng, "the broker restart")
        stopped_at = time.time()
        stop_s, start_s = await broker.restart()
        report.add(kind="server", what="private RabbitMQ stop", seconds=stop_s)
        report.add(kind="server", what="private RabbitMQ restart", seconds=start_s)
        # Nobody restarts anything: every process must find the broker again by itself, and consume again.
        await cluster.wait_ready(timeout=120)
        assert not cluster.dead(), f"processes died: {cluster.dead()}\n{cluster.diagnose(cluster.dead())}"
        queues = cluster.consumed_queues()
        info: dict = {}

        async def consumed_again() -> bool:
            info.update(await cluster.queue_info(queues))
            return all(consumers >= 1 for _, consumers in info.values())

        await wait_for(consumed_again, timeout=60, interval=0.25, what="every queue consumed again",
                         on_timeout=lambda: "queue: (messages, consumers) consumed by\n" + "\n".join(
                             f"  {q}: {info.get(q)} {p}" for q, p in queues.items()))
        await cluster.wait_agents_alive(cluster.agents, timeout=60)  # heartbeats flow again
        ready_at = time.time()
        try:
            submitting = asyncio.create_task(workload.submit_many(second))
            probed_at = await workload.probe(timeout=120)
            report.add(kind="kill", target="rabbitmq", downtime_s=round(stop_s + start_s, 3),
                       ready_s=round(ready_at - stopped_at, 3), recovery_s=round(probed_at - stopped_at, 3),
                       tasks_outstanding=outstanding)
            await submitting
            await workload.wait_all(timeout=finish_timeout(workload.tasks))
            verdict = await verify(cluster, workload)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe broker's queues:\n{await broker.list_queues()}") from None
        report.add(kind="run", summary=verdict.summary(), tasks=verdict.tasks)
        assert not cluster.dead(), cluster.dead()
    finally:
        await broker.close()


# ---- 4 ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(redis_available() is not None, reason=str(redis_available()))
async def test_redis_restart_loses_everything_mid_run(make_cluster, settings, tmp_path, report, chaos_scale,
                                                      chaos_rng):
    rng = chaos_rng
    server = PrivateRedis(tmp_path / "redis")
    try:
        report.add(kind="server", what="private Redis start", seconds=await server.start())
        cluster = await make_cluster([AgentSpec("chaos-a", seed=rng.randrange(1 << 30)),
                                      AgentSpec("chaos-b", seed=rng.randrange(1 << 30))],
                                     cluster_settings=settings.model_copy(update={"redis_url": server.url}))
        workload = Workload(cluster, rng)
        specs = workflows_for(workload, int(600 * chaos_scale))
        print(f"scenario 4: {len(specs)} workflows, {size(specs)} tasks, Redis on port {server.port}")
        # Nearly all the work is in flight when Redis goes: many workflows to rebuild while results keep
        # arriving (the harder case for the rebuild).
        first, rest, outstanding = await run_to_a_random_moment(workload, specs, rng, "the Redis restart")
        killed_at = time.time()
        report.add(kind="server", what="private Redis restart (data lost)", seconds=await server.restart())
        # Agents re-register by their heartbeats; the coordinator notices the loss and rebuilds RQ's data.
        await cluster.wait_agents_alive(cluster.agents, timeout=60)
        registered_at = time.time()
        probed_at = await workload.probe(timeout=120)
        report.add(kind="kill", target="redis", downtime_s=0.0, ready_s=round(registered_at - killed_at, 3),
                   recovery_s=round(probed_at - killed_at, 3), tasks_outstanding=outstanding)
        await workload.submit_many(rest)
        await workload.wait_all(timeout=finish_timeout(workload.tasks))
        verdict = await verify(cluster, workload)
        report.add(kind="run", summary=verdict.summary(), tasks=verdict.tasks)
        assert not cluster.dead(), cluster.dead()
    finally:
        await server.close()


# ---- 5 ------------------------------------------------------------------------------------------------------
async def test_poison_messages_to_every_queue(make_cluster, report, chaos_scale, chaos_rng):
    rng = chaos_rng
    cluster = await make_cluster([AgentSpec("chaos-a", seed=rng.randrange(1 << 30))])
    workload = Workload(cluster, rng)
    specs = workflows_for(workload, int(300 * chaos_scale))
    topology = cluster.topology
    consumers = {topology.coordinator: "coordinator", topology.dispatch: "dispatcher", topology.results: "aggregator",
                 topology.registry: "registry", topology.capability_queue("work"): "chaos-a",
                 topology.agent_queue("chaos-a"): "chaos-a"}
    poisons = {
        "garbage": bytes(rng.getrandbits(8) for _ in range(256)) + b"\xff\xfe\x00",
        "wrong-shape": orjson.dumps({"hello": "world", "tasks": [1, 2, 3]}),
        "wrong-type": orjson.dumps({"type": "control", "subject": "nonsense"}),
        "huge": b'{"type": "task", "payload": {"blob": "' + b"x" * 2_000_000 + b'"}}',
    }
    print(f"scenario 5: {len(poisons)} poisons x {len(consumers)} queues, with {size(specs)} tasks flowing")
    submitting = asyncio.create_task(workload.submit_many(specs))
    workload.watch()
    sent_at = time.time()
    for queue in consumers:
        for kind, body in poisons.items():
            await cluster.publish_raw(queue, body, message_id=f"poison:{queue}:{kind}")
    expected = {f"poison:{q}:{k}" for q in consumers for k in poisons}

    async def all_dead_lettered():
        letters = [d for d in await cluster.dead_letters() if (d.get("message_id") or "").startswith("poison:")]
        return letters if {d["message_id"] for d in letters} >= expected else None

    letters = await wait_for(all_dead_lettered, timeout=60, interval=0.2, what="every poison in GET /v1/dlq",
                               on_timeout=cluster.diagnose)
    dead_letter_s = time.time() - sent_at
    counts = collections.Counter(d["message_id"] for d in letters)
    assert all(n == 1 for n in counts.values()), f"dead-lettered more than once: {counts}"
    for letter in letters:
        _, queue, kind = letter["message_id"].split(":", 2)
        assert letter["queue"] == queue, letter["queue"]
        assert letter["reason"] and letter["reason"] != "unknown", letter
        if kind in ("garbage", "wrong-shape"):
            assert "unparseable" in letter["reason"], letter["reason"]

    await submitting
    await workload.wait_all(timeout=finish_timeout(workload.tasks))
    verdict = await verify(cluster, workload)
    # Nothing crashed, everything is ready, and nothing looped: each consumer dead-lettered each poison of its
    # queue once, and requeued nothing.
    assert not cluster.dead(), f"processes died: {cluster.dead()}\n{cluster.diagnose(cluster.dead())}"
    await cluster.wait_ready(timeout=10)
    for queue, process in consumers.items():
        text = await cluster.metrics(process)
        kind = topology.kind(queue)  # each of these queues is the only one of its kind in its process
        assert metric(text, "switchboard_messages_consumed_total", kind=kind, outcome="dead_lettered") == len(poisons), \
            (queue, [line for line in text.splitlines() if "messages_consumed" in line])
    for name in cluster.procs:
        text = await cluster.metrics(name)
        assert metric(text, "switchboard_messages_consumed_total", outcome="requeued") == 0, (name, "requeued messages")
        log = cluster.procs[name].log_text()
        assert log.count("dead-lettering message") <= len(poisons) * 2, f"{name} keeps dead-lettering"
        assert log.count("requeueing message") == 0, f"{name} requeues"
    left = {q: ready for q, (ready, _) in (await cluster.queue_info(consumers)).items() if ready}
    assert not left, f"messages left in queues: {left}"
    report.add(kind="run", summary=f"{verdict.summary()}; {len(expected)} poisons all dead-lettered once within "
                                   f"{dead_letter_s:.2f}s", tasks=verdict.tasks)


# ---- 6 ------------------------------------------------------------------------------------------------------
async def test_flaky_agent(make_cluster, report, chaos_scale, chaos_rng):
    rng = chaos_rng
    flaky = 0.3
    # Alone on the capability; breakers (if any) probe again quickly so a run of failures only delays.
    cluster = await make_cluster([AgentSpec("flaky", flaky=flaky, seed=rng.randrange(1 << 30))],
                                 env={"SWITCHBOARD_BREAKER_RESET_S": "1"})
    workload = Workload(cluster, rng)
    specs = workflows_for(workload, int(400 * chaos_scale), max_attempts=10)
    print(f"scenario 6: {len(specs)} workflows, {size(specs)} tasks, failing {flaky:.0%} of runs, 10 attempts")
    await workload.submit_many(specs)
    await workload.wait_all(timeout=finish_timeout(workload.tasks) * 2)
    verdict = await verify(cluster, workload)
    fails = collections.defaultdict(list)
    for event in cluster.runlogs.by("fail"):
        fails[(event["wf"], event["task"])].append(event["attempt"])
    ends = {e["run"]: e for e in cluster.runlogs.by("end")}
    mismatched = []
    for wf_id, view in verdict.views.items():
        for task in view["tasks"]:
            key = (wf_id, task["id"])
            failed = sorted(fails.get(key, []))
            recorded_attempt = ends[verdict.recorded[key]]["attempt"]
            if task["attempts"] != 1 + len(failed) or failed != list(range(1, task["attempts"])) \
                    or recorded_attempt != task["attempts"]:
                mismatched.append(f"{key}: attempts {task['attempts']}, failed attempts {failed}, "
                                  f"result from attempt {recorded_attempt}")
    assert not mismatched, f"{len(mismatched)} tasks whose attempts do not match the injected failures:\n" + \
        "\n".join(mismatched[:20])
    injected = sum(len(v) for v in fails.values())
    assert injected, "no failure was injected"
    rate = injected / verdict.runs
    most = max(t["attempts"] for v in verdict.views.values() for t in v["tasks"])
    report.add(kind="run", summary=f"{verdict.summary()}; {injected} injected failures ({rate:.0%} of runs), "
                                   f"max attempts used {most}", tasks=verdict.tasks)


# ---- 7 ------------------------------------------------------------------------------------------------------
async def test_streaming_checkpoints_questions_and_events_survive_sigkill_of_each_service(make_cluster, report):
    import sys

    from switchboard.state import open_store
    from switchboard.workflows import WorkflowStore
    from tests.chaos import feature_agent

    cluster = await make_cluster([], start=False)
    heard_log = cluster.workdir / "heard.jsonl"
    t = cluster.topology
    cluster.add_agent_process("feature-agent", [sys.executable, "-m", "tests.chaos.feature_agent", "--log", str(heard_log)],
                              {t.capability_queue("feature"), t.hold_queue("feature"), t.agent_queue("feature-agent"),
                               t.subscription_queue("feature-agent")})
    await cluster.start()
    workflows = WorkflowStore(open_store(cluster.settings.store_url), cluster.settings)
    try:
        response = await cluster.client.post("/v1/workflows", json={"tasks": [{"id": "f", "capability": "feature"}]})
        wf_id = response.json()["workflow_id"]

        async def streamed_past(chars: int):
            log = await workflows.log_after(wf_id, 0)
            return sum(len(e.get("text", "")) for e in log) > chars

        recoveries = {}
        for n, name in enumerate(("aggregator", "coordinator", "dispatcher", "registry")):
            await wait_for(lambda: streamed_past(150 * (n + 1)), timeout=60, what=f"streaming before killing {name}",
                           on_timeout=cluster.diagnose)
            killed_at = await cluster.kill(name)
            await cluster.restart(name)
            await cluster.wait_ready(timeout=60)
            recoveries[name] = time.time() - killed_at

        async def waiting():
            view = (await workflows.get(wf_id))["tasks"][0]
            return view if view["status"] == "waiting_input" else None

        await wait_for(waiting, timeout=60, what="the question asked", on_timeout=cluster.diagnose)
        killed_at = await cluster.kill("api")  # the question outlives the api that would show it
        await cluster.restart("api")
        await cluster.wait_ready(timeout=60)
        recoveries["api"] = time.time() - killed_at
        answered = await cluster.client.post(f"/v1/workflows/{wf_id}/tasks/f/input", json={"answer": "yes"})
        assert answered.status_code == 200, answered.text
        view = (await cluster.client.get(f"/v1/workflows/{wf_id}", params={"wait": 60})).json()
        assert view["status"] == "succeeded", cluster.diagnose()
        task = view["tasks"][0]
        assert task["result"] == {"answer": "yes"} and task["attempts"] == 1  # no kill cost an attempt
        log = await workflows.log_after(wf_id, 0)
        assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
        chunks = [e for e in log if e["event"] == "chunk"]
        assert "".join(c["text"] for c in chunks) == "".join(feature_agent.token(i) for i in range(feature_agent.TOKENS))
        assert all(a["offset"] + len(a["text"]) == b["offset"] for a, b in zip(chunks, chunks[1:]))
        assert [e["event"] for e in log if e["event"] != "chunk"] == ["input", "answer", "published"]
        [published] = [e for e in log if e["event"] == "published"]

        def heard() -> list[dict]:
            return [orjson.loads(line) for line in heard_log.read_text().splitlines()] if heard_log.exists() else []

        await wait_for(lambda: heard(), timeout=30, what="the event heard")
        assert {h["heard"] for h in heard()} == {published["event_id"]}  # at least once, one id
    finally:
        await workflows.store.close()
    report.add(kind="run", summary="streamed text whole and in order, one question answered, one event heard; "
                                   "recovery " + ", ".join(f"{k} {v:.1f}s" for k, v in recoveries.items()),
               tasks=1)
