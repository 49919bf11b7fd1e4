"""Wakeup: the workers of one host wake each other up when they changed the store.

Each worker binds a Unix datagram socket in a directory shared by the workers of the home and
of this host (`<home>/wake/<host>/<pid>-<random>.sock`, or, when that path would not fit a socket
address, a private directory under /tmp named after the home and the host). A worker that wrote
something the others wait for (an operation, a vote, a commit, a phase) sends a datagram to every
other socket in that directory: non-blocking, from the worker thread that did the write. Some
are one byte; an operation's begin, a vote and a commit say what was written (see _notices), so
the worker woken can act on it without looking in the store first. A socket nobody listens on any more (a killed
worker's) answers ECONNREFUSED and is removed; the host is in the path because another host's
sockets (a home on a shared file system) answer that too.

The receiving side is one task (`run`, under anyio, so asyncio and trio alike) that drains the
socket, hands each notice to `on_message` (on the event loop), and bumps two counters: `count`,
and `changes` unless `on_message` called every datagram of the burst news only for a waiter (a
vote); `wait(seen, timeout)` returns once the counter moved past `seen`, or after `timeout`. Nothing
depends on a datagram arriving: the callers also look on a slow timer, so a lost one only
delays. Where there is no AF_UNIX (Windows) or the loop cannot watch a socket, `open` or `run`
fails, `listening` stays False and the callers poll.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

logger = logging.getLogger("starlette_hotdeploy")

SUFFIX = ".sock"
# sun_path is 108 bytes on Linux, 104 on macOS and the BSDs; keep a margin.
MAX_SOCKET_PATH = 100
# The longest name `Wakeup` makes (a 10-digit pid): every worker of a home must pick the same
# directory, whatever the length of its own pid.
LONGEST_NAME = len(f"{2**32}-{'0' * 8}{SUFFIX}")
# A plain wake-up; a notice (see _notices) is a longer text, at most this long.
WAKE = b"!"
MAX_MESSAGE = 4096


def _digest(text: str, size: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:size]


def _fits(directory: Path) -> bool:
    return len(os.fsencode(directory)) + 1 + LONGEST_NAME <= MAX_SOCKET_PATH


def wake_directory(home: Path, host: str | None = None) -> Path | None:
    """Where the sockets of the home's workers on this host are: `<home>/wake/<host>`, else a
    short directory under /tmp (the same for every worker: named after the home's real path).
    None if even that is too long."""
    host = host if host is not None else socket.gethostname()
    real = home.resolve()
    directory = real / "wake" / _digest(host, 8)
    if _fits(directory):
        return directory
    user = os.getuid() if hasattr(os, "getuid") else 0
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    directory = base / f"hotdeploy-wake-{user}-{_digest(f'{real}:{host}')}"
    return directory if _fits(directory) else None


class Wakeup:
    """This worker's wake-up socket, and the sending side to the others of the home."""

    def __init__(self, home: Path | None) -> None:
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        self.directory = wake_directory(home) if home is not None else None
        self.path: Path | None = None
        self._receiver: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._lock = threading.Lock()  # notify (worker threads) against close (the loop)
        self._count = 0
        self._changes = 0
        self._event: anyio.Event | None = None  # made on the event loop, by wait or _bump
        self.listening = False  # `run` is draining the socket
        # Told each datagram's text, on the event loop, before the counters move; False: the
        # datagram is news only for a worker waiting for it (a vote), not a change to look for.
        self.on_message: Callable[[bytes], bool] | None = None

    @property
    def is_open(self) -> bool:
        return self._receiver is not None

    @property
    def count(self) -> int:
        """How many wake-ups arrived (bursts count once): pass it to `wait`."""
        return self._count

    @property
    def changes(self) -> int:
        """How many of them had a datagram that `on_message` did not call news only (a plain
        wake-up, a commit): pass it to `wait(changes=True)`."""
        return self._changes

    def open(self) -> bool:
        """Bind this worker's socket (blocking, quick). False: no wake-ups here, poll instead."""
        directory = self.directory
        if directory is None or not hasattr(socket, "AF_UNIX"):
            return False
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if hasattr(os, "getuid") and directory.stat().st_uid != os.getuid():
                logger.warning("%s belongs to another user: workers poll the store", directory)
                return False
            path = directory / self.name
            receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                receiver.setblocking(False)
                receiver.bind(os.fspath(path))
                sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sender.setblocking(False)
            except BaseException:
                receiver.close()
                raise
        except OSError as exc:
            logger.warning("no wake-up socket (%s): workers poll the store", exc)
            return False
        self._receiver, self._sender, self.path = receiver, sender, path
        return True

    def close(self) -> None:
        """Unbind (idempotent). On the event loop: a `run` still waiting is told first."""
        with self._lock:
            receiver, sender, path = self._receiver, self._sender, self.path
            self._receiver = self._sender = self.path = None
        if receiver is not None and self.listening:
            with contextlib.suppress(Exception):  # not on the loop's thread: nothing to tell
                anyio.notify_closing(receiver)
        self.listening = False
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        for sock in (receiver, sender):
            if sock is not None:
                sock.close()

    def notify(self, message: bytes = WAKE) -> int:
        """Wake every other worker of the home (blocking but never waits: call it from the
        worker thread that wrote), telling them `message`. Returns how many sockets were sent
        to."""
        directory = self.directory
        if directory is None or self._sender is None:
            return 0
        if len(message) > MAX_MESSAGE:
            # It would arrive cut: a plain wake-up (the worker looks in the store instead).
            logger.debug("a %d-byte notice goes as a plain wake-up", len(message))
            message = WAKE
        try:
            entries = [e for e in os.scandir(directory) if e.name != self.name and e.name.endswith(SUFFIX)]
        except OSError:
            return 0
        sent = 0
        with self._lock:  # close() cannot free the descriptor under a send
            sender = self._sender
            if sender is None:
                return 0
            for entry in entries:
                try:
                    sender.sendto(message, entry.path)
                    sent += 1
                except (BlockingIOError, InterruptedError):
                    sent += 1  # its queue is full: it has wake-ups pending anyway
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
                        # Nobody listens there: a worker that died without closing it.
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                    elif exc.errno not in (errno.ENOENT, errno.EPERM, errno.EACCES):
                        logger.debug("wake-up to %s failed: %s", entry.name, exc)
        return sent

    def poke(self) -> None:
        """Wake this worker itself (from any thread): a change another host wrote, say."""
        with self._lock:
            if self._sender is None or self.path is None:
                return
            with contextlib.suppress(OSError):  # a full queue has wake-ups pending anyway
                self._sender.sendto(WAKE, os.fspath(self.path))

    async def run(self, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED) -> None:
        """Receive wake-ups until cancelled (one task per worker; `tasks.start` returns once it
        listens). If the event loop cannot watch the socket, return: `listening` is False and
        the callers poll."""
        receiver = self._receiver
        if receiver is None:
            task_status.started()
            return
        self.listening = True
        task_status.started()
        try:
            while self._receiver is receiver:  # closed meanwhile (its fd is gone): stop
                await anyio.wait_readable(receiver)
                got = changed = False
                while True:
                    try:
                        data = receiver.recv(MAX_MESSAGE)
                    except OSError:  # BlockingIOError: drained
                        break
                    got = True
                    # Every datagram is read, even after a change: a notice behind a plain
                    # wake-up still says what it says (a begin, a commit).
                    changed = self._is_change(data) or changed
                if got:
                    self._bump(changed)
        except (OSError, NotImplementedError, anyio.ClosedResourceError, anyio.BusyResourceError) as exc:
            if self._receiver is receiver:
                logger.warning("wake-ups cannot be received (%r): workers poll the store", exc)
        finally:
            self.listening = False

    def _is_change(self, data: bytes) -> bool:
        if data == WAKE or self.on_message is None:
            return True
        try:
            return self.on_message(data)
        except Exception:  # a notice only saves a look: the wake-up still counts
            logger.exception("a wake-up's notice could not be read")
            return True

    def _bump(self, changed: bool = True) -> None:
        self._count += 1
        self._changes += changed
        event, self._event = self._event, anyio.Event()
        if event is not None:
            event.set()

    async def wait(self, seen: int, timeout: float, *, changes: bool = False) -> bool:
        """Until a wake-up arrived after `seen` (True), or `timeout` seconds passed (False).
        With `changes`, `seen` is a number of `changes`, and only those count."""
        with anyio.move_on_after(timeout):
            while (self._changes if changes else self._count) == seen:
                if self._event is None:
                    self._event = anyio.Event()
                await self._event.wait()
        return (self._changes if changes else self._count) != seen
