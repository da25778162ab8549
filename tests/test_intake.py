"""Intake on the real store: a late announcement never runs a workflow's roots twice, while an intake
that died half-way is redone."""

from __future__ import annotations

from switchboard.protocol import WorkflowSpec
from switchboard.settings import Settings
from switchboard.state.sqlite import SqliteStore
from switchboard.workflows import WorkflowStore


async def test_intake_sends_roots_once_unless_redelivered_or_unfinished(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    workflows = WorkflowStore(store, Settings(namespace="t"))
    try:
        spec = WorkflowSpec(tasks=[{"id": "a", "capability": "c"}, {"id": "b", "capability": "c", "depends_on": ["a"]}])
        [wf] = await workflows.create([spec])
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
    finally:
        await store.close()
