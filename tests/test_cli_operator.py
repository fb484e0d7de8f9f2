"""The operator commands of ``sa-middleware`` through the real entry point (a subprocess), on SQLite and Redis.

Each test prepares the shared state with a Guard in this process (real tokens, real admissions), runs the command
as an operator would, and checks its output (``--json`` parsed) against the store, and its effect on the next
admission. Errors must be one clear line and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import redis_support

from sa_middleware import Denial, Guard, Policy, RequestInfo
from sa_middleware.demo import DemoIssuer
from sa_middleware.guard import Admitted
from sa_middleware.operations import iso
from sa_middleware.records import Ticket
from sa_middleware.tokens import generate_rsa_key, mint_token

ENTRY_POINT = Path(sys.executable).parent / "sa-middleware"
POLICIES = {
    "GET /things": Policy(),
    "POST /write": Policy(scopes={"write"}),
    "GET /device": Policy(require_compliant_device=True),
    "PUT /objects/{id}": Policy(locks=["object:{id}"], on_lock_conflict="pause"),
    "GET /solo": Policy(max_sessions=1, on_session_limit="evict_oldest"),
}


def run(*args: str, store: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``sa-middleware ARGS`` (with ``SA_STORE=store`` when given), as an operator runs it."""
    full_env = {k: v for k, v in os.environ.items() if k != "SA_STORE"}
    if store is not None:
        full_env["SA_STORE"] = store
    full_env.update(env or {})
    return subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=60, env=full_env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], status: int, message: str) -> str:
    """A clean failure: exit ``status``, ``message`` on stderr, no traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return result.stderr


class Site:
    """A Guard on the store under test, with helpers to make requests and keep tickets."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.idp = DemoIssuer()
        self.guard = Guard(store=uri, keys=self.idp.public_pem, algorithms=["RS256"], issuer=self.idp.issuer,
                           audience=self.idp.audience, policies=POLICIES)
        self.held: list[Ticket] = []

    def token(self, sub: str, **claims: Any) -> str:
        return self.idp.token(sub, **claims)

    def code(self, token: str | None, path: str = "/things", method: str = "GET", *, hold: bool = False) -> str:
        """``ok`` or the denial code; the ticket is released unless ``hold``."""
        headers = {"user-agent": "pytest"} | ({"authorization": f"Bearer {token}"} if token else {})
        outcome = self.guard.admit(RequestInfo(method, path, headers, "10.1.2.3"))
        if isinstance(outcome, Denial):
            return outcome.code
        assert isinstance(outcome, Admitted) and outcome.ticket is not None
        if hold:
            self.held.append(outcome.ticket)
        else:
            self.guard.release(outcome.ticket)
        return "ok"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        # what this process holds (audit records, which principals' tokens carry a generation claim) is written
        # now, not by the keeper at a moment the command may or may not see
        self.guard.flush()
        return run(*args, store=self.uri)

    def cli_all(self, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        """Independent commands (reads), run side by side."""
        self.guard.flush()
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda args: run(*args, store=self.uri), commands))

    def close(self) -> None:
        for ticket in self.held:
            self.guard.release(ticket)
        self.guard.close()


STORES = ["sqlite", "redis"]


@pytest.fixture(params=STORES)
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    uri = redis_support.store_uri(request.param, tmp_path)
    s = Site(uri)
    try:
        yield s
    finally:
        s.close()
        if request.param != "sqlite":
            redis_support.forget_prefix(uri)


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------------------------------------------- listings


