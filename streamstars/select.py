"""Source selection and per-observation quantities of one visit, as fgcmcal computes them.

The cuts are fgcmcal's source selector (``sourceSelector``, :func:`cut_masks`), the
quantities those its ``FgcmBuildStarsTableTask`` stores per observation (instrumental
magnitude, aperture and background corrections, WCS jacobian, :func:`select_visit`) and the
per-visit and per-detector aperture corrections of its visit catalog
(:func:`aperture_corrections`).

Input: the canonical table of :func:`streamstars.io.sourcetable.read_source_table`.  Output: a
column dict with exactly the columns/dtypes of :data:`streamstars.columns.OBSERVATION_DTYPES`.

Null values in the table are read conservatively: a null flag counts as set, a null number as
NaN (so it fails any comparison), a null ``detect_isPrimary`` as False, a null parent/nChild
as "deblended".
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa

from .columns import OBSERVATION_DTYPES, ColumnDict
from .config import BuildStarsConfig
from .errors import ConfigError, InvalidSourceTableError, MissingMetadataError
from .io.sourcetable import CD_MATRIX_COLUMNS, local_background_flag_name
from .visit import BAD_DETECTOR_VALUE, VisitMetadata

#: 2.5 / ln(10): converts a relative flux error into a magnitude error.
MAG_ERR_FACTOR = 2.5 / math.log(10.0)
#: fgcm's marker for a missing aperture correction / magnitude.
BAD_MAG = 99.0
#: Minimum number of sources for a per-detector aperture correction (fgcmcal's
#: ``deltaAperDetector``).
MIN_SOURCES_PER_DETECTOR = 3

#: Names of the cuts, in the order they are reported.
CUT_NAMES: tuple[str, ...] = (
    "flags",
    "unresolved",
    "signalToNoise",
    "isolated",
    "requireFiniteRaDec",
    "requirePrimary",
    "localBackground",
)


def aperture_radius_from_name(field: str) -> float:
    """Aperture radius [pixels] parsed from a flux field name (``apFlux_12_0_instFlux`` -> 12.0).

    Raises:
        ConfigError: no ``<int>_<int>`` radius in the name.
    """
    m = re.search(r"[Ff]lux_(\d+)_(\d+)", field)
    if m is None:
        raise ConfigError(
            f"cannot parse an aperture radius from flux field {field!r} "
            "(expected a name like 'apFlux_12_0_instFlux'); it is needed for "
            "doSubtractLocalBackground"
        )
    return float(f"{m.group(1)}.{m.group(2)}")


def _float(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = col.fill_null(float("nan"))
    return np.asarray(col.to_numpy(), dtype=np.float64)


def _bool(table: pa.Table, name: str, null: bool) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = col.fill_null(null)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.bool_)


def _int(table: pa.Table, name: str, null: int) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = col.fill_null(null)
    return np.asarray(col.to_numpy(), dtype=np.int64)


def _mag(flux: np.ndarray) -> np.ndarray:
    """-2.5 log10(flux); NaN for flux <= 0 or non-finite (no warnings)."""
    out = np.full(flux.shape, np.nan)
    ok = np.isfinite(flux) & (flux > 0)
    out[ok] = -2.5 * np.log10(flux[ok])
    return out


def _local_background(table: pa.Table, config: BuildStarsConfig) -> np.ndarray:
    """pi r^2 * localBackground_instFlux [counts] in the calibration aperture."""
    radius = aperture_radius_from_name(config.instFluxField)
    return math.pi * radius**2 * _float(table, config.localBackgroundFluxField)


def cut_masks(table: pa.Table, config: BuildStarsConfig) -> dict[str, np.ndarray]:
    """Pass masks (True = the source survives) of every enabled cut of fgcmcal's selector.

    The cuts, each switchable in ``config.sourceSelector``: bad flags, unresolved, S/N,
    isolated (never deblended), finite ra/dec, ``detect_isPrimary`` (skipped when the column
    is absent), and with ``doSubtractLocalBackground`` the local-background cut.

    Keys are names of :data:`CUT_NAMES`; a disabled cut, or ``requirePrimary`` when the table
    has no primary column, is absent.  ``localBackground`` (present with
    ``doSubtractLocalBackground``) is ``localBackground_flag`` False and
    ``flux - pi r^2 bkg > 0``, applied whatever ``doFlags`` says (as fgcmcal does).
    """
    sel = config.sourceSelector
    names = set(table.column_names)
    masks: dict[str, np.ndarray] = {}
    n = table.num_rows
    if sel.doFlags:
        bad = np.zeros(n, dtype=np.bool_)
        for flag in sel.flags.bad:
            bad |= _bool(table, flag, null=True)
        masks["flags"] = ~bad
    if sel.doUnresolved:
        ext = _float(table, sel.unresolved.name)
        with np.errstate(invalid="ignore"):
            masks["unresolved"] = ext < sel.unresolved.maximum
    if sel.doSignalToNoise:
        sn_cfg = sel.signalToNoise
        with np.errstate(invalid="ignore", divide="ignore"):
            sn = _float(table, sn_cfg.fluxField) / _float(table, sn_cfg.errField)
            masks["signalToNoise"] = (
                np.isfinite(sn) & (sn > sn_cfg.minimum) & (sn < sn_cfg.maximum)
            )
    if sel.doIsolated:
        parent = _int(table, sel.isolated.parentName, null=-1)
        nchild = _int(table, sel.isolated.nChildName, null=-1)
        masks["isolated"] = (parent == 0) & (nchild == 0)
    if sel.doRequireFiniteRaDec:
        rd = sel.requireFiniteRaDec
        masks["requireFiniteRaDec"] = np.isfinite(_float(table, rd.raColName)) & np.isfinite(
            _float(table, rd.decColName)
        )
    if sel.doRequirePrimary and sel.requirePrimary.primaryColName in names:
        masks["requirePrimary"] = _bool(table, sel.requirePrimary.primaryColName, null=False)
    if config.doSubtractLocalBackground:
        masks["localBackground"] = _local_background_mask(table, config)
    return masks


def _local_background_mask(table: pa.Table, config: BuildStarsConfig) -> np.ndarray:
    """``localBackground_flag`` False and ``flux - pi r^2 bkg > 0``."""
    flux = _float(table, config.instFluxField)
    with np.errstate(invalid="ignore"):
        positive = (flux - _local_background(table, config)) > 0
    return positive & ~_bool(table, local_background_flag_name(config), null=True)


#: Names of the counts of rows dropped for unusable coordinates (visit record, reports).
NON_FINITE_RA_DEC = "nonFiniteRaDec"
RA_DEC_OUT_OF_RANGE = "raDecOutOfRange"
DROP_REASONS: tuple[str, ...] = (NON_FINITE_RA_DEC, RA_DEC_OUT_OF_RANGE)


def _position_checks(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(finite, in range) masks of the canonical ``ra``/``dec`` [deg]: finite both, and
    ``0 <= ra < 360``, ``-90 <= dec <= 90`` (a row outside would be placed at another
    position of the sky: dec 95 reads as 85 on the other side of the pole)."""
    ra, dec = _float(table, "ra"), _float(table, "dec")
    finite = np.isfinite(ra) & np.isfinite(dec)
    with np.errstate(invalid="ignore"):
        in_range = finite & (ra >= 0.0) & (ra < 360.0) & (dec >= -90.0) & (dec <= 90.0)
    return finite, in_range


