"""Redis-specific behaviour of the Redis store; the shared rules are in test_conformance.py (which runs on Redis, a
Redis Cluster and a Sentinel-managed master too).

Here: URIs and options; EVALSHA with a reload after NOSCRIPT; one script call per admission and per release; the
server's clock for every expiry; the epoch marker (state loss detected after FLUSHALL, a restart, or the loss of one
cluster master's keys); timeouts (a paused server, a socket that never answers) and recovery; the cluster's
cross-slot admissions with compensation under threads; a Sentinel failover; the event loop never waiting on a thread.

Servers: the machine's shared Redis (fresh key prefix per test), and private ``redis-server`` processes from
``tests/redis_support.py`` for everything that pauses, flushes, kills or fails over. Without Redis these tests skip,
unless CI is set: then they fail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_support import (
    HOST,
    RedisServer,
    forget_prefix,
    fresh_store,
    redis_store_available,
    shared_cluster,
    shared_redis_url,
    store_uri,
    wait_for,
)
from support import admission_of, make_guard

from sa_middleware import Guard, RequestInfo
from sa_middleware.demo import DemoIssuer
from sa_middleware.denials import Denial
from sa_middleware.errors import ConfigurationError, StoreUnavailable
from sa_middleware.guard import Admitted
from sa_middleware.records import Admission, LockRequest, Ticket
from sa_middleware.stores import open_store
from sa_middleware.stores.base import Store

WAIT = 20.0  # bound of every condition wait, reached only when something is broken


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------------------------------------- helpers

def redis_store() -> Any:
    redis_store_available()
    from sa_middleware.stores import redis as module

    return module


def adm(**overrides: Any) -> Admission:
    """An admission of session ``<sub>-1``; its token was issued a minute ago (by this host's clock) and expires in
    an hour."""
    now = time.time()
    sub = overrides.get("sub", "alice")
    values: dict[str, Any] = {
        "ticket_id": uuid.uuid4().hex, "sub": sub, "kind": "human", "session_id": f"{sub}-1", "token_hash": "h",
        "token_exp": now + 3600, "token_iat": now - 60, "token_gen": None, "jti": None, "actor": None,
        "credential": None, "device": None, "client": "10.0.0.1", "user_agent": "pytest", "route": "PUT /objects/{id}",
    }
    values.update(overrides)
    return admission_of(**values)


def ok(store: Store, **overrides: Any) -> Ticket:
    result = store.admit(adm(**overrides))
    assert isinstance(result, Ticket), result
    return result


def refused(store: Store, code: str, **overrides: Any) -> Denial:
    result = store.admit(adm(**overrides))
    assert isinstance(result, Denial), f"expected {code}, got a ticket"
    assert result.code == code, f"expected {code}, got {result.code}: {result.detail}"
    return result


def server_time(client: Any) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


@contextlib.contextmanager
def opened(uri: str, **options: Any) -> Iterator[Any]:
    store = open_store(uri, **options)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def shared_uri(tmp_path: Path) -> Iterator[str]:
    """A fresh, bootstrapped prefix on the machine's shared Redis, deleted afterwards."""
    uri = store_uri("redis", tmp_path)
    yield uri
    forget_prefix(uri)


@pytest.fixture
def cluster_uri(tmp_path: Path) -> Iterator[str]:
    uri = store_uri("cluster", tmp_path)
    yield uri
    forget_prefix(uri)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server: free to pause, flush, restart."""
    redis_store()
    srv = RedisServer(tmp_path, name="private")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def private_uri(srv: RedisServer, **query: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return fresh_store(srv.url) + extra


# ---------------------------------------------------------------------------------------------------- URIs, options

def test_uri_forms_are_parsed() -> None:
    parse = redis_store()._parse_uri
    options: dict[str, Any] = {}
    target = parse("redis://user:secret@cache.example:6380/3?prefix=app&timeout=0.5&health_check_interval=5", options)
    assert (target.mode, target.url) == ("standalone", "redis://user:secret@cache.example:6380/3?health_check_interval=5")
    assert options == {"prefix": "app", "timeout": "0.5"}
    assert parse("rediss://cache.example/0", {}).url == "rediss://cache.example/0"
    assert parse("redis+unix:///run/redis.sock?db=2", {}).url == "unix:///run/redis.sock?db=2"
    assert parse("redis+unix://:pw@/run/redis.sock", {}).url == "unix://:pw@/run/redis.sock"
    sentinel = parse("redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/4?max_connections=9", options := {})
    assert (sentinel.mode, sentinel.service, sentinel.db, sentinel.password) == ("sentinel", "mymaster", 4, "pw")
    assert sentinel.nodes == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert options == {"max_connections": "9"}
    cluster = parse("redis+cluster://n1:7000,n2:7001,n3", {})
    assert (cluster.mode, cluster.nodes) == ("cluster", (("n1", 7000), ("n2", 7001), ("n3", 6379)))


@pytest.mark.parametrize(("uri", "options"), [
    ("redis://127.0.0.1:6379/0?timeout=0", {}),
    ("redis://127.0.0.1:6379/0?timeout=soon", {}),
    ("redis://127.0.0.1:6379/0", {"timeout": float("inf")}),
    ("redis://127.0.0.1:6379/0?max_connections=0", {}),
    ("redis://127.0.0.1:6379/0?bootstrap=maybe", {}),
    ("redis://127.0.0.1:6379/0?prefix=a{b}", {}),
    ("redis://127.0.0.1:6379/0", {"socket_timeout": 5}),
    ("redis://127.0.0.1:6379/0", {"retry": None}),
    ("redis://127.0.0.1:6379/0?no_such_option=1", {}),
    ("redis://127.0.0.1:6379/0", {"no_such_option": 1}),
    ("redis+sentinel://127.0.0.1:26379", {}),
    ("redis+sentinel://127.0.0.1:26379/master?ssl_ca=x", {}),
    ("redis+cluster://127.0.0.1:7000/2", {}),
    ("redis+cluster://127.0.0.1:notaport", {}),
    ("redis+unix://", {}),
])
def test_bad_uris_and_options_fail_at_start_up(uri: str, options: dict[str, Any]) -> None:
    redis_store()
    with pytest.raises(ConfigurationError):
        open_store(uri, **options)


def test_options_reach_the_pool_and_the_server(shared_uri: str) -> None:
    name = f"sa-test-{uuid.uuid4().hex[:8]}"
    with opened(shared_uri + "&timeout=0.4&max_connections=7", client_name=name) as store:
        assert (store.timeout, store.connect_timeout, store.max_connections) == (0.4, 0.4, 7)
        pool = store._client().connection_pool
        assert pool.max_connections == 7
        assert pool.connection_kwargs["socket_timeout"] == 0.4
        ok(store)
        clients = store._client().client_list()
        assert any(c.get("name") == name for c in clients)
    with opened(shared_uri, timeout=0.3, connect_timeout=1.5) as store:
        assert (store.timeout, store.connect_timeout) == (0.3, 1.5)
    with opened(shared_uri) as store:
        assert store.timeout == 0.25  # the documented default: well under a second


def test_unix_socket_sentinel_and_cluster_uris_serve_admissions(tmp_path: Path) -> None:
    redis_store()
    sock = tmp_path / "redis.sock"
    srv = RedisServer(tmp_path, name="unix", extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"])
    srv.start()
    try:
        uri = f"redis+unix://{sock}?prefix=u{uuid.uuid4().hex[:8]}&bootstrap=true"
        with opened(uri) as store:
            ticket = ok(store, locks=(LockRequest("obj:1"),))
            refused(store, "object_locked", sub="bob", locks=(LockRequest("obj:1"),))
            store.release(ticket)
            ok(store, sub="bob", locks=(LockRequest("obj:1"),))
    finally:
        srv.stop()
    for kind in ("sentinel", "cluster"):
        uri = store_uri(kind, tmp_path)
        try:
            with opened(uri) as store:
                ticket = ok(store, locks=(LockRequest("obj:1"),))
                assert [lock.ticket_id for lock in store.locks()] == [ticket.ticket_id]
                store.release(ticket)
                assert store.locks() == []
        finally:
            forget_prefix(uri)


def test_lua_scripts_are_package_data() -> None:
    module = redis_store()
    folder = resources.files("sa_middleware.stores") / "lua"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".lua"))
    assert names == sorted(module._SCRIPT_FILES + module._CLUSTER_SCRIPTS)
    assert "sa.ops.admit" in module._script("admit") and "sa.ops.renew" in module._script("renew")
    assert "sa.ops.compromise" in module._script("ops") and "sa.ops.compromise" not in module._script("admit")
    release = module._script("release")
    assert "function sa.release" in release and "sa.ops" not in release  # the release path defines nothing else
    name, code = module._library()  # Redis 7 and later: every file once, as a function library
    assert code.startswith(f"#!lua name={name}\n") and code.count("redis.register_function(") == 2


_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from('"\\/\x00\x1f\u2028{}%|'), max_size=12)
_MAYBE_TEXT = st.none() | _TEXT
_NUMBER = st.floats(min_value=0, max_value=2e9, allow_nan=False) | st.integers(0, 2**53 - 1)


@settings(max_examples=300, deadline=None)
@given(sub=_TEXT, session_id=_TEXT, client=_TEXT, user_agent=_TEXT, route=_TEXT, jti=_MAYBE_TEXT,
       actor=_MAYBE_TEXT, credential=_MAYBE_TEXT, device=_MAYBE_TEXT, acr=_MAYBE_TEXT, iss=_TEXT,
       token_exp=_NUMBER, token_iat=st.none() | _NUMBER, token_gen=st.none() | st.integers(0, 2**53 - 1),
       auth_time=st.none() | _NUMBER, token_scopes=st.frozensets(_TEXT, max_size=3),
       locks=st.lists(st.tuples(_TEXT, st.sampled_from(["shared", "exclusive"])), max_size=3),
       audit_admitted=st.booleans(), lease=_NUMBER, cluster=st.booleans())
def test_the_admission_arguments_are_the_admission(locks: list[tuple[str, str]], cluster: bool, **values: Any) -> None:
    """The admission as the script reads it: its request's own fields as arguments, and a fragment per token's
    values; together they decode to exactly what the admission holds (hostile text included), and two admissions
    differing in one value never share a fragment."""
    module = redis_store()
    store = object.__new__(module.RedisStore)
    store.cluster = cluster
    a = adm(**values, locks=tuple(LockRequest(key, mode) for key, mode in locks))

    def decoded(a: Any) -> dict[str, Any]:
        (tid, client, ua, route, locks), text = store._spec_args(a)
        token = json.loads(text)
        request = {"tid": tid, "client": client, "ua": ua, "route": route, "locks": json.loads(locks) if locks else []}
        assert not set(request) & set(token)
        return {**token, **request}

    assert decoded(a) == store._spec(a)
    assert decoded(a) == store._spec(a)  # again, from the cached fragment
    for name, other in (("sub", values["sub"] + "x"), ("token_exp", values["token_exp"] + 1),
                        ("token_gen", (values["token_gen"] or 0) + 1), ("iss", values["iss"] + "x")):
        changed = adm(**{**values, name: other}, locks=a.locks)
        assert decoded(changed) == store._spec(changed)
    # values Python holds equal (False and 0) share the cached fragment: they must mean the same to the script
    twin = adm(**{**values, "audit_admitted": int(values["audit_admitted"])}, locks=a.locks)
    assert decoded(twin)["audit_admitted"] is values["audit_admitted"]


# ---------------------------------------------------------------------------------------------------- scripts

def commandstats(srv: RedisServer) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats)."""
    with contextlib.closing(srv.client()) as client:
        info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


def test_the_function_library_is_loaded_once_and_again_after_a_flush(server: RedisServer) -> None:
    with opened(private_uri(server)) as store:
        ok(store, session_id="s-1")  # a fresh server: the library is loaded once
        before = commandstats(server)
        assert before["function|load"] == 1
        store.release(ok(store, session_id="s-2"))
        assert commandstats(server)["function|load"] == 1
        server.command("FUNCTION", "FLUSH")  # a restarted server or an operator empties the libraries
        ok(store, session_id="s-3")
        for i in range(3):
            store.release(ok(store, session_id=f"s-{i + 4}"))
        after = commandstats(server)
        assert after["function|load"] == 2  # one reload, then FCALL again
        assert "evalsha" not in after and "eval" not in after


def test_threads_finding_the_library_missing_together_load_it_once(server: RedisServer) -> None:
    threads = 8
    with opened(private_uri(server)) as store:
        ok(store, session_id="s-0")
        server.command("FUNCTION", "FLUSH")
        start = threading.Barrier(threads)

        def admit(i: int) -> None:
            start.wait()
            store.release(ok(store, session_id=f"s-{i + 1}"))

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(admit, range(threads)))
        ok(store, session_id="s-last")
        after = commandstats(server)
        assert after["function|load"] == 2
        assert after["fcall"] >= threads + 2 and "evalsha" not in after


