"""Issue 18: PHI at rest and in logs. Real processes (`python -m fhir_crs ...`) run with umask 000
so that owner-only modes must come from fhir-crs itself; every stderr line of full `-v` runs
(pull, sync, sync --bulk, SMART, demo) is searched for the secrets and PHI the run used."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_vignette

from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.logs import hash_patient_id

pytestmark = pytest.mark.integration

TOKEN = "tok-77c2e0d1-bearer-secret"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z fhir-crs (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
VIGNETTES = ("V01", "V06")


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CRS_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "fhir_crs", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=900, umask=0)


def modes(root: Path) -> dict[str, str]:
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        out[str(p.relative_to(root)) or "."] = f"{stat.S_IMODE(p.lstat().st_mode):04o}"
    return out


def assert_owner_only(root: Path) -> None:
    bad = {name: mode for name, mode in modes(root).items()
           if mode != ("0700" if (root / name).is_dir() else "0600")}
    assert bad == {}, f"not owner-only under {root}: {bad}"


def phi_of(bundle_paths: list[Path] | None = None, patients: list[dict] | None = None) -> set[str]:
    """Names, identifier values (MRN) and birth dates of the Patients used."""
    found: list[dict] = list(patients or [])
    for path in bundle_paths or []:
        found += [e["resource"] for e in json.loads(path.read_text())["entry"] if e["resource"]["resourceType"] == "Patient"]
    values: set[str] = set()
    for p in found:
        for n in p.get("name", []):
            values.update([n.get("family", ""), *n.get("given", [])])
        values.update(i["value"] for i in p.get("identifier", []))
        values.add(p.get("birthDate", ""))
    return {v for v in values if len(v) >= 3}


def leaks(text: str, needles: set[str]) -> list[str]:
    return sorted(n for n in needles if n and n.lower() in text.lower())


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of its own: these runs write back, which must not disturb other modules' counts."""
    from fhir_crs.localserver import LocalFhirServer

    server = LocalFhirServer(tmp_path_factory.mktemp("phi-logs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def loaded(own_server) -> dict[str, str]:
    client = FhirClient(own_server.base, auth=NoAuth())
    return {v: load_vignette(client, v) for v in VIGNETTES}


def test_sync_and_pull_logs_carry_no_secret_or_phi_and_state_is_owner_only(own_server, loaded, tmp_path: Path) -> None:
    phi = phi_of([ROOT / "fixtures" / "R4" / "vignettes" / f"{v}.json" for v in VIGNETTES])
    assert phi  # the fixtures do carry names, MRNs and birth dates
    env = {"FHIR_CRS_AUTH": "bearer", "FHIR_CRS_TOKEN": TOKEN}
    listing = tmp_path / "patients.txt"
    listing.write_text("\n".join(loaded.values()) + "\n")
    state = tmp_path / "nightly" / "state" / "state.sqlite"

    sync = run("-v", "sync", "--server", own_server.base, "--patients", str(listing), "--state", str(state),
               "--json", env=env)
    assert sync.returncode == 0, sync.stderr
    pull = run("-v", "pull", "--patient", loaded["V06"], "--server", own_server.base, "--json", env=env)
    assert pull.returncode == 0, pull.stderr
    bulk = run("-v", "sync", "--bulk", "--server", own_server.base, "--state", str(tmp_path / "bulk" / "s.sqlite"),
               "--json", env=env)
    assert bulk.returncode == 0, bulk.stderr

    for out in (sync, pull, bulk):
        assert len(out.stderr.splitlines()) > 2  # -v really logged every request (pull: 3 batched requests)
        assert TOKEN not in out.stderr and "Bearer" not in out.stderr
        assert leaks(out.stderr, phi) == []
    # sync redacts patient ids by default: a stable keyed hash instead of the id
    key = (state.parent / "log-key").read_bytes()
    for pid in loaded.values():
        assert pid not in sync.stderr
        assert f"Patient/~{hash_patient_id(pid, key)}" in sync.stderr
    assert loaded["V06"] in pull.stderr  # pull (one patient the user named) keeps the id
    # `fhir-crs log-hash` gives the operator the same hashes, to find one patient's lines
    hashed = run("log-hash", "--state", str(state), *loaded.values())
    assert hashed.returncode == 0, hashed.stderr
    assert [line.split("\t")[0] for line in hashed.stdout.splitlines()] == list(loaded.values())
    for line in hashed.stdout.splitlines():
        assert f"Patient/{line.split(chr(9))[1]}" in sync.stderr

    # PHI at rest: state folder 0700, database and its -wal/-shm and the key 0600, with umask 000
    assert_owner_only(tmp_path / "nightly")
    assert {p.name for p in state.parent.iterdir()} >= {"state.sqlite", "log-key"}


def test_state_store_wal_and_journal_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """SQLite's -wal/-shm (and -journal) exist only while the store is open: look then."""
    import sqlite3

    from fhir_crs.sync import StateStore

    old = os.umask(0)
    try:
        store = StateStore(tmp_path / "a" / "b" / "state.sqlite", "https://fhir.example.org/r4")
        store.put("p1", None, "hash", "{}")
        assert {p.name for p in (tmp_path / "a" / "b").iterdir()} == {"state.sqlite", "state.sqlite-wal", "state.sqlite-shm"}
        assert_owner_only(tmp_path / "a")
        store.close()
        db = sqlite3.connect(tmp_path / "a" / "b" / "state.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("BEGIN")
        db.execute("DELETE FROM patient_state")
        assert (tmp_path / "a" / "b" / "state.sqlite-journal").exists()
        assert_owner_only(tmp_path / "a")
        db.execute("COMMIT")
        db.close()
    finally:
        os.umask(old)


def test_smart_sync_logs_carry_no_assertion_token_or_key(tmp_path_factory, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from fhir_crs.localserver import LocalFhirServer, free_port

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv, pub = tmp_path / "client.pem", tmp_path / "client.pub.pem"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    priv.write_bytes(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    env = {"FHIR_CRS_CLIENT_ID": "crs-nightly", "FHIR_CRS_PRIVATE_KEY_FILE": str(priv), "FHIR_CRS_AUTH": "smart",
           "FHIR_CRS_SCOPE": "system/*.read system/*.write"}
    workdir, port = tmp_path_factory.mktemp("smart-logs"), free_port()
    with LocalFhirServer(workdir, port=port) as open_srv:
        pid = load_vignette(FhirClient(open_srv.base, auth=NoAuth()), "V06")
    clients = [{"client_id": "crs-nightly", "public_key_path": str(pub), "scopes": "system/*.read system/*.write"}]
    with LocalFhirServer(workdir, port=port, smart_clients=clients) as srv:
        priv.chmod(0o644)
        refused = run("-v", "sync", "--server", srv.base, "--state", str(tmp_path / "s" / "s.sqlite"), env=env)
        assert refused.returncode == 2 and "chmod 600" in refused.stderr  # a key others can read is refused
        priv.chmod(0o600)
        out = run("-v", "sync", "--bulk", "--server", srv.base, "--state", str(tmp_path / "s" / "s.sqlite"), "--json",
                  env=env)
    assert out.returncode == 0, out.stderr
    assert "SMART token minted" in out.stderr
    key_lines = [line for line in pem.decode().splitlines() if "-----" not in line]
    assert "eyJ" not in out.stderr and "client_assertion=" not in out.stderr
    assert leaks(out.stderr, set(key_lines)) == []
    assert pid not in out.stderr
    assert leaks(out.stderr, phi_of([ROOT / "fixtures" / "R4" / "vignettes" / "V06.json"])) == []


def test_demo_output_is_owner_only_and_its_log_has_no_phi(tmp_path: Path) -> None:
    from fhir_crs.synthetic import generate_picu_cohort

    out = tmp_path / "demo"
    r = run("-v", "demo", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    log_lines = "\n".join(line for line in r.stderr.splitlines() if LOG_LINE.match(line))
    assert len(log_lines.splitlines()) > 100
    bundles, _ = generate_picu_cohort()
    patients = [e["resource"] for b in bundles for e in b["entry"] if e["resource"]["resourceType"] == "Patient"]
    phi = phi_of(patients=patients)
    assert leaks(log_lines, phi) == []
    # the demo's own messages say "synthetic cohort" (the family name of its patients); nothing else leaks
    assert leaks(r.stderr, phi - {"Synthetic"}) == []
    assert_owner_only(out)  # server data, state, report.csv, cibmtr-4100.csv, report/ and its pages


def test_report_files_are_owner_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    r = run("report", str(ROOT / "fixtures" / "R4" / "vignettes" / "V06.json"), "--csv", str(out / "t.csv"),
            "--html", str(out / "html"), "--cibmtr", str(out / "c.csv"))
    assert r.returncode == 0, r.stderr
    assert_owner_only(out)
