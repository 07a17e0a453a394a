"""Stage 3: events -> `CaseTimeline`, one per CAR-T infusion, anchored on day 0.

Builds the derived series every grading system reads: temperatures, hypotension events
(age-based thresholds, procedure windows and arterial artefacts excluded), vasopressor courses
(same-drug segments joined, short/peri-procedural infusions set aside with a reason),
respiratory-support segments (device rows carried forward, procedures, home baseline,
positive-pressure attribution, FiO2 documented or estimated), masking drugs, labs, neuro
assessments. Pure: events in, timeline out.

Cost: O(n log n) for n events (one pass to sort them into series, one sort per series, bisection
for the hypotension partner / treatment look-ups), plus O(S x P) to carry procedure reasons onto
the S observation-charted support rows (P procedure segments, a handful per case) and O(n x W)
for procedure windows (W, likewise a handful).
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from .events import DrugGiven, Event, Finding, Measurement, PatientInfo, ProcedureDone
from .settings import GradingSettings

H = timedelta(hours=1)
_TIME = operator.attrgetter("time")
_START = operator.attrgetter("start")
MIN = timedelta(minutes=1)

PPV = frozenset({"cpap", "bipap", "noninvasive_ventilation", "invasive_ventilation"})
DEVICE_RANK = {
    "room_air": 0, "blow_by": 1, "nasal_cannula": 2, "unspecified_o2": 2, "face_mask": 3, "venturi_mask": 3,
    "high_flow_nasal_cannula": 4, "non_rebreather": 5, "cpap": 6, "bipap": 7, "noninvasive_ventilation": 7,
    "invasive_ventilation": 8,
}
SUPPORT_PROCEDURES = frozenset(
    {"nasal_cannula", "high_flow_nasal_cannula", "face_mask", "non_rebreather", "venturi_mask",
     "cpap", "bipap", "noninvasive_ventilation", "invasive_ventilation"}
)


@dataclass(slots=True)
class Support:
    """A respiratory-support segment [start, end)."""

    device: str
    start: datetime
    end: datetime
    refs: list[str]
    flow: float | None = None
    fio2: float | None = None  # percent, documented
    source: str = "observation"
    reason: str = ""
    home: bool = False
    assumed: str = ""  # why the device was inferred, if it was
    attributed: bool = True  # positive pressure attributable to CRS hypoxia
    attribution_note: str = ""
    indications: frozenset[str] = frozenset()  # mappings/reasons.toml classes (coded reason first)

    @property
    def ppv(self) -> bool:
        return self.device in PPV

    def fio2_estimate(self, s: GradingSettings) -> tuple[float | None, bool]:
        """FiO2 in percent: documented, else the §1.5 estimate (flagged as estimated). A nasal
        cannula by flow, HFNC included (> 6 L/min: +3 %/L, capped); an HFNC without a flow is
        high flow by its class (§1.5: > low_flow_max_lpm), so at least the estimate at that flow."""
        if self.fio2 is not None:
            return self.fio2, False
        f = self.flow
        d = self.device
        if d == "high_flow_nasal_cannula" and f is None:
            f = s.low_flow_max_lpm
        if d in ("nasal_cannula", "unspecified_o2", "high_flow_nasal_cannula"):
            if f is None:
                return None, True
            low = s.fio2_nc_base + s.fio2_nc_per_lpm * min(f, 6)
            return min(low + s.fio2_nc_high_per_lpm * max(f - 6, 0), s.fio2_nc_cap), True
        if d == "blow_by":
            return s.fio2_blow_by, True
        if d == "face_mask":
            return min(s.fio2_face_mask_5l + 4 * max((f or 5) - 5, 0), s.fio2_nc_cap), True
        if d == "non_rebreather":
            return s.fio2_non_rebreather, True
        return None, True


@dataclass(slots=True)
class PressorCourse:
    """One vasopressor infusion of one drug (joined segments)."""

    drug: str
    start: datetime
    end: datetime
    segments: list[DrugGiven]
    end_assumed: bool = False

    @property
    def refs(self) -> list[str]:
        return [s.ref for s in self.segments]

    @property
    def minutes(self) -> float:
        return (self.end - self.start).total_seconds() / 60


@dataclass(slots=True)
class Hypotension:
    time: datetime
    sbp: float
    threshold: float
    refs: list[str]
    how: str  # "confirmed" | "treated"
    end: datetime | None = None  # the next reading at or above the threshold (the low stretch's end)


@dataclass(slots=True)
class CaseTimeline:
    patient: str
    infusion: datetime
    infusion_refs: list[str]
    window_end: datetime | None
    birth_date: date | None = None
    age_years: int | None = None
    age_days: int | None = None
    deceased: datetime | None = None  # None also when the patient died at an unknown time (`died`)
    deceased_ref: str | None = None
    died: bool = False  # the Patient says deceased, with or without a time (§1.8)
    weight_kg: float | None = None
    mrn: str | None = None
    name: str | None = None
    temps: list[Measurement] = field(default_factory=list)
    sbp: list[Measurement] = field(default_factory=list)
    spo2: list[Measurement] = field(default_factory=list)
    hypotension: list[Hypotension] = field(default_factory=list)
    pressors: list[PressorCourse] = field(default_factory=list)
    ignored_pressors: list[tuple[PressorCourse, str]] = field(default_factory=list)
    support: list[Support] = field(default_factory=list)
    baseline_support: list[Support] = field(default_factory=list)
    drugs: list[DrugGiven] = field(default_factory=list)
    boluses: list[DrugGiven] = field(default_factory=list)
    procedures: list[ProcedureDone] = field(default_factory=list)
    windows: list[tuple[datetime, datetime, str]] = field(default_factory=list)
    labs: dict[str, list[Measurement]] = field(default_factory=lambda: defaultdict(list))
    neuro: list[Measurement | Finding] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sedation: list[tuple[datetime, datetime, str]] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    last_time: datetime | None = None
    text_matched: set[str] = field(default_factory=set)
    # per-settings state shared by the grading systems (grading/state.py); not part of the case
    derived: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    def hours(self, t: datetime | None) -> float | None:
        return None if t is None else (t - self.infusion).total_seconds() / 3600

    @property
    def age_months(self) -> int | None:
        """Completed months at infusion (reported for infants)."""
        if self.birth_date is None:
            return None
        d, b = self.infusion.date(), self.birth_date
        return (d.year - b.year) * 12 + d.month - b.month - (d.day < b.day)

    @property
    def pediatric(self) -> bool:
        return self.age_years is not None and self.age_years < 18

    def sbp_threshold(self, s: GradingSettings) -> float:
        """PALS / PedsCARTOX hypotension threshold for the age at infusion (§1.3)."""
        return _sbp_threshold(s, self.age_years, self.age_days)

    def sbp_threshold_at(self, s: GradingSettings, t: datetime) -> float:
        """The threshold for the age at `t` (a child may pass a birthday during the course)."""
        if self.birth_date is None:
            return s.sbp_adult
        return _sbp_threshold(s, *_age(self.birth_date, t))

    def in_window(self, t: datetime) -> bool:
        return any(a <= t <= b for a, b, _ in self.windows)

    def findings_of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]


def _sbp_threshold(s: GradingSettings, years: int | None, days: int | None) -> float:
    if days is None or years is None:
        return s.sbp_adult
    if days <= 28:
        return s.sbp_neonate
    if years < 1:
        return s.sbp_infant
    if years <= 10:
        return s.sbp_child_base + s.sbp_child_per_year * years
    return s.sbp_adult


def _age(birth: date, at: datetime) -> tuple[int, int]:
    d = at.date()
    years = d.year - birth.year - ((d.month, d.day) < (birth.month, birth.day))
    return years, (d - birth).days


def find_infusions(events: list[Event]) -> list[tuple[datetime, list[str]]]:
    """CAR-T infusions (Procedure or product administration); records within 24 h are one infusion."""
    raw: list[tuple[datetime, str]] = []
    for e in events:
        if (isinstance(e, ProcedureDone) and e.kind == "car_t_infusion") or (isinstance(e, DrugGiven) and e.drug_class == "cart_product"):
            raw.append((e.start, e.ref))
    raw.sort()
    out: list[tuple[datetime, list[str]]] = []
    for t, ref in raw:
        if out and t - out[-1][0] < 24 * H:
            out[-1][1].append(ref)
        else:
            out.append((t, [ref]))
    return out


def _with_reasons(p: ProcedureDone, by_condition: dict[str, Finding], tl: CaseTimeline) -> ProcedureDone:
    """A Procedure's `reasonReference` Conditions (the patient's own, mapped as Findings): their
    indication classes join the Procedure's own — they never replace them, so a finding that
    raises a grade (respiratory failure) is never hidden by another reason — and their wording
    joins its reason text. `reason_refs` keeps the Conditions that added a class (cited beside
    the Procedure as evidence of the support segment), none else. A class decided by text is
    flagged as the Procedure's own text would be. O(reasonReferences)."""
    from dataclasses import replace

    found = [by_condition[r] for r in p.reason_refs if r in by_condition]
    extra = [c for c in found if c.indications]
    if not extra:
        return replace(p, reason_refs=())
    classes = p.indications.union(*(c.indications for c in extra))
    by_text = p.indication_by_text or any(c.indication_by_text for c in extra)
    words = [c.text or c.detail for c in extra]
    reason = "; ".join([p.reason, *words]) if p.reason else "; ".join(words)
    if by_text:
        tl.text_matched.add(p.ref)
    return replace(p, indications=classes, indication_by_text=by_text, reason=reason, reason_refs=tuple(c.ref for c in extra))


