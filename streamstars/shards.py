"""Sky shards: which shards store an observation, and which stored observations are safe.

A *shard* is a HEALPix nest pixel at ``shardNside`` (docs/sharding.md).  It stores the
observations inside its pixel (its *core*) and those within ``shardMargin`` arcseconds outside
it (its *margin*), so that each shard can decide the stars of its core on its own.

Distances between a point and a shard are decided by one predicate, :func:`touches`: the point
lies in the shard, or a point of its *rim* — the circle of a given radius around it, sampled
every :data:`RIM_SPACING_ARCSEC` — lies in the shard.  A shard is a pixel much larger than the
radius, so when it comes within ``radius - RIM_SLACK_ARCSEC`` of the point it crosses the
circle along an arc longer than the sample spacing (HEALPix pixel corners are wider than 28°,
see :data:`RIM_SLACK_ARCSEC`) and a sample lands in it.  Hence:

* ``distance <= radius - RIM_SLACK_ARCSEC``  implies  ``touches``;
* ``touches``  implies  ``distance <= radius``.

Every decision here is a deterministic function of the point's float vector (computed from the
fixed-point vector, as everywhere in streamstars), so every process routes an observation to
the same shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamstars.sky import (
    ARCSEC_RAD,
    fixed_unit_vectors,
    neighbours,
    pixels_of,
    resolution,
    vectors_from_fixed,
)

#: Spacing of the samples along a rim [arcsec].
RIM_SPACING_ARCSEC = 0.25
#: How much closer than the rim radius a shard must come to be sure to be touched [arcsec]:
#: a pixel corner of interior angle a poking ``RIM_SLACK_ARCSEC`` into the circle crosses it
#: along ~``2 * RIM_SLACK_ARCSEC * tan(a / 2)``, longer than the spacing for every a > 28°.
RIM_SLACK_ARCSEC = 2.0 * RIM_SPACING_ARCSEC
#: The finest HEALPix nside healpy handles.
MAX_NSIDE = 1 << 29
#: Points are handled in chunks of this many (the rims of a chunk are built at once).
_CHUNK = 4096


@dataclass(frozen=True)
class Routing:
    """Where the observations of a visit are stored: one entry per (observation, shard).

    ``rows`` index the observations (sorted, then by shard); ``shards`` are the shard pixels;
    ``core`` says whether the observation lies in that shard (exactly one entry per row has
    ``core`` True).
    """

    rows: np.ndarray  # int64
    shards: np.ndarray  # int64
    core: np.ndarray  # bool

    def shard_rows(self) -> dict[int, np.ndarray]:
        """shard -> sorted rows it stores (core and margin); empty for no observation."""
        if len(self.rows) == 0:
            return {}
        order = np.lexsort((self.rows, self.shards))
        shards, rows = self.shards[order], self.rows[order]
        bounds = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1], True])
        return {int(shards[lo]): rows[lo:hi]
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)}


def rim_radius(margin_arcsec: float) -> float:
    """Radius [arcsec] of the rim that routes observations so that every shard within
    ``margin_arcsec`` of an observation stores it."""
    return margin_arcsec + RIM_SLACK_ARCSEC


def _rim_samples(radius_arcsec: float) -> int:
    return max(8, int(np.ceil(2.0 * np.pi * radius_arcsec / RIM_SPACING_ARCSEC)))


def _rims(v: np.ndarray, radius_arcsec: float) -> np.ndarray:
    """Points (n, k, 3) on the circles of ``radius_arcsec`` around the unit vectors ``v``."""
    n_samples = _rim_samples(radius_arcsec)
    # a tangent basis at each point; the pole axis is swapped for x near the poles
    axis = np.zeros_like(v)
    near_pole = np.abs(v[:, 2]) > 0.9
    axis[~near_pole, 2] = 1.0
    axis[near_pole, 0] = 1.0
    e1 = np.cross(axis, v)
    e1 /= np.linalg.norm(e1, axis=1)[:, None]
    e2 = np.cross(v, e1)
    angle = 2.0 * np.pi * np.arange(n_samples) / n_samples
    radius = radius_arcsec * ARCSEC_RAD
    direction = (np.cos(angle)[None, :, None] * e1[:, None, :]
                 + np.sin(angle)[None, :, None] * e2[:, None, :])
    return np.cos(radius) * v[:, None, :] + np.sin(radius) * direction


def _rim_pixels(v: np.ndarray, nside: int, radius_arcsec: float) -> np.ndarray:
    """Pixels (n, k) at ``nside`` of the rim samples of each point."""
    out = np.empty((len(v), _rim_samples(radius_arcsec)), dtype=np.int64)
    for lo in range(0, len(v), _CHUNK):
        rim = _rims(v[lo:lo + _CHUNK], radius_arcsec)
        flat = rim.reshape(-1, 3)
        out[lo:lo + _CHUNK] = pixels_of(flat, nside).reshape(rim.shape[:2])
    return out


def pixels_within(v: np.ndarray, nside: int, radius_arcsec: float) -> np.ndarray:
    """Sorted unique nest pixels at ``nside`` that may hold a point within ``radius_arcsec``
    of a unit vector of ``v`` (n, 3): each point's pixel and those of its rim at
    :func:`rim_radius` (every pixel within the radius is among them, see the module
    docstring; for pixels much larger than the radius, usually just the point's own)."""
    v = np.asarray(v, dtype=np.float64)
    if not len(v):
        return np.zeros(0, dtype=np.int64)
    rim = _rim_pixels(v, nside, rim_radius(radius_arcsec))
    return np.unique(np.concatenate([pixels_of(v, nside), rim.ravel()]))


def touches(v: np.ndarray, shards: np.ndarray, nside: int, radius_arcsec: float) -> np.ndarray:
    """Per point: it lies in its shard (``shards``, one per point) or within the rim of
    ``radius_arcsec`` of it (see the module docstring for what this guarantees)."""
    v = np.asarray(v, dtype=np.float64)
    shards = np.asarray(shards, dtype=np.int64)
    result = pixels_of(v, nside) == shards
    todo = np.flatnonzero(~result)
    if len(todo) and radius_arcsec > 0:
        rim = _rim_pixels(v[todo], nside, radius_arcsec)
        result[todo] = (rim == shards[todo, None]).any(axis=1)
    return result


def _near_border(v: np.ndarray, core: np.ndarray, nside: int, radius_arcsec: float
                 ) -> np.ndarray:
    """Per point: some shard other than its core may lie within ``radius_arcsec`` (a
    superset, from the point's pixel at a finer level and that pixel's neighbours)."""
    radius = radius_arcsec * ARCSEC_RAD
    # the finest level whose pixels are 8x the radius: then everything within
    # the radius of a point lies in its fine pixel or one of that pixel's neighbours
    levels = 0
    while (nside << (levels + 1)) <= MAX_NSIDE \
            and resolution(nside << (levels + 1)) / 8.0 >= radius:
        levels += 1
    fine_nside = nside << levels
    if resolution(fine_nside) / 8.0 < radius:
        return np.ones(len(v), dtype=bool)
    fine = pixels_of(v, fine_nside)
    around = neighbours(fine, fine_nside)
    coarse = np.where(around >= 0, around >> (2 * levels), core[None, :])
    return (coarse != core[None, :]).any(axis=0)


def route(v: np.ndarray, nside: int, margin_arcsec: float) -> Routing:
    """Every (observation, shard) that stores it: its core shard and every shard whose rim
    test at :func:`rim_radius` succeeds (so every shard within ``margin_arcsec``).

    ``v``: unit vectors (n, 3) of the observations.
    """
    v = np.asarray(v, dtype=np.float64)
    core = pixels_of(v, nside)
    rows = [np.arange(len(v), dtype=np.int64)]
    shards = [core]
    radius = rim_radius(margin_arcsec)
    todo = np.flatnonzero(_near_border(v, core, nside, radius)) if len(v) else \
        np.zeros(0, dtype=np.int64)
    if len(todo):
        rim = _rim_pixels(v[todo], nside, radius)
        # unique (row, shard) pairs other than the core
        pair_row = np.repeat(todo, rim.shape[1])
        pair_shard = rim.ravel()
        other = pair_shard != core[pair_row]
        pairs = np.unique(np.stack([pair_row[other], pair_shard[other]], axis=1), axis=0)
        rows.append(pairs[:, 0] if len(pairs) else np.zeros(0, dtype=np.int64))
        shards.append(pairs[:, 1] if len(pairs) else np.zeros(0, dtype=np.int64))
    all_rows, all_shards = np.concatenate(rows), np.concatenate(shards)
    is_core = np.zeros(len(all_rows), dtype=bool)
    is_core[:len(v)] = True
    order = np.lexsort((all_shards, all_rows))
    return Routing(all_rows[order], all_shards[order], is_core[order])


def observation_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """The float unit vectors every routing decision is made from: those of the fixed-point
    vectors the store keys and associates observations by (so keys, geometry and shards
    always agree)."""
    return vectors_from_fixed(fixed_unit_vectors(np.asarray(ra_deg, dtype=np.float64),
                                                 np.asarray(dec_deg, dtype=np.float64)))


def home_shard(telra_deg: float, teldec_deg: float, nside: int) -> int:
    """The shard of a visit's boresight: where a visit is recorded even when none of its
    selected observations is stored (``shards(visit) = route(observations) | {home}``)."""
    return int(pixels_of(observation_vectors(np.array([telra_deg]), np.array([teldec_deg])),
                         nside)[0])


def shard_owner(shards: np.ndarray | int, workers: int) -> np.ndarray:
    """The worker (0 .. ``workers`` - 1) owning each shard in a parallel backfill: a fixed
    mix of the pixel number (splitmix64), so neighbouring shards spread over the workers."""
    z = np.atleast_1d(np.asarray(shards, dtype=np.int64)).astype(np.uint64) \
        + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(workers)).astype(np.int64)
