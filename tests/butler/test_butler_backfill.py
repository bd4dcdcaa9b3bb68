"""``streamstars backfill --butler``: real sqlite Butler repositories (lsst-daf-butler).

Catalogs are compared with ``compare_snapshots`` against a directory backfill of exactly the
files the Butler finds.  Repositories are built with the product's own writer
(:mod:`streamstars.butler.simulate`) from simulated surveys; visits re-processed into a newer
RUN get files whose fluxes differ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytest.importorskip("lsst.daf.butler", reason="the streamstars[butler] extra is not installed")

from streamstars.butler.discover import SOURCE_TABLE, butler_inventory  # noqa: E402
from streamstars.butler.ingest import FileToIngest, ingest_files  # noqa: E402
from streamstars.butler.repo import open_butler  # noqa: E402
from streamstars.butler.simulate import (  # noqa: E402
    create_repo,
    ingest_survey,
    insert_visits,
    register_dataset_type,
    write_survey_repo,
)
from streamstars.cli import main  # noqa: E402
from streamstars.io.snapshot_files import compare_snapshots, read_snapshot  # noqa: E402
from streamstars.simulate import SimulatedSurvey, simulate_survey  # noqa: E402
from streamstars.state import StateDirectory  # noqa: E402

N_VISITS = 8
SOURCES = 1500
INSTRUMENT = "SimCam"


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> SimulatedSurvey:
    return simulate_survey(tmp_path_factory.mktemp("sim"), n_visits=N_VISITS, seed=31,
                           sources_per_visit=SOURCES, write_refcat=False)


def backfill_snapshot(tmp: Path, name: str, *args: str, code: int = 0) -> Path:
    """Backfill (``args`` = the input options) into a new store, then snapshot it."""
    state, out = tmp / f"{name}-state", tmp / f"{name}-snap"
    assert main(["backfill", *args, "--state", str(state), "--no-progress"]) == code
    assert main(["snapshot", str(out), "--state", str(state)]) == 0
    return out


def same(a: Path, b: Path) -> None:
    diffs = compare_snapshots(a, b)
    assert not diffs, f"{len(diffs)} difference(s), first: {diffs[0][:1500]}"


def reprocess(path: Path, out: Path, factor: float = 1.08) -> Path:
    """A re-processed source table: same sources, other fluxes (a new calibration)."""
    table = pq.read_table(path)
    for name in ("apFlux_12_0_instFlux", "apFlux_17_0_instFlux"):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.multiply(table.column(name), factor))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), out)
    return out


def chain(repo_root: Path, name: str, runs: list[str]) -> None:
    from lsst.daf.butler import CollectionType

    repo = open_butler(repo_root, writeable=True)
    repo.butler.collections.register(name, CollectionType.CHAINED)
    repo.butler.collections.redefine_chain(name, runs)


def current_files(repo_root: Path, collection: str, dest: Path) -> Path:
    """Copy exactly the files the Butler finds first along ``collection`` into ``dest``."""
    repo = open_butler(repo_root)
    inventory = butler_inventory(repo, [collection])
    dest.mkdir()
    for visit, entry in inventory.visits.items():
        shutil.copy(entry.source_paths[0], dest / f"sourceTable_visit_{visit}.parquet")
    for name in ("visitTable", "ccdVisitTable"):
        ref = repo.butler.find_dataset(name, {"instrument": INSTRUMENT}, collections=collection)
        shutil.copy(repo.butler.getURI(ref).ospath, dest / f"{name}.parquet")
    return dest


def two_run_repo(survey: SimulatedSurvey, root: Path, reprocessed: list[int]) -> Path:
    """RUN v1 = the survey; RUN v2 = ``reprocessed`` visits again with other fluxes;
    CHAINED ``SimCam/current`` = [v2, v1]."""
    repo = create_repo(root)
    insert_visits(repo, INSTRUMENT, survey.visit_table_path)
    ingest_survey(repo, survey, "SimCam/runs/v1", instrument=INSTRUMENT)
    new_files = [reprocess(survey.source_paths[survey.visits.index(v)],
                           root.parent / "reprocessed" / f"sourceTable_visit_{v}.parquet")
                 for v in reprocessed]
    ingest_survey(repo, survey, "SimCam/runs/v2", instrument=INSTRUMENT, visits=reprocessed,
                  source_paths=new_files, with_visit_tables=False)
    chain(root, "SimCam/current", ["SimCam/runs/v2", "SimCam/runs/v1"])
    return root


# ------------------------------------------------------------------------------ catalogs
def test_chained_collection_reads_the_current_files_only(survey: SimulatedSurvey,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    reprocessed = [survey.visits[2], survey.visits[5]]
    root = two_run_repo(survey, tmp_path / "repo", reprocessed)

    from_butler = backfill_snapshot(tmp_path, "butler", "--butler", str(root),
                                    "--collections", "SimCam/current")
    assert f"{N_VISITS} applied" in capsys.readouterr().out
    # the catalogs equal a directory backfill of exactly the current files ...
    current = current_files(root, "SimCam/current", tmp_path / "current")
    same(from_butler, backfill_snapshot(tmp_path, "current", str(current)))
    # ... which are not the original files (the re-processed fluxes are in the catalogs)
    original = backfill_snapshot(tmp_path, "orig", str(survey.out_dir))
    assert compare_snapshots(from_butler, original) != []

    # A naive scan of the datastore finds both files of each re-processed visit (one per
    # RUN); read together they repeat every sourceId, so those visits fail -- and had their
    # sources been disjoint, they would have been counted twice.
    naive = backfill_snapshot(tmp_path, "naive", str(root), code=1)
    err = capsys.readouterr().err
    for visit in reprocessed:
        assert f"FAILED visit {visit}" in err
    assert "duplicate sourceIds" in err
    assert compare_snapshots(from_butler, naive) != []
    assert len(read_snapshot(naive).visits["visit"]) == N_VISITS - len(reprocessed)

    # the first match along the chain wins: the other order gives the original catalogs
    chain(root, "SimCam/original-first", ["SimCam/runs/v1", "SimCam/runs/v2"])
    same(backfill_snapshot(tmp_path, "v1first", "--butler", str(root), "--collections",
                           "SimCam/original-first"), original)


def test_arrowastropy_and_dataframe_give_the_same_catalogs(tmp_path: Path) -> None:
    snaps = []
    for style in ("ArrowAstropy", "DataFrame"):
        sim = simulate_survey(tmp_path / f"sim-{style}", n_visits=5, seed=8,
                              sources_per_visit=SOURCES, write_refcat=False, file_style=style)
        written = write_survey_repo(sim, tmp_path / f"repo-{style}",
                                    source_storage_class=style)
        repo = open_butler(written.repo)
        assert repo.butler.get_dataset_type(SOURCE_TABLE).storageClass_name == style
        snaps.append(backfill_snapshot(tmp_path, style, "--butler", str(written.repo),
                                       "--collections", written.collection))
    same(*snaps)
    assert len(read_snapshot(snaps[0]).visits["visit"]) == 5


def test_resume_skips_by_dataset_uuid_and_replace_swaps_a_reprocessed_visit(
        survey: SimulatedSurvey, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = write_survey_repo(survey, tmp_path / "repo")
    state = tmp_path / "state"
    args = ["--butler", str(written.repo), "--collections", written.collection,
            "--state", str(state), "--no-progress"]
    assert main(["backfill", *args]) == 0
    capsys.readouterr()
    inventory = butler_inventory(open_butler(written.repo), [written.collection])
    with StateDirectory.open(state, readonly=True) as store:
        for visit, entry in inventory.visits.items():
            record = store.visit_record(visit)
            assert record is not None
            assert record.dataset_ids == sorted(str(r.id) for r in entry.source_refs)

    # Unchanged UUIDs: skipped without reading -- a datastore file replaced by garbage under
    # the same UUID is not even opened.
    victim = inventory.visits[survey.visits[0]].source_paths[0]
    victim.unlink()
    victim.write_bytes(b"not parquet")
    assert main(["backfill", *args]) == 0
    assert f"0 applied, 0 replaced, {N_VISITS} skipped" in capsys.readouterr().out
    victim.unlink()
    os.link(survey.source_paths[0], victim)  # (--replace below reads every visit again)

    # A visit re-processed into a new RUN chained in front: new UUID -> read -> other content
    visit = survey.visits[3]
    repo = open_butler(written.repo, writeable=True)
    new_file = reprocess(survey.source_paths[3], tmp_path / "v2" / "s.parquet")
    ingest_survey(repo, survey, "SimCam/runs/v2", visits=[visit], source_paths=[new_file],
                  with_visit_tables=False)
    repo.butler.collections.prepend_chain(written.collection, "SimCam/runs/v2")
    assert main(["backfill", *args]) == 1
    err = capsys.readouterr().err
    assert f"FAILED visit {visit}" in err and "--replace" in err
    assert main(["backfill", *args, "--replace"]) == 0
    assert "0 applied, 1 replaced" in capsys.readouterr().out
    # the result is a fresh backfill of the current files
    replaced = tmp_path / "replaced-snap"
    assert main(["snapshot", str(replaced), "--state", str(state)]) == 0
    same(replaced, backfill_snapshot(tmp_path, "fresh", "--butler", str(written.repo),
                                     "--collections", written.collection))


def test_where_and_instrument_select_visits(survey: SimulatedSurvey, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    written = write_survey_repo(survey, tmp_path / "repo")
    cut = survey.visits[4]
    state = tmp_path / "state"
    assert main(["backfill", "--butler", str(written.repo), "--collections",
                 written.collection, "--instrument", INSTRUMENT, "--where",
                 f"instrument = '{INSTRUMENT}' AND visit >= {cut}", "--state", str(state),
                 "--no-progress"]) == 0
    assert f"{N_VISITS - 4} applied" in capsys.readouterr().out
    with StateDirectory.open(state, readonly=True) as store:
        assert sorted(store.applied_visits()) == survey.visits[4:]


# ------------------------------------------------------------------------------ bad input
def _fails(args: list[str], code: int, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == code
    return capsys.readouterr().err


def test_repository_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    err = _fails(["backfill", "--butler", str(tmp_path / "nowhere"), "--collections", "c",
                  "--state", str(state)], 2, capsys)
    assert f"Butler repository {tmp_path / 'nowhere'} not found" in err
    assert err.count("\n") == 1 and not state.exists()


def test_collection_not_found(survey: SimulatedSurvey, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    written = write_survey_repo(survey, tmp_path / "repo")
    state = tmp_path / "state"
    err = _fails(["backfill", "--butler", str(written.repo), "--collections",
                  f"{written.collection},SimCam/nope", "--state", str(state)], 2, capsys)
    assert "collection 'SimCam/nope' not found in Butler repository" in err
    assert err.count("\n") == 1 and not state.exists()


def test_dataset_type_not_registered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lsst.daf.butler import CollectionType

    repo = create_repo(tmp_path / "repo")
    repo.butler.collections.register("empty/run", CollectionType.RUN)
    state = tmp_path / "state"
    err = _fails(["backfill", "--butler", str(tmp_path / "repo"), "--collections", "empty/run",
                  "--state", str(state)], 2, capsys)
    assert "dataset type 'sourceTable_visit' is not registered in Butler repository" in err
    assert err.count("\n") == 1 and not state.exists()


def _as_hsc_visit(path: Path, out: Path, visit: int) -> Path:
    """A simulated source table relabelled as an HSC-Z visit (ids rebuilt for the visit)."""
    table = pq.read_table(path)
    n = table.num_rows
    replace = {"visit": pa.array(np.full(n, visit, dtype=np.int64)),
               "sourceId": pa.array((np.int64(visit) << 20) | np.arange(n, dtype=np.int64)),
               "physical_filter": pa.array(["HSC-Z"] * n), "band": pa.array(["z"] * n)}
    for name, values in replace.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    pq.write_table(table, out)
    return out


def hsc_repo(survey: SimulatedSurvey, tmp_path: Path, shared_data: Path) -> dict[str, Any]:
    """A repository of two HSC-Z visits (COSMOS 1176 and 17900: simulated sources relabelled)
    where only 1176 has its (real) visitSummary."""
    import lsst.daf.butler as dafButler

    repo = create_repo(tmp_path / "repo")
    registry = repo.butler.registry
    registry.insertDimensionData("instrument", {"name": "HSC", "visit_max": 2**21,
                                                "detector_max": 200, "visit_system": 0})
    registry.insertDimensionData("physical_filter", {"instrument": "HSC", "name": "HSC-Z",
                                                     "band": "z"})
    registry.insertDimensionData("day_obs", {"instrument": "HSC", "id": 20140101})
    visits = [1176, 17900]
    registry.insertDimensionData("visit", *[
        {"instrument": "HSC", "id": v, "name": str(v), "physical_filter": "HSC-Z",
         "day_obs": 20140101} for v in visits])
    source_type = register_dataset_type(repo, SOURCE_TABLE, ["instrument", "visit"],
                                        "ArrowAstropy")
    summary_type = register_dataset_type(repo, "visitSummary", ["instrument", "visit"],
                                         "ExposureCatalog")
    files = [FileToIngest(_as_hsc_visit(survey.source_paths[i], tmp_path / f"s{v}.parquet", v),
                          dafButler.DatasetRef(source_type, {"instrument": "HSC", "visit": v},
                                               run="HSC/runs/test"))
             for i, v in enumerate(visits)]
    summary = shared_data / "drp_tasks_visitSummary" / "visitSummary_1176.fits"
    files.append(FileToIngest(summary, dafButler.DatasetRef(
        summary_type, {"instrument": "HSC", "visit": 1176}, run="HSC/runs/test")))
    refs = ingest_files(repo, files)
    return {"root": tmp_path / "repo", "sources": {v: refs[i] for i, v in enumerate(visits)},
            "summary": refs[2], "summary_path": summary,
            "source_paths": {v: files[i].path for i, v in enumerate(visits)}}


def test_visit_without_visit_summary_fails_alone(survey: SimulatedSurvey, tmp_path: Path,
                                                 shared_data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Real HSC visitSummary files (COSMOS visits 1176 and 17900) in a repository; the
    visitSummary of 17900 is missing: that visit fails with a message naming it, the
    collection and the dataset type; 1176 is applied from its real visitSummary."""
    hsc_repo(survey, tmp_path, shared_data)
    state = tmp_path / "state"
    err = _fails(["backfill", "--butler", str(tmp_path / "repo"), "--collections",
                  "HSC/runs/test", "--state", str(state), "--no-progress"], 1, capsys)
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert failed == [
        "FAILED visit 17900: visit 17900: no visitSummary dataset for instrument 'HSC' in "
        "collections ['HSC/runs/test']; run the step that writes it (or add its collection "
        "to --collections)"]
    with StateDirectory.open(state, readonly=True) as store:
        assert sorted(store.applied_visits()) == [1176]
        record = next(r for r in store.visit_records() if r.visit == 1176)
    assert record is not None and record.metadata["physical_filter"] == "HSC-Z"
    assert record.dataset_ids is not None
    assert len(record.dataset_ids) == 2  # the source table and the visitSummary


