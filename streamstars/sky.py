"""Sky geometry on unit vectors, vectorised.

Positions are handled as unit vectors, so RA = 0/360 and the poles need no special cases.
Every observation's vector is also kept as *fixed point* integers (``round(v * 2**40)``):
integer sums are exact and order-independent, which makes star positions bit-identical
whatever order the visits arrive in.  Distances are chords (Euclidean on unit vectors).
"""

from __future__ import annotations

import healpy as hp
import numpy as np
from scipy.spatial import cKDTree

#: Fixed-point scale of unit vectors (2**40: 0.2 micro-arcsec resolution, and sums of up to
#: 2**23 observations fit in int64).
FIXED_SCALE = float(1 << 40)

ARCSEC_RAD = np.pi / (180.0 * 3600.0)


def chord_from_arcsec(radius_arcsec: float) -> float:
    """Chord length on the unit sphere of an angular radius given in arcseconds."""
    return float(2.0 * np.sin(0.5 * radius_arcsec * ARCSEC_RAD))


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Unit vectors (..., 3) of RA/Dec in degrees (any matching shapes)."""
    ra = np.deg2rad(np.asarray(ra_deg, dtype=np.float64))
    dec = np.deg2rad(np.asarray(dec_deg, dtype=np.float64))
    cos_dec = np.cos(dec)
    return np.stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1)


def fixed_unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Fixed-point unit vectors (n, 3) int64 of RA/Dec in degrees."""
    return np.rint(unit_vectors(ra_deg, dec_deg) * FIXED_SCALE).astype(np.int64)


def vectors_from_fixed(fixed: np.ndarray) -> np.ndarray:
    """Float unit vectors (n, 3) from fixed-point ones (not renormalised: exact scaling)."""
    return np.asarray(fixed, dtype=np.float64) / FIXED_SCALE


def normalized(sums: np.ndarray) -> np.ndarray:
    """Unit vectors (n, 3) along integer or float vector sums (the mean direction)."""
    v = np.asarray(sums, dtype=np.float64)
    norm = np.sqrt(np.einsum("ij,ij->i", v, v))
    return v / norm[:, None]


