"""One workflow's event stream (`GET /v1/workflows/{id}/events`) against the real platform: agents that
stream text, report progress, ask questions and publish events; a client that reconnects with its
Last-Event-ID resumes exactly where it left off; child workflows are in their parent's stream; the stream
ends with the workflow; a client that falls behind is cut off; and errors are JSON."""

from __future__ import annotations

import asyncio
import random
import socket
import time

import orjson
import pytest

from services.api.workflow_events import FamilyStream
from switchboard import Agent
from tests.sse import Reader
from tests.harness import Platform, wait_for

TOKENS = [f"tok{i:03d} " for i in range(200)]


def streamer_agent(platform, half: asyncio.Event, release: asyncio.Event) -> Agent:
    """Streams the first hundred tokens, waits for `half`, streams the rest, waits for `release`."""
    agent = Agent("streamer-agent", settings=platform.settings)

    @agent.handler("stream")
    async def stream(task):
        for token in TOKENS[:100]:
            await task.stream(token)
        await task.progress(message="half way", percent=50)
        await half.wait()
        for token in TOKENS[100:]:
            await task.stream(token)
        await task.progress(message="all streamed", percent=100)
        await release.wait()
        return {"tokens": len(TOKENS)}

    return agent


def path(wf_id: str) -> str:
    return f"/v1/workflows/{wf_id}/events"


def assert_contiguous(entries: list[dict], start: int = 1) -> None:
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(start, start + len(seqs))), seqs


async def test_a_reconnect_with_last_event_id_resumes_exactly_after_it(platform):
    half, release = asyncio.Event(), asyncio.Event()
    await platform.add_agent(streamer_agent(platform, half, release))
    async with Reader(platform.client, "/v1/events") as everything:
        wf_id = await platform.submit({"name": "streaming", "tasks": [{"id": "s", "capability": "stream"}]})
        async with Reader(platform.client, path(wf_id)) as first:
            await wait_for(lambda: first.text("s") == "".join(TOKENS[:100]), timeout=15,
                           what="the first half of the text")
            [(snapshot_id, kind, snapshot)] = first.events[:1]
            assert kind == "snapshot" and snapshot_id == 0 and snapshot["workflow"]["workflow_id"] == wf_id
            assert "result" not in snapshot["workflow"] and snapshot["children"] == []
            resume_at = first.last_id()
        half.set()  # the second half is streamed while nobody follows this workflow

        async def all_streamed() -> bool:
            log = await platform.services["api"].workflows.log_after(wf_id, 0)
            return "".join(e.get("text", "") for e in log).endswith(TOKENS[-1])

        await wait_for(all_streamed, timeout=15, what="the second half in the log")
        async with Reader(platform.client, path(wf_id), headers={"Last-Event-ID": str(resume_at)}) as second:
            await wait_for(lambda: second.text("s").endswith(TOKENS[-1]), timeout=15,
                           what="the rest of the text after reconnecting")
            assert second.events[0][1] == "snapshot"
            entries = second.entries()
            assert_contiguous(entries, resume_at + 1)  # nothing repeated, nothing missed
            assert first.text("s") + second.text("s") == "".join(TOKENS)
            release.set()
            await asyncio.wait_for(second.ended.wait(), 15)  # the stream ends with the workflow
            kind, end = second.events[-1][1:]
            assert kind == "end" and end == {"status": "succeeded"}
            assert second.of("workflow", workflow_id=wf_id, status="succeeded")
            ids = [i for i, _, _ in second.events if i is not None]
            assert ids == sorted(ids) and ids[-1] == entries[-1]["seq"]  # every id is a log position
    # Chunks are for the workflow's own stream; the platform's carries the rest.
    assert not everything.of("chunk") and everything.of("progress", workflow_id=wf_id)

    # After the end, a new client gets the whole log from the store, then the end at once; and the query
    # parameter does what the header does, for clients that cannot send headers.
    async with Reader(platform.client, path(wf_id)) as late:
        await asyncio.wait_for(late.ended.wait(), 10)
    assert late.text("s") == "".join(TOKENS) and late.events[-1][1] == "end"
    assert_contiguous(late.entries())
    async with Reader(platform.client, path(wf_id), {"last_event_id": resume_at}) as queried:
        await asyncio.wait_for(queried.ended.wait(), 10)
    assert queried.entries() == late.entries()[resume_at:]


