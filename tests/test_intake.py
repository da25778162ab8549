"""Intake on the real store: a late announcement never runs a workflow's roots twice, while an intake
that died half-way is redone; a workflow that waits on nothing starts when it is stored."""

from __future__ import annotations

import pytest

from switchboard.protocol import WorkflowSpec
from switchboard.settings import Settings
from switchboard.state import pack
from switchboard.state.sqlite import SqliteStore
from switchboard.workflows import FollowUps, WorkflowStore


@pytest.fixture
async def workflows(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    yield WorkflowStore(store, Settings(namespace="t"))
    await store.close()


async def test_intake_sends_roots_once_unless_redelivered_or_unfinished(workflows):
    spec = WorkflowSpec(tasks=[{"id": "a", "capability": "c"}, {"id": "b", "capability": "c", "depends_on": ["a"]}])
    [wf], started, _ = await workflows.create([spec])
    assert started == []  # it has dependencies: a coordinator takes it in
    graphs, out = await workflows.start([wf])
    assert [e.task_id for e in out.dispatch] == ["a"] and graphs == {wf: {"a": [], "b": ["a"]}}
    # Died before taken_in(): the sweep finds it and sends the queued root again.
    assert await workflows.unscheduled(older_than_s=-1) == [wf]
    _, again = await workflows.start([wf])
    assert [e.task_id for e in again.dispatch] == ["a"]
    await workflows.taken_in([wf])
    assert await workflows.unscheduled(older_than_s=-1) == []
    # A late announcement after the sweep took it in: nothing is sent twice.
    _, late = await workflows.start([wf])
    assert late.dispatch == []
    # A redelivered announcement (we died after publishing) may send again: at least once.
    _, redelivered = await workflows.start([wf], redelivered=True)
    assert [e.task_id for e in redelivered.dispatch] == ["a"]


async def test_taking_a_workflow_up_claims_it_from_the_sweep(workflows):
    [wf], _, _ = await workflows.create([WorkflowSpec(tasks=[{"id": "a", "capability": "c"}])])
    await workflows.store.transact(lambda tr: tr.set(pack("t", "unscheduled", wf), b"0"))  # stored long ago
    assert await workflows.unscheduled(older_than_s=60) == [wf]
    await workflows.start([wf])  # an intake under way, not finished yet
    assert await workflows.unscheduled(older_than_s=60) == []
    assert await workflows.unscheduled(older_than_s=-1) == [wf]  # ...until it is overdue


async def test_a_workflow_that_waits_on_nothing_starts_when_stored(workflows):
    spec = WorkflowSpec(tasks=[{"id": "a", "capability": "c"}, {"id": "b", "capability": "c"}])
    [wf], started, out = await workflows.create([spec], "key")
    assert started == [wf] and sorted(e.task_id for e in out.dispatch) == ["a", "b"]
    assert (await workflows.get(wf))["status"] == "running"
    # Until the caller says its tasks were published, the sweep may send them again.
    assert await workflows.unscheduled(older_than_s=-1) == [wf]
    _, again = await workflows.start([wf])
    assert sorted(e.task_id for e in again.dispatch) == ["a", "b"]
    await workflows.taken_in([wf])
    # The same key and body: the same workflow, not started twice.
    assert await workflows.create([spec], "key") == ([wf], [], FollowUps())
