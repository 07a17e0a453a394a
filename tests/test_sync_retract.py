"""Issue 13, "Deletions count as changes": a vanished CAR-T infusion retracts its written case.

On the embedded server (sekmet) and on HAPI JPA. A case is keyed by its day-0 anchor (the CAR-T
product MedicationAdministration / CAR-T Procedure). When that record is marked entered-in-error,
hard-deleted, or moved to another time, the next sync finds the case gone and rewrites what an
earlier run wrote for it — the CRS and ICANS Conditions and the summary Bundle — as
entered-in-error (con-5: no clinicalStatus; a note naming the vanished infusion), with a
Provenance (NULLIFY), in one transaction; the state store then forgets the case. Pinned
difference: HAPI refuses to hard-delete an infusion our Provenance cites (409, referential
integrity), so hard deletion is shown on sekmet and pinned as refused on HAPI; entered-in-error
and a moved infusion run on both. Everything written is validated with fhir.resources R4B and,
on HAPI, with the HL7 validator.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from conftest import ROOT, empty_server, hl7_validate, load_vignette
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.provenance import Provenance

from fhir_crs.cli import cli
from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.localserver import HapiFhirServer

pytestmark = pytest.mark.integration
SCHEMA = json.loads((ROOT / "tests" / "contracts" / "sync-summary.schema.json").read_text())
OVERLAP = "2"
SYSTEM = "urn:retract"


@pytest.fixture(scope="module", params=["sekmet", "hapi"])
def server(request, tmp_path_factory):
    yield from empty_server(request, tmp_path_factory, "retract-server")


def sync(server, state: Path, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = CliRunner().invoke(cli, ["sync", "--server", server.base, "--state", str(state), "--json", *extra],
                           env={"FHIR_CRS_LOOKBACK_DAYS": "100000", "FHIR_CRS_IDENTIFIER_SYSTEM": SYSTEM,
                                "FHIR_CRS_SYNC_OVERLAP_SECONDS": OVERLAP, "FHIR_CRS_BULK_MAX_POLL": "1", **(env or {})})
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    jsonschema.validate(data, SCHEMA)
    assert not data["errors"], data["errors"]
    return data


def case_key(pid: str, infusion: str) -> str:
    return f"{pid}-{datetime.fromisoformat(infusion.replace('Z', '+00:00')):%Y%m%dT%H%M%SZ}"


def written(client: FhirClient, key: str) -> dict[str, dict[str, Any]]:
    """What is on the server for one case: "crs" / "icans" Conditions, "summary" Bundle."""
    out = {}
    for name, rtype in (("crs", "Condition"), ("icans", "Condition"), ("summary", "Bundle")):
        found = client.search(rtype, [("identifier", f"{SYSTEM}|{key}-{name}")], no_cache=True).matches
        assert len(found) <= 1, found
        if found:
            out[name] = found[0]
    return out


def status_of(cond: dict[str, Any]) -> str:
    return cond["verificationStatus"]["coding"][0]["code"]


def assert_retracted(server, client: FhirClient, case: dict[str, dict[str, Any]], infusion_refs: list[str],
                     fate: str) -> None:
    """Retracted as documented, and valid (fhir.resources R4B; on HAPI also the HL7 validator)."""
    assert {"crs", "summary"} <= set(case)
    for name in ("crs", "icans"):
        if name not in case:
            continue
        cond = case[name]
        assert status_of(cond) == "entered-in-error"
        assert "clinicalStatus" not in cond  # con-5
        assert not any(k.startswith("abatement") for k in cond)  # con-4 cannot hold without a clinicalStatus
        assert cond["identifier"][0]["system"] == SYSTEM and cond["identifier"][0]["value"].endswith(f"-{name}")
        note = cond["note"][-1]["text"]
        assert note.startswith("Retracted by fhir-crs") and fate in note
        assert all(ref in note for ref in infusion_refs), note
        Condition.model_validate(cond)
    bundle = case["summary"]
    assert bundle["type"] == "collection" and bundle["identifier"]["system"] == SYSTEM
    inner = [e["resource"] for e in bundle["entry"]]
    assert {r["resourceType"] for r in inner} >= {"Condition", "Observation", "List"}
    for r in inner:
        assert (status_of(r) if r["resourceType"] == "Condition" else r["status"]) == "entered-in-error", r
        assert "clinicalStatus" not in r
    assert any(t.get("code") == "retracted" for t in (bundle.get("meta") or {}).get("tag") or [])
    Bundle.model_validate(bundle)
    targets = [f"{r['resourceType']}/{r['id']}" for r in case.values()]
    when = case["crs"]["note"][-1]["time"]  # this retraction's (an earlier one of the same case may exist)
    provs = [p for p in client.search("Provenance", [("target", ",".join(targets))], no_cache=True).matches
             if p["activity"]["coding"][0]["code"] == "NULLIFY" and p["recorded"] == when]
    assert len(provs) == 1, provs
    assert {t["reference"].split("/_history")[0] for t in provs[0]["target"]} == set(targets)
    assert all(ref in json.dumps(provs[0]["entity"]) for ref in infusion_refs)
    Provenance.model_validate(provs[0])
    if isinstance(server, HapiFhirServer):
        for r in [*case.values(), *inner, provs[0]]:
            errors, _warnings = hl7_validate(server.base, r)
            assert errors == [], errors


def cases_in_state(state: Path, pid: str) -> list[str]:
    with sqlite3.connect(state) as db:
        return [r[0] for r in db.execute("SELECT infusion FROM written_cases WHERE patient=?", (pid,))]


def set_status(client: FhirClient, ref: str, status: str) -> None:
    res = client.read(*ref.split("/", 1))
    res["status"] = status
    client.put(ref, res)


def load_settled(client: FhirClient, vignette: str) -> str:
    """Load a vignette's patient and wait out the feed overlap, so that the next night's feed
    starts after the load (the load itself is not a change of that night)."""
    pid = load_vignette(client, vignette)
    time.sleep(float(OVERLAP) + 0.5)
    return pid


def patients_file(tmp_path: Path, pid: str) -> Path:
    """A `--patients` listing of one patient."""
    listing = tmp_path / "patients.txt"
    listing.write_text(pid + "\n")
    return listing


def test_an_entered_in_error_infusion_retracts_its_case_and_its_return_restores_it(server, tmp_path):
    """V29 (CRS 1, ICANS 3; its only CAR-T record is one MedicationAdministration), discovered
    by its CAR-T code. Marking that record entered-in-error takes the patient out of the cohort;
    the change feed still re-reads it, and both Conditions and the Bundle are retracted."""
    client = FhirClient(server.base, auth=NoAuth())
    pid = load_settled(client, "V29")
    state = tmp_path / "state.sqlite"
    first = sync(server, state)
    assert first["graded"] == 1 and first["retracted_cases"] == 0
    infusion = cases_in_state(state, pid)
    assert len(infusion) == 1
    key = case_key(pid, infusion[0])
    before = written(client, key)
    assert set(before) == {"crs", "icans", "summary"} and status_of(before["crs"]) == "provisional"
    (infusion_ref,) = infusion_refs(state, pid)  # V29's only CAR-T record, as the state store holds it
    assert infusion_ref.startswith("MedicationAdministration/")

    set_status(client, infusion_ref, "entered-in-error")
    gone = sync(server, state)
    assert gone["change_feed"] == "history" and gone["changed_patients"] == 1
    assert gone["retracted_cases"] == 1
    assert gone["written"] == {"Condition": 2, "Bundle": 1} and gone["provenance_written"] == 1
    after = written(client, key)
    assert_retracted(server, client, after, [infusion_ref], "was marked entered-in-error")
    assert after["crs"]["id"] == before["crs"]["id"] and after["crs"]["stage"] == before["crs"]["stage"]
    assert cases_in_state(state, pid) == []  # forgotten only after the write

    # idempotent: nothing more to retract, on a feed night and on a full re-read
    again = sync(server, state)
    assert again["retracted_cases"] == 0 and again["written"] == {"Condition": 0, "Bundle": 0}
    full = sync(server, state, "--full")
    assert full["retracted_cases"] == 0 and full["written"] == {"Condition": 0, "Bundle": 0}
    assert written(client, key)["crs"]["meta"]["versionId"] == after["crs"]["meta"]["versionId"]

    # the infusion is back (the status was corrected): the case is graded and written again
    set_status(client, infusion_ref, "completed")
    back = sync(server, state, "--full")
    assert back["retracted_cases"] == 0 and back["written"]["Condition"] == 2
    restored = written(client, key)
    assert status_of(restored["crs"]) == "provisional" and "clinicalStatus" in restored["crs"]
    assert restored["crs"]["id"] == before["crs"]["id"]
    assert cases_in_state(state, pid) == infusion


def test_a_moved_infusion_writes_the_new_case_and_retracts_the_old(server, tmp_path):
    """V07's CAR-T administration and procedure move one day later: the case at the new day 0 is
    written, the one at the old day 0 retracted (the same patient, two keys)."""
    client = FhirClient(server.base, auth=NoAuth())
    pid = load_settled(client, "V07")
    listing = patients_file(tmp_path, pid)
    state = tmp_path / "moved.sqlite"
    sync(server, state, "--patients", str(listing))
    (old_infusion,) = cases_in_state(state, pid)
    refs = ["MedicationAdministration/v07-medadmin-0001", "Procedure/v07-proc-0001"]
    for ref in refs:
        res = client.read(*ref.split("/", 1))
        for key in ("effectiveDateTime", "performedDateTime"):
            if key in res:
                res[key] = _later(res[key])
        for key in ("effectivePeriod", "performedPeriod"):
            if key in res:
                res[key] = {k: _later(v) for k, v in res[key].items()}
        client.put(ref, res)
    moved = sync(server, state, "--patients", str(listing))
    assert moved["changed_patients"] == 1 and moved["retracted_cases"] == 1
    (new_infusion,) = cases_in_state(state, pid)
    assert new_infusion == _later(old_infusion)
    new = written(client, case_key(pid, new_infusion))
    assert status_of(new["crs"]) == "provisional"
    old = written(client, case_key(pid, old_infusion))
    assert_retracted(server, client, old, refs, "no longer starts a CAR-T infusion at that time")
    quiet = sync(server, state, "--patients", str(listing))
    assert quiet["retracted_cases"] == 0 and quiet["graded"] == 0


def _later(stamp: str) -> str:
    return (datetime.fromisoformat(stamp.replace("Z", "+00:00")) + timedelta(days=1)).isoformat().replace("+00:00", "Z")


def test_a_hard_deleted_infusion_retracts_on_a_history_night_and_on_a_full_night(server, tmp_path):
    """sekmet: V26 (CAR-T Procedure only; CRS 1, ICANS 2) is hard-deleted, so the patient leaves
    the discovered cohort: the history feed's DELETE entry still maps to it (the graded
    resource), and its case is retracted. V02, synced with the search feed (which cannot see
    deletions), loses its infusion records: the full re-read re-reads its patient although
    discovery no longer finds it, and retracts. HAPI refuses the DELETE while the Provenance of
    our write cites the infusion (409): pinned."""
    from fhir_crs.fhir.client import VersionConflict

    client = FhirClient(server.base, auth=NoAuth())
    pid = load_settled(client, "V26")
    state = tmp_path / "deleted.sqlite"
    sync(server, state)
    (infusion,) = cases_in_state(state, pid)
    ref = "Procedure/v26-proc-0001"
    if isinstance(server, HapiFhirServer):
        with pytest.raises(VersionConflict, match="reference"):
            client.delete_url(ref)
        assert sync(server, state)["retracted_cases"] == 0
        return
    client.delete_url(ref)
    gone = sync(server, state)
    assert gone["change_feed"] == "history" and gone["deleted_resources"] == 1 and gone["retracted_cases"] == 1
    assert_retracted(server, client, written(client, case_key(pid, infusion)), [ref], "was deleted")

    # the search feed cannot see a deletion; the full re-read re-reads the written case's patient
    # although CAR-T discovery no longer finds it, and retracts
    pid2 = load_settled(client, "V02")
    state2 = tmp_path / "search.sqlite"
    env = {"FHIR_CRS_CHANGE_FEED": "search"}
    first = sync(server, state2, env=env)
    assert pid2 in cases_patients(state2)
    (infusion2,) = cases_in_state(state2, pid2)
    refs2 = ["MedicationAdministration/v02-medadmin-0001", "Procedure/v02-proc-0001"]
    for r in refs2:
        client.delete_url(r)
    blind = sync(server, state2, env=env)
    assert blind["retracted_cases"] == 0 and blind["deleted_resources"] == 0
    full = sync(server, state2, "--full", env=env)
    assert full["retracted_cases"] == 1 and full["patients"] == first["patients"]
    assert_retracted(server, client, written(client, case_key(pid2, infusion2)), refs2, "was deleted")
    assert sync(server, state2, "--full", env=env)["patients"] == first["patients"] - 1


def cases_patients(state: Path) -> set[str]:
    with sqlite3.connect(state) as db:
        return {r[0] for r in db.execute("SELECT patient FROM written_cases")}


def infusion_refs(state: Path, pid: str) -> list[str]:
    with sqlite3.connect(state) as db:
        return [ref for r in db.execute("SELECT infusion_refs FROM written_cases WHERE patient=?", (pid,)) for ref in json.loads(r[0])]


# --------------------------------------------------------------------------- Bulk: deleted[] after a bulk-only first run


def graded_refs(state: Path, pid: str) -> dict[str, str | None]:
    with sqlite3.connect(state) as db:
        return dict(db.execute("SELECT ref, version FROM graded_refs WHERE patient=?", (pid,)).fetchall())


def group_of(client: FhirClient, pid: str) -> str:
    gid = f"g-{pid[:40]}"
    client.put(f"Group/{gid}", {"resourceType": "Group", "id": gid, "type": "person", "actual": True,
                                "member": [{"entity": {"reference": f"Patient/{pid}"}}]})
    return gid


def crs_grade(case: dict[str, dict[str, Any]]) -> int:
    return int(next(c["code"] for c in case["crs"]["code"]["coding"] if c["code"].startswith("D89.83"))[-1])


def script_deleted_export(loop, gid: str, refs: list[str]) -> None:
    """The loopback in front of the server answers the next `Group/<gid>/$export` itself: a
    manifest whose only file is a `deleted[]` Bundle of `refs` (neither sekmet nor HAPI writes
    deleted[]; everything else — the re-reads, the writes — goes through to the real server)."""
    status = f"{loop.base}/bulk-status/scripted"
    loop.route("GET", f"/fhir/Group/{gid}/$export", status=202, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "information", "code": "informational"}]}, headers={"Content-Location": status})
    loop.route("GET", "/fhir/bulk-status/scripted", json={
        "transactionTime": datetime.now().astimezone().isoformat(timespec="seconds"),
        "request": f"{loop.base}/Group/{gid}/$export", "requiresAccessToken": False, "output": [], "error": [],
        "deleted": [{"type": "Bundle", "url": f"{loop.origin}/files/deleted.ndjson"}]})
    loop.route("DELETE", "/fhir/bulk-status/scripted", status=202, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "information", "code": "informational"}]})
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"fullUrl": f"{loop.base}/{r}", "request": {"method": "DELETE", "url": r}} for r in refs]}
    loop.route("GET", "/files/deleted.ndjson", body=json.dumps(bundle) + "\n", headers={"Content-Type": "application/fhir+ndjson"})


def test_bulk_only_first_run_records_what_it_graded_so_deleted_files_apply(server, tmp_path):
    """`sync --bulk` twice, the first run straight from the export (no per-patient read). It now
    records the `Type/id` + version of everything it graded, so the next export's `deleted[]`
    finds its patient: deleting V07's three vasopressor administrations lowers grade 3 -> 2,
    deleting its CAR-T records retracts the case. Neither local server writes `deleted[]` (sekmet
    has no such key; HAPI's `_since` manifest has none after a real deletion — pinned below), so
    on sekmet a loopback proxy in front of it answers the export with a deleted[] file naming
    what was really deleted; on HAPI (which refuses to delete what our write cites) the infusion is
    marked entered-in-error instead and the `_since` export's output carries it."""
    from loopback import LoopbackServer

    from fhir_crs.fhir.bulk import BulkExport

    client = FhirClient(server.base, auth=NoAuth())
    pid = load_vignette(client, "V07")  # V07 may already be on the module's server (moved): loaded again, as it was
    for ref in ("MedicationAdministration/v07-medadmin-0001", "Procedure/v07-proc-0001"):
        res = client.read(*ref.split("/", 1))
        assert "2025-04-14T09:30" in json.dumps(res), "the vignette's own times are back"
    gid = group_of(client, pid)
    time.sleep(1.1)
    state = tmp_path / "bulk.sqlite"
    if isinstance(server, HapiFhirServer):
        first = sync(server, state, "--bulk", "--group", gid)
        assert first["change_feed"] == "bulk" and first["graded"] == 1
        refs = graded_refs(state, pid)
        assert {"MedicationAdministration/v07-medadmin-0007", "MedicationAdministration/v07-medadmin-0001",
                f"Patient/{pid}"} <= set(refs) and all(refs.values())  # with their versions
        (infusion,) = cases_in_state(state, pid)
        # pinned: HAPI's _since export lists no deleted[] after a real deletion
        obs = client.post("Observation", {"resourceType": "Observation", "status": "final",
                                          "subject": {"reference": f"Patient/{pid}"}, "code": {"text": "unmapped note"},
                                          "effectiveDateTime": "2025-04-14T10:00:00Z", "valueString": "x"})
        bulk = BulkExport(client, poll_interval=0.5, min_poll_interval=0.2, max_poll_interval=1, timeout=300)
        before, _ = bulk.run(group_id=gid, types=("Observation",))
        client.delete_url(f"Observation/{obs[1]['id']}")
        time.sleep(1.1)
        after, _ = bulk.run(group_id=gid, types=("Observation",), since=before.transaction_time)
        assert after.deleted == ()
        refs_eie = ["MedicationAdministration/v07-medadmin-0001", "Procedure/v07-proc-0001"]
        for ref in refs_eie:
            set_status(client, ref, "entered-in-error")
        time.sleep(1.1)
        gone = sync(server, state, "--bulk", "--group", gid)
        assert gone["retracted_cases"] == 1
        assert_retracted(server, client, written(client, case_key(pid, infusion)), refs_eie, "was marked entered-in-error")
        for ref in refs_eie:
            set_status(client, ref, "completed")
        return
    with LoopbackServer(tmp_path / "loop").proxy(server.base) as loop:
        proxied = type("Proxied", (), {"base": loop.base})()
        first = sync(proxied, state, "--bulk", "--group", gid)
        assert first["change_feed"] == "bulk" and first["graded"] == 1 and first["retracted_cases"] == 0
        refs = graded_refs(state, pid)
        assert {"MedicationAdministration/v07-medadmin-0007", "MedicationAdministration/v07-medadmin-0001",
                f"Patient/{pid}"} <= set(refs) and all(refs.values())
        (infusion,) = cases_in_state(state, pid)
        assert crs_grade(written(client, case_key(pid, infusion))) == 3

        pressors = [f"MedicationAdministration/{rid}" for rid in ("v07-medadmin-0007", "v07-medadmin-0008", "v07-medadmin-0011")]
        for ref in pressors:
            client.delete_url(ref)
        script_deleted_export(loop, gid, pressors)
        lowered = sync(proxied, state, "--bulk", "--group", gid)
        assert lowered["deleted_resources"] == 3 and lowered["changed_patients"] == 1 and lowered["graded"] == 1
        assert crs_grade(written(client, case_key(pid, infusion))) == 2  # grade 3 needed the vasopressor

        anchors = ["MedicationAdministration/v07-medadmin-0001", "Procedure/v07-proc-0001"]
        for ref in anchors:
            client.delete_url(ref)
        script_deleted_export(loop, gid, anchors)
        gone = sync(proxied, state, "--bulk", "--group", gid)
        assert gone["deleted_resources"] == 2 and gone["retracted_cases"] == 1
        assert_retracted(server, client, written(client, case_key(pid, infusion)), anchors, "was deleted")
        assert cases_in_state(state, pid) == []


def test_a_state_store_from_before_written_cases_still_retracts(server, tmp_path):
    """A state store written before cases were recorded (no `written_cases` rows): the stored
    grades' infusions give the case keys, and the vanished case is retracted all the same (the
    note cannot name the infusion record it never stored)."""
    client = FhirClient(server.base, auth=NoAuth())
    pid = load_settled(client, "V30")
    listing = patients_file(tmp_path, pid)
    state = tmp_path / "legacy.sqlite"
    sync(server, state, "--patients", str(listing))
    (infusion,) = cases_in_state(state, pid)
    anchors = infusion_refs(state, pid)
    with sqlite3.connect(state) as db:
        db.execute("DELETE FROM written_cases")
    for ref in anchors:
        set_status(client, ref, "entered-in-error")
    gone = sync(server, state, "--patients", str(listing))
    assert gone["retracted_cases"] == 1
    assert_retracted(server, client, written(client, case_key(pid, infusion)), [], "(reference not recorded)")
    for ref in anchors:
        set_status(client, ref, "completed")
