"""What a snapshot holds: its file names, the in-memory catalogs and their validation.

A snapshot is what fgcmcal's ``FgcmBuildStarsTableTask`` would have written for the visits
applied so far (docs/snapshot-format.md).  This module names its files (:data:`FITS_FILES`,
:data:`PARQUET_FILES`, the manifest :data:`MANIFEST_NAME` and the HATS catalog directory; the
one list of what a snapshot directory may hold is :data:`SNAPSHOT_ENTRIES`), defines the
in-memory content of one snapshot (:class:`SnapshotCatalogs`) and checks it before any file is
written (:func:`normalise_catalogs`).  The writers and readers of each format are
:mod:`streamstars.io.snapshot_fits` and :mod:`streamstars.io.snapshot_parquet`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from streamstars import __version__
from streamstars.columns import OBSERVATION_DTYPES

__all__ = [
    "FITS_FILES",
    "HATS_CATALOG_DIR",
    "MANIFEST_NAME",
    "PARQUET_FILES",
    "REFSTARS_FORMAT_VERSION",
    "SNAPSHOT_ENTRIES",
    "STAR_DTYPES",
    "VISIT_ARRAY_FIELDS",
    "VISIT_ORDER",
    "VISIT_SCALAR_DTYPES",
    "SnapshotCatalogs",
    "check_formats",
    "compare_provenance",
    "normalise_catalogs",
    "normalise_filters",
    "normalise_metadata",
    "normalise_visits",
    "provenance_json",
]

#: Name of the manifest written last into every snapshot directory.
MANIFEST_NAME = "SNAPSHOT.json"
#: ``REFSTARS_FORMAT_VERSION`` of the reference-star files (FITS header, parquet metadata).
REFSTARS_FORMAT_VERSION = 1

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
#: The HATS catalog of the published stars inside a snapshot (streamstars.io.hats).
HATS_CATALOG_DIR = "fgcm_stars"
#: Every entry a snapshot directory may hold, name -> ``"file"`` or ``"dir"``: the one list
#: that says what a snapshot writes.  A directory holding anything else is never replaced
#: (``SnapshotDirectoryError`` names the foreign entries): the swap would delete them.
#: A new output is added here.
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
#: The columns of the visit catalog files, in file order.
VISIT_ORDER: tuple[str, ...] = (
    "visit", "physicalFilter", "telra", "teldec", "telha", "telrot", "mjd", "exptime", "pmb",
    "psfSigma", "psfFwhm", "skyBackground", "deltaAper", "deltaAperDetector", "psfFwhmDetector",
    "scaling", "deepFlag", "used", "sources_read",
)

#: Columns of ``SnapshotCatalogs.stars``.
STAR_DTYPES: dict[str, np.dtype] = {
    "fgcm_id": np.dtype(np.int64),
    "ra": np.dtype(np.float64),
    "dec": np.dtype(np.float64),
    "obs_arr_index": np.dtype(np.int64),
    "n_obs": np.dtype(np.int32),
    "obj_flag": np.dtype(np.int32),
}


@dataclass
class SnapshotCatalogs:
    """In-memory content of one snapshot.

    Attributes:
        visits: fgcmVisitCatalog columns (:data:`VISIT_SCALAR_DTYPES` plus the (n, nCcd)
            float64 :data:`VISIT_ARRAY_FIELDS`), one row per visit; rows are sorted by visit on
            writing.
        observations: columns of :data:`streamstars.columns.OBSERVATION_DTYPES` (ra/dec in
            degrees), rows grouped by star in ``stars`` order.
        stars: columns of :data:`STAR_DTYPES`: star ``i`` owns observation rows
            ``obs_arr_index[i] : obs_arr_index[i] + n_obs[i]``.
        reference: ``fgcm_id`` int64, ``refMag`` and ``refMagErr`` (n, nfilt) float32, or
            ``None``.
        reference_filters: the nfilt filter names, in column order of ``refMag``.
        metadata: provenance strings (visits included, offsets, config, time, version).
    """

    visits: dict[str, np.ndarray]
    observations: dict[str, np.ndarray]
    stars: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] | None = None
    reference_filters: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


def _require(columns: dict[str, np.ndarray], names: Iterable[str], what: str) -> None:
    missing = [n for n in names if n not in columns]
    if missing:
        raise ValueError(f"{what} columns missing: {', '.join(missing)}")


def _one_length(columns: dict[str, np.ndarray], what: str) -> int:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what} columns have different lengths: {lengths}")
    return next(iter(lengths.values())) if lengths else 0


def normalise_visits(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The visit catalog checked, in canonical dtypes, rows sorted by visit.

    Raises:
        ValueError: a column is missing or of the wrong shape, or a visit is repeated.
    """
    _require(columns, VISIT_ORDER, "visit catalog")
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


