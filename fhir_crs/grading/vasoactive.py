"""Vasopressor arithmetic for the dose-based systems (grading-criteria §1.4): per-drug dose over
time, norepinephrine equivalents (VASST: NE + dopamine/2 + epinephrine + phenylephrine/10,
ug/min; dopamine in ug/kg/min), Lee 2014 high-dose intervals, and refractory hypotension.

Cost: dose states O(P log P + R) for P rate segments (one sweep); high-dose intervals O(states);
refractory times O((L + D) log L + pairs) by bisection of the time-ordered low-SBP runs. Each is
computed once per case (state.py)."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise

from ..settings import GradingSettings
from ..timeline import CaseTimeline
from .concurrency import concurrent_intervals

H = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class DoseState:
    start: datetime
    end: datetime
    doses: dict[str, float]  # drug -> ug/min (dopamine: ug/kg/min; vasopressin: U/min or 0 if unknown)
    refs: tuple[str, ...]


def _segment_dose(tl: CaseTimeline, drug: str, seg, s: GradingSettings) -> tuple[float | None, bool]:
    """(dose in the unit the high-dose table uses, converted via reference weight?)"""
    w = tl.weight_kg
    if drug == "vasopressin":
        return (seg.rate_u_min or 0.0), False
    if drug == "dopamine":
        if seg.rate_ug_kg_min is not None:
            return seg.rate_ug_kg_min, False
        if seg.rate_ug_min is not None and w:
            return seg.rate_ug_min / w, False
        return None, False
    per_kg = seg.rate_ug_kg_min
    if per_kg is None and seg.rate_ug_min is not None:
        if not tl.pediatric:
            return seg.rate_ug_min, False
        per_kg = seg.rate_ug_min / w if w else None
    if per_kg is None:
        return None, False
    if tl.pediatric:
        return per_kg * s.pediatric_reference_weight_kg, True  # adult-equivalent [I]
    if w:
        return per_kg * w, False
    return per_kg * s.pediatric_reference_weight_kg, True


def dose_states(tl: CaseTimeline, s: GradingSettings) -> tuple[list[DoseState], set[str]]:
    """Piecewise-constant doses of all counted vasopressor courses. Returns (states, flags).

    O(P log P + R) for P rate segments and R = the sum over states of the segments running in
    it (R <= P x drugs running at once). Computed once per case (grading/state.py)."""
    flags: set[str] = set()
    pieces: list[tuple[datetime, datetime, str, float | None, str]] = []
    for c in tl.pressors:
        segs = sorted(c.segments, key=lambda d: d.start)
        for i, seg in enumerate(segs):
            end = seg.end or (segs[i + 1].start if i + 1 < len(segs) else c.end)
            dose, via_ref = _segment_dose(tl, c.drug, seg, s)
            if via_ref:
                flags.add("pediatric_high_dose" if tl.pediatric else "dosing_weight_unknown")
            if dose is None:
                flags.add("vasopressor_dose_unknown")
            pieces.append((seg.start, end, c.drug, dose, seg.ref))
    cuts = sorted({p[0] for p in pieces} | {p[1] for p in pieces})
    # Sweep the cut points once, keeping the set of pieces running: O(P log P + sum of pieces
    # running per state), instead of rescanning every piece at every cut.
    opening: dict[datetime, list[int]] = defaultdict(list)
    closing: dict[datetime, list[int]] = defaultdict(list)
    for i, (start, end, _drug, _dose, _ref) in enumerate(pieces):
        if start < end:
            opening[start].append(i)
            closing[end].append(i)
    running: set[int] = set()
    states = []
    for a, b in pairwise(cuts):
        running.difference_update(closing.get(a, ()))
        running.update(opening.get(a, ()))
        doses: dict[str, float] = {}
        refs = []
        unknown = False
        for i in sorted(running):
            _start, _end, drug, dose, ref = pieces[i]
            if dose is None:
                unknown = True
                continue
            if drug in doses:
                # two records of one drug running at once are added (two lines, or the same
                # infusion charted twice): the higher reading, flagged for review
                flags.add("same_drug_overlap")
            doses[drug] = doses.get(drug, 0.0) + dose
            refs.append(ref)
        if doses or unknown:
            states.append(DoseState(a, b, doses, tuple(refs)))
    return states, flags


def neeq(d: dict[str, float]) -> float:
    return (d.get("norepinephrine", 0.0) + d.get("dopamine", 0.0) / 2 + d.get("epinephrine", 0.0)
            + d.get("phenylephrine", 0.0) / 10)


def is_high_dose(d: dict[str, float], s: GradingSettings) -> tuple[bool, str]:
    agents = [k for k in d if k != "vasopressin"]
    ne_eq = neeq(d)
    if "vasopressin" in d:
        return ne_eq >= s.high_dose_with_vasopressin_neeq, f"vasopressin + NE-equivalent {ne_eq:.1f} ug/min"
    if len(agents) >= 2:
        return ne_eq >= s.high_dose_combination_neeq, f"combination NE-equivalent {ne_eq:.1f} ug/min"
    if not agents:
        return False, ""
    a = agents[0]
    v = d[a]
    limit = {"norepinephrine": s.high_dose_ne_ug_min, "dopamine": s.high_dose_dopamine_ug_kg_min,
             "phenylephrine": s.high_dose_phenylephrine_ug_min, "epinephrine": s.high_dose_epinephrine_ug_min}.get(a)
    if limit is None:
        return False, ""
    unit = "ug/kg/min" if a == "dopamine" else "ug/min"
    return v >= limit, f"{a} {v:.1f} {unit}"


PAUSE_BRIDGED = "pause bridged"  # in a high-dose interval's text: a pause did not restart its clock


def high_dose_intervals(states: list[DoseState], s: GradingSettings) -> list[tuple[datetime, datetime, str, list[str]]]:
    """Maximal intervals during which the Lee 2014 high-dose condition holds. A pause with no
    vasopressor running at all, shorter than `vasopressor_course_gap_min` (the gap across which
    the timeline joins the records of one infusion: a bag or line change), does not restart the
    3 h clock (§1.4 "all doses required for >= 3 h" says nothing of short pauses; restarting it
    would lower the grade without a word); the interval's text says so. A lower dose in between
    (a dip) does end the interval."""
    gap = timedelta(minutes=s.vasopressor_course_gap_min)
    out: list[tuple[datetime, datetime, str, list[str]]] = []
    prev_high = False  # was the state before this one high-dose? (a dip in between ends the run)
    for st in states:
        ok, text = is_high_dose(st.doses, s)
        if not ok:
            prev_high = False
            continue
        if out and prev_high and st.start - out[-1][1] < gap:
            a, b, t0, refs = out[-1]
            if st.start > b and PAUSE_BRIDGED not in t0:
                t0 += f"; {PAUSE_BRIDGED}: {(st.start - b).total_seconds() / 60:.0f} min < {s.vasopressor_course_gap_min:g} min"
            out[-1] = (a, st.end, t0, refs + [r for r in st.refs if r not in refs])
        else:
            out.append((st.start, st.end, text, list(st.refs)))
        prev_high = True
    return out


def sustained_high_dose(states: list[DoseState], s: GradingSettings) -> list[tuple[datetime, str, list[str]]]:
    """Times at which high-dose has been held for `high_dose_min_hours` (t_max for Lee/Penn/CARTOX)."""
    need = timedelta(hours=s.high_dose_min_hours)
    return [(a + need, text, refs) for a, b, text, refs in high_dose_intervals(states, s) if b - a >= need]


def low_sbp_intervals(tl: CaseTimeline, s: GradingSettings) -> list[tuple[datetime, datetime, list[str]]]:
    """[first, last] of each run of consecutive low SBP readings (outside procedure windows).

    The run ends at its last LOW reading, not at the next normal one: persistence must be
    documented, not inferred across a charting gap."""
    thr = tl.sbp_threshold(s)
    readings = [m for m in tl.sbp if not tl.in_window(m.time)]
    out = []
    i = 0
    while i < len(readings):
        if readings[i].value >= thr:
            i += 1
            continue
        j = i
        while j + 1 < len(readings) and readings[j + 1].value < thr:
            j += 1
        out.append((readings[i].time, readings[j].time, [r.ref for r in readings[i:j + 1]]))
        i = j + 1
    return out


def overlap_pairs(runs: list[tuple[datetime, datetime]], others: list[tuple[datetime, datetime]],
                  need: timedelta) -> list[tuple[int, int, datetime, datetime]]:
    """(run index, other index, start, end) of every pair overlapping for >= `need`, ordered by
    run then other. `runs` are time-ordered and disjoint (their ends never decrease), so the runs
    an interval meets are one contiguous slice found by bisection: O((R + M) log R + pairs)."""
    ends = [b for _, b in runs]
    if need < timedelta(0) or any(x > y for x, y in pairwise(ends)) or any(x[0] > y[0] for x, y in pairwise(runs)):
        found = [(i, j, max(la, ma), min(lb, mb)) for i, (la, lb) in enumerate(runs) for j, (ma, mb) in enumerate(others)]
        return [f for f in found if f[3] - f[2] >= need]
    out = []
    for j, (ma, mb) in enumerate(others):
        i = bisect_left(ends, ma)
        while i < len(runs) and runs[i][0] <= mb:
            la, lb = runs[i]
            a, b = max(la, ma), min(lb, mb)
            if b - a >= need:
                out.append((i, j, a, b))
            i += 1
    out.sort(key=lambda f: (f[0], f[1]))
    return out


def refractory_times(tl: CaseTimeline, states: list[DoseState], s: GradingSettings,
                     high: list[tuple[datetime, datetime, str, list[str]]] | None = None) -> list[tuple[datetime, list[str]]]:
    """Times at which SBP has stayed below threshold for `refractory_hypotension_min` on high dose.
    O((L + D) log L + pairs) for L low-SBP runs and D high-dose intervals."""
    need = timedelta(minutes=s.refractory_hypotension_min)
    low = low_sbp_intervals(tl, s)
    high = high_dose_intervals(states, s) if high is None else high
    pairs = overlap_pairs([(la, lb) for la, lb, _ in low], [(ha, hb) for ha, hb, _, _ in high], need)
    return sorted((a + need, low[i][2] + high[j][3]) for i, j, a, _ in pairs)


def multi_pressor_intervals(tl: CaseTimeline, s: GradingSettings, include_vasopressin: bool):
    courses = [c for c in tl.pressors if include_vasopressin or c.drug != "vasopressin"]
    return concurrent_intervals(courses, timedelta(minutes=s.vasopressor_overlap_min))


def cumulative_pressor_time(tl: CaseTimeline, since: datetime, until: datetime) -> list[tuple[datetime, datetime, list[str]]]:
    """Union of the time vasopressors actually ran within [since, until], with the records behind
    each stretch: each administration record's own interval, so a pause between the records of
    one joined infusion is not vasopressor time (MSKCC §6 counts vasopressor hours). O(P log P)."""
    ivs: list[tuple[datetime, datetime, str]] = []
    for c in tl.pressors:
        if c.end <= since or c.start >= until:
            continue
        segs = sorted(c.segments, key=lambda d: d.start)
        for i, seg in enumerate(segs):
            end = seg.end or (segs[i + 1].start if i + 1 < len(segs) else c.end)
            a, b = max(seg.start, since), min(end, until)
            if b > a:
                ivs.append((a, b, seg.ref))
    ivs.sort(key=lambda x: x[:2])
    merged: list[tuple[datetime, datetime, list[str]]] = []
    for a, b, ref in ivs:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b), merged[-1][2] + [ref])
        else:
            merged.append((a, b, [ref]))
    return merged
