"""Calls to one Redis server sent together on one connection: the store's calls made on an event loop
(:class:`LoopPipeline`) and those made by threads (:class:`ThreadPipeline`).

On an event loop, the calls made during one turn of the loop go out in one write, right after the callbacks
already queued, without waiting for earlier answers; one reader takes the answers back in order. From threads,
a thread that calls while no other thread is sending leads: it sends every call queued by then in one write and
reads their answers, while the other threads wait for theirs (as the SQLite store's group commit does).

Under load one connection then carries the calls, with one system call each way per batch instead of per call and
none of the per-call bookkeeping of a connection pool. The connection is taken from the client's pool when calls
start after a quiet moment and given back as soon as none is left, so an idle store holds no connection and the
pool's own checks of a connection still apply.

An error answer fails its own call only. A connection that fails (closed, or silent past the socket timeout)
fails every call it carried that still waits for its answer, as each would have failed on a connection of its
own, and is dropped; calls made afterwards take another.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import redis

from .forks import afresh_after_fork

__all__ = ["LoopPipeline", "ThreadPipeline", "available"]

_Call = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


def _packer() -> Callable[[tuple[Any, ...]], bytes] | None:
    """hiredis' command packer (one C call per command), when hiredis is installed."""
    try:
        from hiredis import pack_command
    except ImportError:
        return None
    return pack_command


_PACK = _packer()


def available() -> bool:
    """Whether calls can be pipelined here (hiredis packs them; redis-py's own packing costs more than it saves)."""
    return _PACK is not None


class LoopPipeline:
    """One event loop's calls to the server behind ``pool`` (a ``redis.asyncio`` connection pool)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._queue: list[_Call] = []  # not written yet
        self._sent: deque[asyncio.Future[Any]] = deque()  # written, waiting for their answers, in order
        self._writer: asyncio.StreamWriter | None = None  # the held connection's, while the reader runs
        self._reader: asyncio.Task[None] | None = None
        self._flush_scheduled = False

    async def call(self, *args: Any) -> Any:
        """Send one command (``"FCALL", name, numkeys, *keys, *args``) and return its answer; an error answer is
        raised as redis-py raises it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if self._reader is None:
            self._reader = loop.create_task(self._read())
        elif self._writer is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        """Write the calls queued, in one write (the reader writes them itself while it has no connection)."""
        self._flush_scheduled = False
        writer = self._writer
        if writer is None or not self._queue:
            return
        batch, self._queue = self._queue, []
        if writer.transport.is_closing():
            _fail((f for _, f in batch), redis.ConnectionError("the connection to the redis store is closed"))
            return
        data = []
        for args, future in batch:
            packed = _packed(args, future)
            if packed is not None:
                data.append(packed)
                self._sent.append(future)
        writer.writelines(data)

    async def _read(self) -> None:
        """Take a connection, write what is queued, read the answers in order while calls are in flight; then give
        the connection back."""
        conn: Any = None
        try:
            while self._queue or self._sent:
                if conn is None:
                    try:
                        conn = await self._take()
                    except Exception as exc:  # no connection to be had: the calls queued fail, later ones retry
                        _fail((f for _, f in self._queue), exc)
                        self._queue = []
                        continue
                    self._writer = conn._writer
                self._flush()
                if not self._sent:
                    continue
                try:
                    answer = await conn.read_response()
                except redis.ResponseError as exc:  # an error answer: the connection stays in step
                    answer = exc
                except Exception as exc:
                    _fail(self._sent, exc)
                    self._sent.clear()
                    self._writer = None
                    failed, conn = conn, None
                    await self._give_back(failed, healthy=False)
                    continue
                future = self._sent.popleft()
                if future.done():  # its caller was cancelled meanwhile
                    continue
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
        except BaseException:  # cancelled (the loop is closing): the calls in flight cannot know their outcome
            self._stop()
            if conn is not None:
                await self._give_back(conn, healthy=False)
            raise
        self._stop()
        if conn is not None:
            await self._give_back(conn, healthy=True)

    def _stop(self) -> None:
        self._reader = self._writer = None
        _fail(self._sent, _interrupted("the loop stopped"))  # sent: they may have run
        _fail((f for _, f in self._queue), redis.ConnectionError("the call was not sent: the loop stopped"))
        self._sent.clear()
        self._queue = []

    async def _take(self) -> Any:
        try:
            conn = await self._pool.get_connection()
        except TypeError:  # redis-py 5 asks for a command name
            conn = await self._pool.get_connection("FCALL")
        try:
            if not conn.is_connected:
                await conn.connect()
        except BaseException:
            await self._give_back(conn, healthy=False)
            raise
        return conn

    async def _give_back(self, conn: Any, healthy: bool) -> None:
        try:
            if not healthy:  # its answers may be out of step with its calls: never use it again
                await conn.disconnect()
        finally:
            await self._pool.release(conn)


