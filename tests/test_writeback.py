"""Write-back: the Condition and summary Bundle validate against R4B and round-trip; the write
protocol (identifier look-ups in one batch, conditional create, unchanged replay, If-Match and
version conflicts, duplicate identifiers, convention changes) on the embedded sekmet-fhir and on
HAPI JPA. Only the local-codes fetch fallback stays imitated with `responses`."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import responses
from conftest import ROOT, load_vignette
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.provenance import Provenance

from fhir_crs import __version__
from fhir_crs.conventions import EXTENSION, ConventionChangeError, current_conventions
from fhir_crs.errors import DuplicateTargetError
from fhir_crs.fhir import FhirClient, NoAuth
from fhir_crs.pipeline import run_paths, write_case
from fhir_crs.writeback import build_case_write, stored_grade, stored_hash, transaction_for

BASE = "https://fhir.test/r4"
SYSTEM = "urn:fhir-crs:case"


@pytest.fixture(scope="module")
def case():
    run = run_paths([ROOT / "fixtures" / "R4" / "vignettes" / "V25.json"])
    return run.cases[0], run.settings


def test_a_written_condition_read_back_is_its_own_output_never_an_input(case, tmp_path):
    """The grade Conditions and the summary Bundle fhir-crs wrote, read back with the patient's
    data (pull and sync read all Conditions; a registry's export of everything holds both):
    named skips `own_output`, not data problems (`--strict` passes), the grades unchanged, and
    the summary Bundle one skip (its Observations and List are not read as input). A Bundle that
    holds input beside a written Condition is input: only that Condition is skipped."""
    from fhir_crs.events import NOT_A_DATA_PROBLEM
    from fhir_crs.ownoutput import is_own_output

    c, settings = case
    w = build_case_write(c, settings, SYSTEM, recorded="2026-01-01T00:00:00Z")
    written = [dict(r, id=f"written-{name}") for name, r in w.resources.items() if r["resourceType"] == "Condition"]
    summary = dict(w.resources["summary"], id="written-summary")
    # one of the summary's result Observations stored on its own (a server that splits Bundles)
    written.append(dict(next(e["resource"] for e in summary["entry"] if e["resource"]["resourceType"] == "Observation"),
                        id="written-result"))
    assert written and all(is_own_output(r) for r in written) and is_own_output(summary)
    vignette = ROOT / "fixtures" / "R4" / "vignettes" / "V25.json"
    source = json.loads(vignette.read_text())
    assert not any(is_own_output(e["resource"]) for e in source["entry"]) and not is_own_output(source)
    mixed = tmp_path / "with-written.json"  # one Bundle: the input and the written Conditions
    mixed.write_text(json.dumps(dict(source, entry=[*source["entry"], *({"resource": r} for r in written)])))
    apart = tmp_path / "summary.json"  # the summary Bundle as its own file, as an export holds it
    apart.write_text(json.dumps(summary))
    before, after = run_paths([vignette]), run_paths([mixed, apart])
    assert [x.to_json(settings) for x in after.cases] == [x.to_json(settings) for x in before.cases]
    own = [s for s in after.skipped if s.code == "own_output"]
    assert sorted(s.resource for s in own) == sorted([*(f"{r['resourceType']}/{r['id']}" for r in written), "Bundle/written-summary"])
    assert len(after.skipped) == len(before.skipped) + len(own)  # nothing else: no unmapped result Observation
    assert "own_output" in NOT_A_DATA_PROBLEM


def test_condition_and_bundle_validate_and_round_trip(case):
    c, settings = case
    w = build_case_write(c, settings, SYSTEM, recorded="2026-01-01T00:00:00Z")
    for name, res in w.resources.items():
        model = (Condition if res["resourceType"] == "Condition" else Bundle).model_validate(res)
        assert json.loads(model.model_dump_json(exclude_none=True)) == json.loads(json.dumps(res)), name
    crs = w.resources["crs"]
    assert crs["code"]["coding"][0] == {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "D89.832",
                                        "display": "Cytokine release syndrome, grade 2"}
    assert crs["severity"]["coding"][0]["code"] == "6736007"
    assert [s["type"]["coding"][0]["code"] for s in crs["stage"]] == [
        "astct-crs", "lee2014-crs", "penn-crs", "mskcc-crs", "cartox-crs", "ctcae5-crs"]
    assert "PedsCARTOX" not in json.dumps(crs) and "pediatric" in crs["stage"][4]["summary"]["text"]
    assert crs["clinicalStatus"]["coding"][0]["code"] == "resolved" and crs["abatementDateTime"]
    assert w.resources["icans"]["code"]["coding"][0]["code"] == "G92.03"
    lst = [e["resource"] for e in w.resources["summary"]["entry"] if e["resource"]["resourceType"] == "List"]
    assert lst and all(re.match(r"^[A-Z][A-Za-z]+/[A-Za-z0-9.-]+$", e["item"]["reference"]) for e in lst[0]["entry"])
    assert lst[0]["entry"][0]["flag"]["coding"][0]["code"] == "car_t_infusion"


def test_hash_ignores_run_time_fields(case):
    c, settings = case
    a = build_case_write(c, settings, SYSTEM, recorded="2026-01-01T00:00:00Z")
    b = build_case_write(c, settings, SYSTEM, recorded="2026-06-01T00:00:00Z")
    assert stored_hash(a.resources["crs"]) == stored_hash(b.resources["crs"])


def test_transaction_uses_if_match_for_existing_and_conditional_update_otherwise(case):
    c, settings = case
    w = build_case_write(c, settings, SYSTEM)
    tx = transaction_for(w, {"crs": ("c1", 'W/"3"')})
    reqs = {e["resource"]["resourceType"] + ":" + e["request"]["url"].split("?")[0]: e["request"] for e in tx["entry"]}
    assert reqs["Condition:Condition/c1"]["ifMatch"] == 'W/"3"'
    assert any(r["url"].startswith("Bundle?identifier=urn:fhir-crs:case|") for r in reqs.values())


def _searchset(*resources):
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def client():
    return FhirClient(BASE, auth=NoAuth(), sleep=lambda s: None)


# ----------------------------------------------------------------------------- the write protocol, on real servers
#
# Every write-back test below writes V25 (loaded on the server and graded from it, so the
# references resolve) to the embedded sekmet-fhir and to HAPI JPA, each test under its own
# identifier system. `Recording` keeps the transactions sent; `requests_made` counts requests.


@pytest.fixture(scope="module", params=["sekmet", "hapi"])
def server(request):
    return request.getfixturevalue("sekmet_server" if request.param == "sekmet" else "hapi_server")


@pytest.fixture(scope="module")
def graded(server):
    """V25 loaded on `server` and graded from it: (its case, the settings)."""
    from fhir_crs.config import RunConfig
    from fhir_crs.pipeline import pull_patient

    with FhirClient(server.base, auth=NoAuth()) as c:
        run = pull_patient(c, load_vignette(c, "V25"), RunConfig(server=server.base)).run
    return run.cases[0], run.settings


class Recording(FhirClient):
    """A real client that keeps every transaction it sends; `before_tx` runs (once) before the
    first one is sent — a second writer changing the server in between."""

    def __init__(self, base: str, before_tx=None):
        super().__init__(base, auth=NoAuth(), max_retries=1)
        self.sent: list[dict] = []
        self.before_tx = before_tx

    def transaction(self, bundle):
        if bundle.get("type") == "transaction":
            self.sent.append(json.loads(json.dumps(bundle)))
            hook, self.before_tx = self.before_tx, None
            if hook is not None:
                hook()
        return super().transaction(bundle)


def _system() -> str:
    return f"urn:fhir-crs:wb-{uuid.uuid4().hex[:10]}"


def _ident(system: str, write, name: str) -> str:
    return f"{system}|{write.identifiers[name]['value']}"


def test_first_write_creates_in_one_transaction_with_its_provenance(server, graded):
    c, settings = graded
    system = _system()
    rec = Recording(server.base)
    out = write_case(rec, c, settings, system)
    assert out.status == "created"
    # one batch of the three identifier look-ups, then the transaction (issue 13: <= 6 per patient)
    assert rec.requests_made == 2 and rec.batch_supported
    (posted,) = rec.sent
    assert posted["type"] == "transaction" and len(posted["entry"]) == 4
    *writes, prov_entry = posted["entry"]
    assert all(e["request"]["method"] == "PUT" and "?identifier=" in e["request"]["url"] for e in writes)
    assert prov_entry["request"] == {"method": "POST", "url": "Provenance"}
    prov = prov_entry["resource"]
    Provenance.model_validate(prov)
    # target: the two Conditions and the summary Bundle of this transaction (by their fullUrls)
    assert [t["reference"] for t in prov["target"]] == [e["fullUrl"] for e in writes]
    assert [e["resource"]["resourceType"] for e in writes] == ["Condition", "Condition", "Bundle"]
    # agent: fhir-crs as a contained Device with its version
    (device,) = prov["contained"]
    assert device["resourceType"] == "Device" and device["version"] == [{"value": __version__}]
    assert prov["agent"][0]["who"]["reference"] == "#" + device["id"]
    # entity: the source resources (the patient, the infusion, every piece of evidence)
    sources = {e["what"]["reference"] for e in prov["entity"]}
    assert all(e["role"] == "source" for e in prov["entity"])
    crs = writes[0]["resource"]
    assert {d["reference"] for d in crs["evidence"][0]["detail"]} <= sources and c.timeline.patient in sources
    # the hash of the settings and mapping tables, the same on the Provenance and the Conditions
    ext = next(x for x in prov["extension"] if x["url"] == EXTENSION)
    assert ext in crs["extension"] and ext in writes[1]["resource"]["extension"]
    parts = {x["url"]: x["valueString"] for x in ext["extension"] if x["url"] != "table"}
    assert parts["settings-sha256"] == settings.fingerprint() and parts["settings"] == "{}"
    tables = [x["valueString"].split(" sha256:")[0] for x in ext["extension"] if x["url"] == "table"]
    assert tables == sorted(tables) and {"devices.toml", "medications.toml", "observations.toml", "procedures.toml",
                                         "units.toml"} <= set(tables) and "grading.toml" not in tables
    assert prov["policy"] == [f"urn:fhir-crs:conventions:sha256:{parts['sha256']}"]
    assert {ch["action"] for ch in out.changes} == {"create"}
    # on the server: the Provenance's targets are the resources written (fullUrls resolved)
    stored = rec.read(*out.written["provenance"].split("/"))
    assert sorted(t["reference"].split("/_history")[0] for t in stored["target"]) == sorted(
        out.written[n] for n in ("crs", "icans", "summary"))
    for name, rtype in (("crs", "Condition"), ("icans", "Condition"), ("summary", "Bundle")):
        (found,) = rec.search(rtype, [("identifier", _ident(system, build_case_write(c, settings, system), name))],
                              no_cache=True).matches
        assert f"{rtype}/{found['id']}" == out.written[name]


def test_replay_with_same_content_writes_nothing(server, graded):
    c, settings = graded
    system = _system()
    assert write_case(Recording(server.base), c, settings, system).status == "created"
    rec = Recording(server.base)
    out = write_case(rec, c, settings, system)
    assert out.status == "unchanged" and rec.sent == []
    assert rec.requests_made == 1  # the batch of identifier look-ups only
    assert set(out.written) == {"crs", "icans", "summary"}


def test_identifier_lookups_one_by_one_when_the_server_refuses_batches(server, graded, tmp_path: Path):
    """A server refusing `batch` (here a proxy in front of the server answering 405 to POST [base]
    until the write): the three look-ups go one by one and the write still happens, once."""
    from loopback import LoopbackServer

    c, settings = graded
    system = _system()
    with LoopbackServer(tmp_path / "no-batch") as proxy:
        proxy.proxy(server.base)
        proxy.route("POST", "/fhir", status=405, json={"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-supported", "diagnostics": "batch is not supported"}]})

        def allow_the_transaction():
            proxy._routes.clear()
            proxy._write()

        rec = Recording(proxy.base, before_tx=allow_the_transaction)
        out = write_case(rec, c, settings, system)
        assert out.status == "created" and not rec.batch_supported and len(rec.sent) == 1
        seen = [(r["method"], r["path"]) for r in proxy.requests()]
        assert seen == [("POST", "/fhir"), ("GET", "/fhir/Condition"), ("GET", "/fhir/Condition"),
                        ("GET", "/fhir/Bundle"), ("POST", "/fhir")]
        again = Recording(proxy.base)
        again.batch_supported = False
        assert write_case(again, c, settings, system).status == "unchanged" and again.requests_made == 3


def test_version_conflict_rereads_and_reapplies(server, graded):
    """A second writer updates the stored CRS Condition between the look-ups and the transaction:
    the If-Match fails (HAPI 409, sekmet 412), write_case re-reads and re-applies on the new version."""
    from fhir_crs.settings import load_settings

    c, settings = graded
    system = _system()
    first = write_case(Recording(server.base), c, settings, system)
    cid = first.written["crs"].split("/")[1]
    plain = FhirClient(server.base, auth=NoAuth())

    def other_writer():
        current = plain.read("Condition", cid)
        current["note"] = [*current.get("note", []), {"text": "edited by someone else"}]
        plain.put(f"Condition/{cid}", current)

    changed = load_settings(ROOT / "mappings", ["resolution_clear_h=25"])  # a result that must be written
    rec = Recording(server.base, before_tx=other_writer)
    out = write_case(rec, c, changed, system, allow_convention_change=True)
    assert out.status == "updated" and len(rec.sent) == 2
    assert rec.sent[0]["entry"][0]["request"] == {"method": "PUT", "url": f"Condition/{cid}", "ifMatch": 'W/"1"'}
    assert rec.sent[1]["entry"][0]["request"] == {"method": "PUT", "url": f"Condition/{cid}", "ifMatch": 'W/"2"'}
    stored = plain.read("Condition", cid)
    assert stored["meta"]["versionId"] == "3" and "edited by someone else" not in json.dumps(stored["note"])


def test_two_resources_with_one_identifier_is_a_data_quality_error(server, graded):
    c, settings = graded
    system = _system()
    plain = FhirClient(server.base, auth=NoAuth())
    write_case(plain, c, settings, system)
    (stored,) = plain.search("Condition", [("identifier", _ident(system, build_case_write(c, settings, system), "crs"))],
                             no_cache=True).matches
    plain.post("Condition", {k: v for k, v in stored.items() if k not in ("id", "meta")})
    rec = Recording(server.base)
    with pytest.raises(DuplicateTargetError, match="2 Condition resources"):
        write_case(rec, c, settings, system)
    assert rec.sent == []


def test_conditional_write_matching_two_resources_is_not_retried(server, graded):
    """Nothing found at look-up time, then two Conditions with the identifier appear before the
    transaction: its conditional update matches both (412 on both servers) — reported, not retried."""
    c, settings = graded
    system = _system()
    crs = build_case_write(c, settings, system).resources["crs"]
    plain = FhirClient(server.base, auth=NoAuth())

    def two_writers():
        for _ in range(2):
            plain.post("Condition", crs)

    rec = Recording(server.base, before_tx=two_writers)
    with pytest.raises(DuplicateTargetError):
        write_case(rec, c, settings, system)
    assert len(rec.sent) == 1


def test_stored_condition_graded_with_other_conventions_is_not_overwritten(server, graded, tmp_path: Path):
    """A rerun with other settings or tables refuses to overwrite, naming what differs; with
    allow_convention_change it writes (If-Match on the stored version, Provenance included)."""
    import shutil

    from fhir_crs.settings import load_settings

    c, settings = graded
    system = _system()
    old_tables = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", old_tables)
    with (old_tables / "observations.toml").open("a") as f:
        f.write('\n[site_extra_temperature]\ngroup = "vital"\nunit = "Cel"\ncodes = ["urn:site|T1"]\n')
    old_settings = load_settings(None, ["resolution_clear_h=36", "fever_c=38.3"])
    old = write_case(Recording(server.base), c, old_settings, system, mappings_dir=old_tables)
    assert old.status == "created"
    stored = build_case_write(c, old_settings, system)
    ids = {n: old.written[n].split("/")[1] for n in ("crs", "icans", "summary")}
    rec = Recording(server.base)
    with pytest.raises(ConventionChangeError) as exc:
        write_case(rec, c, settings, system, mappings_dir=ROOT / "mappings")
    msg = str(exc.value)
    assert exc.value.exit_code == 9 and f"not overwriting Condition/{ids['crs']}" in msg
    assert "fever_c 38.3 -> 38.0" in msg and "resolution_clear_h 36.0 -> 24.0" in msg
    assert "mapping tables: observations.toml (changed)" in msg and "--allow-convention-change" in msg
    assert rec.sent == []
    # a dry run reports it instead of failing
    dry = write_case(rec, c, settings, system, mappings_dir=ROOT / "mappings", dry_run=True)
    assert dry.status == "refused" and dry.message == msg and rec.sent == []
    assert [(ch["kind"], ch["action"], ch["old_grade"], ch["new_grade"]) for ch in dry.changes] == [
        ("crs", "update", stored_grade(stored.resources["crs"]), c.crs["astct"].grade),
        ("icans", "update", stored_grade(stored.resources["icans"]), c.icans["astct"].grade),
        ("summary", "update", None, None), ("provenance", "create", None, None)]
    # allowed: written with If-Match, and the new conventions recorded
    out = write_case(rec, c, settings, system, mappings_dir=ROOT / "mappings", allow_convention_change=True)
    assert out.status == "updated"
    (sent,) = rec.sent
    entries = sent["entry"]
    assert entries[0]["request"] == {"method": "PUT", "url": f"Condition/{ids['crs']}", "ifMatch": 'W/"1"'}
    assert current_conventions(settings, ROOT / "mappings").extension() in entries[0]["resource"]["extension"]
    assert entries[-1]["resource"]["activity"]["coding"][0]["code"] == "UPDATE"
    assert [t["reference"] for t in entries[-1]["resource"]["target"]] == [
        f"Condition/{ids['crs']}", f"Condition/{ids['icans']}", f"Bundle/{ids['summary']}"]
    assert rec.read("Condition", ids["crs"])["meta"]["versionId"] == "2"


def test_a_stored_condition_without_recorded_conventions_is_not_overwritten(server, graded):
    c, settings = graded
    system = _system()
    legacy = dict(build_case_write(c, settings, system).resources["crs"])
    legacy["extension"] = [{"url": "urn:fhir-crs:StructureDefinition:content-hash", "valueString": "old"}]
    plain = FhirClient(server.base, auth=NoAuth())
    plain.post("Condition", legacy)
    rec = Recording(server.base)
    with pytest.raises(ConventionChangeError, match="records no settings or mapping-table hashes"):
        write_case(rec, c, settings, system)
    assert rec.sent == []


def test_golden_condition_shape_is_stable(case, tmp_path: Path):
    """The CRS Condition for V25, as write_case builds it (with the conventions extension),
    equals the committed golden file (fixtures/expected). The sha256 values of the settings and
    mapping tables are replaced by a placeholder here — they change with every table edit and
    are checked by the Provenance and convention-change tests — their names and shape are not."""
    c, settings = case
    w = build_case_write(c, settings, SYSTEM, recorded="2026-01-01T00:00:00Z",
                         conventions=current_conventions(settings, ROOT / "mappings"))
    golden = ROOT / "fixtures" / "expected" / "V25.condition.json"
    crs = json.loads(json.dumps(w.resources["crs"]))
    for ext in crs["extension"]:
        subs = []
        for sub in ext.get("extension", []):
            if sub["url"] in ("sha256", "settings-sha256"):
                assert re.fullmatch(r"[0-9a-f]{64}", sub["valueString"])
                sub["valueString"] = "<sha256>"
            elif sub["url"] == "table":  # one per mapping table (the set of tables may grow)
                assert re.fullmatch(r"[a-z_.]+\.toml sha256:[0-9a-f]{64}", sub["valueString"])
                sub = {"url": "table", "valueString": "<file>.toml sha256:<sha256>"}
                if sub in subs:
                    continue
            elif sub["url"] == "version":
                assert sub["valueString"] == __version__
                sub["valueString"] = "<version>"
            subs.append(sub)
        if subs:
            ext["extension"] = subs
    got = json.dumps(crs, indent=1, sort_keys=True)
    if not golden.exists():
        golden.write_text(got + "\n")
    assert got + "\n" == golden.read_text()


@responses.activate
def test_fetch_uses_date_windows_and_falls_back_when_cart_has_only_local_codes(code_map):
    from fhir_crs.config import RunConfig
    from fhir_crs.pipeline import fetch_patient

    cart = {"resourceType": "Procedure", "id": "cart1", "status": "completed", "subject": {"reference": "Patient/p1"},
            "code": {"text": "CAR-T cell infusion (tisagenlecleucel)"}, "performedDateTime": "2025-03-10T08:00:00Z"}
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"})
    windowed = []

    def search(request):
        q = request.params
        if "date" in q or "effective-time" in q:
            windowed.append((request.path_url.split("?")[0], q))
        body = _searchset(cart) if request.path_url.startswith("/r4/Procedure") and "code" not in q else _searchset()
        return 200, {}, json.dumps(body)

    for rtype in ("Procedure", "MedicationAdministration", "Observation", "Condition"):
        responses.add_callback(responses.GET, f"{BASE}/{rtype}", callback=search)
    one_by_one = client()
    one_by_one.batch_supported = False  # the reads one by one (batches: tests/test_sync_feed.py on real servers)
    out = fetch_patient(one_by_one, "p1", RunConfig(), code_map)
    assert any(r.get("id") == "cart1" for r in out)
    paths = {p for p, _ in windowed}
    assert paths == {"/r4/Procedure", "/r4/MedicationAdministration", "/r4/Observation"}
    obs_q = next(q for p, q in windowed if p == "/r4/Observation")
    assert obs_q["date"] == ["ge2025-03-03T08:00:00Z", "le2025-06-18T08:00:00Z"]  # 7 days before, 100 after
    conditions = [c for c in responses.calls if c.request.path_url.startswith("/r4/Condition")]
    assert len(conditions) == 1 and "date" not in conditions[0].request.params  # all of them: problem lists are undated


@pytest.mark.parametrize(("overrides", "ge", "le"), [
    ([], "ge2025-03-03T08:00:00Z", "le2025-06-18T08:00:00Z"),  # the configured 7 / 100 days
    (["icaht_late_end_day=180"], "ge2025-03-03T08:00:00Z", "le2025-09-06T08:00:00Z"),  # late ICAHT read to day 180
    (["home_baseline_lookback_days=30"], "ge2025-02-08T08:00:00Z", "le2025-06-18T08:00:00Z"),  # home O2 baseline
])
@responses.activate
def test_the_fetch_window_covers_what_the_grading_settings_read(code_map, overrides, ge, le):
    """pull/sync/bedside read at least what grading looks at: a late-ICAHT window or a home-
    baseline look-back wider than window_after_days / window_before_days widens the searches,
    so a setting never loses online what the same grading reads offline."""
    from fhir_crs.config import RunConfig
    from fhir_crs.pipeline import fetch_patient
    from fhir_crs.settings import load_settings

    cart = {"resourceType": "Procedure", "id": "cart1", "status": "completed", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1156961008"}]}, "performedDateTime": "2025-03-10T08:00:00Z"}
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"})
    windows: dict[str, list[str]] = {}

    def search(request):
        q = request.params
        for key in ("date", "effective-time"):
            if key in q:
                windows[request.path_url.split("?")[0]] = q[key]
        body = _searchset(cart) if request.path_url.startswith("/r4/Procedure") and "code" in q else _searchset()
        return 200, {}, json.dumps(body)

    for rtype in ("Procedure", "MedicationAdministration", "Observation", "Condition"):
        responses.add_callback(responses.GET, f"{BASE}/{rtype}", callback=search)
    one_by_one = client()
    one_by_one.batch_supported = False
    settings = load_settings(ROOT / "mappings", overrides)
    fetch_patient(one_by_one, "p1", RunConfig(), code_map, settings)
    assert set(windows) == {"/r4/Procedure", "/r4/MedicationAdministration", "/r4/Observation"}
    assert all(w == [ge, le] for w in windows.values()), windows


def test_comments_in_a_table_do_not_count_as_a_change(case, tmp_path: Path):
    import shutil

    from fhir_crs.conventions import table_hashes

    d = tmp_path / "m"
    shutil.copytree(ROOT / "mappings", d)
    before = table_hashes(d)
    with (d / "units.toml").open("a") as f:
        f.write("\n# a comment\n")
    assert table_hashes(d) == before
    with (d / "units.toml").open("a") as f:
        f.write('\n[zz_site_unit]\n')
    assert table_hashes(d) != before
