"""FhirClient against `responses` mocks: paging, retries, status → error mapping, auth, headers.

No real network: every URL is on 127.0.0.1 and answered by `responses` (one test connects to a
closed local port to check a real "connection refused").
"""

from __future__ import annotations

import email.utils
import logging
import socket
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
import urllib3.exceptions
from responses import matchers

from fhir_crs.errors import FhirAuthError, FhirNotFound, FhirOperationOutcome, FhirServerError
from fhir_crs.fhir import (
    BasicAuth,
    BearerAuth,
    FhirClient,
    NoAuth,
    PreconditionFailed,
    ResponseTooLarge,
    SearchIterator,
    ServerUnavailable,
    VersionConflict,
)

BASE = "http://127.0.0.1:8080/fhir"
OBS = f"{BASE}/Observation"
TOKEN = "s3cr3t-token-value"
NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n"
)


# ----------------------------------------------------------------------------- builders


def res(id_: str, version: str = "1", type_: str = "Observation") -> dict[str, Any]:
    return {"resourceType": type_, "id": id_, "meta": {"versionId": version}}


def entry(resource: dict[str, Any], mode: str | None = "match") -> dict[str, Any]:
    e: dict[str, Any] = {"fullUrl": f"{BASE}/{resource['resourceType']}/{resource.get('id')}", "resource": resource}
    if mode is not None:
        e["search"] = {"mode": mode}
    return e


def page(*entries: dict[str, Any], next_: str | None = None, total: int | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "self", "url": OBS}]}
    if total is not None:
        b["total"] = total
    if next_ is not None:
        b["link"].append({"relation": "next", "url": next_})
    if entries:
        b["entry"] = list(entries)
    return b


def matches(*ids: str) -> list[dict[str, Any]]:
    return [entry(res(i)) for i in ids]


def outcome(diagnostics: str | None, code: str = "processing") -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "error", "code": code}
    if diagnostics is not None:
        issue["diagnostics"] = diagnostics
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def ids(resources: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in resources]


def query(call: Any) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(call.request.url).query, keep_blank_values=True)


@pytest.fixture
def mock():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as m:
        yield m


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sleeps: list[float]) -> FhirClient:
    return FhirClient(BASE, sleep=sleeps.append)


# ----------------------------------------------------------------------------- paging


HAPI_NEXT = f"{BASE}?_getpages=0b086d58-ede4&_getpagesoffset=2&_count=2&_pretty=true&_bundletype=searchset"


@pytest.mark.parametrize(
    ("next_link", "second_url"),
    [
        pytest.param(f"{OBS}?page=2", f"{OBS}?page=2", id="absolute"),
        pytest.param(HAPI_NEXT, HAPI_NEXT, id="hapi-getpages-at-base"),
        pytest.param("/fhir?_getpages=abc&_getpagesoffset=2", f"{BASE}?_getpages=abc&_getpagesoffset=2", id="host-relative"),
        pytest.param("?_getpages=abc", f"{OBS}?_getpages=abc", id="query-relative"),
    ],
)
def test_two_page_search_follows_next_link_verbatim(mock, client, next_link: str, second_url: str) -> None:
    mock.get(OBS, json=page(*matches("a", "b"), next_=next_link, total=3))
    mock.get(second_url, json=page(*matches("c")))
    result = client.search("Observation", [("patient", "p1")])
    assert ids(result.matches) == ["a", "b", "c"]
    assert (result.pages, result.restarted, result.total) == (2, False, 3)
    assert query(mock.calls[0]) == [("patient", "p1"), ("_count", "200")]
    assert mock.calls[1].request.url == second_url
    assert client.requests_made == 2


def test_repeated_next_url_stops_the_loop(mock, client) -> None:
    # hapi-fhir#1300: the last page still points at itself.
    mock.get(OBS, json=page(*matches("a"), next_=f"{OBS}?page=2"))
    mock.get(f"{OBS}?page=2", json=page(*matches("b"), next_=f"{OBS}?page=2"))
    result = client.search("Observation", {"patient": "p1"})
    assert ids(result.matches) == ["a", "b"]
    assert len(mock.calls) == 2


