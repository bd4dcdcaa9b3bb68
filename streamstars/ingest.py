"""Where a visit is applied: the one per-visit step shared by ``backfill`` and the consumer.

:func:`prepare_visit` does the I/O-heavy part outside any transaction (read the source
tables with column projection, select, compute photometry and the content hash);
:func:`apply_prepared` then applies it.  To one store (a :class:`StarStore`: a sky shard, or a
store made alone through the Python API) it is ONE LMDB write transaction holding the visit's
observations, the updated components of the pixels it touched, the visit record (metadata row,
content hash), the reference stars of the touched pixels and their neighbours not cached yet
(when a reference catalog is configured, :mod:`streamstars.references`) and, when it came from
Kafka, the next offset of its partition.

To a state directory (:class:`StateDirectory`, docs/state.md "Applying a visit across
shards"): the selected observations are routed to the shards that store them
(:func:`route_visit`: the core shard of each row and every shard within ``shardMargin``, plus
the visit's home shard); then (1) the index records the intent (status ``applying``, the
content hash and the shards), (2) each shard applies its rows in its own write transaction
(the step above, per shard), (3) the index records the visit ``applied`` with the Kafka offset.
A crash between two shards' commits leaves the intent: the next application of the same visit
completes it, each shard skipping the visit when it already holds that content
(:func:`plan_visit`).  :func:`retract_visit` removes a visit from every shard the index names.

The content hash of a visit covers what it contributes (its selected observations, its
metadata values and its band), never where its files live: the same visit read from a moved
or re-addressed repository, or named by Kafka events with other paths, is the same visit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np

from streamstars.association import BandUpdateStats, add_observations, rebuild_after_removal
from streamstars.bands import band_name_problem
from streamstars.columns import OBSERVATION_DTYPES, ColumnDict, take
from streamstars.config import BuildStarsConfig
from streamstars.errors import (
    DiskFullError,
    FootprintMissError,
    InvalidMetadataError,
    InvalidSourceTableError,
    PermanentInputError,
    ShardError,
    StateError,
    VisitConflictError,
)
from streamstars.io.sourcetable import read_source_tables
from streamstars.references import (
    CONFIGURED,
    ReferenceChoice,
    ReferenceSource,
    ReferenceStats,
    cache_reference_pixels,
    resolve_references,
)
from streamstars.select import DROP_REASONS, aperture_corrections, select_visit
from streamstars.shards import home_shard, observation_vectors, route
from streamstars.state import IndexRecord, StarStore, StateDirectory, Transaction, VisitRecord
from streamstars.state.codec import encode_columns
from streamstars.visit import VisitMetadata

log = logging.getLogger(__name__)

#: A visit losing more than this fraction of its selectable rows to unusable coordinates is
#: logged as a warning (fewer: at INFO level).
BAD_COORDINATES_WARN_FRACTION = 0.01

#: Version of the content hash (``content_hash_version`` of a visit record): 2 = without the
#: metadata's ``source`` path (version 1, with it, was written only into format-1 stores,
#: which are refused).
CONTENT_HASH_VERSION = 2

Status = Literal["applied", "replaced", "skipped", "retracted", "absent"]

#: Where a visit is applied: one store, or a state directory of sky shards.
Target: TypeAlias = StarStore | StateDirectory

#: Test fault injection (docs/operations.md, "Testing locally"): the process SIGKILLs itself
#: right after its N-th shard commit, between two shards' commits of a visit.
ENV_KILL_AFTER_SHARD_COMMITS = "STREAMSTARS_TEST_KILL_AFTER_SHARD_COMMITS"


@dataclass(frozen=True)
class VisitInput:
    """What is needed to apply one visit: its source tables and its metadata."""

    visit: int
    source_paths: Sequence[Path | str]
    metadata: VisitMetadata
    #: UUIDs of the Butler datasets the visit comes from (empty outside a Butler)
    dataset_ids: Sequence[str] = ()


@dataclass(frozen=True)
class KafkaOffset:
    """The Kafka position to record with a visit: the NEXT offset of its partition."""

    topic: str
    partition: int
    next_offset: int


@dataclass
class PreparedVisit:
    """A visit read and selected, ready to be applied."""

    visit: int
    band: str
    metadata: VisitMetadata
    observations: ColumnDict
    n_sources: int
    delta_aper: float
    delta_aper_detector: dict[int, float]
    content_hash: str
    source_paths: list[str] = field(default_factory=list)
    #: (path, size, mtime_ns) of the source files, so a resumed backfill can skip unchanged ones
    files: list[list[object]] = field(default_factory=list)
    #: rows dropped for unusable coordinates that pass every other cut, by reason
    #: (``nonFiniteRaDec``, ``raDecOutOfRange``; streamstars.select.select_visit)
    dropped: dict[str, int] = field(default_factory=dict)
    #: UUIDs of the Butler datasets read, so a resumed Butler backfill can skip unchanged ones
    dataset_ids: list[str] = field(default_factory=list)
    #: the part of a visit a sky shard stores: every shard of the visit and how many of its
    #: rows lie in this shard's core (None: the whole visit, for one store)
    shards: list[int] | None = None
    core_selected: int | None = None


@dataclass
class RoutedVisit:
    """A prepared visit and where its rows are stored (:func:`route_visit`).

    Attributes:
        prepared: the whole visit.
        shards: every shard it is recorded in (sorted): those its rows are routed to, and
            its home shard (:func:`streamstars.shards.home_shard`).
        rows: shard -> indices of the observations it stores (core and margin), sorted.
        core: shard -> how many of those lie in its core.
    """

    prepared: PreparedVisit
    shards: list[int]
    rows: dict[int, np.ndarray]
    core: dict[int, int]

    def part(self, shard: int) -> PreparedVisit:
        """The visit restricted to the rows ``shard`` stores (none for a home shard without
        rows: the visit is still recorded there)."""
        rows = self.rows.get(shard, np.zeros(0, dtype=np.int64))
        return dataclasses.replace(self.prepared,
                                   observations=take(self.prepared.observations, rows),
                                   shards=list(self.shards),
                                   core_selected=int(self.core.get(shard, 0)))

    def header(self) -> VisitHeader:
        """What the index needs of the visit (no observations)."""
        p = self.prepared
        return VisitHeader(
            visit=p.visit, band=p.band, content_hash=p.content_hash, shards=list(self.shards),
            n_sources=p.n_sources, n_selected=len(p.observations["source_id"]),
            dropped={k: int(p.dropped.get(k, 0)) for k in DROP_REASONS},
            files=p.files, source_paths=p.source_paths, dataset_ids=p.dataset_ids,
            metadata_source=p.metadata.source)


@dataclass
class VisitHeader:
    """A routed visit as the index sees it (what a parallel backfill's reader sends to the
    driver; the rows go to the shards' owners)."""

    visit: int
    band: str
    content_hash: str
    shards: list[int]
    n_sources: int
    n_selected: int
    dropped: dict[str, int]
    files: list[list[object]]
    source_paths: list[str]
    dataset_ids: list[str]
    metadata_source: str | None


@dataclass
class VisitPlan:
    """What applying a visit to a state directory does (:func:`plan_visit`).

    Attributes:
        status: the outcome once done ("applied", "replaced" or "skipped").
        shards: the shards to apply the visit to (its routing; for "skipped" the shards that
            hold it).
        retract_from: shards that may hold an older version of it and are not in ``shards``.
        shard_replace: a shard holding other content of the visit replaces it (the
            replacement was asked for, or an interrupted application is being completed).
        follow_files: "skipped" only: the shards' and the index's records follow the files,
            which moved (the shards are written although their data do not change).
        intent: the index record written before any shard commit (None for "skipped").
        done: the index record written once every shard committed.
    """

    status: Status
    shards: list[int]
    retract_from: list[int]
    shard_replace: bool
    follow_files: bool
    intent: IndexRecord | None
    done: IndexRecord


@dataclass
class ApplyResult:
    """The outcome of applying (or retracting) one visit."""

    visit: int
    status: Status
    n_sources: int = 0
    n_selected: int = 0
    seconds: float = 0.0
    association: BandUpdateStats | None = None
    #: time spent caching reference stars inside the visit's transaction (0 without refcat)
    reference_seconds: float = 0.0
    #: pixels whose reference stars were loaded by this visit, and the stars cached
    reference_pixels: int = 0
    reference_stars: int = 0
    #: rows dropped for unusable coordinates (applied or replaced visits; empty otherwise)
    dropped: dict[str, int] = field(default_factory=dict)


def file_signature(paths: Sequence[Path | str]) -> list[list[object]]:
    """(path, size, mtime_ns) of each file: cheap change detection for resuming backfills."""
    out: list[list[object]] = []
    for p in paths:
        st = os.stat(p)
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def content_hash(observations: ColumnDict, metadata: VisitMetadata, band: str) -> str:
    """sha256 of what a visit contributes: its selected observations (every column), its
    metadata values and its band — not ``metadata.source`` (where the metadata was read)."""
    values = metadata.to_dict()
    del values["source"]
    digest = hashlib.sha256()
    digest.update(encode_columns(observations, OBSERVATION_DTYPES))
    digest.update(json.dumps(values, sort_keys=True).encode())
    digest.update(band.encode())
    return digest.hexdigest()


def check_metadata(metadata: VisitMetadata, band: str) -> None:
    """Refuse visit metadata that cannot make a usable fgcmVisitCatalog row.

    Required: a band the store can key (1-8 printable ASCII characters), finite boresight
    ``telra``/``teldec`` [deg] with ``|teldec| <= 90``, finite ``telha`` [deg] and ``mjd``
    (fgcmcal computes airmasses and parallactic angles from them), and detector ids >= 0.
    ``telrot``, ``pmb``, the PSF and sky values may be NaN (documented as unknown).

    Raises:
        InvalidMetadataError: naming the visit, the value and where it came from.
    """
    where = f"visit {metadata.visit}" + (f" ({metadata.source})" if metadata.source else "")
    problem = band_name_problem(band)
    if problem is not None:
        origin = ("its band" if band == metadata.band
                  else f"physicalFilterMap[{metadata.physical_filter!r}]")
        raise InvalidMetadataError(f"{where}: band {band!r} ({origin}) cannot be stored: "
                                   f"{problem}; the visit is refused")
    bad = [f"{name} = {value!r}" for name, value in (
        ("telra", metadata.telra), ("teldec", metadata.teldec), ("telha", metadata.telha),
        ("mjd", metadata.mjd)) if not math.isfinite(value)]
    if math.isfinite(metadata.teldec) and abs(metadata.teldec) > 90.0:
        bad.append(f"teldec = {metadata.teldec!r} (outside [-90, 90])")
    if bad:
        raise InvalidMetadataError(
            f"{where}: unusable visit metadata ({', '.join(bad)}): fgcmcal needs the boresight "
            "and the date of every visit; fix the visitSummary / visitTable row (the visit is "
            "refused)")
    negative = [d for d in metadata.detectors if d < 0]
    if negative:
        raise InvalidMetadataError(f"{where}: negative detector id(s) {negative[:5]} in the "
                                   "visit metadata; the visit is refused")


def check_detectors(visit: int, detector: np.ndarray, metadata: VisitMetadata) -> None:
    """Every source must sit on a detector the visit's metadata describes.

    Detector ids index fgcm's per-detector arrays (``ccd``, ``deltaAperDetector``...): a
    negative id, or one the metadata does not list (when it lists detectors: a visitSummary
    or a ccdVisitTable), means the source table does not belong to this metadata.

    Raises:
        InvalidSourceTableError: naming the visit, the unknown ids and how many rows hold them.
    """
    detector = np.asarray(detector, dtype=np.int64)
    if len(detector) and 0 <= detector.min() and detector.max() < 1 << 16:
        counts = np.bincount(detector)  # detector ids are small: no sort needed
        ids = np.flatnonzero(counts)
        counts = counts[ids]
    else:
        ids, counts = np.unique(detector, return_counts=True)
    bad = ids < 0
    if metadata.detectors:
        bad |= ~np.isin(ids, np.asarray(metadata.detectors, dtype=np.int64))
    if bad.any():
        known = sorted(metadata.detectors)
        listed = (f"its metadata lists {len(known)} detectors ({known[0]}..{known[-1]})"
                  if known else "detector ids cannot be negative")
        raise InvalidSourceTableError(
            f"visit {visit}: {int(counts[bad].sum())} source row(s) on detector(s) "
            f"{ids[bad][:10].tolist()}, but {listed}; the source table does not match the "
            "visit's metadata (the visit is refused)")


def prepare_visit(visit_input: VisitInput, config: BuildStarsConfig) -> PreparedVisit:
    """Read, check and select one visit (no store access).

    Raises:
        InputFileError, InvalidSourceTableError: unreadable or invalid source tables (also
            sources on detectors the metadata does not describe).
        InvalidMetadataError: the metadata cannot make a visit-catalog row (a band the store
            cannot key, a non-finite boresight or date; :func:`check_metadata`).
    """
    metadata = visit_input.metadata
    band = config.band_of(metadata.physical_filter, metadata.band)
    check_metadata(metadata, band)
    table = read_source_tables([Path(p) for p in visit_input.source_paths], config)
    visits_in_table = np.unique(np.asarray(table.column("visit")))
    if len(visits_in_table) != 1 or int(visits_in_table[0]) != visit_input.visit:
        raise InvalidSourceTableError(
            f"visit {visit_input.visit}: source tables {list(map(str, visit_input.source_paths))}"
            f" hold visit(s) {visits_in_table.tolist()}, not {visit_input.visit}")
    check_detectors(visit_input.visit, np.asarray(table.column("detector")), metadata)
    observations, dropped = select_visit(table, metadata, config)
    _report_dropped(visit_input.visit, dropped, len(observations["source_id"]))
    delta_aper, per_detector = aperture_corrections(observations)
    return PreparedVisit(
        visit=visit_input.visit, band=band, metadata=metadata, observations=observations,
        n_sources=table.num_rows, delta_aper=float(delta_aper),
        delta_aper_detector={int(k): float(v) for k, v in per_detector.items()},
        content_hash=content_hash(observations, metadata, band),
        source_paths=[str(p) for p in visit_input.source_paths],
        files=file_signature(visit_input.source_paths), dropped=dropped,
        dataset_ids=sorted(visit_input.dataset_ids))


def _report_dropped(visit: int, dropped: dict[str, int], n_selected: int) -> None:
    lost = sum(dropped.values())
    if not lost:
        return
    fraction = lost / (lost + n_selected)
    level = logging.WARNING if fraction > BAD_COORDINATES_WARN_FRACTION else logging.INFO
    log.log(level, "visit %d: %d of %d selectable rows dropped for unusable coordinates "
            "(%.1f %%: %s)", visit, lost, lost + n_selected, 100.0 * fraction,
            ", ".join(f"{k} {v}" for k, v in dropped.items() if v))


def apply_prepared(target: Target, prepared: PreparedVisit, *, replace: bool = False,
                   kafka_offset: KafkaOffset | None = None,
                   references: ReferenceChoice = CONFIGURED) -> ApplyResult:
    """Apply a prepared visit: to one store in one write transaction, to a state directory
    across its shards (module docstring; :func:`apply_routed`).

    Same content already applied -> "skipped" (the offset is still recorded).  Different
    content already applied -> :class:`VisitConflictError` unless ``replace``, which removes
    the old observations first (status "replaced").  ``references`` is the reference catalog
    whose stars the visit caches: what :func:`streamstars.references.attach_references`
    returned for ``target`` (``None``: no catalog); by default the configured catalog is
    opened and checked now (callers applying many visits attach it once and pass it).

    Raises:
        VisitConflictError: other content already applied, without ``replace``.
        SourceIdReuseError: the visit's sourceIds are stored for another visit (in a state
            directory: in one of its shards; the visit is then removed from every shard).
        StateError, RefcatError: the reference catalog cannot be used with this store.
        DiskFullError: the store's disk is nearly full (nothing more was written).
    """
    if isinstance(target, StateDirectory):
        return apply_routed(target, route_visit(prepared, target.shard_nside,
                                                target.shard_margin),
                            replace=replace, kafka_offset=kafka_offset, references=references)
    return apply_to_store(target, prepared, replace=replace, kafka_offset=kafka_offset,
                           references=references)


def apply_to_store(store: StarStore, prepared: PreparedVisit, *, replace: bool,
                    kafka_offset: KafkaOffset | None,
                    references: ReferenceChoice) -> ApplyResult:
    """Apply a prepared visit (or a shard's part of it) to one store in one transaction
    (:func:`apply_prepared`'s step for one store)."""
    start = time.perf_counter()
    source = resolve_references(store, references)
    store.ensure_source_index()

    def body(tx: Transaction) -> ApplyResult:
        record = tx.visits.get(prepared.visit)
        status: Status = "applied"
        stats = None
        refs = ReferenceStats()
        if record is not None:
            if _same_content(record, prepared):
                status = "skipped"
                _follow_files(tx, record, prepared)
            elif not replace:
                raise VisitConflictError(
                    f"visit {prepared.visit} was already applied with different content "
                    f"(stored hash {record.content_hash[:12]}, new {prepared.content_hash[:12]})"
                    "; re-run with --replace to replace its observations")
            else:
                _remove_visit(tx, record)
                status = "replaced"
        if status != "skipped":
            stats, refs = _add_visit(tx, prepared, kafka_offset, source)
        if kafka_offset is not None:
            tx.offsets.put(kafka_offset.topic, kafka_offset.partition, kafka_offset.next_offset)
        return ApplyResult(prepared.visit, status, prepared.n_sources,
                           len(prepared.observations["source_id"]), 0.0, stats,
                           refs.seconds, refs.pixels_filled, refs.stars_cached,
                           dict(prepared.dropped) if status != "skipped" else {})

    result = store.write(body)
    result.seconds = time.perf_counter() - start
    return result


def apply_visit(target: Target, visit_input: VisitInput, *, replace: bool = False,
                kafka_offset: KafkaOffset | None = None,
                references: ReferenceChoice = CONFIGURED) -> ApplyResult:
    """Read, select and apply one visit (see :func:`prepare_visit`, :func:`apply_prepared`)."""
    start = time.perf_counter()
    prepared = prepare_visit(visit_input, target.config)
    result = apply_prepared(target, prepared, replace=replace, kafka_offset=kafka_offset,
                            references=references)
    result.seconds = time.perf_counter() - start
    return result


def retract_visit(target: Target, visit: int, *,
                  kafka_offset: KafkaOffset | None = None) -> ApplyResult:
    """Remove a visit completely (observations, components it shaped, visit record): from
    one store in one transaction, or from every shard of a state directory the index names
    (the index first marks it ``retracting``, and forgets it once every shard committed)."""
    if isinstance(target, StateDirectory):
        return _retract_from_state(target, visit, kafka_offset)
    return retract_from_store(target, visit, kafka_offset)


def retract_from_store(store: StarStore, visit: int,
                       kafka_offset: KafkaOffset | None) -> ApplyResult:
    """Remove a visit from one store in one transaction (:func:`retract_visit`'s step)."""
    start = time.perf_counter()
    store.ensure_source_index()

    def body(tx: Transaction) -> ApplyResult:
        record = tx.visits.get(visit)
        status: Status = "absent"
        if record is not None:
            _remove_visit(tx, record)
            status = "retracted"
        if kafka_offset is not None:
            tx.offsets.put(kafka_offset.topic, kafka_offset.partition, kafka_offset.next_offset)
        n_selected = int(record.n_selected) if record else 0
        n_sources = int(record.n_sources) if record else 0
        return ApplyResult(visit, status, n_sources, n_selected, 0.0)

    result = store.write(body)
    result.seconds = time.perf_counter() - start
    return result


def _same_content(record: VisitRecord, prepared: PreparedVisit) -> bool:
    """Whether a stored visit has the content of ``prepared`` (wherever its files were; the
    hash of a shard's part is the whole visit's)."""
    return record.content_hash == prepared.content_hash


def _follow_files(tx: Transaction, record: VisitRecord, prepared: PreparedVisit) -> None:
    """A visit skipped as unchanged: its record follows its inputs when they moved or were
    re-ingested (files, or Butler datasets with new UUIDs; so the next resume skips it without
    reading)."""
    moved = (record.files != prepared.files
             or record.source_paths != prepared.source_paths
             or record.metadata_source != prepared.metadata.source
             or (bool(prepared.dataset_ids) and record.dataset_ids != prepared.dataset_ids))
    if not moved:
        return
    tx.visits.put(record.replace(
        files=prepared.files, source_paths=prepared.source_paths,
        dataset_ids=prepared.dataset_ids or record.dataset_ids,
        metadata=dict(record.metadata, source=prepared.metadata.source)))


def _add_visit(tx: Transaction, prepared: PreparedVisit, kafka_offset: KafkaOffset | None,
               references: ReferenceSource | None,
               ) -> tuple[BandUpdateStats | None, ReferenceStats]:
    obs = prepared.observations
    # first: a visit reusing another visit's sourceIds fails here, before anything is written
    tx.source_ids.claim(prepared.visit, obs["source_id"])
    pixels = tx.observations.put_visit(prepared.band, prepared.visit, obs)
    record = VisitRecord(
        visit=prepared.visit,
        band=prepared.band,
        metadata=prepared.metadata.to_dict(),
        content_hash=prepared.content_hash,
        content_hash_version=CONTENT_HASH_VERSION,
        dropped_rows={k: int(prepared.dropped.get(k, 0)) for k in DROP_REASONS},
        pixels=pixels,
        n_sources=prepared.n_sources,
        n_selected=len(obs["source_id"]),
        delta_aper=prepared.delta_aper,
        delta_aper_detector={str(k): v for k, v in sorted(prepared.delta_aper_detector.items())},
        source_paths=prepared.source_paths,
        files=prepared.files,
        dataset_ids=prepared.dataset_ids or None,
        kafka=None if kafka_offset is None else [kafka_offset.topic, kafka_offset.partition,
                                                 kafka_offset.next_offset],
        shards=prepared.shards,
        core_selected=prepared.core_selected,
    )
    tx.visits.put(record)
    refs = cache_reference_pixels(tx, references, record.pixels)
    if prepared.band in tx.config.primaryBands:
        return add_observations(tx, prepared.band, obs), refs
    return None, refs


def _remove_visit(tx: Transaction, record: VisitRecord) -> None:
    tx.source_ids.release(record.visit, tx.observations.visit_source_ids(
        record.band, record.pixels, record.visit))
    rebuild_after_removal(tx, record.band, np.asarray(record.pixels, dtype=np.int64),
                          record.visit)
    tx.visits.delete(record.visit)


# ---------------------------------------------------------------------------------------------
# a state directory: one visit across its sky shards
# ---------------------------------------------------------------------------------------------
def route_visit(prepared: PreparedVisit, shard_nside: int, shard_margin: float) -> RoutedVisit:
    """Where the rows of ``prepared`` are stored (:func:`streamstars.shards.route`, from the
    same fixed-point vectors the store keys them by), and the visit's home shard."""
    obs = prepared.observations
    routing = route(observation_vectors(obs["ra"], obs["dec"]), shard_nside, shard_margin)
    rows = routing.shard_rows()
    core_shards, core_counts = np.unique(routing.shards[routing.core], return_counts=True)
    home = home_shard(prepared.metadata.telra, prepared.metadata.teldec, shard_nside)
    return RoutedVisit(prepared, sorted({*rows, home}), rows,
                       dict(zip(core_shards.tolist(), core_counts.tolist(), strict=True)))


def plan_visit(record: IndexRecord | None, header: VisitHeader, *, replace: bool,
               kafka_offset: KafkaOffset | None = None) -> VisitPlan:
    """What applying a routed visit does, given its index record (module docstring).

    No record: applied to its shards.  Applied with the same content: skipped (the records
    follow moved files).  An interrupted application of the same content ("applying"):
    completed — every shard that already holds it skips it, a replacement's old shards lose
    it.  Other content: replaced with ``replace`` (also an interrupted one), else a conflict.
    An interrupted retraction: the visit is applied again, replacing what is left of it.

    Raises:
        VisitConflictError: other content is (being) applied, without ``replace``; nothing
            was written.
    """
    new = list(header.shards)
    done = IndexRecord(
        visit=header.visit, band=header.band, content_hash=header.content_hash,
        status="applied", shards=new, n_sources=header.n_sources,
        n_selected=header.n_selected, dropped_rows=dict(header.dropped),
        files=[list(f) for f in header.files], source_paths=list(header.source_paths),
        dataset_ids=list(header.dataset_ids) or None, metadata_source=header.metadata_source,
        kafka=None if kafka_offset is None else [kafka_offset.topic, kafka_offset.partition,
                                                 kafka_offset.next_offset])
    if record is None:
        return VisitPlan("applied", new, [], False, False,
                         dataclasses.replace(done, status="applying"), done)
    same = record.content_hash == header.content_hash
    if record.status == "applied" and same:
        moved = (record.files != done.files or record.source_paths != done.source_paths
                 or record.metadata_source != done.metadata_source
                 or (done.dataset_ids is not None and record.dataset_ids != done.dataset_ids))
        kept = dataclasses.replace(
            record, files=done.files, source_paths=done.source_paths,
            metadata_source=done.metadata_source,
            dataset_ids=done.dataset_ids or record.dataset_ids)
        return VisitPlan("skipped", list(record.shards), [], False, moved, None, kept)
    if not same and record.status != "retracting" and not replace:
        what = "was already applied" if record.status == "applied" else \
            "was being applied (interrupted)"
        raise VisitConflictError(
            f"visit {header.visit} {what} with different content (stored hash "
            f"{record.content_hash[:12]}, new {header.content_hash[:12]}); re-run with "
            "--replace to replace its observations")
    old = sorted(({*record.shards, *record.old_shards}) - set(new))
    status: Status = "replaced" if (not same and record.status == "applied") else "applied"
    return VisitPlan(status, new, old, True, False,
                     dataclasses.replace(done, status="applying", old_shards=old), done)


def apply_routed(state: StateDirectory, routed: RoutedVisit, *, replace: bool = False,
                 kafka_offset: KafkaOffset | None = None,
                 references: ReferenceChoice = CONFIGURED) -> ApplyResult:
    """Apply a routed visit to a state directory: intent, one transaction per shard, done.

    A shard refusing the visit (its sourceIds stored for another visit there, a reference
    cache rebuilt meanwhile) removes it from every shard it reached and from the index, and
    the error is raised; a full disk or a damaged shard leaves the intent for the next run.

    Raises:
        See :func:`apply_prepared`.
    """
    start = time.perf_counter()
    prepared = routed.prepared
    source = resolve_references(state, references)
    plan = plan_visit(state.index.get(prepared.visit), routed.header(), replace=replace,
                      kafka_offset=kafka_offset)
    results: list[ApplyResult] = []
    if plan.status == "skipped":
        if plan.follow_files:
            for shard in plan.shards:
                apply_to_store(state.shard_for_write(shard), routed.part(shard),
                                replace=False, kafka_offset=None, references=source)
        finish_visit(state, plan, kafka_offset)
    else:
        # every store is opened (the existing ones first, then the new ones are created)
        # before anything is written: a shard that cannot be used fails the visit here,
        # with every other shard untouched.  Under the visit boundary, a snapshot sees the
        # visit in all of its shards or in none (and another thread's snapshot does not open
        # or close shard stores meanwhile).
        with state.visit_boundary(exclusive=True):
            state.keep_open([*plan.shards, *plan.retract_from])
            for shard in [*plan.shards, *plan.retract_from]:
                if state.has_shard(shard):
                    state.shard_for_write(shard)
            stores = {s: state.shard_for_write(s) for s in plan.shards}
            gone = {s: state.shard_for_write(s) for s in plan.retract_from
                    if state.has_shard(s)}
            begin_visit(state, plan)
            try:
                for store in gone.values():
                    retract_from_store(store, prepared.visit, None)
                    shard_committed()
                for shard, store in stores.items():
                    results.append(apply_to_store(store, routed.part(shard),
                                                   replace=plan.shard_replace,
                                                   kafka_offset=kafka_offset,
                                                   references=source))
                    shard_committed()
            except (DiskFullError, ShardError):
                raise  # nothing more can be written: the intent stays, the next run does it
            except (PermanentInputError, StateError):
                undo_visit(state, prepared.visit, [*plan.shards, *plan.retract_from])
                raise
            finish_visit(state, plan, kafka_offset)
    result = ApplyResult(prepared.visit, plan.status, prepared.n_sources,
                         len(prepared.observations["source_id"]), time.perf_counter() - start,
                         merge_stats([r.association for r in results]),
                         sum(r.reference_seconds for r in results),
                         sum(r.reference_pixels for r in results),
                         sum(r.reference_stars for r in results),
                         dict(prepared.dropped) if plan.status != "skipped" else {})
    return result


def begin_visit(state: StateDirectory, plan: VisitPlan) -> None:
    """Step 1: record the intent in the index (before any shard commit)."""
    intent = plan.intent
    if intent is not None:
        state.index.put(intent)


def finish_visit(state: StateDirectory, plan: VisitPlan,
                 kafka_offset: KafkaOffset | None) -> None:
    """Step 3: every shard committed: the visit is ``applied``, its shards registered (a
    registered shard whose directory goes missing is an error naming it) and the Kafka offset
    recorded, in one index transaction."""
    def body(tx: Any) -> None:
        tx.put(plan.done)
        tx.register_shards(plan.shards)
        if kafka_offset is not None:
            tx.put_offset(kafka_offset.topic, kafka_offset.partition, kafka_offset.next_offset)

    state.index.write(body)


def undo_visit(state: StateDirectory, visit: int, shards: Sequence[int]) -> None:
    """A shard refused the visit: remove it from every shard it may have reached, then from
    the index (the visit is absent, as after a refused single-store transaction)."""
    for shard in sorted(set(shards)):
        if state.has_shard(shard):
            retract_from_store(state.shard_for_write(shard), visit, None)
    state.index.write(lambda tx: tx.delete(visit))


def _retract_from_state(state: StateDirectory, visit: int,
                        kafka_offset: KafkaOffset | None) -> ApplyResult:
    start = time.perf_counter()
    record = state.index.get(visit)
    if record is None:
        if kafka_offset is not None:
            state.record_offset(kafka_offset.topic, kafka_offset.partition,
                                kafka_offset.next_offset)
        return ApplyResult(visit, "absent", 0, 0, time.perf_counter() - start)
    shards = sorted({*record.shards, *record.old_shards})

    def body(tx: Any) -> None:
        tx.delete(visit)
        if kafka_offset is not None:
            tx.put_offset(kafka_offset.topic, kafka_offset.partition, kafka_offset.next_offset)

    with state.visit_boundary(exclusive=True):  # a snapshot sees it in all shards or none
        state.keep_open(shards)
        stores = [state.shard_for_write(s) for s in shards if state.has_shard(s)]
        state.index.put(dataclasses.replace(record, status="retracting"))
        for store in stores:
            retract_from_store(store, visit, None)
            shard_committed()
        state.index.write(body)
    return ApplyResult(visit, "retracted", int(record.n_sources), int(record.n_selected),
                       time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# a state directory of a consumer in a group: one shard of a visit per event (schema version 3)
# ---------------------------------------------------------------------------------------------
def apply_shard_event(state: StateDirectory, prepared: PreparedVisit, shard: int,
                      footprint: Sequence[int], *, replace: bool, kafka_offset: KafkaOffset,
                      references: ReferenceChoice = CONFIGURED,
                      routed: RoutedVisit | None = None) -> ApplyResult:
    """Apply the part of a visit that ``shard`` stores, for one shard event (docs/state.md
    "Consumers in a group").

    The visit's selected rows are routed (:func:`route_visit`); every shard they reach must be
    in the event's ``footprint``.  Then ONE write transaction of ``shard`` holds the shard's
    rows (none: the visit is still recorded there, with zero observations) and the next offset
    of the event's partition; then the index lists ``shard`` among the visit's shards of this
    state and records the partition's watermark (:func:`record_shard_visit`).  Other shards of
    the visit are not touched: their own events apply them.

    ``routed``: the visit already routed with this state's shard settings (the other shard
    events of a visit reuse it), else it is routed here.

    Raises:
        FootprintMissError: a row routes to a shard not in ``footprint`` (nothing written).
        VisitConflictError, SourceIdReuseError, StateError, DiskFullError: as for
            :func:`apply_to_store` (nothing written to the shard).
    """
    if routed is None or routed.prepared is not prepared:
        routed = route_visit(prepared, state.shard_nside, state.shard_margin)
    missed = sorted(set(routed.shards) - {int(s) for s in footprint})
    if missed:
        names = ", ".join(f"{state.shard_nside}/{s}" for s in missed[:10])
        raise FootprintMissError(
            f"visit {prepared.visit}: footprint missed shard {names}"
            f"{' ...' if len(missed) > 10 else ''} ({len(missed)} shard(s) its selected rows "
            f"are routed to, not among the event's {len(footprint)} shards): those rows would "
            "be lost; publish the visit again (its footprint from the source coordinates) "
            "with `streamstars publish`")
    source = resolve_references(state, references)
    with state.visit_boundary(exclusive=True):
        state.keep_open([shard])
        store = state.shard_for_write(shard)
        result = apply_to_store(store, routed.part(shard), replace=replace,
                                kafka_offset=kafka_offset, references=source)
        shard_committed()
        record_shard_visit(state, shard, routed.header(), kafka_offset)
    return result


def retract_shard_event(state: StateDirectory, visit: int, shard: int, *,
                        kafka_offset: KafkaOffset) -> ApplyResult:
    """Remove ``visit`` from ``shard`` only (one shard event of a retraction), with the
    partition's next offset in the same transaction; the index forgets the shard for the
    visit (and the visit once no shard of this state holds it)."""
    start = time.perf_counter()
    result = ApplyResult(visit, "absent")
    with state.visit_boundary(exclusive=True):
        if state.has_shard(shard):
            state.keep_open([shard])
            result = retract_from_store(state.shard_for_write(shard), visit, kafka_offset)
            shard_committed()
        record_shard_visit(state, shard, None, kafka_offset, visit=visit)
    result.seconds = time.perf_counter() - start
    return result


def record_shard_visit(state: StateDirectory, shard: int, header: VisitHeader | None,
                       kafka_offset: KafkaOffset, *, visit: int | None = None) -> None:
    """After a shard's commit: the index lists ``shard`` among the visit's shards of this
    state (``header`` None: the visit left the shard), the shard as registered, and the
    partition's watermark (the next offset: every event of the partition below it is done in
    this state).  One index transaction."""
    number = header.visit if header is not None else visit
    assert number is not None

    def body(tx: Any) -> None:
        record = tx.get(number)
        if header is not None:
            if record is None or record.content_hash != header.content_hash:
                record = IndexRecord(
                    visit=header.visit, band=header.band, content_hash=header.content_hash,
                    status="applied", shards=[], n_sources=header.n_sources,
                    n_selected=header.n_selected, dropped_rows=dict(header.dropped),
                    files=[list(f) for f in header.files],
                    source_paths=list(header.source_paths),
                    dataset_ids=list(header.dataset_ids) or None,
                    metadata_source=header.metadata_source)
            record = dataclasses.replace(
                record, shards=sorted({*record.shards, int(shard)}),
                kafka=[kafka_offset.topic, kafka_offset.partition, kafka_offset.next_offset])
            tx.put(record)
            tx.register_shards([int(shard)])
        elif record is not None:
            left = sorted(set(record.shards) - {int(shard)})
            if left:
                tx.put(dataclasses.replace(record, shards=left))
            else:
                tx.delete(number)
        tx.put_offset(kafka_offset.topic, kafka_offset.partition, kafka_offset.next_offset)

    state.index.write(body)


def repair_shard_visit(state: StateDirectory, visit: int, shard: int,
                       kafka_offset: KafkaOffset) -> None:
    """A shard event found already applied by the shard (its offset is past the event) while
    the index's watermark is not: the process stopped between the shard's commit and the
    index's.  The index is brought to what the shard holds (the visit listed for the shard or
    not) and the watermark advanced."""
    record = state.open_shard(shard).visit_record(visit) if state.has_shard(shard) else None
    header = None
    if record is not None:
        header = VisitHeader(
            visit=record.visit, band=record.band, content_hash=record.content_hash,
            shards=list(record.shards or []), n_sources=int(record.n_sources),
            n_selected=int(record.n_selected), dropped=record.dropped,
            files=[list(f) for f in record.files or []],
            source_paths=list(record.source_paths or []),
            dataset_ids=list(record.dataset_ids or []),
            metadata_source=record.metadata_source)
    record_shard_visit(state, shard, header, kafka_offset, visit=visit)


def merge_stats(stats: Sequence[BandUpdateStats | None]) -> BandUpdateStats | None:
    """The association counts of a visit's shards, summed (None when no shard has any)."""
    present = [s for s in stats if s is not None]
    if not present:
        return None
    return BandUpdateStats(**{f.name: sum(getattr(s, f.name) for s in present)
                              for f in dataclasses.fields(BandUpdateStats)})


_CRASH_POINT_CALLS: dict[str, int] = {}


def crash_point(env_var: str) -> None:
    """Crash tests only: count the calls of this process for ``env_var``; with ``env_var`` =
    N set, the process SIGKILLs itself right after its N-th call."""
    kill_at = os.environ.get(env_var)
    if not kill_at:
        return
    _CRASH_POINT_CALLS[env_var] = _CRASH_POINT_CALLS.get(env_var, 0) + 1
    if _CRASH_POINT_CALLS[env_var] == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


def shard_committed() -> None:
    """A shard commit of this process: :func:`crash_point` of
    ``STREAMSTARS_TEST_KILL_AFTER_SHARD_COMMITS``."""
    crash_point(ENV_KILL_AFTER_SHARD_COMMITS)
