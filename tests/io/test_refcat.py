"""Tests of the HTM-indexed reference catalog reader on real (and synthetic) LSST refcats."""

from __future__ import annotations

import shutil
from pathlib import Path

import healpy as hp
import numpy as np
import pytest
from astropy.io import fits
from lsst import sphgeom

from streamstars.config import ReferenceSelectorConfig, ReferenceSignalToNoiseConfig
from streamstars.errors import RefcatError
from streamstars.io.refcat import (
    HtmRefcat,
    ab_mag_err_from_flux_err,
    ab_mag_from_flux,
    parse_refcat_config,
)

SDSS = "sdss_refcat_pipe_tasks/cal_ref_cat"
CFHT = "jointcal_cfht_minimal/ref_cats/sdss-dr9-fink-v5b"
V0 = "meas_algorithms_synthetic_refcat/version0/cal_ref_cat"
V1 = "meas_algorithms_synthetic_refcat/version1/cal_ref_cat"
SDSS_COLUMNS = ["id", "coord_ra", "coord_dec", "flags", "r_flux", "r_fluxErr"]


@pytest.fixture(scope="module")
def sdss(shared_data: Path) -> HtmRefcat:
    return HtmRefcat(shared_data / SDSS)


@pytest.fixture(scope="module")
def sdss_all(sdss: HtmRefcat) -> dict[str, np.ndarray]:
    return sdss.load(sdss.existing_shards(), SDSS_COLUMNS)


def _sep_deg(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    v = np.array(hp.ang2vec(ra, dec, lonlat=True)).reshape(-1, 3)
    v0 = hp.ang2vec(ra0, dec0, lonlat=True)
    return np.degrees(np.arccos(np.clip(v @ v0, -1.0, 1.0)))


# --- metadata ------------------------------------------------------------------------------
def test_sdss_metadata(sdss: HtmRefcat) -> None:
    assert sdss.depth == 8
    assert sdss.format_version == 1
    assert sdss.dataset_name == "cal_ref_cat"
    assert sdss.flag_names == ("photometric", "resolved")
    for f in "ugriz":
        assert f"{f}_flux" in sdss.columns and f"{f}_fluxErr" in sdss.columns
    assert len(sdss.existing_shards()) == 13
    sdss.validate(list("ugriz"))


def test_cfht_header_version_wins(shared_data: Path) -> None:
    cat = HtmRefcat(shared_data / CFHT)
    assert cat.config_format_version == 1
    assert cat.header_format_version == 2
    assert cat.format_version == 2
    assert cat.depth == 7
    assert cat.dataset_name == "sdss"
    data = cat.load(cat.existing_shards(), ["id", "coord_ra", "coord_dec"])
    assert data["id"].size == 2628
    assert len(np.unique(data["id"])) == 2628
    ra, dec = np.degrees(data["coord_ra"]), np.degrees(data["coord_dec"])
    assert 213.9 < ra.min() and ra.max() < 215.5
    assert 52.4 < dec.min() and dec.max() < 53.4
    cat.validate(list("ugriz"))


def test_version0_refused(shared_data: Path) -> None:
    with pytest.raises(RefcatError, match=r"format version 0.*Jy.*nJy"):
        HtmRefcat(shared_data / V0)


def test_version1_accepted(shared_data: Path) -> None:
    cat = HtmRefcat(shared_data / V1)
    assert cat.format_version == 1
    assert cat.depth == 4
    assert cat.flag_names == ()
    cat.validate(["a", "b"])
    data = cat.load(cat.existing_shards(), ["id", "a_flux", "b_fluxErr"])
    assert data["id"].size == 100
    assert data["a_flux"].dtype == np.float64 and data["a_flux"].dtype.isnative
    # The Jy fluxes of version 0 are 1e9 times smaller.
    v0 = fits.getdata(shared_data / V0 / "4022.fits", 1)
    np.testing.assert_allclose(data["a_flux"], v0["a_flux"] * 1e9, rtol=1e-4)


def test_parse_config_defaults() -> None:
    assert parse_refcat_config("config.ref_dataset_name='x'\n") == {
        "format_version": None,
        "ref_dataset_name": "x",
        "depth": None,
        "indexer_name": None,
    }
    cfg = parse_refcat_config(
        "import os\nconfig.format_version=2\nconfig.indexer['HTM'].depth=9\n"
        "config.indexer.name='HTM'\nos.system('false')\n"
    )
    assert cfg["format_version"] == 2 and cfg["depth"] == 9 and cfg["indexer_name"] == "HTM"
    with pytest.raises(RefcatError, match="depth"):
        parse_refcat_config("config.indexer['HTM'].depth='seven'\n")


def test_default_depth_is_7(tmp_path: Path, shared_data: Path) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(shared_data / V1, ref)
    text = (ref / "config.py").read_text().replace("config.indexer['HTM'].depth=4\n", "")
    (ref / "config.py").write_text(text)
    assert HtmRefcat(ref).depth == 7


# --- geometry and loading ------------------------------------------------------------------
def test_sdss_everything_in_covering_circle(sdss: HtmRefcat, sdss_all: dict) -> None:
    assert sdss_all["id"].size == 15083
    # Circle circumscribing RA 215.10-216.10, Dec 52.60-53.60.
    data = sdss.load_circle(215.6, 53.1, 0.75, ["r_flux"])
    assert data["id"].size == 15083
    assert np.array_equal(np.sort(data["id"]), np.sort(sdss_all["id"]))
    assert 215.10 <= data["ra"].min() and data["ra"].max() <= 216.10
    assert 52.60 <= data["dec"].min() and data["dec"].max() <= 53.60
    shards = sdss.shards_for_circle(215.6, 53.1, 0.75)
    assert set(sdss.existing_shards()) <= set(shards)


def test_shard_name_is_htm_id(sdss: HtmRefcat) -> None:
    pix = sphgeom.HtmPixelization(8)
    for sid in sdss.existing_shards():
        d = sdss.load([sid], ["coord_ra", "coord_dec"])
        for ra, dec in zip(d["coord_ra"][:20], d["coord_dec"][:20], strict=True):
            assert pix.index(sphgeom.UnitVector3d(sphgeom.LonLat.fromRadians(ra, dec))) == sid


@pytest.mark.parametrize(("ra0", "dec0", "radius"), [(215.5, 53.0, 0.1), (215.93, 52.71, 0.2)])
def test_small_circle_matches_brute_force(
    sdss: HtmRefcat, sdss_all: dict, ra0: float, dec0: float, radius: float
) -> None:
    ra, dec = np.degrees(sdss_all["coord_ra"]), np.degrees(sdss_all["coord_dec"])
    expected = np.sort(sdss_all["id"][_sep_deg(ra, dec, ra0, dec0) <= radius])
    assert expected.size > 100
    got = sdss.load_circle(ra0, dec0, radius, ["r_flux", "photometric"])
    assert np.array_equal(np.sort(got["id"]), expected)
    assert got["photometric"].dtype == bool and got["photometric"].shape == got["id"].shape
    # Fewer shards than the whole catalog, and every needed shard among them.
    shards = sdss.shards_for_circle(ra0, dec0, radius)
    needed = {
        sdss.pixelization.index(sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(r, d)))
        for r, d in zip(got["ra"], got["dec"], strict=True)
    }
    assert needed <= set(shards)


