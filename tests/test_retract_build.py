"""writeback/retract.py (pure): a retracted Condition and summary Bundle are valid R4, keep the
record of what was claimed, and retracting twice changes nothing."""

from __future__ import annotations

from pathlib import Path

from fhir.resources.R4B.condition import Condition

from fhir_crs.pipeline import run_paths
from fhir_crs.writeback import build_case_write
from fhir_crs.writeback.retract import (
    bundle_is_retracted,
    is_entered_in_error,
    retracted_bundle,
    retracted_condition,
    retraction_note,
)

ROOT = Path(__file__).resolve().parents[1]


def _write(vignette: str, settings):
    run = run_paths([ROOT / "fixtures" / "R4" / "vignettes" / f"{vignette}.json"], settings, ROOT / "mappings")
    return build_case_write(run.cases[0], settings, "urn:t", recorded="2026-01-01T00:00:00Z")


def test_a_resolved_condition_is_retracted_without_clinical_status_or_abatement(settings):
    write = _write("V29", settings)  # CRS 1 (resolved) and ICANS 3
    crs = write.resources["crs"]
    assert "abatementDateTime" in crs and crs["clinicalStatus"]["coding"][0]["code"] == "resolved"
    note = retraction_note("2025-08-04T08:00:00Z", {"MedicationAdministration/m1": "was deleted"}, "2026-02-01T00:00:00Z", "0.1.0")
    out = retracted_condition(dict(crs, id="c1", meta={"versionId": "3"}), note, "2026-02-01T00:00:00Z")
    assert is_entered_in_error(out) and "clinicalStatus" not in out and "abatementDateTime" not in out
    assert out["identifier"] == crs["identifier"] and out["stage"] == crs["stage"] and out["id"] == "c1"
    assert "meta" not in out and out["note"][-1] == {"time": "2026-02-01T00:00:00Z", "text": note}
    assert "MedicationAdministration/m1 was deleted" in note
    Condition.model_validate(out)
    assert retracted_condition(out, note, "2026-02-01T00:00:00Z") == out  # the note is not added twice


def test_the_summary_bundle_is_retracted_entry_by_entry(settings):
    write = _write("V29", settings)
    bundle = write.resources["summary"]
    assert not bundle_is_retracted(bundle)
    out = retracted_bundle(bundle, "why", "2026-02-01T00:00:00Z")
    assert bundle_is_retracted(out) and out["identifier"] == bundle["identifier"] and out["type"] == "collection"
    kinds = {e["resource"]["resourceType"] for e in out["entry"]}
    assert {"Condition", "Observation", "List"} <= kinds
    assert all("clinicalStatus" not in e["resource"] for e in out["entry"])
    assert out["meta"]["tag"][0]["code"] == "retracted" and out["timestamp"] == "2026-02-01T00:00:00Z"
    assert not bundle_is_retracted(bundle)  # the input is not changed
