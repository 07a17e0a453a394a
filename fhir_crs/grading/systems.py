"""Stage 4 (CRS, legacy/comparison systems): Lee 2014, Penn (Porter 2018), MSKCC (Park 2018),
CARTOX (Neelapu 2018) / PedsCARTOX (Mahadeo 2019) and CTCAE v5.0, rule by rule from
grading-criteria §§4-9 and the cross-system matrix of §10. Same episodes, evidence and flags as
ASTCT (crs.py); what differs is `components()` — FiO2 instead of device, vasopressor dose and
duration, organ toxicity — and, for the organ-toxicity systems, what delays resolution.

Cost: O(n log n + output) per system, as for ASTCT (crs.py): dose states, high-dose and
refractory intervals, concurrency and organ grades come from the shared case state (state.py);
each query at a change point is a bisection (O(log n) plus what it returns).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import ClassVar

from ..settings import GradingSettings
from ..timeline import CaseTimeline, Support
from .concurrency import handoffs
from .crs import CrsGrader
from .episodes import Episode
from .organ import grade_lab, organ_abnormal_intervals
from .result import Criterion
from .state import LatestOrgan, TimeIndex
from .vasoactive import PAUSE_BRIDGED, cumulative_pressor_time, low_sbp_intervals, overlap_pairs

H = timedelta(hours=1)


def _estimate_settings(g: Support, fio2: float, s: GradingSettings) -> tuple[str, ...]:
    """The §1.5 estimation settings that gave this segment's estimated FiO2."""
    if g.device in ("nasal_cannula", "unspecified_o2", "high_flow_nasal_cannula"):
        sets: tuple[str, ...] = ("fio2_nc_base", "fio2_nc_per_lpm")
        if g.flow is None:  # HFNC without a flow: estimated at the high-flow bound
            sets += ("low_flow_max_lpm",)
        if (s.low_flow_max_lpm if g.flow is None else g.flow) > 6:
            sets += ("fio2_nc_high_per_lpm",)
        return sets + (("fio2_nc_cap",) if fio2 >= s.fio2_nc_cap else ())
    if g.device == "face_mask":
        return ("fio2_face_mask_5l",) + (("fio2_nc_cap",) if fio2 >= s.fio2_nc_cap else ())
    return {"blow_by": ("fio2_blow_by",), "non_rebreather": ("fio2_non_rebreather",)}.get(g.device, ())


