"""Stage 4 (CRS): the shared episode-by-episode grading loop, and ASTCT 2019 on top of it.

Every CRS system grades the same way (grading-criteria §1.7): within each fever-anchored
episode, at every time something changes, the instant grade is the maximum of the system's
components (hypotension, hypoxia, organ toxicity …), floor 1; the episode maximum and the first
time it is reached are kept with the criteria and resources behind them. Systems differ only in
`components()` (and whether fever must accompany them, which only ASTCT requires).

Cost: O(n log n + output) per system for n events. The derived series the systems share
(episodes, concurrency, dose states, organ grades) are built once per case (state.py); each
change point is graded once, and each component looks up what covers it by bisection.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from datetime import datetime, timedelta

from ..settings import GradingSettings
from ..timeline import CaseTimeline, Support
from .episodes import Episode
from .result import Criterion, EpisodeResult, SystemResult
from .state import Cover, case_state

H = timedelta(hours=1)
MIN = timedelta(minutes=1)
# the [I] settings behind review flags the timeline raises (reported in `conventions` with them)
_FLAG_SETTINGS = {
    "hypotension_unconfirmed": ("hypotension_confirm_min_gap_min", "hypotension_confirm_window_min", "hypotension_treatment_window_min"),
    "age_threshold_changes": ("sbp_child_base", "sbp_child_per_year"),
    "ppv_indication_conflict": ("ppv_hypoxia_lookback_h",),
}


class CrsGrader:
    """Base class: subclasses implement `components` (and may add change points/abnormalities)."""

    name = "crs"
    needs_fever = False  # ASTCT: components count only with fever or after masking therapy

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        self.tl = tl
        self.s = s
        self.result = SystemResult(self.name)
        self.state = case_state(tl, s)

    # -- hooks ----------------------------------------------------------------------------
    def components(self, t: datetime, ep: Episode) -> list[Criterion]:
        raise NotImplementedError

    def change_points(self) -> Iterable[datetime]:
        tl = self.tl
        yield from (m.time for m in tl.temps)
        yield from (h.time for h in tl.hypotension)
        yield from (c.start for c in tl.pressors)
        yield from (g.start for g in tl.support)

    def episode_points(self, ep: Episode) -> Iterable[datetime]:
        """Change points that depend on the episode itself (e.g. MSKCC's 24 cumulative hours)."""
        return ()

    def extra_abnormal(self) -> list[tuple[datetime, datetime | None, list[str]]]:
        return []

    # -- shared machinery -----------------------------------------------------------------
    def used(self, *names: str) -> None:
        self.result.settings_used.update(names)

    def fever_ok(self, t: datetime, ep: Episode) -> tuple[bool, list[str], bool]:
        """(fever requirement met, refs, via masking) at t within episode ep."""
        close = self.state.fevers.nearest(t, timedelta(hours=self.s.fever_association_h))
        if close is not None:
            return True, [close.ref], False
        if ep.masked_from is not None and t >= ep.masked_from:
            return True, ep.masking_refs, True
        return False, [], False

    def grade(self) -> SystemResult:
        """O(n log n + output) for n events: episodes and the shared series come from the case
        state (built once), each change point of an episode is graded once, and every component
        query at a change point is a bisection into an index (grading/state.py)."""
        tl, s, res = self.tl, self.s, self.result
        episodes = self.state.episodes(self.extra_abnormal())
        points = sorted(set(self.change_points()))
        for ep in episodes:
            bound = ep.end_bound(tl)
            best, best_t, trail = 0, None, []
            raised: set[str] = set()  # flags of the criteria kept at the current maximum
            ties: list[Criterion] = []  # later criteria at that maximum raising a flag not yet raised
            pts = [ep.onset, *points[bisect_right(points, ep.onset):bisect_right(points, bound)]]
            pts += [p for p in self.episode_points(ep) if ep.onset <= p <= bound]
            if ep.masked_from is not None and ep.masked_from <= bound:
                pts.append(ep.masked_from)
            for t in sorted(set(pts)):
                comps = self.components(t, ep)
                g = 1
                met: list[Criterion] = []
                if comps:
                    ok, frefs, masked = (True, [], False) if not self.needs_fever else self.fever_ok(t, ep)
                    top = max(c.grade for c in comps)
                    if ok and top > 1:
                        g = top
                        met = [c for c in comps if c.grade == top]
                        if self.needs_fever:
                            self.used("fever_association_h")
                            if masked:
                                self.used("masking_drug_classes")
                                met = [*met, Criterion(t, g, "fever not required: anti-cytokine/antipyretic/steroid given after CRS onset", frefs, ("masking_drug_classes",))]
                    elif not ok and top > 1 and "afebrile_component_in_episode" not in ep.flags:
                        ep.flags.append("afebrile_component_in_episode")
                if g > best:
                    best, best_t = g, t
                    if g == 1 and not met:
                        met = [Criterion(ep.onset, 1, f"fever >= {s.fever_c:.1f} °C", ep.onset_refs)]
                    trail.extend(met)
                    raised, ties = {f for c in met for f in c.flags}, []
                elif g == best > 1:
                    # A later criterion that ties the maximum and raises a review flag not yet
                    # raised at this grade is kept, with its evidence: a flag says the grade might
                    # be higher (§1.4, §1.5), so a tie must not lose it.
                    for c in met:
                        if not raised.issuperset(c.flags):
                            ties.append(c)
                            raised.update(c.flags)
            trail.extend(ties)
            if ep.death is not None:
                if ep.death_alternative:
                    ep.flags.append("death_alternative_cause")
                else:
                    best, best_t = 5, ep.death
                    trail.append(Criterion(ep.death, 5, "death during an active CRS episode with no documented alternative principal cause (adjudicate)", [tl.deceased_ref or "", *ep.death_refs]))
                    ep.flags.append("grade5_candidate")
            counted = not (ep.provisional and s.exclude_provisional_episodes)
            if ep.provisional:
                self.used("exclude_provisional_episodes", "culture_attribution_window_h", "late_onset_day")
            if not counted:
                res.flag("episode_excluded_by_setting")  # under-called on a clinician's setting: said on the result
            res.episodes.append(EpisodeResult(ep.onset, ep.resolved, best, best_t, counted, list(ep.flags), trail))
        self._summarise(episodes)
        self._outside_episode_flags(episodes)
        return res

    def _summarise(self, episodes: list[Episode]) -> None:
        res = self.result
        counted = [(ep, er) for ep, er in zip(episodes, res.episodes, strict=True) if er.counted]
        for er in res.episodes:
            res.flag(*er.flags)
        if not counted:
            return
        self.used("resolution_clear_h")
        res.grade = max(er.grade for _, er in counted)
        res.onset = counted[0][1].onset
        res.resolved = counted[-1][1].resolved
        first_max = next(er for _, er in counted if er.grade == res.grade)
        res.max_at = first_max.max_at
        res.cite(counted[0][0].onset_refs)
        for _, er in counted:
            res.criteria.extend(er.criteria)
        for c in first_max.criteria:
            if c.grade == res.grade:
                res.cite(c.refs)
                self.used(*c.settings)
                res.flag(*c.flags)
        # Every other criterion at the maximum grade that carries a review flag (a later episode
        # that ties it): its flags, with the evidence and settings behind them, reach the result.
        for _, er in counted:
            if er is not first_max and er.grade == res.grade:
                for c in er.criteria:
                    if c.grade == res.grade and c.flags:
                        res.cite(c.refs)
                        self.used(*c.settings)
                        res.flag(*c.flags)

    def _outside_episode_flags(self, episodes: list[Episode]) -> None:
        tl, s, res = self.tl, self.s, self.result

        windows = Cover((ep.onset, ep.end_bound(tl)) for ep in episodes)
        # a component that starts up to fever_association_h before an episode's fever onset is
        # not graded (§1.1: the episode opens with the fever; §13: bins before it score 0) but
        # is not afebrile either: flagged for review, so a pressor or high-flow O2 that ended just
        # before the first fever never disappears without a word
        before = Cover((ep.onset - timedelta(hours=s.fever_association_h), ep.onset) for ep in episodes)

        afebrile = False

        # the support (O2 above baseline, CRS-attributed positive pressure) and the pressors
        # running at each instant: a segment that ends before an onset while the same therapy
        # runs on through it (a charted row per segment) is graded at the onset, not flagged
        o2_running = Cover((g.start, g.end) for g in tl.support if not g.home and (g.attributed or not g.ppv))
        pressor_running = Cover((c.start, c.end) for c in tl.pressors)

        def outside(t: datetime, flag: str, running: Cover, end: datetime | None = None) -> None:
            """`end`: for a hypotension, the furthest end of the pressors treating it (one started
            just after the onset also grades it there)."""
            nonlocal afebrile
            if t < tl.infusion or t in windows:
                return
            if t in before:
                if end is not None and any(t < ep.onset <= end for ep in episodes):
                    return  # still treated at the fever onset: graded there
                if any(t < ep.onset and ep.onset in running for ep in episodes if ep.onset - t <= timedelta(hours=s.fever_association_h)):
                    return  # the same therapy runs on through the onset: graded there
                res.flag("component_before_onset")
                self.used("fever_association_h")
            else:
                res.flag(flag)
                afebrile = True

        # a hypotension treated by a pressor still running at the onset is graded there: the
        # furthest end of the pressors started by each time (prefix maxima, one bisection each)
        by_start = sorted(tl.pressors, key=lambda c: c.start)
        starts = [c.start for c in by_start]
        reach: list[datetime] = []
        for c in by_start:
            reach.append(max(reach[-1], c.end) if reach else c.end)
        for h in tl.hypotension:
            k = bisect_right(starts, h.time + H)
            outside(h.time, "afebrile_hypotension", pressor_running, reach[k - 1] if k else None)
        for c in tl.pressors:
            outside(c.start, "afebrile_hypotension", pressor_running)  # (its own course is in pressor_running)
        for g in tl.support:
            if g.home:
                continue
            if g.ppv and not g.attributed:
                if g.start >= tl.infusion:
                    res.flag("ppv_not_attributed")  # set aside wherever it lies (§2.3): a possible grade 4
                    self.used("ppv_hypoxia_lookback_h")
                continue
            outside(g.start, "afebrile_hypoxia", o2_running)  # (the segment itself is in o2_running)
        first_onset = episodes[0].onset if episodes else None
        if afebrile:
            pre = [d for d in tl.drugs if d.drug_class in s.masking_drug_classes
                   and tl.infusion - 24 * H <= d.start and (first_onset is None or d.start < first_onset)]
            if pre:
                res.flag("prophylaxis_masking")
                res.cite([pre[0].ref])
        if self.state.display_rounding:
            res.flag("display_rounding")
            self.used("display_rounding_low_c", "fever_compare_decimals")
        look = timedelta(hours=s.preinfusion_fever_lookback_h)
        if first_onset is not None and first_onset - tl.infusion <= look and self.state.fever_before_infusion:
            res.flag("fever_preinfusion")
            self.used("preinfusion_fever_lookback_h")
        for name in ("unit_error", "timezone_assumed", "age_unknown", "infusion_end_assumed", "observation_gap",
                     "vasopressor_ignored", "low_sbp_in_procedure_window", "arterial_artifact_excluded",
                     "status_unknown", "status_on_hold", "status_missing", "hypotension_unconfirmed",
                     "age_threshold_changes", "ppv_indication_conflict", "death_time_unknown",
                     "death_time_imprecise"):
            if name in tl.flags:
                res.flag(name)
                self.used(*_FLAG_SETTINGS.get(name, ()))


class AstctCrs(CrsGrader):
    """ASTCT 2019 CRS (Lee DW et al. 2019), grading-criteria §2."""

    name = "astct"
    needs_fever = True

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        super().__init__(tl, s)
        self.multi = self.state.concurrent(include_vasopressin=False)

    def change_points(self) -> Iterable[datetime]:
        yield from super().change_points()
        yield from (m[0] for m in self.multi)

    def support_tier(self, g: Support) -> tuple[int, str, tuple[str, ...], tuple[str, ...]]:
        """(component grade, criterion, settings used, flags) of one support segment."""
        s = self.s
        if g.home:
            return 0, "home/baseline respiratory support (not counted)", ("home_baseline_lookback_days",), ("home_baseline_excluded",)
        d = g.device
        if g.ppv:
            if not g.attributed:
                return 0, f"{d} not attributable to CRS hypoxia ({g.attribution_note})", ("ppv_hypoxia_lookback_h",), ("ppv_not_attributed",)
            return 4, f"positive pressure ({d.replace('_', ' ')})", ("ppv_hypoxia_lookback_h",), ()
        if d == "nasal_cannula":
            if g.flow is None:
                return 2, "nasal cannula, flow not charted (assumed low-flow)", ("missing_flow_is_low_flow",), ("missing_flow",)
            if g.flow > s.low_flow_max_lpm:
                return 3, f"nasal cannula {g.flow:g} L/min (> {s.low_flow_max_lpm:g} L/min = high flow)", ("low_flow_max_lpm",), ()
            return 2, f"low-flow nasal cannula {g.flow:g} L/min", ("low_flow_max_lpm",), ()
        if d == "blow_by":
            return 2, "blow-by oxygen", (), ()
        if d == "unspecified_o2":
            return 2, "supplemental oxygen, device not charted", (), ("device_unknown",)
        names = {"high_flow_nasal_cannula": "high-flow nasal cannula", "face_mask": "face mask",
                 "venturi_mask": "Venturi mask", "non_rebreather": "non-rebreather mask"}
        return 3, names.get(d, d), (), ()

    def components(self, t: datetime, ep: Episode) -> list[Criterion]:
        tl, state, out = self.tl, self.state, []
        for _start, _end, k, refs in state.concurrent_at(include_vasopressin=False).at(t):
            out.append(Criterion(t, 4, f"{k} vasopressors concurrently (excluding vasopressin)", refs, ("vasopressor_overlap_min",)))
        running = state.running.at(t)
        if running:
            names = sorted({c.drug for c in running})
            out.append(Criterion(t, 3, "vasopressor: " + ", ".join(names), [c.refs[0] for c in running], ("vasopressor_min_duration_min",)))
            if state.handoff_in(ep.onset, ep.end_bound(tl)):
                out[-1].flags += ("vasopressor_handoff",)
                out[-1].settings += ("vasopressor_overlap_min",)
        for h in state.hypotension.exactly(t):
            crit = f"hypotension SBP {h.sbp:g} < {h.threshold:g} mmHg ({h.how}), no vasopressor"
            sets: tuple[str, ...] = ("hypotension_confirm_window_min",)
            if tl.pediatric:
                sets += ("sbp_child_base", "sbp_child_per_year")
            out.append(Criterion(t, 2, crit, h.refs, sets))
        for g in state.support.at(t):
            tier, crit, sets, flags = self.support_tier(g)
            if tier:
                out.append(Criterion(t, tier, crit, g.refs, (*sets, "device_carry_forward_h"), flags))
            elif flags and ep.onset <= g.start <= ep.end_bound(tl):
                self.result.flag(*flags)
                self.used(*sets)
        return out


def grade_crs_astct(tl: CaseTimeline, s: GradingSettings) -> SystemResult:
    return AstctCrs(tl, s).grade()
