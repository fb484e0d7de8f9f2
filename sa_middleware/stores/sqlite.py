"""The SQLite store: one host, any number of threads and worker processes sharing one database file.

Every admission runs inside a ``BEGIN IMMEDIATE`` transaction: read a snapshot, run
:func:`sa_middleware.rules.evaluate`, write the verdict. The writes of one process are group-committed: they join one
queue, and whoever leads decides the writes queued by then one after another in one transaction, so each decision
sees every earlier one and the process never competes with itself for the write lock.
The database runs in WAL mode with ``synchronous=NORMAL`` and a busy timeout (``?timeout=``, default 2 s); a store
that stays locked by other processes past it answers :class:`~sa_middleware.errors.StoreUnavailable`.

On the event loop, admissions and releases are queued and decided inline by a flush scheduled right after the
callbacks already queued, on a connection that never waits (busy timeout 0, no automatic checkpoint): when another
process holds the write lock, the flush is rolled back at once and the admissions go to worker threads, which may
wait. WAL checkpoints, which fsync, run on a maintenance thread, never on the loop.

The WAL is bounded: every connection sets ``journal_size_limit`` (:data:`WAL_LIMIT`), and the WAL's size is looked
at every 64 commits and every second while commits come: past the limit, the maintenance thread truncates it
(``wal_checkpoint(TRUNCATE)``) while this process's writers wait. The database file is created readable and
writable by its owner only (0600, whatever the umask); SQLite gives its ``-wal``, ``-shm`` and journal files the
same mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import sqlite_utils

from ..denials import Denial
from ..errors import ConfigurationError, StoreError, StoreUnavailable
from ..records import (
    Admission,
    AuditRecord,
    LockHolder,
    LockInfo,
    Marker,
    PrincipalState,
    SessionInfo,
    Snapshot,
    Ticket,
    TicketRecord,
    Verdict,
)
from ..rules import FENCE_SLACK, STATUS_RETENTION, evaluate, live_risk, seen_again
from .base import Store
from .flush_thread import FlushThread
from .forks import afresh_after_fork

__all__ = ["RELEASE_DELAY", "WAL_LIMIT", "SQLiteStore"]

log = logging.getLogger("sa_middleware")

T = TypeVar("T")

#: bytes the WAL is cut back to after a checkpoint (``PRAGMA journal_size_limit``): see docs "Operations hygiene"
WAL_LIMIT = 16 * 1024 * 1024

_SESSION_COLUMNS = ("session_id, sub, kind, status, created, last_seen, expires, client, user_agent, device, "
                    "credential, actor, marked_at, marked_generation, cleared_at, iss")
_PRINCIPAL_COLUMNS = ("generation, not_before, risk, privileges, privileges_at, marker_at, marker_generation, "
                      "sessions_before, disabled_at, assurance, assurance_at")
_PRUNE_EVERY = 10.0  # seconds between sweeps of expired rows
_AUDIT_COLUMNS = "time, kind, code, source, sub, session_id, route, detail"
_AUDIT_PRUNE_EVERY = 64  # audit records written between two bounded prunes of the oldest ones
_AUDIT_PRUNE_BATCH = 512  # the oldest records looked at by one bounded prune
_AUDIT_DETAIL = 512  # characters of an audit detail kept
_CHECKPOINT_EVERY = 256  # inline commits between WAL checkpoints (run on the maintenance thread)
_WAL_CHECK_EVERY = 1.0  # seconds between two looks at the WAL's size by the maintenance thread, while commits come
_WAL_LOOK_EVERY = 64  # commits between two looks at the WAL's size by the committing thread
_FILES = ("", "-wal", "-shm", "-journal")  # the database and the files SQLite keeps next to it


#: the page size of a file the store creates: a commit appends every page it changed to the WAL, and an admission
#: changes a few small rows, so small pages write less (about a tenth less time per admission than 4096 bytes)
PAGE_SIZE = 1024
_WRITER_BUSY_WAIT = 0.01  # seconds a thread's write connection waits in SQLite's busy handler before BEGIN is retried
_BATCH = 256  # writes one group-commit transaction decides at most
#: writes with a waiting caller (admissions) one flush on the event loop decides at most: the rest waits for the next
#: turn of the loop, after the callbacks queued meanwhile (the responses of the requests just decided), so a burst
#: never holds the loop long. Releases ride along (cheap, and none is left behind when the loop closes).
_LOOP_BATCH = 16
_LEAD_EXTRA = 4  # batches a leading thread decides for others after its own write
#: seconds a release queued by a thread waits for the next write of its process before the flush thread commits it
RELEASE_DELAY = 0.002
_QUEUED, _RUNNING, _DONE, _ABANDONED = range(4)  # the states of a queued write


class _Busy(StoreUnavailable):
    """The write lock is taken; the inline attempt was rolled back and must be retried off the loop."""


class _Entry:
    """One write waiting for the next group-commit transaction, and its outcome."""

    __slots__ = ("error", "func", "future", "loop", "prunes", "result", "state", "unawaited", "wake")

    def __init__(self, func: Callable[[sqlite3.Connection, float], Any],
                 loop: asyncio.AbstractEventLoop | None = None, future: asyncio.Future[Any] | None = None,
                 prunes: bool = False, unawaited: bool = False) -> None:
        self.func, self.loop, self.future, self.prunes = func, loop, future, prunes
        self.unawaited = unawaited  # a release nobody waits for
        self.state = _QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.wake: threading.Condition | None = None  # a waiting thread's own (on the store's lock)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock another connection holds (``SQLITE_BUSY``, ``SQLITE_LOCKED``)."""
    code = getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _forget_writes(child: SQLiteStore) -> None:
    """In a forked child, the group commit starts afresh: the parent's queue and leader stay with the parent."""
    child._mutex = threading.RLock()
    child._cond = threading.Condition(child._mutex)
    child._queue = deque()
    child._leading, child._alone, child._waiting, child._flush_loops = False, 0, 0, set()
    child._reading = 0
    child._maintenance = None


def _failure(exc: BaseException) -> BaseException:
    """What the caller of a write sees when it failed: SQLite's errors as store errors, others as they are."""
    if isinstance(exc, StoreError) or not isinstance(exc, sqlite3.Error):
        return exc
    failure = (StoreUnavailable if isinstance(exc, sqlite3.OperationalError) else StoreError)(
        f"sqlite store error: {exc}")
    failure.__cause__ = exc
    return failure


_FROM_STATES = {"paused": '["active", "paused"]', "revoked": '["active", "paused", "compromised", "revoked"]',
                "compromised": '["active", "paused", "compromised"]', "active": '["active"]'}


def _schema(db: sqlite_utils.Database) -> None:
    # principal state is kept per issuer and subject: a database created before issuers has them added ("" for
    # the rows it holds, which _adopt copies to an issuer's principal on its first use)
    principals = {"iss": str, "sub": str, "generation": int, "not_before": float, "risk": str, "privileges": str,
                  "privileges_at": float, "marker_at": float, "marker_generation": int, "sessions_before": float,
                  "disabled_at": float, "assurance": str, "assurance_at": float,
                  "gen_claim": int}  # whether the principal's latest token carried a generation claim
    if db.table("principals").exists() and "iss" not in db.table("principals").columns_dict:
        _add_issuer_to_principals(db, principals)
    db.table("principals").create(principals, pk=("iss", "sub"), not_null={"iss", "generation"},
                                  defaults={"iss": "", "generation": 0}, if_not_exists=True)
    for column, kind in principals.items():  # added by later versions (security events): upgraded in place
        if column not in db.table("principals").columns_dict:
            db.table("principals").add_column(column, kind)
    db.table("sessions").create({"session_id": str, "sub": str, "kind": str, "status": str, "created": float,
                           "last_seen": float, "expires": float, "client": str, "user_agent": str, "device": str,
                           "credential": str, "actor": str, "marked_at": float, "marked_generation": int,
                           "cleared_at": float, "iss": str}, pk="session_id", not_null={"iss"}, defaults={"iss": ""},
                          if_not_exists=True)
    for name, (fields, key) in _KEYED_TABLES.items():
        _keyed_table(db, name, fields, key)
    for index in _DROPPED_INDEXES:
        db.execute(f"DROP INDEX IF EXISTS {index}")
    if "iss" not in db.table("sessions").columns_dict:
        db.table("sessions").add_column("iss", str, not_null_default="")
    db.table("devices").create({"device_id": str, "compliant": int, "updated": float}, pk="device_id",
                         if_not_exists=True)
    db.table("jtis").create({"jti": str, "expires": float}, pk="jti", if_not_exists=True)
    db.table("markers").create({"kind": str, "value": str, "at": float}, pk=("kind", "value"), if_not_exists=True)
    db.table("events_seen").create({"key": str, "expires": float}, pk="key", if_not_exists=True)
    # signing keys: what operators asked every Guard to do (refresh, drop a key id)
    db.table("key_notes").create({"kid": str, "generation": int, "at": float}, pk="kid", if_not_exists=True)
    # the audit trail: ids grow with every insert (INTEGER PRIMARY KEY), which bounds the count cheaply
    db.table("audit").create({"id": int, "time": float, "kind": str, "code": str, "source": str, "sub": str,
                              "session_id": str, "route": str, "detail": str}, pk="id", if_not_exists=True)
    for columns in (["time"], ["sub", "time"], ["session_id", "time"], ["code", "time"]):
        db.table("audit").create_index(columns, if_not_exists=True)
    for table, columns in (("sessions", ["sub"]), ("sessions", ["iss", "sub"]), ("sessions", ["actor"]),
                           ("sessions", ["device"]), ("sessions", ["credential"]), ("locks", ["ticket_id"])):
        db.table(table).create_index(columns, if_not_exists=True)
    # a ticket's locks go with it (release, prune): one statement per release
    db.execute("CREATE TRIGGER IF NOT EXISTS tickets_release_locks AFTER DELETE ON tickets BEGIN "
               "DELETE FROM locks WHERE ticket_id = old.ticket_id; END")


