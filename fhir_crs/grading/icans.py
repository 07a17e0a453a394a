"""Stage 4 (neurotoxicity): ASTCT 2019 ICANS (grading-criteria §3).

ICE for age >= 12 (CAPD if only CAPD was charted), CAPD below 12 (relative to the child's
pre-infusion baseline); depressed level of consciousness (unless sedated), seizures, motor
weakness, raised ICP / cerebral oedema (intracranial haemorrhage excluded). A seizure is grade 4
when longer than `seizure_status_min`, worded as status, or repeated without return to baseline
in between (`repetitive_seizures`). The instant grade is the most severe domain at an assessment
time; episodes run from the first abnormal assessment to the first normal one that stays normal
for 24 h. Death during an active episode is a grade 5 candidate unless another cause is
documented (§1.8, as CRS).

Cost: O(A log A) for A neuro rows (sedation by bisection; the 24 h clear check reads each
stretch once), plus O(A0 x L) for the A0 ICE-0 rows that look for an unarousable
level-of-consciousness row among the L charted ones, plus the rows between consecutive seizures
(found by bisection).
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise

from ..events import Finding, Measurement
from ..mappers.condition import UNCONFIRMED
from ..mappers.observation import hedged
from ..mappers.reasons import affirmed
from ..settings import GradingSettings
from ..timeline import CaseTimeline
from .episodes import death_alternative_cause
from .result import Criterion, EpisodeResult, SystemResult, iso
from .state import Cover

H = timedelta(hours=1)
_LOC_GRADE = {"alert": 0, "spontaneous": 1, "voice": 2, "tactile": 3, "unarousable": 4}
_ICANS_DEATH = re.compile(r"ICANS|neurotox|cerebral o?edema|herniation|encephalopathy|status epilepticus", re.IGNORECASE)
_OTHER_DEATH = re.compile(r"\bCRS\b|cytokine release|cytokine storm|IEC-HS|\bHLH\b", re.IGNORECASE)  # not ICANS, not in episodes._ALT_CAUSE


@dataclass(slots=True)
class Assessment:
    """Domain grades found at one time."""

    time: datetime
    criteria: list[Criterion] = field(default_factory=list)
    normal_primary: bool = False  # ICE 10 / CAPD at baseline charted here

    @property
    def grade(self) -> int:
        return max((c.grade for c in self.criteria), default=0)


# RASS levels (Sessler 2002) read as the ASTCT level-of-consciousness row they describe (§3.2):
# -1 drowsy, sustained awakening to voice and -2 brief awakening to voice = "awakens to voice" (2);
# -3 movement or eye opening to voice (no eye contact) = still roused by voice (2); -4 no response
# to voice, movement or eye opening to physical stimulation = "only to tactile stimulus" (3);
# -5 no response to voice or physical stimulation = unarousable (4). 0 and above: not depressed.
_RASS = {-1: (2, "drowsy, awakens to voice"), -2: (2, "light sedation, briefly awakens to voice"),
         -3: (2, "moderate sedation, movement or eye opening to voice"),
         -4: (3, "deep sedation, responds only to physical stimulation"), -5: (4, "unarousable")}


def rass_level(v: float) -> tuple[int, str]:
    """(ICANS consciousness grade, what the RASS level means) of a RASS value (a value between
    two levels takes the deeper one)."""
    if v > -1:
        return 0, "not depressed"
    return _RASS[max(-5, math.floor(v))]


def rass_grade(v: float) -> int:
    """The ICANS level-of-consciousness grade a RASS value describes (`rass_level`)."""
    return rass_level(v)[0]


GCS_COMA = 8  # GCS <= 8: coma (ASTCT ICANS grade 4 depressed level of consciousness, §3.2)


def finding_flags(e: Finding) -> tuple[str, ...]:
    """Review flags of a graded finding: `finding_uncertain` when its text only hedges it
    ("possible seizure"), `condition_unconfirmed` for a provisional / differential Condition
    (used, never hidden: clinical safety rule)."""
    out = []
    if e.text.startswith(UNCONFIRMED):
        out.append("condition_unconfirmed")
    if hedged(e.kind, e.text):
        out.append("finding_uncertain")
    return tuple(out)


def seizure_minutes(e: Finding) -> float | None:
    """A seizure's charted duration (its end: an effectivePeriod, a duration component or a
    Condition's abatement), in minutes; None when not charted."""
    return (e.end - e.time).total_seconds() / 60 if e.end is not None and e.end > e.time else None


