"""Issue 13: nightly sync at cohort scale, on the embedded server (sekmet) and on HAPI JPA.

A cohort of 50 synthetic CAR-T patients plus two vignettes (V04: no CRS until a fever is added;
V07: grade 3 carried by its three norepinephrine administrations) is synced once (a full read,
batched: <= 6 requests per patient in all, 4 per patient here: two read batches, one batch of the
write-back's identifier look-ups, the transaction), then:

* a quiet night costs <= 10 requests in all (the change feed: CapabilityStatement + one
  type-level `_history?_since=` per graded type, Condition and Medication: 7 — both servers offer history,
  so both pin the history feed);
* a changed Medication (shared, outside the patient compartment) re-grades exactly the cohort
  patients whose graded administrations reference it: it stops, then again becomes, a
  vasopressor (grade 3 -> 2 -> 3); a hard DELETE of it (sekmet) lowers the grade;
* one new Observation re-grades exactly that patient;
* a hard DELETE of V07's vasopressor administrations (seen as history DELETE entries) lowers the
  written grade 3 -> 2;
* a write racing a running sync is picked up by the next run;
* `change_feed = "search"` (`_lastUpdated` searches; no deletions in that feed) and `--full`: the
  full re-read catches a deletion the search feed cannot see and reports it;
* `change_feed = "per-patient"`: the old per-patient check (5 requests per patient: four counts and
  the Condition read that tells fhir-crs's own grade Conditions from changes);
* a first run with one failing patient: the next night re-reads that patient only, not everyone
  (the retry of an unfinished night), and the mark advances once it is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from conftest import ROOT, empty_server, load_vignette

from fhir_crs.cli import cli
from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.localserver import HapiFhirServer
from fhir_crs.synthetic import generate_cohort

pytestmark = pytest.mark.integration
SCHEMA = json.loads((ROOT / "tests" / "contracts" / "sync-summary.schema.json").read_text())
N_SYNTHETIC = 50
KEEP_OBSERVATIONS = 30  # per synthetic patient: enough to grade, quick to load on both servers
# The feed re-reads the overlap before the last high-water mark (default 300 s, for in-flight
# transactions and clock skew). A night is quiet when nothing was written in it: the tests keep the
# overlap short and load their data longer than that before the first run.
OVERLAP = "3"


@pytest.fixture(scope="module", params=["sekmet", "hapi"])
def server(request, tmp_path_factory):
    yield from empty_server(request, tmp_path_factory, "feed-server")


@pytest.fixture(scope="module")
def cohort(server) -> dict[str, str]:
    client = FhirClient(server.base, auth=NoAuth(), timeout=300)
    for bundle in generate_cohort(N_SYNTHETIC, seed=13):
        kept, n_obs = [], 0
        for e in bundle["entry"]:
            if e["resource"]["resourceType"] == "Observation":
                n_obs += 1
                if n_obs > KEEP_OBSERVATIONS:
                    continue
            kept.append(e)
        client.transaction(dict(bundle, entry=kept))
    loaded = {v: load_vignette(client, v) for v in ("V04", "V07")}
    time.sleep(float(OVERLAP) + 0.5)
    return loaded


def sync(server, state: Path, *extra: str, env: dict[str, str] | None = None, exit_code: int = 0) -> dict[str, Any]:
    r = CliRunner().invoke(cli, ["sync", "--server", server.base, "--state", str(state), "--json", *extra],
                           env={"FHIR_CRS_LOOKBACK_DAYS": "100000", "FHIR_CRS_IDENTIFIER_SYSTEM": "urn:feed",
                                "FHIR_CRS_SYNC_OVERLAP_SECONDS": OVERLAP, **(env or {})})
    assert r.exit_code == exit_code, r.stderr
    data = json.loads(r.stdout)
    jsonschema.validate(data, SCHEMA)
    return data


def crs_grade(client: FhirClient, pid: str, system: str = "urn:feed") -> int:
    found = [c for c in client.search("Condition", [("subject", f"Patient/{pid}")], no_cache=True).matches
             if any(i.get("system") == system and i.get("value", "").endswith("-crs") for i in c.get("identifier") or [])]
    assert len(found) == 1, found
    code = next(c["code"] for c in found[0]["code"]["coding"] if c["code"].startswith("D89.83"))
    return int(code[-1])


def icans_grade(client: FhirClient, pid: str, system: str = "urn:feed") -> int | None:
    """The written ICANS grade (None: no ICANS Condition written, i.e. none found)."""
    found = [c for c in client.search("Condition", [("subject", f"Patient/{pid}")], no_cache=True).matches
             if any(i.get("system") == system and i.get("value", "").endswith("-icans") for i in c.get("identifier") or [])]
    if not found:
        return None
    assert len(found) == 1, found
    code = next(c["code"] for c in found[0]["code"]["coding"] if c["code"].startswith("G92.0"))
    return int(code[-1])


def _infusion_start(client: FhirClient, pid: str) -> datetime:
    t0 = next(c for c in client.search("Procedure", [("patient", pid)], no_cache=True).matches if "1156961008" in json.dumps(c["code"]))
    return datetime.fromisoformat((t0.get("performedDateTime") or t0["performedPeriod"]["start"]).replace("Z", "+00:00"))


def seizure(client: FhirClient, pid: str, hours_after_infusion: float) -> None:
    """A generalized seizure on the problem list: a Condition, coded, with its onset."""
    client.post("Condition", {
        "resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}],
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91175000"}], "text": "Generalized tonic-clonic seizure"},
        "onsetDateTime": (_infusion_start(client, pid) + timedelta(hours=hours_after_infusion)).isoformat().replace("+00:00", "Z"),
    })


def fever(client: FhirClient, pid: str, hours_after_infusion: float) -> None:
    t0 = next(c for c in client.search("Procedure", [("patient", pid)], no_cache=True).matches if "1156961008" in json.dumps(c["code"]))
    start = datetime.fromisoformat((t0.get("performedDateTime") or t0["performedPeriod"]["start"]).replace("Z", "+00:00"))
    client.post("Observation", {
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "effectiveDateTime": (start + timedelta(hours=hours_after_infusion)).isoformat().replace("+00:00", "Z"),
        "valueQuantity": {"value": 38.7, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"},
    })


def hard_delete(server, client: FhirClient, refs: list[str]) -> bool:
    """DELETE `refs`; False when the server refuses. Pinned difference: HAPI (referential
    integrity on delete, its default) answers 409 while the Condition fhir-crs wrote cites the
    resource as evidence (Condition.evidence.detail, and its Provenance entity.what), so on a
    default HAPI graded evidence cannot be hard-deleted at all; sekmet deletes it."""
    from fhir_crs.fhir.client import VersionConflict

    if isinstance(server, HapiFhirServer):
        for ref in refs:
            with pytest.raises(VersionConflict, match="reference"):
                client.delete_url(ref)
        return False
    for ref in refs:
        client.delete_url(ref)
    return True


def test_quiet_night_new_observation_and_hard_delete(server, cohort, tmp_path):
    client = FhirClient(server.base, auth=NoAuth())
    state = tmp_path / "state.sqlite"
    patients = N_SYNTHETIC + 2
    first = sync(server, state)
    assert first["patients"] == patients and first["graded"] == patients and not first["errors"]
    assert first["change_feed"] == "full" and first["reconciliation"]["reason"] == "first run"
    assert first["changed_patients"] == patients and first["high_water"]
    # issue 13: <= 6 requests per patient, all included (discovery, metadata). Per patient: two
    # read batches, one batch of the three identifier look-ups, the transaction = 4
    assert first["requests"] <= 6 * patients, first["requests"]
    assert first["requests"] <= 4 * patients + 4, first["requests"]
    assert crs_grade(client, cohort["V07"]) == 3

    quiet = sync(server, state)
    # CapabilityStatement + Patient/Procedure/MedicationAdministration/Observation/Medication _history
    assert quiet["requests"] <= 10, quiet["requests"]
    assert quiet["requests"] == 7, quiet["requests"]
    assert quiet["change_feed"] == "history"  # both servers offer type-level history
    assert quiet["graded"] == 0 and quiet["changed_patients"] == 0 and quiet["unchanged"] == patients
    assert quiet["written"] == {"Condition": 0, "Bundle": 0} and quiet["deleted_resources"] == 0
    assert quiet["high_water"] >= first["high_water"]

    fever(client, cohort["V04"], 59)  # afebrile hypotension at +60 becomes CRS grade 2
    one = sync(server, state)
    assert one["changed_patients"] == 1 and one["graded"] == 1 and one["unchanged"] == patients - 1
    assert one["written"] == {"Condition": 1, "Bundle": 1}
    assert crs_grade(client, cohort["V04"]) == 2
    assert one["requests"] <= 10 + 6, one["requests"]

    # a seizure charted only on the problem list (a Condition, no Observation) is a change of
    # the data: the Condition feed re-grades exactly that patient, and pull reads the Condition
    # (before, pull/sync never read Conditions: ICANS grade 0 online, 3 offline)
    assert icans_grade(client, cohort["V04"]) is None
    seizure(client, cohort["V04"], 62)
    fit = sync(server, state)
    assert fit["changed_patients"] == 1 and fit["graded"] == 1, fit
    assert fit["written"] == {"Condition": 2, "Bundle": 1}  # the new ICANS one; the case's content hash is on all three
    assert icans_grade(client, cohort["V04"]) == 3
    assert sync(server, state)["changed_patients"] == 0  # its own ICANS Condition is not a change

    pressors = [f"MedicationAdministration/{rid}" for rid in ("v07-medadmin-0007", "v07-medadmin-0008", "v07-medadmin-0011")]
    if not hard_delete(server, client, pressors):  # HAPI: refused while our Condition cites them
        assert sync(server, state)["graded"] == 0
        return
    gone = sync(server, state)
    assert gone["deleted_resources"] == 3 and gone["changed_patients"] == 1 and gone["graded"] == 1
    assert gone["written"]["Condition"] == 1
    assert crs_grade(client, cohort["V07"]) == 2  # grade 3 needed the vasopressor

    again = sync(server, state)  # the deletions (inside the overlap) are not counted twice
    assert again["graded"] == 0 and again["deleted_resources"] == 0 and again["requests"] <= 10

    v07 = {e["resource"]["id"]: e["resource"] for e in json.loads((ROOT / "fixtures" / "R4" / "vignettes" / "V07.json").read_text())["entry"]}
    for ref in pressors:  # created again under the same ids (new versions after the deletions)
        client.put(ref, v07[ref.split("/")[1]])
    wide = {"FHIR_CRS_SYNC_OVERLAP_SECONDS": "120"}  # the deletions and re-creations inside the overlap, surely
    back = sync(server, state, env=wide)
    assert back["graded"] == 1 and back["changed_patients"] == 1 and crs_grade(client, cohort["V07"]) == 3
    settled = sync(server, state, env=wide)  # a deletion older than the graded re-created version: not a change
    assert settled["graded"] == 0 and settled["deleted_resources"] == 0, settled


PRESSORS_V07 = ("v07-medadmin-0007", "v07-medadmin-0008", "v07-medadmin-0011")


def _shared_pressor_patients(client: FhirClient, med_id: str, prefixes: tuple[str, ...]) -> list[str]:
    """V07 twice (ids prefixed), its three norepinephrine administrations pointing at one shared
    server Medication `med_id` instead of their contained one; returns the Patient ids."""
    raw = (ROOT / "fixtures" / "R4" / "vignettes" / "V07.json").read_text()
    medication = None
    entries = []
    for prefix in prefixes:
        for e in json.loads(raw.replace("v07-", f"{prefix}-v07-"))["entry"]:
            r = e["resource"]
            if r["resourceType"] == "MedicationAdministration" and r["id"].removeprefix(f"{prefix}-") in PRESSORS_V07:
                (contained,) = r.pop("contained")
                medication = {**contained, "id": med_id}
                r["medicationReference"] = {"reference": f"Medication/{med_id}"}
            entries.append({"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}})
    assert medication is not None
    client.put(f"Medication/{med_id}", medication)
    client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return [f"{prefix}-v07-patient" for prefix in prefixes]


def test_a_changed_medication_regrades_the_patients_whose_administrations_reference_it(server, cohort, tmp_path):
    client = FhirClient(server.base, auth=NoAuth())
    med = "mf-pressor"
    pa, pb = _shared_pressor_patients(client, med, ("mfa", "mfb"))
    time.sleep(float(OVERLAP) + 0.5)
    listing = tmp_path / "patients.txt"
    listing.write_text(f"{pa}\n{pb}\n{cohort['V04']}\n")
    state = tmp_path / "med.sqlite"
    env = {"FHIR_CRS_IDENTIFIER_SYSTEM": "urn:med-feed"}

    def night() -> dict[str, Any]:
        return sync(server, state, "--patients", str(listing), env=env)

    def grades() -> list[int]:
        return [crs_grade(client, p, "urn:med-feed") for p in (pa, pb)]

    first = night()
    assert first["graded"] == 3 and not first["errors"] and grades() == [3, 3]  # norepinephrine: grade 3
    quiet = night()
    assert quiet["graded"] == 0 and quiet["changed_patients"] == 0 and quiet["requests"] == 7  # + Medication/_history
    pressor = client.read("Medication", med)
    saline = {**pressor, "code": {"text": "sodium chloride 0.9% 250 mL"},
              "ingredient": [{"itemCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                                  "code": "313002"}], "text": "sodium chloride"}}]}
    client.put(f"Medication/{med}", saline)  # the shared Medication stops being a vasopressor
    changed = night()
    assert changed["changed_patients"] == 2 and changed["graded"] == 2 and changed["unchanged"] == 1  # not V04
    assert changed["written"]["Condition"] == 2 and grades() == [2, 2]
    client.put(f"Medication/{med}", {**pressor, "id": med})  # and becomes one again
    back = night()
    assert back["changed_patients"] == 2 and grades() == [3, 3]
    again = night()  # the Medication's version (inside the overlap) was graded: not re-read
    assert again["graded"] == 0 and again["changed_patients"] == 0
    if not hard_delete(server, client, [f"Medication/{med}"]):  # HAPI: refused while administrations cite it
        return
    gone = night()
    assert gone["deleted_resources"] == 1 and gone["changed_patients"] == 2 and grades() == [2, 2]
    after = night()  # its absence was graded: the DELETE entry (inside the overlap) is not counted twice
    assert after["graded"] == 0 and after["deleted_resources"] == 0


def test_bulk_nights_see_a_changed_or_deleted_medication(server, cohort, tmp_path):
    """`sync --bulk`: a patient-level `$export?_since=` carries no Medication (outside the Patient
    compartment), so before this a re-coded or deleted shared Medication never re-graded its
    users on the Bulk path. A Bulk night now also reads the Medication feed since the last export
    (one `_history` read) and re-grades exactly the patients whose graded administrations
    reference the changed version: grade 3 -> 2 when it stops being a vasopressor, back to 3, and
    (sekmet; HAPI refuses the DELETE while administrations cite it) 2 after a hard DELETE."""
    client = FhirClient(server.base, auth=NoAuth(), timeout=300)
    med = "mb-pressor"
    pa, pb = _shared_pressor_patients(client, med, ("mba", "mbb"))
    gid = "g-med-bulk"
    client.put(f"Group/{gid}", {"resourceType": "Group", "id": gid, "type": "person", "actual": True,
                                "member": [{"entity": {"reference": f"Patient/{p}"}} for p in (pa, pb)]})
    time.sleep(float(OVERLAP) + 0.5)
    state = tmp_path / "med-bulk.sqlite"
    env = {"FHIR_CRS_IDENTIFIER_SYSTEM": "urn:med-bulk", "FHIR_CRS_BULK_MAX_POLL": "1"}

    def night() -> dict[str, Any]:
        data = sync(server, state, "--bulk", "--group", gid, env=env)
        assert data["change_feed"] == "bulk" and not data["errors"], data["errors"]
        return data

    def grades() -> list[int]:
        return [crs_grade(client, p, "urn:med-bulk") for p in (pa, pb)]

    first = night()
    assert first["graded"] == 2 and grades() == [3, 3]
    time.sleep(1.1)  # the next export's _since is the first one's transactionTime (whole seconds)
    quiet = night()
    assert quiet["changed_patients"] == 0 and quiet["graded"] == 0
    pressor = client.read("Medication", med)
    saline = {**pressor, "code": {"text": "sodium chloride 0.9% 250 mL"},
              "ingredient": [{"itemCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                                  "code": "313002"}], "text": "sodium chloride"}}]}
    client.put(f"Medication/{med}", saline)
    time.sleep(1.1)
    changed = night()
    assert changed["changed_patients"] == 2 and changed["graded"] == 2 and grades() == [2, 2]
    client.put(f"Medication/{med}", {**pressor, "id": med})
    time.sleep(1.1)
    back = night()
    assert back["changed_patients"] == 2 and grades() == [3, 3]
    time.sleep(1.1)
    again = night()  # that version was graded (the feed's overlap re-reads it): nobody re-read
    assert again["changed_patients"] == 0 and again["graded"] == 0
    if not hard_delete(server, client, [f"Medication/{med}"]):
        return
    time.sleep(1.1)
    gone = night()
    assert gone["deleted_resources"] == 1 and gone["changed_patients"] == 2 and grades() == [2, 2]


def test_a_write_racing_the_sync_is_picked_up_by_the_next_run(server, cohort, tmp_path):
    client = FhirClient(server.base, auth=NoAuth())
    state = tmp_path / "race.sqlite"
    listing = tmp_path / "patients.txt"
    listing.write_text(f"{cohort['V04']}\n{cohort['V07']}\n")
    env = {"FHIR_CRS_IDENTIFIER_SYSTEM": "urn:race-feed"}
    sync(server, state, "--patients", str(listing), env=env)
    time.sleep(float(OVERLAP) + 0.5)
    fever(client, cohort["V04"], 20)  # a change, so the next run has a patient to read
    args = [sys.executable, "-m", "fhir_crs", "sync", "--server", server.base, "--state", str(state), "--json", "--workers", "1",
            "--patients", str(listing)]
    proc = subprocess.Popen(args, env={**os.environ, "FHIR_CRS_LOOKBACK_DAYS": "100000", "FHIR_CRS_SYNC_OVERLAP_SECONDS": OVERLAP, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    fed = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "change feed" in line:
                fed.set()

    threading.Thread(target=read, daemon=True).start()
    assert fed.wait(120), "".join(lines)
    fever(client, cohort["V07"], 30)  # written after the feed was read, while the run re-reads V04
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines)
    racing = json.loads(out)
    assert racing["changed_patients"] == 1  # V04 only: V07's write came after the high-water mark
    nxt = sync(server, state, "--patients", str(listing), env=env)
    assert nxt["changed_patients"] == 1 and nxt["graded"] == 1  # V07, now


def test_search_feed_misses_deletions_and_full_reconciliation_finds_them(server, cohort, tmp_path):
    """Pinned difference of the feeds (same on both servers): `_lastUpdated` searches see new and
    changed resources but never a deletion; `--full` re-reads everyone and reports what it found."""
    client = FhirClient(server.base, auth=NoAuth())
    pid = load_vignette(client, "V06")  # grade 3 with norepinephrine
    time.sleep(float(OVERLAP) + 0.5)
    listing = tmp_path / "patients.txt"
    listing.write_text(f"{pid}\n{cohort['V04']}\n")
    state = tmp_path / "search.sqlite"
    env = {"FHIR_CRS_CHANGE_FEED": "search", "FHIR_CRS_IDENTIFIER_SYSTEM": "urn:search-feed"}
    first = sync(server, state, "--patients", str(listing), env=env)
    assert first["graded"] == 2
    quiet = sync(server, state, "--patients", str(listing), env=env)
    assert quiet["change_feed"] == "search" and quiet["graded"] == 0 and quiet["requests"] <= 7
    before = crs_grade(client, pid, "urn:search-feed")
    pressors = [m for m in client.search("MedicationAdministration", [("patient", pid)], no_cache=True).matches
                if "#med" in json.dumps(m.get("medicationReference")) or "norepinephrine" in json.dumps(m).lower()]
    assert pressors
    if not hard_delete(server, client, [f"MedicationAdministration/{m['id']}" for m in pressors]):
        return  # HAPI: refused while our Condition cites them (see hard_delete)
    blind = sync(server, state, "--patients", str(listing), env=env)
    assert blind["graded"] == 0 and blind["deleted_resources"] == 0  # the search feed cannot see it
    full = sync(server, state, "--patients", str(listing), "--full", env=env)
    assert full["change_feed"] == "full" and full["reconciliation"] == {"reason": "--full", "patients": 2, "found_changed": 1}
    assert crs_grade(client, pid, "urn:search-feed") < before


def test_per_patient_fallback(server, cohort, tmp_path):
    listing = tmp_path / "patients.txt"
    listing.write_text(f"{cohort['V04']}\n{cohort['V07']}\n")
    state = tmp_path / "pp.sqlite"
    env = {"FHIR_CRS_CHANGE_FEED": "per-patient", "FHIR_CRS_IDENTIFIER_SYSTEM": "urn:pp-feed"}
    sync(server, state, "--patients", str(listing), env=env)
    quiet = sync(server, state, "--patients", str(listing), env=env)
    assert quiet["change_feed"] == "per-patient" and quiet["graded"] == 0
    assert quiet["requests"] == 5 * 2  # four _summary=count checks and the Condition read, per patient
    assert quiet["high_water"] is None


def test_both_servers_answer_batches_of_reads(server, cohort):
    """Both servers answer a `batch` of GETs entry by entry (HAPI does not list `batch` in its
    CapabilityStatement but serves it); a missing Patient is a 404 entry."""
    client = FhirClient(server.base, auth=NoAuth())
    pid = cohort["V04"]
    n = client.requests_made
    patient, obs = client.batch_get([(f"Patient/{pid}", None), ("Observation", [("patient", pid), ("_count", "100")])])
    assert patient["id"] == pid and len(obs.matches) > 200 and client.batch_supported
    assert client.requests_made - n == obs.pages  # the batch answered page 1; the rest by next links
    from fhir_crs.errors import FhirNotFound

    with pytest.raises(FhirNotFound):
        client.batch_get([("Patient/no-such-patient-x", None), ("Observation", [("patient", pid)])])
    if isinstance(server, HapiFhirServer):
        rest = client.capabilities()["rest"][0]
        assert "batch" not in {i.get("code") for i in rest.get("interaction", [])}


def test_a_failed_patient_is_retried_alone_not_the_whole_first_run(server, cohort, tmp_path):
    """A first run (a full read) where one patient fails keeps no high-water mark; before the
    retry record the next night was a first run again and re-read the whole cohort. Now it reads
    the feed from the failed night's own mark and re-reads only the patient it did not write.
    The failure is a real data-quality error: two Conditions on the server carry that patient's
    CRS identifier (a conditional write must not pick one), fixed between nights by deleting one."""
    client = FhirClient(server.base, auth=NoAuth())
    failing = cohort["V07"]  # grade 3: a CRS Condition is written (under this test's own identifier system)
    fine = load_vignette(client, "V04")  # a new copy (the vignette POSTs: new ids)
    time.sleep(float(OVERLAP) + 0.5)
    listing = tmp_path / "patients.txt"
    listing.write_text(f"{failing}\n{fine}\n{cohort['V04']}\n")
    env = {"FHIR_CRS_IDENTIFIER_SYSTEM": "urn:retry-feed"}
    sync(server, tmp_path / "scratch.sqlite", "--patients", str(listing), env=env)  # writes every case once
    (crs,) = [c for c in client.search("Condition", [("subject", f"Patient/{failing}")], no_cache=True).matches
              if any(i.get("system") == "urn:retry-feed" and i.get("value", "").endswith("-crs") for i in c.get("identifier") or [])]
    _, twin, location = client.post("Condition", {k: v for k, v in crs.items() if k not in ("id", "meta")})
    twin_ref = f"Condition/{(twin or {}).get('id') or (location or '').split('/_history')[0].rsplit('/', 1)[-1]}"
    assert twin_ref != f"Condition/{crs['id']}"
    time.sleep(float(OVERLAP) + 0.5)

    state = tmp_path / "state.sqlite"
    first = sync(server, state, "--patients", str(listing), env=env, exit_code=1)
    assert first["change_feed"] == "full" and first["graded"] == 3
    assert [e["patient"] for e in first["errors"]] == [f"Patient/{failing}"]
    assert "2 Condition resources on the server carry identifier urn:retry-feed|" in first["errors"][0]["error"]
    assert first["high_water"] is None and first["retry_patients"] == 1  # no mark: not everyone was written

    again = sync(server, state, "--patients", str(listing), env=env, exit_code=1)  # still broken
    assert again["change_feed"] == "history", again["change_feed"]  # not a first run again
    assert again["changed_patients"] == 1 and again["graded"] == 1 and again["unchanged"] == 2
    assert again["retry_patients"] == 1 and again["high_water"] is None
    assert again["requests"] <= 7 + 4, again["requests"]  # the feed, and one patient's reads and look-ups

    client.delete_url(twin_ref)  # the data-quality problem fixed on the server
    fixed = sync(server, state, "--patients", str(listing), env=env)
    assert fixed["changed_patients"] == 1 and not fixed["errors"] and fixed["retry_patients"] == 0
    assert fixed["high_water"]  # everyone written: the mark is set
    quiet = sync(server, state, "--patients", str(listing), env=env)
    assert quiet["changed_patients"] == 0 and quiet["requests"] == 7 and quiet["retry_patients"] == 0
