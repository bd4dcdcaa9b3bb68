"""Reader of the LSST on-disk HTM-indexed reference catalog format.

A reference catalog directory holds

* ``config.py`` -- a pex_config dump with ``config.format_version``, ``config.ref_dataset_name``
  and ``config.indexer['HTM'].depth`` (default depth 7, default version 0).  It is **parsed**
  with :mod:`ast`, never executed;
* ``master_schema.fits`` -- a zero-row afw table giving the column list;
* one afw FITS table per non-empty HTM trixel, named ``<htmId>.fits``.  A trixel without a file
  is simply empty.

Columns: ``id``, ``coord_ra``/``coord_dec`` (radians), ``<f>_flux``/``<f>_fluxErr`` (nJy for
format version >= 1), often a packed bit column ``flags`` whose bit names are the ``TFLAG<k>``
header cards.  The ``REFCAT_FORMAT_VERSION`` FITS header card wins over ``config.py`` when they
disagree.  Format version 0 (fluxes in Jy) is refused.

Any flag bit name (``TFLAG<k>``) can be requested from :meth:`HtmRefcat.load` like a column; it
is returned as a boolean array decoded from ``flags``.
"""

from __future__ import annotations

import ast
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import healpy as hp
import numpy as np
from astropy.io import fits
from lsst import sphgeom
from scipy.spatial import cKDTree

from ..config import ReferenceSelectorConfig
from ..errors import RefcatError

__all__ = [
    "AB_ZEROPOINT_NJY",
    "DEFAULT_HTM_DEPTH",
    "HtmRefcat",
    "ab_mag_err_from_flux_err",
    "ab_mag_from_flux",
    "parse_refcat_config",
]

#: AB magnitude of a 1 nJy source: m = -2.5 log10(flux / nJy) + 31.4.
AB_ZEROPOINT_NJY = 31.4
#: ``config.indexer['HTM'].depth`` when config.py does not set it.
DEFAULT_HTM_DEPTH = 7
_REQUIRED_COLUMNS = ("id", "coord_ra", "coord_dec")
_VERSION_KEY = "REFCAT_FORMAT_VERSION"


def ab_mag_from_flux(flux_njy: np.ndarray) -> np.ndarray:
    """AB magnitude of nJy fluxes; NaN where the flux is not finite and positive."""
    flux = np.asarray(flux_njy, dtype=np.float64)
    out = np.full(flux.shape, np.nan)
    good = np.isfinite(flux) & (flux > 0)
    out[good] = -2.5 * np.log10(flux[good]) + AB_ZEROPOINT_NJY
    return out


def ab_mag_err_from_flux_err(flux_err_njy: np.ndarray, flux_njy: np.ndarray) -> np.ndarray:
    """AB magnitude error ``2.5/ln(10) * fluxErr / flux``; NaN where the flux is not > 0."""
    flux = np.asarray(flux_njy, dtype=np.float64)
    err = np.asarray(flux_err_njy, dtype=np.float64)
    out = np.full(np.broadcast(flux, err).shape, np.nan)
    good = np.isfinite(flux) & (flux > 0) & np.isfinite(err)
    out[good] = (2.5 / math.log(10.0)) * err[good] / flux[good]
    return out


