"""Bulk Data $export: kick-off, polling (Retry-After, X-Progress, 429, timeout), manifest, NDJSON
streaming, error files, cancel — against `responses` mocks with an injected clock; plus one
integration test running two real exports (full, then `_since`) on the local sekmet-fhir server."""

from __future__ import annotations

import email.utils
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import responses

from fhir_crs.errors import FhirAuthError
from fhir_crs.fhir import (
    DEFAULT_EXPORT_TYPES,
    BearerAuth,
    BulkExport,
    BulkExportError,
    BulkExportTimeout,
    FhirClient,
    Manifest,
    ManifestFile,
)

BASE = "http://127.0.0.1:8080/fhir"
KICKOFF = f"{BASE}/Patient/$export"
STATUS = f"{BASE}/bulk-status/job-1"
FILES = "http://127.0.0.1:8080/files"
WALL = 1_800_000_000  # epoch seconds of the injected wall clock
TT = "2026-11-25T01:00:00.123Z"
TOKEN = "bulk-secret-token"


class FakeTime:
    """One clock for the client's and the exporter's sleeps: sleeping advances it."""

    def __init__(self) -> None:
        self.mono = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.mono += seconds

    def clock(self) -> float:
        return self.mono

    def now(self) -> float:
        return WALL + self.mono


@pytest.fixture
def mock():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as m:
        yield m


@pytest.fixture
def ft() -> FakeTime:
    return FakeTime()


@pytest.fixture
def client(ft: FakeTime) -> FhirClient:
    return FhirClient(BASE, auth=BearerAuth(TOKEN), sleep=ft.sleep, max_retries=3)


@pytest.fixture
def bulk(client: FhirClient, ft: FakeTime) -> BulkExport:
    return BulkExport(client, sleep=ft.sleep, clock=ft.clock, now=ft.now, poll_interval=2.0)


def query(call: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(call.request.url).query, keep_blank_values=True)


def ndjson(*items: Any) -> str:
    return "".join(orjson.dumps(i).decode() + "\n" for i in items)


def obs(id_: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": id_, "status": "final"}


def manifest_json(requires_token: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "transactionTime": TT,
        "request": KICKOFF,
        "requiresAccessToken": requires_token,
        "output": [
            {"type": "Patient", "url": f"{FILES}/Patient.ndjson", "count": 1},
            {"type": "Observation", "url": f"{FILES}/Observation-1.ndjson", "count": 2},
            {"type": "Observation", "url": f"{FILES}/Observation-2.ndjson", "count": 1},
        ],
        "error": [{"type": "OperationOutcome", "url": f"{FILES}/errors.ndjson"}],
        **extra,
    }


# ----------------------------------------------------------------------------- kick-off


def test_kickoff_202_content_location_and_headers(mock, bulk) -> None:
    mock.get(KICKOFF, status=202, headers={"Content-Location": "/fhir/bulk-status/job-1"})
    assert bulk.kickoff() == STATUS
    req = mock.calls[0].request
    assert req.headers["Prefer"] == "respond-async"
    assert req.headers["Cache-Control"] == "no-cache"  # no reuse of an earlier HAPI job
    assert req.headers["Accept"] == "application/fhir+json"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert query(mock.calls[0]) == {"_type": [",".join(DEFAULT_EXPORT_TYPES)]}
    assert DEFAULT_EXPORT_TYPES == (
        "Patient",
        "Observation",
        "MedicationAdministration",
        "Procedure",
        "Medication",
    )


def test_kickoff_group_since_and_type_filter_pass_through(mock, bulk) -> None:
    mock.get(
        f"{BASE}/Group/cart%20cohort/$export", status=202, headers={"Content-Location": STATUS}
    )
    bulk.kickoff(
        group_id="cart cohort",
        types=["Observation", "Procedure"],
        since="2026-11-24T23:00:00.5+02:00",
        type_filters=["Observation?category=vital-signs", "Procedure?status=completed"],
    )
    url = mock.calls[0].request.url
    assert "_since=2026-11-24T23%3A00%3A00.5%2B02%3A00" in url  # "+" must not arrive as a space
    assert query(mock.calls[0]) == {
        "_type": ["Observation,Procedure"],
        "_since": ["2026-11-24T23:00:00.5+02:00"],
        "_typeFilter": ["Observation?category=vital-signs,Procedure?status=completed"],
    }


def test_kickoff_system_level_without_type(mock, bulk) -> None:
    mock.get(f"{BASE}/$export", status=202, headers={"Content-Location": STATUS})
    bulk.kickoff(system=True, types=None)
    assert query(mock.calls[0]) == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"since": "2026-11-24"},
        {"since": "2026-11-24T10:00:00"},
        {"types": ["Observation", "bad type"]},
        {"type_filters": ["category=vital-signs"]},
        {"group_id": "g", "system": True},
    ],
)
def test_kickoff_rejects_malformed_arguments(bulk, kwargs) -> None:
    with pytest.raises(ValueError):
        bulk.kickoff(**kwargs)


