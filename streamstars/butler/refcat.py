"""A reference catalog kept in a Butler repository: ``cal_ref_cat``-style datasets.

LSST repositories hold a reference catalog as one dataset per HTM shard: dataset type
``cal_ref_cat`` (or another name), dimensions {``htm<depth>``} (``htm7`` for LSST's
catalogs), storage class ``SimpleCatalog``; the files are the very ``<htmId>.fits`` shards of
the on-disk format (docs/references.md).  fgcmcal's build-stars declares it as a prerequisite
input over every shard of its collections.  :class:`ButlerRefcat` finds the shards of the
configured collections (first match along the search path) and reads them through their URIs
with the same code as a refcat directory (:class:`streamstars.io.refcat.HtmRefcat`).

There is no ``config.py`` nor ``master_schema.fits`` in a repository: the depth comes from the
dimension, the columns and flag bits from the first shard's header, the format version from
the shards' ``REFCAT_FORMAT_VERSION`` header card (absent = 0, fluxes in Jy: refused).
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lsst import sphgeom

from streamstars.errors import ButlerError, RefcatError
from streamstars.io.refcat import HtmRefcat

from .discover import query_refs, uris_of
from .repo import ButlerRepo, open_butler

if TYPE_CHECKING:
    from lsst.resources import ResourcePath

__all__ = ["REFCAT_STORAGE_CLASSES", "ButlerRefcat", "open_butler_refcat"]

#: Storage classes of reference-catalog shards (afw SimpleCatalog FITS files).
REFCAT_STORAGE_CLASSES: tuple[str, ...] = ("SimpleCatalog",)


class ButlerRefcat(HtmRefcat):
    """The shards of ``dataset_type`` in ``collections`` of ``repo`` (see the module docstring).

    ``path`` is the repository root and ``dataset_name`` says ``<datasetType> in
    <collections>``: both enter the store's ``meta/refcat`` identity, so a store refuses
    another repository, dataset type or collection list until ``refresh-refs``.

    Raises:
        ButlerError: a collection not found, the dataset type not registered or not of an HTM
            dimension.
        RefcatError: no shard in the collections, a shard without a file, format version 0.
    """

    def __init__(self, repo: ButlerRepo, collections: Sequence[str],
                 dataset_type: str = "cal_ref_cat", cache_shards: int = 64) -> None:
        if cache_shards < 0:
            raise ValueError(f"cache_shards must be >= 0, got {cache_shards}")
        self.repo = repo
        self.path = Path(repo.root)
        self.cache_shards = int(cache_shards)
        self._cache = OrderedDict()
        self._downloads: tempfile.TemporaryDirectory[str] | None = None
        names = repo.check_collections(collections)
        registered = repo.dataset_type(dataset_type, storage_classes=REFCAT_STORAGE_CLASSES)
        assert registered is not None
        dims = [d for d in registered.dimensions.required if d.startswith("htm")]
        if len(dims) != 1 or len(registered.dimensions.required) != 1:
            raise ButlerError(
                f"dataset type {dataset_type!r} in {repo.root} has dimensions "
                f"{list(registered.dimensions.required)}; a reference catalog has one HTM "
                "dimension (e.g. htm7)")
        self.dimension = dims[0]
        self.depth = int(self.dimension.removeprefix("htm"))
        self.collections = tuple(names)
        self.dataset_name = f"{dataset_type} in {','.join(names)}"
        refs = query_refs(repo, dataset_type, names)
        if not refs:
            raise RefcatError(
                f"no {dataset_type!r} dataset in collections {names} of {repo.root}; check "
                "fgcmLoadReferenceCatalog.collections")
        uris = uris_of(repo, refs)
        self._uris: dict[int, ResourcePath] = {}
        for ref in refs:
            uri = uris[ref.id]
            if uri is None or not uri.exists():
                raise RefcatError(
                    f"{dataset_type} shard {self.dimension}={ref.dataId[self.dimension]} "
                    f"(run {ref.run!r}, id {ref.id}) has no file in the datastore of "
                    f"{repo.root} ({uri})")
            self._uris[int(ref.dataId[self.dimension])] = uri
        first = self.shard_path(min(self._uris))
        header = self._read_header(first)
        self.columns = tuple(str(header[f"TTYPE{k}"])
                             for k in range(1, int(header.get("TFIELDS", 0)) + 1))
        self.flag_names = self._flag_names(header)
        self.config_format_version = 0  # no config.py in a repository
        self.header_format_version = self._header_version(header)
        self.format_version = self.header_format_version or 0
        self._refuse_version(self.format_version, first)
        self.pixelization = sphgeom.HtmPixelization(self.depth)

    def _check_files(self) -> None:
        """The shards were found through the registry and checked when opened."""

    def existing_shards(self) -> list[int]:
        """Sorted HTM ids of the shards found in the collections."""
        return sorted(self._uris)

    def shard_path(self, shard_id: int) -> Path:
        """A local file of shard ``shard_id`` (remote shards are downloaded once); a path that
        does not exist for a trixel without a dataset (an empty trixel)."""
        uri = self._uris.get(int(shard_id))
        if uri is None:
            return self.path / f".no-{self.dimension}-{int(shard_id)}.fits"
        if uri.isLocal:
            return Path(uri.ospath)
        if self._downloads is None:
            self._downloads = tempfile.TemporaryDirectory(prefix="streamstars-refcat-")
        local = Path(self._downloads.name) / f"{int(shard_id)}.fits"
        if not local.exists():
            from lsst.resources import ResourcePath

            ResourcePath(str(local)).transfer_from(uri, transfer="copy")
        return local

    def __repr__(self) -> str:
        return (f"ButlerRefcat({str(self.path)!r}, name={self.dataset_name!r}, "
                f"depth={self.depth}, format_version={self.format_version})")


def open_butler_refcat(repo: str, collections: Sequence[str],
                       dataset_type: str = "cal_ref_cat") -> ButlerRefcat:
    """Open the repository ``repo`` and its reference catalog (see :class:`ButlerRefcat`)."""
    return ButlerRefcat(open_butler(repo, what="fgcmLoadReferenceCatalog.collections"),
                        collections, dataset_type)
