"""Watching a Butler collection for new datasets and publishing visit events.

There is no watch API in the Butler: the registry is polled.

* **Incremental poll** (every ``poll_seconds``): the datasets of ``sourceTable_visit`` and
  ``visitSummary`` whose ``ingest_date`` is later than the watermark minus a safety overlap
  (``overlap_seconds``, default 300 s: a registry transaction that commits late, or clocks
  that differ, cannot hide a dataset) name the candidate visits; for those visits the current
  datasets are found first along the collections (``find_first``) -- a dataset ingested into a
  RUN that is shadowed by an earlier collection of the chain is not the visit's dataset.  The
  watermark is then the latest ``ingest_date`` seen (the registry's clock).
* **Full diff** (at start, every ``full_every`` polls, and whenever the flattened collection
  search path changes -- a chain redefined): the (visit, UUIDs) pairs of every visit of the
  collections, because re-chaining a collection or tagging datasets changes which dataset is
  current without changing any ``ingest_date``.  It reads dataset IDs only (converting 10,000
  ``ingest_date`` values would cost seconds); the watermark after it is the time the poll
  began on this host, so the overlap also has to cover the difference between this host's
  clock and the registry's.

A visit is published when its datasets (source table + visitSummary, or source table + the
instrument's visitTable holding a row for it) differ from what was last published for it:
``apply`` the first time, ``replace`` afterwards.  The events name the datasets by UUID
(event schema version 2, ``butler``); a consumer run with ``--butler REPO`` resolves them.
What was published (visit -> UUIDs) and the watermark are kept in a JSON state file written
atomically after the broker acknowledged the events, so a restarted watcher publishes nothing
twice.  Visits that disappear from the collections are logged, not retracted (retracting is
an operator's decision: ``streamstars retract``).

With shard routing (``publish --butler ... --partitions P`` or ``--shard-nside``), each visit
is published as one schema-version-3 event per shard of its footprint
(:mod:`streamstars.consumers.publisher`): the footprint comes from the detector corners of
the visit's visitSummary (or of the ccdVisitTable published with its visitTable), found
through the Butler, else from its source table's coordinates; the state file then also
remembers the shards of every visit, so that a ``replace`` reaches the shards it left.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamstars import __version__
from streamstars.errors import ButlerError, DatasetFileMissingError, StreamstarsError
from streamstars.events import Action, VisitEvent, now_iso
from streamstars.footprint import FootprintFinder, VisitFootprint
from streamstars.io.corners import DetectorCorners
from streamstars.staging import write_json_atomic

from .discover import (
    CCD_VISIT_TABLE,
    SOURCE_STORAGE_CLASSES,
    SOURCE_TABLE,
    VISIT_SUMMARY,
    VISIT_TABLE,
    query_refs,
    uris_of,
)
from .repo import ButlerRepo, require_butler

__all__ = ["ButlerWatcher", "PollResult", "WatchState", "publish_butler", "watch_butler"]

log = logging.getLogger("streamstars.publish")

PRODUCER_NAME = f"streamstars-publish/{__version__} (butler)"
STATE_FORMAT = "streamstars-butler-watch/1"
DEFAULT_OVERLAP_SECONDS = 300.0
DEFAULT_FULL_EVERY = 20


@dataclass
class VisitDatasets:
    """The current datasets of one visit and what its event needs."""

    visit: int
    instrument: str
    band: str
    physical_filter: str
    datasets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ingest_date: Any = None

    @property
    def ids(self) -> list[str]:
        """The sorted UUIDs that identify what is published for the visit."""
        return sorted(i for ids in self.datasets.values() for i in ids)


@dataclass
class PollResult:
    """What one poll found and published."""

    full: bool
    candidates: int
    published: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    seconds: float = 0.0


class WatchState:
    """The watcher's memory (JSON): visit -> published UUIDs, and the ingest_date watermark;
    with shard routing also visit -> shards published to (``shards``) and the routing
    (``routing``), keys that readers of the older file ignore."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.published: dict[int, list[str]] = {}
        self.watermark: str | None = None  # ISO TAI
        self.shards: dict[int, list[int]] = {}
        self.routing: dict[str, Any] | None = None
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            if data.get("format") != STATE_FORMAT:
                raise ButlerError(f"{path} is not a Butler watch state file ({STATE_FORMAT}); "
                                  "give another --watch-state")
            self.published = {int(k): list(v) for k, v in data.get("published", {}).items()}
            self.watermark = data.get("watermark")
            self.shards = {int(k): [int(s) for s in v]
                           for k, v in data.get("shards", {}).items()}
            self.routing = data.get("routing")

    def save(self, context: Mapping[str, Any]) -> None:
        """Write atomically (:func:`~streamstars.staging.write_json_atomic`); no-op without a
        path."""
        if self.path is None:
            return
        payload = {"format": STATE_FORMAT, "watermark": self.watermark, **context,
                   "published": {str(k): v for k, v in sorted(self.published.items())}}
        if self.shards or self.routing is not None:
            payload["shards"] = {str(k): v for k, v in sorted(self.shards.items())}
            payload["routing"] = self.routing
        write_json_atomic(self.path, payload)


