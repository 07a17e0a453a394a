"""Issue 11 — clinical data fidelity. Each test table is a CLASS of real-feed input with several
shapes: status noise, several versions of one resource, coded vs negated reasons, a severe second
episode, and corrupt values that must end as ONE resource-level named skip with every neighbour
graded. Property tests: one corrupt resource changes no grade and adds exactly one skip; grading
is invariant to input order and to duplicating a whole file."""

from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from click.testing import CliRunner
from conftest import ROOT
from factory import NE, SCT, at, bp, cart, med, obs, patient, proc, temp, vitals_baseline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_crs.cli import cli
from fhir_crs.errors import MappingFileError
from fhir_crs.mapping_files import load_code_map
from fhir_crs.pipeline import grade_paths, grade_resources
from fhir_crs.settings import load_settings

VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"
SCHEMA = json.loads((ROOT / "tests" / "contracts" / "grade.schema.json").read_text())
FEVER_H = [24, 28, 32, 36]


def base() -> list[dict[str, Any]]:
    """An adult with grade-2 CRS (fever, then confirmed hypotension without pressors)."""
    return [patient(), cart(0), obs("29463-7", -12, 70, "kg"), *vitals_baseline(120, skip=set(map(float, FEVER_H))),
            *[temp(h, 39.0) for h in FEVER_H], *[bp(h, 118) for h in FEVER_H], bp(30, 82), bp(30.25, 84)]


def grades(out: dict[str, Any]) -> dict[str, Any]:
    return {(c["patient"], c["infusion"], fam, k): (v["grade"], v["onset"], v["max_at"], v["resolved"])
            for c in out["cases"] for fam in ("crs", "icans") for k, v in c[fam].items()}


def accounted(out: dict[str, Any]) -> None:
    assert out["resources_read"] == out["resources_used"] + len(out["skipped"])


# ---- 1. status normalisation ------------------------------------------------------------------

def _cond(status: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": SCT, "code": "91175000"}], "text": "Seizure"},
            "onsetDateTime": at(30), "verificationStatus": {"coding": [{"code": status}]}}


STATUS_ROWS = [
    # (resource, used?, reason part or flag)
    (temp(30, 39.5, status="Entered-In-Error"), False, "status entered-in-error"),
    (temp(30, 39.5, status="entered-in-error "), False, "status entered-in-error"),
    (temp(30, 39.5, status=" ENTERED_IN_ERROR"), False, "status entered-in-error"),
    (temp(30, 39.5, status="Entered In Error"), False, "status entered-in-error"),
    (temp(30, 39.5, status="CANCELLED"), False, "status cancelled"),
    (temp(30, 39.5, status="registered"), False, "no result yet"),
    (temp(30, 39.5, status="final-ish"), False, "unknown status 'final-ish'"),
    (temp(30, 39.5, status=3), False, "status is not a code"),
    (temp(30, 39.5, status="Final "), True, None),
    (temp(30, 39.5, status="Amended"), True, None),
    (temp(30, 39.5, status="preliminary"), True, None),
    (temp(30, 39.5, status="unknown"), True, "status_unknown"),
    (med(NE, 30, 34, rate=5, rate_unit="ug/min", status="Not-Done"), False, "status not-done"),
    (med(NE, 30, 34, rate=5, rate_unit="ug/min", status="entered-in-error\t"), False, "status entered-in-error"),
    (med(NE, 30, 34, rate=5, rate_unit="ug/min", status="Stopped"), True, None),
    (med(NE, 30, 34, rate=5, rate_unit="ug/min", status="on-hold"), True, "status_on_hold"),
    (med(NE, 30, 34, rate=5, rate_unit="ug/min", status="in-progress"), True, None),
    (med(NE, 30, 34, rate=5, rate_unit="ug/min", status="given"), False, "unknown status 'given'"),
    ({**proc("1258985005", 30, 40), "status": "Preparation"}, False, "status preparation (not started)"),
    ({**proc("1258985005", 30, 40), "status": "not-done "}, False, "status not-done"),
    ({**proc("1258985005", 30, 40), "status": "ENTERED-IN-ERROR"}, False, "status entered-in-error"),
    ({**proc("1258985005", 30, 40), "status": "stopped"}, True, None),
    (_cond("Refuted "), False, "verificationStatus refuted"),
    (_cond("entered_in_error"), False, "verificationStatus entered-in-error"),
    (_cond("Confirmed"), True, None),
    (_cond("maybe"), False, "unknown verificationStatus 'maybe'"),
]


@pytest.mark.parametrize(("res", "used", "why"), STATUS_ROWS, ids=[f"{r['resourceType']}-{r.get('status', 'vs')!r}" for r, _, _ in STATUS_ROWS])
def test_status_is_normalised_before_the_valid_decision(res, used, why):
    out = grade_resources([*base(), res]).to_json()
    accounted(out)
    ref = f"{res['resourceType']}/{res['id']}"
    mine = [s for s in out["skipped"] if s["resource"] == ref]
    if used:
        assert not mine, mine
        if why:
            assert why in out["cases"][0]["crs"]["astct"]["flags"]
    else:
        assert len(mine) == 1 and why in mine[0]["reason"], mine


