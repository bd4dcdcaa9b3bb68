"""Ingesting a snapshot as the datasets fgcmcal's fit cycle reads.

``FgcmFitCycleTask`` (``useParquetCatalogFormat``, the default) reads, with dimensions
{instrument}:

============================  ===============  ========================================
dataset type                  storage class    snapshot file
============================  ===============  ========================================
``fgcm_star_observations``    ``ArrowAstropy`` ``fgcm_star_observations.parquet``
``fgcm_star_ids``             ``ArrowAstropy`` ``fgcm_star_ids.parquet``
``fgcm_reference_stars``      ``ArrowAstropy`` ``fgcm_reference_stars.parquet`` (with a refcat)
``fgcmVisitCatalog``          ``Catalog``      ``fgcmVisitCatalog.fits`` (afw FITS)
============================  ===============  ========================================

recorded with the formatters real repositories use (daf_butler's ``ParquetFormatter``, obs_base's
``FitsGenericFormatter``; :mod:`streamstars.butler.ingest`).  The camera and the look-up table
(``fgcmLookUpTable``) are the instrument's and fgcmMakeLut's, not streamstars'.

The RUN rule: every snapshot goes into a **new** RUN (an existing RUN is refused, whatever it
holds), all datasets in ONE registry transaction -- a reader sees all of them or none.  With
``chain``, the RUN is also put in front of that CHAINED collection (created if needed) in the
same transaction, so a fixed name always resolves to the latest snapshot while every earlier
one stays readable in its own RUN.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamstars.errors import ButlerError
from streamstars.io.snapshot_directory import file_sha256
from streamstars.io.snapshot_files import FITS_FILES, MANIFEST_NAME, PARQUET_FILES

from .ingest import FileToIngest, ingest_files
from .repo import ButlerRepo, require_butler

if TYPE_CHECKING:
    from lsst.daf.butler import DatasetRef

__all__ = ["OUTPUT_DATASETS", "IngestedSnapshot", "check_output_run", "choose_instrument",
           "ingest_snapshot"]

#: dataset type -> (snapshot file, storage class, required); dimensions are {instrument}.
OUTPUT_DATASETS: dict[str, tuple[str, str, bool]] = {
    "fgcm_star_observations": (PARQUET_FILES["observations"], "ArrowAstropy", True),
    "fgcm_star_ids": (PARQUET_FILES["stars"], "ArrowAstropy", True),
    "fgcm_reference_stars": (PARQUET_FILES["reference"], "ArrowAstropy", False),
    "fgcmVisitCatalog": (FITS_FILES["visits"], "Catalog", True),
}
_DIMENSIONS = ("instrument",)


@dataclass(frozen=True)
class IngestedSnapshot:
    """What :func:`ingest_snapshot` put into the repository."""

    run: str
    chain: str | None
    instrument: str
    refs: list[DatasetRef]


def choose_instrument(repo: ButlerRepo, instrument: str | None) -> str:
    """``instrument``, checked against the repository, or its only instrument.

    Raises:
        ButlerError: unknown instrument, or none given while the repository has several (or
            none).
    """
    records = repo.butler.query_dimension_records("instrument", limit=None, explain=False)
    names = sorted(str(r.name) for r in records)
    if instrument:
        if instrument not in names:
            raise ButlerError(f"instrument {instrument!r} is not in Butler repository "
                              f"{repo.root} (it has {names})")
        return instrument
    if len(names) != 1:
        raise ButlerError(f"Butler repository {repo.root} has instruments {names}; choose the "
                          "one the outputs belong to with --instrument")
    return names[0]


def check_output_run(repo: ButlerRepo, run: str, chain: str | None = None) -> None:
    """Refuse an existing RUN (every snapshot goes into a new one) and a ``chain`` that
    exists but is not a CHAINED collection.

    Raises:
        ButlerError: naming the collection and what to do.
    """
    daf_butler = require_butler()
    try:
        repo.butler.collections.get_info(run)
    except daf_butler.MissingCollectionError:
        pass
    else:
        raise ButlerError(
            f"collection {run!r} already exists in Butler repository {repo.root}; each "
            "snapshot goes into a new RUN: give a new --output-run (e.g. with a date, "
            f"{run}/20250602T0300), and --output-chain to keep a fixed name for the latest")
    if chain:
        try:
            info = repo.butler.collections.get_info(chain)
        except daf_butler.MissingCollectionError:
            return
        if info.type != daf_butler.CollectionType.CHAINED:
            raise ButlerError(f"--output-chain {chain!r} is a {info.type.name} collection in "
                              f"{repo.root}, not a CHAINED one")


def _dataset_types(repo: ButlerRepo, names: list[str]) -> dict[str, Any]:
    """Register the output dataset types (or check the registered ones agree)."""
    daf_butler = require_butler()
    out: dict[str, Any] = {}
    for name in names:
        storage_class = OUTPUT_DATASETS[name][1]
        wanted = daf_butler.DatasetType(name, list(_DIMENSIONS), storage_class,
                                        universe=repo.butler.dimensions)
        existing = repo.dataset_type(name, required=False)
        if existing is None:
            repo.butler.registry.registerDatasetType(wanted)
        elif existing != wanted:
            raise ButlerError(
                f"dataset type {name!r} is registered in {repo.root} as {existing}, but "
                f"fgcmcal (and streamstars) use {wanted}; nothing was ingested")
        out[name] = wanted
    return out


def _freeze(snapshot_dir: Path, names: list[str], staging: Path) -> dict[str, Path]:
    """Hard links (or copies) of the snapshot's files, checked against its manifest: a
    snapshot written again into the same directory meanwhile cannot mix into the ingest."""
    manifest = json.loads((snapshot_dir / MANIFEST_NAME).read_text())
    frozen: dict[str, Path] = {}
    for name in names:
        fname = OUTPUT_DATASETS[name][0]
        target = staging / fname
        try:
            os.link(snapshot_dir / fname, target)
        except OSError:
            shutil.copyfile(snapshot_dir / fname, target)
        expected = manifest["files"][fname].get("sha256")
        if expected is not None and file_sha256(target) != expected:
            raise ButlerError(f"{snapshot_dir} was replaced by another snapshot while being "
                              "ingested; run the command again")
        frozen[name] = target
    return frozen


def ingest_snapshot(repo: ButlerRepo, snapshot_dir: str | Path, run: str, instrument: str,
                    *, chain: str | None = None) -> IngestedSnapshot:
    """Ingest the snapshot in ``snapshot_dir`` into the new RUN ``run`` (see module docstring).

    Raises:
        ButlerError: ``run`` exists, ``chain`` is not CHAINED, a dataset type is registered
            with another definition, a required file is missing (the snapshot was written
            without the FITS or parquet format), or the directory changed meanwhile.
    """
    daf_butler = require_butler("streamstars snapshot --butler")
    snapshot_dir = Path(snapshot_dir)
    check_output_run(repo, run, chain)
    names = [name for name, (fname, _, required) in OUTPUT_DATASETS.items()
             if required or (snapshot_dir / fname).is_file()]
    missing = [OUTPUT_DATASETS[n][0] for n in names if not (snapshot_dir / OUTPUT_DATASETS[n][0])
               .is_file()]
    if missing:
        raise ButlerError(f"{snapshot_dir} has no {', '.join(missing)}: fgcmcal reads "
                          "fgcmVisitCatalog.fits and the parquet catalogs; write the snapshot "
                          "with --format fits,parquet")
    dataset_types = _dataset_types(repo, names)
    with tempfile.TemporaryDirectory(prefix=".streamstars-snapshot-",
                                     dir=str(snapshot_dir.parent)) as tmp:
        frozen = _freeze(snapshot_dir, names, Path(tmp))
        files = [FileToIngest(frozen[name], daf_butler.DatasetRef(
                     dataset_types[name], {"instrument": instrument}, run=run))
                 for name in names]
        with repo.butler.transaction():
            refs = ingest_files(repo, files)
            if chain:
                _prepend(repo, chain, run)
    return IngestedSnapshot(run, chain, instrument, refs)


def _prepend(repo: ButlerRepo, chain: str, run: str) -> None:
    daf_butler = require_butler()
    try:
        repo.butler.collections.get_info(chain)
    except daf_butler.MissingCollectionError:
        repo.butler.registry.registerCollection(chain, daf_butler.CollectionType.CHAINED)
    repo.butler.collections.prepend_chain(chain, run)
