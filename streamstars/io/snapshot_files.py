"""Writers (and a reader) of the fgcm input catalogs: one *snapshot* directory.

A snapshot is what ``FgcmBuildStarsTableTask`` would have written for the visits applied so far,
in two flavours:

Legacy FITS (the schemas of fgcmcal's ``FgcmBuildStarsTableTask``)
    ``fgcmVisitCatalog.fits``, ``fgcmStarObservations.fits`` (ra/dec in **radians**),
    ``fgcmStarIds.fits`` (``fgcm_id`` is **int64**: streamstars' ids are stable 64-bit source
    ids; header keyword ``FGCMIDTY = 'int64'`` says so), ``fgcmStarIndices.fits`` and, when a
    reference catalog was matched, ``fgcmReferenceStars.fits`` (headers ``FILTERNAMES``,
    ``REFSTARS_FORMAT_VERSION = 1``).

Production parquet
    ``fgcm_star_observations.parquet``, ``fgcm_star_ids.parquet``, ``fgcmVisitCatalog.parquet``
    and ``fgcm_reference_stars.parquet`` (schema metadata ``FILTERNAMES``).

Provenance (``SnapshotCatalogs.metadata``, a ``dict[str, str]``; ``created`` and
``streamstars_version`` are added when absent) is stored as a sorted-key JSON string:

* FITS: primary-header keyword ``SSPROV`` (FITS long-string ``CONTINUE`` convention, which
  astropy reads back transparently), plus ``SSVERSN`` (streamstars version);
* parquet: schema metadata key ``streamstars``;
* the manifest ``SNAPSHOT.json`` (file names, row counts, byte sizes, sha256, provenance).

No file carries the wall-clock time except through the provenance ``created`` value, so two
writes of identical catalogs with identical metadata are byte-identical, and
:func:`compare_snapshots` (which ignores ``created`` by default) reports no difference between
two runs that differ only in when they ran.

Atomic replacement
------------------
:func:`write_snapshot` writes every file into a fresh sibling directory
``.<name>.tmp-<random>`` (same filesystem), fsyncs files and directory, then

* if ``out_dir`` does not exist: ``os.rename`` (atomic);
* otherwise: Linux ``renameat2(RENAME_EXCHANGE)`` (through ctypes/libc) swaps the two
  directories in one step, so the path ``out_dir`` always names a complete snapshot, old or new.
  The old snapshot (now at the temporary name) is removed after ``grace_seconds`` so that a
  reader which resolved ``out_dir`` just before the swap can still open its files (files that are
  already open stay readable after removal anyway; :func:`read_snapshot` opens all the files it
  needs through one directory file descriptor before reading any of them);
* if ``renameat2`` is unavailable (non-Linux, old glibc, filesystem without
  ``RENAME_EXCHANGE``): ``rename(out_dir, .<name>.old-<random>)`` then ``rename(tmp, out_dir)``.
  Between the two renames (a few microseconds) ``out_dir`` does not exist: a reader may see
  it missing, never a mix.

The same staging and swap are available to other writers as :func:`stage_snapshot` (the
sharded snapshot writes its HATS catalog ``fgcm_stars/`` and streams the flat files into the
staging directory, :mod:`streamstars.io.flat_stream`).

Writers of the same parent directory are serialised with ``flock`` on the parent directory,
and leftovers of a crashed writer (``.<name>.tmp-*`` / ``.<name>.old-*``) are removed under that
lock.  An existing ``out_dir`` is replaced only when it holds nothing but entries a snapshot
writes (:data:`SNAPSHOT_ENTRIES`, checked before the files are written and again just before
the swap); anything else in it (notes, a backup, a state directory...) would be deleted with
the old snapshot, so :class:`SnapshotDirectoryError` is raised naming those entries and
nothing is written or removed.

A file that cannot be written (full disk, permissions, I/O error) raises
:class:`SnapshotWriteError` with one message: the partial files are removed and the previous
snapshot is unchanged (it is only replaced once every new file is complete).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from streamstars import __version__
from streamstars.columns import OBSERVATION_DTYPES
from streamstars.errors import StreamstarsError
from streamstars.staging import staged_directory

__all__ = [
    "FITS_FILES",
    "MANIFEST_NAME",
    "PARQUET_FILES",
    "REFSTARS_FORMAT_VERSION",
    "SNAPSHOT_ENTRIES",
    "STAR_DTYPES",
    "VISIT_ARRAY_FIELDS",
    "VISIT_SCALAR_DTYPES",
    "SnapshotCatalogs",
    "SnapshotDirectoryError",
    "SnapshotStaging",
    "SnapshotWriteError",
    "compare_snapshots",
    "read_snapshot",
    "stage_snapshot",
    "write_snapshot",
]

#: Name of the manifest written last into every snapshot directory.
MANIFEST_NAME = "SNAPSHOT.json"
MANIFEST_FORMAT = "streamstars-snapshot"
MANIFEST_VERSION = 1
REFSTARS_FORMAT_VERSION = 1
#: Width of the FITS ``physicalFilter`` column (fgcmcal's legacy schema uses 30 characters).
PHYSICAL_FILTER_WIDTH = 30

FITS_FILES = {
    "visits": "fgcmVisitCatalog.fits",
    "observations": "fgcmStarObservations.fits",
    "stars": "fgcmStarIds.fits",
    "indices": "fgcmStarIndices.fits",
    "reference": "fgcmReferenceStars.fits",
}
PARQUET_FILES = {
    "visits": "fgcmVisitCatalog.parquet",
    "observations": "fgcm_star_observations.parquet",
    "stars": "fgcm_star_ids.parquet",
    "reference": "fgcm_reference_stars.parquet",
}
#: Every entry a snapshot directory may hold, name -> ``"file"`` or ``"dir"``: the one list
#: that says what a snapshot writes.  A directory holding anything else is never replaced
#: (:class:`SnapshotDirectoryError` names the foreign entries): the swap would delete them.
#: A new output (e.g. a ``fgcm_stars/`` HATS directory) is added here.
#: The HATS catalog of the published stars inside a snapshot (streamstars.io.hats).
HATS_CATALOG_DIR = "fgcm_stars"
SNAPSHOT_ENTRIES: dict[str, str] = {
    MANIFEST_NAME: "file",
    HATS_CATALOG_DIR: "dir",
    **{name: "file" for name in FITS_FILES.values()},
    **{name: "file" for name in PARQUET_FILES.values()},
}

#: Scalar fields of the visit catalog, in file order (``physicalFilter`` is a string).
VISIT_SCALAR_DTYPES: dict[str, np.dtype] = {
    "visit": np.dtype(np.int64),
    "physicalFilter": np.dtype(np.str_),
    "telra": np.dtype(np.float64),
    "teldec": np.dtype(np.float64),
    "telha": np.dtype(np.float64),
    "telrot": np.dtype(np.float64),
    "mjd": np.dtype(np.float64),
    "exptime": np.dtype(np.float64),
    "pmb": np.dtype(np.float64),
    "psfSigma": np.dtype(np.float64),
    "psfFwhm": np.dtype(np.float64),
    "skyBackground": np.dtype(np.float64),
    "deltaAper": np.dtype(np.float64),
    "deepFlag": np.dtype(np.int32),
    "used": np.dtype(np.int32),
    "sources_read": np.dtype(np.bool_),
}
#: Per-detector (n_visits, n_ccd) float64 fields of the visit catalog.
VISIT_ARRAY_FIELDS: tuple[str, ...] = ("deltaAperDetector", "psfFwhmDetector", "scaling")
_VISIT_ORDER: tuple[str, ...] = (
    "visit", "physicalFilter", "telra", "teldec", "telha", "telrot", "mjd", "exptime", "pmb",
    "psfSigma", "psfFwhm", "skyBackground", "deltaAper", "deltaAperDetector", "psfFwhmDetector",
    "scaling", "deepFlag", "used", "sources_read",
)
_VISIT_UNITS = {
    "telra": "deg", "teldec": "deg", "telha": "deg", "telrot": "deg", "mjd": "d",
    "exptime": "s", "pmb": "mbar", "psfSigma": "pix", "psfFwhm": "arcsec",
    "psfFwhmDetector": "arcsec", "deltaAper": "mag", "deltaAperDetector": "mag",
}

#: Columns of ``SnapshotCatalogs.stars``.
STAR_DTYPES: dict[str, np.dtype] = {
    "fgcm_id": np.dtype(np.int64),
    "ra": np.dtype(np.float64),
    "dec": np.dtype(np.float64),
    "obs_arr_index": np.dtype(np.int64),
    "n_obs": np.dtype(np.int32),
    "obj_flag": np.dtype(np.int32),
}

# (fits name, source column, FITS format, unit); ra/dec converted to radians.
_FITS_OBS_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("ra", "ra", "D", "rad"),
    ("dec", "dec", "D", "rad"),
    ("x", "x", "D", "pix"),
    ("y", "y", "D", "pix"),
    ("psf_candidate", "psf_candidate", "L", None),
    ("visit", "visit", "K", None),
    ("ccd", "detector", "J", None),
    ("instMag", "inst_mag", "E", "mag"),
    ("instMagErr", "inst_mag_err", "E", "mag"),
    ("jacobian", "jacobian", "E", None),
    ("deltaMagBkg", "delta_mag_bkg", "E", "mag"),
    ("deltaMagAper", "delta_mag_aper", "E", "mag"),
    ("sourceId", "source_id", "K", None),
)
# (parquet name, source column, arrow type)
_PARQUET_OBS_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("x", pa.float32()),
    ("y", pa.float32()),
    ("visit", pa.int64()),
    ("detector", pa.int32()),
    ("inst_mag", pa.float32()),
    ("inst_mag_err", pa.float32()),
    ("jacobian", pa.float32()),
    ("delta_mag_bkg", pa.float32()),
    ("delta_mag_aper", pa.float32()),
    ("delta_mag_err_aper", pa.float32()),
    ("psf_candidate", pa.bool_()),
    ("source_id", pa.int64()),
)
_PARQUET_STAR_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("fgcm_id", pa.int64()),
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("obs_arr_index", pa.int64()),
    ("n_obs", pa.int32()),
    ("obj_flag", pa.int32()),
)
# (fits name, source column of SnapshotCatalogs.stars, FITS format, unit)
_FITS_STAR_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("fgcm_id", "fgcm_id", "K", None),
    ("ra", "ra", "D", "deg"),
    ("dec", "dec", "D", "deg"),
    ("obsArrIndex", "obs_arr_index", "J", None),
    ("nObs", "n_obs", "J", None),
)
_FITS_INDEX_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("obsIndex", "obs_index", "J", None),
)
_ID_HEADER: dict[str, tuple[Any, str]] = {
    "FGCMIDTY": ("int64", "fgcm_id: 64-bit stable ids (fgcmcal int32)")}


def _fits_reference_columns(nfilt: int) -> tuple[tuple[str, str, str, str | None], ...]:
    """(fits name, source column, FITS format, unit) of fgcmReferenceStars."""
    return (("fgcm_id", "fgcm_id", "K", None), ("refMag", "refMag", f"{nfilt}E", "mag"),
            ("refMagErr", "refMagErr", f"{nfilt}E", "mag"))


def _parquet_reference_columns(nfilt: int) -> tuple[tuple[str, pa.DataType], ...]:
    """(name, arrow type) of fgcm_reference_stars."""
    return (("fgcm_id", pa.int64()), ("refMag", pa.list_(pa.float32(), nfilt)),
            ("refMagErr", pa.list_(pa.float32(), nfilt)))


def _reference_fits_header(filters: Sequence[str]) -> dict[str, tuple[Any, str]]:
    return {
        "HIERARCH FILTERNAMES": (",".join(filters), "filter order of refMag"),
        "HIERARCH REFSTARS_FORMAT_VERSION": (REFSTARS_FORMAT_VERSION, ""),
        **_ID_HEADER,
    }


def _reference_parquet_metadata(filters: Sequence[str]) -> dict[str, str]:
    return {"FILTERNAMES": ",".join(filters),
            "REFSTARS_FORMAT_VERSION": str(REFSTARS_FORMAT_VERSION)}


_PROV_KEYWORD = "SSPROV"
_PARQUET_META_KEY = b"streamstars"
_PARQUET_COMPRESSION = "zstd"
_INT32_MAX = np.iinfo(np.int32).max


class SnapshotDirectoryError(StreamstarsError):
    """``out_dir`` cannot be used for a snapshot (e.g. it holds files a snapshot does not
    write)."""


class SnapshotWriteError(StreamstarsError):
    """The snapshot could not be written (full disk, no permission, I/O error); the previous
    snapshot, if any, is unchanged and the partial files are removed."""


@dataclass
class SnapshotCatalogs:
    """In-memory content of one snapshot.

    Attributes
    ----------
    visits
        fgcmVisitCatalog columns (:data:`VISIT_SCALAR_DTYPES` plus the (n, nCcd) float64
        :data:`VISIT_ARRAY_FIELDS`), one row per visit; rows are sorted by visit on writing.
    observations
        Columns of :data:`streamstars.columns.OBSERVATION_DTYPES` (ra/dec in degrees), rows
        grouped by star in ``stars`` order.
    stars
        Columns of :data:`STAR_DTYPES`: star ``i`` owns observation rows
        ``obs_arr_index[i] : obs_arr_index[i] + n_obs[i]``.
    reference
        ``fgcm_id`` int64, ``refMag`` and ``refMagErr`` (n, nfilt) float32, or ``None``.
    reference_filters
        The nfilt filter names, in column order of ``refMag``.
    metadata
        Provenance strings (visits included, offsets, config, time, version).
    """

    visits: dict[str, np.ndarray]
    observations: dict[str, np.ndarray]
    stars: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] | None = None
    reference_filters: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# validation / normalisation
# --------------------------------------------------------------------------------------------


def _require(columns: dict[str, np.ndarray], names: Iterable[str], what: str) -> None:
    missing = [n for n in names if n not in columns]
    if missing:
        raise ValueError(f"{what} columns missing: {', '.join(missing)}")


def _one_length(columns: dict[str, np.ndarray], what: str) -> int:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what} columns have different lengths: {lengths}")
    return next(iter(lengths.values())) if lengths else 0


def _normalise_visits(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check the visit catalog; canonical dtypes, rows sorted by visit."""
    _require(columns, _VISIT_ORDER, "visit catalog")
    visits: dict[str, np.ndarray] = {}
    for name, dt in VISIT_SCALAR_DTYPES.items():
        values = np.asarray(columns[name])
        if values.ndim != 1:
            raise ValueError(f"visit catalog column {name!r} must be 1-d, got {values.shape}")
        visits[name] = values.astype(str) if name == "physicalFilter" else values.astype(dt)
    n_visits = len(visits["visit"])
    for name in VISIT_ARRAY_FIELDS:
        values = np.asarray(columns[name], dtype=np.float64)
        if values.ndim != 2 or values.shape[0] != n_visits or values.shape[1] < 1:
            raise ValueError(
                f"visit catalog column {name!r} must have shape (n_visits={n_visits}, nCcd>=1),"
                f" got {values.shape}")
        visits[name] = values
    n_ccd = {visits[name].shape[1] for name in VISIT_ARRAY_FIELDS}
    if len(n_ccd) > 1:
        raise ValueError(f"per-detector visit columns disagree on nCcd: {sorted(n_ccd)}")
    _one_length(visits, "visit catalog")
    if np.unique(visits["visit"]).size != n_visits:
        raise ValueError("visit catalog has duplicate visits")
    order = np.argsort(visits["visit"], kind="stable")
    return {name: values[order] for name, values in visits.items()}


