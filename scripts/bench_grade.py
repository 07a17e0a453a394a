#!/usr/bin/env python3
"""Benchmark for `fhir-crs grade` (not a test: prints numbers).

Generates a synthetic Bulk-export-shaped NDJSON folder (one file per resource type) of
>= 200,000 resources for >= 1,000 CAR-T patients with the project's cohort generator
(fhir_crs/synthetic.py, deterministic seed; --light for a smaller one), then reports:
  * the bare JSON parse rate of the same files (orjson, line by line) — the ceiling;
  * `fhir-crs grade DIR --json` end to end in a subprocess: resources/s and peak RSS.

Usage: .venv/bin/python scripts/bench_grade.py [--patients 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

LOINC, SCT, RXN, UCUM = "http://loinc.org", "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm", "http://unitsofmeasure.org"
LOCAL = "http://hospital.example.org/fhir/CodeSystem/flowsheet"


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def generate_cohort_ndjson(out: Path, patients: int, seed: int = 20261125) -> int:
    """The project's synthetic cohort generator (fhir_crs/synthetic.py: adult/paediatric mix, full
    ICU-style courses, ~500 resources per patient) written as Bulk-export NDJSON, one file per type."""
    from fhir_crs.synthetic import generate_cohort

    files: dict[str, object] = {}
    n = 0
    try:
        for bundle in generate_cohort(patients, seed=seed):
            for entry in bundle["entry"]:
                r = entry["resource"]
                fh = files.get(r["resourceType"])
                if fh is None:
                    fh = files[r["resourceType"]] = (out / f"{r['resourceType']}.ndjson").open("wb")
                fh.write(orjson.dumps(r) + b"\n")  # type: ignore[attr-defined]
                n += 1
    finally:
        for fh in files.values():
            fh.close()  # type: ignore[attr-defined]
    return n


def generate(out: Path, patients: int, seed: int = 20261125) -> int:
    """A light generator (~200 resources per patient: vitals every 6 h, daily labs, tocilizumab,
    norepinephrine, O2 rows) — fast to load into the local test server for the sync benchmark.
    Writes NDJSON files; returns the number of resources written."""
    rng = random.Random(seed)
    files = {t: (out / f"{t}.ndjson").open("wb") for t in ("Patient", "Procedure", "Observation", "MedicationAdministration")}
    n = 0

    def put(r: dict) -> None:
        nonlocal n
        files[r["resourceType"]].write(orjson.dumps(r) + b"\n")
        n += 1

    for p in range(patients):
        pid = f"bench-{p:05d}"
        subj = {"reference": f"Patient/{pid}"}
        t0 = datetime(2025, 1, 1, 8, tzinfo=UTC) + timedelta(days=rng.randrange(300), hours=rng.randrange(10))
        age = rng.choice([rng.randrange(1, 18), rng.randrange(18, 80)])
        put({"resourceType": "Patient", "id": pid, "birthDate": f"{t0.year - age - 1}-06-15"})
        put({"resourceType": "Procedure", "id": f"{pid}-cart", "status": "completed", "subject": subj,
             "code": {"coding": [{"system": SCT, "code": "1156961008"}]},
             "performedPeriod": {"start": iso(t0), "end": iso(t0 + timedelta(minutes=30))}})
        weight = 15 + age * 3 if age < 18 else rng.uniform(55, 95)
        put({"resourceType": "Observation", "id": f"{pid}-wt", "status": "final", "subject": subj,
             "code": {"coding": [{"system": LOINC, "code": "29463-7"}]}, "effectiveDateTime": iso(t0 - timedelta(hours=12)),
             "valueQuantity": {"value": round(weight, 1), "unit": "kg", "system": UCUM, "code": "kg"}})
        severity = rng.choices([0, 1, 2, 3, 4], [20, 35, 20, 15, 10])[0]
        onset = rng.uniform(12, 72)
        length = rng.uniform(24, 96)
        k = 0
        for h in range(-12, 24 * 10, 6):
            t = t0 + timedelta(hours=h)
            febrile = severity and onset <= h <= onset + length
            temp = rng.uniform(38.2, 40.0) if febrile else rng.uniform(36.4, 37.6)
            sbp = rng.uniform(75, 88) if febrile and severity >= 2 else rng.uniform(100, 130)
            for code, value, unit in (("8310-5", round(temp, 2), "Cel"), ("8867-4", rng.randrange(60, 140), "/min"),
                                      ("59408-5", rng.randrange(88, 100), "%")):
                k += 1
                put({"resourceType": "Observation", "id": f"{pid}-o{k}", "status": "final", "subject": subj,
                     "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                     "code": {"coding": [{"system": LOINC, "code": code}]}, "effectiveDateTime": iso(t),
                     "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}})
            k += 1
            put({"resourceType": "Observation", "id": f"{pid}-o{k}", "status": "final", "subject": subj,
                 "code": {"coding": [{"system": LOINC, "code": "85354-9"}]}, "effectiveDateTime": iso(t),
                 "component": [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": round(sbp), "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
                               {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": 60, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}]})
            if h % 24 == 0:
                for code, value, unit in (("26881-3", rng.uniform(5, 5000), "pg/mL"), ("2276-4", rng.uniform(200, 20000), "ng/mL"),
                                          ("751-8", rng.uniform(0, 3), "10*3/uL")):
                    k += 1
                    put({"resourceType": "Observation", "id": f"{pid}-o{k}", "status": "final", "subject": subj,
                         "code": {"coding": [{"system": LOINC, "code": code}]}, "effectiveDateTime": iso(t),
                         "valueQuantity": {"value": round(value, 2), "unit": unit, "system": UCUM, "code": unit}})
        if severity >= 2:
            put({"resourceType": "MedicationAdministration", "id": f"{pid}-toci", "status": "completed", "subject": subj,
                 "medicationCodeableConcept": {"coding": [{"system": RXN, "code": "612865"}]},
                 "effectiveDateTime": iso(t0 + timedelta(hours=onset + 6)),
                 "dosage": {"dose": {"value": round(8 * weight), "unit": "mg", "system": UCUM, "code": "mg"}}})
        if severity >= 3:
            start = t0 + timedelta(hours=onset + 8)
            for seg in range(3):
                put({"resourceType": "MedicationAdministration", "id": f"{pid}-ne{seg}", "status": "completed", "subject": subj,
                     "medicationCodeableConcept": {"coding": [{"system": RXN, "code": "7512"}]},
                     "effectivePeriod": {"start": iso(start + timedelta(hours=4 * seg)), "end": iso(start + timedelta(hours=4 * seg + 4))},
                     "dosage": {"rateQuantity": {"value": round(rng.uniform(0.02, 0.3), 3), "unit": "ug/kg/min", "system": UCUM, "code": "ug/kg/min"}}})
        if severity >= 2:
            dev = "426854004" if severity >= 3 else "336623009"
            for j in range(4):
                t = t0 + timedelta(hours=onset + 4 + 4 * j)
                put({"resourceType": "Observation", "id": f"{pid}-dev{j}", "status": "final", "subject": subj,
                     "code": {"coding": [{"system": LOCAL, "code": "O2-DEVICE", "display": "O2 Device"}]}, "effectiveDateTime": iso(t),
                     "valueCodeableConcept": {"coding": [{"system": SCT, "code": dev}]}})
                put({"resourceType": "Observation", "id": f"{pid}-flow{j}", "status": "final", "subject": subj,
                     "code": {"coding": [{"system": LOINC, "code": "3151-8"}]}, "effectiveDateTime": iso(t),
                     "valueQuantity": {"value": 3 if severity == 2 else 40, "unit": "L/min", "system": UCUM, "code": "L/min"}})
            put({"resourceType": "Observation", "id": f"{pid}-dev-ra", "status": "final", "subject": subj,
                 "code": {"coding": [{"system": LOCAL, "code": "O2-DEVICE", "display": "O2 Device"}]},
                 "effectiveDateTime": iso(t0 + timedelta(hours=onset + 24)), "valueString": "Room air"})
    for f in files.values():
        f.close()
    return n


def bare_parse(folder: Path) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    for f in sorted(folder.glob("*.ndjson")):
        with f.open("rb") as fh:
            for line in fh:
                orjson.loads(line)
                n += 1
    return n, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--keep", type=Path, default=None, help="write the NDJSON here and keep it")
    ap.add_argument("--light", action="store_true", help="use the light generator instead of fhir_crs.synthetic")
    args = ap.parse_args()
    tmp = None
    if args.keep:
        folder = args.keep
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
    t = time.perf_counter()
    n = generate(folder, args.patients) if args.light else generate_cohort_ndjson(folder, args.patients)
    size = sum(f.stat().st_size for f in folder.glob("*.ndjson"))
    print(f"generated {n:,} resources for {args.patients:,} patients ({size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
    parsed, secs = bare_parse(folder)
    print(f"bare JSON parse (orjson, line by line): {parsed / secs:,.0f} resources/s ({secs:.2f} s)")
    exe = Path(sys.executable).with_name("fhir-crs")
    cmd = [str(exe) if exe.exists() else "fhir-crs", "grade", str(folder), "--json"]
    t = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.run(cmd, stdout=devnull, stderr=subprocess.PIPE, check=False)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"fhir-crs grade failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"fhir-crs grade --json: {n / secs:,.0f} resources/s ({secs:.2f} s, {args.patients / secs:,.0f} patients/s)")
    print(f"peak RSS of fhir-crs grade: {rss_mb:,.0f} MB")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
