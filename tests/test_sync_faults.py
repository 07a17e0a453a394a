"""Fault injection for `fhir-crs sync`: across 20 runs (4 on the local HAPI JPA server, whose restart
takes about a minute) the sync process or the FHIR server is killed at a random moment (the server
restarted on the same data: sekmet's SQLite, HAPI's H2 file), with the graded output forced
to change every run so every run writes. Afterwards a clean run completes and every case has
exactly one CRS Condition and one summary Bundle (ICANS Condition where graded): none lost, none
duplicated, and the grades equal the offline ones. Those runs are full re-reads (each changes the
conventions); the second test kills inside incremental (change-feed) nights instead, with new,
amended and hard-deleted resources in flight (6 nights on sekmet, 2 on HAPI), and checks the
high-water mark and convergence to what a `--full` run writes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, load_vignette, reset_hapi

from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.localserver import LocalFhirServer, free_port
from fhir_crs.pipeline import grade_paths

pytestmark = pytest.mark.integration
VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"
COHORT = ("V01", "V06", "V07", "V11", "V25", "V29")
SYSTEM = "urn:fhir-crs:faults"
RUNS = 20



class KillableServer:
    """The FHIR server of a kill test: for HAPI the session's server (emptied, then killed and
    restarted on its port and H2 data), for sekmet one of the test's own (restarted on its
    folder and port); `base` stays the same across restarts."""

    def __init__(self, kind: str, tmp_path: Path, request):
        self.kind = kind
        if kind == "hapi":
            self.server = request.getfixturevalue("hapi_server")
            reset_hapi(self.server)
        else:
            self._workdir, self._port = tmp_path / "server", free_port()
            self.server = LocalFhirServer(self._workdir, port=self._port).start()

    @property
    def base(self) -> str:
        return self.server.base

    def kill_during(self, proc: subprocess.Popen, i: int, kills: dict[str, int]) -> None:
        """Run i's kill: the sync process (even i), or the server (odd i), which is restarted."""
        if i % 2 == 0:
            proc.kill()
            kills["sync"] += 1
            proc.wait(timeout=30)
        else:
            self.server.kill()
            kills["server"] += 1
            proc.wait(timeout=60)
            self.server = (self.server.start() if self.kind == "hapi"
                           else LocalFhirServer(self._workdir, port=self._port).start())

    def close(self) -> None:
        if self.kind == "hapi":
            if self.server.proc is not None and self.server.proc.poll() is not None:
                self.server.start()  # leave the shared server running for the rest of the session
        else:
            self.server.stop()


def _search_all(client: FhirClient, rtype: str) -> list[dict]:
    found = client.search(rtype, [("identifier", f"{SYSTEM}|")], no_cache=True).matches
    out = []
    for r in found:
        ident = r.get("identifier")
        ident = ident if isinstance(ident, dict) else (ident or [{}])[0]
        if ident.get("system") == SYSTEM:
            out.append(r)
    return out


