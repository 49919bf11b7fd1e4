"""The mount table: which package owns a URL prefix, and which of its versions is active."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ._errors import IllegalTransition, MountConflict
from ._version import VersionState

if TYPE_CHECKING:
    import anyio

    from ._split import Split
    from ._version import PackageVersion


class Mount:
    """A URL prefix and the package version it points at.

    The switch from one version to another is the single assignment in `point()`, which refuses a
    version that is not `active` with a loaded app: the request path never meets an unloaded one.
    While `gate` is set (the `block` strategy), new requests wait on it before reading `active`.

    While a canary runs, `split` (see _split) picks between the active version and the canary
    for each request; without one (nearly always) the request path reads `active` only.

    A reserved prefix (the admin API) is a Mount too, `reserved` and without a version: the
    dispatch finds it in the same lookup as the packages, at no extra cost to their requests.
    """

    __slots__ = ("active", "gate", "package", "prefix", "reserved", "split")

    def __init__(self, prefix: str, package: str, active: PackageVersion) -> None:
        self.prefix = prefix
        self.package = package
        self.active: PackageVersion | None = None
        self.gate: anyio.Event | None = None
        self.split: Split | None = None
        self.reserved = False
        self.point(active)

    @classmethod
    def reservation(cls, prefix: str, owner: str) -> Mount:
        """A prefix that something other than a package serves (`package` names the owner)."""
        mount = cls.__new__(cls)
        mount.prefix, mount.package, mount.active, mount.gate, mount.split = prefix, owner, None, None, None
        mount.reserved = True
        return mount

    def point(self, version: PackageVersion) -> None:
        if version.state is not VersionState.ACTIVE or version.app is None:
            raise IllegalTransition(
                f"mount {self.prefix!r} cannot point at a version that is {version.state.value}"
                + ("" if version.app is not None else " and unloaded"),
                package=version.name,
                version=version.version,
                step="switch",
            )
        self.active = version

    def __repr__(self) -> str:
        return f"<Mount {self.prefix!r} -> {self.active!r}>"


def ancestors(prefix: str) -> list[str]:
    """The whole-segment prefixes above `prefix`: "/a/b/c" -> ["/a", "/a/b"]."""
    found = []
    end = prefix.find("/", 1)
    while end != -1:
        found.append(prefix[:end])
        end = prefix.find("/", end + 1)
    return found


def overlaps(a: str, b: str) -> bool:
    """True when one prefix equals the other or contains it as whole path segments."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


class MountTable:
    """Prefix lookup in a dict, one probe per distinct mount depth.

    Mounts never overlap (that is refused), so at most one prefix of a path can match, and the
    cost of a lookup depends on how many segments mounts have, never on how many there are.
    """

    def __init__(self) -> None:
        self._by_prefix: dict[str, Mount] = {}  # the packages' mounts
        self._below: dict[str, set[str]] = {}  # a path -> the mount prefixes under it
        self._index: dict[str, Mount] = {}  # what `match` looks in: those and the reserved ones
        self._depths: Counter[int] = Counter()  # segments of each prefix in `_index`
        self._max_depth = 0
        self._reserved: dict[str, str] = {}  # prefix -> what owns it (the admin API)

    def reserve(self, prefix: str, owner: str) -> None:
        """Keep packages away from a prefix served by something else (`match` finds it)."""
        self._reserved[prefix] = owner
        if prefix not in self._index:
            self._indexed(prefix, +1)
        self._index[prefix] = Mount.reservation(prefix, owner)

    def __len__(self) -> int:
        return len(self._by_prefix)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._by_prefix.values()))

    def get(self, prefix: str) -> Mount | None:
        return self._by_prefix.get(prefix)

    def check(self, prefix: str, package: str) -> None:
        """Raise MountConflict if `prefix` overlaps another package's mount or a reserved one."""
        for reserved, owner in self._reserved.items():
            if overlaps(prefix, reserved):
                raise MountConflict(
                    f"mount {prefix!r} overlaps {reserved!r}, reserved for {owner}",
                    package=package,
                    step="manifest",
                )
        # The mounts at `prefix` or above it, and those below it: O(depth), not O(mounts).
        near = [p for p in (*ancestors(prefix), prefix) if p in self._by_prefix]
        near += sorted(self._below.get(prefix, ()))
        for other in (self._by_prefix[p] for p in near):
            if other.package != package:
                raise MountConflict(
                    f"mount {prefix!r} overlaps {other.prefix!r} of package {other.package!r}; "
                    "choose a prefix that neither contains nor is contained in it",
                    package=package,
                    step="manifest",
                )

    def add(self, mount: Mount) -> None:
        self.check(mount.prefix, mount.package)
        if mount.prefix not in self._by_prefix:
            for above in ancestors(mount.prefix):
                self._below.setdefault(above, set()).add(mount.prefix)
            self._indexed(mount.prefix, +1)
        self._by_prefix[mount.prefix] = mount
        self._index[mount.prefix] = mount

    def remove(self, prefix: str) -> Mount | None:
        mount = self._by_prefix.pop(prefix, None)
        if mount is not None:
            del self._index[prefix]
            for above in ancestors(prefix):
                below = self._below.get(above)
                if below is not None:
                    below.discard(prefix)
                    if not below:
                        del self._below[above]
            self._indexed(prefix, -1)
        return mount

    def _indexed(self, prefix: str, change: int) -> None:
        """Keep `_max_depth` (how many segments `match` probes) without rescanning every mount."""
        depths = self._depths
        depths[prefix.count("/")] += change
        for depth in [d for d, n in depths.items() if n <= 0]:
            del depths[depth]
        self._max_depth = max(depths, default=0)

    def match(self, route_path: str) -> Mount | None:
        """The mount (or reserved prefix) that is `route_path` or a whole-segment prefix of it."""
        table = self._index
        if not table:
            return None
        end = 0
        for _ in range(self._max_depth):
            end = route_path.find("/", end + 1)
            if end == -1:
                return table.get(route_path)
            mount = table.get(route_path[:end])
            if mount is not None:
                return mount
        return None