async def test_a_child_workflows_events_are_in_its_parents_stream(platform):
    child_id: asyncio.Future = asyncio.get_running_loop().create_future()
    go = asyncio.Event()
    agent = Agent("family-agent", settings=platform.settings)

    @agent.handler("parent")
    async def parent(task):
        reply = await task.run_workflow([{"id": "kid", "capability": "kid"}], name="the kid")
        return {"child": reply["status"]}

    @agent.handler("kid")
    async def kid(task):
        if not child_id.done():
            child_id.set_result(task.workflow_id)
        await go.wait()
        await task.progress(message="thinking", percent=10)
        await task.stream("hello from the child")
        await task.publish("kid.done", {"answer": 42})
        return {"ok": True}

    await platform.add_agent(agent)
    wf_id = await platform.submit({"tasks": [{"id": "p", "capability": "parent"}]})
    kid_id = await asyncio.wait_for(child_id, 15)
    async with Reader(platform.client, path(wf_id)) as family, Reader(platform.client, path(kid_id)) as own:
        go.set()
        await asyncio.wait_for(family.ended.wait(), 20)
        await asyncio.wait_for(own.ended.wait(), 20)
    [child] = family.of("child", workflow_id=wf_id)
    assert child["child_workflow_id"] == kid_id and child["task_id"] == "p" and child["name"] == "the kid"
    snapshot = family.events[0][2]
    assert [c["workflow_id"] for c in snapshot["children"]] == [kid_id]  # it existed when the client came
    for stream in (family, own):
        assert stream.text("kid") == "hello from the child"
        [published] = stream.of("published", workflow_id=kid_id)
        assert published["topic"] == "kid.done" and published["data"] == {"answer": 42}
        assert stream.of("progress", workflow_id=kid_id, task_id="kid")[-1]["progress"]["message"] == "thinking"
        assert stream.of("task", workflow_id=kid_id, task_id="kid", status="succeeded")
    # The parent's stream ends with the parent; the child's with the child, and has only the child's events.
    assert family.events[-1][1:] == ("end", {"status": "succeeded"})
    assert own.events[-1][1:] == ("end", {"status": "succeeded"})
    assert {d["workflow_id"] for _, e, d in own.events if e not in ("snapshot", "end")} == {kid_id}
    assert own.entries() and all(e["root"] == wf_id for e in own.entries())


