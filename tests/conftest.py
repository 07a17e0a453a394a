from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REALWORLD = SHARED / "realworld"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-sandbox", action="store_true", help="run tests against the public HAPI sandbox")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-sandbox"):
        return
    skip = pytest.mark.skip(reason="public HAPI sandbox tests are opt-in (--run-sandbox)")
    for item in items:
        if "sandbox" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def code_map():
    from fhir_crs.mapping_files import load_code_map

    return load_code_map(ROOT / "mappings")


@pytest.fixture(scope="session")
def settings():
    from fhir_crs.settings import load_settings

    return load_settings(ROOT / "mappings")


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory):
    """A real FHIR server (sekmet-fhir, pinned) on a free 127.0.0.1 port, killed by PID afterwards."""
    from fhir_crs.localserver import LocalFhirServer

    server = LocalFhirServer(tmp_path_factory.mktemp("sekmet")).start()
    try:
        yield server
    finally:
        server.stop()


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
