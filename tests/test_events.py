"""The visit event: round trip, validation errors, path containment (no broker needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from streamstars.errors import PermanentInputError
from streamstars.events import (
    MAX_EVENT_BYTES,
    MAX_EVENT_DEPTH,
    SCHEMA_VERSION,
    ForbiddenPathError,
    MalformedEventError,
    VisitEvent,
    inline_metadata,
    json_depth,
    metadata_for_event,
    parse_event,
    parse_message,
    path_to_uri,
    resolve_uri,
    schema_path,
    shard_key,
)
from streamstars.visit import VisitMetadata


def _meta(visit: int = 7) -> VisitMetadata:
    return VisitMetadata(
        visit=visit, physical_filter="r_57", band="r", telra=10.5, teldec=-30.25,
        telha=float("nan"), telrot=12.0, mjd=60600.123456789, exptime=30.0,
        detectors=(1, 2), psf_fwhm_detector=(0.7, -9999.0), instrument="LSSTCam",
        source="/data/visitTable.parquet",
    )


def _event(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "schema_version": 1, "action": "apply", "visit": 7, "instrument": "LSSTCam",
        "band": "r", "physical_filter": "r_57",
        "source_uris": ["file:///data/sourceTable_visit_7.parquet"],
        "metadata": {"visit_summary_uri": "/data/visitSummary_7.fits"},
        "finished_at": "2024-12-02T03:14:15Z",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_round_trip_and_key() -> None:
    event = VisitEvent(
        action="apply", visit=7, instrument="LSSTCam", band="r", physical_filter="r_57",
        source_uris=("/data/a.parquet",), metadata_values=metadata_for_event(_meta()),
        finished_at="2024-12-02T03:14:15Z",
    )
    back = parse_event(event.to_json(), key=b"7")
    assert back == event
    assert event.key == b"7"
    # Inline values written by the publisher come back bit-exact (NaN telha stays NaN).
    meta = inline_metadata(back.metadata_values or {})
    assert meta.to_json() == _meta().to_json()
    assert math.isnan(meta.telha)


def test_retract_needs_only_visit() -> None:
    event = parse_event(json.dumps({"schema_version": 1, "action": "retract", "visit": 9}))
    assert event.action == "retract" and event.visit == 9 and event.source_uris == ()


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"{not json", "not UTF-8 JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"visit": NaN}', "not UTF-8 JSON"),
        (json.dumps(_event(schema_version=4)).encode(),
         "visit 7: schema_version 4 is not supported (this streamstars reads 1..3); upgrade "
         "the consumers before the producers"),
        (json.dumps(_event(action="delete")).encode(), "'action' must be one of"),
        (json.dumps(_event(visit="7")).encode(), "non-negative integer"),
        (json.dumps(_event(source_uris=None)).encode(), "'source_uris'"),
        (json.dumps(_event(source_uris=[])).encode(), "non-empty list"),
        (json.dumps(_event(metadata={"x": 1})).encode(), "'metadata'"),
        (json.dumps(_event(finished_at="yesterday")).encode(), "ISO 8601"),
        (json.dumps(_event(finished_at="2024-12-02T03:14:15")).encode(), "time zone"),
        (json.dumps(_event(colour="red")).encode(), "unknown field(s) colour"),
        (json.dumps(_event(band="")).encode(), "'band'"),
    ],
)
def test_malformed_events_are_permanent(value: bytes, needle: str) -> None:
    with pytest.raises(MalformedEventError, match=None) as info:
        parse_event(value)
    assert needle in str(info.value)
    assert isinstance(info.value, PermanentInputError)


_VALUES = {"visit": 7, "physical_filter": "r_57", "band": "r", "telra": 1.0, "teldec": 2.0,
           "mjd": 60000.0, "exptime": 30.0}


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        # JSON integers only: neither true nor 7.0 is a visit or a schema version
        ({"visit": 7.0}, "event: 'visit' must be a non-negative integer, got 7.0"),
        ({"visit": True}, "event: 'visit' must be a non-negative integer, got True"),
        ({"visit": -1}, "event: 'visit' must be a non-negative integer, got -1"),
        ({"schema_version": 1.0}, "'schema_version' must be an integer, got 1.0"),
        ({"band": "  "}, "visit 7: 'band' must be a non-empty string, got '  '"),
        ({"metadata": None}, "visit 7: missing required field 'metadata'"),
        ({"metadata": {"x": 1, "y": 2}}, "'metadata' must be {\"visit_summary_uri\""),
        ({"metadata": {"values": []}}, "visit 7: 'metadata.values' must be an object"),
        ({"source_uris": ["a", "a"]}, "visit 7: 'source_uris' lists a file twice"),
        ({"published_at": "2024-12-02T03:14:15"}, "'published_at' has no time zone"),
        ({"producer": 3}, "visit 7: 'producer' must be a string"),
        # the inline values are checked by the schema too, naming the field by its path
        ({"metadata": {"values": dict(_VALUES, visit=8)}},
         "visit 7: 'metadata.values.visit' is 8, not the event's visit"),
        ({"metadata": {"values": dict(_VALUES, telra=None)}},
         "visit 7: 'metadata.values.telra' must be a number, got None"),
        ({"metadata": {"values": {k: v for k, v in _VALUES.items() if k != "mjd"}}},
         "visit 7: missing required field 'metadata.values.mjd'"),
        ({"metadata": {"values": dict(_VALUES, colour="red")}},
         "visit 7: unknown field(s) 'colour' in 'metadata.values'"),
        ({"metadata": {"values": dict(_VALUES, detectors=[1, "2"])}},
         "visit 7: 'metadata.values.detectors.1' must be an integer, got '2'"),
        # several problems: the first field in the event's order is named
        ({"band": 7, "finished_at": "x", "colour": 1}, "unknown field(s) colour"),
        ({"band": 7, "finished_at": "x"}, "visit 7: 'band' must be a non-empty string, got 7"),
    ],
)
def test_schema_errors_name_the_field(changes: dict[str, object], needle: str) -> None:
    data = {**_event(), **changes}
    with pytest.raises(MalformedEventError) as info:
        parse_event(json.dumps(data).encode(), key=b"7")
    assert needle in str(info.value)


def test_null_means_absent_where_it_did() -> None:
    """``null`` for source_uris, metadata and producer is read as absent (a retract may give
    them; an apply still needs source_uris and metadata)."""
    retract = {"schema_version": 1, "action": "retract", "visit": 9, "source_uris": None,
               "metadata": None, "producer": None}
    assert parse_event(json.dumps(retract)).to_dict() == \
        {"schema_version": 1, "action": "retract", "visit": 9}
    assert parse_event(json.dumps(_event(producer="p") | {"producer": None})).producer is None
    with pytest.raises(MalformedEventError, match="missing required field 'source_uris'"):
        parse_event(json.dumps(_event() | {"source_uris": None}))


def test_key_must_match_visit() -> None:
    with pytest.raises(MalformedEventError, match="message key"):
        parse_event(json.dumps(_event()).encode(), key=b"8")


def test_inline_values_validated() -> None:
    with pytest.raises(PermanentInputError, match="missing required key"):
        inline_metadata({"visit": 7, "band": "r"})


def test_resolve_uri_inside_and_outside(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    target = root / "sub" / "sourceTable_visit_1.parquet"
    target.write_bytes(b"x")
    outside = tmp_path / "secret.parquet"
    outside.write_bytes(b"x")
    (root / "link.parquet").symlink_to(outside)
    (tmp_path / "alias").symlink_to(root)

    assert resolve_uri(str(target), [root]) == target.resolve()
    assert resolve_uri(path_to_uri(target), [root]) == target.resolve()
    assert resolve_uri("file://localhost" + str(target), [root]) == target.resolve()
    # A root given through a symlink still contains its files.
    assert resolve_uri(str(target), [tmp_path / "alias"]) == target.resolve()
    # Paths with spaces survive the URI round trip.
    spaced = root / "with space.parquet"
    spaced.write_bytes(b"x")
    assert resolve_uri(path_to_uri(spaced), [root]) == spaced.resolve()

    bad = [
        str(outside),
        str(root / ".." / "secret.parquet"),
        str(root / "link.parquet"),  # symlink escaping the root
        "s3://bucket/sourceTable_visit_1.parquet",
        "http://127.0.0.1/x.parquet",
        "file://otherhost" + str(target),
        "relative/path.parquet",
        str(target) + "\x00",
        str(tmp_path / "data2" / "x.parquet"),  # sibling with a common name prefix
    ]
    (tmp_path / "data2").mkdir()
    for uri in bad:
        with pytest.raises(ForbiddenPathError):
            resolve_uri(uri, [root])
    with pytest.raises(ForbiddenPathError, match="no --data-root"):
        resolve_uri(str(target), [])


def test_schema_file_matches_parser() -> None:
    schema = json.loads(schema_path().read_text())
    assert schema["properties"]["schema_version"]["enum"] == list(range(1, SCHEMA_VERSION + 1))
    assert set(schema["properties"]["action"]["enum"]) == {"apply", "replace", "retract"}
    # Every field the parser knows is in the schema and vice versa.
    from streamstars.events import _TOP_KEYS

    assert set(schema["properties"]) == _TOP_KEYS
    from streamstars.events import BUTLER_DATASET_TYPES

    datasets = schema["properties"]["butler"]["properties"]["datasets"]["properties"]
    assert tuple(datasets) == BUTLER_DATASET_TYPES


def test_schema_validates_examples() -> None:
    import jsonschema

    schema = json.loads(schema_path().read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_event(), schema)
    jsonschema.validate({"schema_version": 1, "action": "retract", "visit": 3}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_event(source_uris=None), schema)


def test_key_is_required_on_kafka_messages() -> None:
    value = json.dumps(_event()).encode()
    assert parse_message(value, b"7").visit == 7
    with pytest.raises(MalformedEventError, match="message has no key"):
        parse_message(value, None)
    for key in (b"", b"07", b"7 ", b"8"):
        with pytest.raises(MalformedEventError, match="is not the visit id"):
            parse_message(value, key)


@pytest.mark.parametrize(
    "text",
    [
        "", "1", "{}", "[[]]", '{"a": "[[[["}', '{"a": "\\\\", "b": [[1]]}',
        '{"a": "\\"[[[", "b": {"c": [{}]}}', '["\\\\\\"]", [[["x"]]]]',
        json.dumps({"metadata": {"values": {"detectors": [1, 2]}}}),
    ],
)
def test_json_depth_matches_the_decoded_depth(text: str) -> None:
    def depth(value: object) -> int:
        if isinstance(value, dict):
            return 1 + max((depth(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return 1 + max((depth(v) for v in value), default=0)
        return 0

    expected = depth(json.loads(text)) if text else 0
    assert json_depth(text.encode()) == expected


def test_deep_or_large_events_are_refused_before_decoding() -> None:
    with pytest.raises(MalformedEventError, match="100000 levels deep"):
        parse_event(b"[" * 100_000 + b"]" * 100_000)
    assert MAX_EVENT_DEPTH == 16

    def nested(levels: int) -> bytes:  # an event whose 'producer' nests to ``levels``
        brackets = "[" * (levels - 1) + "]" * (levels - 1)
        return json.dumps(_event(producer="x")).replace('"x"', brackets).encode()

    with pytest.raises(MalformedEventError, match="17 levels deep"):
        parse_event(nested(17), b"7")
    with pytest.raises(MalformedEventError, match="'producer' must be a string"):
        parse_event(nested(16), b"7")  # deep enough to be decoded, then refused
    with pytest.raises(MalformedEventError, match="exceeds"):
        parse_event(b" " * (MAX_EVENT_BYTES + 1))


def test_error_messages_do_not_echo_huge_values() -> None:
    huge = ["x" * 1000] * 10_000
    with pytest.raises(MalformedEventError) as info:
        parse_event(json.dumps(_event(source_uris=huge, band=7)).encode())
    assert len(str(info.value)) < 1000


# ------------------------------------------------------------------ Butler events (version 2)
_SRC = "0190c8a2-5bd1-7c4a-9a1e-3f2b6a7d8e90"
_SUM = "0190c8a2-5bd1-7c4a-9a1e-3f2b6a7d8e91"


def _butler_event(**changes: object) -> dict[str, object]:
    base = _event(schema_version=2, butler={
        "datasets": {"sourceTable_visit": [_SRC], "visitSummary": [_SUM]},
        "collections": ["LSSTCam/runs/nightly"]})
    del base["source_uris"], base["metadata"]
    base.update(changes)
    return base


def test_butler_event_round_trip() -> None:
    event = parse_event(json.dumps(_butler_event()))
    assert event.butler_datasets == {"sourceTable_visit": (_SRC,), "visitSummary": (_SUM,)}
    assert event.butler_collections == ("LSSTCam/runs/nightly",)
    assert event.source_uris == () and event.metadata_uri is None
    assert json.loads(event.to_json()) == _butler_event()


def test_file_events_are_still_written_as_version_1() -> None:
    """Consumers that read only version 1 keep reading directory events."""
    event = VisitEvent(action="apply", visit=7, instrument="LSSTCam", band="r",
                       physical_filter="r_57", source_uris=("/d/s.parquet",),
                       metadata_uri="/d/v.fits", finished_at="2024-12-02T03:14:15Z")
    assert json.loads(event.to_json())["schema_version"] == 1
    butler = VisitEvent(action="apply", visit=7, instrument="LSSTCam", band="r",
                        physical_filter="r_57", finished_at="2024-12-02T03:14:15Z",
                        butler_datasets={"sourceTable_visit": (_SRC,), "visitTable": (_SUM,)})
    assert json.loads(butler.to_json())["schema_version"] == 2


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"schema_version": 1}, "needs schema_version 2 or later"),
        ({"source_uris": ["/d/s.parquet"]}, "not both"),
        ({"butler": {"datasets": {"visitSummary": [_SUM]}}}, "lacks 'sourceTable_visit'"),
        ({"butler": {"datasets": {"sourceTable_visit": [_SRC]}}}, "exactly one of"),
        ({"butler": {"datasets": {"sourceTable_visit": ["nope"], "visitSummary": [_SUM]}}},
         "not a UUID"),
        ({"butler": {"datasets": {"sourceTable_visit": [_SRC], "calexp": [_SUM],
                                  "visitSummary": [_SUM]}}}, "unknown dataset type(s) calexp"),
        ({"butler": {"datasets": {"sourceTable_visit": [_SRC], "visitSummary": [_SUM, _SRC]}}},
         "must hold one UUID"),
        ({"butler": {"datasets": {"sourceTable_visit": [_SRC], "visitSummary": [_SUM]},
                     "run": "x"}}, "'butler' must be"),
        ({"butler": {"datasets": {"sourceTable_visit": [_SRC, _SRC], "visitSummary": [_SUM]}}},
         "lists a UUID twice"),
        ({"butler": {"datasets": {"sourceTable_visit": [_SRC], "visitSummary": [_SUM],
                                  "ccdVisitTable": [_SRC]}}}, "only goes with 'visitTable'"),
        ({"butler": {"datasets": {"sourceTable_visit": [_SRC], "visitSummary": [_SUM]},
                     "collections": "c"}}, "'butler.collections' must be a list of strings"),
        ({"action": "retract"}, "a retract event names no datasets"),
        ({"schema_version": 1, "source_uris": ["/d/s.parquet"]},
         "needs schema_version 2 or later"),
        ({"source_uris": ["/d/s.parquet"], "butler": {"datasets": {}}}, "not both"),
    ],
)
def test_malformed_butler_events(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(MalformedEventError) as info:
        parse_event(json.dumps(_butler_event(**changes)))
    assert needle in str(info.value)


def test_schema_validates_butler_events() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    schema = json.loads(schema_path().read_text())
    jsonschema.validate(_butler_event(), schema)
    for bad in (_butler_event(schema_version=1), _butler_event(source_uris=["/d/s.parquet"]),
                _butler_event(butler={"datasets": {"sourceTable_visit": [_SRC]}})):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_null_butler_is_absent() -> None:
    """``"butler": null`` is a file event (as ``null`` is absent for the other fields)."""
    event = parse_event(json.dumps(_event(schema_version=2, butler=None)))
    assert event.butler_datasets is None and event.source_uris
    with pytest.raises(MalformedEventError, match="missing required field 'source_uris'"):
        parse_event(json.dumps(_butler_event(butler=None)))


# ------------------------------------------------------------ shard events (version 3)
def _shard_event(**changes: object) -> dict[str, object]:
    base = _event(schema_version=3, shard={"nside": 32, "pixel": 1234},
                  shards=[1233, 1234, 1236])
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_shard_event_round_trip_and_key() -> None:
    """A version-1 (or version-2) event routed to one shard: version 3, keyed by the shard."""
    event = parse_message(json.dumps(_shard_event()).encode(), b"32/1234")
    assert (event.shard_nside, event.shard, event.shards) == (32, 1234, (1233, 1234, 1236))
    assert event.key == shard_key(32, 1234) == b"32/1234"
    assert event.describe() == "apply visit 7 shard 32/1234"
    assert json.loads(event.to_json()) == _shard_event()
    butler = {k: v for k, v in _butler_event(schema_version=3).items()}
    butler.update(shard={"nside": 1, "pixel": 0}, shards=[0, 3])
    assert parse_message(json.dumps(butler).encode(), b"1/0").butler_datasets is not None
    # routing a file event to a shard of its footprint
    plain = VisitEvent(action="apply", visit=7, instrument="LSSTCam", band="r",
                       physical_filter="r_57", source_uris=("/d/s.parquet",),
                       metadata_uri="/d/v.fits", finished_at="2024-12-02T03:14:15Z")
    routed = plain.for_shard(32, 1234, [1236, 1234, 1233])
    assert routed.key == b"32/1234" and json.loads(routed.to_json())["schema_version"] == 3
    assert parse_message(routed.to_json(), routed.key) == routed
    assert plain.key == b"7" and json.loads(plain.to_json())["schema_version"] == 1
    with pytest.raises(ValueError, match="shard 5 is not in its footprint"):
        plain.for_shard(32, 5, [1234])
    retract = VisitEvent(action="retract", visit=9).for_shard(32, 5, [5])
    assert parse_message(retract.to_json(), b"32/5") == retract


def test_shard_event_key_is_the_shard() -> None:
    value = json.dumps(_shard_event()).encode()
    for key in (b"7", b"32/1233", b"32/01234", b"5/1234", b"32/1234 ", b""):
        with pytest.raises(MalformedEventError, match="is not the shard key b'32/1234'"):
            parse_message(value, key)
    with pytest.raises(MalformedEventError, match="keyed by their shard"):
        parse_message(value, None)
    # versions 1 and 2 keep the visit id as their key
    with pytest.raises(MalformedEventError, match="is not the visit id"):
        parse_message(json.dumps(_event()).encode(), b"32/1234")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"shards": None}, "visit 7: a schema_version 3 event needs 'shards'"),
        ({"shard": None, "shards": None},
         "visit 7: a schema_version 3 event needs 'shard' and 'shards'"),
        ({"schema_version": 1}, "visit 7: 'shard' and 'shards' need schema_version 3, got 1"),
        ({"schema_version": 2, "shards": None}, "'shard' needs schema_version 3, got 2"),
        ({"shard": {"nside": 33, "pixel": 5}},
         "'shard.nside' must be a power of two from 1 to 2^29, got 33"),
        ({"shard": {"nside": 1 << 30, "pixel": 5}}, "'shard.nside' must be a power of two"),
        ({"shard": {"nside": 32, "pixel": -1}},
         "'shard.pixel' must be a non-negative integer, got -1"),
        ({"shard": {"nside": 32, "pixel": 12288}, "shards": [12288]},
         "'shard.pixel' 12288 is not a pixel at nside 32 (0 .. 12287)"),
        ({"shard": {"nside": 32}}, "'shard' must be {\"nside\": N, \"pixel\": P}"),
        ({"shard": {"nside": 32, "pixel": 1234, "order": 5}}, "'shard' must be {"),
        ({"shard": "32/1234"}, "'shard' must be {"),
        ({"shards": []}, "'shards' must be a non-empty list of non-negative integers"),
        ({"shards": [1234, "1235"]}, "'shards' must be a non-empty list"),
        ({"shards": [1234, 1234]}, "visit 7: 'shards' lists a shard twice"),
        ({"shards": [1236, 1234]}, "visit 7: 'shards' must be sorted"),
        ({"shards": [1233, 1236]}, "visit 7: 'shards' does not hold the event's shard 1234"),
        ({"shards": [1234, 99999]}, "'shards' holds 99999, not a pixel at nside 32"),
    ],
)
def test_malformed_shard_events(changes: dict[str, object], needle: str) -> None:
    data = _shard_event()
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    with pytest.raises(MalformedEventError) as info:
        parse_event(json.dumps(data))
    assert needle in str(info.value)


def test_schema_validates_shard_events() -> None:
    import jsonschema

    schema = json.loads(schema_path().read_text())
    jsonschema.validate(_shard_event(), schema)
    butler = _butler_event(schema_version=3, shard={"nside": 1, "pixel": 0}, shards=[0])
    jsonschema.validate(butler, schema)
    for bad in (_shard_event(shards=None), _shard_event(schema_version=2),
                _event(shard={"nside": 32, "pixel": 1}),
                _shard_event(shard={"nside": 3, "pixel": 1}), _shard_event(shards=[1, 1])):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_version_3_says_what_consumers_of_versions_1_and_2_said() -> None:
    """Consumers built before version 3 refuse it with the message of any unknown version
    (checked with the parser of those consumers: "visit 7: schema_version 3 is not supported
    (this streamstars reads 1..2); upgrade the consumers before the producers", a
    malformed_event dead letter); this parser says the same of version 4, by the same code."""
    with pytest.raises(MalformedEventError) as info:
        parse_message(json.dumps(_shard_event(schema_version=4)).encode(), b"32/1234")
    assert str(info.value) == ("visit 7: schema_version 4 is not supported (this streamstars "
                               "reads 1..3); upgrade the consumers before the producers")
