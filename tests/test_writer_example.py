"""The writer example (example_agents/writer.py) end to end. With every service and `switchboard serve
agents` a process of its own: the draft streams to a reader of the workflow's event stream, the writer's
question makes its task waiting_input, the answer finishes the workflow, and the announcer hears
draft.published once. With the services in this process: a writer stopped while it waits resumes from
its checkpoint, and `switchboard demo` follows the writer and answers its question."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import httpx
import orjson

import example_agents
from example_agents import writer
from tests.harness import wait_for, wait_processes_ready

WRITE = {"name": "write", "tasks": [{"id": "w", "capability": "write",
                                    "payload": {"topic": "tides", "token_delay_s": 0.02}}]}


class Output:
    """The agents process's output lines, read as they come (so its pipe never fills)."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc, self.lines = proc, []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                self.lines.append(orjson.loads(line))

    def heard(self, wf_id: str) -> list[dict]:
        return [line for line in self.lines if line.get("logger") == "example_agents.writer"
                and line["msg"].startswith("heard draft.published") and line.get("workflow_id") == wf_id]


class Stream:
    """GET /v1/workflows/{id}/events in the background: (event, data) in arrival order."""

    def __init__(self, client: httpx.AsyncClient, wf_id: str):
        self.client, self.wf_id, self.events = client, wf_id, []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async with self.client.stream("GET", f"/v1/workflows/{self.wf_id}/events", timeout=None) as response:
            assert response.status_code == 200, await response.aread()
            fields: dict = {}
            async for line in response.aiter_lines():
                if line == "":
                    if "data" in fields:  # not a bare `retry:`
                        self.events.append((fields.get("event"), orjson.loads(fields["data"])))
                        if fields.get("event") == "end":
                            return
                    fields = {}
                elif not line.startswith(":") and ":" in line:
                    key, _, value = line.partition(":")
                    fields[key] = value.lstrip(" ")

    def of(self, event: str) -> list[dict]:
        if self.task.done():
            self.task.result()  # the stream failed: say why, rather than time out waiting
        return [data for name, data in self.events if name == event]


async def test_the_writer_streams_asks_and_publishes_and_the_announcer_hears_it_once(processes, settings):
    procs, ports = processes
    output = Output(procs["agents"])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=30) as client:
        await wait_processes_ready(client, settings, ports, procs)  # the writer and the announcer too
        wf_id = (await client.post("/v1/workflows", json=WRITE)).json()["workflow_id"]
        stream = Stream(client, wf_id)
        try:
            result = await _write_and_approve(client, wf_id, stream)
            # The announcer, another agent in the same process, heard it.
            await wait_for(lambda: output.heard(wf_id), what="the announcer hearing draft.published")
        finally:
            stream.task.cancel()
    # Once: counted after the process drained, so a second delivery would have shown by then.
    procs["agents"].send_signal(signal.SIGTERM)
    await asyncio.wait_for(procs["agents"].wait(), 60)
    await asyncio.wait_for(output.task, 10)
    heard = output.heard(wf_id)
    assert len(heard) == 1, heard
    assert result["event_id"] in heard[0]["msg"] and heard[0]["task_id"] == "w"


async def _write_and_approve(client: httpx.AsyncClient, wf_id: str, stream: Stream) -> dict:
    # The draft streams: in order, in more than one piece, and whole once the question comes.
    await wait_for(lambda: stream.of("input"), what="the writer's question", timeout=60)
    draft = writer.DRAFT.replace("{Topic}", "Tides")
    chunks = stream.of("chunk")
    assert "".join(c["text"] for c in chunks) == draft
    assert len(chunks) > 1, "the draft came in one piece: not streamed"
    assert [c["offset"] for c in chunks] == [sum(len(c["text"]) for c in chunks[:i]) for i in range(len(chunks))]
    assert stream.events[0][0] == "snapshot"
    assert any(p["progress"]["message"] == "drafting" for p in stream.of("progress"))

    # The question: the task waits for input, with the question and its checkpointed draft in view.
    question = stream.of("input")[0]
    assert question["task_id"] == "w" and question["question"] == "Publish this draft?"
    task = (await client.get(f"/v1/workflows/{wf_id}")).json()["tasks"][0]
    assert task["status"] == "waiting_input", task
    assert task["input"]["question"] == "Publish this draft?"
    assert task["checkpoint"]["state"] == {"draft": draft}
    url = f"/v1/workflows/{wf_id}/tasks/w/input"
    assert (await client.post(url, json={"answer": {"approve": "yes"}})).status_code == 422

    # The answer finishes it, and the writer announces the draft, which the workflow's stream shows.
    assert (await client.post(url, json={"answer": {"approve": True, "note": "ship it"}})).status_code < 300
    await asyncio.wait_for(stream.task, 60)  # the stream ends with the workflow
    view = (await client.get(f"/v1/workflows/{wf_id}")).json()
    assert view["status"] == "succeeded", view
    result = view["tasks"][0]["result"]
    assert result["published"] is True and result["note"] == "ship it" and result["resumed"] is False
    published = stream.of("published")
    assert [(p["topic"], p["event_id"]) for p in published] == [("draft.published", result["event_id"])]
    assert stream.events[-1][0] == "end"
    assert (await client.post(url, json={"answer": {"approve": True}})).status_code == 409
    return result


async def test_a_writer_that_was_stopped_while_waiting_resumes_from_its_checkpoint(platform):
    """The agent goes away while its question waits; the answer queues the task again, and the next
    attempt starts from the checkpointed draft with the stored answer: nothing is drafted twice."""
    first, announcer = writer.build(platform.settings)
    await platform.add_agent(first)
    await platform.add_agent(announcer)
    wf_id = await platform.submit(WRITE)
    stream = Stream(platform.client, wf_id)
    try:
        await wait_for(lambda: stream.of("input"), what="the writer's question", timeout=60)
        await platform.stop_agent(first)
        second, _ = writer.build(platform.settings)
        await platform.add_agent(second)
        answered = await platform.client.post(f"/v1/workflows/{wf_id}/tasks/w/input",
                                              json={"answer": {"approve": True}})
        assert answered.status_code < 300, answered.text
        view = await platform.wait(wf_id)
        await asyncio.wait_for(stream.task, 60)
    finally:
        stream.task.cancel()
    assert view["status"] == "succeeded", view
    task = view["tasks"][0]
    assert task["result"]["resumed"] is True and task["result"]["published"] is True
    assert {c["attempt"] for c in stream.of("chunk")} == {1}, "the draft was streamed again"
    assert "".join(c["text"] for c in stream.of("chunk")) == writer.DRAFT.replace("{Topic}", "Tides")
    assert len(stream.of("published")) == 1


async def test_switchboard_demo_streams_the_draft_and_answers_the_question(platform):
    for agent in example_agents.build(platform.settings):
        await platform.add_agent(agent)
    env = {**os.environ, "SWITCHBOARD_API_URL": str(platform.client.base_url)}
    for name in ("SWITCHBOARD_API_TOKEN", "SWITCHBOARD_TOKEN"):
        env.pop(name, None)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "switchboard"), "demo", "--only", "writer", "--output", "json",
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    done = orjson.loads(out)["writer"]  # stdout: that one document
    assert done["workflow"]["status"] == "succeeded"
    assert done["draft"] == writer.DRAFT.replace("{Topic}", "Tides")
    assert done["answers"] == [{"approve": True, "note": "approved by switchboard demo"}]
    assert [p["event_id"] for p in done["published"]] == [done["workflow"]["tasks"][0]["result"]["event_id"]]
    assert "Publish this draft?" in err.decode() and "waiting_input" in err.decode()
