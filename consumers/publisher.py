"""``streamstars publish``: visit events from a repository, once or by watching it.

:func:`publish_repo` sends one ``apply`` event per visit found by the same discovery as
``backfill`` (:func:`streamstars.io.discover.discover_repo`), in visit order.

:func:`watch_repo` polls the repository and publishes an event for each visit whose files are
complete: discovery could read the parquet footer and the visit column, a metadata source was
found, and the size and modification time of its files did not change between two consecutive
polls.  A small JSON state file records what was published (visit -> signature of its files and
metadata), written atomically after the broker acknowledged the events, so that a restarted
watcher publishes no duplicates.  A visit whose files change after publication is published
again as a ``replace`` event.  (A crash between the broker's acknowledgement and the state-file
write can re-send one batch; the consumer treats such duplicates as counted no-ops.)

**Routing by shard** (a :class:`ShardRouting`, ``publish --partitions P`` or ``--shard-nside``):
every visit event becomes one schema-version-3 event per shard of the visit's footprint
(:mod:`streamstars.footprint`), keyed by the shard (``b"32/1234"``) and produced to the
partition Kafka's Java default partitioner gives that key
(:func:`~streamstars.consumers.partitioner.kafka_partition`), so that every event of a shard is
in one partition, in order, and anyone can compute which.  The topic is created with ``P``
partitions when it does not exist (:func:`ensure_topic`); an existing topic keeps its own
partitions.  A ``replace`` also goes to the shards the visit was published to before (the
watcher remembers them), so that a shard the visit left drops its old observations.  Without
routing, events are written as versions 1/2, keyed by visit, exactly as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamstars import __version__
from streamstars.errors import ConfigError, StreamstarsError
from streamstars.events import (
    Action,
    VisitEvent,
    metadata_for_event,
    now_iso,
    path_to_uri,
)
from streamstars.footprint import (
    DEFAULT_SLACK_ARCSEC,
    FootprintFinder,
    ShardSpec,
    VisitFootprint,
)
from streamstars.ingest import file_signature
from streamstars.io.discover import DiscoveredVisit, RepoInventory, discover_repo
from streamstars.staging import write_json_atomic

from .partitioner import kafka_partition

__all__ = [
    "PublishSummary",
    "ShardRouting",
    "current_partitions",
    "TopicError",
    "ensure_topic",
    "event_for_visit",
    "events_for_inventory",
    "make_producer",
    "publish_events",
    "publish_repo",
    "shard_events",
    "topic_partitions",
    "watch_repo",
]

log = logging.getLogger("streamstars.publish")

_FITS = re.compile(r"\.fits?(\.gz)?$", re.IGNORECASE)
PRODUCER_NAME = f"streamstars-publish/{__version__}"


class TopicError(ConfigError):
    """The topic cannot be used for shard events: absent without ``--partitions``, or its
    metadata cannot be read."""


@dataclass(frozen=True)
class ShardRouting:
    """How events are routed to shards (schema version 3).

    Attributes:
        spec: the consumers' ``shardNside`` and ``shardMargin``.
        partitions: the partitions to create the topic with when it does not exist (None:
            the topic must exist).
        slack_arcsec: how far a source may lie outside its detector's corners
            (:data:`streamstars.footprint.DEFAULT_SLACK_ARCSEC`).
    """

    spec: ShardSpec
    partitions: int | None = None
    slack_arcsec: float = DEFAULT_SLACK_ARCSEC

    def describe(self) -> dict[str, Any]:
        """The routing as recorded in a watch state file."""
        return {"schema_version": 3, "shardNside": self.spec.nside,
                "shardMargin": self.spec.margin_arcsec}


@dataclass
class PublishSummary:
    """What a publication sent.

    Attributes:
        published: the visits published, in order.
        skipped: visits not published, with the reason.
        problems: discovery problems.
        seconds: wall time.
        events: messages produced (one per visit, or per (visit, shard) with routing).
        partitions: the topic's partitions (with routing), else None.
        footprints: the footprint of each published visit (with routing).
    """

    published: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    events: int = 0
    partitions: int | None = None
    footprints: dict[int, VisitFootprint] = field(default_factory=dict)


def _finished_at(meta_mjd: float, exptime: float) -> str:
    """End of the exposure (midpoint MJD TAI + exptime/2) as UTC ISO 8601."""
    from astropy.time import Time, TimeDelta

    end = Time(meta_mjd, format="mjd", scale="tai") + TimeDelta(exptime / 2.0, format="sec")
    return str(end.utc.isot) + "Z"


def event_for_visit(
    entry: DiscoveredVisit, action: Action = "apply", instrument: str | None = None
) -> VisitEvent:
    """The event announcing one discovered visit (must have source tables and metadata).

    The metadata travels as the visitSummary URI when it came from a visitSummary FITS file,
    otherwise inline (every :class:`~streamstars.visit.VisitMetadata` field, so the consumer
    uses exactly what ``backfill`` would).
    """
    meta = entry.metadata
    if meta is None or not entry.source_paths:
        raise ValueError(f"visit {entry.visit} has no source table or no metadata")
    metadata_uri = None
    metadata_values = None
    if entry.metadata_path is not None and _FITS.search(entry.metadata_path.name):
        metadata_uri = path_to_uri(entry.metadata_path)
    else:
        metadata_values = metadata_for_event(meta)
    try:
        finished = _finished_at(meta.mjd, meta.exptime)
    except Exception:  # noqa: BLE001 - odd metadata: fall back to the file time
        newest = max(p.stat().st_mtime for p in entry.source_paths)
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest))
    return VisitEvent(
        action=action,
        visit=entry.visit,
        instrument=instrument or meta.instrument or "unknown",
        band=meta.band,
        physical_filter=meta.physical_filter,
        source_uris=tuple(path_to_uri(p) for p in entry.source_paths),
        metadata_uri=metadata_uri,
        metadata_values=metadata_values,
        finished_at=finished,
        published_at=now_iso(),
        producer=PRODUCER_NAME,
    )


def events_for_inventory(
    inventory: RepoInventory, instrument: str | None = None
) -> tuple[list[VisitEvent], dict[int, str]]:
    """Events for every publishable visit (visit order) and the reasons others were skipped."""
    events: list[VisitEvent] = []
    skipped: dict[int, str] = {}
    for visit, entry in inventory.visits.items():
        if not entry.source_paths:
            skipped[visit] = "metadata but no source table"
        elif entry.metadata is None:
            skipped[visit] = entry.metadata_error or "no visit metadata found"
        else:
            events.append(event_for_visit(entry, instrument=instrument))
    return events, skipped


def make_producer(bootstrap: str, kafka_config: Mapping[str, str] | None = None) -> Producer:
    """A confluent-kafka Producer: client settings from the properties file, then bootstrap."""
    settings: dict[str, Any] = {"acks": "all", "linger.ms": 5}
    settings.update(kafka_config or {})
    settings["bootstrap.servers"] = bootstrap
    return Producer(settings)


def topic_partitions(client: Producer | Any, topic: str, timeout: float = 10.0) -> int | None:
    """The number of partitions of ``topic`` (None when it does not exist), from the
    metadata of a Producer or an AdminClient.

    Raises:
        TopicError: the broker cannot be asked, or names an error for the topic.
    """
    try:
        # the metadata of every topic: asking for one topic lets a broker that auto-creates
        # topics create it, with its default partition count
        metadata = client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise TopicError(f"cannot read the metadata of topic {topic}: {exc}") from exc
    found = metadata.topics.get(topic)
    if found is None or (found.error is not None
                         and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        return None
    if found.error is not None:
        raise TopicError(f"topic {topic}: {found.error}")
    return len(found.partitions) or None


def ensure_topic(bootstrap: str, topic: str, partitions: int | None,
                 kafka_config: Mapping[str, str] | None = None, timeout: float = 30.0) -> int:
    """The number of partitions of ``topic``, created with ``partitions`` partitions (and the
    broker's default replication) when it does not exist.  An existing topic keeps its
    partitions (logged; a different ``partitions`` is noted and ignored).

    Raises:
        TopicError: the topic does not exist and ``partitions`` is None, it cannot be
            created, or it does not appear within ``timeout`` seconds.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({**(kafka_config or {}), "bootstrap.servers": bootstrap})
    existing = topic_partitions(admin, topic)
    if existing is None:
        if partitions is None:
            raise TopicError(f"topic {topic} does not exist: give --partitions P to create it "
                             "with P partitions (shard events are spread over them)")
        future = admin.create_topics([NewTopic(topic, num_partitions=partitions)])[topic]
        try:
            future.result(timeout)
            log.info("created topic %s with %d partition(s)", topic, partitions)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {topic} with {partitions} "
                                 f"partition(s): {exc}") from exc
        deadline = time.monotonic() + timeout
        while (existing := topic_partitions(admin, topic)) is None:
            if time.monotonic() > deadline:
                raise TopicError(f"topic {topic} did not appear within {timeout:g} s")
            time.sleep(0.1)
    if partitions is not None and existing != partitions:
        log.warning("topic %s already exists with %d partition(s): it keeps them (--partitions "
                    "%d ignored; add partitions with Kafka's tools, see docs/operations.md)",
                    topic, existing, partitions)
    else:
        log.info("topic %s has %d partition(s)", topic, existing)
    return existing


