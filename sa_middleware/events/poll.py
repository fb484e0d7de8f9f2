"""Poll delivery (RFC 8936): fetch SETs from the transmitter's polling endpoint, apply them, acknowledge them.

Each round is one ``POST`` of ``{"maxEvents", "returnImmediately", "ack", "setErrs"}`` (``application/json``,
``Authorization: Bearer <token>``); the answer ``{"sets": {jti: SET}, "moreAvailable": bool}`` is applied SET by
SET through :meth:`SSFReceiver.process <sa_middleware.events.SSFReceiver.process>` (the same validation, mapping
and replay protection as push delivery). A SET that was applied, ignored or already seen is acknowledged in the
next request (``ack``); a refused one is reported there with its error code (``setErrs``); one that could not be
applied (the store was unavailable) is neither, so the transmitter delivers it again. After the last round, a
final request with ``maxEvents: 0`` carries the outstanding acknowledgements.

A network error or a 5xx answer is retried in the next round (after ``interval``); a 3xx, 4xx or malformed
answer stops the loop with :class:`PollError`. Redirects are never followed (the token would go with them). The
token is never logged.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError, SAMiddlewareError
from .errors import SETError
from .processor import log_refusal

if TYPE_CHECKING:
    from .receiver import SSFReceiver

__all__ = ["PollError", "PollStats", "poll"]

log = logging.getLogger("sa_middleware.events")

_MAX_RESPONSE = 16 * 1024 * 1024


class PollError(SAMiddlewareError):
    """The transmitter refused the poll, or answered something that is not an RFC 8936 response."""


@dataclass
class PollStats:
    """What a poll loop did."""

    rounds: int = 0
    received: int = 0
    applied: int = 0
    ignored: int = 0
    duplicates: int = 0
    verified: int = 0
    refused: int = 0
    failed: int = 0
    """SETs that could not be applied (store unavailable): not acknowledged, so delivered again."""
    errors: int = 0
    """Polling requests that failed (network, 5xx) and were retried."""

    def describe(self) -> str:
        return (f"rounds={self.rounds} received={self.received} applied={self.applied} ignored={self.ignored} "
                f"duplicates={self.duplicates} verified={self.verified} refused={self.refused} "
                f"failed={self.failed} errors={self.errors}")


class _Transient(Exception):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx becomes an HTTPError: the bearer token never follows a redirect


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(url: str, token: str | None, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status, data = response.status, response.read(_MAX_RESPONSE)
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read(4096)
        exc.close()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise _Transient(f"polling request failed: {type(exc).__name__}") from None
    if status >= 500:
        raise _Transient(f"the transmitter answered {status}")
    if status != 200:
        detail = ""
        try:
            answer = json.loads(data)
            if isinstance(answer, dict) and isinstance(answer.get("err"), str):
                detail = f": {answer['err'][:64]}"
        except (ValueError, RecursionError):
            pass
        raise PollError(f"the transmitter refused the poll with HTTP {status}{detail}")
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise PollError("the transmitter's answer is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("sets", {}), dict):
        raise PollError("the transmitter's answer has no sets object")
    return answer


def poll(
    receiver: SSFReceiver,
    url: str,
    token: str | None = None,
    *,
    max_events: int = 100,
    return_immediately: bool = True,
    interval: float = 5.0,
    timeout: float = 60.0,
    max_rounds: int | None = None,
    stop: threading.Event | None = None,
    echo: Callable[[str], None] | None = None,
) -> PollStats:
    """Poll ``url`` until ``stop`` is set or ``max_rounds`` rounds are done; returns what was done.

    With ``return_immediately`` the transmitter answers at once and the loop waits ``interval`` seconds between
    rounds that brought nothing more; without it (long polling) the transmitter holds the request until it has
    SETs, up to the HTTP ``timeout``. ``echo`` receives one line per SET.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigurationError("the polling endpoint must be an http(s) URL")
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
        raise ConfigurationError("max_events must be a positive integer")
    if max_rounds is not None and (isinstance(max_rounds, bool) or max_rounds < 1):
        raise ConfigurationError("max_rounds must be a positive integer")
    stop = stop or threading.Event()
    stats = PollStats()
    acks: list[str] = []
    errs: dict[str, dict[str, str]] = {}
    while not stop.is_set() and (max_rounds is None or stats.rounds < max_rounds):
        stats.rounds += 1
        body: dict[str, Any] = {"maxEvents": max_events, "returnImmediately": return_immediately, "ack": acks}
        if errs:
            body["setErrs"] = errs
        try:
            answer = _post(url, token, body, timeout)
        except _Transient as exc:
            stats.errors += 1
            log.warning("sa-middleware: %s; retrying", exc)
            stop.wait(interval)
            continue
        acks, errs = [], {}
        for jti, set_token in answer.get("sets", {}).items():
            stats.received += 1
            _apply(receiver, jti, set_token, acks, errs, stats, echo)
        more = answer.get("moreAvailable") is True
        last = max_rounds is not None and stats.rounds >= max_rounds
        if not more and return_immediately and not last:
            stop.wait(interval)
    if acks or errs:  # acknowledge what the last round brought
        body = {"maxEvents": 0, "returnImmediately": True, "ack": acks}
        if errs:
            body["setErrs"] = errs
        try:
            _post(url, token, body, timeout)
        except _Transient as exc:
            stats.errors += 1
            log.warning("sa-middleware: final acknowledgement failed (%s); the transmitter will redeliver", exc)
    return stats


def _apply(receiver: SSFReceiver, jti: Any, set_token: Any, acks: list[str], errs: dict[str, dict[str, str]],
           stats: PollStats, echo: Callable[[str], None] | None) -> None:
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        stats.refused += 1
        log.warning("sa-middleware: the transmitter delivered a SET under an invalid jti; skipped")
        return
    try:
        if not isinstance(set_token, str):
            raise SETError("invalid_request", "the SET is not a string")
        outcome = receiver.process(set_token, jti)
    except SETError as exc:
        log_refusal(exc, "poll")
        stats.refused += 1
        errs[jti] = {"err": exc.err, "description": exc.description}
        if echo:
            echo(f"refused jti={jti}: {exc.err}: {exc.description}")
        return
    except Exception as exc:  # the store failed: leave it unacknowledged, it will be delivered again
        stats.failed += 1
        log.warning("sa-middleware: SET jti=%s not applied (%s); it will be delivered again", jti,
                    type(exc).__name__)
        if echo:
            echo(f"failed jti={jti}: not applied now; left for redelivery")
        return
    acks.append(jti)
    counter = {"applied": "applied", "ignored": "ignored", "duplicate": "duplicates", "verified": "verified"}
    setattr(stats, counter[outcome.status], getattr(stats, counter[outcome.status]) + 1)
    if echo:
        echo(outcome.describe())
