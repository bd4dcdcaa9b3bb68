"""The footprint of a visit: every sky shard its observations can be stored in.

A shard is a HEALPix nest pixel at ``shardNside``; an observation is stored in its own shard
and in every shard within ``shardMargin`` arcseconds (:func:`streamstars.shards.route`).  The
publisher sends one event per (visit, shard of its footprint), so the footprint must hold
every shard that ``route()`` gives for any of the visit's rows -- a *superset*, computed
before the rows are read -- and should not be much larger (each extra shard costs one event
and one empty application).

* **From the detector corners** (:func:`corner_footprint`), when the visit's visitSummary or
  the ccdVisitTable gives them (:mod:`streamstars.io.corners`).  Each detector is the convex
  quadrilateral of its four sky corners (great-circle edges).  ``route()`` stores a row in
  shards that come within ``rim_radius(shardMargin)`` of it, and a row lies within
  ``slack_arcsec`` of its detector's quadrilateral (:data:`DEFAULT_SLACK_ARCSEC`: the curvature
  of the detector edges through the optics, centroids beyond the corner pixels' edges, a WCS
  refit between the source table and the visitSummary); so every detector polygon is grown by
  ``rim_radius(shardMargin) + slack_arcsec`` and the shards overlapping the grown polygons are
  found with HEALPix's conservative polygon query (``healpy.query_polygon(...,
  inclusive=True)``, which may return a few more pixels but never misses one; it tests the
  overlaps at 64 times the shard resolution).  The growing
  is done in the gnomonic plane of each detector, where great circles are straight lines
  (the grown polygon is convex with great-circle edges) and distances are at least the
  angles they stand for; the offset is scaled by ``sec^2`` of the grown polygon's radius, so
  it covers the angle it must.  Detectors whose corners are not a convex quadrilateral are
  grown from their bounding box in that plane.
* **From the source coordinates** (:func:`source_footprint`), otherwise: the ``ra``/``dec``
  columns only (parquet projection), ``route()`` of every row with a finite position -- every
  row, not only the selected ones, so it is a superset of what the consumer routes.

Both also hold the visit's **home shard**, the shard of its boresight
(:func:`boresight_shard`), so that a visit has an event even when no observation of it is
stored.  Every position goes through the same fixed-point unit vectors the store keys
observations by, so the publisher and the consumers agree on every shard.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import healpy as hp
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from .config import BuildStarsConfig
from .errors import ConfigError, InputFileError
from .io.corners import DetectorCorners, read_ccd_visit_corners, read_visit_summary_corners
from .io.discover import DiscoveredVisit
from .io.sourcetable import resolve_column
from .shards import rim_radius, route
from .sky import ARCSEC_RAD, fixed_unit_vectors, pixels_of, vectors_from_fixed

__all__ = [
    "DEFAULT_SLACK_ARCSEC",
    "FootprintFinder",
    "ShardSpec",
    "VisitFootprint",
    "boresight_shard",
    "corner_footprint",
    "read_source_positions",
    "source_footprint",
]

#: How far [arcsec] a source may lie outside the quadrilateral of its detector's four sky
#: corners: the edges of a detector curve through the optics (LSSTCam's distortion bends a
#: 4k edge by at most a few arcsec; HSC's by less), centroids sit up to half a pixel beyond
#: the corner pixels' edges, and the source table's WCS may be an earlier fit than the
#: visitSummary's (sub-arcsec).  A few arcminutes barely change which ~1.8 deg shards
#: (nside 32) a detector touches, so the slack is generous.
DEFAULT_SLACK_ARCSEC = 60.0
#: Corners farther than this from their detector's centre are not a detector's [deg].
MAX_DETECTOR_RADIUS_DEG = 5.0
#: Smallest half-extent of a detector's bounding box in its tangent plane [rad] (corners that
#: coincide still bound a point).
_MIN_HALF_EXTENT = 1e-9
#: HEALPix's inclusive polygon query tests overlaps at ``fact * nside``: 4 (healpy's default)
#: adds up to a quarter pixel around the polygon (often one more shard); 64 costs about the
#: same for detector-sized polygons and adds a 64th.
_QUERY_FACT = 64
#: A corner sharper than this (1 + cos of the turn between its edges' normals) is grown from
#: the bounding box instead of its miter, which would reach far out.
_MIN_MITER = 0.05

Method = Literal["corners", "sources"]
_FITS = re.compile(r"\.fits?(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class ShardSpec:
    """The shard settings events are routed with (the consumers' ``shardNside`` and
    ``shardMargin``)."""

    nside: int
    margin_arcsec: float

    def __post_init__(self) -> None:
        if self.nside < 1 or self.nside & (self.nside - 1) or self.nside > 1 << 29:
            raise ConfigError(f"shardNside must be a power of two in [1, 2^29], got "
                              f"{self.nside}")
        if not (math.isfinite(self.margin_arcsec) and self.margin_arcsec > 0):
            raise ConfigError(f"shardMargin must be a positive number of arcsec, got "
                              f"{self.margin_arcsec}")

    @classmethod
    def of_config(cls, config: BuildStarsConfig) -> ShardSpec:
        """The ``shardNside`` and ``shardMargin`` of a configuration."""
        return cls(int(config.shardNside), float(config.shardMargin))

    @property
    def n_shards(self) -> int:
        """The number of shards on the sky (``12 nside^2``)."""
        return 12 * self.nside * self.nside


@dataclass(frozen=True)
class VisitFootprint:
    """The shards of one visit.

    Attributes:
        visit: the visit.
        shards: sorted shard pixels (at least the home shard when the boresight is known).
        method: ``corners`` or ``sources``.
        source: the file(s) the footprint was computed from.
        note: why the source coordinates were used (empty for corners).
    """

    visit: int
    shards: tuple[int, ...]
    method: Method
    source: str
    note: str = ""


def observation_vectors(ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> np.ndarray:
    """Float unit vectors (n, 3) of RA/Dec [deg]: those of the fixed-point vectors the store
    keys observations by, so that every routing decision agrees with the store's."""
    return vectors_from_fixed(fixed_unit_vectors(np.asarray(ra_deg, dtype=np.float64),
                                                 np.asarray(dec_deg, dtype=np.float64)))


