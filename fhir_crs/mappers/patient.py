"""Patient JSON -> `PatientInfo` (birth date for age at infusion; deceased date for grade 5)."""

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
        if w is not None:
            deceased = w.time
    elif res.get("deceasedBoolean") is True:
        deceased_flag = True
    return PatientInfo(ref=ref, birth_date=birth_date, deceased=deceased, deceased_flag=deceased_flag)