def count_cuts(table: pa.Table, config: BuildStarsConfig) -> dict[str, int]:
    """How many sources each cut removes, for progress reports and metrics.

    Returns:
        ``{"read": rows, <cut>: rows failing that cut (each cut counted on its own, so the
        counts overlap), "nonFiniteRaDec": rows with non-finite ra/dec that pass every other
        cut, "raDecOutOfRange": rows with finite ra/dec outside [0, 360) x [-90, 90] that pass
        every other cut (both dropped, see :func:`select_visit`), "selected": rows selected}``.
    """
    masks = cut_masks(table, config)
    keep = np.ones(table.num_rows, dtype=np.bool_)
    others = np.ones(table.num_rows, dtype=np.bool_)
    out: dict[str, int] = {"read": table.num_rows}
    for name in CUT_NAMES:
        if name in masks:
            out[name] = int(np.count_nonzero(~masks[name]))
            keep &= masks[name]
            if name != "requireFiniteRaDec":
                others &= masks[name]
    finite, in_range = _position_checks(table)
    out[NON_FINITE_RA_DEC] = int(np.count_nonzero(others & ~finite))
    out[RA_DEC_OUT_OF_RANGE] = int(np.count_nonzero(others & finite & ~in_range))
    out["selected"] = int(np.count_nonzero(keep & in_range))
    return out


