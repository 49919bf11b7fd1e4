"""RestoreOrder: packages restored together start after the packages they require.

A worker restores many packages at once (`RESTORE_CONCURRENCY`). Which one requires which is
known only once each archive's manifest is read, so the order is kept as they go: a restore
whose manifest requires another package of the same batch waits, before it loads, until that
one has been restored (or has failed: the followers serve the desired state; requirements were
checked when it was committed). While it waits, it gives its slot of the limiter back, so a
chain longer than the limiter cannot stall. A wait that would close a cycle (a store written
before cycles were refused) is skipped.

Their blocking work (reading an archive's manifest, importing the version) runs in one worker
thread at a time (`threads`): imports hold the GIL and contend for the import lock, and in
parallel each hand-over of either waits out the interpreter's switch interval. With 1000 tiny
packages, a restore took 2.05 s with 8 threads and 1.49 s with one (benchmarks/restart_many.py).
An import that blocks (on the network, say) holds up the others' until it returns or its
`load_timeout` abandons it.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio

from ._manifest import Manifest


class RestoreOrder:
    def __init__(self, names: Iterable[str], concurrency: int) -> None:
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.threads = anyio.CapacityLimiter(1)
        self._done = {name: anyio.Event() for name in names}
        self._waiting: dict[str, set[str]] = {}  # who waits for whom, right now

    def finished(self, name: str) -> None:
        """`name`'s restore ended, restored or not: who waits for it goes on."""
        self._done[name].set()

    async def before_load(self, manifest: Manifest) -> None:
        """Called by a restore of the batch (holding a slot of `limiter`) once its manifest is read."""
        needed = {
            other
            for other in manifest.requires
            if other in self._done
            and other != manifest.name
            and not self._done[other].is_set()
            and not self._waits_for(other, manifest.name)  # that wait would close a cycle
        }
        if not needed:
            return
        self._waiting[manifest.name] = needed
        self.limiter.release()
        try:
            for other in sorted(needed):
                await self._done[other].wait()
        finally:
            del self._waiting[manifest.name]
            with anyio.CancelScope(shield=True):  # the slot must be held again on the way out
                await self.limiter.acquire()

    def _waits_for(self, name: str, target: str) -> bool:
        """Whether `name` waits, directly or through others, for `target`."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            current = stack.pop()
            if current == target:
                return True
            if current not in seen:
                seen.add(current)
                stack.extend(self._waiting.get(current, ()))
        return False
