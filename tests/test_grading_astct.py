"""ASTCT 2019 CRS rules, one table row per boundary (grading-criteria §1-§2). Pure: resources in,
grades out, no server and no files."""

from __future__ import annotations

from typing import Any

import pytest
from factory import (
    APAP,
    DEX,
    EPI,
    NE,
    PHENYL,
    TOCI,
    VASO,
    at,
    bp,
    cart,
    device,
    flow,
    med,
    obs,
    patient,
    proc,
    temp,
    vitals_baseline,
)

from fhir_crs.pipeline import grade_resources
from fhir_crs.settings import load_settings


def crs(resources: list[dict[str, Any]], system: str = "astct", syndrome: str = "crs") -> dict[str, Any]:
    run = grade_resources(resources).to_json()
    assert len(run["cases"]) == 1, run["skipped"]
    return run["cases"][0][syndrome][system]


def base(birth: str = "1967-01-01", until: float = 120, skip: set[float] | None = None) -> list[dict[str, Any]]:
    return [patient(birth=birth), cart(0), *vitals_baseline(until, skip=skip)]


def fever_course(onset: float = 24, last: float = 32) -> list[dict[str, Any]]:
    """Fever from `onset` to `last` every 4 h; baseline vitals at those hours replaced."""
    hours = [onset + 4 * i for i in range(int((last - onset) / 4) + 1)]
    return [temp(h, 39.0) for h in hours], set(hours)


def case(*extra: dict[str, Any], onset: float = 24, last: float = 32, birth: str = "1967-01-01", sbp_skip: set[float] = frozenset()) -> list[dict[str, Any]]:
    fevers, hours = fever_course(onset, last)
    return [*base(birth, skip=hours | set(sbp_skip)), *fevers, *[bp(h, 120) for h in hours if h not in sbp_skip], *extra]


def test_fever_only_grade1_with_onset_and_resolution():
    r = crs(case())
    assert r["grade"] == 1
    assert r["onset"] == at(24)
    assert r["max_at"] == at(24)
    assert r["resolved"] == at(36)  # first afebrile reading after the last fever (+32)
    assert r["evidence"]


@pytest.mark.parametrize(
    ("value", "unit", "fever"),
    [(38.0, "Cel", True), (37.99, "Cel", False), (37.9999, "Cel", True), (100.4, "[degF]", True), (100.3, "[degF]", False)],
)
def test_fever_boundary(value, unit, fever):
    r = crs([*base(skip={24}), temp(24, value, unit), bp(24, 120)])
    assert r["grade"] == (1 if fever else 0)


def test_display_rounding_flag_and_no_episode():
    r = crs([*base(skip={24}), temp(24, 37.95), bp(24, 120)])
    assert r["grade"] == 0 and "display_rounding" in r["flags"]


def test_degF_field_below_50_is_quarantined():
    run = grade_resources([*case(), temp(40, 38.6, "[degF]")]).to_json()
    assert any("unit error" in s["reason"] for s in run["skipped"])
    r = run["cases"][0]["crs"]["astct"]
    assert "unit_error" in r["flags"] and r["resolved"] == at(36)


def test_afebrile_hypotension_is_not_crs():
    r = crs([*base(skip={60}), bp(60, 84), bp(60.3, 86)])
    assert r["grade"] == 0 and "afebrile_hypotension" in r["flags"]


def test_hypotension_without_pressor_is_grade2():
    r = crs(case(bp(28, 84), bp(28.2, 86), sbp_skip={28}))
    assert (r["grade"], r["max_at"]) == (2, at(28))


def test_single_reading_needs_treatment():
    single = crs(case(bp(28.1, 84)))
    treated = crs(case(bp(28.1, 84), med("313002", 28.3, 28.8, dose=1000, dose_unit="mL", dosage_text="NS bolus")))
    assert single["grade"] == 1
    assert treated["grade"] == 2


def test_one_vasopressor_grade3_even_with_vasopressin():
    r = crs(case(bp(28.1, 80), med(NE, 28.5, 40, rate=10, rate_unit="ug/min"), med(VASO, 29, 39, rate=0.03, rate_unit="U/min")))
    assert (r["grade"], r["max_at"]) == (3, at(28.5))