def parse_refcat_config(text: str, source: str = "config.py") -> dict[str, Any]:
    """Read the settings of a refcat ``config.py`` without executing it.

    Returns a dict with ``format_version`` (int or ``None`` when absent), ``ref_dataset_name``
    (str or ``None``), ``depth`` (int or ``None``) and ``indexer_name`` (str or ``None``).

    Raises:
        RefcatError: the file is not valid Python (also: too deeply nested, too large, NUL
            bytes) or a value is not a literal of the right type.
    """
    try:
        tree = ast.parse(text, filename=source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        reason = str(exc) or "too deeply nested or too large"
        raise RefcatError(f"{source} is not a valid refcat config.py: "
                          f"{_short(f'{type(exc).__name__}: {reason}')}") from exc
    wanted = {
        "config.format_version": "format_version",
        "config.ref_dataset_name": "ref_dataset_name",
        "config.indexer['HTM'].depth": "depth",
        'config.indexer["HTM"].depth': "depth",
        "config.indexer.name": "indexer_name",
    }
    out: dict[str, Any] = dict.fromkeys(
        ("format_version", "ref_dataset_name", "depth", "indexer_name")
    )
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            key = wanted.get(_unparse(target).replace(" ", ""))
            if key is None:
                continue
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
                raise RefcatError(
                    f"{source}: {ast.unparse(target)} is not a literal value "
                    f"({_short(_unparse(node.value))})"
                ) from exc
            expected: type = int if key in ("format_version", "depth") else str
            if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
                raise RefcatError(
                    f"{source}: {ast.unparse(target)} must be {expected.__name__}, got "
                    f"{_short(_unparse(node.value))}"
                )
            out[key] = value
    return out


def _short(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters for an error message."""
    return text if len(text) <= limit else text[:limit] + " ..."


def _unparse(node: ast.AST) -> str:
    """Source text of ``node`` for an error message (a placeholder if it is too deep)."""
    try:
        return ast.unparse(node)
    except (RecursionError, MemoryError, ValueError):
        return "<an expression too deep to show>"


def read_refcat_config(path: Path) -> dict[str, Any]:
    """:func:`parse_refcat_config` of the file ``path``.

    Raises:
        RefcatError: unreadable, not UTF-8 text, or not a valid refcat ``config.py``.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RefcatError(f"cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise RefcatError(f"{path} is not a valid refcat config.py: not UTF-8 text "
                          f"({exc.reason} at byte {exc.start})") from exc
    return parse_refcat_config(text, str(path))


def _native(array: np.ndarray) -> np.ndarray:
    """A native-byte-order, contiguous copy of a (big-endian FITS) column."""
    arr = np.asarray(array)
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _radec_to_lonlat(ra_deg: float, dec_deg: float) -> sphgeom.UnitVector3d:
    return sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(ra_deg), float(dec_deg)))


