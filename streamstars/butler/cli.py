"""What the ``streamstars`` commands do with their Butler options (kept out of the CLI
modules so that these stay thin and never import the Butler unless a Butler option is given).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamstars.errors import ButlerError

if TYPE_CHECKING:
    from streamstars.backfill import PrepareVisit

    from .discover import ButlerInventory
    from .repo import ButlerRepo
    from .snapshot import IngestedSnapshot

__all__ = ["SnapshotTarget", "butler_backfill_inputs", "collections_of", "publish_from_butler",
           "snapshot_target"]


def collections_of(args: argparse.Namespace) -> list[str]:
    """``--collections`` as a list; a Butler option without it is a usage error."""
    from .repo import parse_collections

    if not getattr(args, "collections", None):
        raise ButlerError("--butler needs --collections C[,C...] (the collections to search, "
                          "in order)")
    return parse_collections(args.collections)


def butler_backfill_inputs(args: argparse.Namespace) -> tuple[ButlerInventory, PrepareVisit]:
    """The visits of ``--butler``/``--collections``/``--instrument``/``--where`` and the
    step that reads one (see :func:`streamstars.backfill.backfill`).

    Raises:
        ButlerError: the extra is missing, or the repository, a collection or a dataset type
            cannot be used (nothing is applied).
    """
    from .discover import butler_inventory
    from .read import prepare_butler_visit
    from .repo import open_butler

    collections = collections_of(args)
    repo = open_butler(args.butler)
    inventory = butler_inventory(repo, collections, instrument=args.instrument or None,
                                 where=args.where or "")
    return inventory, prepare_butler_visit


@dataclass
class SnapshotTarget:
    """Where ``snapshot --butler`` ingests: checked before the snapshot is written."""

    repo: ButlerRepo
    run: str
    chain: str | None
    instrument: str

    def ingest(self, snapshot_dir: Path) -> IngestedSnapshot:
        """Ingest the written snapshot (one registry transaction)."""
        from .snapshot import ingest_snapshot

        return ingest_snapshot(self.repo, snapshot_dir, self.run, self.instrument,
                               chain=self.chain)


def snapshot_target(args: argparse.Namespace, formats: tuple[str, ...]) -> SnapshotTarget:
    """``--butler``/``--output-run``/``--output-chain``/``--instrument`` of ``snapshot``.

    Raises:
        ButlerError: the extra is missing, no --output-run, formats without fits or parquet,
            the repository cannot be opened for writing, the RUN exists, the instrument is
            unknown or ambiguous.
    """
    from .repo import open_butler, require_butler
    from .snapshot import check_output_run, choose_instrument

    require_butler("streamstars snapshot --butler")
    if not args.output_run:
        raise ButlerError("--butler needs --output-run RUN (the new RUN collection the "
                          "snapshot is ingested into)")
    if set(formats) != {"fits", "parquet"}:
        raise ButlerError("--butler ingests fgcmVisitCatalog.fits and the parquet catalogs: "
                          "keep --format fits,parquet")
    repo = open_butler(args.butler, writeable=True)
    check_output_run(repo, args.output_run, args.output_chain)
    instrument = choose_instrument(repo, args.instrument)
    return SnapshotTarget(repo, args.output_run, args.output_chain, instrument)


def publish_from_butler(args: argparse.Namespace, kafka_settings: dict[str, str],
                        routing: Any = None) -> int:
    """``streamstars publish --butler REPO --collections C [--watch]``; returns the exit code.
    ``routing``: a :class:`~streamstars.consumers.publisher.ShardRouting` (one event per
    (visit, shard)), or None.

    Raises:
        ButlerError: the extra is missing, the repository, a collection or a dataset type
            cannot be used, or ``--watch`` without ``--watch-state``.
    """
    import signal
    import threading

    from .repo import open_butler
    from .watch import ButlerWatcher, publish_butler, watch_butler

    if args.repo:
        raise ButlerError("give either a repository directory or --butler REPO, not both")
    collections = collections_of(args)
    if args.watch and not args.watch_state:
        raise ButlerError("--butler --watch needs --watch-state FILE (where the watcher "
                          "remembers what it published and its ingest_date watermark)")
    watcher = ButlerWatcher(open_butler(args.butler), collections,
                            instrument=args.instrument or None, where=args.where or "",
                            overlap_seconds=args.overlap_seconds, full_every=args.full_every)
    if not args.watch:
        result = publish_butler(watcher, args.bootstrap_servers, args.topic, kafka_settings,
                                args.watch_state, routing)
        shards = "" if routing is None else " routed by shard"
        print(f"published {len(result.published)} visit event(s){shards} to {args.topic}; "
              f"{len(result.waiting)} visit(s) without metadata (or footprint) yet")
        return 0
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    watch_butler(watcher, args.bootstrap_servers, args.topic, args.watch_state,
                 kafka_settings, poll_seconds=args.poll_seconds, stop=stop,
                 max_polls=args.max_polls, routing=routing)
    return 0