def reference_pixel_area(table: pa.Table, reference_ccd: int) -> float:
    """Reference pixel area: median |det CD| over the sources on detector ``reference_ccd``.

    Falls back to the median over all sources of the table when the reference detector has no
    source with a finite, positive |det CD|.  Units are those of the CD matrix squared (they
    cancel in the jacobian).  NaN when no source has a usable CD matrix.
    """
    area = pixel_area(table)
    good = np.isfinite(area) & (area > 0)
    on_ref = good & (_int(table, "detector", null=-1) == reference_ccd)
    if on_ref.any():
        return float(np.median(area[on_ref]))
    if good.any():
        return float(np.median(area[good]))
    return math.nan


def pixel_area(table: pa.Table) -> np.ndarray:
    """|det CD| per source from the ``localWcs_CDMatrix_*`` columns (NaN where missing)."""
    cd11, cd12, cd21, cd22 = (_float(table, c) for c in CD_MATRIX_COLUMNS)
    return np.abs(cd11 * cd22 - cd12 * cd21)


def select_observations(
    table: pa.Table, metadata: VisitMetadata, config: BuildStarsConfig
) -> ColumnDict:
    """The selected observations of :func:`select_visit` (without the drop counts)."""
    return select_visit(table, metadata, config)[0]


def select_visit(
    table: pa.Table, metadata: VisitMetadata, config: BuildStarsConfig
) -> tuple[ColumnDict, dict[str, int]]:
    """Select the good star observations of one visit and compute their fgcm quantities.

    The rows kept are those passing every cut of :func:`cut_masks` with usable coordinates
    (:func:`_selected_rows`); their quantities are the instrumental magnitude
    (:func:`_instrumental_magnitudes`, with the WCS jacobian of :func:`_jacobian`), the
    aperture correction (:func:`_aperture_magnitudes`), the local-background correction
    (:func:`_background_correction`) and ``psf_candidate`` (``config.psfCandidateName``, False
    when absent or null).

    Args:
        table: canonical source table of ONE visit (see ``read_source_table``).
        metadata: the visit's metadata (``visit``, ``exptime`` [s] are used).
        config: selection and quantity settings.

    Returns:
        (observations, dropped): a column dict with the columns and dtypes of
        ``OBSERVATION_DTYPES``, sorted by ``source_id`` (ra/dec in degrees), and
        ``{"nonFiniteRaDec": n, "raDecOutOfRange": m}``, the rows dropped for their
        coordinates that pass every other cut.

    Raises:
        InvalidSourceTableError: the table holds another visit than ``metadata.visit``.
        MissingMetadataError: ``metadata.exptime`` is not a positive number.
        ConfigError: ``doSubtractLocalBackground`` with an unparseable ``instFluxField``.
    """
    visit, exptime = _check_visit(table, metadata)
    idx, dropped = _selected_rows(table, config)
    sub = table.take(pa.array(idx, type=pa.int64()))
    flux = _float(sub, config.instFluxField)
    inst_mag, inst_mag_err = _instrumental_magnitudes(sub, flux, exptime, config)
    jacobian = _jacobian(table, sub, config)
    if config.doApplyWcsJacobian:
        inst_mag = inst_mag - 2.5 * np.log10(jacobian)
    delta_aper, delta_aper_err = _aperture_magnitudes(sub, config)
    quantities = {"inst_mag": inst_mag, "inst_mag_err": inst_mag_err, "jacobian": jacobian,
                  "delta_mag_bkg": _background_correction(sub, flux, config),
                  "delta_mag_aper": delta_aper, "delta_mag_err_aper": delta_aper_err}
    return _observations(sub, visit, quantities, config), dropped


