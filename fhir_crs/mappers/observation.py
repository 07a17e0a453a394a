"""Observation JSON -> `Measurement` / `Finding` events, or a `Skipped` reason.

Handles components (BP panels, Cerner pulse-ox rows carrying O2 flow and FiO2), every
effective[x] form, statuses (entered-in-error/cancelled excluded), unit spellings, the °F/°C
plausibility rule of grading-criteria §1.2 (a value < 50 in a °F field is a unit error and is
quarantined, never silently converted) and FiO2 sent as a fraction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import orjson

from ..events import Event, Finding, Measurement, Skipped
from ..mapping_files import ClassTable, CodeMap, ObservationKind
from ..ownoutput import OWN_OUTPUT_REASON, is_own_output
from .common import When, _parse_datetime, codings, label, parse_datetime, quantity, quantity_units, texts
from .negation import clauses, read, uncertain
from .reasons import classify
from .status import status_decision
from .units import CELSIUS, FAHRENHEIT, f_to_c, to_canonical


def affirmed_text(text: str, names: Sequence[re.Pattern[str]], post_resolved: bool = True) -> str | None:
    """The part of `text` a finding is classified from (`negation.read`); None: the finding is absent.

    A finding is present when a clause names it without negation, history or hypothesis, or when
    nothing names it and nothing is denied (the row's own code says it): "No seizure. Resting
    comfortably." is absent, "No midline shift. Diffuse cerebral edema." reads "Diffuse cerebral
    edema", "Cerebral edema without herniation" reads "Cerebral edema"."""
    r = read(text, names, post_resolved)
    return (r.classify or text) if r.present() else None


# coded answers of a finding row (§3.2 findings): SNOMED No / Absent / Negative and Yes / Present,
# LOINC LA32-8 No / LA33-6 Yes; by code or by the display alone
_CODED_NO = frozenset({"373067005", "2667000", "260385009", "LA32-8"})
_CODED_YES = frozenset({"373066001", "52101004", "LA33-6"})
_ANSWER_NO = re.compile(r"^\s*(no|absent|negative|not present|none|false)\s*$", re.IGNORECASE)
_ANSWER_YES = re.compile(r"^\s*(yes|present|positive|true)\s*$", re.IGNORECASE)


def coded_answer(codes: list[tuple[str, str]], words: list[str]) -> str | None:
    """'absent' / 'present' when a finding row's value is a coded No/Absent/Negative or
    Yes/Present (whatever the row's code says), else None (the value is read as text)."""
    cs = {c for _, c in codes}
    if cs & _CODED_NO or (not cs & _CODED_YES and words and all(_ANSWER_NO.match(w) for w in words)):
        return "absent"
    if cs & _CODED_YES or (words and all(_ANSWER_YES.match(w) for w in words)):
        return "present"
    return None


_PENDING = re.compile(r"\bpending\b|\bin progress\b|\bpreliminary\b", re.IGNORECASE)


def effective_time(res: dict[str, Any]) -> tuple[When | None, When | None]:
    """(start, end) of Observation.effective[x]; end only for effectivePeriod."""
    if "effectiveDateTime" in res:
        return parse_datetime(res["effectiveDateTime"]), None
    if "effectiveInstant" in res:
        return parse_datetime(res["effectiveInstant"]), None
    p = res.get("effectivePeriod")
    if isinstance(p, dict):
        start, end = parse_datetime(p.get("start")), parse_datetime(p.get("end"))
        return start or end, end if start else None
    return None, None


_AROUSE = r"(?:a?rous(?:e|ed|able|ible)|awak(?:en|enable|ened))"
# "Not arousable", "non-arousable", "cannot be roused", "unrousable", "does not arouse" (§3.2 grade 4)
_NOT_AROUSABLE = re.compile(
    rf"\bun-?{_AROUSE}|\bnon-?\s?{_AROUSE}|\bnot\s+(?:\w+\s+)?{_AROUSE}|\b(?:cannot|can ?not|can't|unable to)\s+(?:be\s+)?{_AROUSE}"
    rf"|\b(?:does|did)\s*(?:not|n't)\s+{_AROUSE}"
)
_NOT_AROUSED_BY_VOICE = re.compile(
    rf"(?:\bnot\s+(?:\w+\s+)?|\bnon-?\s?){_AROUSE}\s+(?:to|by)\s+(?:voice|verbal|speech|name)"
    r"|\b(?:no|not|non-?|without)\s*(?:\w+\s+)?respon\w*\s+(?:to|by)\s+(?:voice|verbal|speech|name)"
    r"|\b(?:does|did)\s*(?:not|n't)\s+respond\s+(?:to|by)\s+(?:voice|verbal|speech|name)"
)
# "no response", "not responsive", "non-responsive", "does not respond" (to anything named after it)
_NO_RESPONSE = re.compile(r"\bno\s+respon|\bnot\s+respon|\bnon-?\s?respon|\b(?:does|did)\s*(?:not|n't)\s+respond")
_TOUCH = re.compile(r"tactile|touch|physical|pain|shak|sternal|vigorous|repetitive")
# a stimulus that does arouse: "arouses to touch", "responds to pain", "opens eyes to voice"
_AROUSED_BY = re.compile(
    rf"(?:{_AROUSE}s?|respond\w*|opens?\s+(?:\w+\s+)?eyes|eyes\s+open\w*)\s+(?:only\s+)?(?:to|with|by)\s+(?:\w+\s+)?"
    r"(?P<s>touch|tactile|physical|pain\w*|sternal|shak\w*|voice|verbal|speech|name)"
)


def _level_of(t: str) -> str | None:
    if _NOT_AROUSED_BY_VOICE.search(t) and not _TOUCH.search(t):
        return "tactile"  # does not awaken to voice: at least a tactile stimulus is needed
    if re.search(r"unarousable|unresponsive|coma|stupor|vigorous|repetitive|^u$|obtunded", t) or _NOT_AROUSABLE.search(t) \
            or _NO_RESPONSE.search(t):
        return "unarousable"
    if re.search(r"tactile|touch|physical|pain|shak|^p$|sternal", t):
        return "tactile"
    if re.search(r"voice|verbal|speech|^v$|name", t):
        return "voice"
    if re.search(r"spontaneous|drowsy|letharg|somnolen", t):
        return "spontaneous"
    if re.search(r"alert|awake|normal|oriented|^a$|baseline", t):
        return "alert"
    return None


def consciousness_level(text: str) -> str | None:
    """ASTCT ICANS depressed-level-of-consciousness row, from free text or AVPU (§3.2): negated
    arousal ("not arousable", "cannot be roused", "no response to voice or touch", "not
    responsive") is unarousable; "not arousable to voice" needs at least a tactile stimulus; when
    one clause negates arousal and another names the stimulus that does arouse ("not arousable
    to voice, arouses to touch"), that stimulus decides."""
    t = text.strip().lower()
    if not t:
        return None
    level = _level_of(t)
    if level == "unarousable" or (level == "tactile" and _NOT_AROUSED_BY_VOICE.search(t)):
        woken = []
        for c in clauses(t):
            if _NOT_AROUSABLE.search(c) or _NO_RESPONSE.search(c) or re.search(r"\b(no|not|non|without)\b", c):
                continue
            m = _AROUSED_BY.search(c)
            if m:
                woken.append("voice" if re.match(r"voice|verbal|speech|name", m["s"]) else "tactile")
        if woken:
            return "voice" if "voice" in woken else "tactile"
    return level


_SEIZURE_WORDS = re.compile(
    r"seiz|convuls|status epilepticus|\btonic|\bclonic|\bgtc\b|grand mal|\bfits?\b|\bictal\b|\bncse\b", re.IGNORECASE
)
_STATUS = re.compile(
    r"status epilepticus|\bncse\b|prolonged|repetitive|refractory|> ?5 ?min|recurrent"
    r"|\b(?:without|no|not|never|did not|didn't)\s+(?:\w+\s+){0,2}?return\w*\s+to\s+(?:\w+\s+)?baseline",
    re.IGNORECASE,
)
# non-convulsive: the words, or seizures seen on EEG; the bare word "EEG" is not a seizure type
_NONCONVULSIVE = re.compile(
    r"non-?convulsive|electrographic|electrical seiz|subclinical|seiz\w*\s+(?:\w+\s+){0,2}?on\s+(?:the\s+)?(?:c?eeg|monitoring)"
    r"|\b(?:c?eeg)[- ](?:confirmed|proven|captured|detected|only)\b|\beeg seiz",
    re.IGNORECASE,
)


def seizure_type(text: str) -> str:
    """Seizure type from its text, read NegEx-style (`negation.read`: "Seizure ruled out",
    "History of seizures, none since admission", "seizure prophylaxis" are absent). The duration
    is not read here: it travels on the Finding (`end`) and grading compares it with the
    `seizure_status_min` setting (§3.2 "> 5 min"). Words alone ("status epilepticus",
    "prolonged", "> 5 min", "repetitive", "no return to baseline") make it status."""
    r = read(text, (_SEIZURE_WORDS,), post_resolved=False)
    if not r.present():
        return "absent"
    if _STATUS.search(r.kept):
        return "status"
    t = (r.classify or text).lower()
    if _NONCONVULSIVE.search(t):
        return "nonconvulsive"
    if re.search(r"generali[sz]ed|tonic|clonic|gtc|grand mal|bilateral", t):
        return "generalized"
    if re.search(r"focal|partial|simple|complex", t):
        return "focal"
    return "unspecified"


_BLEED_WORDS = re.compile(r"h(a)?emorrhag|bleed|\bICH\b", re.IGNORECASE)
_EDEMA_WORDS = re.compile(r"o?edema|swelling|herniat|vasogenic|effacement", re.IGNORECASE)
# a negated improvement is no resolution: "not improved", "no improvement", "without resolution", "failed to resolve"
_NOT_IMPROVING = re.compile(
    r"\b(not|no|without|never|nor|failed to|fails to)\s+(\w+\s+){0,2}?(resolv\w*|resolution|improv\w*|decreas\w*|regress\w*|less)\b"
    r"|\bun(changed|improved|resolved)\b|\bnon-?(improv|resolv)\w*",
    re.IGNORECASE,
)
# resolution words; an improvement ("decreasing", "slightly improved") is still oedema on imaging
_RESOLVED = re.compile(
    r"\bresol(?:v\w*|ution)\b|\bno\s+longer\s+(?:seen|visible|present|evident|identified|demonstrated|apparent)\b|\bdisappear\w*",
    re.IGNORECASE,
)
_PERSISTS = re.compile(r"\bpersist\w*|\bresidual\b|\bpartial(?:ly)?\b|\bincomplete(?:ly)?\b|\bremain\w*|\bstill\b", re.IGNORECASE)


def _edema_resolved(text: str) -> bool:
    """Does the text say the oedema resolved? The resolving word must refer to the oedema: in a
    clause that names it, or a bare qualifier clause of up to three words ("…, resolving");
    an oedema said to persist ("partially resolved, residual edema") is not resolved."""
    if _PERSISTS.search(text):
        return False
    for c in clauses(_NOT_IMPROVING.sub(" ", text)):
        if _RESOLVED.search(c) and (_EDEMA_WORDS.search(c) or len(re.findall(r"\w+", c)) <= 3):
            return True
    return False


def edema_extent(text: str) -> str:
    """Oedema extent on imaging (§3.2), read NegEx-style (`negation.read`): a bleed named unnegated
    is haemorrhagic; resolution words about the oedema are resolution ("resolving", "interval
    resolution", "no longer seen"); an improving but persistent oedema is graded by its extent;
    the extent is read from the affirmed parts only ("without herniation" does not make it
    diffuse)."""
    if read(text, (_BLEED_WORDS,)).affirmed:
        return "hemorrhagic"
    if _edema_resolved(text):
        return "resolving"
    r = read(text, (_EDEMA_WORDS,))
    if not r.present():
        return "absent"
    t = r.classify or text
    if re.search(r"diffuse|global|generali[sz]ed|herniation|bilateral", t, re.IGNORECASE):
        return "diffuse"
    if re.search(r"focal|local|vasogenic|occipital|frontal|parietal|temporal|lobe|cerebell", t, re.IGNORECASE):
        return "focal"
    return "unspecified"


# papilledema stage (Frisén 0-5, arabic or roman): CARTOX CRES 3 for stage 1-2, 4 for 3-5 (§7.2)
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5}
_STAGE = re.compile(r"\b(?:stage|grade|fris[eé]n)\s*(?:grade\s*|stage\s*)?(?P<n>[0-5]|iv|v|i{1,3})\b", re.IGNORECASE)


