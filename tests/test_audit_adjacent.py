"""Audit of 2026-12-04, adjacent syndromes: carHLH (grading-criteria §7.3) and the IEC-HS screen
(§11.1), one test per rule; round 2 adds death (§1.8) and ICAHT (§11.3)."""

from __future__ import annotations

from typing import Any

from factory import DEX, NE, SCT, bp, cart, med, obs, patient, proc, temp, vitals_baseline

from fhir_crs.pipeline import grade_resources

FERR, ALT, FIB, ANC = "2276-4", "1742-6", "3255-7", "751-8"
ANAKINRA = "72435"


def lab(code: str, h: float, v: float, unit: str, hi: float | None = None) -> dict[str, Any]:
    r = obs(code, h, v, unit)
    if hi is not None:
        r["referenceRange"] = [{"high": {"value": hi, "unit": unit}}]
    return r


def adjacent(*rows: dict[str, Any], until: float = 340, skip: set[float] | None = None) -> dict[str, Any]:
    res = [patient(birth="1965-01-01"), cart(0), *vitals_baseline(until, skip=skip), *rows]
    return grade_resources(res).to_json()["cases"][0]["adjacent"]


def iec_picture() -> list[dict[str, Any]]:
    """Day 12: ferritin 20x baseline + fibrinogen 90 mg/dL (suspected IEC-HS)."""
    return [lab(FERR, -12, 400, "ng/mL"), lab(FERR, 288, 8000, "ng/mL"), lab(FIB, 288, 90, "mg/dL")]


def test_iec_hs_transfusion_procedure_counts_for_the_grade():
    """§11.1 grade 3: immunosuppression + transfusion, the transfusion charted as a Procedure of
    kind transfusion_cryo (not only as a MedicationAdministration)."""
    cryo = proc("180207008", 292, 293, display="Transfusion of cryoprecipitate")
    r = adjacent(*iec_picture(), med(ANAKINRA, 290, dose=100, dose_unit="mg"), cryo)["iec_hs"]
    assert r["suspected"] and r["grade"] == 3
    assert f"Procedure/{cryo['id']}" in r["evidence"]
    assert {"adjudicate", "iec_hs_grade_provisional"} <= set(r["flags"])


def test_iec_hs_vasopressor_dependent_hypotension_is_grade4():
    """§11.1 grade 4 "life-threatening ... hypotension": a vasopressor course in the picture."""
    ne = med(NE, 295, 330, rate=0.1, rate_unit="ug/kg/min")
    r = adjacent(*iec_picture(), bp(294, 78), bp(294.25, 76), ne)["iec_hs"]
    assert r["grade"] == 4
    assert f"MedicationAdministration/{ne['id']}" in r["evidence"]
    assert any("vasopressor-dependent" in c for c in r["criteria"])
    assert {"adjudicate", "iec_hs_grade_provisional"} <= set(r["flags"])


def test_carhlh_crs_phase_extends_to_the_end_of_an_episode_open_at_day5():
    """§7.3 "during the CRS phase (typically the first 5 days)": a ferritin > 10,000 on day 6 of a
    CRS episode still open on day 5 counts, flagged, the window setting named; after a CRS that
    resolved before day 5 it does not."""
    fever = range(24, 181, 4)
    late_high = [lab(FERR, 96, 8000, "ng/mL"), lab(FERR, 150, 30000, "ng/mL"), lab(ALT, 156, 300, "U/L"),
                 obs("28966004", 168, "Hemophagocytosis present", system=SCT, display="Hemophagocytosis")]
    r = adjacent(*[temp(h, 38.6) for h in fever], *late_high, until=200, skip=set(fever))["carhlh"]
    assert r["met"] is True
    assert "carhlh_crs_phase_extended" in r["flags"]
    assert "days 0-5, extended to day" in r["criteria"][0]
    short = range(24, 49, 4)
    r = adjacent(*[temp(h, 38.6) for h in short], *late_high, until=200, skip=set(short))["carhlh"]
    assert r["met"] is False and r["criteria"] == ["peak ferritin 8,000 ng/mL in days 0-5 (not > 10,000)"]


def test_iec_hs_ferritin_above_2x_uln_counts_despite_a_high_baseline():
    """§11.1 "> 2 x ULN or > 2 x baseline at infusion": either; 5,000 is 12.5x ULN, 1.7x baseline."""
    high = lab(FERR, 240, 5000, "ng/mL", hi=400)
    r = adjacent(lab(FERR, -12, 3000, "ng/mL", hi=400), high, lab(ALT, 240, 300, "U/L"),
                 lab(FIB, 240, 120, "mg/dL"), until=260)["iec_hs"]
    assert r["suspected"] is True
    assert any(c.startswith("ferritin 5,000 ng/mL > 2x ULN (400)") for c in r["criteria"])
    assert f"Observation/{high['id']}" in r["evidence"]


def test_iec_hs_anc_refall_needs_a_recovery_after_neutropenia():
    """§11.1 screen "ANC re-fall after recovery": the first fall from a normal count is not one;
    a fall after neutropenia and recovery is."""
    first_fall = [lab(ANC, d * 24 + 6, 2000 if d == 0 else 400 if d <= 7 else 2000, "/uL") for d in range(31)]
    r = adjacent(*first_fall, until=48)["iec_hs"]
    assert not any("re-fall" in c for c in r["criteria"]) and r["flags"] == []
    refall = [lab(ANC, d * 24 + 6, 100 if d <= 5 else 1200 if d <= 8 else 300, "/uL") for d in range(12)]
    r = adjacent(*refall, until=48)["iec_hs"]
    assert r["criteria"] == ["ANC re-fall to 300/uL after recovery > 500/uL on days 6-8 (day 9)"]


