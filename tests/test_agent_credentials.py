"""Agents with broker credentials of their own, on the real RabbitMQ: such an agent is refused whatever is
not its own, still runs tasks (and delegates) end to end, and cannot report on another agent's task."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import aio_pika
import aiormq
import pytest

from switchboard import Agent, credentials
from switchboard.bus import Bus
from switchboard.protocol import Envelope, MessageType
from tests.harness import cleanup, wait_for


@pytest.fixture
def management(settings):
    with credentials.Management(settings) as api:
        if not api.answers():
            pytest.skip(f"RabbitMQ's management API does not answer at {settings.management_url}: "
                        "enable it with `rabbitmq-plugins enable rabbitmq_management`")
    return settings


@pytest.fixture
async def make_user(management):
    """make_user(capabilities) → (name, AMQP URL) of a new agent user, deleted at the end."""
    made: list[str] = []
    topology_queues: set[str] = set()

    async def make(capabilities: list[str]) -> tuple[str, str]:
        name = f"agent-{management.namespace}-{len(made)}"
        made.append(name)
        topology_queues.update(f"{management.namespace}.cap.{c}" for c in capabilities)
        topology_queues.add(f"{management.namespace}.agent.{name}")
        topology_queues.add(f"{management.namespace}.sub.{name}")
        return name, await credentials.create(management, name, capabilities)

    yield make
    for name in made:
        credentials.delete(management, name)
    await cleanup(management, topology_queues, redis=False)


async def _ignore(message) -> None:
    pass


def agent_settings(settings, url: str):
    return settings.model_copy(update={"amqp_url": url})


async def refused(connection, attempt) -> str:
    """Runs attempt(channel) and returns the broker's refusal (which closes the channel)."""
    channel = await connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refusal:
        await attempt(channel)
    return str(refusal.value)


async def test_an_agent_user_is_refused_everything_not_its_own(settings, make_user):
    name, url = await make_user(["mine"])
    admin = await aio_pika.connect(settings.amqp_url)
    other = f"{settings.namespace}.cap.theirs"
    await Bus(settings, "test").topology.declare_work_queue(await admin.channel(), other)
    connection = await aio_pika.connect(url)
    try:
        async def consume(queue):
            async def attempt(channel):
                await (await channel.declare_queue(queue, passive=True)).consume(_ignore)
            return attempt

        async def publish_to_dispatch(channel):
            await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=f"{settings.namespace}.dispatch")

        async def publish_to_dead_letters(channel):
            exchange = await channel.get_exchange(f"{settings.namespace}.dlx", ensure=False)
            await exchange.publish(aio_pika.Message(b"{}"), routing_key="")

        assert "access to queue" in await refused(connection, await consume(other))
        assert "amq.default" in await refused(connection, publish_to_dispatch)
        assert "dlx" in await refused(connection, publish_to_dead_letters)
        assert "access to queue" in await refused(connection, lambda ch: ch.declare_queue(f"{settings.namespace}.x"))
        assert "access to queue" in await refused(connection, lambda ch: ch.queue_delete(other))
        assert "access to queue" in await refused(connection, lambda ch: ch.queue_delete(f"{settings.namespace}.cap.mine"))
        # Another agent's private queue, by its name pattern.
        assert "access to queue" in await refused(
            connection, lambda ch: ch.declare_queue(f"{settings.namespace}.reply.someone.abc123", exclusive=True))
        # What is its own it may do: consume its capability's queue, have a control queue bound to the fanout.
        await (await consume(f"{settings.namespace}.cap.mine"))(await connection.channel())
        control = await (await connection.channel()).declare_queue(
            f"{settings.namespace}.control.{name}.0123456789ab", exclusive=True)
        await control.bind(f"{settings.namespace}.control")
    finally:
        await connection.close()
        await admin.close()
        await cleanup(settings, {other}, redis=False)


