"""Locust user classes of the load tests: what each simulated client does against the REST API.

load/run.py starts `locust -f load/locustfile.py <classes>` in a process of its own (locust patches the
standard library with gevent on import, which must not happen in a process running asyncio) and picks
the classes of a scenario by name. Settings come from the environment, set by load/run.py:

  LOAD_CAPABILITY  capability of every task (an agent serving it must be running)
  LOAD_IDS         file this process appends "<workflow id> <tasks>" to, one line per accepted workflow
  LOAD_STATS       file the final statistics go to as JSON when the run stops (locust's CSVs are
                   written once a second, so their last rows can miss the last requests)
  LOAD_TOKEN       bearer token, if the api wants one
  LOAD_WAIT        "lo,hi": seconds each user waits between two of its tasks
  LOAD_FANOUT      width of the fan-out workflows (100)
  LOAD_LONGPOLL_S  the `wait` of a long-poll (10)

Each scenario is one user class whose weighted tasks make its mix, so that every user does all of it
however few users there are. Every request is named by its endpoint and kind ("POST /v1/workflows
[dag]"), so locust's statistics are per endpoint. Any status but the expected one is a failure, 429
(rate limited) included.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import gevent
from locust import FastHttpUser, between, events, task

CAPABILITY = os.environ.get("LOAD_CAPABILITY", "noop")
TOKEN = os.environ.get("LOAD_TOKEN", "")
WAIT_LO, WAIT_HI = (float(x) for x in os.environ.get("LOAD_WAIT", "0.5,1.5").split(","))
FANOUT = int(os.environ.get("LOAD_FANOUT", "100"))
LONGPOLL_S = float(os.environ.get("LOAD_LONGPOLL_S", "10"))
POLL_EVERY_S = 0.2  # a short-polling client's pace (load generation, not synchronisation)
FOLLOW_FOR_S = 60.0  # a polling user follows its workflow at most this long, then moves on
TERMINAL = {"succeeded", "failed", "cancelled", "budget_exceeded"}

_ids_file = None
_serial = itertools.count()


@events.test_start.add_listener
def _start(environment, **kwargs) -> None:
    global _ids_file
    path = os.environ.get("LOAD_IDS")
    if path:
        _ids_file = open(path, "a", encoding="ascii")  # noqa: SIM115 (open for the whole run)


@events.test_stop.add_listener
def _finish(environment, **kwargs) -> None:
    """Every user has stopped: close the ids file and write the final statistics."""
    global _ids_file
    if _ids_file is not None:
        _ids_file.close()
        _ids_file = None
    if path := os.environ.get("LOAD_STATS"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(final_stats(environment), f, indent=2)


def _entry(entry) -> dict:
    """Locust keeps response times in buckets (above 100 ms, to 10 ms), so a percentile may round past
    the slowest request: it is capped there."""
    if not entry.num_requests:
        return {"name": entry.name, "requests": 0, "failures": entry.num_failures, "p50_ms": None,
                "p95_ms": None, "p99_ms": None, "max_ms": None, "rps": 0.0}
    slowest = round(entry.max_response_time)
    return {"name": entry.name, "requests": entry.num_requests, "failures": entry.num_failures,
            **{f"p{round(q * 100)}_ms": min(entry.get_response_time_percentile(q), slowest) for q in (0.5, 0.95, 0.99)},
            "max_ms": slowest, "rps": round(entry.total_rps, 2)}


def final_stats(environment) -> dict:
    stats = environment.stats
    endpoints = [_entry(e) for _, e in sorted(stats.entries.items(), key=lambda kv: kv[0])]
    total = {**_entry(stats.total), "name": "all requests"}
    failures = [{"endpoint": e.name, "error": e.to_name(), "occurrences": e.occurrences}
                for e in stats.errors.values()]
    exceptions = [{"count": e["count"], "message": e["msg"]} for e in environment.runner.exceptions.values()]
    return {"endpoints": endpoints, "total": total, "failures": failures, "exceptions": exceptions}


def single() -> tuple[str, dict, str]:
    return "/v1/tasks", {"capability": CAPABILITY, "payload": {"n": next(_serial)}}, "POST /v1/tasks"


def dag() -> tuple[str, dict, str]:
    """a -> (b1, b2, b3) -> c"""
    tasks = [{"id": "a", "capability": CAPABILITY, "payload": {"n": next(_serial)}}]
    tasks += [{"id": f"b{i}", "capability": CAPABILITY, "depends_on": ["a"]} for i in (1, 2, 3)]
    tasks.append({"id": "c", "capability": CAPABILITY, "depends_on": ["b1", "b2", "b3"]})
    return "/v1/workflows", {"name": "load-dag", "tasks": tasks}, "POST /v1/workflows [dag]"


def fanout() -> tuple[str, dict, str]:
    """root -> (c0 .. c<FANOUT-1>) -> join"""
    children = [f"c{i}" for i in range(FANOUT)]
    tasks = [{"id": "root", "capability": CAPABILITY, "payload": {"n": next(_serial)}}]
    tasks += [{"id": c, "capability": CAPABILITY, "depends_on": ["root"]} for c in children]
    tasks.append({"id": "join", "capability": CAPABILITY, "depends_on": children})
    return "/v1/workflows", {"name": "load-fanout", "tasks": tasks}, f"POST /v1/workflows [fan-out {FANOUT}]"


class _ApiUser(FastHttpUser):
    abstract = True
    wait_time = between(WAIT_LO, WAIT_HI)
    default_headers = {"authorization": f"Bearer {TOKEN}"} if TOKEN else None

    def submit(self, request) -> str | None:
        """POSTs one workflow (or task); returns its id and records it, or None after a failure."""
        path, body, name = request
        with self.client.post(path, json=body, name=name, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
                return None
            workflow_id = response.json()["workflow_id"]
        if _ids_file is not None:
            _ids_file.write(f"{workflow_id} {len(body.get('tasks', [body]))}\n")
        return workflow_id

    def follow(self, workflow_id: str, *, wait: float) -> None:
        """GETs the workflow until it is terminal: every POLL_EVERY_S (wait=0), or long-polling."""
        params, name = ({"wait": wait}, f"GET /v1/workflows/{{id}}?wait={wait:g}") if wait else \
            ({}, "GET /v1/workflows/{id}")
        deadline = time.monotonic() + FOLLOW_FOR_S
        while time.monotonic() < deadline:
            with self.client.get(f"/v1/workflows/{workflow_id}", params=params, name=name,
                                 catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
                    return
                status = response.json()["status"]
                if status in TERMINAL:
                    if status != "succeeded":
                        response.failure(f"workflow {workflow_id} {status}")
                    return
            if not wait:
                gevent.sleep(POLL_EVERY_S)


# --- the scenarios ---------------------------------------------------------------------------------
class MixUser(_ApiUser):
    """Single tasks, DAGs and fan-outs, fire and forget."""

    @task(6)
    def submit_task(self) -> None:
        self.submit(single())

    @task(3)
    def submit_dag(self) -> None:
        self.submit(dag())

    @task(1)
    def submit_fanout(self) -> None:
        self.submit(fanout())


class PollUser(_ApiUser):
    """Submits a DAG, then follows it to the end: short polls or long polls, half and half."""

    @task
    def submit_and_poll(self) -> None:
        if workflow_id := self.submit(dag()):
            self.follow(workflow_id, wait=0)

    @task
    def submit_and_long_poll(self) -> None:
        if workflow_id := self.submit(dag()):
            self.follow(workflow_id, wait=LONGPOLL_S)


class BurstUser(_ApiUser):
    """Tasks and DAGs back to back (run with LOAD_WAIT 0,0 and every user started at once)."""

    @task(3)
    def burst_task(self) -> None:
        self.submit(single())

    @task(1)
    def burst_dag(self) -> None:
        self.submit(dag())


class SoakUser(_ApiUser):
    """mix and poll together, for a long run at a steady pace."""

    @task(6)
    def submit_task(self) -> None:
        self.submit(single())

    @task(3)
    def submit_dag(self) -> None:
        self.submit(dag())

    @task(1)
    def submit_fanout(self) -> None:
        self.submit(fanout())

    @task(1)
    def submit_and_poll(self) -> None:
        if workflow_id := self.submit(dag()):
            self.follow(workflow_id, wait=0)

    @task(1)
    def submit_and_long_poll(self) -> None:
        if workflow_id := self.submit(dag()):
            self.follow(workflow_id, wait=LONGPOLL_S)
