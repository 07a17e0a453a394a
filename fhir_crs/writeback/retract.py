"""Stage 5 (pure): retracting a case whose CAR-T infusion no longer exists on the server.

A case is keyed by its day-0 anchor (patient + infusion start, `identifiers`). When the CAR-T
product MedicationAdministration / CAR-T Procedure behind that anchor is hard-deleted, marked
`entered-in-error`, or moved to another time, the case is gone, but what an earlier run wrote for
it (the CRS and ICANS Conditions, the summary Bundle) still claims a grade. The sync retracts it:

* each **Condition** keeps its identifier, id, stages and evidence (the record of what was
  claimed) and becomes `verificationStatus = entered-in-error` with **no** `clinicalStatus`
  (R4 invariant con-5) and no `abatement[x]` (con-4 asks an abated Condition for an inactive /
  resolved / remission clinicalStatus, which con-5 forbids here); a `note` says why, naming the
  source infusion's reference and what became of it;
* the **summary Bundle** is replaced (same id and identifier, still a `collection`, so anything
  that linked to it keeps resolving) by a copy in which every entry is `entered-in-error` (the
  Conditions as above, the result Observations and the timeline List by their `status`), the
  same note on the Observations and the List, and a `meta.tag` `retracted`;
* a **Provenance** (activity `NULLIFY`, v3-DataOperation: "the act is nullified, entered in
  error") targets them in the same transaction; the vanished infusion is named in `entity.what`
  by display only (a reference to a deleted resource is refused by servers that enforce
  referential integrity on write).

Nothing here reads or writes a server (`fhir_crs.retraction` does). Everything is validated
against `fhir.resources.R4B`; a resource that is already retracted is left as it is, so a
retraction repeated after a crash writes nothing.
"""

from __future__ import annotations

import copy
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition

from .build import LOCAL_RESULT, VERIFICATION, _uuid

ENTERED_IN_ERROR = "entered-in-error"
RETRACTED_TAG = {"system": LOCAL_RESULT, "code": "retracted", "display": "retracted by fhir-crs (source infusion gone)"}
_ABATEMENT = ("abatementDateTime", "abatementAge", "abatementPeriod", "abatementRange", "abatementString")


def is_entered_in_error(resource: dict[str, Any]) -> bool:
    """A Condition whose verificationStatus, or another resource whose status, is entered-in-error."""
    if resource.get("resourceType") == "Condition":
        codings = ((resource.get("verificationStatus") or {}).get("coding") or [])
        return any(isinstance(c, dict) and c.get("code") == ENTERED_IN_ERROR for c in codings)
    return resource.get("status") == ENTERED_IN_ERROR


def bundle_is_retracted(bundle: dict[str, Any]) -> bool:
    """Every Condition, Observation and List of the summary Bundle is entered-in-error."""
    inner = [e.get("resource") for e in bundle.get("entry") or [] if isinstance(e, dict)]
    graded = [r for r in inner if isinstance(r, dict) and r.get("resourceType") in ("Condition", "Observation", "List")]
    return bool(graded) and all(is_entered_in_error(r) for r in graded)


def _server_free(resource: dict[str, Any]) -> dict[str, Any]:
    """A copy without what the server manages (meta, its generated narrative)."""
    out = copy.deepcopy(resource)
    out.pop("meta", None)
    out.pop("text", None)
    return out


def _add_note(resource: dict[str, Any], note: str, recorded: str) -> None:
    notes = resource.setdefault("note", [])
    if not any(isinstance(n, dict) and n.get("text") == note for n in notes):
        notes.append({"time": recorded, "text": note})


def retracted_condition(stored: dict[str, Any], note: str, recorded: str) -> dict[str, Any]:
    """`stored` (a Condition fhir-crs wrote) as entered-in-error: con-5 (no clinicalStatus) and
    con-4 (no abatement without one) hold; identifier, id, stages and evidence are kept."""
    cond = _server_free(stored)
    cond.pop("clinicalStatus", None)
    for key in _ABATEMENT:
        cond.pop(key, None)
    cond["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": ENTERED_IN_ERROR, "display": "Entered in Error"}]}
    _add_note(cond, note, recorded)
    Condition.model_validate(cond)
    return cond


def retracted_bundle(stored: dict[str, Any], note: str, recorded: str) -> dict[str, Any]:
    """The summary Bundle with every entry entered-in-error (Conditions as `retracted_condition`)."""
    bundle = _server_free(stored)
    for entry in bundle.get("entry") or []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict):
            continue
        if res.get("resourceType") == "Condition":
            entry["resource"] = retracted_condition(res, note, recorded)
        elif res.get("resourceType") in ("Observation", "List"):
            res["status"] = ENTERED_IN_ERROR
            _add_note(res, note, recorded)
    bundle["timestamp"] = recorded
    bundle["meta"] = {"tag": [dict(RETRACTED_TAG)]}
    Bundle.model_validate(bundle)
    return bundle


def retraction_note(infusion: str, fates: dict[str, str], recorded: str, version: str) -> str:
    """Why the case was retracted: each source infusion reference and what became of it."""
    if fates:
        what = "; ".join(f"{ref} {fate}" for ref, fate in fates.items())
    else:
        what = "(reference not recorded) is no longer found on the server"
    return (f"Retracted by fhir-crs {version} on {recorded}: the CAR-T infusion this case was graded from "
            f"(day 0 = {infusion}): {what}. The case no longer exists; the grade recorded here must not be used.")


def retraction_transaction(resources: dict[str, dict[str, Any]], existing: dict[str, tuple[str, str | None]],
                           provenance: dict[str, Any] | None) -> dict[str, Any]:
    """A transaction: `PUT Type/id` + If-Match (the stored version) for each retracted resource,
    then a POST of the Provenance."""
    entries = []
    for name, res in resources.items():
        rid, etag = existing[name]
        body = dict(res, id=rid)
        request: dict[str, Any] = {"method": "PUT", "url": f"{res['resourceType']}/{rid}"}
        if etag:
            request["ifMatch"] = etag
        entries.append({"fullUrl": _uuid(res["resourceType"], rid, "retract"), "resource": body, "request": request})
    if provenance is not None:
        entries.append({"fullUrl": _uuid("provenance", *sorted(r for r, _ in existing.values()), provenance.get("recorded", "")),
                        "resource": provenance, "request": {"method": "POST", "url": "Provenance"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
