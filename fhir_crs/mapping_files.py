"""Loads and validates the site-editable code tables in `mappings/*.toml`.

This is the only module that reads mapping files. Each table is validated on load: unknown
keys, unknown kinds/classes, malformed `system|code` strings and bad regular expressions raise
`MappingFileError` naming the file and the key, so a site editing a table gets a precise message.

Matching order everywhere (DEVELOPERS.md: "local codes are the norm"): configured codes first,
exactly; then the regular expressions in `text` against CodeableConcept.text and each
coding.display. A text match is reported to callers so the event can be flagged.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import MappingFileError
from .textfile import TextFileError, read_text

OBSERVATION_KINDS = frozenset(
    {
        "temperature", "blood_pressure_panel", "sbp", "sbp_arterial", "dbp", "mean_bp",
        "heart_rate", "respiratory_rate", "spo2", "o2_flow", "fio2", "o2_device", "weight",
        "il6", "ifn_gamma", "il10", "crp", "ferritin", "fibrinogen", "ldh", "alt", "ast",
        "bilirubin", "creatinine", "anc", "neutrophils_pct", "platelets", "wbc", "lactate", "triglycerides", "inr",
        "blood_culture", "hemophagocytosis", "ice_score", "cartox10_score", "capd_score",
        "consciousness", "rass", "gcs_total", "seizure", "cerebral_edema", "icp_sign",
        "motor_weakness", "intracranial_hemorrhage", "cause_of_death", "csf_opening_pressure",
    }
)
OBSERVATION_GROUPS = frozenset({"vital", "lab", "neuro", "respiratory", "micro", "outcome"})
OBSERVATION_VALUES = frozenset({"quantity", "coded", "boolean", "components"})
DEVICE_CLASSES = frozenset(
    {
        "room_air", "blow_by", "nasal_cannula", "high_flow_nasal_cannula", "face_mask",
        "venturi_mask", "non_rebreather", "cpap", "bipap", "noninvasive_ventilation",
        "invasive_ventilation",
    }
)
DRUG_CLASSES = frozenset(
    {
        "cart_product", "anti_il6", "anti_cytokine", "corticosteroid", "vasopressor", "inotrope",
        "antipyretic", "iv_antibiotic", "fluid", "blood_product", "sedative",
    }
)
PROCEDURE_KINDS = frozenset(
    {
        "car_t_infusion", "nasal_cannula", "high_flow_nasal_cannula", "face_mask",
        "non_rebreather", "venturi_mask", "cpap", "bipap", "noninvasive_ventilation",
        "intubation", "invasive_ventilation", "extubation", "blood_purification", "ecmo",
        "icu_admission", "transfusion_cryo", "bone_marrow_biopsy", "procedure_window",
    }
)

REASON_CLASSES = frozenset({"respiratory_failure", "not_hypoxic", "home_baseline", "hypotension", "culture_positive", "culture_negative"})
MEDICATION_LIMITS = frozenset({"max_ug_min", "max_ug_kg_min", "max_u_min", "max_ml"})

_OBS_KEYS = {"group", "unit", "codes", "text", "exclude", "convert", "value", "unitless"}
_CLASS_KEYS = {"codes", "text", "exclude"}
_DRUG_KEYS = {"class", "codes", "text", "exclude", "atc_prefix"}


def default_mappings_dir() -> Path:
    """`$FHIR_CRS_MAPPINGS`, else the tables shipped inside the package (`fhir_crs/mappings/`,
    package data found with `importlib.resources`, so a wheel or a non-editable install has them;
    the checkout's top-level `mappings` is a link to the same folder)."""
    env = os.environ.get("FHIR_CRS_MAPPINGS")
    if env:
        return Path(env)
    return packaged_mappings_dir()


def packaged_mappings_dir() -> Path:
    """The default tables shipped with fhir-crs (a real folder: the package is installed unzipped)."""
    tables = resources.files("fhir_crs") / "mappings"
    if not isinstance(tables, Path):  # a zipped install: no folder to hand to a site
        raise MappingFileError("the default mapping tables are inside a zipped install; set FHIR_CRS_MAPPINGS or --mappings "
                               "to a folder of tables (a copy of fhir_crs/mappings).")
    return tables


@dataclass(frozen=True, slots=True)
class Matcher:
    """Codes and text patterns of one kind/class."""

    name: str
    codes: frozenset[str]
    text: tuple[re.Pattern[str], ...]
    exclude: tuple[re.Pattern[str], ...]

    def text_matches(self, text: str) -> bool:
        if not text:
            return False
        if not any(p.search(text) for p in self.text):
            return False
        return not any(p.search(text) for p in self.exclude)


@dataclass(frozen=True, slots=True)
class ObservationKind:
    matcher: Matcher
    group: str
    unit: str
    value: str
    convert: Mapping[str, float]
    min: float | None
    max: float | None
    # "system|code" -> the unit a value sent without one is in (a molar LOINC code is in umol/L)
    unitless: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.matcher.name


@dataclass(frozen=True, slots=True)
class DrugSpec:
    matcher: Matcher
    drug_class: str
    atc_prefix: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.matcher.name


@dataclass(slots=True)
class ClassTable:
    """An ordered set of Matchers with an exact-code index (first listed wins on text)."""

    entries: list[Matcher] = field(default_factory=list)
    code_index: dict[str, str] = field(default_factory=dict)

    def add(self, m: Matcher) -> None:
        self.entries.append(m)
        for c in m.codes:
            self.code_index.setdefault(c, m.name)

    def match(self, codings: Iterable[tuple[str, str]], texts: Iterable[str]) -> tuple[str | None, bool]:
        """Returns (name, matched_by_text)."""
        for system, code in codings:
            hit = self.code_index.get(f"{system}|{code}")
            if hit:
                return hit, False
        texts = [t for t in texts if t]
        for m in self.entries:
            for t in texts:
                if m.text_matches(t):
                    return m.name, True
        return None, False


@dataclass(slots=True)
class CodeMap:
    """All site mappings, compiled."""

    observations: dict[str, ObservationKind]
    observation_table: ClassTable
    devices: ClassTable
    drugs: dict[str, DrugSpec]
    drug_table: ClassTable
    atc_prefixes: list[tuple[str, str]]
    procedures: ClassTable
    unit_aliases: dict[str, str]
    directory: Path
    reasons: ClassTable = field(default_factory=ClassTable)  # reasons.toml: indications that decide a grade
    dose_limits: dict[str, dict[str, float]] = field(default_factory=dict)  # plausibility.toml [medications.*]

    def canonical_unit(self, unit: str | None) -> str:
        if not unit:
            return ""
        u = unit.strip()
        return self.unit_aliases.get(u.lower(), u)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_text(path))
    except FileNotFoundError as exc:
        raise MappingFileError(f"Mapping file {path} is missing.") from exc
    except OSError as exc:
        raise MappingFileError(f"Cannot read mapping file {path}: {exc.strerror or exc}.") from exc
    except TextFileError as exc:
        raise MappingFileError(f"Mapping file {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MappingFileError(f"Could not read {path}: {exc}") from exc


def _strings(path: Path, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MappingFileError(f"Could not read {path.name}: '{key}' must be a list of strings.")
    return value


def _codes(path: Path, key: str, value: Any) -> frozenset[str]:
    codes = _strings(path, key, value)
    for c in codes:
        system, sep, code = c.partition("|")
        if not sep or not system or not code:
            raise MappingFileError(
                f"Could not read {path.name}: '{key}' entry {c!r} is not 'system|code'."
            )
    return frozenset(codes)


def _patterns(path: Path, key: str, value: Any) -> tuple[re.Pattern[str], ...]:
    out = []
    for p in _strings(path, key, value):
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as exc:
            raise MappingFileError(
                f"Could not read {path.name}: '{key}' pattern {p!r} is not a valid regular expression ({exc})."
            ) from exc
    return tuple(out)


def _check_keys(path: Path, name: str, table: Any, allowed: set[str]) -> None:
    if not isinstance(table, dict):
        raise MappingFileError(f"Could not read {path.name}: [{name}] must be a table.")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise MappingFileError(
            f"Could not read {path.name}: unknown key '{unknown[0]}' in [{name}]. "
            f"Expected one of: {', '.join(sorted(allowed))}."
        )


def _matcher(path: Path, name: str, table: dict[str, Any]) -> Matcher:
    return Matcher(
        name=name,
        codes=_codes(path, f"{name}.codes", table.get("codes", [])),
        text=_patterns(path, f"{name}.text", table.get("text", [])),
        exclude=_patterns(path, f"{name}.exclude", table.get("exclude", [])),
    )


def _load_units(path: Path) -> dict[str, str]:
    data = _read_toml(path)
    unknown = sorted(set(data) - {"aliases"})
    if unknown:
        raise MappingFileError(f"Could not read {path.name}: unknown table [{unknown[0]}]. Expected: aliases.")
    aliases: dict[str, str] = {}
    for canonical, spellings in data.get("aliases", {}).items():
        for s in _strings(path, f"aliases.{canonical}", spellings):
            aliases.setdefault(s.strip().lower(), canonical)
        aliases.setdefault(canonical.lower(), canonical)
    return aliases


def _load_observations(path: Path, ranges: dict[str, tuple[float, float]]) -> tuple[dict[str, ObservationKind], ClassTable]:
    data = _read_toml(path)
    kinds: dict[str, ObservationKind] = {}
    table = ClassTable()
    for name, t in data.items():
        if name not in OBSERVATION_KINDS:
            raise MappingFileError(
                f"Could not read {path.name}: unknown kind [{name}]. Expected one of: "
                f"{', '.join(sorted(OBSERVATION_KINDS))}."
            )
        if isinstance(t, dict) and ("min" in t or "max" in t):
            raise MappingFileError(f"Could not read {path.name}: [{name}] min/max moved to plausibility.toml [observations.{name}].")
        _check_keys(path, name, t, _OBS_KEYS)
        group = t.get("group", "vital")
        if group not in OBSERVATION_GROUPS:
            raise MappingFileError(f"Could not read {path.name}: [{name}] group {group!r} is not one of {sorted(OBSERVATION_GROUPS)}.")
        value = t.get("value", "quantity")
        if value not in OBSERVATION_VALUES:
            raise MappingFileError(f"Could not read {path.name}: [{name}] value {value!r} is not one of {sorted(OBSERVATION_VALUES)}.")
        convert = t.get("convert", {})
        if not isinstance(convert, dict) or not all(isinstance(v, int | float) for v in convert.values()):
            raise MappingFileError(f"Could not read {path.name}: [{name}] convert must map unit -> number.")
        unitless = t.get("unitless", {})
        if not isinstance(unitless, dict) or not all(
            isinstance(v, str) and (v == t.get("unit", "") or v in convert) for v in unitless.values()
        ):
            raise MappingFileError(f"Could not read {path.name}: [{name}] unitless must map \"system|code\" -> the kind's unit or a `convert` unit.")
        m = _matcher(path, name, t)
        lo, hi = ranges.get(name, (None, None))
        kinds[name] = ObservationKind(
            matcher=m, group=group, unit=t.get("unit", ""), value=value,
            convert={k: float(v) for k, v in convert.items()}, min=lo, max=hi, unitless=dict(unitless),
        )
        table.add(m)
    return kinds, table


def _load_classes(path: Path, allowed: frozenset[str], what: str) -> ClassTable:
    data = _read_toml(path)
    table = ClassTable()
    for name, t in data.items():
        if name not in allowed:
            raise MappingFileError(
                f"Could not read {path.name}: unknown {what} [{name}]. Expected one of: {', '.join(sorted(allowed))}."
            )
        _check_keys(path, name, t, _CLASS_KEYS)
        table.add(_matcher(path, name, t))
    return table


def _load_drugs(path: Path) -> tuple[dict[str, DrugSpec], ClassTable, list[tuple[str, str]]]:
    data = _read_toml(path)
    drugs: dict[str, DrugSpec] = {}
    table = ClassTable()
    prefixes: list[tuple[str, str]] = []
    for name, t in data.items():
        _check_keys(path, name, t, _DRUG_KEYS)
        cls = t.get("class")
        if cls not in DRUG_CLASSES:
            raise MappingFileError(
                f"Could not read {path.name}: [{name}] class {cls!r} is not one of: {', '.join(sorted(DRUG_CLASSES))}."
            )
        m = _matcher(path, name, t)
        atc = tuple(_strings(path, f"{name}.atc_prefix", t.get("atc_prefix", [])))
        drugs[name] = DrugSpec(matcher=m, drug_class=cls, atc_prefix=atc)
        table.add(m)
        prefixes.extend((p, name) for p in atc)
    return drugs, table, prefixes


def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MappingFileError(f"Could not read {path.name}: {where} must be a number, got {value!r}.")
    return float(value)


def _load_plausibility(path: Path) -> tuple[dict[str, tuple[float, float]], dict[str, dict[str, float]]]:
    """(observation kind -> (min, max), drug class -> {limit: value}), validated."""
    data = _read_toml(path)
    unknown = sorted(set(data) - {"observations", "medications"})
    if unknown:
        raise MappingFileError(f"Could not read {path.name}: unknown table [{unknown[0]}]. Expected: observations, medications.")
    ranges: dict[str, tuple[float, float]] = {}
    for kind, t in (data.get("observations") or {}).items():
        if kind not in OBSERVATION_KINDS:
            raise MappingFileError(f"Could not read {path.name}: unknown kind [observations.{kind}].")
        _check_keys(path, f"observations.{kind}", t, {"min", "max"})
        if set(t) != {"min", "max"}:
            raise MappingFileError(f"Could not read {path.name}: [observations.{kind}] needs both min and max.")
        lo, hi = _number(path, f"[observations.{kind}] min", t["min"]), _number(path, f"[observations.{kind}] max", t["max"])
        if not lo < hi:
            raise MappingFileError(f"Could not read {path.name}: [observations.{kind}] min {lo:g} must be below max {hi:g}.")
        ranges[kind] = (lo, hi)
    limits: dict[str, dict[str, float]] = {}
    for cls, t in (data.get("medications") or {}).items():
        if cls not in DRUG_CLASSES:
            raise MappingFileError(f"Could not read {path.name}: unknown drug class [medications.{cls}].")
        _check_keys(path, f"medications.{cls}", t, set(MEDICATION_LIMITS))
        limits[cls] = {}
        for k, v in t.items():
            limits[cls][k] = _number(path, f"[medications.{cls}] {k}", v)
            if limits[cls][k] <= 0:
                raise MappingFileError(f"Could not read {path.name}: [medications.{cls}] {k} must be above 0.")
    return ranges, limits


@lru_cache(maxsize=8)
def _load_cached(directory: str) -> CodeMap:
    d = Path(directory)
    if not d.is_dir():
        raise MappingFileError(f"Mappings folder {d} does not exist (set FHIR_CRS_MAPPINGS or --mappings).")
    ranges, dose_limits = _load_plausibility(d / "plausibility.toml")
    observations, obs_table = _load_observations(d / "observations.toml", ranges)
    drugs, drug_table, prefixes = _load_drugs(d / "medications.toml")
    return CodeMap(
        observations=observations,
        observation_table=obs_table,
        devices=_load_classes(d / "devices.toml", DEVICE_CLASSES, "device class"),
        drugs=drugs,
        drug_table=drug_table,
        atc_prefixes=prefixes,
        procedures=_load_classes(d / "procedures.toml", PROCEDURE_KINDS, "procedure kind"),
        unit_aliases=_load_units(d / "units.toml"),
        directory=d,
        reasons=_load_classes(d / "reasons.toml", REASON_CLASSES, "indication class"),
        dose_limits=dose_limits,
    )


def load_code_map(directory: Path | None = None) -> CodeMap:
    """Loads (and caches) every mapping table from `directory` (default: `default_mappings_dir()`)."""
    return _load_cached(str((directory or default_mappings_dir()).resolve()))


def cart_codes(code_map: CodeMap) -> tuple[list[str], list[str]]:
    """CAR-T administration codes from the site tables: Procedure codes, drug codes."""
    procs = sorted(next(m.codes for m in code_map.procedures.entries if m.name == "car_t_infusion"))
    drugs = sorted(c for spec in code_map.drugs.values() if spec.drug_class == "cart_product" for c in spec.matcher.codes)
    return procs, drugs
