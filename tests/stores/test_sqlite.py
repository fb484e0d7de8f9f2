"""SQLite-specific behaviour: the inline-first async path and its fallback to a worker thread."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from support import admission_of

from sa_middleware.denials import Denial
from sa_middleware.errors import ConfigurationError, StoreError
from sa_middleware.records import Admission, LockRequest, Ticket
from sa_middleware.stores.sqlite import SQLiteStore


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def admission(**overrides: Any) -> Admission:
    now = time.time()
    values: dict[str, Any] = dict(
        ticket_id=uuid.uuid4().hex, sub="alice", kind="human", session_id="alice-1", token_hash="h",
        token_exp=now + 3600, token_iat=now - 60, token_gen=None, jti=None, actor=None, credential=None,
        device=None, client="127.0.0.1", user_agent="ua", route="PUT /objects/{id}",
        locks=(LockRequest("object:1"),))
    values.update(overrides)
    return admission_of(**values)


def test_a_session_seen_again_within_a_second_is_not_written_again(tmp_path: Path) -> None:
    clock = [1_700_000_000.0]
    store = SQLiteStore(str(tmp_path / "sa.db"), clock=lambda: clock[0])
    plain = {"locks": (), "token_exp": clock[0] + 3600, "token_iat": clock[0] - 60}
    try:
        store.release(store.admit(admission(**plain)))
        seen: list[str] = []
        for conn in store._connections:
            conn.set_trace_callback(seen.append)
        connect = store._connect

        def traced(kind: str) -> sqlite3.Connection:  # a thread that leads later (the flush thread) opens its own
            conn = connect(kind)
            conn.set_trace_callback(seen.append)
            return conn
        store._connect = traced  # type: ignore[method-assign]
        for step, user_agent in ((0.5, "ua"), (0.4, "changed"), (0.2, "changed"), (1.0, "changed")):
            clock[0] += step
            seen.clear()
            store.release(store.admit(admission(**plain, user_agent=user_agent)))
            writes = [x for x in seen if x.startswith("UPDATE sessions")]
            (session,) = store.sessions("alice", 900)
            if (step, user_agent) in ((0.5, "ua"), (0.2, "changed")):  # nothing new within the second
                assert writes == [] and session.last_seen < clock[0]
            else:
                assert len(writes) == 1 and session.last_seen == clock[0] and session.user_agent == user_agent
    finally:
        store.close()


@pytest.mark.anyio
async def test_free_database_is_decided_inline_without_a_thread(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(str(tmp_path / "sa.db"))

    async def no_threads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a worker thread was used while the write lock was free")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)
    try:
        ticket = await store.aadmit(admission())
        assert isinstance(ticket, Ticket)
        assert isinstance(await store.aadmit(admission()), Denial)  # the lock is held
        await store.arelease(ticket)
        assert isinstance(await store.aadmit(admission()), Ticket)
    finally:
        store.close()


@pytest.mark.anyio
async def test_locked_database_waits_in_a_thread_and_never_blocks_the_loop(tmp_path: Path) -> None:
    db = tmp_path / "sa.db"
    store = SQLiteStore(str(db), timeout=30.0)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    results: list[Ticket | Denial] = []
    try:
        async with anyio.create_task_group() as tg:
            async def admit() -> None:
                results.append(await store.aadmit(admission()))
            tg.start_soon(admit)
            for _ in range(20):  # the loop keeps running while the admission waits for the lock
                await anyio.sleep(0.001)
            assert results == [], "the admission finished although the write lock was held"
            blocker.execute("COMMIT")
        assert len(results) == 1 and isinstance(results[0], Ticket)
    finally:
        blocker.close()
        store.close()


@pytest.mark.anyio
async def test_a_burst_on_the_event_loop_is_decided_in_bounded_flushes(tmp_path: Path) -> None:
    # a flush decides at most _LOOP_BATCH writes, then lets the loop run the callbacks queued meanwhile (here a
    # probe queued while the first flush runs) before the next flush takes the rest
    import asyncio

    from sa_middleware.stores import sqlite as sqlite_store

    store = SQLiteStore(str(tmp_path / "sa.db"))
    decided: list[str] = []
    probe: list[int] = []
    admit = store._admit

    def recording(conn: sqlite3.Connection, now: float, a: Admission) -> Any:
        if not decided:
            asyncio.get_running_loop().call_soon(lambda: probe.append(len(decided)))
        decided.append(a.ticket_id)
        return admit(conn, now, a)

    store._admit = recording  # type: ignore[method-assign]
    burst = 2 * sqlite_store._LOOP_BATCH + 3
    try:
        outcomes = await asyncio.gather(*(store.aadmit(admission(sub=f"u{i}", session_id=f"u{i}-1", locks=()))
                                          for i in range(burst)))
        assert all(isinstance(o, Ticket) for o in outcomes)
        assert len(decided) == burst
        assert probe == [sqlite_store._LOOP_BATCH]
    finally:
        store.close()


def test_releases_queued_as_the_event_loop_ends_are_committed_before_it_closes(tmp_path: Path) -> None:
    # many requests end together as a server shuts down: their releases are committed while the loop still runs,
    # not left queued (holding their locks for other processes) until this process writes again
    import asyncio

    from sa_middleware.stores import sqlite as sqlite_store

    path = tmp_path / "sa.db"
    store = SQLiteStore(str(path))
    count = 20 * sqlite_store._LOOP_BATCH

    async def main() -> None:
        tickets = await asyncio.gather(*(store.aadmit(admission(sub=f"u{i}", session_id=f"u{i}-1",
                                                                locks=(LockRequest(f"obj:{i}"),)))
                                         for i in range(count)))
        for ticket in tickets:
            assert isinstance(ticket, Ticket)
            assert store.release_nowait(ticket)

    try:
        asyncio.run(main())
        check = sqlite3.connect(path)
        try:
            assert check.execute("SELECT count(*) FROM tickets").fetchone() == (0,)
            assert check.execute("SELECT count(*) FROM locks").fetchone() == (0,)
        finally:
            check.close()
    finally:
        store.close()


@pytest.mark.anyio
async def test_inline_off_uses_worker_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(str(tmp_path / "sa.db"), inline=False)
    calls: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(func, "__name__", "call"))
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    try:
        ticket = await store.aadmit(admission())
        assert isinstance(ticket, Ticket)
        await store.arelease(ticket)
        assert len(calls) == 2
    finally:
        store.close()


def test_many_inline_commits_with_checkpoints_leave_a_sound_database(tmp_path: Path) -> None:
    db = tmp_path / "sa.db"
    store = SQLiteStore(str(db))
    fences: list[int] = []

    async def churn() -> None:
        for i in range(600):  # more than two checkpoint rounds
            ticket = await store.aadmit(admission(session_id=f"s-{i % 3}"))
            assert isinstance(ticket, Ticket), ticket
            fences.append(ticket.fencing_tokens["object:1"])
            await store.arelease(ticket)

    try:
        anyio.run(churn)
    finally:
        store.close()
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert check.execute("SELECT count(*) FROM tickets").fetchone() == (0,)
        assert check.execute("SELECT value FROM fences WHERE key = 'object:1'").fetchone() == (fences[-1],)
        assert len(set(fences)) == 600 and fences == sorted(fences)
    finally:
        check.close()


def test_fencing_counters_of_unused_keys_are_pruned_and_tokens_keep_increasing(tmp_path: Path) -> None:
    # lock keys come from path parameters: one counter per made-up id must not stay forever
    from sa_middleware.rules import FENCE_SLACK

    now = [time.time()]
    store = SQLiteStore(str(tmp_path / "sa.db"), clock=lambda: now[0])
    try:
        held = store.admit(admission(session_id="held", lease=3600.0, locks=(LockRequest("held"),)))
        assert isinstance(held, Ticket)
        fences: dict[str, int] = {}
        for i in range(20):
            ticket = store.admit(admission(locks=(LockRequest(f"order:{i}"),)))
            assert isinstance(ticket, Ticket), ticket
            fences[f"order:{i}"] = ticket.fencing_tokens[f"order:{i}"]
            store.release(ticket)
        now[0] += FENCE_SLACK + 30.0  # past the slack and the sweep interval
        again = store.admit(admission(sub="bob", session_id="bob-1", locks=(LockRequest("order:0"),)))
        assert isinstance(again, Ticket), again
        assert again.fencing_tokens["order:0"] > fences["order:0"]
        check = sqlite3.connect(tmp_path / "sa.db")
        try:
            assert sorted(k for (k,) in check.execute("SELECT key FROM fences")) == ["held", "order:0"]
        finally:
            check.close()
    finally:
        store.close()


@pytest.mark.anyio
async def test_a_cancelled_threaded_aadmit_gives_back_what_its_worker_committed(tmp_path: Path) -> None:
    import asyncio
    import threading

    store = SQLiteStore(str(tmp_path / "sa.db"), timeout=30.0)
    waiting, given_back = threading.Event(), threading.Event()
    admit, give_back = store.admit, store._give_back

    def admit_and_tell(a: Admission) -> Ticket | Denial:
        waiting.set()  # in the worker thread, about to wait for the write lock
        return admit(a)

    def give_back_and_tell(ticket_id: str) -> None:
        give_back(ticket_id)
        given_back.set()

    store.admit = admit_and_tell  # type: ignore[method-assign]
    store._give_back = give_back_and_tell  # type: ignore[method-assign]
    blocker = sqlite3.connect(tmp_path / "sa.db", isolation_level=None)
    try:
        store.locks()  # the schema exists
        blocker.execute("BEGIN IMMEDIATE")  # the admission cannot run inline: it goes to a worker thread
        task = asyncio.create_task(store.aadmit(admission(lease=300.0)))
        assert await anyio.to_thread.run_sync(waiting.wait, 20.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        blocker.execute("COMMIT")  # the worker commits its ticket now, for a caller that is gone
        assert await anyio.to_thread.run_sync(given_back.wait, 20.0)
        assert store.locks() == []
        assert isinstance(await store.aadmit(admission(sub="bob", session_id="bob-1")), Ticket)
    finally:
        blocker.close()
        store.close()


def test_uri_options(tmp_path: Path) -> None:
    from sa_middleware.errors import ConfigurationError
    from sa_middleware.stores import open_store

    store = open_store(f"sqlite:///{tmp_path / 'a.db'}?timeout=0.5&inline=false")
    assert isinstance(store, SQLiteStore) and (store.timeout, store.inline) == (0.5, False)
    store.close()
    for bad in ("timeout=soon", "inline=maybe"):
        with pytest.raises(ConfigurationError):
            open_store(f"sqlite:///{tmp_path / 'b.db'}?{bad}")


def _open_and_write(path: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        SQLiteStore(path).rotate("alice")
        results.put("ok")
    except Exception as exc:
        results.put(repr(exc))


def test_workers_opening_a_new_database_together_all_succeed(tmp_path: Path) -> None:
    # switching a new database to WAL needs the file alone; worker processes starting at once must not fail
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    failures: list[str] = []
    for round_ in range(8):
        path = str(tmp_path / f"new-{round_}.db")
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_and_write, args=(path, barrier, results)) for _ in range(6)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(60)
        failures += [o for o in outcomes if o != "ok"]
        check = sqlite3.connect(path)
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert check.execute("SELECT generation FROM principals WHERE sub = 'alice'").fetchone() == (6,)
        check.close()
    assert failures == []


def test_a_database_written_before_issuers_is_upgraded_and_its_state_kept(tmp_path: Path) -> None:
    """A database of the schema before principal state was kept per issuer: every row belongs to the empty issuer,
    which an issuer's principal inherits on first use (a single-issuer store keeps its generations and statuses)."""
    path = tmp_path / "old.db"
    now = time.time()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        CREATE TABLE principals (sub TEXT PRIMARY KEY, generation INTEGER NOT NULL DEFAULT 0, not_before FLOAT,
            risk TEXT, privileges TEXT, privileges_at FLOAT, marker_at FLOAT, marker_generation INTEGER,
            sessions_before FLOAT, disabled_at FLOAT, assurance TEXT, assurance_at FLOAT);
        CREATE TABLE sessions (session_id TEXT PRIMARY KEY, sub TEXT, kind TEXT, status TEXT, created FLOAT,
            last_seen FLOAT, expires FLOAT, client TEXT, user_agent TEXT, device TEXT, credential TEXT, actor TEXT,
            marked_at FLOAT, marked_generation INTEGER, cleared_at FLOAT);
        CREATE TABLE tickets (ticket_id TEXT PRIMARY KEY, sub TEXT, session_id TEXT, token_hash TEXT, client TEXT,
            tags TEXT, conflicts TEXT, exclusive INTEGER, expires FLOAT);
        CREATE TABLE locks (key TEXT, ticket_id TEXT, mode TEXT, sub TEXT, session_id TEXT, kind TEXT,
            fence INTEGER, expires FLOAT, PRIMARY KEY (key, ticket_id));
    """)
    conn.execute("INSERT INTO principals (sub, generation) VALUES ('alice', 2)")
    for sid, status in (("alice-1", "paused"), ("alice-2", "active")):
        conn.execute("INSERT INTO sessions VALUES (?, 'alice', 'human', ?, ?, ?, ?, '', '', NULL, NULL, NULL, NULL, "
                     "NULL, NULL)", (sid, status, now - 60, now - 30, now + 3600))
    conn.close()
    issuer = "https://idp.example"
    store = SQLiteStore(str(path))
    try:
        assert isinstance(store.admit(admission(iss=issuer, session_id="alice-3", token_gen=1, locks=())), Denial)
        assert isinstance(store.admit(admission(iss=issuer, session_id="alice-2", token_gen=2, locks=())), Ticket)
        paused = store.admit(admission(iss=issuer, session_id="alice-1", token_gen=2, locks=()))
        assert isinstance(paused, Denial) and paused.code == "session_paused"
        assert store.rotate("alice", issuer) == 3  # the inherited generation, bumped
        assert store.rotate("alice") == 3  # the rows of the empty issuer stay, for every other issuer
        assert [s.session_id for s in store.sessions("alice", 900, issuer)] == ["alice-2"]
    finally:
        store.close()
    store = SQLiteStore(str(path))  # opened again: upgraded once, the state stays
    try:
        assert store.rotate("alice", issuer) == 4
        assert store.issuers("alice") == ["", issuer]
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        columns = {row[1]: row[5] for row in conn.execute("PRAGMA table_info(principals)")}
        assert columns["iss"] == 1 and columns["sub"] == 2  # the primary key is (iss, sub)
    finally:
        conn.close()


#: tickets, locks and fences as earlier versions created them (rowid tables)
_ROWID_TABLES = """
    CREATE TABLE [tickets] ([ticket_id] TEXT PRIMARY KEY, [sub] TEXT, [session_id] TEXT, [token_hash] TEXT,
        [client] TEXT, [tags] TEXT, [conflicts] TEXT, [exclusive] INTEGER, [expires] FLOAT,
        [iss] TEXT NOT NULL DEFAULT '');
    CREATE TABLE [locks] ([key] TEXT, [ticket_id] TEXT, [mode] TEXT, [sub] TEXT, [session_id] TEXT, [kind] TEXT,
        [fence] INTEGER, [expires] FLOAT, [iss] TEXT NOT NULL DEFAULT '', PRIMARY KEY ([key], [ticket_id]));
    CREATE TABLE [fences] ([key] TEXT PRIMARY KEY, [value] INTEGER);
