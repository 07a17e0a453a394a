"""Opt-in smoke test against the public HAPI FHIR sandbox (never in CI: run with --run-sandbox).

The sandbox is shared and public: everything is written under a unique identifier system per
run, and no Authorization header is sent (the sandbox answers 403 to unknown tokens)."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from conftest import ROOT

from fhir_crs.cli import cli
from fhir_crs.fhir import FhirClient, NoAuth

pytestmark = pytest.mark.sandbox
SANDBOX = "https://hapi.fhir.org/baseR4"


def test_pull_and_write_back_on_the_public_sandbox(monkeypatch):
    run_system = f"urn:fhir-crs-test:{uuid.uuid4()}"
    client = FhirClient(SANDBOX, auth=NoAuth())
    bundle = json.loads((ROOT / "fixtures" / "R4" / "vignettes" / "V06.json").read_text())
    for e in bundle["entry"]:  # unique MRN so this run's patient is ours
        if e["resource"]["resourceType"] == "Patient":
            e["resource"]["identifier"] = [{"system": run_system, "value": "patient"}]
    resp = client.transaction(bundle)
    pid = next(o["response"]["location"].split("/_history")[0].rsplit("/", 1)[1]
               for i, o in zip(bundle["entry"], resp["entry"], strict=True) if i["resource"]["resourceType"] == "Patient")
    monkeypatch.setenv("FHIR_CRS_IDENTIFIER_SYSTEM", run_system)
    first = CliRunner().invoke(cli, ["pull", "--patient", pid, "--server", SANDBOX, "--json", "--write"])
    assert first.exit_code == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["cases"][0]["crs"]["astct"]["grade"] == 3
    assert data["written"][0]["status"] == "created"
    again = CliRunner().invoke(cli, ["pull", "--patient", pid, "--server", SANDBOX, "--json", "--write"])
    assert json.loads(again.stdout)["written"][0]["status"] == "unchanged"
    found = client.search("Condition", [("identifier", f"{run_system}|")], no_cache=True).matches
    assert len([c for c in found if c["identifier"][0]["system"] == run_system]) <= 1
