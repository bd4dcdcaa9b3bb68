"""The report's data, joined once: every observation with its band, visit row and star.

Observations are grouped by star in a snapshot (star ``i`` owns the next ``n_obs[i]`` rows), so
the owning star of every row is ``repeat(arange(n_stars), n_obs)``; the band of a row is the
band of its visit.  Everything here is vectorised over observations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamstars.report.inputs import ReportInputError, SnapshotData, StoreFacts

__all__ = ["BAND_ORDER", "ReportCatalog", "join_catalog"]

#: Bands are shown in this order when present; other bands follow, sorted.
BAND_ORDER = ("u", "g", "r", "i", "z", "y")


@dataclass
class ReportCatalog:
    """Per-visit, per-star and per-observation arrays of one report.

    Attributes:
        bands: the bands present, in display order; ``*_band`` arrays index into it.
        visit: int64 visit ids (ascending), with ``visit_band``, ``visit_mjd`` [d],
            ``visit_n_selected`` (float; NaN for a visit the store has no record of),
            ``visit_psf_fwhm`` [arcsec], ``visit_sky_background`` [counts/pixel; NaN when
            unknown], ``visit_delta_aper`` [mag], ``visit_physical_filter``.
        star_id, star_ra, star_dec: the stars (degrees).
        obs_star: index of each observation's star; ``obs_visit``: index of its visit row;
            ``obs_band``: its band; ``obs_ra``/``obs_dec`` [deg], ``obs_mag`` and
            ``obs_mag_err`` [instrumental mag per second of exposure].
        counts: (n_stars, n_bands) observations of each star in each band.
        reference_mag, reference_mag_err: (n_stars, n_bands) reference magnitudes of the
            matched stars in each band (NaN where unmatched or missing), or None without a
            reference catalog.
        match_radius_arcsec: the association's matching radius.
        n_visits_without_record: snapshot visits that the store has no record of.
    """

    bands: tuple[str, ...]
    visit: np.ndarray
    visit_band: np.ndarray
    visit_mjd: np.ndarray
    visit_n_selected: np.ndarray
    visit_psf_fwhm: np.ndarray
    visit_sky_background: np.ndarray
    visit_delta_aper: np.ndarray
    visit_physical_filter: np.ndarray
    star_id: np.ndarray
    star_ra: np.ndarray
    star_dec: np.ndarray
    obs_star: np.ndarray
    obs_visit: np.ndarray
    obs_band: np.ndarray
    obs_ra: np.ndarray
    obs_dec: np.ndarray
    obs_mag: np.ndarray
    obs_mag_err: np.ndarray
    counts: np.ndarray
    reference_mag: np.ndarray | None
    reference_mag_err: np.ndarray | None
    match_radius_arcsec: float
    n_visits_without_record: int

    @property
    def n_stars(self) -> int:
        """Number of stars."""
        return len(self.star_id)

    def band_visits(self, band: int) -> np.ndarray:
        """Indices of the visits of band code ``band``."""
        return np.flatnonzero(self.visit_band == band)


def _ordered_bands(names: np.ndarray) -> tuple[str, ...]:
    present = set(names.tolist())
    known = [b for b in BAND_ORDER if b in present]
    return tuple(known + sorted(present - set(known)))


def _visit_bands(visits: dict[str, np.ndarray],
                 facts: StoreFacts) -> tuple[np.ndarray, np.ndarray]:
    """The band of each snapshot visit (store record, else through its physical filter) and
    the index of its store record (-1: none)."""
    visit = visits["visit"]
    physical = visits["physicalFilter"].astype(str)
    pos = np.searchsorted(facts.visit, visit)
    pos_clipped = np.minimum(pos, max(len(facts.visit) - 1, 0))
    found = (pos < len(facts.visit)) & (facts.visit[pos_clipped] == visit)
    band = np.where(found, facts.band[pos_clipped], "").astype(object)
    if not found.all():
        # a visit applied after the store's records were read (a writer goes on): its band is
        # the one its physical filter has in other visits, else the configured mapping
        learned = dict(zip(physical[found].tolist(), band[found].tolist(), strict=True))
        mapping = facts.config.physicalFilterMap
        for i in np.flatnonzero(~found):  # loop over the few unknown visits
            band[i] = learned.get(physical[i], mapping.get(physical[i], physical[i]))
    return band.astype(str), np.where(found, pos_clipped, -1)


def join_catalog(snapshot: SnapshotData, facts: StoreFacts) -> ReportCatalog:
    """Join a snapshot's columns with the store's per-visit facts.

    Raises:
        ReportInputError: an observation names a visit absent from the visit catalog.
    """
    order = np.argsort(snapshot.visits["visit"], kind="stable")
    visits = {name: values[order] for name, values in snapshot.visits.items()}
    band_names, record = _visit_bands(visits, facts)
    bands = _ordered_bands(band_names)
    visit_band = np.array([bands.index(b) for b in band_names.tolist()], dtype=np.int16)
    n_selected = np.where(record >= 0, facts.n_selected[np.maximum(record, 0)].astype(float),
                          np.nan)
    sky = np.asarray(visits["skyBackground"], dtype=np.float64)
    sky = np.where(sky < 0, np.nan, sky)  # -1: no background known (visit metadata convention)

    obs = snapshot.observations
    obs_visit = np.searchsorted(visits["visit"], obs["visit"])
    bad = (obs_visit >= len(visits["visit"])) | (
        visits["visit"][np.minimum(obs_visit, len(visits["visit"]) - 1)] != obs["visit"]) \
        if len(visits["visit"]) else np.ones(len(obs["visit"]), bool)
    if bad.any():
        missing = np.unique(obs["visit"][bad])
        raise ReportInputError(
            f"snapshot {snapshot.path}: observations of visit(s) {missing[:5].tolist()} have no "
            "row in fgcmVisitCatalog.parquet; write the snapshot again")
    n_obs = snapshot.stars["n_obs"].astype(np.int64)
    n_stars = len(n_obs)
    obs_star = np.repeat(np.arange(n_stars, dtype=np.int64), n_obs)
    obs_band = visit_band[obs_visit]
    n_bands = len(bands)
    counts = np.bincount(obs_star * n_bands + obs_band, minlength=n_stars * n_bands) \
        .reshape(n_stars, n_bands)

    reference_mag = reference_mag_err = None
    if snapshot.reference is not None:
        reference_mag, reference_mag_err = _reference_by_band(snapshot, visits, band_names,
                                                              bands)
    return ReportCatalog(
        bands=bands, visit=visits["visit"], visit_band=visit_band,
        visit_mjd=np.asarray(visits["mjd"], dtype=np.float64), visit_n_selected=n_selected,
        visit_psf_fwhm=np.asarray(visits["psfFwhm"], dtype=np.float64),
        visit_sky_background=sky,
        visit_delta_aper=np.asarray(visits["deltaAper"], dtype=np.float64),
        visit_physical_filter=visits["physicalFilter"].astype(str),
        star_id=snapshot.stars["fgcm_id"], star_ra=snapshot.stars["ra"],
        star_dec=snapshot.stars["dec"], obs_star=obs_star, obs_visit=obs_visit,
        obs_band=obs_band, obs_ra=obs["ra"], obs_dec=obs["dec"],
        obs_mag=obs["inst_mag"], obs_mag_err=obs["inst_mag_err"], counts=counts,
        reference_mag=reference_mag, reference_mag_err=reference_mag_err,
        match_radius_arcsec=float(facts.config.matchRadius),
        n_visits_without_record=int(np.count_nonzero(record < 0)))


def _reference_by_band(snapshot: SnapshotData, visits: dict[str, np.ndarray],
                       band_names: np.ndarray,
                       bands: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(n_stars, n_bands) reference magnitudes: the ``refMag`` column of a band is the one of
    a physical filter of that band's visits (FILTERNAMES are physical filters)."""
    assert snapshot.reference is not None
    physical = visits["physicalFilter"].astype(str)
    band_of_filter = dict(zip(physical.tolist(), band_names.tolist(), strict=True))
    n_stars = len(snapshot.stars["fgcm_id"])
    mag = np.full((n_stars, len(bands)), np.nan, dtype=np.float32)
    err = np.full((n_stars, len(bands)), np.nan, dtype=np.float32)
    star_id = snapshot.stars["fgcm_id"]
    ref_id = snapshot.reference["fgcm_id"]
    row = np.searchsorted(star_id, ref_id)
    ok = (row < n_stars) & (star_id[np.minimum(row, max(n_stars - 1, 0))] == ref_id) \
        if n_stars else np.zeros(len(ref_id), bool)
    for column, physical_filter in enumerate(snapshot.reference_filters):
        band = band_of_filter.get(physical_filter)
        if band is None or band not in bands:
            continue
        values = snapshot.reference["refMag"][:, column]
        errors = snapshot.reference["refMagErr"][:, column]
        good = ok & np.isfinite(values) & (values < 90.0)  # 99 = missing (fgcm convention)
        mag[row[good], bands.index(band)] = values[good]
        err[row[good], bands.index(band)] = errors[good]
    return mag, err
