"""Real Redis and PostgreSQL servers for the tests of the stores.

The adapters' value is in how they behave against the real servers
(transactions, expiry, cascades), so these fixtures start throwaway servers
from the Debian packages on free 127.0.0.1 ports in temp dirs rather than
mocking them. Missing binaries FAIL the tests with the apt package to
install: a silent skip would let CI go green without ever testing a store.

A plugin (``tests/conftest.py``): one Redis and one PostgreSQL serve a whole run (one
per pytest-xdist worker); tests keep apart by key prefix or database.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis

from harness.processes import Process, free_port

_INSTALL_HINT = "run scripts/install-store-servers.sh or `apt-get install -y {pkg}`"
_START_TIMEOUT = 30.0


def _postgres_bindir() -> Path:
    """Newest ``/usr/lib/postgresql/<major>/bin`` (Debian), else ``$PATH``."""
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    if found:
        return Path(max(found, key=lambda p: int(Path(p).parts[-3]))).parent
    on_path = shutil.which("postgres")
    if on_path is None:
        pytest.fail(
            "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/"
            "postgres); " + _INSTALL_HINT.format(pkg="postgresql")
        )
    return Path(on_path).parent


def _server_user() -> str | None:
    """Postgres refuses to run as root: pick an unprivileged account then."""
    if os.getuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' user exists")


@contextmanager
def running_redis() -> Iterator[str]:
    """A redis-server without persistence; yields its ``redis://`` URL."""
    with restartable_redis(persistent=False) as server:
        yield server.url


@contextmanager
def running_postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster; yields its ``postgresql://`` URL."""
    with restartable_postgres() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One Redis server for the test session; tests isolate by key prefix."""
    with running_redis() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One PostgreSQL server for the test session; tests isolate by table."""
    with running_postgres() as url:
        yield url


class RestartableServer:
    """A store server a test can stop and start again on the same port and data.

    For outage tests: ``stop()`` takes the store away from running agent
    servers, ``start()`` brings it back at the same URL with the data it held.
    """

    def __init__(
        self,
        url: str,
        launch: Callable[[], Process],
        probe: Callable[[], bool],
        stop_signal: signal.Signals,
    ) -> None:
        self.url = url
        self._launch = launch
        self._probe = probe
        self._stop_signal = stop_signal
        self._proc: Process | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        assert not self.running, "already running"
        self._proc = self._launch()
        self._proc.wait_until(self._probe, _START_TIMEOUT)

    def stop(self) -> None:
        """Stop the server by its signal for a clean shutdown (it keeps its data), SIGKILL after 15 s."""
        if self._proc is not None:
            self._proc.stop(self._stop_signal, grace=15)
            self._proc = None


@contextmanager
def restartable_redis(*, persistent: bool = True) -> Iterator[RestartableServer]:
    """A started redis-server; ``persistent`` keeps its data across ``stop()``/``start()``.

    Persistence is AOF with fsync on every write, so a restart brings back
    exactly what the store held when it stopped.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found; " + _INSTALL_HINT.format(pkg="redis-server"))
    tmp = Path(tempfile.mkdtemp(prefix="redis-restartable-"))
    port = free_port()
    log = tmp / "redis.log"

    def launch() -> Process:
        return Process(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             *(["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]),
             "--dir", str(tmp)],
            log_path=log, name="redis-server",
        )  # fmt: skip

    def ping() -> bool:
        try:
            with redis.Redis(port=port, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.BusyLoadingError):
            return False

    server = RestartableServer(f"redis://127.0.0.1:{port}/0", launch, ping, signal.SIGTERM)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def restartable_postgres() -> Iterator[RestartableServer]:
    """A started PostgreSQL cluster that keeps its data across ``stop()``/``start()``."""
    bindir = _postgres_bindir()
    user = _server_user()
    tmp = Path(tempfile.mkdtemp(prefix="pg-restartable-"))
    data, sock, log = tmp / "data", tmp / "sock", tmp / "postgres.log"
    sock.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (tmp, sock):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def launch() -> Process:
        return Process(
            [str(bindir / "postgres"), "-D", str(data), "-k", str(sock),
             "-h", "127.0.0.1", "-p", str(port),
             "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off"],
            log_path=log, name="postgres", user=user, cwd=tmp,
        )  # fmt: skip

    def ping() -> bool:
        try:
            with psycopg.connect(url, connect_timeout=1) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    # SIGINT is "fast" shutdown: it does not wait for clients to disconnect.
    server = RestartableServer(url, launch, ping, signal.SIGINT)
    try:
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            user=user, cwd=tmp, capture_output=True, check=False,
        )  # fmt: skip
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed:\n{initdb.stdout.decode()}{initdb.stderr.decode()}")
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
