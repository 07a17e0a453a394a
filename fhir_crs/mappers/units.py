"""Unit normalisation for the mappers: spelling -> UCUM (via mappings/units.toml) -> canonical
unit of an Observation kind. Returns the value and unit together, or a reason why not."""

from __future__ import annotations

from ..mapping_files import CodeMap, ObservationKind

FAHRENHEIT = "[degF]"
CELSIUS = "Cel"


def f_to_c(value: float) -> float:
    return (value - 32.0) * 5.0 / 9.0


def to_canonical(
    kind: ObservationKind, value: float, unit_spellings: list[str], code_map: CodeMap
) -> tuple[float | None, str, str | None]:
    """Converts `value` to the kind's canonical unit.

    Returns (value or None, the UCUM unit recognised, reason-if-None-or-note). A note
    "unit_assumed" is returned when the source carried no unit and the kind allows inference.
    """
    units = [code_map.canonical_unit(u) for u in unit_spellings if u]
    target = kind.unit
    if not target:
        return value, units[0] if units else "", None
    for u in units:
        if u == target:
            return value, u, None
        if u in kind.convert:
            return value * kind.convert[u], u, None
    if not units:
        return value, "", "unit_assumed"
    # Scores and dimensionless values often arrive with a decorative unit.
    if target in ("{score}", "1"):
        return value, units[0], None
    return None, units[0], f"unit '{unit_spellings[0]}' cannot be converted to {target}"
