"""The package's import graph has no circles, and its layers run one way (issue 15):

    cli -> pipeline / sync / report -> (fhir client | core: mappers -> timeline -> grading -> writeback)

Checked on the real graph of every import in `fhir_crs` (module level, in functions and under
TYPE_CHECKING alike) as grimp (import-linter's engine) builds it.
"""

from __future__ import annotations

import graphlib

import grimp
import pytest

PKG = "fhir_crs"
GRAPH = grimp.build_graph(PKG)

# The pure core: what a Spark executor runs. None of it may reach I/O, the pipeline or a client.
CORE = ["core", "events", "mappers", "timeline", "grading", "writeback", "settings", "mapping_files", "sources", "jsonread",
        "ownoutput"]
ABOVE_CORE = ["cli", "pipeline", "sync", "report", "spark", "serve", "fhir", "localserver", "html", "cibmtr"]


def _cycle() -> tuple[str, ...] | None:
    sorter = graphlib.TopologicalSorter({m: GRAPH.find_modules_directly_imported_by(m) for m in GRAPH.modules})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        return tuple(exc.args[1])
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_the_cycle_check_finds_a_planted_cycle() -> None:
    graph = grimp.build_graph(PKG)
    graph.add_import(importer=f"{PKG}.timeline", imported=f"{PKG}.grading.result")
    graph.add_import(importer=f"{PKG}.grading.result", imported=f"{PKG}.timeline")
    sorter = graphlib.TopologicalSorter({m: graph.find_modules_directly_imported_by(m) for m in graph.modules})
    with pytest.raises(graphlib.CycleError):
        sorter.prepare()


@pytest.mark.parametrize("low", CORE)
@pytest.mark.parametrize("high", ABOVE_CORE)
def test_the_core_never_imports_the_layers_above_it(low: str, high: str) -> None:
    importer, imported = f"{PKG}.{low}", f"{PKG}.{high}"
    chain = GRAPH.find_shortest_chains(importer=importer, imported=imported, as_packages=True)
    assert not chain, f"{low} reaches {high}: " + "; ".join(" -> ".join(c) for c in chain)


def test_the_timeline_does_not_know_grading() -> None:
    assert not GRAPH.find_shortest_chains(importer=f"{PKG}.timeline", imported=f"{PKG}.grading", as_packages=True)
