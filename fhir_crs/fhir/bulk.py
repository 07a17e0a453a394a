"""FHIR Bulk Data ``$export`` (stage: FHIR server ⇄ `fhir/client` ⇄ nightly `sync`).

The asynchronous flow of HL7 Bulk Data Access (docs/fhir-ecosystem.md §2.1), on top of
`FhirClient.get_url` / `delete_url` so retries, 429/``Retry-After``, error mapping and SMART
token refresh (401 → re-mint → resend) come from the client:

1. `BulkExport.kickoff` — ``GET [base]/Patient/$export`` (or ``Group/<id>/$export``, or
   system ``[base]/$export``) with ``Prefer: respond-async``; expects ``202`` +
   ``Content-Location`` (the status URL).
2. `BulkExport.wait` — polls the status URL: ``202`` (``X-Progress``, ``Retry-After`` in
   seconds or as an HTTP-date) until ``200`` + manifest, backing off exponentially when the
   server gives no ``Retry-After``, within an overall timeout. On timeout, error or
   KeyboardInterrupt the job is cancelled (``DELETE`` status URL) before the exception
   propagates.
3. `BulkExport.iter_resources` — streams each ``output[]`` NDJSON file line by line (memory
   stays flat) and yields ``(resource_type, resource)``, or ``(None, "file:line: reason")``
   for a line that cannot be used. `BulkExport.error_messages` turns the ``error[]``
   OperationOutcome files into messages; `BulkExport.iter_deleted` reads ``deleted[]``.

`Manifest.transaction_time` is the next run's ``_since``. Results of consecutive exports may
overlap, and ``_typeFilter`` is advisory (servers may ignore it), so callers must filter and
upsert idempotently themselves.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import orjson

from .. import jsonread
from ..errors import FhirAuthError, FhirServerError
from .client import FhirClient, retry_after_seconds

__all__ = [
    "DEFAULT_EXPORT_TYPES",
    "BulkExport",
    "BulkExportError",
    "BulkExportTimeout",
    "BulkItem",
    "Manifest",
    "ManifestFile",
    "parse_manifest",
]

log = logging.getLogger("fhir_crs.fhir")

Resource = dict[str, Any]
# (resource type, resource) for a usable line; (None, "file:line: reason") for one that is not.
BulkItem = tuple[str, Resource] | tuple[None, str]

DEFAULT_EXPORT_TYPES = (
    "Patient",
    "Observation",
    "MedicationAdministration",
    "Procedure",
    "Medication",
)
NDJSON = "application/fhir+ndjson"
X_PROGRESS_MAX = 100

_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")


class BulkExportError(FhirServerError):
    """A Bulk Data export could not be started, finished or read (the message says which step)."""


class BulkExportTimeout(BulkExportError):
    """The export did not complete within the overall timeout (the job was cancelled)."""


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One ``output[]`` / ``error[]`` / ``deleted[]`` item; `url` is absolute."""

    type: str
    url: str
    count: int | None = None

    @property
    def name(self) -> str:
        """The file's last path segment (never the query: pre-signed URLs carry credentials)."""
        return urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1] or self.type or "file"


@dataclass(frozen=True, slots=True)
class Manifest:
    """The completed export's manifest.

    Attributes:
        transaction_time: the server's ``transactionTime``; persist it as the next ``_since``.
        requires_access_token: send the bearer token with file downloads (missing → True).
        output: NDJSON files, possibly several per resource type.
        error: OperationOutcome NDJSON files; read them with `BulkExport.error_messages`.
        deleted: Bundle NDJSON files of deletions since ``_since`` (Bulk Data 2.0).
        request: the kick-off URL the server echoes.
        status_url: where the manifest came from (for a later ``DELETE``).
    """

    transaction_time: str
    requires_access_token: bool
    output: tuple[ManifestFile, ...]
    error: tuple[ManifestFile, ...] = ()
    deleted: tuple[ManifestFile, ...] = ()
    request: str | None = None
    status_url: str | None = None

    def files(self, resource_type: str) -> tuple[ManifestFile, ...]:
        return tuple(f for f in self.output if f.type == resource_type)


