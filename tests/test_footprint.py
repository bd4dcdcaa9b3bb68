"""The footprint of a visit: the shards from its detector corners hold every shard route()
gives any of its rows (grid camera and LSSTCam, RA 0, near the poles), and not many more."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import healpy as hp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from streamstars.footprint import (
    DEFAULT_SLACK_ARCSEC,
    FootprintFinder,
    ShardSpec,
    boresight_shard,
    corner_footprint,
    observation_vectors,
    read_source_positions,
    source_footprint,
)
from streamstars.io.corners import (
    CCD_VISIT_CORNER_COLUMNS,
    read_ccd_visit_corners,
    read_visit_summary_corners,
)
from streamstars.io.discover import discover_repo
from streamstars.shards import route
from streamstars.simulate import SimulatedSurvey, simulate_survey
from streamstars.sky import ARCSEC_RAD, radec_from_vectors

#: The derived default shardMargin of fgcmcal's radii [arcsec].
MARGIN = 9.0

#: (camera, ra, dec, extra simulate arguments): a small field, RA 0, near both poles, and
#: LSSTCam's 189 detectors at RA 0 and near the south pole.
SURVEYS = {
    "grid": ("grid", 150.0, 2.0, {}),
    "grid-ra0": ("grid", 0.0, 0.3, {}),
    "grid-pole": ("grid", 10.0, 89.4, {}),
    "lsstcam-ra0": ("lsstcam", 0.0, -30.0, {"field_radius_deg": 2.6}),
    "lsstcam-pole": ("lsstcam", 45.0, -88.6, {"field_radius_deg": 2.6}),
}


@pytest.fixture(scope="module", params=sorted(SURVEYS))
def survey(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> SimulatedSurvey:
    camera, ra, dec, extra = SURVEYS[request.param]
    return simulate_survey(tmp_path_factory.mktemp(request.param), n_visits=2, seed=21,
                           sources_per_visit=20_000 if camera == "lsstcam" else 3000,
                           camera=camera, ra_center=ra, dec_center=dec, write_refcat=False,
                           **extra)


def _route_union(ra: np.ndarray, dec: np.ndarray, nside: int, margin: float) -> set[int]:
    return set(route(observation_vectors(ra, dec), nside, margin).shards.tolist())


@pytest.mark.parametrize("nside", [32, 256])
def test_corner_footprint_holds_every_routed_row(survey: SimulatedSurvey, nside: int) -> None:
    corners = read_ccd_visit_corners(survey.ccd_visit_table_path)
    assert sorted(corners) == survey.visits
    excess = []
    for visit, path in zip(survey.visits, survey.source_paths, strict=True):
        c = corners[visit]
        assert c.complete and c.ra.shape == (len(c.detectors), 4)
        found = corner_footprint(c.ra, c.dec, nside, MARGIN)
        assert found is not None
        ra, dec = read_source_positions([path])
        routed = _route_union(ra, dec, nside, MARGIN)
        assert routed <= set(found.tolist()), f"visit {visit}: missed {routed - set(found)}"
        assert set(source_footprint(ra, dec, nside, MARGIN).tolist()) == routed
        excess.append(len(found) - len(routed))
    # not much larger: the slack and HEALPix's conservative query add a shard here and there
    assert all(e <= 2 + 0.1 * len(found) for e in excess), excess


def _dense_detector_points(ra: np.ndarray, dec: np.ndarray, per_edge: int,
                           outside_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """Points on every detector's edges and corners (great-circle interpolation) pushed
    ``outside_arcsec`` away from the detector's centre: the worst rows the slack covers."""
    v = observation_vectors(ra.ravel(), dec.ravel()).reshape(-1, 4, 3)
    t = np.linspace(0.0, 1.0, per_edge)[None, None, :, None]
    a, b = v[:, :, None, :], np.roll(v, -1, axis=1)[:, :, None, :]
    edge = ((1 - t) * a + t * b).reshape(len(v), -1, 3)
    edge /= np.linalg.norm(edge, axis=2)[:, :, None]
    centre = v.sum(axis=1)
    centre /= np.linalg.norm(centre, axis=1)[:, None]
    away = edge - np.einsum("nkc,nc->nk", edge, centre)[:, :, None] * centre[:, None, :]
    away /= np.linalg.norm(away, axis=2)[:, :, None]
    step = outside_arcsec * ARCSEC_RAD
    moved = (np.cos(step) * edge + np.sin(step) * away).reshape(-1, 3)
    return radec_from_vectors(moved)


