"""CRS episodes (grading-criteria §1.1): onset at the first fever >= 38.0 °C at t >= 0,
resolution at the first all-clear time after the last abnormality that stays clear for 24 h,
a new fever after resolution opening a new (biphasic) episode. Episodes whose fever may have
another cause (positive blood culture, possible IEC-HS / post-CRS hyperinflammation, a late
second episode) are marked provisional with the flags that say why (`attribution_needed` and
`positive_blood_culture` / `possible_iec_hs` / `late_onset`); they count in the per-infusion
maximum unless the setting `exclude_provisional_episodes` asks otherwise (clinical safety rule).

Cost: O(E x n log n) for n events and E episodes (each episode sorts the abnormalities after its
onset once; fever runs are one backward pass; onset and therapy look-ups are bisections). E is
bounded by the stay divided by the 24 h clear period. Computed once per case and set of extra
abnormalities, shared by the systems (state.py).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise

from ..events import DrugGiven, Measurement
from ..mappers.reasons import affirmed
from ..settings import GradingSettings
from ..timeline import CaseTimeline, Support

H = timedelta(hours=1)
_CRS_CAUSE = re.compile(r"\bCRS\b|cytokine release|cytokine storm", re.IGNORECASE)
_ALT_CAUSE = re.compile(
    r"seps|septic|bacter|infect|pneumonia|fungal|progress|relapse|h(a)?emorrhag|bleed|embol|"
    r"resolved|unrelated|other cause|alternative cause(?! not)|leuk(a)?emia|lymphoma|disease",
    re.IGNORECASE,
)
_NO_ALT = re.compile(r"no (other|alternative) (principal )?cause", re.IGNORECASE)


def is_fever(m: Measurement, s: GradingSettings) -> bool:
    """>= 38.0 °C on the raw stored value, compared in the unit it was recorded in (§1.2)."""
    if m.raw_unit == "[degF]" and m.raw_value is not None:
        return round(m.raw_value, s.fever_compare_decimals) >= round(s.fever_c * 9 / 5 + 32, 2)
    return round(m.value, s.fever_compare_decimals) >= s.fever_c


@dataclass(slots=True)
class Episode:
    onset: datetime
    onset_refs: list[str]
    resolved: datetime | None
    index: int
    masked_from: datetime | None = None
    masking_refs: list[str] = field(default_factory=list)
    provisional: bool = False
    flags: list[str] = field(default_factory=list)
    death: datetime | None = None
    death_alternative: bool = False
    death_refs: list[str] = field(default_factory=list)

    @staticmethod
    def copies(episodes: list[Episode]) -> list[Episode]:
        """What copy.deepcopy gives for a list of episodes (every field is a time, a bool, an
        int or a list of strings; lists shared between episodes stay shared in the copy), at a
        fraction of its cost: graders get their own episodes to add flags to."""
        lists: dict[int, list[str]] = {}

        def own(v: list[str]) -> list[str]:
            c = lists.get(id(v))
            if c is None:
                c = lists[id(v)] = list(v)
            return c

        seen: dict[int, Episode] = {}
        out = []
        for e in episodes:
            c = seen.get(id(e))
            if c is None:
                c = seen[id(e)] = Episode(e.onset, own(e.onset_refs), e.resolved, e.index, e.masked_from, own(e.masking_refs),
                                          e.provisional, own(e.flags), e.death, e.death_alternative, own(e.death_refs))
            out.append(c)
        return out

    def end_bound(self, tl: CaseTimeline) -> datetime:
        if self.resolved is not None:
            return self.resolved
        return tl.last_time or self.onset

    def contains(self, t: datetime, tl: CaseTimeline) -> bool:
        return self.onset <= t <= self.end_bound(tl)


def fever_intervals(tl: CaseTimeline, s: GradingSettings, since: datetime) -> list[tuple[datetime, datetime | None, list[str]]]:
    """Fever states [fever reading, next afebrile reading); open (None) if no afebrile reading follows.
    One backward pass over the readings: O(n)."""
    temps = tl.temps
    out = []
    next_afebrile: datetime | None = None
    for m in reversed(temps):
        if not is_fever(m, s):
            next_afebrile = m.time
        elif m.time >= since:
            out.append((m.time, next_afebrile, [m.ref]))
    out.reverse()
    return out


def support_abnormal(g: Support) -> bool:
    """Supplemental O2 above baseline, or CRS-attributed positive pressure."""
    if g.home:
        return False
    return g.attributed if g.ppv else True


def abnormal_intervals(tl: CaseTimeline, s: GradingSettings, since: datetime,
                       extra: list[tuple[datetime, datetime | None, list[str]]] | None = None,
                       ) -> list[tuple[datetime, datetime | None, list[str]]]:
    ivs = fever_intervals(tl, s, since)
    ivs += [(c.start, c.end, c.refs) for c in tl.pressors if c.end >= since]
    ivs += [(g.start, g.end, g.refs) for g in tl.support if g.end >= since and support_abnormal(g)]
    ivs += [(h.time, h.end or h.time, h.refs) for h in tl.hypotension if h.time >= since]
    ivs += extra or []
    return sorted(ivs, key=lambda x: x[0])


def find_resolution(tl: CaseTimeline, s: GradingSettings, onset: datetime,
                    ivs: list[tuple[datetime, datetime | None, list[str]]], flags: list[str]) -> datetime | None:
    clear = timedelta(hours=s.resolution_clear_h)
    therapy = sorted(d.start for d in tl.drugs if d.drug_class in s.episode_open_therapy_classes and d.start >= onset)

    def horizon(cur: datetime) -> datetime:
        """cur + clear, pushed out by CRS-directed therapy given while the episode looked clear
        (therapy is time-ordered: start at cur, stop at the first dose past the horizon)."""
        h = cur + clear
        for d in therapy[bisect_left(therapy, cur):]:
            if d > h:
                break
            h = max(h, d + clear)
        return h

    cur = onset
    for start, end, _ in ivs:
        if end is not None and end < onset:
            continue
        if start >= horizon(cur):
            break  # clear for the whole period (§1.1 ">= 24 h"): an abnormality from then on is a new episode
        if end is None:
            return None
        cur = max(cur, end)
    if tl.deceased is not None and onset <= tl.deceased <= cur + clear:
        return None  # died before the clear period completed: never resolved
    if tl.last_time is None or tl.last_time < cur + clear:
        _add(flags, "resolution_unconfirmed")
    block = timedelta(hours=s.resolution_coverage_block_h)
    t, sparse = cur, False
    while t + block <= cur + clear and tl.last_time and t + block <= tl.last_time:
        has_t = any(t <= m.time < t + block for m in tl.temps)
        has_bp = any(t <= m.time < t + block for m in tl.sbp)
        if not (has_t and has_bp):
            sparse = True
        t += block
    if sparse:
        _add(flags, "resolution_sparse_data")
        if s.resolution_coverage_required:
            return None
    return cur


def _add(flags: list[str], name: str) -> None:
    if name not in flags:
        flags.append(name)


def death_alternative_cause(tl: CaseTimeline, onset: datetime, when: datetime, s: GradingSettings) -> tuple[bool, list[str]]:
    """(alternative principal cause documented?, refs) for a death during an episode (§1.8)."""
    refs: list[str] = []
    alt = False
    for f in tl.findings_of("cause_of_death"):
        refs.append(f.ref)
        if _NO_ALT.search(f.text):
            continue
        if affirmed(_ALT_CAUSE, f.text):  # "no evidence of sepsis" is not an alternative cause
            alt = True
    w = timedelta(hours=s.culture_attribution_window_h)
    for f in tl.findings_of("blood_culture"):
        if f.detail == "positive" and onset - w <= f.time <= when:
            alt = True
            refs.append(f.ref)
    return alt, refs


def _hyperinflammation_near(tl: CaseTimeline, t: datetime) -> list[str]:
    """IEC-HS-like laboratory picture around t (ferritin > 2x day-0, fibrinogen < 150, ALT/AST > 5x ULN)."""
    refs = []
    lo, hi = t - 72 * H, t + 48 * H
    ferr = tl.labs.get("ferritin", [])
    base = [m for m in ferr if m.time <= tl.infusion + 24 * H]
    base_v = base[-1].value if base else None
    for m in ferr:
        if lo <= m.time <= hi and base_v and m.value > 2 * base_v and m.time > tl.infusion + 24 * H:
            refs.append(m.ref)
    for m in tl.labs.get("fibrinogen", []):
        if lo <= m.time <= hi and m.value < 150:
            refs.append(m.ref)
    for k in ("alt", "ast"):
        for m in tl.labs.get(k, []):
            if lo <= m.time <= hi and m.value > 5 * (m.uln or 40.0):
                refs.append(m.ref)
    return refs


def detect_episodes(tl: CaseTimeline, s: GradingSettings,
                    extra_abnormal: list[tuple[datetime, datetime | None, list[str]]] | None = None) -> list[Episode]:
    episodes: list[Episode] = []
    cursor = tl.infusion
    masking = [d for d in tl.drugs if d.drug_class in s.masking_drug_classes]
    cw = timedelta(hours=s.culture_attribution_window_h)
    times = [m.time for m in tl.temps]
    ordered = all(a <= b for a, b in pairwise(times))  # the timeline sorts them
    while True:
        start = bisect_left(times, cursor) if ordered else 0
        onset_m = next((m for m in tl.temps[start:] if m.time >= cursor and (not episodes or m.time > cursor) and is_fever(m, s)), None)
        if onset_m is None:
            break
        onset = onset_m.time
        ep = Episode(onset=onset, onset_refs=[onset_m.ref], resolved=None, index=len(episodes))
        ivs = abnormal_intervals(tl, s, onset, extra_abnormal)
        ep.resolved = find_resolution(tl, s, onset, ivs, ep.flags)
        bound = ep.end_bound(tl)
        mask: list[DrugGiven] = [d for d in masking if onset <= d.start <= bound]
        if mask:
            ep.masked_from = mask[0].start
            ep.masking_refs = [mask[0].ref]
        day = (onset - tl.infusion) / timedelta(days=1)
        cultures = [f for f in tl.findings_of("blood_culture") if f.detail == "positive" and onset - cw <= f.time <= onset + cw]
        if cultures:
            _add(ep.flags, "attribution_needed")
            _add(ep.flags, "positive_blood_culture")
            if any(f.ref in tl.text_matched for f in cultures):
                _add(ep.flags, "matched_by_text")  # the culture result was read from its text, not a code
            ep.provisional = True
        if day > s.late_onset_day:
            _add(ep.flags, "late_onset")
            _add(ep.flags, "attribution_needed")
            if episodes:
                ep.provisional = True
        if episodes:
            hyper = _hyperinflammation_near(tl, onset)
            if hyper:
                # ferritin also rises in CRS itself: a possible IEC-HS episode is flagged, never dropped
                _add(ep.flags, "post_crs_hyperinflammation")
                _add(ep.flags, "possible_iec_hs")
                _add(ep.flags, "attribution_needed")
                ep.provisional = True
            if not ep.provisional:
                _add(ep.flags, "biphasic")
        if tl.deceased is not None and onset <= tl.deceased and (ep.resolved is None or tl.deceased <= ep.resolved):
            ep.death = tl.deceased
            ep.death_alternative, ep.death_refs = death_alternative_cause(tl, onset, tl.deceased, s)
        episodes.append(ep)
        if ep.resolved is None:
            break
        cursor = ep.resolved
    return episodes
