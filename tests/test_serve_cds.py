"""`fhir-crs serve`, CDS Hooks side: the real service started on 127.0.0.1 (killed by PID) against
the embedded FHIR server, with loopback servers in front of it to see and script what is fetched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import factory
import jsonschema
import pytest
import requests
from conftest import ROOT, load_vignette
from hypothesis import given, settings
from hypothesis import strategies as st
from loopback import LoopbackServer, free_port

from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.pipeline import grade_paths
from fhir_crs.serve.cds import PREFETCH
from fhir_crs.serve.schemas import CDS_REQUEST, CDS_RESPONSE, DISCOVERY, ERROR

pytestmark = pytest.mark.integration
VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"
SERVICE = "fhir-crs-crs-grade"
TOKEN = "hook-token-7f3a9c"


class Serve:
    """`fhir-crs serve` as a child process on a free port."""

    def __init__(self, workdir: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "serve.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "fhir_crs", "serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fhir-crs serve exited: {self.log_path.read_text()}")
            try:
                if requests.get(f"{self.base}/cds-services", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fhir-crs serve did not start: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def hook(self, body: Any, service: str = SERVICE) -> requests.Response:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return requests.post(f"{self.base}/cds-services/{service}", data=data,
                             headers={"Content-Type": "application/json"}, timeout=60)


@pytest.fixture(scope="module")
def loaded(sekmet_server) -> dict[str, str]:
    client = FhirClient(sekmet_server.base, auth=NoAuth())
    ids = {v: load_vignette(client, v) for v in ("V20", "V06")}
    client.put("Patient/no-cart-1", {"resourceType": "Patient", "id": "no-cart-1", "birthDate": "1970-01-01"})
    return ids


@pytest.fixture(scope="module")
def front(tmp_path_factory, sekmet_server):
    """A recording proxy in front of the embedded server (an allowed fhirServer)."""
    with LoopbackServer(tmp_path_factory.mktemp("front")) as server:
        server.proxy(sekmet_server.base)
        yield server


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A server that is on no allow-list: it must never receive a request."""
    with LoopbackServer(tmp_path_factory.mktemp("foreign")) as server:
        yield server


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    """An allowed server that answers 500 to everything."""
    with LoopbackServer(tmp_path_factory.mktemp("failing")) as server:
        server.route("GET", "/fhir/Patient/p500", status=500, json={"resourceType": "OperationOutcome", "issue": [
            {"severity": "fatal", "code": "exception", "diagnostics": "database down"}]})
        yield server


@pytest.fixture(scope="module")
def serve(tmp_path_factory, sekmet_server, front, failing):
    s = Serve(tmp_path_factory.mktemp("serve"), "--server", sekmet_server.base, "--allow-fhir-server", front.base,
              "--allow-fhir-server", failing.base + "/")
    try:
        yield s
    finally:
        s.stop()


def prefetch_from(server_base: str, pid: str, keys: list[str] | None = None) -> dict[str, Any]:
    """What an EHR would prefetch with the service's templates (read from the server)."""
    out = {}
    for key, template in PREFETCH.items():
        if keys is not None and key not in keys:
            continue
        query = template.replace("{{context.patientId}}", pid)
        out[key] = requests.get(f"{server_base}/{query}" + ("&_count=1000" if "?" in query else ""),
                                headers={"Accept": "application/fhir+json"}, timeout=60).json()
        assert not any(link["relation"] == "next" for link in out[key].get("link", [])), key
    return out