def test_entered_in_error_fever_with_case_noise_never_opens_an_episode():
    rows = [patient(), cart(0), *vitals_baseline(72), temp(30, 39.6, status="Entered-In-Error ")]
    assert grade_resources(rows).to_json()["cases"][0]["crs"]["astct"]["grade"] == 0


# ---- 2. one version per Type/id ---------------------------------------------------------------

def _versioned(r: dict[str, Any], version: str | int | None, updated: str | None = None) -> dict[str, Any]:
    r = copy.deepcopy(r)
    meta = {}
    if version is not None:
        meta["versionId"] = version
    if updated:
        meta["lastUpdated"] = updated
    r["meta"] = meta
    return r


def _fever_versions(first: Any, second: Any, order: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same Observation twice: a 37.0 copy and a 39.5 copy (the fever)."""
    t = temp(30, 37.0)
    low = _versioned(t, *first) if isinstance(first, tuple) else _versioned(t, first)
    high = copy.deepcopy(low)
    high["valueQuantity"]["value"] = 39.5
    high["meta"] = _versioned(t, *second)["meta"] if isinstance(second, tuple) else _versioned(t, second)["meta"]
    return (low, high) if order == "low-first" else (high, low)


VERSION_ROWS = [
    # (meta of the 37.0 copy, meta of the 39.5 copy, input order, winner "high"/"low", superseded reason)
    ("1", "2", "low-first", "high", "superseded by version 2"),
    ("1", "2", "high-first", "high", "superseded by version 2"),
    ("9", "10", "high-first", "high", "superseded by version 10"),  # numeric, not string, compare
    (10, "9", "low-first", "low", "superseded by version 10"),
    (("3", "2025-03-11T08:00:00Z"), ("3", "2025-03-11T09:00:00Z"), "high-first", "high", "superseded by version 3"),
    ((None, "2025-03-11T08:00:00Z"), (None, "2025-03-11T09:00:00Z"), "high-first", "high", "superseded by a later copy"),
    (None, None, "low-first", "high", "superseded by a later copy"),  # no meta: last in input wins
    (None, None, "high-first", "low", "superseded by a later copy"),
]


@pytest.mark.parametrize(("a", "b", "order", "winner", "why"), VERSION_ROWS)
def test_one_version_per_type_id_reaches_the_mappers(a, b, order, winner, why):
    rows = [patient(), cart(0), *vitals_baseline(72), *_fever_versions(a, b, order)]
    out = grade_resources(rows).to_json()
    accounted(out)
    astct = out["cases"][0]["crs"]["astct"]
    assert astct["grade"] == (1 if winner == "high" else 0)
    sup = [s for s in out["skipped"] if "superseded" in s["reason"]]
    assert len(sup) == 1 and why in sup[0]["reason"], sup


def test_evidence_names_the_version_used_and_fits_the_contract():
    t = _versioned(temp(30, 39.5), "2")
    out = grade_resources([patient(), cart(0), *vitals_baseline(72), _versioned(temp(30, 37.0), "1") | {"id": t["id"]}, t]).to_json()
    jsonschema.validate(out, SCHEMA)
    astct = out["cases"][0]["crs"]["astct"]
    assert f"Observation/{t['id']}/_history/2" in astct["evidence"]
    assert {"resource": f"Observation/{t['id']}/_history/1", "reason": "superseded by version 2", "code": "superseded"} in out["skipped"]


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"fullUrl": f"http://x/fhir/{r['resourceType']}/{r['id']}", "resource": r} for r in resources]}


def test_versions_across_files_bundles_and_ndjson(tmp_path):
    rows = [patient(), cart(0), *vitals_baseline(72)]
    v1, v2 = _fever_versions("1", "2", "low-first")
    (tmp_path / "a.json").write_text(json.dumps(_bundle([*rows, v2])))
    (tmp_path / "b.ndjson").write_text(json.dumps(v1) + "\n")  # the older copy comes later, in another format
    out = grade_paths([tmp_path])
    accounted(out)
    assert out["cases"][0]["crs"]["astct"]["grade"] == 1
    assert [s["reason"] for s in out["skipped"] if "superseded" in s["reason"]] == ["superseded by version 2"]


def test_pages_of_a_pull_carry_the_same_resource_twice():
    """`$everything` / incremental pages: the server path deduplicates the same way."""
    rows = base()
    again = [copy.deepcopy(r) for r in rows[5:40]]
    assert grades(grade_resources([*rows, *again]).to_json()) == grades(grade_resources(rows).to_json())


# ---- 3. coded reasons first; negated text never counts ----------------------------------------

def _ppv_case(reason: dict[str, Any] | None) -> dict[str, Any]:
    intub = proc("112798008", 30)
    if reason is not None:
        intub["reasonCode"] = [reason]
    rows = [patient(), cart(0), *vitals_baseline(120, skip=set(map(float, FEVER_H))), *[temp(h, 39.0) for h in FEVER_H],
            *[bp(h, 118) for h in FEVER_H], obs("59408-5", 29, 97, "%"), intub, proc("1258985005", 30, 40)]
    return grade_resources(rows).to_json()["cases"][0]["crs"]["astct"]


REASON_ROWS = [
    # (reasonCode, counts for CRS?, matched_by_text flag expected)
    ({"coding": [{"system": SCT, "code": "91175000", "display": "Seizure"}]}, False, False),
    ({"coding": [{"system": SCT, "code": "91175000"}], "text": "hypoxemic respiratory failure"}, False, False),  # the code decides
    ({"coding": [{"system": SCT, "code": "389087006", "display": "Hypoxemia"}], "text": "airway protection"}, True, False),
    ({"coding": [{"system": "http://hospital.example.org/fhir/CodeSystem/indications", "code": "AIRWAY-PROTECTION"}]}, False, False),
    ({"text": "hypoxemic respiratory failure"}, True, True),
    ({"text": "not for hypoxemia"}, False, False),  # negated: falls back to the hypoxia look-back (none)
    ({"text": "no hypoxia; airway protection after seizure"}, False, True),
    ({"text": "hypoxia ruled out, intubated to protect the airway"}, False, True),
    ({"text": "r/o respiratory failure"}, False, False),
    (None, False, False),
]


@pytest.mark.parametrize(("reason", "counts", "by_text"), REASON_ROWS)
def test_positive_pressure_indication_code_first_then_text_negation_aware(reason, counts, by_text):
    astct = _ppv_case(reason)
    assert astct["grade"] == (4 if counts else 1), astct["criteria"][-2:]
    assert ("ppv_not_attributed" in astct["flags"]) is (not counts)
    if counts:
        assert ("matched_by_text" in astct["flags"]) is by_text


def _condition(cid: str, code: dict[str, Any], recorded_h: float = 29.5, status: str = "confirmed") -> dict[str, Any]:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": "Patient/p1"}, "code": code,
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": status}]},
            "recordedDate": at(recorded_h)}


def _ppv_with_reference(conditions: list[dict[str, Any]], ref: str, contained: dict[str, Any] | None = None,
                        reason_text: str | None = None) -> dict[str, Any]:
    """_ppv_case, the intubation's indication given only by `reasonReference` (no display)."""
    intub = proc("112798008", 30)
    intub["reasonReference"] = [{"reference": ref}]
    if contained is not None:
        intub["contained"] = [contained]
    if reason_text is not None:
        intub["reasonCode"] = [{"text": reason_text}]
    rows = [patient(), cart(0), *vitals_baseline(120, skip=set(map(float, FEVER_H))), *[temp(h, 39.0) for h in FEVER_H],
            *[bp(h, 118) for h in FEVER_H], obs("59408-5", 29, 97, "%"), intub, proc("1258985005", 30, 40), *conditions]
    out = grade_resources(rows).to_json()
    return out["cases"][0]["crs"]["astct"] | {"_skipped": out["skipped"]}


RESP_FAILURE = {"coding": [{"system": SCT, "code": "409622000"}]}  # coded only: no text, no display
SEIZURE = {"coding": [{"system": SCT, "code": "91175000"}]}


@pytest.mark.parametrize(("conditions", "ref", "contained", "reason_text", "counts", "by_text"), [
    # a coded respiratory failure Condition (problem list, no display on the reference): PPV counts
    ([_condition("rf1", RESP_FAILURE)], "Condition/rf1", None, None, True, False),
    ([_condition("rf1", RESP_FAILURE)], "https://ehr.example.org/fhir/Condition/rf1/_history/2", None, None, True, False),
    # recorded long before day 0: a reason, whatever its time (not a finding of the course)
    ([_condition("rf1", RESP_FAILURE, recorded_h=-400)], "Condition/rf1", None, None, True, False),
    ([], "#c1", {**_condition("c1", RESP_FAILURE), "subject": None}, None, True, False),  # contained
    ([_condition("rf1", {"text": "acute hypoxemic respiratory failure"})], "Condition/rf1", None, None, True, True),
    # seizure (a Condition fhir-crs grades ICANS from) as the reason: not hypoxic, PPV does not count
    ([_condition("sz1", SEIZURE)], "Condition/sz1", None, None, False, False),
    # the Procedure's own text says respiratory failure, the Condition seizure: both join, and
    # respiratory failure wins (a finding that raises a grade is never hidden), flagged by text
    ([_condition("sz1", SEIZURE)], "Condition/sz1", None, "hypoxemic respiratory failure", True, True),
    # a refuted Condition is no indication; a reference to a Condition not in the input neither
    ([_condition("rf1", RESP_FAILURE, status="refuted")], "Condition/rf1", None, None, False, False),
    ([], "Condition/elsewhere", None, None, False, False),
])
def test_positive_pressure_indication_from_a_referenced_condition(conditions, ref, contained, reason_text, counts, by_text):
    """Procedure.reasonReference -> Condition: before, only the reference's display was read,
    so a coded problem-list Condition behind a bare reference was lost as an indication."""
    astct = _ppv_with_reference(conditions, ref, contained, reason_text)
    assert astct["grade"] == (4 if counts else 1), astct["criteria"][-2:]
    assert ("ppv_not_attributed" in astct["flags"]) is (not counts)
    if counts:
        assert ("matched_by_text" in astct["flags"]) is by_text
        for c in conditions:  # the Condition that decided the indication is cited beside the Procedure
            assert f"Condition/{c['id']}" in astct["evidence"], astct["evidence"]
    skipped = {s["resource"]: s["code"] for s in astct["_skipped"]}
    for c in conditions:
        if c["verificationStatus"]["coding"][0]["code"] == "confirmed":
            assert f"Condition/{c['id']}" not in skipped  # used (its classes were read), not condition_not_used


def test_site_local_indication_code_in_the_editable_table(tmp_path):
    d = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", d)
    table = (d / "reasons.toml").read_text().replace('"http://hospital.example.org/fhir/CodeSystem/indications|RESP-FAILURE",',
                                                       '"http://hospital.example.org/fhir/CodeSystem/indications|RESP-FAILURE", "urn:site|RF1",')
    (d / "reasons.toml").write_text(table)
    intub = proc("112798008", 30)
    intub["reasonCode"] = [{"coding": [{"system": "urn:site", "code": "RF1"}], "text": "not hypoxic"}]
    rows = [patient(), cart(0), *vitals_baseline(120, skip=set(map(float, FEVER_H))), *[temp(h, 39.0) for h in FEVER_H],
            intub, proc("1258985005", 30, 40)]
    astct = grade_resources(rows, mappings_dir=d).to_json()["cases"][0]["crs"]["astct"]
    assert astct["grade"] == 4 and "matched_by_text" not in astct["flags"]


@pytest.mark.parametrize(("text", "home"), [("home CPAP for OSA", True), ("not home CPAP", False), ("no sleep apnea", False)])
def test_home_baseline_reason_is_negation_aware(text, home):
    cpap = proc("47545007", 30, 40)
    cpap["reasonCode"] = [{"text": text}]
    rows = [patient(), cart(0), *vitals_baseline(120, skip=set(map(float, FEVER_H))), *[temp(h, 39.0) for h in FEVER_H],
            obs("59408-5", 29, 86, "%"), cpap]
    astct = grade_resources(rows).to_json()["cases"][0]["crs"]["astct"]
    assert astct["grade"] == (1 if home else 4)


def _fluid_case(reason: dict[str, Any] | None, dosage_text: str | None = None) -> dict[str, Any]:
    fluid = med("313002", 30.2, 30.5, dose=100, dose_unit="mL", dosage_text=dosage_text)  # below the 250 mL bolus volume
    if reason is not None:
        fluid["reasonCode"] = [reason]
    rows = [patient(), cart(0), obs("29463-7", -12, 70, "kg"), *vitals_baseline(120, skip=set(map(float, FEVER_H))),
            *[temp(h, 39.0) for h in FEVER_H], bp(30, 82), fluid]
    return grade_resources(rows).to_json()["cases"][0]["crs"]["astct"]


@pytest.mark.parametrize(("reason", "dosage_text", "treated", "by_text"), [
    ({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I95.9"}]}, None, True, False),
    ({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I95.9"}], "text": "maintenance"}, None, True, False),
    ({"text": "fluid resuscitation for hypotension"}, None, True, True),
    ({"text": "not for hypotension, maintenance"}, None, False, False),
    ({"text": "no shock"}, None, False, False),
    (None, "500 mL bolus", True, False),
    (None, "not a bolus: carrier fluid", False, False),
    (None, None, False, False),
])
def test_fluids_for_hypotension_coded_first_negation_aware(reason, dosage_text, treated, by_text):
    """One low SBP counts as hypotension only when treated (§1.3): a fluid treats it when it is a
    bolus — by volume, by an affirmed 'bolus', or given FOR hypotension (coded reason first)."""
    astct = _fluid_case(reason, dosage_text)
    assert astct["grade"] == (2 if treated else 1), astct["criteria"][-2:]
    if treated:
        assert ("matched_by_text" in astct["flags"]) is by_text


HYPOTENSION = {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I95.9"}]}  # coded only


@pytest.mark.parametrize(("conditions", "ref", "contained", "treated", "by_text"), [
    ([_condition("hy1", HYPOTENSION)], "Condition/hy1", None, True, False),
    ([], "#c1", {**_condition("c1", HYPOTENSION), "subject": None}, True, False),
    ([_condition("hy1", {"text": "hypotension"})], "Condition/hy1", None, True, True),
    ([{k: v for k, v in _condition("hy1", HYPOTENSION).items() if k != "recordedDate"}], "Condition/hy1", None, True, False),  # undated
    ([{**_condition("hy1", HYPOTENSION), "recordedDate": "2025-03-10"}], "Condition/hy1", None, True, False),  # a date only
    ([_condition("hy1", HYPOTENSION, status="refuted")], "Condition/hy1", None, False, False),
    ([_condition("rf1", RESP_FAILURE)], "Condition/rf1", None, False, False),  # a reason, not hypotension
    ([], "Condition/elsewhere", None, False, False),
])
def test_a_fluid_given_for_a_referenced_hypotension_condition_is_a_bolus(conditions, ref, contained, treated, by_text):
    """MedicationAdministration.reasonReference -> the patient's hypotension Condition: the
    100 mL fluid treats the single low SBP (§1.3), and the Condition is cited with it."""
    fluid = med("313002", 30.2, 30.5, dose=100, dose_unit="mL")
    fluid["reasonReference"] = [{"reference": ref}]
    if contained is not None:
        fluid["contained"] = [*fluid.get("contained", []), contained]
    rows = [patient(), cart(0), obs("29463-7", -12, 70, "kg"), *vitals_baseline(120, skip=set(map(float, FEVER_H))),
            *[temp(h, 39.0) for h in FEVER_H], bp(30, 82), fluid, *conditions]
    astct = grade_resources(rows).to_json()["cases"][0]["crs"]["astct"]
    assert astct["grade"] == (2 if treated else 1), astct["criteria"][-2:]
    if treated:
        assert ("matched_by_text" in astct["flags"]) is by_text
        for c in conditions:
            assert f"Condition/{c['id']}" in astct["evidence"], astct["evidence"]


# ---- 4. a severe second episode counts by default ---------------------------------------------

def _biphasic() -> list[dict[str, Any]]:
    """Episode 1: fever only (grade 1). Episode 2 on D8: fever, hypotension, norepinephrine, with
    ferritin 6 x day 0 — ferritin rises in CRS itself."""
    rows = [patient(), cart(0), obs("29463-7", -12, 70, "kg"), *vitals_baseline(240, skip={24.0, 28.0, 192.0, 196.0, 200.0}),
            temp(24, 39.0), temp(28, 38.6), obs("2276-4", -2, 800, "ng/mL")]
    rows += [temp(192, 39.4), temp(196, 39.1), temp(200, 38.8), bp(192, 118), bp(196, 78), bp(196.25, 80),
             med(NE, 196.5, 206, rate=8, rate_unit="ug/min"), bp(200, 95), obs("2276-4", 194, 4800, "ng/mL")]
    return rows


def test_severe_second_episode_counts_and_is_flagged_for_attribution():
    out = grade_resources(_biphasic()).to_json()
    astct = out["cases"][0]["crs"]["astct"]
    assert astct["grade"] == 3
    assert {"attribution_needed", "possible_iec_hs", "post_crs_hyperinflammation"} <= set(astct["flags"])
    assert all(e["counted"] for e in astct["episodes"])
    assert any(c["setting"] == "exclude_provisional_episodes" and c["value"] is False for c in astct["conventions"])


def test_excluding_attribution_episodes_is_a_reported_setting():
    s = load_settings(ROOT / "mappings", ["exclude_provisional_episodes=true"])
    astct = grade_resources(_biphasic(), s).to_json()["cases"][0]["crs"]["astct"]
    assert astct["grade"] == 1
    assert any(c["setting"] == "exclude_provisional_episodes" and c["value"] is True for c in astct["conventions"])
    assert [e["counted"] for e in astct["episodes"]] == [True, False]


@pytest.mark.parametrize(("vid", "system", "grade", "flags"), [
    ("V21", "astct", 4, {"attribution_needed", "positive_blood_culture"}),
    ("V37", "astct", 1, {"attribution_needed", "late_onset", "positive_blood_culture"}),
    ("V42", "lee2014", 3, {"attribution_needed", "possible_iec_hs"}),
])
def test_vignettes_with_adjudicated_maxima_default_to_counting_and_flagging(vid, system, grade, flags):
    """The vignette tables are adjudicated (tests/test_vignettes.py grades them with the reviewer's
    setting); unadjudicated, the default counts the second episode and flags it — never grade 5."""
    case = grade_paths([VIGNETTES / f"{vid}.json"])["cases"][0]
    r = case["crs"][system]
    assert r["grade"] == grade and flags <= set(r["flags"]), (r["grade"], r["flags"])
    assert case["crs"]["astct"]["grade"] < 5 and "grade5_candidate" not in case["crs"]["astct"]["flags"]


# ---- 5. one bad value must not lose its neighbours --------------------------------------------

def _line(r: dict[str, Any]) -> str:
    return json.dumps(r)


def _bad_sbp(text_value: str) -> str:
    r = bp(50, 120)
    r["id"] = "corrupt"
    return _line(r).replace('"value": 120', f'"value": {text_value}')


def _with(r: dict[str, Any], **changes: Any) -> str:
    r = copy.deepcopy(r)
    r["id"] = "corrupt"
    r.update(changes)
    return _line(r)


def _period(start: str, end: str | None = None) -> dict[str, Any]:
    return {"start": start, **({"end": end} if end else {})}


# Each corrupt NDJSON line is ONE resource (Observation/corrupt, …): it must become exactly one
# skip whose reason names the problem, and change no grade.
CORRUPT_LINES = {
    "overflow 1e309": (_bad_sbp("1e309"), "unreadable number"),
    "huge integer": (_bad_sbp("9" * 5000), "unreadable number"),
    "NaN literal": (_bad_sbp("NaN"), "unreadable number"),
    "Infinity literal": (_bad_sbp("Infinity"), "unreadable number"),
    "-Infinity literal": (_bad_sbp("-Infinity"), "unreadable number"),
    "offset +25:00": (_with(temp(50, 39.5), effectiveDateTime="2025-03-12T10:00:00+25:00"), "UTC offset +25:00"),
    "month 13": (_with(temp(50, 39.5), effectiveDateTime="2025-13-12T10:00:00Z"), "month 13"),
    "day 32": (_with(temp(50, 39.5), effectiveDateTime="2025-03-32T10:00:00Z"), "day 32"),
    "leap second": (_with(temp(50, 39.5), effectiveDateTime="2025-03-12T23:59:60Z"), "second 60"),
    "impossible infusion end": (_with(med(NE, 50, 52, rate=5, rate_unit="ug/min"), effectivePeriod=_period(at(50), "2025-03-12T10:61:00Z")), "minute 61"),
    "negative norepinephrine": (_with(med(NE, 50, 54, rate=-5, rate_unit="ug/min")), "negative rate"),
    "absurd norepinephrine": (_with(med(NE, 50, 54, rate=150, rate_unit="ug/kg/min")), "above the plausible 100 ug/kg/min"),
    "zero-duration infusion": (_with(med(NE, 50, 50, rate=8, rate_unit="ug/min")), "zero-length"),
    "negative dose": (_with(med("313002", 50, 50.5, dose=-500, dose_unit="mL", dosage_text="bolus")), "negative dose"),
    "absurd fluid volume": (_with(med("313002", 50, 50.5, dose=50, dose_unit="L", dosage_text="bolus")), "above the plausible 10000 mL"),
    "SBP 400": (_with(obs("8480-6", 50, 400, "mm[Hg]")), "implausible value"),
    "SpO2 150": (_with(obs("59408-5", 50, 150, "%")), "implausible value"),
    "FiO2 250": (_with(obs("3150-0", 50, 250, "%")), "implausible value"),
    "O2 flow 200": (_with(obs("3151-8", 50, 200, "L/min")), "implausible value"),
    "weight 900": (_with(obs("29463-7", 50, 900, "kg")), "implausible value"),
    "ALT negative": (_with(obs("1742-6", 50, -5, "U/L")), "implausible value"),
    "creatinine 90": (_with(obs("2160-0", 50, 90, "mg/dL")), "implausible value"),
    "unresolved urn:uuid": (_with(temp(50, 39.5), subject={"reference": "urn:uuid:0b6a3c2e-0000-4000-8000-000000000000"}), "unresolved reference"),
    "not JSON": ('{"resourceType": "Observation", "id": "corrupt", "status": "fin', "not valid JSON"),
}


def _ndjson(tmp: Path, rows: list[dict[str, Any]], extra: str | None = None, at_line: int = 0) -> Path:
    lines = [_line(r) for r in rows]
    if extra is not None:
        lines.insert(at_line % (len(lines) + 1), extra)
    p = tmp / "input.ndjson"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.mark.parametrize("name", list(CORRUPT_LINES))
def test_one_corrupt_resource_is_one_named_skip_and_the_rest_is_graded(tmp_path, name):
    line, why = CORRUPT_LINES[name]
    before = grade_paths([_ndjson(tmp_path, base())])
    after = grade_paths([_ndjson(tmp_path, base(), line, at_line=7)])
    accounted(after)
    assert grades(after) == grades(before)
    new = [s for s in after["skipped"] if s not in before["skipped"]]
    assert len(new) == 1 and len(after["skipped"]) == len(before["skipped"]) + 1, new
    assert why in new[0]["reason"], new


@pytest.mark.parametrize("where", ["file", "line"])
def test_byte_order_mark_is_read(tmp_path, where):
    rows = base()
    p = _ndjson(tmp_path, rows)
    data = p.read_bytes()
    if where == "file":
        p.write_bytes(b"\xef\xbb\xbf" + data)
    else:
        lines = data.split(b"\n")
        p.write_bytes(b"\n".join(b"\xef\xbb\xbf" + ln if ln else ln for ln in lines))
    bundle = tmp_path / "bundle.json"
    bundle.write_bytes(b"\xef\xbb\xbf" + orjson.dumps(_bundle(rows)))
    for path in (p, bundle):
        out = grade_paths([path])
        assert grades(out) == grades(grade_resources(rows).to_json()) and len(out["cases"]) == 1


def test_lone_surrogates_are_read_and_printed(tmp_path):
    note = temp(50, 37.0)
    note["note"] = [{"text": "PLACEHOLDER"}]
    line = _line(note).replace("PLACEHOLDER", "pt moved \\ud800 probe")
    p = _ndjson(tmp_path, base(), line, 3)
    runner = CliRunner()
    res = runner.invoke(cli, ["grade", str(p), "--show-skips"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["grade", str(p), "--json"])
    assert res.exit_code == 0
    out = json.loads(res.output)
    accounted(out)
    assert grades(out) == grades(grade_resources(base()).to_json())


@pytest.mark.parametrize(("entry", "where", "why"), [
    ({"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111"}, "urn:uuid:11111111-1111-4111-8111-111111111111", "no resource"),
    ({"fullUrl": "http://x/fhir/Observation/gone", "resource": None}, "http://x/fhir/Observation/gone", "resource is null"),
    ({"request": {"method": "DELETE", "url": "Observation/gone"}}, "#entry[", "a DELETE entry"),
    ({"resource": None}, "#entry[", "resource is null"),
    ("not an object", "#entry[", "not a JSON object"),
])
def test_bundle_entries_without_a_resource_are_counted_skips(tmp_path, entry, where, why):
    rows = base()
    b = _bundle(rows)
    b["entry"].insert(3, entry)
    p = tmp_path / "b.json"
    p.write_text(json.dumps(b))
    out = grade_paths([p])
    accounted(out)
    assert grades(out) == grades(grade_resources(rows).to_json())
    (s,) = [s for s in out["skipped"] if "Bundle entry" in s["reason"]]
    assert where in s["resource"] and why in s["reason"]


def test_a_file_that_cannot_be_parsed_is_one_skip_naming_the_file(tmp_path):
    """In a folder, an unparsable file is one skip; named alone on the command line it is exit 3
    (issue 14: an input path that yields nothing)."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_bundle(base())))
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(_bundle(base()))[:-200])
    out = grade_paths([tmp_path])
    accounted(out)
    (s,) = [s for s in out["skipped"] if s["resource"] == str(bad)]
    assert s["code"] == "invalid_json" and len(out["skipped"]) == len(grade_paths([good])["skipped"]) + 1
    assert grades(out) == grades(grade_paths([good]))


# ---- 6. counts add up -------------------------------------------------------------------------

def test_grade_prints_and_reports_resources_read_used_and_skipped(tmp_path):
    p = _ndjson(tmp_path, [*base(), {"resourceType": "Encounter", "id": "e1"}], CORRUPT_LINES["NaN literal"][0], 5)
    runner = CliRunner()
    res = runner.invoke(cli, ["grade", str(p), "--json"])
    out = json.loads(res.output)
    jsonschema.validate(out, SCHEMA)
    accounted(out)
    assert out["resources_read"] == len(base()) + 2 and len(out["skipped"]) == 2
    text = runner.invoke(cli, ["grade", str(p)]).output
    assert f"{out['resources_read']} resource(s) read: {out['resources_used']} used, 2 skipped" in text


def test_patient_without_infusion_counts_each_of_its_resources():
    rows = [patient("p2"), *vitals_baseline(12, pid="p2")]
    out = grade_resources([*base(), *rows]).to_json()
    accounted(out)
    assert sum("no CAR-T infusion" in s["reason"] for s in out["skipped"]) == len(rows)


# ---- plausibility table validation ------------------------------------------------------------

@pytest.mark.parametrize(("file", "text", "message"), [
    ("plausibility.toml", "\n[observations.sbp2]\nmin = 1.0\nmax = 2.0\n", "unknown kind [observations.sbp2]"),
    ("plausibility.toml", "\n[observations.il6]\nmin = 5.0\nmax = 1.0\n", "already"),
    ("plausibility.toml", "\n[medications.painkiller]\nmax_ml = 5.0\n", "unknown drug class"),
    ("plausibility.toml", "\n[medications.sedative]\nmax_ml = -5.0\n", "must be above 0"),
    ("plausibility.toml", "\n[medications.sedative]\nmax_mg = 5.0\n", "unknown key 'max_mg'"),
    ("observations.toml", "\n[weight]\nmin = 1.0\n", "moved to plausibility.toml"),
])
def test_plausibility_table_is_validated_on_load(tmp_path, file, text, message):
    d = tmp_path / "m"
    shutil.copytree(ROOT / "mappings", d)
    path = d / file
    if message == "already":  # a range with min above max, in place of the shipped one
        path.write_text(path.read_text().replace("[observations.il6]        # pg/mL\nmin = 0.0\nmax = 1000000.0", "[observations.il6]\nmin = 5.0\nmax = 1.0"))
        message = "min 5 must be below max 1"
    elif file == "observations.toml":
        path.write_text(path.read_text().replace('[weight]\n', '[weight]\nmin = 1.0\n', 1))
    else:
        path.write_text(path.read_text() + text)
    with pytest.raises(MappingFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_code_map(d)


def test_ranges_in_the_table_decide_quarantine(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ROOT / "mappings", d)
    text = (d / "plausibility.toml").read_text().replace("[observations.sbp]\nmin = 20.0\nmax = 300.0", "[observations.sbp]\nmin = 60.0\nmax = 300.0")
    (d / "plausibility.toml").write_text(text)
    rows = [*base(), {**obs("8480-6", 50, 55, "mm[Hg]"), "id": "sbp55"}]
    out = grade_resources(rows, mappings_dir=d).to_json()
    assert any(s["resource"] == "Observation/sbp55" and "implausible value 55" in s["reason"] for s in out["skipped"])


# ---- properties ---------------------------------------------------------------------------------

hours = st.floats(min_value=0, max_value=110).map(lambda h: round(h * 4) / 4)


@st.composite
def valid_input(draw: st.DrawFn) -> list[dict[str, Any]]:
    onset = draw(st.integers(1, 48))
    fevers = list(range(onset, onset + draw(st.integers(0, 24)) + 1, 4))
    rows = [patient(birth=draw(st.sampled_from(["1970-05-01", "2016-05-01"]))), cart(0), obs("29463-7", -12, 60, "kg"),
            *vitals_baseline(120, skip=set(map(float, fevers))), *[temp(h, 39.0) for h in fevers]]
    for _ in range(draw(st.integers(0, 3))):
        x = draw(hours)
        kind = draw(st.sampled_from(["hypo", "pressor", "o2", "ppv"]))
        if kind == "hypo":
            rows += [bp(x, 80), bp(x + 0.25, 82)]
        elif kind == "pressor":
            rows += [bp(x, 75), med(NE, x + 0.1, x + draw(st.floats(1, 30)), rate=draw(st.floats(1, 40)), rate_unit="ug/min")]
        elif kind == "o2":
            rows += [obs("59408-5", x, 88, "%"), proc("371907003", x + 0.1, x + 6)]
        else:
            rows += [obs("59408-5", x, 85, "%"), proc("112798008", x + 0.5, reason="hypoxemic respiratory failure"),
                     proc("1258985005", x + 0.5, x + 10)]
    return rows


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rows=valid_input(), corrupt=st.sampled_from(sorted(CORRUPT_LINES)), position=st.integers(0, 10_000))
def test_inserting_one_corrupt_resource_changes_no_grade_and_adds_one_skip(rows, corrupt, position):
    with tempfile.TemporaryDirectory() as tmp:
        before = grade_paths([_ndjson(Path(tmp), rows)])
        after = grade_paths([_ndjson(Path(tmp), rows, CORRUPT_LINES[corrupt][0], position)])
    assert grades(after) == grades(before)
    assert len(after["skipped"]) == len(before["skipped"]) + 1
    accounted(after)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rows=valid_input(), seed=st.integers(0, 2**32 - 1))
def test_grading_is_invariant_to_input_order_and_to_a_duplicated_file(rows, seed):
    want = grades(grade_resources(rows).to_json())
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    assert grades(grade_resources(shuffled).to_json()) == want
    out = grade_resources([*rows, *copy.deepcopy(rows)]).to_json()  # the same file read twice
    assert grades(out) == want
    assert sum("superseded" in s["reason"] for s in out["skipped"]) == len(rows)


@pytest.mark.parametrize("vid", sorted(p.stem for p in VIGNETTES.glob("*.json")))
def test_vignettes_are_invariant_to_entry_order_and_to_a_duplicated_file(tmp_path, vid):
    src = VIGNETTES / f"{vid}.json"
    want = grades(grade_paths([src]))
    b = json.loads(src.read_text())
    random.Random(vid).shuffle(b["entry"])
    (tmp_path / "shuffled.json").write_text(json.dumps(b))
    assert grades(grade_paths([tmp_path / "shuffled.json"])) == want
    shutil.copy(src, tmp_path / "copy.json")
    out = grade_paths([tmp_path / "shuffled.json", tmp_path / "copy.json"])
    accounted(out)
    assert grades(out) == want
