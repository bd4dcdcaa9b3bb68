"""Sky geometry on unit vectors, vectorised.

Positions are handled as unit vectors, so RA = 0/360 and the poles need no special cases.
Every observation's vector is also kept as *fixed point* integers (``round(v * 2**40)``):
integer sums are exact and order-independent, which makes star positions bit-identical
whatever order the visits arrive in.  Distances are chords (Euclidean on unit vectors).

HEALPix pixels come from ``hpgeom`` (the healpix_cxx algorithms, giving healpy's pixel
numbers; ``tests/test_sky.py`` compares them) rather than healpy, whose package import pulls
in astropy: the ``star`` / ``cone`` commands import this module.
"""

from __future__ import annotations

import hpgeom
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
    return np.asarray(hpgeom.vector_to_pixel(nside, v[:, 0], v[:, 1], v[:, 2], nest=True),
                      dtype=np.int64)


#: The HEALPix order of the HATS spatial index (``_healpix_29``).
HEALPIX_ORDER = 29


def healpix29(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """HEALPix nest index at order 29 (int64) of positions ``ra``, ``dec`` in degrees:
    healpy's ``ang2pix(2**29, ra, dec, nest=True, lonlat=True)`` (imported here only: on
    points exactly on pixel edges hpgeom's ``angle_to_pixel`` may differ from it)."""
    import healpy as hp

    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    if ra.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(hp.ang2pix(1 << HEALPIX_ORDER, ra, dec, nest=True, lonlat=True),
                      dtype=np.int64)


#: Positions closer than this [deg] to a pixel edge (or to a pole) get their pixel from
#: :func:`healpix29` in :func:`pixel_at_order`; farther ones cannot differ between hpgeom and
#: healpy (both are exact to a few ulps, ~1e-13 deg).
_EDGE_DEG = 1e-9


def pixel_at_order(ra: np.ndarray, dec: np.ndarray, order: int) -> np.ndarray:
    """The nest pixel at ``order`` (0..29) holding each position (degrees):
    ``healpix29(ra, dec) >> 2 * (29 - order)``, the partition a star at that position
    belongs to (:mod:`streamstars.io.hats`).  Decide shard ownership with this function.

    Computed with hpgeom at ``order``; a position whose pixel changes when it moves by
    :data:`_EDGE_DEG` along RA or Dec (so within ``_EDGE_DEG / sqrt(2)`` of an edge: the
    only places where the two libraries can disagree) or near a pole takes healpy's
    :func:`healpix29` instead, so the answer is always healpy's.
    """
    if not 0 <= int(order) <= HEALPIX_ORDER:
        raise ValueError(f"HEALPix order must be within 0..{HEALPIX_ORDER}, got {order}")
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    if ra.size == 0:
        return np.zeros(0, dtype=np.int64)
    nside = 1 << int(order)

    def at(a: np.ndarray, d: np.ndarray) -> np.ndarray:
        return np.asarray(hpgeom.angle_to_pixel(nside, a, np.clip(d, -90.0, 90.0), nest=True,
                                                lonlat=True, degrees=True), dtype=np.int64)

    pixel = at(ra, dec)
    cos_dec = np.cos(np.deg2rad(dec))
    step_ra = _EDGE_DEG / np.maximum(cos_dec, 1e-6)
    edge = np.abs(dec) > 90.0 - 1e-6
    for a, d in ((ra + step_ra, dec), (ra - step_ra, dec), (ra, dec + _EDGE_DEG),
                 (ra, dec - _EDGE_DEG)):
        edge |= at(a % 360.0, d) != pixel
    if edge.any():
        pixel[edge] = healpix29(ra[edge], dec[edge]) >> np.int64(2 * (HEALPIX_ORDER - order))
    return pixel


def neighbours(pixels: np.ndarray, nside: int) -> np.ndarray:
    """The (up to 8) nest neighbours of each pixel, (8, n) int64, -1 where there is none
    (healpy's ``get_all_neighbours`` layout)."""
    pixels = np.asarray(pixels, dtype=np.int64)
    if pixels.size == 0:
        return np.zeros((8, 0), dtype=np.int64)
    return np.asarray(hpgeom.neighbors(nside, pixels, nest=True), dtype=np.int64).T


def resolution(nside: int) -> float:
    """The approximate side of a pixel at ``nside`` [rad] (healpy's ``nside2resol``)."""
    return float(hpgeom.nside_to_resolution(nside, units="radians"))


def max_pixel_radius(nside: int) -> float:
    """The largest angle between a pixel's centre and its corners at ``nside`` [rad]."""
    return float(hpgeom.max_pixel_radius(nside, degrees=False))


def pixel_vectors(pixels: np.ndarray, nside: int) -> np.ndarray:
    """Unit vectors (n, 3) of the centres of nest pixels at ``nside``."""
    x, y, z = hpgeom.pixel_to_vector(nside, np.atleast_1d(np.asarray(pixels, dtype=np.int64)),
                                     nest=True)
    return np.stack([x, y, z], axis=-1)


def disc_pixels(centre: np.ndarray, radius_rad: float, nside: int) -> np.ndarray:
    """Nest pixels at ``nside`` overlapping the disc of ``radius_rad`` around the unit vector
    ``centre`` (healpy's ``query_disc(inclusive=True)``: a superset), int64."""
    return np.asarray(hpgeom.query_circle_vec(nside, np.asarray(centre, dtype=np.float64),
                                              min(radius_rad, np.pi), inclusive=True,
                                              nest=True), dtype=np.int64)


def with_neighbours(pixels: np.ndarray, nside: int) -> np.ndarray:
    """Sorted unique pixels plus their (up to 8) nest neighbours."""
    pixels = np.unique(np.asarray(pixels, dtype=np.int64))
    if len(pixels) == 0:
        return pixels
    around = neighbours(pixels, nside).ravel()
    return np.unique(np.concatenate([pixels, around[around >= 0]]))


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
    if 2.0 * np.arcsin(margin_chord / 2.0) > resolution(fine_nside) / 8.0:
        return with_neighbours(pixels_of(v, nside), nside)
    fine = np.unique(pixels_of(v, fine_nside))
    around = neighbours(fine, fine_nside).ravel()
    near = np.concatenate([fine, around[around >= 0]])
    return np.unique(near >> (2 * _NEAR_LEVELS))


def pixels_in_discs(centres: np.ndarray, radii_chord: np.ndarray, nside: int) -> np.ndarray:
    """Sorted unique nest pixels touching discs (centre unit vector, chord radius).

    Loops over discs: only used on rare paths (non-trivial components, retractions).
    """
    found = [disc_pixels(c, 2.0 * np.arcsin(min(r, 2.0) / 2.0), nside)
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