def _normalise_filters(filters: Iterable[str]) -> tuple[str, ...]:
    names = tuple(str(f) for f in filters)
    if any("," in f for f in names):
        raise ValueError(f"reference filter names may not contain commas: {names}")
    return names


def _normalise_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Provenance strings, with ``created`` and ``streamstars_version`` added when absent."""
    out = {str(k): str(v) for k, v in metadata.items()}
    out.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    out.setdefault("streamstars_version", __version__)
    return out


def _normalise(catalogs: SnapshotCatalogs) -> SnapshotCatalogs:
    """Check the catalogs and return a copy with canonical dtypes, visits sorted by visit."""
    visits = _normalise_visits(catalogs.visits)

    # observations
    _require(catalogs.observations, OBSERVATION_DTYPES, "observation")
    observations = {name: np.asarray(catalogs.observations[name]).astype(dt, copy=False)
                    for name, dt in OBSERVATION_DTYPES.items()}
    n_obs_rows = _one_length(observations, "observation")

    # stars
    _require(catalogs.stars, STAR_DTYPES, "star")
    stars = {name: np.asarray(catalogs.stars[name]).astype(dt, copy=False)
             for name, dt in STAR_DTYPES.items()}
    _one_length(stars, "star")
    n_obs = stars["n_obs"].astype(np.int64)
    if np.any(n_obs < 0):
        raise ValueError("star n_obs must be >= 0")
    expected_index = np.concatenate(([0], np.cumsum(n_obs)[:-1])) if n_obs.size else n_obs
    if not np.array_equal(stars["obs_arr_index"], expected_index):
        raise ValueError("star obs_arr_index must be the running sum of n_obs "
                         "(observations grouped by star, in star order)")
    if int(n_obs.sum()) != n_obs_rows:
        raise ValueError(f"sum of n_obs ({int(n_obs.sum())}) != number of observations "
                         f"({n_obs_rows})")

    # reference
    reference: dict[str, np.ndarray] | None = None
    filters = _normalise_filters(catalogs.reference_filters)
    if catalogs.reference is not None:
        _require(catalogs.reference, ("fgcm_id", "refMag", "refMagErr"), "reference")
        reference = {"fgcm_id": np.asarray(catalogs.reference["fgcm_id"], dtype=np.int64)}
        for name in ("refMag", "refMagErr"):
            values = np.asarray(catalogs.reference[name], dtype=np.float32)
            if values.ndim != 2 or values.shape != (len(reference["fgcm_id"]), len(filters)):
                raise ValueError(
                    f"reference column {name!r} must have shape (n_ref, n_filters="
                    f"{len(filters)}), got {values.shape}")
            reference[name] = values
        if not filters:
            raise ValueError("reference catalogs need reference_filters")

    metadata = _normalise_metadata(catalogs.metadata)
    return SnapshotCatalogs(visits=visits, observations=observations, stars=stars,
                            reference=reference, reference_filters=filters, metadata=metadata)


def _provenance_json(metadata: dict[str, str]) -> str:
    return json.dumps(metadata, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# FITS
# --------------------------------------------------------------------------------------------


def _primary_hdu(metadata: dict[str, str]) -> fits.PrimaryHDU:
    header = fits.Header()
    header["SSVERSN"] = (metadata.get("streamstars_version", __version__),
                         "streamstars version")
    header[_PROV_KEYWORD] = (_provenance_json(metadata), "streamstars provenance (JSON)")
    return fits.PrimaryHDU(header=header)


def _fits_columns(specs: Sequence[tuple[str, str, str, str | None]],
                  arrays: dict[str, np.ndarray]) -> list[fits.Column]:
    """FITS columns from (fits name, source, format, unit) specs and the source arrays."""
    return [fits.Column(name=name, format=form, array=arrays[src], unit=unit)
            for name, src, form, unit in specs]


def _fits_hdulist(metadata: dict[str, str], columns: list[fits.Column],
                  extra_header: dict[str, tuple[Any, str]] | None = None) -> fits.HDUList:
    """Primary HDU (provenance) + one binary table; ``extra_header`` goes into both."""
    primary = _primary_hdu(metadata)
    table = fits.BinTableHDU.from_columns(fits.ColDefs(columns))
    for key, value in (extra_header or {}).items():
        primary.header[key] = value
        table.header[key] = value
    return fits.HDUList([primary, table])


def _write_fits(path: Path, metadata: dict[str, str], columns: list[fits.Column],
                extra_header: dict[str, tuple[Any, str]] | None = None) -> None:
    _fits_hdulist(metadata, columns, extra_header).writeto(path, checksum=False,
                                                            output_verify="exception")


def _fits_observation_arrays(o: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The source arrays of fgcmStarObservations (ra/dec converted to radians)."""
    return {src: np.radians(o[src]) if src in ("ra", "dec") else o[src]
            for _, src, _, _ in _FITS_OBS_COLUMNS}


