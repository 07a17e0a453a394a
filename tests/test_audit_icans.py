"""Audit of 2026-12-04, ICANS and CRES (grading-criteria §3, §7.2): one test per rule fixed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from factory import SCT, T0, at, cart, loc, med, obs, patient, score, vitals_baseline

from fhir_crs.pipeline import grade_resources
from fhir_crs.settings import load_settings

ADULT, TEEN13 = "1970-01-01", "2011-06-01"


def graded(*rows: dict[str, Any], birth: str = ADULT, deceased_h: float | None = None,
           settings: list[str] | None = None) -> dict[str, Any]:
    s = load_settings(None, settings) if settings else None
    run = grade_resources([patient(birth=birth, deceased_h=deceased_h), cart(0), *vitals_baseline(240), *rows], s).to_json()
    return run["cases"][0]["icans"]


def ice(h: float, v: int) -> dict[str, Any]:
    return score("ICE-SCORE", h, v, display="ICE score")


def seizure(h: float, text: str, minutes: float | None = None) -> dict[str, Any]:
    r = obs("91175000", h, {"text": text}, system=SCT)
    if minutes is not None:
        del r["effectiveDateTime"]
        end = T0 + timedelta(hours=h, minutes=minutes)
        r["effectivePeriod"] = {"start": at(h), "end": end.isoformat().replace("+00:00", "Z")}
    return r


def finding(code: str, h: float, text: str, system: str = SCT) -> dict[str, Any]:
    return obs(code, h, {"text": text}, system=system)


NORMAL = (ice(60, 10), ice(100, 10), ice(124, 10), ice(148, 10))
MOTOR = ("MOTOR-WEAKNESS", "http://hospital.example.org/fhir/CodeSystem/flowsheet")


@pytest.mark.parametrize(
    ("row", "grade"),
    [
        (seizure(72, "No prior history of epilepsy. Generalized tonic-clonic seizure", 2), 3),
        (finding("2032001", 72, "No midline shift. Diffuse cerebral edema."), 4),
        (finding(*MOTOR[:1], 72, "Normal tone; new left hemiparesis", system=MOTOR[1]), 4),
        (seizure(72, "No seizure. Resting comfortably."), 1),
        (finding(*MOTOR[:1], 72, "Normal tone. Moves all extremities.", system=MOTOR[1]), 1),
    ],
)
def test_negation_is_read_clause_by_clause(row, grade):
    """A negated first clause negates only itself; a later clause naming the finding counts,
    one naming nothing relevant does not (§3.2)."""
    assert graded(ice(71, 8), row, *NORMAL)["astct"]["grade"] == grade


def test_edema_not_improved_is_not_resolution():
    r = graded(ice(72, 8), ice(96, 8), finding("2032001", 97, "Diffuse cerebral edema, not improved compared with prior"),
               ice(110, 10), ice(134, 10), ice(158, 10))["astct"]
    assert (r["grade"], r["max_at"]) == (4, at(97)) and "imaging_resolved" not in r


@pytest.mark.parametrize(
    ("between", "grade", "flag"),
    [
        ([ice(71.25, 1)], 4, None),  # assessed, not at baseline: repetitive (§3.2 grade 4)
        ([], 3, "repetitive_seizures_baseline_unknown"),  # nothing assessed between: flagged, not assumed
        ([ice(71.25, 10), loc(71.25, "Alert")], 3, None),  # back at baseline between them
    ],
)
def test_repetitive_seizures_without_return_to_baseline(between, grade, flag):
    rows = [seizure(71, "Focal seizure", 2), *between, seizure(71.5, "Focal seizure", 2), ice(72, 8), *NORMAL]
    r = graded(*rows)
    assert r["astct"]["grade"] == grade and r["cartox_cres"]["grade"] == grade
    if flag:
        assert flag in r["astct"]["flags"] and flag in r["cartox_cres"]["flags"]
    else:
        assert "repetitive_seizures_baseline_unknown" not in r["astct"]["flags"]


def test_death_during_active_icans():
    """No documented cause: grade 5 candidate (adjudicate); a documented other cause keeps the
    pre-death maximum and says so (§1.8, as CRS)."""
    rows = [ice(72, 2), ice(76, 2)]
    r = graded(*rows, deceased_h=80)["astct"]
    assert (r["grade"], r["max_at"]) == (5, at(80)) and "grade5_candidate" in r["flags"]
    r = graded(*rows, obs("69453-9", 80, "Septic shock from E. coli bacteremia"), deceased_h=80)["astct"]
    assert r["grade"] == 3 and "death_alternative_cause" in r["flags"] and "grade5_candidate" not in r["flags"]


@pytest.mark.parametrize("text", ["Not arousable", "non-arousable", "cannot be roused", "unrousable"])
def test_not_arousable_wordings_are_unarousable(text):
    r = graded(ice(72, 0), loc(72, text), *NORMAL)
    assert r["astct"]["grade"] == 4 and r["cartox_cres"]["grade"] == 4


@pytest.mark.parametrize(
    ("minutes", "setting", "grade"),
    [(4, "seizure_status_min=3", 4), (6, "seizure_status_min=10", 3), (6, None, 4), (5, None, 3)],
)
def test_seizure_duration_is_compared_with_the_setting(minutes, setting, grade):
    r = graded(seizure(71, "Focal seizure", minutes), ice(72, 8), *NORMAL, settings=[setting] if setting else None)["astct"]
    assert r["grade"] == grade
    assert "seizure_status_min" in {c["setting"] for c in r["conventions"]}


def test_ice_and_capd_both_charted_are_flagged_at_any_age_from_12():
    r = graded(ice(72, 10), score("CAPD-TOTAL", 72, 12), *NORMAL, birth=TEEN13)["astct"]
    assert r["grade"] == 0 and "ice_capd_both_charted" in r["flags"]


def test_cres_flags_unspecified_seizure_and_sedated_unarousable():
    r = graded(seizure(71, "Seizure", 1), ice(72, 8), *NORMAL)["cartox_cres"]
    assert r["grade"] == 3 and "seizure_type_unspecified" in r["flags"]
    sedated = [med(None, 70, 76, text="Propofol infusion", rate=50, rate_unit="ug/kg/min"), loc(72, "Unarousable"),
               obs("ICE-SCORE", 72, system="http://hospital.example.org/fhir/CodeSystem/flowsheet",
                   dataAbsentReason={"text": "unable to perform"})]
    r = graded(*sedated, *NORMAL)["cartox_cres"]
    assert r["grade"] == 0 and "sedation_confounded" in r["flags"]


@pytest.mark.parametrize(("value", "grade"), [(-1, 2), (-2, 2), (-3, 2), (-4, 3), (-5, 4), (0, 0)])
def test_rass_levels_grade_by_what_they_mean(value, grade):
    """RASS -1 "sustained awakening to voice" is ASTCT "awakens to voice" (grade 2) (§3.2)."""
    r = graded(ice(72, 9), obs("1345050000", 72, value, "{score}", system=SCT), *NORMAL)["astct"]
    assert r["grade"] == max(grade, 1)
    assert ("rass_used" in r["flags"]) == (grade > 1)


@pytest.mark.parametrize(("minutes", "kind", "severity"), [(6, "status epilepticus", "4"), (2, "other", "3")])
def test_cibmtr_reports_a_seizure_prolonged_by_its_duration_as_status(minutes, kind, severity):
    # Form 4100 Q107/Q109: a seizure graded 4 because it outlasted seizure_status_min is status
    # epilepticus (the duration is no longer folded into the mapped seizure type)
    from fhir_crs.cibmtr import cibmtr_rows

    rows = [seizure(71, "Focal seizure", minutes), ice(72, 8), *NORMAL]
    run = grade_resources([patient(birth=ADULT), cart(0), *vitals_baseline(240), *rows]).to_json()
    (row,) = cibmtr_rows(run)
    assert (row["q107_seizure_type"], row["q109_seizure_severity"]) == (kind, severity)


@pytest.mark.parametrize(("value", "unit", "cres"), [(30, "cm[H2O]", 4), (20, "cmH2O", 1), (21, "mm[Hg]", 4), (19, "mm[Hg]", 1)])
def test_csf_opening_pressure_is_cres_raised_icp_in_mmhg(value, unit, cres):
    # §7.2: CSF opening pressure >= 20 mmHg is CRES grade 4; charted in cmH2O it is converted
    # first (30 cmH2O = 22 mmHg; 20 cmH2O = 14.7 mmHg is not raised). ASTCT ICANS has no such row.
    op = obs("CSF-OPENING-PRESSURE", 71, value, unit, system="http://hospital.example.org/fhir/CodeSystem/flowsheet")
    r = graded(op, ice(70, 8), ice(72, 8), *NORMAL)
    assert r["cartox_cres"]["grade"] == cres
    assert r["astct"]["grade"] == 1
    if cres == 4:
        assert op["id"] in " ".join(r["cartox_cres"]["evidence"])


def test_csf_opening_pressure_read_by_text_is_flagged():
    op = obs("LP-OP", 71, 35, "cmH2O", system="urn:site:lab", display="CSF opening pressure")
    r = graded(op, ice(70, 8), ice(72, 8), *NORMAL)
    assert r["cartox_cres"]["grade"] == 4


# ---- round 2 (neuro free-text and coded readers) ----------------------------------------------

FLOW = "http://hospital.example.org/fhir/CodeSystem/flowsheet"


def coded(code: str, h: float, answer: str, system: str = SCT) -> dict[str, Any]:
    """A finding row whose value is a coded answer (code only, no display)."""
    r = obs(code, h, system=system)
    r["valueCodeableConcept"] = {"coding": [{"system": SCT, "code": answer}]}
    return r


def condition(coding: dict[str, str], h: float, verification: str = "confirmed", abate_h: float | None = None,
              text: str | None = None) -> dict[str, Any]:
    r = {"resourceType": "Condition", "id": f"cond-{coding['code']}-{h}",
         "verificationStatus": {"coding": [{"code": verification}]},
         "code": {"coding": [coding], **({"text": text} if text else {})}, "subject": {"reference": "Patient/p1"},
         "onsetDateTime": at(h)}
    if abate_h is not None:
        r["abatementDateTime"] = at(abate_h)
    return r


@pytest.mark.parametrize(
    ("text", "grade"),
    [
        ("No seizures overnight, witnessed generalized tonic-clonic seizure lasting 2 min", 3),  # comma clause
        ("Seizure ruled out; shaking episode was rigors", 1),  # post-trigger
        ("History of seizures, none since admission", 1),  # historical
        ("Levetiracetam for seizure prophylaxis. No seizures.", 1),  # prophylactic
        ("EEG: no electrographic seizures, diffuse slowing", 1),
        ("Indication: r/o seizure. Impression: no acute findings", 1),  # reason for the exam
    ],
)
def test_seizure_text_is_read_negex_style(text, grade):
    """NegEx-style reading (§3.2): clauses split on commas too; ruled out / history / prophylaxis /
    reason-for-exam mentions are not current findings."""
    assert graded(ice(71, 8), seizure(71, text), *NORMAL)["astct"]["grade"] == grade


def test_possible_seizure_is_graded_and_flagged():
    r = graded(ice(71, 8), seizure(71, "Possible seizure"), *NORMAL)["astct"]
    assert r["grade"] == 3 and "finding_uncertain" in r["flags"]


@pytest.mark.parametrize(
    ("text", "cres"),
    [("Focal seizure, EEG ordered", 3), ("Seized twice, no return to baseline between episodes", 4)],
)
def test_bare_eeg_is_not_nonconvulsive_and_no_return_is_status(text, cres):
    r = graded(ice(71, 8), seizure(71, text), *NORMAL)
    assert r["cartox_cres"]["grade"] == cres
    assert r["astct"]["grade"] == (4 if cres == 4 else 3)


@pytest.mark.parametrize(("answer", "grade"), [("373067005", 1), ("2667000", 1), ("260385009", 1), ("373066001", 3)])
def test_coded_no_absent_negative_makes_a_finding_absent(answer, grade):
    assert graded(ice(71, 8), coded("91175000", 71, answer), *NORMAL)["astct"]["grade"] == grade


def test_coded_negative_haemorrhage_does_not_exclude_oedema():
    r = graded(ice(71, 8), finding("2032001", 72, "Diffuse cerebral edema"), coded("274100004", 72, "260385009"), *NORMAL)
    assert r["astct"]["grade"] == 4 and "intracranial_hemorrhage_excluded" not in r["astct"]["flags"]


@pytest.mark.parametrize("code", ["R56.9", "G40.909", "G41.9"])
def test_icd10_seizure_condition_is_a_seizure_finding(code):
    c = condition({"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}, 71)
    r = graded(ice(71, 8), c, *NORMAL)["astct"]
    assert r["grade"] == (4 if code.startswith("G41") else 3)


@pytest.mark.parametrize(("text", "grade"), [("Tremor", 1), ("Myoclonus and asterixis", 1), ("Tremor, new left arm drift", 4)])
def test_tremor_alone_is_not_motor_weakness(text, grade):
    """§3.2 ‡: tremor / myoclonus are graded by CTCAE and do not influence ICANS."""
    assert graded(ice(71, 8), finding("MOTOR-WEAKNESS", 72, text, system=FLOW), *NORMAL)["astct"]["grade"] == grade


def test_generalized_weakness_is_not_deep_focal_but_is_cres_motor_weakness():
    r = graded(ice(71, 8), finding("MOTOR-WEAKNESS", 72, "Generalized weakness, deconditioning", system=FLOW), *NORMAL)
    assert r["astct"]["grade"] == 1 and "motor_weakness_not_focal" in r["astct"]["flags"]
    assert r["cartox_cres"]["grade"] == 4 and "motor_weakness_not_focal" in r["cartox_cres"]["flags"]


@pytest.mark.parametrize(
    ("text", "astct", "cres"),
    [("Bilateral papilledema, Frisen grade 2", 4, 3), ("Papilledema stage II", 4, 3), ("Papilledema grade 4", 4, 4),
     ("Fundoscopy: papilledema absent", 1, 1), ("Discs sharp, without papilledema", 1, 1), ("Fundi not visualized", 1, 1)],
)
def test_papilledema_stage_and_negation(text, astct, cres):
    r = graded(ice(71, 8), finding("ICP-SIGN", 72, text, system=FLOW), *NORMAL)
    assert (r["astct"]["grade"], r["cartox_cres"]["grade"]) == (astct, cres)


@pytest.mark.parametrize(
    ("text", "grade", "imaging_resolved"),
    [("No mass effect, no midline shift, diffuse cerebral edema", 4, False),
     ("Global cerebral edema; decreased gray-white differentiation", 4, False),
     ("Diffuse cerebral edema, slightly improved but persistent", 4, False),
     ("Cerebral edema without herniation", 3, False),
     ("No interval change in diffuse cerebral edema", 4, False),
     ("Diffuse cerebral edema is not seen", 1, False),
     ("Indication: confusion, r/o cerebral edema. Impression: No acute intracranial abnormality.", 1, False),
     ("Interval resolution of previously seen diffuse cerebral edema", 1, True)],
)
def test_oedema_text_resolution_and_extent(text, grade, imaging_resolved):
    """Only resolved / absent oedema is imaging resolution; improving oedema is graded by its
    extent, read from the affirmed parts only (§3.2, V30)."""
    r = graded(ice(71, 8), finding("2032001", 72, text), *NORMAL)["astct"]
    assert r["grade"] == grade and ("imaging_resolved" in r) == imaging_resolved


@pytest.mark.parametrize(
    ("text", "grade"),
    [("No response to voice or touch", 4), ("Not responsive", 4), ("Not arousable to voice, arouses to touch", 3), ("Not arousable", 4)],
)
def test_level_of_consciousness_by_the_stimulus_that_arouses(text, grade):
    assert graded(ice(72, 5), loc(72, text), *NORMAL)["astct"]["grade"] == grade


def test_rass_sent_as_a_coded_answer_is_read():
    r = obs("1345050000", 72, system=SCT)
    r["valueCodeableConcept"] = {"coding": [{"system": "http://loinc.org", "code": "LA-x", "display": "Unarousable"}]}
    out = graded(r, *NORMAL)["astct"]
    assert out["grade"] == 4 and "rass_used" in out["flags"]


@pytest.mark.parametrize(("gcs", "grade", "flag"), [(5, 4, "gcs_used"), (12, 0, "gcs_depressed"), (15, 0, None)])
def test_gcs_coma_is_grade_4_and_depressed_gcs_is_flagged(gcs, grade, flag):
    r = graded(obs("9269-2", 72, gcs, "{score}"), *NORMAL)["astct"]
    assert r["grade"] == grade
    if flag:
        assert flag in r["flags"]


@pytest.mark.parametrize(
    "row",
    [obs("ICE-SCORE", 72, system=FLOW, dataAbsentReason={"coding": [{"code": "not-performed"}]}),
     obs("ICE-SCORE", 72, system=FLOW, dataAbsentReason={"coding": [{"code": "asked-declined"}]}),
     obs("ICE-SCORE", 72, "Unable to assess - patient off unit for MRI", system=FLOW)],
)
def test_ice_not_done_for_a_logistic_reason_is_a_skip_not_a_grade(row):
    run = grade_resources([patient(birth=ADULT), cart(0), *vitals_baseline(240), row, loc(72, "Alert"), *NORMAL]).to_json()
    assert run["cases"][0]["icans"]["astct"]["grade"] == 0 and run["cases"][0]["icans"]["cartox_cres"]["grade"] == 0
    assert any(s["resource"].endswith(row["id"]) and "not assessed" in s["reason"] for s in run["skipped"])


def test_unable_to_perform_because_obtunded_stays_a_finding():
    row = obs("ICE-SCORE", 72, "Unable to perform: obtunded", system=FLOW)
    assert graded(row, *NORMAL)["astct"]["grade"] == 3


def test_provisional_condition_is_used_and_flagged():
    c = condition({"system": SCT, "code": "91175000", "display": "Seizure"}, 71, verification="differential")
    r = graded(ice(71, 8), c, *NORMAL)["astct"]
    assert r["grade"] == 3 and "condition_unconfirmed" in r["flags"]


@pytest.mark.parametrize(("abate_h", "grade"), [(95, 3), (71.2, 4)])
def test_condition_abatement_is_a_seizure_duration_only_within_24h(abate_h, grade):
    c = condition({"system": SCT, "code": "91175000", "display": "Seizure"}, 71, abate_h=abate_h, text="Focal seizure")
    assert graded(ice(71, 8), c, *NORMAL)["astct"]["grade"] == grade
