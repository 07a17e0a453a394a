"""The cohort table (fhir_crs/report.py) and the CIBMTR Form 4100 rows (fhir_crs/cibmtr.py)."""

from __future__ import annotations

import csv
import io
import json
from functools import cache
from typing import Any

import jsonschema
import pytest
from conftest import ROOT
from rich.console import Console

from fhir_crs.cibmtr import FIELDS, cibmtr_csv, cibmtr_rows
from fhir_crs.pipeline import grade_paths, run_paths
from fhir_crs.report import ROW_LABELS, render_report, report_csv, report_from_cases, spearman

SCHEMA = json.loads((ROOT / "tests" / "contracts" / "report.schema.json").read_text())
VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"


@cache
def cohort_cases() -> list[dict[str, Any]]:
    return grade_paths([ROOT / "fixtures" / "cohort" / "picu"])["cases"]


@cache
def vignette(name: str) -> dict[str, Any]:
    (case,) = run_paths([VIGNETTES / f"{name}.json"]).to_json(series=True)["cases"]
    return case


def case(pid: str, grade: int = 1, *, onset: str | None = "2025-01-02T00:00:00Z", resolved: str | None = "2025-01-04T00:00:00Z",
         icans: int = 0, il6: float | None = None, ifng: float | None = None, **facts: Any) -> dict[str, Any]:
    """A minimal graded case (the fields the report reads)."""
    base = {"haemodynamic_instability": False, "mechanical_ventilation": False, "liver_injury_grade": 0,
            "tocilizumab": [], "corticosteroids": [], "blood_purification": [], "died": False,
            "peak_il6": None if il6 is None else {"value": il6, "unit": "pg/mL"},
            "peak_ifn_gamma": None if ifng is None else {"value": ifng, "unit": "pg/mL"}}
    base.update(facts)
    crs = {"grade": grade, "onset": onset if grade else None, "resolved": resolved if grade else None}
    return {"patient": f"Patient/{pid}", "infusion": "2025-01-01T00:00:00Z",
            "crs": {s: dict(crs) for s in ("astct", "lee2014", "penn", "mskcc", "cartox", "ctcae5")},
            "icans": {"astct": {"grade": icans}}, "facts": base}


# ---- contract ---------------------------------------------------------------------------------


def test_cohort_report_matches_the_contract() -> None:
    report = report_from_cases(cohort_cases(), "astct")
    jsonschema.validate(report, SCHEMA)
    assert list(report) == ["patients", "system", "rows", "correlation"]
    assert list(report["rows"]) == list(ROW_LABELS)
    assert report["patients"] == 14 and report["rows"]["crs_severe"] == {
        "n": 9, "pct": 64.3, "patients": report["rows"]["crs_severe"]["patients"]}


@pytest.mark.parametrize("system", ["lee2014", "penn", "mskcc", "cartox", "ctcae5"])
def test_every_system_gives_a_valid_report(system: str) -> None:
    report = report_from_cases(cohort_cases(), system)
    jsonschema.validate(report, SCHEMA)
    assert report["system"] == system


def test_unknown_system_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown CRS grading system"):
        report_from_cases([], "who")


def test_empty_cohort() -> None:
    report = report_from_cases([])
    jsonschema.validate(report, SCHEMA)
    assert report["patients"] == 0 and report["rows"]["crs_any"] == {"n": 0, "pct": 0.0, "patients": []}
    assert report["correlation"]["il6"] == {"rho": None, "p": None, "n": 0}


# ---- row definitions ----------------------------------------------------------------------------


