"""The log lines of deployments: one when one starts, one when its outcome is decided, one when
it finishes (its replaced version drained and shut down).

On the `starlette_hotdeploy.deployments` logger. The messages are plain sentences; the key
fields are also on each record (`extra`) for structured handlers: `deployment_id`,
`operation`, `package`, `from_version`, `to_version`, `worker`, `outcome`, `duration_ms`,
`error`, `error_step`. A failure is logged at ERROR with its cause, a rollback after failed
post-activation checks at WARNING, the rest at INFO (the finish at DEBUG: the outcome was
already said).
"""

from __future__ import annotations

import logging
from typing import Any

from ._deployment import Deployment, Outcome

logger = logging.getLogger("starlette_hotdeploy.deployments")

_LEVEL = {
    Outcome.SUCCEEDED: logging.INFO,
    Outcome.ROLLED_BACK: logging.WARNING,
    Outcome.ABORTED: logging.WARNING,
    Outcome.FAILED: logging.ERROR,
}


def started(record: Deployment) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s started", _what(record), extra=_fields(record))


def decided(record: Deployment) -> None:
    level = _LEVEL.get(record.outcome, logging.INFO)
    if not logger.isEnabledFor(level):
        return
    message = f"{_what(record)} {record.outcome.value.replace('_', ' ')} in {record.duration_ms:g} ms"
    if record.error:
        message += f": {record.error}"  # it names its step already ("... [load]")
    logger.log(level, "%s", message, extra=_fields(record))


def finished(record: Deployment) -> None:
    if logger.isEnabledFor(logging.DEBUG) and record.finished_at is not None:
        took = round((record.finished_at - record.started_at) * 1000, 3)
        logger.debug("%s finished after %g ms", _what(record), took, extra=_fields(record))


def _what(record: Deployment) -> str:
    """ "deploy greeter 1.0 -> 2.0 (deployment 9ead934a, worker alpha:3801:20e5ba)"."""
    versions = ""  # what is known yet: a deploy learns both from the archive
    if record.from_version and record.to_version:
        versions = f" {record.from_version} -> {record.to_version}"
    elif record.to_version:
        versions = f" -> {record.to_version}"
    elif record.from_version:
        versions = f" {record.from_version}"
    package = f" {record.package}" if record.package else ""
    worker = f", worker {record.worker}" if record.worker else ""
    return f"{record.operation.value}{package}{versions} (deployment {record.id}{worker})"


def _fields(record: Deployment) -> dict[str, Any]:
    return {
        "deployment_id": record.id,
        "operation": record.operation.value,
        "package": record.package,
        "from_version": record.from_version,
        "to_version": record.to_version,
        "worker": record.worker,
        "outcome": record.outcome.value,
        "duration_ms": record.duration_ms,
        "error": record.error,
        "error_step": record.error_step,
    }
