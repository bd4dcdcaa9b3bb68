"""Tests of the simulated survey (streamstars.simulate) and its command-line wrapper."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
                     "obsStartMJD", "darkTime", "xSize", "ySize", "pixelScale", "llcra", "llcdec",
                     "ulcra", "ulcdec", "urcra", "urcdec", "lrcra", "lrcdec")
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


# ------------------------------------------------------------------------------------------
# Wide surveys, border stars, the LSSTCam layout and later visits (issue 9's tests/benchmarks)
# ------------------------------------------------------------------------------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _separation_deg(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    centre = unit_vectors(np.array([ra0]), np.array([dec0]))[0]
    return np.degrees(np.arccos(np.clip(unit_vectors(ra, dec) @ centre, -1.0, 1.0)))


def _nest_pixels(nside: int, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    import healpy as hp

    return np.asarray(hp.ang2pix(nside, ra, dec, lonlat=True, nest=True))


def test_new_options_at_their_defaults_write_the_default_files(tmp_path: Path) -> None:
    """Naming every new option at its default value writes the same bytes as leaving it out
    (the golden-output tests guard the default files against earlier code)."""
    args = {"n_visits": 3, "seed": 4, "sources_per_visit": 1500, "field_radius_deg": 0.5,
            "crowded": True}
    plain = simulate_survey(tmp_path / "plain", **args)  # type: ignore[arg-type]
    named = simulate_survey(tmp_path / "named", survey_radius_deg=None, border_nside=None,
                            camera="grid", n_detectors=9, first_visit=0,
                            **args)  # type: ignore[arg-type]
    assert _files(plain.out_dir) == _files(named.out_dir)
    assert (plain.n_tiles, plain.n_border_stars, plain.footprint_radius_deg) == (1, 0, 0.5)


@pytest.mark.parametrize(("ra0", "dec0"), [(150.0, 2.0), (0.0, 0.0), (0.0, -89.0)])
def test_wide_survey_covers_its_footprint_with_small_visits(tmp_path: Path, ra0: float,
                                                            dec0: float) -> None:
    """>= 100 deg^2 covered by visits of ~9 deg^2 each, spread over the whole cap, bands
    cycling, about sources_per_visit rows a visit; at RA 0/360 and by a pole too."""
    import healpy as hp

    radius = 6.0  # 113 deg^2
    sim = simulate_survey(tmp_path, n_visits=48, seed=8, sources_per_visit=1000, ra_center=ra0,
                          dec_center=dec0, camera="lsstcam", field_radius_deg=2.6,
                          survey_radius_deg=radius, write_refcat=False)
    assert sim.n_tiles == 16 and sim.footprint_radius_deg == radius
    truth = _columns(sim.truth_path, ["ra", "dec"])
    sep = _separation_deg(truth["ra"], truth["dec"], ra0, dec0)
    assert sep.max() <= radius + 1e-9 and sep.max() > radius - 0.1
    nside = 256  # 0.05 deg^2 pixels
    pixel_area = hp.nside2pixarea(nside, degrees=True)
    union: set[int] = set()
    per_visit = []
    for path in sim.source_paths:
        c = _columns(path, ["ra", "dec"])
        assert np.all((c["ra"] >= 0.0) & (c["ra"] < 360.0)) and np.all(np.abs(c["dec"]) <= 90.0)
        pixels = set(_nest_pixels(nside, c["ra"], c["dec"]).tolist())
        per_visit.append(len(pixels) * pixel_area)
        union |= pixels
    assert len(union) * pixel_area >= 100.0
    assert max(per_visit) < 12.0  # LSSTCam: 9.3 deg^2, plus the pixels its edges cut
    assert max(per_visit) < 0.1 * len(union) * pixel_area
    visits = pq.read_table(sim.visit_table_path)
    pointing_sep = _separation_deg(visits["ra"].to_numpy(), visits["dec"].to_numpy(), ra0, dec0)
    assert pointing_sep.max() < radius and np.ptp(pointing_sep) > 0.6 * radius
    assert all(a != b for a, b in zip(sim.bands, sim.bands[1:], strict=False))
    assert {sim.bands.count(b) for b in "griz"} == {12}
    assert 0.75 * 1000 < np.median(sim.n_sources_per_visit) < 1.25 * 1000


def test_wide_survey_gives_every_part_several_visits(tmp_path: Path) -> None:
    """After four passes of the tiling every part of the footprint has been seen several
    times, and every tile has been visited in every band."""
    import healpy as hp

    from streamstars.simulate import SurveyTiling, make_camera

    radius = 5.0
    spacing = math.sqrt(make_camera(36, 2.0, 0.3).fov_area_deg2)
    n_tiles = len(SurveyTiling.of_cap(150.0, 2.0, radius, spacing))
    sim = simulate_survey(tmp_path, n_visits=4 * n_tiles, seed=2, sources_per_visit=600,
                          n_detectors=36, field_radius_deg=2.0, survey_radius_deg=radius,
                          write_refcat=False)
    assert sim.n_tiles == n_tiles
    nside = 32  # 3.4 deg^2 pixels
    seen: dict[int, set[tuple[int, str]]] = {}
    for path, visit, band in zip(sim.source_paths, sim.visits, sim.bands, strict=True):
        c = _columns(path, ["ra", "dec"])
        for pixel in np.unique(_nest_pixels(nside, c["ra"], c["dec"])).tolist():
            seen.setdefault(pixel, set()).add((visit, band))
    centre = unit_vectors(np.array([150.0]), np.array([2.0]))[0]
    inner = hp.query_disc(nside, centre, np.radians(radius - 2.0), nest=True)
    assert len(inner) > 5
    assert min(len(seen.get(int(p), ())) for p in inner) >= 3
    # every tile had every band once in the four passes
    tiles = np.arange(len(sim.visits)) % n_tiles
    for tile in range(n_tiles):
        assert sorted(np.array(sim.bands)[tiles == tile]) == ["g", "i", "r", "z"]


BORDER_NSIDE = 128


@pytest.mark.parametrize(("ra0", "dec0"), [(150.0, 2.0), (0.0, -5.0), (0.0, 89.0),
                                           (0.0, -89.0)])
def test_border_stars_lie_on_pixel_boundaries_and_are_observed(tmp_path: Path, ra0: float,
                                                               dec0: float) -> None:
    from streamstars.simulate import offset_xyz

    sim = simulate_survey(tmp_path, n_visits=8, seed=6, sources_per_visit=1500, ra_center=ra0,
                          dec_center=dec0, field_radius_deg=1.2, n_detectors=16,
                          border_nside=BORDER_NSIDE, write_refcat=False)
    n_border = sim.n_border_stars
    assert n_border > 20
    truth = _columns(sim.truth_path, ["ra", "dec", "is_star", "extendedness", "group"])
    ra, dec = truth["ra"][-n_border:], truth["dec"][-n_border:]
    assert truth["is_star"][-n_border:].all() and np.all(truth["group"][-n_border:] == -1)
    assert np.all(_separation_deg(ra, dec, ra0, dec0) <= 1.2 + 1e-9)
    # on a boundary: points nudged 1e-6 deg around each star fall in different pixels
    xyz = unit_vectors(ra, dec)
    around = []
    for angle in range(0, 360, 45):
        moved = offset_xyz(xyz, np.full(n_border, 1e-6), np.full(n_border, float(angle)))
        around.append(_nest_pixels(BORDER_NSIDE, *_radec(moved)))
    n_pixels_around = np.array([len(set(col)) for col in np.stack(around, axis=1).tolist()])
    assert np.all(n_pixels_around >= 2)
    assert np.sum(n_pixels_around >= 3) >= 4  # pixel corners
    assert len(_pairs_within(ra, dec, 1.0)) == 0  # each boundary point once
    if abs(dec0) > 88.0:  # the pole is a corner of four pixels
        assert np.any(np.abs(dec) > 90.0 - 1e-9)
    _check_border_observations(sim, xyz, ra0, dec0)


def _check_border_observations(sim: SimulatedSurvey, xyz: np.ndarray, ra0: float,
                               dec0: float) -> None:
    """The border stars near the field centre are observed in most visits, every observation
    is a clean S/N 10-1000 detection, and their positions scatter across the border."""
    names = ["ra", "dec", "apFlux_12_0_instFlux", "apFlux_12_0_instFluxErr", "extendedness",
             *BAD_FLAGS]
    obs = _all_sources(sim, names)
    dist, star = cKDTree(xyz).query(unit_vectors(obs["ra"], obs["dec"]))
    matched = np.degrees(dist) * 3600.0 < 0.5
    star = star[matched]
    counts = np.bincount(star, minlength=len(xyz))
    central = _separation_deg(*_radec(xyz), ra0, dec0) < 0.2
    assert central.sum() >= 3
    assert np.all(counts[central] >= 0.5 * len(sim.visits))
    assert not (obs["pixelFlags_saturatedCenter"][matched].any())
    clean = ~np.any(np.stack([obs[f][matched] for f in BAD_FLAGS]), axis=0)
    assert clean.mean() > 0.9  # only the random flags and the detector edges hit them
    snr = (obs["apFlux_12_0_instFlux"] / obs["apFlux_12_0_instFluxErr"])[matched][clean]
    assert np.all((snr > 10.0) & (snr < 1000.0))
    assert np.all(obs["extendedness"][matched][clean] == 0.0)
    pixels = _nest_pixels(BORDER_NSIDE, obs["ra"][matched], obs["dec"][matched])
    sides = np.array([len(np.unique(pixels[star == k])) for k in np.flatnonzero(counts >= 4)])
    assert np.mean(sides >= 2) > 0.5


def _radec(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from streamstars.sky import radec_from_vectors

    return radec_from_vectors(xyz)


def test_border_stars_of_a_wide_survey_and_bad_nsides(tmp_path: Path) -> None:
    from streamstars.simulate import border_star_positions

    sim = simulate_survey(tmp_path / "wide", n_visits=4, seed=3, sources_per_visit=300,
                          ra_center=359.0, dec_center=10.0, field_radius_deg=1.0,
                          survey_radius_deg=4.0, border_nside=16, write_refcat=False)
    truth = _columns(sim.truth_path, ["ra", "dec"])
    ra = truth["ra"][-sim.n_border_stars:]
    assert sim.n_border_stars > 10
    assert np.any(ra < 1.0) and np.any(ra > 357.0)  # across RA 0/360
    for bad in (0, 3, 48, 1 << 30):
        with pytest.raises(ValueError, match="power of two"):
            border_star_positions(bad, 10.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="smaller border_nside"):
        border_star_positions(1 << 14, 10.0, 0.0, 10.0)


@pytest.mark.parametrize("variant", ["narrow", "wide"])
def test_first_visit_writes_the_later_visits_of_the_same_survey(tmp_path: Path,
                                                                 variant: str) -> None:
    """Visits 3 and 4 written alone equal, byte for byte, those of the 5-visit survey: the
    same sky (truth, refcat) and distinct visit ids from visits 0-2."""
    args: dict[str, object] = {"seed": 9, "sources_per_visit": 800, "field_radius_deg": 0.6}
    if variant == "wide":
        args |= {"survey_radius_deg": 2.0, "border_nside": 32}
    whole = simulate_survey(tmp_path / "whole", n_visits=5, **args)  # type: ignore[arg-type]
    later = simulate_survey(tmp_path / "later", n_visits=2, first_visit=3,
                            **args)  # type: ignore[arg-type]
    assert later.visits == whole.visits[3:]
    assert not set(later.visits) & set(whole.visits[:3])
    for a, b in zip(whole.source_paths[3:], later.source_paths, strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    assert whole.truth_path.read_bytes() == later.truth_path.read_bytes()
    assert whole.refcat_path is not None and later.refcat_path is not None
    assert _files(whole.refcat_path) == _files(later.refcat_path)
    for name in ("visitTable.parquet", "ccdVisitTable.parquet"):
        table = pq.read_table(whole.out_dir / name)
        key = "visit" if name == "visitTable.parquet" else "visitId"
        rows = pc.is_in(table[key], value_set=pa.array(later.visits))
        assert table.filter(rows).equals(pq.read_table(later.out_dir / name))
    with pytest.raises(ValueError, match="first_visit"):
        simulate_survey(tmp_path / "bad", n_visits=1, first_visit=-1, seed=1)


def test_lsstcam_layout() -> None:
    from streamstars.simulate import make_camera

    cam = make_camera(None, 2.6, 0.3, "lsstcam")
    assert cam.n_detectors == len(cam.cells) == 189
    assert cam.detector_size_deg == pytest.approx(4000 * 0.2 / 3600)
    assert cam.fov_area_deg2 == pytest.approx(9.33, abs=0.01)
    assert cam.half_diagonal_deg == pytest.approx(1.98, abs=0.01)
    # detector centres map back to their own ids; the corner rafts hold none
    centers = cam.detector_centers()
    det, x, y = cam.to_pixels(centers[:, 0], centers[:, 1])
    assert det.tolist() == list(range(189))
    assert np.allclose(x, 1999.5) and np.allclose(y, 1999.5)
    pitch = cam.pitch_deg
    corner, _, _ = cam.to_pixels(np.array([-6.5 * pitch, 6.5 * pitch]),
                                 np.array([-6.5 * pitch, 5.0 * pitch]))
    assert corner.tolist() == [-1, -1]
    with pytest.raises(ValueError, match="at least 2.57"):
        make_camera(None, 1.75, 0.3, "lsstcam")
    with pytest.raises(ValueError, match="189 detectors"):
        make_camera(100, 3.0, 0.3, "lsstcam")
    with pytest.raises(ValueError, match="camera must be one of"):
        make_camera(9, 1.0, 0.3, "hexagonal")  # type: ignore[arg-type]


def test_lsstcam_visit(tmp_path: Path) -> None:
    sim = simulate_survey(tmp_path, n_visits=1, seed=5, sources_per_visit=4000,
                          camera="lsstcam", field_radius_deg=2.6, write_refcat=False)
    ccd = pq.read_table(sim.ccd_visit_table_path)
    assert ccd.num_rows == 189 and set(ccd["xSize"].to_pylist()) == {4000}
    c = _columns(sim.source_paths[0], ["detector", "ra", "dec"])
    assert len(np.unique(c["detector"])) > 170
    visit = pq.read_table(sim.visit_table_path)
    sep = _separation_deg(c["ra"], c["dec"], visit["ra"][0].as_py(), visit["dec"][0].as_py())
    assert 1.9 < sep.max() < 2.1  # the raft corners
    assert 0.8 * 4000 < sim.n_sources < 1.25 * 4000


def test_source_ids_of_visits_with_2_20_rows_or_more(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A visit with more rows than the 20-bit row field gets a wider one (checked here with
    the field shrunk to 10 bits so that a small visit needs the wider one)."""
    import streamstars.simulate as simulate

    assert simulate.source_id_shift((1 << 20) - 1) == 20
    assert simulate.source_id_shift(1 << 20) == simulate.LARGE_VISIT_SOURCE_ID_SHIFT == 22
    monkeypatch.setattr(simulate, "SOURCE_ID_SHIFT", 10)
    monkeypatch.setattr(simulate, "LARGE_VISIT_SOURCE_ID_SHIFT", 12)
    sim = simulate_survey(tmp_path, n_visits=2, seed=1, sources_per_visit=1500,
                          field_radius_deg=0.5, write_refcat=False)
    for path, visit in zip(sim.source_paths, sim.visits, strict=True):
        ids = _columns(path, ["sourceId"])["sourceId"]
        assert len(ids) >= 1 << 10
        assert np.all(ids >> 12 == visit) and len(np.unique(ids)) == len(ids)