def papilledema_stage(text: str) -> int | None:
    """The highest papilledema stage (grade, Frisén) an ICP-sign text states in its affirmed
    parts, else None."""
    r = read(text, (re.compile(r"papill?o?edema|disc (?:swelling|edema|oedema)", re.IGNORECASE),))
    found = [int(n) if n.isdigit() else _ROMAN[n.lower()] for m in _STAGE.finditer(r.classify) if (n := m["n"])]
    return max(found) if found else None


_ANSWERED = frozenset({"seizure", "cerebral_edema", "icp_sign", "motor_weakness", "intracranial_hemorrhage", "hemophagocytosis"})
def hedged(kind: str, text: str) -> bool:
    """Is finding `kind` affirmed in `text` only with a hedge ("possible seizure", "concern for
    cerebral edema")? Graded as a finding and flagged for review (clinical safety rule)."""
    names = {"seizure": _SEIZURE_WORDS, "cerebral_edema": _EDEMA_WORDS}.get(kind)
    if names is None:
        w = _FINDING_WORDS.get(kind)
        if w is None:
            return False
        names = _FINDING_PATTERNS.setdefault(kind, re.compile(w, re.IGNORECASE))
    return bool(text) and uncertain(text, (names,))


_FINDING_PATTERNS: dict[str, re.Pattern[str]] = {}
_TREMOR = re.compile(r"tremor|myoclon|asterixis|dysmetria|twitch", re.IGNORECASE)
_GENERALIZED_WEAKNESS = re.compile(r"generali[sz]ed|global|diffuse|decondition|fatigue|asthenia|overall|whole[- ]body", re.IGNORECASE)
_FOCAL_WEAKNESS = re.compile(
    r"hemi|para|mono|tetra|quadri|\bleft\b|\bright\b|\barms?\b|\blegs?\b|limb|\bface\b|facial|focal|unilateral|foot drop|drift"
    r"|pleg|palsy|\bhand\b|grip|\bl\b|\br\b|lower extremit|upper extremit",
    re.IGNORECASE,
)