async def test_a_question_is_in_the_stream_and_its_answer_resumes_the_task(platform):
    agent = Agent("asking-agent", settings=platform.settings)

    @agent.handler("ask")
    async def ask(task):
        answer = await task.ask("Ship it?", schema={"type": "string", "enum": ["yes", "no"]})
        await task.stream(f"the answer was {answer}")
        return {"answer": answer}

    await platform.add_agent(agent)
    wf_id = await platform.submit({"tasks": [{"id": "q", "capability": "ask"}]})
    async with Reader(platform.client, path(wf_id)) as stream:
        await wait_for(lambda: stream.of("input", task_id="q"), timeout=15, what="the question")
        [question] = stream.of("input", task_id="q")
        assert question["question"] == "Ship it?" and question["schema"]["enum"] == ["yes", "no"]
        await wait_for(lambda: stream.of("task", task_id="q", status="waiting_input"), timeout=10,
                       what="the task waiting for input")
        answer_path = f"/v1/workflows/{wf_id}/tasks/q/input"
        wrong = await platform.client.post(answer_path, json={"answer": "maybe"})
        assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "invalid_answer", wrong.text
        right = await platform.client.post(answer_path, json={"answer": "yes"})
        assert right.status_code == 200, right.text
        again = await platform.client.post(answer_path, json={"answer": "no"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "not_waiting"
        await asyncio.wait_for(stream.ended.wait(), 15)
    [answered] = stream.of("answer", task_id="q")
    assert answered["answer"] == "yes" and answered["key"] == question["key"]
    assert stream.text("q") == "the answer was yes"
    assert stream.events[-1][1:] == ("end", {"status": "succeeded"})
    assert_contiguous(stream.entries())


def parse(body: bytes) -> list[tuple[int | None, str, dict]]:
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in fields:
            seq = int(fields["id"]) if "id" in fields else None
            events.append((seq, fields["event"], orjson.loads(fields["data"])))
    return events


async def test_entries_that_come_live_out_of_order_or_never_are_sent_in_order_once(platform):
    """The broker delivers in order, and the watch gate opens within a round trip, so this test plays the
    broker's part to make the disorder a stream must survive: real entries, from the real store, handed
    to the stream's queue shuffled, repeated and some never. It sends each exactly once, in seq order (a
    missing one is read from the store), and finds the workflow's end by polling, its change never come."""
    more, release = asyncio.Event(), asyncio.Event()
    agent = Agent("token-agent", settings=platform.settings)

    @agent.handler("tokens")
    async def tokens(task):
        for i, token in enumerate(TOKENS[:100]):
            if i == 50:
                await more.wait()
            await task.stream(token)
            await task.reporter.flush()  # one entry per token
        await release.wait()
        return {}

    await platform.add_agent(agent)
    workflows, hub = platform.services["api"].workflows, platform.services["api"].events
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "tokens"}]})

    async def logged(n: int) -> list[dict]:
        log = await workflows.log_after(wf_id, 0)
        return log if len(log) >= n else []

    await wait_for(lambda: logged(50), timeout=15, what="the first 50 entries")
    client = hub.subscribe(wf_id, raw=True, root=wf_id)
    hub.unsubscribe(client)  # nothing comes to it but what this test hands it
    snapshot = {"at": time.time(), "workflow": await workflows.get(wf_id), "children": []}
    sent: list[bytes] = []

    async def send(message) -> None:
        sent.append(message.get("body", b""))

    stream = FamilyStream(hub, client, workflows, snapshot, after=10)
    pump = asyncio.create_task(stream._pump(send))
    received = lambda: parse(b"".join(sent))  # noqa: E731
    await wait_for(lambda: [e for e in received() if e[1] == "chunk"][-1:] and received()[-1][0] == 50,
                   timeout=10, what="the first entries, from the store")
    more.set()
    log = await wait_for(lambda: logged(100), timeout=15, what="the other 50 entries")
    live = [e for e in log[50:] if not 60 <= e["seq"] < 70 and e["seq"] != 100]  # 60-69 and 100 never come
    random.Random(7).shuffle(live)
    for entry in live + log[20:30] + live[:5]:  # and some come twice, or after they were read
        client.queue.put_nowait(entry)
    await wait_for(lambda: received()[-1][0] == 100, timeout=10, what="every entry, the missing ones read")
    release.set()
    await asyncio.wait_for(pump, 15)  # ended by itself: it polled the workflow's status
    events = received()
    chunks = [d for _, e, d in events if e == "chunk"]
    assert [d["seq"] for d in chunks] == list(range(11, 101))
    assert "".join(d["text"] for d in chunks) == "".join(TOKENS[10:100])
    assert events[0][1] == "snapshot" and events[-1] == (100, "end", {"status": "succeeded"})
    # The task's change never came live either: the poll found the task finished, and said so.
    assert [d["status"] for _, e, d in events if e == "task"] == ["succeeded"]


