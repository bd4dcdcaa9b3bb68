"""Tests of the visit metadata readers (visitSummary FITS, visitTable parquet, explicit values)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from streamstars.errors import InputFileError, PermanentInputError
from streamstars.io.visitmeta import (
    FWHM_PER_SIGMA,
    RUBIN_LONGITUDE_DEG,
    hour_angle_deg,
    metadata_from_values,
    pixel_scale_from_corners,
    read_visit_summary,
    read_visit_tables,
)
from streamstars.visit import BAD_DETECTOR_VALUE, VisitMetadata

HSC_VISITS = (1176, 17900, 17930, 17934, 36434, 36446, 36460, 36494)
CFHT_VISITS = (849375, 850587)


def _hsc_path(shared_data: Path, visit: int) -> Path:
    return shared_data / "drp_tasks_visitSummary" / f"visitSummary_{visit}.fits"


def _cfht_path(shared_data: Path, visit: int) -> Path:
    return shared_data / "jointcal_cfht_minimal" / f"visitSummary-{visit}.fits"


def _detector_table(path: Path) -> fits.FITS_rec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            return hdul[1].data.copy()


def _site_longitude_deg(path: Path) -> float:
    with fits.open(path, memmap=False) as hdul:
        return math.degrees(float(hdul["VisitInfo"].data["longitude"][0]))


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


# ---------------------------------------------------------------------------------------------
# Real HSC visitSummary files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("visit", HSC_VISITS)
def test_hsc_visit_summary_plausible(shared_data: Path, visit: int) -> None:
    path = _hsc_path(shared_data, visit)
    meta = read_visit_summary(path)
    cat = _detector_table(path)
    assert meta.visit == visit
    assert meta.physical_filter == "HSC-Z"
    assert meta.band == "z"
    assert meta.instrument == "HSC"
    assert meta.source == str(path)
    assert len(meta.detectors) == 103
    assert meta.detectors == tuple(int(d) for d in cat["id"])
    assert len(meta.psf_fwhm_detector) == 103
    assert meta.exptime in (200.0, 270.0, 300.0)
    assert 56650.0 < meta.mjd < 57400.0  # 2014-2016
    # Boresight close to the centre of the detectors (HSC boresight is near the centre).
    mean_ra = math.degrees(
        math.atan2(
            np.mean(np.sin(np.radians(cat["ra"]))), np.mean(np.cos(np.radians(cat["ra"])))
        )
    )
    assert _angle_diff(meta.telra, mean_ra) < 0.05
    assert abs(meta.teldec - float(np.mean(cat["decl"]))) < 0.05
    assert 600.0 < meta.pmb < 650.0  # Mauna Kea
    assert 0.4 < meta.psf_fwhm < 1.5
    assert meta.psf_sigma == pytest.approx(float(np.median(cat["psfSigma"][cat["psfSigma"] > 0])))
    assert meta.sky_background == pytest.approx(float(np.median(cat["skyBg"][cat["skyBg"] > 0])))
    assert meta.telrot == pytest.approx(270.0)
    assert -180.0 <= meta.telha < 180.0
    good = np.array(meta.psf_fwhm_detector) != BAD_DETECTOR_VALUE
    assert good.all()
    assert meta.psf_fwhm == pytest.approx(float(np.median(np.array(meta.psf_fwhm_detector))))
    # Round trip through the dataclass JSON.
    assert VisitMetadata.from_json(meta.to_json()) == meta


def test_hsc_known_values(shared_data: Path) -> None:
    meta = read_visit_summary(_hsc_path(shared_data, 1176))
    assert meta.mjd == pytest.approx(56744.284150723, abs=1e-8)  # tai / 86400e9 + 40587
    assert meta.exptime == 270.0
    assert meta.pmb == pytest.approx(621.2)
    assert meta.telra == pytest.approx(150.1270875)
    assert meta.teldec == pytest.approx(2.2099805556)
    assert meta.telha == pytest.approx(-18.0248, abs=1e-3)


@pytest.mark.parametrize("visit", HSC_VISITS)
def test_hsc_hour_angle_matches_stored_era(shared_data: Path, visit: int) -> None:
    """erfa's ERA (UT1 = UTC) agrees with the ERA afw stored, so both telha paths agree."""
    path = _hsc_path(shared_data, visit)
    meta = read_visit_summary(path)
    computed = float(hour_angle_deg(meta.telra, meta.mjd, _site_longitude_deg(path)))
    assert _angle_diff(computed, meta.telha) < 0.01


