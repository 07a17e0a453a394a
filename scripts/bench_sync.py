#!/usr/bin/env python3
"""Benchmark for `fhir-crs sync` on local FHIR servers (not a test: prints numbers).

For each server — the embedded sekmet-fhir, and with `--server hapi` also a real HAPI FHIR JPA
server (scripts/hapi-server), side by side in one run:

1. start it on 127.0.0.1 (HAPI: startup time and RSS) and load N synthetic CAR-T patients (the
   light generator of scripts/bench_grade.py, ~200 resources each) in batches;
2. `fhir-crs sync` first run: wall time, HTTP requests per night and per patient, resources
   written, and the share of wall time fhir-crs spent computing (its CPU time) vs waiting on the
   server (the rest);
3. a quiet night (no change): requests per night (the change feed: <= 10 whatever the cohort);
4. a night with 1 % of the patients changed (one new Observation each): requests per night;
5. Bulk path: `$export` of the same server streamed through the grader (`--bulk`).

The change feed re-reads `sync_overlap_seconds` before the last high-water mark; the benchmark
sets it to 5 s and waits that long after loading, so the quiet night is one with no writes.

Usage: .venv/bin/python scripts/bench_sync.py [--patients 200,1000] [--workers 4] [--server sekmet|hapi] [--bulk]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grade import generate

from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.localserver import HapiFhirServer, LocalFhirServer

# a long-running benchmark server: full JIT (no TieredStopAtLevel=1), a larger heap than the tests'
HAPI_BENCH_JAVA_OPTS = "-Xms512m -Xmx2g -XX:+UseSerialGC -XX:MaxMetaspaceSize=512m"
LOAD_ORDER = ("Patient", "Procedure", "MedicationAdministration", "Observation")  # referenced before referencing


def load(client: FhirClient, folder: Path, batch: int = 500) -> tuple[int, float]:
    """PUT every generated resource (transaction Bundles); every entry must succeed."""
    files = sorted(folder.glob("*.ndjson"), key=lambda f: LOAD_ORDER.index(f.stem) if f.stem in LOAD_ORDER else 99)
    resources = [orjson.loads(line) for f in files for line in f.open("rb")]
    t = time.perf_counter()
    for i in range(0, len(resources), batch):
        chunk = resources[i:i + batch]
        # one transaction per chunk (a batch costs HAPI one database transaction per entry)
        resp = client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in chunk]})
        bad = [e["response"] for e in resp.get("entry", []) if not str(e.get("response", {}).get("status", "")).startswith("20")]
        if bad:
            sys.exit(f"loading failed: {len(bad)} entries, first: {json.dumps(bad[0])[:500]}")
    return len(resources), time.perf_counter() - t


def proc_cpu_seconds(pid: int | None) -> float:
    """user + system CPU seconds of a running process (Linux /proc), 0 when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


OVERLAP_S = 5.0
# per request: a transaction or a read batch of one patient on a server holding 200k+ resources can
# wait behind the other workers' requests on a busy 2-core machine; the default 30 s is a production setting
REQUEST_TIMEOUT_S = 180.0


