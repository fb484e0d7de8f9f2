"""The operations on the shared state, and the audit trail: what operators, the CLI and security events do.

:class:`Operations` needs a store and nothing else (no token keys): ``sa-middleware`` runs it against the store the
applications share, and :class:`~sa_middleware.Guard` inherits it, so ``guard.rotate(sub)`` and
``sa-middleware rotate SUB`` are the same code. Every operation is written to the audit trail with its ``source``
(``operator`` for Python calls unless told otherwise, ``cli``, ``event:<type>`` for security events).

Principal state is kept per issuer and subject. The operations on a principal take ``issuer=``; without it, a
Guard that trusts one issuer uses that one (a Guard that pins none keeps every principal under the empty issuer),
and otherwise the issuer is looked up in the store: the one issuer the subject is known under, else an error that
names the candidates (see docs/issuers-and-sessions.md).
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import threading
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio

from .audit import DEFAULT_AUDIT_BUFFER, AuditBuffer
from .errors import ConfigurationError, IssuerRequired, StoreUnavailable
from .records import AuditRecord, LockInfo, SessionInfo
from .stores.base import Store, check_audit_retention, open_store, scoped
from .stores.forks import afresh_after_fork
from .tokens import _KID_SHAPE

__all__ = ["MAX_AUDIT_LIMIT", "Operations"]

log = logging.getLogger("sa_middleware")

_MAX_ID = 256
_MAX_GEN = 2**53 - 1  # exact in every store (SQLite integers, Lua doubles)
_MAX_SOURCE = 80
_MAX_DETAIL = 512
_FLUSH_BATCH = 1000  # records per store call when the buffer is written
_REFUSED_ALONE = 3  # records refused one by one, none written, after which the store is taken to be failing
#: the most records one ``audit`` query returns
MAX_AUDIT_LIMIT = 10_000
#: seconds an explicit flush waits at most for the flushes started before it (a store call is bounded by its timeout)
_FLUSH_WAIT = 10.0


class _Flushes:
    """The audit flushes of this process still writing, numbered as they start. An explicit flush (``audit()``,
    ``flush_audit()``) waits for those that started before it, so records another thread took from the buffer (the
    keeper's flush, every second) are in the store when it returns; it never waits for a flush that started after
    it, and the keeper waits for nobody."""

    def __init__(self) -> None:
        self._start()
        afresh_after_fork(self, _Flushes._start)  # a parent's thread may have been writing at the fork

    def _start(self) -> None:
        self._cond = threading.Condition()
        self._running: set[int] = set()
        self._next = 0
        self._pid = os.getpid()

    def enter(self) -> int:
        """A thread's flush starts: its number. (A flush on an event loop is not counted: a thread waiting for it
        could be blocking the loop it needs.)"""
        with self._cond:
            self._check_fork()
            number, self._next = self._next, self._next + 1
            self._running.add(number)
            return number

    def mark(self) -> int:
        """The number the next flush would get: the flushes before it are those running now."""
        with self._cond:
            self._check_fork()
            return self._next

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # forked without the fork hooks (uWSGI): the parent's flushes stay there
            self._running, self._pid = set(), os.getpid()

    def leave(self, number: int) -> None:
        with self._cond:
            self._running.discard(number)
            self._cond.notify_all()

    def earlier(self, number: int) -> bool:
        """Whether a thread's flush started before ``number`` is still writing."""
        with self._cond:
            return any(n < number for n in self._running)

    def wait(self, number: int) -> None:
        """Until every flush started before flush ``number`` has finished (at most :data:`_FLUSH_WAIT` s)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self.earlier(number), timeout=_FLUSH_WAIT):
                _still_writing()

    async def await_earlier(self, number: int) -> None:
        """:meth:`wait` on an event loop: polled, so it never holds a worker thread and can be cancelled."""
        deadline = time.monotonic() + _FLUSH_WAIT
        while self.earlier(number):
            if time.monotonic() >= deadline:
                _still_writing()
                return
            await anyio.sleep(0.002)


def _still_writing() -> None:
    log.warning("sa-middleware: an audit flush of another thread is still writing after %ss; the records it holds "
                "may be missing from this answer", _FLUSH_WAIT)


class Operations:
    """The operations of the Guard on a store alone: ``Operations("sqlite:///sa.db").rotate("svc-billing")``.

    ``session_idle`` is what :meth:`sessions` counts as active; ``audit_retention`` (seconds) and
    ``audit_max_records`` override the store's audit retention (default 7 days and 100,000 records);
    ``audit_buffer`` bounds the records this process holds while the store cannot take them; ``source`` is the
    audit source of operations called without one. ``issuer`` is the issuer of the principals named without one
    (default: looked up in the store, see the module docstring).
    """

    #: what to tell a caller who must name the issuer (the CLI says ``--issuer``)
    issuer_hint = "issuer="

    def __init__(self, store: str | Store = "sqlite:///sa-middleware.db", *, session_idle: float = 900.0,
                 audit_retention: float | None = None, audit_max_records: int | None = None,
                 audit_buffer: int = DEFAULT_AUDIT_BUFFER, source: str = "operator", issuer: str | None = None) -> None:
        if isinstance(session_idle, bool) or not isinstance(session_idle, int | float) \
                or not math.isfinite(session_idle) or session_idle <= 0:
            raise ConfigurationError("session_idle must be a positive, finite number of seconds")
        check_audit_retention(audit_retention, audit_max_records)
        self.source = _source(source)
        #: the issuers a principal named without one may belong to (None: any the store knows)
        self.issuers: tuple[str, ...] | None = None if issuer is None else (_issuer(issuer),)
        self._audit = AuditBuffer(audit_buffer)
        self._flushing = _Flushes()
        self._audit_unsupported = False
        self.store: Store = open_store(store)
        self.store.configure_audit(retention=audit_retention, max_records=audit_max_records)
        self.session_idle = float(session_idle)
        #: who makes the operations and why (``sa-middleware --actor/--reason``): added to each operation's audit
        #: detail, e.g. ``generation 3; by alice@ops-1: key leaked``
        self.actor: str | None = None
        self.reason: str | None = None

    def close(self) -> None:
        """Write what the audit buffer holds (best effort) and close the store."""
        self.flush_audit()
        self.store.close()

    # -- the audit trail ---------------------------------------------------------------------------------------

    def audit(self, sub: str | None = None, session_id: str | None = None, code: str | None = None,
              since: float | datetime | None = None, until: float | datetime | None = None, limit: int = 100, *,
              kind: str | None = None) -> list[AuditRecord]:
        """The audit records matching every filter given (``since <= time <= until``, seconds since the epoch or
        datetimes), newest first, at most ``limit``. This process's buffered records are written first."""
        query = _audit_query(sub, session_id, code, since, until, limit, kind)
        self.flush_audit()
        return self.store.audit(**query)

    async def aaudit(self, sub: str | None = None, session_id: str | None = None, code: str | None = None,
                     since: float | datetime | None = None, until: float | datetime | None = None, limit: int = 100,
                     *, kind: str | None = None) -> list[AuditRecord]:
        query = _audit_query(sub, session_id, code, since, until, limit, kind)
        await self.aflush_audit()
        return await self.store.aaudit(**query)

    def flush_audit(self) -> int:
        """Write the buffered audit records now (the Guard's keeper does it every second); returns how many were
        written. A failing store keeps them buffered for the next flush; a record the store refuses (not because it
        is down) is written escaped, or dropped and counted: it never holds back the records after it. Returns
        once the flushes other threads started before it (which may hold records taken earlier) have finished."""
        return self._flush_audit(wait=True)

    def _flush_audit(self, wait: bool) -> int:
        number = self._flushing.enter()
        try:
            written = self._write_audit()
        finally:
            self._flushing.leave(number)
        if wait:
            self._flushing.wait(number)
        return written

    def _write_audit(self) -> int:
        flow = self._flush()
        error: Exception | None = None
        try:
            while True:
                batch = flow.send(error)
                try:
                    self.store.record_audit(batch)
                    error = None
                except Exception as exc:
                    error = exc
        except StopIteration as stop:
            written: int = stop.value
            return written

    async def aflush_audit(self) -> int:
        """Async twin of :meth:`flush_audit`."""
        number = self._flushing.mark()
        written = await self._awrite_audit()
        await self._flushing.await_earlier(number)
        return written

    async def _awrite_audit(self) -> int:
        flow = self._flush()
        error: Exception | None = None
        try:
            while True:
                batch = flow.send(error)
                try:
                    await self.store.arecord_audit(batch)
                    error = None
                except Exception as exc:
                    error = exc
        except StopIteration as stop:
            written: int = stop.value
            return written

    def _flush(self) -> Generator[list[AuditRecord], Exception | None, int]:
        """The batches to write (the driver sends back what each write raised, or None). A batch the store refuses
        for another reason than being unavailable is tried again with its text escaped to ASCII, then record by
        record. Records refused alone while others of the flush were written are bad records: dropped and counted
        in an ``audit_dropped`` record. When nothing could be written (the store refuses everything, or is down),
        every record is kept for the next round."""
        records = self._audit.take()
        todo = [(records[i:i + _FLUSH_BATCH], 0) for i in range(0, len(records), _FLUSH_BATCH)]
        written = 0
        refused: list[AuditRecord] = []
        error: Exception | None = None
        while todo:
            batch, tries = todo.pop(0)
            error = yield batch
            if error is None:
                written += len(batch)
            elif isinstance(error, NotImplementedError):
                self._unsupported()
                return written
            elif not isinstance(error, StoreUnavailable) and tries == 0:
                todo.insert(0, ([_escaped(record) for record in batch], 1))
            elif not isinstance(error, StoreUnavailable) and tries == 1 and len(batch) > 1:
                todo[0:0] = [([record], 2) for record in batch]
            else:
                down = isinstance(error, StoreUnavailable)
                if not down:
                    refused.extend(batch)
                if down or (written == 0 and len(refused) >= _REFUSED_ALONE):  # the store fails, not the records
                    left = (batch if down else []) + [record for pending, _ in todo for record in pending] + refused
                    self._audit.give_back(left)
                    log.warning("sa-middleware: audit records not written (%d kept for the next try): %s", len(left),
                                error)
                    return written
        if refused and written == 0:  # nothing to tell a bad record from a failing store: keep them
            self._audit.give_back(refused)
            log.warning("sa-middleware: audit records not written (%d kept for the next try): %s", len(refused), error)
        elif refused:
            reason = _escaped_text(f"{type(error).__name__}: {error}")[:200]
            log.warning("sa-middleware: the store refused %d audit records; dropped: %s", len(refused), reason)
            many = len(refused) != 1
            note = AuditRecord("change", "audit_dropped", "middleware", time=time.time(), detail=(
                f"{len(refused)} audit record{'s' if many else ''} dropped: the store refused "
                f"{'them' if many else 'it'}, even escaped ({reason})"))
            if (yield [note]) is None:
                written += 1
        return written

    def _buffer(self, record: AuditRecord) -> None:
        """Keep a record for the next flush (subclasses start their flusher here)."""
        self._audit.add(record)

    def _unsupported(self) -> None:
        if not self._audit_unsupported:
            self._audit_unsupported = True
            log.warning("sa-middleware: %s keeps no audit trail (record_audit not implemented); audit records are "
                        "dropped", type(self.store).__name__)

    def _operation(self, code: str, source: str | None, sub: str | None = None, session_id: str | None = None,
                   detail: str = "", iss: str = "") -> AuditRecord:
        if iss and self.issuers != (iss,):  # the issuer, unless it is the only one here
            detail = f"{detail}; issuer {iss}" if detail else f"issuer {iss}"
        if self.actor or self.reason:
            detail += f"; by {self.actor or 'unknown'}" + (f": {self.reason}" if self.reason else "")
        return AuditRecord("operation", code, self.source if source is None else _source(source), sub, session_id,
                           None, detail[:_MAX_DETAIL])

    # -- issuers -----------------------------------------------------------------------------------------------

    def issuer_of(self, sub: str, issuer: str | None = None, *, known: bool = True) -> str:
        """The issuer of the principal ``sub``: ``issuer`` when given, else this object's one issuer, else the one
        issuer the store knows ``sub`` under. Raises IssuerRequired when that is ambiguous, or (``known``) when
        the store knows ``sub`` under none of the candidates; with ``known=False`` (listings) that is "".
        A named ``issuer`` for a change, unless it is one of this object's issuers, is refused when the store knows
        ``sub`` under other issuers only (a typo, a missing trailing slash: the change would reach no token)."""
        if issuer is not None:
            iss = _issuer(issuer)
            if not known or (self.issuers is not None and iss in self.issuers):
                return iss
            try:
                named = self.store.issuers(_arg(sub, "sub"))
            except NotImplementedError:
                named = []
            return _named_issuer(sub, iss, named, self.issuer_hint)
        if self.issuers is not None and len(self.issuers) == 1:
            return self.issuers[0]
        sub = _arg(sub, "sub")
        try:
            found = self.store.issuers(sub)
        except NotImplementedError:  # a store written before issuers
            found = []
        return self._pick_issuer(sub, found, known)

    async def aissuer_of(self, sub: str, issuer: str | None = None, *, known: bool = True) -> str:
        """Async twin of :meth:`issuer_of`."""
        if issuer is not None:
            iss = _issuer(issuer)
            if not known or (self.issuers is not None and iss in self.issuers):
                return iss
            try:
                named = await self.store.aissuers(_arg(sub, "sub"))
            except NotImplementedError:
                named = []
            return _named_issuer(sub, iss, named, self.issuer_hint)
        if self.issuers is not None and len(self.issuers) == 1:
            return self.issuers[0]
        sub = _arg(sub, "sub")
        try:
            found = await self.store.aissuers(sub)
        except NotImplementedError:
            found = []
        return self._pick_issuer(sub, found, known)

    def _pick_issuer(self, sub: str, found: list[str], known: bool) -> str:
        if self.issuers is not None:
            found = [x for x in found if x in self.issuers]
        elif len(found) > 1 and "" in found:  # state stored before issuers: every issuer's principal inherits it
            found = [x for x in found if x]
        if len(found) == 1:
            return found[0]
        hint = self.issuer_hint
        if found:
            raise IssuerRequired(f"ambiguous: subject {sub} is known under issuers "
                                 f"{', '.join(repr(x) for x in found)}; pass {hint}")
        if not known:
            return ""
        raise IssuerRequired(f"subject {sub} is not known to the store under "
                             f"{'any issuer' if self.issuers is None else 'the issuers trusted here'}; pass "
                             f"{hint} (the empty string for tokens without an issuer)")

    def _note(self, record: AuditRecord) -> None:
        """Write an operation's record at once; if the store fails now, buffer it."""
        try:
            self.store.record_audit([record])
        except NotImplementedError:
            self._unsupported()
        except Exception as exc:
            log.warning("sa-middleware: audit record of %s buffered: %s", record.code, exc)
            self._buffer(record)

    async def _anote(self, record: AuditRecord) -> None:
        try:
            await self.store.arecord_audit([record])
        except NotImplementedError:
            self._unsupported()
        except Exception as exc:
            log.warning("sa-middleware: audit record of %s buffered: %s", record.code, exc)
            self._buffer(record)

    # -- operations (contract) ---------------------------------------------------------------------------------

    def rotate(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> int:
        """Bump ``sub``'s generation: every token of a lower generation is refused from now on. When ``sub``'s
        latest token carried no generation claim, this logs :meth:`rotation_warning` (a new token will not help:
        use :meth:`revoke_principal`, and undo this with :meth:`reset_generation`)."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        generation = self.store.rotate(sub, *scoped(iss))
        self._note(self._operation("rotate", source, sub, detail=f"generation {generation}", iss=iss))
        warning = self.rotation_warning(sub, issuer=iss)
        if warning:
            log.warning("sa-middleware: %s", warning)
        return generation

    def rotation_warning(self, sub: str, *, issuer: str | None = None) -> str | None:
        """A warning when rotating ``sub`` refuses its tokens for good: its latest token carried no generation
        claim (its issuer sends none). None when its tokens carry one, or none was seen yet."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer, known=False)
        try:
            present = self.store.generation_claim(sub, *scoped(iss))
        except NotImplementedError:
            return None
        return None if present is not False else _no_generation(sub, iss)

    async def arotation_warning(self, sub: str, *, issuer: str | None = None) -> str | None:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer, known=False)
        try:
            present = await self.store.ageneration_claim(sub, *scoped(iss))
        except NotImplementedError:
            return None
        return None if present is not False else _no_generation(sub, iss)

    def reset_generation(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> int:
        """Undo :meth:`rotate`: set ``sub``'s generation back to 0, so tokens without a generation claim (and of
        any generation) are admitted again. Returns the generation it had."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        previous = self.store.reset_generation(sub, *scoped(iss))
        self._note(self._operation("reset_generation", source, sub, detail=f"generation {previous} -> 0", iss=iss))
        return previous

    async def areset_generation(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> int:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        previous = await self.store.areset_generation(sub, *scoped(iss))
        await self._anote(self._operation("reset_generation", source, sub, detail=f"generation {previous} -> 0",
                                          iss=iss))
        return previous

    def refresh_keys(self, *, source: str | None = None) -> None:
        """Ask every Guard sharing the store to fetch its issuer's signing keys (JWK set) now; they do within
        a few seconds."""
        self.store.note_keys(None)
        self._note(self._operation("refresh_keys", source, detail="signing keys refresh asked"))

    async def arefresh_keys(self, *, source: str | None = None) -> None:
        await self.store.anote_keys(None)
        await self._anote(self._operation("refresh_keys", source, detail="signing keys refresh asked"))

    def drop_key(self, kid: str, *, source: str | None = None) -> None:
        """Ask every Guard sharing the store to stop trusting the signing key ``kid`` (and forget the tokens it
        verified) within a few seconds, even while the issuer still publishes it; Guards started later refuse it
        too."""
        self.store.note_keys(_kid(kid))
        self._note(self._operation("drop_key", source, detail=f"signing key {kid} dropped"))

    async def adrop_key(self, kid: str, *, source: str | None = None) -> None:
        await self.store.anote_keys(_kid(kid))
        await self._anote(self._operation("drop_key", source, detail=f"signing key {kid} dropped"))

    def revoke_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> float:
        """Refuse every token of ``sub`` issued before now (not-before watermark)."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        watermark = self.store.revoke_principal(sub, *scoped(iss))
        self._note(self._operation("revoke_principal", source, sub, detail=_watermark(watermark), iss=iss))
        return watermark

    def revoke_session(self, session_id: str, *, source: str | None = None) -> bool:
        """Revoke one session (also one not seen yet)."""
        known = self.store.revoke_session(_arg(session_id, "session_id"))
        self._note(self._operation("revoke_session", source, self._owner(session_id), session_id,
                                   detail=_revoked(known)))
        return known

    def report_compromise(self, sub: str | None = None, session_id: str | None = None, *,
                          issuer: str | None = None, source: str | None = None) -> list[str]:
        """Mark every context related to ``sub`` or ``session_id`` compromised; returns their session ids. A
        session alone names its own principal (and issuer)."""
        args = _compromise_args(sub, session_id, issuer)
        iss = "" if sub is None else self.issuer_of(sub, issuer)
        marked = self.store.report_compromise(*args, *scoped(iss))
        owner = args[0] or self._owner(args[1])
        self._note(self._operation("report_compromise", source, owner, args[1], detail=_marked("compromised", marked),
                                   iss=iss))
        return marked

    def pause_session(self, session_id: str, *, source: str | None = None) -> bool:
        """Pause a session until :meth:`resume_session`."""
        paused = self.store.pause_session(_arg(session_id, "session_id"))
        self._note(self._operation("pause_session", source, self._owner(session_id), session_id,
                                   detail=_paused(paused)))
        return paused

    def resume_session(self, session_id: str, *, source: str | None = None) -> bool:
        """Clear a paused or compromised session (an operator's decision)."""
        resumed = self.store.resume_session(_arg(session_id, "session_id"))
        self._note(self._operation("resume_session", source, self._owner(session_id), session_id,
                                   detail=_resumed(resumed)))
        return resumed

    def set_device_status(self, device_id: str, compliant: bool, *, source: str | None = None) -> None:
        """Mark a device compliant or non-compliant."""
        self.store.set_device_status(_arg(device_id, "device_id"), bool(compliant))
        self._note(self._operation("set_device_status", source, detail=_device(device_id, compliant)))

    def set_privileges(self, sub: str, scopes: Iterable[str] | None, *, issuer: str | None = None,
                       source: str | None = None) -> None:
        """Limit the scopes of ``sub``'s tokens issued before now (``None`` lifts the limit)."""
        values = _scopes(scopes)
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        self.store.set_privileges(sub, values, *scoped(iss))
        self._note(self._operation("set_privileges", source, sub, detail=_privileges(values), iss=iss))

    def sessions(self, sub: str, *, issuer: str | None = None) -> list[SessionInfo]:
        """``sub``'s active sessions with their status."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer, known=False)
        return self.store.sessions(sub, self.session_idle, *scoped(iss))

    def all_sessions(self, limit: int = 100) -> list[SessionInfo]:
        """Every principal's active sessions, most recently seen first, at most ``limit`` (1 to 10,000)."""
        return self.store.all_sessions(self.session_idle, _limit(limit))

    def _owner(self, session_id: str | None) -> str | None:
        """The principal of a stored session, for the audit record of an operation on it (best effort)."""
        if session_id is None:
            return None
        try:
            return self.store.session_owner(session_id)
        except Exception:  # the operation itself succeeded; its record just names no principal
            return None

    async def _aowner(self, session_id: str | None) -> str | None:
        if session_id is None:
            return None
        try:
            return await self.store.asession_owner(session_id)
        except Exception:
            return None

    def locks(self) -> list[LockInfo]:
        """Every object lock held now, with its fencing token."""
        return self.store.locks()

    # -- operations of security events (sa_middleware.events; also usable directly) ------------------------------

    def revoke_sessions(self, sub: str, before: float | None = None, *, issuer: str | None = None,
                        source: str | None = None) -> list[str]:
        """Revoke every session of ``sub`` whose token was issued at or before ``before`` (default, and at most:
        now): they are refused with ``session_revoked``, while a token issued later opens a new session. Returns
        the ids of the stored sessions marked revoked (CAEP ``session-revoked`` for a principal)."""
        when = _time(before, "before")
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        marked = self.store.revoke_sessions(sub, when, *scoped(iss))
        self._note(self._operation("revoke_sessions", source, sub, detail=_marked("revoked", marked, before),
                                   iss=iss))
        return marked

    def disable_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> float:
        """Refuse every token of ``sub`` (``token_revoked``) until :meth:`enable_principal`; tokens issued before
        now stay refused after that too (RISC ``account-disabled``). Returns the time of the watermark."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        watermark = self.store.disable_principal(sub, *scoped(iss))
        self._note(self._operation("disable_principal", source, sub, detail="disabled; " + _watermark(watermark),
                                   iss=iss))
        return watermark

    def enable_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> bool:
        """Undo :meth:`disable_principal`: tokens issued since then are admitted again (RISC ``account-enabled``).
        Returns whether ``sub`` was disabled."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        enabled = self.store.enable_principal(sub, *scoped(iss))
        self._note(self._operation("enable_principal", source, sub,
                                   detail="enabled" if enabled else "was not disabled", iss=iss))
        return enabled

    def set_assurance(self, sub: str, level: str | None, at: float | None = None, *, issuer: str | None = None,
                      source: str | None = None) -> None:
        """Record ``sub``'s current assurance level (an ``acr`` value) as of ``at`` (default, and at most: now):
        for tokens issued before then, step-up (``acr_values``) checks ``level`` instead of the token's ``acr``
        (CAEP ``assurance-level-change``). ``level=None`` forgets it."""
        if level is not None:
            level = _arg(level, "level")
        when = _time(at, "at")
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        self.store.set_assurance(sub, level, when, *scoped(iss))
        self._note(self._operation("set_assurance", source, sub, detail=_assurance(level), iss=iss))

    def raise_risk(self, sub: str, amount: int, window: float, *, issuer: str | None = None,
                   source: str | None = None) -> None:
        """Add ``amount`` to ``sub``'s risk for ``window`` seconds, as an action with ``raises_risk`` would
        (CAEP ``risk-level-change``); routes with ``max_risk`` below it refuse with ``risk_too_high``."""
        args = _risk_args(amount, window)
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        self.store.raise_risk(sub, *args, *scoped(iss))
        self._note(self._operation("raise_risk", source, sub, detail=_risk(*args), iss=iss))

    # -- async twins -------------------------------------------------------------------------------------------

    async def arevoke_sessions(self, sub: str, before: float | None = None, *, issuer: str | None = None,
                               source: str | None = None) -> list[str]:
        when = _time(before, "before")
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        marked = await self.store.arevoke_sessions(sub, when, *scoped(iss))
        await self._anote(self._operation("revoke_sessions", source, sub, detail=_marked("revoked", marked, before),
                                          iss=iss))
        return marked

    async def adisable_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> float:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        watermark = await self.store.adisable_principal(sub, *scoped(iss))
        await self._anote(self._operation("disable_principal", source, sub,
                                          detail="disabled; " + _watermark(watermark), iss=iss))
        return watermark

    async def aenable_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> bool:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        enabled = await self.store.aenable_principal(sub, *scoped(iss))
        await self._anote(self._operation("enable_principal", source, sub,
                                          detail="enabled" if enabled else "was not disabled", iss=iss))
        return enabled

    async def aset_assurance(self, sub: str, level: str | None, at: float | None = None, *,
                             issuer: str | None = None, source: str | None = None) -> None:
        if level is not None:
            level = _arg(level, "level")
        when = _time(at, "at")
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        await self.store.aset_assurance(sub, level, when, *scoped(iss))
        await self._anote(self._operation("set_assurance", source, sub, detail=_assurance(level), iss=iss))

    async def araise_risk(self, sub: str, amount: int, window: float, *, issuer: str | None = None,
                          source: str | None = None) -> None:
        args = _risk_args(amount, window)
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        await self.store.araise_risk(sub, *args, *scoped(iss))
        await self._anote(self._operation("raise_risk", source, sub, detail=_risk(*args), iss=iss))

    async def arotate(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> int:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        generation = await self.store.arotate(sub, *scoped(iss))
        await self._anote(self._operation("rotate", source, sub, detail=f"generation {generation}", iss=iss))
        warning = await self.arotation_warning(sub, issuer=iss)
        if warning:
            log.warning("sa-middleware: %s", warning)
        return generation

    async def arevoke_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> float:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        watermark = await self.store.arevoke_principal(sub, *scoped(iss))
        await self._anote(self._operation("revoke_principal", source, sub, detail=_watermark(watermark), iss=iss))
        return watermark

    async def arevoke_session(self, session_id: str, *, source: str | None = None) -> bool:
        known = await self.store.arevoke_session(_arg(session_id, "session_id"))
        await self._anote(self._operation("revoke_session", source, await self._aowner(session_id), session_id,
                                          detail=_revoked(known)))
        return known

    async def areport_compromise(self, sub: str | None = None, session_id: str | None = None, *,
                                 issuer: str | None = None, source: str | None = None) -> list[str]:
        args = _compromise_args(sub, session_id, issuer)
        iss = "" if sub is None else await self.aissuer_of(sub, issuer)
        marked = await self.store.areport_compromise(*args, *scoped(iss))
        owner = args[0] or await self._aowner(args[1])
        await self._anote(self._operation("report_compromise", source, owner, args[1],
                                          detail=_marked("compromised", marked), iss=iss))
        return marked

    async def apause_session(self, session_id: str, *, source: str | None = None) -> bool:
        paused = await self.store.apause_session(_arg(session_id, "session_id"))
        await self._anote(self._operation("pause_session", source, await self._aowner(session_id), session_id,
                                          detail=_paused(paused)))
        return paused

    async def aresume_session(self, session_id: str, *, source: str | None = None) -> bool:
        resumed = await self.store.aresume_session(_arg(session_id, "session_id"))
        await self._anote(self._operation("resume_session", source, await self._aowner(session_id), session_id,
                                          detail=_resumed(resumed)))
        return resumed

    async def aset_device_status(self, device_id: str, compliant: bool, *, source: str | None = None) -> None:
        await self.store.aset_device_status(_arg(device_id, "device_id"), bool(compliant))
        await self._anote(self._operation("set_device_status", source, detail=_device(device_id, compliant)))

    async def aset_privileges(self, sub: str, scopes: Iterable[str] | None, *, issuer: str | None = None,
                              source: str | None = None) -> None:
        values = _scopes(scopes)
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        await self.store.aset_privileges(sub, values, *scoped(iss))
        await self._anote(self._operation("set_privileges", source, sub, detail=_privileges(values), iss=iss))

    async def asessions(self, sub: str, *, issuer: str | None = None) -> list[SessionInfo]:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer, known=False)
        return await self.store.asessions(sub, self.session_idle, *scoped(iss))

    async def alocks(self) -> list[LockInfo]:
        return await self.store.alocks()

    async def aall_sessions(self, limit: int = 100) -> list[SessionInfo]:
        return await self.store.aall_sessions(self.session_idle, _limit(limit))


# -- argument checks -------------------------------------------------------------------------------------------


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite JSON number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _arg(value: str, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_ID:
        raise ConfigurationError(f"{name} must be a non-empty string of at most {_MAX_ID} characters")
    return value


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise ConfigurationError(f"limit must be an integer from 1 to {MAX_AUDIT_LIMIT}")
    return limit


def _kid(value: str) -> str:
    if not isinstance(value, str) or not _KID_SHAPE.fullmatch(value):
        raise ConfigurationError("a key id is 1..128 characters of [A-Za-z0-9._:-]")
    return value


def _no_generation(sub: str, iss: str = "") -> str:
    named = f"--issuer {shlex.quote(iss)} " if iss else ""  # one subject may be known under several issuers
    return (f"{sub}: its latest token carried no generation claim, so every token of {sub} is refused "
            "(stale_generation) and a new token from the same issuer will not help; undo with "
            f"reset_generation (sa-middleware rotate --reset {named}-- {shlex.quote(sub)}) and use revoke_principal "
            f"(sa-middleware revoke {named}{'-- ' if sub.startswith('-') else ''}{shlex.quote(sub)}) instead")


_MAX_ISSUER = 2048


def _issuer(value: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_ISSUER:
        raise ConfigurationError(f"issuer must be a string of at most {_MAX_ISSUER} characters (\"\" for tokens "
                                 "without an issuer)")
    return value


def _named_issuer(sub: str, issuer: str, found: list[str], hint: str) -> str:
    """``issuer``, unless the store knows ``sub`` under other issuers only (then the change would reach no token;
    "", tokens without an issuer, is never a misspelling)."""
    if issuer and issuer not in found and any(found):
        raise IssuerRequired(f"subject {sub} is not known under issuer {issuer!r}, only under "
                             f"{', '.join(repr(x) for x in found if x)}; nothing was changed (check the spelling of "
                             f"{hint}, e.g. a trailing slash)")
    return issuer


def _time(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    number = finite_number(value)
    if number is None:
        raise ConfigurationError(f"{name} must be a finite number of seconds since the epoch, or None")
    return number


def _risk_args(amount: int, window: float) -> tuple[int, float]:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= _MAX_GEN:
        raise ConfigurationError("amount must be a positive integer")
    number = finite_number(window)
    if number is None or number <= 0:
        raise ConfigurationError("window must be a positive, finite number of seconds")
    return amount, number


def _compromise_args(sub: str | None, session_id: str | None,
                     issuer: str | None = None) -> tuple[str | None, str | None]:
    if sub is None and session_id is None:
        raise ConfigurationError("report_compromise needs sub or session_id")
    if sub is None and issuer is not None:
        raise ConfigurationError("issuer names the issuer of sub; a session names its own principal")
    return (None if sub is None else _arg(sub, "sub"),
            None if session_id is None else _arg(session_id, "session_id"))


def _scopes(scopes: Iterable[str] | None) -> list[str] | None:
    if scopes is None:
        return None
    if isinstance(scopes, str):
        scopes = scopes.split()
    result = list(scopes)
    if not all(isinstance(s, str) and s for s in result):
        raise ConfigurationError("scopes must be non-empty strings")
    return result


def _source(value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_SOURCE:
        raise ConfigurationError(f"source must be a non-empty string of at most {_MAX_SOURCE} characters")
    return value


def _when(value: float | datetime | None, name: str) -> float | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigurationError(f"{name} must be an aware datetime (with a time zone)")
        return value.timestamp()
    return _time(value, name)


def _audit_query(sub: str | None, session_id: str | None, code: str | None, since: float | datetime | None,
                 until: float | datetime | None, limit: int, kind: str | None) -> dict[str, Any]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise ConfigurationError(f"limit must be an integer from 1 to {MAX_AUDIT_LIMIT}")
    return {"sub": None if sub is None else _arg(sub, "sub"),
            "session_id": None if session_id is None else _arg(session_id, "session_id"),
            "code": None if code is None else _arg(code, "code"),
            "kind": None if kind is None else _arg(kind, "kind"),
            "since": _when(since, "since"), "until": _when(until, "until"), "limit": limit}


# -- audit details ---------------------------------------------------------------------------------------------


def _escaped_text(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _escaped(record: AuditRecord) -> AuditRecord:
    """``record`` with every text escaped to ASCII (``\\u202e``): what a store refused once, tried again."""
    def text(value: str | None) -> str | None:
        return None if value is None else _escaped_text(value)
    return replace(record, code=_escaped_text(record.code), source=_escaped_text(record.source), sub=text(record.sub),
                   session_id=text(record.session_id), route=text(record.route), detail=_escaped_text(record.detail))


def iso(seconds: float) -> str:
    """A timestamp as ISO 8601 UTC with milliseconds, e.g. ``2025-11-28T19:56:01.250Z``."""
    try:
        text = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):  # beyond what datetime can show
        return f"{seconds:.3f}"
    return text.replace("+00:00", "Z")


def _watermark(at: float) -> str:
    return f"tokens issued before {iso(at)} refused"


def _revoked(known: bool) -> str:
    return "revoked" if known else "revoked before it was seen (remembered for 24 h)"


def _paused(paused: bool) -> str:
    return "paused" if paused else "not paused: unknown, revoked or compromised"


def _resumed(resumed: bool) -> str:
    return "resumed" if resumed else "nothing to resume: not paused or compromised"


def _device(device_id: str, compliant: bool) -> str:
    return f"device {device_id}: {'compliant' if compliant else 'non-compliant'}"


def _privileges(scopes: Sequence[str] | None) -> str:
    if scopes is None:
        return "scope limit lifted"
    return f"scopes of older tokens limited to: {' '.join(sorted(set(scopes)))}" if scopes else \
        "every scope of older tokens withdrawn"


def _assurance(level: str | None) -> str:
    return f"assurance level {level}" if level is not None else "assurance level forgotten"


def _risk(amount: int, window: float) -> str:
    return f"risk +{amount} for {window:g} s"


def _marked(what: str, ids: Sequence[str], before: float | None = None) -> str:
    shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    head = f"tokens issued by {iso(before)}; " if before is not None else ""
    noun = "session" if len(ids) == 1 else "sessions"
    return head + (f"{len(ids)} {noun} {what}: {shown}" if ids else f"no stored session {what}")