def prolonged_seizure(e: Finding, s: GradingSettings) -> tuple[bool, str, bool]:
    """(life-threatening prolonged?, why, did the seizure_status_min setting decide it?) of a seizure
    (§3.2: "> 5 min", the setting; status words in the text decide by themselves)."""
    if e.detail == "status":
        return True, "status / prolonged / repetitive in the text", False
    mins = seizure_minutes(e)
    if mins is None:
        return False, "duration not charted", False
    if mins > s.seizure_status_min:
        return True, f"{mins:g} min > {s.seizure_status_min:g} min", True
    return False, f"{mins:g} min <= {s.seizure_status_min:g} min", True


def repetitive_seizures(tl: CaseTimeline, baseline: Callable[[Measurement | Finding], bool | None]) -> list[tuple[Finding, Finding, bool]]:
    """Pairs of consecutive seizures (after infusion, neither absent nor overlapping) with no return
    to baseline between them (§3.2 grade 4: "repetitive clinical or electrical seizures without
    return to baseline in between"): (first, second, assessed?).

    `baseline(row)` says whether a neuro row between them is an assessment at baseline (True: ICE
    10, CAPD at baseline, alert), one not at baseline (False) or no assessment (None: sedated,
    another kind). A time with a baseline assessment and none abnormal is a return to baseline;
    the pair is listed when there is none. assessed=False: nothing was assessed between them, so
    the return to baseline is unknown (graded 3 and flagged, never assumed)."""
    seizures = [e for e in tl.neuro if isinstance(e, Finding) and e.kind == "seizure" and e.detail != "absent" and e.time >= tl.infusion]
    out: list[tuple[Finding, Finding, bool]] = []
    times = [e.time for e in tl.neuro]  # (the timeline keeps tl.neuro in time order)
    for a, b in pairwise(seizures):
        after = a.end if a.end is not None and a.end > a.time else a.time
        if b.time <= after:
            continue  # the same seizure charted twice, or one still running
        at: dict[datetime, set[bool]] = {}
        for e in tl.neuro[bisect_right(times, after):bisect_left(times, b.time)]:
            v = baseline(e)
            if v is not None:
                at.setdefault(e.time, set()).add(v)
        if not any(vals == {True} for vals in at.values()):
            out.append((a, b, bool(at)))
    return out


