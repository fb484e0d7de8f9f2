"""The SSF push receiver over real HTTP, on uvicorn (ASGI) and werkzeug's threaded server (WSGI).

Each CAEP / RISC event pushed to the receiver changes what the protected app, sharing the Guard, answers next:
the matching refusal comes out. Then the refusals of the receiver itself: forged, mis-addressed, replayed and
malformed SETs, each with its RFC 8935 error code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ssf_support import (
    CAEP,
    RECEIVER_PATH,
    RISC,
    STRICT_AUTHORIZATION,
    STRICT_PATH,
    VERIFICATION,
    Site,
    Transmitter,
    fresh_sub,
    later_token,
    opaque,
    open_site,
    set_error,
    user,
)
from support import WAIT, problem

from sa_middleware.tokens import generate_rsa_key


@pytest.fixture(scope="module", params=["asgi", "wsgi"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    path = tmp_path_factory.mktemp(f"ssf-{request.param}") / "sa.db"
    s = open_site(request.param, f"sqlite:///{path}")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def _reset_strict(site: Site) -> None:
    site.strict.verification_state = None


# -- each event in, the matching refusal out ------------------------------------------------------------------------


def test_session_revoked_for_one_session(site: Site) -> None:
    sub = fresh_sub()
    token, other = site.idp.token(sub, sid=f"{sub}-a"), site.idp.token(sub, sid=f"{sub}-b")
    assert site.get("/things", token).status_code == 200
    assert site.get("/things", other).status_code == 200
    site.push_ok(site.tx.set(CAEP + "session-revoked", {"event_timestamp": time.time()}, sub_id=opaque(f"{sub}-a")))
    problem(site.get("/things", token), 401, "session_revoked")
    assert site.get("/things", other).status_code == 200  # only that session


def test_session_revoked_for_a_complex_subject_with_a_session(site: Site) -> None:
    sub = fresh_sub()
    token, other = site.idp.token(sub, sid=f"{sub}-a"), site.idp.token(sub, sid=f"{sub}-b")
    subject = {"format": "complex", "user": user(site.idp, sub), "session": opaque(f"{sub}-b"),
               "tenant": opaque("t-1")}
    site.push_ok(site.tx.set(CAEP + "session-revoked", {"initiating_entity": "policy"}, sub_id=subject))
    problem(site.get("/things", other), 401, "session_revoked")
    assert site.get("/things", token).status_code == 200


def test_session_revoked_for_a_principal_revokes_every_older_session(site: Site) -> None:
    sub = fresh_sub()
    first, second = site.idp.token(sub, sid=f"{sub}-a"), site.idp.token(sub, sid=f"{sub}-b")
    unseen = site.idp.token(sub, sid=f"{sub}-c")  # issued before the event, never presented yet
    assert site.get("/things", first).status_code == 200
    assert site.get("/things", second).status_code == 200
    at = time.time()
    site.push_ok(site.tx.set(CAEP + "session-revoked", {"event_timestamp": at}, sub_id=user(site.idp, sub)))
    for token in (first, second, unseen):
        problem(site.get("/things", token), 401, "session_revoked")
    assert site.get("/things", later_token(site.idp, sub, at, sid=f"{sub}-d")).status_code == 200
    assert {s.session_id: s.status for s in site.guard.sessions(sub)} == {
        f"{sub}-a": "revoked", f"{sub}-b": "revoked", f"{sub}-d": "active"}


def test_credential_change_rotates_the_principal(site: Site) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub)
    assert site.get("/things", token).status_code == 200
    site.push_ok(site.tx.set(CAEP + "credential-change", {"credential_type": "password", "change_type": "create"},
                             sub_id=user(site.idp, sub)))
    assert site.get("/things", token).status_code == 200  # a new credential: nothing to refuse
    site.push_ok(site.tx.set(CAEP + "credential-change", {"credential_type": "password", "change_type": "update"},
                             sub_id=user(site.idp, sub)))
    problem(site.get("/things", token), 401, "stale_generation")
    assert site.get("/things", site.idp.token(sub, gen=1)).status_code == 200


def test_token_claims_change_withdraws_scopes(site: Site) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub, scope="read write")
    assert site.get("/scoped", token).status_code == 200
    at = time.time()
    site.push_ok(site.tx.set(CAEP + "token-claims-change", {"claims": {"scope": "write"}},
                             sub_id={"format": "email", "email": sub}))  # e-mail subjects name the sub
    problem(site.get("/scoped", token), 403, "insufficient_scope")
    assert site.get("/scoped", later_token(site.idp, sub, at, scope="read")).status_code == 200


def test_assurance_level_change_is_used_by_step_up(site: Site) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub, acr="silver")
    problem(site.get("/strong", token), 401, "step_up_required")
    raised = {"namespace": "NIST-AAL", "current_level": "nist-aal2", "previous_level": "nist-aal1",
              "change_direction": "increase", "event_timestamp": time.time()}
    site.push_ok(site.tx.set(CAEP + "assurance-level-change", raised, sub_id=user(site.idp, sub)))
    assert site.get("/strong", token).status_code == 200  # the stored level (gold) replaces the token's acr
    lowered = {"namespace": "NIST-AAL", "current_level": "nist-aal1", "change_direction": "decrease",
               "event_timestamp": time.time()}
    site.push_ok(site.tx.set(CAEP + "assurance-level-change", lowered, sub_id=user(site.idp, sub)))
    body = problem(site.get("/strong", site.idp.token(sub, acr="gold", iat=time.time() - 30)), 401,
                   "step_up_required")
    assert body["acr_values"] == "gold"


def test_device_compliance_change(site: Site) -> None:
    sub, device = fresh_sub(), f"dev-{fresh_sub()}"
    token = site.idp.token(sub, device_id=device)
    assert site.get("/device", token).status_code == 200
    subject = {"format": "complex", "device": {"format": "iss_sub", "iss": site.idp.issuer, "sub": device}}
    site.push_ok(site.tx.set(CAEP + "device-compliance-change",
                             {"previous_status": "compliant", "current_status": "not-compliant"}, sub_id=subject))
    problem(site.get("/device", token), 403, "device_noncompliant")
    assert site.get("/things", token).status_code == 200  # only routes that require a compliant device
    site.push_ok(site.tx.set(CAEP + "device-compliance-change",
                             {"previous_status": "not-compliant", "current_status": "compliant"},
                             sub_id=opaque(device)))  # a simple opaque subject names the device here
    assert site.get("/device", token).status_code == 200


def test_risk_level_change_to_high_raises_the_risk(site: Site) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub)
    assert site.get("/calm", token).status_code == 200
    site.push_ok(site.tx.set(CAEP + "risk-level-change", {"principal": "USER", "current_level": "MEDIUM"},
                             sub_id=user(site.idp, sub)))
    assert site.get("/calm", token).status_code == 200
    site.push_ok(site.tx.set(CAEP + "risk-level-change",
                             {"principal": "USER", "current_level": "HIGH", "previous_level": "LOW",
                              "risk_reason": "PASSWORD_FOUND_IN_DATA_BREACH"}, sub_id=user(site.idp, sub)))
    resp = problem(site.get("/calm", token), 403, "risk_too_high")
    assert resp["code"] == "risk_too_high"
    assert site.get("/things", token).status_code == 200  # routes without max_risk are not affected


def test_risk_level_change_to_high_can_report_a_compromise(site: Site) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub)
    assert site.get("/things", token).status_code == 200
    site.push_ok(site.tx.set(CAEP + "risk-level-change", {"principal": "USER", "current_level": "HIGH"},
                             sub_id=user(site.idp, sub)), path=STRICT_PATH,
                 headers={"authorization": STRICT_AUTHORIZATION})
    problem(site.get("/things", token), 401, "credential_compromised")


def test_credential_compromise_reports_a_compromise(site: Site) -> None:
    sub = fresh_sub()
    token, sibling = site.idp.token(sub, sid=f"{sub}-a"), site.idp.token(sub, sid=f"{sub}-b")
    assert site.get("/things", token).status_code == 200
    assert site.get("/things", sibling).status_code == 200
    site.push_ok(site.tx.set(RISC + "credential-compromise", {"credential_type": "password"},
                             sub_id=user(site.idp, sub)))
    reported = time.time()  # the report was recorded before the push was answered
    problem(site.get("/things", token), 401, "credential_compromised")
    problem(site.get("/things", sibling), 401, "credential_compromised")
    assert site.get("/things", later_token(site.idp, sub, reported, sid=f"{sub}-c")).status_code == 200


def test_account_disabled_then_enabled(site: Site) -> None:
    sub = fresh_sub()
    old = site.idp.token(sub)
    assert site.get("/things", old).status_code == 200
    site.push_ok(site.tx.set(RISC + "account-disabled", {"reason": "hijacking"}, sub_id=user(site.idp, sub)))
    disabled = time.time()  # the disable was recorded before the push was answered
    problem(site.get("/things", old), 401, "token_revoked")
    fresh = later_token(site.idp, sub, disabled)
    problem(site.get("/things", fresh), 401, "token_revoked")  # disabled: even a token issued since
    site.push_ok(site.tx.set(RISC + "account-enabled", sub_id=user(site.idp, sub)))
    assert site.get("/things", fresh).status_code == 200
    problem(site.get("/things", old), 401, "token_revoked")  # what was issued before the disable stays dead


def test_verification_event_is_recorded(site: Site) -> None:
    stream = opaque("stream-42")
    site.push_ok(site.tx.set(VERIFICATION, {"state": "VGhpcyBpcyBhIHN0YXRl"}, sub_id=stream))
    assert site.receiver.last_verification is not None
    assert site.receiver.last_verification.state == "VGhpcyBpcyBhIHN0YXRl"
    assert site.receiver.last_verification.stream_id == "stream-42"
    site.strict.verification_state = "expected-state"
    auth = {"authorization": STRICT_AUTHORIZATION}
    set_error(site.push(site.tx.set(VERIFICATION, {"state": "another"}, sub_id=stream), path=STRICT_PATH,
                        headers=auth), "invalid_state")
    site.push_ok(site.tx.set(VERIFICATION, {"state": "expected-state"}, sub_id=stream), path=STRICT_PATH,
                 headers=auth)
    assert site.strict.last_verification is not None and site.strict.last_verification.state == "expected-state"


def test_unknown_events_are_accepted_ignored_and_logged(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub)
    caplog.set_level(logging.INFO, logger="sa_middleware.events")
    unknown = site.tx.set("https://example.com/event-type/something-new", {"x": 1}, sub_id=user(site.idp, sub))
    site.push_ok(unknown)
    site.push_ok(site.tx.set(CAEP + "session-established", {"acr": "AAL2"}, sub_id=user(site.idp, sub)))
    assert site.get("/things", token).status_code == 200
    assert "ignored something-new" in caplog.text and "ignored session-established" in caplog.text
    assert unknown not in caplog.text and unknown.split(".")[1] not in caplog.text


def test_events_about_subjects_not_ours_are_accepted_and_ignored(site: Site) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub)
    foreign = {"format": "iss_sub", "iss": "https://someone-else.example", "sub": sub}
    site.push_ok(site.tx.set(RISC + "account-disabled", sub_id=foreign))
    assert site.get("/things", token).status_code == 200


# -- the receiver's refusals ----------------------------------------------------------------------------------------


def test_forged_set_is_invalid_key(site: Site) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub)
    forger, _ = generate_rsa_key()
    body = set_error(site.push(site.tx.set(RISC + "account-disabled", sub_id=user(site.idp, sub), key=forger)),
                     "invalid_key")
    assert "signature" in body["description"]
    assert site.get("/things", token).status_code == 200  # nothing applied


def test_set_signed_by_the_access_token_issuer_is_invalid_key(site: Site) -> None:
    """Only the transmitter's keys verify SETs, not the keys the Guard trusts for access tokens."""
    sub = fresh_sub()
    set_error(site.push(site.tx.set(RISC + "account-disabled", sub_id=user(site.idp, sub),
                                    key=site.idp.private_key)), "invalid_key")


