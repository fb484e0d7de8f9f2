"""The Redis store: every worker on every host shares contexts, tickets and locks (see the "Stores" page).

URIs (options in the query string or as keyword arguments of :func:`~sa_middleware.stores.open_store`)::

    redis://[user:password@]host[:port][/db]           rediss://...  (TLS)
    redis+unix:///path/to/redis.sock[?db=0]
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]
    redis+cluster://[user:password@]host:port[,host:port...]

Store options: ``prefix`` (key prefix, default ``sa``), ``timeout`` (seconds a call may take, default 0.25; also the
connect timeout unless ``connect_timeout`` is given), ``max_connections`` (pool size per process and server,
default 128), ``bootstrap`` (see below). Every other keyword argument goes to the redis-py client (``ssl_ca_certs``,
``health_check_interval``, ``client_name``, ``sentinel_kwargs``...).

How it works: the rules run in Lua (package data ``stores/lua/*.lua``). On Redis 7 and later the code is a function
library loaded once per server (named after its code, so versions side by side never meet) and called with FCALL;
it is loaded again when a server does not have it (a restart without persistence, FUNCTION FLUSH), once for all the
calls of a process that found it missing together. Before Redis 7
(or when the user may not load functions) the same code runs as scripts called with EVALSHA and loaded again after a
NOSCRIPT; the admission, the release and the lease renewal each have a lean script of their own. On one server (or
behind Sentinel) an admission is one call and a release another;
every expiry uses the server's clock (``TIME``). In a cluster a principal's keys share a hash tag and each object
lock has its own slot: an admission is a principal step followed by lock steps, compensated when a lock is refused.

Every call first checks an epoch marker; a missing marker means Redis lost its state (flushed, or restarted
without persistence): the store then refuses every token issued before the loss. A brand-new store looks the same,
so tokens issued before its first use are refused once, unless the store is bootstrapped: :meth:`RedisStore.
bootstrap` (or ``bootstrap=true``) marks an empty store as new, before first use.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from json.encoder import encode_basestring_ascii as _json_str  # a str as a JSON string (the C encoder)
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

try:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.asyncio.retry
    import redis.asyncio.sentinel
    import redis.cluster
    import redis.sentinel
    from redis.backoff import NoBackoff
    from redis.crc import key_slot
    from redis.exceptions import NoScriptError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the Redis store needs the redis extra: pip install 'sa-middleware[redis]'") from exc

from ..denials import Denial
from ..errors import ConfigurationError, StoreError, StoreUnavailable
from ..policy import EffectivePolicy
from ..records import Admission, AuditKind, AuditRecord, LockInfo, SessionInfo, Ticket
from ..rules import FENCE_SLACK, SEEN_PRECISION, STATUS_RETENTION, _merge_locks
from . import redis_pipeline
from .base import Store
from .flush_thread import FlushThread
from .forks import afresh_after_fork

__all__ = ["RELEASE_DELAY", "RedisStore"]

log = logging.getLogger("sa_middleware")

#: seconds a release made by a thread waits for a call of this process to carry it before the flush thread sends it
RELEASE_DELAY = 0.002

T = TypeVar("T")

DEFAULT_TIMEOUT = 0.25
DEFAULT_MAX_CONNECTIONS = 128
#: the store's scripts, each the concatenation of the files named (see lib.lua). Every call re-runs a script's
#: top-level definitions, so the hot operations (admit, release, renew) have lean scripts of their own.
_SCRIPTS: dict[str, tuple[str, ...]] = {
    "admit": ("lib.lua", "admission.lua", "main.lua"),
    "release": ("release.lua",),
    "renew": ("lib.lua", "renew.lua", "main.lua"),
    "ops": ("lib.lua", "admission.lua", "cluster.lua", "operations.lua", "main.lua"),
}
_SCRIPT_FILES = tuple(sorted({name for files in _SCRIPTS.values() for name in files}))
#: the function library (Redis 7 and later): every file, once
_LIBRARY_FILES = ("lib.lua", "admission.lua", "cluster.lua", "operations.lua", "renew.lua", "release.lua", "main.lua")
#: the script of an operation (every operation not named here: "ops")
_OP_SCRIPTS = {"admit": "admit", "renew": "renew"}
#: milliseconds a key outlives the records it holds (under a test clock, which real time does not move: a minute)
_KEY_SLACK_MS = 1000
_TEST_CLOCK_KEY_SLACK_MS = 60000
#: one call per cluster master, on the epoch markers of all its slots (KEYS[1] routes; the markers are ARGV)
_CLUSTER_SCRIPTS = ("cluster_bootstrap.lua", "cluster_declare_loss.lua")
_SLOTS = 16384
_STORE_OPTIONS = ("prefix", "timeout", "connect_timeout", "max_connections", "bootstrap")
#: what redis-py raises (RedisClusterException is not a RedisError: "cannot be connected" at start-up, ...)
_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
_UNAVAILABLE = (redis.exceptions.RedisClusterException, redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
                redis.exceptions.MasterDownError, redis.exceptions.ReadOnlyError, redis.exceptions.BusyLoadingError,
                redis.exceptions.SlotNotCoveredError, redis.exceptions.ClusterError,
                redis.exceptions.MaxConnectionsError)


def _lua(name: str) -> str:
    return (resources.files("sa_middleware.stores") / "lua").joinpath(name).read_text("utf-8")


def _script(name: str = "ops") -> str:
    """The script ``name`` of :data:`_SCRIPTS`: its files, in order, and the call of its entry point."""
    text = "\n".join(_lua(file) for file in _SCRIPTS[name])
    if name == "release":
        return f"local sa = {{}}\n{text}\nreturn sa.release(KEYS, ARGV)\n"
    return f"{text}\nreturn sa.main(KEYS, ARGV)\n"


def _library() -> tuple[str, str]:
    """The function library: its name (after its code) and its code. Its functions: ``<name>_main`` (every
    operation but the release) and ``<name>_release``."""
    body = "\n".join(_lua(file) for file in _LIBRARY_FILES)
    name = "sa_" + hashlib.sha1(body.encode()).hexdigest()[:20]
    register = "".join(f"redis.register_function('{name}_{entry}', "
                       f"function(keys, argv) return sa.{entry}(keys, argv) end)\n" for entry in ("main", "release"))
    return name, f"#!lua name={name}\n{body}\n{register}"


def _function_error(exc: redis.ResponseError) -> Literal["missing", "unsupported"] | None:
    """What an FCALL error means: the library is not loaded on that server, the server has no functions (before
    Redis 7), or neither (an error of the call itself)."""
    text = str(exc)
    if text.startswith("Function not found"):
        return "missing"
    if text.lower().startswith("unknown command") and "fcall" in text.lower():
        return "unsupported"
    return None


def _release_failed(count: int, exc: BaseException) -> None:
    log.warning("sa-middleware: release of %d ticket(s) failed; their leases will expire: %s", count, exc)


def _library_refused(exc: BaseException) -> None:
    log.warning("sa-middleware: the Redis store runs scripts: loading its function library failed: %s", exc)


def _esc(value: str) -> str:
    """Escape an id for a hash tag (the Lua side does the same): the tag is then always the whole id."""
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


_slot_tags: list[str] = []
_slot_tags_lock = threading.Lock()


def _unesc(value: str) -> str:
    """Undo :func:`_esc`."""
    return value.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")


def _glob(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _slot_tag(slot: int) -> str:
    """A short string that hashes to ``slot``: the hash tag of that slot's epoch marker in a cluster."""
    with _slot_tags_lock:
        if not _slot_tags:  # about 150,000 CRC16s, once per process (0.3 s)
            tags: list[str | None] = [None] * _SLOTS
            missing, i = _SLOTS, 0
            while missing:
                s = binascii.crc_hqx(b"e%d" % i, 0) & (_SLOTS - 1)  # the cluster's key slot of "e<i>"
                if tags[s] is None:
                    tags[s] = f"e{i}"
                    missing -= 1
                i += 1
            _slot_tags.extend(t for t in tags if t is not None)
    return _slot_tags[slot]


def _seq(value: Any) -> list[Any]:
    """A JSON list from Lua (cjson writes an empty table as ``{}``)."""
    return list(value) if isinstance(value, list) else []