def test_two_vasopressors_overlapping_an_hour_grade4_at_overlap_start():
    r = crs(case(bp(28.1, 80), med(NE, 28.5, 40, rate=10, rate_unit="ug/min"), med(EPI, 30, 33, rate=5, rate_unit="ug/min")))
    assert (r["grade"], r["max_at"]) == (4, at(30))


def test_handoff_shorter_than_overlap_rule_is_one_vasopressor():
    r = crs(case(bp(28.1, 80), med(NE, 28.5, 36, rate=8, rate_unit="ug/min"), med(EPI, 35 + 50 / 60, 44, rate=2, rate_unit="ug/min")))
    assert r["grade"] == 3 and "vasopressor_handoff" in r["flags"]
    assert any(c["setting"] == "vasopressor_overlap_min" for c in r["conventions"])


@pytest.mark.parametrize(
    ("rows", "grade"),
    [
        ([device(28, "Nasal cannula", "336623009"), flow(28, 2)], 2),
        ([device(28, "Nasal cannula", "336623009"), flow(28, 6)], 2),
        ([device(28, "Nasal cannula", "336623009"), flow(28, 7)], 3),
        ([device(28, "High flow nasal cannula", "426854004"), flow(28, 40)], 3),
        ([device(28, "Simple face mask", "336602003"), flow(28, 5)], 3),
        ([device(28, "Venturi mask", "428285009")], 3),
        ([device(28, "Non-rebreather mask", "427591007")], 3),
        ([device(28, "Blow-by oxygen")], 2),
    ],
)
def test_oxygen_device_tiers(rows, grade):
    r = crs(case(*rows, device(31, "Room air")))
    assert (r["grade"], r["max_at"]) == (grade, at(28))


def test_cannula_without_flow_assumed_low_flow_and_flagged():
    r = crs(case(device(28, "Nasal cannula", "336623009"), device(31, "Room air")))
    assert r["grade"] == 2 and "missing_flow" in r["flags"]


def test_cpap_after_hypoxia_is_grade4():
    r = crs(case(obs("59408-5", 27.5, 86, "%"), proc("47545007", 28, 31, reason=None)))
    assert (r["grade"], r["max_at"]) == (4, at(28))


def test_intubation_for_airway_protection_does_not_upgrade_crs():
    r = crs(case(proc("112798008", 28, None, reason="airway protection after seizure"), proc("1258985005", 28, 40)))
    assert r["grade"] == 1 and "ppv_not_attributed" in r["flags"]


def test_home_cpap_for_sleep_apnoea_is_baseline():
    r = crs(case(proc("47545007", -14, -6, reason="Obstructive sleep apnea"), proc("47545007", 30, 32, reason="Obstructive sleep apnea")))
    assert r["grade"] == 1 and "home_baseline_excluded" in r["flags"]


@pytest.mark.parametrize(
    ("birth", "sbp", "grade"),
    [
        ("2020-12-01", 82, 1),  # 4 y 3 mo: threshold 78
        ("2020-12-01", 74, 2),
        ("2020-04-01", 79, 1),  # 4 y 11 mo: completed years -> 78
        ("2015-03-01", 89, 2),  # 10 y: 70 + 2*10 = 90
        ("2014-03-01", 89, 2),  # 11 y: > 10 y rule, 90
        ("2014-03-01", 90, 1),
        ("2024-12-01", 68, 2),  # infant: < 70
    ],
)
def test_pediatric_hypotension_threshold(birth, sbp, grade):
    r = crs(case(bp(28, sbp), bp(28.2, sbp), birth=birth, sbp_skip={28}))
    assert r["grade"] == grade


def test_masking_after_tocilizumab_lets_late_pressor_count():
    # fever 24-32, tocilizumab at 33, afebrile; pressor at 60 (> 24 h after the last fever)
    r = crs(case(med(TOCI, 33, dose=560, dose_unit="mg"), bp(59.5, 80), med(NE, 60, 66, rate=5, rate_unit="ug/min")))
    assert (r["grade"], r["max_at"]) == (3, at(60))
    assert any(c["setting"] == "masking_drug_classes" for c in r["conventions"])


def test_without_masking_a_late_pressor_does_not_count():
    r = crs(case(bp(59.5, 80), med(NE, 60, 66, rate=5, rate_unit="ug/min")))
    assert r["grade"] == 1


