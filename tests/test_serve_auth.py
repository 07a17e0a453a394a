"""`fhir-crs serve`: CDS Hooks 2.0 client authentication (`--cds-client ISS=JWKS_URL`) and CORS
(`--allow-ehr-origin`), against the real service process on 127.0.0.1 (killed by PID). The EHRs'
keys are generated here (cryptography); their JWK Sets are served by loopback servers that record
every request, and an allowed FHIR server records that a refused call fetched nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import factory
import jsonschema
import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from loopback import LoopbackServer, free_port
from test_serve_cds import SERVICE, Serve, request

from fhir_crs.serve.cds_auth import LEEWAY_S
from fhir_crs.serve.schemas import CDS_RESPONSE, ERROR

pytestmark = pytest.mark.integration
EHR_A = "https://ehr-a.example.org"
EHR_B = "https://ehr-b.example.org/fhir"


class Ehr:
    """A CDS client: its private key, the JWK of its public key, and a loopback JWKS server."""

    def __init__(self, issuer: str, alg: str, kid: str, key: Any, jwks: LoopbackServer) -> None:
        self.issuer, self.alg, self.kid, self.key, self.jwks = issuer, alg, kid, key, jwks
        self.jwks_url = f"{jwks.origin}/.well-known/jwks.json"
        algo = jwt.algorithms.ECAlgorithm if alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
        jwk = {**algo.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig", "alg": alg}
        jwks.route("GET", "/.well-known/jwks.json", json={"keys": [jwk]}, headers={"Content-Type": "application/json"})

    def claims(self, aud: str, **change: Any) -> dict[str, Any]:
        now = int(time.time())
        out = {"iss": self.issuer, "sub": "ehr-client-7", "aud": aud, "iat": now, "exp": now + 240, "jti": str(uuid.uuid4())}
        out.update(change)
        return {k: v for k, v in out.items() if v is not None}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT", **header})

    def jwks_fetches(self) -> int:
        return len(self.jwks.requests())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], kid: str) -> str:
    """alg none: a header and a payload, no signature."""
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT', 'kid': kid}).encode())}.{_b64(json.dumps(claims).encode())}."


def hmac_with_public_key(claims: dict[str, Any], ehr: Ehr) -> str:
    """The classic alg confusion: HS256 keyed with the EHR's (public) PEM."""
    pem = ehr.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': ehr.kid}).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing}.{_b64(hmac.new(pem, signing.encode(), hashlib.sha256).digest())}"


@pytest.fixture(scope="module")
def ehrs(tmp_path_factory):
    with LoopbackServer(tmp_path_factory.mktemp("jwks-a")) as a, LoopbackServer(tmp_path_factory.mktemp("jwks-b")) as b, \
            LoopbackServer(tmp_path_factory.mktemp("jwks-evil")) as evil:
        yield {"a": Ehr(EHR_A, "ES384", "a-2025", ec.generate_private_key(ec.SECP384R1()), a),
               "b": Ehr(EHR_B, "RS384", "b-1", rsa.generate_private_key(public_exponent=65537, key_size=2048), b),
               "evil": Ehr(EHR_A, "ES384", "a-2025", ec.generate_private_key(ec.SECP384R1()), evil)}


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    """An allowed FHIR server: a refused call must never reach it."""
    with LoopbackServer(tmp_path_factory.mktemp("fhir")) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, ehrs, recorder):
    port = free_port()
    s = Serve(tmp_path_factory.mktemp("serve-auth"), "--public-url", f"http://127.0.0.1:{port}",
              "--cds-client", f"{EHR_A}={ehrs['a'].jwks_url}", "--cds-client", f"{EHR_B}={ehrs['b'].jwks_url}",
              "--allow-fhir-server", recorder.base, port=port)
    s.aud = f"{s.base}/cds-services/{SERVICE}"  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()


def prefetch(pid: str) -> dict[str, Any]:
    def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}

    return {"patient": factory.patient(pid), "procedures": bundle([factory.cart(0, pid=pid)]), "medications": bundle([]),
            "vitals": bundle([factory.temp(6, 39.1, pid=pid), factory.temp(12, 38.6, pid=pid)]), "labs": bundle([]),
            "assessments": bundle([])}


def call(serve: Serve, authorization: str | None, body: dict[str, Any] | None = None) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = body if body is not None else request("auth1", prefetch=prefetch("auth1"))
    return requests.post(f"{serve.base}/cds-services/{SERVICE}", data=json.dumps(body), headers=headers, timeout=60)


def refused(resp: requests.Response) -> str:
    assert resp.status_code == 401, resp.text
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    jsonschema.validate(resp.json(), ERROR)
    assert resp.json()["error"]["code"] == "unauthorized"
    return resp.json()["error"]["message"]


