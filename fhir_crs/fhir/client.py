"""FHIR R4 REST client: the one module that touches HTTP (and the only one importing `requests`).

Stage: FHIR server ⇄ `fhir/client` ⇄ pipeline. Everything here is dicts in, dicts out.

What it handles (see docs/fhir-ecosystem.md §1):

* Paging follows `Bundle.link[relation=next].url` as an opaque URL resolved against the request
  that returned it (HAPI answers `[base]?_getpages=<uuid>&_getpagesoffset=..`; other servers give
  host-relative links). It stops on a missing or repeated next link; more than `max_pages`
  pages is an error (never a silently truncated result).
* A 410 while paging (HAPI: `Search ID[..] does not exist and may have expired`) restarts the
  search once from page 1; results are de-duplicated on `resourceType/id`, highest
  `meta.versionId` wins.
* Retries with capped exponential backoff and full jitter on 429/502/503/504 (every method) and
  500 (GET only), honouring `Retry-After` (seconds or HTTP-date), within `total_time_cap`.
* Error statuses become the named exceptions of `fhir_crs.errors`, keeping the
  OperationOutcome diagnostics (`HAPI-NNNN: ...`), plus `PreconditionFailed`, `VersionConflict`
  and `ServerUnavailable` defined below.

* Origin policy (docs/SECURITY.md): every request goes through ONE check, `FhirClient._hop`.
  Requests to the FHIR server (searches, reads, writes, next links, Bulk kick-off and status)
  must stay on the base URL's origin (scheme, host, port) — also across redirects — or they are
  refused with `CrossOriginRefused`. `Authorization` is attached only on the base origin and on
  origins the user listed (`credential_origins`, the `bulk_file_origins` setting); Bulk files
  elsewhere are fetched without credentials, and a redirect to another origin drops them.
  Writes are never redirected. A non-loopback ``http://`` base is refused unless
  ``allow_insecure_http``; TLS is always verified (`ca_bundle`, else ``REQUESTS_CA_BUNDLE``).
* Caps: a response body larger than `max_response_bytes` (counted after Content-Encoding
  decoding) raises `ResponseTooLarge`, as does a search longer than `max_pages`; a transaction
  answered with entries that do not match what was sent raises `TransactionMismatch`.

Logging (`fhir_crs.fhir`, DEBUG) records method, URL path and query parameter *names* only:
query values can carry patient identifiers, and headers carry credentials.
"""

from __future__ import annotations

import email.utils
import html
import ipaddress
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, quote, urljoin, urlsplit

import orjson
import requests
import urllib3.exceptions

from .. import jsonread
from ..errors import (
    ConfigError,
    FhirAuthError,
    FhirNotFound,
    FhirOperationOutcome,
    FhirServerError,
)
from .auth import Auth

__all__ = [
    "CrossOriginRefused",
    "FhirClient",
    "Params",
    "PreconditionFailed",
    "ResponseTooLarge",
    "SearchIterator",
    "SearchResult",
    "ServerUnavailable",
    "TransactionMismatch",
    "VersionConflict",
    "WriteResult",
    "is_loopback",
    "origin",
    "require_secure_url",
]

log = logging.getLogger("fhir_crs.fhir")

FHIR_JSON = "application/fhir+json"
Resource = dict[str, Any]
Params = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]
# (status, returned resource or None for an empty body, ETag)
WriteResult = tuple[int, Resource | None, str | None]

RETRY_ANY_METHOD = frozenset({429, 502, 503, 504})
# A 500 on a write may have been applied before the server failed; only GET is safe to repeat.
RETRY_GET_ONLY = frozenset({500})
IDEMPOTENT_TRANSPORT = frozenset({"GET", "HEAD", "DELETE"})
MESSAGE_DIAGNOSTICS_MAX = 500
HTML_DIAGNOSTICS_MAX = 200
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PAGES = 10_000
READ_CHUNK = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}

_MULTIPLE_MATCHES = re.compile(
    r"multiple[\s-]+(resources?\s+)?match|matched\s+\d+\s+resources|more than one (resource|match)",
    re.IGNORECASE,
)
_VERSION_CONFLICT = re.compile(
    r"version\s*conflict|if-match|not the current version|HAPI-0989|version\s+mismatch",
    re.IGNORECASE,
)
_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")
_QUERY_IN_TEXT = re.compile(r"\?[^\s'\")]*")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>:\s*")


# --------------------------------------------------------------------------- errors


class PreconditionFailed(FhirOperationOutcome):
    """HTTP 412 on a conditional write. `multiple_matches` is True when the match URL hit 2+ resources
    (a data-quality problem the caller must surface; never retried)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        diagnostics: str | None = None,
        *,
        multiple_matches: bool = False,
    ) -> None:
        super().__init__(message, status, diagnostics)
        self.multiple_matches = multiple_matches


class VersionConflict(FhirOperationOutcome):
    """The resource changed under us: HAPI answers an If-Match mismatch with 409 (HAPI-0989), the spec,
    sekmet and Medplum with 412. The caller re-reads and re-applies."""


class ServerUnavailable(FhirServerError):
    """The server could not be reached (refused, timed out) or kept failing until retries or the
    time cap ran out."""


class CrossOriginRefused(FhirServerError):
    """A URL handed over by the server (next link, Content-Location, redirect, Bulk file) is on
    another origin than the one fhir-crs is allowed to call there; nothing was sent to it."""


class ResponseTooLarge(FhirServerError):
    """A response body or a search exceeded its cap (`max_response_bytes`, `max_pages`)."""


class TransactionMismatch(FhirServerError):
    """The server answered a transaction/batch with entries that do not match what was sent
    (count, resource type, id, identifier or subject): the answer is not trusted."""


# --------------------------------------------------------------------------- search results


@dataclass(slots=True)
class SearchResult:
    """All pages of one search. `matches` and `includes` are de-duplicated on `resourceType/id`."""

    matches: list[Resource] = field(default_factory=list)
    includes: list[Resource] = field(default_factory=list)
    outcomes: list[Resource] = field(default_factory=list)
    pages: int = 0
    restarted: bool = False
    total: int | None = None
    # issue 11: every match entry in page order, repeated copies of one Type/id included (the
    # grader keeps one version and names the others as skips), and (where, why) of each page
    # entry that held no resource — nothing a page sent is dropped silently.
    copies: list[Resource] = field(default_factory=list)
    unusable: list[tuple[str, str]] = field(default_factory=list)
    # the server's clock when it answered the first page: Bundle.meta.lastUpdated, else the HTTP
    # Date header (ISO instant, UTC); None when the server gave neither
    server_time: str | None = None


def _http_date(value: str) -> datetime | None:
    """An HTTP-date (`Date`, `Retry-After`) as an aware datetime (UTC when it names no zone);
    None when it is not one."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _server_time(bundle: Resource, resp: requests.Response | None) -> str | None:
    """When the server produced `bundle`, by its own clock (never the client's)."""
    meta = bundle.get("meta")
    stamp = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if isinstance(stamp, str) and stamp.strip():
        return stamp.strip()
    date = resp.headers.get("Date") if resp is not None else None
    when = _http_date(date) if date else None
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z") if when is not None else None