@pytest.mark.anyio
async def test_calls_of_an_event_loop_finding_the_library_missing_together_load_it_once(server: RedisServer) -> None:
    import asyncio

    calls = 8
    store = open_store(private_uri(server))
    try:
        assert isinstance(await store.aadmit(adm(session_id="s-0")), Ticket)
        server.command("FUNCTION", "FLUSH")
        admitted = await asyncio.gather(*(store.aadmit(adm(session_id=f"s-{i + 1}")) for i in range(calls)))
        assert all(isinstance(ticket, Ticket) for ticket in admitted)
        after = commandstats(server)
        assert after["function|load"] == 2
        assert after["fcall"] >= calls + 1 and "evalsha" not in after
    finally:
        await store.aclose()


def test_the_librarys_caches_start_afresh_when_full_and_never_mix_prefixes(tmp_path: Path) -> None:
    """The library keeps principals' key names, tokens' fields and the texts of numbers between calls, each cache
    bounded: well past every bound (4,200 principals, each with its own token), decisions still find each
    principal's state, and two stores on one server (two prefixes) never share a principal's keys."""
    first, other = store_uri("redis", tmp_path), store_uri("redis", tmp_path)
    try:
        with opened(first) as a, opened(other) as b:
            ok(a, sub="first", max_sessions=1)
            for i in range(4200):
                a.release(ok(a, sub=f"p{i}", max_sessions=1))
                if i % 1000 == 0:  # the other prefix, between the calls that fill the caches
                    ok(b, sub="first", session_id="first-2", max_sessions=1)
            refused(a, "too_many_sessions", sub="first", session_id="first-2", max_sessions=1)
            ok(a, sub="first", max_sessions=1)
            refused(b, "too_many_sessions", sub="first", session_id="first-1", max_sessions=1)
            refused(a, "too_many_sessions", sub="p0", session_id="p0-2", max_sessions=1)
    finally:
        forget_prefix(first)
        forget_prefix(other)