def radec_from_vectors(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RA in [0, 360) and Dec in degrees of vectors (..., 3) (need not be normalised)."""
    ra = np.rad2deg(np.arctan2(v[..., 1], v[..., 0])) % 360.0
    ra = np.where(ra >= 360.0, 0.0, ra)  # -tiny % 360 rounds to 360.0
    dec = np.rad2deg(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    return ra, dec


def arcsec_from_chord(chord: np.ndarray) -> np.ndarray:
    """Angular separation in arcseconds of chord lengths on the unit sphere."""
    return np.rad2deg(2.0 * np.arcsin(np.clip(np.asarray(chord) / 2.0, 0.0, 1.0))) * 3600.0


def pixels_of(v: np.ndarray, nside: int) -> np.ndarray:
    """HEALPix nest pixel (int64) of each vector (n, 3)."""
    if len(v) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(hp.vec2pix(nside, v[:, 0], v[:, 1], v[:, 2], nest=True), dtype=np.int64)


def with_neighbours(pixels: np.ndarray, nside: int) -> np.ndarray:
    """Sorted unique pixels plus their (up to 8) nest neighbours."""
    pixels = np.unique(np.asarray(pixels, dtype=np.int64))
    if len(pixels) == 0:
        return pixels
    neighbours = np.asarray(hp.get_all_neighbours(nside, pixels, nest=True)).ravel()
    return np.unique(np.concatenate([pixels, neighbours[neighbours >= 0]]))


#: Pixels near points are found through pixels this many levels finer (x16 in nside) and their
#: neighbours; exact while the margin is at most 1/8 of the finer pixel size.
_NEAR_LEVELS = 4


def pixels_near(v: np.ndarray, nside: int, margin_chord: float) -> np.ndarray:
    """Sorted unique nest pixels at ``nside`` holding some point within ``margin_chord`` of a
    vector of ``v`` (a superset; never misses one).

    The points' pixels at ``nside * 16`` and their neighbours are mapped to ``nside``: unlike
    :func:`with_neighbours`, a pixel next to a visit's footprint is only included where the
    footprint comes close to it.  Falls back to :func:`with_neighbours` when the margin is
    not small against the finer pixels.
    """
    fine_nside = nside << _NEAR_LEVELS
    if 2.0 * np.arcsin(margin_chord / 2.0) > hp.nside2resol(fine_nside) / 8.0:
        return with_neighbours(pixels_of(v, nside), nside)
    fine = np.unique(pixels_of(v, fine_nside))
    neighbours = np.asarray(hp.get_all_neighbours(fine_nside, fine, nest=True)).ravel()
    near = np.concatenate([fine, neighbours[neighbours >= 0]])
    return np.unique(near >> (2 * _NEAR_LEVELS))


def pixels_in_discs(centres: np.ndarray, radii_chord: np.ndarray, nside: int) -> np.ndarray:
    """Sorted unique nest pixels touching discs (centre unit vector, chord radius).

    Loops over discs: only used on rare paths (non-trivial components, retractions).
    """
    found = [np.asarray(hp.query_disc(nside, c, 2.0 * np.arcsin(min(r, 2.0) / 2.0),
                                      inclusive=True, nest=True), dtype=np.int64)
             for c, r in zip(centres, radii_chord, strict=True)]
    if not found:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(found))


#: Relative slack on the nearest-neighbour pre-filter of :func:`pairs_within` and
#: :func:`self_pairs_within`: the filter only has to keep a superset.
_PREFILTER_SLACK = 1e-9


def pairs_within(points: np.ndarray, tree: cKDTree, radius: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) of every point ``points[i]`` and tree point ``j`` within ``radius``.

    Most points have at most one tree point within the radius: a two-nearest-neighbour query
    settles those, and only points with two or more go through the exact pair search
    (``sparse_distance_matrix``), which gives the distances of everything returned.  Queries
    run in the calling thread: scipy's ``workers`` start Python threads on every call, and
    next to the backfill's read-ahead threads that was slower (docs/benchmarks.md).
    """
    if len(points) == 0 or tree.n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    k = min(2, tree.n)
    dist, index = tree.query(points, k=k, distance_upper_bound=radius * (1 + _PREFILTER_SLACK),
                             workers=1)
    dist, index = dist.reshape(len(points), k), index.reshape(len(points), k)
    several = np.isfinite(dist[:, 1]) if k == 2 else np.zeros(len(points), dtype=bool)
    single = np.isfinite(dist[:, 0]) & ~several
    rows = np.flatnonzero(single)
    within = dist[rows, 0] <= radius
    rows = rows[within]
    i_parts, j_parts, d_parts = [rows], [index[rows, 0]], [dist[rows, 0]]
    many = np.flatnonzero(several)
    if len(many):
        found = kdtree(points[many]).sparse_distance_matrix(tree, radius, output_type="ndarray")
        i_parts.append(many[found["i"]])
        j_parts.append(found["j"].astype(np.int64))
        d_parts.append(found["v"])
    return (np.concatenate(i_parts).astype(np.int64), np.concatenate(j_parts).astype(np.int64),
            np.concatenate(d_parts))


def self_pairs_within(tree: cKDTree, radius: float) -> np.ndarray:
    """Pairs (m, 2) of points of ``tree`` within ``radius`` of each other, i < j (the same
    pairs as ``query_pairs``, found among the points whose nearest other point is close)."""
    if tree.n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    dist, _ = tree.query(tree.data, k=2, distance_upper_bound=radius * (1 + _PREFILTER_SLACK),
                         workers=1)
    close = np.flatnonzero(np.isfinite(dist[:, 1]))
    if len(close) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = kdtree(tree.data[close]).query_pairs(radius, output_type="ndarray")
    pairs = np.sort(close[pairs.astype(np.int64)], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def kdtree(vectors: np.ndarray) -> cKDTree:
    """A k-d tree over unit vectors, built for speed (queries are exact either way).

    Median splits (scipy's default) cost ~2x more to build on tens of thousands of points,
    and trees are rebuilt for every visit.
    """
    return cKDTree(vectors, balanced_tree=False, compact_nodes=False)
