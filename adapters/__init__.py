"""Framework adapters, installed as ``sa_middleware.adapters`` (never as a top-level ``adapters`` package)."""

from __future__ import annotations

__all__: list[str] = []
