"""Human-readable rendering of grade runs (terminal tables). Only cli.py calls this."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .events import SKIP_CODES
from .identity import Identity, patient_label

PIPE_WIDTH = 400  # piped/redirected output: wide enough that no table folds an id or a flag mid-word


def make_console(stderr: bool = False) -> Console:
    """A terminal gets rich's layout at its width; a pipe or file gets long lines that are never
    wrapped, so ids, references and flags stay whole for grep and for the reader."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)


def _when(v: dict[str, Any], key: str) -> str:
    t = v.get(key)
    if t is None:
        return "–"
    h = v.get("hours", {}).get(key)
    return f"{h:+g} h" if h is not None else t


def _dash(v: Any) -> str:
    return "–" if v is None else str(v)


def render_run(data: dict[str, Any], console: Console, show_skips: bool = False) -> None:
    cases = data["cases"]
    if not cases:
        console.print("[yellow]No CAR-T infusion (day 0) found in the input: nothing to grade.[/yellow]")
    for case in cases:
        age = case.get("age_years")
        who = Identity(case.get("patient_label") or patient_label(case["patient"]), case["patient"], case.get("mrn"), case.get("name"))
        title = (f"{case['patient']} ({who.describe()}) — CAR-T infusion (day 0) {case['infusion']}"
                 + (f" — age {age} y" if age is not None else "")
                 + " — times in hours from day 0")
        table = Table(title=title, title_justify="left", show_lines=False)
        for col in ("Syndrome", "System", "Grade", "Onset", "Max at", "Resolved", "Flags"):
            table.add_column(col, overflow="fold")
        for syndrome in ("crs", "icans"):
            for system, v in case.get(syndrome, {}).items():
                label = system + (f" ({v['variant']})" if v.get("variant") else "")
                table.add_row(
                    syndrome.upper(), label, str(v["grade"]), _when(v, "onset"), _when(v, "max_at"),
                    _when(v, "resolved"), ", ".join(v["flags"]) or "",
                )
        console.print(table)
        adj = case.get("adjacent") or {}
        if adj:
            h, i, c = adj.get("carhlh", {}), adj.get("iec_hs", {}), adj.get("icaht", {})
            console.print(
                f"  carHLH: {'met' if h.get('met') else 'not met'}"
                f"{' (' + h['onset'][:16] + ')' if h.get('onset') else ''}"
                f" · IEC-HS screen: {'suspected, provisional grade ' + str(i.get('grade')) if i.get('suspected') else 'not suspected'}"
                f" · ICAHT early {_dash(c.get('early_grade'))} / late {_dash(c.get('late_grade'))}",
                markup=False, highlight=False,
            )
        for system, v in case.get("crs", {}).items():
            for n, ep in enumerate(v.get("episodes") or [], 1):
                if not ep.get("counted", True):
                    console.print(
                        f"  [{system}] episode {n} (grade {ep.get('grade')}) NOT counted in the grade: setting "
                        "exclude_provisional_episodes=true (under-calls; the default counts every episode)",
                        markup=False, highlight=False)
        for syndrome in ("crs", "icans"):
            for c in (case.get(syndrome, {}).get("astct") or {}).get("criteria", []):
                console.print(f"  {syndrome.upper()} grade {c['grade']} at {c['hour']:+g} h: {c['criterion']}  "
                              f"[{', '.join(c['evidence'])}]", markup=False, highlight=False)
        console.print()
    skipped = data["skipped"]
    if "resources_read" in data:
        n = data["resources_read"]
        console.print(f"{n:,} resource(s) read: {n - len(skipped):,} used, {len(skipped):,} skipped", highlight=False)
    if skipped:
        render_skip_summary(skipped, console, show_skips)


def render_skip_summary(skipped: list[dict[str, Any]], console: Console, show_skips: bool = False) -> None:
    """Skips grouped by their stable reason code, with what the code means and one example."""
    by_code: dict[str, list[dict[str, Any]]] = {}
    for s in skipped:
        by_code.setdefault(s.get("code") or "other", []).append(s)
    head = f"{len(skipped)} resource(s) skipped" + (":" if show_skips else " (use --show-skips for the list):")
    console.print(head, style="bold", markup=False, highlight=False)
    ranked = sorted(by_code.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    for code, items in ranked[:12]:
        example = items[0]["reason"]
        console.print(f"  {len(items):6d}  {code}: {SKIP_CODES.get(code, code)} (e.g. {example})",
                      markup=False, highlight=False)
    if len(ranked) > 12:
        console.print(f"  … and {len(ranked) - 12} other reason codes", markup=False, highlight=False)
    if show_skips:
        for s in skipped:
            console.print(f"  {s['resource']}: {s['reason']}", markup=False, highlight=False)


def render_timeline(case: dict[str, Any], console: Console, limit: int = 80) -> None:
    """The case timeline: hours from day 0, what happened, and the source resource."""
    table = Table(title=f"{case['patient']} — timeline from CAR-T infusion {case['infusion']}", title_justify="left")
    for col in ("Hour", "Event", "Detail", "Source"):
        table.add_column(col, overflow="fold")
    rows = case.get("timeline", [])
    for e in rows[:limit]:
        table.add_row(f"{e['hour']:+g}", str(e["kind"]).replace("_", " "), str(e["detail"]), ", ".join(e["evidence"][:2]))
    console.print(table)
    if len(rows) > limit:
        console.print(f"  … {len(rows) - limit} more events (--json for all)")


def render_sync_summary(data: dict[str, Any], console: Console) -> None:
    table = Table(title="fhir-crs sync", title_justify="left", show_header=False)
    table.add_column("What")
    table.add_column("Count", justify="right")
    for label, value in (
        ("patients in cohort", data["patients"]), ("graded", data["graded"]), ("grades changed", data["changed"]),
        ("unchanged", data["unchanged"]), ("Conditions written", data["written"]["Condition"]),
        ("Bundles written", data["written"]["Bundle"]), ("Provenances written", data.get("provenance_written", 0)),
        ("cases retracted", data.get("retracted_cases", 0)),
        ("HTTP requests", data["requests"]),
        ("seconds", data["seconds"]), ("errors", len(data["errors"])),
    ):
        table.add_row(label, str(value))
    console.print(table)
    if data["skipped"]:
        console.print("Skipped resources by reason:")
        for code, n in sorted(data["skipped"].items(), key=lambda kv: (-kv[1], kv[0]))[:15]:
            console.print(f"  {n:6d}  {code}: {SKIP_CODES.get(code, code)}", markup=False, highlight=False)
    for e in data["errors"]:
        console.print(f"[red]error[/red] {e['patient']}: {e['error']}", highlight=False)
