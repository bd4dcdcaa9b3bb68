"""The legacy FITS files of a snapshot, with the schemas of fgcmcal's ``FgcmBuildStarsTableTask``.

``fgcmVisitCatalog.fits``, ``fgcmStarObservations.fits`` (ra/dec in **radians**),
``fgcmStarIds.fits`` (``fgcm_id`` is **int64**: streamstars' ids are stable 64-bit source ids;
header keyword ``FGCMIDTY = 'int64'`` says so), ``fgcmStarIndices.fits`` and, when a reference
catalog was matched, ``fgcmReferenceStars.fits`` (headers ``FILTERNAMES``,
``REFSTARS_FORMAT_VERSION = 1``).  Every file has a primary HDU carrying the provenance JSON
(keyword ``SSPROV``, FITS long-string ``CONTINUE`` convention, which astropy reads back
transparently) and ``SSVERSN`` (streamstars version), then one binary table.

The column specifications here are shared with the streamed writer
(:mod:`streamstars.io.flat_stream`), which writes byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from astropy.io import fits

from streamstars import __version__
from streamstars.columns import OBSERVATION_DTYPES
from streamstars.io.snapshot_catalogs import (
    FITS_FILES,
    REFSTARS_FORMAT_VERSION,
    VISIT_ARRAY_FIELDS,
    VISIT_ORDER,
    VISIT_SCALAR_DTYPES,
    SnapshotCatalogs,
    compare_provenance,
    provenance_json,
)

__all__ = [
    "FITS_INDEX_COLUMNS",
    "FITS_OBS_COLUMNS",
    "FITS_STAR_COLUMNS",
    "ID_HEADER",
    "PHYSICAL_FILTER_WIDTH",
    "PROVENANCE_KEYWORD",
    "check_legacy_obs_count",
    "compare_fits",
    "fits_hdulist",
    "fits_observation_arrays",
    "fits_reference_columns",
    "read_fits_catalogs",
    "reference_fits_header",
    "write_fits_files",
    "write_visit_fits",
]

#: Width of the FITS ``physicalFilter`` column (fgcmcal's legacy schema uses 30 characters).
PHYSICAL_FILTER_WIDTH = 30
#: Primary-header keyword of the provenance JSON.
PROVENANCE_KEYWORD = "SSPROV"
_INT32_MAX = np.iinfo(np.int32).max

_VISIT_UNITS = {
    "telra": "deg", "teldec": "deg", "telha": "deg", "telrot": "deg", "mjd": "d",
    "exptime": "s", "pmb": "mbar", "psfSigma": "pix", "psfFwhm": "arcsec",
    "psfFwhmDetector": "arcsec", "deltaAper": "mag", "deltaAperDetector": "mag",
}

# (fits name, source column, FITS format, unit); ra/dec converted to radians.
FITS_OBS_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
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
# (fits name, source column of SnapshotCatalogs.stars, FITS format, unit)
FITS_STAR_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("fgcm_id", "fgcm_id", "K", None),
    ("ra", "ra", "D", "deg"),
    ("dec", "dec", "D", "deg"),
    ("obsArrIndex", "obs_arr_index", "J", None),
    ("nObs", "n_obs", "J", None),
)
FITS_INDEX_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("obsIndex", "obs_index", "J", None),
)
ID_HEADER: dict[str, tuple[Any, str]] = {
    "FGCMIDTY": ("int64", "fgcm_id: 64-bit stable ids (fgcmcal int32)")}


def fits_reference_columns(nfilt: int) -> tuple[tuple[str, str, str, str | None], ...]:
    """(fits name, source column, FITS format, unit) of fgcmReferenceStars."""
    return (("fgcm_id", "fgcm_id", "K", None), ("refMag", "refMag", f"{nfilt}E", "mag"),
            ("refMagErr", "refMagErr", f"{nfilt}E", "mag"))


def reference_fits_header(filters: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """Header cards of fgcmReferenceStars: the filter order and the format version."""
    return {
        "HIERARCH FILTERNAMES": (",".join(filters), "filter order of refMag"),
        "HIERARCH REFSTARS_FORMAT_VERSION": (REFSTARS_FORMAT_VERSION, ""),
        **ID_HEADER,
    }


def _primary_hdu(metadata: dict[str, str]) -> fits.PrimaryHDU:
    header = fits.Header()
    header["SSVERSN"] = (metadata.get("streamstars_version", __version__),
                         "streamstars version")
    header[PROVENANCE_KEYWORD] = (provenance_json(metadata), "streamstars provenance (JSON)")
    return fits.PrimaryHDU(header=header)


def _fits_columns(specs: Sequence[tuple[str, str, str, str | None]],
                  arrays: dict[str, np.ndarray]) -> list[fits.Column]:
    """FITS columns from (fits name, source, format, unit) specs and the source arrays."""
    return [fits.Column(name=name, format=form, array=arrays[src], unit=unit)
            for name, src, form, unit in specs]


def fits_hdulist(metadata: dict[str, str], columns: list[fits.Column],
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
    fits_hdulist(metadata, columns, extra_header).writeto(path, checksum=False,
                                                           output_verify="exception")


def fits_observation_arrays(o: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The source arrays of fgcmStarObservations (ra/dec converted to radians)."""
    return {src: np.radians(o[src]) if src in ("ra", "dec") else o[src]
            for _, src, _, _ in FITS_OBS_COLUMNS}