#: the tables of an admission's writes whose rows are found by their text key, kept WITHOUT ROWID: one B-tree each
#: instead of a table and the index of its key, so an admission and its release write fewer pages. Name -> (columns,
#: primary key). A principal's tickets sit together under its key: the snapshot reads them and a release deletes
#: one without an index by principal to keep
_KEYED_TABLES = {
    "tickets": ("ticket_id TEXT, sub TEXT, session_id TEXT, token_hash TEXT, client TEXT, tags TEXT, conflicts TEXT, "
                "exclusive INTEGER, expires FLOAT, iss TEXT NOT NULL DEFAULT ''", ("iss", "sub", "ticket_id")),
    "locks": ("key TEXT, ticket_id TEXT, mode TEXT, sub TEXT, session_id TEXT, kind TEXT, fence INTEGER, "
              "expires FLOAT, iss TEXT NOT NULL DEFAULT ''", ("key", "ticket_id")),
    "fences": ("key TEXT, value INTEGER", ("key",)),
}
#: indexes earlier versions kept that the keys above now serve
_DROPPED_INDEXES = ("idx_tickets_sub",)


def _keyed_table(db: sqlite_utils.Database, name: str, columns: str, key: tuple[str, ...]) -> None:
    """Create a keyed table, or upgrade one created by an earlier version (a rowid table, perhaps without the
    ``iss`` column, or one with another primary key) in place: its rows are copied into the new table (a missing
    ``iss`` is ""), and its indexes and triggers are created again on it (views naming it keep working)."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone()
    if row is not None and "WITHOUT ROWID" in row[0].upper() and _primary_key(db, name) == key:
        return
    definition = f"{columns}, PRIMARY KEY ({', '.join(key)})"
    if row is None:
        db.execute(f"CREATE TABLE {name} ({definition}) WITHOUT ROWID")
        return
    attached = [sql for (sql,) in db.execute("SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') "
                                             "AND tbl_name = ? AND sql IS NOT NULL", [name]).fetchall()]
    db.execute(f"CREATE TABLE {name}_upgrade ({definition}) WITHOUT ROWID")
    names = ", ".join(c for c in db.table(f"{name}_upgrade").columns_dict if c in db.table(name).columns_dict)
    db.execute(f"INSERT INTO {name}_upgrade ({names}) SELECT {names} FROM {name}")
    db.execute(f"DROP TABLE {name}")
    # the legacy rename leaves alone the views and triggers that name the table (they find the new one under the
    # same name); the checked rename would refuse them while the name is missing
    db.execute("PRAGMA legacy_alter_table = ON")
    try:
        db.execute(f"ALTER TABLE {name}_upgrade RENAME TO {name}")
    finally:
        db.execute("PRAGMA legacy_alter_table = OFF")
    for sql in attached:
        db.execute(sql)


def _primary_key(db: sqlite_utils.Database, name: str) -> tuple[str, ...]:
    """The columns of a table's primary key, in the key's order."""
    return tuple(column for _, column in sorted((row[5], row[1]) for row in db.execute(
        f"PRAGMA table_info({name})").fetchall() if row[5]))


#: a ticket's row: (issuer, subject, ticket id)
_TicketKey = tuple[str, str, str]


def _key(ticket: Ticket | Admission) -> _TicketKey:
    """The row of a ticket, or of the ticket an admission asks for."""
    return ticket.iss, ticket.sub, ticket.ticket_id


def _create_private(path: str) -> None:
    """Create the database file with mode 0600 whatever the umask (SQLite gives its -wal, -shm and journal files
    the mode of the database). An existing file keeps its mode."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return  # it exists, or e.g. its directory is missing: connecting reports that
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _warn_if_loose(path: str) -> None:
    """Log a warning naming the store's files that others may read or write."""
    loose = {path + suffix: mode for suffix in _FILES if (mode := _mode(path + suffix)) is not None and mode & 0o077}
    if loose:
        log.warning("sa-middleware: the SQLite store's files are readable or writable by others (%s); they hold "
                    "subjects, sessions, client addresses and the audit trail: chmod 600 them unless that is "
                    "deliberate", ", ".join(f"{name} {mode:04o}" for name, mode in loose.items()))


def _mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return None
def _add_issuer_to_principals(db: sqlite_utils.Database, columns: dict[str, type]) -> None:
    """Upgrade a database created before issuers: the principals table gets an ``iss`` column ("" for every row it
    holds) in its primary key. SQLite cannot change a primary key in place, so the table is copied."""
    names = [c for c in columns if c != "iss" and c in db.table("principals").columns_dict]
    db.table("principals_upgrade").create(columns, pk=("iss", "sub"), not_null={"iss", "generation"},
                                          defaults={"iss": "", "generation": 0})
    db.execute(f"INSERT INTO principals_upgrade (iss, {', '.join(names)}) SELECT '', {', '.join(names)} "
               "FROM principals")
    db.execute("DROP TABLE principals")
    db.execute("ALTER TABLE principals_upgrade RENAME TO principals")


# (the principal's rows as four index lookups ORed: "iss IN (?, '') AND sub IN (?, ?)" costs SQLite several times
# more, for the lists it builds)
_SNAPSHOT_SQL = (
    f"SELECT 0, iss, sub, {_PRINCIPAL_COLUMNS}, NULL, NULL, NULL FROM principals WHERE (iss = ? AND sub = ?) OR "
    f"(iss = '' AND sub = ?) OR (iss = ? AND sub = ?) OR (iss = '' AND sub = ?) UNION ALL SELECT 1, "
    f"{_SESSION_COLUMNS} FROM sessions WHERE ((iss = ? AND sub = ?) OR session_id = ?) AND expires > ? UNION ALL "
    f"SELECT 2, ticket_id, sub, session_id, token_hash, client, tags, conflicts, exclusive, expires, NULL, NULL, "
    f"NULL, NULL, NULL, NULL, NULL FROM tickets WHERE iss = ? AND sub = ? AND expires > ?")
_NULLS = ", NULL" * 8


def _snapshot_sql(keys: int) -> str:
    """The snapshot statement of an admission asking for ``keys`` locks: also the holders of those keys (rows
    tagged 3) and their fencing counters (tagged 4)."""
    if not keys:
        return _SNAPSHOT_SQL
    sql = _SNAPSHOT_SQLS.get(keys)
    if sql is None:
        marks = ",".join("?" * keys)
        sql = _SNAPSHOT_SQLS[keys] = (
            f"{_SNAPSHOT_SQL} UNION ALL SELECT 3, key, ticket_id, mode, sub, session_id, kind, expires, iss{_NULLS} "
            f"FROM locks WHERE key IN ({marks}) AND expires > ? UNION ALL SELECT 4, key, value, NULL, NULL, NULL, "
            f"NULL, NULL, NULL{_NULLS} FROM fences WHERE key IN ({marks})")
    return sql


_SNAPSHOT_SQLS: dict[int, str] = {}
_NO_TAGS: frozenset[str] = frozenset()


def _tags(text: str) -> frozenset[str]:
    return _NO_TAGS if text == "[]" else frozenset(json.loads(text))


