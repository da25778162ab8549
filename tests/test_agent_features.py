"""What agents need beyond a task queue, across the real services: progress and streamed output, a
question for a person, checkpoints, and events between agents."""

from __future__ import annotations

import asyncio

from switchboard import Agent, TaskError

from tests.harness import wait_for


def task_of(view: dict, task_id: str = "t") -> dict:
    return next(t for t in view["tasks"] if t["id"] == task_id)


async def task_view(platform, wf_id: str, task_id: str = "t") -> dict:
    return task_of((await platform.client.get(f"/v1/workflows/{wf_id}")).json(), task_id)


async def agent_with(platform, capability: str, handler, *, name: str | None = None, concurrency: int = 4) -> Agent:
    agent = Agent(name or f"{capability}-agent", settings=platform.settings, concurrency=concurrency)
    agent.handler(capability)(handler)
    return await platform.add_agent(agent)


async def test_progress_and_streamed_text_are_recorded_in_order(platform):
    release = asyncio.Event()

    async def write(task):
        for i in range(300):
            await task.stream(f"{i} ")
            if i % 50 == 0:
                await task.progress(message=f"token {i}", percent=i / 3)
        await task.progress(message="done", percent=100, data={"tokens": 300})
        await release.wait()
        return "ok"

    await agent_with(platform, "write", write)
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "write"}]})

    async def progress_done():
        return (await task_view(platform, wf_id))["progress"] or {}

    progress = await wait_for(lambda: _when(progress_done, lambda p: p.get("message") == "done"),
                              what="the last progress recorded")
    assert progress["percent"] == 100 and progress["data"] == {"tokens": 300} and progress["attempt"] == 1
    release.set()
    assert (await platform.wait(wf_id))["status"] == "succeeded"
    log = await platform.services["api"].workflows.log_after(wf_id, 0)
    chunks = [e for e in log if e["event"] == "chunk"]
    text = "".join(c["text"] for c in chunks)
    assert text == "".join(f"{i} " for i in range(300))
    assert [c["offset"] for c in chunks] == sorted(c["offset"] for c in chunks)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    assert len(chunks) < 300  # coalesced: several chunks a message


async def _when(read, accept):
    value = await read()
    return value if accept(value) else None


async def test_a_question_waits_for_its_answer_which_is_validated_and_stored(platform):
    asked = []

    async def approve(task):
        asked.append(task.attempt)
        answer = await task.ask("Publish?", schema={"type": "object", "required": ["approve"],
                                                    "properties": {"approve": {"type": "boolean"}}})
        if task.attempt == 1:
            raise TaskError("fails once after the answer, to show the retry does not ask again")
        return {"answer": answer, "attempt": task.attempt}

    await agent_with(platform, "approve", approve)
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "approve", "retry": {"base_s": 0, "max_s": 0}}]})

    async def waiting():
        view = await task_view(platform, wf_id)
        return view if view["status"] == "waiting_input" else None

    view = await wait_for(waiting, what="the task waiting for input")
    assert view["input"]["question"] == "Publish?" and view["input"]["schema"]["required"] == ["approve"]
    url = f"/v1/workflows/{wf_id}/tasks/t/input"
    bad = await platform.client.post(url, json={"answer": {"approve": "yes"}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_answer"
    assert "approve" in bad.json()["error"]["message"]
    assert (await task_view(platform, wf_id))["status"] == "waiting_input"  # the bad answer changed nothing
    missing = await platform.client.post(f"/v1/workflows/{wf_id}/tasks/nope/input", json={"answer": 1})
    assert missing.status_code == 404
    good = await platform.client.post(url, json={"answer": {"approve": True}})
    assert good.status_code == 200, good.text
    again = await platform.client.post(url, json={"answer": {"approve": False}})
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_waiting"
    done = await platform.wait(wf_id)
    assert done["status"] == "succeeded"
    assert task_of(done)["result"] == {"answer": {"approve": True}, "attempt": 2}
    assert asked == [1, 2]  # attempt 2 reached the same question and got the stored answer at once
    assert list(task_of(done)["answers"].values()) == [{"approve": True}]


async def test_an_unanswered_question_times_out_and_the_task_follows_its_retry_policy(platform):
    async def impatient(task):
        return await task.ask("Anyone?", timeout_s=0.3)

    await agent_with(platform, "impatient", impatient)
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "impatient", "max_attempts": 2,
                                              "retry": {"base_s": 0, "max_s": 0}}]})
    view = await platform.wait(wf_id)
    task = task_of(view)
    assert view["status"] == "failed" and task["attempts"] == 2
    assert task["error"]["type"] == "TaskError" and "no answer to 'Anyone?' within 0.3s" in task["error"]["message"]


