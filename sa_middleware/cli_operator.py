"""The operator commands of ``sa-middleware``: inspect and change the shared state, read the audit trail.

Each command opens the store given by ``--store URI`` (default: ``$SA_STORE``, else ``sqlite:///sa-middleware.db``,
the Guard's default) with :class:`~sa_middleware.operations.Operations`: no token keys are needed. Listings print
an aligned table, or JSON with ``--json``. Every change is written to the audit trail with source ``cli``. Errors
are one line on stderr and exit status 1 (2 for a usage error); never a traceback.

An argument that starts with ``-`` (a session id such as ``-5My...``) follows ``--``, which ends the options:
``sa-middleware pause -- -5My...``; options take such values as ``--sub=-x``. The hints the commands print use
these forms.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import click

from .errors import SAMiddlewareError
from .operations import MAX_AUDIT_LIMIT, Operations, iso

__all__ = ["COMMANDS", "store_uri_callback"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_STORE = "sqlite:///sa-middleware.db"


def store_uri_callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--store``: a URI that does not even parse (``redis://[::1``) is a usage error (exit 2), not a traceback."""
    try:
        urlsplit(value)
    except ValueError as exc:
        raise click.BadParameter(f"not a store URI: {exc}") from None
    return value


def _store_option(func: F) -> F:
    return click.option("--store", "store_uri", envvar="SA_STORE", default=DEFAULT_STORE, show_default=True,
                        metavar="URI", callback=store_uri_callback,
                        help="The store the applications share (env SA_STORE).")(func)


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(func)


def _check_store(uri: str) -> None:
    """Refuse a store the CLI would create empty instead of reading: a memory store, a missing SQLite file."""
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme == "memory":
        raise click.UsageError("memory:// lives inside one process; give the store the applications share "
                               "(--store sqlite:///path.db or redis://...)")
    if scheme == "sqlite":
        parts = urlsplit(uri)
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if path and not parts.netloc and not Path(path).is_file():
            raise click.ClickException(f"no SQLite store at {path!r} (the applications create it on first use; "
                                       "check --store or SA_STORE)")


@contextmanager
def _operations(uri: str, session_idle: float = 900.0) -> Iterator[Operations]:
    """Operations on the store at ``uri`` (source ``cli``), closed afterwards; library and store errors become one
    clear line and exit status 1."""
    _check_store(uri)
    try:
        ops = Operations(uri, session_idle=session_idle, source="cli")
    except SAMiddlewareError as exc:
        raise click.ClickException(f"cannot open the store: {exc}") from None
    except Exception as exc:  # e.g. a file that is not a SQLite database
        raise click.ClickException(f"cannot open the store: {type(exc).__name__}: {exc}") from None
    try:
        yield ops
    except click.ClickException:
        raise
    except SAMiddlewareError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"the store failed: {type(exc).__name__}: {exc}") from None
    finally:
        with suppress(Exception):
            ops.close()