def test_kickoff_429_retry_after_then_202(mock, bulk, ft) -> None:
    mock.get(
        KICKOFF,
        status=429,
        headers={"Retry-After": "3"},
        json={
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "throttled",
                    "diagnostics": "an export is already running",
                }
            ],
        },
    )
    mock.get(KICKOFF, status=202, headers={"Content-Location": STATUS})
    assert bulk.kickoff() == STATUS
    assert ft.sleeps == [3.0]


@pytest.mark.parametrize(
    ("status", "body", "expect"),
    [
        pytest.param(
            400,
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "not-supported",
                        "diagnostics": "Unsupported _outputFormat",
                    }
                ],
            },
            r"kick-off failed: .*HTTP 400.*Unsupported _outputFormat",
            id="400-outcome",
        ),
        pytest.param(404, None, r"may not support Bulk Data \$export", id="404"),
        pytest.param(
            500,
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "fatal", "code": "exception", "diagnostics": "HAPI-0389: boom"}
                ],
            },
            r"kick-off failed: .*HAPI-0389: boom",
            id="500",
        ),
    ],
)
def test_kickoff_server_error_is_named(mock, ft, status, body, expect) -> None:
    client = FhirClient(BASE, sleep=ft.sleep, max_retries=0)
    mock.get(KICKOFF, status=status, json=body)
    with pytest.raises(BulkExportError, match=expect) as err:
        BulkExport(client, sleep=ft.sleep).kickoff()
    assert err.value.status == status


def test_kickoff_401_stays_an_auth_error(mock, bulk) -> None:
    mock.get(KICKOFF, status=401)
    with pytest.raises(FhirAuthError):
        bulk.kickoff()


@pytest.mark.parametrize(
    ("status", "headers", "expect"),
    [(200, {}, "expected 202"), (202, {}, "without a Content-Location")],
)
def test_kickoff_without_async_answer(mock, bulk, status, headers, expect) -> None:
    mock.get(KICKOFF, status=status, headers=headers, json={})
    with pytest.raises(BulkExportError, match=expect):
        bulk.kickoff()


# ----------------------------------------------------------------------------- polling


def test_poll_honours_retry_after_seconds_date_backoff_and_429(mock, client, ft) -> None:
    progress: list[str] = []
    bulk = BulkExport(
        client,
        sleep=ft.sleep,
        clock=ft.clock,
        now=ft.now,
        poll_interval=2.0,
        on_progress=progress.append,
    )
    # After the 5 s wait the wall clock is WALL+5; the date says WALL+12 → wait 7 s.
    date = email.utils.formatdate(WALL + 12, usegmt=True)
    mock.get(STATUS, status=202, headers={"X-Progress": "collecting 10%", "Retry-After": "5"})
    mock.get(STATUS, status=202, headers={"X-Progress": "writing 50%", "Retry-After": date})
    mock.get(
        STATUS, status=202, headers={"X-Progress": "writing 50%"}
    )  # no Retry-After: backoff 2→4→8
    mock.get(STATUS, status=429, headers={"Retry-After": "2"})  # polled too fast (the client waits)
    mock.get(STATUS, json=manifest_json())

    manifest = bulk.wait(STATUS)

    assert ft.sleeps == [5.0, 7.0, 8.0, 2.0]
    assert progress == ["collecting 10%", "writing 50%"]
    assert bulk.progress == "writing 50%" and bulk.polls == 4
    assert manifest.transaction_time == TT
    assert all(c.request.method == "GET" for c in mock.calls)  # completed: no DELETE


def test_poll_timeout_cancels_the_job(mock, bulk, ft) -> None:
    bulk.timeout = 250
    for _ in range(3):
        mock.get(STATUS, status=202, headers={"Retry-After": "100", "X-Progress": "queued"})
    mock.delete(STATUS, status=202)
    with pytest.raises(BulkExportTimeout, match=r"within 250s .*queued"):
        bulk.wait(STATUS)
    assert ft.sleeps == [100.0, 100.0]
    assert mock.calls[-1].request.method == "DELETE"