def test_the_cli_creates_a_user_that_logs_in_and_deletes_it(management):
    name = f"agent-{management.namespace}-cli"
    env = {**os.environ, "SWITCHBOARD_NAMESPACE": management.namespace, "AMQP_URL": management.amqp_url}

    def switchboard(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "switchboard.cli", "agent-credentials", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    try:
        done = switchboard("create", name, "--capabilities", "a,b")
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip()
        assert re.fullmatch(rf"amqp://{name}:[A-Za-z0-9_-]{{32}}@127\.0\.0\.1:5672/", url), url
        with credentials.Management(management) as api:
            assert api.permissions_of(name) == credentials.permissions(management.namespace, name, ["a", "b"])
        asyncio.run(_logs_in(url))
        assert switchboard("create", name, "--capabilities", "a", "--password", "chosen").returncode == 0
        with credentials.Management(management) as api:  # an update: the new grants replace the old
            assert api.permissions_of(name) == credentials.permissions(management.namespace, name, ["a"])
        assert switchboard("delete", name).returncode == 0
        with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
            asyncio.run(_logs_in(url))
        assert "no broker user" in switchboard("delete", name).stdout
    finally:
        credentials.delete(management, name)
        asyncio.run(cleanup(management, {f"{management.namespace}.cap.{c}" for c in "ab"}
                            | {f"{management.namespace}.agent.{name}", f"{management.namespace}.sub.{name}"},
                            redis=False))


async def _logs_in(url: str) -> None:
    connection = await aio_pika.connect(url)
    await connection.close()


async def test_a_credentialed_agent_runs_and_delegates_tasks_end_to_end(make_user, platform):
    name, url = await make_user(["ask", "answer"])
    agent = Agent(name, settings=agent_settings(platform.settings, url), concurrency=2)

    @agent.handler("answer")
    async def answer(task):
        return {"answer": task.payload["q"] * 2}

    @agent.handler("ask")
    async def ask(task):  # a child workflow through the coordinator, as this agent's broker user
        return await task.delegate("answer", {"q": task.payload["q"]})

    await platform.add_agent(agent)
    assert agent.bus.restricted and agent.bus.user == name
    view = await platform.wait(await platform.submit({"tasks": [{"id": "t", "capability": "ask", "payload": {"q": 21}}]}))
    assert view["status"] == "succeeded", view
    assert view["result"] == {"t": {"answer": 42}}
    task = await stored_task(platform, view["workflow_id"], "t")
    assert task["claim"] == {"attempt": 1, "user": name}
    # Its requests to the coordinator may not aim the reply at a queue it may not write to itself.
    await agent.bus.publish(Envelope(type=MessageType.CONTROL, subject="control.query", source=name,
                                     reply_to=platform.topology.dispatch), platform.topology.coordinator)

    async def refused_reply():
        letters = (await platform.client.get("/v1/dlq", params={"reason": "not a reply queue"})).json()
        return letters["dead_letters"]

    [letter] = await wait_for(refused_reply, what="the misdirected control.query dead-lettered")
    assert letter["queue"] == platform.topology.coordinator


async def test_a_credentialed_agent_streams_checkpoints_asks_publishes_and_subscribes(make_user, platform):
    name, url = await make_user(["draft"])
    agent = Agent(name, settings=agent_settings(platform.settings, url))
    heard = []

    @agent.handler("draft")
    async def draft(task):
        await task.stream("some text")
        await task.progress(message="half", percent=50)
        await task.checkpoint({"drafted": True})
        answer = await task.ask("Ship it?")
        return await task.publish("draft.shipped", {"answer": answer})

    @agent.on_event("draft.*")
    async def on_draft(event):
        heard.append(event.id)

    await platform.add_agent(agent)
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "draft"}]})

    async def waiting():
        return (await stored_task(platform, wf_id, "t"))["status"] == "waiting_input"

    await wait_for(waiting, what="the question asked")
    assert (await platform.client.post(f"/v1/workflows/{wf_id}/tasks/t/input", json={"answer": "yes"})).status_code == 200
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded", view
    await wait_for(lambda: heard == [view["result"]["t"]], what="its own event heard")
    task = view["tasks"][0]
    assert task["checkpoint"]["state"] == {"drafted": True} and task["progress"]["message"] == "half"


