"""Issue 18: credentials bound to their origin, https by default, caps, checked transaction
answers — against real loopback servers (tests/loopback.py: scripted processes on 127.0.0.1
that record every request; killed by PID). The threat model in docs/SECURITY.md names these
tests."""

from __future__ import annotations

import datetime as dt
import gzip
import ipaddress
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT
from loopback import LoopbackServer

from fhir_crs.cli import cli
from fhir_crs.errors import ConfigError
from fhir_crs.fhir import (
    BearerAuth,
    BulkExport,
    BulkExportError,
    CrossOriginRefused,
    FhirClient,
    NoAuth,
    ResponseTooLarge,
    ServerUnavailable,
    SmartBackendAuth,
    TransactionMismatch,
    discover_token_url,
)

TOKEN = "tok-4f1c9a7e-secret"
AUTH = f"Bearer {TOKEN}"


def searchset(*resources: dict, next_url: str | None = None) -> dict:
    b = {"resourceType": "Bundle", "type": "searchset",
         "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        b["link"] = [{"relation": "next", "url": next_url}]
    return b


def obs(i: str) -> dict:
    return {"resourceType": "Observation", "id": i, "status": "final", "code": {"text": "x"}}


def authorization(request: dict) -> str | None:
    return {k.lower(): v for k, v in request["headers"].items()}.get("authorization")


@pytest.fixture
def two(tmp_path: Path):
    """Two loopback servers on two ports: `a` is the FHIR server, `b` another origin."""
    a, b = LoopbackServer(tmp_path / "a"), LoopbackServer(tmp_path / "b")
    with a, b:
        yield a, b


def client(server: LoopbackServer, **kw) -> FhirClient:
    return FhirClient(server.base, auth=BearerAuth(TOKEN), max_retries=0, **kw)


# ----------------------------------------------------------------------------- next links


def test_next_link_to_another_port_is_refused_and_the_other_server_sees_nothing(two) -> None:
    a, b = two
    a.route("GET", "/fhir/Observation", json=searchset(obs("1"), next_url=f"{b.base}/Observation?page=2"))
    b.route("GET", "/fhir/Observation", json=searchset(obs("2")))
    with pytest.raises(CrossOriginRefused, match=r"next link points at another origin \(http://127.0.0.1:\d+\)"):
        client(a).search("Observation", {"patient": "p1"})
    assert [authorization(r) for r in a.requests()] == [AUTH]
    assert b.requests() == []


def test_same_origin_next_link_keeps_the_credentials(two) -> None:
    a, _ = two
    a.route("GET", "/fhir/Observation", json=searchset(obs("1"), next_url="/fhir/Observation?page=2"))
    a.route("GET", "/fhir/Observation?page=2", json=searchset(obs("2")))
    result = client(a).search("Observation", {"patient": "p1"})
    assert [r["id"] for r in result.matches] == ["1", "2"]
    assert [authorization(r) for r in a.requests()] == [AUTH, AUTH]


def test_pull_with_a_cross_origin_next_link_fails_with_one_clear_error(two, monkeypatch) -> None:
    a, b = two
    a.route("GET", "/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    a.route("GET", "/fhir/Procedure", json=searchset(next_url=f"{b.base}/Procedure?page=2"))
    monkeypatch.setenv("FHIR_CRS_TOKEN", TOKEN)
    r = CliRunner().invoke(cli, ["pull", "--patient", "p1", "--server", a.base, "--auth", "bearer"])
    assert r.exit_code == 4
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another origin" in lines[0] and TOKEN not in r.stderr
    assert b.requests() == []


# ----------------------------------------------------------------------------- redirects


def test_redirect_to_another_port_is_refused_on_the_fhir_api(two) -> None:
    a, b = two
    a.route("GET", "/fhir/Patient/p1", status=302, headers={"Location": f"{b.base}/Patient/p1"})
    b.route("GET", "/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    with pytest.raises(CrossOriginRefused, match="redirect"):
        client(a).read("Patient", "p1")
    assert b.requests() == []


def test_same_origin_redirect_is_followed_with_credentials(two) -> None:
    a, _ = two
    a.route("GET", "/fhir/Patient/old", status=301, headers={"Location": "/fhir/Patient/p1"})
    a.route("GET", "/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    assert client(a).read("Patient", "old")["id"] == "p1"
    assert [authorization(r) for r in a.requests()] == [AUTH, AUTH]


def test_writes_are_never_redirected(two) -> None:
    a, b = two
    a.route("POST", "/fhir", status=307, headers={"Location": f"{b.base}"})
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    with pytest.raises(CrossOriginRefused, match="writes are never redirected"):
        client(a).transaction(tx)
    assert b.requests() == []


def test_redirect_of_a_bulk_file_to_storage_drops_the_credentials(two) -> None:
    a, b = two
    a.route("GET", "/files/obs.ndjson", status=307, headers={"Location": f"{b.origin}/bucket/obs.ndjson?sig=x"})
    b.route("GET", "/bucket/obs.ndjson", body=json.dumps(obs("1")) + "\n")
    resp = client(a).get_url(f"{a.origin}/files/obs.ndjson", stream=True, foreign=True)
    assert resp.content.strip() == json.dumps(obs("1")).encode()
    assert [authorization(r) for r in a.requests()] == [AUTH]
    assert [authorization(r) for r in b.requests()] == [None]


# ----------------------------------------------------------------------------- Bulk Data


def manifest(files_origin: str, requires: bool) -> dict:
    return {"transactionTime": "2026-01-01T00:00:00Z", "request": "x", "requiresAccessToken": requires,
            "output": [{"type": "Observation", "url": f"{files_origin}/bucket/obs.ndjson"}], "error": []}


def bulk_server(a: LoopbackServer, b: LoopbackServer, requires: bool, status_origin: str | None = None) -> None:
    a.route("GET", "/fhir/Patient/$export", status=202,
            headers={"Content-Location": f"{status_origin or a.origin}/fhir/status/1"})
    a.route("GET", "/fhir/status/1", json=manifest(b.origin, requires))
    a.route("DELETE", "/fhir/status/1", status=202)
    b.route("GET", "/bucket/obs.ndjson", body="\n".join(json.dumps(obs(str(i))) for i in range(3)) + "\n")


def test_bulk_file_on_another_origin_without_token_when_the_manifest_says_so(two) -> None:
    a, b = two
    bulk_server(a, b, requires=False)
    _, items = BulkExport(client(a), sleep=lambda s: None).run()
    assert [r["id"] for _, r in items] == ["0", "1", "2"]
    assert all(authorization(r) == AUTH for r in a.requests())
    assert [authorization(r) for r in b.requests()] == [None]


def test_bulk_file_on_another_origin_needing_the_token_is_refused(two) -> None:
    a, b = two
    bulk_server(a, b, requires=True)
    _, items = BulkExport(client(a), sleep=lambda s: None).run()
    with pytest.raises(CrossOriginRefused, match="bulk_file_origins"):
        list(items)
    assert b.requests() == []


def test_bulk_file_origin_listed_by_the_user_gets_the_token(two) -> None:
    a, b = two
    bulk_server(a, b, requires=True)
    _, items = BulkExport(client(a, credential_origins=[b.origin]), sleep=lambda s: None).run()
    assert len(list(items)) == 3
    assert [authorization(r) for r in b.requests()] == [AUTH]


def test_bulk_manifest_without_requires_access_token_is_treated_as_true(two) -> None:
    a, b = two
    bulk_server(a, b, requires=True)
    doc = manifest(b.origin, True)
    del doc["requiresAccessToken"]
    a.route("GET", "/fhir/status/1", json=doc)
    _, items = BulkExport(client(a), sleep=lambda s: None).run()
    with pytest.raises(CrossOriginRefused, match="requiresAccessToken: true"):
        list(items)
    assert b.requests() == []


def test_bulk_file_on_plain_http_off_loopback_is_refused_before_sending(two, monkeypatch) -> None:
    a, _ = two
    c = client(a)

    def no_network(*args, **kwargs):
        raise AssertionError("a request was sent to a plain-http non-loopback file URL")

    monkeypatch.setattr(c.session, "request", no_network)
    for with_auth in (True, False):
        with pytest.raises(CrossOriginRefused, match="plain http"):
            c.get_url("http://files.example.org/bucket/obs.ndjson", stream=True, foreign=True, with_auth=with_auth)


def test_bulk_status_url_on_another_origin_is_refused(two) -> None:
    a, b = two
    bulk_server(a, b, requires=True, status_origin=b.origin)
    with pytest.raises(CrossOriginRefused, match="Content-Location"):
        BulkExport(client(a), sleep=lambda s: None).kickoff()
    assert b.requests() == []


def test_bulk_file_origins_setting_reaches_the_client(tmp_path: Path, monkeypatch) -> None:
    from fhir_crs.cli import make_client
    from fhir_crs.config import resolve

    cfg = tmp_path / "fhir-crs.toml"
    cfg.write_text('[fhir-crs]\nserver = "https://fhir.example.org/r4"\n'
                   'bulk_file_origins = ["https://files.example.org", "https://blob.example.net:8443"]\n')
    c = make_client(resolve({}, {}, cfg))
    assert c.credential_origins == {"https://fhir.example.org:443", "https://files.example.org:443",
                                    "https://blob.example.net:8443"}
    with pytest.raises(ConfigError, match="not an origin"):
        FhirClient("https://fhir.example.org/r4", credential_origins=["https://files.example.org/bucket"])


# ----------------------------------------------------------------------------- https only


@pytest.mark.parametrize("url", ["http://fhir.example.org/r4", "http://10.1.2.3:8080/fhir", "http://[2001:db8::1]/fhir"])
def test_plain_http_off_loopback_is_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ConfigError, match="--allow-insecure-http"):
        FhirClient(url)
    assert FhirClient(url, allow_insecure_http=True).origin.startswith("http://")  # constructed; nothing sent


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/fhir", "http://localhost/fhir", "http://[::1]:9/fhir",
                                 "https://fhir.example.org/r4"])
def test_https_and_loopback_http_are_accepted(url: str) -> None:
    FhirClient(url)


def test_cli_refuses_plain_http_server_before_any_request() -> None:
    r = CliRunner().invoke(cli, ["pull", "--patient", "p1", "--server", "http://fhir.example.org/r4"])
    assert r.exit_code == 2 and "http:// on a non-loopback address" in r.stderr
    r = CliRunner().invoke(cli, ["sync", "--server", "http://fhir.example.org/r4", "--allow-insecure-http",
                                 "--patients", "/nonexistent/list", "--state", "/nonexistent/x/state.sqlite"])
    assert "non-loopback" not in r.stderr  # accepted; fails later on the missing patient list, not the URL


def test_credentials_in_the_url_are_refused() -> None:
    with pytest.raises(ConfigError, match="user:password@"):
        FhirClient("https://user:pw@fhir.example.org/r4")


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fhir-crs test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_is_verified_and_a_private_ca_is_configured_not_switched_off(tmp_path: Path, monkeypatch) -> None:
    cert, key = self_signed(tmp_path)
    with LoopbackServer(tmp_path / "tls", tls=(cert, key)) as srv:
        srv.route("GET", "/fhir/metadata", json={"resourceType": "CapabilityStatement"})
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        with pytest.raises(ServerUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            FhirClient(srv.base, max_retries=0).capabilities()
        assert FhirClient(srv.base, ca_bundle=str(cert)).capabilities()["resourceType"] == "CapabilityStatement"
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        assert FhirClient(srv.base).capabilities()["resourceType"] == "CapabilityStatement"
    with pytest.raises(ConfigError, match="ca_bundle"):
        FhirClient("https://fhir.example.org/r4", ca_bundle=str(tmp_path / "missing.pem"))


def test_no_switch_turns_tls_verification_off() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "fhir_crs").rglob("*.py")
                 if "verify=False" in p.read_text() or "CERT_NONE" in p.read_text()]
    assert offenders == []


