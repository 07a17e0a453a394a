"""Indications that decide a grade (mappings/reasons.toml): coded reason first, then text
(flagged), and a negated mention never counts.

`classify(table, codings, texts)` returns the indication classes of a resource. Codes decide
first: when any reason coding is in the table, only codes are used. Otherwise each text is
matched against the class patterns, and a match counts only when it is affirmed — not preceded
within three words by a negation cue ("no", "not for", "without", "negative for", "ruled out",
"r/o", "non-") and not followed in the same clause by "ruled out" / "excluded" / "absent".
`affirmed()` is the same negation rule for the other free-text decisions (death summaries).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..mapping_files import ClassTable
from .common import codings, reference_target, split_reference, texts

_NEG_BEFORE = re.compile(
    r"(?:\b(?:no|not|non|without|denies|denied|negative|neg|never|absent|excluded|free)\b|\bruled?\s+out\b|\br/o\b|\bexclud\w*\b|\babsence\s+of\b)"
    r"(?:\W+\w+){0,3}?\W*$",
    re.IGNORECASE,
)
_NEG_AFTER = re.compile(r"^\W*(?:\w+\W+){0,3}?(?:ruled\s+out|excluded|absent|not\s+present|unlikely)\b", re.IGNORECASE)
_CLAUSE = re.compile(r"[.;:!?\n]|,|\bbut\b|\bhowever\b", re.IGNORECASE)


def affirmed(pattern: re.Pattern[str], text: str) -> bool:
    """True if `pattern` matches somewhere in `text` in a clause that does not negate it."""
    for m in pattern.finditer(text):
        before = _CLAUSE.split(text[max(0, m.start() - 80):m.start()])[-1]
        after = _CLAUSE.split(text[m.end():m.end() + 60])[0]
        if _NEG_BEFORE.search(before) or _NEG_AFTER.search(after):
            continue
        return True
    return False


def classify(table: ClassTable, codings: Iterable[tuple[str, str]], texts: Iterable[str]) -> tuple[frozenset[str], bool]:
    """(indication classes, decided by text?)."""
    coded = {table.code_index[k] for s, c in codings if (k := f"{s}|{c}") in table.code_index}
    if coded:
        return frozenset(coded), False
    found = set()
    for t in texts:
        if not t:
            continue
        for m in table.entries:
            if m.name in found:
                continue
            if any(affirmed(p, t) for p in m.text) and not any(p.search(t) for p in m.exclude):
                found.add(m.name)
    return frozenset(found), bool(found)


def reason_references(res: dict) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """A resource's `reasonReference`s: (codings of the contained Conditions — reason codes of the
    resource itself —, the reason words: every reference's display, then the contained
    Conditions' texts, `Condition/id` of the other Conditions, whose classes join at the
    timeline from the patient's own Conditions)."""
    codes: list[tuple[str, str]] = []
    words = [rr["display"] for rr in res.get("reasonReference") or () if isinstance(rr, dict) and isinstance(rr.get("display"), str)]
    refs: list[str] = []
    for rr in res.get("reasonReference") or ():
        target = reference_target(rr)
        if target is None:
            continue
        if target.startswith("#"):
            for c in res.get("contained") or ():
                if isinstance(c, dict) and c.get("resourceType") == "Condition" and c.get("id") == target[1:]:
                    codes.extend(codings(c.get("code")))
                    words.extend(texts(c.get("code")))
        elif (parts := split_reference(target)) and parts[0] == "Condition":
            refs.append(f"Condition/{parts[1]}")
    return codes, words, refs
