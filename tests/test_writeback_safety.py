"""Issue 14 against a real FHIR server (sekmet-fhir on 127.0.0.1): every write-back transaction
also writes a Provenance; a rerun with other settings or mapping tables does not overwrite the
stored Condition unless --allow-convention-change; `sync --dry-run` writes nothing at all (the
state store included) and lists what it would write; `pull --dry-run` prints that list and the
raw transaction only with --json."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from conftest import ROOT, load_vignette
from fhir.resources.R4B.provenance import Provenance

from fhir_crs import __version__
from fhir_crs.cli import cli
from fhir_crs.conventions import EXTENSION
from fhir_crs.fhir import FhirClient, NoAuth

pytestmark = pytest.mark.integration
SCHEMA = json.loads((ROOT / "tests" / "contracts" / "sync-summary.schema.json").read_text())


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def client(fhir_server) -> FhirClient:
    return FhirClient(fhir_server.base, auth=NoAuth())


@pytest.fixture(scope="module")
def loaded(client: FhirClient) -> dict[str, str]:
    return {v: load_vignette(client, v) for v in ("V06", "V25", "V11")}


def by_identifier(client: FhirClient, rtype: str, system: str, suffix: str) -> list[dict[str, Any]]:
    found = client.search(rtype, [("identifier", f"{system}|")], no_cache=True).matches
    out = []
    for r in found:
        idents = r["identifier"] if isinstance(r["identifier"], list) else [r["identifier"]]
        if any(i.get("system") == system and i.get("value", "").endswith(suffix) for i in idents):
            out.append(r)
    return out


def provenances_for(client: FhirClient, ref: str) -> list[dict[str, Any]]:
    return client.search("Provenance", [("target", ref)], no_cache=True).matches


def test_write_back_carries_provenance_and_a_convention_change_is_refused(fhir_server, client, loaded, tmp_path):
    system = "urn:fhir-crs:prov-test"
    env = {"FHIR_CRS_IDENTIFIER_SYSTEM": system}
    pid = loaded["V25"]  # CRS grade 2 + ICANS grade 3: two Conditions and the summary Bundle
    code, out, err = run("pull", "--patient", pid, "--server", fhir_server.base, "--write", "--json", env=env)
    assert code == 0, err
    (w,) = json.loads(out)["written"]
    assert w["status"] == "created" and w["resources"]["provenance"].startswith("Provenance/")
    (crs,) = by_identifier(client, "Condition", system, "-crs")
    (icans,) = by_identifier(client, "Condition", system, "-icans")
    (summary,) = by_identifier(client, "Bundle", system, "-summary")
    (prov,) = provenances_for(client, f"Condition/{crs['id']}")
    Provenance.model_validate(prov)
    assert {t["reference"] for t in prov["target"]} == {f"Condition/{crs['id']}", f"Condition/{icans['id']}", f"Bundle/{summary['id']}"}
    device = prov["contained"][0]
    assert device["resourceType"] == "Device" and device["version"][0]["value"] == __version__
    assert prov["agent"][0]["who"]["reference"] == f"#{device['id']}"
    sources = {e["what"]["reference"] for e in prov["entity"]}
    evidence = {d["reference"].split("/_history/")[0] for d in crs["evidence"][0]["detail"]}  # evidence may name the version
    assert f"Patient/{pid}" in sources and evidence <= {s.split("/_history/")[0] for s in sources}
    for ref in list(sources)[:5]:  # the entities are the server's own resources
        rtype, rid = ref.split("/_history/")[0].split("/")
        assert client.read(rtype, rid)["id"] == rid
    stored_ext = next(x for x in crs["extension"] if x["url"] == EXTENSION)
    assert next(x for x in prov["extension"] if x["url"] == EXTENSION) == stored_ext
    tables = {x["valueString"].split(" sha256:")[0]: x["valueString"].split(" sha256:")[1]
              for x in stored_ext["extension"] if x["url"] == "table"}
    import tomllib

    obs = tomllib.loads((ROOT / "mappings" / "observations.toml").read_text())
    assert tables["observations.toml"] == hashlib.sha256(json.dumps(obs, sort_keys=True).encode()).hexdigest()

    # unchanged rerun: nothing written, no second Provenance
    code, out, err = run("pull", "--patient", pid, "--server", fhir_server.base, "--write", "--json", env=env)
    assert code == 0 and json.loads(out)["written"][0]["status"] == "unchanged"
    assert len(provenances_for(client, f"Condition/{crs['id']}")) == 1

    # other settings: refused, the stored Condition untouched, the refusal names what differs
    code, out, err = run("pull", "--patient", pid, "--server", fhir_server.base, "--write", "--set", "capd_delirium=12",
                         "--set", "fever_c=38.5", env=env)
    assert code == 9, (out, err)
    line = err.strip().splitlines()[-1]
    assert f"not overwriting Condition/{crs['id']}" in line and "capd_delirium 9.0 -> 12.0" in line and "fever_c 38.0 -> 38.5" in line
    assert "--allow-convention-change" in line
    (same,) = by_identifier(client, "Condition", system, "-crs")
    assert same["meta"]["versionId"] == crs["meta"]["versionId"]

    # other mapping tables: refused too, naming the table
    mapdir = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mapdir)
    table = mapdir / "observations.toml"  # a site adds a local temperature code
    table.write_text(table.read_text().replace('"http://loinc.org|8310-5",', '"urn:site:obs|TEMP-X", "http://loinc.org|8310-5",', 1))
    code, _, err = run("pull", "--patient", pid, "--server", fhir_server.base, "--write", "--mappings", str(mapdir),
                       "--set", "capd_delirium=12", env=env)
    assert code == 9 and "mapping tables: observations.toml (changed)" in err

    # allowed: updated in place (If-Match), new conventions recorded, a second Provenance
    code, out, err = run("pull", "--patient", pid, "--server", fhir_server.base, "--write", "--json", "--set", "capd_delirium=12",
                         "--allow-convention-change", env=env)
    assert code == 0, err
    assert json.loads(out)["written"][0]["status"] == "updated"
    (updated,) = by_identifier(client, "Condition", system, "-crs")
    assert int(updated["meta"]["versionId"]) == int(crs["meta"]["versionId"]) + 1
    ext = next(x for x in updated["extension"] if x["url"] == EXTENSION)
    assert {"url": "settings", "valueString": '{"capd_delirium": 12.0}'} in ext["extension"]
    provs = provenances_for(client, f"Condition/{crs['id']}")
    assert len(provs) == 2 and {p["activity"]["coding"][0]["code"] for p in provs} == {"CREATE", "UPDATE"}


def test_sync_refuses_a_convention_change_per_patient(fhir_server, client, loaded, tmp_path):
    system = "urn:fhir-crs:sync-conv"
    listing = tmp_path / "patients.txt"
    listing.write_text(loaded["V06"] + "\n")
    env = {"FHIR_CRS_IDENTIFIER_SYSTEM": system}
    args = ["sync", "--server", fhir_server.base, "--patients", str(listing), "--json"]
    code, out, err = run(*args, "--state", str(tmp_path / "a.sqlite"), env=env)
    assert code == 0, err and json.loads(out)["provenance_written"] == 1
    # a new state store (so the result is re-graded) and another convention: refused, exit 1
    code, out, err = run(*args, "--state", str(tmp_path / "b.sqlite"), "--set", "vasopressor_overlap_min=30",
                         "--set", "fever_c=39.5", env=env)
    data = json.loads(out)
    assert code == 1 and data["written"] == {"Condition": 0, "Bundle": 0}
    assert "fever_c 38.0 -> 39.5" in data["errors"][0]["error"] and "vasopressor_overlap_min 60.0 -> 30.0" in data["errors"][0]["error"]
    code, out, err = run(*args, "--state", str(tmp_path / "b.sqlite"), "--set", "vasopressor_overlap_min=30",
                         "--set", "fever_c=39.5", "--allow-convention-change", env=env)
    data = json.loads(out)
    assert code == 0, err
    assert data["written"] == {"Condition": 1, "Bundle": 1} and data["provenance_written"] == 1


def _snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_sync_dry_run_writes_nothing_at_all_and_lists_what_it_would_write(fhir_server, client, loaded, tmp_path):
    system = "urn:fhir-crs:dry"
    env = {"FHIR_CRS_IDENTIFIER_SYSTEM": system}
    listing = tmp_path / "patients.txt"
    listing.write_text("\n".join(loaded[v] for v in ("V06", "V25")) + "\n")
    state = tmp_path / "state" / "state.sqlite"
    args = ["sync", "--server", fhir_server.base, "--patients", str(listing), "--state", str(state)]
    # 1. no state yet: the dry run creates neither the file nor its folder
    code, out, err = run(*args, "--json", "--dry-run", env=env)
    assert code == 0, err
    data = json.loads(out)
    jsonschema.validate(data, SCHEMA)
    assert not state.parent.exists()
    assert data["dry_run"] is True and data["written"] == {"Condition": 0, "Bundle": 0}
    assert by_identifier(client, "Condition", system, "-crs") == []
    rows = {(w["patient"], w["kind"]): w for w in data["would_write"]}
    v25 = f"Patient/{loaded['V25']}"
    assert rows[(v25, "crs")] | {"request": "-"} == {"patient": v25, "infusion": rows[(v25, "crs")]["infusion"], "resource": "Condition",
                                                   "kind": "crs", "action": "create", "old_grade": None, "new_grade": 2, "request": "-"}
    assert rows[(v25, "icans")]["new_grade"] == 3 and rows[(v25, "summary")]["resource"] == "Bundle"
    assert rows[(v25, "provenance")]["action"] == "create"
    # 2. a real run, then new conventions: the dry run shows old -> new grades and the refusal,
    #    and leaves the state file byte for byte (and its mtime) as it was
    code, out, err = run(*args, "--json", env=env)
    assert code == 0, err
    before = _snapshot(state)
    side = sorted(p.name for p in state.parent.iterdir())
    # (--since: re-grade although the data did not change)
    code, out, err = run(*args, "--json", "--dry-run", "--since", "2000-01-01T00:00:00Z", "--set", "capd_delirium=12",
                         "--set", "fever_c=39.5", env=env)
    assert code == 0, err
    data = json.loads(out)
    jsonschema.validate(data, SCHEMA)
    assert _snapshot(state) == before and sorted(p.name for p in state.parent.iterdir()) == side
    crs_id = [c for c in by_identifier(client, "Condition", system, "-crs") if c["subject"]["reference"] == v25]
    row = next(w for w in data["would_write"] if w["patient"] == v25 and w["kind"] == "crs")
    assert row["action"] == "update" and row["resource"] == f"Condition/{crs_id[0]['id']}"
    assert (row["old_grade"], row["new_grade"]) == (2, 0)  # its fevers are below 39.5 °C
    assert "refused" in row and "--allow-convention-change" in row["refused"]
    assert [c for c in by_identifier(client, "Condition", system, "-crs") if c["subject"]["reference"] == v25] == crs_id
    # 3. the text output lists the same
    code, out, err = run(*args, "--dry-run", "--since", "2000-01-01T00:00:00Z", "--set", "fever_c=39.5", env=env)
    assert code == 0, err
    assert "Dry run: nothing written" in out and _snapshot(state) == before
    assert f"{v25} update Condition/{crs_id[0]['id']} (crs): ASTCT grade 2 -> 0" in out
    assert "refused without --allow-convention-change" in out


def test_pull_dry_run_prints_the_summary_and_the_transaction_only_with_json(fhir_server, client, loaded):
    pid = loaded["V11"]
    env = {"FHIR_CRS_IDENTIFIER_SYSTEM": "urn:fhir-crs:pull-dry"}
    code, out, err = run("pull", "--patient", pid, "--server", fhir_server.base, "--dry-run", env=env)
    assert code == 0, err
    assert "Dry run" in out and "create Condition (crs): ASTCT grade – -> " in out and "create Provenance (provenance)" in out
    assert '"resourceType"' not in out and "transaction" in out  # no raw JSON, only a pointer to --json
    code, out, err = run("pull", "--patient", pid, "--server", fhir_server.base, "--dry-run", "--json", env=env)
    assert code == 0, err
    (w,) = json.loads(out)["written"]
    assert w["status"] == "dry-run" and w["transaction"]["type"] == "transaction"
    assert w["transaction"]["entry"][-1]["request"] == {"method": "POST", "url": "Provenance"}
    assert [c["action"] for c in w["changes"]] == ["create"] * len(w["changes"])
    assert by_identifier(client, "Condition", "urn:fhir-crs:pull-dry", "-crs") == []
