"""``streamstars star`` and ``streamstars cone`` return what the snapshot publishes for the same
stars — ids, positions, flags and every observation — on states of one and of many shards,
across shard borders, at RA 0/360 and at a pole, with the density cut active; bad input gets a
clear message and the documented exit code."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import healpy as hp
import lmdb
import numpy as np
import pytest
from survey_helpers import PreparedSurvey, prepare_survey

from streamstars.config import BuildStarsConfig
from streamstars.errors import ConfigError, StarNotFoundError, StateError
from streamstars.ingest import PreparedVisit, apply_prepared
from streamstars.io.snapshot_files import SnapshotCatalogs, read_snapshot
from streamstars.queries import (
    DensityCache,
    QueryCacheWarmer,
    QueryResult,
    cone_query,
    shard_generations,
    star_query,
    warm_query_cache,
)
from streamstars.sharded_snapshot import write_state_snapshot
from streamstars.sky import chord_from_arcsec, unit_vectors
from streamstars.snapshot import ShardOwnership, StarCatalog, derive_catalogs
from streamstars.state import StateDirectory

MARGIN = 10.0  # arcsec
FLOAT32_IN_FILES = {"x", "y", "inst_mag", "inst_mag_err", "jacobian", "delta_mag_bkg",
                    "delta_mag_aper", "delta_mag_err_aper"}


def _config(**changes: object) -> BuildStarsConfig:
    return dataclasses.replace(BuildStarsConfig(densityCutNside=1024), **changes)


@dataclasses.dataclass
class Built:
    state: Path
    snapshot: SnapshotCatalogs
    n_shards: int


def _build(root: Path, survey: PreparedSurvey, nside: int, **changes: object) -> Built:
    """A state directory of shards of ``nside`` holding every visit, and its snapshot."""
    config = dataclasses.replace(survey.config, shardNside=nside, shardMargin=MARGIN, **changes)
    with StateDirectory.open(root / "state", config) as state:
        for prepared in survey.visits:
            apply_prepared(state, prepared)
    with StateDirectory.open(root / "state", readonly=True) as state:
        write_state_snapshot(state, root / "snap")
        n_shards = len(state.shards())
    return Built(root / "state", read_snapshot(root / "snap"), n_shards)


def _snapshot_rows(snap: SnapshotCatalogs, keep: np.ndarray) -> dict[str, object]:
    """The snapshot's stars ``keep`` (bool per star) and their observations."""
    stars = snap.stars
    member_of = np.repeat(np.arange(len(stars["fgcm_id"])), stars["n_obs"])
    rows = keep[member_of]
    return {"stars": {k: v[keep] for k, v in stars.items()},
            "observations": {k: v[rows] for k, v in snap.observations.items()}}


def assert_same_as_snapshot(result: QueryResult, snap: SnapshotCatalogs,
                            keep: np.ndarray) -> None:
    """Ids, positions, flags, counts and every observation column (as the files store it)."""
    expected = _snapshot_rows(snap, keep)
    stars = expected["stars"]
    assert isinstance(stars, dict)
    np.testing.assert_array_equal(result.stars.star_id, stars["fgcm_id"])
    np.testing.assert_array_equal(result.stars.ra, stars["ra"])
    np.testing.assert_array_equal(result.stars.dec, stars["dec"])
    np.testing.assert_array_equal(result.stars.obj_flag, stars["obj_flag"])
    np.testing.assert_array_equal(result.stars.n_obs, stars["n_obs"])
    observations = expected["observations"]
    assert isinstance(observations, dict)
    for name, column in observations.items():
        ours = result.stars.observations[name]
        if name in FLOAT32_IN_FILES:  # the parquet files store these as float32
            ours = ours.astype(np.float32)
        np.testing.assert_array_equal(ours.astype(column.dtype), column, err_msg=name)


