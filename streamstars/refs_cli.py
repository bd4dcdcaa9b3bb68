"""``streamstars refresh-refs``: rebuild a store's reference-star cache.

``streamstars refresh-refs --state DIR [--config FILE] [--no-progress]`` validates the
configured ``[fgcmLoadReferenceCatalog]`` (``--config``, else the configuration the store was
built with), drops every ``refmatch`` record and caches the reference stars of every pixel
holding observations and of its neighbours, in ONE write transaction per shard
(:func:`streamstars.references.refresh_all`).  The store's ``meta/refcat`` and the reference
table of its stored configuration are updated, so later ``backfill``/``run``/``snapshot``
accept the new catalog or settings.  An empty ``path`` drops the cache.  Exit code 2 for an
unusable catalog or configuration.
"""

from __future__ import annotations

import argparse
from typing import Any


def cmd_refresh_refs(args: argparse.Namespace) -> int:
    """Run ``refresh-refs``; prints the reference stars cached and the time taken."""
    from streamstars.config import load_config
    from streamstars.references import attach_references, open_reference_source, refresh_all
    from streamstars.state import StateDirectory

    config = load_config(args.config) if args.config else None
    if config is not None:
        # validate the catalog before the store is touched
        open_reference_source(config.fgcmLoadReferenceCatalog, args.butler)
    with StateDirectory.open(args.state, config) as state:
        source = attach_references(state, check=False, butler=args.butler)
        n_refs, seconds = refresh_all(state, source, progress=not args.no_progress)
        n_pixels = 0
        for _, pixel in state.shards():
            with state.open_shard(pixel).read() as tx:
                n_pixels += tx.refcache.count()
    if source is None:
        print(f"refresh-refs: no reference catalog configured; reference cache dropped "
              f"({seconds:.2f} s)")
    else:
        print(f"refresh-refs: {n_refs:,} reference stars cached in {n_pixels:,} pixels from "
              f"{source.refcat.dataset_name!r} ({source.refcat.path}, filters "
              f"{','.join(source.filters)}) in {seconds:.2f} s")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``refresh-refs`` to the ``streamstars`` subcommands."""
    p = sub.add_parser("refresh-refs",
                       help="rebuild the reference-star cache (after a refcat or config change)")
    p.add_argument("--state", required=True, help="state directory")
    p.add_argument("--config", help="TOML config whose [fgcmLoadReferenceCatalog] to use "
                   "(default: the one the store was built with)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--butler", metavar="REPO", help="the Butler repository of a reference "
                   "catalog configured by fgcmLoadReferenceCatalog.collections (when its repo "
                   "key is empty)")
    p.set_defaults(func=cmd_refresh_refs)
