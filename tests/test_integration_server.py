"""The server path end to end against a real FHIR server on 127.0.0.1 (sekmet-fhir, pinned):
load fixture patients by transaction, `fhir-crs pull --write`, read back the Condition and the
summary Bundle, rerun and prove there are no duplicates, change the data and see an update."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import ROOT, hl7_validate, load_vignette

from fhir_crs.cli import cli
from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.pipeline import grade_paths

pytestmark = pytest.mark.integration
VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"
SYSTEM = "urn:fhir-crs:case"



def pull(server: str, pid: str, *extra: str) -> tuple[int, dict[str, Any] | None, str]:
    r = CliRunner().invoke(cli, ["pull", "--patient", pid, "--server", server, "--json", *extra])
    data = json.loads(r.stdout) if r.exit_code == 0 and r.stdout.strip() else None
    return r.exit_code, data, r.stderr


@pytest.fixture(scope="module")
def server(any_server):
    """sekmet-fhir and HAPI FHIR JPA in turn (tests/conftest.py `any_server`)."""
    return any_server


@pytest.fixture(scope="module")
def client(server) -> FhirClient:
    return FhirClient(server.base, auth=NoAuth())


@pytest.fixture(scope="module")
def loaded(client: FhirClient) -> dict[str, str]:
    return {v: load_vignette(client, v) for v in ("V06", "V25", "V04")}


def conditions(client: FhirClient, value: str) -> list[dict[str, Any]]:
    return client.search("Condition", [("identifier", f"{SYSTEM}|{value}")], no_cache=True).matches


def test_pull_grades_like_the_offline_path(server, loaded):
    code, data, err = pull(server.base, loaded["V06"])
    assert code == 0, err
    (case,) = data["cases"]
    offline = grade_paths([VIGNETTES / "V06.json"])["cases"][0]
    for system in ("astct", "lee2014", "penn", "mskcc", "cartox", "ctcae5"):
        for key in ("grade", "onset", "max_at", "resolved"):
            assert case["crs"][system][key] == offline["crs"][system][key], (system, key)
    assert data["written"] == []  # no --write


def test_write_back_is_idempotent_and_reads_back(server, client, loaded):
    pid = loaded["V06"]
    code, data, err = pull(server.base, pid, "--write")
    assert code == 0, err
    (w,) = data["written"]
    assert w["status"] == "created"
    case = data["cases"][0]
    key = f"{pid}-" + case["infusion"].replace("-", "").replace(":", "")
    (cond,) = conditions(client, key + "-crs")
    assert cond["code"]["coding"][0]["code"] == "D89.833"
    assert cond["verificationStatus"]["coding"][0]["code"] == "provisional"
    assert cond["clinicalStatus"]["coding"][0]["code"] == "resolved" and "abatementDateTime" in cond
    assert [s["type"]["coding"][0]["code"] for s in cond["stage"]][:2] == ["astct-crs", "lee2014-crs"]
    for ev in cond["evidence"][0]["detail"]:  # evidence points at the resource versions graded (issue 11)
        path, _, version = ev["reference"].partition("/_history/")
        rtype, rid = path.split("/")
        stored = client.read(rtype, rid)
        assert stored["id"] == rid
        assert not version or version == stored["meta"]["versionId"]  # the version graded, when the search carried one
    (summary,) = client.search("Bundle", [("identifier", f"{SYSTEM}|{key}-summary")], no_cache=True).matches
    assert summary["type"] == "collection"
    kinds = {e["resource"]["resourceType"] for e in summary["entry"]}
    assert {"Condition", "Observation", "List"} <= kinds
    # replay: nothing written, nothing duplicated
    code, again, _ = pull(server.base, pid, "--write")
    assert code == 0 and again["written"][0]["status"] == "unchanged"
    assert len(conditions(client, key + "-crs")) == 1
    assert len(client.search("Bundle", [("identifier", f"{SYSTEM}|{key}-summary")], no_cache=True).matches) == 1


def test_new_data_updates_in_place(server, client, loaded):
    pid = loaded["V04"]  # afebrile hypotension: no CRS -> nothing written
    code, data, _ = pull(server.base, pid, "--write")
    assert code == 0 and data["written"][0]["status"] == "unchanged" and data["cases"][0]["crs"]["astct"]["grade"] == 0
    infusion = data["cases"][0]["infusion"]
    from datetime import datetime, timedelta

    t0 = datetime.fromisoformat(infusion.replace("Z", "+00:00"))
    for h, v in ((58, 38.9), (62, 37.1)):
        client.post("Observation", {
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": (t0 + timedelta(hours=h)).isoformat().replace("+00:00", "Z"),
            "valueQuantity": {"value": v, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"},
        })
    code, data, err = pull(server.base, pid, "--write")
    assert code == 0, err
    assert data["cases"][0]["crs"]["astct"]["grade"] == 2  # fever now accompanies the hypotension at +60
    assert data["written"][0]["status"] == "created"


def test_icans_condition_written_when_graded(server, client, loaded):
    pid = loaded["V25"]
    code, data, err = pull(server.base, pid, "--write")
    assert code == 0, err
    key = f"{pid}-" + data["cases"][0]["infusion"].replace("-", "").replace(":", "")
    (icans,) = conditions(client, key + "-icans")
    assert icans["code"]["coding"][0]["code"] == "G92.03"


def test_dry_run_writes_nothing(server, client, loaded):
    pid = loaded["V25"]
    before = client.search("Condition", [("subject", f"Patient/{pid}")], no_cache=True).matches
    # a different convention changes the grade, so a real run would have to write
    r = CliRunner().invoke(cli, ["pull", "--patient", pid, "--server", server.base, "--dry-run", "--set", "capd_delirium=12"])
    assert r.exit_code == 0, r.stderr
    assert "Dry run" in r.stdout and "Condition?identifier=" not in r.stdout.split("Dry run")[0]
    after = client.search("Condition", [("subject", f"Patient/{pid}")], no_cache=True).matches
    assert [(c["id"], c["meta"]["versionId"]) for c in after] == [(c["id"], c["meta"]["versionId"]) for c in before]


def test_unknown_patient_is_one_clear_error(server):
    code, _, err = pull(server.base, "no-such-patient")
    assert code == 4 and "not found" in err.lower() and "Traceback" not in err


def written_resources(client: FhirClient, key: str) -> list[dict[str, Any]]:
    """Everything a write-back for case `key` left on the server: Conditions, the summary Bundle
    and each of its entries (Condition, Observations, List), and any Provenance of those."""
    found: list[dict[str, Any]] = []
    for suffix in ("-crs", "-icans"):
        found += conditions(client, key + suffix)
    bundles = client.search("Bundle", [("identifier", f"{SYSTEM}|{key}-summary")], no_cache=True).matches
    found += bundles
    found += [e["resource"] for b in bundles for e in b.get("entry", [])]
    targets = ",".join(f"{r['resourceType']}/{r['id']}" for r in found if r.get("id"))
    found += client.search("Provenance", [("target", targets)], no_cache=True).matches
    return found


def test_everything_written_passes_the_hl7_validator(hapi_server):
    """`pull --write` on the local HAPI, then each written resource through the HL7 validator
    (HAPI's FhirInstanceValidator, R4 core definitions, offline): zero errors; warnings listed at
    the end of the test session. fhir.resources.R4B validation stays the first check (writeback)."""
    client = FhirClient(hapi_server.base, auth=NoAuth())
    checked: dict[str, int] = {}
    for vignette in ("V06", "V25"):  # CRS only; CRS + ICANS
        pid = load_vignette(client, vignette)
        code, data, err = pull(hapi_server.base, pid, "--write")
        assert code == 0, err
        key = f"{pid}-" + data["cases"][0]["infusion"].replace("-", "").replace(":", "")
        resources = written_resources(client, key)
        for resource in resources:
            errors, warnings = hl7_validate(hapi_server.base, resource)
            assert errors == [], errors
            for w in warnings:
                print(w)
            checked[resource["resourceType"]] = checked.get(resource["resourceType"], 0) + 1
    print("validated:", checked)
    assert {"Condition", "Bundle", "Observation", "List"} <= set(checked)
    assert checked["Condition"] >= 3 * 2  # CRS x2 + ICANS, each stored and inside its Bundle


def test_unreachable_server_is_one_clear_error():
    code, _, err = pull("http://127.0.0.1:9", "x")
    assert code != 0 and "cannot reach" in err.lower() and "Traceback" not in err


def test_missing_server_config_is_one_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FHIR_CRS_SERVER", raising=False)
    r = CliRunner().invoke(cli, ["pull", "--patient", "x"])
    assert r.exit_code == 2 and "no FHIR server configured" in r.stderr


def _as_patient(rows: list[dict[str, Any]], pid: str) -> list[dict[str, Any]]:
    """The factory's rows (patient p1) as patient `pid`, every id prefixed so patients never collide."""
    text = json.dumps(rows).replace('"Patient/p1"', f'"Patient/{pid}"').replace('"id": "p1"', f'"id": "{pid}"')
    resources = json.loads(text)
    for r in resources:
        if r["resourceType"] != "Patient" and not r["id"].startswith(pid):
            r["id"] = f"{pid}-{r['id']}"
    return resources


def test_pull_reads_the_condition_a_procedure_names_as_its_reason(server, client):
    """An intubation whose only indication is `reasonReference` to the patient's coded
    respiratory-failure Condition (no display, no hypoxia charted): `pull` reads that Condition
    (with all the patient's Conditions, in its last read batch),
    so positive pressure counts for CRS (ASTCT 4) as it does offline; without the Condition on
    the server it does not (ASTCT 1, flagged ppv_not_attributed). Pinned difference: HAPI refuses
    to store a reasonReference to a Condition it does not hold (HAPI-1094, referential
    integrity), so there the second patient's intubation has no reasonReference at all."""
    import uuid

    from factory import SCT, bp, cart, obs, patient, proc, temp, vitals_baseline

    from fhir_crs.errors import FhirOperationOutcome
    from fhir_crs.localserver import HapiFhirServer

    fever_h = [24, 28, 32, 36]

    def rows(pid: str, with_condition: bool) -> list[dict[str, Any]]:
        intub = proc("112798008", 30)
        intub["reasonReference"] = [{"reference": f"Condition/{pid}-rf"}]
        out = [patient(), cart(0), *vitals_baseline(120, skip=set(map(float, fever_h))), *[temp(h, 39.0) for h in fever_h],
               *[bp(h, 118) for h in fever_h], obs("59408-5", 29, 97, "%"), intub, proc("1258985005", 30, 40)]
        if with_condition:
            out.append({"resourceType": "Condition", "id": f"{pid}-rf", "subject": {"reference": "Patient/p1"},
                        "code": {"coding": [{"system": SCT, "code": "409622000"}]},
                        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                       "code": "active"}]},
                        "recordedDate": "2025-01-01T00:00:00Z"})
        return _as_patient(out, pid)

    grades = {}
    for with_condition in (True, False):
        pid = f"rr-{uuid.uuid4().hex[:10]}"
        resources = rows(pid, with_condition)

        def load(resources: list[dict[str, Any]]) -> None:
            client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]})

        if not with_condition and isinstance(server, HapiFhirServer):
            with pytest.raises(FhirOperationOutcome, match="HAPI-1094"):
                load(resources)
            for r in resources:
                r.pop("reasonReference", None)
        load(resources)
        code, data, err = pull(server.base, pid)
        assert code == 0, err
        (case,) = data["cases"]
        grades[with_condition] = case["crs"]["astct"]
        if with_condition:
            assert f"Condition/{pid}-rf" in json.dumps(case)  # the reason cites the Condition
    assert grades[True]["grade"] == 4 and "ppv_not_attributed" not in grades[True]["flags"]
    assert grades[False]["grade"] == 1 and "ppv_not_attributed" in grades[False]["flags"]


