"""Grading conventions: every `[I]` (implementation convention) and threshold of
`../shared/docs/grading-criteria.md` is a named setting here, with its default, its evidence tag,
what it means and its allowed range. Sites override them in `mappings/grading.toml` (table
`[conventions]`) or per run with `--set name=value`; precedence: `--set` > grading.toml > default.
Graders report the settings that decided a grade in each result's `conventions` list.

The settings are a frozen pydantic model: an unknown name, a wrong type, a non-finite number
(`nan`, `1e400` = inf) or a value outside the clinically sensible range of a setting is refused
with one line naming the source, the setting and its allowed range (ConfigError, exit 2) before
anything is read or written. The ranges are wide enough for every published variant of a rule
and narrow enough that a typo (`fever_c = -40`, `vasopressor_overlap_min = -5`) cannot silently
turn a grade-3 case into grade 0.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError
from .textfile import TextFileError, read_text
from .validation import check_typed, one_line

# Drug classes of mappings/medications.toml (mapping_files.DRUG_CLASSES) that a list setting may name.
DrugClass = Literal[
    "cart_product", "anti_il6", "anti_cytokine", "corticosteroid", "vasopressor", "inotrope",
    "antipyretic", "iv_antibiotic", "fluid", "blood_product", "sedative",
]
# Classes that can suppress a fever or an inflammatory episode (masking, episode kept open).
FeverTherapyClass = Literal["antipyretic", "anti_il6", "anti_cytokine", "corticosteroid"]


def _s(default: Any, tag: str, doc: str, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, unit: str = "") -> Any:
    return Field(default, ge=ge, gt=gt, le=le, json_schema_extra={"tag": tag, "doc": doc, "unit": unit})


class GradingSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    # --- fever (§1.2)
    fever_c: float = _s(38.0, "V", "fever threshold, >= (ASTCT, CIBMTR)", ge=37.0, le=40.0, unit='°C')
    fever_compare_decimals: int = _s(2, "I", "round converted temperatures to this many decimals before comparing", ge=0, le=4, unit='decimals')
    display_rounding_low_c: float = _s(37.95, "I", "stored values from here up to the fever threshold are flagged display_rounding", ge=36.5, le=40.0, unit='°C')
    preinfusion_fever_lookback_h: float = _s(24.0, "I", "a fever this many hours before day 0 flags fever_preinfusion", ge=0, le=168, unit='h')
    fever_association_h: float = _s(24.0, "I", "hypotension/hypoxia count toward CRS when a fever lies within this many hours (or masking applies)", ge=0, le=168, unit='h')
    masking_drug_classes: tuple[FeverTherapyClass, ...] = _s(
        ("antipyretic", "anti_il6", "anti_cytokine", "corticosteroid"), "P",
        "drug classes that, given after CRS onset, remove the fever requirement (ASTCT original wording incl. antipyretics)",
    )
    # --- hypotension (§1.3)
    sbp_adult: float = _s(90.0, "V", "hypotension SBP threshold for age > 10 y and adults (CARTOX/PedsCARTOX/PALS)", ge=70, le=120, unit='mmHg')
    sbp_neonate: float = _s(60.0, "V", "term neonate 0-28 days", ge=40, le=90, unit='mmHg')
    sbp_infant: float = _s(70.0, "V", "infant 1-12 months", ge=50, le=100, unit='mmHg')
    sbp_child_base: float = _s(70.0, "V", "1-10 years: base + per_year x completed years", ge=50, le=100, unit='mmHg')
    sbp_child_per_year: float = _s(2.0, "V", "1-10 years: mmHg added per completed year", ge=0, le=5, unit='mmHg/year')
    hypotension_confirm_min_gap_min: float = _s(5.0, "I", "two low readings at least this far apart ...", ge=0, le=60, unit='min')
    hypotension_confirm_window_min: float = _s(60.0, "I", "... and within this window make a hypotension event", ge=5, le=360, unit='min')
    hypotension_treatment_window_min: float = _s(60.0, "I", "or one low reading followed within this window by a fluid bolus or vasopressor", ge=0, le=360, unit='min')
    arterial_artifact_sbp: float = _s(40.0, "I", "arterial SBP below this with a normal NIBP within 15 min is an artefact", ge=0, le=80, unit='mmHg')
    bolus_min_ml: float = _s(250.0, "I", "a fluid administration of at least this volume is a bolus", ge=10, le=2000, unit='mL')
    bolus_min_ml_per_kg: float = _s(10.0, "I", "or at least this volume per kg", ge=1, le=60, unit='mL/kg')
    # --- vasopressors (§1.4)
    vasopressor_overlap_min: float = _s(60.0, "I", "two infusions are concurrent only if they overlap this long (hand-offs count as one)", ge=0, le=720, unit='min')
    vasopressor_min_duration_min: float = _s(60.0, "I", "infusions shorter than this are ignored unless the only treatment of documented hypotension", ge=0, le=720, unit='min')
    short_vasopressor_sole_treatment_only: bool = _s(False, "I", "if true, a short infusion counts only when no fluid bolus was given for the same hypotension (literal §1.4); default: it counts whenever documented hypotension preceded it within 1 h")
    point_infusion_assumed_h: float = _s(4.0, "I", "an infusion charted only as a rate at one instant (no end, no later charting) is assumed to run this long (flag infusion_end_assumed)", gt=0, le=48, unit='h')
    vasopressor_course_gap_min: float = _s(30.0, "I", "segments of the same drug separated by less than this form one infusion", ge=0, le=240, unit='min')
    # --- oxygen (§1.5)
    low_flow_max_lpm: float = _s(6.0, "V", "nasal cannula at or below this flow is low-flow (ASTCT footnote)", ge=1, le=15, unit='L/min')
    missing_flow_is_low_flow: bool = _s(True, "I", "a standard nasal cannula with no charted flow is graded as low-flow (flag missing_flow)")
    device_carry_forward_h: float = _s(12.0, "I", "a charted device/flow stays in force until the next row, at most this long", ge=0, le=72, unit='h')
    ppv_hypoxia_lookback_h: float = _s(6.0, "I", "positive pressure counts for CRS only if hypoxia (SpO2 below spo2_hypoxia or supplemental O2) preceded it within this window, or its indication is respiratory failure", ge=0, le=72, unit='h')
    spo2_hypoxia: float = _s(90.0, "I", "SpO2 below this is hypoxia for the positive-pressure attribution rule", ge=80, le=100, unit='%')
    home_baseline_lookback_days: float = _s(7.0, "I", "respiratory support recorded this long before day 0 is the patient's baseline (home O2/CPAP)", ge=0, le=90, unit='days')
    # --- episodes and resolution (§1.1)
    resolution_clear_h: float = _s(24.0, "I", "resolution = first all-clear time after the last abnormality, staying clear this long", gt=0, le=168, unit='h')
    resolution_coverage_block_h: float = _s(8.0, "I", "during the clear period expect a temperature and a BP in every block of this length", ge=1, le=48, unit='h')
    resolution_coverage_required: bool = _s(False, "I", "if true, a clear period without that coverage does not resolve the episode (else flag resolution_sparse_data)")
    episode_open_therapy_classes: tuple[FeverTherapyClass, ...] = _s(
        ("anti_il6", "anti_cytokine", "corticosteroid"), "I",
        "a dose of these during a candidate clear period keeps the episode open: abnormalities within resolution_clear_h of the dose rejoin the episode (resolution time itself unchanged if none recur)",
    )
    culture_attribution_window_h: float = _s(48.0, "I", "a positive blood culture this close to an episode's onset marks it attribution_needed", ge=0, le=336, unit='h')
    late_onset_day: float = _s(14.0, "I", "episodes starting after this day are flagged late_onset", ge=1, le=100, unit='days')
    exclude_provisional_episodes: bool = _s(False, "I", "if true, episodes needing attribution (positive culture, possible IEC-HS / post-CRS hyperinflammation, late second episode) do not count in the per-infusion grade; default: every episode counts and those are flagged attribution_needed for review (clinical safety rule)")
    # --- FiO2-based systems, high-dose vasopressors, organ toxicity (§1.4-§1.6, §4-§9)
    fio2_cut: float = _s(40.0, "V", "FiO2 (%) at or above which Lee/MSKCC/CARTOX/PedsCARTOX/CTCAE hypoxia is grade 3", ge=21, le=100, unit='%')
    fio2_nc_base: float = _s(20.0, "I", "estimated FiO2 (%) of a nasal cannula = base + per_lpm x flow (up to 6 L/min) ...", ge=15, le=30, unit='%')
    fio2_nc_per_lpm: float = _s(4.0, "I", "... % per L/min up to 6 L/min", ge=0, le=10, unit='%/(L/min)')
    fio2_nc_high_per_lpm: float = _s(3.0, "I", "... % per L/min above 6 L/min", ge=0, le=10, unit='%/(L/min)')
    fio2_nc_cap: float = _s(60.0, "I", "... capped at this %", ge=21, le=100, unit='%')
    fio2_blow_by: float = _s(30.0, "I", "estimated FiO2 (%) of blow-by oxygen (unreliable; < 40 %)", ge=21, le=100, unit='%')
    fio2_face_mask_5l: float = _s(40.0, "I", "estimated FiO2 (%) of a simple face mask at 5 L/min, +4 %/L, capped at fio2_nc_cap", ge=21, le=100, unit='%')
    fio2_non_rebreather: float = _s(80.0, "I", "estimated FiO2 (%) of a non-rebreather mask", ge=21, le=100, unit='%')
    high_dose_min_hours: float = _s(3.0, "P", "Lee 2014 high-dose vasopressors must be held this long", gt=0, le=48, unit='h')
    high_dose_ne_ug_min: float = _s(20.0, "P", "norepinephrine monotherapy high dose (ug/min)", gt=0, le=200, unit='ug/min')
    high_dose_dopamine_ug_kg_min: float = _s(10.0, "P", "dopamine monotherapy high dose (ug/kg/min)", gt=0, le=50, unit='ug/kg/min')
    high_dose_phenylephrine_ug_min: float = _s(200.0, "P", "phenylephrine monotherapy high dose (ug/min)", gt=0, le=2000, unit='ug/min')
    high_dose_epinephrine_ug_min: float = _s(10.0, "P", "epinephrine monotherapy high dose (ug/min)", gt=0, le=200, unit='ug/min')
    high_dose_with_vasopressin_neeq: float = _s(10.0, "P", "on vasopressin: high dose if NE-equivalent >= this (ug/min)", gt=0, le=200, unit='ug/min')
    high_dose_combination_neeq: float = _s(20.0, "P", "combination without vasopressin: high dose if NE-equivalent >= this (ug/min)", gt=0, le=200, unit='ug/min')
    pediatric_reference_weight_kg: float = _s(70.0, "I", "children: weight-based doses x this weight = adult-equivalent ug/min (flag pediatric_high_dose)", ge=20, le=150, unit='kg')
    refractory_hypotension_min: float = _s(60.0, "I", "MSKCC/CARTOX refractory hypotension: SBP below threshold this long while on high-dose vasopressors", ge=0, le=1440, unit='min')
    mskcc_pressor_hours: float = _s(24.0, "P", "MSKCC grade 3: cumulative vasopressor hours in the episode", gt=0, le=168, unit='h')
    penn_iv_therapy_classes: tuple[DrugClass, ...] = _s(
        ("iv_antibiotic", "anti_il6", "anti_cytokine", "corticosteroid"), "I",
        "Penn grade 2 'need for IV therapies': IV antibiotics count only for neutropenic fever; the others when given IV in the episode",
    )
    neutropenia_anc: float = _s(500.0, "V", "ANC (/uL) below which fever is neutropenic (Penn grade 2)", gt=0, le=2000, unit='/uL')
    uln_alt: float = _s(40.0, "I", "ALT upper limit of normal (U/L) when the lab sends no reference range", ge=10, le=200, unit='U/L')
    uln_ast: float = _s(40.0, "I", "AST upper limit of normal (U/L) when the lab sends no reference range", ge=10, le=200, unit='U/L')
    uln_bilirubin: float = _s(1.2, "I", "total bilirubin ULN (mg/dL) when the lab sends no reference range", ge=0.3, le=5, unit='mg/dL')
    uln_creatinine: float = _s(1.2, "I", "creatinine ULN (mg/dL) for adults when the lab sends no reference range", ge=0.3, le=3, unit='mg/dL')
    uln_creatinine_child: float = _s(0.7, "I", "creatinine ULN (mg/dL) for children when the lab sends no reference range", ge=0.1, le=2, unit='mg/dL')
    fibrinogen_low: float = _s(150.0, "P", "hypofibrinogenaemia threshold (mg/dL) for Penn coagulopathy resolution and IEC-HS", ge=50, le=400, unit='mg/dL')
    # --- adjacent syndromes (§11)
    carhlh_ferritin: float = _s(10000.0, "P", "CARTOX carHLH: peak ferritin above this (ng/mL) ...", ge=500, le=100000, unit='ng/mL')
    carhlh_window_days: float = _s(5.0, "P", "... within this many days of infusion (the CRS phase)", ge=1, le=30, unit='days')
    iec_hs_ferritin_factor: float = _s(2.0, "P", "IEC-HS: ferritin above this x day-0 baseline (or x ULN)", ge=1, le=20, unit='x')
    iec_hs_transaminase_factor: float = _s(5.0, "P", "IEC-HS: ALT/AST above this x ULN", ge=1, le=20, unit='x')
    iec_hs_tg_mg_dl: float = _s(265.0, "P", "IEC-HS: fasting triglycerides above this (mg/dL)", ge=50, le=1000, unit='mg/dL')
    iec_hs_window_h: float = _s(48.0, "I", "IEC-HS: manifestations within this many hours of each other form one picture", ge=1, le=336, unit='h')
    uln_ferritin: float = _s(400.0, "I", "ferritin ULN (ng/mL) when neither reference range nor baseline is available", ge=50, le=2000, unit='ng/mL')
    icaht_interpolate_max_days: int = _s(7, "V", "ICAHT: missing daily ANC interpolated linearly across gaps up to this many days (flagged)", ge=0, le=30, unit='days')
    icaht_recovery_days: int = _s(3, "V", "ICAHT: neutropenic runs separated by fewer days above 500/uL are joined (stable recovery)", ge=1, le=14, unit='days')
    icaht_late_end_day: int = _s(100, "V", "ICAHT late window ends at this day", ge=31, le=365, unit='days')
    # --- ICANS (§3)
    ice_min_age_years: int = _s(12, "I", "ICE from this age; CAPD below it (NCIt vs ASTCT age-cut conflict, §3.3)", ge=1, le=18, unit='years')
    capd_delirium: float = _s(9.0, "V", "CAPD at or above this is delirium (ICANS grade 3)", ge=1, le=32, unit='points')
    icans_sedation_bolus_h: float = _s(4.0, "I", "ICE/consciousness are not graded within this many hours of a sedative bolus or during a sedative infusion", ge=0, le=48, unit='h')
    icans_resolution_clear_h: float = _s(24.0, "I", "ICANS resolves at the first normal assessment that stays normal this long", gt=0, le=168, unit='h')
    seizure_status_min: float = _s(5.0, "V", "a seizure longer than this is life-threatening prolonged (ICANS grade 4)", gt=0, le=60, unit='min')

    @field_validator("*", mode="before")
    @classmethod
    def _typed(cls, value: Any, info: ValidationInfo) -> Any:
        return check_typed(value, info, cls.model_fields)

    @model_validator(mode="after")
    def _consistent(self) -> GradingSettings:
        rules = [
            (self.hypotension_confirm_min_gap_min < self.hypotension_confirm_window_min,
             f"hypotension_confirm_min_gap_min ({self.hypotension_confirm_min_gap_min:g}) must be below "
             f"hypotension_confirm_window_min ({self.hypotension_confirm_window_min:g})"),
            (self.fio2_nc_base <= self.fio2_nc_cap, f"fio2_nc_base ({self.fio2_nc_base:g}) must not exceed fio2_nc_cap ({self.fio2_nc_cap:g})"),
            (self.sbp_neonate <= self.sbp_infant <= self.sbp_adult and self.sbp_child_base <= self.sbp_adult,
             "the SBP thresholds must rise with age: sbp_neonate <= sbp_infant <= sbp_adult and sbp_child_base <= sbp_adult"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)
        return self

    @classmethod
    def meta(cls, name: str) -> dict[str, Any]:
        """tag, doc and unit of a setting."""
        extra = cls.model_fields[name].json_schema_extra
        return dict(extra) if isinstance(extra, dict) else {}

    def describe(self, name: str) -> dict[str, Any]:
        value = getattr(self, name)
        return {"setting": name, "value": list(value) if isinstance(value, tuple) else value, "tag": self.meta(name)["tag"]}

    def as_dict(self) -> dict[str, Any]:
        return {n: (list(v) if isinstance(v := getattr(self, n), tuple) else v) for n in type(self).model_fields}

    def fingerprint(self) -> str:
        """sha256 of every setting's value (canonical JSON): what a write-back records."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def with_overrides(base: GradingSettings, values: dict[str, Any], where: str, typed: bool = False) -> GradingSettings:
    """`base` with `values` applied and the whole validated again; `typed`: the values come from a
    TOML file and must already have their type (else strings from --set are converted)."""
    try:
        return GradingSettings.model_validate({**base.as_dict(), **values}, context={"typed": typed})
    except ValidationError as exc:
        raise one_line(exc, GradingSettings, values, where, catalogue="mappings/grading.toml lists every setting",
                       noun="setting") from None


def load_settings(mappings_dir: Path | None, overrides: list[str] | None = None) -> GradingSettings:
    """Defaults <- mappings/grading.toml [conventions] <- `name=value` overrides."""
    s = GradingSettings()
    if mappings_dir is not None:
        path = mappings_dir / "grading.toml"
        if path.exists():
            try:
                data = tomllib.loads(read_text(path))
            except (tomllib.TOMLDecodeError, OSError, TextFileError) as exc:
                raise ConfigError(f"Could not read {path}: {exc}") from exc
            unknown = sorted(set(data) - {"conventions"})
            if unknown:
                raise ConfigError(f"Could not read {path.name}: unknown table [{unknown[0]}]. Expected: conventions.")
            conventions = data.get("conventions", {})
            if not isinstance(conventions, dict):
                raise ConfigError(f"Could not read {path.name}: 'conventions' must be a table.")
            s = with_overrides(s, conventions, path.name, typed=True)
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected name=value.")
        s = with_overrides(s, {name.strip(): value.strip()}, "--set")
    return s