def test_empty_middle_page_is_followed(mock, client) -> None:
    mock.get(OBS, json=page(*matches("a"), next_=f"{OBS}?page=2"))
    mock.get(f"{OBS}?page=2", json=page(next_=f"{OBS}?page=3"))
    mock.get(f"{OBS}?page=3", json=page(*matches("b")))
    result = client.search("Observation", {})
    assert ids(result.matches) == ["a", "b"]
    assert result.pages == 3


def test_count_clamped_by_server_is_tolerated(mock, sleeps) -> None:
    client = FhirClient(BASE, page_size=1000, sleep=sleeps.append)
    first = [f"o{i}" for i in range(200)]
    mock.get(OBS, json=page(*matches(*first), next_=f"{BASE}?_getpages=x&_getpagesoffset=200&_count=200"))
    mock.get(f"{BASE}?_getpages=x&_getpagesoffset=200&_count=200", json=page(*matches("last")))
    result = client.search("Observation", {"patient": "p1"})
    assert len(result.matches) == 201
    assert ("_count", "1000") in query(mock.calls[0])


def test_max_pages_is_an_error_not_a_truncated_result(mock, sleeps) -> None:
    client = FhirClient(BASE, max_pages=3, sleep=sleeps.append)
    mock.get(OBS, json=page(*matches("a"), next_=f"{OBS}?p=2"))
    mock.get(f"{OBS}?p=2", json=page(*matches("b"), next_=f"{OBS}?p=3"))
    mock.get(f"{OBS}?p=3", json=page(*matches("c"), next_=f"{OBS}?p=4"))
    with pytest.raises(ResponseTooLarge, match="more than 3 pages"):
        client.search("Observation", {})
    assert len(mock.calls) == 3


def test_search_mode_partition_and_include_dedup(mock, client) -> None:
    patient = res("p1", type_="Patient")
    warning = outcome("Epic: some results were filtered", code="informational")
    mock.get(OBS, json=page(entry(res("a")), entry(patient, "include"), entry(warning, "outcome"), next_=f"{OBS}?p=2"))
    mock.get(f"{OBS}?p=2", json=page(entry(res("b"), mode=None), entry(patient, "include")))
    result = client.search("Observation", [("_include", "Observation:patient")])
    assert ids(result.matches) == ["a", "b"]
    assert ids(result.includes) == ["p1"]
    assert result.outcomes == [warning]


def test_search_iter_is_lazy_and_exposes_includes(mock, client) -> None:
    mock.get(OBS, json=page(entry(res("a")), entry(res("m", type_="Medication"), "include"), next_=f"{OBS}?p=2"))
    mock.get(f"{OBS}?p=2", json=page(entry(res("b"))))
    it = client.search_iter("Observation", {"patient": "p1"})
    assert isinstance(it, SearchIterator)
    assert len(mock.calls) == 0
    assert next(it)["id"] == "a"
    assert (len(mock.calls), it.pages, ids(it.includes)) == (1, 1, ["m"])
    assert [r["id"] for r in it] == ["b"]
    assert it.pages == 2


def test_410_mid_paging_restarts_once_and_keeps_highest_version(mock, client) -> None:
    gone = outcome("HAPI-0417: Search ID[0b08] does not exist and may have expired")
    mock.get(OBS, json=page(entry(res("a", "1")), entry(res("b", "1")), next_=f"{BASE}?_getpages=old"))
    mock.get(f"{BASE}?_getpages=old", status=410, json=gone)
    mock.get(OBS, json=page(entry(res("a", "2")), entry(res("b", "1")), next_=f"{BASE}?_getpages=new"))
    mock.get(f"{BASE}?_getpages=new", json=page(entry(res("c", "1"))))
    result = client.search("Observation", {"patient": "p1"})
    assert result.restarted
    assert [(r["id"], r["meta"]["versionId"]) for r in result.matches] == [("a", "2"), ("b", "1"), ("c", "1")]
    assert result.pages == 3
    # the restart bypasses HAPI's search cache
    assert mock.calls[2].request.headers["Cache-Control"] == "no-cache"
    assert "Cache-Control" not in mock.calls[0].request.headers


