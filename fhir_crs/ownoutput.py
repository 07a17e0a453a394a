"""What fhir-crs itself writes, known again when it is read back.

`pull`, `sync`, a change feed, a Bulk export or a registry's file of everything can hand back the
grade Conditions and summary Bundles an earlier run wrote. They are never input (grading its own
grade would be circular) and never a change of the data: each is one named skip `own_output`.
They are recognised by the code systems only fhir-crs uses, whatever the site's identifier
system: a Condition whose stages are typed in `urn:fhir-crs:CodeSystem:grading-system`, an
Observation or List coded in `urn:fhir-crs:CodeSystem:result`, and a Bundle holding nothing else.
"""

from __future__ import annotations

from typing import Any

GRADING_SYSTEM = "urn:fhir-crs:CodeSystem:grading-system"  # Condition.stage.type (writeback/build.py)
RESULT_SYSTEM = "urn:fhir-crs:CodeSystem:result"  # the summary Bundle's Observations and List


def _coded_in(concept: Any, system: str) -> bool:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return any(isinstance(c, dict) and c.get("system") == system for c in codings or ())


def is_own_output(res: Any) -> bool:
    """A resource fhir-crs wrote (a grade Condition, a summary Bundle or one of its entries)."""
    if not isinstance(res, dict):
        return False
    rtype = res.get("resourceType")
    if rtype == "Condition":
        return any(isinstance(stage, dict) and _coded_in(stage.get("type"), GRADING_SYSTEM) for stage in res.get("stage") or ())
    if rtype in ("Observation", "List"):
        return _coded_in(res.get("code"), RESULT_SYSTEM)
    if rtype == "Bundle":  # a summary Bundle: every entry is fhir-crs's (a Bundle mixing in input is input)
        entries = res.get("entry")
        return isinstance(entries, list) and bool(entries) and all(
            isinstance(e, dict) and isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") != "Bundle"
            and is_own_output(e["resource"]) for e in entries)
    return False


OWN_OUTPUT_REASON = "written by fhir-crs (a grade, read back): its own output, never an input"
