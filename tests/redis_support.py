"""Real Redis servers for the tests: private standalone servers, a private 3-master Cluster and a private Sentinel.

Every server here is a ``redis-server`` child process of the test run, on a free loopback port, in a temporary
directory, with persistence off (``--save "" --appendonly no``). The machine's shared Redis at 127.0.0.1:6379 is
never stopped, flushed or reconfigured: tests that stop, kill, restart or flush a server use a private one.

- :class:`RedisServer`: one ``redis-server`` process; ``pause``/``resume`` (SIGSTOP/SIGCONT: "not answering"),
  ``stop``/``kill`` ("down"), ``start`` again on the same port (a restart without persistence: state lost),
  ``flushall``.
- :class:`RedisCluster`: three masters (``--cluster-enabled yes``) joined with ``redis-cli --cluster create``;
  ready when every node reports ``cluster_state:ok`` and knows all three masters. URI ``redis+cluster://h:p,h:p,h:p``.
- :class:`RedisSentinel`: a private master plus one ``redis-server <conf> --sentinel`` monitoring it as
  :data:`SENTINEL_SERVICE`. URI ``redis+sentinel://127.0.0.1:<sentinel port>/samaster``.

The Cluster and the Sentinel are started once per test process, lazily, by :func:`shared_cluster` and
:func:`shared_sentinel` (usable from plain functions such as the conformance suite's store factories) or by the
session-scoped fixtures :func:`redis_cluster` and :func:`redis_sentinel`; they are torn down at the end of the
session (and killed by the kernel if the test process dies: ``PR_SET_PDEATHSIG``).

Availability: with ``CI`` set (``CI=true`` in ``.ci/run``) a missing ``redis-server`` or an unreachable shared Redis
fails the test; without it they skip the test. Readiness is always a bounded condition wait (PING, CLUSTER INFO).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

SHARED_REDIS_URL = os.environ.get("SA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SENTINEL_SERVICE = "samaster"
READY_TIMEOUT = 20.0  # upper bound of every readiness wait; reached only when something is broken
HOST = "127.0.0.1"


def in_ci() -> bool:
    """Whether this is a CI run (``CI`` set to anything but empty/0/false): Redis tests must run, never skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Skip the test, or fail it under CI (where every Redis test must run)."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: Redis tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


def redis_server_binary() -> str:
    """The ``redis-server`` executable (skips the test without it, fails it under CI)."""
    path = shutil.which("redis-server")
    if path is None:
        unavailable("redis-server is not installed (Debian package redis-server)")
        raise AssertionError("unreachable")
    return path


def redis_cli_binary() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        unavailable("redis-cli is not installed (Debian package redis-tools)")
        raise AssertionError("unreachable")
    return path


def shared_redis_url() -> str:
    """The machine's shared Redis (``SA_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``), checked with PING.
    Tests must never flush or stop it; they use fresh key names instead."""
    import redis

    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"the shared Redis at {SHARED_REDIS_URL} does not answer: {exc}")
    finally:
        client.close()
    return SHARED_REDIS_URL


def redis_store_available() -> None:
    """Skip (fail under CI) when ``sa_middleware.stores.redis`` cannot be imported."""
    try:
        import sa_middleware.stores.redis  # noqa: F401
    except ImportError as exc:
        unavailable(f"the Redis store is not available: {exc}")


