"""The stores' flush thread (``sa_middleware.stores.flush_thread``): it runs after its delay, and stopping it ends
it whenever the stop lands."""

from __future__ import annotations

import threading

from sa_middleware.stores.flush_thread import FlushThread

WAIT = 10.0


def test_a_flush_runs_after_due_and_stop_ends_the_thread() -> None:
    ran = threading.Event()
    flusher = FlushThread(ran.set, 0.001, "test-flush")
    flusher.due()
    assert ran.wait(WAIT)
    thread = flusher._thread
    assert thread is not None
    flusher.stop(wait=WAIT)
    assert not thread.is_alive()


def test_a_stop_landing_as_the_thread_wakes_still_ends_it() -> None:
    """stop() right after the delay ran out and just before the thread clears its wake-up: the stop's wake-up is
    cleared with it, and the thread must still see the stop instead of waiting for a next due() forever."""
    runs: list[int] = []
    flusher = FlushThread(lambda: runs.append(1), 0.001, "test-flush")

    class StopBeforeClear(threading.Event):
        def clear(self) -> None:
            flusher._stop.set()  # stop() lands here: it sets the stop, then the wake-up...
            self.set()
            super().clear()  # ...which the thread clears now

    flusher._due = StopBeforeClear()
    flusher.due()
    thread = flusher._thread
    assert thread is not None
    thread.join(WAIT)
    assert not thread.is_alive()
    assert runs == []  # stopped: no run after the stop
