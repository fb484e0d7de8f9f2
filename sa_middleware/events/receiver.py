"""The SSF push receiver (RFC 8935): an ASGI app, and a WSGI app as ``.wsgi``, that applies pushed SETs to a Guard.

Serve it at any path: it ignores the path. ASGI: Starlette ``Route("/ssf/events", receiver)`` (a ``Mount``
would match only the paths below ``/ssf/events/``), or any dispatcher; WSGI: werkzeug
``DispatcherMiddleware(app, {"/ssf/events": receiver.wsgi})``, or Flask
``app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {...})``. Do not put it behind the session-aware middleware:
the transmitter authenticates with its signature (and optionally a shared ``Authorization`` value), not with a
bearer token of your users.

A push is a ``POST`` with ``Content-Type: application/secevent+jwt`` and one SET as the body. Answers:

- ``202 Accepted`` (empty body): the SET was valid; its operations were applied, or it was a duplicate (seen
  before: not applied again), or an event this receiver does not act on (logged).
- ``400 Bad Request`` with ``{"err": ..., "description": ...}`` (``application/json``, ``Content-Language: en``)
  and a registered code: ``invalid_request`` (not ``application/secevent+jwt``, too large, malformed),
  ``invalid_key``, ``invalid_issuer``, ``invalid_audience``, ``authentication_failed`` (no ``Authorization``
  header when one is configured), ``access_denied`` (a different ``Authorization`` value), ``invalid_state``
  (a verification event with another ``state`` than the one expected).
- ``405`` for another method; ``503`` with ``Retry-After`` when the store could not apply the event, or the
  transmitter's signing keys (its JWKS) could not be fetched (nothing was recorded, so the transmitter's retry is
  applied).

Nothing is logged of a SET but its event type, ``jti`` and outcome; the ``Authorization`` value is never logged.
"""

from __future__ import annotations

import hmac
import http
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import get_input_stream

from ..asgi import Receive, Scope, Send
from ..asgi import request_info as asgi_request_info
from ..errors import ConfigurationError, KeysUnavailable, StoreError
from ..guard import Guard
from ..wsgi import Environ, StartResponse
from ..wsgi import request_info as wsgi_request_info
from .errors import SETError
from .mapping import MappingOptions
from .processor import EventOutcome, EventProcessor, SubjectResolverHook, Verification, log_refusal
from .sets import ASYMMETRIC_ALGORITHMS, SETValidator
from .subjects import SubjectResolver

__all__ = ["SSFReceiver"]

log = logging.getLogger("sa_middleware.events")

_Response = tuple[int, list[tuple[str, str]], bytes]
_MEDIA_TYPE = "application/secevent+jwt"
_LENGTH = re.compile(r"[0-9]{1,18}")  # a Content-Length value


def _error(err: str, description: str) -> _Response:
    body = json.dumps({"err": err, "description": description}, separators=(",", ":")).encode()
    return 400, [("content-type", "application/json"), ("content-language", "en"), ("cache-control", "no-store"),
                 ("content-length", str(len(body)))], body


_ACCEPTED: _Response = (202, [("content-length", "0"), ("cache-control", "no-store")], b"")
_NOT_ALLOWED: _Response = (405, [("allow", "POST"), ("content-length", "0")], b"")


def _unavailable(retry_after: int) -> _Response:
    body = b"the security event could not be applied now; retry"
    return 503, [("content-type", "text/plain; charset=utf-8"), ("retry-after", str(retry_after)),
                 ("cache-control", "no-store"), ("content-length", str(len(body)))], body