def _risk(text: str | None) -> list[tuple[int, float]]:
    """A principal's risk entries as stored (JSON), as the rule reads them."""
    return [] if not text or text == "[]" else [tuple(x) for x in json.loads(text)]


def _tags_text(tags: frozenset[str]) -> str:
    return json.dumps(sorted(tags)) if tags else "[]"


def _adopt(conn: sqlite3.Connection, iss: str, *subs: str | None) -> None:
    """Give an issuer's principal the state its subject had before issuers were recorded (rows with ``iss`` ""),
    on its first use: a database written by one issuer keeps its generations, watermarks and markers."""
    if not iss:
        return
    for sub in {x for x in subs if x}:
        conn.execute(f"INSERT INTO principals (iss, sub, {_PRINCIPAL_COLUMNS}) SELECT ?, sub, {_PRINCIPAL_COLUMNS} "
                     "FROM principals WHERE iss = '' AND sub = ? ON CONFLICT(iss, sub) DO NOTHING", (iss, sub))


def _session(row: sqlite3.Row | tuple[Any, ...]) -> SessionInfo:
    return SessionInfo(*row)


def _admission_audit(a: Admission, v: Verdict, before: dict[str, tuple[str, str]]) -> list[AuditRecord]:
    """What one admission adds to the audit trail: its denial (or, when asked, the admission) and the sessions it
    paused or evicted. Shared by every SQL-backed store; the Redis store does the same in Lua."""
    records: list[AuditRecord] = []
    if v.code is not None and (a.audit_locked or v.code != "object_locked"):
        records.append(AuditRecord("denial", v.code, "middleware", a.sub, a.session_id, a.route, v.detail))
    elif v.ticket is not None and a.audit_admitted:
        locks = " ".join(f"{key}#{fence}" for key, fence in sorted(v.ticket.fencing_tokens.items()))
        records.append(AuditRecord("admission", "admitted", "middleware", a.sub, a.session_id, a.route,
                                   f"{a.kind}; ticket {a.ticket_id}" + (f"; locks {locks}" if locks else "")))
    for session_id, status in v.session_status.items():
        sub, was = before.get(session_id, (a.sub, None))
        if status == "paused" and was in (None, "active"):
            why = (f"paused by a lock conflict: {v.detail}" if session_id == a.session_id else
                   f"paused by a lock conflict with session {a.session_id} of {a.sub} on {a.route}")
            records.append(AuditRecord("change", "session_paused", "middleware", sub or a.sub, session_id, a.route,
                                       why))
        elif status == "revoked" and was not in (None, "revoked"):
            records.append(AuditRecord("change", "session_evicted", "middleware", sub or a.sub, session_id, a.route,
                                       f"evicted by session {a.session_id} (max_sessions={a.policy.max_sessions})"))
    return records


def _outcome(verdict: Verdict) -> Ticket | Denial:
    if verdict.ticket is not None:
        return verdict.ticket
    assert verdict.code is not None
    return Denial(verdict.code, verdict.detail, verdict.retry_after)


def _check_directory(path: str) -> None:
    """A database file in a directory that does not exist cannot be created: say so, naming the path."""
    if path == ":memory:" or path.startswith("file:"):
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigurationError(f"sqlite store {path!r}: the directory {directory!r} does not exist (create it, or "
                                 "give another path)")


