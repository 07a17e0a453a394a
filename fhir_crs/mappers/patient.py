"""Patient JSON -> `PatientInfo` (birth date for age at infusion; deceased date for grade 5;
the MRN and name a clinician reads on the report pages).

A death is never dropped (criteria §1.8): `deceasedBoolean` true, or a `deceasedDateTime` that
cannot be read or gives only a month or year, is a death with no time (`deceased_flag` set,
`deceased` None; the timeline flags it `death_time_unknown`). A date-only `deceasedDateTime` is
kept as the start of that day and flagged `death_time_imprecise`; the timeline places it within
the day (timeline `_place_dated_death`)."""

from __future__ import annotations

from typing import Any

from ..events import PatientInfo
from .common import parse_date, parse_datetime


def map_patient(res: dict[str, Any], ref: str, flags: set[str]) -> PatientInfo:
    birth = parse_date(res.get("birthDate"))
    birth_date = None
    if birth is not None:
        birth_date = birth[0]
        if birth[1] != "day":
            flags.add("birth_date_partial")
    deceased, deceased_flag = None, False
    if "deceasedDateTime" in res:
        w = parse_datetime(res["deceasedDateTime"])
        deceased_flag = True
        if w is not None and w.precision == "time":
            deceased = w.time
        elif w is not None and w.precision == "day":
            deceased = w.time
            flags.add("death_time_imprecise")
    elif res.get("deceasedBoolean") is True:
        deceased_flag = True
    return PatientInfo(ref=ref, birth_date=birth_date, deceased=deceased, deceased_flag=deceased_flag,
                       mrn=patient_mrn(res), name=patient_name(res))


MR_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
_NAME_USE_RANK = {"official": 0, "usual": 1, None: 2}


def _text(v: Any) -> str | None:
    return " ".join(v.split()) if isinstance(v, str) and v.strip() else None


def patient_mrn(res: dict[str, Any]) -> str | None:
    """The value of the first `Patient.identifier` of type MR (v2-0203; a bare code `MR` is accepted),
    preferring `use` usual/official over secondary/old ones."""
    found: list[tuple[int, str]] = []
    for ident in res.get("identifier") or ():
        if not isinstance(ident, dict) or not _text(ident.get("value")):
            continue
        codings = ((ident.get("type") or {}).get("coding") or []) if isinstance(ident.get("type"), dict) else []
        if any(isinstance(c, dict) and c.get("code") == "MR" and c.get("system") in (MR_SYSTEM, None) for c in codings):
            found.append((0 if ident.get("use") in (None, "usual", "official") else 1, _text(ident["value"]) or ""))
    return min(found)[1] if found else None


def patient_name(res: dict[str, Any]) -> str | None:
    """A display name: the official (else usual, else first) HumanName, `text` or "given family"."""
    names = [n for n in res.get("name") or () if isinstance(n, dict) and n.get("use") not in ("old", "anonymous")]
    for n in sorted(names, key=lambda n: _NAME_USE_RANK.get(n.get("use"), 3)):
        if _text(n.get("text")):
            return _text(n["text"])
        parts = [_text(g) for g in n.get("given") or () if isinstance(g, str)] + [_text(n.get("family"))]
        joined = " ".join(p for p in parts if p)
        if joined:
            return joined
    return None
