"""Private RabbitMQ and Redis servers that a test may stop, kill and restart without touching the
shared ones: each on ports of its own, with its data in a temporary directory.

RabbitMQ keeps its mnesia directory across restarts, so durable queues and persistent messages survive
(as in production). Redis runs without persistence, so a restart loses everything it held.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import redis.asyncio as aioredis

RABBITMQ_SBIN = next((p for p in sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin"))), None) \
    if Path("/usr/lib/rabbitmq/lib").exists() else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(offset: int = 20000, low: int = 20000, high: int = 45000) -> int:
    """A port p with p and p + offset both free (RabbitMQ's AMQP and distribution ports)."""
    for _ in range(200):
        port = random.randint(low, high)
        if _port_free(port) and _port_free(port + offset):
            return port
    raise RuntimeError("no free port pair found")


def rabbitmq_available() -> str | None:
    """None if a private RabbitMQ can be started here, else why not."""
    if RABBITMQ_SBIN is None and shutil.which("rabbitmq-server") is None:
        return "rabbitmq-server is not installed"
    return None


def redis_available() -> str | None:
    return None if shutil.which("redis-server") else "redis-server is not installed"


def _terminate(proc: subprocess.Popen, sig: int, timeout: float) -> bool:
    """Signal the process group; True once the leader has exited."""
    if proc.poll() is not None:
        return True
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return True
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate signed by it (CN localhost, SAN localhost and 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path


def make_test_ca(base: Path) -> TlsFiles:
    """A throwaway CA and server certificate, made with the openssl CLI (valid two days)."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=base, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=switchboard-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
            "-out", "server.csr")
    (base / "server.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                                     "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "server.ext", "-out", "server.pem")
    return TlsFiles(ca=base / "ca.pem", cert=base / "server.pem", key=base / "server.key")


def tls_available() -> str | None:
    return None if shutil.which("openssl") else "the openssl CLI is not installed"


async def _amqp_ping(port: int, url: str | None = None) -> None:
    """Raises unless the broker on this port accepts an AMQP connection (at `url`, if given)."""
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)  # cheap first check
    writer.close()
    quiet = [logging.getLogger(n) for n in ("aiormq", "aio_pika")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        connection = await asyncio.wait_for(aio_pika.connect(url or f"amqp://guest:guest@127.0.0.1:{port}/"), 5)
        await connection.close()
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


class PrivateRabbitMQ:
    """`rabbitmq-server` in the foreground as a child process (its own process group), no plugins.

    With `tls`, it also listens for AMQP over TLS on `tls_port` (`tls_url` trusts the test CA)."""

    def __init__(self, base: Path, port: int | None = None, *, tls: TlsFiles | None = None):
        self.base = Path(base)
        self.port = port or free_port_pair()
        self.dist_port = self.port + 20000
        self.node = f"chaos{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.tls = tls
        self.tls_port = free_port_pair(offset=0) if tls else None
        self.tls_url = f"amqps://guest:guest@localhost:{self.tls_port}/?cafile={tls.ca}" if tls else None
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []  # seconds each start took until an AMQP connection succeeded
        self.stops: list[float] = []
        self._incarnation = 0
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = info\n"
            + (f"listeners.ssl.local = 127.0.0.1:{self.tls_port}\n"
               f"ssl_options.cacertfile = {tls.ca}\nssl_options.certfile = {tls.cert}\n"
               f"ssl_options.keyfile = {tls.key}\n"
               "ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n" if tls else "")
        )
        # Our own env file, so /etc/rabbitmq/rabbitmq-env.conf (which names the shared node) is not read.
        (self.base / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(self.base),  # the Erlang cookie lives here; rabbitmqctl uses the same one
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.base / "rabbitmq.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _tool(self, name: str) -> str:
        # As root, /usr/sbin/rabbitmq-* would `su rabbitmq`; the scripts under sbin/ run as whoever calls them.
        if RABBITMQ_SBIN is not None and (RABBITMQ_SBIN / name).exists():
            return str(RABBITMQ_SBIN / name)
        return shutil.which(name) or name

    async def start(self, timeout: float = 90.0) -> float:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        began = time.monotonic()
        out = open(self.base / f"server.{self._incarnation}.out", "wb")
        self._incarnation += 1
        self.proc = subprocess.Popen([self._tool("rabbitmq-server")], env=self._env(), cwd=self.base,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        out.close()
        deadline = began + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}: "
                                   f"{(self.base / f'server.{self._incarnation - 1}.out').read_text()[-3000:]}")
            try:
                await _amqp_ping(self.port)
                if self.tls:
                    await _amqp_ping(self.tls_port, self.tls_url)
                break
            except Exception:
                if time.monotonic() > deadline:
                    await self.stop()
                    raise TimeoutError(f"RabbitMQ on port {self.port} not up after {timeout}s") from None
                await asyncio.sleep(0.1)
        took = time.monotonic() - began
        self.starts.append(took)
        return took

    async def stop(self, *, hard: bool = False, timeout: float = 60.0) -> float:
        """A clean shutdown (`rabbitmqctl stop`, else SIGTERM), or with hard=True a SIGKILL of the node."""
        began = time.monotonic()
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        if hard:
            await asyncio.to_thread(_terminate, self.proc, signal.SIGKILL, timeout)
        else:
            try:
                await asyncio.to_thread(
                    subprocess.run, [self._tool("rabbitmqctl"), "-n", self.node, "stop"], env=self._env(),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            if not await asyncio.to_thread(_terminate, self.proc, signal.SIGTERM, timeout):
                await asyncio.to_thread(_terminate, self.proc, signal.SIGKILL, 10)
        # The Erlang runtime's helpers (erl_child_setup, inet_gethost) share the group: make sure none is left.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        took = time.monotonic() - began
        self.stops.append(took)
        return took

    async def list_queues(self) -> str:
        """`rabbitmqctl list_queues` (ready, unacked, consumers): what a test shows when work stalls."""
        try:
            result = await asyncio.to_thread(
                subprocess.run, [self._tool("rabbitmqctl"), "-n", self.node, "-q", "list_queues", "name",
                                 "messages_ready", "messages_unacknowledged", "consumers"],
                env=self._env(), capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return "rabbitmqctl list_queues timed out"
        return "queue  ready  unacked  consumers\n" + result.stdout

    async def restart(self, *, hard: bool = False) -> tuple[float, float]:
        """Stop and start again on the same data directory: (stop seconds, start seconds)."""
        return await self.stop(hard=hard), await self.start()

    async def close(self) -> None:
        await self.stop(hard=True)


class PrivateRedis:
    """`redis-server` without persistence: a restart loses all its data.

    With `tls`, it listens only for TLS (no plain port) and `url` is a rediss:// URL trusting the test CA."""

    def __init__(self, base: Path, port: int | None = None, *, tls: TlsFiles | None = None):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port_pair(offset=0)
        self.tls = tls
        self.url = (f"rediss://localhost:{self.port}/0?ssl_ca_certs={tls.ca}" if tls
                    else f"redis://127.0.0.1:{self.port}/0")
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []
        self._incarnation = 0

    async def start(self, timeout: float = 30.0) -> float:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        began = time.monotonic()
        out = open(self.base / f"redis.{self._incarnation}.out", "wb")
        self._incarnation += 1
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.base)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        deadline = began + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            client = aioredis.from_url(self.url, socket_connect_timeout=1)
            try:
                if await client.ping():
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Redis on port {self.port} not up after {timeout}s") from None
                await asyncio.sleep(0.05)
            finally:
                await client.aclose()
        took = time.monotonic() - began
        self.starts.append(took)
        return took

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            await asyncio.to_thread(_terminate, self.proc, signal.SIGKILL, 10)

    async def restart(self) -> float:
        """Kill and start again: every key is gone."""
        await self.stop()
        return await self.start()

    async def close(self) -> None:
        await self.stop()