class ButlerWatcher:
    """Polls ``collections`` of ``repo`` (see the module docstring).

    Args:
        repo: the open repository.
        collections: the search path (checked to exist).
        instrument: restrict to one instrument.
        where, bind: a Butler expression on the data IDs (as for ``backfill --butler``).
        overlap_seconds: how far before the watermark each incremental poll looks again.
        full_every: a full diff every this many polls (0: only at start and on re-chaining).

    Raises:
        ButlerError: a collection not found, ``sourceTable_visit`` not registered, no metadata
            dataset type registered.
    """

    def __init__(self, repo: ButlerRepo, collections: Sequence[str], *,
                 instrument: str | None = None, where: str = "",
                 bind: Mapping[str, Any] | None = None,
                 overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
                 full_every: int = DEFAULT_FULL_EVERY) -> None:
        self.repo = repo
        self.collections = repo.check_collections(collections)
        repo.dataset_type(SOURCE_TABLE, storage_classes=SOURCE_STORAGE_CLASSES)
        self.has_summary = repo.dataset_type(VISIT_SUMMARY, required=False) is not None
        self.has_tables = repo.dataset_type(VISIT_TABLE, required=False) is not None
        if not self.has_summary and not self.has_tables:
            raise ButlerError(
                f"dataset type {VISIT_SUMMARY!r} is not registered in Butler repository "
                f"{repo.root} (nor {VISIT_TABLE!r}): the visits' metadata cannot be found")
        self.instrument = instrument
        self.where = where
        self.bind = dict(bind or {})
        self.overlap_seconds = overlap_seconds
        self.full_every = full_every
        self.polls = 0
        self._search_path: list[tuple[str, tuple[str, ...]]] | None = None
        self._instrument: str | None = instrument
        self._table_visits: dict[str, set[int]] = {}
        self._waiting: set[int] = set()
        self._table_corners: dict[str, dict[int, DetectorCorners]] = {}
        self._table_boresights: dict[str, dict[int, tuple[float, float]]] = {}

    def retry(self, visit: int) -> None:
        """Look at ``visit`` again at the next poll (its event could not be made now)."""
        self._waiting.add(visit)

    @property
    def waiting(self) -> list[int]:
        """Visits whose source table is there but whose metadata dataset is not (yet)."""
        return sorted(self._waiting)

    def _only_instrument(self) -> str:
        if self.instrument:
            return self.instrument
        if self._instrument is None:
            rows = self._rows(SOURCE_TABLE, find_first=False, limit=None)
            self._note_instruments(rows)
        if self._instrument is None:
            raise ButlerError(f"no {SOURCE_TABLE} dataset in {self.collections} yet")
        return self._instrument

    def _note_instruments(self, rows: Sequence[Mapping[str, Any]]) -> None:
        names = sorted({str(row["instrument"]) for row in rows})
        if len(names) > 1 and not self.instrument:
            raise ButlerError(f"{SOURCE_TABLE} datasets of several instruments "
                              f"({', '.join(names)}) in {self.collections}; choose one with "
                              "--instrument")
        if names and self._instrument is None:
            self._instrument = names[0]

    # ------------------------------------------------------------------ queries
    def search_path(self) -> list[tuple[str, tuple[str, ...]]]:
        """The flattened search path: (collection, children) of every collection reached."""
        infos = self.repo.butler.collections.query_info(
            self.collections, flatten_chains=True, include_chains=True)
        return [(info.name, tuple(info.children)) for info in infos]

    def _rows(self, dataset_type: str, *, since: Any = None,
              visits: Sequence[int] | None = None, find_first: bool = True,
              limit: int | None = None, dates: bool = False) -> list[dict]:
        daf_butler = require_butler()
        try:
            with self.repo.butler.query() as query:
                query = query.join_dataset_search(dataset_type, self.collections)
                if self.instrument:
                    query = query.where(instrument=self.instrument)
                if self.where:
                    query = query.where(self.where, bind=self.bind)
                if since is not None:
                    query = query.where(f"{dataset_type}.ingest_date > since",
                                        bind={"since": since})
                if visits is not None:  # visit ids are per instrument: constrain it too
                    query = query.where("visit IN (visits)", bind={"visits": tuple(visits)},
                                        instrument=self._only_instrument())
                fields: Any = {"dataset_id", "ingest_date"} if dates else {"dataset_id"}
                rows = query.general(["instrument", "visit"],
                                     dataset_fields={dataset_type: fields},
                                     find_first=find_first)
                return list(rows.limit(limit) if limit is not None else rows)
        except (daf_butler.ButlerUserError, LookupError, ValueError) as exc:
            raise ButlerError(f"query of {dataset_type!r} in {self.collections} of "
                              f"{self.repo.root} failed: {exc}") from exc

    def _visits_of_table(self, dataset_id: str) -> set[int]:
        """The visits with a row in a visitTable dataset (its visit column only, cached)."""
        if dataset_id not in self._table_visits:
            import uuid

            import pyarrow.parquet as pq

            from .read import local_file

            ref = self.repo.butler.get_dataset(uuid.UUID(dataset_id))
            uri = uris_of(self.repo, [ref])[ref.id] if ref is not None else None
            visits: set[int] = set()
            if uri is not None and uri.exists():
                with local_file(uri) as path:
                    names = pq.read_schema(path).names
                    column = "visit" if "visit" in names else "visitId"
                    values = pq.read_table(path, columns=[column]).column(0).to_pylist()
                    visits = {int(v) for v in values}
            self._table_visits[dataset_id] = visits
        return self._table_visits[dataset_id]

    def _table_datasets(self, instrument: str) -> dict[str, tuple[str, ...]]:
        if not self.has_tables:
            return {}
        out: dict[str, tuple[str, ...]] = {}
        for name in (VISIT_TABLE, CCD_VISIT_TABLE):
            if self.repo.dataset_type(name, required=False) is None:
                continue
            refs = query_refs(self.repo, name, self.collections, instrument=instrument)
            if refs:
                out[name] = (str(refs[0].id),)
        return out if VISIT_TABLE in out else {}

    def current(self, visits: Sequence[int] | None = None,
                dates: bool = False) -> dict[int, VisitDatasets]:
        """The current datasets of ``visits`` (all visits when None), first match along the
        collections; visits without a usable metadata dataset have none in ``datasets``
        beside the source table.  ``dates``: also the source tables' ``ingest_date``."""
        found: dict[int, VisitDatasets] = {}
        rows = self._rows(SOURCE_TABLE, visits=visits, dates=dates)
        self._note_instruments(rows)
        for row in rows:
            visit = int(row["visit"])
            found[visit] = VisitDatasets(
                visit, str(row["instrument"]), str(row["band"]), str(row["physical_filter"]),
                {SOURCE_TABLE: (str(row[f"{SOURCE_TABLE}.dataset_id"]),)},
                row.get(f"{SOURCE_TABLE}.ingest_date"))
        if not found:
            return found
        if self.has_summary:
            for row in self._rows(VISIT_SUMMARY, visits=sorted(found)):
                entry = found.get(int(row["visit"]))
                if entry is not None:
                    entry.datasets[VISIT_SUMMARY] = (str(row[f"{VISIT_SUMMARY}.dataset_id"]),)
        tables: dict[str, dict[str, tuple[str, ...]]] = {}
        for entry in found.values():
            if VISIT_SUMMARY in entry.datasets:
                continue
            if entry.instrument not in tables:
                tables[entry.instrument] = self._table_datasets(entry.instrument)
            table = tables[entry.instrument]
            if table and entry.visit in self._visits_of_table(table[VISIT_TABLE][0]):
                entry.datasets.update(table)
        return found

    def _fill_dates(self, ready: Sequence[VisitDatasets]) -> None:
        """The ``ingest_date`` (-> ``finished_at``) of the visits about to be published."""
        missing = sorted(e.visit for e in ready if e.ingest_date is None)
        by_visit = {e.visit: e for e in ready}
        for i in range(0, len(missing), 1000):
            for row in self._rows(SOURCE_TABLE, visits=missing[i:i + 1000], dates=True):
                entry = by_visit.get(int(row["visit"]))
                if entry is not None:
                    entry.ingest_date = row[f"{SOURCE_TABLE}.ingest_date"]

    # ------------------------------------------------------------------ one poll
    def poll(self, state: WatchState) -> tuple[list[VisitDatasets], bool, Any]:
        """The visits to publish now, whether this was a full diff, and the new watermark."""
        from astropy.time import Time, TimeDelta

        self.repo.butler.registry.refresh()
        path = self.search_path()
        full = (self._search_path is None or path != self._search_path
                or state.watermark is None
                or (self.full_every > 0 and self.polls % self.full_every == 0))
        self._search_path = path
        self.polls += 1
        if full:
            return self.full_diff(state, search_path=path)
        watermark = Time(state.watermark, scale="tai")
        since = watermark - TimeDelta(self.overlap_seconds, format="sec")
        recent: set[int] = set(self._waiting)
        seen = [watermark]
        for dataset_type in (SOURCE_TABLE, *((VISIT_SUMMARY,) if self.has_summary else ())):
            for row in self._rows(dataset_type, since=since, find_first=False, dates=True):
                recent.add(int(row["visit"]))
                seen.append(row[f"{dataset_type}.ingest_date"])
        watermark = max(seen, key=lambda t: (t.tai.jd1, t.tai.jd2))
        if self.has_tables:
            for name in (VISIT_TABLE, CCD_VISIT_TABLE):
                if self.repo.dataset_type(name, required=False) is None:
                    continue
                refs = self.repo.butler.query_datasets(
                    name, collections=self.collections, find_first=False,
                    where="ingest_date > since", bind={"since": since}, limit=None,
                    explain=False)
                if refs:  # a new visit table: every visit may have gained a row
                    return self.full_diff(state, search_path=path)
        current = self.current(sorted(recent), dates=True) if recent else {}
        ready, waiting = self._changed(state, current)
        self._waiting = set(waiting)
        return ready, False, watermark

    def full_diff(self, state: WatchState, search_path: list[tuple[str, tuple[str, ...]]]
                  | None = None) -> tuple[list[VisitDatasets], bool, Any]:
        """Every visit of the collections against what was published (see :meth:`poll`).

        Returns the visits to publish, True, and the new watermark (when it began)."""
        from astropy.time import Time

        began = Time.now().tai
        self._search_path = None  # the next poll is a full diff too if this one fails
        current = self.current()
        self._search_path = search_path or self.search_path()
        ready, waiting = self._changed(state, current)
        self._waiting = set(waiting)
        self._fill_dates(ready)
        gone = sorted(set(state.published) - set(current))
        if gone:
            log.warning("%d published visit(s) are no longer in %s (not retracted; use "
                        "`streamstars retract` if they should go): %s", len(gone),
                        self.collections, gone[:10])
        return ready, True, began

    @staticmethod
    def _changed(state: WatchState, current: Mapping[int, VisitDatasets],
                 ) -> tuple[list[VisitDatasets], list[int]]:
        ready: list[VisitDatasets] = []
        waiting: list[int] = []
        for visit in sorted(current):
            entry = current[visit]
            if len(entry.datasets) < 2:  # no metadata dataset yet
                waiting.append(visit)
            elif state.published.get(visit) != entry.ids:
                ready.append(entry)
        return ready, waiting

    # ------------------------------------------------------------------ footprints
    def _dataset_file(self, visit: int, dataset_id: str) -> Any:
        """A context manager giving a local path of the file of a dataset (by UUID).

        Raises:
            DatasetFileMissingError: the registry or the datastore lacks it.
        """
        import uuid

        from .read import local_file

        ref = self.repo.butler.get_dataset(uuid.UUID(dataset_id))
        uri = uris_of(self.repo, [ref])[ref.id] if ref is not None else None
        if uri is None or not uri.exists():
            raise DatasetFileMissingError(f"visit {visit}: dataset {dataset_id} has no file "
                                          "in the datastore (yet)")
        return local_file(uri)

    def _table_values(self, visit: int, datasets: Mapping[str, tuple[str, ...]]
                      ) -> tuple[DetectorCorners | None, tuple[float, float] | None]:
        """The visit's detector corners (ccdVisitTable) and boresight (visitTable), each
        table read once."""
        from streamstars.io.corners import read_ccd_visit_corners
        from streamstars.io.visitmeta import read_visit_tables

        corners = None
        if CCD_VISIT_TABLE in datasets:
            ccd = datasets[CCD_VISIT_TABLE][0]
            if ccd not in self._table_corners:
                with self._dataset_file(visit, ccd) as path:
                    self._table_corners[ccd] = read_ccd_visit_corners(path)
            corners = self._table_corners[ccd].get(visit)
        table = datasets[VISIT_TABLE][0]
        if table not in self._table_boresights:
            with self._dataset_file(visit, table) as path:
                self._table_boresights[table] = {
                    v: (m.telra, m.teldec) for v, m in read_visit_tables(path, None).items()}
        return corners, self._table_boresights[table].get(visit)

    def footprint(self, entry: VisitDatasets, finder: FootprintFinder) -> VisitFootprint:
        """The visit's footprint: from the detector corners of its visitSummary (or of the
        ccdVisitTable published with its visitTable), else from its source table(s).

        Raises:
            StreamstarsError: a file cannot be found or read.
        """
        from streamstars.io.corners import read_visit_summary_corners
        from streamstars.io.visitmeta import read_visit_summary

        datasets = entry.datasets
        corners: DetectorCorners | None
        if VISIT_SUMMARY in datasets:
            with self._dataset_file(entry.visit, datasets[VISIT_SUMMARY][0]) as path:
                corners = read_visit_summary_corners(path)
                meta = read_visit_summary(path)
                boresight: tuple[float, float] | None = (meta.telra, meta.teldec)
        else:
            corners, boresight = self._table_values(entry.visit, datasets)
        found, note = finder.from_corners(entry.visit, corners, boresight)
        if found is not None:
            return found
        with ExitStack() as stack:
            paths = [stack.enter_context(self._dataset_file(entry.visit, i))
                     for i in datasets[SOURCE_TABLE]]
            return finder.from_sources(entry.visit, paths, boresight, note)

    def event(self, entry: VisitDatasets, action: Action) -> VisitEvent:
        """The visit event naming ``entry``'s datasets (schema version 2)."""
        finished = entry.ingest_date
        return VisitEvent(
            action=action, visit=entry.visit, instrument=entry.instrument, band=entry.band,
            physical_filter=entry.physical_filter, butler_datasets=dict(entry.datasets),
            butler_collections=tuple(self.collections),
            finished_at=(str(finished.utc.isot) + "Z") if finished is not None else now_iso(),
            published_at=now_iso(), producer=PRODUCER_NAME)