def test_keyboard_interrupt_while_polling_cancels(mock, client, ft) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    bulk = BulkExport(client, sleep=interrupted, clock=ft.clock)
    mock.get(STATUS, status=202, headers={"Retry-After": "1"})
    mock.delete(STATUS, status=202)
    with pytest.raises(KeyboardInterrupt):
        bulk.wait(STATUS)
    assert [c.request.method for c in mock.calls] == ["GET", "DELETE"]
    assert mock.calls[1].request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_failed_export_while_polling_is_named_and_cancelled(mock, ft) -> None:
    client = FhirClient(BASE, sleep=ft.sleep, max_retries=0)
    bulk = BulkExport(client, sleep=ft.sleep, clock=ft.clock)
    mock.get(STATUS, status=202)
    mock.get(
        STATUS,
        status=500,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "exception", "diagnostics": "disk full"}],
        },
    )
    mock.delete(STATUS, status=404)  # best effort: a failed cancel does not mask the real error
    with pytest.raises(BulkExportError, match=r"failed while polling: .*disk full") as err:
        bulk.wait(STATUS)
    assert err.value.diagnostics == "disk full"
    assert [c.request.method for c in mock.calls] == ["GET", "GET", "DELETE"]


def test_malformed_manifest_is_named_and_cancelled(mock, bulk) -> None:
    mock.get(STATUS, json={"output": []})
    mock.delete(STATUS, status=202)
    with pytest.raises(BulkExportError, match="no transactionTime"):
        bulk.wait(STATUS)


def test_cancel_sends_delete(mock, bulk) -> None:
    mock.delete(STATUS, status=202)
    assert bulk.cancel(STATUS) is True
    mock.delete(STATUS, status=404)
    assert bulk.cancel(STATUS) is False


# ----------------------------------------------------------------------------- manifest and files


def files_mock(mock: responses.RequestsMock, **bodies: str) -> None:
    for name, body in bodies.items():
        mock.get(f"{FILES}/{name}", body=body, content_type="application/fhir+ndjson")


ERRORS = ndjson(
    {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "warning", "code": "not-supported", "diagnostics": "Ignored _typeFilter"},
            {
                "severity": "error",
                "code": "processing",
                "details": {"text": "Observation/o9 could not be exported"},
            },
        ],
    }
)


@pytest.mark.parametrize("requires_token", [True, False])
def test_manifest_files_token_and_error_messages(mock, bulk, requires_token: bool) -> None:
    mock.get(STATUS, json=manifest_json(requires_token))
    files_mock(
        mock,
        **{
            "Patient.ndjson": ndjson({"resourceType": "Patient", "id": "p1"}),
            "Observation-1.ndjson": ndjson(obs("o1"), obs("o2")),
            "Observation-2.ndjson": ndjson(obs("o3")),
            "errors.ndjson": ERRORS,
        },
    )

    manifest = bulk.wait(STATUS)
    items = list(bulk.iter_resources(manifest))
    messages = bulk.error_messages(manifest)

    assert manifest.requires_access_token is requires_token
    assert [f.type for f in manifest.output] == ["Patient", "Observation", "Observation"]
    assert manifest.files("Observation")[1] == ManifestFile(
        "Observation", f"{FILES}/Observation-2.ndjson", 1
    )
    assert [(t, r["id"]) for t, r in items] == [
        ("Patient", "p1"),
        ("Observation", "o1"),
        ("Observation", "o2"),
        ("Observation", "o3"),
    ]
    assert messages == [
        "errors.ndjson:1: warning not-supported: Ignored _typeFilter",
        "errors.ndjson:1: error processing: Observation/o9 could not be exported",
    ]
    for call in mock.calls[1:]:
        assert call.request.headers["Accept"] == "application/fhir+ndjson"
        assert ("Authorization" in call.request.headers) is requires_token
    assert mock.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"  # status URL: always


def test_iter_resources_filters_types_and_resolves_relative_urls(mock, bulk) -> None:
    mock.get(
        STATUS,
        json={
            "transactionTime": TT,
            "requiresAccessToken": False,
            "output": [
                {"type": "Patient", "url": "../../files/Patient.ndjson"},
                {"type": "Observation", "url": "/files/Observation-1.ndjson"},
            ],
        },
    )
    files_mock(mock, **{"Observation-1.ndjson": ndjson(obs("o1"))})
    manifest = bulk.wait(STATUS)
    assert manifest.output[0].url == f"{FILES}/Patient.ndjson"
    assert list(bulk.iter_resources(manifest, types=["Observation"])) == [
        ("Observation", obs("o1"))
    ]
    assert manifest.error == () and bulk.error_messages(manifest) == []


