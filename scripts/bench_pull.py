#!/usr/bin/env python3
"""Benchmark: where a `pull` and a `sync` spend fhir-crs's own time (not a test: prints numbers).

Issue 17 item 4: grading a fetched patient must not dominate a sync's client-side time. This
generates N patients with the project's cohort generator (the export `scripts/bench_grade.py`
grades, ~500 resources per patient), grades the NDJSON offline once (`fhir-crs grade --workers 1`,
the reference rate), loads the same resources into the embedded server (sekmet-fhir, its own
process) and then, in this process with one worker so that each stage's CPU time is its own:

* `pull --write` for the first K patients (`pipeline.pull_patient`, what `fhir-crs pull` runs);
* `sync` of all N patients, a first run (`Sync.night`, what `fhir-crs sync` runs).

Each stage is timed by wrapping the stage function where the pull and sync call it: fetch
(`fetch_patient`: the searches and reads, response parsing), grade (`grade_resources`: map,
timeline, every grading system) and write (`write_case`: look-ups, transaction building, the
transaction). Wall time minus this thread's CPU time is time spent waiting on the server.

Usage: .venv/bin/python scripts/bench_pull.py [--patients 100] [--pull 20]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grade import generate_cohort_ndjson
from bench_sync import load

import fhir_crs.pipeline as pipeline
import fhir_crs.sync as sync_module
from fhir_crs.config import resolve
from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.localserver import LocalFhirServer
from fhir_crs.mapping_files import default_mappings_dir
from fhir_crs.settings import load_settings

STAGES = ("fetch", "grade", "write")


class StageTimer:
    """Wall and thread-CPU seconds per stage, and the resources each grade call was given."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.resources = 0

    def wrap(self, stage: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[stage] += time.perf_counter() - w
                self.cpu[stage] += time.thread_time() - c
                if stage == "grade":
                    self.resources += len(args[0])
        return timed


def patched(module: Any, timer: StageTimer) -> list[tuple[str, Any]]:
    saved = [(name, getattr(module, name)) for name in ("fetch_patient", "grade_resources", "write_case")]
    for (name, fn), stage in zip(saved, STAGES, strict=True):
        setattr(module, name, timer.wrap(stage, fn))
    return saved


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def offline_rate(data: Path, resources: int) -> tuple[float, float]:
    """(resources per CPU-second, wall s) of `fhir-crs grade DIR --json --workers 1` on the NDJSON."""
    exe = Path(sys.executable).with_name("fhir-crs")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([str(exe), "grade", str(data), "--json", "--workers", "1"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return resources / cpu, wall


def row(label: str, patients: int, wall: float, cpu: float, timer: StageTimer) -> str:
    grade_rate = timer.resources / timer.cpu["grade"] if timer.cpu["grade"] else 0.0
    parts = [f"{label:<22} {patients:5d} patients  wall {wall:7.1f} s  fhir-crs CPU {cpu:6.1f} s "
             f"({cpu / wall:4.0%} of wall)"]
    for stage in STAGES:
        parts.append(f"    {stage:<6} wall {timer.wall[stage]:7.1f} s  CPU {timer.cpu[stage]:6.1f} s "
                     f"({timer.cpu[stage] / cpu if cpu else 0:4.0%} of fhir-crs CPU), waiting {timer.wall[stage] - timer.cpu[stage]:7.1f} s")
    parts.append(f"    graded {timer.resources:,} fetched resources at {grade_rate:,.0f} resources per CPU-second")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--pull", type=int, default=20, help="patients pulled one by one (pull --write)")
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        data = tmpd / "ndjson"
        data.mkdir()
        n = generate_cohort_ndjson(data, args.patients)
        rate, wall = offline_rate(data, n)
        print(f"generated {n:,} resources for {args.patients} patients; offline `grade --workers 1`: "
              f"{wall:.1f} s wall, {rate:,.0f} resources per CPU-second")
        with LocalFhirServer(tmpd / "server") as server:
            client = FhirClient(server.base, auth=NoAuth(), timeout=600)
            loaded, secs = load(client, data)
            print(f"loaded {loaded:,} resources into sekmet-fhir in {secs:.0f} s")
            env = {**os.environ, "FHIR_CRS_LOOKBACK_DAYS": "100000", "FHIR_CRS_WORKERS": "1",
                   "FHIR_CRS_TIMEOUT": "300", "FHIR_CRS_SYNC_OVERLAP_SECONDS": "0"}
            cfg = resolve({"server": server.base}, env, None, tmpd)
            settings = load_settings(default_mappings_dir())
            ids = sorted(line.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode() for line in (data / "Patient.ndjson").open("rb"))

            pull_cfg = resolve({"server": server.base, "identifier_system": "urn:bench-pull"}, env, None, tmpd)
            timer = StageTimer()
            saved = patched(pipeline, timer)
            c, w = self_cpu(), time.perf_counter()
            try:
                for pid in ids[:args.pull]:
                    pipeline.pull_patient(FhirClient(server.base, auth=NoAuth(), timeout=300), pid, pull_cfg, settings, write=True)
            finally:
                for name, fn in saved:
                    setattr(pipeline, name, fn)
            print(row("pull --write", min(args.pull, len(ids)), time.perf_counter() - w, self_cpu() - c, timer))

            timer = StageTimer()
            saved = patched(sync_module, timer)
            state = sync_module.StateStore(tmpd / "state.sqlite", server.base)
            job = sync_module.Sync(FhirClient(server.base, auth=NoAuth(), timeout=300), cfg, settings, state)
            c, w = self_cpu(), time.perf_counter()
            try:
                summary = job.night(ids, sync_module.scope_of(ids, None))
            finally:
                for name, fn in saved:
                    setattr(sync_module, name, fn)
            print(row("sync (first run)", summary.patients, time.perf_counter() - w, self_cpu() - c, timer))
            print(f"    {summary.requests:,} requests, {summary.graded} graded, written {dict(summary.written)}, "
                  f"errors {len(summary.errors)}")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
