"""The operator's view through the real entry point: listings never write, and what they show cannot be reordered
or hidden by the values they print (README "Command line").
"""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from pathlib import Path

import redis
import redis_support
from redis_support import RedisServer, private_redis  # noqa: F401 - the fixture
from test_cli_operator import Site, fails, fresh, ok, run

from sa_middleware.operations import Operations
from sa_middleware.stores import open_store

READ_ONLY = [("sessions", "alice"), ("sessions", "alice", "--json"), ("locks",), ("locks", "--json"), ("audit",),
             ("audit", "--json"), ("audit", "--sub", "alice", "--since", "1h")]


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key of the server with its serialised value."""
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


def test_listings_on_a_fresh_redis_write_nothing_and_say_so(private_redis: RedisServer) -> None:  # noqa: F811
    """A Redis database no application ever used: each listing says there is no store there (exit 1, no alarm
    about a state loss) and leaves the database empty: no epoch marker, no state_loss record."""
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert client.dbsize() == 0
        for args in READ_ONLY:
            err = fails(run(*args, store=private_redis.url), 1, f"no store at {private_redis.url}")
            assert "nothing was ever written there" in err
            assert "lost" not in err.lower() and "state_loss" not in err
            assert client.dbsize() == 0, (args, client.keys())
        # the library's own listings read only too
        ops = Operations(private_redis.url)
        try:
            assert (ops.sessions("alice"), ops.locks(), ops.audit()) == ([], [], [])
            assert not ops.store.has_state() and client.dbsize() == 0
        finally:
            ops.close()
        # the same on a shared server, under a prefix of its own (and its password is never printed)
        shared = redis_support.shared_redis_url()
        prefix = f"t{uuid.uuid4().hex[:12]}"
        uri = f"{shared}?prefix={prefix}"
        for args in READ_ONLY[:3]:
            fails(run(*args, store=uri), 1, "no store at")
        assert list(redis.Redis.from_url(shared).scan_iter(match=f"{prefix}:*")) == []
        # the default user has no password: any password is accepted, and never printed
        secret = private_redis.url.replace("redis://", "redis://default:hunter2@")
        err = fails(run("locks", store=secret), 1, private_redis.url.replace("redis://", "redis://default:***@"))
        assert "hunter2" not in err and client.dbsize() == 0
    finally:
        client.close()


def test_listings_on_a_used_redis_store_change_nothing(private_redis: RedisServer) -> None:  # noqa: F811
    uri = f"{private_redis.url}?prefix=sa"
    open_store(uri, bootstrap=True).close()
    site = Site(uri)
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert site.code(site.token("alice", sid="a1")) == "ok"
        assert site.code(site.token("alice", sid="a2"), "/objects/7", "PUT", hold=True) == "ok"
        assert site.code(None) == "missing_token"
        site.guard.flush()  # what the Guard's keeper writes (audit records, generation-claim notes), now
        before = snapshot(client)
        for args in READ_ONLY:
            ok(run(*args, store=uri))
        assert snapshot(client) == before
        assert "a1" in ok(run("sessions", "alice", store=uri))
    finally:
        site.close()
        client.close()


def test_a_state_loss_is_still_detected_by_the_next_write(private_redis: RedisServer) -> None:  # noqa: F811
    """Listings leave a missing marker missing: the application's next admission detects the loss."""
    uri = f"{private_redis.url}?prefix=sa"
    open_store(uri, bootstrap=True).close()
    site = Site(uri)
    try:
        token = site.token("bob", sid="b1")
        assert site.code(token) == "ok"
        redis.Redis.from_url(private_redis.url).flushall()
        assert site.guard.sessions("bob") == [] and site.guard.locks() == []
        assert site.code(token) == "token_revoked"  # issued before the loss
        assert [r.code for r in site.guard.audit(code="state_loss")] == ["state_loss"]
    finally:
        site.close()


BIDI = "\u202e\u200f\u2066\u2067\u2068\u2069\ufeff\u200b\u200d\u2028\u061c"


def test_format_and_bidi_characters_are_escaped_everywhere(tmp_path: Path) -> None:
    """sub, sid, lock key, actor, device, route and detail carrying bidi and other format characters: every table
    and line shows them escaped; --json keeps them (valid JSON, the exact values)."""
    site = Site(f"sqlite:///{tmp_path / 'sa.db'}")
    try:
        mallory = fresh("mallory") + "\u202egnp.exe"
        sid = "s\u2066" + BIDI
        obj = "7\u202e" + BIDI
        assert site.code(site.token(mallory, sid=sid, act={"sub": "act\u200f"}, device_id="dev\u2067"),
                         f"/objects/{obj}", "PUT", hold=True) == "ok"
        assert site.code(None, "/x\u202e" + BIDI) == "missing_token"
        site.guard.rotate(mallory)
        assert site.code(site.token(mallory, sid=sid, gen=0)) == "stale_generation"
        outputs = [ok(r) for r in site.cli_all(("sessions", mallory), ("locks",), ("audit",),
                                               ("audit", "--sub", mallory), ("compromise", "--sub", mallory))]
        hidden = re.compile("[" + "".join(BIDI) + "\u0080-\u009f]")
        for out in outputs:
            assert not hidden.search(out), out
            assert not [c for c in out if unicodedata.category(c) in ("Cf", "Zl", "Zp")]
        sessions, locks, audit, by_sub, marked = outputs
        esc = "\\u202e\\u200f\\u2066\\u2067\\u2068\\u2069\\ufeff\\u200b\\u200d\\u2028\\u061c"
        assert f"s\\u2066{esc}" in sessions and "act\\u200f" in sessions and "dev\\u2067" in sessions
        assert f"object:7\\u202e{esc}" in locks and "\\u202egnp.exe" in locks
        assert f"/x\\u202e{esc}" in audit and "\\u202egnp.exe" in by_sub
        assert f"s\\u2066{esc}" in marked
        # --json: valid JSON carrying the exact values
        [session] = json.loads(ok(site.cli("sessions", mallory, "--json")))
        assert (session["session_id"], session["sub"], session["actor"], session["device"]) == (
            sid, mallory, "act\u200f", "dev\u2067")
        assert [lock["key"] for lock in json.loads(ok(site.cli("locks", "--json")))] == [f"object:{obj}"]
        routes = {r["route"] for r in json.loads(ok(site.cli("audit", "--json")))}
        assert "/x\u202e" + BIDI in routes
        # an argument echoed back is escaped too
        out = ok(site.cli("sessions", "nobody\u202e"))
        assert out.strip() == "no active sessions for nobody\\u202e"
    finally:
        site.close()


def test_a_cluster_store_never_used_is_reported_and_left_empty() -> None:
    cluster = redis_support.shared_cluster()
    uri = f"{cluster.url}?prefix=t{uuid.uuid4().hex[:12]}"
    prefix = uri.rpartition("=")[2]
    client = cluster.client()
    try:
        fails(run("sessions", "alice", store=uri), 1, "nothing was ever written there")
        ops = Operations(uri)
        try:
            assert (ops.sessions("alice"), ops.locks(), ops.audit()) == ([], [], [])
            assert not ops.store.has_state()
        finally:
            ops.close()
        assert list(client.scan_iter(match=f"{prefix}:*", target_nodes=client.ALL_NODES)) == []
        open_store(uri, bootstrap=True).close()
        assert ok(run("sessions", "alice", store=uri)).strip() == "no active sessions for alice"
    finally:
        client.close()
        redis_support.forget_prefix(uri)