BAD_FILE = (
    "\ufeff" + orjson.dumps(obs("o1")).decode() + "\r\n"
    '{"resourceType": "Observation", "id": "o2", \n'
    "\n"
    "[1, 2]\r\n"
    '{"id": "o3"}\n'
    "   \n" + orjson.dumps(obs("o4")).decode()  # no final newline
)


@pytest.mark.parametrize("chunk_size", [1, 7, 64 * 1024])
def test_ndjson_bad_lines_are_reported_with_file_and_line(mock, client, chunk_size: int) -> None:
    bulk = BulkExport(client, chunk_size=chunk_size)
    files_mock(mock, **{"Observation-1.ndjson": BAD_FILE})
    manifest = Manifest(TT, False, (ManifestFile("Observation", f"{FILES}/Observation-1.ndjson"),))
    items = list(bulk.iter_resources(manifest))
    assert items[0] == ("Observation", obs("o1"))
    assert items[1][0] is None and re.fullmatch(
        r"Observation-1\.ndjson:2: invalid JSON \(.+\)", items[1][1]
    )
    assert items[2:] == [
        (None, "Observation-1.ndjson:4: not a JSON object"),
        (None, "Observation-1.ndjson:5: no resourceType"),
        ("Observation", obs("o4")),
    ]


def test_ndjson_is_streamed_not_loaded(mock, client, monkeypatch) -> None:
    lines = [obs(f"o{i}") | {"note": [{"text": "x" * 200}]} for i in range(2000)]
    body = ndjson(*lines).encode()
    files_mock(mock, **{"Observation-1.ndjson": body.decode()})
    seen: list[Any] = []
    real_get_url = client.get_url

    def spy(*args: Any, **kwargs: Any) -> Any:
        resp = real_get_url(*args, **kwargs)
        seen.append((kwargs, resp))
        return resp

    monkeypatch.setattr(client, "get_url", spy)
    bulk = BulkExport(client, chunk_size=4096)
    manifest = Manifest(TT, True, (ManifestFile("Observation", f"{FILES}/Observation-1.ndjson"),))
    it = bulk.iter_resources(manifest)
    assert next(it)[1]["id"] == "o0"
    kwargs, resp = seen[0]
    assert kwargs["stream"] is True
    assert resp.raw.tell() < len(body) // 10  # only the first chunks have been read
    assert resp._content is False  # the body was never loaded whole
    assert sum(1 for _ in it) == 1999
    assert resp.raw.closed


def test_expired_file_is_named(mock, bulk, ft) -> None:
    mock.get(f"{FILES}/Patient.ndjson", status=404)
    manifest = Manifest(
        TT, True, (ManifestFile("Patient", f"{FILES}/Patient.ndjson?sig=SECRETSIG"),)
    )
    with pytest.raises(
        BulkExportError, match=r"Patient\.ndjson \(Patient\) could not be downloaded \(files expire"
    ) as err:
        list(bulk.iter_resources(manifest))
    assert "SECRETSIG" not in str(err.value)


def test_unreadable_error_file_becomes_a_message(mock, bulk) -> None:
    mock.get(f"{FILES}/errors.ndjson", status=410)
    manifest = Manifest(
        TT, True, (), error=(ManifestFile("OperationOutcome", f"{FILES}/errors.ndjson"),)
    )
    [message] = bulk.error_messages(manifest)
    assert message.startswith("errors.ndjson: error file could not be read:")


def test_deleted_files(mock, bulk) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "DELETE", "url": "Observation/o7"}},
            {"request": {"method": "DELETE", "url": f"{BASE}/Procedure/pr1"}},
            {"request": {"method": "PUT", "url": "Observation/o8"}},
        ],
    }
    files_mock(mock, **{"del.ndjson": ndjson(bundle, obs("x"))})
    manifest = Manifest(TT, True, (), deleted=(ManifestFile("Bundle", f"{FILES}/del.ndjson"),))
    assert list(bulk.iter_deleted(manifest)) == [
        ("Observation", "o7"),
        ("Procedure", "pr1"),
        (None, "del.ndjson:1: entry is not a DELETE request"),
        (None, "del.ndjson:2: not a Bundle"),
    ]


