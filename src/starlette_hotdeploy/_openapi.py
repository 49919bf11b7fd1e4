"""The admin API's OpenAPI 3.1 document (written by hand: the API is small and fixed)."""

from __future__ import annotations

from typing import Any

from ._deployment import Action, Outcome
from ._version import VersionState

_PROBLEM = {"$ref": "#/components/responses/Problem"}


def _problems(*statuses: int) -> dict[str, Any]:
    return {str(status): _PROBLEM for status in statuses}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def openapi_document(prefix: str, max_upload_bytes: int) -> dict[str, Any]:
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "starlette-hotdeploy admin API",
            "version": "1",
            "description": "Deploy, roll back, activate and remove packages in a running server. "
            "Every request needs `Authorization: Bearer <token>`; errors are RFC 9457 problem details.",
        },
        "x-generator": "starlette-hotdeploy",
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Problem": {
                    "description": "An error, as RFC 9457 problem details; `detail` names the cause.",
                    "content": {
                        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                    },
                }
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "package": {"type": "string"},
                        "version": {"type": "string"},
                        "step": {"type": "string"},
                        "deployment": {"$ref": "#/components/schemas/Deployment"},
                    },
                },
                "Step": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "started_at": {"type": "number"},
                        "duration_ms": {"type": ["number", "null"]},
                        "ok": {"type": ["boolean", "null"]},
                        "detail": {"type": ["string", "null"]},
                    },
                },
                "Deployment": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "operation": {"enum": [action.value for action in Action]},
                        "package": {"type": ["string", "null"]},
                        "from_version": {"type": ["string", "null"]},
                        "to_version": {"type": ["string", "null"]},
                        "sha256": {"type": ["string", "null"]},
                        "worker": {"type": ["string", "null"]},
                        "signer": {"type": ["string", "null"]},
                        "downgrade": {"type": "boolean"},
                        "forced": {"type": "boolean"},
                        "started_at": {"type": "number"},
                        "decided_at": {"type": ["number", "null"]},
                        "finished_at": {"type": ["number", "null"]},
                        "duration_ms": {"type": ["number", "null"]},
                        "outcome": {"enum": [outcome.value for outcome in Outcome]},
                        "error": {"type": ["string", "null"]},
                        "error_step": {"type": ["string", "null"]},
                        "steps": {"type": "array", "items": {"$ref": "#/components/schemas/Step"}},
                        "moved": {
                            "type": "array",
                            "description": "the dependents that moved with the package in the same switch "
                            "(loaded again, bound to its new version): 'orders 1.0'",
                            "items": {"type": "string"},
                        },
                        "canary": {
                            "type": ["object", "null"],
                            "description": "a canary deploy: its plan, key, thresholds, current state, "
                            "and the analyses that decided its steps (verdict, reason, both versions' "
                            "figures over every worker)",
                        },
                        "workers": {
                            "type": "object",
                            "description": "each worker's votes, as its coordinator saw them, in ms after started_at",
                            "additionalProperties": {
                                "type": "object",
                                "properties": {
                                    "host": {"type": "string"},
                                    "prepared_ms": {"type": "number"},
                                    "switched_ms": {"type": "number"},
                                    "checked_ms": {"type": "number"},
                                    "failed_ms": {"type": "number"},
                                    "error": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "Version": {
                    "type": "object",
                    "properties": {
                        "version": {"type": "string"},
                        "state": {"enum": [state.value for state in VersionState]},
                        "in_flight": {"type": "integer"},
                        "sha256": {"type": "string"},
                        "served": {"type": "integer"},
                        "terminated": {"type": "integer"},
                        "bound_to": {
                            "type": "object",
                            "description": "the versions of its requirements whose modules it imports: "
                            "package -> version",
                            "additionalProperties": {"type": "string"},
                        },
                    },
                },
                "Package": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "mount": {"type": "string"},
                        "active_version": {"type": ["string", "null"]},
                        "previous_version": {"type": ["string", "null"]},
                        "versions": {"type": "array", "items": {"$ref": "#/components/schemas/Version"}},
                        "available_versions": {"type": "array", "items": {"type": "object"}},
                        "workers": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
                        "requires": {
                            "type": "object",
                            "description": "what the active version requires: package -> PEP 440 specifier",
                            "additionalProperties": {"type": "string"},
                        },
                        "required_by": {
                            "type": "array",
                            "description": "active packages whose active version requires this one",
                            "items": {"type": "string"},
                        },
                        "canary": {"oneOf": [{"$ref": "#/components/schemas/Canary"}, {"type": "null"}]},
                    },
                },
                "PackageList": {
                    "type": "object",
                    "properties": {
                        "packages": {"type": "array", "items": {"$ref": "#/components/schemas/Package"}}
                    },
                },
                "WhoAmI": {
                    "type": "object",
                    "required": ["role", "can_change", "worker"],
                    "properties": {
                        "role": {"type": "string", "enum": ["admin", "read"]},
                        "can_change": {"type": "boolean", "description": "false for the read-only token"},
                        "worker": {"type": "string", "description": "the worker that answered"},
                    },
                },
                "Cluster": {
                    "type": "object",
                    "description": "Every live worker of every host sharing the store, by host",
                    "required": ["store", "host", "worker", "generation", "desired", "hosts"],
                    "properties": {
                        "store": {"type": "string"},
                        "host": {"type": "string", "description": "the host that answered"},
                        "worker": {"type": "string", "description": "the worker that answered"},
                        "generation": {"type": "integer"},
                        "desired": {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "properties": {"version": {"type": "string"}, "sha256": {"type": "string"}},
                            },
                        },
                        "hosts": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "host": {"type": "string"},
                                    "lagging": {"type": "array", "items": {"type": "string"}},
                                    "workers": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "id": {"type": "string"},
                                                "pid": {"type": "integer"},
                                                "started_at": {"type": "number"},
                                                "heartbeat_age": {"type": "number"},
                                                "serving": {
                                                    "type": "object",
                                                    "additionalProperties": {"type": "string"},
                                                },
                                                "lagging": {"type": "array", "items": {"type": "string"}},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
                "Canary": {
                    "type": "object",
                    "description": "A running canary: its version, the share of new users it gets, "
                    "its step, and (in a package's status) the last analysis",
                    "properties": {
                        "version": {"type": "string"},
                        "weight_percent": {"type": "number"},
                        "step": {"type": "integer"},
                        "steps": {"type": "string"},
                        "current_step": {"type": "string"},
                        "key": {"type": "string"},
                        "deployment": {"type": "string"},
                        "coordinator": {"type": "string"},
                        "requested": {"type": "string", "enum": ["promote", "promote_all", "abort"]},
                        "analysis": {"type": ["object", "null"]},
                    },
                },
                "DeploymentList": {
                    "type": "object",
                    "properties": {
                        "deployments": {"type": "array", "items": {"$ref": "#/components/schemas/Deployment"}}
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            f"{prefix}/packages": {
                "get": {
                    "summary": "Every package, its mount, active version and loaded versions",
                    "responses": {"200": _json("PackageList", "The packages"), **_problems(401)},
                },
                "post": {
                    "summary": "Install or upgrade a package from an archive (zip or wheel)",
                    "description": f"The body is the archive (at most {max_upload_bytes} bytes), or a "
                    "multipart upload with one archive file and optionally its SSH signature as a part "
                    "named `signature`. With trusted keys configured, an archive without a valid "
                    "signature is refused with 403 before anything is unpacked. Answers once the "
                    "outcome is known, unless wait=false.",
                    "parameters": [
                        {"name": "wait", "in": "query", "schema": {"type": "boolean", "default": True}},
                        {
                            "name": "force",
                            "in": "query",
                            "description": "replace a different archive deployed under the same version "
                            "number (else 409)",
                            "schema": {"type": "boolean", "default": False},
                        },
                        {
                            "name": "shadow_host_routes",
                            "in": "query",
                            "description": "the mount may cover routes of the host app (else 409)",
                            "schema": {"type": "boolean", "default": False},
                        },
                        {
                            "name": "canary",
                            "in": "query",
                            "description": "a canary deploy: true (the manifest's [canary] steps), or "
                            "steps such as `5%:30s,25%:1m,100%`; false: a plain switch even if the "
                            "manifest's strategy is canary. Answers 202 once the canary takes its first "
                            "share everywhere; the record's outcome comes with its promotion or abort",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "Hotdeploy-Signature",
                            "in": "header",
                            "description": "base64 of the archive's `.sig` file (ssh-keygen -Y sign "
                            "-n hotdeploy), for a raw upload",
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/zip": {"schema": {"type": "string", "format": "binary"}},
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "file": {"type": "string", "format": "binary"},
                                        "signature": {"type": "string", "format": "binary"},
                                    },
                                }
                            },
                        },
                    },
                    "responses": {
                        "201": _json("Deployment", "The new version is active"),
                        "202": _json(
                            "Deployment", "Accepted (wait=false), or a canary that runs: poll the Location"
                        ),
                        **_problems(400, 401, 403, 409, 413, 415, 422, 503),
                    },
                },
            },
            f"{prefix}/packages/{{name}}": {
                "parameters": [name],
                "get": {
                    "summary": "One package",
                    "responses": {"200": _json("Package", "The package"), **_problems(401, 404)},
                },
                "delete": {
                    "summary": "Drain and remove a package",
                    "responses": {
                        "200": _json("Deployment", "Removed"),
                        **_problems(401, 403, 404, 409),
                    },
                },
            },
            f"{prefix}/packages/{{name}}/rollback": {
                "parameters": [name],
                "post": {
                    "summary": "Go back to the previous version",
                    "responses": {
                        "200": _json("Deployment", "The previous version is active"),
                        **_problems(401, 403, 404, 409, 422),
                    },
                },
            },
            f"{prefix}/packages/{{name}}/activate": {
                "parameters": [name],
                "post": {
                    "summary": "Activate a version that is still available",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["version"],
                                    "properties": {"version": {"type": "string"}},
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json("Deployment", "The version is active"),
                        **_problems(400, 401, 403, 404, 409, 422),
                    },
                },
            },
            f"{prefix}/packages/{{name}}/canary/promote": {
                "parameters": [name],
                "post": {
                    "summary": "Move the running canary to its next step now (all the way with all=true)",
                    "parameters": [
                        {"name": "all", "in": "query", "schema": {"type": "boolean", "default": False}}
                    ],
                    "responses": {
                        "202": _json("Canary", "Asked for: the canary's run carries it out at once"),
                        **_problems(400, 401, 403, 404, 409),
                    },
                },
            },
            f"{prefix}/packages/{{name}}/canary/abort": {
                "parameters": [name],
                "post": {
                    "summary": "Stop the running canary: the active version serves everyone",
                    "responses": {
                        "202": _json("Canary", "Asked for: the canary drains and is unloaded"),
                        **_problems(400, 401, 403, 404, 409),
                    },
                },
            },
            f"{prefix}/deployments": {
                "get": {
                    "summary": "Deployment history, newest first",
                    "parameters": [
                        {"name": "package", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "default": 100, "minimum": 0, "maximum": 10_000},
                        },
                    ],
                    "responses": {"200": _json("DeploymentList", "The history"), **_problems(400, 401)},
                }
            },
            f"{prefix}/deployments/{{id}}": {
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "get": {
                    "summary": "One deployment",
                    "responses": {"200": _json("Deployment", "The deployment"), **_problems(401, 404)},
                },
            },
            f"{prefix}/cluster": {
                "get": {
                    "summary": "The hosts and workers sharing the store: versions served, heartbeat age, lag",
                    "responses": {"200": _json("Cluster", "The cluster"), **_problems(401, 503)},
                }
            },
            f"{prefix}/metrics": {
                "get": {
                    "summary": "Prometheus metrics of every worker of this host",
                    "responses": {
                        "200": {
                            "description": "The text exposition format, or OpenMetrics when asked for",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/openmetrics-text": {"schema": {"type": "string"}},
                            },
                        },
                        **_problems(401, 404),
                    },
                }
            },
            f"{prefix}/events": {
                "get": {
                    "summary": "Server-sent events of deployment progress, step by step, and live traffic",
                    "parameters": [
                        {
                            "name": "traffic",
                            "in": "query",
                            "required": False,
                            "description": "also send a traffic event at once and then each second",
                            "schema": {"type": "boolean", "default": False},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "event: deployment.started | step.started | step.finished | "
                            "deployment.decided | deployment.finished | traffic; data: JSON",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_problems(400, 401),
                    },
                }
            },
            f"{prefix}/whoami": {
                "get": {
                    "summary": "The role of the token sent: admin or read-only",
                    "responses": {"200": _json("WhoAmI", "The token's role"), **_problems(401)},
                }
            },
            f"{prefix}/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}
            },
        },
    }