def test_a_server_without_functions_runs_the_scripts(tmp_path: Path) -> None:
    """Before Redis 7 (no FCALL) the store runs the same code as scripts: EVALSHA, loaded again after a NOSCRIPT."""
    srv = RedisServer(tmp_path, name="nofunctions", extra_args=["--rename-command", "FCALL", ""])
    srv.start()
    try:
        with opened(private_uri(srv)) as store:
            ok(store, session_id="s-1")  # NOSCRIPT, then the admission script is sent once
            before = commandstats(srv)
            assert (before["evalsha"], before["eval"]) == (1, 1)
            ok(store, session_id="s-2")
            assert (commandstats(srv)["evalsha"], commandstats(srv)["eval"]) == (2, 1)
            srv.command("SCRIPT", "FLUSH")
            ok(store, session_id="s-3")
            for i in range(3):
                ok(store, session_id=f"s-{i + 4}")
            after = commandstats(srv)
            assert (after["evalsha"], after["eval"]) == (6, 2)  # one NOSCRIPT and one reload, then EVALSHA again
            # the release, the renewal and the operations run their own scripts
            ticket = ok(store, sub="bob", locks=(LockRequest("obj:1"),), max_in_flight=1)
            store.renew([ticket], 60.0)
            refused(store, "too_many_in_flight", sub="bob", session_id="bob-1", max_in_flight=1)
            store.release(ticket)
            assert store.locks() == []
            assert store.revoke_session("s-6") is True
            refused(store, "session_revoked", session_id="s-6")
            assert "function|load" not in commandstats(srv)
    finally:
        srv.stop()