def _check_legacy_obs_count(n_obs_rows: int) -> None:
    if n_obs_rows > _INT32_MAX:
        raise ValueError(f"{n_obs_rows} observations do not fit the legacy int32 obsIndex; "
                         "write formats=('parquet',) only")


def _write_visit_fits(out: Path, v: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """fgcmVisitCatalog.fits from normalised visit columns; returns its row count."""
    n_ccd = v["scaling"].shape[1]
    width = max([PHYSICAL_FILTER_WIDTH, *(len(s) for s in v["physicalFilter"])])
    fmt = {np.dtype(np.int64): "K", np.dtype(np.int32): "J", np.dtype(np.float64): "D",
           np.dtype(np.bool_): "L"}
    visit_cols: list[fits.Column] = []
    for name in _VISIT_ORDER:
        if name == "physicalFilter":
            visit_cols.append(fits.Column(name=name, format=f"{width}A",
                                          array=v[name].astype(f"S{width}")))
        elif name in VISIT_ARRAY_FIELDS:
            visit_cols.append(fits.Column(name=name, format=f"{n_ccd}D", array=v[name],
                                          unit=_VISIT_UNITS.get(name)))
        else:
            visit_cols.append(fits.Column(name=name, format=fmt[v[name].dtype], array=v[name],
                                          unit=_VISIT_UNITS.get(name)))
    _write_fits(out / FITS_FILES["visits"], meta, visit_cols)
    return len(v["visit"])


def _write_fits_files(out: Path, cat: SnapshotCatalogs) -> dict[str, int]:
    rows: dict[str, int] = {}
    meta = cat.metadata
    rows[FITS_FILES["visits"]] = _write_visit_fits(out, cat.visits, meta)

    o = cat.observations
    n_obs_rows = len(o["visit"])
    _check_legacy_obs_count(n_obs_rows)
    _write_fits(out / FITS_FILES["observations"], meta,
                _fits_columns(_FITS_OBS_COLUMNS, _fits_observation_arrays(o)))
    rows[FITS_FILES["observations"]] = n_obs_rows

    s = cat.stars
    star_arrays = {**s, "obs_arr_index": s["obs_arr_index"].astype(np.int32)}
    _write_fits(out / FITS_FILES["stars"], meta, _fits_columns(_FITS_STAR_COLUMNS, star_arrays),
                _ID_HEADER)
    rows[FITS_FILES["stars"]] = len(s["fgcm_id"])

    _write_fits(out / FITS_FILES["indices"], meta,
                _fits_columns(_FITS_INDEX_COLUMNS,
                              {"obs_index": np.arange(n_obs_rows, dtype=np.int32)}))
    rows[FITS_FILES["indices"]] = n_obs_rows

    if cat.reference is not None:
        r = cat.reference
        _write_fits(out / FITS_FILES["reference"], meta,
                    _fits_columns(_fits_reference_columns(len(cat.reference_filters)), r),
                    _reference_fits_header(cat.reference_filters))
        rows[FITS_FILES["reference"]] = len(r["fgcm_id"])
    return rows


# --------------------------------------------------------------------------------------------
# parquet
# --------------------------------------------------------------------------------------------


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, int(values.shape[1]))


