"""Stage 4 (adjacent syndromes, reported beside CRS/ICANS, grading-criteria §11):

* carHLH (CARTOX, §7.3): peak ferritin > 10,000 ng/mL within the CRS phase (the first
  `carhlh_window_days`, extended to the end of a CRS episode still open then) and subsequently
  any two of: grade >= 3 bilirubin/AST/ALT, grade >= 3 creatinine, grade >= 3 pulmonary oedema,
  haemophagocytosis; a ferritin > 10,000 in a later CRS episode is flagged, not counted.
* IEC-HS screen (Hines 2023, [P]): hyperferritinaemia (> 2x day-0 baseline or > 2x ULN, either)
  together with hypofibrinogenaemia, transaminases > 5x ULN, an ANC re-fall after recovery from
  neutropenia, hypertriglyceridaemia, LDH > ULN or haemophagocytosis; a provisional grade from
  the treatment and support it needed (§11.1 table). A screen, flagged for review, not a diagnosis.
* ICAHT (Rejeski 2023, the published R implementation's approach, §11.3): early grade from the
  longest run of ANC <= 500 and <= 100 /uL in days 0-30 (lowest value per day, gaps up to 7 days
  interpolated and flagged, longer gaps between neutropenic values flagged `anc_gap_not_bridged`
  with the durations said to be a lower bound, runs separated by < 3 days above 500 joined); late grade from the
  second-lowest ANC after day +30 (>= 2 values, non-transient).

Cost: O(n log n) for n lab values and drugs (the IEC-HS window partner by bisection; ICAHT works
on at most one value per day of days 0-30).
"""

from __future__ import annotations

from bisect import bisect_left
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from ..events import DrugGiven
from ..settings import GradingSettings
from ..timeline import CaseTimeline
from .episodes import Episode
from .organ import baseline, grade_lab
from .result import iso
from .state import case_state

H = timedelta(hours=1)
DAY = timedelta(days=1)


