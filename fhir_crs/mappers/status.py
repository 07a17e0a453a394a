"""Resource status -> use, use-and-flag, or a named skip, for every resource type graded.

Feeds send status with case and space noise (`Entered-In-Error`, `entered-in-error ` from Cerner,
`entered_in_error`): it is normalised (trimmed, case-folded, inner spaces/underscores -> `-`)
before the valid/invalid decision. A status outside the FHIR R4 value set is a named skip —
never silently valid. An absent status (required in R4 but dropped by some feeds) is read as a
recorded value and flagged `status_missing` (used, never silently: skipping it could hide a
finding that raises a grade).

Clinical reading of the codes that are not plainly "happened" / "did not happen":

* Observation `preliminary` is a real measurement (used); `registered` has no result yet (skip);
  `unknown` is used and flagged `status_unknown` for review (hiding it could lower a grade).
* MedicationAdministration `stopped`: the administration ran until it was stopped (FHIR: halted
  before all actions occurred) — the period charted is what was given, so it is used. `on-hold`:
  it ran and was paused — what was given is used, flagged `status_on_hold`. `in-progress` is a
  running infusion. `not-done` and `entered-in-error` were never given (skip).
* Procedure `stopped` / `on-hold`: it was performed until stopped or paused (used; on-hold
  flagged); `preparation` has not started (skip); `not-done`, `entered-in-error` (skip).
* Condition: verificationStatus `refuted` / `entered-in-error` skip; clinicalStatus
  `resolved`/`inactive`/`remission` still happened (a resolved seizure was a seizure) and is used.
* Medication `entered-in-error` is not used (the administrations that reference it cannot
  resolve it and say so).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from .common import codings

USE, FLAG, SKIP = "use", "flag", "skip"

_RULES: dict[str, dict[str, str]] = {
    "Observation": {
        "final": USE, "amended": USE, "corrected": USE, "preliminary": USE, "unknown": FLAG,
        "registered": SKIP, "cancelled": SKIP, "entered-in-error": SKIP,
    },
    "MedicationAdministration": {
        "completed": USE, "in-progress": USE, "stopped": USE, "on-hold": FLAG, "unknown": FLAG,
        "not-done": SKIP, "entered-in-error": SKIP,
    },
    "Procedure": {
        "completed": USE, "in-progress": USE, "stopped": USE, "on-hold": FLAG, "unknown": FLAG,
        "preparation": SKIP, "not-done": SKIP, "entered-in-error": SKIP,
    },
    "Medication": {"active": USE, "inactive": USE, "entered-in-error": SKIP},
}
_CONDITION_VERIFICATION = {
    "confirmed": USE, "provisional": USE, "differential": USE, "unconfirmed": USE,
    "refuted": SKIP, "entered-in-error": SKIP,
}
_CONDITION_CLINICAL = {
    "active": USE, "recurrence": USE, "relapse": USE, "inactive": USE, "remission": USE, "resolved": USE,
}
_SKIP_WHY = {"registered": "no result yet", "preparation": "not started"}
_NOISE = re.compile(r"[\s_]+")


def normalise(code: str) -> str:
    """`' Entered_In Error '` -> `entered-in-error`. Invisible format characters (zero-width
    space, a byte-order mark or soft hyphen pasted into the field) are removed first."""
    visible = "".join(ch for ch in code if unicodedata.category(ch) != "Cf")
    return _NOISE.sub("-", visible.strip().lower())


def _decide(table: dict[str, str], raw: Any, field: str) -> tuple[str | None, str | None]:
    """(skip reason, flag)."""
    if raw is None:
        return None, "status_missing"
    if not isinstance(raw, str):
        return f"{field} is not a code ({type(raw).__name__})", None
    code = normalise(raw)
    rule = table.get(code)
    if rule is None:
        return f"unknown {field} {raw!r} (not in the FHIR R4 value set)", None
    if rule == SKIP:
        why = _SKIP_WHY.get(code)
        return (f"{field} {code}" + (f" ({why})" if why else "")), None
    if rule == FLAG:
        return None, "status_" + code.replace("-", "_")
    return None, None


_DECIDED: dict[tuple[Any, str], tuple[str | None, str | None, str]] = {}  # (resourceType, status text) -> decision
_DECIDED_MAX = 4096  # feeds send a handful of spellings; odd input cannot grow it without bound


def status_decision(res: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """(skip reason, flag, skip code) for a resource's status; reason and flag None when it is used.
    The decision depends only on the type and the status text, so it is kept per spelling."""
    rtype = res.get("resourceType")
    raw = res.get("status")
    if type(raw) is str and rtype != "Condition":
        key = (rtype, raw)
        hit = _DECIDED.get(key)
        if hit is None:
            if len(_DECIDED) >= _DECIDED_MAX:
                _DECIDED.clear()
            hit = _DECIDED[key] = _status_decision(res)
        return hit
    return _status_decision(res)


def _status_decision(res: dict[str, Any]) -> tuple[str | None, str | None, str]:
    rtype = res.get("resourceType")
    if rtype == "Condition":
        for field, table in (("verificationStatus", _CONDITION_VERIFICATION), ("clinicalStatus", _CONDITION_CLINICAL)):
            cc = res.get(field)
            if cc is None:
                continue
            codes = [c for _, c in codings(cc)]
            if not codes:
                continue
            why, _ = _decide(table, codes[0], field)
            if why:
                return why, None, "verification_status" if field == "verificationStatus" else "status"
        return None, None, "status"
    table = _RULES.get(str(rtype))
    if table is None:
        return None, None, "status"
    return (*_decide(table, res.get("status"), "status"), "status")