@pytest.mark.parametrize(("kind", "runs"), [("sekmet", RUNS), ("hapi", 4)])
def test_killed_syncs_and_servers_leave_exactly_one_write_per_case(kind: str, runs: int, tmp_path: Path, request):
    rng = random.Random(20261125)
    server = KillableServer(kind, tmp_path, request)
    try:
        client = FhirClient(server.base, auth=NoAuth())
        patients = {v: load_vignette(client, v) for v in COHORT}
        listing = tmp_path / "patients.txt"
        listing.write_text("\n".join(patients.values()) + "\n")
        state = tmp_path / "state.sqlite"
        env = {**os.environ, "FHIR_CRS_IDENTIFIER_SYSTEM": SYSTEM, "FHIR_CRS_MAX_RETRIES": "1",
               "FHIR_CRS_TOTAL_TIME_CAP": "8", "FHIR_CRS_TIMEOUT": "5"}
        kills = {"sync": 0, "server": 0}
        # a warm-up run (not killed) writes every case once and tells how long a run takes, so the
        # kills below land at random points *inside* runs on any machine
        t = time.monotonic()
        warm = subprocess.run([sys.executable, "-m", "fhir_crs", "sync", "--server", server.base, "--patients", str(listing),
                               "--state", str(state), "--json", "--set", "resolution_clear_h=25"],
                              env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert warm.returncode == 0, warm.stderr
        duration = time.monotonic() - t
        for i in range(runs):
            # a different convention value each run changes every graded result, so every run writes
            # (explicitly allowed to replace what the previous convention wrote)
            args = [sys.executable, "-m", "fhir_crs", "sync", "--server", server.base, "--patients", str(listing),
                    "--state", str(state), "--json", "--workers", "2", "--set", f"resolution_clear_h={24 + i % 2}",
                    "--allow-convention-change"]
            proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
            time.sleep(rng.uniform(0.2, 1.1) * duration)  # before, during and after the writes
            server.kill_during(proc, i, kills)
            if i % 7 == 6 or i == runs - 2:
                state.unlink(missing_ok=True)  # lost state must not create duplicates either
        final = subprocess.run(
            [sys.executable, "-m", "fhir_crs", "sync", "--server", server.base, "--patients", str(listing),
             "--state", str(state), "--json", "--allow-convention-change"],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert final.returncode == 0, final.stderr
        summary = json.loads(final.stdout)
        assert not summary["errors"]
        client = FhirClient(server.base, auth=NoAuth())
        conditions = _search_all(client, "Condition")
        bundles = _search_all(client, "Bundle")
        by_value: dict[str, int] = {}
        for r in conditions + bundles:
            ident = r["identifier"] if isinstance(r["identifier"], dict) else r["identifier"][0]
            by_value[ident["value"]] = by_value.get(ident["value"], 0) + 1
        assert all(n == 1 for n in by_value.values()), {k: n for k, n in by_value.items() if n > 1}
        for vignette, pid in patients.items():
            offline = grade_paths([VIGNETTES / f"{vignette}.json"])["cases"][0]
            crs = [c for c in conditions if c["subject"]["reference"] == f"Patient/{pid}" and c["identifier"][0]["value"].endswith("-crs")]
            assert len(crs) == 1, vignette
            assert crs[0]["code"]["coding"][0]["code"] == f"D89.83{offline['crs']['astct']['grade']}", vignette
            assert len([b for b in bundles if (b["identifier"]["value"]).startswith(pid)]) == 1, vignette
            icans = [c for c in conditions if c["subject"]["reference"] == f"Patient/{pid}" and c["identifier"][0]["value"].endswith("-icans")]
            assert len(icans) == (1 if offline["icans"]["astct"]["grade"] > 0 else 0), vignette
        assert kills == {"sync": runs // 2, "server": runs // 2}
        # cases were rewritten in place (new versions), never re-created
        assert max(int(c["meta"]["versionId"]) for c in conditions) >= 2
    finally:
        server.close()


# ----------------------------------------------------------------------------- kills inside incremental nights

FEED_SYSTEM = "urn:fhir-crs:faults-feed"
FEED_COHORT = ("V04", "V07", "V06")
V07_PRESSORS = ("v07-medadmin-0007", "v07-medadmin-0008", "v07-medadmin-0011")
OVERLAP = "2"


def _temperature(pid: str, at: str, celsius: float, oid: str) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]}, "effectiveDateTime": at,
            "valueQuantity": {"value": celsius, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}}


