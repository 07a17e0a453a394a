"""The synthetic PICU cohort and the benchmark generator (fhir_crs/synthetic.py).

Grading the 14 committed Bundles must reproduce the seed study's table exactly and every
patient's designed ASTCT grades; the generator is deterministic; every Bundle is valid R4B.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from fhir.resources.R4B.bundle import Bundle

from fhir_crs import synthetic
from fhir_crs.pipeline import grade_paths, grade_resources
from fhir_crs.report import report_from_cases

COHORT = ROOT / "fixtures" / "cohort"
PICU = COHORT / "picu"


@cache
def truth() -> dict[str, Any]:
    return json.loads((COHORT / "ground_truth.json").read_text(encoding="utf-8"))


@cache
def graded() -> dict[str, Any]:
    return grade_paths([PICU])


@cache
def fresh() -> tuple[tuple[str, ...], str]:
    bundles, gt = synthetic.generate_picu_cohort()
    return tuple(synthetic.dumps_bundle(b) for b in bundles), json.dumps(gt, indent=1, ensure_ascii=False) + "\n"


def test_same_seed_same_bytes_other_seed_other_charts() -> None:
    again, _ = synthetic.generate_picu_cohort(synthetic.DEFAULT_SEED)
    assert tuple(synthetic.dumps_bundle(b) for b in again) == fresh()[0]
    other, other_truth = synthetic.generate_picu_cohort(7)
    assert synthetic.dumps_bundle(other[0]) != fresh()[0][0]
    # a different seed moves dates, ids and noise, never the table
    assert {k: v["n"] for k, v in other_truth["report"]["rows"].items()} == synthetic.PAPER_COUNTS


def test_committed_cohort_equals_a_fresh_generation() -> None:
    files, gt = fresh()
    names = [p["file"] for p in truth()["patients"]]
    assert sorted(p.name for p in PICU.glob("*.json")) == sorted(names)
    for name, text in zip(names, files, strict=True):
        assert (PICU / name).read_text(encoding="utf-8") == text, f"{name} is stale: python -m fhir_crs.synthetic"
    assert (COHORT / "ground_truth.json").read_text(encoding="utf-8") == gt


@pytest.mark.parametrize("name", [f"picu-{i:02d}.json" for i in range(1, 15)])
def test_bundle_is_valid_r4b_transaction(name: str) -> None:
    data = json.loads((PICU / name).read_text(encoding="utf-8"))
    Bundle.model_validate(data)
    assert data["type"] == "transaction"
    for e in data["entry"]:
        r = e["resource"]
        assert e["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
        assert e["fullUrl"].endswith(f"/{r['resourceType']}/{r['id']}")


def test_grading_reproduces_every_patients_ground_truth() -> None:
    cases = {c["patient"]: c for c in graded()["cases"]}
    assert len(cases) == 14
    for p in truth()["patients"]:
        c = cases[p["patient"]]
        crs = c["crs"]["astct"]
        assert {"grade": crs["grade"], "onset": crs["onset"], "resolved": crs["resolved"]} == p["crs_astct"], p["key"]
        assert c["icans"]["astct"]["grade"] == p["icans_astct"]["grade"], p["key"]
        f, want = c["facts"], p["facts"]
        assert c["age_years"] == p["age_years"]
        for key in ("haemodynamic_instability", "vasopressors", "mechanical_ventilation", "liver_injury_grade", "died"):
            assert f[key] == want[key], (p["key"], key)
        assert len(f["tocilizumab"]) == want["tocilizumab"]
        assert bool(f["corticosteroids"]) == want["corticosteroids"]
        assert bool(f["blood_purification"]) == want["blood_purification"]
        assert f["peak_il6"]["value"] == want["peak_il6"] and f["peak_il6"]["unit"] == "pg/mL"
        assert f["peak_ifn_gamma"]["value"] == want["peak_ifn_gamma"]
        if f["died"]:
            assert "grade5_candidate" in crs["flags"]


def test_cohort_table_reproduces_the_seed_study() -> None:
    report = report_from_cases(graded()["cases"], "astct")
    assert {k: v["n"] for k, v in report["rows"].items()} == synthetic.PAPER_COUNTS == truth()["paper"]
    assert report == truth()["report"]
    for key in ("il6", "ifng"):
        c = report["correlation"][key]
        assert c["n"] == 14 and c["rho"] > 0.6 and c["p"] < 0.01


def test_nothing_but_named_unused_resources_is_skipped() -> None:
    reasons = {s["reason"] for s in graded()["skipped"]}
    assert reasons <= {
        "resource type Encounter is not used for grading",
        "code not in mappings/observations.toml: Height",
        "medication not in mappings/medications.toml: levetiracetam",
    }


def test_courses_are_clinically_coherent() -> None:
    gt = truth()
    rows = gt["report"]["rows"]
    severe, deaths, vent = (set(rows[k]["patients"]) for k in ("crs_severe", "deaths", "mechanical_ventilation"))
    assert deaths <= severe and vent <= severe
    ages = [p["age_years"] for p in gt["patients"]]
    assert min(ages) >= 1 and max(ages) <= 17 and len(set(ages)) >= 12
    assert any(a < 12 for a in ages) and any(a >= 12 for a in ages)  # CAPD and ICE both used
    infusions = sorted(p["infusion"] for p in gt["patients"])
    assert infusions[0] >= "2019-01" and infusions[-1] <= "2020-07"
    for p in gt["patients"]:
        data = json.loads((PICU / p["file"]).read_text(encoding="utf-8"))
        res = [e["resource"] for e in data["entry"]]
        patient = next(r for r in res if r["resourceType"] == "Patient")
        assert ("deceasedDateTime" in patient) == p["facts"]["died"]
        assert f"Patient/{patient['id']}" == p["patient"]
        codes = {c["code"] for r in res if r["resourceType"] == "Observation" for c in r["code"].get("coding", [])}
        assert {"8310-5", "85354-9", "8867-4", "9279-1", "2708-6", "29463-7", "26881-3", "27415-9", "1742-6",
                "1920-8", "1975-2", "2160-0", "751-8", "1988-5", "2276-4"} <= codes
        panels = [r for r in res if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "85354-9"]
        assert all({c["code"]["coding"][0]["code"] for c in r["component"]} == {"8480-6", "8462-4"} for r in panels)
        meds = [r for r in res if r["resourceType"] == "MedicationAdministration"]
        toci = [m for m in meds if m["medicationCodeableConcept"]["coding"][0]["code"] == "612865"]
        assert toci and all("mg/kg" in m["dosage"]["text"] for m in toci)
        pressors = [m for m in meds if "rateQuantity" in m["dosage"] and m["dosage"]["rateQuantity"]["code"] == "ug/kg/min"]
        assert bool(pressors) == p["facts"]["vasopressors"]
        weights = [r for r in res if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "29463-7"]
        assert weights and weights[0]["effectiveDateTime"] < next(
            r for r in res if r["resourceType"] == "Procedure")["performedPeriod"]["start"]


def test_recorded_in_the_hospitals_time_zone() -> None:
    data = json.loads((PICU / "picu-01.json").read_text(encoding="utf-8"))
    obs = next(e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Observation")
    assert obs["effectiveDateTime"].endswith("+08:00")


def test_benchmark_cohort_streams_valid_mixed_bundles() -> None:
    stream = synthetic.generate_cohort(200, seed=3, pediatric_fraction=0.3)
    assert iter(stream) is stream  # a generator: bundles are produced one at a time
    bundles = list(stream)
    assert len(bundles) == 200
    ages = []
    for i, b in enumerate(bundles):
        assert b["resourceType"] == "Bundle" and b["type"] == "transaction"
        patient = b["entry"][0]["resource"]
        assert patient["resourceType"] == "Patient"
        ages.append(int(b["timestamp"][:4]) - int(patient["birthDate"][:4]))
        if i % 25 == 0:
            Bundle.model_validate(b)
    assert sum(a < 18 for a in ages) == pytest.approx(60, abs=3)
    assert sum(a >= 18 for a in ages) == pytest.approx(140, abs=3)
    ids = [b["entry"][0]["resource"]["id"] for b in bundles]
    assert len(set(ids)) == 200


def test_benchmark_courses_grade_as_designed() -> None:
    for i, (bundle, expected) in enumerate(synthetic.iter_cohort(80, seed=5, pediatric_fraction=0.4)):
        if i % 2:
            continue
        run = grade_resources([e["resource"] for e in bundle["entry"]]).to_json()
        (case,) = run["cases"]
        crs = case["crs"]["astct"]
        assert {"grade": crs["grade"], "onset": crs["onset"], "resolved": crs["resolved"]} == expected["crs_astct"], expected["key"]
        assert case["icans"]["astct"]["grade"] == expected["icans_astct"]["grade"], expected["key"]


def test_write_cohort_writes_bundles_and_ground_truth(tmp_path: Path) -> None:
    written = synthetic.write_cohort(tmp_path)
    assert len(written) == 15
    assert (tmp_path / "ground_truth.json").is_file()
    assert len(list((tmp_path / "picu").glob("picu-*.json"))) == 14
    assert synthetic._main([str(tmp_path), "--check"]) == 0


@pytest.mark.integration
def test_cohort_loads_into_a_fhir_server_and_grades_the_same(fhir_server) -> None:
    """PUT transactions with stable ids: a reload changes nothing, and `pull` grades like the files."""
    from fhir_crs.config import RunConfig
    from fhir_crs.fhir import FhirClient, NoAuth
    from fhir_crs.pipeline import pull_patient

    client = FhirClient(fhir_server.base, auth=NoAuth())
    offline = {c["patient"]: c for c in graded()["cases"]}
    picked = [p for p in truth()["patients"] if p["key"] in ("picu-01", "picu-10", "picu-13")]
    for p in picked:
        bundle = json.loads((PICU / p["file"]).read_text(encoding="utf-8"))
        client.transaction(bundle)
        client.transaction(bundle)  # idempotent reload
        pid = p["patient"].split("/", 1)[1]
        result = pull_patient(client, pid, RunConfig(server=fhir_server.base))
        (case,) = result.run.to_json()["cases"]
        for family, system in (("crs", "astct"), ("crs", "lee2014"), ("icans", "astct")):
            got, want = case[family][system], offline[p["patient"]][family][system]
            assert (got["grade"], got["onset"], got["resolved"]) == (want["grade"], want["onset"], want["resolved"])
        n_obs = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
        found = client.search("Observation", [("patient", pid)])
        assert len(found.matches) == n_obs
