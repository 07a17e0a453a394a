"""CTCAE v5.0 grades of the organ-toxicity labs the older CRS systems use (grading-criteria §1.6):
creatinine (vs pre-infusion baseline and ULN), AST/ALT and total bilirubin (x ULN).

Cost: O(n log n) for n lab values (one grade each, one sort, one backward pass)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from ..events import Measurement
from ..settings import GradingSettings
from ..timeline import CaseTimeline

ORGAN_LABS = ("creatinine", "ast", "alt", "bilirubin")
_RENAL_REPLACEMENT = re.compile(r"CRRT|CVV|dialys|h(a)?emofiltration|renal replacement", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class OrganGrade:
    lab: str
    grade: int
    time: datetime
    ref: str
    text: str

    @property
    def transaminitis(self) -> bool:
        return self.lab in ("ast", "alt")


def uln_for(tl: CaseTimeline, lab: str, m: Measurement, s: GradingSettings) -> float:
    if m.uln:
        return m.uln
    if lab == "creatinine":
        return s.uln_creatinine_child if tl.pediatric else s.uln_creatinine
    return {"ast": s.uln_ast, "alt": s.uln_alt, "bilirubin": s.uln_bilirubin}[lab]


def baseline(tl: CaseTimeline, lab: str) -> float | None:
    pre = [m for m in tl.labs.get(lab, []) if m.time < tl.infusion]
    return pre[-1].value if pre else None


def grade_lab(tl: CaseTimeline, lab: str, m: Measurement, s: GradingSettings, base: float | None = None,
              base_known: bool = False) -> OrganGrade:
    """CTCAE grade of one value; pass the creatinine baseline when it is already known."""
    uln = uln_for(tl, lab, m, s)
    x = m.value / uln if uln else 0.0
    if lab == "creatinine":
        if not base_known:
            base = baseline(tl, lab)
        xb = m.value / base if base else 0.0
        if x > 6:
            g = 4
        elif xb > 3 or x > 3:
            g = 3
        elif xb > 1.5 or x > 1.5:
            g = 2
        elif x > 1:
            g = 1
        else:
            g = 0
        text = f"creatinine {m.value:g} mg/dL ({x:.1f}x ULN" + (f", {xb:.2f}x baseline" if base else "") + f"): CTCAE grade {g}"
    elif lab in ("ast", "alt"):
        g = 4 if x > 20 else 3 if x > 5 else 2 if x > 3 else 1 if x > 1 else 0
        text = f"{lab.upper()} {m.value:g} U/L ({x:.1f}x ULN): CTCAE grade {g}"
    else:
        g = 4 if x > 10 else 3 if x > 3 else 2 if x > 1.5 else 1 if x > 1 else 0
        text = f"bilirubin {m.value:g} mg/dL ({x:.1f}x ULN): CTCAE grade {g}"
    return OrganGrade(lab, g, m.time, m.ref, text)


def organ_series(tl: CaseTimeline, s: GradingSettings) -> list[OrganGrade]:
    """Every post-infusion organ lab with its CTCAE grade, in time order."""
    out = []
    for lab in ORGAN_LABS:
        base = baseline(tl, lab)  # once per lab, not once per value
        for m in tl.labs.get(lab, []):
            if m.time >= tl.infusion:
                out.append(grade_lab(tl, lab, m, s, base, base_known=True))
    for p in tl.procedures:
        # Renal replacement is CTCAE acute kidney injury grade 4 ("dialysis indicated");
        # plasma exchange / cytokine adsorption for CRS itself is not renal failure.
        if p.kind == "blood_purification" and p.start >= tl.infusion and _RENAL_REPLACEMENT.search(p.text or ""):
            out.append(OrganGrade("creatinine", 4, p.start, p.ref, f"renal replacement therapy ({p.text}): CTCAE acute kidney injury grade 4"))
    return sorted(out, key=lambda o: o.time)


def organ_abnormal_intervals(series: list[OrganGrade], min_grade: int = 2) -> list[tuple[datetime, datetime | None, list[str]]]:
    """[lab >= min_grade, next value of the same lab <= grade 1) — open if it never improves.
    One backward pass keeping each lab's next improved value: O(n)."""
    out = []
    improved: dict[str, datetime] = {}
    for o in reversed(series):
        if o.grade < min_grade:
            improved[o.lab] = o.time
        else:
            out.append((o.time, improved.get(o.lab), [o.ref]))
    out.reverse()
    return out