class LegacyCrs(CrsGrader):
    """Shared machinery of the FiO2/dose/organ-based systems."""

    organ_based = False  # organ toxicity is a grading criterion (and must settle before resolution)
    vent_grade = 4
    niv_grade: int | None = None  # systems that grade CPAP/BiPAP explicitly (Penn, PedsCARTOX: 3)
    organ_min_grades: ClassVar[Mapping[str, int]] = {}  # per lab, the CTCAE grade from which the system grades it (default 2)

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        super().__init__(tl, s)
        st = self.state  # shared with the other systems: computed once per case
        self.states, self.dose_flags = st.doses
        self.sustained = st.sustained
        self._sustained_at = TimeIndex(self.sustained, lambda x: x[0])
        self.refractory = st.refractory
        self._refractory_at = TimeIndex(self.refractory, lambda x: x[0])
        self.multi = st.concurrent(include_vasopressin=True)
        self._course_of = {c.refs[0]: c for c in tl.pressors}
        self._handoffs = TimeIndex(handoffs(tl.pressors, timedelta(minutes=s.vasopressor_overlap_min)), lambda h: h[0])
        baseline_abnormal: dict[str, bool] = {}
        if self.organ_based:
            for o in st.organs:
                if o.lab not in baseline_abnormal:
                    baseline_abnormal[o.lab] = self._baseline_abnormal(o.lab)
        self.organs = [o for o in st.organs if not baseline_abnormal[o.lab]] if self.organ_based else []
        self._latest = LatestOrgan(self.organs)

    def _baseline_abnormal(self, lab: str) -> bool:
        pre = [m for m in self.tl.labs.get(lab, []) if m.time < self.tl.infusion]
        if pre and grade_lab(self.tl, lab, pre[-1], self.s).grade >= 2 and lab != "creatinine":
            self.result.flag("organ_baseline_abnormal")
            return True
        return False

    def change_points(self) -> Iterable[datetime]:
        yield from super().change_points()
        yield from (t for t, _, _ in self.sustained)
        yield from (t for t, _ in self.refractory)
        yield from (m[0] for m in self.multi)
        yield from (o.time for o in self.organs)

    def extra_abnormal(self) -> list[tuple[datetime, datetime | None, list[str]]]:
        """Organ abnormalities hold the episode open (§1.1) only where this system grades them:
        a lab at or above its `organ_min_grades` grade (Penn: LFTs from grade 3)."""
        return organ_abnormal_intervals(self.organs, min_grades=self.organ_min_grades) if self.organ_based else []

    # -- components shared by several systems ---------------------------------------------
    def hypoxia(self, t: datetime, ep: Episode) -> list[Criterion]:
        """FiO2-graded support at t. §1.5: a documented FiO2 is used before any estimate, so an
        oxygen device recorded at t without FiO2 beside the same device with a charted FiO2 (a
        Procedure next to the flowsheet rows) is read through the documented value."""
        out = []
        segs = self.state.support.at(t)
        documented = {g.device for g in segs if g.fio2 is not None and not g.home and not g.ppv}
        for g in segs:
            if g.fio2 is None and not g.home and not g.ppv and g.device in documented:
                continue
            c = self.fio2_criterion(t, g, ep)
            if c is not None:
                out.append(c)
        return out

    def fio2_criterion(self, t: datetime, g: Support, ep: Episode) -> Criterion | None:
        s = self.s
        if g.home:
            if ep.contains(g.start, self.tl):
                self.result.flag("home_baseline_excluded")
            return None
        if g.ppv and not g.attributed:
            if ep.contains(g.start, self.tl):
                self.result.flag("ppv_not_attributed")
            return None
        if g.device == "invasive_ventilation":
            return Criterion(t, self.vent_grade, "invasive mechanical ventilation", g.refs, ("ppv_hypoxia_lookback_h",))
        if g.ppv and self.niv_grade is not None:
            return Criterion(t, self.niv_grade, f"{g.device.replace('_', ' ')} (positive pressure)", g.refs, ("ppv_hypoxia_lookback_h",))
        fio2, estimated = g.fio2_estimate(s)
        flags: tuple[str, ...] = ("niv_ambiguity",) if g.ppv else ()
        if fio2 is None:
            flags += ("fio2_unknown",) + (("missing_flow",) if g.device == "nasal_cannula" else ())
            return Criterion(t, 2, f"supplemental O2 ({g.device.replace('_', ' ')}), FiO2 not charted: < {s.fio2_cut:g} % assumed", g.refs, ("fio2_cut",), flags)
        sets: tuple[str, ...] = ("fio2_cut",)
        how = "documented"
        if estimated:
            flags += ("estimated_fio2",)
            sets += _estimate_settings(g, fio2, s)
            how = "estimated"
            if g.device == "high_flow_nasal_cannula" and g.flow is None:
                # §1.5: HFNC is > low_flow_max_lpm by class; without flow or FiO2 the estimate is
                # only a lower bound, never a silent "< 40 %": flagged for review.
                flags += ("fio2_unknown", "missing_flow")
                how = f"at least: estimated at the high-flow bound {s.low_flow_max_lpm:g} L/min, flow and FiO2 not charted"
        grade = 3 if round(fio2, 1) >= s.fio2_cut else 2
        rel = ">=" if grade == 3 else "<"
        return Criterion(t, grade, f"O2 by {g.device.replace('_', ' ')}, FiO2 {fio2:.0f} % ({how}) {rel} {s.fio2_cut:g} %", g.refs, sets, flags)

    def any_o2(self, t: datetime, ep: Episode, grade: int) -> list[Criterion]:
        """Penn: any supplemental oxygen (incl. CPAP/BiPAP) is `grade`; invasive ventilation 4."""
        out = []
        for g in self.state.support.at(t):
            if g.home or (g.ppv and not g.attributed):
                if ep.contains(g.start, self.tl):
                    self.result.flag("home_baseline_excluded" if g.home else "ppv_not_attributed")
                continue
            if g.device == "invasive_ventilation":
                out.append(Criterion(t, 4, "mechanical ventilation", g.refs))
            else:
                out.append(Criterion(t, grade, f"supplemental oxygen ({g.device.replace('_', ' ')})", g.refs))
        return out

    def hypotension_event(self, t: datetime, grade: int) -> list[Criterion]:
        return [Criterion(t, grade, f"hypotension SBP {h.sbp:g} < {h.threshold:g} mmHg ({h.how})", h.refs, ("hypotension_confirm_window_min",))
                for h in self.state.hypotension.exactly(t)]

    def single_pressor(self, t: datetime, grade: int, text: str = "vasopressor (low dose)") -> list[Criterion]:
        running = self.state.running.at(t)
        if not running:
            return []
        return [Criterion(t, grade, f"{text}: " + ", ".join(sorted({c.drug for c in running})), [c.refs[0] for c in running], ("vasopressor_min_duration_min",))]

    def multiple_pressors(self, t: datetime, grade: int, note: str) -> list[Criterion]:
        """Concurrent vasopressors, vasopressin counted (§1.4, §10): flagged vasopressin_counted
        only when vasopressin is one of them."""
        out = []
        for _start, _end, k, refs in self.state.concurrent_at(include_vasopressin=True).at(t):
            vaso = any(self._course_of[r].drug == "vasopressin" for r in refs if r in self._course_of)
            flags = ("vasopressin_counted",) if vaso else ()
            out.append(Criterion(t, grade, f"{k} vasopressors concurrently{note}", refs, ("vasopressor_overlap_min",), flags))
        return out

    def handoff(self, t: datetime, grade: int) -> list[Criterion]:
        """§1.4: two vasopressors overlapping less than vasopressor_overlap_min count as one (a
        hand-off). In a system that grades concurrent vasopressors higher, that convention can
        lower the grade: the overlap is a criterion at the one-vasopressor grade, flagged
        vasopressor_handoff, with both infusions as evidence."""
        out = []
        for start, refs in self._handoffs.exactly(t):
            a, b = (self._course_of[r] for r in refs)
            mins = (min(a.end, b.end) - start).total_seconds() / 60
            text = (f"vasopressor hand-off: {a.drug} and {b.drug} overlap {mins:.0f} min "
                    f"< {self.s.vasopressor_overlap_min:g} min, counted as one vasopressor")
            out.append(Criterion(t, grade, text, list(refs), ("vasopressor_overlap_min",), ("vasopressor_handoff",)))
        return out

    def high_dose(self, t: datetime, grade: int) -> list[Criterion]:
        # The first sustained high-dose time that is t itself, or any reached by t while a
        # vasopressor still runs at a high dose (the sustained times are in time order).
        if "vasopressor_dose_unknown" in self.dose_flags and self.state.running.at(t):
            self.result.flag("vasopressor_dose_unknown")  # high dose cannot be judged: said, not assumed absent
        if not self.sustained:
            return []
        hit = None
        if self.sustained[0][0] <= t and self.state.running.at(t) and self.state.high_at(t):
            hit = self.sustained[0]
        else:
            same = self._sustained_at.exactly(t)
            hit = same[0] if same else None
        if hit is None:
            return []
        _, text, refs = hit
        sets: tuple[str, ...] = ("high_dose_min_hours",)
        flags = tuple(sorted(self.dose_flags & {"pediatric_high_dose", "dosing_weight_unknown", "same_drug_overlap"}))
        if PAUSE_BRIDGED in text:
            sets += ("vasopressor_course_gap_min",)
            flags += ("high_dose_pause_bridged",)
        return [Criterion(t, grade, f"high-dose vasopressors held >= {self.s.high_dose_min_hours:g} h ({text})", refs, sets, flags)]

    def refractory_hypotension(self, t: datetime, grade: int, text: str) -> list[Criterion]:
        return [Criterion(t, grade, text, refs, ("refractory_hypotension_min",)) for _, refs in self._refractory_at.exactly(t)]

    def organ(self, t: datetime, ep: Episode, lee_style: bool = True) -> list[Criterion]:
        """Latest value of each organ lab at t, graded per CTCAE; Lee/CARTOX mapping by default.
        Each criterion carries the settings that decided its lab grade (a default ULN; none for
        the lab's own range) and its review flags (organ.py). A creatinine read in the episode
        without a pre-infusion baseline and below grade 3 by ULN flags the result
        `baseline_missing` even when it makes no criterion (§1.6 "x baseline" could not be
        applied, so the grade may be higher)."""
        out = []
        for o in self._latest.window(ep.onset - 24 * H, t):
            if "baseline_missing" in o.flags:
                self.result.flag("baseline_missing")
            if o.grade < 2:
                continue
            if lee_style:
                g = 3 if (o.grade == 4 and o.transaminitis) else o.grade
            else:  # Penn: grade 2 creatinine or grade 3 LFTs -> 2; grade 4 LFTs or grade 3 creatinine -> 3
                if o.lab == "creatinine":
                    g = 3 if o.grade >= 3 else 2
                else:
                    g = 3 if o.grade >= 4 else 2 if o.grade >= 3 else 0
            if g >= 2:
                out.append(Criterion(t, g, "organ toxicity: " + o.text, [o.ref], o.settings, o.flags))
        return out


