#!/usr/bin/env python3
"""Benchmark for `fhir-crs sync` on the embedded local FHIR server (not a test: prints numbers).

1. starts the local FHIR server (sekmet-fhir) on 127.0.0.1 and loads N synthetic CAR-T patients
   (the generator of scripts/bench_grade.py, ~200 resources each) in batches;
2. `fhir-crs sync` first run: wall time, HTTP requests per patient, resources written;
3. `fhir-crs sync` again with no change: wall time and requests per patient (should be ~4);
4. Bulk path: `$export` of the same server streamed through the grader, beside the raw NDJSON
   parse rate of the exported files.

Usage: .venv/bin/python scripts/bench_sync.py [--patients 1000] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grade import bare_parse, generate

from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.localserver import LocalFhirServer


def load(client: FhirClient, folder: Path, batch: int = 500) -> tuple[int, float]:
    resources = [orjson.loads(line) for f in sorted(folder.glob("*.ndjson")) for line in f.open("rb")]
    t = time.perf_counter()
    for i in range(0, len(resources), batch):
        chunk = resources[i:i + batch]
        client.transaction({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in chunk]})
    return len(resources), time.perf_counter() - t


def sync(base: str, state: Path, workers: int, *extra: str) -> tuple[dict, float]:
    exe = Path(sys.executable).with_name("fhir-crs")
    env = {**os.environ, "FHIR_CRS_LOOKBACK_DAYS": "100000"}
    t = time.perf_counter()
    out = subprocess.run([str(exe), "sync", "--server", base, "--state", str(state), "--json", "--workers", str(workers), *extra],
                         capture_output=True, text=True, env=env, check=False)
    secs = time.perf_counter() - t
    if out.returncode not in (0, 1):
        sys.exit(f"sync failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout), secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        data = tmpd / "ndjson"
        data.mkdir()
        generate(data, args.patients)
        with LocalFhirServer(tmpd / "server") as server:
            client = FhirClient(server.base, auth=NoAuth(), timeout=600)
            loaded, secs = load(client, data)
            print(f"loaded {loaded:,} resources for {args.patients:,} patients into the local server in {secs:.0f} s ({loaded / secs:,.0f}/s)")
            first, t1 = sync(server.base, tmpd / "state.sqlite", args.workers)
            print(f"sync, first run : {t1:7.1f} s wall, {first['requests'] / max(first['patients'], 1):5.1f} requests/patient, "
                  f"graded {first['graded']}, written {first['written']}, errors {len(first['errors'])}")
            again, t2 = sync(server.base, tmpd / "state.sqlite", args.workers)
            print(f"sync, no change : {t2:7.1f} s wall, {again['requests'] / max(again['patients'], 1):5.1f} requests/patient, "
                  f"graded {again['graded']}, written {again['written']}")
            try:
                from bench_bulk import bulk_bench  # optional: needs the Bulk Data client
            except ImportError:
                bulk_bench = None
            if bulk_bench is not None:
                bulk_bench(server.base)
        parsed, psecs = bare_parse(data)
        print(f"raw NDJSON parse of the generated data: {parsed / psecs:,.0f} resources/s")


if __name__ == "__main__":
    main()