def test_rows_follow_their_definitions() -> None:
    cases = [
        case("a", 1, icans=2, tocilizumab=["MedicationAdministration/1"]),
        case("b", 3, haemodynamic_instability=True, liver_injury_grade=2, corticosteroids=["MedicationAdministration/2"]),
        case("c", 5, resolved=None, died=True, mechanical_ventilation=True, blood_purification=["Procedure/3"]),
        case("d", 0),  # no CRS, alive: nothing to recover from
        case("e", 2, resolved="2025-01-17T00:00:01Z", liver_injury_grade=1),  # 15 days + 1 s: not within 14 days
        case("f", 2, resolved=None),  # unresolved when the record ends
    ]
    rows = report_from_cases(cases)["rows"]

    def who(key: str) -> list[str]:
        return [p.split("/")[1] for p in rows[key]["patients"]]

    assert who("crs_any") == ["a", "b", "c", "e", "f"]
    assert who("crs_severe") == ["b", "c"]
    assert who("haemodynamic_instability") == ["b"]
    assert who("mechanical_ventilation") == ["c"]
    assert who("neurological") == ["a"]
    assert who("liver_injury") == ["b"]
    assert who("tocilizumab") == ["a"] and who("corticosteroids") == ["b"] and who("blood_purification") == ["c"]
    assert who("deaths") == ["c"]
    assert who("recovered_14d") == ["a", "b", "d"]
    assert rows["crs_any"]["pct"] == 83.3 and rows["deaths"]["pct"] == 16.7


def test_a_patient_with_two_infusions_counts_once() -> None:
    first = case("x", 1)
    second = case("x", 3, haemodynamic_instability=True)
    second["infusion"] = "2025-03-01T00:00:00Z"
    report = report_from_cases([first, second, case("y", 0)])
    assert report["patients"] == 2
    assert report["rows"]["crs_severe"]["patients"] == ["Patient/x"]
    assert report["rows"]["crs_any"]["pct"] == 50.0


def test_accepts_the_grade_json_object() -> None:
    graded = {"cases": [case("a", 2), case("b", 0)], "skipped": []}
    assert report_from_cases(graded)["patients"] == 2


# ---- Spearman ---------------------------------------------------------------------------------


def test_spearman_with_ties_against_hand_computation() -> None:
    # ranks x = 1, 2.5, 2.5, 4, 5 and y = 1, 2, 3.5, 3.5, 5 -> sum dxdy = 8.75, sum dx^2 = sum dy^2 = 9.5
    # rho = 8.75 / 9.5 = 0.92105; t = rho * sqrt(3 / (1 - rho^2)) = 4.0976 on 3 df -> two-sided p = 0.02631
    # (scipy.stats.spearmanr([1,2,2,3,4], [10,20,30,30,50]) = 0.9210526, p = 0.0263105)
    assert spearman([1, 2, 2, 3, 4], [10, 20, 30, 30, 50]) == {"rho": 0.9211, "p": 0.02631, "n": 5}


