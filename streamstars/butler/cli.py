"""What the ``streamstars`` commands do with their Butler options (kept out of the CLI
modules so that these stay thin and never import the Butler unless a Butler option is given).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streamstars.errors import ButlerError

if TYPE_CHECKING:
    from streamstars.backfill import PrepareVisit

    from .discover import ButlerInventory
    from .repo import ButlerRepo
    from .snapshot import IngestedSnapshot

__all__ = ["SnapshotTarget", "butler_backfill_inputs", "collections_of", "snapshot_target"]


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
