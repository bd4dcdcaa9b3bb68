"""From an event to a visit read and selected (no store access: safe in the read-ahead
thread): the event's files are resolved inside the data roots, must exist, and its metadata
must describe its visit, band and physical filter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from streamstars.config import BuildStarsConfig
from streamstars.errors import TransientInputError
from streamstars.events import MalformedEventError, VisitEvent, inline_metadata, resolve_uri
from streamstars.ingest import PreparedVisit, VisitInput, prepare_visit
from streamstars.io.visitmeta import read_visit_summary
from streamstars.visit import VisitMetadata

__all__ = ["event_metadata", "prepare_event"]


def prepare_event(event: VisitEvent, data_roots: Sequence[Path],
                  config: BuildStarsConfig) -> PreparedVisit:
    """Resolve the event's files and metadata, read and select its visit.

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
