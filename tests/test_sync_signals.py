"""Issue 14: Ctrl-C (SIGINT) or SIGTERM during `fhir-crs sync` stops promptly. A real `sync`
subprocess against the embedded FHIR server gets the signal after its first patient: no new
write starts after the signal (at most the one in flight on the single worker finishes), the run
is recorded as `interrupted` in the state store (not left `running`), a summary is printed, the
exit status is 130 / 143, and the next run finishes the rest with every case written once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import load_vignette

from fhir_crs.fhir import FhirClient, NoAuth

pytestmark = pytest.mark.integration
COHORT = ("V01", "V06", "V07", "V11", "V25", "V29")


def _ours(client: FhirClient, rtype: str, system: str) -> list[dict]:
    out = []
    for r in client.search(rtype, [("identifier", f"{system}|")], no_cache=True).matches:
        idents = r["identifier"] if isinstance(r["identifier"], list) else [r["identifier"]]
        if any(i.get("system") == system for i in idents):
            out.append(r)
    return out


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_sync_stops_after_the_write_in_flight(fhir_server, tmp_path: Path, signum: int, exit_code: int):
    client = FhirClient(fhir_server.base, auth=NoAuth())
    patients = [load_vignette(client, v) for v in COHORT]
    listing = tmp_path / "patients.txt"
    listing.write_text("\n".join(patients) + "\n")
    system = f"urn:fhir-crs:signal-{signum}"
    state = tmp_path / "state.sqlite"
    env = {**os.environ, "FHIR_CRS_IDENTIFIER_SYSTEM": system}
    args = [sys.executable, "-m", "fhir_crs", "sync", "--server", fhir_server.base, "--patients", str(listing),
            "--state", str(state), "--json", "--workers", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines: list[str] = []
    first_done = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "sync: 1/" in line:
                first_done.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert first_done.wait(120), "".join(lines)
        sent_at = datetime.now(UTC)
        t0 = time.monotonic()
        proc.send_signal(signum)
        out, rest = proc.communicate(timeout=60)  # the last stderr lines may reach communicate, not the reader
        stopped_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    err = "".join(lines) + (rest or "")
    assert proc.returncode == exit_code, err
    assert stopped_after < 20, stopped_after  # promptly: the in-flight patient, not the rest of the cohort
    summary = json.loads(out)
    assert summary["interrupted"] is True and summary["signal"] == signal.Signals(signum).name
    assert summary["not_done"] >= 1 and summary["graded"] + summary["not_done"] <= len(COHORT)
    assert f"sync interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    # the state store: this run is recorded as interrupted, nothing left `running`
    with sqlite3.connect(state) as db:
        statuses = [s for (s,) in db.execute("SELECT status FROM runs ORDER BY id")]
    assert statuses == ["interrupted"]
    # no write started after the signal: at most the one in flight (one worker) landed after it
    provs = [p for p in client.search("Provenance", [("_lastUpdated", "gt" + sent_at.isoformat().replace("+00:00", "Z"))],
                                      no_cache=True).matches
             if any(t["reference"].startswith("Condition/") for t in p.get("target", []))]
    ours = {f"Condition/{c['id']}" for c in _ours(client, "Condition", system)}
    assert len([p for p in provs if {t["reference"] for t in p["target"]} & ours]) <= 1
    # all or nothing per case: every Condition written has its Bundle and its Provenance
    conditions, bundles = _ours(client, "Condition", system), _ours(client, "Bundle", system)
    crs_keys = {c["identifier"][0]["value"].removesuffix("-crs") for c in conditions if c["identifier"][0]["value"].endswith("-crs")}
    assert crs_keys == {b["identifier"]["value"].removesuffix("-summary") for b in bundles}
    for c in conditions:
        assert client.search("Provenance", [("target", f"Condition/{c['id']}")], no_cache=True).matches
    # the next run finishes it: every case exactly once
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    rerun = json.loads(again.stdout)
    assert rerun["resumed_after_interruption"] is True and not rerun["errors"] and not rerun["interrupted"]
    values = [c["identifier"][0]["value"] for c in _ours(client, "Condition", system)]
    assert len(values) == len(set(values)) and len(values) > len(conditions)
    with sqlite3.connect(state) as db:
        assert [s for (s,) in db.execute("SELECT status FROM runs ORDER BY id")] == ["interrupted", "ok"]
