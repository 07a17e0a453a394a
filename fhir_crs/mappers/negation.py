"""NegEx-style reading of the free text of a finding (ICANS / CRES rows, grading-criteria §3.2, §7.2).

A text is cut into sentences (full stop, ";", new line), a sentence that gives the reason for the
exam ("Indication:", "History:", "Reason for exam:") is dropped whole, a section header
("Impression:", "Findings:") is dropped from the front, and each sentence is cut again into
clauses on commas and contrast words (but, however, although). Within a clause a finding term is

* negated by a pre-trigger before it (no, not, without, denies, negative for, free of, absence
  of, no evidence/signs of, ruled out) or a post-trigger right after it (absent, not seen, not
  present, not identified, none, ": no", negative, ruled out, resolved);
* not negated by a pseudo-negation ("no interval change", "no significant change", "not only",
  "no increase");
* historical ("history of", "prior", "h/o") or prophylactic ("prophylaxis"): not a current finding;
* hypothetical ("r/o", "rule out", "evaluate for", "assess for"): the clause is dropped;
* uncertain ("possible", "probable", "suspected", "concern for", "cannot exclude", "likely",
  "?"): a finding, flagged for review (clinical safety rule: a hedge never hides a finding).

`read(text, names)` gives the clauses that affirm a finding, whether any is uncertain, whether
any clause denies something (a negation, a normal statement), and the text the finding's
classification reads: the kept clauses with the negated spans cut out ("Cerebral edema without
herniation" is classified from "Cerebral edema").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

_SENTENCE = re.compile(r"(?<!\d)\.|\.(?!\d)|[;\n]")  # a full stop (not a decimal point), ";" or a new line
_CLAUSE = re.compile(r",|\b(?:but|however|although|though|whereas)\b", re.IGNORECASE)
_REASON_SECTION = re.compile(
    r"^\s*(?:\d+\W\s*)?(?:indications?|(?:clinical\s+)?history|reason\s+for\s+(?:exam(?:ination)?|study|scan|imaging|consult)"
    r"|clinical\s+(?:information|indication|question|details))\s*:",
    re.IGNORECASE,
)
_HEADER = re.compile(
    r"^\s*(?:\d+\W\s*)?(?:impressions?|findings?|conclusions?|results?|interpretation|assessment|comments?|summary|report)\s*:\s*",
    re.IGNORECASE,
)
_NUMBERING = re.compile(r"^\s*\d+\s*[).:-]?\s+")  # "2. Diffuse cerebral edema" after the split: "2 Diffuse …"
_HYPOTHESIS = re.compile(r"\b(?:r/o|rule\s+out|to\s+exclude|evaluat(?:e|ion)\s+for|eval\s+for|assess(?:ment)?\s+for|screen\s+for)\b", re.IGNORECASE)
_UNCERTAIN = re.compile(
    r"\b(?:possible|possibly|probable|probably|suspected|suspect|suspicious\s+for|concern(?:ing)?\s+for|cannot_exclude"
    r"|likely|unlikely|questionable|equivocal|presumed|differential)\b|\?",
    re.IGNORECASE,
)
_CANNOT_EXCLUDE = re.compile(
    r"\b(?:cannot|can\s*not|can't|could\s+not|not|unable\s+to)\s+(?:be\s+)?(?:exclude[ds]?|rule[ds]?\s+out|r/o)\b", re.IGNORECASE
)
_PSEUDO = re.compile(
    r"\bno\s+(?:significant\s+)?(?:interval\s+)?(?:change|increase|worsening)\b|\bnot\s+only\b|\bno\s+new\s+change\b", re.IGNORECASE
)
_PRE = re.compile(
    r"\b(?:no|not|without|w/o|nor|never|denie[sd]|deny|negative\s+for|free\s+of|absence\s+of|ruled\s+out)\b", re.IGNORECASE
)
_HISTORY = re.compile(r"\b(?:history\s+of|hx\s+of|h/o|prior|previous|previously)\b", re.IGNORECASE)
_PROPHYLAXIS = re.compile(r"\bprophyla\w*|\bto\s+prevent\b", re.IGNORECASE)
_POST = re.compile(
    r"^\W*(?:\w+\W+)??(?:absent|none|negative|ruled\s+out|resolved|excluded|no"
    r"|(?:is|are|was|were)?\s*not\s+(?:seen|present|identified|visuali[sz]ed|detected|observed|appreciated|evident|assessed|evaluated|noted))\b",
    re.IGNORECASE,
)
_POST_EVENT = re.compile(_POST.pattern.replace("|resolved", ""), re.IGNORECASE)  # a seizure that "resolved" happened
# a clause that denies by itself: it opens with a negation or states a normal exam
_DENIAL = re.compile(
    r"^\W*(?:no|none|absent|negative|not\s+(?:seen|present|detected|observed|assessed|visuali[sz]ed)|nil|normal|unremarkable|resolved|no\s+growth)\b"
    r"|\b(?:optic\s+)?discs?\s+(?:are\s+|were\s+)?(?:sharp|flat|normal)\b|\bsharp\s+(?:optic\s+)?discs?\b|\bnot\s+(?:assessed|visuali[sz]ed|done|performed)\b",
    re.IGNORECASE,
)
PRE_WINDOW = 6  # words a pre-trigger reaches forward (NegEx uses 5-6)


@dataclass(frozen=True, slots=True)
class Reading:
    """What a text says about one finding (`read`)."""

    affirmed: tuple[str, ...]  # clauses naming the finding without negation / history / hypothesis
    uncertain: bool  # every affirming mention is hedged ("possible seizure"): a finding, for review
    mentioned: bool  # some clause names it (affirmed or not)
    denies: bool  # some clause negates, or states a normal exam
    classify: str  # the kept text with negated spans cut out (what the finding is classified from)
    kept: str  # the kept clauses as written ("no return to baseline" is read for status here)

    def present(self) -> bool:
        """A clause names it unnegated, or nothing names it and nothing is denied (the row's own
        code says it)."""
        return bool(self.affirmed) or (not self.mentioned and not self.denies)


def sentences(text: str) -> list[str]:
    """The sentences kept for reading: a reason-for-exam sentence is dropped, a section header cut."""
    out = []
    for s in _SENTENCE.split(text):
        if not s.strip() or _REASON_SECTION.search(s):
            continue
        s = _NUMBERING.sub("", _HEADER.sub("", s))
        if s.strip():
            out.append(s)
    return out


def clauses(text: str) -> list[str]:
    """The clauses of `text` (`sentences` cut on commas and contrast words); a hypothetical clause
    ("r/o cerebral edema", "evaluate for seizure") is dropped."""
    out = []
    for s in sentences(text):
        for c in _CLAUSE.split(s):
            c = c.strip()
            if c and not _HYPOTHESIS.search(c):
                out.append(c)
    return out


def _words_between(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _mention(clause: str, m: re.Match[str], post_resolved: bool) -> str:
    """'negated' | 'historical' | 'uncertain' | 'affirmed' of the term match `m` in `clause`."""
    before, after = clause[:m.start()], clause[m.end():]
    for t in _PRE.finditer(before):
        if _words_between(before[t.end():]) <= PRE_WINDOW:
            return "negated"
    if (_POST if post_resolved else _POST_EVENT).search(after):
        return "negated"
    if _HISTORY.search(before) or _PROPHYLAXIS.search(clause):
        return "historical"
    if _UNCERTAIN.search(clause):
        return "uncertain"
    return "affirmed"


def _prepared(clause: str) -> str:
    """A clause with pseudo-negations blanked and "cannot exclude" made one hedge word."""
    clause = _CANNOT_EXCLUDE.sub(" cannot_exclude ", clause)
    return _PSEUDO.sub(lambda m: " " * len(m.group(0)), clause)


def _cut_negated(clause: str) -> str:
    """`clause` without its negated spans: from a pre-trigger to the clause end ("without
    herniation"), or the whole clause when it denies by itself."""
    if _DENIAL.search(clause):
        return ""
    m = _PRE.search(clause)
    return clause[:m.start()] if m else clause


def read(text: str, names: Sequence[re.Pattern[str]], post_resolved: bool = True) -> Reading:
    """The `Reading` of `text` for the finding `names` name. `post_resolved=False` for an event
    (a seizure that "resolved spontaneously" happened)."""
    return _read(text, tuple(names), post_resolved)


@lru_cache(maxsize=8192)
def _read(text: str, names: tuple[re.Pattern[str], ...], post_resolved: bool) -> Reading:
    affirmed: list[str] = []
    hedged: list[bool] = []
    mentioned = denies = False
    keep: list[str] = []
    kept: list[str] = []
    for raw in clauses(text):
        c = _prepared(raw)
        states = [_mention(c, m, post_resolved) for p in names for m in p.finditer(c)]
        if states:
            mentioned = True
        if any(s in ("affirmed", "uncertain") for s in states):
            affirmed.append(raw)
            hedged.append("affirmed" not in states)
        if _DENIAL.search(c) or any(s == "negated" for s in states) or _PRE.search(c):
            denies = True
        if states and not any(s in ("affirmed", "uncertain") for s in states):
            continue  # a clause that names it only negated / historically: not read for its class
        kept.append(c)
        keep.append(_cut_negated(c) if not states else _cut_negated_keep_term(c, names))
    return Reading(tuple(affirmed), bool(hedged) and all(hedged), mentioned, denies,
                   "; ".join(k for k in keep if k.strip()), "; ".join(kept))


def _cut_negated_keep_term(clause: str, names: tuple[re.Pattern[str], ...]) -> str:
    """`_cut_negated` of a clause that affirms the term: only the span after a pre-trigger that
    follows the term is cut ("Cerebral edema without herniation" -> "Cerebral edema")."""
    first = min((m.start() for p in names for m in p.finditer(clause)), default=0)
    m = next((t for t in _PRE.finditer(clause) if t.start() > first), None)
    return clause[:m.start()] if m else clause


def uncertain(text: str, names: Sequence[re.Pattern[str]]) -> bool:
    """Is the finding in `text` affirmed only with a hedge ("possible seizure")? (for review)"""
    r = read(text, names)
    return bool(r.affirmed) and r.uncertain
