"""Stage 4 (shared by the CRS systems): which vasopressor infusions of different drugs run at
the same time. Pure functions of the pressor courses of a timeline; the case state (state.py),
the dose states (vasoactive.py) and the CRS graders (crs.py) use them, so they sit below all three.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ..timeline import PressorCourse

__all__ = ["concurrent_intervals", "handoffs"]


def concurrent_intervals(courses: list[PressorCourse], min_overlap: timedelta) -> list[tuple[datetime, datetime, int, list[str]]]:
    """Every combination of >= 2 infusions of different drugs that overlap for at least
    `min_overlap`, as (start, end, k, first ref of each member), ordered by k and then by the
    members' positions in `courses` (the order a combination search would list them).

    Interval sweep: courses in start order; each combination is found once, from its latest-
    starting member, among the courses still running `min_overlap` after that start. Cost
    O(n log n + n·a + m) for n courses, at most a courses running at once (same-drug segments are
    joined into one course, so a <= the number of drugs) and m combinations returned."""
    order = sorted(range(len(courses)), key=lambda i: (courses[i].start, i))
    found: list[tuple[tuple[int, ...], datetime, datetime]] = []
    active: list[int] = []
    for i in order:
        c = courses[i]
        t0 = c.start
        active = [j for j in active if courses[j].end - t0 >= min_overlap]
        if c.end - t0 < min_overlap:
            continue
        cands = [j for j in active if courses[j].drug != c.drug]

        def extend(pos: int, members: tuple[int, ...], drugs: frozenset[str], end: datetime,
                   cands: list[int] = cands, t0: datetime = t0) -> None:
            for p in range(pos, len(cands)):
                j = cands[p]
                d = courses[j]
                if d.drug in drugs:
                    continue
                e = min(end, d.end)
                grown = (*members, j)
                found.append((tuple(sorted(grown)), t0, e))
                extend(p + 1, grown, drugs | {d.drug}, e)

        extend(0, (i,), frozenset((c.drug,)), c.end)
        active.append(i)
    found.sort(key=lambda f: (len(f[0]), f[0]))
    return [(start, end, len(idx), [r for j in idx for r in courses[j].refs[:1]]) for idx, start, end in found]


def handoffs(courses: list[PressorCourse], min_overlap: timedelta) -> list[tuple[datetime, list[str]]]:
    """Overlaps of two different drugs shorter than the concurrency rule (bag changes, switches),
    ordered by the pair's positions in `courses`. Interval sweep: O(n log n + n·a + m)."""
    order = sorted(range(len(courses)), key=lambda i: (courses[i].start, i))
    found: list[tuple[int, int, datetime]] = []
    active: list[int] = []
    for i in order:
        c = courses[i]
        active = [j for j in active if courses[j].end > c.start]
        for j in active:
            d = courses[j]
            if d.drug != c.drug and timedelta(0) < min(c.end, d.end) - c.start < min_overlap:
                found.append((min(i, j), max(i, j), c.start))
        active.append(i)
    found.sort(key=lambda f: (f[0], f[1]))
    return [(start, [courses[a].refs[0], courses[b].refs[0]]) for a, b, start in found]
