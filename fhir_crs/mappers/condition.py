"""Condition JSON -> neuro/outcome `Finding`s, or a `Skipped` reason.

Problem lists and encounter diagnoses often carry the ICANS findings (seizure, cerebral oedema,
raised ICP signs, motor weakness, intracranial haemorrhage) and haemophagocytosis as Conditions
rather than Observations. They are matched with the same codes and text as the Observation
kinds in mappings/observations.toml; the onset time places them on the timeline. Any other
Condition is not used for grading (named skip) — unless mappings/reasons.toml classifies it as an
indication (respiratory failure, seizure, hypotension …): then it becomes an `indication` Finding,
so that a Procedure whose `reasonReference` points at it takes its classes (timeline.py), and every
mapped Condition carries its indication classes the same way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ..events import Finding, Skipped
from ..mapping_files import CodeMap
from .common import codings, label, parse_datetime, texts
from .observation import edema_extent, seizure_type
from .reasons import classify
from .status import status_decision

UNDATED = datetime(1900, 1, 1, tzinfo=UTC)
UNCONFIRMED = "unconfirmed diagnosis"  # text prefix of a provisional / differential Condition (graders flag it)
_ICD10 = ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10", "http://www.cms.gov/Medicare/Coding/ICD10")


def icd10_seizure(codes: list[tuple[str, str]]) -> str | None:
    """'status' for ICD-10 G41.x (status epilepticus), 'seizure' for R56.x / G40.x, else None."""
    for system, code in codes:
        if system in _ICD10 or "icd-10" in system.lower():
            c = code.upper().replace(".", "")
            if c.startswith("G41"):
                return "status"
            if c.startswith(("R56", "G40")):
                return "seizure"
    return None


def verification(res: dict[str, Any]) -> str | None:
    """'provisional' / 'differential' / 'unconfirmed' of a Condition's verificationStatus (used,
    flagged for review: clinical safety rule), else None. refuted / entered-in-error are skipped
    by `status_decision`."""
    for _, code in codings(res.get("verificationStatus")):
        if code in ("provisional", "differential", "unconfirmed"):
            return code
    return None  # an indication Condition without a usable time: never on a timeline
CONDITION_KINDS = ("seizure", "cerebral_edema", "icp_sign", "motor_weakness", "intracranial_hemorrhage", "hemophagocytosis")


class ConditionMapper:
    def __init__(self, code_map: CodeMap):
        self.code_map = code_map

    def map(self, res: dict[str, Any], ref: str, flags: set[str]) -> Finding | Skipped:
        code = res.get("code")
        name, by_text = self.code_map.observation_table.match(codings(code), texts(code))
        icd = icd10_seizure(codings(code))
        if name is None and icd is not None:
            name, by_text = "seizure", False  # R56.9 / G40.x / G41.x: a seizure finding, whatever reasons.toml says
        indications, ind_by_text = classify(self.code_map.reasons, codings(code), texts(code))
        if name not in CONDITION_KINDS:
            if not indications:
                return Skipped(ref, f"Condition not used for grading: {label(code)}", "condition_not_used")
            name, by_text = "indication", ind_by_text
        why, _, code = status_decision(res)
        if why:
            return Skipped(ref, why, code)
        when = None
        for key in ("onsetDateTime", "recordedDate"):
            if key in res:
                when = parse_datetime(res[key])
                break
        if when is None and isinstance(res.get("onsetPeriod"), dict):
            when = parse_datetime(res["onsetPeriod"].get("start"))
        text = " ".join(texts(res.get("code")) + [n.get("text", "") for n in res.get("note") or [] if isinstance(n, dict)])
        if name == "indication":  # only a reasonReference target: its classes count whatever its time (or none)
            at = when.time if when is not None and when.precision == "time" else UNDATED
            return Finding(name, at, ",".join(sorted(indications)), ref, text, None, by_text, indications, ind_by_text)
        if when is None:
            return Skipped(ref, "no onset or recorded date/time", "no_time")
        if when.precision != "time":
            return Skipped(ref, f"{name}: onset has {when.precision} precision only", "imprecise_time")
        if when.tz_assumed:
            flags.add("timezone_assumed")
        end = parse_datetime(res.get("abatementDateTime"))
        if name == "seizure":
            # its duration (abatement) is compared with seizure_status_min in grading, only when
            # both ends are times less than 24 h apart (a problem-list abatement date is not one)
            onset_time = "onsetDateTime" in res or isinstance(res.get("onsetPeriod"), dict)
            if end is not None and not (onset_time and end.precision == "time" and timedelta(0) < end.time - when.time < timedelta(hours=24)):
                end = None
            detail = "status" if icd == "status" else seizure_type(text)
            if detail == "absent" and icd is not None:
                detail = "unspecified"  # the code says a seizure
        elif name == "cerebral_edema":
            detail = edema_extent(text)
        else:
            detail = "present"
        if unconfirmed := verification(res):
            flags.add("condition_unconfirmed")
            text = f"{UNCONFIRMED} ({unconfirmed}): {text}"
        return Finding(name, when.time, detail, ref, text, end.time if end else None, by_text, indications, ind_by_text)
