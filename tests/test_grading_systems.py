"""Every CRS system side by side (grading-criteria §§4-10): one table row per boundary rule, all
columns asserted (ASTCT, Lee 2014, Penn, MSKCC, CARTOX/PedsCARTOX, CTCAE v5)."""

from __future__ import annotations

from typing import Any

import pytest
from factory import (
    EPI,
    NE,
    TOCI,
    VASO,
    at,
    bp,
    cart,
    device,
    fio2,
    flow,
    med,
    obs,
    patient,
    proc,
    temp,
    vitals_baseline,
)

from fhir_crs.pipeline import grade_resources

SYSTEMS = ("astct", "lee2014", "penn", "mskcc", "cartox", "ctcae5")
ADULT = "1967-01-01"


def grades(*rows: dict[str, Any], birth: str = ADULT, weight: float = 70, until: float = 140,
           fever_until: float = 32, toci: bool = False) -> dict[str, dict[str, Any]]:
    hours = [24 + 4 * i for i in range(int((fever_until - 24) / 4) + 1)]
    resources = [patient(birth=birth), cart(0), obs("29463-7", -12, weight, "kg"),
                 *vitals_baseline(until, skip=set(hours)), *[temp(h, 39.0) for h in hours],
                 *[bp(h, 120) for h in hours], *rows]
    if toci:
        resources.append(med(TOCI, hours[-1] + 0.5, dose=8 * weight, dose_unit="mg"))
    case = grade_resources(resources).to_json()["cases"][0]
    return case["crs"]


def row(crs: dict[str, dict[str, Any]]) -> tuple[int, ...]:
    return tuple(crs[s]["grade"] for s in SYSTEMS)


HYPO = [bp(27.5, 80), bp(27.7, 82)]


@pytest.mark.parametrize(
    ("name", "rows", "expected"),
    [
        #                                                                     astct lee penn mskcc cartox ctcae
        ("fluids only, one bolus", [*HYPO, med("313002", 27.8, 28.3, dose=1000, dose_unit="mL", dosage_text="bolus")], (2, 2, 2, 1, 2, 2)),
        ("fluids only, two boluses", [*HYPO, med("313002", 27.8, 28.3, dose=1000, dose_unit="mL", dosage_text="bolus"), bp(28.8, 84),
                                      med("313002", 29, 29.5, dose=1000, dose_unit="mL", dosage_text="bolus")], (2, 2, 3, 1, 2, 2)),
        ("one low-dose pressor", [*HYPO, med(NE, 28, 34, rate=8, rate_unit="ug/min")], (3, 2, 3, 2, 2, 3)),
        ("pressor + vasopressin", [*HYPO, med(NE, 28, 34, rate=6, rate_unit="ug/min"), med(VASO, 29, 34, rate=0.03, rate_unit="U/min")], (3, 3, 3, 2, 3, 4)),
        ("two low-dose pressors", [*HYPO, med(NE, 28, 34, rate=6, rate_unit="ug/min"), med(EPI, 29, 34, rate=2, rate_unit="ug/min")], (4, 3, 3, 2, 3, 4)),
        ("NC 2 L/min", [device(28, "Nasal cannula", "336623009"), flow(28, 2), device(34, "Room air")], (2, 2, 3, 2, 2, 2)),
        ("NC 5 L/min (estimated FiO2 40 %)", [device(28, "Nasal cannula", "336623009"), flow(28, 5), device(34, "Room air")], (2, 3, 3, 3, 3, 3)),
        ("NC 4 L/min (estimated FiO2 36 %)", [device(28, "Nasal cannula", "336623009"), flow(28, 4), device(34, "Room air")], (2, 2, 3, 2, 2, 2)),
        ("HFNC FiO2 40 %", [device(28, "HFNC", "426854004"), flow(28, 40), fio2(28, 40), device(34, "Room air")], (3, 3, 3, 3, 3, 3)),
        ("HFNC FiO2 39 %", [device(28, "HFNC", "426854004"), flow(28, 40), fio2(28, 39), device(34, "Room air")], (3, 2, 3, 2, 2, 2)),
        ("CPAP FiO2 35 % after hypoxia", [obs("59408-5", 27.5, 86, "%"), device(28, "CPAP", "706226000"), fio2(28, 35), device(34, "Room air")], (4, 2, 3, 2, 2, 2)),
        ("invasive ventilation", [obs("59408-5", 27.5, 84, "%"), proc("112798008", 28, reason="hypoxemic respiratory failure"), proc("1258985005", 28, 40)], (4, 4, 4, 4, 4, 4)),
        ("creatinine 3.25x baseline", [obs("2160-0", -12, 0.8, "mg/dL"), obs("2160-0", 40, 2.6, "mg/dL"), obs("2160-0", 64, 0.9, "mg/dL")], (1, 3, 3, 1, 3, 1)),
        ("AST 22.5x ULN (grade 4 transaminitis)", [obs("1920-8", 40, 900, "U/L"), obs("1920-8", 64, 35, "U/L")], (1, 3, 3, 1, 3, 1)),
        ("creatinine > 6x ULN", [obs("2160-0", -12, 0.8, "mg/dL"), obs("2160-0", 40, 7.5, "mg/dL"), obs("2160-0", 64, 1.0, "mg/dL")], (1, 4, 3, 1, 4, 1)),
        ("cryoprecipitate for coagulopathy", [obs("3255-7", 40, 85, "mg/dL"), med(None, 41, 42, text="Cryoprecipitate"), obs("3255-7", 60, 200, "mg/dL")], (1, 1, 3, 1, 1, 1)),
    ],
)
def test_system_matrix(name, rows, expected):
    assert row(grades(*rows)) == expected, name


