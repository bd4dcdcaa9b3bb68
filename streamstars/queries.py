"""``streamstars star`` and ``streamstars cone``: what the snapshot would publish for a few stars,
derived from the store pixels around them (docs/queries.md).

The snapshot's decision about a star depends on a bounded neighbourhood
(:func:`streamstars.margins.chain_reach_arcsec`: its component, the cross-band merge chain,
the stars within isolationRadius, the members within matchRadius) — except the density cut,
which ranks every star of the star's ``densityCutNside`` pixel.  So a query runs the
snapshot's own steps (:func:`streamstars.snapshot.build_stars`) on the observations and the
candidates of the store pixels covering the query area grown by that reach plus one
``matchRadius`` and the largest component radius (a candidate is stored under the pixel of
its component's centre), keeps the stars the snapshot publishes inside the area (a shard's
own stars), and:

* density cut: the stars of each ``densityCutNside`` pixel the area touches are counted after
  the cross-band merge and the isolation, which need only the candidates (an upper bound of
  its published stars); where that count exceeds
  ``densityCutMaxPerPixel`` the whole density pixel (grown by the same reach) is derived, so
  the ranking is the snapshot's; elsewhere no star of the area can be cut;
* the reserve flag is the seeded hash of the id (:func:`streamstars.snapshot.reserve_flags`,
  inside ``build_stars``).

A sharded state is read under its visit boundary (each visit seen in all of its shards or in
none), one read transaction per shard touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import healpy as hp
import numpy as np

from streamstars.columns import OBSERVATION_DTYPES, ColumnDict, concat, take
from streamstars.config import BuildStarsConfig
from streamstars.errors import ConfigError, StarNotFoundError, StateError
from streamstars.margins import chain_reach_arcsec
from streamstars.sky import arcsec_from_chord, chord_from_arcsec, unit_vectors
from streamstars.snapshot import (
    ShardOwnership,
    StarCatalog,
    build_stars,
    isolated,
    merge_bands,
    region_candidates,
)
from streamstars.state import StateDirectory, Transaction

#: The largest cone radius [arcsec] a query derives (1 degree): larger areas are what a
#: snapshot is for.
MAX_CONE_RADIUS_ARCSEC = 3600.0
#: Slack [arcsec] on every region radius: a region is a superset, never short.
_SLACK_ARCSEC = 0.01


@dataclass
class QueryResult:
    """The stars a query found, as the snapshot publishes them, and what was read.

    Attributes:
        stars: ids, positions [deg], ``n_obs``, ``obj_flag`` and every observation column,
            grouped by star in id order, each star's sorted by (visit, sourceId).
        band: the band of each observation.
        mjd: the MJD of each observation's visit.
        shards: the shards read (nest pixels at ``shardNside``).
        pixels_read: store pixels whose records were read, summed over the shards.
        density_pixels_derived: density-cut pixels derived whole (their cut may apply).
    """

    stars: StarCatalog
    band: np.ndarray
    mjd: np.ndarray
    shards: list[int] = field(default_factory=list)
    pixels_read: int = 0
    density_pixels_derived: int = 0

    def per_band_counts(self) -> list[dict[str, int]]:
        """Per star, its number of observations in each band (bands with some only)."""
        out: list[dict[str, int]] = []
        start = 0
        for n in self.stars.n_obs.tolist():
            names, counts = np.unique(self.band[start:start + n], return_counts=True)
            out.append({str(b): int(c) for b, c in zip(names, counts, strict=True)})
            start += n
        return out


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def _disc_pixels(nside: int, centre: np.ndarray, radius_arcsec: float) -> np.ndarray:
    """Nest pixels at ``nside`` touching a disc (a superset)."""
    radius = min(math.radians(radius_arcsec / 3600.0), math.pi)
    return np.asarray(hp.query_disc(nside, centre, radius, inclusive=True, nest=True),
                      dtype=np.int64)


def _pixel_pixels(nside: int, pixel: int, target_nside: int, grow_arcsec: float) -> np.ndarray:
    """Nest pixels at ``target_nside`` touching nest pixel ``pixel`` of ``nside`` grown by
    ``grow_arcsec`` (a superset: the disc around the pixel's centre that holds it)."""
    centre = np.asarray(hp.pix2vec(nside, pixel, nest=True), dtype=np.float64)
    radius = math.degrees(hp.max_pixrad(nside)) * 3600.0 + grow_arcsec
    return _disc_pixels(target_nside, centre, radius)


def _check_cone(ra: float, dec: float, radius_arcsec: float) -> None:
    if not (math.isfinite(ra) and math.isfinite(dec) and math.isfinite(radius_arcsec)):
        raise ConfigError(f"cone ({ra}, {dec}, {radius_arcsec}): RA, Dec and the radius must "
                         "be finite numbers")
    if not -90.0 <= dec <= 90.0:
        raise ConfigError(f"cone Dec {dec} is outside [-90, 90] degrees")
    if not 0.0 < radius_arcsec <= MAX_CONE_RADIUS_ARCSEC:
        raise ConfigError(f"cone radius {radius_arcsec} arcsec must be > 0 and at most "
                         f"{MAX_CONE_RADIUS_ARCSEC:g} arcsec (larger areas: write a snapshot)")


# ---------------------------------------------------------------------------------------------
# one shard
# ---------------------------------------------------------------------------------------------
@dataclass
class _Region:
    stars: StarCatalog
    band: np.ndarray
    pixels_read: int
    density_derived: int


def _rmax_arcsec(tx: Transaction, config: BuildStarsConfig) -> float:
    """The largest component radius of the primary bands [arcsec]."""
    chord = max((tx.components.read_max_rmax(b) for b in config.primaryBands), default=0.0)
    return float(arcsec_from_chord(np.asarray(min(chord, 2.0))))


def _density_counts(tx: Transaction, config: BuildStarsConfig, density_pixels: np.ndarray,
                    grow_arcsec: float) -> np.ndarray:
    """Per density-cut pixel: how many stars lie in it after the cross-band merge and the
    isolation (steps 2-3, which need only the candidates: those of the store pixels around it
    grown by ``grow_arcsec``), at least its number of published stars."""
    if not len(density_pixels):
        return np.zeros(0, dtype=np.int64)
    pixels = np.unique(np.concatenate(
        [_pixel_pixels(config.densityCutNside, int(p), tx.config.storeNside, grow_arcsec)
         for p in density_pixels.tolist()]))
    candidates = {band: region_candidates(tx, band, pixels) for band in config.primaryBands}
    star_id, star_v = merge_bands(candidates, config.primaryBands,
                                  chord_from_arcsec(config.matchRadius))
    _, star_v = isolated(star_id, star_v, chord_from_arcsec(config.isolationRadius))
    if not len(star_v):
        return np.zeros(len(density_pixels), dtype=np.int64)
    where = np.sort(hp.vec2pix(config.densityCutNside, star_v[:, 0], star_v[:, 1],
                               star_v[:, 2], nest=True))
    return (np.searchsorted(where, density_pixels, side="right")
            - np.searchsorted(where, density_pixels, side="left"))


def derive_region(tx: Transaction, config: BuildStarsConfig,
                  pixels: np.ndarray) -> tuple[StarCatalog, np.ndarray]:
    """The snapshot's steps 1-7 (:func:`streamstars.snapshot.build_stars`) on the candidates
    and observations of store ``pixels`` only.  Exact for the stars whose chain reach
    (:func:`~streamstars.margins.chain_reach_arcsec`) lies inside the pixels and whose
    density-cut pixel does (or is not cut).  Returns the stars (observations with every
    column) and the band of each of their observations."""
    pixels = np.unique(np.asarray(pixels, dtype=np.int64))
    candidates = {band: region_candidates(tx, band, pixels) for band in config.primaryBands}
    parts: list[ColumnDict] = []
    codes: list[np.ndarray] = []
    names = tx.observations.bands()
    for code, band in enumerate(names):
        part = tx.observations.rows(band, pixels)
        parts.append(part)
        codes.append(np.full(len(part["source_id"]), code, dtype=np.int16))
    observations = concat(parts, OBSERVATION_DTYPES)
    band_code = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int16)
    stars, rows = build_stars(candidates, observations, band_code, names, config)
    band = np.asarray(names, dtype=object)[band_code[rows]] if len(rows) else \
        np.zeros(0, dtype=object)
    return stars, band


