"""Per-case state shared by every grading system, and the time indexes its window queries use.

Six CRS systems grade one case; they used to recompute the same derived series (dose states,
high-dose intervals, concurrency, organ grades, episodes) and to answer "what is running at t"
by scanning whole series at every change point. `case_state(tl, s)` computes each series once per
(timeline, settings) and keeps it on the timeline; `IntervalIndex` and `TimeIndex` answer window
queries by bisection.

Costs (n = the case's events): building each series is O(n log n) (plus its output); a query is
O(log n + the items it returns). Grading a case is therefore O(n log n + output) overall.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any, Generic, TypeVar

from ..settings import GradingSettings
from ..timeline import CaseTimeline, PressorCourse, Support
from .concurrency import concurrent_intervals, handoffs
from .episodes import Episode, detect_episodes, is_fever
from .organ import OrganGrade, organ_series
from .vasoactive import DoseState, dose_states, high_dose_intervals, is_high_dose, refractory_times

T = TypeVar("T")


class IntervalIndex(Generic[T]):
    """Items with a half-open span [start, end); `at(t)` returns those with start <= t < end in
    their input order. Built by one sweep over the elementary segments between span ends:
    O(n log n + s) where s = the sum over segments of the items covering it; a query is
    O(log n) plus the items returned."""

    __slots__ = ("_cuts", "_lists")

    def __init__(self, items: Iterable[T], start: Callable[[T], datetime], end: Callable[[T], datetime]):
        spans = [(start(x), end(x), x) for x in items]
        self._cuts = sorted({a for a, b, _ in spans if a < b} | {b for a, b, _ in spans if a < b})
        pos = {c: i for i, c in enumerate(self._cuts)}
        self._lists: list[list[T]] = [[] for _ in self._cuts]
        for a, b, x in spans:
            if a < b:
                for k in range(pos[a], pos[b]):
                    self._lists[k].append(x)

    def at(self, t: datetime) -> list[T]:
        k = bisect_right(self._cuts, t) - 1
        if k < 0 or k >= len(self._lists):
            return []
        return self._lists[k]


class Cover:
    """Closed intervals [a, b]: is t inside any of them? Sorted by start with the running maximum
    of the ends, a query is one bisection (O(log n)) instead of a scan of every interval."""

    __slots__ = ("_reach", "_starts")

    def __init__(self, spans: Iterable[tuple[datetime, datetime]]):
        ordered = sorted(spans, key=lambda x: x[0])
        self._starts = [a for a, _ in ordered]
        self._reach: list[datetime] = []
        for _, b in ordered:
            self._reach.append(b if not self._reach or b > self._reach[-1] else self._reach[-1])

    def __contains__(self, t: datetime) -> bool:
        k = bisect_right(self._starts, t) - 1
        return k >= 0 and self._reach[k] >= t


class TimeIndex(Generic[T]):
    """Items in time order; exact-time and window look-ups by bisection (O(log n + k))."""

    __slots__ = ("items", "times")

    def __init__(self, items: Sequence[T], time: Callable[[T], datetime]):
        self.items = list(items)
        self.times = [time(x) for x in self.items]
        if any(a > b for a, b in pairwise(self.times)):
            order = sorted(range(len(self.items)), key=lambda i: self.times[i])
            self.items = [self.items[i] for i in order]
            self.times = [self.times[i] for i in order]

    def exactly(self, t: datetime) -> list[T]:
        return self.items[bisect_left(self.times, t):bisect_right(self.times, t)]

    def between(self, lo: datetime, hi: datetime) -> list[T]:
        """Items with lo <= time <= hi."""
        return self.items[bisect_left(self.times, lo):bisect_right(self.times, hi)]

    def any_between(self, lo: datetime, hi: datetime) -> bool:
        i = bisect_left(self.times, lo)
        return i < len(self.times) and self.times[i] <= hi


class LatestOrgan:
    """For a window [lo, t]: per organ lab the value the systems grade (latest time; at equal
    times the first of the highest grade), labs in the order they first appear in the window —
    what a scan of the whole time-ordered series returns, in O(labs x log n)."""

    __slots__ = ("_pos", "_series", "_times")

    def __init__(self, organs: list[OrganGrade]):
        by_lab: dict[str, list[int]] = defaultdict(list)
        for i, o in enumerate(organs):
            by_lab[o.lab].append(i)
        self._series = {lab: [organs[i] for i in idx] for lab, idx in by_lab.items()}
        self._pos = dict(by_lab)
        self._times = {lab: [o.time for o in series] for lab, series in self._series.items()}

    def window(self, lo: datetime, t: datetime) -> list[OrganGrade]:
        picked: list[tuple[int, OrganGrade]] = []
        for lab, series in self._series.items():
            times = self._times[lab]
            first = bisect_left(times, lo)
            last = bisect_right(times, t)
            if first >= last:
                continue
            group = bisect_left(times, times[last - 1], first, last)
            best = series[group]
            for o in series[group + 1:last]:
                if o.grade > best.grade:
                    best = o
            picked.append((self._pos[lab][first], best))
        picked.sort(key=lambda p: p[0])
        return [o for _, o in picked]


class FeverIndex:
    """Fever readings in time order: the one nearest t within a window, by bisection."""

    __slots__ = ("_items", "_times")

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        fevers = [m for m in tl.temps if is_fever(m, s)]
        index = TimeIndex(fevers, lambda m: m.time)
        self._items, self._times = index.items, index.times

    def nearest(self, t: datetime, window: timedelta) -> Any | None:
        """The fever reading closest to t with |time - t| <= window (the earlier one on a tie)."""
        times = self._times
        p = bisect_left(times, t)
        best = None
        if p > 0:
            q = bisect_left(times, times[p - 1])
            best = self._items[q]
        if p < len(times) and (best is None or times[p] - t < t - best.time):
            best = self._items[p]
        if best is None or abs(best.time - t) > window:
            return None
        return best


class CaseState:
    """Everything the CRS systems derive from one timeline under one set of settings, computed
    on first use and shared. Graders must not mutate what they get from here, except episodes,
    which `episodes()` hands out as copies."""

    def __init__(self, tl: CaseTimeline, s: GradingSettings):
        self.tl, self.s = tl, s
        self._memo: dict[object, Any] = {}

    def _get(self, key: object, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # -- vasopressors -------------------------------------------------------------------------
    @property
    def doses(self) -> tuple[list[DoseState], set[str]]:
        return self._get("doses", lambda: dose_states(self.tl, self.s))

    @property
    def high_dose(self) -> list[tuple[datetime, datetime, str, list[str]]]:
        return self._get("high_dose", lambda: high_dose_intervals(self.doses[0], self.s))

    @property
    def sustained(self) -> list[tuple[datetime, str, list[str]]]:
        need = timedelta(hours=self.s.high_dose_min_hours)
        return self._get("sustained", lambda: [(a + need, text, refs) for a, b, text, refs in self.high_dose if b - a >= need])

    @property
    def refractory(self) -> list[tuple[datetime, list[str]]]:
        return self._get("refractory", lambda: refractory_times(self.tl, self.doses[0], self.s, self.high_dose))

    def high_at(self, t: datetime) -> bool:
        """Is some dose state covering t high-dose? (states are disjoint and time-ordered)"""
        states: list[DoseState] = self._get("high_states", lambda: [st for st in self.doses[0] if is_high_dose(st.doses, self.s)[0]])
        starts: list[datetime] = self._get("high_starts", lambda: [st.start for st in states])
        k = bisect_right(starts, t) - 1
        return k >= 0 and t < states[k].end

    def concurrent(self, include_vasopressin: bool) -> list[tuple[datetime, datetime, int, list[str]]]:
        def build() -> list[tuple[datetime, datetime, int, list[str]]]:
            courses = [c for c in self.tl.pressors if include_vasopressin or c.drug != "vasopressin"]
            return concurrent_intervals(courses, timedelta(minutes=self.s.vasopressor_overlap_min))
        return self._get(("concurrent", include_vasopressin), build)

    def concurrent_at(self, include_vasopressin: bool) -> IntervalIndex[tuple[datetime, datetime, int, list[str]]]:
        return self._get(("concurrent_at", include_vasopressin),
                         lambda: IntervalIndex(self.concurrent(include_vasopressin), lambda m: m[0], lambda m: m[1]))

    @property
    def handoff_starts(self) -> list[datetime]:
        """Sorted start times of the short different-drug overlaps (vasopressin excluded)."""
        def build() -> list[datetime]:
            non_vaso = [c for c in self.tl.pressors if c.drug != "vasopressin"]
            return sorted(h for h, _ in handoffs(non_vaso, timedelta(minutes=self.s.vasopressor_overlap_min)))
        return self._get("handoff_starts", build)

    def handoff_in(self, lo: datetime, hi: datetime) -> bool:
        starts = self.handoff_starts
        i = bisect_left(starts, lo)
        return i < len(starts) and starts[i] <= hi

    @property
    def running(self) -> IntervalIndex[PressorCourse]:
        return self._get("running", lambda: IntervalIndex(self.tl.pressors, lambda c: c.start, lambda c: c.end))

    # -- support, hypotension, fever, organs --------------------------------------------------
    @property
    def support(self) -> IntervalIndex[Support]:
        return self._get("support", lambda: IntervalIndex(self.tl.support, lambda g: g.start, lambda g: g.end))

    @property
    def hypotension(self) -> TimeIndex[Any]:
        return self._get("hypotension", lambda: TimeIndex(self.tl.hypotension, lambda h: h.time))

    @property
    def fevers(self) -> FeverIndex:
        return self._get("fevers", lambda: FeverIndex(self.tl, self.s))

    @property
    def display_rounding(self) -> bool:
        """Is a post-infusion °C reading below the fever threshold that a display would round up?"""
        def build() -> bool:
            tl, s, lo_c = self.tl, self.s, self.s.display_rounding_low_c
            return any(m.time >= tl.infusion and not is_fever(m, s) and m.raw_unit != "[degF]" and lo_c <= m.value < s.fever_c
                       for m in tl.temps)
        return self._get("display_rounding", build)

    @property
    def fever_before_infusion(self) -> bool:
        """A fever within `preinfusion_fever_lookback_h` before the infusion?"""
        def build() -> bool:
            tl, s = self.tl, self.s
            look = timedelta(hours=s.preinfusion_fever_lookback_h)
            return any(tl.infusion - look <= m.time < tl.infusion and is_fever(m, s) for m in tl.temps)
        return self._get("fever_before_infusion", build)

    @property
    def organs(self) -> list[OrganGrade]:
        return self._get("organs", lambda: organ_series(self.tl, self.s))

    # -- episodes ----------------------------------------------------------------------------
    def episodes(self, extra: list[tuple[datetime, datetime | None, list[str]]]) -> list[Episode]:
        """Fever-anchored episodes given a system's extra abnormalities; computed once per
        distinct `extra`, each caller gets its own copy (graders add flags to them)."""
        key = ("episodes", tuple((a, b, tuple(refs)) for a, b, refs in extra))
        return Episode.copies(self._get(key, lambda: detect_episodes(self.tl, self.s, extra)))


def case_state(tl: CaseTimeline, s: GradingSettings) -> CaseState:
    """The shared state of (tl, s), created on first use and kept on the timeline."""
    entry = tl.derived.get(id(s))
    if entry is None or entry[0] is not s:
        entry = tl.derived[id(s)] = (s, CaseState(tl, s))
    return entry[1]