# Round 2


def crs_case(p: dict[str, Any], until: float = 60) -> dict[str, Any]:
    """Fever h24-h56 with norepinephrine h30-h58 after confirmed hypotension (active CRS)."""
    fever = range(24, 57, 4)
    res = [p, cart(0), *vitals_baseline(until, skip=set(fever)), *[temp(h, 38.6) for h in fever],
           bp(29.5, 80), bp(29.8, 78), med(NE, 30, 58, rate=10, rate_unit="ug/min")]
    return grade_resources(res).to_json()["cases"][0]


def test_death_without_a_time_is_flagged_on_every_crs_result():
    """§1.8: deceasedBoolean true with no date is a death that cannot be placed: never dropped,
    every CRS result flagged death_time_unknown (a grade 5 candidate to adjudicate)."""
    p = patient(birth="1965-01-01")
    p["deceasedBoolean"] = True
    case = crs_case(p)
    assert all("death_time_unknown" in v["flags"] for v in case["crs"].values())


def test_date_only_death_is_placed_after_the_care_charted_that_day():
    """§1.8: deceasedDateTime "2025-03-12" (T0 2025-03-10 08:00) is flagged death_time_imprecise and
    placed at the last record of that day (h60), not at midnight (h40) before charted care."""
    p = patient(birth="1965-01-01")
    p["deceasedDateTime"] = "2025-03-12"
    case = crs_case(p)
    astct = case["crs"]["astct"]
    assert astct["grade"] == 5 and "death_time_imprecise" in astct["flags"]
    assert astct["max_at"] == "2025-03-12T20:00:00Z" and case["facts"]["deceased"] == "2025-03-12T20:00:00Z"


def anc_days(*days: tuple[int, float]) -> list[dict[str, Any]]:
    return [lab(ANC, d * 24 + 6, v, "/uL") for d, v in days]


def test_icaht_gap_longer_than_interpolation_between_neutropenic_values_is_flagged():
    """§11.3: missing ANC is interpolated up to 7 days; a longer gap between neutropenic values is
    flagged anc_gap_not_bridged and the criterion says the duration is a lower bound; a 7-day gap
    is bridged without that flag."""
    days = [(d, 200.0) for d in (0, 9, 18, 27, 30)]
    r = adjacent(*anc_days(*days), until=48)["icaht"]
    assert r["early_grade"] == 1 and "anc_gap_not_bridged" in r["flags"]
    assert any("lower bound" in c for c in r["criteria"])
    r = adjacent(*anc_days(*[(d, 300.0) for d in (*range(7), *range(14, 21))], (21, 2500)), until=48)["icaht"]
    assert r["early_grade"] == 3 and "anc_gap_not_bridged" not in r["flags"]


def test_carhlh_ferritin_in_a_later_crs_episode_is_flagged_not_silent():
    """§7.3: ferritin > 10,000 on day 6 in a second CRS episode beginning after the 5-day phase is
    not counted but flagged carhlh_ferritin_later_crs_episode and named in the criteria."""
    first, second = range(24, 49, 4), range(132, 193, 4)
    rows = [temp(h, 38.6) for h in (*first, *second)]
    ferr = lab(FERR, 150, 15000, "ng/mL")
    rows += [ferr, lab(ALT, 156, 300, "U/L"),
             obs("28966004", 168, "Hemophagocytosis present", system=SCT, display="Hemophagocytosis")]
    r = adjacent(*rows, until=220, skip={*first, *second})["carhlh"]
    assert r["met"] is False and "carhlh_ferritin_later_crs_episode" in r["flags"]
    assert any("later CRS episode" in c and "would be met" in c for c in r["criteria"])
    assert f"Observation/{ferr['id']}" in r["evidence"]


def test_iec_hs_vasopressor_that_stopped_before_the_picture_is_not_grade4():
    """§11.1 grade 4 "life-threatening hypotension": only a vasopressor running at or after the
    start of the IEC-HS picture counts, not a CRS course that ended 40 h before it."""
    rows = [lab(FERR, -12, 300, "ng/mL"), lab(FERR, 80, 3000, "ng/mL"), lab(FIB, 80, 100, "mg/dL"),
            bp(29.5, 80), bp(29.8, 78), med(NE, 30, 40, rate=0.1, rate_unit="ug/kg/min")]
    r = adjacent(*rows, until=120)["iec_hs"]
    assert r["suspected"] and r["grade"] == 1
    assert not any("vasopressor" in c for c in r["criteria"])


def test_iec_hs_steroid_during_unresolved_crs_is_not_directed_therapy():
    """§11.1 grade 2 "IEC-HS-directed immunosuppression": dexamethasone given during a CRS episode
    still open at the end of data is CRS therapy, not counted (and said so in the criteria)."""
    fever = range(24, 97, 4)
    rows = [*[temp(h, 38.6) for h in fever], med(DEX, 30, dose=10, dose_unit="mg"),
            lab(FERR, -12, 400, "ng/mL"), lab(FERR, 60, 5000, "ng/mL"), lab(FIB, 60, 120, "mg/dL")]
    r = adjacent(*rows, until=96, skip=set(fever))["iec_hs"]
    assert r["suspected"] and r["grade"] == 1
    assert any(c.startswith("not counted as IEC-HS-directed: dexamethasone") for c in r["criteria"])


def test_death_without_a_time_is_in_the_facts_and_on_the_icans_result():
    from factory import patient as _patient

    p = _patient()
    p["deceasedBoolean"] = True
    run = grade_resources([p, cart(0), *vitals_baseline(120)]).to_json()
    case = run["cases"][0]
    assert case["facts"]["died"] is True
    assert "death_time_unknown" in case["icans"]["astct"]["flags"]
