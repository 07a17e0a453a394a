"""Stage 6 (cohort): graded cases -> the seed study's table (`fhir-crs report`, `fhir-crs demo`).

`report_from_cases(cases, system)` reads the case objects of `fhir-crs grade --json` (one per
CAR-T infusion) and returns the contract object of `tests/contracts/report.schema.json`:
how many patients had each finding, the percentage, who they were, and the Spearman
correlation of the maximum CRS grade with the peak IL-6 and IFN-γ.

Row definitions (one patient counts once; a patient with several infusions counts if any of
their cases meets the row):

| Row | Patient counts when |
|---|---|
| crs_any | CRS grade >= 1 under `system` |
| crs_severe | CRS grade >= 3 under `system` (grade 5 = death during CRS included) |
| haemodynamic_instability | `facts.haemodynamic_instability`: a vasopressor after infusion, or a fluid bolus within 1 h of documented hypotension |
| mechanical_ventilation | `facts.mechanical_ventilation`: invasive ventilation after infusion (not home/baseline) |
| neurological | ASTCT ICANS grade > 0 |
| liver_injury | `facts.liver_injury_grade` >= 2 (CTCAE v5 ALT, AST or total bilirubin after infusion) |
| tocilizumab / corticosteroids / blood_purification | the `facts` list of administrations/procedures after infusion is non-empty |
| deaths | `facts.died` |
| recovered_14d | alive (`facts.died` false) and, for every case with CRS under `system`, CRS resolved (`resolved` not null) no later than 14 days after its onset. A patient who never had CRS and is alive counts as recovered (nothing to recover from); a CRS still unresolved when the record ends does not. |

Percentages are of all patients, one decimal. Correlation: Spearman's rho (average ranks for
ties) of the patient's maximum CRS grade under `system` against the highest peak value
(`facts.peak_il6` / `facts.peak_ifn_gamma`) over patients that have one, with the two-sided
p-value of the t approximation (t = rho * sqrt((n-2)/(1-rho^2)), n-2 degrees of freedom — what
`scipy.stats.spearmanr` reports); rho and p are null when n < 3 or either variable is constant.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .identity import Identity, ReportMeta, identities, patient_label

__all__ = [
    "RECOVERY_DAYS",
    "ROW_LABELS",
    "cases_of",
    "render_report",
    "report_csv",
    "report_from_cases",
    "spearman",
]

RECOVERY_DAYS = 14
ROW_LABELS: dict[str, str] = {
    "crs_any": "CRS (any grade)",
    "crs_severe": "Severe CRS (grade ≥ 3)",
    "haemodynamic_instability": "Haemodynamic instability (fluids or vasopressors for hypotension)",
    "mechanical_ventilation": "Invasive mechanical ventilation",
    "neurological": "Neurological symptoms (ICANS grade ≥ 1)",
    "liver_injury": "Liver injury (CTCAE grade ≥ 2 ALT/AST/bilirubin)",
    "tocilizumab": "Tocilizumab",
    "corticosteroids": "Corticosteroids",
    "blood_purification": "Blood purification (CRRT / plasma exchange)",
    "deaths": "Deaths",
    "recovered_14d": f"Recovered within {RECOVERY_DAYS} days",
}
CORRELATION_LABELS = {"il6": "IL-6", "ifng": "IFN-γ"}
_PEAK_FACT = {"il6": "peak_il6", "ifng": "peak_ifn_gamma"}
SYSTEMS = ("astct", "lee2014", "penn", "mskcc", "cartox", "ctcae5")


def cases_of(graded: dict[str, Any] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The case list of a `fhir-crs grade --json` object (or a list of cases, returned as is)."""
    if isinstance(graded, dict):
        return list(graded.get("cases") or [])
    return list(graded)


def _hours(a: str | None, b: str | None) -> float | None:
    from datetime import datetime

    if not a or not b:
        return None
    ta = datetime.fromisoformat(a.replace("Z", "+00:00"))
    tb = datetime.fromisoformat(b.replace("Z", "+00:00"))
    return (tb - ta).total_seconds() / 3600


def _recovered(case: dict[str, Any], system: str) -> bool:
    r = (case.get("crs") or {}).get(system) or {}
    if not r.get("grade"):
        return True
    span = _hours(r.get("onset"), r.get("resolved"))
    return span is not None and span <= RECOVERY_DAYS * 24


