"""Audit of 2026-12-04, organ toxicity as the older CRS systems grade it (grading-criteria §1.6 and
the organ rows of §4-§9): one test per rule, synthetic data only."""

from __future__ import annotations

from typing import Any

from factory import UCUM, at, bp, cart, obs, patient, temp, vitals_baseline

from fhir_crs.pipeline import grade_resources

ADULT = "1965-01-01"
FEVER = (24, 28, 32)  # one short febrile episode: resolves at h36 without organ toxicity
ALT, BILI, CREAT, CREAT_MOL = "1742-6", "1975-2", "2160-0", "14682-9"


def lab(code: str, h: float, v: float, unit: str | None = None, hi: float | None = None) -> dict[str, Any]:
    r = obs(code, h, v, unit)
    if unit is None:
        r["valueQuantity"] = {"value": v}  # sent without a unit
    if hi is not None:
        r["referenceRange"] = [{"high": {"value": hi, "unit": unit, "system": UCUM, "code": unit}}]
    return r


def crs(*rows: dict[str, Any], birth: str = ADULT) -> dict[str, dict[str, Any]]:
    resources = [patient(birth=birth), cart(0), *vitals_baseline(120, skip=set(FEVER)),
                 *[temp(h, 38.6) for h in FEVER], *[bp(h, 120) for h in FEVER], *rows]
    return grade_resources(resources).to_json()["cases"][0]["crs"]


def settings(res: dict[str, Any]) -> set[str]:
    return {c["setting"] for c in res["conventions"]}


def test_ratio_exactly_at_a_threshold_after_unit_conversion_is_not_above_it():
    # 63 umol/L with the lab's ULN 21 umol/L is exactly 3.0x ULN: CTCAE grade 2 ("> 3.0" is grade 3).
    out = crs(lab(BILI, -20, 10, "umol/L", 21), lab(BILI, 30, 63, "umol/L", 21))
    assert (out["lee2014"]["grade"], out["cartox"]["grade"], out["penn"]["grade"]) == (2, 2, 1)


def test_grade1_liver_baseline_is_flagged_and_grading_unchanged():
    out = crs(lab(ALT, -20, 100, "U/L"), lab(ALT, 30, 220, "U/L"))  # baseline 2.5x ULN, then 5.5x ULN
    assert out["lee2014"]["grade"] == 3
    assert "organ_baseline_abnormal" in out["lee2014"]["flags"]


def test_creatinine_baseline_above_uln_is_flagged():
    out = crs(lab(CREAT, -20, 2.0, "mg/dL"), lab(CREAT, 30, 2.1, "mg/dL"))  # stable CKD
    assert out["lee2014"]["grade"] == 2
    assert "organ_baseline_abnormal" in out["lee2014"]["flags"]


def test_child_graded_against_the_default_pediatric_creatinine_uln_is_flagged():
    out = crs(lab(CREAT, -20, 0.6, "mg/dL"), lab(CREAT, 30, 1.1, "mg/dL"), birth="2008-01-01")  # 17 y
    res = out["cartox"]
    assert res["grade"] == 2 and "uln_default_pediatric" in res["flags"]
    assert "uln_creatinine_child" in settings(res) and "uln_creatinine" not in settings(res)


def test_missing_preinfusion_creatinine_is_flagged_and_graded_by_uln():
    out = crs(lab(CREAT, 6, 0.5, "mg/dL"), lab(CREAT, 30, 1.6, "mg/dL"))  # 3.2x the first post-infusion value
    assert out["lee2014"]["grade"] == 1 and "baseline_missing" in out["lee2014"]["flags"]
    assert "baseline_missing" not in out["mskcc"]["flags"]  # MSKCC grades no organ toxicity


def test_conventions_list_only_the_uln_that_decided():
    own = crs(lab(BILI, -20, 0.6, "mg/dL", 1.0), lab(BILI, 30, 3.3, "mg/dL", 1.0))
    assert own["lee2014"]["grade"] == 3 and not {"uln_alt", "uln_ast", "uln_creatinine", "uln_bilirubin"} & settings(own["lee2014"])
    default = crs(lab(BILI, -20, 0.6, "mg/dL"), lab(BILI, 30, 4.0, "mg/dL"))
    got = settings(default["lee2014"]) & {"uln_alt", "uln_ast", "uln_creatinine", "uln_bilirubin"}
    assert default["lee2014"]["grade"] == 3 and got == {"uln_bilirubin"}


def test_organ_abnormality_holds_the_episode_open_only_where_the_system_grades_it():
    out = crs(lab(ALT, -20, 20, "U/L"), lab(ALT, 30, 200, "U/L"))  # ALT grade 2 to the end of data
    assert out["penn"]["grade"] == 1 and out["penn"]["resolved"] == at(36)  # Penn grades LFTs from grade 3
    assert out["lee2014"]["grade"] == 2 and out["lee2014"]["resolved"] is None


def test_organ_grade_on_a_value_sent_without_a_unit_is_flagged():
    # the mass code without a unit is read in mg/dL (assumed): the grade resting on it says so
    out = crs(lab(CREAT, -20, 0.3), lab(CREAT, 30, 4.5), birth="2019-01-01")
    assert out["lee2014"]["grade"] == 4 and "unit_assumed" in out["lee2014"]["flags"]
    # the molar code without a unit is umol/L by its code (mappings `unitless`): 35 umol/L is normal
    molar = crs(lab(CREAT_MOL, -20, 30), lab(CREAT_MOL, 30, 35), birth="2019-01-01")
    assert molar["lee2014"]["grade"] == 1


def test_a_molar_code_without_a_unit_is_read_in_its_molar_unit(code_map):
    # LOINC 14682-9 is creatinine [Moles/volume]: 35 without a unit is 35 umol/L (0.40 mg/dL),
    # never 35 mg/dL (a grade 4); the mass code 2160-0 without a unit stays mg/dL; both flagged
    from test_mappers import map_one

    (molar,), skipped, flags = map_one(code_map, obs("14682-9", 1, 35))
    assert not skipped and round(molar.value, 2) == 0.40 and "unit_assumed" in flags
    (mass,), _, flags = map_one(code_map, obs("2160-0", 1, 1.2))
    assert mass.value == 1.2 and "unit_assumed" in flags
    (bili,), _, _ = map_one(code_map, obs("14631-6", 1, 20))
    assert round(bili.value, 2) == 1.17