def shard_events(event: VisitEvent, footprint: VisitFootprint, nside: int,
                 also: Iterable[int] = ()) -> list[VisitEvent]:
    """``event`` routed to every shard of ``footprint`` (schema version 3), in shard order;
    ``also``: shards the visit was published to before (a ``replace`` reaches them too, so
    that they drop its old observations), added to the footprint."""
    shards = sorted({*footprint.shards, *also})
    return [event.for_shard(nside, shard, shards) for shard in shards]


def publish_events(
    producer: Producer, topic: str, events: Iterable[VisitEvent], timeout: float = 60.0,
    partitions: int | None = None,
) -> list[int]:
    """Produce events, wait for every acknowledgement, return the visit of each event.

    Events of versions 1/2 are keyed by visit id and partitioned by the producer; events
    routed to a shard (version 3) are keyed by the shard and produced to
    ``kafka_partition(key, partitions)``.

    Raises:
        RuntimeError: a delivery failed or did not complete within ``timeout``.
        ValueError: a shard event without ``partitions``.
    """
    errors: list[str] = []
    sent: list[int] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(f"key {msg.key()!r}: {err}")

    for event in events:
        extra: dict[str, Any] = {}
        if event.shard is not None:
            if partitions is None:
                raise ValueError(f"{event.describe()}: shard events need the topic's "
                                 "partition count")
            extra["partition"] = kafka_partition(event.key, partitions)
        while True:
            try:
                producer.produce(
                    topic, key=event.key, value=event.to_json(), on_delivery=on_delivery,
                    **extra,
                )
                break
            except BufferError:
                producer.poll(0.1)
        sent.append(event.visit)
    left = producer.flush(timeout)
    if left or errors:
        raise RuntimeError(
            f"publishing to {topic} failed: {left} event(s) undelivered; errors: {errors[:5]}"
        )
    return sent


