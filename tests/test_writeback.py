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
from fhir.resources.R4B.provenance import Provenance

from fhir_crs import __version__
from fhir_crs.conventions import EXTENSION, ConventionChangeError, current_conventions
from fhir_crs.errors import DuplicateTargetError
from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.pipeline import run_paths, write_case
from fhir_crs.writeback import build_case_write, stored_grade, stored_hash, transaction_for

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
    """The answer to the case transaction: its Condition(s), the summary Bundle, then the
    Provenance (`ids`: the ids of the first entries, when they were updated in place)."""
    types = ["Condition"] * (n - 2) + ["Bundle", "Provenance"]
    names = [*ids, *(f"new{i}" for i in range(len(ids), n))]
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": status, "location": f"{BASE}/{t}/{i}/_history/1"}} for i, t in zip(names, types, strict=True)]}


def client():
    return FhirClient(BASE, auth=NoAuth(), sleep=lambda s: None)


@responses.activate
def test_first_write_creates_in_one_transaction_with_its_provenance(case):
    c, settings = case
    responses.get(re.compile(BASE + r"/(Condition|Bundle)\?.*"), json=_searchset())
    responses.post(BASE, json=_tx_response(4))
    out = write_case(client(), c, settings, SYSTEM)
    assert out.status == "created"
    posted = json.loads(responses.calls[-1].request.body)
    assert posted["type"] == "transaction" and len(posted["entry"]) == 4
    *writes, prov_entry = posted["entry"]
    assert all(e["request"]["method"] == "PUT" and "?identifier=" in e["request"]["url"] for e in writes)
    assert prov_entry["request"] == {"method": "POST", "url": "Provenance"}
    prov = prov_entry["resource"]
    Provenance.model_validate(prov)
    # target: the two Conditions and the summary Bundle of this transaction (by their fullUrls)
    assert [t["reference"] for t in prov["target"]] == [e["fullUrl"] for e in writes]
    assert [e["resource"]["resourceType"] for e in writes] == ["Condition", "Condition", "Bundle"]
    # agent: fhir-crs as a contained Device with its version
    (device,) = prov["contained"]
    assert device["resourceType"] == "Device" and device["version"] == [{"value": __version__}]
    assert prov["agent"][0]["who"]["reference"] == "#" + device["id"]
    # entity: the source resources (the patient, the infusion, every piece of evidence)
    sources = {e["what"]["reference"] for e in prov["entity"]}
    assert all(e["role"] == "source" for e in prov["entity"])
    crs = writes[0]["resource"]
    assert {d["reference"] for d in crs["evidence"][0]["detail"]} <= sources and c.timeline.patient in sources
    # the hash of the settings and mapping tables, the same on the Provenance and the Conditions
    ext = next(x for x in prov["extension"] if x["url"] == EXTENSION)
    assert ext in crs["extension"] and ext in writes[1]["resource"]["extension"]
    parts = {x["url"]: x["valueString"] for x in ext["extension"] if x["url"] != "table"}
    assert parts["settings-sha256"] == settings.fingerprint() and parts["settings"] == "{}"
    tables = [x["valueString"].split(" sha256:")[0] for x in ext["extension"] if x["url"] == "table"]
    assert tables == sorted(tables) and {"devices.toml", "medications.toml", "observations.toml", "procedures.toml",
                                         "units.toml"} <= set(tables) and "grading.toml" not in tables
    assert prov["policy"] == [f"urn:fhir-crs:conventions:sha256:{parts['sha256']}"]
    assert {ch["action"] for ch in out.changes} == {"create"} and out.written["provenance"] == "Provenance/new3"


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
        {"url": "urn:fhir-crs:StructureDefinition:content-hash", "valueString": "stale"},
        current_conventions(settings, ROOT / "mappings").extension()]}
    responses.get(re.compile(BASE + r"/Condition\?.*-crs&.*"), json=_searchset(old))
    responses.get(re.compile(BASE + r"/Condition\?.*-icans&.*"), json=_searchset())
    responses.get(re.compile(BASE + r"/Bundle\?.*"), json=_searchset())
    conflict = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                "diagnostics": "HAPI-0989: Trying to update Condition/c1/_history/4 but this is not the current version"}]}
    responses.post(BASE, status=409, json=conflict)
    responses.post(BASE, json=_tx_response(4, "200 OK", ids=["c1"]))
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
    """The CRS Condition for V25, as write_case builds it (with the conventions extension),
    equals the committed golden file (fixtures/expected). The sha256 values of the settings and
    mapping tables are replaced by a placeholder here — they change with every table edit and
    are checked by the Provenance and convention-change tests — their names and shape are not."""
    c, settings = case
    w = build_case_write(c, settings, SYSTEM, recorded="2026-01-01T00:00:00Z",
                         conventions=current_conventions(settings, ROOT / "mappings"))
    golden = ROOT / "fixtures" / "expected" / "V25.condition.json"
    crs = json.loads(json.dumps(w.resources["crs"]))
    for ext in crs["extension"]:
        subs = []
        for sub in ext.get("extension", []):
            if sub["url"] in ("sha256", "settings-sha256"):
                assert re.fullmatch(r"[0-9a-f]{64}", sub["valueString"])
                sub["valueString"] = "<sha256>"
            elif sub["url"] == "table":  # one per mapping table (the set of tables may grow)
                assert re.fullmatch(r"[a-z_.]+\.toml sha256:[0-9a-f]{64}", sub["valueString"])
                sub = {"url": "table", "valueString": "<file>.toml sha256:<sha256>"}
                if sub in subs:
                    continue
            elif sub["url"] == "version":
                assert sub["valueString"] == __version__
                sub["valueString"] = "<version>"
            subs.append(sub)
        if subs:
            ext["extension"] = subs
    got = json.dumps(crs, indent=1, sort_keys=True)
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
    one_by_one = client()
    one_by_one.batch_supported = False  # the reads one by one (batches: tests/test_sync_feed.py on real servers)
    out = fetch_patient(one_by_one, "p1", RunConfig(), code_map)
    assert any(r.get("id") == "cart1" for r in out)
    paths = {p for p, _ in windowed}
    assert paths == {"/r4/Procedure", "/r4/MedicationAdministration", "/r4/Observation"}
    obs_q = next(q for p, q in windowed if p == "/r4/Observation")
    assert obs_q["date"] == ["ge2025-03-03T08:00:00Z", "le2025-06-18T08:00:00Z"]  # 7 days before, 100 after


