"""Cluster: the worker processes of one host, converging on the store's desired state.

Every worker registers a heartbeat in the store. A change accepted by one worker (the
coordinator) is an *operation*: every live worker prepares the new version (load, start, checks)
and votes; only when all voted "prepared" does the coordinator commit (the desired state changes
in the same transaction); each worker then switches and votes "switched", and the coordinator
answers once every live worker did. A worker whose heartbeat is older than `liveness` seconds is
dead and is not waited for.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

import anyio
import anyio.to_thread

from ._operation import Operation, OperationKind, Phase, Vote
from ._store import Store, Worker


@dataclass(frozen=True, slots=True)
class VoteResult:
    """What the coordinator learned: who failed (with why) and who never answered."""

    failed: dict[str, str]
    missing: list[str]

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
        heartbeat_interval: float = 0.5,
        liveness: float = 5.0,
        poll_interval: float = 0.02,
        timeout: float = 60.0,
    ) -> None:
        self.store = store
        self._host = socket.gethostname()
        # Made when the runtime starts in this process, never at import: workers forked from a
        # preloading master (gunicorn --preload) each get their own.
        self.worker_id = f"{self._host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.poll_interval = poll_interval
        self.timeout = timeout

    def workers(self) -> list[Worker]:
        """Workers with a recent heartbeat; on this host, also a process that still exists (a
        worker killed a moment ago is not waited for). A blocking call."""
        return [w for w in self.store.workers(self.liveness) if self._may_be_alive(w.id)]

    async def live(self) -> set[str]:
        workers = await anyio.to_thread.run_sync(self.workers)
        return {w.id for w in workers} | {self.worker_id}

    def _may_be_alive(self, worker_id: str) -> bool:
        host, _, rest = worker_id.partition(":")
        pid = rest.partition(":")[0]
        if host != self._host or not pid.isdigit():
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _zombie(int(pid))

    async def heartbeat(self, serving: dict[str, str]) -> None:
        await anyio.to_thread.run_sync(self.store.heartbeat, self.worker_id, serving)

    async def leave(self) -> None:
        await anyio.to_thread.run_sync(self.store.remove_worker, self.worker_id)

    def new_operation(
        self,
        op_id: str,
        package: str,
        kind: OperationKind,
        version: str | None = None,
        sha256: str | None = None,
        lineage: list[tuple[str, str]] | None = None,
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
        )

    async def await_votes(self, operation: Operation, wanted: Vote) -> VoteResult:
        """Wait until every live worker voted `wanted` (or FAILED), or the timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            live = await self.live()
            votes = await anyio.to_thread.run_sync(self.store.votes, operation.id)
            failed = {
                w: detail or "failed"
                for w, (vote, detail) in votes.items()
                if vote is Vote.FAILED and w in live
            }
            waiting = sorted(w for w in live if votes.get(w, ("", None))[0] != wanted and w not in failed)
            if failed or not waiting:
                return VoteResult(failed, [])
            if time.monotonic() > deadline:
                return VoteResult(failed, waiting)
            await anyio.sleep(self.poll_interval)


def _zombie(pid: int) -> bool:
    """A killed process nobody reaped yet still answers kill(pid, 0) (Linux: state Z)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False