def _key(resource: Resource) -> str | None:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if isinstance(rtype, str) and isinstance(rid, str) and rid:
        return f"{rtype}/{rid}"
    return None


def _version(resource: Resource) -> str | None:
    meta = resource.get("meta")
    vid = meta.get("versionId") if isinstance(meta, dict) else None
    return vid if isinstance(vid, str) and vid else None


def _newer(new: str | None, old: str | None) -> bool:
    """True when `new` is a later version than `old` (numeric when both are, as HAPI's are)."""
    if new is None:
        return False
    if old is None:
        return True
    if new.isdigit() and old.isdigit():
        return int(new) > int(old)
    return new != old


class _Dedup:
    """Keeps one resource per `resourceType/id`, the highest `meta.versionId`, in first-seen order."""

    __slots__ = ("_by_key", "_unkeyed")

    def __init__(self) -> None:
        self._by_key: dict[str, Resource] = {}
        self._unkeyed: list[Resource] = []

    def add(self, resource: Resource) -> bool:
        """Store `resource`; True if it is new or a newer version than the one held."""
        key = _key(resource)
        if key is None:
            self._unkeyed.append(resource)
            return True
        held = self._by_key.get(key)
        if held is not None and not _newer(_version(resource), _version(held)):
            return False
        self._by_key[key] = resource
        return True

    def values(self) -> list[Resource]:
        return [*self._by_key.values(), *self._unkeyed]


class SearchIterator(Iterator[Resource]):
    """Lazily pages one search and yields its *match* resources, page by page.

    Included resources (`search.mode == "include"`, de-duplicated across pages) and outcome
    entries (`search.mode == "outcome"`, e.g. Epic warnings) are collected on the iterator as
    `includes` and `outcomes`; `pages`, `restarted` and `total` are filled in as pages arrive.
    Read them after (or during) iteration. A next link on another origin raises
    `CrossOriginRefused`; more than `max_pages` pages raise `ResponseTooLarge` (never a silently
    truncated result).

    A match is yielded once per `resourceType/id`. After a 410 restart a resource already yielded
    is yielded again only if its `meta.versionId` is newer, so callers keying on
    `resourceType/id` should let the later one win.
    """

    def __init__(
        self, client: FhirClient, url: str, params: list[tuple[str, str]], *, no_cache: bool,
        first_page: Resource | None = None,
    ) -> None:
        self._includes = _Dedup()
        self.outcomes: list[Resource] = []
        self.pages = 0
        self.restarted = False
        self.total: int | None = None
        self.server_time: str | None = None
        self._client = client
        self._url = url
        self._params = params
        self._no_cache = no_cache
        self._first_page = first_page
        self._versions: dict[str, str | None] = {}
        self.copies: list[Resource] = []
        self.unusable: list[tuple[str, str]] = []
        self._gen = self._run()

    @property
    def includes(self) -> list[Resource]:
        return self._includes.values()

    def __iter__(self) -> SearchIterator:
        return self

    def __next__(self) -> Resource:
        return next(self._gen)

    def _run(self) -> Iterator[Resource]:
        for bundle in self.bundles():
            yield from self._entries(bundle)

    def bundles(self) -> Iterator[Resource]:
        """The raw pages (Bundles) of the search, in order (history Bundles too: their entries
        keep `request`/`response`, DELETE entries have no resource). Paging rules as above."""
        client = self._client
        first_headers = {"Cache-Control": "no-cache"} if self._no_cache else {}
        resp: requests.Response | None
        if self._first_page is not None:  # the first page came inside a batch answer
            resp, bundle = None, self._first_page
        else:
            resp = client._send("GET", self._url, params=self._params, headers=first_headers)
            bundle = client._json(resp, "GET")
        page_url = (resp.url if resp is not None else None) or self._url
        followed: set[str] = set()
        while True:
            if bundle.get("resourceType") != "Bundle":
                raise FhirOperationOutcome(
                    f"GET {_path(page_url)} did not return a Bundle "
                    f"(got {bundle.get('resourceType')!r}).",
                    resp.status_code if resp is not None else None,
                )
            self.pages += 1
            if self.pages == 1:
                self.server_time = _server_time(bundle, resp)
            if self.total is None and isinstance(bundle.get("total"), int):
                self.total = bundle["total"]
            yield bundle

            nxt = _next_link(bundle)
            if nxt is None:
                return
            # Resolve against the URL that returned this page: HAPI gives "[base]?_getpages=..",
            # other servers host-relative "/fhir?_getpages=..".
            next_url = urljoin(page_url, nxt)
            if next_url in followed:
                # hapi-fhir#1300: the last page may still carry a next link (here: one we followed).
                log.debug("search stopped: next link repeats %s", _path(next_url))
                return
            if self.pages >= client.max_pages:
                raise ResponseTooLarge(
                    f"GET {_path(self._url)}: the search has more than {client.max_pages} pages "
                    "(max_pages); its results would be incomplete, so none are used — raise "
                    "max_pages if this search is expected to be that long."
                )
            followed.add(next_url)
            client.check_origin(next_url, "the search's next link")
            try:
                resp = client._send("GET", next_url)
            except FhirNotFound as exc:
                # HAPI expires stored search pages (default 1 h) with 410 Gone; restart from page 1
                # once. `no-cache` makes HAPI run the search afresh instead of reusing a cached one.
                if exc.status != 410 or self.restarted:
                    raise
                log.info("search page expired (410); restarting the search from page 1")
                self.restarted = True
                followed.clear()
                self.copies.clear()  # the search is read afresh from page 1
                self.unusable.clear()
                resp = client._send(
                    "GET", self._url, params=self._params, headers={"Cache-Control": "no-cache"}
                )
            bundle = client._json(resp, "GET")
            page_url = resp.url or next_url

    def _entries(self, bundle: Resource) -> list[Resource]:
        """Partition one page by `search.mode`; returns its new matches. The whole page is sorted
        before any match is yielded, so the page's includes are available alongside its matches."""
        new: list[Resource] = []
        for i, entry in enumerate(bundle.get("entry") or ()):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
                log.warning("search page entry without a resource ignored (fullUrl %s)", full_url)
                what = "not a JSON object" if not isinstance(entry, dict) else (
                    "resource is null" if "resource" in entry and resource is None else
                    "no resource" if resource is None else "resource is not a JSON object")
                where = full_url if isinstance(full_url, str) and full_url else f"page {self.pages}#entry[{i}]"
                self.unusable.append((where, f"search page entry without a resource: {what}"))
                continue
            search = entry.get("search")
            mode = search.get("mode") if isinstance(search, dict) else None
            if mode == "include":
                self._includes.add(resource)
            elif mode == "outcome":
                self.outcomes.append(resource)
            else:  # "match", or absent (the spec's default for searchset entries)
                self.copies.append(resource)
                key = _key(resource)
                if key is not None:
                    version = _version(resource)
                    if key in self._versions and not _newer(version, self._versions[key]):
                        continue
                    self._versions[key] = version
                new.append(resource)
        return new


