"""Notices: what a wake-up says about the write that sent it, so the worker it wakes can act
without reading the store first.

Under load every thread hop of a worker waits for its busy event loop (and for the GIL behind
it): a look in the store after a wake-up costs 10-50 ms there. Two waits sit on the critical
path of every deployment, and the wake-up can carry what they look for:

- a vote (`vote_message`): the coordinator waiting for votes counts it at once;
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

from ._operation import Vote

logger = logging.getLogger("starlette_hotdeploy")

# Operations remembered (the oldest forgotten first): a notice is useful for a few
# milliseconds, until the worker it woke acted on it or looked in the store.
KEEP_OPERATIONS = 64


def vote_message(op_id: str, worker: str, vote: Vote) -> bytes:
    return json.dumps(["vote", op_id, worker, vote.value]).encode()


def commit_message(op_id: str, generation: int) -> bytes:
    return json.dumps(["commit", op_id, generation]).encode()


class Notices:
    """The votes and commits that this worker's wake-ups announced (on the event loop)."""

    def __init__(self) -> None:
        self._votes: dict[str, dict[str, Vote]] = {}  # operation id -> worker -> latest vote
        self._commits: dict[str, int] = {}  # operation id -> generation of its commit
        # Told of each commit noticed (its operation id), at once (the follower switches).
        self.on_commit: Callable[[str], None] | None = None

    def receive(self, data: bytes) -> None:
        """One datagram's text; anything that is not a notice (a plain wake-up) is ignored."""
        try:
            message = json.loads(data)
            kind, op_id = str(message[0]), str(message[1])
            if kind == "vote":
                worker, vote = str(message[2]), Vote(message[3])
            elif kind == "commit":
                generation = int(message[2])
            else:
                raise ValueError(kind)
        except (ValueError, TypeError, IndexError, KeyError, ArithmeticError):
            logger.debug("ignored a wake-up that says %r", data[:80])
            return
        if kind == "vote":
            if op_id not in self._votes:
                self._make_room(self._votes)
            self._votes.setdefault(op_id, {})[worker] = vote
        else:
            self._make_room(self._commits)
            self._commits[op_id] = generation
            if self.on_commit is not None:
                self.on_commit(op_id)

    def votes(self, op_id: str) -> dict[str, Vote]:
        """The votes noticed for an operation, by worker (the latest of each)."""
        return self._votes.get(op_id, {})

    def commit(self, op_id: str) -> int | None:
        """The generation of the operation's commit, if a wake-up announced it."""
        return self._commits.get(op_id)

    @staticmethod
    def _make_room(table: dict[str, Any]) -> None:
        while len(table) >= KEEP_OPERATIONS:
            del table[next(iter(table))]  # the oldest
