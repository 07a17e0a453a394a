"""Stage 1: FHIR R4 resources (dicts) -> typed events grouped by patient, plus named skips.

`ResourceMapper.add(source)` dispatches on resourceType; `finish()` resolves what had to wait
for the whole input (MedicationAdministrations that reference a Medication defined elsewhere).
Every resource ends up either as events or as a `Skipped(resource, reason)`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..events import Event, MappingResult, Skipped
from ..jsonread import unreadable
from ..mapping_files import CodeMap
from ..ownoutput import OWN_OUTPUT_REASON, is_own_output
from ..sources import SourceResource
from .common import SAFE_ID, datetime_problem, parse_datetime, reference_target, split_reference
from .condition import ConditionMapper
from .medication import MedicationMapper
from .observation import ObservationMapper
from .patient import map_patient
from .procedure import ProcedureMapper
from .status import status_decision

__all__ = ["GRADED_TYPES", "ResourceMapper", "resource_ref", "version_of"]

GRADED_TYPES = frozenset({"Observation", "MedicationAdministration", "Procedure", "Condition", "Patient"})

_GRADED_TYPES = GRADED_TYPES
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


_PATIENT_REFS: dict[str, tuple[str | None, str]] = {}  # subject.reference text -> patient_of's answer
_PATIENT_REFS_MAX = 65_536


_DATETIME_FIELDS = (
    "effectiveDateTime", "effectiveInstant", "effectivePeriod", "performedDateTime", "performedPeriod",
    "onsetDateTime", "onsetPeriod", "abatementDateTime", "recordedDate", "birthDate", "deceasedDateTime",
)


_DATETIME_KEYS: dict[tuple[Any, ...], tuple[str, ...]] = {}  # a resource's keys, in order -> its _DATETIME_FIELDS
_DATETIME_KEYS_MAX = 4096  # a feed sends a few shapes per type; odd input cannot grow it without bound


def bad_datetime(r: dict[str, Any]) -> str | None:
    """The first date/time a grader would read that is present but impossible (month 13, +25:00 …).
    Which of the fields a resource has is kept per key sequence (resources of a feed share a few)."""
    shape = tuple(r)
    present = _DATETIME_KEYS.get(shape)
    if present is None:
        if len(_DATETIME_KEYS) >= _DATETIME_KEYS_MAX:
            _DATETIME_KEYS.clear()
        present = _DATETIME_KEYS[shape] = tuple(key for key in _DATETIME_FIELDS if key in r)
    for key in present:
        v = r[key]
        values = [(f"{key}.{k}", v.get(k)) for k in ("start", "end") if k in v] if isinstance(v, dict) else [(key, v)]
        for where, value in values:
            if value is not None and parse_datetime(value) is None:
                return f"{where}: {datetime_problem(value)}"
    return None


_NO_VERSION = (-1, float("-inf"), 0)  # version_of's key for a resource without meta
_ETAG = re.compile(r'(?:[Ww]/)?"([^"]+)"')


def version_of(r: dict[str, Any]) -> tuple[str | None, tuple[int, float, int]]:
    """(versionId as sent, sort key without the input order): numeric versionId (an absent or
    non-numeric one sorts below every number; an ETag form `W/"3"` is version 3), then
    meta.lastUpdated."""
    meta = r.get("meta")
    if meta is None:
        return None, _NO_VERSION
    if not isinstance(meta, dict):
        meta = {}
    raw = meta.get("versionId")
    vid = raw.strip() if isinstance(raw, str) and raw.strip() else (str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else None)
    if vid is not None and (m := _ETAG.fullmatch(vid)):
        vid = m.group(1)  # an ETag copied into versionId (`W/"3"`, `"3"`): version 3
    num = int(vid) if vid is not None and vid.isdigit() and len(vid) < 19 else -1
    lu = parse_datetime(meta.get("lastUpdated"))
    return vid, (num, lu.time.timestamp() if lu else float("-inf"), 0)


_NO_FLAGS: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Kept:
    """What one Type/id produced, kept so a later version of it can replace it."""

    key: tuple[int, float, int]
    version: str | None
    ref: str  # the ref evidence cites: Type/id, or Type/id/_history/N when the input carried a version
    patient: str | None = None
    events: list[Event] = field(default_factory=list)
    skipped: Skipped | None = None
    flags: set[str] | frozenset[str] = field(default_factory=set)  # frozenset() once mapped with none (memory)
    deferred: SourceResource | None = None  # a MedicationAdministration waiting for its Medication
    medication: tuple[str | None, dict[str, Any]] | None = None  # (fullUrl, resource)


class ResourceMapper:
    """Maps resources one at a time (streaming: only compact events are kept).

    Exactly one version per Type/id reaches the result: the highest numeric meta.versionId, ties
    broken by meta.lastUpdated, then by input order (last wins) — across files, pages, Bundles and
    NDJSON alike. Every other copy is a named skip `superseded by version N`. Every item added
    ends as either used or exactly one skip, so `read == used + len(skipped)`.
    """

    def __init__(self, code_map: CodeMap, result: Any = None, spill: Callable[[str, _Kept], None] | None = None):
        """`result` receives the events and skips (a `MappingResult` unless given). With `spill`
        (the flat-memory path, spill.py) every copy of every resource is handed to it as soon
        as it is mapped instead of being kept here: only Medications stay in memory, for look-ups;
        `settle()` then picks each Type/id's winner from its copies."""
        self.spill = spill
        self.code_map = code_map
        self.obs = ObservationMapper(code_map)
        self.meds = MedicationMapper(code_map)
        self.procs = ProcedureMapper(code_map)
        self.conditions = ConditionMapper(code_map)
        self.result = MappingResult() if result is None else result
        self.medications: dict[str, dict[str, Any]] = {}
        self._kept: dict[str, _Kept] = {}
        self._superseded: list[tuple[str, str | None, str]] = []  # (Type/id, its version, where)
        self._source_skips: list[Skipped] = []
        self._seq = 0
        self.count = 0  # items read: resources and unreadable files/lines/entries
        self.mapped = 0  # after finish(): resources used (count == mapped + len(result.skipped))

    def skip(self, where: str, reason: str, code: str = "other") -> None:
        self._source_skips.append(Skipped(where, reason, code))

    @staticmethod
    def patient_of(src: SourceResource) -> tuple[str | None, str]:
        """(Patient/id, or None with the reason): the patient a resource belongs to (no state:
        the Spark engine keys resources by it before mapping them)."""
        r = src.resource
        subject = r.get("subject")
        raw = subject.get("reference") if type(subject) is dict else None
        if type(raw) is str:  # the subject decides: kept per reference text (a patient's resources share it)
            hit = _PATIENT_REFS.get(raw)
            if hit is not None:
                return hit
            target = raw.strip()
            if not target.startswith(("#", "urn:")):  # those depend on the enclosing Bundle: not kept
                if len(_PATIENT_REFS) >= _PATIENT_REFS_MAX:
                    _PATIENT_REFS.clear()
                parts = split_reference(target)
                hit = _PATIENT_REFS[raw] = ((f"Patient/{parts[1]}", "") if parts and parts[0] == "Patient" else
                                            (None, f"subject {target} is not a resolvable Patient reference"))
                return hit
        for f in _SUBJECT_FIELDS.get(r["resourceType"], ("subject", "patient")):
            target = reference_target(r.get(f))
            if target is None:
                continue
            if target.startswith("#"):
                return None, f"subject {target} is not a resolvable Patient reference (a contained resource)"
            if target.startswith("urn:"):
                if src.bundle_urls and target in src.bundle_urls:
                    t, i = src.bundle_urls[target]
                    if t == "Patient":
                        return f"{t}/{i}", ""
                    return None, f"subject {target} is not a resolvable Patient reference (a {t})"
                return None, f"unresolved reference {target} (no entry of the input has this fullUrl)"
            parts = split_reference(target)
            if parts and parts[0] == "Patient":
                return f"Patient/{parts[1]}", ""
            return None, f"subject {target} is not a resolvable Patient reference"
        subj = reference_target(r.get("subject")) or "(none)"
        return None, f"subject {subj} is not a resolvable Patient reference"

    _patient_of = patient_of

    def add(self, item: SourceResource | Skipped) -> None:
        self.count += 1
        if isinstance(item, Skipped):
            self._source_skips.append(item)
            return
        self._seq += 1
        ref = resource_ref(item)
        version, key = version_of(item.resource)
        key = (key[0], key[1], self._seq)
        cited = f"{ref}/_history/{version}" if version is not None and SAFE_ID.match(version) else ref
        kept = _Kept(key, version, cited)
        old = self._kept.get(ref)
        if old is not None and old.key > key:
            self._superseded.append((ref, version, cited))
            if self.spill is not None:
                self.spill(ref, kept)  # an older Medication copy: settle() names it superseded
            return
        try:
            self._add(item, kept)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
            # Structurally invalid FHIR (a list where a string belongs, …): a named skip, never a crash.
            kept = _Kept(key, version, cited)
            kept.skipped = Skipped(ref, f"malformed resource ({type(exc).__name__}: {str(exc)[:120]})", "malformed")
        if self.spill is not None:
            self.spill(ref, kept)
            if item.resource.get("resourceType") != "Medication":
                return
        if old is not None:
            self._superseded.append((ref, old.version, old.ref))
            if old.medication is not None:
                self._forget_medication(ref, old.medication[0])
        if kept.medication is not None:
            self.medications[ref] = kept.medication[1]
            if kept.medication[0]:
                self.medications[kept.medication[0]] = kept.medication[1]
        if not kept.flags and kept.deferred is None:
            kept.flags = _NO_FLAGS  # most resources raise no flag: share one empty set
        self._kept[ref] = kept

    def _forget_medication(self, ref: str, full_url: str | None) -> None:
        self.medications.pop(ref, None)
        if full_url:
            self.medications.pop(full_url, None)

    def _add(self, src: SourceResource, kept: _Kept) -> None:
        r = src.resource
        rtype = r["resourceType"]
        ref = kept.ref
        flags: set[str] = set()
        kept.flags = flags
        number = unreadable(r)
        if number is not None:
            kept.skipped = Skipped(ref, number, "unreadable_number")
            return
        bad = bad_datetime(r)
        if bad is not None and (rtype in _GRADED_TYPES or rtype == "Medication"):
            kept.skipped = Skipped(ref, bad, "impossible_time")
            return
        if rtype == "Medication":
            why, _, code = status_decision(r)
            if why:
                kept.skipped = Skipped(ref, why, code)
                return
            kept.medication = (src.full_url, r)  # consumed by the MedicationAdministrations that reference it
            return
        if rtype == "Patient":
            kept.patient = resource_ref(src)
            kept.events.append(map_patient(r, ref, flags))
            return
        if rtype not in _GRADED_TYPES:
            kept.skipped = Skipped(ref, f"resource type {rtype} is not used for grading", "unused_type")
            return
        if rtype == "Condition" and is_own_output(r):  # (Observations: ObservationMapper, off the hot path)
            kept.skipped = Skipped(ref, OWN_OUTPUT_REASON, "own_output")
            return
        patient, why = self._patient_of(src)
        if patient is None:
            kept.skipped = Skipped(ref, why, "unresolved_reference")
            return
        kept.patient = patient
        if rtype == "Observation":
            out = self.obs.map(r, ref, flags)
            if type(out) is list:
                kept.events = out  # a new list, the resource's own
            else:
                kept.skipped = out
        elif rtype == "Procedure" or rtype == "Condition":
            p = (self.procs if rtype == "Procedure" else self.conditions).map(r, ref, flags)
            if isinstance(p, Skipped):
                kept.skipped = p
            else:
                kept.events.append(p)
        else:
            target = reference_target(r.get("medicationReference"))
            if target and not target.startswith("#") and self._resolve(src, target) is None:
                kept.deferred = src
                return
            self._map_med(src, kept)

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

    def _map_med(self, src: SourceResource, kept: _Kept) -> None:
        try:
            flags = kept.flags if isinstance(kept.flags, set) else set()
            kept.flags = flags
            out = self.meds.map(src.resource, kept.ref, flags, lambda t: self._resolve(src, t))
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
            out = Skipped(kept.ref, f"malformed resource ({type(exc).__name__}: {str(exc)[:120]})", "malformed")
        if isinstance(out, Skipped):
            kept.skipped = out
        else:
            kept.events.append(out)

    def missing_medications(self) -> list[str]:
        """Medication references still unresolved (e.g. Bulk Patient-level exports omit
        Medication, which is outside the Patient compartment): the caller may read them."""
        out = []
        for kept in self._kept.values():
            if kept.deferred is None:
                continue
            target = reference_target(kept.deferred.resource.get("medicationReference"))
            if target and self._resolve(kept.deferred, target) is None:
                parts = split_reference(target)
                if parts and parts[0] == "Medication" and f"Medication/{parts[1]}" not in out:
                    out.append(f"Medication/{parts[1]}")
        return out

    def settle(self, ref: str, copies: list[_Kept]) -> tuple[_Kept, list[tuple[int, Skipped]]]:
        """The flat-memory path's finish() for one Type/id: its winning copy (deferred medication
        mapped) and the (input position, skip) of every superseded copy — what finish() yields
        for it, given all its copies in input order."""
        cur = copies[0]
        losers: list[tuple[int, str | None, str]] = []
        for k in copies[1:]:
            if cur.key > k.key:
                losers.append((k.key[2], k.version, k.ref))
            else:
                losers.append((k.key[2], cur.version, cur.ref))
                cur = k
        if cur.deferred is not None:
            src, cur.deferred = cur.deferred, None
            self._map_med(src, cur)
        why = f"superseded by version {cur.version}" if cur.version is not None else "superseded by a later copy of the same resource in the input"
        if cur.skipped is None:
            self.mapped += 1
        return cur, [(seq, Skipped(cited if version is not None else ref, why, "superseded")) for seq, version, cited in losers]

    def finish(self) -> MappingResult:
        """The result: events of the winning version of every Type/id, and one skip for every
        other item read (superseded copies named with their version). With `spill`, only the
        source-level skips: the rest comes from `settle()`."""
        result = self.result
        result.skipped.extend(self._source_skips)
        self._source_skips = []
        if self.spill is not None:
            return result
        for kept in self._kept.values():
            if kept.deferred is not None:
                src, kept.deferred = kept.deferred, None
                self._map_med(src, kept)
        for ref, version, cited in self._superseded:
            winner = self._kept[ref]
            if winner.version is not None:
                why = f"superseded by version {winner.version}"
            else:
                why = "superseded by a later copy of the same resource in the input"
            result.skipped.append(Skipped(cited if version is not None else ref, why, "superseded"))
        self._superseded = []
        self.mapped += sum(1 for k in self._kept.values() if k.skipped is None)
        for kept in sorted(self._kept.values(), key=lambda k: k.key[2]):  # input order of the winning copies
            if kept.patient is not None and kept.flags:
                result.flags.setdefault(kept.patient, set()).update(kept.flags)  # e.g. unit_error on a quarantined value
            if kept.skipped is not None:
                result.skipped.append(kept.skipped)
                continue
            if kept.patient is None:
                continue  # a Medication: used through the administrations that cite it
            for e in kept.events:
                result.add(kept.patient, e)
            result.sources.setdefault(kept.patient, []).append(kept.ref)
        self._kept.clear()
        return result