def test_mis_addressed_sets(site: Site) -> None:
    sub = fresh_sub()
    token = site.idp.token(sub)
    event = (RISC + "account-disabled", {})
    set_error(site.push(site.tx.set(*event, sub_id=user(site.idp, sub), aud="https://another-rp.example")),
              "invalid_audience")
    set_error(site.push(site.tx.set(*event, sub_id=user(site.idp, sub), iss="https://another-idp.example")),
              "invalid_issuer")
    site.push_ok(site.tx.set(*event, sub_id=user(site.idp, sub), aud=["x", site.tx.audience]))  # aud contains ours
    problem(site.get("/things", token), 401, "token_revoked")


def test_replayed_set_is_accepted_and_applied_once(site: Site) -> None:
    sub = fresh_sub()
    change = site.tx.set(CAEP + "credential-change", {"credential_type": "x509", "change_type": "revoke"},
                         sub_id=user(site.idp, sub))
    site.push_ok(change)
    site.push_ok(change)  # the transmitter retried: 202, not applied again
    site.push_ok(change, path=STRICT_PATH, headers={"authorization": STRICT_AUTHORIZATION})  # another receiver
    assert site.get("/things", site.idp.token(sub, gen=1)).status_code == 200  # rotated once: generation 1
    problem(site.get("/things", site.idp.token(sub, gen=0)), 401, "stale_generation")


