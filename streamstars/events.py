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
only ``schema_version``, ``action`` and ``visit``.  :func:`parse_event` validates events by
that JSON Schema (``jsonschema``, compiled once) and names the offending field.

Schema version 2 adds one field, ``butler``: the visit's datasets in a Butler repository, by
dataset type and UUID, instead of ``source_uris`` and ``metadata`` (the consumer, run with
``--butler REPO``, resolves them through the registry)::

      "butler": {"datasets": {"sourceTable_visit": ["0190..."], "visitSummary": ["0190..."]},
                 "collections": ["LSSTCam/runs/nightly"]}

Events without ``butler`` are still written as version 1, so consumers that read only
version 1 keep reading every directory event.

Schema version 3 is a version-1 or version-2 event routed to one sky shard (the scale-out on
Kafka: one event per (visit, shard of the visit's footprint), :mod:`streamstars.footprint`)::

      "shard": {"nside": 32, "pixel": 1234},     # the shard this event is for
      "shards": [1233, 1234, 1236]                # every shard of the visit's footprint, sorted

and its message key is the shard, ``b"32/1234"`` (:func:`shard_key`), not the visit id.

Security: :func:`resolve_uri` admits only local paths and ``file://`` URIs that resolve (after
following symlinks) inside one of the configured data roots; anything else raises
:class:`ForbiddenPathError` before any file is opened.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import reprlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard, cast
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
    "ShardEventError",
    "VisitEvent",
    "event_key",
    "json_depth",
    "shard_key",
    "loads_bounded",
    "parse_event",
    "parse_message",
    "path_to_uri",
    "resolve_uri",
    "schema_path",
]

#: The highest schema version this streamstars reads (and writes, for events routed to a
#: shard).
SCHEMA_VERSION = 3
#: The version of events naming files (``source_uris`` + ``metadata``): still 1.
FILE_EVENT_VERSION = 1
#: The first version with the ``butler`` field.
BUTLER_EVENT_VERSION = 2
#: The first version with the ``shard`` and ``shards`` fields (one event per visit and shard).
SHARD_EVENT_VERSION = 3
#: The largest HEALPix nside a ``shard`` may name (HEALPix's own limit).
MAX_SHARD_NSIDE = 1 << 29
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
_Data = dict[str, Any]  # a decoded event

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
    "shard",
    "shards",
}


class EventError(PermanentInputError):
    """Base class of event problems: retrying will never help, the event is dead-lettered."""


class MalformedEventError(EventError):
    """The event is not valid JSON, or does not follow the visit-event schema."""


class ShardEventError(EventError):
    """A schema-version-3 event (one sky shard of a visit) reached a consumer that applies
    whole visits: it needs a consumer keeping sharded state."""


class ForbiddenPathError(EventError):
    """The event names a path outside the data roots, or a URI scheme that is not allowed."""


def schema_path() -> Path:
    """The JSON Schema file of the visit event (shipped as package data)."""
    return Path(__file__).resolve().parent / "schemas" / "visit_event.schema.json"


def event_key(visit: int) -> bytes:
    """The Kafka message key of a visit's events of schema versions 1 and 2: the visit id in
    decimal ASCII."""
    return str(int(visit)).encode("ascii")


def shard_key(nside: int, pixel: int) -> bytes:
    """The Kafka message key of the events of one shard (schema version 3): ``nside/pixel`` in
    decimal ASCII, e.g. ``b"32/1234"``.  Every event of a shard has this key, so every event
    of a shard lands in one partition, in order."""
    return f"{int(nside)}/{int(pixel)}".encode("ascii")


