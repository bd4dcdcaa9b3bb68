"""Reference-star magnitudes and reference-to-star matching (fgcmcal ``fgcmLoadReferenceCatalog``).

Pure functions on numpy arrays; reading the catalog is :mod:`streamstars.io.refcat`'s job.

* :func:`reference_magnitudes` turns reference fluxes (nJy) into ``refMag``/``refMagErr``
  (AB, ``99`` = missing) per physical filter, with optional colour terms, and applies the
  reference selector.
* :func:`match_reference_to_stars` gives each reference star its nearest star within the match
  radius, one reference star per star.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.spatial import cKDTree

from .config import ColortermConfig, ReferenceSelectorConfig
from .errors import RefcatError
from .io.refcat import ab_mag_err_from_flux_err, ab_mag_from_flux
from .sky import arcsec_from_chord, unit_vectors

__all__ = [
    "MISSING_MAG",
    "angular_separation_arcsec",
    "match_reference_to_stars",
    "reference_columns_needed",
    "reference_magnitudes",
    "reference_selection",
]

#: Value of ``refMag``/``refMagErr`` for a missing measurement (fgcmcal's convention).
MISSING_MAG = 99.0


def reference_columns_needed(
    filter_map: Mapping[str, str],
    physical_filters: Sequence[str],
    selector: ReferenceSelectorConfig,
    colorterms: Mapping[str, ColortermConfig],
    apply_color_terms: bool,
) -> list[str]:
    """The reference catalog columns (and flag names) :func:`reference_magnitudes` will read."""
    cols: list[str] = []
    for pf in physical_filters:
        if apply_color_terms:
            ct = colorterms.get(pf)
            if ct is None:
                if pf in filter_map:
                    raise RefcatError(_no_colorterm(pf, colorterms))
                continue
            cols += [f"{ct.primary}_flux", f"{ct.primary}_fluxErr"]
            cols += [f"{ct.secondary}_flux", f"{ct.secondary}_fluxErr"]
        elif pf in filter_map:
            cols += [f"{filter_map[pf]}_flux", f"{filter_map[pf]}_fluxErr"]
    if selector.doSignalToNoise:
        cols += [selector.signalToNoise.fluxField, selector.signalToNoise.errField]
    if selector.doFlags:
        cols += [*selector.flags.good, *selector.flags.bad]
    return list(dict.fromkeys(cols))


def _no_colorterm(pf: str, colorterms: Mapping[str, ColortermConfig]) -> str:
    return (
        f"applyColorTerms is true but fgcmLoadReferenceCatalog.colorterms has no entry for "
        f"physical filter {pf!r} (entries: {sorted(colorterms)}); add one or set "
        "applyColorTerms = false"
    )


def _column(ref_columns: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in ref_columns:
        raise RefcatError(
            f"reference catalog column {name!r} is missing (available: {sorted(ref_columns)})"
        )
    return np.asarray(ref_columns[name], dtype=np.float64)


def _flag(
    ref_columns: Mapping[str, np.ndarray], flag_names: Sequence[str], name: str, n: int
) -> np.ndarray:
    """A boolean flag: its own column, else bit ``name`` of the packed ``flags`` column."""
    if name in ref_columns:
        return np.asarray(ref_columns[name], dtype=bool).reshape(n)
    if "flags" in ref_columns and name in flag_names:
        packed = np.asarray(ref_columns["flags"], dtype=bool).reshape(n, -1)
        return packed[:, list(flag_names).index(name)]
    raise RefcatError(
        f"reference selector flag {name!r} is neither a column nor a bit of the packed 'flags' "
        f"column (flag bits: {list(flag_names)})"
    )


def reference_selection(
    ref_columns: Mapping[str, np.ndarray],
    selector: ReferenceSelectorConfig,
    flag_names: Sequence[str] = (),
) -> np.ndarray:
    """fgcmcal's reference selector: the boolean mask of usable reference stars.

    * ``doSignalToNoise``: ``fluxField / errField > minimum`` (non-finite ratios fail);
    * ``doFlags``: every ``good`` flag set and no ``bad`` flag set.  A flag is read from a
      boolean column of that name, else from the packed ``flags`` column (shape (n, nflag), bit
      ``k`` named ``flag_names[k]``, i.e. the ``TFLAG<k+1>`` header cards).
    """
    n = _nrows(ref_columns)
    keep = np.ones(n, dtype=bool)
    if selector.doSignalToNoise:
        sn = selector.signalToNoise
        flux = _column(ref_columns, sn.fluxField)
        err = _column(ref_columns, sn.errField)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = flux / err
        keep &= np.isfinite(ratio) & (ratio > sn.minimum)
    if selector.doFlags:
        for name in selector.flags.good:
            keep &= _flag(ref_columns, flag_names, name, n)
        for name in selector.flags.bad:
            keep &= ~_flag(ref_columns, flag_names, name, n)
    return keep


def _nrows(ref_columns: Mapping[str, np.ndarray]) -> int:
    for key in ("id", "coord_ra", "ra"):
        if key in ref_columns:
            return int(np.shape(ref_columns[key])[0])
    for value in ref_columns.values():
        return int(np.shape(value)[0])
    return 0


def reference_magnitudes(
    ref_columns: Mapping[str, np.ndarray],
    filter_map: Mapping[str, str],
    physical_filters: Sequence[str],
    selector: ReferenceSelectorConfig,
    colorterms: Mapping[str, ColortermConfig],
    apply_color_terms: bool,
    flag_names: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference AB magnitudes per physical filter, fgcmcal style.

    Args:
        ref_columns: reference columns (``<f>_flux``/``<f>_fluxErr`` in nJy, flags ...).
        filter_map: physical filter -> refcat filter (``fgcmLoadReferenceCatalog.filterMap``).
        physical_filters: the output filter order (fgcmcal's ``FILTERNAMES``).
        selector: the reference selector (S/N and flag cuts).
        colorterms: physical filter -> colour term.
        apply_color_terms: use the colour terms instead of the plain ``filterMap`` flux.
        flag_names: bit names of a packed ``flags`` column (``HtmRefcat.flag_names``).

    Returns:
        ``(mag, magErr, keep)``: float32 arrays of shape (n, nfilt) and the selector mask (n,).
        Without colour terms ``mag = -2.5 log10(flux) + 31.4`` of ``filterMap[pf]`` and
        ``magErr = 2.5/ln10 * fluxErr/flux``; with colour terms see
        :func:`_colour_term_magnitudes`.  A physical filter absent from ``filter_map`` gives a
        column of 99; so does any non-finite or non-positive flux, or a non-finite error (both
        mag and magErr are 99).

    Raises:
        RefcatError: a needed column or flag is missing, or a colour term is missing while
            ``apply_color_terms`` is true.
    """
    n, nfilt = _nrows(ref_columns), len(physical_filters)
    mag = np.full((n, nfilt), MISSING_MAG, dtype=np.float64)
    mag_err = np.full((n, nfilt), MISSING_MAG, dtype=np.float64)
    for j, pf in enumerate(physical_filters):
        if pf not in filter_map:
            continue
        if apply_color_terms:
            m, e = _colour_term_magnitudes(ref_columns, pf, colorterms)
        else:
            ref_filter = filter_map[pf]
            flux = _column(ref_columns, f"{ref_filter}_flux")
            m = ab_mag_from_flux(flux)
            e = ab_mag_err_from_flux_err(_column(ref_columns, f"{ref_filter}_fluxErr"), flux)
        good = np.isfinite(m) & np.isfinite(e) & (e >= 0)
        mag[good, j] = m[good]
        mag_err[good, j] = e[good]
    keep = reference_selection(ref_columns, selector, flag_names)
    return mag.astype(np.float32), mag_err.astype(np.float32), keep


