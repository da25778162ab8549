"""Sealed payloads (switchboard.codec), end to end: the api seals what it is given and the agent SDK what
it returns; only they open it. The services in between run without keys, and RabbitMQ and the store
see only ciphertext. Keys rotate with `switchboard keys reencrypt`; a key that is missing is a clear
error, never garbage."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aio_pika
import httpx
import pytest

from switchboard import Agent
from switchboard.cli import load_service
from switchboard.codec import MARK, Codec, CodecError, UnknownKey, new_key, parse_keys
from tests.harness import ALL_SERVICES, Platform, free_port, wait_for

SECRET = "s3cr3t-plaintext-7f1c"
K1, K2 = f"k1:{new_key()}", f"k2:{new_key()}"


def test_sealing_round_trips_and_refuses_what_it_cannot_open():
    codec = Codec.from_setting(K1)
    sealed = codec.seal({"q": SECRET})
    assert SECRET not in str(sealed) and sealed[MARK]["kid"] == "k1"
    assert codec.open(sealed) == {"q": SECRET} and codec.open({"plain": 1}) == {"plain": 1}
    assert codec.seal(sealed) is sealed  # sealed once only
    assert codec.seal(1, context="c") == codec.seal(1, context="c") != codec.seal(2, context="c")
    with pytest.raises(UnknownKey, match="'k1'"):
        Codec.from_setting(K2).open(sealed)
    with pytest.raises(UnknownKey, match="it has none"):
        Codec({}).open(sealed)
    tampered = {MARK: {**sealed[MARK], "data": sealed[MARK]["data"][:-4] + "AAA="}}
    with pytest.raises(CodecError, match="altered"):
        codec.open(tampered)
    for bad, says in (("k1", "id:base64"), ("k1:abc", "bytes"), (f"{K1},{K1}", "twice")):
        with pytest.raises(CodecError, match=says):
            parse_keys(bad)


def echo_agent(settings, name="vault-echo", capability="vault"):
    agent = Agent(name, settings=settings)

    @agent.handler(capability)
    async def echo(task):
        return {"payload": task.payload, "inputs": task.inputs}

    return agent


@pytest.fixture
async def sealed_platform(settings):
    """The services without keys; the api and the agent with them."""
    services = Platform(settings)
    api = Platform(settings.model_copy(update={"payload_keys": K1}))
    try:
        await services.start(services=[s for s in ALL_SERVICES if s != "api"])
        await api.start(services=("api",))
        yield services, api
    finally:
        await api.close()
        await services.close()


async def test_payloads_and_results_travel_sealed_and_read_plain(sealed_platform, settings):
    services, api = sealed_platform
    await api.add_agent(echo_agent(api.settings))
    spec = {"tasks": [{"id": "a", "capability": "vault", "payload": {"q": SECRET}},
                      {"id": "b", "capability": "vault", "depends_on": ["a"], "payload": {"n": 1}}]}
    wf_id = (await api.client.post("/v1/workflows", json=spec)).json()["workflow_id"]
    view = await api.wait(wf_id)
    assert view["status"] == "succeeded", view
    results = {t["id"]: t["result"] for t in view["tasks"]}
    assert results["a"] == {"payload": {"q": SECRET}, "inputs": {}}
    assert results["b"]["inputs"] == {"a": {"payload": {"q": SECRET}, "inputs": {}}}  # a parent's result, opened
    assert view["result"]["b"]["inputs"]["a"]["payload"]["q"] == SECRET

    # What the store holds: ciphertext only (the services that wrote it had no key).
    stored = b"".join(p.read_bytes() for p in Path(settings.store_url.removeprefix("sqlite:///")).parent.glob("*"))
    assert SECRET.encode() not in stored and MARK.encode() in stored
    # What RabbitMQ holds: a task no agent serves waits in a queue, sealed.
    parked = (await api.client.post("/v1/workflows", json={"tasks": [
        {"id": "p", "capability": "vault-nobody", "payload": {"q": SECRET}}]})).json()["workflow_id"]
    body = await _first_message(settings, api, "vault-nobody")
    assert SECRET.encode() not in body and MARK.encode() in body, body[:300]
    await api.client.post(f"/v1/workflows/{parked}/cancel")


async def _first_message(settings, platform: Platform, capability: str) -> bytes:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        async def waiting() -> bytes | None:
            for name in (platform.topology.capability_queue(capability), platform.topology.hold_queue(capability)):
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                    message = await queue.get(fail=False, no_ack=False)
                    if message is not None:
                        await message.nack(requeue=True)
                        return message.body
                except aio_pika.exceptions.ChannelClosed:
                    pass  # not declared yet
                finally:
                    if not channel.is_closed:
                        await channel.close()
            return None

        return await wait_for(waiting, what=f"a {capability} task waiting in RabbitMQ")
    finally:
        await connection.close()


async def test_an_agent_without_the_key_fails_the_task_clearly(sealed_platform):
    services, api = sealed_platform
    keyless = api.settings.model_copy(update={"payload_keys": K2})
    await api.add_agent(echo_agent(keyless, name="wrong-key-agent", capability="vault-k2"))
    wf_id = (await api.client.post("/v1/workflows", json={"tasks": [
        {"id": "a", "capability": "vault-k2", "payload": {"q": SECRET}, "max_attempts": 3}]})).json()["workflow_id"]
    view = await api.wait(wf_id)
    task = view["tasks"][0]
    assert view["status"] == "failed" and task["attempts"] == 1  # not retryable: another try cannot help
    assert task["error"]["type"] == "UnknownKey" and "'k1'" in task["error"]["message"]


async def test_keys_rotate_with_reencrypt_and_an_old_api_shows_what_it_cannot_open(sealed_platform, settings):
    services, api = sealed_platform
    await api.add_agent(echo_agent(api.settings))
    wf_id = (await api.client.post("/v1/workflows", json={"tasks": [
        {"id": "a", "capability": "vault", "payload": {"q": SECRET}}]})).json()["workflow_id"]
    assert (await api.wait(wf_id))["status"] == "succeeded"

    env = {**os.environ, "SWITCHBOARD_STORE_URL": settings.store_url, "SWITCHBOARD_NAMESPACE": settings.namespace,
           "SWITCHBOARD_PAYLOAD_KEYS": f"{K2},{K1}"}
    run = await asyncio.create_subprocess_exec(str(Path(sys.executable).parent / "switchboard"), "keys", "reencrypt",
                                               env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 0 and "sealed again with key 'k2'" in output.decode(), output.decode()
    assert int(output.decode().split()[0]) >= 2  # the task (payload and result) and the workflow's result

    # Two more api replicas, each with one key (services only: closing a Platform would clean up the
    # namespace under the running one).
    readers = {}
    try:
        for name, keys in (("k2", K2), ("k1", K1)):
            replica = load_service("api", settings.model_copy(update={"payload_keys": keys, "api_port": free_port()}))
            await replica.start()
            readers[name] = replica
        async with httpx.AsyncClient(timeout=30) as client:
            def url(name: str) -> str:
                return f"http://127.0.0.1:{readers[name].settings.api_port}/v1/workflows/{wf_id}"

            assert (await client.get(url("k2"))).json()["tasks"][0]["result"]["payload"]["q"] == SECRET
            stale = (await client.get(url("k1"))).json()["tasks"][0]["result"]
        assert stale[MARK]["kid"] == "k2" and SECRET not in str(stale)  # still sealed, naming its key
    finally:
        for replica in readers.values():
            await replica.stop()
