"""Synthetic data (outside the grading pipeline): deterministic FHIR R4 charts of CAR-T courses.

Two products, both built from a designed clinical `Course` by one charting engine (`Chart`):

* `generate_picu_cohort(seed)` — the 14-child paediatric ICU cohort of the seed study (Zhu et al.,
  J Clin Pediatr 2022;40(11):848-853: relapsed B-ALL, CAR-T, PICU). Each child's course is
  written by hand so that grading the charts with fhir-crs under ASTCT reproduces the paper's
  table exactly (9 severe CRS, 11 haemodynamic instability, 5 ventilated, 10 neurological, 7 liver
  injury, 14 tocilizumab, 7 steroids, 5 blood purification, 3 deaths, 11 recovered in 2 weeks),
  with IL-6 and IFN-γ peaks that rise with the CRS grade. `write_cohort(out_dir)` writes the
  14 Bundles and `ground_truth.json`.
* `generate_cohort(n, seed, pediatric_fraction)` — N mixed adult/paediatric courses of random
  severity for benchmarks, streamed one Bundle at a time (`iter_cohort` adds each course's
  expected grades).

Every Bundle is a `transaction` the way an EHR exports a chart: `PUT Type/id` entries with stable
uuid5 ids (reloading is idempotent), feed times in the hospital's offset (+08:00 for the PICU
cohort), vital signs every 1-4 h (hourly BP on vasopressors, every 8 h once stable), daily labs,
ICE (>= 12 y) or CAPD (< 12 y) with level of consciousness every 12 h, one
MedicationAdministration per infusion-rate segment. Codes follow fixtures/README.md ("How
clinical facts are encoded"). Standard library only; `random.Random` seeded per patient, so the
same seed gives byte-identical files.

How a design stays exactly gradable (ASTCT): fill-in temperatures stay < 38.0 °C outside the
designed febrile window and no temperature is charted between the last fever and the designed
defervescence reading; fill-in SBP stays above the age threshold (PALS) except the designed
hypotension pairs and the pre-terminal refractory phase; fill-in SpO2 is normal; oxygen rows
are charted at every change and every 2-4 h and end with a "Room air" row; fill-in neuro scores
are normal and none is charted inside a designed ICANS course or under sedation.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .fhir.literals import (
    CAPD,
    DEVICES,
    FIO2,
    ICE,
    LOC,
    LOINC,
    O2_DEVICE,
    O2_FLOW,
    RXNORM,
    SNOMED,
    SPO2,
    WEIGHT,
    coding,
    concept,
    loinc,
    qty,
)

__all__ = [
    "PAPER_COUNTS",
    "Course",
    "build_bundle",
    "dumps_bundle",
    "expected_for",
    "generate_cohort",
    "generate_picu_cohort",
    "iter_cohort",
    "picu_courses",
    "write_cohort",
]

DEFAULT_SEED = 20221115  # the seed study's publication date
NAMESPACE = uuid.UUID("6b1d3c0e-2f4a-5e8b-9a7c-1d2e3f4a5b6c")
CHINA = timezone(timedelta(hours=8))

# The seed study's table (n = 14): what grading the PICU cohort must reproduce.
PAPER_COUNTS: dict[str, int] = {
    "crs_any": 14, "crs_severe": 9, "haemodynamic_instability": 11, "mechanical_ventilation": 5,
    "neurological": 10, "liver_injury": 7, "tocilizumab": 14, "corticosteroids": 7,
    "blood_purification": 5, "deaths": 3, "recovered_14d": 11,
}
SEED_STUDY = ("Zhu Q, Pan T, Bai Z, Ding X, Li Y. Clinical analysis of severe cytokine release syndrome caused by "
              "CAR-T cell therapy in children's intensive care unit. J Clin Pediatr. 2022;40(11):848-853. "
              "doi:10.12372/jcp.2022.21e0516")

# ---------------------------------------------------------------------------------------------
# Codes (fixtures/README.md, ../shared/docs/terminology.md)
# ---------------------------------------------------------------------------------------------

ATC = "http://www.whocc.no/atc"
FORMULARY = "http://hospital.example.org/fhir/CodeSystem/formulary"
MRN = "http://hospital.example.org/fhir/sid/mrn"
BASE_URL = "http://hospital.example.org/fhir"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"


TEMP = {
    "body": loinc("8310-5", "Body temperature", "Temperature"),
    # children's temperatures are mostly axillary; feeds send the site code with the generic one
    "axillary": concept(coding(LOINC, "8328-7", "Axillary temperature"), coding(LOINC, "8310-5", "Body temperature"),
                         text="Temperature (axillary)"),
}
BP_PANEL = loinc("85354-9", "Blood pressure panel with all children optional", "Blood pressure")
SBP = loinc("8480-6", "Systolic blood pressure")
DBP = loinc("8462-4", "Diastolic blood pressure")
HR = loinc("8867-4", "Heart rate")
RR = loinc("9279-1", "Respiratory rate")
HEIGHT = loinc("8302-2", "Body height", "Height")
SEIZURE = concept(coding(SNOMED, "91175000", "Seizure"), text="Seizure")
CAUSE_OF_DEATH = loinc("69453-9", "Cause of death [US Standard Certificate of Death]", "Cause of death")
BLOOD_CULTURE = loinc("600-7", "Bacteria identified in Blood by Culture", "Blood culture")

# lab key -> (LOINC, display, UCUM unit, the laboratory system's own short name)
LABS: dict[str, tuple[str, str, str, str]] = {
    "wbc": ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", "WBC"),
    "anc": ("751-8", "Neutrophils [#/volume] in Blood by Automated count", "10*3/uL", "Neutrophils #"),
    "plt": ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", "PLT"),
    "crp": ("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "mg/L", "CRP"),
    "ferritin": ("2276-4", "Ferritin [Mass/volume] in Serum or Plasma", "ng/mL", "Ferritin"),
    "fibrinogen": ("3255-7", "Fibrinogen [Mass/volume] in Platelet poor plasma by Coagulation assay", "mg/dL", "Fibrinogen"),
    "alt": ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L", "ALT"),
    "ast": ("1920-8", "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L", "AST"),
    "bili": ("1975-2", "Bilirubin.total [Mass/volume] in Serum or Plasma", "mg/dL", "Total bilirubin"),
    "creat": ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "Creatinine"),
    "il6": ("26881-3", "Interleukin 6 [Mass/volume] in Serum or Plasma", "pg/mL", "IL-6"),
    "ifng": ("27415-9", "Interferon gamma [Mass/volume] in Serum or Plasma", "pg/mL", "IFN-gamma"),
}

# drug key -> (codings, display)
DRUGS: dict[str, tuple[list[dict[str, str]], str]] = {
    "tocilizumab": ([coding(RXNORM, "612865", "tocilizumab")], "tocilizumab"),
    "methylprednisolone": ([coding(RXNORM, "6902", "methylprednisolone")], "methylprednisolone"),
    "dexamethasone": ([coding(RXNORM, "3264", "dexamethasone")], "dexamethasone"),
    "norepinephrine": ([coding(RXNORM, "7512", "norepinephrine")], "norepinephrine"),
    "epinephrine": ([coding(RXNORM, "3992", "epinephrine")], "epinephrine"),
    "dopamine": ([coding(RXNORM, "3628", "dopamine")], "dopamine"),
    "vasopressin": ([coding(RXNORM, "11149", "vasopressin (USP)")], "vasopressin"),
    "paracetamol": ([coding(RXNORM, "161", "acetaminophen")], "paracetamol"),
    "cefepime": ([coding(RXNORM, "20481", "cefepime")], "cefepime"),
    "meropenem": ([coding(RXNORM, "29561", "meropenem"), coding(ATC, "J01DH02", "meropenem")], "meropenem"),
    "ns": ([coding(RXNORM, "313002", "sodium chloride 9 MG/ML Injectable Solution")], "0.9% sodium chloride"),
    "midazolam": ([coding(RXNORM, "6960", "midazolam"), coding(ATC, "N05CD08", "midazolam")], "midazolam"),
    "levetiracetam": ([coding(RXNORM, "114477", "levetiracetam")], "levetiracetam"),
    "cart": ([coding(FORMULARY, "CART-CELLS", "CD19 CAR-T cells")], "CD19-directed CAR-T cells (autologous)"),
    "axicel": ([coding(RXNORM, "1987398", "axicabtagene ciloleucel")], "axicabtagene ciloleucel (Yescarta)"),
    "tisacel": ([coding(RXNORM, "1986438", "tisagenlecleucel")], "tisagenlecleucel (Kymriah)"),
}
IV = concept(coding(SNOMED, "47625008", "Intravenous route"), text="IV")
PO = concept(coding(SNOMED, "26643006", "Oral route"), text="PO")

PROCEDURES = {
    "cart": ("1156961008", "Chimeric antigen receptor T-cell immunotherapy"),
    "icu": ("305351004", "Admission to intensive care unit"),
    "intubation": ("112798008", "Insertion of endotracheal tube"),
    "imv": ("1258985005", "Invasive mechanical ventilation"),
    "extubation": ("271280005", "Removal of endotracheal tube"),
    "crrt": ("714749008", "Continuous renal replacement therapy"),
    "tpe": ("225067007", "Plasma exchange"),
}

# ---------------------------------------------------------------------------------------------
# The designed course
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Pressor:
    """One vasopressor infusion: rate segments (hour, rate) until `end`."""

    drug: str
    rates: list[tuple[float, float]]
    end: float
    unit: str = "ug/kg/min"  # "ug/kg/min" (children), "ug/min" or "U/min" (adults, vasopressin)

    @property
    def start(self) -> float:
        return self.rates[0][0]


@dataclass(slots=True)
class Oxygen:
    """Supplemental O2 on one device from `start` until `end` (next device or room air)."""

    start: float
    end: float
    device: str  # nc | hfnc | mask | nrb
    flow: float | None = None
    fio2: float | None = None


@dataclass(slots=True)
class Neuro:
    """One designed neuro assessment: ICE (>= 12 y) or CAPD (< 12 y) with level of consciousness;
    `score=None` charts only the level of consciousness (e.g. unarousable, score not assessable)."""

    h: float
    score: int | None
    loc: str = "Alert"


@dataclass(slots=True)
class Course:
    """A designed CAR-T course in hours from the start of the infusion."""

    key: str
    summary: str
    age: int
    months: int
    sex: str
    weight: float
    infusion: datetime
    onset: float | None  # first fever >= 38.0 °C (None: never febrile)
    last_fever: float | None = None
    tmax: float = 39.0
    defervescence: float | None = None  # first afebrile reading after the last fever
    hypotension: list[tuple[float, int]] = field(default_factory=list)  # (h, SBP) charted twice, 15 min apart
    boluses: list[tuple[float, float]] = field(default_factory=list)  # (h, mL/kg)
    pressors: list[Pressor] = field(default_factory=list)
    oxygen: list[Oxygen] = field(default_factory=list)
    hypoxia: list[tuple[float, int]] = field(default_factory=list)  # (h, SpO2) charted before O2 escalation
    intubation: tuple[float, float | None, str] | None = None  # (start, extubation or None, indication)
    purification: list[tuple[str, float, float]] = field(default_factory=list)  # (crrt|tpe, start, end)
    tocilizumab: list[float] = field(default_factory=list)
    steroids: list[tuple[str, float, float, int, float]] = field(default_factory=list)  # drug, h, mg/kg, count, every h
    neuro: list[Neuro] = field(default_factory=list)
    seizure: tuple[float, int] | None = None  # (h, seconds)
    neuro_baseline: int = 0  # CAPD before infusion (ICE baseline is 10)
    icu: float | None = None  # PICU admission
    peaks: dict[str, float] = field(default_factory=dict)  # il6, ifng, crp, ferritin, alt, ast, bili, creat
    peak_at: float | None = None  # time of the cytokine peak
    liver_at: float | None = None
    refractory: tuple[float, float] | None = None  # SBP charted below threshold despite vasopressors
    death: float | None = None
    death_text: str = ""
    end: float = 336.0
    product: str = "cart"
    site: str = "PICU"
    tz: timezone = CHINA
    temp_site: str = "axillary"
    pediatric_rates: bool = True

    @property
    def pediatric(self) -> bool:
        return self.age < 18

    @property
    def sbp_threshold(self) -> float:
        """PALS / PedsCARTOX threshold for completed years (grading-criteria §1.3)."""
        if self.age < 1:
            return 70.0
        return 70.0 + 2 * self.age if self.age <= 10 else 90.0

    @property
    def ventilation(self) -> tuple[float, float] | None:
        if self.intubation is None:
            return None
        start, stop, _ = self.intubation
        return start, stop if stop is not None else (self.death if self.death is not None else self.end)

    def resolution(self) -> float | None:
        """Designed CRS resolution: end of the last abnormality (defervescence, vasopressor,
        O2), or None if the child died during CRS or never had it."""
        if self.onset is None or self.death is not None:
            return None
        ends = [self.defervescence or self.onset]
        ends += [p.end for p in self.pressors]
        ends += [o.end for o in self.oxygen]
        ends += [h for h, _ in self.hypotension]
        if self.ventilation:
            ends.append(self.ventilation[1])
        return max(ends)


# ---------------------------------------------------------------------------------------------
# Expected grades, computed from the design (independently of the grader)
# ---------------------------------------------------------------------------------------------

_LOC_GRADE = {"Alert": 0, "Awakens spontaneously": 1, "Awakens to voice": 2,
              "Awakens only to tactile stimulus": 3, "Unarousable": 4}


def _concurrent(pressors: list[Pressor]) -> bool:
    """>= 2 different non-vasopressin vasopressors overlapping >= 60 min (ASTCT grade 4)."""
    ps = [p for p in pressors if p.drug != "vasopressin"]
    for i, a in enumerate(ps):
        for b in ps[i + 1:]:
            if a.drug != b.drug and min(a.end, b.end) - max(a.start, b.start) >= 1.0:
                return True
    return False


def expected_crs(c: Course) -> int:
    if c.onset is None:
        return 0
    if c.death is not None:
        return 5
    g = 1
    if c.hypotension:
        g = 2
    for o in c.oxygen:
        g = max(g, 2 if o.device == "nc" and (o.flow or 0) <= 6 else 3)
    if c.pressors:
        g = max(g, 3)
    if _concurrent(c.pressors) or c.intubation is not None:
        g = 4
    return g


def expected_icans(c: Course) -> int:
    g = 0
    for n in c.neuro:
        s = _LOC_GRADE[n.loc]
        if n.score is not None:
            if c.age >= 12:
                s = max(s, 0 if n.score >= 10 else 1 if n.score >= 7 else 2 if n.score >= 3 else 3)
            elif n.score > c.neuro_baseline and n.score >= 1:
                s = max(s, 3 if n.score >= 9 else 1)
        g = max(g, s)
    if c.seizure is not None:
        g = max(g, 3)
    return g


def _liver_grade(c: Course) -> int:
    alt = c.peaks.get("alt", 30) / 40
    ast = c.peaks.get("ast", 35) / 50
    bili = c.peaks.get("bili", 0.6) / 1.0
    g = 0
    for x in (alt, ast):
        g = max(g, 4 if x > 20 else 3 if x > 5 else 2 if x > 3 else 1 if x > 1 else 0)
    return max(g, 4 if bili > 10 else 3 if bili > 3 else 2 if bili > 1.5 else 1 if bili > 1 else 0)


def _utc(c: Course, h: float | None) -> str | None:
    if h is None:
        return None
    t = c.infusion + timedelta(seconds=round(h * 3600))
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expected_for(c: Course, patient_ref: str) -> dict[str, Any]:
    """What grading this course must give (ASTCT) and the facts the cohort table reads."""
    crs = expected_crs(c)
    res = c.resolution()
    return {
        "patient": patient_ref,
        "key": c.key,
        "summary": c.summary,
        "age_years": c.age,
        "weight_kg": c.weight,
        "infusion": _utc(c, 0.0),
        "crs_astct": {"grade": crs, "onset": _utc(c, c.onset), "resolved": _utc(c, res)},
        "icans_astct": {"grade": expected_icans(c)},
        "facts": {
            "haemodynamic_instability": bool(c.pressors or c.boluses),
            "vasopressors": bool(c.pressors),
            "mechanical_ventilation": c.intubation is not None,
            "liver_injury_grade": _liver_grade(c),
            "tocilizumab": len(c.tocilizumab),
            "corticosteroids": bool(c.steroids),
            "blood_purification": bool(c.purification),
            "died": c.death is not None,
            "peak_il6": c.peaks.get("il6"),
            "peak_ifn_gamma": c.peaks.get("ifng"),
        },
        "recovered_14d": c.death is None and (crs == 0 or (res is not None and res - (c.onset or 0) <= 14 * 24)),
    }


# ---------------------------------------------------------------------------------------------
# The charting engine
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    rtype: str
    body: dict[str, Any]
    h: float
    seq: int


class Chart:
    """Writes one `Course` as the resources an EHR would export, then as a transaction Bundle."""

    def __init__(self, course: Course, seed: int | str, id_prefix: str):
        self.c = course
        self.rng = random.Random(f"fhir-crs/synthetic/{seed}/{course.key}")
        self.id_prefix = id_prefix
        self.seed = seed
        self._n = 0
        self.entries: list[_Entry] = []
        self.pid = self._uid(full=True)
        self.eid = self._uid()
        self.patient_ref = f"Patient/{self.pid}"
        self.encounter_ref = f"Encounter/{self.eid}"
        self.begin = -24.0

    # ---- ids, time, resources --------------------------------------------------------------
    def _uid(self, full: bool = False) -> str:
        """uuid5 ids (stable for a seed); resources other than the Patient get the 16-hex-digit
        form many EHR exports use."""
        self._n += 1
        u = uuid.uuid5(NAMESPACE, f"{self.id_prefix}/{self.seed}/{self.c.key}/{self._n}")
        if full:
            return str(u)
        # An all-digit id (a 16-hex-digit string is one about once in 2,000) is refused on PUT by a
        # HAPI server with its default client id strategy (HAPI-0960): make it non-numeric.
        short = u.hex[:16]
        return "f" + short[1:] if short.isdigit() else short

    def at(self, h: float) -> str:
        t = self.c.infusion + timedelta(seconds=round(h * 3600))
        return t.astimezone(self.c.tz).isoformat(timespec="seconds").replace("+00:00", "Z")

    def add(self, rtype: str, body: dict[str, Any], h: float) -> dict[str, Any]:
        body = {"resourceType": rtype, "id": self._uid(), **body}
        self.entries.append(_Entry(rtype, body, h, len(self.entries)))
        return body

    def r(self, lo: float, hi: float, nd: int = 0) -> float:
        v = self.rng.uniform(lo, hi)
        return round(v, nd) if nd else float(round(v))

    def obs(self, h: float, code: dict[str, Any], value: dict[str, Any] | None = None, *,
            category: str = "vital-signs", components: list[dict[str, Any]] | None = None,
            end: float | None = None, issued: float | None = None, note: str | None = None,
            ref_range: tuple[float | None, float | None, str] | None = None) -> dict[str, Any]:
        display = {"vital-signs": "Vital Signs", "laboratory": "Laboratory", "survey": "Survey", "exam": "Exam"}[category]
        body: dict[str, Any] = {
            "status": "final",
            "category": [concept(coding(OBS_CAT, category, display))],
            "code": code,
            "subject": {"reference": self.patient_ref},
            "encounter": {"reference": self.encounter_ref},
        }
        if end is None:
            body["effectiveDateTime"] = self.at(h)
        else:
            body["effectivePeriod"] = {"start": self.at(h), "end": self.at(end)}
        if issued is not None:
            body["issued"] = self.at(issued)
        if value:
            body.update(value)
        if components:
            body["component"] = components
        if ref_range:
            lo, hi, unit = ref_range
            rr: dict[str, Any] = {}
            if lo is not None:
                rr["low"] = qty(lo, unit)
            if hi is not None:
                rr["high"] = qty(hi, unit)
            body["referenceRange"] = [rr]
        if note:
            body["note"] = [{"text": note}]
        return self.add("Observation", body, h)

    def med(self, h: float, drug: str, *, end: float | None = None, dose: tuple[float, str] | None = None,
            rate: tuple[float, str, str] | None = None, text: str | None = None, route: dict[str, Any] = IV) -> None:
        codings, name = DRUGS[drug]
        dosage: dict[str, Any] = {"text": text or name, "route": route}
        if dose:
            dosage["dose"] = qty(dose[0], dose[1])
        if rate:
            dosage["rateQuantity"] = qty(rate[0], rate[1], rate[2])
        body: dict[str, Any] = {
            "status": "completed",
            "medicationCodeableConcept": concept(*codings, text=name),
            "subject": {"reference": self.patient_ref},
            "context": {"reference": self.encounter_ref},
        }
        if end is None:
            body["effectiveDateTime"] = self.at(h)
        else:
            body["effectivePeriod"] = {"start": self.at(h), "end": self.at(end)}
        body["dosage"] = dosage
        self.add("MedicationAdministration", body, h)

    def proc(self, h: float, key: str, *, end: float | None = None, reason: str | None = None,
             text: str | None = None, point: bool = False) -> None:
        code, display = PROCEDURES[key]
        body: dict[str, Any] = {
            "status": "completed",
            "code": concept(coding(SNOMED, code, display), text=text or display),
            "subject": {"reference": self.patient_ref},
            "encounter": {"reference": self.encounter_ref},
        }
        if point or end is None:
            body["performedDateTime"] = self.at(h)
        else:
            body["performedPeriod"] = {"start": self.at(h), "end": self.at(end)}
        if reason:
            body["reasonCode"] = [concept(text=reason)]
        self.add("Procedure", body, h)

    # ---- state helpers ---------------------------------------------------------------------
    @property
    def stop(self) -> float:
        return self.c.death if self.c.death is not None else self.c.end

    def pressor_running(self, h: float) -> bool:
        return any(p.start <= h < p.end for p in self.c.pressors)

    def o2_at(self, h: float) -> Oxygen | None:
        return next((o for o in self.c.oxygen if o.start <= h < o.end), None)

    def ventilated(self, h: float) -> bool:
        v = self.c.ventilation
        return v is not None and v[0] <= h < v[1]

    def unstable(self, h: float) -> bool:
        """PICU phase charted every 2 h: vasopressors, ventilation, high-flow/mask O2, or the first
        day after any of them."""
        c = self.c
        spans = [(p.start, p.end) for p in c.pressors] + [(o.start, o.end) for o in c.oxygen if o.device != "nc"]
        if c.ventilation:
            spans.append(c.ventilation)
        return any(a - 2 <= h < b + 12 for a, b in spans)

    def febrile_window(self, h: float) -> bool:
        c = self.c
        return c.onset is not None and c.last_fever is not None and c.onset <= h <= c.last_fever

    # ---- normal ranges ---------------------------------------------------------------------
    def norms(self) -> dict[str, tuple[float, float]]:
        a = self.c.age
        if a < 3:
            return {"hr": (100, 135), "rr": (24, 34), "sbp": (88, 104)}
        if a < 6:
            return {"hr": (90, 122), "rr": (20, 28), "sbp": (92, 108)}
        if a < 10:
            return {"hr": (80, 112), "rr": (18, 24), "sbp": (97, 114)}
        if a < 14:
            return {"hr": (72, 104), "rr": (16, 22), "sbp": (102, 120)}
        if a < 18:
            return {"hr": (62, 98), "rr": (14, 20), "sbp": (106, 126)}
        return {"hr": (62, 94), "rr": (12, 18), "sbp": (108, 136)}

    # ---- build -----------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        self._demographics()
        self._infusion()
        self._vitals()
        self._oxygen()
        self._labs()
        self._neuro()
        self._treatment()
        self._procedures()
        self._death()
        return self._bundle()

    def _demographics(self) -> None:
        c = self.c
        t0 = c.infusion.astimezone(c.tz).date()
        y, m = t0.year - c.age, t0.month - c.months
        while m <= 0:
            m, y = m + 12, y - 1
        birth = date(y, m, 1) + timedelta(days=self.rng.randrange(0, 27))
        if (t0.month, t0.day) < (birth.month, birth.day) and birth.year == t0.year - c.age:
            birth = birth.replace(day=1)
        patient: dict[str, Any] = {
            "identifier": [{"use": "usual", "type": concept(coding("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical record number")),
                            "system": MRN, "value": str(self.rng.randrange(10_000_000, 99_999_999))}],
            "active": True,
            "name": [{"use": "official", "family": "Synthetic", "given": [c.key.upper()]}],
            "gender": c.sex,
            "birthDate": birth.isoformat(),
        }
        self.entries.append(_Entry("Patient", {"resourceType": "Patient", "id": self.pid, **patient}, -1e9, -2))
        reason = "Relapsed B-cell acute lymphoblastic leukaemia: CD19 CAR-T cell therapy" if c.pediatric and c.product == "cart" \
            else "CAR-T cell therapy"
        enc: dict[str, Any] = {
            "resourceType": "Encounter", "id": self.eid,
            "status": "finished",
            "class": coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "IMP", "inpatient encounter"),
            "type": [concept(text="Cellular therapy admission")],
            "subject": {"reference": self.patient_ref},
            "period": {"start": self.at(-30), "end": self.at(self.stop + (0 if c.death is not None else 2))},
            "reasonCode": [concept(text=reason)],
        }
        if c.death is not None:
            enc["hospitalization"] = {"dischargeDisposition": concept(
                coding("http://terminology.hl7.org/CodeSystem/discharge-disposition", "exp", "Expired"))}
        self.entries.append(_Entry("Encounter", enc, -1e9, -1))
        self.obs(-20, WEIGHT, {"valueQuantity": qty(c.weight, "kg")})
        height = 75 + 6.5 * c.age if c.age < 16 else self.r(155, 182)
        self.obs(-20, HEIGHT, {"valueQuantity": qty(round(height), "cm")})

    def _infusion(self) -> None:
        c = self.c
        text = {"cart": "CD19 CAR-T cell infusion", "axicel": "CAR-T cell infusion (Yescarta)",
                "tisacel": "CAR-T cell infusion (Kymriah)"}[c.product]
        self.proc(0, "cart", end=0.5, text=text)
        self.med(0, c.product, end=0.5, text=f"{DRUGS[c.product][1]} 1 bag IV over 30 min")
        # premedication before the cells (no steroid: it would blunt the CAR-T expansion)
        mg = round(15 * c.weight) if c.pediatric else 650
        self.med(-0.5, "paracetamol", dose=(min(mg, 650), "mg"), route=PO, text=f"paracetamol {min(mg, 650)} mg PO premedication")

    # vital signs ---------------------------------------------------------------------------
    def _vital_times(self) -> list[float]:
        times: list[float] = []
        h = self.begin
        stop = self.stop
        settled = self.settled()
        while h <= stop:
            times.append(h)
            if self.unstable(h):
                h += 2
            elif h < settled:
                h += 4
            else:
                h += 8  # back on the ward, stable
        return times

    def settled(self) -> float:
        """From here the child is stable on the ward: vitals every 8 h, labs every other day."""
        c = self.c
        last = max([c.resolution() or 0.0] + [n.h for n in c.neuro] + [c.onset or 0.0])
        return max(168.0, last + 48)

    def _temp_value(self, h: float) -> float | None:
        c = self.c
        if c.onset is None:
            return self.r(36.3, 37.6, 1)
        if h < c.onset:
            return self.r(36.3, 37.5 if h < 0 else 37.7, 1)
        if self.febrile_window(h):
            # between fevers: febrile with the occasional dip after paracetamol (real curves saw-tooth)
            if self.rng.random() < 0.3:
                return self.r(37.4, 37.9, 1)
            return self.r(38.1, max(38.2, c.tmax - 0.1), 1)
        if c.defervescence is not None and h < c.defervescence:
            return None  # nothing charted between the last fever and the defervescence reading
        return self.r(36.3, 37.6, 1)

    def _sbp_value(self, h: float) -> float:
        c = self.c
        thr = c.sbp_threshold
        lo, hi = self.norms()["sbp"]
        if c.refractory and c.refractory[0] <= h <= c.refractory[1]:
            return self.r(thr - 16, thr - 3)
        if self.pressor_running(h):
            return self.r(thr + 6, thr + 20)
        if self.febrile_window(h):
            return self.r(max(lo - 6, thr + 6), hi - 4)
        return self.r(lo, hi)

    def temp(self, h: float, value: float) -> None:
        self.obs(h, TEMP[self.c.temp_site], {"valueQuantity": qty(value, "Cel")})

    def bp(self, h: float, sbp: float) -> None:
        dbp = round(sbp * self.rng.uniform(0.52, 0.64))
        self.obs(h, BP_PANEL, components=[
            {"code": SBP, "valueQuantity": qty(sbp, "mm[Hg]", "mmHg")},
            {"code": DBP, "valueQuantity": qty(dbp, "mm[Hg]", "mmHg")},
        ])

    def hr(self, h: float, temp: float | None) -> None:
        lo, hi = self.norms()["hr"]
        extra = 0.0
        if temp is not None and temp > 37.5:
            extra += (temp - 37.0) * 10
        if self.pressor_running(h) or (self.c.refractory and self.c.refractory[0] <= h):
            extra += 25
        v = min(round(self.rng.uniform(lo, hi) + extra), 215)
        self.obs(h, HR, {"valueQuantity": qty(v, "/min", "beats/minute")})

    def spo2_value(self, h: float) -> float:
        if self.ventilated(h) or self.o2_at(h):
            return self.r(92, 98)
        return self.r(95, 100)

    def _vitals(self) -> None:
        c = self.c
        designed_temps: dict[float, float] = {}
        if c.onset is not None:
            designed_temps[c.onset] = self.r(38.3, min(39.2, c.tmax), 1)
            if c.last_fever is not None and c.last_fever > c.onset:
                designed_temps[c.last_fever] = self.r(38.1, 38.6, 1)
            peak_h = c.onset + min(8.0, (c.last_fever or c.onset) - c.onset) / 2 if c.last_fever else c.onset
            if c.last_fever and c.onset < peak_h < c.last_fever:
                designed_temps[round(peak_h, 2)] = c.tmax
            if c.defervescence is not None:
                designed_temps[c.defervescence] = self.r(37.0, 37.7, 1)
        designed_bp = [h for h, _ in c.hypotension] + [h + 0.25 for h, _ in c.hypotension]
        designed_spo2 = [h for h, _ in c.hypoxia]
        for h, v in designed_temps.items():
            self.temp(h, v)
            self.hr(h, v)
        for h, sbp in c.hypotension:
            self.bp(h, sbp)
            self.bp(h + 0.25, sbp - self.r(0, 4))
        for h, v in c.hypoxia:
            self.obs(h, SPO2, {"valueQuantity": qty(v, "%")})

        for g in self._vital_times():
            h = g + self.rng.choice((0, 0, 2, 3, 5, 7, 9)) / 60
            if h > self.stop:
                continue
            temp: float | None = None
            if not any(abs(h - t) < 1.5 for t in designed_temps):
                temp = self._temp_value(h)
                if temp is not None:
                    self.temp(h, temp)
            if not any(abs(h - t) < 0.75 for t in designed_bp):
                self.bp(h, self._sbp_value(h))
            self.hr(h, temp)
            lo, hi = self.norms()["rr"]
            rr = round(self.rng.uniform(lo, hi) + (6 if self.o2_at(h) else 0))
            self.obs(h, RR, {"valueQuantity": qty(rr, "/min", "breaths/minute")})
            if not any(abs(h - t) < 0.5 for t in designed_spo2):
                self.obs(h, SPO2, {"valueQuantity": qty(self.spo2_value(h), "%")})
        if c.refractory:
            k = math.floor(c.refractory[0]) + 1
            while k < min(c.refractory[1], self.stop):
                if k % 2:
                    self.bp(k + 0.05, self._sbp_value(k))
                k += 1
        # an ICU titrates a new vasopressor on hourly BP (and HR) for its first 12 h
        for p in c.pressors:
            k = math.floor(p.start) + 1
            while k < min(p.end, p.start + 12, self.stop):
                if k % 2 and not any(abs(k - t) < 0.75 for t in designed_bp):
                    self.bp(k + 0.05, self._sbp_value(k))
                    self.hr(k + 0.05, None)
                k += 1

    # oxygen --------------------------------------------------------------------------------
    def _o2_row(self, h: float, device: str, flow: float | None, fio2: float | None) -> None:
        snomed, display, text = DEVICES[device]
        value = concept(coding(SNOMED, snomed, display), text=text) if snomed else concept(text=text)
        self.obs(h, O2_DEVICE, {"valueCodeableConcept": value})
        if flow is not None:
            self.obs(h, O2_FLOW, {"valueQuantity": qty(flow, "L/min")})
        if fio2 is not None:
            self.obs(h, FIO2, {"valueQuantity": qty(fio2, "%")})

    def _oxygen(self) -> None:
        c = self.c
        segs: list[tuple[float, float, str, float | None, float | None]] = [
            (o.start, o.end, o.device, o.flow, o.fio2) for o in c.oxygen]
        v = c.ventilation
        if v is not None:
            segs.append((v[0], v[1], "vent", None, c.peaks.get("vent_fio2", 60.0)))
        segs.sort()
        for i, (start, end, device, flow, fio2) in enumerate(segs):
            step = 2.0 if device == "hfnc" else 4.0
            h = start
            while h < min(end, self.stop):
                f = fio2
                if device == "vent" and h > start:
                    f = max(30.0, round((fio2 or 60) - 5 * (h - start) / 12 + self.rng.uniform(-5, 5)))
                self._o2_row(h, device, flow, f)
                h += step
            nxt = segs[i + 1][0] if i + 1 < len(segs) else None
            if end < self.stop and (nxt is None or nxt > end + 0.01):
                self._o2_row(end, "ra", None, None)

    # labs ----------------------------------------------------------------------------------
    def _lab_times(self) -> list[float]:
        """06:00 local every day from the day before infusion (the morning blood draw)."""
        c = self.c
        local0 = c.infusion.astimezone(c.tz)
        first = local0.replace(hour=6, minute=0, second=0, microsecond=0) - timedelta(days=1)
        if first > local0 - timedelta(hours=6):
            first -= timedelta(days=1)
        out = []
        t = first
        while True:
            h = (t - local0).total_seconds() / 3600
            if h > self.stop:
                break
            out.append(h)
            t += timedelta(days=1)
        return out

    def lab(self, h: float, key: str, value: float, rr: tuple[float | None, float | None] | None) -> None:
        code, display, unit, text = LABS[key]
        self.obs(h, loinc(code, display, text), {"valueQuantity": qty(value, unit)}, category="laboratory",
                 issued=h + self.rng.choice((1.0, 1.5, 2.0, 3.0)), ref_range=(rr[0], rr[1], unit) if rr else None)

    def _curve(self, h: float, peak_h: float, width: float) -> float:
        return math.exp(-(((h - peak_h) / width) ** 2))

    def _labs(self) -> None:
        c = self.c
        times = self._lab_times()
        onset = c.onset if c.onset is not None else 1e9
        peak_h = c.peak_at if c.peak_at is not None else onset + 24
        pk = {k: v for k, v in c.peaks.items()}
        # the draws nearest the designed peaks carry the designed peak values exactly
        post = [t for t in times if t >= 0]
        peak_draw = min(post, key=lambda t: abs(t - peak_h)) if post and c.onset is not None else None
        liver_h = c.liver_at if c.liver_at is not None else peak_h + 24
        liver_draw = min(post, key=lambda t: abs(t - liver_h)) if post else None
        child = c.pediatric
        creat_uln = 0.6 if c.age < 10 else 0.9 if c.age < 18 else 1.2
        creat_base = round(creat_uln * self.rng.uniform(0.5, 0.75), 2)
        il6_every = {d for d in range(-1, 8)} | {10, 14, 21}
        settled = self.settled()
        for h in times:
            day = math.floor((h + 18) / 24)
            if h > settled and day % 2:
                continue
            # ANC after lymphodepletion: nadir in the first week, recovery from day 10-14
            anc = 0.6 * math.exp(-max(day + 1, 0) / 2) + (0.05 if day < 9 else min(1.8, 0.15 * (day - 8)))
            anc = round(max(0.0, anc * self.rng.uniform(0.7, 1.3)), 2)
            self.lab(h, "wbc", round(max(0.1, anc / 0.55 + self.rng.uniform(0.1, 0.6)), 1), (4.0, 12.0))
            self.lab(h, "anc", anc, (1.5, 7.5))
            self.lab(h, "plt", round(self.rng.uniform(18, 70)), (150, 400))
            # inflammation
            s = self._curve(h, peak_h, 40) if c.onset is not None else 0.0
            crp_base = self.r(2, 8, 1)
            crp = crp_base + (pk.get("crp", 30) - crp_base) * s
            ferr_base = pk.get("ferritin_base", 600)
            ferr = ferr_base + (pk.get("ferritin", 1500) - ferr_base) * self._curve(h, peak_h + 24, 60)
            if h == peak_draw:
                crp = pk.get("crp", crp)
            elif h == min(post, key=lambda t: abs(t - (peak_h + 24))) if post else False:
                ferr = pk.get("ferritin", ferr)
            else:
                crp *= self.rng.uniform(0.8, 0.97)
                ferr *= self.rng.uniform(0.8, 0.97)
            self.lab(h, "crp", round(crp, 1), (None, 8))
            self.lab(h, "ferritin", round(ferr), (10, 150 if child else 300))
            if day % 2 == 0 or (c.onset is not None and onset - 24 <= h <= onset + 120):
                fib_drop = pk.get("fibrinogen_drop", 0.2) * s
                self.lab(h, "fibrinogen", round(self.rng.uniform(220, 330) * (1 - fib_drop)), (200, 400))
            # liver and kidney
            ls = self._curve(h, liver_h, 50)
            for key, base_lo, base_hi, uln in (("alt", 12, 30, 40), ("ast", 18, 38, 50)):
                base = self.rng.uniform(base_lo, base_hi)
                v = base + (pk.get(key, base_hi) - base) * ls
                v = pk.get(key, v) if h == liver_draw else min(v * self.rng.uniform(0.82, 0.97), pk.get(key, v))
                self.lab(h, key, round(v), (None, uln))
            bili_base = self.rng.uniform(0.3, 0.7)
            bili = bili_base + (pk.get("bili", 0.7) - bili_base) * ls
            bili = pk.get("bili", bili) if h == liver_draw else min(bili * self.rng.uniform(0.85, 0.97), pk.get("bili", bili))
            self.lab(h, "bili", round(max(bili, 0.2), 1), (0.2, 1.0))
            creat = creat_base + (pk.get("creat", creat_base) - creat_base) * self._curve(h, liver_h, 40)
            self.lab(h, "creat", round(creat, 2), (None, creat_uln))
            # cytokines: a baseline and daily in the first week, then days 10, 14, 21
            if day in il6_every:
                for key, base in (("il6", self.r(2, 12, 1)), ("ifng", self.r(1, 9, 1))):
                    if key not in pk or c.onset is None:
                        v = base
                    elif h == peak_draw:
                        v = pk[key]
                    else:
                        width = 30 if key == "ifng" else 40
                        v = base + (pk[key] - base) * self._curve(h, peak_h - (6 if key == "ifng" else 0), width)
                        v = min(v * self.rng.uniform(0.7, 0.95), pk[key] * 0.95)
                    self.lab(h, key, round(v, 1), (None, 7.0 if key == "il6" else 15.6))
        # blood cultures at the first fever (no growth: the fever is CRS, not bacteraemia)
        if c.onset is not None:
            self.obs(c.onset + 0.3, BLOOD_CULTURE, {"valueCodeableConcept": concept(
                coding(SNOMED, "264868006", "No growth"), text="No growth at 5 days")},
                category="laboratory", issued=c.onset + 120)

    # neuro ---------------------------------------------------------------------------------
    def sedated(self, h: float) -> bool:
        v = self.c.ventilation
        return v is not None and v[0] - 0.5 <= h <= v[1] + 4

    def neuro_row(self, h: float, score: int | None, loc: str, note: str | None = None) -> None:
        if score is not None:
            code = ICE if self.c.age >= 12 else CAPD
            self.obs(h, code, {"valueInteger": score}, category="survey", note=note)
        self.obs(h, LOC, {"valueCodeableConcept": concept(text=loc)}, category="survey")

    def _neuro(self) -> None:
        c = self.c
        normal = 10 if c.age >= 12 else c.neuro_baseline
        if c.age < 12:
            self.neuro_row(-12, c.neuro_baseline, "Alert", note="Baseline CAPD before infusion")
        else:
            self.neuro_row(-12, 10, "Alert", note="Baseline ICE before infusion")
        designed = sorted(c.neuro, key=lambda n: n.h)
        window = (designed[0].h - 6, designed[-1].h) if designed else None
        for n in designed:
            self.neuro_row(n.h, n.score, n.loc)
        if c.seizure is not None:
            h, secs = c.seizure
            self.obs(h, SEIZURE, {"valueCodeableConcept": concept(
                coding(SNOMED, "54200006", "Generalized tonic-clonic seizure"), text="Generalized tonic-clonic seizure")},
                category="exam", end=h + secs / 3600, note=f"Generalised tonic-clonic seizure, {secs // 60} min, midazolam given")
        g = 12.0
        while g <= self.stop:
            h = g + self.rng.choice((0, 5, 10, 15)) / 60
            inside = window is not None and window[0] <= h <= window[1] + 0.01
            near = any(abs(n.h - h) < 6 for n in designed)
            if not inside and not near and not self.sedated(h) and h <= self.stop:
                score = normal if c.age >= 12 else self.rng.randint(0, normal) if normal else 0
                self.neuro_row(h, score, "Alert")
            g += 12

    # treatment -----------------------------------------------------------------------------
    def _treatment(self) -> None:
        c = self.c
        w = c.weight
        kid = c.pediatric
        if c.onset is not None:
            # paracetamol for fever >= 38.5 until anti-IL-6 therapy
            stop = min([c.last_fever or c.onset, *c.tocilizumab])
            h = c.onset + 0.5
            while h <= stop + 0.01:
                mg = min(round(15 * w), 1000)
                self.med(h, "paracetamol", dose=(mg, "mg"), route=PO, text=f"paracetamol {mg} mg PO for fever")
                h += 6
            # empirical antibiotics for neutropenic fever, q8h for 7 days
            severe = expected_crs(c) >= 3
            drug = "meropenem" if severe else "cefepime"
            mg = min(round((20 if severe else 50) * w), 1000 if severe else 2000)
            h = c.onset + 1
            while h < min(c.onset + 7 * 24, self.stop):
                self.med(h, drug, end=h + 0.5, dose=(mg, "mg"), text=f"{drug} {mg} mg IV q8h (febrile neutropenia)")
                h += 8
        for h in c.tocilizumab:
            per_kg = 12 if kid and w < 30 else 8
            mg = min(round(per_kg * w), 800)
            self.med(h, "tocilizumab", end=h + 1, dose=(mg, "mg"),
                     text=f"tocilizumab {mg} mg ({per_kg} mg/kg) IV over 60 min")
        for drug, h0, mg_kg, count, every in c.steroids:
            cap = 10.0 if drug == "dexamethasone" else 1000.0
            mg = min(round(mg_kg * w, 1), cap)
            for k in range(count):
                h = h0 + k * every
                if h < self.stop:
                    self.med(h, drug, end=h + 0.5 if drug == "methylprednisolone" else None, dose=(mg, "mg"),
                             text=f"{drug} {mg:g} mg IV ({mg_kg:g} mg/kg) q{every:g}h")
        for h, ml_kg in c.boluses:
            ml = round(ml_kg * w) if kid else 1000
            self.med(h, "ns", end=h + 0.33, dose=(ml, "mL"),
                     text=f"0.9% NaCl bolus {ml} mL ({ml_kg:g} mL/kg) IV over 20 min for hypotension")
        for p in c.pressors:
            bounds = [s for s, _ in p.rates[1:]] + [p.end]
            for (start, rate), stop in zip(p.rates, bounds, strict=True):
                if start >= self.stop:
                    break
                unit_text = {"ug/kg/min": "mcg/kg/min", "ug/min": "mcg/min", "U/min": "units/min"}[p.unit]
                self.med(start, p.drug, end=min(stop, self.stop), rate=(rate, p.unit, unit_text),
                         text=f"{p.drug} continuous infusion {rate:g} {unit_text}, titrate to SBP")
        if c.ventilation is not None:
            start, end = c.ventilation
            h = start
            while h < min(end, self.stop):
                seg_end = min(h + 24, end, self.stop)
                self.med(h, "midazolam", end=seg_end, rate=(0.1, "mg/kg/h", "mg/kg/hr"),
                         text="midazolam continuous infusion 0.1 mg/kg/h (sedation on the ventilator)")
                h = seg_end
        if c.seizure is not None:
            h = c.seizure[0] + 0.5
            mg = round(20 * w)
            for k in range(6):
                self.med(h + 12 * k, "levetiracetam", end=h + 12 * k + 0.25, dose=(mg, "mg"),
                         text=f"levetiracetam {mg} mg IV q12h")

    def _procedures(self) -> None:
        c = self.c
        if c.icu is not None:
            self.proc(c.icu, "icu", point=True, text=f"Admission to {c.site}")
        if c.intubation is not None:
            start, stop, why = c.intubation
            end = stop if stop is not None else self.stop
            self.proc(start, "intubation", reason=why, point=True)
            self.proc(start, "imv", end=end, reason=why)
            if stop is not None:
                self.proc(stop, "extubation", point=True)
        for kind, start, end in c.purification:
            text = "Continuous veno-venous haemodiafiltration (CRRT)" if kind == "crrt" else "Therapeutic plasma exchange"
            reason = "fluid overload and acute kidney injury in severe CRS" if kind == "crrt" else "severe CRS refractory to tocilizumab"
            self.proc(start, kind, end=min(end, self.stop), text=text, reason=reason)

    def _death(self) -> None:
        c = self.c
        if c.death is None:
            return
        patient = self.entries[0].body
        patient["deceasedDateTime"] = self.at(c.death)
        patient["active"] = False
        self.obs(c.death, CAUSE_OF_DEATH, {"valueString": c.death_text}, category="exam", issued=c.death + 2)

    def _bundle(self) -> dict[str, Any]:
        order = {"Patient": 0, "Encounter": 1}
        items = sorted(self.entries, key=lambda e: (order.get(e.rtype, 2), e.h, e.seq))
        entries = []
        for e in items:
            rid = e.body["id"]
            entries.append({"fullUrl": f"{BASE_URL}/{e.rtype}/{rid}", "resource": e.body,
                            "request": {"method": "PUT", "url": f"{e.rtype}/{rid}"}})
        return {"resourceType": "Bundle", "type": "transaction", "timestamp": self.at(self.stop + 3), "entry": entries}


def build_bundle(course: Course, seed: int | str = DEFAULT_SEED, id_prefix: str = "picu") -> tuple[dict[str, Any], str]:
    """(transaction Bundle, "Patient/<id>") for one designed course."""
    chart = Chart(course, seed, id_prefix)
    return chart.build(), chart.patient_ref


def dumps_bundle(bundle: dict[str, Any]) -> str:
    """Compact JSON, one Bundle entry per line (small files, readable diffs)."""
    head = {k: v for k, v in bundle.items() if k != "entry"}
    lines = [json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in bundle.get("entry", [])]
    start = json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1]
    return start + ',"entry":[\n' + ",\n".join(lines) + "\n]}\n"


# ---------------------------------------------------------------------------------------------
# The 14-child PICU cohort of the seed study
# ---------------------------------------------------------------------------------------------

_CRS_DEATH = ("Refractory distributive shock and multiple organ dysfunction due to cytokine release syndrome "
              "(ASTCT grade 4); blood cultures negative; no alternative cause identified.")


def picu_courses(seed: int = DEFAULT_SEED) -> list[Course]:
    """The 14 designed courses. The seed varies infusion dates (Jan 2019 - Jun 2020, the study's
    enrolment period) and times; the clinical design is fixed."""
    rng = random.Random(f"fhir-crs/picu-dates/{seed}")
    start = datetime(2019, 1, 7, tzinfo=CHINA)
    days = sorted(rng.sample(range(0, 530), 14))
    order = list(range(14))
    rng.shuffle(order)
    when = [start + timedelta(days=days[i], hours=rng.choice((9, 10, 11, 14, 15)), minutes=rng.choice((0, 10, 20, 30, 40)))
            for i in order]

    def C(i: int, **kw: Any) -> Course:
        return Course(key=f"picu-{i:02d}", infusion=when[i - 1], **kw)

    courses = [
        C(1, summary="Grade 1 CRS (fever only, tocilizumab for persistent fever); ICANS 1 (CAPD)",
          age=4, months=2, sex="female", weight=16.0, onset=14, last_fever=44, tmax=39.8, defervescence=46,
          tocilizumab=[40], icu=30, neuro_baseline=2,
          neuro=[Neuro(108, 7), Neuro(120, 5), Neuro(132, 2)],
          peaks={"il6": 180.0, "ifng": 140.0, "crp": 68.0, "ferritin": 1450, "alt": 62, "ast": 70}, peak_at=40),
        C(2, summary="Grade 1 CRS (fever only); no ICANS (ICE)",
          age=14, months=7, sex="male", weight=48.0, onset=9, last_fever=34, tmax=40.1, defervescence=36,
          tocilizumab=[30], icu=26,
          peaks={"il6": 95.0, "ifng": 60.0, "crp": 54.0, "ferritin": 980, "alt": 48, "ast": 52}, peak_at=30),
        C(3, summary="Grade 2 CRS: fluid-responsive hypotension (two boluses); no ICANS",
          age=7, months=4, sex="male", weight=23.0, onset=20, last_fever=52, tmax=39.6, defervescence=54,
          hypotension=[(38, 78), (46, 80)], boluses=[(38.33, 20), (46.33, 10)], tocilizumab=[39], icu=38.5,
          neuro_baseline=1,
          peaks={"il6": 420.0, "ifng": 210.0, "crp": 96.0, "ferritin": 2300, "alt": 85, "ast": 96}, peak_at=44),
        C(4, summary="Grade 2 CRS: hypotension treated with a bolus; ICANS 3 (CAPD 10) on dexamethasone",
          age=10, months=1, sex="female", weight=30.0, onset=16, last_fever=40, tmax=39.9, defervescence=43,
          hypotension=[(30, 82)], boluses=[(30.3, 20)], tocilizumab=[28], icu=30.5, neuro_baseline=1,
          neuro=[Neuro(96, 6, "Awakens spontaneously"), Neuro(104, 10, "Awakens to voice"),
                 Neuro(116, 7, "Awakens spontaneously"), Neuro(128, 3), Neuro(140, 1)],
          steroids=[("dexamethasone", 105, 0.15, 8, 6)],
          peaks={"il6": 650.0, "ifng": 310.0, "crp": 118.0, "ferritin": 3100, "alt": 104, "ast": 120}, peak_at=36),
        C(5, summary="Grade 2 CRS: low-flow nasal cannula 2 L/min; ICANS 2 (ICE 5)",
          age=16, months=3, sex="female", weight=55.0, onset=22, last_fever=50, tmax=39.5, defervescence=52,
          hypoxia=[(43.9, 89)], oxygen=[Oxygen(44, 70, "nc", 2.0)], tocilizumab=[45], icu=44,
          neuro=[Neuro(84, 8), Neuro(96, 5), Neuro(108, 7), Neuro(120, 9), Neuro(132, 10)],
          peaks={"il6": 1100.0, "ifng": 180.0, "crp": 88.0, "ferritin": 2100, "alt": 78, "ast": 88}, peak_at=48),
        C(6, summary="Grade 3 CRS: dopamine after a fluid bolus; ICANS 1 (CAPD)",
          age=6, months=9, sex="male", weight=20.0, onset=12, last_fever=46, tmax=40.2, defervescence=48,
          hypotension=[(33, 74)], boluses=[(33.3, 20)],
          pressors=[Pressor("dopamine", [(34.5, 5), (36, 8), (40, 10), (52, 6), (60, 3)], 66)],
          tocilizumab=[30, 38], icu=33.5, neuro_baseline=1,
          neuro=[Neuro(72, 5), Neuro(84, 3), Neuro(96, 1)],
          peaks={"il6": 720.0, "ifng": 620.0, "crp": 142.0, "ferritin": 5200, "alt": 95, "ast": 110}, peak_at=38),
        C(7, summary="Grade 3 CRS: norepinephrine + nasal cannula; ICANS 2 (ICE 4); grade 3 transaminitis",
          age=12, months=5, sex="female", weight=40.0, onset=18, last_fever=38, tmax=40.0, defervescence=40,
          hypotension=[(29, 80)], boluses=[(29.3, 20)],
          pressors=[Pressor("norepinephrine", [(31.5, 0.05), (33, 0.1), (36, 0.15), (48, 0.08), (56, 0.04)], 60)],
          hypoxia=[(33.9, 90)], oxygen=[Oxygen(34, 64, "nc", 3.0)], tocilizumab=[26, 34], icu=29.5,
          neuro=[Neuro(60, 7), Neuro(72, 4), Neuro(84, 6), Neuro(96, 9), Neuro(108, 10)],
          peaks={"il6": 2200.0, "ifng": 900.0, "crp": 176.0, "ferritin": 8800, "alt": 210, "ast": 235, "bili": 1.3},
          peak_at=32, liver_at=72),
        C(8, summary="Grade 3 CRS: high-flow nasal cannula FiO2 45 % and a fluid bolus; no ICANS",
          age=3, months=6, sex="male", weight=14.0, onset=10, last_fever=36, tmax=39.9, defervescence=38,
          hypotension=[(26, 70)], boluses=[(26.3, 20)],
          hypoxia=[(23.9, 88)], oxygen=[Oxygen(24, 60, "hfnc", 28.0, 45.0), Oxygen(60, 76, "nc", 1.0)],
          tocilizumab=[22], icu=24, neuro_baseline=3,
          peaks={"il6": 980.0, "ifng": 240.0, "crp": 131.0, "ferritin": 4100, "alt": 60, "ast": 84}, peak_at=30),
        C(9, summary="Grade 4 CRS: norepinephrine + epinephrine; ICANS 3 (seizure); methylprednisolone",
          age=9, months=2, sex="female", weight=28.0, onset=8, last_fever=34, tmax=40.4, defervescence=36,
          hypotension=[(22, 80), (23, 76)], boluses=[(22.3, 20)],
          pressors=[Pressor("norepinephrine", [(23.5, 0.1), (25, 0.2), (28, 0.3), (40, 0.2), (50, 0.1), (58, 0.05)], 66),
                    Pressor("epinephrine", [(27, 0.1), (30, 0.15), (40, 0.05)], 46)],
          tocilizumab=[20, 28], steroids=[("methylprednisolone", 28, 1.0, 6, 12)], icu=22.5, neuro_baseline=0,
          neuro=[Neuro(72, 4), Neuro(81, 8, "Awakens to voice"), Neuro(92, 5), Neuro(104, 2), Neuro(116, 0)],
          seizure=(80, 120),
          peaks={"il6": 4200.0, "ifng": 1800.0, "crp": 214.0, "ferritin": 14500, "alt": 180, "ast": 260, "bili": 1.4,
                 "fibrinogen_drop": 0.45},
          peak_at=28, liver_at=60),
        C(10, summary="Grade 4 CRS: intubated for ARDS, norepinephrine, CRRT, methylprednisolone; ICANS 2 (ICE 4); survived",
          age=15, months=8, sex="male", weight=52.0, onset=6, last_fever=30, tmax=40.6, defervescence=32,
          hypotension=[(18, 82)], boluses=[(18.3, 20)],
          pressors=[Pressor("norepinephrine", [(19, 0.05), (21, 0.1), (30, 0.2), (60, 0.1), (80, 0.05)], 90)],
          hypoxia=[(19.9, 90), (29.9, 85)],
          oxygen=[Oxygen(20, 26, "nc", 4.0), Oxygen(26, 30, "hfnc", 40.0, 50.0), Oxygen(126, 150, "hfnc", 30.0, 35.0),
                  Oxygen(150, 170, "nc", 2.0)],
          intubation=(30, 126, "Acute hypoxaemic respiratory failure (ARDS) in severe CRS"),
          purification=[("crrt", 40, 110)], tocilizumab=[16, 24], steroids=[("methylprednisolone", 24, 1.0, 10, 12)],
          icu=18.5, neuro=[Neuro(22, 5), Neuro(28, 4), Neuro(132, 9), Neuro(144, 10)],
          peaks={"il6": 6800.0, "ifng": 2600.0, "crp": 248.0, "ferritin": 22000, "alt": 380, "ast": 520, "bili": 2.1,
                 "creat": 1.9, "fibrinogen_drop": 0.5, "vent_fio2": 70.0},
          peak_at=24, liver_at=72),
        C(11, summary="Grade 4 CRS: intubated, epinephrine, plasma exchange, methylprednisolone; ICANS 3 (CAPD 12) after extubation; survived",
          age=5, months=11, sex="female", weight=18.0, onset=16, last_fever=36, tmax=40.3, defervescence=38,
          hypotension=[(26, 72), (27, 70)], boluses=[(26.3, 20)],
          pressors=[Pressor("epinephrine", [(27.5, 0.05), (29, 0.1), (48, 0.08), (60, 0.04)], 70)],
          hypoxia=[(29.9, 88), (33.9, 86)],
          oxygen=[Oxygen(30, 34, "hfnc", 36.0, 50.0), Oxygen(110, 130, "hfnc", 20.0, 40.0), Oxygen(130, 150, "nc", 1.0)],
          intubation=(34, 110, "Hypoxaemic respiratory failure with pulmonary oedema (capillary leak) in severe CRS"),
          purification=[("tpe", 40, 43)], tocilizumab=[24, 32], steroids=[("methylprednisolone", 30, 1.0, 8, 12)],
          icu=26.5, neuro_baseline=2,
          neuro=[Neuro(120, 12, "Awakens to voice"), Neuro(132, 10, "Awakens spontaneously"), Neuro(144, 6),
                 Neuro(156, 3), Neuro(168, 2)],
          peaks={"il6": 3900.0, "ifng": 2100.0, "crp": 196.0, "ferritin": 16800, "alt": 150, "ast": 190, "bili": 1.2,
                 "creat": 0.7, "fibrinogen_drop": 0.4, "vent_fio2": 65.0},
          peak_at=30, liver_at=60),
        C(12, summary="Death (grade 5 candidate) day 4: two vasopressors, intubated, CRRT, pulse methylprednisolone; ICANS 4 (unarousable)",
          age=11, months=3, sex="male", weight=35.0, onset=4, last_fever=28, tmax=41.0, defervescence=30,
          hypotension=[(14, 78)], boluses=[(14.3, 20)],
          pressors=[Pressor("norepinephrine", [(15, 0.1), (18, 0.3), (24, 0.5), (60, 0.8)], 100),
                    Pressor("epinephrine", [(20, 0.1), (30, 0.3), (70, 0.5)], 100)],
          hypoxia=[(21.9, 89), (23.9, 84)], oxygen=[Oxygen(22, 24, "nc", 6.0)],
          intubation=(24, None, "Acute hypoxaemic respiratory failure; depressed consciousness"),
          purification=[("crrt", 36, 100)], tocilizumab=[12, 20], steroids=[("methylprednisolone", 20, 15.0, 3, 24)],
          icu=14.5, neuro_baseline=0, neuro=[Neuro(16, 8, "Awakens to voice"), Neuro(22, None, "Unarousable")],
          refractory=(84, 100), death=100, death_text=_CRS_DEATH,
          peaks={"il6": 18500.0, "ifng": 6200.0, "crp": 286.0, "ferritin": 68000, "alt": 900, "ast": 1350, "bili": 3.2,
                 "creat": 2.4, "fibrinogen_drop": 0.7, "vent_fio2": 90.0},
          peak_at=36, liver_at=72),
        C(13, summary="Death (grade 5 candidate) day 3: epinephrine + norepinephrine, intubated, CRRT; no ICANS before sedation",
          age=2, months=8, sex="female", weight=12.0, onset=6, last_fever=32, tmax=40.5, defervescence=34,
          hypotension=[(16, 66), (17, 64)], boluses=[(16.3, 20)],
          pressors=[Pressor("epinephrine", [(17.5, 0.05), (24, 0.2), (40, 0.4)], 76),
                    Pressor("norepinephrine", [(22, 0.1), (40, 0.3), (60, 0.6)], 76)],
          hypoxia=[(19.9, 87), (25.9, 82)], oxygen=[Oxygen(20, 26, "hfnc", 24.0, 60.0)],
          intubation=(26, None, "Hypoxaemic respiratory failure (ARDS) in severe CRS"),
          purification=[("crrt", 30, 76)], tocilizumab=[14, 22], steroids=[("methylprednisolone", 22, 2.0, 4, 12)],
          icu=16.5, neuro_baseline=4, refractory=(60, 76), death=76,
          death_text=("Cytokine release syndrome with refractory shock, ARDS and acute kidney injury on CRRT; "
                      "no alternative cause identified."),
          peaks={"il6": 12000.0, "ifng": 4800.0, "crp": 242.0, "ferritin": 41000, "alt": 320, "ast": 480, "bili": 1.8,
                 "creat": 1.4, "fibrinogen_drop": 0.6, "vent_fio2": 85.0},
          peak_at=30, liver_at=54),
        C(14, summary="Death (grade 5 candidate) day 8: norepinephrine, epinephrine, vasopressin, intubated, CRRT; ICANS 2 (ICE 4)",
          age=17, months=1, sex="male", weight=58.0, onset=12, last_fever=60, tmax=40.8, defervescence=62,
          hypotension=[(28, 84)], boluses=[(28.3, 20)],
          pressors=[Pressor("norepinephrine", [(29, 0.05), (32, 0.15), (40, 0.3), (120, 0.5), (180, 0.8)], 210),
                    Pressor("epinephrine", [(36, 0.1), (60, 0.05), (160, 0.2)], 210),
                    Pressor("vasopressin", [(190, 0.03)], 210, unit="U/min")],
          hypoxia=[(39.9, 88), (47.9, 85)], oxygen=[Oxygen(40, 48, "hfnc", 40.0, 45.0)],
          intubation=(48, None, "ARDS with hypoxaemic respiratory failure"),
          purification=[("crrt", 72, 210)], tocilizumab=[24, 32],
          steroids=[("methylprednisolone", 30, 1.0, 4, 12), ("dexamethasone", 40, 0.15, 6, 6)],
          icu=28.5, neuro=[Neuro(38, 6), Neuro(44, 4)],
          refractory=(190, 210), death=210,
          death_text=("Multiple organ failure secondary to grade 4 cytokine release syndrome with refractory "
                      "vasoplegia; cultures negative; no alternative cause identified."),
          peaks={"il6": 5400.0, "ifng": 1900.0, "crp": 265.0, "ferritin": 36000, "alt": 260, "ast": 410, "bili": 2.4,
                 "creat": 2.2, "fibrinogen_drop": 0.55, "vent_fio2": 75.0},
          peak_at=40, liver_at=96),
    ]
    for c in courses:
        # PICU/ward record until 10 days after infusion, or a day after the child settled
        c.end = 240.0
        c.end = max(240.0, Chart(c, seed, "picu").settled() + 24)
        c.temp_site = "axillary" if c.age < 12 else "body"
    return courses


def generate_picu_cohort(seed: int = DEFAULT_SEED) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(14 transaction Bundles, ground truth) of the seed study's PICU cohort."""
    from .report import ROW_LABELS, spearman

    bundles: list[dict[str, Any]] = []
    truth_patients: list[dict[str, Any]] = []
    for c in picu_courses(seed):
        bundle, ref = build_bundle(c, seed, "picu")
        bundles.append(bundle)
        truth = expected_for(c, ref)
        truth["file"] = f"{c.key}.json"
        truth_patients.append(truth)
    truth = {
        "source": SEED_STUDY,
        "note": ("Synthetic: 14 designed PICU courses, no patient data. Expected values are computed from the "
                 "design (fhir_crs/synthetic.py), not by the grader; grading the Bundles must reproduce them."),
        "seed": seed,
        "system": "astct",
        "paper": dict(PAPER_COUNTS),
        "patients": truth_patients,
        "report": _truth_report(truth_patients, ROW_LABELS, spearman),
    }
    return bundles, truth