async def test_a_client_that_stops_reading_is_cut_off_and_can_resume(platform):
    """A client that never reads: its socket's buffers fill, then the server's send blocks, then its
    queue; it is cut off and its response ends. Reconnecting with its last id, it would miss nothing."""
    stop, done = asyncio.Event(), asyncio.Event()
    agent = Agent("chatty-agent", settings=platform.settings)

    @agent.handler("chatty")
    async def chatty(task):
        block = "x" * 4000
        deadline = time.monotonic() + 30
        for _ in range(5000):  # at most 20 MB, to fill the stuck client's socket buffers
            if stop.is_set() or time.monotonic() > deadline:
                break
            await task.stream(block)
        done.set()
        return {}

    await platform.add_agent(agent)
    hub = platform.services["api"].events
    wf_id = await platform.submit({"tasks": [{"id": "c", "capability": "chatty"}]})
    loop = asyncio.get_running_loop()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.setblocking(False)
    try:
        hub.client_queue = 5  # for the next client only (the real bound is 1000): a few changes fill it
        await loop.sock_connect(stuck, ("127.0.0.1", platform.settings.api_port))
        await loop.sock_sendall(stuck, f"GET {path(wf_id)} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await wait_for(lambda: hub.cut_off >= 1, timeout=20, what="the stuck client cut off")
        hub.client_queue = 1000
        assert not any(c.workflow_id == wf_id for c in hub.clients)
        async with asyncio.timeout(10):  # once it reads what its buffers hold, its response has ended
            while await loop.sock_recv(stuck, 1 << 20):
                pass
    finally:
        stuck.close()
        stop.set()
    await asyncio.wait_for(done.wait(), 10)
    await platform.wait(wf_id)
    async with Reader(platform.client, path(wf_id)) as whole:
        await asyncio.wait_for(whole.ended.wait(), 20)
    assert_contiguous(whole.entries())


@pytest.fixture
async def secured(settings):
    platform = Platform(settings.model_copy(update={"api_token": "admin-token"}))
    platform.client.headers["Authorization"] = "Bearer admin-token"
    try:
        await platform.start(services=("api",))
        yield platform
    finally:
        await platform.close()


async def test_unknown_or_anothers_workflow_is_404_and_a_bad_last_event_id_is_422(secured):
    client = secured.client

    async def token(name: str, role: str) -> dict:
        made = (await client.post("/v1/tokens", json={"name": name, "role": role})).json()
        return {"Authorization": f"Bearer {made['token']}"}

    alice, bob = await token("alice", "submitter"), await token("bob", "submitter")
    wf_id = await secured.submit({"tasks": [{"id": "t", "capability": "nobody-serves-this"}]}, headers=alice)
    for who, workflow in ((alice, "no-such-workflow"), (bob, wf_id), (None, "no-such-workflow")):
        answer = await client.get(path(workflow), headers=who)
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "workflow_not_found"
    anonymous = await client.get(path(wf_id), headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    for params, headers in (({}, {"Last-Event-ID": "yesterday"}), ({}, {"Last-Event-ID": "-1"}),
                            ({"last_event_id": "x"}, {}), ({"last_event_id": "-3"}, {})):
        answer = await client.get(path(wf_id), params=params, headers={**alice, **headers})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "invalid_request"
    # The owner may follow it, with the token in the query string as a browser's EventSource sends it.
    access = alice["Authorization"].split()[-1]
    async with Reader(client, path(wf_id), {"access_token": access}, headers={"Authorization": ""}) as own:
        await wait_for(lambda: own.events, timeout=10, what="the snapshot")
    assert own.status == 200 and own.events[0][1] == "snapshot"
    assert own.events[0][2]["workflow"]["tasks"][0]["id"] == "t"
    await wait_for(lambda: not secured.services["api"].events.clients, timeout=10,
                   what="the stream's client gone from the hub with its connection")
    doc = (await client.get("/openapi.json")).json()["paths"][path("{workflow_id}")]["get"]
    assert "text/event-stream" in doc["responses"]["200"]["content"]
    assert {p["name"] for p in doc["parameters"]} == {"workflow_id", "last_event_id", "last-event-id", "access_token"}