def _fluid_with_reasons(d: DrugGiven, by_condition: dict[str, Finding], tl: CaseTimeline) -> DrugGiven:
    """A fluid whose `reasonReference` names the patient's hypotension Condition is a bolus (a
    fluid given for hypotension, criteria §1.3), as a coded reasonCode would make it; the
    Condition is then cited with it (`reason_refs`), flagged when its text decided."""
    from dataclasses import replace

    hits = [by_condition[r] for r in d.reason_refs if r in by_condition and "hypotension" in by_condition[r].indications]
    if not hits:
        return replace(d, reason_refs=())
    by_text = all(c.indication_by_text for c in hits)
    if by_text:
        tl.text_matched.add(d.ref)
    return replace(d, bolus=True, notes=(*d.notes, "bolus_by_indication_text" if by_text else "bolus_by_indication"),
                   reason_refs=tuple(c.ref for c in hits))


def build_timelines(patient: str, events: list[Event], flags: set[str], s: GradingSettings) -> list[CaseTimeline]:
    infusions = find_infusions(events)
    info = next((e for e in events if isinstance(e, PatientInfo)), None)
    out = []
    for i, (t0, refs) in enumerate(infusions):
        nxt = infusions[i + 1][0] if i + 1 < len(infusions) else None
        out.append(_build(patient, t0, refs, nxt, info, events, set(flags), s))
    return out