# ----------------------------------------------------------------------------- SMART


def test_smart_discovery_only_on_the_fhir_base_origin(two) -> None:
    a, b = two
    with pytest.raises(ConfigError, match="not on the FHIR server's origin"):
        discover_token_url(client(a), b.base)
    assert b.requests() == []


def test_smart_discovery_redirect_to_another_origin_is_refused(two) -> None:
    a, b = two
    a.route("GET", "/fhir/.well-known/smart-configuration", status=302,
            headers={"Location": f"{b.base}/.well-known/smart-configuration"})
    b.route("GET", "/fhir/.well-known/smart-configuration", json={"token_endpoint": f"{b.origin}/token"})
    with pytest.raises(ConfigError, match="another origin"):
        discover_token_url(client(a))
    assert b.requests() == []
    assert [authorization(r) for r in a.requests()] == [None]  # discovery never carries the token


def test_smart_token_endpoint_must_be_https_unless_loopback(two) -> None:
    a, _ = two
    a.route("GET", "/fhir/.well-known/smart-configuration",
            json={"token_endpoint": "http://auth.example.org/token"})
    url = discover_token_url(client(a))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    sent: list[str] = []
    with pytest.raises(ConfigError, match="SMART token endpoint"):
        SmartBackendAuth("c", pem, url, alg="ES384", scope="system/*.rs", post_form=lambda u, d: sent.append(u))
    auth = SmartBackendAuth("c", pem, f"{a.origin}/token", alg="ES384", scope="system/*.rs", post_form=lambda u, d: (0, None))
    assert auth.token_url.startswith("http://127.0.0.1")
    assert sent == []