def test_flags_decoded_per_bit(sdss: HtmRefcat, sdss_all: dict) -> None:
    d = sdss.load(sdss.existing_shards(), ["photometric", "resolved", "flags"])
    assert d["flags"].shape == (15083, 2)
    assert np.array_equal(d["photometric"], d["flags"][:, 0])
    assert np.array_equal(d["resolved"], d["flags"][:, 1])
    assert 0 < d["photometric"].sum() < 15083


def test_polygon_and_healpix(sdss: HtmRefcat, sdss_all: dict) -> None:
    shards = sdss.shards_for_polygon([215.1, 216.1, 216.1, 215.1], [52.6, 52.6, 53.6, 53.6])
    assert set(sdss.existing_shards()) <= set(shards)
    ra, dec = np.degrees(sdss_all["coord_ra"]), np.degrees(sdss_all["coord_dec"])
    nside = 64
    pix = hp.ang2pix(nside, 215.6, 53.1, nest=True, lonlat=True)
    own = hp.ang2pix(nside, ra, dec, nest=True, lonlat=True)
    got = sdss.load_healpix([pix], nside, 0.0, ["r_flux"])
    assert np.array_equal(np.sort(got["id"]), np.sort(sdss_all["id"][own == pix]))
    # With a margin: everything within 60" of the pixel edge is added (~3 % tolerance).
    vec = np.array(hp.ang2vec(ra, dec, lonlat=True))
    edge = np.asarray(hp.boundaries(nside, pix, step=600, nest=True)).T
    dist = np.degrees(np.arccos(np.clip(vec @ edge.T, -1, 1))).min(axis=1) * 3600
    got = sdss.load_healpix([pix], nside, 60.0, ["r_flux"])
    ids = set(got["id"].tolist())
    must = set(sdss_all["id"][(own == pix) | (dist <= 60.0)].tolist())
    may = set(sdss_all["id"][(own == pix) | (dist <= 62.0)].tolist())
    assert must <= ids <= may
    assert len(must) > got["id"].size - 20
    assert set(sdss.shards_for_healpix([pix], nside, 60.0)) >= set(
        sdss.shards_for_circle(*hp.pix2ang(nside, pix, nest=True, lonlat=True), 0.3)
    )


