"""Stage 4 (neurotoxicity, comparison system): CARTOX CRES (Neelapu 2018; grading-criteria §7.2).

CARTOX-10 bands (7-9 / 3-6 / 0-2 / cannot be assessed), raised ICP (any cerebral oedema, or a CSF
opening pressure >= 20 mmHg, = 4),
seizures (partial 3; generalized or status 4: longer than `seizure_status_min`, or repetitive
without return to baseline; an unspecified type is graded 3 and flagged) and new motor weakness (4); no
level-of-consciousness row. Where no CARTOX-10 is charted the ICE score stands in (they differ
by one item; flagged). Children under the ICE age use CAPD bands (PedsCARTOX neuro; Mahadeo's
exact mapping was not verified — flagged).

Cost: O(A log A) for A neuro rows (sedation by bisection), plus O(C x H) for C cerebral-oedema
rows checked against H intracranial-haemorrhage findings (both a handful).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ..events import Finding, Measurement
from ..mappers.observation import papilledema_stage
from ..settings import GradingSettings
from ..timeline import CaseTimeline
from .icans import (
    GCS_COMA,
    Assessment,
    finding_flags,
    neuro_episodes,
    prolonged_seizure,
    repetitive_seizures,
    summarise_neuro,
)
from .result import Criterion, SystemResult
from .state import Cover

H = timedelta(hours=1)
CSF_OPENING_PRESSURE_MMHG = 20.0  # §7.2 CARTOX raised ICP, grade 4 (a criterion of the table, not a convention)


def grade_cres(tl: CaseTimeline, s: GradingSettings) -> SystemResult:
    res = SystemResult("cartox_cres")
    measures = [m for m in tl.neuro if isinstance(m, Measurement) and m.time >= tl.infusion]
    kinds = {m.kind for m in measures}
    child = tl.age_years is not None and tl.age_years < s.ice_min_age_years
    if "cartox10_score" in kinds:
        score = "cartox10_score"
    elif child and "capd_score" in kinds:
        score = "capd_score"
        res.flag("cres_capd_mapping_unverified")
    elif "ice_score" in kinds:
        score = "ice_score"
        res.flag("cres_from_ice")
    else:
        score = "capd_score" if "capd_score" in kinds else "cartox10_score"
    capd_base = 0.0
    pre = [m for m in tl.neuro if isinstance(m, Measurement) and m.kind == "capd_score" and m.time < tl.infusion]
    if pre:
        capd_base = pre[-1].value
    ich = [f for f in tl.findings if f.kind == "intracranial_hemorrhage" and f.detail == "present"]
    points: dict[datetime, Assessment] = {}
    sedation = Cover((a, b) for a, b, _ in tl.sedation)

    def at(t: datetime) -> Assessment:
        return points.setdefault(t, Assessment(t))

    for e in tl.neuro:
        t = e.time
        if t < tl.infusion:
            continue
        sedated = t in sedation
        if isinstance(e, Measurement) and e.kind == "csf_opening_pressure":
            # §7.2 raised ICP: opening pressure >= 20 mmHg is grade 4. The table's grade-3 "< 20
            # mmHg" qualifies a raised ICP already shown otherwise (papilledema stage 1-2 is graded
            # by itself), so a pressure below 20 mmHg is not a finding on its own.
            if e.value >= CSF_OPENING_PRESSURE_MMHG:
                at(t).criteria.append(Criterion(t, 4, f"raised ICP: CSF opening pressure {e.value:.0f} mmHg (>= {CSF_OPENING_PRESSURE_MMHG:g})", [e.ref]))
        elif isinstance(e, Measurement) and e.kind == "gcs_total" and e.value <= GCS_COMA:
            # GCS <= 8 (coma) is obtunded (§7.2 grade 4, as an unarousable row); not while sedated
            if sedated:
                res.flag("sedation_confounded")
                res.settings_used.add("icans_sedation_bolus_h")
            else:
                at(t).criteria.append(Criterion(t, 4, f"obtunded: GCS {e.value:g} (<= {GCS_COMA}, coma)", [e.ref], flags=("gcs_used",)))
        elif isinstance(e, Measurement) and e.kind == score:
            if sedated:
                res.flag("sedation_confounded")
                continue
            v = e.value
            a = at(t)
            if score == "capd_score":
                if v <= capd_base or v < 1:
                    a.normal_primary = True
                elif v >= s.capd_delirium:
                    a.criteria.append(Criterion(t, 3, f"CAPD {v:g} (>= {s.capd_delirium:g})", [e.ref]))
                else:
                    a.criteria.append(Criterion(t, 1, f"CAPD {v:g}", [e.ref]))
            else:
                label = "CARTOX-10" if score == "cartox10_score" else "ICE (as CARTOX-10)"
                if v >= 10:
                    a.normal_primary = True
                elif v >= 7:
                    a.criteria.append(Criterion(t, 1, f"{label} {v:g} (7-9)", [e.ref]))
                elif v >= 3:
                    a.criteria.append(Criterion(t, 2, f"{label} {v:g} (3-6)", [e.ref]))
                else:
                    a.criteria.append(Criterion(t, 3, f"{label} {v:g} (0-2)", [e.ref]))
        elif isinstance(e, Finding):
            if (e.kind.startswith("unable_") or (e.kind == "consciousness" and e.detail == "unarousable")) and sedated:
                # not graded while sedated, but never silently (as ASTCT ICANS)
                res.flag("sedation_confounded")
                res.settings_used.add("icans_sedation_bolus_h")
            elif e.kind.startswith("unable_"):
                at(t).criteria.append(Criterion(t, 4, "cannot perform the assessment (critical/obtunded)", [e.ref]))
            elif e.kind == "consciousness" and e.detail == "unarousable":
                at(t).criteria.append(Criterion(t, 4, "obtunded, cannot perform CARTOX-10", [e.ref]))
            elif e.kind == "seizure" and e.detail != "absent":
                long, why, by_setting = prolonged_seizure(e, s)
                sets = ("seizure_status_min",) if by_setting or long else ()
                fl = finding_flags(e)
                res.flag(*fl)
                if long or e.detail == "generalized":
                    what = f"status epilepticus, {why}" if long else "generalized seizure"
                    at(t).criteria.append(Criterion(t, 4, f"{what} ({e.text or e.detail})", [e.ref], sets, fl))
                else:
                    # an unspecified seizure may have been generalized (CRES 4): graded partial, flagged
                    flags = ("seizure_type_unspecified",) if e.detail == "unspecified" else ()
                    at(t).criteria.append(Criterion(t, 3, f"partial / non-convulsive seizure ({e.text or e.detail})", [e.ref], sets, flags + fl))
                    if flags:
                        res.flag(*flags)
            elif e.kind == "motor_weakness" and e.detail in ("present", "generalized"):
                # CARTOX "new motor weakness" (§7.2): generalized weakness too (ASTCT asks for focal)
                fl = finding_flags(e) + (("motor_weakness_not_focal",) if e.detail == "generalized" else ())
                res.flag(*fl)
                at(t).criteria.append(Criterion(t, 4, f"new motor weakness ({e.text})", [e.ref], (), fl))
            elif e.kind == "icp_sign" and e.detail == "present":
                # papilledema stage (grade, Frisén) 1-2 is grade 3, 3-5 and every other sign grade 4 (§7.2)
                stage = papilledema_stage(e.text)
                g = 3 if stage is not None and stage <= 2 else 4
                fl = finding_flags(e)
                res.flag(*fl)
                at(t).criteria.append(Criterion(t, g, f"raised ICP ({e.text})", [e.ref], (), fl))
            elif e.kind == "cerebral_edema" and e.detail not in ("absent", "resolving"):
                if e.detail == "hemorrhagic" or any(abs(f.time - t) <= 24 * H for f in ich):
                    res.flag("intracranial_hemorrhage_excluded")
                    continue
                fl = finding_flags(e)
                res.flag(*fl)
                at(t).criteria.append(Criterion(t, 4, f"cerebral edema ({e.text})", [e.ref], (), fl))
    def at_baseline(e: Measurement | Finding) -> bool | None:
        """An assessment at baseline (score 10 / CAPD at baseline / alert), one not at baseline,
        or none (sedated rows, other kinds): for `repetitive_seizures`."""
        if e.time in sedation:
            return None
        if isinstance(e, Measurement):
            if e.kind != score:
                return None
            return (e.value <= capd_base or e.value < 1) if score == "capd_score" else e.value >= 10
        if e.kind == "consciousness":
            return e.detail == "alert"
        return False if e.kind.startswith("unable_") else None

    # repetitive seizures without return to baseline are status epilepticus (CRES 4, §7.2)
    for first, second, assessed in repetitive_seizures(tl, at_baseline):
        if assessed:
            t = second.time
            at(t).criteria.append(Criterion(t, 4, "status epilepticus: repetitive seizures without return to baseline in between", [first.ref, second.ref]))
        else:
            res.flag("repetitive_seizures_baseline_unknown")
    ordered = [points[t] for t in sorted(points)]
    summarise_neuro(res, neuro_episodes(ordered, tl, timedelta(hours=s.icans_resolution_clear_h)))
    return res
