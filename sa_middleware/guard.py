"""The Guard: one decision flow for every request, shared by the ASGI and WSGI middleware and every adapter.

The flow is written once as a generator that yields what it needs: a token verified (:class:`_Verify`, which may
fetch a JWKS), an admission decided by the store (:class:`_Admit`), a pause (:class:`_Sleep`, for ``lock_wait``) or
a compromise reported after a ``token_reuse`` denial (:class:`_Report`, with ``reuse_is_compromise``);
:meth:`Guard.admit` drives it with blocking calls and :meth:`Guard.aadmit` with awaits, so the two paths cannot
drift apart. Sender-constrained tokens (DPoP, mTLS) are checked by :mod:`sa_middleware.dpop`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import anyio

from .claims import (
    DEFAULT_KIND_RULES,
    DEFAULT_SCOPE_CLAIMS,
    DEFAULT_SESSION_CLAIMS,
    KindRule,
    check_claim_names,
    check_kind_rules,
    check_session_claims,
    encodable,
    kind_of,
    scopes_of,
    session_key,
)
from .context import RequestInfo, SAContext
from .denials import Denial
from .dpop import DEFAULT_DPOP_ALGORITHMS, UNBOUND, Binding, SenderConstraints
from .errors import ConfigurationError, InvalidToken, KeysUnavailable, StoreError
from .frozen import fast_init
from .observe import Probe, build_observer
from .operations import Operations, finite_number
from .policy import LockMode, Policy, RouteMatch, RouteTable
from .records import Admission, AuditRecord, LockRequest, Ticket
from .stores.base import Store
from .stores.forks import afresh_after_fork
from .tokens import TokenVerifier, VerifiedToken

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["Admitted", "Guard", "Outcome"]

log = logging.getLogger("sa_middleware")

_MAX_ID = 256
_GEN_CLAIMS_KEPT = 4096  # principals whose generation-claim note this process remembers
_KEEPER_STOP_WAIT = 5.0  # seconds Guard.close() waits at most for the keeper's store call in progress
_KEY_NOTES_EVERY = 2.0  # seconds between two looks at the store's key notes (refresh / drop asked by an operator)
_MAX_GEN = 2**53 - 1  # exact in every store (SQLite integers, Lua doubles)


@fast_init
@dataclass(frozen=True, slots=True)
class Admitted:
    """An admitted request: the view's context and the ticket to release (``None`` on public routes and on
    ``fail_open`` admissions made while the store was unavailable)."""

    context: SAContext
    ticket: Ticket | None


Outcome = Admitted | Denial


@dataclass(slots=True)
class _Verify:
    observed: ClassVar[str] = "verify"
    token: str


@dataclass(slots=True)
class _Admit:
    observed: ClassVar[str] = "admit"
    admission: Admission


@dataclass(slots=True)
class _Sleep:
    observed: ClassVar[str] = "sleep"
    seconds: float


@dataclass(slots=True)
class _Report:
    """``reuse_is_compromise``: report the session of a ``token_reuse`` denial compromised."""

    observed: ClassVar[str] = "report"
    sub: str
    session_id: str
    iss: str


_Step = _Verify | _Admit | _Sleep | _Report


@dataclass(frozen=True, slots=True)
class _Facts:
    """What an admission takes from a verified token's claims (see :meth:`Guard._facts`)."""

    sub: str
    kind: str
    gen: int | None
    jti: str | None
    session: str | InvalidToken  # the session id the claims give (session_claim), or why they give none
    has_sid: bool  # whether the token names its session (then a transport session never replaces it)
    actor: str | None
    credential: str | None
    device: str | None
    scopes: frozenset[str]
    auth_time: float | None
    acr: str | None
    iat: float | None
    exp: float
    iss: str  # the issuer the principal's state is kept under


