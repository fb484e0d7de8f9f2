"""State that a forked child must not share with its parent (locks, queues, threads): started afresh there."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["afresh_after_fork"]

T = TypeVar("T")

# what to start afresh in a child, per live object: one fork hook for the process, however many stores it makes
_afresh: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()
_afresh_lock = threading.Lock()


def afresh_after_fork(obj: T, start: Callable[[T], None]) -> None:
    """Call ``start(obj)`` in every child forked while ``obj`` lives: what the parent's threads held (a lock, a
    queue, a leader's turn) stays with the parent."""
    with _afresh_lock:
        _afresh[obj] = start


def _in_child() -> None:
    global _afresh_lock
    _afresh_lock = threading.Lock()  # a parent's thread may have held it at the fork
    for obj, start in list(_afresh.items()):
        start(obj)


os.register_at_fork(after_in_child=_in_child)