def test_token_endpoint_redirect_is_not_followed(two) -> None:
    a, b = two
    a.route("POST", "/auth/token", status=307, headers={"Location": f"{b.origin}/auth/token"})
    status, body = client(a).post_form(f"{a.origin}/auth/token", {"client_assertion": "eyJx.eyJy.z"})
    assert status == 307 and body is None
    assert b.requests() == []


# ----------------------------------------------------------------------------- caps


def test_oversized_response_is_refused(two) -> None:
    a, _ = two
    a.route("GET", "/fhir/Observation", json=searchset(*[obs(str(i)) for i in range(2000)]))
    with pytest.raises(ResponseTooLarge, match="larger than 10,000 bytes"):
        client(a, max_response_bytes=10_000).search("Observation")
    assert len(client(a).search("Observation").matches) == 2000


def test_gzip_bomb_as_content_encoding_stops_at_the_response_cap(two) -> None:
    a, _ = two
    bomb = gzip.compress(b" " * (50 * 1024 * 1024))  # 50 MB of blanks in ~50 KB
    a.route("GET", "/fhir/metadata", body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/fhir+json"})
    with pytest.raises(ResponseTooLarge):
        client(a, max_response_bytes=1024 * 1024).capabilities()


def test_page_count_cap(two) -> None:
    a, _ = two
    a.route("GET", "/fhir/Observation", json=searchset(obs("1"), next_url="/fhir/Observation?page=2"))
    a.route("GET", "/fhir/Observation?page=2", json=searchset(obs("2"), next_url="/fhir/Observation?page=3"))
    with pytest.raises(ResponseTooLarge, match="more than 2 pages"):
        client(a, max_pages=2).search("Observation")


@pytest.mark.parametrize("encoding", ["content-encoding", "gzip-file"])
def test_gzipped_bulk_file_is_read_and_a_decompression_bomb_refused(two, encoding: str) -> None:
    a, b = two
    bulk_server(a, b, requires=False)
    lines = ("\n".join(json.dumps(obs(str(i))) for i in range(500)) + "\n").encode()
    headers = {"Content-Encoding": "gzip"} if encoding == "content-encoding" else {"Content-Type": "application/gzip"}
    b.route("GET", "/bucket/obs.ndjson", body=gzip.compress(lines), headers=headers)
    m, items = BulkExport(client(a), sleep=lambda s: None).run()
    assert len(list(items)) == 500
    b.route("GET", "/bucket/obs.ndjson", body=gzip.compress(lines + b" " * (64 * 1024 * 1024) + b"\n"), headers=headers)
    with pytest.raises(BulkExportError, match="decompression bomb"):
        list(BulkExport(client(a), sleep=lambda s: None).iter_resources(m))
    with pytest.raises(BulkExportError, match="max_bulk_file_mb"):
        list(BulkExport(client(a), max_file_bytes=10_000, sleep=lambda s: None).iter_resources(m))


def test_overlong_ndjson_line_is_refused(two) -> None:
    a, b = two
    bulk_server(a, b, requires=False)
    b.route("GET", "/bucket/obs.ndjson", body=b'{"resourceType":"Observation","x":"' + b"y" * 300_000 + b'"}\n')
    _, items = BulkExport(client(a), max_line_bytes=100_000, sleep=lambda s: None).run()
    with pytest.raises(BulkExportError, match="line 1 is longer"):
        list(items)


# ----------------------------------------------------------------------------- write path


def tx_bundle() -> dict:
    cond = {"resourceType": "Condition", "identifier": [{"system": "urn:fhir-crs:case", "value": "p1-crs"}],
            "subject": {"reference": "Patient/p1"}}
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": cond, "request": {"method": "PUT", "url": "Condition?identifier=urn:fhir-crs:case|p1-crs"}}]}


@pytest.mark.parametrize(("answer", "why"), [
    ({"resourceType": "Bundle", "type": "transaction-response", "entry": []}, "1 entries sent, 0 answered"),
    ({"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": "Patient/p2/_history/1"}}]}, "sent Condition, answered Patient/p2"),
    ({"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": "Condition/c9/_history/1"},
         "resource": {"resourceType": "Condition", "id": "c9", "identifier": [{"system": "urn:fhir-crs:case", "value": "p7-crs"}],
                      "subject": {"reference": "Patient/p7"}}}]}, "does not carry the identifier"),
    ({"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": "Condition/c9/_history/1"},
         "resource": {"resourceType": "Condition", "id": "c9", "identifier": [{"system": "urn:fhir-crs:case", "value": "p1-crs"}],
                      "subject": {"reference": "Patient/p7"}}}]}, "another subject"),
    ({"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": "http://127.0.0.1:1/fhir/Condition/c9"}}]}, "another origin"),
    ({"resourceType": "Bundle", "type": "searchset", "entry": []}, "expected a transaction-response"),
])
def test_transaction_answered_with_someone_elses_resources_is_detected(two, answer: dict, why: str) -> None:
    a, _ = two
    a.route("POST", "/fhir", json=answer)
    with pytest.raises(TransactionMismatch, match=why):
        client(a).transaction(tx_bundle())


