"""Putting existing files into a Butler repository (the snapshot's outputs, a simulation).

Two things make a plain ``butler.ingest`` of streamstars' files fail, both handled here:

* the Butler's ``ParquetFormatter`` accepts only the ``.parq`` extension when a file is copied
  or linked into the datastore: files are *staged* under a ``.parq`` name first (a hard link
  when the file system allows it, else a copy) in a directory inside the datastore root, then
  moved into the datastore (a rename: no data are copied when the files and the repository
  share a file system);
* FITS datasets of afw storage classes (``Catalog``, ``SimpleCatalog``, ``ExposureCatalog``)
  are recorded with the formatter real repositories use,
  ``lsst.obs.base.formatters.fitsGeneric.FitsGenericFormatter``, which must be importable at
  ingest time; obs_base is not on PyPI, so when it is absent a stand-in class of that name
  (:func:`fits_formatter_available`) exists in ``sys.modules`` for the duration of the ingest
  only.  Reading such a dataset with ``butler.get`` needs the real obs_base + afw, as in any
  LSST repository; streamstars reads the file through its URI.

All the datasets of one :func:`ingest_files` call are ingested in ONE registry transaction:
either all of them are visible, or none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .repo import ButlerRepo, require_butler

if TYPE_CHECKING:
    from lsst.daf.butler import DatasetRef

__all__ = [
    "AFW_FITS_STORAGE_CLASSES",
    "FITS_FORMATTER",
    "PARQUET_FORMATTER",
    "FileToIngest",
    "fits_formatter_available",
    "ingest_files",
]

#: The formatter real repositories record for afw FITS catalogs (obs_base).
FITS_FORMATTER = "lsst.obs.base.formatters.fitsGeneric.FitsGenericFormatter"
#: The formatter of every Arrow/DataFrame storage class (daf_butler).
PARQUET_FORMATTER = "lsst.daf.butler.formatters.parquet.ParquetFormatter"
_PARQUET_EXTENSION = ".parq"
_STAND_IN_MODULES = ("lsst.obs", "lsst.obs.base", "lsst.obs.base.formatters",
                     "lsst.obs.base.formatters.fitsGeneric")


@dataclass(frozen=True)
class FileToIngest:
    """One file and the dataset it becomes (``ref`` carries type, data ID and RUN)."""

    path: Path
    ref: DatasetRef


def _stand_in_formatter() -> type:
    daf_butler = require_butler()

    class FitsGenericFormatter(daf_butler.FormatterV2):  # type: ignore[misc, name-defined]
        """Stand-in of obs_base's formatter, present only while files are ingested: it lets
        the datastore record the real formatter name; it cannot read or write."""

        default_extension = ".fits"
        supported_extensions = frozenset({".fits", ".fits.gz", ".fits.fz", ".fz", ".fit"})

    # the datastore records module + qualified name: make them obs_base's
    FitsGenericFormatter.__module__ = _STAND_IN_MODULES[-1]
    FitsGenericFormatter.__qualname__ = "FitsGenericFormatter"
    return FitsGenericFormatter


@contextlib.contextmanager
def fits_formatter_available() -> Iterator[None]:
    """Make :data:`FITS_FORMATTER` importable for the duration of the block.

    Nothing is done when obs_base is installed.  Otherwise stand-in modules are put in
    ``sys.modules`` and removed afterwards (also on errors), so nothing else ever sees them.
    """
    try:
        __import__(_STAND_IN_MODULES[-1])
    except ImportError:
        pass
    else:
        yield
        return
    import lsst

    formatter = _stand_in_formatter()
    added: list[str] = []
    try:
        for name in _STAND_IN_MODULES:
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        sys.modules[_STAND_IN_MODULES[-1]].FitsGenericFormatter = formatter  # type: ignore
        lsst.obs = sys.modules["lsst.obs"]  # type: ignore[attr-defined]
        sys.modules["lsst.obs"].base = sys.modules["lsst.obs.base"]  # type: ignore
        sys.modules["lsst.obs.base"].formatters = sys.modules[  # type: ignore[attr-defined]
            "lsst.obs.base.formatters"]
        sys.modules["lsst.obs.base.formatters"].fitsGeneric = sys.modules[  # type: ignore
            _STAND_IN_MODULES[-1]]
        yield
    finally:
        for name in reversed(added):
            sys.modules.pop(name, None)
        if "lsst.obs" in added and hasattr(lsst, "obs"):
            delattr(lsst, "obs")


def _stage(path: Path, staging: Path, index: int) -> Path:
    """``path`` under a name the dataset's formatter accepts, inside ``staging``: a hard link
    when both are on one file system, else a copy (the original is never moved)."""
    name = path.name
    if name.endswith(".parquet"):
        name = name.removesuffix(".parquet") + _PARQUET_EXTENSION
    target = staging / f"{index:06d}-{name}"
    try:
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
    return target


def _staging_parent(repo: ButlerRepo) -> Path | None:
    """The local datastore root (same file system as the datastore: moves are renames)."""
    try:
        roots = repo.butler.get_datastore_roots()
    except Exception:  # noqa: BLE001 - a datastore without a root: stage in a temp dir
        return None
    for uri in roots.values():
        if uri is not None and uri.isLocal and Path(uri.ospath).is_dir():
            return Path(uri.ospath)
    return None


def ingest_files(repo: ButlerRepo, files: Sequence[FileToIngest], *,
                 register_runs: bool = True) -> list[DatasetRef]:
    """Ingest ``files`` into the datastore in one registry transaction.

    Each file is staged (hard link or copy, under a name its formatter accepts) and the staged
    file is moved into the datastore, so the originals stay where they are and untouched, and
    no data are copied twice.  The RUN collections of the refs are registered first when
    ``register_runs``, inside the same transaction: a failed ingest leaves no RUN behind.

    Returns:
        The refs ingested.

    Raises:
        lsst.daf.butler errors (e.g. ``ConflictingDefinitionError`` for a dataset already in
        its RUN), ``OSError``: nothing is ingested then.
    """
    daf_butler = require_butler("ingesting into a Butler repository")
    butler = repo.butler
    parent = _staging_parent(repo)
    staging = Path(tempfile.mkdtemp(prefix=".streamstars-staging-",
                                    dir=None if parent is None else str(parent)))
    try:
        datasets: list[Any] = []
        for index, item in enumerate(files):
            formatter = FITS_FORMATTER \
                if item.ref.datasetType.storageClass_name in AFW_FITS_STORAGE_CLASSES else None
            datasets.append(daf_butler.FileDataset(
                path=str(_stage(Path(item.path), staging, index)), refs=[item.ref],
                formatter=formatter))
        with fits_formatter_available(), butler.transaction():
            if register_runs:
                for run in sorted({str(item.ref.run) for item in files}):
                    butler.registry.registerRun(run)
            butler.ingest(*datasets, transfer="move")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [item.ref for item in files]


#: afw storage classes stored as FITS (their formatter is obs_base's).
AFW_FITS_STORAGE_CLASSES = frozenset({"Catalog", "SimpleCatalog", "SourceCatalog",
                                      "ExposureCatalog"})