def _place_dated_death(day: datetime, events: list[Event], keep: Callable[[datetime], bool]) -> datetime:
    """A death charted by date only (`death_time_imprecise`, §1.8) is placed at the last record
    charted on that day (the start of the day if none): the earliest time the chart allows,
    never before care that was still charted, and the sensitive choice for a grade 5 candidate
    (a death during an episode still active then), rather than the end of the day."""
    end = day + timedelta(days=1)
    at = day
    for e in events:
        if isinstance(e, PatientInfo):
            continue
        times = (e.time,) if isinstance(e, Measurement | Finding) else (e.start, e.end)
        for t in times:
            if t is not None and day <= t < end and t > at and keep(t):
                at = t
    return at


def _build(
    patient: str, t0: datetime, refs: list[str], window_end: datetime | None, info: PatientInfo | None,
    events: list[Event], flags: set[str], s: GradingSettings,
) -> CaseTimeline:
    tl = CaseTimeline(patient=patient, infusion=t0, infusion_refs=refs, window_end=window_end, flags=flags)
    if info is not None:
        tl.birth_date = info.birth_date
        if info.birth_date:
            tl.age_years, tl.age_days = _age(info.birth_date, t0)
        tl.deceased = info.deceased
        tl.deceased_ref = info.ref if info.deceased_flag else None
        tl.died = info.deceased_flag or info.deceased is not None
        if tl.died and tl.deceased is None:
            tl.flags.add("death_time_unknown")  # died, time unknown: a grade 5 cannot be placed
        tl.mrn, tl.name = info.mrn, info.name
    if tl.age_years is None:
        tl.flags.add("age_unknown")
    lo = t0 - timedelta(days=max(s.home_baseline_lookback_days, 2))

    def keep(t: datetime) -> bool:
        return t >= lo and (window_end is None or t < window_end)

    weights: list[Measurement] = []
    device_rows: list[Finding] = []
    flow_rows: list[Measurement] = []
    fio2_rows: list[Measurement] = []
    last = t0
    route: dict[str, list[Any]] = {  # measurement kind -> its series (labs: by kind)
        "temperature": tl.temps, "sbp": tl.sbp, "sbp_arterial": tl.sbp, "spo2": tl.spo2, "weight": weights,
        "o2_flow": flow_rows, "fio2": fio2_rows, "ice_score": tl.neuro, "capd_score": tl.neuro,
        "cartox10_score": tl.neuro, "rass": tl.neuro, "gcs_total": tl.neuro, "csf_opening_pressure": tl.neuro,
    }
    labs = tl.labs
    by_condition: dict[str, Finding] = {}  # Condition/id -> its Finding (indication classes)
    for e in events:
        if type(e) is Measurement:  # the usual event: what the general way below does for it
            t = e.time
            if t >= lo and (window_end is None or t < window_end):
                if e.matched_by_text:
                    tl.text_matched.add(e.ref)
                if t > last:
                    last = t
                series = route.get(e.kind)
                (labs[e.kind] if series is None else series).append(e)
            continue
        if isinstance(e, PatientInfo):
            continue
        if type(e) is Finding and e.ref.startswith("Condition/"):
            by_condition[e.ref.split("/_history/", 1)[0]] = e  # a reasonReference target, whatever its time
            if e.kind == "indication":
                continue  # only a reason: not a finding of the course
        t = e.time if isinstance(e, Measurement | Finding) else e.start
        if not keep(t):
            continue
        if e.matched_by_text or (isinstance(e, ProcedureDone) and e.indication_by_text) or (
            isinstance(e, DrugGiven) and "bolus_by_indication_text" in e.notes
        ):
            tl.text_matched.add(e.ref)  # recognised (or its indication decided) by text, not a code
        last = max(last, t)
        if isinstance(e, Measurement):
            series = route.get(e.kind)
            (labs[e.kind] if series is None else series).append(e)
        elif isinstance(e, Finding):
            if e.kind == "o2_device":
                device_rows.append(e)
            elif e.kind in ("consciousness", "seizure", "cerebral_edema", "icp_sign", "motor_weakness",
                            "intracranial_hemorrhage") or e.kind.startswith("unable_"):
                tl.neuro.append(e)
                tl.findings.append(e)
            else:
                tl.findings.append(e)
        elif isinstance(e, DrugGiven):
            tl.drugs.append(e)
            if e.end:
                last = max(last, e.end)
        elif isinstance(e, ProcedureDone):
            tl.procedures.append(e)
            if e.end:
                last = max(last, e.end)
    if tl.deceased is not None and "death_time_imprecise" in tl.flags:
        if keep(tl.deceased):
            tl.deceased = _place_dated_death(tl.deceased, events, keep)
        else:
            tl.flags.discard("death_time_imprecise")  # a death outside this case's window
    if tl.deceased is not None and keep(tl.deceased):
        last = max(last, tl.deceased)
    tl.last_time = last
    for coll in (tl.temps, tl.sbp, tl.spo2, tl.neuro, tl.findings):
        coll.sort(key=_TIME)
    for series in tl.labs.values():
        series.sort(key=_TIME)
    tl.drugs.sort(key=_START)
    tl.procedures.sort(key=_START)
    tl.procedures = [_with_reasons(p, by_condition, tl) if p.reason_refs else p for p in tl.procedures]
    tl.drugs = [_fluid_with_reasons(d, by_condition, tl) if d.reason_refs else d for d in tl.drugs]

    _derive_anc(tl)
    pre_weights = [w for w in weights if w.time <= t0 + 12 * H]
    if pre_weights:
        tl.weight_kg = max(pre_weights, key=lambda w: w.time).value  # dosing weight ~ last pre-infusion weight
    elif weights:
        tl.weight_kg = min(weights, key=lambda w: w.time).value

    for p in tl.procedures:
        if p.kind in ("procedure_window", "bone_marrow_biopsy"):
            tl.windows.append((p.start, p.end or p.start + H, p.ref))
    for d in tl.drugs:
        if d.drug_class == "sedative":
            if d.end is not None or "point_infusion" in d.notes:
                tl.sedation.append((d.start, d.end or d.start + H, d.ref))
            else:
                tl.sedation.append((d.start, d.start + timedelta(hours=s.icans_sedation_bolus_h), d.ref))
        if d.drug_class == "fluid" and _is_bolus(d, tl.weight_kg, s):
            tl.boluses.append(d)

    _pressor_courses(tl, s)
    _hypotension(tl, s)
    _support(tl, device_rows, flow_rows, fio2_rows, s)
    return tl


