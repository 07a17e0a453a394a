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
