"""``streamstars star`` and ``streamstars cone``: what the snapshot would publish for a few stars,
derived from the store pixels around them (docs/queries.md).

The snapshot's decision about a star depends on a bounded neighbourhood
(:func:`streamstars.margins.chain_reach_arcsec`: its component, the cross-band merge chain,
the stars within isolationRadius, the members within matchRadius) — except the density cut,
which ranks every star of the star's ``densityCutNside`` pixel.  So a query runs the
snapshot's own steps (:mod:`streamstars.snapshot`) on:

* the candidates of the store pixels covering the query area grown by that reach plus one
  ``matchRadius`` and the largest component radius (a candidate is stored under the pixel of
  its component's centre): cross-band merge and isolation, exact for the stars in the area;
* the observations of the fine pixels (``storeNside * 64``) touching the area grown by
  ``matchRadius`` (every member of a star of the area), every column: memberships, published
  ids, requiredBands;
* density cut: for each ``densityCutNside`` pixel holding a star of the area, the pixel's
  ranking (the (hash, id) of the last star it keeps, or "keeps all") — from the cache
  (:class:`DensityCache`, per shard generation), else derived: its stars from the
  candidates around it, their ids and required bands from the identity and position columns
  of the fine pixels around each of them;
* the reserve flag is the seeded hash of the id (:func:`streamstars.snapshot.reserve_flags`).

A sharded state is read under its visit boundary (each visit seen in all of its shards or in
none), one read transaction per shard touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamstars.association.fof import centres_of
from streamstars.columns import OBSERVATION_DTYPES, ColumnDict, concat, take
from streamstars.config import BuildStarsConfig, to_dict
from streamstars.errors import ConfigError, StarNotFoundError, StateError
from streamstars.margins import chain_reach_arcsec
from streamstars.shards import MAX_NSIDE, pixels_within
from streamstars.sky import (
    arcsec_from_chord,
    chord_from_arcsec,
    disc_pixels,
    max_pixel_radius,
    neighbours,
    pixel_vectors,
    pixels_in_discs,
    pixels_of,
    radec_from_vectors,
    resolution,
    unit_vectors,
)
from streamstars.snapshot import (
    DENSITY_SALT,
    NO_ID,
    ShardOwnership,
    StarCatalog,
    grouped_members,
    has_required_bands,
    isolated,
    memberships,
    merge_bands,
    published_ids,
    region_candidates,
    reserve_flags,
    seeded_hash,
)
from streamstars.state import StateDirectory, Transaction
from streamstars.state.schema import FINE_FACTOR, FINE_SHIFT, POSITION_DTYPES
from streamstars.state.tables import FineRows

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
        density_pixels_derived: density-cut pixels whose cut was derived (ranked) by this
            query.
        density_pixels_cached: density-cut pixels whose cut came from the query cache.
    """

    stars: StarCatalog
    band: np.ndarray
    mjd: np.ndarray
    shards: list[int] = field(default_factory=list)
    pixels_read: int = 0
    density_pixels_derived: int = 0
    density_pixels_cached: int = 0

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
    return disc_pixels(centre, math.radians(radius_arcsec / 3600.0), nside)


def _pixel_pixels(nside: int, pixel: int, target_nside: int, grow_arcsec: float) -> np.ndarray:
    """Nest pixels at ``target_nside`` touching nest pixel ``pixel`` of ``nside`` grown by
    ``grow_arcsec`` (a superset: the disc around the pixel's centre that holds it)."""
    centre = pixel_vectors(np.array([pixel]), nside)[0]
    radius = math.degrees(max_pixel_radius(nside)) * 3600.0 + grow_arcsec
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
    density_cached: int


def _rmax_arcsec(tx: Transaction, config: BuildStarsConfig) -> float:
    """The largest component radius of the primary bands [arcsec]."""
    chord = max((tx.components.read_max_rmax(b) for b in config.primaryBands), default=0.0)
    return float(arcsec_from_chord(np.asarray(min(chord, 2.0))))