def assert_same_in_memory(result: QueryResult, stars: StarCatalog, keep: np.ndarray) -> None:
    """Bit-identical to the snapshot's in-memory stars (before the files round anything)."""
    member_of = np.repeat(np.arange(len(stars.star_id)), stars.n_obs)
    for name in ("star_id", "ra", "dec", "n_obs", "obj_flag"):
        np.testing.assert_array_equal(getattr(result.stars, name), getattr(stars, name)[keep])
    for name, column in stars.observations.items():
        np.testing.assert_array_equal(result.stars.observations[name],
                                      column[keep[member_of]], err_msg=name)


def _derived_stars(state_path: Path) -> StarCatalog:
    """Every shard's stars as its snapshot derives them (derive_catalogs), in id order."""
    parts = []
    with StateDirectory.open(state_path, readonly=True) as state:
        for order, pixel in state.shards():
            store = state.open_shard(pixel)
            with store.read(buffers=True) as tx:
                parts.append(derive_catalogs(store, tx, state.config, ShardOwnership(
                    order, pixel, state.shard_margin)).stars)
    star_id = np.concatenate([p.star_id for p in parts])
    n_obs = np.concatenate([p.n_obs for p in parts])
    order = np.argsort(star_id)
    starts = np.concatenate([[0], np.cumsum(n_obs)[:-1]])
    rows = np.concatenate([np.arange(starts[i], starts[i] + n_obs[i]) for i in order])
    observations = {k: np.concatenate([p.observations[k] for p in parts])[rows]
                    for k in parts[0].observations}
    return StarCatalog(star_id[order], np.concatenate([p.ra for p in parts])[order],
                       np.concatenate([p.dec for p in parts])[order], n_obs[order],
                       np.concatenate([p.obj_flag for p in parts])[order], observations)


def _in_cone(snap: SnapshotCatalogs, ra: float, dec: float, radius: float) -> np.ndarray:
    centre = unit_vectors(np.array([ra]), np.array([dec]))[0]
    v = unit_vectors(snap.stars["ra"], snap.stars["dec"])
    return np.sqrt(((v - centre) ** 2).sum(axis=1)) <= chord_from_arcsec(radius)


def _star(snap: SnapshotCatalogs, star_id: int) -> np.ndarray:
    return snap.stars["fgcm_id"] == star_id


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamstars.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> PreparedSurvey:
    root = tmp_path_factory.mktemp("crowded")
    return prepare_survey(root / "repo", _config(), n_visits=8, seed=21,
                          sources_per_visit=2500, crowded=True, border_nside=64,
                          write_refcat=False)


@pytest.fixture(scope="module", params=[4, 64], ids=["one-shard", "many-shards"])
def built(request: pytest.FixtureRequest, crowded: PreparedSurvey,
          tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory.mktemp(f"nside{request.param}"), crowded, request.param)


def test_star_returns_the_snapshot_row_and_every_observation(built: Built) -> None:
    assert (built.n_shards == 1) if "nside4" in str(built.state) else built.n_shards > 2
    ids = built.snapshot.stars["fgcm_id"]
    assert len(ids) > 300
    derived = _derived_stars(built.state)
    np.testing.assert_array_equal(derived.star_id, ids)
    rng = np.random.default_rng(1)
    with StateDirectory.open(built.state, readonly=True) as state:
        for star_id in rng.choice(ids, 25, replace=False).tolist():
            result = star_query(state, star_id)
            assert_same_as_snapshot(result, built.snapshot, _star(built.snapshot, star_id))
            assert_same_in_memory(result, derived, derived.star_id == star_id)
            assert len(result.shards) >= 1


