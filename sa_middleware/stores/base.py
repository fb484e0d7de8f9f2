"""The store interface: sync operations, their async twins, and the URI scheme registry."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import anyio.to_thread

from ..denials import Denial
from ..errors import ConfigurationError
from ..records import Admission, LockInfo, SessionInfo, Ticket

__all__ = ["Store", "open_store", "register_scheme"]

P = ParamSpec("P")
R = TypeVar("R")


class Store(abc.ABC):
    """A place where contexts, tickets and locks live. Each admission and each release is one atomic operation.

    Every operation has an async twin prefixed with ``a``. The base class runs the sync operation in a worker
    thread so the event loop never waits on I/O; stores with native async clients override the twins.
    """

    #: whether the sync operations are cheap and never wait (then the async twins call them inline)
    inline_async: bool = False

    @abc.abstractmethod
    def admit(self, admission: Admission) -> Ticket | Denial:
        """Check the admission against the current state and record it, atomically."""

    @abc.abstractmethod
    def release(self, ticket_id: str) -> None:
        """End a ticket and free its locks."""

    @abc.abstractmethod
    def renew(self, ticket_ids: Sequence[str], lease: float) -> None:
        """Extend the leases of live tickets (and their locks) in one operation; expired ones stay expired."""

    @abc.abstractmethod
    def rotate(self, sub: str) -> int:
        """Bump the principal's generation; returns the new generation."""

    @abc.abstractmethod
    def revoke_principal(self, sub: str) -> float:
        """Refuse every token of ``sub`` issued before now; returns the watermark."""

    @abc.abstractmethod
    def revoke_session(self, session_id: str) -> bool:
        """Revoke one session; returns whether it was known."""

    @abc.abstractmethod
    def report_compromise(self, sub: str | None, session_id: str | None) -> list[str]:
        """Mark every context related to ``sub`` / ``session_id`` compromised; returns their ids."""

    @abc.abstractmethod
    def pause_session(self, session_id: str) -> bool:
        """Pause a session until resumed; returns whether it was known."""

    @abc.abstractmethod
    def resume_session(self, session_id: str) -> bool:
        """Clear a paused or compromised session; returns whether it changed."""

    @abc.abstractmethod
    def set_device_status(self, device_id: str, compliant: bool) -> None:
        """Mark a device compliant or not."""

    @abc.abstractmethod
    def set_privileges(self, sub: str, scopes: Iterable[str] | None) -> None:
        """Limit the scopes of tokens issued before now to ``scopes`` (``None`` lifts the limit)."""

    @abc.abstractmethod
    def sessions(self, sub: str, session_idle: float) -> list[SessionInfo]:
        """The principal's sessions seen within ``session_idle`` seconds, with their status."""

    @abc.abstractmethod
    def locks(self) -> list[LockInfo]:
        """Every lock held now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the store's connections."""

    async def _run(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        if self.inline_async:
            return func(*args, **kwargs)
        return await anyio.to_thread.run_sync(lambda: func(*args, **kwargs))

    async def aadmit(self, admission: Admission) -> Ticket | Denial:
        return await self._run(self.admit, admission)

    async def arelease(self, ticket_id: str) -> None:
        await self._run(self.release, ticket_id)

    async def arenew(self, ticket_ids: Sequence[str], lease: float) -> None:
        await self._run(self.renew, ticket_ids, lease)

    async def arotate(self, sub: str) -> int:
        return await self._run(self.rotate, sub)

    async def arevoke_principal(self, sub: str) -> float:
        return await self._run(self.revoke_principal, sub)

    async def arevoke_session(self, session_id: str) -> bool:
        return await self._run(self.revoke_session, session_id)

    async def areport_compromise(self, sub: str | None, session_id: str | None) -> list[str]:
        return await self._run(self.report_compromise, sub, session_id)

    async def apause_session(self, session_id: str) -> bool:
        return await self._run(self.pause_session, session_id)

    async def aresume_session(self, session_id: str) -> bool:
        return await self._run(self.resume_session, session_id)

    async def aset_device_status(self, device_id: str, compliant: bool) -> None:
        await self._run(self.set_device_status, device_id, compliant)

    async def aset_privileges(self, sub: str, scopes: Iterable[str] | None) -> None:
        await self._run(self.set_privileges, sub, scopes)

    async def asessions(self, sub: str, session_idle: float) -> list[SessionInfo]:
        return await self._run(self.sessions, sub, session_idle)

    async def alocks(self) -> list[LockInfo]:
        return await self._run(self.locks)

    async def aclose(self) -> None:
        await self._run(self.close)


_SCHEMES: dict[str, Callable[..., Store]] = {}


def register_scheme(scheme: str, factory: Callable[..., Store]) -> None:
    """Make ``open_store`` understand ``scheme://...`` URIs."""
    _SCHEMES[scheme] = factory


def _builtin(scheme: str) -> Callable[..., Store] | None:
    if scheme == "memory":
        from .memory import MemoryStore
        return MemoryStore.from_uri
    if scheme == "sqlite":
        from .sqlite import SQLiteStore
        return SQLiteStore.from_uri
    return None


def open_store(uri: str | Store, **options: Any) -> Store:
    """Open a store from a URI: ``memory://``, ``sqlite:///path/to/file.db`` (see README "Stores").

    A :class:`Store` object is returned as it is.
    """
    if isinstance(uri, Store):
        return uri
    if not isinstance(uri, str) or "://" not in uri:
        raise ConfigurationError(f"store must be a URI like 'sqlite:///sa.db' or a Store, not {uri!r}")
    scheme = urlsplit(uri).scheme.lower()
    factory = _SCHEMES.get(scheme) or _builtin(scheme)
    if factory is None:
        known = sorted({"memory", "sqlite", *_SCHEMES})
        raise ConfigurationError(f"unknown store scheme {scheme!r}; known: {', '.join(known)}")
    return factory(uri, **options)
