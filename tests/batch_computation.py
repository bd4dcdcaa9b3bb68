"""An independent, batch implementation of fgcm's star building semantics (for tests and the
benchmark).  It shares nothing with the incremental path but the coordinate definition
(fixed-point unit vectors) and the seeded hash that defines the density cut / reserve draw.

fgcm semantics (docs/association.md): per primary band, observations in canonical order
(visit, sourceId); one not yet covered with >= minPerBand same-band observations within
matchRadius (itself included) seeds a candidate at the mean of that group and covers the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import healpy as hp
import numpy as np
from scipy.spatial import cKDTree

from streamstars.config import BuildStarsConfig
from streamstars.sky import FIXED_SCALE, chord_from_arcsec, fixed_unit_vectors
from streamstars.snapshot import seeded_hash

DENSITY_SALT = 0x5EED_DE45


@dataclass
class BatchResult:
    star_id: np.ndarray          # sorted
    position: np.ndarray         # (n, 3) unit vectors
    members: dict[int, np.ndarray]  # star id -> sorted member sourceIds


def _unit(sums: np.ndarray) -> np.ndarray:
    v = sums.astype(np.float64)
    return v / np.sqrt((v * v).sum(axis=1))[:, None]


def seed_band(visit: np.ndarray, source_id: np.ndarray, fixed: np.ndarray, radius: float,
              min_per_band: int) -> tuple[np.ndarray, np.ndarray]:
    """fgcm's greedy for one band over all its observations: (star ids, integer sums)."""
    order = np.lexsort((source_id, visit))
    fixed, source_id = fixed[order], source_id[order]
    v = fixed.astype(np.float64) / FIXED_SCALE
    tree = cKDTree(v)
    neighbours = tree.query_ball_point(v, radius)
    counts = np.fromiter((len(n) for n in neighbours), dtype=np.int64, count=len(v))
    covered = np.zeros(len(v), dtype=bool)
    ids, sums = [], []
    for i in np.flatnonzero(counts >= min_per_band):
        if covered[i]:
            continue
        group = np.asarray(neighbours[i], dtype=np.int64)
        covered[group] = True
        ids.append(source_id[group].min())
        sums.append(fixed[group].sum(axis=0))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
    return np.asarray(ids, dtype=np.int64), np.asarray(sums, dtype=np.int64)


def batch_build(visit: np.ndarray, source_id: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                band: np.ndarray, config: BuildStarsConfig) -> BatchResult:
    """All stars and their member observations from all observations at once."""
    fixed = fixed_unit_vectors(ra, dec)
    match = chord_from_arcsec(config.matchRadius)
    isolation = chord_from_arcsec(config.isolationRadius)
    star_ids: list[np.ndarray] = []
    star_vecs: list[np.ndarray] = []
    for b in config.primaryBands:
        sel = band == b
        if not sel.any():
            continue
        ids, sums = seed_band(visit[sel], source_id[sel], fixed[sel], match, config.minPerBand)
        if len(ids) == 0:
            continue
        vec = _unit(sums)
        if star_vecs:
            prior = cKDTree(np.concatenate(star_vecs))
            drop = np.asarray(prior.query_ball_point(vec, match, return_length=True)) > 0
            ids, vec = ids[~drop], vec[~drop]
        star_ids.append(ids)
        star_vecs.append(vec)
    if not star_ids:
        return BatchResult(np.zeros(0, np.int64), np.zeros((0, 3)), {})
    ids = np.concatenate(star_ids)
    vec = np.concatenate(star_vecs)
    # isolation: both members of every close pair go
    tree = cKDTree(vec)
    crowded = np.asarray(tree.query_ball_point(vec, isolation, return_length=True)) > 1
    ids, vec = ids[~crowded], vec[~crowded]
    # membership
    obs_vec = fixed.astype(np.float64) / FIXED_SCALE
    tree = cKDTree(vec)
    n_hits = np.asarray(tree.query_ball_point(obs_vec, match, return_length=True))
    assert (n_hits <= 1).all(), "an observation within matchRadius of two isolated stars"
    _, nearest = tree.query(obs_vec[n_hits == 1])
    owner = np.full(len(obs_vec), -1, dtype=np.int64)
    owner[n_hits == 1] = nearest
    # published id: smallest member sourceId; stars without members are dropped
    none = np.iinfo(np.int64).max
    published = np.full(len(ids), none, dtype=np.int64)
    np.minimum.at(published, owner[owner >= 0], source_id[owner >= 0])
    keep = published != none
    ids = np.where(keep, published, -1)
    for b in config.requiredBands:
        counts = np.bincount(owner[(owner >= 0) & (band == b)], minlength=len(ids))
        keep &= counts >= config.minPerBand
    pix = hp.vec2pix(config.densityCutNside, vec[:, 0], vec[:, 1], vec[:, 2], nest=True)
    draw = seeded_hash(ids, config.randomSeed, DENSITY_SALT)
    for p in np.unique(pix[keep]):
        in_pixel = np.flatnonzero(keep & (pix == p))
        if len(in_pixel) > config.densityCutMaxPerPixel:
            ranked = in_pixel[np.lexsort((ids[in_pixel], draw[in_pixel]))]
            keep[ranked[config.densityCutMaxPerPixel:]] = False
    kept_rows = np.flatnonzero((owner >= 0) & keep[np.maximum(owner, 0)])
    kept_rows = kept_rows[np.lexsort((source_id[kept_rows], owner[kept_rows]))]
    bounds = np.flatnonzero(np.diff(owner[kept_rows])) + 1
    members = {int(ids[owner[rows[0]]]): source_id[rows]
               for rows in np.split(kept_rows, bounds) if len(rows)}
    order = np.argsort(ids[keep])
    return BatchResult(ids[keep][order], vec[keep][order], members)
