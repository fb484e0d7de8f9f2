"""The in-process store (``memory://``): for tests and single-process apps; nothing survives the process.

It is the SQLite store on a private in-memory database, so it keeps exactly the same rules and transactions; one
connection is shared by every thread and task, serialised by a lock, and its operations are cheap enough to run
inline on the event loop.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .sqlite import SQLiteStore

__all__ = ["MemoryStore"]


class MemoryStore(SQLiteStore):
    """Thread- and task-safe store that lives in this process only."""

    inline_async = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        super().__init__(":memory:", clock=clock)

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> MemoryStore:
        return cls(**options)

    def _connection(self, nowait: bool = False) -> sqlite3.Connection:
        return self._conn

    @contextmanager
    def _transaction(self, nowait: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock, super()._transaction(nowait) as conn:
            yield conn

    def _read(self, func: Callable[[sqlite3.Connection, float], Any]) -> Any:
        with self._lock:
            return super()._read(func)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
