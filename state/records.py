"""The record of one applied visit (sub-database ``visits``), as a typed dataclass.

Stored as JSON with sorted keys, byte for byte what earlier versions wrote: the keys are the
field names below; the optional ones (``None`` here) are absent from records written before
they existed, and stay absent when such a record is written back.  Keys this version does not
know are kept as they are (:attr:`VisitRecord.extra`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from streamstars.errors import StateError

_REQUIRED = ("visit", "band", "metadata", "content_hash", "pixels", "n_sources", "n_selected",
             "delta_aper")
_OPTIONAL = ("content_hash_version", "dropped_rows", "delta_aper_detector", "source_paths",
             "files", "dataset_ids", "kafka", "shards", "core_selected")


@dataclass
class VisitRecord:
    """What the store keeps of one applied visit.

    Attributes:
        visit: the visit id.
        band: the band its observations are stored under.
        metadata: the fgcmVisitCatalog row inputs (``streamstars.visit.VisitMetadata.to_dict``;
            its ``source`` names the file they were read from).
        content_hash: sha256 of what the visit contributes (docs/state.md).
        pixels: the store pixels its observations went to (sorted).
        n_sources: source-table rows read.
        n_selected: observations selected and stored.
        delta_aper: the visit's aperture correction [mag].
        content_hash_version: 2 for hashes without the metadata's path; None in records of
            older versions (their hash covered ``metadata.source``).
        dropped_rows: rows passing every other cut dropped for unusable coordinates, by reason;
            None in records of older versions.
        delta_aper_detector: per-detector aperture corrections (keys: detector ids as text).
        source_paths: the source tables it was read from.
        files: (path, size, mtime_ns) of those files, for resuming backfills.
        dataset_ids: UUIDs of the Butler datasets it was read from (sorted; None outside a
            Butler and in records of older versions), for resuming Butler backfills.
        kafka: [topic, partition, next offset] when the visit came from Kafka.
        shards: in a sky shard, every shard the visit is recorded in (sorted nest pixels at
            ``shardNside``; docs/state.md); ``pixels`` and ``n_selected`` are then this
            shard's (core and margin rows), the other values the visit's.
        core_selected: in a sky shard, how many of its rows lie in the shard's core (summed
            over the shards: the visit's selected observations).
        extra: keys of the stored JSON this version does not know, kept as they are.
    """

    visit: int
    band: str
    metadata: dict[str, Any]
    content_hash: str
    pixels: list[int]
    n_sources: int
    n_selected: int
    delta_aper: float
    content_hash_version: int | None = None
    dropped_rows: dict[str, int] | None = None
    delta_aper_detector: dict[str, float] | None = None
    source_paths: list[str] | None = None
    files: list[list[Any]] | None = None
    dataset_ids: list[str] | None = None
    kafka: list[Any] | None = None
    shards: list[int] | None = None
    core_selected: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes) -> VisitRecord:
        """Parse a stored record.

        Raises:
            StateError: not a visit record (a key every version writes is missing).
        """
        values = json.loads(raw)
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise StateError(f"a visit record of the store lacks {missing} (visit "
                             f"{values.get('visit', '?')}); the store is damaged: rebuild it")
        known = {k: values.pop(k) for k in (*_REQUIRED, *_OPTIONAL) if k in values}
        return cls(**known, extra=values)

    def to_json(self) -> bytes:
        """The stored form: JSON with sorted keys (optional fields only when set)."""
        values: dict[str, Any] = dict(self.extra)
        for name in _REQUIRED:
            values[name] = getattr(self, name)
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        return json.dumps(values, sort_keys=True).encode()

    def replace(self, **changes: Any) -> VisitRecord:
        """A copy with ``changes`` applied (:func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    @property
    def metadata_source(self) -> str | None:
        """Where the visit's metadata was read (``metadata.source``), if recorded."""
        source = self.metadata.get("source")
        return None if source is None else str(source)

    @property
    def kafka_position(self) -> tuple[str, int, int] | None:
        """(topic, partition, next offset) of the Kafka event it came from, if any."""
        if self.kafka is None:
            return None
        topic, partition, next_offset = self.kafka
        return str(topic), int(partition), int(next_offset)

    @property
    def dropped(self) -> dict[str, int]:
        """Rows dropped for unusable coordinates by reason (empty for older records)."""
        return dict(self.dropped_rows or {})
