"""The package manifest, `hotdeploy.toml`: parsing and validation."""

from __future__ import annotations

import math
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from ._canary_plan import CanaryPlan, plan_from_table
from ._errors import CanaryError, ManifestError

MANIFEST_NAME = "hotdeploy.toml"

Strategy = Literal["drain", "block", "canary"]

# All patterns are used with fullmatch(): `$` alone would accept a trailing newline.
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_APP = re.compile(rf"(?P<module>{_DOTTED}):(?P<attr>{_DOTTED})(?P<call>\(\))?")
_MODULE = re.compile(_DOTTED)
_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%-]+")

_REQUIRED = ("name", "version", "app", "mount")
_KNOWN = frozenset(
    (
        *_REQUIRED,
        "health",
        "requires",
        "strategy",
        "drain_timeout",
        "startup_timeout",
        "load_timeout",
        "hooks",
        "shadow_host_routes",
        "canary",
        "exports",
        "reload_with_requirements",
    )
)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated `hotdeploy.toml`."""

    name: str
    version: str
    app: str
    mount: str
    health: str | None = None
    requires: dict[str, SpecifierSet] = field(default_factory=dict)
    strategy: Strategy = "drain"
    drain_timeout: float = 30.0
    startup_timeout: float = 30.0
    load_timeout: float | None = None  # None: the server's default
    hooks: str | None = None
    shadow_host_routes: bool = False  # the mount may cover routes of the host app on purpose
    canary: CanaryPlan | None = None  # the `[canary]` table: the plan of a canary deploy
    # The modules dependents may import (each with its submodules); None: every module.
    exports: tuple[str, ...] | None = None
    # True: bound to the versions of its requirements it was loaded with, and reloaded with
    # them when they change; False: it talks to them over HTTP only, and may not import them.
    reload_with_requirements: bool = True

    def exported(self, module: str) -> bool:
        """Whether a dependent may import `module` (dotted, under this package's top level)."""
        if self.exports is None:
            return True
        return any(module == e or module.startswith(e + ".") for e in self.exports)

    @property
    def app_module(self) -> str:
        return self.app.partition(":")[0]

    @property
    def app_attribute(self) -> str:
        return self.app.partition(":")[2].removesuffix("()")

    @property
    def app_is_factory(self) -> bool:
        return self.app.endswith("()")

    @property
    def parsed_version(self) -> Version:
        return Version(self.version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "app": self.app,
            "mount": self.mount,
            "health": self.health,
            "requires": {k: str(v) for k, v in self.requires.items()},
            "strategy": self.strategy,
            "drain_timeout": self.drain_timeout,
            "startup_timeout": self.startup_timeout,
            "load_timeout": self.load_timeout,
            "hooks": self.hooks,
            "shadow_host_routes": self.shadow_host_routes,
            "canary": self.canary.to_dict() if self.canary is not None else None,
            "exports": list(self.exports) if self.exports is not None else None,
            "reload_with_requirements": self.reload_with_requirements,
        }


def load_manifest(path: Path) -> Manifest:
    """Read and validate the manifest file at `path`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST_NAME} found at the package root ({path.parent})") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    return parse_manifest(data)


def parse_manifest(data: bytes | str) -> Manifest:
    """Parse and validate manifest text; every problem names its key."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not valid UTF-8: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"not valid TOML: {exc}") from exc
    return validate_manifest(raw)


def validate_manifest(raw: dict[str, Any]) -> Manifest:
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise ManifestError(
            f"unknown key (allowed: {', '.join(sorted(_KNOWN))})", key=unknown[0], package=name
        )
    for key in _REQUIRED:
        if key not in raw:
            raise ManifestError("is required", key=key, package=name)

    name = _string(raw, "name", name)
    if not _NAME.fullmatch(name):
        raise ManifestError(
            f"{name!r} must be lowercase letters, digits and underscores, starting with a letter",
            key="name",
            package=name,
        )
    version = _string(raw, "version", name)
    try:
        Version(version)
    except InvalidVersion:
        raise ManifestError(f"{version!r} is not a PEP 440 version", key="version", package=name) from None

    app = _string(raw, "app", name)
    if not _APP.fullmatch(app):
        raise ManifestError(
            f"{app!r} must look like 'module:attribute' or 'module:factory()'", key="app", package=name
        )

    mount = _mount(_string(raw, "mount", name), name)
    health = raw.get("health")
    if health is not None:
        health = _string(raw, "health", name)
        if not health.startswith("/"):
            raise ManifestError(f"{health!r} must be a path starting with '/'", key="health", package=name)

    requires = _requires(raw.get("requires", {}), name)

    strategy = raw.get("strategy", "drain")
    if strategy not in ("drain", "block", "canary"):
        raise ManifestError(
            f"{strategy!r} must be 'drain', 'block' or 'canary'", key="strategy", package=name
        )
    canary = None
    if "canary" in raw or strategy == "canary":
        if strategy == "block":
            raise ManifestError(
                "a [canary] table and strategy = 'block' exclude each other: a canary serves both "
                "versions at once, 'block' holds requests until one switch",
                key="canary",
                package=name,
            )
        try:
            canary = plan_from_table(raw.get("canary", {}), package=name)
        except CanaryError as exc:
            key, _, message = exc.message.partition(": ")
            raise ManifestError(message, key=key, package=name) from None

    drain_timeout = _seconds(raw, "drain_timeout", 30.0, name)
    startup_timeout = _seconds(raw, "startup_timeout", 30.0, name)
    load_timeout = _optional_seconds(raw, "load_timeout", name)
    shadow_host_routes = raw.get("shadow_host_routes", False)
    if not isinstance(shadow_host_routes, bool):
        raise ManifestError(
            f"must be true or false, got {shadow_host_routes!r}", key="shadow_host_routes", package=name
        )

    reload_with_requirements = raw.get("reload_with_requirements", True)
    if not isinstance(reload_with_requirements, bool):
        raise ManifestError(
            f"must be true or false, got {reload_with_requirements!r}",
            key="reload_with_requirements",
            package=name,
        )
    exports = _exports(raw.get("exports"), name)

    hooks = raw.get("hooks")
    if hooks is not None:
        hooks = _string(raw, "hooks", name)
        if not _MODULE.fullmatch(hooks):
            raise ManifestError(f"{hooks!r} must be a module name", key="hooks", package=name)

    return Manifest(
        name=name,
        version=version,
        app=app,
        mount=mount,
        health=health,
        requires=requires,
        strategy=strategy,
        drain_timeout=drain_timeout,
        startup_timeout=startup_timeout,
        load_timeout=load_timeout,
        hooks=hooks,
        shadow_host_routes=shadow_host_routes,
        canary=canary,
        exports=exports,
        reload_with_requirements=reload_with_requirements,
    )


def _exports(value: Any, package: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(
            "must be a list of module names such as ['inventory.api']", key="exports", package=package
        )
    for module in value:
        if not _MODULE.fullmatch(module):
            raise ManifestError(f"{module!r} is not a module name", key="exports", package=package)
    return tuple(value)


def _string(raw: dict[str, Any], key: str, package: str | None) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"must be a non-empty string, got {value!r}", key=key, package=package)
    return value.strip()


def _mount(value: str, package: str) -> str:
    """The mount in the form requests are matched in: servers percent-decode the path before
    routing (`/%70robe` arrives as `/probe`), and duplicate slashes are one."""
    if not value.startswith("/"):
        raise ManifestError(f"{value!r} must start with '/'", key="mount", package=package)
    try:
        segments = [urllib.parse.unquote(part, errors="strict") for part in value.split("/") if part]
    except UnicodeDecodeError:
        raise ManifestError(
            f"{value!r} has a percent-escape that is not UTF-8", key="mount", package=package
        ) from None
    if not segments:
        raise ManifestError(
            "'/' is the host app's; choose a prefix such as '/orders'", key="mount", package=package
        )
    mount = "/" + "/".join(segments)
    for segment in segments:
        if (
            segment in (".", "..")
            or not _SEGMENT.fullmatch(segment)
            or "{" in segment
            or "%" in segment
            or "/" in segment
        ):
            raise ManifestError(
                f"{value!r} must be a literal URL prefix such as '/orders' or '/api/orders'",
                key="mount",
                package=package,
            )
    return mount


def _requires(value: Any, package: str) -> dict[str, SpecifierSet]:
    if not isinstance(value, dict):
        raise ManifestError(
            "must be a table such as { inventory = '>=1.0' }", key="requires", package=package
        )
    requires: dict[str, SpecifierSet] = {}
    for other, spec in value.items():
        if not _NAME.fullmatch(other):
            raise ManifestError(f"{other!r} is not a package name", key=f"requires.{other}", package=package)
        if not isinstance(spec, str):
            raise ManifestError(f"{spec!r} must be a string", key=f"requires.{other}", package=package)
        try:
            requires[other] = SpecifierSet(spec)
        except InvalidSpecifier:
            raise ManifestError(
                f"{spec!r} is not a PEP 440 specifier", key=f"requires.{other}", package=package
            ) from None
    return requires


def _optional_seconds(raw: dict[str, Any], key: str, package: str) -> float | None:
    return None if raw.get(key) is None else _seconds(raw, key, 0.0, package)


def _seconds(raw: dict[str, Any], key: str, default: float, package: str) -> float:
    value = raw.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ManifestError(f"must be a positive number of seconds, got {value!r}", key=key, package=package)
    return float(value)
