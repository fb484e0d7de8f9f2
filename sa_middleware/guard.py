"""The Guard: one decision flow for every request, shared by the ASGI and WSGI middleware and every adapter.

The flow is written once as a generator that yields what it needs: a token verified (:class:`_Verify`, which may
fetch a JWKS), an admission decided by the store (:class:`_Admit`) or a pause (:class:`_Sleep`, for ``lock_wait``);
:meth:`Guard.admit` drives it with blocking calls and :meth:`Guard.aadmit` with awaits, so the two paths cannot
drift apart.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .context import RequestInfo, SAContext
from .denials import Denial
from .errors import ConfigurationError, InvalidToken, StoreError
from .policy import Policy, RouteMatch, RouteTable
from .records import Admission, LockInfo, LockRequest, SessionInfo, Ticket
from .stores.base import Store, open_store
from .tokens import TokenVerifier, VerifiedToken

__all__ = ["Admitted", "Guard", "Outcome"]

log = logging.getLogger("sa_middleware")

_KINDS = frozenset({"human", "service", "agent"})
_MAX_ID = 256
_MAX_GEN = 2**53 - 1  # exact in every store (SQLite integers, Lua doubles)


@dataclass(frozen=True, slots=True)
class Admitted:
    """An admitted request: the view's context and the ticket to release (``None`` on public routes and on
    ``fail_open`` admissions made while the store was unavailable)."""

    context: SAContext
    ticket: Ticket | None


Outcome = Admitted | Denial


@dataclass(frozen=True, slots=True)
class _Verify:
    token: str


@dataclass(frozen=True, slots=True)
class _Admit:
    admission: Admission


@dataclass(frozen=True, slots=True)
class _Sleep:
    seconds: float


_Step = _Verify | _Admit | _Sleep


class _Keeper:
    """Renews the leases of this process's live tickets, in one batched store call every ``lease / 3`` seconds."""

    def __init__(self, store: Store, lease: float) -> None:
        self._store, self._lease = store, lease
        self._live: dict[str, None] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, ticket_id: str) -> None:
        with self._lock:
            self._live[ticket_id] = None
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="sa-middleware-keeper", daemon=True)
                self._thread.start()

    def discard(self, ticket_id: str) -> None:
        with self._lock:
            self._live.pop(ticket_id, None)

    def live(self) -> list[str]:
        with self._lock:
            return list(self._live)

    def stop(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._wake.wait(self._lease / 3):
            ids = self.live()
            if ids:
                try:
                    self._store.renew(ids, self._lease)
                except Exception as exc:  # the next round tries again; leases bound the damage
                    log.warning("sa-middleware: lease renewal failed: %s", exc)


class Guard:
    """Decides every request against the token, the route's policy and the state of all related contexts.

    Keyword arguments are validated here, so a mistake fails at start-up. See README "Guard options".
    """

    def __init__(
        self,
        *,
        store: str | Store = "sqlite:///sa-middleware.db",
        keys: Any = None,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        algorithms: Sequence[str],
        issuer: str | Sequence[str] | None = None,
        audience: str | Sequence[str] | None = None,
        policies: Mapping[str, Policy] | None = None,
        default_policy: Policy | None = None,
        leeway: float = 10.0,
        required_claims: Sequence[str] = ("exp", "iat", "sub"),
        token_type: str | Sequence[str] | None = None,
        max_token_bytes: int = 8192,
        token_cache_size: int = 4096,
        session_idle: float = 900.0,
        lease: float = 30.0,
        kind_claim: str = "sa_kind",
        generation_claim: str = "gen",
        device_claim: str = "device_id",
        realm: str | None = None,
        retry_after: int = 1,
    ) -> None:
        for name, value in (("session_idle", session_idle), ("lease", lease)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigurationError(f"{name} must be a positive, finite number of seconds")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 1:
            raise ConfigurationError("retry_after must be a positive integer of seconds")
        if realm is not None and ('"' in realm or "\\" in realm):
            raise ConfigurationError("realm must not contain quotes or backslashes")
        self.verifier = TokenVerifier(
            keys=keys, jwks=jwks, jwks_url=jwks_url, algorithms=algorithms, issuer=issuer, audience=audience,
            leeway=leeway, required_claims=required_claims, token_type=token_type, max_token_bytes=max_token_bytes,
            cache_size=token_cache_size)
        self.routes = RouteTable(policies, default_policy)
        self.store: Store = open_store(store)
        self.leeway = float(leeway)
        self.session_idle = float(session_idle)
        self.lease = float(lease)
        self.kind_claim = kind_claim
        self.generation_claim = generation_claim
        self.device_claim = device_claim
        self.realm = realm
        self.retry_after = retry_after
        self._keeper = _Keeper(self.store, self.lease)

    # -- the decision flow -----------------------------------------------------------------------------------

    def match(self, request: RequestInfo) -> RouteMatch:
        """The route and policy for a request (adapters pass their own router's match to ``admit`` instead)."""
        return self.routes.match("WEBSOCKET" if request.websocket else request.method, request.path)

    def _flow(self, request: RequestInfo, match: RouteMatch | None) -> Generator[_Step, Any, Outcome]:
        match = match or self.match(request)
        policy = match.policy
        if policy.public:
            return Admitted(SAContext(None, None, None, route=match.route, params=match.params), None)
        raw = self._token(request)
        if raw is None:
            return Denial("missing_token", "this route needs a bearer token")
        if isinstance(raw, InvalidToken):
            return Denial("invalid_token", str(raw))
        token: VerifiedToken | InvalidToken = yield _Verify(raw)
        if isinstance(token, InvalidToken):
            return Denial("invalid_token", str(token))
        try:
            admission, context = self._build(request, match, token)
        except InvalidToken as exc:
            return Denial("invalid_token", str(exc))
        deadline = None
        delay = 0.01
        while True:
            result = yield _Admit(admission)
            if isinstance(result, Ticket):
                self._keeper.add(result.ticket_id)
                ctx = SAContext(context.principal, context.kind, context.session_id, context.claims,
                                result.ticket_id, result.fencing_tokens, match.route, match.params)
                return Admitted(ctx, result)
            if result.code == "store_unavailable" and policy.fail_open and "unexpected" not in result.extra:
                log.warning("sa-middleware: store unavailable; admitting %s %s for %s (fail_open)",
                            request.method, match.route, context.principal)
                return Admitted(context, None)
            if result.code == "object_locked" and policy.on_lock_conflict == "wait":
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + policy.lock_wait
                if now < deadline:
                    yield _Sleep(min(delay, deadline - now))
                    delay = min(delay * 2, 0.25)
                    continue
            return self._challenge(result, admission)

    def _challenge(self, denial: Denial, a: Admission) -> Denial:
        if denial.code == "insufficient_scope":
            return Denial(denial.code, denial.detail, scope=tuple(sorted(a.scopes)))
        if denial.code == "step_up_required":
            return Denial(denial.code, denial.detail, max_age=a.max_auth_age, acr_values=a.acr_values)
        return denial

    def _build(self, request: RequestInfo, match: RouteMatch, token: VerifiedToken) -> tuple[Admission, SAContext]:
        claims = token.claims
        sub = _claim_str(claims, "sub")
        if sub is None:
            raise InvalidToken("missing claim: sub")
        kind = claims.get(self.kind_claim)
        if kind is None:
            client_id = claims.get("client_id", claims.get("azp"))
            kind = "service" if client_id is not None and client_id == sub else "human"
        if not isinstance(kind, str) or kind not in _KINDS:
            raise InvalidToken(f"claim {self.kind_claim} must be one of human, service, agent")
        gen = claims.get(self.generation_claim)
        if gen is not None and (isinstance(gen, bool) or not isinstance(gen, int) or not 0 <= gen <= _MAX_GEN):
            raise InvalidToken(f"claim {self.generation_claim} must be an integer from 0 to 2**53-1")
        jti = _claim_str(claims, "jti")
        session_id = _claim_str(claims, "sid") or jti or token.fingerprint[:32]
        policy = match.policy
        if policy.one_time and jti is None:
            raise InvalidToken("this route accepts one-time tokens only: a jti claim is required")
        act = claims.get("act")
        actor = _claim_str(act, "sub") if isinstance(act, Mapping) else None
        cnf = claims.get("cnf")
        credential = None
        if isinstance(cnf, Mapping):
            credential = _claim_str(cnf, "jkt") or _claim_str(cnf, "x5t#S256")
        scope = claims.get("scope", claims.get("scp"))
        if isinstance(scope, str):
            scopes = frozenset(scope.split())
        elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
            scopes = frozenset(scope)
        else:
            scopes = frozenset()
        auth_time = _number(claims.get("auth_time"))
        if auth_time is not None and auth_time > time.time() + self.leeway:
            raise InvalidToken("auth_time is in the future")
        if "auth_time" in claims and auth_time is None:
            raise InvalidToken("claim auth_time must be a number")
        acr = claims.get("acr")
        admission = Admission(
            ticket_id=uuid.uuid4().hex, sub=sub, kind=kind, session_id=session_id, token_hash=token.fingerprint,
            token_exp=token.expires_at + self.leeway,  # the token is accepted until then
            token_iat=_number(claims.get("iat")), token_gen=gen, jti=jti, actor=actor,
            credential=credential, device=_claim_str(claims, self.device_claim),
            client=request.client, user_agent=request.user_agent,
            route=match.route or request.path[:_MAX_ID], token_scopes=scopes, auth_time=auth_time,
            acr=acr if isinstance(acr, str) else None, scopes=policy.scopes, max_auth_age=policy.max_auth_age,
            acr_values=policy.acr_values, one_time=policy.one_time,
            require_compliant_device=policy.require_compliant_device, max_sessions=policy.max_sessions,
            on_session_limit=policy.on_session_limit, max_in_flight=policy.max_in_flight,
            exclusive=policy.exclusive, tags=policy.tags, conflicts=policy.conflicts,
            raises_risk=policy.raises_risk, risk_window=policy.risk_window, max_risk=policy.max_risk,
            locks=tuple(LockRequest(key, policy.lock_mode) for key in match.lock_keys),
            on_lock_conflict=policy.on_lock_conflict, lease=self.lease, session_idle=self.session_idle)
        return admission, SAContext(sub, kind, session_id, claims, route=match.route, params=match.params)

    def _token(self, request: RequestInfo) -> str | InvalidToken | None:
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        value = value.strip()
        if not value:
            return InvalidToken("empty bearer token")
        return value

    def admit(self, request: RequestInfo, match: RouteMatch | None = None) -> Outcome:
        """Decide a request, blocking (WSGI). Never raises for bad input or a failing store."""
        flow = self._flow(request, match)
        answer: Any = None
        try:
            while True:
                step = flow.send(answer)
                if isinstance(step, _Verify):
                    try:
                        answer = self.verifier.verify(step.token)
                    except InvalidToken as exc:
                        answer = exc
                elif isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    answer = None
                else:
                    answer = self._admit_sync(step.admission)
        except StopIteration as stop:
            outcome: Outcome = stop.value
            return outcome

    async def aadmit(self, request: RequestInfo, match: RouteMatch | None = None) -> Outcome:
        """Decide a request without blocking the event loop (ASGI). Never raises for bad input or a failing store."""
        flow = self._flow(request, match)
        answer: Any = None
        try:
            while True:
                step = flow.send(answer)
                if isinstance(step, _Verify):
                    try:
                        answer = await self.verifier.averify(step.token)
                    except InvalidToken as exc:
                        answer = exc
                elif isinstance(step, _Sleep):
                    await anyio.sleep(step.seconds)
                    answer = None
                else:
                    answer = await self._admit_async(step.admission)
        except StopIteration as stop:
            outcome: Outcome = stop.value
            return outcome

    def _unavailable(self, exc: BaseException) -> Denial:
        extra: dict[str, object] = {}
        if isinstance(exc, StoreError):
            log.warning("sa-middleware: store unavailable: %s", exc)
        else:  # a failure that is not the store's being unreachable: never a reason to fail open
            log.exception("sa-middleware: store failed")
            extra["unexpected"] = True
        return Denial("store_unavailable", "the authorisation store did not answer; try again",
                      retry_after=self.retry_after, extra=extra)

    def _admit_sync(self, admission: Admission) -> Ticket | Denial:
        try:
            return self.store.admit(admission)
        except Exception as exc:  # fail closed: any store failure is a 503, never a 500
            return self._unavailable(exc)

    async def _admit_async(self, admission: Admission) -> Ticket | Denial:
        try:
            return await self.store.aadmit(admission)
        except Exception as exc:  # fail closed: any store failure is a 503, never a 500
            return self._unavailable(exc)

    def release(self, ticket: Ticket | None) -> None:
        """End an admitted request. Safe to call with ``None``; a failure is logged (the lease bounds it)."""
        if ticket is None:
            return
        self._keeper.discard(ticket.ticket_id)
        try:
            self.store.release(ticket.ticket_id)
        except Exception:
            log.warning("sa-middleware: release of ticket %s failed; its lease will expire", ticket.ticket_id,
                        exc_info=True)

    async def arelease(self, ticket: Ticket | None) -> None:
        """Async twin of :meth:`release`."""
        if ticket is None:
            return
        self._keeper.discard(ticket.ticket_id)
        try:
            await self.store.arelease(ticket.ticket_id)
        except Exception:
            log.warning("sa-middleware: release of ticket %s failed; its lease will expire", ticket.ticket_id,
                        exc_info=True)

    def close(self) -> None:
        """Stop the lease keeper and close the store."""
        self._keeper.stop()
        self.store.close()

    # -- operations (contract) ---------------------------------------------------------------------------------

    def rotate(self, sub: str) -> int:
        """Bump ``sub``'s generation: every token of a lower generation is refused from now on."""
        return self.store.rotate(_arg(sub, "sub"))

    def revoke_principal(self, sub: str) -> float:
        """Refuse every token of ``sub`` issued before now (not-before watermark)."""
        return self.store.revoke_principal(_arg(sub, "sub"))

    def revoke_session(self, session_id: str) -> bool:
        """Revoke one session (also one not seen yet)."""
        return self.store.revoke_session(_arg(session_id, "session_id"))

    def report_compromise(self, sub: str | None = None, session_id: str | None = None) -> list[str]:
        """Mark every context related to ``sub`` or ``session_id`` compromised; returns their session ids."""
        return self.store.report_compromise(*_compromise_args(sub, session_id))

    def pause_session(self, session_id: str) -> bool:
        """Pause a session until :meth:`resume_session`."""
        return self.store.pause_session(_arg(session_id, "session_id"))

    def resume_session(self, session_id: str) -> bool:
        """Clear a paused or compromised session (an operator's decision)."""
        return self.store.resume_session(_arg(session_id, "session_id"))

    def set_device_status(self, device_id: str, compliant: bool) -> None:
        """Mark a device compliant or non-compliant."""
        self.store.set_device_status(_arg(device_id, "device_id"), bool(compliant))

    def set_privileges(self, sub: str, scopes: Iterable[str] | None) -> None:
        """Limit the scopes of ``sub``'s tokens issued before now (``None`` lifts the limit)."""
        self.store.set_privileges(_arg(sub, "sub"), _scopes(scopes))

    def sessions(self, sub: str) -> list[SessionInfo]:
        """``sub``'s active sessions with their status."""
        return self.store.sessions(_arg(sub, "sub"), self.session_idle)

    def locks(self) -> list[LockInfo]:
        """Every object lock held now, with its fencing token."""
        return self.store.locks()

    # -- operations of security events (sa_middleware.events; also usable directly) ------------------------------

    def revoke_sessions(self, sub: str, before: float | None = None) -> list[str]:
        """Revoke every session of ``sub`` whose token was issued at or before ``before`` (default, and at most:
        now): they are refused with ``session_revoked``, while a token issued later opens a new session. Returns
        the ids of the stored sessions marked revoked (CAEP ``session-revoked`` for a principal)."""
        return self.store.revoke_sessions(_arg(sub, "sub"), _time(before, "before"))

    def disable_principal(self, sub: str) -> float:
        """Refuse every token of ``sub`` (``token_revoked``) until :meth:`enable_principal`; tokens issued before
        now stay refused after that too (RISC ``account-disabled``). Returns the time of the watermark."""
        return self.store.disable_principal(_arg(sub, "sub"))

    def enable_principal(self, sub: str) -> bool:
        """Undo :meth:`disable_principal`: tokens issued since then are admitted again (RISC ``account-enabled``).
        Returns whether ``sub`` was disabled."""
        return self.store.enable_principal(_arg(sub, "sub"))

    def set_assurance(self, sub: str, level: str | None, at: float | None = None) -> None:
        """Record ``sub``'s current assurance level (an ``acr`` value) as of ``at`` (default, and at most: now):
        for tokens issued before then, step-up (``acr_values``) checks ``level`` instead of the token's ``acr``
        (CAEP ``assurance-level-change``). ``level=None`` forgets it."""
        if level is not None:
            level = _arg(level, "level")
        self.store.set_assurance(_arg(sub, "sub"), level, _time(at, "at"))

    def raise_risk(self, sub: str, amount: int, window: float) -> None:
        """Add ``amount`` to ``sub``'s risk for ``window`` seconds, as an action with ``raises_risk`` would
        (CAEP ``risk-level-change``); routes with ``max_risk`` below it refuse with ``risk_too_high``."""
        self.store.raise_risk(_arg(sub, "sub"), *_risk_args(amount, window))

    async def arevoke_sessions(self, sub: str, before: float | None = None) -> list[str]:
        return await self.store.arevoke_sessions(_arg(sub, "sub"), _time(before, "before"))

    async def adisable_principal(self, sub: str) -> float:
        return await self.store.adisable_principal(_arg(sub, "sub"))

    async def aenable_principal(self, sub: str) -> bool:
        return await self.store.aenable_principal(_arg(sub, "sub"))

    async def aset_assurance(self, sub: str, level: str | None, at: float | None = None) -> None:
        if level is not None:
            level = _arg(level, "level")
        await self.store.aset_assurance(_arg(sub, "sub"), level, _time(at, "at"))

    async def araise_risk(self, sub: str, amount: int, window: float) -> None:
        await self.store.araise_risk(_arg(sub, "sub"), *_risk_args(amount, window))

    async def arotate(self, sub: str) -> int:
        return await self.store.arotate(_arg(sub, "sub"))

    async def arevoke_principal(self, sub: str) -> float:
        return await self.store.arevoke_principal(_arg(sub, "sub"))

    async def arevoke_session(self, session_id: str) -> bool:
        return await self.store.arevoke_session(_arg(session_id, "session_id"))

    async def areport_compromise(self, sub: str | None = None, session_id: str | None = None) -> list[str]:
        return await self.store.areport_compromise(*_compromise_args(sub, session_id))

    async def apause_session(self, session_id: str) -> bool:
        return await self.store.apause_session(_arg(session_id, "session_id"))

    async def aresume_session(self, session_id: str) -> bool:
        return await self.store.aresume_session(_arg(session_id, "session_id"))

    async def aset_device_status(self, device_id: str, compliant: bool) -> None:
        await self.store.aset_device_status(_arg(device_id, "device_id"), bool(compliant))

    async def aset_privileges(self, sub: str, scopes: Iterable[str] | None) -> None:
        await self.store.aset_privileges(_arg(sub, "sub"), _scopes(scopes))

    async def asessions(self, sub: str) -> list[SessionInfo]:
        return await self.store.asessions(_arg(sub, "sub"), self.session_idle)

    async def alocks(self) -> list[LockInfo]:
        return await self.store.alocks()


def _claim_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_ID or not _encodable(value):
        raise InvalidToken(f"claim {name} must be a non-empty string of at most {_MAX_ID} characters")
    return value


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _number(value: Any) -> float | None:
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


def _time(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    number = _number(value)
    if number is None:
        raise ConfigurationError(f"{name} must be a finite number of seconds since the epoch, or None")
    return number


def _risk_args(amount: int, window: float) -> tuple[int, float]:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= _MAX_GEN:
        raise ConfigurationError("amount must be a positive integer")
    number = _number(window)
    if number is None or number <= 0:
        raise ConfigurationError("window must be a positive, finite number of seconds")
    return amount, number


def _compromise_args(sub: str | None, session_id: str | None) -> tuple[str | None, str | None]:
    if sub is None and session_id is None:
        raise ConfigurationError("report_compromise needs sub or session_id")
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