class Lee2014(LegacyCrs):
    """Lee DW et al., Blood 2014 (grading-criteria §4)."""

    name = "lee2014"
    organ_based = True

    def components(self, t: datetime, ep: Episode) -> list[Criterion]:
        return [
            *self.hypotension_event(t, 2), *self.single_pressor(t, 2), *self.handoff(t, 2),
            *self.multiple_pressors(t, 3, " (vasopressin counts)"), *self.high_dose(t, 3),
            *self.hypoxia(t, ep), *self.organ(t, ep),
        ]


class Penn(LegacyCrs):
    """Penn / UPenn scale, Porter D et al. 2018 (grading-criteria §5)."""

    name = "penn"
    organ_based = True
    niv_grade = 3
    organ_min_grades: ClassVar[Mapping[str, int]] = {"ast": 3, "alt": 3, "bilirubin": 3}  # "grade 3 LFTs", grade 2 creatinine

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        super().__init__(tl, s)
        thr = tl.sbp_threshold(s)
        sbp = TimeIndex(tl.sbp, lambda m: m.time)
        self.bp_boluses = [b for b in tl.boluses
                           if any(m.value < thr and not tl.in_window(m.time) for m in sbp.between(b.start - H, b.start))]
        self._bolus_at = TimeIndex(self.bp_boluses, lambda b: b.start)
        self.coag = [d for d in tl.drugs if d.drug_class == "blood_product"] + [p for p in tl.procedures if p.kind == "transfusion_cryo"]
        self._coag_at = TimeIndex(self.coag, lambda c: c.start)
        self.iv_therapy = [d for d in tl.drugs if d.drug_class in s.penn_iv_therapy_classes]
        self._iv_at = TimeIndex(self.iv_therapy, lambda d: d.start)
        self._anc = TimeIndex(tl.labs.get("anc", []), lambda m: m.time)

    def change_points(self) -> Iterable[datetime]:
        yield from super().change_points()
        yield from (b.start for b in self.bp_boluses)
        yield from (c.start for c in self.coag)
        yield from (d.start for d in self.iv_therapy)

    def extra_abnormal(self) -> list[tuple[datetime, datetime | None, list[str]]]:
        out = super().extra_abnormal()
        fib = self.tl.labs.get("fibrinogen", [])
        for c in self.coag:
            recovered = next((m.time for m in fib if m.time > c.start and m.value >= self.s.fibrinogen_low), None)
            out.append((c.start, recovered or c.start, [c.ref]))
        return out

    def _anc_at(self, t: datetime) -> float | None:
        before = self._anc.between(t - 48 * H, t)
        if before:
            return before[-1].value
        after = [m for m in self._anc.between(t, t + 24 * H) if m.time > t]
        return after[0].value if after else None

    def components(self, t: datetime, ep: Episode) -> list[Criterion]:
        s, out = self.s, []
        for d in self._iv_at.exactly(t):
            if not ep.contains(t, self.tl):
                continue
            if d.drug_class == "iv_antibiotic":
                anc = self._anc_at(t)
                if d.route in ("IV", "") and anc is not None and anc < s.neutropenia_anc:
                    out.append(Criterion(t, 2, f"neutropenic fever (ANC {anc:g}/uL) treated with IV {d.drug}", [d.ref], ("penn_iv_therapy_classes", "neutropenia_anc")))
            elif d.route in ("IV", ""):
                out.append(Criterion(t, 2, f"IV therapy for CRS ({d.drug})", [d.ref], ("penn_iv_therapy_classes",)))
        in_ep = [b for b in self._bolus_at.between(ep.onset, t) if ep.contains(b.start, self.tl)] if self._bolus_at.exactly(t) else []
        if in_ep and in_ep[-1].start == t:
            if len(in_ep) >= 2:
                out.append(Criterion(t, 3, f"hypotension treated with multiple fluid boluses ({len(in_ep)})", [b.ref for b in in_ep], ("bolus_min_ml",)))
            else:
                out.append(Criterion(t, 2, "hypotension treated with one fluid bolus", [in_ep[0].ref], ("bolus_min_ml",)))
        out += self.single_pressor(t, 3, "hypotension treated with vasopressors")
        out += self.high_dose(t, 4)
        for c in self._coag_at.exactly(t):
            if ep.contains(t, self.tl):
                out.append(Criterion(t, 3, "coagulopathy requiring cryoprecipitate / FFP / fibrinogen", [c.ref]))
        out += self.any_o2(t, ep, 3)
        out += self.organ(t, ep, lee_style=False)
        return out