# words that name each finding in a non-negated clause after a negated one (besides the kind's
# own text patterns in mappings/observations.toml)
_FINDING_WORDS = {
    "motor_weakness": r"weak|pare(sis|tic)|pleg|palsy|deficit|drift|foot drop|(unable to|cannot|can't) move",
    "icp_sign": r"papill|posturing|cushing|palsy|abducens|\b(cn|cranial nerve) ?(vi|6)\b|\bicp\b|intracranial pressure|herniat",
    "intracranial_hemorrhage": r"h(a)?emorrhag|bleed|h(a)?ematoma|\bich\b|\bsah\b|\bsdh\b",
    "hemophagocytosis": r"h(a)?emophagocyt|\bhlh\b|macrophage activation",
}
_AFFIRMS = r"\b(present|yes)\b"


_STAINED = re.compile(r"\b(gram|coag(?:ulase)?)[\s-]*(positive|negative|neg|pos|variable)\b", re.IGNORECASE)


def culture_result(text: str, codes: list[tuple[str, str]], table: ClassTable) -> tuple[str, bool]:
    """(positive | negative | pending, decided by text?) of a blood-culture result: the coded
    value first (mappings/reasons.toml [culture_positive] / [culture_negative]), then the result
    text, negation-aware. Organism words are growth: "Gram-negative rods" and "coagulase-negative
    staphylococci" are positive cultures, "no growth" / "not detected" negative. When both match,
    positive wins (the flag that asks for attribution is never hidden); a non-empty text that
    names neither is read as positive (for review)."""
    coded, _ = classify(table, codes, [])
    if "culture_positive" in coded:
        return "positive", False
    if "culture_negative" in coded:
        return "negative", False
    if not text.strip():
        # a coded value in neither list (an organism code) is growth; no value at all is pending
        return ("positive" if codes else "pending"), False
    words = _STAINED.sub(lambda m: f"{m.group(1)}_{m.group(2)}", text)  # "Gram-negative" is not a negation
    found, _ = classify(table, [], [words])
    if "culture_positive" in found:
        return "positive", True
    if _PENDING.search(text):
        return "pending", True
    if "culture_negative" in found:
        return "negative", True
    if any(m.name == "culture_positive" and any(p.search(words) for p in m.text) for m in table.entries):
        return "negative", True  # growth words only in negated form ("not positive", "no organisms isolated")
    return "positive", True