# -- ports and process hygiene -------------------------------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_taken: set[int] = set()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A loopback port nobody listens on (and, for a cluster node, whose bus port ``port + 10000`` is free too).
    Ports handed out in this process are never handed out again, so a stopped server's port stays its own."""
    with _ports_lock:
        for _ in range(1000):
            port = random.randint(20000, 50000)
            if port in _ports_taken or (cluster_bus and port + 10000 in _ports_taken):
                continue
            if _port_free(port) and (not cluster_bus or _port_free(port + 10000)):
                _ports_taken.add(port)
                if cluster_bus:
                    _ports_taken.add(port + 10000)
                return port
    raise RuntimeError("no free loopback port found")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel kills this child when the test process dies, so no server outlives a crashed test run."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT,
             on_timeout: Callable[[], str] | None = None) -> None:
    """Poll ``condition`` until it holds (a condition wait, bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except Exception:  # not ready yet: connection refused, LOADING, CLUSTERDOWN...
            pass
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{extra}")
        time.sleep(0.05)


# -- one server ------------------------------------------------------------------------------------------------------

class RedisServer:
    """One private ``redis-server`` child process on its own loopback port, in its own directory."""

    def __init__(self, directory: Path, *, name: str = "redis", port: int | None = None,
                 extra_args: list[str] | None = None, cluster: bool = False) -> None:
        self.binary = redis_server_binary()
        self.dir = directory / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cluster = cluster
        self.port = port or free_port(cluster_bus=cluster)
        self.extra_args = list(extra_args or [])
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def args(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", HOST, "--dir", str(self.dir), "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.log), "--protected-mode", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                     "--cluster-node-timeout", "5000"]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start (or restart, on the same port, with empty state) and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.cluster:  # a restarted node would otherwise reload its old cluster identity
            (self.dir / "nodes.conf").unlink(missing_ok=True)
        with (self.dir / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        self.paused = False
        wait_for(self.ping, f"redis-server {self.name} on port {self.port}", on_timeout=self.log_tail)
        return self

    def client(self, **options: Any) -> Any:
        """A redis-py client on this server (the caller closes it)."""
        import redis

        options.setdefault("socket_timeout", 2.0)
        options.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(host=HOST, port=self.port, **options)

    def ping(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        with contextlib.closing(self.client(socket_timeout=0.5, socket_connect_timeout=0.5)) as c:
            return bool(c.ping())

    def command(self, *args: Any) -> Any:
        with contextlib.closing(self.client()) as c:
            return c.execute_command(*args)

    def flushall(self) -> None:
        """Lose every key (a private server only)."""
        self.command("FLUSHALL")

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections open but answers nothing."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: answer again, with the state intact."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM; SIGKILL after ``timeout``) and reap it. Safe when already stopped."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the server is gone at once."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port; with persistence off, every key is gone."""
        self.stop()
        self.start()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return f"--- {self.name} log:\n" + self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextlib.contextmanager
def private_redis_server(directory: Path, name: str = "redis") -> Iterator[RedisServer]:
    """A private standalone server, started now and stopped on exit."""
    server = RedisServer(directory, name=name)
    try:
        yield server.start()
    finally:
        server.stop()


# -- a 3-master Cluster -----------------------------------------------------------------------------------------------

