"""The versioned JSON visit event carried on Kafka (see ``docs/events.md``).

One message per visit and action; the message key is the visit id in decimal ASCII.  Schema
version 1 (JSON Schema: ``streamstars/schemas/visit_event.schema.json``)::

    {
      "schema_version": 1,
      "action": "apply",                      # apply | replace | retract
      "visit": 2024120100123,
      "instrument": "LSSTCam",
      "band": "r",
      "physical_filter": "r_57",
      "source_uris": ["file:///data/repo/sourceTable_visit_2024120100123.parquet"],
      "metadata": {"visit_summary_uri": "/data/repo/visitSummary_2024120100123.fits"},
      "finished_at": "2024-12-02T03:14:15.926Z"
    }

``metadata`` is either ``{"visit_summary_uri": URI}`` or ``{"values": {...}}`` with the keys
accepted by :func:`streamstars.io.visitmeta.metadata_from_values`.  A ``retract`` event needs
only ``schema_version``, ``action`` and ``visit``.

Schema version 2 adds one field, ``butler``: the visit's datasets in a Butler repository, by
dataset type and UUID, instead of ``source_uris`` and ``metadata`` (the consumer, run with
``--butler REPO``, resolves them through the registry)::

      "butler": {"datasets": {"sourceTable_visit": ["0190..."], "visitSummary": ["0190..."]},
                 "collections": ["LSSTCam/runs/nightly"]}

Events without ``butler`` are still written as version 1, so consumers that read only
version 1 keep reading every directory event.

Security: :func:`resolve_uri` admits only local paths and ``file://`` URIs that resolve (after
following symlinks) inside one of the configured data roots; anything else raises
:class:`ForbiddenPathError` before any file is opened.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import quote, unquote, urlsplit

import numpy as np

from .errors import PermanentInputError
from .visit import VisitMetadata

__all__ = [
    "ACTIONS",
    "SCHEMA_VERSION",
    "EventError",
    "ForbiddenPathError",
    "MalformedEventError",
    "VisitEvent",
    "event_key",
    "json_depth",
    "loads_bounded",
    "parse_event",
    "parse_message",
    "path_to_uri",
    "resolve_uri",
    "schema_path",
]

#: The highest schema version this streamstars reads (and writes, for Butler events).
SCHEMA_VERSION = 2
#: The version of events naming files (``source_uris`` + ``metadata``): still 1.
FILE_EVENT_VERSION = 1
#: The first version with the ``butler`` field.
BUTLER_EVENT_VERSION = 2
#: Dataset types a ``butler.datasets`` object may name: the source table (required) and the
#: visit's metadata (``visitSummary``, or ``visitTable`` with an optional ``ccdVisitTable``).
BUTLER_DATASET_TYPES: tuple[str, ...] = ("sourceTable_visit", "visitSummary", "visitTable",
                                         "ccdVisitTable")
#: Allowed values of ``action``.
ACTIONS: tuple[str, ...] = ("apply", "replace", "retract")
#: Largest event accepted (bytes); a visit event is a few kB.
MAX_EVENT_BYTES = 1 << 20
#: Deepest nesting of JSON arrays/objects accepted; a valid event has 4 levels (event,
#: metadata, values, detector list).  Checked before decoding, so that a hostile event
#: (``[[[[...``) cannot exhaust the decoder's recursion.
MAX_EVENT_DEPTH = 16

Action = Literal["apply", "replace", "retract"]

_TOP_KEYS = {
    "schema_version",
    "action",
    "visit",
    "instrument",
    "band",
    "physical_filter",
    "source_uris",
    "metadata",
    "finished_at",
    "published_at",
    "producer",
    "butler",
}


class EventError(PermanentInputError):
    """Base class of event problems: retrying will never help, the event is dead-lettered."""


class MalformedEventError(EventError):
    """The event is not valid JSON, or does not follow the visit-event schema."""


class ForbiddenPathError(EventError):
    """The event names a path outside the data roots, or a URI scheme that is not allowed."""


def schema_path() -> Path:
    """The JSON Schema file of the visit event (shipped as package data)."""
    return Path(__file__).resolve().parent / "schemas" / "visit_event.schema.json"


def event_key(visit: int) -> bytes:
    """The Kafka message key of a visit's events: the visit id in decimal ASCII."""
    return str(int(visit)).encode("ascii")