def check_legacy_obs_count(n_obs_rows: int) -> None:
    """Refuse more observations than the legacy int32 ``obsIndex`` can number.

    Raises:
        ValueError: ``n_obs_rows`` exceeds 2**31 - 1.
    """
    if n_obs_rows > _INT32_MAX:
        raise ValueError(f"{n_obs_rows} observations do not fit the legacy int32 obsIndex; "
                         "write formats=('parquet',) only")


def write_visit_fits(out: Path, v: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """Write ``out/fgcmVisitCatalog.fits`` from normalised visit columns.

    Returns:
        Its row count.
    """
    n_ccd = v["scaling"].shape[1]
    width = max([PHYSICAL_FILTER_WIDTH, *(len(s) for s in v["physicalFilter"])])
    fmt = {np.dtype(np.int64): "K", np.dtype(np.int32): "J", np.dtype(np.float64): "D",
           np.dtype(np.bool_): "L"}
    visit_cols: list[fits.Column] = []
    for name in VISIT_ORDER:
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


def write_fits_files(out: Path, cat: SnapshotCatalogs) -> dict[str, int]:
    """Write the legacy FITS files of normalised catalogs into the directory ``out``.

    Returns:
        Rows written per file name.

    Raises:
        ValueError: more observations than the legacy int32 ``obsIndex`` holds.
    """
    rows: dict[str, int] = {}
    meta = cat.metadata
    rows[FITS_FILES["visits"]] = write_visit_fits(out, cat.visits, meta)

    o = cat.observations
    n_obs_rows = len(o["visit"])
    check_legacy_obs_count(n_obs_rows)
    _write_fits(out / FITS_FILES["observations"], meta,
                _fits_columns(FITS_OBS_COLUMNS, fits_observation_arrays(o)))
    rows[FITS_FILES["observations"]] = n_obs_rows

    s = cat.stars
    star_arrays = {**s, "obs_arr_index": s["obs_arr_index"].astype(np.int32)}
    _write_fits(out / FITS_FILES["stars"], meta, _fits_columns(FITS_STAR_COLUMNS, star_arrays),
                ID_HEADER)
    rows[FITS_FILES["stars"]] = len(s["fgcm_id"])

    _write_fits(out / FITS_FILES["indices"], meta,
                _fits_columns(FITS_INDEX_COLUMNS,
                              {"obs_index": np.arange(n_obs_rows, dtype=np.int32)}))
    rows[FITS_FILES["indices"]] = n_obs_rows

    if cat.reference is not None:
        r = cat.reference
        _write_fits(out / FITS_FILES["reference"], meta,
                    _fits_columns(fits_reference_columns(len(cat.reference_filters)), r),
                    reference_fits_header(cat.reference_filters))
        rows[FITS_FILES["reference"]] = len(r["fgcm_id"])
    return rows


def read_fits_catalogs(handles: dict[str, IO[bytes]]) -> SnapshotCatalogs:
    """The catalogs of the FITS files open in ``handles`` (file name -> binary handle).

    ``delta_mag_err_aper`` is NaN and ``obj_flag`` 0: the legacy schemas lack them.
    """
    visits = _read_fits_visits(_fits_table(handles, FITS_FILES["visits"])[0])
    observations = _read_fits_observations(_fits_table(handles, FITS_FILES["observations"])[0])
    star_data, primary = _fits_table(handles, FITS_FILES["stars"])
    n_obs = np.asarray(star_data["nObs"], dtype=np.int32)
    stars: dict[str, np.ndarray] = {
        "fgcm_id": np.asarray(star_data["fgcm_id"], dtype=np.int64),
        "ra": np.asarray(star_data["ra"], dtype=np.float64),
        "dec": np.asarray(star_data["dec"], dtype=np.float64),
        "obs_arr_index": np.asarray(star_data["obsArrIndex"], dtype=np.int64),
        "n_obs": n_obs,
        "obj_flag": np.zeros(len(n_obs), dtype=np.int32),  # not in legacy FITS
    }
    reference: dict[str, np.ndarray] | None = None
    filters: tuple[str, ...] = ()
    if FITS_FILES["reference"] in handles:
        reference, filters = _read_fits_reference(handles[FITS_FILES["reference"]])
    metadata = (dict(json.loads(primary[PROVENANCE_KEYWORD])) if PROVENANCE_KEYWORD in primary
                else {})
    return SnapshotCatalogs(visits=visits, observations=observations, stars=stars,
                            reference=reference, reference_filters=filters, metadata=metadata)


def _fits_table(handles: dict[str, IO[bytes]], fname: str) -> tuple[Any, fits.Header]:
    """The table (HDU 1) of a file and its primary header."""
    with fits.open(handles[fname], memmap=False) as hdus:
        return hdus[1].data, hdus[0].header


def _read_fits_visits(data: Any) -> dict[str, np.ndarray]:
    visits: dict[str, np.ndarray] = {}
    for name in VISIT_ORDER:
        if name == "physicalFilter":
            visits[name] = np.char.rstrip(np.asarray(data[name], dtype=np.str_))
        elif name in VISIT_ARRAY_FIELDS:
            visits[name] = np.asarray(data[name], dtype=np.float64).reshape(len(data), -1)
        else:
            visits[name] = np.asarray(data[name], dtype=VISIT_SCALAR_DTYPES[name])
    return visits


def _read_fits_observations(data: Any) -> dict[str, np.ndarray]:
    observations: dict[str, np.ndarray] = {}
    for fits_name, src, _form, _unit in FITS_OBS_COLUMNS:
        values = np.asarray(data[fits_name])
        if fits_name in ("ra", "dec"):
            values = np.degrees(values)
        observations[src] = values.astype(OBSERVATION_DTYPES[src])
    observations["delta_mag_err_aper"] = np.full(len(data), np.nan)  # not in legacy FITS
    return {name: observations[name] for name in OBSERVATION_DTYPES}


def _read_fits_reference(handle: IO[bytes]) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The reference columns and the filter names (``FILTERNAMES``) of fgcmReferenceStars."""
    with fits.open(handle, memmap=False) as hdus:
        data = hdus[1].data
        names = str(hdus[1].header.get("FILTERNAMES", ""))
        filters = tuple(names.split(",")) if names else ()
        reference: dict[str, np.ndarray] = {
            "fgcm_id": np.asarray(data["fgcm_id"], dtype=np.int64),
            "refMag": np.asarray(data["refMag"], dtype=np.float32).reshape(len(data), -1),
            "refMagErr": np.asarray(data["refMagErr"], dtype=np.float32).reshape(len(data), -1),
        }
    return reference, filters


def compare_fits(fname: str, a: Path, b: Path, ignore: Sequence[str]) -> list[str]:
    """Differences between two FITS files of the same name (empty list: identical).

    Every header card but the provenance, the provenance less the keys in ``ignore``, and every
    column bitwise (NaNs compare equal).
    """
    diffs: list[str] = []
    with fits.open(a, memmap=False) as ha, fits.open(b, memmap=False) as hb:
        if len(ha) != len(hb):
            return [f"{fname}: {len(ha)} HDUs != {len(hb)} HDUs"]
        for i, (xa, xb) in enumerate(zip(ha, hb, strict=True)):
            diffs += _compare_headers(f"{fname}[{i}]", xa.header, xb.header, ignore)
            diffs += _compare_data(f"{fname}[{i}]", xa, xb)
    return diffs


def _compare_headers(where: str, a: fits.Header, b: fits.Header,
                     ignore: Sequence[str]) -> list[str]:
    diffs: list[str] = []
    cards_a = {k: v for k, v in a.items() if k != PROVENANCE_KEYWORD}
    cards_b = {k: v for k, v in b.items() if k != PROVENANCE_KEYWORD}
    if cards_a != cards_b:
        keys = sorted(k for k in set(cards_a) | set(cards_b) if cards_a.get(k) != cards_b.get(k))
        diffs.append(f"{where}: header differs ({', '.join(keys)})")
    return diffs + compare_provenance(where, json.loads(a.get(PROVENANCE_KEYWORD, "{}")),
                                      json.loads(b.get(PROVENANCE_KEYWORD, "{}")), ignore)


def _compare_data(where: str, a: Any, b: Any) -> list[str]:
    if a.data is None or b.data is None:
        return [f"{where}: data present in only one"] if (a.data is None) != (b.data is None) \
            else []
    if not isinstance(a, fits.BinTableHDU):
        same = np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes()
        return [] if same else [f"{where}: data differs"]
    diffs = []
    for col in a.columns.names:
        if col not in b.columns.names:
            continue  # reported through the TTYPE header cards
        va, vb = np.asarray(a.data[col]), np.asarray(b.data[col])
        if va.shape != vb.shape or va.tobytes() != vb.tobytes():
            diffs.append(f"{where}: column {col!r} differs")
    return diffs
