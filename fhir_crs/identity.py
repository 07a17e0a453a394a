"""How the pages a clinician reads name a patient (`report`, `demo`: text, CSV, HTML).

* `patient_label(ref)` — a short, stable label derived from the patient reference itself
  (`P-` + 8 base32 characters of its SHA-256), so one patient has the same label in every report,
  whatever else is in the cohort and however it sorts. It is a pseudonym, not an anonymisation:
  whoever holds the list of FHIR ids can recompute it.
* `Identity` — what a page shows for a patient: the label, the FHIR reference, the MRN
  (`Patient.identifier` of type MR) and the name when the Patient carries them. With
  `--deidentify` only the label is shown; machine outputs then carry `Patient/~<label>` where
  they would carry the reference.
* `ReportMeta` — the report date, the data source (the files read, or the server URL with any
  user, password or query removed) and the fhir-crs version, printed on every page.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import __version__

__all__ = ["Identity", "ReportMeta", "identities", "patient_label", "safe_url"]


def patient_label(ref: str) -> str:
    """`Patient/abc` -> `P-XXXXXXXX`: stable, derived from the reference (not the sort order)."""
    digest = hashlib.sha256(str(ref).encode("utf-8")).digest()
    return "P-" + base64.b32encode(digest[:5]).decode("ascii")


@dataclass(frozen=True, slots=True)
class Identity:
    label: str
    ref: str | None  # None when de-identified
    mrn: str | None = None
    name: str | None = None

    @property
    def public_ref(self) -> str:
        """The reference machine outputs carry: the real one, or `Patient/~<label>` de-identified."""
        return self.ref if self.ref is not None else f"Patient/~{self.label}"

    def describe(self) -> str:
        """`P-XXXX · MRN 123 · Name` (only what is known and not hidden)."""
        parts = [self.label]
        if self.mrn:
            parts.append(f"MRN {self.mrn}")
        if self.name:
            parts.append(self.name)
        return " · ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "patient": self.ref, "mrn": self.mrn, "name": self.name}


def identities(cases: list[dict[str, Any]], deidentify: bool = False) -> dict[str, Identity]:
    """Patient reference -> Identity, from graded case objects (`patient`, `mrn`, `name`)."""
    out: dict[str, Identity] = {}
    for c in cases:
        ref = str(c.get("patient"))
        old = out.get(ref)
        mrn = c.get("mrn") or (old.mrn if old else None)
        name = c.get("name") or (old.name if old else None)
        if deidentify:
            out[ref] = Identity(patient_label(ref), None)
        else:
            out[ref] = Identity(patient_label(ref), ref, mrn, name)
    return out


def safe_url(url: str) -> str:
    """A server URL fit to print: no user, password, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class ReportMeta:
    source: str
    generated: str
    version: str = __version__
    deidentified: bool = False

    @classmethod
    def for_paths(cls, paths: list[Path], deidentify: bool = False, now: datetime | None = None) -> ReportMeta:
        shown = ", ".join(str(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        return cls(f"files: {shown}", _now(now), deidentified=deidentify)

    @classmethod
    def for_server(cls, url: str, deidentify: bool = False, now: datetime | None = None) -> ReportMeta:
        return cls(f"FHIR server {safe_url(url)}", _now(now), deidentified=deidentify)

    def line(self) -> str:
        return (f"Report date {self.generated} · data source: {self.source} · fhir-crs {self.version}"
                + (" · de-identified (MRN, name and FHIR ids hidden)" if self.deidentified else ""))

    def to_json(self) -> dict[str, Any]:
        return {"generated": self.generated, "source": self.source, "fhir_crs_version": self.version,
                "deidentified": self.deidentified}


def _now(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
