"""Tiny builders for synthetic FHIR R4 resources used by the unit tests (hours relative to T0)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

T0 = datetime(2025, 3, 10, 8, 0, tzinfo=UTC)
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
RXN = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
LOCAL = "http://hospital.example.org/fhir/CodeSystem/flowsheet"
_ids = count(1)


def at(h: float) -> str:
    return (T0 + timedelta(hours=h)).isoformat().replace("+00:00", "Z")


def _id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def patient(pid: str = "p1", birth: str = "1967-01-01", deceased_h: float | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": "Patient", "id": pid, "birthDate": birth}
    if deceased_h is not None:
        r["deceasedDateTime"] = at(deceased_h)
    return r


def obs(code: str, h: float, value: Any = None, unit: str | None = None, system: str = LOINC,
        pid: str = "p1", display: str | None = None, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "Observation", "id": _id("obs"), "status": "final",
        "code": {"coding": [{"system": system, "code": code, **({"display": display} if display else {})}]},
        "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": at(h),
    }
    if isinstance(value, int | float) and not isinstance(value, bool):
        r["valueQuantity"] = {"value": value, **({"unit": unit, "system": UCUM, "code": unit} if unit else {})}
    elif isinstance(value, str):
        r["valueString"] = value
    elif isinstance(value, dict):
        r["valueCodeableConcept"] = value
    r.update(extra)
    return r


def temp(h: float, v: float, unit: str = "Cel", **kw: Any) -> dict[str, Any]:
    return obs("8310-5", h, v, unit, **kw)


def bp(h: float, sbp: float, dbp: float = 60, **kw: Any) -> dict[str, Any]:
    r = obs("85354-9", h, **kw)
    r["component"] = [
        {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": sbp, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": dbp, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
    ]
    return r


def device(h: float, text: str, code: str | None = None, **kw: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"text": text}
    if code:
        value["coding"] = [{"system": SCT, "code": code, "display": text}]
    return obs("O2-DEVICE", h, value, system=LOCAL, display="O2 Device", **kw)


def flow(h: float, lpm: float, **kw: Any) -> dict[str, Any]:
    return obs("3151-8", h, lpm, "L/min", **kw)


def fio2(h: float, pct: float, unit: str = "%", **kw: Any) -> dict[str, Any]:
    return obs("3150-0", h, pct, unit, **kw)


def score(kind: str, h: float, v: int, **kw: Any) -> dict[str, Any]:
    r = obs(kind, h, system=LOCAL, **kw)
    r["valueInteger"] = v
    return r


def loc(h: float, text: str, **kw: Any) -> dict[str, Any]:
    return obs("ICANS-LOC", h, {"text": text}, system=LOCAL, **kw)


def cart(h: float = 0, pid: str = "p1") -> dict[str, Any]:
    return {
        "resourceType": "Procedure", "id": _id("cart"), "status": "completed",
        "code": {"coding": [{"system": SCT, "code": "1156961008", "display": "Chimeric antigen receptor T-cell immunotherapy"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "performedPeriod": {"start": at(h), "end": at(h + 0.5)},
    }


def proc(code: str, start_h: float, end_h: float | None = None, reason: str | None = None,
         pid: str = "p1", system: str = SCT, display: str | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "Procedure", "id": _id("proc"), "status": "completed",
        "code": {"coding": [{"system": system, "code": code, **({"display": display} if display else {})}]},
        "subject": {"reference": f"Patient/{pid}"},
    }
    if end_h is None:
        r["performedDateTime"] = at(start_h)
    else:
        r["performedPeriod"] = {"start": at(start_h), "end": at(end_h)}
    if reason:
        r["reasonCode"] = [{"text": reason}]
    return r


def med(rxnorm: str | None, start_h: float, end_h: float | None = None, rate: float | None = None,
        rate_unit: str | None = None, dose: float | None = None, dose_unit: str | None = None,
        text: str | None = None, pid: str = "p1", route_iv: bool = True, dosage_text: str | None = None,
        status: str = "completed") -> dict[str, Any]:
    cc: dict[str, Any] = {}
    if rxnorm:
        cc["coding"] = [{"system": RXN, "code": rxnorm}]
    if text:
        cc["text"] = text
    r: dict[str, Any] = {
        "resourceType": "MedicationAdministration", "id": _id("ma"), "status": status,
        "medicationCodeableConcept": cc, "subject": {"reference": f"Patient/{pid}"},
    }
    if end_h is None:
        r["effectiveDateTime"] = at(start_h)
    else:
        r["effectivePeriod"] = {"start": at(start_h), "end": at(end_h)}
    dosage: dict[str, Any] = {}
    if route_iv:
        dosage["route"] = {"coding": [{"system": SCT, "code": "47625008", "display": "Intravenous route"}]}
    if rate is not None:
        dosage["rateQuantity"] = {"value": rate, "unit": rate_unit, "system": UCUM, "code": rate_unit}
    if dose is not None:
        dosage["dose"] = {"value": dose, "unit": dose_unit, "system": UCUM, "code": dose_unit}
    if dosage_text:
        dosage["text"] = dosage_text
    if dosage:
        r["dosage"] = dosage
    return r


NE, EPI, VASO, PHENYL, TOCI, APAP, DEX = "7512", "3992", "11149", "8163", "612865", "161", "3264"


def vitals_baseline(until_h: float = 120, every: float = 4, start: float = -12, sbp: float = 120,
                    t: float = 37.0, pid: str = "p1", skip: set[float] | None = None) -> list[dict[str, Any]]:
    """Normal temperature + BP every `every` hours (times in `skip` left out)."""
    out = []
    h = start
    while h <= until_h:
        if not skip or h not in skip:
            out += [temp(h, t, pid=pid), bp(h, sbp, pid=pid)]
        h += every
    return out


def unused(rtype: str, pid: str = "p1") -> dict[str, Any]:
    """A resource of a type fhir-crs does not read (Encounter, Claim, …)."""
    return {"resourceType": rtype, "id": _id(rtype.lower()), "status": "finished", "subject": {"reference": f"Patient/{pid}"}}
