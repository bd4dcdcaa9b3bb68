"""The per-visit update of one primary band's components (docs/association.md).

Per visit and band only the components within reach of the new observations are read; the
new observations and the components they link to form connected groups, and each group takes
one path: *lone* (a singleton component), *join* (:mod:`.join`), *in order*
(:mod:`.in_order`) or *exact* (:mod:`.exact`).  Every pixel whose component set changed is
then written back, with the explicit candidates of the non-clique components.
"""

from __future__ import annotations

import numpy as np

from streamstars.association.context import BandContext, BandUpdateStats, NewObservations
from streamstars.association.exact import refine_unsure_links, resolve_exactly
from streamstars.association.fof import EPS, centres_of
from streamstars.association.in_order import extend_in_order
from streamstars.association.join import join_cliques
from streamstars.association.links import LinkGroups, Links, bound_links, link_groups
from streamstars.association.members import append_members
from streamstars.columns import ColumnDict, concat, empty_columns, take
from streamstars.sky import pixels_near, pixels_of
from streamstars.state.schema import CANDIDATE_DTYPES, COMPONENT_DTYPES
from streamstars.state.tables import member_rows
from streamstars.state.transaction import Transaction


class _Loaded:
    """The component records within reach of a visit's observations, and what the update
    does to each of them."""

    def __init__(self, ctx: BandContext, new: NewObservations) -> None:
        # every component whose centre is within reach of a new observation
        bound = ctx.tx.components.max_rmax(ctx.band)
        self.pixels = pixels_near(new.vectors, ctx.nside, ctx.radius + bound + 2 * EPS)
        self.comps, self.comp_pixel = ctx.tx.components.load(ctx.band, self.pixels)
        self.centres = centres_of(self.comps)
        n = len(self.comps["comp_id"])
        self.changed = np.zeros(n, dtype=bool)  # updated in place (join path)
        self.deleted = np.zeros(n, dtype=bool)  # replaced by new records

    def __len__(self) -> int:
        return len(self.comps["comp_id"])


def add_observations(tx: Transaction, band: str, obs: ColumnDict) -> BandUpdateStats:
    """Fold one visit's new observations of primary ``band`` into the components.

    The observations must already be written to the observation store in ``tx``.
    """
    ctx = BandContext(tx, band)
    if len(obs["source_id"]) == 0:
        return ctx.stats
    new = NewObservations.of(obs, ctx.radius)
    loaded = _Loaded(ctx, new)
    ctx.stats.components_in_reach = len(loaded)
    links = bound_links(loaded.centres, loaded.comps["rmax"], new.tree, ctx.radius)
    if len(loaded):
        links = refine_unsure_links(ctx, loaded.comps, new.vectors, links)
    groups = link_groups(len(new), new.pairs, links, loaded.comps["clique"],
                         loaded.comps["tracked"])

    _join(ctx, loaded, groups, new)
    slow = ~(groups.join | groups.lone)
    ext_comps, ext_cands = _extend(ctx, loaded, groups, new, slow)
    singles = _singletons(new, np.flatnonzero(groups.lone))
    ctx.stats.new_singletons = len(singles["comp_id"])
    slow_comps, slow_cands = _resolve(ctx, loaded, links, new, slow)

    _write_components(ctx, loaded, concat([singles, slow_comps, ext_comps], COMPONENT_DTYPES))
    nonclique = loaded.deleted & ~loaded.comps["clique"]
    new_cands = concat([slow_cands, ext_cands], CANDIDATE_DTYPES)
    if nonclique.any() or len(new_cands["comp_id"]):
        update_candidates(ctx, loaded.comps["comp_id"][nonclique], loaded.comp_pixel[nonclique],
                          concat([slow_comps, ext_comps], COMPONENT_DTYPES), new_cands)
    return ctx.stats


def _join(ctx: BandContext, loaded: _Loaded, groups: LinkGroups, new: NewObservations) -> None:
    """Join path: groups that keep one clique a clique update it in place (and append to its
    member list when it is tracked)."""
    rows = np.flatnonzero(groups.join)
    if not len(rows):
        return
    owner = groups.comp_of_obs[rows]
    comps = loaded.comps
    old_id = comps["comp_id"].copy()
    changed = join_cliques(comps, loaded.centres, owner, new.source_id[rows], new.visit[rows],
                           new.fixed[rows], new.vectors[rows])
    in_tracked = comps["tracked"][owner]
    if in_tracked.any():
        append_members(ctx, old_id, comps["comp_id"], owner[in_tracked],
                       member_rows(new.source_id[rows][in_tracked],
                                   new.visit[rows][in_tracked], new.fixed[rows][in_tracked]))
    loaded.changed[changed] = True
    ctx.stats.fast = len(rows)