def _authorization(value: str | Sequence[str] | None) -> tuple[tuple[str, bytes], ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else list(value)
    result = []
    for item in values:
        scheme, _, credentials = item.strip().partition(" ") if isinstance(item, str) else ("", "", "")
        if not scheme or not credentials.strip():
            raise ConfigurationError('authorization must be a full header value, e.g. "Bearer <secret>"')
        result.append((scheme.lower(), credentials.strip().encode()))
    return tuple(result)


class SSFReceiver:
    """Receives the SETs of one transmitter and applies them to ``guard`` (see the module docstring).

    ``issuer`` is the transmitter's issuer (the SETs' ``iss``, exactly); ``audience`` this receiver's audience
    (one value or several); exactly one of ``keys``, ``jwks`` or ``jwks_url`` holds the transmitter's signing keys,
    with ``algorithms`` as the allow-list (default: every asymmetric algorithm). ``authorization`` is the
    ``Authorization`` header value the transmitter must send (the stream's ``authorization_header``; a list
    accepts several, for rotation), compared in constant time.

    ``max_age`` (7 days) refuses SETs issued longer ago and is how long their ``jti`` is remembered;
    ``subject_issuers`` adds trusted ``iss`` values of ``iss_sub`` subjects (the SET issuer and the Guard's token
    issuer are trusted); ``subject_resolver`` replaces the subject mapping; ``critical_subject_members`` drops
    events whose complex subject has such a member that names nothing here (SSF 1.0 section 3.4).
    ``on_high_risk``, ``risk_amount``, ``risk_window``, ``on_credential_change`` and ``assurance_levels`` shape
    the mapping (:mod:`sa_middleware.events.mapping`); ``verification_state`` is the ``state`` a verification
    event must carry (``invalid_state`` otherwise).
    """

    def __init__(
        self,
        guard: Guard,
        *,
        issuer: str,
        audience: str | Sequence[str],
        keys: Any = None,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        algorithms: Sequence[str] = ASYMMETRIC_ALGORITHMS,
        authorization: str | Sequence[str] | None = None,
        leeway: float = 10.0,
        max_age: float = 7 * 86400.0,
        max_bytes: int = 65536,
        subject_issuers: Iterable[str] = (),
        subject_resolver: SubjectResolverHook | None = None,
        critical_subject_members: Iterable[str] = (),
        on_high_risk: Literal["raise_risk", "report_compromise"] = "raise_risk",
        risk_amount: int = 100,
        risk_window: float = 900.0,
        on_credential_change: Literal["rotate", "revoke_principal"] = "rotate",
        assurance_levels: Mapping[str, str] | None = None,
        verification_state: str | None = None,
    ) -> None:
        if not isinstance(guard, Guard):
            raise ConfigurationError("SSFReceiver needs a Guard")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1024:
            raise ConfigurationError("max_bytes must be an integer >= 1024")
        if on_high_risk not in ("raise_risk", "report_compromise"):
            raise ConfigurationError("on_high_risk must be 'raise_risk' or 'report_compromise'")
        if on_credential_change not in ("rotate", "revoke_principal"):
            raise ConfigurationError("on_credential_change must be 'rotate' or 'revoke_principal'")
        if isinstance(risk_amount, bool) or not isinstance(risk_amount, int) or risk_amount < 1:
            raise ConfigurationError("risk_amount must be a positive integer")
        if isinstance(risk_window, bool) or not isinstance(risk_window, int | float) or not 0 < risk_window < 1e9:
            raise ConfigurationError("risk_window must be a positive number of seconds")
        levels = dict(assurance_levels or {})
        if not all(isinstance(k, str) and isinstance(v, str) and 0 < len(v) <= 256 for k, v in levels.items()):
            raise ConfigurationError("assurance_levels must map level names to acr values (strings)")
        if subject_resolver is not None and not callable(subject_resolver):
            raise ConfigurationError("subject_resolver must be a callable (subject, event_type) -> Targets")
        self.guard = guard
        self.max_bytes = max_bytes
        self._authorization = _authorization(authorization)
        validator = SETValidator(issuer=issuer, audience=audience, keys=keys, jwks=jwks, jwks_url=jwks_url,
                                 algorithms=algorithms, leeway=leeway, max_age=max_age, max_bytes=max_bytes)
        guard.watch_keys(validator.verifier)  # sa-middleware keys refresh / drop reach the transmitter's keys too
        token_issuer = guard.verifier.issuer
        trusted = {issuer, *subject_issuers}
        trusted.update([token_issuer] if isinstance(token_issuer, str) else token_issuer or ())
        options = MappingOptions(on_high_risk, risk_amount, float(risk_window), on_credential_change, levels)
        resolver = SubjectResolver(trusted, critical_subject_members, guard.issuers or ())
        self.processor = EventProcessor(guard, validator, resolver,
                                        options, subject_resolver=subject_resolver,
                                        verification_state=verification_state)

    # -- the processing API (also used by poll delivery and ``sa-middleware events ingest``) ------------------------

    def process(self, token: str | bytes, jti: str | None = None) -> EventOutcome:
        """Validate and apply one SET, blocking; raises :class:`~sa_middleware.events.SETError` when refused."""
        return self.processor.process(token, jti)

    async def aprocess(self, token: str | bytes, jti: str | None = None) -> EventOutcome:
        """Like :meth:`process`, on the event loop without blocking it."""
        return await self.processor.aprocess(token, jti)

    @property
    def last_verification(self) -> Verification | None:
        """The last verification event this process received (its ``state``), or None."""
        return self.processor.last_verification

    @property
    def stream_status(self) -> str | None:
        """The stream status of the last ``stream-updated`` event this process received, or None."""
        return self.processor.stream_status

    @property
    def verification_state(self) -> str | None:
        """The ``state`` the next verification events must carry (None: any)."""
        return self.processor.verification_state

    @verification_state.setter
    def verification_state(self, state: str | None) -> None:
        self.processor.verification_state = state

    # -- HTTP ----------------------------------------------------------------------------------------------

    def _check(self, method: str, headers: Mapping[str, str]) -> _Response | None:
        """Everything decided before the body is read."""
        if method != "POST":
            return _NOT_ALLOWED
        if self._authorization:
            presented = headers.get("authorization")
            if presented is None or not presented.strip():
                return _error("authentication_failed", "this receiver requires an Authorization header")
            scheme, _, credentials = presented.strip().partition(" ")
            ok = False
            for expected_scheme, expected in self._authorization:  # no early exit: constant time per value
                ok |= hmac.compare_digest(credentials.strip().encode(), expected) and scheme.lower() == expected_scheme
            if not ok:
                return _error("access_denied", "the Authorization presented does not allow pushing to this receiver")
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != _MEDIA_TYPE:
            return _error("invalid_request", f"the body must be a SET sent as {_MEDIA_TYPE}")
        length = headers.get("content-length")
        # ASCII digits only (str.isdigit() takes "²", which int() refuses), and few of them (int() refuses 4300+)
        if length is not None and (not _LENGTH.fullmatch(length.strip()) or int(length) > self.max_bytes):
            return _error("invalid_request", "the SET is too large")
        return None

    def _refused(self, error: SETError, where: str) -> _Response:
        log_refusal(error, where)
        return _error(error.err, error.description)

    def _failed(self, exc: Exception) -> _Response:
        if isinstance(exc, KeysUnavailable):
            log.warning("sa-middleware: security event not applied, the transmitter's signing keys are unavailable")
            return _unavailable(max(exc.retry_after, self.guard.retry_after))
        if isinstance(exc, StoreError):
            log.warning("sa-middleware: security event not applied, store unavailable: %s", exc)
        else:
            log.exception("sa-middleware: security event not applied")
        return _unavailable(self.guard.retry_after)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.close", "code": 1008})
            return
        request = asgi_request_info(scope)
        response = self._check(request.method, request.headers)
        if response is None:
            body = await self._read(receive)
            if body is None:
                response = _error("invalid_request", "the SET is too large")
            else:
                response = await self._ahandle(body)
        status, headers, payload = response
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
        await send({"type": "http.response.body", "body": payload})

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _ahandle(self, body: bytes) -> _Response:
        try:
            await self.processor.aprocess(body)
        except SETError as exc:
            return self._refused(exc, "push")
        except Exception as exc:  # the store failed, or a bug: the transmitter retries; never a 500
            return self._failed(exc)
        return _ACCEPTED

    def wsgi(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI app."""
        request = wsgi_request_info(environ)
        response = self._check(request.method, request.headers)
        if response is None:
            body: bytes | None
            try:
                body = get_input_stream(environ, max_content_length=self.max_bytes).read(self.max_bytes + 1)
            except RequestEntityTooLarge:
                body = None
            if body is None or len(body) > self.max_bytes:
                response = _error("invalid_request", "the SET is too large")
            else:
                response = self._handle(body)
        status, headers, payload = response
        start_response(f"{status} {http.HTTPStatus(status).phrase}", headers)
        return [payload]

    def _handle(self, body: bytes) -> _Response:
        try:
            self.processor.process(body)
        except SETError as exc:
            return self._refused(exc, "push")
        except Exception as exc:  # the store failed, or a bug: the transmitter retries; never a 500
            return self._failed(exc)
        return _ACCEPTED