@pytest.mark.parametrize("nside", [32, 1024])
def test_corner_footprint_holds_rows_on_and_just_outside_the_detector_edges(
        survey: SimulatedSurvey, nside: int) -> None:
    """Dense points along every edge and at every corner, on the edge and the slack (less a
    hair) outside it: route() of every one lies in the footprint."""
    c = read_ccd_visit_corners(survey.ccd_visit_table_path)[survey.visits[0]]
    found = set(corner_footprint(c.ra, c.dec, nside, MARGIN).tolist())
    for outside in (0.0, DEFAULT_SLACK_ARCSEC - 0.01):
        ra, dec = _dense_detector_points(c.ra, c.dec, 40, outside)
        missed = _route_union(ra, dec, nside, MARGIN) - found
        assert not missed, f"{outside}\" outside the edges: missed shards {sorted(missed)}"


def test_a_smaller_slack_misses_rows_outside_it() -> None:
    """The slack is what covers rows outside the corners' quadrilateral: with none, a row
    50" beyond a detector's corner, across a shard corner, is missed."""
    nside, shard = 1024, 123456  # 206" shards: HEALPix's query adds up to 1/64 of one, 3"
    centre = hp.pix2vec(nside, shard, nest=True)
    corner = np.asarray(hp.boundaries(nside, shard, nest=True))[:, 0]  # a corner of the shard
    # a 40" square detector whose corner sits 30" inside the shard, pointing at its corner
    # (where four shards meet)
    towards = corner - np.dot(corner, centre) * np.asarray(centre)
    towards /= np.linalg.norm(towards)
    side = np.cross(corner, towards)
    half = 20 * math.sqrt(2) * ARCSEC_RAD
    middle = corner - (30 * ARCSEC_RAD + half) * towards
    quad = np.stack([middle + half * towards, middle + half * side, middle - half * towards,
                     middle - half * side])
    ra, dec = radec_from_vectors(quad / np.linalg.norm(quad, axis=1)[:, None])
    # a row 20" beyond the shard corner: 50" from the detector, in another shard
    row = math.cos(20 * ARCSEC_RAD) * corner + math.sin(20 * ARCSEC_RAD) * towards
    row_ra, row_dec = radec_from_vectors(row[None] / np.linalg.norm(row))
    routed = _route_union(row_ra, row_dec, nside, MARGIN)
    assert shard not in routed
    assert routed <= set(corner_footprint(ra[None], dec[None], nside, MARGIN).tolist())
    assert not routed <= set(corner_footprint(ra[None], dec[None], nside, MARGIN,
                                              slack_arcsec=0.0).tolist())


def test_corners_that_cannot_bound_the_detectors() -> None:
    ra = np.array([[10.0, 10.1, 10.1, 10.0]])
    dec = np.array([[0.0, 0.0, 0.1, 0.1]])
    assert corner_footprint(ra, dec, 32, MARGIN) is not None
    assert corner_footprint(np.where([[True, False, False, False]], np.nan, ra), dec, 32,
                            MARGIN) is None
    assert corner_footprint(np.array([[10.0, 30.0, 30.0, 10.0]]), dec, 32, MARGIN) is None
    assert corner_footprint(ra[:0], dec[:0], 32, MARGIN) is None
    assert corner_footprint(ra[:, :3], dec[:, :3], 32, MARGIN) is None
    # corners in any order, a bow-tie order too, and corners that coincide still bound it
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [0, 2, 1, 3]):
        assert corner_footprint(ra[:, order], dec[:, order], 1024, MARGIN).tolist() == \
            corner_footprint(ra, dec, 1024, MARGIN).tolist()
    point = corner_footprint(np.full((1, 4), 10.05), np.full((1, 4), 0.05), 1024, MARGIN)
    assert hp.ang2pix(1024, 10.05, 0.05, nest=True, lonlat=True) in point.tolist()


