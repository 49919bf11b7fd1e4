"""Split: how a mount with a canary picks the version of each request.

Only a mount with a canary has one (`Mount.split`); every other request pays one attribute read.

- **Pinning**: a `Hotdeploy-Version: 1.1` header (or a `hotdeploy_version_<package>` cookie)
  asks for a loaded version, the active or the canary one; any other is refused with 409. With a
  pin secret configured, a pin without the matching `Hotdeploy-Pin-Secret` header is refused
  with 403 (a user must not choose an untested version on their own).
- **Sticky share**: the user's key (see _canary_plan: a header, a cookie, the client address, or
  the middleware's own `hotdeploy_canary` cookie, set on the first response without one) is
  hashed with the package and canary version into one of 10,000 buckets; buckets below the
  weight go to the canary. Raising the weight only adds buckets: no user ever moves from the
  canary back to the stable version. A new canary version hashes anew (not always the same users).
- Without a key (`random`, or a websocket without the cookie), each request draws on its own.
- **Dependents follow.** The dependents of a package under a canary get a split of their own whose
  canary is an instance bound to the canary version (the engine keeps them with the leader's): it
  has the leader's salt, key and weight, so a user on the canary of `inventory` gets the `orders` bound
  to it too, and a pin names the leader's versions.
"""

from __future__ import annotations

import hmac
import random
import secrets
from collections.abc import Awaitable
from hashlib import blake2b
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any

from starlette.requests import cookie_parser
from starlette.responses import JSONResponse

from ._canary_plan import FULL
from ._scope import mounted_scope
from ._types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ._version import PackageVersion

COOKIE = "hotdeploy_canary"
COOKIE_MAX_AGE = 30 * 24 * 3600
PIN_HEADER = b"hotdeploy-version"
PIN_SECRET_HEADER = b"hotdeploy-pin-secret"
_PIN_COOKIE_PREFIX = "hotdeploy_version_"


def bucket(salt: bytes, key: str) -> int:
    """The user's bucket, 0..9999: the same on every worker and every host."""
    digest = blake2b(salt + key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % FULL


class Split:
    """The canary of a mount and the share of new users it gets."""

    __slots__ = (
        "_cookie_key",
        "_header_key",
        "canary",
        "key",
        "leader",
        "operation",
        "pin_secret",
        "pins",
        "salt",
        "weight",
    )

    def __init__(
        self,
        canary: PackageVersion,
        weight: int,
        key: str,
        operation: str,
        pin_secret: str | None = None,
        *,
        leader: tuple[Split, PackageVersion] | None = None,
    ) -> None:
        self.canary = canary
        self.operation = operation  # the cluster operation its figures are reported on
        self.weight = weight  # basis points; the engine changes it (a step), nothing else does
        self.key = key
        self.pin_secret = pin_secret
        self.salt = f"{canary.name}\0{canary.version}\0".encode()
        # A dependent's split follows its leader's (and the leader's split carries it): the
        # leader's salt, so the same users; pins name the leader (package, stable, canary).
        self.leader = leader[0] if leader is not None else None
        self.pins: tuple[str, str | None, str] = (canary.name, None, canary.version)
        if leader is not None:
            split, stable = leader
            self.salt = split.salt
            self.pins = (split.canary.name, stable.version, split.canary.version)
        kind, _, name = key.partition(":")
        self._header_key = name.lower().encode("latin-1") if kind == "header" else None
        self._cookie_key = (name or COOKIE) if kind == "cookie" else None

    def __repr__(self) -> str:
        return f"<Split {self.canary!r} {self.weight / 100:g}% key={self.key}>"

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, stable: PackageVersion, prefix: str, host: Any
    ) -> None:
        pin = pin_secret = key_header = cookie_header = None
        for name, value in scope["headers"]:
            if name == b"cookie":
                cookie_header = value
            elif name == PIN_HEADER:
                pin = value.decode("latin-1").strip()
            elif name == PIN_SECRET_HEADER:
                pin_secret = value
            elif name == self._header_key:
                key_header = value.decode("latin-1")
        cookies = cookie_parser(cookie_header.decode("latin-1")) if cookie_header is not None else {}
        canary = self.canary
        if pin is None:
            pin = cookies.get(_PIN_COOKIE_PREFIX + self.pins[0])
        if pin is not None:
            version = await self._pinned(scope, receive, send, pin, pin_secret, stable)
            if version is not None:
                await version.serve(mounted_scope(scope, prefix, version, host), receive, send)
            return
        key: str | None
        new_cookie = None
        if self._header_key is not None:
            key = key_header
        elif self._cookie_key is not None:
            key = cookies.get(self._cookie_key)
            if key is None and self._cookie_key == COOKIE and scope["type"] == "http":
                key = new_cookie = secrets.token_hex(8)
        elif self.key == "client":
            client = scope.get("client")
            key = client[0] if client else None
        else:
            key = None
        weight = self.weight
        if key is None:
            chosen = canary if random.random() * FULL < weight else stable
        else:
            chosen = canary if bucket(self.salt, key) < weight else stable
        if new_cookie is not None:
            send = _setting_cookie(send, new_cookie)
        await chosen.serve(mounted_scope(scope, prefix, chosen, host), receive, send)

    async def _pinned(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        pin: str,
        secret: bytes | None,
        stable: PackageVersion,
    ) -> PackageVersion | None:
        """The version a pin asks for, or None once a refusal was sent."""
        name, stable_label, canary_label = self.pins
        stable_label = stable_label or stable.version
        if self.pin_secret is not None and (
            secret is None or not hmac.compare_digest(secret, self.pin_secret.encode())
        ):
            await _refuse(
                scope, receive, send, 403, "pin refused",
                f"pinning {name} to a version needs the pin secret (the Hotdeploy-Pin-Secret header)",
            )  # fmt: skip
            return None
        for label, version in ((stable_label, stable), (canary_label, self.canary)):
            if label == pin:
                return version
        await _refuse(
            scope, receive, send, 409, "version not loaded",
            f"{name} {pin} is not loaded: a request can be pinned to {stable_label} (active) "
            f"or {canary_label} (canary)",
        )  # fmt: skip
        return None


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, title: str, detail: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    # An RFC 9457 problem, as the admin API's (_problems.py is a surface: not imported here).
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    await JSONResponse(body, status_code=status, media_type="application/problem+json")(scope, receive, send)


def _setting_cookie(send: Send, value: str) -> Send:
    morsel: SimpleCookie = SimpleCookie()
    morsel[COOKIE] = value
    morsel[COOKIE]["path"] = "/"
    morsel[COOKIE]["max-age"] = COOKIE_MAX_AGE
    morsel[COOKIE]["samesite"] = "lax"
    morsel[COOKIE]["httponly"] = True
    header = (b"set-cookie", morsel.output(header="").strip().encode("latin-1"))

    def with_cookie(message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        return send(message)

    return with_cookie
