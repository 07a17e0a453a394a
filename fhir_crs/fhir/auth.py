"""Credentials for the FHIR client (stage: fhir/client ⇄ FHIR server).

`FhirClient` asks its `Auth` for headers before every request (so a refreshed token is picked up
on the next attempt) and calls `on_unauthorized()` once when the server answers 401: returning
True means "credentials refreshed, resend the request once" (SMART Backend Services re-mints its
token there); static credentials return False and the 401 becomes `FhirAuthError`.

SMART Backend Services (`SmartBackendAuth`, `smart_auth_from_config`) lives in `fhir.smart`, which
builds on this module and on `fhir.client`; this module imports neither (no import circle).

Secrets never appear in `repr()`/`str()`, exception messages or logs (each one is also
registered with `fhir_crs.logs.note_secret`, which scrubs it from any log line). Which origins
receive the `Authorization` header is decided by `FhirClient._hop`, not here.
"""

from __future__ import annotations

import base64
from collections.abc import MutableMapping
from typing import Protocol, runtime_checkable

from ..errors import ConfigError
from ..logs import note_secret

__all__ = ["Auth", "BasicAuth", "BearerAuth", "NoAuth"]


@runtime_checkable
class Auth(Protocol):
    """What `FhirClient` needs from a credential source."""

    def apply(self, headers: MutableMapping[str, str]) -> None:
        """Add (or remove) authorisation headers on an outgoing request, in place."""
        ...

    def on_unauthorized(self) -> bool:
        """Called on a 401; return True if credentials were refreshed and the request may be resent once."""
        ...


class NoAuth:
    """Sends no Authorization header at all.

    The public HAPI sandbox answers 403 (HAPI-1979/1981 unknown bearer token) to *any*
    Authorization header, so "no auth" must mean no header, not an empty one.
    """

    __slots__ = ()

    def apply(self, headers: MutableMapping[str, str]) -> None:
        headers.pop("Authorization", None)

    def on_unauthorized(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NoAuth()"


class BearerAuth:
    """A static bearer token (`Authorization: Bearer <token>`)."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        token = token.strip() if isinstance(token, str) else ""
        if not token:
            raise ConfigError("Bearer token is empty; set a token or use no authentication.")
        note_secret(token)
        self._token = token

    def apply(self, headers: MutableMapping[str, str]) -> None:
        headers["Authorization"] = f"Bearer {self._token}"

    def on_unauthorized(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "BearerAuth(token=<redacted>)"

    __str__ = __repr__


class BasicAuth:
    """HTTP Basic credentials (`Authorization: Basic base64(user:password)`)."""

    __slots__ = ("_password", "user")

    def __init__(self, user: str, password: str) -> None:
        if not user:
            raise ConfigError("Basic auth user name is empty.")
        self.user = user
        self._password = password
        note_secret(password, base64.b64encode(f"{user}:{password}".encode()).decode("ascii"))

    def apply(self, headers: MutableMapping[str, str]) -> None:
        raw = f"{self.user}:{self._password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")

    def on_unauthorized(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"BasicAuth(user={self.user!r}, password=<redacted>)"

    __str__ = __repr__
