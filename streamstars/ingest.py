"""Where a visit is applied: the one per-visit step shared by ``backfill`` and the consumer.

:func:`prepare_visit` does the I/O-heavy part outside any transaction (read the source
tables with column projection, select, compute photometry and the content hash);
:func:`apply_prepared` then applies it in ONE LMDB write transaction holding the visit's
observations, the updated components of the pixels it touched, the visit record (metadata row,
content hash), the reference stars of the touched pixels and their neighbours not cached yet
(when a reference catalog is configured, :mod:`streamstars.references`) and, when it came from
Kafka, the next offset of its partition.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from streamstars.association import BandUpdateStats, add_observations, rebuild_after_removal
from streamstars.bands import band_name_problem
from streamstars.columns import OBSERVATION_DTYPES, ColumnDict
from streamstars.config import BuildStarsConfig
from streamstars.errors import InvalidMetadataError, InvalidSourceTableError, VisitConflictError
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
from streamstars.state import StarStore, Transaction, VisitRecord
from streamstars.state.codec import encode_columns
from streamstars.visit import VisitMetadata

log = logging.getLogger(__name__)

#: A visit losing more than this fraction of its selectable rows to unusable coordinates is
#: logged as a warning (fewer: at INFO level).
BAD_COORDINATES_WARN_FRACTION = 0.01

#: Version of the content hash (``content_hash_version`` of a visit record): 2 = without the
#: metadata's ``source`` path.  Records without it were hashed with the path (see
#: :func:`legacy_content_hash`).
CONTENT_HASH_VERSION = 2

Status = Literal["applied", "replaced", "skipped", "retracted", "absent"]


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


def legacy_content_hash(observations: ColumnDict, metadata: VisitMetadata, band: str,
                        source: str) -> str:
    """The content hash of records written before ``content_hash_version`` 2: it also covered
    the metadata's ``source`` path.  With the stored record's own ``source`` it tells whether a
    visit read from elsewhere has the content stored then."""
    digest = hashlib.sha256()
    digest.update(encode_columns(observations, OBSERVATION_DTYPES))
    digest.update(dataclasses.replace(metadata, source=source).to_json().encode())
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


def apply_prepared(store: StarStore, prepared: PreparedVisit, *, replace: bool = False,
                   kafka_offset: KafkaOffset | None = None,
                   references: ReferenceChoice = CONFIGURED) -> ApplyResult:
    """Apply a prepared visit in one write transaction.

    Same content already applied -> "skipped" (the offset is still recorded).  Different
    content already applied -> :class:`VisitConflictError` unless ``replace``, which removes
    the old observations first (status "replaced").  ``references`` is the reference catalog
    whose stars the visit caches: what :func:`streamstars.references.attach_references`
    returned for ``store`` (``None``: no catalog); by default the store's configured catalog is
    opened and checked now (callers applying many visits attach it once and pass it).

    Raises:
        VisitConflictError: other content already applied, without ``replace``.
        SourceIdReuseError: the visit's sourceIds are stored for another visit.
        StateError, RefcatError: the reference catalog cannot be used with this store.
        DiskFullError: the store's disk is nearly full (nothing was written).
    """
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


def apply_visit(store: StarStore, visit_input: VisitInput, *, replace: bool = False,
                kafka_offset: KafkaOffset | None = None,
                references: ReferenceChoice = CONFIGURED) -> ApplyResult:
    """Read, select and apply one visit (see :func:`prepare_visit`, :func:`apply_prepared`)."""
    start = time.perf_counter()
    prepared = prepare_visit(visit_input, store.config)
    result = apply_prepared(store, prepared, replace=replace, kafka_offset=kafka_offset,
                            references=references)
    result.seconds = time.perf_counter() - start
    return result


def retract_visit(store: StarStore, visit: int, *,
                  kafka_offset: KafkaOffset | None = None) -> ApplyResult:
    """Remove a visit completely (observations, components it shaped, visit record)."""
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
    """Whether a stored visit has the content of ``prepared`` (wherever its files were)."""
    if record.content_hash == prepared.content_hash:
        return True
    if record.content_hash_version is not None:
        return False
    # a record of an older streamstars: its hash covered the metadata's path then; hashed
    # again the old way with that path, equal content gives the stored hash
    source = str(record.metadata.get("source", ""))
    return bool(record.content_hash == legacy_content_hash(
        prepared.observations, prepared.metadata, prepared.band, source))


def _follow_files(tx: Transaction, record: VisitRecord, prepared: PreparedVisit) -> None:
    """A visit skipped as unchanged: its record follows its inputs when they moved or were
    re-ingested (files, or Butler datasets with new UUIDs; so the next resume skips it without
    reading) and an older record gets the current content hash."""
    moved = (record.files != prepared.files
             or record.source_paths != prepared.source_paths
             or record.metadata_source != prepared.metadata.source
             or (bool(prepared.dataset_ids) and record.dataset_ids != prepared.dataset_ids))
    if not moved and record.content_hash_version == CONTENT_HASH_VERSION:
        return
    tx.visits.put(record.replace(
        files=prepared.files, source_paths=prepared.source_paths,
        content_hash=prepared.content_hash, content_hash_version=CONTENT_HASH_VERSION,
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