def _shard_cone(tx: Transaction, config: BuildStarsConfig, shard: ShardOwnership,
                centre: np.ndarray, radius_arcsec: float) -> _Region:
    """The stars shard ``shard`` publishes within ``radius_arcsec`` of ``centre``."""
    rmax = _rmax_arcsec(tx, config)
    grow = chain_reach_arcsec(config) + config.matchRadius + rmax + _SLACK_ARCSEC
    store_nside = tx.config.storeNside
    regions = [_disc_pixels(store_nside, centre, radius_arcsec + grow)]
    density = _disc_pixels(config.densityCutNside, centre, radius_arcsec + _SLACK_ARCSEC)
    crowded = density[_density_counts(tx, config, density, grow) >
                      config.densityCutMaxPerPixel]
    regions += [_pixel_pixels(config.densityCutNside, int(p), store_nside, grow)
                for p in crowded.tolist()]
    pixels = np.unique(np.concatenate(regions))
    stars, band = derive_region(tx, config, pixels)
    keep = shard.owns(stars.ra, stars.dec)
    keep &= _within(stars, centre, radius_arcsec)
    stars, band = _select(stars, band, keep)
    return _Region(stars, band, len(pixels), len(crowded))


def _within(stars: StarCatalog, centre: np.ndarray, radius_arcsec: float) -> np.ndarray:
    if not len(stars.star_id):
        return np.zeros(0, dtype=bool)
    v = unit_vectors(stars.ra, stars.dec)
    return np.sqrt(((v - centre) ** 2).sum(axis=1)) <= chord_from_arcsec(radius_arcsec)


