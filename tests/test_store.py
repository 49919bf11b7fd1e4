"""The store: archives, desired state with generations, history; all of it survives a reopen."""

from __future__ import annotations

import hashlib
from pathlib import Path

from starlette_hotdeploy._store import Store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_archives_are_kept_by_name_version_and_sha(tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = store.save_archive("greeter", "1.0", sha(b"one"), b"one")
    assert path == tmp_path / "archives" / "greeter" / f"1.0-{sha(b'one')[:12]}.zip"
    assert path.read_bytes() == b"one"
    assert store.save_archive("greeter", "1.0", sha(b"one"), b"one") == path  # idempotent
    store.save_archive("greeter", "1.0", sha(b"fixed"), b"fixed")  # same version, new content
    stored = store.archive("greeter", "1.0")
    assert stored is not None
    assert stored.sha256 == sha(b"fixed")
    assert [a.sha256 for a in store.archives("greeter")] == [sha(b"one"), sha(b"fixed")]
    assert not list((tmp_path / "archives" / "greeter").glob(".*.tmp"))
    assert store.archive("greeter", "9.9") is None


def test_desired_state_and_generations_survive_a_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.generation() == 0
    assert store.set_desired("greeter", "1.0", "a" * 64, [("1.0", "a" * 64)]) == 1
    assert store.set_desired("inventory", "3.0", "b" * 64, [("3.0", "b" * 64)]) == 2
    assert store.set_desired("greeter", "2.0", "c" * 64, [("1.0", "a" * 64), ("2.0", "c" * 64)]) == 3
    store.close()

    reopened = Store(tmp_path)
    desired = reopened.desired()
    assert list(desired) == ["greeter", "inventory"]
    assert (desired["greeter"].version, desired["greeter"].generation) == ("2.0", 3)
    assert desired["greeter"].lineage == [("1.0", "a" * 64), ("2.0", "c" * 64)]
    assert reopened.remove_desired("inventory") == 4
    assert list(reopened.desired()) == ["greeter"]


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for n in range(5):
        store.save_archive("greeter", f"{n}.0", sha(bytes([n])), bytes([n]))
    removed = store.prune("greeter", keep=2, protect={("0.0", sha(bytes([0])))})
    assert [a.version for a in removed] == ["1.0", "2.0"]
    assert [a.version for a in store.archives("greeter")] == ["0.0", "3.0", "4.0"]
    assert all(not a.path.exists() for a in removed)


def test_history_newest_first(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for n, package in enumerate(["a", "b", "a"]):
        store.record({"id": f"d{n}", "package": package, "started_at": float(n), "outcome": "pending"})
    store.record({"id": "d0", "package": "a", "started_at": 0.0, "outcome": "succeeded"})  # updated
    assert [r["id"] for r in store.history()] == ["d2", "d1", "d0"]
    assert [r["id"] for r in store.history(package="a", limit=1)] == ["d2"]
    assert store.deployment("d0") == {"id": "d0", "package": "a", "started_at": 0.0, "outcome": "succeeded"}
    assert store.deployment("nope") is None
