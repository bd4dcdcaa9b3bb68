"""From an event to a visit read and selected (no store access: safe in the read-ahead
thread).

* A file event (schema version 1): its files are resolved inside the data roots, must exist,
  and its metadata must describe its visit, band and physical filter (:func:`prepare_event`).
* A Butler event (schema version 2, ``butler``): its datasets are found by UUID in the
  registry of ``--butler REPO`` and read through their URIs
  (:class:`streamstars.butler.read.EventResolver`).

:class:`EventPreparer` is the consumer's part that does both.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamstars.config import BuildStarsConfig
from streamstars.errors import StreamstarsError, TransientInputError
from streamstars.events import MalformedEventError, VisitEvent, inline_metadata, resolve_uri
from streamstars.ingest import PreparedVisit, VisitInput, prepare_visit
from streamstars.io.visitmeta import read_visit_summary
from streamstars.visit import VisitMetadata

if TYPE_CHECKING:
    from streamstars.butler.read import EventResolver

__all__ = ["EventPreparer", "event_metadata", "prepare_event"]


#: The memory kept by prepared visits for the other shard events of the same visit [bytes].
#: A visit is published as one event per shard of its footprint (schema version 3), and a
#: consumer's partitions are fetched in chunks of one partition: the other events of a visit
#: can be a few hundred messages away (~1.5 MB a simulated visit, ~50 MB an LSSTCam one).
REUSE_BYTES = 256 << 20


class EventPreparer:
    """Reads and selects the visits of events: file events inside ``data_roots``, Butler
    events through the repository ``butler`` (opened by :meth:`open`; None: such events are
    malformed for this consumer).

    A visit prepared for one shard event is reused by the other shard events of the same
    visit while its inputs are unchanged (the same files, by size, modification time and
    inode; the same Butler datasets, which are immutable; the same metadata and
    configuration): a visit spread over several shards is read and selected once, not once
    per shard.  Safe across the consumer's threads (the read-ahead thread prepares too).
    """

    def __init__(self, data_roots: Sequence[Path], butler: str | None = None) -> None:
        self.data_roots = list(data_roots)
        self.butler = butler
        self.resolver: EventResolver | None = None
        self._recent: OrderedDict[Hashable, tuple[PreparedVisit, int]] = OrderedDict()
        self._kept_bytes = 0
        self._config: BuildStarsConfig | None = None  # what the kept visits were prepared with
        self._lock = threading.Lock()
        #: visits read and selected / reused for another shard event (tests, the benchmark)
        self.prepared = 0
        self.reused = 0

    def open(self) -> None:
        """Open the Butler repository (when one is given), before any event.

        Raises:
            ButlerError: the ``butler`` extra is not installed, or no repository is there.
        """
        if self.butler and self.resolver is None:
            from streamstars.butler.read import EventResolver
            from streamstars.butler.repo import open_butler

            self.resolver = EventResolver(open_butler(self.butler))

    def prepare(self, event: VisitEvent, config: BuildStarsConfig) -> PreparedVisit:
        """Read and select the visit of ``event`` (no store access).

        Raises:
            MalformedEventError: a Butler event without ``--butler``, or datasets / metadata
                that disagree with the event.
            DatasetFileMissingError: a dataset not (yet) in the registry or datastore.
            and everything :func:`prepare_event` raises for a file event.
        """
        key = self._reuse_key(event, config)
        if key is not None:
            with self._lock:
                if config is not self._config:  # prepared with another configuration
                    self._recent.clear()
                    self._kept_bytes = 0
                    self._config = config
                hit = self._recent.get(key)
                if hit is not None:
                    self._recent.move_to_end(key)
                    self.reused += 1
                    return hit[0]
        prepared = self._prepare(event, config)
        with self._lock:
            self.prepared += 1
            size = sum(int(np.asarray(c).nbytes) for c in prepared.observations.values())
            if key is not None and config is self._config and size <= REUSE_BYTES \
                    and key not in self._recent:
                self._recent[key] = (prepared, size)
                self._kept_bytes += size
                while self._kept_bytes > REUSE_BYTES:
                    self._kept_bytes -= self._recent.popitem(last=False)[1][1]
        return prepared

    def _prepare(self, event: VisitEvent, config: BuildStarsConfig) -> PreparedVisit:
        if event.butler_datasets is None:
            return prepare_event(event, self.data_roots, config)
        if self.resolver is None:
            raise MalformedEventError(
                f"visit {event.visit}: the event names Butler datasets; run the consumer "
                "with --butler REPO to resolve them")
        return self.resolver.prepare(event, config)

    def _reuse_key(self, event: VisitEvent, config: BuildStarsConfig) -> Hashable | None:
        """What a prepared visit depends on, for a shard event (None: not reused — another
        kind of event, a retraction, or files that cannot be looked at now: preparing says
        why)."""
        if event.shard is None or event.action == "retract":
            return None
        common = (event.visit, event.band, event.physical_filter)
        if event.butler_datasets is not None:
            datasets = tuple(sorted((kind, tuple(ids))
                                    for kind, ids in event.butler_datasets.items()))
            return ("butler", *common, datasets)
        try:
            uris = [*event.source_uris,
                    *([event.metadata_uri] if event.metadata_uri is not None else [])]
            files = []
            for uri in uris:
                path = resolve_uri(uri, self.data_roots, what=f"visit {event.visit} file")
                info = path.stat()
                files.append((str(path), info.st_size, info.st_mtime_ns, info.st_ino))
        except (OSError, StreamstarsError):
            return None
        values = (json.dumps(event.metadata_values, sort_keys=True, default=str)
                  if event.metadata_values is not None else None)
        return ("files", *common, tuple(files), values)


def prepare_event(event: VisitEvent, data_roots: Sequence[Path],
                  config: BuildStarsConfig) -> PreparedVisit:
    """Resolve a file event's files and metadata, read and select its visit.

    Raises:
        ForbiddenPathError: a URI outside ``data_roots`` (nothing is opened).
        TransientInputError: a file does not exist (yet).
        MalformedEventError: the metadata describes another visit, band or filter.
        PermanentInputError: unreadable or invalid files (from
            :func:`streamstars.ingest.prepare_visit`).
    """
    paths = [resolve_uri(u, data_roots, what=f"visit {event.visit} source table")
             for u in event.source_uris]
    meta_path = (
        resolve_uri(event.metadata_uri, data_roots, what=f"visit {event.visit} visitSummary")
        if event.metadata_uri is not None
        else None
    )
    for path in [*paths, *([meta_path] if meta_path else [])]:
        if not path.exists():
            raise TransientInputError(f"visit {event.visit}: {path} does not exist (yet)")
    metadata = event_metadata(event, meta_path, config.referenceCCD)
    return prepare_visit(VisitInput(event.visit, paths, metadata), config)


def event_metadata(event: VisitEvent, meta_path: Path | None,
                   reference_ccd: int) -> VisitMetadata:
    """The visit's metadata: read from its visitSummary, else the event's inline values
    (whose visit :func:`streamstars.events.parse_event` checked), checked against the
    event.

    Raises:
        MalformedEventError: a visitSummary of another visit, or a band / physical filter
            other than the event's.
    """
    if meta_path is not None:
        meta = read_visit_summary(meta_path, reference_ccd=reference_ccd)
        if meta.visit != event.visit:
            raise MalformedEventError(
                f"visit {event.visit}: its metadata describes visit {meta.visit}"
            )
    else:
        meta = inline_metadata(event.metadata_values or {})
    if meta.physical_filter != event.physical_filter or meta.band != event.band:
        raise MalformedEventError(
            f"visit {event.visit}: event says band {event.band!r} / physical_filter "
            f"{event.physical_filter!r} but its metadata says {meta.band!r} / "
            f"{meta.physical_filter!r}"
        )
    return meta