def test_sessions_lists_the_principal_s_sessions(site: Site) -> None:
    alice = fresh("alice")
    assert site.code(site.token(alice, sid="a1")) == "ok"
    assert site.code(site.token(alice, sid="a2", sa_kind="agent", device_id="laptop-9")) == "ok"
    site.guard.pause_session("a2")
    as_json, as_table, none, none_json = site.cli_all(("sessions", alice, "--json"), ("sessions", alice),
                                                      ("sessions", "nobody"), ("sessions", "nobody", "--json"))
    listed = json.loads(ok(as_json))
    assert listed == [asdict(s) for s in site.guard.sessions(alice)]
    assert [(s["session_id"], s["status"], s["kind"]) for s in listed] == [("a1", "active", "human"),
                                                                           ("a2", "paused", "agent")]
    table = ok(as_table).splitlines()
    assert table[0].split() == ["SESSION", "STATUS", "KIND", "CREATED", "LAST", "SEEN", "EXPIRES", "CLIENT",
                                "DEVICE", "ACTOR"]
    assert table[1].split()[:3] == ["a1", "active", "human"] and "10.1.2.3" in table[1]
    assert table[2].split()[:3] == ["a2", "paused", "agent"] and "laptop-9" in table[2]
    assert table[1].index("active") == table[2].index("paused")  # aligned columns
    assert ok(none) == "no active sessions for nobody\n"
    assert json.loads(ok(none_json)) == []


def test_locks_lists_the_held_locks(site: Site) -> None:
    bob = fresh("bob")
    assert site.code(site.token(bob, sid="b1"), "/objects/7", "PUT", hold=True) == "ok"
    as_json, as_table = site.cli_all(("locks", "--json"), ("locks",))
    listed = json.loads(ok(as_json))
    assert listed == [asdict(lock) for lock in site.guard.locks()]
    [lock] = listed
    assert (lock["key"], lock["mode"], lock["sub"], lock["session_id"]) == ("object:7", "exclusive", bob, "b1")
    assert lock["fencing_token"] >= 1 and lock["ticket_id"] == site.held[0].ticket_id
    header, row = ok(as_table).splitlines()
    assert header.split() == ["KEY", "MODE", "FENCE", "SUB", "SESSION", "TICKET", "EXPIRES"]
    assert row.split()[:5] == ["object:7", "exclusive", str(lock["fencing_token"]), bob, "b1"]
    site.guard.release(site.held.pop())
    assert ok(site.cli("locks")) == "no locks held\n"


# ---------------------------------------------------------------------------------------------------- operations


def test_rotate(site: Site) -> None:
    svc = fresh("svc")
    old = site.token(svc, gen=0)
    assert site.code(old) == "ok"
    assert f"{svc}: generation 1;" in ok(site.cli("rotate", svc))
    assert site.code(old) == "stale_generation"
    assert site.code(site.token(svc, gen=1)) == "ok"


def test_revoke_a_principal_or_a_session(site: Site) -> None:
    alice = fresh("alice")
    old = site.token(alice, sid="r1")
    other = site.token(alice, sid="r2")
    assert site.code(old) == site.code(other) == "ok"
    assert "session r2 revoked (session_revoked)" in ok(site.cli("revoke", "--session", "r2"))
    assert site.code(other) == "session_revoked" and site.code(old) == "ok"
    out = ok(site.cli("revoke", alice))
    assert out.startswith(f"{alice}: every token issued before ") and "(token_revoked)" in out
    assert site.code(old) == "token_revoked"
    time.sleep(0.01)  # the next token's iat must be after the watermark (the store's clock)
    assert site.code(site.token(alice, sid="r3")) == "ok"
    assert "before it was seen" in ok(site.cli("revoke", "--session", "ghost-session"))
    assert site.code(site.token(alice, sid="ghost-session")) == "session_revoked"


def test_compromise(site: Site) -> None:
    alice, agent = fresh("alice"), fresh("agent")
    assert site.code(site.token(alice, sid="c1")) == "ok"
    assert site.code(site.token(alice, sid="c2")) == "ok"
    assert site.code(site.token(agent, sid="c3", act={"sub": alice})) == "ok"  # acting with alice's authority
    issued = time.time() - 1  # tokens issued before the report, however long the command takes
    out = ok(site.cli("compromise", "--session", "c1")).splitlines()
    assert out[0] == "marked compromised: 3 contexts" and sorted(x.strip() for x in out[1:]) == ["c1", "c2", "c3"]
    assert {site.code(site.token(alice, sid="c1", iat=issued)),
            site.code(site.token(agent, sid="c3", act={"sub": alice}, iat=issued))} == {"credential_compromised"}
    fails(site.cli("compromise", "--session", "ghost"), 1, "session ghost is unknown: nothing was marked")
    dave = fresh("dave")  # never seen: the store cannot tell its issuer, so the operator names it
    fails(site.cli("compromise", "--sub", dave), 1, f"subject {dave} is not known to the store under any issuer; "
                                                    "pass --issuer")
    issued = time.time() - 1
    assert "no stored session was active" in ok(site.cli("compromise", "--sub", dave, "--issuer", site.idp.issuer))
    assert site.code(site.token(dave, iat=issued)) == "credential_compromised"


