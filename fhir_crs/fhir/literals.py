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


# The codes under which the project's generators chart the grading inputs (fixtures/README.md).
SPO2 = concept(coding(LOINC, "2708-6", "Oxygen saturation in Arterial blood"),
               coding(LOINC, "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"), text="SpO2")
WEIGHT = loinc("29463-7", "Body weight", "Weight")
O2_DEVICE = concept(coding(FLOWSHEET, "O2-DEVICE", "O2 Device"), text="O2 Device")
O2_FLOW = loinc("3151-8", "Inhaled oxygen flow rate", "O2 Flow Rate")
FIO2 = loinc("3150-0", "Inhaled oxygen concentration", "FiO2")
ICE = concept(coding(FLOWSHEET, "ICE-SCORE", "ICE score"), text="ICE score")
CAPD = concept(coding(FLOWSHEET, "CAPD-TOTAL", "CAPD total score"), text="CAPD total score")
LOC = concept(coding(FLOWSHEET, "ICANS-LOC", "Level of consciousness (ICANS)"), text="Level of consciousness")

# O2 delivery devices: key -> (SNOMED device code or None, SNOMED display, flowsheet text)
DEVICES: dict[str, tuple[str | None, str, str]] = {
    "ra": (None, "", "Room air"),
    "nc": ("336623009", "Oxygen nasal cannula", "Nasal cannula"),
    "hfnc": ("426854004", "High flow oxygen nasal cannula", "High flow nasal cannula"),
    "mask": ("336602003", "Oxygen mask", "Simple face mask"),
    "nrb": ("427591007", "Nonrebreather oxygen mask", "Non-rebreather mask"),
    "venturi": ("428285009", "Venturi mask", "Venturi mask"),
    "cpap": (
        "706226000",
        "Continuous positive airway pressure/Bilevel positive airway pressure mask",
        "CPAP (home settings)",
    ),
    "vent": ("706172005", "Ventilator", "Ventilator"),
}
