"""A realistic simulated survey written in the real Rubin file formats.

:func:`simulate_survey` writes, into one directory,

* one ``sourceTable_visit_<visit>.parquet`` per visit with the modern LSST column names
  (the columns fgcmcal reads) plus ``localWcs_CDMatrix_*`` and a few other real columns;
* ``visitTable.parquet`` and ``ccdVisitTable.parquet`` (DPDD ``Visit`` / ``CcdVisit``; the
  latter with each detector's sky corners ``llcra`` ... ``lrcdec`` as Rubin's
  ``makeCcdVisitTable`` writes them, the edges of the corner pixels through the distortion);
* an LSST HTM-indexed reference catalog in ``refcat/`` (depth 7, format_version 1, nJy);
* ``truth.parquet``: every true object (id, position, magnitudes, star/galaxy, blend group).

The sky is a fixed set of true objects in a spherical cap (stars 16–24 mag with simple colours,
galaxies with extendedness 1.0 or 0.3, optional close star pairs and chains), observed by a
camera of square CCDs on a grid (:func:`make_camera`: a near-square grid shrunk to fit the
field, or LSSTCam's 189 CCDs), with pointings dithered around the field centre.  Every
observation gets astrometric and photometric noise, flags (edge, saturation, cosmic rays,
interpolation, ...), aperture fluxes at 12 and 17 pixels, a local background and, for close
groups in bad seeing, deblend parents with children.  Each visit also gets junk singletons
(cosmic rays, artefacts, a few unflagged non-repeating sources).

Options for the sharded store's tests and benchmarks (all off by default; the default output
is unchanged by them):

* ``survey_radius_deg``: a **wide survey**.  The true objects fill the cap of that radius at
  the density that gives about ``sources_per_visit`` rows a visit (so their number grows with
  the area), and the pointings follow :class:`SurveyTiling` (rings of tiles the camera's size
  apart, dithered by up to half a tile, bands cycling so that every tile gets every band
  after one pass per band); the camera is the one of ``field_radius_deg``.
* ``border_nside``: bright isolated stars exactly on the boundaries and at the corners of the
  HEALPix nest pixels at that nside inside the footprint (:func:`border_star_positions`),
  appended last to the truth table; their observations scatter across the border.
* ``first_visit``: only visits ``first_visit ..`` of the longer survey (same sky, same files
  for those visits), e.g. one more visit of a survey already written.
* ``camera="lsstcam"``: an LSSTCam-sized visit (189 CCDs, 9.3 deg^2); with
  ``sources_per_visit=1_500_000`` and ``field_radius_deg=2.6`` one visit (1.65 M rows, 5.3 M
  true objects) takes ~15 s (~21 s with the refcat) and 1.6 GB peak RSS to simulate.

Everything is vectorised over sources; the output is byte-identical for identical arguments
(random numbers come from ``numpy.random.SeedSequence(seed)`` spawned per visit).

The parquet files carry the schema metadata the Butler's ``ParquetFormatter`` writes
(:func:`with_table_metadata`): ``lsst::arrow::rowcount``, the string lengths
(``lsst::arrow::len::<column>``) and astropy's ``table_meta_yaml`` for ``ArrowAstropy`` files
(current pipelines, the default); for ``file_style="DataFrame"`` (older pipelines) the source
tables are written as pandas would, ``sourceId`` being the index (pandas schema metadata).
:mod:`streamstars.butler.simulate` ingests them into a Butler repository.

Conventions: ``sourceId = visit << 20 | row`` (row index within the visit file, sorted by
detector; ``visit << 22 | row`` for a visit of 2^20 rows or more); visit ids are LSSTCam-like
``YYYYMMDD * 100000 + seq`` (40 visits a night); ``ccdVisitId = visit * 1000 + detector``;
``localWcs_CDMatrix_*`` are in **radians per pixel**, as in real LSST/HSC sourceTables;
``zeroPoint`` (ccdVisitTable) is the AB magnitude of one count in the exposure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamstars.sky import radec_from_vectors, unit_vectors

#: Rubin Observatory site (deg, deg east, m).
SITE_LATITUDE = -30.2446
SITE_LONGITUDE = -70.7494

#: Per-band zero point [AB mag for 1 count/s], sky brightness [mag/arcsec^2], extinction
#: [mag/airmass] and the LSSTCam-like physical filter name.
BAND_PROPERTIES: dict[str, tuple[float, float, float, str]] = {
    "u": (26.5, 22.9, 0.45, "u_24"),
    "g": (28.4, 22.3, 0.20, "g_6"),
    "r": (28.2, 21.2, 0.12, "r_57"),
    "i": (27.9, 20.5, 0.08, "i_39"),
    "z": (27.5, 19.6, 0.06, "z_20"),
    "y": (26.6, 18.6, 0.08, "y_10"),
}
#: Magnitude offset relative to r per unit of the g-r colour.
COLOUR_SLOPE: dict[str, float] = {"u": 1.6, "g": 1.0, "r": 0.0, "i": -0.35, "z": -0.55, "y": -0.65}
#: Extra constant offset relative to r.
COLOUR_OFFSET: dict[str, float] = {"u": 0.4, "g": 0.0, "r": 0.0, "i": 0.0, "z": 0.0, "y": 0.0}

PIXEL_SCALE_ARCSEC = 0.2
DETECTOR_PIXELS = 4000
FULL_WELL = 7.0e4
DISTORTION_KAPPA = 0.01  # radial distortion [1/deg^2]: pixel scale +1 % at 0.7 deg
APERTURE_RADII = (12.0, 17.0)
JUNK_FRACTION = 0.02
SOURCE_ID_SHIFT = 20
REFCAT_NAME = "sim_refcat"
REFCAT_DEPTH = 7
AB_ZERO_NJY = 31.4
VISITS_PER_NIGHT = 40
FIRST_NIGHT_MJD = 60827  # 2025-06-01
STAR_FRACTION = 0.45
LOOSE_GALAXY_FRACTION = 0.2
LSSTCAM_DETECTORS = 189
#: sourceId bits of the row number in visits of 2^20 rows or more (LSSTCam-sized visits).
LARGE_VISIT_SOURCE_ID_SHIFT = 22
#: Points per pixel side of the border stars (``healpy.boundaries`` step): the corner and
#: three points along the edge.
BORDER_STEP = 4
MAX_BORDER_PIXELS = 200_000
BORDER_DUPLICATE_CHORD = 1e-9  # [rad] 0.2 mas: copies of one boundary point agree to ~1e-15

#: Focal-plane layouts of :func:`make_camera`.
CameraLayout = Literal["grid", "lsstcam"]
CAMERA_LAYOUTS: tuple[str, ...] = ("grid", "lsstcam")


@dataclass(frozen=True)
class SimulatedSurvey:
    """What :func:`simulate_survey` wrote.

    Attributes:
        out_dir: output directory.
        visits: visit ids, in observation order.
        bands: band of each visit.
        physical_filters: physical filter of each visit.
        source_paths: ``sourceTable_visit`` parquet file of each visit.
        visit_table_path: ``visitTable.parquet``.
        ccd_visit_table_path: ``ccdVisitTable.parquet``.
        refcat_path: the refcat directory, or None when not written.
        truth_path: ``truth.parquet`` (object_id, ra, dec, mag_<band>, is_star, ...).
        n_sources: total number of rows over all source tables.
        n_sources_per_visit: rows of each source table.
        n_objects: number of true objects.
        n_refcat: number of reference stars written (0 without refcat).
        seed: the seed used.
        n_border_stars: stars placed on HEALPix pixel boundaries (``border_nside``): the
            last ``n_border_stars`` objects of the truth table.
        n_tiles: tiles of the wide survey's pointing pattern (1 without ``survey_radius_deg``).
        footprint_radius_deg: radius of the cap holding the true objects.
    """

    out_dir: Path
    visits: list[int]
    bands: list[str]
    physical_filters: list[str]
    source_paths: list[Path]
    visit_table_path: Path
    ccd_visit_table_path: Path
    refcat_path: Path | None
    truth_path: Path
    n_sources: int
    n_sources_per_visit: list[int] = field(default_factory=list)
    n_objects: int = 0
    n_refcat: int = 0
    seed: int = 0
    n_border_stars: int = 0
    n_tiles: int = 1
    footprint_radius_deg: float = 0.0


# ------------------------------------------------------------------------------------------
# Geometry helpers
# ------------------------------------------------------------------------------------------


def tangent_basis(ra: float | np.ndarray, dec: float | np.ndarray) -> tuple[np.ndarray, ...]:
    """Position, east and north unit vectors at RA/Dec (degrees); well defined at the poles."""
    ra_r = np.radians(ra)
    dec_r = np.radians(dec)
    pos = np.stack([np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r),
                    np.sin(dec_r)], axis=-1)
    east = np.stack([-np.sin(ra_r), np.cos(ra_r), np.zeros_like(ra_r)], axis=-1)
    north = np.stack([-np.sin(dec_r) * np.cos(ra_r), -np.sin(dec_r) * np.sin(ra_r),
                      np.cos(dec_r)], axis=-1)
    return pos, east, north


def offset_xyz(xyz: np.ndarray, sep_deg: np.ndarray, pa_deg: np.ndarray) -> np.ndarray:
    """Move unit vectors by ``sep_deg`` towards position angle ``pa_deg`` (east of north)."""
    ra, dec = radec_from_vectors(xyz)
    _, east, north = tangent_basis(ra, dec)
    s = np.radians(sep_deg)[:, None]
    pa = np.radians(pa_deg)[:, None]
    out = xyz * np.cos(s) + (np.sin(pa) * east + np.cos(pa) * north) * np.sin(s)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def gnomonic(xyz: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Tangent-plane coordinates (xi east, eta north; degrees) about (ra0, dec0)."""
    pos, east, north = tangent_basis(ra0, dec0)
    d = xyz @ pos
    return np.degrees((xyz @ east) / d), np.degrees((xyz @ north) / d)


