#!/usr/bin/env python3
"""Benchmark for `fhir-crs sync` on local FHIR servers (not a test: prints numbers).

For each server — the embedded sekmet-fhir, and with `--server hapi` also a real HAPI FHIR JPA
server (scripts/hapi-server), side by side in one run:

1. start it on 127.0.0.1 (HAPI: startup time and RSS) and load N synthetic CAR-T patients (the
   light generator of scripts/bench_grade.py, ~200 resources each) in batches;
2. `fhir-crs sync` first run: wall time, HTTP requests per patient, resources written, and the
   share of wall time fhir-crs spent computing (its CPU time) vs waiting on the server (the rest);
3. `fhir-crs sync` again with no change: the same numbers (should be ~4 requests/patient);
4. Bulk path: `$export` of the same server streamed through the grader.

Usage: .venv/bin/python scripts/bench_sync.py [--patients 1000] [--workers 4] [--server sekmet|hapi]
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
from bench_grade import bare_parse, generate

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


def sync(base: str, state: Path, workers: int, server_pid: int | None) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("fhir-crs")
    env = {**os.environ, "FHIR_CRS_LOOKBACK_DAYS": "100000"}
    cpu0, srv0, t = children_cpu(), proc_cpu_seconds(server_pid), time.perf_counter()
    out = subprocess.run([str(exe), "sync", "--server", base, "--state", str(state), "--json", "--workers", str(workers)],
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
    return (f"{label}: {d['wall']:7.1f} s wall, {d['requests'] / max(d['patients'], 1):5.1f} requests/patient, "
            f"in fhir-crs {share:5.1%} (CPU {d['client_cpu']:.1f} s), waiting on the server {1 - share:5.1%} "
            f"(server CPU {d['server_cpu']:.1f} s); graded {d['graded']}, written {d['written']}, errors {len(d['errors'])}")


def bench_server(kind: str, tmpd: Path, data: Path, patients: int, workers: int) -> dict[str, Any]:
    from bench_bulk import bulk_bench

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
        result["first"] = sync(server.base, tmpd / f"{kind}-state.sqlite", workers, server.pid)
        print(describe("sync, first run ", result["first"]))
        result["again"] = sync(server.base, tmpd / f"{kind}-state.sqlite", workers, server.pid)
        print(describe("sync, no change ", result["again"]))
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
        ("sync first run: requests/patient", lambda r: f"{r['first']['requests'] / max(r['first']['patients'], 1):.1f}"),
        ("sync first run: in fhir-crs / waiting on server", lambda r: share(r["first"])),
        ("sync no change: wall (s)", lambda r: f"{r['again']['wall']:.1f}"),
        ("sync no change: requests/patient", lambda r: f"{r['again']['requests'] / max(r['again']['patients'], 1):.1f}"),
        ("sync no change: in fhir-crs / waiting on server", lambda r: share(r["again"])),
        ("bulk $export kick-off to manifest (s)", lambda r: f"{r['bulk']['export_s']:.1f}"),
        ("bulk download + map + grade (resources/s)", lambda r: f"{r['bulk']['download_grade_rps']:,.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + " " * width + "  " + "  ".join(f"{r['kind']:>16}" for r in results))
    for label, fn in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{fn(r):>16}" for r in results))
    print(f"load average: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} (2 cores)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--server", choices=("sekmet", "hapi"), default="sekmet",
                    help="hapi: run on a local HAPI FHIR JPA server too, side by side with sekmet")
    args = ap.parse_args()
    # a kill of the benchmark leaves the `with` blocks, so the servers it started are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores)")
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        data = tmpd / "ndjson"
        data.mkdir()
        generate(data, args.patients)
        kinds = ["sekmet", "hapi"] if args.server == "hapi" else ["sekmet"]
        results = [bench_server(kind, tmpd, data, args.patients, args.workers) for kind in kinds]
        side_by_side(results)
        parsed, psecs = bare_parse(data)
        print(f"raw NDJSON parse of the generated data: {parsed / psecs:,.0f} resources/s")


if __name__ == "__main__":
    main()