def _packed(args: tuple[Any, ...], outcome: asyncio.Future[Any] | _Waiter) -> bytes | None:
    """One call packed; a call hiredis cannot pack fails alone (None)."""
    assert _PACK is not None
    try:
        return _PACK(args)
    except Exception as exc:
        if isinstance(outcome, _Waiter):
            outcome.error, outcome.done = exc, True
        elif not outcome.done():
            outcome.set_exception(exc)
        return None


def _interrupted(why: str) -> redis.TimeoutError:
    """What a call sent but not answered gets when its caller's reader or leader is interrupted: like a timeout,
    it may have run (an admission then takes back what it may have been granted)."""
    return redis.TimeoutError(f"the call was interrupted ({why}); it may have run")


def _fail(futures: Iterable[asyncio.Future[Any]], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


_BATCH = 256  # calls one write of a thread carries at most
_LEAD_EXTRA = 4  # batches a leading thread sends for others after its own call


class _Waiter:
    """A thread's call and, once answered, its outcome."""

    __slots__ = ("args", "done", "error", "result", "wake")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None
        self.wake: threading.Condition | None = None  # a waiting thread's own


class ThreadPipeline:
    """The calls of this process's threads to the server behind ``pool`` (a blocking redis-py pool)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._start()
        afresh_after_fork(self, ThreadPipeline._start)  # the parent's callers stay with the parent

    def _start(self) -> None:
        self._mutex = threading.Lock()
        self._queue: list[_Waiter] = []
        self._leading = False

    def call(self, *args: Any) -> Any:
        """Send one command and return its answer (from any thread); an error answer is raised as redis-py raises
        it."""
        waiter = _Waiter(args)
        with self._mutex:
            self._queue.append(waiter)
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                waiter.wake = threading.Condition(self._mutex)  # woken alone: answered, or to take the lead
                try:
                    while not waiter.done:
                        waiter.wake.wait()
                        if not waiter.done and not self._leading:
                            self._leading = lead = True
                            break
                except BaseException:  # interrupted while waiting (a signal handler raised): leave the queue
                    if waiter in self._queue:
                        self._queue.remove(waiter)
                    if not self._leading:
                        self._wake_next()  # the lead this thread may have been handed goes on
                    raise
        if lead:
            self._lead(waiter)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    def _lead(self, own: _Waiter) -> None:
        """Send what is queued and hand out the answers until ``own`` is answered, then at most
        :data:`_LEAD_EXTRA` batches more; then give the connection back and let a waiting thread lead."""
        conn: Any = None
        rounds = 0
        try:
            while True:
                with self._mutex:
                    if not self._queue or (own.done and rounds >= _LEAD_EXTRA):
                        return
                    rounds += own.done
                    batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
                packed = [(w, data) for w in batch if (data := _packed(w.args, w)) is not None]
                error: Exception | None = None
                try:
                    if packed:
                        if conn is None:
                            conn = self._pool.get_connection()
                        error = _exchange(conn, packed)
                except Exception as exc:  # no connection to be had
                    error = exc
                except BaseException as exc:  # interrupted: the calls sent cannot know their outcome
                    self._answer(batch, _interrupted(type(exc).__name__))
                    raise
                self._answer(batch, error)
                if error is not None:
                    if conn is not None:
                        failed, conn = conn, None
                        _drop(self._pool, failed)
                    if own.done:  # each caller waits for at most about two timeouts of a failing server
                        return
        except BaseException:
            if conn is not None:
                failed, conn = conn, None
                _drop(self._pool, failed)
            raise
        finally:
            if conn is not None:
                self._pool.release(conn)
            with self._mutex:
                self._leading = False
                self._wake_next()

    def _wake_next(self) -> None:
        """Wake the first thread still waiting in the queue, to lead (the lock is held)."""
        waiting = next((w.wake for w in self._queue if w.wake is not None), None)
        if waiting is not None:
            waiting.notify()

    def _answer(self, batch: list[_Waiter], error: Exception | None = None) -> None:
        """Mark the calls of a batch answered (``error``: those not answered yet failed) and wake their threads."""
        with self._mutex:
            for waiter in batch:
                if not waiter.done:
                    waiter.done = True
                    if error is not None:
                        waiter.error = error
                if waiter.wake is not None:
                    waiter.wake.notify()


def _exchange(conn: Any, batch: list[tuple[_Waiter, bytes]]) -> Exception | None:
    """Send a batch of packed calls in one write and read their answers into the waiters (not marked done yet);
    returns the error that failed the connection, if any (the waiters not answered then keep ``done`` False)."""
    try:
        conn.send_packed_command([b"".join([data for _, data in batch])], check_health=False)
        for waiter, _ in batch:
            try:
                waiter.result = conn.read_response()
            except redis.ResponseError as exc:  # an error answer: the connection stays in step
                waiter.error = exc
            waiter.done = True
    except Exception as exc:
        return exc
    return None


def _drop(pool: Any, conn: Any) -> None:
    """Give back a connection whose answers may be out of step with its calls, closed."""
    try:
        conn.disconnect()
    finally:
        pool.release(conn)
