"""SMART Backend Services credentials (stage: fhir/client ⇄ FHIR server, nightly `sync`).

The client authenticates with a signed JWT assertion (``private_key_jwt``, RS384 or ES384) and
gets a short-lived bearer token by the OAuth ``client_credentials`` grant
(docs/fhir-ecosystem.md §2.2; HL7 bulk-data ``authorization.md``):

* `discover_token_url` reads ``[base]/.well-known/smart-configuration`` → ``token_endpoint``.
* `SmartBackendAuth` implements the `Auth` protocol of `fhir_crs.fhir.auth`: it mints a token on
  first use, reuses it until shortly before ``expires_in`` runs out, and on a 401 re-mints once
  so the client can resend the request (a token can expire in the middle of paging).
* `smart_auth_from_config` builds it from a resolved `RunConfig`.

HTTP goes through `FhirClient.post_form` / `get_json_url`; no token, assertion or key material
ever appears in ``repr()``, exception messages or logs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ..errors import ConfigError, FhirAuthError, FhirNotFound, FhirServerError
from ..logs import note_secret
from .client import FhirClient, ServerUnavailable, origin, require_secure_url

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = [
    "ASSERTION_TYPE",
    "SUPPORTED_ALGS",
    "PostForm",
    "SmartBackendAuth",
    "discover_token_url",
    "smart_auth_from_config",
]

log = logging.getLogger("fhir_crs.fhir")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SUPPORTED_ALGS = ("RS384", "ES384")
# SMART: the assertion's exp SHALL be no more than five minutes in the future.
ASSERTION_LIFETIME = 300
DEFAULT_EXPIRES_IN = 300
PRIVATE_KEY_ENV = "FHIR_CRS_PRIVATE_KEY"

PostForm = Callable[[str, dict[str, str]], tuple[int, dict[str, Any] | None]]

_JWT_LIKE = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*")
_RETRYABLE_TOKEN_STATUS = frozenset({429, 502, 503, 504})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _thumbprint(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint, the conventional `kid` when none is registered."""
    if isinstance(public_key, rsa.RSAPublicKey):
        jwk = json.loads(RSAAlgorithm.to_jwk(public_key))
        members = {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}
    else:
        jwk = json.loads(ECAlgorithm.to_jwk(public_key))
        members = {"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def _load_private_key(
    private_key_pem: str | bytes, alg: str
) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    data = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # The library's message is generic, but never echo the input: it is key material.
        raise ConfigError(
            "SMART private key is not a readable unencrypted PEM private key "
            "(expected '-----BEGIN PRIVATE KEY-----', RSA or EC P-384)."
        ) from exc
    if alg == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError("jwt_alg RS384 needs an RSA private key; the key given is not RSA.")
        if key.key_size < 2048:
            raise ConfigError(f"RS384 needs an RSA key of at least 2048 bits (got {key.key_size}).")
    elif not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"):
        raise ConfigError("jwt_alg ES384 needs an EC private key on curve P-384 (secp384r1).")
    return key


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return _JWT_LIKE.sub("<jwt>", text)