class AstctIcans:
    name = "astct"

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        self.tl, self.s = tl, s
        self.result = SystemResult(self.name)
        self._sedation: Cover | None = None

    def sedated(self, t: datetime) -> bool:
        """Inside a sedation interval? (one bisection: O(log n))"""
        if self._sedation is None:
            self._sedation = Cover((a, b) for a, b, _ in self.tl.sedation)
        return t in self._sedation

    def primary_score(self) -> str:
        tl, s = self.tl, self.s
        have = {m.kind for m in tl.neuro if isinstance(m, Measurement) and m.time >= tl.infusion}
        prefer = "capd_score" if tl.age_years is not None and tl.age_years < s.ice_min_age_years else "ice_score"
        other = "ice_score" if prefer == "capd_score" else "capd_score"
        if prefer in have:
            if other in have:  # the other score's rows are not graded: said, whatever the age (§3.3)
                self.result.flag("ice_capd_both_charted")
            return prefer
        if other in have:
            self.result.flag("capd_used_age_12_plus" if other == "capd_score" else "ice_used_under_12")
            return other
        return prefer

    def assessments(self) -> list[Assessment]:
        tl, s, res = self.tl, self.s, self.result
        primary = self.primary_score()
        res.settings_used.add("ice_min_age_years")
        capd_base = 0.0
        pre = [m for m in tl.neuro if isinstance(m, Measurement) and m.kind == "capd_score" and m.time < tl.infusion]
        if pre:
            capd_base = pre[-1].value
        by_time: dict[datetime, Assessment] = {}
        loc_at: dict[datetime, Finding] = {}
        for e in tl.neuro:
            if isinstance(e, Finding) and e.kind == "consciousness":
                loc_at[e.time] = e
        ich = [f for f in tl.findings if f.kind == "intracranial_hemorrhage" and f.detail == "present"]

        def at(t: datetime) -> Assessment:
            return by_time.setdefault(t, Assessment(t))

        def unarousable_near(t: datetime) -> Finding | None:
            return next((f for tt, f in loc_at.items() if abs(tt - t) <= 30 * timedelta(minutes=1) and f.detail == "unarousable"), None)

        edema_seen = False
        for e in tl.neuro:
            t = e.time
            if t < tl.infusion:
                continue
            sed = self.sedated(t)
            if isinstance(e, Measurement):
                if e.kind != primary and e.kind in ("ice_score", "capd_score"):
                    continue
                if e.kind == "ice_score":
                    if sed:
                        res.flag("sedation_confounded")
                        res.settings_used.add("icans_sedation_bolus_h")
                        continue
                    v = e.value
                    a = at(t)
                    if v >= 10:
                        a.normal_primary = True
                    elif v >= 7:
                        a.criteria.append(Criterion(t, 1, f"ICE {v:g} (7-9)", [e.ref]))
                    elif v >= 3:
                        a.criteria.append(Criterion(t, 2, f"ICE {v:g} (3-6)", [e.ref]))
                    else:
                        un = unarousable_near(t) if v == 0 else None
                        if un is not None:
                            a.criteria.append(Criterion(t, 4, "ICE 0, unarousable", [e.ref, un.ref]))
                        else:
                            a.criteria.append(Criterion(t, 3, f"ICE {v:g} (0-2){', awake' if v == 0 else ''}", [e.ref]))
                elif e.kind == "capd_score":
                    if sed:
                        res.flag("sedation_confounded")
                        continue
                    v = e.value
                    a = at(t)
                    if v <= capd_base or v < 1:
                        a.normal_primary = True
                    elif v >= s.capd_delirium:
                        a.criteria.append(Criterion(t, 3, f"CAPD {v:g} (>= {s.capd_delirium:g})", [e.ref], ("capd_delirium",)))
                    else:
                        a.criteria.append(Criterion(t, 1, f"CAPD {v:g} (1-8, above baseline {capd_base:g})", [e.ref]))
                elif e.kind == "rass":
                    g, meaning = rass_level(e.value)
                    if g and sed:
                        res.flag("sedation_confounded")
                        res.settings_used.add("icans_sedation_bolus_h")
                    elif g:
                        at(t).criteria.append(Criterion(t, g, f"RASS {e.value:g} ({meaning}: depressed consciousness)", [e.ref], flags=("rass_used",)))
                elif e.kind == "gcs_total":
                    # GCS <= 8 is coma: depressed level of consciousness grade 4 (unless sedated);
                    # 9-14 is not an ICANS row, flagged for review
                    if e.value <= GCS_COMA and sed:
                        res.flag("sedation_confounded")
                        res.settings_used.add("icans_sedation_bolus_h")
                    elif e.value <= GCS_COMA:
                        at(t).criteria.append(Criterion(t, 4, f"GCS {e.value:g} (<= {GCS_COMA}: coma, depressed level of consciousness)", [e.ref], flags=("gcs_used",)))
                    elif e.value < 15:
                        res.flag("gcs_depressed")
                continue
            # Findings
            if e.kind.startswith("unable_") and e.kind[len("unable_"):] in ("ice_score", "capd_score"):
                if sed:
                    res.flag("sedation_confounded")
                    continue
                un = unarousable_near(t)
                g = 4 if (un is not None or e.kind == "unable_capd_score") else 3
                at(t).criteria.append(Criterion(t, g, f"unable to perform {e.kind[7:].split('_')[0].upper()}", [e.ref]))
            elif e.kind == "consciousness":
                g = _LOC_GRADE.get(e.detail, 0)
                if g and sed:
                    res.flag("sedation_confounded")
                    res.settings_used.add("icans_sedation_bolus_h")
                    continue
                if g:
                    at(t).criteria.append(Criterion(t, g, f"depressed level of consciousness: {e.text or e.detail}", [e.ref]))
            elif e.kind == "seizure":
                if e.detail == "absent":
                    continue
                long, why, by_setting = prolonged_seizure(e, s)
                sets = ("seizure_status_min",) if by_setting or long else ()
                fl = finding_flags(e)
                res.flag(*fl)
                if long:
                    at(t).criteria.append(Criterion(t, 4, f"life-threatening prolonged/repetitive seizure ({why}: {e.text})", [e.ref], sets, fl))
                else:
                    at(t).criteria.append(Criterion(t, 3, f"seizure ({e.text or e.detail})", [e.ref], sets, fl))
            elif e.kind == "motor_weakness" and e.detail == "present":
                fl = finding_flags(e)
                res.flag(*fl)
                at(t).criteria.append(Criterion(t, 4, f"deep focal motor weakness ({e.text})", [e.ref], (), fl))
            elif e.kind == "motor_weakness" and e.detail == "generalized":
                # generalized weakness / deconditioning is not "deep focal motor weakness" (§3.2):
                # not graded, flagged for review
                res.flag("motor_weakness_not_focal")
            elif e.kind == "icp_sign" and e.detail == "present":
                fl = finding_flags(e)
                res.flag(*fl)
                at(t).criteria.append(Criterion(t, 4, f"raised ICP sign ({e.text})", [e.ref], (), fl))
            elif e.kind == "cerebral_edema":
                if e.detail == "resolving" or (e.detail == "absent" and edema_seen):
                    # imaging resolution is reported beside the clinical one (grading-criteria V30 [I]);
                    # a scan without oedema is a resolution only after an oedema was seen
                    res.extra.setdefault("imaging_resolved", iso(e.time))
                    continue
                if e.detail == "absent":
                    continue
                edema_seen = True
                near_ich = [f for f in ich if abs(f.time - t) <= 24 * H]
                if e.detail == "hemorrhagic" or near_ich:
                    res.flag("intracranial_hemorrhage_excluded")
                    continue
                fl = finding_flags(e)
                res.flag(*fl)
                if e.detail == "diffuse":
                    at(t).criteria.append(Criterion(t, 4, f"diffuse cerebral edema ({e.text})", [e.ref], (), fl))
                else:
                    if e.detail == "unspecified":
                        res.flag("edema_extent_unspecified")
                    at(t).criteria.append(Criterion(t, 3, f"focal/local cerebral edema ({e.text})", [e.ref], (), fl))
        for first, second, assessed in repetitive_seizures(tl, lambda e: self._at_baseline(e, primary, capd_base)):
            if assessed:
                t = second.time
                at(t).criteria.append(Criterion(t, 4, "repetitive seizures without return to baseline in between", [first.ref, second.ref]))
            else:
                res.flag("repetitive_seizures_baseline_unknown")
        return [by_time[t] for t in sorted(by_time)]

    def _at_baseline(self, e: Measurement | Finding, primary: str, capd_base: float) -> bool | None:
        """Is neuro row e an assessment at baseline (ICE 10 / CAPD at baseline / alert), one not at
        baseline, or no assessment (None: sedated rows, other kinds)? (`repetitive_seizures`)"""
        if self.sedated(e.time):
            return None
        if isinstance(e, Measurement):
            if e.kind == primary == "ice_score":
                return e.value >= 10
            if e.kind == primary == "capd_score":
                return e.value <= capd_base or e.value < 1
            if e.kind == "rass":
                return e.value == 0
            return None
        if e.kind == "consciousness":
            return e.detail == "alert"
        if e.kind.startswith("unable_"):
            return False
        return None

    def grade(self) -> SystemResult:
        tl, s, res = self.tl, self.s, self.result
        episodes = neuro_episodes(self.assessments(), tl, timedelta(hours=s.icans_resolution_clear_h))
        for ep in episodes:
            if tl.deceased is not None and ep.onset <= tl.deceased and (ep.resolved is None or tl.deceased <= ep.resolved):
                self._death(ep, tl.deceased)
                ep.resolved = None
        summarise_neuro(res, episodes)
        for name in ("death_time_unknown", "death_time_imprecise"):  # a death that cannot be placed is said (§1.8)
            if name in tl.flags:
                res.flag(name)
        return res


    def _death(self, ep: EpisodeResult, when: datetime) -> None:
        """Death during an active ICANS episode (§1.8, §3.2 grade 5; as crs.py): attributed to
        ICANS, or with no documented alternative principal cause -> grade 5 candidate (adjudicate);
        a documented other cause (sepsis, progression, haemorrhage, CRS …) keeps the pre-death
        maximum and is flagged death_alternative_cause."""
        tl = self.tl
        causes = tl.findings_of("cause_of_death")
        refs = [tl.deceased_ref or "", *(f.ref for f in causes)]
        alt, alt_refs = death_alternative_cause(tl, ep.onset, when, self.s)
        if any(affirmed(_ICANS_DEATH, f.text) for f in causes):
            text = "death attributed to ICANS (adjudicate)"
        elif alt or any(affirmed(_OTHER_DEATH, f.text) for f in causes):
            ep.flags.append("death_alternative_cause")
            return
        else:
            text = "death during an active ICANS episode with no documented alternative principal cause (adjudicate)"
        ep.grade, ep.max_at = 5, when
        ep.criteria.append(Criterion(when, 5, text, refs + [r for r in alt_refs if r not in refs]))
        ep.flags.append("grade5_candidate")