def _day(tl: CaseTimeline, t: datetime) -> int:
    return int((t - tl.infusion) // DAY)


def crs_phase_end(tl: CaseTimeline, s: GradingSettings) -> tuple[datetime, Episode | None]:
    """End of the CRS phase of §7.3 ("typically the first 5 days"): `carhlh_window_days` after
    infusion, extended to the end of a CRS episode (ASTCT fever-anchored episodes, §1.1) that is
    still open then (an unresolved episode: to the last record). The CRS phase is read as the CRS
    itself, the day count as its usual length, so a ferritin > 10,000 later in an open episode is
    counted (and flagged `carhlh_crs_phase_extended`), never left out."""
    window_end = tl.infusion + timedelta(days=s.carhlh_window_days)
    open_eps = [ep for ep in case_state(tl, s).episodes([]) if ep.onset <= window_end <= ep.end_bound(tl)]
    if not open_eps:
        return window_end, None
    ep = max(open_eps, key=lambda e: e.end_bound(tl))
    return max(window_end, ep.end_bound(tl)), ep


def carhlh(tl: CaseTimeline, s: GradingSettings) -> dict[str, Any]:
    flags: list[str] = []
    evidence: list[str] = []
    criteria: list[str] = []
    window_end = tl.infusion + timedelta(days=s.carhlh_window_days)
    phase_end, open_ep = crs_phase_end(tl, s)
    ferritin = [m for m in tl.labs.get("ferritin", []) if tl.infusion <= m.time <= phase_end]
    peak = max(ferritin, key=lambda m: m.value, default=None)
    out: dict[str, Any] = {"met": False, "onset": None, "criteria": criteria, "flags": flags, "evidence": evidence}
    if not tl.labs.get("ferritin"):
        flags.append("no_ferritin")
        return out
    # the convention that bounded the phase, said in the criterion (carhlh_window_days)
    phase = f"days 0-{s.carhlh_window_days:g}"
    if open_ep is not None and phase_end > window_end:
        phase = (f"the CRS phase: days 0-{s.carhlh_window_days:g}, extended to day {_day(tl, phase_end)} "
                 f"by the CRS episode open on day {s.carhlh_window_days:g}")
    if peak is None or peak.value <= s.carhlh_ferritin:
        if peak is not None:
            criteria.append(f"peak ferritin {peak.value:,.0f} ng/mL in {phase} (not > {s.carhlh_ferritin:,.0f})")
        _later_episode_ferritin(tl, s, phase_end, out)
        return out
    evidence.append(peak.ref)
    if open_ep is not None and not any(m.value > s.carhlh_ferritin for m in ferritin if m.time <= window_end):
        # met only through the extension: say so, and cite the episode's onset
        flags.append("carhlh_crs_phase_extended")
        criteria.append(f"ferritin {peak.value:,.0f} ng/mL > {s.carhlh_ferritin:,.0f} on day {_day(tl, peak.time)} (in {phase})")
        evidence.extend(r for r in open_ep.onset_refs if r not in evidence)
    else:
        criteria.append(f"ferritin {peak.value:,.0f} ng/mL > {s.carhlh_ferritin:,.0f} on day {_day(tl, peak.time)}")
    first_high = min((m for m in ferritin if m.value > s.carhlh_ferritin), key=lambda m: m.time)
    ordered = _carhlh_partners(tl, s, first_high.time)
    for t, text in ordered:
        criteria.append(f"{text} on day {_day(tl, t)}")
    refs = {t: r for t, r in ((m.time, m.ref) for lab in ("bilirubin", "ast", "alt", "creatinine") for m in tl.labs.get(lab, []))}
    refs.update({f.time: f.ref for f in tl.findings_of("hemophagocytosis")})
    evidence.extend(refs[t] for t, _ in ordered if t in refs)
    flags.append("pulmonary_edema_and_oliguria_not_evaluated")
    if len(ordered) >= 2:
        out["met"] = True
        out["onset"] = iso(ordered[1][0])
    return out


def _carhlh_partners(tl: CaseTimeline, s: GradingSettings, since: datetime) -> list[tuple[datetime, str]]:
    """The §7.3 criteria met at or after `since` (the first ferritin > 10,000), the first of each
    kind, by time: grade >= 3 bilirubin/AST/ALT, grade >= 3 creatinine, haemophagocytosis."""
    hits: list[tuple[datetime, str, str]] = []
    for lab in ("bilirubin", "ast", "alt", "creatinine"):
        base = baseline(tl, lab)
        for m in tl.labs.get(lab, []):
            if m.time >= since:
                g = grade_lab(tl, lab, m, s, base, base_known=True)
                if g.grade >= 3:
                    name = "creatinine" if lab == "creatinine" else "liver"
                    hits.append((m.time, name, g.text))
                    break
    for f in tl.findings_of("hemophagocytosis"):
        if f.detail == "present" and f.time >= tl.infusion:
            hits.append((f.time, "hemophagocytosis", f"hemophagocytosis ({f.text or 'present'})"))
            break
    hits.sort()
    seen: dict[str, tuple[datetime, str]] = {}
    for t, name, text in hits:
        seen.setdefault(name, (t, text))
    return sorted(seen.values())


def _later_episode_ferritin(tl: CaseTimeline, s: GradingSettings, phase_end: datetime, out: dict[str, Any]) -> None:
    """§7.3 "during the CRS phase (typically the first 5 days)": a ferritin > `carhlh_ferritin`
    after the phase but inside a later CRS episode (ASTCT fever-anchored, §1.1) is not counted
    (the phase is the window plus the episode open at its end), but it is never silent: flagged
    `carhlh_ferritin_later_crs_episode`, with a criterion naming the episode and which of the other
    criteria followed it (whether carHLH would be met if that episode were counted)."""
    eps = [ep for ep in case_state(tl, s).episodes([]) if ep.end_bound(tl) > phase_end]
    for m in tl.labs.get("ferritin", []):
        if m.time <= phase_end or m.value <= s.carhlh_ferritin:
            continue
        ep = next((e for e in eps if e.contains(m.time, tl)), None)
        if ep is None:
            continue
        partners = _carhlh_partners(tl, s, m.time)
        also = "; ".join(f"{text} on day {_day(tl, t)}" for t, text in partners) or "none of the other criteria"
        verdict = "would be met" if len(partners) >= 2 else "would not be met"
        out["criteria"].append(
            f"ferritin {m.value:,.0f} ng/mL > {s.carhlh_ferritin:,.0f} on day {_day(tl, m.time)} in a later CRS episode "
            f"(onset day {_day(tl, ep.onset)}, after the CRS phase, carhlh_window_days {s.carhlh_window_days:g}): not counted, "
            f"review; after it: {also} (carHLH {verdict} if this episode were counted)")
        out["flags"].append("carhlh_ferritin_later_crs_episode")
        out["evidence"].extend(r for r in (m.ref, *ep.onset_refs) if r not in out["evidence"])
        return


def iec_hs(tl: CaseTimeline, s: GradingSettings, crs_resolved: datetime | None) -> dict[str, Any]:
    flags: list[str] = []
    evidence: list[str] = []
    out: dict[str, Any] = {"suspected": False, "onset": None, "criteria": [], "flags": flags, "evidence": evidence, "grade": None}
    labs = tl.labs
    ferr_all = labs.get("ferritin", [])
    base = [m for m in ferr_all if m.time <= tl.infusion + 12 * H]
    base_v = base[-1].value if base else None
    manifest: list[tuple[datetime, str, str, str]] = []  # time, kind, text, ref
    k = s.iec_hs_ferritin_factor
    for m in ferr_all:
        # §11.1 "> 2 x ULN or > 2 x baseline at infusion": either one (the more sensitive reading)
        if m.time <= tl.infusion + 12 * H:
            continue
        uln = m.uln or s.uln_ferritin
        if base_v and m.value > k * base_v:
            text = f"ferritin {m.value:,.0f} ng/mL > {k:g}x baseline ({base_v:,.0f})"
        elif m.value > k * uln:
            text = f"ferritin {m.value:,.0f} ng/mL > {k:g}x ULN ({uln:,.0f})"
            if base_v:
                text += f", {m.value / base_v:.2g}x baseline ({base_v:,.0f})"
        else:
            continue
        manifest.append((m.time, "ferritin", text, m.ref))
    for m in labs.get("fibrinogen", []):
        if m.time > tl.infusion and m.value < (m.lln or s.fibrinogen_low):
            manifest.append((m.time, "fibrinogen", f"fibrinogen {m.value:g} mg/dL < {m.lln or s.fibrinogen_low:g}", m.ref))
    for lab in ("alt", "ast"):
        for m in labs.get(lab, []):
            uln = m.uln or (s.uln_alt if lab == "alt" else s.uln_ast)
            if m.time > tl.infusion and m.value > s.iec_hs_transaminase_factor * uln:
                manifest.append((m.time, "transaminases", f"{lab.upper()} {m.value:g} U/L > {s.iec_hs_transaminase_factor:g}x ULN", m.ref))
    for m in labs.get("triglycerides", []):
        if m.time > tl.infusion and m.value > s.iec_hs_tg_mg_dl:
            manifest.append((m.time, "triglycerides", f"triglycerides {m.value:g} mg/dL > {s.iec_hs_tg_mg_dl:g}", m.ref))
    for m in labs.get("ldh", []):
        if m.time > tl.infusion and m.uln and m.value > m.uln:
            manifest.append((m.time, "ldh", f"LDH {m.value:g} U/L > ULN {m.uln:g}", m.ref))
    manifest += _anc_refalls(tl)
    for f in tl.findings_of("hemophagocytosis"):
        if f.detail == "present" and f.time >= tl.infusion:
            manifest.append((f.time, "hemophagocytosis", "hemophagocytosis", f.ref))
    manifest.sort()
    window = timedelta(hours=s.iec_hs_window_h)
    onset = start = None
    # the earliest partner within the window, by bisection into the time-ordered manifest:
    # O(M log M) rather than a scan of the whole manifest per manifestation
    ferritin_times = [x[0] for x in manifest if x[1] == "ferritin"]
    other_times = [x[0] for x in manifest if x[1] != "ferritin"]
    for t, kind, _, _ in manifest:
        partners = other_times if kind == "ferritin" else ferritin_times
        i = bisect_left(partners, t - window)
        if i < len(partners) and partners[i] <= t + window:
            onset, start = max(t, partners[i]), min(t, partners[i])
            break
    if manifest and onset is None:
        flags.append("iec_hs_screen")  # isolated manifestation: review
    if onset is not None and start is not None:
        picture = [x for x in manifest if abs(x[0] - onset) <= window or x[0] >= onset]
        out["suspected"] = True
        out["onset"] = iso(onset)
        flags.extend(["iec_hs_screen", "adjudicate"])
        if crs_resolved is not None and onset > crs_resolved:
            flags.append("after_crs_resolution")
        kinds = []
        cited: set[str] = set()
        for t, kind, text, ref in picture:
            if kind not in kinds:
                kinds.append(kind)
                out["criteria"].append(f"{text} (day {_day(tl, t)})")
            if ref not in cited:
                cited.add(ref)
                evidence.append(ref)
        lo = onset - window
        directed, crs_steroids = _iec_hs_directed(tl, s, lo)
        grade, basis = _iec_hs_grade(tl, lo, start, onset, directed)
        out["grade"] = grade
        flags.append("iec_hs_grade_provisional")
        if crs_steroids:
            names = ", ".join(dict.fromkeys(d.drug for d in crs_steroids))
            out["criteria"].append(f"not counted as IEC-HS-directed: {names} (from day {_day(tl, crs_steroids[0].start)}) "
                                   "given during an open CRS episode (CRS therapy)")
        if tl.died and tl.deceased is None:
            flags.append("death_time_unknown")  # died at an unknown time: grade 5 cannot be placed
        for text, refs in basis:
            out["criteria"].append(text)
            for ref in refs:
                if ref not in cited:
                    cited.add(ref)
                    evidence.append(ref)
    elif manifest:
        for t, _kind, text, ref in manifest[:5]:
            out["criteria"].append(f"{text} (day {_day(tl, t)})")
            evidence.append(ref)
    return out


def _anc_refalls(tl: CaseTimeline) -> list[tuple[datetime, str, str, str]]:
    """IEC-HS "ANC re-fall after recovery" (§11.1 software role): an ANC <= 500/uL after a value
    > 500 that itself followed a neutropenic value (<= 500) after infusion. The first fall from a
    normal count is the expected post-lymphodepletion nadir (ICAHT), not a re-fall; any value
    > 500 counts as recovery (the sensitive reading; the criterion says from which day)."""
    out: list[tuple[datetime, str, str, str]] = []
    neutropenic = False
    recovery: list[datetime] = []  # times of the values > 500 since the last neutropenic one
    for m in sorted(tl.labs.get("anc", []), key=lambda m: m.time):
        if m.time <= tl.infusion:
            continue
        if m.value > 500:
            if neutropenic:
                recovery.append(m.time)
            continue
        if recovery:
            a, b = _day(tl, recovery[0]), _day(tl, recovery[-1])
            days = f"day {a}" if a == b else f"days {a}-{b}"
            out.append((m.time, "cytopenia", f"ANC re-fall to {m.value:g}/uL after recovery > 500/uL on {days}", m.ref))
        neutropenic, recovery = True, []
    return out


def _iec_hs_directed(tl: CaseTimeline, s: GradingSettings, lo: datetime) -> tuple[list[DrugGiven], list[DrugGiven]]:
    """(IEC-HS-directed therapy, steroids set aside) from `lo` on (§11.1 grade 2): anti-cytokine
    agents, and corticosteroids given outside every CRS episode (ASTCT fever-anchored, §1.1; an
    unresolved episode runs to the last record). A steroid during an open CRS episode, resolved
    later or never, is CRS therapy and is not counted (returned second, named in the criteria)."""
    eps = case_state(tl, s).episodes([])
    directed: list[DrugGiven] = []
    crs: list[DrugGiven] = []
    for d in tl.drugs:
        if d.start < lo:
            continue
        if d.drug_class == "anti_cytokine":
            directed.append(d)
        elif d.drug_class == "corticosteroid":
            (crs if any(ep.contains(d.start, tl) for ep in eps) else directed).append(d)
    return directed, crs


def _iec_hs_grade(tl: CaseTimeline, lo: datetime, start: datetime, onset: datetime,
                  directed: list[DrugGiven]) -> tuple[int, list[tuple[str, list[str]]]]:
    """Provisional IEC-HS grade by the §11.1 table from what the picture needed from `lo` on, with
    the basis of each step (text, refs): 2 = IEC-HS-directed immunosuppression or transfusion
    (blood products given as MedicationAdministration, or Procedures of kind transfusion_cryo);
    3 = both; 4 = life-threatening: vasopressor-dependent hypotension (a vasopressor course
    running at or after `start`, the first manifestation of the pair that set the onset: a
    course that ended before the picture began, e.g. for the CRS, is not IEC-HS hypotension;
    short/peri-procedural infusions were set aside by the timeline), intubation / invasive
    ventilation, ECMO, blood purification (dialysis); 5 = death after onset."""
    transfused: list[tuple[str, int, str]] = [
        (d.drug, _day(tl, d.start), d.ref) for d in tl.drugs if d.start >= lo and d.drug_class == "blood_product"]
    transfused += [(p.text or "transfusion", _day(tl, p.start), p.ref) for p in tl.procedures
                   if p.start >= lo and p.kind == "transfusion_cryo"]
    pressors = [c for c in tl.pressors if c.end >= start]
    severe = [p for p in tl.procedures if p.start >= lo and p.kind in ("intubation", "invasive_ventilation", "ecmo", "blood_purification")]
    basis: list[tuple[str, list[str]]] = []
    if directed:
        names = ", ".join(dict.fromkeys(d.drug for d in directed))
        basis.append((f"IEC-HS-directed therapy: {names} (from day {_day(tl, directed[0].start)})", [d.ref for d in directed]))
    if transfused:
        names = ", ".join(dict.fromkeys(name for name, _, _ in transfused))
        basis.append((f"transfusion: {names} (from day {min(d for _, d, _ in transfused)})", [r for _, _, r in transfused]))
    grade = 1
    if directed or transfused:
        grade = 2
    if directed and transfused:
        grade = 3
    if pressors:
        first = min(pressors, key=lambda c: c.start)
        low = [h for h in tl.hypotension if first.start - 6 * H <= h.time <= first.end][:1]
        names = ", ".join(dict.fromkeys(c.drug for c in pressors))
        basis.append((f"life-threatening hypotension: vasopressor-dependent ({names}, from day {_day(tl, first.start)})",
                      [r for c in pressors for r in c.refs] + [r for h in low for r in h.refs]))
        grade = 4
    if severe:
        names = ", ".join(dict.fromkeys(p.kind.replace("_", " ") for p in severe))
        basis.append((f"life-threatening: {names} (from day {_day(tl, severe[0].start)})", [p.ref for p in severe]))
        grade = 4
    if tl.deceased is not None and tl.deceased >= onset:
        basis.append((f"death (day {_day(tl, tl.deceased)})", [tl.deceased_ref] if tl.deceased_ref else []))
        grade = 5
    return grade, basis


def _daily_anc(tl: CaseTimeline, last_day: int) -> dict[int, tuple[float, str]]:
    days: dict[int, tuple[float, str]] = {}
    for m in tl.labs.get("anc", []):
        d = _day(tl, m.time)
        if 0 <= d <= last_day and (d not in days or m.value < days[d][0]):
            days[d] = (m.value, m.ref)
    return days


def _icaht_runs_text(r500: list[tuple[int, int]], r100: list[tuple[int, int]]) -> list[str]:
    """The longest early runs of ANC <= 500 and <= 100 /uL that decided the grade (§11.3)."""
    out = []
    for limit, runs in ((500, r500), (100, r100)):
        if runs:
            a, b = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
            out.append(f"ANC <= {limit}/uL for {b - a + 1} days (days {a}-{b})")
    return out


def _icaht_gap_text(unbridged: list[tuple[int, int]], s: GradingSettings) -> str:
    """§11.3 interpolates missing daily ANC across gaps up to `icaht_interpolate_max_days`; a
    longer gap between two neutropenic values is not bridged, so the neutropenia may have run
    through it: the durations (and the grade) are a lower bound (flag `anc_gap_not_bridged`)."""
    gaps = ", ".join(f"days {a + 1}-{b - 1}" for a, b in unbridged)
    return (f"no ANC on {gaps} between neutropenic values (> icaht_interpolate_max_days "
            f"{s.icaht_interpolate_max_days} days, not bridged): the neutropenia durations are a lower bound")


def icaht(tl: CaseTimeline, s: GradingSettings) -> dict[str, Any]:
    flags: list[str] = []
    evidence: list[str] = []
    out: dict[str, Any] = {"early_grade": None, "late_grade": None, "neutropenia_days": None, "flags": flags, "evidence": evidence}
    daily = _daily_anc(tl, 30)
    if not daily:
        flags.append("no_anc_days_0_30")
    else:
        series: dict[int, float] = {d: v for d, (v, _) in daily.items()}
        known = sorted(series)
        interpolated = set()
        unbridged: list[tuple[int, int]] = []  # (a, b): > icaht_interpolate_max_days missing between neutropenic days
        for a, b in pairwise(known):
            gap = b - a - 1
            if 0 < gap <= s.icaht_interpolate_max_days:
                for k in range(1, gap + 1):
                    series[a + k] = series[a] + (series[b] - series[a]) * k / (b - a)
                    interpolated.add(a + k)
            elif gap > s.icaht_interpolate_max_days and series[a] <= 500 and series[b] <= 500:
                unbridged.append((a, b))
        days = sorted(series)
        last = days[-1]

        def runs(limit: float) -> list[tuple[int, int]]:
            """Neutropenic runs (inclusive days), joining gaps shorter than stable recovery."""
            raw: list[list[int]] = []
            for d in days:
                if series[d] <= limit:
                    if raw and d == raw[-1][1] + 1:
                        raw[-1][1] = d
                    else:
                        raw.append([d, d])
            joined: list[list[int]] = []
            for r in raw:
                if joined and r[0] - joined[-1][1] - 1 < s.icaht_recovery_days:
                    joined[-1][1] = r[1]
                else:
                    joined.append(r)
            return [(a, b) for a, b in joined]

        r500, r100 = runs(500), runs(100)
        longest500 = max((b - a + 1 for a, b in r500), default=0)
        longest100 = max((b - a + 1 for a, b in r100), default=0)
        out["neutropenia_days"] = longest500
        g = 0
        if longest500:
            g = 1 if longest500 < 7 else 2 if longest500 < 14 else 3
        if longest100 >= 7:
            g = max(g, 3)
        if longest100 >= 14:
            g = 4
        never_recovered = any(a <= 3 and b == last for a, b in r500)
        if never_recovered and (last >= 30 or (tl.deceased is not None and _day(tl, tl.deceased) <= last + 1)):
            g = 4
            flags.append("never_recovered")
        elif never_recovered and last < 30:
            flags.append("follow_up_ends_neutropenic")
        out["early_grade"] = g
        if interpolated and any(a <= d <= b for d in interpolated for a, b in r500):
            flags.append("anc_interpolated")
        if unbridged:  # `criteria` only then: the runs measured, and why they are a lower bound
            out["criteria"] = [*_icaht_runs_text(r500, r100), _icaht_gap_text(unbridged, s)]
            flags.append("anc_gap_not_bridged")
        nadir = min(daily.items(), key=lambda kv: kv[1][0])
        evidence.append(nadir[1][1])
        for a, b in r500[:3]:
            for d in (a, b):
                if d in daily and daily[d][1] not in evidence:
                    evidence.append(daily[d][1])
    late = sorted((m for m in tl.labs.get("anc", []) if 30 < _day(tl, m.time) <= s.icaht_late_end_day), key=lambda m: m.value)
    if late:
        if len(late) < 2:
            out["late_grade"] = 0
            flags.append("late_single_value")
        else:
            v = late[1].value  # >= 2 values at or below the threshold (non-transient)
            out["late_grade"] = 4 if v <= 100 else 3 if v <= 500 else 2 if v <= 1000 else 1 if v <= 1500 else 0
            if out["late_grade"]:
                evidence.extend(m.ref for m in late[:2] if m.ref not in evidence)
    return out


def adjacent(tl: CaseTimeline, s: GradingSettings, crs_resolved: datetime | None) -> dict[str, Any]:
    return {"carhlh": carhlh(tl, s), "iec_hs": iec_hs(tl, s, crs_resolved), "icaht": icaht(tl, s)}