class HtmRefcat:
    """An LSST HTM-indexed reference catalog directory, read lazily shard by shard.

    Args:
        path: the refcat directory (holding ``config.py``, ``master_schema.fits``, shards).
        cache_shards: how many decoded shards to keep in memory (least recently used evicted).

    Raises:
        RefcatError: missing directory/config.py/master_schema.fits, unreadable files,
            a non-HTM indexer, or format version 0 (fluxes in Jy).
    """

    def __init__(self, path: str | os.PathLike[str], cache_shards: int = 64) -> None:
        self.path = Path(path)
        if cache_shards < 0:
            raise ValueError(f"cache_shards must be >= 0, got {cache_shards}")
        self.cache_shards = int(cache_shards)
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._check_files()
        cfg = read_refcat_config(self.path / "config.py")
        if cfg["indexer_name"] not in (None, "HTM"):
            raise RefcatError(
                f"reference catalog {self.path} uses indexer {cfg['indexer_name']!r}; "
                "only HTM-indexed reference catalogs are supported"
            )
        self.dataset_name: str = cfg["ref_dataset_name"] or self.path.name
        self.depth: int = DEFAULT_HTM_DEPTH if cfg["depth"] is None else int(cfg["depth"])
        if not 0 <= self.depth <= sphgeom.HtmPixelization.MAX_LEVEL:
            raise RefcatError(f"{self.path}/config.py: invalid HTM depth {self.depth}")
        self.config_format_version: int = (
            0 if cfg["format_version"] is None else int(cfg["format_version"])
        )
        self.columns: tuple[str, ...]
        self.flag_names: tuple[str, ...]
        header = self._read_master_schema()
        self.header_format_version: int | None = self._header_version(header)
        if self.header_format_version is None:
            shard = self._first_shard_path()
            if shard is not None:
                self.header_format_version = self._header_version(self._read_header(shard))
        self.format_version: int = (
            self.config_format_version
            if self.header_format_version is None
            else self.header_format_version
        )
        self._refuse_version(self.format_version, self.path)
        self.pixelization = sphgeom.HtmPixelization(self.depth)

    # --- start-up checks -----------------------------------------------------------------
    def _check_files(self) -> None:
        if not self.path.exists():
            raise RefcatError(
                f"reference catalog directory {self.path} does not exist; set "
                "fgcmLoadReferenceCatalog.path to an LSST HTM-indexed refcat directory"
            )
        if not self.path.is_dir():
            raise RefcatError(f"reference catalog path {self.path} is not a directory")
        for name in ("config.py", "master_schema.fits"):
            if not (self.path / name).is_file():
                raise RefcatError(
                    f"reference catalog {self.path} has no {name}; it is not an LSST "
                    "HTM-indexed reference catalog directory"
                )

    @staticmethod
    def _refuse_version(version: int, where: Path) -> None:
        if version < 1:
            raise RefcatError(
                f"reference catalog {where} has format version {version}: its fluxes are in Jy "
                "(LSST refcat format 0), which is no longer supported; convert it to nJy "
                "(format version >= 1) with LSST's convert_refcat_to_nJy.py or re-ingest it"
            )

    @staticmethod
    def _header_version(header: fits.Header) -> int | None:
        value = header.get(_VERSION_KEY)
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise RefcatError(f"invalid {_VERSION_KEY} header value {value!r}") from exc

    @staticmethod
    def _read_header(path: Path) -> fits.Header:
        try:
            with fits.open(path, memmap=False) as hdul:
                if len(hdul) < 2:
                    raise RefcatError(f"{path} has no binary table extension")
                return hdul[1].header.copy()
        except OSError as exc:
            raise RefcatError(f"cannot read reference catalog file {path}: {exc}") from exc

    def _read_master_schema(self) -> fits.Header:
        path = self.path / "master_schema.fits"
        header = self._read_header(path)
        self.columns = tuple(
            str(header[f"TTYPE{k}"]) for k in range(1, int(header.get("TFIELDS", 0)) + 1)
        )
        self.flag_names = self._flag_names(header)
        return header

    @staticmethod
    def _flag_names(header: fits.Header) -> tuple[str, ...]:
        names = []
        k = 1
        while f"TFLAG{k}" in header:
            names.append(str(header[f"TFLAG{k}"]))
            k += 1
        return tuple(names)

    def _first_shard_path(self) -> Path | None:
        shards = self.existing_shards()
        return self.shard_path(shards[0]) if shards else None

    # --- shard geometry ------------------------------------------------------------------
    def shard_path(self, shard_id: int) -> Path:
        """The file of trixel ``shard_id`` (which may not exist: an empty trixel)."""
        return self.path / f"{int(shard_id)}.fits"

    def existing_shards(self) -> list[int]:
        """Sorted ids of the shard files present in the directory."""
        ids = []
        for entry in os.scandir(self.path):
            stem, ext = os.path.splitext(entry.name)
            if ext == ".fits" and stem.isdigit():
                ids.append(int(stem))
        return sorted(ids)

    def _ids_from_ranges(self, ranges: sphgeom.RangeSet) -> list[int]:
        out: list[int] = []
        for begin, end in ranges:
            out.extend(range(int(begin), int(end)))
        return out

    def shards_for_region(self, region: sphgeom.Region) -> list[int]:
        """Sorted HTM ids (at this catalog's depth) of the trixels that may overlap ``region``."""
        return self._ids_from_ranges(self.pixelization.envelope(region))

    def shards_for_circle(self, ra_deg: float, dec_deg: float, radius_deg: float) -> list[int]:
        """Sorted HTM ids of the trixels that may overlap a circle (degrees)."""
        return self.shards_for_region(self.circle(ra_deg, dec_deg, radius_deg))

    def shards_for_polygon(self, ra_deg: Sequence[float], dec_deg: Sequence[float]) -> list[int]:
        """Sorted HTM ids of the trixels overlapping the convex hull of the given vertices."""
        return self.shards_for_region(self.polygon(ra_deg, dec_deg))

    def shards_for_healpix(
        self, pixels: Iterable[int], nside: int, margin_arcsec: float = 0.0
    ) -> list[int]:
        """Sorted HTM ids of the trixels overlapping HEALPix (nest) pixels grown by a margin."""
        ranges = sphgeom.RangeSet()
        for circle in self.healpix_circles(pixels, nside, margin_arcsec):
            ranges = ranges | self.pixelization.envelope(circle)
        return self._ids_from_ranges(ranges)

    @staticmethod
    def circle(ra_deg: float, dec_deg: float, radius_deg: float) -> sphgeom.Circle:
        """A sphgeom circle from a centre and a radius in degrees."""
        if not radius_deg >= 0:
            raise ValueError(f"radius must be >= 0 degrees, got {radius_deg}")
        return sphgeom.Circle(
            _radec_to_lonlat(ra_deg, dec_deg), sphgeom.Angle.fromDegrees(radius_deg)
        )

    @staticmethod
    def polygon(ra_deg: Sequence[float], dec_deg: Sequence[float]) -> sphgeom.ConvexPolygon:
        """The convex hull (sphgeom) of vertices given in degrees."""
        ras = np.atleast_1d(np.asarray(ra_deg, dtype=np.float64))
        decs = np.atleast_1d(np.asarray(dec_deg, dtype=np.float64))
        if ras.shape != decs.shape or ras.size < 3:
            raise ValueError("a polygon needs at least 3 (ra, dec) vertices of equal count")
        points = [_radec_to_lonlat(r, d) for r, d in zip(ras, decs, strict=True)]
        hull = sphgeom.ConvexPolygon.convexHull(points)
        if hull is None:
            raise ValueError("the polygon vertices do not define a convex polygon")
        return hull

    @staticmethod
    def healpix_circles(
        pixels: Iterable[int], nside: int, margin_arcsec: float = 0.0
    ) -> list[sphgeom.Circle]:
        """One circle per HEALPix nest pixel covering it, grown by ``margin_arcsec``.

        The radius is the largest angle from the pixel centre to 8 samples per pixel edge,
        enlarged by 1 % (HEALPix edges are not great circles) plus the margin.
        """
        pix = np.unique(np.asarray(list(pixels), dtype=np.int64))
        if pix.size == 0:
            return []
        if margin_arcsec < 0:
            raise ValueError(f"margin must be >= 0 arcsec, got {margin_arcsec}")
        centres = np.asarray(hp.pix2vec(nside, pix, nest=True)).T.reshape(-1, 3)
        bounds = np.asarray(hp.boundaries(nside, pix, step=8, nest=True)).reshape(pix.size, 3, -1)
        cosang = np.einsum("pk,pkj->pj", centres, bounds)
        radius = np.arccos(np.clip(cosang.min(axis=1), -1.0, 1.0)) * 1.01
        radius = radius + math.radians(margin_arcsec / 3600.0)
        return [
            sphgeom.Circle(
                sphgeom.UnitVector3d(float(c[0]), float(c[1]), float(c[2])),
                sphgeom.Angle(float(r)),
            )
            for c, r in zip(centres, radius, strict=True)
        ]

    # --- reading ---------------------------------------------------------------------------
    def _decode(self, shard_id: int, path: Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            with fits.open(path, memmap=True) as hdul:
                if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
                    raise RefcatError(f"reference shard {path} has no binary table extension")
                hdu = hdul[1]
                version = self._header_version(hdu.header)
                if version is not None:
                    self._refuse_version(version, path)
                names = set(hdu.columns.names)
                flag_names = self._flag_names(hdu.header)
                out: dict[str, np.ndarray] = {}
                data = hdu.data
                nrow = int(hdu.header.get("NAXIS2", 0))
                for col in columns:
                    if col == "flags" and col in names:
                        out[col] = (
                            np.asarray(data[col], dtype=bool).reshape(nrow, -1).copy()
                            if nrow
                            else self._empty(col)
                        )
                    elif col in names:
                        out[col] = _native(data[col]) if nrow else self._empty(col)
                    elif col in flag_names and "flags" in names:
                        bit = flag_names.index(col)
                        out[col] = (
                            np.asarray(data["flags"], dtype=bool).reshape(nrow, -1)[:, bit].copy()
                            if nrow
                            else np.zeros(0, dtype=bool)
                        )
                    else:
                        raise RefcatError(
                            f"reference shard {path} (trixel {shard_id}) has no column {col!r}; "
                            f"its columns are {sorted(names)}"
                        )
                return out
        except OSError as exc:
            raise RefcatError(f"cannot read reference shard {path}: {exc}") from exc

    def _empty(self, col: str) -> np.ndarray:
        if col == "flags":
            return np.zeros((0, len(self.flag_names)), dtype=bool)
        if col in ("id", "parent"):
            return np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.float64)

    def _check_columns(self, columns: Sequence[str], needed_by: str = "") -> None:
        known = set(self.columns) | set(self.flag_names)
        missing = [c for c in columns if c not in known]
        if missing:
            raise RefcatError(
                f"reference catalog {self.path}: master_schema.fits has no column(s) {missing}"
                f"{needed_by}; its columns are {list(self.columns)} and flag bits "
                f"{list(self.flag_names)}"
            )

    def load_shard(self, shard_id: int, columns: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The requested columns of one shard, or ``None`` when the trixel has no file.

        Decoded columns are kept in a bounded LRU cache (``cache_shards`` shards).
        """
        sid = int(shard_id)
        cols = list(dict.fromkeys(columns))
        cached = self._cache.get(sid)
        if cached is not None:
            self._cache.move_to_end(sid)
            todo = [c for c in cols if c not in cached]
        else:
            path = self.shard_path(sid)
            if not path.is_file():
                return None
            cached = {}
            todo = cols
        if todo:
            cached.update(self._decode(sid, self.shard_path(sid), todo))
            if self.cache_shards > 0:
                self._cache[sid] = cached
                self._cache.move_to_end(sid)
                while len(self._cache) > self.cache_shards:
                    self._cache.popitem(last=False)
        return {c: cached[c] for c in cols}

    def load(self, shard_ids: Iterable[int], columns: Sequence[str]) -> dict[str, np.ndarray]:
        """Concatenate ``columns`` of the given shards (missing shard files = empty trixels).

        Flag bit names are accepted as columns (boolean).  ``coord_ra``/``coord_dec`` are
        returned as stored (radians), fluxes in nJy.

        Raises:
            RefcatError: a column absent from the master schema or from a shard file.
        """
        cols = list(dict.fromkeys(columns))
        self._check_columns(cols)
        parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}
        for sid in sorted({int(s) for s in shard_ids}):
            got = self.load_shard(sid, cols)
            if got is None:
                continue
            for c in cols:
                parts[c].append(got[c])
        return {c: np.concatenate(parts[c]) if parts[c] else self._empty(c) for c in cols}

    def load_region(
        self, region: sphgeom.Region, columns: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Objects inside a sphgeom region: ``id``, ``ra``/``dec`` (degrees) + ``columns``."""
        cols = list(dict.fromkeys(["id", "coord_ra", "coord_dec", *columns]))
        data = self.load(self.shards_for_region(region), cols)
        inside = np.asarray(region.contains(data["coord_ra"], data["coord_dec"]), dtype=bool)
        return self._finish(data, inside)

    def load_circle(
        self, ra_deg: float, dec_deg: float, radius_deg: float, columns: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Objects within ``radius_deg`` of (ra, dec): ``id``, ``ra``/``dec`` [deg] + columns."""
        return self.load_region(self.circle(ra_deg, dec_deg, radius_deg), columns)

    def load_healpix(
        self,
        pixels: Iterable[int],
        nside: int,
        margin_arcsec: float = 0.0,
        columns: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Objects in HEALPix nest pixels grown by a margin: ``id``, ``ra``/``dec`` + columns.

        An object is kept when its own pixel is one of ``pixels`` or (``margin_arcsec > 0``)
        when it lies within the margin of a pixel edge.  The edge distance is measured to edge
        samples spaced by at most margin/2, so objects up to ~3 % beyond the margin can be kept.
        """
        pix = np.unique(np.asarray(list(pixels), dtype=np.int64))
        cols = list(dict.fromkeys(["id", "coord_ra", "coord_dec", *columns]))
        data = self.load(self.shards_for_healpix(pix, nside, margin_arcsec), cols)
        ra, dec = data["coord_ra"], data["coord_dec"]
        inside = np.isin(hp.ang2pix(nside, np.pi / 2 - dec, ra, nest=True), pix)
        if margin_arcsec > 0 and pix.size and (~inside).any():
            margin = math.radians(margin_arcsec / 3600.0)
            step = int(np.clip(math.ceil(2.0 * hp.nside2resol(nside) / margin), 1, 2000))
            edges = np.asarray(hp.boundaries(nside, pix, step=step, nest=True))
            edges = np.moveaxis(edges.reshape(pix.size, 3, -1), 1, 2).reshape(-1, 3)
            out = np.flatnonzero(~inside)
            xyz = np.column_stack(
                (
                    np.cos(dec[out]) * np.cos(ra[out]),
                    np.cos(dec[out]) * np.sin(ra[out]),
                    np.sin(dec[out]),
                )
            )
            spacing = 1.01 * hp.nside2resol(nside) / step
            tol = math.hypot(margin, spacing / 2.0)
            dist, _ = cKDTree(edges).query(xyz, k=1, distance_upper_bound=2 * math.sin(tol / 2))
            inside[out[np.isfinite(dist)]] = True
        return self._finish(data, inside)

    @staticmethod
    def _finish(data: dict[str, np.ndarray], inside: np.ndarray) -> dict[str, np.ndarray]:
        out = {k: v[inside] for k, v in data.items()}
        out["ra"] = np.degrees(out["coord_ra"]) % 360.0
        out["dec"] = np.degrees(out["coord_dec"])
        return out

    def clear_cache(self) -> None:
        """Forget every decoded shard."""
        self._cache.clear()

    # --- validation ------------------------------------------------------------------------
    def validate(
        self,
        filter_names: Sequence[str],
        selector: ReferenceSelectorConfig | None = None,
        extra_columns: Sequence[str] = (),
    ) -> None:
        """Start-up check that the catalog can serve ``filter_names`` and the selector.

        Checks that the directory, ``config.py`` and ``master_schema.fits`` exist, and that
        ``id``, ``coord_ra``, ``coord_dec``, ``<f>_flux``/``<f>_fluxErr`` for each refcat filter,
        the selector's S/N flux columns and flag names are in the master schema **and** in one
        shard file.

        Raises:
            RefcatError: naming the missing directory, file or column.
        """
        self._check_files()
        required = list(_REQUIRED_COLUMNS)
        for f in filter_names:
            required += [f"{f}_flux", f"{f}_fluxErr"]
        if selector is not None:
            if selector.doSignalToNoise:
                required += [selector.signalToNoise.fluxField, selector.signalToNoise.errField]
            if selector.doFlags:
                required += [*selector.flags.good, *selector.flags.bad]
        required += list(extra_columns)
        required = list(dict.fromkeys(required))
        self._check_columns(required, " (needed by fgcmLoadReferenceCatalog filterMap/"
                                      "referenceSelector)")
        shards = self.existing_shards()
        if not shards:
            raise RefcatError(f"reference catalog {self.path} has no shard files (<htmId>.fits)")
        path = self.shard_path(shards[0])
        header = self._read_header(path)
        names = {str(header[f"TTYPE{k}"]) for k in range(1, int(header.get("TFIELDS", 0)) + 1)}
        flags = set(self._flag_names(header)) if "flags" in names else set()
        missing = [c for c in required if c not in names and c not in flags]
        if missing:
            raise RefcatError(
                f"reference shard {path} has no column(s) {missing}; its columns are "
                f"{sorted(names)} -- the shard does not match master_schema.fits"
            )
        version = self._header_version(header)
        if version is not None:
            self._refuse_version(version, path)

    def __repr__(self) -> str:
        return (
            f"HtmRefcat({str(self.path)!r}, name={self.dataset_name!r}, depth={self.depth}, "
            f"format_version={self.format_version})"
        )