def test_source_footprint_skips_rows_without_a_position() -> None:
    ra = np.array([10.0, np.nan, 10.0])
    dec = np.array([0.0, 0.0, np.inf])
    assert source_footprint(ra, dec, 32, MARGIN).tolist() == \
        [hp.ang2pix(32, 10.0, 0.0, nest=True, lonlat=True)]
    assert source_footprint(ra[1:2], dec[1:2], 32, MARGIN).tolist() == []


def test_shard_spec_refuses_bad_settings() -> None:
    from streamstars.config import BuildStarsConfig
    from streamstars.errors import ConfigError

    assert ShardSpec.of_config(BuildStarsConfig()) == ShardSpec(32, MARGIN)
    for nside, margin in ((0, 9.0), (48, 9.0), (1 << 30, 9.0), (32, 0.0), (32, math.nan)):
        with pytest.raises(ConfigError, match="shardNside|shardMargin"):
            ShardSpec(nside, margin)


# ------------------------------------------------------------------------- the readers
def test_ccd_visit_table_corners(survey: SimulatedSurvey, tmp_path: Path) -> None:
    corners = read_ccd_visit_corners(survey.ccd_visit_table_path)
    ccd = pq.read_table(survey.ccd_visit_table_path).to_pydict()
    c = corners[survey.visits[1]]
    rows = [i for i, v in enumerate(ccd["visitId"]) if v == survey.visits[1]]
    assert c.detectors.tolist() == sorted(ccd["detector"][i] for i in rows)
    first = rows[int(np.argmin([ccd["detector"][i] for i in rows]))]
    assert c.ra[0].tolist() == [ccd[r][first] for r, _ in CCD_VISIT_CORNER_COLUMNS]
    assert c.source == str(survey.ccd_visit_table_path)
    # an older table without corner columns has none; a null corner is NaN (incomplete)
    table = pq.read_table(survey.ccd_visit_table_path)
    pq.write_table(table.drop_columns(["urcra"]), tmp_path / "old.parquet")
    assert read_ccd_visit_corners(tmp_path / "old.parquet") == {}
    nulls = table.set_column(table.schema.get_field_index("llcra"), "llcra",
                             pa.array([None] * table.num_rows, type=pa.float64()))
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    assert not read_ccd_visit_corners(tmp_path / "nulls.parquet")[survey.visits[0]].complete


def _hsc_summary(shared_data: Path, visit: int) -> Path:
    return shared_data / "drp_tasks_visitSummary" / f"visitSummary_{visit}.fits"


@pytest.mark.parametrize("visit", [1176, 36434])
def test_real_hsc_visit_summary_corners(shared_data: Path, visit: int) -> None:
    """103 real HSC detectors: the corner footprint holds every detector centre's routed
    shards (the ``ra``/``decl`` columns), and the centres lie inside their quadrilaterals."""
    path = _hsc_summary(shared_data, visit)
    corners = read_visit_summary_corners(path)
    assert corners.visit == visit and len(corners.detectors) == 103 and corners.complete
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path) as hdul:
            centre_ra = np.asarray(hdul[1].data["ra"], dtype=np.float64)
            centre_dec = np.asarray(hdul[1].data["decl"], dtype=np.float64)
    for nside in (32, 1024):
        found = set(corner_footprint(corners.ra, corners.dec, nside, MARGIN).tolist())
        assert _route_union(centre_ra, centre_dec, nside, MARGIN) <= found
    # each detector's grown quadrilateral at 0 margin and slack holds its own centre only
    for i in (0, 50, 102):
        own = corner_footprint(corners.ra[i:i + 1], corners.dec[i:i + 1], 1 << 16, 0.01, 0.0)
        pixel = hp.ang2pix(1 << 16, centre_ra[i], centre_dec[i], nest=True, lonlat=True)
        assert pixel in own.tolist()