@dataclass(frozen=True)
class VisitEvent:
    """One visit event (schema version 1, or 2 when it names Butler datasets).

    Attributes:
        action: ``apply`` (add a new visit; a duplicate with the same content is a no-op),
            ``replace`` (re-process a visit with new data) or ``retract`` (remove it).
        visit: visit id.
        instrument, band, physical_filter: what the visit is (required unless ``retract``).
        source_uris: the visit's ``sourceTable_visit`` file(s): local absolute paths or
            ``file://`` URIs (required unless ``retract``).
        metadata_uri: URI of the visit's visitSummary, or None when values are inline.
        metadata_values: inline metadata values, or None when a visitSummary URI is given.
        finished_at: when the visit finished (UTC, ISO 8601), or None for ``retract``.
        published_at, producer: optional provenance written by publishers.
        butler_datasets: dataset type -> UUIDs of the visit's Butler datasets (instead of
            ``source_uris`` and ``metadata``; schema version 2), or None.
        butler_collections: the collections the publisher found them in (provenance).
        schema_version: the version the event was written with (version 2 is written
            whenever ``butler_datasets`` is set).
    """

    action: Action
    visit: int
    instrument: str = ""
    band: str = ""
    physical_filter: str = ""
    source_uris: tuple[str, ...] = ()
    metadata_uri: str | None = None
    metadata_values: Mapping[str, Any] | None = None
    finished_at: str | None = None
    published_at: str | None = None
    producer: str | None = None
    butler_datasets: Mapping[str, tuple[str, ...]] | None = None
    butler_collections: tuple[str, ...] = ()
    schema_version: int = FILE_EVENT_VERSION

    @property
    def key(self) -> bytes:
        """The Kafka message key (visit id)."""
        return event_key(self.visit)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this event (only the fields that are set)."""
        version = self.schema_version
        if self.butler_datasets is not None:
            version = max(version, BUTLER_EVENT_VERSION)
        out: dict[str, Any] = {
            "schema_version": version,
            "action": self.action,
            "visit": self.visit,
        }
        for name in ("instrument", "band", "physical_filter"):
            value = getattr(self, name)
            if value or self.action != "retract":
                out[name] = value
        if self.source_uris:
            out["source_uris"] = list(self.source_uris)
        if self.metadata_uri is not None:
            out["metadata"] = {"visit_summary_uri": self.metadata_uri}
        elif self.metadata_values is not None:
            out["metadata"] = {"values": _json_safe(dict(self.metadata_values))}
        if self.butler_datasets is not None:
            butler: dict[str, Any] = {"datasets": {k: list(v) for k, v in
                                                   sorted(self.butler_datasets.items())}}
            if self.butler_collections:
                butler["collections"] = list(self.butler_collections)
            out["butler"] = butler
        for name in ("finished_at", "published_at", "producer"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON (sorted keys, no NaN) -- the Kafka message value."""
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False).encode("utf-8")

    def describe(self) -> str:
        """Short human description for logs: ``apply visit 123``."""
        return f"{self.action} visit {self.visit}"