def test_410_mid_paging_iterator_reyields_only_newer_versions(mock, client) -> None:
    mock.get(OBS, json=page(entry(res("a", "1")), entry(res("b", "1")), next_=f"{BASE}?_getpages=old"))
    mock.get(f"{BASE}?_getpages=old", status=410, json=outcome("Search ID[old] does not exist"))
    mock.get(OBS, json=page(entry(res("a", "2")), entry(res("b", "1"))))
    got = [(r["id"], r["meta"]["versionId"]) for r in client.search_iter("Observation", {})]
    assert got == [("a", "1"), ("b", "1"), ("a", "2")]


def test_second_410_raises(mock, client) -> None:
    mock.get(OBS, json=page(*matches("a"), next_=f"{BASE}?_getpages=one"))
    mock.get(f"{BASE}?_getpages=one", status=410, json=outcome("Search ID[one] does not exist and may have expired"))
    mock.get(OBS, json=page(*matches("a"), next_=f"{BASE}?_getpages=two"))
    mock.get(f"{BASE}?_getpages=two", status=410, json=outcome("Search ID[two] does not exist and may have expired"))
    with pytest.raises(FhirNotFound) as err:
        client.search("Observation", {})
    assert err.value.status == 410
    assert "Search ID[two]" in str(err.value)


def test_search_page_that_is_not_a_bundle_is_an_error(mock, client) -> None:
    mock.get(OBS, body="<html>login</html>", content_type="text/html")
    with pytest.raises(FhirOperationOutcome, match="not FHIR JSON"):
        client.search("Observation", {})


# ----------------------------------------------------------------------------- parameters, headers


def test_params_repeatable_keys_and_no_invented_parameters(mock, sleeps) -> None:
    client = FhirClient(BASE, page_size=None, sleep=sleeps.append)
    mock.get(OBS, json=page())
    client.search("Observation", [("patient", "p1"), ("date", "ge2024-01-01"), ("date", "lt2024-02-01")])
    assert query(mock.calls[0]) == [("patient", "p1"), ("date", "ge2024-01-01"), ("date", "lt2024-02-01")]


def test_caller_count_wins_and_dict_list_values(mock, client) -> None:
    mock.get(OBS, json=page())
    client.search("Observation", {"date": ["ge2024-01-01", "lt2024-02-01"], "_count": "50"})
    assert query(mock.calls[0]) == [("date", "ge2024-01-01"), ("date", "lt2024-02-01"), ("_count", "50")]


def test_no_cache_and_default_headers(mock, client) -> None:
    mock.get(
        OBS,
        json=page(),
        match=[matchers.header_matcher({"Cache-Control": "no-cache", "Accept": "application/fhir+json"})],
    )
    client.search("Observation", {"patient": "p1"}, no_cache=True)
    assert mock.calls[0].request.headers["User-Agent"] == "fhir-crs/0.1"


def test_capabilities_and_read_with_version(mock, client) -> None:
    mock.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})
    mock.get(f"{BASE}/Patient/p1", json=res("p1", "3", "Patient"), headers={"ETag": 'W/"3"'})
    assert client.capabilities()["fhirVersion"] == "4.0.1"
    resource, etag = client.read_with_version("Patient", "p1")
    assert (resource["id"], etag) == ("p1", 'W/"3"')


def test_transaction_posts_bundle_and_returns_response(mock, client) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{
            "resource": {"resourceType": "Bundle", "type": "collection"},
            "request": {"method": "POST", "url": "Bundle", "ifNoneExist": "identifier=urn:crs-summary|P1"},
        }],
    }
    answer = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": "201 Created", "location": "Bundle/9/_history/1", "etag": 'W/"1"'}}],
    }
    mock.post(
        BASE,
        json=answer,
        match=[matchers.json_params_matcher(bundle), matchers.header_matcher({"Content-Type": "application/fhir+json"})],
    )
    assert client.transaction(bundle) == answer


def test_transaction_rejects_non_transaction_bundle(client) -> None:
    with pytest.raises(ValueError, match="transaction"):
        client.transaction({"resourceType": "Bundle", "type": "collection"})


def test_conditional_put_passes_if_match(mock, client) -> None:
    cond = {"resourceType": "Condition", "id": "crs-1"}
    mock.put(
        f"{BASE}/Condition/crs-1",
        json={**cond, "meta": {"versionId": "4"}},
        headers={"ETag": 'W/"4"'},
        match=[matchers.header_matcher({"If-Match": 'W/"3"', "Content-Type": "application/fhir+json"}),
               matchers.json_params_matcher(cond)],
    )
    status, body, etag = client.put("Condition/crs-1", cond, if_match='W/"3"')
    assert (status, body["meta"]["versionId"], etag) == (200, "4", 'W/"4"')