def _next_link(bundle: Resource) -> str | None:
    for link in bundle.get("link") or ():
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            if isinstance(url, str) and url.strip():
                return url.strip()
    return None


# --------------------------------------------------------------------------- helpers


def _path(url: str) -> str:
    """The URL's path only: no host credentials, no query values (they can identify patients)."""
    return urlsplit(url).path or "/"


def origin(url: str) -> str:
    """``scheme://host:port`` of `url`, lower-cased, with the scheme's default port made explicit
    (so ``https://a`` and ``https://A:443/x`` are one origin). Unparseable → ``""``."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host:
        return ""
    port = port or DEFAULT_PORTS.get(scheme)
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}" if port else f"{scheme}://{shown}"


def is_loopback(url: str) -> bool:
    """True when `url`'s host is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    try:
        host = (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_secure_url(url: str, what: str, *, allow_insecure_http: bool = False) -> None:
    """Refuse a non-loopback ``http://`` URL (credentials and PHI would travel in clear text)
    unless the user allowed it; refuse user:password@ in a URL (secrets come from env/files)."""
    parts = urlsplit(url.strip())
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{what} must not carry user:password@ (credentials come from FHIR_CRS_TOKEN/"
            "FHIR_CRS_PASSWORD or a token/password file)."
        )
    if parts.scheme == "http" and not is_loopback(url) and not allow_insecure_http:
        raise ConfigError(
            f"{what} {origin(url)} uses http:// on a non-loopback address: tokens and patient data "
            "would cross the network unencrypted. Use https://, or pass --allow-insecure-http "
            "(allow_insecure_http = true) for a network you trust."
        )


def _param_names(url: str, params: list[tuple[str, str]] | None) -> str:
    names = [k for k, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)]
    names += [k for k, _ in params or ()]
    return ",".join(dict.fromkeys(names))


def _urlencode(params: list[tuple[str, str]]) -> str:
    # FHIR search values keep `|`, `,` and `:` readable (HAPI accepts them; tomcat relaxed-query-chars)
    return "&".join(f"{quote(k, safe='_:-.')}={quote(v, safe='|,:-._')}" for k, v in params)


def _normalise_params(params: Params | None) -> list[tuple[str, str]]:
    if params is None:
        return []
    if isinstance(params, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in params.items():
            if isinstance(v, str | int | float):
                out.append((k, str(v)))
            else:
                out.extend((k, str(x)) for x in v)
        return out
    return [(str(k), str(v)) for k, v in params]


def _one_line(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def _outcome_text(data: Any) -> tuple[str | None, tuple[str, ...]]:
    """(joined diagnostics, issue codes) from an OperationOutcome or OAuth-style error body."""
    if not isinstance(data, dict):
        return None, ()
    if data.get("resourceType") == "OperationOutcome":
        parts: list[str] = []
        codes: list[str] = []
        for issue in data.get("issue") or ():
            if not isinstance(issue, dict):
                continue
            if isinstance(issue.get("code"), str):
                codes.append(issue["code"])
            for text in (issue.get("diagnostics"), (issue.get("details") or {}).get("text")):
                if isinstance(text, str) and text.strip() and _one_line(text) not in parts:
                    parts.append(_one_line(text))
        return ("; ".join(parts) or None), tuple(codes)
    texts = [data.get(k) for k in ("error_description", "error", "message")]
    found = [_one_line(t) for t in texts if isinstance(t, str) and t.strip()]
    return (found[0] if found else None), ()


def _diagnostics(resp: requests.Response) -> tuple[str | None, tuple[str, ...]]:
    try:
        content = resp.content
    except requests.RequestException:
        return None, ()
    if not content:
        return None, ()
    try:
        return _outcome_text(orjson.loads(content))
    except orjson.JSONDecodeError:
        pass
    # Proxies (nginx 502/504) answer with HTML, not FHIR.
    text = _one_line(html.unescape(_TAGS.sub(" ", resp.text)))
    return (text[:HTML_DIAGNOSTICS_MAX] or None), ()


_LOCATION = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9.-]{1,64})(?:/_history/[^/]+)?/?$")


def _identifiers(resource: Resource) -> set[str]:
    out = set()
    for ident in resource.get("identifier") or ():
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            out.add(f"{ident.get('system') or ''}|{ident['value']}")
    return out