async def test_waiting_for_an_answer_holds_no_slot_and_does_not_count_against_the_timeout(platform):
    async def slow_question(task):
        return await task.ask("Slow?")

    async def quick(task):
        return "quick"

    agent = Agent("one-slot", settings=platform.settings, concurrency=1)
    agent.handler("slow_question")(slow_question)
    agent.handler("quick")(quick)
    await platform.add_agent(agent)
    asking = await platform.submit({"tasks": [{"id": "t", "capability": "slow_question", "timeout_s": 0.5}]})

    async def waiting():
        return (await task_view(platform, asking))["status"] == "waiting_input"

    await wait_for(waiting, what="the question asked")
    # With its only slot given up, the agent runs other work meanwhile.
    other = await platform.submit({"tasks": [{"id": "t", "capability": "quick"}]})
    assert (await platform.wait(other))["status"] == "succeeded"
    # Three times the task's 0.5 s timeout passes while it waits (the agent's clock, which would fail it,
    # is stopped; the watchdog's deadline is lifted): it still waits.
    await wait_for(lambda: _older_than(platform, asking, 1.5), timeout=30, what="time passing")
    assert (await task_view(platform, asking))["status"] == "waiting_input"
    answered = await platform.client.post(f"/v1/workflows/{asking}/tasks/t/input", json={"answer": "yes"})
    assert answered.status_code == 200
    view = await platform.wait(asking)
    assert view["status"] == "succeeded" and task_of(view)["result"] == "yes"


async def _older_than(platform, wf_id: str, seconds: float) -> bool:
    import time

    view = await task_view(platform, wf_id)
    return time.time() - view["started_at"] > seconds


async def test_an_answer_whose_agent_is_gone_runs_the_task_again_with_the_answer(platform):
    async def question(task):
        return {"answer": await task.ask("Still there?"), "attempt": task.attempt}

    first = await agent_with(platform, "question", question, name="first-asker")
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "question"}]})

    async def waiting():
        return (await task_view(platform, wf_id))["status"] == "waiting_input"

    await wait_for(waiting, what="the question asked")
    await platform.stop_agent(first)  # its waiting handler is dropped; the store keeps the question
    assert (await task_view(platform, wf_id))["status"] == "waiting_input"
    await agent_with(platform, "question", question, name="second-asker")
    answered = await platform.client.post(f"/v1/workflows/{wf_id}/tasks/t/input", json={"answer": 42})
    assert answered.status_code == 200
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded"
    assert task_of(view)["result"] == {"answer": 42, "attempt": 2} and task_of(view)["ran_on"] == "second-asker"


async def test_a_checkpoint_is_seen_by_the_next_attempt_and_bounded(platform):
    steps = []

    async def resumable(task):
        start = (task.checkpoint_state or {}).get("step", 0)
        for step in range(start + 1, 6):
            steps.append((task.attempt, step))
            await task.checkpoint({"step": step})
            if step == 3 and task.attempt == 1:
                raise TaskError("crashes after step 3")
        return {"steps": 5}

    async def too_big(task):
        await task.checkpoint({"blob": "x" * (platform.settings.max_payload_bytes + 1)})

    await agent_with(platform, "resumable", resumable)
    await agent_with(platform, "too_big", too_big)
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "resumable", "retry": {"base_s": 0, "max_s": 0}}]})
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded"
    assert steps == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    assert task_of(view)["checkpoint"]["state"] == {"step": 5} and task_of(view)["checkpoint"]["attempt"] == 2
    big = await platform.wait(await platform.submit({"tasks": [{"id": "t", "capability": "too_big", "max_attempts": 1}]}))
    assert big["status"] == "failed" and "checkpoint is" in task_of(big)["error"]["message"]