def _derive_anc(tl: CaseTimeline) -> None:
    """ANC = WBC x neutrophils % / 100 for draws that report no absolute count (terminology.md §2)."""
    have = {m.time for m in tl.labs.get("anc", [])}
    wbc = {m.time: m for m in tl.labs.get("wbc", [])}
    derived = []
    for pct in tl.labs.get("neutrophils_pct", []):
        w = wbc.get(pct.time)
        if w is not None and pct.time not in have:
            derived.append(Measurement("anc", pct.time, w.value * 1000 * pct.value / 100, "/uL", pct.ref,
                                       raw_value=pct.value, raw_unit="%"))
    if derived:
        tl.labs["anc"] = sorted([*tl.labs.get("anc", []), *derived], key=lambda m: m.time)
        tl.flags.add("anc_derived_from_wbc_differential")


def _is_bolus(d: DrugGiven, weight: float | None, s: GradingSettings) -> bool:
    if d.bolus:
        return True
    if d.volume_ml is None:
        # a weight-based bolus charted as mL/kg (paediatric 10-20 mL/kg)
        return d.dose_unit == "mL/kg" and (d.dose_value or 0) >= s.bolus_min_ml_per_kg
    if d.end is not None and (d.end - d.start) > 2 * H:
        return False  # a maintenance infusion, not a bolus
    if d.volume_ml >= s.bolus_min_ml:
        return True
    return weight is not None and d.volume_ml >= s.bolus_min_ml_per_kg * weight


