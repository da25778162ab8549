"""Broker credentials of an agent's own: a RabbitMQ user that may touch only what that agent needs.

`permissions()` is the one statement of what that is; `switchboard agent-credentials` applies it through
RabbitMQ's management API, and deploy/k8s/components/agent-credentials through the topology operator's
Permission resources (a test keeps the two equal). An agent's user may:

- read (consume, and bind from) its capabilities' queues, its agent queue, the control exchange (to bind
  its control queue to it), its own reply and control queues, its subscription queue and the topics
  exchange (to bind that queue to the patterns it subscribes to);
- write only to agent-out (which routes to results, registry and coordinator: the results path, the
  submit path of delegation, and the events it publishes, which the aggregator passes on to topics) and
  to its own control and subscription queues (binding a queue needs write on it);
- configure only its own reply and control queues (`<ns>.reply.<name>.<hex>`, `<ns>.control.<name>.<hex>`).

RabbitMQ checks no permission for a passive declare, so the agent checks that the platform's queues exist
without being allowed to create them; `create` declares them (as the admin) before the agent starts.
Creating a user needs the management API's administrator: only who holds that can run these commands.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import httpx

from switchboard.settings import Settings
from switchboard.topology import Topology

_HEX = "[0-9a-f]+"  # the random suffix of a private queue (topology.private_queue)


def permissions(namespace: str, name: str, capabilities: list[str]) -> dict[str, str]:
    """The configure, write and read regexes (anchored, names escaped) of agent `name`'s broker user."""
    topology = Topology(namespace)
    private = [f"{re.escape(topology.private_prefix(kind, name))}{_HEX}" for kind in ("reply", "control")]
    control_queue = private[1]
    subscription = re.escape(topology.subscription_queue(name))
    readable = [re.escape(topology.capability_queue(c)) for c in sorted(set(capabilities))]
    readable += [re.escape(topology.agent_queue(name)), re.escape(topology.control), *private,
                 subscription, re.escape(topology.topics)]
    return {
        "configure": _anchored(private),
        "write": _anchored([re.escape(topology.agent_out), control_queue, subscription]),
        "read": _anchored(readable),
    }


def _anchored(patterns: list[str]) -> str:
    return f"^({'|'.join(patterns)})$"


def generate_password() -> str:
    return secrets.token_urlsafe(24)  # 192 bits, URL-safe so it needs no quoting in an AMQP URL


def agent_url(amqp_url: str, name: str, password: str) -> str:
    """The platform's AMQP URL (scheme, host, port, vhost) with the agent's user and password."""
    parts = urlsplit(amqp_url)
    host = parts.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    netloc = f"{quote(name, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def vhost_of(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class Management:
    """RabbitMQ's management HTTP API as its administrator: the management URL's user, else AMQP_URL's."""

    def __init__(self, settings: Settings, *, timeout_s: float = 10.0):
        parts = urlsplit(settings.management_url)
        admin = urlsplit(settings.amqp_url) if parts.username is None else parts
        auth = (unquote(admin.username or "guest"), unquote(admin.password or "guest"))
        base = urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""),
                           parts.path.rstrip("/"), "", ""))
        self.client = httpx.Client(base_url=f"{base}/api", auth=auth, timeout=timeout_s)
        self.vhost = quote(vhost_of(settings.amqp_url), safe="")

    def __enter__(self) -> Management:
        return self

    def __exit__(self, *_) -> None:
        self.client.close()

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400 and response.status_code != 404:
            raise ManagementError(f"{method} {path}: {response.status_code} {response.text[:200]}")
        return response

    def answers(self) -> bool:
        try:
            return self.client.get("/overview").status_code == 200
        except httpx.HTTPError:
            return False

    def put_user(self, name: str, password: str, perms: dict[str, str]) -> None:
        # No tags: the user can connect over AMQP and nothing else (no management UI, no impersonation).
        self._call("PUT", f"/users/{quote(name, safe='')}", json={"password": password, "tags": ""})
        self._call("PUT", f"/permissions/{self.vhost}/{quote(name, safe='')}", json=perms)

    def permissions_of(self, name: str) -> dict[str, str] | None:
        response = self._call("GET", f"/permissions/{self.vhost}/{quote(name, safe='')}")
        if response.status_code == 404:
            return None
        return {k: response.json()[k] for k in ("configure", "write", "read")}

    def delete_user(self, name: str) -> bool:
        """False if there was no such user."""
        return self._call("DELETE", f"/users/{quote(name, safe='')}").status_code != 404


class ManagementError(RuntimeError):
    pass


def _put_user(settings: Settings, name: str, password: str, perms: dict[str, str]) -> None:
    with Management(settings) as management:  # a synchronous client: run in a thread (create)
        management.put_user(name, password, perms)


async def declare_for(settings: Settings, name: str, capabilities: list[str]) -> None:
    """As the admin: the platform's topology and the agent's work queues, which its user may not declare."""
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await topology.declare(channel)
        for queue in [topology.capability_queue(c) for c in capabilities] + [topology.agent_queue(name)]:
            await topology.declare_work_queue(channel, queue)
        await topology.declare_subscription(channel, name, [])  # the agent binds its own patterns
    finally:
        await connection.close()


async def create(settings: Settings, name: str, capabilities: list[str], password: str | None = None) -> str:
    """Creates (or updates) agent `name`'s broker user, declares what it needs; returns its AMQP URL."""
    password = password or generate_password()
    await asyncio.to_thread(_put_user, settings, name, password, permissions(settings.namespace, name, capabilities))
    await declare_for(settings, name, capabilities)
    return agent_url(settings.amqp_url, name, password)


def delete(settings: Settings, name: str) -> bool:
    with Management(settings) as management:
        return management.delete_user(name)
