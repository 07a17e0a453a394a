"""`fhir-crs serve`, SMART side: EHR and standalone launches against the embedded FHIR server
(behind a recording loopback proxy that serves its SMART configuration) and a local Authlib
authorization server, each a process on 127.0.0.1 killed by PID; the full EHR launch is also
driven in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from conftest import ROOT, load_vignette
from loopback import LoopbackServer, free_port
from test_serve_cds import Serve

from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.pipeline import grade_paths
from fhir_crs.serve.smart_app import COOKIE, missing_reads

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CLIENT_ID = "fhir-crs-test"


class AuthServer:
    def __init__(self, workdir: Path, aud: str, redirect_uri: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "authz.json"
        self.log = workdir / "tokens.jsonl"
        self.cfg: dict[str, Any] = {"port": self.port, "issuer": self.origin, "aud": aud, "log": str(self.log),
                                    "clients": [{"client_id": CLIENT_ID, "redirect_uris": [redirect_uri]}],
                                    "launches": {}, "standalone_patient": None}
        self.write()
        self._err = (workdir / "authz.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "smart_authz.py"), str(self.config)],
                                     stdout=self._err, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.origin}/jwks", timeout=1)
                return
            except requests.RequestException:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError((workdir / "authz.log").read_text())

    def write(self) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cfg))
        tmp.replace(self.config)

    def launch(self, name: str, patient: str, **extra: Any) -> str:
        self.cfg["launches"][name] = {"patient": patient, **extra}
        self.write()
        return name

    def token_requests(self) -> list[dict[str, str]]:
        return [json.loads(x) for x in self.log.read_text().splitlines()] if self.log.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self._err.close()


@pytest.fixture(scope="module")
def ids(sekmet_server) -> dict[str, str]:
    client = FhirClient(sekmet_server.base, auth=NoAuth())
    return {v: load_vignette(client, v) for v in ("V20", "V06")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sekmet_server):
    """(serve, fhir proxy with SMART configuration, authorization server)."""
    work = tmp_path_factory.mktemp("smart")
    fhir = LoopbackServer(work / "fhir").start()
    fhir.proxy(sekmet_server.base)
    serve_port = free_port()
    authz = AuthServer(work / "authz", fhir.base, f"http://127.0.0.1:{serve_port}/callback")
    fhir.route("GET", "/fhir/.well-known/smart-configuration", json={
        "issuer": authz.origin, "authorization_endpoint": f"{authz.origin}/authorize",
        "token_endpoint": f"{authz.origin}/token", "jwks_uri": f"{authz.origin}/jwks",
        "code_challenge_methods_supported": ["S256"], "capabilities": ["launch-ehr", "launch-standalone", "client-public"]})
    try:
        serve = Serve(work / "serve", "--allow-fhir-server", fhir.base, "--smart-client-id", CLIENT_ID, port=serve_port)
        try:
            yield serve, fhir, authz
        finally:
            serve.stop()
    finally:
        authz.stop()
        fhir.stop()


def test_ehr_launch_ends_on_the_patients_timeline(stack, ids):
    serve, fhir, authz = stack
    pid = ids["V20"]
    launch = authz.launch("L-ok", pid)
    browser = requests.Session()
    first = browser.get(f"{serve.base}/launch", params={"iss": fhir.base, "launch": launch}, allow_redirects=False, timeout=30)
    assert first.status_code == 302
    query = parse_qs(urlsplit(first.headers["Location"]).query)
    assert query["code_challenge_method"] == ["S256"] and query["aud"] == [fhir.base] and query["launch"] == [launch]
    assert query["scope"] == ["launch patient/*.read openid fhirUser"] and query["client_id"] == [CLIENT_ID]
    assert "HttpOnly" in first.headers["set-cookie"] and "SameSite=lax" in first.headers["set-cookie"]
    before = len(fhir.requests())
    page = browser.get(first.headers["Location"], timeout=60)
    assert page.status_code == 200, page.text
    assert page.url == f"{serve.base}/app"
    assert "Sam VignetteV20" in page.text and "CRS · ASTCT" in page.text and "Criteria and evidence" in page.text
    (case,) = grade_paths([ROOT / "fixtures" / "R4" / "vignettes" / "V20.json"])["cases"]
    assert case["crs"]["astct"]["criteria"][-1]["criterion"] in page.text
    (tok,) = authz.token_requests()
    assert tok["grant_type"] == "authorization_code" and len(tok["code_verifier"]) >= 43
    reads = fhir.requests()[before:]
    token = reads[-1]["headers"]["Authorization"]
    assert token.startswith("Bearer at-") and token.removeprefix("Bearer ") not in page.text
    assert all(r["headers"].get("Authorization") == token for r in reads if r["path"] != "/fhir/.well-known/smart-configuration")
    assert token.removeprefix("Bearer ") not in serve.log_path.read_text()
    # the page of another patient is refused; the session's own patient is served again
    other = browser.get(f"{serve.base}/app", params={"patient": ids["V06"]}, timeout=30)
    assert other.status_code == 403 and "outside the launch context" in other.text
    assert browser.get(f"{serve.base}/app", params={"patient": f"Patient/{pid}"}, timeout=60).status_code == 200


def test_standalone_launch_asks_launch_patient(stack, ids):
    serve, fhir, authz = stack
    authz.cfg["standalone_patient"] = ids["V06"]
    authz.write()
    browser = requests.Session()
    first = browser.get(f"{serve.base}/launch", params={"iss": fhir.base}, allow_redirects=False, timeout=30)
    assert parse_qs(urlsplit(first.headers["Location"]).query)["scope"] == ["launch/patient patient/*.read openid fhirUser"]
    page = browser.get(first.headers["Location"], timeout=60)
    assert page.status_code == 200 and "VignetteV06" in page.text and "CRS · ASTCT" in page.text


def test_wrong_state_is_refused(stack, ids):
    serve, fhir, authz = stack
    launch = authz.launch("L-state", ids["V20"])
    browser = requests.Session()
    first = browser.get(f"{serve.base}/launch", params={"iss": fhir.base, "launch": launch}, allow_redirects=False, timeout=30)
    to_callback = browser.get(first.headers["Location"], allow_redirects=False, timeout=30)
    callback = urlsplit(to_callback.headers["Location"])
    code = parse_qs(callback.query)["code"][0]
    n_tokens = len(authz.token_requests())
    bad = browser.get(f"{serve.base}/callback", params={"code": code, "state": "forged"}, timeout=30)
    assert bad.status_code == 400 and "state does not match" in bad.text
    # the right state from another browser (no session cookie) is refused too
    stranger = requests.get(to_callback.headers["Location"], timeout=30)
    assert stranger.status_code == 400
    assert len(authz.token_requests()) == n_tokens  # no token was asked for
    assert browser.get(f"{serve.base}/app", timeout=30).status_code == 401


def test_state_is_single_use(stack, ids):
    """A callback URL replayed in the same browser (history, a leaked Referer) starts nothing."""
    serve, fhir, authz = stack
    launch = authz.launch("L-once", ids["V20"])
    browser = requests.Session()
    first = browser.get(f"{serve.base}/launch", params={"iss": fhir.base, "launch": launch}, allow_redirects=False, timeout=30)
    callback = browser.get(first.headers["Location"], allow_redirects=False, timeout=30).headers["Location"]
    ok = browser.get(callback, allow_redirects=False, timeout=60)
    assert ok.status_code == 303 and ok.headers["Location"] == "/app"
    n_tokens = len(authz.token_requests())
    again = browser.get(callback, allow_redirects=False, timeout=30)
    assert again.status_code == 400 and "state does not match" in again.text
    assert len(authz.token_requests()) == n_tokens
    query = parse_qs(urlsplit(callback).query)
    log = serve.log_path.read_text()  # no access log: the code and state of the redirect are not in it
    assert query["code"][0] not in log and query["state"][0] not in log and "/callback" not in log


@pytest.mark.parametrize(("change", "reason"), [
    ({"id_token_nonce": "nonce-of-another-launch"}, "the id_token's nonce does not match this launch"),
    ({"id_token_aud": ["another-client"]}, "the id_token is not valid (InvalidAudienceError)"),
    ({"id_token_iss": "https://other-issuer.example"}, "the id_token is not valid (InvalidIssuerError)"),
    ({"id_token_key": "other"}, "the id_token is not valid (InvalidSignatureError)"),
])
def test_id_token_substitution_is_refused(stack, ids, change, reason):
    """An id_token minted for another launch (nonce), another client (aud), by another issuer, or
    signed by a key the server does not publish ends the launch: no session, no patient read."""
    serve, fhir, authz = stack
    launch = authz.launch(f"L-idt-{next(iter(change))}", ids["V20"], **change)
    browser = requests.Session()
    before = len(fhir.requests())
    page = browser.get(f"{serve.base}/launch", params={"iss": fhir.base, "launch": launch}, timeout=60)
    assert page.status_code == 403 and reason in page.text
    assert [r["path"] for r in fhir.requests()[before:]] == ["/fhir/.well-known/smart-configuration"]
    assert browser.get(f"{serve.base}/app", timeout=30).status_code == 401


def test_missing_scope_is_refused(stack, ids):
    serve, fhir, authz = stack
    launch = authz.launch("L-noscope", ids["V20"], scope="launch openid fhirUser patient/Patient.read")
    page = requests.Session().get(f"{serve.base}/launch", params={"iss": fhir.base, "launch": launch}, timeout=60)
    assert page.status_code == 403
    assert "does not let the app read Observation, MedicationAdministration, Procedure" in page.text


def test_expired_token_ends_the_session(stack, ids):
    serve, fhir, authz = stack
    launch = authz.launch("L-short", ids["V20"], expires_in=2)
    browser = requests.Session()
    assert browser.get(f"{serve.base}/launch", params={"iss": fhir.base, "launch": launch}, timeout=60).status_code == 200
    time.sleep(2.2)
    page = browser.get(f"{serve.base}/app", timeout=30)
    assert page.status_code == 401 and "expired" in page.text


def test_launch_refusals_fetch_nothing(stack, tmp_path):
    serve = stack[0]
    with LoopbackServer(tmp_path / "other") as other:
        page = requests.get(f"{serve.base}/launch", params={"iss": other.base, "launch": "x"}, timeout=30)
        assert page.status_code == 400 and "not on the app's allow-list" in page.text
        assert other.requests() == []
    assert requests.get(f"{serve.base}/launch", timeout=30).status_code == 400
    assert requests.get(f"{serve.base}/app", timeout=30).status_code == 401
    assert requests.get(f"{serve.base}/app", cookies={COOKIE: "guessed"}, timeout=30).status_code == 401


def test_scope_rules():
    assert missing_reads("launch patient/*.read openid") == []
    assert missing_reads("patient/*.rs") == []
    assert missing_reads("patient/*.cruds") == []
    assert missing_reads("patient/Patient.read patient/Observation.rs patient/MedicationAdministration.read patient/Procedure.read") == []
    assert missing_reads("user/*.read") == ["Patient", "Observation", "MedicationAdministration", "Procedure"]
    assert missing_reads("patient/*.c") == ["Patient", "Observation", "MedicationAdministration", "Procedure"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_ehr_launch_in_headless_chromium(stack, ids, tmp_path):
    serve, fhir, authz = stack
    launch = authz.launch("L-chromium", ids["V20"])
    url = f"{serve.base}/launch?iss={fhir.base}&launch={launch}"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'<h1 class="patient">Sam VignetteV20', dom.stdout), dom.stdout[:2000]
    assert "CRS · ASTCT" in dom.stdout and "ICANS · ASTCT" in dom.stdout and "<svg" in dom.stdout
    token = fhir.requests()[-1]["headers"]["Authorization"].removeprefix("Bearer ")
    assert token.startswith("at-") and token not in dom.stdout
    launch2 = authz.launch("L-chromium-shot", ids["V20"])
    shot = tmp_path / "app.png"
    result = subprocess.run([*args, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars",
                             f"{serve.base}/launch?iss={fhir.base}&launch={launch2}"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and shot.is_file() and shot.stat().st_size > 30_000, result.stderr[-2000:]