def _pressor_courses(tl: CaseTimeline, s: GradingSettings) -> None:
    by_drug: dict[str, list[DrugGiven]] = defaultdict(list)
    for d in tl.drugs:
        if d.drug_class == "vasopressor" and not d.bolus:
            by_drug[d.drug].append(d)
    gap = timedelta(minutes=s.vasopressor_course_gap_min)
    end_of_data = tl.last_time or tl.infusion
    courses: list[PressorCourse] = []
    for drug, segs in by_drug.items():
        segs.sort(key=lambda d: d.start)
        cur: PressorCourse | None = None
        for i, seg in enumerate(segs):
            if seg.rate_value == 0:
                # a rate charted as 0 is the infusion off or paused, not a running vasopressor: it
                # never starts or extends a course, it only ends the point-charted segment before it
                continue
            end = seg.end
            assumed = False
            if end is None:
                nxt = segs[i + 1].start if i + 1 < len(segs) else None
                if nxt is not None and nxt - seg.start <= 24 * H:
                    end = nxt
                elif "point_infusion" in seg.notes:
                    # a rate charted at one instant, nothing after it: assume it ran a while
                    end = seg.start + timedelta(hours=s.point_infusion_assumed_h)
                    assumed = True
                else:  # an infusion still in progress: it runs to the end of the data
                    end = max(end_of_data, seg.start + MIN)
                    assumed = True
            if cur is not None and seg.start - cur.end <= gap:
                cur.end = max(cur.end, end)
                cur.segments.append(seg)
                cur.end_assumed = cur.end_assumed or assumed
            else:
                cur = PressorCourse(drug, seg.start, end, [seg], assumed)
                courses.append(cur)
    courses.sort(key=lambda c: c.start)
    min_dur = s.vasopressor_min_duration_min
    thr = tl.sbp_threshold(s)
    for c in courses:
        if c.end_assumed:
            tl.flags.add("infusion_end_assumed")
        inside = next((r for a, b, r in tl.windows if a - 30 * MIN <= c.start and c.end <= b + 30 * MIN), None)
        if inside is not None:
            tl.ignored_pressors.append((c, f"inside procedure window {inside}"))
            tl.flags.add("vasopressor_ignored")  # set aside by a convention: flagged for review
            continue
        if c.minutes < min_dur:
            documented = [
                m for m in tl.sbp
                if m.value < thr and c.start - H <= m.time <= c.start and not tl.in_window(m.time)
            ]
            treated_otherwise = s.short_vasopressor_sole_treatment_only and any(
                c.start - H <= b.start <= c.start + H for b in tl.boluses
            )
            if documented and not treated_otherwise:
                tl.flags.add("short_vasopressor_counted")
                tl.pressors.append(c)
            else:
                tl.ignored_pressors.append((c, f"infusion of {c.minutes:.0f} min < {min_dur:.0f} min"))
                tl.flags.add("vasopressor_ignored")
            continue
        tl.pressors.append(c)


