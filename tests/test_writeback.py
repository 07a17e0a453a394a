"""Write-back: the Condition and summary Bundle validate against R4B and round-trip; the write
protocol (conditional create, unchanged replay, version conflict, duplicate identifiers) is
reproduced with `responses` as HAPI behaves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import responses
from conftest import ROOT
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition

from fhir_crs.errors import DuplicateTargetError
from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.pipeline import run_paths, write_case
from fhir_crs.writeback import build_case_write, stored_hash, transaction_for

BASE = "https://fhir.test/r4"
SYSTEM = "urn:fhir-crs:case"


@pytest.fixture(scope="module")
def case():
    run = run_paths([ROOT / "fixtures" / "R4" / "vignettes" / "V25.json"])
    return run.cases[0], run.settings


def test_condition_and_bundle_validate_and_round_trip(case):
    c, settings = case
    w = build_case_write(c, settings, SYSTEM, recorded="2026-01-01T00:00:00Z")
    for name, res in w.resources.items():
        model = (Condition if res["resourceType"] == "Condition" else Bundle).model_validate(res)
        assert json.loads(model.model_dump_json(exclude_none=True)) == json.loads(json.dumps(res)), name
    crs = w.resources["crs"]
    assert crs["code"]["coding"][0] == {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "D89.832",
                                        "display": "Cytokine release syndrome, grade 2"}
    assert crs["severity"]["coding"][0]["code"] == "6736007"
    assert [s["type"]["coding"][0]["code"] for s in crs["stage"]] == [
        "astct-crs", "lee2014-crs", "penn-crs", "mskcc-crs", "cartox-crs", "ctcae5-crs"]
    assert "PedsCARTOX" not in json.dumps(crs) and "pediatric" in crs["stage"][4]["summary"]["text"]
    assert crs["clinicalStatus"]["coding"][0]["code"] == "resolved" and crs["abatementDateTime"]
    assert w.resources["icans"]["code"]["coding"][0]["code"] == "G92.03"
    lst = [e["resource"] for e in w.resources["summary"]["entry"] if e["resource"]["resourceType"] == "List"]
    assert lst and all(re.match(r"^[A-Z][A-Za-z]+/[A-Za-z0-9.-]+$", e["item"]["reference"]) for e in lst[0]["entry"])
    assert lst[0]["entry"][0]["flag"]["coding"][0]["code"] == "car_t_infusion"


def test_hash_ignores_run_time_fields(case):
    c, settings = case
    a = build_case_write(c, settings, SYSTEM, recorded="2026-01-01T00:00:00Z")
    b = build_case_write(c, settings, SYSTEM, recorded="2026-06-01T00:00:00Z")
    assert stored_hash(a.resources["crs"]) == stored_hash(b.resources["crs"])


def test_transaction_uses_if_match_for_existing_and_conditional_update_otherwise(case):
    c, settings = case
    w = build_case_write(c, settings, SYSTEM)
    tx = transaction_for(w, {"crs": ("c1", 'W/"3"')})
    reqs = {e["resource"]["resourceType"] + ":" + e["request"]["url"].split("?")[0]: e["request"] for e in tx["entry"]}
    assert reqs["Condition:Condition/c1"]["ifMatch"] == 'W/"3"'
    assert any(r["url"].startswith("Bundle?identifier=urn:fhir-crs:case|") for r in reqs.values())


def _searchset(*resources):
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def _tx_response(n, status="201 Created", ids=()):
    """The answer to the case transaction: its Condition(s), then the summary Bundle (`ids`: the
    ids of the first entries, when they were updated in place)."""
    types = ["Condition"] * (n - 1) + ["Bundle"]
    names = [*ids, *(f"new{i}" for i in range(len(ids), n))]
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": status, "location": f"{BASE}/{t}/{i}/_history/1"}} for i, t in zip(names, types, strict=True)]}


def client():
    return FhirClient(BASE, auth=NoAuth(), sleep=lambda s: None)


@responses.activate
def test_first_write_creates_in_one_transaction(case):
    c, settings = case
    responses.get(re.compile(BASE + r"/(Condition|Bundle)\?.*"), json=_searchset())
    responses.post(BASE, json=_tx_response(3))
    out = write_case(client(), c, settings, SYSTEM)
    assert out.status == "created"
    posted = json.loads(responses.calls[-1].request.body)
    assert posted["type"] == "transaction" and len(posted["entry"]) == 3
    assert all(e["request"]["method"] == "PUT" and "?identifier=" in e["request"]["url"] for e in posted["entry"])


@responses.activate
def test_replay_with_same_content_writes_nothing(case):
    c, settings = case
    w = build_case_write(c, settings, SYSTEM)
    stored = {k: {**v, "id": f"id-{k}", "meta": {"versionId": "1"}} for k, v in w.resources.items()}
    for name, rtype in (("crs", "Condition"), ("icans", "Condition"), ("summary", "Bundle")):
        value = w.identifiers[name]["value"]
        responses.get(f"{BASE}/{rtype}", match=[responses.matchers.query_param_matcher(
            {"identifier": f"{SYSTEM}|{value}", "_count": "200"})], json=_searchset(stored[name]))
    out = write_case(client(), c, settings, SYSTEM)
    assert out.status == "unchanged"
    assert not [call for call in responses.calls if call.request.method == "POST"]


@responses.activate
def test_version_conflict_rereads_and_reapplies(case):
    c, settings = case
    old = {"resourceType": "Condition", "id": "c1", "meta": {"versionId": "4"}, "extension": [
        {"url": "urn:fhir-crs:StructureDefinition:content-hash", "valueString": "stale"}]}
    responses.get(re.compile(BASE + r"/Condition\?.*-crs&.*"), json=_searchset(old))
    responses.get(re.compile(BASE + r"/Condition\?.*-icans&.*"), json=_searchset())
    responses.get(re.compile(BASE + r"/Bundle\?.*"), json=_searchset())
    conflict = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                "diagnostics": "HAPI-0989: Trying to update Condition/c1/_history/4 but this is not the current version"}]}
    responses.post(BASE, status=409, json=conflict)
    responses.post(BASE, json=_tx_response(3, "200 OK", ids=["c1"]))
    out = write_case(client(), c, settings, SYSTEM)
    assert out.status == "updated"
    posts = [call for call in responses.calls if call.request.method == "POST"]
    assert len(posts) == 2
    entry = json.loads(posts[-1].request.body)["entry"][0]
    assert entry["request"] == {"method": "PUT", "url": "Condition/c1", "ifMatch": 'W/"4"'}


@responses.activate
def test_two_resources_with_one_identifier_is_a_data_quality_error(case):
    c, settings = case
    dup = [{"resourceType": "Condition", "id": f"c{i}", "meta": {"versionId": "1"}} for i in (1, 2)]
    responses.get(re.compile(BASE + r"/Condition\?.*"), json=_searchset(*dup))
    with pytest.raises(DuplicateTargetError, match="2 Condition resources"):
        write_case(client(), c, settings, SYSTEM)
    assert not [call for call in responses.calls if call.request.method == "POST"]


@responses.activate
def test_conditional_write_matching_two_resources_is_not_retried(case):
    c, settings = case
    responses.get(re.compile(BASE + r"/(Condition|Bundle)\?.*"), json=_searchset())
    responses.post(BASE, status=412, json={"resourceType": "OperationOutcome", "issue": [{"severity": "error",
                   "code": "multiple-matches", "diagnostics": "Failed to UPDATE resource with match URL "
                   "\"Condition?identifier=x\" because this search matched 2 resources"}]})
    with pytest.raises(DuplicateTargetError):
        write_case(client(), c, settings, SYSTEM)
    assert len([call for call in responses.calls if call.request.method == "POST"]) == 1


def test_golden_condition_shape_is_stable(case, tmp_path: Path):
    """The CRS Condition for V25 equals the committed golden file (fixtures/expected)."""
    c, settings = case
    w = build_case_write(c, settings, SYSTEM, recorded="2026-01-01T00:00:00Z")
    golden = ROOT / "fixtures" / "expected" / "V25.condition.json"
    got = json.dumps(w.resources["crs"], indent=1, sort_keys=True)
    if not golden.exists():
        golden.write_text(got + "\n")
    assert got + "\n" == golden.read_text()


@responses.activate
def test_fetch_uses_date_windows_and_falls_back_when_cart_has_only_local_codes(code_map):
    from fhir_crs.config import RunConfig
    from fhir_crs.pipeline import fetch_patient

    cart = {"resourceType": "Procedure", "id": "cart1", "status": "completed", "subject": {"reference": "Patient/p1"},
            "code": {"text": "CAR-T cell infusion (tisagenlecleucel)"}, "performedDateTime": "2025-03-10T08:00:00Z"}
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"})
    windowed = []

    def search(request):
        q = request.params
        if "date" in q or "effective-time" in q:
            windowed.append((request.path_url.split("?")[0], q))
        body = _searchset(cart) if request.path_url.startswith("/r4/Procedure") and "code" not in q else _searchset()
        return 200, {}, json.dumps(body)

    for rtype in ("Procedure", "MedicationAdministration", "Observation"):
        responses.add_callback(responses.GET, f"{BASE}/{rtype}", callback=search)
    out = fetch_patient(client(), "p1", RunConfig(), code_map)
    assert any(r.get("id") == "cart1" for r in out)
    paths = {p for p, _ in windowed}
    assert paths == {"/r4/Procedure", "/r4/MedicationAdministration", "/r4/Observation"}
    obs_q = next(q for p, q in windowed if p == "/r4/Observation")
    assert obs_q["date"] == ["ge2025-03-03T08:00:00Z", "le2025-06-18T08:00:00Z"]  # 7 days before, 100 after