def test_cones_equal_the_snapshot_also_across_shard_borders(built: Built) -> None:
    snap = built.snapshot
    ra, dec = float(np.median(snap.stars["ra"])), float(np.median(snap.stars["dec"]))
    # a shard corner at nside 64 near the field centre: four shards meet there
    pixel = hp.ang2pix(64, ra, dec, lonlat=True, nest=True)
    corners = np.asarray(hp.boundaries(64, pixel, nest=True)).T
    nearest = corners[np.argmax(corners @ unit_vectors(np.array([ra]), np.array([dec]))[0])]
    corner_ra, corner_dec = hp.vec2ang(nearest[None, :], lonlat=True)
    cones = [(ra, dec, 600.0), (float(corner_ra[0]), float(corner_dec[0]), 600.0),
             (ra + 0.1, dec - 0.05, 300.0)]
    with StateDirectory.open(built.state, readonly=True) as state:
        for c_ra, c_dec, radius in cones:
            result = cone_query(state, c_ra, c_dec, radius)
            keep = _in_cone(snap, c_ra, c_dec, radius)
            assert keep.sum() >= 10
            assert_same_as_snapshot(result, snap, keep)
            if built.n_shards > 2 and (c_ra, c_dec) == (corner_ra[0], corner_dec[0]):
                assert len(result.shards) >= 3
                owners = {int(p) for p in hp.ang2pix(64, result.stars.ra, result.stars.dec,
                                                     lonlat=True, nest=True)}
                assert len(owners) >= 3, owners  # stars of several shards in one answer
        # per-band counts add up to n_obs and name the bands of the visits
        counts = result.per_band_counts()
        assert [sum(c.values()) for c in counts] == result.stars.n_obs.tolist()


