"""Bad AMQP input is dead-lettered with its reason; no service crashes or loops, and work goes on."""

from __future__ import annotations

import aio_pika
import orjson

import example_agents
from tests.harness import wait_for


async def test_poison_messages_are_dead_lettered_with_a_reason(platform):
    for agent in example_agents.build(platform.settings):
        await platform.add_agent(agent)
    topology = platform.topology
    poison = {
        "garbage": b"\x00\xff\xfegarbage",
        "wrong shape": orjson.dumps({"hello": "world"}),
        "huge": b"{" + b"x" * 2_000_000,
        "wrong type": orjson.dumps({"type": "control", "subject": "nonsense"}),
    }
    queues = [topology.coordinator, topology.dispatch, topology.results, topology.registry,
              topology.capability_queue("echo")]
    connection = await aio_pika.connect(platform.settings.amqp_url)
    try:
        channel = await connection.channel()
        for queue in queues:
            for body in poison.values():
                await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
    finally:
        await connection.close()
    expected = len(queues) * len(poison)

    async def all_dead_lettered() -> bool:
        letters = (await platform.client.get("/v1/dlq", params={"limit": 500})).json()["dead_letters"]
        return len(letters) >= expected

    await wait_for(all_dead_lettered, timeout=60, what=f"{expected} dead letters")
    letters = (await platform.client.get("/v1/dlq", params={"limit": 500})).json()["dead_letters"]
    assert len(letters) == expected
    assert {d["queue"] for d in letters} == set(queues)
    for letter in letters:
        assert letter["reason"] and letter["reason"] != "unknown"
    assert sum("unparseable" in d["reason"] for d in letters) == len(queues) * 3
    # Everything is still up and working.
    assert all(s.is_ready() for s in platform.services.values())
    view = await platform.wait(await platform.submit({"tasks": [{"id": "a", "capability": "echo"}]}))
    assert view["status"] == "succeeded"
