"""The memory store's own behaviour (the conformance suite covers the rule)."""

from __future__ import annotations

import time

import pytest
from test_conformance import make_admission

from sa_middleware.errors import StoreUnavailable
from sa_middleware.records import Ticket
from sa_middleware.stores.memory import MemoryStore


def test_a_closed_store_answers_nothing() -> None:
    store = MemoryStore()
    ticket = store.admit(make_admission(time.time))
    assert isinstance(ticket, Ticket)
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.admit(make_admission(time.time, sub="bob"))
    with pytest.raises(StoreUnavailable, match="closed"):
        store.release(ticket)
    with pytest.raises(StoreUnavailable, match="closed"):
        store.sessions("alice", 3600.0)
    store.close()  # closing again is harmless
    with pytest.raises(StoreUnavailable, match="closed"):
        store.locks()
