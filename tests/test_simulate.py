"""Tests of the simulated survey (streamstars.simulate) and its command-line wrapper."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.spatial import cKDTree

from streamstars.simulate import (
    SOURCE_ID_SHIFT,
    SimulatedSurvey,
    htm_index,
    simulate_survey,
)
from streamstars.sky import unit_vectors

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The sourceTable_visit columns fgcmcal reads and the Arrow types the simulation writes.
SOURCE_COLUMNS: dict[str, pa.DataType] = {
    "visit": pa.int64(),
    "detector": pa.int64(),
    "sourceId": pa.int64(),
    "ra": pa.float64(),
    "dec": pa.float64(),
    "x": pa.float64(),
    "y": pa.float64(),
    "calib_psf_candidate": pa.bool_(),
    "apFlux_12_0_instFlux": pa.float64(),
    "apFlux_12_0_instFluxErr": pa.float64(),
    "apFlux_12_0_flag": pa.bool_(),
    "apFlux_17_0_instFlux": pa.float64(),
    "apFlux_17_0_instFluxErr": pa.float64(),
    "pixelFlags_edge": pa.bool_(),
    "pixelFlags_interpolatedCenter": pa.bool_(),
    "pixelFlags_saturatedCenter": pa.bool_(),
    "pixelFlags_crCenter": pa.bool_(),
    "pixelFlags_bad": pa.bool_(),
    "pixelFlags_interpolated": pa.bool_(),
    "pixelFlags_saturated": pa.bool_(),
    "centroid_flag": pa.bool_(),
    "extendedness": pa.float64(),
    "parentSourceId": pa.int64(),
    "deblend_nChild": pa.int32(),
    "detect_isPrimary": pa.bool_(),
    "localBackground_instFlux": pa.float64(),
    "localBackground_flag": pa.bool_(),
    "band": pa.string(),
    "physical_filter": pa.string(),
    "localWcs_CDMatrix_1_1": pa.float64(),
    "localWcs_CDMatrix_1_2": pa.float64(),
    "localWcs_CDMatrix_2_1": pa.float64(),
    "localWcs_CDMatrix_2_2": pa.float64(),
}
BAD_FLAGS = ("pixelFlags_edge", "pixelFlags_interpolatedCenter", "pixelFlags_saturatedCenter",
             "pixelFlags_crCenter", "pixelFlags_bad", "pixelFlags_interpolated",
             "pixelFlags_saturated", "centroid_flag", "apFlux_12_0_flag")
VISIT_COLUMNS = ("visit", "physical_filter", "band", "ra", "dec", "skyRotation", "azimuth",
                 "altitude", "zenithDistance", "airmass", "expTime", "expMidpt", "expMidptMJD",
                 "obsStart", "obsStartMJD")
CCD_VISIT_COLUMNS = ("ccdVisitId", "visitId", "detector", "physical_filter", "band", "ra", "dec",
                     "zenithDistance", "zeroPoint", "psfSigma", "seeing", "skyBg", "skyNoise",
                     "skyRotation", "expMidpt", "expMidptMJD", "expTime", "obsStart",
                     "obsStartMJD", "darkTime", "xSize", "ySize", "pixelScale")
N_SMALL_VISITS = 6


def _simulate_small(out_dir: Path, seed: int = 11,
                    n_visits: int = N_SMALL_VISITS) -> SimulatedSurvey:
    """The small default survey used by most tests."""
    return simulate_survey(out_dir, n_visits=n_visits, seed=seed, sources_per_visit=2500,
                           field_radius_deg=0.6)


def _columns(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    table = pq.read_table(path, columns=names)
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


def _all_sources(survey: SimulatedSurvey, names: list[str]) -> dict[str, np.ndarray]:
    parts = [_columns(p, names) for p in survey.source_paths]
    return {n: np.concatenate([p[n] for p in parts]) for n in names}


def _pairs_within(ra: np.ndarray, dec: np.ndarray, radius_arcsec: float) -> np.ndarray:
    tree = cKDTree(unit_vectors(ra, dec))
    return tree.query_pairs(2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0),
                            output_type="ndarray")


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> SimulatedSurvey:
    """A small default survey."""
    return _simulate_small(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> SimulatedSurvey:
    """A small crowded survey."""
    return simulate_survey(tmp_path_factory.mktemp("crowded"), n_visits=4, seed=5,
                           sources_per_visit=3000, field_radius_deg=0.5, crowded=True,
                           write_refcat=False)


def test_files_and_counts(survey: SimulatedSurvey) -> None:
    assert len(survey.visits) == len(survey.source_paths) == N_SMALL_VISITS
    assert survey.bands == ["g", "r", "i", "z", "g", "r"]
    assert all(p.is_file() for p in survey.source_paths)
    for path, visit in zip(survey.source_paths, survey.visits, strict=True):
        assert path.name == f"sourceTable_visit_{visit}.parquet"
    assert survey.n_sources == sum(survey.n_sources_per_visit)
    # Roughly the requested number of sources per visit.
    assert 0.6 * 2500 < np.mean(survey.n_sources_per_visit) < 1.4 * 2500
    assert survey.truth_path.is_file()


def test_deterministic(survey: SimulatedSurvey, tmp_path: Path) -> None:
    again = _simulate_small(tmp_path / "again")
    for a, b in zip(survey.source_paths, again.source_paths, strict=True):
        assert a.read_bytes() == b.read_bytes()
    for name in ("visitTable.parquet", "ccdVisitTable.parquet", "truth.parquet"):
        assert (survey.out_dir / name).read_bytes() == (again.out_dir / name).read_bytes()
    other = _simulate_small(tmp_path / "other", seed=12, n_visits=1)
    assert other.source_paths[0].read_bytes() != survey.source_paths[0].read_bytes()


def test_source_schema(survey: SimulatedSurvey) -> None:
    for path, visit, band in zip(survey.source_paths, survey.visits, survey.bands, strict=True):
        schema = pq.read_schema(path)
        for name, dtype in SOURCE_COLUMNS.items():
            assert name in schema.names, name
            assert schema.field(name).type == dtype, name
        cols = _columns(path, ["visit", "band", "physical_filter", "detector", "x", "y"])
        assert np.all(cols["visit"] == visit)
        assert set(cols["band"]) == {band}
        assert len(set(cols["physical_filter"])) == 1
        # Grouped by detector, several detectors per file, pixels on the CCD.
        assert np.all(np.diff(cols["detector"]) >= 0)
        assert len(np.unique(cols["detector"])) > 1
        assert cols["x"].min() >= 0 and cols["y"].min() >= 0


def test_source_ids_unique(survey: SimulatedSurvey) -> None:
    cols = _all_sources(survey, ["sourceId", "visit"])
    ids = cols["sourceId"]
    assert len(np.unique(ids)) == len(ids)
    assert np.all(ids > 0)
    assert np.all((ids >> SOURCE_ID_SHIFT) == cols["visit"])


def test_overlapping_visits_share_objects(survey: SimulatedSurvey) -> None:
    names = ["ra", "dec", "extendedness", "apFlux_12_0_instFlux", "apFlux_12_0_instFluxErr"]
    a = _columns(survey.source_paths[0], names)
    b = _columns(survey.source_paths[4], names)  # same band (g), different pointing
    bright_a = (a["apFlux_12_0_instFlux"] / a["apFlux_12_0_instFluxErr"] > 20) & (
        a["extendedness"] < 0.5)
    tree = cKDTree(unit_vectors(b["ra"], b["dec"]))
    dist, _ = tree.query(unit_vectors(a["ra"][bright_a], a["dec"][bright_a]))
    sep = np.degrees(2 * np.arcsin(dist / 2)) * 3600.0
    # Heavy overlap, and repeat observations of a star are well within 1".
    assert np.mean(sep < 1.0) > 0.4
    assert np.median(sep[sep < 1.0]) < 0.15


def test_selection_mix(survey: SimulatedSurvey) -> None:
    names = [*BAD_FLAGS, "extendedness", "apFlux_12_0_instFlux", "apFlux_12_0_instFluxErr",
             "apFlux_17_0_instFlux", "parentSourceId", "deblend_nChild", "detect_isPrimary",
             "calib_psf_candidate", "localWcs_CDMatrix_1_1", "localWcs_CDMatrix_1_2",
             "localWcs_CDMatrix_2_1", "localWcs_CDMatrix_2_2"]
    c = _all_sources(survey, names)
    flag_ok = ~np.any(np.stack([c[f] for f in BAD_FLAGS]), axis=0)
    for f in BAD_FLAGS:
        assert c[f].any(), f
    snr = c["apFlux_12_0_instFlux"] / c["apFlux_12_0_instFluxErr"]
    assert np.nanmin(snr) < 5 and np.nanmax(snr) > 1000
    passed = (flag_ok & (c["extendedness"] < 0.5) & np.isfinite(snr) & (snr > 10) & (snr < 1000)
              & (c["parentSourceId"] == 0) & (c["deblend_nChild"] == 0) & c["detect_isPrimary"])
    assert 0.2 < passed.mean() < 0.6
    # Loose-selection galaxies and psf candidates exist; aperture 17 a few % above 12.
    assert np.any(c["extendedness"] == 0.3)
    assert c["calib_psf_candidate"].any()
    ratio = c["apFlux_17_0_instFlux"][passed] / c["apFlux_12_0_instFlux"][passed]
    assert 1.005 < np.median(ratio) < 1.08
    # CD matrix: ~0.2"/pixel, slightly varying.
    det = (c["localWcs_CDMatrix_1_1"] * c["localWcs_CDMatrix_2_2"]
           - c["localWcs_CDMatrix_1_2"] * c["localWcs_CDMatrix_2_1"])
    scale = np.degrees(np.sqrt(np.abs(det))) * 3600.0
    assert np.allclose(scale, 0.2, rtol=0.02)
    assert np.ptp(scale) > 1e-5


def test_metadata_tables(survey: SimulatedSurvey) -> None:
    visits = pq.read_table(survey.visit_table_path)
    assert visits.column_names == list(VISIT_COLUMNS)
    assert visits["visit"].to_pylist() == survey.visits
    assert pa.types.is_timestamp(visits.schema.field("expMidpt").type)
    mjd = visits["expMidptMJD"].to_numpy()
    start = visits["obsStartMJD"].to_numpy()
    assert np.allclose((mjd - start) * 86400.0, visits["expTime"].to_numpy() / 2)
    ccd = pq.read_table(survey.ccd_visit_table_path)
    assert ccd.column_names == list(CCD_VISIT_COLUMNS)
    assert ccd.num_rows == len(survey.visits) * 9
    assert set(ccd["visitId"].to_pylist()) == set(survey.visits)
    assert np.all(ccd["psfSigma"].to_numpy() > 0) and np.all(ccd["skyBg"].to_numpy() > 0)
    src = _columns(survey.source_paths[0], ["ccdVisitId", "detector"])
    assert set(src["ccdVisitId"]) <= set(ccd["ccdVisitId"].to_pylist())


def test_refcat(survey: SimulatedSurvey) -> None:
    from astropy.io import fits

    assert survey.refcat_path is not None
    ref = survey.refcat_path
    config = (ref / "config.py").read_text()
    assert "config.format_version=1" in config
    assert "config.ref_dataset_name='sim_refcat'" in config
    assert "config.indexer['HTM'].depth=7" in config
    with fits.open(ref / "master_schema.fits") as hdul:
        assert len(hdul[1].data) == 0
        assert "g_flux" in hdul[1].columns.names
    shards = sorted(p for p in ref.glob("*.fits") if p.stem.isdigit())
    assert len(shards) > 1
    total = 0
    rng = np.random.default_rng(0)
    import lsst.sphgeom as sphgeom

    pix = sphgeom.HtmPixelization(7)
    for path in shards:
        with fits.open(path) as hdul:
            header = hdul[1].header
            data = hdul[1].data
            assert header["REFCAT_FORMAT_VERSION"] == 1
            names = hdul[1].columns.names
            for col in ("id", "coord_ra", "coord_dec", "r_flux", "r_fluxErr", "z_fluxErr"):
                assert col in names
            ra = np.asarray(data["coord_ra"], dtype=float)
            dec = np.asarray(data["coord_dec"], dtype=float)
            assert np.all((ra >= 0) & (ra < 2 * np.pi)) and np.all(np.abs(dec) <= np.pi / 2)
            mag = -2.5 * np.log10(np.asarray(data["r_flux"], dtype=float)) + 31.4
            assert np.all((mag > 14) & (mag < 23))
            sample = rng.choice(len(data), size=min(5, len(data)), replace=False)
            for k in sample:
                vec = sphgeom.UnitVector3d(sphgeom.LonLat.fromRadians(ra[k], dec[k]))
                assert pix.index(vec) == int(path.stem)
            total += len(data)
    assert total == survey.n_refcat > 0


def test_htm_index_matches_sphgeom() -> None:
    import lsst.sphgeom as sphgeom

    rng = np.random.default_rng(3)
    for ra0, dec0 in ((10.0, -40.0), (0.0, 0.0), (200.0, 89.9)):
        ra = np.mod(ra0 + rng.uniform(-2, 2, 300) / max(math.cos(math.radians(dec0)), 0.05),
                    360.0)
        dec = np.clip(dec0 + rng.uniform(-2, 2, 300), -90, 90)
        got = htm_index(ra, dec, 7)
        pix = sphgeom.HtmPixelization(7)
        want = [pix.index(sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(r, d)))
                for r, d in zip(ra, dec, strict=True)]
        assert got.tolist() == want


def test_ra_wrap(tmp_path: Path) -> None:
    sim = simulate_survey(tmp_path, n_visits=3, seed=2, sources_per_visit=1500, ra_center=0.0,
                          dec_center=-5.0, field_radius_deg=0.5)
    cols = _all_sources(sim, ["ra", "dec"])
    ra = cols["ra"]
    assert np.all((ra >= 0.0) & (ra < 360.0))
    assert np.sum(ra < 1.0) > 100 and np.sum(ra > 359.0) > 100
    assert np.all(np.abs(cols["dec"] + 5.0) < 0.6)
    visits = pq.read_table(sim.visit_table_path)["ra"].to_numpy()
    assert np.all((visits >= 0) & (visits < 360))


def test_polar_field(tmp_path: Path) -> None:
    sim = simulate_survey(tmp_path, n_visits=3, seed=4, sources_per_visit=1500,
                          dec_center=89.5, field_radius_deg=0.8)
    cols = _all_sources(sim, ["ra", "dec"])
    assert np.all(cols["dec"] <= 90.0) and cols["dec"].min() > 88.6
    assert np.all((cols["ra"] >= 0.0) & (cols["ra"] < 360.0))
    assert 0.6 * 1500 < np.mean(sim.n_sources_per_visit) < 1.4 * 1500
    assert sim.n_refcat > 0


def test_crowded_pairs_and_deblends(crowded: SimulatedSurvey) -> None:
    names = ["sourceId", "ra", "dec", "parentSourceId", "deblend_nChild", "detect_isPrimary"]
    n_close = 0
    n_children = 0
    for path in crowded.source_paths:
        c = _columns(path, names)
        parent = c["deblend_nChild"] > 0
        child = c["parentSourceId"] != 0
        assert parent.any() and child.any()
        # Parents: parentSourceId 0, not primary; children point to a parent of the file.
        assert np.all(c["parentSourceId"][parent] == 0)
        assert not c["detect_isPrimary"][parent].any() and c["detect_isPrimary"][child].all()
        row_of = {sid: k for k, sid in enumerate(c["sourceId"])}
        parent_rows = np.array([row_of[p] for p in c["parentSourceId"][child]])
        assert parent[parent_rows].all()
        counts = np.bincount(parent_rows, minlength=len(parent))
        assert np.array_equal(counts[parent], c["deblend_nChild"][parent])
        sep = np.degrees(np.arccos(np.clip(np.sum(
            unit_vectors(c["ra"][child], c["dec"][child])
            * unit_vectors(c["ra"][parent_rows], c["dec"][parent_rows]), axis=1), -1, 1)))
        assert np.all(sep * 3600.0 < 1.0)
        n_children += int(child.sum())
        # Isolated (never deblended) sources closer than 1" to each other: matcher stress.
        single = ~parent & ~child
        pairs = _pairs_within(c["ra"][single], c["dec"][single], 1.0)
        n_close += len(pairs)
    assert n_close > 10
    assert n_children > 20


def test_script(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("simulate_script",
                                                  REPO_ROOT / "scripts" / "simulate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cli"
    rc = module.main([str(out), "--visits", "2", "--seed", "1", "--sources-per-visit", "800",
                      "--radius", "0.4", "--no-refcat", "--quiet", "--ra", "359.9"])
    assert rc == 0
    assert len(list(out.glob("sourceTable_visit_*.parquet"))) == 2
    assert not (out / "refcat").exists()