def _parquet_schema(columns: Sequence[tuple[str, pa.DataType]], metadata: dict[str, str],
                    extra: dict[str, str] | None = None) -> pa.Schema:
    """Schema of a production parquet file: the columns, provenance and ``extra`` metadata."""
    meta = {_PARQUET_META_KEY: _provenance_json(metadata).encode()}
    for key, value in (extra or {}).items():
        meta[key.encode()] = value.encode()
    return pa.schema([pa.field(name, typ) for name, typ in columns], metadata=meta)


def _parquet_observation_arrays(o: dict[str, np.ndarray]) -> list[pa.Array]:
    """fgcm_star_observations arrays, cast to their production types (numpy casts)."""
    return [pa.array(np.asarray(o[name]).astype(typ.to_pandas_dtype(), copy=False), type=typ)
            for name, typ in _PARQUET_OBS_COLUMNS]


def _write_parquet(path: Path, arrays: list[pa.Array], names: list[str],
                   metadata: dict[str, str], extra: dict[str, str] | None = None) -> None:
    table = pa.Table.from_arrays(arrays, names=names)
    schema = _parquet_schema([(f.name, f.type) for f in table.schema], metadata, extra)
    pq.write_table(table.replace_schema_metadata(schema.metadata), path,
                   compression=_PARQUET_COMPRESSION)