def test_hsc_pixel_scale_from_corners(shared_data: Path) -> None:
    cat = _detector_table(_hsc_path(shared_data, 1176))
    nx = cat["bbox_max_x"] - cat["bbox_min_x"] + 1
    ny = cat["bbox_max_y"] - cat["bbox_min_y"] + 1
    scale = pixel_scale_from_corners(cat["raCorners"], cat["decCorners"], nx, ny)
    assert scale.shape == (103,)
    # HSC: 0.168"/pix on axis, smaller towards the edge of the field.
    assert np.all((scale > 0.15) & (scale < 0.17))
    assert float(np.max(scale)) == pytest.approx(0.168, abs=0.002)


def test_hsc_reference_ccd_choice(shared_data: Path) -> None:
    path = _hsc_path(shared_data, 17900)
    default = read_visit_summary(path)
    other = read_visit_summary(path, reference_ccd=0)
    missing = read_visit_summary(path, reference_ccd=999)  # falls back to the first row
    assert default.physical_filter == other.physical_filter == missing.physical_filter
    assert default.telra == other.telra == missing.telra


# ---------------------------------------------------------------------------------------------
# Real CFHT visitSummary files (1 detector)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("visit", CFHT_VISITS)
def test_cfht_visit_summary(shared_data: Path, visit: int) -> None:
    path = _cfht_path(shared_data, visit)
    meta = read_visit_summary(path)  # referenceCCD 40 absent: first row used
    assert meta.visit == visit
    assert meta.physical_filter == "r.MP9601"
    assert meta.band == "r"
    assert meta.instrument == "MegaPrime"
    assert meta.detectors == (12,)
    assert len(meta.psf_fwhm_detector) == 1
    assert meta.psf_fwhm == pytest.approx(meta.psf_fwhm_detector[0])
    assert 0.4 < meta.psf_fwhm < 1.5
    assert meta.exptime == pytest.approx(300.2, abs=0.05)
    assert 53870.0 < meta.mjd < 53890.0  # May-June 2006
    assert 600.0 < meta.pmb < 650.0
    assert meta.telra == pytest.approx(214.86, abs=0.02)
    assert meta.teldec == pytest.approx(52.66, abs=0.02)
    assert meta.sky_background > 0
    # MegaCam: 0.187"/pix.
    cat = _detector_table(path)
    assert meta.psf_fwhm / (float(cat["psfSigma"][0]) * FWHM_PER_SIGMA) == pytest.approx(
        0.187, abs=0.002
    )
    assert read_visit_summary(path, reference_ccd=12) == meta


def test_cfht_nan_era_falls_back_to_erfa(shared_data: Path, tmp_path: Path) -> None:
    src = _cfht_path(shared_data, 849375)
    reference = read_visit_summary(src)
    out = tmp_path / "visitSummary-849375.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(src) as hdul:
            hdul["VisitInfo"].data["era"][:] = np.nan
            hdul.writeto(out)
    meta = read_visit_summary(out)
    assert _angle_diff(meta.telha, reference.telha) < 0.01
    assert meta.mjd == reference.mjd


# ---------------------------------------------------------------------------------------------
# Invalid files
# ---------------------------------------------------------------------------------------------