class RedisCluster:
    """A private Redis Cluster of ``masters`` masters and no replicas, on loopback ports."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.dir = directory
        self.nodes = [RedisServer(directory, name=f"cluster-{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.nodes]

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            cli = redis_cli_binary()
            created = subprocess.run(
                [cli, "--cluster", "create", *(node.address for node in self.nodes), "--cluster-replicas", "0",
                 "--cluster-yes"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({created.returncode}):\n"
                                   f"{created.stdout[-3000:]}\n{created.stderr[-3000:]}")
            wait_for(self.ready, f"cluster state ok on {self.url}", on_timeout=self.logs)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        """Every node says ``cluster_state:ok``, knows every master, and all 16384 slots are assigned."""
        for node in self.nodes:
            info = node.command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
            if (fields.get("cluster_state") != "ok" or fields.get("cluster_known_nodes") != str(len(self.nodes))
                    or fields.get("cluster_slots_assigned") != "16384"):
                return False
        return True

    def client(self, **options: Any) -> Any:
        """A redis-py RedisCluster client (the caller closes it)."""
        from redis.cluster import ClusterNode
        from redis.cluster import RedisCluster as Client

        options.setdefault("socket_timeout", 2.0)
        return Client(startup_nodes=[ClusterNode(h, p) for h, p in self.startup_nodes], **options)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def logs(self) -> str:
        return "\n".join(node.log_tail(1500) for node in self.nodes)


# -- a Sentinel -------------------------------------------------------------------------------------------------------

class RedisSentinel:
    """A private master and one Sentinel monitoring it as ``service``."""

    def __init__(self, directory: Path, service: str = SENTINEL_SERVICE) -> None:
        self.dir = directory
        self.service = service
        self.master = RedisServer(directory, name="sentinel-master")
        self.port = free_port()
        self.sentinel_dir = directory / "sentinel"
        self.sentinel_dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.sentinel_dir / "sentinel.conf"
        self.log = self.sentinel_dir / "sentinel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://{HOST}:{self.port}/{self.service}"

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(HOST, self.port)]

    def start(self) -> RedisSentinel:
        try:
            self.master.start()
            # Sentinel rewrites its config file, so it lives in the private directory
            self.conf.write_text("\n".join([
                f"port {self.port}", f"bind {HOST}", "protected-mode no", "daemonize no", f"dir {self.sentinel_dir}",
                f"logfile {self.log}",
                f"sentinel monitor {self.service} {HOST} {self.master.port} 1",
                f"sentinel down-after-milliseconds {self.service} 5000",
                f"sentinel failover-timeout {self.service} 60000",
                "",
            ]))
            with (self.sentinel_dir / "stdout.log").open("ab") as out:
                self.proc = subprocess.Popen([self.master.binary, str(self.conf), "--sentinel"], stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             preexec_fn=_die_with_parent)
            wait_for(self.ready, f"sentinel on port {self.port} to know master {self.service}", on_timeout=self.logs)
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinel_command(self, *args: Any) -> Any:
        import redis

        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("sentinel not running")
        with contextlib.closing(redis.Redis(host=HOST, port=self.port, socket_timeout=1.0,
                                            socket_connect_timeout=1.0)) as c:
            return c.execute_command(*args)

    def ready(self) -> bool:
        """The Sentinel answers with the private master's address for the service, and the master answers."""
        addr = self._sentinel_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        if not addr:
            return False
        host, port = (x.decode() if isinstance(x, bytes) else str(x) for x in addr)
        return host == HOST and int(port) == self.master.port and self.master.ping()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.master.stop()

    def logs(self) -> str:
        try:
            text = self.log.read_text(errors="replace")[-2000:]
        except OSError:
            text = ""
        return f"--- sentinel log:\n{text}\n{self.master.log_tail(1500)}"


# -- started once per test process ---------------------------------------------------------------------------------

_shared_lock = threading.Lock()
_shared: dict[str, Any] = {}


def _session_dir() -> Path:
    path = _shared.get("dir")
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="sa-redis-"))
        _shared["dir"] = path
    return Path(path)


def shared_cluster() -> RedisCluster:
    """The test process's private 3-master Cluster, started on first use (skips/fails like the fixtures)."""
    redis_server_binary()
    redis_cli_binary()
    with _shared_lock:
        if "cluster" not in _shared:
            _shared["cluster"] = RedisCluster(_session_dir() / "cluster").start()
        cluster: RedisCluster = _shared["cluster"]
        return cluster


def shared_sentinel() -> RedisSentinel:
    """The test process's private Sentinel setup, started on first use."""
    redis_server_binary()
    with _shared_lock:
        if "sentinel" not in _shared:
            _shared["sentinel"] = RedisSentinel(_session_dir() / "sentinel").start()
        sentinel: RedisSentinel = _shared["sentinel"]
        return sentinel