def test_a_duplicate_pushed_concurrently_is_applied_once(site: Site) -> None:
    sub = fresh_sub()
    change = site.tx.set(CAEP + "credential-change", {"credential_type": "pin", "change_type": "delete"},
                         sub_id=user(site.idp, sub))
    workers, barrier, statuses = 6, threading.Barrier(6), []
    lock = threading.Lock()

    def push() -> None:
        barrier.wait(WAIT)
        status = site.push(change).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=push) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert statuses == [202] * workers
    assert site.get("/things", site.idp.token(sub, gen=1)).status_code == 200


@pytest.mark.parametrize(("case", "description"), [
    ("not a jwt", "not a"),
    ("encrypted", "encrypted"),
    ("wrong typ", "typ"),
    ("no typ", "typ"),
    ("with sub", "sub"),
    ("with exp", "exp"),
    ("two events", "exactly one event"),
    ("no events", "events"),
    ("unknown subject format", "unsupported subject format"),
    ("no subject", "sub_id"),
    ("no jti", "jti"),
    ("no iat", "iat"),
    ("issued in the future", "future"),
    ("too old", "older"),
    ("bad payload", "change_type"),
])
def test_malformed_sets_are_invalid_request(site: Site, case: str, description: str) -> None:
    sub = fresh_sub()
    tx, subject = site.tx, user(site.idp, sub)
    event = (CAEP + "credential-change", {"credential_type": "password", "change_type": "revoke"})
    bodies = {
        "not a jwt": "definitely not a token",
        "encrypted": "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",
        "wrong typ": tx.set(*event, sub_id=subject, headers={"typ": "JWT"}),
        "no typ": tx.set(*event, sub_id=subject, headers={"typ": None}),
        "with sub": tx.set(*event, sub_id=subject, sub=sub),
        "with exp": tx.set(*event, sub_id=subject, exp=int(time.time()) + 600),
        "two events": tx.set(*event, sub_id=subject,
                             events={event[0]: event[1], RISC + "account-disabled": {}}),
        "no events": tx.set(*event, sub_id=subject, events={}),
        "unknown subject format": tx.set(*event, sub_id={"format": "phone_number", "phone_number": "+1 555"}),
        "no subject": tx.set(*event),
        "no jti": tx.set(*event, sub_id=subject, jti=None),
        "no iat": tx.set(*event, sub_id=subject, iat=None),
        "issued in the future": tx.set(*event, sub_id=subject, iat=int(time.time()) + 3600),
        "too old": tx.set(*event, sub_id=subject, iat=int(time.time()) - 8 * 86400),
        "bad payload": tx.set(event[0], {"credential_type": "password", "change_type": "teleport"}, sub_id=subject),
    }
    body = set_error(site.push(bodies[case]), "invalid_request")
    assert description in body["description"]
    assert site.get("/things", site.idp.token(sub)).status_code == 200  # nothing applied