def _json_safe(value: Any) -> Any:
    """NaN/inf floats become None (JSON has no NaN); tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _where(visit: Any) -> str:
    return f"visit {visit}" if isinstance(visit, int) and not isinstance(visit, bool) else "event"


def _need_str(data: Mapping[str, Any], name: str, where: str, required: bool) -> str:
    if name not in data:
        if required:
            raise MalformedEventError(f"{where}: missing required field {name!r}")
        return ""
    value = data[name]
    if not isinstance(value, str) or (required and not value.strip()):
        raise MalformedEventError(
            f"{where}: {name!r} must be a non-empty string, got {_shown(value)}"
        )
    return value


def _check_time(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise MalformedEventError(
            f"{where}: {name!r} must be an ISO 8601 string, got {_shown(value)}"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MalformedEventError(
            f"{where}: {name!r} is not an ISO 8601 time ({_shown(value)}); "
            "use e.g. 2024-12-02T03:14:15Z"
        ) from exc
    if parsed.tzinfo is None:
        raise MalformedEventError(
            f"{where}: {name!r} has no time zone ({_shown(value)}); append Z for UTC"
        )
    return value


_short = reprlib.Repr()
_short.maxstring = 200
_short.maxother = 200
_short.maxlist = _short.maxdict = 8
_short.maxlevel = 3


def _shown(value: Any) -> str:
    """A bounded repr for error messages: a hostile event must not be echoed in full."""
    return _short.repr(value)


def json_depth(text: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (brackets inside strings
    are not counted), computed without recursion and without decoding.

    For valid JSON this is exact.  For invalid JSON it is at least the depth a decoder reaches
    before it fails, since both read the same strings up to the first error.
    """
    buf = np.frombuffer(text, dtype=np.uint8)
    if buf.size == 0:
        return 0
    positions = np.arange(buf.size)
    # the last position at or before i that is not a backslash (-1 if none)
    last_plain = np.maximum.accumulate(np.where(buf == 0x5C, -1, positions))
    quotes = np.flatnonzero(buf == 0x22)
    before = quotes - 1
    backslashes = np.where(before >= 0, before - last_plain[np.maximum(before, 0)], 0)
    delimiters = np.zeros(buf.size, dtype=np.int8)
    delimiters[quotes[backslashes % 2 == 0]] = 1  # quotes not escaped by a backslash
    outside = (np.cumsum(delimiters, dtype=np.int64) & 1) == 0
    step = (
        ((buf == 0x5B) | (buf == 0x7B)).astype(np.int64)
        - ((buf == 0x5D) | (buf == 0x7D)).astype(np.int64)
    )
    step[~outside] = 0
    return int(np.cumsum(step).max(initial=0))


