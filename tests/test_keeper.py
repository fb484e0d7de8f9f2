"""The lease keeper: each process renews the tickets it holds, also in a child forked after it started."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence

import pytest

from sa_middleware.guard import _Keeper
from sa_middleware.records import Ticket


class RecordingStore:
    """Records the ticket ids of every renewal; ``renewed(ticket_id)`` is set once one included that ticket."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.seen: dict[str, threading.Event] = {}

    def renewed(self, ticket_id: str) -> threading.Event:
        return self.seen.setdefault(ticket_id, threading.Event())

    def renew(self, tickets: Sequence[Ticket], lease: float) -> None:
        ids = [t.ticket_id for t in tickets]
        self.calls.append(ids)
        for ticket_id in ids:
            self.renewed(ticket_id).set()


def _ticket(ticket_id: str) -> Ticket:
    return Ticket(ticket_id, "alice", "s1", {}, 1e12)


def _in_child(fork: Callable[[], int], keeper: _Keeper, store: RecordingStore) -> dict[str, object]:
    """Fork; in the child, add a ticket and report what the child's keeper renewed."""
    read, write = os.pipe()
    pid = fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            store.calls.clear()
            store.seen.clear()
            keeper.add(_ticket("child"))
            renewed = store.renewed("child").wait(10)
            os.write(write, json.dumps({"renewed": renewed, "calls": store.calls[-1:]}).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = json.loads(pipe.read() or "{}")
    os.waitpid(pid, 0)
    return report


def _keeper_running(store: RecordingStore) -> _Keeper:
    keeper = _Keeper(store, lease=0.15)  # type: ignore[arg-type]
    keeper.add(_ticket("parent"))
    assert store.renewed("parent").wait(10)  # the parent's thread runs
    return keeper


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_renews_its_own_tickets() -> None:
    store = RecordingStore()
    keeper = _keeper_running(store)
    try:
        report = _in_child(os.fork, keeper, store)
        assert report["renewed"] is True
        assert report["calls"] == [["child"]]  # the parent's tickets stay with the parent
    finally:
        keeper.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="calls the C library's fork")
def test_a_child_forked_without_the_fork_hooks_still_renews() -> None:
    # uWSGI forks its workers without Python's fork hooks unless told otherwise: the keeper notices the new pid
    store = RecordingStore()
    keeper = _keeper_running(store)
    try:
        report = _in_child(ctypes.PyDLL(None).fork, keeper, store)
        assert report["renewed"] is True
        assert report["calls"] and "child" in report["calls"][0]  # type: ignore[index]
    finally:
        keeper.stop()


def test_a_stopped_keeper_stays_stopped_in_a_child() -> None:
    store = RecordingStore()
    keeper = _keeper_running(store)
    keeper.stop()
    keeper._after_fork()  # what a fork does in the child
    assert keeper._wake.is_set()
    keeper.add(_ticket("late"))
    assert keeper._thread is not None
    keeper._thread.join(10)
    assert not keeper._thread.is_alive()  # it saw the stop at once: nothing renewed
    assert "late" not in store.seen


class _HeldRenewal(RecordingStore):
    """Its first renewal waits for ``go``; ``finished`` is set once it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.renewing, self.go, self.finished = threading.Event(), threading.Event(), threading.Event()

    def renew(self, tickets: Sequence[Ticket], lease: float) -> None:
        if not self.renewing.is_set():
            self.renewing.set()
            assert self.go.wait(10), "the test never let the renewal finish"
            self.finished.set()
        super().renew(tickets, lease)


def test_stop_waits_for_the_store_call_in_progress() -> None:
    """Guard.close() stops the keeper before it closes the store: the renewal in progress ends first, and the
    thread is gone when stop() returns."""
    store = _HeldRenewal()
    keeper = _Keeper(store, lease=0.15)  # type: ignore[arg-type]
    keeper.add(_ticket("held"))
    assert store.renewing.wait(10)
    stopping, seen = threading.Event(), []

    def stop() -> None:
        stopping.set()
        keeper.stop()
        seen.append(store.finished.is_set())

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert stopping.wait(10)
    store.go.set()
    stopper.join(10)
    assert seen == [True], "stop() returned while the keeper was still renewing"
    assert keeper._thread is not None and not keeper._thread.is_alive()
