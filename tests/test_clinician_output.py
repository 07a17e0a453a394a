"""Issue 14, "What a clinician reads": the report text, CSV and HTML name patients safely (stable
label, MRN, name; --deidentify hides them), say when, from where and by which version they were
made, keep criteria, skip reasons and ids whole, and label every axis with its unit."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from conftest import ROOT, SHARED
from rich.console import Console

from fhir_crs import __version__
from fhir_crs.cli import cli
from fhir_crs.html import _day, nice_ticks, render_case_html, render_report_html
from fhir_crs.identity import ReportMeta, patient_label, safe_url
from fhir_crs.mappers.patient import patient_mrn, patient_name
from fhir_crs.pipeline import run_paths
from fhir_crs.render import render_skip_summary
from fhir_crs.report import report_from_cases

PICU = ROOT / "fixtures" / "cohort" / "picu"
VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"
SCHEMAS = [ROOT / "tests" / "contracts" / "report.schema.json", SHARED / "contracts" / "report.schema.json"]
MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


@cache
def cohort() -> list[dict[str, Any]]:
    return run_paths([PICU]).to_json(series=True)["cases"]


def patients_of_fixture(path: Path) -> list[dict[str, Any]]:
    bundle = json.loads(path.read_text(encoding="utf-8"))
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]


def cli_run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def validate_report(obj: dict[str, Any]) -> None:
    for path in SCHEMAS:
        if path.is_file():
            jsonschema.validate(obj, json.loads(path.read_text(encoding="utf-8")))


# ---- patient identity ------------------------------------------------------------------------


def test_mrn_is_the_identifier_of_type_mr_and_the_name_the_official_one() -> None:
    patient = {"resourceType": "Patient", "id": "x",
               "identifier": [{"system": "urn:ssn", "value": "123-45-6789"},
                              {"use": "old", "type": MR, "value": "OLD-1"},
                              {"use": "usual", "type": MR, "value": " MRN-77 "}],
               "name": [{"use": "nickname", "given": ["Bobby"]}, {"use": "official", "family": "Tables", "given": ["Robert", "J"]}]}
    assert patient_mrn(patient) == "MRN-77"
    assert patient_name(patient) == "Robert J Tables"
    assert patient_mrn({"identifier": [{"system": "urn:ssn", "value": "1"}]}) is None
    assert patient_name({"name": [{"text": "  Ann   Lee "}]}) == "Ann Lee"


def test_labels_are_derived_from_the_patient_not_the_sort_order(tmp_path: Path) -> None:
    """The old pages numbered patients P01, P02 … by sorting the cohort: adding a patient renamed others."""
    cases = cohort()
    full = render_report_html(report_from_cases(cases), cases, tmp_path / "full").read_text(encoding="utf-8")
    last = max(c["patient"] for c in cases)
    subset = [c for c in cases if c["patient"] == last]
    alone = render_report_html(report_from_cases(subset), subset, tmp_path / "one").read_text(encoding="utf-8")
    label = patient_label(last)
    assert re.fullmatch(r"P-[A-Z2-7]{8}", label) and label == patient_label(last)
    for page in (full, alone):
        assert re.search(rf">{label}</a>", page)
    assert not re.search(r">P\d\d</a>", full)
    assert {c["patient_label"] for c in cases} == {patient_label(c["patient"]) for c in cases}


def test_every_output_shows_mrn_name_report_date_source_and_version(tmp_path: Path) -> None:
    first = patients_of_fixture(PICU / "picu-01.json")[0]
    mrn, name = patient_mrn(first), patient_name(first)
    assert mrn and name
    out = tmp_path / "out"
    out.mkdir()
    code, text, err = cli_run("report", str(PICU), "--html", str(out / "html"), "--csv", str(out / "r.csv"))
    assert code == 0, err
    for page in (text, (out / "r.csv").read_text(encoding="utf-8"), (out / "html" / "index.html").read_text(encoding="utf-8")):
        assert mrn in page and name in page
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", page)
        assert f"files: {PICU}" in page and __version__ in page
    label = patient_label(f"Patient/{first['id']}")
    patient_page = (out / "html" / "patients" / f"{first['id']}.html").read_text(encoding="utf-8")
    assert f'<h1 class="patient">{name}</h1>' in patient_page and f"{label} · MRN {mrn} · FHIR" in patient_page
    assert "Report date" in patient_page and f"fhir-crs {__version__}" in patient_page
    rows = list(csv.DictReader(io.StringIO((out / "r.csv").read_text(encoding="utf-8"))))
    mine = next(r for r in rows if r["row"] == "patient" and r["label"] == label)
    assert (mine["patients"], mine["mrn"], mine["name"]) == (f"Patient/{first['id']}", mrn, name)
    assert {r["row"] for r in rows} >= {"report_date", "data_source", "fhir_crs_version"}

    code, raw, err = cli_run("report", str(PICU), "--json")
    report = json.loads(raw)
    validate_report(report)
    assert report["about"]["fhir_crs_version"] == __version__ and report["about"]["deidentified"] is False
    assert {"label": label, "patient": f"Patient/{first['id']}", "mrn": mrn, "name": name} in report["patient_list"]


def test_deidentify_hides_mrn_name_and_fhir_ids_everywhere(tmp_path: Path) -> None:
    patients = [p for f in sorted(PICU.glob("*.json")) for p in patients_of_fixture(f)]
    secrets = {v for p in patients for v in (patient_mrn(p), patient_name(p), p["id"])} - {None}
    out = tmp_path / "out"
    out.mkdir()
    code, raw, err = cli_run("report", str(PICU), "--deidentify", "--json", "--html", str(out / "html"),
                             "--csv", str(out / "r.csv"), "--cibmtr", str(out / "c.csv"))
    assert code == 0, err
    report = json.loads(raw)
    validate_report(report)
    assert report["about"]["deidentified"] is True
    assert all(p["mrn"] is None and p["name"] is None and p["patient"] == f"Patient/~{p['label']}" for p in report["patient_list"])
    texts = {"json": raw, **{str(p.relative_to(out)): p.read_text(encoding="utf-8") for p in out.rglob("*") if p.is_file()}}
    assert len(texts) == 1 + 14 + 1 + 2
    for where, text in texts.items():
        leaked = [s for s in secrets if s in text]
        assert not leaked, (where, leaked[:3])
    code, plain, _ = cli_run("report", str(PICU), "--deidentify")
    assert not [s for s in secrets if s in plain] and "de-identified" in plain


def test_the_data_source_of_a_server_never_shows_credentials() -> None:
    assert safe_url("https://svc:s3cret@ehr.example.org:8443/fhir/R4?_format=json&token=abc#x") == "https://ehr.example.org:8443/fhir/R4"
    line = ReportMeta.for_server("http://u:p@127.0.0.1:8080/fhir").line()
    assert "FHIR server http://127.0.0.1:8080/fhir" in line and "u:p" not in line and __version__ in line


# ---- text output -----------------------------------------------------------------------------


def test_icans_criteria_are_printed_like_crs_criteria() -> None:
    code, text, err = cli_run("grade", str(VIGNETTES / "V25.json"))
    assert code == 0, err
    (case,) = run_paths([VIGNETTES / "V25.json"]).to_json()["cases"]
    for family in ("crs", "icans"):
        criteria = case[family]["astct"]["criteria"]
        assert criteria
        for c in criteria:
            line = f"{family.upper()} grade {c['grade']} at {c['hour']:+g} h: {c['criterion']}  [{', '.join(c['evidence'])}]"
            assert line in text, line


def test_skip_summary_groups_by_reason_code_not_by_text_before_a_colon() -> None:
    skipped = [{"resource": "Observation/a", "reason": "code not in mappings/observations.toml: Height", "code": "unmapped_code"},
               {"resource": "Observation/b", "reason": "code not in mappings/observations.toml: Weight z-score", "code": "unmapped_code"},
               {"resource": "Observation/c", "reason": "value: not a number ('high')", "code": "bad_value"},
               {"resource": "Observation/d", "reason": "value: unit 'mm[Hg]/s' not convertible", "code": "bad_unit"}]
    console = Console(record=True, width=400)
    render_skip_summary(skipped, console)
    text = console.export_text()
    assert re.search(r"^\s+2\s+unmapped_code: ", text, re.MULTILINE), text
    assert re.search(r"^\s+1\s+bad_value: ", text, re.MULTILINE) and re.search(r"^\s+1\s+bad_unit: ", text, re.MULTILINE)
    assert "value:" not in [line.split()[1] for line in text.splitlines()[1:] if line.strip()]


def test_piped_output_never_wraps_an_id_or_a_flag(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CRS_")} | {"COLUMNS": "60", "LINES": "20"}
    for name in ("V20", "V25"):
        result = subprocess.run([sys.executable, "-m", "fhir_crs", "grade", str(VIGNETTES / f"{name}.json"), "--show-skips"],
                                capture_output=True, text=True, env=env, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        (case,) = run_paths([VIGNETTES / f"{name}.json"]).to_json()["cases"]
        words = set()
        for family in ("crs", "icans"):
            for r in case[family].values():
                words |= set(r["flags"])
            words |= {ref for c in case[family]["astct"]["criteria"] for ref in c["evidence"]}
        words |= {case["patient"]}
        assert words
        for w in words:
            assert w in result.stdout, (name, w)


# ---- HTML ------------------------------------------------------------------------------------


def test_html_units_on_every_axis_and_column(tmp_path: Path) -> None:
    cases = cohort()
    index = render_report_html(report_from_cases(cases, meta=ReportMeta.for_paths([PICU])), cases, tmp_path / "site")
    html = index.read_text(encoding="utf-8")
    for text in ("Age (y)", "Peak IL-6 (pg/mL)", "peak IL-6 (pg/mL, log scale)", "peak IFN-γ (pg/mL, log scale)"):
        assert text in html, text
    page = (index.parent / "patients" / f"{cases[0]['patient'].split('/')[1]}.html").read_text(encoding="utf-8")
    for text in ("pg/mL, log scale", "ng/mL, log scale", "mg/L, log scale", "°C", "mmHg"):
        assert text in page, text
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', page)
    assert sum(t.endswith(" °C") for t in ticks) >= 3 and sum(t.endswith(" mmHg") for t in ticks) >= 3
    assert any(t.endswith(" pg/mL") for t in ticks) and any(t.endswith(" ng/mL") for t in ticks)


def test_nice_ticks_are_round_numbers() -> None:
    assert nice_ticks(35.0, 41.0) == [36, 38, 40]
    assert nice_ticks(35.0, 41.0, 6) == [35, 36, 37, 38, 39, 40, 41]
    assert nice_ticks(40.0, 150.0, 4) == [50, 100, 150]
    assert nice_ticks(36.4, 61.0, 4) == [40, 50, 60]
    assert nice_ticks(80.0, 100.0, 2) == [80, 90, 100]


def test_hours_before_day_0_read_minus_not_plus_minus(tmp_path: Path) -> None:
    assert _day(-24) == "D-1 (-24 h)" and _day(30.25) == "D1 (+30.2 h)"
    cases = cohort()
    index = render_report_html(report_from_cases(cases), cases, tmp_path / "site")
    pages = [p.read_text(encoding="utf-8") for p in (index.parent / "patients").glob("*.html")]
    assert any("(-" in p for p in pages)  # pre-infusion events are on the pages
    assert not [p for p in pages if "+-" in p]


def test_drug_classes_have_human_names() -> None:
    (case,) = run_paths([VIGNETTES / "V25.json"]).to_json(series=True)["cases"]
    html = render_case_html(case)
    assert "penn_iv_therapy_classes = IV antibiotic, anti-IL-6 (tocilizumab, siltuximab)" in html
    assert not re.search(r"&#x27;(iv_antibiotic|anti_il6|anti_cytokine)&#x27;|\banti il6\b", html)


def test_an_empty_cohort_explains_itself(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "nocart1", "birthDate": "2015-01-01"}},
        {"resource": {"resourceType": "Observation", "id": "t1", "status": "final",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
                      "subject": {"reference": "Patient/nocart1"}, "effectiveDateTime": "2025-01-01T10:00:00Z",
                      "valueQuantity": {"value": 39.1, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}}},
        {"resource": {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/nocart1"}}}]}
    (folder / "b.json").write_text(json.dumps(bundle), encoding="utf-8")
    expected = "no CAR-T infusion found in 1 patient(s); 3 resource(s) skipped: no_infusion 2, unused_type 1"
    code, text, err = cli_run("report", str(folder), "--html", str(tmp_path / "html"))
    assert code == 0, err
    assert expected in text
    assert expected in (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    code, raw, _ = cli_run("report", str(folder), "--json")
    report = json.loads(raw)
    validate_report(report)
    assert report["patients"] == 0 and report["empty_reason"].startswith(expected)


@pytest.mark.parametrize("deidentify", [False, True])
def test_cibmtr_rows_follow_deidentify(tmp_path: Path, deidentify: bool) -> None:
    target = tmp_path / "c.csv"
    code, _, err = cli_run("report", str(VIGNETTES / "V06.json"), "--cibmtr", str(target), *(["--deidentify"] if deidentify else []))
    assert code == 0, err
    (row,) = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    (case,) = run_paths([VIGNETTES / "V06.json"]).to_json()["cases"]
    assert row["patient"] == (f"Patient/~{patient_label(case['patient'])}" if deidentify else case["patient"])


# ---- the project's schema copies document the identity keys ---------------------------------


def test_contract_copies_document_the_identity_and_report_keys(tmp_path: Path) -> None:
    """tests/contracts (the project's copies, which may only extend ../shared/contracts) give the
    issue-14 keys their types: a real output validates, a wrongly typed one does not."""
    grade_schema = json.loads((ROOT / "tests" / "contracts" / "grade.schema.json").read_text(encoding="utf-8"))
    report_schema = json.loads((ROOT / "tests" / "contracts" / "report.schema.json").read_text(encoding="utf-8"))
    assert {"patient_label", "mrn", "name"} <= set(grade_schema["$defs"]["case"]["properties"])
    assert {"about", "patient_list", "empty_reason"} <= set(report_schema["properties"])

    code, out, _ = cli_run("grade", str(VIGNETTES / "V20.json"), "--json")
    assert code == 0
    graded = json.loads(out)
    (case,) = graded["cases"]
    assert case["patient_label"] == patient_label(case["patient"]) and case["name"] == "Sam VignetteV20"
    jsonschema.validate(graded, grade_schema)
    for key, bad in (("patient_label", "P-lower123"), ("mrn", 12345), ("name", ""), ("name", ["Sam"])):
        broken = {**graded, "cases": [{**case, key: bad}]}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, grade_schema)
    jsonschema.validate({**graded, "cases": [{**case, "mrn": None, "name": None}]}, grade_schema)

    for extra in ([], ["--deidentify"]):
        code, out, _ = cli_run("report", str(VIGNETTES / "V20.json"), "--json", *extra)
        assert code == 0
        report = json.loads(out)
        validate_report(report)  # the project's copy and ../shared/contracts alike
        assert report["about"]["deidentified"] is bool(extra)
        (who,) = report["patient_list"]
        assert (who["name"] is None) is bool(extra)
        for key, bad in (("about", {"source": "files: x"}), ("patient_list", [{"label": "P-X"}]), ("empty_reason", "")):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate({**report, key: bad}, report_schema)

    lonely = tmp_path / "no-cart.json"
    lonely.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "solo", "birthDate": "1970-01-01"}}]}), encoding="utf-8")
    code, out, _ = cli_run("report", str(lonely), "--json")
    empty = json.loads(out)
    assert empty["patients"] == 0 and "no CAR-T infusion found" in empty["empty_reason"]
    validate_report(empty)
