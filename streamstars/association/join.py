"""The *join* path: new observations surely within the radius of every member of one clique
and of each other keep it a clique (vectorised, pure: the records are updated in place)."""

from __future__ import annotations

import numpy as np

from streamstars.association.fof import EPS, centres_of
from streamstars.columns import ColumnDict


def join_cliques(comps: ColumnDict, centres: np.ndarray, owner: np.ndarray,
                 source_id: np.ndarray, visit: np.ndarray, fixed: np.ndarray,
                 vectors: np.ndarray) -> np.ndarray:
    """Add observations to the cliques they join.

    Args:
        comps: component records, updated in place (count, sums, ``rmax``, seed, id).
        centres: their unit-vector centres, updated in place.
        owner: per observation, the index of the clique it joins.
        source_id, visit, fixed, vectors: the observations' identity, fixed-point and unit
            vectors.

    Returns:
        The indices of the cliques that changed (sorted).  Sums stay exact; ``rmax`` grows by
        the centre's shift (or to the farthest new observation); the earliest new observation
        in canonical (visit, sourceId) order becomes the seed when it precedes the old one; the
        id becomes the smallest sourceId.
    """
    n_comp = len(comps["comp_id"])
    j = np.unique(owner)
    old_centre = centres[j]
    added_fixed = np.zeros((n_comp, 3), dtype=np.int64)
    np.add.at(added_fixed, owner, fixed)
    comps["count"][j] += np.bincount(owner, minlength=n_comp)[j]
    for axis, key in enumerate(("sx", "sy", "sz")):
        comps[key][j] += added_fixed[j, axis]
    centres[j] = centres_of({k: comps[k][j] for k in ("sx", "sy", "sz")})
    shift = np.linalg.norm(centres[j] - old_centre, axis=1)
    own = np.zeros(n_comp)
    np.maximum.at(own, owner, np.linalg.norm(vectors - centres[owner], axis=1))
    comps["rmax"][j] = np.maximum(comps["rmax"][j] + shift, own[j]) + EPS
    # the earliest new observation of each component (canonical order) may seed it now
    first = np.lexsort((source_id, visit, owner))
    first = first[np.r_[True, owner[first][1:] != owner[first][:-1]]]
    f_visit, f_src = visit[first], source_id[first]
    earlier = (f_visit < comps["seed_visit"][j]) | (
        (f_visit == comps["seed_visit"][j]) & (f_src < comps["seed_src"][j]))
    comps["seed_visit"][j] = np.where(earlier, f_visit, comps["seed_visit"][j])
    comps["seed_src"][j] = np.where(earlier, f_src, comps["seed_src"][j])
    np.minimum.at(comps["comp_id"], owner, source_id)
    return j