class _Keeper:
    """Renews the leases of this process's live tickets, in one batched store call every ``lease / 3`` seconds, and
    writes the buffered audit records (``flush``) every ``flush_every`` seconds."""

    def __init__(self, store: Store, lease: float, flush: Callable[[], object] | None = None,
                 flush_every: float = 1.0, check: Callable[[], object] | None = None) -> None:
        self._store, self._lease = store, lease
        self._flush, self._flush_every = flush, flush_every
        self._check = check
        self._wake = threading.Event()
        self._start()
        afresh_after_fork(self, _Keeper._after_fork)

    def _start(self) -> None:
        # the tickets are a dict written without a lock: setting and popping a key, and copying the dict, are each
        # atomic (under the GIL, and in free-threaded builds with the dict's own lock)
        self._live: dict[str, Ticket] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        """In a forked child: its own tickets, lock and thread (the parent's thread stays with the parent), and its
        own wake-up event (set if the parent's keeper was stopped)."""
        stopped = self._wake.is_set()
        self._wake = threading.Event()
        if stopped:
            self._wake.set()
        self._start()

    def _ensure(self) -> None:
        with self._lock:
            # another pid: a child forked without the fork hooks (uWSGI without its fork-hook options)
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="sa-middleware-keeper", daemon=True)
                self._thread.start()

    def add(self, ticket: Ticket) -> None:
        self._live[ticket.ticket_id] = ticket
        self.poke()

    def poke(self) -> None:
        """Make sure the thread runs (something was buffered for it to write)."""
        if self._thread is None or self._pid != os.getpid():
            self._ensure()

    def discard(self, ticket_id: str) -> None:
        self._live.pop(ticket_id, None)

    def live(self) -> list[Ticket]:
        return list(self._live.copy().values())

    def stop(self) -> None:
        """Stop the thread and wait for what it is doing (a renewal, a flush) to finish, at most
        :data:`_KEEPER_STOP_WAIT` seconds: nothing it writes reaches a store closed after this."""
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(_KEEPER_STOP_WAIT)

    def _run(self) -> None:
        every = self._lease / 3
        tick = every if self._flush is None else min(every, self._flush_every)
        if self._check is not None:
            tick = min(tick, _KEY_NOTES_EVERY)
        renew_at = time.monotonic() + every
        check_at = time.monotonic()
        while True:
            if self._check is not None and time.monotonic() >= check_at:
                check_at = time.monotonic() + _KEY_NOTES_EVERY
                try:
                    self._check()
                except Exception as exc:  # the next round tries again
                    log.warning("sa-middleware: key notes not read: %s", exc)
            if self._wake.wait(tick):
                return
            if time.monotonic() >= renew_at:
                renew_at = time.monotonic() + every
                tickets = self.live()
                if tickets:
                    try:
                        self._store.renew(tickets, self._lease)
                    except Exception as exc:  # the next round tries again; leases bound the damage
                        log.warning("sa-middleware: lease renewal failed: %s", exc)
            if self._flush is not None:
                try:
                    self._flush()
                except Exception as exc:  # kept for the next round (bounded)
                    log.warning("sa-middleware: audit flush failed: %s", exc)


