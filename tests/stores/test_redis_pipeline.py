"""The Redis store's pipelined calls (``sa_middleware.stores.redis_pipeline``), on an event loop and from threads,
against a real private redis-server: answers reach their own callers, an error answer fails only its call, a
failed connection fails only the calls it carried, and concurrent calls share one connection and few writes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_support import RedisServer, fresh_store, redis_store_available, wait_for
from test_redis import adm

from sa_middleware.records import LockRequest, Ticket
from sa_middleware.stores import open_store

redis_store_available()

import redis  # noqa: E402
import redis.asyncio  # noqa: E402  (after the check: under CI a missing extra fails, never skips)

from sa_middleware.stores import redis_pipeline  # noqa: E402
from sa_middleware.stores.redis_pipeline import LoopPipeline, ThreadPipeline, available  # noqa: E402

pytestmark = pytest.mark.anyio
WAIT = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path, name="pipeline")
    srv.start()
    try:
        yield srv
    finally:
        if srv.paused:
            srv.resume()
        srv.stop()


@contextlib.asynccontextmanager
async def pipeline_on(server: RedisServer, timeout: float = WAIT) -> AsyncIterator[tuple[LoopPipeline, Any]]:
    pool = redis.asyncio.BlockingConnectionPool.from_url(server.url, max_connections=4, socket_timeout=timeout,
                                                         timeout=2.0)
    try:
        yield LoopPipeline(pool), pool
    finally:
        await pool.disconnect()


class Writes:
    """Counts the writes made on asyncio stream writers (each batch of pipelined calls is one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, marker: bytes = b"") -> None:
        self.count = 0
        self.marked = asyncio.Event()  # set once a write carried ``marker``
        writelines = asyncio.StreamWriter.writelines

        def counted(writer: asyncio.StreamWriter, data: Any) -> None:
            data = list(data)
            self.count += 1
            writelines(writer, data)
            if marker and marker in b"".join(data):
                self.marked.set()
        monkeypatch.setattr(asyncio.StreamWriter, "writelines", counted)


def test_hiredis_packs_the_calls() -> None:
    assert available()  # the redis extra installs hiredis: without it the store falls back to plain calls


