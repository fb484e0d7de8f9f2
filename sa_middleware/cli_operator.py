"""The operator commands of ``sa-middleware``: inspect and change the shared state, read the audit trail.

Each command opens the store given by ``--store URI`` (default: ``$SA_STORE``, else ``sqlite:///sa-middleware.db``,
the Guard's default) with :class:`~sa_middleware.operations.Operations`: no token keys are needed. A command on one
principal takes it as its argument (``rotate SUB``, ``revoke SUB``); one on a session takes ``--session SID`` or the
session as its argument (``pause SID``). Every command prints an aligned table or one line, or JSON with ``--json``;
times are ISO 8601 UTC. Every change is written to the audit trail with source ``cli``, the operator (``--actor``,
default user@host) and ``--reason``. Errors are one line on stderr and exit status 1 (2 for a usage error); never a
traceback.

An argument that starts with ``-`` (a session id such as ``-5My...``) follows ``--``, which ends the options:
``sa-middleware pause -- -5My...``. The hints the commands print use this form.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import re
import socket
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import click

from .errors import SAMiddlewareError
from .operations import MAX_AUDIT_LIMIT, Operations, iso

__all__ = ["COMMANDS", "default_actor", "store_uri_callback"]

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


def _issuer_option(func: F) -> F:
    return click.option("--issuer", default=None, metavar="ISSUER",
                        help="The principal's token issuer (iss). Needed only when the subject is known under several "
                             "issuers, or not yet known; \"\" for tokens without an issuer.")(func)


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table or a line.")(func)


def default_actor() -> str:
    """``user@host``: who runs the command, for the audit trail."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _operator_options(func: F) -> F:
    """``--actor`` and ``--reason``: recorded in the audit detail of the operation."""
    func = click.option("--reason", default=None, metavar="TEXT",
                        help="Why: recorded in the audit trail with the operation.")(func)
    return click.option("--actor", default=None, metavar="NAME",
                        help="Who: recorded in the audit trail (default: user@host).")(func)


def _done(as_json: bool, line: str, **fields: object) -> None:
    """The outcome of an operation: one line, or with ``--json`` one JSON object."""
    if as_json:
        _echo_json(fields)
    else:
        _say(line)


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


