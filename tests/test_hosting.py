"""Many agents in one process (switchboard.hosting): one connection, one heartbeat loop, and every agent
gets work; 1,000 agents across 4 real `switchboard host` processes register, are load-balanced, heartbeat
without a failure and stop without a warning."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import sys
import time

import httpx
import pytest

from switchboard.hosting import AgentHost, load
from switchboard.topology import Topology
from tests import many_agents
from tests.harness import cleanup, free_port, listed_agents, process_env, wait_for


async def alive(client: httpx.AsyncClient, prefix: str) -> set[str]:
    agents = await listed_agents(client, "/v1/agents", capability=many_agents.CAPABILITY) or []
    return {a["name"] for a in agents if a["name"].startswith(prefix) and a["status"] == "alive"}


def fan(count: int, sleep_s: float) -> list[dict]:
    return [{"tasks": [{"id": "t", "capability": many_agents.CAPABILITY, "payload": {"sleep_s": sleep_s}}]}
            for _ in range(count)]


async def submit_all(client: httpx.AsyncClient, workflows: list[dict]) -> list[str]:
    ids = []
    for start in range(0, len(workflows), 1000):
        response = await client.post("/v1/workflows/batch", json={"workflows": workflows[start:start + 1000]})
        assert response.status_code == 202, response.text
        ids += response.json()["workflow_ids"]
    return ids


async def ran_on(client: httpx.AsyncClient, ids: list[str]) -> collections.Counter:
    """Which agent ran each workflow's task, once every one has succeeded."""

    async def agent_of(wf_id: str) -> str:
        view = (await client.get(f"/v1/workflows/{wf_id}", params={"wait": 30})).json()
        assert view["status"] == "succeeded", view
        return view["tasks"][0]["result"]["agent"]

    names = []
    for start in range(0, len(ids), 50):
        names += await asyncio.gather(*(agent_of(wf_id) for wf_id in ids[start:start + 50]))
    return collections.Counter(names)


async def test_hosted_agents_share_one_connection_and_heartbeat_and_all_get_work(platform, caplog):
    host = AgentHost([many_agents.make(f"hosted-{i}", platform.settings) for i in range(40)])
    await host.start()
    try:
        assert all(a.bus.connection is host.bus.connection for a in host.agents)
        await wait_for(lambda: alive(platform.client, "hosted-"), what="the hosted agents registered")
        assert len(await alive(platform.client, "hosted-")) == 40
        counts = await ran_on(platform.client, await submit_all(platform.client, fan(400, 0.02)))
        assert set(counts) == {f"hosted-{i}" for i in range(40)}
    finally:
        caplog.set_level(logging.WARNING)
        caplog.clear()
        await host.stop()
        platform._queues |= {platform.topology.agent_queue(a.name) for a in host.agents}
        platform._queues.add(platform.topology.capability_queue(many_agents.CAPABILITY))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not await alive(platform.client, "hosted-")  # each said it stopped


def test_a_target_that_builds_no_agents_is_refused():
    with pytest.raises(ValueError, match="module:callable"):
        load("tests.many_agents")
    with pytest.raises(ValueError, match="no list of Agent"):
        load("tests.many_agents:CAPABILITY")


async def test_1000_agents_in_4_processes_register_share_the_work_and_stop_quietly(processes, settings):
    hosts = {}
    for i in range(4):
        env = {**process_env(settings), "MANY_AGENTS": "250", "MANY_AGENTS_PREFIX": f"host{i}",
               "SWITCHBOARD_HEALTH_PORT": str(free_port()), "SWITCHBOARD_HEARTBEAT_INTERVAL_S": "2.0"}
        hosts[i] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "switchboard.cli", "host",
            "tests.many_agents:build", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    topology = Topology(settings.namespace)
    try:
        # Idle connections expire before the server closes them (uvicorn: 5 s), so none is reused as it closes.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=120,
                                     limits=httpx.Limits(keepalive_expiry=1.0)) as client:
            async def all_alive() -> bool:
                try:
                    return len(await alive(client, "host")) == 1000
                except httpx.TransportError:
                    return False

            began = time.monotonic()
            await wait_for(all_alive, timeout=120, interval=0.5, what="1,000 hosted agents registered")
            registered = time.monotonic() - began
            counts = await ran_on(client, await submit_all(client, fan(2000, 0.02)))
            ran = time.monotonic() - began - registered
            assert len(counts) == 1000, f"{1000 - len(counts)} agents got no work"
            even = 2000 / 1000
            print(f"\n1,000 agents in 4 processes: registered in {registered:.1f}s; 2,000 tasks in {ran:.1f}s, "
                  f"per agent min {min(counts.values())}, max {max(counts.values())} (even: {even:g})")
            assert even / 2 <= min(counts.values()) and max(counts.values()) <= even * 2
            # SWITCHBOARD_HOSTING_SOAK_S=300: then every agent stays alive, sampled every 5 s, that long.
            soak_until = time.monotonic() + float(os.environ.get("SWITCHBOARD_HOSTING_SOAK_S", "0"))
            samples = 0
            while time.monotonic() < soak_until:
                assert len(await alive(client, "host")) == 1000
                samples += 1
                await asyncio.sleep(5)  # sampling, not synchronisation
            if samples:
                print(f"1,000 agents stayed alive through {samples} samples")
    finally:
        for proc in hosts.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        outputs = [(await proc.communicate())[0].decode() for proc in hosts.values()]
        await cleanup(settings, {topology.agent_queue(f"host{i}-{j}") for i in range(4) for j in range(250)}
                      | {topology.capability_queue(many_agents.CAPABILITY)}, redis=False)
    for proc, output in zip(hosts.values(), outputs):
        assert proc.returncode == 0, output[-2000:]
        bad = [line for line in output.splitlines()
               if any(level in line for level in ('"level":"warning"', '"level":"error"', '"level":"critical"'))]
        assert not bad, bad[:5]