def test_conditional_put_on_identifier_keeps_match_url(mock, client) -> None:
    mock.put(f"{BASE}/Condition", status=201, body=b"", match=[matchers.query_param_matcher({"identifier": "urn:crs|P1"})])
    assert client.put("Condition?identifier=urn:crs|P1", {"resourceType": "Condition"}) == (201, None, None)
    assert "If-Match" not in mock.calls[0].request.headers


def test_post_passes_if_none_exist(mock, client) -> None:
    existing = res("9", "1", "Bundle")
    mock.post(f"{BASE}/Bundle", json=existing, match=[matchers.header_matcher({"If-None-Exist": "identifier=urn:s|P1"})])
    assert client.post("Bundle", {"resourceType": "Bundle"}, if_none_exist="identifier=urn:s|P1") == (200, existing, None)


def test_get_url_and_delete_url(mock, client) -> None:
    status_url = f"{BASE}/$export-poll-status?_jobId=42"
    mock.get(status_url, status=202, headers={"Retry-After": "5", "X-Progress": "50%"},
             match=[matchers.header_matcher({"Accept": "application/json"})])
    mock.get("http://127.0.0.1:9000/files/obs.ndjson", body='{"resourceType":"Observation"}\n')
    mock.delete(status_url, status=202)
    assert client.get_url(status_url, accept="application/json").status_code == 202
    ndjson = client.get_url("http://127.0.0.1:9000/files/obs.ndjson", stream=True, with_auth=False, foreign=True)
    assert list(ndjson.iter_lines()) == [b'{"resourceType":"Observation"}']
    assert client.delete_url(status_url) == 202


# ----------------------------------------------------------------------------- retries


def http_date(seconds_ahead: int) -> str:
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_ahead), usegmt=True)


@pytest.mark.parametrize(
    ("method", "status", "headers", "low", "high"),
    [
        pytest.param("GET", 429, {"Retry-After": "2"}, 2, 2, id="429-retry-after-seconds"),
        pytest.param("GET", 429, "http-date", 8.0, 10.0, id="429-retry-after-http-date"),
        pytest.param("GET", 503, {}, 0, 0.5, id="503-backoff"),
        pytest.param("GET", 504, {"Retry-After": "soon"}, 0, 0.5, id="504-bad-retry-after-backoff"),
        pytest.param("GET", 500, {}, 0, 0.5, id="500-get"),
        pytest.param("POST", 429, {"Retry-After": "1"}, 1, 1, id="429-post"),
        pytest.param("PUT", 503, {}, 0, 0.5, id="503-put"),
        pytest.param("POST", 502, {}, 0, 0.5, id="502-post"),
    ],
)
def test_retryable_status_then_success(mock, client, sleeps, method, status, headers, low, high) -> None:
    hdrs = {"Retry-After": http_date(10)} if headers == "http-date" else headers
    url = f"{BASE}/Condition"
    mock.add(method, url, status=status, json=outcome("busy", "throttled"), headers=hdrs)
    mock.add(method, url, status=200, json=res("x", type_="Condition"))
    if method == "GET":
        client.get_url(url)
    elif method == "POST":
        client.post("Condition", {"resourceType": "Condition"})
    else:
        client.put("Condition", {"resourceType": "Condition"})
    assert len(mock.calls) == 2
    assert len(sleeps) == 1
    assert low <= sleeps[0] <= high


