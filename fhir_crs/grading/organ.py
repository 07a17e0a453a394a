"""CTCAE v5.0 grades of the organ-toxicity labs the older CRS systems use (grading-criteria §1.6):
creatinine (vs pre-infusion baseline and ULN), AST/ALT and total bilirubin (x ULN).

Each grade carries the settings that decided it (a default ULN; none when the lab sent its own
reference range) and the review flags of its reading: `organ_baseline_abnormal` (the pre-infusion
value is above ULN), `baseline_missing` (no pre-infusion creatinine: "x baseline" not applied),
`uln_default_pediatric` (a child graded against the default paediatric creatinine ULN) and
`unit_assumed` (the value, or its baseline, was sent without a unit).

Cost: O(n log n) for n lab values (one grade each, one sort, one backward pass)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from ..events import Measurement
from ..settings import GradingSettings
from ..timeline import CaseTimeline

ORGAN_LABS = ("creatinine", "ast", "alt", "bilirubin")
RATIO_DECIMALS = 6  # x ULN / x baseline are compared at this precision (float noise of unit conversions)
_RENAL_REPLACEMENT = re.compile(r"CRRT|CVV|dialys|h(a)?emofiltration|renal replacement", re.IGNORECASE)
_ULN_SETTING = {"creatinine": "uln_creatinine", "ast": "uln_ast", "alt": "uln_alt", "bilirubin": "uln_bilirubin"}


@dataclass(frozen=True, slots=True)
class OrganGrade:
    lab: str
    grade: int
    time: datetime
    ref: str
    text: str
    settings: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def transaminitis(self) -> bool:
        return self.lab in ("ast", "alt")


def ratio(value: float, ref: float | None) -> float:
    """value / ref rounded to RATIO_DECIMALS (0 without a reference), so that a value exactly at a
    threshold after a unit conversion (63 umol/L with ULN 21 = 3.0x) is not "> 3.0" (§1.6: every
    threshold is a strict "> k x"), as temperatures are compared after rounding (§1.2)."""
    return round(value / ref, RATIO_DECIMALS) if ref else 0.0


def unit_assumed(m: Measurement) -> bool:
    """Sent without a unit and read in the kind's canonical unit (the mapper's `unit_assumed`)."""
    return m.raw_unit == ""


def uln_source(tl: CaseTimeline, lab: str, m: Measurement, s: GradingSettings) -> tuple[float, tuple[str, ...], tuple[str, ...]]:
    """(ULN, settings that gave it, flags): the lab's own reference range (no setting), else the
    default of the setting; a child's creatinine against `uln_creatinine_child` is flagged
    `uln_default_pediatric` (the default is not age-specific: a reviewer checks it)."""
    if m.uln:
        return m.uln, (), ()
    if lab == "creatinine" and tl.pediatric:
        return s.uln_creatinine_child, ("uln_creatinine_child",), ("uln_default_pediatric",)
    name = _ULN_SETTING[lab]
    return getattr(s, name), (name,), ()


def baseline_measurement(tl: CaseTimeline, lab: str) -> Measurement | None:
    """The last value before the infusion (never a post-infusion value standing in)."""
    pre = [m for m in tl.labs.get(lab, []) if m.time < tl.infusion]
    return pre[-1] if pre else None


def baseline(tl: CaseTimeline, lab: str) -> float | None:
    m = baseline_measurement(tl, lab)
    return m.value if m is not None else None


def grade_lab(tl: CaseTimeline, lab: str, m: Measurement, s: GradingSettings, base: float | Measurement | None = None,
              base_known: bool = False) -> OrganGrade:
    """CTCAE grade of one value (§1.6, thresholds strict "> k x" on rounded ratios); pass the
    baseline (a value or the pre-infusion measurement) when it is already known. Creatinine
    without a looked-up baseline uses the last pre-infusion value.

    Baseline rule: creatinine is graded by ULN and by baseline; AST/ALT/bilirubin by ULN (the
    systems set aside a lab whose baseline is grade >= 2, LegacyCrs). A baseline above ULN
    (passed as a measurement) leaves that grading as it is and flags the reading
    `organ_baseline_abnormal`; a creatinine with no baseline whose ULN grade is below 3 (a
    baseline multiple could have raised it) is flagged `baseline_missing`."""
    if lab == "creatinine" and not base_known:
        base = baseline_measurement(tl, lab)
    base_m = base if isinstance(base, Measurement) else None
    base_v = base_m.value if base_m is not None else base
    uln, sets, flags = uln_source(tl, lab, m, s)
    x = ratio(m.value, uln)
    if unit_assumed(m) or (base_m is not None and unit_assumed(base_m) and lab == "creatinine"):
        flags += ("unit_assumed",)
    if lab == "creatinine":
        xb = ratio(m.value, base_v)
        by_uln = 4 if x > 6 else 3 if x > 3 else 2 if x > 1.5 else 1 if x > 1 else 0
        by_base = 3 if xb > 3 else 2 if xb > 1.5 else 0
        g = max(by_uln, by_base)
        if by_base > by_uln:
            sets = ()  # the baseline multiple alone gave the grade: no ULN decided it
        if not base_v and by_uln < 3:
            flags += ("baseline_missing",)
        text = f"creatinine {m.value:g} mg/dL ({x:.1f}x ULN" + (f", {xb:.2f}x baseline" if base_v else "") + f"): CTCAE grade {g}"
    elif lab in ("ast", "alt"):
        g = 4 if x > 20 else 3 if x > 5 else 2 if x > 3 else 1 if x > 1 else 0
        text = f"{lab.upper()} {m.value:g} U/L ({x:.1f}x ULN): CTCAE grade {g}"
    else:
        g = 4 if x > 10 else 3 if x > 3 else 2 if x > 1.5 else 1 if x > 1 else 0
        text = f"bilirubin {m.value:g} mg/dL ({x:.1f}x ULN): CTCAE grade {g}"
    if base_m is not None:
        b_uln, b_sets, _ = uln_source(tl, lab, base_m, s)
        if ratio(base_m.value, b_uln) > 1:
            flags += ("organ_baseline_abnormal",)
            sets += tuple(n for n in b_sets if n not in sets)  # the ULN that made the baseline abnormal
    return OrganGrade(lab, g, m.time, m.ref, text, sets, flags)


def organ_series(tl: CaseTimeline, s: GradingSettings) -> list[OrganGrade]:
    """Every post-infusion organ lab with its CTCAE grade, in time order."""
    out = []
    for lab in ORGAN_LABS:
        base = baseline_measurement(tl, lab)  # once per lab, not once per value
        for m in tl.labs.get(lab, []):
            if m.time >= tl.infusion:
                out.append(grade_lab(tl, lab, m, s, base, base_known=True))
    for p in tl.procedures:
        # Renal replacement is CTCAE acute kidney injury grade 4 ("dialysis indicated");
        # plasma exchange / cytokine adsorption for CRS itself is not renal failure.
        if p.kind == "blood_purification" and p.start >= tl.infusion and _RENAL_REPLACEMENT.search(p.text or ""):
            out.append(OrganGrade("creatinine", 4, p.start, p.ref, f"renal replacement therapy ({p.text}): CTCAE acute kidney injury grade 4"))
    return sorted(out, key=lambda o: o.time)


def organ_abnormal_intervals(series: list[OrganGrade], min_grade: int = 2, min_grades: Mapping[str, int] | None = None,
                             ) -> list[tuple[datetime, datetime | None, list[str]]]:
    """[lab >= its minimum grade, next value of the same lab below it) — open if it never improves.
    `min_grades` sets a lab's own minimum (the grade from which a system grades that lab, e.g.
    Penn: grade 3 LFTs); other labs use `min_grade`. One backward pass keeping each lab's next
    improved value: O(n)."""
    out = []
    improved: dict[str, datetime] = {}
    for o in reversed(series):
        if o.grade < (min_grades or {}).get(o.lab, min_grade):
            improved[o.lab] = o.time
        else:
            out.append((o.time, improved.get(o.lab), [o.ref]))
    out.reverse()
    return out