def _routed(events: list[VisitEvent], inventory: RepoInventory, finder: FootprintFinder,
            skipped: dict[int, str], previous: Mapping[int, Iterable[int]] | None = None
            ) -> tuple[list[VisitEvent], dict[int, VisitFootprint]]:
    """Each event routed to the shards of its visit's footprint (and, for a ``replace``, the
    shards of ``previous``); a visit whose footprint cannot be computed is moved to
    ``skipped`` with the reason."""
    out: list[VisitEvent] = []
    footprints: dict[int, VisitFootprint] = {}
    for event in events:
        try:
            footprint = finder.of_entry(inventory.visits[event.visit])
        except (StreamstarsError, OSError) as exc:
            skipped[event.visit] = f"footprint not computed: {exc}"
            continue
        if footprint.note:
            log.info("visit %d: footprint from its sources (%s)", event.visit, footprint.note)
        also = (previous or {}).get(event.visit, ()) if event.action == "replace" else ()
        routed = shard_events(event, footprint, finder.spec.nside, also)
        footprints[event.visit] = dataclasses.replace(
            footprint, shards=tuple(e.shard for e in routed if e.shard is not None))
        out.extend(routed)
    return out, footprints


def publish_repo(
    root: str | Path,
    bootstrap: str,
    topic: str,
    kafka_config: Mapping[str, str] | None = None,
    *,
    reference_ccd: int = 40,
    instrument: str | None = None,
    routing: ShardRouting | None = None,
) -> PublishSummary:
    """Publish one ``apply`` event per visit of ``root`` in visit order -- with ``routing``,
    one per (visit, shard of its footprint), keyed by shard, after making sure the topic
    exists (:func:`ensure_topic`).

    Visits without source tables or metadata (or, with routing, whose footprint cannot be
    computed) are not published; they are listed in :attr:`PublishSummary.skipped` (and
    logged), like the files discovery could not use.

    Raises:
        TopicError: with routing, the topic is absent and ``routing.partitions`` is None.
    """
    start = time.monotonic()
    partitions = None if routing is None else \
        ensure_topic(bootstrap, topic, routing.partitions, kafka_config)
    inventory = discover_repo(root, reference_ccd=reference_ccd)
    events, skipped = events_for_inventory(inventory, instrument=instrument)
    footprints: dict[int, VisitFootprint] = {}
    if routing is not None:
        finder = FootprintFinder(routing.spec, routing.slack_arcsec)
        events, footprints = _routed(events, inventory, finder, skipped)
    for problem in inventory.problems:
        log.warning("discovery: %s", problem)
    for visit, why in skipped.items():
        log.warning("visit %d not published: %s", visit, why)
    producer = make_producer(bootstrap, kafka_config)
    sent = publish_events(producer, topic, events, partitions=partitions)
    published = list(dict.fromkeys(sent))
    log.info("published %d event(s) of %d visit(s) to %s", len(sent), len(published), topic)
    return PublishSummary(published, skipped, inventory.problems, time.monotonic() - start,
                          len(sent), partitions, footprints)