@pytest.mark.parametrize(
    ("method", "status", "error"),
    [
        pytest.param("POST", 500, FhirOperationOutcome, id="500-post-not-retried"),
        pytest.param("PUT", 500, FhirOperationOutcome, id="500-put-not-retried"),
        pytest.param("GET", 400, FhirOperationOutcome, id="400"),
        pytest.param("GET", 404, FhirNotFound, id="404"),
        pytest.param("GET", 410, FhirNotFound, id="410-read"),
        pytest.param("GET", 401, FhirAuthError, id="401"),
        pytest.param("GET", 403, FhirAuthError, id="403"),
        pytest.param("PUT", 409, VersionConflict, id="409"),
        pytest.param("PUT", 412, PreconditionFailed, id="412"),
        pytest.param("POST", 422, FhirOperationOutcome, id="422"),
    ],
)
def test_non_retryable_status_raises_after_one_call(mock, client, sleeps, method, status, error) -> None:
    mock.add(method, f"{BASE}/Condition/c1", status=status, json=outcome(f"HAPI-0001: failed with {status}"))
    with pytest.raises(error) as err:
        if method == "GET":
            client.read("Condition", "c1")
        elif method == "POST":
            client.post("Condition/c1", {"resourceType": "Condition"})
        else:
            client.put("Condition/c1", {"resourceType": "Condition"})
    assert (err.value.status, err.value.diagnostics) == (status, f"HAPI-0001: failed with {status}")
    assert str(err.value).startswith(f"{method} /fhir/Condition/c1 failed: HTTP {status} ")
    assert str(err.value).endswith(f": HAPI-0001: failed with {status}")
    assert len(mock.calls) == 1
    assert sleeps == []


def test_backoff_grows_with_full_jitter_then_gives_up(mock, sleeps) -> None:
    client = FhirClient(BASE, max_retries=4, backoff_base=1.0, backoff_cap=3.0, sleep=sleeps.append)
    mock.get(f"{BASE}/metadata", status=503, json=outcome("HAPI-2223: Timer already cancelled."))
    with pytest.raises(ServerUnavailable) as err:
        client.capabilities()
    assert len(mock.calls) == 5
    assert client.requests_made == 5
    assert all(0 <= s <= high for s, high in zip(sleeps, (1, 2, 3, 3), strict=True))
    assert err.value.status == 503
    assert "HAPI-2223" in str(err.value) and "gave up after 5 attempts" in str(err.value)


def test_502_html_body_gives_readable_diagnostics(mock, sleeps) -> None:
    client = FhirClient(BASE, max_retries=0, sleep=sleeps.append)
    mock.get(f"{BASE}/metadata", status=502, body=NGINX_502, content_type="text/html")
    with pytest.raises(ServerUnavailable) as err:
        client.capabilities()
    assert err.value.diagnostics == "502 Bad Gateway 502 Bad Gateway nginx/1.25.3"
    assert "<" not in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("GET /fhir/metadata failed: HTTP 502")


@pytest.mark.parametrize(
    ("retry_after", "expected_sleeps", "calls"),
    [
        pytest.param(["400", "400"], [400.0], 2, id="second-wait-exceeds-cap"),
        pytest.param(["700"], [], 1, id="retry-after-beyond-cap"),
    ],
)
def test_total_time_cap(mock, sleeps, retry_after, expected_sleeps, calls) -> None:
    client = FhirClient(BASE, total_time_cap=600, sleep=sleeps.append)
    for value in retry_after:
        mock.get(f"{BASE}/metadata", status=429, headers={"Retry-After": value})
    with pytest.raises(ServerUnavailable, match="cap"):
        client.capabilities()
    assert sleeps == expected_sleeps
    assert len(mock.calls) == calls


# ----------------------------------------------------------------------------- 412 / 409 semantics


@pytest.mark.parametrize(
    ("body", "error", "multiple"),
    [
        pytest.param(
            outcome('HAPI-0988: Failed to UPDATE resource with match URL "Condition?identifier=urn:crs|P1" '
                    "because this search matched 2 resources"),
            PreconditionFailed, True, id="hapi-matched-2",
        ),
        pytest.param(outcome("Conditional update matched more than one", "multiple-matches"),
                     PreconditionFailed, True, id="issue-code"),
        pytest.param(outcome('HAPI-1092: Invalid match URL "Patient?identifier=x" - Multiple resources match this search'),
                     PreconditionFailed, True, id="hapi-1092"),
        pytest.param(outcome("Transaction rolled back: Version conflict"), VersionConflict, None, id="412-version"),
        pytest.param(outcome("If-Match header does not match current version", "conflict"),
                     VersionConflict, None, id="412-if-match"),
        pytest.param(None, PreconditionFailed, False, id="412-no-body"),
    ],
)
def test_412_classification_not_retried(mock, client, body, error, multiple) -> None:
    kw: dict[str, Any] = {"json": body} if body is not None else {"body": b""}
    mock.put(f"{BASE}/Condition", status=412, **kw)
    with pytest.raises(error) as err:
        client.put("Condition?identifier=urn:crs|P1", {"resourceType": "Condition"})
    assert len(mock.calls) == 1
    assert err.value.status == 412
    if multiple is not None:
        assert err.value.multiple_matches is multiple
    assert "P1" not in str(err.value).split(":")[0]  # the match URL's value is not in the "what failed" part


