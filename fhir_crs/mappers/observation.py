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
from .reasons import classify
from .status import status_decision
from .units import CELSIUS, FAHRENHEIT, f_to_c, to_canonical

_NEGATIVE = re.compile(
    r"^\s*(no|none|absent|negative|not (seen|present|detected|observed)|nil|normal|resolved|no growth)\b",
    re.IGNORECASE,
)  # anchored at the start of a clause (`clauses`), never of the whole text
_CLAUSE_BREAK = re.compile(r"(?<!\d)\.|\.(?!\d)|[;\n]")  # a full stop (not a decimal point), ";" or a new line


def clauses(text: str) -> list[str]:
    """The non-empty clauses of a text, split on full stops, semicolons and new lines."""
    return [c.strip() for c in _CLAUSE_BREAK.split(text) if c.strip()]


def affirmed_text(text: str, names: Sequence[re.Pattern[str]], negated: re.Pattern[str] = _NEGATIVE) -> str | None:
    """The part of `text` a finding is read from, clause by clause; None: the finding is absent.

    A clause that opens with a negation ("No prior history of epilepsy", "Normal tone") is
    negated. Without a negated clause the whole text is read, as it stands. With one, the finding
    is absent unless a non-negated clause names it (`names`): "No seizure. Resting comfortably."
    stays absent, "No midline shift. Diffuse cerebral edema." reads "Diffuse cerebral edema".
    """
    parts = clauses(text)
    kept = [c for c in parts if not negated.search(c)]
    if len(kept) == len(parts):
        return text
    if not any(p.search(c) for p in names for c in kept):
        return None
    return "; ".join(kept)

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
_NOT_AROUSED_BY_VOICE = re.compile(rf"(?:\bnot\s+(?:\w+\s+)?|\bnon-?\s?){_AROUSE}\s+(?:to|by)\s+(?:voice|verbal|speech|name)")


def consciousness_level(text: str) -> str | None:
    """ASTCT ICANS depressed-level-of-consciousness row, from free text or AVPU (§3.2): negated
    arousal ("not arousable", "cannot be roused") is unarousable; "not arousable to voice" needs
    at least a tactile stimulus."""
    t = text.strip().lower()
    if not t:
        return None
    if _NOT_AROUSED_BY_VOICE.search(t) and not re.search(r"tactile|touch|physical|pain|shak|sternal|vigorous|repetitive", t):
        return "tactile"  # does not awaken to voice: at least a tactile stimulus is needed
    if re.search(r"unarousable|unresponsive|coma|stupor|vigorous|repetitive|^u$|obtunded", t) or _NOT_AROUSABLE.search(t):
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


_SEIZURE_WORDS = re.compile(
    r"seiz|convuls|status epilepticus|\btonic|\bclonic|\bgtc\b|grand mal|\bfits?\b|\bictal\b|\bncse\b", re.IGNORECASE
)


def seizure_type(text: str) -> str:
    """Seizure type from its text, negation read by clause (`affirmed_text`). The duration is not
    read here: it travels on the Finding (`end`) and grading compares it with the
    `seizure_status_min` setting (§3.2 "> 5 min"). Words alone ("status epilepticus",
    "prolonged", "> 5 min", "repetitive") make it status."""
    read = affirmed_text(text, (_SEIZURE_WORDS,))
    if read is None:
        return "absent"
    t = read.lower()
    if re.search(r"status epilepticus|prolonged|repetitive|without return|refractory|> ?5 ?min|recurrent", t):
        return "status"
    if re.search(r"non-?convulsive|eeg|electrographic|subclinical", t):
        return "nonconvulsive"
    if re.search(r"generali[sz]ed|tonic|clonic|gtc|grand mal|bilateral", t):
        return "generalized"
    if re.search(r"focal|partial|simple|complex", t):
        return "focal"
    return "unspecified"


_NEGATED_BLEED = re.compile(r"\b(no|without|not|negative for)\s+(\w+\s+){0,2}?(h(a)?emorrhag\w*|bleed\w*|ICH)\b", re.IGNORECASE)


_NO_EDEMA = re.compile(r"^\s*(no|none|absent|negative|not (seen|present|detected|observed)|nil|normal|resolved)\b|\bno (cerebral |brain )?o?edema\b", re.IGNORECASE)
_EDEMA_WORDS = re.compile(r"o?edema|swelling|herniat|vasogenic|effacement|h(a)?emorrhag|bleed|\bICH\b", re.IGNORECASE)
# a negated improvement is no resolution: "not improved", "no improvement", "without resolution", "failed to resolve"
_NOT_IMPROVING = re.compile(
    r"\b(not|no|without|never|nor|failed to|fails to)\s+(\w+\s+){0,2}?(resolv\w*|resolution|improv\w*|decreas\w*|regress\w*|less)\b"
    r"|\bun(changed|improved|resolved)\b|\bnon-?(improv|resolv)\w*",
    re.IGNORECASE,
)


def edema_extent(text: str) -> str:
    """Oedema extent on imaging (§3.2), negation read by clause (`affirmed_text`); a negated
    improvement ("not improved compared with prior") is not resolution."""
    t = _NEGATED_BLEED.sub(" ", text.lower())
    read = affirmed_text(t, (_EDEMA_WORDS,), _NO_EDEMA)
    if read is None:
        return "absent"
    t = read
    if re.search(r"h(a)?emorrhag|bleed|\bICH\b", t, re.IGNORECASE):
        return "hemorrhagic"
    if re.search(r"resolv|improv|decreas|regress|less (prominent|extensive)", _NOT_IMPROVING.sub(" ", t)):
        return "resolving"
    if re.search(r"diffuse|global|generali[sz]ed|herniation|bilateral", t):
        return "diffuse"
    if re.search(r"focal|local|vasogenic|occipital|frontal|parietal|temporal|lobe|cerebell", t):
        return "focal"
    return "unspecified"


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
            if name in ("ice_score", "capd_score", "cartox10_score"):
                # "unable to perform" the assessment is itself an ICANS finding.
                return [Finding("unable_" + name, start.time, "unable", ref, label(res["dataAbsentReason"]), matched_by_text=by_text)]
            return Skipped(ref, f"no value (dataAbsentReason: {label(res['dataAbsentReason'])})", "no_value")
        vq = res.get("valueQuantity")
        if type(vq) is dict:
            return self._quantity(kind, vq, res, ref, start, by_text, flags)
        num = _numeric_value(res)
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
            if name in ("ice_score", "capd_score", "cartox10_score"):
                _, ts = _value_texts(res)
                if ts and re.search(r"unable|not (able|possible)|cannot", " ".join(ts), re.IGNORECASE):
                    return [Finding("unable_" + name, start.time, "unable", ref, ts[0], matched_by_text=by_text)]
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
            return [Finding(name, start.time, seizure_type(text), ref, text, t_end, by_text)]
        if name == "cerebral_edema":
            text = all_text or " ".join(code_texts)
            return [Finding(name, start.time, edema_extent(text), ref, text, t_end, by_text)]
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
        # icp_sign, motor_weakness, intracranial_hemorrhage, hemophagocytosis: present unless every
        # clause that names it is negated ("Normal tone; new left hemiparesis" is present)
        text = all_text
        present = not text or affirmed_text(text, self._names(name)) is not None
        return [Finding(name, start.time, "present" if present else "absent", ref, text or " ".join(code_texts), t_end, by_text)]
