"""CDS Hooks 2.0 "Trusting CDS Clients": the JWT every CDS Hooks call carries (stage: EHR → serve).

    Authorization: Bearer <JWT>     signed by the CDS client (the EHR) with a key of its JWK Set

`CdsAuthenticator.verify` accepts a call only when all of these hold, else `AuthRefused` (401):

* the header is `Bearer <compact JWS>`; `alg` is an asymmetric algorithm (`ALGORITHMS`: RS*, PS*,
  ES*); `none` and HMAC (HS*) are refused before any key is looked up;
* `iss` is one of the configured clients (`--cds-client ISS=JWKS_URL`), compared exactly (a
  trailing slash aside); an unknown issuer is refused without fetching anything;
* a `jku` header, when present, is exactly the JWKS URL configured for that issuer: no other URL
  is ever fetched (the spec's "trusted URLs" are the configured ones);
* `kid` names a signing key of that issuer's JWK Set (`jwt.PyJWKClient`: cached 5 minutes, one
  forced refresh for an unknown `kid` at most every 30 s, redirects not followed); the key is
  bound to its own algorithm, so a token cannot pick another;
* the signature verifies; `aud` (string or list) contains this service's endpoint URL,
  `--public-url` + `/cds-services/fhir-crs-crs-grade` (a fixed URL, never the request's Host);
* `iss`, `sub` (the client id), `aud`, `exp`, `iat` and `jti` are present; `exp` is not past and
  `iat` not in the future, allowing `LEEWAY_S` (30 s) of clock skew; `exp` is at most
  `MAX_LIFETIME_S` (5 minutes, the spec's limit) + skew ahead;
* `(iss, jti)` has not been seen before within the token's lifetime (replay): seen pairs are kept
  in memory until their `exp` + skew, so a replay cannot outlive the cache.

Reasons name the failed check, never the token. Discovery (`GET /cds-services`) stays open: it
holds no patient data and EHRs read it when registering the service.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt

from ..errors import ConfigError
from ..fhir.client import require_secure_url

log = logging.getLogger("fhir_crs.serve")

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
LEEWAY_S = 30
MAX_LIFETIME_S = 300
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti"]


@dataclass(frozen=True, slots=True)
class CdsClient:
    issuer: str
    jwks_url: str


def parse_cds_client(value: str, *, allow_insecure_http: bool = False) -> CdsClient:
    """`ISS=JWKS_URL` (the value of one `--cds-client`)."""
    issuer, sep, url = (value or "").partition("=")
    issuer, url = issuer.strip(), url.strip()
    # split at the first '=': an issuer is a URL without one; a JWKS URL may have a query
    if not sep or not issuer or not url:
        raise ConfigError(f"--cds-client {value!r}: expected ISS=JWKS_URL "
                          "(e.g. https://ehr.example.org=https://ehr.example.org/.well-known/jwks.json).")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ConfigError(f"--cds-client {issuer}: the JWKS URL {url!r} is not an absolute http(s) URL.")
    require_secure_url(url, f"--cds-client {issuer}: the JWKS URL", allow_insecure_http=allow_insecure_http)
    return CdsClient(issuer.rstrip("/"), url)


def check_clients(values: list[str], *, allow_insecure_http: bool) -> tuple[CdsClient, ...]:
    clients: dict[str, CdsClient] = {}
    for value in values:
        client = parse_cds_client(value, allow_insecure_http=allow_insecure_http)
        if client.issuer in clients and clients[client.issuer] != client:
            raise ConfigError(f"--cds-client {client.issuer}: given twice with different JWKS URLs.")
        clients[client.issuer] = client
    return tuple(clients.values())


class AuthRefused(Exception):
    """A CDS Hooks call without a valid JWT: answered 401, nothing is read or fetched."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _shown(value: Any) -> str:
    """An attacker-chosen header/claim value, short and printable, for a refusal reason."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text[:60] + ("…" if len(text) > 60 else ""))


class CdsAuthenticator:
    def __init__(self, clients: tuple[CdsClient, ...], audience: str, *, timeout: float = 10.0,
                 ca_bundle: str | None = None) -> None:
        context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else None
        self.audience = audience
        self.clients = {c.issuer: c for c in clients}
        self._keys = {c.issuer: jwt.PyJWKClient(c.jwks_url, cache_jwk_set=True, lifespan=300, timeout=min(timeout, 10.0),
                                                ssl_context=context, cooldown_duration=30)
                      for c in clients}
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def verify(self, authorization: str | None, now: float | None = None) -> dict[str, Any]:
        """The verified claims of the call's JWT, or `AuthRefused` with the reason."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthRefused("no 'Authorization: Bearer <JWT>' header (this service requires a JWT signed by the EHR)")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthRefused("the bearer token is not a JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise AuthRefused(f"JWT alg {_shown(alg)} is not accepted (asymmetric signatures only: {', '.join(ALGORITHMS)})")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthRefused("the JWT header has no kid")
        iss = unverified.get("iss")
        client = self.clients.get(iss.rstrip("/")) if isinstance(iss, str) else None
        if client is None:
            raise AuthRefused(f"JWT iss {_shown(iss)} is not a configured CDS client (--cds-client)")
        jku = header.get("jku")
        if jku is not None and jku != client.jwks_url:
            raise AuthRefused(f"JWT jku {_shown(jku)} is not the JWKS URL configured for {client.issuer}")
        try:
            key = self._keys[client.issuer].get_signing_key(kid)
        except jwt.PyJWKClientConnectionError:
            log.warning("CDS client %s: its JWKS could not be read", client.issuer)
            raise AuthRefused(f"the JWK Set of {client.issuer} could not be read") from None
        except jwt.PyJWTError:
            raise AuthRefused(f"kid {_shown(kid)} is not a signing key of {client.issuer}") from None
        now = time.time() if now is None else now
        try:
            claims = jwt.decode(token, key=key, algorithms=[alg], audience=self.audience, issuer=iss, leeway=LEEWAY_S,
                                options={"require": REQUIRED_CLAIMS, "verify_iat": True, "verify_exp": True})
        except jwt.ExpiredSignatureError:
            raise AuthRefused("the JWT has expired (exp)") from None
        except jwt.ImmatureSignatureError:
            raise AuthRefused("the JWT is not valid yet (iat or nbf in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthRefused(f"the JWT aud is not this service's endpoint {self.audience}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthRefused(f"the JWT lacks the {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthRefused("the JWT signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise AuthRefused(f"JWT alg {_shown(alg)} does not match the key {_shown(kid)}") from None
        except jwt.PyJWTError as exc:
            raise AuthRefused(f"the JWT is invalid ({type(exc).__name__})") from None
        sub, jti, exp = claims.get("sub"), claims.get("jti"), claims["exp"]
        if not isinstance(sub, str) or not sub.strip():
            raise AuthRefused("the JWT sub (the client id) is empty")
        if not isinstance(jti, str) or not jti.strip():
            raise AuthRefused("the JWT jti is empty")
        if exp > now + MAX_LIFETIME_S + LEEWAY_S:
            raise AuthRefused(f"the JWT expires more than {MAX_LIFETIME_S // 60} minutes ahead (exp)")
        with self._lock:
            for seen, until in list(self._seen.items()):
                if until < now:
                    del self._seen[seen]
            if (client.issuer, jti) in self._seen:
                raise AuthRefused("the JWT jti was already used (replay)")
            self._seen[(client.issuer, jti)] = float(exp) + LEEWAY_S
        return claims
