"""The thread that sends what a store's threads left queued (their releases) when no later call carried it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .forks import afresh_after_fork

__all__ = ["FlushThread"]

log = logging.getLogger("sa_middleware")


class FlushThread:
    """Runs ``flush`` ``delay`` seconds after :meth:`due` is called (whatever is asked meanwhile joins that run), in
    a daemon thread started at first use, and again after :meth:`stop` or a fork."""

    def __init__(self, flush: Callable[[], None], delay: float, name: str) -> None:
        self._flush, self._delay, self._name = flush, delay, name
        self._start()
        afresh_after_fork(self, FlushThread._start)  # the parent's thread stays with the parent

    def _start(self) -> None:
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def due(self) -> None:
        """Have ``flush`` run within ``delay`` (unless it runs already)."""
        if not self._due.is_set():
            self._due.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._thread is thread:
                    self._stop = threading.Event()
                    self._thread = threading.Thread(target=self._run, args=(self._due, self._stop), name=self._name,
                                                    daemon=True)
                    self._thread.start()

    def stop(self, wait: float = 0.0) -> None:
        """End the thread without a last run, waiting up to ``wait`` seconds for a run in progress to finish; a
        later :meth:`due` starts another."""
        self._stop.set()
        self._due.set()
        thread = self._thread
        if wait > 0 and thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def _run(self, due: threading.Event, stop: threading.Event) -> None:
        while True:
            due.wait()
            if stop.is_set() or stop.wait(self._delay):
                return
            due.clear()
            if stop.is_set():  # stopped after the wait, its wake-up just cleared
                return
            try:
                self._flush()
            except Exception:
                log.exception("sa-middleware: queued releases not sent")
