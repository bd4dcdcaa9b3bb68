"""What the ``streamstars`` commands do with their Butler options (kept out of the CLI
modules so that these stay thin and never import the Butler unless a Butler option is given).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from streamstars.errors import ButlerError

if TYPE_CHECKING:
    from streamstars.backfill import PrepareVisit

    from .discover import ButlerInventory

__all__ = ["butler_backfill_inputs", "collections_of"]


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