async def test_answers_reach_their_own_callers_in_one_write(server: RedisServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    async with pipeline_on(server) as (pipe, _):
        assert await pipe.call("PING") in (b"PONG", "PONG")  # connected
        writes = Writes(monkeypatch)
        answers = await asyncio.gather(*(pipe.call("ECHO", f"call-{i}") for i in range(50)))
        assert answers == [f"call-{i}".encode() for i in range(50)]
        assert writes.count == 1, writes.count  # made in one loop turn: one write


async def test_an_error_answer_fails_only_its_own_call(server: RedisServer) -> None:
    async with pipeline_on(server) as (pipe, _):
        results = await asyncio.gather(pipe.call("ECHO", "before"), pipe.call("FCALL", "no_such_function", 0),
                                       pipe.call("ECHO", "after"), return_exceptions=True)
        assert results[0] == b"before" and results[2] == b"after", results
        assert isinstance(results[1], redis.ResponseError), results[1]
        assert await pipe.call("ECHO", "still in step") == b"still in step"


async def test_a_cancelled_caller_leaves_the_others_answers_in_order(server: RedisServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller cancelled while its call is on the wire: its answer is read and dropped, so the next answer still
    goes to the next caller."""
    async with pipeline_on(server) as (pipe, _):
        await pipe.call("PING")
        writes = Writes(monkeypatch, marker=b"second")
        server.pause()
        try:
            first = asyncio.create_task(pipe.call("ECHO", "first"))
            second = asyncio.create_task(pipe.call("ECHO", "second"))
            await asyncio.wait_for(writes.marked.wait(), WAIT)  # both written to the paused server
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
        finally:
            server.resume()
        assert await asyncio.wait_for(second, WAIT) == b"second"
        assert await pipe.call("ECHO", "third") == b"third"


async def test_a_silent_server_fails_the_calls_in_flight_and_the_next_call_reconnects(server: RedisServer) -> None:
    async with pipeline_on(server, timeout=0.5) as (pipe, _):
        await pipe.call("PING")
        server.pause()
        try:
            results = await asyncio.wait_for(asyncio.gather(
                *(pipe.call("ECHO", f"lost-{i}") for i in range(5)), return_exceptions=True), WAIT)
        finally:
            server.resume()
        assert all(isinstance(r, redis.TimeoutError) for r in results), results
        # the connection that timed out is never used again: its late answers would be out of step
        assert await pipe.call("ECHO", "fresh") == b"fresh"


async def test_a_closed_connection_fails_the_calls_in_flight_and_the_next_call_reconnects(
        server: RedisServer) -> None:
    async with pipeline_on(server) as (pipe, _):
        await pipe.call("PING")
        results = await asyncio.gather(pipe.call("CLIENT", "KILL", "SKIPME", "no", "TYPE", "normal"),
                                       pipe.call("ECHO", "after the kill"), return_exceptions=True)
        assert isinstance(results[0], redis.ConnectionError) or isinstance(results[1], redis.ConnectionError), \
            results
        assert await pipe.call("ECHO", "reconnected") == b"reconnected"


async def test_an_idle_pipeline_holds_no_connection(server: RedisServer) -> None:
    async with pipeline_on(server) as (pipe, pool):
        await asyncio.gather(*(pipe.call("ECHO", str(i)) for i in range(10)))
        # the reader gave its connection back once nothing was in flight: the pool's four are free (a held one
        # would make the fourth wait for the pool's 2 s and fail)
        taken = [await pool.get_connection() for _ in range(4)]
        for conn in taken:
            await pool.release(conn)


async def test_concurrent_admissions_share_one_connection_and_few_writes(server: RedisServer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """64 admissions at once on one loop, each asking for the same exclusive lock: exactly one is granted, the
    others refused, over one connection in far fewer writes than calls."""
    store = open_store(fresh_store(server.url))
    try:
        warm = await store.aadmit(adm(session_id="warm"))
        assert isinstance(warm, Ticket)
        await store.arelease(warm)
        clients_before = len(server.command("CLIENT", "LIST").splitlines())
        writes = Writes(monkeypatch)
        outcomes = await asyncio.gather(*(store.aadmit(adm(sub=f"user-{i}", locks=(LockRequest("order:1"),)))
                                          for i in range(64)))
        monkeypatch.undo()
        granted = [o for o in outcomes if isinstance(o, Ticket)]
        assert len(granted) == 1, outcomes
        assert {o.code for o in outcomes if not isinstance(o, Ticket)} == {"object_locked"}
        assert writes.count < 64 / 4, writes.count
        assert len(server.command("CLIENT", "LIST").splitlines()) == clients_before  # no new connection
        await store.arelease(granted[0])
        assert await store.alocks() == []
    finally:
        await store.aclose()


# ------------------------------------------------------------------------------------------------------- threads

@contextlib.contextmanager
def thread_pipeline_on(server: RedisServer, timeout: float = WAIT) -> Iterator[tuple[ThreadPipeline, Any]]:
    pool = redis.BlockingConnectionPool.from_url(server.url, max_connections=4, socket_timeout=timeout, timeout=2.0)
    try:
        yield ThreadPipeline(pool), pool
    finally:
        pool.disconnect()


def calls_in_threads(pipe: ThreadPipeline, args: list[tuple[Any, ...]]) -> list[Any]:
    """Each call in a thread of its own, all started together; their answers (or errors), in order."""
    results: list[Any] = [None] * len(args)
    start = threading.Barrier(len(args))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = pipe.call(*args[i])
        except Exception as exc:
            results[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    return results


def test_threads_calls_made_while_one_is_sent_go_out_together(server: RedisServer) -> None:
    """While the leading thread waits for its answer, the others queue; the next batch carries them all, in one
    write, and each thread gets its own answer."""
    with thread_pipeline_on(server) as (pipe, pool):
        assert pipe.call("ECHO", "warm") == b"warm"
        sends = [0]
        conn_class = pool.connection_class
        send = conn_class.send_packed_command

        def counted(self: Any, command: Any, check_health: bool = True) -> None:
            sends[0] += 1
            send(self, command, check_health)
        conn_class.send_packed_command = counted
        try:
            server.pause()
            try:
                results: list[Any] = []
                leader = threading.Thread(target=lambda: results.append(pipe.call("ECHO", "leader")))
                leader.start()
                wait_for(lambda: sends[0] == 1, "the leader's call sent to the paused server")
                others = threading.Thread(target=lambda: results.extend(
                    calls_in_threads(pipe, [("ECHO", f"t{i}") for i in range(15)])))
                others.start()
                wait_for(lambda: len(pipe._queue) == 15, "15 calls queued behind the leader")
            finally:
                server.resume()
            leader.join(WAIT)
            others.join(WAIT)
        finally:
            conn_class.send_packed_command = send
        assert results[0] == b"leader" and results[1:] == [f"t{i}".encode() for i in range(15)], results
        assert sends[0] == 2  # the leader's call, then the 15 queued meanwhile in one write


def test_threads_an_error_answer_fails_only_its_own_call(server: RedisServer) -> None:
    with thread_pipeline_on(server) as (pipe, _):
        results = calls_in_threads(pipe, [("ECHO", "a"), ("FCALL", "no_such_function", 0), ("ECHO", "b")])
        assert results[0] == b"a" and results[2] == b"b", results
        assert isinstance(results[1], redis.ResponseError), results[1]
        assert pipe.call("ECHO", "still in step") == b"still in step"


def test_threads_a_silent_server_fails_the_calls_in_flight_and_the_next_call_reconnects(
        server: RedisServer) -> None:
    with thread_pipeline_on(server, timeout=0.5) as (pipe, _):
        assert pipe.call("PING") in (b"PONG", True)
        server.pause()
        try:
            results = calls_in_threads(pipe, [("ECHO", f"lost-{i}") for i in range(4)])
        finally:
            server.resume()
        assert all(isinstance(r, redis.TimeoutError) for r in results), results
        assert pipe.call("ECHO", "fresh") == b"fresh"


def test_threads_an_idle_pipeline_holds_no_connection(server: RedisServer) -> None:
    with thread_pipeline_on(server) as (pipe, pool):
        calls_in_threads(pipe, [("ECHO", str(i)) for i in range(8)])
        taken = [pool.get_connection() for _ in range(4)]  # a held one would make the fourth fail after 2 s
        for conn in taken:
            pool.release(conn)


def test_threads_a_forked_child_calls_afresh(server: RedisServer) -> None:
    """A child forked while the parent's pipeline was in use starts with a pipeline of its own."""
    with thread_pipeline_on(server) as (pipe, _):
        assert pipe.call("ECHO", "parent") == b"parent"
        with pipe._mutex:  # held at the fork, as another thread of the parent might hold it
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                signal.alarm(int(WAIT))  # a child stuck on the parent's lock dies instead of hanging the test
                try:
                    code = 0 if pipe.call("ECHO", "child") == b"child" else 2
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pipe.call("ECHO", "parent again") == b"parent again"


async def test_a_call_that_cannot_be_packed_fails_alone(server: RedisServer) -> None:
    async with pipeline_on(server) as (pipe, _):
        results = await asyncio.gather(pipe.call("ECHO", "a"), pipe.call("ECHO", None), pipe.call("ECHO", "b"),
                                       return_exceptions=True)
        assert results[0] == b"a" and results[2] == b"b", results
        assert isinstance(results[1], TypeError), results[1]


def test_threads_a_call_that_cannot_be_packed_fails_alone(server: RedisServer) -> None:
    with thread_pipeline_on(server) as (pipe, _):
        results = calls_in_threads(pipe, [("ECHO", "a"), ("ECHO", None), ("ECHO", "b")])
        assert results[0] == b"a" and results[2] == b"b", results
        assert isinstance(results[1], TypeError), results[1]


class Interrupted(Exception):
    """Raised in the main thread by a signal handler, as Ctrl-C raises KeyboardInterrupt."""


def test_threads_a_waiter_interrupted_while_waiting_does_not_strand_the_others(
        server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main thread waits behind a leader; a signal handler interrupts it. The thread queued behind it still
    gets its answer, without any later call: the lead is handed on, not to the thread that left."""
    monkeypatch.setattr(redis_pipeline, "_LEAD_EXTRA", 0)  # the leader hands over right after its own call
    with thread_pipeline_on(server) as (pipe, _):
        assert pipe.call("ECHO", "warm") == b"warm"
        results: dict[str, Any] = {}

        def call(name: str) -> threading.Thread:
            thread = threading.Thread(target=lambda: results.__setitem__(name, pipe.call("ECHO", name)))
            thread.start()
            return thread

        def interrupt(signum: int, frame: Any) -> None:
            raise Interrupted()
        previous = signal.signal(signal.SIGUSR1, interrupt)
        server.pause()
        try:
            leader = call("leader")
            wait_for(lambda: pipe._leading and not pipe._queue, "the leader's call sent to the paused server")

            queued: list[threading.Thread] = []  # the thread (its answer goes to results["queued"])

            def behind() -> None:
                wait_for(lambda: len(pipe._queue) == 1, "the main thread waiting")
                queued.append(call("queued"))
                wait_for(lambda: len(pipe._queue) == 2, "a second thread waiting behind it")
                os.kill(os.getpid(), signal.SIGUSR1)
            helper = threading.Thread(target=behind)
            helper.start()
            with pytest.raises(Interrupted):
                pipe.call("ECHO", "main")
            helper.join(WAIT)
        finally:
            signal.signal(signal.SIGUSR1, previous)
            server.resume()
        leader.join(WAIT)
        queued[0].join(WAIT)
        assert results.get("leader") == b"leader" and results.get("queued") == b"queued", results


def test_threads_a_leader_whose_call_failed_hands_over(server: RedisServer) -> None:
    """With a silent server, the leader's own call times out; it returns at once instead of sending the calls
    queued meanwhile on a fresh connection (each of which would cost it one more timeout)."""
    with thread_pipeline_on(server, timeout=0.5) as (pipe, pool):
        assert pipe.call("ECHO", "warm") == b"warm"
        senders: list[str] = []
        conn_class = pool.connection_class
        send = conn_class.send_packed_command

        def recorded(self: Any, command: Any, check_health: bool = True) -> None:
            senders.append(threading.current_thread().name)
            send(self, command, check_health)
        conn_class.send_packed_command = recorded
        try:
            server.pause()
            try:
                results: dict[str, Any] = {}

                def call(name: str) -> None:
                    try:
                        results[name] = pipe.call("ECHO", name)
                    except Exception as exc:
                        results[name] = exc
                leader = threading.Thread(target=call, args=("leader",), name="leader")
                leader.start()
                wait_for(lambda: senders == ["leader"], "the leader's call sent to the paused server")
                others = [threading.Thread(target=call, args=(f"t{i}",), name=f"t{i}") for i in range(3)]
                for t in others:
                    t.start()
                wait_for(lambda: len(pipe._queue) == 3, "three calls queued behind the leader")
                leader.join(WAIT)
                assert isinstance(results["leader"], redis.TimeoutError), results
            finally:
                server.resume()
            for t in others:
                t.join(WAIT)
        finally:
            conn_class.send_packed_command = send
        assert senders.count("leader") == 1, senders  # the queued calls went out with a thread of their own
        assert all(results[f"t{i}"] == f"t{i}".encode() for i in range(3)), results


def test_a_forked_child_of_the_store_releases_afresh(server: RedisServer) -> None:
    """A child forked while a thread of the parent held the store's release queue releases on its own; the
    parent's pending releases stay with the parent."""
    store = open_store(fresh_store(server.url))
    try:
        ticket = store.admit(adm(locks=(LockRequest("order:fork"),)))
        assert isinstance(ticket, Ticket)
        store.release(ticket)  # pending: the next call of the parent carries it
        with store._released_lock:  # type: ignore[attr-defined]
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                signal.alarm(int(WAIT))
                try:
                    pending = len(store._released)  # type: ignore[attr-defined]
                    child = store.admit(adm(sub="child", session_id="child-1"))
                    store.release(child)
                    code = 0 if pending == 0 and isinstance(child, Ticket) else 2
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert isinstance(store.admit(adm(sub="bob", locks=(LockRequest("order:fork"),))), Ticket)
    finally:
        store.close()


def test_a_loop_stuck_before_its_flush_does_not_hold_up_another_loops_releases(server: RedisServer) -> None:
    """Loop A schedules the flush of a release and never runs it (blocked, or closed); a release made on loop B
    still gets a flush of its own, so other processes see it without waiting for this process's next call."""
    uri = fresh_store(server.url)
    store, other = open_store(uri), open_store(uri)
    stuck, release = threading.Event(), threading.Event()
    try:
        def loop_a() -> None:
            async def run() -> None:
                ticket = await store.aadmit(adm(sub="a", locks=(LockRequest("order:a"),)))
                assert isinstance(ticket, Ticket)
                assert store.release_nowait(ticket)  # its flush is scheduled on this loop...
                stuck.set()
                release.wait(WAIT)  # ...which is blocked meanwhile
            asyncio.run(run())
        a = threading.Thread(target=loop_a)
        a.start()
        assert stuck.wait(WAIT)

        async def loop_b() -> None:
            ticket = await store.aadmit(adm(sub="b", locks=(LockRequest("order:b"),)))
            assert isinstance(ticket, Ticket)
            await store.arelease(ticket)
            await asyncio.sleep(0)  # the flush scheduled on this loop starts
            await asyncio.gather(*store._give_backs)  # type: ignore[attr-defined]
        asyncio.run(loop_b())
        assert [lock.key for lock in other.locks()] == [], other.locks()  # both sent by loop B's flush
        release.set()
        a.join(WAIT)
    finally:
        release.set()
        store.close()
        other.close()
