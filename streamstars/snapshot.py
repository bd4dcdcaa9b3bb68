"""Snapshot: derive the fgcm input catalogs from the store in one LMDB read transaction.

Steps (reference §4, all deterministic functions of the stored components and observations):
1. candidates per primary band: every clique component with >= minPerBand members is one
   candidate (mean of its members, id = smallest member sourceId); non-clique components
   contribute their replayed candidates;
2. cross-band merge in ``primaryBands`` order: a later band's candidate within matchRadius of
   an already accepted star is dropped;
3. isolation: every star with another star within isolationRadius is removed (both);
4. membership: every observation (any band) within matchRadius of a surviving star joins it;
5. requiredBands: >= minPerBand observations in each required band;
6. density cut: in each ``densityCutNside`` pixel holding more than densityCutMaxPerPixel
   stars, keep the ones with the smallest seeded hash of their id (stable as the survey grows);
7. reserve flag (obj_flag 16) for a seeded-hash fraction ``reserveFraction`` of the stars;
8. reference stars (when the store caches a reference catalog): every cached reference star
   is matched to its nearest final star within ``fgcmLoadReferenceCatalog.matchRadius``
   (:func:`streamstars.references.snapshot_references`).
A star's published id (``fgcm_id``) is the smallest sourceId among its members: stable as
the survey grows unless the star's own observations change.  Stars are sorted by id;
observations are grouped by star, each star's sorted by (visit, sourceId).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamstars import __version__
from streamstars.association.fof import centres_of
from streamstars.columns import OBSERVATION_DTYPES, ColumnDict, concat, take
from streamstars.config import BuildStarsConfig, check_snapshot_config, to_dict
from streamstars.errors import StateError
from streamstars.sky import (
    chord_from_arcsec,
    fixed_unit_vectors,
    kdtree,
    pixel_at_order,
    pixels_of,
    radec_from_vectors,
    vectors_from_fixed,
)
from streamstars.state import StarStore, Transaction, VisitRecord
from streamstars.state.schema import POSITION_COLUMNS, POSITION_DTYPES
from streamstars.visit import BAD_DETECTOR_VALUE

if TYPE_CHECKING:
    # the writers, the margin check and the reference matching are imported where they are
    # used: `streamstars star` / `cone` import this module for the star-building steps only
    from streamstars.io.snapshot_files import SnapshotCatalogs
    from streamstars.margins import MarginViolation

_OUTPUT_COLUMNS = frozenset(OBSERVATION_DTYPES)

#: fgcm's objFlag value of a reserved star (``RESERVED = 2**4``).
OBJ_FLAG_RESERVED = 16
DENSITY_SALT = 0x5EED_DE45
_RESERVE_SALT = 0x5EED_0E5E


@dataclass
class StarCatalog:
    """Stars and their member observations, before being written."""

    star_id: np.ndarray  # int64, sorted
    ra: np.ndarray  # deg
    dec: np.ndarray  # deg
    n_obs: np.ndarray  # int32
    obj_flag: np.ndarray  # int32
    observations: ColumnDict  # grouped by star in star order


@dataclass
class SnapshotSummary:
    """What a snapshot wrote."""

    out_dir: Path
    n_visits: int
    n_stars: int
    n_observations: int
    seconds: float
    files: list[Path]


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 mix of uint64 values (a well-spread, seedable integer hash)."""
    z = np.asarray(values).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded_hash(star_id: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A uint64 hash of each star id, fixed by (seed, salt): stable as the survey grows."""
    key = splitmix64(np.array([(seed * 0x100000001 + salt) & 0xFFFFFFFFFFFFFFFF],
                              dtype=np.uint64))[0]
    return splitmix64(star_id.astype(np.int64).view(np.uint64) ^ key)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@dataclass
class ObservationPositions:
    """Pass 1 of a snapshot: every stored observation's identity and position, its band (as
    an index into ``band_names``) and where each stored record's rows start."""

    columns: ColumnDict
    band_code: np.ndarray  # uint8
    band_names: list[str]
    record_starts: np.ndarray  # int64, one per record in cursor order, plus the total


