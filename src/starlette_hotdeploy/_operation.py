"""Cluster operations: one change that every live worker carries out, in two phases.

The coordinator (the worker that accepted the change) records an operation in its `PREPARE`
phase; every live worker prepares the version and votes `PREPARED` or `FAILED`. When all voted
`PREPARED`, the coordinator moves it to `COMMIT` in the same transaction that changes the desired
state; every worker switches and votes `SWITCHED`; the coordinator ends it as `DONE`. Any failure
before the commit ends it as `ABORT`, and nothing switched anywhere.

    PREPARE ──▶ COMMIT ──▶ DONE
       └──────▶ ABORT
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Phase(enum.StrEnum):
    PREPARE = "prepare"
    COMMIT = "commit"
    DONE = "done"
    ABORT = "abort"

    @property
    def active(self) -> bool:
        """Still under way: followers act on it."""
        return self in (Phase.PREPARE, Phase.COMMIT)


# The only legal moves of an operation's phase (checked by the stores).
PHASE_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PREPARE: frozenset({Phase.COMMIT, Phase.ABORT}),
    Phase.COMMIT: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
    Phase.ABORT: frozenset(),
}


class Vote(enum.StrEnum):
    PREPARED = "prepared"  # the version is loaded, started and checked here
    FAILED = "failed"  # it could not be prepared here (the detail says why)
    SWITCHED = "switched"  # this worker serves the committed change
    CHECKED = "checked"  # and its post-activation checks passed here (FAILED: one vetoed)

    def reaches(self, wanted: Vote) -> bool:
        """This vote is `wanted` or a later one: a worker has one vote per operation, replaced
        as it goes on (prepared, then switched, then checked), so a later one answers an
        earlier question too."""
        return self in _PROGRESS and wanted in _PROGRESS and _PROGRESS[self] >= _PROGRESS[wanted]


_PROGRESS = {Vote.PREPARED: 0, Vote.SWITCHED: 1, Vote.CHECKED: 2}


class OperationKind(enum.StrEnum):
    ACTIVATE = "activate"  # make (version, sha256) the active version
    REMOVE = "remove"  # unmount the package and forget it
    # load (version, sha256) beside the active one and give it a share of the requests; open
    # (COMMIT) until the canary is promoted (an ACTIVATE of its own) or aborted
    CANARY = "canary"


CANARY_SUFFIX = "-canary"  # a CANARY operation's id: its deployment record's id, and this


@dataclass(frozen=True, slots=True)
class Member:
    """Another package that an ACTIVATE operation changes in the same commit (a set deployed
    together): its new desired (version, sha256) and lineage, or its removal (version None: a
    set's switch back to before a package of it was first installed)."""

    package: str
    version: str | None
    sha256: str | None
    lineage: list[tuple[str, str]]

    def to_json(self) -> dict[str, object]:
        return {
            "package": self.package,
            "version": self.version,
            "sha256": self.sha256,
            "lineage": self.lineage,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        return cls(data["package"], data["version"], data["sha256"], [(v, s) for v, s in data["lineage"]])


@dataclass(frozen=True, slots=True)
class Operation:
    """A change every worker carries out: ACTIVATE (version, sha256) or REMOVE; an ACTIVATE
    may change other packages in the same commit (`members`: a set deployed together)."""

    id: str
    package: str
    kind: OperationKind
    version: str | None
    sha256: str | None
    lineage: list[tuple[str, str]]
    phase: Phase
    coordinator: str
    created_at: float
    members: tuple[Member, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "package": self.package,
            "kind": self.kind.value,
            "version": self.version,
            "sha256": self.sha256,
            "lineage": self.lineage,
            "phase": self.phase.value,
            "coordinator": self.coordinator,
            "created_at": self.created_at,
            "members": [member.to_json() for member in self.members],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Operation:
        """From `to_json`'s form, every field checked (TypeError, ValueError or KeyError)."""
        members = tuple(
            Member(
                _str(m["package"]),
                _str_or_none(m["version"]),
                _str_or_none(m["sha256"]),
                _pairs(m["lineage"]),
            )
            for m in data["members"]
        )
        return cls(
            id=_str(data["id"]),
            package=_str(data["package"]),
            kind=OperationKind(data["kind"]),
            version=_str_or_none(data["version"]),
            sha256=_str_or_none(data["sha256"]),
            lineage=_pairs(data["lineage"]),
            phase=Phase(data["phase"]),
            coordinator=_str(data["coordinator"]),
            created_at=float(data["created_at"]),
            members=members,
        )

    @property
    def packages(self) -> frozenset[str]:
        """Every package it changes: no other operation may change one of them meanwhile."""
        return frozenset((self.package, *(m.package for m in self.members)))


def _str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string, not {type(value).__name__}")


def _str_or_none(value: object) -> str | None:
    return None if value is None else _str(value)


def _pairs(value: object) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, not {type(value).__name__}")
    return [(_str(version), _str(sha256)) for version, sha256 in value]
