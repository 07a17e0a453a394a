"""Stage 2 of the flow (FHIR JSON -> mappers -> **events** -> timeline -> grading -> write-back).

The typed vocabulary the mappers produce and the timeline/graders consume. Everything is a
small slots dataclass, hashable by value and never changed once made (the events are not
`frozen=True` only because a frozen dataclass's __init__ costs 2-4x more, and the mappers build
one per resource); times are timezone-aware UTC datetimes; every event keeps the reference
(`Type/id`) of the resource it came from so that grades can cite their evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timezone


def iso(t: datetime | None, tz: timezone | None = None) -> str | None:
    """An event time as FHIR dateTime text in UTC (`Z`), to the second; None stays None."""
    if t is None:
        return None
    t = t.astimezone(tz or UTC)
    s = t.isoformat(timespec="seconds")
    return s.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Skipped:
    """A resource (or file/line) that could not be used, and why.

    `reason` is the human text (it may name codes, values, files); `code` is a stable, short
    machine key that summaries group by (one of `SKIP_CODES`; "other" when none fits).
    """

    resource: str
    reason: str
    code: str = "other"


SKIP_CODES: dict[str, str] = {
    # input level (sources.py)
    "empty_file": "empty file",
    "binary_file": "binary content, not JSON text",
    "bad_gzip": "gzip data corrupt or truncated",
    "not_utf8": "text not in UTF-8",
    "invalid_json": "not valid JSON",
    "not_a_resource": "JSON value or Bundle entry is not a FHIR resource",
    "bundle_outcome": "search.mode=outcome Bundle entry (server OperationOutcome)",
    "no_resource": "Bundle entry without a resource (or resource null)",
    "unreadable_number": "a number no double can hold (1e309, NaN, Infinity): the resource is unreadable",
    # resource level (mappers)
    "unused_type": "resource type not used for grading",
    "malformed": "structurally malformed resource",
    "status": "status excludes the resource (entered-in-error, cancelled, …)",
    "unmapped_code": "code not in the site mapping tables",
    "unmapped_value": "coded value not in the site mapping tables",
    "unresolved_reference": "a reference (subject, medication) cannot be resolved",
    "superseded": "an older version (or copy) of a resource graded in its latest version",
    "no_time": "no usable date/time",
    "impossible_time": "an impossible date/time (month 13, day 32, :60, offset beyond 14:00)",
    "imprecise_time": "date/time too imprecise to place on the timeline",
    "bad_period": "period ends before it starts",
    "no_value": "no usable value",
    "implausible_value": "value outside the plausible range (quarantined)",
    "unit_error": "unit missing, unknown or inconsistent with the value (quarantined)",
    "condition_not_used": "Condition not used for grading",
    "own_output": "a grade fhir-crs wrote, read back: never an input",
    "verification_status": "Condition verificationStatus excludes it",
    # case level (pipeline)
    "no_infusion": "patient without a CAR-T infusion (day 0): not graded",
    "other": "other",
}

# Skips that say nothing about data quality: fhir-crs simply does not read these resources
# (`--strict` does not count them).
NOT_A_DATA_PROBLEM = frozenset({"unused_type", "superseded", "own_output"})  # an older copy is normal in incremental pulls


@dataclass(slots=True, unsafe_hash=True)
class Measurement:
    """A numeric observation converted to the kind's canonical unit.

    kind: temperature (Cel), sbp/dbp/mean_bp (mm[Hg]), sbp_arterial, heart_rate,
    respiratory_rate, spo2 (%), o2_flow (L/min), fio2 (%), weight (kg), labs (il6, crp, ferritin,
    …, anc in /uL), neuro scores (ice_score, capd_score, cartox10_score, rass, gcs_total).
    """

    kind: str
    time: datetime
    value: float
    unit: str
    ref: str
    raw_value: float | None = None
    raw_unit: str | None = None
    uln: float | None = None
    lln: float | None = None
    matched_by_text: bool = False
    date_only: bool = False


@dataclass(slots=True, unsafe_hash=True)
class Finding:
    """A coded/text observation: O2 device, level of consciousness, seizure, oedema, culture …

    `detail` is a normalised value (device class, consciousness level, seizure type, oedema
    extent, culture result); `text` keeps the original wording for the evidence trail.
    """

    kind: str
    time: datetime
    detail: str
    ref: str
    text: str = ""
    end: datetime | None = None
    matched_by_text: bool = False
    indications: frozenset[str] = frozenset()  # O2 device rows: mappings/reasons.toml classes of the text
    indication_by_text: bool = False  # Conditions: `indications` decided by the code's text, not a code


@dataclass(slots=True, unsafe_hash=True)
class DrugGiven:
    """A MedicationAdministration: a point dose or an infusion interval [start, end).

    rate_ug_min / rate_ug_kg_min / rate_u_min are filled when the rate could be derived (and
    weight allows the conversion); volume_ml for fluids; `bolus` for push doses/fluid boluses.
    """

    drug: str
    drug_class: str
    start: datetime
    end: datetime | None
    ref: str
    route: str = ""
    dose_value: float | None = None
    dose_unit: str = ""
    rate_value: float | None = None
    rate_unit: str = ""
    rate_ug_min: float | None = None
    rate_ug_kg_min: float | None = None
    rate_u_min: float | None = None
    volume_ml: float | None = None
    bolus: bool = False
    matched_by_text: bool = False
    notes: tuple[str, ...] = ()
    reason_refs: tuple[str, ...] = ()  # a fluid's `reasonReference` Conditions (timeline: for hypotension, a bolus)


@dataclass(slots=True, unsafe_hash=True)
class ProcedureDone:
    """A Procedure: CAR-T infusion, respiratory support, blood purification, procedure window …"""

    kind: str
    start: datetime
    end: datetime | None
    ref: str
    reason: str = ""
    text: str = ""
    matched_by_text: bool = False
    indications: frozenset[str] = frozenset()  # mappings/reasons.toml classes of reasonCode / text
    indication_by_text: bool = False
    reason_refs: tuple[str, ...] = ()  # `Condition/id` of each reasonReference, resolved per patient (timeline)


@dataclass(slots=True, unsafe_hash=True)
class PatientInfo:
    """Demographics needed for grading (age-based thresholds) and grade 5."""

    ref: str
    birth_date: date | None
    deceased: datetime | None = None
    deceased_flag: bool = False
    mrn: str | None = None  # Patient.identifier of type MR: shown to clinicians, hidden by --deidentify
    name: str | None = None


Event = Measurement | Finding | DrugGiven | ProcedureDone | PatientInfo


@dataclass(slots=True)
class MappingResult:
    """What the mappers produced from a set of resources, grouped by patient reference."""

    events: dict[str, list[Event]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    flags: dict[str, set[str]] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)  # patient -> refs of the resources used

    def add(self, patient: str, event: Event) -> None:
        self.events.setdefault(patient, []).append(event)

    def flag(self, patient: str, name: str) -> None:
        self.flags.setdefault(patient, set()).add(name)
