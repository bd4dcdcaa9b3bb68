"""The *exact* path: components resolved from their members (rare: merges, unsure links to
untracked components, groups of new observations only), and unsure links settled from
member lists.

Members of tracked components come from their member lists; those of untracked ones (cliques
that only ever took the join path) from the stored observations within their ``rmax`` disc.
The resulting components are tracked: their member lists are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamstars.association.context import BandContext
from streamstars.association.fof import EPS, labels_from_edges, summarize_pieces
from streamstars.association.links import Links, member_distances, settle_links
from streamstars.association.members import forget_members, member_vectors, write_member_lists
from streamstars.columns import ColumnDict
from streamstars.sky import fixed_unit_vectors, kdtree, vectors_from_fixed
from streamstars.state.tables import member_rows


def refine_unsure_links(ctx: BandContext, comps: ColumnDict, v_new: np.ndarray,
                        links: Links) -> Links:
    """Decide unsure links to *tracked* components exactly from their member lists.

    Bounds get loose for components next to a close neighbour; their member lists settle
    most such links (no member within reach -> no link; every member within reach -> sure)
    without the exact path.  Links to untracked components stay unsure.
    """
    check = np.flatnonzero(~links.sure & comps["tracked"][links.comp])
    if len(check) == 0:
        return links
    wanted = np.unique(links.comp[check])
    members = ctx.tx.members.read(ctx.band, comps["comp_id"][wanted])
    counts = comps["count"][wanted]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.searchsorted(wanted, links.comp[check])
    _, _, dist = member_distances(v_new[links.new[check]], member_vectors(members)[1],
                                  starts[slot], counts[slot])
    return settle_links(links, check, dist, counts[slot], ctx.radius)


@dataclass
class _Rows:
    """Observations gathered for the exact path: members first, then the new observations,
    then the re-read ones (each sourceId once)."""

    block: np.ndarray  # the tracked component a row is a member of (-1: new or re-read)
    visit: np.ndarray
    source_id: np.ndarray
    fixed: np.ndarray

    def first_copies(self) -> _Rows:
        """Each sourceId once (the first copy wins: members, new, region), in row order."""
        _, first = np.unique(self.source_id, return_index=True)
        first = np.sort(first)
        return _Rows(self.block[first], self.visit[first], self.source_id[first],
                     self.fixed[first])


def resolve_exactly(ctx: BandContext, new_obs: ColumnDict, new_fixed: np.ndarray,
                    involved: ColumnDict, involved_centres: np.ndarray
                    ) -> tuple[ColumnDict, ColumnDict]:
    """Exact components containing ``new_obs`` or the ``involved`` components' members.

    Args:
        ctx: the band's context (its stats count the untracked components re-read).
        new_obs, new_fixed: the new observations taking this path and their fixed-point
            vectors.
        involved, involved_centres: the component records they link to, and their centres.

    Returns:
        (components, candidates) replacing the involved components, tracked (their member
        lists are written; those of the involved components are forgotten).
    """
    tracked = involved["tracked"]
    rows = _gather(ctx, new_obs, new_fixed, involved, involved_centres).first_copies()
    is_new = np.isin(rows.source_id, new_obs["source_id"])
    labels = labels_from_edges(len(rows.source_id), _exact_edges(rows, is_new, ctx.radius))
    anchors = is_new | np.isin(rows.source_id, involved["seed_src"])
    wanted = np.unique(labels[anchors])
    kept = np.isin(labels, wanted)
    remap = np.full(labels.max() + 1 if len(labels) else 0, -1, dtype=np.int64)
    remap[wanted] = np.arange(len(wanted))
    piece = remap[labels[kept]]
    # a piece holding a member of a non-clique component is a non-clique itself
    nonclique_blocks = np.flatnonzero(~involved["clique"][tracked])
    in_nonclique = np.isin(rows.block[kept], nonclique_blocks) & (rows.block[kept] >= 0)
    known_nonclique = np.bincount(piece[in_nonclique], minlength=len(wanted)) > 0
    comps, cands = summarize_pieces(rows.visit[kept], rows.source_id[kept], rows.fixed[kept],
                                    piece, ctx.radius, ctx.min_per_band, known_nonclique)
    comps["tracked"][:] = True
    forget_members(ctx, involved["comp_id"][tracked])
    write_member_lists(ctx, comps["comp_id"],
                       member_rows(rows.source_id[kept], rows.visit[kept], rows.fixed[kept]),
                       piece)
    return comps, cands


def _gather(ctx: BandContext, new_obs: ColumnDict, new_fixed: np.ndarray, involved: ColumnDict,
            involved_centres: np.ndarray) -> _Rows:
    """The members of the involved components and the new observations: member lists of
    tracked components, stored observations within the ``rmax`` disc of untracked ones."""
    tracked = involved["tracked"]
    known = ctx.tx.members.read(ctx.band, involved["comp_id"][tracked])
    n_new = len(new_obs["source_id"])
    blocks = [np.repeat(np.arange(int(tracked.sum())), involved["count"][tracked]),
              np.full(n_new, -1, dtype=np.int64)]
    visit = [known["visit"], new_obs["visit"]]
    source_id = [known["source_id"], new_obs["source_id"]]
    fixed = [member_vectors(known)[0], new_fixed]
    untracked = ~tracked
    if untracked.any():
        centres, rmax = involved_centres[untracked], involved["rmax"][untracked] + EPS
        region = ctx.tx.observations.positions_near(ctx.band, centres, rmax)
        ctx.stats.untracked_components += int(untracked.sum())
        ctx.stats.region_observations += len(region["source_id"])
        if len(region["source_id"]):
            region_fixed = fixed_unit_vectors(region["ra"], region["dec"])
            near = kdtree(vectors_from_fixed(region_fixed)).query_ball_point(
                centres, rmax, return_sorted=False)
            rows = np.unique(np.concatenate([np.asarray(n, dtype=np.int64) for n in near]))
            blocks.append(np.full(len(rows), -1, dtype=np.int64))
            visit.append(region["visit"][rows])
            source_id.append(region["source_id"][rows])
            fixed.append(region_fixed[rows])
    return _Rows(np.concatenate(blocks), np.concatenate(visit), np.concatenate(source_id),
                 np.concatenate(fixed))


def _exact_edges(rows: _Rows, is_new: np.ndarray, radius: float) -> np.ndarray:
    """FoF edges without the dense member-member pairs: a tracked component is connected
    already (its members are chained), re-read observations are linked among themselves, and
    anything else can only be joined through a new observation."""
    v_all = vectors_from_fixed(rows.fixed)
    by_block = np.flatnonzero(rows.block >= 0)
    by_block = by_block[np.argsort(rows.block[by_block], kind="stable")]
    same = rows.block[by_block[1:]] == rows.block[by_block[:-1]]
    edge_parts = [np.stack([by_block[:-1][same], by_block[1:][same]], axis=1)]
    reread = np.flatnonzero((rows.block < 0) & ~is_new)
    if len(reread) > 1:
        pairs = kdtree(v_all[reread]).query_pairs(radius, output_type="ndarray")
        edge_parts.append(reread[pairs.astype(np.int64)])
    new_rows = np.flatnonzero(is_new)
    hits = kdtree(v_all[new_rows]).sparse_distance_matrix(kdtree(v_all), radius,
                                                          output_type="ndarray")
    edge_parts.append(np.stack([new_rows[hits["i"]], hits["j"].astype(np.int64)], axis=1))
    return np.concatenate(edge_parts).astype(np.int64)
