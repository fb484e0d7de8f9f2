"""One grammar for every operator command: the subject as the argument, ``--session SID`` for one session, ``--json``
everywhere, ISO 8601 UTC times, and ``--actor`` / ``--reason`` recorded in the audit trail."""

from __future__ import annotations

import asyncio
import json
import re
import time

from test_cli_operator import Site, fresh, ok, site  # noqa: F401  (site: the store-parametrised fixture)

from sa_middleware.cli_operator import default_actor

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_revoke_and_compromise_take_the_subject_as_their_argument(site: Site) -> None:  # noqa: F811
    alice, bob = fresh("alice"), fresh("bob")
    old = site.token(alice, sid=f"{alice}-1")
    assert site.code(old) == "ok"
    assert "(token_revoked)" in ok(site.cli("revoke", alice))
    assert site.code(old) == "token_revoked"
    assert site.code(site.token(bob, sid=f"{bob}-1")) == "ok"
    assert "marked compromised: 1 context" in ok(site.cli("compromise", bob))
    assert "(token_revoked)" in ok(site.cli("revoke", "--sub", bob))  # the older spelling still works


def test_every_operation_answers_json(site: Site) -> None:  # noqa: F811
    svc, sid = fresh("svc"), fresh("sid")
    assert site.code(site.token(svc, sid=sid, gen=0)) == "ok"  # its tokens carry a generation: rotate warns not
    answers = [json.loads(ok(site.cli(*args, "--json"))) for args in (
        ("rotate", svc), ("pause", sid), ("resume", sid), ("revoke", "--session", sid), ("revoke", svc),
        ("compromise", svc), ("device", "laptop-1", "--noncompliant"), ("privileges", svc, "read", "write"))]
    assert [a["operation"] for a in answers] == [
        "rotate", "pause_session", "resume_session", "revoke_session", "revoke_principal", "report_compromise",
        "set_device_status", "set_privileges"]
    assert answers[0] == {"operation": "rotate", "sub": svc, "generation": 1}
    assert answers[3] == {"operation": "revoke_session", "session_id": sid, "known": True}
    assert answers[4]["watermark"] <= time.time() + 1
    assert answers[7]["scopes"] == ["read", "write"]


def test_sessions_without_a_subject_lists_every_principal_bounded(site: Site) -> None:  # noqa: F811
    subs = [fresh("p") for _ in range(3)]
    for i, sub in enumerate(subs):
        assert site.code(site.token(sub, sid=f"{sub}-s")) == "ok"
        if i < 2:
            time.sleep(0.01)  # distinct last-seen times: newest first
    listed = json.loads(ok(site.cli("sessions", "--json")))
    assert [s["sub"] for s in listed] == subs[::-1]
    assert [s["sub"] for s in json.loads(ok(site.cli("sessions", "--limit", "2", "--json")))] == subs[:0:-1]
    header, *rows = ok(site.cli("sessions")).splitlines()
    assert header.split()[:3] == ["SESSION", "SUB", "STATUS"] and len(rows) == 3


def test_tables_show_iso_8601_utc_times_with_relative_expiry(site: Site) -> None:  # noqa: F811
    alice = fresh("alice")
    assert site.code(site.token(alice, sid=f"{alice}-1"), "/objects/3", "PUT", hold=True) == "ok"
    sessions, locks, audit = site.cli_all(("sessions", alice), ("locks",), ("audit", "--sub", alice))
    row = ok(sessions).splitlines()[1]
    assert len(re.findall(ISO, row)) == 3 and re.search(ISO + r" \(in \d+m\)", row)
    assert re.search(ISO + r" \(in \d+s\)$", ok(locks).splitlines()[1])
    site.guard.release(site.held.pop())
    site.guard.pause_session(f"{alice}-1")
    assert re.match(ISO + " ", ok(site.cli("audit", "--sub", alice)).splitlines()[1])
    assert audit.returncode == 0


def test_operations_record_the_operator_the_reason_and_the_session_s_principal(site: Site) -> None:  # noqa: F811
    agent, sid = fresh("agent"), fresh("run")
    assert site.code(site.token(agent, sid=sid)) == "ok"
    ok(site.cli("pause", sid, "--actor", "alice@ops-1", "--reason", "runaway loop"))
    ok(site.cli("resume", sid))
    records = json.loads(ok(site.cli("audit", "--sub", agent, "--kind", "operation", "--json")))
    assert [(r["code"], r["sub"], r["session_id"]) for r in records] == [
        ("resume_session", agent, sid), ("pause_session", agent, sid)]
    assert records[1]["detail"] == "paused; by alice@ops-1: runaway loop"
    assert records[0]["detail"] == f"resumed; by {default_actor()}"


def test_async_session_operations_name_the_principal_too(site: Site) -> None:  # noqa: F811
    agent, sid = fresh("agent"), fresh("run")
    assert site.code(site.token(agent, sid=sid)) == "ok"

    async def pause_and_resume() -> None:
        assert await site.guard.apause_session(sid) and await site.guard.aresume_session(sid)
        assert await site.guard.arevoke_session(sid)
        await site.guard.areport_compromise(session_id=sid)

    asyncio.run(pause_and_resume())
    records = site.guard.audit(sub=agent, kind="operation")
    assert [(r.code, r.sub, r.session_id) for r in records] == [
        ("report_compromise", agent, sid), ("revoke_session", agent, sid), ("resume_session", agent, sid),
        ("pause_session", agent, sid)]