def _context(watcher: ButlerWatcher) -> dict[str, Any]:
    return {"repo": watcher.repo.root, "collections": watcher.collections,
            "instrument": watcher.instrument, "where": watcher.where}


@dataclass
class _Routing:
    """A watcher's shard routing: the settings, the footprints, the topic's partitions."""

    routing: Any  # streamstars.consumers.publisher.ShardRouting
    finder: FootprintFinder
    partitions: int | None
    warned: dict[int, str] = field(default_factory=dict)


def _routing(routing: Any, bootstrap: str, topic: str, kafka_config: Mapping[str, str] | None,
             state: WatchState) -> _Routing | None:
    """The routing of a publication (None without one): the topic made sure of, the state's
    earlier routing compared."""
    if routing is None:
        return None
    from streamstars.consumers.publisher import ensure_topic

    partitions = ensure_topic(bootstrap, topic, routing.partitions, kafka_config)
    if state.routing not in (None, routing.describe()):
        log.warning("%s was written by a watcher routing with %s; now %s: visits published "
                    "before are not published again", state.path, state.routing,
                    routing.describe())
        state.shards = {}
    state.routing = routing.describe()
    return _Routing(routing, FootprintFinder(routing.spec, routing.slack_arcsec), partitions)


def _shard_events(watcher: ButlerWatcher, state: WatchState, route: _Routing,
                  ready: list[VisitDatasets], events: list[VisitEvent]
                  ) -> tuple[list[VisitDatasets], list[VisitEvent]]:
    """The visits whose footprint is known, and their events routed to its shards (a
    ``replace`` also to the shards published before); the others wait for the next poll."""
    from streamstars.consumers.publisher import shard_events

    kept: list[VisitDatasets] = []
    out: list[VisitEvent] = []
    for entry, event in zip(ready, events, strict=True):
        try:
            footprint = watcher.footprint(entry, route.finder)
        except (StreamstarsError, OSError) as exc:
            if route.warned.get(entry.visit) != str(exc):
                log.warning("visit %d not published yet: footprint not computed: %s",
                            entry.visit, exc)
                route.warned[entry.visit] = str(exc)
            watcher.retry(entry.visit)
            continue
        also = state.shards.get(entry.visit, ()) if event.action == "replace" else ()
        routed = shard_events(event, footprint, route.finder.spec.nside, also)
        kept.append(entry)
        out.extend(routed)
        state.shards[entry.visit] = [e.shard for e in routed if e.shard is not None]
    return kept, out