def _hypotension(tl: CaseTimeline, s: GradingSettings) -> None:
    thr = tl.sbp_threshold(s)
    nibp = [m for m in tl.sbp if m.kind == "sbp"]
    nibp_times = [m.time for m in nibp]
    quarter = timedelta(seconds=900)
    readings = []
    for m in tl.sbp:
        if tl.in_window(m.time):
            if m.value < thr:
                tl.flags.add("low_sbp_in_procedure_window")  # excluded (§1.3), flagged for review
            continue
        if m.kind == "sbp_arterial" and m.value < s.arterial_artifact_sbp and any(
            n.value >= thr for n in nibp[bisect_left(nibp_times, m.time - quarter):bisect_right(nibp_times, m.time + quarter)]
        ):
            tl.flags.add("arterial_artifact_excluded")
            continue
        readings.append(m)
    low = [m for m in readings if m.value < thr]
    if tl.age_years is not None and tl.age_years <= 10 and any(
        m.time >= tl.infusion and thr <= m.value < tl.sbp_threshold_at(s, m.time) for m in readings
    ):
        # §1.3 [I]: the threshold is the one for the age at infusion; a reading low only for the
        # age the child had reached when it was taken is flagged, never silently set aside
        tl.flags.add("age_threshold_changes")
    gap_min = timedelta(minutes=s.hypotension_confirm_min_gap_min)
    window = timedelta(minutes=s.hypotension_confirm_window_min)
    treat = timedelta(minutes=s.hypotension_treatment_window_min)
    used: set[int] = set()
    # readings, boluses and courses are time-ordered: each look-up is a bisection or a scan that
    # stops at the end of its window, so the whole pass is O(n log n).
    bolus_starts = [b.start for b in tl.boluses]
    course_starts = [c.start for c in tl.pressors]
    # where each low stretch ends: the next reading at or above the threshold (one backward pass),
    # so that resolution (§1.1: after the last abnormality) never falls inside charted hypotension
    stretch_end: dict[int, datetime] = {}
    nxt: datetime | None = None
    for m in reversed(readings):
        if m.value >= thr:
            nxt = m.time
        else:
            stretch_end[id(m)] = nxt or m.time
    events: list[Hypotension] = []
    confirmed_at: datetime | None = None  # the latest confirmed event's first reading
    for i, m in enumerate(low):
        if i in used:
            continue
        partner = None
        for j in range(i + 1, len(low)):
            dt = low[j].time - m.time
            if dt > window:
                break
            if gap_min <= dt:
                partner = j
                break
        if partner is not None:
            used.add(partner)
            end = max(stretch_end[id(m)], stretch_end[id(low[partner])])
            events.append(Hypotension(m.time, m.value, thr, [m.ref, low[partner].ref], "confirmed", end))
            confirmed_at = m.time
            continue
        treated = [r for b in tl.boluses[bisect_left(bolus_starts, m.time):bisect_right(bolus_starts, m.time + treat)]
                   for r in (b.ref, *b.reason_refs)] + [
            c.refs[0] for c in tl.pressors[bisect_left(course_starts, m.time):bisect_right(course_starts, m.time + treat)]
        ]
        if treated:
            events.append(Hypotension(m.time, m.value, thr, [m.ref, *treated], "treated", stretch_end[id(m)]))
        elif m.time >= tl.infusion and not (confirmed_at is not None and m.time <= confirmed_at + window):
            # §1.3 [I]: one low reading, neither repeated nor treated, is not a hypotension event;
            # it could be (a missed repeat), so the result says so for review (a third reading
            # inside a confirmed event's window belongs to that event)
            tl.flags.add("hypotension_unconfirmed")
    tl.hypotension.extend(events)


