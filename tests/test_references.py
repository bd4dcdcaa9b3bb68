"""Reference-star caching per visit and matching at snapshot time (streamstars.references)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from streamstars.backfill import backfill
from streamstars.cli import main
from streamstars.config import (
    BuildStarsConfig,
    ColortermConfig,
    RefcatLoadConfig,
    ReferenceSelectorConfig,
    ReferenceSignalToNoiseConfig,
)
from streamstars.errors import RefcatError, StateError
from streamstars.ingest import ApplyResult
from streamstars.io.refcat import parse_refcat_config
from streamstars.io.snapshot_files import SnapshotCatalogs, read_snapshot
from streamstars.references import (
    attach_references,
    open_reference_source,
    read_cached_references,
    refresh_all,
    stored_refcat,
)
from streamstars.refmatch import (
    angular_separation_arcsec,
    match_reference_to_stars,
    reference_magnitudes,
)
from streamstars.sharded_snapshot import write_state_snapshot
from streamstars.simulate import simulate_survey
from streamstars.sky import ARCSEC_RAD, pixels_of, unit_vectors
from streamstars.snapshot import build_catalogs, write_store_snapshot
from streamstars.state import StarStore, StateDirectory

SIM_FILTERS = {"g_6": "g", "r_57": "r", "i_39": "i", "z_20": "z"}
#: small pixels (3.4') so that many stars lie within 2" of a pixel border
STORE_NSIDE = 1024
CFHT = "jointcal_cfht_minimal"
CFHT_REFCAT = f"{CFHT}/ref_cats/sdss-dr9-fink-v5b"
SYNTHETIC_V0 = "meas_algorithms_synthetic_refcat/version0/cal_ref_cat"


def sn_selector(flux: str = "r", minimum: float = 20.0) -> ReferenceSelectorConfig:
    return ReferenceSelectorConfig(
        doSignalToNoise=True,
        signalToNoise=ReferenceSignalToNoiseConfig(fluxField=f"{flux}_flux",
                                                   errField=f"{flux}_fluxErr", minimum=minimum))


def sim_config(refcat: Path | str, selector: ReferenceSelectorConfig | None = None,
               filter_map: dict[str, str] | None = None, **kwargs: object) -> BuildStarsConfig:
    ref = RefcatLoadConfig(path=str(refcat),
                           filterMap=dict(SIM_FILTERS if filter_map is None else filter_map),
                           referenceSelector=selector or sn_selector())
    return BuildStarsConfig(storeNside=STORE_NSIDE, fgcmLoadReferenceCatalog=ref,
                            **kwargs)  # type: ignore[arg-type]


def state_catalogs(state: Path, out: Path) -> SnapshotCatalogs:
    """The catalogs of a state directory, as its snapshot writes them."""
    with StateDirectory.open(state, readonly=True) as directory:
        write_state_snapshot(directory, out)
    return read_snapshot(out)


def star_columns(catalogs: SnapshotCatalogs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fgcm_id, ra, dec) of a snapshot's stars."""
    stars = catalogs.stars
    return stars["fgcm_id"], stars["ra"], stars["dec"]


def assert_matches_expected(reference: dict[str, np.ndarray] | None,
                            expected: dict[int, tuple[int, np.ndarray, np.ndarray, float, float]]
                            ) -> None:
    """A snapshot's reference stars (files hold no ``ref_id``) are the brute-force matches:
    the same stars, each with its matched reference star's magnitudes and errors."""
    assert reference is not None
    assert reference["fgcm_id"].tolist() == sorted(expected)
    np.testing.assert_array_equal(reference["refMag"],
                                  [expected[int(f)][1] for f in reference["fgcm_id"]])
    np.testing.assert_array_equal(reference["refMagErr"],
                                  [expected[int(f)][2] for f in reference["fgcm_id"]])


def write_toml(path: Path, config: BuildStarsConfig) -> Path:
    path.write_text(config.to_toml())
    return path


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refsurvey")
    # a sparse, crowded field: close pairs make two reference stars compete for one star
    simulate_survey(out, n_visits=12, seed=7, sources_per_visit=2500, crowded=True)
    return out