def _publish_ready(watcher: ButlerWatcher, state: WatchState, producer: Any, topic: str,
                   ready: list[VisitDatasets], watermark: Any,
                   route: _Routing | None = None) -> list[int]:
    from streamstars.consumers.publisher import current_partitions, publish_events

    events = [watcher.event(e, "replace" if e.visit in state.published else "apply")
              for e in ready]
    partitions = None
    if route is not None and events:
        ready, events = _shard_events(watcher, state, route, ready, events)
        route.partitions = partitions = current_partitions(producer, topic, route.partitions)
    sent = list(dict.fromkeys(publish_events(producer, topic, events, partitions=partitions)
                              if events else []))
    for entry in ready:
        state.published[entry.visit] = entry.ids
    if watermark is not None:
        state.watermark = str(watermark.tai.isot)
    if events or watermark is not None:
        state.save(_context(watcher))
    return sent


def publish_butler(watcher: ButlerWatcher, bootstrap: str, topic: str,
                   kafka_config: Mapping[str, str] | None = None,
                   state_file: str | Path | None = None, routing: Any = None) -> PollResult:
    """Publish one event per visit of the collections that is not yet published (all of
    them without ``state_file``), once; with ``routing``
    (:class:`~streamstars.consumers.publisher.ShardRouting`) one per (visit, shard)."""
    from streamstars.consumers.publisher import make_producer

    start = time.monotonic()
    state = WatchState(Path(state_file) if state_file else None)
    route = _routing(routing, bootstrap, topic, kafka_config, state)
    ready, _, watermark = watcher.full_diff(state)
    sent = _publish_ready(watcher, state, make_producer(bootstrap, kafka_config), topic, ready,
                          watermark, route)
    return PollResult(True, len(ready), sent, watcher.waiting,
                      time.monotonic() - start)