def test_cli_wide_survey_options(tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "streamstars.cli", "simulate", *args],
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "cli"
    done = cli(str(out), "--visits", "2", "--seed", "3", "--sources-per-visit", "300",
               "--ra", "0", "--dec", "-60", "--field-radius", "0.8", "--n-detectors", "4",
               "--survey-radius", "3", "--border-nside", "32", "--first-visit", "5",
               "--no-refcat")
    assert done.returncode == 0, done.stderr
    api = simulate_survey(tmp_path / "api", n_visits=2, seed=3, sources_per_visit=300,
                          ra_center=0.0, dec_center=-60.0, field_radius_deg=0.8, n_detectors=4,
                          survey_radius_deg=3.0, border_nside=32, first_visit=5,
                          write_refcat=False)
    assert _files(out) == _files(api.out_dir)
    assert f"{api.n_tiles} tiles a pass" in done.stdout
    assert f"{api.n_border_stars} stars on the borders of the nside 32 pixels" in done.stdout
    for args, message in (
            (["--border-nside", "3"], "--border-nside must be a power of two"),
            (["--survey-radius", "0.5"], "--survey-radius must be within [--field-radius, 180]"),
            (["--first-visit", "-1"], "--first-visit must be at least 0"),
            (["--camera", "lsstcam"], "use at least 2.57")):
        done = cli(str(tmp_path / "bad"), "--visits", "1", *args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert message in done.stderr
