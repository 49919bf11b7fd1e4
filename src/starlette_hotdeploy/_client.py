"""`AdminClient`: the admin API (docs/admin-api.md) over HTTP, from Python.

Synchronous, on httpx (the `[cli]` extra). Every answer but a success raises an
`AdminClientError`: `AdminProblem` when the server refused or failed the operation,
`AdminUnreachable` when it could not be reached or understood, `DeploymentTimeout` when
`wait` gave up. Records and packages are the admin API's JSON objects, as dicts.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from ._admin import DEFAULT_PREFIX
from ._errors import AdminProblem, AdminUnreachable, DeploymentTimeout
from ._signing import SIGNATURE_HEADER

DEFAULT_TIMEOUT = 300.0
CONNECT_TIMEOUT = 10.0
POLL_INTERVAL = 0.1
_ARCHIVE_HEADERS = {"Content-Type": "application/zip"}


class AdminClient:
    """The admin API of a starlette-hotdeploy server, one method per endpoint.

    ```python
    with AdminClient("http://127.0.0.1:8000", token) as client:
        record = client.upload(pack_directory("orders-2.0").data)
        client.rollback("orders")
    ```

    `timeout` bounds each request (connecting gives up after 10 s, or `timeout` if shorter) and
    `wait`; `transport` is an httpx transport, for tests."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.token = token or None
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            self._http = httpx.Client(
                base_url=self.url,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
                transport=transport,
            )
        except (httpx.InvalidURL, ValueError) as exc:
            raise AdminUnreachable(f"invalid server URL {url!r}: {exc}", reason="invalid_url") from None

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    # -- reading ----------------------------------------------------------------------------

    def packages(self) -> list[dict[str, Any]]:
        """The deployed packages: mount, active version, loaded and available versions."""
        packages = self._call("GET", "/packages").get("packages")
        if not isinstance(packages, list):
            raise self._unexpected("GET", "/packages", "no 'packages' list")
        return packages

    def package(self, name: str) -> dict[str, Any]:
        """One deployed package (`AdminProblem` 404 if it is not deployed)."""
        return self._call("GET", f"/packages/{quote(name, safe='')}")

    def cluster(self) -> dict[str, Any]:
        """Every live worker of every host: what it serves, heartbeat age, lag."""
        return self._call("GET", "/cluster")

    def deployments(self, package: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The deployment records, newest first (only `package`'s, if given)."""
        params: dict[str, str | int] = {"limit": limit}
        if package:
            params["package"] = package
        deployments = self._call("GET", "/deployments", params=params).get("deployments")
        if not isinstance(deployments, list):
            raise self._unexpected("GET", "/deployments", "no 'deployments' list")
        return deployments

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        """One deployment record, by id."""
        return self._call("GET", f"/deployments/{quote(deployment_id, safe='')}")

    # -- operations: each answers the deployment record once it succeeded ------------------

    def upload(
        self,
        archive: bytes,
        *,
        signature: bytes | None = None,
        force: bool = False,
        shadow_host_routes: bool = False,
    ) -> dict[str, Any]:
        """Deploy an archive (zip or wheel bytes, see `pack_directory`) and wait until the server
        answers with the outcome: the record of a deployment that succeeded; `AdminProblem`, with
        the record as `.deployment`, for one that failed.

        `signature` is the archive's `.sig` file as it is (an SSH signature, as `hotdeploy pack
        --sign` or `ssh-keygen -Y sign -n hotdeploy` writes it), for a server with trusted keys; `force` replaces a version number that already has a different archive;
        `shadow_host_routes` lets the mount cover routes of the host app on purpose."""
        return self._post_archive(archive, True, signature, force, shadow_host_routes)

    def submit(
        self,
        archive: bytes,
        *,
        signature: bytes | None = None,
        force: bool = False,
        shadow_host_routes: bool = False,
        canary: bool | str | None = None,
    ) -> dict[str, Any]:
        """Start deploying an archive and return its record at once, its outcome "pending":
        follow it with `wait`. The options are `upload`'s; `canary`: True or steps such as
        "5%:30s,100%" for a canary deploy, False for a plain one (None: as the manifest says)."""
        return self._post_archive(archive, False, signature, force, shadow_host_routes, canary)

    def submit_set(
        self,
        archives: Sequence[tuple[str, bytes, bytes | None]],
        *,
        force: bool = False,
        shadow_host_routes: bool = False,
    ) -> dict[str, Any]:
        """Start deploying several archives as one set (all switched at once, or none) and
        return its record at once: follow it with `wait`. `archives`: (file name, bytes,
        signature or None) each; sign all of them or none."""
        params = {"wait": "false"}
        if force:
            params["force"] = "true"
        if shadow_host_routes:
            params["shadow_host_routes"] = "true"
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        for name, data, signature in archives:
            files.append(("archive", (name, data, "application/zip")))
            if signature is not None:
                files.append(("signature", (f"{name}.sig", signature, "application/octet-stream")))
        return self._call("POST", "/packages", params=params, files=files)

    def _post_archive(
        self,
        archive: bytes,
        wait: bool,
        signature: bytes | None,
        force: bool,
        shadow_host_routes: bool,
        canary: bool | str | None = None,
    ) -> dict[str, Any]:
        params = {"wait": "true" if wait else "false"}
        # Only the flags that are set: a server that does not know one refuses nothing.
        if force:
            params["force"] = "true"
        if shadow_host_routes:
            params["shadow_host_routes"] = "true"
        if canary is not None:
            params["canary"] = canary if isinstance(canary, str) else ("true" if canary else "false")
        headers = dict(_ARCHIVE_HEADERS)
        if signature is not None:
            # The .sig file whole, in base64: a header cannot carry its newlines.
            headers[SIGNATURE_HEADER] = base64.b64encode(signature).decode("ascii")
        return self._call("POST", "/packages", params=params, content=archive, headers=headers)

    def wait(
        self,
        record: dict[str, Any],
        *,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        interval: float = POLL_INTERVAL,
    ) -> dict[str, Any]:
        """Poll a submitted deployment until its outcome is known and return its last record,
        whatever the outcome. `on_update` sees every record, the given one first, to show the
        steps as they finish. `DeploymentTimeout` after `timeout` seconds (the client's)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if on_update is not None:
            on_update(record)
        while record.get("outcome") == "pending":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeploymentTimeout(record, timeout)
            time.sleep(min(interval, remaining))
            record = self.deployment(str(record.get("id")))
            if on_update is not None:
                on_update(record)
        return record

    def rollback(self, name: str) -> dict[str, Any]:
        """Switch package `name` back to the version that was active before."""
        return self._call("POST", f"/packages/{quote(name, safe='')}/rollback")

    def activate(self, name: str, version: str) -> dict[str, Any]:
        """Make a still-available `version` of package `name` active."""
        return self._call("POST", f"/packages/{quote(name, safe='')}/activate", json={"version": version})

    def promote_canary(self, name: str, *, all_steps: bool = False) -> dict[str, Any]:
        """Move package `name`'s canary to its next step now (all the way with `all_steps`)."""
        params = {"all": "true"} if all_steps else None
        return self._call("POST", f"/packages/{quote(name, safe='')}/canary/promote", params=params)

    def abort_canary(self, name: str) -> dict[str, Any]:
        """Stop package `name`'s canary: the active version serves everyone again."""
        return self._call("POST", f"/packages/{quote(name, safe='')}/canary/abort")

    def undeploy(self, name: str) -> dict[str, Any]:
        """Unmount package `name`, drain and shut down its versions."""
        return self._call("DELETE", f"/packages/{quote(name, safe='')}")

    # -- the transport ------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """Call `path` under the admin prefix: the JSON object it answered with, or an error."""
        path = self.prefix + path
        where = f"{method} {self.url}{path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise AdminUnreachable(
                f"{where}: no answer within {self.timeout:g} s", reason="timeout"
            ) from None
        except httpx.ConnectError as exc:
            raise AdminUnreachable(
                f"cannot connect to {self.url} ({exc or type(exc).__name__}): is the server running?",
                " (check the URL given to AdminClient)",
                reason="connect",
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise AdminUnreachable(f"{where}: {exc or type(exc).__name__}", reason="transport") from None
        status = response.status_code
        if status == 401 and self.token:
            raise AdminUnreachable(
                f"{self.url}: 401 unauthorized: the server refused the token",
                ": check the token given to AdminClient",
                reason="token_refused",
                status=status,
            )
        if status == 401:
            raise AdminUnreachable(
                f"{self.url}: 401 unauthorized: no token given",
                ": pass the admin token, AdminClient(url, token)",
                reason="no_token",
                status=status,
            )
        body = _json_object(response)
        # A 403 is the read-only token's, unless the problem is another one (a refused signature).
        if status == 403 and (body is None or body.get("title") == "forbidden"):
            raise AdminUnreachable(
                f"{where}: 403 forbidden: this token may only read; writes need the admin token",
                reason="forbidden",
                status=status,
            )
        if body is None:
            content_type = response.headers.get("content-type") or "no content type"
            raise self._unexpected(
                method, path, f"answered {status} with {content_type}, not a JSON object", status=status
            )
        if response.is_error:
            raise AdminProblem(status, body)
        return body

    def _unexpected(
        self, method: str, path: str, what: str, *, status: int | None = None
    ) -> AdminUnreachable:
        return AdminUnreachable(
            f"{method} {self.url}{path} {what}: is the admin API served at {self.url}{self.prefix}?",
            " (it is off unless the server has an admin token; see also AdminClient's prefix)",
            reason="not_json",
            status=status,
        )


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's JSON object; None if it is not JSON, not UTF-8, or not an object."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
