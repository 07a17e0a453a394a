"""Stage 1: FHIR R4 resources (dicts) -> typed events grouped by patient, plus named skips.

`ResourceMapper.add(source)` dispatches on resourceType; `finish()` resolves what had to wait
for the whole input (MedicationAdministrations that reference a Medication defined elsewhere).
Every resource ends up either as events or as a `Skipped(resource, reason)`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..events import MappingResult, Skipped
from ..mapping_files import CodeMap
from ..sources import SourceResource
from .common import SAFE_ID, reference_target, split_reference
from .condition import ConditionMapper
from .medication import MedicationMapper
from .observation import ObservationMapper
from .patient import map_patient
from .procedure import ProcedureMapper

__all__ = ["ResourceMapper"]

_SUBJECT_FIELDS = {
    "Observation": ("subject",),
    "MedicationAdministration": ("subject",),
    "Procedure": ("subject",),
    "Condition": ("subject",),
}


def resource_ref(src: SourceResource) -> str:
    """`Type/id` for a resource: its id, else the id in its fullUrl (urn:uuid or URL)."""
    r = src.resource
    rtype = r["resourceType"]
    rid = r.get("id")
    if isinstance(rid, str) and SAFE_ID.match(rid):
        return f"{rtype}/{rid}"
    if src.full_url:
        tail = src.full_url.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
        if SAFE_ID.match(tail):
            return f"{rtype}/{tail}"
    digest = hashlib.sha1(src.origin.encode()).hexdigest()[:16]
    return f"{rtype}/anon-{digest}"


class ResourceMapper:
    def __init__(self, code_map: CodeMap, result: Any = None):
        """`result` receives the events and skips (a `MappingResult` unless given, e.g. the
        spilling store of the flat-memory path)."""
        self.code_map = code_map
        self.obs = ObservationMapper(code_map)
        self.meds = MedicationMapper(code_map)
        self.procs = ProcedureMapper(code_map)
        self.conditions = ConditionMapper(code_map)
        self.result = MappingResult() if result is None else result
        self.medications: dict[str, dict[str, Any]] = {}
        self._deferred: list[tuple[SourceResource, str, str]] = []
        self.count = 0
        self.mapped = 0

    def skip(self, where: str, reason: str, code: str = "other") -> None:
        self.result.skipped.append(Skipped(where, reason, code))

    def _patient_of(self, src: SourceResource, ref: str) -> str | None:
        r = src.resource
        for f in _SUBJECT_FIELDS.get(r["resourceType"], ("subject", "patient")):
            target = reference_target(r.get(f))
            if target is None:
                continue
            if target.startswith("#"):
                return None
            if target.startswith("urn:") and src.bundle_urls and target in src.bundle_urls:
                t, i = src.bundle_urls[target]
                return f"{t}/{i}" if t == "Patient" else None
            if target.startswith("urn:uuid:"):
                tail = target.rsplit(":", 1)[-1]
                return f"Patient/{tail}" if SAFE_ID.match(tail) else None
            parts = split_reference(target)
            if parts and parts[0] == "Patient":
                return f"Patient/{parts[1]}"
            return None
        return None

    def add(self, item: SourceResource | Skipped) -> None:
        if isinstance(item, Skipped):
            self.result.skipped.append(item)
            return
        self.count += 1
        mapped_before, skipped_before = self.mapped, len(self.result.skipped)
        try:
            self._add(item)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            # Structurally invalid FHIR (a list where a string belongs, …): a named skip, never a crash.
            self.mapped = mapped_before
            del self.result.skipped[skipped_before:]
            self.skip(resource_ref(item) if isinstance(item.resource.get("resourceType"), str) else item.origin,
                      f"malformed resource ({type(exc).__name__}: {str(exc)[:120]})", "malformed")

    def _add(self, src: SourceResource) -> None:
        r = src.resource
        rtype = r["resourceType"]
        ref = resource_ref(src)
        if rtype == "Medication":
            self.mapped += 1  # consumed by the MedicationAdministrations that reference it
            self.medications[ref] = r
            if src.full_url:
                self.medications[src.full_url] = r
            return
        if rtype == "Patient":
            flags = self.result.flags.setdefault(ref, set())
            self.result.add(ref, map_patient(r, ref, flags))
            self.mapped += 1
            return
        if rtype not in ("Observation", "MedicationAdministration", "Procedure", "Condition"):
            self.skip(ref, f"resource type {rtype} is not used for grading", "unused_type")
            return
        patient = self._patient_of(src, ref)
        if patient is None:
            subj = reference_target(r.get("subject")) or "(none)"
            self.skip(ref, f"subject {subj} is not a resolvable Patient reference", "unresolved_reference")
            return
        flags = self.result.flags.setdefault(patient, set())
        if rtype == "Observation":
            out = self.obs.map(r, ref, flags)
            if isinstance(out, Skipped):
                self.result.skipped.append(out)
            else:
                self.mapped += 1
                for e in out:
                    self.result.add(patient, e)
        elif rtype == "Procedure" or rtype == "Condition":
            p = (self.procs if rtype == "Procedure" else self.conditions).map(r, ref, flags)
            if isinstance(p, Skipped):
                self.result.skipped.append(p)
            else:
                self.mapped += 1
                self.result.add(patient, p)
        else:
            target = reference_target(r.get("medicationReference"))
            if target and not target.startswith("#") and self._resolve(src, target) is None:
                self._deferred.append((src, ref, patient))
                return
            self._map_med(src, ref, patient)

    def _resolve(self, src: SourceResource, target: str) -> dict[str, Any] | None:
        if target.startswith("#"):
            for c in src.resource.get("contained") or []:
                if isinstance(c, dict) and c.get("id") == target[1:] and c.get("resourceType") == "Medication":
                    return c
            return None
        if target in self.medications:
            return self.medications[target]
        parts = split_reference(target)
        if parts:
            return self.medications.get(f"{parts[0]}/{parts[1]}")
        return None

    def _map_med(self, src: SourceResource, ref: str, patient: str) -> None:
        flags = self.result.flags.setdefault(patient, set())
        try:
            out = self.meds.map(src.resource, ref, flags, lambda t: self._resolve(src, t))
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            out = Skipped(ref, f"malformed resource ({type(exc).__name__}: {str(exc)[:120]})", "malformed")
        if isinstance(out, Skipped):
            self.result.skipped.append(out)
        else:
            self.mapped += 1
            self.result.add(patient, out)

    def missing_medications(self) -> list[str]:
        """Medication references still unresolved (e.g. Bulk Patient-level exports omit
        Medication, which is outside the Patient compartment): the caller may read them."""
        out = []
        for src, _, _ in self._deferred:
            target = reference_target(src.resource.get("medicationReference"))
            if target and self._resolve(src, target) is None:
                parts = split_reference(target)
                if parts and parts[0] == "Medication" and f"Medication/{parts[1]}" not in out:
                    out.append(f"Medication/{parts[1]}")
        return out

    def finish(self) -> MappingResult:
        for src, ref, patient in self._deferred:
            self._map_med(src, ref, patient)
        self._deferred.clear()
        return self.result