def _peak(cases: list[dict[str, Any]], fact: str) -> float | None:
    values = [((c.get("facts") or {}).get(fact) or {}).get("value") for c in cases]
    nums = [float(v) for v in values if isinstance(v, int | float)]
    return max(nums) if nums else None


def report_from_cases(cases: Sequence[dict[str, Any]] | dict[str, Any], system: str = "astct",
                      meta: ReportMeta | None = None, skipped: Sequence[dict[str, Any]] | None = None,
                      patients_read: int | None = None) -> dict[str, Any]:
    """The cohort table (report.schema.json) of graded cases under one CRS grading system.

    With `meta` (what `fhir-crs report` / `demo` pass) the object also carries `about` (report date,
    data source, fhir-crs version, de-identified or not) and `patient_list` (label, reference, MRN,
    name of each patient); de-identified, every reference is `Patient/~<label>` and MRN and name are
    null. `skipped` / `patients_read` explain an empty cohort (`empty_reason`)."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown CRS grading system {system!r}; expected one of {', '.join(SYSTEMS)}")
    case_list = cases_of(cases)
    who = identities(case_list, deidentify=bool(meta and meta.deidentified))
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for case in case_list:
        by_patient.setdefault(str(case.get("patient")), []).append(case)
    members: dict[str, list[str]] = {k: [] for k in ROW_LABELS}
    grades: dict[str, int] = {}
    for patient, pcases in by_patient.items():
        crs = max(int(((c.get("crs") or {}).get(system) or {}).get("grade") or 0) for c in pcases)
        icans = max(int(((c.get("icans") or {}).get("astct") or {}).get("grade") or 0) for c in pcases)
        facts = [c.get("facts") or {} for c in pcases]
        died = any(f.get("died") for f in facts)
        grades[patient] = crs
        checks = {
            "crs_any": crs >= 1,
            "crs_severe": crs >= 3,
            "haemodynamic_instability": any(f.get("haemodynamic_instability") for f in facts),
            "mechanical_ventilation": any(f.get("mechanical_ventilation") for f in facts),
            "neurological": icans > 0,
            "liver_injury": max(int(f.get("liver_injury_grade") or 0) for f in facts) >= 2,
            "tocilizumab": any(f.get("tocilizumab") for f in facts),
            "corticosteroids": any(f.get("corticosteroids") for f in facts),
            "blood_purification": any(f.get("blood_purification") for f in facts),
            "deaths": died,
            "recovered_14d": not died and all(_recovered(c, system) for c in pcases),
        }
        for key, met in checks.items():
            if met:
                members[key].append(patient)
    n = len(by_patient)
    rows = {
        key: {"n": len(refs), "pct": round(100.0 * len(refs) / n, 1) if n else 0.0,
              "patients": sorted(who[r].public_ref for r in refs)}
        for key, refs in members.items()
    }
    correlation = {}
    for key, fact in _PEAK_FACT.items():
        pairs = [(grades[p], v) for p, pc in by_patient.items() if (v := _peak(pc, fact)) is not None]
        correlation[key] = spearman([g for g, _ in pairs], [v for _, v in pairs])
    out: dict[str, Any] = {"patients": n, "system": system, "rows": rows, "correlation": correlation}
    if meta is not None:
        out["about"] = meta.to_json()
        out["patient_list"] = [who[p].to_json() | {"patient": who[p].public_ref} for p in sorted(by_patient, key=lambda p: who[p].label)]
    if n == 0 and (skipped is not None or patients_read is not None):
        out["empty_reason"] = empty_cohort_reason(skipped or [], patients_read)
    return out


def empty_cohort_reason(skipped: Sequence[dict[str, Any]], patients_read: int | None) -> str:
    """Why a report has no patient: `no CAR-T infusion found in N patients; M resources skipped: …`."""
    from collections import Counter

    counts = Counter(s.get("code") or "other" for s in skipped)
    top = ", ".join(f"{k} {v}" for k, v in counts.most_common(6)) + (", …" if len(counts) > 6 else "")
    where = f" in {patients_read} patient(s)" if patients_read is not None else ""
    return (f"no CAR-T infusion found{where}; {len(skipped)} resource(s) skipped"
            + (f": {top}" if skipped else "") + " (a CAR-T Procedure or product MedicationAdministration coded as in "
            "mappings/procedures.toml / medications.toml marks day 0; grade --show-skips lists every skip).")


# ---- Spearman ----------------------------------------------------------------------------------


def _ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the average of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    return ranks


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """{"rho", "p", "n"}: Spearman's rank correlation with a two-sided p (t approximation)."""
    n = len(x)
    if n != len(y):
        raise ValueError("x and y differ in length")
    if n < 3:
        return {"rho": None, "p": None, "n": n}
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return {"rho": None, "p": None, "n": n}
    rho = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    df = n - 2
    if abs(rho) >= 1.0:
        p = 0.0
    else:
        t2 = rho * rho * df / (1 - rho * rho)
        p = _betainc(df / 2, 0.5, df / (df + t2))
    return {"rho": round(rho, 4), "p": float(f"{p:.4g}"), "n": n}