def test_a_subject_known_under_two_issuers_needs_the_issuer(site: Site) -> None:
    other = DemoIssuer(issuer="https://other-idp.example")
    guard_b = Guard(store=site.uri, keys=other.public_pem, algorithms=["RS256"], issuer=other.issuer,
                    audience=other.audience, policies=POLICIES)
    try:
        alice = fresh("alice")
        assert site.code(site.token(alice, sid="i1", gen=0)) == "ok"
        request = RequestInfo("GET", "/things", {"user-agent": "pytest",
                                                 "authorization": f"Bearer {other.token(alice, sid='i2', gen=0)}"},
                              "10.1.2.3")
        outcome = guard_b.admit(request)
        assert isinstance(outcome, Admitted)
        guard_b.release(outcome.ticket)
        names = ", ".join(repr(x) for x in sorted((other.issuer, site.idp.issuer)))
        message = f"ambiguous: subject {alice} is known under issuers {names}; pass --issuer"
        for command in (("rotate", alice), ("sessions", alice), ("revoke", "--sub", alice),
                        ("privileges", alice, "--none"), ("compromise", "--sub", alice)):
            fails(site.cli(*command), 1, message)
        assert f"{alice}: generation 1;" in ok(site.cli("rotate", alice, "--issuer", other.issuer))
        listed = json.loads(ok(site.cli("sessions", alice, "--issuer", site.idp.issuer, "--json")))
        assert [(s["session_id"], s["iss"]) for s in listed] == [("i1", site.idp.issuer)]
        assert site.code(site.token(alice, sid="i1", gen=0)) == "ok"  # the other issuer's rotation is not ours
        assert isinstance(guard_b.admit(request), Denial)
    finally:
        guard_b.close()


def test_pause_and_resume(site: Site) -> None:
    bot = fresh("bot")
    token = site.token(bot, sid="p1", sa_kind="agent")
    assert site.code(token) == "ok"
    assert ok(site.cli("pause", "p1")).startswith("session p1 paused")
    assert site.code(token) == "session_paused"
    assert ok(site.cli("resume", "p1")) == "session p1 resumed\n"
    assert site.code(token) == "ok"
    fails(site.cli("resume", "p1"), 1, "session p1 was not resumed: it is unknown, or neither paused nor compromised")
    fails(site.cli("pause", "ghost"), 1, "session ghost was not paused: it is unknown, revoked or compromised")


def test_device(site: Site) -> None:
    device = fresh("laptop")
    token = site.token(fresh("eve"), device_id=device)
    assert site.code(token, "/device") == "ok"
    assert ok(site.cli("device", device, "--noncompliant")) == f"device {device}: non-compliant (device_noncompliant)\n"
    assert site.code(token, "/device") == "device_noncompliant"
    assert ok(site.cli("device", device, "--compliant")) == f"device {device}: compliant\n"
    assert site.code(token, "/device") == "ok"


def test_privileges(site: Site) -> None:
    alice = fresh("alice")
    token = site.token(alice, scope="read write", iat=time.time() - 5)
    assert site.code(token, "/write", "POST") == "ok"
    assert ok(site.cli("privileges", alice, "read", "audit")) == \
        f"{alice}: tokens issued before now keep at most: audit read\n"
    assert site.code(token, "/write", "POST") == "insufficient_scope"
    assert ok(site.cli("privileges", alice, "--clear")) == f"{alice}: scope limit lifted\n"
    assert site.code(token, "/write", "POST") == "ok"
    assert "every scope of tokens issued before now withdrawn" in ok(site.cli("privileges", alice, "--none"))
    assert site.code(token, "/write", "POST") == "insufficient_scope"


