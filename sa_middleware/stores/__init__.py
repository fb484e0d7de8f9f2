"""Stores: where contexts, tickets and locks live. Open one by URI with :func:`open_store`."""

from __future__ import annotations

from .base import Store, open_store, register_scheme

__all__ = ["Store", "open_store", "register_scheme"]
