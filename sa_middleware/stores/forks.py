"""State that a forked child must not share with its parent (locks, queues, threads): started afresh there."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import TypeVar

__all__ = ["afresh_after_fork"]

T = TypeVar("T")


def afresh_after_fork(obj: T, start: Callable[[T], None]) -> None:
    """Call ``start(obj)`` in every child forked while ``obj`` lives: what the parent's threads held (a lock, a
    queue, a leader's turn) stays with the parent."""
    ref = weakref.ref(obj)

    def again() -> None:
        child = ref()
        if child is not None:
            start(child)
    os.register_at_fork(after_in_child=again)
