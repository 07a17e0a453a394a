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

from datetime import UTC, datetime
from typing import Any

from ..events import Finding, Skipped
from ..mapping_files import CodeMap
from .common import codings, label, parse_datetime, texts
from .observation import edema_extent, seizure_type
from .reasons import classify
from .status import status_decision

UNDATED = datetime(1900, 1, 1, tzinfo=UTC)  # an indication Condition without a usable time: never on a timeline
CONDITION_KINDS = ("seizure", "cerebral_edema", "icp_sign", "motor_weakness", "intracranial_hemorrhage", "hemophagocytosis")


class ConditionMapper:
    def __init__(self, code_map: CodeMap):
        self.code_map = code_map

    def map(self, res: dict[str, Any], ref: str, flags: set[str]) -> Finding | Skipped:
        code = res.get("code")
        name, by_text = self.code_map.observation_table.match(codings(code), texts(code))
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
        if name == "seizure":  # its duration (abatement) is compared with seizure_status_min in grading
            detail = seizure_type(text)
        elif name == "cerebral_edema":
            detail = edema_extent(text)
        else:
            detail = "present"
        return Finding(name, when.time, detail, ref, text, end.time if end else None, by_text, indications, ind_by_text)
