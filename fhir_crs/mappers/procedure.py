"""Procedure JSON -> `ProcedureDone`, or a `Skipped` reason.

performed[x] may be a dateTime, a Period, or (unusable for a timeline) a string/Age/Range.
GECCO-style Procedures carry the device in `usedCode`; it refines a generic O2-therapy code.
"""

from __future__ import annotations

from typing import Any

from ..events import ProcedureDone, Skipped
from ..mapping_files import CodeMap
from .common import codings, label, parse_datetime, texts
from .reasons import classify, reason_references
from .status import status_decision

_DEVICE_TO_KIND = {
    "nasal_cannula": "nasal_cannula", "high_flow_nasal_cannula": "high_flow_nasal_cannula",
    "face_mask": "face_mask", "non_rebreather": "non_rebreather", "venturi_mask": "venturi_mask",
    "cpap": "cpap", "bipap": "bipap", "noninvasive_ventilation": "noninvasive_ventilation",
    "invasive_ventilation": "invasive_ventilation", "blow_by": "nasal_cannula",
}


class ProcedureMapper:
    def __init__(self, code_map: CodeMap):
        self.code_map = code_map

    def map(self, res: dict[str, Any], ref: str, flags: set[str]) -> ProcedureDone | Skipped:
        why, flag, code = status_decision(res)
        if why:
            return Skipped(ref, why, code)
        if flag:
            flags.add(flag)
        kind, by_text = self.code_map.procedures.match(codings(res.get("code")), texts(res.get("code")))
        for used in res.get("usedCode") or []:
            dev, _ = self.code_map.devices.match(codings(used), texts(used))
            if dev in _DEVICE_TO_KIND and kind in (None, "nasal_cannula", "face_mask"):
                kind, by_text = _DEVICE_TO_KIND[dev], by_text
        if kind is None:
            return Skipped(ref, f"code not in mappings/procedures.toml: {label(res.get('code'))}", "unmapped_code")
        if "performedDateTime" in res:
            start_w, end_w = parse_datetime(res["performedDateTime"]), None
        elif isinstance(res.get("performedPeriod"), dict):
            p = res["performedPeriod"]
            start_w, end_w = parse_datetime(p.get("start")), parse_datetime(p.get("end"))
        elif any(k.startswith("performed") for k in res):
            key = next(k for k in res if k.startswith("performed"))
            return Skipped(ref, f"{key} is not a date/time (cannot place it on the timeline)", "no_time")
        else:
            return Skipped(ref, "no performed[x]", "no_time")
        if start_w is None:
            return Skipped(ref, "performed time missing or unreadable", "no_time")
        if start_w.precision != "time":
            return Skipped(ref, f"performed time has {start_w.precision} precision only", "imprecise_time")
        if start_w.tz_assumed:
            flags.add("timezone_assumed")
        end = end_w.time if end_w else None
        if end is not None and end < start_w.time:
            return Skipped(ref, "performedPeriod ends before it starts", "bad_period")
        reason_parts: list[str] = []
        reason_codes: list[tuple[str, str]] = []
        for rc in res.get("reasonCode") or []:
            reason_codes.extend(codings(rc))
            reason_parts.extend(texts(rc) or [c for _, c in codings(rc)])
        contained_codes, reference_words, reason_refs = reason_references(res)
        reason_codes += contained_codes
        reason_parts += reference_words
        for n in res.get("note") or []:
            if isinstance(n, dict) and isinstance(n.get("text"), str):
                reason_parts.append(n["text"])
        # coded indication first, then text (negation-aware, flagged): mappings/reasons.toml
        indications, indication_by_text = classify(self.code_map.reasons, reason_codes, reason_parts)
        return ProcedureDone(
            kind=kind, start=start_w.time, end=end, ref=ref, reason="; ".join(reason_parts),
            text=label(res.get("code")), matched_by_text=by_text,
            indications=indications, indication_by_text=indication_by_text, reason_refs=tuple(reason_refs),
        )