def test_prophylactic_steroid_before_fever_flags_possible_masked_crs():
    r = crs([*base(skip={40}), med(DEX, 2, dose=10, dose_unit="mg"), bp(40, 80), med(NE, 40.5, 48, rate=5, rate_unit="ug/min")])
    assert r["grade"] == 0
    assert {"prophylaxis_masking", "afebrile_hypotension"} <= set(r["flags"])


def test_preinfusion_fever_only_is_zero_and_flags_when_followed():
    assert crs([*base(skip={-8}), temp(-8, 38.5), bp(-8, 120)])["grade"] == 0
    r = crs([*base(), temp(-2, 38.4), temp(1, 38.3), temp(5, 37.2)])
    assert r["grade"] == 1 and r["onset"] == at(1) and "fever_preinfusion" in r["flags"]


def test_biphasic_second_episode_counts():
    fevers, hours = fever_course(24, 28)
    second = [temp(100, 39.0), bp(100, 80), bp(100.2, 82), temp(104, 37.0)]
    r = crs([*base(until=160, skip=hours | {100, 104}), *fevers, *second])
    assert r["grade"] == 2 and r["onset"] == at(24) and r["max_at"] == at(100)
    assert "biphasic" in r["flags"]


def test_second_episode_with_positive_culture_counts_and_is_flagged():
    """Clinical safety rule (issue 11): the episode counts by default and is flagged for
    attribution; excluding it is the clinician's setting, reported in conventions."""
    fevers, hours = fever_course(24, 28)
    culture = obs("600-7", 101, {"coding": [{"system": "http://snomed.info/sct", "code": "112283007", "display": "Escherichia coli"}]})
    rows = [*base(until=160, skip=hours | {100, 104}), *fevers, temp(100, 39.5), bp(100, 70), bp(100.2, 72),
            temp(104, 37.0), culture]
    r = crs(rows)
    assert r["grade"] == 2 and r["max_at"] == at(100)
    assert {"attribution_needed", "positive_blood_culture"} <= set(r["flags"])
    excluded = grade_resources(rows, load_settings(None, ["exclude_provisional_episodes=true"])).to_json()["cases"][0]["crs"]["astct"]
    assert excluded["grade"] == 1 and excluded["resolved"] == at(32)
    assert {"setting": "exclude_provisional_episodes", "value": True, "tag": "I"} in excluded["conventions"]


def test_death_during_episode_is_grade5_candidate():
    fevers, hours = fever_course(12, 68)
    res = [patient(deceased_h=70), cart(0), *vitals_baseline(68, skip=hours), *fevers,
           obs("69453-9", 70, "Refractory vasoplegic shock; grade 4 CRS, no alternative cause")]
    r = crs(res)
    assert (r["grade"], r["max_at"]) == (5, at(70)) and "grade5_candidate" in r["flags"]
    assert r["resolved"] is None


def test_death_with_alternative_cause_keeps_pre_death_maximum():
    fevers, hours = fever_course(12, 68)
    res = [patient(deceased_h=70), cart(0), *vitals_baseline(68, skip=hours), *fevers,
           obs("69453-9", 70, "Septic shock from E. coli bacteremia")]
    r = crs(res)
    assert r["grade"] == 1 and "death_alternative_cause" in r["flags"] and r["resolved"] is None


def test_death_after_resolution_keeps_maximum():
    fevers, hours = fever_course(12, 40)
    res = [patient(deceased_h=70), cart(0), *vitals_baseline(68, skip=hours), *fevers]
    r = crs(res)
    assert (r["grade"], r["resolved"]) == (1, at(44))


def test_peri_procedural_short_pressor_is_ignored():
    r = crs(case(proc("274881008", 119.9, 121, display="Biopsy of bone marrow"),
                 med("", 119.9, 121, text="Propofol infusion"), bp(120.3, 85),
                 med(PHENYL, 120.2, 120.6, rate=50, rate_unit="ug/min")))
    assert r["grade"] == 1 and r["resolved"] == at(36)


def test_antipyretic_masks_fever_for_hypoxia_later_in_episode():
    r = crs(case(med(APAP, 30.5, dose=1000, dose_unit="mg", route_iv=False),
                 device(58, "Nasal cannula", "336623009"), flow(58, 3), device(62, "Room air")))
    assert (r["grade"], r["max_at"]) == (2, at(58))