# ---------------------------------------------------------------------------------------------------- audit


def test_audit_shows_every_kind_of_record_and_filters_them(site: Site) -> None:
    alice, agent, human, carol = fresh("alice"), fresh("agent"), fresh("human"), fresh("carol")
    started = time.time()
    assert site.code(None) == "missing_token"
    assert site.code("not-a-token") == "invalid_token"
    assert site.code(site.token(alice, sid="al1", gen=2)) == "ok"
    assert site.code(site.token(alice, sid="al1", gen=1)) == "stale_generation"
    assert site.code(site.token(human, sid="h1"), "/objects/3", "PUT", hold=True) == "ok"
    assert site.code(site.token(agent, sid="ag1", sa_kind="agent"), "/objects/3", "PUT") == "session_paused"
    assert site.code(site.token(carol, sid="ca1"), "/solo") == "ok"
    assert site.code(site.token(carol, sid="ca2"), "/solo") == "ok"
    ok(site.cli("rotate", alice))

    records = json.loads(ok(site.cli("audit", "--json", "--since", "10m")))
    assert all(set(r) == {"time", "kind", "code", "source", "sub", "session_id", "route", "detail"} for r in records)
    times = [r["time"] for r in records]
    assert times == sorted(times, reverse=True) and times[-1] >= started - 5
    seen = {(r["kind"], r["code"], r["source"], r["sub"], r["session_id"], r["route"]) for r in records}
    assert {("denial", "missing_token", "middleware", None, None, "GET /things"),
            ("denial", "invalid_token", "middleware", None, None, "GET /things"),
            ("denial", "stale_generation", "middleware", alice, "al1", "GET /things"),
            ("denial", "session_paused", "middleware", agent, "ag1", "PUT /objects/{id}"),
            ("change", "session_paused", "middleware", agent, "ag1", "PUT /objects/{id}"),
            ("change", "session_evicted", "middleware", carol, "ca1", "GET /solo"),
            ("operation", "rotate", "cli", alice, None, None)} <= seen
    assert not any("eyJ" in (r["detail"] or "") for r in records)  # never a token

    by_sub, by_session, by_code, limited, too_early, as_table = site.cli_all(
        ("audit", "--json", "--sub", alice), ("audit", "--json", "--session", "ag1", "--kind", "change"),
        ("audit", "--json", "--code", "session_evicted"), ("audit", "--json", "--limit", "2"),
        ("audit", "--until", iso(started - 3600), "--sub", alice), ("audit", "--sub", alice))
    assert [r["code"] for r in json.loads(ok(by_sub))] == ["rotate", "stale_generation"]
    assert [(r["code"], r["sub"]) for r in json.loads(ok(by_session))] == [("session_paused", agent)]
    assert [r["sub"] for r in json.loads(ok(by_code))] == [carol]
    assert json.loads(ok(limited)) == records[:2]
    assert ok(too_early) == "no audit records match\n"
    table = ok(as_table).splitlines()
    assert table[0].split() == ["TIME", "KIND", "CODE", "SOURCE", "SUB", "SESSION", "ROUTE", "DETAIL"]
    assert table[1].split()[1:5] == ["operation", "rotate", "cli", alice]
    assert table[2].split()[1:7] == ["denial", "stale_generation", "middleware", alice, "al1", "GET"]


