"""ASTCT 2019 ICANS rules (grading-criteria §3), one row per rule."""

from __future__ import annotations

from typing import Any

import pytest
from factory import at, cart, loc, med, obs, patient, score, vitals_baseline

from fhir_crs.pipeline import grade_resources

ADULT, CHILD7, CHILD11, TEEN12 = "1970-01-01", "2017-06-01", "2013-06-01", "2012-06-01"


def icans(*rows: dict[str, Any], birth: str = ADULT) -> dict[str, Any]:
    run = grade_resources([patient(birth=birth), cart(0), *vitals_baseline(240), *rows]).to_json()
    return run["cases"][0]["icans"]["astct"]


def ice(h: float, v: int) -> dict[str, Any]:
    return score("ICE-SCORE", h, v, display="ICE score")


def capd(h: float, v: int) -> dict[str, Any]:
    return score("CAPD-TOTAL", h, v, display="CAPD total score")


@pytest.mark.parametrize(("value", "grade"), [(10, 0), (9, 1), (7, 1), (6, 2), (3, 2), (2, 3), (0, 3)])
def test_ice_bands(value, grade):
    r = icans(ice(60, 10), ice(72, value), ice(84, 10), ice(96, 10), ice(120, 10))
    assert r["grade"] == grade
    if grade:
        assert (r["onset"], r["max_at"], r["resolved"]) == (at(72), at(72), at(84))


def test_ice0_unarousable_is_grade4_and_awake_aphasia_grade3():
    assert icans(ice(72, 0), loc(72, "Unarousable"), ice(96, 10), ice(120, 10))["grade"] == 4
    assert icans(ice(72, 0), loc(72, "Alert, global aphasia"), ice(96, 10), ice(120, 10))["grade"] == 3


def test_ice3_plus_generalized_seizure_is_grade3():
    seizure = obs("91175000", 112, {"text": "Generalized tonic-clonic seizure, 90 s"}, system="http://snomed.info/sct")
    r = icans(ice(110, 3), seizure, ice(150, 8), ice(180, 10), ice(204, 10))
    assert (r["grade"], r["onset"], r["max_at"], r["resolved"]) == (3, at(110), at(112), at(180))


def test_prolonged_seizure_is_grade4():
    seizure = obs("91175000", 112, {"text": "Status epilepticus"}, system="http://snomed.info/sct")
    assert icans(ice(110, 8), seizure, ice(150, 10), ice(180, 10))["grade"] == 4


@pytest.mark.parametrize(
    ("text", "grade", "flag"),
    [
        ("Focal vasogenic edema, right occipital, no hemorrhage", 3, None),
        ("Diffuse cerebral edema", 4, None),
        ("Intraparenchymal hemorrhage with surrounding edema", 1, "intracranial_hemorrhage_excluded"),
    ],
)
def test_cerebral_edema(text, grade, flag):
    edema = obs("2032001", 132, {"text": text}, system="http://snomed.info/sct")
    r = icans(ice(130, 7), edema, ice(200, 10), ice(224, 10))
    assert r["grade"] == grade
    if flag:
        assert flag in r["flags"]


def test_child_under_12_uses_capd_and_consciousness():
    rows = [capd(-12, 0), capd(100, 6), loc(100, "Awakens spontaneously"), capd(112, 7), loc(112, "Awakens to voice"),
            capd(140, 2), loc(140, "Alert"), capd(164, 0), capd(188, 0)]
    r = icans(*rows, birth=CHILD7)
    assert (r["grade"], r["onset"], r["max_at"], r["resolved"]) == (2, at(100), at(112), at(164))


def test_capd_9_or_more_is_grade3_and_baseline_respected():
    r = icans(capd(-12, 3), capd(96, 3), capd(108, 11), capd(132, 2), capd(156, 1), birth=CHILD11)
    assert (r["grade"], r["onset"], r["resolved"]) == (3, at(108), at(132))


def test_twelve_year_old_with_only_capd_is_graded_by_capd():
    r = icans(capd(96, 10), capd(120, 0), capd(150, 0), birth=TEEN12)
    assert r["grade"] == 3 and "capd_used_age_12_plus" in r["flags"]


def test_sedation_suppresses_consciousness_domain():
    rows = [med(None, 70, 80, text="Propofol infusion", rate=50, rate_unit="ug/kg/min"), loc(72, "Unarousable"), ice(96, 10), ice(120, 10)]
    r = icans(*rows)
    assert r["grade"] == 0 and "sedation_confounded" in r["flags"]