@pytest.mark.parametrize(("hours", "high"), [(3.0, True), (2.9, False)])
def test_exactly_three_hours_of_high_dose(hours, high):
    rows = [*HYPO, med(NE, 28, 30, rate=10, rate_unit="ug/min"), med(NE, 30, 30 + hours, rate=22, rate_unit="ug/min"),
            med(NE, 30 + hours, 36, rate=8, rate_unit="ug/min")]
    crs = grades(*rows)
    assert crs["lee2014"]["grade"] == (3 if high else 2)
    assert crs["penn"]["grade"] == (4 if high else 3)
    assert crs["cartox"]["grade"] == (3 if high else 2)
    if high:
        assert crs["lee2014"]["max_at"] == at(33)


@pytest.mark.parametrize(("hours", "grade"), [(24.0, 3), (23.5, 2)])
def test_exactly_24_hours_of_vasopressor_mskcc(hours, grade):
    crs = grades(*HYPO, med(NE, 28, 28 + hours, rate=8, rate_unit="ug/min"), until=180)
    assert crs["mskcc"]["grade"] == grade
    if grade == 3:
        assert crs["mskcc"]["max_at"] == at(52)


def test_vasopressin_with_neeq_10_for_3h_is_penn4():
    crs = grades(*HYPO, med(NE, 28, 36, rate=12, rate_unit="ug/min"), med(VASO, 29, 35, rate=0.03, rate_unit="U/min"))
    assert crs["penn"]["grade"] == 4 and crs["penn"]["max_at"] == at(32)
    assert "vasopressin_counted" in crs["cartox"]["flags"]


@pytest.mark.parametrize(("birth", "sbp", "hypotensive"), [
    ("2014-12-01", 89, True),   # 10 y: 70 + 2x10 = 90
    ("2013-12-01", 89, True),   # 11 y: > 10 y rule, 90
    ("2015-12-01", 88, False),  # 9 y: 70 + 18 = 88
    ("2015-12-01", 87, True),
])
def test_age_10_vs_11_sbp_threshold(birth, sbp, hypotensive):
    crs = grades(bp(27.5, sbp), bp(27.7, sbp), birth=birth, weight=30)
    assert crs["cartox"]["variant"] == "pediatric"
    g = 2 if hypotensive else 1
    assert (crs["astct"]["grade"], crs["cartox"]["grade"], crs["ctcae5"]["grade"]) == (g, g, g)


def test_pediatric_weight_based_high_dose_is_flagged():
    crs = grades(*[bp(27.5, 70), bp(27.7, 72)], med(NE, 28, 32, rate=0.3, rate_unit="ug/kg/min"), birth="2018-06-01", weight=20)
    assert crs["cartox"]["variant"] == "pediatric"
    assert crs["lee2014"]["grade"] == 3 and "pediatric_high_dose" in crs["lee2014"]["flags"]