def _subject(resource: Resource) -> str | None:
    """The literal ``Type/id`` subject (or patient) reference; None for none, or for a
    ``urn:uuid:`` reference the server resolves inside the transaction."""
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            m = _LOCATION.search(urlsplit(ref["reference"]).path) if not ref["reference"].startswith("urn:") else None
            return f"{m[1]}/{m[2]}" if m else None
    return None


def _check_transaction_response(sent: Resource, got: Resource, base_origin: str) -> None:
    """Raise `TransactionMismatch` unless `got` answers `sent` entry by entry: same count, the
    right Bundle type, each entry's location/resource of the type (and id, identifiers, subject)
    that was sent, locations on the server's own origin. Batch entries may fail individually."""
    kind = sent.get("type")

    def mismatch(detail: str) -> TransactionMismatch:
        return TransactionMismatch(
            f"POST {kind}: the server's answer does not match what was sent ({detail}); it is not "
            "trusted and nothing is recorded as written — check the server (the write may or may "
            "not have been applied)."
        )

    if got.get("resourceType") != "Bundle" or got.get("type") != f"{kind}-response":
        raise mismatch(f"expected a {kind}-response Bundle, got {got.get('resourceType')} {got.get('type')}")
    sent_entries = [e for e in sent.get("entry") or () if isinstance(e, dict)]
    got_entries = got.get("entry") or []
    if len(got_entries) != len(sent_entries):
        raise mismatch(f"{len(sent_entries)} entries sent, {len(got_entries)} answered")
    for n, (out, back) in enumerate(zip(sent_entries, got_entries, strict=True), 1):
        request = out.get("request") if isinstance(out.get("request"), dict) else {}
        method = str(request.get("method", "")).upper()
        url = str(request.get("url", ""))
        path = url.split("?", 1)[0].strip("/")
        mine = out.get("resource") if isinstance(out.get("resource"), dict) else None
        rtype = mine.get("resourceType") if mine and method in ("POST", "PUT") else path.split("/", 1)[0]
        named_id = path.split("/", 1)[1] if "?" not in url and path.count("/") == 1 else None
        response = back.get("response") if isinstance(back, dict) else None
        if not isinstance(response, dict) or not isinstance(response.get("status"), str):
            raise mismatch(f"entry {n} has no response.status")
        if not response["status"].strip().startswith("2"):
            if kind == "transaction":
                raise mismatch(f"entry {n} answered {response['status']} in a committed transaction")
            continue
        loc_type = loc_id = None
        location = response.get("location")
        if isinstance(location, str) and location.strip():
            location = location.strip()
            if "://" in location and origin(location) != base_origin:
                raise mismatch(f"entry {n} location is on another origin ({origin(location)})")
            m = _LOCATION.search(urlsplit(location).path)
            if m is None:
                raise mismatch(f"entry {n} location {_path(location)} is not Type/id")
            loc_type, loc_id = m[1], m[2]
        theirs = back.get("resource") if isinstance(back.get("resource"), dict) else None
        if method in ("GET", "HEAD"):
            if theirs is not None:
                want = rtype if named_id else "Bundle"
                if theirs.get("resourceType") != want or (named_id and theirs.get("id") != named_id):
                    raise mismatch(f"entry {n}: asked for {path}, answered {_key(theirs) or theirs.get('resourceType')}")
            continue
        if loc_type is not None and loc_type != rtype:
            raise mismatch(f"entry {n}: sent {rtype}, answered {loc_type}/{loc_id}")
        if named_id is not None and loc_id is not None and loc_id != named_id:
            raise mismatch(f"entry {n}: sent {rtype}/{named_id}, answered {loc_type}/{loc_id}")
        if theirs is not None:
            if theirs.get("resourceType") != rtype or (loc_id and theirs.get("id") not in (None, loc_id)):
                raise mismatch(f"entry {n}: sent {rtype}, answered {_key(theirs) or theirs.get('resourceType')}")
            if mine is not None:
                if not _identifiers(mine) <= _identifiers(theirs):
                    raise mismatch(f"entry {n}: the answered {rtype} does not carry the identifier sent")
                if _subject(mine) and _subject(theirs) and _subject(mine) != _subject(theirs):
                    raise mismatch(f"entry {n}: the answered {rtype} belongs to another subject")
        elif method in ("POST", "PUT") and loc_id is None:
            raise mismatch(f"entry {n} ({rtype}) answered without a location or resource")


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """`Retry-After` in seconds, from delta-seconds or an HTTP-date (RFC 9110), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = _http_date(value)
    return max(0.0, when.timestamp() - now()) if when is not None else None


_TRANSPORT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


def _connected_never(exc: requests.RequestException) -> bool:
    """True when the request never reached the server (safe to resend whatever the method)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    never = urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
    return isinstance(reason, never)


def _transport_reason(exc: requests.RequestException) -> str:
    inner: Any = exc.args[0] if exc.args else exc
    inner = getattr(inner, "reason", None) or inner
    text = _OBJECT_REPR.sub("", str(inner)) or type(exc).__name__
    return _one_line(_QUERY_IN_TEXT.sub("", text))


def _verify_setting(ca_bundle: str | None) -> str | bool:
    """requests' `verify`: the configured CA bundle, else True (certifi, or REQUESTS_CA_BUNDLE /
    CURL_CA_BUNDLE from the environment). Never False."""
    if not ca_bundle:
        return True
    path = os.path.expanduser(ca_bundle)
    if not os.path.exists(path):
        raise ConfigError(f"ca_bundle {ca_bundle} does not exist (a PEM file or a c_rehash folder).")
    return path


def _no_netrc(r: requests.PreparedRequest) -> requests.PreparedRequest:
    # A truthy `auth` stops requests adding ~/.netrc credentials; all auth goes through `Auth`.
    return r


# --------------------------------------------------------------------------- client


