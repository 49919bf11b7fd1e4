"""pluggy hook specifications and how the deployer calls them.

Checks (`hotdeploy_validate`, `hotdeploy_check_before_activate`, `hotdeploy_check_after_activate`)
pass when an implementation returns None or True, and veto the version when it returns False or
a message string, or raises. `hotdeploy_analyze_canary` passes, abstains or fails a canary step (_canary_analysis).
Notifications (`hotdeploy_activated`, `hotdeploy_rolled_back`,
`hotdeploy_drained`, `hotdeploy_failed`) cannot veto; an exception there is logged.
Any implementation may be a plain function or a coroutine function, but for `hotdeploy_unloaded`
(an unload cleaner, see _cleaners): it runs synchronously, inside the unload.

pluggy is synchronous: calling an async implementation returns a coroutine, which we await.
We never use `firstresult` (a coroutine object would count as a result).

Hooks are package code (a package's own `hooks` module) or plugin code: any BaseException they
raise (SystemExit, KeyboardInterrupt...), but anyio's cancellation, is a veto of a check or a
logged failure of a notification, never something that reaches the server.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import pluggy

from ._errors import CheckFailed
from ._loader import describe, is_cancellation
from ._manifest import Manifest

if TYPE_CHECKING:
    from ._canary_plan import CanaryStep
    from ._cleaners import Cleaner, Unloaded
    from ._deployment import Deployment
    from ._version import PackageVersion

PROJECT = "starlette_hotdeploy"
ENTRY_POINT_GROUP = "starlette_hotdeploy"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

logger = logging.getLogger("starlette_hotdeploy")


class HookSpecs:
    """The hooks a starlette-hotdeploy plugin may implement (all optional)."""

    @hookspec
    def hotdeploy_validate(self, manifest: Manifest) -> Any:
        """Check a package's manifest before any of its code is imported.

        Return None/True to accept, False or a message to refuse, or raise."""

    @hookspec
    def hotdeploy_check_before_activate(
        self, version: PackageVersion, previous: PackageVersion | None
    ) -> Any:
        """Check a started version that receives no traffic yet.

        A veto discards the new version; the previous one keeps serving."""

    @hookspec
    def hotdeploy_check_after_activate(self, version: PackageVersion, previous: PackageVersion | None) -> Any:
        """Check a version right after the switch, while the previous version stays warm.

        A veto switches back to the previous version at once."""

    @hookspec
    def hotdeploy_activated(
        self, version: PackageVersion, previous: PackageVersion | None, deployment: Deployment
    ) -> Any:
        """A version became active (its deployment succeeded)."""

    @hookspec
    def hotdeploy_rolled_back(
        self, version: PackageVersion, previous: PackageVersion | None, deployment: Deployment
    ) -> Any:
        """A post-activation check failed and `previous` is active again (`version` is discarded)."""

    @hookspec
    def hotdeploy_drained(self, version: PackageVersion, terminated: int) -> Any:
        """A replaced version finished draining and was shut down; `terminated` requests were
        still open at its drain timeout and were ended."""

    @hookspec
    def hotdeploy_failed(self, deployment: Deployment, error: Exception) -> Any:
        """A deployment failed; whatever served before still serves."""

    @hookspec
    def hotdeploy_analyze_canary(self, package: str, stable: Any, canary: Any, step: CanaryStep) -> Any:
        """Judge a canary step on both versions' figures in it, over every worker (each a
        `_canary_analysis.SideFigures`: requests, errors, error_rate, quantile(q)): True or "pass" to pass, None to abstain (the step
        waits), False, "fail" or a message to fail it (the canary is aborted), or raise."""

    @hookspec
    def hotdeploy_unloaded(self, unloaded: Unloaded) -> None:
        """An unload cleaner: release what your libraries keep of a version that was just
        unloaded (entries of caches and registries keyed on its classes and functions), or it
        stays in memory. Called after the built-in cleaners (FastAPI, pydantic), synchronously,
        before its memory is collected; a plain function only. An exception is logged."""


def make_plugin_manager(plugins: Iterable[object] = (), *, entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in plugins:
        pm.register(plugin)
    return pm


def plugin_label(pm: pluggy.PluginManager, impl: pluggy.HookImpl) -> str:
    """Its registered name, unless that is the `id()` pluggy names an unnamed object by: then
    its module's or its class's name."""
    name = pm.get_name(impl.plugin)
    if name is None or name == str(id(impl.plugin)):
        name = getattr(impl.plugin, "__name__", None)
    return str(name or type(impl.plugin).__name__)


def implemented(hook_name: str, managers: Sequence[pluggy.PluginManager]) -> bool:
    """Whether any plugin of these managers implements the hook."""
    return any(getattr(pm.hook, hook_name).get_hookimpls() for pm in managers)


async def run_checks(
    hook_name: str,
    managers: Sequence[pluggy.PluginManager],
    kwargs: dict[str, Any],
    *,
    timeout: float,
    package: str,
    version: str,
    step: str,
) -> None:
    """Call every implementation of a check hook in turn; raise CheckFailed on the first veto."""
    for pm in managers:
        caller = getattr(pm.hook, hook_name)
        # Last registered first, like pluggy's own call order.
        for impl in reversed(caller.get_hookimpls()):
            label = f"{plugin_label(pm, impl)}.{hook_name}"
            args = {name: kwargs[name] for name in impl.argnames}
            try:
                with anyio.fail_after(timeout):
                    result = impl.function(**args)
                    if inspect.isawaitable(result):
                        result = await result
            except TimeoutError:
                raise CheckFailed(
                    f"check {label} did not answer within {timeout:g}s",
                    check=label,
                    package=package,
                    version=version,
                    step=step,
                ) from None
            except BaseException as exc:
                if is_cancellation(exc):
                    raise
                raise CheckFailed(
                    f"check {label} raised {describe(exc)}",
                    check=label,
                    package=package,
                    version=version,
                    step=step,
                ) from exc
            if result is None or result is True:
                continue
            reason = result if isinstance(result, str) else "returned a failure"
            raise CheckFailed(
                f"check {label} vetoed: {reason}", check=label, package=package, version=version, step=step
            )


async def notify(hook_name: str, managers: Sequence[pluggy.PluginManager], kwargs: dict[str, Any]) -> None:
    """Call a notification hook everywhere; log, never raise."""
    for pm in managers:
        caller = getattr(pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            args = {name: kwargs[name] for name in impl.argnames}
            try:
                result = impl.function(**args)
                if inspect.isawaitable(result):
                    await result
            except BaseException as exc:
                if is_cancellation(exc):
                    raise
                logger.error(
                    "%s.%s raised %s", plugin_label(pm, impl), hook_name, describe(exc), exc_info=exc
                )


def unload_cleaners(pm: pluggy.PluginManager) -> list[tuple[str, Cleaner]]:
    """The `hotdeploy_unloaded` implementations, last registered first, as named cleaners."""
    hook_name = "hotdeploy_unloaded"
    caller = getattr(pm.hook, hook_name)
    return [
        (f"{plugin_label(pm, impl)}.{hook_name}", _sync_cleaner(impl))
        for impl in reversed(caller.get_hookimpls())
    ]


def _sync_cleaner(impl: pluggy.HookImpl) -> Cleaner:
    def clean(unloaded: Unloaded) -> None:
        result = impl.function(**{name: unloaded for name in impl.argnames})
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never awaited: no "coroutine was never awaited" warning
            raise TypeError("an unload cleaner runs inside the unload, synchronously: use a plain function")

    return clean
