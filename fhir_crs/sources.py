"""Stage 0: reads FHIR R4 JSON from files, directories (recursively), Bundles of any type and
NDJSON, yielding each resource with where it came from. No server involved.

A path that does not exist or cannot be opened raises `InputError` (one clear message, non-zero
exit). Content that is not usable becomes a `Skipped` entry, so nothing is dropped silently, and
always at the smallest level that holds the problem: a file that is not JSON at all is one skip
naming the file; an NDJSON line, one naming the line; a Bundle entry without a resource, one
naming its fullUrl or index; a resource holding a number no double can hold (`1e309`, NaN),
one naming the resource (`jsonread`, skipped by the mappers). A byte-order mark is read and ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .events import Skipped
from .jsonread import loads

SUFFIXES_JSON = {".json"}
SUFFIXES_NDJSON = {".ndjson", ".jsonl"}


@dataclass(frozen=True, slots=True)
class SourceResource:
    """One resource and its context (the enclosing Bundle's fullUrl index, if any)."""

    resource: dict[str, Any]
    origin: str
    full_url: str | None = None
    bundle_urls: dict[str, tuple[str, str]] | None = None


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise InputError(f"Input path {path} does not exist.")
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUFFIXES_JSON | SUFFIXES_NDJSON
        )
        return found
    return [path]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror or exc}.") from exc


def _entries(value: Any, origin: str) -> Iterator[SourceResource | Skipped]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _entries(item, f"{origin}[{i}]")
        return
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        yield Skipped(origin, "JSON value is not a FHIR resource (no resourceType)")
        return
    if value["resourceType"] != "Bundle":
        yield SourceResource(value, origin)
        return
    raw = value.get("entry") or []
    if not isinstance(raw, list):
        yield Skipped(origin, "Bundle.entry is not a list")
        return
    urls: dict[str, tuple[str, str]] = {}
    for e in raw:
        if not isinstance(e, dict):
            continue
        r, fu = e.get("resource"), e.get("fullUrl")
        if isinstance(r, dict) and isinstance(fu, str):
            rid = r.get("id") or fu.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
            urls[fu] = (str(r.get("resourceType")), str(rid))
    for i, e in enumerate(raw):
        where = f"{origin}#entry[{i}]"
        if not isinstance(e, dict):
            yield Skipped(where, "Bundle entry is not a JSON object")
            continue
        fu = e.get("fullUrl") if isinstance(e.get("fullUrl"), str) and e.get("fullUrl") else None
        r = e.get("resource")
        if r is None:
            request = e.get("request") if isinstance(e.get("request"), dict) else {}
            what = "resource is null" if "resource" in e else "no resource"
            if request.get("method") == "DELETE":
                what += " (a DELETE entry)"
            elif isinstance(e.get("response"), dict):
                what += " (a response entry)"
            yield Skipped(fu or where, f"Bundle entry without a resource: {what}")
            continue
        search = e.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            yield Skipped(where, "search.mode=outcome entry (server OperationOutcome)")
            continue
        if isinstance(r, dict) and r.get("resourceType") == "Bundle":
            yield from _entries(r, where)
            continue
        if not isinstance(r, dict) or not isinstance(r.get("resourceType"), str):
            yield Skipped(fu or where, "Bundle entry is not a FHIR resource")
            continue
        yield SourceResource(r, where, fu, urls)


def iter_path(path: Path) -> Iterator[SourceResource | Skipped]:
    """Every resource in one file or directory tree."""
    for f in _files(path):
        if f.suffix.lower() in SUFFIXES_NDJSON:
            try:
                fh = f.open("rb")
            except OSError as exc:
                raise InputError(f"Cannot read {f}: {exc.strerror or exc}.") from exc
            with fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        value = loads(line)
                    except ValueError as exc:
                        yield Skipped(f"{f}:{lineno}", f"not valid JSON ({exc})")
                        continue
                    yield from _entries(value, f"{f}:{lineno}")
        else:
            data = _read_bytes(f)
            try:
                value = loads(data)
            except ValueError as exc:
                yield Skipped(str(f), f"not valid JSON ({exc})")
                continue
            yield from _entries(value, str(f))


def iter_paths(paths: Iterable[Path]) -> Iterator[SourceResource | Skipped]:
    paths = list(paths)
    for p in paths:  # fail fast on a missing path before doing any work
        if not p.exists():
            raise InputError(f"Input path {p} does not exist.")
    for p in paths:
        yield from iter_path(p)