def _colour_term_magnitudes(ref_columns: Mapping[str, np.ndarray], physical_filter: str,
                            colorterms: Mapping[str, ColortermConfig]) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Magnitude and error of ``physical_filter`` with its colour term.

    As LSST's ``Colorterm.getCorrectedMagnitudes``: ``mag = p + c0 + c1 (p - s) + c2 (p - s)^2``
    with p, s the primary and secondary AB mags, and the error from the flux error
    ``hypot((1 + c1) primaryFluxErr, c1 secondaryFluxErr)`` over the primary flux.

    Raises:
        RefcatError: no colour term for the filter, or a flux column is missing.
    """
    ct = colorterms.get(physical_filter)
    if ct is None:
        raise RefcatError(_no_colorterm(physical_filter, colorterms))
    p_flux = _column(ref_columns, f"{ct.primary}_flux")
    p_err = _column(ref_columns, f"{ct.primary}_fluxErr")
    s_flux = _column(ref_columns, f"{ct.secondary}_flux")
    s_err = _column(ref_columns, f"{ct.secondary}_fluxErr")
    p = ab_mag_from_flux(p_flux)
    colour = p - ab_mag_from_flux(s_flux)
    m = p + ct.c0 + ct.c1 * colour + ct.c2 * colour * colour
    e = ab_mag_err_from_flux_err(np.hypot((1.0 + ct.c1) * p_err, ct.c1 * s_err), p_flux)
    return m, e


def angular_separation_arcsec(
    ra1_deg: np.ndarray, dec1_deg: np.ndarray, ra2_deg: np.ndarray, dec2_deg: np.ndarray
) -> np.ndarray:
    """Great-circle separation in arcsec (accurate at all scales, via the chord)."""
    chord = np.linalg.norm(
        unit_vectors(ra1_deg, dec1_deg) - unit_vectors(ra2_deg, dec2_deg), axis=1
    )
    return arcsec_from_chord(chord)


def match_reference_to_stars(
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    star_ra: np.ndarray,
    star_dec: np.ndarray,
    star_ids: np.ndarray,
    radius_arcsec: float,
    ref_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Match reference stars to stars (all positions in degrees).

    Rule (deterministic, independent of input order):

    1. every reference star picks its **nearest** star within ``radius_arcsec`` (exact ties:
       the star with the smaller ``star_ids``);
    2. when several reference stars picked the same star, only the **nearest** reference star
       keeps it (exact ties: the smaller ``ref_ids``, default the reference row index); the
       other reference stars stay unmatched (they are *not* given their second-nearest star).

    So every star has at most one reference star and vice versa.

    Returns:
        ``(ref_index, star_index)``: int64 row indices into the reference and star arrays,
        sorted by ``ref_index``.
    """
    ref_xyz = unit_vectors(ref_ra, ref_dec)
    star_xyz = unit_vectors(star_ra, star_dec)
    sids = np.asarray(star_ids)
    rids = np.arange(len(ref_xyz)) if ref_ids is None else np.asarray(ref_ids)
    if sids.shape != (len(star_xyz),) or rids.shape != (len(ref_xyz),):
        raise ValueError("star_ids/ref_ids must have one entry per star/reference star")
    ri, si, dist = _pairs_within(ref_xyz, star_xyz, radius_arcsec)
    # 1. nearest star per reference star (ties -> smaller star id).
    ri, si, dist = _first_of_each(ri, (ri, si, dist), np.lexsort((sids[si], dist, ri)))
    # 2. nearest reference star per star (ties -> smaller reference id).
    ri, si, dist = _first_of_each(si, (ri, si, dist), np.lexsort((rids[ri], dist, si)))
    order = np.argsort(ri, kind="stable")
    return ri[order], si[order]


