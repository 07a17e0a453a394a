"""Stage 6 (registry): graded cases -> the CRS and neurotoxicity questions of CIBMTR Form 4100.

Form 4100 (*Cellular Therapy Essential Data Follow-Up*, toxicities section) asks for the
components of CRS and neurotoxicity with their dates, not for a grade. `cibmtr_rows(cases)`
pre-populates them for a data manager from the case objects of `fhir-crs grade --json`
(`series` is used when present — `--series` / `GradeRun.to_json(series=True)` — and the
timeline otherwise). Question numbers are those of revision R4.0 as encoded by ClarityNLP
(../shared/docs/grading-prior-art.md §4); later revisions renumber them, the wording is the same.

Answers are "Y", "N" or "Unknown"; dates are YYYY-MM-DD in the time zone passed as `tz`
(default UTC — pass the hospital's zone, since the form wants the local calendar date).
Every answer is derived; "Unknown" means the case JSON cannot tell:

| Column | Form question | Derived from |
|---|---|---|
| q76_crs, q77_crs_date | CRS since last report; date of diagnosis | CRS `astct` grade >= 1; its onset (first fever >= 38 °C after infusion) |
| q78_crs_therapy, q80_crs_therapy_specify | therapy given for CRS; which | anti-IL-6 / anti-cytokine / corticosteroid doses between CRS onset and resolution (or death / end of record), from the timeline |
| q81_fever, q82_fever_date | fever >= 38 °C; onset | first timeline `fever` at or after infusion |
| q83_hypotension, q84_hypotension_date | hypotension requiring therapy; onset | `facts.haemodynamic_instability`; the first documented hypotension at or before the first fluid bolus / vasopressor (else that therapy's start) |
| q85_iv_fluids | intravenous fluids | a fluid bolus within 1 h of documented hypotension (timeline) |
| q86_vasopressors, q87_vasopressor_number | vasopressors; 1 / >= 2 | vasopressor courses counted by the grader (peri-procedural and < 60 min ones excluded); number of different drugs |
| q90_hypotension_controlled | hypotension controlled with therapy | "N" if the patient died with a vasopressor running, else "Y"; "Unknown" without series for a death |
| q91_hypoxia_fio2_lt40, q92_date / q93_hypoxia_fio2_ge40, q94_date | hypoxia needing FiO2 < 40 % / >= 40 % | CRS-attributed, non-home O2 segments; documented FiO2, else the grader's default estimate (nasal cannula 20 % + 4 %/L up to 6 L/min, +3 %/L above, cap 60 %; face mask 40 % at 5 L/min; non-rebreather 80 %; blow-by 30 %); a segment with neither is not classified |
| q95_positive_pressure, q96_date | CPAP / BiPAP / invasive ventilation; start | CRS-attributed, non-home positive-pressure segments |
| q97_crs_resolved, q98_date | CRS resolved; date | CRS `astct` resolution (24 h clear) |
| q99_neurotoxicity, q100_date | neurotoxicity; onset | ICANS `astct` grade >= 1; its onset |
| q101_cartox10_performed, q102_lowest_cartox10 | CARTOX-10 performed; lowest band | ICE (the CARTOX-10 successor) values charted below 10; "Unknown" when none was abnormal (the case JSON lists only abnormal scores); "N" for children assessed with CAPD |
| capd_highest | (not on the form) highest CAPD for children < 12 y | timeline CAPD scores |
| q103_depressed_consciousness | depressed level of consciousness | timeline / ICANS criteria |
| q104_dysphasia | dysphasia/aphasia | always "Unknown": not a coded element in the case JSON |
| q106_seizure, q107_seizure_type, q109_seizure_severity | seizure; type; grade 3 / 4 | timeline seizures and ICANS criteria (status / prolonged = grade 4) |
| q110_motor_deficit | hemiparesis / paraparesis / other motor deficit | deep focal motor weakness (ICANS criteria / timeline) |
| q111_cerebral_edema, q112_cerebral_edema_grade | cerebral oedema; grade 3 / 4 | ICANS criteria (focal 3, diffuse or raised-ICP sign 4; haemorrhage excluded by the grader) and non-resolving timeline findings |
| evidence | (not on the form) | `question=Type/id` for the resource behind each date |
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Any

__all__ = ["FIELDS", "cibmtr_csv", "cibmtr_row", "cibmtr_rows"]

FIELDS: list[tuple[str, str]] = [
    ("patient", "FHIR Patient reference"),
    ("infusion_date", "CAR-T infusion (day 0)"),
    ("q76_crs", "Q76 Did the recipient develop CRS?"),
    ("q77_crs_date", "Q77 CRS date of diagnosis"),
    ("q78_crs_therapy", "Q78 Was therapy given for CRS?"),
    ("q80_crs_therapy_specify", "Q79-80 Therapy given"),
    ("q81_fever", "Q81 Fever >= 38.0 C"),
    ("q82_fever_date", "Q82 Fever date of onset"),
    ("q83_hypotension", "Q83 Hypotension requiring therapy"),
    ("q84_hypotension_date", "Q84 Hypotension date of onset"),
    ("q85_iv_fluids", "Q85 Intravenous fluids"),
    ("q86_vasopressors", "Q86 Vasopressor(s)"),
    ("q87_vasopressor_number", "Q87 Number of vasopressors (1 / >=2)"),
    ("q90_hypotension_controlled", "Q90 Hypotension controlled with therapy"),
    ("q91_hypoxia_fio2_lt40", "Q91 Hypoxia requiring FiO2 < 40%"),
    ("q92_hypoxia_fio2_lt40_date", "Q92 date of onset"),
    ("q93_hypoxia_fio2_ge40", "Q93 Hypoxia requiring FiO2 >= 40%"),
    ("q94_hypoxia_fio2_ge40_date", "Q94 date of onset"),
    ("q95_positive_pressure", "Q95 Positive pressure ventilatory support"),
    ("q96_positive_pressure_date", "Q96 date started"),
    ("q97_crs_resolved", "Q97 Did CRS resolve?"),
    ("q98_crs_resolved_date", "Q98 date resolved"),
    ("q99_neurotoxicity", "Q99 Neurotoxicity"),
    ("q100_neurotoxicity_date", "Q100 date of onset"),
    ("q101_cartox10_performed", "Q101 CARTOX-10 (ICE) performed"),
    ("q102_lowest_cartox10", "Q102 Lowest CARTOX-10/ICE score (10 / 7-9 / 3-6 / 0-2 / unable)"),
    ("capd_highest", "Highest CAPD (children < 12 y; not on the form)"),
    ("q103_depressed_consciousness", "Q103 Depressed level of consciousness"),
    ("q104_dysphasia", "Q104 Dysphasia/aphasia (not derivable: Unknown)"),
    ("q106_seizure", "Q106 Seizure"),
    ("q107_seizure_type", "Q107 Seizure type"),
    ("q109_seizure_severity", "Q109 Seizure severity (grade 3 / 4)"),
    ("q110_motor_deficit", "Q110 Hemiparesis / paraparesis / other motor deficit"),
    ("q111_cerebral_edema", "Q111 Cerebral edema"),
    ("q112_cerebral_edema_grade", "Q112 Cerebral edema grade (3 / 4)"),
    ("evidence", "Source resources of each date (question=Type/id)"),
]

_PPV = {"cpap", "bipap", "noninvasive_ventilation", "invasive_ventilation"}
_CRS_THERAPY = {"anti_il6", "anti_cytokine", "corticosteroid"}
_NOT_EDEMA = re.compile(r"resolv|no (cerebral )?o?edema|absent|h(a)?emorrhag", re.IGNORECASE)
_SUPPORT = re.compile(r"^(?P<device>[a-z ]+?)(?: (?P<flow>[\d.]+) L/min)?(?: FiO2 (?P<fio2>[\d.]+) %)?(?P<rest> \(.*\))?$")


def _yn(v: bool | None) -> str:
    return "Unknown" if v is None else "Y" if v else "N"


def _parse(t: str | None) -> datetime | None:
    return None if not t else datetime.fromisoformat(t.replace("Z", "+00:00"))


def _fio2_estimate(device: str, flow: float | None, fio2: float | None) -> float | None:
    """FiO2 in percent: documented, else the grader's estimate at the default settings
    (`Support.fio2_estimate`, grading-criteria §1.5: HFNC by its flow, or as high flow without one)."""
    from .timeline import Support

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return Support(device, epoch, epoch, [], flow=flow, fio2=fio2).fio2_estimate(_default_settings())[0]


@lru_cache(maxsize=1)
def _default_settings() -> Any:
    from .settings import GradingSettings

    return GradingSettings()


def _support_segments(case: dict[str, Any]) -> list[dict[str, Any]]:
    """O2 / positive-pressure segments after infusion (series, else parsed from the timeline)."""
    series = case.get("series") or {}
    if "o2_support" in series:
        return [dict(s, hour=s["start"], refs=s.get("refs") or []) for s in series["o2_support"] if s["end"] > 0]
    out = []
    for e in case.get("timeline") or []:
        if e["kind"] != "respiratory_support" or e["hour"] < 0:
            continue
        m = _SUPPORT.match(e["detail"])
        if not m:
            continue
        rest = m.group("rest") or ""
        out.append({
            "hour": e["hour"], "device": m.group("device").replace(" ", "_"),
            "flow": float(m.group("flow")) if m.group("flow") else None,
            "fio2": float(m.group("fio2")) if m.group("fio2") else None,
            "home": "home/baseline" in rest, "attributed": "not CRS" not in rest, "refs": e["evidence"],
        })
    return out


def cibmtr_row(case: dict[str, Any], tz: tzinfo = UTC) -> dict[str, str]:
    """The Form 4100 CRS/neurotoxicity answers for one graded case (one CAR-T infusion)."""
    t0 = _parse(case["infusion"])
    assert t0 is not None
    crs = (case.get("crs") or {}).get("astct") or {}
    icans = (case.get("icans") or {}).get("astct") or {}
    facts = case.get("facts") or {}
    timeline = [e for e in case.get("timeline") or [] if e["hour"] >= 0]
    evidence: dict[str, str] = {}

    def date_at(hour: float | None) -> str:
        return "" if hour is None else (t0 + timedelta(hours=hour)).astimezone(tz).date().isoformat()

    def date_of(iso: str | None) -> str:
        t = _parse(iso)
        return "" if t is None else t.astimezone(tz).date().isoformat()

    def cite(q: str, refs: list[str] | None) -> None:
        if refs:
            evidence[q] = refs[0]

    def kind(*names: str) -> list[dict[str, Any]]:
        return [e for e in timeline if e["kind"] in names]

    row: dict[str, str] = {"patient": case["patient"], "infusion_date": date_of(case["infusion"])}

    # CRS
    has_crs = int(crs.get("grade") or 0) >= 1
    row["q76_crs"] = _yn(has_crs)
    row["q77_crs_date"] = date_of(crs.get("onset")) if has_crs else ""
    if has_crs:
        cite("q77", (crs.get("evidence") or [])[:1])
    onset_h = (crs.get("hours") or {}).get("onset")
    end_h = (crs.get("hours") or {}).get("resolved")
    therapy = [e for e in kind(*_CRS_THERAPY) if has_crs and onset_h is not None and onset_h <= e["hour"]
               and (end_h is None or e["hour"] <= end_h)]
    row["q78_crs_therapy"] = _yn(bool(therapy)) if has_crs else ""
    names = sorted({e["detail"].split(" x")[0] for e in therapy})  # "dexamethasone x8 (to +151 h)" -> drug
    row["q80_crs_therapy_specify"] = "; ".join(names)
    if therapy:
        cite("q78", therapy[0]["evidence"])

    fevers = kind("fever")
    row["q81_fever"] = _yn(bool(fevers))
    row["q82_fever_date"] = date_at(fevers[0]["hour"]) if fevers else ""
    if fevers:
        cite("q82", fevers[0]["evidence"])

    hypos = kind("hypotension")
    boluses = kind("fluid_bolus")
    pressors = kind("vasopressor")
    treated = bool(facts.get("haemodynamic_instability")) if "haemodynamic_instability" in facts else bool(pressors or boluses)
    row["q83_hypotension"] = _yn(treated)
    row["q84_hypotension_date"] = ""
    if treated:
        first_tx = min([e["hour"] for e in boluses + pressors], default=None)
        before = [h for h in hypos if first_tx is None or h["hour"] <= first_tx + 1]
        first = before[0] if before else min(boluses + pressors, key=lambda e: e["hour"])
        row["q84_hypotension_date"] = date_at(first["hour"])
        cite("q84", first["evidence"])
    fluids = [b for b in boluses if any(abs(b["hour"] - h["hour"]) <= 1 for h in hypos)]
    row["q85_iv_fluids"] = _yn(bool(fluids)) if treated else "N"

    series = case.get("series") or {}
    courses = series.get("vasopressors")
    drugs = {c["drug"] for c in courses} if courses is not None else {e["detail"].split(" until ")[0] for e in pressors}
    row["q86_vasopressors"] = _yn(bool(drugs))
    row["q87_vasopressor_number"] = "" if not drugs else "1" if len(drugs) == 1 else ">=2"
    if pressors:
        cite("q86", pressors[0]["evidence"])
    died = bool(facts.get("died"))
    if not treated:
        row["q90_hypotension_controlled"] = ""
    elif not died:
        row["q90_hypotension_controlled"] = "Y"
    elif courses is None:
        row["q90_hypotension_controlled"] = "Unknown"
    else:
        death_h = None
        death = _parse(facts.get("deceased"))
        if death is not None:
            death_h = (death - t0).total_seconds() / 3600
        running = death_h is not None and any(c["end"] >= death_h - 0.1 for c in courses)
        row["q90_hypotension_controlled"] = _yn(not running)

    # hypoxia and positive pressure
    segs = [s for s in _support_segments(case) if not s.get("home") and (s.get("attributed", True) or s["device"] not in _PPV)]
    lt40 = ge40 = ppv = None
    for s in sorted(segs, key=lambda s: s["hour"]):
        if s["device"] in _PPV:
            ppv = ppv or s
        f = _fio2_estimate(s["device"], s.get("flow"), s.get("fio2"))
        if f is None:
            continue
        if f < 40:
            lt40 = lt40 or s
        else:
            ge40 = ge40 or s
    for q, seg, key in (("q91", lt40, "q91_hypoxia_fio2_lt40"), ("q93", ge40, "q93_hypoxia_fio2_ge40"),
                        ("q95", ppv, "q95_positive_pressure")):
        row[key] = _yn(seg is not None)
        date_key = {"q91": "q92_hypoxia_fio2_lt40_date", "q93": "q94_hypoxia_fio2_ge40_date",
                    "q95": "q96_positive_pressure_date"}[q]
        row[date_key] = date_at(max(seg["hour"], 0.0)) if seg else ""
        if seg:
            cite(date_key[:3], seg.get("refs"))

    resolved = crs.get("resolved")
    row["q97_crs_resolved"] = _yn(resolved is not None) if has_crs else ""
    row["q98_crs_resolved_date"] = date_of(resolved) if resolved else ""

    # neurotoxicity
    grade = int(icans.get("grade") or 0)
    criteria = icans.get("criteria") or []
    row["q99_neurotoxicity"] = _yn(grade >= 1)
    row["q100_neurotoxicity_date"] = date_of(icans.get("onset")) if grade >= 1 else ""
    if grade >= 1 and criteria:
        cite("q100", criteria[0]["evidence"])
    age = case.get("age_years")
    ice = [float(e["detail"]) for e in kind("ice_score")]
    ice += [float(m.group(1)) for c in criteria if (m := re.match(r"ICE (\d+)", c["criterion"]))]
    unable = any("unable to perform ICE" in c["criterion"] for c in criteria)
    capd = [float(e["detail"]) for e in kind("capd_score")]
    if age is not None and age < 12 and not ice:
        row["q101_cartox10_performed"] = "N"
        row["q102_lowest_cartox10"] = ""
    elif ice or unable:
        row["q101_cartox10_performed"] = "Y"
        low = min(ice) if ice else None
        row["q102_lowest_cartox10"] = "unable to be assessed" if unable and (low is None or low > 2) else \
            "10" if low is not None and low >= 10 else "7-9" if low is not None and low >= 7 else \
            "3-6" if low is not None and low >= 3 else "0-2"
    else:
        row["q101_cartox10_performed"] = "Unknown"
        row["q102_lowest_cartox10"] = ""
    row["capd_highest"] = f"{max(capd):g}" if capd else ""
    loc = [e for e in kind("consciousness")] + [c for c in criteria if "depressed level of consciousness" in c["criterion"]]
    row["q103_depressed_consciousness"] = _yn(bool(loc))
    row["q104_dysphasia"] = "Unknown"
    seizures = kind("seizure")
    seizure_criteria = [c for c in criteria if "seizure" in c["criterion"]]
    row["q106_seizure"] = _yn(bool(seizures or seizure_criteria))
    text = " ".join([e["detail"] for e in seizures] + [c["criterion"] for c in seizure_criteria])
    row["q107_seizure_type"] = "" if not text else "status epilepticus" if re.search(r"status|prolonged|repetitive|without return", text, re.I) else \
        "generalized tonic-clonic" if re.search(r"tonic|generali[sz]ed", text, re.I) else \
        "non-convulsive" if re.search(r"non-?convulsive", text, re.I) else "other"
    severe = any(c["grade"] >= 4 for c in seizure_criteria) or "status" in row["q107_seizure_type"]
    row["q109_seizure_severity"] = "" if not text else "4" if severe else "3"
    if seizures:
        cite("q106", seizures[0]["evidence"])
    motor = kind("motor_weakness") + [c for c in criteria if "motor weakness" in c["criterion"]]
    row["q110_motor_deficit"] = _yn(bool(motor))
    edema_c = [c for c in criteria if "cerebral edema" in c["criterion"] or "raised ICP" in c["criterion"]]
    edema_t = [e for e in kind("cerebral_edema", "icp_sign") if not _NOT_EDEMA.search(e["detail"])]
    if "intracranial_hemorrhage_excluded" in (icans.get("flags") or []):
        edema_t = [e for e in edema_t if e["kind"] == "icp_sign"]
    has_edema = bool(edema_c or [e for e in edema_t if e["kind"] == "cerebral_edema"])
    row["q111_cerebral_edema"] = _yn(has_edema)
    diffuse = any(c["grade"] >= 4 for c in edema_c) or any(
        e["kind"] == "icp_sign" or re.search(r"diffuse", e["detail"], re.I) for e in edema_t)
    row["q112_cerebral_edema_grade"] = "" if not has_edema else "4" if diffuse else "3"
    if edema_c:
        cite("q111", edema_c[0]["evidence"])
    row["evidence"] = "; ".join(f"{q}={r}" for q, r in evidence.items())
    return {k: row.get(k, "") for k, _ in FIELDS}


def cibmtr_rows(cases: Iterable[dict[str, Any]] | dict[str, Any], tz: tzinfo = UTC) -> list[dict[str, str]]:
    """One row per graded case (accepts the `fhir-crs grade --json` object or its case list)."""
    if isinstance(cases, dict):
        cases = cases.get("cases") or []
    return [cibmtr_row(c, tz) for c in cases]


def cibmtr_csv(rows: list[dict[str, str]], questions: bool = False) -> str:
    """CSV of `cibmtr_rows`; with `questions=True` a second header line gives each form question."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([k for k, _ in FIELDS])
    if questions:
        w.writerow([q for _, q in FIELDS])
    for r in rows:
        w.writerow([r.get(k, "") for k, _ in FIELDS])
    return buf.getvalue()
