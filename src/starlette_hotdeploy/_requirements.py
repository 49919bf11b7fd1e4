"""Requirements between packages: a change that would leave one unmet is refused.

A manifest's `requires = { inventory = ">=1.2" }` names packages that must be active, at a
version inside the PEP 440 specifier, for as long as the package is active. A prerelease that
is active counts (it was deployed on purpose). Only what the change touches is checked: the
changed package's own requirements, the requirements of the active packages on it, and the
cycles through it; an unrelated package's unmet requirement does not block this change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ._dependency_order import requirements_first
from ._errors import UnmetRequirement
from ._manifest import Manifest


def check_change(active: Iterable[Manifest], *changes: Manifest) -> None:
    """Raise UnmetRequirement if activating the `changes` together (each in place of the active
    version of its package, if any) would leave one of their requirements, or a requirement on
    one of them, unmet, or close a cycle of requirements. (Removing a package that others
    require is refused by undeploy itself: `PackageInUse`.)"""
    after = {manifest.name: manifest for manifest in active}
    after.update((new.name, new) for new in changes)
    for new in changes:
        for other, spec in sorted(new.requires.items()):
            _check(new, other, spec, after)
    for new in changes:
        cycle = _cycle_through(new.name, after)
        if cycle:
            raise UnmetRequirement(
                f"{new.name} {new.version}: its requirements form a cycle: {' -> '.join(cycle)}",
                package=new.name,
                version=new.version,
                step="requirements",
            )
    for new in changes:
        for dependant in sorted(after.values(), key=lambda manifest: manifest.name):
            on_it = dependant.requires.get(new.name)
            if on_it is not None and dependant.name != new.name:
                _check(dependant, new.name, on_it, after, changing=new)


def in_dependency_order(manifests: Iterable[Manifest]) -> list[Manifest]:
    """`manifests`, each after those of them it requires."""
    return requirements_first(manifests, lambda m: m.name, lambda m: sorted(m.requires))


def _check(
    dependant: Manifest,
    other: str,
    spec: SpecifierSet,
    after: Mapping[str, Manifest],
    changing: Manifest | None = None,
) -> None:
    """`dependant`'s requirement `other` `spec` against `after`; `changing`: the version whose
    activation is refused when it fails (else `dependant` is)."""
    wanted = f"{other}{spec}" if str(spec) else other
    found = after.get(other)
    if found is None:
        active = "it is not active"
    elif not _satisfies(found.version, spec):
        active = (
            f"{other} {found.version} would be active" if changing else f"{other} {found.version} is active"
        )
    else:
        return
    refused = changing or dependant
    held = " (active)" if changing else ""
    raise UnmetRequirement(
        f"{dependant.name} {dependant.version}{held} requires {wanted}, and {active}",
        package=refused.name,
        version=refused.version,
        step="requirements",
    )


def _satisfies(version: str, spec: SpecifierSet) -> bool:
    try:
        return spec.contains(Version(version), prereleases=True)
    except InvalidVersion:  # not PEP 440: only an empty specifier (any version) admits it
        return not str(spec)


def _cycle_through(name: str, graph: Mapping[str, Manifest]) -> list[str]:
    """A path name -> ... -> name along the requirements, or [] if there is none."""
    path = [name]
    seen: set[str] = set()

    def walk(current: str) -> bool:
        manifest = graph.get(current)
        for other in sorted(manifest.requires if manifest is not None else ()):
            if other == name:
                path.append(other)
                return True
            if other in seen:
                continue
            seen.add(other)
            path.append(other)
            if walk(other):
                return True
            path.pop()
        return False

    return path if walk(name) else []