def test_sync_against_a_server_answering_with_other_resources_reports_and_keeps_no_state(fhir_server, tmp_path) -> None:
    """Reads are proxied to the real server; the write is answered with another patient's
    Condition. The run reports the patient, exits 1, and records nothing in the state store."""
    import sqlite3

    from conftest import load_vignette

    pid = load_vignette(FhirClient(fhir_server.base, auth=NoAuth()), "V06")
    with LoopbackServer(tmp_path / "proxy") as proxy:
        proxy.proxy(fhir_server.base)
        bogus = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "location": f"Patient/someone-else/_history/{i}"}} for i in (1, 2, 3)]}
        # As many entries as the write sends (Condition, summary Bundle, Provenance), so the count
        # check passes and the type check is the one that must catch it.
        proxy.route("POST", "/fhir", json=bogus)
        listing, state = tmp_path / "patients.txt", tmp_path / "state" / "state.sqlite"
        listing.write_text(pid + "\n")
        r = CliRunner().invoke(cli, ["sync", "--server", proxy.base, "--patients", str(listing), "--state", str(state),
                                     "--json"])
    assert r.exit_code == 1, r.stderr
    data = json.loads(r.stdout)
    assert len(data["errors"]) == 1 and data["errors"][0]["patient"] == f"Patient/{pid}"
    assert "does not match what was sent" in data["errors"][0]["error"]
    assert "answered Patient/someone-else" in data["errors"][0]["error"]
    assert data["written"] == {"Condition": 0, "Bundle": 0}
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT COUNT(*) FROM patient_state").fetchone()[0] == 0


