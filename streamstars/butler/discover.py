"""The datasets of each visit in a Butler collection search path.

A visit's source table is its ``sourceTable_visit`` dataset (dimensions {instrument, visit},
storage class ``ArrowAstropy`` or ``DataFrame``) and its metadata its ``visitSummary``
({instrument, visit}) or, failing that, its row of the ``visitTable`` + ``ccdVisitTable``
pair ({instrument}).  Each is *found* the way the Butler defines it: the first collection of
the search path (chains flattened in order) holding a dataset with that data ID wins
(``find_first``), so a visit re-processed into a newer RUN that is chained in front of the old
one is read from the new RUN only -- unlike a scan of the datastore's directories, which finds
both files.

Nothing is read here except the (per-instrument) visitTable/ccdVisitTable: source tables and
visitSummaries are read through their URIs when the visit is prepared
(:mod:`streamstars.butler.read`), in the backfill's prefetch threads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamstars.errors import ButlerError, StreamstarsError
from streamstars.io.discover import DiscoveredVisit, RepoInventory
from streamstars.io.visitmeta import RUBIN_LONGITUDE_DEG, read_visit_tables

from .repo import ButlerRepo, dataset_summary, require_butler

if TYPE_CHECKING:
    from lsst.daf.butler import DatasetRef
    from lsst.resources import ResourcePath

__all__ = [
    "CCD_VISIT_TABLE",
    "SOURCE_STORAGE_CLASSES",
    "SOURCE_TABLE",
    "VISIT_SUMMARY",
    "VISIT_TABLE",
    "ButlerInventory",
    "ButlerVisit",
    "butler_inventory",
    "query_refs",
    "uris_of",
]

log = logging.getLogger(__name__)

SOURCE_TABLE = "sourceTable_visit"
VISIT_SUMMARY = "visitSummary"
VISIT_TABLE = "visitTable"
CCD_VISIT_TABLE = "ccdVisitTable"
#: Storage classes of ``sourceTable_visit`` that are parquet files (read with pyarrow):
#: ``ArrowAstropy`` (current pipelines), ``DataFrame`` (older ones), and the other Arrow views.
SOURCE_STORAGE_CLASSES: tuple[str, ...] = ("ArrowAstropy", "DataFrame", "ArrowTable",
                                           "ArrowNumpy", "ArrowNumpyDict")


@dataclass
class ButlerVisit(DiscoveredVisit):
    """One visit's datasets (see :class:`~streamstars.io.discover.DiscoveredVisit`).

    ``source_paths`` holds the local paths of the source tables when the datastore is local
    (empty for a remote one: they are downloaded when the visit is read).

    Attributes:
        instrument: the instrument of the data ID.
        source_refs: the ``sourceTable_visit`` dataset (a list for symmetry with directories).
        source_uris: where the datastore keeps each of them.
        summary_ref, summary_uri: the visit's ``visitSummary`` dataset, if any.
        collections: the search path the datasets were found in (for messages).
    """

    instrument: str = ""
    source_refs: list[DatasetRef] = field(default_factory=list)
    source_uris: list[ResourcePath] = field(default_factory=list)
    summary_ref: DatasetRef | None = None
    summary_uri: ResourcePath | None = None
    collections: tuple[str, ...] = ()


@dataclass
class ButlerInventory(RepoInventory):
    """What :func:`butler_inventory` found: the visits (:class:`ButlerVisit`) in visit order.

    Attributes:
        repo: the repository.
        collections: the search path given.
        instrument: the instrument of every visit.
        source_storage_class: the storage class ``sourceTable_visit`` is registered with.
        metadata_dataset_types: the metadata dataset types used (``visitSummary`` and/or
            ``visitTable`` + ``ccdVisitTable``).
    """

    repo: ButlerRepo | None = None
    collections: list[str] = field(default_factory=list)
    instrument: str = ""
    source_storage_class: str = ""
    metadata_dataset_types: list[str] = field(default_factory=list)


def query_refs(repo: ButlerRepo, dataset_type: str, collections: Sequence[str], *,
               instrument: str | None = None, where: str = "",
               bind: Mapping[str, Any] | None = None) -> list[DatasetRef]:
    """Every dataset of ``dataset_type`` found first along ``collections`` (no row limit).

    Raises:
        ButlerError: the query is invalid (e.g. a bad ``where`` expression), naming it.
    """
    daf_butler = require_butler()
    data_id = {"instrument": instrument} if instrument else None
    try:
        refs: list[DatasetRef] = repo.butler.query_datasets(
            dataset_type, collections=list(collections), find_first=True, data_id=data_id,
            where=where, bind=dict(bind or {}), limit=None, explain=False)
    except (daf_butler.ButlerUserError, LookupError, ValueError) as exc:
        detail = f" with --where {where!r}" if where else ""
        raise ButlerError(
            f"query of {dataset_type!r} in collections {list(collections)} of {repo.root}"
            f"{detail} failed: {exc}") from exc
    return refs


def uris_of(repo: ButlerRepo, refs: Sequence[DatasetRef]) -> dict[Any, ResourcePath | None]:
    """dataset id -> URI of its file in the datastore (None when the datastore has no record
    of it: the file was never stored or was removed)."""
    if not refs:
        return {}
    try:
        many = repo.butler.get_many_uris(list(refs))
        return {ref.id: uris.primaryURI for ref, uris in many.items()}
    except FileNotFoundError:
        pass  # one of them has no datastore record: find out which, one by one
    out: dict[Any, ResourcePath | None] = {}
    for ref in refs:
        try:
            out[ref.id] = repo.butler.getURI(ref)
        except FileNotFoundError:
            out[ref.id] = None
    return out


def _local(uri: ResourcePath | None) -> Path | None:
    return Path(uri.ospath) if uri is not None and uri.isLocal else None


def butler_inventory(repo: ButlerRepo, collections: Sequence[str], *,
                     instrument: str | None = None, where: str = "",
                     bind: Mapping[str, Any] | None = None,
                     site_longitude_deg: float = RUBIN_LONGITUDE_DEG) -> ButlerInventory:
    """The visits of ``collections``: each visit's source table and metadata datasets.

    Args:
        repo: the open repository.
        collections: the collection search path (chains are followed; first match wins).
        instrument: restrict to this instrument (required when the datasets span several).
        where, bind: a Butler query expression on the data IDs (``visit > 100``, ``band =
            'r'`` ...) and its bind values, applied to the ``sourceTable_visit`` and
            ``visitSummary`` queries.
        site_longitude_deg: observatory longitude for visitTable metadata (hour angle).

    Returns:
        A :class:`ButlerInventory`; a visit without a metadata dataset has ``metadata_error``
        set (it fails alone when the backfill reaches it); files that cannot be used are in
        ``problems``.

    Raises:
        ButlerError: a collection not found, ``sourceTable_visit`` not registered (or of a
            storage class that is not parquet), no metadata dataset type registered, datasets
            of several instruments without ``instrument``, an invalid query.
    """
    names = repo.check_collections(collections)
    source_type = repo.dataset_type(SOURCE_TABLE, storage_classes=SOURCE_STORAGE_CLASSES)
    assert source_type is not None
    has_summary = repo.dataset_type(VISIT_SUMMARY, required=False) is not None
    has_tables = repo.dataset_type(VISIT_TABLE, required=False) is not None
    if not has_summary and not has_tables:
        raise ButlerError(
            f"dataset type {VISIT_SUMMARY!r} is not registered in Butler repository "
            f"{repo.root} (nor {VISIT_TABLE!r}/{CCD_VISIT_TABLE!r}): the visits' metadata "
            "cannot be found; check the repository")
    source_refs = query_refs(repo, SOURCE_TABLE, names, instrument=instrument, where=where,
                             bind=bind)
    instruments = sorted({str(ref.dataId["instrument"]) for ref in source_refs})
    if len(instruments) > 1:
        raise ButlerError(
            f"{SOURCE_TABLE} datasets of several instruments ({', '.join(instruments)}) in "
            f"collections {names}; choose one with --instrument")
    chosen = instrument or (instruments[0] if instruments else "")
    inv = ButlerInventory(root=Path(repo.root), repo=repo, collections=names,
                          instrument=chosen, source_storage_class=source_type.storageClass_name)
    problems: list[str] = []
    source_uris = uris_of(repo, source_refs)
    for ref in sorted(source_refs, key=lambda r: int(r.dataId["visit"])):
        visit = int(ref.dataId["visit"])
        uri = source_uris[ref.id]
        entry = ButlerVisit(visit=visit, instrument=chosen, collections=tuple(names))
        entry.source_refs = [ref]
        if uri is not None:  # else: it fails alone, with the dataset named, when reached
            entry.source_uris = [uri]
            local = _local(uri)
            entry.source_paths = [local] if local is not None else []
        inv.visits[visit] = entry
    if not inv.visits:
        inv.problems = problems
        return inv

    if has_summary:
        inv.metadata_dataset_types.append(VISIT_SUMMARY)
        summary_refs = query_refs(repo, VISIT_SUMMARY, names, instrument=chosen,
                                  where=where, bind=bind)
        summary_uris = uris_of(repo, summary_refs)
        for ref in summary_refs:
            found = inv.visits.get(int(ref.dataId["visit"]))
            if isinstance(found, ButlerVisit):
                found.summary_ref = ref
                found.summary_uri = summary_uris[ref.id]
    table_meta: dict[int, Any] = {}
    if has_tables:
        table_meta, table_problem = _visit_table_metadata(repo, names, chosen,
                                                          site_longitude_deg)
        if table_problem:
            problems.append(table_problem)
        elif table_meta:
            inv.metadata_dataset_types += [VISIT_TABLE, CCD_VISIT_TABLE]

    for visit, found in inv.visits.items():
        assert isinstance(found, ButlerVisit)
        ids = [str(r.id) for r in found.source_refs]
        if found.summary_ref is not None:
            ids.append(str(found.summary_ref.id))
            if found.summary_uri is None:
                found.metadata_error = (f"visit {visit}: {dataset_summary(found.summary_ref)} "
                                        f"has no file in the datastore of {repo.root}")
        elif visit in table_meta:
            found.metadata = table_meta[visit]
        else:
            found.metadata_error = (
                f"visit {visit}: no {VISIT_SUMMARY} dataset for instrument {chosen!r} in "
                f"collections {names}"
                + (f" and no row in its {VISIT_TABLE}" if has_tables else "")
                + "; run the step that writes it (or add its collection to --collections)")
        found.dataset_ids = sorted(ids)
    inv.visits_without_metadata = [
        v for v, e in inv.visits.items()
        if isinstance(e, ButlerVisit) and e.summary_ref is None and e.metadata is None]
    inv.problems = sorted(problems)
    return inv


def _visit_table_metadata(repo: ButlerRepo, collections: Sequence[str], instrument: str,
                          site_longitude_deg: float) -> tuple[dict[int, Any], str | None]:
    """{visit: VisitMetadata} from the instrument's visitTable (+ ccdVisitTable), or a
    problem naming the dataset that could not be used."""
    from .read import local_file  # the reading side owns downloads

    vt_refs = query_refs(repo, VISIT_TABLE, collections, instrument=instrument)
    if not vt_refs:
        return {}, None
    has_ccd = repo.dataset_type(CCD_VISIT_TABLE, required=False) is not None
    ccd_refs = query_refs(repo, CCD_VISIT_TABLE, collections, instrument=instrument) \
        if has_ccd else []
    uris = uris_of(repo, [*vt_refs, *ccd_refs])
    vt_uri = uris[vt_refs[0].id]
    ccd_uri = uris[ccd_refs[0].id] if ccd_refs else None
    if vt_uri is None:
        return {}, f"{dataset_summary(vt_refs[0])} has no file in the datastore of {repo.root}"
    try:
        with local_file(vt_uri) as vt_path:
            if ccd_uri is None:
                return read_visit_tables(vt_path, None, site_longitude_deg), None
            with local_file(ccd_uri) as ccd_path:
                return read_visit_tables(vt_path, ccd_path, site_longitude_deg), None
    except (StreamstarsError, OSError) as exc:
        return {}, f"{dataset_summary(vt_refs[0])}: {exc}"