# --------------------------------------------------------------------------------- watching
def visit_signature(entry: DiscoveredVisit) -> str:
    """Signature of a visit's inputs: its source files (size, mtime) and metadata values.

    Shared metadata files (a visitTable listing many visits) enter through the visit's own
    metadata values only, so that a new visit appended to them does not change older visits.
    """
    parts: list[Any] = file_signature(entry.source_paths)
    if entry.metadata_path is not None and _FITS.search(entry.metadata_path.name):
        parts.extend(file_signature([entry.metadata_path]))
    if entry.metadata is not None:
        parts.append(entry.metadata.to_json())
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class WatchState:
    """The watcher's memory (a JSON file, format 1): visit -> signature of what was published;
    with routing also visit -> the shards it was published to (``shards``) and the routing
    (``routing``), keys that readers of the older file ignore."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.published: dict[int, str] = {}
        self.shards: dict[int, list[int]] = {}
        self.routing: dict[str, Any] | None = None
        if path.exists():
            data = json.loads(path.read_text())
            self.published = {int(k): str(v) for k, v in data.get("published", {}).items()}
            self.shards = {int(k): [int(s) for s in v]
                           for k, v in data.get("shards", {}).items()}
            self.routing = data.get("routing")

    def save(self) -> None:
        """Write atomically (:func:`~streamstars.staging.write_json_atomic`)."""
        payload: dict[str, Any] = {
            "format": 1, "published": {str(k): v for k, v in sorted(self.published.items())}}
        if self.shards or self.routing is not None:
            payload["shards"] = {str(k): v for k, v in sorted(self.shards.items())}
            payload["routing"] = self.routing
        write_json_atomic(self.path, payload)


def watch_repo(
    root: str | Path,
    bootstrap: str,
    topic: str,
    state_file: str | Path,
    kafka_config: Mapping[str, str] | None = None,
    *,
    poll_seconds: float = 30.0,
    reference_ccd: int = 40,
    instrument: str | None = None,
    stop: threading.Event | None = None,
    max_polls: int | None = None,
    on_publish: Callable[[list[int]], None] | None = None,
    routing: ShardRouting | None = None,
) -> WatchState:
    """Poll ``root`` and publish each visit once its files are complete and stable.

    A visit is published when discovery reads it (parquet footer and visit column readable,
    metadata found) and its signature is the same on two consecutive polls.  With
    ``routing``, as one event per (visit, shard) (see the module docstring; the topic's
    partition count is read again at every poll that publishes).  Stops when ``stop`` is set
    or after ``max_polls`` polls.

    Raises:
        TopicError: with routing, the topic is absent and ``routing.partitions`` is None.
    """
    state = WatchState(Path(state_file))
    producer = make_producer(bootstrap, kafka_config)
    partitions = None
    finder = None
    if routing is not None:
        partitions = ensure_topic(bootstrap, topic, routing.partitions, kafka_config)
        finder = FootprintFinder(routing.spec, routing.slack_arcsec)
        if state.routing not in (None, routing.describe()):
            log.warning("%s was written by a watcher routing with %s; now %s: visits published "
                        "before are not published again", state_file, state.routing,
                        routing.describe())
            state.shards = {}
        state.routing = routing.describe()
    warned: dict[int, str] = {}
    stop = stop or threading.Event()
    previous: dict[int, str] = {}
    polls = 0
    log.info("watching %s every %.1f s (state %s, %d visit(s) already published)",
             root, poll_seconds, state_file, len(state.published))
    while not stop.is_set():
        polls += 1
        inventory = discover_repo(root, reference_ccd=reference_ccd)
        current: dict[int, str] = {}
        entries: dict[int, DiscoveredVisit] = {}
        for visit, entry in inventory.visits.items():
            if not entry.source_paths or entry.metadata is None:
                continue
            try:
                current[visit] = visit_signature(entry)
            except OSError:
                continue  # a file vanished between discovery and stat: next poll
            entries[visit] = entry
        ready: list[VisitEvent] = []
        for visit in sorted(current):
            sig = current[visit]
            if previous.get(visit) != sig or state.published.get(visit) == sig:
                continue  # not stable yet, or already published as it is
            action: Action = "replace" if visit in state.published else "apply"
            ready.append(event_for_visit(entries[visit], action=action, instrument=instrument))
        if ready and routing is not None and finder is not None:
            skipped: dict[int, str] = {}
            ready, footprints = _routed(ready, inventory, finder, skipped, state.shards)
            for visit, why in skipped.items():
                if warned.get(visit) != why:  # once per reason, not at every poll
                    log.warning("visit %d not published yet: %s", visit, why)
                    warned[visit] = why
            partitions = current_partitions(producer, topic, partitions)
            for visit, footprint in footprints.items():
                state.shards[visit] = list(footprint.shards)
        if ready:
            sent = list(dict.fromkeys(publish_events(producer, topic, ready,
                                                     partitions=partitions)))
            for visit in sent:
                state.published[visit] = current[visit]
            state.save()
            log.info("published %d event(s) of %d visit(s): %s", len(ready), len(sent), sent)
            if on_publish is not None:
                on_publish(sent)
        previous = current
        if max_polls is not None and polls >= max_polls:
            break
        stop.wait(poll_seconds)
    return state


def current_partitions(producer: Producer | Any, topic: str, known: int | None) -> int | None:
    """The topic's partition count now (partitions may have been added since the last poll:
    logged, the new count is used from now on); ``known`` when the metadata cannot be read."""
    try:
        now = topic_partitions(producer, topic)
    except TopicError as exc:
        log.warning("%s; keeping %s partition(s)", exc, known)
        return known
    if now is None:
        return known
    if known is not None and now != known:
        log.warning("topic %s now has %d partition(s) (was %d): shard events are spread over "
                    "%d from now on (docs/operations.md, changing the partition count)", topic,
                    now, known, now)
    return now