"""


def test_tickets_locks_and_fences_of_an_earlier_schema_are_kept_by_the_upgrade(tmp_path: Path) -> None:
    """Earlier versions kept tickets, locks and fences in rowid tables: the first open copies them into tables
    without rowids, and what was in flight stays in force (a held lock blocks, its release frees it, fencing tokens
    keep growing)."""
    path = tmp_path / "rowid.db"
    now = time.time()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(_ROWID_TABLES + """
        CREATE INDEX [idx_tickets_sub] ON [tickets] ([sub]);
        CREATE INDEX [idx_locks_ticket_id] ON [locks] ([ticket_id]);
        CREATE TRIGGER tickets_release_locks AFTER DELETE ON tickets BEGIN
            DELETE FROM locks WHERE ticket_id = old.ticket_id; END;
    """)
    fence = int(now * 1_000_000) + 10_000_000  # ahead of the clock: the next token must still exceed it
    conn.execute("INSERT INTO tickets VALUES ('t-old', 'bob', 'bob-1', 'h', '127.0.0.1|ua', '[]', '[]', 0, ?, '')",
                 (now + 600,))
    conn.execute("INSERT INTO locks VALUES ('object:7', 't-old', 'exclusive', 'bob', 'bob-1', 'human', ?, ?, '')",
                 (fence, now + 600))
    conn.execute("INSERT INTO fences VALUES ('object:7', ?)", (fence,))
    conn.close()
    store = SQLiteStore(str(path))
    try:
        blocked = store.admit(admission(session_id="alice-1", locks=(LockRequest("object:7"),)))
        assert isinstance(blocked, Denial) and blocked.code == "object_locked"
        store.release(Ticket("t-old", "bob", "bob-1", {"object:7": fence}, now + 600))
        granted = store.admit(admission(session_id="alice-1", locks=(LockRequest("object:7"),)))
        assert isinstance(granted, Ticket) and granted.fencing_tokens["object:7"] > fence
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        for table in ("tickets", "locks", "fences"):
            (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
            assert sql.upper().endswith("WITHOUT ROWID"), sql
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert {"idx_locks_ticket_id", "tickets_release_locks"} <= names
        assert "idx_tickets_sub" not in names  # a principal's tickets are found by the table's key
        assert not any(name.endswith("_upgrade") for name in names)
        assert primary_key(conn, "tickets") == ["iss", "sub", "ticket_id"]
    finally:
        conn.close()


def primary_key(conn: sqlite3.Connection, table: str) -> list[str]:
    """The columns of a table's primary key, in the key's order."""
    return [column for _, column in sorted((row[5], row[1]) for row in conn.execute(f"PRAGMA table_info({table})")
                                           if row[5])]


def test_tickets_keyed_by_their_id_alone_are_keyed_by_principal_and_stay_in_force(tmp_path: Path) -> None:
    """The previous version kept tickets under their id, with an index by subject: the first open keys them by
    (issuer, subject, ticket id) and drops the index. A ticket in flight still counts and its release frees its
    lock; a release as the previous version writes it (by ticket id alone) still works on the new table."""
    path = tmp_path / "keyed.db"
    now = time.time()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        CREATE TABLE tickets (ticket_id TEXT PRIMARY KEY, sub TEXT, session_id TEXT, token_hash TEXT, client TEXT,
            tags TEXT, conflicts TEXT, exclusive INTEGER, expires FLOAT, iss TEXT NOT NULL DEFAULT '') WITHOUT ROWID;
        CREATE TABLE locks (key TEXT, ticket_id TEXT, mode TEXT, sub TEXT, session_id TEXT, kind TEXT,
            fence INTEGER, expires FLOAT, iss TEXT NOT NULL DEFAULT '', PRIMARY KEY (key, ticket_id)) WITHOUT ROWID;
        CREATE INDEX idx_tickets_sub ON tickets (sub);
        CREATE INDEX idx_locks_ticket_id ON locks (ticket_id);
        CREATE TRIGGER tickets_release_locks AFTER DELETE ON tickets BEGIN
            DELETE FROM locks WHERE ticket_id = old.ticket_id; END;
    """)
    for ticket_id, key in (("t-1", "object:1"), ("t-2", "object:2")):
        conn.execute("INSERT INTO tickets VALUES (?, 'bob', 'bob-1', 'h', '127.0.0.1|ua', '[]', '[]', 0, ?, '')",
                     (ticket_id, now + 600))
        conn.execute("INSERT INTO locks VALUES (?, ?, 'exclusive', 'bob', 'bob-1', 'human', 1, ?, '')",
                     (key, ticket_id, now + 600))
    conn.close()
    store = SQLiteStore(str(path))
    try:
        busy = store.admit(admission(sub="bob", session_id="bob-1", locks=(), max_in_flight=2))
        assert isinstance(busy, Denial) and busy.code == "too_many_in_flight"
        store.release(Ticket("t-1", "bob", "bob-1", {"object:1": 1}, now + 600))
        old_release = sqlite3.connect(path, isolation_level=None)
        try:
            assert old_release.execute("DELETE FROM tickets WHERE ticket_id = 't-2'").rowcount == 1
        finally:
            old_release.close()
        for key in ("object:1", "object:2"):
            assert isinstance(store.admit(admission(session_id="alice-1", locks=(LockRequest(key),))), Ticket)
        assert isinstance(store.admit(admission(sub="bob", session_id="bob-1", locks=(), max_in_flight=1)), Ticket)
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "idx_tickets_sub" not in names and "tickets_release_locks" in names
        assert primary_key(conn, "tickets") == ["iss", "sub", "ticket_id"]
    finally:
        conn.close()


