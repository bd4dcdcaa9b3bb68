"""Writing a simulated survey (:func:`streamstars.simulate.simulate_survey`) as a Butler
repository, the way LSST pipelines leave one:

* dimension records: the ``instrument`` (``SimCam`` by default), its ``physical_filter``
  records (with their band), one ``day_obs`` per night and one ``visit`` per visit (exposure
  time, zenith angle, azimuth, timespan), inserted parent first;
* dataset types: ``sourceTable_visit`` {instrument, visit} (storage class ``ArrowAstropy``, or
  ``DataFrame`` for the older pipelines' files), ``visitTable`` and ``ccdVisitTable``
  {instrument} (``ArrowAstropy``) and, with a reference catalog, ``cal_ref_cat`` {htm7}
  (``SimpleCatalog``, one dataset per shard);
* collections: the data in the RUN ``<instrument>/sim/run``, the reference catalog in the RUN
  ``refcats/sim``, both in the CHAINED collection ``<instrument>/sim`` -- the name to give to
  ``--collections``.

The files are moved into the datastore from hard links (or copies) of the simulated files:
the simulation directory stays as it is, and a directory backfill of it reads the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from streamstars.errors import ButlerError
from streamstars.simulate import SimulatedSurvey

from .discover import CCD_VISIT_TABLE, SOURCE_TABLE, VISIT_TABLE
from .ingest import FileToIngest, ingest_files
from .repo import ButlerRepo, open_butler, require_butler

if TYPE_CHECKING:
    from lsst.daf.butler import DatasetType

__all__ = [
    "DEFAULT_INSTRUMENT",
    "REFCAT_DATASET_TYPE",
    "ButlerSurvey",
    "create_repo",
    "ingest_survey",
    "insert_visits",
    "register_dataset_type",
    "write_survey_repo",
]

DEFAULT_INSTRUMENT = "SimCam"
#: The reference catalog's dataset type, as in LSST repositories.
REFCAT_DATASET_TYPE = "cal_ref_cat"
_DATA_SEQ = 100000  # visit = day_obs * 100000 + seq_num (LSSTCam-like ids)


@dataclass(frozen=True)
class ButlerSurvey:
    """What :func:`write_survey_repo` wrote.

    Attributes:
        repo: the repository root.
        instrument: the instrument name.
        run: the RUN holding the source tables and visit tables.
        refcat_run: the RUN holding ``cal_ref_cat`` (None without a reference catalog).
        collection: the CHAINED collection to search (``--collections``).
        source_storage_class: ``ArrowAstropy`` or ``DataFrame``.
        n_datasets: datasets ingested.
    """

    repo: Path
    instrument: str
    run: str
    refcat_run: str | None
    collection: str
    source_storage_class: str
    n_datasets: int


def create_repo(root: str | Path) -> ButlerRepo:
    """A new, empty repository (sqlite registry, file datastore) at ``root``.

    Raises:
        ButlerError: the extra is missing, or ``root`` already holds a repository.
    """
    daf_butler = require_butler("writing a Butler repository")
    root = Path(root)
    if (root / "butler.yaml").exists():
        raise ButlerError(f"{root} already holds a Butler repository; give a new directory")
    daf_butler.Butler.makeRepo(str(root))
    return open_butler(root, writeable=True)


def register_dataset_type(repo: ButlerRepo, name: str, dimensions: Sequence[str],
                          storage_class: str) -> DatasetType:
    """Register (or find identical) dataset type ``name``.

    Raises:
        ButlerError: it exists with other dimensions or another storage class.
    """
    daf_butler = require_butler()
    dataset_type = daf_butler.DatasetType(name, list(dimensions), storage_class,
                                          universe=repo.butler.dimensions)
    try:
        repo.butler.registry.registerDatasetType(dataset_type)
    except daf_butler.ConflictingDefinitionError as exc:
        raise ButlerError(f"dataset type {name!r} is registered in {repo.root} with another "
                          f"definition than {dataset_type}: {exc}") from exc
    return dataset_type


def insert_visits(repo: ButlerRepo, instrument: str, visit_table: Path) -> int:
    """Insert the dimension records of ``visit_table``'s visits (parent records first).

    The visitTable gives visit id, physical filter, band, exposure midpoint (MJD TAI) and time,
    azimuth and altitude.  Existing records are kept (``skip_existing``).  Returns the number
    of visits.
    """
    daf_butler = require_butler()
    from astropy.time import Time

    table = pq.read_table(visit_table, columns=["visit", "physical_filter", "band",
                                                "expMidptMJD", "expTime", "azimuth",
                                                "altitude"]).to_pydict()
    registry = repo.butler.registry
    visits = np.asarray(table["visit"], dtype=np.int64)
    registry.insertDimensionData(
        "instrument", {"name": instrument, "visit_max": 10**14, "exposure_max": 10**14,
                       "detector_max": 1000, "visit_system": 0,
                       "class_name": "streamstars.simulate.SimCam"}, skip_existing=True)
    filters = dict(zip(table["physical_filter"], table["band"], strict=True))
    registry.insertDimensionData(
        "physical_filter",
        *[{"instrument": instrument, "name": pf, "band": band} for pf, band in sorted(
            filters.items())], skip_existing=True)
    nights = sorted({int(v) // _DATA_SEQ for v in visits})
    registry.insertDimensionData(
        "day_obs", *[{"instrument": instrument, "id": night} for night in nights],
        skip_existing=True)
    records: list[dict[str, Any]] = []
    for i, visit in enumerate(visits.tolist()):
        mid, half = table["expMidptMJD"][i], table["expTime"][i] / 2.0 / 86400.0
        records.append({
            "instrument": instrument, "id": visit, "name": str(visit),
            "physical_filter": table["physical_filter"][i], "day_obs": visit // _DATA_SEQ,
            "seq_num": visit % _DATA_SEQ, "exposure_time": table["expTime"][i],
            "azimuth": table["azimuth"][i], "zenith_angle": 90.0 - table["altitude"][i],
            "timespan": daf_butler.Timespan(Time(mid - half, format="mjd", scale="tai"),
                                            Time(mid + half, format="mjd", scale="tai")),
        })
    registry.insertDimensionData("visit", *records, skip_existing=True)
    return len(records)


def ingest_survey(repo: ButlerRepo, survey: SimulatedSurvey, run: str, *,
                  instrument: str = DEFAULT_INSTRUMENT, source_storage_class: str = "ArrowAstropy",
                  visits: Iterable[int] | None = None, source_paths: Sequence[Path] | None = None,
                  with_visit_tables: bool = True) -> list[Any]:
    """Ingest the survey's source tables (and visit tables) into ``run``, in one transaction.

    Args:
        repo: a writeable repository holding the survey's dimension records.
        survey: the simulated survey.
        run: the RUN to create and fill.
        instrument: the instrument name.
        source_storage_class: the storage class of ``sourceTable_visit``.
        visits: only these visits (default: all).
        source_paths: other files for these visits (e.g. re-processed ones), in the order of
            ``visits``.
        with_visit_tables: also ingest ``visitTable`` and ``ccdVisitTable``.

    Returns:
        The refs ingested.
    """
    daf_butler = require_butler()
    source_type = register_dataset_type(repo, SOURCE_TABLE, ["instrument", "visit"],
                                        source_storage_class)
    chosen = list(survey.visits if visits is None else visits)
    paths = list(source_paths) if source_paths is not None else [
        survey.source_paths[survey.visits.index(v)] for v in chosen]
    files = [FileToIngest(Path(path), daf_butler.DatasetRef(
                 source_type, {"instrument": instrument, "visit": int(visit)}, run=run))
             for visit, path in zip(chosen, paths, strict=True)]
    if with_visit_tables:
        for name, path in ((VISIT_TABLE, survey.visit_table_path),
                           (CCD_VISIT_TABLE, survey.ccd_visit_table_path)):
            dataset_type = register_dataset_type(repo, name, ["instrument"], "ArrowAstropy")
            files.append(FileToIngest(Path(path), daf_butler.DatasetRef(
                dataset_type, {"instrument": instrument}, run=run)))
    return ingest_files(repo, files)


def _ingest_refcat(repo: ButlerRepo, refcat_dir: Path, run: str) -> int:
    """One ``cal_ref_cat`` dataset per HTM shard file ({htm<depth>} data ID)."""
    daf_butler = require_butler()
    from streamstars.io.refcat import HtmRefcat

    refcat = HtmRefcat(refcat_dir)
    dimension = f"htm{refcat.depth}"
    dataset_type = register_dataset_type(repo, REFCAT_DATASET_TYPE, [dimension],
                                         "SimpleCatalog")
    files = [FileToIngest(refcat.shard_path(shard), daf_butler.DatasetRef(
                 dataset_type, {dimension: shard}, run=run))
             for shard in refcat.existing_shards()]
    ingest_files(repo, files)
    return len(files)


def write_survey_repo(survey: SimulatedSurvey, root: str | Path, *,
                      instrument: str = DEFAULT_INSTRUMENT,
                      source_storage_class: str = "ArrowAstropy") -> ButlerSurvey:
    """Create a repository at ``root`` holding ``survey`` (see the module docstring).

    Raises:
        ButlerError: the extra is missing, ``root`` already holds a repository.
    """
    daf_butler = require_butler("streamstars simulate --butler")
    repo = create_repo(root)
    insert_visits(repo, instrument, survey.visit_table_path)
    run = f"{instrument}/sim/run"
    refs = ingest_survey(repo, survey, run, instrument=instrument,
                         source_storage_class=source_storage_class)
    chain = [run]
    refcat_run = None
    n_refcat = 0
    if survey.refcat_path is not None:
        refcat_run = "refcats/sim"
        n_refcat = _ingest_refcat(repo, survey.refcat_path, refcat_run)
        chain.append(refcat_run)
    collection = f"{instrument}/sim"
    repo.butler.collections.register(collection, daf_butler.CollectionType.CHAINED)
    repo.butler.collections.redefine_chain(collection, chain)
    return ButlerSurvey(Path(root), instrument, run, refcat_run, collection,
                        source_storage_class, len(refs) + n_refcat)