async def test_a_credentialed_agents_task_resumes_from_its_checkpoint_on_another_agent_user(
        make_user, platform, tmp_path):
    # The second agent, a broker user of its own, runs the redelivered task as a new attempt: its reports,
    # checkpoints included, are its own, not a forgery of the first agent's.
    from tests.test_agent_features import killed_after_step_6_resumes_at_7

    users = dict([await make_user(["steps"]), await make_user(["steps"])])
    await killed_after_step_6_resumes_at_7(platform, str(tmp_path / "steps.jsonl"), users)


async def stored_task(platform, wf_id: str, task_id: str) -> dict:
    import orjson

    workflows = platform.services["aggregator"].workflows
    return await workflows.store.read(lambda tr: orjson.loads(tr.get(workflows._task_key(wf_id, task_id))))


async def test_another_agent_cannot_complete_or_fail_a_task_it_was_not_given(make_user, platform):  # users outlive the agents
    owner_name, owner_url = await make_user(["slow"])
    forger_name, forger_url = await make_user(["other"])
    release = asyncio.Event()
    owner = Agent(owner_name, settings=agent_settings(platform.settings, owner_url))

    @owner.handler("slow")
    async def slow(task):
        await release.wait()
        return {"by": "owner"}

    await platform.add_agent(owner)
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "slow", "max_attempts": 1}]})

    async def running():
        view = (await platform.client.get(f"/v1/workflows/{wf_id}")).json()
        return view["tasks"][0]["status"] == "running"

    await wait_for(running, what="the owner's 'started' claimed the attempt")
    forger = Bus(agent_settings(platform.settings, forger_url), forger_name)
    await forger.connect()
    forger.outbox = forger.topology.agent_out
    connection = await aio_pika.connect(forger_url)  # a sender of an older kind: no user_id at all
    try:
        about = dict(source=owner_name, workflow_id=wf_id, task_id="t", attempt=1)
        await forger.publish(Envelope(type=MessageType.RESULT, payload={"result": {"by": "forger"}}, **about),
                             forger.topology.results)
        await forger.publish(Envelope(type=MessageType.ERROR, payload={"error": {
            "type": "X", "message": "forged", "retryable": False}}, **about), forger.topology.results)
        exchange = await (await connection.channel()).get_exchange(forger.topology.agent_out, ensure=False)
        await exchange.publish(aio_pika.Message(Envelope(type=MessageType.RESULT, payload={"result": "anon"},
                                                         **about).encode()), routing_key=forger.topology.results)

        async def forged_letters():
            letters = (await platform.client.get("/v1/dlq", params={"reason": "Forged"})).json()["dead_letters"]
            return letters if len(letters) == 3 else None

        letters = await wait_for(forged_letters, what="the three forgeries dead-lettered")
    finally:
        await connection.close()
        await forger.close()
    assert all(f"belongs to broker user {owner_name!r}" in d["reason"] for d in letters), letters
    assert sum(f"not {forger_name!r}" in d["reason"] for d in letters) == 2
    assert {d["envelope"]["type"] for d in letters} == {"result", "error"}
    counts = (await platform.services["dlq_replayer"].dead_letters.count_dead())
    assert counts["forged"] == 3
    view = (await platform.client.get(f"/v1/workflows/{wf_id}")).json()
    assert view["tasks"][0]["status"] == "running" and not view["tasks"][0]["errors"]  # nothing recorded
    # Replayed, a forgery would come from the platform's user, which is trusted: it never is.
    refused = await platform.client.post(f"/v1/dlq/{letters[0]['id']}/replay")
    assert refused.status_code == 409 and "forged" in refused.json()["error"]["message"]
    release.set()
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded" and view["result"] == {"t": {"by": "owner"}}
    assert view["tasks"][0]["attempts"] == 1 and not view["tasks"][0]["errors"]