def test_run_then_next_since_is_the_transaction_time(mock, bulk) -> None:
    mock.get(KICKOFF, status=202, headers={"Content-Location": STATUS})
    mock.get(STATUS, status=202, headers={"Retry-After": "1"})
    mock.get(
        STATUS,
        json={
            "transactionTime": TT,
            "requiresAccessToken": True,
            "output": [{"type": "Observation", "url": f"{FILES}/Observation-1.ndjson"}],
        },
    )
    files_mock(mock, **{"Observation-1.ndjson": ndjson(obs("o1"))})
    manifest, items = bulk.run(types=["Observation"])
    assert manifest.status_url == STATUS
    assert list(items) == [("Observation", obs("o1"))]

    mock.get(KICKOFF, status=202, headers={"Content-Location": f"{BASE}/bulk-status/job-2"})
    bulk.kickoff(types=["Observation"], since=manifest.transaction_time)
    assert query(mock.calls[-1]) == {"_type": ["Observation"], "_since": [TT]}


# ----------------------------------------------------------------------------- real server


def _observation(id_: str, patient: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": id_,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2026-11-20T08:00:00Z",
        "valueQuantity": {
            "value": value,
            "unit": "Cel",
            "system": "http://unitsofmeasure.org",
            "code": "Cel",
        },
    }


@pytest.fixture(scope="module")
def real_server(any_server):
    """sekmet-fhir and HAPI FHIR JPA in turn (tests/conftest.py `any_server`)."""
    return any_server


@pytest.mark.integration
def test_export_and_incremental_export_against_local_server(real_server) -> None:
    """Group/<id>/$export, Patient/$export, _type, _since and the output files on a real server.
    HAPI writes each output file as a Binary resource and always sets requiresAccessToken (even
    without auth); sekmet serves its own NDJSON files and says false."""
    from fhir_crs.localserver import HapiFhirServer

    is_hapi = isinstance(real_server, HapiFhirServer)
    u = f"bk{uuid.uuid4().hex[:10]}"
    with FhirClient(real_server.base, max_retries=1) as client:
        entries = [
            {"resourceType": "Patient", "id": f"{u}-p1", "gender": "female"},
            _observation(f"{u}-o1", f"{u}-p1", 38.2),
            _observation(f"{u}-o2", f"{u}-p1", 39.1),
            {"resourceType": "Group", "id": f"{u}-g", "type": "person", "actual": True,
             "member": [{"entity": {"reference": f"Patient/{u}-p1"}}]},
        ]
        client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in entries]})

        # max_poll_interval caps HAPI's "Retry-After: 120" on every poll
        bulk = BulkExport(client, poll_interval=0.5, min_poll_interval=0.2, max_poll_interval=1, timeout=120)
        manifest, items = bulk.run(group_id=f"{u}-g", types=("Patient", "Observation"))
        got = sorted((t, r["id"]) for t, r in items)
        assert got == [("Observation", f"{u}-o1"), ("Observation", f"{u}-o2"), ("Patient", f"{u}-p1")]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", manifest.transaction_time)
        assert manifest.requires_access_token is is_hapi
        if is_hapi:
            assert all(f.url.startswith(real_server.base + "/Binary/") for f in manifest.output)
        assert bulk.error_messages(manifest) == []
        assert bulk.polls >= 1

        client.put(f"Observation/{u}-o3", _observation(f"{u}-o3", f"{u}-p1", 39.6))
        second, items2 = bulk.run(group_id=f"{u}-g", types=("Patient", "Observation"), since=manifest.transaction_time)
        assert [(t, r["id"]) for t, r in items2] == [("Observation", f"{u}-o3")]
        assert second.transaction_time > manifest.transaction_time
        # DELETE on a completed job: sekmet releases it (2xx); HAPI answers 404 (only running jobs cancel)
        assert bulk.cancel(second.status_url or "") is (not is_hapi)

        time.sleep(1.1)  # _since is compared with lastUpdated: keep this write clear of the last export
        client.put(f"Observation/{u}-o4", _observation(f"{u}-o4", f"{u}-p1", 37.0))
        third, items3 = bulk.run(types=("Observation",), since=second.transaction_time)  # Patient/$export
        got3 = [(t, r["id"]) for t, r in items3]
        if is_hapi:
            # Seen on HAPI 8.8 in a shared session: the type-level Patient/$export also returned
            # Observations of other patients last updated before _since (Group exports honour it).
            # Pinned loosely: the new one is there; fhir-crs's upsert is idempotent either way.
            assert ("Observation", f"{u}-o4") in got3
        else:
            assert got3 == [("Observation", f"{u}-o4")]
        assert "/Patient/$export" in (third.request or "/Patient/$export")