def _support(tl: CaseTimeline, device_rows: list[Finding], flow_rows: list[Measurement],
             fio2_rows: list[Measurement], s: GradingSettings) -> None:
    carry = timedelta(hours=s.device_carry_forward_h)
    end_of_data = tl.last_time or tl.infusion
    rows: dict[datetime, dict[str, object]] = defaultdict(dict)
    # Two rows charted at the same time: keep the more intensive device and the higher values.
    for d in device_rows:
        cur = rows[d.time].get("device")
        if not isinstance(cur, Finding) or DEVICE_RANK.get(d.detail, 0) > DEVICE_RANK.get(cur.detail, 0):
            rows[d.time]["device"] = d
    for key, series in (("flow", flow_rows), ("fio2", fio2_rows)):
        for m in series:
            cur = rows[m.time].get(key)
            if not isinstance(cur, Measurement) or m.value > cur.value:
                rows[m.time][key] = m
    times = sorted(rows)
    device: str | None = None
    flow: float | None = None
    fio2: float | None = None
    dev_text = ""
    dev_ind: frozenset[str] = frozenset()
    segments: list[Support] = []
    for i, t in enumerate(times):
        r = rows[t]
        refs: list[str] = []
        assumed = ""
        d = r.get("device")
        if isinstance(d, Finding):
            if d.detail != device:
                flow, fio2 = None, None
            device, dev_text, dev_ind = d.detail, d.text, d.indications
            refs.append(d.ref)
        f = r.get("flow")
        if isinstance(f, Measurement):
            flow = f.value
            refs.append(f.ref)
            if f.value <= 0:
                device = "room_air"
            elif device in (None, "room_air") and not isinstance(d, Finding):
                device, assumed = "nasal_cannula", "device_assumed_from_flow"
        x = r.get("fio2")
        if isinstance(x, Measurement):
            fio2 = x.value
            refs.append(x.ref)
            if device in (None, "room_air") and x.value > 22 and not isinstance(d, Finding):
                device, assumed = "unspecified_o2", "device_unknown"
        if device in (None, "room_air"):
            continue
        nxt = times[i + 1] if i + 1 < len(times) else None
        end = min(nxt, t + carry) if nxt is not None else min(t + carry, max(end_of_data, t + MIN))
        if nxt is not None and nxt - t > carry:
            tl.flags.add("observation_gap")
        segments.append(Support(device, t, end, refs, flow, fio2, "observation", dev_text, assumed=assumed, indications=dev_ind))
    # Procedures: explicit intervals; a point intubation opens invasive ventilation until
    # extubation, a non-invasive device row, or the end of a ventilation procedure.
    ends_invasive = [p.start for p in tl.procedures if p.kind == "extubation"] + [
        d.time for d in device_rows if d.detail != "invasive_ventilation"
    ]
    for p in tl.procedures:
        kind = p.kind
        if kind == "intubation":
            vent = next((q for q in tl.procedures if q.kind == "invasive_ventilation" and abs(q.start - p.start) <= 2 * H and q.end), None)
            if vent is not None and vent.end is not None:
                end = vent.end
            else:
                later = [t for t in ends_invasive if t > p.start]
                end = min(later) if later else max(end_of_data, p.start + MIN)
            segments.append(Support("invasive_ventilation", p.start, end, [p.ref, *p.reason_refs], source="procedure", reason=p.reason,
                                    indications=p.indications))
        elif kind in SUPPORT_PROCEDURES:
            if p.end is not None:
                end = p.end
            else:
                later = [d.time for d in device_rows if d.time > p.start and d.detail != kind]
                end = min(later) if later else min(p.start + carry, max(end_of_data, p.start + MIN))
            segments.append(Support(kind, p.start, end, [p.ref, *p.reason_refs], source="procedure", reason=p.reason,
                                    indications=p.indications))
    segments.sort(key=lambda g: g.start)
    # Procedure reasons (indication, home use) apply to overlapping observation rows of the same device.
    # O(S x P) for S segments and P procedure segments (procedures are few; rows are many).
    from_procedures = [q for q in segments if q.source == "procedure"]
    for g in segments:
        if g.source == "observation":
            for q in from_procedures:
                if q.device == g.device and q.start - H <= g.start < q.end + H and q.reason:
                    g.reason = (g.reason + "; " + q.reason).strip("; ")
                    g.indications = g.indications | q.indications
        g.home = "home_baseline" in g.indications
    tl.baseline_support = [g for g in segments if g.start < tl.infusion]
    post = [g for g in segments if g.end > tl.infusion]
    baseline_ppv = {g.device for g in tl.baseline_support if g.ppv}
    baseline_nc_flow = max((g.flow or 0 for g in tl.baseline_support if g.device == "nasal_cannula"), default=None)
    for g in post:
        if g.ppv and g.device in baseline_ppv:
            g.home = True
        if g.device == "nasal_cannula" and baseline_nc_flow is not None and (g.flow or 0) <= baseline_nc_flow:
            g.home = True
    _attribute_ppv(tl, post, s)
    tl.support = post