class Guard(Operations):
    """Decides every request against the token, the route's policy and the state of all related contexts.

    Keyword arguments are validated here, so a mistake fails at start-up (see the "Guard options" page of the
    documentation). The operations (``rotate``, ``sessions``, ``audit``...) are inherited from
    :class:`~sa_middleware.operations.Operations`.
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
        policies: Mapping[str, Policy | Mapping[str, Any]] | None = None,
        default_policy: Policy | Mapping[str, Any] | None = None,
        leeway: float = 10.0,
        required_claims: Sequence[str] = ("exp", "iat", "sub"),
        token_type: str | Sequence[str] | None = None,
        max_token_bytes: int = 8192,
        token_cache_size: int = 4096,
        session_idle: float = 900.0,
        lease: float = 30.0,
        kind_claim: str = "sa_kind",
        kind_rules: Sequence[str | KindRule] = DEFAULT_KIND_RULES,
        scope_claims: str | Sequence[str] = DEFAULT_SCOPE_CLAIMS,
        session_claim: str | Sequence[str] | Mapping[str, str | Sequence[str]] = DEFAULT_SESSION_CLAIMS,
        jwks_ttl: float = 300.0,
        jwks_refresh_interval: float = 5.0,
        generation_claim: str = "gen",
        device_claim: str = "device_id",
        realm: str | None = None,
        retry_after: int = 1,
        reuse_is_compromise: bool = False,
        sender_constraint: str = "verify",
        dpop_algorithms: Sequence[str] = DEFAULT_DPOP_ALGORITHMS,
        dpop_max_age: float = 60.0,
        audit_admissions: bool = False,
        audit_retention: float | None = None,
        audit_max_records: int | None = None,
        audit_buffer: int = 10_000,
        metrics: Metrics | bool = False,
        tracing: bool | None = None,
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
            cache_size=token_cache_size, jwks_ttl=jwks_ttl, jwks_refresh_interval=jwks_refresh_interval)
        self.kind_rules = check_kind_rules(kind_rules)
        self.scope_claims = check_claim_names("scope_claims", scope_claims)
        self.session_claims = check_session_claims(session_claim)
        self.routes = RouteTable(policies, default_policy)
        if not isinstance(audit_admissions, bool):
            raise ConfigurationError("audit_admissions must be True or False")
        self.audit_admissions = audit_admissions
        Operations.__init__(self, store, session_idle=session_idle, audit_retention=audit_retention,
                            audit_max_records=audit_max_records, audit_buffer=audit_buffer)
        # principal state is kept per issuer (see _state_issuer): operations without issuer= pick among these
        pinned = self.verifier.issuer
        self.issuers = ("",) if pinned is None else (pinned,) if isinstance(pinned, str) else tuple(pinned)
        self.leeway = float(leeway)
        self.session_idle = float(session_idle)
        self.lease = float(lease)
        self.kind_claim = kind_claim
        self.generation_claim = generation_claim
        self.device_claim = device_claim
        self.realm = realm
        self.retry_after = retry_after
        if not isinstance(reuse_is_compromise, bool):
            raise ConfigurationError("reuse_is_compromise must be True or False")
        self.reuse_is_compromise = reuse_is_compromise
        self.constraints = SenderConstraints(mode=sender_constraint, algorithms=dpop_algorithms,
                                             max_age=dpop_max_age, leeway=self.leeway)
        self._key_notes: int | None = None  # the store's key-notes generation this Guard has applied
        self._watched: list[TokenVerifier] = []  # other verifiers the key operations reach (watch_keys)
        # (issuer, subject) -> whether its latest token had a generation claim; and what the store has not learnt yet
        self._gen_claims: dict[tuple[str, str], bool] = {}
        self._gen_pending: dict[tuple[str, str], bool] = {}
        self._gen_lock = threading.Lock()
        self._keeper = _Keeper(self.store, self.lease, lambda: self._flush_held(wait=False),
                               check=self._apply_key_notes)
        #: metrics and tracing (sa_middleware.observe); None when both are off
        self.observer = build_observer(self, metrics, tracing)

    # -- the decision flow -----------------------------------------------------------------------------------

    def match(self, request: RequestInfo) -> RouteMatch:
        """The route and policy for a request (adapters pass their own router's match to ``admit`` instead)."""
        return self.routes.match("WEBSOCKET" if request.websocket else request.method, request.route_path)

    def _decide(self, request: RequestInfo, match: RouteMatch | None) -> Generator[_Step, Any, Outcome]:
        match = match or self.match(request)
        refusal = match.refusal or _method_override(request)
        if refusal is not None:
            return Denial("invalid_request", refusal)
        policy = match.policy
        if policy.public:
            return Admitted(SAContext(None, None, None, route=match.route, params=match.params), None)
        scheme, raw = _credentials(request)
        if raw is None:
            return Denial("missing_token", "this route needs a bearer token")
        if isinstance(raw, InvalidToken):
            return Denial("invalid_token", str(raw))
        token: VerifiedToken | InvalidToken = yield _Verify(raw)
        if isinstance(token, KeysUnavailable):  # the token may be good: never a 401, never fail_open
            return Denial("keys_unavailable", "the issuer's signing keys could not be fetched; try again",
                          retry_after=max(token.retry_after, self.retry_after))
        if isinstance(token, InvalidToken):
            return Denial("invalid_token", str(token))
        binding = self.constraints.check(request, scheme, raw, token.claims)
        try:
            admission = self._build(request, match, token, binding if isinstance(binding, Binding) else None)
        except InvalidToken as exc:
            return Denial("invalid_token", str(exc))
        if isinstance(binding, Denial):
            if binding.code == "token_reuse" and self.reuse_is_compromise:
                yield _Report(admission.sub, admission.session_id, admission.iss)
            return binding
        deadline = None
        delay = 0.01
        while True:
            result = yield _Admit(admission)
            if isinstance(result, Ticket):
                self._keeper.add(result)
                self._note_generation_claim((admission.iss, admission.sub), admission.token_gen is not None)
                return Admitted(SAContext(admission.sub, admission.kind, admission.session_id, token.claims,
                                          result.ticket_id, result.fencing_tokens, match.route, match.params), result)
            if result.code == "store_unavailable" and policy.fail_open and "unexpected" not in result.extra:
                log.warning("sa-middleware: store unavailable; admitting %s for %s (fail_open)",
                            match.route or f"{request.method} {request.path}", admission.sub)
                return Admitted(SAContext(admission.sub, admission.kind, admission.session_id, token.claims,
                                          route=match.route, params=match.params), None)
            if result.code == "object_locked" and policy.on_lock_conflict == "wait":
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + policy.lock_wait
                if now < deadline:
                    yield _Sleep(min(delay, deadline - now))
                    delay = min(delay * 2, 0.25)
                    continue
            if result.code == "token_reuse" and self.reuse_is_compromise:
                yield _Report(admission.sub, admission.session_id, admission.iss)
            return self._challenge(result, admission)

    def _challenge(self, denial: Denial, a: Admission) -> Denial:
        if denial.code == "insufficient_scope":
            return Denial(denial.code, denial.detail, scope=tuple(sorted(a.policy.scopes)))
        if denial.code == "step_up_required":
            return Denial(denial.code, denial.detail, max_age=a.policy.max_auth_age, acr_values=a.policy.acr_values)
        return denial

    def _build(self, request: RequestInfo, match: RouteMatch, token: VerifiedToken,
               binding: Binding | None = None) -> Admission:
        f = token.memo.get(self)
        if f is None:
            f = token.memo[self] = self._facts(token)
        # a transport session (an MCP session) names the context when the token has no sid
        session_id = request.session if request.session and not f.has_sid else f.session
        if isinstance(session_id, InvalidToken):
            raise session_id
        policy = match.policy
        if policy.one_time and f.jti is None:
            raise InvalidToken("this route accepts one-time tokens only: a jti claim is required")
        # positional (the field order of Admission, pinned by a test): 25 keyword arguments cost a microsecond more
        return Admission(
            os.urandom(16).hex(), f.sub, f.kind, session_id,  # ticket_id, sub, kind, session_id
            token.fingerprint, f.exp, f.iat, f.gen, f.jti,  # token_hash, token_exp, token_iat, token_gen, jti
            f.actor, f.credential, f.device,  # actor, credential, device
            (binding or UNBOUND).client(request.client), request.user_agent,  # client, user_agent
            match.route or request.path[:_MAX_ID], f.scopes, f.auth_time, f.acr,  # route, token_scopes, ..., acr
            policy, _lock_requests(match.lock_keys, policy.lock_mode),  # policy, locks
            self.lease, self.session_idle,  # lease, session_idle
            self.audit_admissions, policy.on_lock_conflict != "wait",  # audit_admitted, audit_locked
            f.iss)  # iss

    def _facts(self, token: VerifiedToken) -> _Facts:
        """What an admission takes from the token's claims, checked: computed once per verified token (it is kept
        with the token in the verifier's cache), so a warm request only adds the route's policy."""
        claims = token.claims
        if not _valid_text(claims):  # a store cannot keep such a string: refuse here, not with a store error
            raise InvalidToken("a claim holds a string that is not valid Unicode (a lone surrogate)")
        sub = _claim_str(claims, "sub")
        if sub is None:
            raise InvalidToken("missing claim: sub")
        try:
            kind = kind_of(claims, self.kind_claim, self.kind_rules)
        except ValueError:
            raise InvalidToken(f"claim {self.kind_claim} must be one of human, service, agent") from None
        except Exception:  # a kind rule of the application failed: fail closed, and say so in the log
            log.error("sa-middleware: a kind rule raised; the request is refused", exc_info=True)
            raise InvalidToken("the principal's kind could not be decided") from None
        gen = claims.get(self.generation_claim)
        if gen is not None and (isinstance(gen, bool) or not isinstance(gen, int) or not 0 <= gen <= _MAX_GEN):
            raise InvalidToken(f"claim {self.generation_claim} must be an integer from 0 to 2**53-1")
        jti = _claim_str(claims, "jti")
        has_sid = _claim_str(claims, "sid") is not None
        session: str | InvalidToken
        try:
            session = session_key(claims, self.session_claims[kind], sub, token.fingerprint)
        except ValueError as exc:  # refused unless a transport session names the context instead
            session = InvalidToken(f"claim {exc} must be a non-empty string of at most {_MAX_ID} characters")
        act = claims.get("act")
        actor = _claim_str(act, "sub") if isinstance(act, Mapping) else None
        cnf = claims.get("cnf")
        credential = None
        if isinstance(cnf, Mapping):
            credential = _claim_str(cnf, "jkt") or _claim_str(cnf, "x5t#S256")
        scopes = scopes_of(claims, self.scope_claims)
        auth_time = finite_number(claims.get("auth_time"))
        if auth_time is not None and auth_time > time.time() + self.leeway:
            raise InvalidToken("auth_time is in the future")  # not kept: a later request checks again
        if "auth_time" in claims and auth_time is None:
            raise InvalidToken("claim auth_time must be a number")
        acr = claims.get("acr")
        return _Facts(sub=sub, kind=kind, gen=gen, jti=jti, session=session, has_sid=has_sid, actor=actor,
                      credential=credential, device=_claim_str(claims, self.device_claim), scopes=scopes,
                      auth_time=auth_time, acr=acr if isinstance(acr, str) else None,
                      iat=finite_number(claims.get("iat")),
                      exp=token.expires_at + self.leeway,  # the token is accepted until then
                      iss=self._state_issuer(claims))

    def _state_issuer(self, claims: Mapping[str, Any]) -> str:
        """The issuer a token's principal state is kept under: its ``iss`` when the Guard pins issuers (then it
        was verified to be one of them), else "" (one trust domain: the keys)."""
        if self.verifier.issuer is None:
            return ""
        iss = claims.get("iss")
        return iss if isinstance(iss, str) else ""

    def admit(self, request: RequestInfo, match: RouteMatch | None = None) -> Outcome:
        """Decide a request, blocking (WSGI). Never raises for bad input or a failing store."""
        probe = None
        if self.observer is not None:
            match = match or self.match(request)
            probe = self.observer.admission(request, match)
        flow = self._decide(request, match)
        answer: Any = None
        verified: Any = None
        asked: Admission | None = None
        try:
            while True:
                step = flow.send(answer)
                if probe is not None:
                    probe.before(step)
                if isinstance(step, _Verify):
                    try:
                        answer = verified = self.verifier.verify(step.token)
                    except InvalidToken as exc:
                        answer = exc
                elif isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    answer = None
                elif isinstance(step, _Report):
                    self._report_reuse(step)
                else:
                    asked = step.admission
                    answer = self._admit_sync(asked)
                if probe is not None:
                    probe.after(step, answer)
        except StopIteration as stop:
            return self._finish(stop.value, request, match, probe, asked, answer, verified)

    async def aadmit(self, request: RequestInfo, match: RouteMatch | None = None) -> Outcome:
        """Decide a request without blocking the event loop (ASGI). Never raises for bad input or a failing store."""
        probe = None
        if self.observer is not None:
            match = match or self.match(request)
            probe = self.observer.admission(request, match)
        flow = self._decide(request, match)
        answer: Any = None
        verified: Any = None
        asked: Admission | None = None
        try:
            while True:
                step = flow.send(answer)
                if probe is not None:
                    probe.before(step)
                if isinstance(step, _Verify):
                    try:
                        answer = verified = await self.verifier.averify(step.token)
                    except InvalidToken as exc:
                        answer = exc
                elif isinstance(step, _Sleep):
                    await anyio.sleep(step.seconds)
                    answer = None
                elif isinstance(step, _Report):
                    await self._areport_reuse(step)
                else:
                    asked = step.admission
                    # a store whose calls never wait (memory://) is called inline, as its async twin would
                    answer = self._admit_sync(asked) if self.store.inline_async else await self._admit_async(asked)
                if probe is not None:
                    probe.after(step, answer)
        except StopIteration as stop:
            return self._finish(stop.value, request, match, probe, asked, answer, verified)

    def _finish(self, outcome: Outcome, request: RequestInfo, match: RouteMatch | None, probe: Probe | None,
                asked: Admission | None, answer: Any, verified: Any) -> Outcome:
        """The end of a decision (both drivers): a denial answered in the scheme the client used (RFC 9449 7.1),
        reported to the observer, and audited unless the store recorded it."""
        if isinstance(outcome, Denial) and "auth_scheme" not in outcome.extra and _credentials(request)[0] == "dpop":
            outcome = self.constraints.challenge(outcome)
        if probe is not None:
            probe.finish(outcome, asked)
        if isinstance(outcome, Denial) or (outcome.ticket is None and asked is not None):
            self._audit_outcome(outcome, request, match, asked, answer, verified)
        return outcome

    def _audit_outcome(self, outcome: Outcome, request: RequestInfo, match: RouteMatch | None,
                       asked: Admission | None, answer: Any, verified: Any) -> None:
        """Buffer the audit record of an outcome the store did not record itself: a denial decided before the
        store was asked (no token, an invalid one), ``store_unavailable``, the last ``object_locked`` of a lock
        wait, and a ``fail_open`` admission. Everything else the store recorded in the admission's transaction."""
        if isinstance(outcome, Admitted):  # admitted without a ticket after asking the store: fail_open
            if asked is not None:
                self._buffer(AuditRecord("admission", "fail_open", "middleware", asked.sub, asked.session_id,
                                         asked.route, "admitted while the store was unavailable (fail_open)",
                                         time.time()))
            return
        if asked is not None and isinstance(answer, Denial) and answer.code == outcome.code \
                and answer.code != "store_unavailable" and (asked.audit_locked or answer.code != "object_locked"):
            return  # the store recorded it
        sub: str | None
        session_id: str | None
        if asked is not None:
            sub, session_id, route = asked.sub, asked.session_id, asked.route
        else:
            claims = verified.claims if isinstance(verified, VerifiedToken) else {}
            value = claims.get("sub")
            sub = value if isinstance(value, str) and 0 < len(value) <= 256 else None
            session_id = None
            route = (match or self.match(request)).route or request.path[:256]
        self._buffer(AuditRecord("denial", outcome.code, "middleware", sub, session_id, route, outcome.detail,
                                 time.time()))

    def _buffer(self, record: AuditRecord) -> None:
        super()._buffer(record)
        self._keeper.poke()

    def _report_reuse(self, step: _Report) -> None:
        """``reuse_is_compromise``: every context related to the session must re-authenticate. Only on this
        (rare) denial path, so admissions pay nothing for the option; a failure is logged, the denial stands."""
        log.warning("sa-middleware: token reuse in session %s of %s: reporting a compromise", step.session_id,
                    step.sub)
        try:
            self.report_compromise(step.sub, step.session_id, issuer=step.iss, source="middleware")
        except Exception:
            log.exception("sa-middleware: the compromise of session %s could not be reported", step.session_id)

    async def _areport_reuse(self, step: _Report) -> None:
        log.warning("sa-middleware: token reuse in session %s of %s: reporting a compromise", step.session_id,
                    step.sub)
        try:
            await self.areport_compromise(step.sub, step.session_id, issuer=step.iss, source="middleware")
        except Exception:
            log.exception("sa-middleware: the compromise of session %s could not be reported", step.session_id)

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
        started = self.observer.release_started() if self.observer is not None else None
        self._keeper.discard(ticket.ticket_id)
        failed = False
        try:
            self.store.release(ticket)
        except Exception:
            failed = True
            log.warning("sa-middleware: release of ticket %s failed; its lease will expire", ticket.ticket_id,
                        exc_info=True)
        if started is not None and self.observer is not None:
            self.observer.released(started, failed)

    async def arelease(self, ticket: Ticket | None) -> None:
        """Async twin of :meth:`release`, shielded from cancellation: a cancelled request still releases (call it
        from a ``finally`` block)."""
        if ticket is None:
            return
        started = self.observer.release_started() if self.observer is not None else None
        self._keeper.discard(ticket.ticket_id)
        failed = False
        try:
            if not self.store.release_nowait(ticket):
                with anyio.CancelScope(shield=True):
                    await self.store.arelease(ticket)
        except Exception:
            failed = True
            log.warning("sa-middleware: release of ticket %s failed; its lease will expire", ticket.ticket_id,
                        exc_info=True)
        if started is not None and self.observer is not None:
            self.observer.released(started, failed)

    # -- the issuer's signing keys ----------------------------------------------------------------------------

    def refresh_keys(self, *, source: str | None = None) -> None:
        """Fetch the issuer's JWK set now in this process, and ask every Guard sharing the store to do the same
        (within a few seconds). Cached tokens of keys that left the set are forgotten. Raises
        :class:`~sa_middleware.errors.KeysUnavailable` when the fetch fails here."""
        super().refresh_keys(source=source)
        for other in self._watched:
            other.expire_keys()
        self.verifier.refresh_keys()

    async def arefresh_keys(self, *, source: str | None = None) -> None:
        """Async twin of :meth:`refresh_keys`."""
        await super().arefresh_keys(source=source)
        for other in self._watched:
            other.expire_keys()
        await self.verifier.arefresh_keys()

    def drop_key(self, kid: str, *, source: str | None = None) -> None:
        """Stop trusting the signing key ``kid`` at once, here and (within a few seconds) in every Guard sharing
        the store, even while the issuer still publishes it; the tokens it verified are forgotten. For a
        compromised key: remove it at the issuer too."""
        self.verifier.drop_key(kid)  # validates kid, before anything is written
        super().drop_key(kid, source=source)
        for other in self._watched:
            other.drop_key(kid)

    async def adrop_key(self, kid: str, *, source: str | None = None) -> None:
        """Async twin of :meth:`drop_key`."""
        self.verifier.drop_key(kid)
        await super().adrop_key(kid, source=source)
        for other in self._watched:
            other.drop_key(kid)

    def watch_keys(self, verifier: TokenVerifier) -> None:
        """Apply the key operations (``refresh_keys``, ``drop_key``, also when asked through the store by
        ``sa-middleware keys``) to ``verifier`` too: the security-event receiver's verifier of its transmitter."""
        self._watched.append(verifier)

    def _note_generation_claim(self, principal: tuple[str, str], present: bool) -> None:
        """Remember whether the tokens of ``principal`` (issuer, subject) carry a generation claim; the store
        learns it (for the warning of ``rotate``) from the keeper, once per principal and change. The
        principals remembered are the last ones noted (a principal forgotten is noted again, once)."""
        if self._gen_claims.get(principal) is present:  # the usual case: nothing new, no lock taken
            return
        with self._gen_lock:
            if self._gen_claims.get(principal) is present:
                return
            self._gen_claims[principal] = self._gen_pending[principal] = present
            if len(self._gen_claims) > _GEN_CLAIMS_KEPT:
                self._gen_claims.pop(next(iter(self._gen_claims)))
            if len(self._gen_pending) > _GEN_CLAIMS_KEPT:
                self._gen_pending.pop(next(iter(self._gen_pending)))

    def flush(self) -> None:
        """Write what this process holds for the store now: the buffered audit records and which principals'
        tokens carry a generation claim (the keeper does it every second)."""
        self._flush_held(wait=True)

    def _flush_held(self, wait: bool) -> None:
        """:meth:`flush`; ``wait``: return once the audit flushes other threads started before have finished (the
        keeper does not wait: its lease renewals come first)."""
        self._flush_audit(wait=wait)
        with self._gen_lock:
            pending, self._gen_pending = self._gen_pending, {}
        if not pending:
            return
        try:
            self.store.note_generation_claims(pending)
        except NotImplementedError:
            pass
        except Exception:
            with self._gen_lock:
                self._gen_pending = {**pending, **self._gen_pending}
            raise

    def _apply_key_notes(self) -> None:
        """Apply what operators asked every Guard to do with the signing keys (run by the keeper thread)."""
        try:
            generation, dropped = self.store.key_notes()
        except NotImplementedError:
            return
        verifiers = (self.verifier, *self._watched)
        for verifier in verifiers:
            for kid in dropped:
                if kid not in verifier.dropped_keys:
                    verifier.drop_key(kid)
        if self._key_notes is not None and generation > self._key_notes:
            self._key_notes = generation
            for verifier in verifiers:
                try:
                    verifier.refresh_keys()
                except KeysUnavailable:
                    verifier.expire_keys()  # the next request tries again
                    log.warning("sa-middleware: signing keys not refreshed as asked: the JWK set fetch failed")
        self._key_notes = generation

    def close(self) -> None:
        """Stop the lease keeper, write the buffered audit records (best effort) and close the store."""
        self._keeper.stop()
        with suppress(Exception):
            self.flush()
        super().close()


_METHOD_OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override")


def _lock_requests(keys: Sequence[str], mode: LockMode) -> tuple[LockRequest, ...]:
    """The locks an admission asks for: one per rendered key, in the route's mode."""
    return tuple(LockRequest(key, mode) for key in keys) if keys else ()


def _method_override(request: RequestInfo) -> str | None:
    """Refuse a method-override header naming another method: the Guard decides the method the server saw, so an
    app that honours the header would run a different route than the one decided."""
    for name in _METHOD_OVERRIDES:
        value = request.headers.get(name)
        if value is not None and value.strip().upper() != request.method.upper():
            return f"the {name} header is refused: send the request with the method itself"
    return None


def _credentials(request: RequestInfo) -> tuple[str, str | InvalidToken | None]:
    """The request's Authorization scheme (lower-case, "" without one) and its token: ``None`` without a bearer
    or DPoP token, :class:`InvalidToken` for an empty one."""
    header = request.headers.get("authorization")
    if header is None:
        return "", None
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "dpop"):  # DPoP: RFC 9449 section 7.1
        return scheme, None
    value = value.strip()
    return scheme, value or InvalidToken("empty bearer token")


def _claim_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_ID or not encodable(value):
        raise InvalidToken(f"claim {name} must be a non-empty string of at most {_MAX_ID} characters")
    return value


def _valid_text(claims: Mapping[str, Any]) -> bool:
    """Whether every string in the claims (names and values, at any depth) can be encoded as UTF-8."""
    stack: list[object] = [claims]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and not encodable(value):
                return False
        elif isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return True

