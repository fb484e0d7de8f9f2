"""The ``sa-middleware`` command."""

from __future__ import annotations

import sys

import click

__all__ = ["main"]


@click.group()
@click.version_option(package_name="sa-middleware")
def main() -> None:
    """Session-aware authorisation: operator and developer commands."""


@main.command()
@click.option("--server", type=click.Choice(["asgi", "wsgi", "both"]), default="both", show_default=True,
              help="Which server flavour to play the behaviours on.")
def demo(server: str) -> None:
    """Play the five mission behaviours over real HTTP on a throw-away SQLite store."""
    from .demo import run_demo

    servers = ("asgi", "wsgi") if server == "both" else (server,)
    sys.exit(1 if run_demo(servers, click.echo) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
