"""The cohort-level change feed of the nightly sync: what changed on the server since the last
high-water mark, for all patients at once (issue 13).

    CapabilityStatement -> per graded type: `Type/_history?_since=` (creates, updates AND deletes)
                           or `Type?_lastUpdated=gt…` (creates and updates; `_elements=subject` on
                           Observations) or, when neither is offered, no feed ("per-patient": the
                           sync falls back to its per-patient change check)
                        -> Medication too (not in the patient compartment: its entries name no
                           patient; the sync maps them through the MedicationAdministrations it
                           graded), read the same way, and simply not read ("none") where the
                           server offers neither — it never turns the whole feed off
    -> one `FeedEntry` per resource version seen (Type/id, version, patient, deleted?, resource)

A quiet night costs one request per graded type (5) plus the CapabilityStatement, whatever the
cohort size. The feed itself does not decide what is new to the sync: `Sync` de-duplicates the
entries against the versions it graded last time (state store) and maps them to its cohort.
The time the feed was read at is the server's clock (the first page's Bundle.meta.lastUpdated or
the HTTP Date header), never the client's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import FhirNotFound, FhirOperationOutcome
from .ownoutput import is_own_output

log = logging.getLogger("fhir_crs.sync")

# the patient-compartment types: without a feed for each of them there is no cohort feed
COMPARTMENT_TYPES = ("Patient", "Procedure", "MedicationAdministration", "Observation")
# in the compartment too, but read only when the server offers a feed for them ("none" otherwise:
# then a change to them is seen at the patient's next re-read, with a warning)
OPTIONAL_TYPES = ("Condition",)
# read when the server offers a feed for them, else left out ("none")
SHARED_TYPES = ("Medication",)
FEED_TYPES = (*COMPARTMENT_TYPES, *OPTIONAL_TYPES, *SHARED_TYPES)
_NONE_WHEN_ABSENT = (*OPTIONAL_TYPES, *SHARED_TYPES)
FEED_MODES = ("auto", "history", "search", "per-patient")
# the Observation feed can be large on a busy server: only what maps a change to its patient
SEARCH_ELEMENTS = {"Observation": "subject"}
_HISTORY_URL = re.compile(r"^(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9.\-]{1,64})(?:/_history/([^/?]+))?/?$")
_ETAG = re.compile(r'^(?:W/)?"?([^"]+)"?$')


@dataclass(slots=True)
class FeedEntry:
    ref: str  # "Type/id"
    version: str | None
    patient: str | None  # the Patient id the resource belongs to (None for a deletion: no body)
    deleted: bool = False
    resource: dict[str, Any] | None = None
    last_updated: datetime | None = None


@dataclass(slots=True)
class FeedRead:
    mode: str  # "history" | "search" | "mixed" (some types by history, others by search)
    server_time: str | None
    entries: list[FeedEntry] = field(default_factory=list)
    modes: dict[str, str] = field(default_factory=dict)


def parse_instant(value: Any) -> datetime | None:
    """An ISO instant (`Z`, `+00:00`, fractional seconds) as an aware UTC datetime; None if not one."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def instant(when: datetime) -> str:
    """Whole-second UTC instant for `_since` / `_lastUpdated` (the overlap absorbs the rounding down)."""
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def minus(stamp: str, seconds: float) -> str:
    when = parse_instant(stamp)
    if when is None:
        raise ValueError(f"not an instant: {stamp!r}")
    return instant(when - timedelta(seconds=seconds))