def read_observation_positions(tx: Transaction) -> ObservationPositions:
    """Pass 1: identity and position of every stored observation (``tx`` should be begun
    with ``buffers=True``: only these columns' pages are read, nothing is copied twice)."""
    parts, codes, starts = [], [], [0]
    names: dict[str, int] = {}
    for record in tx.observations.scan():
        # pass 1 reads what the association reads of an observation: identity and position
        part = record.columns(POSITION_COLUMNS)
        # copy the four columns now: views would keep whole values alive (buffers=False)
        parts.append({k: np.array(c) for k, c in part.items()})
        code = names.setdefault(record.band, len(names))
        codes.append(np.full(len(part["source_id"]), code, dtype=np.uint8))
        starts.append(starts[-1] + len(part["source_id"]))
    if len(names) > 255:
        raise StateError(f"store {tx.path} holds more than 255 bands")
    return ObservationPositions(
        concat(parts, POSITION_DTYPES),
        np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint8),
        list(names), np.asarray(starts, dtype=np.int64))


def read_observation_rows(tx: Transaction, positions: ObservationPositions,
                          rows: np.ndarray) -> ColumnDict:
    """Pass 2: every column of the observations ``rows`` (indices of pass 1, in the order
    given), read record by record in the same transaction and scan order as pass 1."""
    out = {k: np.empty(len(rows), dtype=dt) for k, dt in OBSERVATION_DTYPES.items()}
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    bounds = np.searchsorted(sorted_rows, positions.record_starts)
    for i, record in enumerate(tx.observations.scan()):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if hi > lo:
            local = sorted_rows[lo:hi] - positions.record_starts[i]
            part = record.columns(_OUTPUT_COLUMNS)
            if len(part["source_id"]) != positions.record_starts[i + 1] - \
                    positions.record_starts[i]:
                raise StateError("observations changed between the two snapshot passes")
            for name, column in part.items():
                out[name][order[lo:hi]] = column[local]
    return out


def band_candidates(tx: Transaction, band: str) -> ColumnDict:
    """Star candidates of one primary band: star_id and integer vector sums."""
    return candidates_of(tx.components.read_band(band), tx.candidates.read_band(band),
                         tx.config.minPerBand)


def region_candidates(tx: Transaction, band: str, pixels: np.ndarray) -> ColumnDict:
    """:func:`band_candidates` of the component and candidate records of store ``pixels``
    only (those whose component's centre lies in them)."""
    return candidates_of(tx.components.load(band, pixels)[0],
                         tx.candidates.load(band, pixels)[0], tx.config.minPerBand)


def candidates_of(comps: ColumnDict, explicit: ColumnDict, min_per_band: int) -> ColumnDict:
    """Star candidates (star_id and integer vector sums, sorted by star_id) of component
    records ``comps`` (every clique of >= ``min_per_band`` members) and stored candidate
    records ``explicit`` (those of the other components)."""
    implicit = comps["clique"] & (comps["count"] >= min_per_band)
    keys = ("star_id", "sx", "sy", "sz")
    from_cliques = {"star_id": comps["comp_id"][implicit], "sx": comps["sx"][implicit],
                    "sy": comps["sy"][implicit], "sz": comps["sz"][implicit]}
    dtypes = {k: np.dtype(np.int64) for k in keys}
    cands = concat([from_cliques, {k: explicit[k] for k in keys}], dtypes)
    return take(cands, np.argsort(cands["star_id"], kind="stable"))