def test_409_hapi_0989_is_version_conflict(mock, client) -> None:
    diag = "HAPI-0550: HAPI-0989: Trying to update Condition/crs-1/_history/2 but this is not the current version"
    mock.put(f"{BASE}/Condition/crs-1", status=409, json=outcome(diag, "conflict"))
    with pytest.raises(VersionConflict) as err:
        client.put("Condition/crs-1", {"resourceType": "Condition", "id": "crs-1"}, if_match='W/"2"')
    assert len(mock.calls) == 1
    assert err.value.diagnostics == diag
    assert isinstance(err.value, FhirOperationOutcome)
    assert str(err.value) == f"PUT /fhir/Condition/crs-1 failed: HTTP 409 Conflict: {diag}"


def test_operation_outcome_joins_diagnostics_and_details() -> None:
    from fhir_crs.fhir.client import _outcome_text

    oo = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "HAPI-0524: Unknown search parameter \"foo\""},
        {"severity": "error", "code": "invalid", "details": {"text": "Second\nline"}},
    ]}
    assert _outcome_text(oo) == ('HAPI-0524: Unknown search parameter "foo"; Second line', ("processing", "invalid"))


# ----------------------------------------------------------------------------- auth


class RefreshingAuth:
    """Stands in for SMART backend services: the first 401 re-mints the token."""

    def __init__(self) -> None:
        self.token = "old"
        self.refreshes = 0

    def apply(self, headers) -> None:
        headers["Authorization"] = f"Bearer {self.token}"

    def on_unauthorized(self) -> bool:
        self.refreshes += 1
        self.token = "new"
        return True


def test_401_refresh_then_retry_once(mock, sleeps) -> None:
    auth = RefreshingAuth()
    client = FhirClient(BASE, auth=auth, sleep=sleeps.append)
    mock.get(f"{BASE}/Patient/p1", status=401, json=outcome("token expired", "login"))
    mock.get(f"{BASE}/Patient/p1", json=res("p1", type_="Patient"))
    assert client.read("Patient", "p1")["id"] == "p1"
    assert [c.request.headers["Authorization"] for c in mock.calls] == ["Bearer old", "Bearer new"]
    assert (auth.refreshes, sleeps) == (1, [])


def test_401_mid_paging_refreshes_once(mock, sleeps) -> None:
    auth = RefreshingAuth()
    client = FhirClient(BASE, auth=auth, sleep=sleeps.append)
    mock.get(OBS, json=page(*matches("a"), next_=f"{BASE}?_getpages=x"))
    mock.get(f"{BASE}?_getpages=x", status=401)
    mock.get(f"{BASE}?_getpages=x", json=page(*matches("b")))
    assert ids(client.search("Observation", {}).matches) == ["a", "b"]
    assert [c.request.headers["Authorization"] for c in mock.calls] == ["Bearer old", "Bearer old", "Bearer new"]


def test_401_twice_raises_auth_error(mock, sleeps) -> None:
    auth = RefreshingAuth()
    client = FhirClient(BASE, auth=auth, sleep=sleeps.append)
    mock.get(f"{BASE}/Patient/p1", status=401)
    mock.get(f"{BASE}/Patient/p1", status=401)
    with pytest.raises(FhirAuthError):
        client.read("Patient", "p1")
    assert (len(mock.calls), auth.refreshes) == (2, 1)


@pytest.mark.parametrize("auth", [None, NoAuth()], ids=["none", "NoAuth"])
def test_no_authorization_header_without_credentials(mock, sleeps, auth, tmp_path, monkeypatch) -> None:
    # Even a ~/.netrc entry for the host must not add one: the HAPI sandbox 403s any Authorization.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password pw\n")
    monkeypatch.setenv("NETRC", str(netrc))
    client = FhirClient(BASE, auth=auth, sleep=sleeps.append)
    mock.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    client.capabilities()
    assert "Authorization" not in mock.calls[0].request.headers


