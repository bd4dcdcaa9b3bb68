"""Reading Butler datasets through their URIs: one visit, from a backfill or an event.

A dataset's file is read where the datastore keeps it: a local datastore's file directly
(``ResourcePath.ospath``), a remote one's (S3, GCS, WebDAV ... through ``lsst-resources``)
downloaded to a temporary file for the time of the read (``ResourcePath.as_local``).  Source
tables are then read by :func:`streamstars.io.sourcetable.read_source_tables` with parquet
column projection (pyarrow; neither pandas nor afw is needed, whatever the storage class),
visitSummaries by :func:`streamstars.io.visitmeta.read_visit_summary` (astropy).

A dataset whose file is not in the datastore raises
:class:`~streamstars.errors.DatasetFileMissingError` naming the visit, the dataset (type, data
ID, run, UUID), the collections searched and the URI.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamstars.config import BuildStarsConfig
from streamstars.errors import DatasetFileMissingError, MissingMetadataError
from streamstars.events import MalformedEventError, VisitEvent
from streamstars.ingest import PreparedVisit, VisitInput, prepare_visit
from streamstars.io.visitmeta import RUBIN_LONGITUDE_DEG, read_visit_summary, read_visit_tables
from streamstars.visit import VisitMetadata

from .discover import (
    CCD_VISIT_TABLE,
    SOURCE_TABLE,
    VISIT_SUMMARY,
    VISIT_TABLE,
    ButlerVisit,
    uris_of,
)
from .repo import ButlerRepo, dataset_summary, require_butler

if TYPE_CHECKING:
    from lsst.daf.butler import DatasetRef
    from lsst.resources import ResourcePath

    from streamstars.io.discover import DiscoveredVisit

__all__ = ["EventResolver", "event_dataset_ids", "local_file", "prepare_butler_visit",
           "prepare_datasets"]


@contextmanager
def local_file(uri: ResourcePath) -> Iterator[Path]:
    """A local path holding the file at ``uri`` for the duration of the block.

    Local datastores: the file itself.  Remote ones: a temporary download, removed afterwards.
    """
    if uri.isLocal:
        yield Path(uri.ospath)
        return
    with uri.as_local() as local:
        yield Path(local.ospath)


def _require_file(visit: int, ref: DatasetRef, uri: ResourcePath | None,
                  collections: Sequence[str]) -> ResourcePath:
    where = f" (found in collections {list(collections)})" if collections else ""
    if uri is None:
        raise DatasetFileMissingError(
            f"visit {visit}: {dataset_summary(ref)}{where} has no file in the datastore; "
            "re-ingest it or re-run the step that writes it")
    if not uri.exists():
        raise DatasetFileMissingError(
            f"visit {visit}: {dataset_summary(ref)}{where} is registered but its file {uri} "
            "is missing from the datastore; restore the file, or re-ingest the dataset")
    return uri


def prepare_datasets(visit: ButlerVisit, config: BuildStarsConfig) -> PreparedVisit:
    """Read and select one visit from its datasets (no store access: thread-safe).

    The visit's metadata is ``visit.metadata`` when already known (visitTable row), else its
    visitSummary, read through its URI.

    Raises:
        MissingMetadataError: the visit has no metadata dataset.
        DatasetFileMissingError: a dataset's file is not in the datastore.
        InputFileError, InvalidSourceTableError: unreadable or invalid files.
    """
    metadata = visit.metadata
    if metadata is None:
        if visit.summary_ref is None:
            raise MissingMetadataError(visit.metadata_error
                                       or f"visit {visit.visit}: no {VISIT_SUMMARY} dataset")
        uri = _require_file(visit.visit, visit.summary_ref, visit.summary_uri,
                            visit.collections)
        with local_file(uri) as path:
            metadata = read_visit_summary(path, reference_ccd=config.referenceCCD)
    if not visit.source_refs:
        raise MissingMetadataError(f"visit {visit.visit}: no {SOURCE_TABLE} dataset")
    uris = [_require_file(visit.visit, ref, visit.source_uris[i] if i < len(visit.source_uris)
                          else None, visit.collections)
            for i, ref in enumerate(visit.source_refs)]
    with ExitStack() as stack:
        paths = [stack.enter_context(local_file(uri)) for uri in uris]
        prepared = prepare_visit(VisitInput(visit.visit, paths, metadata, visit.dataset_ids),
                                 config)
    if not all(uri.isLocal for uri in uris):
        # the downloads are gone: record where the data live, not the temporary copies
        prepared.source_paths = [str(uri) for uri in uris]
        prepared.files = []
    return prepared


def prepare_butler_visit(config: BuildStarsConfig, visit: DiscoveredVisit) -> PreparedVisit:
    """The backfill's ``prepare`` step for a visit of a Butler inventory (module-level: the
    parallel backfill's worker processes call it)."""
    if not isinstance(visit, ButlerVisit):
        raise TypeError(f"visit {visit.visit} does not come from a Butler inventory")
    return prepare_datasets(visit, config)