# ---- output ------------------------------------------------------------------------------------


def _labels(report: dict[str, Any]) -> dict[str, str]:
    """Reference (as the rows carry it) -> stable label, for outputs a person reads."""
    known = {p["patient"]: p["label"] for p in report.get("patient_list") or []}
    refs = {r for row in report["rows"].values() for r in row["patients"]}
    return {r: known.get(r) or patient_label(r) for r in refs}


def report_csv(report: dict[str, Any]) -> str:
    """CSV: one line per table row (n, %, patient labels separated by ';'), one per correlation,
    then one `patient` line per patient (label, FHIR reference, MRN, name — blank de-identified)
    and the `report_date`, `data_source`, `fhir_crs_version` lines (value in `label`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "label", "n", "pct", "patients", "rho", "p", "mrn", "name"])
    labels = _labels(report)
    for key, label in ROW_LABELS.items():
        row = report["rows"].get(key)
        if row is None:
            continue
        w.writerow([key, label, row["n"], f"{row['pct']:.1f}", ";".join(sorted(labels[p] for p in row["patients"])), "", "", "", ""])
    for key, c in report.get("correlation", {}).items():
        label = f"Spearman: max CRS grade ({report.get('system')}) vs peak {CORRELATION_LABELS.get(key, key)}"
        w.writerow([f"correlation_{key}", label, c["n"], "", "",
                    "" if c["rho"] is None else c["rho"], "" if c["p"] is None else c["p"], "", ""])
    about = report.get("about")
    for p in report.get("patient_list") or []:
        w.writerow(["patient", p["label"], "", "", "" if about and about.get("deidentified") else p["patient"], "", "",
                    p.get("mrn") or "", p.get("name") or ""])
    if about:
        for key, value in (("report_date", about["generated"]), ("data_source", about["source"]),
                           ("fhir_crs_version", about["fhir_crs_version"])):
            w.writerow([key, value, "", "", "", "", "", "", ""])
        if about.get("deidentified"):
            w.writerow(["deidentified", "MRN, name and FHIR ids hidden", "", "", "", "", "", "", ""])
    return buf.getvalue()


def format_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def render_report(report: dict[str, Any], console: Any) -> None:
    """Print the cohort table with `rich` (the same rows as the JSON, in the paper's order)."""
    from rich.table import Table

    n = report["patients"]
    about = report.get("about")
    if about:
        console.print(ReportMeta(about["source"], about["generated"], about["fhir_crs_version"],
                                 bool(about.get("deidentified"))).line(), markup=False, highlight=False)
    if n == 0 and report.get("empty_reason"):
        console.print(f"Empty cohort: {report['empty_reason']}", markup=False, highlight=False)
    table = Table(title=f"CAR-T toxicity cohort — {n} patients — CRS graded by {report['system']}",
                  title_justify="left")
    table.add_column("Finding")
    table.add_column("n", justify="right")
    table.add_column("%", justify="right")
    for key, label in ROW_LABELS.items():
        row = report["rows"].get(key)
        if row is not None:
            table.add_row(label, str(row["n"]), f"{row['pct']:.1f}")
    console.print(table)
    for key, c in report.get("correlation", {}).items():
        rho = "–" if c["rho"] is None else f"{c['rho']:+.2f}"
        console.print(f"  Spearman max CRS grade vs peak {CORRELATION_LABELS.get(key, key)}: "
                      f"rho {rho}, p {format_p(c['p'])}, n {c['n']}")
    plist = report.get("patient_list") or []
    if plist:
        console.print("Patients:", markup=False, highlight=False)
        for p in plist:
            ident = Identity(p["label"], None if about and about.get("deidentified") else p["patient"], p.get("mrn"), p.get("name"))
            console.print(f"  {ident.describe()}" + (f"  ({ident.ref})" if ident.ref else ""), markup=False, highlight=False)