def test_basic_auth_header_and_repr(mock) -> None:
    auth = BasicAuth("svc", "pw-secret")
    client = FhirClient(BASE, auth=auth)
    mock.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"},
             match=[matchers.header_matcher({"Authorization": "Basic c3ZjOnB3LXNlY3JldA=="})])
    client.capabilities()
    assert "pw-secret" not in repr(auth) and "pw-secret" not in str(auth)


def test_bearer_token_never_in_repr_messages_or_logs(mock, sleeps, caplog) -> None:
    auth = BearerAuth(TOKEN)
    client = FhirClient(BASE, auth=auth, sleep=sleeps.append)
    assert TOKEN not in repr(auth) and TOKEN not in str(auth) and TOKEN not in repr(client)
    mock.get(OBS, status=403, json=outcome("HAPI-1981: Unknown/expired bearer token", "forbidden"))
    with caplog.at_level(logging.DEBUG, logger="fhir_crs.fhir"), pytest.raises(FhirAuthError) as err:
        client.search("Observation", {"patient": "patient-123", "code": "http://loinc.org|8310-5"})
    assert mock.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(err.value) and "patient-123" not in str(err.value)
    assert "use no auth" in str(err.value)
    logged = caplog.text
    assert "GET /fhir/Observation params=patient,code,_count" in logged
    assert TOKEN not in logged and "patient-123" not in logged and "8310-5" not in logged


def test_empty_bearer_token_is_a_config_error() -> None:
    from fhir_crs.errors import ConfigError

    with pytest.raises(ConfigError):
        BearerAuth("  ")


# ----------------------------------------------------------------------------- transport failures


def test_connection_refused_get_retried_then_server_unavailable(mock, sleeps) -> None:
    client = FhirClient(BASE, max_retries=2, sleep=sleeps.append)
    mock.get(f"{BASE}/metadata", body=requests.ConnectionError("Connection refused"))
    with pytest.raises(ServerUnavailable) as err:
        client.capabilities()
    assert str(err.value).startswith(f"cannot reach FHIR server at {BASE}: GET /fhir/metadata: Connection refused")
    assert len(mock.calls) == 3 and len(sleeps) == 2
    assert isinstance(err.value, FhirServerError) and err.value.exit_code == 4


def test_connection_reset_on_post_is_not_resent(mock, client) -> None:
    mock.post(f"{BASE}/Condition", body=requests.ConnectionError("Connection reset by peer"))
    with pytest.raises(ServerUnavailable, match="cannot reach FHIR server"):
        client.post("Condition", {"resourceType": "Condition"})
    assert len(mock.calls) == 1


def test_post_never_connected_is_resent(mock, client, sleeps) -> None:
    refused = urllib3.exceptions.MaxRetryError(
        None, "/fhir/Condition", reason=urllib3.exceptions.NewConnectionError(None, "[Errno 111] Connection refused")
    )
    mock.post(f"{BASE}/Condition", body=requests.ConnectionError(refused))
    mock.post(f"{BASE}/Condition", status=201, json=res("c1", type_="Condition"))
    assert client.post("Condition", {"resourceType": "Condition"})[0] == 201
    assert len(sleeps) == 1


def test_real_connection_refused_on_closed_local_port(sleeps) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    session = requests.Session()
    session.trust_env = False  # no proxy: the test must only ever touch 127.0.0.1
    client = FhirClient(f"http://127.0.0.1:{port}/fhir", max_retries=1, session=session, sleep=sleeps.append)
    with pytest.raises(ServerUnavailable) as err:
        client.post("Condition?identifier=urn:x|secret-id", {"resourceType": "Condition"})
    message = str(err.value)
    assert message.startswith(f"cannot reach FHIR server at http://127.0.0.1:{port}/fhir: POST /fhir/Condition")
    assert "secret-id" not in message and "\n" not in message
    assert len(sleeps) == 1  # refused before sending, so even a POST is retried


def test_invalid_base_url_is_a_config_error() -> None:
    from fhir_crs.errors import ConfigError

    with pytest.raises(ConfigError):
        FhirClient("127.0.0.1:8080/fhir")
