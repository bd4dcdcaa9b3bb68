"""Geometry helpers: the pixel sets the association loads must never miss a component."""

from __future__ import annotations

import healpy as hp
import numpy as np
import pytest

from streamstars.sky import (
    chord_from_arcsec,
    kdtree,
    pairs_within,
    pixels_near,
    radec_from_vectors,
    self_pairs_within,
    unit_vectors,
)


def _points(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random points plus the hard places: poles, RA 0/360, base-pixel corners."""
    ra = np.r_[rng.uniform(0, 360, n), 0.0, 359.9999, 45.0, 90.0, 135.0, 0.0, 0.0, 180.0]
    dec = np.r_[np.degrees(np.arcsin(rng.uniform(-1, 1, n))), 0.0, 0.0,
                41.8103, -41.8103, 0.0, 89.9999, -89.9999, 89.99]
    return unit_vectors(ra, dec)


@pytest.mark.parametrize("nside,margin_arcsec", [(256, 2.5), (256, 6.0), (64, 20.0), (256, 60.0)])
def test_pixels_near_never_misses_a_pixel_within_the_margin(nside: int,
                                                            margin_arcsec: float) -> None:
    rng = np.random.default_rng(nside)
    v = _points(rng, 3000)
    margin = chord_from_arcsec(margin_arcsec)
    # points scattered to the margin around each vector, and the pixels they fall in
    near = pixels_near(v, nside, margin)
    assert np.all(np.diff(near) > 0)
    ra, dec = radec_from_vectors(v)
    for k in range(8):
        angle = rng.uniform(0, 2 * np.pi, len(v))
        step = margin_arcsec / 3600 * (0.999 if k % 2 else rng.uniform(0, 1, len(v)))
        d = np.clip(dec + step * np.sin(angle), -90, 90)
        r = (ra + step * np.cos(angle) / np.maximum(np.cos(np.radians(d)), 1e-6)) % 360
        moved = unit_vectors(r, d)
        within = np.linalg.norm(moved - v, axis=1) <= margin
        pix = hp.vec2pix(nside, *moved[within].T, nest=True)
        assert np.isin(pix, near).all()
    # exact check on a few points: every pixel touching the margin disc is included
    for c in v[-8:]:
        disc = hp.query_disc(nside, c, 2 * np.arcsin(margin / 2), inclusive=False, nest=True)
        assert np.isin(disc, near).all()


def test_pixels_near_is_smaller_than_whole_neighbour_rings() -> None:
    """A compact footprint does not drag in the full ring of neighbouring pixels."""
    rng = np.random.default_rng(1)
    ra = 150 + rng.uniform(-0.3, 0.3, 20000)
    dec = 2 + rng.uniform(-0.3, 0.3, 20000)
    v = unit_vectors(ra, dec)
    near = pixels_near(v, 256, chord_from_arcsec(2.5))
    own = np.unique(hp.vec2pix(256, *v.T, nest=True))
    ring = np.unique(np.r_[own, hp.get_all_neighbours(256, own, nest=True).ravel()])
    assert set(own) <= set(near) and len(near) < len(ring)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_searches_equal_the_plain_kdtree_searches(seed: int) -> None:
    """The nearest-neighbour pre-filtered searches return exactly the pairs (and distances)
    of scipy's pair searches: clustered points, exact duplicates, empty and tiny inputs."""
    rng = np.random.default_rng(seed)
    centre = unit_vectors(np.array([10.0]), np.array([-30.0]))[0]
    spread = chord_from_arcsec(60.0)
    points = centre + rng.normal(0, spread, (3000, 3))
    points = np.r_[points, points[:50], points[:5] + 1e-9]  # duplicates and near-duplicates
    points /= np.linalg.norm(points, axis=1)[:, None]
    others = centre + rng.normal(0, spread, (2000, 3))
    others /= np.linalg.norm(others, axis=1)[:, None]
    radius = chord_from_arcsec(1.0)
    tree = kdtree(others)
    i, j, d = pairs_within(points, tree, radius)
    expected = kdtree(points).sparse_distance_matrix(tree, radius, output_type="ndarray")
    got = sorted(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))
    want = sorted(zip(expected["i"].tolist(), expected["j"].tolist(), expected["v"].tolist(),
                      strict=True))
    assert [g[:2] for g in got] == [w[:2] for w in want] and len(got) > 100
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=0, atol=1e-15)
    pairs = self_pairs_within(kdtree(points), radius)
    plain = np.sort(kdtree(points).query_pairs(radius, output_type="ndarray"), axis=1)
    assert sorted(map(tuple, pairs.tolist())) == sorted(map(tuple, plain.tolist()))
    assert len(pairs) > 50
    one = kdtree(points[:1])
    assert len(pairs_within(points, one, radius)[0]) >= 1
    assert self_pairs_within(one, radius).shape == (0, 2)
    assert len(pairs_within(points[:0], tree, radius)[0]) == 0


