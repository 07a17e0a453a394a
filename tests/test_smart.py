"""SMART Backend Services auth: the JWT assertion, the token request, token reuse/re-mint,
401 handling mid-paging, discovery and config — against `responses` mocks; plus one integration
test against the real local sekmet-fhir server with SMART turned on (127.0.0.1 only)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_crs.config import RunConfig
from fhir_crs.errors import ConfigError, FhirAuthError
from fhir_crs.fhir import (
    FhirClient,
    NoAuth,
    ServerUnavailable,
    SmartBackendAuth,
    discover_token_url,
    smart_auth_from_config,
)
from fhir_crs.fhir import smart as smart_module

BASE = "https://ehr.example.test/fhir"
TOKEN_URL = "https://ehr.example.test/auth/token"
DISCOVERY = f"{BASE}/.well-known/smart-configuration"
CLIENT_ID = "crs-nightly"
SCOPE = "system/Observation.rs system/Patient.rs system/Condition.cu"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
T0 = 1_800_000_000.0


def pem_private(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def keys(rsa_key, ec_key) -> dict[str, Any]:
    return {"RS384": rsa_key, "ES384": ec_key}


@pytest.fixture
def mock():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as m:
        yield m


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def token_json(token: str, expires_in: int = 300) -> dict[str, Any]:
    return {"access_token": token, "token_type": "bearer", "expires_in": expires_in, "scope": SCOPE}


def form_of(call: Any) -> dict[str, str]:
    body = call.request.body
    text = body.decode() if isinstance(body, bytes) else body
    parsed = parse_qs(text, strict_parsing=True)
    assert all(len(v) == 1 for v in parsed.values())
    return {k: v[0] for k, v in parsed.items()}


def make_auth(
    key: Any, client: FhirClient, clock: Clock, alg: str = "RS384", **kw: Any
) -> SmartBackendAuth:
    return SmartBackendAuth(
        CLIENT_ID,
        pem_private(key),
        TOKEN_URL,
        kid="kid-1",
        alg=alg,
        scope=SCOPE,
        post_form=client.post_form,
        clock=clock,
        **kw,
    )


# ----------------------------------------------------------------------------- the assertion


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_assertion_header_claims_and_form_body(mock, keys, clock, alg: str) -> None:
    client = FhirClient(BASE)
    auth = make_auth(keys[alg], client, clock, alg=alg)
    mock.post(TOKEN_URL, json=token_json("tok-1"))
    mock.post(TOKEN_URL, json=token_json("tok-2"))

    headers: dict[str, str] = {}
    auth.apply(headers)
    assert headers["Authorization"] == "Bearer tok-1"
    clock.t += 290  # 10 s left of 300: re-mint
    auth.apply(headers)
    assert headers["Authorization"] == "Bearer tok-2"

    jtis = []
    for call in mock.calls:
        assert call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert "Authorization" not in call.request.headers
        form = form_of(call)
        assert set(form) == {"grant_type", "client_assertion_type", "client_assertion", "scope"}
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == ASSERTION_TYPE
        assert form["scope"] == SCOPE
        assertion = form["client_assertion"]
        assert jwt.get_unverified_header(assertion) == {"alg": alg, "kid": "kid-1", "typ": "JWT"}
        public = serialization.load_pem_public_key(pem_public(keys[alg]))
        claims = jwt.decode(
            assertion,
            public,
            algorithms=[alg],
            audience=TOKEN_URL,
            options={"verify_exp": False, "verify_iat": False},
        )
        assert set(claims) == {"iss", "sub", "aud", "exp", "iat", "jti"}
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["aud"] == TOKEN_URL
        assert 0 < claims["exp"] - claims["iat"] <= 300
        uuid.UUID(claims["jti"])
        jtis.append(claims["jti"])
    first, second = (
        jwt.decode(form_of(c)["client_assertion"], options={"verify_signature": False})
        for c in mock.calls
    )
    assert first["iat"] == int(T0) and first["exp"] <= T0 + 300
    assert second["iat"] == int(T0 + 290)
    assert len(set(jtis)) == 2


def test_assertion_rejected_by_wrong_public_key(keys, clock) -> None:
    auth = make_auth(keys["RS384"], FhirClient(BASE), clock)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            auth.assertion(),
            other,
            algorithms=["RS384"],
            audience=TOKEN_URL,
            options={"verify_exp": False},
        )


def test_default_kid_is_the_rfc7638_thumbprint(keys, clock) -> None:
    from sekmet.auth.keys import public_jwk  # an independent RFC 7638 implementation

    for alg, key in keys.items():
        auth = SmartBackendAuth(
            CLIENT_ID,
            pem_private(key),
            TOKEN_URL,
            alg=alg,
            scope=SCOPE,
            post_form=FhirClient(BASE).post_form,
            clock=clock,
        )
        assert auth.kid == public_jwk(key)["kid"]


# ----------------------------------------------------------------------------- token lifetime


def test_token_reused_until_near_expiry_then_reminted(mock, keys, clock) -> None:
    client = FhirClient(BASE)
    auth = make_auth(keys["RS384"], client, clock)
    mock.post(TOKEN_URL, json=token_json("tok-1", expires_in=300))
    mock.post(TOKEN_URL, json=token_json("tok-2", expires_in=300))
    seen = []
    for t in (0, 100, 269):  # 31 s left at 269: still reused
        clock.t = T0 + t
        h: dict[str, str] = {}
        auth.apply(h)
        seen.append(h["Authorization"])
    assert len(mock.calls) == 1
    clock.t = T0 + 271  # 29 s left: re-mint before it expires
    h = {}
    auth.apply(h)
    seen.append(h["Authorization"])
    assert seen == ["Bearer tok-1"] * 3 + ["Bearer tok-2"]
    assert auth.mints == 2 and len(mock.calls) == 2


def test_short_lived_token_refreshes_at_half_life(mock, keys, clock) -> None:
    auth = make_auth(keys["RS384"], FhirClient(BASE), clock)
    mock.post(TOKEN_URL, json=token_json("tok-1", expires_in=20))
    mock.post(TOKEN_URL, json=token_json("tok-2", expires_in=20))
    h: dict[str, str] = {}
    auth.apply(h)
    clock.t += 9
    auth.apply(h)
    assert h["Authorization"] == "Bearer tok-1"
    clock.t += 1
    auth.apply(h)
    assert h["Authorization"] == "Bearer tok-2"


def test_401_mid_paging_remints_once_and_resends(mock, keys, clock) -> None:
    client = FhirClient(BASE, page_size=None, sleep=lambda s: None)
    client.auth = make_auth(keys["RS384"], client, clock)
    page2 = f"{BASE}/Observation?_offset=1"
    mock.post(TOKEN_URL, json=token_json("tok-1"))
    mock.get(
        f"{BASE}/Observation",
        json={
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": page2}],
            "entry": [{"resource": {"resourceType": "Observation", "id": "o1"}}],
        },
    )
    mock.get(
        page2,
        status=401,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "expired"}],
        },
    )
    mock.post(TOKEN_URL, json=token_json("tok-2"))
    mock.get(
        page2,
        json={
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {"resourceType": "Observation", "id": "o2"}}],
        },
    )

    result = client.search("Observation")

    assert [r["id"] for r in result.matches] == ["o1", "o2"]
    fhir_calls = [c for c in mock.calls if c.request.method == "GET"]
    assert [c.request.headers["Authorization"] for c in fhir_calls] == [
        "Bearer tok-1",
        "Bearer tok-1",
        "Bearer tok-2",
    ]
    assert sum(c.request.url == TOKEN_URL for c in mock.calls) == 2


def test_401_after_remint_is_an_auth_error(mock, keys, clock) -> None:
    client = FhirClient(BASE, sleep=lambda s: None)
    client.auth = make_auth(keys["RS384"], client, clock)
    mock.post(TOKEN_URL, json=token_json("tok-1"))
    mock.get(f"{BASE}/Patient/p1", status=401)
    mock.post(TOKEN_URL, json=token_json("tok-2"))
    mock.get(f"{BASE}/Patient/p1", status=401)
    with pytest.raises(FhirAuthError) as err:
        client.read("Patient", "p1")
    assert err.value.status == 401
    assert "tok-" not in str(err.value)


def test_concurrent_401s_remint_only_once(mock, keys, clock) -> None:
    auth = make_auth(keys["RS384"], FhirClient(BASE), clock)
    mock.post(TOKEN_URL, json=token_json("tok-1"))
    mock.post(TOKEN_URL, json=token_json("tok-2"))
    barrier = threading.Barrier(2)
    sent: dict[str, str] = {}

    def worker(name: str) -> None:
        h: dict[str, str] = {}
        auth.apply(h)
        barrier.wait()  # both sent tok-1 ...
        if name == "b":
            done_a.wait()
        assert auth.on_unauthorized() is True  # ... and both got a 401
        if name == "a":
            done_a.set()
        auth.apply(h)
        sent[name] = h["Authorization"]

    done_a = threading.Event()
    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sent == {"a": "Bearer tok-2", "b": "Bearer tok-2"}
    assert auth.mints == 2


# ----------------------------------------------------------------------------- token errors


def test_invalid_client_is_auth_error_without_the_assertion(mock, keys, clock) -> None:
    auth = make_auth(keys["RS384"], FhirClient(BASE), clock)
    mock.post(
        TOKEN_URL,
        status=401,
        json={"error": "invalid_client", "error_description": "jti has already been used"},
    )
    with pytest.raises(FhirAuthError) as err:
        auth.apply({})
    message = str(err.value)
    assertion = form_of(mock.calls[0])["client_assertion"]
    assert "invalid_client" in message and "jti has already been used" in message
    assert assertion not in message and "eyJ" not in message
    assert err.value.status == 401


def test_error_description_echoing_a_jwt_is_scrubbed(mock, keys, clock) -> None:
    auth = make_auth(keys["RS384"], FhirClient(BASE), clock)

    def echo(request: Any) -> tuple[int, dict[str, str], str]:
        assertion = parse_qs(request.body)["client_assertion"][0]
        return (
            400,
            {"Content-Type": "application/json"},
            ('{"error":"invalid_request","error_description":"bad assertion ' + assertion + '"}'),
        )

    mock.add_callback(responses.POST, TOKEN_URL, callback=echo)
    with pytest.raises(FhirAuthError) as err:
        auth.apply({})
    assert "eyJ" not in str(err.value) and "eyJ" not in (err.value.diagnostics or "")
    assert "invalid_request" in str(err.value)


def test_token_endpoint_unavailable_is_server_unavailable(mock, keys, clock) -> None:
    auth = make_auth(keys["RS384"], FhirClient(BASE), clock)
    mock.post(TOKEN_URL, status=503, body="<html>busy</html>")
    with pytest.raises(ServerUnavailable, match="HTTP 503"):
        auth.apply({})


def test_200_without_access_token_is_auth_error(mock, keys, clock) -> None:
    auth = make_auth(keys["RS384"], FhirClient(BASE), clock)
    mock.post(TOKEN_URL, json={"token_type": "bearer"})
    with pytest.raises(FhirAuthError, match="no access_token"):
        auth.apply({})


def test_repr_hides_key_and_token(mock, keys, clock) -> None:
    auth = make_auth(keys["RS384"], FhirClient(BASE), clock)
    mock.post(TOKEN_URL, json=token_json("very-secret-token"))
    auth.apply({})
    text = repr(auth) + str(auth)
    assert "very-secret-token" not in text and "PRIVATE" not in text
    assert CLIENT_ID in text and "<redacted>" in text


# ----------------------------------------------------------------------------- discovery


SMART_CONFIG = {
    "token_endpoint": TOKEN_URL,
    "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
    "grant_types_supported": ["client_credentials"],
}


def test_discovery_reads_token_endpoint_without_credentials(mock) -> None:
    mock.get(DISCOVERY, json=SMART_CONFIG)
    client = FhirClient(BASE, auth=NoAuth())
    assert discover_token_url(client, alg="ES384") == TOKEN_URL
    assert "Authorization" not in mock.calls[0].request.headers
    assert mock.calls[0].request.headers["Accept"] == "application/json"


def test_discovery_resolves_relative_token_endpoint(mock) -> None:
    mock.get(DISCOVERY, json={"token_endpoint": "/auth/token"})
    assert discover_token_url(FhirClient(BASE), BASE) == TOKEN_URL


@pytest.mark.parametrize(
    ("doc", "status", "expect"),
    [
        pytest.param(
            {**SMART_CONFIG, "token_endpoint_auth_methods_supported": ["client_secret_basic"]},
            200,
            "private_key_jwt",
            id="no-private_key_jwt",
        ),
        pytest.param(
            {**SMART_CONFIG, "token_endpoint_auth_signing_alg_values_supported": ["RS256"]},
            200,
            "RS384",
            id="alg-not-listed",
        ),
        pytest.param(
            {"grant_types_supported": ["client_credentials"]},
            200,
            "no token_endpoint",
            id="no-endpoint",
        ),
        pytest.param({"resourceType": "OperationOutcome"}, 404, "set token_url", id="404"),
    ],
)
def test_discovery_problems_are_config_errors(mock, doc, status, expect) -> None:
    mock.get(DISCOVERY, json=doc, status=status)
    with pytest.raises(ConfigError, match=expect):
        discover_token_url(FhirClient(BASE, max_retries=0), alg="RS384")


# ----------------------------------------------------------------------------- from RunConfig


def smart_cfg(**kw: Any) -> RunConfig:
    return RunConfig(
        **{
            "server": BASE,
            "auth": "smart",
            "client_id": CLIENT_ID,
            "token_url": TOKEN_URL,
            "key_id": "kid-1",
            **kw,
        }
    )


def test_from_config_key_file_and_discovery(mock, keys, tmp_path: Path, clock) -> None:
    key_file = tmp_path / "client.pem"
    key_file.write_bytes(pem_private(keys["ES384"]))
    key_file.chmod(0o600)
    mock.get(DISCOVERY, json=SMART_CONFIG)
    mock.post(TOKEN_URL, json=token_json("tok-1"))
    client = FhirClient(BASE)
    auth = smart_auth_from_config(
        smart_cfg(token_url=None, jwt_alg="ES384", private_key_file=str(key_file)),
        client,
        env={},
        clock=clock,
    )
    client.auth = auth
    assert auth.token_url == TOKEN_URL and auth.alg == "ES384" and auth.kid == "kid-1"
    assert auth.scope == RunConfig().scope
    h: dict[str, str] = {}
    auth.apply(h)
    assert h["Authorization"] == "Bearer tok-1"
    assert form_of(mock.calls[1])["scope"] == RunConfig().scope


def test_from_config_env_key_with_escaped_newlines_and_no_client(mock, keys, clock) -> None:
    pem = pem_private(keys["RS384"]).decode().replace("\n", "\\n")
    mock.post(TOKEN_URL, json=token_json("tok-1"))
    auth = smart_module.smart_auth_from_config(
        smart_cfg(), env={"FHIR_CRS_PRIVATE_KEY": pem}, clock=clock
    )
    h: dict[str, str] = {}
    auth.apply(h)  # token request on a short-lived connection of its own
    assert h["Authorization"] == "Bearer tok-1"


@pytest.mark.parametrize(
    ("cfg_kw", "env", "expect"),
    [
        pytest.param(
            {"client_id": None}, {"FHIR_CRS_PRIVATE_KEY": "x"}, "needs client_id", id="no-client-id"
        ),
        pytest.param({}, {}, "needs a private key", id="no-key"),
        pytest.param(
            {"private_key_file": "/nonexistent/key.pem"},
            {},
            "Cannot read private_key_file",
            id="bad-file",
        ),
        pytest.param(
            {"jwt_alg": "HS256"}, {"FHIR_CRS_PRIVATE_KEY": "x"}, "'jwt_alg' = 'HS256' is not allowed", id="bad-alg"
        ),
        pytest.param(
            {"token_url": None, "server": None},
            {"FHIR_CRS_PRIVATE_KEY": "PEM"},
            "needs token_url",
            id="no-token-url",
        ),
    ],
)
def test_from_config_missing_settings(cfg_kw, env, expect, keys) -> None:
    if env.get("FHIR_CRS_PRIVATE_KEY") == "PEM":
        env = {"FHIR_CRS_PRIVATE_KEY": pem_private(keys["RS384"]).decode()}
    with pytest.raises(ConfigError, match=expect):
        smart_auth_from_config(smart_cfg(**cfg_kw), env=env)


def test_key_problems_never_echo_key_material(keys) -> None:
    ec_pem = pem_private(keys["ES384"]).decode()
    with pytest.raises(ConfigError, match="RS384 needs an RSA") as err:
        smart_auth_from_config(smart_cfg(jwt_alg="RS384"), env={"FHIR_CRS_PRIVATE_KEY": ec_pem})
    assert ec_pem.splitlines()[1] not in str(err.value)
    garbage = "-----BEGIN PRIVATE KEY-----\nTOTALLYSECRETBYTES\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ConfigError) as err:
        smart_auth_from_config(smart_cfg(), env={"FHIR_CRS_PRIVATE_KEY": garbage})
    assert "TOTALLYSECRETBYTES" not in str(err.value)


# ----------------------------------------------------------------------------- real server


@pytest.mark.integration
def test_smart_against_local_server(tmp_path: Path, rsa_key) -> None:
    from fhir_crs.localserver import LocalFhirServer

    priv, pub = tmp_path / "client_rsa.pem", tmp_path / "client_rsa.pub.pem"
    priv.write_bytes(pem_private(rsa_key))
    priv.chmod(0o600)
    pub.write_bytes(pem_public(rsa_key))
    server = LocalFhirServer(
        tmp_path / "sekmet",
        smart_clients=[
            {
                "client_id": CLIENT_ID,
                "public_key_path": str(pub),
                "scopes": "system/*.read system/Condition.write system/Bundle.write",
            }
        ],
    )
    server.start()
    try:
        with (
            FhirClient(server.base, auth=NoAuth(), max_retries=0) as anon,
            pytest.raises(FhirAuthError) as err,
        ):
            anon.search("Patient")
        assert err.value.status == 401

        with FhirClient(server.base, max_retries=1) as client:
            assert discover_token_url(client, alg="RS384") == server.token_url
            token_calls: list[tuple[str, dict[str, str], int, dict[str, Any] | None]] = []
            real_post = client.post_form

            def spy(url: str, data: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
                status, body = real_post(url, data)
                token_calls.append((url, dict(data), status, body))
                return status, body

            client.post_form = spy  # type: ignore[method-assign]
            cfg = RunConfig(
                server=server.base,
                auth="smart",
                client_id=CLIENT_ID,
                private_key_file=str(priv),
                key_id="crs-key-1",
            )
            client.auth = smart_auth_from_config(cfg, client, env={})
            result = client.search("Patient")
            assert result.pages == 1 and result.matches == []
            client.search("Observation")  # token reused

            assert len(token_calls) == 1
            url, form, status, body = token_calls[0]
            assert url == server.token_url and status == 200 and body is not None
            header = jwt.get_unverified_header(form["client_assertion"])
            assert header == {"alg": "RS384", "kid": "crs-key-1", "typ": "JWT"}
            claims = jwt.decode(
                form["client_assertion"],
                rsa_key.public_key(),
                algorithms=["RS384"],
                audience=server.token_url,
            )
            assert (
                claims["iss"] == claims["sub"] == CLIENT_ID and claims["exp"] - claims["iat"] <= 300
            )
            assert body["token_type"] == "bearer" and body["expires_in"] > 0
            access = jwt.decode(body["access_token"], options={"verify_signature": False})
            assert access["client_id"] == CLIENT_ID
            assert "system/Patient.rs" in access["scope"].split()

        # The CLI path: built from config alone (discovery, token requests on own connections).
        auth = smart_auth_from_config(
            RunConfig(
                server=server.base, auth="smart", client_id=CLIENT_ID, private_key_file=str(priv)
            ),
            env={},
        )
        with FhirClient(server.base, auth=auth, max_retries=1) as client:
            assert client.search("Patient").pages == 1
    finally:
        server.stop()


def test_the_default_scope_covers_every_read_search_and_write():
    """SMART v2 `system/<Type>.<cruds>`: every type the change feed and fetch_patient read and
    search (Conditions included), the identifier look-ups and writes of Condition and Bundle,
    and the Provenance a write adds. A server enforcing scopes refuses anything missing."""
    from fhir_crs.changefeed import FEED_TYPES
    from fhir_crs.config import RunConfig
    from fhir_crs.pipeline import WRITTEN_TYPES

    granted: dict[str, str] = {}
    for item in RunConfig().scope.split():
        context, _, rest = item.partition("/")
        rtype, _, perms = rest.partition(".")
        assert context == "system" and perms and set(perms) <= set("cruds"), item
        assert perms == "".join(p for p in "cruds" if p in perms), f"{item}: SMART v2 permissions go in c r u d s order"
        granted[rtype] = perms
    for rtype in FEED_TYPES:  # read and searched (feed, fetch_patient, _include of Medications)
        assert {"r", "s"} <= set(granted.get(rtype, "")), rtype
    for rtype in set(WRITTEN_TYPES.values()):  # looked up by identifier, created, updated
        assert {"c", "r", "u", "s"} <= set(granted.get(rtype, "")), rtype
    assert "c" in granted.get("Provenance", "")
    assert "d" not in "".join(granted.values())  # fhir-crs never deletes