def test_transport_refusals(site: Site) -> None:
    ok = site.tx.set(VERIFICATION, {"state": "s"}, sub_id=opaque("stream"))
    set_error(site.push(ok, content_type="application/json"), "invalid_request")
    set_error(site.push(ok, content_type="application/jwt"), "invalid_request")
    site.push_ok(ok.encode(), content_type="application/secevent+jwt; charset=utf-8")
    set_error(site.push("x" * 70000), "invalid_request")  # over max_bytes
    resp = httpx.get(site.base + RECEIVER_PATH, timeout=WAIT)
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"


@pytest.mark.parametrize("length", [b"\xb2", b"9" * 5000])  # SUPERSCRIPT TWO (str.isdigit()); 4300+ digits
def test_a_content_length_int_refuses_is_invalid_request(site: Site, length: bytes) -> None:
    host, port = site.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as conn:
        conn.sendall(b"POST " + RECEIVER_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/secevent+jwt\r\nContent-Length: " + length + b"\r\n\r\nxx")
        status_line = conn.makefile("rb").readline()
    assert status_line.split()[1] == b"400", status_line  # the receiver's, or the server's own refusal
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"xx"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": RECEIVER_PATH,
             "headers": [(b"content-type", b"application/secevent+jwt"), (b"content-length", length)]}
    asyncio.run(site.receiver(scope, receive, send))
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"])["err"] == "invalid_request"


def test_push_authorization(site: Site) -> None:
    event = site.tx.set(VERIFICATION, {"state": "s"}, sub_id=opaque("stream"))
    set_error(site.push(event, path=STRICT_PATH), "authentication_failed")
    set_error(site.push(event, path=STRICT_PATH, headers={"authorization": "Bearer wrong"}), "access_denied")
    set_error(site.push(event, path=STRICT_PATH,
                        headers={"authorization": "Basic " + STRICT_AUTHORIZATION.split()[1]}), "access_denied")
    site.push_ok(event, path=STRICT_PATH, headers={"authorization": "bearer " + STRICT_AUTHORIZATION.split()[1]})


