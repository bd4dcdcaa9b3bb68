"""Retraction and replacement: the components around a visit's removed observations are
recomputed from the stored observations."""

from __future__ import annotations

import numpy as np

from streamstars.association.context import BandContext
from streamstars.association.fof import centres_of, fof_labels, summarize_pieces
from streamstars.association.members import forget_members
from streamstars.association.update import update_candidates
from streamstars.columns import ColumnDict, concat, take
from streamstars.sky import (
    fixed_unit_vectors,
    normalized,
    pixels_of,
    vectors_from_fixed,
    with_neighbours,
)
from streamstars.state.schema import COMPONENT_DTYPES
from streamstars.state.transaction import Transaction


def rebuild_after_removal(tx: Transaction, band: str, removed_pixels: np.ndarray,
                          removed_visit: int) -> None:
    """Delete a visit's observations of ``band`` and recompute the components they shaped.

    ``removed_pixels`` are the pixels that held the visit's observations; the observations of
    ``removed_visit`` must still be in the store (they are deleted here, after the "before"
    picture is taken).  Removing members can split components, so the region around the
    removed observations is recomputed from its observations: components before and after
    the removal are computed by FoF, and the after-pieces of every before-component centred in
    the region replace the stored ones.
    """
    ctx = BandContext(tx, band)
    inner = with_neighbours(removed_pixels, ctx.nside)
    outer = with_neighbours(inner, ctx.nside)
    before = tx.observations.positions(band, outer)
    tx.observations.delete_visit(band, removed_pixels, removed_visit)
    if band not in ctx.config.primaryBands:
        return
    new_comps, new_cands = _pieces_after_removal(ctx, before, removed_visit, inner)
    old, old_pixel = tx.components.load(band, outer)
    stay = ~np.isin(old_pixel, inner)
    removed = take(old, ~stay)
    new_pixel = pixels_of(centres_of(new_comps), ctx.nside)
    dirty = np.unique(np.concatenate([inner, new_pixel]))
    outside = np.setdiff1d(dirty, outer)
    extra, extra_pixel = tx.components.load(band, outside)
    table = concat([take(old, stay), new_comps, extra], COMPONENT_DTYPES)
    table_pixel = np.concatenate([old_pixel[stay], new_pixel, extra_pixel])
    tx.components.write(band, table, table_pixel, dirty)
    forget_members(ctx, removed["comp_id"][removed["tracked"]])
    nonclique = ~removed["clique"]
    update_candidates(ctx, removed["comp_id"][nonclique], old_pixel[~stay][nonclique],
                      new_comps, new_cands)


def _pieces_after_removal(ctx: BandContext, before: ColumnDict, removed_visit: int,
                          inner: np.ndarray) -> tuple[ColumnDict, ColumnDict]:
    """The components (and non-clique candidates), without the removed visit, of every
    component of ``before`` (the stored observations around the removal) centred in
    ``inner``."""
    fixed = fixed_unit_vectors(before["ra"], before["dec"])
    v = vectors_from_fixed(fixed)
    labels_before = fof_labels(v, ctx.radius)
    if len(labels_before):
        sums = np.zeros((labels_before.max() + 1, 3), dtype=np.int64)
        np.add.at(sums, labels_before, fixed)
        own_piece = np.isin(pixels_of(normalized(sums), ctx.nside), inner)
    else:
        own_piece = np.zeros(0, dtype=bool)
    remaining = before["visit"] != removed_visit
    labels_after = fof_labels(v[remaining], ctx.radius)
    kept_rows = own_piece[labels_before[remaining]] if len(labels_before) else \
        np.zeros(0, dtype=bool)
    wanted = np.unique(labels_after[kept_rows])
    rows = np.isin(labels_after, wanted)
    remap = np.full(labels_after.max() + 1 if len(labels_after) else 0, -1, dtype=np.int64)
    remap[wanted] = np.arange(len(wanted))
    sub = take(before, remaining)
    return summarize_pieces(sub["visit"][rows], sub["source_id"][rows], fixed[remaining][rows],
                            remap[labels_after[rows]], ctx.radius, ctx.min_per_band)
