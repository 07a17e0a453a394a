"""Fault injection for `fhir-crs sync`: across 20 runs (4 on the local HAPI JPA server, whose restart
takes about a minute) the sync process or the FHIR server is killed at a random moment (the server
restarted on the same data: sekmet's SQLite, HAPI's H2 file), with the graded output forced
to change every run so every run writes. Afterwards a clean run completes and every case has
exactly one CRS Condition and one summary Bundle (ICANS Condition where graded): none lost, none
duplicated, and the grades equal the offline ones."""

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
    if kind == "hapi":  # the session's HAPI server: emptied, killed and restarted on its port and H2 data
        shared = request.getfixturevalue("hapi_server")
        reset_hapi(shared)
        server = shared

        def restart():
            return shared.start()
    else:
        workdir = tmp_path / "server"
        port = free_port()
        server = LocalFhirServer(workdir, port=port).start()

        def restart():
            return LocalFhirServer(workdir, port=port).start()
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
            if i % 2 == 0:
                proc.kill()
                kills["sync"] += 1
                proc.wait(timeout=30)
            else:
                server.kill()
                kills["server"] += 1
                proc.wait(timeout=60)
                server = restart()
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
        if kind == "hapi" and server.proc is not None and server.proc.poll() is not None:
            server.start()  # leave the shared server running for the rest of the session
        elif kind != "hapi":
            server.stop()
