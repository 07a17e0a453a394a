#!/usr/bin/env python3
"""Benchmark for `fhir-crs serve` (not a test: prints numbers).

One synthetic CAR-T patient with 30 days of q1h vitals (temperature, blood-pressure panel, heart
rate, SpO2, respiratory rate: 3,600 Observations), daily labs, norepinephrine and tocilizumab, is
loaded into the embedded FHIR server (sekmet-fhir on 127.0.0.1); `fhir-crs serve` is started as a
child process; then the CDS Hooks service is called --requests times each way, one at a time:

  * prefetch: every template prefetched by the "EHR" (read once from the server beforehand);
  * server:   no prefetch, fhirServer given: the service reads the chart itself (the pull path).

It prints p50 / p95 / max response time per way (target: p95 < 1 s) and stops both servers.

Usage: .venv/bin/python scripts/bench_serve.py [--requests 30] [--days 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

LOINC, SCT, RXN, UCUM = "http://loinc.org", "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm", "http://unitsofmeasure.org"
PID = "bench-serve-1"


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _obs(i: int, code: str, t: datetime, value: float | None, unit: str, category: str, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": "Observation", "id": f"bs-obs-{i}", "status": "final",
                         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
                         "code": {"coding": [{"system": LOINC, "code": code}]}, "subject": {"reference": f"Patient/{PID}"},
                         "effectiveDateTime": iso(t)}
    if value is not None:
        r["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    r.update(extra)
    return r


def patient_resources(days: int, now: datetime) -> list[dict[str, Any]]:
    t0 = now - timedelta(days=days)
    out: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": PID, "birthDate": "1961-04-02", "name": [{"family": "Bench", "given": ["Serve"]}]},
        {"resourceType": "Procedure", "id": "bs-cart", "status": "completed", "subject": {"reference": f"Patient/{PID}"},
         "code": {"coding": [{"system": SCT, "code": "1156961008", "display": "Chimeric antigen receptor T-cell immunotherapy"}]},
         "performedPeriod": {"start": iso(t0), "end": iso(t0 + timedelta(minutes=30))}},
    ]
    i = 0
    for h in range(-12, days * 24):
        t = t0 + timedelta(hours=h)
        fever = 24 <= h <= 96
        sbp = 84 if 40 <= h <= 60 else 118
        i += 1
        out.append(_obs(i, "8310-5", t, 39.1 if fever else 36.9, "Cel", "vital-signs"))
        i += 1
        out.append(_obs(i, "85354-9", t, None, "", "vital-signs", component=[
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": sbp, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": 62, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}]))
        for code, value, unit in (("8867-4", 104 if fever else 78, "/min"), ("2708-6", 95, "%"), ("9279-1", 18, "/min")):
            i += 1
            out.append(_obs(i, code, t, value, unit, "vital-signs"))
        if h % 24 == 6:
            for code, value, unit in (("1988-5", 120 if fever else 8, "mg/L"), ("2276-4", 900, "ng/mL")):
                i += 1
                out.append(_obs(i, code, t, value, unit, "laboratory"))
    for j, (rx, start_h, end_h, rate) in enumerate(((("7512"), 44, 58, 8.0), ("612865", 30, 30.5, None))):
        ma: dict[str, Any] = {"resourceType": "MedicationAdministration", "id": f"bs-ma-{j}", "status": "completed",
                              "medicationCodeableConcept": {"coding": [{"system": RXN, "code": rx}]},
                              "subject": {"reference": f"Patient/{PID}"},
                              "effectivePeriod": {"start": iso(t0 + timedelta(hours=start_h)), "end": iso(t0 + timedelta(hours=end_h))},
                              "dosage": {"route": {"coding": [{"system": SCT, "code": "47625008"}]}}}
        if rate:
            ma["dosage"]["rateQuantity"] = {"value": rate, "unit": "ug/min", "system": UCUM, "code": "ug/min"}
        out.append(ma)
    return out


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", "Accept": "application/fhir+json, application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return resp.status, json.loads(resp.read())


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--days", type=int, default=30)
    args = ap.parse_args()
    from fhir_crs.fhir import FhirClient, NoAuth
    from fhir_crs.localserver import LocalFhirServer, free_port
    from fhir_crs.serve.cds import PREFETCH

    now = datetime.now(UTC).replace(microsecond=0)
    resources = patient_resources(args.days, now)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, LocalFhirServer(Path(tmp) / "sekmet") as fhir:
        client = FhirClient(fhir.base, auth=NoAuth(), timeout=300)
        for k in range(0, len(resources), 500):
            client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources[k:k + 500]]})
        print(f"loaded {len(resources):,} resources ({args.days} days of q1h vitals) into sekmet-fhir on {fhir.base}")
        prefetch = {}
        for key, template in PREFETCH.items():
            query = template.replace("{{context.patientId}}", PID)
            if "?" not in query:
                prefetch[key] = client.read("Patient", PID)
                continue
            rtype, _, qs = query.partition("?")
            res = client.search(rtype, [tuple(p.split("=", 1)) for p in qs.split("&")])
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in [*res.matches, *res.includes]]}
        port = free_port()
        log = (Path(tmp) / "serve.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "fhir_crs", "serve", "--port", str(port), "--server", fhir.base],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/cds-services/fhir-crs-crs-grade"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    _http("GET", f"http://127.0.0.1:{port}/cds-services")
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("fhir-crs serve did not start") from None
                    time.sleep(0.2)
            base = {"hook": "patient-view", "hookInstance": "bench", "context": {"userId": "Practitioner/bench", "patientId": PID}}
            ways = {"prefetch": {**base, "prefetch": prefetch}, "server": {**base, "fhirServer": fhir.base}}
            print(f"{'way':10s} {'requests':>8s} {'p50 s':>8s} {'p95 s':>8s} {'max s':>8s}  card")
            for name, body in ways.items():
                _http("POST", url, body)  # warm-up
                times = []
                summary = ""
                for _ in range(args.requests):
                    start = time.perf_counter()
                    status, answer = _http("POST", url, body)
                    times.append(time.perf_counter() - start)
                    summary = answer["cards"][-1]["summary"] if answer["cards"] else "(no card)"
                    assert status == 200
                print(f"{name:10s} {len(times):8d} {statistics.median(times):8.3f} {percentile(times, 0.95):8.3f} {max(times):8.3f}  {summary}")
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