# ---------------------------------------------------------------------------------------------
# the global, deterministic part
# ---------------------------------------------------------------------------------------------
def build_stars(candidates: dict[str, ColumnDict], observations: ColumnDict,
                band_code: np.ndarray, band_names: list[str],
                config: BuildStarsConfig) -> tuple[StarCatalog, np.ndarray]:
    """Steps 2-7 of the module docstring from per-band candidates and all observations
    (source_id, visit, ra, dec; the band of each as an index into ``band_names``).

    Returns the stars, their observations' identity and position, and the rows of
    ``observations`` those are (grouped by star, in star order).
    """
    match = chord_from_arcsec(config.matchRadius)
    star_id, star_v = merge_bands(candidates, config.primaryBands, match)
    star_id, star_v = isolated(star_id, star_v, chord_from_arcsec(config.isolationRadius))
    owner = memberships(star_v, observations, match)
    star_id = published_ids(len(star_id), owner, observations["source_id"])
    keep = star_id != NO_ID  # a star needs members
    keep &= has_required_bands(owner, band_code, band_names, len(star_id), config)
    keep &= density_cut(star_id, star_v, keep, config)
    survivors = np.flatnonzero(keep)
    survivors = survivors[np.argsort(star_id[survivors], kind="stable")]
    rows, n_obs = grouped_members(owner, survivors, len(star_id), observations)
    final_id = star_id[survivors]
    ra, dec = radec_from_vectors(star_v[survivors]) if len(survivors) else (
        np.zeros(0), np.zeros(0))
    return StarCatalog(final_id, ra, dec, n_obs, reserve_flags(final_id, config),
                       take(observations, rows)), rows


#: The published id of a star without members (removed).
NO_ID = np.iinfo(np.int64).max


def merge_bands(candidates: dict[str, ColumnDict], primary_bands: tuple[str, ...],
                match: float) -> tuple[np.ndarray, np.ndarray]:
    """Step 2, cross-band merge: in ``primary_bands`` order, a later band's candidate within
    ``match`` (chord) of an already accepted star is dropped.  Returns the accepted
    candidates' ids and unit vectors."""
    ids: list[np.ndarray] = []
    vecs: list[np.ndarray] = []
    for band in primary_bands:
        cand = candidates.get(band)
        if cand is None or len(cand["star_id"]) == 0:
            continue
        v = centres_of(cand)
        if vecs:
            accepted = np.concatenate(vecs)
            near = kdtree(accepted).query_ball_point(v, match, return_length=True)
            keep = np.asarray(near) == 0
            v = v[keep]
            ids.append(cand["star_id"][keep])
        else:
            ids.append(cand["star_id"])
        vecs.append(v)
    star_id = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    return star_id, (np.concatenate(vecs) if vecs else np.zeros((0, 3)))