def test_missing_trixel_files_are_empty(sdss: HtmRefcat) -> None:
    # A circle far away: envelope trixels exist in HTM but have no files.
    shards = sdss.shards_for_circle(10.0, -30.0, 0.5)
    assert shards and not set(shards) & set(sdss.existing_shards())
    data = sdss.load(shards, SDSS_COLUMNS)
    assert all(v.shape[0] == 0 for v in data.values())
    assert data["flags"].shape == (0, 2)
    assert sdss.load_circle(10.0, -30.0, 0.5, ["r_flux"])["ra"].size == 0


def test_lru_cache_is_bounded(shared_data: Path, sdss_all: dict) -> None:
    cat = HtmRefcat(shared_data / SDSS, cache_shards=3)
    shards = cat.existing_shards()
    first = cat.load(shards, ["id"])
    assert len(cat._cache) == 3
    again = cat.load(shards, SDSS_COLUMNS)  # adds columns to cached shards
    assert len(cat._cache) == 3
    assert np.array_equal(first["id"], again["id"])
    for key in SDSS_COLUMNS:
        assert np.array_equal(again[key], sdss_all[key])
    nocache = HtmRefcat(shared_data / SDSS, cache_shards=0)
    assert np.array_equal(nocache.load(shards, ["id"])["id"], first["id"])
    assert len(nocache._cache) == 0


def test_ab_magnitudes() -> None:
    flux = np.array([3631e9, 1.0, 0.0, -5.0, np.nan])
    mag = ab_mag_from_flux(flux)
    np.testing.assert_allclose(mag[:2], [0.0, 31.4], atol=2e-3)
    assert np.isnan(mag[2:]).all()
    err = ab_mag_err_from_flux_err(np.array([1.0, 1.0]), np.array([100.0, 0.0]))
    np.testing.assert_allclose(err[0], 2.5 / np.log(10) / 100)
    assert np.isnan(err[1])


# --- bad input -----------------------------------------------------------------------------
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RefcatError, match="does not exist"):
        HtmRefcat(tmp_path / "nope")


@pytest.mark.parametrize("name", ["config.py", "master_schema.fits"])
def test_missing_config_or_schema(tmp_path: Path, shared_data: Path, name: str) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(shared_data / V1, ref)
    (ref / name).unlink()
    with pytest.raises(RefcatError, match=name.replace(".", r"\.")):
        HtmRefcat(ref)


def test_validate_missing_flux_column(shared_data: Path) -> None:
    cat = HtmRefcat(shared_data / V1)
    with pytest.raises(RefcatError, match="c_flux"):
        cat.validate(["a", "c"])
    sel = ReferenceSelectorConfig(
        doSignalToNoise=True,
        signalToNoise=ReferenceSignalToNoiseConfig(fluxField="i_flux", errField="i_fluxErr"),
    )
    with pytest.raises(RefcatError, match="i_flux"):
        cat.validate(["a"], sel)
    with pytest.raises(RefcatError, match="z_flux"):
        cat.load(cat.existing_shards(), ["z_flux"])


def test_validate_directory_removed_after_open(tmp_path: Path, shared_data: Path) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(shared_data / V1, ref)
    cat = HtmRefcat(ref)
    shutil.rmtree(ref)
    with pytest.raises(RefcatError, match="does not exist"):
        cat.validate(["a"])


def _write_bad_shard(path: Path) -> None:
    cols = [
        fits.Column(name="id", format="K", array=np.array([1, 2])),
        fits.Column(name="coord_ra", format="D", array=np.array([0.18, 0.19])),
        fits.Column(name="coord_dec", format="D", array=np.array([0.36, 0.36])),
        fits.Column(name="a_fluxSigma", format="D", array=np.array([1.0, 2.0])),
    ]
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.header["HIERARCH REFCAT_FORMAT_VERSION"] = 1
    hdu.writeto(path, overwrite=True)


def test_shard_with_wrong_columns(tmp_path: Path, shared_data: Path) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(shared_data / V1, ref)
    _write_bad_shard(ref / "4022.fits")
    cat = HtmRefcat(ref)
    with pytest.raises(RefcatError, match=r"4022\.fits.*a_flux"):
        cat.validate(["a"])
    with pytest.raises(RefcatError, match=r"4022\.fits.*'a_flux'"):
        cat.load([4022], ["id", "a_flux"])


def test_shard_with_version0_header(tmp_path: Path, shared_data: Path) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(shared_data / V1, ref)
    with fits.open(ref / "4022.fits", mode="update") as hdul:
        hdul[1].header["REFCAT_FORMAT_VERSION"] = 0
    # master_schema says 1 (wins at open) but the shard itself is refused when read.
    cat = HtmRefcat(ref)
    with pytest.raises(RefcatError, match="format version 0"):
        cat.load([4022], ["id"])


def test_not_a_fits_shard(tmp_path: Path, shared_data: Path) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(shared_data / V1, ref)
    (ref / "4022.fits").write_bytes(b"not a fits file")
    cat = HtmRefcat(ref)
    with pytest.raises(RefcatError, match="4022"):
        cat.load([4022], ["id"])