# -- output ----------------------------------------------------------------------------------------------------


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """``text`` with its C0, DEL and C1 control characters escaped (``\\x1b``): store values (an audit record's
    route is a client's request path) must not drive the operator's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _say(line: str) -> None:
    """Print one line that may carry store values or arguments, its control characters escaped."""
    click.echo(_printable(line))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is never padded; control characters escaped."""
    headers, rows = [_printable(h) for h in headers], [[_printable(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in (headers, *rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return iso(seconds)[:19].replace("T", " ") + "Z" if math.isfinite(seconds) else str(seconds)


def _left(seconds: float, now: float) -> str:
    left = seconds - now
    return f"in {left:.0f}s" if left >= 0 else f"{-left:.0f}s ago"


@contextmanager
def _logged_above(level: int) -> Iterator[None]:
    logger = logging.getLogger("sa_middleware")
    saved = logger.level
    logger.setLevel(level + 1)
    try:
        yield
    finally:
        logger.setLevel(saved)


def command_line(command: str, *arguments: str) -> str:
    """``sa-middleware COMMAND ARGUMENT...`` as a line that works when pasted: with ``--`` (end of options) before
    the arguments when one of them starts with ``-``."""
    dash = ["--"] if any(a.startswith("-") for a in arguments) else []
    return " ".join(["sa-middleware", command, *dash, *arguments])


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


# -- listings --------------------------------------------------------------------------------------------------


@click.command()
@click.argument("sub")
@click.option("--idle", type=click.FloatRange(min=0, min_open=True), default=900.0, show_default=True,
              metavar="SECONDS",
              help="Seconds without a request after which a session no longer counts (the Guard's session_idle).")
@_json_option
@_store_option
def sessions(sub: str, idle: float, as_json: bool, store_uri: str) -> None:
    """List SUB's active sessions with their status (active, paused, revoked, compromised)."""
    with _operations(store_uri, idle) as ops:
        found = ops.sessions(sub)
    if as_json:
        _echo_json([asdict(s) for s in found])
    elif not found:
        _say(f"no active sessions for {sub}")
    else:
        click.echo(_table(("SESSION", "STATUS", "KIND", "CREATED", "LAST SEEN", "EXPIRES", "CLIENT", "DEVICE",
                           "ACTOR"),
                          [(s.session_id, s.status, _cell(s.kind), _when(s.created), _when(s.last_seen),
                            _when(s.expires), _cell(s.client), _cell(s.device), _cell(s.actor)) for s in found]))


@click.command()
@_json_option
@_store_option
def locks(as_json: bool, store_uri: str) -> None:
    """List the object locks held now, with their fencing tokens."""
    with _operations(store_uri) as ops:
        held = ops.locks()
    if as_json:
        _echo_json([asdict(lock) for lock in held])
    elif not held:
        _say("no locks held")
    else:
        now = time.time()
        click.echo(_table(("KEY", "MODE", "FENCE", "SUB", "SESSION", "TICKET", "EXPIRES"),
                          [(lock.key, lock.mode, str(lock.fencing_token), lock.sub, lock.session_id, lock.ticket_id,
                            _left(lock.expires, now)) for lock in held]))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _instant(value: str | None, name: str) -> float | None:
    """``--since`` / ``--until``: a duration ago (``30s``, ``15m``, ``2h``, ``7d``, ``1w``), an ISO 8601 time (UTC
    unless it names a zone) or seconds since the epoch."""
    if value is None:
        return None
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        return time.time() - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise click.BadParameter("expected a duration ago (30s, 15m, 2h, 7d), an ISO 8601 time "
                                 "(2025-11-28T19:00:00Z) or seconds since the epoch", param_hint=name) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@click.command()
@click.option("--sub", default=None, metavar="SUB", help="Only this principal.")
@click.option("--session", "session_id", default=None, metavar="SESSION", help="Only this session.")
@click.option("--code", default=None, metavar="CODE",
              help="Only this code: a denial code, an operation (rotate...), admitted, session_paused, "
                   "session_evicted, state_loss, audit_dropped.")
@click.option("--kind", type=click.Choice(["denial", "admission", "operation", "change"]), default=None,
              help="Only this kind of record.")
@click.option("--since", default=None, metavar="WHEN",
              help="From this time: 15m, 2h, 7d (ago), an ISO 8601 time, epoch seconds.")
@click.option("--until", default=None, metavar="WHEN", help="Up to this time (same forms as --since).")
@click.option("--limit", type=click.IntRange(1, MAX_AUDIT_LIMIT), default=100, show_default=True, metavar="N",
              help="Newest records shown at most.")
@_json_option
@_store_option
def audit(sub: str | None, session_id: str | None, code: str | None, kind: str | None, since: str | None,
          until: str | None, limit: int, as_json: bool, store_uri: str) -> None:
    """Show the audit trail, newest first: denials, operations, security events, pauses, evictions, state loss."""
    start, end = _instant(since, "--since"), _instant(until, "--until")
    with _operations(store_uri) as ops:
        records = ops.audit(sub, session_id, code, start, end, limit, kind=kind)
    if as_json:
        _echo_json([r.to_dict() for r in records])
    elif not records:
        _say("no audit records match")
    else:
        click.echo(_table(("TIME", "KIND", "CODE", "SOURCE", "SUB", "SESSION", "ROUTE", "DETAIL"),
                          [(iso(r.time or 0.0), r.kind, r.code, r.source, _cell(r.sub), _cell(r.session_id),
                            _cell(r.route), _cell(r.detail)) for r in records]))


# -- operations ------------------------------------------------------------------------------------------------


def _one_of(**given: str | None) -> tuple[str, str]:
    named = [(name, value) for name, value in given.items() if value is not None]
    if len(named) != 1:
        raise click.UsageError(f"give exactly one of {' or '.join('--' + n for n in given)}")
    return named[0]


@click.command()
@click.option("--sub", default=None, metavar="SUB", help="Refuse every token of this principal issued before now.")
@click.option("--session", "session_id", default=None, metavar="SESSION", help="Revoke this one session.")
@_store_option
def revoke(sub: str | None, session_id: str | None, store_uri: str) -> None:
    """Revoke a principal's tokens issued before now (--sub: the not-before watermark) or one session
    (--session)."""
    which, value = _one_of(sub=sub, session=session_id)
    with _operations(store_uri) as ops:
        if which == "sub":
            watermark = ops.revoke_principal(value)
            _say(f"{value}: every token issued before {iso(watermark)} is refused (token_revoked)")
        elif ops.revoke_session(value):
            _say(f"session {value} revoked (session_revoked)")
        else:
            _say(f"session {value} revoked before it was seen: it is refused when it shows up "
                       "(remembered for 24 h)")


@click.command()
@click.argument("sub")
@click.option("--reset", is_flag=True, help="Undo: set SUB's generation back to 0 (tokens without a generation "
              "claim are admitted again).")
@_store_option
def rotate(sub: str, reset: bool, store_uri: str) -> None:
    """Bump SUB's credential generation: every token of a lower generation is refused (stale_generation).

    Only for issuers whose tokens carry a generation claim (gen); for the others use revoke --sub (not-before).
    A SUB that starts with - follows --: sa-middleware rotate -- -x.
    """
    with _operations(store_uri) as ops:
        if reset:
            previous = ops.reset_generation(sub)
            _say(f"{sub}: generation reset from {previous} to 0")
            return
        with _logged_above(logging.WARNING):  # the warning is printed below, in the CLI's words
            generation = ops.rotate(sub)
        warning = ops.rotation_warning(sub)
    _say(f"{sub}: generation {generation}; tokens of a lower generation are refused (stale_generation)")
    if warning:
        for line in (f"warning: {sub}'s latest token carried no generation claim: every token of {sub} is now "
                     "refused, and a new one will not help.",
                     f"  undo:    {command_line('rotate --reset', sub)}",
                     f"  instead: sa-middleware revoke --sub={sub}   (refuses its tokens issued before now)"):
            click.echo(_printable(line), err=True)


@click.command()
@click.option("--sub", default=None, metavar="SUB", help="The compromised principal: every context related to it.")
@click.option("--session", "session_id", default=None, metavar="SESSION",
              help="The compromised session: every context related to it.")
@_store_option
def compromise(sub: str | None, session_id: str | None, store_uri: str) -> None:
    """Report a compromise: every related context is refused (credential_compromised) until re-established."""
    if sub is None and session_id is None:
        raise click.UsageError("give --sub or --session (or both)")
    with _operations(store_uri) as ops:
        marked = ops.report_compromise(sub, session_id)
    if marked:
        _say(f"marked compromised: {len(marked)} context{'s' if len(marked) != 1 else ''}")
        for session in marked:
            _say(f"  {session}")
    elif sub is not None:
        _say(f"{sub}: marked compromised; no stored session was active, and tokens issued before now cannot "
                   "open a context")
    else:
        raise click.ClickException(f"session {session_id} is unknown: nothing was marked")


@click.command()
@click.argument("session_id", metavar="SESSION")
@_store_option
def pause(session_id: str, store_uri: str) -> None:
    """Pause SESSION: its requests are refused (session_paused) until resumed."""
    with _operations(store_uri) as ops:
        done = ops.pause_session(session_id)
    if not done:
        raise click.ClickException(f"session {session_id} was not paused: it is unknown, revoked or compromised")
    _say(f"session {session_id} paused (session_paused until: {command_line('resume', session_id)})")


@click.command()
@click.argument("session_id", metavar="SESSION")
@_store_option
def resume(session_id: str, store_uri: str) -> None:
    """Resume a paused or compromised SESSION (an operator's decision)."""
    with _operations(store_uri) as ops:
        done = ops.resume_session(session_id)
    if not done:
        raise click.ClickException(f"session {session_id} was not resumed: it is unknown, or neither paused nor "
                                   "compromised")
    _say(f"session {session_id} resumed")


@click.command()
@click.argument("device_id", metavar="DEVICE_ID")
@click.option("--compliant/--noncompliant", default=None, help="The device's posture (one is required).")
@_store_option
def device(device_id: str, compliant: bool | None, store_uri: str) -> None:
    """Mark DEVICE_ID compliant or non-compliant (routes with require_compliant_device refuse the latter)."""
    if compliant is None:
        raise click.UsageError("give --compliant or --noncompliant")
    with _operations(store_uri) as ops:
        ops.set_device_status(device_id, compliant)
    _say(f"device {device_id}: {'compliant' if compliant else 'non-compliant (device_noncompliant)'}")


@click.command()
@click.argument("sub")
@click.argument("scopes", nargs=-1, metavar="[SCOPE]...")
@click.option("--clear", is_flag=True, help="Lift the limit: tokens keep the scopes they carry.")
@click.option("--none", "withdraw_all", is_flag=True, help="Withdraw every scope of SUB's tokens issued before now.")
@_store_option
def privileges(sub: str, scopes: tuple[str, ...], clear: bool, withdraw_all: bool, store_uri: str) -> None:
    """Limit the scopes of SUB's tokens issued before now to SCOPE... (--none: no scope; --clear: no limit)."""
    if sum((bool(scopes), clear, withdraw_all)) != 1:
        raise click.UsageError("give SCOPE..., --none or --clear (exactly one)")
    values = None if clear else list(scopes)
    with _operations(store_uri) as ops:
        ops.set_privileges(sub, values)
    if values is None:
        _say(f"{sub}: scope limit lifted")
    elif values:
        _say(f"{sub}: tokens issued before now keep at most: {' '.join(sorted(set(values)))}")
    else:
        _say(f"{sub}: every scope of tokens issued before now withdrawn")


@click.group()
def keys() -> None:
    """Act on the issuer's signing keys in every application sharing the store (within a few seconds)."""


@keys.command("refresh")
@_store_option
def keys_refresh(store_uri: str) -> None:
    """Make every Guard fetch its issuer's JWK set now: keys the issuer removed stop verifying, with the tokens
    they verified."""
    with _operations(store_uri) as ops:
        ops.refresh_keys()
    _say("signing keys: every Guard sharing the store fetches its JWK set within a few seconds")


@keys.command("drop")
@click.argument("kid", metavar="KID")
@_store_option
def keys_drop(kid: str, store_uri: str) -> None:
    """Stop trusting the signing key KID in every Guard sharing the store, even while the issuer still
    publishes it (a compromised key); tokens it verified are refused from then on."""
    with _operations(store_uri) as ops:
        ops.drop_key(kid)
    _say(f"signing key {kid}: dropped by every Guard sharing the store within a few seconds (also by Guards "
         "started later); remove it at the issuer too")


#: the commands ``sa_middleware.cli`` adds to ``sa-middleware``
COMMANDS: tuple[click.Command, ...] = (sessions, locks, revoke, rotate, compromise, pause, resume, device, privileges,
                                       audit, keys)