def test_not_fits(tmp_path: Path) -> None:
    path = tmp_path / "visitSummary_1.fits"
    path.write_text("this is not FITS\n")
    with pytest.raises(InputFileError, match="visitSummary_1.fits"):
        read_visit_summary(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="not found"):
        read_visit_summary(tmp_path / "nope.fits")


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_truncated_fits(shared_data: Path, tmp_path: Path, fraction: float) -> None:
    raw = _hsc_path(shared_data, 1176).read_bytes()
    path = tmp_path / "visitSummary_1176.fits"
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(InputFileError, match=str(path)):
        read_visit_summary(path)


def test_missing_column(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "visitSummary.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(_cfht_path(shared_data, 849375)) as hdul:
            cols = [c for c in hdul[1].columns if c.name != "psfSigma"]
            hdul[1] = fits.BinTableHDU.from_columns(cols)
            hdul.writeto(out)
    with pytest.raises(InputFileError, match="psfSigma"):
        read_visit_summary(out)


def test_missing_visitinfo_hdu(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "visitSummary.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(_cfht_path(shared_data, 849375)) as hdul:
            del hdul["VisitInfo"]
            hdul.writeto(out)
    with pytest.raises(InputFileError, match=r"visit 849375.*VisitInfo"):
        read_visit_summary(out)


# ---------------------------------------------------------------------------------------------
# Hour angle
# ---------------------------------------------------------------------------------------------


def _simple_era_deg(jd_ut1: float) -> float:
    """IAU 2000 Earth rotation angle [deg], by hand."""
    return 360.0 * ((0.7790572732640 + 1.00273781191135448 * (jd_ut1 - 2451545.0)) % 1.0)


def _simple_gmst_deg(jd_ut1: float) -> float:
    """Mean sidereal time at Greenwich (IAU 1982 / Meeus 12.4) [deg]."""
    t = (jd_ut1 - 2451545.0) / 36525.0
    return (
        280.46061837 + 360.98564736629 * (jd_ut1 - 2451545.0) + 0.000387933 * t * t
    ) % 360.0


def test_hour_angle_by_hand() -> None:
    mjd_tai = 57038.53183537  # 2015-01-16, TAI - UTC = 35 s
    ra, lon = 150.11876667, -155.4761
    jd_utc = mjd_tai + 2400000.5 - 35.0 / 86400.0
    ha = float(hour_angle_deg(ra, mjd_tai, lon))
    expected_era = (_simple_era_deg(jd_utc) + lon - ra + 180.0) % 360.0 - 180.0
    assert _angle_diff(ha, expected_era) < 1e-6
    # Against mean sidereal time: differs by the accumulated precession in RA
    # (4612.16" per century since J2000), which the ERA-based hour angle leaves out.
    t = (jd_utc - 2451545.0) / 36525.0
    gmst_ha = _simple_gmst_deg(jd_utc) + lon - ra
    assert _angle_diff(gmst_ha - 4612.156534 * t / 3600.0, ha) < 0.01


def test_hour_angle_vectorised_and_wrapped() -> None:
    ra = np.linspace(0.0, 359.0, 50)
    mjd = np.full(50, 60000.3)
    ha = hour_angle_deg(ra, mjd, RUBIN_LONGITUDE_DEG)
    assert ha.shape == (50,)
    assert np.all((ha >= -180.0) & (ha < 180.0))
    # One degree more RA is one degree less hour angle.
    assert np.allclose((np.diff(ha) + 180.0) % 360.0 - 180.0, -(ra[1] - ra[0]))
    out = hour_angle_deg([10.0, np.nan, 10.0], [60000.0, 60000.0, np.nan], 0.0)
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])
    assert np.ndim(hour_angle_deg(1.0, 60000.0, 0.0)) == 0


# ---------------------------------------------------------------------------------------------
# visitTable + ccdVisitTable
# ---------------------------------------------------------------------------------------------


