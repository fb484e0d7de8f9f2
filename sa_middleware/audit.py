"""The in-process audit buffer: records that cannot be written in the store's own transaction wait here.

Denials decided before the store is asked (``missing_token``, ``invalid_token``), denials the store did not record
(``store_unavailable``, the final ``object_locked`` of a ``lock_wait``) and ``fail_open`` admissions are buffered
and written in batches by the Guard's keeper thread, so a flood of bad tokens costs at most one store write per
batch, never one per request. The buffer is bounded: when it is full a record is dropped and counted, and the next
batch carries an ``audit_dropped`` record with the count.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable

from .errors import ConfigurationError
from .records import AuditRecord

__all__ = ["DEFAULT_AUDIT_BUFFER", "AuditBuffer"]

#: records one process buffers at most (Guard option ``audit_buffer``)
DEFAULT_AUDIT_BUFFER = 10_000


class AuditBuffer:
    """A bounded, thread-safe queue of audit records, emptied by :meth:`take`. After a fork, the child starts empty
    (the parent writes what it buffered)."""

    def __init__(self, size: int = DEFAULT_AUDIT_BUFFER) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError("audit_buffer must be a positive integer")
        self.size = size
        self._records: deque[AuditRecord] = deque()
        self._dropped = 0
        #: records dropped by this buffer since it was created (the ``sa_middleware_audit_dropped`` metric)
        self.dropped_total = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._records.clear()
            self._dropped = 0

    def add(self, record: AuditRecord) -> bool:
        """Buffer ``record``; returns False (and counts it) when the buffer is full."""
        with self._lock:
            self._check_fork()
            if len(self._records) >= self.size:
                self._dropped += 1
                self.dropped_total += 1
                return False
            self._records.append(record)
            return True

    def take(self) -> list[AuditRecord]:
        """Everything buffered, oldest first, plus an ``audit_dropped`` record when records were dropped since the
        last take; the buffer is then empty."""
        with self._lock:
            self._check_fork()
            records = list(self._records)
            self._records.clear()
            if self._dropped:
                records.append(AuditRecord("change", "audit_dropped", "middleware",
                                           detail=f"{self._dropped} audit records dropped: the process's audit "
                                                  f"buffer ({self.size}) was full", time=time.time()))
                self._dropped = 0
            return records

    def give_back(self, records: Iterable[AuditRecord]) -> None:
        """Put records that could not be written back in front (a failed flush); those that no longer fit are
        dropped and counted."""
        with self._lock:
            self._check_fork()
            room = self.size - len(self._records)
            back = list(records)
            dropped_records = [r for r in back if r.code == "audit_dropped" and r.kind == "change"]
            back = [r for r in back if not (r.code == "audit_dropped" and r.kind == "change")]
            for record in dropped_records:  # fold the counts of earlier drops back into the counter
                self._dropped += int(record.detail.split(" ", 1)[0])
            keep = back[-room:] if room > 0 else []
            self._dropped += len(back) - len(keep)
            self.dropped_total += len(back) - len(keep)
            self._records.extendleft(reversed(keep))

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