def inverse_gnomonic(xi: np.ndarray, eta: np.ndarray, ra0: float,
                     dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """RA/Dec (degrees) of tangent-plane coordinates (degrees) about (ra0, dec0)."""
    pos, east, north = tangent_basis(ra0, dec0)
    vec = (pos[None, :] + np.radians(xi)[:, None] * east[None, :]
           + np.radians(eta)[:, None] * north[None, :])
    return radec_from_vectors(vec)


def random_in_cap(rng: np.random.Generator, n: int, ra0: float, dec0: float,
                  radius_deg: float) -> np.ndarray:
    """``n`` unit vectors uniform in the spherical cap of ``radius_deg`` about (ra0, dec0)."""
    pos, east, north = tangent_basis(ra0, dec0)
    u = rng.random(n)
    cos_theta = 1.0 - u * (1.0 - math.cos(math.radians(radius_deg)))
    sin_theta = np.sqrt(np.clip(1.0 - cos_theta**2, 0.0, None))
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    out = (cos_theta[:, None] * pos[None, :]
           + sin_theta[:, None] * (np.cos(phi)[:, None] * east[None, :]
                                   + np.sin(phi)[:, None] * north[None, :]))
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------
# Camera
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """A grid of square CCDs in the focal plane (focal-plane coordinates in degrees).

    Detectors fill the grid cells row by row, skipping the ``corner_cut`` x ``corner_cut``
    block at each corner of the grid (0 for a plain grid; 3 for LSSTCam's 5 x 5 rafts of 3 x 3
    CCDs without the corner rafts), up to ``n_detectors``.

    Focal plane (p, q) relates to the tangent plane (xi, eta) of the boresight by the
    reflection-rotation ``M(rot) = [[-cos, -sin], [-sin, cos]]`` (its own inverse), then a
    radial distortion ``u = u' (1 + kappa |u'|^2)`` maps the detector-linear coordinate
    ``u'`` to the true focal-plane coordinate ``u``.
    """

    n_detectors: int
    n_columns: int
    n_rows: int
    n_pixels: int
    pixel_scale_deg: float
    pitch_deg: float
    kappa: float = DISTORTION_KAPPA
    corner_cut: int = 0

    @property
    def detector_size_deg(self) -> float:
        """Side length of one detector [deg]."""
        return self.n_pixels * self.pixel_scale_deg

    @property
    def fov_area_deg2(self) -> float:
        """Area of the detectors together [deg^2] (distortion neglected)."""
        return self.n_detectors * self.detector_size_deg**2

    @property
    def half_diagonal_deg(self) -> float:
        """Distance from the boresight to the farthest focal-plane corner [deg]."""
        return self.pitch_deg * _grid_extent(self.n_columns, self.n_rows, self.corner_cut)

    @cached_property
    def cells(self) -> np.ndarray:
        """Grid cell (``row * n_columns + column``) of each detector, in detector order."""
        cell = np.arange(self.n_columns * self.n_rows)
        col, row = cell % self.n_columns, cell // self.n_columns
        cut = self.corner_cut
        corner = (((col < cut) | (col >= self.n_columns - cut))
                  & ((row < cut) | (row >= self.n_rows - cut)))
        return cell[~corner][:self.n_detectors]

    @cached_property
    def cell_detectors(self) -> np.ndarray:
        """Detector of each grid cell, -1 for a cell without one."""
        out = np.full(self.n_columns * self.n_rows, -1, dtype=np.int64)
        out[self.cells] = np.arange(len(self.cells))
        return out

    def detector_centers(self) -> np.ndarray:
        """Detector-linear (p', q') centre of each detector, shape (n_detectors, 2), deg."""
        col = self.cells % self.n_columns
        row = self.cells // self.n_columns
        p = (col - 0.5 * (self.n_columns - 1)) * self.pitch_deg
        q = (row - 0.5 * (self.n_rows - 1)) * self.pitch_deg
        return np.stack([p, q], axis=-1)

    def undistort(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True focal plane (p, q) -> detector-linear (p', q') (fixed-point inversion)."""
        pl, ql = p, q
        for _ in range(4):
            scale = 1.0 + self.kappa * (pl * pl + ql * ql)
            pl, ql = p / scale, q / scale
        return pl, ql

    def distort(self, pl: np.ndarray, ql: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Detector-linear (p', q') -> true focal plane (p, q)."""
        scale = 1.0 + self.kappa * (pl * pl + ql * ql)
        return pl * scale, ql * scale

    def to_pixels(self, pl: np.ndarray, ql: np.ndarray) -> tuple[np.ndarray, ...]:
        """Detector id (-1 when off every CCD) and pixel x, y of detector-linear coordinates."""
        size = self.detector_size_deg
        col_f = (pl / self.pitch_deg) + 0.5 * self.n_columns
        row_f = (ql / self.pitch_deg) + 0.5 * self.n_rows
        col = np.floor(col_f).astype(np.int64)
        row = np.floor(row_f).astype(np.int64)
        lp = (col_f - col - 0.5) * self.pitch_deg
        lq = (row_f - row - 0.5) * self.pitch_deg
        inside = (col >= 0) & (col < self.n_columns) & (row >= 0) & (row < self.n_rows)
        det = self.cell_detectors[np.where(inside, row * self.n_columns + col, 0)]
        ok = inside & (np.abs(lp) < 0.5 * size) & (np.abs(lq) < 0.5 * size) & (det >= 0)
        x = (lp + 0.5 * size) / self.pixel_scale_deg - 0.5
        y = (lq + 0.5 * size) / self.pixel_scale_deg - 0.5
        return np.where(ok, det, -1), x, y

    def from_pixels(self, det: np.ndarray, x: np.ndarray,
                    y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Detector-linear (p', q') of pixel positions on detectors."""
        centers = self.detector_centers()[det]
        size = self.detector_size_deg
        pl = centers[:, 0] + (x + 0.5) * self.pixel_scale_deg - 0.5 * size
        ql = centers[:, 1] + (y + 0.5) * self.pixel_scale_deg - 0.5 * size
        return pl, ql

    def cd_matrix(self, pl: np.ndarray, ql: np.ndarray, rot_deg: float) -> np.ndarray:
        """Local CD matrix d(xi, eta)/d(x, y) [rad/pixel], shape (n, 2, 2)."""
        r2 = pl * pl + ql * ql
        jac = np.empty((len(pl), 2, 2))
        base = 1.0 + self.kappa * r2
        jac[:, 0, 0] = base + 2.0 * self.kappa * pl * pl
        jac[:, 0, 1] = 2.0 * self.kappa * pl * ql
        jac[:, 1, 0] = jac[:, 0, 1]
        jac[:, 1, 1] = base + 2.0 * self.kappa * ql * ql
        c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
        refl = np.array([[-c, -s], [-s, c]])
        return np.einsum("ij,njk->nik", refl, jac) * math.radians(self.pixel_scale_deg)


def _grid_extent(n_columns: int, n_rows: int, corner_cut: int) -> float:
    """Distance from the grid centre to its farthest cell corner, in cell pitches."""
    if corner_cut == 0:
        return 0.5 * math.hypot(n_columns, n_rows)
    return math.hypot(0.5 * n_columns - corner_cut, 0.5 * n_rows)


def make_camera(n_detectors: int | None, field_radius_deg: float, max_dither_deg: float,
                layout: CameraLayout = "grid") -> Camera:
    """The camera of a survey whose dithered pointings stay within ``field_radius_deg``.

    ``layout="grid"``: ``n_detectors`` (default 9) 4k CCDs at 0.2"/pix on a near-square grid,
    shrunk to fit inside the field.  ``layout="lsstcam"``: LSSTCam's 189 full-size CCDs (21
    rafts of 3 x 3 in a 5 x 5 raft grid without its corners, 9.3 deg^2); never shrunk.

    Raises:
        ValueError: a bad layout or detector count, or a field too small for the camera.
    """
    if layout not in CAMERA_LAYOUTS:
        raise ValueError(f"camera must be one of {CAMERA_LAYOUTS}, got {layout!r}")
    if layout == "lsstcam":
        return _lsstcam(n_detectors, field_radius_deg, max_dither_deg)
    n_detectors = 9 if n_detectors is None else n_detectors
    if n_detectors < 1:
        raise ValueError(f"n_detectors must be >= 1, got {n_detectors}")
    n_columns = math.ceil(math.sqrt(n_detectors))
    n_rows = math.ceil(n_detectors / n_columns)
    pixel_scale_deg = PIXEL_SCALE_ARCSEC / 3600.0
    gap = 1.02
    n_pixels = DETECTOR_PIXELS
    # The whole focal plane plus the largest dither must stay within the field (with margin).
    allowed_half_diag = _allowed_half_diagonal(field_radius_deg, max_dither_deg)
    if allowed_half_diag <= 0:
        raise ValueError("field_radius_deg too small for the dither pattern")
    max_pitch = 2.0 * allowed_half_diag / math.hypot(n_columns, n_rows)
    if n_pixels * pixel_scale_deg * gap > max_pitch:
        n_pixels = int(max_pitch / gap / pixel_scale_deg)
    if n_pixels < 64:
        raise ValueError("field_radius_deg too small for the camera")
    return Camera(n_detectors=n_detectors, n_columns=n_columns, n_rows=n_rows,
                  n_pixels=n_pixels, pixel_scale_deg=pixel_scale_deg,
                  pitch_deg=n_pixels * pixel_scale_deg * gap)


def _allowed_half_diagonal(field_radius_deg: float, max_dither_deg: float) -> float:
    """How far from the boresight the distortion-free focal plane may reach [deg]."""
    return (0.95 * field_radius_deg / (1.0 + DISTORTION_KAPPA * field_radius_deg**2)
            - max_dither_deg)


def _lsstcam(n_detectors: int | None, field_radius_deg: float,
             max_dither_deg: float) -> Camera:
    """LSSTCam's focal plane: 189 4k CCDs in a 15 x 15 grid without its 3 x 3 corners."""
    if n_detectors not in (None, LSSTCAM_DETECTORS):
        raise ValueError(f"the LSSTCam layout has {LSSTCAM_DETECTORS} detectors, "
                         f"got n_detectors={n_detectors}")
    pixel_scale_deg = PIXEL_SCALE_ARCSEC / 3600.0
    camera = Camera(n_detectors=LSSTCAM_DETECTORS, n_columns=15, n_rows=15,
                    n_pixels=DETECTOR_PIXELS, pixel_scale_deg=pixel_scale_deg,
                    pitch_deg=DETECTOR_PIXELS * pixel_scale_deg * 1.02, corner_cut=3)
    if _allowed_half_diagonal(field_radius_deg, max_dither_deg) < camera.half_diagonal_deg:
        reach = camera.half_diagonal_deg + max_dither_deg
        # smallest radius with 0.95 R / (1 + kappa R^2) >= reach (the smaller root)
        a = DISTORTION_KAPPA * reach
        needed = (0.95 - math.sqrt(0.95**2 - 4.0 * a * reach)) / (2.0 * a)
        raise ValueError(f"field_radius_deg={field_radius_deg} is too small for the LSSTCam "
                         f"focal plane (its corners reach {camera.half_diagonal_deg:.2f} deg "
                         f"from the boresight, dithers {max_dither_deg:.2f} deg): use at least "
                         f"{math.ceil(needed * 100) / 100:.2f}")
    return camera


# ------------------------------------------------------------------------------------------
# The true sky
# ------------------------------------------------------------------------------------------


@dataclass
class Sky:
    """The fixed true objects.

    Attributes:
        xyz: unit vectors (n, 3).
        ra, dec: degrees.
        mags: AB magnitude per band, shape (n, n_bands).
        is_star: True for stars.
        extendedness: the value an isolated detection reports (0 stars, 1 or 0.3 galaxies).
        size_arcsec: intrinsic Gaussian sigma (0 for stars) [arcsec].
        group: index of the group's primary object for members of close pairs/chains, else -1.
        group_min_sep: smallest separation inside the object's group [arcsec] (inf if none).
    """

    xyz: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    mags: np.ndarray
    is_star: np.ndarray
    extendedness: np.ndarray
    size_arcsec: np.ndarray
    group: np.ndarray
    group_min_sep: np.ndarray

    def __len__(self) -> int:
        return len(self.ra)


def _band_mags(base_r: np.ndarray, colour: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """Magnitudes in ``bands`` from an r magnitude and a g-r colour."""
    cols = [base_r + COLOUR_SLOPE.get(b, 0.0) * colour + COLOUR_OFFSET.get(b, 0.0) for b in bands]
    return np.stack(cols, axis=-1)


def _star_mags(rng: np.random.Generator, n: int) -> np.ndarray:
    """Star r magnitudes 16-24, number counts rising ~ 10^(0.1 m)."""
    slope = 0.1 * math.log(10.0)
    lo, hi = math.exp(slope * 16.0), math.exp(slope * 24.0)
    return np.log(rng.uniform(lo, hi, n)) / slope


def make_sky(rng: np.random.Generator, n_objects: int, bands: Sequence[str], ra_center: float,
             dec_center: float, radius_deg: float, crowded: bool) -> Sky:
    """Draw the true objects (primaries, then close companions of some stars)."""
    xyz = random_in_cap(rng, n_objects, ra_center, dec_center, radius_deg)
    is_star = rng.random(n_objects) < STAR_FRACTION
    n_star = int(is_star.sum())
    n_gal = n_objects - n_star
    r_mag = np.empty(n_objects)
    r_mag[is_star] = _star_mags(rng, n_star)
    # Galaxies: 18-25 mag, counts rising steeply.
    slope = 0.3 * math.log(10.0)
    r_mag[~is_star] = np.log(rng.uniform(math.exp(slope * 18.0), math.exp(slope * 25.0),
                                         n_gal)) / slope
    colour = np.where(is_star, rng.uniform(0.2, 1.5, n_objects), rng.uniform(0.4, 1.2, n_objects))
    ext = np.where(is_star, 0.0, np.where(rng.random(n_objects) < LOOSE_GALAXY_FRACTION, 0.3, 1.0))
    size = np.where(is_star, 0.0, rng.uniform(0.2, 1.5, n_objects))
    group = np.full(n_objects, -1, dtype=np.int64)
    min_sep = np.full(n_objects, np.inf)
    comp = _close_companions(rng, xyz, r_mag, np.flatnonzero(is_star), crowded)
    group[comp.pair_primary] = comp.pair_primary
    min_sep[comp.pair_primary] = comp.pair_sep
    group[comp.chain_primary] = comp.chain_primary
    min_sep[comp.chain_primary] = comp.chain_step
    n_new = len(comp.r_mag)
    xyz = np.concatenate([xyz, comp.xyz])
    r_mag = np.concatenate([r_mag, comp.r_mag])
    colour = np.concatenate([colour, comp.colour])
    is_star = np.concatenate([is_star, np.ones(n_new, dtype=bool)])
    ext = np.concatenate([ext, np.zeros(n_new)])
    size = np.concatenate([size, np.zeros(n_new)])
    group = np.concatenate([group, comp.pair_primary, comp.chain_primary, comp.chain_primary])
    min_sep = np.concatenate([min_sep, comp.pair_sep, comp.chain_step, comp.chain_step])
    ra, dec = radec_from_vectors(xyz)
    return Sky(xyz=xyz, ra=ra, dec=dec, mags=_band_mags(r_mag, colour, bands), is_star=is_star,
               extendedness=ext, size_arcsec=size, group=group, group_min_sep=min_sep)


@dataclass(frozen=True)
class _Companions:
    """Close companions of some stars: one per pair primary, then two per chain primary."""

    pair_primary: np.ndarray
    pair_sep: np.ndarray  # [arcsec]
    chain_primary: np.ndarray
    chain_step: np.ndarray  # [arcsec]
    xyz: np.ndarray  # the companions: pair companions, first then second chain members
    r_mag: np.ndarray
    colour: np.ndarray


def _close_companions(rng: np.random.Generator, xyz: np.ndarray, r_mag: np.ndarray,
                      star_idx: np.ndarray, crowded: bool) -> _Companions:
    """Pairs at 0.3-3" (and, when crowded, chains of three) around some of the stars."""
    pair_frac = 0.25 if crowded else 0.02
    chain_frac = 0.05 if crowded else 0.0
    pick = rng.random(len(star_idx))
    pair_primary = star_idx[pick < pair_frac]
    chain_primary = star_idx[(pick >= pair_frac) & (pick < pair_frac + chain_frac)]
    # Separation mixture: 0.3-0.5, 0.5-1, 1-2, 2-3 arcsec.
    edges = np.array([0.3, 0.5, 1.0, 2.0, 3.0])
    which = rng.choice(4, size=len(pair_primary), p=[0.2, 0.3, 0.3, 0.2])
    pair_sep = rng.uniform(edges[which], edges[which + 1])
    pair_pa = rng.uniform(0.0, 360.0, len(pair_primary))
    comp_xyz = offset_xyz(xyz[pair_primary], pair_sep / 3600.0, pair_pa)
    comp_r = r_mag[pair_primary] + rng.uniform(0.0, 2.5, len(pair_primary))
    comp_colour = rng.uniform(0.2, 1.5, len(pair_primary))
    # Chains of three: spacing 0.5-0.75" on a line (total length <= 1.5").
    chain_step = rng.uniform(0.5, 0.75, len(chain_primary))
    chain_pa = rng.uniform(0.0, 360.0, len(chain_primary))
    chain1 = offset_xyz(xyz[chain_primary], chain_step / 3600.0, chain_pa)
    chain2 = offset_xyz(xyz[chain_primary], 2.0 * chain_step / 3600.0, chain_pa)
    chain_r1 = r_mag[chain_primary] + rng.uniform(0.0, 2.0, len(chain_primary))
    chain_r2 = r_mag[chain_primary] + rng.uniform(0.0, 2.0, len(chain_primary))
    chain_colour = rng.uniform(0.2, 1.5, (2, len(chain_primary)))
    return _Companions(pair_primary=pair_primary, pair_sep=pair_sep, chain_primary=chain_primary,
                       chain_step=chain_step,
                       xyz=np.concatenate([comp_xyz, chain1, chain2]),
                       r_mag=np.concatenate([comp_r, chain_r1, chain_r2]),
                       colour=np.concatenate([comp_colour, chain_colour[0], chain_colour[1]]))


def border_star_positions(nside: int, ra_center: float, dec_center: float,
                          radius_deg: float) -> np.ndarray:
    """Unit vectors (n, 3) on the boundaries of the HEALPix nest pixels at ``nside`` inside
    the cap of ``radius_deg`` about (ra_center, dec_center) [deg].

    Every pixel corner and ``BORDER_STEP - 1`` points along each pixel edge
    (``healpy.boundaries``), each point once although the pixels around it all list it.

    Raises:
        ValueError: ``nside`` is not a power of two in [1, 2^29], or the cap holds more than
            ``MAX_BORDER_PIXELS`` pixels.
    """
    import healpy as hp
    from scipy.spatial import cKDTree

    if not 1 <= nside <= (1 << 29) or nside & (nside - 1):
        raise ValueError(f"border_nside must be a power of two in [1, 2^29], got {nside}")
    cos_radius = math.cos(math.radians(radius_deg))
    n_pixels = (1.0 - cos_radius) / 2.0 * hp.nside2npix(nside)
    if n_pixels > MAX_BORDER_PIXELS:
        raise ValueError(f"border_nside={nside}: the footprint holds ~{n_pixels:,.0f} pixels, "
                         f"more than {MAX_BORDER_PIXELS:,}; use a smaller border_nside")
    centre = unit_vectors(np.array([ra_center]), np.array([dec_center]))[0]
    pixels = hp.query_disc(nside, centre, math.radians(radius_deg), inclusive=True, nest=True)
    corners = hp.boundaries(nside, pixels, step=BORDER_STEP, nest=True)  # (n, 3, 4 * step)
    xyz = np.moveaxis(np.reshape(corners, (len(pixels), 3, -1)), 1, 2).reshape(-1, 3)
    xyz = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    xyz = xyz[xyz @ centre >= cos_radius]
    # the same point listed by neighbouring pixels agrees to rounding: keep its first copy
    duplicate = cKDTree(xyz).query_pairs(BORDER_DUPLICATE_CHORD, output_type="ndarray")
    keep = np.ones(len(xyz), dtype=bool)
    keep[duplicate[:, 1]] = False
    return xyz[keep]


def with_border_stars(sky: Sky, xyz: np.ndarray, rng: np.random.Generator,
                      bands: Sequence[str]) -> Sky:
    """``sky`` plus isolated point-like stars at ``xyz`` (appended last), r = 18.5-19.5 and
    g - r = 0.5-0.8: S/N ~100 in 30 s in every band, never saturated, so the selection keeps
    every clean observation of them."""
    n = len(xyz)
    r_mag = rng.uniform(18.5, 19.5, n)
    colour = rng.uniform(0.5, 0.8, n)
    ra, dec = radec_from_vectors(xyz)
    return Sky(xyz=np.concatenate([sky.xyz, xyz]), ra=np.concatenate([sky.ra, ra]),
               dec=np.concatenate([sky.dec, dec]),
               mags=np.concatenate([sky.mags, _band_mags(r_mag, colour, bands)]),
               is_star=np.concatenate([sky.is_star, np.ones(n, dtype=bool)]),
               extendedness=np.concatenate([sky.extendedness, np.zeros(n)]),
               size_arcsec=np.concatenate([sky.size_arcsec, np.zeros(n)]),
               group=np.concatenate([sky.group, np.full(n, -1, dtype=np.int64)]),
               group_min_sep=np.concatenate([sky.group_min_sep, np.full(n, np.inf)]))


# ------------------------------------------------------------------------------------------
# Visits
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurveyTiling:
    """A deterministic tiling of a survey's cap by the camera's field.

    Tile centres lie on rings around the survey centre: the centre itself, then rings
    ``spacing_deg`` or a little less apart out to ``radius - spacing / 2``, each ring holding
    as many tiles as fit ``spacing_deg`` apart along it (alternate rings staggered by half a
    tile).  A *pass* visits every tile once; visit ``i`` goes to tile ``i % n`` of pass
    ``i // n`` in band ``(tile + pass) % n_bands``, so consecutive visits cycle through the
    bands and every tile has had every band after ``n_bands`` passes.
    """

    ra: np.ndarray
    dec: np.ndarray
    spacing_deg: float

    def __len__(self) -> int:
        return len(self.ra)

    @classmethod
    def of_cap(cls, ra_center: float, dec_center: float, radius_deg: float,
               spacing_deg: float) -> SurveyTiling:
        """The tiling of the cap of ``radius_deg`` about (ra_center, dec_center) [deg]."""
        n_rings = max(math.ceil((radius_deg - 0.5 * spacing_deg) / spacing_deg), 0)
        step = (radius_deg - 0.5 * spacing_deg) / n_rings if n_rings else 0.0
        seps, pas = [np.zeros(1)], [np.zeros(1)]
        for k in range(1, n_rings + 1):
            circumference = 2.0 * math.degrees(math.pi * math.sin(math.radians(k * step)))
            n_tiles = max(math.ceil(circumference / spacing_deg), 1)
            seps.append(np.full(n_tiles, k * step))
            pas.append((np.arange(n_tiles) + 0.5 * (k % 2)) * 360.0 / n_tiles)
        sep, pa = np.concatenate(seps), np.concatenate(pas)
        centre = unit_vectors(np.full(len(sep), ra_center), np.full(len(sep), dec_center))
        ra, dec = radec_from_vectors(offset_xyz(centre, sep, pa))
        return cls(ra=ra, dec=dec, spacing_deg=spacing_deg)

    def visit_tiles(self, n_visits: int, n_bands: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile index and band index of visits ``0 .. n_visits - 1``."""
        idx = np.arange(n_visits)
        tile = idx % len(self)
        return tile, (tile + idx // len(self)) % n_bands


@dataclass(frozen=True)
class VisitPlan:
    """Per-visit observing conditions (all visits of the survey as arrays)."""

    visit: np.ndarray
    band: list[str]
    band_index: np.ndarray
    physical_filter: list[str]
    ra: np.ndarray
    dec: np.ndarray
    rotation: np.ndarray
    mjd_mid: np.ndarray
    exptime: np.ndarray
    seeing: np.ndarray
    zp_per_second: np.ndarray
    sky_mag: np.ndarray
    airmass: np.ndarray
    altitude: np.ndarray
    azimuth: np.ndarray

    def take(self, first: int) -> VisitPlan:
        """The plan of visits ``first`` onwards."""
        return VisitPlan(**{f.name: getattr(self, f.name)[first:] for f in fields(self)})


def _gmst_deg(mjd: np.ndarray) -> np.ndarray:
    """Greenwich mean sidereal time [deg] of MJD (UT1 ~ TAI is fine here)."""
    return np.mod(280.46061837 + 360.98564736629 * (mjd - 51544.5), 360.0)


def _alt_az(ha_deg: np.ndarray, dec_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Altitude and azimuth (deg, N through E) at the Rubin site."""
    ha = np.radians(ha_deg)
    dec = np.radians(dec_deg)
    lat = math.radians(SITE_LATITUDE)
    sin_alt = np.sin(dec) * math.sin(lat) + np.cos(dec) * math.cos(lat) * np.cos(ha)
    alt = np.arcsin(np.clip(sin_alt, -1.0, 1.0))
    az = np.arctan2(-np.sin(ha) * np.cos(dec),
                    np.sin(dec) * math.cos(lat) - np.cos(dec) * math.sin(lat) * np.cos(ha))
    return np.degrees(alt), np.mod(np.degrees(az), 360.0)


def _airmass(alt_deg: np.ndarray) -> np.ndarray:
    """Kasten & Young (1989) airmass; finite down to the horizon (clipped there)."""
    z = np.clip(90.0 - alt_deg, 0.0, 90.0)
    return 1.0 / (np.cos(np.radians(z)) + 0.50572 * (96.07995 - z) ** -1.6364)


def make_visit_plan(rng: np.random.Generator, n_visits: int, bands: Sequence[str],
                    ra_center: float, dec_center: float, max_dither_deg: float,
                    tiling: SurveyTiling | None = None) -> VisitPlan:
    """Visit ids, pointings, times and conditions of every visit.

    Pointings are offset by ``max_dither_deg / 3`` to ``max_dither_deg`` in a random direction
    from the field centre or, with a ``tiling``, from the centre of the visit's tile
    (:meth:`SurveyTiling.visit_tiles`, which also gives the bands); without one the bands
    cycle through ``bands``.
    """
    idx = np.arange(n_visits)
    night = idx // VISITS_PER_NIGHT
    seq = idx % VISITS_PER_NIGHT + 1
    night_mjd = FIRST_NIGHT_MJD + night
    dates = np.datetime64("1858-11-17") + night_mjd.astype("timedelta64[D]")
    day_obs = np.array([int(str(d).replace("-", "")) for d in dates], dtype=np.int64)
    visit = day_obs * 100_000 + seq

    r = rng.uniform(max_dither_deg / 3.0, max_dither_deg, n_visits)
    theta = rng.uniform(0.0, 2.0 * np.pi, n_visits)
    if tiling is None:
        band_index = idx % len(bands)
        ra, dec = inverse_gnomonic(r * np.sin(theta), r * np.cos(theta), ra_center, dec_center)
    else:
        tile, band_index = tiling.visit_tiles(n_visits, len(bands))
        centre = unit_vectors(tiling.ra[tile], tiling.dec[tile])
        ra, dec = radec_from_vectors(offset_xyz(centre, r, np.degrees(theta)))
    band = [bands[int(k)] for k in band_index]
    rotation = rng.uniform(-90.0, 90.0, n_visits)
    exptime = np.where(rng.random(n_visits) < 0.1, 15.0, 30.0)
    mjd_mid, altitude, azimuth = _observing_times(rng, night, seq, night_mjd, ra, dec, ra_center)
    airmass = _airmass(altitude)
    seeing, zp, sky_mag = _observing_conditions(rng, band, airmass)
    return VisitPlan(visit=visit, band=band, band_index=band_index,
                     physical_filter=[BAND_PROPERTIES[b][3] if b in BAND_PROPERTIES
                                      else f"{b}_sim" for b in band],
                     ra=ra, dec=dec, rotation=rotation, mjd_mid=mjd_mid, exptime=exptime,
                     seeing=seeing, zp_per_second=zp, sky_mag=sky_mag, airmass=airmass,
                     altitude=altitude, azimuth=azimuth)


def _observing_times(rng: np.random.Generator, night: np.ndarray, seq: np.ndarray,
                     night_mjd: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                     ra_center: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mid-exposure MJD, altitude and azimuth [deg] of the visits: each night observes the
    field around a random hour angle (+-2 h), one visit every 40 s."""
    n_visits = len(night)
    ha_night = rng.uniform(-30.0, 30.0, int(night.max()) + 1 if n_visits else 0)
    local_midnight = night_mjd + 0.5 - SITE_LONGITUDE / 360.0  # ~ 04:43 UTC
    lst_midnight = _gmst_deg(local_midnight) + SITE_LONGITUDE
    target = ra_center + ha_night[night] if n_visits else np.zeros(0)
    shift_days = np.mod(target - lst_midnight + 180.0, 360.0) - 180.0
    start = local_midnight + shift_days / 360.98564736629
    mjd_mid = start + (seq - 0.5 * VISITS_PER_NIGHT) * 40.0 / 86400.0
    ha = np.mod(_gmst_deg(mjd_mid) + SITE_LONGITUDE - ra + 180.0, 360.0) - 180.0
    altitude, azimuth = _alt_az(ha, dec)
    return mjd_mid, altitude, azimuth


def _observing_conditions(rng: np.random.Generator, band: Sequence[str],
                          airmass: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeing FWHM [arcsec], zero point [AB mag of 1 count/s] (extinction, clouds) and sky
    brightness [mag/arcsec^2] of each visit."""
    n_visits = len(band)
    seeing = np.clip(rng.lognormal(math.log(0.8), 0.2, n_visits), 0.5, 1.6)
    zp_band = np.array([BAND_PROPERTIES.get(b, BAND_PROPERTIES["r"])[0] for b in band])
    k_band = np.array([BAND_PROPERTIES.get(b, BAND_PROPERTIES["r"])[2] for b in band])
    clouds = np.where(rng.random(n_visits) < 0.2, rng.exponential(0.1, n_visits), 0.0)
    zp = (zp_band - k_band * (np.minimum(airmass, 3.0) - 1.0) - clouds
          + rng.normal(0.0, 0.02, n_visits))
    sky_mag = (np.array([BAND_PROPERTIES.get(b, BAND_PROPERTIES["r"])[1] for b in band])
               + rng.normal(0.0, 0.15, n_visits))
    return seeing, zp, sky_mag


@dataclass(frozen=True)
class DetectorConditions:
    """Per-detector conditions of every visit (arrays of shape (n_visits, n_detectors))."""

    zp_per_second: np.ndarray
    seeing: np.ndarray  # FWHM [arcsec]
    sky: np.ndarray  # counts / pixel in the exposure

    def take(self, first: int) -> DetectorConditions:
        """The conditions of visits ``first`` onwards."""
        return DetectorConditions(zp_per_second=self.zp_per_second[first:],
                                  seeing=self.seeing[first:], sky=self.sky[first:])


def make_detector_conditions(rng: np.random.Generator, plan: VisitPlan,
                             camera: Camera) -> DetectorConditions:
    """Detector-to-detector variations of zero point, seeing and sky around the visit's."""
    shape = (len(plan.visit), camera.n_detectors)
    zp = plan.zp_per_second[:, None] + rng.normal(0.0, 0.01, shape)
    seeing = plan.seeing[:, None] * (1.0 + rng.normal(0.0, 0.03, shape))
    pix_area = PIXEL_SCALE_ARCSEC**2
    sky_rate = 10.0 ** (-0.4 * (plan.sky_mag[:, None] - 2.5 * math.log10(pix_area) - zp))
    sky = plan.exptime[:, None] * sky_rate * (1.0 + rng.normal(0.0, 0.02, shape))
    return DetectorConditions(zp_per_second=zp, seeing=seeing, sky=sky)


# ------------------------------------------------------------------------------------------
# One visit's source table
# ------------------------------------------------------------------------------------------

SOURCE_SCHEMA = pa.schema([
    ("sourceId", pa.int64()),
    ("visit", pa.int64()),
    ("detector", pa.int64()),
    ("ccdVisitId", pa.int64()),
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("x", pa.float64()),
    ("y", pa.float64()),
    ("calib_psf_candidate", pa.bool_()),
    ("apFlux_12_0_instFlux", pa.float64()),
    ("apFlux_12_0_instFluxErr", pa.float64()),
    ("apFlux_12_0_flag", pa.bool_()),
    ("apFlux_17_0_instFlux", pa.float64()),
    ("apFlux_17_0_instFluxErr", pa.float64()),
    ("apFlux_17_0_flag", pa.bool_()),
    ("pixelFlags_edge", pa.bool_()),
    ("pixelFlags_interpolatedCenter", pa.bool_()),
    ("pixelFlags_saturatedCenter", pa.bool_()),
    ("pixelFlags_crCenter", pa.bool_()),
    ("pixelFlags_bad", pa.bool_()),
    ("pixelFlags_interpolated", pa.bool_()),
    ("pixelFlags_saturated", pa.bool_()),
    ("centroid_flag", pa.bool_()),
    ("extendedness", pa.float64()),
    ("parentSourceId", pa.int64()),
    ("deblend_nChild", pa.int32()),
    ("detect_isPrimary", pa.bool_()),
    ("localBackground_instFlux", pa.float64()),
    ("localBackground_flag", pa.bool_()),
    ("localWcs_CDMatrix_1_1", pa.float64()),
    ("localWcs_CDMatrix_1_2", pa.float64()),
    ("localWcs_CDMatrix_2_1", pa.float64()),
    ("localWcs_CDMatrix_2_2", pa.float64()),
    ("band", pa.string()),
    ("physical_filter", pa.string()),
])

_FLAG_NAMES = ("pixelFlags_edge", "pixelFlags_interpolatedCenter", "pixelFlags_saturatedCenter",
               "pixelFlags_crCenter", "pixelFlags_bad", "pixelFlags_interpolated",
               "pixelFlags_saturated", "centroid_flag", "apFlux_12_0_flag", "apFlux_17_0_flag",
               "localBackground_flag")


def _aperture_fraction(sigma_pix: np.ndarray, radius: float) -> np.ndarray:
    """Enclosed flux fraction of a PSF with wings (Gaussian core + extended halo)."""
    core = 1.0 - np.exp(-0.5 * (radius / sigma_pix) ** 2)
    halo = 3.0 * (sigma_pix / radius) ** 2
    return core * (1.0 - halo / (1.0 + halo))


def _measure(rng: np.random.Generator, flux_total: np.ndarray, sigma_pix: np.ndarray,
             sky: np.ndarray, lbg_true: np.ndarray) -> dict[str, np.ndarray]:
    """Noisy aperture fluxes (12 and 17 pixels) with correlated noise and local background."""
    a12 = math.pi * APERTURE_RADII[0] ** 2
    a17 = math.pi * APERTURE_RADII[1] ** 2
    f12 = flux_total * _aperture_fraction(sigma_pix, APERTURE_RADII[0])
    f17 = flux_total * _aperture_fraction(sigma_pix, APERTURE_RADII[1])
    var12 = np.maximum(f12, 0.0) + a12 * sky
    var17 = np.maximum(f17, 0.0) + a17 * sky
    n12 = rng.standard_normal(len(f12)) * np.sqrt(var12)
    n17 = n12 + rng.standard_normal(len(f12)) * np.sqrt(np.maximum(var17 - var12, 0.0))
    return {
        "apFlux_12_0_instFlux": f12 + n12 + a12 * lbg_true,
        "apFlux_12_0_instFluxErr": np.sqrt(var12),
        "apFlux_17_0_instFlux": f17 + n17 + a17 * lbg_true,
        "apFlux_17_0_instFluxErr": np.sqrt(var17),
    }


def simulate_visit(sky: Sky, camera: Camera, plan: VisitPlan, conditions: DetectorConditions,
                   i: int, rng: np.random.Generator, n_junk: int) -> pa.Table:
    """The ``sourceTable_visit`` table of visit number ``i`` of the plan.

    The steps below draw from ``rng`` in this order, which the byte-identical output of a
    seed depends on: detection and measurement of the true objects, deblend parents of close
    groups, junk singletons, then the flags and the local background of every row.
    """
    view = _VisitView.of(plan, conditions, i)
    objects = _detect_objects(sky, camera, view, rng)
    parents = _deblend_parents(sky, objects, rng)
    junk = _junk_sources(camera, view, rng, n_junk)
    return _source_table(sky, camera, view, objects, parents, junk, rng)


@dataclass(frozen=True)
class _VisitView:
    """One visit of the plan: its pointing, exposure and detector conditions."""

    visit: int
    ra0: float
    dec0: float
    rot: float
    exptime: float
    band_index: int
    band: str
    physical_filter: str
    cond: DetectorConditions  # this visit's row: arrays over detectors

    @classmethod
    def of(cls, plan: VisitPlan, conditions: DetectorConditions, i: int) -> _VisitView:
        return cls(visit=int(plan.visit[i]), ra0=float(plan.ra[i]), dec0=float(plan.dec[i]),
                   rot=float(plan.rotation[i]), exptime=float(plan.exptime[i]),
                   band_index=int(plan.band_index[i]), band=plan.band[i],
                   physical_filter=plan.physical_filter[i],
                   cond=DetectorConditions(zp_per_second=conditions.zp_per_second[i],
                                           seeing=conditions.seeing[i], sky=conditions.sky[i]))

    def rotated(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tangent plane (xi, eta) <-> focal plane (p, q): the visit's rotation with the axes
        flipped, its own inverse."""
        c, s = math.cos(math.radians(self.rot)), math.sin(math.radians(self.rot))
        return -c * a - s * b, -s * a + c * b


@dataclass
class _Objects:
    """The true objects detected in one visit, with their measurements (one row each)."""

    obj: np.ndarray  # index into the Sky
    det: np.ndarray
    xi: np.ndarray
    eta: np.ndarray
    flux: np.ndarray  # counts in the exposure
    sigma_pix: np.ndarray  # PSF convolved with the object's size [pix]
    sky: np.ndarray  # counts / pixel
    seeing: np.ndarray  # FWHM [arcsec]
    snr: np.ndarray
    meas: dict[str, np.ndarray] = field(default_factory=dict)
    lbg: np.ndarray = field(default_factory=lambda: np.zeros(0))  # true local background
    sat_center: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    sat_any: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    extendedness: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.obj)


def _detect_objects(sky: Sky, camera: Camera, view: _VisitView,
                    rng: np.random.Generator) -> _Objects:
    """The true objects on a detector that pass detection (PSF-like S/N with noise above 5),
    with astrometric noise, aperture fluxes, saturation and extendedness."""
    pos0 = unit_vectors(np.array([view.ra0]), np.array([view.dec0]))[0]
    reach = math.radians(camera.half_diagonal_deg * 1.05 + 0.01)
    cand = np.flatnonzero(sky.xyz @ pos0 > math.cos(reach))
    xi, eta = gnomonic(sky.xyz[cand], view.ra0, view.dec0)
    det, _, _ = camera.to_pixels(*camera.undistort(*view.rotated(xi, eta)))
    on = det >= 0
    obj, det, xi, eta = cand[on], det[on], xi[on], eta[on]

    mags = sky.mags[obj, view.band_index]
    zp = view.cond.zp_per_second[det]
    seeing = view.cond.seeing[det]
    skyc = view.cond.sky[det]
    flux = view.exptime * 10.0 ** (-0.4 * (mags - zp))
    psf_sigma_pix = seeing / 2.3548 / PIXEL_SCALE_ARCSEC
    size_pix = sky.size_arcsec[obj] / PIXEL_SCALE_ARCSEC
    sigma_pix = np.sqrt(psf_sigma_pix**2 + size_pix**2)
    area_psf = 4.0 * math.pi * sigma_pix**2
    snr_det = flux / np.sqrt(flux + area_psf * skyc)
    detected = snr_det + rng.standard_normal(len(flux)) > 5.0
    flux, skyc = flux[detected], skyc[detected]
    objects = _Objects(obj=obj[detected], det=det[detected], xi=xi[detected],
                       eta=eta[detected], flux=flux, sigma_pix=sigma_pix[detected], sky=skyc,
                       seeing=seeing[detected],
                       snr=flux / np.sqrt(flux + area_psf[detected] * skyc))
    _add_astrometric_noise(objects, rng)
    _measure_objects(sky, objects, rng)
    return objects


def _add_astrometric_noise(objects: _Objects, rng: np.random.Generator) -> None:
    """Systematic 0.02-0.05" per visit plus centroid noise ~ FWHM / SNR, at most 0.3"."""
    n_obj = len(objects)
    sig_sys = rng.uniform(0.02, 0.05)
    sig_pos = np.minimum(np.hypot(sig_sys, 0.5 * objects.seeing / np.maximum(objects.snr, 1.0)),
                         0.3) / 3600.0
    objects.xi = objects.xi + rng.standard_normal(n_obj) * sig_pos
    objects.eta = objects.eta + rng.standard_normal(n_obj) * sig_pos


def _measure_objects(sky: Sky, objects: _Objects, rng: np.random.Generator) -> None:
    """Aperture fluxes with a local background, saturation (core flux lost) and the
    extendedness reported (a tenth of the faint stars look extended)."""
    n_obj = len(objects)
    flux, sigma_pix, skyc = objects.flux, objects.sigma_pix, objects.sky
    objects.lbg = rng.normal(0.0, 0.3, n_obj) * np.sqrt(skyc / 1000.0)
    meas = _measure(rng, flux, sigma_pix, skyc, objects.lbg)
    peak = flux / (2.0 * math.pi * sigma_pix**2) + skyc
    objects.sat_center = peak > FULL_WELL
    objects.sat_any = objects.sat_center | (peak > 0.85 * FULL_WELL) & (rng.random(n_obj) < 0.5)
    lost = np.where(objects.sat_center, (FULL_WELL / peak) ** 0.3, 1.0)
    for key in ("apFlux_12_0_instFlux", "apFlux_17_0_instFlux"):
        meas[key] = meas[key] * lost
    objects.meas = meas
    ext = sky.extendedness[objects.obj].copy()
    faint_star = (ext == 0.0) & (objects.snr < 10.0)
    ext[faint_star & (rng.random(n_obj) < 0.1)] = 1.0
    objects.extendedness = ext


@dataclass(frozen=True)
class _Parents:
    """Deblend parents of the close groups of a visit and which objects are their children."""

    child: np.ndarray  # per object: it is a deblended child
    slot: np.ndarray  # per child (in object order): index of its parent
    n_child: np.ndarray
    det: np.ndarray
    xi: np.ndarray
    eta: np.ndarray
    meas: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.det)


def _deblend_parents(sky: Sky, objects: _Objects, rng: np.random.Generator) -> _Parents:
    """A parent for each group of two or more detected objects closer than 0.6 x seeing: the
    summed flux at the flux-weighted position, measured with a 1.5 x wider profile."""
    n_obj = len(objects)
    group = sky.group[objects.obj]
    blended = (group >= 0) & (sky.group_min_sep[objects.obj] < 0.6 * objects.seeing)
    _, grp_inv, grp_count = np.unique(group[blended], return_inverse=True, return_counts=True)
    keep_group = grp_count >= 2
    child = np.zeros(n_obj, dtype=bool)
    child_group = np.full(n_obj, -1, dtype=np.int64)
    bl_idx = np.flatnonzero(blended)
    is_child = keep_group[grp_inv]
    child[bl_idx[is_child]] = True
    child_group[bl_idx[is_child]] = grp_inv[is_child]
    n_parent = int(keep_group.sum())
    parent_slot = np.cumsum(keep_group) - 1  # group index -> parent row index
    cg = parent_slot[child_group[child]] if n_parent else np.zeros(0, dtype=np.int64)
    flux = objects.flux
    w = np.maximum(flux[child], 1.0)
    weights = np.maximum(np.bincount(cg, weights=w, minlength=n_parent), 1e-300)
    p_flux = np.bincount(cg, weights=flux[child], minlength=n_parent)
    p_xi = np.bincount(cg, weights=w * objects.xi[child], minlength=n_parent) / weights
    p_eta = np.bincount(cg, weights=w * objects.eta[child], minlength=n_parent) / weights
    p_first = np.full(n_parent, n_obj, dtype=np.int64)
    np.minimum.at(p_first, cg, np.flatnonzero(child))
    p_det = objects.det[p_first] if n_parent else np.zeros(0, dtype=np.int64)
    p_sky = objects.sky[p_first] if n_parent else np.zeros(0)
    p_sigma = objects.sigma_pix[p_first] * 1.5 if n_parent else np.zeros(0)
    return _Parents(child=child, slot=cg,
                    n_child=np.bincount(cg, minlength=n_parent).astype(np.int32),
                    det=p_det, xi=p_xi, eta=p_eta,
                    meas=_measure(rng, p_flux, p_sigma, p_sky, np.zeros(n_parent)))


@dataclass(frozen=True)
class _Junk:
    """Junk singletons: cosmic rays, artefacts and a few unflagged non-repeating sources."""

    det: np.ndarray
    xi: np.ndarray
    eta: np.ndarray
    meas: dict[str, np.ndarray]
    kind: np.ndarray  # uniform [0, 1): < 0.75 cosmic ray, < 0.9 artefact, else unflagged

    def __len__(self) -> int:
        return len(self.det)


def _junk_sources(camera: Camera, view: _VisitView, rng: np.random.Generator,
                  n_junk: int) -> _Junk:
    """``n_junk`` junk singletons anywhere on the detectors (300 to 30 000 counts)."""
    j_det = rng.integers(0, camera.n_detectors, n_junk)
    j_x = rng.uniform(0.0, camera.n_pixels - 1.0, n_junk)
    j_y = rng.uniform(0.0, camera.n_pixels - 1.0, n_junk)
    j_xi, j_eta = view.rotated(*camera.distort(*camera.from_pixels(j_det, j_x, j_y)))
    j_flux = np.exp(rng.uniform(math.log(300.0), math.log(3e4), n_junk))
    j_meas = _measure(rng, j_flux, np.full(n_junk, 0.8), view.cond.sky[j_det], np.zeros(n_junk))
    return _Junk(det=j_det, xi=j_xi, eta=j_eta, meas=j_meas, kind=rng.random(n_junk))


def _source_table(sky: Sky, camera: Camera, view: _VisitView, objects: _Objects,
                  parents: _Parents, junk: _Junk, rng: np.random.Generator) -> pa.Table:
    """The rows of the objects, the deblend parents and the junk as one ``sourceTable_visit``:
    positions, fluxes, flags, classification and local background, sorted by detector."""
    n_obj, n_parent = len(objects), len(parents)
    n_rows = n_obj + n_parent + len(junk)
    xi = np.concatenate([objects.xi, parents.xi, junk.xi])
    eta = np.concatenate([objects.eta, parents.eta, junk.eta])
    det = np.concatenate([objects.det, parents.det, junk.det])
    pl, ql = camera.undistort(*view.rotated(xi, eta))
    _, x, y = camera.to_pixels(pl, ql)
    x = np.clip(x, 0.0, camera.n_pixels - 1.0)
    y = np.clip(y, 0.0, camera.n_pixels - 1.0)
    ra, dec = inverse_gnomonic(xi, eta, view.ra0, view.dec0)
    cd = camera.cd_matrix(pl, ql, view.rot)
    kind = np.zeros(n_rows, dtype=np.int8)  # 0 object, 1 parent, 2 junk
    kind[n_obj:n_obj + n_parent] = 1
    kind[n_obj + n_parent:] = 2
    columns = {key: np.concatenate([objects.meas[key], parents.meas[key], junk.meas[key]])
               for key in objects.meas}
    cr, artefact = _junk_kinds(junk, kind)
    u = rng.random((8, n_rows))
    edge_dist = np.minimum(np.minimum(x, camera.n_pixels - 1.0 - x),
                           np.minimum(y, camera.n_pixels - 1.0 - y))
    columns |= _flags(objects, parents, cr, artefact, edge_dist, u)
    # truncated apertures at the very edge have no flux
    for key, radius in (("apFlux_12_0_instFlux", APERTURE_RADII[0]),
                        ("apFlux_17_0_instFlux", APERTURE_RADII[1])):
        columns[key] = np.where(edge_dist < 0.5 * radius, np.nan, columns[key])
    columns |= _classification(sky, objects, parents, artefact, columns, u)
    columns["localBackground_instFlux"] = (np.concatenate([objects.lbg, np.zeros(n_rows - n_obj)])
                                           + rng.normal(0.0, 0.05, n_rows))
    columns |= {"ra": ra, "dec": dec, "x": x, "y": y,
                "localWcs_CDMatrix_1_1": cd[:, 0, 0], "localWcs_CDMatrix_1_2": cd[:, 0, 1],
                "localWcs_CDMatrix_2_1": cd[:, 1, 0], "localWcs_CDMatrix_2_2": cd[:, 1, 1]}
    return _sorted_table(view, det, y, kind, parents, columns)


def _junk_kinds(junk: _Junk, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks over every row of the cosmic rays and the artefacts among the junk rows."""
    junk_kind = np.concatenate([np.full(len(kind) - len(junk), 9.0), junk.kind])
    cr = (kind == 2) & (junk_kind < 0.75)
    artefact = (kind == 2) & (junk_kind >= 0.75) & (junk_kind < 0.9)
    return cr, artefact


def _flags(objects: _Objects, parents: _Parents, cr: np.ndarray, artefact: np.ndarray,
           edge_dist: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
    """The pixel, centroid, aperture and background flags of every row: edges, random
    interpolation / cosmic rays / bad pixels, what the junk is, and saturation (a parent is
    saturated where one of its children is)."""
    n_obj, n_parent = len(objects), len(parents)
    n_other = len(cr) - n_obj
    flags = {name: np.zeros(len(cr), dtype=bool) for name in _FLAG_NAMES}
    flags["pixelFlags_edge"] = (edge_dist < 8.0) | (artefact & (u[0] < 0.4))
    flags["pixelFlags_interpolated"] = ((u[1] < 0.02) | (artefact & (u[0] >= 0.4))
                                        | (cr & (u[2] < 0.5)))
    flags["pixelFlags_interpolatedCenter"] = flags["pixelFlags_interpolated"] & (u[3] < 0.5)
    flags["pixelFlags_crCenter"] = (u[4] < 0.005) | (cr & (u[2] < 0.95))
    flags["pixelFlags_bad"] = (u[5] < 0.003) | (artefact & (u[0] < 0.7) & (u[0] >= 0.4))
    flags["centroid_flag"] = (u[6] < 0.005) | (artefact & (u[0] >= 0.7))
    sat_c = np.concatenate([objects.sat_center, np.zeros(n_other, dtype=bool)])
    sat_a = np.concatenate([objects.sat_any, np.zeros(n_other, dtype=bool)])
    if n_parent:
        ch = np.flatnonzero(parents.child)
        sat_c[n_obj:n_obj + n_parent] = np.bincount(parents.slot, weights=objects.sat_center[ch],
                                                    minlength=n_parent) > 0
        sat_a[n_obj:n_obj + n_parent] = np.bincount(parents.slot, weights=objects.sat_any[ch],
                                                    minlength=n_parent) > 0
    flags["pixelFlags_saturatedCenter"] = sat_c
    flags["pixelFlags_saturated"] = sat_a
    flags["apFlux_12_0_flag"] = (edge_dist < APERTURE_RADII[0]) | (u[7] < 0.002)
    flags["apFlux_17_0_flag"] = (edge_dist < APERTURE_RADII[1]) | flags["apFlux_12_0_flag"]
    flags["localBackground_flag"] = (u[7] > 0.995) | (edge_dist < 3.0)
    return flags


def _classification(sky: Sky, objects: _Objects, parents: _Parents, artefact: np.ndarray,
                    columns: dict[str, np.ndarray], u: np.ndarray) -> dict[str, np.ndarray]:
    """``extendedness`` (parents and artefacts 1, NaN for a few bad centroids),
    ``calib_psf_candidate`` (bright unsaturated isolated stars, half of them) and
    ``deblend_nChild`` of every row."""
    n_obj, n_parent = len(objects), len(parents)
    n_other = len(artefact) - n_obj
    extendedness = np.concatenate([objects.extendedness, np.ones(n_parent),
                                   np.where(artefact[n_obj + n_parent:], 1.0, 0.0)])
    extendedness[columns["centroid_flag"] & (u[6] < 0.002)] = np.nan
    snr = columns["apFlux_12_0_instFlux"] / columns["apFlux_12_0_instFluxErr"]
    is_object = np.arange(len(artefact)) < n_obj
    psf_cand = (is_object & np.concatenate([sky.is_star[objects.obj],
                                            np.zeros(n_other, dtype=bool)])
                & ~np.concatenate([parents.child, np.zeros(n_other, dtype=bool)])
                & (snr > 50.0) & (snr < 1000.0) & ~columns["pixelFlags_saturated"]
                & (u[3] > 0.5))
    n_child = np.concatenate([np.zeros(n_obj, dtype=np.int32), parents.n_child,
                              np.zeros(n_other - n_parent, dtype=np.int32)])
    return {"extendedness": extendedness, "calib_psf_candidate": psf_cand,
            "deblend_nChild": n_child}


def source_id_shift(n_rows: int) -> int:
    """Bits of the row number in the sourceIds of a visit of ``n_rows`` rows:
    ``SOURCE_ID_SHIFT`` (20), or ``LARGE_VISIT_SOURCE_ID_SHIFT`` (22) from 2^20 rows on.

    Ids of visits of either kind never collide: a visit id shifted by 22 bits equals one
    shifted by 20 only for visit ids four times larger, beyond any simulated date.
    """
    return SOURCE_ID_SHIFT if n_rows < (1 << SOURCE_ID_SHIFT) else LARGE_VISIT_SOURCE_ID_SHIFT


def _sorted_table(view: _VisitView, det: np.ndarray, y: np.ndarray, kind: np.ndarray,
                  parents: _Parents, columns: dict[str, np.ndarray]) -> pa.Table:
    """The rows sorted by (detector, y) with their ids: ``sourceId = visit << shift | row``
    (:func:`source_id_shift`), a
    child's ``parentSourceId`` is its parent's, parents are not primary."""
    n_rows = len(det)
    n_obj = int(np.count_nonzero(kind == 0))
    order = np.lexsort((y, det))
    shift = source_id_shift(n_rows)
    if n_rows >= (1 << shift) or view.visit >= (1 << (63 - shift)):
        raise ValueError(f"visit {view.visit}: {n_rows} sources do not fit in sourceIds "
                         f"visit << {shift} | row")
    source_id = (np.int64(view.visit) << np.int64(shift)) + np.arange(n_rows, dtype=np.int64)
    new_pos = np.empty(n_rows, dtype=np.int64)
    new_pos[order] = np.arange(n_rows)
    parent_id = np.zeros(n_rows, dtype=np.int64)
    if len(parents):
        parent_rows = new_pos[n_obj + np.arange(len(parents))]
        parent_id[np.flatnonzero(parents.child)] = source_id[parent_rows[parents.slot]]
    data = {name: values[order] for name, values in columns.items()}
    data |= {"sourceId": source_id, "visit": np.full(n_rows, view.visit, dtype=np.int64),
             "detector": det[order].astype(np.int64),
             "ccdVisitId": (view.visit * 1000 + det[order]).astype(np.int64),
             "parentSourceId": parent_id[order], "detect_isPrimary": (kind != 1)[order]}
    arrays = []
    for fld in SOURCE_SCHEMA:
        if fld.name in ("band", "physical_filter"):
            value = view.band if fld.name == "band" else view.physical_filter
            arrays.append(pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n_rows, dtype=np.int32)), pa.array([value]))
                .dictionary_decode())
        else:
            arrays.append(pa.array(data[fld.name], type=fld.type))
    return pa.Table.from_arrays(arrays, schema=SOURCE_SCHEMA)


# ------------------------------------------------------------------------------------------
# Schema metadata of the files (as the Butler's ParquetFormatter / pandas write them)
# ------------------------------------------------------------------------------------------

#: How the parquet files are written: as an ``ArrowAstropy`` dataset (current pipelines) or a
#: pandas ``DataFrame`` dataset (older pipelines; ``sourceId`` is the index).
FileStyle = Literal["ArrowAstropy", "DataFrame"]
FILE_STYLES: tuple[str, ...] = ("ArrowAstropy", "DataFrame")

_ASTROPY_DATATYPE = {"int64": "int64", "int32": "int32", "double": "float64",
                     "float": "float32", "bool": "bool", "string": "string"}
_PANDAS_TYPE = {"int64": ("int64", "int64"), "int32": ("int32", "int32"),
                "double": ("float64", "float64"), "float": ("float32", "float32"),
                "bool": ("bool", "bool"), "string": ("unicode", "object")}


def _string_lengths(table: pa.Table) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for fld in table.schema:
        if pa.types.is_string(fld.type):
            longest = pc.max(pc.utf8_length(table.column(fld.name))).as_py() or 0
            out[f"lsst::arrow::len::{fld.name}".encode()] = str(longest).encode()
            out[f"table::len::{fld.name}".encode()] = str(longest).encode()
    return out


def with_table_metadata(table: pa.Table, style: FileStyle = "ArrowAstropy",
                        index: str | None = None) -> pa.Table:
    """``table`` with the schema metadata a Butler-written parquet file of ``style`` carries.

    ``ArrowAstropy``: ``lsst::arrow::rowcount``, ``lsst::arrow::len::<string column>`` and
    ``table_meta_yaml`` (astropy's column datatypes), as ``astropy_to_arrow`` writes them.
    ``DataFrame``: the ``pandas`` metadata of a DataFrame whose index is the column ``index``
    (moved last, as pyarrow stores an index), plus the row count and string lengths
    ``pandas_to_arrow`` adds.  No pandas or astropy table is built.
    """
    md: dict[bytes, bytes] = {b"lsst::arrow::rowcount": str(table.num_rows).encode()}
    md.update(_string_lengths(table))
    if style == "ArrowAstropy":
        lines = ["datatype:"]
        for fld in table.schema:
            datatype = _ASTROPY_DATATYPE.get(str(fld.type), str(fld.type))
            lines.append(f"- {{name: {fld.name}, datatype: {datatype}}}")
        md[b"table_meta_yaml"] = "\n".join(lines).encode()
    elif style == "DataFrame":
        if index is not None:
            names = [n for n in table.column_names if n != index] + [index]
            table = table.select(names)
        columns = []
        for fld in table.schema:
            pandas_type, numpy_type = _PANDAS_TYPE.get(str(fld.type), ("object", "object"))
            columns.append({"name": fld.name, "field_name": fld.name,
                            "pandas_type": pandas_type, "numpy_type": numpy_type,
                            "metadata": None})
        pandas = {
            "index_columns": [index] if index is not None else [],
            "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                                "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
            "columns": columns,
            "creator": {"library": "pyarrow", "version": "15.0.0"},
            "pandas_version": "2.2.0",
        }
        md[b"pandas"] = json.dumps(pandas).encode()
    else:
        raise ValueError(f"file style must be one of {FILE_STYLES}, got {style!r}")
    return table.replace_schema_metadata(md)


# ------------------------------------------------------------------------------------------
# Metadata tables
# ------------------------------------------------------------------------------------------

_MJD_UNIX_EPOCH = 40587.0


def _mjd_to_timestamp(mjd: np.ndarray) -> pa.Array:
    """Arrow timestamp[us] (TAI, no time zone) of MJDs."""
    us = np.round((mjd - _MJD_UNIX_EPOCH) * 86400.0e6).astype(np.int64)
    return pa.array(us.astype("datetime64[us]"), type=pa.timestamp("us"))


def visit_table(plan: VisitPlan) -> pa.Table:
    """DPDD ``Visit`` table: one row per visit."""
    obs_start = plan.mjd_mid - 0.5 * plan.exptime / 86400.0
    return pa.table({
        "visit": pa.array(plan.visit, type=pa.int64()),
        "physical_filter": pa.array(plan.physical_filter, type=pa.string()),
        "band": pa.array(plan.band, type=pa.string()),
        "ra": pa.array(plan.ra, type=pa.float64()),
        "dec": pa.array(plan.dec, type=pa.float64()),
        "skyRotation": pa.array(np.mod(plan.rotation, 360.0), type=pa.float64()),
        "azimuth": pa.array(plan.azimuth, type=pa.float64()),
        "altitude": pa.array(plan.altitude, type=pa.float64()),
        "zenithDistance": pa.array(90.0 - plan.altitude, type=pa.float64()),
        "airmass": pa.array(plan.airmass, type=pa.float64()),
        "expTime": pa.array(plan.exptime, type=pa.float64()),
        "expMidpt": _mjd_to_timestamp(plan.mjd_mid),
        "expMidptMJD": pa.array(plan.mjd_mid, type=pa.float64()),
        "obsStart": _mjd_to_timestamp(obs_start),
        "obsStartMJD": pa.array(obs_start, type=pa.float64()),
    })


def ccd_visit_table(plan: VisitPlan, camera: Camera, cond: DetectorConditions) -> pa.Table:
    """DPDD ``CcdVisit`` table: one row per (visit, detector)."""
    n_v, n_d = len(plan.visit), camera.n_detectors
    vi = np.repeat(np.arange(n_v), n_d)
    det = np.tile(np.arange(n_d, dtype=np.int64), n_v)
    centers = camera.detector_centers()[det]
    ra, dec = _detector_sky(plan, camera, centers[:, 0], centers[:, 1])
    corners = _detector_corners(plan, camera)
    exptime = plan.exptime[vi]
    zp_exposure = cond.zp_per_second.ravel() + 2.5 * np.log10(exptime)
    seeing = cond.seeing.ravel()
    sky = cond.sky.ravel()
    obs_start = plan.mjd_mid[vi] - 0.5 * exptime / 86400.0
    alt = plan.altitude[vi]
    return pa.table({
        "ccdVisitId": pa.array(plan.visit[vi] * 1000 + det, type=pa.int64()),
        "visitId": pa.array(plan.visit[vi], type=pa.int64()),
        "detector": pa.array(det, type=pa.int64()),
        "physical_filter": pa.array([plan.physical_filter[v] for v in vi], type=pa.string()),
        "band": pa.array([plan.band[v] for v in vi], type=pa.string()),
        "ra": pa.array(ra, type=pa.float64()),
        "dec": pa.array(dec, type=pa.float64()),
        "zenithDistance": pa.array(90.0 - alt, type=pa.float64()),
        "zeroPoint": pa.array(zp_exposure, type=pa.float64()),
        "psfSigma": pa.array(seeing / 2.3548 / PIXEL_SCALE_ARCSEC, type=pa.float64()),
        "seeing": pa.array(seeing, type=pa.float64()),
        "skyBg": pa.array(sky, type=pa.float64()),
        "skyNoise": pa.array(np.sqrt(sky), type=pa.float64()),
        "skyRotation": pa.array(np.mod(plan.rotation[vi], 360.0), type=pa.float64()),
        "expMidpt": _mjd_to_timestamp(plan.mjd_mid[vi]),
        "expMidptMJD": pa.array(plan.mjd_mid[vi], type=pa.float64()),
        "expTime": pa.array(exptime, type=pa.float64()),
        "obsStart": _mjd_to_timestamp(obs_start),
        "obsStartMJD": pa.array(obs_start, type=pa.float64()),
        "darkTime": pa.array(exptime + 1.0, type=pa.float64()),
        "xSize": pa.array(np.full(len(vi), camera.n_pixels), type=pa.int64()),
        "ySize": pa.array(np.full(len(vi), camera.n_pixels), type=pa.int64()),
        "pixelScale": pa.array(np.full(len(vi), PIXEL_SCALE_ARCSEC), type=pa.float64()),
        **{name: pa.array(values, type=pa.float64()) for name, values in corners.items()},
    })


def _detector_sky(plan: VisitPlan, camera: Camera, pl: np.ndarray,
                  ql: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RA/Dec [deg] of detector-linear points given per (visit, detector) row of the
    ccdVisitTable (``len(plan.visit) * camera.n_detectors`` points, visit-major)."""
    n_d = camera.n_detectors
    vi = np.repeat(np.arange(len(plan.visit)), n_d)
    p, q = camera.distort(pl, ql)
    c = np.cos(np.radians(plan.rotation[vi]))
    s = np.sin(np.radians(plan.rotation[vi]))
    xi, eta = -c * p - s * q, -s * p + c * q
    ra = np.empty(len(vi))
    dec = np.empty(len(vi))
    for v in range(len(plan.visit)):  # one tangent plane per visit
        sel = slice(v * n_d, (v + 1) * n_d)
        ra[sel], dec[sel] = inverse_gnomonic(xi[sel], eta[sel], float(plan.ra[v]),
                                             float(plan.dec[v]))
    return ra, dec


#: The DPDD ``CcdVisit`` corner columns, in the order of afw's ``Box2D.getCorners()`` (as
#: ``makeCcdVisitTable`` fills them from the visitSummary's ``raCorners``/``decCorners``), with
#: the pixel position of each corner on a detector of ``n`` pixels: the outer edges of the
#: corner pixels (``-0.5`` and ``n - 0.5``).
CORNER_COLUMNS: tuple[tuple[str, str, int, int], ...] = (
    ("llcra", "llcdec", 0, 0), ("ulcra", "ulcdec", 1, 0),
    ("urcra", "urcdec", 1, 1), ("lrcra", "lrcdec", 0, 1))


def _detector_corners(plan: VisitPlan, camera: Camera) -> dict[str, np.ndarray]:
    """The sky corners of every (visit, detector) row of the ccdVisitTable, by column."""
    n_rows = len(plan.visit) * camera.n_detectors
    det = np.tile(np.arange(camera.n_detectors, dtype=np.int64), len(plan.visit))
    edge = np.array([-0.5, camera.n_pixels - 0.5])
    out: dict[str, np.ndarray] = {}
    for ra_name, dec_name, ix, iy in CORNER_COLUMNS:
        pl, ql = camera.from_pixels(det, np.full(n_rows, edge[ix]), np.full(n_rows, edge[iy]))
        out[ra_name], out[dec_name] = _detector_sky(plan, camera, pl, ql)
    return out


def truth_table(sky: Sky, bands: Sequence[str]) -> pa.Table:
    """Every true object: id (row number), position, magnitudes, classification, group."""
    cols: dict[str, pa.Array] = {
        "object_id": pa.array(np.arange(len(sky), dtype=np.int64)),
        "ra": pa.array(sky.ra),
        "dec": pa.array(sky.dec),
        "is_star": pa.array(sky.is_star),
        "extendedness": pa.array(sky.extendedness),
        "size_arcsec": pa.array(sky.size_arcsec),
        "group": pa.array(sky.group),
        "group_min_sep": pa.array(np.where(np.isfinite(sky.group_min_sep), sky.group_min_sep,
                                           np.nan)),
    }
    for k, b in enumerate(bands):
        cols[f"mag_{b}"] = pa.array(sky.mags[:, k])
    return pa.table(cols)


# ------------------------------------------------------------------------------------------
# Reference catalog
# ------------------------------------------------------------------------------------------


def htm_index(ra: np.ndarray, dec: np.ndarray, depth: int = REFCAT_DEPTH) -> np.ndarray:
    """HTM trixel id at ``depth`` of each position (degrees), as ``lsst.sphgeom`` numbers it.

    Vectorised: the trixels overlapping a circle around the points come from
    ``HtmPixelization.envelope``; each trixel's triangle tests all remaining points at once.
    """
    import lsst.sphgeom as sphgeom

    n = len(ra)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return out
    pix = sphgeom.HtmPixelization(depth)
    xyz = unit_vectors(np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64))
    mean = xyz.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm > 0.5:
        centre = mean / norm
        radius = float(np.arccos(np.clip(xyz @ centre, -1.0, 1.0)).max()) + 1e-6
    if norm > 0.5 and radius < math.pi / 2:
        circle = sphgeom.Circle(sphgeom.UnitVector3d(*centre), sphgeom.Angle.fromRadians(radius))
        todo = np.arange(n)
        for begin, end in pix.envelope(circle):
            for trixel in range(begin, end):
                if len(todo) == 0:
                    break
                inside = np.asarray(pix.triangle(trixel).contains(
                    xyz[todo, 0], xyz[todo, 1], xyz[todo, 2]), dtype=bool)
                out[todo[inside]] = trixel
                todo = todo[~inside]
    for k in np.flatnonzero(out < 0):  # fallback (points on no envelope trixel / huge regions)
        out[k] = pix.index(sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(ra[k]),
                                                                          float(dec[k]))))
    return out


REFCAT_CONFIG_TEMPLATE = """import lsst.meas.algorithms.convertReferenceCatalog
assert type(config)==lsst.meas.algorithms.convertReferenceCatalog.DatasetConfig, \
'config is of type %s.%s instead of lsst.meas.algorithms.convertReferenceCatalog.DatasetConfig' \
% (type(config).__module__, type(config).__name__)
import lsst.meas.algorithms.indexerRegistry
# Version number of the persisted on-disk storage format.
# Version 0 had Jy as flux units (default 0 for unversioned catalogs).
# Version 1 had nJy as flux units.
# Version 2 had position-related covariances.
config.format_version=1

# Name of this reference catalog; this should match the name used during butler ingest.
config.ref_dataset_name='{name}'

# Depth of the HTM tree to make.  Default is depth=7 which gives ~ 0.3 sq. deg. per trixel.
config.indexer['HTM'].depth={depth}

config.indexer.name='HTM'
"""


def _refcat_hdu(ids: np.ndarray, ra: np.ndarray, dec: np.ndarray, flux: np.ndarray,
                flux_err: np.ndarray, bands: Sequence[str]) -> object:
    """One refcat FITS table HDU (afw-like column metadata, REFCAT_FORMAT_VERSION = 1)."""
    from astropy.io import fits

    columns = [
        fits.Column(name="id", format="K", array=ids),
        fits.Column(name="coord_ra", format="D", unit="rad", array=np.radians(ra)),
        fits.Column(name="coord_dec", format="D", unit="rad", array=np.radians(dec)),
    ]
    for k, b in enumerate(bands):
        columns.append(fits.Column(name=f"{b}_flux", format="D", unit="nJy", array=flux[:, k]))
        columns.append(fits.Column(name=f"{b}_fluxErr", format="D", unit="nJy",
                                   array=flux_err[:, k]))
    hdu = fits.BinTableHDU.from_columns(columns)
    hdu.header["HIERARCH REFCAT_FORMAT_VERSION"] = 1
    hdu.header["HIERARCH AFW_TABLE_VERSION"] = 3
    hdu.header["AFW_TYPE"] = ("SIMPLE", "Tells lsst::afw to load this as a Simple table.")
    return hdu


def write_reference_catalog(directory: Path, sky: Sky, bands: Sequence[str],
                            rng: np.random.Generator, mag_limit: float = 21.5,
                            completeness: float = 0.9) -> int:
    """Write the HTM-7 refcat of the brighter true stars; returns the number of stars."""
    from astropy.io import fits

    directory.mkdir(parents=True, exist_ok=True)
    ref_k = list(bands).index("r") if "r" in bands else 0
    sel = np.flatnonzero(sky.is_star & (sky.mags[:, ref_k] < mag_limit)
                         & (rng.random(len(sky)) < completeness))
    mags = sky.mags[sel]
    frac_err = 0.005 + 0.02 * 10.0 ** (0.4 * (mags - 21.0))
    flux = 10.0 ** (-0.4 * (mags - AB_ZERO_NJY))
    flux_noisy = flux * (1.0 + frac_err * rng.standard_normal(mags.shape))
    flux_err = flux * frac_err
    ids = sel.astype(np.int64)  # = truth object_id
    ra, dec = sky.ra[sel], sky.dec[sel]
    shard = htm_index(ra, dec, REFCAT_DEPTH)
    (directory / "config.py").write_text(
        REFCAT_CONFIG_TEMPLATE.format(name=REFCAT_NAME, depth=REFCAT_DEPTH))
    empty = np.zeros(0)
    schema = _refcat_hdu(np.zeros(0, dtype=np.int64), empty, empty,
                         np.zeros((0, len(bands))), np.zeros((0, len(bands))), bands)
    fits.HDUList([fits.PrimaryHDU(), schema]).writeto(directory / "master_schema.fits",
                                                      overwrite=True)
    order = np.argsort(shard, kind="stable")
    uniq, start = np.unique(shard[order], return_index=True)
    stops = np.append(start[1:], len(order))
    for trixel, a, b in zip(uniq, start, stops, strict=True):
        rows = order[a:b]
        hdu = _refcat_hdu(ids[rows], ra[rows], dec[rows], flux_noisy[rows], flux_err[rows], bands)
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(directory / f"{int(trixel)}.fits",
                                                       overwrite=True)
    return len(sel)


# ------------------------------------------------------------------------------------------
# The survey
# ------------------------------------------------------------------------------------------


def _expected_detected_fraction(bands: Sequence[str], crowded: bool) -> float:
    """Mean detection probability of a true object over the bands, in nominal conditions.

    Uses a fixed private sample of objects (seed 0), so it does not consume the survey's
    random stream.
    """
    rng = np.random.default_rng(0)
    sample = make_sky(rng, 20000, bands, 0.0, 0.0, 0.5, crowded)
    sigma_psf = 0.8 / 2.3548 / PIXEL_SCALE_ARCSEC
    sigma = np.sqrt(sigma_psf**2 + (sample.size_arcsec / PIXEL_SCALE_ARCSEC) ** 2)
    fractions = []
    for k, b in enumerate(bands):
        zp, sky_mag, _, _ = BAND_PROPERTIES.get(b, BAND_PROPERTIES["r"])
        sky = 30.0 * 10.0 ** (-0.4 * (sky_mag - 2.5 * math.log10(PIXEL_SCALE_ARCSEC**2) - zp))
        flux = 30.0 * 10.0 ** (-0.4 * (sample.mags[:, k] - zp))
        snr = flux / np.sqrt(flux + 4.0 * math.pi * sigma**2 * sky)
        fractions.append(float(np.mean(snr > 5.0)))
    return max(float(np.mean(fractions)), 0.05)


def _objects_for_density(sources_per_visit: int, n_junk: int, camera: Camera,
                         field_radius_deg: float, bands: Sequence[str], crowded: bool) -> int:
    """Number of primary true objects giving ~``sources_per_visit`` rows per visit."""
    cap_area = 2.0 * math.pi * (1.0 - math.cos(math.radians(field_radius_deg)))
    cap_area *= (180.0 / math.pi) ** 2
    fov_area = camera.fov_area_deg2
    detected_fraction = _expected_detected_fraction(bands, crowded)
    companions = STAR_FRACTION * ((0.25 + 2 * 0.05) if crowded else 0.02)
    per_visit = max(sources_per_visit - n_junk, 1)
    return max(int(round(per_visit * cap_area / fov_area / detected_fraction
                         / (1.0 + companions))), 1)


def simulate_survey(out_dir: str | Path, n_visits: int, seed: int,
                    sources_per_visit: int = 5000,
                    bands: Sequence[str] = ("g", "r", "i", "z"),
                    ra_center: float = 150.0, dec_center: float = 2.0,
                    field_radius_deg: float = 1.0, n_detectors: int | None = None,
                    crowded: bool = False, write_refcat: bool = True,
                    progress: bool = False,
                    file_style: FileStyle = "ArrowAstropy",
                    survey_radius_deg: float | None = None, border_nside: int | None = None,
                    camera: CameraLayout = "grid", first_visit: int = 0) -> SimulatedSurvey:
    """Simulate a survey and write it in the Rubin formats (see the module docstring).

    Args:
        out_dir: directory to write into (created).
        n_visits: number of visits written.
        seed: random seed; identical arguments give byte-identical parquet files.
        sources_per_visit: approximate rows per ``sourceTable_visit`` file (the density of
            the true objects is set so that a visit inside the footprint gets about as many).
        bands: band names (u g r i z y have realistic properties; others behave like r).
        ra_center, dec_center: field centre [deg]; any RA (wrapped to [0, 360)), any Dec.
        field_radius_deg: the camera's field [deg]: the focal plane and its 0.1-0.3 deg
            dithers fit in it; without ``survey_radius_deg`` also the cap of true objects.
        n_detectors: CCDs of the camera: default 9 (``camera="grid"``: a near-square grid of
            4k x 4k 0.2" CCDs, shrunk to fit small fields) or 189 (``camera="lsstcam"``).
        crowded: add many close star pairs (0.3-3"), chains of three and hence deblends.
        write_refcat: write the HTM-7 reference catalog to ``out_dir/refcat``.
        progress: show a tqdm progress bar over visits.
        file_style: ``"ArrowAstropy"`` or ``"DataFrame"`` source tables
            (:func:`with_table_metadata`); same rows and values either way.
        survey_radius_deg: a wide survey: the true objects fill the cap of this radius
            (>= ``field_radius_deg``) and the visits point at the tiles of
            :class:`SurveyTiling` (spacing: the square root of the camera's area), dithered
            by up to half a tile.  None: every visit dithers around the field centre.
        border_nside: also place stars exactly on the boundaries (corners and points along
            the edges) of the HEALPix nest pixels at this nside inside the footprint
            (:func:`border_star_positions`, :func:`with_border_stars`).
        camera: ``"grid"`` or ``"lsstcam"`` (:func:`make_camera`).
        first_visit: write visits ``first_visit .. first_visit + n_visits - 1`` of the survey
            of ``first_visit + n_visits`` visits with the same arguments: the same sky and
            byte-identical files for those visits, visit ids after those of the first
            ``first_visit`` visits.

    Returns:
        A :class:`SimulatedSurvey` describing the files written.

    Raises:
        ValueError: an argument out of range (named in the message).
    """
    if file_style not in FILE_STYLES:
        raise ValueError(f"file_style must be one of {FILE_STYLES}, got {file_style!r}")
    out, ra_center, bands = _survey_arguments(out_dir, n_visits, bands, sources_per_visit,
                                              ra_center)
    _check_footprint_arguments(field_radius_deg, survey_radius_deg, first_visit)
    seeds = np.random.SeedSequence(seed).spawn(first_visit + n_visits + 3)
    design = _design_survey(seeds[:3], first_visit + n_visits, sources_per_visit, bands,
                            (ra_center, dec_center, field_radius_deg, survey_radius_deg),
                            n_detectors, camera, crowded, border_nside)
    plan, cond = design.plan.take(first_visit), design.conditions.take(first_visit)
    sky, cam = design.sky, design.camera
    paths, counts = _write_source_tables(out, sky, cam, plan, cond, seeds[3 + first_visit:],
                                         design.n_junk, progress, file_style)
    visit_path, ccd_path, truth_path = _write_tables(out, sky, bands, cam, plan, cond)
    refcat_path = out / "refcat" if write_refcat else None
    n_ref = (write_reference_catalog(out / "refcat", sky, bands, np.random.default_rng(seeds[2]))
             if write_refcat else 0)
    return SimulatedSurvey(out_dir=out, visits=[int(v) for v in plan.visit], bands=list(plan.band),
                           physical_filters=list(plan.physical_filter), source_paths=paths,
                           visit_table_path=visit_path, ccd_visit_table_path=ccd_path,
                           refcat_path=refcat_path, truth_path=truth_path,
                           n_sources=int(sum(counts)), n_sources_per_visit=counts,
                           n_objects=len(sky), n_refcat=n_ref, seed=seed,
                           n_border_stars=design.n_border_stars, n_tiles=design.n_tiles,
                           footprint_radius_deg=design.footprint_radius_deg)


@dataclass(frozen=True)
class _SurveyDesign:
    """What every visit of a survey shares: the camera, the sky, the plan of all visits."""

    camera: Camera
    sky: Sky
    plan: VisitPlan
    conditions: DetectorConditions
    n_junk: int
    n_border_stars: int
    n_tiles: int
    footprint_radius_deg: float


def _design_survey(seeds: Sequence[np.random.SeedSequence], n_visits: int,
                   sources_per_visit: int, bands: Sequence[str],
                   field: tuple[float, float, float, float | None], n_detectors: int | None,
                   layout: CameraLayout, crowded: bool, border_nside: int | None
                   ) -> _SurveyDesign:
    """The camera, the true sky and the plan of ``n_visits`` visits of a survey of ``field``
    = (ra_center, dec_center, field_radius_deg, survey_radius_deg or None); the sky draws
    from ``seeds[0]``, the plan from ``seeds[1]``."""
    ra_center, dec_center, field_radius_deg, survey_radius_deg = field
    rng_sky, rng_plan = (np.random.default_rng(s) for s in seeds[:2])
    max_dither = 0.3 * min(1.0, field_radius_deg)
    camera = make_camera(n_detectors, field_radius_deg, max_dither, layout)
    radius = field_radius_deg if survey_radius_deg is None else survey_radius_deg
    n_junk = int(round(JUNK_FRACTION * sources_per_visit))
    n_primary = _objects_for_density(sources_per_visit, n_junk, camera, radius, bands, crowded)
    sky = make_sky(rng_sky, n_primary, bands, ra_center, dec_center, radius, crowded)
    n_border = 0
    if border_nside is not None:
        border = border_star_positions(border_nside, ra_center, dec_center, radius)
        sky, n_border = with_border_stars(sky, border, rng_sky, bands), len(border)
    tiling = None
    if survey_radius_deg is not None:
        tiling = SurveyTiling.of_cap(ra_center, dec_center, survey_radius_deg,
                                     math.sqrt(camera.fov_area_deg2))
        max_dither = 0.5 * tiling.spacing_deg
    plan = make_visit_plan(rng_plan, n_visits, bands, ra_center, dec_center, max_dither, tiling)
    return _SurveyDesign(camera=camera, sky=sky, plan=plan,
                         conditions=make_detector_conditions(rng_plan, plan, camera),
                         n_junk=n_junk, n_border_stars=n_border,
                         n_tiles=1 if tiling is None else len(tiling),
                         footprint_radius_deg=radius)


def _survey_arguments(out_dir: str | Path, n_visits: int, bands: Sequence[str],
                      sources_per_visit: int, ra_center: float) -> tuple[Path, float, list[str]]:
    """The output directory (created), the RA wrapped to [0, 360) and the band names, after
    the arguments are checked."""
    if n_visits < 1:
        raise ValueError(f"n_visits must be >= 1, got {n_visits}")
    if not bands:
        raise ValueError("bands must not be empty")
    if sources_per_visit < 1:
        raise ValueError(f"sources_per_visit must be >= 1, got {sources_per_visit}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, float(np.mod(ra_center, 360.0)), [str(b) for b in bands]


def _check_footprint_arguments(field_radius_deg: float, survey_radius_deg: float | None,
                               first_visit: int) -> None:
    """Refuse a non-positive field, a survey cap smaller than the field or larger than the
    sphere, and a negative first visit."""
    if not field_radius_deg > 0:
        raise ValueError(f"field_radius_deg must be > 0, got {field_radius_deg}")
    if survey_radius_deg is not None and not field_radius_deg <= survey_radius_deg <= 180.0:
        raise ValueError(f"survey_radius_deg must be within [field_radius_deg, 180] = "
                         f"[{field_radius_deg}, 180], got {survey_radius_deg}")
    if first_visit < 0:
        raise ValueError(f"first_visit must be >= 0, got {first_visit}")


def _write_tables(out: Path, sky: Sky, bands: Sequence[str], camera: Camera, plan: VisitPlan,
                  cond: DetectorConditions) -> tuple[Path, Path, Path]:
    """Write ``visitTable.parquet``, ``ccdVisitTable.parquet`` and ``truth.parquet``."""
    paths = (out / "visitTable.parquet", out / "ccdVisitTable.parquet", out / "truth.parquet")
    pq.write_table(with_table_metadata(visit_table(plan)), paths[0])
    pq.write_table(with_table_metadata(ccd_visit_table(plan, camera, cond)), paths[1])
    pq.write_table(truth_table(sky, bands), paths[2])
    return paths


def _write_source_tables(out: Path, sky: Sky, camera: Camera, plan: VisitPlan,
                         cond: DetectorConditions, seeds: Sequence[np.random.SeedSequence],
                         n_junk: int, progress: bool, file_style: FileStyle
                         ) -> tuple[list[Path], list[int]]:
    """Write the ``sourceTable_visit`` file of every visit of the plan (visit ``i`` draws from
    ``seeds[i]``; ``file_style``: see :func:`with_table_metadata`); return their paths and row
    counts."""
    from tqdm import tqdm

    paths: list[Path] = []
    counts: list[int] = []
    for i in tqdm(range(len(plan.visit)), desc="simulating visits", unit="visit",
                  disable=not progress):
        rng = np.random.default_rng(seeds[i])
        table = with_table_metadata(simulate_visit(sky, camera, plan, cond, i, rng, n_junk),
                                    file_style, index="sourceId")
        path = out / f"sourceTable_visit_{int(plan.visit[i])}.parquet"
        pq.write_table(table, path, compression="snappy")
        paths.append(path)
        counts.append(table.num_rows)
    return paths, counts