async def test_claims_in_one_batch_platform_and_legacy_senders(tmp_path):
    """The rules of record(), in one batch (one transaction): the first report claims the attempt, a
    later one from another user is refused while the rest of the batch is recorded; a message with no
    user_id passes only while nobody claimed; the platform's user passes always."""
    from switchboard.protocol import WorkflowSpec
    from switchboard.settings import Settings
    from switchboard.state.sqlite import SqliteStore
    from switchboard.workflows import WorkflowStore

    store = SqliteStore(tmp_path / "claims.sqlite3")
    try:
        workflows = WorkflowStore(store, Settings(namespace="t", amqp_url="amqp://platform:pw@localhost/"))
        spec = WorkflowSpec(tasks=[{"id": t, "capability": "c", "max_attempts": 2} for t in ("a", "b", "c")])
        [wf], _, _ = await workflows.create([spec])

        def report(kind, task, attempt=1, **payload):
            return Envelope(type=kind, subject="started" if kind == MessageType.STATUS else "", workflow_id=wf,
                            task_id=task, attempt=attempt, payload=payload)

        out = await workflows.record(
            [report(MessageType.STATUS, "a"), report(MessageType.RESULT, "a", result="forged"),
             report(MessageType.RESULT, "b", result="anonymous"), report(MessageType.STATUS, "c"),
             report(MessageType.ERROR, "c", error={"type": "DeadlineExceeded", "retryable": True}),
             report(MessageType.RESULT, "a", result="real")],
            ["alice", "mallory", None, "carol", "platform", "alice"])
        assert [i for i, _ in out.refused] == [1]
        assert "belongs to broker user 'alice', not 'mallory'" in out.refused[0][1]
        view = {t["id"]: t for t in (await workflows.get(wf))["tasks"]}
        assert view["a"]["status"] == "succeeded" and view["a"]["result"] == "real"
        assert view["b"]["result"] == "anonymous"  # nobody had claimed it
        # The platform's timeout of carol's attempt went through; attempt 2 is anybody's to claim.
        assert view["c"]["status"] == "queued" and view["c"]["errors"][0]["type"] == "DeadlineExceeded"
        out = await workflows.record([report(MessageType.STATUS, "c", attempt=2), report(MessageType.RESULT, "c", 2)],
                                     ["dave", None])
        assert [i for i, _ in out.refused] == [1] and "not '(none)'" in out.refused[0][1]
        # An agent that ran attempt 2 cannot jump ahead and claim an attempt never given out.
        out = await workflows.record([report(MessageType.RESULT, "c", attempt=5, result="jumped")], ["mallory"])
        assert [i for i, _ in out.refused] == [0] and "never given out" in out.refused[0][1]
    finally:
        await store.close()


def test_permissions_are_anchored_and_escape_names():
    perms = credentials.permissions("sb", "a.b", ["x.y"])
    assert all(p.startswith("^(") and p.endswith(")$") for p in perms.values())
    read = re.compile(perms["read"])
    assert read.match("sb.cap.x.y") and not read.match("sb.cap.xzy") and not read.match("sb.cap.x.y.z")
    assert read.match("sb.agent.a.b") and not read.match("sb.agent.a.bc")
    configure = re.compile(perms["configure"])
    assert configure.match("sb.reply.a.b.0123456789ab") and configure.match("sb.control.a.b.0123456789ab")
    assert not configure.match("sb.reply.a.0123456789ab")  # agent "a"'s, not "a.b"'s
    assert not configure.match("sb.cap.x.y") and not configure.match("sb.results")
    write = re.compile(perms["write"])
    assert write.match("sb.agent-out") and not write.match("sb.results") and not write.match("amq.default")
