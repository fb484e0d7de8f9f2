"""``sa-middleware console``: serve the console on a loopback address, with a one-time login link."""

from __future__ import annotations

import getpass
import ipaddress
import socket

import click

from ..cli_operator import _operations, _store_option
from .app import Console
from .server import wsgi_app

__all__ = ["console"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command()
@_store_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="A loopback address: the login link is the only credential, so the console is never exposed.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0 picks a free port.")
@click.option("--operator", default=None,
              help="Who acts, as written in the audit trail (console:NAME); default USER@HOST.")
@click.option("--idle", type=click.FloatRange(min=0, min_open=True), default=900.0, show_default=True,
              help="Seconds since last seen for a session to count as active (the Guard's session_idle).")
def console(store_uri: str, host: str, port: int, operator: str | None, idle: float) -> None:
    """Serve the web console for the store at URI: sessions, locks, denials, audit trail and actions.

    Prints a one-time login link; open it in a browser on this machine. To serve the console to other machines,
    mount sa_middleware.console in your application behind its Guard (bearer tokens with the admin scope).
    """
    from werkzeug.serving import make_server

    if not _loopback(host):
        raise click.UsageError(f"--host {host} is not a loopback address; mount sa_middleware.console in an app "
                               "behind its Guard to serve it to other machines")
    name = operator or f"{getpass.getuser()}@{socket.gethostname()}"
    with _operations(store_uri, idle) as ops:
        app = Console(ops, operator=name)
        server = make_server(host, port, wsgi_app(app), threaded=True)
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"sa-middleware console for {store_uri}, operator {name}")
        click.echo(f"Open this link once to log in: {app.login_url(f'http://{shown}:{server.server_port}')}",
                   nl=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
