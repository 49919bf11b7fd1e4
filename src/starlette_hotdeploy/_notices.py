"""Notices: what a wake-up says about the write that sent it, so the worker it wakes can act
without reading the store first.

Under load every thread hop of a worker waits for its busy event loop (and for the GIL behind
it): a look in the store after a wake-up costs 10-50 ms there. Three waits sit on the critical
path of every deployment, and the wake-up can carry what they look for:

- an operation begun (`begin_message`, the whole operation): the other workers prepare it at
  once;
- a vote (`vote_message`): the coordinator waiting for votes counts it at once (and the other
  workers, for whom a vote changes nothing, do not look in the store for it);
- a commit (`commit_message`): a worker that prepared the operation switches at once.

A notice is sent only after its write is in the store (the same thread, once the transaction
returned), so it never says more than the store does; the store stays the source of truth, and
every waiting worker still looks there on its slow timer and when a notice is not enough. The
datagrams only travel between the workers of one host, through sockets in a directory only
this user can write (see _wakeup).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from ._operation import Operation, Vote

logger = logging.getLogger("starlette_hotdeploy")

# Operations remembered (the oldest forgotten first): a notice is useful for a few
# milliseconds, until the worker it woke acted on it or looked in the store.
KEEP_OPERATIONS = 64


def vote_message(op_id: str, worker: str, vote: Vote) -> bytes:
    return json.dumps(["vote", op_id, worker, vote.value]).encode()


def commit_message(op_id: str, generation: int) -> bytes:
    return json.dumps(["commit", op_id, generation]).encode()


def begin_message(operation: Operation) -> bytes:
    return json.dumps(["begin", operation.id, operation.to_json()]).encode()


def keep_room(table: dict[str, Any]) -> None:
    """Room for one more operation in a table by operation id: the oldest go."""
    while len(table) >= KEEP_OPERATIONS:
        del table[next(iter(table))]  # the oldest


class Notices:
    """What this worker's wake-ups announced (on the event loop): the votes, with this worker's
    own, and the commits; an operation begun is handed on at once (`on_begin`)."""

    def __init__(self) -> None:
        self._votes: dict[str, dict[str, Vote]] = {}  # operation id -> worker -> latest vote
        self._commits: dict[str, int] = {}  # operation id -> generation of its commit
        # Told of each commit noticed (its operation id), at once (the follower switches).
        self.on_commit: Callable[[str], None] | None = None
        # Told of each operation noticed begun, at once; True: it prepares it (the follower),
        # so the wake-up is no change to look for.
        self.on_begin: Callable[[Operation], bool] | None = None

    def receive(self, data: bytes) -> bool:
        """One datagram's text; anything that is not a notice (a plain wake-up) is ignored.
        False: nothing for a follower to look for in the store (see `Wakeup.changes`): a vote,
        news only for the coordinator waiting for it, or an operation begun that the follower
        prepares as told."""
        try:
            message = json.loads(data)
            kind, op_id = str(message[0]), str(message[1])
            if kind == "vote":
                worker, vote = str(message[2]), Vote(message[3])
            elif kind == "commit":
                generation = int(message[2])
            elif kind == "begin":
                operation = Operation.from_json(message[2])
                if operation.id != op_id:
                    raise ValueError(op_id)
            else:
                raise ValueError(kind)
        except (ValueError, TypeError, IndexError, KeyError, ArithmeticError):
            logger.debug("ignored a wake-up that says %r", data[:80])
            return True
        if kind == "vote":
            self.note(op_id, worker, vote)
            return False
        if kind == "begin":
            return self.on_begin is None or not self.on_begin(operation)
        keep_room(self._commits)
        self._commits[op_id] = generation
        if self.on_commit is not None:
            self.on_commit(op_id)
        return True

    def note(self, op_id: str, worker: str, vote: Vote) -> None:
        """A vote known on the loop: one a wake-up announced, or this worker's own."""
        if op_id not in self._votes:
            keep_room(self._votes)
        self._votes.setdefault(op_id, {})[worker] = vote

    def votes(self, op_id: str) -> dict[str, Vote]:
        """The votes noticed for an operation, by worker (the latest of each)."""
        return self._votes.get(op_id, {})

    def commit(self, op_id: str) -> int | None:
        """The generation of the operation's commit, if a wake-up announced it."""
        return self._commits.get(op_id)