@pytest.fixture(scope="module")
def built(survey: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The survey backfilled with the reference catalog configured; snapshot catalogs."""
    state = tmp_path_factory.mktemp("refstate") / "state"
    config = sim_config(survey / "refcat")
    results: list[ApplyResult] = []
    with StarStore.open(state, config) as store:
        attach_references(store)
        report = backfill(survey, store, progress=False, on_result=results.append)
        assert report.ok and report.applied == 12
        with store.read() as txn:
            catalogs, stars = build_catalogs(store, txn)
            cached = read_cached_references(txn, len(SIM_FILTERS))
            n_records = txn.refcache.count()
    return {"state": state, "config": config, "catalogs": catalogs, "stars": stars,
            "results": results, "cached": cached, "n_records": n_records}


# --- brute force ------------------------------------------------------------------------------
def whole_refcat(path: Path, columns: list[str]) -> dict[str, np.ndarray]:
    """Every row of every shard, read with astropy directly (no HtmRefcat)."""
    parts = []
    for shard in sorted(path.glob("*.fits")):
        if shard.name == "master_schema.fits":
            continue
        with fits.open(shard) as hdul:
            data = hdul[1].data
            parts.append({c: np.asarray(data[c]).astype(np.asarray(data[c]).dtype.newbyteorder("="))
                          for c in columns})
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}


def brute_force(refcat: Path, config: BuildStarsConfig, star_id: np.ndarray, ra: np.ndarray,
                dec: np.ndarray) -> dict[int, tuple[int, np.ndarray, np.ndarray, float, float]]:
    """fgcm_id -> (ref id, refMag, refMagErr, ref ra, ref dec) against the WHOLE catalog."""
    cfg = config.fgcmLoadReferenceCatalog
    bands = sorted(set(cfg.filterMap.values()) | {"g", "r", "i", "z"})
    cols = ["id", "coord_ra", "coord_dec"] + [f"{b}_{s}" for b in bands
                                              for s in ("flux", "fluxErr")]
    sn = cfg.referenceSelector.signalToNoise
    cols += [c for c in (sn.fluxField, sn.errField) if c not in cols]
    ref = whole_refcat(refcat, cols)
    filters = list(cfg.filterMap)
    mag, err, keep = reference_magnitudes(ref, cfg.filterMap, filters, cfg.referenceSelector,
                                          cfg.colorterms, cfg.applyColorTerms)
    rra = np.degrees(ref["coord_ra"])[keep] % 360.0
    rdec = np.degrees(ref["coord_dec"])[keep]
    ids = ref["id"][keep]
    ri, si = match_reference_to_stars(rra, rdec, ra, dec, star_id, cfg.matchRadius,
                                      ref_ids=ids)
    mag, err = mag[keep], err[keep]
    return {int(star_id[s]): (int(ids[r]), mag[r], err[r], float(rra[r]), float(rdec[r]))
            for r, s in zip(ri, si, strict=True)}


def distance_to_pixel_border_below(ra: np.ndarray, dec: np.ndarray, nside: int,
                                   arcsec: float, samples: int = 32) -> np.ndarray:
    """True where a point within ``arcsec`` of (ra, dec) lies in another nest pixel."""
    v = unit_vectors(ra, dec)
    own = pixels_of(v, nside)
    # two tangent directions, then points on circles of radius arcsec/2 and arcsec
    east = np.cross([0.0, 0.0, 1.0], v)
    east /= np.linalg.norm(east, axis=1)[:, None]
    north = np.cross(v, east)
    near = np.zeros(len(v), dtype=bool)
    for r in (0.5 * arcsec, arcsec):
        for t in np.linspace(0.0, 2 * np.pi, samples, endpoint=False):
            p = v + r * ARCSEC_RAD * (np.cos(t) * east + np.sin(t) * north)
            p /= np.linalg.norm(p, axis=1)[:, None]
            near |= pixels_of(p, nside) != own
    return near


# --- (a) simulated survey against a brute-force batch match -----------------------------------
def test_matches_equal_brute_force(survey: Path, built: dict[str, object]) -> None:
    catalogs = built["catalogs"]
    stars = built["stars"]
    config = built["config"]
    ref = catalogs.reference  # type: ignore[attr-defined]
    assert ref is not None
    assert catalogs.reference_filters == tuple(SIM_FILTERS)  # type: ignore[attr-defined]
    assert np.all(np.diff(ref["fgcm_id"]) > 0)
    assert ref["refMag"].dtype == np.float32 and ref["refMag"].shape == (len(ref["fgcm_id"]), 4)
    expected = brute_force(survey / "refcat", config, stars.star_id,  # type: ignore[arg-type]
                           stars.ra, stars.dec)  # type: ignore[attr-defined]
    got = {int(f): int(r) for f, r in zip(ref["fgcm_id"], ref["ref_id"], strict=True)}
    assert got == {f: e[0] for f, e in expected.items()}
    assert len(got) > 300
    exp_mag = np.array([expected[int(f)][1] for f in ref["fgcm_id"]])
    exp_err = np.array([expected[int(f)][2] for f in ref["fgcm_id"]])
    np.testing.assert_array_equal(ref["refMag"], exp_mag)
    np.testing.assert_array_equal(ref["refMagErr"], exp_err)
    # matched reference ids are the truth ids of the stars' objects: most are real matches
    sep = angular_separation_arcsec(
        stars.ra[np.searchsorted(stars.star_id, ref["fgcm_id"])],  # type: ignore[attr-defined]
        stars.dec[np.searchsorted(stars.star_id, ref["fgcm_id"])],  # type: ignore[attr-defined]
        np.array([expected[int(f)][3] for f in ref["fgcm_id"]]),
        np.array([expected[int(f)][4] for f in ref["fgcm_id"]]))
    assert np.all(sep <= 1.0) and np.median(sep) < 0.1


def _border_and_across(stars: object, expected: dict[int, tuple], nside: int,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.array(sorted(expected), dtype=np.int64)
    rows = np.searchsorted(stars.star_id, ids)  # type: ignore[attr-defined]
    ra, dec = stars.ra[rows], stars.dec[rows]  # type: ignore[attr-defined]
    border = distance_to_pixel_border_below(ra, dec, nside, 2.0)
    ref_ra = np.array([expected[int(i)][3] for i in ids])
    ref_dec = np.array([expected[int(i)][4] for i in ids])
    across = pixels_of(unit_vectors(ref_ra, ref_dec), nside) != \
        pixels_of(unit_vectors(ra, dec), nside)
    return ids, border, across


def test_border_stars_keep_their_matches(survey: Path, built: dict[str, object]) -> None:
    stars = built["stars"]
    ref = built["catalogs"].reference  # type: ignore[attr-defined]
    expected = brute_force(survey / "refcat", built["config"],  # type: ignore[arg-type]
                           stars.star_id, stars.ra, stars.dec)  # type: ignore[attr-defined]
    ids, border, _ = _border_and_across(stars, expected, STORE_NSIDE)
    assert border.sum() >= 20, border.sum()
    got = dict(zip(ref["fgcm_id"].tolist(), ref["ref_id"].tolist(), strict=True))
    for i in ids[border]:
        assert got.get(int(i)) == expected[int(i)][0]


def jittered_refcat(src: Path, dst: Path, arcsec: float, seed: int = 3) -> None:
    """A copy of the simulated refcat with every star moved ``arcsec`` in a random direction
    (re-sharded into the right HTM-7 trixels)."""
    from streamstars.simulate import htm_index

    bands = [k for k in SIM_FILTERS.values()]
    cols = ["id", "coord_ra", "coord_dec"] + [f"{b}_{s}" for b in bands
                                              for s in ("flux", "fluxErr")]
    ref = whole_refcat(src, cols)
    rng = np.random.default_rng(seed)
    v = unit_vectors(np.degrees(ref["coord_ra"]), np.degrees(ref["coord_dec"]))
    east = np.cross([0.0, 0.0, 1.0], v)
    east /= np.linalg.norm(east, axis=1)[:, None]
    north = np.cross(v, east)
    t = rng.uniform(0, 2 * np.pi, len(v))[:, None]
    v = v + arcsec * ARCSEC_RAD * (np.cos(t) * east + np.sin(t) * north)
    v /= np.linalg.norm(v, axis=1)[:, None]
    ref["coord_ra"] = np.arctan2(v[:, 1], v[:, 0]) % (2 * np.pi)
    ref["coord_dec"] = np.arcsin(v[:, 2])
    dst.mkdir()
    shutil.copy(src / "config.py", dst / "config.py")
    shutil.copy(src / "master_schema.fits", dst / "master_schema.fits")
    shard = htm_index(np.degrees(ref["coord_ra"]), np.degrees(ref["coord_dec"]), 7)
    for trixel in np.unique(shard):
        rows = shard == trixel
        hdu = fits.BinTableHDU.from_columns(
            [fits.Column(name=c, format="K" if c == "id" else "D", array=ref[c][rows])
             for c in cols])
        hdu.header["HIERARCH REFCAT_FORMAT_VERSION"] = 1
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(dst / f"{int(trixel)}.fits")


def test_reference_across_pixel_border(survey: Path, tmp_path: Path) -> None:
    """Reference stars 0.8" from their star, often in the neighbouring store pixel."""
    refcat = tmp_path / "jittered"
    jittered_refcat(survey / "refcat", refcat, 0.8)
    nside = 2048  # 1.7' pixels
    config = dataclasses.replace(sim_config(refcat), storeNside=nside)
    with StarStore.open(tmp_path / "state", config) as store:
        backfill(survey, store, progress=False)
        with store.read() as txn:
            catalogs, stars = build_catalogs(store, txn)
    expected = brute_force(refcat, config, stars.star_id, stars.ra, stars.dec)
    ref = catalogs.reference
    assert ref is not None
    got = dict(zip(ref["fgcm_id"].tolist(), ref["ref_id"].tolist(), strict=True))
    assert got == {f: e[0] for f, e in expected.items()}
    ids, border, across = _border_and_across(stars, expected, nside)
    assert across.sum() >= 5, across.sum()  # the reference star lies in another pixel
    assert border.sum() >= 40, border.sum()
    for i in ids[across | border]:
        assert got[int(i)] == expected[int(i)][0]


def test_cache_contents_and_timing(survey: Path, built: dict[str, object]) -> None:
    cached = built["cached"]
    results = built["results"]
    # every cached star is unique, selected, and lies in a cached pixel
    assert len(np.unique(cached["ref_id"])) == len(cached["ref_id"])  # type: ignore[index]
    assert sum(r.reference_stars for r in results) == len(cached["ref_id"])  # type: ignore[index,attr-defined]
    assert sum(r.reference_pixels for r in results) == built["n_records"]  # type: ignore[attr-defined]
    assert results[0].reference_seconds > 0  # type: ignore[index]
    assert all(r.reference_seconds >= 0 for r in results)  # type: ignore[attr-defined]
    with StarStore.open(built["state"], readonly=True) as store:  # type: ignore[arg-type]
        meta = stored_refcat(store)
    assert meta is not None
    assert meta["filters"] == list(SIM_FILTERS) and meta["depth"] == 7
    assert meta["dataset_name"] == "sim_refcat" and meta["format_version"] == 1
    assert Path(meta["path"]) == (survey / "refcat").resolve()


def test_two_refs_on_one_star_nearest_wins(built: dict[str, object], survey: Path) -> None:
    """Competing reference stars: the nearest keeps the star, the other stays unmatched."""
    stars = built["stars"]
    cached = built["cached"]
    ref = built["catalogs"].reference  # type: ignore[attr-defined]
    sv = unit_vectors(stars.ra, stars.dec)  # type: ignore[attr-defined]
    rv = unit_vectors(cached["ra"], cached["dec"])  # type: ignore[index]
    from scipy.spatial import cKDTree

    chord = 2 * np.sin(0.5 * ARCSEC_RAD)
    dist, nearest = cKDTree(sv).query(rv, distance_upper_bound=chord)
    picked = np.isfinite(dist)
    counts = np.bincount(nearest[picked], minlength=len(sv))
    contested = np.flatnonzero(counts >= 2)
    winners = dict(zip(ref["fgcm_id"].tolist(), ref["ref_id"].tolist(), strict=True))
    for s in contested:
        cands = np.flatnonzero(picked & (nearest == s))
        best = cands[np.argmin(dist[cands])]
        assert winners[int(stars.star_id[s])] == int(cached["ref_id"][best])  # type: ignore[attr-defined,index]
    # the matched reference ids are unique (one star per reference star)
    assert len(set(winners.values())) == len(winners)


# --- (e) the files --------------------------------------------------------------------------
def test_snapshot_files(built: dict[str, object], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snap"
    with StarStore.open(built["state"], readonly=True) as store:  # type: ignore[arg-type]
        write_store_snapshot(store, out)
    ref = built["catalogs"].reference  # type: ignore[attr-defined]
    with fits.open(out / "fgcmReferenceStars.fits") as hdul:
        header = hdul[1].header
        data = hdul[1].data
        assert header["FILTERNAMES"] == "g_6,r_57,i_39,z_20"
        assert header["REFSTARS_FORMAT_VERSION"] == 1
        np.testing.assert_array_equal(data["fgcm_id"], ref["fgcm_id"])
        np.testing.assert_array_equal(data["refMag"], ref["refMag"])
        np.testing.assert_array_equal(data["refMagErr"], ref["refMagErr"])
    table = pq.read_table(out / "fgcm_reference_stars.parquet")
    assert table.schema.metadata[b"FILTERNAMES"] == b"g_6,r_57,i_39,z_20"
    assert table.schema.field("fgcm_id").type == "int64"
    np.testing.assert_array_equal(table["fgcm_id"].to_numpy(), ref["fgcm_id"])
    mags = np.stack(table["refMag"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(mags, ref["refMag"])


def test_missing_filter_is_99(survey: Path, tmp_path: Path) -> None:
    """A physical filter whose refcat flux is NaN gets refMag = refMagErr = 99."""
    refcat = tmp_path / "refcat"
    shutil.copytree(survey / "refcat", refcat)
    for shard in refcat.glob("*.fits"):
        if shard.name == "master_schema.fits":
            continue
        with fits.open(shard, mode="update") as hdul:
            data = hdul[1].data
            data["z_flux"][::2] = np.nan  # every other star has no z
    config = sim_config(refcat)
    with StarStore.open(tmp_path / "state", config) as store:
        backfill(survey, store, progress=False)
        with store.read() as txn:
            catalogs, _ = build_catalogs(store, txn)
    ref = catalogs.reference
    assert ref is not None
    missing = ref["refMag"][:, 3] == 99.0
    assert 0 < missing.sum() < len(missing)
    assert np.all(ref["refMagErr"][missing, 3] == 99.0)
    assert np.all(ref["refMag"][~missing, 3] < 30)
    assert np.all(ref["refMag"][:, :3] < 30)


# --- (d) refresh-refs and mismatching stores --------------------------------------------------
def test_refresh_refs_after_config_change(survey: Path, built: dict[str, object],
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    old = built["catalogs"].reference  # type: ignore[attr-defined]
    config = built["config"]
    strict = dataclasses.replace(
        config, fgcmLoadReferenceCatalog=dataclasses.replace(
            config.fgcmLoadReferenceCatalog,  # type: ignore[attr-defined]
            referenceSelector=sn_selector("r", 100.0)))
    strict_toml = write_toml(tmp_path / "strict.toml", strict)
    base_toml = write_toml(tmp_path / "base.toml", config)  # type: ignore[arg-type]
    assert main(["backfill", str(survey), "--state", str(state), "--config", str(base_toml),
                 "--no-progress"]) == 0

    # the changed selector is refused until refresh-refs: backfill exits 2 before any visit
    assert main(["backfill", str(survey), "--state", str(state), "--config", str(strict_toml),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "refresh-refs" in err and "referenceSelector" in err
    with pytest.raises(StateError, match="refresh-refs"), \
            StateDirectory.open(state, strict) as directory:
        attach_references(directory)
    # a snapshot asking for other reference settings is refused too
    assert main(["snapshot", str(tmp_path / "s0"), "--state", str(state), "--config",
                 str(strict_toml)]) == 2
    assert "refresh-refs" in capsys.readouterr().err

    assert main(["refresh-refs", "--state", str(state), "--config", str(strict_toml),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "reference stars cached" in printed
    # the stored config now carries the new reference settings: snapshot needs no --config
    assert main(["snapshot", str(tmp_path / "s1"), "--state", str(state)]) == 0
    catalogs = read_snapshot(tmp_path / "s1")
    new = catalogs.reference
    assert new is not None
    expected = brute_force(survey / "refcat", strict, *star_columns(catalogs))
    assert_matches_expected(new, expected)
    # a stricter S/N cut: fewer matches, all bright; every old match whose reference star
    # passes the new cut is kept (fewer competitors), some stars get another reference star
    assert 0 < len(new["fgcm_id"]) < len(old["fgcm_id"])
    sn_limit = 2.5 / np.log(10) / 100.0
    assert np.all(new["refMagErr"][:, 1] < sn_limit * 1.0001)
    old_pairs = set(zip(old["fgcm_id"].tolist(), old["ref_id"].tolist(), strict=True))
    new_pairs = {(f, e[0]) for f, e in expected.items()}  # what the snapshot matched
    bright = old["refMagErr"][:, 1] < sn_limit * 0.999
    assert {p for p, b in zip(sorted(old_pairs), bright[np.argsort(old["fgcm_id"])],
                              strict=True) if b} <= new_pairs
    assert new["refMag"][:, 1].max() < old["refMag"][:, 1].max()
    # backfill with the new config is accepted (nothing to apply), the old one refused
    assert main(["backfill", str(survey), "--state", str(state), "--config", str(strict_toml),
                 "--no-progress"]) == 0
    assert main(["backfill", str(survey), "--state", str(state), "--config", str(base_toml),
                 "--no-progress"]) == 2
    capsys.readouterr()


def test_store_without_refcat_then_configured(survey: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    config = sim_config(survey / "refcat")
    plain = dataclasses.replace(config, fgcmLoadReferenceCatalog=RefcatLoadConfig())
    with StateDirectory.open(state, plain) as directory:
        backfill(survey, directory, progress=False)
    assert state_catalogs(state, tmp_path / "s0").reference is None
    toml = write_toml(tmp_path / "refs.toml", config)
    assert main(["backfill", str(survey), "--state", str(state), "--config", str(toml),
                 "--no-progress"]) == 2
    assert "refresh-refs" in capsys.readouterr().err
    with StateDirectory.open(state, config) as directory:
        n, seconds = refresh_all(directory)
        assert n > 0 and seconds > 0
    catalogs = state_catalogs(state, tmp_path / "s1")
    expected = brute_force(survey / "refcat", config, *star_columns(catalogs))
    assert_matches_expected(catalogs.reference, expected)
    assert main(["backfill", str(survey), "--state", str(state), "--config", str(toml),
                 "--no-progress"]) == 0
    # dropping the catalog again: refresh-refs with an empty path clears the cache
    assert main(["refresh-refs", "--state", str(state), "--config",
                 str(write_toml(tmp_path / "plain.toml", plain)), "--no-progress"]) == 0
    assert "dropped" in capsys.readouterr().out
    with StateDirectory.open(state, readonly=True) as directory:
        assert directory.stored_refcat() is None
        for _, pixel in directory.shards():
            shard = directory.open_shard(pixel)
            assert stored_refcat(shard) is None
            with shard.read() as txn:
                assert txn.refcache.count() == 0
    assert state_catalogs(state, tmp_path / "s2").reference is None


def test_colour_terms(survey: Path, tmp_path: Path) -> None:
    """applyColorTerms: m = p + c0 + c1 (p - s) + c2 (p - s)^2 in the cached magnitudes."""
    colorterms = {"r_57": ColortermConfig(primary="r", secondary="i", c0=0.01, c1=0.1, c2=0.0)}
    config = sim_config(survey / "refcat", filter_map={"r_57": "r"})
    config = dataclasses.replace(config, fgcmLoadReferenceCatalog=dataclasses.replace(
        config.fgcmLoadReferenceCatalog, applyColorTerms=True, colorterms=colorterms))
    with StarStore.open(tmp_path / "state", config) as store:
        backfill(survey, store, progress=False)
        with store.read() as txn:
            catalogs, stars = build_catalogs(store, txn)
    expected = brute_force(survey / "refcat", config, stars.star_id, stars.ra, stars.dec)
    ref = catalogs.reference
    assert ref is not None and catalogs.reference_filters == ("r_57",)
    np.testing.assert_array_equal(ref["refMag"][:, 0],
                                  [expected[int(f)][1][0] for f in ref["fgcm_id"]])


# --- (b) the real CFHT fixture ----------------------------------------------------------------
def test_cfht_known_match(shared_data: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("sourceTable-849375.parq", "sourceTable-850587.parq",
                 "visitSummary-849375.fits", "visitSummary-850587.fits"):
        (repo / name).symlink_to(shared_data / CFHT / name)
    config = BuildStarsConfig(primaryBands=("r",), fgcmLoadReferenceCatalog=RefcatLoadConfig(
        path=str(shared_data / CFHT_REFCAT), filterMap={"r.MP9601": "r"}))
    toml = write_toml(tmp_path / "cfht.toml", config)
    state, out = tmp_path / "state", tmp_path / "snap"
    assert main(["backfill", str(repo), "--state", str(state), "--config", str(toml),
                 "--no-progress"]) == 0
    assert main(["snapshot", str(out), "--state", str(state)]) == 0
    capsys.readouterr()
    stars = pq.read_table(out / "fgcm_star_ids.parquet").to_pydict()
    assert len(stars["fgcm_id"]) == 1  # the star seen in both visits
    with fits.open(out / "fgcmReferenceStars.fits") as hdul:
        assert hdul[1].header["FILTERNAMES"] == "r.MP9601"
        assert hdul[1].header["REFSTARS_FORMAT_VERSION"] == 1
        data = hdul[1].data
        assert data["fgcm_id"].tolist() == stars["fgcm_id"]
        # one filter: astropy reads the "1E" vector column back as a scalar per row
        ref_mag = float(np.asarray(data["refMag"]).reshape(-1)[0])
        ref_err = float(np.asarray(data["refMagErr"]).reshape(-1)[0])
    # its SDSS counterpart (id 37122020600681), 0.07"-0.11" from each observation
    sdss = whole_refcat(shared_data / CFHT_REFCAT, ["id", "coord_ra", "coord_dec", "r_flux"])
    row = int(np.flatnonzero(sdss["id"] == 37122020600681)[0])
    sep = angular_separation_arcsec(np.array(stars["ra"]), np.array(stars["dec"]),
                                    np.degrees(sdss["coord_ra"][[row]]),
                                    np.degrees(sdss["coord_dec"][[row]]))
    assert 0.03 < sep[0] < 0.11
    assert ref_mag == pytest.approx(-2.5 * np.log10(sdss["r_flux"][row]) + 31.4, abs=1e-5)
    assert 14.0 < ref_mag < 23.0 and 0 < ref_err < 0.2
    with StateDirectory.open(state, readonly=True) as directory:
        meta = stored_refcat(directory)
    assert meta is not None
    assert meta["dataset_name"] == "sdss" and meta["format_version"] == 2
    assert meta["depth"] == 7 and meta["filters"] == ["r.MP9601"]


def test_sdss_depth8_pipe_tasks_refcat(shared_data: Path) -> None:
    """A depth-8 real refcat opens and validates; its pixels load like the simulated ones."""
    source = open_reference_source(RefcatLoadConfig(
        path=str(shared_data / "sdss_refcat_pipe_tasks/cal_ref_cat"),
        filterMap={"HSC-R": "r", "HSC-I": "i"},
        referenceSelector=ReferenceSelectorConfig(doFlags=True)))
    assert source is not None and source.refcat.depth == 8
    shards = source.refcat.existing_shards()
    data = source.refcat.load(shards, ["coord_ra", "coord_dec"])
    ra, dec = np.degrees(data["coord_ra"]) % 360, np.degrees(data["coord_dec"])
    pixels = np.unique(pixels_of(unit_vectors(ra, dec), 64))
    cols, pix = source.load_pixels(pixels, 64)
    assert len(cols["ref_id"]) == 15083
    assert np.array_equal(np.sort(pix), np.sort(pixels_of(unit_vectors(ra, dec), 64)))


# --- (c) bad input at start-up -----------------------------------------------------------------
def _backfill_rc(survey: Path, tmp_path: Path, config: BuildStarsConfig) -> int:
    toml = write_toml(tmp_path / "bad.toml", config)
    return main(["backfill", str(survey), "--state", str(tmp_path / "state"), "--config",
                 str(toml), "--no-progress"])


def _assert_refused(survey: Path, tmp_path: Path, config: BuildStarsConfig, match: str,
                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RefcatError, match=match):
        open_reference_source(config.fgcmLoadReferenceCatalog)
    assert _backfill_rc(survey, tmp_path, config) == 2
    err = capsys.readouterr().err
    assert "error" in err
    # nothing was applied: the state directory was not even created
    assert not (tmp_path / "state").exists()


def test_missing_refcat_directory(survey: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _assert_refused(survey, tmp_path, sim_config(tmp_path / "nowhere"), "does not exist", capsys)


def test_shard_with_wrong_columns(survey: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    refcat = tmp_path / "refcat"
    shutil.copytree(survey / "refcat", refcat)
    shards = sorted(p for p in refcat.glob("*.fits") if p.name != "master_schema.fits")
    victim = shards[len(shards) // 2]  # not the first one: every shard is checked
    with fits.open(victim) as hdul:
        data = hdul[1].data
        cols = [fits.Column(name="id", format="K", array=data["id"]),
                fits.Column(name="coord_ra", format="D", array=data["coord_ra"]),
                fits.Column(name="coord_dec", format="D", array=data["coord_dec"]),
                fits.Column(name="r_mag", format="D", array=data["r_flux"])]
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.header["HIERARCH REFCAT_FORMAT_VERSION"] = 1
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(victim, overwrite=True)
    _assert_refused(survey, tmp_path, sim_config(refcat), victim.name, capsys)


def test_version0_refcat_refused(shared_data: Path, survey: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = shared_data / SYNTHETIC_V0
    assert parse_refcat_config((path / "config.py").read_text())["format_version"] in (None, 0)
    config = sim_config(path, filter_map={"r_57": "a"}, selector=ReferenceSelectorConfig())
    _assert_refused(survey, tmp_path, config, "format version 0", capsys)


def test_filtermap_missing_flux_column(survey: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = sim_config(survey / "refcat", filter_map={**SIM_FILTERS, "y_10": "y"})
    _assert_refused(survey, tmp_path, config, "y_flux", capsys)


def test_selector_missing_column(survey: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = sim_config(survey / "refcat", selector=sn_selector("u"))
    _assert_refused(survey, tmp_path, config, "u_flux", capsys)


def test_refresh_refs_validates(survey: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    config = sim_config(survey / "refcat")
    with StateDirectory.open(tmp_path / "state", config):
        pass
    bad = write_toml(tmp_path / "bad.toml", sim_config(tmp_path / "nowhere"))
    assert main(["refresh-refs", "--state", str(tmp_path / "state"), "--config", str(bad),
                 "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_stored_config_keeps_filter_order(built: dict[str, object]) -> None:
    """FILTERNAMES follow filterMap order, also for a store reopened without --config."""
    with StarStore.open(built["state"], readonly=True) as store:  # type: ignore[arg-type]
        assert list(store.config.fgcmLoadReferenceCatalog.filterMap) == list(SIM_FILTERS)
        assert store.config.fgcmLoadReferenceCatalog == \
            built["config"].fgcmLoadReferenceCatalog  # type: ignore[attr-defined]


def test_consumer_refuses_bad_refcat_before_consuming(survey: Path, tmp_path: Path) -> None:
    from streamstars.consumers.options import EXIT_STATE, EXIT_USAGE, RunOptions
    from streamstars.consumers.runner import Runner

    bad = write_toml(tmp_path / "bad.toml", sim_config(tmp_path / "nowhere"))
    # no broker at this address: the refcat is refused before any Kafka connection
    options = RunOptions(bootstrap="127.0.0.1:9", topic="visits", state=tmp_path / "state",
                         config_path=bad)
    assert Runner(options).run() == EXIT_USAGE
    assert not (tmp_path / "state").exists()
    # a store caching another selection is refused (exit 3) until refresh-refs
    config = sim_config(survey / "refcat")
    with StateDirectory.open(tmp_path / "state", config) as directory:
        attach_references(directory)
    other = write_toml(tmp_path / "other.toml",
                       sim_config(survey / "refcat", selector=sn_selector("g", 30.0)))
    options = dataclasses.replace(options, config_path=other)
    assert Runner(options).run() == EXIT_STATE


def test_cache_rebuilt_by_another_process_stops_ingestion(survey: Path, tmp_path: Path) -> None:
    """A running writer notices that refresh-refs changed meta/refcat under it."""
    config = sim_config(survey / "refcat")
    with StarStore.open(tmp_path / "state", config) as store:
        source = attach_references(store)
        meta = stored_refcat(store)
        assert meta is not None
        meta["settings_hash"] = "0" * 64  # what another process's refresh-refs would leave
        store.write(lambda txn: txn.meta.set_refcat(meta))
        report = backfill(survey, store, progress=False, references=source)
        assert report.applied == 0 and len(report.failed) == 12
        assert "refresh-refs" in report.failed[0].error
        assert store.applied_visits() == {}
