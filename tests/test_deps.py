"""switchboard.deps on a real Redis: run with REDIS_URL=redis://127.0.0.1:6379/15 (skipped when unset)."""

from __future__ import annotations

import importlib.util
import os
import random
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis
from rq.job import Job, JobStatus

REDIS_URL = os.environ.get("REDIS_URL")
pytestmark = pytest.mark.skipif(
    not REDIS_URL, reason="REDIS_URL is not set; these tests need a real, disposable Redis (e.g. .../15)"
)

try:
    from switchboard.deps import TTL_SECONDS, DependencyGraph, _escape
except ImportError:
    # The package __init__ may import sibling modules that are not importable in this checkout yet;
    # deps.py has no package-internal imports, so load it on its own.
    _spec = importlib.util.spec_from_file_location(
        "switchboard.deps", Path(__file__).resolve().parents[1] / "libs" / "switchboard" / "deps.py"
    )
    _deps = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_deps)
    TTL_SECONDS, DependencyGraph, _escape = _deps.TTL_SECONDS, _deps.DependencyGraph, _deps._escape

DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


@pytest.fixture
def r():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def new_ns(r):
    """Factory of unique namespaces; every key containing one is deleted after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(f"t-{uuid.uuid4().hex}")
        return made[-1]

    yield make
    for ns in made:
        delete_keys(r, ns)


@pytest.fixture
def graph(r, new_ns):
    return DependencyGraph(r, new_ns())


def keys(r, text: str) -> list[str]:
    return sorted(k.decode() for k in r.scan_iter(match=f"*{text}*", count=1000))


def delete_keys(r, text: str) -> None:
    found = keys(r, text)
    if found:
        r.delete(*found)


def status(graph, wf: str, task: str) -> JobStatus:
    return Job.fetch(graph.job_id(wf, task), connection=graph.redis).get_status()


def topo_order(parents: dict[str, list[str]]) -> list[str]:
    done: list[str] = []
    seen: set[str] = set()
    while len(done) < len(parents):
        for task, ps in parents.items():
            if task not in seen and all(p in seen for p in ps):
                seen.add(task)
                done.append(task)
    return done


def frontier(parents: dict[str, list[str]], succeeded: set[str]) -> set[str]:
    """Non-root tasks that are not done and whose parents all are: what a replay must hand out."""
    return {t for t, ps in parents.items() if ps and t not in succeeded and all(p in succeeded for p in ps)}


def test_diamond_uses_rq_states(graph):
    wf = str(uuid.uuid4())
    graph.register(wf, DIAMOND)
    assert [status(graph, wf, t) for t in "abcd"] == [JobStatus.QUEUED] + [JobStatus.DEFERRED] * 3
    assert len(graph.deferred.get_job_ids()) == 3

    assert sorted(graph.release(wf, "a")) == ["b", "c"]
    assert status(graph, wf, "a") == JobStatus.FINISHED
    assert status(graph, wf, "b") == status(graph, wf, "c") == JobStatus.QUEUED
    assert graph.deferred.get_job_ids() == [graph.job_id(wf, "d")]

    assert graph.release(wf, "b") == []
    assert graph.release(wf, "c") == ["d"]
    assert graph.release(wf, "d") == []
    assert graph.deferred.get_job_ids() == []
    # Bookkeeping only: nothing is ever pushed onto an RQ queue or left in the ready registry.
    assert graph.queue.count == 0 and graph.ready.get_job_ids() == []


def test_register_is_idempotent(r, graph):
    wf = str(uuid.uuid4())
    graph.register(wf, DIAMOND)
    snapshot = {k: r.dump(k) for k in keys(r, wf)}
    graph.register(wf, DIAMOND)
    assert {k: r.dump(k) for k in keys(r, wf)} == snapshot
    assert sorted(graph.release(wf, "a")) == ["b", "c"]

    graph.register(wf, DIAMOND)  # must neither reset a/b/c nor release d early
    assert [status(graph, wf, t) for t in "abcd"] == [
        JobStatus.FINISHED, JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.DEFERRED,
    ]  # fmt: skip
    assert graph.release(wf, "b") == []
    graph.register(wf, DIAMOND)
    assert graph.release(wf, "c") == ["d"]
    graph.register(wf, DIAMOND)
    assert graph.release(wf, "b") == graph.release(wf, "c") == graph.release(wf, "a") == []


def test_double_release(graph):
    wf = str(uuid.uuid4())
    graph.register(wf, DIAMOND)
    assert sorted(graph.release(wf, "a")) == ["b", "c"]
    assert graph.release(wf, "a") == []
    assert graph.release(wf, "b") == []
    assert graph.release(wf, "b") == []
    assert graph.release(wf, "c") == ["d"]
    # RQ itself would leave d in b's dependents set; releasing b again must still not hand d out.
    assert graph.release(wf, "b") == graph.release(wf, "c") == []
    assert graph.release(wf, "d") == graph.release(wf, "d") == []


def test_release_unknown_task_raises(graph):
    from rq.exceptions import NoSuchJobError

    with pytest.raises(NoSuchJobError):
        graph.release("nope", "x")


BIG = {
    "a": [], "g": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"], "f": ["c"], "h": ["g"],
    "i": ["h", "f"], "j": ["e", "i"],
}  # fmt: skip
SUCCEEDED = {"a", "b", "c", "g"}  # a valid prefix: every succeeded task's parents succeeded too


def run_to(graph, wf, parents, succeeded):
    for task in topo_order(parents):
        if task in succeeded:
            graph.release(wf, task)


@pytest.mark.parametrize("how", ["fresh_namespace", "flushed_namespace"])
def test_rebuild_children_first_is_exact(r, new_ns, how):
    wf = str(uuid.uuid4())
    old = DependencyGraph(r, new_ns())
    old.register(wf, BIG)
    run_to(old, wf, BIG, SUCCEEDED)
    if how == "fresh_namespace":
        graph = DependencyGraph(r, new_ns())
    else:
        delete_keys(r, old.namespace)
        assert keys(r, old.namespace) == []
        graph = old

    graph.register(wf, BIG)
    out = []
    for task in reversed(topo_order(BIG)):
        if task in SUCCEEDED:
            out += graph.release(wf, task)
    assert sorted(out) == sorted(frontier(BIG, SUCCEEDED)) == ["d", "f", "h"]

    # ...and the rebuilt graph carries on normally.
    assert graph.release(wf, "d") == ["e"]
    assert graph.release(wf, "f") == []
    assert graph.release(wf, "h") == ["i"]
    assert graph.release(wf, "e") == []
    assert graph.release(wf, "i") == ["j"]


def test_rebuild_any_order_after_filtering_succeeded(r, new_ns):
    for seed in range(20):
        wf = str(uuid.uuid4())
        graph = DependencyGraph(r, new_ns())
        graph.register(wf, BIG)
        order = sorted(SUCCEEDED)
        random.Random(seed).shuffle(order)
        out = [t for task in order for t in graph.release(wf, task)]
        assert len(out) == len(set(out))
        assert set(out) - SUCCEEDED == frontier(BIG, SUCCEEDED)


def test_finished_parents_count_when_a_child_is_recreated(r, graph):
    """Partial loss: d's keys vanish after b (but not c) succeeded; re-register recreates d."""
    wf = str(uuid.uuid4())
    graph.register(wf, DIAMOND)
    graph.release(wf, "a")
    graph.release(wf, "b")
    r.delete(*keys(r, _escape(wf) + "__d"))
    graph.register(wf, DIAMOND)
    assert status(graph, wf, "d") == JobStatus.DEFERRED
    assert graph.release(wf, "c") == ["d"]  # b counts as finished
    assert graph.release(wf, "b") == []