def _abnormal_within(points: list[Assessment], k: int, until: datetime) -> bool:
    """Any abnormal assessment from points[k] up to `until`? (points are time-ordered: the scan
    stops at `until`, so a normal stretch is read once, not once per normal assessment in it)"""
    while k < len(points) and points[k].time <= until:
        if points[k].grade > 0:
            return True
        k += 1
    return False


def neuro_episodes(points: list[Assessment], tl: CaseTimeline, clear: timedelta) -> list[EpisodeResult]:
    """Episodes from the first abnormal assessment to the first normal one (ICE 10 / CAPD at
    baseline, nothing else abnormal) that stays normal for `clear`."""
    episodes: list[EpisodeResult] = []
    i = 0
    while i < len(points):
        if points[i].grade == 0:
            i += 1
            continue
        onset, best, best_t, resolved = points[i].time, 0, None, None
        trail: list[Criterion] = []
        j = i
        while j < len(points):
            p = points[j]
            if p.grade > best:
                best, best_t = p.grade, p.time
                trail.extend(c for c in p.criteria if c.grade == p.grade)
            if p.grade == 0 and p.normal_primary and not _abnormal_within(points, j + 1, p.time + clear):
                resolved = p.time
                break
            j += 1
        flags = ["resolution_unconfirmed"] if resolved is not None and (tl.last_time is None or tl.last_time < resolved + clear) else []
        episodes.append(EpisodeResult(onset, resolved, best, best_t, True, flags, trail))
        if resolved is None:
            break
        i = next((k for k in range(j, len(points)) if points[k].time > resolved and points[k].grade > 0), len(points))
    return episodes


def summarise_neuro(res: SystemResult, episodes: list[EpisodeResult]) -> None:
    """Per-infusion maximum, first onset, last resolution, evidence of the onset and the maximum."""
    res.episodes = episodes
    for e in episodes:
        res.flag(*e.flags)
    if not episodes:
        return
    res.settings_used.update({"icans_resolution_clear_h", "ice_min_age_years"})
    res.grade = max(e.grade for e in episodes)
    res.onset, res.resolved = episodes[0].onset, episodes[-1].resolved
    first = next(e for e in episodes if e.grade == res.grade)
    res.max_at = first.max_at
    if episodes[0].criteria:
        res.cite(episodes[0].criteria[0].refs)
    for e in episodes:
        res.criteria.extend(e.criteria)
    for c in first.criteria:
        if c.grade == res.grade:
            res.cite(c.refs)
            res.settings_used.update(c.settings)
            res.flag(*c.flags)


def grade_icans_astct(tl: CaseTimeline, s: GradingSettings) -> SystemResult:
    return AstctIcans(tl, s).grade()
