"""Audit of 2026-12-04, adjacent syndromes: carHLH (grading-criteria §7.3) and the IEC-HS screen
(§11.1), one test per rule."""

from __future__ import annotations

from typing import Any

from factory import NE, SCT, bp, cart, med, obs, patient, proc, temp, vitals_baseline

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