def request(pid: str, **extra: Any) -> dict[str, Any]:
    body = {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/example", "patientId": pid}, **extra}
    jsonschema.validate(body, CDS_REQUEST)
    return body


def cards_of(resp: requests.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    jsonschema.validate(data, CDS_RESPONSE)
    return data["cards"]


def grade_card(cards: list[dict[str, Any]]) -> dict[str, Any]:
    (card,) = [c for c in cards if c["summary"].startswith("CAR-T")]
    return card


def offline(vignette: str) -> dict[str, Any]:
    (case,) = grade_paths([VIGNETTES / f"{vignette}.json"])["cases"]
    return case


def test_discovery_lists_the_one_service_with_its_prefetch(serve):
    resp = requests.get(f"{serve.base}/cds-services", timeout=10)
    data = resp.json()
    jsonschema.validate(data, DISCOVERY)
    (service,) = data["services"]
    assert service["id"] == SERVICE and service["hook"] == "patient-view"
    assert set(service["prefetch"]) == {"patient", "procedures", "medications", "vitals", "labs", "assessments", "conditions"}
    assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert "category=vital-signs" in service["prefetch"]["vitals"] and "category=laboratory" in service["prefetch"]["labs"]


def test_openapi_describes_the_service(serve):
    spec = requests.get(f"{serve.base}/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    assert {"/cds-services", "/cds-services/{service_id}"} <= set(spec["paths"])
    post = spec["paths"]["/cds-services/{service_id}"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["required"] == ["hook", "hookInstance", "context"]
    assert {"200", "400", "404", "412"} <= set(post["responses"])


def test_prefetch_only_grades_like_the_offline_path(serve, sekmet_server, loaded, front):
    pid = loaded["V20"]
    body = request(pid, prefetch=prefetch_from(sekmet_server.base, pid))
    before = len(front.requests())
    card = grade_card(cards_of(serve.hook(body)))
    want = offline("V20")
    crs, icans = want["crs"]["astct"], want["icans"]["astct"]
    assert card["summary"] == (f"CAR-T (day 0 {want['infusion'][:10]}): CRS grade {crs['grade']}, "
                               f"ICANS grade {icans['grade']} (ASTCT)")
    assert card["indicator"] == "critical"  # grade 5 candidate
    assert "grade5_candidate" in card["detail"]
    driving = next(c for c in crs["criteria"] if c["grade"] == crs["grade"])
    assert f"driven by: {driving['criterion']}" in card["detail"]
    for ref in driving["evidence"]:
        assert ref.split("/")[0] in card["detail"]
    assert "| Lee 2014 |" in card["detail"] and "| CTCAE v5 |" in card["detail"]
    assert "Data: prefetch (patient, procedures, medications, vitals, labs, assessments, conditions)." in card["detail"]
    (link,) = card["links"]
    assert link["type"] == "smart" and link["url"] == f"{serve.base}/launch"
    assert len(front.requests()) == before  # nothing fetched anywhere


def test_server_only_reads_with_the_pull_path(serve, front, loaded):
    pid = loaded["V06"]
    before = len(front.requests())
    card = grade_card(cards_of(serve.hook(request(pid, fhirServer=front.base, fhirAuthorization={
        "access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read", "subject": "cds"}))))
    want = offline("V06")
    assert f"CRS grade {want['crs']['astct']['grade']}, ICANS grade {want['icans']['astct']['grade']}" in card["summary"]
    assert "read from the FHIR server (patient, procedures, medications, vitals, labs, assessments, conditions)" in card["detail"]
    sent = front.requests()[before:]
    assert sent and all(r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in sent)
    assert any(r["path"] == "/fhir/Observation" and "date=" in r["query"] for r in sent)  # windowed
    assert TOKEN not in serve.log_path.read_text()


def test_mixed_prefetch_reads_only_what_is_missing(serve, sekmet_server, front, loaded):
    pid = loaded["V20"]
    prefetch = prefetch_from(sekmet_server.base, pid, ["patient", "procedures", "medications", "vitals"])
    prefetch["labs"] = None  # the EHR could not prefetch it
    before = len(front.requests())
    card = grade_card(cards_of(serve.hook(request(pid, prefetch=prefetch, fhirServer=front.base, fhirAuthorization={
        "access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read", "subject": "cds"}))))
    want = offline("V20")
    assert f"CRS grade {want['crs']['astct']['grade']}, ICANS grade {want['icans']['astct']['grade']}" in card["summary"]
    sent = front.requests()[before:]
    obs = [r["query"] for r in sent if r["path"] == "/fhir/Observation"]
    assert obs and all("vital-signs" not in q for q in obs)
    assert any("category=laboratory" in q for q in obs) and any("survey" in q for q in obs)
    assert not any(r["path"].startswith("/fhir/Patient") or r["path"] == "/fhir/Procedure" for r in sent)


def test_a_first_page_only_prefetch_is_read_from_the_server(serve, sekmet_server, front, loaded):
    pid = loaded["V20"]
    prefetch = prefetch_from(sekmet_server.base, pid)
    prefetch["vitals"]["link"] = [{"relation": "next", "url": f"{front.base}/Observation?page=2"}]
    before = len(front.requests())
    cards_of(serve.hook(request(pid, prefetch=prefetch, fhirServer=front.base)))
    obs = [r["query"] for r in front.requests()[before:] if r["path"] == "/fhir/Observation"]
    assert obs and all("vital-signs" in q for q in obs)


def test_a_patient_without_car_t_gets_no_card(serve, sekmet_server, loaded):
    assert cards_of(serve.hook(request("no-cart-1", fhirServer=sekmet_server.base))) == []
    assert cards_of(serve.hook(request("no-cart-1", prefetch={
        "patient": {"resourceType": "Patient", "id": "no-cart-1"},
        **{k: {"resourceType": "Bundle", "type": "searchset"} for k in PREFETCH if k != "patient"}}))) == []


def test_rising_card_when_the_grade_went_up_in_the_last_24h(serve, monkeypatch):
    now = datetime.now(UTC).replace(microsecond=0)
    monkeypatch.setattr(factory, "T0", now - timedelta(hours=48))
    pid = "rise1"
    vitals = [*factory.vitals_baseline(until_h=47, every=4, pid=pid, skip={8.0, 40.0, 44.0}),
              factory.temp(8, 39.2, pid=pid), factory.temp(40, 39.0, pid=pid), factory.bp(40, 78, pid=pid),
              factory.bp(41, 80, pid=pid), factory.temp(44, 38.9, pid=pid), factory.bp(44, 82, pid=pid)]

    def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}

    prefetch = {"patient": factory.patient(pid), "procedures": bundle([factory.cart(0, pid=pid)]),
                "medications": bundle([]), "vitals": bundle(vitals), "labs": bundle([]), "assessments": bundle([])}
    cards = cards_of(serve.hook(request(pid, prefetch=prefetch)))
    assert [c["summary"] for c in cards] == ["Rising in the last 24 h: CRS grade 1 → 2",
                                             f"CAR-T (day 0 {factory.at(0)[:10]}): CRS grade 2, ICANS grade 0 (ASTCT)"]
    assert cards[0]["indicator"] == "warning" and "hypotension" in cards[0]["detail"]
    assert cards[1]["indicator"] == "warning"
    # the same course a week later: no longer rising
    monkeypatch.setattr(factory, "T0", now - timedelta(days=9))
    cards = cards_of(serve.hook(request(pid, prefetch={**prefetch, "procedures": bundle([factory.cart(0, pid=pid)]),
                                                       "vitals": bundle([factory.temp(8, 39.2, pid=pid)])})))
    assert [c["summary"][:5] for c in cards] == ["CAR-T"]


def test_a_problem_list_seizure_is_read_from_the_conditions_prefetch(serve):
    """`conditions` (Condition?patient=): a seizure charted only as a Condition grades ICANS as
    offline. An EHR registered before the key existed (no `conditions`, no fhirServer) still
    gets its grade, with a note on the card that Conditions were not read (never a silent gap)."""
    pid = "fit1"

    def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}

    seizure = {"resourceType": "Condition", "id": "fit1-sz", "subject": {"reference": f"Patient/{pid}"},
               "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91175000"}], "text": "Generalized seizure"},
               "onsetDateTime": factory.at(30)}
    prefetch = {"patient": factory.patient(pid), "procedures": bundle([factory.cart(0, pid=pid)]),
                "medications": bundle([]), "vitals": bundle(factory.vitals_baseline(until_h=60, every=4, pid=pid)),
                "labs": bundle([]), "assessments": bundle([])}
    with_conditions = grade_card(cards_of(serve.hook(request(pid, prefetch={**prefetch, "conditions": bundle([seizure])}))))
    assert with_conditions["summary"].endswith("CRS grade 0, ICANS grade 3 (ASTCT)"), with_conditions["summary"]
    assert "Condition/fit1-sz" in with_conditions["detail"] and "were not read" not in with_conditions["detail"]
    old_ehr = grade_card(cards_of(serve.hook(request(pid, prefetch=prefetch))))
    assert old_ehr["summary"].endswith("ICANS grade 0 (ASTCT)")
    assert "no prefetch 'conditions' and no fhirServer" in old_ehr["detail"] and "may be under-called" in old_ehr["detail"]