def test_an_admission_and_its_release_are_one_round_trip(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release made by a thread rides with the next admission of its process: one call, one answer each."""
    import redis.connection

    monkeypatch.setattr(redis_store(), "RELEASE_DELAY", 60.0)  # the flush thread stays out of the count
    with opened(private_uri(server)) as store:
        store.release(ok(store, session_id="warm-up"))  # connects and loads the library
        answers = [0]
        read = redis.connection.AbstractConnection.read_response

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            answers[0] += 1
            return read(self, *args, **kwargs)
        before = commandstats(server)
        monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", counted)
        rounds = 5
        for i in range(rounds):
            ticket = ok(store, sub=f"user-{i}", device="laptop", credential="jkt", actor="agent", one_time=True,
                        jti=f"j-{i}", locks=(LockRequest("a"), LockRequest("b", "shared")))
            store.release(ticket)
        assert answers[0] == rounds  # one answer per admission; each release rode with the next admission
        monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", read)
        after = commandstats(server)
        assert after["fcall"] - before["fcall"] == rounds  # each of them a single FCALL
        assert after["function|load"] == before["function|load"]
        store.close()  # sends the last release
        assert commandstats(server)["fcall"] - before["fcall"] == rounds + 1
        assert store.locks() == []


def test_a_release_no_call_carries_is_sent_by_the_flush_thread(shared_uri: str) -> None:
    with opened(shared_uri) as store, opened(shared_uri) as other_host:
        ticket = ok(store, locks=(LockRequest("obj:flush"),))
        assert [lock.key for lock in other_host.locks()] == ["obj:flush"]
        store.release(ticket)  # no later call of this process: the flush thread sends it
        wait_for(lambda: other_host.locks() == [], "the release sent by the flush thread")
        assert isinstance(other_host.admit(adm(sub="bob", locks=(LockRequest("obj:flush"),))), Ticket)


# ---------------------------------------------------------------------------------------------------- server time

def test_the_servers_clock_decides_every_expiry(shared_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with opened(shared_uri) as store, opened(shared_uri) as other_host:
        client = store._client()
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)  # this host's clock is an hour ahead
        t0 = server_time(client)
        ticket = ok(store, token_iat=t0 - 60, token_exp=t0 + 600, lease=30.0, locks=(LockRequest("obj:1"),))
        watermark = store.revoke_principal("carol")
        t1 = server_time(client)
        assert t0 + 30.0 <= ticket.expires <= t1 + 30.0  # the lease runs on the server's clock
        assert t0 <= watermark <= t1
        refused(other_host, "token_revoked", sub="carol", token_iat=watermark - 0.001)
        ok(other_host, sub="carol", token_iat=watermark)

        # a three-second lease lapses by the server's clock, seen alike by the other host (three: the refusal
        # below must come before it lapses, on a slow machine too)
        short = ok(store, sub="bob", token_iat=t0 - 60, token_exp=t0 + 600, lease=3.0, locks=(LockRequest("obj:2"),))
        refused(other_host, "object_locked", sub="dave", token_iat=t0 - 60, token_exp=t0 + 600,
                locks=(LockRequest("obj:2"),))
        got: list[Ticket] = []

        def free() -> bool:
            result = other_host.admit(adm(sub="dave", token_iat=t0 - 60, token_exp=t0 + 600,
                                          locks=(LockRequest("obj:2"),)))
            if isinstance(result, Ticket):
                got.append(result)
            return bool(got)
        wait_for(free, "the three-second lease to lapse")
        assert server_time(client) >= short.expires
        assert got[0].fencing_tokens["obj:2"] > short.fencing_tokens["obj:2"]


# ---------------------------------------------------------------------------------------------------- epoch marker

def test_state_loss_is_detected_and_earlier_tokens_are_refused(server: RedisServer,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    uri = private_uri(server)
    client = server.client()
    with opened(uri) as store:
        issued = server_time(client) - 60
        assert store.rotate("alice") == 1
        assert store.rotate("alice") == 2
        refused(store, "stale_generation", token_gen=1, token_iat=issued)
        ok(store, token_gen=2, token_iat=issued)
        store.revoke_session("alice-2")
        refused(store, "session_revoked", session_id="alice-2", token_gen=2, token_iat=issued)
        fence = ok(store, sub="bob", token_iat=issued, locks=(LockRequest("obj:1"),)).fencing_tokens["obj:1"]

        server.flushall()  # Redis without persistence lost everything: generations, revocations, locks
        with caplog.at_level(logging.WARNING, logger="sa_middleware"):
            denial = refused(store, "token_revoked", token_gen=1, token_iat=issued)  # not a rotated-away token again
        assert "lost its state" in caplog.text
        assert "state" in denial.detail
        refused(store, "token_revoked", session_id="alice-2", token_gen=2, token_iat=issued)
        with opened(uri) as other_process:  # a process that starts after the loss sees it too
            refused(other_process, "token_revoked", sub="bob", token_iat=issued)
            assert other_process.bootstrap() is False  # bootstrap never masks a detected loss
        fresh = server_time(client) + 0.01
        ok(store, token_gen=2, token_iat=fresh)  # tokens issued after the loss work at once
        later = ok(store, sub="bob", token_iat=fresh, locks=(LockRequest("obj:1"),)).fencing_tokens["obj:1"]
        assert later > fence  # fencing tokens keep increasing across the loss
    client.close()


def test_a_restarted_redis_is_recovered_from_without_restarting_the_app(server: RedisServer) -> None:
    uri = private_uri(server)
    client = server.client()
    with opened(uri) as store:
        issued = server_time(client) - 60
        held = ok(store, token_iat=issued, locks=(LockRequest("obj:1"),))
        server.restart()  # no persistence: the state is gone, and so are the connections and the script cache

        def answers() -> bool:
            try:
                store.admit(adm(sub="probe", token_iat=issued))
            except StoreUnavailable:
                return False
            return True
        wait_for(answers, "the store to answer again")
        refused(store, "token_revoked", token_iat=issued)
        store.release(held)  # harmless: the ticket went with the state
        fresh = server_time(server.client()) + 0.01
        ok(store, token_iat=fresh, locks=(LockRequest("obj:1"),))
    client.close()


@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_a_declared_state_loss_after_restoring_a_backup(kind: str, tmp_path: Path) -> None:
    """A backup restored: the epoch marker is there, the later writes are not. The operator declares the loss."""
    uri = store_uri(kind, tmp_path)
    try:
        with opened(uri) as store:
            issued = time.time() - 60
            before = ok(store, token_iat=issued, locks=(LockRequest("obj:1"),))
            store.release(before)
            watermark = store.declare_state_loss()
            refused(store, "token_revoked", token_iat=issued)
            refused(store, "token_revoked", sub="bob", token_iat=watermark - 0.001)
            after = ok(store, token_iat=time.time() + 0.05, locks=(LockRequest("obj:1"),))  # issued after it
            assert after.fencing_tokens["obj:1"] > before.fencing_tokens["obj:1"]
            assert after.fencing_tokens["obj:1"] > watermark * 1e6 - 1  # above anything a restored counter held
            assert any(r.code == "state_loss" and r.source == "operator" for r in store.audit(kind="change"))
    finally:
        forget_prefix(uri)


def test_a_store_used_without_bootstrap_refuses_tokens_issued_before_its_first_use() -> None:
    redis_store()
    uri = f"{shared_redis_url()}?prefix=t{uuid.uuid4().hex[:12]}"
    try:
        with opened(uri) as store:
            client = store._client()
            issued = server_time(client) - 1
            refused(store, "token_revoked", token_iat=issued)  # fail closed: a new store looks like a lost one
            ok(store, token_iat=server_time(client) + 0.01)
            assert store.bootstrap() is False
            refused(store, "token_revoked", token_iat=issued)
    finally:
        forget_prefix(uri)


def test_bootstrap_marks_a_new_store_once() -> None:
    redis_store()
    uri = f"{shared_redis_url()}?prefix=t{uuid.uuid4().hex[:12]}"
    try:
        with opened(uri) as store:
            assert store.bootstrap() is True
            assert store.bootstrap() is False
            ok(store, token_iat=time.time() - 3600)
    finally:
        forget_prefix(uri)


# ---------------------------------------------------------------------------------------------------- audit trail

def audit_scenario(store: Store, tid: str) -> None:
    """Denials, an admission recorded on request, pauses by lock conflicts (of the requester and of a holder), an
    eviction, a refusal at a lock, a replayed one-time token, and a record handed in by an operator."""
    from sa_middleware.records import AuditRecord

    obj = (LockRequest("obj:1"),)
    refused(store, "insufficient_scope", scopes=frozenset({"admin"}), route="POST /admin")
    held = ok(store, sub="bob", locks=obj, audit_admitted=True, route="PUT /obj/{id}", ticket_id=tid)
    refused(store, "object_locked", locks=obj, route="PUT /obj/{id}")
    refused(store, "object_locked", locks=obj, audit_locked=False)  # the Guard records the final refusal itself
    refused(store, "session_paused", sub="bot", kind="agent", locks=obj, on_lock_conflict="pause")
    store.release(held)
    ok(store, sub="svc", kind="service", locks=(LockRequest("obj:2"),))
    refused(store, "object_locked", sub="carol", locks=(LockRequest("obj:2"),), on_lock_conflict="pause")
    ok(store, sub="dave", session_id="dave-1", max_sessions=1)
    ok(store, sub="dave", session_id="dave-2", max_sessions=1, on_session_limit="evict_oldest")
    ok(store, sub="erin", one_time=True, jti="j-1")
    refused(store, "token_replayed", sub="erin", one_time=True, jti="j-1")
    store.record_audit([AuditRecord("operation", "rotate", "operator", "alice", None, None, "generation 1")])


def trail(store: Store, **filters: Any) -> list[tuple[Any, ...]]:
    # fencing tokens follow each store's clock (rules.next_fence): compare where they appear, not their values
    return [(r.kind, r.code, r.source, r.sub, r.session_id, r.route, re.sub(r"#\d+", "#<fence>", r.detail))
            for r in store.audit(**filters)]


@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_audit_trail_equals_sqlites(kind: str, tmp_path: Path) -> None:
    from sa_middleware.stores.sqlite import SQLiteStore

    uri = store_uri(kind, tmp_path)
    reference = SQLiteStore(str(tmp_path / "reference.db"))
    try:
        with opened(uri) as store:
            tid = uuid.uuid4().hex  # the same ticket id on both sides: the admission record names it
            audit_scenario(reference, tid)
            audit_scenario(store, tid)
            expected = trail(reference, limit=100)
            assert len(expected) == 10
            assert trail(store, limit=100) == expected
            for filters in ({"sub": "bot"}, {"kind": "change"}, {"code": "object_locked"}, {"session_id": "dave-1"},
                            {"limit": 3}, {"sub": "alice", "kind": "denial"}):
                assert trail(store, **filters) == trail(reference, **filters), filters
            newest = store.audit(limit=1)[0]
            assert newest.time is not None
            assert trail(store, since=newest.time) == expected[:1]
            assert trail(store, until=newest.time - 3600) == []
    finally:
        reference.close()
        forget_prefix(uri)


def test_audit_retention_and_state_loss_record(server: RedisServer) -> None:
    from sa_middleware.records import AuditRecord

    with opened(private_uri(server)) as store:
        store.configure_audit(max_records=3)
        store.record_audit([AuditRecord("operation", f"op-{i}", "operator", "alice") for i in range(5)])
        assert [r.code for r in store.audit()] == ["op-4", "op-3", "op-2"]  # the newest three
        store.record_audit([AuditRecord("operation", "old", "operator", "alice", time=time.time() - 8 * 86400)])
        assert "old" not in [r.code for r in store.audit()]  # past the default retention of a week
        server.flushall()
        refused(store, "token_revoked")
        (loss,) = store.audit(kind="change")
        assert (loss.code, loss.source) == ("state_loss", "store")


# ---------------------------------------------------------------------------------------------------- timeouts

def finishes(func: Callable[[], Any]) -> Any:
    """Run ``func`` in a thread; the test fails if it does not finish within WAIT (a hang), else its outcome."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(func())
        except BaseException as exc:
            outcome.append(exc)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(WAIT)
    assert not worker.is_alive(), "the call hung"
    return outcome[0]


def soon(admit: Callable[[], Any]) -> Any:
    """What ``admit`` gives once it is not refused for a store that did not answer: under a short store timeout one
    slow answer of a busy machine is such a refusal (tried again), not a failure of the test."""
    deadline = time.monotonic() + WAIT
    while True:
        outcome = finishes(admit)
        unavailable = isinstance(outcome, StoreUnavailable) or (isinstance(outcome, Denial)
                                                                 and outcome.code == "store_unavailable")
        if not unavailable or time.monotonic() > deadline:
            assert isinstance(outcome, Admitted | Ticket), outcome
            return outcome
        time.sleep(0.05)


def admitted_soon(guard: Guard, request: RequestInfo) -> Admitted:
    """The request admitted (asked again while the store does not answer in time: see :func:`soon`)."""
    outcome = soon(lambda: guard.admit(request))
    assert isinstance(outcome, Admitted)
    return outcome


def test_a_paused_redis_gives_store_unavailable_and_the_app_recovers(server: RedisServer) -> None:
    issuer = DemoIssuer()
    with opened(private_uri(server, timeout="0.2")) as store:
        guard = make_guard(issuer, store)
        token = issuer.token("alice")
        request = RequestInfo("GET", "/docs/7", {"authorization": f"Bearer {token}"}, "10.0.0.1")
        first = admitted_soon(guard, request)
        guard.release(first.ticket)
        held = soon(lambda: store.admit(adm(sub="bob")))
        server.pause()  # SIGSTOP: connections stay open, nothing answers
        try:
            assert isinstance(finishes(lambda: store.admit(adm())), StoreUnavailable)
            assert isinstance(finishes(lambda: store.rotate("alice")), StoreUnavailable)
            denial = finishes(lambda: guard.admit(request))
            assert isinstance(denial, Denial) and denial.code == "store_unavailable"
            assert denial.status == 503 and denial.retry_after is not None
            opened_anyway = finishes(lambda: guard.admit(RequestInfo(
                "GET", "/open", {"authorization": f"Bearer {token}"}, "10.0.0.1")))
            assert isinstance(opened_anyway, Admitted) and opened_anyway.ticket is None  # fail_open

            async def async_admit() -> Any:
                return await store.aadmit(adm())
            assert isinstance(finishes(lambda: anyio.run(async_admit)), StoreUnavailable)
        finally:
            server.resume()
        again = admitted_soon(guard, request)  # the same app, no restart
        guard.release(again.ticket)
        store.release(held)
        guard.close()  # writes its buffered audit records while the server is up


def test_a_server_that_accepts_and_never_answers(shared_uri: str) -> None:
    redis_store()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])  # and never read nor write
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with opened(f"redis://{HOST}:{port}/0?prefix=t{uuid.uuid4().hex[:8]}") as store:
            assert isinstance(finishes(lambda: store.admit(adm())), StoreUnavailable)
            assert isinstance(finishes(lambda: store.sessions("alice", 900)), StoreUnavailable)
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_server_that_is_down(tmp_path: Path) -> None:
    redis_store()
    srv = RedisServer(tmp_path, name="down")
    with opened(f"redis://{HOST}:{srv.port}/0?prefix=t{uuid.uuid4().hex[:8]}") as store:
        assert isinstance(finishes(lambda: store.admit(adm())), StoreUnavailable)  # connection refused
        srv.start()
        try:
            store.bootstrap()
            ok(store)  # up now: the same store answers
        finally:
            srv.stop()


