"""Against a real OpenID Provider: node ``oidc-provider`` (tests/idp/provider.mjs), started by these tests.

Real client-credentials tokens (RFC 9068 ``at+jwt``, a resource indicator, JWKS with ``kid``s) reach an app served by
uvicorn behind the middleware, whose Guard fetches the provider's JWKS over HTTP. The provider is stopped and started
again (an outage), adds and removes keys, runs its clock ahead; operators act through the real ``sa-middleware`` CLI
on the shared SQLite store. ``make test`` installs oidc-provider into ``.cache/oidc-provider``; without it these tests
skip, except under ``CI`` where they fail.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from redis_support import in_ci

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import serve_asgi

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / ".cache" / "oidc-provider" / "node_modules" / "oidc-provider"
SCRIPT = ROOT / "tests" / "idp" / "provider.mjs"
ENTRY_POINT = Path(sys.executable).parent / "sa-middleware"
RESOURCE = "https://api.test"
WAIT = 20.0  # seconds: an upper bound for anything these tests wait for


def _require_provider() -> None:
    missing = shutil.which("node") is None or not MODULE.is_dir()
    if missing:
        reason = "node or oidc-provider missing (make test installs it into .cache/oidc-provider)"
        if in_ci():
            pytest.fail(f"{reason}; CI is set: these tests must run", pytrace=False)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Provider:
    """The node OpenID Provider on a fixed port, stoppable and restartable with the same signing keys."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.jwks_url = f"{self.issuer}/jwks"
        self._state = tmp / "idp-state.json"
        self._log = tmp / "idp.log"
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {**os.environ, "OIDC_PROVIDER_MODULE": str(MODULE)}
        with self._log.open("a") as log:
            self._proc = subprocess.Popen(["node", str(SCRIPT), str(self.port), str(self._state)], env=env,
                                          stdout=subprocess.PIPE, stderr=log, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # blocks until it listens, or exits
        assert line.strip() == "ready", f"the provider did not start: {self._log.read_text()[-2000:]}"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(WAIT)
            self._proc = None

    def admin(self, path: str, **params: str | int) -> dict[str, Any]:
        resp = httpx.post(f"{self.issuer}/admin/{path}", params=params, timeout=WAIT)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def token(self, client: str = "svc-a", scope: str = "things:read") -> str:
        """A client-credentials access token for ``client``, for the resource server ``RESOURCE``."""
        resp = httpx.post(f"{self.issuer}/token", auth=(client, f"secret-{client}"), timeout=WAIT,
                          data={"grant_type": "client_credentials", "resource": RESOURCE, "scope": scope})
        assert resp.status_code == 200, resp.text
        token: str = resp.json()["access_token"]
        return token


def _claims(token: str) -> dict[str, Any]:
    import base64

    part = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def _kid(token: str) -> str:
    import base64

    part = token.split(".")[0]
    kid: str = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["kid"]
    return kid


async def _view(scope: dict[str, Any], receive: Any, send: Any) -> None:
    ctx = scope.get("sa_middleware")
    body = json.dumps({"principal": ctx.principal, "kind": ctx.kind, "session_id": ctx.session_id}
                      if ctx is not None else {}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class Api:
    """An app behind the middleware, served by uvicorn, whose Guard trusts ``provider``'s JWKS."""

    def __init__(self, provider: Provider, store: str, **options: Any) -> None:
        self.store = store
        self.guard = Guard(store=store, jwks_url=provider.jwks_url, algorithms=["RS256"], issuer=provider.issuer,
                           audience=RESOURCE, token_type="at+jwt",
                           policies={"GET /things": Policy(scopes={"things:read"}),
                                     "POST /seats": Policy(max_sessions=2)}, **options)
        self.base, self._stop = serve_asgi(SessionAwareMiddleware(_view, guard=self.guard))

    def get(self, token: str, path: str = "/things", method: str = "GET") -> httpx.Response:
        return httpx.request(method, self.base + path, headers={"authorization": f"Bearer {token}"}, timeout=WAIT)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.guard.flush()  # this process's notes, for the CLI's process to read
        env = {k: v for k, v in os.environ.items() if k != "SA_STORE"} | {"SA_STORE": self.store}
        return subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=60, env=env)

    def close(self) -> None:
        self._stop()
        self.guard.close()


def code(resp: httpx.Response) -> str:
    if resp.status_code == 200:
        return "ok"
    body: dict[str, Any] = resp.json()
    return str(body["code"])


def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait (a bounded time) for a state another process or thread moves to; fail with ``what``."""
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    _require_provider()
    p = Provider(tmp_path)
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def api_factory(provider: Provider, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    made: list[Api] = []

    def make(**options: Any) -> Api:
        api = Api(provider, f"sqlite:///{tmp_path / f'sa-{len(made)}.db'}", **options)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


# ---------------------------------------------------------------------------- the provider's keys


def test_provider_down_at_start_is_503_and_recovers_soon(provider: Provider, api_factory: Callable[..., Api]) -> None:
    token = provider.token()
    provider.stop()
    api = api_factory()
    resp = api.get(token)
    assert resp.status_code == 503 and code(resp) == "keys_unavailable"
    assert int(resp.headers["retry-after"]) >= 1 and "www-authenticate" not in resp.headers
    provider.start()
    for _ in range(5):  # a client honouring Retry-After is admitted again within a few seconds
        resp = api.get(token)
        if resp.status_code != 503:
            break
        assert code(resp) == "keys_unavailable"
        time.sleep(int(resp.headers["retry-after"]))
    assert code(resp) == "ok", resp.text


def test_provider_down_during_operation(provider: Provider, api_factory: Callable[..., Api]) -> None:
    api = api_factory(jwks_ttl=1, jwks_refresh_interval=1, token_cache_size=0)
    token = provider.token()
    assert code(api.get(token)) == "ok"
    provider.admin("jwks", up=0)
    # the last key set serves one more lifetime, then the answer is 503, never 401
    eventually(lambda: code(api.get(token)) == "keys_unavailable", "503 once the key set is too old")
    provider.admin("jwks", up=1)
    eventually(lambda: code(api.get(token)) == "ok", "admitted once the JWKS answers again")


def test_a_new_active_key_is_picked_up_promptly(provider: Provider, api_factory: Callable[..., Api]) -> None:
    api = api_factory(jwks_refresh_interval=1)
    first = provider.token()
    assert code(api.get(first)) == "ok"
    new_kid = provider.admin("keys/add")["kid"]
    fresh = provider.token()
    assert _kid(fresh) == new_kid != _kid(first)
    seen: set[str] = set()

    def admitted() -> bool:
        resp = api.get(fresh)
        seen.add(code(resp) + ("" if resp.status_code == 200 else ": " + resp.json()["detail"]))
        return resp.status_code == 200

    eventually(admitted, "the new key's tokens admitted")
    assert seen <= {"ok", "invalid_token: unknown kid"}
    assert code(api.get(first)) == "ok"  # the old key is still published


def test_a_removed_key_stops_verifying_after_keys_refresh(provider: Provider,
                                                         api_factory: Callable[..., Api]) -> None:
    api = api_factory()
    old = provider.token()
    assert code(api.get(old)) == "ok"  # verified and cached
    old_kid = _kid(old)
    provider.admin("keys/add")
    provider.admin("keys/remove", kid=old_kid)
    assert code(api.get(old)) == "ok"  # still within the key set's lifetime (jwks_ttl) and cached
    result = api.cli("keys", "refresh")
    assert result.returncode == 0, result.stderr
    eventually(lambda: code(api.get(old)) == "invalid_token", "the removed key's cached token refused")
    assert code(api.get(provider.token())) == "ok"


def test_keys_drop_refuses_a_key_the_provider_still_publishes(provider: Provider,
                                                             api_factory: Callable[..., Api]) -> None:
    api = api_factory()
    token = provider.token()
    assert code(api.get(token)) == "ok"
    compromised = _kid(token)
    result = api.cli("keys", "drop", compromised)
    assert result.returncode == 0, result.stderr
    eventually(lambda: code(api.get(token)) == "invalid_token", "the dropped key's tokens refused")
    assert api.get(token).json()["detail"] == "signing key withdrawn"
    provider.admin("keys/add")
    fresh = provider.token()
    eventually(lambda: code(api.get(fresh)) == "ok", "the provider's new key trusted (after the refetch floor)")
    # a Guard started later on the same store refuses the dropped key too
    later = Api(provider, api.store)
    try:
        later.guard._apply_key_notes()  # what its keeper does on start (without waiting for it)
        assert code(later.get(token)) == "invalid_token"
    finally:
        later.close()


# ---------------------------------------------------------------------------- machine clients


def test_machine_clients_renewing_under_max_sessions(provider: Provider, api_factory: Callable[..., Api]) -> None:
    default = api_factory()
    per_client = api_factory(session_claim={"service": ("client_id", "jti")})
    tokens = [provider.token("svc-a") for _ in range(4)]  # early renewals, replicas, restarted pods
    assert len({_claims(t)["jti"] for t in tokens}) == 4
    assert [code(default.get(t, "/seats", "POST")) for t in tokens] == ["ok", "ok", "too_many_sessions",
                                                                        "too_many_sessions"]
    answers = [per_client.get(t, "/seats", "POST") for t in tokens]
    assert [code(r) for r in answers] == ["ok"] * 4
    assert {r.json()["session_id"] for r in answers} == {"svc-a/client_id:svc-a"}
    assert {r.json()["kind"] for r in answers} == {"service"}
    assert code(per_client.get(provider.token("svc-b"), "/seats", "POST")) == "ok"


def test_rotate_warns_for_tokens_without_generation_and_reset_undoes_it(
        provider: Provider, api_factory: Callable[..., Api]) -> None:
    api = api_factory()
    token = provider.token("svc-a")
    assert "gen" not in _claims(token)
    assert code(api.get(token)) == "ok"
    result = api.cli("rotate", "svc-a")
    assert result.returncode == 0 and "carried no generation claim" in result.stderr, result
    resp = api.get(provider.token("svc-a"))  # a new token cannot help, and the detail says so
    assert code(resp) == "stale_generation" and "new token will not help" in resp.json()["detail"]
    assert api.cli("rotate", "--reset", "svc-a").returncode == 0
    assert code(api.get(token)) == "ok"
    # the tool for such a provider: the not-before watermark
    result = api.cli("revoke", "--sub=svc-a")
    assert result.returncode == 0, result.stderr
    assert code(api.get(token)) == "token_revoked"
    watermark = max(r.time or 0 for r in api.guard.audit("svc-a", code="revoke_principal"))
    time.sleep(max(0.0, math.ceil(watermark) - time.time()))  # iat has one-second resolution
    assert code(api.get(provider.token("svc-a"))) == "ok"
    # a provider that sends gen: no warning, and a token of the new generation is admitted
    provider.admin("gen", client="svc-gen", value=1)
    assert code(api.get(provider.token("svc-gen"))) == "ok"
    result = api.cli("rotate", "svc-gen")
    assert result.returncode == 0 and result.stderr == "", result
    assert code(api.get(provider.token("svc-gen"))) == "stale_generation"
    provider.admin("gen", client="svc-gen", value=2)
    assert code(api.get(provider.token("svc-gen"))) == "ok"


def test_session_ids_starting_with_a_dash(provider: Provider, api_factory: Callable[..., Api]) -> None:
    api = api_factory()
    for _ in range(2000):  # about 1 jti in 64 starts with "-"
        token = provider.token("svc-c")
        if _claims(token)["jti"].startswith("-"):
            break
    else:
        pytest.fail("no jti starting with '-'")
    session = _claims(token)["jti"]
    assert code(api.get(token)) == "ok"
    paused = api.cli("pause", "--", session)
    assert paused.returncode == 0, paused.stderr
    assert code(api.get(token)) == "session_paused"
    hint = re.search(r"until: (sa-middleware .+)\)$", paused.stdout.strip())
    assert hint is not None and hint.group(1) == f"sa-middleware resume -- {session}"
    assert api.cli(*hint.group(1).split()[1:]).returncode == 0
    assert code(api.get(token)) == "ok"


# ---------------------------------------------------------------------------- clocks


def test_a_provider_clock_ahead_is_named_in_the_detail(provider: Provider, api_factory: Callable[..., Api]) -> None:
    api = api_factory()
    assert code(api.get(provider.token())) == "ok"  # the app is up and holds the provider's keys
    provider.admin("clock", offset=30)
    token = provider.token()
    before = time.time()
    resp = api.get(token)
    after = time.time()
    assert code(resp) == "invalid_token"
    detail = resp.json()["detail"]
    found = re.search(r"for another (\d+) s \((iat|nbf)\); the issuer's clock may be ahead", detail)
    assert found is not None, detail
    # the seconds left: the claim (about 30 s ahead) less the Guard's clock when it decided, less the 10 s leeway
    ahead = jwt.decode(token, options={"verify_signature": False})[found.group(2)]
    assert math.ceil(ahead - after - 10) <= int(found.group(1)) <= math.ceil(ahead - before - 10), detail
    assert 15 <= int(found.group(1)) <= 21, detail
    assert "leeway is 10 s (Guard(leeway=...))" in detail
    assert code(api_factory(leeway=60).get(token)) == "ok"
