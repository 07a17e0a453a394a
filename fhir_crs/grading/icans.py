"""Stage 4 (neurotoxicity): ASTCT 2019 ICANS (grading-criteria §3).

ICE for age >= 12 (CAPD if only CAPD was charted), CAPD below 12 (relative to the child's
pre-infusion baseline); depressed level of consciousness (unless sedated), seizures, motor
weakness, raised ICP / cerebral oedema (intracranial haemorrhage excluded). The instant grade is
the most severe domain at an assessment time; episodes run from the first abnormal assessment to
the first normal one that stays normal for 24 h.

Cost: O(A log A) for A neuro rows (sedation by bisection; the 24 h clear check reads each
stretch once), plus O(A0 x L) for the A0 ICE-0 rows that look for an unarousable
level-of-consciousness row among the L charted ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..events import Finding, Measurement
from ..settings import GradingSettings
from ..timeline import CaseTimeline
from .result import Criterion, EpisodeResult, SystemResult, iso
from .state import Cover

H = timedelta(hours=1)
_LOC_GRADE = {"alert": 0, "spontaneous": 1, "voice": 2, "tactile": 3, "unarousable": 4}
_ICANS_DEATH = re.compile(r"ICANS|neurotox|cerebral o?edema|herniation|encephalopathy|status epilepticus", re.IGNORECASE)


@dataclass(slots=True)
class Assessment:
    """Domain grades found at one time."""

    time: datetime
    criteria: list[Criterion] = field(default_factory=list)
    normal_primary: bool = False  # ICE 10 / CAPD at baseline charted here

    @property
    def grade(self) -> int:
        return max((c.grade for c in self.criteria), default=0)


def rass_grade(v: float) -> int:
    if v >= 0:
        return 0
    if v >= -1:
        return 1
    if v >= -3:
        return 2
    if v >= -4:
        return 3
    return 4


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
            if other in have and tl.age_years == s.ice_min_age_years:
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
                elif e.kind == "rass" and not sed:
                    g = rass_grade(e.value)
                    if g:
                        at(t).criteria.append(Criterion(t, g, f"RASS {e.value:g} (depressed consciousness)", [e.ref], flags=("rass_used",)))
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
                if e.detail == "status":
                    at(t).criteria.append(Criterion(t, 4, f"life-threatening prolonged/repetitive seizure ({e.text})", [e.ref], ("seizure_status_min",)))
                else:
                    at(t).criteria.append(Criterion(t, 3, f"seizure ({e.text or e.detail})", [e.ref]))
            elif e.kind == "motor_weakness" and e.detail == "present":
                at(t).criteria.append(Criterion(t, 4, f"deep focal motor weakness ({e.text})", [e.ref]))
            elif e.kind == "icp_sign" and e.detail == "present":
                at(t).criteria.append(Criterion(t, 4, f"raised ICP sign ({e.text})", [e.ref]))
            elif e.kind == "cerebral_edema":
                if e.detail in ("absent", "resolving"):
                    # imaging resolution is reported beside the clinical one (grading-criteria V30 [I])
                    res.extra.setdefault("imaging_resolved", iso(e.time))
                    continue
                near_ich = [f for f in ich if abs(f.time - t) <= 24 * H]
                if e.detail == "hemorrhagic" or near_ich:
                    res.flag("intracranial_hemorrhage_excluded")
                    continue
                if e.detail == "diffuse":
                    at(t).criteria.append(Criterion(t, 4, f"diffuse cerebral edema ({e.text})", [e.ref]))
                else:
                    if e.detail == "unspecified":
                        res.flag("edema_extent_unspecified")
                    at(t).criteria.append(Criterion(t, 3, f"focal/local cerebral edema ({e.text})", [e.ref]))
        return [by_time[t] for t in sorted(by_time)]

    def grade(self) -> SystemResult:
        tl, s, res = self.tl, self.s, self.result
        episodes = neuro_episodes(self.assessments(), tl, timedelta(hours=s.icans_resolution_clear_h))
        for ep in episodes:
            if tl.deceased is not None and ep.onset <= tl.deceased and (ep.resolved is None or tl.deceased <= ep.resolved):
                causes = tl.findings_of("cause_of_death")
                if any(_ICANS_DEATH.search(f.text) for f in causes):
                    ep.grade, ep.max_at = 5, tl.deceased
                    ep.criteria.append(Criterion(tl.deceased, 5, "death attributed to ICANS (adjudicate)", [tl.deceased_ref or ""] + [f.ref for f in causes]))
                    ep.flags.append("grade5_candidate")
                ep.resolved = None
        summarise_neuro(res, episodes)
        return res


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
