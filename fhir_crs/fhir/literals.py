"""Small builders for FHIR datatype literals (Coding, CodeableConcept, Quantity) and the code
system URIs the project uses — shared by the synthetic cohort generator and the fixture builder."""

from __future__ import annotations

from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
FLOWSHEET = "http://hospital.example.org/fhir/CodeSystem/flowsheet"


def coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def concept(*codings: dict[str, str], text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = list(codings)
    if text:
        out["text"] = text
    return out


def qty(value: float, code: str, unit: str | None = None) -> dict[str, Any]:
    """A UCUM Quantity (`unit` is the human spelling; defaults to the code)."""
    return {"value": value, "unit": unit or code, "system": UCUM, "code": code}


def loinc(code: str, display: str, text: str | None = None) -> dict[str, Any]:
    return concept(coding(LOINC, code, display), text=text or display)
