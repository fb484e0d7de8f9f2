"""``sa-middleware events``: apply OpenID Shared Signals (SSF) security events from the command line.

- ``events poll``: poll delivery (RFC 8936) from a transmitter's polling endpoint, with acknowledgements.
- ``events ingest FILE``: apply the SETs of a file (one compact SET a line; ``-`` for standard input).

Both validate each SET exactly as the push receiver does (transmitter ``--issuer``, receiver ``--audience``, the
transmitter's keys) and apply it to the store given by ``--store``, with the same replay protection.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from .cli_operator import _printable, store_uri_callback
from .errors import ConfigurationError, SAMiddlewareError

__all__ = ["events"]

F = TypeVar("F", bound=Callable[..., Any])


def _receiver_options(func: F) -> F:
    options = [
        click.option("--store", envvar="SA_STORE", default="sqlite:///sa-middleware.db", show_default=True,
                     callback=store_uri_callback, help="The store URI the applications share (env SA_STORE)."),
        click.option("--issuer", required=True, help="The transmitter's issuer: the SETs' iss, exactly."),
        click.option("--audience", "audiences", multiple=True, required=True,
                     help="This receiver's audience (repeatable)."),
        click.option("--keys", "key_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="A PEM file with the transmitter's public key or certificate (repeatable)."),
        click.option("--jwks", "jwks_file", type=click.Path(exists=True, dir_okay=False),
                     help="A JWK set file with the transmitter's keys."),
        click.option("--jwks-url", help="The transmitter's jwks_uri."),
        click.option("--algorithm", "algorithms", multiple=True,
                     help="Allowed signature algorithm (repeatable); default: every asymmetric algorithm."),
        click.option("--subject-issuer", "subject_issuers", multiple=True,
                     help="Another trusted iss of iss_sub subjects, e.g. your access tokens' issuer (repeatable)."),
        click.option("--on-high-risk", type=click.Choice(["raise_risk", "report_compromise"]), default="raise_risk",
                     show_default=True, help="What a risk-level-change to HIGH does."),
        click.option("--risk-amount", type=click.IntRange(1), default=100, show_default=True,
                     help="Risk added by a HIGH risk level."),
        click.option("--risk-window", type=click.FloatRange(min=0, min_open=True), default=900.0, show_default=True,
                     help="Seconds a raised risk lasts."),
        click.option("--on-credential-change", type=click.Choice(["rotate", "revoke_principal"]), default="rotate",
                     show_default=True, help="What a credential-change (revoke/update/delete) does."),
        click.option("--max-age", type=click.FloatRange(min=0, min_open=True), default=7 * 86400.0,
                     show_default=True, help="Oldest SET accepted, in seconds (also how long jtis are kept)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _receiver(opts: dict[str, Any]) -> Any:
    """An SSFReceiver over a Guard on ``--store`` (the Guard only writes operations; it admits no request)."""
    from .events import ASYMMETRIC_ALGORITHMS, SSFReceiver
    from .guard import Guard

    sources = [bool(opts["key_files"]), opts["jwks_file"] is not None, opts["jwks_url"] is not None]
    if sum(sources) != 1:
        raise click.UsageError("give exactly one of --keys, --jwks or --jwks-url")
    keys: Any = None
    jwks: Any = None
    if opts["key_files"]:
        keys = [Path(f).read_text() for f in opts["key_files"]]
    if opts["jwks_file"]:
        try:
            jwks = json.loads(Path(opts["jwks_file"]).read_text())
        except ValueError:
            raise click.UsageError("--jwks is not a JSON file") from None
    algorithms = list(opts["algorithms"]) or list(ASYMMETRIC_ALGORITHMS)
    try:
        # the Guard needs verification keys of its own; it verifies no access token here, so it reuses these
        guard = Guard(store=opts["store"], keys=keys, jwks=jwks, jwks_url=opts["jwks_url"], algorithms=algorithms)
        return SSFReceiver(guard, issuer=opts["issuer"], audience=list(opts["audiences"]), keys=keys, jwks=jwks,
                           jwks_url=opts["jwks_url"], algorithms=algorithms,
                           subject_issuers=opts["subject_issuers"], on_high_risk=opts["on_high_risk"],
                           risk_amount=opts["risk_amount"], risk_window=opts["risk_window"],
                           on_credential_change=opts["on_credential_change"], max_age=opts["max_age"])
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
def events() -> None:
    """Security events: apply OpenID Shared Signals (SSF) SETs from an identity provider."""


@events.command()
@_receiver_options
@click.option("--url", required=True, help="The transmitter's polling endpoint (the stream's endpoint_url).")
@click.option("--token", envvar="SA_SSF_POLL_TOKEN", default=None,
              help="Bearer token for the polling endpoint (env SA_SSF_POLL_TOKEN; prefer the variable).")
@click.option("--max-events", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="maxEvents of each request.")
@click.option("--return-immediately/--long-poll", default=True, show_default=True,
              help="returnImmediately of each request.")
@click.option("--interval", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between rounds that brought nothing more (with --return-immediately).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="HTTP timeout of each request (longer than the transmitter holds a long poll).")
@click.option("--once", is_flag=True, help="One round (then the acknowledgements), as --max-rounds 1.")
@click.option("--max-rounds", type=click.IntRange(1), default=None, help="Stop after this many rounds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line instead of text.")
def poll(url: str, token: str | None, max_events: int, return_immediately: bool, interval: float, timeout: float,
         once: bool, max_rounds: int | None, as_json: bool, **opts: Any) -> None:
    """Poll the transmitter (RFC 8936), apply each SET, acknowledge it (or report it in setErrs).

    Prints one line per SET and a summary. Exits 1 when a poll request failed or a SET could not be applied
    (both are retried by the next run: nothing was acknowledged for them), or when the transmitter refused the
    poll; else 0.
    """
    from .events import PollError
    from .events import poll as run_poll

    receiver = _receiver(opts)
    echo = (lambda line: click.echo(json.dumps({"message": line}))) if as_json else (
        lambda line: click.echo(_printable(line)))
    try:
        stats = run_poll(receiver, url, token, max_events=max_events, return_immediately=return_immediately,
                         interval=interval, timeout=timeout, max_rounds=1 if once else max_rounds, echo=echo)
    except KeyboardInterrupt:  # pragma: no cover - interactive stop
        sys.exit(130)
    except (PollError, ConfigurationError) as exc:
        click.echo(_printable(f"error: {exc}"), err=True)
        sys.exit(1)
    finally:
        receiver.guard.close()
    click.echo(json.dumps({"done": asdict(stats)}) if as_json else _printable(f"done: {stats.describe()}"))
    sys.exit(1 if stats.failed or stats.errors else 0)  # something was left for the next run


@events.command()
@_receiver_options
@click.argument("file", type=click.File("r"))
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line instead of text.")
def ingest(file: TextIO, as_json: bool, **opts: Any) -> None:
    """Apply the SETs of FILE (one compact SET a line, '-' for stdin; blank and '#' lines skipped).

    Prints one line per SET: applied, ignored, duplicate, verified, refused (with its RFC 8935 error code) or
    failed (the store did not answer). Exits 1 when any SET was refused or failed, else 0.
    """
    from .events import SETError

    receiver = _receiver(opts)
    bad = 0
    try:
        for number, line in enumerate(file, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            record: dict[str, Any] = {"line": number}
            try:
                outcome = receiver.process(text)
            except SETError as exc:
                bad += 1
                record.update(status="refused", err=exc.err, description=exc.description)
                message = f"line {number}: refused {exc.err}: {exc.description}"
            except SAMiddlewareError as exc:
                bad += 1
                record.update(status="failed", description=str(exc))
                message = f"line {number}: failed: {exc}"
            else:
                record.update(status=outcome.status, event=outcome.event.event_type, jti=outcome.event.jti,
                              actions=[a.describe() for a in outcome.actions], note=outcome.note)
                message = f"line {number}: {outcome.describe()}"
            click.echo(json.dumps(record) if as_json else _printable(message))
    finally:
        receiver.guard.close()
    sys.exit(1 if bad else 0)