def test_the_upgrade_keeps_views_indexes_and_triggers_that_operators_added(tmp_path: Path) -> None:
    path = tmp_path / "custom.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(_ROWID_TABLES + """
        CREATE TRIGGER tickets_release_locks AFTER DELETE ON tickets BEGIN
            DELETE FROM locks WHERE ticket_id = old.ticket_id; END;
        CREATE VIEW lock_monitor AS SELECT key, sub, expires FROM locks;
        CREATE INDEX ops_tickets_expires ON tickets (expires);
        CREATE TABLE ops_log (what TEXT);
        CREATE TRIGGER ops_fence_log AFTER INSERT ON fences BEGIN INSERT INTO ops_log VALUES (new.key); END;
    """)
    conn.close()
    store = SQLiteStore(str(path))
    try:
        ticket = store.admit(admission(locks=(LockRequest("object:9"),)))
        assert isinstance(ticket, Ticket)
        check = sqlite3.connect(path)
        try:
            assert check.execute("SELECT key, sub FROM lock_monitor").fetchall() == [("object:9", "alice")]
            assert check.execute("SELECT what FROM ops_log").fetchall() == [("object:9",)]
            names = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
            assert {"ops_tickets_expires", "ops_fence_log", "lock_monitor"} <= names
        finally:
            check.close()
    finally:
        store.close()


def test_a_principal_row_with_an_empty_risk_value_is_read_as_no_risk(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    store = SQLiteStore(str(path))
    try:
        assert isinstance(store.admit(admission(token_gen=1, locks=())), Ticket)  # the principal's row exists
        edit = sqlite3.connect(path)
        edited = edit.execute("UPDATE principals SET risk = '' WHERE sub = 'alice'").rowcount  # by hand, or a tool
        edit.commit()
        edit.close()
        assert edited == 1
        assert isinstance(store.admit(admission(session_id="alice-2", token_gen=1, locks=())), Ticket)
    finally:
        store.close()


def test_an_in_memory_database_is_refused_with_a_clear_error() -> None:
    # each connection of the store would see a database of its own: refused at once, never a hang
    with pytest.raises(ConfigurationError, match="memory://"):
        SQLiteStore(":memory:")


def test_a_new_file_gets_the_stores_page_size_and_an_existing_file_keeps_its_own(tmp_path: Path) -> None:
    from sa_middleware.stores.sqlite import PAGE_SIZE

    existing = tmp_path / "existing.db"
    conn = sqlite3.connect(existing)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("CREATE TABLE unrelated (x)")
    conn.close()
    for path, expected in ((tmp_path / "new.db", PAGE_SIZE), (existing, 4096)):
        store = SQLiteStore(str(path))
        try:
            ticket = store.admit(admission(locks=()))
            assert isinstance(ticket, Ticket)
            store.release(ticket)
        finally:
            store.close()
        check = sqlite3.connect(path)
        try:
            assert check.execute("PRAGMA page_size").fetchone() == (expected,)
            assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            check.close()
    assert PAGE_SIZE != 4096  # else the test could not tell the two apart


def test_a_database_whose_tables_cannot_be_set_up_is_refused_when_the_store_opens(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE VIEW tickets AS SELECT 1 AS ticket_id")  # a name the store needs, taken by something else
    conn.close()
    with pytest.raises(StoreError, match="could not be created or upgraded"):
        SQLiteStore(str(path))


# -- group commit -------------------------------------------------------------------------------------------------

def test_threads_and_the_event_loop_of_one_process_never_wait_for_each_other_in_sqlite(tmp_path: Path) -> None:
    # every write of the process joins one queue: a thread's write never waits in SQLite's busy handler behind the
    # event loop's transactions (a busy handler that polls lost the lock to them again and again, past the timeout)
    import threading

    store = SQLiteStore(str(tmp_path / "sa.db"), timeout=0.2)
    stop = threading.Event()
    failures: list[str] = []
    rotations = [0]

    def operator() -> None:
        while not stop.is_set():
            try:
                store.rotate("bob")
                rotations[0] += 1
            except Exception as exc:
                failures.append(repr(exc))

    async def flood() -> None:
        for i in range(1500):
            ticket = await store.aadmit(admission(session_id=f"s-{i % 3}"))
            assert isinstance(ticket, Ticket), ticket
            await store.arelease(ticket)

    threads = [threading.Thread(target=operator) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        anyio.run(flood)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        store.close()
    assert failures == [] and rotations[0] > 0


def test_a_release_from_a_thread_reaches_other_processes_without_another_write(tmp_path: Path) -> None:
    from redis_support import wait_for

    path = str(tmp_path / "sa.db")
    store, other = SQLiteStore(path), SQLiteStore(path)
    try:
        ticket = store.admit(admission())
        assert isinstance(ticket, Ticket)
        assert [lock.ticket_id for lock in other.locks()] == [ticket.ticket_id]
        store.release(ticket)  # queued for the next write of this process, or the flush thread
        wait_for(lambda: other.locks() == [], "the release committed by the flush thread", timeout=30)
        assert isinstance(other.admit(admission(sub="bob", session_id="bob-1")), Ticket)
    finally:
        store.close()
        other.close()


def test_writes_of_many_threads_share_transactions_and_each_sees_the_ones_before(tmp_path: Path) -> None:
    import threading

    store = SQLiteStore(str(tmp_path / "sa.db"))
    results: list[Ticket | Denial] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        results.append(store.admit(admission(sub=f"user-{i}", session_id=f"user-{i}-1")))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sum(isinstance(r, Ticket) for r in results) == 1  # one exclusive holder of object:1
        assert sum(isinstance(r, Denial) and r.code == "object_locked" for r in results) == 7
        assert len(store.locks()) == 1
    finally:
        store.close()


def test_a_write_that_fails_in_a_batch_leaves_the_others_committed(tmp_path: Path) -> None:
    from sa_middleware.stores.sqlite import _RUNNING, _Entry

    store = SQLiteStore(str(tmp_path / "sa.db"))

    def device(name: str, fail: bool = False) -> Any:
        def write(conn: sqlite3.Connection, now: float) -> str:
            conn.execute("INSERT INTO devices VALUES (?, 1, ?)", (name, now))
            if fail:
                raise RuntimeError("a bug in one write")
            return name
        return write

    batch = [_Entry(device("d1")), _Entry(device("d2", fail=True)), _Entry(device("d3"))]
    for entry in batch:
        entry.state = _RUNNING
    try:
        store._execute(list(batch), nowait=False)
        assert [e.result for e in batch] == ["d1", None, "d3"]
        assert isinstance(batch[1].error, RuntimeError) and batch[0].error is None and batch[2].error is None
        check = sqlite3.connect(tmp_path / "sa.db")
        try:
            assert [r[0] for r in check.execute("SELECT device_id FROM devices ORDER BY 1")] == ["d1", "d3"]
        finally:
            check.close()
    finally:
        store.close()