def test_events_ingest_is_in_the_audit_trail(site: Site, tmp_path: Path) -> None:
    key, public = generate_rsa_key()
    (tmp_path / "tx.pem").write_text(public)
    alice = fresh("alice")
    token = site.token(alice, sid="ev1")
    assert site.code(token) == "ok"
    payload = {"iss": "https://idp.example/ssf", "aud": "https://rp.example/ssf", "iat": int(time.time()),
               "jti": uuid.uuid4().hex, "sub_id": {"format": "opaque", "id": "ev1"},
               "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {}}}
    (tmp_path / "sets.txt").write_text(mint_token(key, "RS256", payload, {"typ": "secevent+jwt"}) + "\n")
    out = ok(site.cli("events", "ingest", str(tmp_path / "sets.txt"), "--issuer", "https://idp.example/ssf",
                      "--audience", "https://rp.example/ssf", "--keys", str(tmp_path / "tx.pem")))
    assert "applied session-revoked" in out
    assert site.code(token) == "session_revoked"
    [record] = json.loads(ok(site.cli("audit", "--json", "--session", "ev1", "--kind", "operation")))
    assert (record["code"], record["source"]) == ("revoke_session", "event:session-revoked")


def test_control_characters_from_the_store_are_escaped(tmp_path: Path) -> None:
    """A client's request path (an audit route) and a token's sid reach the operator's terminal escaped."""
    site = Site(f"sqlite:///{tmp_path / 'sa.db'}")
    try:
        mallory = fresh("mallory")
        assert site.code(None, "/x\x1b]0;pwned\x07\x1b[2J\x9b31mFAKE\x7f") == "missing_token"
        assert site.code(site.token(mallory, sid="s\x1b[2J\r\n1")) == "ok"
        audit, sessions, marked = site.cli_all(("audit",), ("sessions", mallory), ("compromise", "--sub", mallory))
        for result in (audit, sessions, marked):
            out = ok(result)
            assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", out), out
        assert "/x\\x1b]0;pwned\\x07\\x1b[2J\\x9b31mFAKE\\x7f" in ok(audit)
        assert "s\\x1b[2J\\x0d\\x0a1" in ok(sessions)
        assert ok(marked).splitlines()[1:] == ["  s\\x1b[2J\\x0d\\x0a1"]
        route = [r["route"] for r in json.loads(ok(site.cli("audit", "--json"))) if r["code"] == "missing_token"]
        assert route == ["/x\x1b]0;pwned\x07\x1b[2J\x9b31mFAKE\x7f"]  # --json keeps the value (JSON-escaped)
    finally:
        site.close()


# ---------------------------------------------------------------------------------------------------- errors


def test_errors_are_one_clear_line_and_an_exit_status(tmp_path: Path) -> None:
    """Unreachable or unusable stores (status 1) and usage errors (status 2): no traceback, never a new store."""
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("these are not the tables you are looking for\n" * 100)
    cases: list[tuple[tuple[str, ...], str | None, int, str]] = [
        (("sessions", "alice"), f"sqlite:///{tmp_path / 'missing.db'}", 1, "no SQLite store at"),
        (("locks", "--store", f"sqlite:///{tmp_path / 'missing.db'}"), None, 1, "no SQLite store at"),
        (("audit",), f"sqlite:///{not_a_db}", 1, "cannot open the store"),
        (("rotate", "alice"), "redis://127.0.0.1:1/0", 1, "Error: redis store unavailable"),
        (("audit", "--json"), "redis://127.0.0.1:1/0", 1, "Error: redis store unavailable"),
        (("locks",), "memory://", 2, "memory:// lives inside one process"),
        (("locks",), "nosuch://x", 1, "unknown store scheme"),
        (("sessions", "--limit", "0"), None, 2, "Invalid value for '--limit'"),
        (("rotate",), None, 2, "Missing argument 'SUB'"),
        (("pause",), None, 2, "Missing argument 'SID'"),
        (("resume",), None, 2, "Missing argument 'SID'"),
        (("revoke",), None, 2, "give SUB (every token of the principal) or --session SID (one session)"),
        (("revoke", "alice", "--session", "s1"), None, 2, "give SUB (every token of the principal) or --session"),
        (("revoke", "alice", "--sub", "bob"), None, 2, "two principals given"),
        (("compromise",), None, 2, "give SUB or --session SID"),
        (("device", "laptop-1"), None, 2, "give --compliant or --noncompliant"),
        (("privileges", "alice"), None, 2, "give SCOPE..., --none or --clear (exactly one)"),
        (("privileges", "alice", "read", "--clear"), None, 2, "exactly one"),
        (("revoke", "--session", "s1", "--issuer", "https://idp.example"), None, 2, "--issuer goes with SUB"),
        (("compromise", "--session", "s1", "--issuer", "https://idp.example"), None, 2, "--issuer goes with SUB"),
        (("audit", "--since", "soon"), None, 2, "Invalid value for --since"),
        (("audit", "--limit", "0"), None, 2, "Invalid value for '--limit'"),
        (("audit", "--kind", "rumour"), None, 2, "Invalid value for '--kind'"),
    ]
    with ThreadPoolExecutor(4) as pool:  # independent commands: run them side by side
        results = list(pool.map(lambda c: run(*c[0], store=c[1]), cases))
    for (args, _, status, message), result in zip(cases, results, strict=True):
        err = fails(result, status, message)
        if status == 1:
            assert len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "missing.db").exists()  # the CLI never creates an empty store


