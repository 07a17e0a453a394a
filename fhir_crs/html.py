"""Stage 6 (reading): graded cases -> self-contained HTML for clinicians.

* `render_case_html(case)` — one CAR-T course on one page: the grade of every system as coloured
  bands over days from infusion, temperature, systolic BP, SpO2 with oxygen support,
  vasopressor infusions, CRS-directed drugs and procedures, cytokines, and below them the
  criteria with the resources behind them, the flags and the timeline.
* `render_report_html(report, cases, out_dir)` — the cohort table of `report.report_from_cases`
  (counts, %, the patients linked to their pages, the IL-6/IFN-γ correlation) as
  `out_dir/index.html`, and one page per patient in `out_dir/patients/<id>.html`.

Pages carry everything inline (CSS, SVG drawn here); no script, font, image or link leaves the
file, so a page can be mailed or archived with a chart. Grade bands: within each episode of a
system, grade g holds from the time its criterion was first met until the next higher
criterion, the episode's resolution, death or the end of the record; episodes the system did not
count (provisional: positive culture, late onset, post-CRS hyperinflammation) are drawn hatched.
The plotted series come from `grade --json --series` (`GradeRun.to_json(series=True)`); without
them the page shows the bands and the timeline only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from . import __version__
from .identity import Identity, ReportMeta, identities, patient_label
from .private import private_dir, write_private_text

__all__ = ["GRADE_COLOURS", "patient_file_name", "render_case_html", "render_patient_html", "render_report_html"]

GRADE_COLOURS = {0: "#f1f3f4", 1: "#ffe58a", 2: "#ffb347", 3: "#f0653a", 4: "#b3202a", 5: "#2b0a0d"}
GRADE_TEXT = {0: "#3c4043", 1: "#3c4043", 2: "#3c4043", 3: "#ffffff", 4: "#ffffff", 5: "#ffffff"}
CRS_ROWS = [("astct", "CRS · ASTCT"), ("lee2014", "CRS · Lee 2014"), ("penn", "CRS · Penn"),
            ("mskcc", "CRS · MSKCC"), ("cartox", "CRS · CARTOX"), ("ctcae5", "CRS · CTCAE v5")]
ICANS_ROWS = [("astct", "ICANS · ASTCT"), ("cartox_cres", "CRES · CARTOX")]
DEVICE_LABEL = {
    "nasal_cannula": "NC", "unspecified_o2": "O2", "blow_by": "blow-by", "face_mask": "mask",
    "venturi_mask": "Venturi", "high_flow_nasal_cannula": "HFNC", "non_rebreather": "NRB", "cpap": "CPAP",
    "bipap": "BiPAP", "noninvasive_ventilation": "NIV", "invasive_ventilation": "Ventilator",
}
DEVICE_COLOUR = {
    "nasal_cannula": "#9ecae1", "unspecified_o2": "#9ecae1", "blow_by": "#c6dbef", "face_mask": "#6baed6",
    "venturi_mask": "#6baed6", "high_flow_nasal_cannula": "#3182bd", "non_rebreather": "#2171b5",
    "cpap": "#6a51a3", "bipap": "#6a51a3", "noninvasive_ventilation": "#6a51a3", "invasive_ventilation": "#3f007d",
}
PRESSOR_COLOUR = {"norepinephrine": "#c0392b", "epinephrine": "#8e44ad", "dopamine": "#d35400",
                  "vasopressin": "#16a085", "phenylephrine": "#2c3e50"}
LAB_SERIES = [("il6", "IL-6", "pg/mL", "#b3202a"), ("ifn_gamma", "IFN-γ", "pg/mL", "#6a51a3"),
              ("crp", "CRP", "mg/L", "#e67e22"), ("ferritin", "ferritin", "ng/mL", "#7f8c8d")]
# one log panel per unit, so every axis has one unit
LAB_PANELS = [("Cytokines", ("il6", "ifn_gamma"), "pg/mL"), ("CRP", ("crp",), "mg/L"), ("Ferritin", ("ferritin",), "ng/mL"),
              ("ALT, AST", ("alt", "ast"), "U/L"), ("Bilirubin, creatinine", ("bilirubin", "creatinine"), "mg/dL")]
PEAK_UNITS = {"peak_il6": "pg/mL", "peak_ifn_gamma": "pg/mL", "peak_ferritin": "ng/mL"}
LIVER_SERIES = [("alt", "ALT", "U/L", "#00838f"), ("ast", "AST", "U/L", "#5e35b1"),
                ("bilirubin", "bilirubin", "mg/dL", "#ef6c00"), ("creatinine", "creatinine", "mg/dL", "#546e7a")]

CSS = """
:root { --ink:#202124; --muted:#5f6368; --line:#dadce0; --bg:#ffffff; --panel:#f8f9fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: var(--bg); margin: 0; padding: 20px 28px 40px; }
h1 { font-size: 21px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 26px 0 8px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: var(--muted); margin: 0 0 14px; }
a { color: #1a57c4; text-decoration: none; } a:hover { text-decoration: underline; }
.badges { display: flex; flex-wrap: wrap; gap: 8px; margin: 10px 0 6px; }
.badge { border-radius: 6px; padding: 5px 10px; font-weight: 600; border: 1px solid rgba(0,0,0,.08); }
.badge small { font-weight: 400; opacity: .85; }
.facts { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 8px 0 0; color: var(--muted); }
.facts b { color: var(--ink); }
.chart { width: 100%; overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; background: #fff; margin-top: 12px; }
.chart svg { display: block; min-width: 1100px; width: 100%; height: auto; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; }
td.when { white-space: nowrap; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--panel); font-weight: 600; font-size: 13px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.refs { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; color: var(--muted); word-break: break-all; }
.flag { display: inline-block; background: #fde7e9; color: #8a1c24; border-radius: 4px; padding: 0 6px; margin: 1px 3px 1px 0; font-size: 12px; }
.grade { display: inline-block; min-width: 22px; text-align: center; border-radius: 4px; padding: 0 5px; font-weight: 700; }
.legend { display: flex; flex-wrap: wrap; gap: 10px 16px; color: var(--muted); font-size: 12px; margin: 8px 2px 0; }
.legend span i { display: inline-block; width: 14px; height: 10px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.note { color: var(--muted); font-size: 12px; }
.meta { color: var(--muted); font-size: 12px; margin: 0 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
.empty { background: #fff8e1; border: 1px solid #ffe58a; border-radius: 6px; padding: 10px 14px; }
details { margin: 6px 0; } summary { cursor: pointer; color: var(--muted); }
.cohort td.patients a { margin-right: 6px; white-space: nowrap; }
a.label { white-space: nowrap; }
.yes { color: #b3202a; font-weight: 700; } .no { color: #9aa0a6; }
@media print { body { padding: 0; } .chart { border: none; } }
"""


# ---- small helpers ---------------------------------------------------------------------------


def _e(v: Any) -> str:
    return escape(str(v), quote=True)


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if not float(v).is_integer() else str(int(v))


def _parse(t: str | None) -> datetime | None:
    return None if not t else datetime.fromisoformat(t.replace("Z", "+00:00"))


def _hour(case: dict[str, Any], iso: str | None) -> float | None:
    t, t0 = _parse(iso), _parse(case.get("infusion"))
    return None if t is None or t0 is None else (t - t0).total_seconds() / 3600


def _hs(h: float) -> str:
    """Signed hours from day 0, one decimal: `+24`, `-24` (never `+-24`)."""
    v = round(float(h), 1)
    return ("-" if v < 0 else "+") + _f(abs(v))


def _day(h: float | None) -> str:
    if h is None:
        return "–"
    return f"D{math.floor(h / 24)} ({_hs(h)} h)"


# what a clinician reads for the drug classes of mappings/medications.toml (and the timeline's event kinds)
DRUG_CLASS_NAMES = {
    "cart_product": "CAR-T product", "anti_il6": "anti-IL-6 (tocilizumab, siltuximab)",
    "anti_cytokine": "other anti-cytokine (e.g. anakinra)", "corticosteroid": "corticosteroid",
    "vasopressor": "vasopressor", "inotrope": "inotrope", "antipyretic": "antipyretic",
    "iv_antibiotic": "IV antibiotic", "fluid": "fluid bolus", "blood_product": "blood product", "sedative": "sedative",
}
EVENT_NAMES = {**DRUG_CLASS_NAMES, "fluid_bolus": "fluid bolus", "anti_il6": "anti-IL-6 therapy",
               "anti_cytokine": "anti-cytokine therapy", "car_t_infusion": "CAR-T infusion"}


def drug_class_name(cls: str) -> str:
    return DRUG_CLASS_NAMES.get(cls, cls.replace("_", " "))


def event_name(kind: str) -> str:
    return EVENT_NAMES.get(kind, kind.replace("_", " "))


def _setting_value(value: Any) -> str:
    """A convention's value as a person reads it: lists of drug classes by their names."""
    if isinstance(value, list | tuple):
        return ", ".join(drug_class_name(str(v)) for v in value) or "none"
    return str(value)


def _grade_chip(g: int | None) -> str:
    g = int(g or 0)
    return f'<span class="grade" style="background:{GRADE_COLOURS[min(g, 5)]};color:{GRADE_TEXT[min(g, 5)]}">{g}</span>'


def patient_file_name(patient: str) -> str:
    """`Patient/abc` -> `abc.html` (characters outside FHIR ids replaced)."""
    pid = patient.split("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.\-]", "_", pid) + ".html"


def _page(title: str, body: str, meta: str | None = None) -> str:
    """A whole page; `meta` is the report line (date, data source, fhir-crs version) shown on top."""
    about = meta or f"fhir-crs {__version__}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<p class=\"meta\">{_e(about)}</p>\n{body}\n"
            "<p class=\"note\">Generated by fhir-crs from FHIR R4 data. Machine-derived grades for clinical review; "
            "grade 5 is a candidate for adjudication, never final.</p>\n</body>\n</html>\n")


# ---- grade bands -----------------------------------------------------------------------------


def grade_bands(case: dict[str, Any], result: dict[str, Any], end_h: float) -> list[tuple[float, float, int, bool]]:
    """(start h, end h, grade, counted) bands of one system result."""
    bands: list[tuple[float, float, int, bool]] = []
    criteria = sorted(result.get("criteria") or [], key=lambda c: c.get("hour") or 0)
    for ep in result.get("episodes") or []:
        onset = _hour(case, ep.get("onset"))
        if onset is None:
            continue
        stop = _hour(case, ep.get("resolved"))
        stop = end_h if stop is None else stop
        steps = [(c["hour"], int(c["grade"])) for c in criteria
                 if c.get("hour") is not None and onset - 1e-6 <= c["hour"] <= stop + 1e-6]
        if not steps or steps[0][0] > onset + 1e-6:
            steps.insert(0, (onset, 1))
        # criteria record each new maximum; keep the running maximum, one band per change
        cur_g, cur_t = 0, onset
        for t, g in steps:
            if g > cur_g:
                if cur_g:
                    bands.append((cur_t, t, cur_g, bool(ep.get("counted", True))))
                cur_g, cur_t = g, t
        if cur_g == 5:
            # grade 5 is an instant (death): drawn as a short block from the time of death
            bands.append((cur_t, cur_t + 3.0, 5, bool(ep.get("counted", True))))
        elif cur_g and stop > cur_t:
            bands.append((cur_t, stop, min(cur_g, int(ep.get("grade") or cur_g)) if cur_g > int(ep.get("grade") or 0) else cur_g,
                          bool(ep.get("counted", True))))
        elif cur_g:
            bands.append((cur_t, cur_t + 0.5, cur_g, bool(ep.get("counted", True))))
    return bands


# ---- the SVG chart ---------------------------------------------------------------------------


class _Svg:
    def __init__(self, h0: float, h1: float, left: int = 170, width: int = 1180):
        self.h0, self.h1, self.left, self.width = h0, h1, left, width
        self.parts: list[str] = []
        self.y = 30

    def x(self, h: float) -> float:
        return round(self.left + (min(max(h, self.h0), self.h1) - self.h0) / (self.h1 - self.h0) * self.width, 1)

    def add(self, s: str) -> None:
        self.parts.append(s)

    def label(self, y: float, text: str, sub: str = "", colour: str = "#202124") -> None:
        self.add(f'<text x="{self.left - 10}" y="{y}" text-anchor="end" font-size="12" fill="{colour}">{_e(text)}</text>')
        if sub:
            self.add(f'<text x="{self.left - 10}" y="{y + 13}" text-anchor="end" font-size="10" fill="#5f6368">{_e(sub)}</text>')

    def title(self, text: str) -> str:
        return f"<title>{_e(text)}</title>"


def _extent(case: dict[str, Any]) -> tuple[float, float]:
    hours: list[float] = [0.0]
    s = case.get("series") or {}
    for key in ("temperature", "sbp", "spo2"):
        hours += [p["hour"] for p in s.get(key, [])]
    for k in ("o2_support", "vasopressors", "procedures"):
        for seg in s.get(k, []):
            hours += [seg.get("start", 0.0), seg.get("end") or seg.get("start", 0.0)]
    hours += [d["hour"] for d in s.get("drugs", [])]
    hours += [e["hour"] for e in case.get("timeline") or []]
    for fam in ("crs", "icans"):
        for r in (case.get(fam) or {}).values():
            for k in ("onset", "resolved", "max_at"):
                h = (r.get("hours") or {}).get(k)
                if h is not None:
                    hours.append(h)
    lo = max(min(hours), -48.0)
    hi = max(hours) + 4
    lo = math.floor(lo / 24) * 24 if lo < 0 else 0
    hi = max(math.ceil(hi / 24) * 24, 72)
    return float(lo), float(hi)


def _death_hour(case: dict[str, Any]) -> float | None:
    return _hour(case, (case.get("facts") or {}).get("deceased"))


def _line_panel(svg: _Svg, series: list[tuple[list[dict[str, Any]], str]], height: int, lo: float, hi: float,
                label: str, unit: str, threshold: float | None = None, threshold_label: str = "",
                bad: Any = None, log: bool = False, tick_unit: str | None = None) -> None:
    """One plot panel: background, y ticks (with the unit), optional threshold line, then each
    (points, colour) series."""
    tick_unit = unit if tick_unit is None else tick_unit
    top, bottom = svg.y, svg.y + height

    def y(v: float) -> float:
        if log:
            v, a, b = math.log10(max(v, 1e-3)), math.log10(lo), math.log10(hi)
        else:
            a, b = lo, hi
        v = min(max(v, a), b)
        return round(bottom - (v - a) / (b - a) * height, 1)

    svg.add(f'<rect x="{svg.left}" y="{top}" width="{svg.width}" height="{height}" fill="#fbfbfc" stroke="#e3e5e8"/>')
    svg.label(top + 14, label, unit)
    ticks = nice_ticks(lo, hi, max(2, height // 24)) if not log else [10 ** k for k in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
    for t in ticks:
        ty = y(t)
        svg.add(f'<line x1="{svg.left}" x2="{svg.left + svg.width}" y1="{ty}" y2="{ty}" stroke="#e3e5e8"/>')
        svg.add(f'<text class="tick" x="{svg.left + 4}" y="{min(max(ty + 4, top + 11), bottom - 2)}" font-size="11" fill="#3c4043" '
                f'stroke="#fbfbfc" stroke-width="3" paint-order="stroke">{_f(t) if not log else f"{t:g}"} {_e(tick_unit)}</text>')
    if threshold is not None:
        ty = y(threshold)
        svg.add(f'<line x1="{svg.left}" x2="{svg.left + svg.width}" y1="{ty}" y2="{ty}" stroke="#b3202a" stroke-dasharray="5 4" stroke-width="1"/>')
        svg.add(f'<text x="{svg.left + svg.width - 4}" y="{ty - 3}" text-anchor="end" font-size="10" fill="#b3202a">{_e(threshold_label)}</text>')
    for points, colour in series:
        pts = sorted(points, key=lambda p: p["hour"])
        if len(pts) > 1:
            path = " ".join(f"{svg.x(p['hour'])},{y(p['value'])}" for p in pts)
            svg.add(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.4" stroke-linejoin="round"/>')
        for p in pts:
            is_bad = bool(bad and bad(p["value"]))
            r = 3.0 if is_bad else 2.0
            fill = "#b3202a" if is_bad else colour
            tip = f"{_hs(p['hour'])} h: {_f(p['value'])} {p.get('unit', unit)}" + (f" — {p['ref']}" if p.get("ref") else "")
            svg.add(f'<circle cx="{svg.x(p["hour"])}" cy="{y(p["value"])}" r="{r}" fill="{fill}">{svg.title(tip)}</circle>')
    svg.y = bottom + 14


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 × 10^k) covering [lo, hi], about `target` of them."""
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    t = first
    while t <= hi + step * 1e-9:
        out.append(round(t, 10))
        t += step
    return out


def _merge_support(segs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Contiguous rows of one device drawn as one bar (FiO2 / flow shown as a range)."""
    out: list[dict[str, Any]] = []
    for g in sorted(segs, key=lambda g: g["start"]):
        last = out[-1] if out else None
        if last and last["device"] == g["device"] and g["start"] - last["end"] <= 0.25 and last["home"] == g.get("home") \
                and last["attributed"] == g.get("attributed", True):
            last["end"] = max(last["end"], g["end"])
            for k in ("flow", "fio2"):
                if g.get(k) is not None:
                    last[k + "s"].append(g[k])
            continue
        out.append({"start": g["start"], "end": g["end"], "device": g.get("device", ""), "home": g.get("home"),
                    "attributed": g.get("attributed", True), "text": g.get("text"),
                    "flows": [g["flow"]] if g.get("flow") is not None else [],
                    "fio2s": [g["fio2"]] if g.get("fio2") is not None else []})
    return out


def _range(values: list[float], unit: str) -> str:
    if not values:
        return ""
    a, b = values[0], values[-1]
    lo, hi = min(values), max(values)
    if lo == hi:
        return f" {_f(lo)}{unit}"
    return f" {_f(a)}→{_f(b)}{unit}" if (a, b) in ((hi, lo), (lo, hi)) else f" {_f(lo)}–{_f(hi)}{unit}"


def _bar(svg: _Svg, a: float, b: float, y: float, h: float, fill: str, text: str, tip: str,
         text_colour: str = "#ffffff", pattern: bool = False) -> None:
    x1, x2 = svg.x(a), svg.x(b)
    w = max(x2 - x1, 2.0)
    fill_attr = "url(#hatch)" if pattern else fill
    svg.add(f'<rect x="{x1}" y="{y}" width="{round(w, 1)}" height="{h}" rx="2" fill="{fill_attr}" '
            f'stroke="{fill}" stroke-width="{1 if pattern else 0}">{svg.title(tip)}</rect>')
    if text and w > 7 * len(text) * 0.62:
        svg.add(f'<text x="{x1 + 4}" y="{y + h - 4}" font-size="10" fill="{text_colour}" pointer-events="none">{_e(text)}</text>')


def _sbp_threshold(case: dict[str, Any]) -> float:
    for e in case.get("timeline") or []:
        m = re.search(r"< (\d+(?:\.\d+)?) mmHg", e.get("detail", "")) if e["kind"] == "hypotension" else None
        if m:
            return float(m.group(1))
    age = case.get("age_years")
    if age is None or age > 10:
        return 90.0
    return 70.0 if age < 1 else 70.0 + 2 * age


def _log_lab_panel(svg: _Svg, labs: dict[str, Any], wanted: list[tuple[str, str, str, str]], h0: float, h1: float,
                   height: int, title: str, subtitle: str) -> None:
    """One log-scale panel of the lab series in `wanted` that the case has, with a peak legend."""
    present = [(k, name, unit, colour) for k, name, unit, colour in wanted if labs.get(k)]
    if not present:
        return
    y0 = svg.y
    values = [p["value"] for k, *_ in present for p in labs[k] if p["value"] > 0]
    lo = 10 ** math.floor(math.log10(max(min(values), 0.1))) if values else 1
    hi = 10 ** math.ceil(math.log10(max(values))) if values else 10
    hi = max(hi, lo * 100)
    series = [([dict(p, unit=unit) for p in labs[k] if h0 <= p["hour"] <= h1], colour) for k, _, unit, colour in present]
    svg.y += 16
    _line_panel(svg, series, height, lo, hi, title, subtitle, log=True, tick_unit=present[0][2])
    legend_x = svg.left + 4
    for k, name, unit, colour in present:
        peak = max(labs[k], key=lambda p: p["value"])
        text = f"{name} (peak {_f(peak['value'])} {unit})"
        svg.add(f'<rect x="{legend_x}" y="{y0 + 1}" width="10" height="10" fill="{colour}"/>'
                f'<text x="{legend_x + 14}" y="{y0 + 10}" font-size="10" fill="#3c4043">{_e(text)}</text>')
        legend_x += 22 + 5.6 * len(text)


def render_chart(case: dict[str, Any]) -> str:
    """The inline SVG of one case."""
    h0, h1 = _extent(case)
    svg = _Svg(h0, h1)
    s = case.get("series") or {}
    death = _death_hour(case)
    end_h = death if death is not None else h1

    # grade bands
    svg.add('<text x="10" y="18" font-size="12" font-weight="600" fill="#202124">Grades over time</text>')
    rows = [("crs", k, label) for k, label in CRS_ROWS] + [("icans", k, label) for k, label in ICANS_ROWS]
    for fam, key, label in rows:
        r = (case.get(fam) or {}).get(key)
        if r is None:
            continue
        y = svg.y
        if key == "cartox" and r.get("variant") == "pediatric":
            label = "CRS · PedsCARTOX"
        svg.add(f'<rect x="{svg.left}" y="{y}" width="{svg.width}" height="16" fill="{GRADE_COLOURS[0]}"/>')
        svg.label(y + 12, f"{label}  {r.get('grade', 0)}")
        for a, b, g, counted in grade_bands(case, r, end_h):
            tip = f"{label}: grade {g} from {_hs(a)} h to {_hs(b)} h" + ("" if counted else " (provisional episode, not counted)")
            _bar(svg, a, b, y, 16, GRADE_COLOURS[min(g, 5)], f"{g}", tip, GRADE_TEXT[min(g, 5)], pattern=not counted)
        svg.y = y + 19
    svg.y += 10

    temps = s.get("temperature") or []
    if temps:
        hi = max(41.0, max(p["value"] for p in temps) + 0.3)
        _line_panel(svg, [([p for p in temps if h0 <= p["hour"] <= h1], "#e67e22")], 110, 35.0, hi, "Temperature", "°C",
                    38.0, "38.0 °C fever", bad=lambda v: v >= 38.0)
    sbp = s.get("sbp") or []
    if sbp:
        thr = _sbp_threshold(case)
        lo = min(40.0, min(p["value"] for p in sbp) - 5)
        hi = max(150.0, max(p["value"] for p in sbp) + 5)
        _line_panel(svg, [([p for p in sbp if h0 <= p["hour"] <= h1], "#1a57c4")], 100, lo, hi, "Systolic BP", "mmHg",
                    thr, f"{_f(thr)} mmHg (age threshold)", bad=lambda v: v < thr)
    spo2 = s.get("spo2") or []
    if spo2:
        lo = min(80.0, min(p["value"] for p in spo2) - 2)
        _line_panel(svg, [([p for p in spo2 if h0 <= p["hour"] <= h1], "#0f9d58")], 70, lo, 100.0, "SpO2", "%",
                    90.0, "90 %", bad=lambda v: v < 90)

    # oxygen support
    support = s.get("o2_support")
    if support is None:
        support = [{"start": e["hour"], "end": e["hour"] + 1, "device": "unspecified_o2", "flow": None, "fio2": None,
                    "home": False, "attributed": True, "text": e["detail"]}
                   for e in case.get("timeline") or [] if e["kind"] == "respiratory_support"]
    y = svg.y
    svg.label(y + 13, "O2 support")
    svg.add(f'<rect x="{svg.left}" y="{y}" width="{svg.width}" height="18" fill="#fbfbfc" stroke="#e3e5e8"/>')
    for g in _merge_support(support):
        dev = g.get("device", "")
        txt = DEVICE_LABEL.get(dev, dev) + _range(g["flows"], " L/min") + (" FiO2" if g["fio2s"] else "") + _range(g["fio2s"], "%")
        note = " (home/baseline)" if g.get("home") else "" if g.get("attributed", True) else " (not attributed to CRS)"
        tip = f"{g.get('text') or dev.replace('_', ' ')}: {_hs(g['start'])} to {_hs(g['end'])} h — {txt}{note}"
        _bar(svg, g["start"], g["end"], y + 1, 16, DEVICE_COLOUR.get(dev, "#9ecae1"), txt, tip,
             "#ffffff" if dev in ("invasive_ventilation", "high_flow_nasal_cannula", "non_rebreather", "cpap", "bipap") else "#202124",
             pattern=bool(g.get("home")))
    svg.y = y + 26

    # vasopressors
    pressors = s.get("vasopressors")
    if pressors is None:
        pressors = []
        for e in case.get("timeline") or []:
            if e["kind"] == "vasopressor":
                m = re.match(r"(.+?) until \+([\d.]+) h", e["detail"])
                if m:
                    pressors.append({"drug": m.group(1), "start": e["hour"], "end": float(m.group(2)), "rates": []})
    drugs = sorted({p["drug"] for p in pressors}, key=lambda d: min(p["start"] for p in pressors if p["drug"] == d))
    if drugs:
        for d in drugs:
            y = svg.y
            svg.label(y + 12, d.capitalize())
            for p in [p for p in pressors if p["drug"] == d]:
                rates = []
                for r in p.get("rates") or []:
                    if r.get("ug_kg_min") is not None:
                        rates.append(f"{_hs(r['hour'])} h {r['ug_kg_min']:g} µg/kg/min")
                    elif r.get("ug_min") is not None:
                        rates.append(f"{_hs(r['hour'])} h {_f(round(r['ug_min'], 1))} µg/min")
                    elif r.get("u_min") is not None:
                        rates.append(f"{_hs(r['hour'])} h {r['u_min']:g} U/min")
                tip = f"{d} {_hs(p['start'])} to {_hs(p['end'])} h" + (": " + "; ".join(rates) if rates else "")
                first = p["rates"][0] if p.get("rates") else {}
                txt = (f"{first['ug_kg_min']:g} µg/kg/min" if first.get("ug_kg_min") is not None else
                       f"{_f(round(first['ug_min'], 1))} µg/min" if first.get("ug_min") is not None else "")
                _bar(svg, p["start"], p["end"], y, 15, PRESSOR_COLOUR.get(d, "#c0392b"), txt, tip)
            svg.y = y + 19
    else:
        svg.label(svg.y + 12, "Vasopressors")
        svg.add(f'<text x="{svg.left + 4}" y="{svg.y + 12}" font-size="11" fill="#9aa0a6">none</text>')
        svg.y += 19
    svg.y += 6

    # drugs and procedures
    drug_rows = [
        ("Tocilizumab / anti-cytokine", ("anti_il6", "anti_cytokine"), "#b3202a", "tri"),
        ("Corticosteroids", ("corticosteroid",), "#6a51a3", "dot"),
        ("Fluid bolus", ("fluid",), "#1a57c4", "dia"),
        ("Antipyretic", ("antipyretic",), "#e67e22", "tick"),
        ("IV antibiotic", ("iv_antibiotic",), "#5f6368", "tick"),
    ]
    given = s.get("drugs")
    if given is None:
        given = [{"hour": e["hour"], "drug": e["detail"], "class": {"fluid_bolus": "fluid"}.get(e["kind"], e["kind"]),
                  "ref": (e.get("evidence") or [""])[0]}
                 for e in case.get("timeline") or [] if e["kind"] in ("anti_il6", "anti_cytokine", "corticosteroid",
                                                                      "antipyretic", "fluid_bolus")]
    for label, classes, colour, shape in drug_rows:
        items = [d for d in given if d.get("class") in classes and h0 <= d["hour"] <= h1]
        if not items and classes[0] in ("iv_antibiotic", "antipyretic"):
            continue
        y = svg.y
        svg.label(y + 11, label)
        svg.add(f'<line x1="{svg.left}" x2="{svg.left + svg.width}" y1="{y + 7}" y2="{y + 7}" stroke="#eceef0"/>')
        for d in items:
            x = svg.x(d["hour"])
            tip = f"{d['drug']} at {_hs(d['hour'])} h" + (f" — {d['ref']}" if d.get("ref") else "")
            if shape == "tri":
                mark = f'<path d="M{x} {y} L{x + 6} {y + 13} L{x - 6} {y + 13} Z" fill="{colour}">'
            elif shape == "dot":
                mark = f'<circle cx="{x}" cy="{y + 7}" r="4.5" fill="{colour}">'
            elif shape == "dia":
                mark = f'<path d="M{x} {y} L{x + 6} {y + 7} L{x} {y + 14} L{x - 6} {y + 7} Z" fill="{colour}">'
            else:
                mark = f'<rect x="{x - 1}" y="{y + 1}" width="2.5" height="12" fill="{colour}">'
            svg.add(mark + svg.title(tip) + ("</path>" if shape in ("tri", "dia") else "</circle>" if shape == "dot" else "</rect>"))
        svg.y = y + 19
    procs = [p for p in s.get("procedures") or [] if p.get("kind") not in ("car_t_infusion",)]
    if not s:
        procs = [{"start": e["hour"], "end": None, "kind": e["kind"], "text": e["detail"], "ref": (e.get("evidence") or [""])[0]}
                 for e in case.get("timeline") or [] if e["kind"] in ("intubation", "blood_purification", "ecmo", "icu_admission", "extubation")]
    # ventilation is drawn on the O2 row; this row keeps purification/ECMO and the point events
    procs = [p for p in procs if p["kind"] != "invasive_ventilation"]
    intervals = [p for p in procs if p.get("end") is not None and p["kind"] in ("blood_purification", "ecmo")]
    points = [p for p in procs if p not in intervals and p["kind"] in ("intubation", "extubation", "icu_admission", "blood_purification", "ecmo")]
    if procs:
        y = svg.y
        svg.label(y + 12, "Procedures")
        svg.add(f'<rect x="{svg.left}" y="{y}" width="{svg.width}" height="17" fill="#fbfbfc" stroke="#e3e5e8"/>')
        for p in intervals:
            short = {"blood_purification": "CRRT" if "renal" in p["text"].lower() or "crrt" in p["text"].lower() else "Plasma exchange" if "plasma" in p["text"].lower() else "Blood purification",
                     "ecmo": "ECMO"}[p["kind"]]
            _bar(svg, p["start"], p["end"], y + 1, 15, "#00695c", short,
                 f"{p['text']}: {_hs(p['start'])} to {_hs(p['end'])} h — {p.get('ref', '')}")
        for p in points:
            x = svg.x(p["start"])
            label = {"intubation": "intubated", "extubation": "extubated", "icu_admission": "ICU",
                     "blood_purification": "purification", "ecmo": "ECMO"}[p["kind"]]
            svg.add(f'<line x1="{x}" x2="{x}" y1="{y - 2}" y2="{y + 19}" stroke="#00695c" stroke-width="2">'
                    f'{svg.title(p["text"] + " at " + _hs(p["start"]) + " h — " + str(p.get("ref", "")))}</line>')
            svg.add(f'<text x="{x + 3}" y="{y + 12}" font-size="10" fill="#00695c">{_e(label)}</text>')
        svg.y = y + 27

    # cytokines and inflammatory markers, then liver/kidney labs (log scale)
    labs = s.get("labs") or {}
    for title, keys, unit in LAB_PANELS:
        wanted = [row for row in (*LAB_SERIES, *LIVER_SERIES) if row[0] in keys]
        _log_lab_panel(svg, labs, wanted, h0, h1, 70, title, f"{unit}, log scale")

    # day grid, axis, death marker (drawn last, over the panels)
    top, bottom = 24, svg.y
    grid = []
    d = math.ceil(h0 / 24)
    while d * 24 <= h1:
        x = svg.x(d * 24)
        grid.append(f'<line x1="{x}" x2="{x}" y1="{top}" y2="{bottom}" stroke="#5f6368" stroke-opacity="{0.55 if d == 0 else 0.12}" '
                    f'stroke-width="{1.5 if d == 0 else 1}"/>')
        grid.append(f'<text x="{x}" y="{bottom + 14}" text-anchor="middle" font-size="11" fill="#3c4043">D{d}</text>')
        d += 1
    grid.append(f'<text x="{svg.left + svg.width}" y="{bottom + 28}" text-anchor="end" font-size="10" fill="#5f6368">days from CAR-T infusion (D0 = infusion)</text>')
    if death is not None:
        x = svg.x(death)
        grid.append(f'<line x1="{x}" x2="{x}" y1="{top}" y2="{bottom}" stroke="#000" stroke-width="2"/>'
                    f'<text x="{x - 4}" y="{top + 8}" text-anchor="end" font-size="11" font-weight="700" fill="#000">death</text>')
    height = bottom + 36
    defs = ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
            '<rect width="6" height="6" fill="#ffffff"/><line x1="0" y1="0" x2="0" y2="6" stroke="#9aa0a6" stroke-width="3"/></pattern></defs>')
    total_w = svg.left + svg.width + 20
    return (f'<svg viewBox="0 0 {total_w} {height}" role="img" aria-label="Clinical course and grades over time">'
            + defs + "".join(svg.parts) + "".join(grid) + "</svg>")


# ---- page sections ---------------------------------------------------------------------------


def _facts_line(case: dict[str, Any]) -> str:
    f = case.get("facts") or {}
    items = []
    if case.get("age_years") is not None:
        items.append(f"age <b>{case['age_years']} y</b>")
    if f.get("weight_kg") is not None:
        items.append(f"weight <b>{_f(f['weight_kg'])} kg</b>")
    items.append(f"infusion <b>{_e(case.get('infusion'))}</b>")
    yes = [("haemodynamic_instability", "haemodynamic instability"), ("vasopressors", "vasopressors"),
           ("mechanical_ventilation", "invasive ventilation")]
    for key, label in yes:
        if f.get(key):
            items.append(f'<b class="yes">{label}</b>')
    for key, label in (("tocilizumab", "tocilizumab"), ("corticosteroids", "corticosteroids"), ("blood_purification", "blood purification")):
        if f.get(key):
            items.append(f"{label} <b>×{len(f[key])}</b>")
    if f.get("liver_injury_grade"):
        items.append(f"liver injury <b>CTCAE {f['liver_injury_grade']}</b>")
    for key, label in (("peak_il6", "peak IL-6"), ("peak_ifn_gamma", "peak IFN-γ"), ("peak_ferritin", "peak ferritin")):
        p = f.get(key)
        if p:
            items.append(f"{label} <b>{_f(p['value'])} {_e(p.get('unit') or '')}</b>")
    if f.get("died"):
        items.append(f'<b class="yes">died {_e(f.get("deceased") or "")}</b>')
    return '<div class="facts">' + "".join(f"<span>{i}</span>" for i in items) + "</div>"


def _badges(case: dict[str, Any]) -> str:
    out = []
    for fam, rows in (("crs", CRS_ROWS), ("icans", ICANS_ROWS)):
        for key, label in rows:
            r = (case.get(fam) or {}).get(key)
            if r is None:
                continue
            g = int(r.get("grade") or 0)
            if key == "cartox" and r.get("variant") == "pediatric":
                label = "CRS · PedsCARTOX"
            out.append(f'<span class="badge" style="background:{GRADE_COLOURS[min(g, 5)]};color:{GRADE_TEXT[min(g, 5)]}">'
                       f'{_e(label)} <b>{g}</b></span>')
    return '<div class="badges">' + "".join(out) + "</div>"


def _results_table(case: dict[str, Any]) -> str:
    rows = []
    for fam, table in (("crs", CRS_ROWS), ("icans", ICANS_ROWS)):
        for key, label in table:
            r = (case.get(fam) or {}).get(key)
            if r is None:
                continue
            hrs = r.get("hours") or {}
            flags = "".join(f'<span class="flag">{_e(x)}</span>' for x in r.get("flags") or [])
            rows.append(f"<tr><td class=\"when\">{_e(label)}</td><td>{_grade_chip(r.get('grade'))}</td><td class=\"when\">{_day(hrs.get('onset'))}</td>"
                        f"<td class=\"when\">{_day(hrs.get('max_at'))}</td><td class=\"when\">{_day(hrs.get('resolved'))}</td><td>{flags}</td>"
                        f"<td class=\"refs\">{_e(', '.join(r.get('evidence') or []))}</td></tr>")
    return ("<table><thead><tr><th>System</th><th>Grade</th><th>Onset</th><th>Max at</th><th>Resolved</th>"
            "<th>Flags</th><th>Evidence</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _criteria(case: dict[str, Any]) -> str:
    parts = []
    for fam, table in (("crs", CRS_ROWS), ("icans", ICANS_ROWS)):
        for key, label in table:
            r = (case.get(fam) or {}).get(key)
            if not r or not r.get("criteria"):
                continue
            items = "".join(
                f"<tr><td class=\"num\">{_day(c.get('hour'))}</td><td>{_grade_chip(c.get('grade'))}</td>"
                f"<td>{_e(c.get('criterion'))}</td><td class=\"refs\">{_e(', '.join(c.get('evidence') or []))}</td></tr>"
                for c in r["criteria"])
            conv = "; ".join(f"{c['setting']} = {_setting_value(c['value'])}" for c in r.get("conventions") or [])
            parts.append(f"<h3>{_e(label)} — grade {r.get('grade', 0)}</h3><table><thead><tr><th class=\"num\">When</th>"
                         f"<th>Grade</th><th>Criterion met</th><th>Resources</th></tr></thead><tbody>{items}</tbody></table>"
                         + (f'<p class="note">Conventions: {_e(conv)}</p>' if conv else ""))
    return "".join(parts) or '<p class="note">No criterion met under any system.</p>'


def _adjacent(case: dict[str, Any]) -> str:
    a = case.get("adjacent") or {}
    out = []
    if "carhlh" in a:
        out.append(f"carHLH: <b>{'met' if a['carhlh'].get('met') else 'not met'}</b>")
    if "iec_hs" in a:
        i = a["iec_hs"]
        out.append("IEC-HS screen: <b>" + ("suspected" + (f", provisional grade {i['grade']}" if i.get("grade") else "")
                                           if i.get("suspected") else "not suspected") + "</b>")
    if "icaht" in a:
        i = a["icaht"]
        out.append(f"ICAHT early <b>{i.get('early_grade') if i.get('early_grade') is not None else '–'}</b> / "
                   f"late <b>{i.get('late_grade') if i.get('late_grade') is not None else '–'}</b>")
    return '<div class="facts">' + "".join(f"<span>{x}</span>" for x in out) + "</div>" if out else ""


def _timeline(case: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td class=\"num\">{_day(e.get('hour'))}</td><td>{_e(event_name(e['kind']))}</td><td>{_e(e.get('detail'))}</td>"
        f"<td class=\"refs\">{_e(', '.join(e.get('evidence') or []))}</td></tr>"
        for e in case.get("timeline") or [])
    n = len(case.get("timeline") or [])
    return (f"<details><summary>Timeline: {n} salient events with their source resources</summary><table><thead><tr>"
            "<th class=\"num\">When</th><th>Event</th><th>Detail</th><th>Resources</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></details>")


def _legend() -> str:
    grades = "".join(f'<span><i style="background:{GRADE_COLOURS[g]}"></i>grade {g}</span>' for g in range(1, 6))
    return (f'<div class="legend">{grades}<span><i style="background:url(#hatch);border:1px solid #9aa0a6"></i>hatched: '
            "provisional episode / home support</span><span>▲ tocilizumab · ● corticosteroid · ◆ fluid bolus · "
            "| antipyretic / antibiotic</span><span>red points: fever ≥ 38 °C, SBP below the age threshold, SpO2 &lt; 90 %</span>"
            "<span>hover a mark for its time, value and FHIR resource</span></div>")


def case_section(case: dict[str, Any], heading: bool = True) -> str:
    head = ""
    if heading:
        head = (f"<h1>{_e(case.get('patient'))}</h1><p class=\"sub\">CAR-T infusion {_e(case.get('infusion'))} — "
                "course from day 0; times are hours from the start of the infusion</p>")
    return (head + _badges(case) + _facts_line(case) + _adjacent(case)
            + f'<div class="chart">{render_chart(case)}</div>' + _legend()
            + "<h2>Grades</h2>" + _results_table(case)
            + "<h2>Criteria and evidence</h2>" + _criteria(case)
            + "<h2>Timeline</h2>" + _timeline(case))


def render_case_html(case: dict[str, Any]) -> str:
    """A complete, self-contained HTML page for one graded case."""
    return _page(f"{case.get('patient')} — CRS/ICANS course", case_section(case))


def render_patient_html(cases: Sequence[dict[str, Any]], back: str | None = None, who: Identity | None = None,
                        meta: str | None = None, name: str | None = None) -> str:
    """One page for a patient (several infusions: one section each). The heading is the patient's
    name (else the stable label), with the label, MRN and FHIR reference below it (`who`; `name`
    overrides the name the cases carry — the SMART app inside the EHR). De-identified (`who.ref`
    None) only the label is shown and the patient's reference becomes `Patient/~<label>` everywhere."""
    first = cases[0]
    ref = str(first.get("patient"))
    if who is None:
        who = Identity(first.get("patient_label") or patient_label(ref), ref, first.get("mrn"), name or first.get("name"))
    elif name and who.ref is not None:
        who = Identity(who.label, who.ref, who.mrn, name)
    nav = f'<p><a href="{_e(back)}">← cohort report</a></p>' if back else ""
    body = nav + f"<h1 class=\"patient\">{_e(who.name or who.label)}</h1>"
    if who.ref:
        details = [who.label] + ([f"MRN {who.mrn}"] if who.mrn else [])
        body += (f'<p class="sub">{_e(" · ".join(details))} · FHIR <span class="refs">{_e(who.ref)}</span></p>')
    for i, c in enumerate(cases):
        title = "CAR-T infusion " + str(c.get("infusion")) + (f" ({i + 1} of {len(cases)})" if len(cases) > 1 else "")
        body += f"<p class=\"sub\">{_e(title)} — times are hours from the start of the infusion</p>" + case_section(c, heading=False)
    if who.ref is None:
        body = body.replace(_e(ref), _e(who.public_ref))
    return _page(f"{who.label} — CRS/ICANS course", body, meta)


# ---- cohort page -----------------------------------------------------------------------------


def _scatter(report: dict[str, Any], cases: Sequence[dict[str, Any]], key: str, fact: str, label: str,
             name_of: Any = None, file_of: Any = None) -> str:
    """Max CRS grade (x) against the peak value (log y, in the unit the facts carry), one dot per patient."""
    name_of = name_of or patient_label
    file_of = file_of or patient_file_name
    units = {((c.get("facts") or {}).get(fact) or {}).get("unit") for c in cases} - {None, ""}
    unit = " / ".join(sorted(units)) or PEAK_UNITS.get(fact, "")
    system = report.get("system", "astct")
    pts: dict[str, tuple[int, float]] = {}
    for c in cases:
        v = ((c.get("facts") or {}).get(fact) or {}).get("value")
        g = int(((c.get("crs") or {}).get(system) or {}).get("grade") or 0)
        if v is None:
            continue
        old = pts.get(c["patient"])
        pts[c["patient"]] = (max(g, old[0]) if old else g, max(v, old[1]) if old else v)
    if not pts:
        return ""
    w, h, left, bottom = 360, 220, 50, 190
    vals = [v for _, v in pts.values()]
    lo = 10 ** math.floor(math.log10(max(min(vals), 0.1)))
    hi = 10 ** math.ceil(math.log10(max(vals)))
    hi = max(hi, lo * 10)

    def x(g: int) -> float:
        return left + 20 + g * (w - left - 40) / 5

    def y(v: float) -> float:
        return bottom - (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (bottom - 20)

    parts = [f'<svg viewBox="0 0 {w} {h + 10}" width="{w}" role="img" aria-label="{_e(label)} by CRS grade">',
             f'<line x1="{left}" x2="{w - 10}" y1="{bottom}" y2="{bottom}" stroke="#9aa0a6"/>',
             f'<line x1="{left}" x2="{left}" y1="14" y2="{bottom}" stroke="#9aa0a6"/>']
    for g in range(6):
        parts.append(f'<text x="{x(g)}" y="{bottom + 14}" text-anchor="middle" font-size="10" fill="#3c4043">{g}</text>')
    parts.append(f'<text x="{(left + w) / 2}" y="{bottom + 28}" text-anchor="middle" font-size="10" fill="#5f6368">max CRS grade ({_e(system)})</text>')
    k = math.floor(math.log10(lo))
    while 10 ** k <= hi:
        parts.append(f'<text x="{left - 4}" y="{y(10 ** k) + 3}" text-anchor="end" font-size="9" fill="#5f6368">{10 ** k:g}</text>'
                     f'<line x1="{left}" x2="{w - 10}" y1="{y(10 ** k)}" y2="{y(10 ** k)}" stroke="#eceef0"/>')
        k += 1
    parts.append(f'<text x="12" y="12" font-size="10" fill="#5f6368">peak {_e(label)} ({_e(unit)}, log scale)</text>')
    for i, (p, (g, v)) in enumerate(sorted(pts.items())):
        jitter = ((i * 7) % 11 - 5) * 2.2
        parts.append(f'<a href="patients/{_e(file_of(p))}"><circle cx="{x(g) + jitter}" cy="{round(y(v), 1)}" r="4.5" '
                     f'fill="{GRADE_COLOURS[min(g, 5)]}" stroke="#202124" stroke-width="0.8"><title>{_e(name_of(p))}: grade {g}, '
                     f'{_f(v)} {_e(unit)}</title></circle></a>')
    parts.append("</svg>")
    return "".join(parts)


def render_report_html(report: dict[str, Any], cases: Sequence[dict[str, Any]] | dict[str, Any], out_dir: Path | str,
                       title: str = "CAR-T cytokine release syndrome — cohort report") -> Path:
    """Write `out_dir/index.html` (the cohort table) and `out_dir/patients/<id>.html`; returns index.html.
    Files are 0600 and folders fhir-crs creates 0700 (PHI at rest, private.py)."""
    from .report import CORRELATION_LABELS, ROW_LABELS, format_p

    if isinstance(cases, dict):
        cases = list(cases.get("cases") or [])
    about = report.get("about")
    deid = bool(about and about.get("deidentified"))
    meta = (ReportMeta(about["source"], about["generated"], about["fhir_crs_version"], deid).line() if about else None)
    who = identities(list(cases), deidentify=deid)
    out = Path(out_dir)
    private_dir(out / "patients")
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for c in cases:
        by_patient.setdefault(str(c.get("patient")), []).append(c)
    # rows carry the real reference, or Patient/~<label> de-identified
    by_public = {who[p].public_ref: p for p in by_patient}

    def file_of(p: str) -> str:
        return patient_file_name(who[p].label if deid else p)

    for patient, pcases in by_patient.items():
        write_private_text(out / "patients" / file_of(patient),
                           render_patient_html(pcases, back="../index.html", who=who[patient], meta=meta))

    def label_of(ref: str) -> str:
        p = by_public.get(ref, ref)
        return who[p].label if p in who else patient_label(ref)

    def link(ref: str) -> str:
        p = by_public.get(ref, ref)
        if p in by_patient:
            tip = "" if deid else f' title="{_e(who[p].describe())} — {_e(p)}"'
            return f'<a class="label" href="patients/{_e(file_of(p))}"{tip}>{_e(who[p].label)}</a>'
        return _e(patient_label(ref) if not ref.startswith("Patient/~") else ref.removeprefix("Patient/~"))

    n = report.get("patients", 0)
    system = report.get("system", "astct")
    rows = []
    for key, label in ROW_LABELS.items():
        r = report["rows"].get(key)
        if r is None:
            continue
        rows.append(f'<tr><td>{_e(label)}</td><td class="num">{r["n"]}</td><td class="num">{r["pct"]:.1f}</td>'
                    f'<td class="patients">{" ".join(link(p) for p in sorted(r["patients"], key=label_of))}</td></tr>')
    corr_rows = []
    plots = []
    for key, c in (report.get("correlation") or {}).items():
        name = CORRELATION_LABELS.get(key, key)
        rho = "–" if c.get("rho") is None else f"{c['rho']:+.2f}"
        corr_rows.append(f'<tr><td>Max CRS grade vs peak {_e(name)}</td><td class="num">{rho}</td>'
                         f'<td class="num">{format_p(c.get("p"))}</td><td class="num">{c.get("n", 0)}</td></tr>')
        plots.append(_scatter(report, cases, key, {"il6": "peak_il6", "ifng": "peak_ifn_gamma"}.get(key, key), name,
                              name_of=lambda p: who[p].label, file_of=file_of))

    # one line per patient
    plines = []
    for p in sorted(by_patient, key=lambda p: who[p].label):
        pcs = by_patient[p]
        crs = max(int(((c.get("crs") or {}).get(system) or {}).get("grade") or 0) for c in pcs)
        icans = max(int(((c.get("icans") or {}).get("astct") or {}).get("grade") or 0) for c in pcs)
        f = [c.get("facts") or {} for c in pcs]
        age = pcs[0].get("age_years")

        def tick(v: bool) -> str:
            return '<span class="yes">●</span>' if v else '<span class="no">·</span>'

        il6 = max((((x.get("peak_il6") or {}).get("value")) or 0 for x in f), default=0)
        ident = "" if deid else f"<td>{_e(who[p].mrn or '–')}</td><td>{_e(who[p].name or '–')}</td>"
        plines.append(
            f"<tr><td>{link(who[p].public_ref)}</td>{ident}<td class=\"num\">{'' if age is None else age}</td><td>{_grade_chip(crs)}</td><td>{_grade_chip(icans)}</td>"
            f"<td>{tick(any(x.get('haemodynamic_instability') for x in f))}</td><td>{tick(any(x.get('mechanical_ventilation') for x in f))}</td>"
            f"<td>{tick(max(int(x.get('liver_injury_grade') or 0) for x in f) >= 2)}</td><td>{tick(any(x.get('tocilizumab') for x in f))}</td>"
            f"<td>{tick(any(x.get('corticosteroids') for x in f))}</td><td>{tick(any(x.get('blood_purification') for x in f))}</td>"
            f"<td>{tick(any(x.get('died') for x in f))}</td><td class=\"num\">{_f(il6) if il6 else '–'}</td>"
            + ("" if deid else f"<td class=\"refs\">{_e(p)}</td>") + "</tr>")
    empty = ""
    if n == 0:
        reason = report.get("empty_reason") or "no CAR-T infusion found in the input"
        empty = f'<p class="empty"><b>Empty cohort:</b> {_e(reason)}</p>'
    id_heads = "" if deid else "<th>MRN</th><th>Name</th>"
    body = (f"<h1>{_e(title)}</h1><p class=\"sub\">{n} patients — CRS graded by <b>{_e(system)}</b>, ICANS by ASTCT; "
            "percentages of all patients; each patient links to their course; patients are named by a stable "
            "label derived from their FHIR id</p>" + empty +
            "<table class=\"cohort\"><thead><tr><th>Finding</th><th class=\"num\">n</th><th class=\"num\">%</th><th>Patients</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            "<h2>Cytokines and CRS severity (Spearman)</h2>"
            "<table><thead><tr><th>Correlation</th><th class=\"num\">rho</th><th class=\"num\">p (two-sided)</th>"
            f"<th class=\"num\">n</th></tr></thead><tbody>{''.join(corr_rows)}</tbody></table>"
            f"<div style=\"display:flex;flex-wrap:wrap;gap:24px\">{''.join(plots)}</div>"
            f"<h2>Patients</h2><table><thead><tr><th>Patient</th>{id_heads}<th class=\"num\">Age (y)</th><th>CRS grade</th><th>ICANS grade</th>"
            "<th>Haemodyn.</th><th>Ventilated</th><th>Liver ≥ 2</th><th>Tocilizumab</th><th>Steroids</th><th>Purification</th>"
            "<th>Died</th><th class=\"num\">Peak IL-6 (pg/mL)</th>" + ("" if deid else "<th>FHIR id</th>")
            + f"</tr></thead><tbody>{''.join(plines)}</tbody></table>"
            "<p class=\"note\">Definitions: fhir_crs/report.py. Recovered within 14 days = alive and CRS resolved "
            "(24 h free of fever, hypotension and oxygen) within 14 days of its onset; patients without CRS who are alive count as recovered.</p>")
    index = out / "index.html"
    write_private_text(index, _page(title, body, meta))
    return index


def render_cases_html(cases: Iterable[dict[str, Any]], out_dir: Path | str, system: str = "astct") -> Path:
    """Convenience: report + pages straight from graded cases."""
    from .report import report_from_cases

    cases = list(cases)
    return render_report_html(report_from_cases(cases, system), cases, out_dir)