def test_pull_reads_the_hypotension_condition_a_fluid_names_as_its_reason(server, client):
    """A 100 mL fluid whose only indication is `reasonReference` to the patient's coded
    hypotension Condition treats the single low SBP (criteria §1.3): `pull` reads the Condition
    (MedicationAdministrations name reasons too), so ASTCT is 2 with the Condition cited, as offline."""
    import uuid

    from factory import bp, cart, med, obs, patient, temp, vitals_baseline

    fever_h = [24, 28, 32, 36]
    pid = f"fl-{uuid.uuid4().hex[:10]}"
    fluid = med("313002", 30.2, 30.5, dose=100, dose_unit="mL")
    fluid["reasonReference"] = [{"reference": f"Condition/{pid}-hy"}]
    hypotension = {"resourceType": "Condition", "id": f"{pid}-hy", "subject": {"reference": "Patient/p1"},
                   "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I95.9"}]},
                   "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                  "code": "active"}]}}
    rows = [patient(), cart(0), obs("29463-7", -12, 70, "kg"), *vitals_baseline(120, skip=set(map(float, fever_h))),
            *[temp(h, 39.0) for h in fever_h], bp(30, 82), fluid, hypotension]
    resources = _as_patient(rows, pid)
    client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]})
    code, data, err = pull(server.base, pid)
    assert code == 0, err
    (case,) = data["cases"]
    astct = case["crs"]["astct"]
    assert astct["grade"] == 2, (astct["criteria"], data.get("skipped"))
    assert any(r.split("/_history/")[0] == f"Condition/{pid}-hy" for r in astct["evidence"]), astct["evidence"]