def loads_bounded(value: bytes, *, max_bytes: int = MAX_EVENT_BYTES,
                  max_depth: int = MAX_EVENT_DEPTH) -> Any:
    """Decode UTF-8 JSON of at most ``max_bytes`` bytes and ``max_depth`` nesting levels.

    NaN/Infinity are refused (not JSON).  Size and depth are checked before decoding.

    Raises:
        MalformedEventError: too large, too deeply nested, not UTF-8 or not JSON.
    """
    if len(value) > max_bytes:
        raise MalformedEventError(f"event of {len(value)} bytes exceeds {max_bytes} bytes")
    depth = json_depth(value)
    if depth > max_depth:
        raise MalformedEventError(
            f"event nests arrays/objects {depth} levels deep; at most {max_depth} are accepted"
        )
    try:
        return json.loads(value.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedEventError(f"event is not UTF-8 JSON: {exc}") from exc


def parse_message(value: bytes | str | None, key: bytes | None) -> VisitEvent:
    """Decode and validate one Kafka message of the visits topic: the event contract requires
    the key to be the event's visit id (:func:`event_key`), so a message without a key is
    refused like one with another key.

    Raises:
        MalformedEventError: everything :func:`parse_event` refuses, and a missing key.
    """
    event = parse_event(value, key)
    if key is None:
        raise MalformedEventError(
            f"visit {event.visit}: message has no key; events must be keyed by their visit id "
            f"({event.key!r}) so that every event of a visit stays in one partition, in order"
        )
    return event


def parse_event(value: bytes | str | None, key: bytes | None = None) -> VisitEvent:
    """Decode and validate one event (a Kafka message value, and its key when given).

    The key is checked only when given (``None``: not checked); a Kafka consumer uses
    :func:`parse_message`, which requires it.  The value is decoded with
    :func:`loads_bounded` (at most :data:`MAX_EVENT_BYTES` bytes and :data:`MAX_EVENT_DEPTH`
    levels of nesting).

    Raises:
        MalformedEventError: too large or too deeply nested, not UTF-8 JSON, not an object,
            unknown or missing fields, wrong types, a schema version this streamstars cannot
            read, or a key that is not the event's visit id.  The message names the visit when
            it can, and shows offending values shortened.
    """
    if value is None:
        raise MalformedEventError("event has no value (tombstone or empty message)")
    if isinstance(value, str):
        value = value.encode("utf-8")
    data = loads_bounded(value)
    if not isinstance(data, dict):
        raise MalformedEventError(f"event must be a JSON object, got {type(data).__name__}")

    visit_raw = data.get("visit")
    where = _where(visit_raw)
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise MalformedEventError(
            f"{where}: 'schema_version' must be an integer, got {_shown(version)}"
        )
    if version < 1 or version > SCHEMA_VERSION:
        raise MalformedEventError(
            f"{where}: schema_version {version} is not supported (this streamstars reads "
            f"1..{SCHEMA_VERSION}); upgrade the consumers before the producers"
        )
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise MalformedEventError(
            f"{where}: unknown field(s) {', '.join(unknown)} in a schema_version {version} event"
        )
    if isinstance(visit_raw, bool) or not isinstance(visit_raw, int) or visit_raw < 0:
        raise MalformedEventError(
            f"event: 'visit' must be a non-negative integer, got {_shown(visit_raw)}"
        )
    visit = int(visit_raw)
    action = data.get("action")
    if action not in ACTIONS:
        raise MalformedEventError(
            f"{where}: 'action' must be one of {', '.join(ACTIONS)}, got {_shown(action)}"
        )
    if key is not None and key != event_key(visit):
        raise MalformedEventError(
            f"{where}: message key {_shown(key)} is not the visit id {event_key(visit)!r}"
        )
    needs_data = action != "retract"
    instrument = _need_str(data, "instrument", where, needs_data)
    band = _need_str(data, "band", where, needs_data)
    physical_filter = _need_str(data, "physical_filter", where, needs_data)

    butler_datasets, butler_collections = _butler_field(data, where, version, action)
    needs_files = needs_data and butler_datasets is None

    uris_raw = data.get("source_uris")
    source_uris: tuple[str, ...] = ()
    if uris_raw is None:
        if needs_files:
            raise MalformedEventError(f"{where}: missing required field 'source_uris'")
    else:
        if (
            not isinstance(uris_raw, list)
            or not uris_raw
            or not all(isinstance(u, str) and u for u in uris_raw)
        ):
            raise MalformedEventError(
                f"{where}: 'source_uris' must be a non-empty list of strings, got "
                f"{_shown(uris_raw)}"
            )
        if len(set(uris_raw)) != len(uris_raw):
            raise MalformedEventError(f"{where}: 'source_uris' lists a file twice")
        source_uris = tuple(uris_raw)

    metadata_uri: str | None = None
    metadata_values: dict[str, Any] | None = None
    meta = data.get("metadata")
    if meta is None:
        if needs_files:
            raise MalformedEventError(f"{where}: missing required field 'metadata'")
    else:
        if not isinstance(meta, dict) or len(meta) != 1:
            raise MalformedEventError(
                f"{where}: 'metadata' must be {{\"visit_summary_uri\": URI}} or "
                f"{{\"values\": {{...}}}}, got {_shown(meta)}"
            )
        if "visit_summary_uri" in meta:
            metadata_uri = meta["visit_summary_uri"]
            if not isinstance(metadata_uri, str) or not metadata_uri:
                raise MalformedEventError(
                    f"{where}: 'metadata.visit_summary_uri' must be a non-empty string"
                )
        elif "values" in meta:
            metadata_values = meta["values"]
            if not isinstance(metadata_values, dict):
                raise MalformedEventError(f"{where}: 'metadata.values' must be an object")
            inner = metadata_values.get("visit", visit)
            if inner != visit:
                raise MalformedEventError(
                    f"{where}: 'metadata.values.visit' is {_shown(inner)}, not the event's visit"
                )
        else:
            raise MalformedEventError(
                f"{where}: 'metadata' must hold 'visit_summary_uri' or 'values', got "
                f"{', '.join(sorted(meta))}"
            )

    finished_at: str | None = None
    if "finished_at" in data:
        finished_at = _check_time(data["finished_at"], "finished_at", where)
    elif needs_data:
        raise MalformedEventError(f"{where}: missing required field 'finished_at'")
    published_at = None
    if "published_at" in data:
        published_at = _check_time(data["published_at"], "published_at", where)
    producer = data.get("producer")
    if producer is not None and not isinstance(producer, str):
        raise MalformedEventError(f"{where}: 'producer' must be a string")

    return VisitEvent(
        action=cast(Action, action),
        visit=visit,
        instrument=instrument,
        band=band,
        physical_filter=physical_filter,
        source_uris=source_uris,
        metadata_uri=metadata_uri,
        metadata_values=metadata_values,
        finished_at=finished_at,
        published_at=published_at,
        producer=producer,
        butler_datasets=butler_datasets,
        butler_collections=butler_collections,
        schema_version=version,
    )


def _butler_field(data: Mapping[str, Any], where: str, version: int, action: Any,
                  ) -> tuple[dict[str, tuple[str, ...]] | None, tuple[str, ...]]:
    """Validate the ``butler`` field (schema version 2): dataset type -> UUID strings."""
    raw = data.get("butler")
    if raw is None:
        return None, ()
    if version < BUTLER_EVENT_VERSION:
        raise MalformedEventError(
            f"{where}: 'butler' needs schema_version {BUTLER_EVENT_VERSION}, got {version}")
    if action == "retract":
        raise MalformedEventError(f"{where}: a retract event names no datasets ('butler')")
    if not isinstance(raw, dict) or "datasets" not in raw or set(raw) - {"datasets",
                                                                         "collections"}:
        raise MalformedEventError(
            f"{where}: 'butler' must be {{\"datasets\": {{TYPE: [UUID, ...]}}, "
            f"\"collections\": [...]}}, got {raw!r}")
    if "source_uris" in data or "metadata" in data:
        raise MalformedEventError(
            f"{where}: give either 'butler' or 'source_uris' + 'metadata', not both")
    datasets = raw["datasets"]
    if not isinstance(datasets, dict):
        raise MalformedEventError(f"{where}: 'butler.datasets' must be an object")
    unknown = sorted(set(datasets) - set(BUTLER_DATASET_TYPES))
    if unknown:
        raise MalformedEventError(
            f"{where}: 'butler.datasets' names unknown dataset type(s) {', '.join(unknown)}; "
            f"known: {', '.join(BUTLER_DATASET_TYPES)}")
    out: dict[str, tuple[str, ...]] = {}
    for name, ids in datasets.items():
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise MalformedEventError(
                f"{where}: 'butler.datasets.{name}' must be a non-empty list of UUID strings")
        for text in ids:
            try:
                uuid.UUID(text)
            except ValueError as exc:
                raise MalformedEventError(
                    f"{where}: 'butler.datasets.{name}' holds {text!r}, not a UUID") from exc
        if len(set(ids)) != len(ids):
            raise MalformedEventError(f"{where}: 'butler.datasets.{name}' lists a UUID twice")
        out[name] = tuple(ids)
    if "sourceTable_visit" not in out:
        raise MalformedEventError(f"{where}: 'butler.datasets' lacks 'sourceTable_visit'")
    if ("visitSummary" in out) == ("visitTable" in out):
        raise MalformedEventError(
            f"{where}: 'butler.datasets' needs exactly one of 'visitSummary' and "
            "'visitTable' (the visit's metadata)")
    if "ccdVisitTable" in out and "visitTable" not in out:
        raise MalformedEventError(f"{where}: 'ccdVisitTable' only goes with 'visitTable'")
    for name in ("visitSummary", "visitTable", "ccdVisitTable"):
        if len(out.get(name, ())) > 1:
            raise MalformedEventError(f"{where}: 'butler.datasets.{name}' must hold one UUID")
    collections = raw.get("collections", [])
    if not isinstance(collections, list) or not all(isinstance(c, str) for c in collections):
        raise MalformedEventError(f"{where}: 'butler.collections' must be a list of strings")
    return out, tuple(collections)


# ---------------------------------------------------------------------------- paths & URIs
def path_to_uri(path: str | Path) -> str:
    """``file://`` URI of an absolute local path (percent-encoded)."""
    return "file://" + quote(str(Path(path).absolute()))


def resolve_uri(uri: str, data_roots: Sequence[str | Path], *, what: str = "file") -> Path:
    """The real local path of ``uri`` if, and only if, it lies inside a data root.

    Accepted: absolute local paths and ``file:///...`` (or ``file://localhost/...``) URIs.
    Symlinks are resolved on both the path and the roots before the containment check, so a
    link inside a root pointing outside it is refused.  Nothing is opened here.

    Raises:
        ForbiddenPathError: another scheme, a remote host, a relative path, a NUL byte, no data
            root configured, or a path outside every data root.
    """
    if "\x00" in uri:
        raise ForbiddenPathError(f"{what} URI contains a NUL byte: {_shown(uri)}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ForbiddenPathError(
                f"{what} URI {_shown(uri)} names host {_shown(parts.netloc)}; only local "
                "files are allowed"
            )
        if parts.query or parts.fragment:
            raise ForbiddenPathError(f"{what} URI {_shown(uri)} has a query or fragment")
        raw = unquote(parts.path)
    elif scheme == "":
        raw = uri
    else:
        raise ForbiddenPathError(
            f"{what} URI scheme {_shown(scheme)} is not allowed ({_shown(uri)}); events may "
            "name only local paths or file:// URIs under the configured --data-root directories"
        )
    if "\x00" in raw:
        raise ForbiddenPathError(f"{what} URI contains a NUL byte: {_shown(uri)}")
    if not os.path.isabs(raw):
        raise ForbiddenPathError(f"{what} path {_shown(raw)} is not absolute")
    if not data_roots:
        raise ForbiddenPathError(
            f"{what} {_shown(raw)} refused: no --data-root is configured, so no path is allowed"
        )
    real = Path(os.path.realpath(raw))
    for root in data_roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real.is_relative_to(real_root):
            return real
    roots = ", ".join(str(r) for r in data_roots)
    shown = raw if str(real) == os.path.normpath(raw) else f"{raw} (resolves to {real})"
    raise ForbiddenPathError(f"{what} {shown} is outside the data roots ({roots}); not opened")


def now_iso() -> str:
    """The current UTC time as ISO 8601 with a ``Z`` suffix (millisecond precision)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def metadata_for_event(metadata: VisitMetadata) -> dict[str, Any]:
    """Inline ``metadata.values`` for an event (``VisitMetadata.to_dict``, NaN as null)."""
    return _json_safe(metadata.to_dict())  # type: ignore[no-any-return]


def inline_metadata(values: Mapping[str, Any]) -> VisitMetadata:
    """:class:`VisitMetadata` from an event's ``metadata.values``.

    The values are validated by :func:`streamstars.io.visitmeta.metadata_from_values`.  When
    they hold every :class:`VisitMetadata` field (as ``streamstars publish`` writes them), they
    are taken verbatim with :meth:`VisitMetadata.from_dict`, so that the consumer applies
    exactly the metadata ``backfill`` would (no recomputed hour angle for a null).

    Raises:
        PermanentInputError: missing/unknown keys or wrong types.
    """
    from .io.visitmeta import metadata_from_values

    checked = metadata_from_values(values)
    names = {f.name for f in dataclasses.fields(VisitMetadata)}
    if names <= set(values):
        try:
            return VisitMetadata.from_dict(dict(values))
        except (TypeError, ValueError) as exc:
            raise MalformedEventError(f"visit {checked.visit}: bad metadata values: {exc}") from exc
    return checked