def event_dataset_ids(event: VisitEvent) -> list[str]:
    """The UUIDs a visit applied from ``event`` records (as a backfill records them: its
    source tables and visitSummary; a shared visitTable is not one of them)."""
    datasets = event.butler_datasets or {}
    return sorted([*datasets.get(SOURCE_TABLE, ()), *datasets.get(VISIT_SUMMARY, ())])


class EventResolver:
    """Resolves the ``butler`` datasets of visit events (schema version 2) in one repository.

    Butler calls are serialised by a lock (the consumer reads ahead in a thread); reading the
    files is not.
    """

    def __init__(self, repo: ButlerRepo,
                 site_longitude_deg: float = RUBIN_LONGITUDE_DEG) -> None:
        self.repo = repo
        self.site_longitude_deg = site_longitude_deg
        self._lock = threading.Lock()

    def visit_of(self, event: VisitEvent) -> ButlerVisit:
        """The event's datasets, found by UUID and checked against the event.

        Raises:
            MalformedEventError: a dataset of another type, instrument or visit.
            DatasetFileMissingError: a UUID the registry does not know (yet), or a dataset
                without a file (transient: the consumer retries, then dead-letters).
            MissingMetadataError: the visitTable has no row for the visit.
        """
        require_butler("a Butler visit event")
        datasets = event.butler_datasets or {}
        refs: dict[str, list[DatasetRef]] = {}
        with self._lock:
            for dataset_type, ids in datasets.items():
                refs[dataset_type] = [self._ref(event, dataset_type, text) for text in ids]
            uris = uris_of(self.repo, [r for group in refs.values() for r in group])
        entry = ButlerVisit(visit=event.visit, instrument=event.instrument,
                            collections=event.butler_collections)
        entry.source_refs = refs[SOURCE_TABLE]
        entry.source_uris = [_require_file(event.visit, r, uris[r.id], entry.collections)
                             for r in entry.source_refs]
        entry.dataset_ids = sorted(str(r.id) for group in refs.values() for r in group
                                   if r.datasetType.name in (SOURCE_TABLE, VISIT_SUMMARY))
        if VISIT_SUMMARY in refs:
            entry.summary_ref = refs[VISIT_SUMMARY][0]
            entry.summary_uri = uris[entry.summary_ref.id]
        else:
            entry.metadata = self._table_metadata(event, refs, uris, entry.collections)
        return entry

    def _ref(self, event: VisitEvent, dataset_type: str, text: str) -> DatasetRef:
        import uuid

        ref: DatasetRef | None = self.repo.butler.get_dataset(uuid.UUID(text))
        if ref is None:  # the caches of a long-lived Butler may predate the dataset
            self.repo.butler.registry.refresh()
            ref = self.repo.butler.get_dataset(uuid.UUID(text))
        if ref is None:
            raise DatasetFileMissingError(
                f"visit {event.visit}: {dataset_type} dataset {text} is not in the registry of "
                f"{self.repo.root} (not yet visible, or removed, or another repository)")
        if ref.datasetType.name != dataset_type:
            raise MalformedEventError(
                f"visit {event.visit}: dataset {text} is a {ref.datasetType.name}, not a "
                f"{dataset_type}")
        data_id = ref.dataId.required
        if str(data_id.get("instrument")) != event.instrument or (
                "visit" in data_id and int(data_id["visit"]) != event.visit):
            raise MalformedEventError(
                f"visit {event.visit}: {dataset_summary(ref)} is not of instrument "
                f"{event.instrument!r} visit {event.visit}")
        return ref

    def _table_metadata(self, event: VisitEvent, refs: dict[str, list[DatasetRef]],
                        uris: dict[Any, ResourcePath | None],
                        collections: Sequence[str]) -> VisitMetadata:
        vt = refs[VISIT_TABLE][0]
        vt_uri = _require_file(event.visit, vt, uris[vt.id], collections)
        ccd = refs.get(CCD_VISIT_TABLE, [None])[0]
        with ExitStack() as stack:
            vt_path = stack.enter_context(local_file(vt_uri))
            ccd_path = None
            if ccd is not None:
                ccd_uri = _require_file(event.visit, ccd, uris[ccd.id], collections)
                ccd_path = stack.enter_context(local_file(ccd_uri))
            table = read_visit_tables(vt_path, ccd_path, self.site_longitude_deg)
        if event.visit not in table:
            raise MissingMetadataError(
                f"visit {event.visit}: {dataset_summary(vt)} has no row for the visit")
        return table[event.visit]

    def prepare(self, event: VisitEvent, config: BuildStarsConfig) -> PreparedVisit:
        """Resolve, read and select the event's visit; checks its band and physical filter.

        Raises:
            MalformedEventError: the metadata disagree with the event's band/physical_filter.
            and everything :meth:`visit_of` and :func:`prepare_datasets` raise.
        """
        prepared = prepare_datasets(self.visit_of(event), config)
        meta = prepared.metadata
        if meta.physical_filter != event.physical_filter or meta.band != event.band:
            raise MalformedEventError(
                f"visit {event.visit}: event says band {event.band!r} / physical_filter "
                f"{event.physical_filter!r} but its metadata says {meta.band!r} / "
                f"{meta.physical_filter!r}")
        return prepared