def _observations(sub: pa.Table, visit: int, quantities: ColumnDict,
                  config: BuildStarsConfig) -> ColumnDict:
    """The observation columns (``OBSERVATION_DTYPES``) of the selected rows ``sub``: their
    identity, position and ``psf_candidate`` from the table, and the computed quantities."""
    n = sub.num_rows
    out: ColumnDict = {
        "source_id": _int(sub, "sourceId", null=-1),
        "visit": np.full(n, visit),
        "detector": _int(sub, "detector", null=-1),
        "ra": _float(sub, "ra"),
        "dec": _float(sub, "dec"),
        "x": _float(sub, "x"),
        "y": _float(sub, "y"),
        "psf_candidate": (_bool(sub, config.psfCandidateName, null=False)
                          if config.psfCandidateName in sub.column_names
                          else np.zeros(n, dtype=np.bool_)),
        **quantities,
    }
    return {name: np.asarray(out[name], dtype=dt) for name, dt in OBSERVATION_DTYPES.items()}


def _check_visit(table: pa.Table, metadata: VisitMetadata) -> tuple[int, float]:
    """The visit id and its exposure time [s], checked against the table.

    Raises:
        InvalidSourceTableError: the table holds another visit than ``metadata.visit``.
        MissingMetadataError: ``metadata.exptime`` is not a positive number.
    """
    visit = int(metadata.visit)
    if table.num_rows:
        visits = np.unique(_int(table, "visit", null=-1))
        if visits.size != 1 or int(visits[0]) != visit:
            raise InvalidSourceTableError(
                f"visit {visit}: source table holds visit(s) {visits.tolist()[:10]}, "
                f"not visit {visit}"
            )
    exptime = float(metadata.exptime)
    if not (math.isfinite(exptime) and exptime > 0):
        raise MissingMetadataError(
            f"visit {visit}: exposure time {exptime!r} s is not positive; cannot compute "
            "instrumental magnitudes (check the visit metadata)"
        )
    return visit, exptime


def _selected_rows(table: pa.Table, config: BuildStarsConfig) -> tuple[np.ndarray,
                                                                      dict[str, int]]:
    """The rows selected (in sourceId order) and the counts of rows dropped for their
    coordinates.

    Unusable coordinates: as in fgcmcal, ``doRequireFiniteRaDec`` (default on) drops rows with
    non-finite ``ra``/``dec`` and the rest of the visit is used.  With it off fgcmcal would keep
    them, but a row without coordinates cannot be placed on the sky, so it is dropped all the
    same.  Rows with finite coordinates outside ``0 <= ra < 360``, ``-90 <= dec <= 90`` are
    dropped too (they would be folded onto another position).  The rows dropped for these
    reasons that pass every other cut are counted (``nonFiniteRaDec``, ``raDecOutOfRange``):
    they are the observations the visit lost to bad coordinates.
    """
    masks = cut_masks(table, config)
    keep = np.ones(table.num_rows, dtype=np.bool_)
    for name, mask in masks.items():
        if name != "requireFiniteRaDec":
            keep &= mask
    finite, in_range = _position_checks(table)
    dropped = {NON_FINITE_RA_DEC: int(np.count_nonzero(keep & ~finite)),
               RA_DEC_OUT_OF_RANGE: int(np.count_nonzero(keep & finite & ~in_range))}
    keep &= in_range
    if "requireFiniteRaDec" in masks:
        keep &= masks["requireFiniteRaDec"]
    idx = np.flatnonzero(keep)
    # the selected rows in sourceId order, taken from the table once
    return idx[np.argsort(_int(table, "sourceId", null=-1)[idx], kind="stable")], dropped


def _instrumental_magnitudes(sub: pa.Table, flux: np.ndarray, exptime: float,
                             config: BuildStarsConfig) -> tuple[np.ndarray, np.ndarray]:
    """``inst_mag = -2.5 log10(instFlux / exptime)`` and ``inst_mag_err = 2.5/ln10 *
    instFluxErr / instFlux`` [mag], before the jacobian term.

    As in fgcmcal (both its afw and its parquet path), ``instFlux`` here is the flux *without*
    local-background subtraction: the background correction is carried separately in
    ``delta_mag_bkg`` (:func:`_background_correction`).
    """
    flux_err = _float(sub, config.instFluxField + "Err")
    with np.errstate(invalid="ignore", divide="ignore"):
        return _mag(flux / exptime), MAG_ERR_FACTOR * flux_err / flux