def isolated(star_id: np.ndarray, star_v: np.ndarray,
             isolation: float) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: every star with another star within ``isolation`` (chord) is removed (both)."""
    if len(star_id) <= 1:
        return star_id, star_v
    close = kdtree(star_v).query_pairs(isolation, output_type="ndarray")
    keep = np.ones(len(star_id), dtype=bool)
    keep[close.ravel()] = False
    return star_id[keep], star_v[keep]


def memberships(star_v: np.ndarray, observations: ColumnDict, match: float) -> np.ndarray:
    """Step 4: the star each observation (any band) is within ``match`` of, or -1 (stars are
    isolated, so there is at most one)."""
    obs_v = vectors_from_fixed(fixed_unit_vectors(observations["ra"], observations["dec"]))
    if not (len(star_v) and len(obs_v)):
        return np.full(len(obs_v), -1, dtype=np.int64)
    dist, nearest = kdtree(star_v).query(obs_v, k=1, distance_upper_bound=match * 1.001)
    return np.where(dist <= match, nearest, -1)


def published_ids(n_stars: int, owner: np.ndarray, source_id: np.ndarray) -> np.ndarray:
    """The published id of each star: the smallest sourceId among its members
    (:data:`NO_ID` without members).  Unlike the seed of the winning candidate it survives a
    later primary band taking the star over."""
    member = owner >= 0
    published = np.full(n_stars, NO_ID, dtype=np.int64)
    np.minimum.at(published, owner[member], source_id[member])
    return published


def has_required_bands(owner: np.ndarray, band_code: np.ndarray, band_names: list[str],
                       n_stars: int, config: BuildStarsConfig) -> np.ndarray:
    """Step 5: per star, >= ``minPerBand`` member observations in each required band."""
    keep = np.ones(n_stars, dtype=bool)
    member = owner >= 0
    for band in config.requiredBands:
        code = band_names.index(band) if band in band_names else -1
        in_band = member & (band_code == code)
        keep &= np.bincount(owner[in_band], minlength=n_stars) >= config.minPerBand
    return keep


def density_cut(star_id: np.ndarray, star_v: np.ndarray, keep: np.ndarray,
                config: BuildStarsConfig) -> np.ndarray:
    """Step 6: per star kept so far, whether it survives the density cut: in each
    ``densityCutNside`` pixel at most ``densityCutMaxPerPixel`` stars, those with the
    smallest seeded hash of their id."""
    survive = np.ones(len(star_id), dtype=bool)
    if not len(star_id):
        return survive
    pixel = pixels_of(star_v, config.densityCutNside)
    rank_key = seeded_hash(star_id, config.randomSeed, DENSITY_SALT)
    candidates_idx = np.flatnonzero(keep)
    order = candidates_idx[np.lexsort((star_id[candidates_idx], rank_key[candidates_idx],
                                       pixel[candidates_idx]))]
    sorted_pixel = pixel[order]
    starts = np.flatnonzero(np.r_[True, sorted_pixel[1:] != sorted_pixel[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    survive[order[rank >= config.densityCutMaxPerPixel]] = False
    return survive


def grouped_members(owner: np.ndarray, survivors: np.ndarray, n_stars: int,
                    observations: ColumnDict) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the surviving stars' members grouped by star (in ``survivors`` order),
    each star's sorted by (visit, sourceId), and the number of members of each star."""
    new_index = np.full(n_stars, -1, dtype=np.int64)
    new_index[survivors] = np.arange(len(survivors))
    obs_owner = np.full(len(owner), -1, dtype=np.int64)
    has_owner = owner >= 0  # no star at all: new_index is empty
    obs_owner[has_owner] = new_index[owner[has_owner]]
    rows = np.flatnonzero(obs_owner >= 0)
    rows = rows[np.lexsort((observations["source_id"][rows], observations["visit"][rows],
                            obs_owner[rows]))]
    return rows, np.bincount(obs_owner[rows], minlength=len(survivors)).astype(np.int32)


def reserve_flags(star_id: np.ndarray, config: BuildStarsConfig) -> np.ndarray:
    """Step 7: ``obj_flag`` of each star, RESERVED for a seeded-hash fraction
    ``reserveFraction`` of them."""
    reserve_draw = seeded_hash(star_id, config.randomSeed, _RESERVE_SALT)
    threshold = np.uint64(int(config.reserveFraction * float(1 << 64)) & 0xFFFFFFFFFFFFFFFF)
    return np.where(reserve_draw < threshold, OBJ_FLAG_RESERVED, 0).astype(np.int32)


def visit_catalog(records: list[VisitRecord]) -> dict[str, np.ndarray]:
    """fgcmVisitCatalog columns from the stored visit records (sorted by visit)."""
    records = sorted(records, key=lambda r: r.visit)
    detectors = [int(d) for r in records for d in r.metadata.get("detectors", [])]
    detectors += [int(d) for r in records for d in r.delta_aper_detector or {}]
    n_ccd = max(detectors) + 1 if detectors else 1
    n = len(records)

    def meta(name: str) -> np.ndarray:
        return np.array([np.nan if r.metadata.get(name) is None else r.metadata[name]
                         for r in records], dtype=np.float64)

    per_ccd_aper = np.full((n, n_ccd), BAD_DETECTOR_VALUE)
    per_ccd_fwhm = np.full((n, n_ccd), BAD_DETECTOR_VALUE)
    for i, r in enumerate(records):  # loop over visits, not sources
        for det, value in (r.delta_aper_detector or {}).items():
            per_ccd_aper[i, int(det)] = value
        dets = np.asarray(r.metadata.get("detectors", []), dtype=np.int64)
        fwhm = np.asarray(r.metadata.get("psf_fwhm_detector", []), dtype=np.float64)
        if len(dets):
            per_ccd_fwhm[i, dets] = fwhm
    return {
        "visit": np.array([r.visit for r in records], dtype=np.int64),
        "physicalFilter": np.array([r.metadata["physical_filter"] for r in records],
                                   dtype=str if n else "U1"),
        "telra": meta("telra"), "teldec": meta("teldec"), "telha": meta("telha"),
        "telrot": meta("telrot"), "mjd": meta("mjd"), "exptime": meta("exptime"),
        "pmb": meta("pmb"), "psfSigma": meta("psf_sigma"), "psfFwhm": meta("psf_fwhm"),
        "skyBackground": meta("sky_background"),
        "deltaAper": np.array([r.delta_aper for r in records], dtype=np.float64),
        "deltaAperDetector": per_ccd_aper,
        "psfFwhmDetector": per_ccd_fwhm,
        "scaling": np.ones((n, n_ccd)),
        "deepFlag": np.zeros(n, dtype=np.int32),
        "used": np.ones(n, dtype=np.int32),
        "sources_read": np.ones(n, dtype=bool),
    }