@pytest.mark.parametrize("nside", [32, 128, 256, 16384, 1 << 29])
def test_hpgeom_pixels_are_healpys(nside: int) -> None:
    """streamstars computes pixels with hpgeom (no astropy import); stored keys, the density
    cut and shard ownership were defined with healpy: the numbers must be the same, also for
    points a few ulps from pixel edges and corners and for fixed-point vectors."""
    from streamstars.sky import (
        disc_pixels,
        healpix29,
        max_pixel_radius,
        neighbours,
        pixel_at_order,
        pixel_vectors,
        pixels_of,
        resolution,
    )

    rng = np.random.default_rng(nside % 1000)
    v = _points(rng, 200_000)
    n_pix = 12 * nside * nside
    pix = rng.integers(0, n_pix, 3000)
    corners = np.asarray(hp.boundaries(nside, pix, step=2, nest=True)).transpose(0, 2, 1)
    corners = corners.reshape(-1, 3)
    edges = np.concatenate([corners, np.nextafter(corners, 2.0), np.nextafter(corners, -2.0),
                            np.rint(corners * 2.0**40) / 2.0**40])
    for points in (v, edges):
        assert np.array_equal(pixels_of(points, nside),
                              hp.vec2pix(nside, *points.T, nest=True))
    # shard ownership: healpy's order-29 index shifted, also on the edges of the pixels
    order = int(np.log2(nside))
    if order < 29:
        corner_ra, corner_dec = hp.vec2ang(corners, lonlat=True)
        centre_ra, centre_dec = hp.pix2ang(nside * 2, rng.integers(0, 4 * n_pix, 3000),
                                           nest=True, lonlat=True)
        ra = np.concatenate([corner_ra, centre_ra, np.degrees(np.arctan2(v[:, 1], v[:, 0]))
                             % 360.0])
        dec = np.concatenate([corner_dec, centre_dec, np.degrees(np.arcsin(v[:, 2]))])
        for r, d in ((ra, dec), (np.nextafter(ra, 400.0), np.nextafter(dec, 100.0)),
                     (np.nextafter(ra, -1.0), np.nextafter(dec, -100.0))):
            d = np.clip(d, -90.0, 90.0)
            expected = hp.ang2pix(1 << 29, r, d, nest=True, lonlat=True) >> (2 * (29 - order))
            assert np.array_equal(pixel_at_order(r, d, order), expected)
            assert np.array_equal(healpix29(r, d) >> (2 * (29 - order)), expected)
    if nside <= 16384:
        assert np.array_equal(np.sort(neighbours(pix, nside), axis=0),
                              np.sort(np.asarray(hp.get_all_neighbours(nside, pix, nest=True)),
                                      axis=0))
        assert np.array_equal(pixel_vectors(pix, nside), np.asarray(hp.pix2vec(nside, pix,
                                                                               nest=True)).T)
        for centre, radius in zip(v[:20], np.linspace(1e-5, 0.05, 20), strict=True):
            assert np.array_equal(np.sort(disc_pixels(centre, radius, nside)),
                                  np.sort(hp.query_disc(nside, centre, radius, inclusive=True,
                                                        nest=True)))
    assert max_pixel_radius(nside) == hp.max_pixrad(nside)
    assert resolution(nside) == hp.nside2resol(nside)