def _write(path: Path, columns: dict[str, object]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _tables(tmp_path: Path, dec_name: str = "dec", seeing: bool = True) -> tuple[Path, Path]:
    vt = _write(
        tmp_path / "visitTable.parq",
        {
            "visit": np.array([20, 10], dtype=np.int64),
            "physical_filter": ["HSC-R", "HSC-I2"],
            "band": ["r", "i"],
            "ra": [150.0, 337.5],
            dec_name: [2.2, 0.9],
            "skyRotation": [270.0, 90.0],
            "expTime": [30.0, 200.0],
            "expMidptMJD": [60000.1, np.nan],
            "obsStartMJD": [60000.1 - 15.0 / 86400.0, 60001.0],
        },
    )
    ccd: dict[str, object] = {
        "ccdVisitId": np.arange(5, dtype=np.int64),
        "visitId": np.array([10, 20, 10, 20, 10], dtype=np.int64),
        "detector": np.array([3, 1, 1, 0, 2], dtype=np.int64),
        "psfSigma": [2.0, 1.5, 3.0, 1.7, -1.0],
        "skyBg": [100.0, -1.0, 300.0, 0.0, 200.0],
        "pixelScale": [0.2, 0.2, 0.2, 0.2, 0.2],
    }
    if seeing:
        ccd["seeing"] = [0.9, 0.7, 1.4, 0.8, np.nan]
    ct = _write(tmp_path / "ccdVisitTable.parq", ccd)
    return vt, ct


@pytest.mark.parametrize("dec_name", ["dec", "decl"])
def test_visit_tables(tmp_path: Path, dec_name: str) -> None:
    vt, ct = _tables(tmp_path, dec_name=dec_name)
    out = read_visit_tables(vt, ct, site_longitude_deg=-155.4761)
    assert list(out) == [10, 20]
    m10, m20 = out[10], out[20]
    assert m10.physical_filter == "HSC-I2" and m10.band == "i"
    assert m10.teldec == 0.9 and m10.telra == 337.5 and m10.telrot == 90.0
    assert m10.mjd == pytest.approx(60001.0 + 100.0 / 86400.0)  # obsStart + expTime/2
    assert m20.mjd == pytest.approx(60000.1)
    assert math.isnan(m10.pmb)
    assert m10.telha == pytest.approx(float(hour_angle_deg(337.5, m10.mjd, -155.4761)))
    assert m10.detectors == (1, 2, 3)  # sorted by detector
    # detector 2 has psfSigma <= 0: bad.
    assert m10.psf_fwhm_detector == (1.4, BAD_DETECTOR_VALUE, 0.9)
    assert m10.psf_sigma == pytest.approx(2.5)
    assert m10.psf_fwhm == pytest.approx(1.15)
    assert m10.sky_background == pytest.approx(200.0)
    assert m20.detectors == (0, 1)
    assert m20.sky_background == -1.0  # no skyBg > 0
    assert m20.psf_fwhm == pytest.approx(0.75)
    assert str(vt) in m10.source


def test_visit_tables_fwhm_from_pixel_scale(tmp_path: Path) -> None:
    vt, ct = _tables(tmp_path, seeing=False)
    out = read_visit_tables(vt, ct)
    assert out[10].psf_fwhm_detector[0] == pytest.approx(3.0 * 0.2 * FWHM_PER_SIGMA)
    assert out[10].telha == pytest.approx(
        float(hour_angle_deg(337.5, out[10].mjd, RUBIN_LONGITUDE_DEG))
    )


def test_visit_tables_without_ccd(tmp_path: Path) -> None:
    vt, _ = _tables(tmp_path)
    out = read_visit_tables(vt, None)
    assert out[10].detectors == ()
    assert math.isnan(out[10].psf_fwhm) and out[10].sky_background == -1.0


def test_visit_tables_missing_column(tmp_path: Path) -> None:
    _, ct = _tables(tmp_path)
    vt = _write(tmp_path / "visitTable_bad.parq", {"visit": [1], "band": ["r"]})
    with pytest.raises(InputFileError, match=r"visitTable_bad\.parq.*physical_filter"):
        read_visit_tables(vt, ct)
    vt, _ = _tables(tmp_path)
    bad_ct = _write(tmp_path / "ccd2.parq", {"visitId": [10], "psfSigma": [1.0]})
    with pytest.raises(InputFileError, match=r"ccd2\.parq.*detector"):
        read_visit_tables(vt, bad_ct)


def test_visit_tables_truncated(tmp_path: Path) -> None:
    vt, ct = _tables(tmp_path)
    raw = ct.read_bytes()
    ct.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputFileError, match="ccdVisitTable.parq"):
        read_visit_tables(vt, ct)