def test_spearman_edge_cases() -> None:
    assert spearman([1, 2], [3, 4]) == {"rho": None, "p": None, "n": 2}
    assert spearman([2, 2, 2], [1, 5, 9]) == {"rho": None, "p": None, "n": 3}  # constant: undefined
    assert spearman([1, 2, 3], [30, 20, 10]) == {"rho": -1.0, "p": 0.0, "n": 3}
    r = spearman([1, 2, 3, 4], [1, 3, 2, 4])  # scipy: rho 0.8, p 0.2
    assert r["rho"] == 0.8 and r["p"] == pytest.approx(0.2, abs=1e-4)
    # scipy: 0.48753809, p 0.15290116
    r = spearman([1, 1, 2, 2, 3, 3, 4, 5, 5, 5], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    assert r["rho"] == 0.4875 and r["p"] == pytest.approx(0.1529, abs=1e-4)


def test_correlation_uses_patients_with_a_value() -> None:
    cases = [case("a", 1, il6=50), case("b", 2, il6=400, ifng=80), case("c", 4, il6=3000, ifng=900), case("d", 3)]
    corr = report_from_cases(cases)["correlation"]
    assert corr["il6"] == {"rho": 1.0, "p": 0.0, "n": 3}
    assert corr["ifng"] == {"rho": None, "p": None, "n": 2}


# ---- outputs ------------------------------------------------------------------------------------


def test_csv_has_one_line_per_table_row() -> None:
    report = report_from_cases(cohort_cases())
    rows = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert [r["row"] for r in rows] == [*ROW_LABELS, "correlation_il6", "correlation_ifng"]
    deaths = rows[list(ROW_LABELS).index("deaths")]
    assert deaths["n"] == "3" and deaths["pct"] == "21.4" and len(deaths["patients"].split(";")) == 3
    assert float(rows[-2]["rho"]) > 0.6 and rows[-2]["n"] == "14"


def test_terminal_table() -> None:
    console = Console(record=True, width=120)
    render_report(report_from_cases(cohort_cases()), console)
    text = console.export_text()
    assert "14 patients" in text and "Severe CRS" in text and "64.3" in text and "Spearman" in text


# ---- CIBMTR Form 4100 -------------------------------------------------------------------------


def test_cibmtr_v06_one_vasopressor_after_fluids() -> None:
    (row,) = cibmtr_rows([vignette("V06")])
    assert list(row) == [k for k, _ in FIELDS]
    assert row["q76_crs"] == "Y" and row["q77_crs_date"] == "2025-04-08"
    assert row["q81_fever"] == "Y" and row["q82_fever_date"] == "2025-04-08"
    assert (row["q83_hypotension"], row["q85_iv_fluids"], row["q86_vasopressors"], row["q87_vasopressor_number"]) == (
        "Y", "Y", "Y", "1")
    assert row["q78_crs_therapy"] == "Y" and row["q80_crs_therapy_specify"] == "tocilizumab"
    assert row["q90_hypotension_controlled"] == "Y"
    assert (row["q91_hypoxia_fio2_lt40"], row["q93_hypoxia_fio2_ge40"], row["q95_positive_pressure"]) == ("N", "N", "N")
    assert row["q97_crs_resolved"] == "Y" and row["q98_crs_resolved_date"] == "2025-04-09"
    assert row["q99_neurotoxicity"] == "N" and row["q104_dysphasia"] == "Unknown"
    assert "q86=MedicationAdministration/" in row["evidence"]


def test_cibmtr_v20_death_on_two_vasopressors_and_ventilation() -> None:
    (row,) = cibmtr_rows([vignette("V20")])
    assert row["q87_vasopressor_number"] == ">=2"
    assert row["q90_hypotension_controlled"] == "N"  # died with vasopressors running
    assert row["q93_hypoxia_fio2_ge40"] == "Y" and row["q95_positive_pressure"] == "Y"
    assert row["q96_positive_pressure_date"] == "2025-06-17"
    assert row["q97_crs_resolved"] == "N" and row["q98_crs_resolved_date"] == ""
    assert set(row["q80_crs_therapy_specify"].split("; ")) == {"methylprednisolone", "tocilizumab"}


def test_cibmtr_v25_child_with_capd_icans() -> None:
    (row,) = cibmtr_rows([vignette("V25")])
    assert row["q99_neurotoxicity"] == "Y" and row["q100_neurotoxicity_date"] == "2025-07-18"
    assert row["q101_cartox10_performed"] == "N" and row["capd_highest"] == "12"  # CAPD, age 11
    assert row["q103_depressed_consciousness"] == "Y"
    assert row["q86_vasopressors"] == "N" and row["q85_iv_fluids"] == "Y"


def test_cibmtr_seizure_and_cerebral_edema() -> None:
    (v29,) = cibmtr_rows([vignette("V29")])
    assert (v29["q101_cartox10_performed"], v29["q102_lowest_cartox10"]) == ("Y", "3-6")
    assert (v29["q106_seizure"], v29["q107_seizure_type"], v29["q109_seizure_severity"]) == ("Y", "generalized tonic-clonic", "3")
    (v30b,) = cibmtr_rows([vignette("V30b")])
    assert (v30b["q111_cerebral_edema"], v30b["q112_cerebral_edema_grade"]) == ("Y", "4")


def test_cibmtr_without_series_and_in_local_dates() -> None:
    from datetime import timedelta, timezone

    no_series = {k: v for k, v in vignette("V20").items() if k != "series"}
    (row,) = cibmtr_rows({"cases": [no_series]})
    assert row["q87_vasopressor_number"] == ">=2" and row["q90_hypotension_controlled"] == "Unknown"
    assert row["q95_positive_pressure"] == "Y"
    # V06 fever at 2025-04-08T08:00Z is 2025-04-07 in UTC-10
    (local,) = cibmtr_rows([vignette("V06")], tz=timezone(timedelta(hours=-10)))
    assert local["q82_fever_date"] == "2025-04-07"


def test_cibmtr_csv() -> None:
    rows = cibmtr_rows([vignette("V06"), vignette("V25")])
    text = cibmtr_csv(rows, questions=True)
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0] == [k for k, _ in FIELDS] and lines[1][2].startswith("Q76")
    assert len(lines) == 4 and lines[2][0].startswith("Patient/")
