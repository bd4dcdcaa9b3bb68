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
"""

from __future__ import annotations

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

from confluent_kafka import KafkaError, Message, Producer

from streamstars import __version__
from streamstars.events import (
    Action,
    VisitEvent,
    metadata_for_event,
    now_iso,
    path_to_uri,
)
from streamstars.ingest import file_signature
from streamstars.io.discover import DiscoveredVisit, RepoInventory, discover_repo
from streamstars.staging import write_json_atomic

__all__ = [
    "PublishSummary",
    "event_for_visit",
    "events_for_inventory",
    "make_producer",
    "publish_events",
    "publish_repo",
    "watch_repo",
]

log = logging.getLogger("streamstars.publish")

_FITS = re.compile(r"\.fits?(\.gz)?$", re.IGNORECASE)
PRODUCER_NAME = f"streamstars-publish/{__version__}"


@dataclass
class PublishSummary:
    """What a publication sent."""

    published: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


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


def publish_events(
    producer: Producer, topic: str, events: Iterable[VisitEvent], timeout: float = 60.0
) -> list[int]:
    """Produce events (key = visit id), wait for every acknowledgement, return the visits.

    Raises:
        RuntimeError: a delivery failed or did not complete within ``timeout``.
    """
    errors: list[str] = []
    sent: list[int] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(f"key {msg.key()!r}: {err}")

    for event in events:
        while True:
            try:
                producer.produce(
                    topic, key=event.key, value=event.to_json(), on_delivery=on_delivery
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


def publish_repo(
    root: str | Path,
    bootstrap: str,
    topic: str,
    kafka_config: Mapping[str, str] | None = None,
    *,
    reference_ccd: int = 40,
    instrument: str | None = None,
) -> PublishSummary:
    """Publish one ``apply`` event per visit of ``root`` in visit order.

    Visits without source tables or metadata are not published; they are listed in
    :attr:`PublishSummary.skipped` (and logged), like the files discovery could not use.
    """
    start = time.monotonic()
    inventory = discover_repo(root, reference_ccd=reference_ccd)
    events, skipped = events_for_inventory(inventory, instrument=instrument)
    for problem in inventory.problems:
        log.warning("discovery: %s", problem)
    for visit, why in skipped.items():
        log.warning("visit %d not published: %s", visit, why)
    producer = make_producer(bootstrap, kafka_config)
    published = publish_events(producer, topic, events)
    log.info("published %d visit event(s) to %s", len(published), topic)
    return PublishSummary(published, skipped, inventory.problems, time.monotonic() - start)


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
    """The watcher's memory: visit -> signature of what was published (a JSON file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.published: dict[int, str] = {}
        if path.exists():
            data = json.loads(path.read_text())
            self.published = {int(k): str(v) for k, v in data.get("published", {}).items()}

    def save(self) -> None:
        """Write atomically (:func:`~streamstars.staging.write_json_atomic`)."""
        write_json_atomic(self.path, {
            "format": 1, "published": {str(k): v for k, v in sorted(self.published.items())}})


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
) -> WatchState:
    """Poll ``root`` and publish each visit once its files are complete and stable.

    A visit is published when discovery reads it (parquet footer and visit column readable,
    metadata found) and its signature is the same on two consecutive polls.  Stops when
    ``stop`` is set or after ``max_polls`` polls.
    """
    state = WatchState(Path(state_file))
    producer = make_producer(bootstrap, kafka_config)
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
        if ready:
            sent = publish_events(producer, topic, ready)
            for event in ready:
                state.published[event.visit] = current[event.visit]
            state.save()
            log.info("published %d visit event(s): %s", len(sent), sent)
            if on_publish is not None:
                on_publish(sent)
        previous = current
        if max_polls is not None and polls >= max_polls:
            break
        stop.wait(poll_seconds)
    return state