def normalise_filters(filters: Iterable[str]) -> tuple[str, ...]:
    """The reference filter names as a tuple of strings.

    Raises:
        ValueError: a name contains a comma (``FILTERNAMES`` joins them with commas).
    """
    names = tuple(str(f) for f in filters)
    if any("," in f for f in names):
        raise ValueError(f"reference filter names may not contain commas: {names}")
    return names


def normalise_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Provenance strings, with ``created`` and ``streamstars_version`` added when absent."""
    out = {str(k): str(v) for k, v in metadata.items()}
    out.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    out.setdefault("streamstars_version", __version__)
    return out


def normalise_catalogs(catalogs: SnapshotCatalogs) -> SnapshotCatalogs:
    """Check the catalogs and return a copy with canonical dtypes, visits sorted by visit.

    Raises:
        ValueError: missing columns, columns of different lengths, ``obs_arr_index`` not the
            running sum of ``n_obs``, reference columns of the wrong shape or without filters.
    """
    visits = normalise_visits(catalogs.visits)
    _require(catalogs.observations, OBSERVATION_DTYPES, "observation")
    observations = {name: np.asarray(catalogs.observations[name]).astype(dt, copy=False)
                    for name, dt in OBSERVATION_DTYPES.items()}
    stars = _normalise_stars(catalogs.stars, _one_length(observations, "observation"))
    filters = normalise_filters(catalogs.reference_filters)
    reference = (None if catalogs.reference is None
                 else _normalise_reference(catalogs.reference, filters))
    metadata = normalise_metadata(catalogs.metadata)
    return SnapshotCatalogs(visits=visits, observations=observations, stars=stars,
                            reference=reference, reference_filters=filters, metadata=metadata)


def _normalise_stars(columns: dict[str, np.ndarray], n_obs_rows: int) -> dict[str, np.ndarray]:
    """The star columns in canonical dtypes, checked against ``n_obs_rows`` observations."""
    _require(columns, STAR_DTYPES, "star")
    stars = {name: np.asarray(columns[name]).astype(dt, copy=False)
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
    return stars


def _normalise_reference(columns: dict[str, np.ndarray],
                         filters: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The reference columns in canonical dtypes, (n_ref, n_filters) magnitudes checked."""
    _require(columns, ("fgcm_id", "refMag", "refMagErr"), "reference")
    reference: dict[str, np.ndarray] = {
        "fgcm_id": np.asarray(columns["fgcm_id"], dtype=np.int64)}
    for name in ("refMag", "refMagErr"):
        values = np.asarray(columns[name], dtype=np.float32)
        if values.ndim != 2 or values.shape != (len(reference["fgcm_id"]), len(filters)):
            raise ValueError(
                f"reference column {name!r} must have shape (n_ref, n_filters="
                f"{len(filters)}), got {values.shape}")
        reference[name] = values
    if not filters:
        raise ValueError("reference catalogs need reference_filters")
    return reference


def provenance_json(metadata: dict[str, str]) -> str:
    """The provenance as stored in every file: sorted-key, compact, ASCII JSON."""
    return json.dumps(metadata, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The requested formats without repeats, in the order given.

    Raises:
        ValueError: empty, or a format other than ``"fits"`` and ``"parquet"``.
    """
    fmts = tuple(dict.fromkeys(formats))
    unknown = [f for f in fmts if f not in ("fits", "parquet")]
    if unknown or not fmts:
        raise ValueError(f"formats must be a non-empty subset of ('fits', 'parquet'): {formats}")
    return fmts


def compare_provenance(where: str, a: dict[str, Any], b: dict[str, Any],
                       ignore: Sequence[str]) -> list[str]:
    """The difference between two provenance dicts less the keys in ``ignore``, as a list of
    at most one message starting with ``where``."""
    a = {k: v for k, v in a.items() if k not in ignore}
    b = {k: v for k, v in b.items() if k not in ignore}
    return [] if a == b else [f"{where}: provenance differs: {a} != {b}"]
