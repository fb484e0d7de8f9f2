"""``sa-middleware events poll`` and ``events ingest``, through the real entry point, in a subprocess.

Poll delivery runs against a small RFC 8936 transmitter written here (werkzeug's threaded server): it keeps
unacknowledged SETs and delivers them again, removes acknowledged ones, records ``setErrs``, honours
``maxEvents`` and ``moreAvailable``, and holds a long poll (``returnImmediately: false``) until it has a SET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from ssf_support import CAEP, RISC, VERIFICATION, Transmitter, fresh_sub, opaque, user
from support import WAIT

from sa_middleware import Guard
from sa_middleware.context import RequestInfo
from sa_middleware.demo import DemoIssuer, serve_wsgi
from sa_middleware.denials import Denial
from sa_middleware.tokens import generate_rsa_key

POLL_TOKEN = "poll-token-0123456789abcdef"
ENTRY_POINT = Path(sys.executable).parent / "sa-middleware"


class PollTransmitter:
    """An RFC 8936 polling endpoint over a queue of SETs (only what the tests need, strictly checked)."""

    def __init__(self) -> None:
        self.queue: OrderedDict[str, str] = OrderedDict()
        self.requests: list[dict[str, Any]] = []
        self.acked: list[str] = []
        self.errors: dict[str, dict[str, str]] = {}
        self.ignore_first_ack: set[str] = set()  # an acknowledgement "lost" once: the SET is delivered again
        self.fail_next = 0  # answer 503 to this many requests
        self.holding = threading.Event()  # set while a long poll is held
        self.raw_answer: tuple[str, bytes] | None = None  # answer every poll with this status and JSON body
        self._changed = threading.Condition()

    def add(self, set_token: str) -> str:
        jti = jwt.decode(set_token, options={"verify_signature": False})["jti"]
        with self._changed:
            self.queue[jti] = set_token
            self._changed.notify_all()
        return str(jti)

    def _answer(self, status: str, body: dict[str, Any], start_response: Any) -> list[bytes]:
        payload = json.dumps(body).encode()
        start_response(status, [("content-type", "application/json"), ("content-length", str(len(payload)))])
        return [payload]

    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("HTTP_AUTHORIZATION") != f"Bearer {POLL_TOKEN}":
            return self._answer("401 Unauthorized", {"err": "authentication_failed"}, start_response)
        assert environ["REQUEST_METHOD"] == "POST" and environ["CONTENT_TYPE"] == "application/json"
        body = json.loads(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
        if self.raw_answer is not None:
            status, payload = self.raw_answer
            start_response(status, [("content-type", "application/json"), ("content-length", str(len(payload)))])
            return [payload]
        with self._changed:
            self.requests.append(body)
            if self.fail_next:
                self.fail_next -= 1
                return self._answer("503 Service Unavailable", {}, start_response)
            for jti in body.get("ack", []):
                if jti in self.ignore_first_ack:
                    self.ignore_first_ack.discard(jti)
                    continue
                self.queue.pop(jti, None)
                self.acked.append(jti)
            for jti, error in body.get("setErrs", {}).items():
                self.queue.pop(jti, None)
                self.errors[jti] = error
            limit = body.get("maxEvents", 10)
            if limit and not self.queue and body.get("returnImmediately") is False:
                self.holding.set()
                self._changed.wait_for(lambda: bool(self.queue), WAIT)
                self.holding.clear()
            sets = dict(list(self.queue.items())[:limit])
            return self._answer("200 OK", {"sets": sets, "moreAvailable": len(self.queue) > len(sets)},
                                start_response)


@pytest.fixture(scope="module")
def idp() -> DemoIssuer:
    return DemoIssuer()


@pytest.fixture(scope="module")
def tx() -> Transmitter:
    return Transmitter()


@pytest.fixture
def transmitter() -> Iterator[tuple[PollTransmitter, str]]:
    endpoint = PollTransmitter()
    base, stop = serve_wsgi(endpoint.wsgi)
    try:
        yield endpoint, base + "/ssf/poll"
    finally:
        with endpoint._changed:
            endpoint.queue["release-any-hold"] = ""  # a held long poll returns
            endpoint._changed.notify_all()
        stop()


@pytest.fixture
def setup(tmp_path: Path, tx: Transmitter) -> dict[str, Any]:
    key = tmp_path / "transmitter.pem"
    key.write_text(tx.public_pem)
    return {"store": f"sqlite:///{tmp_path / 'sa.db'}", "key": str(key), "tmp": tmp_path}


def cli(setup: dict[str, Any], idp: DemoIssuer, tx: Transmitter, *args: str,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(ENTRY_POINT), "events", *args[:1], "--store", setup["store"], "--issuer", tx.issuer,
               "--audience", tx.audience, "--keys", setup["key"], "--subject-issuer", idp.issuer, *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, input=stdin, timeout=60,
                          env={**os.environ, "SA_SSF_POLL_TOKEN": POLL_TOKEN})


def start_cli(setup: dict[str, Any], idp: DemoIssuer, tx: Transmitter, *args: str) -> subprocess.Popen[str]:
    command = [str(ENTRY_POINT), "events", *args[:1], "--store", setup["store"], "--issuer", tx.issuer,
               "--audience", tx.audience, "--keys", setup["key"], "--subject-issuer", idp.issuer, *args[1:]]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SA_SSF_POLL_TOKEN": POLL_TOKEN})


def decide(setup: dict[str, Any], idp: DemoIssuer, token: str) -> str:
    guard = Guard(store=setup["store"], keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer)
    try:
        outcome = guard.admit(RequestInfo("GET", "/x", {"authorization": f"Bearer {token}"}))
    finally:
        guard.close()
    return outcome.code if isinstance(outcome, Denial) else "ok"


def rotate_event(idp: DemoIssuer, tx: Transmitter, sub: str) -> str:
    return tx.set(CAEP + "credential-change", {"credential_type": "password", "change_type": "revoke"},
                  sub_id=user(idp, sub))


# -- poll --------------------------------------------------------------------------------------------------------


def test_poll_applies_acknowledges_and_reports_errors(transmitter: tuple[PollTransmitter, str],
                                                      setup: dict[str, Any], idp: DemoIssuer,
                                                      tx: Transmitter) -> None:
    endpoint, url = transmitter
    sub, other = fresh_sub(), fresh_sub()
    good = endpoint.add(rotate_event(idp, tx, sub))
    forged = endpoint.add(tx.set(RISC + "account-disabled", sub_id=user(idp, other), key=generate_rsa_key()[0]))
    elsewhere = endpoint.add(tx.set(RISC + "account-disabled", sub_id=user(idp, other), aud="https://other.example"))
    verified = endpoint.add(tx.set(VERIFICATION, {"state": "st"}, sub_id=opaque("stream-1")))
    disabled = endpoint.add(tx.set(RISC + "account-disabled", sub_id=user(idp, other)))
    result = cli(setup, idp, tx, "poll", "--url", url, "--max-events", "2", "--max-rounds", "3", "--interval", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert endpoint.queue == {}
    assert endpoint.acked == [good, verified, disabled]
    assert {jti: e["err"] for jti, e in endpoint.errors.items()} == {forged: "invalid_key",
                                                                    elsewhere: "invalid_audience"}
    assert all(set(e) == {"err", "description"} for e in endpoint.errors.values())
    first, last = endpoint.requests[0], endpoint.requests[-1]
    assert first == {"maxEvents": 2, "returnImmediately": True, "ack": []}
    assert last["maxEvents"] == 0 and last["ack"] == [disabled]  # the final acknowledgement
    assert len(endpoint.requests) == 4
    assert f"applied credential-change jti={good}" in result.stdout
    assert f"refused jti={forged}: invalid_key" in result.stdout
    assert "done: rounds=3 received=5 applied=2 ignored=0 duplicates=0 verified=1 refused=2" in result.stdout
    assert POLL_TOKEN not in result.stdout + result.stderr
    assert decide(setup, idp, idp.token(sub)) == "stale_generation"
    assert decide(setup, idp, idp.token(sub, gen=1)) == "ok"
    assert decide(setup, idp, idp.token(other)) == "token_revoked"


def test_poll_redelivery_is_applied_once(transmitter: tuple[PollTransmitter, str], setup: dict[str, Any],
                                         idp: DemoIssuer, tx: Transmitter) -> None:
    endpoint, url = transmitter
    sub = fresh_sub()
    jti = endpoint.add(rotate_event(idp, tx, sub))
    endpoint.ignore_first_ack.add(jti)  # the transmitter loses the first acknowledgement and delivers it again
    result = cli(setup, idp, tx, "poll", "--url", url, "--max-rounds", "2", "--interval", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"applied credential-change jti={jti}" in result.stdout
    assert f"duplicate credential-change jti={jti}" in result.stdout
    assert endpoint.acked == [jti] and endpoint.queue == {}
    assert decide(setup, idp, idp.token(sub, gen=1)) == "ok"  # rotated once, not twice


def test_poll_once_and_a_transient_failure(transmitter: tuple[PollTransmitter, str], setup: dict[str, Any],
                                           idp: DemoIssuer, tx: Transmitter) -> None:
    endpoint, url = transmitter
    sub = fresh_sub()
    jti = endpoint.add(rotate_event(idp, tx, sub))
    endpoint.fail_next = 1
    result = cli(setup, idp, tx, "poll", "--url", url, "--once")
    assert result.returncode == 1, result.stdout + result.stderr  # the one round failed: nothing fetched
    assert "errors=1" in result.stdout and endpoint.acked == []
    result = cli(setup, idp, tx, "poll", "--url", url, "--once")
    assert result.returncode == 0 and endpoint.acked == [jti]
    assert [r["maxEvents"] for r in endpoint.requests] == [100, 100, 0]


def test_long_poll_is_held_until_a_set_arrives(transmitter: tuple[PollTransmitter, str], setup: dict[str, Any],
                                               idp: DemoIssuer, tx: Transmitter) -> None:
    endpoint, url = transmitter
    sub = fresh_sub()
    process = start_cli(setup, idp, tx, "poll", "--url", url, "--long-poll", "--once", "--timeout", "30")
    try:
        assert endpoint.holding.wait(WAIT), "the long poll never reached the transmitter"
        jti = endpoint.add(rotate_event(idp, tx, sub))
        out, err = process.communicate(timeout=WAIT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, out + err
    assert endpoint.requests[0]["returnImmediately"] is False
    assert endpoint.acked == [jti]
    assert decide(setup, idp, idp.token(sub)) == "stale_generation"


def test_poll_refused_by_the_transmitter(transmitter: tuple[PollTransmitter, str], setup: dict[str, Any],
                                         idp: DemoIssuer, tx: Transmitter) -> None:
    _, url = transmitter
    command = [str(ENTRY_POINT), "events", "poll", "--store", setup["store"], "--issuer", tx.issuer, "--audience",
               tx.audience, "--keys", setup["key"], "--url", url, "--token", "wrong-token", "--once"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "SA_SSF_POLL_TOKEN"})
    assert result.returncode == 1
    assert "refused the poll with HTTP 401: authentication_failed" in result.stderr
    assert "wrong-token" not in result.stdout + result.stderr


@pytest.mark.parametrize("status", ["200 OK", "400 Bad Request"])
def test_poll_answer_nested_too_deep_is_a_poll_error(transmitter: tuple[PollTransmitter, str], setup: dict[str, Any],
                                                     idp: DemoIssuer, tx: Transmitter, status: str) -> None:
    endpoint, url = transmitter
    endpoint.raw_answer = (status, b"[" * 200_000)  # json.loads raises RecursionError, not ValueError
    result = cli(setup, idp, tx, "poll", "--url", url, "--once")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    expected = "not JSON" if status.startswith("200") else "refused the poll with HTTP 400"
    assert expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_poll_needs_an_http_url_and_one_key_source(setup: dict[str, Any], idp: DemoIssuer,
                                                   tx: Transmitter) -> None:
    result = cli(setup, idp, tx, "poll", "--url", "file:///etc/passwd", "--once")
    assert result.returncode == 1 and "http(s) URL" in result.stderr
    command = [str(ENTRY_POINT), "events", "poll", "--store", setup["store"], "--issuer", tx.issuer, "--audience",
               tx.audience, "--url", "http://127.0.0.1:9/", "--once"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "exactly one of --keys, --jwks or --jwks-url" in result.stderr


# -- ingest ------------------------------------------------------------------------------------------------------


def test_ingest_applies_each_line_once(setup: dict[str, Any], idp: DemoIssuer, tx: Transmitter) -> None:
    sub, other = fresh_sub(), fresh_sub()
    change = rotate_event(idp, tx, sub)
    lines = ["# SETs exported from the IdP", change, "", change, "not a set",
             tx.set(RISC + "account-disabled", sub_id=user(idp, other)),
             tx.set("https://example.com/unknown", sub_id=user(idp, other))]
    path = setup["tmp"] / "sets.txt"
    path.write_text("\n".join(lines) + "\n")
    result = cli(setup, idp, tx, "ingest", str(path))
    assert result.returncode == 1, result.stdout + result.stderr  # one line was refused
    out = result.stdout.splitlines()
    assert out[0].startswith("line 2: applied credential-change") and f"rotate('{sub}')" in out[0]
    assert out[1].startswith("line 4: duplicate credential-change")
    assert out[2] == "line 5: refused invalid_request: the body is not a compact JWS"
    assert out[3].startswith("line 6: applied account-disabled")
    assert out[4].startswith("line 7: ignored unknown")
    assert len(out) == 5
    assert decide(setup, idp, idp.token(sub, gen=1)) == "ok"
    assert decide(setup, idp, idp.token(sub)) == "stale_generation"
    assert decide(setup, idp, idp.token(other)) == "token_revoked"


def test_ingest_from_stdin_as_json(setup: dict[str, Any], idp: DemoIssuer, tx: Transmitter) -> None:
    sub = fresh_sub()
    event = tx.set(CAEP + "session-revoked", sub_id=opaque(f"{sub}-s"))
    result = cli(setup, idp, tx, "ingest", "-", "--json", stdin=event + "\n")
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(result.stdout)
    assert record == {"line": 1, "status": "applied", "event": CAEP + "session-revoked",
                      "jti": jwt.decode(event, options={"verify_signature": False})["jti"],
                      "actions": [f"revoke_session('{sub}-s')"], "note": ""}
    assert decide(setup, idp, idp.token(sub, sid=f"{sub}-s")) == "session_revoked"
    refused = cli(setup, idp, tx, "ingest", "-", "--json", stdin="x.y.z\n")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["err"] == "invalid_request"


def test_ingest_with_a_jwks_file(setup: dict[str, Any], idp: DemoIssuer, tx: Transmitter) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(tx.private_key.public_key()))
    jwks = setup["tmp"] / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "tx-1"}]}))
    event = tx.set(VERIFICATION, {"state": "x"}, sub_id=opaque("stream"))
    command = [str(ENTRY_POINT), "events", "ingest", "--store", setup["store"], "--issuer", tx.issuer,
               "--audience", tx.audience, "--jwks", str(jwks), "-"]
    result = subprocess.run(command, capture_output=True, text=True, input=event, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("line 1: verified verification")
