"""Tests of streamstars.select: cuts, quantities, aperture corrections, real CFHT/HSC files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from streamstars.columns import OBSERVATION_DTYPES
from streamstars.config import DEFAULT_BAD_FLAGS, BuildStarsConfig, SourceSelectorConfig
from streamstars.errors import ConfigError, InvalidSourceTableError, MissingMetadataError
from streamstars.io.sourcetable import read_source_table
from streamstars.select import (
    aperture_corrections,
    aperture_radius_from_name,
    count_cuts,
    cut_masks,
    select_observations,
    select_visit,
)
from streamstars.visit import VisitMetadata

K = 2.5 / math.log(10.0)
VISIT = 1234
EXPTIME = 30.0


def meta(visit: int = VISIT, exptime: float = EXPTIME) -> VisitMetadata:
    return VisitMetadata(visit=visit, physical_filter="HSC-I", band="i", telra=0.0, teldec=0.0,
                         telha=0.0, telrot=0.0, mjd=60000.0, exptime=exptime)


def config(**selector: Any) -> BuildStarsConfig:
    top = {k: selector.pop(k) for k in list(selector) if not k.startswith("do") or k in (
        "doSubtractLocalBackground", "doApplyWcsJacobian")}
    return BuildStarsConfig(sourceSelector=SourceSelectorConfig(**selector), **top)


def base_columns(n: int) -> dict[str, Any]:
    """n good sources (S/N 100, unresolved, isolated, primary) on detector 40, ids descending."""
    cols: dict[str, Any] = {
        "sourceId": np.arange(100 + n, 100, -1, dtype=np.int64),
        "visit": np.full(n, VISIT, dtype=np.int64),
        "detector": np.full(n, 40, dtype=np.int64),
        "ra": np.linspace(150.0, 150.1, n),
        "dec": np.linspace(2.0, 2.1, n),
        "x": np.arange(n, dtype=np.float64) * 10.0,
        "y": np.arange(n, dtype=np.float64) * 20.0,
        "apFlux_12_0_instFlux": np.full(n, 1.0e4),
        "apFlux_12_0_instFluxErr": np.full(n, 1.0e2),
        "apFlux_17_0_instFlux": np.full(n, 1.2e4),
        "apFlux_17_0_instFluxErr": np.full(n, 2.0e2),
        "extendedness": np.zeros(n),
        "parentSourceId": np.zeros(n, dtype=np.int64),
        "deblend_nChild": np.zeros(n, dtype=np.int64),
        "detect_isPrimary": np.ones(n, dtype=bool),
        "calib_psf_candidate": np.arange(n) % 2 == 0,
        "localBackground_instFlux": np.full(n, 0.5),
        "localBackground_flag": np.zeros(n, dtype=bool),
    }
    for flag in DEFAULT_BAD_FLAGS:
        cols[flag] = np.zeros(n, dtype=bool)
    return cols


# Row index -> the cut it fails.
FAILS = {1: "flags", 2: "unresolved", 3: "signalToNoise", 4: "isolated", 5: "isolated",
         6: "requirePrimary", 7: "localBackground", 8: "unresolved", 9: "signalToNoise",
         10: "flags"}


def cut_table() -> pa.Table:
    cols = base_columns(11)
    cols["pixelFlags_edge"][1] = True
    cols["extendedness"][2] = 1.0
    cols["apFlux_12_0_instFluxErr"][3] = 2.0e3  # S/N 5
    cols["deblend_nChild"][4] = 2
    cols["parentSourceId"][5] = 77
    cols["detect_isPrimary"][6] = False
    cols["localBackground_instFlux"][7] = 1.0e4 / (math.pi * 144.0) * 1.01  # flux - bkg < 0
    cols["extendedness"][8] = np.nan
    cols["apFlux_12_0_instFluxErr"][9] = 1.0  # S/N 1e4 > maximum
    table = pa.table(cols)
    # A null flag counts as set.
    flags = pa.array([False] * 10 + [None], type=pa.bool_())
    return table.set_column(table.schema.get_field_index("centroid_flag"), "centroid_flag", flags)


def selected_rows(table: pa.Table, cfg: BuildStarsConfig) -> set[int]:
    obs = select_observations(table, meta(), cfg)
    ids = table.column("sourceId").to_numpy()
    return {int(np.flatnonzero(ids == s)[0]) for s in obs["source_id"]}


# --- cuts ----------------------------------------------------------------------------------


def test_default_cuts() -> None:
    table = cut_table()
    assert selected_rows(table, BuildStarsConfig()) == {0, 7}
    assert selected_rows(table, config(doSubtractLocalBackground=True)) == {0}


@pytest.mark.parametrize(
    ("switch", "rows"),
    [("doFlags", {1, 10}), ("doUnresolved", {2, 8}), ("doSignalToNoise", {3, 9}),
     ("doIsolated", {4, 5}), ("doRequirePrimary", {6})],
)
def test_each_cut_switchable(switch: str, rows: set[int]) -> None:
    table = cut_table()
    on = selected_rows(table, config(doSubtractLocalBackground=True))
    off = selected_rows(table, config(doSubtractLocalBackground=True, **{switch: False}))
    assert off - on == rows


def test_local_background_switch() -> None:
    table = cut_table()
    assert 7 in selected_rows(table, BuildStarsConfig())
    assert 7 not in selected_rows(table, config(doSubtractLocalBackground=True))
    cols = base_columns(3)
    cols["localBackground_flag"][1] = True
    table = pa.table(cols)
    assert selected_rows(table, config(doSubtractLocalBackground=True)) == {0, 2}
    # The flag is part of the local-background cut, not of doFlags.
    assert selected_rows(table, config(doSubtractLocalBackground=True, doFlags=False)) == {0, 2}


def test_thresholds_configurable() -> None:
    table = cut_table()
    from streamstars.config import SignalToNoiseConfig, UnresolvedConfig

    cfg = BuildStarsConfig(sourceSelector=SourceSelectorConfig(
        signalToNoise=SignalToNoiseConfig(minimum=1.0, maximum=1e5),
        unresolved=UnresolvedConfig(maximum=2.0)))
    assert selected_rows(table, cfg) == {0, 2, 3, 7, 9}


def test_primary_cut_skipped_without_column() -> None:
    cols = base_columns(3)
    del cols["detect_isPrimary"]
    masks = cut_masks(pa.table(cols), BuildStarsConfig())
    assert "requirePrimary" not in masks
    assert selected_rows(pa.table(cols), BuildStarsConfig()) == {0, 1, 2}


def test_count_cuts() -> None:
    counts = count_cuts(cut_table(), config(doSubtractLocalBackground=True))
    assert counts == {"read": 11, "flags": 2, "unresolved": 2, "signalToNoise": 2, "isolated": 2,
                      "requireFiniteRaDec": 0, "requirePrimary": 1, "localBackground": 1,
                      "nonFiniteRaDec": 0, "raDecOutOfRange": 0, "selected": 1}


def test_nan_coordinates() -> None:
    """fgcmcal's doRequireFiniteRaDec drops rows without finite coordinates and keeps the rest
    of the visit; with it off they are dropped all the same (they cannot be placed on the
    sky).  Only rows that pass every other cut are counted as lost."""
    cols = base_columns(4)
    cols["ra"][1] = np.nan
    cols["dec"][2] = np.nan
    cols["pixelFlags_bad"][2] = True  # fails another cut: not counted
    table = pa.table(cols)
    for cfg in (BuildStarsConfig(), config(doRequireFiniteRaDec=False)):
        obs, dropped = select_visit(table, meta(), cfg)
        assert selected_rows(table, cfg) == {0, 3}
        assert dropped == {"nonFiniteRaDec": 1, "raDecOutOfRange": 0}
        assert count_cuts(table, cfg)["nonFiniteRaDec"] == 1
        assert len(obs["source_id"]) == 2
    # Only the bad-flagged NaN source: nothing selectable is lost.
    cols["ra"][1] = 150.0
    assert selected_rows(pa.table(cols), BuildStarsConfig()) == {0, 1, 3}
    assert select_visit(pa.table(cols), meta(), BuildStarsConfig())[1]["nonFiniteRaDec"] == 0


def test_visit_and_exptime_checks() -> None:
    table = pa.table(base_columns(3))
    with pytest.raises(InvalidSourceTableError, match="not visit 99"):
        select_observations(table, meta(visit=99), BuildStarsConfig())
    with pytest.raises(MissingMetadataError, match="exposure time"):
        select_observations(table, meta(exptime=0.0), BuildStarsConfig())


# --- quantities ------------------------------------------------------------------------------


def test_output_contract_and_sorting() -> None:
    cols = base_columns(5)
    cols["detector"] = np.array([40, 41, 40, 42, 40])
    obs = select_observations(pa.table(cols), meta(), BuildStarsConfig())
    assert list(obs) == list(OBSERVATION_DTYPES)
    for name, dt in OBSERVATION_DTYPES.items():
        assert obs[name].dtype == dt, name
    assert list(obs["source_id"]) == [101, 102, 103, 104, 105]
    # Row 4 of the input has the smallest id.
    assert obs["x"][0] == 40.0 and obs["detector"][0] == 40 and obs["detector"][1] == 42
    assert np.all(obs["visit"] == VISIT)
    np.testing.assert_array_equal(obs["psf_candidate"], [True, False, True, False, True])


def test_magnitudes_by_hand() -> None:
    cols = base_columns(2)
    cols["apFlux_12_0_instFlux"] = np.array([5.0e3, 2.0e4])
    cols["apFlux_12_0_instFluxErr"] = np.array([1.0e2, 3.0e2])
    cols["apFlux_17_0_instFlux"] = np.array([6.0e3, -1.0])  # second: no outer magnitude
    cols["apFlux_17_0_instFluxErr"] = np.array([2.0e2, 2.0e2])
    obs = select_observations(pa.table(cols), meta(), BuildStarsConfig())
    # Sorted by id: input row 1 first.
    f, e = np.array([2.0e4, 5.0e3]), np.array([3.0e2, 1.0e2])
    np.testing.assert_allclose(obs["inst_mag"], -2.5 * np.log10(f / EXPTIME))
    np.testing.assert_allclose(obs["inst_mag_err"], K * e / f)
    np.testing.assert_array_equal(obs["jacobian"], [1.0, 1.0])
    np.testing.assert_array_equal(obs["delta_mag_bkg"], [0.0, 0.0])
    assert obs["delta_mag_aper"][0] == 99.0 and obs["delta_mag_err_aper"][0] == 99.0
    np.testing.assert_allclose(obs["delta_mag_aper"][1], -2.5 * math.log10(5.0e3 / 6.0e3))
    np.testing.assert_allclose(obs["delta_mag_err_aper"][1],
                               math.hypot(K * 1.0e2 / 5.0e3, K * 2.0e2 / 6.0e3))


def test_local_background_arithmetic() -> None:
    cols = base_columns(1)
    cols["localBackground_instFlux"] = np.array([2.0])
    obs = select_observations(pa.table(cols), meta(), config(doSubtractLocalBackground=True))
    bkg = math.pi * 12.0**2 * 2.0
    flux = 1.0e4
    np.testing.assert_allclose(obs["delta_mag_bkg"],
                               -2.5 * math.log10(flux - bkg) + 2.5 * math.log10(flux))
    # inst_mag keeps the raw flux (fgcmcal carries the correction in delta_mag_bkg).
    np.testing.assert_allclose(obs["inst_mag"], -2.5 * math.log10(flux / EXPTIME))
    # The radius follows the flux field name.
    assert aperture_radius_from_name("apFlux_12_0_instFlux") == 12.0
    assert aperture_radius_from_name("ApFlux_4_5_instFlux") == 4.5
    assert aperture_radius_from_name("base_CircularApertureFlux_17_0_instFlux") == 17.0
    with pytest.raises(ConfigError, match="psfFlux"):
        aperture_radius_from_name("psfFlux")


def test_jacobian_arithmetic() -> None:
    cols = base_columns(5)
    cols["detector"] = np.array([40, 40, 40, 41, 41])
    scale = np.array([1.0, 1.1, 0.9, 1.2, 1.3]) * 5.0e-5  # deg / pixel
    cols["localWcs_CDMatrix_1_1"] = scale
    cols["localWcs_CDMatrix_1_2"] = 0.1 * scale
    cols["localWcs_CDMatrix_2_1"] = -0.2 * scale
    cols["localWcs_CDMatrix_2_2"] = scale
    table = pa.table(cols)
    area = np.abs(scale * scale - (0.1 * scale) * (-0.2 * scale))
    ref = np.median(area[:3])  # detector 40 = referenceCCD
    obs = select_observations(table, meta(), BuildStarsConfig())
    # ids are descending in the input: output order is input rows reversed.
    expected = (area / ref)[::-1]
    np.testing.assert_allclose(obs["jacobian"], expected)
    np.testing.assert_allclose(
        obs["inst_mag"], -2.5 * np.log10(1.0e4 / EXPTIME) - 2.5 * np.log10(expected))
    # Reference detector absent: median over all sources.
    obs = select_observations(table, meta(), BuildStarsConfig(referenceCCD=7))
    np.testing.assert_allclose(obs["jacobian"], (area / np.median(area))[::-1])
    # doApplyWcsJacobian off: no jacobian at all.
    obs = select_observations(table, meta(), BuildStarsConfig(doApplyWcsJacobian=False))
    np.testing.assert_array_equal(obs["jacobian"], np.ones(5))
    np.testing.assert_allclose(obs["inst_mag"], -2.5 * np.log10(1.0e4 / EXPTIME))


# --- aperture corrections ---------------------------------------------------------------------


def test_aperture_corrections() -> None:
    obs = {
        "detector": np.array([1, 1, 1, 1, 2, 2, 3, 3, 3], dtype=np.int32),
        "delta_mag_aper": np.array([0.1, 0.2, 0.3, 99.0, 0.5, 0.7, 0.0, 0.0, 99.0]),
        "delta_mag_err_aper": np.array([0.01] * 3 + [99.0] + [0.01] * 4 + [99.0]),
    }
    visit_value, per_det = aperture_corrections(obs)
    assert visit_value == pytest.approx(np.median([0.1, 0.2, 0.3, 0.5, 0.7, 0.0, 0.0]))
    assert per_det == {1: pytest.approx(0.2), 2: -9999.0, 3: -9999.0}
    empty = {k: np.zeros(0) for k in obs}
    assert aperture_corrections(empty) == (-9999.0, {})


# --- real files -------------------------------------------------------------------------------


def test_cfht_real(shared_data: Path) -> None:
    cfg = BuildStarsConfig()
    d = shared_data / "jointcal_cfht_minimal"
    t1 = read_source_table(d / "sourceTable-849375.parq", cfg)
    obs1 = select_observations(t1, meta(visit=849375), cfg)
    # The second source is extended (1.0) with S/N 7.8: only the first survives.
    assert obs1["source_id"].tolist() == [131329414033047692]
    assert count_cuts(t1, cfg)["selected"] == 1
    np.testing.assert_allclose(obs1["inst_mag"][0],
                               -2.5 * math.log10(21234.26489686966 / EXPTIME))
    np.testing.assert_allclose(obs1["inst_mag_err"][0], K * 619.6720963695582 / 21234.26489686966)
    np.testing.assert_allclose(obs1["delta_mag_aper"][0],
                               -2.5 * math.log10(21234.26489686966 / 21904.953770667315))
    assert obs1["ra"][0] == pytest.approx(215.03975621364475)
    assert not obs1["psf_candidate"][0]  # no calib_psf_candidate column in this file
    assert obs1["jacobian"][0] == 1.0  # no CD matrix in this file
    t2 = read_source_table(d / "sourceTable-850587.parq", cfg)
    obs2 = select_observations(t2, meta(visit=850587), cfg)
    assert len(obs2["source_id"]) == 2
    assert obs2["detector"].tolist() == [12, 12]


def test_hsc_legacy_real(shared_data: Path) -> None:
    path = shared_data / "jointcal_hsc/subselected-sourceTable-0034690.parq"
    for lb in (False, True):
        cfg = BuildStarsConfig(doSubtractLocalBackground=lb)
        table = read_source_table(path, cfg)
        counts = count_cuts(table, cfg)
        assert counts["read"] == 168
        assert counts["selected"] == 4
        assert counts["unresolved"] == 148  # 61 null extendedness + 87 extended
        obs = select_observations(table, meta(visit=34690), cfg)
        assert obs["source_id"].tolist() == [29798689258078221, 29798723617816595,
                                             29798757977554994, 29798757977555000]
        assert obs["detector"].tolist() == [48, 56, 64, 64]
        assert obs["psf_candidate"].tolist() == [False, True, False, True]
    # Hand computation on one row, with the jacobian (no detector 40: median over all rows).
    import pyarrow.parquet as pq

    raw = pq.read_table(path).to_pydict()
    ids = np.asarray(raw["id"])
    cd = {c: np.asarray(raw[f"LocalWcs_CDMatrix_{c}"]) for c in ("1_1", "1_2", "2_1", "2_2")}
    area = np.abs(cd["1_1"] * cd["2_2"] - cd["1_2"] * cd["2_1"])
    ref = np.median(area[np.isfinite(area) & (area > 0)])
    row = int(np.flatnonzero(ids == 29798723617816595)[0])
    flux = raw["ApFlux_12_0_instFlux"][row]
    bkg = math.pi * 144.0 * raw["LocalBackground_instFlux"][row]
    jac = area[row] / ref
    assert obs["jacobian"][1] == pytest.approx(jac)
    assert obs["inst_mag"][1] == pytest.approx(
        -2.5 * math.log10(flux / EXPTIME) - 2.5 * math.log10(jac))
    assert obs["delta_mag_bkg"][1] == pytest.approx(
        -2.5 * math.log10(flux - bkg) + 2.5 * math.log10(flux))
    assert obs["dec"][1] == pytest.approx(raw["decl"][row])
    # Jacobian ratios agree with the file's own Jacobian_value up to a common factor.
    jv = np.asarray(raw["Jacobian_value"])
    sel = np.isin(ids, obs["source_id"])
    ratio = (area[sel] / ref) / jv[sel]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)
    visit_value, per_det = aperture_corrections(obs)
    assert per_det == {48: -9999.0, 56: -9999.0, 64: -9999.0}
    assert visit_value == pytest.approx(np.median(obs["delta_mag_aper"]))


def test_cut_table_through_parquet(tmp_path: Path) -> None:
    """The selection gives the same answer on a file read back from parquet (float32 too)."""
    import pyarrow.parquet as pq

    table = cut_table()
    f32 = table.set_column(
        table.schema.get_field_index("apFlux_17_0_instFlux"), "apFlux_17_0_instFlux",
        table.column("apFlux_17_0_instFlux").cast(pa.float32()))
    pq.write_table(f32, tmp_path / "cuts.parq")
    cfg = dataclasses.replace(BuildStarsConfig(), doSubtractLocalBackground=True)
    back = read_source_table(tmp_path / "cuts.parq", cfg)
    assert selected_rows(back, cfg) == {0}