@dataclass(frozen=True)
class ShardOwnership:
    """The stars a sky shard publishes: those whose position lies in its core pixel (the
    partition rule of the HATS catalog, :func:`streamstars.sky.pixel_at_order`), and
    the margin its observations were routed with (for the completeness check)."""

    order: int
    pixel: int
    margin_arcsec: float

    def owns(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Per star [deg]: whether this shard publishes it."""
        return pixel_at_order(ra, dec, self.order) == self.pixel


@dataclass
class DerivedCatalogs:
    """What a snapshot derives from one read transaction: the catalogs to write, the stars
    with their member observations, the visit records and, for a shard, the margin check."""

    catalogs: SnapshotCatalogs
    stars: StarCatalog
    records: list[VisitRecord]
    violations: list[MarginViolation]


def build_catalogs(store: StarStore, tx: Transaction,
                   config: BuildStarsConfig | None = None) -> tuple[SnapshotCatalogs,
                                                                    StarCatalog]:
    """Everything a snapshot writes, from one read transaction ``tx`` of ``store``.

    ``config`` (default: the store's) may differ from the store's configuration in
    snapshot-time settings only (:data:`streamstars.config.SNAPSHOT_TIME_KEYS`).

    Raises:
        ConfigError: ``config`` differs from the store's in a setting that shapes stored data.
    """
    derived = derive_catalogs(store, tx, config)
    return derived.catalogs, derived.stars


def check_shard_margin(tx: Transaction, config: BuildStarsConfig,
                       shard: ShardOwnership) -> list[MarginViolation]:
    """The margin completeness check of one shard alone (what its snapshot would report),
    from the positions of every observation it stores (one pass over them, no star built)."""
    from streamstars.margins import margin_violations

    positions = read_observation_positions(tx)
    return margin_violations(positions.columns, positions.band_code, positions.band_names,
                             shard.order, shard.pixel, shard.margin_arcsec, config)


def derive_catalogs(store: StarStore, tx: Transaction, config: BuildStarsConfig | None = None,
                    shard: ShardOwnership | None = None) -> DerivedCatalogs:
    """:func:`build_catalogs` of a whole store, or of the stars one sky shard owns.

    With ``shard``, every step runs on everything the shard stores (core and margin), and only
    the stars it owns are kept — with their observations and reference-star matches — so that
    the shards of a survey publish each star once, as an unsharded store would; the margin
    completeness check (:func:`streamstars.margins.margin_violations`) runs on the same
    observations.

    Raises:
        ConfigError: ``config`` differs from the store's in a setting that shapes stored data.
    """
    from streamstars.io.snapshot_files import SnapshotCatalogs
    from streamstars.margins import margin_violations
    from streamstars.references import snapshot_references

    if config is None:
        config = store.config
    else:
        check_snapshot_config(store.config, config)
    records = tx.visits.records()
    candidates = {band: band_candidates(tx, band) for band in config.primaryBands}
    positions = read_observation_positions(tx)
    store.trim_map_if_large(force=True)  # pass 1 is done: its pages are not needed by the heap
    stars, rows = build_stars(candidates, positions.columns, positions.band_code,
                              positions.band_names, config)
    violations: list[MarginViolation] = []
    every_star = (stars.star_id, stars.ra, stars.dec)
    if shard is not None:
        violations = margin_violations(positions.columns, positions.band_code,
                                       positions.band_names, shard.order, shard.pixel,
                                       shard.margin_arcsec, config)
        stars, rows = owned_stars(stars, rows, shard.owns(stars.ra, stars.dec))
    positions.columns = {}  # pass 2 reads every column of the member rows only
    stars.observations = read_observation_rows(tx, positions, rows)
    metadata = _provenance(records, config)
    # reference stars choose among every star the store knows (a shard's margin stars too),
    # and the rows of the stars kept are published
    reference, reference_filters, refcat = snapshot_references(tx, config, *every_star)
    if reference is not None:
        reference = take(reference, np.isin(reference["fgcm_id"], stars.star_id))
        if refcat is not None:
            metadata["refcat"] = json.dumps(refcat, sort_keys=True)
    catalogs = SnapshotCatalogs(
        visits=visit_catalog(records),
        observations=stars.observations,
        stars={"fgcm_id": stars.star_id, "ra": stars.ra, "dec": stars.dec,
               "obs_arr_index": _obs_arr_index(stars.n_obs), "n_obs": stars.n_obs,
               "obj_flag": stars.obj_flag},
        reference=reference,
        reference_filters=reference_filters,
        metadata=metadata,
    )
    return DerivedCatalogs(catalogs, stars, records, violations)


def owned_stars(stars: StarCatalog, rows: np.ndarray,
                keep: np.ndarray) -> tuple[StarCatalog, np.ndarray]:
    """The stars ``keep`` (bool per star) with their member rows (``rows`` are grouped by
    star, ``stars.n_obs`` each)."""
    member_of = np.repeat(np.arange(len(stars.star_id)), stars.n_obs)
    kept_rows = keep[member_of]
    return StarCatalog(stars.star_id[keep], stars.ra[keep], stars.dec[keep],
                       stars.n_obs[keep], stars.obj_flag[keep],
                       take(stars.observations, kept_rows)), rows[kept_rows]


def _obs_arr_index(n_obs: np.ndarray) -> np.ndarray:
    if not len(n_obs):
        return np.zeros(0, np.int64)
    return np.concatenate([[0], np.cumsum(n_obs)[:-1]]).astype(np.int64)


def kafka_offsets(records: list[VisitRecord]) -> dict[str, int]:
    """``topic/partition`` -> the highest next offset recorded with the visits."""
    offsets: dict[str, int] = {}
    for rec in records:
        if rec.kafka_position is not None:
            topic, partition, next_offset = rec.kafka_position
            key = f"{topic}/{partition}"
            offsets[key] = max(offsets.get(key, 0), next_offset)
    return offsets


def _provenance(records: list[VisitRecord], config: BuildStarsConfig) -> dict[str, str]:
    return {
        "streamstars_version": __version__,
        "visits": json.dumps([rec.visit for rec in records]),
        "kafka_offsets": json.dumps(kafka_offsets(records), sort_keys=True),
        "config": json.dumps(to_dict(config), sort_keys=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_store_snapshot(store: StarStore, out_dir: str | Path,
                         formats: tuple[str, ...] = ("fits", "parquet"),
                         extra_metadata: dict[str, str] | None = None,
                         config: BuildStarsConfig | None = None) -> SnapshotSummary:
    """Compute the catalogs from one read transaction and write them atomically to out_dir."""
    from streamstars.io.snapshot_files import write_snapshot

    start = time.perf_counter()
    with store.read(buffers=True) as tx:
        catalogs, stars = build_catalogs(store, tx, config)
    catalogs.metadata.update(extra_metadata or {})
    files = write_snapshot(Path(out_dir), catalogs, formats=formats)
    return SnapshotSummary(Path(out_dir), len(catalogs.visits["visit"]), len(stars.star_id),
                           len(stars.observations["source_id"]), time.perf_counter() - start,
                           list(files))