class FhirClient:
    """A FHIR R4 REST client on one `requests.Session`.

    Args:
        base_url: service base, e.g. ``http://127.0.0.1:8080/fhir`` (no trailing ``/metadata``).
        auth: credentials (`NoAuth`, `BearerAuth`, `BasicAuth`, SMART); None sends no Authorization.
        timeout: seconds per HTTP request (connect and read).
        page_size: sent as ``_count`` on the first search request unless the caller passes
            ``_count``; None sends none. Servers may clamp it (HAPI starter: 200).
        max_retries: retries after the first attempt for retryable failures.
        backoff_base, backoff_cap: full-jitter backoff, ``uniform(0, min(cap, base * 2**n))``.
        total_time_cap: seconds one call may spend including waits; beyond it `ServerUnavailable`.
        max_pages: a search longer than this raises `ResponseTooLarge`.
        max_response_bytes: cap on one (non-streamed) response body, after decoding.
        allow_insecure_http: accept a non-loopback ``http://`` base URL (refused by default).
        ca_bundle: CA certificate file or folder for a private CA (default: certifi, or
            ``REQUESTS_CA_BUNDLE``). TLS verification cannot be turned off.
        credential_origins: further origins (``https://host[:port]``) that may receive this
            client's `Authorization` header, e.g. the Bulk file storage (`bulk_file_origins`).
        sleep: injectable for tests.

    Attributes:
        requests_made: HTTP requests attempted, including retries and 401 re-sends.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: Auth | None = None,
        timeout: float = 30.0,
        page_size: int | None = 200,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        total_time_cap: float = 600.0,
        max_pages: int = DEFAULT_MAX_PAGES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        allow_insecure_http: bool = False,
        ca_bundle: str | None = None,
        credential_origins: Iterable[str] = (),
        user_agent: str = "fhir-crs/0.1",
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                "FHIR base URL must be an absolute http(s) URL such as http://127.0.0.1:8080/fhir."
            )
        require_secure_url(base_url, "FHIR server", allow_insecure_http=allow_insecure_http)
        self.base_url = base_url.strip().rstrip("/")
        self.origin = origin(self.base_url)
        self.allow_insecure_http = allow_insecure_http
        extra = set()
        for item in credential_origins:
            o = origin(item)
            if not o or urlsplit(item.strip()).path.strip("/"):
                raise ConfigError(
                    f"bulk_file_origins: {item!r} is not an origin (scheme://host[:port], no path)."
                )
            require_secure_url(item, "bulk_file_origins entry", allow_insecure_http=allow_insecure_http)
            extra.add(o)
        self.credential_origins = frozenset({self.origin, *extra})
        self.verify: str | bool = _verify_setting(ca_bundle)
        self.max_response_bytes = max(1, int(max_response_bytes))
        self.auth = auth
        self.timeout = timeout
        self.page_size = page_size
        self.max_retries = max(0, max_retries)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.total_time_cap = total_time_cap
        self.max_pages = max(1, max_pages)
        self.user_agent = user_agent
        self.requests_made = 0
        # False once the server refused a batch of reads (`batch_get` then reads one by one)
        self.batch_supported = True
        self._owns_session = session is None
        self.session = session if session is not None else requests.Session()
        self._sleep = sleep
        self._rng = random.Random()
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        self._base_display = f"{parts.scheme}://{host}{parts.path.rstrip('/')}"

    def __repr__(self) -> str:
        return f"FhirClient({self._base_display!r}, auth={self.auth!r})"

    def close(self) -> None:
        if self._owns_session:
            self.session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- public API

    def capabilities(self) -> Resource:
        """GET [base]/metadata (the CapabilityStatement)."""
        return self._json(self._send("GET", self._url("metadata")), "GET")

    def read(self, type_: str, id_: str) -> Resource:
        """GET [base]/Type/id. Raises `FhirNotFound` on 404/410."""
        return self.read_with_version(type_, id_)[0]

    def read_with_version(self, type_: str, id_: str) -> tuple[Resource, str | None]:
        """GET [base]/Type/id; returns the resource and its ETag (``W/"n"``, for If-Match)."""
        if not type_ or not id_:
            raise ValueError("read needs a resource type and an id")
        resp = self._send("GET", self._url(f"{quote(type_, safe='')}/{quote(id_, safe='')}"))
        return self._json(resp, "GET"), resp.headers.get("ETag")

    def search_iter(
        self, type_: str, params: Params | None = None, *, no_cache: bool = False
    ) -> SearchIterator:
        """Lazily page ``GET [base]/type_?params``, yielding match resources.

        `type_` may also be a path such as ``Patient/123/$everything``. Includes, outcomes and
        paging facts are attributes of the returned `SearchIterator`. ``no_cache=True`` sends
        ``Cache-Control: no-cache`` (HAPI reuses identical searches for 60 s; use after a write).
        """
        query = _normalise_params(params)
        if self.page_size and not any(k == "_count" for k, _ in query):
            query.append(("_count", str(self.page_size)))
        return SearchIterator(self, self._url(type_), query, no_cache=no_cache)

    def search(
        self, type_: str, params: Params | None = None, *, no_cache: bool = False
    ) -> SearchResult:
        """All pages of a search, partitioned by `search.mode` and de-duplicated (see `search_iter`)."""
        it = self.search_iter(type_, params, no_cache=no_cache)
        matches = _Dedup()
        for resource in it:
            matches.add(resource)
        return SearchResult(
            matches=matches.values(),
            includes=it.includes,
            outcomes=it.outcomes,
            pages=it.pages,
            restarted=it.restarted,
            total=it.total,
            server_time=it.server_time,
            copies=it.copies,
            unusable=it.unusable,
        )

    def history_iter(self, type_: str, since: str, *, page_size: int | None = None) -> SearchIterator:
        """``GET [base]/type_/_history?_since=since`` (type-level history: creates, updates and
        deletes after `since`, by the server's clock). Iterate ``.bundles()`` for the raw pages:
        DELETE entries carry ``request.method == "DELETE"`` and no resource."""
        query = [("_since", since)]
        if page_size or self.page_size:
            query.append(("_count", str(page_size or self.page_size)))
        return SearchIterator(self, self._url(f"{quote(type_, safe='')}/_history"), query, no_cache=True)

    def batch_get(
        self, requests_: Sequence[tuple[str, Params | None]], *, no_cache: bool = True
    ) -> list[Resource | SearchResult]:
        """Several reads and searches in ONE ``batch`` Bundle (``POST [base]``), each answered
        like its own call: ``("Patient/123", None)`` gives the resource (`FhirNotFound` on a 404 /
        410 entry), ``("Observation", params)`` a `SearchResult` whose further pages are followed
        by their next links as usual. A server that refuses batches (4xx/5xx on the POST, or
        ``batch_supported = False``) gets the calls one by one; `batch_supported` remembers that.
        ``no_cache`` sends ``Cache-Control: no-cache`` with the batch (HAPI answered entries of a
        batch sent right after a write with the new data: tests/test_sync.py)."""
        items = [(path, _normalise_params(params) if params is not None else None) for path, params in requests_]
        if not items:
            return []
        if len(items) == 1 or not self.batch_supported:
            return [self._one(path, params, no_cache) for path, params in items]
        entries = []
        for path, params in items:
            if params is not None and self.page_size and not any(k == "_count" for k, _ in params):
                params = [*params, ("_count", str(self.page_size))]
            url = path if params is None else f"{path}?{_urlencode(params)}"
            entries.append({"request": {"method": "GET", "url": url}})
            # like every request: the path and the parameter *names* only
            log.debug("  batch entry GET %s params=%s", _path(self._url(path)), ",".join(dict.fromkeys(k for k, _ in params or ())))
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        try:
            resp = self._send("POST", self._url(""), body=orjson.dumps(bundle),
                              headers={"Cache-Control": "no-cache"} if no_cache else {})
            answer = self._json(resp, "POST")
            _check_transaction_response(bundle, answer, self.origin)
        except (FhirNotFound, FhirOperationOutcome, TransactionMismatch) as exc:
            log.debug("batch of reads refused (%s); reading one by one from now on", exc)
            self.batch_supported = False
            return [self._one(path, params, no_cache) for path, params in items]
        out: list[Resource | SearchResult] = []
        for (path, params), entry in zip(items, answer.get("entry") or [], strict=True):
            out.append(self._batch_entry(path, params, entry, no_cache))
        return out

    def _one(self, path: str, params: list[tuple[str, str]] | None, no_cache: bool) -> Resource | SearchResult:
        if params is None:
            type_, _, id_ = path.partition("/")
            return self.read(type_, id_)
        return self.search(path, params, no_cache=no_cache)

    def _batch_entry(self, path: str, params: list[tuple[str, str]] | None, entry: Resource,
                     no_cache: bool) -> Resource | SearchResult:
        response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
        status_text = str(response.get("status", "")).strip()
        code = int(status_text[:3]) if status_text[:3].isdigit() else 0
        resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else None
        if not 200 <= code < 300 or resource is None:
            diag, _codes = _outcome_text(response.get("outcome") or (resource if resource and resource.get("resourceType") == "OperationOutcome" else None))
            message = f"GET {_path(self._url(path))} (in a batch) failed: HTTP {status_text or 'without status'}" + (f": {diag}" if diag else "")
            if code in (404, 410):
                raise FhirNotFound(message, code, diag)
            if code in (401, 403):
                raise FhirAuthError(message, code, diag)
            if code in RETRY_ANY_METHOD or code == 500:  # the server was busy for that entry: ask it alone
                return self._one(path, params, no_cache)
            raise FhirOperationOutcome(message, code or None, diag)
        if params is None:
            return resource
        query = list(params)
        if self.page_size and not any(k == "_count" for k, _ in query):
            query.append(("_count", str(self.page_size)))
        it = SearchIterator(self, self._url(path), query, no_cache=no_cache, first_page=resource)
        matches = _Dedup()
        for r in it:
            matches.add(r)
        return SearchResult(matches=matches.values(), includes=it.includes, outcomes=it.outcomes, pages=it.pages,
                            restarted=it.restarted, total=it.total, server_time=it.server_time,
                            copies=it.copies, unusable=it.unusable)

    def transaction(self, bundle: Resource) -> Resource:
        """POST [base] with a transaction (or batch) Bundle; returns the response Bundle.

        The answer must match what was sent, entry by entry (`TransactionMismatch` otherwise):
        a server that answers with someone else's resources is not believed."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
            raise ValueError("transaction() needs a Bundle of type 'transaction' or 'batch'")
        status, body, _ = self._write("POST", "", bundle, {})
        if body is None:
            raise FhirOperationOutcome(
                f"POST {_path(self.base_url)} returned HTTP {status} with no Bundle.", status
            )
        _check_transaction_response(bundle, body, self.origin)
        return body

    def put(self, path: str, resource: Resource, *, if_match: str | None = None) -> WriteResult:
        """PUT [base]/path, e.g. ``Condition/crs-1`` or conditional ``Condition?identifier=sys|val``.

        Returns (status, returned resource or None, ETag). 412/409 raise `PreconditionFailed` /
        `VersionConflict` and are never retried.
        """
        return self._write("PUT", path, resource, {"If-Match": if_match} if if_match else {})

    def post(
        self, path: str, resource: Resource, *, if_none_exist: str | None = None
    ) -> WriteResult:
        """POST [base]/path (create). With `if_none_exist` (e.g. ``identifier=sys|val``) an existing
        match gives 200 and nothing is written; 2+ matches raise `PreconditionFailed`."""
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        return self._write("POST", path, resource, headers)

    def get_url(
        self,
        url: str,
        *,
        accept: str = FHIR_JSON,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
        with_auth: bool = True,
        foreign: bool = False,
        what: str | None = None,
    ) -> requests.Response:
        """GET an absolute URL (or one relative to the base), with retries and error mapping.

        For Bulk Data: kick-off (pass ``headers={"Prefer": "respond-async"}``), status polling
        (202 is returned, not raised) and NDJSON files (``stream=True``,
        ``accept="application/fhir+ndjson"``, ``foreign=True``: they may live on another origin,
        see `_hop`). ``with_auth=False`` for files whose manifest says
        ``requiresAccessToken: false`` (pre-signed storage URLs reject a second credential).
        `what` names the URL in a refusal message.
        """
        hdrs = {"Accept": accept, **(headers or {})}
        return self._send(
            "GET",
            self._absolute(url),
            headers=hdrs,
            stream=stream,
            with_auth=with_auth,
            foreign=foreign,
            what=what,
        )

    def delete_url(self, url: str) -> int:
        """DELETE an absolute (or base-relative) URL, e.g. a Bulk status URL; returns the status."""
        resp = self._send("DELETE", self._absolute(url))
        resp.close()
        return resp.status_code

    def get_json_url(self, url: str, *, with_auth: bool = True) -> Resource:
        """GET an absolute (or base-relative) URL answering a JSON object, e.g. SMART discovery
        (``[base]/.well-known/smart-configuration``, fetched with ``with_auth=False``)."""
        return self._json(self.get_url(url, accept="application/json", with_auth=with_auth), "GET")

    def post_form(self, url: str, data: Mapping[str, str]) -> tuple[int, Resource | None]:
        """POST ``application/x-www-form-urlencoded`` to an absolute URL (an OAuth token endpoint).

        Sent once, without this client's credentials, and never retried: a SMART token request
        carries a one-time ``jti``, so a resend must be a newly minted assertion. Error statuses are
        returned, not raised. Returns (status, the JSON object body or None).
        """
        target = self._absolute(url)
        require_secure_url(target, "SMART token endpoint", allow_insecure_http=self.allow_insecure_http)
        hdrs = {"Accept": "application/json", "User-Agent": self.user_agent}
        log.debug("POST %s (form) params=%s", _path(target), ",".join(data))
        self.requests_made += 1
        try:
            # Never redirected: a 307 would resend the signed assertion to wherever it points.
            resp = self.session.request(
                "POST",
                target,
                data=dict(data),
                headers=hdrs,
                timeout=self.timeout,
                auth=_no_netrc,
                stream=True,
                allow_redirects=False,
                verify=self.verify,
            )
            self._read_capped(resp, "POST", target)
        except _TRANSPORT_ERRORS as exc:
            raise ServerUnavailable(
                f"cannot reach token endpoint at {self._where(target)}: POST {_path(target)}: "
                f"{_transport_reason(exc)}."
            ) from exc
        try:
            body = orjson.loads(resp.content) if resp.content.strip() else None
        except orjson.JSONDecodeError:
            body = None
        return resp.status_code, body if isinstance(body, dict) else None

    # ----------------------------------------------------------------- internals

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url

    def _absolute(self, url: str) -> str:
        return urljoin(self.base_url + "/", url)

    def _write(
        self, method: str, path: str, resource: Resource, headers: dict[str, str]
    ) -> WriteResult:
        resp = self._send(method, self._url(path), body=orjson.dumps(resource), headers=headers)
        body = self._json(resp, method) if resp.content.strip() else None
        return resp.status_code, body, resp.headers.get("ETag")

    def _json(self, resp: requests.Response, method: str) -> Resource:
        try:  # tolerant: one resource with 1e309 or a lone surrogate must not lose its page
            data = jsonread.loads(resp.content)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            ctype = resp.headers.get("Content-Type", "no content type")
            raise FhirOperationOutcome(
                f"{method} {_path(resp.url or '')} returned HTTP {resp.status_code} with a body that is "
                f"not FHIR JSON ({ctype}).",
                resp.status_code,
            )
        return data

    def _where(self, url: str) -> str:
        return self._base_display if url.startswith(self.base_url) else origin(url)

    def _backoff(self, retry: int) -> float:
        return self._rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * (2**retry)))

    def check_origin(self, url: str, what: str) -> None:
        """Raise `CrossOriginRefused` unless `url` is on the FHIR base URL's origin (for URLs the
        server hands over: next links, Bulk status URLs)."""
        self._hop(url, with_auth=False, foreign=False, redirected=False, what=what)

    def _hop(self, url: str, *, with_auth: bool, foreign: bool, redirected: bool, what: str) -> bool:
        """THE origin policy, applied to every request and to every redirect hop; returns whether
        this hop carries the client's credentials.

        * ``foreign=False`` (the FHIR API: searches, next links, reads, writes, Bulk kick-off and
          status): the hop must be on the base origin, else `CrossOriginRefused` — nothing is
          sent to another origin, so a hostile page cannot point the client at internal hosts.
        * ``foreign=True`` (Bulk output files, which may live on storage elsewhere): any origin,
          but credentials only on the base origin and the listed `credential_origins`; a file
          that needs them on an unlisted origin is refused, a redirect elsewhere drops them,
          and plain http is refused off loopback (unless ``allow_insecure_http``).
        """
        where = origin(url)
        if not foreign:
            if where != self.origin:
                raise CrossOriginRefused(
                    f"{what} points at another origin ({where or 'an unparseable URL'}) than the FHIR "
                    f"server ({self.origin}); refused, nothing was sent there: a FHIR server's own "
                    "pages, status URLs and redirects stay on its origin (if the server is reachable "
                    "under that address, configure that as the server URL)."
                )
            return with_auth
        if urlsplit(url).scheme != "https" and not is_loopback(url) and not self.allow_insecure_http:
            raise CrossOriginRefused(
                f"{what} is on plain http ({where}) off loopback; refused (--allow-insecure-http "
                "to accept)."
            )
        trusted = where in self.credential_origins
        if with_auth and not trusted and not redirected:
            raise CrossOriginRefused(
                f"{what} is on another origin ({where}) and needs the access token "
                "(requiresAccessToken: true); refused, the token is sent only to the FHIR server "
                f"({self.origin}) and the origins listed in bulk_file_origins."
            )
        return with_auth and trusted

    def _read_capped(self, resp: requests.Response, method: str, url: str) -> None:
        """Load the body of a streamed response, refusing more than `max_response_bytes` (counted
        after Content-Encoding decoding, so a gzip bomb stops at the cap too)."""
        cap = self.max_response_bytes
        declared = resp.headers.get("Content-Length", "")
        too_big = ResponseTooLarge(
            f"{method} {_path(url)}: the response is larger than {cap:,} bytes "
            "(max_response_mb); refused."
        )
        if declared.isdigit() and int(declared) > cap:
            resp.close()
            raise too_big
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in resp.iter_content(READ_CHUNK):
                size += len(chunk)
                if size > cap:
                    raise too_big
                chunks.append(chunk)
        finally:
            resp.close()
        resp._content = b"".join(chunks)
        resp._content_consumed = True

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        with_auth: bool = True,
        foreign: bool = False,
        what: str | None = None,
    ) -> requests.Response:
        """Send one logical request: origin policy, redirects, retries, Retry-After, 401 refresh,
        body cap, status → exception."""
        start = time.monotonic()
        slept = 0.0
        retry = 0
        refreshed = False
        names = _param_names(url, params)
        current, current_params, hops = url, params, 0
        label = what or f"{method} {_path(url)}"

        def wait_or_give_up(delay: float, failure: str, status: int | None, diag: str | None) -> None:
            nonlocal slept, retry
            # `sleep` may be injected (no real wait); counting requested waits keeps the cap honest.
            elapsed = max(time.monotonic() - start, slept)
            if retry >= self.max_retries or elapsed + delay > self.total_time_cap:
                why = (
                    f"gave up after {retry + 1} attempts"
                    if retry >= self.max_retries
                    else f"gave up after {elapsed:.0f}s (next wait {delay:.0f}s exceeds the "
                    f"{self.total_time_cap:.0f}s cap)"
                )
                raise ServerUnavailable(f"{failure} ({why}).", status, diag)
            log.info("%s %s: %s; retrying in %.1fs", method, _path(url), failure, delay)
            self._sleep(delay)
            slept += delay
            retry += 1

        while True:
            hdrs: dict[str, str] = {"Accept": FHIR_JSON, "User-Agent": self.user_agent}
            if body is not None:
                hdrs["Content-Type"] = FHIR_JSON
            hdrs.update(headers or {})
            credentials = self._hop(
                current, with_auth=with_auth, foreign=foreign, redirected=hops > 0, what=label
            )
            if credentials and self.auth is not None:
                self.auth.apply(hdrs)
            else:
                hdrs.pop("Authorization", None)
            log.debug("%s %s params=%s", method, _path(current), names)
            remaining = self.total_time_cap - max(time.monotonic() - start, slept)
            self.requests_made += 1
            try:
                resp = self.session.request(
                    method,
                    current,
                    params=current_params,
                    data=body,
                    headers=hdrs,
                    timeout=min(self.timeout, max(remaining, 1.0)),
                    stream=True,
                    allow_redirects=False,
                    verify=self.verify,
                    auth=_no_netrc,
                )
                if resp.status_code not in REDIRECT_STATUSES and (not stream or resp.status_code >= 400):
                    self._read_capped(resp, method, current)
            except _TRANSPORT_ERRORS as exc:
                reason = _transport_reason(exc)
                if isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectTimeout):
                    reason = f"no answer within {self.timeout:g}s"
                where = self._where(current)
                failure = f"cannot reach FHIR server at {where}: {method} {_path(current)}: {reason}"
                if method not in IDEMPOTENT_TRANSPORT and not _connected_never(exc):
                    # The write may have reached the server; leave the decision to the caller.
                    raise ServerUnavailable(failure + ".") from exc
                wait_or_give_up(self._backoff(retry), failure, None, None)
                continue

            status = resp.status_code
            location = resp.headers.get("Location")
            if status in REDIRECT_STATUSES and location:
                resp.close()
                target = urljoin(resp.url or current, location.strip())
                if body is not None:
                    raise CrossOriginRefused(
                        f"{method} {_path(current)} answered HTTP {status} (redirect to "
                        f"{origin(target)}{_path(target)}); writes are never redirected (the body "
                        "holds patient data) — configure the server URL it points at."
                    )
                if hops >= MAX_REDIRECTS:
                    raise FhirOperationOutcome(
                        f"{method} {_path(url)}: more than {MAX_REDIRECTS} redirects.", status
                    )
                log.debug("%s %s: HTTP %d redirect to %s", method, _path(current), status, _path(target))
                current, current_params, hops = target, None, hops + 1
                label = f"a redirect of {what or f'{method} {_path(url)}'}"
                continue
            if status == 401 and credentials and self.auth is not None and not refreshed:
                refreshed = True
                if self.auth.on_unauthorized():
                    log.info("%s %s: 401, credentials refreshed; resending once", method, _path(current))
                    resp.close()
                    continue
            if status < 400:
                return resp

            retryable = status in RETRY_ANY_METHOD or (status in RETRY_GET_ONLY and method == "GET")
            if not retryable:
                raise self._error(method, current, resp)
            diag, _ = _diagnostics(resp)
            failure = _message(method, current, resp, diag)
            resp.close()
            delay = retry_after_seconds(resp.headers.get("Retry-After"))
            wait_or_give_up(self._backoff(retry) if delay is None else delay, failure, status, diag)

    def _error(self, method: str, url: str, resp: requests.Response) -> FhirServerError:
        status = resp.status_code
        diag, codes = _diagnostics(resp)
        resp.close()
        message = _message(method, url, resp, diag)
        if status in (404, 410):
            return FhirNotFound(message, status, diag)
        if status in (401, 403):
            if status == 403 and diag and "bearer token" in diag.lower():
                message += (
                    " (the public HAPI sandbox rejects any Authorization header; use no auth there)"
                )
            return FhirAuthError(message, status, diag)
        if status == 409:
            # HAPI raises ResourceVersionConflictException (409) for If-Match mismatches (HAPI-0989)
            # and for concurrent writes.
            return VersionConflict(message, status, diag)
        if status == 412:
            text = diag or ""
            multiple = "multiple-matches" in codes or bool(_MULTIPLE_MATCHES.search(text))
            if not multiple and _VERSION_CONFLICT.search(text):
                return VersionConflict(message, status, diag)
            return PreconditionFailed(message, status, diag, multiple_matches=multiple)
        return FhirOperationOutcome(message, status, diag)


def _standard_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _message(method: str, url: str, resp: requests.Response, diag: str | None) -> str:
    # HAPI's Tomcat sends no reason phrase (HTTP/1.1 404); fall back to the standard one.
    phrase = resp.reason or _standard_phrase(resp.status_code)
    reason = f" {phrase}" if phrase else ""
    head = f"{method} {_path(url)} failed: HTTP {resp.status_code}{reason}"
    if not diag:
        return head
    if len(diag) > MESSAGE_DIAGNOSTICS_MAX:
        diag = diag[:MESSAGE_DIAGNOSTICS_MAX] + "…"
    return f"{head}: {diag}"
