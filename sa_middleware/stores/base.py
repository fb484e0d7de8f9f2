"""The store interface: sync operations, their async twins, and the URI scheme registry."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio.to_thread

from ..denials import Denial
from ..errors import ConfigurationError
from ..records import Admission, AuditRecord, LockInfo, SessionInfo, Ticket

__all__ = [
    "DEFAULT_AUDIT_MAX_RECORDS", "DEFAULT_AUDIT_RETENTION", "Store", "check_audit_retention", "open_store",
    "register_scheme", "scoped",
]

#: how long audit records are kept (seconds), and how many at most (see the "Operator CLI and audit" page)
DEFAULT_AUDIT_RETENTION = 7 * 86400.0
DEFAULT_AUDIT_MAX_RECORDS = 100_000

P = ParamSpec("P")
R = TypeVar("R")


class Store(abc.ABC):
    """A place where contexts, tickets and locks live. Each admission and each release is one atomic operation.

    Principal state (generation, watermarks, risk, privileges, sessions, tickets, markers) is kept per issuer and
    subject: the operations on a principal take its ``iss`` ("" for tokens without an issuer). Session ids are
    global: a session id held by one principal is refused to every other.

    Every operation has an async twin prefixed with ``a``. The base class runs the sync operation in a worker
    thread so the event loop never waits on I/O; stores with native async clients override the twins.
    """

    #: whether the sync operations are cheap and never wait (then the async twins call them inline)
    inline_async: bool = False
    #: audit records older than this many seconds, or beyond this many (oldest first), are pruned by the store
    audit_retention: float = DEFAULT_AUDIT_RETENTION
    audit_max_records: int = DEFAULT_AUDIT_MAX_RECORDS

    @abc.abstractmethod
    def admit(self, admission: Admission) -> Ticket | Denial:
        """Check the admission against the current state and record it, atomically."""

    @abc.abstractmethod
    def release(self, ticket: Ticket) -> None:
        """End a ticket and free its locks (the ticket names every key it holds)."""

    def release_nowait(self, ticket: Ticket) -> bool:
        """Release without waiting, when this store can from the calling thread: the release is done, or queued to
        be sent with the store's next write. ``False``: nothing was done, the caller awaits :meth:`arelease`. The
        Guard calls it first on the event loop, so a release that needs no wait costs no cancellation shield."""
        if self.inline_async:
            self.release(ticket)
            return True
        return False

    @abc.abstractmethod
    def renew(self, tickets: Sequence[Ticket], lease: float) -> None:
        """Extend the leases of live tickets (and their locks) in one operation; expired ones stay expired."""

    @abc.abstractmethod
    def rotate(self, sub: str, iss: str = "") -> int:
        """Bump the principal's generation; returns the new generation."""

    @abc.abstractmethod
    def revoke_principal(self, sub: str, iss: str = "") -> float:
        """Refuse every token of ``sub`` issued before now; returns the watermark."""

    @abc.abstractmethod
    def revoke_session(self, session_id: str) -> bool:
        """Revoke one session; returns whether it was known."""

    @abc.abstractmethod
    def report_compromise(self, sub: str | None, session_id: str | None, iss: str = "") -> list[str]:
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
    def set_privileges(self, sub: str, scopes: Iterable[str] | None, iss: str = "") -> None:
        """Limit the scopes of tokens issued before now to ``scopes`` (``None`` lifts the limit)."""

    @abc.abstractmethod
    def sessions(self, sub: str, session_idle: float, iss: str = "") -> list[SessionInfo]:
        """The principal's sessions seen within ``session_idle`` seconds, with their status."""

    def issuers(self, sub: str) -> list[str]:
        """The issuers under which the store holds state for ``sub``, sorted ("" stands for tokens without an
        issuer, and for state stored before issuers were recorded)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement issuers")

    @abc.abstractmethod
    def locks(self) -> list[LockInfo]:
        """Every lock held now."""

    # -- operations of security events (sa_middleware.events) ----------------------------------------------------
    # Every store must implement these; the base raises NotImplementedError (rather than declaring them abstract)
    # so a store written before them still opens, and only the security-event features fail on it.

    def revoke_sessions(self, sub: str, before: float | None, iss: str = "") -> list[str]:
        """Revoke every session of ``sub`` whose token was issued at or before ``min(before, now)`` (``None``:
        now): existing sessions created by then are marked revoked, and a token of ``sub`` issued at or before
        that time is refused (``session_revoked``) for any session. Returns the ids of the sessions marked."""
        raise NotImplementedError(f"{type(self).__name__} does not implement revoke_sessions")

    def disable_principal(self, sub: str, iss: str = "") -> float:
        """Refuse every token of ``sub`` (``token_revoked``) until :meth:`enable_principal`, and set the not-before
        watermark to now, so tokens issued before stay refused after that. Returns now."""
        raise NotImplementedError(f"{type(self).__name__} does not implement disable_principal")

    def enable_principal(self, sub: str, iss: str = "") -> bool:
        """Undo :meth:`disable_principal` (the watermark stays); returns whether ``sub`` was disabled."""
        raise NotImplementedError(f"{type(self).__name__} does not implement enable_principal")

    def set_assurance(self, sub: str, level: str | None, at: float | None, iss: str = "") -> None:
        """Record ``sub``'s assurance level as of ``min(at, now)`` (``None``: now): for tokens issued before that
        time, ``level`` replaces the token's ``acr`` in the ``acr_values`` check. ``level=None`` forgets it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement set_assurance")

    def raise_risk(self, sub: str, amount: int, window: float, iss: str = "") -> None:
        """Add ``amount`` to ``sub``'s risk for ``window`` seconds from now (as an admitted ``raises_risk``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement raise_risk")

    def all_sessions(self, session_idle: float, limit: int) -> list[SessionInfo]:
        """The sessions of every principal seen within ``session_idle`` seconds, most recently seen first, at most
        ``limit`` (``sa-middleware sessions`` without a principal, the console, the metrics' session gauge)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement all_sessions")

    def seen_event(self, key: str, ttl: float) -> bool:
        """Record the security event ``key`` for ``ttl`` seconds, atomically; returns True when it was already
        recorded (and not expired): a duplicate."""
        raise NotImplementedError(f"{type(self).__name__} does not implement seen_event")

    def forget_event(self, key: str) -> None:
        """Forget the security event ``key`` (its processing failed; a redelivery must be applied)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forget_event")

    # -- signing keys and generation claims (see docs "Using your identity provider") ---------------------------
    # Like the security-event operations, these raise NotImplementedError in the base so an older store still opens.

    def note_keys(self, drop: str | None) -> int:
        """Ask every Guard sharing this store to refresh its issuer's signing keys (and, with ``drop``, to stop
        trusting that key id); returns the new key-notes generation. Dropped key ids are kept."""
        raise NotImplementedError(f"{type(self).__name__} does not implement note_keys")

    def key_notes(self) -> tuple[int, tuple[str, ...]]:
        """The key-notes generation (0 before any note) and the dropped key ids; one cheap read."""
        raise NotImplementedError(f"{type(self).__name__} does not implement key_notes")

    def note_generation_claims(self, notes: Mapping[tuple[str, str], bool]) -> None:
        """Record, per principal (``(issuer, subject)``), whether its latest token carried a generation claim."""
        raise NotImplementedError(f"{type(self).__name__} does not implement note_generation_claims")

    def generation_claim(self, sub: str, iss: str = "") -> bool | None:
        """Whether ``sub``'s latest recorded token carried a generation claim (None: nothing recorded)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement generation_claim")

    def reset_generation(self, sub: str, iss: str = "") -> int:
        """Set ``sub``'s generation back to 0 (undo :meth:`rotate`); returns the generation it had."""
        raise NotImplementedError(f"{type(self).__name__} does not implement reset_generation")

    def session_owner(self, session_id: str) -> str | None:
        """The principal a stored session belongs to (``None``: unknown). Read by the operations on one session,
        so their audit record names its principal."""
        return None

    # -- the audit trail (see the "Operator CLI and audit" page of the documentation) ----------------------------
    # Like the security-event operations, these raise NotImplementedError in the base so an older store still opens;
    # the Guard then logs once and drops its audit records.

    def configure_audit(self, *, retention: float | None = None, max_records: int | None = None) -> None:
        """Set the audit retention: records older than ``retention`` seconds or beyond the newest ``max_records``
        are pruned (by the store itself, as it writes). ``None`` keeps the current value."""
        check_audit_retention(retention, max_records)
        if retention is not None:
            self.audit_retention = float(retention)
        if max_records is not None:
            self.audit_max_records = max_records

    def record_audit(self, records: Sequence[AuditRecord]) -> None:
        """Append audit records in one operation; a record without ``time`` is stamped with the store's clock.
        Denials, pauses and evictions decided by ``admit`` are recorded by ``admit`` itself, in its transaction."""
        raise NotImplementedError(f"{type(self).__name__} does not implement record_audit")

    def audit(self, *, sub: str | None = None, session_id: str | None = None, code: str | None = None,
              kind: str | None = None, since: float | None = None, until: float | None = None,
              limit: int = 100) -> list[AuditRecord]:
        """The audit records that match every given filter (``since <= time <= until``), newest first, at most
        ``limit``; records past the retention are never returned, even before they are pruned."""
        raise NotImplementedError(f"{type(self).__name__} does not implement audit")

    def has_state(self) -> bool:
        """Whether anything was ever written to this store: read-only tools (``sa-middleware sessions``...) report a
        store that was never used instead of creating it. Stores that cannot tell answer True."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the store's connections."""

    async def _run(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        if self.inline_async:
            return func(*args, **kwargs)
        return await anyio.to_thread.run_sync(lambda: func(*args, **kwargs))

    async def aadmit(self, admission: Admission) -> Ticket | Denial:
        return await self._run(self.admit, admission)

    async def arelease(self, ticket: Ticket) -> None:
        if not self.release_nowait(ticket):
            await self._run(self.release, ticket)

    async def arenew(self, tickets: Sequence[Ticket], lease: float) -> None:
        await self._run(self.renew, tickets, lease)

    async def arotate(self, sub: str, iss: str = "") -> int:
        return await self._run(self.rotate, sub, *scoped(iss))

    async def arevoke_principal(self, sub: str, iss: str = "") -> float:
        return await self._run(self.revoke_principal, sub, *scoped(iss))

    async def arevoke_session(self, session_id: str) -> bool:
        return await self._run(self.revoke_session, session_id)

    async def areport_compromise(self, sub: str | None, session_id: str | None, iss: str = "") -> list[str]:
        return await self._run(self.report_compromise, sub, session_id, *scoped(iss))

    async def apause_session(self, session_id: str) -> bool:
        return await self._run(self.pause_session, session_id)

    async def aresume_session(self, session_id: str) -> bool:
        return await self._run(self.resume_session, session_id)

    async def aset_device_status(self, device_id: str, compliant: bool) -> None:
        await self._run(self.set_device_status, device_id, compliant)

    async def aset_privileges(self, sub: str, scopes: Iterable[str] | None, iss: str = "") -> None:
        await self._run(self.set_privileges, sub, scopes, *scoped(iss))

    async def asessions(self, sub: str, session_idle: float, iss: str = "") -> list[SessionInfo]:
        return await self._run(self.sessions, sub, session_idle, *scoped(iss))

    async def aissuers(self, sub: str) -> list[str]:
        return await self._run(self.issuers, sub)

    async def asession_owner(self, session_id: str) -> str | None:
        return await self._run(self.session_owner, session_id)

    async def alocks(self) -> list[LockInfo]:
        return await self._run(self.locks)

    async def arevoke_sessions(self, sub: str, before: float | None, iss: str = "") -> list[str]:
        return await self._run(self.revoke_sessions, sub, before, *scoped(iss))

    async def adisable_principal(self, sub: str, iss: str = "") -> float:
        return await self._run(self.disable_principal, sub, *scoped(iss))

    async def aenable_principal(self, sub: str, iss: str = "") -> bool:
        return await self._run(self.enable_principal, sub, *scoped(iss))

    async def aset_assurance(self, sub: str, level: str | None, at: float | None, iss: str = "") -> None:
        await self._run(self.set_assurance, sub, level, at, *scoped(iss))

    async def araise_risk(self, sub: str, amount: int, window: float, iss: str = "") -> None:
        await self._run(self.raise_risk, sub, amount, window, *scoped(iss))

    async def aall_sessions(self, session_idle: float, limit: int) -> list[SessionInfo]:
        return await self._run(self.all_sessions, session_idle, limit)

    async def aseen_event(self, key: str, ttl: float) -> bool:
        return await self._run(self.seen_event, key, ttl)

    async def aforget_event(self, key: str) -> None:
        await self._run(self.forget_event, key)

    async def anote_keys(self, drop: str | None) -> int:
        return await self._run(self.note_keys, drop)

    async def akey_notes(self) -> tuple[int, tuple[str, ...]]:
        return await self._run(self.key_notes)

    async def anote_generation_claims(self, notes: Mapping[tuple[str, str], bool]) -> None:
        await self._run(self.note_generation_claims, notes)

    async def ageneration_claim(self, sub: str, iss: str = "") -> bool | None:
        return await self._run(self.generation_claim, sub, iss)

    async def areset_generation(self, sub: str, iss: str = "") -> int:
        return await self._run(self.reset_generation, sub, iss)

    async def arecord_audit(self, records: Sequence[AuditRecord]) -> None:
        await self._run(self.record_audit, records)

    async def aaudit(self, *, sub: str | None = None, session_id: str | None = None, code: str | None = None,
                     kind: str | None = None, since: float | None = None, until: float | None = None,
                     limit: int = 100) -> list[AuditRecord]:
        return await self._run(lambda: self.audit(sub=sub, session_id=session_id, code=code, kind=kind, since=since,
                                                  until=until, limit=limit))

    async def aclose(self) -> None:
        await self._run(self.close)


def scoped(iss: str) -> tuple[str, ...]:
    """The issuer argument of a store operation: left out for the empty issuer, so a store written before issuers
    (whose operations take no ``iss``) keeps working for tokens without one."""
    return (iss,) if iss else ()


def check_audit_retention(retention: float | None, max_records: int | None) -> None:
    """Raise ConfigurationError unless ``retention`` is None or a positive number of seconds and ``max_records``
    None or a positive integer."""
    if retention is not None and (isinstance(retention, bool) or not isinstance(retention, int | float)
                                  or not math.isfinite(retention) or retention <= 0):
        raise ConfigurationError("audit_retention must be a positive, finite number of seconds")
    if max_records is not None and (isinstance(max_records, bool) or not isinstance(max_records, int)
                                    or max_records < 1):
        raise ConfigurationError("audit_max_records must be a positive integer")


_SCHEMES: dict[str, Callable[..., Store]] = {}


def register_scheme(scheme: str, factory: Callable[..., Store]) -> None:
    """Make ``open_store`` understand ``scheme://...`` URIs."""
    _SCHEMES[scheme] = factory


_REDIS_SCHEMES = ("redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")


def _builtin(scheme: str) -> Callable[..., Store] | None:
    if scheme == "memory":
        from .memory import MemoryStore
        return MemoryStore.from_uri
    if scheme == "sqlite":
        from .sqlite import SQLiteStore
        return SQLiteStore.from_uri
    if scheme in _REDIS_SCHEMES:
        try:
            from .redis import RedisStore
        except ImportError as exc:
            raise ConfigurationError(f"{scheme}:// stores need the redis extra: pip install 'sa-middleware[redis]' "
                                     f"({exc})") from exc
        return RedisStore.from_uri
    return None


_AUDIT_OPTIONS = ("audit_retention", "audit_max_records")


def _audit_options(uri: str) -> tuple[str, dict[str, Any]]:
    """Take the audit options (``?audit_retention=604800&audit_max_records=100000``) out of a store URI: every
    store understands them, so they are applied here rather than by each store's own URI parser."""
    base, _, rest = uri.partition("?")
    text, hash_, fragment = rest.partition("#")
    if "audit_" not in text:
        return uri, {}
    query = parse_qsl(text, keep_blank_values=True)
    found = {k: v for k, v in query if k in _AUDIT_OPTIONS}
    options: dict[str, Any] = {}
    try:
        if "audit_retention" in found:
            options["retention"] = float(found["audit_retention"])
        if "audit_max_records" in found:
            options["max_records"] = int(found["audit_max_records"])
    except ValueError:
        raise ConfigurationError("audit_retention must be a number of seconds and audit_max_records an integer") \
            from None
    others = urlencode([(k, v) for k, v in query if k not in _AUDIT_OPTIONS])
    return base + ("?" + others if others else "") + hash_ + fragment, options


def open_store(uri: str | Store, **options: Any) -> Store:
    """Open a store from a URI: ``memory://``, ``sqlite:///path/to/file.db``, ``redis://host:6379/0``,
    ``rediss://``, ``redis+unix://``, ``redis+sentinel://``, ``redis+cluster://`` (see the "Stores" page of the
    documentation). Every URI also takes the audit options ``audit_retention`` (seconds) and ``audit_max_records``.

    A :class:`Store` object is returned as it is.
    """
    if isinstance(uri, Store):
        return uri
    if not isinstance(uri, str) or "://" not in uri:
        raise ConfigurationError(f"store must be a URI like 'sqlite:///sa.db' or a Store, not {uri!r}")
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError as exc:  # e.g. "Invalid IPv6 URL"
        raise ConfigurationError(f"store URI does not parse: {exc}") from None
    uri, audit = _audit_options(uri)
    factory = _SCHEMES.get(scheme) or _builtin(scheme)
    if factory is None:
        known = sorted({"memory", "sqlite", *_REDIS_SCHEMES, *_SCHEMES})
        raise ConfigurationError(f"unknown store scheme {scheme!r}; known: {', '.join(known)}")
    store = factory(uri, **options)
    try:
        store.configure_audit(**audit)
    except ConfigurationError:
        store.close()
        raise
    return store
