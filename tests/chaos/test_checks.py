"""The chaos checks themselves catch what they claim to (no servers needed): a lost task, a result that
no run produced, a result recorded twice, a dependent that ran before its parent or on other inputs."""

from __future__ import annotations

import copy

import pytest

from tests.chaos.cluster import check

pytestmark = pytest.mark.chaos

WF = "wf1"
SPECS = {WF: {"name": "w", "tasks": [{"id": "a", "depends_on": []}, {"id": "b", "depends_on": ["a"]}]}}


def _event(kind, task, run, t, inputs=None, attempt=1):
    inputs = inputs or {}
    return {"event": kind, "wf": WF, "task": task, "attempt": attempt, "run": run, "t": t, "agent": "x",
            "inputs": sorted(inputs), "input_runs": inputs}


def _good():
    view = {"workflow_id": WF, "status": "succeeded", "created_at": 0.0, "finished_at": 2.0, "tasks": [
        {"id": "a", "status": "succeeded", "result": {"run": "ra"}, "depends_on": [], "attempts": 1,
         "error": None, "reason": None},
        {"id": "b", "status": "succeeded", "result": {"run": "rb"}, "depends_on": ["a"], "attempts": 1,
         "error": None, "reason": None}]}
    events = [_event("start", "a", "ra", 0.1), _event("end", "a", "ra", 0.2),
              _event("start", "b", "rb", 0.3, {"a": "ra"}), _event("end", "b", "rb", 0.4, {"a": "ra"})]
    return {WF: view}, events


def test_a_clean_run_passes():
    views, events = _good()
    verdict = check(views, SPECS, events, stored=1)
    assert (verdict.tasks, verdict.runs, verdict.duplicate_runs) == (2, 2, 0)


def test_a_duplicate_run_of_an_attempt_is_counted_not_failed():
    views, events = _good()
    events += [_event("start", "b", "rb2", 0.5, {"a": "ra"}), _event("end", "b", "rb2", 0.6, {"a": "ra"})]
    assert check(views, SPECS, events).duplicate_runs == 1


@pytest.mark.parametrize("breakage, message", [
    ("lost", "did not succeed"),
    ("fake result", "never ended"),
    ("early child", "before parent"),
    ("wrong input", "the recorded one is"),
    ("recorded twice", "changed after it was recorded"),
    ("submitted twice", "the store holds 2 workflows"),
])
def test_each_violation_is_caught(breakage, message):
    views, events = _good()
    views = copy.deepcopy(views)
    changes, stored = [], 1
    if breakage == "lost":
        views[WF]["status"] = "running"
        views[WF]["tasks"][1].update(status="pending", result=None)
    elif breakage == "fake result":
        views[WF]["tasks"][1]["result"] = {"run": "nobody"}
    elif breakage == "early child":
        events[2]["t"] = 0.15
    elif breakage == "wrong input":
        events[2]["input_runs"] = {"a": "another-run"}
    elif breakage == "recorded twice":
        changes = ["wf1/b: recorded {'run': 'rb'} then {'run': 'rb2'}"]
    elif breakage == "submitted twice":
        stored = 2
    with pytest.raises(AssertionError, match=message):
        check(views, SPECS, events, changes=changes, stored=stored)
