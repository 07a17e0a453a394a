"""Grading conventions: every `[I]` (implementation convention) and threshold of
`../shared/docs/grading-criteria.md` is a named setting here, with its default, its evidence tag
and what it means. Sites override them in `mappings/grading.toml` (table `[conventions]`) or per
run with `--set name=value`; precedence: `--set` > grading.toml > default. Graders report the
settings that decided a grade in each result's `conventions` list.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .textfile import TextFileError, read_text


def _s(default: Any, tag: str, doc: str) -> Any:
    return field(default=default, metadata={"tag": tag, "doc": doc})


@dataclass(frozen=True)
class GradingSettings:
    # --- fever (§1.2)
    fever_c: float = _s(38.0, "V", "fever threshold, >= (ASTCT, CIBMTR)")
    fever_compare_decimals: int = _s(2, "I", "round converted temperatures to this many decimals before comparing")
    display_rounding_low_c: float = _s(37.95, "I", "stored values from here up to the fever threshold are flagged display_rounding")
    preinfusion_fever_lookback_h: float = _s(24.0, "I", "a fever this many hours before day 0 flags fever_preinfusion")
    fever_association_h: float = _s(24.0, "I", "hypotension/hypoxia count toward CRS when a fever lies within this many hours (or masking applies)")
    masking_drug_classes: tuple[str, ...] = _s(
        ("antipyretic", "anti_il6", "anti_cytokine", "corticosteroid"), "P",
        "drug classes that, given after CRS onset, remove the fever requirement (ASTCT original wording incl. antipyretics)",
    )
    # --- hypotension (§1.3)
    sbp_adult: float = _s(90.0, "V", "hypotension SBP threshold for age > 10 y and adults (CARTOX/PedsCARTOX/PALS)")
    sbp_neonate: float = _s(60.0, "V", "term neonate 0-28 days")
    sbp_infant: float = _s(70.0, "V", "infant 1-12 months")
    sbp_child_base: float = _s(70.0, "V", "1-10 years: base + per_year x completed years")
    sbp_child_per_year: float = _s(2.0, "V", "1-10 years: mmHg added per completed year")
    hypotension_confirm_min_gap_min: float = _s(5.0, "I", "two low readings at least this far apart ...")
    hypotension_confirm_window_min: float = _s(60.0, "I", "... and within this window make a hypotension event")
    hypotension_treatment_window_min: float = _s(60.0, "I", "or one low reading followed within this window by a fluid bolus or vasopressor")
    arterial_artifact_sbp: float = _s(40.0, "I", "arterial SBP below this with a normal NIBP within 15 min is an artefact")
    bolus_min_ml: float = _s(250.0, "I", "a fluid administration of at least this volume is a bolus")
    bolus_min_ml_per_kg: float = _s(10.0, "I", "or at least this volume per kg")
    # --- vasopressors (§1.4)
    vasopressor_overlap_min: float = _s(60.0, "I", "two infusions are concurrent only if they overlap this long (hand-offs count as one)")
    vasopressor_min_duration_min: float = _s(60.0, "I", "infusions shorter than this are ignored unless the only treatment of documented hypotension")
    short_vasopressor_sole_treatment_only: bool = _s(False, "I", "if true, a short infusion counts only when no fluid bolus was given for the same hypotension (literal §1.4); default: it counts whenever documented hypotension preceded it within 1 h")
    point_infusion_assumed_h: float = _s(4.0, "I", "an infusion charted only as a rate at one instant (no end, no later charting) is assumed to run this long (flag infusion_end_assumed)")
    vasopressor_course_gap_min: float = _s(30.0, "I", "segments of the same drug separated by less than this form one infusion")
    # --- oxygen (§1.5)
    low_flow_max_lpm: float = _s(6.0, "V", "nasal cannula at or below this flow is low-flow (ASTCT footnote)")
    missing_flow_is_low_flow: bool = _s(True, "I", "a standard nasal cannula with no charted flow is graded as low-flow (flag missing_flow)")
    device_carry_forward_h: float = _s(12.0, "I", "a charted device/flow stays in force until the next row, at most this long")
    ppv_hypoxia_lookback_h: float = _s(6.0, "I", "positive pressure counts for CRS only if hypoxia (SpO2 below spo2_hypoxia or supplemental O2) preceded it within this window, or its indication is respiratory failure")
    spo2_hypoxia: float = _s(90.0, "I", "SpO2 below this is hypoxia for the positive-pressure attribution rule")
    home_baseline_lookback_days: float = _s(7.0, "I", "respiratory support recorded this long before day 0 is the patient's baseline (home O2/CPAP)")
    # --- episodes and resolution (§1.1)
    resolution_clear_h: float = _s(24.0, "I", "resolution = first all-clear time after the last abnormality, staying clear this long")
    resolution_coverage_block_h: float = _s(8.0, "I", "during the clear period expect a temperature and a BP in every block of this length")
    resolution_coverage_required: bool = _s(False, "I", "if true, a clear period without that coverage does not resolve the episode (else flag resolution_sparse_data)")
    episode_open_therapy_classes: tuple[str, ...] = _s(
        ("anti_il6", "anti_cytokine", "corticosteroid"), "I",
        "a dose of these during a candidate clear period keeps the episode open: abnormalities within resolution_clear_h of the dose rejoin the episode (resolution time itself unchanged if none recur)",
    )
    culture_attribution_window_h: float = _s(48.0, "I", "a positive blood culture this close to an episode's onset marks it attribution_needed")
    late_onset_day: float = _s(14.0, "I", "episodes starting after this day are flagged late_onset")
    exclude_provisional_episodes: bool = _s(False, "I", "if true, episodes needing attribution (positive culture, possible IEC-HS / post-CRS hyperinflammation, late second episode) do not count in the per-infusion grade; default: every episode counts and those are flagged attribution_needed for review (clinical safety rule)")
    # --- FiO2-based systems, high-dose vasopressors, organ toxicity (§1.4-§1.6, §4-§9)
    fio2_cut: float = _s(40.0, "V", "FiO2 (%) at or above which Lee/MSKCC/CARTOX/PedsCARTOX/CTCAE hypoxia is grade 3")
    fio2_nc_base: float = _s(20.0, "I", "estimated FiO2 (%) of a nasal cannula = base + per_lpm x flow (up to 6 L/min) ...")
    fio2_nc_per_lpm: float = _s(4.0, "I", "... % per L/min up to 6 L/min")
    fio2_nc_high_per_lpm: float = _s(3.0, "I", "... % per L/min above 6 L/min")
    fio2_nc_cap: float = _s(60.0, "I", "... capped at this %")
    fio2_blow_by: float = _s(30.0, "I", "estimated FiO2 (%) of blow-by oxygen (unreliable; < 40 %)")
    fio2_face_mask_5l: float = _s(40.0, "I", "estimated FiO2 (%) of a simple face mask at 5 L/min, +4 %/L, capped at fio2_nc_cap")
    fio2_non_rebreather: float = _s(80.0, "I", "estimated FiO2 (%) of a non-rebreather mask")
    high_dose_min_hours: float = _s(3.0, "P", "Lee 2014 high-dose vasopressors must be held this long")
    high_dose_ne_ug_min: float = _s(20.0, "P", "norepinephrine monotherapy high dose (ug/min)")
    high_dose_dopamine_ug_kg_min: float = _s(10.0, "P", "dopamine monotherapy high dose (ug/kg/min)")
    high_dose_phenylephrine_ug_min: float = _s(200.0, "P", "phenylephrine monotherapy high dose (ug/min)")
    high_dose_epinephrine_ug_min: float = _s(10.0, "P", "epinephrine monotherapy high dose (ug/min)")
    high_dose_with_vasopressin_neeq: float = _s(10.0, "P", "on vasopressin: high dose if NE-equivalent >= this (ug/min)")
    high_dose_combination_neeq: float = _s(20.0, "P", "combination without vasopressin: high dose if NE-equivalent >= this (ug/min)")
    pediatric_reference_weight_kg: float = _s(70.0, "I", "children: weight-based doses x this weight = adult-equivalent ug/min (flag pediatric_high_dose)")
    refractory_hypotension_min: float = _s(60.0, "I", "MSKCC/CARTOX refractory hypotension: SBP below threshold this long while on high-dose vasopressors")
    mskcc_pressor_hours: float = _s(24.0, "P", "MSKCC grade 3: cumulative vasopressor hours in the episode")
    penn_iv_therapy_classes: tuple[str, ...] = _s(
        ("iv_antibiotic", "anti_il6", "anti_cytokine", "corticosteroid"), "I",
        "Penn grade 2 'need for IV therapies': IV antibiotics count only for neutropenic fever; the others when given IV in the episode",
    )
    neutropenia_anc: float = _s(500.0, "V", "ANC (/uL) below which fever is neutropenic (Penn grade 2)")
    uln_alt: float = _s(40.0, "I", "ALT upper limit of normal (U/L) when the lab sends no reference range")
    uln_ast: float = _s(40.0, "I", "AST upper limit of normal (U/L) when the lab sends no reference range")
    uln_bilirubin: float = _s(1.2, "I", "total bilirubin ULN (mg/dL) when the lab sends no reference range")
    uln_creatinine: float = _s(1.2, "I", "creatinine ULN (mg/dL) for adults when the lab sends no reference range")
    uln_creatinine_child: float = _s(0.7, "I", "creatinine ULN (mg/dL) for children when the lab sends no reference range")
    fibrinogen_low: float = _s(150.0, "P", "hypofibrinogenaemia threshold (mg/dL) for Penn coagulopathy resolution and IEC-HS")
    # --- adjacent syndromes (§11)
    carhlh_ferritin: float = _s(10000.0, "P", "CARTOX carHLH: peak ferritin above this (ng/mL) ...")
    carhlh_window_days: float = _s(5.0, "P", "... within this many days of infusion (the CRS phase)")
    iec_hs_ferritin_factor: float = _s(2.0, "P", "IEC-HS: ferritin above this x day-0 baseline (or x ULN)")
    iec_hs_transaminase_factor: float = _s(5.0, "P", "IEC-HS: ALT/AST above this x ULN")
    iec_hs_tg_mg_dl: float = _s(265.0, "P", "IEC-HS: fasting triglycerides above this (mg/dL)")
    iec_hs_window_h: float = _s(48.0, "I", "IEC-HS: manifestations within this many hours of each other form one picture")
    uln_ferritin: float = _s(400.0, "I", "ferritin ULN (ng/mL) when neither reference range nor baseline is available")
    icaht_interpolate_max_days: int = _s(7, "V", "ICAHT: missing daily ANC interpolated linearly across gaps up to this many days (flagged)")
    icaht_recovery_days: int = _s(3, "V", "ICAHT: neutropenic runs separated by fewer days above 500/uL are joined (stable recovery)")
    icaht_late_end_day: int = _s(100, "V", "ICAHT late window ends at this day")
    # --- ICANS (§3)
    ice_min_age_years: int = _s(12, "I", "ICE from this age; CAPD below it (NCIt vs ASTCT age-cut conflict, §3.3)")
    capd_delirium: float = _s(9.0, "V", "CAPD at or above this is delirium (ICANS grade 3)")
    icans_sedation_bolus_h: float = _s(4.0, "I", "ICE/consciousness are not graded within this many hours of a sedative bolus or during a sedative infusion")
    icans_resolution_clear_h: float = _s(24.0, "I", "ICANS resolves at the first normal assessment that stays normal this long")
    seizure_status_min: float = _s(5.0, "V", "a seizure longer than this is life-threatening prolonged (ICANS grade 4)")

    def describe(self, name: str) -> dict[str, Any]:
        f = next(f for f in fields(self) if f.name == name)
        value = getattr(self, name)
        return {"setting": name, "value": list(value) if isinstance(value, tuple) else value, "tag": f.metadata["tag"]}

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _coerce(name: str, current: Any, value: Any, where: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif isinstance(current, int | float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return type(current)(value) if isinstance(current, float) or float(value).is_integer() else None
        if isinstance(value, str):
            try:
                return type(current)(float(value)) if isinstance(current, float) else int(value)
            except ValueError:
                pass
    elif isinstance(current, tuple):
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
    raise ConfigError(f"{where}: setting '{name}' expects a {type(current).__name__}, got {value!r}.")


def with_overrides(base: GradingSettings, values: dict[str, Any], where: str) -> GradingSettings:
    known = {f.name for f in fields(base)}
    changes = {}
    for k, v in values.items():
        if k not in known:
            raise ConfigError(f"{where}: unknown setting '{k}'. Known settings: {', '.join(sorted(known))}.")
        changes[k] = _coerce(k, getattr(base, k), v, where)
    return replace(base, **changes)


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
            s = with_overrides(s, data.get("conventions", {}), path.name)
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected name=value.")
        s = with_overrides(s, {name.strip(): value.strip()}, "--set")
    return s