class SQLiteStore(Store):
    """Store on a SQLite database file (``sqlite:///relative.db``, ``sqlite:////absolute/path.db``)."""

    def __init__(self, path: str, *, timeout: float = 2.0, clock: Callable[[], float] = time.time,
                 inline: bool = True) -> None:
        if not path:
            raise ConfigurationError("sqlite store needs a file path: sqlite:///sa.db")
        if timeout <= 0:
            raise ConfigurationError("sqlite timeout must be > 0 seconds")
        _check_directory(path)
        self.path = path
        self.timeout = timeout
        self._clock = clock
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._last_prune = 0.0
        self._audit_writes = 0
        # group commit: the writes of this process waiting for the next transaction, and who decides them
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)  # for the writers' state; a waiting writer waits on its own
        self._queue: deque[_Entry] = deque()
        self._leading = False  # a thread, or an event loop, is deciding a batch
        self._waiting = 0  # threads waiting for a write of theirs (or to truncate the WAL)
        self._alone = 0  # callers wanting, or holding, the lead alone (to truncate the WAL, to close)
        self._reading = 0  # reads in flight
        self._flush_loops: set[asyncio.AbstractEventLoop] = set()  # event loops with a flush scheduled
        self.inline = inline
        self._inline_commits = 0
        self._commits = 0
        self._checkpoint_due = threading.Event()
        self._maintenance: threading.Thread | None = None
        self._stop_maintenance = threading.Event()
        # commits the releases queued by threads that no write took within RELEASE_DELAY
        self._flusher = FlushThread(self._flush_releases, RELEASE_DELAY, "sa-middleware-sqlite-flush")
        afresh_after_fork(self, _forget_writes)
        _create_private(path)
        try:
            with self._transaction() as conn:
                _schema(sqlite_utils.Database(conn))
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(f"sqlite store {path!r}: its tables could not be created or upgraded: {exc}") from exc
        if path != ":memory:":
            _warn_if_loose(path)

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> SQLiteStore:
        parts = urlsplit(uri)
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if parts.netloc:
            raise ConfigurationError("sqlite URIs have no host: use sqlite:///relative.db or sqlite:////abs/path.db")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if "timeout" in query:
            try:
                options.setdefault("timeout", float(query["timeout"]))
            except ValueError:
                raise ConfigurationError("sqlite timeout must be a number of seconds") from None
        if "inline" in query:
            if query["inline"] not in ("true", "false"):
                raise ConfigurationError("sqlite inline must be true or false")
            options.setdefault("inline", query["inline"] == "true")
        return cls(path, **options)

    # -- connections -------------------------------------------------------------------------------------------

    def _connect(self, kind: str) -> sqlite3.Connection:
        """A connection of one kind: ``nowait`` (the event loop's: never waits, never checkpoints), ``writer`` (a
        thread's group commits: short busy waits, retried up to the timeout) or ``conn`` (reads, checkpoints)."""
        timeout = {"nowait": 0.0, "writer": _WRITER_BUSY_WAIT, "conn": self.timeout}[kind]
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False,
                               cached_statements=256)
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # a new file only: an existing one keeps its page size
        self._use_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        if kind == "nowait":
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the database to WAL once (the mode is persistent). Switching needs a moment alone with the file,
        which the busy handler does not wait for, so workers opening a new database together retry it."""
        deadline = time.monotonic() + self.timeout
        while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower()
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # another process holds the file; bounded by the store's timeout
                continue
            if mode != "wal":  # refused for good (an in-memory database): each connection would see its own
                raise ConfigurationError(f"sqlite store {self.path!r}: the database cannot use WAL mode (it stays "
                                         f"in {mode!r} mode); for a store in this process only, use memory://")

    def _connection(self, kind: str = "conn") -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, kind, None)
        if conn is None or getattr(self._local, f"{kind}_pid", None) != os.getpid():  # never reuse across a fork
            conn = self._connect(kind)
            setattr(self._local, kind, conn)
            setattr(self._local, f"{kind}_pid", os.getpid())
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction outside the group commit (the schema, when the store opens)."""
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite store busy: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _begin(self, nowait: bool) -> sqlite3.Connection:
        """``BEGIN IMMEDIATE`` on this thread's connection: at once or :class:`_Busy` (``nowait``), or retried in
        short busy waits until the store's timeout, then :class:`StoreUnavailable`."""
        conn = self._connection("nowait" if nowait else "writer")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return conn
            except sqlite3.OperationalError as exc:
                if nowait:
                    raise _Busy(f"sqlite store busy: {exc}") from exc
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise StoreUnavailable(f"sqlite store busy: {exc}") from exc

    # -- group commit ------------------------------------------------------------------------------------------
    # Every write of this process joins one queue. Whoever leads (a thread whose write is queued, or the event loop
    # when it flushes what its requests queued) takes the queue's head and decides it in one BEGIN IMMEDIATE ...
    # COMMIT, one entry after another (a failing entry is taken out and the others decided again without it): each
    # decision sees every earlier one, and nothing else of this process writes meanwhile. The other threads wait
    # for their entry (one of them takes over the lead when the leader stops); the event loop never waits.

    def _write(self, func: Callable[[sqlite3.Connection, float], T], prunes: bool = False) -> T:
        """Run ``func`` in the next group-commit transaction and wait for its commit (from a thread: the caller
        may lead, deciding the writes queued with its own)."""
        entry = _Entry(func, prunes=prunes)
        with self._cond:
            self._queue.append(entry)
            lead = not (self._leading or self._alone)
            if lead:
                self._leading = True
            else:
                self._waiting += 1
                entry.wake = threading.Condition(self._mutex)  # woken alone: when done, or to take the lead
                try:
                    while entry.state != _DONE:
                        entry.wake.wait()
                        if entry.state == _QUEUED and not (self._leading or self._alone):
                            self._leading = lead = True
                            break
                finally:
                    self._waiting -= 1
        if lead:
            self._lead(entry)
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[no-any-return]

    def _lead(self, own: _Entry | None) -> None:
        """Decide queued writes (blocking for the write lock) until ``own`` is done; then at most
        :data:`_LEAD_EXTRA` batches more, and none when another thread waits to take over."""
        rounds = 0
        try:
            while True:
                with self._cond:
                    done = own is None or own.state == _DONE
                    if not self._queue or (done and rounds >= _LEAD_EXTRA):
                        return
                    rounds += done
                    batch = self._take()
                if batch:
                    self._execute(batch, nowait=False)
        finally:
            with self._cond:
                self._hand_over()

    def _take(self, awaited: int = _BATCH) -> list[_Entry]:
        """The queue's head, in order: at most :data:`_BATCH` entries, of which at most ``awaited`` have a caller
        waiting (releases, which nobody waits for, ride along); abandoned ones are dropped. The condition is
        held."""
        batch: list[_Entry] = []
        queue = self._queue
        while queue and len(batch) < _BATCH:
            entry = queue[0]
            if entry.state == _QUEUED and not entry.unawaited:
                if awaited == 0:
                    break
                awaited -= 1
            queue.popleft()
            if entry.state == _QUEUED:
                entry.state = _RUNNING
                batch.append(entry)
        return batch

    def _hand_over(self, flush: bool = True) -> None:
        """Stop leading (the condition is held): a waiting thread takes over; writes queued by event loops are
        flushed by their loops (``flush=False``: a thread started for them does)."""
        self._leading = False
        if self._waiting:
            waiter = next((e.wake for e in self._queue if e.wake is not None and e.state == _QUEUED), None)
            if waiter is not None:
                waiter.notify()  # the first thread still waiting for its write takes the lead
            if self._alone:
                self._cond.notify_all()  # a truncation or close() waiting to lead alone
        if self._queue and any(e.unawaited and e.loop is None for e in self._queue):
            self._flusher.due()  # releases queued by threads, should no waiting thread take them
        if self._queue and flush:
            for loop in {e.loop for e in self._queue if e.loop is not None} - self._flush_loops:
                self._schedule_flush(loop, threadsafe=True)

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop, threadsafe: bool = False) -> None:
        self._flush_loops.add(loop)
        try:
            if threadsafe:
                loop.call_soon_threadsafe(self._flush_loop, loop)
            else:
                loop.call_soon(self._flush_loop, loop)
        except RuntimeError:  # the loop is closed: the next leader takes what it queued
            self._flush_loops.discard(loop)

    def _execute(self, batch: list[_Entry], nowait: bool, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Decide a batch in one transaction and hand out the results. ``nowait``: raise :class:`_Busy` (nothing
        done) when the write lock is taken. A write that fails is taken out of the batch: the transaction is rolled
        back and the others are decided again without it (no savepoint per write on the way)."""
        while batch:
            try:
                conn = self._begin(nowait)
            except _Busy:
                raise
            except StoreError as exc:
                self._finish(batch, exc, loop)
                return
            try:
                failed = self._decide(conn, batch, nowait)
                if failed is None:
                    conn.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                self._finish(batch, exc, loop)
                if not isinstance(exc, Exception):
                    raise
                return
            if failed is None:
                self._committed(nowait)
                self._finish(batch, None, loop)
                return
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            batch.remove(failed)  # in place: a caller giving the batch back sees what is left
            self._finish([failed], None, loop)

    def _decide(self, conn: sqlite3.Connection, batch: list[_Entry], nowait: bool) -> _Entry | None:
        """Run a batch's writes one after another; returns the first that failed (with its error), if any (an error
        that ends the transaction itself, or fails a batch of one, propagates)."""
        now = self._clock()
        if not nowait and now - self._last_prune > _PRUNE_EVERY and any(e.prunes for e in batch):
            self._prune(conn, now)
        if len(batch) == 1:
            batch[0].result = batch[0].func(conn, now)
            return None
        for entry in batch:
            try:
                entry.result = entry.func(conn, self._clock())
            except Exception as exc:
                if not conn.in_transaction:
                    raise
                entry.result, entry.error = None, _failure(exc)
                return entry
        return None

    def _finish(self, batch: list[_Entry], error: BaseException | None,
                loop: asyncio.AbstractEventLoop | None) -> None:
        """Mark a batch done (``error``: the whole transaction failed) and wake or settle its callers."""
        for entry in batch:
            if error is not None:
                entry.result, entry.error = None, _failure(error)
        with self._cond:
            for entry in batch:
                entry.state = _DONE
                if entry.wake is not None:
                    entry.wake.notify()
        for entry in batch:
            if entry.loop is None:
                if entry.unawaited and entry.error is not None:
                    log.warning("sa-middleware: release failed (%s); the lease will expire", entry.error)
                continue
            if entry.future is None:  # a release queued on the event loop: nobody waits for it
                if entry.error is not None:
                    log.warning("sa-middleware: release failed (%s); the lease will expire", entry.error)
            elif entry.loop is loop:
                self._settle(entry)
            else:
                with suppress(RuntimeError):  # the loop is closed: its callers are gone
                    entry.loop.call_soon_threadsafe(self._settle, entry)

    def _settle(self, entry: _Entry) -> None:
        """On the entry's loop: hand the result to the waiting admission; one whose caller is gone (cancelled)
        gives its ticket back."""
        future = entry.future
        assert future is not None and entry.loop is not None
        if future.cancelled():
            if entry.error is None and isinstance(entry.result, Verdict) and entry.result.ticket is not None:
                self._queue_release(_key(entry.result.ticket), entry.loop)
        elif entry.error is not None:
            future.set_exception(entry.error)
        else:
            future.set_result(entry.result)

    def _committed(self, nowait: bool) -> None:
        self._commits += 1
        if nowait:
            self._inline_commits += 1
            if self._inline_commits % _CHECKPOINT_EVERY == 0:
                self._request_checkpoint()
        if self._commits % _WAL_LOOK_EVERY == 0 and self.path != ":memory:":
            self._ensure_maintenance()
            if self.wal_size() > WAL_LIMIT:
                self._checkpoint_due.set()

    # -- on the event loop -------------------------------------------------------------------------------------

    def _inline_loop(self) -> asyncio.AbstractEventLoop | None:
        """The running asyncio loop, when writes are decided on it (else they go to worker threads)."""
        if not self.inline or self.inline_async:
            return None
        try:
            return asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio)
            return None

    def _queue_write(self, entry: _Entry) -> None:
        """Queue a write of the event loop: the loop decides it with the others queued by then, right after the
        callbacks already queued (or the thread leading takes it)."""
        assert entry.loop is not None
        with self._cond:
            self._queue.append(entry)
            if entry.loop not in self._flush_loops:
                self._schedule_flush(entry.loop)

    def _queue_release(self, key: _TicketKey, loop: asyncio.AbstractEventLoop) -> None:
        self._queue_write(_Entry(lambda conn, now: self._release(conn, key), loop, unawaited=True))

    def _flush_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Decide what is queued in one transaction on the loop, never waiting for the write lock: when another
        connection holds it, the admissions go to worker threads and the rest to a thread that waits."""
        with self._cond:
            self._flush_loops.discard(loop)
            if self._leading or self._alone or not self._queue:
                return  # the leader takes what is queued, or schedules this flush again when it stops
            self._leading = True
            batch = self._take(_LOOP_BATCH)
        flush = True
        try:
            self._execute(batch, nowait=True, loop=loop)
        except _Busy:
            flush = not self._busy(batch, loop)
        finally:
            with self._cond:
                self._hand_over(flush)

    def _busy(self, batch: list[_Entry], loop: asyncio.AbstractEventLoop) -> bool:
        """The write lock was taken: the loop's admissions retry in worker threads, the other writes go back to
        the queue's head, for a waiting thread or a thread started to wait for them (returns whether one was)."""
        back = [e for e in batch if e.future is None or e.loop is not loop]
        with self._cond:
            for entry in batch:
                entry.state = _QUEUED if entry in back else _DONE
            self._queue.extendleft(reversed(back))
            drain = bool(back) and not self._waiting
        for entry in batch:
            if entry.future is not None and entry.loop is loop and not entry.future.cancelled():
                entry.future.set_exception(_Busy("the write lock is taken"))
        if drain:
            loop.run_in_executor(None, self._drain)
        return drain

    def _drain(self) -> None:
        """In a worker thread: lead until the queue is empty (or a waiting thread takes over)."""
        with self._cond:
            if self._leading or self._alone:
                return
            self._leading = True
        try:
            self._lead(None)
        except Exception:
            log.exception("sa-middleware: queued writes failed")

    def _try_inline(self, func: Callable[[sqlite3.Connection, float], T]) -> tuple[bool, T | None]:
        """Outside asyncio (trio): run the write inline if nothing else of this process writes and the write lock
        is free, never waiting. Returns ``(False, None)`` when it must run in a worker thread instead."""
        if not self.inline or self.inline_async:
            return False, None
        entry = _Entry(func)
        with self._cond:
            if self._leading or self._alone:
                return False, None
            self._leading = True
            entry.state = _RUNNING
        try:
            self._execute([entry], nowait=True)
        except _Busy:
            return False, None
        finally:
            with self._cond:
                self._hand_over()
        if entry.error is not None:
            raise entry.error
        return True, entry.result

    # -- maintenance -------------------------------------------------------------------------------------------

    def _request_checkpoint(self) -> None:
        self._ensure_maintenance()
        self._checkpoint_due.set()

    def _ensure_maintenance(self) -> None:
        if self._maintenance is None or not self._maintenance.is_alive():
            self._stop_maintenance = threading.Event()  # close() sets it: the thread ends
            self._maintenance = threading.Thread(target=self._checkpoints, args=(self._stop_maintenance,),
                                                 name="sa-middleware-sqlite-checkpoint", daemon=True)
            self._maintenance.start()

    def _checkpoints(self, stop: threading.Event) -> None:
        """The maintenance thread (from the 64th commit on, until :meth:`close`): the inline connections'
        checkpoints (they never checkpoint themselves), a look at the WAL's size every second while commits
        come (past :data:`WAL_LIMIT`, it is truncated), and the sweep of expired rows when no admission in a
        thread ran it."""
        seen = -1
        while True:
            due = self._checkpoint_due.wait(_WAL_CHECK_EVERY)
            self._checkpoint_due.clear()
            if stop.is_set():
                return
            if not due and self._commits == seen:
                continue  # nothing written since the last look
            seen = self._commits
            with suppress(sqlite3.Error, StoreError):  # the next round, or an automatic checkpoint, catches up
                if due:
                    self._checkpoint_passive()
                if self.wal_size() > WAL_LIMIT:
                    self._truncate()
                if self._clock() - self._last_prune > 2 * _PRUNE_EVERY:
                    self._write(lambda conn, now: None, prunes=True)

    def _checkpoint_passive(self) -> None:
        """Copy the WAL into the database while writers go on, then copy the last frames with this process's
        writers held (a millisecond or two): the next write then starts the WAL again from its beginning, so under
        a steady flood it keeps its size instead of growing until it must be truncated."""
        def passive(conn: sqlite3.Connection, now: float) -> tuple[int, int]:
            _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return frames, copied

        commits = self._commits
        frames, copied = self._read(passive)
        if frames > copied or self._commits != commits:
            with self._lead_alone():
                self._read(passive)

    def _truncate(self) -> None:
        """Truncate the WAL while this process's writers wait (a checkpoint that must wait for the write lock
        would rarely get it under a flood); other processes' writers are waited for up to the timeout."""
        with self._lead_alone():
            self.checkpoint()

    @contextmanager
    def _lead_alone(self) -> Iterator[None]:
        """Take the lead next (before any waiting writer) and keep it: this process's writes wait meanwhile."""
        with self._cond:
            self._alone += 1  # nobody else takes the lead meanwhile
            self._waiting += 1  # the leader hands over at once
            try:
                while self._leading:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._leading = True
        try:
            yield
        finally:
            with self._cond:
                self._alone -= 1
                self._hand_over()

    def wal_size(self) -> int:
        """The size of the WAL file in bytes (0 when there is none)."""
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def checkpoint(self) -> None:
        """Write the WAL into the database and truncate it to zero bytes (``wal_checkpoint(TRUNCATE)``); waits up
        to the store's timeout for readers and writers (and for a checkpoint another connection runs), then raises
        :class:`~sa_middleware.errors.StoreUnavailable`. The maintenance thread runs it when the WAL is past
        :data:`WAL_LIMIT`; call it after a bulk change to give the space back at once."""
        deadline = time.monotonic() + max(self.timeout, 1.0)
        while True:
            busy = self._read(lambda conn, now: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
            if not busy:
                return
            if time.monotonic() >= deadline:
                raise StoreUnavailable("sqlite store busy: the WAL checkpoint could not complete")
            time.sleep(0.01)

    def close(self) -> None:
        if self._queue or self._leading:
            with suppress(StoreError):  # StoreUnavailable too: what is left ends with the lease
                self._write(lambda conn, now: None)
        self._stop_maintenance.set()
        self._checkpoint_due.set()
        self._flusher.stop()
        # no batch of this process runs on a connection while it closes, and no read (a lease keeper's, say)
        with self._lead_alone(), self._cond:
            while self._reading:
                self._cond.wait()
            with self._connections_lock:
                for conn in self._connections:
                    conn.close()
                self._connections.clear()
            self._local = threading.local()

    # -- admission ---------------------------------------------------------------------------------------------

    def admit(self, admission: Admission) -> Ticket | Denial:
        return _outcome(self._write(lambda conn, now: self._admit(conn, now, admission), prunes=True))

    async def aadmit(self, admission: Admission) -> Ticket | Denial:
        loop = self._inline_loop()
        if loop is not None:
            entry = _Entry(lambda conn, now: self._admit(conn, now, admission), loop, loop.create_future())
            self._queue_write(entry)
            try:
                return _outcome(await entry.future)  # type: ignore[misc]
            except _Busy:
                pass  # another connection holds the write lock: wait for it in a worker thread
            except BaseException:
                self._abandon(entry)
                raise
        else:
            done, verdict = self._try_inline(lambda conn, now: self._admit(conn, now, admission))
            if done and verdict is not None:
                return _outcome(verdict)
        return await self._admit_in_thread(admission)

    def _abandon(self, entry: _Entry) -> None:
        """The caller of a queued admission is gone (cancelled): it is never decided, or its ticket is given back."""
        with self._cond:
            if entry.state == _QUEUED:
                entry.state = _ABANDONED
                return
        future = entry.future
        assert future is not None and entry.loop is not None
        if future.done() and not future.cancelled() and future.exception() is None:
            verdict = future.result()
            if isinstance(verdict, Verdict) and verdict.ticket is not None:
                self._queue_release(_key(verdict.ticket), entry.loop)
        # otherwise the future was cancelled with the caller: _settle gives the ticket back once decided

    async def _admit_in_thread(self, admission: Admission) -> Ticket | Denial:
        # a cancelled caller never gets the ticket the worker may still commit: whoever comes second (the worker
        # finishing, or the cancelled caller) releases it
        state = {"finished": False, "abandoned": False}
        key = _key(admission)
        guard = threading.Lock()

        def work() -> Ticket | Denial:
            try:
                return self.admit(admission)
            finally:
                with guard:
                    state["finished"] = True
                    abandoned = state["abandoned"]
                if abandoned:
                    self._give_back(key)

        try:
            return await self._run(work)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled (or interrupted)
                with guard:
                    state["abandoned"] = True
                    finished = state["finished"]
                if finished:
                    threading.Thread(target=self._give_back, args=(key,), daemon=True,
                                     name="sa-middleware-sqlite-give-back").start()
            raise

    def _give_back(self, key: _TicketKey) -> None:
        with suppress(StoreError):  # StoreUnavailable too: what is left ends with the lease
            self._write(lambda conn, now: self._release(conn, key))

    def release_nowait(self, ticket: Ticket) -> bool:
        key = _key(ticket)
        # group commit: on the event loop a release joins the next transaction of this process (the next flush of
        # the loop, right after the callbacks already queued): other processes see it at most one event-loop
        # turn later, or once the thread leading commits it
        loop = self._inline_loop()
        if loop is not None:
            self._queue_release(key, loop)
            return True
        done, _ = self._try_inline(lambda conn, now: self._release(conn, key))
        return done

    def _admit(self, conn: sqlite3.Connection, now: float, a: Admission) -> Verdict:
        snapshot = self._snapshot(conn, now, a)
        verdict = evaluate(a, snapshot)
        before = self._statuses(conn, verdict) if verdict.session_status else {}
        self._apply(conn, now, a, verdict, next((x for x in snapshot.sessions if x.session_id == a.session_id), None))
        self._add_audit(conn, now, _admission_audit(a, verdict, before))
        return verdict

    @staticmethod
    def _statuses(conn: sqlite3.Connection, v: Verdict) -> dict[str, tuple[str, str]]:
        """The stored (sub, status) of the sessions a verdict changes: the audit records what actually changed."""
        ids = list(v.session_status)
        marks = ",".join("?" * len(ids))
        return {r[0]: (r[1], r[2]) for r in conn.execute(
            f"SELECT session_id, sub, status FROM sessions WHERE session_id IN ({marks})", ids)}

    # -- the audit trail -----------------------------------------------------------------------------------------

    def _add_audit(self, conn: sqlite3.Connection, now: float, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        conn.executemany(f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         [(now if r.time is None else r.time, r.kind, r.code, r.source, r.sub, r.session_id, r.route,
                           r.detail[:_AUDIT_DETAIL]) for r in records])
        self._audit_writes += len(records)
        if self._audit_writes >= _AUDIT_PRUNE_EVERY:
            self._audit_writes = 0
            self._prune_audit(conn, now, _AUDIT_PRUNE_BATCH)

    def _prune_audit(self, conn: sqlite3.Connection, now: float, batch: int | None = None) -> None:
        """Delete the records past the retention (age or count). ``batch``: look at that many of the oldest only,
        so a prune on the admission path costs a bounded amount of work; the periodic sweep deletes them all."""
        top = conn.execute("SELECT max(id) FROM audit").fetchone()[0]
        if top is None:
            return
        floor, cutoff = top - self.audit_max_records, now - self.audit_retention
        if batch is None:
            conn.execute("DELETE FROM audit WHERE id <= ? OR time < ?", (floor, cutoff))
        else:
            conn.execute("DELETE FROM audit WHERE id IN (SELECT id FROM (SELECT id, time FROM audit ORDER BY id "
                         "LIMIT ?) WHERE id <= ? OR time < ?)", (batch, floor, cutoff))

    def record_audit(self, records: Sequence[AuditRecord]) -> None:
        if records:
            self._write(lambda conn, now: self._add_audit(conn, now, records))

    def audit(self, *, sub: str | None = None, session_id: str | None = None, code: str | None = None,
              kind: str | None = None, since: float | None = None, until: float | None = None,
              limit: int = 100) -> list[AuditRecord]:
        def run(conn: sqlite3.Connection, now: float) -> list[AuditRecord]:
            top = conn.execute("SELECT max(id) FROM audit").fetchone()[0] or 0
            where = ["id > ?", "time >= ?"]
            params: list[Any] = [top - self.audit_max_records,
                                 max(now - self.audit_retention, -math.inf if since is None else since)]
            for column, value in (("sub", sub), ("session_id", session_id), ("code", code), ("kind", kind)):
                if value is not None:
                    where.append(f"{column} = ?")
                    params.append(value)
            if until is not None:
                where.append("time <= ?")
                params.append(until)
            rows = conn.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(where)} "
                                "ORDER BY time DESC, id DESC LIMIT ?", (*params, limit)).fetchall()
            return [AuditRecord(r[1], r[2], r[3], r[4], r[5], r[6], r[7] or "", r[0]) for r in rows]
        return self._read(run)

    def _snapshot(self, conn: sqlite3.Connection, now: float, a: Admission) -> Snapshot:
        # one statement reads the principal (and its actor) under the token's issuer and without one (the state to
        # adopt on first use), its live sessions and its tickets in flight: rows tagged 0, 1 and 2
        # (and, for an admission asking for locks, the holders of its keys and their fencing counters: 3 and 4)
        other = a.actor or a.sub
        params: tuple[Any, ...] = (a.iss, a.sub, a.sub, a.iss, other, other, a.iss, a.sub, a.session_id, now, a.iss,
                                   a.sub, now)
        keys = [lock.key for lock in a.locks]
        if keys:
            params = (*params, *keys, now, *keys)
        rows = conn.execute(_snapshot_sql(len(keys)), params).fetchall()
        found: dict[tuple[str, str], tuple[Any, ...]] = {}
        sessions: list[SessionInfo] = []
        tickets: list[TicketRecord] = []
        holders: dict[str, list[LockHolder]] = {}
        fences: dict[str, int] = {}
        for r in rows:
            tag = r[0]
            if tag == 1:
                sessions.append(SessionInfo(*r[1:]))
            elif tag == 2:
                tickets.append(TicketRecord(r[1], r[2], r[3], r[4], r[5], _tags(r[6]), _tags(r[7]), bool(r[8]),
                                            r[9]))
            elif tag == 0:
                found[(r[1], r[2])] = r[3:14]
            elif tag == 3:
                holders.setdefault(r[1], []).append(LockHolder(*r[2:9]))
            else:
                fences[r[1]] = r[2]
        if a.iss and (("", a.sub) in found or ("", a.actor) in found):  # a row stored before issuers was read
            # the first use under this issuer of a subject (or actor) stored without one
            adopted = [x for x in (a.sub, a.actor) if x and (a.iss, x) not in found and ("", x) in found]
            if adopted:
                _adopt(conn, a.iss, *adopted)
                for x in adopted:
                    found[(a.iss, x)] = found[("", x)]
        principal, markers = PrincipalState(), []
        mine, actor = found.get((a.iss, a.sub)), found.get((a.iss, a.actor)) if a.actor else None
        if mine is not None:
            principal = PrincipalState(mine[0], mine[1], _risk(mine[2]),
                                       frozenset(json.loads(mine[3])) if mine[3] is not None else None, mine[4],
                                       *mine[7:11])
            if mine[5] is not None:
                markers.append(Marker(mine[5], mine[6]))
        if actor is not None and actor[5] is not None:
            markers.append(Marker(actor[5], None))
        device_compliant = None
        if a.device is not None:
            row = conn.execute("SELECT compliant FROM devices WHERE device_id = ?", (a.device,)).fetchone()
            device_compliant = None if row is None else bool(row[0])
        jti_seen = a.policy.one_time and conn.execute(
            "SELECT 1 FROM jtis WHERE jti = ? AND expires > ?", (a.jti, now)).fetchone() is not None
        if a.credential is not None or a.device is not None:
            markers.extend(Marker(r[0]) for r in conn.execute(
                "SELECT at FROM markers WHERE (kind = 'credential' AND value = ?) OR (kind = 'device' AND value = ?)",
                (a.credential, a.device)))
        return Snapshot(now, principal, sessions, tickets, holders, fences, device_compliant, jti_seen, markers)

    def _apply(self, conn: sqlite3.Connection, now: float, a: Admission, v: Verdict,
               stored: SessionInfo | None = None) -> None:
        if v.new_generation is not None or v.risk is not None:
            conn.execute("INSERT INTO principals (iss, sub, generation, risk) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(iss, sub) DO UPDATE SET generation = max(generation, excluded.generation), "
                         "risk = coalesce(?, risk)",
                         (a.iss, a.sub, v.new_generation or 0, json.dumps(v.risk or []),
                          None if v.risk is None else json.dumps(v.risk)))
        s = v.session
        if s is not None and seen_again(s, stored, a.session_idle):
            pass  # the same session seen again within SEEN_PRECISION, nothing else changed: left as stored
        elif s is not None and stored is not None and (s.sub, s.iss, s.actor, s.device, s.credential) == (
                stored.sub, stored.iss, stored.actor, stored.device, stored.credential):
            # the same session seen again: its indexed columns stay as they are
            conn.execute("UPDATE sessions SET kind = ?, status = ?, created = ?, last_seen = ?, expires = ?, "
                         "client = ?, user_agent = ?, marked_at = ?, marked_generation = ?, cleared_at = ? "
                         "WHERE session_id = ?",
                         (s.kind, s.status, s.created, s.last_seen, s.expires, s.client, s.user_agent, s.marked_at,
                          s.marked_generation, s.cleared_at, s.session_id))
        elif s is not None:
            conn.execute(f"INSERT OR REPLACE INTO sessions ({_SESSION_COLUMNS}) VALUES "
                         f"({','.join('?' * 16)})",
                         (s.session_id, s.sub, s.kind, s.status, s.created, s.last_seen, s.expires, s.client,
                          s.user_agent, s.device, s.credential, s.actor, s.marked_at, s.marked_generation,
                          s.cleared_at, s.iss))
        for session_id, status in v.session_status.items():
            if v.session is not None and session_id == v.session.session_id:
                continue
            # pausing never overrides revoked or compromised; the status is remembered past the token's expiry
            conn.execute("UPDATE sessions SET status = ?, expires = max(expires, ?) "
                         "WHERE session_id = ? AND status IN (SELECT value FROM json_each(?))",
                         (status, now + STATUS_RETENTION, session_id, _FROM_STATES[status]))
        if v.ticket_record is not None:
            t = v.ticket_record
            conn.execute("INSERT INTO tickets (ticket_id, sub, session_id, token_hash, client, tags, conflicts, "
                         "exclusive, expires, iss) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (t.ticket_id, t.sub, t.session_id, t.token_hash, t.client, _tags_text(t.tags),
                          _tags_text(t.conflicts), int(t.exclusive), t.expires, a.iss))
            for key, mode, fence in v.lock_grants:
                conn.execute("INSERT INTO locks (key, ticket_id, mode, sub, session_id, kind, fence, expires, iss) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (key, t.ticket_id, mode, a.sub, a.session_id, a.kind, fence, t.expires, a.iss))
                conn.execute("INSERT INTO fences (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                             "SET value = excluded.value", (key, fence))
        if v.record_jti:
            conn.execute("INSERT OR REPLACE INTO jtis VALUES (?, ?)", (a.jti, a.token_exp))

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        self._last_prune = now
        for table in ("tickets", "locks", "sessions", "jtis", "events_seen"):
            conn.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,))
        # fencing counters of keys without a live lock that lag the clock: rules.next_fence restarts above them
        conn.execute("DELETE FROM fences WHERE value < ? AND key NOT IN (SELECT key FROM locks)",
                     (math.floor((now - FENCE_SLACK) * 1_000_000),))
        self._prune_audit(conn, now)

    def release(self, ticket: Ticket) -> None:
        key = _key(ticket)
        # group commit: the release joins the next write of this process (which decides it first), or the flush
        # thread commits it RELEASE_DELAY later: other processes see it within about that delay
        entry = _Entry(lambda conn, now: self._release(conn, key), unawaited=True)
        with self._cond:
            self._queue.append(entry)
            if not self._leading:  # else the leader decides it, or wakes the flush thread when it stops
                self._flusher.due()

    def _flush_releases(self) -> None:
        """In the flush thread: commit what threads queued, unless a leader takes it."""
        with self._cond:
            if self._leading or self._alone or not self._queue:
                return
            self._leading = True
        self._lead(None)

    @staticmethod
    def _release(conn: sqlite3.Connection, key: _TicketKey) -> None:
        if not conn.execute("DELETE FROM tickets WHERE iss = ? AND sub = ? AND ticket_id = ?", key).rowcount:
            conn.execute("DELETE FROM locks WHERE ticket_id = ?", (key[2],))  # the trigger deletes the others

    def renew(self, tickets: Sequence[Ticket], lease: float) -> None:
        if not tickets:
            return
        ticket_ids = [t.ticket_id for t in tickets]
        marks = ",".join("?" * len(ticket_ids))

        def run(conn: sqlite3.Connection, now: float) -> None:
            conn.executemany("UPDATE tickets SET expires = ? WHERE iss = ? AND sub = ? AND ticket_id = ? AND "
                             "expires > ?", [(now + lease, *_key(t), now) for t in tickets])
            conn.execute(f"UPDATE locks SET expires = ? WHERE ticket_id IN ({marks}) AND expires > ?",
                         (now + lease, *ticket_ids, now))
        self._write(run)

    # -- operations --------------------------------------------------------------------------------------------

    def rotate(self, sub: str, iss: str = "") -> int:
        def run(conn: sqlite3.Connection, now: float) -> int:
            _adopt(conn, iss, sub)
            row = conn.execute("INSERT INTO principals (iss, sub, generation) VALUES (?, ?, 1) ON CONFLICT(iss, sub) "
                               "DO UPDATE SET generation = generation + 1 RETURNING generation", (iss, sub)).fetchone()
            return int(row[0])
        return self._write(run)

    def revoke_principal(self, sub: str, iss: str = "") -> float:
        def run(conn: sqlite3.Connection, now: float) -> float:
            _adopt(conn, iss, sub)
            conn.execute("INSERT INTO principals (iss, sub, not_before) VALUES (?, ?, ?) ON CONFLICT(iss, sub) DO "
                         "UPDATE SET not_before = max(coalesce(not_before, 0), excluded.not_before)", (iss, sub, now))
            return now
        return self._write(run)

    def revoke_session(self, session_id: str) -> bool:
        def run(conn: sqlite3.Connection, now: float) -> bool:
            if conn.execute("UPDATE sessions SET status = 'revoked', expires = max(expires, ?) WHERE session_id = ?",
                            (now + STATUS_RETENTION, session_id)).rowcount:
                return True
            conn.execute(f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, '', '', 'revoked', ?, ?, ?, '', '', "
                         "NULL, NULL, NULL, NULL, NULL, NULL, '')", (session_id, now, now, now + STATUS_RETENTION))
            return False
        return self._write(run)

    def report_compromise(self, sub: str | None, session_id: str | None, iss: str = "") -> list[str]:
        if sub is None and session_id is None:
            raise ConfigurationError("report_compromise needs sub or session_id")

        def run(conn: sqlite3.Connection, now: float) -> list[str]:
            principal, issuer = sub, iss
            if session_id is not None:
                row = conn.execute("SELECT sub, credential, device, iss FROM sessions WHERE session_id = ? "
                                   "AND sub != ''", (session_id,)).fetchone()
                if row is None and principal is None:
                    return []
                if row is not None:
                    if principal is None:
                        principal, issuer = row[0], row[3]
                    origins = [(row[1], row[2])]
            assert principal is not None
            if session_id is None or row is None:
                origins = conn.execute("SELECT credential, device FROM sessions WHERE iss = ? AND sub = ? "
                                       "AND expires > ?", (issuer, principal, now)).fetchall()
            credentials = sorted({c for c, _ in origins if c})
            devices = sorted({d for _, d in origins if d})
            _adopt(conn, issuer, principal)
            conn.execute("INSERT INTO principals (iss, sub, generation, marker_at, marker_generation) "
                         "VALUES (?, ?, 0, ?, 0) ON CONFLICT(iss, sub) DO UPDATE SET marker_at = excluded.marker_at, "
                         "marker_generation = generation", (issuer, principal, now))
            for kind, values in (("credential", credentials), ("device", devices)):
                for value in values:
                    conn.execute("INSERT OR REPLACE INTO markers VALUES (?, ?, ?)", (kind, value, now))
            where = ["(iss = ? AND sub = ?)", "(iss = ? AND actor = ?)"]
            params: list[Any] = [issuer, principal, issuer, principal]
            for column, values in (("credential", credentials), ("device", devices)):
                if values:
                    where.append(f"{column} IN ({','.join('?' * len(values))})")
                    params.extend(values)
            rows = conn.execute(
                f"UPDATE sessions SET status = 'compromised', marked_at = ?, expires = max(expires, ?), "
                f"marked_generation = (SELECT generation FROM principals p WHERE p.iss = sessions.iss "
                f"AND p.sub = sessions.sub) "
                f"WHERE expires > ? AND status != 'revoked' AND ({' OR '.join(where)}) RETURNING session_id",
                (now, now + STATUS_RETENTION, now, *params)).fetchall()
            return sorted(r[0] for r in rows)
        return self._write(run)

    def pause_session(self, session_id: str) -> bool:
        return self._write(lambda conn, now: conn.execute(
            "UPDATE sessions SET status = 'paused', expires = max(expires, ?) WHERE session_id = ? "
            "AND status IN ('active', 'paused')", (now + STATUS_RETENTION, session_id)).rowcount > 0)

    def resume_session(self, session_id: str) -> bool:
        return self._write(lambda conn, now: conn.execute(
            "UPDATE sessions SET status = 'active', cleared_at = ?, marked_at = NULL, marked_generation = NULL "
            "WHERE session_id = ? AND status IN ('paused', 'compromised')", (now, session_id)).rowcount > 0)

    def set_device_status(self, device_id: str, compliant: bool) -> None:
        self._write(lambda conn, now: conn.execute(
            "INSERT OR REPLACE INTO devices VALUES (?, ?, ?)", (device_id, int(compliant), now)))

    def set_privileges(self, sub: str, scopes: Iterable[str] | None, iss: str = "") -> None:
        value = None if scopes is None else json.dumps(sorted(set(scopes)))

        def run(conn: sqlite3.Connection, now: float) -> None:
            _adopt(conn, iss, sub)
            conn.execute("INSERT INTO principals (iss, sub, generation, privileges, privileges_at) "
                         "VALUES (?, ?, 0, ?, ?) ON CONFLICT(iss, sub) DO UPDATE SET "
                         "privileges = excluded.privileges, privileges_at = excluded.privileges_at",
                         (iss, sub, value, now))
        self._write(run)

    # -- operations of security events -------------------------------------------------------------------------

    def revoke_sessions(self, sub: str, before: float | None, iss: str = "") -> list[str]:
        def run(conn: sqlite3.Connection, now: float) -> list[str]:
            cut = now if before is None else min(before, now)
            _adopt(conn, iss, sub)
            conn.execute("INSERT INTO principals (iss, sub, generation, sessions_before) VALUES (?, ?, 0, ?) "
                         "ON CONFLICT(iss, sub) DO UPDATE SET sessions_before = "
                         "max(coalesce(sessions_before, excluded.sessions_before), excluded.sessions_before)",
                         (iss, sub, cut))
            rows = conn.execute("UPDATE sessions SET status = 'revoked', expires = max(expires, ?) WHERE iss = ? "
                                "AND sub = ? AND created <= ? AND expires > ? AND status != 'revoked' "
                                "RETURNING session_id", (now + STATUS_RETENTION, iss, sub, cut, now)).fetchall()
            return sorted(r[0] for r in rows)
        return self._write(run)

    def disable_principal(self, sub: str, iss: str = "") -> float:
        def run(conn: sqlite3.Connection, now: float) -> float:
            _adopt(conn, iss, sub)
            conn.execute("INSERT INTO principals (iss, sub, generation, not_before, disabled_at) "
                         "VALUES (?, ?, 0, ?, ?) ON CONFLICT(iss, sub) DO UPDATE SET "
                         "disabled_at = coalesce(disabled_at, excluded.disabled_at), "
                         "not_before = max(coalesce(not_before, 0), excluded.not_before)", (iss, sub, now, now))
            return now
        return self._write(run)

    def enable_principal(self, sub: str, iss: str = "") -> bool:
        def run(conn: sqlite3.Connection, now: float) -> bool:
            _adopt(conn, iss, sub)
            return conn.execute("UPDATE principals SET disabled_at = NULL WHERE iss = ? AND sub = ? "
                                "AND disabled_at IS NOT NULL", (iss, sub)).rowcount > 0
        return self._write(run)

    def set_assurance(self, sub: str, level: str | None, at: float | None, iss: str = "") -> None:
        def run(conn: sqlite3.Connection, now: float) -> None:
            when = None if level is None else (now if at is None else min(at, now))
            _adopt(conn, iss, sub)
            conn.execute("INSERT INTO principals (iss, sub, generation, assurance, assurance_at) "
                         "VALUES (?, ?, 0, ?, ?) ON CONFLICT(iss, sub) DO UPDATE SET "
                         "assurance = excluded.assurance, assurance_at = excluded.assurance_at",
                         (iss, sub, level, when))
        self._write(run)

    def raise_risk(self, sub: str, amount: int, window: float, iss: str = "") -> None:
        def run(conn: sqlite3.Connection, now: float) -> None:
            _adopt(conn, iss, sub)
            row = conn.execute("SELECT risk FROM principals WHERE iss = ? AND sub = ?", (iss, sub)).fetchone()
            entries = live_risk([(x[0], x[1]) for x in json.loads(row[0] or "[]")] if row else [], now)
            risk = json.dumps([*entries, (amount, now + window)])
            conn.execute("INSERT INTO principals (iss, sub, generation, risk) VALUES (?, ?, 0, ?) "
                         "ON CONFLICT(iss, sub) DO UPDATE SET risk = excluded.risk", (iss, sub, risk))
        self._write(run)

    def seen_event(self, key: str, ttl: float) -> bool:
        return self._write(lambda conn, now: conn.execute(
            "INSERT INTO events_seen (key, expires) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
            "SET expires = excluded.expires WHERE events_seen.expires <= ?", (key, now + ttl, now)).rowcount == 0)

    def forget_event(self, key: str) -> None:
        self._write(lambda conn, now: conn.execute("DELETE FROM events_seen WHERE key = ?", (key,)))

    # the key notes: the row with kid '' holds the generation; every other row is a dropped key id
    def note_keys(self, drop: str | None) -> int:
        def run(conn: sqlite3.Connection, now: float) -> int:
            row = conn.execute("INSERT INTO key_notes (kid, generation, at) VALUES ('', 1, ?) ON CONFLICT(kid) DO "
                               "UPDATE SET generation = generation + 1, at = excluded.at RETURNING generation",
                               (now,)).fetchone()
            if drop is not None:
                conn.execute("INSERT OR IGNORE INTO key_notes (kid, generation, at) VALUES (?, ?, ?)",
                             (drop, row[0], now))
            return int(row[0])
        return self._write(run)

    def key_notes(self) -> tuple[int, tuple[str, ...]]:
        def run(conn: sqlite3.Connection, now: float) -> tuple[int, tuple[str, ...]]:
            rows = conn.execute("SELECT kid, generation FROM key_notes ORDER BY kid").fetchall()
            return (next((int(g) for k, g in rows if k == ""), 0), tuple(k for k, _ in rows if k != ""))
        return self._read(run)

    def note_generation_claims(self, notes: Mapping[tuple[str, str], bool]) -> None:
        def run(conn: sqlite3.Connection, now: float) -> None:
            for (iss, sub), present in notes.items():
                _adopt(conn, iss, sub)  # a note never stands in for the state the principal inherits
                conn.execute("INSERT INTO principals (iss, sub, generation, gen_claim) VALUES (?, ?, 0, ?) "
                             "ON CONFLICT(iss, sub) DO UPDATE SET gen_claim = excluded.gen_claim",
                             (iss, sub, int(present)))
        self._write(run)

    def generation_claim(self, sub: str, iss: str = "") -> bool | None:
        row = self._read(lambda conn, now: conn.execute("SELECT gen_claim FROM principals WHERE iss = ? AND sub = ?",
                                                        (iss, sub)).fetchone())
        return None if row is None or row[0] is None else bool(row[0])

    def reset_generation(self, sub: str, iss: str = "") -> int:
        def run(conn: sqlite3.Connection, now: float) -> int:
            _adopt(conn, iss, sub)
            row = conn.execute("SELECT generation FROM principals WHERE iss = ? AND sub = ?", (iss, sub)).fetchone()
            conn.execute("UPDATE principals SET generation = 0 WHERE iss = ? AND sub = ?", (iss, sub))
            return 0 if row is None else int(row[0])
        return self._write(run)

    def _read(self, func: Callable[[sqlite3.Connection, float], T]) -> T:
        with self._cond:
            self._reading += 1  # close() waits for the reads in flight
        try:
            return func(self._connection(), self._clock())
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite store error: {exc}") from exc
        finally:
            with self._cond:
                self._reading -= 1
                if not self._reading:
                    self._cond.notify_all()

    def sessions(self, sub: str, session_idle: float, iss: str = "") -> list[SessionInfo]:
        return self._read(lambda conn, now: [_session(r) for r in conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE iss = ? AND sub = ? AND expires > ? AND last_seen > ? "
            "ORDER BY created, session_id", (iss, sub, now, now - session_idle))])

    def issuers(self, sub: str) -> list[str]:
        return self._read(lambda conn, now: [r[0] for r in conn.execute(
            "SELECT iss FROM principals WHERE sub = ? UNION SELECT iss FROM sessions WHERE sub = ? AND expires > ? "
            "ORDER BY 1", (sub, sub, now))])

    def all_sessions(self, session_idle: float, limit: int) -> list[SessionInfo]:
        return self._read(lambda conn, now: [_session(r) for r in conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE sub != '' AND expires > ? AND last_seen > ? "
            "ORDER BY last_seen DESC, session_id LIMIT ?", (now, now - session_idle, limit))])

    def session_owner(self, session_id: str) -> str | None:
        row = self._read(lambda conn, now: conn.execute(
            "SELECT sub FROM sessions WHERE session_id = ? AND sub != ''", (session_id,)).fetchone())
        return None if row is None else str(row[0])

    def locks(self) -> list[LockInfo]:
        if self._queue or self._leading:
            self._write(lambda conn, now: None)  # the releases queued on the event loop, and the batch in flight
        return self._read(lambda conn, now: [LockInfo(*r) for r in conn.execute(
            "SELECT key, mode, fence, ticket_id, sub, session_id, expires, iss FROM locks WHERE expires > ? "
            "ORDER BY key, fence", (now,))])
