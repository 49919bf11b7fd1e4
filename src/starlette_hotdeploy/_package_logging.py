"""Package loggers with the package's own names, stable across versions.

A version's modules run under a private namespace, so `logging.getLogger(__name__)` in
`billing/db.py` would name its logger `_hotdeploy_billing_1_0_n1.billing.db`, a name that
changes with every load: a logging config for `billing` would never apply. What a version's
`import logging` binds is a `PackageLogging` instead: the real module for everything but
`getLogger`, which turns a name of the version's namespace into the package's own
(`billing.db`) and answers, for it and any other name under the version's own top-level names
(`billing.audit`), a `VersionLogger`, one per version and name. Its parent is the real,
shared `billing.db` logger: levels, handlers and propagation configured for `billing` apply to
every version, and each record says which version logged it (`hotdeploy_package`,
`hotdeploy_version`). Other names (`sqlalchemy`, the root) go to `logging.getLogger` unchanged.

Not covered: code that reaches `logging` otherwise (`importlib.import_module("logging")`, a
third-party helper called with `__name__`), which gets the namespaced name as before.
"""

from __future__ import annotations

import logging
import types
from typing import Any


class VersionLogger(logging.Logger):
    """The logger `name` of one version: not in the logging manager's registry (it goes with the
    version), a child of the shared logger of the same name, stamping every record."""

    def __init__(self, shared: logging.Logger, package: str, version: str) -> None:
        super().__init__(shared.name)
        self.parent = shared
        self.manager = shared.manager
        self._stamp = {"hotdeploy_package": package, "hotdeploy_version": version}

    def isEnabledFor(self, level: int) -> bool:
        # Uncached: the manager clears the caches of the loggers it knows when a level changes,
        # and it does not know this one.
        if self.manager.disable >= level:
            return False
        return level >= self.getEffectiveLevel()

    def makeRecord(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = super().makeRecord(*args, **kwargs)
        record.__dict__.update(self._stamp)
        return record


class PackageLogging(types.ModuleType):
    """What `import logging` binds in a version's modules."""

    def __init__(self, namespace: str, package: str, version: str, top_level: frozenset[str]) -> None:
        super().__init__("logging", logging.__doc__)
        self._namespace = namespace
        self._top_level = top_level  # the version's own top-level names: `billing.audit` is its too
        self._package = package
        self._version = version
        self._loggers: dict[str, VersionLogger] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(logging, name)

    def getLogger(self, name: str | None = None) -> logging.Logger:
        if name is None:
            return logging.getLogger()
        if name == self._namespace or name.startswith(self._namespace + "."):
            own = name[len(self._namespace) + 1 :] or self._package
        elif name.partition(".")[0] in self._top_level:
            own = name
        else:
            return logging.getLogger(name)
        logger = self._loggers.get(own)
        if logger is None:
            logger = VersionLogger(logging.getLogger(own), self._package, self._version)
            logger = self._loggers.setdefault(own, logger)  # two threads: one wins
        return logger

    def close(self) -> None:
        """The version is unloaded: its loggers (and their handlers) go with it."""
        self._loggers.clear()