def watch_butler(watcher: ButlerWatcher, bootstrap: str, topic: str, state_file: str | Path,
                 kafka_config: Mapping[str, str] | None = None, *, poll_seconds: float = 30.0,
                 stop: threading.Event | None = None, max_polls: int | None = None,
                 on_poll: Callable[[PollResult], None] | None = None,
                 routing: Any = None) -> WatchState:
    """Poll and publish until ``stop`` is set (or after ``max_polls`` polls); with
    ``routing`` one event per (visit, shard)."""
    from streamstars.consumers.publisher import make_producer

    state = WatchState(Path(state_file))
    route = _routing(routing, bootstrap, topic, kafka_config, state)
    producer = make_producer(bootstrap, kafka_config)
    stop = stop or threading.Event()
    log.info("watching %s in %s every %.1f s (state %s, %d visit(s) already published)",
             watcher.collections, watcher.repo.root, poll_seconds, state_file,
             len(state.published))
    polls = 0
    while not stop.is_set():
        polls += 1
        start = time.monotonic()
        try:
            ready, full, watermark = watcher.poll(state)
            sent = _publish_ready(watcher, state, producer, topic, ready, watermark, route)
        except ButlerError:
            raise  # a configuration problem: polling again cannot help
        except Exception as exc:  # noqa: BLE001 - a busy registry, a broker away: next poll
            log.warning("poll %d failed (nothing recorded; trying again in %.1f s): %s: %s",
                        polls, poll_seconds, type(exc).__name__, exc)
        else:
            result = PollResult(full, len(ready), sent, watcher.waiting,
                                time.monotonic() - start)
            if sent:
                log.info("published %d visit event(s): %s", len(sent), sent)
            if on_poll is not None:
                on_poll(result)
        if max_polls is not None and polls >= max_polls:
            break
        stop.wait(poll_seconds)
    return state