def test_visit_tables_agree_with_visit_summary(shared_data: Path, tmp_path: Path) -> None:
    """A visitTable built from a visitSummary's values gives the same telha (within 0.01 deg)."""
    path = _hsc_path(shared_data, 36446)
    meta = read_visit_summary(path)
    vt = _write(
        tmp_path / "visitTable.parq",
        {
            "visit": [meta.visit],
            "physical_filter": [meta.physical_filter],
            "band": [meta.band],
            "ra": [meta.telra],
            "decl": [meta.teldec],
            "skyRotation": [meta.telrot],
            "expTime": [meta.exptime],
            "expMidptMJD": [meta.mjd],
        },
    )
    out = read_visit_tables(vt, None, site_longitude_deg=_site_longitude_deg(path))
    assert _angle_diff(out[meta.visit].telha, meta.telha) < 0.01


# ---------------------------------------------------------------------------------------------
# Explicit values
# ---------------------------------------------------------------------------------------------


def test_metadata_from_values() -> None:
    values = {
        "visit": 7,
        "physical_filter": "r_57",
        "band": "r",
        "telra": 10.0,
        "teldec": -30.0,
        "mjd": 60500.2,
        "exptime": 30,
        "detectors": [1, 2],
        "psf_fwhm_detector": [0.8, 0.9],
        "pmb": None,
    }
    meta = metadata_from_values(values)
    assert meta.visit == 7 and meta.exptime == 30.0
    assert meta.telha == pytest.approx(float(hour_angle_deg(10.0, 60500.2, RUBIN_LONGITUDE_DEG)))
    assert math.isnan(meta.pmb) and math.isnan(meta.telrot)
    assert meta.detectors == (1, 2) and meta.psf_fwhm_detector == (0.8, 0.9)
    assert meta.source == "event"
    explicit = metadata_from_values({**values, "telha": 12.5, "site_longitude_deg": 0.0})
    assert explicit.telha == 12.5
    site = metadata_from_values({**values, "site_longitude_deg": 0.0})
    assert _angle_diff(site.telha, meta.telha) == pytest.approx(abs(RUBIN_LONGITUDE_DEG))


def test_metadata_from_values_errors() -> None:
    with pytest.raises(PermanentInputError, match=r"band, telra, teldec, mjd, exptime"):
        metadata_from_values({"visit": 3, "physical_filter": "r"})
    good = {
        "visit": 3,
        "physical_filter": "r",
        "band": "r",
        "telra": 1.0,
        "teldec": 2.0,
        "mjd": 60000.0,
        "exptime": 30.0,
    }
    with pytest.raises(PermanentInputError, match="unknown key.*colour"):
        metadata_from_values({**good, "colour": "red"})
    with pytest.raises(PermanentInputError, match="visit 3.*bad value"):
        metadata_from_values({**good, "telra": "east"})
    with pytest.raises(PermanentInputError, match="visit"):
        metadata_from_values({**good, "visit": 3.5})
    with pytest.raises(PermanentInputError, match="psf_fwhm_detector"):
        metadata_from_values({**good, "detectors": [1, 2], "psf_fwhm_detector": [1.0]})