def test_a_store_uri_that_does_not_parse_is_a_usage_error(tmp_path: Path) -> None:
    key = tmp_path / "tx.pem"
    key.write_text(generate_rsa_key()[1])
    cases: list[tuple[tuple[str, ...], str | None]] = [
        (("locks", "--store", "redis://[::1"), None),
        (("audit",), "sqlite://[::1/sa.db"),
        (("sessions", "alice", "--store", "redis://::1]:6379"), None),
        (("events", "ingest", "-", "--store", "redis://[::1", "--issuer", "https://idp.example",
          "--audience", "rp", "--keys", str(key)), None),
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run(*c[0], store=c[1]), cases))
    for result in results:
        err = fails(result, 2, "Invalid value for '--store': not a store URI")
        assert [line for line in err.splitlines() if line.startswith("Error")] == [err.strip().splitlines()[-1]]


def test_store_option_wins_over_the_environment(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'sa.db'}"
    Guard(store=uri, keys="secret-for-hs256-only-here-32bytes!", algorithms=["HS256"]).close()
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    results = list(ThreadPoolExecutor(3).map(lambda a: run(*a[0], store=a[1]), [
        (("locks", "--store", uri), missing), (("locks",), uri), (("--help",), None)]))
    assert ok(results[0]) == ok(results[1]) == "no locks held\n"
    for command in ("sessions", "locks", "revoke", "rotate", "compromise", "pause", "resume", "device",
                    "privileges", "audit", "events", "token", "demo"):
        assert f"  {command} " in ok(results[2])


# ---------------------------------------------------------------------------- ids starting with "-", rotation


def test_ids_starting_with_a_dash_work_and_printed_hints_work_as_pasted(site: Site) -> None:
    bot, session = fresh("-bot"), fresh("-5My")
    token = site.token(bot, sid=session, sa_kind="agent")
    assert site.code(token) == "ok"
    out = ok(site.cli("pause", "--", session))
    assert site.code(token) == "session_paused"
    hint = re.search(r"until: (sa-middleware resume -- \S+)\)", out)
    assert hint is not None, out
    ok(site.cli(*hint.group(1).split()[1:]))  # the hint, as printed
    assert site.code(token) == "ok"
    ok(site.cli("revoke", f"--session={session}"))
    assert site.code(token) == "session_revoked"
    other = site.token(bot, sid=fresh("s"), sa_kind="agent", gen=0)
    assert site.code(other) == "ok"
    assert ok(site.cli("rotate", "--", bot)).startswith(f"{bot}: generation 1")
    assert site.code(other) == "stale_generation"