def _redacted(uri: str) -> str:
    """``uri`` without the password of its user info."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}"))


@contextmanager
def _operations(uri: str, session_idle: float = 900.0, *, actor: str | None = None, reason: str | None = None,
                read_only: bool = False) -> Iterator[Operations]:
    """Operations on the store at ``uri`` (source ``cli``; ``actor`` and ``reason`` go to the audit detail of each
    operation), closed afterwards; library and store errors become one clear line and exit status 1.
    ``read_only``: a store never written to is reported, not created."""
    _check_store(uri)
    try:
        ops = Operations(uri, session_idle=session_idle, source="cli")
        ops.actor, ops.reason = actor or default_actor(), reason
        ops.issuer_hint = "--issuer"
    except SAMiddlewareError as exc:
        raise click.ClickException(_printable(f"cannot open the store: {exc}")) from None
    except Exception as exc:  # e.g. a file that is not a SQLite database
        raise click.ClickException(_printable(f"cannot open the store: {type(exc).__name__}: {exc}")) from None
    try:
        if read_only and not ops.store.has_state():
            raise click.ClickException(_printable(
                f"no store at {_redacted(uri)}: nothing was ever written there (the applications create it on "
                "first use; check --store or SA_STORE)"))
        yield ops
    except click.ClickException:
        raise
    except SAMiddlewareError as exc:
        raise click.ClickException(_printable(str(exc))) from None
    except Exception as exc:
        raise click.ClickException(_printable(f"the store failed: {type(exc).__name__}: {exc}")) from None
    finally:
        with suppress(Exception):
            ops.close()


# -- output ----------------------------------------------------------------------------------------------------


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: what is escaped besides C0, DEL and C1: format characters (bidi overrides and isolates, zero-width characters,
#: the byte order mark...), line and paragraph separators, surrogates, unassigned and private-use code points
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _printable(text: str) -> str:
    """``text`` with its control, format and other invisible characters escaped (``\\x1b``, ``\\u202e``): store
    values (an audit record's route is a client's request path, a session id a token's claim) must neither drive
    the operator's terminal nor reorder or hide what it shows."""
    if text.isascii():
        return _CONTROL.sub(lambda m: _escape(m.group()), text)
    return "".join(_escape(c) if unicodedata.category(c) in _HIDDEN else c for c in text)


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
    """A time in every table: ISO 8601 UTC to the second, ``2026-11-28T20:49:19Z``."""
    if seconds is None:
        return "-"
    return iso(seconds)[:19] + "Z" if math.isfinite(seconds) else str(seconds)


def _left(seconds: float, now: float) -> str:
    """A time to come or past, relative to now: ``in 28s``, ``in 9m``, ``3h ago``."""
    left = seconds - now
    size = abs(left)
    amount = next((f"{size / unit:.0f}{name}" for name, unit in (("d", 86400), ("h", 3600), ("m", 60))
                   if size >= 2 * unit), f"{size:.0f}s")
    return f"in {amount}" if left >= 0 else f"{amount} ago"


def _expires(seconds: float, now: float) -> str:
    """An expiry: the time and how far off it is, ``2026-11-28T20:59:29Z (in 9m)``."""
    return f"{_when(seconds)} ({_left(seconds, now)})" if math.isfinite(seconds) else str(seconds)


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
@click.argument("sub", required=False)
@click.option("--idle", type=click.FloatRange(min=0, min_open=True), default=900.0, show_default=True,
              metavar="SECONDS",
              help="Seconds without a request after which a session no longer counts (the Guard's session_idle).")
@click.option("--limit", type=click.IntRange(1, MAX_AUDIT_LIMIT), default=100, show_default=True, metavar="N",
              help="Without SUB: the most recently seen sessions shown at most.")
@_issuer_option
@_json_option
@_store_option
def sessions(sub: str | None, idle: float, limit: int, issuer: str | None, as_json: bool, store_uri: str) -> None:
    """List SUB's active sessions with their status (active, paused, revoked, compromised); without SUB, every
    principal's, most recently seen first (at most --limit)."""
    if issuer is not None and sub is None:
        raise click.UsageError("--issuer goes with SUB")
    with _operations(store_uri, idle, read_only=True) as ops:
        found = ops.sessions(sub, issuer=issuer) if sub is not None else ops.all_sessions(limit)
    if as_json:
        _echo_json([asdict(s) for s in found])
    elif not found:
        _say(f"no active sessions for {sub}" if sub is not None else "no active sessions")
    else:
        now, every = time.time(), sub is None  # without SUB, a column says whose each session is
        click.echo(_table(("SESSION", *(("SUB",) if every else ()), "STATUS", "KIND", "CREATED", "LAST SEEN",
                           "EXPIRES", "CLIENT", "DEVICE", "ACTOR"),
                          [(s.session_id, *((s.sub,) if every else ()), s.status, _cell(s.kind), _when(s.created),
                            _when(s.last_seen), _expires(s.expires, now), _cell(s.client), _cell(s.device),
                            _cell(s.actor)) for s in found]))


@click.command()
@_json_option
@_store_option
def locks(as_json: bool, store_uri: str) -> None:
    """List the object locks held now, with their fencing tokens."""
    with _operations(store_uri, read_only=True) as ops:
        held = ops.locks()
    if as_json:
        _echo_json([asdict(lock) for lock in held])
    elif not held:
        _say("no locks held")
    else:
        now = time.time()
        click.echo(_table(("KEY", "MODE", "FENCE", "SUB", "SESSION", "TICKET", "EXPIRES"),
                          [(lock.key, lock.mode, str(lock.fencing_token), lock.sub, lock.session_id, lock.ticket_id,
                            _expires(lock.expires, now)) for lock in held]))


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
    with _operations(store_uri, read_only=True) as ops:
        records = ops.audit(sub, session_id, code, start, end, limit, kind=kind)
    if as_json:
        _echo_json([r.to_dict() for r in records])
    elif not records:
        _say("no audit records match")
    else:
        click.echo(_table(("TIME", "KIND", "CODE", "SOURCE", "SUB", "SESSION", "ROUTE", "DETAIL"),
                          [(_when(r.time), r.kind, r.code, r.source, _cell(r.sub), _cell(r.session_id),
                            _cell(r.route), _cell(r.detail)) for r in records]))


# -- operations ------------------------------------------------------------------------------------------------


def _subject(positional: str | None, option: str | None) -> str | None:
    """SUB given as the argument or (the older spelling) as ``--sub``; both at once must agree."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"two principals given: {positional!r} and --sub {option!r}")
    return positional if positional is not None else option


_OLD_SUB = click.option("--sub", "sub_option", default=None, metavar="SUB", hidden=True)  # the older spelling


@click.command()
@click.argument("sub", required=False)
@_OLD_SUB
@click.option("--session", "session_id", default=None, metavar="SID",
              help="Revoke this one session instead of SUB's tokens.")
@_issuer_option
@_operator_options
@_json_option
@_store_option
def revoke(sub: str | None, sub_option: str | None, session_id: str | None, issuer: str | None, actor: str | None,
           reason: str | None, as_json: bool, store_uri: str) -> None:
    """Refuse every token of SUB issued before now (token_revoked), or with --session SID revoke one session
    (session_revoked)."""
    sub = _subject(sub, sub_option)
    if (sub is None) == (session_id is None):
        raise click.UsageError("give SUB (every token of the principal) or --session SID (one session)")
    if issuer is not None and sub is None:
        raise click.UsageError("--issuer goes with SUB (a session names its own principal)")
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        if sub is not None:
            watermark = ops.revoke_principal(sub, issuer=issuer)
            _done(as_json, f"{sub}: every token issued before {_when(watermark)} is refused (token_revoked)",
                  operation="revoke_principal", sub=sub, watermark=watermark)
            return
        assert session_id is not None
        known = ops.revoke_session(session_id)
    _done(as_json, f"session {session_id} revoked (session_revoked)" if known else
          f"session {session_id} revoked before it was seen: it is refused when it shows up (remembered for 24 h)",
          operation="revoke_session", session_id=session_id, known=known)


@click.command()
@click.argument("sub")
@click.option("--reset", is_flag=True, help="Undo: set SUB's generation back to 0 (tokens without a generation "
              "claim are admitted again).")
@_issuer_option
@_operator_options
@_json_option
@_store_option
def rotate(sub: str, reset: bool, issuer: str | None, actor: str | None, reason: str | None, as_json: bool,
           store_uri: str) -> None:
    """Bump SUB's credential generation: every token of a lower generation is refused (stale_generation).

    Only for issuers whose tokens carry a generation claim (gen); for the others use revoke SUB (not-before).
    A SUB that starts with - follows --: sa-middleware rotate -- -x.
    """
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        if reset:
            previous = ops.reset_generation(sub, issuer=issuer)
            _done(as_json, f"{sub}: generation reset from {previous} to 0", operation="reset_generation", sub=sub,
                  previous=previous, generation=0)
            return
        with _logged_above(logging.WARNING):  # the warning is printed below, in the CLI's words
            generation = ops.rotate(sub, issuer=issuer)
        warning = ops.rotation_warning(sub, issuer=issuer)
    _done(as_json, f"{sub}: generation {generation}; tokens of a lower generation are refused (stale_generation)",
          operation="rotate", sub=sub, generation=generation, **({"warning": warning} if warning else {}))
    if warning and not as_json:
        for line in (f"warning: {sub}'s latest token carried no generation claim: every token of {sub} is now "
                     "refused, and a new one will not help.",
                     f"  undo:    {command_line('rotate --reset', sub)}",
                     f"  instead: {command_line('revoke', sub)}   (refuses its tokens issued before now)"):
            click.echo(_printable(line), err=True)


@click.command()
@click.argument("sub", required=False)
@_OLD_SUB
@click.option("--session", "session_id", default=None, metavar="SID",
              help="The compromised session: every context related to it.")
@_issuer_option
@_operator_options
@_json_option
@_store_option
def compromise(sub: str | None, sub_option: str | None, session_id: str | None, issuer: str | None,
               actor: str | None, reason: str | None, as_json: bool, store_uri: str) -> None:
    """Report a compromise of SUB, or of --session SID: every related context is refused (credential_compromised)
    until re-established."""
    sub = _subject(sub, sub_option)
    if sub is None and session_id is None:
        raise click.UsageError("give SUB or --session SID (or both)")
    if issuer is not None and sub is None:
        raise click.UsageError("--issuer goes with SUB (a session names its own principal)")
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        marked = ops.report_compromise(sub, session_id, issuer=issuer)
    if not marked and sub is None:
        raise click.ClickException(f"session {session_id} is unknown: nothing was marked")
    if as_json:
        _echo_json({"operation": "report_compromise", "sub": sub, "session_id": session_id, "marked": marked})
    elif marked:
        _say(f"marked compromised: {len(marked)} context{'s' if len(marked) != 1 else ''}")
        for session in marked:
            _say(f"  {session}")
    else:
        _say(f"{sub}: marked compromised; no stored session was active, and tokens issued before now cannot "
             "open a context")


@click.command()
@click.argument("session_id", metavar="SID")
@_operator_options
@_json_option
@_store_option
def pause(session_id: str, actor: str | None, reason: str | None, as_json: bool, store_uri: str) -> None:
    """Pause the session SID: its requests are refused (session_paused) until resumed."""
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        done = ops.pause_session(session_id)
    if not done:
        raise click.ClickException(f"session {session_id} was not paused: it is unknown, revoked or compromised")
    _done(as_json, f"session {session_id} paused (session_paused until: {command_line('resume', session_id)})",
          operation="pause_session", session_id=session_id)


@click.command()
@click.argument("session_id", metavar="SID")
@_operator_options
@_json_option
@_store_option
def resume(session_id: str, actor: str | None, reason: str | None, as_json: bool, store_uri: str) -> None:
    """Resume the paused or compromised session SID (an operator's decision)."""
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        done = ops.resume_session(session_id)
    if not done:
        raise click.ClickException(f"session {session_id} was not resumed: it is unknown, or neither paused nor "
                                   "compromised")
    _done(as_json, f"session {session_id} resumed", operation="resume_session", session_id=session_id)


@click.command()
@click.argument("device_id", metavar="DEVICE_ID")
@click.option("--compliant/--noncompliant", default=None, help="The device's posture (one is required).")
@_operator_options
@_json_option
@_store_option
def device(device_id: str, compliant: bool | None, actor: str | None, reason: str | None, as_json: bool,
           store_uri: str) -> None:
    """Mark DEVICE_ID compliant or non-compliant (routes with require_compliant_device refuse the latter)."""
    if compliant is None:
        raise click.UsageError("give --compliant or --noncompliant")
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        ops.set_device_status(device_id, compliant)
    _done(as_json, f"device {device_id}: {'compliant' if compliant else 'non-compliant (device_noncompliant)'}",
          operation="set_device_status", device_id=device_id, compliant=compliant)


@click.command()
@click.argument("sub")
@click.argument("scopes", nargs=-1, metavar="[SCOPE]...")
@click.option("--clear", is_flag=True, help="Lift the limit: tokens keep the scopes they carry.")
@click.option("--none", "withdraw_all", is_flag=True, help="Withdraw every scope of SUB's tokens issued before now.")
@_issuer_option
@_operator_options
@_json_option
@_store_option
def privileges(sub: str, scopes: tuple[str, ...], clear: bool, withdraw_all: bool, issuer: str | None,
               actor: str | None, reason: str | None, as_json: bool, store_uri: str) -> None:
    """Limit the scopes of SUB's tokens issued before now to SCOPE... (--none: no scope; --clear: no limit)."""
    if sum((bool(scopes), clear, withdraw_all)) != 1:
        raise click.UsageError("give SCOPE..., --none or --clear (exactly one)")
    values = None if clear else sorted(set(scopes))
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        ops.set_privileges(sub, values, issuer=issuer)
    if values is None:
        line = f"{sub}: scope limit lifted"
    elif values:
        line = f"{sub}: tokens issued before now keep at most: {' '.join(values)}"
    else:
        line = f"{sub}: every scope of tokens issued before now withdrawn"
    _done(as_json, line, operation="set_privileges", sub=sub, scopes=values)


@click.group()
def keys() -> None:
    """Act on the issuer's signing keys in every application sharing the store (within a few seconds)."""


@keys.command("refresh")
@_operator_options
@_json_option
@_store_option
def keys_refresh(actor: str | None, reason: str | None, as_json: bool, store_uri: str) -> None:
    """Make every Guard fetch its issuer's JWK set now: keys the issuer removed stop verifying, with the tokens
    they verified."""
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        ops.refresh_keys()
    _done(as_json, "signing keys: every Guard sharing the store fetches its JWK set within a few seconds",
          operation="refresh_keys")


@keys.command("drop")
@click.argument("kid", metavar="KID")
@_operator_options
@_json_option
@_store_option
def keys_drop(kid: str, actor: str | None, reason: str | None, as_json: bool, store_uri: str) -> None:
    """Stop trusting the signing key KID in every Guard sharing the store, even while the issuer still
    publishes it (a compromised key); tokens it verified are refused from then on."""
    with _operations(store_uri, actor=actor, reason=reason) as ops:
        ops.drop_key(kid)
    _done(as_json, f"signing key {kid}: dropped by every Guard sharing the store within a few seconds (also by "
          "Guards started later); remove it at the issuer too", operation="drop_key", kid=kid)


#: the commands ``sa_middleware.cli`` adds to ``sa-middleware``
COMMANDS: tuple[click.Command, ...] = (sessions, locks, revoke, rotate, compromise, pause, resume, device, privileges,
                                       audit, keys)