def _pairs_within(ref_xyz: np.ndarray, star_xyz: np.ndarray,
                  radius_arcsec: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference row, star row, chord) of every pair closer than ``radius_arcsec``."""
    empty = np.zeros(0, dtype=np.int64)
    if len(ref_xyz) == 0 or len(star_xyz) == 0 or not radius_arcsec > 0:
        return empty, empty, np.zeros(0)
    radius = math.radians(radius_arcsec / 3600.0)
    chord_max = 2.0 * math.sin(min(radius, math.pi) / 2.0)
    pairs = cKDTree(ref_xyz).sparse_distance_matrix(
        cKDTree(star_xyz), chord_max * (1 + 1e-9) + 1e-15, output_type="ndarray"
    )
    ri = pairs["i"].astype(np.int64)
    si = pairs["j"].astype(np.int64)
    # Recompute distances here so that ties are compared on identical numbers.
    dist = np.linalg.norm(ref_xyz[ri] - star_xyz[si], axis=1)
    ok = dist <= chord_max
    return ri[ok], si[ok], dist[ok]


def _first_of_each(key: np.ndarray, columns: tuple[np.ndarray, ...],
                   order: np.ndarray) -> tuple[np.ndarray, ...]:
    """The rows of ``columns`` that come first, in ``order``, among the rows of equal
    ``key`` (``order`` sorts by ``key`` first)."""
    key = key[order]
    first = np.ones(key.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    return tuple(column[order][first] for column in columns)