def _ec_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


@pytest.mark.parametrize("key", ["token_file", "password_file", "private_key_file"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_secret_files_readable_by_others_are_refused(tmp_path: Path, key: str, mode: int) -> None:
    from fhir_crs.config import resolve
    from fhir_crs.fhir.smart import smart_auth_from_config

    secret = tmp_path / key
    secret.write_text(_ec_pem() if key == "private_key_file" else TOKEN)
    secret.chmod(mode)
    cfg = resolve({key: str(secret)}, {}, None, tmp_path)
    cfg = cfg.model_copy(update={"client_id": "c", "jwt_alg": "ES384", "token_url": "https://auth.example.org/token"})

    def read() -> object:
        if key == "token_file":
            return cfg.secret_token()
        if key == "password_file":
            return cfg.secret_password()
        return smart_auth_from_config(cfg, env={}, clock=lambda: 0.0).token_url  # parses the key; sends nothing

    with pytest.raises(ConfigError, match=f"{key} .* is accessible by other users .*chmod 600"):
        read()
    secret.chmod(0o600)
    assert read() in (TOKEN, "https://auth.example.org/token")


def test_cli_refuses_a_token_file_others_can_read_before_any_request(two, tmp_path: Path, monkeypatch) -> None:
    a, _ = two
    tok = tmp_path / "token"
    tok.write_text(TOKEN)
    tok.chmod(0o644)
    monkeypatch.delenv("FHIR_CRS_TOKEN", raising=False)
    r = CliRunner().invoke(cli, ["pull", "--patient", "p1", "--server", a.base, "--auth", "bearer",
                                 "--token-file", str(tok)])
    assert r.exit_code == 2 and "chmod 600" in r.stderr and TOKEN not in r.stderr
    assert a.requests() == []



# ----------------------------------------------------------------------------- log-hash


def test_log_hash_prints_the_hash_that_sync_logs_show_instead_of_the_id(two, tmp_path: Path, monkeypatch) -> None:
    """`sync` hashes patient ids by default; `fhir-crs log-hash ID` finds that patient's lines."""
    a, _ = two  # every request answers 404: the patient fails, and its id is in the log lines
    pid = "crs-kid-4711"
    listing, state = tmp_path / "patients.txt", tmp_path / "nightly" / "state.sqlite"
    listing.write_text(pid + "\n")
    monkeypatch.setenv("FHIR_CRS_TOKEN", TOKEN)
    r = CliRunner().invoke(cli, ["-v", "sync", "--server", a.base, "--auth", "bearer", "--patients", str(listing),
                                 "--state", str(state), "--json"])
    assert r.exit_code == 1, r.stderr
    assert json.loads(r.stdout)["errors"][0]["patient"] == f"Patient/{pid}"  # the summary names the patient ...
    assert pid not in r.stderr  # ... the log lines do not

    out = CliRunner().invoke(cli, ["log-hash", "--state", str(state), pid, f"Patient/{pid}"])
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    digest = lines[0].split("\t")[1]
    assert lines == [f"{pid}\t{digest}"] * 2 and len(digest) == 13 and digest.startswith("~")
    assert f"Patient/{digest}" in r.stderr  # the lines of that patient, found by the printed hash
    # another installation's key (another state folder) gives another hash: nobody else can map back
    other = tmp_path / "other"
    other.mkdir()
    (other / "log-key").write_bytes(b"k" * 32)
    elsewhere = CliRunner().invoke(cli, ["log-hash", "--state", str(other / "state.sqlite"), pid])
    assert elsewhere.exit_code == 0 and elsewhere.stdout.split("\t")[1].strip() != digest


def test_log_hash_without_a_key_or_with_a_bad_id_exits_2_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FHIR_CRS_STATE_PATH", str(tmp_path / "fresh" / "state.sqlite"))
    r = CliRunner().invoke(cli, ["log-hash", "p1"])
    assert r.exit_code == 2 and "no log-hash key" in r.stderr
    assert not (tmp_path / "fresh").exists()
    r = CliRunner().invoke(cli, ["log-hash", "--state", str(tmp_path / "s.sqlite"), "not an id"])
    assert r.exit_code == 2 and "not a FHIR logical id" in r.stderr