class Mskcc(LegacyCrs):
    """MSKCC scale, Park JH et al. 2018 (grading-criteria §6)."""

    name = "mskcc"

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        super().__init__(tl, s)
        self._cum_cache: dict[datetime, tuple[datetime | None, list[str]]] = {}

    def _pressor_24h_time(self, ep: Episode) -> tuple[datetime | None, list[str]]:
        """When the episode's cumulative vasopressor time reaches `mskcc_pressor_hours` (or None)."""
        if ep.onset not in self._cum_cache:
            need = timedelta(hours=self.s.mskcc_pressor_hours)
            total = timedelta(0)
            hit = None
            refs: list[str] = []
            for a, b, stretch in cumulative_pressor_time(self.tl, ep.onset - 24 * H, ep.end_bound(self.tl)):
                refs += stretch
                if total + (b - a) >= need:
                    hit = a + (need - total)
                    break
                total += b - a
            self._cum_cache[ep.onset] = (hit, refs)
        return self._cum_cache[ep.onset]

    def episode_points(self, ep: Episode) -> Iterable[datetime]:
        hit, _ = self._pressor_24h_time(ep)
        return (hit,) if hit is not None else ()

    def components(self, t: datetime, ep: Episode) -> list[Criterion]:
        out = self.single_pressor(t, 2, "vasopressor (< 24 h)")
        hit, refs = self._pressor_24h_time(ep)
        if hit is not None and hit <= t:
            out.append(Criterion(t, 3, f"vasopressors >= {self.s.mskcc_pressor_hours:g} h cumulative", refs, ("mskcc_pressor_hours",)))
        out += self.refractory_hypotension(t, 4, "hypotension refractory to high-dose vasopressors")
        out += self.hypoxia(t, ep)
        return out