def _aperture_magnitudes(sub: pa.Table,
                         config: BuildStarsConfig) -> tuple[np.ndarray, np.ndarray]:
    """``delta_mag_aper = m(inner) - m(outer)`` and ``delta_mag_err_aper``, the quadrature sum
    of the two aperture magnitude errors [mag]; both 99.0 where either is not finite."""
    with np.errstate(invalid="ignore", divide="ignore"):
        inner = _float(sub, config.apertureInnerInstFluxField)
        outer = _float(sub, config.apertureOuterInstFluxField)
        err_inner = MAG_ERR_FACTOR * _float(sub, config.apertureInnerInstFluxField + "Err") / inner
        err_outer = MAG_ERR_FACTOR * _float(sub, config.apertureOuterInstFluxField + "Err") / outer
        delta_aper = _mag(inner) - _mag(outer)
        delta_aper_err = np.sqrt(err_inner**2 + err_outer**2)
    bad_aper = ~(np.isfinite(delta_aper) & np.isfinite(delta_aper_err))
    delta_aper[bad_aper] = BAD_MAG
    delta_aper_err[bad_aper] = BAD_MAG
    return delta_aper, delta_aper_err


def _background_correction(sub: pa.Table, flux: np.ndarray,
                           config: BuildStarsConfig) -> np.ndarray:
    """``delta_mag_bkg = m(instFlux - pi r^2 bkg) - m(instFlux)`` [mag] with r parsed from
    ``instFluxField`` (``apFlux_12_0`` -> 12 pixels) when ``doSubtractLocalBackground``, else
    0."""
    if config.doSubtractLocalBackground:
        return _mag(flux - _local_background(sub, config)) - _mag(flux)
    return np.zeros(sub.num_rows)


def _jacobian(table: pa.Table, sub: pa.Table, config: BuildStarsConfig) -> np.ndarray:
    """The WCS jacobian of the selected rows ``sub`` of ``table``.

    With ``doApplyWcsJacobian`` and the ``localWcs_CDMatrix_*`` columns present, the source's
    pixel area |det CD| divided by a reference pixel area, the median |det CD| over this
    visit's sources on detector ``config.referenceCCD`` (falling back to all of the visit's
    sources; see :func:`reference_pixel_area`).  fgcmcal uses an approximate pixel-area field
    from the camera geometry instead, which streamstars does not have.  1.0 otherwise, and
    where a source's own |det CD| is not finite and positive.
    """
    jacobian = np.ones(sub.num_rows)
    names = set(table.column_names)
    if config.doApplyWcsJacobian and all(c in names for c in CD_MATRIX_COLUMNS):
        ref_area = reference_pixel_area(table, config.referenceCCD)
        if math.isfinite(ref_area) and ref_area > 0:
            area = pixel_area(sub)
            usable = np.isfinite(area) & (area > 0)
            jacobian[usable] = area[usable] / ref_area
    return jacobian


def aperture_corrections(observations: ColumnDict) -> tuple[float, dict[int, float]]:
    """Per-visit and per-detector aperture corrections deltaAper [mag] of the visit catalog.

    The median of ``delta_mag_aper`` over the selected observations, ignoring the 99.0
    markers (and non-finite values).  Per detector the median needs at least
    :data:`MIN_SOURCES_PER_DETECTOR` usable observations, else -9999.  The visit value is
    -9999 when no observation is usable (fgcmcal would produce NaN there).

    Args:
        observations: column dict from :func:`select_observations` (one visit).

    Returns:
        ``(deltaAper, {detector: deltaAperDetector})`` with an entry for every detector that
        has at least one observation.
    """
    delta = np.asarray(observations["delta_mag_aper"], dtype=np.float64)
    err = np.asarray(observations["delta_mag_err_aper"], dtype=np.float64)
    detector = np.asarray(observations["detector"], dtype=np.int64)
    ok = np.isfinite(delta) & (delta != BAD_MAG) & np.isfinite(err) & (err != BAD_MAG)
    visit_value = float(np.median(delta[ok])) if ok.any() else BAD_DETECTOR_VALUE
    per_detector: dict[int, float] = {}
    for det in np.unique(detector):
        use = ok & (detector == det)
        if np.count_nonzero(use) >= MIN_SOURCES_PER_DETECTOR:
            per_detector[int(det)] = float(np.median(delta[use]))
        else:
            per_detector[int(det)] = BAD_DETECTOR_VALUE
    return visit_value, per_detector