def graded(resp: requests.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    jsonschema.validate(resp.json(), CDS_RESPONSE)
    return resp.json()["cards"]


def test_cds_call_with_a_valid_jwt_of_each_configured_ehr_is_graded(guarded, ehrs):
    for ehr in (ehrs["a"], ehrs["b"]):
        cards = graded(call(guarded, f"Bearer {ehr.sign(ehr.claims(guarded.aud))}"))
        (card,) = cards
        assert card["summary"].startswith("CAR-T (day 0") and "CRS grade 1" in card["summary"]
    # aud as a list naming this endpoint, a jku that is the configured URL, and a clock 10 s behind
    a = ehrs["a"]
    now = int(time.time())
    graded(call(guarded, f"Bearer {a.sign(a.claims([guarded.aud, 'https://other.example/cds']))}"))
    graded(call(guarded, f"Bearer {a.sign(a.claims(guarded.aud), jku=a.jwks_url)}"))
    assert LEEWAY_S == 30
    graded(call(guarded, f"Bearer {a.sign(a.claims(guarded.aud, iat=now - 200, exp=now - 10))}"))
    graded(call(guarded, f"Bearer {a.sign(a.claims(guarded.aud, iat=now + 10, exp=now + 250))}"))


@pytest.mark.parametrize("authorization", [None, "", "Basic ZWhyOnNlY3JldA==", "Bearer", "Bearer not-a-jwt"])
def test_cds_call_without_a_jwt_is_401_and_nothing_is_fetched(guarded, recorder, ehrs, authorization):
    before = {k: e.jwks_fetches() for k, e in ehrs.items()}
    body = request("auth2", fhirServer=recorder.base)
    assert "JWT" in refused(call(guarded, authorization, body))
    assert recorder.requests() == []
    assert {k: e.jwks_fetches() for k, e in ehrs.items()} == before


def _bad_tokens(guarded: Serve, ehrs: dict[str, Ehr]) -> dict[str, tuple[str, str]]:
    a, b, evil = ehrs["a"], ehrs["b"], ehrs["evil"]
    now, aud = int(time.time()), guarded.aud  # type: ignore[attr-defined]
    good = a.sign(a.claims(aud))
    head, payload, sig = good.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["sub"] = "someone-else"
    return {
        "expired": (a.sign(a.claims(aud, iat=now - 400, exp=now - LEEWAY_S - 60)), "expired"),
        "wrong aud": (a.sign(a.claims("https://other-service.example/cds-services/fhir-crs-crs-grade")), "aud"),
        "aud of another port": (a.sign(a.claims(aud.replace(str(guarded.port), str(guarded.port + 1)))), "aud"),
        "wrong iss": (a.sign(a.claims(aud, iss="https://ehr-c.example.org")), "not a configured CDS client"),
        "unknown kid": (a.sign(a.claims(aud), kid="a-2019"), "not a signing key"),
        "alg none": (unsigned(a.claims(aud), a.kid), "'none' is not accepted"),
        "HS256 keyed with the public key": (hmac_with_public_key(a.claims(aud), a), "'HS256' is not accepted"),
        "signed by another key with the right kid": (evil.sign(evil.claims(aud)), "signature"),
        "the other EHR's key": (b.sign(b.claims(aud, iss=EHR_A), kid=a.kid), "does not match"),
        "tampered payload": (f"{head}.{_b64(json.dumps(tampered).encode())}.{sig}", "signature"),
        "untrusted jku": (evil.sign(evil.claims(aud), jku=evil.jwks_url), "jku"),
        "no jti": (a.sign(a.claims(aud, jti=None)), "jti"),
        "no sub": (a.sign(a.claims(aud, sub=None)), "sub"),
        "no exp": (a.sign(a.claims(aud, exp=None)), "exp"),
        "iat in the future": (a.sign(a.claims(aud, iat=now + LEEWAY_S + 120, exp=now + 290)), "not valid yet"),
        "lives more than 5 minutes": (a.sign(a.claims(aud, exp=now + 3600)), "5 minutes"),
    }


BAD = ["expired", "wrong aud", "aud of another port", "wrong iss", "unknown kid", "alg none",
       "HS256 keyed with the public key", "signed by another key with the right kid", "the other EHR's key",
       "tampered payload", "untrusted jku", "no jti", "no sub", "no exp", "iat in the future", "lives more than 5 minutes"]


@pytest.mark.parametrize("case", BAD)
def test_cds_call_with_an_invalid_jwt_is_401_and_nothing_is_fetched(guarded, recorder, ehrs, case):
    token, reason = _bad_tokens(guarded, ehrs)[case]
    body = request("auth3", fhirServer=recorder.base)
    message = refused(call(guarded, f"Bearer {token}", body))
    assert reason in message
    assert token not in message
    assert recorder.requests() == []
    assert ehrs["evil"].jwks_fetches() == 0  # a jku that is not the configured URL is never fetched
    assert token not in guarded.log_path.read_text()


def test_unknown_kids_and_issuers_do_not_make_the_service_hammer_the_jwks(guarded, ehrs):
    a = ehrs["a"]
    graded(call(guarded, f"Bearer {a.sign(a.claims(guarded.aud))}"))  # keys cached
    before = a.jwks_fetches()
    for i in range(4):
        refused(call(guarded, f"Bearer {a.sign(a.claims(guarded.aud), kid=f'rotated-{i}')}"))
        refused(call(guarded, f"Bearer {a.sign(a.claims(guarded.aud, iss=f'https://x{i}.example'))}"))
    assert a.jwks_fetches() - before <= 1  # one forced refresh at most per 30 s


def test_a_replayed_jwt_is_refused(guarded, ehrs, recorder):
    a = ehrs["a"]
    token = a.sign(a.claims(guarded.aud))
    graded(call(guarded, f"Bearer {token}"))
    assert "already used (replay)" in refused(call(guarded, f"Bearer {token}"))
    # a new token reusing the jti is a replay too, while the first one lives
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert "replay" in refused(call(guarded, f"Bearer {a.sign(a.claims(guarded.aud, jti=jti))}",
                                    request("auth4", fhirServer=recorder.base)))
    assert recorder.requests() == []
    assert "CDS Hooks call refused (401): the JWT jti was already used (replay)" in guarded.log_path.read_text()


def test_discovery_stays_open_and_the_openapi_declares_401(guarded):
    assert requests.get(f"{guarded.base}/cds-services", timeout=10).json()["services"][0]["id"] == SERVICE
    post = requests.get(f"{guarded.base}/openapi.json", timeout=10).json()["paths"]["/cds-services/{service_id}"]["post"]
    assert "401" in post["responses"]
    log = guarded.log_path.read_text()
    assert f"CDS Hooks calls need a JWT signed by: {EHR_A}, {EHR_B} (aud {guarded.aud})" in log
    assert "NOT authenticated" not in log


@pytest.mark.parametrize(("args", "text"), [
    (["--cds-client", f"{EHR_A}=https://ehr-a.example.org/jwks"], "--cds-client needs --public-url"),
    (["--cds-client", "no-jwks-url", "--public-url", "https://cds.example.org"], "expected ISS=JWKS_URL"),
    (["--cds-client", f"{EHR_A}=http://ehr-a.example.org/jwks", "--public-url", "https://cds.example.org"], "http://"),
    (["--cds-client", f"{EHR_A}=file:///etc/jwks.json", "--public-url", "https://cds.example.org"], "not an absolute http(s) URL"),
])
def test_bad_cds_client_options_exit_2_before_listening(tmp_path, args, text):
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "fhir_crs", "serve", "--port", str(port), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert text in done.stderr


# ---------------------------------------------------------------------- no --cds-client; CORS

EHR_ORIGIN = "https://sandbox.cds-hooks.example"


@pytest.fixture(scope="module")
def open_service(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("serve-open"), "--allow-ehr-origin", EHR_ORIGIN)
    try:
        yield s
    finally:
        s.stop()


def test_serve_without_cds_client_warns_loudly_at_startup(open_service):
    log = open_service.log_path.read_text()
    assert "WARNING: CDS Hooks calls are NOT authenticated (no --cds-client ISS=JWKS_URL)" in log
    assert "behind a gateway that authenticates the EHR" in log
    graded(call(open_service, None))  # and it answers without a JWT


def test_cors_allows_the_configured_ehr_origin_only(open_service):
    url = f"{open_service.base}/cds-services/{SERVICE}"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = requests.options(url, headers={"Origin": EHR_ORIGIN, **preflight}, timeout=10)
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == EHR_ORIGIN
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in ok.headers["Access-Control-Allow-Headers"].split(",")}
    assert "Access-Control-Allow-Credentials" not in ok.headers
    body = json.dumps(request("cors1", prefetch=prefetch("cors1")))
    post = requests.post(url, data=body, headers={"Origin": EHR_ORIGIN, "Content-Type": "application/json"}, timeout=60)
    assert post.status_code == 200 and post.headers["Access-Control-Allow-Origin"] == EHR_ORIGIN
    get = requests.get(f"{open_service.base}/cds-services", headers={"Origin": EHR_ORIGIN}, timeout=10)
    assert get.headers["Access-Control-Allow-Origin"] == EHR_ORIGIN

    for other in ("https://evil.example", "https://sandbox.cds-hooks.example:8443", "http://sandbox.cds-hooks.example"):
        bad = requests.options(url, headers={"Origin": other, **preflight}, timeout=10)
        assert bad.status_code == 400 and "Access-Control-Allow-Origin" not in bad.headers
        post = requests.post(url, data=body, headers={"Origin": other, "Content-Type": "application/json"}, timeout=60)
        assert "Access-Control-Allow-Origin" not in post.headers  # the browser withholds the answer from that page
