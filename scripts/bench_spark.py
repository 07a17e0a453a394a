#!/usr/bin/env python3
"""Benchmark for `fhir-crs grade --engine spark` (not a test: prints numbers).

The same generated Bulk-shaped export (NDJSON per type; scripts/bench_grade.py's generator: the
light one, ~210 resources per patient, by default; --full for the project's cohort generator,
~500 per patient) at each size, graded end to end in a subprocess by the local engine
(`fhir-crs grade DIR --json`) and by `--engine spark --master local[N]`, both writing to
/dev/null. For each: wall time, resources/s, and the peak RSS of the driver (the fhir-crs
process), the Spark JVM and the Python workers (sum over the workers alive at once), sampled
from /proc every 0.2 s. Then the projection for a registry of 2.5 million patients on a
32-core cluster from the measured per-core Spark rate.

Usage: .venv/bin/python scripts/bench_spark.py [--patients 1000 10000 50000] [--cores 2] [--full] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _tree(root: int) -> dict[int, tuple[str, int]]:
    """{pid: (command name, RSS KiB)} of `root` and its descendants."""
    parent: dict[int, int] = {}
    info: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(entry)
        parent[pid] = int(fields.get("PPid", "0").strip())
        rss = int(fields.get("VmRSS", "0 kB").split()[0]) if "VmRSS" in fields else 0
        info[pid] = (fields.get("Name", "").strip(), rss)
    out = {}
    for pid in info:
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        if p == root:
            out[pid] = info[pid]
    return out


def run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time and peak RSS (MiB) of driver, JVM and Python workers of one command."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peaks = {"driver": 0, "jvm": 0, "workers": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            tree = _tree(proc.pid)
            driver = tree.get(proc.pid, ("", 0))[1]
            jvm = sum(rss for pid, (name, rss) in tree.items() if name == "java")
            workers = sum(rss for pid, (name, rss) in tree.items() if pid != proc.pid and name.startswith("python"))
            peaks["driver"] = max(peaks["driver"], driver)
            peaks["jvm"] = max(peaks["jvm"], jvm)
            peaks["workers"] = max(peaks["workers"], workers)
            done.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    done.set()
    t.join()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"wall": wall, **{k: v / 1024 for k, v in peaks.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--cores", type=int, default=2, help="Spark master local[N] (default 2)")
    ap.add_argument("--full", action="store_true", help="the full cohort generator (~500 resources per patient)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the generated exports here")
    args = ap.parse_args()

    from bench_grade import generate, generate_cohort_ndjson

    exe = str(Path(sys.executable).with_name("fhir-crs"))
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        base = args.keep or Path(tmp)
        for n in args.patients:
            out = base / f"export-{n}"
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            resources = (generate_cohort_ndjson if args.full else generate)(out, n)
            size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
            print(f"{n} patients: {resources} resources, {size:.0f} MiB NDJSON (generated in {time.monotonic() - t0:.0f} s)", flush=True)
            local = run([exe, "grade", str(out), "--json"], env)
            print(f"  local engine : {local['wall']:7.1f} s  {resources / local['wall']:8.0f} res/s  driver {local['driver']:.0f} MiB", flush=True)
            spark = run([exe, "grade", str(out), "--json", "--engine", "spark", "--master", f"local[{args.cores}]"], env)
            print(f"  spark local[{args.cores}]: {spark['wall']:7.1f} s  {resources / spark['wall']:8.0f} res/s  driver {spark['driver']:.0f} MiB, "
                  f"JVM {spark['jvm']:.0f} MiB, Python workers {spark['workers']:.0f} MiB", flush=True)
            rows.append((n, resources, local, spark))
    print()
    print(f"| patients | resources | local s | local res/s | local RSS MiB | spark local[{args.cores}] s | spark res/s | driver MiB | JVM MiB | workers MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, resources, local, spark in rows:
        print(f"| {n:,} | {resources:,} | {local['wall']:.1f} | {resources / local['wall']:,.0f} | {local['driver']:.0f} | "
              f"{spark['wall']:.1f} | {resources / spark['wall']:,.0f} | {spark['driver']:.0f} | {spark['jvm']:.0f} | {spark['workers']:.0f} |")
    n, resources, _, spark = rows[-1]
    per_core = resources / spark["wall"] / args.cores
    registry = 2_500_000 * resources / n
    hours = registry / (per_core * 32 * 0.8) / 3600  # 80 %: shuffle and scheduling overhead on a cluster
    print(f"\nprojection: 2.5 million patients (~{registry / 1e6:.0f} million resources at this mix) on 32 cores at the measured "
          f"{per_core:,.0f} resources/s per core, 80 % efficiency: {hours:.1f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