def test_nothing_of_a_set_or_secret_is_logged(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sub = fresh_sub()
    forged = site.tx.set(RISC + "account-disabled", sub_id=user(site.idp, sub), key=generate_rsa_key()[0])
    accepted = site.tx.set(RISC + "account-enabled", sub_id=user(site.idp, sub))
    site.push(forged)
    site.push(accepted, path=STRICT_PATH, headers={"authorization": "Bearer wrong-secret-value"})
    site.push_ok(accepted)
    for secret in (forged, accepted, *forged.split("."), *accepted.split("."), "wrong-secret-value",
                   STRICT_AUTHORIZATION.split()[1]):
        assert secret not in caplog.text


def test_store_unavailable_is_503_and_the_retry_is_applied(tmp_path: Path, site: Site) -> None:
    """A store that stays locked: 503 with Retry-After and nothing recorded, so the transmitter's retry applies."""
    path = tmp_path / "locked.db"
    locked = open_site(site.flavour, f"sqlite:///{path}?timeout=0.2")
    try:
        sub = fresh_sub()
        change = locked.tx.set(CAEP + "credential-change", {"credential_type": "app", "change_type": "revoke"},
                               sub_id=user(locked.idp, sub))
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            resp = locked.push(change)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
        assert change not in resp.text
        locked.push_ok(change)
        problem(locked.get("/things", locked.idp.token(sub)), 401, "stale_generation")
        assert locked.get("/things", locked.idp.token(sub, gen=1)).status_code == 200
    finally:
        locked.stop()


def test_another_transmitter_cannot_push(site: Site) -> None:
    other = Transmitter()  # same issuer name and audience, another key: not the configured transmitter
    set_error(site.push(other.set(RISC + "account-disabled", sub_id=user(site.idp, fresh_sub()))), "invalid_key")


def test_receiver_paths_are_independent(site: Site) -> None:
    resp = httpx.post(site.base + RECEIVER_PATH.rstrip("/") + "/any/sub/path", timeout=WAIT,
                      content=site.tx.set(VERIFICATION, sub_id=opaque("s")),
                      headers={"content-type": "application/secevent+jwt"})
    assert resp.status_code == 202


def test_transmitter_keys_unavailable_is_503_then_applied_and_a_dropped_key_is_refused(tmp_path: Path) -> None:
    """The transmitter's JWKS down: 503 with Retry-After and nothing recorded; back up: the retry is applied. A key
    dropped with the Guard's drop_key is refused by the receiver too."""
    import http.server

    from jwt.algorithms import RSAAlgorithm
    from werkzeug.test import Client

    from sa_middleware import Guard
    from sa_middleware.demo import DemoIssuer
    from sa_middleware.events import SSFReceiver

    tx = Transmitter()
    jwk = {**RSAAlgorithm.to_jwk(tx.private_key.public_key(), as_dict=True), "kid": "tx-1"}
    up = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"keys": [jwk]}).encode() if up.is_set() else b"down"
            self.send_response(200 if up.is_set() else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    idp = DemoIssuer()
    guard = Guard(store=f"sqlite:///{tmp_path / 'ssf.db'}", keys=idp.public_pem, algorithms=["RS256"],
                  issuer=idp.issuer, audience=idp.audience)
    try:
        receiver = SSFReceiver(guard, issuer=tx.issuer, audience=tx.audience,
                               jwks_url=f"http://127.0.0.1:{httpd.server_address[1]}/jwks")
        client = Client(receiver.wsgi)
        sub = fresh_sub()
        change = tx.set(CAEP + "credential-change", {"credential_type": "app", "change_type": "revoke"},
                        sub_id=user(idp, sub))
        headers = {"content-type": "application/secevent+jwt"}
        resp = client.post("/", data=change, headers=headers)
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
        up.set()
        time.sleep(int(resp.headers["retry-after"]))  # as the transmitter does
        assert client.post("/", data=change, headers=headers).status_code == 202
        assert guard.store.generation_claim(sub) is None and [r.code for r in guard.audit(sub)] == ["rotate"]
        guard.drop_key("tx-1")
        resp = client.post("/", data=tx.set(RISC + "account-disabled", sub_id=user(idp, sub)), headers=headers)
        assert resp.status_code == 400 and resp.json["err"] == "invalid_key"
    finally:
        guard.close()
        httpd.shutdown()