@responses.activate
def test_stored_condition_graded_with_other_conventions_is_not_overwritten(case, tmp_path: Path):
    """A rerun with other settings or tables refuses to overwrite, naming what differs; with
    allow_convention_change it writes (If-Match on the stored version, Provenance included)."""
    import shutil

    from fhir_crs.settings import load_settings

    c, settings = case
    old_tables = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", old_tables)
    with (old_tables / "observations.toml").open("a") as f:
        f.write('\n[site_extra_temperature]\ngroup = "vital"\nunit = "Cel"\ncodes = ["urn:site|T1"]\n')
    old_settings = load_settings(None, ["resolution_clear_h=36", "fever_c=38.3"])
    stored = build_case_write(c, old_settings, SYSTEM, conventions=current_conventions(old_settings, old_tables))
    for name, rtype in (("crs", "Condition"), ("icans", "Condition"), ("summary", "Bundle")):
        value = stored.identifiers[name]["value"]
        body = {**stored.resources[name], "id": f"id-{name}", "meta": {"versionId": "7"}}
        responses.get(f"{BASE}/{rtype}", match=[responses.matchers.query_param_matcher(
            {"identifier": f"{SYSTEM}|{value}", "_count": "200"})], json=_searchset(body))
    with pytest.raises(ConventionChangeError) as exc:
        write_case(client(), c, settings, SYSTEM, mappings_dir=ROOT / "mappings")
    msg = str(exc.value)
    assert exc.value.exit_code == 9 and "not overwriting Condition/id-crs" in msg
    assert "fever_c 38.3 -> 38.0" in msg and "resolution_clear_h 36.0 -> 24.0" in msg
    assert "mapping tables: observations.toml (changed)" in msg and "--allow-convention-change" in msg
    assert not [call for call in responses.calls if call.request.method == "POST"]
    # a dry run reports it instead of failing
    dry = write_case(client(), c, settings, SYSTEM, mappings_dir=ROOT / "mappings", dry_run=True)
    assert dry.status == "refused" and dry.message == msg
    assert [(ch["kind"], ch["action"], ch["old_grade"], ch["new_grade"]) for ch in dry.changes] == [
        ("crs", "update", stored_grade(stored.resources["crs"]), c.crs["astct"].grade),
        ("icans", "update", stored_grade(stored.resources["icans"]), c.icans["astct"].grade),
        ("summary", "update", None, None), ("provenance", "create", None, None)]
    # allowed: written with If-Match, and the new conventions recorded
    responses.post(BASE, json=_tx_response(4, "200 OK", ids=["id-crs", "id-icans", "id-summary"]))
    out = write_case(client(), c, settings, SYSTEM, mappings_dir=ROOT / "mappings", allow_convention_change=True)
    assert out.status == "updated"
    entries = json.loads(responses.calls[-1].request.body)["entry"]
    assert entries[0]["request"] == {"method": "PUT", "url": "Condition/id-crs", "ifMatch": 'W/"7"'}
    assert current_conventions(settings, ROOT / "mappings").extension() in entries[0]["resource"]["extension"]
    assert entries[-1]["resource"]["activity"]["coding"][0]["code"] == "UPDATE"
    assert [t["reference"] for t in entries[-1]["resource"]["target"]] == ["Condition/id-crs", "Condition/id-icans", "Bundle/id-summary"]


@responses.activate
def test_a_stored_condition_without_recorded_conventions_is_not_overwritten(case):
    c, settings = case
    legacy = {"resourceType": "Condition", "id": "c9", "meta": {"versionId": "2"}, "extension": [
        {"url": "urn:fhir-crs:StructureDefinition:content-hash", "valueString": "old"}]}
    responses.get(re.compile(BASE + r"/Condition\?.*-crs&.*"), json=_searchset(legacy))
    responses.get(re.compile(BASE + r"/Condition\?.*-icans&.*"), json=_searchset())
    responses.get(re.compile(BASE + r"/Bundle\?.*"), json=_searchset())
    with pytest.raises(ConventionChangeError, match="records no settings or mapping-table hashes"):
        write_case(client(), c, settings, SYSTEM)


def test_comments_in_a_table_do_not_count_as_a_change(case, tmp_path: Path):
    import shutil

    from fhir_crs.conventions import table_hashes

    d = tmp_path / "m"
    shutil.copytree(ROOT / "mappings", d)
    before = table_hashes(d)
    with (d / "units.toml").open("a") as f:
        f.write("\n# a comment\n")
    assert table_hashes(d) == before
    with (d / "units.toml").open("a") as f:
        f.write('\n[zz_site_unit]\n')
    assert table_hashes(d) != before