class Cartox(LegacyCrs):
    """CARTOX (Neelapu 2018) for adults, PedsCARTOX (Mahadeo 2019) for patients < 18 y
    (grading-criteria §7.1, §8). The result says which variant was applied."""

    name = "cartox"
    organ_based = True

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        self.pediatric = tl.pediatric
        self.niv_grade = 3 if self.pediatric else None
        super().__init__(tl, s)
        self.result.extra["variant"] = "pediatric" if self.pediatric else "adult"
        if self.pediatric:
            need = timedelta(minutes=s.refractory_hypotension_min)
            low = low_sbp_intervals(tl, s)
            multi = self.multi  # every vasopressor, vasopressin included
            pairs = overlap_pairs([(la, lb) for la, lb, _ in low], [(ma, mb) for ma, mb, _, _ in multi], need)
            self.persistent: list[tuple[datetime, list[str]]] = [(a + need, low[i][2] + multi[j][3]) for i, j, a, _ in pairs]
            self._persistent_at = TimeIndex(self.persistent, lambda x: x[0])
        if tl.age_years is None:
            self.result.flag("age_unknown")

    def change_points(self) -> Iterable[datetime]:
        yield from super().change_points()
        if self.pediatric:
            yield from (t for t, _ in self.persistent)

    def components(self, t: datetime, ep: Episode) -> list[Criterion]:
        out = [*self.hypotension_event(t, 2), *self.single_pressor(t, 2), *self.handoff(t, 2)]
        out += self.multiple_pressors(t, 3, " (vasopressin counts)")
        out += self.high_dose(t, 3)
        if self.pediatric:
            out += [Criterion(t, 4, "persistent hypotension despite fluids and multiple vasopressors", refs, ("refractory_hypotension_min",))
                    for _, refs in self._persistent_at.exactly(t)]
        else:
            out += self.refractory_hypotension(t, 4, "life-threatening hypotension (refractory to high-dose vasopressors)")
        out += self.hypoxia(t, ep)
        out += self.organ(t, ep)
        return out


class Ctcae5(LegacyCrs):
    """CTCAE v5.0 'Cytokine release syndrome' (grading-criteria §9)."""

    name = "ctcae5"

    def components(self, t: datetime, ep: Episode) -> list[Criterion]:
        out = [*self.hypotension_event(t, 2), *self.single_pressor(t, 3, "hypotension managed with one pressor"), *self.handoff(t, 3)]
        out += self.multiple_pressors(t, 4, " (life-threatening; vasopressin counts)")
        out += self.hypoxia(t, ep)
        return out


def _run(cls: type[CrsGrader]):
    def grade(tl: CaseTimeline, s: GradingSettings):
        return cls(tl, s).grade()

    grade.__name__ = f"grade_{cls.name}"
    return grade


grade_lee2014 = _run(Lee2014)
grade_penn = _run(Penn)
grade_mskcc = _run(Mskcc)
grade_cartox = _run(Cartox)
grade_ctcae5 = _run(Ctcae5)