class SmartBackendAuth:
    """SMART Backend Services (``client_credentials`` + ``private_key_jwt``) as an `Auth`.

    Args:
        client_id: the registered client id (``iss`` and ``sub`` of every assertion).
        private_key_pem: PEM private key (PKCS#8 or traditional), RSA ≥ 2048 bits for RS384,
            EC P-384 for ES384. Parsed once; the text is not kept.
        token_url: the token endpoint (``aud`` of every assertion).
        kid: key id registered with the server (JWKS ``kid``); default: the key's RFC 7638
            thumbprint.
        alg: ``RS384`` or ``ES384``.
        scope: space-separated scopes, e.g. ``system/Observation.rs system/Condition.cu``.
        post_form: sends the form-encoded token request and returns (status, JSON body);
            normally `FhirClient.post_form` of a client whose auth is *not* this object.
        clock: seconds since the epoch (injectable for tests).
        refresh_margin: re-mint when less than this many seconds of the token are left.
        allow_insecure_http: accept a non-loopback ``http://`` token URL (refused by default).

    Thread-safe: one token is shared by all threads; minting is serialised.

    Attributes:
        mints: number of successful token requests so far.
    """

    def __init__(
        self,
        client_id: str,
        private_key_pem: str | bytes,
        token_url: str,
        *,
        kid: str | None = None,
        alg: str = "RS384",
        scope: str,
        post_form: PostForm,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = 30.0,
        allow_insecure_http: bool = False,
    ) -> None:
        if not client_id or not client_id.strip():
            raise ConfigError("SMART client_id is empty.")
        if alg not in SUPPORTED_ALGS:
            raise ConfigError(
                f"jwt_alg '{alg}' is not supported; use {' or '.join(SUPPORTED_ALGS)}."
            )
        parts = urlsplit(token_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("SMART token URL must be an absolute http(s) URL.")
        # The signed assertion (and the token coming back) must not cross a network in clear.
        require_secure_url(token_url, "SMART token endpoint", allow_insecure_http=allow_insecure_http)
        if not scope or not scope.strip():
            raise ConfigError("SMART scope is empty; name the system/... scopes to request.")
        self.client_id = client_id.strip()
        self.token_url = token_url
        self.alg = alg
        self.scope = " ".join(scope.split())
        self._key = _load_private_key(private_key_pem, alg)
        self.kid = kid or _thumbprint(self._key.public_key())
        self._post_form = post_form
        self._clock = clock
        self.refresh_margin = refresh_margin
        self._lock = threading.Lock()
        self._sent = threading.local()
        self._token: str | None = None
        self._expires_at = 0.0
        self._margin = refresh_margin
        self.granted_scope: str | None = None
        self.mints = 0

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(client_id={self.client_id!r}, token_url={self.token_url!r}, "
            f"alg={self.alg!r}, kid={self.kid!r}, key=<redacted>, token=<redacted>)"
        )

    __str__ = __repr__

    # ----------------------------------------------------------------- Auth protocol

    def apply(self, headers: MutableMapping[str, str]) -> None:
        """Set ``Authorization: Bearer <token>``, minting or re-minting the token when needed."""
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at - self._margin:
                self._mint()
            token = self._token
        assert token is not None
        self._sent.token = token
        headers["Authorization"] = f"Bearer {token}"

    def on_unauthorized(self) -> bool:
        """A 401: re-mint once and ask the client to resend. If another thread already replaced
        the token this thread sent, just resend with the new one."""
        with self._lock:
            if self._token is not None and getattr(self._sent, "token", None) != self._token:
                return True
            self._mint()
        return True

    # ----------------------------------------------------------------- token minting

    def assertion(self) -> str:
        """A freshly signed client assertion (unique ``jti``; ``exp`` = now + 300 s)."""
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims, self._key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"}
        )

    def _mint(self) -> None:
        client_assertion = self.assertion()
        note_secret(client_assertion)
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion,
            "scope": self.scope,
        }
        status, body = self._post_form(self.token_url, form)
        where = f"SMART token request to {self.token_url}"
        if status != 200 or not isinstance(body, dict) or not body.get("access_token"):
            error = body.get("error") if isinstance(body, dict) else None
            desc = body.get("error_description") if isinstance(body, dict) else None
            detail = ": ".join(str(x) for x in (error, desc) if isinstance(x, str) and x.strip())
            if status == 200:
                detail = detail or "the response has no access_token"
            message = f"{where} failed: HTTP {status}" + (f": {detail}" if detail else "")
            message = _scrub(message, client_assertion)
            diag = _scrub(detail, client_assertion) or None
            if not error and (status in _RETRYABLE_TOKEN_STATUS or status >= 500):
                raise ServerUnavailable(message + ".", status, diag)
            if error == "invalid_client":
                message += " (check client_id, kid/registered key, jwt_alg and the server clock)"
            raise FhirAuthError(message + ".", status, diag)
        token_type = body.get("token_type")
        if isinstance(token_type, str) and token_type.lower() != "bearer":
            raise FhirAuthError(
                f"{where}: unsupported token_type {token_type!r} (need bearer).", status
            )
        expires_in = body.get("expires_in")
        lifetime = (
            float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None
        )
        lifetime = lifetime or DEFAULT_EXPIRES_IN
        now = self._clock()
        self._token = str(body["access_token"])
        note_secret(self._token)
        self._expires_at = now + lifetime
        # Very short-lived tokens: refresh at half-life rather than on every request.
        self._margin = min(self.refresh_margin, lifetime / 2)
        granted = body.get("scope")
        self.granted_scope = granted if isinstance(granted, str) else None
        self.mints += 1
        log.info("SMART token minted (expires in %.0fs, scope %s)", lifetime, self.granted_scope)


# --------------------------------------------------------------------------- discovery