def test_all_parents_finished_child_comes_out_on_rerelease(r, graph):
    wf = str(uuid.uuid4())
    graph.register(wf, DIAMOND)
    graph.release(wf, "a")
    graph.release(wf, "b")
    graph.release(wf, "c")
    r.delete(*keys(r, _escape(wf) + "__d"))
    graph.register(wf, DIAMOND)
    assert graph.release(wf, "c") == ["d"]
    assert graph.release(wf, "b") == []


@pytest.mark.parametrize("copies", [1, 2], ids=["each-parent-once", "each-parent-twice-concurrently"])
def test_concurrent_fan_in_exactly_once(r, graph, copies):
    rng = random.Random(copies)
    for _ in range(2):
        wf = str(uuid.uuid4())
        parents_of = [f"p{i}" for i in range(20)]
        dag = {p: [] for p in parents_of}
        for i in range(100):
            dag[f"c{i}"] = rng.sample(parents_of, rng.randint(2, 6))
        graph.register(wf, dag)

        callers = parents_of * copies
        barrier = threading.Barrier(len(callers))
        results: list[list[str]] = [[] for _ in callers]
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                g = DependencyGraph(redis.Redis.from_url(REDIS_URL), graph.namespace)  # own connection pool
                barrier.wait()
                results[i] = g.release(wf, callers[i])
                g.redis.close()
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(callers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        counts = Counter(c for res in results for c in res)
        assert counts == Counter({f"c{i}": 1 for i in range(100)})


def test_namespaces_are_isolated(r, new_ns):
    g1, g2 = DependencyGraph(r, new_ns()), DependencyGraph(r, new_ns())
    wf = "same-workflow"
    g1.register(wf, DIAMOND)
    g2.register(wf, DIAMOND)
    assert set(keys(r, g1.namespace)).isdisjoint(keys(r, g2.namespace))
    assert sorted(g1.release(wf, "a")) == ["b", "c"]
    assert status(g2, wf, "a") == JobStatus.QUEUED
    assert g1.release(wf, "b") == [] and g1.release(wf, "c") == ["d"]
    assert sorted(g2.release(wf, "a")) == ["b", "c"]
    g1.forget(wf, DIAMOND)
    assert keys(r, g1.namespace) == []
    assert g2.release(wf, "c") == [] and g2.release(wf, "b") == ["d"]


def test_forget_removes_every_key_of_the_workflow(r, graph):
    wf, other = str(uuid.uuid4()), str(uuid.uuid4())
    for w in (wf, other):
        graph.register(w, DIAMOND)
        graph.release(w, "a")
    assert keys(r, wf)
    graph.forget(wf, DIAMOND)
    assert keys(r, wf) == []
    for key in keys(r, graph.namespace):  # shared registries keep no member of it either
        if r.type(key) == b"zset":
            assert not [m for m in r.zrange(key, 0, -1) if wf.encode() in m]
    assert graph.release(other, "b") == [] and graph.release(other, "c") == ["d"]


def test_keys_expire(r, graph):
    wf = str(uuid.uuid4())
    graph.register(wf, DIAMOND)
    graph.release(wf, "a")
    for key in keys(r, graph.namespace):
        assert 0 < r.ttl(key) <= TTL_SECONDS, key


def test_ids_with_separators_and_unicode_do_not_collide(graph):
    # "a__b"/"c" vs "a"/"b__c" and friends must map to different jobs.
    graph.register("a__b", {"c": [], "x:y": ["c"]})
    graph.register("a", {"b__c": [], "x_y": ["b__c"], "ü/é": ["b__c"]})
    assert graph.job_id("a__b", "c") != graph.job_id("a", "b__c")
    assert graph.release("a__b", "c") == ["x:y"]
    assert sorted(graph.release("a", "b__c")) == ["x_y", "ü/é"]


def test_random_dag_of_200_tasks(graph):
    rng = random.Random(200)
    wf = str(uuid.uuid4())
    names = [f"t{i}" for i in range(200)]
    dag = {n: rng.sample(names[:i], rng.randint(0, min(i, 4))) for i, n in enumerate(names)}
    graph.register(wf, dag)

    ready = [t for t, ps in dag.items() if not ps]
    came_out = Counter(ready)
    done: set[str] = set()
    while ready:
        task = ready.pop(rng.randrange(len(ready)))
        done.add(task)
        for child in graph.release(wf, task):
            assert all(p in done for p in dag[child]), child
            came_out[child] += 1
            ready.append(child)
    assert came_out == Counter(names)
