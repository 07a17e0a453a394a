"""Shared helpers for the mappers: FHIR datatypes (CodeableConcept, Quantity, dateTime,
Reference) read from plain dicts, with no validation library in the hot path."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

_DATETIME = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(?P<f>\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@dataclass(frozen=True, slots=True)
class When:
    """A parsed FHIR dateTime/instant: UTC time, and how precise the source was."""

    time: datetime
    precision: str  # "year" | "month" | "day" | "time"
    tz_assumed: bool = False


def parse_datetime(value: Any) -> When | None:
    """Parses a FHIR date/dateTime/instant. Times without an offset are read as UTC (flagged)."""
    if not isinstance(value, str):
        return None
    return _parse_datetime(value)


# The form nearly every feed sends (`2024-08-18T06:00:00+08:00`, `…Z`): read by slicing, without
# the general pattern's groups; anything else (fractions, dates, whitespace, non-ASCII digits)
# goes the general way. Both give the same When for every string the fast form matches.
_FAST_DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:Z|[+-][0-9]{2}:[0-9]{2})")


@lru_cache(maxsize=65536)  # vitals charted together share their timestamp strings
def _parse_datetime(value: str) -> When | None:
    if _FAST_DATETIME.fullmatch(value):
        return _parse_fast(value)
    m = _DATETIME.match(value.strip())
    if not m:
        return None
    try:
        y = int(m["y"])
        if not 1900 <= y <= 2200:
            return None  # implausible for clinical data, and keeps date arithmetic in range
        mo = int(m["m"] or 1)
        d = int(m["d"] or 1)
        if m["H"] is None:
            precision = "day" if m["d"] else ("month" if m["m"] else "year")
            return When(datetime(y, mo, d, tzinfo=UTC), precision)
        frac = float(m["f"]) if m["f"] else 0.0
        dt = datetime(y, mo, d, int(m["H"]), int(m["M"]), int(m["S"] or 0), round(frac * 1e6) % 1000000)
        tz = m["tz"]
        if tz is None:
            return When(dt.replace(tzinfo=UTC), "time", tz_assumed=True)
        if tz == "Z":
            return When(dt.replace(tzinfo=UTC), "time")
        if int(tz[1:3]) > 14 or int(tz[4:6]) > 59 or (int(tz[1:3]) == 14 and tz[4:6] != "00"):
            return None  # FHIR offsets run from -14:00 to +14:00
        sign = 1 if tz[0] == "+" else -1
        offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])) * sign
        return When((dt - offset).replace(tzinfo=UTC), "time")
    except (ValueError, OverflowError):
        return None


def _parse_fast(value: str) -> When | None:
    """`_parse_datetime` of a string `_FAST_DATETIME` matches (the same checks, in the same order)."""
    if not 1900 <= int(value[:4]) <= 2200:
        return None
    try:
        dt = datetime.fromisoformat(value[:19])  # naive; month/day/hour/minute/second range-checked as datetime() does
    except ValueError:
        return None
    if value[19] == "Z":
        return When(dt.replace(tzinfo=UTC), "time")
    hours, minutes = int(value[20:22]), int(value[23:25])
    if hours > 14 or minutes > 59 or (hours == 14 and minutes != 0):
        return None  # FHIR offsets run from -14:00 to +14:00
    offset = timedelta(hours=hours, minutes=minutes)
    return When((dt + offset if value[19] == "-" else dt - offset).replace(tzinfo=UTC), "time")


def datetime_problem(value: Any) -> str:
    """Why `parse_datetime(value)` gave None, for the skip reason (e.g. "month 13")."""
    if not isinstance(value, str):
        return f"not a date/time string ({type(value).__name__})"
    m = _DATETIME.match(value.strip())
    shown = value if len(value) <= 40 else value[:40] + "…"
    if not m:
        return f"{shown!r} is not a FHIR dateTime"
    y, mo, d = int(m["y"]), int(m["m"] or 1), int(m["d"] or 1)
    if not 1900 <= y <= 2200:
        why = f"year {y} outside 1900-2200"
    elif not 1 <= mo <= 12:
        why = f"month {mo}"
    elif not 1 <= d <= 31 or d > (date(y + mo // 12, mo % 12 + 1, 1) - timedelta(days=1)).day:
        why = f"day {d}"
    elif m["H"] is not None and int(m["H"]) > 23:
        why = f"hour {m['H']}"
    elif m["M"] is not None and int(m["M"]) > 59:
        why = f"minute {m['M']}"
    elif m["S"] is not None and int(m["S"]) > 59:
        why = f"second {m['S']} (leap seconds are not valid FHIR)" if m["S"] == "60" else f"second {m['S']}"
    elif m["tz"] and m["tz"] != "Z":
        why = f"UTC offset {m['tz']} (FHIR allows -14:00 to +14:00)"
    else:
        why = "out of range"
    return f"impossible date/time {shown!r}: {why}"


def parse_date(value: Any) -> tuple[date, str] | None:
    w = parse_datetime(value)
    if w is None:
        return None
    return w.time.date(), w.precision


def codings(cc: Any) -> list[tuple[str, str]]:
    """(system, code) pairs of a CodeableConcept (or a single Coding)."""
    if not isinstance(cc, dict):
        return []
    items = cc.get("coding")
    if items is None and "code" in cc:
        items = [cc]
    out = []
    for c in items or []:
        if isinstance(c, dict) and c.get("code") is not None:
            out.append((str(c.get("system") or ""), str(c["code"])))
    return out


def texts(cc: Any) -> list[str]:
    """CodeableConcept.text first, then every coding.display."""
    if not isinstance(cc, dict):
        return []
    out = []
    if isinstance(cc.get("text"), str):
        out.append(cc["text"])
    for c in cc.get("coding") or []:
        if isinstance(c, dict) and isinstance(c.get("display"), str):
            out.append(c["display"])
    if not out and isinstance(cc.get("display"), str):
        out.append(cc["display"])
    return out


def label(cc: Any) -> str:
    """A short human label for messages: text, else first display, else first system|code."""
    t = texts(cc)
    if t:
        return t[0]
    c = codings(cc)
    return f"{c[0][0]}|{c[0][1]}" if c else "(no code)"


def quantity(q: Any) -> tuple[float, str] | None:
    """(value, unit-code-or-unit) of a Quantity, or None."""
    if not isinstance(q, dict):
        return None
    v = q.get("value")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    unit = q.get("code") or q.get("unit") or ""
    return float(v), str(unit)


def quantity_units(q: dict[str, Any]) -> list[str]:
    """Both spellings a Quantity may carry (code first)."""
    return [str(u) for u in (q.get("code"), q.get("unit")) if u]


def reference_target(ref: Any) -> str | None:
    """`Reference.reference` as a string, or None."""
    if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
        return ref["reference"].strip()
    return None


_TYPE_ID = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")


def split_reference(reference: str) -> tuple[str, str] | None:
    """`Patient/123`, `http://x/fhir/Patient/123/_history/2` -> ("Patient", "123")."""
    m = _TYPE_ID.search(reference)
    if not m:
        return None
    return m.group(1), m.group(2)


SAFE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