def _select(stars: StarCatalog, band: np.ndarray,
            keep: np.ndarray) -> tuple[StarCatalog, np.ndarray]:
    member_of = np.repeat(np.arange(len(stars.star_id)), stars.n_obs)
    rows = keep[member_of]
    return StarCatalog(stars.star_id[keep], stars.ra[keep], stars.dec[keep], stars.n_obs[keep],
                       stars.obj_flag[keep], take(stars.observations, rows)), band[rows]


# ---------------------------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------------------------
def _check_not_empty(state: StateDirectory) -> list[int]:
    shards = [pixel for _, pixel in state.shards()]
    if not shards:
        raise StateError(f"{state.path} holds no visits yet: nothing to query (apply visits "
                         "with `streamstars backfill` or `streamstars run`)")
    return shards


def _cone_locked(state: StateDirectory, ra: float, dec: float,
                 radius_arcsec: float) -> QueryResult:
    existing = set(_check_not_empty(state))
    centre = unit_vectors(np.array([ra]), np.array([dec]))[0]
    touched = [int(p) for p in _disc_pixels(state.shard_nside, centre,
                                            radius_arcsec + _SLACK_ARCSEC).tolist()
               if int(p) in existing]
    config = state.config
    catalogs, bands, mjds = [], [], []
    pixels_read = density_derived = 0
    for pixel in sorted(touched):
        store = state.open_shard(pixel)
        owner = ShardOwnership(state.shard_order, pixel, state.shard_margin)
        with store.read(buffers=True) as tx:
            region = _shard_cone(tx, config, owner, centre, radius_arcsec)
            mjds.append(_visit_mjd(tx, region.stars.observations["visit"]))
        catalogs.append(region.stars)
        bands.append(region.band)
        pixels_read += region.pixels_read
        density_derived += region.density_derived
    stars, band, mjd = _merge(catalogs, bands, mjds)
    return QueryResult(stars, band, mjd, sorted(touched), pixels_read, density_derived)


def _visit_mjd(tx: Transaction, visits: np.ndarray) -> np.ndarray:
    """MJD of each observation's visit (from the visit records)."""
    unique, inverse = np.unique(visits, return_inverse=True)
    values = []
    for visit in unique.tolist():
        record = tx.visits.get(visit)
        mjd = None if record is None else record.metadata.get("mjd")
        values.append(math.nan if mjd is None else float(mjd))
    return np.asarray(values, dtype=np.float64)[inverse] if len(unique) else \
        np.zeros(0, dtype=np.float64)


def _merge(catalogs: list[StarCatalog], bands: list[np.ndarray],
           mjds: list[np.ndarray]) -> tuple[StarCatalog, np.ndarray, np.ndarray]:
    """The stars of several shards in id order (each published by one shard only)."""
    if not catalogs:
        empty = StarCatalog(np.zeros(0, np.int64), np.zeros(0), np.zeros(0),
                            np.zeros(0, np.int32), np.zeros(0, np.int32),
                            concat([], OBSERVATION_DTYPES))
        return empty, np.zeros(0, dtype=object), np.zeros(0)
    star_id = np.concatenate([c.star_id for c in catalogs])
    n_obs = np.concatenate([c.n_obs for c in catalogs])
    order = np.argsort(star_id, kind="stable")
    starts = np.concatenate([[0], np.cumsum(n_obs)[:-1]]).astype(np.int64)
    rows = (np.concatenate([np.arange(s, s + n) for s, n in
                            zip(starts[order].tolist(), n_obs[order].tolist(), strict=True)])
            if len(order) else np.zeros(0, dtype=np.int64)).astype(np.int64)
    observations = take(concat([c.observations for c in catalogs], OBSERVATION_DTYPES), rows)
    stars = StarCatalog(star_id[order], np.concatenate([c.ra for c in catalogs])[order],
                        np.concatenate([c.dec for c in catalogs])[order], n_obs[order],
                        np.concatenate([c.obj_flag for c in catalogs])[order], observations)
    return stars, np.concatenate(bands)[rows], np.concatenate(mjds)[rows]