def _value_texts(res: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """(codings, texts) of a coded/string/boolean value."""
    if "valueCodeableConcept" in res:
        return codings(res["valueCodeableConcept"]), texts(res["valueCodeableConcept"])
    if isinstance(res.get("valueString"), str):
        return [], [res["valueString"]]
    if isinstance(res.get("valueBoolean"), bool):
        return [], ["present" if res["valueBoolean"] else "absent"]
    if isinstance(res.get("valueInteger"), int):
        return [], [str(res["valueInteger"])]
    return [], []


def _numeric_value(res: dict[str, Any]) -> tuple[float, list[str]] | None:
    if "valueQuantity" in res:
        q = quantity(res["valueQuantity"])
        if q is None:
            return None
        return q[0], quantity_units(res["valueQuantity"])
    v = res.get("valueInteger")
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v), []
    s = res.get("valueString")
    if isinstance(s, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([^\d\s].*)?", s)
        if m:
            return float(m.group(1)), [m.group(2).strip()] if m.group(2) else []
    return None


def _reference_range(res: dict[str, Any], factor: float) -> tuple[float | None, float | None]:
    for rr in res.get("referenceRange") or []:
        if not isinstance(rr, dict):
            continue
        hi = quantity(rr.get("high"))
        lo = quantity(rr.get("low"))
        return (lo[0] * factor if lo else None), (hi[0] * factor if hi else None)
    return None, None


_ASSESSMENTS = ("ice_score", "capd_score", "cartox10_score")
_UNABLE = re.compile(r"unable|not (able|possible)|cannot|can ?not|can't|unassessable", re.IGNORECASE)
# the assessment was not done for a reason outside the patient's state: not a finding
_LOGISTIC = re.compile(
    r"off (the )?(unit|floor|ward)|in (a |the )?procedure|procedur|\bMRI\b|\bCT\b|\bscan|imaging|radiology|transport|dialysis"
    r"|declin|refus|defer|not done|not performed|not asked|not attempted|postpone|asleep|sleeping|interpreter|language"
    r"|family|parent|visitor|shower|\baway\b|out of room|not available|unavailable",
    re.IGNORECASE,
)
# the patient's state makes the assessment impossible: "unable to perform" (an ICANS finding)
_PATIENT_STATE = re.compile(
    r"obtund|arous|unrespons|not respon|letharg|somnol|stupor|coma|encephalopath|confus|agitat|deliri|aphasi|\bmute\b|intubat"
    r"|sedat|critical|seiz|postictal|\bGCS\b|drowsy|altered|too (sick|unwell)|mental status",
    re.IGNORECASE,
)


def _not_assessed(name: str, res: dict[str, Any], ref: str, start: When, words: list[str], by_text: bool) -> list[Event] | Skipped:
    """An ICE / CAPD / CARTOX-10 row without a score. Only an explicit 'unable to perform'
    reading (the text says unable / cannot, for no logistic reason, or because of the patient's
    state) is the ICANS finding "unable to perform" (§3.2, §3.3, §7.2). A dataAbsentReason code
    (not-performed, asked-declined, not-asked, unknown) or a text saying the assessment was not
    done for a logistic reason (off unit, in a procedure, declined, deferred) is no assessment:
    a named skip, never a grade."""
    notes = [n.get("text", "") for n in res.get("note") or [] if isinstance(n, dict)]
    text = " ".join(w for w in [*words, *notes] if w)
    if _UNABLE.search(text) and (not _LOGISTIC.search(text) or _PATIENT_STATE.search(text)):
        return [Finding("unable_" + name, start.time, "unable", ref, text, matched_by_text=by_text)]
    return Skipped(ref, f"{name}: not assessed ({text or 'no reason given'}): not 'unable to perform', not graded", "no_value")


# RASS answers (LOINC LA answer list of the Richmond Agitation-Sedation Scale), by display
_RASS_WORDS = (("combative", 4), ("very agitated", 3), ("agitated", 2), ("restless", 1), ("alert and calm", 0),
               ("drowsy", -1), ("light sedation", -2), ("moderate sedation", -3), ("deep sedation", -4),
               ("unarousable", -5), ("not arousable", -5), ("alert", 0), ("calm", 0))
_RASS_NUMBER = re.compile(r"^\s*(?:RASS\s*:?\s*)?([+\-\u2212]?\s*[0-5])(?!\d)", re.IGNORECASE)


def rass_answer(words: list[str]) -> int | None:
    """A RASS level sent as a coded answer or a word: a leading signed number ("-5 Unarousable",
    "+1"), else the display ("Moderate sedation" = -3); None when neither."""
    for w in words:
        m = _RASS_NUMBER.match(w)
        if m:
            return int(m.group(1).replace("\u2212", "-").replace(" ", ""))
    for w in words:
        low = w.lower()
        for phrase, v in _RASS_WORDS:
            if phrase in low:
                return v
    return None


_MATCH_CACHE_SIZE = 20_000


class ObservationMapper:
    def __init__(self, code_map: CodeMap):
        self.code_map = code_map
        self._matched: dict[bytes, tuple[ObservationKind | None, bool]] = {}
        self._units: dict[tuple[str, ...], tuple[float | None, str, str | None]] = {}
        self._classified: dict[tuple[str, ...], frozenset[str]] = {}
        self._canonical: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._temperature_units: dict[tuple[str, ...], str] = {}
        self._finding_words: dict[str, tuple[re.Pattern[str], ...]] = {}

    def match_kind(self, cc: Any) -> tuple[ObservationKind | None, bool]:
        """The kind a `code` names. A feed repeats a few hundred distinct codes: the answer is
        kept by the code's JSON text (bounded), so each one is matched once."""
        try:
            key = orjson.dumps(cc)
        except (TypeError, orjson.JSONEncodeError):  # an integer past 64 bits: not cached
            return self._match_kind(cc)
        hit = self._matched.get(key)
        if hit is None:
            if len(self._matched) >= _MATCH_CACHE_SIZE:
                self._matched.clear()
            hit = self._matched[key] = self._match_kind(cc)
        return hit

    def _match_kind(self, cc: Any) -> tuple[ObservationKind | None, bool]:
        name, by_text = self.code_map.observation_table.match(codings(cc), texts(cc))
        return (self.code_map.observations[name] if name else None), by_text

    def map(self, res: dict[str, Any], ref: str, flags: set[str]) -> list[Event] | Skipped:
        kind, by_text = self.match_kind(res.get("code"))
        if (kind is None or by_text) and is_own_output(res):
            # a result Observation of a summary Bundle fhir-crs wrote, stored on its own: its codes
            # are in no mapping table, so only an unmatched (or text-matched) code needs the check
            return Skipped(ref, OWN_OUTPUT_REASON, "own_output")
        why, flag, code = status_decision(res)
        if why:
            return Skipped(ref, why, code)
        if flag:
            flags.add(flag)
        if kind is not None and "component" not in res and kind.value != "components":
            # the usual vital sign / lab: one value, no components (what the general way below
            # gives for it, without its lists)
            when = res.get("effectiveDateTime")
            if type(when) is str:
                start = _parse_datetime(when)
                if start is not None:
                    if start.tz_assumed:
                        flags.add("timezone_assumed")
                    return self._one(kind, res, ref, start, None, by_text, flags)
        components = [c for c in res.get("component") or [] if isinstance(c, dict)]
        if kind is None and not components:
            return Skipped(ref, f"code not in mappings/observations.toml: {label(res.get('code'))}", "unmapped_code")
        start, end = effective_time(res)
        if start is None:
            return Skipped(ref, "no effective time (effective[x] missing or unreadable)", "no_time")
        if start.tz_assumed:
            flags.add("timezone_assumed")
        events: list[Event] = []
        reasons: list[str] = []
        codes: list[str] = []
        if kind is not None and kind.value != "components":
            out = self._one(kind, res, ref, start, end, by_text, flags)
            if isinstance(out, Skipped):
                reasons.append(out.reason)
                codes.append(out.code)
            else:
                events.extend(out)
        for comp in components:
            ck, c_text = self.match_kind(comp.get("code"))
            if ck is None or ck.value == "components":
                continue
            out = self._one(ck, comp, ref, start, end, by_text or c_text, flags)
            if isinstance(out, Skipped):
                reasons.append(f"component {ck.name}: {out.reason}")
                codes.append(out.code)
            else:
                events.extend(out)
        if events:
            return events
        if reasons:
            return Skipped(ref, "; ".join(reasons), codes[0])
        if kind is not None and kind.value == "components":
            return Skipped(ref, f"{kind.name} without usable components", "no_value")
        return Skipped(ref, f"code not in mappings/observations.toml: {label(res.get('code'))}", "unmapped_code")

    def _one(
        self, kind: ObservationKind, res: dict[str, Any], ref: str, start: When, end: When | None,
        by_text: bool, flags: set[str],
    ) -> list[Event] | Skipped:
        name = kind.name
        if kind.value in ("coded", "boolean"):
            return self._finding(kind, res, ref, start, end, by_text)
        if "dataAbsentReason" in res and not any(k.startswith("value") for k in res):
            if name in _ASSESSMENTS:
                return _not_assessed(name, res, ref, start, [label(res["dataAbsentReason"])], by_text)
            return Skipped(ref, f"no value (dataAbsentReason: {label(res['dataAbsentReason'])})", "no_value")
        vq = res.get("valueQuantity")
        if type(vq) is dict:
            return self._quantity(kind, vq, res, ref, start, by_text, flags)
        num = _numeric_value(res)
        if num is None and name == "rass":
            v = rass_answer(_value_texts(res)[1])  # a coded (LOINC LA) or worded RASS answer
            if v is not None:
                return self._measurement(kind, res, ref, start, float(v), [], by_text, flags)
        if num is None:  # "unable to assess" scores, else a no_value skip
            return self._measurement(kind, res, ref, start, None, [], by_text, flags)
        return self._measurement(kind, res, ref, start, num[0], num[1], by_text, flags)

    def _quantity(
        self, kind: ObservationKind, vq: dict[str, Any], res: dict[str, Any], ref: str, start: When, by_text: bool,
        flags: set[str],
    ) -> list[Event] | Skipped:
        """`_one` of a valueQuantity (no dataAbsentReason): `_numeric_value` read in place."""
        v = vq.get("value")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):  # (a tuple: cheaper than a union)
            return self._measurement(kind, res, ref, start, None, [], by_text, flags)
        c, u = vq.get("code"), vq.get("unit")
        spellings = [c, u] if type(c) is str and type(u) is str and c and u else [str(x) for x in (c, u) if x]
        return self._measurement(kind, res, ref, start, float(v), spellings, by_text, flags)

    def _measurement(
        self, kind: ObservationKind, res: dict[str, Any], ref: str, start: When, value: float | None,
        spellings: list[str], by_text: bool, flags: set[str],
    ) -> list[Event] | Skipped:
        """The event of a numeric value (None: there is none) in the units `spellings` names."""
        name = kind.name
        if value is None:
            if name in _ASSESSMENTS:
                _, ts = _value_texts(res)
                if ts:
                    return _not_assessed(name, res, ref, start, ts, by_text)
            return Skipped(ref, f"{name}: no numeric value", "no_value")
        if start.precision != "time" and kind.group != "lab":
            return Skipped(ref, f"{name}: effective time has {start.precision} precision only", "imprecise_time")
        raw_value, raw_unit = value, None
        if name == "temperature":
            out = self._temperature(value, spellings, ref, flags)
            if isinstance(out, Skipped):
                return out
            value, raw_unit, note = out
            if note:
                flags.add(note)
        else:
            if name in ("fio2", "spo2"):
                units = self._canonical_units(spellings)
                if value <= 1.0 and (not units or units[0] in ("1", "%")):
                    value *= 100.0  # fraction sent as "%" or "1" (terminology.md §1.3 FiO2 trap)
                    spellings = ["%"]
            if name == "anc" and not spellings and value < 50:
                value *= 1000.0
                flags.add("unit_assumed")
                spellings = ["/uL"]
            if not spellings and kind.unitless:
                # a value sent without a unit under a code whose unit is known (a molar LOINC
                # code is in umol/L): read in that unit, flagged as assumed, never as the kind's
                unit = next((kind.unitless[f"{sy}|{co}"] for sy, co in codings(res.get("code")) if f"{sy}|{co}" in kind.unitless), None)
                if unit is not None:
                    spellings = [unit]
                    flags.add("unit_assumed")
            conv, raw_unit, note = self._to_canonical(kind, value, spellings)
            if conv is None:
                return Skipped(ref, f"{name}: {note}", "unit_error")
            if note:
                flags.add(note)
            factor = conv / value if value else 1.0
            value = conv
        if (kind.min is not None and value < kind.min) or (kind.max is not None and value > kind.max):
            return Skipped(ref, f"{name}: implausible value {raw_value:g} {raw_unit or ''}".rstrip() + " (quarantined)", "implausible_value")
        lln = uln = None
        if kind.group == "lab":
            f = factor if name != "temperature" else 1.0
            lln, uln = _reference_range(res, f)
        return [
            Measurement(name, start.time, value, kind.unit, ref, raw_value, raw_unit, uln, lln, by_text,
                        start.precision != "time")  # (positional: the field order of Measurement)
        ]

    def _canonical_units(self, spellings: list[str]) -> tuple[str, ...]:
        """`CodeMap.canonical_unit` of each spelling, kept per spellings (bounded)."""
        key = tuple(spellings)
        hit = self._canonical.get(key)
        if hit is None:
            if len(self._canonical) >= _MATCH_CACHE_SIZE:
                self._canonical.clear()
            hit = self._canonical[key] = tuple(self.code_map.canonical_unit(u) for u in spellings)
        return hit

    def _indications(self, words: list[str]) -> frozenset[str]:
        """mappings/reasons.toml classes of an O2 device row's texts, kept per texts (a feed
        charts a few device wordings over and over; bounded)."""
        key = tuple(words)
        hit = self._classified.get(key)
        if hit is None:
            if len(self._classified) >= _MATCH_CACHE_SIZE:
                self._classified.clear()
            hit = self._classified[key] = classify(self.code_map.reasons, [], words)[0]
        return hit

    def _to_canonical(self, kind: ObservationKind, value: float, spellings: list[str]) -> tuple[float | None, str, str | None]:
        """`units.to_canonical`, its unit decision kept per (kind, spellings): a feed sends a few
        spellings per kind. The value is multiplied by the same factor (x 1.0 when the unit is
        already the kind's: exact for every float)."""
        key = (kind.name, *spellings)
        plan = self._units.get(key)
        if plan is None:
            if len(self._units) >= _MATCH_CACHE_SIZE:
                self._units.clear()
            factor, unit, note = to_canonical(kind, 1.0, spellings, self.code_map)
            plan = self._units[key] = (factor, unit, note)
        factor, unit, note = plan
        return (None if factor is None else value * factor), unit, note

    def _temperature(self, value: float, spellings: list[str], ref: str, flags: set[str]) -> tuple[float, str, str | None] | Skipped:
        key = tuple(spellings)
        unit = self._temperature_units.get(key)
        if unit is None:  # the first °C / °F spelling, else the first; kept per spellings (bounded)
            if len(self._temperature_units) >= _MATCH_CACHE_SIZE:
                self._temperature_units.clear()
            units = self._canonical_units(spellings)
            unit = self._temperature_units[key] = next((u for u in units if u in (CELSIUS, FAHRENHEIT)), units[0] if units else "")
        if unit == FAHRENHEIT:
            if value < 50:
                flags.add("unit_error")
                return Skipped(ref, f"temperature {value:g} in a °F field is implausible (< 50 °F): unit error, quarantined", "unit_error")
            if not 77 <= value <= 113:
                return Skipped(ref, f"temperature {value:g} °F outside 77–113 °F: quarantined", "implausible_value")
            return f_to_c(value), FAHRENHEIT, None
        if unit == CELSIUS:
            if 77 <= value <= 113:
                flags.add("unit_error")
                return Skipped(ref, f"temperature {value:g} in a °C field looks like °F: unit error, quarantined", "unit_error")
            return value, CELSIUS, None
        if not unit:
            if 25 <= value <= 45:
                return value, CELSIUS, "unit_assumed"
            return Skipped(ref, f"temperature {value:g} without a unit is not plausible as °C: quarantined", "unit_error")
        return Skipped(ref, f"temperature unit '{spellings[0]}' is not °C or °F", "unit_error")

    def _names(self, name: str) -> tuple[re.Pattern[str], ...]:
        """The patterns of the words that name finding `name` in a clause: its text patterns in
        mappings/observations.toml, `_FINDING_WORDS` and affirming words ("present", "yes")."""
        hit = self._finding_words.get(name)
        if hit is None:
            own = tuple(p for m in self.code_map.observation_table.entries if m.name == name for p in m.text)
            extra = tuple(re.compile(w, re.IGNORECASE) for w in (_FINDING_WORDS.get(name), _AFFIRMS) if w)
            hit = self._finding_words[name] = own + extra
        return hit

    def _finding(
        self, kind: ObservationKind, res: dict[str, Any], ref: str, start: When, end: When | None, by_text: bool
    ) -> list[Event] | Skipped:
        if start.precision != "time" and kind.name not in ("cause_of_death", "hemophagocytosis", "blood_culture"):
            return Skipped(ref, f"{kind.name}: effective time has {start.precision} precision only", "imprecise_time")
        v_codes, v_texts = _value_texts(res)
        code_texts = texts(res.get("code"))
        note_texts = [n.get("text", "") for n in res.get("note") or [] if isinstance(n, dict)]
        t_end = end.time if end else None
        name = kind.name
        if name == "o2_device":
            cls, dev_text = self.code_map.devices.match(v_codes, v_texts)
            if cls is None:
                return Skipped(ref, f"O2 device value not in mappings/devices.toml: {(v_texts or ['(empty)'])[0]!r}", "unmapped_value")
            indications = self._indications(v_texts + note_texts)  # "home CPAP", "for airway protection"
            return [Finding(name, start.time, cls, ref, (v_texts or [""])[0], t_end, by_text or dev_text, indications)]
        if name == "consciousness":
            level = None
            for t in v_texts:
                level = consciousness_level(t)
                if level:
                    break
            if level is None:
                return Skipped(ref, f"level of consciousness value not recognised: {(v_texts or ['(empty)'])[0]!r}", "unmapped_value")
            return [Finding(name, start.time, level, ref, v_texts[0], t_end, by_text)]
        all_text = " ".join(v_texts + note_texts)
        answer = coded_answer(v_codes, v_texts) if name in _ANSWERED else None
        if answer is not None:
            # a coded No/Absent/Negative (Yes/Present) decides whatever the row's code says; the
            # notes (else the code's text) still type a present finding
            all_text = " ".join(note_texts)
        if name == "seizure":
            for comp in res.get("component") or []:
                q = quantity(comp.get("valueQuantity")) if isinstance(comp, dict) else None
                if q and re.search(r"duration", " ".join(texts(comp.get("code"))), re.IGNORECASE):
                    unit = self.code_map.canonical_unit(q[1])
                    minutes = q[0] * {"s": 1 / 60, "h": 60}.get(unit, 1)
                    if 0 < minutes <= 7 * 24 * 60:  # (an implausible duration is not carried)
                        # the duration travels as the end time; grading compares it with seizure_status_min
                        t_end = start.time + timedelta(minutes=minutes)
            text = all_text or " ".join(code_texts)
            detail = "absent" if answer == "absent" else seizure_type(text)
            if answer == "present" and detail == "absent":
                detail = "unspecified"
            return [Finding(name, start.time, detail, ref, text, t_end, by_text)]
        if name == "cerebral_edema":
            text = all_text or " ".join(code_texts)
            detail = "absent" if answer == "absent" else edema_extent(text)
            if answer == "present" and detail in ("absent", "resolving"):
                detail = "unspecified"
            return [Finding(name, start.time, detail, ref, text, t_end, by_text)]
        if name == "blood_culture":
            text = " ".join(v_texts) or " ".join(
                label(i) for i in res.get("interpretation") or [] if isinstance(i, dict)
            )
            interp = [c for i in res.get("interpretation") or [] for _, c in codings(i)]
            # coded first: the interpretation (v3 POS/NEG), then the coded value, then its text
            if any(c in ("POS", "A", "AA", "DET") for c in interp):
                result, result_by_text = "positive", False
            elif any(c in ("NEG", "N", "ND") for c in interp):
                result, result_by_text = "negative", False
            else:
                result, result_by_text = culture_result(text, v_codes, self.code_map.reasons)
            return [Finding(name, start.time, result, ref, text, t_end, by_text or result_by_text)]
        if name == "cause_of_death":
            text = all_text or " ".join(code_texts)
            return [Finding(name, start.time, "documented", ref, text, t_end, by_text)]
        # icp_sign, motor_weakness, intracranial_hemorrhage, hemophagocytosis: present when a clause
        # names it unnegated, or nothing names it and nothing is denied (`negation.read`)
        text = all_text
        shown = text or " ".join(code_texts)
        if answer is not None:
            return [Finding(name, start.time, answer, ref, shown, t_end, by_text)]
        detail = self.finding_detail(name, text)
        return [Finding(name, start.time, detail, ref, shown, t_end, by_text)]

    def finding_detail(self, name: str, text: str) -> str:
        """'present' / 'absent' of a finding row's text (`negation.read`); for motor weakness
        also 'generalized' (§3.2: only deep FOCAL weakness is ASTCT grade 4) and tremor,
        myoclonus or asterixis alone are absent (§3.2 ‡: graded by CTCAE, not ICANS)."""
        if not text:
            return "present"
        r = read(text, self._names(name))
        if not r.present():
            return "absent"
        if name != "motor_weakness":
            return "present"
        weak = read(text, self._names(name)[:-1])  # (without the affirming words "present", "yes")
        if _TREMOR.search(text) and not weak.affirmed:
            return "absent"
        said = " ".join(weak.affirmed) or text
        if _GENERALIZED_WEAKNESS.search(said) and not _FOCAL_WEAKNESS.search(said):
            return "generalized"
        return "present"
