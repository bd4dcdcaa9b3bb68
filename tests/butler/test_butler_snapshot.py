"""``streamstars snapshot --butler REPO --output-run RUN``: the fit cycle's inputs in a Butler.

Real sqlite repositories; the datasets are found with ``query_datasets`` and read back with
``butler.get`` (parquet) or through their URI (the afw FITS visit catalog).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("lsst.daf.butler", reason="the streamstars[butler] extra is not installed")

from streamstars.butler.ingest import FITS_FORMATTER, PARQUET_FORMATTER  # noqa: E402
from streamstars.butler.repo import open_butler  # noqa: E402
from streamstars.butler.simulate import ButlerSurvey, write_survey_repo  # noqa: E402
from streamstars.butler.snapshot import ingest_snapshot  # noqa: E402
from streamstars.cli import main  # noqa: E402
from streamstars.errors import ButlerError  # noqa: E402
from streamstars.simulate import simulate_survey  # noqa: E402

EXPECTED = {
    "fgcm_star_observations": ("ArrowAstropy", "fgcm_star_observations.parquet"),
    "fgcm_star_ids": ("ArrowAstropy", "fgcm_star_ids.parquet"),
    "fgcm_reference_stars": ("ArrowAstropy", "fgcm_reference_stars.parquet"),
    "fgcmVisitCatalog": ("Catalog", "fgcmVisitCatalog.fits"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ButlerSurvey, Path]:
    """A simulated survey as a repository and a store backfilled from it with a refcat."""
    tmp = tmp_path_factory.mktemp("snapbutler")
    sim = simulate_survey(tmp / "sim", n_visits=5, seed=17, sources_per_visit=1500)
    written = write_survey_repo(sim, tmp / "repo")
    config = tmp / "refs.toml"
    config.write_text('[fgcmLoadReferenceCatalog]\n'
                      f'collections = ["{written.refcat_run}"]\n'
                      'filterMap = { "g_6" = "g", "r_57" = "r", "i_39" = "i", "z_20" = "z" }\n')
    state = tmp / "state"
    assert main(["backfill", "--butler", str(written.repo), "--collections",
                 written.collection, "--config", str(config), "--state", str(state),
                 "--no-progress"]) == 0
    return written, state


def test_snapshot_is_ingested_as_the_fit_cycle_inputs(built: tuple[ButlerSurvey, Path],
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    written, state = built
    out = tmp_path / "snap"
    run = "SimCam/fgcm/test1"
    assert main(["snapshot", str(out), "--state", str(state), "--butler", str(written.repo),
                 "--output-run", run]) == 0
    assert f"4 datasets ingested into RUN {run}" in capsys.readouterr().out
    butler = open_butler(written.repo).butler
    for name, (storage_class, fname) in EXPECTED.items():
        refs = butler.query_datasets(name, collections=run, limit=None, explain=False)
        assert len(refs) == 1, name
        ref = refs[0]
        assert ref.datasetType.storageClass_name == storage_class
        assert set(ref.datasetType.dimensions.names) == {"instrument"}
        assert dict(ref.dataId.required) == {"instrument": "SimCam"}
        if fname.endswith(".parquet"):
            back = butler.get(ref, storageClass="ArrowTable")
            assert back.equals(pq.read_table(out / fname)), name
            assert butler.get(ref).colnames == pq.read_schema(out / fname).names
        else:
            assert Path(butler.getURI(ref).ospath).read_bytes() == (out / fname).read_bytes()
    # the formatters real repositories record for these storage classes
    with sqlite3.connect(written.repo / "gen3.sqlite3") as db:
        formatters = dict(db.execute(
            "SELECT r.path, r.formatter FROM file_datastore_records r").fetchall())
    ours = {path: f for path, f in formatters.items() if path.startswith(run)}
    assert len(ours) == 4
    assert sorted(set(ours.values())) == sorted({PARQUET_FORMATTER, FITS_FORMATTER})


def test_each_snapshot_goes_into_a_new_run(built: tuple[ButlerSurvey, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    written, state = built
    base = ["--state", str(state), "--butler", str(written.repo), "--output-chain",
            "SimCam/fgcm/latest"]
    assert main(["snapshot", str(tmp_path / "a"), *base, "--output-run", "SimCam/fgcm/a"]) == 0
    capsys.readouterr()
    # the same RUN again: refused before anything is written
    assert main(["snapshot", str(tmp_path / "again"), *base,
                 "--output-run", "SimCam/fgcm/a"]) == 2
    err = capsys.readouterr().err
    assert "collection 'SimCam/fgcm/a' already exists" in err and "new --output-run" in err
    assert not (tmp_path / "again").exists()
    # a new RUN: the chain now resolves to it, the old one is still there
    assert main(["snapshot", str(tmp_path / "b"), *base, "--output-run", "SimCam/fgcm/b"]) == 0
    butler = open_butler(written.repo).butler
    assert butler.collections.get_info("SimCam/fgcm/latest").children == (
        "SimCam/fgcm/b", "SimCam/fgcm/a")
    ref = butler.find_dataset("fgcm_star_ids", {"instrument": "SimCam"},
                              collections="SimCam/fgcm/latest")
    assert ref is not None and ref.run == "SimCam/fgcm/b"
    assert len(butler.query_datasets("fgcm_star_ids", collections="SimCam/fgcm/a",
                                     limit=None, explain=False)) == 1


def test_a_failed_ingest_leaves_nothing_visible(built: tuple[ButlerSurvey, Path],
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The datastore fails to store the last file (an I/O error injected into
    lsst-resources): no RUN, no dataset, no chain entry -- not the three parquet datasets."""
    from lsst.resources.file import FileResourcePath

    written, state = built
    out = tmp_path / "snap"
    assert main(["snapshot", str(out), "--state", str(state)]) == 0
    original = FileResourcePath.transfer_from

    def failing(self: FileResourcePath, src: FileResourcePath, *args: object,
                **kwargs: object) -> None:
        if str(src).endswith(".fits"):
            raise OSError("injected: disk full while storing the visit catalog")
        original(self, src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(FileResourcePath, "transfer_from", failing)
    repo = open_butler(written.repo, writeable=True)
    with pytest.raises(OSError, match="injected"):
        ingest_snapshot(repo, out, "SimCam/fgcm/broken", "SimCam", chain="SimCam/fgcm/broken-c")
    monkeypatch.undo()
    butler = open_butler(written.repo).butler
    names = {info.name for info in butler.collections.query_info("*")}
    assert "SimCam/fgcm/broken" not in names and "SimCam/fgcm/broken-c" not in names
    for name in EXPECTED:
        if butler.registry.queryDatasetTypes(name):
            assert not [r for r in butler.query_datasets(name, collections="*", find_first=False,
                                                         limit=None, explain=False)
                        if r.run == "SimCam/fgcm/broken"]
    assert not any((written.repo / "SimCam" / "fgcm" / "broken").rglob("*.parq"))


def test_conflicting_dataset_type_is_refused(tmp_path: Path) -> None:
    from lsst.daf.butler import DatasetType

    sim = simulate_survey(tmp_path / "sim", n_visits=2, seed=3, sources_per_visit=300,
                          write_refcat=False)
    written = write_survey_repo(sim, tmp_path / "repo")
    repo = open_butler(written.repo, writeable=True)
    repo.butler.registry.registerDatasetType(DatasetType(
        "fgcm_star_ids", ["instrument"], "DataFrame", universe=repo.butler.dimensions))
    state, out = tmp_path / "state", tmp_path / "snap"
    assert main(["backfill", str(sim.out_dir), "--state", str(state), "--no-progress"]) == 0
    assert main(["snapshot", str(out), "--state", str(state)]) == 0
    with pytest.raises(ButlerError, match="'fgcm_star_ids' is registered .* as"):
        ingest_snapshot(repo, out, "SimCam/fgcm/x", "SimCam")
    with pytest.raises(Exception):  # noqa: B017 - MissingCollectionError: nothing registered
        repo.butler.collections.get_info("SimCam/fgcm/x")
