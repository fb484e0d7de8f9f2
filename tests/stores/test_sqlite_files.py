"""The SQLite store's files (docs "Operations hygiene"): private modes whatever the umask, and a bounded WAL."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from redis_support import wait_for

from sa_middleware import Guard, Policy, RequestInfo
from sa_middleware.demo import DemoIssuer
from sa_middleware.guard import Admitted
from sa_middleware.stores.sqlite import WAL_LIMIT, SQLiteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """Run with the most permissive umask: the store may not rely on it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def idp() -> DemoIssuer:
    return DemoIssuer()


def guard_on(idp: DemoIssuer, uri: str) -> Guard:
    return Guard(store=uri, keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer, audience=idp.audience,
                 policies={"PUT /docs/{id}": Policy(locks=["doc:{id}"])})


def put(idp: DemoIssuer, guard: Guard, sub: str, key: str) -> None:
    outcome = guard.admit(RequestInfo("PUT", f"/docs/{key}", {"authorization": f"Bearer {idp.token(sub)}"}, "10.0.0.1"))
    assert isinstance(outcome, Admitted), outcome
    guard.release(outcome.ticket)


@pytest.mark.usefixtures("umask")
def test_the_store_files_are_created_private_whatever_the_umask(idp: DemoIssuer, tmp_path: Path) -> None:
    db = tmp_path / "sa.db"
    guard = guard_on(idp, f"sqlite:///{db}")
    try:
        put(idp, guard, "alice", "1")
        files = [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]
        assert len(files) == 3  # the database and, while it is open, its WAL and shared memory
        assert {str(p): mode(p) for p in files} == {str(p): 0o600 for p in files}
        with open(tmp_path / "probe", "w"):  # the umask really lets others in
            pass
        assert mode(tmp_path / "probe") == 0o666
    finally:
        guard.close()


@pytest.mark.usefixtures("umask")
def test_a_rollback_journal_gets_the_database_s_mode_too(tmp_path: Path) -> None:
    db = tmp_path / "sa.db"
    SQLiteStore(str(db)).close()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")  # the journal then stays after the commit
        conn.execute("PRAGMA journal_mode = PERSIST")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE probe (x)")
        conn.execute("COMMIT")
        assert mode(Path(f"{db}-journal")) == 0o600
    finally:
        conn.close()


def test_an_existing_file_keeps_its_mode_and_a_loose_one_is_named(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    loose, tight = tmp_path / "loose.db", tmp_path / "tight.db"
    for path, wanted in ((loose, 0o644), (tight, 0o600)):
        sqlite3.connect(path).close()
        os.chmod(path, wanted)
    with caplog.at_level(logging.WARNING, logger="sa_middleware"):
        SQLiteStore(str(tight)).close()
        assert caplog.records == []
        SQLiteStore(str(loose)).close()
    [warning] = caplog.records
    assert f"{loose} 0644" in warning.getMessage() and "chmod 600" in warning.getMessage()
    assert (mode(loose), mode(tight)) == (0o644, 0o600)  # left as the deployer set them


FLOOD = 3000
KEY = 500  # characters of each lock key's parameter (the key stays under the 512-character cap)


@pytest.mark.parametrize("flavour", ["event-loop", "threads"])
def test_a_flood_of_admissions_leaves_the_wal_bounded(idp: DemoIssuer, tmp_path: Path, flavour: str) -> None:
    """3,000 admissions with lock keys near the length cap: once the flood ends, the store's own maintenance brings
    the WAL back under WAL_LIMIT (within about a second), and checkpoint() empties it."""
    db = tmp_path / "sa.db"
    guard = guard_on(idp, f"sqlite:///{db}")
    store = guard.store
    assert isinstance(store, SQLiteStore)
    tokens = [idp.token(f"user-{i}") for i in range(16)]
    peak = [0]

    def request(i: int) -> RequestInfo:
        key = (uuid.uuid4().hex * (KEY // 32 + 1))[:KEY]
        return RequestInfo("PUT", f"/docs/{key}", {"authorization": f"Bearer {tokens[i % 16]}"}, "10.0.0.1")

    try:
        if flavour == "event-loop":
            async def worker(first: int) -> None:
                for i in range(first, FLOOD, 8):
                    outcome = await guard.aadmit(request(i))
                    assert isinstance(outcome, Admitted), outcome
                    await guard.arelease(outcome.ticket)
                    peak[0] = max(peak[0], store.wal_size())

            async def flood() -> None:
                async with anyio.create_task_group() as tg:
                    for first in range(8):
                        tg.start_soon(worker, first)
            anyio.run(flood)
        else:
            def thread(first: int) -> None:
                for i in range(first, FLOOD, 8):
                    outcome = guard.admit(request(i))
                    assert isinstance(outcome, Admitted), outcome
                    guard.release(outcome.ticket)
                    peak[0] = max(peak[0], store.wal_size())
            threads = [threading.Thread(target=thread, args=(first,)) for first in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(store.locks()) == 0
        wait_for(lambda: store.wal_size() <= WAL_LIMIT,
                 f"the WAL back under {WAL_LIMIT} bytes (now {store.wal_size()}, peak {peak[0]})")
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            conn.close()
        store.checkpoint()
        assert store.wal_size() == 0
    finally:
        guard.close()


def wal_frames(db: Path) -> int:
    """The frames in the WAL now (a passive checkpoint reports them; it changes nothing anybody reads)."""
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    finally:
        conn.close()


def test_writes_during_the_maintenance_checkpoint_do_not_grow_the_wal(idp: DemoIssuer, tmp_path: Path) -> None:
    """Under a steady flood a commit lands while the maintenance thread copies the WAL into the database: the
    checkpoint then copies the last frames with this process's writers held, so the next write starts the WAL
    again from its beginning instead of appending to it (a WAL that only grows must be truncated, which holds
    every writer for far longer)."""
    db = tmp_path / "sa.db"
    copied: list[int] = []
    armed = threading.Event()

    class CommitDuringCheckpoint(SQLiteStore):
        def _read(self, func):  # type: ignore[no-untyped-def]
            result = super()._read(func)
            # the first, bulk copy (this test's, not a read of the keeper's thread): another write lands meanwhile
            if armed.is_set() and not copied and threading.current_thread() is threading.main_thread():
                copied.append(result[0])
                put(idp, guard, "writer-during-checkpoint", "during")
            return result

    guard = Guard(store=CommitDuringCheckpoint(str(db)), keys=idp.public_pem, algorithms=["RS256"],
                  issuer=idp.issuer, audience=idp.audience, policies={"PUT /docs/{id}": Policy(locks=["doc:{id}"])})
    store = guard.store
    assert isinstance(store, CommitDuringCheckpoint)
    try:
        for i in range(40):
            put(idp, guard, f"user-{i % 8}", f"doc-{i}")
        armed.set()
        store._checkpoint_passive()
        assert copied and copied[0] > 0, copied  # the bulk copy saw the flood's frames
        put(idp, guard, "user-after", "after")
        frames = wal_frames(db)
        assert frames < copied[0], f"the WAL kept growing: {frames} frames after the checkpoint of {copied[0]}"
        assert len(store.locks()) == 0
    finally:
        guard.close()