def test_refractory_hypotension_on_high_dose():
    lows = [bp(28 + k / 4, 78) for k in range(0, 9)]
    crs = grades(*lows, med(NE, 27.9, 34, rate=25, rate_unit="ug/min"), bp(34.5, 100))
    assert crs["mskcc"]["grade"] == 4 and crs["mskcc"]["max_at"] == at(29)
    assert crs["cartox"]["grade"] == 4


def test_penn_neutropenic_fever_with_iv_antibiotic():
    neutro = grades(obs("751-8", 20, 0.3, "10*3/uL"), med("20481", 24.5, 25))
    assert neutro["penn"]["grade"] == 2 and neutro["penn"]["max_at"] == at(24.5)


def test_penn_non_neutropenic_antibiotic_stays_1():
    crs = grades(obs("751-8", 20, 1.8, "10*3/uL"), med("20481", 24.5, 25))
    assert crs["penn"]["grade"] == 1


def test_penn_iv_tocilizumab_is_an_iv_therapy_for_crs():
    crs = grades(obs("751-8", 20, 1.8, "10*3/uL"), toci=True)
    assert crs["penn"]["grade"] == 2 and "penn_iv_therapy_classes" in {c["setting"] for c in crs["penn"]["conventions"]}


def test_organ_toxicity_delays_resolution_for_organ_systems_only():
    crs = grades(obs("2160-0", -12, 0.8, "mg/dL"), obs("2160-0", 40, 2.6, "mg/dL"), obs("2160-0", 64, 2.4, "mg/dL"),
                 obs("2160-0", 88, 0.9, "mg/dL"))
    assert crs["astct"]["resolved"] == at(36)
    assert crs["lee2014"]["resolved"] == at(88)
    assert crs["mskcc"]["resolved"] == at(36)


def test_renal_replacement_is_grade4_organ_toxicity():
    crs = grades(proc("714749008", 40, 60, display="Continuous renal replacement therapy"))
    assert (crs["lee2014"]["grade"], crs["cartox"]["grade"], crs["penn"]["grade"], crs["astct"]["grade"]) == (4, 4, 3, 1)


def test_infant_age_in_months():
    from fhir_crs.pipeline import grade_resources

    res = [patient(birth="2024-06-20"), cart(0), *vitals_baseline(48)]
    case = grade_resources(res).to_json()["cases"][0]
    assert (case["age_years"], case["age_months"]) == (0, 8)


def test_point_charted_infusion_is_not_stretched_to_the_end_of_data():
    rows = [*HYPO, med(NE, 28, rate=8, rate_unit="ug/min")]  # one rate charted at +28, nothing after
    crs = grades(*rows, until=200)
    assert crs["astct"]["grade"] == 3 and "infusion_end_assumed" in crs["astct"]["flags"]
    assert crs["mskcc"]["grade"] == 2  # 4 h assumed, not 170 h
    assert crs["astct"]["resolved"] == at(36)


def test_cerner_infuse_over_time_extension_sets_the_end():
    r = med(NE, 28, rate=8, rate_unit="ug/min")
    r["extension"] = [{"url": "https://fhir-ehr.cerner.com/r4/StructureDefinition/infuse-over-time",
                       "valueQuantity": {"value": 120, "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"}}]
    crs = grades(*HYPO, r)
    assert crs["astct"]["grade"] == 3 and "infusion_end_assumed" not in crs["astct"]["flags"]
    assert crs["astct"]["resolved"] == at(36)


def test_weight_based_fluid_boluses_count_for_penn():
    boluses = [*HYPO, med("313002", 27.8, 28.3, dose=20, dose_unit="mL/kg"), bp(28.8, 74),
               med("313002", 29, 29.5, dose=20, dose_unit="mL/kg")]
    crs = grades(*boluses, birth="2018-06-01", weight=20)
    assert crs["penn"]["grade"] == 3 and crs["astct"]["grade"] == 2


def test_anc_derived_from_wbc_and_neutrophil_percent_for_penn():
    rows = [obs("6690-2", 20, 1.0, "10*3/uL"), obs("770-8", 20, 30, "%"), med("20481", 24.5, 25)]  # ANC 300
    crs = grades(*rows)
    assert crs["penn"]["grade"] == 2