def _truth_report(patients: list[dict[str, Any]], labels: dict[str, str], spearman: Any) -> dict[str, Any]:
    members: dict[str, list[str]] = {k: [] for k in labels}
    for p in patients:
        f, ref = p["facts"], p["patient"]
        grade = p["crs_astct"]["grade"]
        checks = {
            "crs_any": grade >= 1, "crs_severe": grade >= 3,
            "haemodynamic_instability": f["haemodynamic_instability"], "mechanical_ventilation": f["mechanical_ventilation"],
            "neurological": p["icans_astct"]["grade"] > 0, "liver_injury": f["liver_injury_grade"] >= 2,
            "tocilizumab": f["tocilizumab"] > 0, "corticosteroids": f["corticosteroids"],
            "blood_purification": f["blood_purification"], "deaths": f["died"], "recovered_14d": p["recovered_14d"],
        }
        for k, v in checks.items():
            if v:
                members[k].append(ref)
    n = len(patients)
    rows = {k: {"n": len(v), "pct": round(100 * len(v) / n, 1) if n else 0.0, "patients": sorted(v)} for k, v in members.items()}
    grades = [p["crs_astct"]["grade"] for p in patients]
    corr = {}
    for key, fact in (("il6", "peak_il6"), ("ifng", "peak_ifn_gamma")):
        pairs = [(g, p["facts"][fact]) for g, p in zip(grades, patients, strict=True) if p["facts"][fact] is not None]
        corr[key] = spearman([a for a, _ in pairs], [b for _, b in pairs])
    return {"patients": n, "system": "astct", "rows": rows, "correlation": corr}


