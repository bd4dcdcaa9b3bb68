"""Where a visit is applied: the one per-visit step shared by ``backfill`` and the consumer.

:func:`prepare_visit` does the I/O-heavy part outside any transaction (read the source
tables with column projection, select, compute photometry and the content hash);
:func:`apply_prepared` then applies it in ONE LMDB write transaction holding the visit's
observations, the updated components of the pixels it touched, the visit record (metadata row,
content hash), the reference stars of the touched pixels and their neighbours not cached yet
(when a reference catalog is configured, :mod:`streamstars.references`) and, when it came from
Kafka, the next offset of its partition.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lmdb
import numpy as np

from streamstars.associate import (
    BandUpdateStats,
    add_observations,
    rebuild_after_removal,
    write_observations,
)
from streamstars.columns import OBSERVATION_DTYPES, ColumnDict
from streamstars.config import BuildStarsConfig
from streamstars.errors import InvalidSourceTableError, VisitConflictError
from streamstars.io.sourcetable import read_source_tables
from streamstars.references import ReferenceStats, cache_reference_pixels, ensure_references
from streamstars.select import aperture_corrections, select_observations
from streamstars.state.codec import encode_columns
from streamstars.state.store import StarStore
from streamstars.visit import VisitMetadata

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


def file_signature(paths: Sequence[Path | str]) -> list[list[object]]:
    """(path, size, mtime_ns) of each file: cheap change detection for resuming backfills."""
    out: list[list[object]] = []
    for p in paths:
        st = os.stat(p)
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def prepare_visit(visit_input: VisitInput, config: BuildStarsConfig) -> PreparedVisit:
    """Read, check and select one visit (no store access).

    Raises:
        InputFileError, InvalidSourceTableError: unreadable or invalid source tables.
    """
    table = read_source_tables([Path(p) for p in visit_input.source_paths], config)
    visits_in_table = np.unique(np.asarray(table.column("visit")))
    if len(visits_in_table) != 1 or int(visits_in_table[0]) != visit_input.visit:
        raise InvalidSourceTableError(
            f"visit {visit_input.visit}: source tables {list(map(str, visit_input.source_paths))}"
            f" hold visit(s) {visits_in_table.tolist()}, not {visit_input.visit}")
    metadata = visit_input.metadata
    observations = select_observations(table, metadata, config)
    delta_aper, per_detector = aperture_corrections(observations)
    band = config.band_of(metadata.physical_filter, metadata.band)
    digest = hashlib.sha256()
    digest.update(encode_columns(observations, OBSERVATION_DTYPES))
    digest.update(metadata.to_json().encode())
    digest.update(band.encode())
    return PreparedVisit(
        visit=visit_input.visit, band=band, metadata=metadata, observations=observations,
        n_sources=table.num_rows, delta_aper=float(delta_aper),
        delta_aper_detector={int(k): float(v) for k, v in per_detector.items()},
        content_hash=digest.hexdigest(), source_paths=[str(p) for p in visit_input.source_paths],
        files=file_signature(visit_input.source_paths),
        dataset_ids=sorted(visit_input.dataset_ids))


def apply_prepared(store: StarStore, prepared: PreparedVisit, *, replace: bool = False,
                   kafka_offset: KafkaOffset | None = None) -> ApplyResult:
    """Apply a prepared visit in one write transaction.

    Same content already applied -> "skipped" (the offset is still recorded).  Different
    content already applied -> :class:`VisitConflictError` unless ``replace``, which removes
    the old observations first (status "replaced").
    """
    start = time.perf_counter()
    ensure_references(store)  # validated once per open store, before the first visit

    def body(txn: lmdb.Transaction) -> ApplyResult:
        record = store.visit_record(txn, prepared.visit)
        status: Status = "applied"
        stats = None
        refs = ReferenceStats()
        if record is not None:
            if record["content_hash"] == prepared.content_hash:
                status = "skipped"
                _note_inputs(store, txn, record, prepared)
            elif not replace:
                raise VisitConflictError(
                    f"visit {prepared.visit} was already applied with different content "
                    f"(stored hash {record['content_hash'][:12]}, new {prepared.content_hash[:12]})"
                    "; re-run with --replace to replace its observations")
            else:
                _remove_visit(store, txn, prepared.visit, record)
                status = "replaced"
        if status != "skipped":
            stats, refs = _add_visit(store, txn, prepared, kafka_offset)
        if kafka_offset is not None:
            store.put_offset(txn, kafka_offset.topic, kafka_offset.partition,
                             kafka_offset.next_offset)
        return ApplyResult(prepared.visit, status, prepared.n_sources,
                           len(prepared.observations["source_id"]), 0.0, stats,
                           refs.seconds, refs.pixels_filled, refs.stars_cached)

    result = store.write(body)
    result.seconds = time.perf_counter() - start
    return result


def apply_visit(store: StarStore, visit_input: VisitInput, *, replace: bool = False,
                kafka_offset: KafkaOffset | None = None) -> ApplyResult:
    """Read, select and apply one visit (see :func:`prepare_visit`, :func:`apply_prepared`)."""
    start = time.perf_counter()
    prepared = prepare_visit(visit_input, store.config)
    result = apply_prepared(store, prepared, replace=replace, kafka_offset=kafka_offset)
    result.seconds = time.perf_counter() - start
    return result


def retract_visit(store: StarStore, visit: int, *,
                  kafka_offset: KafkaOffset | None = None) -> ApplyResult:
    """Remove a visit completely (observations, components it shaped, visit record)."""
    start = time.perf_counter()

    def body(txn: lmdb.Transaction) -> ApplyResult:
        record = store.visit_record(txn, visit)
        status: Status = "absent"
        if record is not None:
            _remove_visit(store, txn, visit, record)
            status = "retracted"
        if kafka_offset is not None:
            store.put_offset(txn, kafka_offset.topic, kafka_offset.partition,
                             kafka_offset.next_offset)
        n_selected = int(record["n_selected"]) if record else 0
        n_sources = int(record["n_sources"]) if record else 0
        return ApplyResult(visit, status, n_sources, n_selected, 0.0)

    result = store.write(body)
    result.seconds = time.perf_counter() - start
    return result


def _add_visit(store: StarStore, txn: lmdb.Transaction, prepared: PreparedVisit,
               kafka_offset: KafkaOffset | None,
               ) -> tuple[BandUpdateStats | None, ReferenceStats]:
    obs = prepared.observations
    pixels = write_observations(store, txn, prepared.band, prepared.visit, obs)
    record: dict[str, Any] = {
        "visit": prepared.visit,
        "band": prepared.band,
        "metadata": prepared.metadata.to_dict(),
        "content_hash": prepared.content_hash,
        "pixels": pixels,
        "n_sources": prepared.n_sources,
        "n_selected": len(obs["source_id"]),
        "delta_aper": prepared.delta_aper,
        "delta_aper_detector": {str(k): v for k, v in sorted(
            prepared.delta_aper_detector.items())},
        "source_paths": prepared.source_paths,
        "files": prepared.files,
    }
    if prepared.dataset_ids:
        record["dataset_ids"] = prepared.dataset_ids
    if kafka_offset is not None:
        record["kafka"] = [kafka_offset.topic, kafka_offset.partition, kafka_offset.next_offset]
    store.put_visit_record(txn, prepared.visit, record)
    refs = cache_reference_pixels(store, txn, record["pixels"])
    if prepared.band in store.config.primaryBands:
        return add_observations(store, txn, prepared.band, obs), refs
    return None, refs


def _note_inputs(store: StarStore, txn: lmdb.Transaction, record: dict[str, Any],
                 prepared: PreparedVisit) -> None:
    """Same content from other inputs (a re-ingested dataset, a touched file): remember the
    new inputs, so that the next resumed backfill skips the visit without reading it."""
    if prepared.dataset_ids and record.get("dataset_ids") != prepared.dataset_ids:
        record["dataset_ids"] = prepared.dataset_ids
        record["source_paths"] = prepared.source_paths
        record["files"] = prepared.files
        store.put_visit_record(txn, prepared.visit, record)


def _remove_visit(store: StarStore, txn: lmdb.Transaction, visit: int,
                  record: dict[str, Any]) -> None:
    pixels = np.asarray(record["pixels"], dtype=np.int64)
    rebuild_after_removal(store, txn, record["band"], pixels, visit)
    store.delete_visit_record(txn, visit)
