"""Incremental association with fgcm's seeding semantics (see docs/association.md).

fgcm seeds stars per primary band greedily: in canonical order (visit, sourceId) an
observation that is not yet covered and has >= ``minPerBand`` same-band observations within
``matchRadius`` (itself included) seeds a candidate at the mean of that group and covers it.
That greedy decomposes exactly over the 1" friends-of-friends (FoF) *components* of a band's
observations, and a component whose members are pairwise within 1" (a *clique*) yields exactly
one candidate: the mean of all members, seeded by its earliest member.  Components only grow or
merge when observations arrive, so the store keeps, per primary band, one record per component
(keyed by the HEALPix pixel of its centre): member count, exact integer vector sums, an upper
bound ``rmax`` on the member distance from the centre, the clique flag and the seed.  Non-clique
components (close pairs, deblend duplicates, chains: rare) also keep the candidates of their
replayed greedy.

Per visit and band only the components within reach of the new observations are read; the
new observations and the components they link to form connected groups, and each group takes
one path:
- *lone*: an observation linked to nothing starts a singleton component;
- *join* (vectorised): observations surely within 1" of every member of one clique (triangle
  inequality with ``rmax``) and of each other keep it a clique;
- *in order*: a group linked to one *tracked* component (one with a stored member list) whose
  members all precede it in canonical order extends that component's greedy;
- *exact*: anything else (merges, unsure links to untracked components, groups of new
  observations only) is resolved from the member lists of the components involved, or, the
  first time a component is involved, from the stored observations of the fine sub-pixels
  around it; the resulting components are tracked from then on.
Unsure links to tracked components are first settled from their member lists.
Candidates, cross-band merging, isolation, membership, requiredBands and the density cut are
derived from the components at snapshot time (:mod:`streamstars.snapshot`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import lmdb
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from streamstars.columns import OBSERVATION_DTYPES, ColumnDict, concat, take
from streamstars.errors import StateError
from streamstars.sky import (
    chord_from_arcsec,
    fixed_unit_vectors,
    kdtree,
    normalized,
    pairs_within,
    pixels_in_discs,
    pixels_near,
    pixels_of,
    self_pairs_within,
    vectors_from_fixed,
    with_neighbours,
)
from streamstars.state.codec import ColumnReader, decode_columns, encode_columns
from streamstars.state.store import (
    DB_CANDIDATES,
    DB_COMPONENTS,
    DB_MEMBERS,
    DB_META,
    DB_OBSERVATIONS,
    StarStore,
    band_key,
    int_key,
    observation_key,
    pixel_key,
)

#: Safety margin (chord units, ~2e-7 arcsec) so that bound-based decisions are never
#: flipped by floating-point rounding; anything inside the margin takes the exact path.
EPS = 1e-12

COMPONENT_DTYPES: dict[str, np.dtype] = {
    "comp_id": np.dtype(np.int64),  # smallest member sourceId (unique per band)
    "count": np.dtype(np.int64),
    "sx": np.dtype(np.int64),
    "sy": np.dtype(np.int64),
    "sz": np.dtype(np.int64),
    "rmax": np.dtype(np.float64),  # chord upper bound of member distance from the centre
    "clique": np.dtype(np.bool_),
    "seed_visit": np.dtype(np.int64),
    "seed_src": np.dtype(np.int64),
    "tracked": np.dtype(np.bool_),  # its member list is kept in the ``members`` sub-database
}

#: One member of a tracked component (row-oriented so that appending is a byte concatenation).
MEMBER_DTYPE = np.dtype([("source_id", "<i8"), ("visit", "<i8"), ("x", "<i8"), ("y", "<i8"),
                         ("z", "<i8")])

CANDIDATE_DTYPES: dict[str, np.dtype] = {
    "comp_id": np.dtype(np.int64),
    "star_id": np.dtype(np.int64),  # smallest sourceId of the candidate's group
    "count": np.dtype(np.int64),
    "sx": np.dtype(np.int64),
    "sy": np.dtype(np.int64),
    "sz": np.dtype(np.int64),
    "seed_visit": np.dtype(np.int64),
    "seed_src": np.dtype(np.int64),
}


@dataclass
class BandUpdateStats:
    """What one band's update did (for logs, metrics and tests)."""

    fast: int = 0  # observations that joined a clique that stays one (join path)
    extended: int = 0  # observations that extended a tracked component's greedy (in order)
    new_singletons: int = 0
    slow_observations: int = 0
    slow_components: int = 0
    untracked_components: int = 0  # involved components whose members had to be re-read
    region_observations: int = 0  # stored observations read for them
    components_in_reach: int = 0  # component records loaded: the local work besides new ones


# ---------------------------------------------------------------------------------------------
# exact component summaries from member observations
# ---------------------------------------------------------------------------------------------
def centres_of(records: ColumnDict) -> np.ndarray:
    """Unit-vector centres (n, 3) of component or candidate records (from their sums)."""
    if len(records["sx"]) == 0:
        return np.zeros((0, 3))
    return normalized(np.stack([records["sx"], records["sy"], records["sz"]], axis=1))


def fof_labels(vectors: np.ndarray, radius_chord: float) -> np.ndarray:
    """Friends-of-friends labels (0..k-1) of vectors within ``radius_chord``."""
    if len(vectors) == 0:
        return np.zeros(0, dtype=np.int64)
    edges = kdtree(vectors).query_pairs(radius_chord, output_type="ndarray").astype(np.int64)
    return labels_from_edges(len(vectors), edges)


