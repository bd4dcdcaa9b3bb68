"""Friends-of-friends components and their exact summaries (pure functions, no store).

A *piece* is a complete 1" friends-of-friends component of one band's observations: every
observation within ``matchRadius`` of a member is a member.  Its record holds the exact
integer sums of its members' fixed-point unit vectors, an upper bound ``rmax`` of the member
distance from the centre, whether it is a *clique* (every member within the radius of every
other) and its seed (earliest member in canonical (visit, sourceId) order); non-clique pieces
also get the candidates of fgcm's greedy replayed on them (:mod:`.greedy`).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from streamstars.association.greedy import replay_greedy
from streamstars.columns import ColumnDict, empty_columns
from streamstars.sky import chord_from_arcsec, kdtree, normalized, vectors_from_fixed
from streamstars.state.schema import CANDIDATE_DTYPES, COMPONENT_DTYPES

#: Safety margin (chord units, ~2e-7 arcsec) so that bound-based decisions are never
#: flipped by floating-point rounding; anything inside the margin takes the exact path.
EPS = 1e-12


def match_chord(match_radius_arcsec: float) -> float:
    """The chord of ``matchRadius`` [arcsec]: the radius every association decision uses."""
    return chord_from_arcsec(match_radius_arcsec)


def centres_of(records: ColumnDict) -> np.ndarray:
    """Unit-vector centres (n, 3) of component or candidate records (from their sums)."""
    if len(records["sx"]) == 0:
        return np.zeros((0, 3))
    return normalized(np.stack([records["sx"], records["sy"], records["sz"]], axis=1))


def fof_labels(vectors: np.ndarray, radius_chord: float) -> np.ndarray:
    """Friends-of-friends labels (0..k-1) of unit vectors within ``radius_chord``."""
    if len(vectors) == 0:
        return np.zeros(0, dtype=np.int64)
    edges = kdtree(vectors).query_pairs(radius_chord, output_type="ndarray").astype(np.int64)
    return labels_from_edges(len(vectors), edges)


def labels_from_edges(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component labels (0..k-1) of ``n`` nodes joined by ``edges`` (m, 2)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                       shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def summarize_pieces(visit: np.ndarray, source_id: np.ndarray, fixed: np.ndarray,
                     labels: np.ndarray, radius: float, min_per_band: int,
                     known_nonclique: np.ndarray | None = None
                     ) -> tuple[ColumnDict, ColumnDict]:
    """Component records (and non-clique candidates) of complete FoF pieces.

    Args:
        visit, source_id: identity of each row.
        fixed: fixed-point unit vectors (n, 3) of the rows.
        labels: each row's piece (every value 0..max occurring); every observation within
            ``radius`` of a row must be in the rows and in the same piece.
        radius: the chord radius.
        min_per_band: fgcm's ``minPerBand``.
        known_nonclique: per piece, already known not to be a clique (its neighbour counts
            are then not computed when ``min_per_band <= 2``).

    Returns:
        (components, candidates): one component record per piece (``COMPONENT_DTYPES``, in
        label order, untracked) and the candidates of the non-clique pieces
        (``CANDIDATE_DTYPES``).  Neighbour counts come from a k-d tree (no pair list is
        built: the pieces of close pairs are dense).
    """
    if len(labels) == 0:
        return empty_columns(COMPONENT_DTYPES), empty_columns(CANDIDATE_DTYPES)
    v_rows = vectors_from_fixed(fixed)
    tree = kdtree(v_rows)
    order = np.lexsort((source_id, visit, labels))
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    count = np.diff(np.r_[starts, len(lab)])
    skip = np.zeros(len(count), dtype=bool) if known_nonclique is None or min_per_band > 2 \
        else known_nonclique & (count >= 2)
    n_near = np.full(len(labels), 2, dtype=np.int64)  # stands for ">= 2" in skipped pieces
    counted = ~skip[labels]
    if counted.any():
        n_near[counted] = tree.query_ball_point(v_rows[counted], radius, return_length=True)
    sums = np.add.reduceat(fixed[order], starts, axis=0)
    comp_id = np.minimum.reduceat(source_id[order], starts)
    centres = normalized(sums)
    offsets = v_rows[order] - np.repeat(centres, count, axis=0)
    dist = np.sqrt(np.einsum("ij,ij->i", offsets, offsets))
    rmax = np.maximum.reduceat(dist, starts) + EPS
    # a piece is a clique when every member has every member within the radius
    clique = (np.minimum.reduceat(n_near[order], starts) == count) & ~skip
    components = {
        "comp_id": comp_id, "count": count.astype(np.int64),
        "sx": sums[:, 0], "sy": sums[:, 1], "sz": sums[:, 2],
        "rmax": rmax, "clique": clique,
        "seed_visit": visit[order][starts], "seed_src": source_id[order][starts],
        "tracked": np.zeros(len(count), dtype=bool),
    }
    candidates = replay_greedy(visit, source_id, fixed, labels, tree, n_near, ~clique[labels],
                               comp_id, radius, min_per_band)
    return components, candidates
