"""Cluster: the worker processes of one host, converging on the store's desired state.

Every worker registers a heartbeat in the store. A change accepted by one worker (the
coordinator) is an *operation*: every live worker prepares the new version (load, start, checks)
and votes; only when all voted "prepared" does the coordinator commit (the desired state changes
in the same transaction); each worker then switches and votes "switched", and the coordinator
answers once every live worker did. A worker whose heartbeat is older than `liveness` seconds is
dead and is not waited for.

The writes the other workers wait for (an operation begun, a vote, the commit, a phase) go
through the methods below, each in one worker-thread hop that writes and then wakes the other
workers of the host (`_wakeup.Wakeup`); they and `await_votes` wait for those wake-ups, with a
slow timer as the safety net (`reconcile_interval`, `$HOTDEPLOY_RECONCILE_INTERVAL`). A store that
notifies (`_store.Notifying`: PostgreSQL) also wakes them for the writes of other hosts. Without
wake-ups (no AF_UNIX, a store without a home), or with a live worker on another host and a store
that does not notify, they poll every `poll_interval`.

A worker's id is `<host>:<pid>:<random>`; the host is `$HOTDEPLOY_HOST_ID`, else the hostname
(set it where hosts may share a hostname). Only for a worker of its own host can a worker tell
that its process is gone; another host's worker is alive while its heartbeat is recent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from ._errors import StoreError
from ._notices import Notices, begin_message, commit_message, keep_room, vote_message
from ._operation import Member, Operation, OperationKind, Phase, Vote
from ._store import Notifying, Store, Worker
from ._thread_hop import thread_hop
from ._wakeup import WAKE, Wakeup

T = TypeVar("T")

RECONCILE_ENV = "HOTDEPLOY_RECONCILE_INTERVAL"
HOST_ID_ENV = "HOTDEPLOY_HOST_ID"
# While a coordinator waits for votes, it looks again this often (seconds) without a wake-up:
# how soon it notices a worker that died without voting (its pid is gone).
VOTE_RECHECK = 0.5
# How long a coordinator tries to end an operation while the store does not answer (a database
# restarting) before it leaves that to its follower (`await_votes` rides it out to its timeout).
STORE_RETRY_FOR = 10.0

logger = logging.getLogger("starlette_hotdeploy")


def default_reconcile_interval() -> float:
    """$HOTDEPLOY_RECONCILE_INTERVAL (seconds), else 1: how often a worker looks at the store
    although nobody woke it up."""
    try:
        value = float(os.environ.get(RECONCILE_ENV, ""))
    except ValueError:
        return 1.0
    return value if value > 0 else 1.0


@dataclass(frozen=True, slots=True)
class VoteResult:
    """What the coordinator learned: who failed (with why) and who never answered."""

    failed: dict[str, str]
    missing: list[str]
    live: set[str] = field(default_factory=set)  # the live workers at the last look

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing

    def describe(self) -> str:
        parts = [f"worker {worker}: {detail}" for worker, detail in self.failed.items()]
        parts += [f"worker {worker} did not answer" for worker in self.missing]
        return "; ".join(parts)


class Cluster:
    def __init__(
        self,
        store: Store,
        *,
        heartbeat_interval: float = 1.0,
        liveness: float = 5.0,
        poll_interval: float = 0.02,
        reconcile_interval: float | None = None,
        timeout: float = 60.0,
        wake_home: Path | None = None,
    ) -> None:
        self.store = store
        self._host = (os.environ.get(HOST_ID_ENV) or socket.gethostname()).replace(":", "-")
        # Made when the runtime starts in this process, never at import: workers forked from a
        # preloading master (gunicorn --preload) each get their own.
        self.worker_id = f"{self._host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.poll_interval = poll_interval  # without wake-ups: how often to look
        # with them: the safety-net look
        self.reconcile_interval = reconcile_interval or default_reconcile_interval()
        self.timeout = timeout
        # The wake-up socket is bound now, so that wake-ups sent before anyone listens queue up.
        home = wake_home if wake_home is not None else getattr(store, "home", None)
        self.wakeup = Wakeup(Path(home) if home is not None else None)
        self.wakeup.open()
        self.notices = Notices()  # what the wake-ups said (a vote, a commit)
        self.wakeup.on_message = self.notices.receive
        # operation id -> the live workers when this worker began it, and `wakeup.changes`
        # then: await_votes counts the noticed votes against them without a look of its own
        # while no other change came (a worker that joins sends one)
        self._began: dict[str, tuple[set[str], int]] = {}
        self._with_commit: dict[str, Vote] = {}  # operation id -> this worker's vote, written with it
        self._remote = False  # a live worker on another host, at the last look
        self._notified = False  # the store wakes this worker for every host's writes
        # What the last write said this worker serves (the periodic heartbeat repeats it), and
        # the number of that map (see _beat).
        self.serving: dict[str, str] | None = None
        self._serving_seq = 0
        self._written_seq = 0
        self._beat_lock = threading.Lock()

    @property
    def wakes(self) -> bool:
        """Every change wakes this worker up (its socket is bound, its reader runs, and no live
        worker is on another host, or the store notifies): no polling needed."""
        return self.wakeup.is_open and self.wakeup.listening and (self._notified or not self._remote)

    @property
    def host(self) -> str:
        return self._host

    async def listen(self, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED) -> None:
        """Receive wake-ups until cancelled (the follower runs it in its background), the
        store's notifications among them."""
        stop = None
        if isinstance(self.store, Notifying) and self.wakeup.is_open:
            stop = self.store.subscribe(self.wakeup.poke)
            self._notified = True
        try:
            await self.wakeup.run(task_status=task_status)
        finally:
            self._notified = False
            if stop is not None:
                stop()

    async def wait_change(self, seen: int, timeout: float, *, changes: bool = False) -> bool:
        """Until a wake-up arrived after `seen` (`self.wakeup.count` taken before the last look,
        or with `changes`, `self.wakeup.changes`: wake-ups that only announced votes do not
        count), or `timeout`; without wake-ups, at most `poll_interval`."""
        if not self.wakes:
            timeout = min(timeout, self.poll_interval)
        return await self.wakeup.wait(seen, timeout, changes=changes)

    async def changed(self, write: Callable[[], T], notice: Callable[[T], bytes] | None = None) -> T:
        """Run a store write the other workers wait for, then wake them: one thread hop. With
        `notice`, the wake-up says what was written (see _notices)."""

        def run() -> T:
            result = write()
            if notice is None:
                self.wakeup.notify()
            else:
                self.wakeup.notify(notice(result))
            return result

        return await thread_hop(run)

    def workers(self) -> list[Worker]:
        """Workers with a recent heartbeat; on this host, also a process that still exists (a
        worker killed a moment ago is not waited for). A blocking call."""
        return [w for w in self.store.workers(self.liveness) if self._may_be_alive(w)]

    def _live_ids(self) -> set[str]:
        ids = {w.id for w in self.workers()}
        self._remote = any(w.partition(":")[0] != self._host for w in ids)
        return ids | {self.worker_id}

    async def live(self) -> set[str]:
        return await thread_hop(self._live_ids)

    def _may_be_alive(self, worker: Worker) -> bool:
        host, _, rest = worker.id.partition(":")
        pid = rest.partition(":")[0]
        if host != self._host or not pid.isdigit() or worker.id == self.worker_id:
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        if _zombie(int(pid)):
            return False
        # A process with that pid started after the worker's last heartbeat: the pid was reused
        # (a worker restarted in a container gets the same pid), the worker is gone. The last
        # heartbeat, not the registration: a clock stepped forward since then cannot make a
        # long-running worker look newer than its own process.
        started = _process_start(int(pid))
        return started is None or started <= worker.heartbeat_at + PID_REUSE_MARGIN

    async def heartbeat(self, serving: dict[str, str] | None) -> None:
        """Refresh this worker's heartbeat and what it serves (None: what it last wrote)."""
        beat = self._beat(serving)
        await thread_hop(beat)

    def _beat(self, serving: dict[str, str] | None) -> Callable[[], None]:
        """The blocking heartbeat of a map computed now (on the loop). Maps are numbered when
        computed; one that reaches the store after a newer one was written there (two thread
        hops overtaking each other) writes the newer one again instead of going back."""
        self._serving_seq += 1
        seq = self._serving_seq

        def write() -> None:
            with self._beat_lock:
                latest = serving
                if latest is None or seq < self._written_seq:
                    latest = self.serving if self.serving is not None else {}
                else:
                    self._written_seq, self.serving = seq, latest
                self.store.heartbeat(self.worker_id, latest)

        return write

    async def join(self) -> None:
        """This worker's first heartbeat, then a wake-up: a coordinator that waits for votes
        since before it looks again, and waits for this worker's vote too (see await_votes)."""
        await self.changed(self._beat({}))

    async def leave(self) -> None:
        """Nobody waits for this worker any more (a coordinator waiting for its vote is woken)."""
        try:
            await self.changed(lambda: self.store.remove_worker(self.worker_id))
        finally:
            self.wakeup.close()

    # -- the writes others wait for ---------------------------------------------------------

    async def begin_operation(
        self, operation: Operation, then: Callable[[], None] | None = None
    ) -> Operation | None:
        """Register an operation (the live workers read in the same hop); the one under way
        on the package, if a live worker runs one. `then`: a write of the caller's, in the same
        hop once the operation is begun (and the others woken up)."""
        live: set[str] = set()

        def run() -> Operation | None:
            # Which workers live is read first only if an operation under way may be a dead
            # one's (the transaction is then tried again), else after the wake-up, while the
            # others prepare: checking that a worker's process exists costs system calls, each
            # a wait for the GIL under load.
            try:
                other = self.store.begin_operation(operation, _NOT_READ)
            except _LiveNeeded:
                live.update(self._live_ids())
                other = self.store.begin_operation(operation, live)
            self.wakeup.notify(begin_message(operation) if other is None else WAKE)
            if not live:
                live.update(self._live_ids())
            if other is None and then is not None:
                then()
            return other

        changes = self.wakeup.changes
        other = await thread_hop(run)
        if other is None:
            keep_room(self._began)
            self._began[operation.id] = (live, changes)
        return other

    async def vote(
        self, op_id: str, vote: Vote, detail: str | None = None, *, serving: dict[str, str] | None = None
    ) -> None:
        """This worker's vote; with `serving`, the heartbeat first (same hop): once the vote is
        in, the workers map shows what this worker serves."""

        beat = self._beat(serving) if serving is not None else None

        def write() -> None:
            if beat is not None:
                beat()
            self.store.vote(op_id, self.worker_id, vote, detail)

        await self.changed(write, lambda _: vote_message(op_id, self.worker_id, vote))
        self.notices.note(op_id, self.worker_id, vote)

    def vote_with_commit(self, op_id: str, vote: Vote) -> None:
        """This worker's vote, counted by `await_votes` now and written with the commit (in its
        thread hop): no other worker waits for the coordinator's own PREPARED vote, so it need
        not cost a hop of its own on the way to the commit."""
        keep_room(self._with_commit)
        self._with_commit[op_id] = vote
        self.notices.note(op_id, self.worker_id, vote)

    async def commit(self, operation: Operation, canary: dict[str, Any] | None = None) -> int:
        """The desired state changes; this worker's vote given to `vote_with_commit` is written
        first, in the same hop (a store that fails it is ridden out, as `Coordinator._vote`
        does: nobody waits for it)."""
        vote = self._with_commit.pop(operation.id, None)

        def write() -> int:
            if vote is not None:
                with contextlib.suppress(StoreError):
                    self.store.vote(operation.id, self.worker_id, vote, None)
            return self.store.commit(operation, canary)

        return await self.changed(write, lambda generation: commit_message(operation.id, generation))

    async def set_canary(self, name: str, canary: dict[str, Any] | None) -> int:
        return await self.changed(lambda: self.store.set_canary(name, canary))

    async def set_phase(self, op_id: str, phase: Phase, *, serving: dict[str, str] | None = None) -> None:
        beat = self._beat(serving) if serving is not None else None

        def write() -> None:
            self.store.set_phase(op_id, phase)
            if beat is not None:
                beat()

        await self.changed(write)

    async def end(self, op_id: str, phase: Phase, *, serving: dict[str, str] | None = None) -> bool:
        """Move an operation to its last phase (ABORT or DONE), tried again while the store is
        unreachable, for up to `STORE_RETRY_FOR` seconds. False if it never went through: the
        operation then stays open (no one may begin another on its package) until this worker's
        follower ends it once the store answers (see `Follower.converge`)."""
        self._began.pop(op_id, None)
        self._with_commit.pop(op_id, None)
        deadline = time.monotonic() + STORE_RETRY_FOR
        delay = 0.1
        while True:
            try:
                await self.set_phase(op_id, phase, serving=serving)
                return True
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    logger.warning(
                        "operation %s could not be moved to phase %s (%s); it is ended once the store answers",
                        op_id,
                        phase,
                        exc,
                    )
                    return False
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def abandon(self, operation: Operation) -> None:
        await self.changed(lambda: self.store.abandon(operation))

    def new_operation(
        self,
        op_id: str,
        package: str,
        kind: OperationKind,
        version: str | None = None,
        sha256: str | None = None,
        lineage: list[tuple[str, str]] | None = None,
        *,
        members: tuple[Member, ...] = (),
    ) -> Operation:
        return Operation(
            id=op_id,
            package=package,
            kind=kind,
            version=version,
            sha256=sha256,
            lineage=lineage or [],
            phase=Phase.PREPARE,
            coordinator=self.worker_id,
            created_at=time.time(),
            members=members,
        )

    async def await_votes(
        self,
        operation: Operation,
        wanted: Vote,
        on_vote: Callable[[str, Vote, str | None], None] | None = None,
    ) -> VoteResult:
        """Wait until every live worker voted `wanted` (or FAILED), or the timeout; `on_vote` is
        told of each live worker's vote when it is first seen."""
        deadline = time.monotonic() + self.timeout
        reported: set[tuple[str, Vote]] = set()

        def look() -> tuple[set[str], dict[str, tuple[Vote, str | None]]]:
            return self._live_ids(), self.store.votes(operation.id)

        # The first look is the one that began the operation (no vote could precede it), if
        # this worker began it: votes already noticed since may end the wait without a hop.
        began, changes = self._began.get(operation.id, (None, -1))
        looked: tuple[set[str], dict[str, tuple[Vote, str | None]]] | None = (
            (began, {}) if began is not None else None
        )
        # Every vote still missing then comes with a wake-up that says it (the workers live at
        # the begin are all of this host, and wake this one up): a look would find nothing more,
        # unless a failure was noticed (its detail is in the store), a worker joined (its
        # wake-up is a change; anything else that changed makes it look too) or died without
        # voting (the first look, after VOTE_RECHECK, notices that).
        expect_notices = (
            began is not None and self.wakes and all(w.partition(":")[0] == self._host for w in began)
        )
        look_by = min(time.monotonic() + VOTE_RECHECK, deadline)
        while True:
            seen = self.wakeup.count  # before the look: a vote cast during it wakes the wait
            if looked is not None and looked[0] is began and self.wakeup.changes != changes:
                looked = None  # the begin's look may be out of date: look now
                expect_notices = False
            noticed = self._noticed_all(operation.id, wanted, *looked) if looked is not None else None
            if (
                noticed is None
                and expect_notices
                and time.monotonic() < look_by
                and Vote.FAILED not in self.notices.votes(operation.id).values()
            ):
                await self.wait_change(seen, look_by - time.monotonic())
                continue
            if noticed is not None:
                # The wake-ups announced the votes still missing at the last look: every
                # worker live then has voted `wanted` (the store has those votes already, but
                # for this worker's own given to `vote_with_commit`).
                live, votes = noticed
            else:
                expect_notices = False
                try:
                    looked = live, votes = await thread_hop(look)
                except StoreError:
                    # A database restarting: the votes are still there when it is back (and the
                    # voters send theirs again), so look again until the deadline.
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(VOTE_RECHECK)
                    continue
                # This worker's own vote may not be in the store yet (see vote_with_commit).
                own = self.notices.votes(operation.id).get(self.worker_id)
                if own is not None and self.worker_id not in votes:
                    votes = {**votes, self.worker_id: (own, None)}
            if on_vote is not None:
                for worker, (vote, detail) in sorted(votes.items()):
                    counted = wanted if vote.reaches(wanted) else vote
                    if (
                        worker in live
                        and counted in (wanted, Vote.FAILED)
                        and (worker, counted) not in reported
                    ):
                        reported.add((worker, counted))
                        on_vote(worker, counted, detail)
            failed = {
                w: detail or "failed"
                for w, (vote, detail) in votes.items()
                if vote is Vote.FAILED and w in live
            }
            waiting = sorted(
                w for w in live if not (w in votes and votes[w][0].reaches(wanted)) and w not in failed
            )
            if failed or not waiting:
                return VoteResult(failed, [], live)
            now = time.monotonic()
            if now > deadline:
                return VoteResult(failed, waiting, live)
            # Votes wake this up; the timer notices a worker that died without voting.
            await self.wait_change(seen, min(VOTE_RECHECK, deadline - now + 0.001))

    def _noticed_all(
        self, op_id: str, wanted: Vote, live: set[str], votes: dict[str, tuple[Vote, str | None]]
    ) -> tuple[set[str], dict[str, tuple[Vote, str | None]]] | None:
        """The last look's live workers and votes, with the votes that wake-ups announced since,
        if every one of those workers reached `wanted`. None: anything else (a failure, whose
        detail is in the store; a vote not announced) needs a look."""
        noticed = self.notices.votes(op_id)
        merged = dict(votes)
        for worker in live:
            vote = noticed.get(worker)
            if vote is Vote.FAILED:
                return None
            if vote is not None and vote.reaches(wanted):
                merged[worker] = (vote, None)
            elif not (worker in votes and votes[worker][0].reaches(wanted)):
                return None
        return live, merged


class _LiveNeeded(Exception):
    """A store asked `_NOT_READ` whether a worker is live (its transaction is rolled back)."""


class _NotRead:
    """The live workers, not read yet: a store that needs them (a worker looked up, or the
    workers listed: a store of the application's may do either) gets `_LiveNeeded`."""

    def __contains__(self, worker: object) -> bool:
        raise _LiveNeeded

    def __iter__(self) -> Iterator[str]:
        raise _LiveNeeded

    def __len__(self) -> int:
        raise _LiveNeeded


_NOT_READ = _NotRead()


# /proc's start times are clock ticks after the boot time (whole seconds, rounded down): a
# margin for the rounding and for the heartbeat's own clock.
PID_REUSE_MARGIN = 1.0


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


_BOOT = _boot_time()
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_start(pid: int) -> float | None:
    """When process `pid` started (wall clock), from /proc (Linux); None if unknown."""
    if _BOOT is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return _BOOT + int(stat.read().rpartition(b")")[2].split()[19]) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


def _zombie(pid: int) -> bool:
    """A killed process nobody reaped yet still answers kill(pid, 0) (Linux: state Z)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False