def _map(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _lenient(value: Any) -> str:
    """An audit field: text that was cut or written by anyone with access never breaks the trail's query."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    return int(float(value))


def _remember(cache: dict[Any, T], key: Any, value: T) -> T:
    """Keep ``value`` under ``key`` in a cache of at most 4096 entries (emptied when full: what it holds comes and
    goes with principals, tokens and policies)."""
    if len(cache) >= 4096:
        cache.clear()
    cache[key] = value
    return value


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class _Call:
    """One script call: operation ``op`` on the slot of ``route`` (a key of that slot)."""

    op: str
    route: str
    payload: dict[str, Any] | str  # a str: JSON already
    extra: tuple[str, ...] = ()  # arguments after the constants (the admission: its policy's JSON, its token's
    # fields' JSON, then the releases it carries)


@dataclass(frozen=True, slots=True)
class _Scan:
    """Every key matching ``pattern`` (all primaries of a cluster)."""

    pattern: str


@dataclass(frozen=True, slots=True)
class _XRange:
    """Entries of the stream ``key``, newest first, from ``start`` (``+`` or ``(id``), at most ``count``."""

    key: str
    start: str
    count: int


@dataclass(frozen=True, slots=True)
class _Release:
    """Remove tickets from the hashes that hold them (release.lua; all in one slot): ``keys``, in order, are
    ``tickets``' keys, given as (ticket id, whether its last key is a one-time token's claim, deleted if it still
    names the ticket, how many keys)."""

    keys: tuple[str, ...]
    tickets: tuple[tuple[str, bool, int], ...]


def _release_of(keys: Sequence[str], ticket_id: str, jti: bool = False) -> _Release:
    """The release of one ticket from ``keys`` (with ``jti``: the last is its one-time token's claim)."""
    return _Release(tuple(keys), ((ticket_id, jti, len(keys)),))


_Step = _Call | _Scan | _XRange | _Release
_Flow = Generator[_Step, Any, T]


class _AsyncClient:
    """A ``redis.asyncio`` client of one event loop, whether it is initialised, and the lock its calls take to
    initialise it or to load the function library again."""

    def __init__(self, client: Any, pipelined: bool) -> None:
        self.client = client
        self.lock = asyncio.Lock()
        self.ready = False
        # one server: the scripts' calls of the loop go out together (see redis_pipeline)
        self.pipeline = redis_pipeline.LoopPipeline(client.connection_pool) if pipelined else None


def _unavailable(exc: Exception) -> StoreError:
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"redis store unavailable: {type(exc).__name__}: {exc}")
    return StoreError(f"redis store error: {type(exc).__name__}: {exc}")


def _denial_record(a: Admission, code: str, detail: str) -> dict[str, Any]:
    return {"k": "denial", "c": code, "s": "middleware", "u": a.sub, "i": a.session_id, "r": a.route, "d": detail}


def _audit_fields(record: AuditRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {"k": record.kind, "c": record.code, "s": record.source, "d": record.detail}
    for name, value in (("t", record.time), ("u", record.sub), ("i", record.session_id), ("r", record.route)):
        if value is not None:
            fields[name] = value
    return fields


#: a script's answer from its JSON (decoded first: ``json.loads`` would guess the encoding of bytes)
_json_decode = json.JSONDecoder().decode
#: an admission's fields of its token (RedisStore._spec_args): their values -> their JSON object
_token_fragments: dict[tuple[Any, ...], str] = {}
#: the fields of an admission that are the request's own (sent as arguments of their own)
_REQUEST_FIELDS = frozenset(("tid", "client", "ua", "route", "locks"))

#: policy object -> (its JSON fragment, that fragment as a dict); a policy is usually one object per route
_policy_fragments: dict[int, tuple[EffectivePolicy, str, dict[str, Any]]] = {}
_POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(EffectivePolicy))


def _policy_json(policy: EffectivePolicy) -> tuple[str, dict[str, Any]]:
    """The policy's fields under their Python names (sets as sorted lists; a field that is None left out), as JSON
    and as a dict: made once per policy object."""
    entry = _policy_fragments.get(id(policy))
    if entry is not None and entry[0] is policy:
        return entry[1], entry[2]
    fields: dict[str, Any] = {}
    for name in _POLICY_FIELDS:
        value = getattr(policy, name)
        if value is not None:
            fields[name] = sorted(value) if isinstance(value, frozenset) else list(value) if isinstance(
                value, tuple) else value
    text = json.dumps(fields, separators=(",", ":"), allow_nan=False)
    # the entry keeps the policy alive: its id stays its own
    _remember(_policy_fragments, id(policy), (policy, text, fields))
    return text, fields


@dataclass(frozen=True)
class _Target:
    """Where the server is: one URL (standalone), Sentinels and a service, or cluster nodes."""

    mode: Literal["standalone", "sentinel", "cluster"]
    url: str = ""
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None


def _parse_nodes(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes = []
    for part in (p.strip() for p in netloc.split(",")):
        if not part:
            continue
        if part.startswith("["):  # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = part.partition(":")
        try:
            number = int(port) if port else default_port
        except ValueError:
            raise ConfigurationError(f"bad port in redis URI: {part!r}") from None
        if not host or not 0 < number < 65536:
            raise ConfigurationError(f"bad host:port in redis URI: {part!r}")
        nodes.append((host, number))
    if not nodes:
        raise ConfigurationError("the redis URI names no host:port")
    return tuple(nodes)


def _parse_uri(uri: str, options: dict[str, Any]) -> _Target:
    """Split a store URI into a target; store options in the query string go to ``options`` (keywords win)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    query = parse_qs(parts.query, keep_blank_values=True)
    for name in _STORE_OPTIONS:
        if name in query:
            options.setdefault(name, query.pop(name)[-1])
    rest = urlencode([(k, v) for k, values in query.items() for v in values])
    if scheme in ("redis", "rediss"):
        return _Target("standalone", urlunsplit((scheme, parts.netloc, parts.path, rest, "")))
    if scheme == "redis+unix":
        if not parts.path:
            raise ConfigurationError("redis+unix URIs need a socket path: redis+unix:///run/redis.sock")
        auth = parts.netloc.rpartition("@")[0]  # only credentials: a socket has no host
        return _Target("standalone", f"unix://{auth + '@' if auth else ''}{parts.path}" + (f"?{rest}" if rest else ""))
    if rest:
        raise ConfigurationError(f"unknown options in {scheme} URI: {', '.join(sorted(query))} "
                                 f"(store options: {', '.join(_STORE_OPTIONS)}; pass client options as keywords)")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    if scheme == "redis+sentinel":
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2:
            raise ConfigurationError("redis+sentinel URIs name the service: redis+sentinel://host:26379/mymaster[/db]")
        try:
            db = int(path[1]) if len(path) == 2 else 0
        except ValueError:
            raise ConfigurationError("the database of a redis+sentinel URI must be a number") from None
        return _Target("sentinel", nodes=_parse_nodes(hosts, 26379), service=unquote(path[0]), db=db,
                       username=username, password=password)
    if scheme == "redis+cluster":
        if parts.path not in ("", "/"):
            raise ConfigurationError("redis+cluster URIs have no database or path: redis+cluster://host:port,...")
        return _Target("cluster", nodes=_parse_nodes(hosts, 6379), username=username, password=password)
    raise ConfigurationError(f"not a redis URI: {scheme}://")


def _number(value: Any, name: str, *, minimum: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"redis {name} must be a number of seconds") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= minimum:
        raise ConfigurationError(f"redis {name} must be a positive, finite number of seconds")
    return number


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigurationError(f"redis {name} must be true or false")


class RedisStore(Store):
    """Store on Redis: one server, a Sentinel-managed master, or a Redis Cluster. Open it with
    :func:`~sa_middleware.stores.open_store` (``redis://``, ``rediss://``, ``redis+unix://``, ``redis+sentinel://``,
    ``redis+cluster://``) or :meth:`from_uri`.

    ``clock`` is for tests only: when given, the scripts use ``clock()`` instead of the server's ``TIME``.
    """

    def __init__(self, target: _Target, *, prefix: str = "sa", timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 bootstrap: bool = False, clock: Callable[[], float] | None = None, **client_options: Any) -> None:
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "{}") or len(prefix) > 64:
            raise ConfigurationError("redis prefix must be a non-empty string of at most 64 characters without braces")
        self.timeout = _number(timeout, "timeout")
        self.connect_timeout = self.timeout if connect_timeout is None else _number(connect_timeout,
                                                                                    "connect_timeout")
        try:
            pool_size = int(max_connections)
        except (TypeError, ValueError):
            raise ConfigurationError("redis max_connections must be a positive integer") from None
        if isinstance(max_connections, bool) or pool_size < 1 or pool_size != float(max_connections):
            raise ConfigurationError("redis max_connections must be a positive integer")
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock must be a callable returning seconds")
        for name in ("retry", "socket_timeout", "socket_connect_timeout", "connection_pool"):
            if name in client_options:
                raise ConfigurationError(f"redis option {name!r} is set by the store: use timeout / "
                                         "connect_timeout / max_connections")
        self.target = target
        self.prefix = prefix
        self.max_connections = pool_size
        self.cluster = target.mode == "cluster"
        self._clock = clock
        self._client_options = client_options
        self._scripts = {name: _script(name) for name in _SCRIPTS}
        self._shas = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in self._scripts.items()}
        self._library_name, self._library = _library()
        self._functions = True  # False once the server turned out to have no functions (or refused to load them)
        self._library_loads = 0  # loads of the library after an FCALL found it missing (threads load it once)
        self._library_lock = threading.Lock()
        # the script's constants after the audit trail's (lib.lua: numbers written as strings, in a JSON list)
        self._constants = (f'"{STATUS_RETENTION!r}","{FENCE_SLACK!r}",'
                           f'"{_KEY_SLACK_MS if clock is None else _TEST_CLOCK_KEY_SLACK_MS}","{SEEN_PRECISION!r}"')
        self._give_backs: set[asyncio.Task[None]] = set()  # compensations of cancelled admissions, still running
        # releases not sent yet (one server or Sentinel): the next call of this process carries them (an admission
        # inside its own call), or a flush sends them together (scheduled on the loop; from threads, the flush
        # thread's, RELEASE_DELAY later)
        self._released: list[Ticket] = []
        self._released_lock = threading.Lock()
        # (issuer, subject) -> the hash of its tickets (a release names it; computed once per principal)
        self._ticket_hashes: dict[tuple[str, str], str] = {}
        # event loops with a flush of the releases scheduled (one per loop: a loop closed before its flush ran does
        # not hold up the others)
        self._flush_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._flusher = FlushThread(self._send_released, RELEASE_DELAY, "sa-middleware-redis-flush")
        afresh_after_fork(self, RedisStore._forget_after_fork)
        self._sync_client: Any = None
        self._sync_lock = threading.Lock()
        self._threads_pipeline: tuple[Any, redis_pipeline.ThreadPipeline] | None = None  # (its client, it)
        # cluster and Sentinel pools refuse at once when full: calls wait for a free connection here instead (up to
        # `timeout`, like the blocking pool of a single server)
        self._bounded = target.mode != "standalone"
        self._pipelined = target.mode == "standalone" and redis_pipeline.available()
        self._sync_slots = threading.BoundedSemaphore(pool_size)
        self._async_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
            weakref.WeakKeyDictionary()
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncClient] = \
            weakref.WeakKeyDictionary()
        self._async_lock = threading.Lock()
        try:
            self._sync_client = self._make_sync_client()
            if target.mode == "standalone":  # connections open lazily: check their options now
                pool = self._sync_client.connection_pool
                pool.connection_class(**pool.connection_kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad redis client option: {exc}") from exc
        except _ERRORS as exc:  # a cluster client connects at once: down now, it is made again at first use
            log.warning("sa-middleware: redis store unreachable at start-up: %s", exc)
        if _flag(bootstrap, "bootstrap"):
            self.bootstrap()

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's pending releases stay with the parent (it sends them), and locks its
        threads held are made again."""
        self._released, self._released_lock, self._flush_loops = [], threading.Lock(), weakref.WeakSet()
        self._sync_lock, self._async_lock = threading.Lock(), threading.Lock()
        self._library_lock = threading.Lock()

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> RedisStore:
        target = _parse_uri(uri, options)
        for name in ("timeout", "connect_timeout"):
            if isinstance(options.get(name), str):
                options[name] = _number(options[name], name)
        if isinstance(options.get("max_connections"), str):
            try:
                options["max_connections"] = int(options["max_connections"])
            except ValueError:
                raise ConfigurationError("redis max_connections must be a positive integer") from None
        return cls(target, **options)

    # -- clients -----------------------------------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        return {"socket_timeout": self.timeout, "socket_connect_timeout": self.connect_timeout,
                **self._client_options}

    def _make_sync_client(self) -> Any:
        return self._make_client(redis.Redis, redis.BlockingConnectionPool, redis.sentinel.Sentinel,
                                 redis.cluster.RedisCluster, redis.cluster.ClusterNode, Retry(NoBackoff(), 0))

    def _make_async_client(self) -> Any:
        return self._make_client(redis.asyncio.Redis, redis.asyncio.BlockingConnectionPool,
                                 redis.asyncio.sentinel.Sentinel, redis.asyncio.cluster.RedisCluster,
                                 redis.asyncio.cluster.ClusterNode, redis.asyncio.retry.Retry(NoBackoff(), 0))

    def _make_client(self, client: Any, pool: Any, sentinel: Any, cluster: Any, node: Any, no_retry: Any) -> Any:
        """A redis-py client (sync or ``redis.asyncio``: the classes are passed in) that never retries on its own:
        a failing call is the store's StoreUnavailable at once, and the next call reconnects."""
        t, common = self.target, self._common()
        if t.mode == "standalone":
            return client(connection_pool=pool.from_url(t.url, max_connections=self.max_connections,
                                                        timeout=self.timeout, retry=no_retry, **common))
        if t.mode == "sentinel":
            sentinel_kwargs = {"socket_timeout": self.timeout, "socket_connect_timeout": self.connect_timeout,
                               **common.pop("sentinel_kwargs", {})}
            return sentinel(list(t.nodes), sentinel_kwargs=sentinel_kwargs).master_for(
                t.service, db=t.db, username=t.username, password=t.password, max_connections=self.max_connections,
                retry=no_retry, **common)
        return cluster(startup_nodes=[node(h, p) for h, p in t.nodes], username=t.username, password=t.password,
                       max_connections=self.max_connections, retry=no_retry, **common)

    async def _async_entry(self) -> _AsyncClient:
        """This event loop's ``redis.asyncio`` client and pipeline (its connections belong to the loop that opened
        them)."""
        loop = asyncio.get_running_loop()
        with self._async_lock:
            entry = self._async_clients.get(loop)
            if entry is None:
                entry = self._async_clients[loop] = _AsyncClient(self._make_async_client(),
                                                                 self._pipelined)
        if not entry.ready:
            # a cluster client initialised lazily by a burst of first calls routes many of them to the wrong
            # master (MOVED, then a reset of connections in use): initialise it once, first
            async with entry.lock:
                if not entry.ready:
                    if self.cluster:
                        await entry.client.initialize()
                    entry.ready = True
        return entry

    @staticmethod
    def _on_asyncio() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # another event loop (trio): the sync client, in a worker thread
            return False
        return True

    def close(self) -> None:
        self._flusher.stop(wait=self.timeout)  # a send in progress ends before the client closes
        with contextlib.suppress(StoreError):
            self._send_released()
        with self._sync_lock:
            client, self._sync_client = self._sync_client, None
        if client is not None:
            client.close()
        with self._async_lock:
            self._async_clients = weakref.WeakKeyDictionary()

    async def aclose(self) -> None:
        if self._on_asyncio():
            await self._asend_released(_ERRORS)
            with self._async_lock:
                entry = self._async_clients.pop(asyncio.get_running_loop(), None)
            if entry is not None:
                await entry.client.aclose()
        self.close()  # closes sockets only: never waits on the network

    def _client(self) -> Any:
        client = self._sync_client
        if client is None:
            with self._sync_lock:
                if self._sync_client is None:
                    self._sync_client = self._make_sync_client()
                client = self._sync_client
        return client

    # -- keys and calls ----------------------------------------------------------------------------------------

    def _key(self, kind: str, ident: str, suffix: str = "") -> str:
        return f"{self.prefix}:{{{kind}:{_esc(ident)}}}{suffix}"

    def _principal(self, sub: str, iss: str, suffix: str = "") -> str:
        """A principal's key: issuer and subject share one hash tag (the Lua side's ``sa.pkey``). The empty issuer
        (tokens without ``iss``) keeps the tag of the subject alone, as stored before issuers were recorded."""
        if not iss:
            return self._key("p", sub, suffix)
        return self._key("pi", iss.replace("%", "%25").replace("|", "%7C") + "|" + sub, suffix)

    def _who(self, sub: str, iss: str) -> dict[str, Any]:
        """The payload naming a principal; ``lg``: on one server, adopt the state stored before issuers."""
        return {"sub": sub, "iss": iss, "lg": bool(iss) and not self.cluster}

    def _slot(self, key: str) -> int:
        return int(key_slot(key.encode()))

    def _keys(self, route: str) -> list[str]:
        if not self.cluster:
            return [f"{self.prefix}:epoch"]
        return [f"{self.prefix}:{{{_slot_tag(self._slot(route))}}}:epoch", route]

    def _args(self, call: _Call) -> list[str]:
        clock = "" if self._clock is None else repr(float(self._clock()))
        payload = call.payload if isinstance(call.payload, str) else json.dumps(call.payload, separators=(",", ":"),
                                                                                allow_nan=False)
        constants = f'["{self.audit_max_records}","{float(self.audit_retention)!r}",{self._constants}]'
        return [call.op, clock, self.prefix, payload, constants, *call.extra]

    def _answer(self, raw: Any) -> dict[str, Any]:
        result: dict[str, Any] = _json_decode(raw.decode() if isinstance(raw, bytes) else raw)
        if result.get("lost"):
            log.warning("sa-middleware: the Redis store lost its state (its epoch marker was missing: flushed, or "
                        "restarted without persistence); tokens issued before %s are refused", result.get("since"))
        return result

    def _execute(self, step: _Step) -> Any:
        if not self._bounded:
            return self._execute_now(step)
        if not self._sync_slots.acquire(timeout=self.timeout):
            raise redis.exceptions.ConnectionError(f"no free connection within {self.timeout}s")
        try:
            return self._execute_now(step)
        finally:
            self._sync_slots.release()

    async def _aexecute(self, step: _Step) -> Any:
        if not self._bounded:
            return await self._aexecute_now(step)
        loop = asyncio.get_running_loop()
        with self._async_lock:
            slots = self._async_slots.get(loop)
            if slots is None:
                slots = self._async_slots[loop] = asyncio.Semaphore(self.max_connections)
        try:
            await asyncio.wait_for(slots.acquire(), self.timeout)
        except TimeoutError:
            raise redis.exceptions.ConnectionError(f"no free connection within {self.timeout}s") from None
        try:
            return await self._aexecute_now(step)
        finally:
            slots.release()

    def _thread_send(self, client: Any) -> Callable[..., Any]:
        """How a thread sends a script's call: through the threads' pipeline of ``client`` on one server."""
        if not self._pipelined:
            return client.execute_command  # type: ignore[no-any-return]
        pipeline = self._threads_pipeline
        if pipeline is None or pipeline[0] is not client:
            with self._sync_lock:
                pipeline = self._threads_pipeline
                if pipeline is None or pipeline[0] is not client:
                    pipeline = self._threads_pipeline = (
                        client, redis_pipeline.ThreadPipeline(client.connection_pool))
        return pipeline[1].call

    def _execute_now(self, step: _Step) -> Any:
        client = self._client()
        if isinstance(step, _Scan):
            return [k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(match=step.pattern, count=1000)]
        if isinstance(step, _XRange):
            return client.xrevrange(step.key, max=step.start, min="-", count=step.count)
        name, keys, args = self._invocation(step)
        send = self._thread_send(client)
        if self._functions:
            function, loads = self._function(name), self._library_loads
            try:
                return self._result(name, send("FCALL", function, len(keys), *keys, *args))
            except redis.ResponseError as exc:
                error = _function_error(exc)
                if error is None:
                    raise
            if error == "missing" and self._reload_library(
                    loads, lambda: client.function_load(self._library, replace=True)):
                return self._result(name, send("FCALL", function, len(keys), *keys, *args))
            self._functions = False
        try:
            raw = send("EVALSHA", self._shas[name], len(keys), *keys, *args)
        except NoScriptError:  # the server lost its script cache (restart, SCRIPT FLUSH): load it again
            raw = send("EVAL", self._scripts[name], len(keys), *keys, *args)
        return self._result(name, raw)

    def _function(self, name: str) -> str:
        """The library function that runs the script ``name``."""
        return f"{self._library_name}_{'release' if name == 'release' else 'main'}"

    def _result(self, name: str, raw: Any) -> Any:
        """What a call of the script ``name`` answered (a release answers nothing to decode)."""
        return raw if name == "release" else self._answer(raw)

    def _reload_library(self, seen: int, load: Callable[[], Any]) -> bool:
        """Load the function library again (on every master of a cluster) after an FCALL found it missing, once for
        all the threads that found it so: ``seen`` is the count of loads taken before their call, and a load since
        then came after the server answered it. False when the server refuses (a user without the right to load
        functions): the store then runs scripts."""
        with self._library_lock:
            if self._library_loads == seen:
                try:
                    load()
                except redis.ResponseError as exc:
                    _library_refused(exc)
                    return False
                self._library_loads += 1
        return True

    def _invocation(self, step: _Call | _Release) -> tuple[str, list[str], list[str]]:
        """The script a step runs, its keys and its arguments."""
        if isinstance(step, _Release):
            return "release", list(step.keys), [arg for tid, jti, count in step.tickets
                                                for arg in (tid, "1" if jti else "0", str(count))]
        return _OP_SCRIPTS.get(step.op, "ops"), self._keys(step.route), self._args(step)

    async def _aexecute_now(self, step: _Step) -> Any:
        entry = await self._async_entry()
        client = entry.client
        if isinstance(step, _Scan):
            return [k.decode() if isinstance(k, bytes) else k
                    async for k in client.scan_iter(match=step.pattern, count=1000)]
        if isinstance(step, _XRange):
            return await client.xrevrange(step.key, max=step.start, min="-", count=step.count)
        name, keys, args = self._invocation(step)
        send = client.execute_command if entry.pipeline is None else entry.pipeline.call
        if self._functions:
            function, loads = self._function(name), self._library_loads
            try:
                return self._result(name, await send("FCALL", function, len(keys), *keys, *args))
            except redis.ResponseError as exc:
                error = _function_error(exc)
                if error is None:
                    raise
            loaded = False
            if error == "missing":
                async with entry.lock:  # the loop's calls that found it missing together load it once
                    loaded = self._library_loads != loads
                    if not loaded:
                        try:
                            await client.function_load(self._library, replace=True)
                            self._library_loads += 1
                            loaded = True
                        except redis.ResponseError as exc:
                            _library_refused(exc)
            if loaded:
                return self._result(name, await send("FCALL", function, len(keys), *keys, *args))
            self._functions = False
        try:
            raw = await send("EVALSHA", self._shas[name], len(keys), *keys, *args)
        except NoScriptError:
            raw = await send("EVAL", self._scripts[name], len(keys), *keys, *args)
        return self._result(name, raw)

    def _drive(self, flow: _Flow[T], carried: bool = False) -> T:
        """Run a flow with blocking calls. A failed call is thrown into the flow, which may compensate (more calls)
        before it gives up; what escapes is StoreUnavailable (or StoreError). Releases still pending go first
        (``carried``: the flow sends them itself, an admission)."""
        if not carried:
            self._send_released()
        answer: Any = None
        error: Exception | None = None
        try:
            while True:
                step = flow.send(answer) if error is None else flow.throw(error)
                error = None
                try:
                    answer = self._execute(step)
                except _ERRORS as exc:
                    error = exc
        except StopIteration as stop:
            result: T = stop.value
            return result
        except _ERRORS as exc:
            raise _unavailable(exc) from exc
        except (ValueError, TypeError) as exc:  # an answer that is not what the script writes
            raise StoreError(f"redis store error: {exc}") from exc

    async def _adrive(self, flow: _Flow[T], carried: bool = False) -> T:
        """Async twin of :meth:`_drive` (``redis.asyncio``: the event loop never waits on a thread); ``carried``: the
        flow sends the pending releases itself (an admission)."""
        if not carried:
            await self._asend_released(_ERRORS)
        answer: Any = None
        error: Exception | None = None
        try:
            while True:
                step = flow.send(answer) if error is None else flow.throw(error)
                error = None
                try:
                    answer = await self._aexecute(step)
                except _ERRORS as exc:
                    error = exc
        except StopIteration as stop:
            result: T = stop.value
            return result
        except _ERRORS as exc:
            raise _unavailable(exc) from exc
        except (ValueError, TypeError) as exc:
            raise StoreError(f"redis store error: {exc}") from exc

    async def _aop(self, make: Callable[[], _Flow[T]]) -> T:
        if self._on_asyncio():
            return await self._adrive(make())
        return await self._run(lambda: self._drive(make()))

    # -- bootstrap ---------------------------------------------------------------------------------------------

    def bootstrap(self) -> bool:
        """Mark this store as brand-new, before its first use: tokens issued before now are then accepted.

        Does nothing when the store already has its epoch marker (it was used, or bootstrapped). Returns whether
        it created the marker. Never run it on a store that lost its state: that would accept again the tokens the
        loss makes unsafe (see the "Stores" page of the documentation).
        """
        saved = self.timeout, self.connect_timeout
        self.timeout = self.connect_timeout = max(self.timeout, 10.0)  # a one-off: 16384 markers on a cluster
        try:
            client = self._make_sync_client()
        finally:
            self.timeout, self.connect_timeout = saved
        try:
            if not self.cluster:
                return bool(client.set(f"{self.prefix}:epoch", "0", nx=True))
            created, script = 0, _lua("cluster_bootstrap.lua")
            for node, keys in self._markers_by_node(client):
                created += int(client.execute_command("EVAL", script, 1, keys[0], *keys, target_nodes=node))
            return created > 0
        except _ERRORS as exc:
            raise _unavailable(exc) from exc
        finally:
            client.close()

    def has_state(self) -> bool:
        """Whether the store was ever used or bootstrapped (an epoch marker exists). Reads only."""
        client = self._client()
        try:
            if not self.cluster:
                return bool(client.exists(f"{self.prefix}:epoch"))
            pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + ":{e*}:epoch"
            return next(iter(client.scan_iter(match=pattern, count=1000)), None) is not None
        except _ERRORS as exc:
            raise _unavailable(exc) from exc

    def declare_state_loss(self) -> float:
        """Treat every token issued before now as revoked, exactly as after a detected state loss. Run it after
        restoring Redis from a backup, or after a failover that may have lost acknowledged writes: the epoch
        marker survived, so the loss would not be detected. Returns the watermark (the server's time)."""
        if not self.cluster:
            r = self._drive(self._declare_loss())
            return float(r["at"])
        client = self._client()
        try:
            script = _lua("cluster_declare_loss.lua")
            watermarks = [float(_text(client.execute_command("EVAL", script, 1, keys[0], *keys, target_nodes=node)))
                          for node, keys in self._markers_by_node(client)]
        except _ERRORS as exc:
            raise _unavailable(exc) from exc
        # each master stamps its own clock: every token issued before the earliest of them is refused everywhere
        at = min(watermarks)
        log.warning("sa-middleware: state loss declared; tokens issued before %s are refused", at)
        with contextlib.suppress(StoreError):
            self.record_audit([AuditRecord("change", "state_loss", "operator", detail=(
                f"state loss declared by an operator; tokens issued before {at!r} are refused"))])
        return at

    def _declare_loss(self) -> _Flow[dict[str, Any]]:
        r: dict[str, Any] = yield _Call("declare_loss", f"{self.prefix}:epoch", {})
        log.warning("sa-middleware: state loss declared; tokens issued before %s are refused", r["at"])
        return r

    def _markers_by_node(self, client: Any) -> list[tuple[Any, list[str]]]:
        """The epoch markers of every slot, grouped by the master that serves the slot."""
        by_node: dict[str, tuple[Any, list[str]]] = {}
        slots = client.nodes_manager.slots_cache
        _slot_tag(0)
        for slot, tag in enumerate(_slot_tags):
            node = slots[slot][0]
            by_node.setdefault(node.name, (node, []))[1].append(f"{self.prefix}:{{{tag}}}:epoch")
        return list(by_node.values())

    # -- admission ---------------------------------------------------------------------------------------------

    def _spec(self, a: Admission) -> dict[str, Any]:
        """The admission as the Lua rule reads it (``policy``: the route's policy, under its Python field names).
        Numbers and flags are normalised (``float``, ``int``, ``bool``): values Python holds equal encode the same,
        which :meth:`_spec_args`'s cache relies on."""
        spec: dict[str, Any] = {
            "tid": a.ticket_id, "sub": a.sub, "kind": a.kind, "sid": a.session_id, "th": a.token_hash,
            "exp": float(a.token_exp), "iat": _opt_float(a.token_iat),
            "gen": None if a.token_gen is None else int(a.token_gen), "jti": a.jti, "actor": a.actor,
            "cred": a.credential, "dev": a.device, "client": a.client, "ua": a.user_agent,
            "tscopes": sorted(a.token_scopes), "auth_time": _opt_float(a.auth_time), "acr": a.acr,
            "locks": [[r.key, r.mode] for r in _merge_locks(a.locks)], "lease": float(a.lease),
            "idle": float(a.session_idle), "route": a.route, "audit_admitted": bool(a.audit_admitted),
            "audit_locked": bool(a.audit_locked), "iss": a.iss, "lg": bool(a.iss) and not self.cluster,
        }
        return {k: v for k, v in spec.items() if v is not None}

    def _spec_args(self, a: Admission) -> tuple[tuple[str, str, str, str, str], str]:
        """:meth:`_spec` as the admission's call sends it: the request's own fields as arguments (ticket id,
        client, user agent, route, and the locks as a JSON list, "" for none: the script decodes nothing of them),
        and the fields a token's admissions share as one JSON object (made once per distinct set of values: a warm
        principal's admissions differ only in ticket, client, user agent, route and locks; the script decodes each
        distinct text once too)."""
        key = (a.sub, a.kind, a.session_id, a.token_hash, a.token_exp, a.token_iat, a.token_gen, a.jti, a.actor,
               a.credential, a.device, a.token_scopes, a.auth_time, a.acr, a.lease, a.session_idle,
               a.audit_admitted, a.audit_locked, a.iss, self.cluster)
        token = _token_fragments.get(key)
        if token is None:
            shared = {k: v for k, v in self._spec(a).items() if k not in _REQUEST_FIELDS}
            token = _remember(_token_fragments, key, json.dumps(shared, separators=(",", ":"), allow_nan=False))
        locks = ("[" + ",".join(f"[{_json_str(r.key)},{_json_str(r.mode)}]" for r in _merge_locks(a.locks)) + "]"
                 if a.locks else "")
        return (a.ticket_id, a.client, a.user_agent, a.route, locks), token

    def _cluster_spec(self, a: Admission) -> dict[str, Any]:
        """:meth:`_spec` with the policy, for the steps of a cluster admission."""
        return {"policy": _policy_json(a.policy)[1], **self._spec(a)}

    def admit(self, admission: Admission) -> Ticket | Denial:
        return self._drive(self._admit(admission, carry=not self.cluster), carried=not self.cluster)

    async def aadmit(self, admission: Admission) -> Ticket | Denial:
        if not self._on_asyncio():
            return await self._run(lambda: self._drive(self._admit(admission)))
        try:
            return await self._adrive(self._admit(admission, carry=True), carried=True)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled (or interrupted) mid-flight: its calls may have run
                self._give_back_later(admission)
            raise

    def _give_back_later(self, a: Admission) -> None:
        """After a cancelled :meth:`aadmit`: the caller never gets the ticket, so take back what the admission may
        have written (as after a timeout), in a background task bounded by the timeout."""
        undo = {"a": self._cluster_spec(a), "pause": False} if self.cluster else None

        async def give_back() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._adrive(self._give_back(a, undo=undo)), self.timeout)

        task = asyncio.get_running_loop().create_task(give_back())
        self._give_backs.add(task)
        task.add_done_callback(self._give_backs.discard)

    def _admit(self, a: Admission, carry: bool = False) -> _Flow[Ticket | Denial]:
        """The admission; with ``carry``, its call also applies the releases still pending (first)."""
        if not self.cluster:  # one server: the call needs no key to route it
            carried = self._take_released() if carry else []
            try:
                (tid, *request), token = self._spec_args(a)
                r = yield _Call("admit", "", tid, (_policy_json(a.policy)[0], token, *request,
                                                   *self._release_args(carried)))
            except _ERRORS as exc:
                if carried:
                    _release_failed(len(carried), exc)
                if isinstance(exc, redis.TimeoutError):  # the script may have run: take back what it granted
                    yield from self._give_back(a)
                raise
            if "d" in r:
                return Denial(r["d"], r.get("m", ""), r.get("r"))
            return self._issue(a, r, _map(r.get("f")))
        return (yield from self._admit_cluster(a, self._cluster_spec(a), self._principal(a.sub, a.iss)))

    def _give_back(self, a: Admission, locks: Iterable[str] | None = None, jti: bool = True,
                   undo: dict[str, Any] | None = None) -> _Flow[None]:
        """Best effort, after a failed call: remove the ticket ``a`` may hold (its locks, its jti claim; in a cluster
        the principal step's writes too, when ``undo`` is given). What this cannot reach ends with the lease."""
        keys = [k for k, _ in self._spec_locks(a)] if locks is None else list(locks)
        jti_claim = a.jti if jti and a.policy.one_time and a.jti is not None else None
        holders = [self._key("l", k) for k in keys]
        tickets = self._principal(a.sub, a.iss, ":tk")
        calls: list[_Call | _Release] = []
        if not self.cluster:
            if jti_claim is None:
                calls.append(_release_of((tickets, *holders), a.ticket_id))
            else:
                calls.append(_release_of((tickets, *holders, self._key("j", jti_claim)), a.ticket_id, jti=True))
        else:
            calls.extend(_release_of(group, a.ticket_id) for _, group in self._groups(holders, lambda k: k))
            if jti_claim is not None:
                calls.append(_release_of((self._key("j", jti_claim),), a.ticket_id, jti=True))
            calls.append(_Call("undo", self._principal(a.sub, a.iss), undo) if undo is not None else
                         _release_of((tickets,), a.ticket_id))
        for call in calls:  # each on its own: one unreachable slot does not stop the others
            with contextlib.suppress(*_ERRORS):
                yield call

    def _issue(self, a: Admission, r: dict[str, Any], fences: dict[str, Any]) -> Ticket:
        """The ticket of an admission: it names every key its release needs (its principal, its locks)."""
        expires = float(r["e"])
        return Ticket(a.ticket_id, a.sub, a.session_id, {k: _int(v) for k, v in fences.items()}, expires, a.iss)

    @staticmethod
    def _spec_locks(a: Admission) -> list[tuple[str, str]]:
        return [(r.key, r.mode) for r in _merge_locks(a.locks)]

    def _groups(self, keys: Iterable[str], key: Callable[[str], str]) -> list[tuple[str, list[str]]]:
        """``keys`` grouped by the slot of ``key(k)``, in order of first appearance: (a routing key, members)."""
        groups: dict[int, tuple[str, list[str]]] = {}
        for k in keys:
            route = key(k)
            slot = self._slot(route) if self.cluster else 0
            groups.setdefault(slot, (route, []))[1].append(k)
        return list(groups.values())

    def _admit_cluster(self, a: Admission, spec: dict[str, Any], pkey: str) -> _Flow[Ticket | Denial]:
        # 0. facts that live in other slots: device, credential, actor, jti (one call per slot)
        facts: dict[str, Any] = {}
        since = 0.0
        items: list[tuple[str, str, str]] = []
        if a.device is not None:
            items.append(("dev", a.device, self._key("d", a.device)))
        if a.credential is not None:
            items.append(("cred", a.credential, self._key("c", a.credential)))
        if a.actor is not None:
            items.append(("actor", a.actor, self._principal(a.actor, a.iss)))
        if a.policy.one_time and a.jti is not None:
            items.append(("jti", a.jti, self._key("j", a.jti)))
        by_slot: dict[int, tuple[str, list[list[str]]]] = {}
        for kind, ident, route in items:
            by_slot.setdefault(self._slot(route), (route, []))[1].append([kind, ident])
        for route, group in by_slot.values():
            r = yield _Call("facts", route, {"sub": a.sub, "iss": a.iss, "exp": a.token_exp, "items": group})
            since = max(since, float(r["since"]))
            facts.update({k: v for k, v in r.items() if k in ("dev_ok", "dev_ma", "cred_ma", "actor_ma", "jti")})
        facts["since"] = since
        # 1. the principal step: every check but the locks; the ticket is written, pending its locks
        undo = {"a": spec, "pause": False}
        ikey = self._key("s", a.session_id)
        try:
            r = yield _Call("principal", pkey, {"a": spec, "f": facts})
            if r.get("need") == "index":
                c = yield _Call("claim", ikey, {"sub": a.sub, "iss": a.iss, "sid": a.session_id,
                                                "exp": a.token_exp})
                facts["idx"] = c["idx"]
                facts["since"] = max(since, float(c["since"]))
                r = yield _Call("principal", pkey, {"a": spec, "f": facts})
        except redis.TimeoutError:  # the principal step may have run: undo it
            yield from self._give_back(a, locks=(), jti=False, undo=undo)
            raise
        if "d" in r:
            return Denial(r["d"], r.get("m", ""), r.get("r"))
        # 2. the one-time token's jti, on its slot; 3. the locks, slot by slot in key order (two requests for the
        # same keys meet at the first one). A refusal or a failure undoes the steps before (compensation).
        jkey = self._key("j", a.jti) if a.policy.one_time and a.jti is not None else None
        modes = dict(self._spec_locks(a))
        fences: dict[str, Any] = {}
        taken: list[str] = []
        try:
            if r.get("touch") is not None:
                with contextlib.suppress(*_ERRORS):  # the index lease: extended again next time if lost
                    yield _Call("claim", ikey, {"sub": a.sub, "iss": a.iss, "sid": a.session_id,
                                                "exp": a.token_exp, "ttl": r["touch"]})
            if jkey is not None:
                j = yield _Call("jti", jkey, {"jti": a.jti, "tid": a.ticket_id, "exp": a.token_exp})
                if not j.get("ok"):
                    detail = "this one-time token was already used"
                    yield from self._give_back(a, locks=(), jti=False,
                                               undo={**undo, "audit": [_denial_record(a, "token_replayed", detail)]})
                    return Denial("token_replayed", detail)
            for route, keys in self._groups(sorted(modes), lambda k: self._key("l", k)):
                lock = yield _Call("lock", route, {"tid": a.ticket_id, "sub": a.sub, "iss": a.iss, "sid": a.session_id,
                                                    "kind": a.kind, "lease": a.lease,
                                                    "locks": [[k, modes[k]] for k in keys]})
                if lock.get("ok"):
                    fences.update(_map(lock.get("f")))
                    taken.extend(keys)
                    continue
                pause_self = a.policy.on_lock_conflict == "pause" and a.kind != "human"
                key = lock["key"]
                if pause_self:
                    detail = (f"{key} is being modified by another principal; this session is paused until an "
                              "operator resumes it")
                    yield from self._give_back(a, locks=taken, undo={
                        "a": spec, "pause": True, "detail": detail,
                        "audit": [_denial_record(a, "session_paused", detail)]})
                    return Denial("session_paused", detail)
                detail = f"{key} is locked by another request"
                yield from self._give_back(a, locks=taken, undo={
                    "a": spec, "pause": False,
                    "audit": [_denial_record(a, "object_locked", detail)] if a.audit_locked else []})
                if a.policy.on_lock_conflict == "pause":
                    why = f"paused by a lock conflict with session {a.session_id} of {a.sub} on {a.route}"
                    for holder_sub, holder_sid, holder_kind, holder_iss in _seq(lock.get("h")):
                        if holder_kind != "human":
                            yield _Call("status", self._principal(holder_sub, holder_iss), {
                                "sub": holder_sub, "iss": holder_iss, "sid": holder_sid, "st": "paused",
                                "audit": {"r": a.route, "d": why}})
                return Denial("object_locked", detail, lock.get("r"))
        except _ERRORS:
            yield from self._give_back(a, locks=modes, undo=undo)
            raise
        ticket = self._issue(a, r, {k: fences[k] for k in modes if k in fences})
        records = _seq(r.get("au"))  # the evictions, and the admission if asked: true now that every step passed
        if a.audit_admitted:
            locks = " ".join(f"{k}#{f}" for k, f in sorted(ticket.fencing_tokens.items()))
            records.insert(0, {"k": "admission", "c": "admitted", "s": "middleware", "u": a.sub, "i": a.session_id,
                               "r": a.route, "d": f"{a.kind}; ticket {a.ticket_id}" + (f"; locks {locks}" if locks
                                                                                          else "")})
        if records:
            with contextlib.suppress(*_ERRORS):  # the admission stands; only its audit record is missing
                yield _Call("record", pkey, {"records": records})
        return ticket

    def release(self, ticket: Ticket) -> None:
        if not self.release_nowait(ticket):
            self._drive(self._release(ticket))

    def release_nowait(self, ticket: Ticket) -> bool:
        """On one server or Sentinel the release is sent with the next call of this process (the next admission
        applies it before it decides). On an event loop, a flush scheduled right after the callbacks already
        queued on the loop sends it when no call does: other processes see it at most one event-loop turn (and one
        round trip) later. From a thread, the store's flush thread sends it when no call did within
        :data:`RELEASE_DELAY` (2 ms)."""
        if self.cluster:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a thread (or trio)
            with self._released_lock:
                self._released.append(ticket)
            self._flusher.due()
            return True
        with self._released_lock:
            self._released.append(ticket)
            schedule = loop not in self._flush_loops
            self._flush_loops.add(loop)
        if schedule:
            loop.call_soon(self._flush_released, loop)
        return True

    def _send_released(self) -> None:
        """Send the pending releases in one call; a failure is logged (what is not released ends with its
        lease)."""
        released = self._take_released()
        if released:
            try:
                self._execute(self._release_step(released))
            except _ERRORS as exc:
                _release_failed(len(released), exc)

    async def arelease(self, ticket: Ticket) -> None:
        if not self.release_nowait(ticket):
            await self._aop(lambda: self._release(ticket))

    def _flush_released(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send the releases no call has carried yet (in a task of the loop)."""
        with self._released_lock:
            self._flush_loops.discard(loop)
            if not self._released:
                return

        task = loop.create_task(self._asend_released((Exception,)))
        self._give_backs.add(task)
        task.add_done_callback(self._give_backs.discard)

    async def _asend_released(self, errors: tuple[type[BaseException], ...]) -> None:
        """Send the releases no call has carried yet, in one call; a failure among ``errors`` is logged (what is
        not released ends with its lease)."""
        released = self._take_released()
        if released:
            try:
                await self._aexecute(self._release_step(released))
            except errors as exc:
                _release_failed(len(released), exc)

    def _take_released(self) -> list[Ticket]:
        if not self._released:
            return []
        with self._released_lock:
            released, self._released = self._released, []
        return released

    def _ticket_keys(self, ticket: Ticket) -> list[str]:
        """The hashes that hold a ticket: its principal's tickets, the holders of its locks."""
        who = (ticket.iss, ticket.sub)
        tickets = self._ticket_hashes.get(who) or _remember(self._ticket_hashes, who,
                                                             self._principal(ticket.sub, ticket.iss, ":tk"))
        return [tickets, *(self._key("l", lock) for lock in ticket.fencing_tokens)]

    def _release_args(self, tickets: Sequence[Ticket]) -> list[str]:
        """Releases as arguments of a call (one server): per ticket, its id, the number of its keys, its keys."""
        args: list[str] = []
        for ticket in tickets:
            keys = self._ticket_keys(ticket)
            args.extend((ticket.ticket_id, str(len(keys)), *keys))
        return args

    def _release_step(self, tickets: Sequence[Ticket]) -> _Release:
        """One call releasing ``tickets`` (one server)."""
        groups = [(ticket.ticket_id, self._ticket_keys(ticket)) for ticket in tickets]
        return _Release(tuple(k for _, keys in groups for k in keys),
                        tuple((ticket_id, False, len(keys)) for ticket_id, keys in groups))

    def _release(self, ticket: Ticket) -> _Flow[None]:
        """Remove the ticket from its principal's tickets and from the holders of its locks (the keys it names;
        a ticket released twice, or already expired, changes nothing)."""
        tickets, *holders = self._ticket_keys(ticket)
        if not self.cluster:
            yield _release_of((tickets, *holders), ticket.ticket_id)
            return
        yield _release_of((tickets,), ticket.ticket_id)
        for _, keys in self._groups(holders, lambda k: k):
            yield _release_of(keys, ticket.ticket_id)

    def renew(self, tickets: Sequence[Ticket], lease: float) -> None:
        self._drive(self._renew(tickets, lease))

    async def arenew(self, tickets: Sequence[Ticket], lease: float) -> None:
        await self._aop(lambda: self._renew(tickets, lease))

    def _renew(self, tickets: Sequence[Ticket], lease: float) -> _Flow[None]:
        """Extend the tickets' records (their principal's, their locks' holders) by ``lease`` from now."""
        by_hash: dict[tuple[str, str, str], list[str]] = {}
        for ticket in tickets:
            by_hash.setdefault(("p", ticket.sub, ticket.iss), []).append(ticket.ticket_id)
            for lock in ticket.fencing_tokens:
                by_hash.setdefault(("l", lock, ""), []).append(ticket.ticket_id)
        if not by_hash:
            return
        items: list[tuple[str, list[Any]]] = [
            (self._principal(ident, iss) if kind == "p" else self._key(kind, ident), [kind, ident, tids, iss])
            for (kind, ident, iss), tids in by_hash.items()]
        if not self.cluster:
            yield _Call("renew", items[0][0], {"lease": lease, "items": [item for _, item in items]})
            return
        groups: dict[int, tuple[str, list[list[Any]]]] = {}
        for route, item in items:
            groups.setdefault(self._slot(route), (route, []))[1].append(item)
        for route, group in groups.values():
            yield _Call("renew", route, {"lease": lease, "items": group})

    # -- operations --------------------------------------------------------------------------------------------

    def rotate(self, sub: str, iss: str = "") -> int:
        return _int(self._drive(self._principal_op("rotate", sub, iss, answer="g")))

    async def arotate(self, sub: str, iss: str = "") -> int:
        return _int(await self._aop(lambda: self._principal_op("rotate", sub, iss, answer="g")))

    def revoke_principal(self, sub: str, iss: str = "") -> float:
        return float(self._drive(self._principal_op("revoke_principal", sub, iss, answer="at")))

    async def arevoke_principal(self, sub: str, iss: str = "") -> float:
        return float(await self._aop(lambda: self._principal_op("revoke_principal", sub, iss, answer="at")))

    def revoke_session(self, session_id: str) -> bool:
        return self._drive(self._session_op(session_id, "revoked"))

    async def arevoke_session(self, session_id: str) -> bool:
        return await self._aop(lambda: self._session_op(session_id, "revoked"))

    def pause_session(self, session_id: str) -> bool:
        return self._drive(self._session_op(session_id, "paused"))

    async def apause_session(self, session_id: str) -> bool:
        return await self._aop(lambda: self._session_op(session_id, "paused"))

    def resume_session(self, session_id: str) -> bool:
        return self._drive(self._session_op(session_id, "active"))

    async def aresume_session(self, session_id: str) -> bool:
        return await self._aop(lambda: self._session_op(session_id, "active"))

    def _session_op(self, session_id: str, status: str) -> _Flow[bool]:
        """Find the session's principal in the session index, then change the status in its slot."""
        index = yield _Call("index", self._key("s", session_id),
                            {"sid": session_id, "op": "revoke" if status == "revoked" else "get"})
        if "known" in index:  # a session never seen: its revocation is remembered in the index
            return bool(index["known"])
        owner = index.get("o")
        if not owner:
            return False
        owner_iss = index.get("oi") or ""
        r = yield _Call("status", self._principal(owner, owner_iss),
                        {**self._who(owner, owner_iss), "sid": session_id, "st": status})
        return bool(r["ok"])

    def report_compromise(self, sub: str | None, session_id: str | None, iss: str = "") -> list[str]:
        return self._drive(self._compromise(sub, session_id, iss))

    async def areport_compromise(self, sub: str | None, session_id: str | None, iss: str = "") -> list[str]:
        return await self._aop(lambda: self._compromise(sub, session_id, iss))

    def _compromise(self, sub: str | None, session_id: str | None, iss: str) -> _Flow[list[str]]:
        if sub is None and session_id is None:
            raise ConfigurationError("report_compromise needs sub or session_id")
        principal, issuer, origin_sid, strict, origins = sub, iss, None, False, None
        if session_id is not None:
            index = yield _Call("index", self._key("s", session_id), {"sid": session_id, "op": "get"})
            owner, owner_iss = index.get("o") or None, index.get("oi") or ""
            if owner is None:
                if principal is None:
                    return []
            elif principal is None or (principal, issuer) == (owner, owner_iss):
                principal, issuer, origin_sid, strict = owner, owner_iss, session_id, sub is None
            else:  # a named principal, and a session of another: that session's credential and device
                s = yield _Call("session", self._principal(owner, owner_iss),
                                {**self._who(owner, owner_iss), "sid": session_id})
                if not s.get("none"):
                    origins = [[s["cr"], s["dv"]]]
        assert principal is not None
        payload: dict[str, Any] = {**self._who(principal, issuer), "strict": strict}
        if origin_sid is not None:
            payload["sid"] = origin_sid
        if origins is not None:
            payload["origins"] = origins
        c = yield _Call("compromise", self._principal(principal, issuer), payload)
        if c.get("none"):
            return []
        at, creds, devs = c["at"], _seq(c.get("creds")), _seq(c.get("devs"))
        hits = set(_seq(c.get("hits")))
        related = {(issuer, other) for other in _seq(c.get("ax"))}  # actors are subjects of the same issuer
        for kind, values in (("c", creds), ("d", devs)):
            for value in values:
                m = yield _Call("marker", self._key(kind, value), {"kind": kind, "id": value, "at": at})
                related.update((str(i), str(u)) for i, u in _seq(m.get("subs")))
        related.discard((issuer, principal))
        for other_iss, other in sorted(related):
            r = yield _Call("related", self._principal(other, other_iss),
                            {**self._who(other, other_iss), "at": at, "actor": principal, "actor_iss": issuer,
                             "creds": creds, "devs": devs})
            hits.update(_seq(r.get("hits")))
        return sorted(hits)

    def set_device_status(self, device_id: str, compliant: bool) -> None:
        self._drive(self._device(device_id, compliant))

    async def aset_device_status(self, device_id: str, compliant: bool) -> None:
        await self._aop(lambda: self._device(device_id, compliant))

    def _device(self, device_id: str, compliant: bool) -> _Flow[None]:
        yield _Call("device", self._key("d", device_id), {"id": device_id, "ok": bool(compliant)})

    def set_privileges(self, sub: str, scopes: Iterable[str] | None, iss: str = "") -> None:
        self._drive(self._privileges(sub, scopes, iss))

    async def aset_privileges(self, sub: str, scopes: Iterable[str] | None, iss: str = "") -> None:
        await self._aop(lambda: self._privileges(sub, scopes, iss))

    def _privileges(self, sub: str, scopes: Iterable[str] | None, iss: str) -> _Flow[None]:
        payload: dict[str, Any] = self._who(sub, iss)
        if scopes is not None:
            payload["scopes"] = sorted(set(scopes))
        yield _Call("privileges", self._principal(sub, iss), payload)

    # -- operations of security events -------------------------------------------------------------------------

    def revoke_sessions(self, sub: str, before: float | None, iss: str = "") -> list[str]:
        return self._drive(self._principal_op("revoke_sessions", sub, iss, before=before, answer="hits"))

    async def arevoke_sessions(self, sub: str, before: float | None, iss: str = "") -> list[str]:
        return await self._aop(lambda: self._principal_op("revoke_sessions", sub, iss, before=before, answer="hits"))

    def disable_principal(self, sub: str, iss: str = "") -> float:
        return float(self._drive(self._principal_op("disable", sub, iss, answer="at")))

    async def adisable_principal(self, sub: str, iss: str = "") -> float:
        return float(await self._aop(lambda: self._principal_op("disable", sub, iss, answer="at")))

    def enable_principal(self, sub: str, iss: str = "") -> bool:
        return bool(self._drive(self._principal_op("enable", sub, iss, answer="ok")))

    async def aenable_principal(self, sub: str, iss: str = "") -> bool:
        return bool(await self._aop(lambda: self._principal_op("enable", sub, iss, answer="ok")))

    def set_assurance(self, sub: str, level: str | None, at: float | None, iss: str = "") -> None:
        self._drive(self._principal_op("assurance", sub, iss, level=level, at=at))

    async def aset_assurance(self, sub: str, level: str | None, at: float | None, iss: str = "") -> None:
        await self._aop(lambda: self._principal_op("assurance", sub, iss, level=level, at=at))

    def raise_risk(self, sub: str, amount: int, window: float, iss: str = "") -> None:
        self._drive(self._principal_op("raise_risk", sub, iss, amount=amount, window=window))

    async def araise_risk(self, sub: str, amount: int, window: float, iss: str = "") -> None:
        await self._aop(lambda: self._principal_op("raise_risk", sub, iss, amount=amount, window=window))

    def _principal_op(self, op: str, sub: str, iss: str, answer: str | None = None, **payload: Any) -> _Flow[Any]:
        body = {**self._who(sub, iss), **{k: v for k, v in payload.items() if v is not None}}
        r = yield _Call(op, self._principal(sub, iss), body)
        if answer == "hits":
            return _seq(r.get("hits"))
        return None if answer is None else r[answer]

    def seen_event(self, key: str, ttl: float) -> bool:
        return bool(self._drive(self._event("seen_event", key, ttl)))

    async def aseen_event(self, key: str, ttl: float) -> bool:
        return bool(await self._aop(lambda: self._event("seen_event", key, ttl)))

    def forget_event(self, key: str) -> None:
        self._drive(self._event("forget_event", key, None))

    async def aforget_event(self, key: str) -> None:
        await self._aop(lambda: self._event("forget_event", key, None))

    def _event(self, op: str, key: str, ttl: float | None) -> _Flow[bool]:
        r = yield _Call(op, self._key("ev", key), {"key": key, **({} if ttl is None else {"ttl": ttl})})
        return bool(r.get("seen"))

    # -- signing keys and generation claims ----------------------------------------------------------------------

    def note_keys(self, drop: str | None) -> int:
        return self._drive(self._note_keys(drop))

    async def anote_keys(self, drop: str | None) -> int:
        return await self._aop(lambda: self._note_keys(drop))

    def _note_keys(self, drop: str | None) -> _Flow[int]:
        r = yield _Call("note_keys", self._key("keys", "notes"), {} if drop is None else {"drop": drop})
        return _int(r["g"])

    def key_notes(self) -> tuple[int, tuple[str, ...]]:
        return self._drive(self._key_notes())

    async def akey_notes(self) -> tuple[int, tuple[str, ...]]:
        return await self._aop(self._key_notes)

    def _key_notes(self) -> _Flow[tuple[int, tuple[str, ...]]]:
        r = yield _Call("key_notes", self._key("keys", "notes"), {})
        return _int(r["g"]), tuple(str(kid) for kid in _seq(r.get("dropped")))

    def note_generation_claims(self, notes: Mapping[tuple[str, str], bool]) -> None:
        self._drive(self._note_generation_claims(notes))

    async def anote_generation_claims(self, notes: Mapping[tuple[str, str], bool]) -> None:
        await self._aop(lambda: self._note_generation_claims(notes))

    def _note_generation_claims(self, notes: Mapping[tuple[str, str], bool]) -> _Flow[None]:
        for (iss, sub), present in notes.items():
            yield from self._principal_op("gen_claim_note", sub, iss, present=bool(present))

    def generation_claim(self, sub: str, iss: str = "") -> bool | None:
        return self._drive(self._generation_claim(sub, iss))

    async def ageneration_claim(self, sub: str, iss: str = "") -> bool | None:
        return await self._aop(lambda: self._generation_claim(sub, iss))

    def _generation_claim(self, sub: str, iss: str) -> _Flow[bool | None]:
        gc = yield from self._principal_op("gen_claim", sub, iss, answer="gc")
        return None if gc in (None, "") else gc == "1"

    def reset_generation(self, sub: str, iss: str = "") -> int:
        return self._drive(self._reset_generation(sub, iss))

    async def areset_generation(self, sub: str, iss: str = "") -> int:
        return await self._aop(lambda: self._reset_generation(sub, iss))

    def _reset_generation(self, sub: str, iss: str) -> _Flow[int]:
        return _int((yield from self._principal_op("reset_generation", sub, iss, answer="g")))

    # -- the audit trail -----------------------------------------------------------------------------------------

    def _audit_key(self, route: str) -> str:
        """The audit stream of ``route``'s slot (next to its epoch marker)."""
        return self._keys(route)[0].removesuffix(":epoch") + ":audit"

    def record_audit(self, records: Sequence[AuditRecord]) -> None:
        self._drive(self._record(records))

    async def arecord_audit(self, records: Sequence[AuditRecord]) -> None:
        await self._aop(lambda: self._record(records))

    def _record(self, records: Sequence[AuditRecord]) -> _Flow[None]:
        groups: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        for record in records:
            route = self._key("p", record.sub) if record.sub is not None else f"{self.prefix}:audit"
            groups.setdefault(self._audit_key(route), (route, []))[1].append(_audit_fields(record))
        for route, group in groups.values():
            yield _Call("record", route, {"records": group})

    def audit(self, *, sub: str | None = None, session_id: str | None = None, code: str | None = None,
              kind: str | None = None, since: float | None = None, until: float | None = None,
              limit: int = 100) -> list[AuditRecord]:
        return self._drive(self._audit(sub, session_id, code, kind, since, until, limit))

    async def aaudit(self, *, sub: str | None = None, session_id: str | None = None, code: str | None = None,
                     kind: str | None = None, since: float | None = None, until: float | None = None,
                     limit: int = 100) -> list[AuditRecord]:
        return await self._aop(lambda: self._audit(sub, session_id, code, kind, since, until, limit))

    def _audit(self, sub: str | None, session_id: str | None, code: str | None, kind: str | None,
               since: float | None, until: float | None, limit: int) -> _Flow[list[AuditRecord]]:
        """Newest first (by time, then by arrival) among the newest ``audit_max_records`` of each stream."""
        r = yield _Call("now", f"{self.prefix}:audit", {})
        cutoff = float(r["now"]) - self.audit_retention
        if since is not None:
            cutoff = max(cutoff, since)
        if self.cluster:
            pattern = _glob(self.prefix) + ":{e*}:audit"
            keys: list[str] = sorted(set((yield _Scan(pattern))))
        else:
            keys = [f"{self.prefix}:audit"]
        wanted = {"u": sub, "i": session_id, "c": code, "k": kind}
        # the newest audit_max_records by arrival (across the streams of a cluster's slots), then the filters;
        # newest first by time, then by arrival
        window: list[tuple[int, int, int, dict[str, str]]] = []
        for key in keys:
            start, scanned = "+", 0
            while scanned < self.audit_max_records:
                count = min(1000, self.audit_max_records - scanned)
                entries = yield _XRange(key, start, count)
                for entry_id, raw in entries:
                    scanned += 1
                    fields = {_text(k): _lenient(v) for k, v in raw.items()}
                    ms, _, seq = _text(entry_id).partition("-")
                    window.append((int(fields.get("w") or int(ms) * 1000), int(ms), int(seq or 0), fields))
                if len(entries) < count:
                    break
                start = "(" + _text(entries[-1][0])
        window.sort(key=lambda item: item[:3], reverse=True)
        found: list[tuple[float, tuple[int, int, int], AuditRecord]] = []
        for *arrival, fields in window[:self.audit_max_records]:
            t = float(fields["t"])
            if t < cutoff or (until is not None and t > until):
                continue
            if any(value is not None and fields.get(name) != value for name, value in wanted.items()):
                continue
            found.append((t, (arrival[0], arrival[1], arrival[2]), AuditRecord(
                cast(AuditKind, fields["k"]), fields["c"], fields["s"], fields.get("u"), fields.get("i"),
                fields.get("r"), fields.get("d", ""), t)))
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [record for *_, record in found[:limit]]

    # -- listings ----------------------------------------------------------------------------------------------

    def sessions(self, sub: str, session_idle: float, iss: str = "") -> list[SessionInfo]:
        return self._drive(self._sessions(sub, session_idle, iss))

    async def asessions(self, sub: str, session_idle: float, iss: str = "") -> list[SessionInfo]:
        return await self._aop(lambda: self._sessions(sub, session_idle, iss))

    def _sessions(self, sub: str, session_idle: float, iss: str) -> _Flow[list[SessionInfo]]:
        r = yield _Call("sessions", self._principal(sub, iss), {"sub": sub, "iss": iss, "idle": session_idle})
        return [SessionInfo(
            s["id"], s.get("s", ""), s.get("k", ""), s["st"], float(s["c"]), float(s["l"]), float(s["e"]),
            s.get("cl", ""), s.get("ua", ""), s.get("dv"), s.get("cr"), s.get("ac"), _opt_float(s.get("ma")),
            None if s.get("mg") is None else _int(s["mg"]), _opt_float(s.get("ca")), s.get("is") or "")
            for s in _seq(r.get("sessions"))]

    def all_sessions(self, session_idle: float, limit: int) -> list[SessionInfo]:
        return self._drive(self._all_sessions(session_idle, limit))

    async def aall_sessions(self, session_idle: float, limit: int) -> list[SessionInfo]:
        return await self._aop(lambda: self._all_sessions(session_idle, limit))

    def _all_sessions(self, session_idle: float, limit: int) -> _Flow[list[SessionInfo]]:
        """Every principal's session hash (a scan), then each principal's active sessions (one call each)."""
        principals: set[tuple[str, str]] = set()
        for kind in ("p", "pi"):
            head = f"{self.prefix}:{{{kind}:"
            for key in (yield _Scan(f"{_glob(head)}*}}:ss")):
                if not (key.startswith(head) and key.endswith("}:ss")):
                    continue
                ident = key[len(head):-len("}:ss")]
                if kind == "p":
                    principals.add(("", _unesc(ident)))
                else:  # ISSUER|SUBJECT, the issuer's own "|" and "%" escaped (_principal)
                    issuer, _, subject = ident.partition("|")
                    principals.add((_unesc(issuer).replace("%7C", "|").replace("%25", "%"), _unesc(subject)))
        found: list[SessionInfo] = []
        for iss, sub in sorted(principals):
            found.extend((yield from self._sessions(sub, session_idle, iss)))
        found.sort(key=lambda s: (-s.last_seen, s.session_id))
        return found[:limit]

    def session_owner(self, session_id: str) -> str | None:
        return self._drive(self._owner(session_id))

    async def asession_owner(self, session_id: str) -> str | None:
        return await self._aop(lambda: self._owner(session_id))

    def _owner(self, session_id: str) -> _Flow[str | None]:
        index = yield _Call("index", self._key("s", session_id), {"sid": session_id, "op": "get"})
        owner = index.get("o")
        return str(owner) if owner else None

    def issuers(self, sub: str) -> list[str]:
        return self._drive(self._issuers(sub))

    async def aissuers(self, sub: str) -> list[str]:
        return await self._aop(lambda: self._issuers(sub))

    def _issuers(self, sub: str) -> _Flow[list[str]]:
        """The issuers with keys for ``sub``: a scan (for operators and the CLI, never on a request's path)."""
        prefix, tag = _glob(self.prefix), _glob(_esc(sub))
        found: set[str] = set()
        for key in (yield _Scan(f"{prefix}:{{p:{tag}}}*")):
            if key.startswith(f"{self.prefix}:{{p:{_esc(sub)}}}"):
                found.add("")
        for key in (yield _Scan(f"{prefix}:{{pi:*|{tag}}}*")):
            ident = key[len(self.prefix) + 5:].partition("}")[0]  # prefix:{pi:ISSUER|SUBJECT}suffix
            issuer, _, subject = ident.partition("|")
            if _unesc(subject) == sub:
                found.add(_unesc(issuer).replace("%7C", "|").replace("%25", "%"))
        return sorted(found)

    def locks(self) -> list[LockInfo]:
        return self._drive(self._locks())

    async def alocks(self) -> list[LockInfo]:
        return await self._aop(self._locks)

    def _locks(self) -> _Flow[list[LockInfo]]:
        pattern = _glob(self.prefix) + ":{l:*}"
        keys: list[str] = yield _Scan(pattern)
        found: list[LockInfo] = []
        for route, group in self._groups(sorted(set(keys)), lambda k: k):
            for i in range(0, len(group), 256):
                r = yield _Call("locks", route, {"keys": group[i:i + 256]})
                found.extend(LockInfo(key, mode, _int(fence), tid, sub, sid, float(expires), iss)
                             for key, mode, fence, tid, sub, sid, expires, iss in _seq(r.get("locks")))
        return sorted(found, key=lambda lock: (lock.key, lock.fencing_token))

