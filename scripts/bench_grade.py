#!/usr/bin/env python3
"""Benchmark for `fhir-crs grade` (not a test: prints numbers).

Generates a synthetic Bulk-export-shaped NDJSON folder (one file per resource type) of
>= 200,000 resources for >= 1,000 CAR-T patients with the project's cohort generator
(fhir_crs/synthetic.py, deterministic seed; --light for a smaller one), then reports:
  * the bare JSON parse rate of the same files (orjson, line by line) — the ceiling;
  * `fhir-crs grade DIR --json --workers N` end to end (N = 1 and 2), each in a fresh process:
    resources/s wall and per CPU-second, the ratios to the parse rate, peak RSS, and whether
    every N printed the same bytes;
  * the long-stay table (one patient, 15 / 30 / 60 days x 10 / 30 / 100 pressor courses).

Usage: .venv/bin/python scripts/bench_grade.py [--patients 1000 4000] [--workers 1 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import random
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


PRESSOR_CYCLE = (("norepinephrine", "7512", 4.0, 30.0), ("epinephrine", "3992", 2.0, 20.0),
                 ("phenylephrine", "8163", 40.0, 200.0))  # (drug, RxNorm, lowest, highest ug/min)


def generate_long_stay(days: int, courses: int, seed: int = 20261203) -> list[dict]:
    """One adult patient with a long febrile ICU stay: `days` of hourly vitals (temperature, HR,
    SpO2, RR, BP panel), a saw-tooth fever that never stays clear for 24 h (one long episode),
    `courses` vasopressor infusions (norepinephrine / epinephrine / phenylephrine in turn, each
    overlapping the next by 90 min, every one titrated hourly: one MedicationAdministration per
    hour), O2 rows every 2 h, labs every 12 h and an ICE score every 8 h."""
    rng = random.Random(seed)
    pid = f"long-{days}d-{courses}c"
    subj = {"reference": f"Patient/{pid}"}
    t0 = datetime(2025, 3, 1, 8, tzinfo=UTC)
    out: list[dict] = []
    k = 0

    def obs(t: datetime, code: str, value: dict, system: str = LOINC) -> None:
        nonlocal k
        k += 1
        out.append({"resourceType": "Observation", "id": f"{pid}-o{k}", "status": "final", "subject": subj,
                    "code": {"coding": [{"system": system, "code": code}]}, "effectiveDateTime": iso(t), **value})

    def q(v: float, unit: str) -> dict:
        return {"valueQuantity": {"value": v, "unit": unit, "system": UCUM, "code": unit}}

    out.append({"resourceType": "Patient", "id": pid, "birthDate": "1968-06-15"})
    out.append({"resourceType": "Procedure", "id": f"{pid}-cart", "status": "completed", "subject": subj,
                "code": {"coding": [{"system": SCT, "code": "1156961008"}]},
                "performedPeriod": {"start": iso(t0), "end": iso(t0 + timedelta(minutes=30))}})
    obs(t0 - timedelta(hours=12), "29463-7", q(78.0, "kg"))
    hours = days * 24
    span = hours - 48
    period = span / courses
    for c in range(courses):
        _drug, rx, lo, hi = PRESSOR_CYCLE[c % len(PRESSOR_CYCLE)]
        start = 24 + c * period
        end = start + period + 1.5
        h = start
        seg = 0
        while h < end:
            stop = min(h + 1, end)
            seg += 1
            out.append({"resourceType": "MedicationAdministration", "id": f"{pid}-p{c}-{seg}", "status": "completed",
                        "subject": subj, "medicationCodeableConcept": {"coding": [{"system": RXN, "code": rx}]},
                        "effectivePeriod": {"start": iso(t0 + timedelta(hours=h)), "end": iso(t0 + timedelta(hours=stop))},
                        "dosage": {"rateQuantity": {"value": round(rng.uniform(lo, hi), 1), "unit": "ug/min", "system": UCUM, "code": "ug/min"}}})
            h = stop
    for h in range(-12, hours):
        t = t0 + timedelta(hours=h)
        febrile = h >= 20 and h % 30 < 8
        obs(t, "8310-5", q(round(rng.uniform(38.1, 39.6) if febrile else rng.uniform(36.5, 37.6), 1), "Cel"))
        obs(t, "8867-4", q(rng.randrange(70, 130), "/min"))
        obs(t, "9279-1", q(rng.randrange(12, 28), "/min"))
        obs(t, "59408-5", q(rng.randrange(88, 99), "%"))
        sbp = rng.randrange(78, 89) if h >= 24 and h % 6 == 0 else rng.randrange(95, 130)
        k += 1
        out.append({"resourceType": "Observation", "id": f"{pid}-o{k}", "status": "final", "subject": subj,
                    "code": {"coding": [{"system": LOINC, "code": "85354-9"}]}, "effectiveDateTime": iso(t),
                    "component": [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, **q(sbp, "mm[Hg]")},
                                  {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, **q(round(sbp * 0.6), "mm[Hg]")}]})
        if h >= 20 and h % 2 == 0:
            flow = rng.choice((2, 3, 4, 6, 8))
            obs(t, "O2-DEVICE", {"valueCodeableConcept": {"coding": [{"system": SCT, "code": "336623009"}]}}, LOCAL)
            obs(t, "3151-8", q(flow, "L/min"))
        if h % 12 == 0:
            for code, a, b, unit in (("26881-3", 5, 5000, "pg/mL"), ("1988-5", 1, 300, "mg/L"), ("2276-4", 200, 20000, "ng/mL"),
                                     ("1742-6", 10, 400, "U/L"), ("1920-8", 10, 400, "U/L"), ("2160-0", 0.5, 4.0, "mg/dL"),
                                     ("1975-2", 0.3, 5.0, "mg/dL"), ("3255-7", 80, 400, "mg/dL"), ("751-8", 0.1, 3.0, "10*3/uL")):
                obs(t, code, q(round(rng.uniform(a, b), 2), unit))
        if h % 8 == 0:
            obs(t, "ICE-SCORE", {"valueInteger": rng.choice((10, 10, 9, 8, 6))}, LOCAL)
    return out


def long_stay_cell(days: int, courses: int, repeat: int = 3) -> dict[str, float]:
    """Map, then timeline + every grading system + JSON, for one long-stay patient in this
    process; the best of `repeat` runs of each."""
    from fhir_crs.mapping_files import load_code_map
    from fhir_crs.pipeline import grade_mapping, map_items
    from fhir_crs.settings import load_settings
    from fhir_crs.sources import SourceResource

    resources = generate_long_stay(days, courses)
    code_map = load_code_map(None)
    settings = load_settings(code_map.directory)
    t_map = t_grade = float("inf")
    for _ in range(repeat):  # best of `repeat`: the machine is shared, the minimum is the cost
        t = time.perf_counter()
        result, n = map_items((SourceResource(r, f"bench#{i}") for i, r in enumerate(resources)), code_map)
        t_map = min(t_map, time.perf_counter() - t)
        t = time.perf_counter()
        run = grade_mapping(result, settings, n)
        orjson.dumps(run.to_json())
        t_grade = min(t_grade, time.perf_counter() - t)
    if len(run.cases) != 1:
        raise SystemExit(f"long stay {days} d / {courses} courses: expected 1 case, got {len(run.cases)}")
    return {"resources": n, "map_s": t_map, "grade_s": t_grade, "crs": run.cases[0].crs["astct"].grade}


def long_stay_table(timeout: float) -> None:
    """The long-stay table: each cell in its own process (so a runaway cell cannot hang the run)."""
    print(f"long stay, one patient (q1h vitals, hourly titration; each cell a fresh process, best of 3, timeout {timeout:g} s):")
    print(f"{'days':>5} {'courses':>8} {'resources':>10} {'map s':>8} {'grade s':>8} {'grade ms/1k resources':>22}")
    for days in (15, 30, 60):
        for courses in (10, 30, 100):
            cmd = [sys.executable, __file__, "--long-stay-cell", str(days), str(courses)]
            try:
                proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                print(f"{days:>5} {courses:>8} {'':>10} {'':>8} {'> ' + format(timeout, 'g'):>8}  (did not finish)")
                continue
            if proc.returncode != 0:
                sys.exit(f"long-stay cell failed: {proc.stderr.decode()[-2000:]}")
            r = orjson.loads(proc.stdout)
            print(f"{days:>5} {courses:>8} {r['resources']:>10,} {r['map_s']:>8.2f} {r['grade_s']:>8.2f} "
                  f"{1e6 * r['grade_s'] / r['resources']:>22.2f}")


def adversarial_table() -> None:
    """Inputs built to hurt: JSON nested past any parser's limit, resources nested 240 levels
    deep (extensions), many of them for one patient; each size twice the one before, so linear
    cost shows as a constant time per resource."""
    import io

    from fhir_crs.pipeline import stream_grade

    def nested(n: int) -> object:
        v: object = 1
        for _ in range(n):
            v = {"url": "http://example.org/x", "extension": [v]}
        return v

    print("adversarial input, one patient (in this process, CPU time):")
    print(f"{'resources':>10} {'CPU s':>7} {'us/resource':>12}  skips")
    for n in (2_000, 4_000, 8_000):
        with tempfile.TemporaryDirectory(prefix="bench-adv-") as tmp:
            lines = [b"[" * 100_000 + b"]" * 100_000, b'{"resourceType":"Observation","extension":' + b'{"a":' * 5_000 + b"1" + b"}" * 5_001]
            deep = orjson.dumps(nested(120))  # 240 levels: orjson writes up to 254
            t0 = datetime(2025, 1, 1, tzinfo=UTC)
            lines += [orjson.dumps({"resourceType": "Patient", "id": "adv", "birthDate": "1970-01-01"}),
                      orjson.dumps({"resourceType": "Procedure", "id": "adv-cart", "status": "completed", "subject": {"reference": "Patient/adv"},
                                    "code": {"coding": [{"system": SCT, "code": "1156961008"}]}, "performedDateTime": iso(t0)})]
            for i in range(n):
                lines.append(orjson.dumps({"resourceType": "Observation", "id": f"n{i}", "status": "final", "subject": {"reference": "Patient/adv"},
                                           "code": {"coding": [{"system": LOINC, "code": "8310-5"}]},
                                           "effectiveDateTime": iso(t0 + timedelta(minutes=10 * i)),
                                           "valueQuantity": {"value": 38.5, "unit": "Cel", "system": UCUM, "code": "Cel"}})[:-1]
                             + b',"extension":[' + deep + b"]}")
            (Path(tmp) / "adv.ndjson").write_bytes(b"\n".join(lines) + b"\n")
            t = time.process_time()
            out = io.BytesIO()
            stream_grade([Path(tmp)], out)
            secs = time.process_time() - t
            skipped = orjson.loads(out.getvalue())["skipped"]
            codes = sorted({s["code"] for s in skipped})
            print(f"{n + 4:>10,} {secs:>7.2f} {1e6 * secs / (n + 4):>12.1f}  {len(skipped)} ({', '.join(codes)})")


def bare_parse(folder: Path) -> tuple[int, float, float]:
    """(resources, wall s, CPU s) of parsing every NDJSON line with orjson: the ceiling."""
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    for f in sorted(folder.glob("*.ndjson")):
        with f.open("rb") as fh:
            for line in fh:
                orjson.loads(line)
                n += 1
    return n, time.perf_counter() - start, time.process_time() - cpu


def measure(cmd: list[str], out: Path) -> dict[str, float]:
    """Run `cmd` (stdout to `out`) in a fresh wrapper process, so that the peak RSS and CPU time
    are those of this command and its worker processes only."""
    code = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "with open(sys.argv[1], 'wb') as fh: rc = subprocess.run(sys.argv[2:], stdout=fh, stderr=subprocess.PIPE)\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': rc.returncode, 'err': rc.stderr.decode()[-2000:], 'wall': time.perf_counter() - t,"
            " 'cpu': u.ru_utime + u.ru_stime, 'rss_mb': u.ru_maxrss / 1024}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out), *cmd], capture_output=True, check=True)
    r = orjson.loads(proc.stdout)
    if r["rc"] != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r['rc']}): {r['err']}")
    return r


def digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cohort_rows(patients: int, light: bool, keep: Path | None, workers: list[int]) -> list[dict[str, float]]:
    """One cohort size: generate, bare parse, then `grade --json --workers N` for each N."""
    with tempfile.TemporaryDirectory(prefix="bench-grade-") as tmp:
        folder = keep / f"cohort-{patients}" if keep else Path(tmp) / "export"
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        n = generate(folder, patients) if light else generate_cohort_ndjson(folder, patients)
        size = sum(f.stat().st_size for f in folder.glob("*.ndjson"))
        print(f"\n{patients:,} patients: {n:,} resources ({size / 1e6:.0f} MB) generated in {time.perf_counter() - t:.1f} s")
        parsed, wall, cpu = bare_parse(folder)
        print(f"  bare JSON parse (orjson, line by line): {parsed / wall:,.0f} resources/s wall ({wall:.2f} s), "
              f"{parsed / cpu:,.0f} resources/s CPU ({cpu:.2f} s)")
        exe = Path(sys.executable).with_name("fhir-crs")
        rows = []
        digests = set()
        for w in workers:
            out = Path(tmp) / f"grade-{w}.json"
            r = measure([str(exe) if exe.exists() else "fhir-crs", "grade", str(folder), "--json", "--workers", str(w)], out)
            digests.add(digest(out))
            out.unlink()
            row = {"patients": patients, "resources": n, "workers": w, "wall": r["wall"], "cpu": r["cpu"], "rss_mb": r["rss_mb"],
                   "rate": n / r["wall"], "ratio": (n / r["wall"]) / (parsed / wall), "cpu_ratio": cpu / r["cpu"],
                   "cpu_rate": n / r["cpu"]}
            rows.append(row)
            print(f"  grade --json --workers {w}: {row['rate']:,.0f} resources/s wall ({r['wall']:.1f} s) = {100 * row['ratio']:.0f} % "
                  f"of the parse rate; CPU {r['cpu']:.1f} s in all processes ({row['cpu_rate']:,.0f} resources per CPU-second = "
                  f"{100 * row['cpu_ratio']:.0f} % of the parse's); peak RSS {r['rss_mb']:,.0f} MB (largest process)")
        print("  outputs of every --workers: " + ("identical" if len(digests) == 1 else "DIFFERENT"))
        if len(digests) != 1:
            sys.exit("grade --workers N printed different outputs")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--keep", type=Path, default=None, help="write the NDJSON under this folder and keep it")
    ap.add_argument("--light", action="store_true", help="use the light generator instead of fhir_crs.synthetic")
    ap.add_argument("--long-stay", action="store_true", help="only the long-stay table")
    ap.add_argument("--no-long-stay", action="store_true", help="skip the long-stay table")
    ap.add_argument("--adversarial", action="store_true", help="only the adversarial-input table")
    ap.add_argument("--long-stay-timeout", type=float, default=120.0)
    ap.add_argument("--long-stay-cell", nargs=2, type=int, metavar=("DAYS", "COURSES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.long_stay_cell:
        sys.stdout.buffer.write(orjson.dumps(long_stay_cell(*args.long_stay_cell)))
        return
    if args.long_stay:
        long_stay_table(args.long_stay_timeout)
        return
    if args.adversarial:
        adversarial_table()
        return
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start "
          "(wall-clock rates depend on it; the CPU-second rates do not)")
    rows = [r for p in args.patients for r in cohort_rows(p, args.light, args.keep, args.workers)]
    print("\nsummary (rate: resources/s wall; % of the bare parse rate of the same files, measured in the same run):")
    print(f"{'patients':>9} {'resources':>10} {'workers':>8} {'wall s':>8} {'rate':>9} {'% parse':>8} {'CPU s':>7} {'% parse CPU':>12} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['patients']:>9,} {r['resources']:>10,} {r['workers']:>8} {r['wall']:>8.1f} {r['rate']:>9,.0f} {100 * r['ratio']:>7.0f}% "
              f"{r['cpu']:>7.1f} {100 * r['cpu_ratio']:>11.0f}% {r['rss_mb']:>12,.0f}")
    if not args.no_long_stay:
        print()
        long_stay_table(args.long_stay_timeout)
    print()
    adversarial_table()


if __name__ == "__main__":
    main()