def _extend(ctx: BandContext, loaded: _Loaded, groups: LinkGroups, new: NewObservations,
            slow: np.ndarray) -> tuple[ColumnDict, ColumnDict]:
    """In-order path (``minPerBand`` <= 2): observations that come after every member of one
    tracked component extend its greedy; the rows done leave ``slow`` (updated in place)."""
    rows = np.flatnonzero(groups.extend)
    if not len(rows) or ctx.min_per_band > 2:
        return empty_columns(COMPONENT_DTYPES), empty_columns(CANDIDATE_DTYPES)
    comps, cands, done = extend_in_order(ctx, loaded.comps, loaded.comp_pixel,
                                         groups.comp_of_obs[rows], new, rows)
    slow[rows[done]] = False
    loaded.deleted[np.unique(groups.comp_of_obs[rows[done]])] = True
    ctx.stats.extended = int(done.sum())
    return comps, cands


def _singletons(new: NewObservations, rows: np.ndarray) -> ColumnDict:
    """Lone observations: one singleton component each (a clique, untracked)."""
    return {
        "comp_id": new.source_id[rows], "count": np.ones(len(rows), np.int64),
        "sx": new.fixed[rows, 0], "sy": new.fixed[rows, 1], "sz": new.fixed[rows, 2],
        "rmax": np.full(len(rows), EPS), "clique": np.ones(len(rows), bool),
        "seed_visit": new.visit[rows], "seed_src": new.source_id[rows],
        "tracked": np.zeros(len(rows), bool),
    }


def _resolve(ctx: BandContext, loaded: _Loaded, links: Links, new: NewObservations,
             slow: np.ndarray) -> tuple[ColumnDict, ColumnDict]:
    """Exact path: FoF over the stored members of the components the remaining rows link
    to (marked deleted: the exact pieces replace them)."""
    rows = np.flatnonzero(slow)
    if not len(rows):
        return empty_columns(COMPONENT_DTYPES), empty_columns(CANDIDATE_DTYPES)
    involved = np.unique(links.comp[slow[links.new]])
    if np.any(loaded.deleted[involved]):
        raise AssertionError("a component is both extended and resolved exactly")
    comps, cands = resolve_exactly(ctx, new.subset(rows), new.fixed[rows],
                                   {k: v[involved] for k, v in loaded.comps.items()},
                                   loaded.centres[involved])
    loaded.deleted[involved] = True
    ctx.stats.slow_observations = len(rows)
    ctx.stats.slow_components = len(involved)
    return comps, cands


def _write_components(ctx: BandContext, loaded: _Loaded, added: ColumnDict) -> None:
    """Write back every pixel whose component set changed: the kept records, the ``added``
    ones, and the records of pixels outside the loaded ones that gain a component."""
    comps, comp_pixel = loaded.comps, loaded.comp_pixel
    new_pixel = comp_pixel.copy()  # only a changed component can move to another pixel
    new_pixel[loaded.changed] = pixels_of(loaded.centres[loaded.changed], ctx.nside)
    added_pixel = pixels_of(centres_of(added), ctx.nside)
    dirty = np.unique(np.concatenate([
        comp_pixel[loaded.changed | loaded.deleted], new_pixel[loaded.changed], added_pixel]))
    keep_rows = ~loaded.deleted & np.isin(new_pixel, dirty)
    outside = np.setdiff1d(dirty, loaded.pixels)
    extra, extra_pixel = ctx.tx.components.load(ctx.band, outside)
    table = concat([take(comps, keep_rows), added, extra], COMPONENT_DTYPES)
    table_pixel = np.concatenate([new_pixel[keep_rows], added_pixel, extra_pixel])
    ctx.tx.components.write(ctx.band, table, table_pixel, dirty)


def update_candidates(ctx: BandContext, removed_ids: np.ndarray, removed_pixels: np.ndarray,
                      new_comps: ColumnDict, new_cands: ColumnDict) -> None:
    """Replace the explicit candidates of removed non-clique components by the new ones
    (stored under the pixel of their component's centre)."""
    new_pixel_of_comp = pixels_of(centres_of(new_comps), ctx.nside)
    cand_pixel = np.zeros(0, np.int64)
    if len(new_cands["comp_id"]):
        order = np.argsort(new_comps["comp_id"])
        cand_pixel = new_pixel_of_comp[order][np.searchsorted(new_comps["comp_id"][order],
                                                              new_cands["comp_id"])]
    dirty = np.unique(np.concatenate([removed_pixels, cand_pixel]))
    existing, existing_pixel = ctx.tx.candidates.load(ctx.band, dirty)
    keep = ~np.isin(existing["comp_id"], removed_ids)
    table = concat([take(existing, keep), new_cands], CANDIDATE_DTYPES)
    table_pixel = np.concatenate([existing_pixel[keep], cand_pixel])
    ctx.tx.candidates.write(ctx.band, table, table_pixel, dirty)
