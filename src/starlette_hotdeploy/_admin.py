"""The admin API: a Starlette app that deploys, rolls back, activates and removes packages.

Off unless a token is configured. Every request needs `Authorization: Bearer <token>`; an
optional read-only token may only GET. See docs/admin-api.md.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ._admin_events import event_stream
from ._canary_plan import parse_steps
from ._deployer import Deployer
from ._deployment import Deployment
from ._errors import CanaryError, HotDeployError, UploadRefused, UploadTooLarge
from ._openapi import openapi_document
from ._problems import problem, problem_for
from ._scope import route_path
from ._signing import MAX_SIGNATURE_BYTES, SIGNATURE_HEADER
from ._thread_hop import thread_hop
from ._types import ASGIApp, Receive, Scope, Send
from ._ui import UI_PATH, ui_routes

DEFAULT_PREFIX = "/_hotdeploy"
DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024
TOKEN_ENV = "HOTDEPLOY_ADMIN_TOKEN"
READ_TOKEN_ENV = "HOTDEPLOY_ADMIN_READ_TOKEN"
ARCHIVE_TYPES = frozenset(
    {"application/zip", "application/octet-stream", "application/x-zip-compressed", "application/x-wheel+zip"}
)
MAX_HISTORY_LIMIT = 10_000
MAX_VERSION_LENGTH = 128
MAX_JSON_BYTES = 64 * 1024
_READ_METHODS = frozenset({"GET", "HEAD"})
ROLE_KEY = "hotdeploy.admin_role"  # in the scope, set by AdminAuth: "admin" or "read"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # as the manifest allows, bounded
_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class BadQuery(Exception):
    """A query parameter or path parameter out of its bounds: 400, naming it."""


# The most archives one upload may deploy together (a set).
MAX_SET = 32


@dataclass(slots=True)
class Upload:
    archive: bytes
    signature: bytes | None
    # A set: the other archives of a multipart upload of several (and their signatures).
    more: list[tuple[bytes, bytes | None]] = field(default_factory=list)


def flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise BadQuery(f"{name} must be true or false, got {value[:40]!r}") from None


def canary_option(request: Request) -> bool | str | None:
    """`canary=true|false` or `canary=<steps>` ("5%:30s,25%:1m,100%"); absent: as the manifest says."""
    value = request.query_params.get("canary")
    if value is None:
        return None
    if value.lower() in _BOOLEANS:
        return _BOOLEANS[value.lower()]
    try:
        parse_steps(value[:400], where="canary")
    except CanaryError as exc:
        raise BadQuery(str(exc)) from None
    return value


def package_name(request: Request) -> str:
    name = str(request.path_params["name"])
    if not _NAME.fullmatch(name):
        raise BadQuery(
            f"{name[:80]!r} is not a package name (lowercase letters, digits and underscores, "
            "starting with a letter, at most 64 characters)"
        )
    return name


class AdminAuth:
    """Pure ASGI: bearer tokens compared in constant time; the read-only token may only GET.

    The web UI's files under `public_prefix` are served without a token (they hold no data;
    the page asks for the token and sends it with each API call). The token's role reaches the
    endpoints as `scope["hotdeploy.admin_role"]`."""

    def __init__(self, app: ASGIApp, token: str, read_token: str | None, public_prefix: str = "") -> None:
        self.app = app
        self.token = token.encode()
        self.read_token = read_token.encode() if read_token else None
        self.public_prefix = public_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (
            self.public_prefix
            and scope["method"] in _READ_METHODS
            and _below(route_path(scope), self.public_prefix)
        ):
            await self.app(scope, receive, send)
            return
        presented = b""
        sent = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                sent = True
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = credentials.strip()
                break
        full = hmac.compare_digest(presented, self.token)
        read = self.read_token is not None and hmac.compare_digest(presented, self.read_token)
        if not (full or read):
            detail = (
                "a valid bearer token is required (Authorization: Bearer <token>)"
                if sent
                else "missing Authorization: Bearer <token>"
            )
            await problem(401, "unauthorized", detail)(scope, receive, send)
            return
        if not full and scope["method"] not in _READ_METHODS:
            await problem(403, "forbidden", "the read-only token may only GET")(scope, receive, send)
            return
        scope[ROLE_KEY] = "admin" if full else "read"
        await self.app(scope, receive, send)


def _below(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class AdminAPI:
    """The endpoints, bound to one deployer."""

    def __init__(self, deployer: Deployer, prefix: str, max_upload_bytes: int) -> None:
        self.deployer = deployer
        self.prefix = prefix
        self.max_upload_bytes = max_upload_bytes

    def routes(self) -> list[Route]:
        # One Route per path, so a 405 lists every allowed method in `Allow`.
        p = self.prefix
        return [
            Route(f"{p}/openapi.json", self.openapi, methods=["GET"]),
            Route(
                f"{p}/packages",
                self._by_method(GET=self.list_packages, POST=self.deploy),
                methods=["GET", "POST"],
            ),
            Route(
                f"{p}/packages/{{name}}",
                self._by_method(GET=self.get_package, DELETE=self.undeploy),
                methods=["GET", "DELETE"],
            ),
            Route(f"{p}/packages/{{name}}/rollback", self.rollback, methods=["POST"]),
            Route(f"{p}/packages/{{name}}/activate", self.activate, methods=["POST"]),
            Route(f"{p}/packages/{{name}}/canary/promote", self.promote_canary, methods=["POST"]),
            Route(f"{p}/packages/{{name}}/canary/abort", self.abort_canary, methods=["POST"]),
            Route(f"{p}/deployments", self.list_deployments, methods=["GET"]),
            Route(f"{p}/deployments/{{id}}", self.get_deployment, methods=["GET"]),
            Route(f"{p}/events", self.events, methods=["GET"]),
            Route(f"{p}/cluster", self.cluster, methods=["GET"]),
            Route(f"{p}/metrics", self.metrics, methods=["GET"]),
            Route(f"{p}/whoami", self.whoami, methods=["GET"]),
            *ui_routes(p),
        ]

    @staticmethod
    def _by_method(
        **handlers: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        handlers.setdefault("HEAD", handlers["GET"]) if "GET" in handlers else None

        async def endpoint(request: Request) -> Response:
            return await handlers[request.method](request)

        return endpoint

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self.prefix, self.max_upload_bytes))

    async def list_packages(self, request: Request) -> Response:
        packages = await thread_hop(self.deployer.status)
        return JSONResponse({"packages": [p.to_dict() for p in packages]})

    async def cluster(self, request: Request) -> Response:
        try:
            view = await thread_hop(self.deployer.cluster)
        except HotDeployError as exc:
            return problem_for(exc)
        return JSONResponse(view)

    async def metrics(self, request: Request) -> Response:
        collector = self.deployer.metrics
        if collector is None:
            return problem(404, "not found", "metrics are off: the deployer was made with metrics=False")
        from prometheus_client.exposition import choose_encoder

        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        # In a worker thread: it reads the other workers' files.
        body = await thread_hop(encode, collector)
        return Response(body, media_type=content_type)

    async def get_package(self, request: Request) -> Response:
        try:
            name = package_name(request)
            # In a worker thread: it reads the other workers' heartbeats from the store.
            found = await thread_hop(self.deployer.status, name)
        except BadQuery as exc:
            return problem(400, "invalid package name", str(exc))
        except HotDeployError as exc:
            return problem_for(exc)
        if not found:
            return problem(404, "unknown package", f"package {name!r} is not active")
        return JSONResponse(found[0].to_dict())

    async def deploy(self, request: Request) -> Response:
        try:
            wait = flag(request, "wait", True)
            force = flag(request, "force", False)
            shadow = flag(request, "shadow_host_routes", False)
            canary = canary_option(request)
            upload = await self._upload_from(request)
        except BadQuery as exc:
            return problem(400, "invalid query", str(exc))
        except UploadTooLarge:
            return problem(
                413, "archive too large", f"the upload is over the {self.max_upload_bytes}-byte limit"
            )
        except UploadRefused as exc:
            return problem(exc.status, exc.title, str(exc))
        if upload.more:
            return await self._deploy_set(upload, wait=wait, force=force, shadow=shadow, canary=canary)
        if not wait:
            try:
                record = await self.deployer.submit(
                    upload.archive,
                    signature=upload.signature,
                    force=force,
                    shadow_host_routes=shadow,
                    canary=canary,
                )
            except HotDeployError as exc:
                return problem_for(exc)
            return JSONResponse(
                record.to_dict(), status_code=202, headers={"Location": self._location(record.id)}
            )
        try:
            record = await self.deployer.deploy(
                upload.archive,
                signature=upload.signature,
                force=force,
                shadow_host_routes=shadow,
                canary=canary,
            )
        except HotDeployError as exc:
            return problem_for(exc)
        # A canary that runs: accepted, its outcome comes with its promotion or abort.
        return self._answer(record)

    async def _deploy_set(
        self, upload: Upload, *, wait: bool, force: bool, shadow: bool, canary: bool | str | None
    ) -> Response:
        """Several archives in one upload: one operation for all of them (Deployer.deploy_set)."""
        if canary:
            return problem(400, "invalid query", "a set of packages is deployed without a canary")
        archives = [(upload.archive, upload.signature), *upload.more]
        sources = [archive for archive, _ in archives]
        signatures = [signature for _, signature in archives]
        deploy = self.deployer.submit_set if not wait else self.deployer.deploy_set
        try:
            record = await deploy(sources, signatures=signatures, force=force, shadow_host_routes=shadow)
        except HotDeployError as exc:
            return problem_for(exc)
        return self._answer(record)

    def _answer(self, record: Deployment) -> JSONResponse:
        """201 with the record once decided; 202 while under way (in the background, a canary)."""
        return JSONResponse(
            record.to_dict(),
            status_code=201 if record.decided else 202,
            headers={"Location": self._location(record.id)},
        )

    async def promote_canary(self, request: Request) -> Response:
        try:
            name = package_name(request)
            state = await self.deployer.promote_canary(name, all_steps=flag(request, "all", False))
        except BadQuery as exc:
            return problem(400, "invalid request", str(exc))
        except HotDeployError as exc:
            return problem_for(exc)
        return JSONResponse(state, status_code=202)

    async def abort_canary(self, request: Request) -> Response:
        try:
            state = await self.deployer.abort_canary(package_name(request))
        except BadQuery as exc:
            return problem(400, "invalid package name", str(exc))
        except HotDeployError as exc:
            return problem_for(exc)
        return JSONResponse(state, status_code=202)

    async def rollback(self, request: Request) -> Response:
        try:
            record = await self.deployer.rollback(package_name(request))
        except BadQuery as exc:
            return problem(400, "invalid package name", str(exc))
        except HotDeployError as exc:
            return problem_for(exc)
        return JSONResponse(record.to_dict())

    async def activate(self, request: Request) -> Response:
        try:
            body = json.loads(await _bounded_body(request, MAX_JSON_BYTES))
        except UploadRefused as exc:
            return problem(exc.status, exc.title, str(exc))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return problem(400, "invalid body", 'send JSON such as {"version": "1.0"}')
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, str) or not version:
            return problem(400, "invalid body", 'send JSON such as {"version": "1.0"}: "version" is missing')
        if len(version) > MAX_VERSION_LENGTH or not _is_version(version):
            return problem(
                400,
                "invalid body",
                f"version {version[:40]!r}{'…' if len(version) > 40 else ''} is not a PEP 440 version "
                f"of at most {MAX_VERSION_LENGTH} characters",
            )
        try:
            record = await self.deployer.activate(package_name(request), version)
        except BadQuery as exc:
            return problem(400, "invalid package name", str(exc))
        except HotDeployError as exc:
            return problem_for(exc)
        return JSONResponse(record.to_dict())

    async def undeploy(self, request: Request) -> Response:
        try:
            record = await self.deployer.undeploy(package_name(request))
        except BadQuery as exc:
            return problem(400, "invalid package name", str(exc))
        except HotDeployError as exc:
            return problem_for(exc)
        return JSONResponse(record.to_dict())

    async def list_deployments(self, request: Request) -> Response:
        raw_limit = request.query_params.get("limit", "100")
        try:
            limit = int(raw_limit) if len(raw_limit) <= 12 else -1
        except ValueError:
            return problem(400, "invalid query", "limit must be a whole number")
        package = request.query_params.get("package") or None
        if package is not None and not _NAME.fullmatch(package):
            return problem(400, "invalid query", f"package {package[:80]!r} is not a package name")
        if not 0 <= limit <= MAX_HISTORY_LIMIT:
            return problem(400, "invalid query", f"limit must be between 0 and {MAX_HISTORY_LIMIT}")
        records = await thread_hop(self.deployer.deployments, limit, package)
        return JSONResponse({"deployments": [r.to_dict() for r in records]})

    async def get_deployment(self, request: Request) -> Response:
        deployment_id = request.path_params["id"]
        if not _ID.fullmatch(deployment_id):
            return problem(404, "unknown deployment", f"no deployment with id {deployment_id[:80]!r}")
        record = await thread_hop(self.deployer.find_deployment, deployment_id)
        if record is None:
            return problem(404, "unknown deployment", f"no deployment with id {deployment_id!r}")
        return JSONResponse(record.to_dict())

    async def events(self, request: Request) -> Response:
        try:
            with_traffic = flag(request, "traffic", False)
        except BadQuery as exc:
            return problem(400, "invalid query", str(exc))
        deployer = self.deployer

        async def traffic() -> dict[str, Any]:
            # In a worker thread: it reads the other workers' metrics files.
            figures = await thread_hop(deployer.traffic)
            return {"type": "traffic", "at": time.time(), **figures}

        return StreamingResponse(
            event_stream(deployer.events, traffic if with_traffic else None),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def whoami(self, request: Request) -> Response:
        role = request.scope.get(ROLE_KEY, "read")  # fails closed
        return JSONResponse({"role": role, "can_change": role == "admin", "worker": self.deployer.worker_id})

    def _location(self, deployment_id: str) -> str:
        return f"{self.prefix}/deployments/{deployment_id}"

    async def _upload_from(self, request: Request) -> Upload:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_upload_bytes:
            raise UploadTooLarge("the upload is over the size limit")
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            return await self._upload_from_form(request)
        if content_type and content_type not in ARCHIVE_TYPES:
            raise UploadRefused(
                415,
                "unsupported media type",
                f"send the archive as application/zip or application/octet-stream (got {content_type}), "
                "or as multipart/form-data with one file",
            )
        signature = _signature_header(request.headers.get(SIGNATURE_HEADER))
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > self.max_upload_bytes:
                raise UploadTooLarge("the upload is over the size limit")
        if not body:
            raise UploadRefused(
                400, "invalid archive", "the request body is empty: send the archive (zip or wheel)"
            )
        return Upload(bytes(body), signature)

    async def _upload_from_form(self, request: Request) -> Upload:
        """One archive file, and optionally its signature as a part named `signature`; or several
        archives (a set), with no signature or one `signature` part per archive, in order."""
        try:
            form = await request.form(max_files=2 * MAX_SET, max_fields=MAX_SET + 10)
        except Exception as exc:  # the multipart parser's errors
            detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
            raise UploadRefused(400, "invalid upload", f"cannot parse the multipart body: {detail}") from exc
        try:
            signatures: list[bytes] = []
            files = []
            for name, value in form.multi_items():
                if name == "signature":
                    raw = (
                        await value.read(MAX_SIGNATURE_BYTES + 1) if isinstance(value, UploadFile) else value
                    )
                    signature = raw.encode() if isinstance(raw, str) else raw
                    if len(signature) > MAX_SIGNATURE_BYTES:
                        raise UploadRefused(400, "invalid signature", "the signature part is too large")
                    signatures.append(signature)
                elif isinstance(value, UploadFile):
                    files.append(value)
            if not 1 <= len(files) <= MAX_SET or (signatures and len(signatures) != len(files)):
                raise UploadRefused(
                    400,
                    "invalid upload",
                    f"a multipart upload must hold one archive file, or up to {MAX_SET} (a set deployed "
                    f"together), and optionally one part named 'signature' per archive; got {len(files)} "
                    f"file(s) and {len(signatures)} signature(s)",
                )
            archives: list[bytes] = []
            total = 0
            for file in files:
                if file.size is not None and total + file.size > self.max_upload_bytes:
                    raise UploadTooLarge("the upload is over the size limit")
                data = await file.read()
                total += len(data)
                if total > self.max_upload_bytes:
                    raise UploadTooLarge("the upload is over the size limit")
                if not data:
                    raise UploadRefused(
                        400, "invalid archive", f"the uploaded file {file.filename!r} is empty"
                    )
                archives.append(data)
        finally:
            await form.close()
        paired: list[tuple[bytes, bytes | None]] = [
            (data, signatures[i] if signatures else None) for i, data in enumerate(archives)
        ]
        return Upload(paired[0][0], paired[0][1], paired[1:])


async def _bounded_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise UploadRefused(413, "body too large", f"a JSON body of at most {limit} bytes is expected")
    return bytes(body)


def _signature_header(value: str | None) -> bytes | None:
    if value is None:
        return None
    if len(value) > MAX_SIGNATURE_BYTES * 2:
        raise UploadRefused(400, "invalid signature", f"the {SIGNATURE_HEADER} header is too large")
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UploadRefused(
            400, "invalid signature", f"the {SIGNATURE_HEADER} header must be the base64 of the .sig file"
        ) from None


def _is_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


async def _http_problem(request: Request, exc: Exception) -> Response:
    """404 and 405 from the router, as problem details like every other admin error."""
    assert isinstance(exc, HTTPException)
    title = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "error")
    detail = f"{request.method} {request.url.path}: {exc.detail}"
    response = problem(exc.status_code, title, detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def create_admin_app(
    deployer: Deployer,
    *,
    token: str | None = None,
    read_token: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
) -> ASGIApp | None:
    """The admin API for `deployer`, or None when no token is configured (the API is off).

    Tokens default to $HOTDEPLOY_ADMIN_TOKEN and $HOTDEPLOY_ADMIN_READ_TOKEN. Serve the result
    on its own listener (another port, a unix socket) in the same process as the deployer's
    middleware, or let HotDeployMiddleware serve it under `prefix`."""
    token = token or os.environ.get(TOKEN_ENV) or None
    read_token = read_token or os.environ.get(READ_TOKEN_ENV) or None
    if token is None:
        return None
    api = AdminAPI(deployer, prefix.rstrip("/"), max_upload_bytes)
    app = Starlette(routes=api.routes(), exception_handlers={HTTPException: _http_problem})
    return AdminAuth(app, token, read_token, public_prefix=f"{api.prefix}{UI_PATH}")


__all__ = ["DEFAULT_PREFIX", "AdminAPI", "create_admin_app"]