def write_cohort(out_dir: Path | str, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write `<out_dir>/picu/picu-NN.json` (14 Bundles) and `<out_dir>/ground_truth.json`."""
    out = Path(out_dir)
    (out / "picu").mkdir(parents=True, exist_ok=True)
    bundles, truth = generate_picu_cohort(seed)
    written = []
    for bundle, p in zip(bundles, truth["patients"], strict=True):
        path = out / "picu" / p["file"]
        path.write_text(dumps_bundle(bundle), encoding="utf-8")
        written.append(path)
    gt = out / "ground_truth.json"
    gt.write_text(json.dumps(truth, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(gt)
    return written


# ---------------------------------------------------------------------------------------------
# Benchmark cohort: N random mixed adult/paediatric courses
# ---------------------------------------------------------------------------------------------

_WEIGHT_BY_AGE = [10, 12, 14, 16, 18, 20, 23, 25, 28, 30, 35, 38, 42, 47, 52, 55, 58, 60]


def _random_course(rng: random.Random, i: int, pediatric: bool, base: datetime) -> Course:
    """A random but internally consistent course; its expected grades come from `expected_for`."""
    age = rng.randrange(1, 18) if pediatric else rng.randrange(19, 79)
    weight = float(_WEIGHT_BY_AGE[age] + rng.randrange(-2, 4)) if pediatric else float(rng.randrange(50, 105))
    tz = timezone(timedelta(hours=rng.choice((-5, 0, 1, 8))))
    infusion = (base + timedelta(days=rng.randrange(0, 700), hours=rng.choice((8, 9, 10, 13, 14)))).replace(tzinfo=tz)
    sev = rng.choices(["none", "g1", "g2h", "g2o", "g3p", "g3o", "g4pp", "g4v", "death"],
                      [18, 30, 12, 8, 10, 6, 6, 5, 5])[0]
    c = Course(key=f"bench-{i:05d}", summary=sev, age=age, months=rng.randrange(0, 12), sex=rng.choice(("female", "male")),
               weight=weight, infusion=infusion, onset=None, end=240.0, tz=tz, site="ICU",
               product="cart" if pediatric else rng.choice(("axicel", "tisacel")),
               temp_site="axillary" if pediatric and rng.random() < 0.6 else "body")
    kid_rates = pediatric
    c.neuro_baseline = rng.randrange(0, 3) if age < 12 else 0
    if sev == "none":
        c.peaks = {"il6": round(rng.uniform(3, 40), 1), "ifng": round(rng.uniform(2, 20), 1)}
    else:
        onset = float(rng.randrange(4, 72))
        dur = float(rng.randrange(12, 60))
        c.onset, c.last_fever = onset, onset + dur
        c.defervescence = c.last_fever + 2
        c.tmax = round(rng.uniform(38.6, 40.8), 1)
        toci = onset + rng.randrange(4, 20)
        c.tocilizumab = [min(toci, c.last_fever)] if sev != "g1" or rng.random() < 0.5 else []
        t = onset + rng.randrange(4, 16)
        thr = c.sbp_threshold
        if sev in ("g2h", "g3p", "g4pp", "g4v", "death"):
            c.hypotension = [(t, int(thr - rng.randrange(4, 14)))]
            c.boluses = [(t + 0.3, 20.0 if pediatric else 1000 / weight)]
        if sev in ("g3p", "g4pp", "g4v", "death"):
            end = t + rng.randrange(12, 48)
            if kid_rates:
                c.pressors = [Pressor("norepinephrine", [(t + 1, 0.05), (t + 3, 0.1), (t + 8, 0.05)], end)]
            else:
                c.pressors = [Pressor("norepinephrine", [(t + 1, 5.0), (t + 3, 12.0), (t + 8, 6.0)], end, unit="ug/min")]
        if sev in ("g4pp", "death"):
            p = c.pressors[0]
            rates = [(t + 4, 0.05), (t + 6, 0.1)] if kid_rates else [(t + 4, 2.0), (t + 6, 5.0)]
            c.pressors.append(Pressor("epinephrine", rates, p.end - 2, unit="ug/kg/min" if kid_rates else "ug/min"))
        if sev in ("g2o", "g3o", "g4v", "death"):
            o_start = t + 2
            if sev == "g2o":
                c.hypoxia = [(o_start - 0.1, 90)]
                c.oxygen = [Oxygen(o_start, o_start + rng.randrange(8, 30), "nc", float(rng.randrange(1, 5)))]
            else:
                c.hypoxia = [(o_start - 0.1, 88)]
                c.oxygen = [Oxygen(o_start, o_start + 6, "hfnc", 40.0 if not pediatric else 2.0 * weight, 50.0)]
                if sev == "g3o":
                    c.oxygen[0].end = o_start + rng.randrange(10, 30)
            if sev in ("g4v", "death"):
                v0 = o_start + 6
                stop = None if sev == "death" else v0 + rng.randrange(24, 96)
                c.intubation = (v0, stop, "Acute hypoxaemic respiratory failure in CRS")
                if stop is not None:
                    c.oxygen.append(Oxygen(stop, stop + 12, "nc", 2.0))
        if sev in ("g4pp", "g4v", "death"):
            c.steroids = [("dexamethasone", t + 2, 0.15 if pediatric else 0.2, 4, 6)]
        if sev == "death":
            c.death = min(max(p.end for p in c.pressors) if c.pressors else onset + 72, 230.0)
            for p in c.pressors:
                p.end = c.death
            c.refractory = (c.death - 8, c.death)
            c.death_text = _CRS_DEATH
            c.purification = [("crrt", t + 12, c.death)] if rng.random() < 0.6 else []
        g = expected_crs(c)
        c.peaks = {"il6": round(rng.uniform(20, 200) * 3 ** g, 1), "ifng": round(rng.uniform(10, 80) * 2.5 ** g, 1),
                   "crp": round(rng.uniform(30, 90) + 35 * g, 1), "ferritin": round(rng.uniform(500, 1500) * 1.8 ** g)}
        c.peak_at = c.tocilizumab[0] if c.tocilizumab else onset + 24
        if g >= 3 and rng.random() < 0.5:
            c.peaks.update({"alt": round(rng.uniform(130, 400)), "ast": round(rng.uniform(160, 500))})
        resolution = c.resolution()
        if resolution is not None:
            c.end = max(c.end, resolution + 48)
    if rng.random() < 0.3 and c.death is None:
        # ICANS after CRS (or without it): a short course of abnormal scores, then normal
        h0 = (c.resolution() or 48.0) + rng.randrange(12, 48)
        if age >= 12:
            scores = [rng.choice((8, 6, 4, 2)), rng.choice((7, 9)), 10]
        else:
            scores = [rng.choice((4, 6, 10, 12)) + c.neuro_baseline, c.neuro_baseline + 1, c.neuro_baseline]
        c.neuro = [Neuro(h0 + 12 * k, s) for k, s in enumerate(scores)]
        c.end = max(c.end, h0 + 72)
    return c


def iter_cohort(n: int, seed: int = 1, pediatric_fraction: float = 0.3) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(Bundle, expected) for N random courses; streams, nothing is kept in memory."""
    rng = random.Random(f"fhir-crs/cohort/{seed}")
    base = datetime(2023, 1, 2)
    n_kids = round(n * pediatric_fraction)
    kids = set(rng.sample(range(n), n_kids)) if n else set()
    for i in range(n):
        course = _random_course(rng, i, i in kids, base)
        bundle, ref = build_bundle(course, seed, "bench")
        yield bundle, expected_for(course, ref)


def generate_cohort(n: int, seed: int = 1, pediatric_fraction: float = 0.3) -> Iterator[dict[str, Any]]:
    """N transaction Bundles (one patient each), mixed adult/paediatric, for benchmarks."""
    for bundle, _ in iter_cohort(n, seed, pediatric_fraction):
        yield bundle


def _main(argv: list[str] | None = None) -> int:
    """`python -m fhir_crs.synthetic [OUT_DIR] [--seed N] [--check]`: (re)write or verify the PICU cohort."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m fhir_crs.synthetic", description=_main.__doc__)
    ap.add_argument("out_dir", nargs="?", default="fixtures/cohort")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--check", action="store_true", help="exit 1 if OUT_DIR differs from a fresh generation")
    args = ap.parse_args(argv)
    if not args.check:
        for p in write_cohort(args.out_dir, args.seed):
            print(p)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_cohort(tmp, args.seed)
        stale = [p.relative_to(tmp) for p in fresh
                 if not (Path(args.out_dir) / p.relative_to(tmp)).is_file()
                 or (Path(args.out_dir) / p.relative_to(tmp)).read_bytes() != p.read_bytes()]
    for p in stale:
        print(f"stale: {Path(args.out_dir) / p}")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(_main())
