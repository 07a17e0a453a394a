from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REALWORLD = SHARED / "realworld"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-sandbox", action="store_true", help="run tests against the public HAPI sandbox")


def _uses_hapi(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return "hapi_server" in getattr(item, "fixturenames", ()) or "hapi" in params


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _uses_hapi(item):
            item.add_marker(pytest.mark.hapi)
    if config.getoption("--run-sandbox"):
        return
    skip = pytest.mark.skip(reason="public HAPI sandbox tests are opt-in (--run-sandbox)")
    for item in items:
        if "sandbox" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- HAPI bookkeeping

_HAPI: dict[str, object] = {"outcomes": {}, "seconds": 0.0}


_SPARK: dict[str, object] = {"outcomes": {}, "seconds": 0.0}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    start = time.monotonic()
    yield
    if _uses_hapi(item):
        _HAPI["seconds"] = float(_HAPI["seconds"]) + time.monotonic() - start  # type: ignore[arg-type]
    if "spark" in item.keywords:
        _SPARK["seconds"] = float(_SPARK["seconds"]) + time.monotonic() - start  # type: ignore[arg-type]


def _record_outcome(book: dict[str, object], report: pytest.TestReport) -> None:
    """A test's outcome in `book` (the HAPI or Spark bookkeeping): failed in any phase wins,
    then skipped, then a passed call."""
    outcomes: dict[str, str] = book["outcomes"]  # type: ignore[assignment]
    if report.failed:
        outcomes[report.nodeid] = "failed"
    elif report.skipped:
        outcomes.setdefault(report.nodeid, "skipped")
    elif report.when == "call":
        outcomes.setdefault(report.nodeid, "passed")


def _outcome_line(label: str, book: dict[str, object]) -> str:
    outcomes: dict[str, str] = book["outcomes"]  # type: ignore[assignment]
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failed", "skipped")}
    return (f"{label}: {len(outcomes)} run (passed {counts['passed']}, failed {counts['failed']}, "
            f"skipped {counts['skipped']}) in {float(book['seconds']):.0f} s")  # type: ignore[arg-type]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "spark" in report.keywords:
        _record_outcome(_SPARK, report)
    if "hapi" in report.keywords:
        _record_outcome(_HAPI, report)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _SPARK["outcomes"]:
        terminalreporter.write_line(
            _outcome_line("Spark engine tests", _SPARK)
            + (f"; SparkSession local[2] startup {_SPARK['startup']:.1f} s" if "startup" in _SPARK else ""))
    if not _HAPI["outcomes"]:
        return
    line = _outcome_line("HAPI FHIR JPA integration tests", _HAPI)
    if "startup" in _HAPI:
        line += f"; server startup {_HAPI['startup']:.1f} s, RSS {_HAPI['rss_mb']} MB"
    terminalreporter.write_line(line)
    if _VALIDATOR_WARNINGS:
        terminalreporter.write_line(f"HL7 validator warnings on what fhir-crs writes ({len(_VALIDATOR_WARNINGS)} distinct):")
        for text, n in sorted(_VALIDATOR_WARNINGS.items()):
            terminalreporter.write_line(f"  {n:4d} x {text}")


@pytest.fixture(scope="session")
def code_map():
    from fhir_crs.mapping_files import load_code_map

    return load_code_map(ROOT / "mappings")


@pytest.fixture(scope="session")
def settings():
    from fhir_crs.settings import load_settings

    return load_settings(ROOT / "mappings")


@pytest.fixture(scope="session")
def spark():
    """One small SparkSession (local[2], loopback only, no UI) for the whole test session. Without
    pyspark or Java the Spark tests skip with that reason, except in CI (CI=true), where they must
    run: there the missing tool is a failure."""
    from fhir_crs.spark import spark_available

    reason = spark_available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: the Spark engine tests must run, but {reason}", pytrace=False)
        pytest.skip(reason)
    start = time.monotonic()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ["PYSPARK_PYTHON"] = sys.executable  # the executors run this venv's fhir_crs and packages
    from pyspark.sql import SparkSession

    s = (SparkSession.builder.master("local[2]").appName("fhir-crs tests")
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.shuffle.partitions", "2").config("spark.python.worker.memory", "64m")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    _SPARK["startup"] = time.monotonic() - start
    try:
        yield s
    finally:
        import gc
        import warnings

        s.stop()
        with warnings.catch_warnings():  # py4j's local sockets, closed by the collector, here rather than in a later test
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.fixture(scope="session")
def sekmet_server(tmp_path_factory: pytest.TempPathFactory):
    """A real FHIR server (sekmet-fhir, pinned) on a free 127.0.0.1 port, killed by PID afterwards."""
    from fhir_crs.localserver import LocalFhirServer

    server = LocalFhirServer(tmp_path_factory.mktemp("sekmet")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fhir_server(sekmet_server):
    """The embedded server (sekmet-fhir); `any_server` runs a test on it and on HAPI."""
    return sekmet_server


@pytest.fixture(scope="session")
def hapi_server(tmp_path_factory: pytest.TempPathFactory):
    """A real HAPI FHIR JPA server (tools/hapi-server: R4, H2, Bulk $export, $validate) on a free
    127.0.0.1 port, shared by the whole session and killed by PID afterwards. Test modules that need
    an empty server call `reset_hapi`. Skipped with the reason when Java 17 or Maven is missing,
    except in CI (CI=true), where the HAPI tests must run: there the missing tool is a failure."""
    from fhir_crs.localserver import HapiFhirServer, hapi_unavailable_reason

    reason = hapi_unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: the HAPI integration tests must run, but {reason}", pytrace=False)
        pytest.skip(reason)
    server = HapiFhirServer(tmp_path_factory.mktemp("hapi")).start()
    _HAPI["startup"] = server.startup_seconds or 0.0
    rss = server.rss_bytes()
    _HAPI["rss_mb"] = round(rss / 2**20) if rss else "?"
    try:
        yield server
    finally:
        rss = server.rss_bytes()
        if rss:
            _HAPI["rss_mb"] = f"{_HAPI['rss_mb']} at start, {round(rss / 2**20)} at end"
        server.stop()


def reset_hapi(server) -> None:
    """Empty the shared HAPI server (`$expunge` everything: resources, history, stored searches)."""
    from fhir_crs.fhir import FhirClient, NoAuth

    with FhirClient(server.base, auth=NoAuth(), timeout=300) as client:
        client.post("$expunge", {"resourceType": "Parameters",
                                 "parameter": [{"name": "expungeEverything", "valueBoolean": True}]})


def empty_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str):
    """The body of a module-scoped fixture parametrised over ["sekmet", "hapi"]: an empty server
    for the module, a fresh sekmet-fhir (in a temporary folder `name`) or the session's HAPI JPA
    server emptied (`reset_hapi`). Use as `yield from empty_server(request, tmp_path_factory, name)`."""
    if request.param == "hapi":
        hapi = request.getfixturevalue("hapi_server")
        reset_hapi(hapi)
        yield hapi
        return
    from fhir_crs.localserver import LocalFhirServer

    with LocalFhirServer(tmp_path_factory.mktemp(name)) as s:
        yield s


@pytest.fixture(scope="session", params=["sekmet", "hapi"])
def any_server(request: pytest.FixtureRequest):
    """Each server-facing test runs on both: the embedded sekmet-fhir and a real HAPI JPA server.
    Session-scoped and shared: tests must not assume an empty server (see `reset_hapi`)."""
    return request.getfixturevalue("sekmet_server" if request.param == "sekmet" else "hapi_server")


@pytest.fixture
def realworld() -> Path:
    if not REALWORLD.is_dir():
        pytest.skip("../shared/realworld is absent (real-world FHIR examples not available on this machine)")
    return REALWORLD


def load_vignette(client, vignette: str) -> str:
    """POST a vignette Bundle to a FHIR server as a transaction; returns its Patient's server id."""
    import json

    bundle = json.loads((ROOT / "fixtures" / "R4" / "vignettes" / f"{vignette}.json").read_text())
    if bundle["type"] != "transaction":
        bundle["type"] = "transaction"
        for e in bundle["entry"]:
            r = e["resource"]
            e["request"] = {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
    resp = client.transaction(bundle)
    for entry, out in zip(bundle["entry"], resp["entry"], strict=True):
        if entry["resource"]["resourceType"] == "Patient":
            return out["response"]["location"].split("/_history")[0].rsplit("/", 1)[1]
    raise AssertionError(f"no Patient in {vignette}")


# --------------------------------------------------------------------------- HL7 validator

_VALIDATOR_WARNINGS: dict[str, int] = {}


def hl7_validate(hapi_base: str, resource: dict) -> tuple[list[str], list[str]]:
    """Validate one resource with the HL7 FHIR validator inside the local HAPI server
    (`[base]/Type/$validate`: HAPI's FhirInstanceValidator with the R4 core definitions shipped in
    hapi-fhir-validation-resources-r4, offline). Returns (errors, warnings) as readable lines;
    warnings are also collected for the end-of-session list."""
    import requests

    rtype = resource["resourceType"]
    resp = requests.post(f"{hapi_base}/{rtype}/$validate", json=resource, timeout=120,
                         headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
    outcome = resp.json()
    assert outcome.get("resourceType") == "OperationOutcome", (resp.status_code, outcome)
    errors, warnings = [], []
    for issue in outcome.get("issue", []):
        where = ", ".join(issue.get("expression") or issue.get("location") or [])
        text = f"{rtype}: {issue.get('severity')}: {where}: {issue.get('diagnostics')}"
        if issue.get("severity") in ("error", "fatal"):
            errors.append(text)
        elif issue.get("severity") == "warning":
            warnings.append(text)
            # one line per kind of warning: without entry/element indexes and the code looked up
            kind = re.sub(r"\[\d+\]", "[n]", text.replace("/*", "(").replace("*/", ")"))
            kind = re.sub(r" for '[^']*'$", "", re.sub(r"\((\w+)/[^)]*\)", r"(\1)", kind))
            _VALIDATOR_WARNINGS[kind] = _VALIDATOR_WARNINGS.get(kind, 0) + 1
    assert resp.status_code in (200, 412), (resp.status_code, outcome)  # 412: the resource has errors
    return errors, warnings
