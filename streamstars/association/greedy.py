"""fgcm's greedy seeding, replayed on pieces and extended in canonical order (pure functions).

fgcm seeds stars per primary band greedily: in canonical order (visit, sourceId) an
observation that is not yet covered and has >= ``minPerBand`` same-band observations within
``matchRadius`` (itself included, covered or not) seeds a candidate at the mean of that group
and covers the whole group.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from streamstars.columns import ColumnDict, empty_columns
from streamstars.state.schema import CANDIDATE_DTYPES


def replay_greedy(visit: np.ndarray, source_id: np.ndarray, fixed: np.ndarray,
                  labels: np.ndarray, tree: cKDTree, n_near: np.ndarray, rows: np.ndarray,
                  comp_id_of_label: np.ndarray, radius: float, min_per_band: int
                  ) -> ColumnDict:
    """fgcm's greedy seeding replayed on the rows ``rows`` (members of non-clique pieces).

    Args:
        visit, source_id, fixed: identity and fixed-point unit vectors of every row.
        labels: each row's piece.
        tree: k-d tree of the rows' unit vectors.
        n_near: rows within ``radius`` of each row (itself included).
        rows: bool, the rows whose pieces are replayed.
        comp_id_of_label: the component id of each piece.
        radius: chord radius; ``min_per_band``: fgcm's ``minPerBand``.

    Returns:
        The candidates (``CANDIDATE_DTYPES``) in seeding order.  Pieces are independent, so
        one pass in canonical (label, visit, sourceId) order replays them all.  The loop runs
        over potential seeds only (observations with enough neighbours) and queries the tree
        for each seed's group: the rare non-clique components are the only place
        association loops in Python.
    """
    if not rows.any():
        return empty_columns(CANDIDATE_DTYPES)
    canonical = np.lexsort((source_id, visit, labels))
    potential = canonical[rows[canonical] & (n_near[canonical] >= min_per_band)]
    covered = np.zeros(len(labels), dtype=bool)
    v_rows = tree.data
    seeds: list[int] = []
    groups: list[np.ndarray] = []
    for r in potential.tolist():
        if covered[r]:
            continue
        group = np.asarray(tree.query_ball_point(v_rows[r], radius), dtype=np.int64)
        covered[group] = True
        seeds.append(r)
        groups.append(group)
    if not seeds:
        return empty_columns(CANDIDATE_DTYPES)
    seed = np.asarray(seeds, dtype=np.int64)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    members = np.concatenate(groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sums = np.add.reduceat(fixed[members], starts, axis=0)
    return {
        "comp_id": comp_id_of_label[labels[seed]].astype(np.int64),
        "star_id": np.minimum.reduceat(source_id[members], starts).astype(np.int64),
        "count": sizes,
        "sx": sums[:, 0], "sy": sums[:, 1], "sz": sums[:, 2],
        "seed_visit": visit[seed].astype(np.int64), "seed_src": source_id[seed].astype(np.int64),
    }


def extend_seeds(potential: np.ndarray, covered: np.ndarray, order_keys: tuple[np.ndarray, ...],
                 neighbours_of: dict[int, list[int]]) -> list[tuple[int, np.ndarray]]:
    """The greedy's new seeds among late observations, in canonical order.

    Args:
        potential: indices of the observations that may seed (uncovered, enough neighbours).
        covered: bool per observation, updated in place as seeds cover their groups.
        order_keys: ``numpy.lexsort`` keys of ``potential`` giving the canonical order (last
            key first sorted on).
        neighbours_of: the other observations within the radius of each observation.

    Returns:
        (seed, the observations it covers: itself and its neighbours) in seeding order.
    """
    seeds = []
    for r in potential[np.lexsort(order_keys)].tolist():
        if covered[r]:
            continue
        near = np.array([r, *neighbours_of.get(r, [])], dtype=np.int64)
        covered[near] = True
        seeds.append((r, near))
    return seeds