def _error(resp: requests.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    jsonschema.validate(resp.json(), ERROR)
    return resp.json()["error"]["message"]


@pytest.mark.parametrize(("change", "status", "text"), [
    (lambda b: b.pop("context"), 400, "context is missing"),
    (lambda b: b["context"].pop("patientId"), 400, "context.patientId"),
    (lambda b: b.update(hook="order-select"), 400, "'order-select' is not served here"),
    (lambda b: b.pop("hookInstance"), 400, "hookInstance"),
    (lambda b: b.update(prefetch={"vitals": "Observation?patient=1"}), 400, "prefetch.vitals is not a FHIR resource"),
    (lambda b: b.update(prefetch={"patient": {"resourceType": "Patient", "id": "someone-else"}}), 400, "not the Patient"),
    (lambda b: b.update(prefetch={"labs": {"resourceType": "Observation"}}), 400, "not a Bundle"),
    (lambda b: b.update(prefetch=[]), 400, "prefetch is not a JSON object"),
    (lambda b: b.update(fhirAuthorization={"access_token": TOKEN, "token_type": "Bearer"}), 400, "without fhirServer"),
    (lambda b: None, 412, "prefetch lacks patient, procedures"),
])
def test_bad_requests_get_the_spec_errors(serve, change, status, text):
    body = request("p1")
    change(body)
    assert text in _error(serve.hook(body), status)


def test_not_json_unknown_service_and_wrong_token_type(serve, front):
    assert "not JSON" in _error(serve.hook(b"{not json"), 400)
    assert "no CDS service" in _error(serve.hook(request("p1"), service="other-service"), 404)
    body = request("p1", fhirServer=front.base)
    body["fhirAuthorization"] = {"access_token": TOKEN, "token_type": "MAC"}
    assert "Bearer" in _error(serve.hook(body), 400)


def test_a_fhir_server_off_the_allow_list_is_refused_and_nothing_fetched(serve, foreign, loaded):
    body = request(loaded["V06"], fhirServer=foreign.base, fhirAuthorization={
        "access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read", "subject": "cds"})
    assert "not on this service's allow-list" in _error(serve.hook(body), 412)
    # a path on an allowed origin is not an allowed base either
    assert serve.hook(request(loaded["V06"], fhirServer=foreign.origin + "/other")).status_code == 412
    assert foreign.requests() == []


def test_the_token_never_leaves_the_fhir_servers_origin(tmp_path, serve, front, foreign, loaded, sekmet_server):
    """A next link to another origin is refused by the client: nothing is sent there, and the
    answer is a card saying grading failed."""
    pid = loaded["V06"]
    with LoopbackServer(tmp_path / "evil") as evil:
        evil.proxy(sekmet_server.base)
        evil.route("GET", "/fhir/Observation", json={"resourceType": "Bundle", "type": "searchset", "entry": [],
                                                     "link": [{"relation": "next", "url": f"{foreign.base}/Observation?p=2"}]})
        s = Serve(tmp_path / "serve", "--allow-fhir-server", evil.base)
        try:
            cards = cards_of(s.hook(request(pid, fhirServer=evil.base, fhirAuthorization={
                "access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read", "subject": "cds"})))
        finally:
            s.stop()
    (card,) = cards
    assert card["summary"] == "CRS/ICANS grading failed: no grade could be computed"
    assert card["indicator"] == "warning" and "not a grade of 0" in card["detail"]
    assert foreign.requests() == []
    assert TOKEN not in card["detail"]


def test_server_errors_give_a_card_saying_grading_failed(serve, failing):
    cards = cards_of(serve.hook(request("p500", fhirServer=failing.base)))
    (card,) = cards
    assert card["summary"] == "CRS/ICANS grading failed: no grade could be computed"
    assert "500" in card["detail"] or "database down" in card["detail"]
    assert serve.proc.poll() is None  # still serving
    assert requests.get(f"{serve.base}/cds-services", timeout=10).status_code == 200


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=16),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=16)
FIELDS = ["hook", "hookInstance", "fhirServer", "fhirAuthorization", "context", "prefetch"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(junk=JSON, field=st.sampled_from([*FIELDS, "context.patientId", "prefetch.patient", "prefetch.vitals"]))
def test_fuzzed_requests_get_a_declared_answer_never_a_crash(serve, foreign, junk, field):
    """Schema-driven fuzzing of the service's own OpenAPI description: a valid request with one
    field replaced by arbitrary JSON (and arbitrary JSON as the whole body) is answered with a
    status the description declares and a body of its schema; never a 500, never a fetch."""
    spec = _openapi(serve.base)
    post = spec["paths"]["/cds-services/{service_id}"]["post"]
    body = request("p1", prefetch={k: {"resourceType": "Bundle", "type": "searchset"} for k in PREFETCH if k != "patient"})
    body["prefetch"]["patient"] = {"resourceType": "Patient", "id": "p1"}
    head, _, tail = field.partition(".")
    if tail:
        if isinstance(body.get(head), dict):
            body[head][tail] = junk
    else:
        body[head] = junk
    for sent in (body, junk):
        resp = serve.hook(sent)
        assert str(resp.status_code) in post["responses"], (resp.status_code, resp.text)
        schema = post["responses"][str(resp.status_code)]["content"]["application/json"]["schema"]
        jsonschema.validate(resp.json(), schema)
    assert foreign.requests() == []


_SPEC: dict[str, Any] = {}


def _openapi(base: str) -> dict[str, Any]:
    if base not in _SPEC:
        _SPEC[base] = requests.get(f"{base}/openapi.json", timeout=10).json()
    return _SPEC[base]