def discover_token_url(
    client: FhirClient, base: str | None = None, *, alg: str | None = None
) -> str:
    """``token_endpoint`` from ``[base]/.well-known/smart-configuration`` (fetched without
    credentials, on the FHIR server's own origin only — also across redirects; the endpoint it
    names must be https unless loopback, checked by `SmartBackendAuth`).

    When the document lists ``token_endpoint_auth_methods_supported`` it must include
    ``private_key_jwt``; when it lists ``token_endpoint_auth_signing_alg_values_supported`` and
    `alg` is given, it must include `alg`.

    Raises:
        ConfigError: no discovery document, no ``token_endpoint``, or an unsupported method/alg.
    """
    root = (base or client.base_url).rstrip("/")
    url = f"{root}/.well-known/smart-configuration"
    if origin(url) != client.origin:
        raise ConfigError(
            f"SMART discovery at {origin(url)} is not on the FHIR server's origin ({client.origin}); "
            "the token endpoint is only discovered from the server itself — set token_url."
        )
    try:
        doc = client.get_json_url(url, with_auth=False)
    except FhirNotFound as exc:
        raise ConfigError(
            f"No SMART configuration at {url} (HTTP {exc.status}); set token_url "
            f"(FHIR_CRS_TOKEN_URL) to the server's token endpoint."
        ) from exc
    except FhirServerError as exc:
        raise ConfigError(
            f"SMART discovery at {url} failed: {exc}; set token_url (FHIR_CRS_TOKEN_URL)."
        ) from exc
    endpoint = doc.get("token_endpoint")
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigError(f"SMART configuration at {url} has no token_endpoint; set token_url.")
    methods = doc.get("token_endpoint_auth_methods_supported")
    if isinstance(methods, list) and methods and "private_key_jwt" not in methods:
        raise ConfigError(
            f"The server's token endpoint does not support private_key_jwt "
            f"(it lists {', '.join(map(str, methods))}); SMART Backend Services cannot be used."
        )
    algs = doc.get("token_endpoint_auth_signing_alg_values_supported")
    if alg and isinstance(algs, list) and algs and alg not in algs:
        raise ConfigError(
            f"The server does not accept {alg} client assertions (it lists "
            f"{', '.join(map(str, algs))}); set jwt_alg to one of those."
        )
    return urljoin(url, endpoint.strip())


# --------------------------------------------------------------------------- from RunConfig


def _private_key_text(cfg: RunConfig, env: Mapping[str, str]) -> str:
    from ..config import _read_secret

    inline = env.get(PRIVATE_KEY_ENV, "")
    if inline.strip():
        # Environment values often carry PEM newlines as literal "\n".
        return inline.replace("\\n", "\n") if "\n" not in inline else inline
    text = _read_secret(cfg.private_key_file, "private_key_file")
    if not text:
        raise ConfigError(
            f"auth 'smart' needs a private key: set private_key_file (PEM file) or "
            f"{PRIVATE_KEY_ENV} (PEM text)."
        )
    return text


def _oneshot_post_form(timeout: float, allow_insecure_http: bool, ca_bundle: str | None) -> PostForm:
    """Token requests on a short-lived connection of their own (no shared client at hand)."""

    def post(url: str, data: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
        with FhirClient(
            url, auth=None, timeout=timeout, allow_insecure_http=allow_insecure_http, ca_bundle=ca_bundle
        ) as token_client:
            return token_client.post_form(url, data)

    return post


def smart_auth_from_config(
    cfg: RunConfig,
    client: FhirClient | None = None,
    *,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> SmartBackendAuth:
    """Build `SmartBackendAuth` from a resolved `RunConfig`.

    Reads ``client_id``, ``jwt_alg``, ``key_id``, ``scope``; the private key from
    ``$FHIR_CRS_PRIVATE_KEY`` (PEM text) or else ``private_key_file``; the token URL from
    ``token_url`` or else SMART discovery on ``server``.

    Args:
        client: used for discovery and token requests (which never carry its credentials), so it
            may be the client this auth will be attached to (``client.auth = auth``). Without one,
            each request uses a short-lived connection of its own.
        env: environment mapping (default ``os.environ``).

    Raises:
        ConfigError: a setting is missing or invalid (messages never contain key material).
    """
    env = os.environ if env is None else env
    if not cfg.client_id or not cfg.client_id.strip():
        raise ConfigError(
            "auth 'smart' needs client_id: set FHIR_CRS_CLIENT_ID or 'client_id' in fhir-crs.toml."
        )
    if cfg.jwt_alg not in SUPPORTED_ALGS:
        raise ConfigError(f"jwt_alg '{cfg.jwt_alg}' is not supported; use RS384 or ES384.")
    pem = _private_key_text(cfg, env)
    note_secret(*(line for line in pem.splitlines() if "-----" not in line))
    token_url = cfg.token_url
    if not token_url:
        if not cfg.server:
            raise ConfigError(
                "auth 'smart' needs token_url, or a server to discover it from "
                "(FHIR_CRS_TOKEN_URL / FHIR_CRS_SERVER)."
            )
        if client is not None:
            token_url = discover_token_url(client, cfg.server, alg=cfg.jwt_alg)
        else:
            with FhirClient(
                cfg.server,
                auth=None,
                timeout=cfg.timeout,
                max_retries=cfg.max_retries,
                total_time_cap=cfg.total_time_cap,
                allow_insecure_http=cfg.allow_insecure_http,
                ca_bundle=cfg.ca_bundle,
            ) as probe:
                token_url = discover_token_url(probe, cfg.server, alg=cfg.jwt_alg)
    post_form: PostForm = (
        client.post_form
        if client is not None
        else _oneshot_post_form(cfg.timeout, cfg.allow_insecure_http, cfg.ca_bundle)
    )
    return SmartBackendAuth(
        cfg.client_id,
        pem,
        token_url,
        kid=cfg.key_id or None,
        alg=cfg.jwt_alg,
        scope=cfg.scope,
        post_form=post_form,
        clock=clock,
        allow_insecure_http=cfg.allow_insecure_http,
    )