async def test_each_subscribed_agent_name_gets_each_event_once_shared_among_its_replicas(platform):
    heard: dict[str, list] = {"auditor": [], "indexer": []}

    def subscriber(name: str, pattern: str) -> Agent:
        agent = Agent(name, settings=platform.settings)

        @agent.on_event(pattern)
        async def on_event(event):
            heard[name].append((event.id, event.topic, event.data, event.workflow_id))

        return agent

    for replica in range(2):  # two replicas of the auditor share its queue
        await platform.add_agent(subscriber("auditor", "draft.*"))
    await platform.add_agent(subscriber("indexer", "draft.#"))

    async def announce(task):
        return await task.publish("draft.published", {"title": task.payload["title"]})

    await agent_with(platform, "announce", announce)
    wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "announce", "payload": {"title": "T"}}]})
    view = await platform.wait(wf_id)
    event_id = task_of(view)["result"]
    outside = await platform.agents[0].publish("draft.other.deep", {"n": 1})  # only draft.# matches it
    await wait_for(lambda: len(heard["indexer"]) == 2 and len(heard["auditor"]) == 1, what="events delivered")
    assert heard["auditor"] == [(event_id, "draft.published", {"title": "T"}, wf_id)]
    assert sorted(heard["indexer"], key=lambda e: e[1]) == [(outside, "draft.other.deep", {"n": 1}, None),
                                                            (event_id, "draft.published", {"title": "T"}, wf_id)]
    log = await platform.services["api"].workflows.log_after(wf_id, 0)
    assert [(e["event"], e["topic"], e["event_id"]) for e in log] == [("published", "draft.published", event_id)]


async def test_a_bad_topic_is_refused_at_the_sdk():
    import pytest

    from switchboard import tasklog

    for topic in ("", "a..b", "draft.*", "x" * 70):
        with pytest.raises(ValueError):
            tasklog.check_topic(topic)
    assert tasklog.topic_matches("draft.#", "draft") and tasklog.topic_matches("draft.*", "draft.x")
    assert not tasklog.topic_matches("draft.*", "draft.x.y") and tasklog.topic_matches("#.y", "draft.x.y")


async def test_a_task_whose_agent_is_killed_resumes_from_its_checkpoint_on_another(platform, tmp_path):
    await killed_after_step_6_resumes_at_7(platform, str(tmp_path / "steps.jsonl"))


async def killed_after_step_6_resumes_at_7(platform, log: str, urls: dict[str, str] | None = None) -> None:
    """The handler of tests/steps_agent.py checkpoints after each of 10 steps; its first agent is SIGKILLed
    after step 6, and the second, started only then, resumes at step 7: each step runs once."""
    import signal

    from tests import steps_agent

    names = list(urls or ("steps-a", "steps-b"))
    open(log, "wb").close()
    first = await steps_agent.spawn(platform.settings, names[0], log, "--stop-after", "6",
                                    amqp_url=(urls or {}).get(names[0]))
    second = None
    try:
        await wait_for(platform._registered(names[0]), what="the first agent registered")
        wf_id = await platform.submit({"tasks": [{"id": "t", "capability": "steps", "timeout_s": 120}]})
        await wait_for(lambda: steps_agent.stopped(log, 6), what="step 6 checkpointed")
        second = await steps_agent.spawn(platform.settings, names[1], log, amqp_url=(urls or {}).get(names[1]))
        await wait_for(platform._registered(names[1]), what="the second agent registered")
        first.send_signal(signal.SIGKILL)
        await first.wait()
        view = await platform.wait(wf_id, timeout=60)
        assert view["status"] == "succeeded"
        assert task_of(view)["result"] == {"resumed_after": 6, "agent": names[1]}
        assert steps_agent.ran(log) == [(names[0], s) for s in range(1, 7)] + [(names[1], s) for s in range(7, 11)]
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        platform._queues |= {platform.topology.agent_queue(n) for n in names}
        platform._queues.add(platform.topology.capability_queue("steps"))


async def test_a_full_subscription_queue_dead_letters_new_events_and_holds_nothing_up(platform, monkeypatch):
    from switchboard import topology

    monkeypatch.setattr(topology, "SUBSCRIPTION_BACKLOG", 2)
    away = Agent("away", settings=platform.settings)

    @away.on_event("news.#")
    async def on_news(event):
        pass

    await platform.add_agent(away)
    await platform.stop_agent(away)  # its durable queue stays, bound, and fills up
    platform._queues.add(platform.topology.subscription_queue("away"))

    async def announce(task):
        return [await task.publish("news.item", {"n": n}) for n in range(4)]

    await agent_with(platform, "announce", announce)
    view = await platform.wait(await platform.submit({"tasks": [{"id": "t", "capability": "announce"}]}))
    assert view["status"] == "succeeded"  # the full queue did not hold up the publisher
    ids = task_of(view)["result"]

    async def dead_lettered():
        letters = (await platform.client.get("/v1/dlq", params={"reason": "maxlen"})).json()["dead_letters"]
        return letters if len(letters) == 2 else None

    letters = await wait_for(dead_lettered, what="the two events over the bound dead-lettered")
    assert sorted(letter["envelope"]["message_id"] for letter in letters) == sorted(ids[2:])