def test_a_cluster_down_at_start_up_opens_and_answers_unavailable() -> None:
    redis_store()
    store = open_store(f"redis+cluster://{HOST}:1?prefix=t{uuid.uuid4().hex[:8]}")  # nobody listens on port 1
    try:
        assert isinstance(finishes(lambda: store.admit(adm())), StoreUnavailable)

        async def async_admit() -> Any:
            return await store.aadmit(adm())
        assert isinstance(finishes(lambda: anyio.run(async_admit)), StoreUnavailable)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------- the event loop

@pytest.mark.anyio
async def test_async_operations_never_use_a_worker_thread(shared_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(shared_uri)

    async def no_threads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a worker thread was used")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)
    try:
        ticket = await store.aadmit(adm(locks=(LockRequest("obj:1"),)))
        assert isinstance(ticket, Ticket)
        await store.arenew([ticket], 30.0)
        assert [lock.key for lock in await store.alocks()] == ["obj:1"]
        await store.arelease(ticket)
        assert await store.arotate("alice") == 1
        assert await store.apause_session("alice-1") is True
        assert [s.status for s in await store.asessions("alice", 900)] == ["paused"]
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_a_cancelled_aadmit_gives_back_its_ticket_and_locks(server: RedisServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An admission cancelled while its script is on its way (an outer timeout, a cancel scope) still runs on the
    server; nobody gets the ticket to release it, so the store takes back its lock and in-flight slot itself."""
    import asyncio

    a = adm(locks=(LockRequest("order:1"),), lease=300.0, max_in_flight=1)
    sent = asyncio.Event()
    writelines = asyncio.StreamWriter.writelines

    def write_and_tell(self: asyncio.StreamWriter, data: Any) -> None:
        data = list(data)
        writelines(self, data)
        if a.ticket_id.encode() in b"".join(data):
            sent.set()  # the admission's script is in the paused server's socket buffer

    store = open_store(private_uri(server, timeout="5"))
    try:
        warm = await store.aadmit(adm(session_id="warm"))  # connected, script loaded
        assert isinstance(warm, Ticket)
        await store.arelease(warm)
        monkeypatch.setattr(asyncio.StreamWriter, "writelines", write_and_tell)
        server.pause()
        try:
            task = asyncio.create_task(store.aadmit(a))
            await asyncio.wait_for(sent.wait(), WAIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            server.resume()
        await asyncio.wait_for(asyncio.gather(*store._give_backs), WAIT)  # type: ignore[attr-defined]
        assert await store.alocks() == []
        assert isinstance(await store.aadmit(adm(sub="bob", locks=(LockRequest("order:1"),))), Ticket)
        assert isinstance(await store.aadmit(adm(session_id="alice-2", max_in_flight=1)), Ticket)
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_a_release_on_the_event_loop_is_seen_at_once_here_and_one_loop_turn_later_elsewhere(
        shared_uri: str) -> None:
    """An async release is carried by this process's next call (an admission applies it before it decides), or
    sent by a flush scheduled on the loop; another process sees it once that flush ran."""
    import asyncio

    store, other = open_store(shared_uri), open_store(shared_uri)
    try:
        held = await store.aadmit(adm(locks=(LockRequest("obj:1"),), max_in_flight=1))
        assert isinstance(held, Ticket)
        await store.arelease(held)  # this process's next admission carries it
        taken = await store.aadmit(adm(sub="bob", locks=(LockRequest("obj:1"),)))
        assert isinstance(taken, Ticket)
        await store.arelease(taken)
        assert store.locks() == []  # a blocking call of this process sends it first
        again = await store.aadmit(adm(session_id="alice-2", locks=(LockRequest("obj:1"),), max_in_flight=1))
        assert isinstance(again, Ticket)
        await store.arelease(again)
        await asyncio.sleep(0)  # the flush scheduled by the release starts
        await asyncio.gather(*store._give_backs)  # type: ignore[attr-defined]
        assert other.locks() == []  # another process sees it once the flush ran
        assert isinstance(other.admit(adm(session_id="alice-3", max_in_flight=1)), Ticket)
    finally:
        await store.aclose()
        other.close()


# ---------------------------------------------------------------------------------------------------- many hosts

def test_an_operation_on_one_host_refuses_the_next_request_on_another(shared_uri: str) -> None:
    issuer = DemoIssuer()
    with opened(shared_uri) as store_a, opened(shared_uri) as store_b:
        host_a, host_b = make_guard(issuer, store_a), make_guard(issuer, store_b)
        token = issuer.token("alice", sid="s-1", gen=0)

        def request() -> Any:
            return host_a.admit(RequestInfo("GET", "/docs/1", {"authorization": f"Bearer {token}"}, "10.0.0.1"))

        first = request()
        assert isinstance(first, Admitted)
        host_a.release(first.ticket)
        for operation, code in ((lambda: host_b.pause_session("s-1"), "session_paused"),
                                (lambda: host_b.resume_session("s-1"), None),
                                (lambda: host_b.report_compromise(session_id="s-1"), "credential_compromised"),
                                (lambda: host_b.resume_session("s-1"), None),
                                (lambda: host_b.rotate("alice"), "stale_generation")):
            operation()
            outcome = request()
            if code is None:
                assert isinstance(outcome, Admitted), outcome
                host_a.release(outcome.ticket)
            else:
                assert isinstance(outcome, Denial) and outcome.code == code
        host_a.close()
        host_b.close()


# ---------------------------------------------------------------------------------------------------- cluster

def _slot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


def test_cluster_key_layout(cluster_uri: str) -> None:
    with opened(cluster_uri) as store:
        ok(store, sub="ali{ce}", device="laptop", credential="jkt", locks=(LockRequest("obj:1"), LockRequest("doc:9")))
        client = shared_cluster().client()
        try:
            keys = [k.decode() for k in client.scan_iter(match=f"{store.prefix}:*", count=5000)]
        finally:
            client.close()
        principal = {k for k in keys if ":{p:ali%7Bce%7D}" in k}
        assert len(principal) >= 2 and len({_slot(k) for k in principal}) == 1  # one hash tag per principal
        locks = {k for k in keys if ":{l:" in k}
        assert {_slot(k) for k in locks} == {_slot(store._key("l", "obj:1")), _slot(store._key("l", "doc:9"))}
        assert _slot(store._key("p", "ali{ce}")) not in {_slot(k) for k in locks}  # locks live in their own slots


@pytest.mark.anyio
async def test_cluster_masters_without_the_library_get_it(cluster_uri: str) -> None:
    """A master that lost its functions (restarted without persistence, FUNCTION FLUSH) gets the library again, from
    the async client as from the blocking one."""
    store = open_store(cluster_uri)
    try:
        client = shared_cluster().client()
        try:
            client.function_flush()  # every master
            keys = lock_keys_in_other_slots(store, 3)
            ticket = await store.aadmit(adm(sub="erin", locks=tuple(LockRequest(k) for k in keys)))
            assert isinstance(ticket, Ticket)
            await store.arelease(ticket)
            client.function_flush()
            store.release(ok(store, sub="erin", locks=tuple(LockRequest(k) for k in keys)))
            assert store.locks() == []
        finally:
            client.close()
    finally:
        await store.aclose()


def lock_keys_in_other_slots(store: Any, count: int) -> list[str]:
    """Lock keys whose slots differ from each other (so one admission spans several slots and masters)."""
    keys: list[str] = []
    for i in range(1000):
        key = f"obj:{i}"
        if _slot(store._key("l", key)) not in {_slot(store._key("l", k)) for k in keys}:
            keys.append(key)
        if len(keys) == count:
            return keys
    raise AssertionError("unreachable")


@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_refused_locks_leave_no_trace(kind: str, tmp_path: Path) -> None:
    """On one server the admission is one script; in a cluster the principal step is compensated when a lock is
    refused. Either way a refusal at the lock changes nothing that the same request refused by SQLite would not."""
    uri = store_uri(kind, tmp_path)
    try:
        with opened(uri) as store:
            a, b = lock_keys_in_other_slots(store, 2)
            both = (LockRequest(a), LockRequest(b))
            held = ok(store, sub="bob", locks=(LockRequest(b),))
            ok(store, session_id="alice-1", token_gen=0)
            store.report_compromise("alice", None)
            refused(store, "credential_compromised", session_id="alice-1", token_gen=0)
            refused(store, "object_locked", session_id="alice-1", token_gen=1, locks=both)  # would re-establish it
            assert [s.status for s in store.sessions("alice", 900)] == ["compromised"]
            refused(store, "object_locked", session_id="alice-2", token_gen=1, max_sessions=1,
                    on_session_limit="evict_oldest", raises_risk=5, one_time=True, jti="j-1", locks=both)
            assert {s.session_id: s.status for s in store.sessions("alice", 900)} == {"alice-1": "compromised"}
            assert [lock.key for lock in store.locks()] == [b]  # a was given back
            ok(store, session_id="alice-3", token_gen=1, max_risk=0, one_time=True, jti="j-1")
            refused(store, "session_paused", sub="bot", kind="agent", session_id="bot-1", locks=both,
                    on_lock_conflict="pause")
            refused(store, "session_paused", sub="bot", kind="agent", session_id="bot-1")
            store.release(held)
            ok(store, sub="carol", locks=both)
    finally:
        forget_prefix(uri)


@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_fencing_counters_expire_and_tokens_keep_increasing(kind: str, tmp_path: Path) -> None:
    """Lock keys come from path parameters: the counter of each key lives its lease plus FENCE_SLACK (refreshed by a
    renewal), so made-up ids leave nothing behind; a forgotten counter restarts above every token issued before."""
    from sa_middleware.rules import FENCE_SLACK

    uri = store_uri(kind, tmp_path)
    try:
        with opened(uri) as store:
            client = store._client()
            keys = [f"order:{uuid.uuid4().hex}" for _ in range(10)]  # ids chosen by a client
            fences: dict[str, int] = {}
            for key in keys:
                ticket = ok(store, locks=(LockRequest(key),), lease=30.0)
                fences[key] = ticket.fencing_tokens[key]
                store.release(ticket)
            bound = (30.0 + FENCE_SLACK + 1.0) * 1000
            for key in keys:
                assert 0 < client.pttl(store._key("l", key) + ":f") <= bound
            held = ok(store, locks=(LockRequest(keys[0]),), lease=30.0)  # live when renewed, however slow the test
            assert held.fencing_tokens[keys[0]] > fences[keys[0]]
            store.renew([held], 300.0)
            assert client.pttl(store._key("l", keys[0]) + ":f") > 300_000  # a renewal keeps the counter too
            store.release(held)
            client.delete(store._key("l", keys[1]) + ":f")  # as if its TTL ran out
            again = ok(store, sub="bob", locks=(LockRequest(keys[1]),)).fencing_tokens[keys[1]]
            assert again > fences[keys[1]]
            assert isinstance(again, int) and again < 2**53
    finally:
        forget_prefix(uri)


def test_cluster_cross_slot_admissions_under_threads(cluster_uri: str) -> None:
    """Threads of two store clients (two hosts) race for two locks in different slots, with max_in_flight=1 per
    principal: no lock is ever held twice, no principal ever exceeds its limit, fencing tokens only increase."""
    threads, attempts, principals = 12, 12, 4
    with opened(cluster_uri) as store, opened(cluster_uri) as peer:
        a, b = lock_keys_in_other_slots(store, 2)
        assert len({_slot(store._key("l", a)), _slot(store._key("l", b)), _slot(store._key("p", "user-0"))}) == 3
        guard = threading.Lock()
        holding: dict[str, int] = {a: 0, b: 0}
        in_flight: dict[str, int] = {}
        violations: list[str] = []
        fences: dict[str, list[int]] = {a: [], b: []}
        admitted, codes, errors = [0], dict[str, int](), list[BaseException]()
        barrier = threading.Barrier(threads)

        def worker(n: int) -> None:
            client = store if n % 2 else peer
            sub = f"user-{n % principals}"
            try:
                barrier.wait()
                for i in range(attempts):
                    locks = (LockRequest(a), LockRequest(b)) if i % 2 else (LockRequest(b),)
                    result = client.admit(adm(sub=sub, session_id=f"{sub}-{n}", max_in_flight=1, locks=locks))
                    if isinstance(result, Denial):
                        with guard:
                            codes[result.code] = codes.get(result.code, 0) + 1
                        continue
                    with guard:
                        admitted[0] += 1
                        in_flight[sub] = in_flight.get(sub, 0) + 1
                        if in_flight[sub] > 1:
                            violations.append(f"{sub} in flight twice")
                        for key, fence in result.fencing_tokens.items():
                            holding[key] += 1
                            if holding[key] > 1:
                                violations.append(f"{key} granted twice")
                            if fences[key] and fence <= fences[key][-1]:
                                violations.append(f"fence of {key} went back")
                            fences[key].append(fence)
                    for _ in range(20):
                        time.sleep(0)  # let the other threads run while this ticket is held
                    with guard:
                        in_flight[sub] -= 1
                        for key in result.fencing_tokens:
                            holding[key] -= 1
                    client.release(result)
            except BaseException as exc:
                with guard:
                    errors.append(exc)

        workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert not any(t.is_alive() for t in workers)
        assert errors == []
        assert violations == []
        assert admitted[0] >= 1 and admitted[0] + sum(codes.values()) == threads * attempts
        assert set(codes) <= {"object_locked", "too_many_in_flight"}
        assert store.locks() == []
        for p in range(principals):  # no pending ticket was left behind by a compensation
            store.release(ok(store, sub=f"user-{p}", session_id=f"user-{p}-0", max_in_flight=1))


def test_cluster_loss_of_one_master_is_detected_for_its_slots_only(cluster_uri: str) -> None:
    cluster = shared_cluster()
    with opened(cluster_uri) as store:
        client = cluster.client()
        try:
            nodes = {node.name: node for node in client.get_primaries()}
            node_of = {sub: client.nodes_manager.get_node_from_slot(_slot(store._key("p", sub))).name
                       for sub in (f"user-{i}" for i in range(50))}
            lost = node_of["user-0"]
            survivor = next(sub for sub, name in node_of.items() if name != lost)
            issued = server_time(client.get_redis_connection(nodes[lost])) - 60
            ok(store, sub="user-0", token_iat=issued)
            ok(store, sub=survivor, token_iat=issued)
            # that master comes back empty (no persistence, no replica): only its slots lose their state
            keys = list(client.scan_iter(match=f"{store.prefix}:*", count=5000, target_nodes=nodes[lost]))
            for key in keys:
                client.get_redis_connection(nodes[lost]).delete(key)
        finally:
            client.close()
        refused(store, "token_revoked", sub="user-0", token_iat=issued)
        ok(store, sub=survivor, token_iat=issued)


def test_cluster_a_lock_master_that_stops_answering_leaves_no_pending_ticket(cluster_uri: str) -> None:
    """The principal step wrote the ticket; the lock step's master does not answer: the store answers
    StoreUnavailable and undoes the principal step, so the principal's in-flight slot is free at once (not after a
    lease) when the master answers again."""
    cluster = shared_cluster()
    with opened(cluster_uri + "&timeout=0.5") as store:
        client = cluster.client()
        try:
            node_of = {name: client.nodes_manager.get_node_from_slot(_slot(store._key(*name))).name
                       for name in [("p", "alice"), *(("l", f"obj:{i}") for i in range(50))]}
        finally:
            client.close()
        lock = next(k for (kind, k), node in node_of.items() if kind == "l" and node != node_of[("p", "alice")])
        server = next(n for n in cluster.nodes if n.address == node_of[("l", lock)])
        server.pause()
        try:
            outcome = finishes(lambda: store.admit(adm(max_in_flight=1, lease=60.0, locks=(LockRequest(lock),))))
            assert isinstance(outcome, StoreUnavailable)
        finally:
            server.resume()
        ok(store, session_id="alice-2", max_in_flight=1)  # no pending ticket of the failed admission
        wait_for(lambda: not isinstance(finishes(store.locks), StoreUnavailable), "the master to answer again")
        assert store.locks() == []


# ---------------------------------------------------------------------------------------------------- sentinel

def replication(srv: RedisServer) -> dict[str, Any]:
    with contextlib.closing(srv.client()) as client:
        info: dict[str, Any] = client.info("replication")
    return info


def test_sentinel_failover_is_followed(tmp_path: Path) -> None:
    """A master, a replica and a Sentinel: after a failover the same store writes to the new master."""
    redis_store()
    master = RedisServer(tmp_path, name="failover-master").start()
    replica = RedisServer(tmp_path, name="failover-replica",
                          extra_args=["--replicaof", HOST, str(master.port)]).start()
    from redis_support import free_port

    port = free_port()
    conf = tmp_path / "failover-sentinel.conf"
    conf.write_text("\n".join([f"port {port}", f"bind {HOST}", "protected-mode no", f"dir {tmp_path}",
                               f"sentinel monitor fo {HOST} {master.port} 1",
                               "sentinel down-after-milliseconds fo 1000", "sentinel failover-timeout fo 5000", ""]))
    proc = subprocess.Popen([master.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    sentinel = None
    try:
        import redis

        sentinel = redis.Redis(host=HOST, port=port, socket_timeout=2.0, decode_responses=True)
        wait_for(lambda: replication(replica).get("master_link_status") == "up", "the replica to sync")
        wait_for(lambda: bool(sentinel.execute_command("SENTINEL", "REPLICAS", "fo")), "the sentinel to see it")
        uri = fresh_store(f"redis+sentinel://{HOST}:{port}/fo")
        with opened(uri) as store:
            assert store.rotate("alice") == 1
            issued = time.time() - 60
            ok(store, token_gen=1, token_iat=issued)
            replica_addr = (HOST, replica.port)
            sentinel.execute_command("SENTINEL", "FAILOVER", "fo")

            def moved() -> bool:
                host, master_port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "fo")
                return (host, int(master_port)) == replica_addr and replication(replica).get("role") == "master"
            wait_for(moved, "the failover")

            def writes() -> bool:
                try:
                    return store.rotate("alice") == 2
                except StoreUnavailable:
                    return False  # the old master's connections are dropped; the next call finds the new one
            wait_for(writes, "the store to write to the new master")
            refused(store, "stale_generation", token_gen=1, token_iat=issued)  # state and epoch came along
            ok(store, token_gen=2, token_iat=issued)
    finally:
        if sentinel is not None:
            sentinel.close()
        proc.terminate()
        proc.wait(10)
        replica.stop()
        master.stop()


def test_state_written_as_stored_before_is_honoured(shared_uri: str) -> None:
    """Records as the store has always written them (JSON, times as strings of 17 significant digits): a
    generation, paused and revoked sessions, a ticket in flight and a lock held with its fencing counter are
    honoured by this version's code."""
    def num(x: float) -> str:
        return format(x, ".17g")

    with opened(shared_uri) as store:
        client = store._client()
        now = server_time(client)
        exp = now + 3600

        def session(status: str) -> str:
            return json.dumps({"s": "alice", "k": "human", "st": status, "c": num(now - 100), "l": num(now - 50),
                               "e": num(exp + 86400), "cl": "10.0.0.1", "ua": "pytest", "ix": num(exp + 86400)})
        client.hset(store._principal("alice", ""), mapping={"g": "3"})
        client.hset(store._principal("alice", "", ":ss"), mapping={"alice-1": session("paused"),
                                                                   "alice-2": session("revoked")})
        client.pexpire(store._principal("alice", "", ":ss"), 3_600_000)
        client.hset(store._principal("alice", "", ":tk"), "old-ticket", json.dumps(
            {"sid": "alice-9", "th": "other", "cl": "10.0.0.1|pytest", "tg": {}, "cf": {}, "x": False,
             "e": num(now + 300), "lk": ["obj:1"]}))
        client.pexpire(store._principal("alice", "", ":tk"), 300_000)
        fence = int(now * 1_000_000) + 5_000_000  # a counter ahead of the clock
        client.hset(store._key("l", "obj:1"), "old-ticket", json.dumps(
            {"key": "obj:1", "m": "exclusive", "s": "alice", "sid": "alice-9", "k": "human", "f": str(fence),
             "e": num(now + 300)}))
        client.pexpire(store._key("l", "obj:1"), 300_000)
        client.set(store._key("l", "obj:1", ":f"), str(fence), px=360_000)

        refused(store, "stale_generation", token_gen=2)
        refused(store, "session_paused", token_gen=3, session_id="alice-1")
        refused(store, "session_revoked", token_gen=3, session_id="alice-2")
        refused(store, "too_many_in_flight", token_gen=3, session_id="alice-3", max_in_flight=1)
        refused(store, "object_locked", sub="bob", locks=(LockRequest("obj:1"),))
        assert [(lock.ticket_id, lock.fencing_token) for lock in store.locks()] == [("old-ticket", fence)]
        client.hdel(store._key("l", "obj:1"), "old-ticket")  # the earlier process released it
        assert ok(store, sub="bob", locks=(LockRequest("obj:1"),)).fencing_tokens["obj:1"] > fence


def test_a_device_index_written_before_issuers_still_relates_its_principals(shared_uri: str) -> None:
    """Device and credential indexes name principals as [issuer, subject]; a plain subject (written before
    issuers) stands for the empty issuer, so a compromise still reaches its contexts."""
    with opened(shared_uri) as store:
        ok(store, sub="bob", session_id="bob-1", device="laptop-9")
        ok(store, sub="carol", session_id="carol-1", device="laptop-9", iss="https://idp-a.example")
        client = store._client()
        key = store._key("d", "laptop-9", ":ix")
        members = {tuple(json.loads(m)) for m in client.smembers(key)}
        assert members == {("", "bob"), ("https://idp-a.example", "carol")}
        client.srem(key, '["","bob"]')
        client.sadd(key, "bob")  # as written before issuers
        assert store.report_compromise("carol", None, "https://idp-a.example") == ["bob-1", "carol-1"]
        assert store.issuers("carol") == ["https://idp-a.example"]