def _grow_arcsec(tx: Transaction, config: BuildStarsConfig) -> float:
    """How far [arcsec] around a query area (or a density pixel) the candidates are read:
    the chain reach, one matchRadius, the largest component radius and the slack."""
    return chain_reach_arcsec(config) + config.matchRadius + _rmax_arcsec(tx, config) \
        + _SLACK_ARCSEC


def _stars_of(tx: Transaction, config: BuildStarsConfig, pixels: np.ndarray,
              near: tuple[int, int, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-3 (cross-band merge, isolation) on the candidates of store ``pixels``: the
    candidate ids and unit vectors of the stars that survive them.

    ``near`` = (nside, pixel, margin [arcsec]): only the candidates that may lie within the
    margin of that nest pixel take part (:func:`_near_pixel`) — exact for the stars of the
    pixel when the margin is at least the chain reach plus one matchRadius."""
    candidates = {band: region_candidates(tx, band, pixels) for band in config.primaryBands}
    if near is not None:
        candidates = {band: take(cand, _near_pixel(centres_of(cand), *near))
                      for band, cand in candidates.items()}
    star_id, star_v = merge_bands(candidates, config.primaryBands,
                                  chord_from_arcsec(config.matchRadius))
    return isolated(star_id, star_v, chord_from_arcsec(config.isolationRadius))


def _near_pixel(v: np.ndarray, nside: int, pixel: int, margin_arcsec: float) -> np.ndarray:
    """Per unit vector (n, 3): whether it may lie within ``margin_arcsec`` of nest pixel
    ``pixel`` at ``nside`` (a superset: never False for one that does).

    Decided on the finest level whose pixels are at least 8x the margin (everything within
    the margin of a point lies in its pixel there or in a neighbour, as in
    :func:`streamstars.sky.pixels_near`): the point's pixel or a neighbour descends from
    ``pixel``."""
    margin = math.radians(margin_arcsec / 3600.0)
    levels = 0
    while (nside << (levels + 1)) <= MAX_NSIDE \
            and resolution(nside << (levels + 1)) / 8.0 >= margin:
        levels += 1
    fine_nside = nside << levels
    if resolution(fine_nside) / 8.0 < margin or not len(v):
        return np.ones(len(v), dtype=bool)
    fine = pixels_of(v, fine_nside)
    shift = 2 * levels
    near = (fine >> shift) == pixel
    todo = np.flatnonzero(~near)
    if len(todo):
        around = neighbours(fine[todo], fine_nside)
        near[todo] = ((around >= 0) & ((around >> shift) == pixel)).any(axis=0)
    return near


def _fine_pixels_near(store_nside: int, star_v: np.ndarray, chord: float) -> np.ndarray:
    """Fine pixels (nest, ``storeNside * FINE_FACTOR``) touching the discs of chord radius
    ``chord`` around ``star_v`` (a superset): each star's fine pixel and its neighbours when
    the discs are far smaller than a fine pixel (matchRadius 1" against 13"), else one
    ``query_disc`` per star."""
    nside = store_nside * FINE_FACTOR
    if not len(star_v):
        return np.zeros(0, dtype=np.int64)
    if arcsec_from_chord(np.asarray(chord)) > 0.1 * math.degrees(max_pixel_radius(nside)) * 3600:
        return pixels_in_discs(star_v, np.full(len(star_v), chord), nside)
    own = pixels_of(star_v, nside)
    around = neighbours(own, nside).ravel()
    found = np.concatenate([own, around[around >= 0]])
    return np.unique(found)


def _observations(tx: Transaction, fine: np.ndarray, columns: dict[str, np.dtype] | None
                  ) -> tuple[ColumnDict, np.ndarray, list[str]]:
    """The stored observations in fine pixels ``fine`` (``columns``, default all), the band
    of each (an index into the band names) and the band names."""
    names = tx.observations.bands()
    schema = OBSERVATION_DTYPES if columns is None else columns
    parts: list[ColumnDict] = []
    codes: list[np.ndarray] = []
    for code, band in enumerate(names):
        part = tx.observations.rows_in_fine_pixels(band, fine, schema)
        parts.append(part)
        codes.append(np.full(len(part["source_id"]), code, dtype=np.int16))
    band_code = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int16)
    return concat(parts, schema), band_code, names


def _judge(star_v: np.ndarray, subset: np.ndarray, observations: ColumnDict,
           band_code: np.ndarray, names: list[str],
           config: BuildStarsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 4-5 for the stars ``subset`` (bool per star) of ``star_v``: the owner of each
    observation (restricted to the subset, else -1), each star's published id and whether it
    has members and its required bands.  Exact for a star of the subset when ``star_v`` holds
    every star near its members and ``observations`` every observation within matchRadius of
    it."""
    owner = memberships(star_v, observations, chord_from_arcsec(config.matchRadius))
    owned = owner >= 0
    owned[owned] = subset[owner[owned]]
    owner = np.where(owned, owner, -1)
    star_id = published_ids(len(star_v), owner, observations["source_id"])
    keep = subset & (star_id != NO_ID)
    keep &= has_required_bands(owner, band_code, names, len(star_v), config)
    return owner, star_id, keep


def _density_threshold(tx: Transaction, config: BuildStarsConfig, density_pixel: int,
                       grow_arcsec: float) -> tuple[int, int] | None:
    """The density cut of one ``densityCutNside`` pixel as this store's snapshot makes it:
    None if it keeps every star, else the (seeded hash, id) of the last star it keeps (rank
    ``densityCutMaxPerPixel - 1``): a star survives iff its (hash, id) is not larger.

    The pixel's stars come from the candidates around it (store pixels grown by
    ``grow_arcsec``, only the candidates within that of the pixel); their published ids and
    required bands from the observations near them, read in sourceId order until every id is
    settled (:func:`_ids_in_source_order`)."""
    nside = config.densityCutNside
    pixels = _pixel_pixels(nside, density_pixel, tx.config.storeNside, grow_arcsec)
    _, star_v = _stars_of(tx, config, pixels, (nside, density_pixel, grow_arcsec))
    inside = pixels_of(star_v, nside) == density_pixel
    cap = config.densityCutMaxPerPixel
    if int(inside.sum()) <= cap:  # an upper bound of the stars it keeps before the cut
        return None
    star_id, keep = _ids_in_source_order(tx, config, star_v, inside)
    ids = star_id[keep]
    if len(ids) <= cap:
        return None
    key = seeded_hash(ids, config.randomSeed, DENSITY_SALT)
    last = np.lexsort((ids, key))[cap - 1]
    return int(key[last]), int(ids[last])


#: Observations read per step while settling published ids in sourceId order.
_ID_BATCH_ROWS = 1 << 15
#: The values left are read for the open stars only once that reads (about) no more than
#: this many batches.
_RESTRICTED_BATCHES = 2


def _ids_in_source_order(tx: Transaction, config: BuildStarsConfig, star_v: np.ndarray,
                         subset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps 4-5 for the stars ``subset`` (bool per star) of ``star_v``: each star's
    published id (:data:`NO_ID` outside the subset or without members) and whether it is
    kept (members, requiredBands) — what :func:`_judge` gives, reading less.

    A published id is the smallest member sourceId, and memberships are decided per
    observation, so the stored values (one visit's observations of one band in one store
    pixel) near the stars are read in the order of their smallest sourceId there, a batch at
    a time: once a star's smallest member so far is below every value left and its required
    bands are met, nothing left can change it.  When the stars still open (none found yet,
    too few in a required band) are few, the values left are read at the fine pixels within
    matchRadius of those stars only.  Exact, like :func:`_judge`, when ``star_v`` holds every
    star near the subset's members."""
    match = chord_from_arcsec(config.matchRadius)
    fine_nside = tx.config.storeNside * FINE_FACTOR
    names = tx.observations.bands()
    fine = _whole_store_pixels(_fine_pixels_near(tx.config.storeNside, star_v[subset],
                                                 match * 1.001))
    parts: list[tuple[int, int, FineRows]] = []  # (smallest sourceId, band code, rows)
    for code, band in enumerate(names):
        for part in tx.observations.values_in_fine_pixels(band, fine):
            parts.append((part.smallest_source_id(), code, part))
    parts.sort(key=lambda p: p[0])
    n = len(star_v)
    best = np.full(n, NO_ID, dtype=np.int64)
    required = [names.index(b) if b in names else -1 for b in config.requiredBands]
    counts = np.zeros((len(required), n), dtype=np.int64)

    def absorb(chunk: list[tuple[int, int, FineRows]]) -> None:
        observations = concat([p[2].columns(POSITION_DTYPES) for p in chunk], POSITION_DTYPES)
        band_code = np.concatenate([np.full(len(p[2].rows), p[1], dtype=np.int16)
                                    for p in chunk]) if chunk else np.zeros(0, np.int16)
        owner = memberships(star_v, observations, match)
        owned = owner >= 0
        owned[owned] = subset[owner[owned]]
        np.minimum.at(best, owner[owned], observations["source_id"][owned])
        for i, code in enumerate(required):
            hit = owned & (band_code == code)
            counts[i] += np.bincount(owner[hit], minlength=n)

    left = np.cumsum([len(p[2].rows) for p in parts][::-1])[::-1]  # rows from each part on
    start = 0
    while start < len(parts):
        stop, rows = start, 0
        while stop < len(parts) and (stop == start or rows < _ID_BATCH_ROWS):
            rows += len(parts[stop][2].rows)
            stop += 1
        absorb(parts[start:stop])
        start = stop
        if start == len(parts):
            break
        settled = (best < parts[start][0]) & (counts >= config.minPerBand).all(axis=0)
        open_stars = subset & ~settled
        if not open_stars.any():
            break
        few = pixels_within(star_v[open_stars], fine_nside, config.matchRadius * 1.001)
        if len(few) * int(left[start]) <= _RESTRICTED_BATCHES * _ID_BATCH_ROWS * len(fine):
            # the rest at the open stars' fine pixels only
            absorb([(m, c, r) for m, c, p in parts[start:]
                    if (r := p.restricted(few)) is not None])
            break
    keep = subset & (best != NO_ID) & (counts >= config.minPerBand).all(axis=0)
    return np.where(subset, best, NO_ID), keep


def _whole_store_pixels(fine: np.ndarray) -> np.ndarray:
    """``fine`` (sorted fine pixels) with every store pixel holding more than half of its
    fine pixels there completed: its values are then read whole (no search per value)."""
    coarse, count = np.unique(fine >> FINE_SHIFT, return_counts=True)
    full = coarse[count > (1 << FINE_SHIFT) // 2]
    if not len(full):
        return fine
    whole = ((full[:, None] << FINE_SHIFT) + np.arange(1 << FINE_SHIFT)).ravel()
    return np.union1d(fine, whole)


def _shard_cone(tx: Transaction, config: BuildStarsConfig, shard: ShardOwnership,
                centre: np.ndarray, radius_arcsec: float, cache: DensityCache) -> _Region:
    """The stars shard ``shard`` publishes within ``radius_arcsec`` of ``centre``."""
    grow = _grow_arcsec(tx, config)
    store_nside = tx.config.storeNside
    pixels = _disc_pixels(store_nside, centre, radius_arcsec + grow)
    _, star_v = _stars_of(tx, config, pixels)
    ra, dec = radec_from_vectors(star_v) if len(star_v) else (np.zeros(0), np.zeros(0))
    wanted = shard.owns(ra, dec) & _within(ra, dec, centre, radius_arcsec)
    # every member of a wanted star lies within matchRadius of it, so inside the disc grown
    # by matchRadius: only the fine pixels touching that are read (every column)
    reach = radius_arcsec + config.matchRadius * 1.001 + _SLACK_ARCSEC
    fine = (_disc_pixels(store_nside * FINE_FACTOR, centre, reach) if wanted.any()
            else np.zeros(0, dtype=np.int64))
    observations, band_code, names = _observations(tx, fine, None)
    owner, star_id, keep = _judge(star_v, wanted, observations, band_code, names, config)
    derived = cached = 0
    if keep.any():
        density = pixels_of(star_v, config.densityCutNside)
        key = seeded_hash(star_id, config.randomSeed, DENSITY_SALT)
        for pixel in np.unique(density[keep]).tolist():
            hit, threshold = cache.get(pixel)
            if hit:
                cached += 1
            else:
                threshold = _density_threshold(tx, config, pixel, grow)
                cache.put(pixel, threshold)
                derived += 1
            if threshold is not None:
                t_key, t_id = np.uint64(threshold[0]), threshold[1]
                here = keep & (density == pixel)
                keep[here] = (key[here] < t_key) | ((key[here] == t_key) & (star_id[here] <= t_id))
    survivors = np.flatnonzero(keep)
    survivors = survivors[np.argsort(star_id[survivors], kind="stable")]
    rows, n_obs = grouped_members(owner, survivors, len(star_v), observations)
    final_id = star_id[survivors]
    stars = StarCatalog(final_id, ra[survivors], dec[survivors], n_obs,
                        reserve_flags(final_id, config), take(observations, rows))
    band = np.asarray(names, dtype=object)[band_code[rows]] if len(rows) else \
        np.zeros(0, dtype=object)
    return _Region(stars, band, len(pixels), derived, cached)


def _within(ra: np.ndarray, dec: np.ndarray, centre: np.ndarray,
            radius_arcsec: float) -> np.ndarray:
    if not len(ra):
        return np.zeros(0, dtype=bool)
    v = unit_vectors(ra, dec)
    return np.sqrt(((v - centre) ** 2).sum(axis=1)) <= chord_from_arcsec(radius_arcsec)


def _select(stars: StarCatalog, band: np.ndarray,
            keep: np.ndarray) -> tuple[StarCatalog, np.ndarray]:
    member_of = np.repeat(np.arange(len(stars.star_id)), stars.n_obs)
    rows = keep[member_of]
    return StarCatalog(stars.star_id[keep], stars.ra[keep], stars.dec[keep], stars.n_obs[keep],
                       stars.obj_flag[keep], take(stars.observations, rows)), band[rows]


# ---------------------------------------------------------------------------------------------
# the density-cut cache
# ---------------------------------------------------------------------------------------------
#: Where a state directory keeps the queries' density-cut cache (one file per shard).
CACHE_DIR = "query-cache"
_CACHE_VERSION = 1


class DensityCache:
    """The density cut of each ``densityCutNside`` pixel a query ranked in one shard
    (:func:`_density_threshold`), kept in ``STATE/query-cache/<order>/<pixel>.json`` for the
    next query.

    A cached cut is used only by a read transaction of the same *generation* of the shard's
    store — its instance and the LMDB transaction id the read sees (any write commit changes
    it) — and the same configuration; anything else is ignored and rewritten.  Writing is
    best-effort (a read-only state directory simply gets no cache).
    """

    def __init__(self, path: Path | None, generation: tuple[str | None, int],
                 config: BuildStarsConfig) -> None:
        self.path = path
        self._key = {"version": _CACHE_VERSION, "generation": list(generation),
                     "config": hashlib.sha256(json.dumps(to_dict(config), sort_keys=True)
                                              .encode()).hexdigest()}
        self._cuts: dict[str, list[int] | None] = self._stored()
        self._dirty = False

    def _read(self) -> dict[str, object]:
        if self.path is None:
            return {}
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    def _stored(self) -> dict[str, list[int] | None]:
        """The cuts of the cache file when it is of this generation and configuration."""
        stored = self._read()
        cuts = stored.get("cuts")
        if {k: stored.get(k) for k in self._key} == self._key and isinstance(cuts, dict):
            return dict(cuts)
        return {}

    def _newer_stored(self) -> bool:
        """Whether the file holds a later generation of the same store (a slow writer of an
        older one must not replace it)."""
        stored = self._read()
        ours = self._key["generation"]
        theirs = stored.get("generation")
        return (stored.get("version") == self._key["version"]
                and stored.get("config") == self._key["config"]
                and isinstance(theirs, list) and isinstance(ours, list) and len(theirs) == 2
                and theirs[0] == ours[0] and isinstance(theirs[1], int)
                and theirs[1] > ours[1])

    def __contains__(self, pixel: int) -> bool:
        return str(int(pixel)) in self._cuts

    def get(self, pixel: int) -> tuple[bool, tuple[int, int] | None]:
        """(found, cut) of density pixel ``pixel``: the cut as :func:`_density_threshold`."""
        name = str(int(pixel))
        if name not in self._cuts:
            return False, None
        cut = self._cuts[name]
        return True, (None if cut is None else (int(cut[0]), int(cut[1])))

    def put(self, pixel: int, cut: tuple[int, int] | None) -> None:
        """Remember the cut of density pixel ``pixel`` (written by :meth:`save`)."""
        self._cuts[str(int(pixel))] = None if cut is None else [int(cut[0]), int(cut[1])]
        self._dirty = True

    def save(self) -> None:
        """Write the cache file atomically if anything was added (errors are ignored: a
        query without a cache is only slower)."""
        if self.path is None or not self._dirty:
            return
        if self._newer_stored():
            return
        # keep what another process (a query, a warm-up) stored for this generation since
        self._cuts = {**self._stored(), **self._cuts}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w") as out:
                json.dump({**self._key, "cuts": self._cuts}, out)
            os.replace(tmp, self.path)
        except OSError:
            return
        self._dirty = False


def _cache_path(state: StateDirectory, pixel: int) -> Path:
    return state.path / CACHE_DIR / str(state.shard_order) / f"{int(pixel)}.json"


# ---------------------------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------------------------
def _check_not_empty(state: StateDirectory) -> list[int]:
    shards = [pixel for _, pixel in state.shards()]
    if not shards:
        raise StateError(f"{state.path} holds no visits yet: nothing to query (apply visits "
                         "with `streamstars backfill` or `streamstars run`)")
    return shards


def _cone_locked(state: StateDirectory, ra: float, dec: float, radius_arcsec: float,
                 use_cache: bool) -> QueryResult:
    existing = set(_check_not_empty(state))
    centre = unit_vectors(np.array([ra]), np.array([dec]))[0]
    touched = [int(p) for p in _disc_pixels(state.shard_nside, centre,
                                            radius_arcsec + _SLACK_ARCSEC).tolist()
               if int(p) in existing]
    config = state.config
    catalogs, bands, mjds = [], [], []
    pixels_read = derived = cached = 0
    for pixel in sorted(touched):
        store = state.open_shard(pixel)
        owner = ShardOwnership(state.shard_order, pixel, state.shard_margin)
        with store.read(buffers=True) as tx:
            cache = DensityCache(_cache_path(state, pixel) if use_cache else None,
                                 (store.instance, tx.id()), config)
            region = _shard_cone(tx, config, owner, centre, radius_arcsec, cache)
            mjds.append(_visit_mjd(tx, region.stars.observations["visit"]))
        cache.save()
        catalogs.append(region.stars)
        bands.append(region.band)
        pixels_read += region.pixels_read
        derived += region.density_derived
        cached += region.density_cached
    stars, band, mjd = _merge(catalogs, bands, mjds)
    return QueryResult(stars, band, mjd, sorted(touched), pixels_read, derived, cached)


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


def cone_query(state: StateDirectory, ra: float, dec: float, radius_arcsec: float, *,
               use_cache: bool = True) -> QueryResult:
    """The stars the snapshot would publish within ``radius_arcsec`` of (``ra``, ``dec``)
    [deg], with every observation, read under the state's visit boundary.  ``use_cache``:
    use and fill the density-cut cache (:class:`DensityCache`).

    Raises:
        ConfigError: a malformed cone (non-finite values, Dec outside [-90, 90], radius not in
            (0, :data:`MAX_CONE_RADIUS_ARCSEC`]).
        StateError: a state without visits.
    """
    _check_cone(ra, dec, radius_arcsec)
    with state.visit_boundary(exclusive=False):
        return _cone_locked(state, ra % 360.0, dec, radius_arcsec, use_cache)


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


def star_query(state: StateDirectory, star_id: int, *, use_cache: bool = True) -> QueryResult:
    """The star the snapshot would publish with ``fgcm_id`` ``star_id``, with every
    observation, read under the state's visit boundary.

    The id is the smallest sourceId of the star's members: the shards' sourceId indexes give
    the visit and position of that observation; the star lies within matchRadius of it.
    ``use_cache``: use and fill the density-cut cache (:class:`DensityCache`).

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
        result = _cone_locked(state, ra, dec, state.config.matchRadius + _SLACK_ARCSEC,
                              use_cache)
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
                       result.pixels_read, result.density_pixels_derived,
                       result.density_pixels_cached)


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


# ---------------------------------------------------------------------------------------------
# warming the density-cut cache (writers, operators)
# ---------------------------------------------------------------------------------------------
@dataclass
class WarmSummary:
    """What a warm-up of the density-cut cache did.

    Attributes:
        shards: the shards looked at (nest pixels at ``shardNside``).
        pixels_derived: density pixels whose cut was derived (ranked) and stored.
        pixels_fresh: density pixels whose cut was already cached for the shard's generation.
        seconds: wall-clock time of the warm-up [s].
    """

    shards: list[int] = field(default_factory=list)
    pixels_derived: int = 0
    pixels_fresh: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_pixel(self) -> float:
        """Seconds per derived density pixel (0 when none was derived)."""
        return self.seconds / self.pixels_derived if self.pixels_derived else 0.0

    def describe(self) -> str:
        """One line for logs and command output."""
        return (f"{self.pixels_derived} density pixel(s) ranked, {self.pixels_fresh} already "
                f"cached, in {len(self.shards)} shard(s), {self.seconds:.2f} s"
                + (f" ({self.seconds_per_pixel:.2f} s per pixel)" if self.pixels_derived
                   else ""))


def shard_density_pixels(tx: Transaction, state: StateDirectory, shard: int) -> np.ndarray:
    """The ``densityCutNside`` pixels of shard ``shard``'s core that hold stored observations
    (sorted nest pixels; read in ``tx`` from the shard's visit records): those a query of
    this shard may need the density cut of.  A density pixel nests in one shard
    (``shardNside <= densityCutNside``, checked by the configuration)."""
    config = state.config
    store_nside = tx.config.storeNside
    store_pixels = np.unique(np.fromiter(
        (p for record in tx.visits.records() for p in record.pixels), dtype=np.int64))
    if store_nside >= config.densityCutNside:
        shift = 2 * (int(store_nside).bit_length() - int(config.densityCutNside).bit_length())
        density = np.unique(store_pixels >> shift)
    else:  # every density pixel inside the store pixels
        shift = 2 * (int(config.densityCutNside).bit_length() - int(store_nside).bit_length())
        density = ((store_pixels[:, None] << shift) + np.arange(1 << shift)).ravel()
    core_shift = 2 * (int(config.densityCutNside).bit_length() - state.shard_nside.bit_length())
    return density[(density >> core_shift) == int(shard)]


def _warm_shard(state: StateDirectory, shard: int, summary: WarmSummary,
                limit: int | None = None) -> tuple[str | None, int] | None:
    """Derive and store the missing cuts of shard ``shard``'s density pixels, at most
    ``limit`` of them, in one read transaction; adds to ``summary``.  Returns the shard's
    generation when every density pixel of it is cached for it after this call, else None."""
    config = state.config
    store = state.open_shard(shard)
    with store.read(buffers=True) as tx:
        generation = (store.instance, tx.id())
        cache = DensityCache(_cache_path(state, shard), generation, config)
        pixels = shard_density_pixels(tx, state, shard).tolist()
        todo = [p for p in pixels if p not in cache]
        summary.pixels_fresh += len(pixels) - len(todo)
        grow = _grow_arcsec(tx, config) if todo else 0.0
        done = todo if limit is None else todo[:limit]
        for pixel in done:
            cache.put(pixel, _density_threshold(tx, config, pixel, grow))
            cache.save()  # a query running meanwhile uses it at once
            summary.pixels_derived += 1
    summary.shards.append(int(shard))
    return generation if len(done) == len(todo) else None


def warm_query_cache(state: StateDirectory, shards: list[int] | None = None) -> WarmSummary:
    """Derive and store the density cut (:class:`DensityCache`) of every density pixel of
    ``shards`` (default: every shard of the state) whose cached cut is missing or of an older
    generation of its shard, so that the next ``star`` / ``cone`` there derives nothing.

    Read-only on the store (one read transaction per shard); writes only the cache files
    (atomically, as queries do).  Safe while a writer applies visits: a cut is stored under
    the generation of the read transaction it was derived from (per shard: a density pixel's
    cut depends on its own shard's data only), so a shard written meanwhile simply has a
    stale cut again, which no query uses.  Shards named but without a store are skipped.

    Raises:
        ShardError: a shard store that cannot be read (naming it).
    """
    start = time.perf_counter()
    summary = WarmSummary()
    existing = {pixel for _, pixel in state.shards()}
    for shard in sorted(existing if shards is None else {int(p) for p in shards} & existing):
        _warm_shard(state, shard, summary)
    summary.seconds = time.perf_counter() - start
    return summary


def shard_generations(state: StateDirectory) -> dict[int, tuple[str | None, int]]:
    """The generation (:meth:`StarStore.generation`) of every shard of the state."""
    return {pixel: state.open_shard(pixel).generation() for _, pixel in state.shards()}


class QueryCacheWarmer:
    """Keeps the density-cut cache of a state warm a little at a time (a consumer's idle
    moments): each :meth:`step` derives at most one density pixel's cut, in the first shard
    changed since it was last warmed (a shard whose generation is unchanged costs nothing
    but its generation).  After a round that found nothing left to do, steps do nothing
    until :meth:`changed` is called (after a write).  Totals in :attr:`total`.

    Args:
        state: the open state directory (the writer's own object: one LMDB environment per
            shard and process).
    """

    def __init__(self, state: StateDirectory) -> None:
        self.state = state
        #: per shard: the generation every density pixel of it was cached for
        self._warmed: dict[int, tuple[str | None, int]] = {}
        #: everything derived so far
        self.total = WarmSummary()
        #: the warm-up in progress (since the last time nothing was left to do)
        self._round: WarmSummary | None = None
        self._pending = True  # the shards are looked at once at start

    def changed(self) -> None:
        """Something may have been written: the next steps look at the shards again."""
        self._pending = True

    @property
    def pending(self) -> bool:
        """Whether a step may have work to do (a write since the last complete round)."""
        return self._pending

    def step(self) -> WarmSummary | None:
        """Derive at most one missing density cut.  Returns the finished round (what was
        warmed since work was first found) once nothing is left to do after it, else None.

        Raises:
            ShardError: a shard store that cannot be read.
        """
        if not self._pending:
            return None
        start = time.perf_counter()
        for pixel, generation in shard_generations(self.state).items():
            if self._warmed.get(pixel) == generation:
                continue
            part = WarmSummary()
            done = _warm_shard(self.state, pixel, part, limit=1)
            if done is not None:
                self._warmed[pixel] = done
            if not part.pixels_derived and done is not None:
                continue  # already warm (its cache file was of this generation)
            part.seconds = time.perf_counter() - start
            self._add(part)
            return None
        finished, self._round = self._round, None
        self._pending = False
        return finished

    def _add(self, part: WarmSummary) -> None:
        if self._round is None:
            self._round = WarmSummary()
        for summary in (self.total, self._round):
            summary.pixels_derived += part.pixels_derived
            summary.seconds += part.seconds
            summary.shards.extend(p for p in part.shards if p not in summary.shards)