def labels_from_edges(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component labels (0..k-1) of ``n`` nodes joined by ``edges`` (m, 2)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                       shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def summarize_pieces(visit: np.ndarray, source_id: np.ndarray, fixed: np.ndarray,
                     labels: np.ndarray, radius: float, min_per_band: int,
                     known_nonclique: np.ndarray | None = None
                     ) -> tuple[ColumnDict, ColumnDict]:
    """Component records (and non-clique candidates) of complete FoF pieces.

    ``labels`` (every value 0..max occurring) gives each row's piece; every observation
    within ``radius`` of a row must be in the rows and in the same piece.  Neighbour counts
    come from a k-d tree (no pair list is built: the pieces of close pairs are dense).
    Returns (components, candidates).
    """
    if len(labels) == 0:
        return ({k: np.zeros(0, dt) for k, dt in COMPONENT_DTYPES.items()},
                {k: np.zeros(0, dt) for k, dt in CANDIDATE_DTYPES.items()})
    v_rows = vectors_from_fixed(fixed)
    tree = kdtree(v_rows)
    order = np.lexsort((source_id, visit, labels))
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    count = np.diff(np.r_[starts, len(lab)])
    skip = np.zeros(len(count), dtype=bool) if known_nonclique is None or min_per_band > 2 \
        else known_nonclique & (count >= 2)
    n_near = np.full(len(labels), 2, dtype=np.int64)  # stands for ">= 2" in skipped pieces
    counted = ~skip[labels]
    if counted.any():
        n_near[counted] = tree.query_ball_point(v_rows[counted], radius, return_length=True)
    sums = np.add.reduceat(fixed[order], starts, axis=0)
    comp_id = np.minimum.reduceat(source_id[order], starts)
    centres = normalized(sums)
    offsets = v_rows[order] - np.repeat(centres, count, axis=0)
    dist = np.sqrt(np.einsum("ij,ij->i", offsets, offsets))
    rmax = np.maximum.reduceat(dist, starts) + EPS
    # a piece is a clique when every member has every member within the radius
    clique = (np.minimum.reduceat(n_near[order], starts) == count) & ~skip
    components = {
        "comp_id": comp_id, "count": count.astype(np.int64),
        "sx": sums[:, 0], "sy": sums[:, 1], "sz": sums[:, 2],
        "rmax": rmax, "clique": clique,
        "seed_visit": visit[order][starts], "seed_src": source_id[order][starts],
        "tracked": np.zeros(len(count), dtype=bool),
    }
    candidates = _replay_greedy(visit, source_id, fixed, labels, tree, n_near, ~clique[labels],
                                comp_id, radius, min_per_band)
    return components, candidates


def _replay_greedy(visit: np.ndarray, source_id: np.ndarray, fixed: np.ndarray,
                   labels: np.ndarray, tree: cKDTree, n_near: np.ndarray, rows: np.ndarray,
                   comp_id_of_label: np.ndarray, radius: float, min_per_band: int
                   ) -> ColumnDict:
    """fgcm's greedy seeding replayed on the rows ``rows`` (members of non-clique pieces).

    Pieces are independent, so one pass in canonical (label, visit, sourceId) order replays
    them all.  The loop runs over potential seeds only (observations with enough
    neighbours) and queries the tree for each seed's group: the rare non-clique components
    are the only place association loops in Python.
    """
    empty = {k: np.zeros(0, dt) for k, dt in CANDIDATE_DTYPES.items()}
    if not rows.any():
        return empty
    canonical = np.lexsort((source_id, visit, labels))
    potential = canonical[rows[canonical] & (n_near[canonical] >= min_per_band)]
    covered = np.zeros(len(labels), dtype=bool)
    v_rows = tree.data
    seeds: list[int] = []
    groups: list[np.ndarray] = []
    for r in potential.tolist():
        if covered[r]:
            continue
        group = np.asarray(tree.query_ball_point(v_rows[r], radius), dtype=np.int64)
        covered[group] = True
        seeds.append(r)
        groups.append(group)
    if not seeds:
        return empty
    seed = np.asarray(seeds, dtype=np.int64)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    members = np.concatenate(groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sums = np.add.reduceat(fixed[members], starts, axis=0)
    return {
        "comp_id": comp_id_of_label[labels[seed]].astype(np.int64),
        "star_id": np.minimum.reduceat(source_id[members], starts).astype(np.int64),
        "count": sizes,
        "sx": sums[:, 0], "sy": sums[:, 1], "sz": sums[:, 2],
        "seed_visit": visit[seed].astype(np.int64), "seed_src": source_id[seed].astype(np.int64),
    }


# ---------------------------------------------------------------------------------------------
# store access
# ---------------------------------------------------------------------------------------------
def _load_pixel_records(store: StarStore, txn: lmdb.Transaction, db: bytes, band: str,
                        pixels: np.ndarray, schema: dict[str, np.dtype]
                        ) -> tuple[ColumnDict, np.ndarray]:
    """Writable columnar records of ``band`` under ``pixels`` in ``db`` and their pixels."""
    parts, pix = [], []
    for pixel in pixels:
        store.note_access()
        raw = txn.get(pixel_key(band, int(pixel)), db=store.dbs[db])
        if raw is not None:
            part = decode_columns(bytes(raw), schema)
            parts.append(part)
            pix.append(np.full(len(part["comp_id"]), pixel, dtype=np.int64))
    records = concat(parts, schema)
    if len(parts) == 1:  # concat copies several parts; one part is a read-only view
        records = {k: np.array(v) for k, v in records.items()}
    return records, (np.concatenate(pix) if pix else np.zeros(0, dtype=np.int64))


def load_components(store: StarStore, txn: lmdb.Transaction, band: str,
                    pixels: np.ndarray) -> tuple[ColumnDict, np.ndarray]:
    """Component records of ``band`` in ``pixels`` and the pixel each came from."""
    return _load_pixel_records(store, txn, DB_COMPONENTS, band, pixels, COMPONENT_DTYPES)


def load_candidates(store: StarStore, txn: lmdb.Transaction, band: str,
                    pixels: np.ndarray) -> tuple[ColumnDict, np.ndarray]:
    """Non-clique candidates of ``band`` stored under ``pixels`` and their pixels."""
    return _load_pixel_records(store, txn, DB_CANDIDATES, band, pixels, CANDIDATE_DTYPES)


#: Observations are stored per (band, storeNside pixel, visit), rows sorted by their pixel at
#: ``storeNside * FINE_FACTOR`` (nest, so fine // FINE_FACTOR**2 is the store pixel): exact
#: work reads only the rows of the few fine pixels (~13" at nside 256) it needs.
FINE_FACTOR = 64
_FINE_SHIFT = 12  # log2(FINE_FACTOR**2)
STORED_OBSERVATION_DTYPES: dict[str, np.dtype] = {**OBSERVATION_DTYPES,
                                                  "fine_pixel": np.dtype(np.int64)}

#: The observation columns the association needs (identity and position).
POSITION_COLUMNS = frozenset({"source_id", "visit", "ra", "dec"})
POSITION_DTYPES = {k: v for k, v in OBSERVATION_DTYPES.items() if k in POSITION_COLUMNS}
_OBS_READER = ColumnReader(STORED_OBSERVATION_DTYPES)


def write_observations(store: StarStore, txn: lmdb.Transaction, band: str, visit: int,
                       obs: ColumnDict) -> list[int]:
    """Store one visit's observations per pixel; returns the pixels written (sorted)."""
    if len(obs["source_id"]) == 0:
        return []
    nside = store.config.storeNside
    # the same fixed-point vectors as the association, so keys and geometry always agree
    v = vectors_from_fixed(fixed_unit_vectors(obs["ra"], obs["dec"]))
    fine = pixels_of(v, nside * FINE_FACTOR)
    order = np.lexsort((obs["source_id"], fine))
    rows = {**take(obs, order), "fine_pixel": fine[order]}
    pixel = fine[order] >> _FINE_SHIFT
    bounds = np.flatnonzero(np.r_[True, pixel[1:] != pixel[:-1], True])
    db = store.dbs[DB_OBSERVATIONS]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        store.note_access()
        txn.put(observation_key(band, int(pixel[lo]), visit),
                encode_columns({k: c[lo:hi] for k, c in rows.items()},
                               STORED_OBSERVATION_DTYPES), db=db)
    return pixel[bounds[:-1]].tolist()


def load_observations(store: StarStore, txn: lmdb.Transaction, band: str,
                      pixels: np.ndarray) -> ColumnDict:
    """Identity and position (source_id, visit, ra, dec) of every stored observation of
    ``band`` in ``pixels`` (all visits)."""
    parts = []
    for pixel in pixels:
        prefix = pixel_key(band, int(pixel))
        for _, value in store.prefix_items(txn, DB_OBSERVATIONS, prefix):
            parts.append(decode_columns(value, STORED_OBSERVATION_DTYPES, POSITION_COLUMNS))
    return concat(parts, POSITION_DTYPES)


def load_observations_near(store: StarStore, txn: lmdb.Transaction, band: str,
                           centres: np.ndarray, radii_chord: np.ndarray) -> ColumnDict:
    """Identity and position of the stored observations of ``band`` in the fine pixels
    touching discs (centre unit vectors, chord radii): a superset of those in the discs."""
    fine = pixels_in_discs(centres, radii_chord, store.config.storeNside * FINE_FACTOR)
    coarse = fine >> _FINE_SHIFT
    parts = []
    for pixel in np.unique(coarse).tolist():
        wanted = fine[coarse == pixel]
        # in place: only the fine-pixel column and the rows wanted are read from the map
        for _, value in store.prefix_items(txn, DB_OBSERVATIONS, pixel_key(band, pixel),
                                           copy=False):
            store.note_access()
            n = _OBS_READER.rows(value)
            fp = _OBS_READER.column(value, "fine_pixel", n)
            lo, hi = np.searchsorted(fp, wanted), np.searchsorted(fp, wanted, side="right")
            hit = hi > lo
            if not hit.any():
                continue
            lo, length = lo[hit], (hi - lo)[hit]
            rows = np.repeat(lo - np.cumsum(length) + length, length) + np.arange(length.sum())
            parts.append({name: _OBS_READER.column(value, name, n)[rows]
                          for name in POSITION_DTYPES})
    return concat(parts, POSITION_DTYPES)


def _write_grouped(store: StarStore, txn: lmdb.Transaction, db: bytes, band: str,
                   table: ColumnDict, pixel: np.ndarray, pixels_to_write: np.ndarray,
                   schema: dict[str, np.dtype]) -> None:
    """Write ``table`` rows grouped by ``pixel`` for each of ``pixels_to_write`` (sorted by id)."""
    handle = store.dbs[db]
    order = np.lexsort((table["comp_id"], pixel))
    sorted_pixels = pixel[order]
    for p in pixels_to_write:
        lo, hi = np.searchsorted(sorted_pixels, [p, p + 1])
        key = pixel_key(band, int(p))
        store.note_access()
        if hi > lo:
            txn.put(key, encode_columns(take(table, order[lo:hi]), schema), db=handle)
        else:
            txn.delete(key, db=handle)


def _max_rmax_key(band: str) -> bytes:
    return b"max_rmax:" + band.encode()


def max_rmax(store: StarStore, txn: lmdb.Transaction, band: str) -> float:
    """An upper bound on ``rmax`` of every stored component of ``band`` (chord).

    Kept in the ``meta`` sub-database and raised whenever components are written; a store
    written before the bound existed gets it computed once from its components.
    """
    raw = txn.get(_max_rmax_key(band), db=store.dbs[DB_META])
    if raw is not None:
        return float(struct.unpack("<d", bytes(raw))[0])
    bound = 0.0
    for _, value in store.prefix_items(txn, DB_COMPONENTS, band_key(band)):
        rmax = decode_columns(value, COMPONENT_DTYPES, frozenset({"rmax"}))["rmax"]
        bound = max(bound, float(rmax.max(initial=0.0)))
    _set_max_rmax(store, txn, band, bound)
    return bound


def _set_max_rmax(store: StarStore, txn: lmdb.Transaction, band: str, bound: float) -> None:
    txn.put(_max_rmax_key(band), struct.pack("<d", bound), db=store.dbs[DB_META])


def _write_components(store: StarStore, txn: lmdb.Transaction, band: str, table: ColumnDict,
                      pixel: np.ndarray, pixels_to_write: np.ndarray) -> None:
    """Write the component records of ``pixels_to_write`` and keep the ``rmax`` bound."""
    _write_grouped(store, txn, DB_COMPONENTS, band, table, pixel, pixels_to_write,
                   COMPONENT_DTYPES)
    if len(table["rmax"]):
        top = float(table["rmax"].max())
        if top > max_rmax(store, txn, band):
            _set_max_rmax(store, txn, band, top)


# ---------------------------------------------------------------------------------------------
# per-visit update
# ---------------------------------------------------------------------------------------------
def add_observations(store: StarStore, txn: lmdb.Transaction, band: str,
                     obs: ColumnDict) -> BandUpdateStats:
    """Fold one visit's new observations of primary ``band`` into the components.

    The observations must already be written to the observation store in ``txn``.
    """
    config = store.config
    nside = config.storeNside
    radius = _match_chord(config.matchRadius)
    stats = BandUpdateStats()
    n_new = len(obs["source_id"])
    if n_new == 0:
        return stats
    fixed_new = fixed_unit_vectors(obs["ra"], obs["dec"])
    v_new = vectors_from_fixed(fixed_new)
    # every component whose centre is within reach of a new observation
    loaded_pixels = pixels_near(v_new, nside, radius + max_rmax(store, txn, band) + 2 * EPS)
    comps, comp_pixel = load_components(store, txn, band, loaded_pixels)
    n_comp = len(comps["comp_id"])
    stats.components_in_reach = n_comp
    centres = centres_of(comps)

    tree_new = kdtree(v_new)
    # links new observation -> component (everything not surely out of reach); the centres
    # are looked up in the new observations' tree, which is built anyway: no second tree
    if n_comp:
        reach = radius + float(comps["rmax"].max()) + EPS
        link_comp, link_new, dist = pairs_within(centres, tree_new, reach)
        rmax = comps["rmax"][link_comp]
        keep = dist - rmax <= radius + EPS
        link_new, link_comp, dist, rmax = link_new[keep], link_comp[keep], dist[keep], rmax[keep]
        sure = dist + rmax <= radius - EPS
    else:
        link_new = link_comp = np.zeros(0, dtype=np.int64)
        sure = np.zeros(0, dtype=bool)
    new_pairs = self_pairs_within(tree_new, radius)
    if n_comp:
        link_new, link_comp, sure = _refine_unsure_links(
            store, txn, band, comps, v_new, link_new, link_comp, sure, radius)

    groups = _link_groups(n_new, n_comp, new_pairs, link_new, link_comp, sure, comps)
    lone = groups.lone
    changed = np.zeros(n_comp, dtype=bool)
    deleted = np.zeros(n_comp, dtype=bool)

    # group join: observations that are all surely within reach of every member of one clique
    # and of each other keep it a clique (sums, bound and seed updated in place)
    join_idx = np.flatnonzero(groups.join)
    if len(join_idx):
        j_obs = groups.comp_of_obs[join_idx]
        j = np.unique(j_obs)
        old_centre = centres[j]
        added_fixed = np.zeros((n_comp, 3), dtype=np.int64)
        np.add.at(added_fixed, j_obs, fixed_new[join_idx])
        comps["count"][j] += np.bincount(j_obs, minlength=n_comp)[j]
        for axis, key in enumerate(("sx", "sy", "sz")):
            comps[key][j] += added_fixed[j, axis]
        centres[j] = centres_of({k: comps[k][j] for k in ("sx", "sy", "sz")})
        shift = np.linalg.norm(centres[j] - old_centre, axis=1)
        own = np.zeros(n_comp)
        np.maximum.at(own, j_obs, np.linalg.norm(v_new[join_idx] - centres[j_obs], axis=1))
        comps["rmax"][j] = np.maximum(comps["rmax"][j] + shift, own[j]) + EPS
        # the earliest new observation of each component (canonical order) may seed it now
        first = np.lexsort((obs["source_id"][join_idx], obs["visit"][join_idx], j_obs))
        first = first[np.r_[True, j_obs[first][1:] != j_obs[first][:-1]]]
        f_visit, f_src = obs["visit"][join_idx][first], obs["source_id"][join_idx][first]
        earlier = (f_visit < comps["seed_visit"][j]) | (
            (f_visit == comps["seed_visit"][j]) & (f_src < comps["seed_src"][j]))
        comps["seed_visit"][j] = np.where(earlier, f_visit, comps["seed_visit"][j])
        comps["seed_src"][j] = np.where(earlier, f_src, comps["seed_src"][j])
        old_id = comps["comp_id"].copy()
        np.minimum.at(comps["comp_id"], j_obs, obs["source_id"][join_idx])
        in_tracked = comps["tracked"][j_obs]
        if in_tracked.any():
            _append_members(store, txn, band, old_id, comps["comp_id"], j_obs[in_tracked],
                            _member_rows(obs["source_id"][join_idx][in_tracked],
                                         obs["visit"][join_idx][in_tracked],
                                         fixed_new[join_idx][in_tracked]))
        changed[j] = True
        stats.fast = len(join_idx)

    # observations that come after every member of one tracked component (canonical order):
    # its greedy seeding is extended, not replayed
    slow = ~(groups.join | lone)
    ext_comps = {k: np.zeros(0, dt) for k, dt in COMPONENT_DTYPES.items()}
    ext_cands = {k: np.zeros(0, dt) for k, dt in CANDIDATE_DTYPES.items()}
    ext_idx = np.flatnonzero(groups.extend)
    if len(ext_idx) and config.minPerBand <= 2:
        ext_comps, ext_cands, done = _extend_in_order(
            store, txn, band, comps, comp_pixel, groups.comp_of_obs[ext_idx], obs,
            fixed_new, ext_idx, new_pairs, radius, config.minPerBand)
        slow[ext_idx[done]] = False
        deleted[np.unique(groups.comp_of_obs[ext_idx[done]])] = True
        stats.extended = int(done.sum())

    # lone observations: singleton components
    lone_idx = np.flatnonzero(lone)
    singles = {
        "comp_id": obs["source_id"][lone_idx], "count": np.ones(len(lone_idx), np.int64),
        "sx": fixed_new[lone_idx, 0], "sy": fixed_new[lone_idx, 1], "sz": fixed_new[lone_idx, 2],
        "rmax": np.full(len(lone_idx), EPS), "clique": np.ones(len(lone_idx), bool),
        "seed_visit": obs["visit"][lone_idx], "seed_src": obs["source_id"][lone_idx],
        "tracked": np.zeros(len(lone_idx), bool),
    }
    stats.new_singletons = len(lone_idx)

    # slow path: exact FoF over the stored members of the components involved
    slow_idx = np.flatnonzero(slow)
    slow_comps = {k: np.zeros(0, dt) for k, dt in COMPONENT_DTYPES.items()}
    slow_cands = {k: np.zeros(0, dt) for k, dt in CANDIDATE_DTYPES.items()}
    if len(slow_idx):
        involved = np.unique(link_comp[slow[link_new]])
        if np.any(deleted[involved]):
            raise AssertionError("a component is both extended and resolved exactly")
        slow_comps, slow_cands = _resolve_exactly(
            store, txn, band, take(obs, slow_idx), fixed_new[slow_idx],
            {k: v[involved] for k, v in comps.items()}, centres[involved], stats)
        deleted[involved] = True
        stats.slow_observations = len(slow_idx)
        stats.slow_components = len(involved)

    # write back every pixel whose component set changed
    removed_noncliques = comps["comp_id"][deleted & ~comps["clique"]]
    removed_nonclique_pixels = comp_pixel[deleted & ~comps["clique"]]
    new_pixel = comp_pixel.copy()  # only a changed component can move to another pixel
    new_pixel[changed] = pixels_of(centres[changed], nside)
    added = concat([singles, slow_comps, ext_comps], COMPONENT_DTYPES)
    added_pixel = pixels_of(centres_of(added), nside)
    dirty = np.unique(np.concatenate([
        comp_pixel[changed | deleted], new_pixel[changed], added_pixel]))
    keep_rows = ~deleted & np.isin(new_pixel, dirty)
    outside = np.setdiff1d(dirty, loaded_pixels)
    extra, extra_pixel = load_components(store, txn, band, outside)
    table = concat([take(comps, keep_rows), added, extra], COMPONENT_DTYPES)
    table_pixel = np.concatenate([new_pixel[keep_rows], added_pixel, extra_pixel])
    _write_components(store, txn, band, table, table_pixel, dirty)

    new_cands = concat([slow_cands, ext_cands], CANDIDATE_DTYPES)
    if len(removed_noncliques) or len(new_cands["comp_id"]):
        _update_candidates(store, txn, band, removed_noncliques, removed_nonclique_pixels,
                           concat([slow_comps, ext_comps], COMPONENT_DTYPES), new_cands)
    return stats


@dataclass
class _Groups:
    """How each new observation of a visit is folded in (see :func:`_link_groups`)."""

    lone: np.ndarray  # bool per new observation: linked to nothing -> singleton component
    join: np.ndarray  # bool: its group keeps one clique a clique
    extend: np.ndarray  # bool: its group touches exactly one tracked component (candidates)
    comp_of_obs: np.ndarray  # the one component of its group (-1 if none or several)


def _link_groups(n_new: int, n_comp: int, new_pairs: np.ndarray, link_new: np.ndarray,
                 link_comp: np.ndarray, sure: np.ndarray, comps: ColumnDict) -> _Groups:
    """Connected groups of new observations and the components they link to.

    A group of new observations linked to exactly one clique, every observation surely within
    reach of every member (a sure link) and of every other observation of the group, keeps it
    a clique (*join*).  Any other group linked to exactly one *tracked* component can be
    extended from its member list (*extend*; checked further by :func:`_extend_in_order`).
    Everything else is resolved exactly.
    """
    edges = np.concatenate([new_pairs, np.stack([link_new, n_new + link_comp], axis=1)])
    label = labels_from_edges(n_new + n_comp, edges.astype(np.int64))
    n_groups = int(label.max()) + 1
    g_new = label[:n_new]
    linked = np.bincount(link_comp, minlength=n_comp) > 0
    g_comp = label[n_new:][linked]
    new_in = np.bincount(g_new, minlength=n_groups)
    comps_in = np.bincount(g_comp, minlength=n_groups)
    comp_of_group = np.full(n_groups, -1, dtype=np.int64)
    comp_of_group[g_comp] = np.flatnonzero(linked)
    comp_of_group[comps_in != 1] = -1
    pairs_in = np.bincount(g_new[new_pairs[:, 0]], minlength=n_groups) if len(new_pairs) \
        else np.zeros(n_groups, dtype=np.int64)
    n_links = np.bincount(link_new, minlength=n_new)
    not_sure = (n_links != 1) | (np.bincount(link_new[~sure], minlength=n_new) > 0)
    all_sure = np.bincount(g_new[not_sure], minlength=n_groups) == 0
    one = comp_of_group >= 0
    target = comp_of_group[one]
    join_g, extend_g = np.zeros(n_groups, dtype=bool), np.zeros(n_groups, dtype=bool)
    join_g[one] = comps["clique"][target] & all_sure[one] & (
        pairs_in[one] == new_in[one] * (new_in[one] - 1) // 2)
    extend_g[one] = ~join_g[one] & comps["tracked"][target]
    lone_g = (new_in == 1) & (comps_in == 0)
    return _Groups(lone=lone_g[g_new], join=join_g[g_new], extend=extend_g[g_new],
                   comp_of_obs=comp_of_group[g_new])


def _extend_in_order(store: StarStore, txn: lmdb.Transaction, band: str, comps: ColumnDict,
                     comp_pixel: np.ndarray, owner: np.ndarray, obs: ColumnDict,
                     fixed_new: np.ndarray, rows: np.ndarray, new_pairs: np.ndarray,
                     radius: float, min_per_band: int
                     ) -> tuple[ColumnDict, ColumnDict, np.ndarray]:
    """Extend fgcm's greedy of tracked components by new observations that come last.

    ``rows`` are new observations, ``owner`` the one tracked component each is connected to.
    When every member of a component precedes its new observations in canonical order and
    ``min_per_band`` <= 2, every member is already covered or a seed (a member of a FoF
    component of two or more has a neighbour; a lone member becomes a seed now), so the old
    decisions stand: each old candidate's group gains the new observations within the radius
    of its seed, and the new observations then seed, in canonical order, when uncovered with
    enough neighbours.  No work is proportional to the number of other components.

    Returns (updated component records, their explicit candidates, per row: done).  Rows not
    done (a member is not earlier, or a distance sits within rounding of the radius) are left
    for the exact path.
    """
    done = np.zeros(len(rows), dtype=bool)
    empty = ({k: np.zeros(0, dt) for k, dt in COMPONENT_DTYPES.items()},
             {k: np.zeros(0, dt) for k, dt in CANDIDATE_DTYPES.items()})
    targets, slot = np.unique(owner, return_inverse=True)
    members = _read_members(store, txn, band, comps["comp_id"][targets])
    counts = comps["count"][targets]
    if len(members) != counts.sum():
        raise StateError(f"store is inconsistent: band {band} member lists do not match the "
                         "component counts; rebuild the store")
    m_slot = np.repeat(np.arange(len(targets)), counts)
    m_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    m_fixed, m_vec = _member_vectors(members)
    v_rows = vectors_from_fixed(fixed_new[rows])
    # every (new observation, member of its component) pair
    pair_row, pair_member, dist = _member_distances(v_rows, m_vec, m_start[slot], counts[slot])
    within = dist <= radius
    # usable: members strictly earlier, no distance within rounding of the radius
    latest = np.maximum.reduceat(members["visit"], m_start) if len(members) else counts
    ok = latest < np.minimum.reduceat(obs["visit"][rows][np.argsort(slot, kind="stable")],
                                      np.searchsorted(np.sort(slot), np.arange(len(targets))))
    ambiguous = np.abs(dist - radius) <= EPS
    ok &= np.bincount(slot[pair_row[ambiguous]], minlength=len(targets)) == 0
    if not ok.any():
        return (*empty, done)
    done = ok[slot]

    # old candidates: explicit ones of non-cliques, the implicit one of a clique
    nonclique = ~comps["clique"][targets]
    stored, _ = load_candidates(store, txn, band, np.unique(comp_pixel[targets[nonclique]]))
    stored = take(stored, np.isin(stored["comp_id"], comps["comp_id"][targets[nonclique & ok]]))
    cl = targets[~nonclique & ok]
    implicit = {"comp_id": comps["comp_id"][cl], "star_id": comps["comp_id"][cl],
                "count": comps["count"][cl], "sx": comps["sx"][cl], "sy": comps["sy"][cl],
                "sz": comps["sz"][cl], "seed_visit": comps["seed_visit"][cl],
                "seed_src": comps["seed_src"][cl]}
    cands = {k: np.array(v) for k, v in concat([stored, implicit], CANDIDATE_DTYPES).items()}
    by_src = np.argsort(members["source_id"])
    seed_member = by_src[np.searchsorted(members["source_id"], cands["seed_src"],
                                         sorter=by_src)] if len(cands["seed_src"]) else \
        np.zeros(0, dtype=np.int64)
    if len(seed_member) and np.any(members["source_id"][seed_member] != cands["seed_src"]):
        raise StateError(f"store is inconsistent: band {band} candidate seeds are not members "
                         "of their components; rebuild the store")
    cand_of_member = np.full(len(members), -1, dtype=np.int64)
    cand_of_member[seed_member] = np.arange(len(seed_member))

    # old candidates gain the new observations within the radius of their seed
    use = within & done[pair_row]
    gains = use & (cand_of_member[pair_member] >= 0)
    g_cand, g_row = cand_of_member[pair_member[gains]], rows[pair_row[gains]]
    np.add.at(cands["count"], g_cand, 1)
    for axis, key in enumerate(("sx", "sy", "sz")):
        np.add.at(cands[key], g_cand, fixed_new[g_row, axis])
    np.minimum.at(cands["star_id"], g_cand, obs["source_id"][g_row])
    covered = np.bincount(pair_row[gains], minlength=len(rows)) > 0

    # neighbours of each new observation: members, other new observations, itself
    local = np.full(len(obs["source_id"]), -1, dtype=np.int64)
    local[rows] = np.arange(len(rows))
    pr = local[new_pairs] if len(new_pairs) else np.zeros((0, 2), dtype=np.int64)
    pr = pr[(pr >= 0).all(axis=1)] if len(pr) else pr
    n_near = np.bincount(pair_row[use], minlength=len(rows)) + 1 + np.bincount(
        pr.ravel(), minlength=len(rows))
    # new seeds: uncovered with enough neighbours, in canonical order (rare: a new star)
    potential = np.flatnonzero(done & ~covered & (n_near >= min_per_band))
    new_cands = []
    if len(potential):
        neighbours: dict[int, list[int]] = {}
        for a, b in pr.tolist():
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
        order = potential[np.lexsort((obs["source_id"][rows[potential]],
                                      obs["visit"][rows[potential]], slot[potential]))]
        for r in order.tolist():
            if covered[r]:
                continue
            near_new = np.array([r, *neighbours.get(r, [])], dtype=np.int64)
            near_members = pair_member[(pair_row == r) & within]
            covered[near_new] = True
            group_src = np.concatenate([members["source_id"][near_members],
                                        obs["source_id"][rows[near_new]]])
            group_sum = m_fixed[near_members].sum(axis=0) + fixed_new[rows[near_new]].sum(axis=0)
            new_cands.append({
                "comp_id": np.array([0]), "star_id": np.array([group_src.min()]),
                "count": np.array([len(group_src)]), "sx": np.array([group_sum[0]]),
                "sy": np.array([group_sum[1]]), "sz": np.array([group_sum[2]]),
                "seed_visit": np.array([obs["visit"][rows[r]]]),
                "seed_src": np.array([obs["source_id"][rows[r]]]),
                "_slot": np.array([slot[r]])})

    # the extended component records
    t = np.flatnonzero(ok)
    rows_ok = np.flatnonzero(done)
    s_ok = slot[rows_ok]
    add_fixed = np.zeros((len(targets), 3), dtype=np.int64)
    np.add.at(add_fixed, s_ok, fixed_new[rows[rows_ok]])
    min_src = np.full(len(targets), np.iinfo(np.int64).max)
    np.minimum.at(min_src, s_ok, obs["source_id"][rows[rows_ok]])
    out = take(comps, targets)
    out["count"] = out["count"] + np.bincount(s_ok, minlength=len(targets))
    for axis, key in enumerate(("sx", "sy", "sz")):
        out[key] = out[key] + add_fixed[:, axis]
    old_ids = out["comp_id"].copy()
    out["comp_id"] = np.minimum(out["comp_id"], min_src)
    centre = centres_of(out)
    m_off = m_vec - centre[m_slot]
    n_off = v_rows[rows_ok] - centre[s_ok]
    rmax = np.zeros(len(targets))
    np.maximum.at(rmax, m_slot, np.sqrt(np.einsum("ij,ij->i", m_off, m_off)))
    np.maximum.at(rmax, s_ok, np.sqrt(np.einsum("ij,ij->i", n_off, n_off)))
    out["rmax"] = rmax + EPS
    # a clique stays one when every new observation is within the radius of every member and
    # of every other new observation
    far = np.bincount(slot[pair_row[~within]], minlength=len(targets)) > 0
    k_new = np.bincount(slot, minlength=len(targets))
    k_pairs = np.bincount(slot[pr[:, 0]], minlength=len(targets)) if len(pr) else \
        np.zeros(len(targets), dtype=np.int64)
    out["clique"] = out["clique"] & ~far & (k_pairs == k_new * (k_new - 1) // 2)
    out["tracked"] = np.ones(len(targets), dtype=bool)
    # member lists: old bytes + the new rows
    new_rows = _member_rows(obs["source_id"][rows], obs["visit"][rows], fixed_new[rows])
    order = rows_ok[np.argsort(s_ok, kind="stable")]
    bounds = np.searchsorted(slot[order], np.arange(len(targets) + 1))
    for k in t.tolist():
        value = members[m_start[k]:m_start[k] + counts[k]].tobytes() + \
            new_rows[order[bounds[k]:bounds[k + 1]]].tobytes()
        if old_ids[k] != out["comp_id"][k]:
            store.cached_delete(txn, DB_MEMBERS, member_key(band, int(old_ids[k])))
        store.cached_put(txn, DB_MEMBERS, member_key(band, int(out["comp_id"][k])), value)
    # candidates of the components that are not cliques now, under their new ids
    by_old = np.argsort(old_ids[t])
    cands["comp_id"] = out["comp_id"][t][by_old][np.searchsorted(old_ids[t], cands["comp_id"],
                                                                 sorter=by_old)]
    if new_cands:
        extra = {k: np.concatenate([c[k] for c in new_cands]) for k in new_cands[0]}
        extra["comp_id"] = out["comp_id"][extra.pop("_slot")]
        cands = concat([cands, extra], CANDIDATE_DTYPES)
    still_clique = out["comp_id"][t[out["clique"][t]]]
    cands = take(cands, ~np.isin(cands["comp_id"], still_clique))
    return take(out, ok), cands, done


def member_key(band: str, comp_id: int) -> bytes:
    """Key of a tracked component's member list."""
    return band_key(band) + int_key(comp_id)


def _member_rows(source_id: np.ndarray, visit: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    rows = np.zeros(len(source_id), dtype=MEMBER_DTYPE)
    rows["source_id"], rows["visit"] = source_id, visit
    rows["x"], rows["y"], rows["z"] = fixed[:, 0], fixed[:, 1], fixed[:, 2]
    return rows


def _member_list(store: StarStore, txn: lmdb.Transaction, band: str, comp_id: int) -> bytes:
    raw = store.cached_get(txn, DB_MEMBERS, member_key(band, comp_id))
    if raw is None:
        raise StateError(f"store is inconsistent: band {band} component {comp_id} is tracked "
                         "but has no member list; rebuild the store")
    return raw


def _append_members(store: StarStore, txn: lmdb.Transaction, band: str, old_ids: np.ndarray,
                    new_ids: np.ndarray, owner: np.ndarray, rows: np.ndarray) -> None:
    """Append ``rows`` to the member lists of the tracked components ``owner`` (indices into
    ``old_ids``/``new_ids``: the component id before and after the update)."""
    order = np.argsort(owner, kind="stable")
    owner, rows = owner[order], rows[order]
    bounds = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1], True])
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        old, new = int(old_ids[owner[lo]]), int(new_ids[owner[lo]])
        value = _member_list(store, txn, band, old) + rows[lo:hi].tobytes()
        if old != new:
            store.cached_delete(txn, DB_MEMBERS, member_key(band, old))
        store.cached_put(txn, DB_MEMBERS, member_key(band, new), value)


def _read_members(store: StarStore, txn: lmdb.Transaction, band: str,
                  comp_ids: np.ndarray) -> np.ndarray:
    """The member rows of tracked components, concatenated in the order of ``comp_ids``
    (through the writer's cache: :meth:`StarStore.cached_get`)."""
    parts = [_member_list(store, txn, band, c) for c in comp_ids.tolist()]
    # one buffer, one view: concatenating structured arrays is slow
    return np.frombuffer(b"".join(parts), dtype=MEMBER_DTYPE)


def delete_members(store: StarStore, txn: lmdb.Transaction, band: str,
                   comp_ids: np.ndarray) -> None:
    """Forget the member lists of (tracked) components that no longer exist."""
    for c in comp_ids.tolist():
        store.cached_delete(txn, DB_MEMBERS, member_key(band, c))


def _member_vectors(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point (n, 3) and unit vectors of member rows."""
    fixed = np.stack([members["x"], members["y"], members["z"]], axis=1)
    return fixed, vectors_from_fixed(fixed)


def _member_distances(points: np.ndarray, member_v: np.ndarray, start: np.ndarray,
                      count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance of every point to every member of its component (``member_v[start[i]:
    start[i] + count[i]]`` for point ``i``): (point index, member index, distance), grouped
    by point."""
    pair_point = np.repeat(np.arange(len(points)), count)
    pair_start = np.concatenate([[0], np.cumsum(count)[:-1]])
    pair_member = np.arange(int(count.sum())) + np.repeat(start - pair_start, count)
    offsets = member_v[pair_member] - points[pair_point]
    return pair_point, pair_member, np.sqrt(np.einsum("ij,ij->i", offsets, offsets))


def _refine_unsure_links(store: StarStore, txn: lmdb.Transaction, band: str, comps: ColumnDict,
                         v_new: np.ndarray, link_new: np.ndarray, link_comp: np.ndarray,
                         sure: np.ndarray, radius: float
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decide unsure links to *tracked* components exactly from their member lists.

    Bounds get loose for components next to a close neighbour; their member lists settle
    most such links (no member within reach -> no link; every member within reach -> sure)
    without the exact path.  Links to untracked components stay unsure.
    """
    check = np.flatnonzero(~sure & comps["tracked"][link_comp])
    if len(check) == 0:
        return link_new, link_comp, sure
    wanted = np.unique(link_comp[check])
    members = _read_members(store, txn, band, comps["comp_id"][wanted])
    counts = comps["count"][wanted]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.searchsorted(wanted, link_comp[check])
    _, _, dist = _member_distances(v_new[link_new[check]], _member_vectors(members)[1],
                                   starts[slot], counts[slot])
    pair_starts = np.concatenate([[0], np.cumsum(counts[slot])[:-1]])
    nearest = np.minimum.reduceat(dist, pair_starts)
    farthest = np.maximum.reduceat(dist, pair_starts)
    # the same predicate as the exact FoF (cKDTree pairs within the radius), with a margin
    none = nearest > radius + EPS
    all_within = farthest <= radius - EPS
    sure = sure.copy()
    sure[check[all_within]] = True
    keep = np.ones(len(link_new), dtype=bool)
    keep[check[none]] = False
    return link_new[keep], link_comp[keep], sure[keep]


def _resolve_exactly(store: StarStore, txn: lmdb.Transaction, band: str, new_obs: ColumnDict,
                     new_fixed: np.ndarray, involved: ColumnDict, involved_centres: np.ndarray,
                     stats: BandUpdateStats) -> tuple[ColumnDict, ColumnDict]:
    """Exact components containing ``new_obs`` or the ``involved`` components' members.

    Members of tracked components come from their member lists; those of untracked ones
    (cliques that only ever took the fast path) from the stored observations within their
    ``rmax`` disc.  The resulting components are tracked: their member lists are written.
    """
    config = store.config
    radius = _match_chord(config.matchRadius)
    tracked = involved["tracked"]
    known = _read_members(store, txn, band, involved["comp_id"][tracked])
    n_new = len(new_obs["source_id"])
    # block: which tracked component a row is a member of (-1: new or re-read observation)
    blocks = [np.repeat(np.arange(int(tracked.sum())), involved["count"][tracked]),
              np.full(n_new, -1, dtype=np.int64)]
    visit = [known["visit"], new_obs["visit"]]
    source_id = [known["source_id"], new_obs["source_id"]]
    fixed = [_member_vectors(known)[0], new_fixed]
    untracked = ~tracked
    if untracked.any():
        centres, rmax = involved_centres[untracked], involved["rmax"][untracked] + EPS
        region = load_observations_near(store, txn, band, centres, rmax)
        stats.untracked_components += int(untracked.sum())
        stats.region_observations += len(region["source_id"])
        if len(region["source_id"]):
            region_fixed = fixed_unit_vectors(region["ra"], region["dec"])
            near = kdtree(vectors_from_fixed(region_fixed)).query_ball_point(
                centres, rmax, return_sorted=False)
            rows = np.unique(np.concatenate([np.asarray(n, dtype=np.int64) for n in near]))
            blocks.append(np.full(len(rows), -1, dtype=np.int64))
            visit.append(region["visit"][rows])
            source_id.append(region["source_id"][rows])
            fixed.append(region_fixed[rows])
    all_block, all_visit, all_source, all_fixed = (
        np.concatenate(blocks), np.concatenate(visit), np.concatenate(source_id),
        np.concatenate(fixed))
    _, first = np.unique(all_source, return_index=True)  # first copy wins: members, new, region
    first = np.sort(first)
    all_block, all_visit, all_source, all_fixed = (all_block[first], all_visit[first],
                                                   all_source[first], all_fixed[first])
    is_new = np.isin(all_source, new_obs["source_id"])
    v_all = vectors_from_fixed(all_fixed)
    # FoF without the dense member-member pairs: a tracked component is connected already
    # (chain its members), re-read observations are linked among themselves, and anything
    # else can only be joined through a new observation.
    by_block = np.flatnonzero(all_block >= 0)
    by_block = by_block[np.argsort(all_block[by_block], kind="stable")]
    same = all_block[by_block[1:]] == all_block[by_block[:-1]]
    edge_parts = [np.stack([by_block[:-1][same], by_block[1:][same]], axis=1)]
    reread = np.flatnonzero((all_block < 0) & ~is_new)
    if len(reread) > 1:
        pairs = kdtree(v_all[reread]).query_pairs(radius, output_type="ndarray")
        edge_parts.append(reread[pairs.astype(np.int64)])
    new_rows = np.flatnonzero(is_new)
    hits = kdtree(v_all[new_rows]).sparse_distance_matrix(kdtree(v_all), radius,
                                                          output_type="ndarray")
    edge_parts.append(np.stack([new_rows[hits["i"]], hits["j"].astype(np.int64)], axis=1))
    labels = labels_from_edges(len(all_source), np.concatenate(edge_parts).astype(np.int64))
    anchors = is_new | np.isin(all_source, involved["seed_src"])
    wanted = np.unique(labels[anchors])
    rows = np.isin(labels, wanted)
    remap = np.full(labels.max() + 1 if len(labels) else 0, -1, dtype=np.int64)
    remap[wanted] = np.arange(len(wanted))
    piece = remap[labels[rows]]
    # a piece holding a member of a non-clique component is a non-clique itself
    nonclique_blocks = np.flatnonzero(~involved["clique"][tracked])
    in_nonclique = np.isin(all_block[rows], nonclique_blocks) & (all_block[rows] >= 0)
    known_nonclique = np.bincount(piece[in_nonclique], minlength=len(wanted)) > 0
    comps, cands = summarize_pieces(all_visit[rows], all_source[rows], all_fixed[rows], piece,
                                    radius, config.minPerBand, known_nonclique)
    comps["tracked"][:] = True
    delete_members(store, txn, band, involved["comp_id"][tracked])
    members = _member_rows(all_source[rows], all_visit[rows], all_fixed[rows])
    order = np.argsort(piece, kind="stable")
    bounds = np.searchsorted(piece[order], np.arange(len(wanted) + 1))
    for k, comp_id in enumerate(comps["comp_id"].tolist()):
        store.cached_put(txn, DB_MEMBERS, member_key(band, comp_id),
                         members[order[bounds[k]:bounds[k + 1]]].tobytes())
    return comps, cands


def _update_candidates(store: StarStore, txn: lmdb.Transaction, band: str,
                       removed_ids: np.ndarray, removed_pixels: np.ndarray,
                       new_comps: ColumnDict, new_cands: ColumnDict) -> None:
    """Replace the explicit candidates of removed non-clique components by the new ones."""
    nside = store.config.storeNside
    new_pixel_of_comp = pixels_of(centres_of(new_comps), nside)
    cand_pixel = np.zeros(0, np.int64)
    if len(new_cands["comp_id"]):
        order = np.argsort(new_comps["comp_id"])
        cand_pixel = new_pixel_of_comp[order][np.searchsorted(new_comps["comp_id"][order],
                                                              new_cands["comp_id"])]
    dirty = np.unique(np.concatenate([removed_pixels, cand_pixel]))
    existing, existing_pixel = load_candidates(store, txn, band, dirty)
    keep = ~np.isin(existing["comp_id"], removed_ids)
    table = concat([take(existing, keep), new_cands], CANDIDATE_DTYPES)
    table_pixel = np.concatenate([existing_pixel[keep], cand_pixel])
    _write_grouped(store, txn, DB_CANDIDATES, band, table, table_pixel, dirty,
                   CANDIDATE_DTYPES)


def rebuild_after_removal(store: StarStore, txn: lmdb.Transaction, band: str,
                          removed_pixels: np.ndarray, removed_visit: int) -> None:
    """Recompute the components of ``band`` after a visit's observations were deleted.

    ``removed_pixels`` are the pixels that held the visit's observations; the observations of
    ``removed_visit`` must still be in the store (they are deleted here, after the "before"
    picture is taken).  Removing members can split components, so the region around the
    removed observations is recomputed from its observations: components before and after
    the removal are computed by FoF, and the after-pieces of every before-component centred in
    the region replace the stored ones.
    """
    config = store.config
    nside = config.storeNside
    radius = _match_chord(config.matchRadius)
    inner = with_neighbours(removed_pixels, nside)
    outer = with_neighbours(inner, nside)
    before = load_observations(store, txn, band, outer)
    for pixel in removed_pixels:
        txn.delete(observation_key(band, int(pixel), removed_visit),
                   db=store.dbs[DB_OBSERVATIONS])
    if band not in config.primaryBands:
        return
    fixed = fixed_unit_vectors(before["ra"], before["dec"])
    v = vectors_from_fixed(fixed)
    labels_before = fof_labels(v, radius)
    if len(labels_before):
        sums = np.zeros((labels_before.max() + 1, 3), dtype=np.int64)
        np.add.at(sums, labels_before, fixed)
        centre_pixel = pixels_of(normalized(sums), nside)
        own_piece = np.isin(centre_pixel, inner)
    else:
        own_piece = np.zeros(0, dtype=bool)
    remaining = before["visit"] != removed_visit
    labels_after = fof_labels(v[remaining], radius)
    kept_rows = own_piece[labels_before[remaining]] if len(labels_before) else \
        np.zeros(0, dtype=bool)
    wanted = np.unique(labels_after[kept_rows])
    rows = np.isin(labels_after, wanted)
    remap = np.full(labels_after.max() + 1 if len(labels_after) else 0, -1, dtype=np.int64)
    remap[wanted] = np.arange(len(wanted))
    sub = take(before, remaining)
    new_comps, new_cands = summarize_pieces(
        sub["visit"][rows], sub["source_id"][rows], fixed[remaining][rows],
        remap[labels_after[rows]], radius, config.minPerBand)

    old, old_pixel = load_components(store, txn, band, outer)
    stay = ~np.isin(old_pixel, inner)
    removed = take(old, ~stay)
    new_pixel = pixels_of(centres_of(new_comps), nside)
    dirty = np.unique(np.concatenate([inner, new_pixel]))
    outside = np.setdiff1d(dirty, outer)
    extra, extra_pixel = load_components(store, txn, band, outside)
    table = concat([take(old, stay), new_comps, extra], COMPONENT_DTYPES)
    table_pixel = np.concatenate([old_pixel[stay], new_pixel, extra_pixel])
    _write_components(store, txn, band, table, table_pixel, dirty)
    delete_members(store, txn, band, removed["comp_id"][removed["tracked"]])
    nonclique = ~removed["clique"]
    _update_candidates(store, txn, band, removed["comp_id"][nonclique],
                       old_pixel[~stay][nonclique], new_comps, new_cands)


def _match_chord(match_radius_arcsec: float) -> float:
    return chord_from_arcsec(match_radius_arcsec)