def sync(base: str, state: Path, workers: int, server_pid: int | None) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("fhir-crs")
    env = {**os.environ, "FHIR_CRS_LOOKBACK_DAYS": "100000", "FHIR_CRS_SYNC_OVERLAP_SECONDS": str(OVERLAP_S)}
    cpu0, srv0, t = children_cpu(), proc_cpu_seconds(server_pid), time.perf_counter()
    out = subprocess.run([str(exe), "sync", "--server", base, "--state", str(state), "--json", "--workers", str(workers),
                          "--timeout", str(REQUEST_TIMEOUT_S)],
                         capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    if out.returncode not in (0, 1):
        sys.exit(f"sync failed ({out.returncode}): {out.stderr[-2000:]}")
    data = json.loads(out.stdout)
    data["wall"] = wall
    data["client_cpu"] = children_cpu() - cpu0
    data["server_cpu"] = proc_cpu_seconds(server_pid) - srv0
    return data


def describe(label: str, d: dict[str, Any]) -> str:
    share = min(d["client_cpu"] / d["wall"], 1.0) if d["wall"] else 0.0
    return (f"{label}: {d['wall']:7.1f} s wall, {d['requests']:6d} requests per night "
            f"({d['requests'] / max(d['patients'], 1):5.2f}/patient, {d['changed_patients']} patient(s) re-read), "
            f"in fhir-crs {share:5.1%} (CPU {d['client_cpu']:.1f} s), waiting on the server {1 - share:5.1%} "
            f"(server CPU {d['server_cpu']:.1f} s); graded {d['graded']}, written {d['written']}, errors {len(d['errors'])}")


def change_one_percent(client: FhirClient, patients: int) -> int:
    """One new temperature Observation for 1 % of the patients (at least one)."""
    n = max(1, round(patients / 100))
    for p in range(n):
        pid = f"bench-{p * (patients // n):05d}"
        client.post("Observation", {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
                                    "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
                                    "effectiveDateTime": "2025-01-02T00:00:00Z",
                                    "valueQuantity": {"value": 37.2, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}})
    return n


def bench_server(kind: str, tmpd: Path, data: Path, patients: int, workers: int, bulk: bool = False) -> dict[str, Any]:

    print(f"== {kind} ==")
    result: dict[str, Any] = {"kind": kind}
    server: LocalFhirServer | HapiFhirServer
    if kind == "hapi":
        server = HapiFhirServer(tmpd / f"{kind}-server", java_opts=HAPI_BENCH_JAVA_OPTS)
    else:
        server = LocalFhirServer(tmpd / f"{kind}-server")
    with server:
        result["startup_s"] = server.startup_seconds
        result["rss_start_mb"] = (server.rss_bytes() or 0) / 2**20
        print(f"{kind} up in {server.startup_seconds:.1f} s, RSS {result['rss_start_mb']:.0f} MB")
        client = FhirClient(server.base, auth=NoAuth(), timeout=600)
        loaded, secs = load(client, data)
        result["load_s"] = secs
        print(f"loaded {loaded:,} resources for {patients:,} patients in {secs:.0f} s ({loaded / secs:,.0f}/s)")
        time.sleep(OVERLAP_S + 1)  # nothing written within the overlap before the first run
        state = tmpd / f"{kind}-{patients}-state.sqlite"
        result["first"] = sync(server.base, state, workers, server.pid)
        print(describe("sync, first run     ", result["first"]))
        result["again"] = sync(server.base, state, workers, server.pid)
        print(describe("sync, quiet night   ", result["again"]))
        result["changed_n"] = change_one_percent(client, patients)
        result["one_pct"] = sync(server.base, state, workers, server.pid)
        print(describe("sync, 1 % changed   ", result["one_pct"]))
        if bulk:
            from bench_bulk import bulk_bench

            result["bulk"] = bulk_bench(server.base)
        result["rss_end_mb"] = (server.rss_bytes() or 0) / 2**20
        print(f"{kind} RSS at the end: {result['rss_end_mb']:.0f} MB")
    return result


def side_by_side(results: list[dict[str, Any]]) -> None:
    def share(d: dict[str, Any]) -> str:
        s = min(d["client_cpu"] / d["wall"], 1.0) if d["wall"] else 0.0
        return f"{s:.0%} / {1 - s:.0%}"

    rows = [
        ("server startup (s)", lambda r: f"{r['startup_s']:.1f}"),
        ("server RSS start / end (MB)", lambda r: f"{r['rss_start_mb']:.0f} / {r['rss_end_mb']:.0f}"),
        ("load (s)", lambda r: f"{r['load_s']:.0f}"),
        ("sync first run: wall (s)", lambda r: f"{r['first']['wall']:.1f}"),
        ("sync first run: requests per night", lambda r: f"{r['first']['requests']:,}"),
        ("sync first run: requests/patient", lambda r: f"{r['first']['requests'] / max(r['first']['patients'], 1):.1f}"),
        ("sync first run: in fhir-crs / waiting on server", lambda r: share(r["first"])),
        ("quiet night: wall (s)", lambda r: f"{r['again']['wall']:.1f}"),
        ("quiet night: requests per night", lambda r: f"{r['again']['requests']:,}"),
        ("1 % changed: wall (s)", lambda r: f"{r['one_pct']['wall']:.1f}"),
        ("1 % changed: requests per night", lambda r: f"{r['one_pct']['requests']:,} ({r['one_pct']['changed_patients']} re-read)"),
    ]
    if all("bulk" in r for r in results):
        rows += [("bulk $export kick-off to manifest (s)", lambda r: f"{r['bulk']['export_s']:.1f}"),
                 ("bulk download + map + grade (resources/s)", lambda r: f"{r['bulk']['download_grade_rps']:,.0f}")]
    width = max(len(r[0]) for r in rows)
    print("\n" + " " * width + "  " + "  ".join(f"{r['kind'] + ' ' + str(r['patients']):>16}" for r in results))
    for label, fn in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{fn(r):>16}" for r in results))
    print(f"load average: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} (2 cores)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", default="200,1000", help="cohort sizes, comma-separated")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--server", choices=("sekmet", "hapi"), default="sekmet",
                    help="hapi: run on a local HAPI FHIR JPA server too, side by side with sekmet")
    ap.add_argument("--bulk", action="store_true", help="also time the Bulk $export path")
    args = ap.parse_args()
    # a kill of the benchmark leaves the `with` blocks, so the servers it started are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores)")
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        kinds = ["sekmet", "hapi"] if args.server == "hapi" else ["sekmet"]
        results = []
        for n in [int(x) for x in args.patients.split(",") if x.strip()]:
            data = tmpd / f"ndjson-{n}"
            data.mkdir()
            generate(data, n)
            for kind in kinds:
                r = bench_server(kind, tmpd / f"{n}", data, n, args.workers, args.bulk)
                r["patients"] = n
                results.append(r)
        side_by_side(results)


if __name__ == "__main__":
    main()
