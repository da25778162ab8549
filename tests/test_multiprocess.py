"""The production shape: every service and the example agents in processes of their own, started with
`switchboard serve`, talking only through RabbitMQ, Redis and the store; SIGTERM drains each cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
import orjson
import pytest

from switchboard.topology import Topology
from tests.harness import ALL_SERVICES, cleanup, free_port, wait_for


@pytest.fixture
async def processes(settings):
    procs: dict[str, asyncio.subprocess.Process] = {}
    ports: dict[str, int] = {}
    env = {**os.environ, "SWITCHBOARD_AMQP_URL": settings.amqp_url, "SWITCHBOARD_REDIS_URL": settings.redis_url,
           "SWITCHBOARD_STORE_URL": settings.store_url, "SWITCHBOARD_NAMESPACE": settings.namespace,
           "SWITCHBOARD_API_PORT": str(settings.api_port), "SWITCHBOARD_HEARTBEAT_INTERVAL_S": "0.2"}
    for name in (*ALL_SERVICES, "agents"):
        ports[name] = settings.api_port if name == "api" else free_port()
        procs[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "switchboard.cli", "serve", name,
            env={**env, "SWITCHBOARD_HEALTH_PORT": str(ports[name])},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        yield procs, ports
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        topology = Topology(settings.namespace)
        await cleanup(settings, {topology.capability_queue(c) for c in ("echo", "sleep", "fail", "plan")}
                      | {topology.agent_queue(a) for a in ("echo-agent", "sleep-agent", "fail-agent",
                                                          "planner-agent")})


async def test_each_service_in_its_own_process(processes, settings):
    procs, ports = processes
    async with httpx.AsyncClient(timeout=30) as client:
        async def all_ready() -> bool:
            for port in ports.values():
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code != 200:
                        return False
                except httpx.TransportError:
                    return False
            return True

        await wait_for(all_ready, timeout=60, what="every process ready")
        api = f"http://127.0.0.1:{settings.api_port}"

        async def agents_alive() -> bool:
            agents = (await client.get(f"{api}/v1/agents")).json()["agents"]
            return {a["name"] for a in agents if a["status"] == "alive"} >= {"echo-agent", "planner-agent",
                                                                            "sleep-agent"}

        await wait_for(agents_alive, what="example agents registered")
        spec = {"tasks": [
            {"id": "a", "capability": "echo", "payload": {"x": 1}},
            {"id": "b", "capability": "echo", "depends_on": ["a"]},
            {"id": "c", "capability": "sleep", "payload": {"seconds": 0.05}, "depends_on": ["a"]},
            {"id": "plan", "capability": "plan", "payload": {"goal": "g"}, "depends_on": ["b", "c"]},
        ]}
        wf_id = (await client.post(f"{api}/v1/workflows", json=spec)).json()["workflow_id"]
        view = (await client.get(f"{api}/v1/workflows/{wf_id}", params={"wait": 60})).json()
        assert view["status"] == "succeeded", view
        metrics = (await client.get(f"http://127.0.0.1:{ports['aggregator']}/metrics")).text
        assert 'switchboard_tasks_finished_total{capability="plan",outcome="succeeded"} 1.0' in metrics

    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{output.decode()[-2000:]}"
        lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]
        assert lines and all("service" in line and "level" in line for line in lines), name
        assert lines[-1]["msg"] == "stopped"
