"""The *in-order* path: fgcm's greedy of tracked components extended by new observations that
come after every member in canonical order.

When every member of a component precedes its new observations in canonical order and
``minPerBand`` <= 2, every member is already covered or a seed (a member of a FoF component of
two or more has a neighbour; a lone member becomes a seed now), so the old decisions stand:
each old candidate's group gains the new observations within the radius of its seed, and the
new observations then seed, in canonical order, when uncovered with enough neighbours.  No
work is proportional to the number of other components.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamstars.association.context import BandContext, NewObservations
from streamstars.association.fof import EPS, centres_of
from streamstars.association.greedy import extend_seeds
from streamstars.association.links import member_distances
from streamstars.association.members import member_vectors
from streamstars.columns import ColumnDict, concat, empty_columns, take
from streamstars.errors import StateError
from streamstars.state.schema import CANDIDATE_DTYPES, COMPONENT_DTYPES
from streamstars.state.tables import member_rows


@dataclass
class _Targets:
    """The tracked components new observations extend, their members, and the distance of
    every (new observation, member of its component) pair."""

    index: np.ndarray  # the components (indices into the loaded records), sorted
    slot: np.ndarray  # per new observation: its component (index into ``index``)
    members: np.ndarray  # MEMBER_DTYPE rows of every component, in ``index`` order
    counts: np.ndarray  # members per component
    m_start: np.ndarray  # where each component's members start
    m_fixed: np.ndarray  # members' fixed-point vectors
    m_vec: np.ndarray  # members' unit vectors
    pair_row: np.ndarray  # per pair: the new observation (index into the rows)
    pair_member: np.ndarray  # per pair: the member (index into ``members``)
    dist: np.ndarray  # per pair: chord distance
    within: np.ndarray  # per pair: dist <= radius


def extend_in_order(ctx: BandContext, comps: ColumnDict, comp_pixel: np.ndarray,
                    owner: np.ndarray, new: NewObservations, rows: np.ndarray
                    ) -> tuple[ColumnDict, ColumnDict, np.ndarray]:
    """Extend the greedy of tracked components by new observations that come last.

    Args:
        ctx: the band's context (``minPerBand`` <= 2).
        comps, comp_pixel: the loaded component records and the pixel of each.
        owner: per row, the one tracked component its group is linked to.
        new: the visit's new observations.
        rows: the new observations to extend with (indices into ``new``).

    Returns:
        (updated component records, their explicit candidates, per row: done).  Rows not done
        (a member is not earlier, or a distance sits within rounding of the radius) are left
        for the exact path.  The member lists of the extended components are written.
    """
    targets = _targets(ctx, comps, owner, new, rows)
    ok = _usable(targets, new.visit[rows], ctx.radius)
    if not ok.any():
        return (empty_columns(COMPONENT_DTYPES), empty_columns(CANDIDATE_DTYPES),
                np.zeros(len(rows), dtype=bool))
    done = ok[targets.slot]
    cands, cand_of_member = _old_candidates(ctx, comps, comp_pixel, targets, ok)
    use = targets.within & done[targets.pair_row]
    covered = _gain(cands, cand_of_member, targets, use, new, rows)
    pr = _row_pairs(new, rows)
    seeds, seed_slot = _new_seeds(ctx, targets, use, covered, done, pr, new, rows)
    out, old_ids = _extended_records(comps, targets, done, pr, new, rows)
    _write_member_lists(ctx, targets, ok, done, out, old_ids, new, rows)
    return take(out, ok), _renamed_candidates(cands, seeds, seed_slot, out, old_ids, ok), done


def _targets(ctx: BandContext, comps: ColumnDict, owner: np.ndarray, new: NewObservations,
             rows: np.ndarray) -> _Targets:
    """Read the members of the components ``owner`` and measure every pair."""
    index, slot = np.unique(owner, return_inverse=True)
    members = ctx.tx.members.read(ctx.band, comps["comp_id"][index])
    counts = comps["count"][index]
    if len(members) != counts.sum():
        raise StateError(f"store is inconsistent: band {ctx.band} member lists do not match "
                         "the component counts; rebuild the store")
    m_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    m_fixed, m_vec = member_vectors(members)
    pair_row, pair_member, dist = member_distances(new.vectors[rows], m_vec, m_start[slot],
                                                   counts[slot])
    return _Targets(index, slot, members, counts, m_start, m_fixed, m_vec, pair_row,
                    pair_member, dist, dist <= ctx.radius)


def _usable(t: _Targets, row_visit: np.ndarray, radius: float) -> np.ndarray:
    """Per component: every member from a strictly earlier visit than its new observations,
    and no distance within rounding of the radius."""
    latest = np.maximum.reduceat(t.members["visit"], t.m_start) if len(t.members) else t.counts
    earliest_new = np.minimum.reduceat(row_visit[np.argsort(t.slot, kind="stable")],
                                       np.searchsorted(np.sort(t.slot), np.arange(len(t.index))))
    ok = latest < earliest_new
    ambiguous = np.abs(t.dist - radius) <= EPS
    return ok & (np.bincount(t.slot[t.pair_row[ambiguous]], minlength=len(t.index)) == 0)


def _old_candidates(ctx: BandContext, comps: ColumnDict, comp_pixel: np.ndarray,
                    t: _Targets, ok: np.ndarray) -> tuple[ColumnDict, np.ndarray]:
    """The candidates of the usable components (explicit ones of non-cliques, the implicit
    one of a clique; writable) and, per member, the candidate it seeds (-1: none)."""
    nonclique = ~comps["clique"][t.index]
    stored, _ = ctx.tx.candidates.load(ctx.band, np.unique(comp_pixel[t.index[nonclique]]))
    stored = take(stored, np.isin(stored["comp_id"], comps["comp_id"][t.index[nonclique & ok]]))
    cl = t.index[~nonclique & ok]
    implicit = {"comp_id": comps["comp_id"][cl], "star_id": comps["comp_id"][cl],
                "count": comps["count"][cl], "sx": comps["sx"][cl], "sy": comps["sy"][cl],
                "sz": comps["sz"][cl], "seed_visit": comps["seed_visit"][cl],
                "seed_src": comps["seed_src"][cl]}
    cands = {k: np.array(v) for k, v in concat([stored, implicit], CANDIDATE_DTYPES).items()}
    source_id = t.members["source_id"]
    by_src = np.argsort(source_id)
    seed_member = by_src[np.searchsorted(source_id, cands["seed_src"], sorter=by_src)] \
        if len(cands["seed_src"]) else np.zeros(0, dtype=np.int64)
    if len(seed_member) and np.any(source_id[seed_member] != cands["seed_src"]):
        raise StateError(f"store is inconsistent: band {ctx.band} candidate seeds are not "
                         "members of their components; rebuild the store")
    cand_of_member = np.full(len(t.members), -1, dtype=np.int64)
    cand_of_member[seed_member] = np.arange(len(seed_member))
    return cands, cand_of_member


def _gain(cands: ColumnDict, cand_of_member: np.ndarray, t: _Targets, use: np.ndarray,
          new: NewObservations, rows: np.ndarray) -> np.ndarray:
    """Old candidates gain the new observations within the radius of their seed (in place);
    returns, per row, whether it is covered now."""
    gains = use & (cand_of_member[t.pair_member] >= 0)
    g_cand, g_row = cand_of_member[t.pair_member[gains]], rows[t.pair_row[gains]]
    np.add.at(cands["count"], g_cand, 1)
    for axis, key in enumerate(("sx", "sy", "sz")):
        np.add.at(cands[key], g_cand, new.fixed[g_row, axis])
    np.minimum.at(cands["star_id"], g_cand, new.source_id[g_row])
    return np.bincount(t.pair_row[gains], minlength=len(rows)) > 0


def _row_pairs(new: NewObservations, rows: np.ndarray) -> np.ndarray:
    """The pairs of new observations within the radius of each other among ``rows``, as
    indices into ``rows``."""
    local = np.full(len(new), -1, dtype=np.int64)
    local[rows] = np.arange(len(rows))
    pr = local[new.pairs] if len(new.pairs) else np.zeros((0, 2), dtype=np.int64)
    return pr[(pr >= 0).all(axis=1)] if len(pr) else pr


def _new_seeds(ctx: BandContext, t: _Targets, use: np.ndarray, covered: np.ndarray,
               done: np.ndarray, pr: np.ndarray, new: NewObservations, rows: np.ndarray
               ) -> tuple[ColumnDict, np.ndarray]:
    """New candidates seeded, in canonical order, by uncovered new observations with enough
    neighbours (members, other new observations, itself); rare: a new star.  Returns the
    candidates (``comp_id`` still 0) and the component (index into ``t.index``) of each."""
    n_near = np.bincount(t.pair_row[use], minlength=len(rows)) + 1 + np.bincount(
        pr.ravel(), minlength=len(rows))
    potential = np.flatnonzero(done & ~covered & (n_near >= ctx.min_per_band))
    if not len(potential):
        return empty_columns(CANDIDATE_DTYPES), np.zeros(0, dtype=np.int64)
    neighbours: dict[int, list[int]] = {}
    for a, b in pr.tolist():
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    order_keys = (new.source_id[rows[potential]], new.visit[rows[potential]],
                  t.slot[potential])
    star_id, count, sums, seed_visit, seed_src, slot = [], [], [], [], [], []
    for r, near_new in extend_seeds(potential, covered, order_keys, neighbours):
        near_members = t.pair_member[(t.pair_row == r) & t.within]
        group_src = np.concatenate([t.members["source_id"][near_members],
                                    new.source_id[rows[near_new]]])
        sums.append(t.m_fixed[near_members].sum(axis=0) + new.fixed[rows[near_new]].sum(axis=0))
        star_id.append(group_src.min())
        count.append(len(group_src))
        seed_visit.append(new.visit[rows[r]])
        seed_src.append(new.source_id[rows[r]])
        slot.append(t.slot[r])
    total = np.array(sums, dtype=np.int64).reshape(-1, 3)
    seeds = {"comp_id": np.zeros(len(slot), dtype=np.int64),
             "star_id": np.array(star_id, dtype=np.int64),
             "count": np.array(count, dtype=np.int64),
             "sx": total[:, 0], "sy": total[:, 1], "sz": total[:, 2],
             "seed_visit": np.array(seed_visit, dtype=np.int64),
             "seed_src": np.array(seed_src, dtype=np.int64)}
    return seeds, np.array(slot, dtype=np.int64)


def _extended_records(comps: ColumnDict, t: _Targets, done: np.ndarray, pr: np.ndarray,
                      new: NewObservations, rows: np.ndarray) -> tuple[ColumnDict, np.ndarray]:
    """The component records after the extension (every target; the unusable ones are
    dropped by the caller) and their ids before it."""
    rows_ok = np.flatnonzero(done)
    s_ok = t.slot[rows_ok]
    n = len(t.index)
    add_fixed = np.zeros((n, 3), dtype=np.int64)
    np.add.at(add_fixed, s_ok, new.fixed[rows[rows_ok]])
    min_src = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(min_src, s_ok, new.source_id[rows[rows_ok]])
    out = take(comps, t.index)
    out["count"] = out["count"] + np.bincount(s_ok, minlength=n)
    for axis, key in enumerate(("sx", "sy", "sz")):
        out[key] = out[key] + add_fixed[:, axis]
    old_ids = out["comp_id"].copy()
    out["comp_id"] = np.minimum(out["comp_id"], min_src)
    centre = centres_of(out)
    m_slot = np.repeat(np.arange(n), t.counts)
    m_off = t.m_vec - centre[m_slot]
    n_off = new.vectors[rows][rows_ok] - centre[s_ok]
    rmax = np.zeros(n)
    np.maximum.at(rmax, m_slot, np.sqrt(np.einsum("ij,ij->i", m_off, m_off)))
    np.maximum.at(rmax, s_ok, np.sqrt(np.einsum("ij,ij->i", n_off, n_off)))
    out["rmax"] = rmax + EPS
    # a clique stays one when every new observation is within the radius of every member and
    # of every other new observation
    far = np.bincount(t.slot[t.pair_row[~t.within]], minlength=n) > 0
    k_new = np.bincount(t.slot, minlength=n)
    k_pairs = np.bincount(t.slot[pr[:, 0]], minlength=n) if len(pr) else \
        np.zeros(n, dtype=np.int64)
    out["clique"] = out["clique"] & ~far & (k_pairs == k_new * (k_new - 1) // 2)
    out["tracked"] = np.ones(n, dtype=bool)
    return out, old_ids


def _write_member_lists(ctx: BandContext, t: _Targets, ok: np.ndarray, done: np.ndarray,
                        out: ColumnDict, old_ids: np.ndarray, new: NewObservations,
                        rows: np.ndarray) -> None:
    """Member lists of the extended components: old bytes + the new rows (renamed when the
    component's id changed)."""
    added = member_rows(new.source_id[rows], new.visit[rows], new.fixed[rows])
    rows_ok = np.flatnonzero(done)
    order = rows_ok[np.argsort(t.slot[rows_ok], kind="stable")]
    bounds = np.searchsorted(t.slot[order], np.arange(len(t.index) + 1))
    for k in np.flatnonzero(ok).tolist():
        value = t.members[t.m_start[k]:t.m_start[k] + t.counts[k]].tobytes() + \
            added[order[bounds[k]:bounds[k + 1]]].tobytes()
        if old_ids[k] != out["comp_id"][k]:
            ctx.tx.members.delete(ctx.band, int(old_ids[k]))
        ctx.tx.members.put(ctx.band, int(out["comp_id"][k]), value)


def _renamed_candidates(cands: ColumnDict, seeds: ColumnDict, seed_slot: np.ndarray,
                        out: ColumnDict, old_ids: np.ndarray, ok: np.ndarray) -> ColumnDict:
    """The candidates of the components that are not cliques now, under their new ids."""
    t = np.flatnonzero(ok)
    by_old = np.argsort(old_ids[t])
    cands["comp_id"] = out["comp_id"][t][by_old][np.searchsorted(old_ids[t], cands["comp_id"],
                                                                 sorter=by_old)]
    if len(seed_slot):
        seeds = dict(seeds, comp_id=out["comp_id"][seed_slot])
        cands = concat([cands, seeds], CANDIDATE_DTYPES)
    still_clique = out["comp_id"][t[out["clique"][t]]]
    return take(cands, ~np.isin(cands["comp_id"], still_clique))