def _format_since(since: str | datetime) -> str:
    if isinstance(since, datetime):
        if since.tzinfo is None:
            raise ValueError("_since needs a timezone-aware datetime (a FHIR instant)")
        return since.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    text = since.strip()
    if not _INSTANT.match(text):
        raise ValueError(
            f"_since {since!r} is not a FHIR instant (YYYY-MM-DDThh:mm:ss[.sss]Z or ±hh:mm)"
        )
    return text


def _files(items: Any, base: str, field_name: str) -> tuple[ManifestFile, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise BulkExportError(f"Bulk export manifest: '{field_name}' is not a list.")
    out: list[ManifestFile] = []
    for item in items:
        url = item.get("url") if isinstance(item, dict) else None
        if not isinstance(url, str) or not url.strip():
            raise BulkExportError(f"Bulk export manifest: an '{field_name}' item has no url.")
        type_ = item.get("type")
        count = item.get("count")
        out.append(
            ManifestFile(
                type=type_ if isinstance(type_, str) else "",
                url=urljoin(base, url.strip()),
                count=count if isinstance(count, int) and not isinstance(count, bool) else None,
            )
        )
    return tuple(out)


def parse_manifest(body: Any, status_url: str) -> Manifest:
    """A `Manifest` from the status URL's ``200`` body; relative file URLs resolve against it."""
    if not isinstance(body, dict):
        raise BulkExportError("Bulk export manifest is not a JSON object.")
    ttime = body.get("transactionTime")
    if not isinstance(ttime, str) or not ttime.strip():
        raise BulkExportError("Bulk export manifest has no transactionTime.")
    requires = body.get("requiresAccessToken")
    request = body.get("request")
    return Manifest(
        transaction_time=ttime.strip(),
        requires_access_token=requires if isinstance(requires, bool) else True,
        output=_files(body.get("output"), status_url, "output"),
        error=_files(body.get("error"), status_url, "error"),
        deleted=_files(body.get("deleted"), status_url, "deleted"),
        request=request if isinstance(request, str) else None,
        status_url=status_url,
    )


def _outcome_messages(outcome: Resource, where: str) -> list[str]:
    messages: list[str] = []
    for issue in outcome.get("issue") or ():
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "no details"
        head = " ".join(str(x) for x in (issue.get("severity"), issue.get("code")) if x)
        messages.append(f"{where}: {head}: {text}" if head else f"{where}: {text}")
    return messages or [f"{where}: OperationOutcome without issues"]


class BulkExport:
    """Runs Bulk Data ``$export`` jobs through a `FhirClient`.

    Args:
        client: the FHIR client (its auth, e.g. `SmartBackendAuth`, is used for every request
            except file downloads of a manifest with ``requiresAccessToken: false``).
        timeout: overall seconds `wait` may spend polling.
        poll_interval: first wait between polls when the server sends no ``Retry-After``;
            doubled after each poll up to `max_poll_interval`.
        min_poll_interval: floor for any wait (also a ``Retry-After: 0``).
        on_progress: called with each new ``X-Progress`` text.
        chunk_size: bytes read at a time from NDJSON files.
        sleep, clock, now: injectable for tests (`clock` monotonic; `now` epoch seconds, for
            ``Retry-After`` HTTP-dates).

    Attributes:
        progress: the last ``X-Progress`` seen (or None).
        polls: status requests made by the last `wait`.
    """

    def __init__(
        self,
        client: FhirClient,
        *,
        timeout: float = 4 * 3600.0,
        poll_interval: float = 2.0,
        max_poll_interval: float = 120.0,
        min_poll_interval: float = 1.0,
        on_progress: Callable[[str], None] | None = None,
        chunk_size: int = 64 * 1024,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.min_poll_interval = min_poll_interval
        self.on_progress = on_progress
        self.chunk_size = chunk_size
        self._sleep = sleep
        self._clock = clock
        self._now = now
        self.progress: str | None = None
        self.polls = 0

    # ----------------------------------------------------------------- kick-off

    def kickoff(
        self,
        *,
        group_id: str | None = None,
        system: bool = False,
        types: Sequence[str] | None = DEFAULT_EXPORT_TYPES,
        since: str | datetime | None = None,
        type_filters: Sequence[str] = (),
    ) -> str:
        """Start an export; returns the absolute status URL.

        Args:
            group_id: export ``Group/<id>/$export`` instead of ``Patient/$export``.
            system: export ``[base]/$export`` (all data, including non-patient resources).
            types: ``_type``; None or empty sends none (the server's default: everything).
            since: ``_since``, a FHIR instant (e.g. the previous `Manifest.transaction_time`).
            type_filters: ``_typeFilter`` queries such as ``Observation?category=vital-signs``;
                advisory only — servers may ignore them.

        Raises:
            ValueError: a malformed type, instant or filter.
            BulkExportError: the server refused the export or answered without a status URL.
            FhirAuthError: 401/403.
        """
        if group_id is not None and system:
            raise ValueError("choose a Group export or a system export, not both")
        if group_id is not None:
            if not group_id:
                raise ValueError("group_id is empty")
            path = f"Group/{quote(group_id, safe='')}/$export"
        else:
            path = "$export" if system else "Patient/$export"
        params: list[tuple[str, str]] = []
        if types:
            bad = [t for t in types if not _RESOURCE_TYPE.match(t)]
            if bad:
                raise ValueError(f"not FHIR resource types: {bad}")
            params.append(("_type", ",".join(types)))
        if since is not None:
            params.append(("_since", _format_since(since)))
        if type_filters:
            if any("," in f or "?" not in f for f in type_filters):
                raise ValueError(
                    "each _typeFilter must look like 'Type?param=value' without commas"
                )
            params.append(("_typeFilter", ",".join(type_filters)))
        url = self.client.base_url + "/" + path
        if params:
            url += "?" + urlencode(params, safe=",", quote_via=quote)

        try:
            resp = self.client.get_url(url, headers={"Prefer": "respond-async"})
        except FhirAuthError:
            raise
        except FhirServerError as exc:
            hint = (
                " (the server may not support Bulk Data $export)"
                if exc.status in (404, 405, 501)
                else ""
            )
            raise BulkExportError(
                f"Bulk export kick-off failed{hint}: {exc}", exc.status, exc.diagnostics
            ) from exc
        try:
            status, location = resp.status_code, resp.headers.get("Content-Location")
            resolved_from = resp.url or url
        finally:
            resp.close()
        if status != 202:
            raise BulkExportError(
                f"Bulk export kick-off GET /{path} answered HTTP {status}; expected 202 Accepted "
                "(asynchronous $export).",
                status,
            )
        if not location or not location.strip():
            raise BulkExportError(
                f"Bulk export kick-off GET /{path} answered 202 without a Content-Location header.",
                status,
            )
        status_url = urljoin(resolved_from, location.strip())
        log.info("bulk export started: %s", urlsplit(status_url).path)
        return status_url

    # ----------------------------------------------------------------- polling

    def wait(self, status_url: str) -> Manifest:
        """Poll `status_url` until the manifest is ready.

        Raises:
            BulkExportTimeout: not complete within `timeout` (the job is cancelled).
            BulkExportError: the export failed or the manifest is malformed (job cancelled).
            FhirAuthError: 401/403 (job cancelled).
        """
        start = self._clock()
        slept = 0.0
        backoff = self.poll_interval
        self.polls = 0
        self.progress = None
        try:
            while True:
                self.polls += 1
                try:
                    resp = self.client.get_url(status_url)
                except FhirAuthError:
                    raise
                except FhirServerError as exc:
                    raise BulkExportError(
                        f"Bulk export failed while polling: {exc}", exc.status, exc.diagnostics
                    ) from exc
                try:
                    status = resp.status_code
                    if status == 200:
                        try:
                            body = orjson.loads(resp.content)
                        except orjson.JSONDecodeError as exc:
                            raise BulkExportError(
                                "Bulk export manifest is not valid JSON.", status
                            ) from exc
                        manifest = parse_manifest(body, resp.url or status_url)
                        log.info(
                            "bulk export complete: %d output file(s), %d error file(s), "
                            "transactionTime %s",
                            len(manifest.output),
                            len(manifest.error),
                            manifest.transaction_time,
                        )
                        return manifest
                    if status != 202:
                        raise BulkExportError(
                            f"Bulk export status answered HTTP {status}; expected 202 or 200.",
                            status,
                        )
                    self._report(resp.headers.get("X-Progress"))
                    retry_after = retry_after_seconds(resp.headers.get("Retry-After"), self._now)
                finally:
                    resp.close()

                delay = max(self.min_poll_interval, backoff if retry_after is None else retry_after)
                backoff = min(self.max_poll_interval, backoff * 2)
                # `sleep` may be injected (no real wait); counting requested waits keeps the
                # timeout honest.
                elapsed = max(self._clock() - start, slept)
                if elapsed + delay > self.timeout:
                    raise BulkExportTimeout(
                        f"Bulk export did not complete within {self.timeout:.0f}s "
                        f"(last progress: {self.progress or 'none reported'}); it was cancelled."
                    )
                self._sleep(delay)
                slept += delay
        except BaseException:
            # Also on KeyboardInterrupt: leave no orphaned export job running on the server.
            self.cancel(status_url)
            raise

    def _report(self, progress: str | None) -> None:
        if not progress:
            return
        progress = progress.strip()[:X_PROGRESS_MAX]
        if progress != self.progress:
            self.progress = progress
            log.info("bulk export in progress: %s", progress)
            if self.on_progress is not None:
                self.on_progress(progress)

    def cancel(self, status_url: str) -> bool:
        """``DELETE`` the status URL: cancels a running job, or tells the server it may release
        a completed job's files. Best effort: returns False (and logs) instead of raising."""
        try:
            status = self.client.delete_url(status_url)
        except Exception as exc:
            log.warning("bulk export cancel (DELETE %s) failed: %s", urlsplit(status_url).path, exc)
            return False
        log.info("bulk export cancelled/released: HTTP %d", status)
        return 200 <= status < 300

    # ----------------------------------------------------------------- files

    def _lines(self, f: ManifestFile, with_auth: bool) -> Iterator[tuple[int, bytes]]:
        """(line number, raw line) of one NDJSON file, read in `chunk_size` pieces."""
        try:
            resp = self.client.get_url(f.url, accept=NDJSON, stream=True, with_auth=with_auth)
        except FhirAuthError:
            raise
        except FhirServerError as exc:
            gone = " (files expire; re-run the export)" if exc.status in (404, 410) else ""
            raise BulkExportError(
                f"Bulk export file {f.name} ({f.type}) could not be downloaded{gone}: {exc}",
                exc.status,
                exc.diagnostics,
            ) from exc
        try:
            # Split on b"\n" ourselves: line numbers stay exact whatever the chunk boundaries
            # (requests' iter_lines can emit spurious empty lines at them).
            pending: list[bytes] = []
            number = 0
            for chunk in resp.iter_content(chunk_size=self.chunk_size):
                if b"\n" not in chunk:
                    pending.append(chunk)
                    continue
                head, *middle, tail = chunk.split(b"\n")
                pending.append(head)
                for line in (b"".join(pending), *middle):
                    number += 1
                    yield number, line
                pending = [tail]
            last = b"".join(pending)
            if last:
                yield number + 1, last
        finally:
            resp.close()

    def _records(self, f: ManifestFile, with_auth: bool) -> Iterator[tuple[Resource | None, str]]:
        """(resource, "") or (None, "file:line: reason") for each non-blank line."""
        for number, raw in self._lines(f, with_auth):
            line = raw.strip()
            if not line:
                continue
            where = f"{f.name}:{number}"
            try:  # tolerant: BOM, 1e309/NaN (the resource is marked and skipped), lone surrogates
                data = jsonread.loads(line)
            except ValueError as exc:
                yield None, f"{where}: invalid JSON ({exc})"
                continue
            if not isinstance(data, dict):
                yield None, f"{where}: not a JSON object"
            elif not isinstance(data.get("resourceType"), str) or not data["resourceType"]:
                yield None, f"{where}: no resourceType"
            else:
                yield data, where

    def iter_resources(
        self, manifest: Manifest, *, types: Iterable[str] | None = None
    ) -> Iterator[BulkItem]:
        """Stream every ``output[]`` file (optionally only `types`), one resource at a time.

        Yields ``(resource_type, resource)`` or ``(None, "file:line: reason")`` for a line that is
        not JSON, not an object or has no ``resourceType``. Blank lines are ignored.

        Raises:
            BulkExportError: a file cannot be downloaded (e.g. expired: 404).
        """
        wanted = set(types) if types is not None else None
        for f in manifest.output:
            if wanted is not None and f.type not in wanted:
                continue
            for resource, where in self._records(f, manifest.requires_access_token):
                if resource is None:
                    yield None, where
                else:
                    yield resource["resourceType"], resource

    def error_messages(self, manifest: Manifest) -> list[str]:
        """One message per OperationOutcome issue in the ``error[]`` files, as
        ``"file:line: severity code: diagnostics"``. Never raises for a file it cannot read:
        that becomes a message too."""
        messages: list[str] = []
        for f in manifest.error:
            try:
                for resource, where in self._records(f, manifest.requires_access_token):
                    if resource is None:
                        messages.append(where)
                    elif resource.get("resourceType") == "OperationOutcome":
                        messages.extend(_outcome_messages(resource, where))
                    else:
                        messages.append(f"{where}: {resource['resourceType']} in an error file")
            except FhirServerError as exc:
                messages.append(f"{f.name}: error file could not be read: {exc}")
        return messages

    def iter_deleted(self, manifest: Manifest) -> Iterator[tuple[str, str] | tuple[None, str]]:
        """``(resource_type, id)`` for each DELETE entry of the ``deleted[]`` Bundles, or
        ``(None, "file:line: reason")``."""
        for f in manifest.deleted:
            for resource, where in self._records(f, manifest.requires_access_token):
                if resource is None:
                    yield None, where
                    continue
                if resource.get("resourceType") != "Bundle":
                    yield None, f"{where}: not a Bundle"
                    continue
                for entry in resource.get("entry") or ():
                    request = entry.get("request") if isinstance(entry, dict) else None
                    if not isinstance(request, dict):
                        request = {}
                    url, method = request.get("url"), str(request.get("method", ""))
                    if not isinstance(url, str) or method.upper() != "DELETE":
                        yield None, f"{where}: entry is not a DELETE request"
                        continue
                    parts = urlsplit(url).path.strip("/").split("/")
                    if len(parts) < 2 or not _RESOURCE_TYPE.match(parts[-2]):
                        yield None, f"{where}: DELETE url is not Type/id"
                        continue
                    yield parts[-2], parts[-1]

    # ----------------------------------------------------------------- all in one

    def run(
        self,
        *,
        group_id: str | None = None,
        system: bool = False,
        types: Sequence[str] | None = DEFAULT_EXPORT_TYPES,
        since: str | datetime | None = None,
        type_filters: Sequence[str] = (),
    ) -> tuple[Manifest, Iterator[BulkItem]]:
        """`kickoff` + `wait`; returns the manifest and a lazy `iter_resources` over it."""
        status_url = self.kickoff(
            group_id=group_id, system=system, types=types, since=since, type_filters=type_filters
        )
        manifest = self.wait(status_url)
        return manifest, self.iter_resources(manifest)