def _write_visit_parquet(out: Path, v: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """fgcmVisitCatalog.parquet from normalised visit columns; returns its row count."""
    arrays: list[pa.Array] = []
    for name in _VISIT_ORDER:
        if name in VISIT_ARRAY_FIELDS:
            arrays.append(_fixed_list(v[name], pa.float64()))
        elif name == "physicalFilter":
            arrays.append(pa.array(v[name].tolist(), type=pa.string()))
        else:
            arrays.append(pa.array(v[name]))
    _write_parquet(out / PARQUET_FILES["visits"], arrays, list(_VISIT_ORDER), meta)
    return len(v["visit"])


def _write_parquet_files(out: Path, cat: SnapshotCatalogs) -> dict[str, int]:
    rows: dict[str, int] = {}
    meta = cat.metadata
    rows[PARQUET_FILES["visits"]] = _write_visit_parquet(out, cat.visits, meta)

    o = cat.observations
    _write_parquet(out / PARQUET_FILES["observations"], _parquet_observation_arrays(o),
                   [name for name, _ in _PARQUET_OBS_COLUMNS], meta)
    rows[PARQUET_FILES["observations"]] = len(o["visit"])

    s = cat.stars
    _write_parquet(out / PARQUET_FILES["stars"],
                   [pa.array(s[name], type=typ) for name, typ in _PARQUET_STAR_COLUMNS],
                   [name for name, _ in _PARQUET_STAR_COLUMNS], meta)
    rows[PARQUET_FILES["stars"]] = len(s["fgcm_id"])

    if cat.reference is not None:
        r = cat.reference
        _write_parquet(out / PARQUET_FILES["reference"],
                       [pa.array(r["fgcm_id"], type=pa.int64()),
                        _fixed_list(r["refMag"], pa.float32()),
                        _fixed_list(r["refMagErr"], pa.float32())],
                       [name for name, _ in
                        _parquet_reference_columns(len(cat.reference_filters))], meta,
                       _reference_parquet_metadata(cat.reference_filters))
        rows[PARQUET_FILES["reference"]] = len(r["fgcm_id"])
    return rows


# --------------------------------------------------------------------------------------------
# filesystem helpers
# --------------------------------------------------------------------------------------------


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap directories ``a`` and ``b``; False when the system cannot do it."""
    if _renameat2 is None:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None,
                  str(b))


@contextlib.contextmanager
def _locked_parent(parent: Path) -> Iterator[None]:
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _foreign_entries(out_dir: Path) -> list[str]:
    """Entries of ``out_dir`` that a snapshot does not write (``/`` marks directories)."""
    foreign = []
    with os.scandir(out_dir) as entries:
        for entry in entries:
            kind = SNAPSHOT_ENTRIES.get(entry.name)
            if entry.is_symlink():
                ok = False
            elif kind == "file":
                ok = entry.is_file(follow_symlinks=False)
            elif kind == "dir":
                ok = entry.is_dir(follow_symlinks=False)
            else:
                ok = False
            if not ok:
                foreign.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False)
                                             else ""))
    return sorted(foreign)


def _check_out_dir(out_dir: Path) -> bool:
    """Whether ``out_dir`` exists (as a replaceable directory); raise when it must not be used.

    A replaceable directory is empty or holds only entries of :data:`SNAPSHOT_ENTRIES` (of the
    right kind): replacing it deletes nothing else.
    """
    if out_dir.is_symlink():
        raise SnapshotDirectoryError(
            f"{out_dir} is a symbolic link; pass the real directory path to write_snapshot")
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise SnapshotDirectoryError(f"{out_dir} exists and is not a directory")
    foreign = _foreign_entries(out_dir)
    if foreign:
        shown = ", ".join(foreign[:20]) + (f" and {len(foreign) - 20} more"
                                           if len(foreign) > 20 else "")
        raise SnapshotDirectoryError(
            f"{out_dir} holds entries a streamstars snapshot does not write: {shown}; "
            "replacing the directory would delete them, so nothing was written. Move them out "
            "of it, or choose another output directory.")
    return True


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    fmts = tuple(dict.fromkeys(formats))
    unknown = [f for f in fmts if f not in ("fits", "parquet")]
    if unknown or not fmts:
        raise ValueError(f"formats must be a non-empty subset of ('fits', 'parquet'): {formats}")
    return fmts


def _write_manifest(tmp: Path, rows: dict[str, int], fmts: Sequence[str],
                    reference_filters: Sequence[str], metadata: dict[str, str], *,
                    checksums: bool, extra: dict[str, Any] | None = None) -> None:
    """fsync the files named in ``rows`` and write ``SNAPSHOT.json`` (last) into ``tmp``.

    ``extra`` entries (e.g. ``partitions``) are added at the top level of the manifest.
    """
    files: dict[str, dict[str, Any]] = {}
    for fname in sorted(rows):
        path = tmp / fname
        _fsync_path(path)
        entry: dict[str, Any] = {"rows": rows[fname], "bytes": path.stat().st_size}
        if checksums:
            entry["sha256"] = _sha256(path)
        files[fname] = entry
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "formats": list(fmts),
        "files": files,
        "reference_filters": list(reference_filters),
        "provenance": metadata,
        **(extra or {}),
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _fsync_path(tmp / MANIFEST_NAME)
    _fsync_path(tmp, directory=True)


@dataclass(frozen=True)
class SnapshotStaging:
    """A snapshot being written: files go into ``path``; ``target`` is the snapshot directory
    it replaces on success (``target_existed``: it held a snapshot, readable until the swap)."""

    path: Path
    target: Path
    target_existed: bool


@contextlib.contextmanager
def stage_snapshot(out_dir: str | os.PathLike[str], *,
                   grace_seconds: float = 0.2) -> Iterator[SnapshotStaging]:
    """Stage a snapshot in a fresh sibling directory and swap it into ``out_dir`` atomically.

    The parent directory is locked (``flock``) for the whole block, leftovers of crashed
    writers are removed, and the block's files are written into ``staging.path``.  When the
    block ends normally, ``out_dir`` is checked again (an entry put into it meanwhile would be
    deleted with the old snapshot), the staging directory is fsynced and swapped into place as
    described in the module docstring; when it raises, the staging directory is removed and
    ``out_dir`` is left as it was.  The caller writes the manifest (last) and fsyncs its own
    files (:func:`write_snapshot` and
    :func:`streamstars.io.flat_stream.finish_partitioned_snapshot` do both).

    Raises:
        SnapshotDirectoryError: ``out_dir`` is a symlink, a file, or a directory holding an
            entry that is not in :data:`SNAPSHOT_ENTRIES` (nothing is written or removed).
        SnapshotWriteError: a file could not be written (full disk, permissions, I/O error)
            or the snapshot could not be put in place; the previous snapshot is unchanged and
            the partial files are removed.
    """
    target = Path(os.path.abspath(os.fspath(out_dir)))
    parent = target.parent
    with contextlib.ExitStack() as stack:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked_parent(parent))
            exists = _check_out_dir(target)
            staged = stack.enter_context(staged_directory(target, "tmp", also_remove=("old",)))
            yield SnapshotStaging(staged.path, target, exists)
            _fsync_path(staged.path, directory=True)
            exists = _check_out_dir(target)
        except OSError as exc:
            raise _write_error(target, exc) from exc
        _publish(staged.path, target, exists, grace_seconds)


def _publish(tmp: Path, target: Path, exists: bool, grace_seconds: float) -> None:
    """Put the complete snapshot ``tmp`` at ``target`` (see the module docstring)."""
    parent = target.parent
    try:
        if not exists:
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            _fsync_path(parent, directory=True)
            if grace_seconds > 0:
                time.sleep(grace_seconds)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old snapshot
            return
        else:
            old = parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)  # window: target missing until the next rename
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)  # the previous snapshot back in place
                raise
            _fsync_path(parent, directory=True)
            if grace_seconds > 0:
                time.sleep(grace_seconds)
            shutil.rmtree(old, ignore_errors=True)
            return
        _fsync_path(parent, directory=True)
    except OSError as exc:
        # tmp holds the new snapshot (not published) or, after the exchange, the old one
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotWriteError(f"cannot put the snapshot in place at {target}: "
                                 f"{exc.strerror or exc}") from exc


def _directory_bytes(path: Path) -> int:
    try:
        return sum(entry.stat(follow_symlinks=False).st_size for entry in os.scandir(path)
                   if entry.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _write_error(target: Path, exc: OSError) -> SnapshotWriteError:
    """One clear message for a snapshot that could not be written (nothing was replaced)."""
    exists = target.is_dir()
    # astropy raises its own "Not enough space on disk" OSError (no errno); pyarrow's errors
    # carry the errno in their text only
    text = str(exc).lower()
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or "space" in text or "quota" in text
    kept = (f"the previous snapshot at {target} is unchanged" if exists
            else f"{target} was not created")
    if full:
        size = _directory_bytes(target) if exists else 0
        need = f" (the previous snapshot takes {size / 1e6:,.1f} MB)" if size else ""
        return SnapshotWriteError(
            f"cannot write the snapshot {target}: no space left on the file system of "
            f"{target.parent}. Nothing was replaced: {kept}, and the partial files were "
            f"removed. Free space there{need} and run the snapshot again.")
    where = f" ({exc.filename})" if exc.filename else ""
    return SnapshotWriteError(
        f"cannot write the snapshot {target}: {exc.strerror or exc}{where}. Nothing was "
        f"replaced: {kept}, and the partial files were removed.")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def write_snapshot(out_dir: str | os.PathLike[str], catalogs: SnapshotCatalogs,
                   formats: Sequence[str] = ("fits", "parquet"), *,
                   checksums: bool = True, grace_seconds: float = 0.2) -> list[Path]:
    """Write one complete snapshot to ``out_dir``, atomically replacing any older one.

    Parameters
    ----------
    out_dir
        Snapshot directory (created; its parent is created too).
    catalogs
        The catalogs; validated (column presence, lengths, ``obs_arr_index`` = running sum of
        ``n_obs``, reference shapes); visits are sorted by visit.
    formats
        Any of ``"fits"`` (legacy files) and ``"parquet"`` (production files).
    checksums
        Record the sha256 of each file in ``SNAPSHOT.json`` (one extra read of every file).
    grace_seconds
        Delay before the replaced snapshot is deleted (see the module docstring).

    Returns
    -------
    list[Path]
        Paths (under ``out_dir``) of the files written, the manifest last.

    Raises
    ------
    SnapshotDirectoryError
        ``out_dir`` is a symlink, a file, or a directory holding an entry that is not in
        :data:`SNAPSHOT_ENTRIES` (nothing is written or removed).
    SnapshotWriteError
        A file could not be written (full disk, permissions, I/O error) or the snapshot could
        not be put in place; the previous snapshot is unchanged and the partial files are
        removed.
    ValueError
        Invalid catalogs or formats.
    """
    fmts = _check_formats(formats)
    cat = _normalise(catalogs)
    with stage_snapshot(out_dir, grace_seconds=grace_seconds) as staging:
        rows: dict[str, int] = {}
        if "fits" in fmts:
            rows.update(_write_fits_files(staging.path, cat))
        if "parquet" in fmts:
            rows.update(_write_parquet_files(staging.path, cat))
        _write_manifest(staging.path, rows, fmts, cat.reference_filters, cat.metadata,
                        checksums=checksums)
    return [staging.target / fname for fname in sorted(rows)] + [staging.target / MANIFEST_NAME]


def _fixed_list_to_numpy(column: pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    array = column.combine_chunks()
    size = array.type.list_size
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False),
                      dtype=dtype).reshape(-1, size)


def _parquet_provenance(schema: pa.Schema) -> dict[str, str]:
    raw = (schema.metadata or {}).get(_PARQUET_META_KEY)
    return dict(json.loads(raw)) if raw else {}


def _read_parquet_catalogs(handles: dict[str, IO[bytes]]) -> SnapshotCatalogs:
    visits_table = pq.read_table(handles[PARQUET_FILES["visits"]])
    visits: dict[str, np.ndarray] = {}
    for name in _VISIT_ORDER:
        if name in VISIT_ARRAY_FIELDS:
            visits[name] = _fixed_list_to_numpy(visits_table[name], np.dtype(np.float64))
        elif name == "physicalFilter":
            visits[name] = np.asarray(visits_table[name].to_pylist(), dtype=np.str_)
        else:
            visits[name] = np.asarray(visits_table[name].to_numpy(),
                                      dtype=VISIT_SCALAR_DTYPES[name])
    obs_table = pq.read_table(handles[PARQUET_FILES["observations"]])
    observations = {name: np.asarray(obs_table[name].to_numpy(), dtype=dt)
                    for name, dt in OBSERVATION_DTYPES.items()}
    star_table = pq.read_table(handles[PARQUET_FILES["stars"]])
    stars = {name: np.asarray(star_table[name].to_numpy(), dtype=dt)
             for name, dt in STAR_DTYPES.items()}
    reference = None
    filters: tuple[str, ...] = ()
    ref_handle = handles.get(PARQUET_FILES["reference"])
    if ref_handle is not None:
        ref_table = pq.read_table(ref_handle)
        reference = {
            "fgcm_id": np.asarray(ref_table["fgcm_id"].to_numpy(), dtype=np.int64),
            "refMag": _fixed_list_to_numpy(ref_table["refMag"], np.dtype(np.float32)),
            "refMagErr": _fixed_list_to_numpy(ref_table["refMagErr"], np.dtype(np.float32)),
        }
        names = (ref_table.schema.metadata or {}).get(b"FILTERNAMES", b"").decode()
        filters = tuple(names.split(",")) if names else ()
    return SnapshotCatalogs(visits=visits, observations=observations, stars=stars,
                            reference=reference, reference_filters=filters,
                            metadata=_parquet_provenance(star_table.schema))


def _read_fits_catalogs(handles: dict[str, IO[bytes]]) -> SnapshotCatalogs:
    def table(fname: str) -> tuple[Any, fits.Header]:
        with fits.open(handles[fname], memmap=False) as hdus:
            return hdus[1].data, hdus[0].header

    vdata, _ = table(FITS_FILES["visits"])
    visits: dict[str, np.ndarray] = {}
    for name in _VISIT_ORDER:
        if name == "physicalFilter":
            visits[name] = np.char.rstrip(np.asarray(vdata[name], dtype=np.str_))
        elif name in VISIT_ARRAY_FIELDS:
            visits[name] = np.asarray(vdata[name], dtype=np.float64).reshape(len(vdata), -1)
        else:
            visits[name] = np.asarray(vdata[name], dtype=VISIT_SCALAR_DTYPES[name])
    odata, _ = table(FITS_FILES["observations"])
    observations: dict[str, np.ndarray] = {}
    for fits_name, src, _form, _unit in _FITS_OBS_COLUMNS:
        values = np.asarray(odata[fits_name])
        if fits_name in ("ra", "dec"):
            values = np.degrees(values)
        observations[src] = values.astype(OBSERVATION_DTYPES[src])
    observations["delta_mag_err_aper"] = np.full(len(odata), np.nan)  # not in legacy FITS
    observations = {name: observations[name] for name in OBSERVATION_DTYPES}
    sdata, primary = table(FITS_FILES["stars"])
    n_obs = np.asarray(sdata["nObs"], dtype=np.int32)
    stars: dict[str, np.ndarray] = {
        "fgcm_id": np.asarray(sdata["fgcm_id"], dtype=np.int64),
        "ra": np.asarray(sdata["ra"], dtype=np.float64),
        "dec": np.asarray(sdata["dec"], dtype=np.float64),
        "obs_arr_index": np.asarray(sdata["obsArrIndex"], dtype=np.int64),
        "n_obs": n_obs,
        "obj_flag": np.zeros(len(n_obs), dtype=np.int32),  # not in legacy FITS
    }
    reference: dict[str, np.ndarray] | None = None
    filters: tuple[str, ...] = ()
    if FITS_FILES["reference"] in handles:
        with fits.open(handles[FITS_FILES["reference"]], memmap=False) as hdus:
            rdata = hdus[1].data
            nfilt_names = str(hdus[1].header.get("FILTERNAMES", ""))
            filters = tuple(nfilt_names.split(",")) if nfilt_names else ()
            reference = {
                "fgcm_id": np.asarray(rdata["fgcm_id"], dtype=np.int64),
                "refMag": np.asarray(rdata["refMag"], dtype=np.float32).reshape(
                    len(rdata), -1),
                "refMagErr": np.asarray(rdata["refMagErr"], dtype=np.float32).reshape(
                    len(rdata), -1),
            }
    metadata = dict(json.loads(primary[_PROV_KEYWORD])) if _PROV_KEYWORD in primary else {}
    return SnapshotCatalogs(visits=visits, observations=observations, stars=stars,
                            reference=reference, reference_filters=filters, metadata=metadata)


def read_snapshot(out_dir: str | os.PathLike[str]) -> SnapshotCatalogs:
    """Read a snapshot back (parquet files; the FITS files when no parquet was written).

    All needed files are opened through one directory descriptor before any is read, so a
    concurrent :func:`write_snapshot` cannot make this return a mix of two snapshots.
    Values come back in the in-memory dtypes; parquet stores x, y and magnitudes as float32, so
    those are float32-rounded.  From FITS, ``delta_mag_err_aper`` is NaN and ``obj_flag`` 0
    (the legacy schemas lack them).
    """
    dir_fd = os.open(os.fspath(out_dir), os.O_RDONLY | os.O_DIRECTORY)
    handles: dict[str, IO[bytes]] = {}
    try:
        names = set(os.listdir(dir_fd))
        use_parquet = PARQUET_FILES["stars"] in names
        wanted = PARQUET_FILES if use_parquet else FITS_FILES
        for key, fname in wanted.items():
            if fname not in names:
                if key == "reference" or key == "indices":
                    continue
                raise FileNotFoundError(f"snapshot {out_dir} lacks {fname}")
            fd = os.open(fname, os.O_RDONLY, dir_fd=dir_fd)
            handles[fname] = os.fdopen(fd, "rb")
        return (_read_parquet_catalogs(handles) if use_parquet
                else _read_fits_catalogs(handles))
    finally:
        for handle in handles.values():
            handle.close()
        os.close(dir_fd)


def _without(metadata: dict[str, Any], ignore: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k not in ignore}


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _compare_parquet(fname: str, a: Path, b: Path, ignore: Sequence[str]) -> list[str]:
    ta, tb = pq.read_table(a), pq.read_table(b)
    diffs: list[str] = []
    meta_a, meta_b = dict(ta.schema.metadata or {}), dict(tb.schema.metadata or {})
    prov_a = _without(json.loads(meta_a.pop(_PARQUET_META_KEY, b"{}")), ignore)
    prov_b = _without(json.loads(meta_b.pop(_PARQUET_META_KEY, b"{}")), ignore)
    if prov_a != prov_b:
        diffs.append(f"{fname}: provenance differs: {prov_a} != {prov_b}")
    if meta_a != meta_b:
        keys = sorted(k.decode() for k in set(meta_a) ^ set(meta_b)
                      | {k for k in meta_a if meta_b.get(k) != meta_a[k]})
        diffs.append(f"{fname}: schema metadata differs ({', '.join(keys)})")
    ta, tb = ta.replace_schema_metadata(None), tb.replace_schema_metadata(None)
    if ta.schema != tb.schema:
        diffs.append(f"{fname}: schema differs: {ta.schema} != {tb.schema}")
        return diffs
    if ta.num_rows != tb.num_rows:
        diffs.append(f"{fname}: {ta.num_rows} rows != {tb.num_rows} rows")
        return diffs
    for col in ta.column_names:
        ca = pa.table({col: ta[col].combine_chunks()})
        cb = pa.table({col: tb[col].combine_chunks()})
        if _ipc_bytes(ca) != _ipc_bytes(cb):
            diffs.append(f"{fname}: column {col!r} differs")
    return diffs


def _compare_fits(fname: str, a: Path, b: Path, ignore: Sequence[str]) -> list[str]:
    diffs: list[str] = []
    with fits.open(a, memmap=False) as ha, fits.open(b, memmap=False) as hb:
        if len(ha) != len(hb):
            return [f"{fname}: {len(ha)} HDUs != {len(hb)} HDUs"]
        for i, (xa, xb) in enumerate(zip(ha, hb, strict=True)):
            cards_a = {k: v for k, v in xa.header.items() if k != _PROV_KEYWORD}
            cards_b = {k: v for k, v in xb.header.items() if k != _PROV_KEYWORD}
            if cards_a != cards_b:
                keys = sorted(k for k in set(cards_a) | set(cards_b)
                              if cards_a.get(k) != cards_b.get(k))
                diffs.append(f"{fname}[{i}]: header differs ({', '.join(keys)})")
            prov_a = _without(json.loads(xa.header.get(_PROV_KEYWORD, "{}")), ignore)
            prov_b = _without(json.loads(xb.header.get(_PROV_KEYWORD, "{}")), ignore)
            if prov_a != prov_b:
                diffs.append(f"{fname}[{i}]: provenance differs: {prov_a} != {prov_b}")
            if xa.data is None or xb.data is None:
                if (xa.data is None) != (xb.data is None):
                    diffs.append(f"{fname}[{i}]: data present in only one")
                continue
            if not isinstance(xa, fits.BinTableHDU):
                if np.asarray(xa.data).tobytes() != np.asarray(xb.data).tobytes():
                    diffs.append(f"{fname}[{i}]: data differs")
                continue
            for col in xa.columns.names:
                if col not in xb.columns.names:
                    continue  # reported through the TTYPE header cards
                va, vb = np.asarray(xa.data[col]), np.asarray(xb.data[col])
                if va.shape != vb.shape or va.tobytes() != vb.tobytes():
                    diffs.append(f"{fname}[{i}]: column {col!r} differs")
    return diffs


def _compare_manifests(a: Path, b: Path, ignore: Sequence[str],
                       ignore_keys: Sequence[str] = ()) -> list[str]:
    ma = {k: v for k, v in json.loads(a.read_text()).items() if k not in ignore_keys}
    mb = {k: v for k, v in json.loads(b.read_text()).items() if k not in ignore_keys}
    diffs: list[str] = []
    pa_, pb_ = _without(ma.pop("provenance", {}), ignore), _without(mb.pop("provenance", {}),
                                                                    ignore)
    if pa_ != pb_:
        diffs.append(f"{MANIFEST_NAME}: provenance differs: {pa_} != {pb_}")
    fa, fb = ma.pop("files", {}), mb.pop("files", {})
    for fname in sorted(set(fa) | set(fb)):
        ra = {k: v for k, v in fa.get(fname, {}).items() if k == "rows"}
        rb = {k: v for k, v in fb.get(fname, {}).items() if k == "rows"}
        if ra != rb:
            diffs.append(f"{MANIFEST_NAME}: rows of {fname} differ: {ra} != {rb}")
    if ma != mb:
        diffs.append(f"{MANIFEST_NAME}: differs: {ma} != {mb}")
    return diffs


def compare_snapshots(a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str],
                      ignore_metadata_keys: Sequence[str] = ("created",),
                      ignore_manifest_keys: Sequence[str] = ()) -> list[str]:
    """Differences between two snapshot directories (empty list: identical).

    Compares the file sets, every FITS header card and column (bitwise, so NaNs compare
    equal), every parquet schema, column (bitwise) and schema-metadata entry, and the manifests;
    provenance entries named in ``ignore_metadata_keys`` (default: the ``created`` timestamp)
    are ignored, and so are the byte sizes / sha256 of the manifest (they depend on them) and
    its top-level entries named in ``ignore_manifest_keys`` (e.g. ``partitions``).  A HATS
    catalog directory present in both (``fgcm_stars/``) is compared by its rows in ``fgcm_id``
    order, whatever its partitioning (:func:`streamstars.io.hats.compare_catalogs`).
    """
    a, b = Path(a_dir), Path(b_dir)
    names_a, names_b = set(os.listdir(a)), set(os.listdir(b))
    diffs = [f"{name}: only in {a}" for name in sorted(names_a - names_b)]
    diffs += [f"{name}: only in {b}" for name in sorted(names_b - names_a)]
    ignore = tuple(ignore_metadata_keys)
    for name in sorted(names_a & names_b):
        if (a / name).is_dir() and (b / name).is_dir():
            from streamstars.io.hats import compare_catalogs  # the catalog module imports this

            diffs += compare_catalogs(a / name, b / name, ignore)
        elif (a / name).is_dir() or (b / name).is_dir():
            diffs.append(f"{name}: a directory in only one snapshot")
        elif name == MANIFEST_NAME:
            diffs += _compare_manifests(a / name, b / name, ignore, tuple(ignore_manifest_keys))
        elif name.endswith(".parquet"):
            diffs += _compare_parquet(name, a / name, b / name, ignore)
        elif name.endswith(".fits"):
            diffs += _compare_fits(name, a / name, b / name, ignore)
        elif (a / name).read_bytes() != (b / name).read_bytes():
            diffs.append(f"{name}: differs")
    return diffs