def test_the_cli_star_and_cone_json_and_exit_codes(built: Built, tmp_path: Path) -> None:
    if built.n_shards == 1:
        pytest.skip("the CLI is exercised once, on the state of many shards")
    snap = built.snapshot
    star_id = int(snap.stars["fgcm_id"][len(snap.stars["fgcm_id"]) // 2])
    done = cli("star", star_id, "--state", built.state, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    row = _star(snap, star_id)
    assert out["fgcm_id"] == star_id and out["ra"] == float(snap.stars["ra"][row][0])
    assert out["flags"] == int(snap.stars["obj_flag"][row][0])
    members = _snapshot_rows(snap, row)["observations"]
    assert isinstance(members, dict)
    assert [o["visit"] for o in out["observations"]] == members["visit"].tolist()
    assert [o["source_id"] for o in out["observations"]] == members["source_id"].tolist()
    assert all(o["band"] in "griz" and o["mjd"] > 50000 for o in out["observations"])
    assert {"inst_mag", "inst_mag_err", "ra", "dec", "detector"} <= set(out["observations"][0])
    text = cli("star", star_id, "--state", built.state)
    assert text.returncode == 0 and f"star {star_id}:" in text.stdout
    ra, dec = float(snap.stars["ra"][row][0]), float(snap.stars["dec"][row][0])
    done = cli("cone", ra, dec, 60, "--state", built.state, "--json")
    assert done.returncode == 0, done.stderr
    cone = json.loads(done.stdout)
    assert star_id in [s["fgcm_id"] for s in cone["stars"]]
    assert cone["n_stars"] == int(_in_cone(snap, ra, dec, 60.0).sum())
    assert all(sum(s["n_obs_per_band"].values()) == s["n_obs"] for s in cone["stars"])

    # unknown ids: exit 1 with a message saying why
    missing = cli("star", 12345, "--state", built.state)
    assert missing.returncode == 1
    assert "no star with fgcm_id 12345" in missing.stderr
    assert "no stored observation has this sourceId" in missing.stderr
    other = int(members["source_id"].max())  # a member that is not the smallest
    member = cli("star", other, "--state", built.state)
    assert member.returncode == 1
    assert f"it is an observation of star {star_id}" in member.stderr
    # malformed input: exit 2
    for args in (("cone", "abc", 2, 10), ("cone", 150, 95, 10), ("cone", 150, 2, 0),
                 ("cone", 150, 2, "nan"), ("star", "x1")):
        bad = cli(*args, "--state", built.state)
        assert bad.returncode == 2, (args, bad.stderr)
        assert "error" in bad.stderr


def test_empty_state_and_a_format_1_store_are_refused(tmp_path: Path) -> None:
    with StateDirectory.open(tmp_path / "empty", _config()):
        pass
    for args in (("star", 1), ("cone", 150, 2, 10)):
        done = cli(*args, "--state", tmp_path / "empty")
        assert done.returncode == 2 and "holds no visits yet" in done.stderr, done.stderr
    with StateDirectory.open(tmp_path / "empty", readonly=True) as state:
        with pytest.raises(StateError, match="holds no visits"):
            cone_query(state, 150.0, 2.0, 10.0)
        with pytest.raises(ConfigError, match="outside"):
            cone_query(state, 150.0, -91.0, 10.0)
    old = tmp_path / "old"
    env = lmdb.open(str(old), max_dbs=16)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format_version", b"1", db=meta)
    env.close()
    for args in (("star", 1), ("cone", 150, 2, 10)):
        done = cli(*args, "--state", old)
        assert done.returncode == 2 and "format version 1" in done.stderr, done.stderr


@pytest.mark.parametrize(("ra", "dec"), [(0.0, 0.0), (0.0, 89.7)], ids=["ra0", "pole"])
def test_cones_across_ra_0_and_at_a_pole(ra: float, dec: float, tmp_path: Path) -> None:
    survey = prepare_survey(tmp_path / "repo", _config(), n_visits=6, seed=5,
                            sources_per_visit=1500, ra_center=ra, dec_center=dec,
                            field_radius_deg=0.4, border_nside=256, write_refcat=False)
    built = _build(tmp_path, survey, 256)
    assert built.n_shards >= 4
    snap = built.snapshot
    # across RA 0/360 at the field centre; the pole itself and a cone over it for the polar
    # field (its stars lie from 440" of the pole outwards)
    centres = ([(0.0, 90.0, 900.0), (123.0, 89.85, 900.0)] if dec > 80 else
               [(0.0, 0.0, 600.0), (359.99, 0.0, 300.0)])
    with StateDirectory.open(built.state, readonly=True) as state:
        for c_ra, c_dec, radius in centres:
            result = cone_query(state, c_ra, c_dec, radius)
            keep = _in_cone(snap, c_ra, c_dec, radius)
            assert keep.sum() >= 5
            assert_same_as_snapshot(result, snap, keep)
        if dec < 80:  # stars on both sides of RA 0 in one answer
            assert (result.stars.ra < 1).any() and (result.stars.ra > 359).any()
        for star_id in snap.stars["fgcm_id"][keep][:5].tolist():
            assert_same_as_snapshot(star_query(state, star_id), snap, _star(snap, star_id))


def test_the_density_cut_gives_the_snapshots_answer(crowded: PreparedSurvey,
                                                    tmp_path: Path) -> None:
    """With a density cut that removes stars, every answer is still the snapshot's: the density
    pixels of the query are derived whole where their candidates could exceed the cap."""
    uncut = _build(tmp_path / "uncut", crowded, 64)
    built = _build(tmp_path / "cut", crowded, 64, densityCutMaxPerPixel=4)
    snap = built.snapshot
    assert len(snap.stars["fgcm_id"]) < 0.8 * len(uncut.snapshot.stars["fgcm_id"])
    ra, dec = float(np.median(snap.stars["ra"])), float(np.median(snap.stars["dec"]))
    with StateDirectory.open(built.state, readonly=True) as state:
        result = cone_query(state, ra, dec, 200.0)
        assert result.density_pixels_derived > 0
        assert_same_as_snapshot(result, snap, _in_cone(snap, ra, dec, 200.0))
        for star_id in snap.stars["fgcm_id"][::40].tolist():
            assert_same_as_snapshot(star_query(state, star_id), snap, _star(snap, star_id))
        # a star the cut removed is reported as not published
        gone = np.setdiff1d(uncut.snapshot.stars["fgcm_id"], snap.stars["fgcm_id"])
        with pytest.raises(StarNotFoundError, match="density"):
            star_query(state, int(gone[0]))


def test_a_write_after_a_cached_query_changes_the_answer(crowded: PreparedSurvey,
                                                         tmp_path: Path) -> None:
    """The density cut a query ranked is cached per shard generation: the next query uses it
    (same answer), and any write invalidates it, so the answer after more visits is the new
    snapshot's, not the cached one."""
    config = dataclasses.replace(crowded.config, shardNside=4, shardMargin=MARGIN,
                                 densityCutMaxPerPixel=4)
    state_path = tmp_path / "state"
    with StateDirectory.open(state_path, config) as state:
        for prepared in crowded.visits[:5]:
            apply_prepared(state, prepared)
    with StateDirectory.open(state_path, readonly=True) as state:
        write_state_snapshot(state, tmp_path / "snap1")
    before = read_snapshot(tmp_path / "snap1")
    ra, dec = float(np.median(before.stars["ra"])), float(np.median(before.stars["dec"]))
    with StateDirectory.open(state_path, readonly=True) as state:
        first = cone_query(state, ra, dec, 200.0)
        assert first.density_pixels_derived > 0 and first.density_pixels_cached == 0
        assert list((state_path / "query-cache").rglob("*.json"))
        again = cone_query(state, ra, dec, 200.0)
        assert again.density_pixels_derived == 0
        assert again.density_pixels_cached == first.density_pixels_derived
        assert_same_as_snapshot(again, before, _in_cone(before, ra, dec, 200.0))
        uncached = cone_query(state, ra, dec, 200.0, use_cache=False)
        assert uncached.density_pixels_cached == 0
        assert_same_as_snapshot(uncached, before, _in_cone(before, ra, dec, 200.0))
    with StateDirectory.open(state_path, config) as state:
        for prepared in crowded.visits[5:]:
            apply_prepared(state, prepared)
    with StateDirectory.open(state_path, readonly=True) as state:
        write_state_snapshot(state, tmp_path / "snap2")
    after = read_snapshot(tmp_path / "snap2")
    with StateDirectory.open(state_path, readonly=True) as state:
        result = cone_query(state, ra, dec, 200.0)
        assert result.density_pixels_cached == 0 and result.density_pixels_derived > 0
        assert_same_as_snapshot(result, after, _in_cone(after, ra, dec, 200.0))
        assert not np.array_equal(result.stars.star_id, first.stars.star_id)
        for star_id in after.stars["fgcm_id"][::40].tolist():
            assert_same_as_snapshot(star_query(state, star_id), after, _star(after, star_id))


def _scrambled_source_ids(visits: list[PreparedVisit]) -> list[PreparedVisit]:
    """The visits with their sourceIds permuted across the survey (still unique): a visit's
    ids no longer all follow the earlier visits' ids."""
    ids = np.concatenate([v.observations["source_id"] for v in visits])
    new = np.random.default_rng(5).permutation(ids)
    out, start = [], 0
    for v in visits:
        n = len(v.observations["source_id"])
        out.append(dataclasses.replace(v, observations={**v.observations,
                                                        "source_id": new[start:start + n]}))
        start += n
    return out


@pytest.mark.parametrize(("scrambled", "required"), [(False, ("g", "r")), (True, ())],
                         ids=["required-gr", "scrambled-ids"])
def test_a_query_right_after_each_new_visit_equals_the_snapshot_then(
        crowded: PreparedSurvey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        scrambled: bool, required: tuple[str, ...]) -> None:
    """After every visit applied, the first query (its density pixels derived for the new
    generation: published ids settled reading values in sourceId order, the stars left open
    read at their fine pixels only) answers what a snapshot taken then holds.  Small batches
    make every query go through several batches and the restricted read; scrambled sourceIds
    make a later value hold a star's smallest member."""
    import streamstars.queries as queries
    from streamstars.state.tables import FineRows

    monkeypatch.setattr(queries, "_ID_BATCH_ROWS", 4)
    monkeypatch.setattr(queries, "_RESTRICTED_BATCHES", 10**9 if scrambled else 20)
    restricted = []
    original = FineRows.restricted

    def counted(self: FineRows, fine: np.ndarray) -> FineRows | None:
        restricted.append(len(fine))
        return original(self, fine)

    monkeypatch.setattr(FineRows, "restricted", counted)
    config = dataclasses.replace(crowded.config, shardNside=64, shardMargin=MARGIN,
                                 densityCutMaxPerPixel=4, requiredBands=required)
    state_path = tmp_path / "state"
    derived = 0
    visits = _scrambled_source_ids(crowded.visits) if scrambled else crowded.visits
    for i, prepared in enumerate(visits):
        with StateDirectory.open(state_path, config) as state:
            apply_prepared(state, prepared)
        with StateDirectory.open(state_path, readonly=True) as state:
            write_state_snapshot(state, tmp_path / f"snap{i}")
        snap = read_snapshot(tmp_path / f"snap{i}")
        if not len(snap.stars["fgcm_id"]):
            continue
        ra, dec = float(np.median(snap.stars["ra"])), float(np.median(snap.stars["dec"]))
        with StateDirectory.open(state_path, readonly=True) as state:
            result = cone_query(state, ra, dec, 150.0)
            assert result.density_pixels_cached == 0  # a new generation: nothing reused
            derived += result.density_pixels_derived
            assert_same_as_snapshot(result, snap, _in_cone(snap, ra, dec, 150.0))
            for star_id in snap.stars["fgcm_id"][::60].tolist():
                assert_same_as_snapshot(star_query(state, star_id, use_cache=False), snap,
                                        _star(snap, star_id))
    assert derived > 0 and restricted


def _cache_files(state_path: Path) -> dict[Path, tuple[int, str]]:
    return {p: (p.stat().st_mtime_ns, p.read_text())
            for p in sorted((state_path / "query-cache").rglob("*.json"))}


def test_backfill_warm_query_cache_leaves_nothing_for_the_first_query(
        crowded: PreparedSurvey, tmp_path: Path) -> None:
    """``backfill --warm-query-cache`` caches the density cut of every density pixel holding
    a star of the snapshot: the first ``star`` / ``cone`` afterwards derives nothing, leaves
    the cache files untouched and returns the snapshot's answer."""
    config = tmp_path / "config.toml"
    config.write_text("densityCutNside = 1024\nshardNside = 64\nshardMargin = 10.0\n"
                      "densityCutMaxPerPixel = 4\n")
    state_path = tmp_path / "state"
    done = cli("backfill", crowded.repo, "--state", state_path, "--config", config,
               "--no-progress", "--warm-query-cache")
    assert done.returncode == 0, done.stderr
    line = [x for x in done.stdout.splitlines() if x.startswith("query cache warmed: ")]
    assert len(line) == 1, done.stdout
    ranked = int(line[0].split()[3])
    with StateDirectory.open(state_path, readonly=True) as state:
        write_state_snapshot(state, tmp_path / "snap")
        n_shards = len(state.shards())
        order, nside = state.shard_order, state.config.densityCutNside
    snap = read_snapshot(tmp_path / "snap")
    assert n_shards > 2
    # every density pixel holding a published star is cached in its shard's file
    density = hp.ang2pix(nside, snap.stars["ra"], snap.stars["dec"], nest=True, lonlat=True)
    shift = 2 * (nside.bit_length() - 64 .bit_length())
    cached: dict[int, set[str]] = {}
    for path, (_, text) in _cache_files(state_path).items():
        assert path.parent.name == str(order)
        cached[int(path.stem)] = set(json.loads(text)["cuts"])
    assert ranked == sum(len(c) for c in cached.values())
    missing = [p for p in np.unique(density).tolist()
               if str(p) not in cached.get(p >> shift, set())]
    assert not missing
    files = _cache_files(state_path)
    ra, dec = float(np.median(snap.stars["ra"])), float(np.median(snap.stars["dec"]))
    with StateDirectory.open(state_path, readonly=True) as state:
        cone = cone_query(state, ra, dec, 300.0)
        assert cone.density_pixels_derived == 0 and cone.density_pixels_cached > 0
        assert_same_as_snapshot(cone, snap, _in_cone(snap, ra, dec, 300.0))
        for star_id in snap.stars["fgcm_id"][::50].tolist():
            result = star_query(state, star_id)
            assert result.density_pixels_derived == 0
            assert_same_as_snapshot(result, snap, _star(snap, star_id))
    assert _cache_files(state_path) == files  # nothing rewritten
    # the operators' command finds nothing to do
    again = cli("query-cache", "warm", "--state", state_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("query cache warmed: 0 density pixel(s) ranked, "
                                   f"{ranked} already cached, in {n_shards} shard(s)")


def test_the_warmer_works_one_pixel_a_step_and_after_writes_only_where_written(
        crowded: PreparedSurvey, tmp_path: Path) -> None:
    """:class:`QueryCacheWarmer` (the consumer's idle hook): at most one density pixel per
    step; after a write, only the shards whose generation changed are warmed again; queries
    then derive nothing and equal the snapshot."""
    config = dataclasses.replace(crowded.config, shardNside=64, shardMargin=MARGIN,
                                 densityCutMaxPerPixel=4)
    state_path = tmp_path / "state"
    with StateDirectory.open(state_path, config) as state:
        for prepared in crowded.visits[:6]:
            apply_prepared(state, prepared)
        warmer = QueryCacheWarmer(state)
        steps, finished = 0, None
        while warmer.pending:
            derived = warmer.total.pixels_derived
            finished = warmer.step() or finished
            assert warmer.total.pixels_derived - derived <= 1
            steps += 1
        assert finished is not None and finished.pixels_derived == warmer.total.pixels_derived
        assert steps == finished.pixels_derived + 1 > 5
        assert warmer.step() is None and not warmer.pending  # nothing until told of a write
        before = shard_generations(state)
        apply_prepared(state, crowded.visits[6])
        written = {p for p, g in shard_generations(state).items() if before.get(p) != g}
        assert 0 < len(written) < len(before)
        warmer.changed()
        first = warmer.total.pixels_derived
        while warmer.pending:
            finished = warmer.step() or finished
        assert finished is not None and set(finished.shards) == written
        assert warmer.total.pixels_derived > first
        # what a warm-up of every shard finds: everything cached
        summary = warm_query_cache(state)
        assert summary.pixels_derived == 0 and summary.pixels_fresh > 0
    with StateDirectory.open(state_path, readonly=True) as state:
        write_state_snapshot(state, tmp_path / "snap")
    snap = read_snapshot(tmp_path / "snap")
    ra, dec = float(np.median(snap.stars["ra"])), float(np.median(snap.stars["dec"]))
    with StateDirectory.open(state_path, readonly=True) as state:
        cone = cone_query(state, ra, dec, 300.0)
        assert cone.density_pixels_derived == 0 and cone.density_pixels_cached > 0
        assert_same_as_snapshot(cone, snap, _in_cone(snap, ra, dec, 300.0))


def test_the_cache_file_merges_one_generation_and_keeps_a_later_one(tmp_path: Path) -> None:
    """Two writers of one shard's cache (a query, a warm-up): entries of the same generation
    are merged; a writer of an older generation does not replace a later one's file."""
    path, config = tmp_path / "cache.json", _config()
    a = DensityCache(path, ("inst", 7), config)
    b = DensityCache(path, ("inst", 7), config)
    a.put(1, None)
    a.save()
    b.put(2, (5, 6))
    b.save()
    merged = DensityCache(path, ("inst", 7), config)
    assert merged.get(1) == (True, None) and merged.get(2) == (True, (5, 6))
    old = DensityCache(path, ("inst", 6), config)
    assert old.get(1) == (False, None)  # another generation: not used
    old.put(3, None)
    old.save()
    assert json.loads(path.read_text())["generation"] == ["inst", 7]
    newer = DensityCache(path, ("inst", 8), config)
    newer.put(4, None)
    newer.save()
    assert json.loads(path.read_text())["cuts"] == {"4": None}