def _plus_hours(stamp: str, hours: float) -> str:
    from datetime import datetime, timedelta

    return (datetime.fromisoformat(stamp.replace("Z", "+00:00")) + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


def _feed_state(state: Path) -> tuple[str | None, str | None, dict[str, str]]:
    """(the cohort high-water mark, the last run's status, patient -> last_success) of the store."""
    import sqlite3

    db = sqlite3.connect(state)
    try:
        hw = db.execute("SELECT high_water FROM feed_state").fetchone()
        run = db.execute("SELECT status FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        done = dict(db.execute("SELECT patient, last_success FROM patient_state").fetchall())
    finally:
        db.close()
    return (hw[0] if hw else None), (run[0] if run else None), done


@pytest.mark.parametrize(("kind", "nights"), [("sekmet", 6), ("hapi", 2)])
def test_killed_incremental_nights_converge_to_what_a_full_run_writes(kind: str, nights: int, tmp_path: Path, request):
    """Kills (of the sync, or of the server) inside change-feed nights with changes in flight:
    every night V04's fever Observation is created or amended (CRS 0 <-> 2), a new Observation
    is added and the previous night's one hard-deleted, and on sekmet V07's three vasopressor
    administrations are hard-deleted and re-created in turn (grade 3 <-> 2; HAPI refuses to
    delete evidence our Condition cites). After each killed night the high-water mark is where it
    was, unless the run had re-graded every changed patient. A final clean night converges:
    a `--full` run with a fresh state store then writes nothing (the server holds what a full
    run gives) and every case has exactly one CRS Condition and one summary Bundle."""
    from datetime import UTC, datetime

    from fhir_crs.events import iso

    rng = random.Random(int(os.environ.get("FAULTS_SEED", "20261203")))  # another seed: other kill moments
    server = KillableServer(kind, tmp_path, request)
    try:
        client = FhirClient(server.base, auth=NoAuth())
        patients = {v: load_vignette(client, v) for v in FEED_COHORT}
        v07 = {e["resource"]["id"]: e["resource"] for e in json.loads((VIGNETTES / "V07.json").read_text())["entry"]}
        infusion = {v: grade_paths([VIGNETTES / f"{v}.json"])["cases"][0]["infusion"] for v in FEED_COHORT}
        listing = tmp_path / "patients.txt"
        listing.write_text("\n".join(patients.values()) + "\n")
        state = tmp_path / "state.sqlite"
        env = {**os.environ, "FHIR_CRS_IDENTIFIER_SYSTEM": FEED_SYSTEM, "FHIR_CRS_MAX_RETRIES": "1",
               "FHIR_CRS_TOTAL_TIME_CAP": "8", "FHIR_CRS_TIMEOUT": "5", "FHIR_CRS_SYNC_OVERLAP_SECONDS": OVERLAP}
        base_args = [sys.executable, "-m", "fhir_crs", "sync", "--patients", str(listing), "--json", "--workers", "2"]

        def run(*extra: str, store: Path = state) -> dict:
            done = subprocess.run([*base_args, "--server", server.base, "--state", str(store), *extra], env=env,
                                  capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            out = json.loads(done.stdout)
            if "-v" in extra:
                out["_stderr"] = done.stderr
            return out

        fever_id, extra_ids = "ff-v04-fever", []
        pressors_present = True

        def changes(i: int) -> set[str]:
            """Tonight's changes in flight; returns the patients they touch."""
            nonlocal pressors_present
            c = FhirClient(server.base, auth=NoAuth())
            touched = {patients["V04"]}
            c.put(f"Observation/{fever_id}", _temperature(patients["V04"], _plus_hours(infusion["V04"], 59),
                                                          38.7 if i % 2 == 0 else 37.0, fever_id))
            vig = rng.choice(FEED_COHORT)
            oid = f"ff-extra-{i}"
            c.put(f"Observation/{oid}", _temperature(patients[vig], _plus_hours(infusion[vig], 30 + i), 36.8, oid))
            touched.add(patients[vig])
            if extra_ids:  # yesterday's extra Observation, hard-deleted (graded, cited by nothing)
                prev = extra_ids.pop()
                c.delete_url(f"Observation/{prev[0]}")
                touched.add(prev[1])
            extra_ids.append((oid, patients[vig]))
            if kind == "sekmet" and i % 2 == 1:  # V07's vasopressors deleted, then re-created
                for rid in V07_PRESSORS:
                    if pressors_present:
                        c.delete_url(f"MedicationAdministration/{rid}")
                    else:
                        c.put(f"MedicationAdministration/{rid}", v07[rid])
                pressors_present = not pressors_present
                touched.add(patients["V07"])
            return touched

        first = run()
        assert first["change_feed"] == "full" and not first["errors"]
        time.sleep(float(OVERLAP) + 0.5)
        changes(-2)  # a warm-up night (not killed): how long an incremental night with writes takes here
        t = time.monotonic()
        warm = run()
        duration = time.monotonic() - t
        assert warm["change_feed"] == "history" and warm["changed_patients"] >= 1 and warm["written"]["Condition"] >= 1
        kills = {"sync": 0, "server": 0}
        advanced = {"yes": 0, "no": 0}
        for i in range(nights):
            hw_before, _, _ = _feed_state(state)
            touched = changes(i)
            started = iso(datetime.now(UTC))  # the store's format (UTC, to the second)
            proc = subprocess.Popen([*base_args, "--server", server.base, "--state", str(state)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
            time.sleep(rng.uniform(0.2, 1.1) * duration)  # before, during and after the writes
            server.kill_during(proc, i, kills)
            hw_after, status, done = _feed_state(state)
            if hw_after != hw_before:  # advanced: only after every changed patient was re-graded
                assert all(done.get(p, "") >= (started or "") for p in touched), (status, touched, done)
            advanced["yes" if hw_after != hw_before else "no"] += 1
        assert kills == {"sync": (nights + 1) // 2, "server": nights // 2}
        print(f"{kind}: {nights} killed nights, the high-water mark advanced in {advanced['yes']}")
        # the last killed night's changes are past the overlap (sekmet's clock is the Date header,
        # to the second): the quiet night's feed then holds only the final night's own writes
        # (the overlap's re-reading of changes already graded is test_sync_feed's)
        time.sleep(float(OVERLAP) + 1.5)
        final = run()
        assert not final["errors"] and final["change_feed"] == "history"
        again = run("-v")  # converged: a quiet night
        # (on failure: the summary and the run's debug log, which names why each patient was re-read)
        assert again["graded"] == 0 and again["written"] == {"Condition": 0, "Bundle": 0}, (
            json.dumps({k: v for k, v in again.items() if k != "_stderr"}), again["_stderr"][-4000:])
        # what a full re-read with no state would write: nothing — the server already holds it
        full = run("--full", "-v", store=tmp_path / "fresh.sqlite")
        assert not full["errors"] and full["written"] == {"Condition": 0, "Bundle": 0}, (
            json.dumps({k: v for k, v in full.items() if k != "_stderr"}), full["_stderr"][-6000:])
        client = FhirClient(server.base, auth=NoAuth())
        found = client.search("Condition", [("identifier", f"{FEED_SYSTEM}|")], no_cache=True).matches
        found += client.search("Bundle", [("identifier", f"{FEED_SYSTEM}|")], no_cache=True).matches
        values = [(r["identifier"] if isinstance(r["identifier"], dict) else r["identifier"][0])["value"] for r in found]
        assert sorted(values) == sorted(set(values)), values  # exactly one resource per identifier
        for vignette, pid in patients.items():
            kinds = {v.rsplit("-", 1)[1] for v in values if v.startswith(f"{pid}-")}
            assert {"crs", "summary"} <= kinds, (vignette, kinds)  # V04: written since its fever
    finally:
        server.close()


@pytest.mark.parametrize("recovery", ["night", "since", "per-patient since"])
def test_a_write_the_server_committed_before_the_sync_died_is_not_trusted_as_the_stored_result(recovery: str, tmp_path: Path,
                                                                                              monkeypatch):
    """The run died after the server committed a patient's new grade but before the state store
    recorded it (kill -9 between the two). The store still held the previous result's hash; the
    next night's data reverted to the previous result (here a fever deleted; in the kill test V07's
    vasopressors deleted again), so the hash matched and nothing was written: the server kept the
    dead night's grade (a `--full` run with a fresh store then wrote). Now the hash is cleared
    before the writes, so the next run rewrites the grade; a `--since` run after the deletion (whose
    feed, or per-patient change check, finds nothing of the patient) re-reads it too."""
    from datetime import UTC, datetime

    from click.testing import CliRunner

    import fhir_crs.sync as sync_mod
    from fhir_crs.cli import cli

    with LocalFhirServer(tmp_path / "server") as server:
        client = FhirClient(server.base, auth=NoAuth())
        pid = load_vignette(client, "V04")
        infusion = grade_paths([VIGNETTES / "V04.json"])["cases"][0]["infusion"]
        state = tmp_path / "state.sqlite"
        listing = tmp_path / "patients.txt"
        listing.write_text(pid + "\n")

        def sync(*extra: str, expect_exit: int = 0) -> dict:
            r = CliRunner().invoke(cli, ["sync", "--server", server.base, "--state", str(state), "--json",
                                         "--patients", str(listing), *extra],
                                   env={"FHIR_CRS_IDENTIFIER_SYSTEM": SYSTEM, "FHIR_CRS_SYNC_OVERLAP_SECONDS": OVERLAP})
            assert r.exit_code == expect_exit, (r.exit_code, r.stderr)
            return json.loads(r.stdout) if expect_exit == 0 else {}

        def stored() -> str:
            """The CRS Condition on the server, without its meta."""
            found = [c for c in client.search("Condition", [("subject", f"Patient/{pid}")], no_cache=True).matches
                     if any(i.get("system") == SYSTEM for i in c.get("identifier") or ())]
            (cond,) = found
            return json.dumps({k: v for k, v in cond.items() if k != "meta"}, sort_keys=True)

        def fever(celsius: float) -> None:
            client.put("Observation/wp-fever", _temperature(pid, _plus_hours(infusion, 59), celsius, "wp-fever"))

        assert sync()["written"] == {"Condition": 0, "Bundle": 0}  # CRS 0: nothing to write
        fever(38.7)  # CRS 2; the writes land, then the process dies before the store is updated
        real_put = sync_mod.StateStore.put

        def die(self, *a, **k):
            raise SystemExit(137)

        monkeypatch.setattr(sync_mod.StateStore, "put", die)
        sync(expect_exit=137)
        monkeypatch.setattr(sync_mod.StateStore, "put", real_put)
        assert '"code": "refuted"' not in stored()  # the dead night's CRS 2 is on the server
        time.sleep(float(OVERLAP) + 0.5)
        client.delete_url("Observation/wp-fever")  # back to the first night's data, versions and all
        if recovery != "night":
            time.sleep(1.1)
            if recovery.startswith("per-patient"):  # a server without a feed: each patient's own change check
                monkeypatch.setenv("FHIR_CRS_CHANGE_FEED", "per-patient")
            night = sync("--since", datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
            assert night["graded"] == 1, night
        else:
            night = sync()
        assert night["written"]["Condition"] == 1, night
        assert '"code": "refuted"' in stored()
        assert sync()["written"] == {"Condition": 0, "Bundle": 0}  # and then quiet
        state = tmp_path / "fresh.sqlite"  # what a first run writes: nothing, the server already holds it
        assert sync()["written"] == {"Condition": 0, "Bundle": 0}