def boresight_shard(ra_deg: float, dec_deg: float, nside: int) -> int:
    """The visit's home shard: the shard of its boresight [deg]."""
    return int(pixels_of(observation_vectors([ra_deg], [dec_deg]), nside)[0])


def source_footprint(ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike, nside: int,
                     margin_arcsec: float) -> npt.NDArray[np.int64]:
    """Sorted unique shards that :func:`~streamstars.shards.route` gives for the positions
    [deg] with finite coordinates (the others cannot be stored)."""
    ra = np.asarray(ra_deg, dtype=np.float64).ravel()
    dec = np.asarray(dec_deg, dtype=np.float64).ravel()
    finite = np.isfinite(ra) & np.isfinite(dec)
    if not finite.all():
        ra, dec = ra[finite], dec[finite]
    if len(ra) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(route(observation_vectors(ra, dec), nside, margin_arcsec).shards)


def corner_footprint(ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike, nside: int,
                     margin_arcsec: float, slack_arcsec: float = DEFAULT_SLACK_ARCSEC
                     ) -> npt.NDArray[np.int64] | None:
    """Sorted unique shards within ``rim_radius(margin_arcsec) + slack_arcsec`` of the
    detectors whose sky corners [deg] are the rows of ``ra_deg`` / ``dec_deg`` (shape (n, 4));
    see the module docstring for why this holds every shard ``route()`` gives a row lying
    within ``slack_arcsec`` of its detector.

    Returns None when the corners cannot bound the detectors: no detector, a non-finite
    corner, or corners farther than :data:`MAX_DETECTOR_RADIUS_DEG` from their centre.
    """
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    if ra.ndim != 2 or ra.shape[1] != 4 or dec.shape != ra.shape or len(ra) == 0:
        return None
    if not (np.isfinite(ra).all() and np.isfinite(dec).all()):
        return None
    grown = _grown_polygons(observation_vectors(ra.ravel(), dec.ravel()).reshape(-1, 4, 3),
                            (rim_radius(margin_arcsec) + slack_arcsec) * ARCSEC_RAD)
    if grown is None:
        return None
    fact = min(_QUERY_FACT, (1 << 29) // nside)
    found = [np.asarray(hp.query_polygon(nside, polygon, inclusive=True, nest=True, fact=fact),
                        dtype=np.int64) for polygon in grown]
    return np.unique(np.concatenate(found))


def _grown_polygons(v: np.ndarray, distance: float) -> np.ndarray | None:
    """The convex quadrilaterals (n, 4, 3) containing every point within ``distance`` [rad]
    of the detectors with corners ``v`` (n, 4, 3); None when a detector is too large."""
    centre = v.sum(axis=1)
    centre /= np.linalg.norm(centre, axis=1)[:, None]
    cos_corner = np.einsum("nkc,nc->nk", v, centre)
    reach = np.arccos(np.clip(cos_corner.min(axis=1), -1.0, 1.0))
    if reach.max() > math.radians(MAX_DETECTOR_RADIUS_DEG):
        return None
    e1, e2 = _tangent_basis(centre)
    x = np.einsum("nkc,nc->nk", v, e1) / cos_corner
    y = np.einsum("nkc,nc->nk", v, e2) / cos_corner
    # counter-clockwise around the centre, whatever order the file lists the corners in
    order = np.argsort(np.arctan2(y, x), axis=1)
    x, y = np.take_along_axis(x, order, axis=1), np.take_along_axis(y, order, axis=1)
    # the gnomonic plane stretches angles by sec^2 at most: a planar offset of d sec^2(rho)
    # covers an angle d within rho of the centre (1e-12: rounding)
    rho = reach + distance
    offset = distance / np.cos(rho) ** 2 * (1.0 + 1e-12) + 1e-15
    gx, gy = _offset_quadrilaterals(x, y, offset)
    grown = (centre[:, None, :] + gx[:, :, None] * e1[:, None, :]
             + gy[:, :, None] * e2[:, None, :])
    return np.asarray(grown / np.linalg.norm(grown, axis=2)[:, :, None])


def _tangent_basis(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors (n, 3) spanning the tangent plane at each centre (x swapped in for the
    pole axis near the poles)."""
    axis = np.zeros_like(centre)
    near_pole = np.abs(centre[:, 2]) > 0.9
    axis[~near_pole, 2] = 1.0
    axis[near_pole, 0] = 1.0
    e1 = np.cross(axis, centre)
    e1 /= np.linalg.norm(e1, axis=1)[:, None]
    return e1, np.cross(centre, e1)


def _offset_quadrilaterals(x: np.ndarray, y: np.ndarray,
                           offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (n, 4) of the quadrilaterals ``(x, y)`` (counter-clockwise) grown outwards by
    ``offset`` (n,): each vertex moves to where the offset lines of its two edges meet (the
    miter).  A quadrilateral that is not strictly convex, or has a very sharp corner, is
    replaced by its bounding box grown by ``offset``."""
    ex, ey = np.roll(x, -1, axis=1) - x, np.roll(y, -1, axis=1) - y  # edge i: vertex i -> i+1
    length = np.hypot(ex, ey)
    turn = ex * np.roll(ey, -1, axis=1) - ey * np.roll(ex, -1, axis=1)
    safe = np.where(length > 0, length, 1.0)
    nx, ny = ey / safe, -ex / safe  # outward normals (counter-clockwise polygon)
    px, py = np.roll(nx, 1, axis=1), np.roll(ny, 1, axis=1)  # normal of the previous edge
    miter = 1.0 + px * nx + py * ny
    good = (turn > 0).all(axis=1) & (length > 0).all(axis=1) & (miter > _MIN_MITER).all(axis=1)
    d = offset[:, None]
    gx = x + d * (px + nx) / np.where(good[:, None], miter, 1.0)
    gy = y + d * (py + ny) / np.where(good[:, None], miter, 1.0)
    if not good.all():
        bad = ~good
        half = _MIN_HALF_EXTENT + offset[bad]
        lo_x, hi_x = x[bad].min(axis=1) - half, x[bad].max(axis=1) + half
        lo_y, hi_y = y[bad].min(axis=1) - half, y[bad].max(axis=1) + half
        gx[bad] = np.stack([lo_x, hi_x, hi_x, lo_x], axis=1)
        gy[bad] = np.stack([lo_y, lo_y, hi_y, hi_y], axis=1)
    return gx, gy


def read_source_positions(paths: Sequence[str | Path]
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """RA and Dec [deg] of every row of the visit's source tables: their ``ra`` and ``dec``
    columns only (``decl`` and the other names :func:`~streamstars.io.sourcetable.resolve_column`
    knows), nulls as NaN.

    Raises:
        InputFileError: a file is unreadable or has no position column.
    """
    ras: list[np.ndarray] = []
    decs: list[np.ndarray] = []
    for path in paths:
        try:
            schema = pq.read_schema(path)
            columns = [resolve_column(name, schema.names) for name in ("ra", "dec")]
            if None in columns:
                raise InputFileError(f"{path}: source table has no 'ra'/'dec' column")
            table = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise InputFileError(f"{path}: cannot read the source positions "
                                 f"({type(exc).__name__}: {exc})") from exc
        for out, name in ((ras, columns[0]), (decs, columns[1])):
            column = table.column(name).cast(pa.float64()).fill_null(np.nan)
            out.append(column.to_numpy())
    empty = np.zeros(0, dtype=np.float64)
    return (np.concatenate(ras) if ras else empty), (np.concatenate(decs) if decs else empty)


_CcdCache = dict[str, tuple[tuple[int, int], dict[int, DetectorCorners]]]


class FootprintFinder:
    """Footprints of discovered visits for one :class:`ShardSpec`.

    The corners come from the visit's visitSummary when its metadata did, else from the
    ccdVisitTable its metadata came with (read once per file version: the table holds every
    visit), else the footprint is computed from the source coordinates.
    """

    def __init__(self, spec: ShardSpec, slack_arcsec: float = DEFAULT_SLACK_ARCSEC) -> None:
        self.spec = spec
        self.slack_arcsec = slack_arcsec
        self._ccd_tables: _CcdCache = {}

    def corners_of(self, entry: DiscoveredVisit) -> DetectorCorners | None:
        """The visit's detector corners, or None when its metadata files have none.

        Raises:
            InputFileError: the metadata file cannot be read.
        """
        path = entry.metadata_path
        if path is not None and _FITS.search(path.name):
            return read_visit_summary_corners(path)
        if entry.ccd_visit_table_path is not None:
            return self._ccd_corners(entry.ccd_visit_table_path).get(entry.visit)
        return None

    def _ccd_corners(self, path: Path) -> dict[int, DetectorCorners]:
        stat = os.stat(path)
        version = (stat.st_size, stat.st_mtime_ns)
        cached = self._ccd_tables.get(str(path))
        if cached is None or cached[0] != version:
            cached = (version, read_ccd_visit_corners(path))
            self._ccd_tables[str(path)] = cached
        return cached[1]

    def from_corners(self, visit: int, corners: DetectorCorners | None,
                     boresight: tuple[float, float] | None
                     ) -> tuple[VisitFootprint | None, str]:
        """The footprint from ``corners`` (plus the home shard of ``boresight``, RA and Dec
        [deg]) when they bound every detector; else None and why not."""
        if corners is None:
            return None, "no detector corners in the visit's metadata files"
        if not corners.complete:
            return None, (f"detector corners in {corners.source} incomplete (NaN: a detector "
                          "without a WCS)")
        shards = corner_footprint(corners.ra, corners.dec, self.spec.nside,
                                  self.spec.margin_arcsec, self.slack_arcsec)
        if shards is None:
            return None, (f"detector corners in {corners.source} are not a detector's "
                          f"(farther than {MAX_DETECTOR_RADIUS_DEG:g} deg from their centre)")
        return VisitFootprint(visit, _sorted(shards, self._home(boresight)), "corners",
                              corners.source), ""

    def from_sources(self, visit: int, source_paths: Sequence[str | Path],
                     boresight: tuple[float, float] | None, note: str = "") -> VisitFootprint:
        """The footprint from the rows of ``source_paths`` (plus the home shard of
        ``boresight``); ``note``: why the corners were not used.

        Raises:
            InputFileError: the source tables cannot be read.
        """
        ra, dec = read_source_positions(source_paths)
        shards = source_footprint(ra, dec, self.spec.nside, self.spec.margin_arcsec)
        return VisitFootprint(visit, _sorted(shards, self._home(boresight)), "sources",
                              ", ".join(str(p) for p in source_paths), note)

    def footprint(self, visit: int, corners: DetectorCorners | None,
                  source_paths: Sequence[str | Path],
                  boresight: tuple[float, float] | None) -> VisitFootprint:
        """The footprint from ``corners`` when they bound every detector, else from the rows
        of ``source_paths``; plus the home shard of ``boresight`` (RA, Dec [deg]).

        Raises:
            InputFileError: the source tables are needed and cannot be read.
        """
        found, note = self.from_corners(visit, corners, boresight)
        return found if found is not None else \
            self.from_sources(visit, source_paths, boresight, note)

    def _home(self, boresight: tuple[float, float] | None) -> list[int]:
        if boresight is None or not all(map(math.isfinite, boresight)):
            return []
        return [boresight_shard(*boresight, self.spec.nside)]

    def of_entry(self, entry: DiscoveredVisit) -> VisitFootprint:
        """The footprint of a discovered visit (with metadata and source tables).

        Raises:
            InputFileError: neither the corners nor the source positions can be read.
        """
        meta = entry.metadata
        boresight = None if meta is None else (meta.telra, meta.teldec)
        return self.footprint(entry.visit, self.corners_of(entry), entry.source_paths,
                              boresight)


def _sorted(shards: npt.NDArray[np.int64], extra: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in np.unique(np.concatenate(
        [np.asarray(shards, dtype=np.int64), np.asarray(extra, dtype=np.int64)])))