def cone_query(state: StateDirectory, ra: float, dec: float,
               radius_arcsec: float) -> QueryResult:
    """The stars the snapshot would publish within ``radius_arcsec`` of (``ra``, ``dec``)
    [deg], with every observation, read under the state's visit boundary.

    Raises:
        ConfigError: a malformed cone (non-finite values, Dec outside [-90, 90], radius not in
            (0, :data:`MAX_CONE_RADIUS_ARCSEC`]).
        StateError: a state without visits.
    """
    _check_cone(ra, dec, radius_arcsec)
    with state.visit_boundary(exclusive=False):
        return _cone_locked(state, ra % 360.0, dec, radius_arcsec)


def _locate(state: StateDirectory, source_id: int) -> tuple[int, float, float] | None:
    """(visit, ra, dec) of the stored observation ``source_id`` (None: not stored)."""
    for pixel in _check_not_empty(state):
        store = state.open_shard(pixel)
        with store.read() as tx:
            if not tx.meta.source_index_complete():
                raise StateError(f"shard {state.shard_order}/{pixel} of {state.path} has no "
                                 "complete sourceId index (written by an older streamstars): "
                                 "run `streamstars backfill` on the state once to build it")
            for visit in tx.source_ids.visits_of(source_id):
                record = tx.visits.get(visit)
                if record is None:
                    continue
                rows = tx.observations.visit_rows(record.band, record.pixels, visit)
                hit = np.flatnonzero(rows["source_id"] == source_id)
                if len(hit):
                    return visit, float(rows["ra"][hit[0]]), float(rows["dec"][hit[0]])
    return None


def star_query(state: StateDirectory, star_id: int) -> QueryResult:
    """The star the snapshot would publish with ``fgcm_id`` ``star_id``, with every
    observation, read under the state's visit boundary.

    The id is the smallest sourceId of the star's members: the shards' sourceId indexes give
    the visit and position of that observation; the star lies within matchRadius of it.

    Raises:
        StarNotFoundError: no published star has this id (the message says whether the
            sourceId is stored, and the star it belongs to).
        StateError: a state without visits.
    """
    with state.visit_boundary(exclusive=False):
        found = _locate(state, star_id)
        if found is None:
            raise StarNotFoundError(
                f"no star with fgcm_id {star_id} in {state.path}: no stored observation has "
                "this sourceId (a star's fgcm_id is the smallest sourceId of its members)")
        visit, ra, dec = found
        result = _cone_locked(state, ra, dec, state.config.matchRadius + _SLACK_ARCSEC)
    keep = result.stars.star_id == star_id
    if not keep.any():
        member = np.flatnonzero(result.stars.observations["source_id"] == star_id)
        if len(member):
            owner = np.searchsorted(np.cumsum(result.stars.n_obs), member[0], side="right")
            what = (f"it is an observation of star {int(result.stars.star_id[owner])}, whose "
                    "id is a smaller sourceId")
        else:
            what = ("it belongs to no published star (no star within matchRadius survives "
                    "the isolation, requiredBands or density cuts)")
        raise StarNotFoundError(f"no star with fgcm_id {star_id} in {state.path}: sourceId "
                                f"{star_id} is stored (visit {visit}) but {what}")
    stars, band = _select(result.stars, result.band, keep)
    member_of = np.repeat(keep, result.stars.n_obs)
    return QueryResult(stars, band, result.mjd[member_of], result.shards,
                       result.pixels_read, result.density_pixels_derived)


def observation_records(result: QueryResult, index: int) -> list[dict[str, object]]:
    """The observations of star ``index`` of ``result`` as JSON-able objects (visit order)."""
    start = int(result.stars.n_obs[:index].sum())
    stop = start + int(result.stars.n_obs[index])
    obs = result.stars.observations
    out: list[dict[str, object]] = []
    for row in range(start, stop):
        entry: dict[str, object] = {"visit": int(obs["visit"][row]),
                                    "band": str(result.band[row]),
                                    "mjd": _json_float(result.mjd[row])}
        for name in OBSERVATION_DTYPES:
            if name in ("visit",):
                continue
            value = obs[name][row]
            entry[name] = (bool(value) if obs[name].dtype == np.bool_ else
                           int(value) if obs[name].dtype.kind == "i" else _json_float(value))
        out.append(entry)
    return out


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
