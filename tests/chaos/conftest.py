"""Fixtures of the chaos tests: the scale (CHAOS_SCALE or --chaos-scale; 1 is the CI size), a seed
(CHAOS_SEED, printed, to replay a run), clusters of real processes, private servers, and a report of
every measurement, printed at the end of the session and written to CHAOS_RESULTS if set."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from tests.chaos.cluster import Cluster

_REPORT: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--chaos-scale", type=float, default=None,
                     help="size of the chaos scenarios: 1 (default) is the CI size; run_chaos uses more")


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: kills and restarts real processes and servers (tests/chaos)")


@pytest.fixture(scope="session")
def chaos_scale(pytestconfig) -> float:
    option = pytestconfig.getoption("--chaos-scale", default=None)
    return float(option if option is not None else os.environ.get("CHAOS_SCALE", "1"))


@pytest.fixture
def chaos_rng(request) -> random.Random:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"\n[{request.node.name}] CHAOS_SEED={seed}")
    return random.Random(f"{seed}:{request.node.name}")


class Report:
    def __init__(self, scenario: str, scale: float):
        self.scenario = scenario
        self.scale = scale
        self.began = time.monotonic()

    def add(self, **record) -> None:
        record = {"scenario": self.scenario, "scale": self.scale, **record}
        _REPORT.append(record)
        print(f"[chaos] {json.dumps(record)}", flush=True)


@pytest.fixture
def report(request, chaos_scale):
    rep = Report(request.node.name, chaos_scale)
    yield rep
    _REPORT.append({"scenario": rep.scenario, "scale": chaos_scale, "kind": "duration",
                    "seconds": round(time.monotonic() - rep.began, 1)})


@pytest.fixture
async def make_cluster(settings, tmp_path):
    """make_cluster(agents, settings=..., env=...) starts a cluster; all are stopped and cleaned up after."""
    clusters: list[Cluster] = []

    async def make(agents, *, cluster_settings=None, env=None, start=True) -> Cluster:
        cluster = Cluster(cluster_settings or settings, tmp_path / f"cluster{len(clusters)}", agents, env=env)
        clusters.append(cluster)
        if start:
            await cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            await cluster.stop()
            await cluster.cleanup(broker=cluster.settings.amqp_url == settings.amqp_url,
                                  redis=cluster.settings.redis_url == settings.redis_url)


def _s(value, width: int) -> str:
    return f"{value:.2f}s".rjust(width) if isinstance(value, (int, float)) else "-".rjust(width)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _REPORT:
        return
    write = terminalreporter.write_line
    terminalreporter.section("chaos: recovery times and sizes")
    kills = [r for r in _REPORT if "recovery_s" in r]
    if kills:
        write(f"{'scenario':<44} {'target':<14} {'downtime':>8} {'ready':>8} {'recovered':>10} "
              f"{'tasks outstanding':>17}")
        for r in kills:
            write(f"{r['scenario']:<44} {r['target']:<14} {_s(r.get('downtime_s'), 8)} {_s(r.get('ready_s'), 8)} "
                  f"{_s(r['recovery_s'], 10)} {r.get('tasks_outstanding', ''):>17}")
    for r in _REPORT:
        if r.get("kind") == "run":
            write(f"{r['scenario']}: {r['summary']}")
    for r in _REPORT:
        if r.get("kind") == "server":
            write(f"{r['scenario']}: {r['what']} {r['seconds']:.2f}s")
    for r in _REPORT:
        if r.get("kind") == "duration":
            write(f"{r['scenario']}: {r['seconds']:.1f}s in all")
    path = os.environ.get("CHAOS_RESULTS")
    if path:
        Path(path).write_text(json.dumps(_REPORT, indent=1))