def _attribute_ppv(tl: CaseTimeline, segs: list[Support], s: GradingSettings) -> None:
    """Positive pressure counts for CRS only after hypoxia or for respiratory failure (§2.3)."""
    look = timedelta(hours=s.ppv_hypoxia_lookback_h)
    runs: list[list[Support]] = []
    run_end = None  # the furthest end in the current run (kept, not recomputed: O(n log n))
    for g in sorted((g for g in segs if g.ppv and not g.home), key=lambda g: g.start):
        if runs and run_end is not None and g.start <= run_end + MIN:
            runs[-1].append(g)
            run_end = max(run_end, g.end)
        else:
            runs.append([g])
            run_end = g.end
    for run in runs:
        start = run[0].start
        reason = "; ".join(g.reason for g in run if g.reason)
        classes = frozenset().union(*(g.indications for g in run))
        if "respiratory_failure" in classes:  # mappings/reasons.toml: coded first, negated text never counts
            ok, note = True, "indication: respiratory failure"
        else:
            hypoxic_spo2 = any(start - look <= m.time <= start and m.value < s.spo2_hypoxia for m in tl.spo2)
            o2_before = any(
                not g.ppv and not g.home and g.start < start and g.end >= start - look for g in segs
            )
            ok = hypoxic_spo2 or o2_before
            note = "preceded by hypoxia" if ok else "no hypoxia in the preceding window"
            if "not_hypoxic" in classes:
                # §2.3 [I]: hypoxia within the look-back OR a respiratory-failure indication counts;
                # a documented airway-protection indication vetoes only when no hypoxia preceded.
                # Both documented: counted (never under-called) and flagged for the reviewer.
                if ok:
                    note = f"preceded by hypoxia, although the documented indication is not hypoxic ({reason})"
                    tl.flags.add("ppv_indication_conflict")
                else:
                    note = f"indication not hypoxic ({reason}), no hypoxia in the preceding window"
        for g in run:
            g.attributed, g.attribution_note = ok, note


def plot_series(tl: CaseTimeline) -> dict[str, list[dict[str, object]]]:
    """Time series for charts (hours from day 0): vitals, O2 support, vasopressors, drugs,
    procedures and key labs."""
    def h(t: datetime) -> float:
        return round(tl.hours(t) or 0.0, 3)

    def points(series: list[Measurement]) -> list[dict[str, object]]:
        return [{"hour": h(m.time), "value": round(m.value, 2), "ref": m.ref} for m in series]

    return {
        "temperature": points(tl.temps),
        "sbp": points([m for m in tl.sbp if m.kind == "sbp"]),
        "spo2": points(tl.spo2),
        "o2_support": [
            {"start": h(g.start), "end": h(g.end), "device": g.device, "flow": g.flow, "fio2": g.fio2,
             "home": g.home, "attributed": g.attributed, "refs": g.refs[:2]}
            for g in tl.support
        ],
        "vasopressors": [
            {"start": h(c.start), "end": h(c.end), "drug": c.drug, "refs": c.refs[:3],
             "rates": [{"hour": h(d.start), "ug_min": d.rate_ug_min, "ug_kg_min": d.rate_ug_kg_min, "u_min": d.rate_u_min}
                       for d in c.segments]}
            for c in tl.pressors
        ],
        "drugs": [
            {"hour": h(d.start), "end": h(d.end) if d.end else None, "drug": d.drug, "class": d.drug_class, "ref": d.ref}
            for d in tl.drugs if d.drug_class not in ("vasopressor",)
        ],
        "procedures": [
            {"start": h(p.start), "end": h(p.end) if p.end else None, "kind": p.kind, "text": p.text, "ref": p.ref}
            for p in tl.procedures
        ],
        "labs": {k: points(v) for k, v in tl.labs.items() if k in ("il6", "ifn_gamma", "crp", "ferritin", "alt", "ast", "bilirubin", "creatinine", "anc", "fibrinogen")},
    }
