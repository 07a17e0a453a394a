"""Stage 4, per case: a `CaseTimeline` graded by every system (`GradedCase`), and one patient's
mapped events graded (`grade_events`) — the pure per-patient step every engine runs (the local
`grade`, `pull`/`sync`, and the Spark executors, spark.py). Also the case views its JSON holds:
the salient events of the timeline (`display_events`) and the cohort-level facts (`case_facts`).

Layering: timeline -> grading -> (this module) -> writeback / pipeline; nothing here imports the
pipeline, a client or a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..events import DrugGiven, Event, Finding, Measurement, PatientInfo, Skipped, iso
from ..identity import patient_label
from ..settings import GradingSettings
from ..timeline import CaseTimeline, build_timelines, plot_series
from . import CRS_SYSTEMS, ICANS_SYSTEMS, adjacent
from .episodes import is_fever
from .organ import grade_lab
from .result import SystemResult

__all__ = ["GradedCase", "case_facts", "display_events", "grade_case", "grade_events"]

H = timedelta(hours=1)


@dataclass(slots=True)
class GradedCase:
    timeline: CaseTimeline
    crs: dict[str, SystemResult]
    icans: dict[str, SystemResult]
    adjacent: dict[str, Any]

    def to_json(self, settings: GradingSettings, series: bool = False) -> dict[str, Any]:
        tl = self.timeline
        out = {
            "patient": tl.patient,
            "patient_label": patient_label(tl.patient),
            "mrn": tl.mrn,
            "name": tl.name,
            "infusion": iso(tl.infusion),
            "infusion_evidence": tl.infusion_refs,
            "age_years": tl.age_years,
            "age_months": tl.age_months if tl.age_years is not None and tl.age_years < 2 else None,
            "matched_by_text": sorted(tl.text_matched),
            "crs": {k: v.to_json(tl.infusion, settings) for k, v in self.crs.items()},
            "icans": {k: v.to_json(tl.infusion, settings) for k, v in self.icans.items()},
            "adjacent": self.adjacent,
            "timeline": display_events(tl, settings),
            "facts": case_facts(tl, settings),
        }
        if series:
            out["series"] = plot_series(tl)
        return out


def grade_case(tl: CaseTimeline, settings: GradingSettings) -> GradedCase:
    crs = {name: g(tl, settings) for name, g in CRS_SYSTEMS.items()}
    case = GradedCase(
        tl, crs,
        {name: g(tl, settings) for name, g in ICANS_SYSTEMS.items()},
        adjacent(tl, settings, crs["astct"].resolved),
    )
    for result in [*case.crs.values(), *case.icans.values()]:
        # Local codes: evidence that was recognised by its text, not a configured code, is flagged.
        if tl.text_matched.intersection(result.evidence):
            result.flag("matched_by_text")
    tl.derived.clear()  # the systems' shared state (grading/state.py) is not kept with the case
    return case


def grade_events(patient: str, events: list[Event], flags: set[str], refs: list[str],
                  settings: GradingSettings) -> tuple[list[GradedCase], list[Skipped]]:
    """Every case of one patient; when no CAR-T infusion was found, one skip per resource of the
    patient that was read but not graded (`refs`), so counts add up."""
    timelines = build_timelines(patient, events, flags, settings)
    if not timelines:
        n = sum(1 for e in events if not isinstance(e, PatientInfo))
        return [], [Skipped(ref, f"no CAR-T infusion (day 0) found for its patient: {patient}, {n} mapped events not graded", "no_infusion")
                    for ref in refs]
    return [grade_case(tl, settings) for tl in timelines], []


def display_events(tl: CaseTimeline, s: GradingSettings) -> list[dict[str, object]]:
    """The clinically salient events of a case, in time order, for the printed timeline and the
    summary Bundle's List: fevers, hypotension, vasopressors, respiratory support, CRS-directed
    drugs, fluid boluses, key procedures and abnormal neuro assessments."""
    out: list[dict[str, object]] = []

    def add(t: datetime, kind: str, detail: str, refs: list[str]) -> None:
        out.append({"at": iso(t), "hour": round(tl.hours(t) or 0.0, 2), "kind": kind, "detail": detail, "evidence": refs})

    add(tl.infusion, "car_t_infusion", "CAR-T infusion (day 0)", tl.infusion_refs)
    for m in tl.temps:
        if m.time >= tl.infusion - 24 * H and is_fever(m, s):
            add(m.time, "fever", f"{m.value:.1f} °C", [m.ref])
    for h in tl.hypotension:
        add(h.time, "hypotension", f"SBP {h.sbp:g} < {h.threshold:g} mmHg ({h.how})", h.refs)
    for c in tl.pressors:
        add(c.start, "vasopressor", f"{c.drug} until +{tl.hours(c.end):.1f} h ({c.minutes / 60:.1f} h)", c.refs)
    for c, why in tl.ignored_pressors:
        add(c.start, "vasopressor_ignored", f"{c.drug}: {why}", c.refs)
    previous = None
    for g in tl.support:
        key = (g.device, g.flow, g.fio2, g.home, g.attributed)
        if key == previous:
            continue  # the same support charted again
        previous = key
        what = g.device.replace("_", " ")
        if g.flow is not None:
            what += f" {g.flow:g} L/min"
        if g.fio2 is not None:
            what += f" FiO2 {g.fio2:g} %"
        if g.home:
            what += " (home/baseline)"
        elif g.ppv and not g.attributed:
            what += f" (not CRS: {g.attribution_note})"
        add(g.start, "respiratory_support", what, g.refs)
    # repeated doses of one drug (e.g. dexamethasone q6h) are one line: first dose, count, last dose
    runs: list[list[DrugGiven]] = []
    for d in tl.drugs:
        if d.drug_class not in ("anti_il6", "anti_cytokine", "corticosteroid", "antipyretic", "blood_product"):
            continue
        run = next((r for r in runs if r[-1].drug == d.drug and d.start - r[-1].start <= 12 * H), None)
        if run is None:
            runs.append([d])
        else:
            run.append(d)
    for run in runs:
        first = run[0]
        detail = first.drug if len(run) == 1 else f"{first.drug} x{len(run)} (to +{tl.hours(run[-1].start):g} h)"
        add(first.start, first.drug_class, detail, [d.ref for d in run][:5])
    for b in tl.boluses:
        add(b.start, "fluid_bolus", f"{b.drug} {b.volume_ml or 0:g} mL", [b.ref])
    for p in tl.procedures:
        if p.kind in ("intubation", "blood_purification", "ecmo", "icu_admission", "extubation"):
            add(p.start, p.kind, p.text, [p.ref])
    for e in tl.neuro:
        if e.time < tl.infusion:
            continue
        if isinstance(e, Measurement) and ((e.kind == "ice_score" and e.value < 10) or (e.kind == "capd_score" and e.value >= 1)):
            add(e.time, e.kind, f"{e.value:g}", [e.ref])
        elif isinstance(e, Finding) and e.detail not in ("absent", "alert"):
            add(e.time, e.kind, e.text or e.detail, [e.ref])
    if tl.deceased is not None:
        add(tl.deceased, "death", "deceased", [tl.deceased_ref] if tl.deceased_ref else [])
    out.sort(key=lambda x: (x["hour"], str(x["kind"])))
    return out


def case_facts(tl: CaseTimeline, s: GradingSettings) -> dict[str, object]:
    """Cohort-level facts of a case (the seed paper's table): treatments, support, organ injury,
    death and peak cytokines, each with the resources behind it."""
    def peak(kind: str) -> dict[str, object] | None:
        series = [m for m in tl.labs.get(kind, []) if m.time >= tl.infusion - 24 * H]
        if not series:
            return None
        m = max(series, key=lambda m: m.value)
        return {"value": m.value, "unit": m.unit, "at": iso(m.time), "evidence": [m.ref]}

    def drugs(*classes: str, names: tuple[str, ...] = ()) -> list[str]:
        return [d.ref for d in tl.drugs if d.start >= tl.infusion and (d.drug_class in classes or d.drug in names)]

    liver = 0
    liver_refs: list[str] = []
    for lab in ("alt", "ast", "bilirubin"):
        for m in tl.labs.get(lab, []):
            if m.time >= tl.infusion:
                g = grade_lab(tl, lab, m, s).grade
                if g > liver:
                    liver, liver_refs = g, [m.ref]
    post_hypo = [h for h in tl.hypotension if h.time >= tl.infusion]
    boluses_for_bp = [b.ref for b in tl.boluses if b.start >= tl.infusion and any(
        b.start - H <= h.time <= b.start + H for h in post_hypo)]
    pressors = [c.refs[0] for c in tl.pressors if c.start >= tl.infusion]
    invasive = [r for g in tl.support if g.device == "invasive_ventilation" and g.end > tl.infusion and not g.home for r in g.refs]
    purification = [p.ref for p in tl.procedures if p.kind == "blood_purification" and p.start >= tl.infusion]
    return {
        "age_years": tl.age_years,
        "weight_kg": tl.weight_kg,
        "haemodynamic_instability": bool(boluses_for_bp or pressors),
        "haemodynamic_evidence": (pressors + boluses_for_bp)[:10],
        "vasopressors": bool(pressors),
        "mechanical_ventilation": bool(invasive),
        "ventilation_evidence": invasive[:5],
        "tocilizumab": drugs(names=("tocilizumab",)),
        "corticosteroids": drugs("corticosteroid"),
        "blood_purification": purification,
        "liver_injury_grade": liver,
        "liver_evidence": liver_refs,
        "died": tl.deceased is not None or tl.died,
        "deceased": iso(tl.deceased),
        "peak_il6": peak("il6"),
        "peak_ifn_gamma": peak("ifn_gamma"),
        "peak_ferritin": peak("ferritin"),
        "peak_crp": peak("crp"),
    }