def stop_shared() -> None:
    """Stop the Cluster and the Sentinel (end of the test session; also registered with ``atexit``)."""
    with _shared_lock:
        for name in ("cluster", "sentinel"):
            server = _shared.pop(name, None)
            if server is not None:
                server.stop()
        path = _shared.pop("dir", None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


atexit.register(stop_shared)


# -- pytest fixtures (import them into a test module or a conftest to use them) -------------------------------------

@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private 3-master Redis Cluster for the whole session."""
    cluster = shared_cluster()
    try:
        yield cluster
    finally:
        stop_shared()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A private master behind a private Sentinel (service ``samaster``) for the whole session."""
    sentinel = shared_sentinel()
    try:
        yield sentinel
    finally:
        stop_shared()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh private standalone server for one test: free to stop, kill, restart, pause or flush."""
    with private_redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def shared_redis() -> str:
    """The URL of the machine's shared Redis (never flushed or stopped by the tests)."""
    return shared_redis_url()


# -- store URIs for store-parametrised tests ------------------------------------------------------------------------

STORE_KINDS = ("sqlite", "redis", "cluster", "sentinel")


def store_uri(kind: str, tmp_path: Path) -> str:
    """A store URI for a store-parametrised test: ``sqlite`` (a file in ``tmp_path``), ``redis`` (the machine's shared
    Redis), ``cluster`` (the private 3-master Cluster) or ``sentinel`` (the private Sentinel). A Redis URI gets a
    fresh key prefix and is bootstrapped (:func:`fresh_store`). The Redis kinds check that the Redis store exists,
    and skip (fail under CI) when a server is missing. Pass the URI to :func:`drop_store` when done."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    redis_store_available()
    if kind == "redis":
        return fresh_store(shared_redis_url())
    if kind == "cluster":
        cluster = shared_cluster()
        wait_for(cluster.ready, "cluster state ok (an earlier test may have paused a master)", on_timeout=cluster.logs)
        return fresh_store(cluster.url)
    if kind == "sentinel":
        return fresh_store(shared_sentinel().url)
    raise ValueError(f"unknown store kind {kind!r}")


def fresh_store(url: str) -> str:
    """``url`` with a key prefix of its own (so tests never see each other's state), bootstrapped as a brand-new
    store: without that, its first use would look like a state loss and refuse the tokens minted before it."""
    from sa_middleware.stores import open_store

    uri = f"{url}{'&' if '?' in url else '?'}prefix=t{uuid.uuid4().hex[:12]}"
    store = open_store(uri, bootstrap=True)
    store.close()
    return uri


def drop_store(uri: str) -> None:
    """Delete the keys of a :func:`fresh_store` prefix on a standalone server (the shared Redis keeps no garbage);
    private servers, the Cluster and the Sentinel's master go away with the session."""
    import redis

    parts = urlsplit(uri)
    prefix = (parse_qs(parts.query).get("prefix") or [""])[-1]
    if parts.scheme not in ("redis", "rediss") or not prefix.startswith("t"):
        return
    client = redis.Redis.from_url(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), socket_timeout=5.0)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    except redis.RedisError:
        pass  # a stopped private server: nothing to clean
    finally:
        client.close()


# -- cleaning up any store prefix (the conformance suite's Redis cases) ----------------------------------------------

_UNLINK_MANY = """#!lua flags=allow-cross-slot-keys
for _, key in ipairs(ARGV) do redis.call('UNLINK', key) end  -- one key per command: they are in many slots
return #ARGV
"""


def forget_prefix(uri: str) -> None:
    """Delete every key of the store prefix in ``uri`` (a :func:`fresh_store` URI) wherever it lives: the shared
    Redis (:func:`drop_store`), the Sentinel's master, or every master of the Cluster (a cluster store leaves one
    epoch marker per slot, 16384 keys, so a suite that opens many stores must clean up to keep memory flat)."""
    parts = urlsplit(uri)
    prefix = (parse_qs(parts.query).get("prefix") or [""])[-1]
    if not prefix.startswith("t"):
        return
    if parts.scheme in ("redis", "rediss"):
        drop_store(uri)
        return
    import redis

    try:
        if parts.scheme == "redis+cluster":
            cluster = _shared.get("cluster")
            if cluster is None:
                return
            client = cluster.client(socket_timeout=10.0)
            try:
                for node in client.get_primaries():
                    keys = list(client.scan_iter(match=f"{prefix}:*", count=5000, target_nodes=node))
                    if keys:  # one call per master: the keys are in many slots of that master
                        client.execute_command("EVAL", _UNLINK_MANY, 1, keys[0], *keys, target_nodes=node)
            finally:
                client.close()
        elif parts.scheme == "redis+sentinel":
            sentinel = _shared.get("sentinel")
            if sentinel is not None:
                drop_store(f"{sentinel.master.url}?prefix={prefix}")
    except redis.RedisError:
        pass  # a stopped server: nothing to clean
