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
        (json.dumps(_event(schema_version=3)).encode(), "schema_version 3 is not supported"),
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


def test_schema_validates_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    schema = json.loads(schema_path().read_text())
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
        ({"schema_version": 1}, "needs schema_version 2"),
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