def test_real_cfht_visit_from_its_visit_summary(shared_data: Path, tmp_path: Path) -> None:
    """The real CFHT visit (one detector, two sources): discovered with its visitSummary, its
    footprint comes from the corners and holds its sources' shards, at any nside."""
    data = shared_data / "jointcal_cfht_minimal"
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("visitSummary-849375.fits", "sourceTable-849375.parq"):
        (repo / name).symlink_to(data / name)
    entry = discover_repo(repo).visits[849375]
    ra, dec = read_source_positions(entry.source_paths)
    assert len(ra) == 2
    for nside in (32, 4096, 1 << 16):
        footprint = FootprintFinder(ShardSpec(nside, MARGIN)).of_entry(entry)
        assert footprint.method == "corners"
        assert footprint.source == str(repo / "visitSummary-849375.fits")
        assert _route_union(ra, dec, nside, MARGIN) <= set(footprint.shards)
        assert boresight_shard(entry.metadata.telra, entry.metadata.teldec, nside) in \
            footprint.shards


# ------------------------------------------------------------------------- the finder
def test_finder_uses_corners_then_sources(survey: SimulatedSurvey, tmp_path: Path) -> None:
    spec = ShardSpec(256, MARGIN)
    inventory = discover_repo(survey.out_dir)
    entry = inventory.visits[survey.visits[0]]
    assert entry.ccd_visit_table_path == survey.ccd_visit_table_path
    ra, dec = read_source_positions(entry.source_paths)
    routed = _route_union(ra, dec, spec.nside, spec.margin_arcsec)
    home = boresight_shard(entry.metadata.telra, entry.metadata.teldec, spec.nside)

    by_corners = FootprintFinder(spec).of_entry(entry)
    assert by_corners.method == "corners" and by_corners.note == ""
    assert routed | {home} <= set(by_corners.shards)
    assert list(by_corners.shards) == sorted(set(by_corners.shards))

    # a ccdVisitTable without corner columns: the sources' coordinates
    old = tmp_path / "old"
    old.mkdir()
    table = pq.read_table(survey.ccd_visit_table_path)
    pq.write_table(table.drop_columns(["llcdec"]), old / "ccdVisitTable.parquet")
    (old / "visitTable.parquet").symlink_to(survey.visit_table_path)
    (old / entry.source_paths[0].name).symlink_to(entry.source_paths[0])
    old_entry = discover_repo(old).visits[entry.visit]
    by_sources = FootprintFinder(spec).of_entry(old_entry)
    assert by_sources.method == "sources" and "no detector corners" in by_sources.note
    assert set(by_sources.shards) == routed | {home}
    assert set(by_sources.shards) <= set(by_corners.shards)

    # a detector without a WCS (NaN corners): the sources' coordinates too
    column = table.schema.get_field_index("ulcra")
    ulcra = table.column("ulcra").to_numpy().copy()
    ulcra[3] = np.nan
    pq.write_table(table.set_column(column, "ulcra", pa.array(ulcra)),
                   old / "ccdVisitTable.parquet")
    nan_entry = discover_repo(old).visits[entry.visit]
    nan_footprint = FootprintFinder(spec).of_entry(nan_entry)
    assert nan_footprint.method == "sources" and "incomplete" in nan_footprint.note


def test_source_positions_read_old_names_and_refuse_files_without_them(tmp_path: Path
                                                                       ) -> None:
    pq.write_table(pa.table({"ra": [1.0, None], "decl": [2.0, 3.0], "x": [0.0, 0.0]}),
                   tmp_path / "old.parquet")
    ra, dec = read_source_positions([tmp_path / "old.parquet", tmp_path / "old.parquet"])
    assert np.array_equal(ra, [1.0, np.nan, 1.0, np.nan], equal_nan=True)
    assert dec.tolist() == [2.0, 3.0, 2.0, 3.0]
    pq.write_table(pa.table({"x": [0.0]}), tmp_path / "none.parquet")
    from streamstars.errors import InputFileError

    with pytest.raises(InputFileError, match="none.parquet: source table has no 'ra'/'dec'"):
        read_source_positions([tmp_path / "none.parquet"])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputFileError, match="bad.parquet: cannot read the source positions"):
        read_source_positions([tmp_path / "bad.parquet"])
