"""Tests of reference magnitudes, the reference selector and reference-to-star matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from streamstars.config import (
    ColortermConfig,
    ReferenceFlagsConfig,
    ReferenceSelectorConfig,
    ReferenceSignalToNoiseConfig,
)
from streamstars.errors import RefcatError
from streamstars.io.refcat import HtmRefcat
from streamstars.refmatch import (
    MISSING_MAG,
    angular_separation_arcsec,
    match_reference_to_stars,
    reference_columns_needed,
    reference_magnitudes,
    reference_selection,
)

CFHT = "jointcal_cfht_minimal"
SDSS = "sdss_refcat_pipe_tasks/cal_ref_cat"
NO_SELECTION = ReferenceSelectorConfig()
ARCSEC = 1.0 / 3600.0


def _cols(**kw: list[float]) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v, dtype=np.float64) for k, v in kw.items()}
    out["id"] = np.arange(len(next(iter(out.values()))), dtype=np.int64)
    return out


# --- magnitudes ---------------------------------------------------------------------------
def test_plain_magnitudes_and_missing() -> None:
    cols = _cols(
        r_flux=[1e4, -1.0, 0.0, np.nan, 1e6],
        r_fluxErr=[1e2, 1.0, 1.0, 1.0, np.nan],
        i_flux=[1e5, 1e5, 1e5, 1e5, 1e5],
        i_fluxErr=[1e3, 1e3, 1e3, 1e3, 1e3],
    )
    mag, err, keep = reference_magnitudes(
        cols,
        {"r.MP9601": "r", "i.MP9701": "i"},
        ["r.MP9601", "i.MP9701", "g.MP9401"],
        NO_SELECTION,
        {},
        False,
    )
    assert mag.shape == (5, 3) and mag.dtype == np.float32 and err.dtype == np.float32
    assert keep.all()
    np.testing.assert_allclose(mag[0, 0], -2.5 * 4 + 31.4, rtol=1e-6)
    np.testing.assert_allclose(err[0, 0], 2.5 / np.log(10) * 0.01, rtol=1e-5)
    # non-positive / NaN flux, NaN error -> 99 in both mag and error.
    assert (mag[1:, 0] == MISSING_MAG).all() and (err[1:, 0] == MISSING_MAG).all()
    np.testing.assert_allclose(mag[:, 1], 31.4 - 12.5, rtol=1e-6)
    # A physical filter absent from filterMap: all 99.
    assert (mag[:, 2] == MISSING_MAG).all() and (err[:, 2] == MISSING_MAG).all()


def test_color_terms() -> None:
    cols = _cols(
        g_flux=[1e5, 1e5, -1.0],
        g_fluxErr=[1e3, 1e3, 1.0],
        r_flux=[1e4, 4e4, 1e4],
        r_fluxErr=[2e2, 2e2, 2e2],
    )
    ct = ColortermConfig(primary="r", secondary="g", c0=0.1, c1=-0.2, c2=0.03)
    mag, err, _ = reference_magnitudes(cols, {"r.X": "r"}, ["r.X"], NO_SELECTION, {"r.X": ct}, True)
    p = -2.5 * np.log10(cols["r_flux"][:2]) + 31.4
    s = -2.5 * np.log10(cols["g_flux"][:2]) + 31.4
    expected = p + 0.1 - 0.2 * (p - s) + 0.03 * (p - s) ** 2
    np.testing.assert_allclose(mag[:2, 0], expected, rtol=1e-6)
    ferr = np.hypot(0.8 * cols["r_fluxErr"][:2], -0.2 * cols["g_fluxErr"][:2])
    np.testing.assert_allclose(err[:2, 0], 2.5 / np.log(10) * ferr / cols["r_flux"][:2], rtol=1e-5)
    # Secondary flux missing -> colour undefined -> 99.
    assert mag[2, 0] == MISSING_MAG and err[2, 0] == MISSING_MAG
    # Colour terms switched off: the plain filterMap flux.
    mag2, _, _ = reference_magnitudes(cols, {"r.X": "r"}, ["r.X"], NO_SELECTION, {"r.X": ct}, False)
    np.testing.assert_allclose(mag2[:, 0], -2.5 * np.log10(cols["r_flux"]) + 31.4, rtol=1e-6)


def test_missing_colorterm_or_column() -> None:
    cols = _cols(r_flux=[1.0], r_fluxErr=[1.0])
    with pytest.raises(RefcatError, match="colorterms has no entry for physical filter 'r.X'"):
        reference_magnitudes(cols, {"r.X": "r"}, ["r.X"], NO_SELECTION, {}, True)
    with pytest.raises(RefcatError, match="'z_flux'"):
        reference_magnitudes(cols, {"z.X": "z"}, ["z.X"], NO_SELECTION, {}, False)
    with pytest.raises(RefcatError, match="colorterms"):
        reference_columns_needed({"r.X": "r"}, ["r.X"], NO_SELECTION, {}, True)


def test_selector_signal_to_noise_and_flags() -> None:
    cols = _cols(
        i_flux=[100.0, 100.0, 100.0, 100.0, np.nan],
        i_fluxErr=[1.0, 10.0, 20.0, 0.0, 1.0],
    )
    cols["flags"] = np.array([[1, 0], [1, 1], [1, 0], [0, 0], [1, 0]], dtype=bool)
    sn = ReferenceSelectorConfig(doSignalToNoise=True)
    keep = reference_selection(cols, sn)
    # S/N 100 passes, 10 is not > 10, 5 fails, inf (err 0) is not finite, NaN fails.
    assert keep.tolist() == [True, False, False, False, False]
    flags = ReferenceSelectorConfig(
        doFlags=True, flags=ReferenceFlagsConfig(good=("photometric",), bad=("resolved",))
    )
    names = ("photometric", "resolved")
    assert reference_selection(cols, flags, names).tolist() == [True, False, True, False, True]
    with pytest.raises(RefcatError, match="photometric"):
        reference_selection(cols, flags)  # bit names unknown
    # Individual boolean columns work too (HtmRefcat.load of a flag bit name).
    sep = dict(cols, photometric=cols["flags"][:, 0], resolved=cols["flags"][:, 1])
    del sep["flags"]
    assert reference_selection(sep, flags).tolist() == [True, False, True, False, True]


def test_sdss_reference_magnitudes(shared_data: Path) -> None:
    cat = HtmRefcat(shared_data / SDSS)
    selector = ReferenceSelectorConfig(
        doSignalToNoise=True,
        signalToNoise=ReferenceSignalToNoiseConfig("r_flux", "r_fluxErr", 10.0),
        doFlags=True,
        flags=ReferenceFlagsConfig(good=("photometric",)),
    )
    filter_map = {"g.X": "g", "r.X": "r"}
    need = reference_columns_needed(filter_map, ["g.X", "r.X"], selector, {}, False)
    cat.validate(["g", "r"], selector)
    cols = cat.load(cat.existing_shards(), ["id", "flags", *need])
    mag, err, keep = reference_magnitudes(
        cols, filter_map, ["g.X", "r.X"], selector, {}, False, cat.flag_names
    )
    assert mag.shape == (15083, 2)
    sn = cols["r_flux"] / cols["r_fluxErr"]
    assert keep.sum() == np.sum((sn > 10) & cols["flags"][:, 0])
    good = cols["r_flux"] > 0
    np.testing.assert_allclose(
        mag[good, 1], -2.5 * np.log10(cols["r_flux"][good]) + 31.4, rtol=1e-6
    )
    assert (mag[~good, 1] == MISSING_MAG).all()
    # SDSS stars in this field are roughly 14-25 mag.
    r = mag[keep, 1]
    assert 12 < np.median(r) < 24


# --- matching -----------------------------------------------------------------------------
def _brute_force(
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    star_ra: np.ndarray,
    star_dec: np.ndarray,
    radius: float,
) -> dict[int, int]:
    """star index -> reference index under the documented rule (no exact ties assumed)."""
    n_ref, n_star = len(ref_ra), len(star_ra)
    sep = angular_separation_arcsec(
        np.repeat(ref_ra, n_star),
        np.repeat(ref_dec, n_star),
        np.tile(star_ra, n_ref),
        np.tile(star_dec, n_ref),
    ).reshape(n_ref, n_star)
    nearest = sep.argmin(axis=1)
    best = sep[np.arange(n_ref), nearest]
    cand = np.flatnonzero(best <= radius)
    out: dict[int, int] = {}
    for r in cand[np.argsort(best[cand], kind="stable")]:
        out.setdefault(int(nearest[r]), int(r))
    return out


def test_nearest_star_wins() -> None:
    cosd = np.cos(np.radians(20.0))
    # Stars 0", 0.3", 0.8" east of RA 10; the reference 0.5" east: distances 0.5, 0.2, 0.3.
    star_ra = 10.0 + np.array([0.0, 0.3, 0.8]) * ARCSEC / cosd
    star_dec = np.array([20.0, 20.0, 20.0])
    ref_ra = np.array([10.0 + 0.5 * ARCSEC / cosd])
    ri, si = match_reference_to_stars(ref_ra, [20.0], star_ra, star_dec, np.array([5, 6, 7]), 1.0)
    assert ri.tolist() == [0] and si.tolist() == [1]
    # Radius smaller than every distance: nothing.
    ri, si = match_reference_to_stars(ref_ra, [20.0], star_ra, star_dec, np.array([5, 6, 7]), 0.15)
    assert ri.size == 0 and si.size == 0
    ri, si = match_reference_to_stars([10.0], [21.0], star_ra, star_dec, np.array([5, 6, 7]), 1.0)
    assert ri.size == 0 and si.size == 0


def test_two_refs_one_star() -> None:
    star_ra, star_dec = np.array([100.0, 100.01]), np.array([-30.0, -30.0])
    ref_ra = np.array([100.0, 100.0, 100.0])
    ref_dec = np.array([-30.0 + 0.6 * ARCSEC, -30.0 - 0.2 * ARCSEC, -30.0 + 0.9 * ARCSEC])
    ri, si = match_reference_to_stars(ref_ra, ref_dec, star_ra, star_dec, np.array([1, 2]), 1.0)
    # All three pick star 0; only the nearest (ref 1) keeps it; the others are NOT reassigned.
    assert ri.tolist() == [1] and si.tolist() == [0]


def test_ties_are_deterministic() -> None:
    # Two references exactly as far from one star (mirror images in Dec): smaller ref id wins.
    ref_ra = np.array([50.0, 50.0])
    ref_dec = np.array([0.5 * ARCSEC, -0.5 * ARCSEC])
    ri, si = match_reference_to_stars(
        ref_ra, ref_dec, [50.0], [0.0], np.array([9]), 1.0, ref_ids=np.array([200, 100])
    )
    assert ri.tolist() == [1] and si.tolist() == [0]
    ri, si = match_reference_to_stars(ref_ra, ref_dec, [50.0], [0.0], np.array([9]), 1.0)
    assert ri.tolist() == [0]
    # One reference exactly between two stars: smaller star id wins.
    ri, si = match_reference_to_stars(
        [50.0], [0.0], [50.0, 50.0], [0.5 * ARCSEC, -0.5 * ARCSEC], np.array([8, 3]), 1.0
    )
    assert si.tolist() == [1]


def test_ra_wrap_and_pole() -> None:
    # Across RA = 0/360.
    star_ra = np.array([359.9999, 0.0001, 180.0])
    star_dec = np.array([0.0, 0.0, 0.0])
    ref_ra = np.array([0.00005, 359.99995])
    ref_dec = np.array([0.0, 0.0])
    ri, si = match_reference_to_stars(ref_ra, ref_dec, star_ra, star_dec, np.arange(3), 1.0)
    assert ri.tolist() == [0, 1] and si.tolist() == [1, 0]
    # Near the pole, wildly different RAs are close on the sky.
    star_ra, star_dec = np.array([0.0, 90.0, 200.0]), np.array([89.99995, 89.9999, 89.9998])
    ref_ra, ref_dec = np.array([180.0, 270.0, 45.0]), np.array([89.9999, 89.9999, 89.99992])
    ri, si = match_reference_to_stars(ref_ra, ref_dec, star_ra, star_dec, np.arange(3), 1.0)
    assert ri.size >= 2
    assert dict(zip(si.tolist(), ri.tolist(), strict=True)) == _brute_force(
        ref_ra, ref_dec, star_ra, star_dec, 1.0
    )
    exact = match_reference_to_stars([0.0], [90.0], [123.0], [90.0 - 0.5 * ARCSEC], [1], 1.0)
    assert exact[0].tolist() == [0]
    # Exactly at the pole with different RA: distance 0.
    assert angular_separation_arcsec([10.0], [90.0], [200.0], [90.0])[0] < 1e-6


def test_order_independence_random() -> None:
    rng = np.random.default_rng(42)
    n_star, n_ref = 1500, 1000
    star_ra = rng.uniform(359.9, 360.1, n_star) % 360.0
    star_dec = rng.uniform(-0.1, 0.1, n_star)
    pick = rng.choice(n_star, n_ref)
    ref_ra = (star_ra[pick] + rng.normal(0, 0.4 * ARCSEC, n_ref)) % 360.0
    ref_dec = star_dec[pick] + rng.normal(0, 0.4 * ARCSEC, n_ref)
    star_ids = rng.permutation(n_star) + 1000
    ri, si = match_reference_to_stars(ref_ra, ref_dec, star_ra, star_dec, star_ids, 1.0)
    assert len(np.unique(si)) == si.size and len(np.unique(ri)) == ri.size
    sep = angular_separation_arcsec(ref_ra[ri], ref_dec[ri], star_ra[si], star_dec[si])
    assert (sep <= 1.0).all() and ri.size > 0.8 * len(np.unique(pick))
    assert dict(zip(si.tolist(), ri.tolist(), strict=True)) == _brute_force(
        ref_ra, ref_dec, star_ra, star_dec, 1.0
    )
    # Permuting the inputs permutes the answer.
    pr, ps = rng.permutation(n_ref), rng.permutation(n_star)
    ri2, si2 = match_reference_to_stars(
        ref_ra[pr], ref_dec[pr], star_ra[ps], star_dec[ps], star_ids[ps], 1.0, ref_ids=pr
    )
    assert sorted(zip(pr[ri2].tolist(), ps[si2].tolist(), strict=True)) == sorted(
        zip(ri.tolist(), si.tolist(), strict=True)
    )


def test_empty_inputs() -> None:
    e = np.zeros(0)
    ri, si = match_reference_to_stars(e, e, [1.0], [1.0], [1], 1.0)
    assert ri.size == 0 and ri.dtype == np.int64
    ri, si = match_reference_to_stars([1.0], [1.0], e, e, np.zeros(0, dtype=np.int64), 1.0)
    assert si.size == 0


def test_cfht_known_matches(shared_data: Path) -> None:
    cat = HtmRefcat(shared_data / CFHT / "ref_cats" / "sdss-dr9-fink-v5b")
    nearest = {}
    matches = {}
    for visit in (849375, 850587):
        table = pq.read_table(
            shared_data / CFHT / f"sourceTable-{visit}.parq", columns=["ra", "dec"]
        )
        ra, dec = table["ra"].to_numpy(), table["dec"].to_numpy()
        ref = cat.load_circle(float(ra.mean()), float(dec.mean()), 0.1, ["r_flux"])
        sep = angular_separation_arcsec(
            np.repeat(ra, ref["ra"].size),
            np.repeat(dec, ref["ra"].size),
            np.tile(ref["ra"], ra.size),
            np.tile(ref["dec"], ra.size),
        ).reshape(ra.size, -1)
        nearest[visit] = sep.min(axis=1)
        ri, si = match_reference_to_stars(ref["ra"], ref["dec"], ra, dec, np.arange(ra.size), 1.0)
        matches[visit] = (si.tolist(), ref["id"][ri].tolist())
    # 849375: source 0 at 0.11" from its SDSS counterpart, source 1 has none within 12".
    np.testing.assert_allclose(nearest[849375], [0.1107, 12.628], atol=2e-3)
    # 850587: the same star (source 0, 0.067") and a second star at 0.046".
    np.testing.assert_allclose(nearest[850587], [0.0673, 0.0459], atol=2e-3)
    assert matches[849375] == ([0], [37122020600681])
    assert sorted(zip(*matches[850587], strict=True)) == [(0, 37122020600681), (1, 37122020600535)]