def patient_of(resource: dict[str, Any]) -> str | None:
    """The Patient id a graded resource belongs to (Patient: its own id; others: subject/patient)."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            m = _HISTORY_URL.match(ref["reference"].strip())
            if m and m[1] == "Patient":
                return m[2]
    return None


def version_id(resource: dict[str, Any]) -> str | None:
    """`meta.versionId` as sent (a string, possibly empty), None without one."""
    meta = resource.get("meta")
    vid = meta.get("versionId") if isinstance(meta, dict) else None
    return vid if isinstance(vid, str) else None


def _version(resource: dict[str, Any]) -> str | None:
    return version_id(resource) or None


def version_newer_or_same(held: str | None, seen: str | None) -> bool:
    """True when the version `held` (graded last time) is the version `seen` in the feed or later."""
    if held is None or seen is None:
        return False
    if held.isdigit() and seen.isdigit():
        return int(held) >= int(seen)
    return held == seen


def version_newer(held: str | None, seen: str | None) -> bool:
    """True when the version `held` is strictly later than `seen` (numeric versionIds only)."""
    return bool(held and seen and held.isdigit() and seen.isdigit() and int(held) > int(seen))


def _entry(rtype: str, entry: dict[str, Any]) -> FeedEntry | None:
    resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else None
    request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
    response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
    if str(request.get("method", "")).upper() == "DELETE" or (resource is None and request):
        m = _HISTORY_URL.match(str(request.get("url") or entry.get("fullUrl") or "").split("?", 1)[0])
        if m is None or m[1] != rtype:
            log.warning("%s history: a DELETE entry without a usable Type/id ignored", rtype)
            return None
        version = m[3]
        if version is None:
            em = _ETAG.match(str(response.get("etag") or "").strip())
            version = em[1] if em else None
        # the deleted version is the one *after* the last one graded: a graded version below it
        # must not count as "already seen"
        return FeedEntry(f"{m[1]}/{m[2]}", version, m[2] if rtype == "Patient" else None, deleted=True,
                         last_updated=parse_instant(response.get("lastModified")))
    if resource is None or resource.get("resourceType") != rtype or not isinstance(resource.get("id"), str):
        return None
    if is_own_output(resource):
        return None  # a grade fhir-crs wrote: not a change of the data graded
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    return FeedEntry(f"{rtype}/{resource['id']}", _version(resource), patient_of(resource), resource=resource,
                     last_updated=parse_instant(meta.get("lastUpdated")))


class ChangeFeed:
    """Reads the change feed of one server (`mode`: the `change_feed` setting)."""

    def __init__(self, client: Any, mode: str = "auto"):
        if mode not in FEED_MODES:
            raise ValueError(f"change_feed must be one of {', '.join(FEED_MODES)}")
        self.client = client
        self.mode = mode
        self._modes: dict[str, str] | None = None

    def modes(self) -> dict[str, str]:
        """Per graded type: "history", "search" or "per-patient" (from the CapabilityStatement
        when `mode` is auto; one request)."""
        if self._modes is not None:
            return self._modes
        if self.mode != "auto":
            self._modes = {t: "none" if self.mode == "per-patient" and t in _NONE_WHEN_ABSENT else self.mode for t in FEED_TYPES}
            return self._modes
        try:
            cap = self.client.capabilities()
        except (FhirNotFound, FhirOperationOutcome) as exc:
            log.warning("no CapabilityStatement (%s): per-patient change checks", exc)
            self._modes = {t: "none" if t in _NONE_WHEN_ABSENT else "per-patient" for t in FEED_TYPES}
            return self._modes
        declared: dict[str, dict[str, Any]] = {}
        for rest in cap.get("rest") or ():
            if isinstance(rest, dict) and rest.get("mode", "server") == "server":
                for res in rest.get("resource") or ():
                    if isinstance(res, dict) and isinstance(res.get("type"), str):
                        declared[res["type"]] = res
        out = {}
        for rtype in FEED_TYPES:
            res = declared.get(rtype, {})
            interactions = {i.get("code") for i in res.get("interaction") or () if isinstance(i, dict)}
            params = {p.get("name") for p in res.get("searchParam") or () if isinstance(p, dict)}
            if "history-type" in interactions:
                out[rtype] = "history"
            elif "search-type" in interactions and "_lastUpdated" in params:
                out[rtype] = "search"
            elif rtype in _NONE_WHEN_ABSENT:
                out[rtype] = "none"
                log.warning("the server offers neither %s/_history nor _lastUpdated searches on it: changed %s "
                            "resources are seen only by a full re-read", rtype, rtype)
            else:
                out[rtype] = "per-patient"
        self._modes = out
        return out

    def available(self) -> bool:
        return all(self.modes()[t] != "per-patient" for t in COMPARTMENT_TYPES)

    def read(self, since: str) -> FeedRead:
        """Every change to the graded types after `since` (an instant by the server's clock)."""
        modes = dict(self.modes())
        entries: list[FeedEntry] = []
        server_time: str | None = None
        for rtype in FEED_TYPES:
            if modes[rtype] == "none":
                continue
            got, stamp = self._read_type(rtype, since, modes)
            entries.extend(got)
            server_time = server_time or stamp  # the first answer: before any data was read
        kinds = {m for m in modes.values() if m != "none"}
        return FeedRead(kinds.pop() if len(kinds) == 1 else "mixed", server_time, entries, modes)

    def read_shared(self, since: str) -> list[FeedEntry]:
        """The changes to the shared types (Medication) after `since` alone: what a patient-level
        Bulk `$export?_since=` cannot carry (Medication is outside the Patient compartment)."""
        modes = dict(self.modes())
        return [e for rtype in SHARED_TYPES if modes.get(rtype, "none") != "none"
                for e in self._read_type(rtype, since, modes)[0]]

    def _read_type(self, rtype: str, since: str, modes: dict[str, str]) -> tuple[list[FeedEntry], str | None]:
        if modes[rtype] == "history":
            it = self.client.history_iter(rtype, since)
            try:
                out = [e for bundle in it.bundles() for raw in bundle.get("entry") or () if isinstance(raw, dict)
                       for e in [_entry(rtype, raw)] if e is not None]
                return out, it.server_time
            except (FhirNotFound, FhirOperationOutcome) as exc:
                # a server that lists history-type but refuses `_since` on it: the search feed
                if exc.status not in (400, 404, 405, 501):
                    raise
                log.warning("%s/_history refused (%s); using _lastUpdated searches", rtype, exc)
                modes[rtype] = "search"
        params = [("_lastUpdated", f"gt{since}")]
        if rtype in SEARCH_ELEMENTS:
            params.append(("_elements", SEARCH_ELEMENTS[rtype]))
        res = self.client.search(rtype, params, no_cache=True)
        out = [e for r in res.matches for e in [_entry(rtype, {"resource": r})] if e is not None]
        return out, res.server_time


def iter_cart_entries(entries: list[FeedEntry], procedure_codes: set[str], drug_codes: set[str],
                      not_before: datetime) -> Iterator[tuple[str, datetime]]:
    """(patient, administration time) for each CAR-T Procedure / product MedicationAdministration
    in the feed dated on or after `not_before` (new cohort members of a discovered cohort)."""
    from .mappers.common import parse_datetime

    for e in entries:
        r = e.resource
        if r is None or e.patient is None or r.get("resourceType") not in ("Procedure", "MedicationAdministration"):
            continue
        codes = procedure_codes if r["resourceType"] == "Procedure" else drug_codes
        concept = r.get("code") if r["resourceType"] == "Procedure" else r.get("medicationCodeableConcept")
        found = {c.get("code") for c in (concept or {}).get("coding") or () if isinstance(c, dict)}
        if not found & codes:
            continue
        prefix = "performed" if r["resourceType"] == "Procedure" else "effective"
        when = r.get(f"{prefix}DateTime") or ((r.get(f"{prefix}Period") or {}).get("start"))
        parsed = parse_datetime(when)
        at = parsed.time if parsed is not None else None
        if at is not None and at >= not_before:
            yield e.patient, at
