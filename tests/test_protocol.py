"""Pure logic: the envelope and workflow validation."""

from __future__ import annotations

import pytest

from switchboard.protocol import (Envelope, InvalidSpec, MessageType, Priority, WorkflowSpec, new_id,
                                  validate_workflow)


def check(tasks, *, max_payload_bytes=1000, max_tasks=100):
    validate_workflow(WorkflowSpec(tasks=tasks), max_payload_bytes=max_payload_bytes, max_tasks=max_tasks)


def test_envelope_roundtrip_and_defaults():
    env = Envelope(type=MessageType.TASK, workflow_id="w", task_id="t", attempt=2, payload={"x": [1, 2]},
                   priority=Priority.CRITICAL)
    back = Envelope.decode(env.encode())
    assert back == env
    assert Envelope.decode(b'{"type":"event"}').priority is Priority.NORMAL


@pytest.mark.parametrize("body", [b"", b"nope", b"[]", b'{"type":"bogus"}', b'{"type":"task","extra":1}',
                                  b'{"type":"task","attempt":"x"}'])
def test_envelope_refuses_what_is_not_one(body):
    with pytest.raises(ValueError):
        Envelope.decode(body)


def test_priorities_map_to_ascending_amqp_priorities():
    order = [Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL]
    assert [p.amqp for p in order] == sorted(p.amqp for p in order)


def test_ids_sort_by_creation():
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and ids[0] <= ids[-1]


def test_diamond_and_many_roots_are_valid():
    check([{"id": "a", "capability": "c"}, {"id": "z", "capability": "c"},
           {"id": "b", "capability": "c", "depends_on": ["a", "z"]},
           {"id": "d", "capability": "c", "depends_on": ["b", "a"]}])


@pytest.mark.parametrize("tasks,code", [
    ([], "empty_workflow"),
    ([{"id": "a", "capability": "c", "depends_on": ["x"]}], "unknown_dependency"),
    ([{"id": "a", "capability": "c"}, {"id": "a", "capability": "c"}], "duplicate_task_id"),
    ([{"id": "a", "capability": "c", "depends_on": ["b"]}, {"id": "b", "capability": "c", "depends_on": ["a"]}],
     "dependency_cycle"),
    ([{"id": "a", "capability": "c", "payload": {"k": "v" * 2000}}], "payload_too_large"),
    ([{"id": str(i), "capability": "c"} for i in range(101)], "too_many_tasks"),
])
def test_refusals_name_the_problem(tasks, code):
    with pytest.raises(InvalidSpec) as caught:
        check(tasks)
    assert caught.value.code == code


def test_cycle_is_reported_as_a_path():
    with pytest.raises(InvalidSpec, match="b -> d -> c -> b"):
        check([{"id": "a", "capability": "c"}, {"id": "b", "capability": "c", "depends_on": ["a", "d"]},
               {"id": "c", "capability": "c", "depends_on": ["b"]}, {"id": "d", "capability": "c", "depends_on": ["c"]}])


def test_a_deep_chain_does_not_hit_the_recursion_limit():
    chain = [{"id": "t0", "capability": "c"}] + [
        {"id": f"t{i}", "capability": "c", "depends_on": [f"t{i - 1}"]} for i in range(1, 5000)]
    check(chain, max_tasks=5000)
    chain[0]["depends_on"] = ["t4999"]
    with pytest.raises(InvalidSpec, match="cycle"):
        check(chain, max_tasks=5000)
