"""Retraction of a written case whose CAR-T infusion no longer exists (issue 13, "Deletions
count as changes").

The sync's state store remembers, for every case it wrote, the patient, the infusion start (day
0), the identifiers of what was written and the references of the infusion records (`CaseRecord`).
When a later grading of that patient no longer finds the case (its infusion was hard-deleted,
marked entered-in-error, or moved to another time), `retract_case` finds the written Conditions
and summary Bundle by identifier and replaces them, in ONE transaction with a Provenance, by their
retracted form (writeback/retract.py). Idempotent: what is already retracted is not written
again, and when nothing is left on the server there is nothing to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .pipeline import WRITTEN_TYPES, WriteOutcome, find_written, location_ref, send_transaction
from .settings import GradingSettings


@dataclass(frozen=True, slots=True)
class CaseRecord:
    """A case the sync wrote: what is needed to find it again and to say what vanished."""

    patient: str  # Patient id
    infusion: str  # the infusion start (ISO instant), the case's key
    identifiers: dict[str, dict[str, str]]  # "crs" / "icans" / "summary" -> {"system", "value"}
    infusion_refs: tuple[str, ...] = ()  # "Type/id" of the infusion records (MedicationAdministration, Procedure)


def retract_case(client: Any, record: CaseRecord, settings: GradingSettings, mappings_dir: Path,
                 fates: dict[str, str], dry_run: bool = False, attempts: int = 3,
                 before_write: Callable[[], None] | None = None) -> WriteOutcome:
    """Retract what was written for `record` (see module doc). `fates`: infusion reference ->
    what became of it (for the note). Status of the outcome: "retracted", "unchanged" (already
    retracted), "absent" (nothing written for it on the server), "dry-run"."""
    from . import __version__
    from .conventions import current_conventions
    from .errors import FhirServerError
    from .writeback import CaseWrite, provenance, stored_grade
    from .writeback.retract import (
        bundle_is_retracted,
        is_entered_in_error,
        retracted_bundle,
        retracted_condition,
        retraction_note,
        retraction_transaction,
    )

    patient = f"Patient/{record.patient}"
    last_error: Exception | None = None
    for _ in range(attempts):
        existing, stored = find_written(client, {n: record.identifiers[n] for n in WRITTEN_TYPES if n in record.identifiers})
        if not stored:
            return WriteOutcome(patient, record.infusion, "absent", {})
        refs = {n: f"{WRITTEN_TYPES[n]}/{existing[n][0]}" for n in stored}
        recorded = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        note = retraction_note(record.infusion, fates, recorded, __version__)
        new: dict[str, dict[str, Any]] = {}
        for name, res in stored.items():
            if name == "summary":
                if not bundle_is_retracted(res):
                    new[name] = retracted_bundle(res, note, recorded)
            elif not is_entered_in_error(res):
                new[name] = retracted_condition(res, note, recorded)
        if not new:
            return WriteOutcome(patient, record.infusion, "unchanged", refs)
        write = CaseWrite(record.identifiers, conventions=current_conventions(settings, mappings_dir), recorded=recorded)
        prov = provenance(write, [refs[n] for n in new], "NULLIFY")
        gone = list(fates) or ["the CAR-T infusion"]
        prov["entity"] = [{"role": "source", "what": {"display": f"{ref} (no longer found as this case's CAR-T infusion)"}}
                          for ref in gone]
        tx = retraction_transaction(new, {n: existing[n] for n in new}, prov)
        changes = [{"resource": refs[n], "kind": n, "action": "retract",
                    "old_grade": stored_grade(stored[n]) if n != "summary" else None, "new_grade": None,
                    "request": f"PUT {refs[n]}"} for n in new]
        changes.append({"resource": "Provenance", "kind": "provenance", "action": "create",
                        "old_grade": None, "new_grade": None, "request": "POST Provenance"})
        if dry_run:
            return WriteOutcome(patient, record.infusion, "dry-run", {n: f"PUT {refs[n]}" for n in new}, tx, changes)
        response, conflict = send_transaction(client, tx, before_write)
        if response is None:
            last_error = conflict
            continue
        written = {n: refs[n] for n in new}
        entries = response.get("entry") or []
        if len(entries) > len(new):
            written["provenance"] = location_ref(entries[len(new)])
        return WriteOutcome(patient, record.infusion, "retracted", written, changes=changes)
    raise FhirServerError(f"could not retract {patient} (infusion {record.infusion}) after {attempts} version conflicts: {last_error}")
