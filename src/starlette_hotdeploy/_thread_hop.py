"""Thread hops that, while an operation runs, the event loop waits for in short turns.

Under load the event loop's thread holds the GIL nearly all the time. A worker thread that
releases it, for each system call and each SQLite statement, gets it back only when the loop
lets go (see _switch_interval) and the system gives the thread a core again; on two cores that
wrk keeps busy, a hop whose work takes 2 ms when idle took 10-60 ms, and its result waited for
another turn of the busy loop to come back. A deployment is about ten such hops in a row.

So while an operation runs in this process (`Engine.operation`: a deployment's steps, a
worker's part in another's), `thread_hop` runs the function in a thread of its own pool and the
loop *waits for it*, blocked, for up to `TURN` (2 ms) at a time, serving one round of
everything else between two turns (`anyio.lowlevel.checkpoint`). The thread then has the GIL
whenever it wants it, and the result is read at once, with no round of the loop. The loop
lends at most `LENT` (8 ms) of turns per hop: what is left of a longer one (a big import, a
hung one) is waited for without blocking, as `anyio.to_thread.run_sync` does. (Each turn's end
hands the GIL back to the loop and then to the thread again: a long hop of pure Python, a
FastAPI package's import, gains nothing from more turns.)

Most of the time lent is CPU time that the thread would have taken from the loop anyway, in
slices of the switch interval; what changes is that it is not lost to handing the GIL back and
forth. A wait for the disk (a commit's fsync) is the loop's loss, 2 ms at a time.
Outside operations (the periodic look, heartbeats, the admin API's reads) a hop is
`anyio.to_thread.run_sync` itself.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, TypeVarTuple, Unpack

import anyio
import anyio.lowlevel
import anyio.to_thread

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

TURN = 0.002  # seconds the loop blocks at a time, waiting for a hop
LENT = 0.008  # seconds of turns at most per hop; then it waits without blocking
IDLE_EXIT = 10.0  # seconds a pool thread waits for work before it ends


class _Operations:
    """How many operations run in this process (on any event loop in it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0


_operations = _Operations()


def operation_began() -> None:
    with _operations.lock:
        _operations.running += 1


def operation_ended() -> None:
    with _operations.lock:
        _operations.running -= 1


def lending() -> bool:
    """Whether hops started now are waited for in turns (an operation runs)."""
    return _operations.running > 0


class _Hop(Generic[T]):
    """One call in a pool thread: its outcome, and an event set once it is there."""

    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as exc:  # a pool thread: everything goes back to the caller
            self.error = exc
        finally:
            self.done.set()

    def outcome(self) -> T:
        if self.error is not None:
            error, self.error = self.error, None  # no reference cycle through the traceback
            raise error
        return self.result  # type: ignore[return-value]


class _Pool:
    """Daemon threads that take calls from one queue: a hop never waits for a thread to be
    created once one is idle, and an abandoned call (a hung import) never holds up the
    interpreter's exit, as `concurrent.futures`' threads would."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a call that no submitted call has claimed

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._serve, name="hotdeploy hop", daemon=True).start()
        self._calls.put(call)

    def _serve(self) -> None:
        while True:
            try:
                call = self._calls.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # not claimed meanwhile: this thread is one too many
                        self._idle -= 1
                        return
                continue  # claimed by a submit whose call is on its way
            call()
            # Nothing of it stays with this thread while it waits: the call's result or
            # arguments may be a version's app, which must be collectable once retired.
            del call
            with self._lock:
                self._idle += 1


_pool = _Pool()


async def thread_hop(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: *PosArgsT,
    abandon_on_cancel: bool = False,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """`anyio.to_thread.run_sync(func, *args)`, waited for in turns while an operation runs
    (see the module's docstring). The same contract: the function runs in another thread, with
    a copy of the caller's context; cancelled, the caller waits for it to return unless
    `abandon_on_cancel`; `limiter` bounds how many run at once."""
    if not lending():
        return await anyio.to_thread.run_sync(
            func, *args, abandon_on_cancel=abandon_on_cancel, limiter=limiter
        )
    if limiter is None:
        return await _lent(func, args, abandon_on_cancel)
    async with limiter:
        return await _lent(func, args, abandon_on_cancel)


async def _lent(func: Callable[..., T], args: tuple[Any, ...], abandon_on_cancel: bool) -> T:
    await anyio.lowlevel.checkpoint_if_cancelled()  # as anyio's hop: cancelled, nothing starts
    context = contextvars.copy_context()
    hop = _Hop(lambda: context.run(func, *args))
    _pool.submit(hop.run)
    lent = 0.0
    # Not abandoned, the call is waited for whatever happens; a cancellation then reaches the
    # caller at its next checkpoint, as after anyio's own hop.
    with anyio.CancelScope(shield=not abandon_on_cancel):
        # A hop is a checkpoint, as anyio's is: the other tasks run once, even when the call
        # ends within the first turn (the thread meanwhile starts on it). Code after an await
        # may have let tasks it started run first: a retirement that a switch back then held
        # before it ever ran once broke its record (see Engine._retire).
        await anyio.lowlevel.checkpoint()
        while not hop.done.wait(TURN):
            lent += TURN
            if lent >= LENT:
                while not await anyio.to_thread.run_sync(hop.done.wait, 1.0, abandon_on_cancel=True):
                    pass
                break
            await anyio.lowlevel.checkpoint()  # one round of everything else
    return hop.outcome()
