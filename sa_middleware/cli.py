"""The ``sa-middleware`` command."""

from __future__ import annotations

import sys
from typing import Any

import click

from .cli_events import events
from .cli_operator import COMMANDS, _printable
from .console.cli import console
from .errors import SAMiddlewareError

__all__ = ["main"]


class _Group(click.Group):
    """Reports the library's own errors (bad configuration, an unreachable store) as one clear line (escaped
    like the output), exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SAMiddlewareError as exc:
            raise click.ClickException(_printable(str(exc))) from None


@click.group(cls=_Group)
@click.version_option(package_name="sa-middleware")
def main() -> None:
    """Session-aware authorisation: operator and developer commands.

    Every command takes --json. Operator commands work on the store the applications share (--store or SA_STORE).
    """


@main.command()
@click.option("--server", type=click.Choice(["asgi", "wsgi", "both"]), default="both", show_default=True,
              help="Which server flavour to play the built-in workbench on.")
@click.option("--examples", type=click.Path(exists=True, file_okay=False), default=None,
              help="Also play against the example apps in this directory (the repository's examples/).")
@click.option("--json", "as_json", is_flag=True, help="Print every step as JSON instead of the tables.")
def demo(server: str, examples: str | None, as_json: bool) -> None:
    """Play the five behaviours over real HTTP on a throw-away SQLite store."""
    from .demo import run_demo

    servers = ("asgi", "wsgi") if server == "both" else (server,)
    sys.exit(1 if run_demo(servers, click.echo, examples, as_json=as_json) else 0)


@main.command()
@click.argument("sub", required=False)
@click.option("--kind", type=click.Choice(["human", "service", "agent"]), default=None,
              help="The principal kind (claim sa_kind); unset means human.")
@click.option("--scope", default=None, help='Space-separated scopes, e.g. "tickets payments:approve".')
@click.option("--sid", default=None, help="Session id (claim sid); unset means one session per token.")
@click.option("--gen", type=click.IntRange(0, 2**53 - 1), default=None, help="Credential generation (claim gen).")
@click.option("--device", default=None, help="Device id (claim device_id).")
@click.option("--act", default=None, help="Acting party: the token is delegated by this principal (claim act.sub).")
@click.option("--audience", default=None, help="Audience; default: workbench (the examples).")
@click.option("--ttl", type=click.IntRange(1, 86400), default=600, show_default=True, help="Lifetime in seconds.")
@click.option("--claim", "extra", multiple=True, metavar="NAME=JSON",
              help="Any other claim, e.g. --claim acr='\"urn:mace:incommon:iap:silver\"' (repeatable).")
@click.option("--key-file", type=click.Path(dir_okay=False), envvar="SA_DEV_KEY", default=None,
              help="The development key (created if missing); default $SA_DEV_KEY, else "
                   "~/.config/sa-middleware/dev-key.pem.")
@click.option("--public-key", is_flag=True, help="Print the key's public PEM instead of a token.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: the token (or public key) with the key file, issuer and audience to configure.")
def token(sub: str | None, kind: str | None, scope: str | None, sid: str | None, gen: int | None, device: str | None,
          act: str | None, audience: str | None, ttl: int, extra: tuple[str, ...], key_file: str | None,
          public_key: bool, as_json: bool) -> None:
    """Mint a development token for SUB, signed with the development key (never for production).

    The key is $SA_DEV_KEY, else ~/.config/sa-middleware/dev-key.pem, created on first use (said on stderr). Apps
    trust it with keys=dev_key().public_pem, issuer DEV_ISSUER and audience DEV_AUDIENCE (sa_middleware.devkeys).
    """
    import json

    from .devkeys import DEV_AUDIENCE, dev_key

    key = dev_key(key_file)
    about = {"key_file": str(key.path), "issuer": key.issuer, "audience": audience or DEV_AUDIENCE}
    if public_key:
        click.echo(json.dumps({"public_key": key.public_pem, **about}, indent=2) if as_json else key.public_pem,
                   nl=as_json)
        return
    claims: dict[str, Any] = {"sa_kind": kind, "scope": scope, "sid": sid, "gen": gen, "device_id": device,
                              "act": {"sub": act} if act else None}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=JSON, got {item!r}", param_hint="--claim")
        try:
            claims[name] = json.loads(value)
        except ValueError:
            claims[name] = value  # a bare word is taken as a string
    if sub is None:
        raise click.UsageError("Missing argument 'SUB' (the principal the token is for).")
    minted = key.mint(sub, audience=audience or DEV_AUDIENCE, ttl=ttl, **claims)
    click.echo(json.dumps({"token": minted, "sub": sub, **about}, indent=2) if as_json else minted)


main.add_command(events)
main.add_command(console)
for _command in COMMANDS:  # the operator commands: sessions, locks, revoke, rotate, ..., audit
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()