def test_rotate_warns_when_tokens_carry_no_generation_and_reset_undoes_it(site: Site) -> None:
    plain, counted = fresh("svc"), fresh("svc")
    assert site.code(site.token(plain)) == "ok"  # its issuer sends no gen claim
    assert site.code(site.token(counted, gen=3)) == "ok"
    site.guard.flush()  # this process's notes, for the CLI's process to read
    result = site.cli("rotate", plain)
    assert ok(result).startswith(f"{plain}: generation 1")
    assert "carried no generation claim" in result.stderr
    hint = re.search(r"^  undo: +(sa-middleware rotate --reset .+)$", result.stderr, re.M)
    assert hint is not None, result.stderr
    outcome = site.guard.admit(RequestInfo("GET", "/things", {"authorization": f"Bearer {site.token(plain)}"}, "h"))
    assert isinstance(outcome, Denial) and outcome.code == "stale_generation"
    assert "obtain a new token" not in outcome.detail and "no generation claim" in outcome.detail
    assert ok(site.cli(*hint.group(1).split()[1:])) == f"{plain}: generation reset from 1 to 0\n"
    assert site.code(site.token(plain)) == "ok"
    result = site.cli("rotate", counted)
    assert ok(result).startswith(f"{counted}: generation 4")
    assert result.stderr == ""
    assert site.code(site.token(counted, gen=3)) == "stale_generation"
    assert site.code(site.token(counted, gen=4)) == "ok"
    assert [r.code for r in site.guard.audit(plain, kind="operation")] == ["reset_generation", "rotate"]


def test_rotate_hints_work_when_pasted_into_a_shell(site: Site) -> None:
    """The undo hint names the issuer it rotated under and quotes the subject: an Auth0 subject (``auth0|...``) is
    not a pipe, and a subject known under two issuers is not ambiguous."""
    sub = f"auth0|{uuid.uuid4().hex[:8]}"
    other = DemoIssuer(issuer="https://other-idp.example")
    other.private_key, other.public_pem = site.idp.private_key, site.idp.public_pem
    second = Guard(store=site.uri, keys=other.public_pem, algorithms=["RS256"], issuer=other.issuer,
                   audience=other.audience)
    try:
        for guard, idp in ((site.guard, site.idp), (second, other)):
            outcome = guard.admit(RequestInfo("GET", "/things", {"authorization": f"Bearer {idp.token(sub)}"}))
            assert isinstance(outcome, Admitted)
            guard.release(outcome.ticket)
            guard.flush()
        listed = ok(site.cli("sessions", "--limit", "10000")).splitlines()
        assert listed[0].split()[:3] == ["SESSION", "SUB", "ISSUER"]  # one sub of two issuers: two principals
        assert {line.split()[2] for line in listed if f" {sub} " in line} == {site.idp.issuer, other.issuer}
        result = site.cli("rotate", "--issuer", other.issuer, sub)
        assert ok(result).startswith(f"{sub}: generation 1")
        hint = re.search(r"^  undo: +(sa-middleware rotate --reset .+)$", result.stderr, re.M)
        assert hint is not None, result.stderr
        env = {k: v for k, v in os.environ.items() if k != "SA_STORE"}
        env |= {"SA_STORE": site.uri, "PATH": f"{ENTRY_POINT.parent}{os.pathsep}{env.get('PATH', '')}"}
        pasted = subprocess.run(["sh", "-c", hint.group(1)], capture_output=True, text=True, timeout=60, env=env)
        assert ok(pasted) == f"{sub}: generation reset from 1 to 0\n", pasted.stderr
        outcome = second.admit(RequestInfo("GET", "/things", {"authorization": f"Bearer {other.token(sub)}"}))
        assert isinstance(outcome, Admitted)
        second.release(outcome.ticket)
    finally:
        second.close()


def test_keys_commands_write_notes_every_guard_reads(site: Site) -> None:
    before = site.guard.store.key_notes()
    assert ok(site.cli("keys", "refresh")).startswith("signing keys:")
    assert ok(site.cli("keys", "drop", "demo-1")).startswith("signing key demo-1: dropped")
    generation, dropped = site.guard.store.key_notes()
    assert generation == before[0] + 2 and "demo-1" in dropped
    fails(site.cli("keys", "drop", "../etc"), 1, "a key id is 1..128 characters")