@dataclass(frozen=True)
class VisitEvent:
    """One visit event (schema version 1, 2 when it names Butler datasets, 3 when it is
    routed to one shard).

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
        shard_nside, shard: the shard (HEALPix nest pixel at ``shard_nside``) this event is
            for (schema version 3), or None.
        shards: every shard of the visit's footprint, sorted (schema version 3).
        schema_version: the version the event was written with (version 2 is written
            whenever ``butler_datasets`` is set, version 3 whenever ``shard`` is).
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
    shard_nside: int | None = None
    shard: int | None = None
    shards: tuple[int, ...] = ()
    schema_version: int = FILE_EVENT_VERSION

    @property
    def key(self) -> bytes:
        """The Kafka message key: the shard (:func:`shard_key`) of a version-3 event, else the
        visit id (:func:`event_key`)."""
        if self.shard is not None and self.shard_nside is not None:
            return shard_key(self.shard_nside, self.shard)
        return event_key(self.visit)

    def for_shard(self, nside: int, shard: int, shards: Sequence[int]) -> VisitEvent:
        """This event routed to ``shard`` of the footprint ``shards`` (schema version 3).

        Raises:
            ValueError: ``shard`` is not one of ``shards``.
        """
        footprint = tuple(sorted({int(s) for s in shards}))
        if int(shard) not in footprint:
            raise ValueError(f"visit {self.visit}: shard {shard} is not in its footprint")
        return dataclasses.replace(self, shard_nside=int(nside), shard=int(shard),
                                   shards=footprint, schema_version=SHARD_EVENT_VERSION)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this event (only the fields that are set)."""
        version = self.schema_version
        if self.butler_datasets is not None:
            version = max(version, BUTLER_EVENT_VERSION)
        if self.shard is not None:
            version = max(version, SHARD_EVENT_VERSION)
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
        if self.shard is not None:
            out["shard"] = {"nside": self.shard_nside, "pixel": self.shard}
            out["shards"] = list(self.shards)
        for name in ("finished_at", "published_at", "producer"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON (sorted keys, no NaN) -- the Kafka message value."""
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False).encode("utf-8")

    def describe(self) -> str:
        """Short human description for logs: ``apply visit 123`` (``... shard 32/1234``)."""
        if self.shard is not None:
            return f"{self.action} visit {self.visit} shard {self.shard_nside}/{self.shard}"
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
    return f"visit {visit}" if _is_int(visit) else "event"


def _is_int(value: Any) -> TypeGuard[int]:
    """A JSON integer (``true``/``false`` and ``7.0`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _time_problem(value: Any) -> str | None:
    """Why ``value`` is not an ISO 8601 time with a time zone, or None when it is one."""
    if not isinstance(value, str):
        return f"must be an ISO 8601 string, got {_shown(value)}"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return f"is not an ISO 8601 time ({_shown(value)}); use e.g. 2024-12-02T03:14:15Z"
    if parsed.tzinfo is None:
        return f"has no time zone ({_shown(value)}); append Z for UTC"
    return None


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
    the key to be the event's visit id (:func:`event_key`; its shard, :func:`shard_key`, for
    schema version 3), so a message without a key is refused like one with another key.

    Raises:
        MalformedEventError: everything :func:`parse_event` refuses, and a missing key.
    """
    event = parse_event(value, key)
    if key is None:
        if event.shard is not None:
            raise MalformedEventError(
                f"visit {event.visit}: message has no key; schema_version 3 events must be "
                f"keyed by their shard ({event.key!r}) so that every event of a shard stays in "
                "one partition, in order")
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
    levels of nesting), then validated by the shipped JSON Schema (:func:`schema_path`:
    versions 1 to 3, ``butler`` only from version 2 and instead of ``source_uris`` +
    ``metadata``, ``shard`` and ``shards`` in version 3 only) and the rules a schema cannot
    state: the key is the event's visit id (its shard in version 3), ``metadata.values.visit``
    is the event's visit, and the shards are pixels at the shard's nside, sorted, holding the
    event's shard.

    Raises:
        MalformedEventError: too large or too deeply nested, not UTF-8 JSON, not an object,
            unknown or missing fields, wrong types, a schema version this streamstars cannot
            read, or a key that is not the event's visit id (shard).  The message names the
            field (the first one in :data:`_REPORT_ORDER` when several are wrong) and the visit
            when it can, and shows offending values shortened.
    """
    if value is None:
        raise MalformedEventError("event has no value (tombstone or empty message)")
    if isinstance(value, str):
        value = value.encode("utf-8")
    data = loads_bounded(value)
    if not isinstance(data, dict):
        raise MalformedEventError(f"event must be a JSON object, got {type(data).__name__}")
    problems = _problems(data, key)
    if problems:
        raise MalformedEventError(min(problems)[2])
    meta = data.get("metadata") or {}
    butler = data.get("butler")
    shard = data.get("shard")
    return VisitEvent(
        action=cast(Action, data["action"]),
        visit=data["visit"],
        instrument=data.get("instrument", ""),
        band=data.get("band", ""),
        physical_filter=data.get("physical_filter", ""),
        source_uris=tuple(data.get("source_uris") or ()),
        metadata_uri=meta.get("visit_summary_uri"),
        metadata_values=meta.get("values"),
        finished_at=data.get("finished_at"),
        published_at=data.get("published_at"),
        producer=data.get("producer"),
        butler_datasets=None if butler is None else
        {name: tuple(ids) for name, ids in butler["datasets"].items()},
        butler_collections=() if butler is None else tuple(butler.get("collections", ())),
        shard_nside=None if shard is None else shard["nside"],
        shard=None if shard is None else shard["pixel"],
        shards=tuple(data.get("shards", ())),
        schema_version=data["schema_version"],
    )


# ---------------------------------------------------------------------------- validation
#: When an event breaks several rules, the first of these fields is named: what identifies
#: the event first (version, known fields, visit, action, key), then the fields in the order
#: an event lists them.  ``<unknown>`` stands for fields the schema does not know, ``<key>``
#: for the message key; ``<shard rule>`` for the rule tying ``shard`` and ``shards`` to schema
#: version 3; ``<butler rule>`` for the rule tying ``butler`` to schema versions 2 and 3 and
#: to apply/replace, ``<butler and files>`` for ``butler`` given with ``source_uris`` or
#: ``metadata``; fields not listed come last.
_REPORT_ORDER = ("schema_version", "<unknown>", "visit", "action", "<shard rule>", "shard",
                 "shards", "<key>", "instrument",
                 "band", "physical_filter", "<butler rule>", "butler", "<butler and files>",
                 "butler.datasets", "butler.collections", "source_uris", "metadata",
                 "finished_at", "published_at", "producer")
#: Fields whose message says what they must be also when they are absent (the others say
#: "missing required field").
_NAMED_WHEN_MISSING = ("schema_version", "visit", "action")
_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string",
               "array": "a list", "object": "an object", "boolean": "true or false",
               "null": "null"}


@functools.cache
def _schema() -> _Data:
    """The shipped JSON Schema (:func:`schema_path`), read once."""
    return json.loads(schema_path().read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@functools.cache
def _validator() -> Any:
    """The shipped JSON Schema, compiled once: ``integer`` is a JSON integer (not ``true``,
    not ``7.0``), ``date-time`` an ISO 8601 time with a time zone (what
    :meth:`datetime.fromisoformat` reads) and ``uuid`` what :class:`uuid.UUID` reads."""
    from jsonschema import FormatChecker, validators

    schema = _schema()
    base = validators.validator_for(schema)
    types = base.TYPE_CHECKER.redefine("integer", lambda _checker, value: _is_int(value))
    strict = validators.extend(base, type_checker=types)
    formats = FormatChecker(formats=())
    formats.checks("date-time")(lambda value: _time_problem(value) is None)
    formats.checks("uuid")(lambda value: not isinstance(value, str) or _is_uuid(value))
    return strict(schema, format_checker=formats)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@functools.cache
def _butler_rule() -> int:
    """The index in the schema's ``allOf`` of the rule that applies when ``butler`` is given."""
    rules = _schema()["allOf"]
    return next(i for i, rule in enumerate(rules) if rule["if"] == {"$ref": "#/$defs/has_butler"})


@functools.cache
def _shard_rule() -> int:
    """The index in the schema's ``allOf`` of the rule tying ``shard`` and ``shards`` to
    schema version 3."""
    rules = _schema()["allOf"]
    return next(i for i, rule in enumerate(rules) if rule["if"] == {"$ref": "#/$defs/version_3"})


def _problems(data: _Data, key: bytes | None) -> list[tuple[int, int, str]]:
    """Every rule ``data`` breaks, as ``(rank, sequence, message)``."""
    where = _where(data.get("visit"))
    found: list[tuple[str, str]] = []
    for error in _validator().iter_errors(data):
        found.extend(_describe(error, data, where))
    found.extend(_cross_field_problems(data, key, where))
    return [(_rank(name), n, message) for n, (name, message) in enumerate(found)]


def _rank(name: str) -> int:
    return _REPORT_ORDER.index(name) if name in _REPORT_ORDER else len(_REPORT_ORDER)


def _describe(error: Any, data: _Data, where: str) -> list[tuple[str, str]]:
    """``(field, message)`` of one schema error (a ``required`` error may name several)."""
    path = [str(p) for p in error.absolute_path]
    rule = list(error.schema_path)[:2]
    if rule == ["allOf", _butler_rule()]:
        return [_butler_rule_message(error, data, where)]
    if rule == ["allOf", _shard_rule()]:
        return [_shard_rule_message(error, data, where)]
    if path:
        describe = _FIELD_MESSAGES.get(path[0])
        # ranked by the field, or by the nested field when the report order names it
        name = ".".join(path[:2]) if ".".join(path[:2]) in _REPORT_ORDER else path[0]
        if describe is not None:
            return [(name, describe(data, where, path, error))]
        return [(name, _rule_message(error, path, where))]
    if error.validator == "required":
        found = []
        for name in (n for n in error.validator_value if n not in data):
            describe = _FIELD_MESSAGES[name] if name in _NAMED_WHEN_MISSING else _missing
            found.append((name, describe(data, where, [name], None)))
        return found
    if error.validator == "additionalProperties":
        unknown = ", ".join(sorted(set(data) - _TOP_KEYS))
        return [("<unknown>", f"{where}: unknown field(s) {unknown} in a schema_version "
                              f"{data.get('schema_version')} event")]
    return [("", _rule_message(error, path, where))]


def _rule_message(error: Any, path: list[str], where: str) -> str:
    """A message for any rule of the schema, naming the field by its dotted path."""
    name = ".".join(path)
    rule, expected = error.validator, error.validator_value
    if rule == "required":
        missing = [k for k in expected if k not in error.instance]
        return f"{where}: missing required field {'.'.join([*path, missing[0]])!r}"
    if rule == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"{where}: unknown field(s) {_shown(', '.join(unknown))} in {name!r}"
    if rule == "type":
        kinds = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_TYPE_NAMES.get(k, k) for k in kinds)
    elif rule == "minimum":
        wanted = f">= {expected}"
    elif rule == "enum":
        wanted = "one of " + ", ".join(map(str, expected))
    elif rule == "const":
        wanted = str(expected)
    elif rule in ("minLength", "pattern"):
        wanted = "a non-empty string"
    elif rule == "minItems":
        wanted = "a non-empty list"
    else:
        wanted = f"as the schema's {rule!r} rule says ({_shown(expected)})"
    return f"{where}: {name!r} must be {wanted}, got {_shown(error.instance)}"


def _missing(data: _Data, where: str, path: list[str], error: Any) -> str:
    return f"{where}: missing required field {path[0]!r}"


def _schema_version_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    version = data.get("schema_version")
    if not _is_int(version):
        return f"{where}: 'schema_version' must be an integer, got {_shown(version)}"
    return (f"{where}: schema_version {version} is not supported (this streamstars reads "
            f"1..{SCHEMA_VERSION}); upgrade the consumers before the producers")


def _butler_rule_message(error: Any, data: _Data, where: str) -> tuple[str, str]:
    """The rule of a ``butler`` field: schema version 2 or 3, apply or replace, no files."""
    if error.validator == "enum" and list(error.absolute_path) == ["schema_version"]:
        return ("<butler rule>", f"{where}: 'butler' needs schema_version "
                                 f"{BUTLER_EVENT_VERSION} or later, got "
                                 f"{_shown(data['schema_version'])}")
    if error.validator == "enum":  # action (retract)
        return ("<butler rule>", f"{where}: a retract event names no datasets ('butler')")
    return ("<butler and files>",
            f"{where}: give either 'butler' or 'source_uris' + 'metadata', not both")


def _shard_rule_message(error: Any, data: _Data, where: str) -> tuple[str, str]:
    """The rule of ``shard`` and ``shards``: both in schema version 3, neither before."""
    if error.validator == "required":
        missing = " and ".join(repr(n) for n in ("shard", "shards") if n not in data)
        return ("<shard rule>", f"{where}: a schema_version {SHARD_EVENT_VERSION} event needs "
                                f"{missing} (the shard it is for and the visit's footprint)")
    given = [repr(n) for n in ("shard", "shards") if n in data]
    verb = "needs" if len(given) == 1 else "need"
    return ("<shard rule>", f"{where}: {' and '.join(given)} {verb} schema_version "
                            f"{SHARD_EVENT_VERSION}, got {_shown(data.get('schema_version'))}")


def _shard_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    if len(path) > 1 and path[1] == "nside":
        return (f"{where}: 'shard.nside' must be a power of two from 1 to 2^29, got "
                f"{_shown(error.instance)}")
    if len(path) > 1 and path[1] == "pixel":
        return f"{where}: 'shard.pixel' must be a non-negative integer, got " \
               f"{_shown(error.instance)}"
    return (f"{where}: 'shard' must be {{\"nside\": N, \"pixel\": P}}, got "
            f"{_shown(data['shard'])}")


def _shards_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    if error.validator == "uniqueItems":
        return f"{where}: 'shards' lists a shard twice"
    return (f"{where}: 'shards' must be a non-empty list of non-negative integers, got "
            f"{_shown(data['shards'])}")


def _butler_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    raw = data["butler"]
    if len(path) == 1:
        return (f"{where}: 'butler' must be {{\"datasets\": {{TYPE: [UUID, ...]}}, "
                f"\"collections\": [...]}}, got {_shown(raw)}")
    if path[1] == "collections":
        return f"{where}: 'butler.collections' must be a list of strings"
    if len(path) == 2:
        return _datasets_message(raw["datasets"], where, error)
    name = f"butler.datasets.{path[2]}"
    if error.validator == "format":
        return f"{where}: {name!r} holds {_shown(error.instance)}, not a UUID"
    if error.validator == "uniqueItems":
        return f"{where}: {name!r} lists a UUID twice"
    if error.validator == "maxItems":
        return f"{where}: {name!r} must hold one UUID"
    return f"{where}: {name!r} must be a non-empty list of UUID strings"


def _datasets_message(datasets: Any, where: str, error: Any) -> str:
    if error.validator == "additionalProperties":
        unknown = ", ".join(sorted(set(datasets) - set(BUTLER_DATASET_TYPES)))
        return (f"{where}: 'butler.datasets' names unknown dataset type(s) {unknown[:200]}; "
                f"known: {', '.join(BUTLER_DATASET_TYPES)}")
    if error.validator == "required":
        return f"{where}: 'butler.datasets' lacks 'sourceTable_visit'"
    if error.validator == "oneOf":
        if ("visitSummary" in datasets) == ("visitTable" in datasets):
            return (f"{where}: 'butler.datasets' needs exactly one of 'visitSummary' and "
                    "'visitTable' (the visit's metadata)")
        return f"{where}: 'ccdVisitTable' only goes with 'visitTable'"
    return f"{where}: 'butler.datasets' must be an object"


def _visit_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    return f"event: 'visit' must be a non-negative integer, got {_shown(data.get('visit'))}"


def _action_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    return (f"{where}: 'action' must be one of {', '.join(ACTIONS)}, got "
            f"{_shown(data.get('action'))}")


def _text_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    return f"{where}: {path[0]!r} must be a non-empty string, got {_shown(data[path[0]])}"


def _uris_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    uris = data.get("source_uris")
    if uris is None:  # absent or null
        return _missing(data, where, path, None)
    if isinstance(uris, list) and uris and all(isinstance(u, str) and u for u in uris):
        return f"{where}: 'source_uris' lists a file twice"
    return f"{where}: 'source_uris' must be a non-empty list of strings, got {_shown(uris)}"


def _metadata_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    meta = data.get("metadata")
    if meta is None:  # absent or null
        return _missing(data, where, path, None)
    if len(path) == 1 or not isinstance(meta, dict) or len(meta) != 1:
        if isinstance(meta, dict) and len(meta) == 1:
            return (f"{where}: 'metadata' must hold 'visit_summary_uri' or 'values', got "
                    f"{str(next(iter(meta)))[:200]}")
        return (f"{where}: 'metadata' must be {{\"visit_summary_uri\": URI}} or "
                f"{{\"values\": {{...}}}}, got {_shown(meta)}")
    if path[1] == "visit_summary_uri":
        return f"{where}: 'metadata.visit_summary_uri' must be a non-empty string"
    if not isinstance(meta.get("values"), dict):
        return f"{where}: 'metadata.values' must be an object"
    return _rule_message(error, path, where)  # a rule inside the inline values


def _time_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    return f"{where}: {path[0]!r} {_time_problem(data[path[0]]) or 'is invalid'}"


def _producer_message(data: _Data, where: str, path: list[str], error: Any) -> str:
    return f"{where}: 'producer' must be a string"


_FIELD_MESSAGES: dict[str, Callable[[_Data, str, list[str], Any], str]] = {
    "schema_version": _schema_version_message,
    "visit": _visit_message,
    "action": _action_message,
    "instrument": _text_message,
    "band": _text_message,
    "physical_filter": _text_message,
    "source_uris": _uris_message,
    "metadata": _metadata_message,
    "finished_at": _time_message,
    "published_at": _time_message,
    "producer": _producer_message,
    "butler": _butler_message,
    "shard": _shard_message,
    "shards": _shards_message,
}


def _cross_field_problems(data: _Data, key: bytes | None,
                          where: str) -> list[tuple[str, str]]:
    """The rules a JSON Schema cannot state: the message key is the event's visit id (its
    shard in version 3), the inline metadata's ``visit`` is the event's visit, the shards are
    pixels at the shard's nside, sorted, holding the event's shard."""
    visit = data.get("visit")
    if not _is_int(visit) or visit < 0:
        return []  # the schema's error names the visit
    found = []
    shard = _valid_shard(data.get("shard"))
    if shard is not None:
        found.extend(_footprint_problems(shard, data.get("shards"), where))
        expected = shard_key(*shard)
        if key is not None and key != expected:
            found.append(("<key>", f"{where}: message key {_shown(key)} is not the shard key "
                                   f"{expected!r} of a schema_version 3 event"))
    elif key is not None and "shard" not in data and key != event_key(visit):
        found.append(("<key>", f"{where}: message key {_shown(key)} is not the visit id "
                               f"{event_key(visit)!r}"))
    meta = data.get("metadata")
    values = meta.get("values") if isinstance(meta, dict) else None
    inner = values.get("visit") if isinstance(values, dict) else None
    if _is_int(inner) and inner != visit:
        found.append(("metadata", f"{where}: 'metadata.values.visit' is {_shown(inner)}, not "
                                  "the event's visit"))
    return found


def _valid_shard(shard: Any) -> tuple[int, int] | None:
    """``(nside, pixel)`` of a ``shard`` field the schema accepts, else None (the schema's
    error names it)."""
    if not isinstance(shard, dict) or set(shard) != {"nside", "pixel"}:
        return None
    nside, pixel = shard["nside"], shard["pixel"]
    if not (_is_int(nside) and _is_int(pixel)) or pixel < 0:
        return None
    if not 1 <= nside <= MAX_SHARD_NSIDE or nside & (nside - 1):
        return None
    return nside, pixel


def _footprint_problems(shard: tuple[int, int], shards: Any,
                        where: str) -> list[tuple[str, str]]:
    """The pixel and the footprint of a valid ``shard``: pixels below ``12 nside^2``, the
    footprint sorted and holding the shard."""
    nside, pixel = shard
    n_pixels = 12 * nside * nside
    found = []
    if pixel >= n_pixels:
        found.append(("shard", f"{where}: 'shard.pixel' {pixel} is not a pixel at nside "
                               f"{nside} (0 .. {n_pixels - 1})"))
    if not isinstance(shards, list) or not all(_is_int(s) and s >= 0 for s in shards):
        return found  # the schema's error names 'shards'
    if shards and max(shards) >= n_pixels:
        found.append(("shards", f"{where}: 'shards' holds {max(shards)}, not a pixel at nside "
                                f"{nside} (0 .. {n_pixels - 1})"))
    elif shards != sorted(shards):
        found.append(("shards", f"{where}: 'shards' must be sorted"))
    elif pixel not in shards:
        found.append(("shards", f"{where}: 'shards' does not hold the event's shard {pixel}"))
    return found


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