def test_dataset_file_missing_from_the_datastore(survey: SimulatedSurvey, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    written = write_survey_repo(survey, tmp_path / "repo")
    inventory = butler_inventory(open_butler(written.repo), [written.collection])
    lost = inventory.visits[survey.visits[1]]
    lost.source_paths[0].unlink()
    state = tmp_path / "state"
    err = _fails(["backfill", "--butler", str(written.repo), "--collections",
                  written.collection, "--state", str(state), "--no-progress"], 1, capsys)
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1
    message = failed[0]
    ref = lost.source_refs[0]
    for needle in (f"FAILED visit {lost.visit}", "sourceTable_visit", str(ref.id),
                   "run 'SimCam/sim/run'", "collections ['SimCam/sim']",
                   "missing from the datastore", str(lost.source_paths[0])):
        assert needle in message, needle
    with StateDirectory.open(state, readonly=True) as store:
        assert sorted(store.applied_visits()) == sorted(set(survey.visits) - {lost.visit})


@pytest.mark.parametrize("command", [
    ["backfill", "--butler", "REPO", "--collections", "c", "--state", "STATE"],
    ["publish", "--butler", "REPO", "--collections", "c", "--bootstrap-servers",
     "127.0.0.1:9", "--topic", "t"],
    ["snapshot", "OUT", "--state", "STATE", "--butler", "REPO", "--output-run", "r"],
    ["simulate", "OUT", "--visits", "1", "--butler", "REPO"],
])
def test_butler_extra_not_installed(command: list[str], tmp_path: Path) -> None:
    """A real process in which ``lsst.daf.butler`` cannot be imported (None in sys.modules
    makes ``import`` raise ImportError, as for a package that is not installed)."""
    args = [str(tmp_path / a) if a in ("REPO", "STATE", "OUT") else a for a in command]
    blocker = ("import sys; sys.modules['lsst.daf.butler'] = None; "
               "from streamstars.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'streamstars[butler]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "STATE").exists() and not (tmp_path / "OUT").exists()


def _write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reference_catalog_from_the_butler(tmp_path: Path) -> None:
    """``[fgcmLoadReferenceCatalog] collections`` reads the ``cal_ref_cat`` shards of the
    repository: the same reference stars as the refcat directory."""
    sim = simulate_survey(tmp_path / "sim", n_visits=8, seed=12, sources_per_visit=SOURCES)
    written = write_survey_repo(sim, tmp_path / "repo")
    assert written.refcat_run is not None
    filters = 'filterMap = { "g_6" = "g", "r_57" = "r", "i_39" = "i", "z_20" = "z" }'
    from_dir = _write_config(tmp_path / "dir.toml", f'[fgcmLoadReferenceCatalog]\n'
                             f'path = "{sim.refcat_path}"\n{filters}\n')
    from_butler = _write_config(tmp_path / "butler.toml", f'[fgcmLoadReferenceCatalog]\n'
                                f'collections = ["{written.refcat_run}"]\n{filters}\n')
    a = backfill_snapshot(tmp_path, "dir", str(sim.out_dir), "--config", str(from_dir))
    b = backfill_snapshot(tmp_path, "butler", "--butler", str(written.repo), "--collections",
                          written.collection, "--config", str(from_butler))
    # identical catalogs; only the provenance names the two catalogs differently
    diffs = compare_snapshots(a, b, ignore_metadata_keys=("created", "refcat", "config"))
    assert diffs == []
    reference = read_snapshot(b).reference
    assert reference is not None and len(reference["fgcm_id"]) > 20
    with StateDirectory.open(tmp_path / "butler-state", readonly=True) as store:
        from streamstars.references import stored_refcat

        identity = stored_refcat(store)
    assert identity is not None
    assert identity["dataset_name"] == "cal_ref_cat in refcats/sim"
    assert identity["depth"] == 7 and identity["format_version"] == 1


def test_reference_catalog_collection_needs_a_repository(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          survey: SimulatedSurvey) -> None:
    config = _write_config(tmp_path / "c.toml", '[fgcmLoadReferenceCatalog]\n'
                           'collections = ["refcats"]\nfilterMap = { "r_57" = "r" }\n')
    err = _fails(["backfill", str(survey.out_dir), "--config", str(config), "--state",
                  str(tmp_path / "state")], 2, capsys)
    assert "set fgcmLoadReferenceCatalog.repo or pass --butler REPO" in err


def test_events_are_resolved_through_the_butler(survey: SimulatedSurvey, tmp_path: Path,
                                                shared_data: Path) -> None:
    """What ``run --butler`` does with an event naming datasets (no broker needed)."""
    from streamstars.butler.read import EventResolver
    from streamstars.config import BuildStarsConfig
    from streamstars.errors import DatasetFileMissingError
    from streamstars.events import MalformedEventError, VisitEvent
    from streamstars.ingest import VisitInput, prepare_visit
    from streamstars.io.visitmeta import read_visit_summary

    hsc = hsc_repo(survey, tmp_path, shared_data)
    resolver = EventResolver(open_butler(hsc["root"]))
    config = BuildStarsConfig()
    src, summary = str(hsc["sources"][1176].id), str(hsc["summary"].id)

    def event(visit: int = 1176, **datasets: tuple[str, ...]) -> VisitEvent:
        return VisitEvent(action="apply", visit=visit, instrument="HSC", band="z",
                          physical_filter="HSC-Z", finished_at="2014-01-01T00:00:00Z",
                          butler_datasets=datasets or {"sourceTable_visit": (src,),
                                                       "visitSummary": (summary,)})

    prepared = resolver.prepare(event(), config)
    direct = prepare_visit(VisitInput(1176, [hsc["source_paths"][1176]],
                                      read_visit_summary(hsc["summary_path"])), config)
    for name, values in direct.observations.items():
        np.testing.assert_array_equal(prepared.observations[name], values, err_msg=name)
    assert prepared.metadata.mjd == direct.metadata.mjd
    assert prepared.dataset_ids == sorted([src, summary])

    with pytest.raises(MalformedEventError, match="is a visitSummary, not a sourceTable_visit"):
        resolver.prepare(event(sourceTable_visit=(summary,), visitSummary=(summary,)), config)
    with pytest.raises(MalformedEventError, match="is not of instrument 'HSC' visit 17900"):
        resolver.prepare(event(17900), config)
    unknown = "0190c8a2-5bd1-7c4a-9a1e-3f2b6a7d8e90"
    with pytest.raises(DatasetFileMissingError, match=f"dataset {unknown} is not in the registry"):
        resolver.prepare(event(sourceTable_visit=(unknown,), visitSummary=(summary,)), config)
    wrong_band = VisitEvent(action="apply", visit=1176, instrument="HSC", band="i",
                            physical_filter="HSC-Z", finished_at="2014-01-01T00:00:00Z",
                            butler_datasets={"sourceTable_visit": (src,),
                                             "visitSummary": (summary,)})
    with pytest.raises(MalformedEventError, match="event says band 'i'"):
        resolver.prepare(wrong_band, config)


def test_non_local_uris_are_read_through_a_local_copy(survey: SimulatedSurvey, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset whose URI is not a local file (here lsst-resources' ``resource://`` scheme,
    not local for the Butler, as S3/GCS/WebDAV ones) is read through ``as_local``; the visit
    record names the URI, not the temporary copy."""
    from lsst.resources import ResourcePath

    from streamstars.butler.read import prepare_datasets
    from streamstars.config import BuildStarsConfig

    written = write_survey_repo(survey, tmp_path / "repo")
    entry = butler_inventory(open_butler(written.repo), [written.collection]).visits[
        survey.visits[0]]
    local = prepare_datasets(entry, BuildStarsConfig())  # type: ignore[arg-type]
    package = tmp_path / "pkg" / "remote_store"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(entry.source_paths[0], package / "sourceTable_visit.parq")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    uri = ResourcePath("resource://remote_store/sourceTable_visit.parq")
    assert not uri.isLocal
    entry.source_uris, entry.source_paths = [uri], []  # as discovery leaves a remote dataset
    remote = prepare_datasets(entry, BuildStarsConfig())  # type: ignore[arg-type]
    assert remote.content_hash == local.content_hash
    assert remote.source_paths == [str(uri)] and remote.files == []
